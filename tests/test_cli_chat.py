"""`qwen25 generate` and `qwen25 chat` driven as a user would: through a pipe and a pty.

The model is tiny and random, so the text is noise; what is checked is the commands,
streaming, Ctrl-C stopping only the reply, and clean errors.
"""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from qwen25 import build_model, load_tokenizer, save_model
from qwen25.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-model")
    save_model(build_model(ModelConfig.preset("tiny"), seed=0), path,
               generation_config={"eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.7,
                                  "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05})
    load_tokenizer("qwen2.5").save_pretrained(path)
    return path


def qwen25(*args, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen25", *map(str, args)], input=stdin, text=True,
                          capture_output=True, cwd=ROOT, timeout=timeout)


def test_generate_streams_a_completion(model_dir):
    out = qwen25("generate", model_dir, "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0",
                 "--stop", "never-in-noise")
    assert out.returncode == 0, out.stderr
    assert "[5 tokens" in out.stderr or "finish: stop" in out.stderr
    chat = qwen25("generate", model_dir, "--prompt", "Hi", "--chat", "--system", "Be brief.",
                  "--max-new-tokens", "4", "--seed", "1")
    assert chat.returncode == 0, chat.stderr


def test_chat_commands_through_a_pipe(model_dir):
    script = "/help\nhello there\n/system You are terse.\nhi\n/reset\n/unknown\nagain\n/exit\n"
    out = qwen25("chat", model_dir, "--max-new-tokens", "4", stdin=script)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "temperature': 0.7" in text and "top_k': 20" in text  # generation_config defaults
    assert "[system message set; conversation reset]" in text
    assert "[conversation reset]" in text and "[unknown command /unknown" in text
    assert out.stderr == ""


def test_chat_ends_at_end_of_input(model_dir):
    out = qwen25("chat", model_dir, "--max-new-tokens", "2", stdin="hello\n")
    assert out.returncode == 0 and out.stderr == ""


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf, end = b"", time.time() + timeout
    while needle not in buf:
        left = end - time.time()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {buf[-400:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_not_the_program(model_dir):
    pid, fd = pty.fork()
    if pid == 0:  # child: the chat in a terminal, with a reply long enough to interrupt
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "qwen25", "chat", str(model_dir), "--max-seq-len",
                                  "8192", "--max-new-tokens", "8000", "--temperature", "1", "--top-k", "0",
                                  "--top-p", "1", "--repetition-penalty", "1"])
    try:
        read_until(fd, b">>> ", 120)
        os.write(fd, b"tell me a long story\n")
        read_until(fd, b"story", 30)  # the echo; the reply streams after it
        time.sleep(1.5)
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the chat
        after = read_until(fd, b">>> ", 60)
        assert b"[stopped]" in after
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_bad_model_path_is_one_line_exit_2(tmp_path):
    out = qwen25("chat", tmp_path / "missing")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "error:" in out.stderr
    out = qwen25("generate", tmp_path / "missing", "--prompt", "x")
    assert out.returncode == 2 and "error:" in out.stderr
