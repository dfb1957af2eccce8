"""Checkpoint folders: formats we must read and write, and every bad input a clear error.

Each bad checkpoint must raise `CheckpointError` naming the file and the problem through the
API, and exit with code 2 and one line on stderr through the CLI (never a traceback).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen25
from qwen25.checkpoint import CheckpointError, load_model, save_model


@pytest.fixture
def saved(tmp_path):
    cfg = qwen25.ModelConfig.preset("tiny").replace(vocab_size=256)
    model = qwen25.build_model(cfg, seed=0)
    path = save_model(model, tmp_path / "ckpt")
    return path, model


def test_round_trip_is_exact(saved):
    path, model = saved
    back = load_model(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert back.lm_head.weight is back.model.embed_tokens.weight  # still tied
    files = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in files  # tied checkpoints ship no head, as the released ones
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 151643


def test_bf16_on_disk_loads_as_requested_dtype(saved, tmp_path):
    path, model = saved
    save_model(model.to(torch.bfloat16), tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path / "bf16").dtype == torch.bfloat16  # default: as stored
    m32 = load_model(tmp_path / "bf16", dtype="float32")
    assert m32.dtype == torch.float32
    assert torch.equal(m32.model.norm.weight, model.model.norm.weight.float())


def test_sharded_round_trip_and_stale_files_removed(saved, tmp_path):
    path, model = saved
    out = tmp_path / "sharded"
    save_model(model, out, max_shard_size="30KB")
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    back = load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), back.parameters()))
    save_model(model, out)  # re-save unsharded in the same folder
    assert not list(out.glob("model-*-of-*.safetensors")) and (out / "model.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists()


def test_tied_checkpoint_with_extra_head_copy_loads(saved):
    """Some exports of tied models still carry lm_head.weight; it is the embedding, ignored."""
    path, model = saved
    t = load_file(path / "model.safetensors")
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_file(t, path / "model.safetensors")
    assert torch.equal(load_model(path).lm_head.weight, model.lm_head.weight)


def _corrupt(path, how):
    st = path / "model.safetensors"
    if how == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        st.write_bytes(b"\x00\x01garbage" * 100)
    elif how == "wrong_shape":
        t = load_file(st)
        t["model.norm.weight"] = torch.ones(65)
        save_file(t, st)
    elif how == "missing_tensor":
        t = load_file(st)
        del t["model.layers.1.mlp.up_proj.weight"]
        save_file(t, st)
    elif how == "extra_tensor":
        t = load_file(st)
        t["model.layers.9.mlp.up_proj.weight"] = torch.ones(2)
        save_file(t, st)
    elif how == "int_tensor":
        t = load_file(st)
        t["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
        save_file(t, st)
    elif how == "no_config":
        (path / "config.json").unlink()
    elif how == "bad_model_type":
        cfg = json.loads((path / "config.json").read_text()) | {"model_type": "gpt2"}
        (path / "config.json").write_text(json.dumps(cfg))
    elif how == "no_weights":
        st.unlink()
        (path / "pytorch_model.bin").write_bytes(b"pickle would go here")
    elif how == "index_outside":
        st.rename(path / "model-00001-of-00001.safetensors")
        keys = load_file(path / "model-00001-of-00001.safetensors").keys()
        wm = {k: "model-00001-of-00001.safetensors" for k in keys}
        wm["model.norm.weight"] = "../../etc/passwd.safetensors"
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    elif how == "index_missing_shard":
        keys = load_file(st).keys()
        st.rename(path / "model-00001-of-00002.safetensors")
        wm = {k: "model-00001-of-00002.safetensors" for k in keys}
        wm["model.norm.weight"] = "model-00002-of-00002.safetensors"
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    elif how == "index_not_json":
        (path / "model.safetensors.index.json").write_text("{oops")
    return path


BAD = {
    "truncated": "model.safetensors: not a readable safetensors file",
    "garbage": "model.safetensors: not a readable safetensors file",
    "wrong_shape": "'model.norm.weight' has shape \\[65\\] but config.json implies \\[64\\]",
    "missing_tensor": "missing tensor\\(s\\) \\['model.layers.1.mlp.up_proj.weight'\\]",
    "extra_tensor": "unexpected tensor 'model.layers.9.mlp.up_proj.weight'",
    "int_tensor": "dtype I32",
    "no_config": "config.json: not found",
    "bad_model_type": "model_type='gpt2' is not supported",
    "no_weights": "pickled weights are never read",
    "index_outside": "points outside the checkpoint folder",
    "index_missing_shard": "shard 'model-00002-of-00002.safetensors' is missing",
    "index_not_json": "not a valid shard index",
}


@pytest.mark.parametrize("how", BAD)
def test_bad_checkpoints_raise_clear_errors(saved, how):
    path = _corrupt(saved[0], how)
    with pytest.raises(CheckpointError, match=BAD[how]):
        load_model(path)


@pytest.mark.parametrize("how", ["truncated", "wrong_shape", "no_config", "index_outside"])
def test_cli_bad_checkpoint_exit_code_2(saved, how):
    path = _corrupt(saved[0], how)
    r = subprocess.run([sys.executable, "-m", "qwen25", "inspect", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(path) in r.stderr


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(tmp_path / "absent")
    r = subprocess.run([sys.executable, "-m", "qwen25", "inspect", str(tmp_path / "absent")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such checkpoint folder" in r.stderr


def test_inspect_reports_counts(saved):
    path, model = saved
    r = subprocess.run([sys.executable, "-m", "qwen25", "inspect", str(path), "--json"],
                       capture_output=True, text=True, check=True)
    info = json.loads(r.stdout)
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["files"]["count"] == 1


def test_inspect_moe_active_counts(tmp_path):
    cfg = qwen25.ModelConfig.preset("tiny-moe").replace(vocab_size=256)
    model = qwen25.build_model(cfg, seed=0)
    save_model(model, tmp_path / "moe")
    r = subprocess.run([sys.executable, "-m", "qwen25", "inspect", str(tmp_path / "moe"), "--json"],
                       capture_output=True, text=True, check=True)
    p = json.loads(r.stdout)["parameters"]
    assert p["total"] == sum(x.numel() for x in model.parameters())
    # active = total minus the (E - k) routed experts each token skips, per MoE layer
    skipped = cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok) * 3 * \
        cfg.hidden_size * cfg.moe_intermediate_size
    assert p["active"] == p["total"] - skipped


# ---- issue 21, items 9, 11, 12: layouts that must load, and more bad folders ------------------


def _hub_cache_layout(path, model, tmp_path):
    """The HF hub cache: snapshots/<rev>/ holds symlinks into ../../blobs/<sha>."""
    sharded = save_model(model, tmp_path / "plain", max_shard_size="30KB")
    blobs = tmp_path / "hub" / "blobs"
    snap = tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(sharded.iterdir())):
        blob = blobs / f"blob{i:03d}"
        f.rename(blob)
        (snap / f.name).symlink_to(f"../../blobs/{blob.name}")
    return snap


def test_hub_cache_sharded_layout_loads(saved, tmp_path):
    path, model = saved
    snap = _hub_cache_layout(path, model, tmp_path)
    assert len(list(snap.glob("model-*.safetensors"))) > 2
    back = load_model(snap)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), back.parameters()))


def _corrupt_more(path, how):
    st = path / "model.safetensors"
    if how == "shard_symlink_loop":
        keys = load_file(st).keys()
        st.unlink()
        (path / "model-00001-of-00001.safetensors").symlink_to("model-00001-of-00001.safetensors")
        wm = {k: "model-00001-of-00001.safetensors" for k in keys}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    elif how == "index_is_directory":
        (path / "model.safetensors.index.json").mkdir()
    elif how == "index_weight_map_list":
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    elif how == "index_shard_name_int":
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 3}}))
    elif how == "index_dotdot":
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": ".."}}))
    elif how == "weights_is_directory":
        st.unlink()
        st.mkdir()
    elif how == "million_layers":
        cfg = json.loads((path / "config.json").read_text()) | {"num_hidden_layers": 1_000_000}
        (path / "config.json").write_text(json.dumps(cfg))
    elif how.startswith("gen_"):
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text())
        if how == "gen_directory":
            gen_path.unlink()
            gen_path.mkdir()
        elif how == "gen_symlink_loop":
            gen_path.unlink()
            gen_path.symlink_to(gen_path.name)
        else:
            key, value = {"gen_eos_x": ("eos_token_id", "x"), "gen_eos_list_x": ("eos_token_id", [1, "x"]),
                          "gen_temperature_neg": ("temperature", -1), "gen_top_p_5": ("top_p", 5),
                          "gen_top_k_str": ("top_k", "20"), "gen_do_sample_str": ("do_sample", "no"),
                          "gen_max_new_tokens_0": ("max_new_tokens", 0),
                          "gen_rep_penalty_tiny": ("repetition_penalty", 0),
                          "gen_min_p_2": ("min_p", 2)}[how]
            gen_path.write_text(json.dumps(gen | {key: value}))
    return path


BAD_MORE = {
    "shard_symlink_loop": "model-00001-of-00001.safetensors.*cannot be read",
    "index_is_directory": "model.safetensors.index.json: cannot be read",
    "index_weight_map_list": "not a valid shard index",
    "index_shard_name_int": "shard 3 for 'a' .*plain file names",
    "index_dotdot": "shard '..' for 'a' .*plain file names",
    "weights_is_directory": "model.safetensors",
    "million_layers": "num_hidden_layers=1000000 but the weights hold 2 layers",
    "gen_directory": "generation_config.json: cannot be read",
    "gen_symlink_loop": "generation_config.json: cannot be read",
    "gen_eos_x": "generation_config.json: eos_token_id='x' must be an integer or a list of integers",
    "gen_eos_list_x": "generation_config.json: eos_token_id=",
    "gen_temperature_neg": "generation_config.json: temperature=-1.0 must be >= 0",
    "gen_top_p_5": "generation_config.json: top_p=5.0 must be in \\(0, 1\\]",
    "gen_top_k_str": "generation_config.json: top_k='20' must be an integer",
    "gen_do_sample_str": "generation_config.json: do_sample='no' must be true or false",
    "gen_max_new_tokens_0": "generation_config.json: max_new_tokens=0 must be >= 1",
    "gen_rep_penalty_tiny": "generation_config.json: repetition_penalty=0.0 must be > 0",
    "gen_min_p_2": "generation_config.json: min_p=2.0 must be in \\[0, 1\\]",
}


@pytest.mark.parametrize("how", BAD_MORE)
def test_more_bad_checkpoints_raise_clear_errors(saved, how):
    path = _corrupt_more(saved[0], how)
    with pytest.raises(CheckpointError, match=BAD_MORE[how]) as e:
        load_model(path)
    assert "\n" not in str(e.value)


def test_million_layer_config_fails_before_building_anything(saved):
    """The check reads only headers: a meta model of 1e6 layers would take minutes and GBs."""
    import resource

    path = _corrupt_more(saved[0], "million_layers")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_model(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_generation_config_defaults_survive_validation(saved):
    path, _ = saved
    gen = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
           "pad_token_id": 151643, "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20,
           "top_p": 0.8, "transformers_version": "4.37.0"}  # Qwen2.5-Instruct's file
    (path / "generation_config.json").write_text(json.dumps(gen))
    assert load_model(path).generation_config == gen


@pytest.mark.parametrize("how", ["shard_symlink_loop", "million_layers", "gen_eos_x"])
def test_cli_more_bad_checkpoints_exit_code_2(saved, how):
    path = _corrupt_more(saved[0], how)
    r = subprocess.run([sys.executable, "-m", "qwen25", "generate", str(path), "--prompt", "hi",
                        "--max-new-tokens", "1", "--tokenizer", "qwen2.5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert re.search(BAD_MORE[how], r.stderr), r.stderr
