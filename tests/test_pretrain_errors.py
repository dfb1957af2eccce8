"""Bad input to `qwen25 pretrain`: one clear line, exit code 2, and no training started."""

import json

import numpy as np
import pytest

from qwen25.cli import main
from qwen25.train.config import PretrainConfig, Stage
from qwen25.train.pretrain import pretrain
from train_fakes import fake_factory, write_fake_manifest


@pytest.fixture
def manifest(tmp_path):
    toks = np.arange(4000) % 50
    return str(write_fake_manifest(tmp_path / "data", toks[:3500], toks[3500:]))


def _cli(capsys, *argv):
    code = main(["pretrain", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def _nothing_trained(out):
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_unknown_key_in_config_file(tmp_path, capsys, manifest):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"data": manifest, "lrr": 1e-3, "out": str(tmp_path / "o")}))
    code, err = _cli(capsys, "--config", str(cfg))
    _assert_one_line_error(code, err, "unknown config key 'lrr'", "did you mean 'lr'")
    _nothing_trained(tmp_path / "o")


def test_unknown_nested_key_and_wrong_type(tmp_path, capsys, manifest):
    code, err = _cli(capsys, "--data", manifest, "--out", str(tmp_path / "o"), "--set", "stages.0.stepz=3")
    _assert_one_line_error(code, err, "'stages.0.stepz'", "did you mean 'steps'")
    code, err = _cli(capsys, "--data", manifest, "--set", "lr=fast")
    _assert_one_line_error(code, err, "'lr'", "expected float")
    code, err = _cli(capsys, "--config", str(tmp_path / "missing.toml"))
    _assert_one_line_error(code, err, "config file", "not found")


def test_missing_data_manifest(tmp_path, capsys):
    code, err = _cli(capsys, "--data", str(tmp_path / "nope" / "manifest.json"), "--out", str(tmp_path / "o"))
    _assert_one_line_error(code, err, "manifest", "not found", "qwen25 data prepare")
    _nothing_trained(tmp_path / "o")
    code, err = _cli(capsys, "--out", str(tmp_path / "o"))
    _assert_one_line_error(code, err, "data is empty")


def test_batch_not_divisible_by_micro_batch(tmp_path, capsys, manifest):
    out = tmp_path / "o"
    code, err = _cli(capsys, "--data", manifest, "--out", str(out), "--seq-len", "64",
                     "--batch-tokens", "640", "--micro-batch", "4")
    _assert_one_line_error(code, err, "10 sequences", "not divisible by micro_batch 4")
    code, err = _cli(capsys, "--data", manifest, "--out", str(out), "--seq-len", "64", "--batch-tokens", "1000")
    _assert_one_line_error(code, err, "not a multiple of seq_len=64")
    _nothing_trained(out)


def test_resuming_with_an_incompatible_model_config(tmp_path, capsys, manifest):
    out = tmp_path / "run"
    pretrain(PretrainConfig(out=str(out), model="tiny", model_overrides={"vocab_size": 50}, data=manifest,
                            seq_len=16, batch_tokens=64, micro_batch=4, stages=(Stage("a", steps=2),),
                            eval_tokens=64, peak_flops=1e12), loader_factory=fake_factory)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    metrics = (out / "metrics.jsonl").read_text()
    code, err = _cli(capsys, "--data", manifest, "--out", str(out), "--model", "tiny", "--seq-len", "16",
                     "--batch-tokens", "64", "--micro-batch", "4", "--set", "stages=[{\"name\": \"a\", \"steps\": 4}]",
                     "--set", "model_overrides={\"vocab_size\": 50, \"num_hidden_layers\": 3}")
    _assert_one_line_error(code, err, "different model", "num_hidden_layers", "new --out")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "metrics.jsonl").read_text() == metrics


def test_missing_tokenizer_and_unknown_preset(tmp_path, capsys, manifest):
    code, err = _cli(capsys, "--data", manifest, "--tokenizer", str(tmp_path / "tok"))
    _assert_one_line_error(code, err, "tokenizer", "not found")
    code, err = _cli(capsys, "--data", manifest, "--model", "huge")
    _assert_one_line_error(code, err, "unknown preset 'huge'")


