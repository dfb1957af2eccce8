"""A model fine-tuned from a base checkpoint whose eos is <|endoftext|> ends its turns with
<|im_end|>, and the exported folder tells every loader so.

The run goes through the CLI on a tiny random model; the reference for "stops" is
transformers' `generate` on the exported folder (it reads generation_config.json).
"""

from __future__ import annotations

import json

import pytest
import torch

import sft_support as S
from qwen25.cli import main

transformers = pytest.importorskip("transformers")


def _rows():
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"Say the word {w}."},
                          {"role": "assistant", "content": w}]}
            for w in ("apple", "pencil", "ticket", "candle", "muffin", "marker", "sticker", "notebook")]


@pytest.mark.slow
def test_sft_from_a_base_config_ends_turns_with_im_end(tmp_path):
    base = json.loads((S.model_dir() / "config.json").read_text())
    tok = S.tokenizer()
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert base["eos_token_id"] == eot  # a base checkpoint: it would never stop at <|im_end|>
    data = S.write_jsonl(tmp_path / "d.jsonl", _rows() * 4)
    out = tmp_path / "run"
    code = main(["sft", "--profile", "tiny", "--model", str(S.model_dir()), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--threads", "1", "--steps", "40", "--batch-size", "8", "--layout", "pad",
                 "--micro-batch", "8", "--seq-len", "256", "--lr", "1e-2", "--warmup-steps", "2",
                 "--eval-fraction", "0", "--eval-every", "0", "--checkpoint-every", "0"])
    assert code == 0
    final = out / "final"
    gen = json.loads((final / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [im_end, eot]
    assert json.loads((final / "config.json").read_text())["eos_token_id"] == [im_end, eot]

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(final))
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(final), torch_dtype=torch.float32).eval()
    for row in _rows()[:4]:
        prompt = hf_tok.apply_chat_template(row["messages"][:2], add_generation_prompt=True, tokenize=False)
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        new = hf.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
        assert new[-1] == im_end and len(new) < 20, hf_tok.decode(new)
        assert hf_tok.decode(new[:-1]).strip() == row["messages"][2]["content"]
    plots = {p.name for p in (out / "plots").iterdir()}
    assert "loss.png" in plots
