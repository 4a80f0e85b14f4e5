"""gpt2x.training.peak: exact spec-sheet lookup, the matmul probe, and its cache (CPU only)."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from gpt2x.training import peak

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40", 181.05e12),
        ("NVIDIA L40S", 362.05e12),
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA GeForce RTX 4090", 165.2e12),
        ("NVIDIA GeForce RTX 3090", 71e12),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("Tesla V100-PCIE-32GB", 112e12),
        ("NVIDIA B200", 2250e12),
        ("  NVIDIA  H100 PCIe ", 756e12),  # whitespace is normalised, nothing else
    ],
)
def test_spec_peak_matches_exact_names(name, flops):
    assert peak.spec_peak_flops(name) == flops


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA A10G",  # no published datasheet number: left out, not guessed
        "NVIDIA GeForce RTX 3090 Ti",  # a different card than the 3090
        "NVIDIA GeForce RTX 4090 D",
        "NVIDIA H100",  # ambiguous without the form factor
        "NVIDIA L4X",
        "Tesla T4",
        "Intel(R) Xeon(R) Processor",
        "",
    ],
)
def test_spec_peak_unknown_is_none(name):
    assert peak.spec_peak_flops(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",
        "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
        "NVIDIA H200 MIG 7g.141gb",
    ],
)
def test_mig_slice_has_no_spec_peak(name):
    assert peak.is_mig(name)
    assert peak.spec_peak_flops(name) is None


def test_not_mig():
    assert not peak.is_mig("NVIDIA H100 80GB HBM3")
    assert not peak.is_mig("NVIDIA MIGHTY 9000")  # a word boundary, not a substring


def test_probe_on_cpu_is_positive_and_finite():
    flops = peak.measure_peak_flops(CPU, torch.float32, sizes=(64, 128), repeats=2)
    assert math.isfinite(flops) and flops > 0


def spy_mm(monkeypatch) -> list[tuple[torch.dtype, int, str]]:
    """Record (dtype, n, fp32 matmul precision) of every torch.mm the probe makes."""
    calls: list[tuple[torch.dtype, int, str]] = []
    real_mm = torch.mm

    def mm(a, b, *, out=None):
        calls.append((a.dtype, a.shape[0], torch.get_float32_matmul_precision()))
        return real_mm(a, b, out=out)

    monkeypatch.setattr(torch, "mm", mm)
    return calls


def test_bf16_probe_really_multiplies_bf16(monkeypatch):
    calls = spy_mm(monkeypatch)
    peak.measure_peak_flops(CPU, torch.bfloat16, sizes=(32, 64), repeats=2, warmup_s=0.0)
    assert len(calls) == 2 * (1 + 2)  # one warm-up call (no warm-up time) and two timed per size
    assert {dtype for dtype, _, _ in calls} == {torch.bfloat16}
    assert {n for _, n, _ in calls} == {32, 64}


def test_probe_warms_up_for_warmup_s_before_timing(monkeypatch):
    """The clocks' ramp from idle is not timed: each size runs warmup_s seconds of matmuls
    first, then the `repeats` timed calls, which alone decide the figure. A fake clock: a
    matmul takes 8 ms for the first 30 calls (idle clocks), then 1 ms (binary-exact steps)."""
    slow, fast = 2.0**-7, 2.0**-10
    clock = [0.0]
    calls = spy_mm(monkeypatch)
    spied = torch.mm

    def mm(a, b, *, out=None):
        clock[0] += slow if len(calls) < 30 else fast
        return spied(a, b, out=out)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(peak, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    flops = peak.measure_peak_flops(CPU, torch.float32, sizes=(16,), repeats=3, warmup_s=30 * slow)
    assert len(calls) == 30 + 3  # warm-up until 30 x 8 ms had passed, then 3 timed calls
    assert flops == 2 * 16**3 / fast  # a probe that timed the ramp would read 8x less


def test_fp32_probe_is_strict_fp32_and_restores_the_setting(monkeypatch):
    calls = spy_mm(monkeypatch)
    torch.set_float32_matmul_precision("high")  # as precision=tf32 leaves it
    try:
        peak.measure_peak_flops(CPU, torch.float32, sizes=(32,), repeats=1)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert calls and {p for _, _, p in calls} == {"highest"}


def test_budget_skips_a_size_that_would_overrun(monkeypatch):
    calls = spy_mm(monkeypatch)
    flops = peak.measure_peak_flops(CPU, torch.float32, sizes=(4096, 32), budget_s=0.0)
    assert {n for _, n, _ in calls} == {32}  # the smallest always runs, 4096 never starts
    assert flops > 0


@pytest.fixture
def fake_probe(monkeypatch) -> list[tuple[torch.dtype, int]]:
    """Replace the probe: returns 1e9 * threads (+1 for bf16) and records each call."""
    calls: list[tuple[torch.dtype, int]] = []

    def probe(device, dtype):
        calls.append((dtype, torch.get_num_threads()))
        return 1e9 * torch.get_num_threads() + (1.0 if dtype == torch.bfloat16 else 0.0)

    monkeypatch.setattr(peak, "measure_peak_flops", probe)
    return calls


def test_cache_round_trip_probes_once(tmp_path, fake_probe):
    path = tmp_path / "sub" / "peak_flops.json"
    first = peak.measured_peak(CPU, torch.float32, path)
    assert peak.measured_peak(CPU, torch.float32, path) == first
    assert len(fake_probe) == 1  # the second call was a cache hit
    key = peak.cache_key(CPU, torch.float32)
    assert json.loads(path.read_text()).keys() == {key, key + peak.PROBED_AT}  # + when
    assert json.loads(path.read_text())[key] == first
    assert [p.name for p in path.parent.iterdir()] == ["peak_flops.json"]  # no tmp file left
    peak.measured_peak(CPU, torch.bfloat16, path)
    assert len(fake_probe) == 2 and len(json.loads(path.read_text())) == 4  # dtype is keyed


def test_cache_key_includes_thread_count(tmp_path, fake_probe, monkeypatch):
    path = tmp_path / "peak_flops.json"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    two = peak.measured_peak(CPU, torch.float32, path)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    seven = peak.measured_peak(CPU, torch.float32, path)
    assert (two, seven) == (2e9, 7e9)
    assert fake_probe == [(torch.float32, 2), (torch.float32, 7)]
    key = peak.cache_key(CPU, torch.float32)
    assert "threads 7" in key and "float32" in key and torch.__version__ in key
    assert key.startswith(peak.cpu_model_name())


@pytest.mark.parametrize("cap", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_a_capped_cpu_instruction_set_is_probed_and_cached_apart(
    tmp_path, fake_probe, monkeypatch, cap
):
    """ONEDNN_MAX_CPU_ISA (e.g. no AMX) changes what bf16 matmuls reach: the uncapped peak must
    not be reused for it, nor its peak for the uncapped machine."""
    path = tmp_path / "peak_flops.json"
    for name in peak.CPU_ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    plain_key = peak.cache_key(CPU, torch.bfloat16)
    peak.measured_peak(CPU, torch.bfloat16, path)
    monkeypatch.setenv(cap, "AVX512_CORE_BF16")
    assert peak.cpu_isa_limits() == {cap: "AVX512_CORE_BF16"}
    capped_key = peak.cache_key(CPU, torch.bfloat16)
    assert f"{cap}=AVX512_CORE_BF16" in capped_key and capped_key != plain_key
    # and the run record says so (record.json's hardware)
    from gpt2x.training.metrics import hardware

    assert hardware(CPU, {})["cpu_isa_limits"] == {cap: "AVX512_CORE_BF16"}
    peak.measured_peak(CPU, torch.bfloat16, path)
    assert len(fake_probe) == 2  # probed again under the cap
    monkeypatch.delenv(cap)
    peak.measured_peak(CPU, torch.bfloat16, path)
    assert len(fake_probe) == 2  # the uncapped value is still the cached one
    assert hardware(CPU, {})["cpu_isa_limits"] == {}
    assert json.loads(path.read_text()).keys() >= {plain_key, capped_key}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": "fast"}', '{"KEY": -1}'])
def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, fake_probe, content):
    path = tmp_path / "peak_flops.json"
    key = peak.cache_key(CPU, torch.float32)
    path.write_text(content.replace("KEY", key))
    value = peak.measured_peak(CPU, torch.float32, path)
    assert len(fake_probe) == 1
    assert json.loads(path.read_text()).keys() == {key, key + peak.PROBED_AT}
    assert json.loads(path.read_text())[key] == value


def test_cache_write_error_never_fails_the_run(tmp_path, fake_probe, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="gpt2x.training.peak"):
        value = peak.measured_peak(CPU, torch.float32, blocker / "peak_flops.json")
    assert value == 1e9 * torch.get_num_threads()
    assert "GPT2X_CACHE" in caplog.text


def test_default_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2X_CACHE", str(tmp_path))
    assert peak.default_cache_path() == tmp_path / "peak_flops.json"
    monkeypatch.delenv("GPT2X_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert peak.default_cache_path() == tmp_path / "home" / ".cache" / "gpt2x" / "peak_flops.json"


def test_peak_record_on_cpu(tmp_path, fake_probe, caplog):
    """The record and the run's log say when the peaks were probed: a probe on a busy machine
    reads low, and MFU against it high (the same tokens/s read 9.9% or 28.1%)."""
    path = tmp_path / "peak_flops.json"
    before = time.strftime("%Y-%m-%d %H:%M")
    with caplog.at_level(logging.INFO, logger="gpt2x.training.peak"):
        rec = peak.peak_record(CPU, path)
    when = rec.pop("probed_at")
    assert rec == {
        "device_name": peak.cpu_model_name(),
        "mig": False,
        "spec_bf16": None,
        "measured_bf16": 1e9 * torch.get_num_threads() + 1.0,
        "measured_fp32": 1e9 * torch.get_num_threads(),
    }
    assert {dtype for dtype, _ in fake_probe} == {torch.bfloat16, torch.float32}
    assert when.keys() == {"bf16", "fp32"}
    assert all(before <= t <= time.strftime("%Y-%m-%d %H:%M") for t in when.values())
    assert f"probed {when['bf16']}" in caplog.text and "delete it to probe again" in caplog.text
    # a peak cached before the time was kept: said so, not guessed
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in data.items() if not k.endswith(peak.PROBED_AT)}))
    assert peak.peak_record(CPU, path)["probed_at"] == {"bf16": None, "fp32": None}


def test_cpu_model_name_falls_back_without_proc_cpuinfo(monkeypatch):
    class NoFile:
        def __init__(self, *args):
            pass

        def read_text(self):
            raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(peak, "Path", NoFile)
    monkeypatch.setattr(peak.platform, "processor", lambda: "")
    monkeypatch.setattr(peak.platform, "machine", lambda: "riscv64")
    assert peak.cpu_model_name() == "riscv64"
    monkeypatch.setattr(peak.platform, "processor", lambda: "x86_64 chip")
    assert peak.cpu_model_name() == "x86_64 chip"


def test_fp32_probe_under_the_new_precision_api():
    # Once the per-backend API is used, torch's legacy getter raises: run in a fresh process.
    code = (
        "import torch; from gpt2x.training import peak\n"
        "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'\n"
        "seen = []; real = torch.mm\n"
        "def mm(a, b, *, out=None):\n"
        "    seen.append(torch.backends.mkldnn.matmul.fp32_precision); return real(a, b, out=out)\n"
        "torch.mm = mm\n"
        "assert peak.measure_peak_flops(torch.device('cpu'), torch.float32, sizes=(32,)) > 0\n"
        "print(sorted(set(seen)), torch.backends.mkldnn.matmul.fp32_precision)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['ieee']", "bf16"]  # strict during the probe, then restored


def test_an_mfu_over_100_percent_names_the_stale_cache(caplog, monkeypatch, tmp_path):
    """A peak probed while the machine was busy reads low; a run faster than it says so."""
    from gpt2x.training.metrics import summarize_steps

    monkeypatch.setenv("GPT2X_CACHE", str(tmp_path))
    step_ms = [100.0] * 4  # 1,000 tokens per step: 10,000 tokens/s at 1e6 FLOP per token: 1e10
    with caplog.at_level(logging.WARNING, logger="gpt2x.training.metrics"):
        fine = summarize_steps(step_ms, 1000, 1e6, {"measured": 2e10}, 1, 1, False)
        assert fine.mfu_measured == pytest.approx(0.5) and not caplog.records
        stale = summarize_steps(step_ms, 1000, 1e6, {"measured": 5e9}, 1, 1, False)
    assert stale.mfu_measured == pytest.approx(2.0)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "200%" in msg and str(tmp_path / "peak_flops.json") in msg


def test_the_slow_bf16_hint_is_for_cpus_whose_bf16_is_slower():
    from gpt2x.training.precision import slow_bf16_hint

    bf16, fp32 = SimpleNamespace(dtype="bf16"), SimpleNamespace(dtype="fp32")
    slow = {"measured_bf16": 0.2e12, "measured_fp32": 0.37e12}
    fast = {"measured_bf16": 1.25e12, "measured_fp32": 0.35e12}
    assert slow_bf16_hint(bf16, CPU, slow).startswith("bf16 matmuls on this CPU reach 0.20")
    assert slow_bf16_hint(bf16, CPU, fast) is None  # AMX: bf16 is the faster one
    close = {"measured_bf16": 0.95e12, "measured_fp32": 1e12}
    assert slow_bf16_hint(bf16, CPU, close) is None  # within probe noise: no advice
    assert slow_bf16_hint(fp32, CPU, slow) is None  # already fp32
    assert slow_bf16_hint(bf16, torch.device("cuda"), slow) is None  # a GPU's peaks say nothing of it
    assert slow_bf16_hint(bf16, CPU, {"measured_bf16": None, "measured_fp32": 1.0}) is None
