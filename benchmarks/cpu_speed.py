"""The CPU speed goal: tokens/s of named single-process configurations of the nano shape, and of
the lecture's settings on Hugging Face's GPT2LMHeadModel (and on the lecture's own code, given its
path) at the same shape, measured interleaved in fresh processes.

    python benchmarks/cpu_speed.py                          # every configuration, 5 repeats
    python benchmarks/cpu_speed.py --repeats 2 --steps 4 --warmup 2 --configs fused,chunked,hf
    python benchmarks/cpu_speed.py --lecture ~/build-nanogpt/train_gpt2.py   # + the lecture's code
    python benchmarks/cpu_speed.py --list                   # the configurations and what they set

The shape is the nano_cpu ladder's (4 layers x 4 heads x 256, T=256, B=8, vocab 50304, bf16
autocast, flash attention, torch.compile, fused AdamW: the lecture's `fused` rung). Each
configuration runs as a fresh process per repeat, and the repeats are interleaved (A B C A B C
...), so a drift of a shared machine hits every configuration alike. One repeat's number is the
median tokens/s over its measured steps; across repeats the table shows the median, a 95%
interval (gpt2x.stats.log_t_interval: a t-interval on the logs), the share of the machine's
measured matmul ceiling, and the ratios to `fused` and to `hf` paired repeat by repeat
(gpt2x.stats.paired_ratio), with `within noise` where that interval holds 1.00x.

How each is measured:
- gpt2x configurations run through the CLI, exactly as a ladder rung does: `python -m
  gpt2x.train +experiment=<rung> <overrides> trainer.max_steps=W+S
  trainer.warmup_steps_for_timing=W logger=none`; the number is record.json's
  summary.tokens_per_s (the trainer's own step timing: data, forward, loss, backward, clipping,
  optimizer step, and the loss read back to the host).
- `hf` runs this file with `--worker hf` (the GPU check runs it on CUDA as the fused rung's
  peer, `--device cuda`): an in-script loop with the same work per step (a
  batch from the same prepared Shakespeare tokens, torch.compile of forward + fp32
  cross-entropy, bf16 autocast, backward, clip_grad_norm_(1.0), fused AdamW with weight decay
  on 2-D parameters, loss.item()), timed with perf_counter around the whole step as the trainer
  times its steps, first W steps untimed.
- `lecture` (with --lecture PATH, the lecture's build-nanogpt `train_gpt2.py`, which this
  project does not ship) runs this file with `--worker lecture`: the file's own GPT and
  GPTConfig (only its imports, classes and functions are executed: the rest of the file is its
  training run), its configure_optimizers(weight_decay, learning_rate, device_type) and its loop
  in the lecture's best single-device setting: `model = torch.compile(model)` (the lecture's
  compile step; build-nanogpt's final file ships `use_compile = False` because compile
  interfered with its HellaSwag eval and sampling), bf16 autocast around `logits, loss =
  model(x, y)`, clip 1.0, the lr set per step, at the same shape with vocab 50304, timed as
  `hf`. Its AdamW is fused only on CUDA (its own rule); its compiled model returns the logits
  beside the loss, which `hf` (forward + loss compiled, the loss alone returned) does not.
- Memory is a process setting (gpt2x/training/allocator.py): the lecture runs with PyTorch's
  and glibc's defaults (every large buffer page-faulted afresh every step); gpt2x keeps freed
  memory for reuse by default (trainer.cpu_keep_freed_memory), cpu_fast adds huge pages
  (trainer.cpu_huge_pages). Each row says which it has; the peers run as the lecture does
  (`hf`), with gpt2x's default (`hf_kept`) and with cpu_fast's settings (`hf_tuned`), so every
  comparison can be made with the same process settings on both sides.
Threads: every process gets OMP_NUM_THREADS=<--threads> (default: the machine's CPU count)
unless its configuration sets its own. Another CPU family's instruction set can be approximated
on this one: `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/cpu_speed.py ...` runs
oneDNN's kernels (the bf16 matmuls) without AMX in every process, as on a Xeon with
avx512_bf16 and no AMX or an AMD EPYC Zen 4; the header, each --json result and
--table-from say so, and gpt2x probes that cap's own matmul peak. Only oneDNN is capped:
inductor's and ATen's vector code (ATEN_CPU_CAPABILITY), MKL's fp32 matmuls, caches, memory
and core counts stay this machine's. Prints a markdown table; --json writes the raw numbers.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # gpt2x.stats from this checkout when run as a script

from gpt2x import stats  # noqa: E402

# the ratios' references: the lecture's last single-process rung in gpt2x; the lecture's settings
# on Hugging Face's model (the peer) as the lecture runs it, and with the process settings of
# cpu_fast (freed memory kept, huge pages); the lecture's own code (with --lecture); the peer
# without bf16 autocast (the reference of the fp32 rows); hf_thp: committed runs before freed
# memory was kept
BASES = ["fused", "hf", "hf_tuned", "lecture", "hf_fp32", "hf_thp"]
# /proc/cpuinfo flags that decide whether bf16 matmuls are fast (AMX) or emulated
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")


# The process's memory settings (gpt2x/training/allocator.py), by name: (freed memory kept, huge
# pages). The lecture runs with PyTorch's and glibc's defaults, every large buffer a fresh
# mapping page-faulted anew every step; gpt2x keeps freed memory by default
# (trainer.cpu_keep_freed_memory); cpu_fast adds huge pages (trainer.cpu_huge_pages). A gpt2x
# configuration gets them as those two overrides, a peer through the same function
# (--keep-freed-memory); huge pages through THP_MEM_ALLOC_ENABLE, what cpu_huge_pages sets, for
# both (and =0 otherwise, whatever the caller's environment says).
MEMORY = {"lecture": (False, False), "kept": (True, False), "tuned": (True, True)}


@dataclass
class Candidate:
    name: str
    what: str  # one line for the table
    experiment: str = "ladder/fused"
    overrides: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    peer: str | None = None  # "hf" | "lecture": run by this file's worker, not gpt2x.train
    memory: str = "kept"  # a key of MEMORY: gpt2x's default
    peer_fp32: bool = False  # a peer without its bf16 autocast (gpt2x rows say precision=fp32)
    peer_eager: bool = False  # a peer without torch.compile

    @property
    def kept(self) -> bool:
        return MEMORY[self.memory][0]

    @property
    def huge_pages(self) -> bool:
        return MEMORY[self.memory][1]


CHUNKED = "ladder/beyond/chunked"
LECTURE = "bf16 autocast, compile, vocab 50304"
AS_LECTURE = "freed memory not kept, no huge pages: PyTorch's and glibc's defaults"

# What can be tried without changing the model's math beyond what a rung names. Every entry is
# the fused rung plus one named change (a ladder/beyond rung, a chunk size or kernel of that
# rung, a precision, or a thread or memory setting of the process), or a peer.
CANDIDATES = [
    Candidate(
        "fused",
        "the lecture's fused rung (bf16, compile, flash, vocab 50304, fused AdamW), freed memory kept",
    ),
    Candidate("fused_not_kept", f"fused, {AS_LECTURE}", memory="lecture"),
    Candidate(
        "fused_thp", "fused with huge pages too (trainer.cpu_huge_pages=true)", memory="tuned"
    ),
    Candidate("fused_1thread", "fused, OMP_NUM_THREADS=1", env={"OMP_NUM_THREADS": "1"}),
    # fp32 instead of bf16 autocast: on a CPU without bf16 matrix units (no AMX) bf16 matmuls
    # can be slower than fp32 ones; the same model, only the autocast dtype differs
    Candidate("fused_fp32", "fused with precision=fp32", overrides=["precision=fp32"]),
    Candidate(
        "fused_fp32_thp",
        "fused with precision=fp32 and huge pages",
        overrides=["precision=fp32"],
        memory="tuned",
    ),
    # the ladder's first rung: the default run's settings (fp32, eager, naive attention, vocab
    # 50257) at the ladder's shape
    Candidate(
        "fp32_rung",
        "the ladder's first rung (fp32, eager, naive attention, vocab 50257)",
        "ladder/fp32",
    ),
    Candidate("fp32_rung_not_kept", f"fp32_rung, {AS_LECTURE}", "ladder/fp32", memory="lecture"),
    Candidate("fp32_rung_thp", "fp32_rung with huge pages too", "ladder/fp32", memory="tuned"),
    Candidate("chunked", "loss=chunked: head + loss in compiled 512-row chunks (4)", CHUNKED),
    Candidate(
        "chunked_256",
        "loss=chunked loss.chunk_size=256 (8 chunks)",
        CHUNKED,
        ["loss.chunk_size=256"],
    ),
    Candidate(
        "chunked_1024",
        "loss=chunked loss.chunk_size=1024 (2 chunks)",
        CHUNKED,
        ["loss.chunk_size=1024"],
    ),
    Candidate(
        "chunked_2048",
        "loss=chunked loss.chunk_size=2048 (1 chunk at B=8, T=256)",
        CHUNKED,
        ["loss.chunk_size=2048"],
    ),
    Candidate(
        "chunked_torch",
        "loss=chunked with torch's F.linear_cross_entropy (loss.kernel=torch, torch >= 2.13)",
        CHUNKED,
        ["loss.kernel=torch"],
    ),
    Candidate("chunked_fp32", "loss=chunked, precision=fp32", CHUNKED, ["precision=fp32"]),
    Candidate("max_autotune", "chunked + compile_mode=max-autotune", "ladder/beyond/max_autotune"),
    Candidate(
        "reduce_overhead", "chunked + compile_mode=reduce-overhead", "ladder/beyond/reduce_overhead"
    ),
    Candidate("block", "chunked + compile_scope=block", "ladder/beyond/block"),
    # the named preset a user picks, at the ladder's shape: `chunked` with attn=naive
    Candidate(
        "cpu_fast",
        "+experiment=cpu_fast, the named preset: chunked + attn=naive (compiled), precision=auto, freed memory kept, huge pages",
        "cpu_fast",
        ["+ladder_shape=nano_cpu"],
        memory="tuned",
    ),
    Candidate(
        "cpu_fast_no_thp",
        "cpu_fast without huge pages (freed memory kept: gpt2x's default)",
        "cpu_fast",
        ["+ladder_shape=nano_cpu"],
    ),
    Candidate(
        "cpu_fast_fp32",
        "+experiment=cpu_fast precision=fp32: what its precision=auto takes where bf16 matmuls measure slower",
        "cpu_fast",
        ["+ladder_shape=nano_cpu", "precision=fp32"],
        memory="tuned",
    ),
    Candidate(
        "cpu_fast_as_lecture",
        f"cpu_fast's kernels alone, {AS_LECTURE}",
        "cpu_fast",
        ["+ladder_shape=nano_cpu"],
        memory="lecture",
    ),
    Candidate(
        "hf",
        f"transformers GPT2LMHeadModel in the lecture's settings ({LECTURE}, sdpa, fused AdamW), {AS_LECTURE}",
        peer="hf",
        memory="lecture",
    ),
    Candidate("hf_kept", "hf with freed memory kept, as gpt2x's default", peer="hf"),
    Candidate(
        "hf_fp32",
        f"hf without bf16 autocast (fp32, compile, vocab 50304, sdpa, fused AdamW), {AS_LECTURE}",
        peer="hf",
        memory="lecture",
        peer_fp32=True,
    ),
    Candidate(
        "hf_fp32_tuned",
        "hf_fp32 with freed memory kept and huge pages, as cpu_fast",
        peer="hf",
        memory="tuned",
        peer_fp32=True,
    ),
    Candidate(
        "hf_tuned",
        "hf with freed memory kept and huge pages, as cpu_fast",
        peer="hf",
        memory="tuned",
    ),
    Candidate(
        "lecture",
        f"the lecture's own train_gpt2.py (--lecture): its model, AdamW and loop, {LECTURE}, {AS_LECTURE}",
        peer="lecture",
        memory="lecture",
    ),
    Candidate(
        "lecture_eager",
        "lecture as its final file ships (use_compile = False): eager, bf16 autocast, vocab 50304, "
        f"{AS_LECTURE}",
        peer="lecture",
        memory="lecture",
        peer_eager=True,
    ),
    Candidate(
        "lecture_fp32",
        f"lecture without bf16 autocast (its fp32 rung + compile, vocab 50304), {AS_LECTURE}",
        peer="lecture",
        memory="lecture",
        peer_fp32=True,
    ),
    Candidate(
        "lecture_tuned",
        "lecture with freed memory kept and huge pages, as cpu_fast",
        peer="lecture",
        memory="tuned",
    ),
]
BY_NAME = {c.name: c for c in CANDIDATES}


# --------------------------------------------------------------------------------------------
# One measurement = one fresh process


def gpt2x_command(c: Candidate, steps: int, warmup: int, run_dir: Path, extra: list[str]) -> list:
    return [
        sys.executable,
        "-m",
        "gpt2x.train",
        f"+experiment={c.experiment}",
        *c.overrides,
        f"trainer.cpu_keep_freed_memory={str(c.kept).lower()}",
        f"trainer.cpu_huge_pages={str(c.huge_pages).lower()}",
        f"trainer.max_steps={warmup + steps}",
        f"trainer.warmup_steps_for_timing={warmup}",
        "logger=none",
        "trainer.progress=log",
        *extra,
        f"hydra.run.dir={run_dir}",
    ]


def peer_command(c: Candidate, args, out: Path) -> list:
    return [
        sys.executable,
        __file__,
        "--worker",
        c.peer,
        # absolute: the worker runs in the repository, not where the path was typed
        *(
            ["--lecture", str(Path(args.lecture).expanduser().resolve())]
            if c.peer == "lecture"
            else []
        ),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--worker-out",
        str(out),
        *(["--keep-freed-memory"] if c.kept else []),
        *(["--fp32"] if c.peer_fp32 else []),
        *(["--eager"] if c.peer_eager else []),
        *(a for o in args.override for a in ("--override", o)),
    ]


def ceiling(record: dict) -> float | None:
    """Tokens/s at 100% of the machine's measured matmul peak for this run's precision (the
    record's peak, probed by gpt2x.training.peak with the run's thread count), or None."""
    peaks = (record.get("hardware") or {}).get("peak_flops") or {}
    bf16 = ((record.get("config") or {}).get("precision") or {}).get("dtype") == "bf16"
    peak = peaks.get("measured_bf16" if bf16 else "measured_fp32")
    flops = record.get("flops_per_token")
    return peak / flops if peak and flops else None


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def measure_once(c: Candidate, args, scratch: Path, repeat: int) -> dict:
    """Run one configuration once in a fresh process; its tokens/s, or the reason it failed."""
    run_dir = scratch / f"{c.name}_r{repeat}"
    out = run_dir / "peer.json"
    if c.peer:
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = peer_command(c, args, out)
    else:
        cmd = gpt2x_command(c, args.steps, args.warmup, run_dir, args.override)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "THP_MEM_ALLOC_ENABLE": "1" if c.huge_pages else "0",
        **c.env,
    }
    env.setdefault("WANDB_MODE", "offline")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    result = {
        "name": c.name,
        "repeat": repeat,
        "wall_s": round(wall, 1),
        "command": shlex.join(cmd),
        # what it was and the environment it set: a --json file describes itself, whatever
        # later versions of this file call its configurations
        "what": c.what,
        "memory": c.memory,
        "env": c.env,  # its own, beyond --threads and the memory setting
    }
    if c.peer == "lecture":  # which version of the lecture's file (this project never ships it)
        result["lecture_sha256"] = args.lecture_sha256
    try:
        if c.peer:
            summary = json.loads(out.read_text())
            result["precision"] = "fp32" if c.peer_fp32 else "bf16"  # its share of a ceiling
        else:
            record = json.loads((run_dir / "record.json").read_text())
            summary = record["summary"]
            result["ceiling_tokens_per_s"] = ceiling(record)
            result["precision"] = record["config"]["precision"]["dtype"]
        result.update(
            tokens_per_s=float(summary["tokens_per_s"]), median_ms=float(summary["median_ms"])
        )
    except (OSError, KeyError, TypeError, ValueError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        result["error"] = f"exit {proc.returncode}: {tail[0][:200]}"
    return result


# --------------------------------------------------------------------------------------------
# The peers' worker (runs in its own process): Hugging Face's model or the lecture's code


def hf_batches(cfg, steps: int):
    """(x, y) int64 batches from the same prepared Shakespeare shards the trainer reads; falls
    back to fixed random tokens when the shards are not prepared (the timing does not depend on
    the token values)."""
    import numpy as np
    import torch

    b, t = cfg.trainer.micro_batch_size, cfg.trainer.seq_len
    data_dir = Path(cfg.data.dir)
    shards = sorted(data_dir.glob("*train*.bin")) if data_dir.is_dir() else []
    if shards:
        tokens = np.memmap(shards[0], dtype=np.uint16, mode="r")
        need = b * t + 1
        for i in range(steps):
            start = (i * b * t) % max(1, len(tokens) - need)
            chunk = torch.from_numpy(tokens[start : start + need].astype(np.int64))
            yield chunk[:-1].view(b, t), chunk[1:].view(b, t)
    else:
        g = torch.Generator().manual_seed(1337)
        x = torch.randint(0, min(50257, cfg.model.vocab_size), (b, t + 1), generator=g)
        for _ in range(steps):
            yield x[:, :-1].contiguous(), x[:, 1:].contiguous()


def build_hf(cfg, device):
    """GPT2LMHeadModel at the configuration's shape with the lecture's loss and fused AdamW:
    (model, loss_fn(x, y) to compile, optimizer)."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    m, o = cfg.model, cfg.optim
    hf_cfg = GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=m.block_size,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
        # no KV cache in training (the default builds one every forward; measured on the CPU,
        # 3 alternated pairs: no difference in step time, 435-451 against 445-456 ms)
        use_cache=False,
    )
    model = GPT2LMHeadModel(hf_cfg).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=True,
    )

    def loss_fn(x, y):
        # the lecture's plain loss: logits -> fp32 cross-entropy, as gpt2x's loss=plain
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))

    return model, loss_fn, opt


