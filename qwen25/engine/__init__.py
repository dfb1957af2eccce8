"""Inference: a token-level engine with a static KV cache and continuous batching.

- `engine.py`: `Engine` (generate / stream / score, and the step-level add / step / cancel);
- `scheduler.py`: the step-level core (admission, chunked prefill, batched decode, stops);
- `runner.py`: the model over the slot cache (`qwen25.model.kv_cache`), with the C++ decode path
  (`fast.py`, `kernels/decode.cpp`) or the PyTorch model;
- `sampling.py`: pure, seeded sampling functions;
- `dispatch.py`: the one loop that drives the engine for its users (submit, step, route
  tokens and text to submissions, stop tokens and strings, cancel): generate, the server,
  evaluation and GRPO rollouts;
- `detokenize.py` (TextStream: ids -> text deltas, stop strings), `text.py` (text in, text
  out). Chat templates and tool calls live above the engine, in `qwen25.assistant`.
"""

from qwen25.engine.engine import Completion, Engine, Request, SamplingParams, Score, StepOutput

__all__ = ["Completion", "Engine", "Request", "SamplingParams", "Score", "StepOutput"]
