"""Text in, text out on top of the token engine (no chat template: see `qwen25.assistant`).

- `complete(engine, tokenizer, prompts, ...)`: plain-text prompts -> `TextCompletion`s;
- `stream_complete(engine, tokenizer, prompt_ids, ...)`: the text of one prompt as it is
  generated, then its `TextCompletion`;
- `sampling_defaults(model)`: the model's recommended sampling (generation_config.json).

Both run on the engine's one dispatcher (`qwen25.engine.dispatch`), which owns the rules for
stop tokens, stop strings and cancellation; `TextStream` (detokenisation and stop strings)
is in `qwen25.engine.detokenize`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from qwen25.engine.detokenize import TextStream
from qwen25.engine.dispatch import Dispatcher, Submission
from qwen25.engine.engine import Engine, make_params
from qwen25.errors import UserError

__all__ = ["TextCompletion", "TextStream", "complete", "sampling_defaults", "stream_complete"]


@dataclass
class TextCompletion:
    text: str
    finish_reason: str  # "stop" (stop token or stop string) | "length" | "cancelled"
    token_ids: list[int]  # generated ids (up to and including what produced the stop)
    prompt_tokens: int


def sampling_defaults(model) -> dict:
    """The sampling a checkpoint recommends (its generation_config.json) as Engine keywords.

    Only the keys present are returned: temperature (0 when do_sample is false), top_p,
    top_k, min_p, repetition_penalty, and max_new_tokens when the config sets it.
    """
    gen = getattr(model, "generation_config", None) or {}
    out: dict = {}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens"):
        if isinstance(gen.get(key), (int, float)) and not isinstance(gen.get(key), bool):
            out[key] = gen[key]
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def text_completion(sub: Submission, i: int) -> TextCompletion:
    """Sample i of a finished submission as a TextCompletion."""
    return TextCompletion(sub.text(i), sub.finish_reason(i) or "stop", list(sub.request.outputs[i].tokens),
                          len(sub.prompt))


def complete(engine: Engine, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16,
             stop: Sequence[str] = (), skip_special_tokens: bool = True, **sampling) -> list[TextCompletion]:
    """Complete each text prompt (plain text, no template); len(prompts) * n results,
    prompt-major, like `Engine.generate`. `sampling`: Engine.generate's keywords."""
    if isinstance(prompts, str):
        raise UserError("complete takes a list of prompts; wrap a single prompt in a list")
    params = make_params(max_new_tokens=max_new_tokens, **sampling)
    ids = [tokenizer.encode(p) for p in prompts]
    subs = Dispatcher(engine, tokenizer).generate(ids, params, stop, skip_special_tokens)
    return [text_completion(s, j) for s in subs for j in range(s.n)]


def stream_complete(engine: Engine, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 16,
                    stop: Sequence[str] = (), skip_special_tokens: bool = True,
                    **sampling) -> Iterator[str | TextCompletion]:
    """Yield the text of one prompt (token ids) as it is generated, then (last) its
    TextCompletion. Closing the iterator cancels the request. Stop strings are never shown."""
    if sampling.get("n", 1) != 1:
        raise UserError("streaming produces one sample; use n=1")
    dispatcher = Dispatcher(engine, tokenizer)
    sub = dispatcher.submit(prompt_ids, make_params(max_new_tokens=max_new_tokens, **sampling), stop,
                            skip_special_tokens)
    for ev in dispatcher.run([sub]):
        if ev.text:
            yield ev.text
    yield text_completion(sub, 0)
