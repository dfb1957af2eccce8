"""The code sandbox against hostile programs: each one fails within its limits, the harness
keeps going, and nothing outside the sandbox directory changes."""

from __future__ import annotations

import ast
import os
import time

import pytest

from qwen25.eval.sandbox import Limits, isolation, run_python

LIMITS = Limits(timeout_s=3, cpu_s=2, memory_mb=512, max_procs=16, max_file_mb=4)

HOSTILE = {
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "infinite_loop": "while True:\n    pass\n",
    "sleep_forever": "import time\ntime.sleep(3600)\n",
    "alloc_10gb": "x = bytearray(10 * 1024 ** 3)\nprint(len(x))\n",
    "stdout_flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(60)\n",
    "exit_nonzero": "raise SystemExit(3)\n",
    "background_child": ("import os, time\nif os.fork() == 0:\n    time.sleep(3600)\n"
                         "raise SystemExit(1)\n"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_fails_within_limits(name):
    start = time.monotonic()
    r = run_python(HOSTILE[name], LIMITS)
    assert not r.passed, (name, r)
    assert time.monotonic() - start < LIMITS.timeout_s + 10
    assert os.getppid() > 1  # we are alive and still have our parent


def test_write_outside_its_directory_changes_nothing(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("original")
    os.chmod(tmp_path, 0o755)
    prog = (f"import pathlib\np = pathlib.Path({str(target)!r})\np.write_text('pwned')\n"
            f"pathlib.Path({str(tmp_path / 'new.txt')!r}).write_text('new')\n")
    r = run_python(prog, LIMITS)
    if isolation()["user"] != "nobody":
        pytest.skip("the sandbox runs as the harness's own user here; file permissions "
                    "are what stops writes outside its directory only when run as root")
    assert not r.passed
    assert target.read_text() == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_socket_cannot_reach_the_network():
    prog = ("import socket\ns = socket.create_connection(('127.0.0.1', 9), timeout=2)\n")
    r = run_python(prog, LIMITS)
    assert not r.passed
    if isolation()["network"] == "namespace":
        assert "unreachable" in r.stderr.lower(), r.stderr


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("QWEN25_SECRET_TOKEN", "hunter2")
    r = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('QWEN25_SECRET_TOKEN'))\n", LIMITS)
    assert r.passed, r
    assert "hunter2" not in r.stdout
    assert "QWEN25_SECRET_TOKEN" not in r.stdout


def test_working_directory_is_empty_and_removed():
    r = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\n", LIMITS)
    assert r.passed, r
    cwd, listing = r.stdout.splitlines()
    assert ast.literal_eval(listing) == [".stderr", ".stdout", "program.py"]
    assert not os.path.exists(cwd)


def test_a_correct_program_passes_after_hostile_ones():
    run_python(HOSTILE["fork_bomb"], LIMITS)
    r = run_python("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('ok')\n", LIMITS)
    assert r.passed and r.stdout.strip() == "ok", r
