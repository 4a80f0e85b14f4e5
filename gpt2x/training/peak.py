"""Peak FLOP/s for MFU: the vendor's spec-sheet number and a measured matmul peak.

The spec peak is the datasheet's dense bf16 tensor FLOP/s, looked up by the exact
`torch.cuda.get_device_name()` string (a substring match confuses L4 with L40 and gives a MIG
slice the whole GPU). The measured peak is the best square-matmul throughput this machine
reaches, probed once and cached per (device, dtype, torch version, thread count, CPU
instruction-set caps such as ONEDNN_MAX_CPU_ISA); it exists on
every device, the CPU and MIG slices included, and is what the hardware really sustains. A
probe on a busy machine reads low (and MFU against it high), so when it was probed is kept with
it, said at the start of a run and recorded (`probed_at`); delete the cache to probe again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Peak DENSE bf16 tensor FLOP/s (datasheets quote "with sparsity" numbers at 2x: halved here),
# matched with re.fullmatch against the device name. Only datasheet numbers; a device whose
# number is not published (e.g. AWS's A10G) is left out rather than guessed.
SPEC_PEAK_BF16: list[tuple[str, float]] = [
    # NVIDIA H100 datasheet: SXM 1,979 / PCIe 1,513 / NVL 1,671 TFLOPS bf16 with sparsity
    (r"NVIDIA H100 80GB HBM3", 989e12),
    (r"NVIDIA H100 PCIe", 756e12),
    (r"NVIDIA H100 NVL", 835e12),
    # NVIDIA H200 datasheet: SXM 1,979 / NVL 1,671 TFLOPS with sparsity
    (r"NVIDIA H200", 989e12),
    (r"NVIDIA H200 NVL", 835e12),
    # NVIDIA GH200 datasheet: 1,979 TFLOPS with sparsity (HBM3 "480GB" and HBM3e "144G" parts)
    (r"NVIDIA GH200( \d+GB?)?( HBM3e?)?", 989e12),
    # NVIDIA HGX B200 datasheet: 18 PFLOPS dense bf16 for 8 GPUs
    (r"NVIDIA B200", 2250e12),
    # NVIDIA A100 datasheet: 312 TFLOPS bf16 (624 with sparsity), SXM and PCIe, 40 and 80 GB
    (r"NVIDIA A100-SXM4-(40|80)GB", 312e12),
    (r"NVIDIA A100-PCIE-40GB", 312e12),
    (r"NVIDIA A100 80GB PCIe", 312e12),
    # NVIDIA A10 datasheet: 125 TFLOPS bf16 (250 with sparsity)
    (r"NVIDIA A10", 125e12),
    # NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity
    (r"NVIDIA L4", 121e12),
    # NVIDIA L40S datasheet: 362.05 TFLOPS bf16 (733 with sparsity); L40: 181.05 (362.1)
    (r"NVIDIA L40S", 362.05e12),
    (r"NVIDIA L40", 181.05e12),
    # NVIDIA Ada whitepaper, RTX 4090: 165.2 TFLOPS bf16 with fp32 accumulate (330.4 sparse)
    (r"NVIDIA GeForce RTX 4090", 165.2e12),
    # NVIDIA Ampere GA102 whitepaper, RTX 3090: 71 TFLOPS bf16 with fp32 accumulate (142 sparse)
    (r"NVIDIA GeForce RTX 3090", 71e12),
    # NVIDIA V100 datasheet: fp16 tensor cores (V100 has no bf16): SXM2 125, PCIe 112, V100S 130
    (r"(Tesla|NVIDIA) V100-SXM2-(16|32)GB", 125e12),
    (r"(Tesla|NVIDIA) V100-PCIE-(16|32)GB", 112e12),
    (r"(Tesla|NVIDIA) V100S-PCIE-32GB", 130e12),
]


def _normalise(name: str) -> str:
    return " ".join(name.split())


def is_mig(device_name: str) -> bool:
    """A MIG slice, e.g. "NVIDIA A100-SXM4-40GB MIG 1g.5gb" (a fraction of the GPU's SMs)."""
    return re.search(r"\bMIG\b", device_name) is not None


def spec_peak_flops(device_name: str) -> float | None:
    """Datasheet dense bf16 FLOP/s for this exact device name; None if unlisted or a MIG slice."""
    name = _normalise(device_name)
    if is_mig(name):
        return None  # a slice has a fraction of the SMs: only the measured peak covers it
    for pattern, flops in SPEC_PEAK_BF16:
        if re.fullmatch(pattern, name, flags=re.IGNORECASE):
            return flops
    return None


def cpu_model_name() -> str:
    """The CPU's marketing name ("model name" in /proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


# Environment variables that cap the instruction set of the CPU's kernels: oneDNN's (bf16
# matmuls: AMX or not), ATen's and inductor's vector code, MKL's (fp32 matmuls). Set, they change
# what the machine reaches, so they key the cached peak and are recorded with the hardware.
CPU_ISA_LIMITS = (
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",  # oneDNN's older name for the same cap
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
)


def cpu_isa_limits() -> dict[str, str]:
    """The CPU instruction-set caps this process runs under (empty: none, the usual case)."""
    return {name: os.environ[name] for name in CPU_ISA_LIMITS if os.environ.get(name)}


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name() if device.type == "cpu" else f"{device.type} ({cpu_model_name()})"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def _ieee_fp32() -> Iterator[None]:
    """Strict fp32 matmuls for the probe (TF32 would make "fp32" a tensor-core number)."""
    try:
        previous = torch.get_float32_matmul_precision()
    except RuntimeError:  # the new per-backend API is in use: the legacy getter refuses
        backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
        saved = [b.fp32_precision for b in backends]
        try:
            for b in backends:
                b.fp32_precision = "ieee"
            yield
        finally:
            for b, p in zip(backends, saved):
                b.fp32_precision = p
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def measure_peak_flops(
    device: torch.device,
    dtype: torch.dtype,
    sizes: Sequence[int] | None = None,
    repeats: int | None = None,
    budget_s: float | None = None,
    warmup_s: float | None = None,
) -> float:
    """Best FLOP/s of square n x n matmuls over `sizes` (median of `repeats` timed calls each).

    Each size is first multiplied for `warmup_s` seconds (at least once): a GPU starts from
    idle clocks (an H200 read 345 MHz idle, 1980 MHz under load) and one warm-up call would time
    the clock ramp, not the peak. The default sizes reach the throughput plateau: 1024 and 2048
    on a CPU, 4096 and 8192 on CUDA. A size whose estimated cost (from the previous size, at n^3)
    would overrun `budget_s` is skipped, so a slow CPU stays at a few seconds. fp32 is measured
    strictly (no TF32).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if sizes is None:
        sizes = (4096, 8192) if cuda else (1024, 2048)
    repeats = repeats if repeats is not None else (10 if cuda else 3)
    budget_s = budget_s if budget_s is not None else (6.0 if cuda else 2.5)
    warmup_s = warmup_s if warmup_s is not None else (1.0 if cuda else 0.1)
    inner = 10 if cuda else 1  # several launches per sync on a GPU
    best, spent, call_s, prev_n = 0.0, 0.0, 0.0, 0
    with _ieee_fp32():
        for n in sorted(sizes):
            estimate = call_s * (n / prev_n) ** 3 * (1 + repeats) * inner + warmup_s if prev_n else 0
            if estimate > budget_s - spent:
                break
            begin = time.perf_counter()
            abo = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
            abo.append(torch.empty(n, n, device=device, dtype=dtype))
            warm = time.perf_counter()
            _mm_seconds(*abo, inner, device)  # kernels, caches
            while time.perf_counter() - warm < warmup_s:  # clocks up to their sustained rate
                _mm_seconds(*abo, inner, device)
            timed = [_mm_seconds(*abo, inner, device) for _ in range(repeats)]
            call_s, prev_n = statistics.median(timed), n
            best = max(best, 2 * n**3 / call_s)
            spent += time.perf_counter() - begin
            del abo
    return best


def _mm_seconds(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, inner: int, device: torch.device
) -> float:
    """Seconds per matmul over `inner` back-to-back launches, synchronized around them."""
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        torch.mm(a, b, out=out)
    _synchronize(device)
    return (time.perf_counter() - start) / inner


def default_cache_path() -> Path:
    root = os.environ.get("GPT2X_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "gpt2x"
    return base / "peak_flops.json"


# 2: warmed up for warmup_s seconds before timing (1: one warm-up call); older entries are not reused
PROBE_VERSION = 2
PROBED_AT = " | probed_at"  # <cache key> + this: when that peak was probed (seconds since epoch)


def cache_key(device: torch.device, dtype: torch.dtype) -> str:
    """What the measured peak depends on: the device, dtype, torch build, CPU thread count, the
    CPU's instruction-set caps when set, and how it was probed."""
    dtype_name = str(dtype).removeprefix("torch.")
    isa = "".join(f" | {k}={v}" for k, v in cpu_isa_limits().items())
    return (
        f"{device_name(device)} | {dtype_name} | torch {torch.__version__}"
        f" | threads {torch.get_num_threads()}{isa} | probe {PROBE_VERSION}"
    )


def _read_cache(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or corrupt: measure again and rewrite it
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        k: float(v)
        for k, v in data.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    }


def _write_cache(path: Path, entries: dict[str, float]) -> None:
    """Atomic write (tmp file + os.replace) so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def measured_peak(
    device: torch.device, dtype: torch.dtype, cache_path: str | os.PathLike | None = None
) -> float:
    """The measured matmul peak, probed once per machine and cached in a JSON file.

    Default cache: $GPT2X_CACHE/peak_flops.json, else ~/.cache/gpt2x/peak_flops.json. A cache
    that cannot be written is logged and the measured value is still returned.
    """
    device = torch.device(device)
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    key = cache_key(device, dtype)
    entries = _read_cache(path)
    if key in entries:
        return entries[key]
    flops = measure_peak_flops(device, dtype)
    entries[key] = flops
    entries[key + PROBED_AT] = time.time()
    try:
        _write_cache(path, entries)
    except OSError as err:
        log.warning("could not write the peak-FLOP/s cache %s (%s); set GPT2X_CACHE", path, err)
    return flops


def probed_at(
    device: torch.device, dtype: torch.dtype, cache_path: str | os.PathLike | None = None
) -> str | None:
    """When the cached peak of (device, dtype) was probed (local time), None if not recorded."""
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    when = _read_cache(path).get(cache_key(torch.device(device), dtype) + PROBED_AT)
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if when else None


def peak_record(device: torch.device, cache_path: str | os.PathLike | None = None) -> dict:
    """The peaks for the run record: spec bf16 (None if unknown), measured bf16 / fp32 and when
    each was probed (logged: MFU against a peak probed on a busy machine reads high)."""
    device = torch.device(device)
    name = device_name(device)
    rec = {
        "device_name": name,
        "mig": is_mig(name),
        "spec_bf16": spec_peak_flops(name) if device.type == "cuda" else None,
        "measured_bf16": measured_peak(device, torch.bfloat16, cache_path),
        "measured_fp32": measured_peak(device, torch.float32, cache_path),
        "probed_at": {
            "bf16": probed_at(device, torch.bfloat16, cache_path),
            "fp32": probed_at(device, torch.float32, cache_path),
        },
    }
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    log.info(
        "measured matmul peak (for mfu(measured)): bf16 %.1f / fp32 %.1f TFLOP/s, probed %s "
        "(%s: delete it to probe again, on an idle machine)",
        rec["measured_bf16"] / 1e12,
        rec["measured_fp32"] / 1e12,
        " / ".join(sorted({str(t or "at an unknown time") for t in rec["probed_at"].values()})),
        path,
    )
    return rec
