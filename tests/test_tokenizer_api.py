"""Tokenizer API: decode and streaming vs HF, token maps, batches, HF folders in and out."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer_support import (SPEC_CONTROL, auto_tokenizer, builtin, exported_dir, generated_texts,
                                    hf_full)

from qwen25 import load_tokenizer as lazy_load_tokenizer
from qwen25.errors import UserError
from qwen25.tokenizer import Tokenizer, TokenizerFileError, load_tokenizer
from qwen25.tokenizer.bpe import HFEngine, TiktokenEngine

VOCAB = 151_665
# Ids biased toward byte tokens (which split characters) and control tokens, plus unknown ids.
IDS = st.lists(st.one_of(st.integers(0, VOCAB - 1), st.integers(0, 255),
                         st.integers(151_643, 151_664), st.integers(VOCAB, 151_935)), max_size=40)


@settings(max_examples=800, deadline=None, derandomize=True)
@given(IDS, st.booleans())
def test_decode_matches_hf(ids, skip):
    ours = builtin().decode(ids, skip_special_tokens=skip)
    assert ours == hf_full().decode(ids, skip_special_tokens=skip)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.integers(0, VOCAB - 1), st.integers(151_643, 151_664)), max_size=30),
       st.booleans())
def test_decode_matches_transformers(ids, skip):
    assert builtin().decode(ids, skip_special_tokens=skip) == auto_tokenizer().decode(
        ids, skip_special_tokens=skip)


def test_skip_special_tokens_keeps_tool_and_fim_tokens():
    tok = builtin()
    ids = [i for i, _, _ in SPEC_CONTROL]
    kept = "".join(text for _, text, special in SPEC_CONTROL if not special)
    assert tok.decode(ids, skip_special_tokens=True) == kept
    assert tok.decode(ids) == "".join(text for _, text, _ in SPEC_CONTROL)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(IDS, st.booleans())
def test_stream_decoder_equals_decode_and_never_splits_a_character(ids, skip):
    tok = builtin()
    dec = tok.stream_decoder(skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_on_multibyte_text_emits_whole_characters():
    tok = builtin()
    text = "".join(generated_texts(seed=3, n_bytes=20_000))
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in tok.encode(text)]
    assert "\ufffd" not in "".join(pieces)  # no half characters were ever emitted
    assert "".join(pieces) + dec.flush() == tok.decode(tok.encode(text))
    # A token that ends inside a character yields "" until the character completes.
    ids = tok.encode(" 🦙")  # " \xf0\x9f" + "\xa6" + "\x99" (llama.cpp vector above)
    assert len(ids) == 3
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in ids] == [" ", "", "🦙"]


def test_token_maps_match_transformers():
    tok, hf = builtin(), auto_tokenizer()
    rng = random.Random(0)
    for i in rng.sample(range(VOCAB), 2000) + [0, 255, 151_642, 151_643, 151_664]:
        assert tok.id_to_token(i) == hf.convert_ids_to_tokens(i)
        assert tok.token_to_id(tok.id_to_token(i)) == i
        assert tok.decode([i]) == tok.id_to_bytes(i).decode("utf-8", errors="replace")
    assert tok.token_to_id("not a token at all") is None
    assert tok.get_vocab() == hf.get_vocab()
    with pytest.raises(KeyError):
        tok.id_to_bytes(VOCAB)


def test_encode_batch_equals_encode_and_keeps_order():
    tok = builtin()
    texts = generated_texts(seed=4, n_bytes=100_000) + ["", "a", "<|im_end|> x"] * 5
    single = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == single
    assert tok.encode_batch(texts, num_threads=1) == single
    assert tok.encode_batch(texts, num_threads=3) == single
    specials = [tok.encode(t, allow_special=True) for t in texts]
    assert tok.encode_batch(texts, allow_special=True, num_threads=2) == specials
    assert tok.encode_batch([]) == []


def test_encoding_releases_the_gil():
    # encode_batch can only use several cores if encode lets other Python threads run. While
    # a worker thread is inside encode(), this thread keeps counting; if encode held the GIL
    # it could count only in the moments around the call (a switch interval, ~1e5 at most
    # on a loaded machine). Releasing it gives millions. No clock is involved.
    import sys
    import threading

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # hand the GIL back quickly, to keep the "held" count small
    try:
        tok = builtin()
        text = "".join(generated_texts(seed=6, n_bytes=8_000_000))
        started, done = threading.Event(), threading.Event()

        def work():
            started.set()
            tok.encode(text)
            done.set()

        worker = threading.Thread(target=work)
        worker.start()
        started.wait()
        count = 0
        while not done.is_set():
            count += 1
        worker.join()
    finally:
        sys.setswitchinterval(old)
    assert count > 1_000_000


def test_allow_special_only_when_asked():
    tok = builtin()
    text = "a<|im_start|>user\n<tool_call><|fim_prefix|>b"
    assert not set(tok.encode(text)) & tok.control_ids
    assert tok.encode(text, allow_special=True) == hf_full().encode(text, add_special_tokens=False).ids


def test_tokenizers_pickle_for_worker_processes(tmp_path):
    import pickle

    text = "pickled <|im_end|> 你好"
    for tok in (builtin(), load_tokenizer(exported_dir())):
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
        assert clone.encode_batch([text] * 3, num_threads=2) == tok.encode_batch([text] * 3)
        assert clone.chat_template == tok.chat_template


def test_public_entry_points():
    tok = load_tokenizer("Qwen2.5")
    other = lazy_load_tokenizer("qwen2.5")
    assert other._engine is tok._engine  # the engine is built once and shared
    other.chat_template = "{{ messages }}"  # but each caller owns its tokenizer
    assert tok.chat_template.startswith("{%- if tools %}")
    assert isinstance(tok, Tokenizer) and len(tok) == VOCAB
    assert isinstance(tok._engine, TiktokenEngine)
    assert tok.chat_template.startswith("{%- if tools %}")


# ---- HF folders -------------------------------------------------------------------------
def test_exported_folder_round_trips_through_our_loader(tmp_path):
    texts = generated_texts(seed=5, n_bytes=50_000) + ["<|im_end|><tool_call>x"]
    folder = exported_dir()
    again = load_tokenizer(folder)
    assert isinstance(again._engine, TiktokenEngine)  # recognised as the official vocabulary
    assert [again.encode(t, allow_special=True) for t in texts] == \
           [builtin().encode(t, allow_special=True) for t in texts]
    assert again.chat_template == builtin().chat_template
    assert (again.eos_token_id, again.pad_token_id, again.bos_token_id) == (151645, 151643, None)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["bos_token"] is None
    assert config["additional_special_tokens"] == [t for _, t, s in SPEC_CONTROL[1:] if s]
    # Slow files only (vocab.json + merges.txt + tokenizer_config.json) load too.
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(folder / name, slow / name)
    from_slow = load_tokenizer(slow)
    assert isinstance(from_slow._engine, TiktokenEngine)
    assert from_slow.encode(texts[0]) == builtin().encode(texts[0])
    # Saving a loaded folder again writes the same files.
    again.save_pretrained(tmp_path / "resaved")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "resaved" / name).read_bytes() == (folder / name).read_bytes()


def test_released_style_tokenizer_json_is_recognised(tmp_path):
    # Released Qwen2.5 folders write merges as "a b" strings and omit newer BPE keys.
    data = json.loads((exported_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    data["model"].pop("ignore_merges", None)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok = load_tokenizer(tmp_path / "tokenizer.json")  # the file itself is accepted too
    assert isinstance(tok._engine, TiktokenEngine)
    assert tok.encode("Hello <|im_end|>", allow_special=True) == [9707, 220, 151_645]


def test_a_modified_vocabulary_is_encoded_by_hf_tokenizers(tmp_path):
    # Same pipeline, one merge removed: no longer the official vocabulary -> HF engine,
    # whose ids we do not compute ourselves.
    data = json.loads((exported_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = data["model"]["merges"][:-1]
    del data["model"]["vocab"][max(data["model"]["vocab"], key=data["model"]["vocab"].get)]
    data["added_tokens"] = [dict(t, id=t["id"] - 1) for t in data["added_tokens"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok._engine, HFEngine)
    assert tok.vocab_size == VOCAB - 1
    text = "Hello <|im_end|>"  # does not need the removed token
    assert tok.encode(text) == builtin().encode(text)
    assert tok.encode(text, allow_special=True) == builtin().encode(text, allow_special=True)[:-1] + [151_644]
    assert tok.chat_template is None and tok.eos_token is None
    import pickle

    assert pickle.loads(pickle.dumps(tok)).encode(text, allow_special=True) == tok.encode(text, allow_special=True)


def test_chat_template_jinja_file_wins(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(exported_dir() / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert load_tokenizer(tmp_path).chat_template == "{{ messages[0]['content'] }}"


def test_bad_folders_give_one_line_errors(tmp_path):
    with pytest.raises(TokenizerFileError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerFileError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="cannot read"):
        load_tokenizer(tmp_path)
    wordpiece = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
                 "post_processor": None, "decoder": None,
                 "model": {"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "a"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(wordpiece), encoding="utf-8")
    with pytest.raises(UserError, match="only byte-level BPE"):
        load_tokenizer(tmp_path)


def test_save_is_atomic_and_keeps_an_existing_folder_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out"
    builtin().save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    assert all(os.stat(p).st_mode & 0o044 for p in target.iterdir())  # readable by others

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        builtin().save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # no temp files left
