"""Synthetic math word problems with worked solutions (the built-in math corpus).

The report leans on math data (Qwen2.5-Math corpora, synthetic problems verified by a reward
model); this is the offline stand-in: grade-school word problems whose numbers are drawn
from a seeded RNG and whose solutions are computed, so every answer is correct by
construction.

Splits are disjoint by *family*, not only by numbers: a templated family shares most of its
words between instances, so held-out instances of a training family would be contaminated
by design (and the decontamination stage would rightly drop most training problems). The
held-out split therefore uses four families whose wording never appears in training.

`problem(split, i)` is a pure function of (split, i): `random.Random(f"{split}:{i}")` seeds
from the string through SHA-512, identical on every platform and Python version >= 3.2.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas",
         "Kira", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sami", "Tara")
ITEMS = ("notebook", "pencil", "apple", "ticket", "sticker", "muffin", "marker", "candle")

Family = Callable[[random.Random], tuple[str, str, int]]  # rng -> (question, solution, answer)


def _name(r: random.Random) -> str:
    return r.choice(NAMES)


# ---- training families ----------------------------------------------------------------

def change(r):
    n, a, p = _name(r), r.randint(2, 9), r.randint(2, 12)
    bill = r.choice([50, 100]) if a * p > 20 else 20
    cost = a * p
    q = f"{n} buys {a} {r.choice(ITEMS)}s at ${p} each and pays with a ${bill} bill. How much change does {n} get back?"
    s = f"The purchase costs {a} x ${p} = ${cost}. The change is ${bill} - ${cost} = ${bill - cost}."
    return q, s, bill - cost


def two_legs(r):
    v1, t1, v2, t2 = r.randint(40, 90), r.randint(1, 4), r.randint(30, 80), r.randint(1, 3)
    q = (f"A train runs at {v1} km per hour for {t1} hours and then at {v2} km per hour for "
         f"{t2} hours. What distance does it cover altogether?")
    s = (f"First part: {v1} x {t1} = {v1 * t1} km. Second part: {v2} x {t2} = {v2 * t2} km. "
         f"Together: {v1 * t1} + {v2 * t2} = {v1 * t1 + v2 * t2} km.")
    return q, s, v1 * t1 + v2 * t2


def pages_left(r):
    n, per, days = _name(r), r.randint(8, 30), r.randint(2, 9)
    total = per * days + r.randint(5, 120)
    q = f"A novel has {total} pages. {n} reads {per} pages every day. How many pages remain unread after {days} days?"
    s = (f"In {days} days {n} reads {per} x {days} = {per * days} pages, "
         f"leaving {total} - {per * days} = {total - per * days}.")
    return q, s, total - per * days


def ages(r):
    a, b, k, y = _name(r), _name(r), r.randint(2, 5), r.randint(1, 10)
    young = r.randint(2, 15)
    total = k * young + young + 2 * y
    q = (f"{a} is {k} times as old as {b}. In {y} years the sum of their ages will be {total}. "
         f"How old is {b} now?")
    s = (f"Let {b}'s age be x, so {a} is {k}x. In {y} years the ages sum to x + {k}x + 2 x {y} = "
         f"{k + 1}x + {2 * y} = {total}. So {k + 1}x = {total - 2 * y} and x = {young}.")
    return q, s, young


def discount(r):
    price, pct = r.randint(2, 60) * 20, r.choice([10, 15, 20, 25, 30, 40, 50])
    off = price * pct // 100
    item = r.choice(("jacket", "bicycle", "lamp", "guitar", "backpack", "camera", "tent", "desk"))
    q = f"A {item} is priced at ${price}. During a sale it is {pct}% off. What is the sale price?"
    s = f"The discount is {pct}% of ${price} = ${off}. The sale price is ${price} - ${off} = ${price - off}."
    return q, s, price - off


def fence(r):
    length, width = r.randint(5, 90), r.randint(3, 60)
    place = r.choice(("garden", "yard", "paddock", "playground"))
    q = f"A rectangular {place} measures {length} m by {width} m. How many meters of fencing go all the way around it?"
    s = f"The perimeter is 2 x ({length} + {width}) = 2 x {length + width} = {2 * (length + width)} m."
    return q, s, 2 * (length + width)


def share(r):
    n, k = _name(r), r.randint(3, 8)
    marbles = k * r.randint(4, 20) + r.randint(0, k - 1)
    q = (f"{n} has {marbles} marbles and hands them out equally to {k} friends, keeping whatever "
         f"cannot be shared. How many marbles does {n} keep?")
    s = f"{marbles} divided by {k} is {marbles // k} with remainder {marbles % k}, so {n} keeps {marbles % k}."
    return q, s, marbles % k


def saving(r):
    n, earn, spend = _name(r), r.randint(20, 60), r.randint(5, 19)
    goal = r.randint(100, 600)
    weekly = earn - spend
    weeks = math.ceil(goal / weekly)
    q = f"{n} earns ${earn} a week and spends ${spend} of it. How many weeks until {n} has saved at least ${goal}?"
    s = (f"Each week {n} saves ${earn} - ${spend} = ${weekly}. {goal} / {weekly} = {goal / weekly:.2f}, "
         f"so it takes {weeks} weeks.")
    return q, s, weeks


def batches(r):
    per, count, extra = r.randint(2, 9), r.randint(3, 25), r.randint(1, 12)
    food = r.choice(("cookies", "muffins", "scones", "rolls", "pancakes"))
    q = (f"One batch of {food} uses {per} cups of flour. {_name(r)} makes {count} batches and "
         f"spills {extra} cups. How much flour was used in total?")
    s = (f"The batches need {per} x {count} = {per * count} cups; "
         f"with the spill, {per * count} + {extra} = {per * count + extra} cups.")
    return q, s, per * count + extra


def stack(r):
    bottom, step = r.randint(5, 40), r.randint(1, 4)
    thing = r.choice(("cans", "boxes", "logs", "bricks", "oranges"))
    rows = [bottom - step * i for i in range(bottom) if bottom - step * i > 0]
    q = (f"{thing.capitalize()} are stacked with {bottom} {thing} in the bottom row and {step} fewer in each row "
         f"above, until a row would be empty. How many {thing} are in the stack?")
    s = f"The rows hold {' + '.join(map(str, rows))} = {sum(rows)} {thing}."
    return q, s, sum(rows)


def beads(r):
    red, blue, mult = r.randint(1, 9), r.randint(1, 9), r.randint(3, 25)
    c1, c2 = r.sample(("red", "blue", "green", "yellow", "white", "black"), 2)
    total = (red + blue) * mult
    q = f"A jar holds {c1} and {c2} beads in the ratio {red}:{blue}. There are {total} beads in all. How many are {c1}?"
    s = (f"The ratio has {red} + {blue} = {red + blue} parts, so one part is {total} / {red + blue} = {mult} beads. "
         f"{c1.capitalize()} beads: {red} x {mult} = {red * mult}.")
    return q, s, red * mult


def movie(r):
    h, m, dur = r.randint(1, 9), r.choice([0, 10, 15, 20, 30, 45]), r.randint(75, 190)
    end = h * 60 + m + dur
    q = f"A film begins at {h}:{m:02d} pm and runs for {dur} minutes. At what time does it finish (minutes past noon)?"
    s = (f"The start is {h} x 60 + {m} = {h * 60 + m} minutes past noon. Adding {dur} gives {end} minutes, "
         f"which is {end // 60}:{end % 60:02d} pm.")
    return q, s, end


# ---- held-out families (wording disjoint from the training ones) ------------------------

def new_average(r):
    k, avg, bump = r.randint(3, 8), r.randint(60, 85), r.randint(1, 3)
    score = (avg + bump) * (k + 1) - avg * k
    q = (f"Over {k} quizzes a student averaged {avg} points. After one further quiz the mean rose "
         f"to {avg + bump}. What did the student score on that last quiz?")
    s = (f"Points before: {k} x {avg} = {k * avg}. Points after: {k + 1} x {avg + bump} = {(k + 1) * (avg + bump)}. "
         f"Last quiz: {(k + 1) * (avg + bump)} - {k * avg} = {score}.")
    return q, s, score


def cyclists(r):
    v1, v2, t = r.randint(10, 25), r.randint(10, 25), r.randint(1, 6)
    d = (v1 + v2) * t
    q = (f"Two cyclists set off toward one another from towns {d} kilometres apart, pedalling at "
         f"{v1} and {v2} kilometres hourly. When do they meet?")
    s = f"They close the gap at {v1} + {v2} = {v1 + v2} kilometres hourly, meeting after {d} / {v1 + v2} = {t} hours."
    return q, s, t


def bakery(r):
    loaves, price, cost, rent = r.randint(40, 150), r.randint(4, 9), r.randint(1, 3), r.randint(30, 120)
    profit = loaves * (price - cost) - rent
    q = (f"Each morning a bakery sells {loaves} loaves for ${price} apiece. Ingredients run ${cost} "
         f"per loaf and the shop rent is ${rent} daily. Find the daily profit.")
    s = (f"Margin per loaf: ${price} - ${cost} = ${price - cost}; over {loaves} loaves that is "
         f"${loaves * (price - cost)}. Minus rent: ${loaves * (price - cost)} - ${rent} = ${profit}.")
    return q, s, profit


def fruit_bags(r):
    g = r.randint(2, 12)
    a, b = g * r.randint(2, 9), g * r.randint(2, 9)
    bags = math.gcd(a, b)
    q = (f"Packing {a} plums and {b} pears into identical gift bags with nothing left over, "
         f"what is the largest number of bags possible?")
    s = f"The count must divide both {a} and {b}; their greatest common divisor is {bags}."
    return q, s, bags


TRAIN_FAMILIES: tuple[Family, ...] = (change, two_legs, pages_left, ages, discount, fence, share,
                                      saving, batches, stack, beads, movie)
TEST_FAMILIES: tuple[Family, ...] = (new_average, cyclists, bakery, fruit_bags)


def problem(split: str, i: int) -> dict:
    """Problem `i` of `split` ("train" or "test"): {id, question, solution, answer, text}."""
    families = {"train": TRAIN_FAMILIES, "test": TEST_FAMILIES}[split]
    r = random.Random(f"{split}:{i}")
    family = families[r.randrange(len(families))]
    q, s, ans = family(r)
    text = f"Problem: {q}\nSolution: {s}\nThe answer is {ans}."
    return {"id": f"math-{split}-{i}", "family": family.__name__, "question": q, "solution": s,
            "answer": ans, "text": text}


def problems(split: str, n: int) -> Iterator[dict]:
    """The first `n` distinct problems of `split`, in index order.

    Small families repeat themselves (a fence has only so many sizes); repeats are skipped
    here so the corpus does not hand the dedup stage thousands of planted copies.
    """
    seen: set[str] = set()
    i = 0
    while len(seen) < n:
        p = problem(split, i)
        i += 1
        if p["text"] not in seen:
            seen.add(p["text"])
            yield p
