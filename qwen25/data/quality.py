"""Model-based quality scoring: perplexity under a checkpoint, and an LLM judge.

Both need only a forward pass (`qwen25.load_model`), no generation engine.

- `PerplexityScorer`: perplexity of the first `max_tokens` tokens of a document,
  exp(mean over tokens of -log p(x_i | EOS, x_<i)). The EOS in front plays the role it has in
  packed pretraining (the separator before every document), so a document's first token is
  scored too. Low perplexity under a model trained on clean text signals clean text (the
  CCNet recipe, Wenzek et al. 2020); thresholds are per source.
- `ModelDomainClassifier`: the same reading of one next token, over numbered domains, gives
  the model-based domain classifier of the report's mixture stage.
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


CLASSIFY_PROMPT = """Classify the following document into exactly one of these domains:
{choices}

Document:
<<<
{document}
>>>

Reply with the number of the domain only."""


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


def _single_token_ids(tok, labels: list[str], who: str) -> list[int]:
    out = []
    for label in labels:
        ids = list(tok.encode(label))
        if len(ids) != 1:
            raise UserError(f"the {who} needs {label!r} to be a single token in this vocabulary (got {ids})")
        out.append(ids[0])
    return out


def chat_prompt_ids(tok, template: str, text: str, max_doc_tokens: int, **fields: str) -> list[int]:
    """Ids of a one-turn chat asking `template` about the start of `text` (`max_doc_tokens` long),
    ending with the assistant's generation prompt."""
    doc = tok.decode(list(tok.encode(text))[:max_doc_tokens])
    messages = [{"role": "user", "content": template.format(document=doc, **fields)}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True))


@torch.inference_mode()
def next_token_probs(model, rows: list[list[int]], candidates: list[int], pad: int, batch_size: int) -> torch.Tensor:
    """p(candidate | row) renormalised over `candidates`, [len(rows), len(candidates)] float32.

    Rows are left-padded (every row ends at the last column) and only the last position's
    logits are computed; softmax over the candidates' logits equals the full softmax
    renormalised over them.
    """
    out = []
    cand = torch.tensor(candidates)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, row in enumerate(chunk):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        hidden, _ = model.hidden_states(ids, attention_mask=mask)
        last = model.lm_head(hidden[:, -1]).float()
        out.append(torch.softmax(last[:, cand], dim=-1))
    return torch.cat(out) if out else torch.empty(0, len(candidates))


class JudgeScorer:
    """0-5 quality score from a chat checkpoint's next-token distribution (see module doc)."""

    name = "judge"

    def __init__(self, model, tok, max_doc_tokens: int = 512, batch_size: int = 4, prompt: str = JUDGE_PROMPT):
        if not hasattr(tok, "apply_chat_template"):
            raise UserError("the judge needs a chat tokenizer (apply_chat_template); pass the chat model's tokenizer")
        self.model, self.tok, self.max_doc_tokens, self.batch_size = model.eval(), tok, max_doc_tokens, batch_size
        self.prompt = prompt
        self.digit_ids = _single_token_ids(tok, [str(d) for d in range(6)], "judge")

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the full judge prompt for one document (its start, `max_doc_tokens` long)."""
        return chat_prompt_ids(self.tok, self.prompt, text, self.max_doc_tokens)

    def judge(self, texts: list[str]) -> list[Judgement]:
        probs = next_token_probs(self.model, [self.prompt_ids(t) for t in texts], self.digit_ids,
                                 int(self.tok.eos_token_id), self.batch_size)
        return [Judgement(float((p * torch.arange(6, dtype=p.dtype)).sum()), int(p.argmax()),
                          tuple(float(x) for x in p)) for p in probs]

    def score(self, texts: list[str]) -> list[float]:
        return [j.expected for j in self.judge(texts)]


class ModelDomainClassifier:
    """Domain of a document chosen by a chat checkpoint, as the report's mixture did with
    Qwen2-Instruct: a fixed prompt lists the domains numbered 0..k-1 and the domain is the most
    likely number as the next token (k <= 10). A `Document -> str` callable, so it replaces
    the keyword classifier in `pipeline.prepare(classifier=...)` or via `mix.classifier_model`.
    """

    def __init__(self, model, tok, domains: list[str], max_doc_tokens: int = 256, prompt: str = CLASSIFY_PROMPT):
        if not 2 <= len(domains) <= 10:
            raise UserError(f"the model classifier chooses among 2 to 10 domains, got {len(domains)}")
        self.model, self.tok, self.domains, self.max_doc_tokens = model.eval(), tok, list(domains), max_doc_tokens
        self.prompt = prompt
        self.choices = "\n".join(f"{i}: {d}" for i, d in enumerate(self.domains))
        self.label_ids = _single_token_ids(tok, [str(i) for i in range(len(self.domains))], "classifier")

    def prompt_ids(self, text: str) -> list[int]:
        return chat_prompt_ids(self.tok, self.prompt, text, self.max_doc_tokens, choices=self.choices)

    def probs(self, texts: list[str]) -> torch.Tensor:
        """p(domain | document) renormalised over the domains, [len(texts), k]."""
        return next_token_probs(self.model, [self.prompt_ids(t) for t in texts], self.label_ids,
                                int(self.tok.eos_token_id), batch_size=4)

    def __call__(self, doc) -> str:
        return self.domains[int(self.probs([doc.text])[0].argmax())]


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


def build_classifier(model_path: str, tokenizer: str, domains: list[str]) -> ModelDomainClassifier:
    """`ModelDomainClassifier` over a checkpoint folder (tokenizer "" -> the model folder's)."""
    from qwen25.checkpoint import load_model
    from qwen25.tokenizer import load_tokenizer

    return ModelDomainClassifier(load_model(model_path, dtype="float32"), load_tokenizer(tokenizer or model_path),
                                 domains)


def threshold_reason(cfg: QualityConfig, source: str, score: float) -> str | None:
    """The drop reason for a score under the source's threshold ("*" is the default), else None."""
    if cfg.scorer == "perplexity":
        limit = cfg.max_perplexity.get(source, cfg.max_perplexity.get("*"))
        return "quality_perplexity" if limit is not None and not score <= limit else None
    if cfg.scorer == "judge":
        limit = cfg.min_score.get(source, cfg.min_score.get("*"))
        return "quality_judge" if limit is not None and not score >= limit else None
    return None
