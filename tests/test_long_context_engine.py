"""Long context through the engine and the CLI: YaRN and DCA overrides, limits, bad input.

References: the engine's greedy output is compared with a naive loop that runs the plain
model forward over the whole sequence at every step (no cache, no chunked prefill, no C++
decoder), token for token; a model given YaRN/DCA by `extend_context` must give the logits of
a model built with that config from the start (fp32, max relative error 1e-6); context
limits are the spec's numbers (§4: 4 x 32,768 = 131,072; the 1M checkpoints' 1,010,000).
"""

from __future__ import annotations

import pytest
import torch

from conftest import randomize_
from qwen25 import Engine, build_model, save_model
from qwen25.cli import main
from qwen25.config import ConfigError, DCAConfig, ModelConfig, RopeScaling
from qwen25.engine import kernels
from qwen25.model.context import context_limit, extend_config, extend_context
from qwen25.model.rope import rope_parameters

TRAINED = 16  # the tiny models' "trained" context in these tests


def tiny(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(vocab_size=300, max_position_embeddings=TRAINED, **changes)


def random_model(cfg: ModelConfig, seed: int = 0):
    return randomize_(build_model(cfg, seed=seed), seed=seed + 1, std=0.15).eval()


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ------------------------------------------------------------------------ limits and config

def test_context_limits_follow_the_extension():
    base = ModelConfig.preset("0.5B")
    assert context_limit(base) == 32768
    assert context_limit(extend_config(base, "yarn:4")) == 131072
    assert context_limit(extend_config(base, dca="32768:2048")) == 131072
    assert context_limit(extend_config(base, "yarn:4", "32768:2048")) == 131072
    # A config.json with YaRN added by hand (max_position_embeddings left at 32768)
    shipped = base.replace(rope_scaling=RopeScaling("yarn", 4.0))
    assert context_limit(shipped) == 131072
    # ... or with max_position_embeddings raised as llama.cpp users do: same limit
    assert context_limit(base.replace(max_position_embeddings=131072,
                                      rope_scaling=RopeScaling("yarn", 4.0, 32768))) == 131072
    # Qwen2.5-7B-Instruct-1M: DCA chunk 262,144 and a stated 1,010,000
    one_m = ModelConfig.preset("7B").replace(
        max_position_embeddings=1010000, dual_chunk_attention=DCAConfig(262144, 8192, 262144))
    assert context_limit(one_m) == 1048576  # 4 x chunk is larger here
    assert context_limit(one_m.replace(max_position_embeddings=2_000_000)) == 2_000_000


def test_extend_config_keeps_the_trained_length_and_can_undo():
    base = ModelConfig.preset("0.5B")
    yarn = extend_config(base, "yarn:4")
    assert yarn.rope_scaling == RopeScaling("yarn", 4.0, 32768)
    assert yarn.max_position_embeddings == 131072
    # Overriding again starts from the trained length, not from the extended maximum.
    assert extend_config(yarn, "yarn:2").rope_scaling == RopeScaling("yarn", 2.0, 32768)
    assert extend_config(yarn, "yarn:2").max_position_embeddings == 65536
    undone = extend_config(yarn, "none")
    assert undone.rope_scaling is None and undone.max_position_embeddings == 32768
    # A shipped scaling without original length: adding DCA must not move YaRN's ramp.
    shipped = base.replace(rope_scaling=RopeScaling("yarn", 4.0))
    with_dca = extend_config(shipped, dca="32768:2048")
    assert with_dca.max_position_embeddings == 131072
    inv0, m0 = rope_parameters(shipped)
    inv1, m1 = rope_parameters(with_dca)
    assert torch.equal(inv0, inv1) and m0 == m1
    assert extend_config(with_dca, dca="none").dual_chunk_attention is None
    assert extend_config(base) is base


@pytest.mark.parametrize("rope, dca, match", [
    ("ntk:2", None, r"--rope-scaling 'ntk:2': rope_scaling.type='ntk' is not supported"),
    ("yarn:x", None, "TYPE:FACTOR"),
    ("yarn:0.5", None, "rope_scaling.factor=0.5"),
    (None, "8:8", r"--dca '8:8': dual_chunk_attention_config.chunk_size=8 must be larger than local_size=8"),
    (None, "4:9", "chunk_size=4 must be larger than local_size=9"),
    (None, "64", "CHUNK:LOCAL"),
    (None, "a:b", "CHUNK:LOCAL"),
    (None, "0:0", "must be > 0"),
    ("dynamic:2", "12:4", "dynamic.*cannot be combined with dual chunk attention"),
])
def test_bad_overrides_name_the_field(rope, dca, match):
    with pytest.raises(ConfigError, match=match):
        extend_config(ModelConfig.preset("tiny"), rope, dca)


def test_extend_context_equals_a_model_built_with_that_config():
    """set_rope must switch every attention layer to DCA, not only the RoPE tables."""
    plain = random_model(tiny())
    limit = extend_context(plain, "yarn:4", "12:4:16")
    assert limit == 64
    built = random_model(tiny(rope_scaling=RopeScaling("yarn", 4.0, TRAINED),
                              dual_chunk_attention=DCAConfig(12, 4, 16)).replace(max_position_embeddings=64))
    built.load_state_dict(plain.state_dict())
    assert plain.config == built.config
    ids = torch.randint(0, 300, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = plain(ids), built(ids)
    assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-6


# ------------------------------------------------------------------------ engine greedy

PROMPTS = [list(range(3, 43)), [7, 8, 9, 10, 11], [200 + (i * 7) % 90 for i in range(27)]]
PATHS = ["torch", "portable"] + (["auto"] if kernels.best_isa("float32") else [])


@pytest.mark.parametrize("path", PATHS)
def test_engine_greedy_with_yarn_equals_a_naive_loop(path):
    """Prompts past the trained length (40 > 16), prefilled in chunks of 7, a ragged batch."""
    model = random_model(tiny())
    extend_context(model, "yarn:4")
    engine = Engine(model, max_batch_size=3, max_seq_len=64, prefill_chunk=7, decode=path)
    assert engine.decode_path == {"auto": "fast"}.get(path, path)
    results = engine.generate(PROMPTS, max_new_tokens=14, temperature=0, stop_token_ids=[])
    for p, r in zip(PROMPTS, results):
        assert r.tokens == naive_greedy(model, p, 14)


@pytest.mark.parametrize("rope, dca", [(None, "12:4"), ("yarn:4", "12:4:16"), (None, "10:6")])
def test_engine_greedy_with_dca_equals_a_naive_loop(rope, dca):
    """DCA decodes on the PyTorch path; prompts span several chunks, prefill chunks of 5 cut
    across chunk boundaries, decode runs the three ranges with the cache."""
    model = random_model(tiny())
    extend_context(model, rope, dca)
    engine = Engine(model, max_batch_size=3, max_seq_len=64, prefill_chunk=5)
    assert engine.decode_path == "torch" and "dual chunk" in engine.fast_path_reason
    results = engine.generate(PROMPTS, max_new_tokens=14, temperature=0, stop_token_ids=[])
    for p, r in zip(PROMPTS, results):
        assert r.tokens == naive_greedy(model, p, 14)


def test_an_engine_built_before_dca_is_switched_on_leaves_the_fast_path():
    model = random_model(tiny())
    engine = Engine(model, max_batch_size=2, max_seq_len=64, decode="portable")
    assert engine.decode_path == "portable"
    extend_context(model, dca="12:4")
    prompt = PROMPTS[0]
    tokens = engine.generate([prompt], max_new_tokens=10, temperature=0, stop_token_ids=[])[0].tokens
    assert engine.decode_path == "torch" and "dual chunk" in engine.fast_path_reason
    assert tokens == naive_greedy(model, prompt, 10)


def test_engine_score_with_dca_equals_the_full_forward():
    model = random_model(tiny())
    extend_context(model, "yarn:4", "12:4")
    ids = PROMPTS[0] + PROMPTS[2]
    score = Engine(model, max_batch_size=1, max_seq_len=80).score(ids[:30], ids[30:])
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0, 29:-1].float(), -1)
    expected = ref.gather(-1, torch.tensor(ids[30:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(score.logprobs), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model over the real Qwen2.5 vocabulary, trained context 16."""
    cfg = ModelConfig.preset("tiny").replace(max_position_embeddings=TRAINED, num_hidden_layers=1)
    path = tmp_path_factory.mktemp("ckpt")
    save_model(random_model(cfg), path)
    return path


def cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("flags, match", [
    (["--rope-scaling", "ntk:2"], "rope_scaling.type='ntk' is not supported"),
    (["--dca", "8:8"], "dual_chunk_attention_config.chunk_size=8 must be larger than local_size=8"),
    (["--dca", "64"], "CHUNK:LOCAL"),
    (["--max-seq-len", "40"], "longer than the model's context of 16 tokens"),
    (["--rope-scaling", "yarn:2", "--max-seq-len", "40"], "context of 32 tokens"),
])
@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_cli_bad_context_flags_exit_2_with_one_line(checkpoint, capsys, verb, flags, match):
    argv = [verb, str(checkpoint), "--tokenizer", "qwen2.5", *flags]
    if verb == "generate":
        argv += ["--prompt", "hi"]
    code, out, err = cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qwen25 {verb}: error: ")
    assert match in lines[0]


def test_cli_generate_with_yarn_and_dca_prints_the_greedy_continuation(checkpoint, capsys):
    from qwen25 import load_model, load_tokenizer

    tok = load_tokenizer("qwen2.5")
    prompt = "It was the best of times, it was the worst of times, it was the age of wisdom"
    ids = tok.encode(prompt)
    assert len(ids) > TRAINED
    code, out, err = cli(["generate", str(checkpoint), "--tokenizer", "qwen2.5", "--prompt", prompt,
                          "--rope-scaling", "yarn:4", "--dca", "12:4", "--temperature", "0",
                          "--repetition-penalty", "1", "--max-new-tokens", "8"], capsys)
    assert code == 0, err
    model = load_model(checkpoint)
    extend_context(model, "yarn:4", "12:4")
    expected = tok.decode(naive_greedy(model, ids, 8), skip_special_tokens=True)
    assert out == expected + "\n"
    assert "decode: torch" in err
