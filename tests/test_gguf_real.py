"""The real-model tier: SmolLM2-135M-Instruct (Llama architecture, Q4_1/Q8_0 GGUF) loaded by
us and by transformers from the same file.

References and tolerances:
- logits: transformers `from_pretrained(dir, gguf_file=...)`, float32, max relative error
  max|ours - ref| / max|ref| <= 1e-4 on several prompts;
- greedy decoding: 64 tokens identical to transformers' `generate(do_sample=False)`;
- `convert_gguf`'s HF folder: loads in transformers with the same logits (<= 1e-4);
- chat rendering: transformers' `apply_chat_template` with the file's template, exactly;
- a factual question answered correctly: a smoke test of the whole path (load, template,
  tokenizer, engine, detokenisation), chosen among questions this small model gets right.
Tokenizer ids on 2,000+ strings are in test_gguf_tokenizer.py.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.real, pytest.mark.xdist_group("smollm2")]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "日本の首都は東京です。The weather today 🌞 is",
    "1 + 1 = 2, 2 + 2 = 4, 3 + 3 =",
]


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def hf_logits(smollm2_hf, smollm2_tokenizer):
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([smollm2_tokenizer.encode(p)])
            out.append((ids, smollm2_hf(ids).logits))
    return out


def test_config_is_smollm2(smollm2):
    cfg = smollm2.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_word_embeddings and not cfg.qkv_bias and cfg.rope_theta == 100_000.0
    hf = smollm2.config  # and transformers reads the same numbers from the metadata
    assert hf.max_position_embeddings == 8192


def test_config_matches_transformers(smollm2, smollm2_hf):
    ours, ref = smollm2.config, smollm2_hf.config
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]


def test_logits_equal_transformers(smollm2, hf_logits):
    with torch.no_grad():
        for ids, ref in hf_logits:
            assert rel_err(smollm2(ids), ref) <= 1e-4


def test_greedy_64_tokens_equal_transformers(smollm2, smollm2_hf, smollm2_tokenizer):
    from qwen25.engine import Engine

    engine = Engine(smollm2, max_batch_size=2, max_seq_len=256, hugepages=False)
    prompts = [smollm2_tokenizer.encode(PROMPTS[2]),
               smollm2_tokenizer.apply_chat_template(
                   [{"role": "user", "content": "Write a short poem about the sea."}],
                   add_generation_prompt=True)]
    ours = engine.generate(prompts, max_new_tokens=64, temperature=0.0, stop_token_ids=[])
    for prompt, result in zip(prompts, ours):
        with torch.no_grad():
            ref = smollm2_hf.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64,
                                      do_sample=False)[0, len(prompt):].tolist()
        assert len(ref) == 64
        assert result.tokens == ref


def test_converted_folder_loads_in_transformers(smollm2_gguf, hf_logits, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qwen25
    from qwen25.formats.gguf_import import convert_gguf

    out = convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2-hf"))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = qwen25.load_model(out)
    with torch.no_grad():
        for (ids, ref), prompt in zip(hf_logits, PROMPTS):
            assert hf_tok(prompt, add_special_tokens=False).input_ids == ids[0].tolist()
            assert rel_err(hf(ids).logits, ref) <= 1e-4
            assert rel_err(ours(ids), ref) <= 1e-4
    messages = [{"role": "user", "content": "Hi!"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False) == \
        qwen25.load_tokenizer(out).apply_chat_template(messages, tokenize=False)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Name a colour. 🎨"}],
    [{"role": "user", "content": "多行\n文本\n\n  with  spaces "}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_rendering_equals_transformers(smollm2_tokenizer, smollm2_hf_tokenizer, conv, generation_prompt):
    messages = CONVERSATIONS[conv]
    ref = smollm2_hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=generation_prompt)
    text = smollm2_tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
    assert text == ref
    ids = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert ids == smollm2_hf_tokenizer(ref, add_special_tokens=False).input_ids


@pytest.mark.parametrize("question,word", [
    ("What is the capital of France?", "Paris"),
    ("What is the opposite of hot?", "cold"),
    ("How many days are there in a week?", "7"),
])
def test_the_real_model_answers(smollm2, smollm2_tokenizer, question, word):
    """Smoke test of the whole path; questions this 135M model is known to get right."""
    from qwen25.engine import Engine
    from qwen25.assistant import chat

    engine = Engine(smollm2, max_batch_size=1, max_seq_len=256, hugepages=False)
    reply = chat(engine, smollm2_tokenizer, [{"role": "user", "content": question}],
                 max_new_tokens=40, temperature=0.0)
    assert word in reply.text
