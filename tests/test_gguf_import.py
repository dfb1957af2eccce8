"""GGUF import on synthetic files written with the `gguf` writer from random transformers
models, and the one-line errors for bad files.

References and tolerances (fp32 logits, max|ours - ref| / max|ref|):
- F32 file vs the source model: <= 1e-4;
- F16 / BF16 / Q8_0 / Q4_1 file vs the source model with its matrices rounded the same way
  (gguf's own quantise/dequantise): <= 1e-4; and vs the unrounded source within the
  format's error (F16 <= 5e-3, BF16 <= 3e-2, Q8_0 <= 5e-2, Q4_1 <= 0.5 of the logit range);
- a llama file (Q/K rows permuted by the writer as llama.cpp does) vs transformers loading
  the same file through its own GGUF loader: <= 1e-4.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from conftest import randomize_
from gguf_writer import gguf_roundtrip_, write_model
from qwen25.checkpoint import load_model
from qwen25.cli import main
from qwen25.errors import UserError
from qwen25.formats.gguf_file import GGUFError

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=288, max_position_embeddings=512, rms_norm_eps=1e-6)
VOCAB = 269  # the tiny GGUF vocabulary's size (fits the 288 embedding rows)


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _ids(seed=0):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _qwen2(tie=False, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return randomize_(Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=tie, rope_theta=1e6)),
                      seed, std=0.1).eval()


@pytest.mark.parametrize("qtype,bound", [("F32", 0.0), ("F16", 5e-3), ("Q8_0", 5e-2),
                                         ("BF16", 3e-2), ("Q4_1", 0.5)])
@pytest.mark.parametrize("tie", [False, True])
def test_synthetic_qwen2_gguf_loads_with_source_logits(tmp_path, qtype, bound, tie):
    hf = _qwen2(tie=tie)
    path = write_model(tmp_path / f"m-{qtype}.gguf", hf, "qwen2", qtype)
    ours = load_model(path)
    assert ours.config.qkv_bias and ours.config.tie_word_embeddings == tie
    assert ours.dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        source = hf(ids).logits
        out = ours(ids)
        assert rel_err(out, source) <= max(bound, 1e-4)
        gguf_roundtrip_(hf, qtype)
        assert rel_err(out, hf(ids).logits) <= 1e-4


def test_bf16_load_rounds_once(tmp_path):
    hf = _qwen2()
    path = write_model(tmp_path / "m.gguf", hf, "qwen2", "F32")
    ours = load_model(path, dtype="bfloat16")
    ref = dict(hf.to(torch.bfloat16).named_parameters())
    mine = dict(ours.named_parameters())
    assert set(mine) <= set(ref)
    for name, p in mine.items():
        assert p.dtype == torch.bfloat16 and torch.equal(p, ref[name]), name


def test_synthetic_llama_gguf_matches_transformers_gguf_loader(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = randomize_(LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True, rope_theta=1e5)),
                    std=0.1).eval()
    path = write_model(tmp_path / "llama.gguf", hf, "llama", "Q8_0")
    ours = load_model(path)
    assert not ours.config.qkv_bias
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="llama.gguf", dtype=torch.float32).eval()
    ids = _ids(1)
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).logits) <= 1e-4
        gguf_roundtrip_(hf, "Q8_0")  # and the un-permutation restored HF's row order
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4


def test_synthetic_qwen2moe_gguf_loads_with_source_logits(tmp_path):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(**SHAPE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, tie_word_embeddings=False)
    hf = randomize_(Qwen2MoeForCausalLM(cfg), std=0.1).eval()
    path = write_model(tmp_path / "moe.gguf", hf, "qwen2moe", "F16")
    ours = load_model(path)
    assert ours.config.num_experts == 4 and ours.config.shared_expert_intermediate_size == 64
    gguf_roundtrip_(hf, "F16")
    ids = _ids(2)
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4


def test_convert_cli_writes_a_folder_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = _qwen2()
    path = write_model(tmp_path / "m.gguf", hf, "qwen2", "F32")
    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = _ids(3)
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf(ids).logits) <= 1e-4
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("hello world", add_special_tokens=False).input_ids == \
        AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")("hello world", add_special_tokens=False).input_ids


# ---- bad input -----------------------------------------------------------------------
def _one_line_cli_error(capsys, path, out, needle):
    code = main(["convert", str(path), str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err
    assert needle in err, err
    assert not (out / "config.json").exists()  # nothing half-written


def test_truncated_file(tmp_path, capsys):
    path = write_model(tmp_path / "m.gguf", _qwen2(), "qwen2", "F32")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 40):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError, match="truncated or corrupted"):
            load_model(bad)
        _one_line_cli_error(capsys, bad, tmp_path / f"out{cut}", "truncated")


def test_wrong_magic(tmp_path, capsys):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 64)
    _one_line_cli_error(capsys, bad, tmp_path / "out", "not a GGUF file")


def test_unknown_architecture(tmp_path, capsys):
    path = write_model(tmp_path / "m.gguf", _qwen2(), "mamba", "F32", vocab=False)
    _one_line_cli_error(capsys, path, tmp_path / "out", "architecture 'mamba' is not supported")


def test_unsupported_tensor_type(tmp_path, capsys):
    hf = _qwen2()
    norm = np.zeros(64, dtype=np.int32)  # an I32 tensor where a norm belongs
    path = write_model(tmp_path / "m.gguf", hf, "qwen2", "F32",
                       override_types={"blk.0.attn_norm.weight": norm})
    _one_line_cli_error(capsys, path, tmp_path / "out", "has type I32, which the gguf package cannot")


def test_unknown_pre_tokenizer_cli(tmp_path, capsys):
    path = write_model(tmp_path / "m.gguf", _qwen2(), "qwen2", "F32", pre="no-such-pre")
    _one_line_cli_error(capsys, path, tmp_path / "out", "tokenizer.ggml.pre='no-such-pre'")


@pytest.mark.parametrize("kv,needle", [
    ({"qwen2.rope.scaling.type": "longrope", "qwen2.rope.scaling.factor": 4.0}, "rope.scaling.type='longrope'"),
    ({"qwen2.attention.sliding_window": 256}, "sliding-window"),
    ({"qwen2.rope.dimension_count": 8}, "partial RoPE"),
])
def test_metadata_we_cannot_honour(tmp_path, kv, needle):
    path = write_model(tmp_path / "m.gguf", _qwen2(), "qwen2", "F32", extra_kv=kv)
    with pytest.raises(GGUFError, match=needle):
        load_model(path)


def test_yarn_scaling_is_read(tmp_path):
    kv = {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
          "qwen2.rope.scaling.original_context_length": 512}
    path = write_model(tmp_path / "m.gguf", _qwen2(), "qwen2", "F32", extra_kv=kv)
    sc = load_model(path).config.rope_scaling
    assert (sc.type, sc.factor, sc.original_max_position_embeddings) == ("yarn", 4.0, 512)


def test_missing_and_misshapen_tensors(tmp_path):
    hf = _qwen2()
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(96, 64))
    path = write_model(tmp_path / "m.gguf", hf, "qwen2", "F32")
    with pytest.raises(GGUFError, match="blk.1.ffn_up.weight' has shape \\[96, 64\\]"):
        load_model(path)


def test_tokenizer_and_model_from_one_file_share_the_parse(tmp_path):
    """load_model then load_tokenizer on the same GGUF: the header is parsed once."""
    import qwen25
    from qwen25.formats import gguf_file

    path = write_model(tmp_path / "m.gguf", _qwen2(), "qwen2", "F32")
    qwen25.load_model(path)
    first = gguf_file.open_gguf(path)
    tok = qwen25.load_tokenizer(path)
    assert gguf_file.open_gguf(path) is first and tok.encode("hello world") == [259, 264]
    assert gguf.GGUFReader is not None


def test_inspect_reads_a_gguf(tmp_path, capsys):
    path = write_model(tmp_path / "m.gguf", _qwen2(), "qwen2", "Q8_0")
    assert main(["inspect", str(path)]) == 0
    assert "Qwen2ForCausalLM" in capsys.readouterr().out
