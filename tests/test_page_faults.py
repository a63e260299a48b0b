"""Counting the page faults of a block of calls (validate/page_faults.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moeplan.validate import page_faults

MIB = 2**20


def test_per_call_bytes_arithmetic():
    page = page_faults.page_bytes()
    assert page_faults.per_call_bytes(100, 100 + 8 * 4, calls=4, local_devices=2) == pytest.approx(4 * page)
    assert page_faults.per_call_bytes(None, 5, 1, 1) is None
    assert page_faults.per_call_bytes(1, 5, 0, 1) is None


FRESH = """
from moeplan.validate import page_faults
MIB = 2**20
print(page_faults.count(lambda: b"\\x01" * (64 * MIB), calls=3, sync=lambda x: x, local_devices=1))
print(page_faults.count(lambda: b"\\x01" * (64 * MIB), calls=2, sync=lambda x: x, local_devices=4))
buf = bytearray(64 * MIB)
buf[:] = b"\\x02" * len(buf)
print(page_faults.count(lambda: buf.__setitem__(slice(0, MIB), b"\\x03" * MIB), calls=3, sync=lambda x: x,
                        local_devices=1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the Linux kernel's minor faults")
def test_fresh_large_buffers_fault_every_call_and_reused_ones_do_not():
    # In a fresh interpreter (a long test session's heap may hold a free 64 MiB region, which
    # malloc then reuses instead of mapping): 64 MiB is over glibc's largest mmap threshold, so
    # malloc maps it afresh on every call, and filling it touches every page (bytes, not numpy:
    # numpy asks for huge pages on large arrays). A buffer rewritten in place faults nothing new.
    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, check=True)
    fresh, per_device, reused = (float(x) for x in out.stdout.split())
    assert fresh >= 0.9 * 64 * MIB
    assert per_device == pytest.approx(fresh / 4, rel=0.1)  # the same pages, over 4 local devices
    assert reused < 2 * MIB
