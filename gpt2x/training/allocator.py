"""Huge pages for PyTorch's CPU allocator: a measured, per-run choice (trainer.cpu_huge_pages).

With THP_MEM_ALLOC_ENABLE=1, c10's CPU allocator page-aligns every buffer of 2 MB or more and
asks Linux for transparent huge pages there (madvise). A CPU step allocates and frees hundreds
of MB (the LM head's logits and their gradients): with 4 KB pages, a page fault per 4 KB.
Measured on a 2-vCPU Xeon with AMX (benchmarks/model-cpu.md): bf16 steps 1.4x faster (compiled
and eager), fp32 steps slower and erratic (0.6-0.8x). So it is off by default (PyTorch's own
default, the lecture's) and on in +experiment=cpu_fast. The arithmetic is the same either way.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

ENV = "THP_MEM_ALLOC_ENABLE"
# over glibc's largest mmap threshold (32 MB): always its own mapping, never touched
_PROBE_BYTES = 64 << 20


def request_huge_pages(wanted: bool) -> None:
    """Ask for huge pages before this process's first CPU allocation (c10 reads ENV once, at
    that allocation). The environment, when set, wins: THP_MEM_ALLOC_ENABLE=0 keeps them off."""
    if wanted:
        os.environ.setdefault(ENV, "1")


def huge_pages_in_effect() -> bool:
    """Whether the allocator asks for huge pages: a large buffer starts on a page boundary only
    then (otherwise glibc's mapping header puts it 64 bytes into its first page)."""
    probe = torch.empty(_PROBE_BYTES, dtype=torch.uint8)
    return probe.data_ptr() % 4096 == 0


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
