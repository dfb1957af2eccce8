"""The long-context fields of a model config: RoPE scaling (YaRN, dynamic NTK, linear) and
dual chunk attention, as the Hugging Face `rope_scaling` and `dual_chunk_attention_config`
entries of the released Qwen2.5 configs spell them (spec §4). `qwen25.config.ModelConfig`
holds one of each (or None)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qwen25.errors import ConfigError
from qwen25.fields import check_fields, check_value

ROPE_SCALING_TYPES = ("yarn", "dynamic", "linear")


@dataclass(frozen=True)
class RopeScaling:
    """Context extension of RoPE (HF `rope_scaling`). YaRN is what Qwen2.5 ships."""

    type: str  # "yarn" | "dynamic" (NTK) | "linear"
    factor: float  # s: how many times the original context is stretched
    original_max_position_embeddings: int | None = None  # L: the trained context
    beta_fast: float = 32.0  # YaRN ramp bounds, in rotations over L (paper's beta)
    beta_slow: float = 1.0  # (paper's alpha)
    attention_factor: float | None = None  # YaRN mscale; None -> 0.1 ln(s) + 1
    mscale: float | None = None  # DeepSeek-style mscale variants (accepted, HF semantics)
    mscale_all_dim: float | None = None
    truncate: bool = True  # HF: floor/ceil the correction range

    def __post_init__(self) -> None:
        check_fields(self, "rope_scaling.", ConfigError)
        if self.type not in ROPE_SCALING_TYPES:
            raise ConfigError(
                f"rope_scaling.type={self.type!r} is not supported; use one of "
                f"{', '.join(ROPE_SCALING_TYPES)}"
            )
        if not (self.factor >= 1.0):
            raise ConfigError(f"rope_scaling.factor={self.factor} must be >= 1.0")
        if self.type == "yarn" and self.beta_fast <= self.beta_slow:
            raise ConfigError("rope_scaling.beta_fast must be greater than rope_scaling.beta_slow")
        for name in ("original_max_position_embeddings", "attention_factor", "mscale", "mscale_all_dim"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"rope_scaling.{name}={v} must be > 0 (or left out)")

    @classmethod
    def from_hf(cls, d: dict[str, Any], name: str = "rope_scaling") -> RopeScaling:
        check_value(d, dict, name, ConfigError)
        d = dict(d)
        kind = d.pop("rope_type", None) or d.pop("type", None)
        d.pop("type", None)
        d.pop("rope_theta", None)  # transformers 5 keeps the base inside rope_parameters
        if kind is None:
            raise ConfigError("rope_scaling needs a 'type' (or 'rope_type'), e.g. \"yarn\"")
        if kind not in ROPE_SCALING_TYPES:  # before the fields: name the type, not its extras
            raise ConfigError(f"rope_scaling.type={kind!r} is not supported; use one of "
                              f"{', '.join(ROPE_SCALING_TYPES)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"type"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown rope_scaling field(s) {unknown}; known: {sorted(known)}")
        if "factor" not in d:
            raise ConfigError("rope_scaling needs a 'factor', e.g. 4.0")
        return cls(type=kind, **d)

    def to_hf(self) -> dict[str, Any]:
        # Both spellings of the type: older readers look for "type", newer for "rope_type".
        out: dict[str, Any] = {"type": self.type, "rope_type": self.type}
        defaults = RopeScaling(type=self.type, factor=self.factor)
        for f in dataclasses.fields(self)[1:]:
            v = getattr(self, f.name)
            if f.name == "factor" or (v is not None and v != getattr(defaults, f.name)):
                out[f.name] = v
        return out

    @classmethod
    def parse(cls, spec: str, original_max_position_embeddings: int) -> RopeScaling:
        """Parse a CLI override like `yarn:4` (type:factor)."""
        kind, _, factor = spec.partition(":")
        try:
            s = float(factor) if factor else 4.0
        except ValueError:
            raise ConfigError(f"--rope-scaling {spec!r}: expected TYPE:FACTOR such as yarn:4") from None
        return cls(type=kind, factor=s, original_max_position_embeddings=original_max_position_embeddings)


@dataclass(frozen=True)
class DCAConfig:
    """Dual chunk attention (HF/vLLM `dual_chunk_attention_config`)."""

    chunk_size: int  # c: longest relative distance the model was trained on
    local_size: int  # w: local window; each chunk holds c - w tokens
    original_max_position_embeddings: int | None = None  # enables the length-dependent mscale

    def __post_init__(self) -> None:
        check_fields(self, "dual_chunk_attention_config.", ConfigError)
        if self.local_size <= 0 or self.chunk_size <= 0:
            raise ConfigError("dual_chunk_attention_config: chunk_size and local_size must be > 0")
        if self.chunk_size <= self.local_size:
            raise ConfigError(
                f"dual_chunk_attention_config.chunk_size={self.chunk_size} must be larger than "
                f"local_size={self.local_size} (each chunk holds chunk_size - local_size tokens)"
            )

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> DCAConfig:
        check_value(d, dict, "dual_chunk_attention_config", ConfigError)
        d = dict(d)
        # Sparse-attention keys of the 1M checkpoints configure a vLLM kernel we do not have;
        # they change speed, not the math, so they are accepted and ignored.
        for k in ("sparse_attention_config", "sparse_attention_enabled",
                  "sparse_attention_threshold", "sparse_attention_last_q"):
            d.pop(k, None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown dual_chunk_attention_config field(s) {unknown}")
        return cls(**d)

    def to_hf(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
