"""Ingest: named sources -> a stream of `Document`s, one file and one record at a time.

Formats: jsonl (plain or gzip; one JSON object per line), parquet (read batch by batch with
pyarrow), plain text files (one document per file, or cut at blank lines into chunks), and
folders of code files (the language comes from the extension). Memory is bounded by one
record (one row group for parquet, one file for text), never by the corpus.

Nothing is lost silently. A record that cannot become a document is reported to `skip(reason,
source, doc_id)` and counted under a named reason by the caller:
  invalid_json        a jsonl line that does not parse
  missing_text_field  a record without a string in the text field (also null parquet cells)
  not_utf8            a text/code file or jsonl line that is not valid UTF-8
  unreadable_file     a file that cannot be opened or read to its end (counts the file once;
                      the records after the failure point are unknown)
With `strict=True` the first of these raises `UserError` instead.

Every input file is hashed (sha256) while it is read; `SourceStats` carries the per-source
digest, file and byte counts into the manifest.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qwen25.data.config import SourceConfig
from qwen25.errors import UserError
from qwen25.files import sha256_file

# File extension -> programming language (documents get kind "code").
CODE_LANGUAGES = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp",
    ".hpp": "cpp", ".cxx": "cpp", ".java": "java", ".js": "javascript", ".mjs": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".go": "go", ".rs": "rust", ".rb": "ruby",
    ".php": "php", ".cs": "csharp", ".swift": "swift", ".kt": "kotlin", ".scala": "scala",
    ".sh": "shell", ".bash": "shell", ".sql": "sql", ".r": "r", ".lua": "lua", ".pl": "perl",
    ".hs": "haskell", ".jl": "julia", ".m": "objective-c", ".f90": "fortran", ".tex": "tex",
    ".html": "html", ".css": "css", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml",
}
TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json.gz", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")

Skip = Callable[[str, str, str], None]  # (reason, source, doc_id)


@dataclass
class Document:
    """One document on its way through the pipeline.

    text: the document (normalised once it passed `normalize`); source: the source name;
    id: unique within the run ("source:relpath", "source:file:line", "...#chunk");
    kind: "text" or "code"; lang: programming language for code ("" otherwise);
    domain: mixture domain ("" until classified).
    """

    text: str
    source: str
    id: str
    kind: str = "text"
    lang: str = ""
    domain: str = ""


@dataclass
class SourceStats:
    """What one source read: files, bytes and a digest over (relative path, file sha256)."""

    files: int = 0
    bytes: int = 0
    files_ignored: int = 0  # folder entries with an extension that is not read
    files_not_regular: int = 0  # entries skipped as not regular files (dangling links, FIFOs, sockets)
    bytes_read: int = 0  # raw bytes read so far, live (for progress bars)
    _digest: object = field(default_factory=hashlib.sha256, repr=False)

    def add_file(self, rel: str, size: int, sha: str) -> None:
        self.files += 1
        self.bytes += size
        self._digest.update(f"{rel}\0{sha}\n".encode())

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


# --------------------------------------------------------------------------------------
# file discovery
# --------------------------------------------------------------------------------------


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if path.suffix.lower() in CODE_LANGUAGES:
        return "code"
    return "text"


def list_files(src: SourceConfig) -> tuple[list[tuple[Path, str]], int, int]:
    """The source's files in a fixed (sorted) order, with paths relative to the source root,
    the number of folder entries skipped for their extension, and the number skipped because
    they are not regular files (a dangling symlink, a FIFO that would block the read, a
    socket or device): those are counted, never opened.

    Raises `UserError` when nothing matches: a misspelt path is a mistake, not an empty source.
    """
    root = Path(src.path)
    if _is_regular(str(root)):
        return [(root, root.name)], 0, 0
    if root.is_dir():
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in src.extensions)
        files, ignored, odd = [], 0, 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
            for fn in sorted(filenames):
                full = os.path.join(dirpath, fn)
                if not _wanted(fn.lower(), exts):
                    ignored += 1
                elif not _is_regular(full):
                    odd += 1
                else:
                    files.append((Path(full), os.path.relpath(full, root).replace(os.sep, "/")))
        return (files, ignored, odd) if files else _none_found(src)
    if root.exists() or root.is_symlink():
        raise UserError(f"source {src.name!r}: {src.path} is not a regular file or folder (a FIFO, "
                        "socket, device or broken link); give a file, a folder or a glob")
    candidates = glob.glob(src.path, recursive=True)
    matches = sorted(m for m in candidates if _is_regular(m))
    odd = sum(1 for m in candidates if not os.path.isdir(m) and not _is_regular(m))
    return ([(Path(m), m) for m in matches], 0, odd) if matches else _none_found(src)


def _is_regular(path: str) -> bool:
    """A regular file after following links (False for a dangling or looping link)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _wanted(name: str, exts: tuple[str, ...]) -> bool:
    if exts:
        return name.endswith(exts)
    suffix = os.path.splitext(name)[1]
    return (suffix in CODE_LANGUAGES or suffix in TEXT_EXTENSIONS
            or name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES))


