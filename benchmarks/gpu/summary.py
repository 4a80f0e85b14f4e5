"""summary.md of the GPU check (benchmarks/gpu/check.py) from its result dict (summary.json).

Pure functions of the result: the machine, every section's status and wall time, every check,
the ladder table (ms/step, tokens/s, MFU against the spec and the measured peak, memory,
compile seconds), the fused rung at B=64 and Hugging Face's model beside it; for the later
parts, the beyond ladder against its baseline and the largest micro batch of each loss.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

# the lecture's final setting (B=64, T=1024), the reference for the B=64 rung's MFU
REFERENCE_MFU = 0.50
# the lecture's published step times on one A100 at B=16, T=1024, rung by rung: beside the
# ladder for reading, not a baseline (another GPU)
LECTURE_A100_MS = {
    "fp32": 1000,
    "tf32": 333,
    "bf16": 300,
    "compile": 130,
    "flash": 96,
    "vocab": 93,
    "fused": 90,
}


def junit_cases(xml_path: Path) -> list[dict]:
    """[{name, outcome: passed|failed|error|skipped, message}] from pytest's junit xml."""
    if not xml_path.is_file():
        return []
    cases = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = "failed" if kind == "failure" else kind
                message = ((node.get("message") or "").splitlines() or [""])[0][:200]
                break
        cases.append({"name": case.get("name", "?"), "outcome": outcome, "message": message})
    return cases


