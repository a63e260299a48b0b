"""Counting the page faults of a block of calls (validate/page_faults.py)."""

from __future__ import annotations

import sys

import pytest

from moeplan.validate import page_faults

MIB = 2**20


def test_per_call_bytes_arithmetic():
    page = page_faults.page_bytes()
    assert page_faults.per_call_bytes(100, 100 + 8 * 4, calls=4, local_devices=2) == pytest.approx(4 * page)
    assert page_faults.per_call_bytes(None, 5, 1, 1) is None
    assert page_faults.per_call_bytes(1, 5, 0, 1) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the Linux kernel's minor faults")
def test_fresh_large_buffers_fault_every_call_and_reused_ones_do_not():
    # 64 MiB is over glibc's largest mmap threshold: malloc maps it afresh on every call, and
    # filling it touches every page (bytes, not numpy: numpy asks for huge pages on large arrays)
    fresh = page_faults.count(lambda: b"\x01" * (64 * MIB), calls=3, sync=lambda x: x, local_devices=1)
    assert fresh >= 0.9 * 64 * MIB
    assert page_faults.count(lambda: b"\x01" * (64 * MIB), 2, lambda x: x, local_devices=4) < 0.3 * 64 * MIB
    buf = bytearray(64 * MIB)
    buf[:] = b"\x02" * len(buf)  # touched once, then rewritten in place: no new pages
    reused = page_faults.count(lambda: buf.__setitem__(slice(0, MIB), b"\x03" * MIB), calls=3,
                               sync=lambda x: x, local_devices=1)
    assert reused < 2 * MIB
