"""Benchmarks as data + scorers (see base.py): `get_task(name)`, `TASK_NAMES`.

Scorers are importable on their own for rewards and pair building, e.g.
`from qwen25.eval.tasks.math import score_number` (GSM8K), `score_math` (MATH),
`qwen25.eval.tasks.code.score_humaneval` / `score_mbpp`, `ifbench.score_ifbench`,
`base.mc_metrics` (multiple choice). Building the registry imports no data.
"""

from __future__ import annotations

from qwen25.errors import UserError


def registry() -> dict:
    from qwen25.eval.tasks import code, ifbench, math, multiple_choice

    return {t.name: t for mod in (multiple_choice, math, code, ifbench) for t in mod.TASKS}


PROBES = ("bpb", "passkey", "needle")  # model probes run by the harness (eval/probes.py)


def task_names() -> list[str]:
    return [*registry(), *PROBES]


def get_task(name: str):
    tasks = registry()
    if name not in tasks:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(task_names())}")
    return tasks[name]
