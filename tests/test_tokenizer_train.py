"""Training a vocabulary: same pipeline as Qwen's, loadable here and by transformers.

References: `transformers.AutoTokenizer` on the trained folder, and tiktoken built from the
trained vocabulary's ranks (HF BPE and rank-order BPE agree on this vocabulary: its merges
are exactly the ones derived from its ranks, checked below). Our engine for trained
vocabularies is HF `tokenizers`, so tiktoken is the independent one.
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from test_tokenizer_support import SPEC_CONTROL, SPEC_PATTERN, generated_texts, stdlib_texts

from qwen25.cli import main
from qwen25.errors import UserError
from qwen25.tokenizer import load_tokenizer
from qwen25.tokenizer.bytelevel import derive_merges, str_to_token, token_to_str
from qwen25.tokenizer.bpe import HFEngine
from qwen25.tokenizer.train import train_tokenizer

VOCAB_SIZE = 3000


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    files = []
    for i, text in enumerate(stdlib_texts(1_500_000)[:200] + generated_texts(seed=7, n_bytes=200_000)):
        path = root / f"doc{i}.txt"
        path.write_text(text, encoding="utf-8")
        files.append(path)
    out = root / "tok"
    tok = train_tokenizer(files, VOCAB_SIZE, out, show_progress=False)
    return tok, out


def heldout() -> list[str]:
    return stdlib_texts(2_500_000)[200:260] + generated_texts(seed=8, n_bytes=100_000)


def test_layout_control_tokens_and_engine(trained):
    tok, out = trained
    assert tok.vocab_size == VOCAB_SIZE
    n = VOCAB_SIZE - len(SPEC_CONTROL)
    assert tok.num_regular_tokens == n
    assert [(t.id - n, t.content, t.special) for t in tok.added_tokens] == \
           [(i - 151_643, text, special) for i, text, special in SPEC_CONTROL]
    assert isinstance(tok._engine, HFEngine)
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == SPEC_PATTERN
    assert data["normalizer"]["type"] == "NFC"
    vocab = data["model"]["vocab"]
    # Byte-level alphabet: every byte is a token, so any text encodes without unknowns.
    assert all(token_to_str(bytes([b])) in vocab for b in range(256))
    # The Qwen regex keeps digits apart, so no learned token holds two digits.
    assert not any(sum(c.isdigit() for c in t) > 1 for t in vocab)
    assert tok.chat_template == load_tokenizer("qwen2.5").chat_template


def test_ids_match_transformers_and_tiktoken(trained):
    import tiktoken
    from transformers import AutoTokenizer

    tok, out = trained
    hf = AutoTokenizer.from_pretrained(str(out))
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    ranks = {str_to_token(s): i for s, i in data["model"]["vocab"].items()}
    merges = [tuple(m) for m in data["model"]["merges"]]
    assert [(token_to_str(a), token_to_str(b)) for a, b in derive_merges(ranks)] == merges
    reference = tiktoken.Encoding("trained", pat_str=SPEC_PATTERN, mergeable_ranks=ranks, special_tokens={})
    texts = heldout() + ["<|im_start|>user\nhi<|im_end|>", "x" * 5000]
    ours = tok.encode_batch(texts)
    for text, ids in zip(texts, ours):
        assert ids == reference.encode_ordinary(unicodedata.normalize("NFC", text))
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    for text in texts[:20] + texts[-2:]:
        assert tok.encode(text, allow_special=True) == hf(text, add_special_tokens=False)["input_ids"]
    assert hf.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == VOCAB_SIZE - 20


def test_chat_with_a_trained_vocabulary(trained):
    tok, _ = trained
    messages = [{"role": "user", "content": "hi <|im_end|>"}, {"role": "assistant", "content": "hello"}]
    ids, mask = tok.apply_chat_template(messages, return_assistant_mask=True)
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    assert [i for i in ids if i in tok.control_ids].count(tok.token_to_id("<|im_end|>")) == 3
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "hello<|im_end|>"


def test_bad_training_requests(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abc\n", encoding="utf-8")
    with pytest.raises(UserError, match="too small"):
        train_tokenizer([text], 200, tmp_path / "o")
    with pytest.raises(UserError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], 1000, tmp_path / "o")


def test_cli_train(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(generated_texts(seed=9, n_bytes=50_000)), encoding="utf-8")
    assert main(["tokenizer", "train", "--vocab-size", "600", str(corpus), "--out", str(tmp_path / "t")]) == 0
    assert "600 ids" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "t").vocab_size == 600
    assert main(["tokenizer", "train", "--vocab-size", "100", str(corpus), "--out", str(tmp_path / "u")]) == 2
    assert "too small" in capsys.readouterr().err
