"""Minor page faults of this process around a block of calls: the first-touch cost, measured.

Why: on simulated CPU devices a fresh buffer over glibc's mmap threshold is paged in from
the kernel on every call, and that cost is a term of the step time (cost/first_touch.py).
getrusage(2)'s ru_minflt counts the faults served without I/O, i.e. first touches of fresh
anonymous pages; times the page size and over the calls and local devices it gives bytes
faulted per call per device. Both `calibrate` (to price a faulted byte) and `profile` (to
check the predicted faulted bytes) read it. Process-wide, so every device of the process is
in it; where the resource module is missing (Windows) the count is None.
"""

from __future__ import annotations

import os
from typing import Any, Callable

try:
    import resource
except ImportError:  # pragma: no cover (not on POSIX)
    resource = None  # type: ignore[assignment]


def minor_faults() -> int | None:
    """Minor page faults of this process so far (None where getrusage is missing)."""
    if resource is None:
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def page_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE")) if hasattr(os, "sysconf") else 4096


def per_call_bytes(before: int | None, after: int | None, calls: int, local_devices: int) -> float | None:
    """Faulted bytes per call per device from two `minor_faults` readings."""
    if before is None or after is None or calls < 1 or local_devices < 1:
        return None
    return (after - before) * page_bytes() / calls / local_devices


def count(run: Callable[[], Any], calls: int, sync: Callable[[Any], Any], local_devices: int) -> float | None:
    """Run `run` `calls` times (each synced) and return the bytes faulted per call per device."""
    before = minor_faults()
    for _ in range(calls):
        sync(run())
    return per_call_bytes(before, minor_faults(), calls, local_devices)
