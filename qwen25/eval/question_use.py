"""Does the model read the question? The worked solution's loss given its own question vs another's.

A word problem's worked solution repeats the question's numbers ("buys 2 candles at $3"
-> "2 x $3 = $6"). A model that reads the question predicts those tokens better after its
own question than after another question of the same family (same words, other numbers);
a model that only learned the solutions' template predicts them equally badly after both.
The gap, in nats per solution token, separates the two:

    question_use = mean NLL(solution | other question) - mean NLL(solution | own question)

Measured on the speedrun (2026-12-04): the recipe's SFT model scores 0.00 (its replies
write the family's template with numbers unrelated to the question), a model pretrained on
twice the tokens with a third of them math 1.0. Near zero, no amount of sharpening by RL
can make the answers right: they do not depend on the question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def other_question_pairs(problems: Sequence[dict]) -> list[tuple[int, int]]:
    """(own, other) index pairs: each problem with the next one of its family (cyclically).
    Problems alone in their family are left out: they have no same-family question to swap in."""
    by_family: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        by_family.setdefault(p["family"], []).append(i)
    pairs = []
    for idx in by_family.values():
        if len(idx) > 1:
            pairs += [(i, idx[(k + 1) % len(idx)]) for k, i in enumerate(idx)]
    return sorted(pairs)


def question_use(model, prompt: Callable[[str], list[int]], encode: Callable[[str], list[int]],
                 problems: Sequence[dict]) -> float | None:
    """The NLL gap above (nats per solution token); `prompt(question)` gives the context ids
    (e.g. the chat template's user turn), `encode(solution)` the continuation ids."""
    from qwen25.eval.loglik import loglikelihoods

    pairs = other_question_pairs(problems)
    if not pairs:
        return None
    reqs, ntok = [], 0
    for own, other in pairs:
        sol = encode(problems[own]["solution"])
        reqs += [(prompt(problems[own]["question"]), sol), (prompt(problems[other]["question"]), sol)]
        ntok += len(sol)
    lls = loglikelihoods(model, reqs)
    own_nll = -sum(ll.logprob for ll in lls[0::2])
    other_nll = -sum(ll.logprob for ll in lls[1::2])
    return (other_nll - own_nll) / ntok
