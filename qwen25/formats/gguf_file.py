"""Opening a GGUF file through the `gguf` package, with one-line errors for bad files.

`open_gguf(path)` returns a `GGUFFile`: the reader (tensors memory-mapped, nothing read yet)
plus typed metadata access. Every way a file can be unreadable (missing, wrong magic,
truncated, an unknown tensor type, a tensor past the end of the file) becomes a `GGUFError`
naming the file, the problem and the fix; a traceback from the reader never reaches the user.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwen25.errors import UserError
from qwen25.formats import gguf_names as names

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


class GGUFFile:
    """Metadata and tensor records of one GGUF file (tensor data stays memory-mapped)."""

    def __init__(self, path: Path, reader: Any):
        self.path = path
        self.reader = reader
        self.architecture = self.get(names.ARCHITECTURE)
        if not isinstance(self.architecture, str):
            raise GGUFError(f"{path}: no general.architecture in the metadata; this is not a "
                            "model file (or it was written by a tool that omits the key)")

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (str, int, float, bool or a list), or `default`."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise GGUFError(f"{self.path}: metadata {key!r} cannot be decoded ({e}); the file "
                            "is corrupted") from None

    def arch_get(self, template: str, default: Any = None) -> Any:
        """`get` of an architecture key template such as "{arch}.block_count"."""
        return self.get(names.key(template, self.architecture), default)

    @property
    def tensors(self) -> dict[str, Any]:
        """name -> gguf ReaderTensor (`.tensor_type`, `.data` memory-mapped, `.shape`)."""
        return {t.name: t for t in self.reader.tensors}


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and check a GGUF file's header; raise GGUFError with a fix for a bad one."""
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"{p}: no such GGUF file")
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
