"""Import direction of the tokenizer (layer 1) and chat (layer 2) packages, and import cost."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import qwen25

ROOT = Path(qwen25.__file__).parent
ALLOWED = {  # qwen25 modules each package may import at module level (design.md layers)
    # the GGUF name tables and file opener are stdlib/gguf leaves (layer 0) the GGUF tokenizer reads
    "tokenizer": ("qwen25.errors", "qwen25.config", "qwen25.files", "qwen25.tokenizer", "qwen25.formats.gguf_names",
                  "qwen25.formats.gguf_file"),
    "chat": ("qwen25.errors", "qwen25.config", "qwen25.files", "qwen25.tokenizer", "qwen25.chat"),
}


def module_level_imports(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_layers():
    for package, allowed in ALLOWED.items():
        for path in (ROOT / package).glob("*.py"):
            for name in module_level_imports(path):
                if name.startswith("qwen25"):
                    assert name.startswith(allowed), f"{path.name} imports {name}"


def test_import_is_cheap():
    # No engine, Jinja or torch at import time: the CLI and servers import these freely.
    code = ("import sys, qwen25.tokenizer, qwen25.chat; "
            "print(sorted(m for m in ('tiktoken', 'tokenizers', 'jinja2', 'torch', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent)
    assert out.stdout.strip() == "[]"
