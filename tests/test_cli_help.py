"""Every verb's --help prints and exits 0: help texts are built from config-field comments,
and argparse %-formats them, so a stray "3%" in a comment used to crash `sft --help`."""

from __future__ import annotations

import pytest

from qwen25.cli import VERBS, main


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_of_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out
