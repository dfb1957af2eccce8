"""The Qwen2.5 network: RoPE, attention, MoE, the decoder, and the KV cache it writes to."""

from qwen25.model.kv_cache import KVCache
from qwen25.model.model import Transformer, build_model, init_weights

__all__ = ["KVCache", "Transformer", "build_model", "init_weights"]
