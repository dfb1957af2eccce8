"""Run untrusted Python (model-written code plus its tests) in a separate, limited process.

Every program gets its own child process; nothing is ever `exec`-ed in the harness. The
child is started with

- an empty temporary working directory (removed afterwards) holding only the program, and
  its stdout/stderr written to files there (so a flood hits the file-size limit, not the
  harness's memory);
- rlimits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS, so a 10 GB allocation fails
  with MemoryError), processes (RLIMIT_NPROC, against fork bombs), file size
  (RLIMIT_FSIZE), open files, no core dumps;
- a new session (its whole process group is killed at the end, grandchildren included) and
  a wall-clock timeout (a program sleeping or blocked on I/O uses no CPU time);
- a minimal environment (PATH, HOME=the temp dir, LANG): the harness's variables, keys and
  tokens are not inherited; Python runs isolated (`-I`: no user site, no PYTHON* variables);
- no network where the OS allows: a new network namespace (only a downed loopback), via
  unshare(2) as root or inside a new user namespace otherwise;
- when the harness runs as root: the program runs as `nobody`, so it cannot write outside
  its directory, cannot signal the harness, and RLIMIT_NPROC applies (root ignores it).

Where the OS refuses a namespace (some containers, macOS) the program still runs with the
rlimits, the timeout and the clean environment, but can reach the network: `isolation()`
says what is in force on this machine, and the harness records it in results.json. Without
root, a program runs as the harness's own user and could signal the harness by pid; run
code evaluation as root in a container (as CI does) to close that.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    """Per-program limits."""

    timeout_s: float = 10.0  # wall clock, then the process group is killed
    cpu_s: int = 10  # CPU seconds (SIGXCPU, then SIGKILL at +1 s)
    memory_mb: int = 1024  # address space; Python itself needs ~50 MB
    max_procs: int = 16  # processes/threads of the sandbox user (fork bombs)
    max_file_mb: int = 16  # largest file the program may write (stdout/stderr included)
    max_open_files: int = 64
    output_chars: int = 4000  # bytes kept of the end of stdout and of stderr


@dataclass(frozen=True)
class Result:
    passed: bool  # exit status 0 within the limits
    status: str  # "passed" | "failed" | "timeout" | "killed" (by a signal: CPU, file size, ...)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _preexec(limits: Limits, as_nobody: bool, work: str):
    """The child's set-up between fork and exec (runs in the child only)."""
    import resource

    def setup():
        os.setsid()
        libc = _libc()
        isolated = libc.unshare(CLONE_NEWNET) == 0
        if as_nobody:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        elif not isolated:
            libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)  # best effort; see isolation()
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_mb * mb, limits.max_file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_procs, limits.max_procs))
        os.chdir(work)

    return setup


def _env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": work}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: str, n: int) -> str:
    """The last n bytes of a file (tracebacks and end-of-run markers are at the end)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read(n).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _world_executable(path: str) -> bool:
    """Whether a user with no rights of its own (nobody) can run the file at `path`."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(2, len(parts)):
        d = os.sep.join(parts[:i]) or os.sep
        if not os.stat(d).st_mode & 0o001:
            return False
    return bool(os.stat(real).st_mode & 0o001)


@lru_cache(maxsize=1)
def interpreter() -> tuple[str, bool]:
    """(Python executable, whether to drop to nobody). As root we drop to nobody, which
    needs an interpreter nobody may run: ours if its path is world-executable, else the
    system's python3 (programs only need the standard library)."""
    if os.geteuid() != 0:
        return sys.executable, False
    for exe in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(exe) and _world_executable(exe):
            return exe, True
    return sys.executable, False


def run_python(source: str, limits: Limits = Limits()) -> Result:
    """Run `source` as a Python program in a fresh sandbox; never raises for what the
    program does (crash, limits, timeout): the outcome is in the Result."""
    exe, as_nobody = interpreter()
    work = tempfile.mkdtemp(prefix="qwen25-sandbox-")
    try:
        prog = os.path.join(work, "program.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(source)
        out_path, err_path = os.path.join(work, ".stdout"), os.path.join(work, ".stderr")
        if as_nobody:
            os.chown(work, NOBODY, NOBODY)
            os.chmod(work, 0o700)
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([exe, "-I", "-B", prog], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, cwd=work, env=_env(work), close_fds=True,
                                    preexec_fn=_preexec(limits, as_nobody, work))
            status = None
            try:
                rc = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                status, rc = "timeout", None
            _kill_group(proc)  # grandchildren (fork bombs, background processes) too
            if rc is None:
                rc = proc.wait()
        seconds = time.monotonic() - start
        if status is None:
            status = "passed" if rc == 0 else ("killed" if rc < 0 else "failed")
        return Result(status == "passed", status, None if status == "timeout" else rc,
                      _read(out_path, limits.output_chars), _read(err_path, limits.output_chars), seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@lru_cache(maxsize=1)
def isolation() -> dict[str, str]:
    """What the sandbox enforces on this machine (probed once with a real sandboxed run):
    {"network": "namespace" | "none", "user": "nobody" | "same-user", "python": path}."""
    probe = ("import socket\n"
             "s = socket.socket()\n"
             "s.settimeout(1)\n"
             "try:\n"
             "    s.connect(('127.0.0.1', 9))\n"
             "except OSError as e:\n"
             "    print(e.errno)\n")
    r = run_python(probe, Limits(timeout_s=10))
    # In a fresh network namespace loopback is down: ENETUNREACH (101); a normal host
    # answers port 9 with ECONNREFUSED (111).
    network = "namespace" if r.stdout.strip() == "101" else "none"
    return {"network": network, "user": "nobody" if interpreter()[1] else "same-user",
            "python": interpreter()[0]}