def load_lecture(path: str | os.PathLike) -> dict:
    """The namespace of the lecture's train_gpt2.py with its GPT and GPTConfig, without running
    the script: only its imports, classes and functions are executed (the rest of the file is
    its training run). An import that fails is skipped with a line on stderr: the model does not
    need it (its hellaswag.py may be absent, or fetch the GPT-2 encoding from the network when
    imported). SystemExit (one line) if GPT or GPTConfig is missing."""
    path = Path(path).expanduser()
    try:
        source = path.read_text()
        tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        raise SystemExit(f"cpu_speed.py: --lecture {path}: cannot read it ({e})") from None
    # a module of its own (dataclasses look their module up); configure_optimizers prints on the
    # master process, a global of the script's body
    module = types.ModuleType("lecture_train_gpt2")
    module.__file__, module.master_process = str(path), True
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    sys.path.insert(0, str(path.parent))  # the lecture's own modules beside it
    try:
        for node in tree.body:
            if not isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)):
                continue
            code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
            try:
                exec(code, namespace)
            except Exception as e:
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    raise
                line = ast.get_source_segment(source, node) or ast.unparse(node)
                print(
                    f"cpu_speed.py: skipped the lecture's `{line}` ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:120] if str(e) else ''}): the model does not need it",
                    file=sys.stderr,
                )
    finally:
        sys.path.remove(str(path.parent))
    missing = [n for n in ("GPT", "GPTConfig") if not isinstance(namespace.get(n), type)]
    if missing:
        raise SystemExit(
            f"cpu_speed.py: --lecture {path} defines no {' or '.join(missing)}: pass "
            "build-nanogpt's train_gpt2.py"
        )
    return namespace


