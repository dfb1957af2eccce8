"""GGUF export: what the file holds (read back with the gguf package's reader), llama.cpp
running it (llama-cpp-python: greedy tokens equal our engine's on the same weights), and
one-line errors for what cannot be written.
"""

from __future__ import annotations

import pytest
import torch

from qwen25 import ModelConfig, build_model, save_model
from qwen25.formats import gguf_names as names
from qwen25.formats.gguf_export import GGUFExportError, decode_tensor, export_gguf, tensor_type
from qwen25.formats.llama_cpp import open_llama
from qwen25.tokenizer import load_tokenizer

# 64 wide, 176 MLP (rows not a multiple of 32: f16 fallback); a small vocabulary keeps the
# files small (the real one is exported once, in test_real_vocabulary_metadata)
CFG = ModelConfig.preset("tiny").replace(vocab_size=384)


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    """A byte-level BPE with the Qwen regex and control tokens, trained on a little text."""
    from qwen25.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    text = root / "corpus.txt"
    text.write_text(("The quality of mercy is not strained; it droppeth as the gentle rain from "
                     "heaven upon the place beneath. 1234 5678\n") * 200)
    train_tokenizer([text], 360, root / "tok", show_progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def qwen_tok_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_tok")
    load_tokenizer("qwen2.5").save_pretrained(folder)
    return folder


def _model(cfg=CFG, seed=0, std=0.1):
    model = build_model(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than HF init: peaked logits, decisive greedy steps
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _export(tmp_path, tok_folder, model, kind, name="m.gguf"):
    tok = load_tokenizer(tok_folder)
    return export_gguf(model.config, model.state_dict(), tok, tmp_path / name, kind, tokenizer_folder=tok_folder)


def _read(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: t for t in r.tensors}


def test_metadata(tmp_path, tok_folder):
    _export(tmp_path, tok_folder, _model(), "f16")
    meta, tensors = _read(tmp_path / "m.gguf")
    tok = load_tokenizer(tok_folder)
    assert meta["general.architecture"] == "qwen2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["qwen2.block_count"] == 2 and meta["qwen2.attention.head_count_kv"] == 2
    assert meta["qwen2.rope.freq_base"] == CFG.rope_theta and meta["qwen2.feed_forward_length"] == 176
    assert meta["general.file_type"] == 1  # MOSTLY_F16
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == CFG.vocab_size > len(tok)  # padded to the embedding rows
    assert tokens[-1] == f"[PAD{CFG.vocab_size - 1}]" and types[-1] == names.TOKEN_UNUSED
    assert tokens[:len(tok)] == [tok.id_to_token(i) for i in range(len(tok))]
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert all(m.count(" ") == 1 for m in meta["tokenizer.ggml.merges"])
    assert "output.weight" not in tensors  # tied head: llama.cpp reuses token_embd


@pytest.mark.slow
def test_real_vocabulary_metadata(tmp_path, qwen_tok_folder):
    cfg = ModelConfig.preset("tiny")  # the released embedding rows (151,936)
    tok = load_tokenizer(qwen_tok_folder)
    export_gguf(cfg, _model(cfg).state_dict(), tok, tmp_path / "q.gguf", "q8_0", tokenizer_folder=qwen_tok_folder)
    meta, _ = _read(tmp_path / "q.gguf")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == 151936 and len(tok) == 151665 and tokens[151665] == "[PAD151665]"
    im_end = tok.token_to_id("<|im_end|>")
    assert tokens[im_end] == "<|im_end|>" and types[im_end] == names.TOKEN_CONTROL
    assert types[tok.token_to_id("<|fim_prefix|>")] == names.TOKEN_CONTROL  # looks special
    assert types[tok.token_to_id("<tool_call>")] == names.TOKEN_USER_DEFINED
    assert types[1000] == names.TOKEN_NORMAL and tokens[1000] == tok.id_to_token(1000)
    assert len(meta["tokenizer.ggml.merges"]) == 151387
    assert meta["tokenizer.ggml.eos_token_id"] == 151645 and meta["tokenizer.ggml.padding_token_id"] == 151643


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_tensors_read_back(tmp_path, tok_folder, kind):
    model = _model()
    report = _export(tmp_path, tok_folder, model, kind)
    _, tensors = _read(tmp_path / "m.gguf")
    state = model.state_dict()
    for key, t in state.items():
        if key == "lm_head.weight":
            continue
        gname = names.gguf_name(key)
        rec = tensors[gname]
        written = report.types[gname]
        assert rec.tensor_type.name.lower() == written
        assert tuple(int(d) for d in reversed(rec.shape)) == tuple(t.shape)  # ne = [in, out]
        back = decode_tensor(rec.data, written, tuple(t.shape))
        # quantization error bounds per type: half a step of the block scale
        tol = {"f32": 0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 0.004, "q4_0": 0.07, "q4_1": 0.04}[written]
        assert (back - t).abs().max() <= tol * max(1.0, float(t.abs().max()) * 4), (key, written)
    assert report.types["blk.0.ffn_down.weight"] == ("f16" if kind.startswith("q") else kind)  # 176 % 32
    if kind.startswith("q4"):
        assert report.types["token_embd.weight"] == "q8_0"


def test_type_rules():
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0") == "f32"
    assert tensor_type("blk.0.ffn_up.weight", (176, 64), "q4_0") == "q4_0"
    assert tensor_type("blk.0.ffn_down.weight", (64, 176), "q8_0") == "f16"
    assert tensor_type("output.weight", (151936, 896), "q4_1") == "q8_0"
    assert tensor_type("token_embd.weight", (151936, 896), "q8_0") == "q8_0"


def test_errors_are_one_line(tmp_path, tok_folder):
    tok = load_tokenizer(tok_folder)
    with pytest.raises(GGUFExportError, match="q4_k_m.*llama-quantize"):
        export_gguf(CFG, {}, tok, tmp_path / "x.gguf", "q4_k_m")
    moe = ModelConfig.preset("tiny-moe")
    with pytest.raises(GGUFExportError, match="qwen2_moe"):
        export_gguf(moe, {}, tok, tmp_path / "x.gguf", "f16")
    small = CFG.replace(vocab_size=100)
    with pytest.raises(GGUFExportError, match="only 100 embeddings"):
        export_gguf(small, {}, tok, tmp_path / "x.gguf", "f16", tokenizer_folder=tok_folder)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export(tmp_path, tok_folder, capsys):
    import shutil

    from qwen25.cli import main

    folder = save_model(_model(), tmp_path / "ckpt")
    for f in tok_folder.iterdir():
        shutil.copy(f, folder / f.name)
    assert main(["export", "gguf", str(folder), str(tmp_path / "o.gguf"), "--type", "q8_0"]) == 0
    assert "q8_0" in capsys.readouterr().err
    assert main(["export", "gguf", str(folder), str(tmp_path / "o.gguf"), "--type", "q3_k"]) == 2
    assert "not supported" in capsys.readouterr().err


# ---- llama.cpp as the consumer ---------------------------------------------------------------


def _reference_model(path, cfg):
    """Our model holding exactly the values stored in the GGUF (dequantised), for a fair
    greedy comparison: llama.cpp computes with the stored values."""
    _, tensors = _read(path)
    model = build_model(cfg, init=False).eval()
    with torch.no_grad():
        for key, p in model.state_dict().items():
            if key == "lm_head.weight":
                continue
            rec = tensors[names.gguf_name(key)]
            t = decode_tensor(rec.data, rec.tensor_type.name.lower(), tuple(p.shape))
            if cfg.model_type == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
                heads = cfg.num_attention_heads if "q_proj" in key else cfg.num_key_value_heads
                t = names.unpermute_qk(t, heads)
            p.copy_(t)
    return model


def _open_llama(path):
    # plain CPU buffers: llama.cpp's AMX repack path segfaults in eval on these tiny shapes
    return open_llama(path, n_ctx=128, n_threads=1, n_batch=64, verbose=False, logits_all=True)


def _llama_greedy(path, prompt: list[int], steps: int) -> list[int]:
    pytest.importorskip("llama_cpp")
    import numpy as np

    llm = _open_llama(path)
    llm.eval(prompt)
    out = []
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def _our_greedy(model, prompt: list[int], steps: int) -> list[int]:
    from qwen25 import Engine

    engine = Engine(model, max_batch_size=1, max_seq_len=128)
    return list(engine.generate([prompt], max_new_tokens=steps, temperature=0.0)[0].tokens)


def _llama_logits(path, seq: list[int]) -> torch.Tensor:
    pytest.importorskip("llama_cpp")
    import numpy as np

    llm = _open_llama(path)
    llm.eval(seq)
    return torch.tensor(np.array(llm.scores[:len(seq)]))


# llama.cpp's f16 matmuls round the activations to f16, its q8_0 ones quantize them to
# 8-bit blocks of 32: logits of this model (|logit| <= ~4) differ by up to these.
LOGIT_TOL = {"f16": 0.01, "q8_0": 0.1}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_greedy_equals_our_engine(tmp_path, tok_folder, kind, arch):
    """llama.cpp runs our file: its logits equal ours on the values stored in it (within
    LOGIT_TOL) and its greedy choice equals our engine's at every step that is not a near
    tie (Llama: Q/K rows permuted for llama.cpp's RoPE)."""
    pytest.importorskip("llama_cpp")
    cfg = CFG if arch == "qwen2" else CFG.replace(qkv_bias=False)
    _export(tmp_path, tok_folder, _model(cfg, seed=1), kind)
    meta, _ = _read(tmp_path / "m.gguf")
    assert meta["general.architecture"] == arch
    prompt = load_tokenizer(tok_folder).encode("The quality of mercy is not strained")
    ref = _reference_model(tmp_path / "m.gguf", cfg)
    ours = _our_greedy(ref, prompt, 12)
    seq = prompt + ours
    with torch.no_grad():
        mine = ref(torch.tensor([seq]))[0].float()
    theirs = _llama_logits(tmp_path / "m.gguf", seq)
    torch.testing.assert_close(theirs, mine, rtol=0, atol=LOGIT_TOL[kind])
    # Each step given the same prefix: where our top two differ by more than twice that
    # row's largest logit difference, llama.cpp's argmax cannot differ from ours, and must not.
    rows = slice(len(prompt) - 1, len(seq) - 1)
    err = (theirs[rows] - mine[rows]).abs().amax(-1)
    top2 = mine[rows].topk(2, dim=-1).values
    decisive = top2[:, 0] - top2[:, 1] > 2 * err
    assert int(decisive.sum()) >= len(ours) // 2, "too many near-ties in this test model to compare"
    assert torch.equal(theirs[rows].argmax(-1)[decisive], torch.tensor(ours)[decisive])
    # free running: llama.cpp's own greedy loop agrees up to the first near-tie
    n = (decisive.tolist() + [False]).index(False)
    assert _llama_greedy(tmp_path / "m.gguf", prompt, n) == ours[:n]
