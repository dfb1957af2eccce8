"""LoRA on our model through `peft`, saved as a PEFT adapter that transformers + peft load.

`add_lora(model, ...)` injects peft's LoRA layers into the unmodified `Transformer` in place
(`peft.inject_adapter_in_model`; the base weights are frozen, only lora_A / lora_B train):
the model is still called and parallelised as before. Module names equal the HF
checkpoint's (`model.layers.0.self_attn.q_proj`), so the adapter's keys are exactly what
`PeftModel.from_pretrained(Qwen2ForCausalLM, folder)` expects:

    adapter_config.json          peft's LoraConfig (r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight / lora_B.weight

A training checkpoint of a LoRA run stores the frozen base weights under their plain names
(`base_state`: it loads like any checkpoint) and the adapter files beside them, so resuming
is: load the base from the checkpoint, `add_lora`, `load_adapter`. `merged_state` folds
W + (alpha / r) B A into the base weights for a merged HF folder (`--merge`).

The stages that offer LoRA (SFT, DPO, the reward model, GRPO) share what lies around that:
`check_options` (the `lora_*` config fields), `apply` (inject, and on resume reload),
`checkpoint_weights` / `split_checkpoint` (what a checkpoint stores), `merged_model` /
`save_merged` (the merged model at the end) and `export` (OUT/adapter, OUT/final with
`merge`). An RL stage also needs the base policy (`adapters_disabled`: the reference,
without a second copy) and a plain model holding the merged weights for the engine
(`MergedView`). A classifier's head trains in full beside the
adapters (`save_head_in_full`: peft's `modules_to_save`); its tensor goes into the adapter
file so `PeftModel.from_pretrained` on a sequence classifier restores it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qwen25.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names
_BASE = ".base_layer"
STAGING = ".adapter-staging"  # OUT/<this>: the adapter files a checkpoint copies in
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_options(cfg) -> None:
    """The LoRA fields of a stage config (`lora_rank`, `lora_alpha`, `lora_dropout`,
    `lora_targets`, and `merge` where the stage has it): one `UserError` naming the fix."""
    rank = cfg.lora_rank
    # A float rank from Python (2.0) would reach peft and fail deep inside it; say so here.
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise UserError(f"lora_rank={rank!r} must be a whole number >= 0 (0: no LoRA), e.g. --lora-rank 16")
    if getattr(cfg, "merge", False) and not rank:
        raise UserError("--merge needs LoRA (--lora-rank R)")
    if not rank:
        return
    if not cfg.lora_alpha > 0:
        raise UserError(f"lora_alpha={cfg.lora_alpha!r} must be > 0 (updates are scaled by alpha / rank)")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"lora_dropout={cfg.lora_dropout!r} must be in [0, 1)")
    bad = [t for t in cfg.lora_targets if t not in LORA_TARGETS]
    if bad or not cfg.lora_targets:
        raise UserError(f"lora_targets {bad or '(none)'} are not linear layers of the model; use some of "
                        f"{', '.join(LORA_TARGETS)}")


def lora_config(rank: int, alpha: float, dropout: float, targets: Sequence[str], base: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      bias="none", base_model_name_or_path=base)


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0, base: str | None = None) -> nn.Module:
    """Inject LoRA adapters (A: peft's Kaiming init from a private seed, B: zeros) in place."""
    from peft import inject_adapter_in_model

    cfg = lora_config(rank, alpha, dropout, targets, base)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the run's RNG alone
        torch.manual_seed(seed)
        inject_adapter_in_model(cfg, model)
    model.peft_config = {"default": cfg}
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def apply(model: nn.Module, cfg, *, base: str | Path, resume: str | Path | None = None) -> nn.Module:
    """`add_lora` with a stage config's settings (seeded by `cfg.seed`, so a fresh run's
    adapter init is reproducible); `resume`: a checkpoint whose adapter weights to load."""
    add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed,
             base=str(Path(base).resolve()))
    if resume is not None:
        load_adapter(model, resume)
    return model


def save_head_in_full(model: nn.Module, name: str = "score") -> None:
    """Record in the adapter config that the sibling module `name` (a sequence classifier's
    head, outside `model`) trains in full and is saved in the adapter file, as peft's
    `modules_to_save` with task SEQ_CLS does. The caller keeps that module trainable;
    nothing is injected for it (it is not inside `model`)."""
    import dataclasses

    cfg = model.peft_config["default"]
    model.peft_config = {"default": dataclasses.replace(cfg, task_type="SEQ_CLS", modules_to_save=[name])}


