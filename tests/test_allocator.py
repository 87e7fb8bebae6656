"""glibc's mmap threshold, fixed at start (gateway/runtime/allocator.py): a large block
freed goes back to the system, and the next one is mapped again rather than carved out of
the heap. Each case runs in a fresh interpreter, whose malloc has not yet moved its
threshold, and reads glibc's own accounting (mallinfo2: bytes in mapped blocks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.runtime.allocator import operator_set_threshold

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20

# Prints how many bytes of a 4 MiB block came mapped, after an 8 MiB block was freed: the
# free is what raises glibc's dynamic threshold above 4 MiB.
PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "fixed":
    from gateway.runtime.allocator import fix_mmap_threshold
    assert fix_mmap_threshold()
big = bytearray(8 << 20)
del big
before = libc.mallinfo2().hblkhd
block = bytearray(4 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


def mapped_after_a_free(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, check=True,
                         capture_output=True, text=True, timeout=60)
    return int(out.stdout)


def test_a_large_block_is_mapped_again_after_a_free() -> None:
    assert mapped_after_a_free("fixed") >= 4 * MIB


def test_without_it_the_block_comes_from_the_heap() -> None:
    """The control: glibc's default keeps the second block in the heap, which is why the
    gateway fixes the threshold (and what the test above would read without the fix)."""
    assert mapped_after_a_free("default") == 0


def test_an_operator_setting_is_left_alone() -> None:
    assert operator_set_threshold({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert operator_set_threshold({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert not operator_set_threshold({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"})
    assert not operator_set_threshold({})
