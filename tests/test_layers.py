"""The dependency direction of design.md, enforced by reading every import in the package.

Layers: 0 config, errors; 1 tokenizer, model; 2 chat, checkpoint, quant; 3 data, engine,
eval.tasks; 4 train, eval, serve; 5 recipes (the speedrun and demos, which chain stages);
6 cli. A module may import its own layer or lower ones;
imports inside functions count too. The model never imports the tokenizer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qwen25

ROOT = Path(qwen25.__file__).parent
LAYERS = [  # (module prefix, layer); the longest matching prefix wins
    ("qwen25.config", 0), ("qwen25.errors", 0),
    ("qwen25.tokenizer", 1), ("qwen25.model", 1),
    ("qwen25.chat", 2), ("qwen25.checkpoint", 2), ("qwen25.quant", 2),
    ("qwen25.data", 3), ("qwen25.engine", 3), ("qwen25.eval.tasks", 3),
    ("qwen25.assistant", 4),
    ("qwen25.eval.sandbox", 3),  # a leaf (stdlib only) that the code tasks' scorers call
    ("qwen25.train", 4), ("qwen25.eval", 4), ("qwen25.serve", 4),
    ("qwen25.recipes", 5),
    ("qwen25.cli", 6), ("qwen25.__main__", 6), ("qwen25", 0),
]


# Deliberate upward references, each with its reason. Keep this list short.
ALLOWED = {
    # The public API (design.md) puts apply_chat_template on the tokenizer; the template
    # lives one layer up in qwen25.chat, imported at call time by a thin wrapper.
    ("qwen25.tokenizer.core", "qwen25.chat"),
}

# Imports that the layer numbers alone would allow but the design forbids: (importer prefix,
# imported prefix, why).
FORBIDDEN = [
    ("qwen25.engine", "qwen25.chat", "the engine knows token ids; templates and tool parsing live above it"),
    ("qwen25.eval", "qwen25.train", "evaluation reads checkpoints; a recipe (qwen25.recipes) chains both"),
]

# What CLI verbs may import from qwen25.cli: the shared modules, never another verb.
CLI_SHARED = {"qwen25.cli", "qwen25.cli.args", "qwen25.cli.config_args"}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "qwen25":  # `from qwen25 import chat` imports qwen25.chat
                found |= {f"qwen25.{a.name}" for a in node.names}
    return {m for m in found if m == "qwen25" or m.startswith("qwen25.")}


def test_every_module_has_a_layer_and_imports_only_downwards():
    problems = []
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        mod = module_name(path)
        own = layer_of(mod)
        if own is None:
            problems.append(f"{mod}: no layer assigned (add it to LAYERS in this test)")
            continue
        for dep in imports(path):
            dep_layer = layer_of(dep)
            if dep_layer is not None and dep_layer > own and (mod, dep) not in ALLOWED:
                problems.append(f"{mod} (layer {own}) imports {dep} (layer {dep_layer})")
            if mod.startswith("qwen25.model") and dep.startswith("qwen25.tokenizer"):
                problems.append(f"{mod} imports the tokenizer")
            if _under(mod, "qwen25.cli") and _under(dep, "qwen25.cli") and dep not in CLI_SHARED:
                problems.append(f"{mod} imports the verb module {dep}: shared pieces go in qwen25.cli.args")
            for low, high, why in FORBIDDEN:
                if _under(mod, low) and _under(dep, high) and not _under(mod, high):
                    problems.append(f"{mod} imports {dep}: {why}")
    assert not problems, "\n".join(problems)


def test_import_qwen25_is_lazy():
    """`import qwen25` must not import torch (the CLI's --help stays instant)."""
    import subprocess
    import sys

    code = "import sys, qwen25; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
