"""The pinned host allocator (validate/host_allocator.py): the rule first_touch prices, held."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moeplan.validate import host_allocator

MIB = 2**20

# In a fresh interpreter and a worker thread (XLA runs each device's step on a pool thread,
# whose allocations come from a thread arena): malloc a block, write every byte, free it,
# and count the faults of each round after the first.
ROUNDS = """
import ctypes, sys, threading
from moeplan.validate import host_allocator, page_faults
MIB = 2**20
print(host_allocator.pin())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
out = []
def rounds(size):
    counts = []
    for _ in range(4):
        before = page_faults.minor_faults()
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
        counts.append(page_faults.per_call_bytes(before, page_faults.minor_faults(), 1, 1))
    out.append(max(counts[1:]) if size < host_allocator.MAP_THRESHOLD_BYTES else min(counts[1:]))
def after_a_freed_pair(size):
    # two 24 MiB blocks freed together leave a 48 MiB free region at the arena's top: kept, a
    # 40 MiB block would reuse it; handed back (the trim threshold), it is paged in afresh
    a, b = libc.malloc(24 * MIB), libc.malloc(24 * MIB)
    ctypes.memset(a, 1, 24 * MIB); ctypes.memset(b, 1, 24 * MIB)
    libc.free(b); libc.free(a)
    before = page_faults.minor_faults()
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    out.append(page_faults.per_call_bytes(before, page_faults.minor_faults(), 1, 1))
def work():
    for mib in (16, 24, 48):
        rounds(mib * MIB)
    after_a_freed_pair(40 * MIB)
t = threading.Thread(target=work)
t.start(); t.join()
print(*out)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and the Linux kernel's fault counter")
def test_pinned_allocator_maps_big_blocks_every_time_and_keeps_smaller_ones():
    out = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True, check=True)
    pinned, counts = out.stdout.split("\n", 1)
    assert pinned == "True"
    small16, small24, big48, big40 = (float(x) for x in counts.split())
    # under the 32 MiB map threshold: recycled from the thread's arena, never paged in again
    assert small16 < 1 * MIB
    assert small24 < 1 * MIB
    # at or over it: mapped afresh and paged in on every round (what first_touch prices)
    assert big48 >= 0.95 * 48 * MIB
    assert big40 >= 0.95 * 40 * MIB  # even where a free region that large had just been made


def test_pin_is_idempotent_and_reported():
    first = host_allocator.pin()
    assert host_allocator.pin() is first
    assert host_allocator.pinned() is first
    if sys.platform.startswith("linux"):
        assert first  # glibc is the C library of every Linux host this suite runs on
