"""Model-based quality scoring: perplexity under a checkpoint, and an LLM judge.

Both need only a forward pass (`qwen25.load_model`), no generation engine.

- `PerplexityScorer`: perplexity of the first `max_tokens` tokens of a document,
  exp(mean over tokens of -log p(x_i | EOS, x_<i)). The EOS in front plays the role it has in
  packed pretraining (the separator before every document), so a document's first token is
  scored too. Low perplexity under a model trained on clean text signals clean text (the
  CCNet recipe, Wenzek et al. 2020); thresholds are per source.
- `JudgeScorer`: the report filters with Qwen2-Instruct judging samples (qwen25-spec §3.1).
  A fixed prompt asks a chat checkpoint for a 0-5 score; instead of sampling, the score is
  read off the next-token distribution after the prompt restricted to the tokens "0".."5":
  expected = sum_d d * p(d) / sum_d p(d), and the argmax digit is reported too. Deterministic,
  one forward pass per document, and smoother than a sampled digit.

Batching: documents are right-padded for perplexity and left-padded for the judge (the last
position must be the prompt's end); the model's `attention_mask` keeps padded rows equal to
unpadded ones. Logits are computed from `model.hidden_states` only where needed (one row of
a batch at a time, or the last position), so memory does not scale with batch x vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen25.data.config import QualityConfig
from qwen25.errors import UserError

JUDGE_PROMPT = """Rate the quality of the following document as pretraining data for a language model.

Score 0 for spam, gibberish, boilerplate or broken text; 1 for mostly useless text; 2 for
readable text with little value; 3 for useful, coherent text; 4 for well-written, informative
text; 5 for excellent educational or technical material (clear explanations, correct code or
mathematics).

Document:
<<<
{document}
>>>

Reply with a single digit from 0 to 5."""


class PerplexityScorer:
    """Perplexity of each document's first `max_tokens` tokens under `model`."""

    name = "perplexity"

    def __init__(self, model, tok, max_tokens: int = 512, batch_size: int = 8):
        self.model, self.tok, self.max_tokens, self.batch_size = model.eval(), tok, max_tokens, batch_size

    @torch.inference_mode()
    def score(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        eos = int(self.tok.eos_token_id)
        for i in range(0, len(texts), self.batch_size):
            rows = [[eos] + list(self.tok.encode(t))[: self.max_tokens] for t in texts[i:i + self.batch_size]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), eos, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            hidden, _ = self.model.hidden_states(ids, attention_mask=mask)  # [B, width, h]
            for r, row in enumerate(rows):
                # One row's logits at a time: [n - 1, vocab] is the peak, not [B, width, vocab].
                if len(row) < 2:  # nothing to predict (empty text never gets here: "empty")
                    out.append(1.0)
                    continue
                logits = self.model.lm_head(hidden[r, :len(row) - 1]).float()
                nll = torch.nn.functional.cross_entropy(logits, ids[r, 1:len(row)])
                out.append(float(torch.exp(nll)))
        return out


@dataclass(frozen=True)
class Judgement:
    expected: float  # sum_d d * p(d), p renormalised over the six digits
    argmax: int  # the most likely digit
    probs: tuple[float, ...]  # p(0) .. p(5)


class JudgeScorer:
    """0-5 quality score from a chat checkpoint's next-token distribution (see module doc)."""

    name = "judge"

    def __init__(self, model, tok, max_doc_tokens: int = 512, batch_size: int = 4, prompt: str = JUDGE_PROMPT):
        if not hasattr(tok, "apply_chat_template"):
            raise UserError("the judge needs a chat tokenizer (apply_chat_template); pass the chat model's tokenizer")
        self.model, self.tok, self.max_doc_tokens, self.batch_size = model.eval(), tok, max_doc_tokens, batch_size
        self.prompt = prompt
        self.digit_ids = []
        for d in range(6):
            ids = list(tok.encode(str(d)))
            if len(ids) != 1:
                raise UserError(f"the judge needs '{d}' to be a single token in this vocabulary (got {ids})")
            self.digit_ids.append(ids[0])

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the full judge prompt for one document (its start, `max_doc_tokens` long)."""
        doc = self.tok.decode(list(self.tok.encode(text))[: self.max_doc_tokens])
        messages = [{"role": "user", "content": self.prompt.format(document=doc)}]
        return list(self.tok.apply_chat_template(messages, add_generation_prompt=True))

    @torch.inference_mode()
    def judge(self, texts: list[str]) -> list[Judgement]:
        out: list[Judgement] = []
        pad = int(self.tok.eos_token_id)
        digits = torch.tensor(self.digit_ids)
        for i in range(0, len(texts), self.batch_size):
            rows = [self.prompt_ids(t) for t in texts[i:i + self.batch_size]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):  # left padding: every row ends at the last column
                ids[r, width - len(row):] = torch.tensor(row)
                mask[r, width - len(row):] = 1
            hidden, _ = self.model.hidden_states(ids, attention_mask=mask)
            last = self.model.lm_head(hidden[:, -1]).float()  # only the last position's logits
            probs = torch.softmax(last[:, digits], dim=-1)  # == full softmax renormalised over digits
            for p in probs:
                expected = float((p * torch.arange(6, dtype=p.dtype)).sum())
                out.append(Judgement(expected, int(p.argmax()), tuple(float(x) for x in p)))
        return out

    def score(self, texts: list[str]) -> list[float]:
        return [j.expected for j in self.judge(texts)]


def build_scorer(cfg: QualityConfig):
    """The configured scorer with its checkpoint and tokenizer loaded (None when off)."""
    if not cfg.scorer:
        return None
    from qwen25.checkpoint import load_model
    from qwen25.tokenizer import load_tokenizer

    model = load_model(cfg.model, dtype="float32")
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    if cfg.scorer == "perplexity":
        return PerplexityScorer(model, tok, cfg.max_tokens, cfg.batch_size)
    return JudgeScorer(model, tok, cfg.max_tokens, cfg.batch_size)


def threshold_reason(cfg: QualityConfig, source: str, score: float) -> str | None:
    """The drop reason for a score under the source's threshold ("*" is the default), else None."""
    if cfg.scorer == "perplexity":
        limit = cfg.max_perplexity.get(source, cfg.max_perplexity.get("*"))
        return "quality_perplexity" if limit is not None and not score <= limit else None
    if cfg.scorer == "judge":
        limit = cfg.min_score.get(source, cfg.min_score.get("*"))
        return "quality_judge" if limit is not None and not score >= limit else None
    return None