def _none_found(src: SourceConfig):
    raise UserError(f"source {src.name!r}: no readable files at {src.path!r}; check the path "
                    "(a file, a folder, or a glob such as 'data/*.jsonl.gz')")


# --------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------


def read_source(src: SourceConfig, skip: Skip, stats: SourceStats, strict: bool = False
                ) -> Iterator[Document]:
    """Stream the documents of one source, in file order then record order."""
    files, stats.files_ignored, stats.files_not_regular = list_files(src)
    for path, rel in files:
        fmt = _format_of(path, src.format)
        reader = {"jsonl": _read_jsonl, "parquet": _read_parquet}.get(fmt, _read_text_file)
        try:
            yield from reader(src, path, rel, fmt, skip, stats, strict)
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            if strict:
                raise UserError(f"source {src.name!r}: cannot read {path}: {e}") from None
            skip("unreadable_file", src.name, f"{src.name}:{rel}")


def _kind(src: SourceConfig, path: Path, fmt: str) -> tuple[str, str]:
    """(kind, language) of a text/code file: the source's kind wins, else the extension."""
    lang = CODE_LANGUAGES.get(path.suffix.lower(), "")
    kind = src.kind if src.kind != "auto" else ("code" if lang or fmt == "code" else "text")
    return kind, lang if kind == "code" else ""


def _read_text_file(src, path, rel, fmt, skip, stats, strict):
    raw = path.read_bytes()
    stats.bytes_read += len(raw)
    stats.add_file(rel, len(raw), hashlib.sha256(raw).hexdigest())
    doc_id = f"{src.name}:{rel}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        if strict:
            raise UserError(f"source {src.name!r}: {path} is not UTF-8 text") from None
        skip("not_utf8", src.name, doc_id)
        return
    kind, lang = _kind(src, path, fmt)
    if src.chunk_chars and kind == "text":
        for i, chunk in enumerate(chunk_text(text, src.chunk_chars)):
            yield Document(chunk, src.name, f"{doc_id}#{i}", kind, lang, src.domain)
    else:
        yield Document(text, src.name, doc_id, kind, lang, src.domain)


def chunk_text(text: str, size: int) -> list[str]:
    """Cut `text` at blank lines into pieces of about `size` characters (at least one piece).

    A paragraph longer than `size` stays whole; joining the pieces with "\\n\\n" gives the text
    back up to the blank-line runs between pieces.
    """
    paras = [p for p in text.replace("\r\n", "\n").split("\n\n")]
    chunks, cur, cur_len = [], [], 0
    for p in paras:
        if cur and cur_len + len(p) > size:
            chunks.append("\n\n".join(cur))
            cur, cur_len = [], 0
        if p.strip() or cur:
            cur.append(p)
            cur_len += len(p) + 2
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks or [text]


