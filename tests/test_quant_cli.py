"""`qwen25 quantize`: RTN and GPTQ folders that `load_model` reads back; bad flags exit 2."""

from __future__ import annotations

import torch

from qwen25 import ModelConfig, build_model, load_model, save_model
from qwen25.cli import main
from qwen25.data.calibration import calibration_windows
from qwen25.quant.modules import QuantLinear, quantize_model
from qwen25.tokenizer import load_tokenizer


def _float_folder(tmp_path):
    model = build_model(ModelConfig.preset("tiny"), seed=0).eval()
    folder = save_model(model, tmp_path / "f")
    load_tokenizer("qwen2.5").save_pretrained(folder)
    return model, folder


def test_quantize_int8_folder_loads_as_the_quantized_model(tmp_path):
    model, folder = _float_folder(tmp_path)
    assert main(["quantize", str(folder), "--method", "int8", "--out", str(tmp_path / "q")]) == 0
    loaded = load_model(tmp_path / "q")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    expect = quantize_model(model, 8)
    ids = torch.randint(0, 1000, (1, 7))
    with torch.no_grad():  # scales go through float16 on disk: equal to that rounding
        torch.testing.assert_close(loaded(ids), expect(ids), rtol=2e-3, atol=2e-3)
    assert (tmp_path / "q" / "tokenizer.json").exists()


def test_quantize_gptq_on_calibration_text(tmp_path):
    _, folder = _float_folder(tmp_path)
    text = tmp_path / "calib.txt"
    text.write_text("The quality of mercy is not strained; it droppeth as the gentle rain.\n\n" * 40)
    rc = main(["quantize", str(folder), "--method", "gptq-int4", "--group-size", "16", "--out",
               str(tmp_path / "g"), "--calibration", str(text), "--samples", "4", "--seq-len", "32"])
    assert rc == 0
    loaded = load_model(tmp_path / "g")
    assert loaded.model.layers[1].mlp.down_proj.group_size == 16


def test_calibration_windows_cover_the_text(tmp_path):
    tok = load_tokenizer("qwen2.5")
    text = tmp_path / "a.txt"
    text.write_text(" ".join(f"word{i}" for i in range(400)))
    windows = calibration_windows(tok, [str(text)], samples=5, seq_len=40, eos_id=tok.eos_token_id)
    stream = tok.encode(text.read_text()) + [tok.eos_token_id]
    assert len(windows) == 5 and all(w.shape == (1, 40) for w in windows)
    assert windows[0][0].tolist() == stream[:40] and windows[-1][0].tolist() == stream[-40:]


def test_bad_group_size_exits_2(tmp_path, capsys):
    _, folder = _float_folder(tmp_path)
    assert main(["quantize", str(folder), "--method", "int4", "--group-size", "48", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not divide" in err and len(err.splitlines()) == 1
