"""First-touch page faults on a CPU runtime's scratch memory: a step-time term of simulated devices.

Why a term of its own: on CPU devices XLA allocates each execution's scratch as one block
(memory_analysis's temp_size) through malloc, and glibc hands a request at or above its mmap
threshold fresh pages from the kernel, which fault (trap, zero, map) the first time each page
is written, on every step. Measured on 8 simulated devices (2026-12-02, small-moe, minor faults
per step from getrusage): scratch 114 MiB -> 114 MiB faulted, 59 -> 55, 33 -> 29, but 30 ->
0.4 and 26 -> 1; the faults cost 0.6-0.7 ms of CPU per MiB, 35-40% of a data = 8 step. A
bandwidth cannot carry this: it depends on the step's scratch size, not on the bytes a kernel
moves, and it is a cliff at the threshold. Linux's demand paging: Bovet & Cesati,
"Understanding the Linux Kernel", 3rd ed., ch. 9 ("Page Fault Exception Handler").
Left to itself glibc adapts its thresholds as a process runs and trims its arenas, so a
process's history moved the count (a 26 MiB block faulted 0-13 MiB a step; wide-moe's 18 MB
block all of it in a fresh process, 2 MiB after twenty other meshes). moeplan therefore pins
both thresholds while simulated devices run (validate/host_allocator.py), which makes the
cliff below the allocator's actual rule for a process running one program; candidates
interleaved in one process can reuse each other's freed regions and fault less
(validate/host_allocator.py). `profile` counts the faults to check it.

Accelerators use pooled allocators (XLA's BFC allocator on GPU, a planned heap on TPU), so
hardware profiles without `host_memory` have no such term.
"""

from __future__ import annotations

import numpy as np

from moeplan.specs import HostMemory


def faulted_bytes(scratch: np.ndarray, host: HostMemory) -> np.ndarray:
    """Bytes per device paged in afresh every step: the whole scratch block once it reaches
    the map threshold, nothing below it (the allocator then recycles its heap)."""
    return scratch * (scratch >= host.map_threshold_bytes)
