"""Opening a GGUF file through the `gguf` package, with one-line errors for bad files.

`open_gguf(path)` returns a `GGUFFile`: the metadata as Python values and a record per
tensor (type, shape, where its bytes are), read on demand. Every way a file can be unreadable (missing, wrong magic,
truncated, an unknown tensor type, a tensor past the end of the file) becomes a `GGUFError`
naming the file, the problem and the fix; a traceback from the reader never reaches the user.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen25.errors import UserError
import qwen25.formats.gguf_names as names

MAGIC = b"GGUF"


class GGUFError(UserError):
    """A GGUF file that cannot be read or is not a model we can load."""


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a `.gguf` file or any file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lies in the file and what it is; its bytes are read on demand."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # row-major (HF order): the GGUF `ne` list reversed
    n_elements: int
    n_bytes: int
    offset: int  # absolute byte offset of the data in the file


class GGUFFile:
    """Metadata (plain Python values) and tensor records of one GGUF file.

    The `gguf` reader is used once to parse the header and then dropped: its per-element
    views of the vocabulary arrays cost more memory than a 135M model's quantised weights,
    and a kept memory map would leave every page read resident next to the model. Tensor
    bytes are read from the file one tensor at a time (`read`).
    """

    def __init__(self, path: Path, reader: Any):
        self.path = path
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                raise GGUFError(f"{path}: metadata {key!r} cannot be decoded ({e}); the file "
                                "is corrupted") from None
        self.tensors: dict[str, TensorRecord] = {
            t.name: TensorRecord(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                                 int(t.n_elements), int(t.n_bytes), int(t.data_offset))
            for t in reader.tensors}
        self.size = path.stat().st_size
        self.architecture = self.get(names.ARCHITECTURE)
        if not isinstance(self.architecture, str):
            raise GGUFError(f"{path}: no general.architecture in the metadata; this is not a "
                            "model file (or it was written by a tool that omits the key)")

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (str, int, float, bool or a list), or `default`."""
        return self.metadata.get(key, default)

    def arch_get(self, template: str, default: Any = None) -> Any:
        """`get` of an architecture key template such as "{arch}.block_count"."""
        return self.get(names.key(template, self.architecture), default)

    def read(self, t: TensorRecord) -> np.ndarray:
        """The stored bytes of `t` as the array `gguf.quants.dequantize` takes: typed for
        F32/F16 (and integer types), uint8 rows of blocks for BF16 and quantised types."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import quant_shape_to_byte_shape

        if t.offset + t.n_bytes > self.size:
            raise GGUFError(f"{self.path}: tensor {t.name!r} ends past the end of the file; the "
                            "file is truncated or corrupted, download or convert it again")
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            raw = np.empty(t.n_bytes, dtype=np.uint8)
            if f.readinto(memoryview(raw)) != t.n_bytes:
                raise GGUFError(f"{self.path}: tensor {t.name!r} is cut short; the file is "
                                "truncated or corrupted, download or convert it again")
        typed = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8,
                 Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64}
        if t.tensor_type in typed:
            return raw.view(typed[t.tensor_type]).reshape(t.shape)
        return raw.reshape(quant_shape_to_byte_shape(t.shape, t.tensor_type))


# The last file opened, keyed by (path, size, mtime): `load_model` and `load_tokenizer` on
# the same file parse its header once (gguf's reader takes seconds on a 150k-token vocab).
_LAST: dict[tuple, GGUFFile] = {}


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and check a GGUF file's header; raise GGUFError with a fix for a bad one."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise GGUFError(f"{p}: no such GGUF file") from None
    if not p.is_file():
        raise GGUFError(f"{p}: is not a file; pass a .gguf model file")
    ident = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if ident not in _LAST:
        g = _open(p)
        _LAST.clear()
        _LAST[ident] = g
    return _LAST[ident]


def _open(p: Path) -> GGUFFile:
    from gguf import GGUFReader

    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise GGUFError(f"{p}: cannot be read ({e.strerror or e})") from None
    if head != MAGIC:
        raise GGUFError(f"{p}: not a GGUF file (starts with {head!r}, expected {MAGIC!r}); pass a "
                        ".gguf model file or an HF checkpoint folder")
    try:
        reader = GGUFReader(p, "r")
    except ValueError as e:
        text = str(e)
        if "GGMLQuantizationType" in text:  # an enum value the gguf package does not know
            raise GGUFError(f"{p}: a tensor has an unknown GGML type ({text}); the file needs a "
                            "newer gguf package, or re-quantize it to a common type (Q8_0, Q4_K_M)") from None
        raise GGUFError(f"{p}: not a readable GGUF file ({text}); it is truncated or corrupted, "
                        "download or convert it again") from None
    except (IndexError, OSError, OverflowError, KeyError, UnicodeDecodeError, MemoryError) as e:
        raise GGUFError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e}); it is truncated "
                        "or corrupted, download or convert it again") from None
    return GGUFFile(p, reader)
