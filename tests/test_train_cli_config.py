"""Config dataclass -> argparse flags, --help from field comments, file + flags + --set merging."""

import argparse
import json
from dataclasses import dataclass, field

import pytest

from qwen25.cli.config_args import add_config_arguments, config_from_args, config_from_dict, field_comments
from qwen25.errors import UserError


@dataclass(frozen=True)
class Inner:
    steps: int = 1  # how many steps
    theta: float | None = None  # optional base


@dataclass(frozen=True)
class Outer:
    name: str = "run"  # the run's name
    lr: float = 0.1  # peak learning rate
    fast: bool = False  # go fast
    files: tuple[str, ...] = ()  # input files
    extra: dict = field(default_factory=dict)  # free-form table
    parts: tuple[Inner, ...] = (Inner(),)  # the phases
    limit: int | None = None  # optional cap


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p, Outer)
    return p, p.parse_args(list(argv))


def test_comments_become_help():
    assert field_comments(Outer)["lr"] == "peak learning rate"
    assert field_comments(Inner)["theta"] == "optional base"
    p, _ = _parse()
    text = p.format_help()
    assert "--lr FLOAT" in text and "peak learning rate (default: 0.1)" in text
    assert "--fast, --no-fast" in text
    assert "--parts" not in text and "--extra" not in text  # nested: via --config / --set only


def test_defaults_file_flags_and_set_in_order_of_precedence(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"name": "file", "lr": 0.5, "parts": [{"steps": 3}]}))
    _, args = _parse("--config", str(cfg_file), "--lr", "0.25", "--fast", "--files", "a", "b",
                     "--set", "parts.1={\"steps\": 9, \"theta\": 1e6}", "--set", "extra.depth=4",
                     "--set", "name=from-set", "--limit", "none")
    cfg = config_from_args(Outer, args)
    assert cfg == Outer(name="from-set", lr=0.25, fast=True, files=("a", "b"), extra={"depth": 4},
                        parts=(Inner(3), Inner(9, 1e6)), limit=None)


def test_toml_config_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 2e-4\n[[parts]]\nsteps = 5\n[[parts]]\nsteps = 7\ntheta = 1000000\n')
    _, args = _parse("--config", str(f))
    cfg = config_from_args(Outer, args)
    assert cfg.lr == 2e-4 and cfg.parts == (Inner(5), Inner(7, 1e6))
    assert isinstance(cfg.parts[1].theta, float)


def test_strict_keys_and_types():
    with pytest.raises(UserError, match=r"unknown config key 'lrr'; did you mean 'lr'"):
        config_from_dict(Outer, {"lrr": 1})
    with pytest.raises(UserError, match=r"unknown config key 'parts.0.step'; did you mean 'steps'"):
        config_from_dict(Outer, {"parts": [{"step": 1}]})
    with pytest.raises(UserError, match=r"'parts.0.steps': expected int, got 1.5"):
        config_from_dict(Outer, {"parts": [{"steps": 1.5}]})
    with pytest.raises(UserError, match=r"'fast': expected bool"):
        config_from_dict(Outer, {"fast": 1})
    with pytest.raises(UserError, match=r"'lr' may not be null"):
        config_from_dict(Outer, {"lr": None})
    assert config_from_dict(Outer, {"parts": [{"steps": 1e3}]}).parts[0].steps == 1000  # 1e3 in JSON


def test_bad_set_syntax(tmp_path):
    _, args = _parse("--set", "lr")
    with pytest.raises(UserError, match="KEY=VALUE"):
        config_from_args(Outer, args)
    _, args = _parse("--set", "parts.5.steps=2")
    with pytest.raises(UserError, match="outside the 1 entries"):
        config_from_args(Outer, args)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _, args = _parse("--config", str(bad))
    with pytest.raises(UserError, match="cannot parse"):
        config_from_args(Outer, args)


@dataclass(frozen=True)
class Counts:
    tokens: tuple[int, ...] = ()  # tokens per run
    steps: int = 1  # steps
    cap: int | None = None  # optional cap


def test_int_flags_take_whole_numbers_in_scientific_notation(capsys):
    """`--tokens 2e5` (how budgets are written, and how the README writes them) is 200000;
    a fraction or a word is still argparse's one-line usage error, exit 2."""
    p = argparse.ArgumentParser()
    add_config_arguments(p, Counts)
    cfg = config_from_args(Counts, p.parse_args(["--tokens", "2e5", "150000", "--steps", "1e3", "--cap", "4e1"]))
    assert cfg == Counts(tokens=(200000, 150000), steps=1000, cap=40)
    assert all(type(v) is int for v in (*cfg.tokens, cfg.steps, cfg.cap))
    for bad in (["--steps", "2.5"], ["--tokens", "1e5", "3.5e0"], ["--steps", "many"], ["--steps", "inf"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(bad)
        assert e.value.code == 2
        assert "invalid int value" in capsys.readouterr().err
