"""Extending a model's context at inference: the overrides users give and the limit they buy.

Qwen2.5 reaches 4x its trained context without training (spec §4): YaRN stretches the RoPE
frequencies, dual chunk attention (DCA) remaps positions so no query-key distance exceeds
the chunk. Both are configuration, not weights, so a checkpoint that does not ship them can
be given them on the command line:

    --rope-scaling yarn:4            TYPE:FACTOR (yarn, linear, dynamic); "none" removes it
    --dca 32768:2048[:ORIGINAL]      CHUNK:LOCAL[:ORIGINAL]; "none" removes it

`extend_context(model, rope_scaling, dca)` validates the overrides, applies them to a loaded
model (`Transformer.set_rope`, weights untouched) and returns the context limit.
`context_limit(cfg)` gives that limit for any config, including checkpoints that ship
`rope_scaling` in their config.json; `engine_context(limit, requested, default)` is the one
check of a requested engine length against it (generate, chat, serve and eval build their
Engine with it; the Engine's `max_seq_len` is then the only length anything enforces: the
engine for prompts, the server for prompt + max_tokens). The limit:

- no extension: `max_position_embeddings`;
- RoPE scaling with factor s over a trained length L (`original_max_position_embeddings`,
  else `max_position_embeddings`): s x L (131,072 for Qwen2.5 with yarn:4);
- DCA: 4 x chunk_size, the report's 4x extrapolation (DCA keeps every distance within the
  chunk, so it has no hard limit of its own; 4x is where its quality is measured). A larger
  `max_position_embeddings` wins: the 1M checkpoints state 1,010,000 for a 262,144 chunk.
The largest rule that applies wins, and the new limit is written to
`max_position_embeddings`, so a saved config states it (the convention llama.cpp users follow,
and what keeps transformers versions that recompute the YaRN factor from max / original
correct).
"""

from __future__ import annotations

import dataclasses

from qwen25.config import ConfigError, DCAConfig, ModelConfig, RopeScaling
from qwen25.errors import UserError

DCA_EXTRAPOLATION = 4  # context limit under DCA, in chunk sizes (report §5.2.4: 4x)
_OFF = ("none", "off")


def trained_length(cfg: ModelConfig) -> int:
    """The context the weights were trained at: the scaling's original length, if stated."""
    sc = cfg.rope_scaling
    if sc is not None and sc.original_max_position_embeddings:
        return sc.original_max_position_embeddings
    return cfg.max_position_embeddings


def context_limit(cfg: ModelConfig) -> int:
    """Longest sequence (prompt + generated tokens) the config is meant to handle."""
    limit = cfg.max_position_embeddings
    if cfg.rope_scaling is not None:
        limit = max(limit, int(trained_length(cfg) * cfg.rope_scaling.factor))
    if cfg.dual_chunk_attention is not None:
        limit = max(limit, DCA_EXTRAPOLATION * cfg.dual_chunk_attention.chunk_size)
    return limit


def parse_rope_scaling(spec: str | RopeScaling, trained: int) -> RopeScaling | None:
    """`yarn:4` -> RopeScaling over the trained length; "none" -> None (no scaling)."""
    if isinstance(spec, RopeScaling):
        return spec
    if spec.strip().lower() in _OFF:
        return None
    try:
        return RopeScaling.parse(spec.strip(), trained)
    except ConfigError as e:
        raise ConfigError(f"--rope-scaling {spec!r}: {e}") from None


def parse_dca(spec: str | DCAConfig) -> DCAConfig | None:
    """`CHUNK:LOCAL[:ORIGINAL]` -> DCAConfig; "none" -> None (no dual chunk attention)."""
    if isinstance(spec, DCAConfig):
        return spec
    if spec.strip().lower() in _OFF:
        return None
    parts = spec.strip().split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3):
        raise ConfigError(f"--dca {spec!r}: expected CHUNK:LOCAL[:ORIGINAL] in tokens, e.g. "
                          "32768:2048 (chunk = the trained context, local window well below it)")
    try:
        return DCAConfig(*numbers)
    except ConfigError as e:
        raise ConfigError(f"--dca {spec!r}: {e}") from None


def extend_config(cfg: ModelConfig, rope_scaling: str | RopeScaling | None = None,
                  dca: str | DCAConfig | None = None) -> ModelConfig:
    """`cfg` with the overrides applied (None keeps what the config has; "none" removes it).

    `max_position_embeddings` becomes the new `context_limit`; a scaling that does not state
    its original length gets the trained length written in, so changing the maximum never
    moves YaRN's correction range.
    """
    trained = trained_length(cfg)
    changes: dict = {}
    if rope_scaling is not None:
        changes["rope_scaling"] = parse_rope_scaling(rope_scaling, trained)
    elif cfg.rope_scaling is not None and not cfg.rope_scaling.original_max_position_embeddings:
        changes["rope_scaling"] = dataclasses.replace(cfg.rope_scaling,
                                                      original_max_position_embeddings=trained)
    if dca is not None:
        changes["dual_chunk_attention"] = parse_dca(dca)
    if not changes:
        return cfg
    new = cfg.replace(max_position_embeddings=trained, **changes)
    sc = new.rope_scaling
    if new.dual_chunk_attention is not None and sc is not None and sc.type == "dynamic":
        raise ConfigError("rope_scaling.type='dynamic' cannot be combined with dual chunk attention "
                          "(dynamic NTK follows the absolute length, DCA's positions never pass the "
                          "chunk); use --rope-scaling yarn:FACTOR with --dca")
    return new.replace(max_position_embeddings=context_limit(new))


def extend_context(model, rope_scaling: str | RopeScaling | None = None,
                   dca: str | DCAConfig | None = None) -> int:
    """Apply the overrides to a loaded `Transformer` in place; return its context limit.

    rope_scaling: "TYPE:FACTOR" (e.g. "yarn:4"), a RopeScaling, "none", or None (keep).
    dca: "CHUNK:LOCAL[:ORIGINAL]" (e.g. "32768:2048"), a DCAConfig, "none", or None (keep).
    Raises ConfigError (a UserError) naming the flag and the field for bad values. Build an
    `Engine` after this call: the engine picks its decode path from the config it sees.
    """
    cfg = extend_config(model.config, rope_scaling, dca)
    if cfg is not model.config:
        model.set_rope(cfg)
    return context_limit(cfg)


def engine_context(limit: int, requested: int | None, default: int, flag: str = "--max-seq-len") -> int:
    """Positions (prompt + generated tokens) an Engine is built with for a model whose
    `context_limit` is `limit`: `requested` when given, else `min(default, limit)`.

    A requested length past the limit is a UserError naming `flag` and the two fixes (extend
    the context, or ask for less), whatever the extension in use: under DCA too, the limit is
    where the report measured the extrapolation.
    """
    if requested is None:
        return max(2, min(default, limit))
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 2:
        raise UserError(f"{flag} {requested!r} must be an integer of at least 2 (one prompt and one new token)")
    if requested > limit:
        raise UserError(f"{flag} {requested} is longer than the model's context of {limit} tokens; extend it "
                        f"with --rope-scaling yarn:FACTOR and/or --dca CHUNK:LOCAL, or lower {flag}")
    return requested