def head_key(name: str = "score") -> str:
    """The adapter-file key of a module saved in full (`save_head_in_full`)."""
    return f"{_PREFIX}{name}.weight"


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys (full tensors on the CPU)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name="default")
    return {_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.peft_config["default"].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["peft_type"] = "LORA"
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
    save_file(state if state is not None else adapter_state(model), str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    return folder


def load_adapter(model: nn.Module, folder: str | Path) -> None:
    """Load adapter weights written by `save_adapter` into a model with the same adapters."""
    from peft import set_peft_model_state_dict

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.exists():
        raise UserError(f"{path} not found: the checkpoint holds no LoRA adapter; resume a LoRA run "
                        "with the options that started it, or start a new run in another --out")
    tensors = load_file(str(path))
    # Modules saved in full (a classifier head) are not inside `model`: the caller loads them.
    full = tuple(f"{m}." for m in _saved_in_full(Path(folder)))
    state = {k.removeprefix(_PREFIX): v for k, v in tensors.items() if not k.removeprefix(_PREFIX).startswith(full)}
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{path} does not fit this model's adapters ({result.unexpected_keys[:2]}); "
                        "use the same --lora-rank and --lora-targets as the run that wrote it")


def _saved_in_full(folder: Path) -> list[str]:
    try:
        return list(json.loads((folder / ADAPTER_CONFIG).read_text()).get("modules_to_save") or [])
    except (OSError, ValueError):
        return []


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict -> the base model's (adapters dropped, plain names)."""
    return {k.replace(_BASE, ""): v for k, v in state.items() if ".lora_" not in k}


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights with every adapter folded in: W + scaling x B @ A (float32 on the CPU)."""
    from peft.tuners.lora import LoraLayer

    state = {k: v.detach().cpu().clone() for k, v in base_state(model.state_dict()).items()}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().cpu().float()
            b = module.lora_B["default"].weight.detach().cpu().float()
            key = f"{name}.weight"
            w = state[key]
            state[key] = (w.float() + module.scaling["default"] * (b @ a)).to(w.dtype)
    return state


def copy_adapter(src: str | Path, dest: str | Path) -> Path:
    """Copy an adapter folder's two files (e.g. from the last checkpoint to OUT/adapter)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copyfile(Path(src) / name, dest / name)
    return dest


# --------------------------------------------------------------------------------------
# What the LoRA stages share: checkpoints and the merged model
# --------------------------------------------------------------------------------------


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a LoRA model's full state dict under PEFT's file keys."""
    return {_PREFIX + k.replace(".default", ""): v for k, v in state.items() if ".lora_" in k}


def split_checkpoint(state: dict[str, torch.Tensor], model: nn.Module, staging: Path, write: bool,
                     heads: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """A LoRA model's full state -> (the frozen base under plain names, the adapter files).

    The adapter (plus `heads`, file key -> tensor, for modules saved in full) is written to
    `staging` when `write` (the main rank); the checkpoint copies the files beside the base
    weights, so the checkpoint loads as a plain model and resumes as a LoRA one."""
    if write:
        save_adapter(model, staging, adapter_tensors(state) | (heads or {}))
    return base_state(state), [staging / ADAPTER_CONFIG, staging / ADAPTER_WEIGHTS]


def checkpoint_weights(model: nn.Module, inner: nn.Module, out: Path, is_main: bool,
                       extra: list[Path]) -> tuple[dict[str, torch.Tensor], object, list[Path]]:
    """`Run.checkpoint_weights` of a LoRA language model: (base state, config, files).
    model: the module the run calls (maybe wrapped or sharded); inner: the LoRA model."""
    from qwen25.train import parallel

    base, files = split_checkpoint(parallel.full_model_state(model), inner, Path(out) / STAGING, is_main)
    return base, inner.config, [*extra, *files]


def merged_model(ckpt: str | Path, cfg, config=None):
    """The model of a LoRA checkpoint with its adapter folded into the weights (float32).
    config: the ModelConfig to give it (default: the checkpoint's)."""
    from qwen25.checkpoint import load_model
    from qwen25.model.model import build_model

    base = load_model(ckpt, dtype=torch.float32)
    if config is not None:
        base.config = config
    add_lora(base, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    load_adapter(base, ckpt)
    merged = build_model(base.config, init=False)
    merged.load_state_dict(merged_state(base), strict=False)  # strict=False: the tied lm_head is absent
    merged.tie_weights()
    merged.generation_config = base.generation_config
    return merged


def save_merged(ckpt: str | Path, dest: str | Path, cfg, config=None, generation_config: dict | None = None,
                extra_files: Sequence[Path] = ()) -> Path:
    """Write `merged_model(ckpt)` to `dest` as an HF folder, with `extra_files` (tokenizer)."""
    from qwen25.checkpoint import save_model

    model = merged_model(ckpt, cfg, config)
    folder = save_model(model, dest, generation_config=generation_config or model.generation_config)
    for f in extra_files:
        if Path(f).exists():
            shutil.copyfile(f, folder / Path(f).name)
    return folder


def export(ckpt: str | Path, out: str | Path, cfg, config=None, generation_config: dict | None = None,
           extra_files: Sequence[Path] = ()) -> Path:
    """The end of a LoRA run (SFT, DPO, GRPO): the checkpoint's adapter to OUT/adapter (a PEFT
    folder for the base model) and, with `cfg.merge`, the merged model to OUT/final (see
    `save_merged`). Returns the folder to use: OUT/final when merged, else OUT/adapter."""
    adapter = copy_adapter(ckpt, Path(out) / "adapter")
    if not cfg.merge:
        return adapter
    return save_merged(ckpt, Path(out) / "final", cfg, config=config, generation_config=generation_config,
                       extra_files=extra_files)


# --------------------------------------------------------------------------------------
# Using the adapted model: without its adapters, and as a plain model for the engine
# --------------------------------------------------------------------------------------


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model` as its base while inside (peft's `disable_adapter` for injected layers): the
    reference policy of an RL stage without a second copy of the weights. The adapted
    layers compute `base_layer(x)` exactly, so the logits equal the unadapted model's."""
    layers = [m for _, m in _lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)  # peft makes the active adapter trainable again


class MergedView:
    """A plain `Transformer` whose adapted matrices hold W + (alpha / r) B A of a LoRA model,
    and that shares every other tensor with it (embeddings, norms, biases, the head).

    For an engine that must sample from the adapted policy (GRPO rollouts). Why not the
    LoRA model itself: the engine's C++ decoder reads plain `nn.Linear` weights, so peft's
    layers would send every decode step to the slower PyTorch path, with two extra small
    matmuls per adapted layer. Why not merging into the base and unmerging after: W + ΔW
    − ΔW is not W in floating point, so the frozen base would drift a little every
    rollout. The cost of the view is one copy of the adapted matrices; `refresh()` (one
    B @ A per matrix, written in place so the engine's pointers stay valid) must be called
    after the adapters change and before the engine runs. Its logits equal the LoRA
    model's to float rounding (x (W + s B A)^T vs x W^T + s (x A^T) B^T)."""

    def __init__(self, model: nn.Module):
        from qwen25.model.model import Transformer

        with torch.device("meta"):
            view = Transformer(model.config)
        source = dict(model.named_parameters(remove_duplicate=False))
        layers = dict(_lora_layers(model))
        self._merged: list[tuple[torch.Tensor, nn.Module]] = []
        for name, module in list(view.named_modules()):
            for pname, _ in list(module.named_parameters(recurse=False)):
                if name in layers and pname == "weight":
                    base = layers[name].base_layer.weight
                    own = nn.Parameter(torch.empty_like(base, device=base.device), requires_grad=False)
                    self._merged.append((own, layers[name]))
                    setattr(module, pname, own)
                else:  # shared: the same Parameter object (a tied head stays tied)
                    key = f"{name}.{pname}" if name not in layers else f"{name}{_BASE}.{pname}"
                    setattr(module, pname, source[key])
        view.inv_freq, view.attention_scaling = model.inv_freq, model.attention_scaling
        view.generation_config = getattr(model, "generation_config", None)
        self.model = view.eval()
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-merge the adapters' current values (after an optimizer step)."""
        for own, layer in self._merged:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            torch.addmm(layer.base_layer.weight, b, a, alpha=layer.scaling["default"], out=own.data)
