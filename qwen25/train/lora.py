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
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qwen25.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names
_BASE = ".base_layer"


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
    state = {k.removeprefix(_PREFIX): v for k, v in tensors.items()}
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{path} does not fit this model's adapters ({result.unexpected_keys[:2]}); "
                        "use the same --lora-rank and --lora-targets as the run that wrote it")


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