def build_lecture(cfg, device, path, compile_model: bool):
    """The lecture's GPT at the configuration's shape, its own configure_optimizers and loss,
    compiled as the lecture's compile step does: `model = torch.compile(model)`, then `logits,
    loss = model(x, y)` (the compiled graph returns the logits too, so its backward takes a
    gradient for them)."""
    import torch

    lecture = load_lecture(path)
    m, o = cfg.model, cfg.optim
    torch.set_float32_matmul_precision("high")  # the lecture's setting (a no-op on a CPU)
    config = lecture["GPTConfig"](
        block_size=m.block_size,
        vocab_size=m.vocab_size,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
    )
    model = lecture["GPT"](config).to(device).train()
    # positional: the third parameter was `device` in early versions, `device_type` later
    opt = model.configure_optimizers(o.weight_decay, o.lr, device.type)
    forward = torch.compile(model) if compile_model else model

    def loss_fn(x, y):
        _logits, loss = forward(x, y)
        return loss

    return model, loss_fn, opt


def run_peer(args) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from gpt2x import CONF_DIR
    from gpt2x.config import register_configs
    from gpt2x.training.allocator import keep_freed_memory

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        # the fused rung's resolved shape, so a peer gets exactly the gpt2x configuration's sizes
        cfg = compose("config", overrides=["+experiment=ladder/fused", *args.override])
    t, o = cfg.trainer, cfg.optim
    torch.manual_seed(t.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # what gpt2x's setup does for trainer.cpu_keep_freed_memory: on the run's device only if CPU
    keep_freed_memory(args.keep_freed_memory and device.type == "cpu")
    if args.worker == "lecture":
        model, step_fn, opt = build_lecture(cfg, device, args.lecture, not args.eager)
    else:
        model, loss_fn, opt = build_hf(cfg, device)
        step_fn = loss_fn if args.eager else torch.compile(loss_fn)  # forward + loss
    times, first_ms = [], None
    for i, (x, y) in enumerate(hf_batches(cfg, args.warmup + args.steps)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32):
            loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        for group in opt.param_groups:  # the lecture's loop sets the lr every step
            group["lr"] = o.lr
        opt.step()
        loss.item()  # the trainer reads the loss back every step too (and waits for the GPU)
        ms = (time.perf_counter() - t0) * 1000.0
        first_ms = ms if first_ms is None else first_ms
        if i >= args.warmup:
            times.append(ms)
    median_ms = stats.median(times)
    tokens = t.micro_batch_size * t.seq_len
    cuda = device.type == "cuda"
    Path(args.worker_out).write_text(
        json.dumps(
            {
                "median_ms": median_ms,
                "tokens_per_s": tokens / (median_ms / 1000.0),
                "steps_ms": times,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "batch": [t.micro_batch_size, t.seq_len],
                "loss": loss.item(),
                # the first step's time beyond a measured one: torch.compile's, as the trainer's
                "compile_seconds": max(0.0, (first_ms - median_ms) / 1000.0),
                "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            }
        )
    )


# --------------------------------------------------------------------------------------------
# The table


def ratio_cell(vals: dict, base: dict) -> str:
    """Median of the paired ratios vals/base and its 95% interval, or '' without pairs."""
    keys = sorted(set(vals) & set(base))
    if not keys:
        return ""
    r = stats.paired_ratio([vals[k] for k in keys], [base[k] for k in keys])
    cell = f"{stats.median([vals[k] / base[k] for k in keys]):.3f}x"
    if r.lo is not None:
        cell += f" ({r.lo:.3f} - {r.hi:.3f}){', within noise' if stats.within_noise(r) else ''}"
    return cell


def table(results: list[dict], names: list[str], args) -> str:
    per = {
        n: {
            r["repeat"]: r["tokens_per_s"]
            for r in results
            if r["name"] == n and "tokens_per_s" in r
        }
        for n in names
    }
    errors = {r["name"]: r["error"] for r in results if "error" in r}
    ceilings = machine_ceilings(results)
    bases = [b for b in BASES if per.get(b)]
    lines = [
        "| configuration | what | repeats | median tokens/s | 95% interval | % of ceiling | "
        + " | ".join(f"vs {b} (paired 95%)" for b in bases)
        + " |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(bases),
    ]
    for n in names:
        vals = per[n]
        what = described(results, n)
        if not vals:
            lines.append(
                f"| {n} | {what} | 0/{args.repeats} | failed: {errors.get(n, '?')} | | |"
                + " |" * len(bases)
            )
            continue
        med = stats.median(list(vals.values()))
        ci = stats.log_t_interval(list(vals.values()))
        cell = f"{ci.lo:,.0f} - {ci.hi:,.0f}" if ci.lo is not None else ""
        precision = next((r.get("precision") for r in results if r["name"] == n), None) or "bf16"
        top = ceilings.get("bf16" if precision == "bf16" else "fp32")
        # over 100%: the cached peak was probed on a busy machine (delete it, probe again)
        share = f"{100 * med / top:.0f}%{'' if med <= top else ' (stale peak)'}" if top else ""
        ratios = [("1.000x" if n == b else ratio_cell(vals, per[b])) for b in bases]
        lines.append(
            f"| {n} | {what} | {len(vals)}/{args.repeats} | {med:,.0f} | {cell} | {share} | "
            + " | ".join(ratios)
            + " |"
        )
    return "\n".join(lines)


def described(results: list[dict], name: str) -> str:
    """The configuration's line for the table: as its results recorded it, else as this version
    of the file describes it (files written before results recorded it)."""
    recorded = next((r["what"] for r in results if r["name"] == name and "what" in r), None)
    if recorded:
        return recorded
    known = BY_NAME.get(name)
    return known.what if known else "(not a configuration of this version of cpu_speed.py)"


def caps_line(caps: dict[str, str]) -> str:
    """The header line of a run made under CPU instruction-set caps (e.g. ONEDNN_MAX_CPU_ISA)."""
    return f"# CPU instruction set capped: {' '.join(f'{k}={v}' for k, v in caps.items())}"


def provenance(results: list[dict]) -> list[str]:
    """Header lines a --json file carries in its results: the lecture file's sha256, the CPU
    instruction-set caps the run was made under."""
    shas = sorted({r["lecture_sha256"] for r in results if r.get("lecture_sha256")})
    caps = {tuple(r["cpu_isa_limits"].items()) for r in results if r.get("cpu_isa_limits")}
    return [f"# --lecture file sha256 {h}" for h in shas] + [caps_line(dict(c)) for c in sorted(caps)]


def machine_ceilings(results: list[dict]) -> dict[str, float]:
    """{"bf16"|"fp32": tokens/s at 100% of the measured matmul peak} from the gpt2x runs (every
    configuration has the same FLOPs per token; one thread's runs are left out)."""
    out: dict[str, float] = {}
    for r in results:
        own_env = r["env"] if "env" in r else getattr(BY_NAME.get(r["name"]), "env", {})
        if r.get("ceiling_tokens_per_s") and own_env.get("OMP_NUM_THREADS") is None:
            out.setdefault(
                "bf16" if r.get("precision") == "bf16" else "fp32", r["ceiling_tokens_per_s"]
            )
    return out


def cpu_description() -> str:
    """The CPU's name, family/model and the flags that decide bf16 speed (AMX, avx512_bf16)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = [f for f in info.get("flags", "").split() if f in CPU_FLAGS]
    family = f" (family {info['cpu family']}, model {info['model']})" if "model" in info else ""
    return f"{name}{family}, flags: {' '.join(flags) or 'none of ' + ' '.join(CPU_FLAGS)}"


def default_configs(lecture: bool) -> list[str]:
    """Every configuration; the lecture's code only when its path is given."""
    return [c.name for c in CANDIDATES if c.peer != "lecture" or lecture]


def print_ceilings(results: list[dict], threads: int) -> None:
    ceilings = machine_ceilings(results)
    if ceilings:
        print(
            "\nCeiling (tokens/s at 100% of this machine's measured matmul peak, gpt2x.peak, "
            f"{threads} threads): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(ceilings.items()))
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs",
        help="comma-separated names (--list shows them; default: all, the lecture's with --lecture)",
    )
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per configuration")
    p.add_argument("--steps", type=int, default=10, help="measured steps per process")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, caches)")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="OMP_NUM_THREADS of every process without its own",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="a Hydra override for every configuration (repeatable), e.g. paths.data_dir=/data",
    )
    p.add_argument(
        "--lecture",
        help="the lecture's build-nanogpt train_gpt2.py: adds its model and loop as a peer",
    )
    p.add_argument("--json", help="also write every measurement to this file")
    p.add_argument("--list", action="store_true")
    p.add_argument(
        "--table-from",
        metavar="JSON",
        help="print the table of an earlier --json file, run nothing",
    )
    p.add_argument("--worker", choices=["hf", "lecture"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--keep-freed-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fp32", action="store_true", help=argparse.SUPPRESS)  # no bf16 autocast
    # the worker's device (default: cuda where available); benchmarks/gpu/check.sh runs it there
    p.add_argument("--device", default="", help=argparse.SUPPRESS)
    p.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)  # no torch.compile
    args = p.parse_args(argv)
    if args.worker:
        if args.worker == "lecture" and not args.lecture:
            p.error("--worker lecture needs --lecture PATH")
        run_peer(args)
        return 0
    if args.list:
        for c in CANDIDATES:
            print(f"{c.name:16s} {c.what}")
        return 0
    if args.table_from:
        results = json.loads(Path(args.table_from).read_text())
        names = list(dict.fromkeys(r["name"] for r in results))
        args.repeats = 1 + max(r["repeat"] for r in results)
        for line in provenance(results):  # what the header of the run said of it
            print(line)
        print(table(results, names, args))
        print_ceilings(results, args.threads)
        return 0
    if args.lecture and not Path(args.lecture).expanduser().is_file():
        print(f"cpu_speed.py: --lecture {args.lecture}: no such file", file=sys.stderr)
        return 2
    default = default_configs(lecture=bool(args.lecture))
    names = [n.strip() for n in (args.configs or ",".join(default)).split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(
            f"cpu_speed.py: unknown configuration {unknown[0]!r}; --list shows them",
            file=sys.stderr,
        )
        return 2
    needs_lecture = [n for n in names if BY_NAME[n].peer == "lecture"]
    if needs_lecture and not args.lecture:
        print(
            f"cpu_speed.py: configuration {needs_lecture[0]!r} needs --lecture PATH (the "
            "lecture's build-nanogpt train_gpt2.py)",
            file=sys.stderr,
        )
        return 2
    if args.repeats < 1 or args.steps < 1 or args.warmup < 1:
        print(
            "cpu_speed.py: --repeats, --steps and --warmup must be >= 1 (the first step compiles)",
            file=sys.stderr,
        )
        return 2
    print(
        f"# {cpu_description()}; {os.cpu_count()} CPUs, torch {importlib.metadata.version('torch')}, "
        f"python {platform.python_version()}; {len(names)} configurations x {args.repeats} "
        f"repeats, {args.warmup} warm-up + {args.steps} measured steps each, interleaved",
        flush=True,
    )
    args.lecture_sha256 = file_sha256(args.lecture) if args.lecture else None  # read once
    if args.lecture:
        print(f"# --lecture {args.lecture}: sha256 {args.lecture_sha256}", flush=True)
    from gpt2x.training.peak import cpu_isa_limits  # imports torch: not for --table-from

    capped = cpu_isa_limits()  # inherited by every process: a CPU made to act as an older one
    if capped:
        print(caps_line(capped))
    results = []
    with tempfile.TemporaryDirectory(prefix="gpt2x-cpu-speed-") as tmp:
        for repeat in range(args.repeats):  # A B C A B C ...: drift hits all alike
            for n in names:
                r = measure_once(BY_NAME[n], args, Path(tmp), repeat)
                if capped:
                    r["cpu_isa_limits"] = capped
                results.append(r)
                shown = f"{r['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in r else r["error"]
                print(f"  repeat {repeat} {n}: {shown} ({r['wall_s']} s)", flush=True)
    print()
    print(table(results, names, args))
    print_ceilings(results, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
