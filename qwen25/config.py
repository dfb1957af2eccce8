"""Model configuration: one frozen dataclass for dense Qwen2.5, its MoE variant, and Llama.

Llama (`LlamaForCausalLM`, e.g. SmolLM2) is the same decoder without the q/k/v biases;
`qkv_bias=False` describes it and is written back as a `model_type: llama` config.

Field names follow the Hugging Face `config.json` of the released checkpoints so that
`from_hf` / `to_hf` are a rename-free round trip. Two on-disk styles exist and both are
read: the released Qwen2.5 folders (top-level `rope_theta`, `rope_scaling` with `"type"`,
`torch_dtype`) and what transformers 5 writes (`rope_parameters`, `dtype`). We always write
the released style, which every consumer (older transformers, vLLM, llama.cpp) reads.

Shapes of the presets: Qwen2.5 report Table 1 and the released configs (spec §1.2);
MoE presets: Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B (spec §1.6).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen25.context_config import ROPE_SCALING_TYPES, DCAConfig, RopeScaling  # noqa: F401  (re-exported)
from qwen25.errors import ConfigError, UserError
from qwen25.fields import check_fields, check_value


# --------------------------------------------------------------------------------------
# ModelConfig
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Qwen2 / Qwen2-MoE decoder (HF field names)."""

    hidden_size: int
    intermediate_size: int  # dense SwiGLU width (also MoE models' non-sparse layers)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # GQA: each KV head serves heads/kv_heads query heads
    vocab_size: int = 151936  # embedding rows (padded past the 151,665 real tokens)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0  # RoPE base (ABF raises it 1e4 -> 1e6)
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6  # read per checkpoint: 1e-5 for 14B/32B/72B Base
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    qkv_bias: bool = True  # biases on q/k/v (Qwen2: yes; Llama: no -> model_type "llama")
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151643
    pad_token_id: int | None = None
    # --- mixture of experts (num_experts == 0 means dense) ---
    num_experts: int = 0  # routed experts per MoE layer
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # width of one fine-grained routed expert
    shared_expert_intermediate_size: int = 0  # always-on shared expert(s), fused; 0 -> none
    norm_topk_prob: bool = False  # renormalise the top-k router weights to sum to 1
    decoder_sparse_step: int = 1  # layer i is MoE iff (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in training
    router_z_loss_coef: float = 0.0  # weight of the ST-MoE router z-loss in training (0: off; ST-MoE uses 1e-3)
    router_aux_loss_per_layer: bool = False  # balance each layer (Switch); False: pooled as transformers (see moe.py)
    # --- long context at inference ---
    dual_chunk_attention: DCAConfig | None = None
    torch_dtype: str = "bfloat16"  # dtype the weights are stored in

    def __post_init__(self) -> None:
        check_fields(self, "", ConfigError)  # types first: the checks below assume them
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; change one of them or set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self._validate()

    def _validate(self) -> None:
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim",
                    "max_position_embeddings")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name}={v!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (GQA needs whole groups)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta={self.rope_theta} must be positive")
        if not 0 < self.rms_norm_eps < 1:
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps} must be in (0, 1)")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"attention_dropout={self.attention_dropout} must be in [0, 1)")
        for name in ("initializer_range", "router_aux_loss_coef", "num_experts_per_tok",
                     "moe_intermediate_size", "shared_expert_intermediate_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, tuple) else (() if v is None else (v,))
            if any(i < 0 for i in ids):
                raise ConfigError(f"{name}={list(v) if isinstance(v, tuple) else v} must be >= 0 "
                                  "(a token id)")
        if self.num_experts < 0:
            raise ConfigError(f"num_experts={self.num_experts} must be >= 0")
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"qkv_bias={self.qkv_bias!r} must be true or false")
        if self.num_experts and not self.qkv_bias:
            raise ConfigError("qkv_bias=false with num_experts > 0 has no checkpoint layout "
                              "(Qwen2-MoE has q/k/v biases); set qkv_bias to true")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                    f"[1, num_experts={self.num_experts}]"
                )
            if self.moe_intermediate_size <= 0:
                raise ConfigError("moe_intermediate_size must be > 0 when num_experts > 0")
            if self.decoder_sparse_step <= 0:
                raise ConfigError("decoder_sparse_step must be >= 1")
            if self.shared_expert_intermediate_size < 0:
                raise ConfigError("shared_expert_intermediate_size must be >= 0")
            if not (self.router_aux_loss_coef >= 0 and self.router_z_loss_coef >= 0):
                raise ConfigError("router_aux_loss_coef and router_z_loss_coef must be >= 0")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ConfigError(f"mlp_only_layers {bad} are outside 0..{self.num_hidden_layers - 1}")

    # ---- derived ---------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def model_type(self) -> str:
        if self.is_moe:
            return "qwen2_moe"
        return "qwen2" if self.qkv_bias else "llama"

    @property
    def architecture(self) -> str:
        return {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "llama": "LlamaForCausalLM"}[self.model_type]

    def is_moe_layer(self, i: int) -> bool:
        """HF rule: sparse iff not MLP-only, experts exist, and (i+1) % step == 0."""
        return (self.is_moe and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return e if isinstance(e, tuple) else (e,)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}")
        if "hidden_size" in changes or "num_attention_heads" in changes:
            changes.setdefault("head_dim", None)
        return dataclasses.replace(self, **changes)

    # ---- presets ---------------------------------------------------------------------

    @staticmethod
    def preset(name: str) -> ModelConfig:
        """A named shape: "0.5B" .. "72B", "moe-a2.7b", "moe-57b-a14b", or a debug size."""
        try:
            return PRESETS[name]()
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None

    # ---- HF config.json --------------------------------------------------------------

    @classmethod
    def from_hf(cls, source: dict[str, Any] | str | Path) -> ModelConfig:
        """Build from a parsed `config.json`, a path to one, or a checkpoint folder."""
        if not isinstance(source, dict):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            try:
                source = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{path}: not found; a checkpoint folder needs a config.json") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            except OSError as e:  # a directory, a symlink loop, no permission
                raise ConfigError(f"{path}: cannot be read ({e.strerror or e}); it must be a "
                                  "JSON file") from None
            if not isinstance(source, dict):
                raise ConfigError(f"{path}: expected a JSON object")
        return _config_from_hf_dict(source)

    def to_hf(self) -> dict[str, Any]:
        """The released-checkpoint style `config.json` dict."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": self.attention_dropout,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            # Sliding window is off in every Qwen2.5 checkpoint; these keep readers happy.
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "use_cache": True,
            "torch_dtype": self.torch_dtype,
        }
        if self.pad_token_id is not None:
            d["pad_token_id"] = self.pad_token_id
        if self.model_type == "llama":
            # LlamaConfig spells the biases attention_bias (q/k/v and o) and mlp_bias; it has
            # no sliding-window keys.
            for k in ("use_sliding_window", "sliding_window", "max_window_layers"):
                del d[k]
            d.update(attention_bias=False, mlp_bias=False, head_dim=self.head_dim)
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        if self.is_moe:
            d.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                router_aux_loss_coef=self.router_aux_loss_coef,
                output_router_logits=False,
                qkv_bias=True,
            )
            if self.router_z_loss_coef:  # a training setting; released configs never carry it
                d["router_z_loss_coef"] = self.router_z_loss_coef
            if self.router_aux_loss_per_layer:  # likewise
                d["router_aux_loss_per_layer"] = True
        if self.dual_chunk_attention is not None:
            d["dual_chunk_attention_config"] = self.dual_chunk_attention.to_hf()
        return d


# Keys every HF PretrainedConfig may carry that say nothing about the network itself. They
# are accepted and not stored: a checkpoint written by any transformers version must load.
_HF_BOOKKEEPING = frozenset({
    "architectures", "model_type", "transformers_version", "use_cache", "torch_dtype", "dtype",
    "hidden_act", "_name_or_path", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "use_bfloat16", "tie_encoder_decoder", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "chunk_size_feed_forward", "pruned_heads", "problem_type",
    "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "cross_attention_hidden_size", "tf_legacy_loss",
    "output_router_logits", "layer_types", "rope_parameters", "rope_scaling",
    "rope_theta", "dual_chunk_attention_config", "auto_map", "_attn_implementation_autoset",
    "use_mrope", "sliding_window", "max_window_layers", "use_sliding_window",
})


# Bookkeeping keys whose value decides how the rest is read: their types are checked too.
_STEERING_KEYS: dict[str, Any] = {
    "model_type": str, "hidden_act": str, "qkv_bias": bool, "attention_bias": bool, "mlp_bias": bool,
    "use_sliding_window": bool,
    "layer_types": tuple[str, ...] | None, "rope_scaling": dict | None,
    "rope_parameters": dict | None, "dual_chunk_attention_config": dict | None,
    "rope_theta": float | None, "torch_dtype": str | None, "dtype": str | None,
}


# LlamaConfig's defaults where they differ from ModelConfig's (Qwen2.5's): a Llama
# config.json that omits a key means these.
_LLAMA_DEFAULTS = {"vocab_size": 32000, "max_position_embeddings": 2048, "rope_theta": 10_000.0,
                   "bos_token_id": 1, "eos_token_id": 2}


def _llama_fields(d: dict[str, Any]) -> None:
    """Turn a LlamaForCausalLM config into ModelConfig terms, in place (errors name the
    field that has no equivalent here)."""
    if d.pop("attention_bias", False) is not False:
        raise ConfigError("attention_bias=true (biases on q/k/v and o_proj) is not supported; "
                          "only Llama checkpoints without attention biases load")
    if d.pop("mlp_bias", False) is not False:
        raise ConfigError("mlp_bias=true is not supported; only Llama checkpoints without MLP "
                          "biases load")
    d.pop("pretraining_tp", None)  # a matmul split of Meta's training; the math is unchanged
    for k, v in _LLAMA_DEFAULTS.items():
        d.setdefault(k, v)
    d["qkv_bias"] = False


def _config_from_hf_dict(src: dict[str, Any]) -> ModelConfig:
    d = dict(src)
    model_type = d.get("model_type")
    if model_type not in ("qwen2", "qwen2_moe", "llama"):
        raise ConfigError(
            f"model_type={model_type!r} is not supported; this package loads Qwen2/Qwen2.5 "
            "and Llama checkpoints (model_type 'qwen2', 'qwen2_moe' or 'llama')"
        )
    # Keys that steer the reading below are checked before they are used.
    for key, tp in _STEERING_KEYS.items():
        if key in d:
            check_value(d[key], tp, key, ConfigError)
    if model_type == "llama":
        _llama_fields(d)
    elif "qkv_bias" in d:
        if d["qkv_bias"] is not True:
            raise ConfigError("qkv_bias=false is not supported; Qwen2 has biases on q/k/v")
        del d["qkv_bias"]
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported; Qwen2 uses 'silu'")
    if d.get("quantization_config") is not None:
        raise ConfigError(
            "this checkpoint is quantized (quantization_config); load the bf16/fp32 weights "
            "and quantize with `qwen25 quantize`"
        )
    d.pop("quantization_config", None)
    if d.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported (no released Qwen2.5 "
                          "checkpoint uses it); set use_sliding_window to false")
    layer_types = d.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ConfigError("layer_types other than 'full_attention' (sliding windows) are not supported")

    # RoPE: released style keeps rope_theta + rope_scaling at top level; transformers 5
    # nests both in rope_parameters.
    rope_theta = d.get("rope_theta")
    scaling = d.get("rope_scaling")
    params = d.get("rope_parameters")
    if isinstance(params, dict):
        rope_theta = params.get("rope_theta", rope_theta)
        if params.get("rope_type", "default") != "default":
            scaling = params
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) == "default":
        scaling = None

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs: dict[str, Any] = {}
    unknown = []
    for k, v in d.items():
        if k in fields and k not in ("rope_scaling", "dual_chunk_attention", "rope_theta"):
            kwargs[k] = v
        elif k not in _HF_BOOKKEEPING:
            unknown.append(k)
    if unknown:
        raise ConfigError(
            f"unknown config.json field(s) {sorted(unknown)}: this package does not know what "
            "they change; remove them if they are inert"
        )
    if rope_theta is not None:
        kwargs["rope_theta"] = rope_theta  # type-checked with the other fields
    if scaling is not None and scaling != {}:
        kwargs["rope_scaling"] = RopeScaling.from_hf(
            scaling, "rope_parameters" if scaling is params else "rope_scaling")
    dca = d.get("dual_chunk_attention_config")
    if dca is not None and dca != {}:
        kwargs["dual_chunk_attention"] = DCAConfig.from_hf(dca)
    dtype = d.get("torch_dtype") or d.get("dtype")
    if dtype:
        kwargs["torch_dtype"] = check_value(dtype, str, "torch_dtype", ConfigError).removeprefix("torch.")
    if model_type in ("qwen2", "llama"):
        for k in ("num_experts", "num_experts_per_tok"):
            if kwargs.get(k):
                raise ConfigError(f"{k} is set but model_type is {model_type!r}; use 'qwen2_moe'")
    elif not kwargs.get("num_experts"):
        raise ConfigError("model_type 'qwen2_moe' needs num_experts > 0")
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads")
    if kwargs.get("mlp_only_layers") is None:
        kwargs.pop("mlp_only_layers", None)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in kwargs]
    if missing:
        raise ConfigError(f"config.json lacks required field(s) {missing}")
    try:
        return ModelConfig(**kwargs)
    except TypeError as e:  # a field of the wrong JSON type
        raise ConfigError(f"config.json: {e}") from None


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------


def _dense(h: int, i: int, layers: int, heads: int, kv: int, *, tie: bool, vocab: int) -> ModelConfig:
    return ModelConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       tie_word_embeddings=tie, max_position_embeddings=32768,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6)


PRESETS = {
    # Qwen2.5 dense (report Table 1; spec §1.2)
    "0.5B": lambda: _dense(896, 4864, 24, 14, 2, tie=True, vocab=151936),
    "1.5B": lambda: _dense(1536, 8960, 28, 12, 2, tie=True, vocab=151936),
    "3B": lambda: _dense(2048, 11008, 36, 16, 2, tie=True, vocab=151936),
    "7B": lambda: _dense(3584, 18944, 28, 28, 4, tie=False, vocab=152064),
    "14B": lambda: _dense(5120, 13824, 48, 40, 8, tie=False, vocab=152064),
    "32B": lambda: _dense(5120, 27648, 64, 40, 8, tie=False, vocab=152064),
    "72B": lambda: _dense(8192, 29568, 80, 64, 8, tie=False, vocab=152064),
    # MoE shaped like the open Qwen MoE models (spec §1.6): fine-grained + shared experts
    "moe-a2.7b": lambda: ModelConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=151936, num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632),
    "moe-57b-a14b": lambda: ModelConfig(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=151936, num_experts=64, num_experts_per_tok=8,
        moe_intermediate_size=2560, shared_expert_intermediate_size=20480),
    # Debug sizes: same structure, seconds on a CPU. Vocab fits the real tokenizer.
    "tiny": lambda: ModelConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=10_000.0),
    "tiny-moe": lambda: ModelConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False, rope_theta=10_000.0,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64),
    "small": lambda: ModelConfig(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=10_000.0),
}


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the shapes alone (spec §1.3): total, non-embedding, active.

    `active` counts the parameters one token touches: for MoE only top-k routed experts.
    Embedding rows are excluded from non-embedding; a tied lm_head is not counted twice.
    """
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    bias = (q + 2 * kv) if cfg.qkv_bias else 0
    attn = h * q + 2 * h * kv + bias + q * h
    norms = 2 * h
    total = active = 0
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            expert = 3 * h * cfg.moe_intermediate_size
            shared = 3 * h * cfg.shared_expert_intermediate_size
            shared_gate = h if cfg.shared_expert_intermediate_size else 0
            router = h * cfg.num_experts
            total += attn + norms + router + cfg.num_experts * expert + shared + shared_gate
            active += attn + norms + router + cfg.num_experts_per_tok * expert + shared + shared_gate
        else:
            mlp = 3 * h * cfg.intermediate_size
            total += attn + norms + mlp
            active += attn + norms + mlp
    body_total = total + h  # final norm
    body_active = active + h
    emb = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return {
        "total": body_total + emb,
        "non_embedding": body_total,
        "active": body_active + emb,
        "active_non_embedding": body_active,
    }
