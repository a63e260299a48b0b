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
`mp_.no_dyn_threshold`), and setting both to 32 MiB makes the rule a cliff: a free arena top
of 32 MiB or more goes back to the kernel, so a block at or over 32 MiB finds no free region
and is mapped (or its heap regrown) and paged in on every call, while a smaller block is
recycled from its arena and stays paged in. That is the rule `first_touch.faulted_bytes`
prices. Measured with it (8 simulated devices, faults per device per step against XLA's
temp_size, each mesh timed alone): small-moe 114.1 for 114, 67 for 67, 59.4 for 59, 35.4 for
34-39 MiB, and 0-1 MiB for blocks under 32 MiB (wide-moe's 18 MB included). Two things glibc
does not let a setting change, and why the rule is a cliff and not "nothing faults": a
thread arena's heap holds at most 64 MiB (HEAP_MAX_SIZE), so a larger block in a thread is
always mapped afresh (sysmalloc falls back to mmap whatever M_MMAP_MAX says), and keeping
every arena top (no trim) let blocks between 32 and 64 MiB reuse a free region in some runs
and not in others. The map threshold is glibc's largest allowed value (HEAP_MAX_SIZE / 2 =
32 MiB on 64-bit), the same default `HostMemory.map_threshold_bytes` carries.

What the pin cannot fix: a request is served from any free chunk of its size before glibc
considers mapping (malloc.c, _int_malloc before sysmalloc), and chunks freed next to each
other coalesce. A process that runs one program (a training job, a candidate timed alone)
has no free region that large, so the cliff holds there; candidates interleaved in one
process (`profile --rounds`) free scratch blocks beside each other, and a block between 32
and 64 MiB may then land in such a region and keep its pages. Measured 2026-12-02 (AMD EPYC
host, 8 simulated devices): small-moe data=2,expert=4 (35.4 MiB of scratch) faulted 35.4 MiB
per step timed alone and 19.9 in the benchmark's rounds (`profile --isolate` gives each
candidate a process of its own, validate/isolated.py). Routing every thread to the main
arena with mapping off (M_ARENA_MAX = 1, M_MMAP_MAX = 0, no trim) did stop every fault, but
the one arena lock made tiny-moe data=1,expert=8 25-30% slower (33 -> 42 ms), so it is not
used: it trades a predictable cost for an unmodelled one.

Every `moeplan` command pins its process at start-up (cli.py), and the processes that run
simulated devices (profile, calibrate, regress, their child processes) pin themselves. The
planner needs it too: it scores plans in blocks of numpy arrays of a few hundred KiB, and with
the adaptive thresholds glibc handed their freed heap top back and paged it in again for the
next block; scoring 10^6 plans (benchmarks/bench_search.py, deepseek-v3 on 65,536 v5p chips)
took 0.62 s unpinned and 0.34 s pinned (2026-12-02, 2-core AMD host). Where glibc is missing
(macOS, musl) nothing changes and `pin` says so.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # mallopt(3) parameter numbers, glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_BYTES = MAP_THRESHOLD_BYTES  # a free top this large goes back to the kernel

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