def _num(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(value, spec: str = ",.0f", scale: float = 1.0, suffix: str = "") -> str:
    x = _num(value)
    return "" if x is None else f"{x * scale:{spec}}{suffix}"


def _flops(value) -> str:
    x = _num(value)
    return "unknown" if x is None else f"{x / 1e12:,.1f} TFLOP/s"


LADDER_HEADER = [
    "| rung | status | ms/step | lecture's A100 ms | tokens/s | vs previous | MFU (spec) | "
    "MFU (measured peak) | peak memory GB | compile s | note |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
]


def ladder_row(row: dict, lecture: bool = True) -> str:
    """One rung; `lecture`: beside it the lecture's A100 step time (at B=16 only)."""
    name = str(row.get("name", "")).removeprefix("ladder/")
    vs = _fmt(row.get("speedup_vs_prev"), ".2f", suffix="x")
    if str(row.get("noise")).lower() == "true":
        vs += " (within noise)"
    cells = [
        name,
        str(row.get("status", "")),
        _fmt(row.get("median_ms"), ",.1f"),
        _fmt(LECTURE_A100_MS.get(name) if lecture else None),
        _fmt(row.get("tokens_per_s")),
        vs,
        _fmt(row.get("mfu"), ".1f", 100, "%"),
        _fmt(row.get("mfu_measured"), ".1f", 100, "%"),
        _fmt(row.get("peak_mem_gb"), ".1f"),
        _fmt(row.get("compile_s"), ".1f"),
        str(row.get("error") or "").replace("|", "/"),
    ]
    return "| " + " | ".join(cells) + " |"


BEYOND_HEADER = [
    "| rung | status | ms/step | tokens/s | vs fused | loss vs fused | MFU (spec) | "
    "peak memory GB | compile s | note |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
]


def beyond_row(row: dict) -> str:
    vs = _fmt(row.get("speedup_vs_baseline"), ".2f", suffix="x")
    if vs and str(row.get("noise")).lower() == "true":
        vs += " (within noise)"
    cells = [
        str(row.get("name", "")).removeprefix("ladder/").removeprefix("beyond/"),
        str(row.get("status", "")),
        _fmt(row.get("median_ms"), ",.1f"),
        _fmt(row.get("tokens_per_s")),
        vs,
        _fmt(row.get("loss_vs_baseline"), "+.4f"),
        _fmt(row.get("mfu"), ".1f", 100, "%"),
        _fmt(row.get("peak_mem_gb"), ".1f"),
        _fmt(row.get("compile_s"), ".1f"),
        str(row.get("error") or "").replace("|", "/"),
    ]
    return "| " + " | ".join(cells) + " |"


def memory_lines(memory: list[dict], shape: str) -> list[str]:
    lines = [
        "",
        f"## The largest micro batch that fits, {shape}: loss=plain vs loss=chunked",
        "",
        "The fused rung's settings (bf16, flash, vocab 50304, fused AdamW) without torch.compile; "
        "micro batches from the smallest up, each loss until its first failure.",
        "",
        "| loss | largest B that fits | why not more | peak memory GB there |",
        "|---|---:|---|---:|",
    ]
    for m in memory:
        at = next((t for t in m["tried"] if t["batch"] == m.get("largest")), {})
        lines.append(
            f"| {m['loss']} | {m.get('largest') or 'none'} | {m.get('limit', '')} | "
            f"{_fmt(at.get('peak_mem_gb'), '.1f')} |"
        )
    lines += [
        "",
        "| loss | B | status | peak memory GB | tokens/s | note |",
        "|---|---:|---|---:|---:|---|",
    ]
    for m in memory:
        for t in m["tried"]:
            note = str(t.get("error") or "").replace("|", "/")[:160]
            lines.append(
                f"| {m['loss']} | {t['batch']} | {t.get('status')} | "
                f"{_fmt(t.get('peak_mem_gb'), '.1f')} | {_fmt(t.get('tokens_per_s'))} | {note} |"
            )
    return lines


def lecture_code_lines(lecture: dict, ours: list[tuple[str, dict]], shape: str) -> list[str]:
    """The lecture's own code beside gpt2x's rows of the same command at its shape (B=16):
    the fused rung and the fastest of them. `ours`: (label, ablation row)."""
    lines = [
        "",
        f"## The lecture's own train_gpt2.py beside gpt2x, {shape}",
        "",
        f"build-nanogpt's file (sha256 {str(lecture.get('sha256', ''))[:16]}...), its model, "
        "AdamW and loop as its best single-GPU setting runs them (bf16 autocast, torch.compile); "
        "one run each.",
        "",
        "| code | ms/step | tokens/s | vs the lecture's code | peak memory GB | compile s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    theirs = _num(lecture.get("tokens_per_s"))
    done = [
        (label, r)
        for label, r in ours
        if r.get("status") == "completed" and _num(r.get("tokens_per_s"))
    ]
    fused = next(((lb, r) for lb, r in done if r.get("name") == "ladder/fused"), None)
    fastest = max(done, key=lambda lr: _num(lr[1]["tokens_per_s"]), default=None)
    rows = [("the lecture's train_gpt2.py", lecture, "compile_seconds")]
    if fused is not None:
        rows.append((f"gpt2x {fused[0]}", fused[1], "compile_s"))
    if fastest is not None and fastest is not fused:
        rows.append((f"gpt2x {fastest[0]} (the fastest here)", fastest[1], "compile_s"))
    for label, r, compile_key in rows:
        tokens = _num(r.get("tokens_per_s"))
        vs = f"{tokens / theirs:.2f}x" if tokens and theirs else ""
        lines.append(
            f"| {label} | {_fmt(r.get('median_ms'), ',.1f')} | {_fmt(tokens)} | {vs} | "
            f"{_fmt(r.get('peak_mem_gb'), '.1f')} | {_fmt(r.get(compile_key), '.1f')} |"
        )
    return lines


def chunk_lines(chunk: list[dict], shape: str) -> list[str]:
    plain = next((_num(r.get("tokens_per_s")) for r in chunk if r.get("chunk_size") is None), None)
    lines = [
        "",
        f"## loss=chunked's chunk size, {shape}: against the plain loss",
        "",
        "The fused rung (compiled) with the plain loss, then with loss=chunked at each chunk size "
        "(rows per chunk); one run each.",
        "",
        "| loss | rows per chunk | status | ms/step | tokens/s | vs plain | peak memory GB | "
        "compile s | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in chunk:
        size = r.get("chunk_size")
        tokens = _num(r.get("tokens_per_s"))
        vs = f"{tokens / plain:.2f}x" if tokens and plain else ""
        lines.append(
            f"| {'plain' if size is None else 'chunked'} | {'' if size is None else size} | "
            f"{r.get('status', '')} | {_fmt(r.get('median_ms'), ',.1f')} | {_fmt(tokens)} | {vs} | "
            f"{_fmt(r.get('peak_mem_gb'), '.1f')} | {_fmt(r.get('compile_s'), '.1f')} | "
            f"{str(r.get('error') or '').replace('|', '/')} |"
        )
    return lines


def render(result: dict) -> str:
    env = result.get("environment") or {}
    rehearsal = bool(result.get("rehearsal"))
    title = "GPU check rehearsal (on the CPU, tiny model)" if rehearsal else "GPU check"
    parts = result.get("parts") or ["lecture"]
    if parts != ["lecture"]:
        title += f", --part {','.join(parts)}"
    lines = [f"# {title}: {result.get('status')}", ""]
    if rehearsal:
        lines += [
            "**A rehearsal: every section ran on the CPU with a tiny model. Nothing here is a GPU "
            "number.**",
            "",
        ]
    if result.get("missing"):
        lines += ["Missing imports: " + "; ".join(result["missing"]), ""]
    peaks = result.get("peaks") or {}
    shapes = result.get("shapes") or {}
    gpu = env.get("gpu", "")
    if env.get("gpu_memory_gib"):
        gpu += (
            f" ({env['gpu_memory_gib']} GiB), compute capability {env.get('capability')}, "
            f"{env.get('gpu_count')} visible"
        )
    lines += [
        "| | |",
        "|---|---|",
        f"| GPU | {gpu} |",
        f"| nvidia-smi (name, driver, memory, max SM clock) | {env.get('nvidia_smi', '')} |",
        f"| torch / CUDA / cuDNN | {env.get('torch', '')} / {env.get('cuda')} / "
        f"{env.get('cudnn', '')} |",
        f"| Python / host / CPUs | {env.get('python', '')} / {env.get('host', '')} / "
        f"{env.get('cpu_count', '')} |",
        f"| peak FLOP/s (gpt2x.training.peak) | spec dense bf16 {_flops(peaks.get('spec_bf16'))}; "
        f"measured bf16 {_flops(peaks.get('measured_bf16'))}, fp32 "
        f"{_flops(peaks.get('measured_fp32'))} |",
        f"| budget / wall time | {_fmt(result.get('budget_s'))} s / "
        f"{_fmt(result.get('wall_s'))} s |",
        "",
        "## Sections",
        "",
        "| section | what | status | wall s | estimate s |",
        "|---|---|---|---:|---:|",
    ]
    for s in result.get("sections", []):
        lines.append(
            f"| {s['name']} | {s['title']} | {s['status']} | {_fmt(s.get('seconds'), '.1f')} | "
            f"{s['estimate_s']} |"
        )
    tests = result.get("tests") or []
    if tests:
        lines += ["", "## Checks (tests/test_cuda.py)", "", "| check | result | |", "|---|---|---|"]
        lines += [f"| {t['name']} | {t['outcome']} | {t['message']} |" for t in tests]
    ladder = result.get("ladder") or []
    if ladder:
        shape = shapes.get("ladder", "B=16, T=1024")
        lines += [
            "",
            f"## The ladder: GPT-2 124M, {shape}",
            "",
            "Beside each rung, the lecture's published step time on one A100 at B=16, T=1024 "
            "(another GPU: for reading, not a baseline).",
            "",
            *LADDER_HEADER,
        ]
        lines += [ladder_row(r) for r in ladder]
    big = result.get("fused_b64")
    if big:
        shape = shapes.get("fused_b64", "B=64, T=1024")
        lines += ["", f"## The fused rung at {shape} (the lecture's final setting: B=64)", ""]
        lines += [*LADDER_HEADER, ladder_row(big, lecture=False)]
        mfu = _num(big.get("mfu"))
        if mfu is not None:
            lines += [
                "",
                f"MFU against the spec peak: {100 * mfu:.1f}% (reference: about "
                f"{100 * REFERENCE_MFU:.0f}% at this setting).",
            ]
    hf = result.get("hf_peer")
    if hf:
        lines += [
            "",
            "## Hugging Face GPT2LMHeadModel beside gpt2x's fused rung (same B, T, vocab)",
            "",
            "| model | ms/step | tokens/s | peak memory GB | compile s |",
            "|---|---:|---:|---:|---:|",
        ]
        if big:
            lines.append(
                f"| gpt2x fused | {_fmt(big.get('median_ms'), ',.1f')} | "
                f"{_fmt(big.get('tokens_per_s'))} | {_fmt(big.get('peak_mem_gb'), '.1f')} | "
                f"{_fmt(big.get('compile_s'), '.1f')} |"
            )
        lines.append(
            f"| HF GPT2LMHeadModel (sdpa, bf16, compile, fused AdamW) | "
            f"{_fmt(hf.get('median_ms'), ',.1f')} | {_fmt(hf.get('tokens_per_s'))} | "
            f"{_fmt(hf.get('peak_mem_gb'), '.1f')} | {_fmt(hf.get('compile_seconds'), '.1f')} |"
        )
        ours, theirs = _num((big or {}).get("tokens_per_s")), _num(hf.get("tokens_per_s"))
        if ours and theirs:
            lines += ["", f"gpt2x / HF tokens/s: {ours / theirs:.2f}x (one run each)."]
    beyond = result.get("beyond") or []
    if result.get("lecture_code"):
        # gpt2x's rows at the lecture's shape in this command: the beyond ladder's, the chunk
        # section's (its plain row is the fused rung)
        ours = [(str(r.get("name", "")).removeprefix("ladder/"), r) for r in beyond]
        for r in result.get("chunk") or []:
            size = r.get("chunk_size")
            ours.append(("fused" if size is None else f"fused + loss=chunked ({size} rows)", r))
        shape = shapes.get("lecture_code", "B=16, T=1024")
        lines += lecture_code_lines(result["lecture_code"], ours, shape)
    if beyond:
        shape = shapes.get("beyond", "B=16, T=1024")
        lines += [
            "",
            f"## The beyond ladder: GPT-2 124M, {shape} (ckpt at 2x B), against the fused rung",
            "",
            *BEYOND_HEADER,
        ]
        lines += [beyond_row(r) for r in beyond]
    if result.get("memory"):
        lines += memory_lines(result["memory"], shapes.get("memory", "T=1024"))
    if result.get("chunk"):
        lines += chunk_lines(result["chunk"], shapes.get("chunk", "B=16, T=1024"))
    archive = result.get("archive")
    lines += ["", "## Files", ""]
    if archive:
        lines.append(
            f"- `{archive['file']}` ({archive['bytes'] / 1024:,.0f} KiB): the run folders "
            f"{', '.join(archive['holds'])} (records, metrics, rung logs, tables, plots)"
        )
    lines += [
        "- `check.log`: everything printed, every command",
        "- `pytest.xml`: the checks' junit report",
        "- `summary.json`: this summary's numbers",
        "",
    ]
    return "\n".join(lines)
