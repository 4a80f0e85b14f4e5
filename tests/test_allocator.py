"""How a CPU run gets its memory (gpt2x/training/allocator.py). trainer.cpu_huge_pages: asked for
before the process's first CPU allocation, reported as what the run really got (record.json's
paths_taken), the environment winning. trainer.cpu_keep_freed_memory: freed large buffers are
reused instead of page-faulted afresh, reported likewise."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import REPO, TINY, compose_config, record, run_cli

RUN = [*TINY, "trainer.max_steps=1", "logger=none", "trainer.progress=log"]


def test_huge_pages_are_off_by_default_and_on_in_cpu_fast_freed_memory_kept_in_both():
    default, fast = compose_config([]).trainer, compose_config(["+experiment=cpu_fast"]).trainer
    assert default.cpu_huge_pages is False and fast.cpu_huge_pages is True
    assert default.cpu_keep_freed_memory is True and fast.cpu_keep_freed_memory is True


def test_a_run_gets_huge_pages_when_asked_and_the_environment_can_refuse(
    tmp_path, data_root, monkeypatch
):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    args = [*RUN, f"paths.data_dir={data_root}", "trainer.cpu_huge_pages=true"]
    # a process of its own: the allocator reads the setting once, at its first allocation
    run_cli(
        "gpt2x.train", *args, f"hydra.run.dir={tmp_path / 'on'}", cwd=tmp_path, new_process=True
    )
    on = record(tmp_path / "on")["paths_taken"]
    assert on["cpu_huge_pages"] is True and on["cpu_keep_freed_memory"] is True  # glibc here
    refused = run_cli(
        "gpt2x.train",
        *args,
        "trainer.cpu_keep_freed_memory=false",
        f"hydra.run.dir={tmp_path / 'off'}",
        cwd=tmp_path,
        env={"THP_MEM_ALLOC_ENABLE": "0"},
    )
    off = record(tmp_path / "off")["paths_taken"]
    assert off["cpu_huge_pages"] is False and off["cpu_keep_freed_memory"] is False
    assert (
        "cpu_huge_pages=true is not in effect: THP_MEM_ALLOC_ENABLE=0"
        in refused.stdout + refused.stderr
    )


# Steps of a training loop in miniature: a 64 MB buffer (over glibc's largest mmap threshold)
# allocated, written and freed, with small allocations between; the page faults they cost.
_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from gpt2x.training.allocator import keep_freed_memory
    print(keep_freed_memory(sys.argv[1] == "keep"))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        big = torch.ones(64 << 20, dtype=torch.uint8)
        small = torch.ones(1000)
        del big
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    """
)


def test_kept_freed_memory_is_reused_not_page_faulted_afresh():
    def faults(mode: str) -> tuple[bool, int]:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode],
            cwd=REPO,
            env={**os.environ, "THP_MEM_ALLOC_ENABLE": "0"},  # a fault per 4 KB page
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return out[0] == "True", int(out[1])

    (applied_default, default), (applied_kept, kept) = faults("default"), faults("keep")
    assert not applied_default and applied_kept
    pages = 40 * (64 << 20) // 4096
    # glibc's default: every buffer its own fresh mapping, a fault per 4 KB page
    assert default >= 0.9 * pages
    # kept: the heap grows for the first few (posix_memalign's slack does not fit the hole a
    # freed buffer leaves), then its holes are reused
    assert kept < 0.3 * pages, (kept, default)
