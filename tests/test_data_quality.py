"""Model-based scoring on a tiny random model: perplexity vs a token-by-token recomputation, the
judge vs a full-vocabulary softmax, batch invariance, and per-source thresholds in the pipeline."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from qwen25.checkpoint import save_model
from qwen25.config import ModelConfig
from qwen25.data.config import DataConfig, DedupConfig, FilterConfig, MixConfig, QualityConfig, SourceConfig
from qwen25.data.pipeline import prepare
from qwen25.data.quality import JudgeScorer, ModelDomainClassifier, PerplexityScorer, threshold_reason
from qwen25.data.sources import Document
from qwen25.model import build_model

DOCS = ["The cat sat on the mat and looked out of the window at the rain.",
        "def add(a, b):\n    return a + b\n",
        "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16.",
        "Short."]


@pytest.fixture(scope="module")
def tok():
    from qwen25.tokenizer import load_tokenizer

    return load_tokenizer("qwen2.5")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("tiny"), seed=0).eval()


def test_perplexity_matches_token_by_token(model, tok):
    scorer = PerplexityScorer(model, tok, max_tokens=8, batch_size=3)
    got = scorer.score(DOCS)
    eos = tok.eos_token_id  # the scorer's context token in front of every document
    for text, ppl in zip(DOCS, got):
        ids = [eos] + tok.encode(text)[:8]
        nll = 0.0
        with torch.no_grad():
            for k in range(1, len(ids)):  # the model sees only the prefix, no padding, no batch
                logits = model(torch.tensor([ids[:k]]))[0, -1].double()
                nll -= torch.log_softmax(logits, -1)[ids[k]].item()
        assert ppl == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    assert scorer.score(DOCS) == got  # deterministic
    assert scorer.score(DOCS[1:2])[0] == pytest.approx(got[1], rel=1e-5)  # batch-invariant


def test_judge_matches_full_softmax_and_is_batch_invariant(model, tok):
    judge = JudgeScorer(model, tok, max_doc_tokens=16, batch_size=3)
    got = judge.judge(DOCS)
    digits = [tok.encode(str(d))[0] for d in range(6)]
    for text, j in zip(DOCS, got):
        ids = judge.prompt_ids(text)
        assert ids[-3:] == tok.apply_chat_template([{"role": "user", "content": "x"}],
                                                   add_generation_prompt=True)[-3:]
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([ids]))[0, -1].double(), -1)  # whole vocabulary
        q = p[digits] / p[digits].sum()
        assert j.expected == pytest.approx(float((q * torch.arange(6)).sum()), abs=1e-4)
        assert j.argmax == int(q.argmax())
        assert sum(j.probs) == pytest.approx(1.0, abs=1e-6)
    assert [j.expected for j in judge.judge(DOCS[2:3])] == pytest.approx([got[2].expected], abs=1e-5)


def test_model_domain_classifier_matches_full_softmax(model, tok):
    clf = ModelDomainClassifier(model, tok, ["code", "literature", "math"], max_doc_tokens=16)
    labels = [tok.encode(str(i))[0] for i in range(3)]
    probs = clf.probs(DOCS)
    for text, p in zip(DOCS, probs):
        ids = clf.prompt_ids(text)
        assert "0: code\n1: literature\n2: math" in tok.decode(ids)
        with torch.no_grad():
            full = torch.softmax(model(torch.tensor([ids]))[0, -1].double(), -1)
        q = full[labels] / full[labels].sum()
        assert p.tolist() == pytest.approx(q.tolist(), abs=1e-4)
        assert clf(Document(text, "s", "i")) == ["code", "literature", "math"][int(q.argmax())]


def test_thresholds_per_source():
    q = QualityConfig("perplexity", "m", max_perplexity={"web": 50.0, "*": 500.0})
    assert threshold_reason(q, "web", 60.0) == "quality_perplexity"
    assert threshold_reason(q, "books", 60.0) is None and threshold_reason(q, "books", 600.0)
    j = QualityConfig("judge", "m", min_score={"web": 2.5})
    assert threshold_reason(j, "web", 2.0) == "quality_judge" and threshold_reason(j, "other", 0.0) is None


def test_pipeline_drops_by_score_and_accounts_for_it(tmp_path, model, tok):
    save_model(model, tmp_path / "ckpt")
    lines = [json.dumps({"text": f"{d} Document number {i} follows the pattern of the others in the set."})
             for i, d in enumerate(DOCS * 3)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    scores = PerplexityScorer(model, tok, 32, 4).score(
        [json.loads(x)["text"] for x in lines])
    cut = sorted(scores)[len(scores) // 2]
    # No source domain: the same checkpoint classifies the documents into a / b / general.
    cfg = DataConfig(sources=(SourceConfig("web", str(tmp_path / "in.jsonl")),),
                     out=str(tmp_path / "out"), num_workers=0, val_fraction=0.0,
                     filters=FilterConfig(enabled=False), dedup=DedupConfig(near=False),
                     quality=QualityConfig("perplexity", str(tmp_path / "ckpt"), tokenizer="qwen2.5",
                                           max_tokens=32, max_perplexity={"web": cut}),
                     mix=MixConfig(keywords={"a": (), "b": ()}, classifier_model=str(tmp_path / "ckpt"),
                                   classifier_tokenizer="qwen2.5"))
    m = json.loads(prepare(cfg, tokenizer=tok, progress=False).read_text())
    web = m["counts"]["sources"]["web"]
    assert web["drops"]["quality_perplexity"] == sum(s > cut for s in scores)
    assert web["kept"] == sum(s <= cut for s in scores)
    assert m["quality"]["sources"]["web"]["scored"] == len(lines)
    clf = ModelDomainClassifier(model, tok, ["a", "b", "general"])
    expected = Counter(clf(Document(json.loads(x)["text"], "web", "i")) for x, s in zip(lines, scores) if s <= cut)
    assert {d: c["docs"] for d, c in m["counts"]["domains"].items()} == dict(expected)