class _HashingReader:
    """A binary file wrapper that hashes and counts every byte read through it."""

    def __init__(self, f, stats: SourceStats):
        self.f, self.sha, self.n, self.stats = f, hashlib.sha256(), 0, stats

    def read(self, size=-1):
        b = self.f.read(size)
        self.sha.update(b)
        self.n += len(b)
        self.stats.bytes_read += len(b)
        return b

    def readable(self):
        return True


def _read_jsonl(src, path, rel, fmt, skip, stats, strict):
    kind = "code" if src.kind == "code" else "text"
    with open(path, "rb") as raw:
        hashing = _HashingReader(raw, stats)
        stream = gzip.GzipFile(fileobj=hashing) if path.name.lower().endswith(".gz") else hashing
        lineno = 0
        parts: list[bytes] = []  # the current line's pieces (joined once: a long line is not recopied)
        while True:
            block = stream.read(1 << 20)
            if not block:
                break
            start = 0
            while (nl := block.find(b"\n", start)) >= 0:
                parts.append(block[start:nl])
                line, parts = b"".join(parts), []
                lineno += 1
                yield from _jsonl_record(src, rel, lineno, line, kind, skip, strict)
                start = nl + 1
            parts.append(block[start:])
        if any(parts):
            lineno += 1
            yield from _jsonl_record(src, rel, lineno, b"".join(parts), kind, skip, strict)
        stats.add_file(rel, hashing.n, hashing.sha.hexdigest())


def _jsonl_record(src, rel, lineno, line, kind, skip, strict):
    if not line.strip():
        return
    doc_id = f"{src.name}:{rel}:{lineno}"
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        reason = "not_utf8"
    except ValueError:
        reason = "invalid_json"
    else:
        text = obj.get(src.text_field) if isinstance(obj, dict) else None
        if isinstance(text, str):
            if src.id_field and isinstance(obj.get(src.id_field), (str, int)):
                doc_id = f"{src.name}:{obj[src.id_field]}"
            yield Document(text, src.name, doc_id, kind, "", src.domain)
            return
        reason = "missing_text_field"
    if strict:
        raise UserError(f"source {src.name!r}: {rel} line {lineno}: {reason.replace('_', ' ')} "
                        f"(text field {src.text_field!r})")
    skip(reason, src.name, doc_id)


def _read_parquet(src, path, rel, fmt, skip, stats, strict):
    import pyarrow.parquet as pq
    from pyarrow import ArrowException

    kind = "code" if src.kind == "code" else "text"
    try:
        pf = pq.ParquetFile(path)
    except ArrowException as e:
        raise OSError(f"not a parquet file ({e})") from None
    columns = [c for c in (src.text_field, src.id_field) if c]
    names = set(pf.schema_arrow.names)
    row = 0
    if src.text_field not in names:
        if strict:
            raise UserError(f"source {src.name!r}: {rel} has no column {src.text_field!r}; "
                            f"columns are {sorted(names)} (set text_field)")
        for row in range(pf.metadata.num_rows):
            skip("missing_text_field", src.name, f"{src.name}:{rel}:{row}")
    else:
        columns = [c for c in columns if c in names]
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=columns):
                texts = batch.column(src.text_field).to_pylist()
                ids = batch.column(src.id_field).to_pylist() if src.id_field in columns else None
                for i, text in enumerate(texts):
                    doc_id = f"{src.name}:{ids[i]}" if ids and ids[i] is not None else f"{src.name}:{rel}:{row}"
                    row += 1
                    if isinstance(text, str):
                        yield Document(text, src.name, doc_id, kind, "", src.domain)
                    elif strict:
                        raise UserError(f"source {src.name!r}: {rel} row {row - 1}: no text")
                    else:
                        skip("missing_text_field", src.name, doc_id)
        except ArrowException as e:
            raise OSError(str(e)) from None
    stats.bytes_read += path.stat().st_size
    stats.add_file(rel, path.stat().st_size, sha256_file(path))
