"""Pin glibc's allocation thresholds while simulated CPU devices run: a fixed first-touch rule.

Why: XLA's CPU runtime takes each execution's scratch block from malloc, and whether that
block is paged in afresh every step (cost/first_touch.py) is glibc's decision. By default
glibc adapts two thresholds as a process runs (mallopt(3), "M_MMAP_THRESHOLD": each freed
mapped block raises the map threshold to its size, and the trim threshold to twice that),
and a thread arena hands the top of its heap back to the kernel once the free top exceeds
the trim threshold. So the same step faulted its whole scratch or none of it depending on
what ran before: measured 2026-12-02 (8 simulated devices, fresh process), wide-moe
data=1,expert=8 with an 18 MB scratch faulted 17 MiB per device per step (66 ms of kernel
time, a step 15% slower than its neighbours), but only 2 MiB after twenty other meshes.

Setting both thresholds explicitly turns the adaptation off (glibc malloc.c,
`mp_.no_dyn_threshold`): blocks at or over the map threshold are mapped, and faulted, on
every call; smaller ones come from arenas that are never trimmed, so they stay paged in.
That is exactly the rule `first_touch.faulted_bytes` prices, for every step in every
process history. The map threshold is glibc's largest allowed value (HEAP_MAX_SIZE / 2 =
32 MiB on 64-bit), the same default `HostMemory.map_threshold_bytes` carries.

Only the process that runs simulated devices is pinned (profile, calibrate, regress, their
child processes). Where glibc is missing (macOS, musl) nothing changes and `pin` says so.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # mallopt(3) parameter numbers, glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: the largest, so no arena is ever trimmed

_pinned: bool | None = None


def _libc() -> ctypes.CDLL | None:
    """This process's C library, if it is glibc (the symbols of the running process)."""
    try:
        lib = ctypes.CDLL(None)
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "gnu_get_libc_version") else None


def pin() -> bool:
    """Fix glibc's map and trim thresholds for the rest of this process (once); True if set."""
    global _pinned
    if _pinned is None:
        lib = _libc()
        _pinned = bool(
            lib is not None
            and lib.mallopt(M_MMAP_THRESHOLD, MAP_THRESHOLD_BYTES)
            and lib.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    return _pinned


def pinned() -> bool:
    """Whether `pin` has fixed the thresholds in this process."""
    return bool(_pinned)
