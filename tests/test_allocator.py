"""engine.tune_cpu_allocator: large CPU tensors come from glibc's heap, not a fresh mmap each time.

Oracle: glibc's own mallinfo2() count of mmapped blocks (hblks) while a 24 MiB tensor is alive, in a fresh
interpreter per case (a malloc policy is per process)."""
import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import ctypes, torch
from wmdd import engine
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
note = engine.tune_cpu_allocator()
before = libc.mallinfo2().hblks
x = torch.empty(24 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblks - before)
print(note)
"""


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2")
    except OSError:
        return False


def probe(**env_extra):
    env = {k: v for k, v in os.environ.items() if k != "WMDD_MALLOC" and not k.startswith("MALLOC_")}
    env.update(env_extra, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    mmapped, note = out.stdout.strip().splitlines()[-2:]
    return int(mmapped), note


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc >= 2.33 only")
def test_tuned_allocator_serves_large_tensors_from_the_heap_and_respects_the_users_choice():
    mmapped, note = probe()
    assert mmapped == 0 and note.startswith("glibc malloc: mmap threshold 32 MiB")
    for opt_out in ({"WMDD_MALLOC": "default"}, {"MALLOC_TOP_PAD_": "0"}):
        mmapped, note = probe(**opt_out)
        assert mmapped == 1, opt_out  # glibc's own policy: a fresh mmap for the 24 MiB block
        assert note.startswith("as configured by the user"), note
