"""Inference: a token-level engine with a static KV cache and continuous batching.

- `engine.py`: `Engine` (generate / stream / score, and the step-level add / step / cancel);
- `scheduler.py`: the step-level core (admission, chunked prefill, batched decode, stops);
- `runner.py`: the model over the slot cache (`kv_cache.py`), with the C++ decode path
  (`fast.py`, `kernels/decode.cpp`) or the PyTorch model;
- `sampling.py`: pure, seeded sampling functions;
- `text.py`: detokenisation, stop strings, chat and tool calls on top of the engine.
"""

from qwen25.engine.engine import Completion, Engine, Request, SamplingParams, Score, StepOutput

__all__ = ["Completion", "Engine", "Request", "SamplingParams", "Score", "StepOutput"]
