"""How a CPU run gets its memory: freed buffers kept for reuse (trainer.cpu_keep_freed_memory,
on by default) and huge pages (trainer.cpu_huge_pages, off by default). Neither changes any
arithmetic; the run record says what the run really got (paths_taken).

Keeping freed memory: PyTorch's CPU allocator calls malloc/free, and glibc gives every buffer
over its mmap threshold (at most 32 MB: the LM head's logits and gradients, the tied embedding's
gradient) a mapping of its own and hands it back to the OS when it is freed, so the next step's
buffer of the same size page-faults again, every 4 KB. With mmap off and trimming at its
highest, glibc keeps freed memory in its heap and the next step reuses it (what CUDA's caching
allocator does on a GPU; jemalloc/tcmalloc do it for CPU training). Measured on a 2-vCPU Xeon
with AMX (benchmarks/model-cpu.md): the default run (fp32, eager) 1.4x faster, bf16 compiled
steps 1.1-1.3x. The cost: the process's memory stays at its peak instead of shrinking.

Huge pages: with THP_MEM_ALLOC_ENABLE=1, c10's CPU allocator page-aligns every buffer and asks
Linux for transparent huge pages (madvise) for those of 2 MB and more: fewer, larger page faults.
On top of kept freed memory, measured 1.10x faster bf16 steps and 1.04x fp32 ones (without it,
fp32 steps were 0.77x and erratic). Off by default: c10 reads the setting once, at the
process's first allocation, so it must come before anything else allocates; on in
+experiment=cpu_fast.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)

ENV = "THP_MEM_ALLOC_ENABLE"
# mallopt's parameters (glibc's malloc.h) and the highest trim threshold it takes (an int)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_INT_MAX = 2**31 - 1
# huge pages: c10 then aligns every buffer to a page (4 KB; otherwise to 64 bytes) and asks for
# huge pages for those of 2 MB and more
_PROBE_BYTES, _PAGE, _PROBES = 4 << 20, 4096, 4


def request_huge_pages(wanted: bool) -> None:
    """Ask for huge pages before this process's first CPU allocation (c10 reads ENV once, at
    that allocation). The environment, when set, wins: THP_MEM_ALLOC_ENABLE=0 keeps them off."""
    if wanted:
        os.environ.setdefault(ENV, "1")


def huge_pages_in_effect() -> bool:
    """Whether the allocator asks for huge pages: large buffers start on a page boundary only
    then. Otherwise a buffer in its own mapping never does, one from the heap (freed memory
    kept) once in 64: four at once, once in 17 million."""
    probes = [torch.empty(_PROBE_BYTES, dtype=torch.uint8) for _ in range(_PROBES)]
    return all(p.data_ptr() % _PAGE == 0 for p in probes)


def check_huge_pages(wanted: bool) -> bool:
    """What the run really got; a request that came too late (this process allocated before)
    or was overridden by the environment is said once."""
    got = huge_pages_in_effect()
    if wanted and not got:
        log.warning(
            "trainer.cpu_huge_pages=true is not in effect: %s",
            f"{ENV}={os.environ[ENV]} in the environment"
            if os.environ.get(ENV) not in (None, "1")
            else f"this process allocated before it was asked; set {ENV}=1 before python starts",
        )
    return got


def keep_freed_memory(wanted: bool) -> bool:
    """glibc keeps freed memory for reuse from now on: no mapping of its own for a large buffer
    (M_MMAP_MAX 0), no heap trimming below 2 GB free (M_TRIM_THRESHOLD). Takes effect at once,
    for the buffers allocated after it. Returns whether it is in effect: False when not wanted
    or without glibc's mallopt (macOS, musl: PyTorch's default behaviour stays)."""
    if not wanted:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc returns 1 on success; musl's stub returns 0 and does nothing
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