# ---- issue 21 items 17-20: ranges of every value, divergence, a verified resume ----------------

@pytest.mark.parametrize("flags,needle", [
    (["--log-every", "0"], "log_every=0 must be >= 1"),
    (["--threads", "-1"], "threads=-1 must be >= 0"),
    (["--eps", "-1"], "eps=-1.0 must be a positive finite number"),
    (["--eps", "nan"], "eps=nan must be a positive finite number"),
    (["--ce-chunk", "-1"], "ce_chunk=-1 must be >= 0"),
    (["--lr", "inf"], "lr=inf"),
    (["--grad-clip", "nan"], "grad_clip=nan"),
    (["--spike-z", "0"], "spike_z=0.0 must be > 0"),
    (["--sample-temperature", "-1"], "sample_temperature=-1.0 must be >= 0"),
    (["--eval-tokens", "-5"], "eval_tokens=-5 must be >= 0"),
    (["--peak-flops", "-1"], "peak_flops=-1.0 must be >= 0"),
    (["--sample-tokens", "-1"], "sample_tokens=-1 must be >= 0"),
    (["--seed", "-1"], "seed=-1 must be >= 0"),
    (["--set", "stages.0.max_position_embeddings=-4"], "max_position_embeddings=-4"),
    (["--set", "stages.0.rope_theta=NaN"], "rope_theta"),
    (["--set", "min_lr_ratio=NaN"], "min_lr_ratio"),
])
def test_out_of_range_values_are_rejected_before_any_work(tmp_path, capsys, manifest, flags, needle):
    out = tmp_path / "o"
    code, err = _cli(capsys, "--data", manifest, "--out", str(out), *flags)
    _assert_one_line_error(code, err, needle)
    assert not out.exists()


def _tiny(out, manifest, **kw):
    return PretrainConfig(**{**dict(out=str(out), model="tiny", model_overrides={"vocab_size": 50}, data=manifest,
                                    seq_len=16, batch_tokens=64, micro_batch=4, stages=(Stage("a", steps=4),),
                                    eval_tokens=64, peak_flops=1e12, checkpoint_every=1, keep_checkpoints=3,
                                    eval_every=0, warmup_steps=0), **kw})


def test_divergence_is_one_line_naming_the_step_and_the_fix(tmp_path, capsys, manifest, monkeypatch):
    import qwen25.cli.pretrain as cli_pretrain

    out = tmp_path / "o"
    cfg = _tiny(out, manifest, lr=1e30, stages=(Stage("a", steps=30),), checkpoint_every=0)
    monkeypatch.setattr(cli_pretrain, "_run_pretrain", lambda c: pretrain(cfg, loader_factory=fake_factory))
    code, err = _cli(capsys, "--data", manifest, "--out", str(out))
    _assert_one_line_error(code, err, "diverged at step", "lower the learning rate")
    step = int(err.split("diverged at step ")[1].split()[0].rstrip(":"))
    assert 2 <= step <= 30


def test_resume_skips_a_corrupted_newest_checkpoint_and_matches_a_clean_run(tmp_path, manifest):
    """Item 17: 64 flipped bytes in the newest model.safetensors used to resume silently."""
    from qwen25.train.checkpointing import CheckpointWarning

    clean, broken = tmp_path / "clean", tmp_path / "broken"
    pretrain(_tiny(clean, manifest), loader_factory=fake_factory)
    pretrain(_tiny(broken, manifest, stop_after_step=3), loader_factory=fake_factory)
    st = broken / "checkpoints" / "step_00000003" / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    st.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match="step_00000003.*model.safetensors"):
        summary = pretrain(_tiny(broken, manifest), loader_factory=fake_factory)
    assert summary["resumed_from"] == 2

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "train"]

    assert losses(broken) == losses(clean)  # bitwise: CPU, float32, same seeds
    assert (broken / "checkpoints" / ".corrupt-step_00000003").is_dir()
