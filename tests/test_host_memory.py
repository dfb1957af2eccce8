"""The CPU trainer's malloc setting: a step's large arrays, freed and allocated again by the next
step, reuse their pages instead of faulting in fresh ones.

Each measurement runs in a fresh interpreter, so the heap's state does not depend on the tests
that ran before on the same worker, and the reference (glibc's defaults) runs in a process where
the setting was never applied. What is compared is glibc's own account (`mallinfo2`: bytes held
in separate mmaps while a step's arrays are alive), because page-fault counts depend on the
kernel: under the full suite a default-settings step once faulted 2,712 times instead of ~78k
(transparent huge pages count 512 pages as one fault), so faults only bound the setting's side."""

import json
import resource
import subprocess
import sys
import textwrap

import pytest

SIZES_MB = (64, 16, 128, 8, 64)  # a micro-batch's activations / logits / gradients, in miniature
MMAP_MAX_MB = 32  # glibc's largest dynamic mmap threshold on 64-bit: bigger arrays are always mmapped by default

_MEASURE = textwrap.dedent("""
    import ctypes, json, resource, sys, torch
    from qwen25.host_memory import keep_freed_memory
    class Mallinfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    if sys.argv[1] == "setting" and not keep_freed_memory():
        sys.exit("keep_freed_memory() was not applied")
    def step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        arrays = [torch.ones(n << 20, dtype=torch.uint8) for n in SIZES_MB]  # every page touched
        copy = arrays[0][: 32 << 20].clone()
        live_mmapped = libc.mallinfo2().hblkhd
        del arrays, copy
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, live_mmapped
    for _ in range(3):  # warm-up: the heap grows to the step's peak once
        step()
    faults, live = step()
    print(json.dumps({"faults": faults, "live_mmapped": live, "freed_mmapped": libc.mallinfo2().hblkhd}))
""")


def _step(mode: str) -> dict:
    script = f"SIZES_MB = {SIZES_MB!r}\n" + _MEASURE
    done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_repeated_steps_reuse_freed_pages():
    pages = (sum(SIZES_MB) + 32) * (1 << 20) // resource.getpagesize()
    big = sum(n for n in SIZES_MB if n > MMAP_MAX_MB) << 20
    default, setting = _step("default"), _step("setting")
    # glibc's defaults: each large array is its own mmap, unmapped on free (its pages go back to
    # the OS and the next step faults them in again: measured ~97% of `pages` on this host)
    assert default["live_mmapped"] - default["freed_mmapped"] >= big, default
    # the setting: no array of the step is mmapped (what is, was mapped at import, before the
    # setting), and the heap keeps its pages (measured 0 or 8,192 faults: the copy's 32 MB)
    assert setting["live_mmapped"] == setting["freed_mmapped"], setting
    assert setting["faults"] < pages // 4, setting
