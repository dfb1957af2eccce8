"""`DataConfig`: everything `qwen25 data prepare` does, as one frozen dataclass tree.

A config is data: a JSON (or TOML) file whose keys are exactly the fields below, nested the
same way. Unknown keys are an error naming the key and the known ones, never silently
ignored. Every field carries a comment; `qwen25 data prepare --help` prints them
(`field_comments`).

Thresholds default to the published values of the rule families they come from (Gopher,
Rae et al. 2021, App. A; C4, Raffel et al. 2020 §2.2; FineWeb, Penedo et al. 2024; the Stack
/ StarCoder filters for code), loosened where the built-in corpora (verse and plays, Python
sources, short math problems) would otherwise lose most of their text; each loosening is
stated at the field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen25.errors import UserError

FORMATS = ("auto", "jsonl", "parquet", "text", "code")
KINDS = ("auto", "text", "code")
SCORERS = ("", "perplexity", "judge")


@dataclass(frozen=True)
class SourceConfig:
    """One named input: a file, a folder (read recursively) or a glob pattern."""

    name: str  # unique name; counts, thresholds and shards are keyed by it
    path: str  # file, folder or glob ("corpus/*.jsonl.gz")
    format: str = "auto"  # jsonl | parquet | text | code | auto (by each file's extension)
    text_field: str = "text"  # jsonl/parquet field holding the document text
    id_field: str = ""  # jsonl/parquet field holding a document id ("" -> file:line)
    domain: str = ""  # domain of every document ("" -> the keyword classifier decides)
    kind: str = "auto"  # text | code | auto (code when the file extension names a language)
    chunk_chars: int = 0  # cut text files at blank lines into documents of about this size (0: whole file)
    extensions: tuple[str, ...] = ()  # folders: file extensions to read (empty: every known text/code one)
    disable_rules: tuple[str, ...] = ()  # heuristic rules not applied to this source


@dataclass(frozen=True)
class FilterConfig:
    """Heuristic quality rules; a document is dropped by the first rule it fails."""

    enabled: bool = True  # run the heuristic rules at all
    disable_rules: tuple[str, ...] = ()  # rule names switched off for every source
    min_words: int = 20  # Gopher uses 50; 20 keeps short math problems
    max_words: int = 100_000  # Gopher
    min_mean_word_length: float = 3.0  # Gopher (characters, whitespace-split words)
    max_mean_word_length: float = 10.0  # Gopher
    max_symbol_word_ratio: float = 0.1  # Gopher: ('#' + '...' + '…') per word
    max_bullet_lines: float = 0.9  # Gopher: fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # Gopher: fraction of lines ending with an ellipsis
    min_alpha_words: float = 0.8  # Gopher: fraction of words with an alphabetic character
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")  # Gopher
    min_stop_words: int = 2  # Gopher: at least this many stop-word occurrences (0 disables)
    max_digit_ratio: float = 0.3  # digits per non-space character
    max_dup_line_chars: float = 0.2  # Gopher: characters in duplicated lines / all
    max_dup_para_chars: float = 0.2  # Gopher: characters in duplicated paragraphs / all
    max_top_ngram_chars: tuple[float, float, float] = (0.2, 0.18, 0.16)  # Gopher, for 2/3/4-grams
    max_dup_ngram_chars: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # Gopher, 5..10-grams
    max_boilerplate_lines: float = 0.3  # C4-style boilerplate lines (cookies, terms, js) / lines
    min_terminal_punct_lines: float = 0.0  # FineWeb uses 0.12; 0 off (verse lines end in commas)
    max_short_lines: float = 1.0  # FineWeb uses 0.67 (<30 chars); 1.0 off (plays are short lines)
    code_max_line_length: int = 1000  # StarCoder: any longer line drops the file
    code_max_mean_line_length: float = 100.0  # StarCoder
    code_min_alnum_fraction: float = 0.25  # StarCoder
    code_max_encoded_chars: int = 1024  # characters in base64/hex-like runs of >= 64 (encoded data)


@dataclass(frozen=True)
class QualityConfig:
    """Model-based scoring (off by default; runs after every cheap stage)."""

    scorer: str = ""  # "" (off) | perplexity | judge
    model: str = ""  # checkpoint folder (qwen25.load_model); the judge needs a chat model
    tokenizer: str = ""  # tokenizer for the model ("" -> the model folder)
    max_tokens: int = 512  # document tokens scored (the start of the document)
    batch_size: int = 8  # documents per forward pass
    max_perplexity: dict[str, float] = field(default_factory=dict)  # per source ("*": default); drop above
    min_score: dict[str, float] = field(default_factory=dict)  # judge: per source ("*": default); drop below


@dataclass(frozen=True)
class DedupConfig:
    """Exact (normalised hash) then near-duplicate (MinHash LSH) removal; first seen kept."""

    exact: bool = True  # drop documents whose normalised text was seen before
    near: bool = True  # drop documents similar to an earlier one (MinHash LSH)
    shingle_size: int = 5  # words per shingle
    threshold: float = 0.7  # Jaccard similarity of shingle sets that counts as a duplicate
    num_perm: int = 128  # MinHash permutations (signature length)
    seed: int = 1  # MinHash permutation seed
    lsh_weights: tuple[float, float] = (0.1, 0.9)  # LSH banding (false positive, false negative) weights


@dataclass(frozen=True)
class EvalSetConfig:
    """One evaluation set to decontaminate against."""

    name: str  # listed in the decontamination report
    path: str  # jsonl(.gz) file, one item per line, or a text file (one item per file)
    fields: tuple[str, ...] = ("text",)  # jsonl fields concatenated into the item's text


@dataclass(frozen=True)
class DecontamConfig:
    """Drop training documents that overlap an evaluation set (word n-grams and LCS)."""

    eval_sets: tuple[EvalSetConfig, ...] = ()  # the sets; none -> the stage is off
    ngram: int = 13  # drop on one shared word n-gram of this length (lowercased \\w+ words)
    lcs: bool = True  # also apply the report's LCS rule (qwen25-spec §3.1)
    lcs_min: int = 13  # |LCS| >= this ...
    lcs_ratio: float = 0.6  # ... and |LCS| >= ratio * min(|s_t|, |s_e|)
    lcs_seed: int = 5  # candidate pairs share word n-grams of this length ...
    lcs_seed_fraction: float = 0.1  # ... covering at least this fraction of the eval item's


@dataclass(frozen=True)
class MixConfig:
    """Domain mixture of the training split: up-sample by repeats, down-sample by dropping."""

    weights: dict[str, float] = field(default_factory=dict)  # target token share per domain ({}: natural)
    total_tokens: int = 0  # training tokens after mixing (0: as many as before mixing)
    max_repeats: float = 0.0  # cap on how often a document is repeated (0: no cap)
    seed: int = 0  # seeds the choice of documents for fractional repeats / down-sampling
    keywords: dict[str, tuple[str, ...]] = field(default_factory=dict)  # classifier: domain -> keywords
    default_domain: str = "general"  # classifier: domain when no keyword matches
    classifier_model: str = ""  # chat checkpoint choosing among keywords' domains + default ("": keywords)
    classifier_tokenizer: str = ""  # tokenizer of that checkpoint ("" -> the checkpoint folder)


@dataclass(frozen=True)
class DataConfig:
    """The whole `prepare` run: sources -> filters -> dedup -> decontam -> quality -> mix -> shards."""

    sources: tuple[SourceConfig, ...] = ()  # the inputs (at least one)
    out: str = "out/data"  # output folder: manifest.json, shards, card.md, listings
    tokenizer: str = "qwen2.5"  # qwen25.load_tokenizer spec: "qwen2.5" or a tokenizer folder
    filters: FilterConfig = FilterConfig()  # heuristic rules
    quality: QualityConfig = QualityConfig()  # model-based scoring
    dedup: DedupConfig = DedupConfig()  # duplicate removal
    decontam: DecontamConfig = DecontamConfig()  # evaluation-set overlap removal
    mix: MixConfig = MixConfig()  # domain mixture
    val_fraction: float = 0.01  # documents held out (chosen by content hash) for validation
    shard_tokens: int = 1 << 26  # tokens per shard file (uint32: 256 MiB)
    num_workers: int = 2  # processes for the per-document stages (0: in this process)
    batch_docs: int = 1024  # documents per work unit sent to a worker
    strict: bool = False  # raise on the first bad input record instead of counting a skip
    checkpoint_mb: float = 256.0  # resume point every this many MB of text (0: none); rerun resumes

    def __post_init__(self) -> None:
        validate(self)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def validate(cfg: DataConfig) -> None:
    """Raise `UserError` for a config that cannot run (before any work starts)."""
    names = [s.name for s in cfg.sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"source names must be unique; repeated: {dup}")
    for s in cfg.sources:
        if not s.name:
            raise UserError(f"source with path {s.path!r} needs a name")
        if s.format not in FORMATS:
            raise UserError(f"source {s.name!r}: format {s.format!r} unknown; use one of {FORMATS}")
        if s.kind not in KINDS:
            raise UserError(f"source {s.name!r}: kind {s.kind!r} unknown; use one of {KINDS}")
        if s.chunk_chars < 0:
            raise UserError(f"source {s.name!r}: chunk_chars must be >= 0")
    if cfg.quality.scorer not in SCORERS:
        raise UserError(f"quality.scorer {cfg.quality.scorer!r} unknown; use one of {SCORERS}")
    if cfg.quality.scorer and not cfg.quality.model:
        raise UserError("quality.scorer is set but quality.model is empty; give a checkpoint folder")
    for key in (*cfg.quality.max_perplexity, *cfg.quality.min_score):
        if key != "*" and key not in names:
            raise UserError(f"quality threshold for unknown source {key!r}; sources are {names} (or '*')")
    if not 0.0 < cfg.dedup.threshold <= 1.0:
        raise UserError("dedup.threshold must be in (0, 1]")
    if cfg.dedup.shingle_size < 1 or cfg.dedup.num_perm < 16:
        raise UserError("dedup.shingle_size must be >= 1 and dedup.num_perm >= 16")
    if cfg.decontam.ngram < 1 or cfg.decontam.lcs_seed < 1:
        raise UserError("decontam.ngram and decontam.lcs_seed must be >= 1")
    if any(w < 0 for w in cfg.mix.weights.values()) or (cfg.mix.weights and sum(cfg.mix.weights.values()) <= 0):
        raise UserError("mix.weights must be >= 0 with a positive sum")
    unknown = sorted(set(cfg.mix.weights) - set(declared_domains(cfg)))
    if unknown:
        raise UserError(f"mix weight for unknown domain(s) {unknown}; domains are "
                        f"{declared_domains(cfg)} (set a source's domain or mix.keywords)")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError("val_fraction must be in [0, 1)")
    if cfg.shard_tokens < 1024 or cfg.batch_docs < 1 or cfg.num_workers < 0 or cfg.checkpoint_mb < 0:
        raise UserError("shard_tokens must be >= 1024, batch_docs >= 1, num_workers >= 0 and checkpoint_mb >= 0")


def declared_domains(cfg: DataConfig) -> list[str]:
    """Every domain a document of this run can get: sources' own, then the classifier's."""
    out = [s.domain for s in cfg.sources if s.domain]
    if any(not s.domain for s in cfg.sources):
        out += [*cfg.mix.keywords, cfg.mix.default_domain]
    return sorted(set(out))


# --------------------------------------------------------------------------------------
# dict / file <-> dataclass
# --------------------------------------------------------------------------------------


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain data; unknown keys and wrong types raise `UserError`."""
    if not isinstance(data, dict):
        raise UserError(f"{where or 'config'} must be an object (a mapping of keys to values)")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"unknown config key(s) {[_join(where, k) for k in unknown]}; "
                        f"known keys here: {sorted(known)}")
    kwargs = {k: _convert(hints[k], v, _join(where, k)) for k, v in data.items()}
    missing = [k for k, f in known.items() if k not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"missing config key(s) {[_join(where, k) for k in missing]}")
    return cls(**kwargs)


def _join(where: str, key: str | int) -> str:
    return f"{where}[{key}]" if isinstance(key, int) else (f"{where}.{key}" if where else key)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, _join(where, i)) for i, v in enumerate(value))
        if len(value) != len(args):
            raise UserError(f"{where} must have {len(args)} entries, got {len(value)}")
        return tuple(_convert(a, v, _join(where, i)) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be an object, got {value!r}")
        return {str(k): _convert(args[1], v, _join(where, str(k))) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise UserError(f"{where} must be of type {getattr(tp, '__name__', tp)}, got {value!r}")


def to_dict(cfg: Any) -> Any:
    """Plain JSON-ready data for a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Plain data from a `.json` or `.toml` config file (one-line errors for bad files)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found; pass an existing .json or .toml file")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, ImportError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"config file {p} is not valid {p.suffix.lstrip('.') or 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold an object of config keys, not "
                        f"{type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=VALUE` to nested plain data in place (VALUE parsed as JSON, else a string)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UserError(f"override {assignment!r} must look like key.sub=value")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = value


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment written after it in the class source (for `--help`)."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("# ").strip()
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = comments.get(node.end_lineno, "")
    return out
