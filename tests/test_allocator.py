"""trainer.cpu_huge_pages: asked for before the process's first CPU allocation, reported as what
the run really got (record.json's paths_taken), the environment winning."""

from __future__ import annotations

from conftest import TINY, compose_config, record, run_cli

RUN = [*TINY, "trainer.max_steps=1", "logger=none", "trainer.progress=log"]


def test_huge_pages_are_off_by_default_and_on_in_cpu_fast():
    assert compose_config([]).trainer.cpu_huge_pages is False
    assert compose_config(["+experiment=cpu_fast"]).trainer.cpu_huge_pages is True


def test_a_run_gets_huge_pages_when_asked_and_the_environment_can_refuse(
    tmp_path, data_root, monkeypatch
):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    args = [*RUN, f"paths.data_dir={data_root}", "trainer.cpu_huge_pages=true"]
    # a process of its own: the allocator reads the setting once, at its first allocation
    run_cli("gpt2x.train", *args, f"hydra.run.dir={tmp_path / 'on'}", cwd=tmp_path, new_process=True)
    assert record(tmp_path / "on")["paths_taken"]["cpu_huge_pages"] is True
    refused = run_cli(
        "gpt2x.train",
        *args,
        f"hydra.run.dir={tmp_path / 'off'}",
        cwd=tmp_path,
        env={"THP_MEM_ALLOC_ENABLE": "0"},
    )
    assert record(tmp_path / "off")["paths_taken"]["cpu_huge_pages"] is False
    assert "cpu_huge_pages=true is not in effect: THP_MEM_ALLOC_ENABLE=0" in refused.stdout + refused.stderr
