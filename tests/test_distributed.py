"""DDP and FSDP2 on CPU (gloo) with 2 processes: torchrun, srun-style and submitit launches.

The 2-rank runs are compared with one process that reaches the same global batch by gradient
accumulation: same tokens, so the per-step losses and the final weights (from the final
checkpoint, trainer.save_final) must agree to fp32 rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, TORCHRUN_2, cached_peaks, clean_env, losses, run_cli
from hydra import compose, initialize_config_dir

from gpt2x import CONF_DIR
from gpt2x.config import ConfigError, ParallelKind, register_configs
from gpt2x.lab.runner import LAUNCH_ENV  # the launcher variables a child must not inherit
from gpt2x.record.folder import read_jsonl
from gpt2x.training import distributed

register_configs()
pytestmark = pytest.mark.distributed

STEPS = 3
# B=4, T=32, 512 tokens per step: 1 process accumulates 4 micro-steps, 2 ranks 2 each
# 7 validation windows: uneven over 2 ranks and over batches of 4, so padding is exercised
COMMON = [
    *TINY,
    "logger=none",
    f"trainer.max_steps={STEPS}",
    "trainer.total_batch_tokens=512",
    "trainer.eval_tokens=224",
]


def torchrun(
    cwd: Path, *args: str, env: dict | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [
        *TORCHRUN_2,
        "-m",
        "gpt2x.train",
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=cwd, env=clean_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun exited {proc.returncode}\n--- stdout\n"
            f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def only_run_dir(parent: Path) -> Path:
    dirs = [p for p in parent.iterdir() if p.is_dir()]
    assert len(dirs) == 1, f"expected one run folder in {parent}, found {dirs}"
    return dirs[0]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(run_dir.glob("checkpoints/step_*/model.safetensors"))
    assert files, f"no final checkpoint under {run_dir}/checkpoints"
    return load_file(files[-1])


def val_losses(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in read_jsonl(run_dir / "eval.jsonl")]


def assert_same_training(run_dir: Path, reference: Path, rel: float = 1e-6) -> None:
    """Same per-step losses, validation losses (the same fixed set, split over the ranks) and
    final weights as the 1-process run, to fp32 rounding."""
    assert losses(run_dir) == pytest.approx(losses(reference), rel=rel)
    assert len(val_losses(reference)) == 1
    assert val_losses(run_dir) == pytest.approx(val_losses(reference), rel=rel)
    mine, ref = final_weights(run_dir), final_weights(reference)
    assert mine.keys() == ref.keys()
    for name, r in ref.items():
        a, b = mine[name].float(), r.float()
        if name.endswith("attn.c_attn.bias"):
            # q | k | v. The key bias has an exactly-zero gradient (adding a constant to every
            # key leaves the softmax unchanged): its values (~1e-7) are rounding noise that
            # Adam normalizes, so it is compared in absolute terms; q and v as everything else.
            q, k, v = a.chunk(3)
            rq, rk, rv = b.chunk(3)
            assert (k - rk).abs().max() <= 1e-6, f"{name} (key part)"
            a, b = torch.cat([q, v]), torch.cat([rq, rv])
        diff = (a - b).norm() / b.norm()
        assert diff <= rel, f"{name}: relative difference {diff:.2e}"
    # the weights moved: equality is not trivially true
    assert losses(reference)[-1] < losses(reference)[0]


def assert_one_run_record(run_dir: Path, world_size: int, accum: int) -> None:
    """Rank 0 alone wrote the record, the metrics (one row per step) and .hydra/."""
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "completed", record["error"]
    assert record["world_size"] == world_size and record["grad_accum_steps"] == accum
    assert record["tokens_per_step"] == 512
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(STEPS))
    assert len(list(run_dir.rglob("record.json"))) == 1
    assert len(list(run_dir.rglob(".hydra"))) == 1 and (run_dir / ".hydra/config.yaml").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> Path:
    """One process, 4 accumulated micro-steps of B=4 per step."""
    tmp = tmp_path_factory.mktemp("single")
    run_cli(
        "gpt2x.train",
        *COMMON,
        f"paths.data_dir={data_root}",
        f"hydra.run.dir={tmp / 'run'}",
        cwd=tmp,
    )
    record = json.loads((tmp / "run" / "record.json").read_text())
    assert record["world_size"] == 1 and record["grad_accum_steps"] == 4
    return tmp / "run"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_root) -> Path:
    """torchrun, 2 ranks, DDP; the run folder comes from Hydra's default (not forced). With
    precision=auto on a CPU whose measured bf16 matmuls are the slower (a prepared peak cache
    for the ranks' one thread): rank 0 takes fp32 and hands it to rank 1 (which would fail on
    an unresolved "auto"), and the run must match the fp32 reference."""
    tmp = tmp_path_factory.mktemp("ddp")
    cache = cached_peaks(tmp / "cache", 0.1, 0.3, threads=1)  # ranks: OMP_NUM_THREADS=1
    torchrun(
        tmp,
        *COMMON,
        "parallel=ddp",
        "precision=auto",
        f"paths.data_dir={data_root}",
        f"paths.output_dir={tmp / 'out'}",
        env={"GPT2X_CACHE": str(cache)},
    )
    return only_run_dir(tmp / "out" / "runs")


def test_ddp_two_ranks_match_one_process_with_accumulation(ddp_run, reference):
    assert_same_training(ddp_run, reference)


def test_ddp_writes_one_run_folder_with_one_record(ddp_run):
    # the folder is named by torchrun's TORCHELASTIC_RUN_ID (a uuid), the same on every rank
    assert re.fullmatch(r"torchrun-[0-9a-f-]{36}", ddp_run.name)
    assert_one_run_record(ddp_run, world_size=2, accum=2)
    precision = json.loads((ddp_run / "record.json").read_text())["config"]["precision"]
    assert (precision["name"], precision["dtype"]) == ("auto", "fp32")
    assert (ddp_run / "train_rank1.log").exists()  # rank 1's log (warnings only) is its own
    assert (ddp_run / "sample.txt").read_text()


def test_fsdp_two_ranks_match_one_process_with_accumulation(tmp_path, data_root, reference):
    torchrun(
        tmp_path,
        *COMMON,
        "parallel=fsdp",
        f"paths.data_dir={data_root}",
        f"paths.output_dir={tmp_path / 'out'}",
    )
    run_dir = only_run_dir(tmp_path / "out" / "runs")
    assert_one_run_record(run_dir, world_size=2, accum=2)
    assert_same_training(run_dir, reference)
    # all ranks joined the sampling forwards (FSDP all-gathers), rank 0 wrote the text
    assert (run_dir / "sample.txt").read_text()


def test_a_crash_on_one_rank_ends_the_job_with_its_error(tmp_path, data_root):
    t0 = time.monotonic()
    proc = torchrun(
        tmp_path,
        *COMMON,
        "trainer.max_steps=20",
        "parallel=ddp",
        f"paths.data_dir={data_root}",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={distributed.TEST_FAIL_RANK_ENV: "1"},
        timeout=240,
        check=False,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 1" in proc.stderr
    assert elapsed < 120, f"the job took {elapsed:.0f}s to end after rank 1 failed"
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] != "completed"
    # the record names the rank that failed and why, not what rank 0 saw of it
    if record["status"] == "failed":
        assert record["error"].startswith(
            "rank 1 failed: RuntimeError: GPT2X_TEST_FAIL_RANK=1: injected failure on rank 1"
        ), record["error"]
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) < 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_srun_style_launch_maps_slurm_variables(tmp_path, data_root, reference):
    """Two plain `python -m gpt2x.train` processes with the variables srun sets (no RANK):
    they form one DDP group and agree on one run folder named after the job."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = clean_env(
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NTASKS="2",
            SLURM_STEP_NUM_TASKS="2",
            SLURM_STEP_ID="0",
            SLURM_JOB_ID="4242",
            SLURM_JOB_NODELIST="localhost",
            SLURM_JOB_NUM_NODES="1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gpt2x.train",
                    *COMMON,
                    "parallel=ddp",
                    f"paths.data_dir={data_root}",
                    f"paths.output_dir={tmp_path / 'out'}",
                ],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    run_dir = only_run_dir(tmp_path / "out" / "runs")
    assert run_dir.name == "slurm-4242.0"
    assert_one_run_record(run_dir, world_size=2, accum=2)
    assert_same_training(run_dir, reference)


def test_submitit_local_launcher_runs_two_task_ddp(tmp_path, data_root, reference):
    """hydra-submitit-launcher with hydra 1.3: hydra/launcher=local_2tasks runs one job as 2
    local processes (submitit's local executor), which form one DDP group."""
    run_cli(
        "gpt2x.train",
        "-m",
        "hydra/launcher=local_2tasks",
        *COMMON,
        "parallel=ddp",
        f"paths.data_dir={data_root}",
        f"paths.output_dir={tmp_path / 'out'}",
        # the default subdir (every override in the name) can pass the 255-byte name limit
        "hydra.sweep.subdir=job${hydra.job.num}",
        cwd=tmp_path,
        env=clean_env(),
    )
    sweep = only_run_dir(tmp_path / "out" / "multirun")
    assert_one_run_record(sweep / "job0", world_size=2, accum=2)
    assert_same_training(sweep / "job0", reference)


# ----------------------------------------------------------------------------- in-process units


@pytest.fixture
def restore_env():
    saved = dict(os.environ)
    try:
        yield
    finally:
        distributed.teardown()
        os.environ.clear()
        os.environ.update(saved)


def setup_run(tmp_path: Path, data_root: Path, *overrides: str):
    """gpt2x.train.setup in this process: a world of one, a real gloo process group."""
    from gpt2x.train import setup

    for key in LAUNCH_ENV:
        os.environ.pop(key, None)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                *TINY,
                f"paths.data_dir={data_root}",
                "logger=none",
                "trainer.save_final=false",
                *overrides,
            ],
        )
    cfg.paths.run_dir = str(tmp_path / "run")
    return setup(cfg)


def test_ddp_all_reduces_once_per_optimization_step(tmp_path, data_root, restore_env):
    """no_sync covers forward AND backward of every micro-step but the last: 3 micro-steps
    all-reduce exactly as often as 1 (counted with a DDP communication hook)."""
    from gpt2x.train import train_step

    run = setup_run(tmp_path, data_root, "parallel=ddp", "trainer.total_batch_tokens=384")
    assert run.grad_accum == 3 and isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    run.model.register_comm_hook(None, counting_hook)
    train_step(run, 0)
    with_accum = len(calls)
    calls.clear()
    run.grad_accum = 1
    train_step(run, 1)
    assert with_accum == len(calls) >= 1


def test_fsdp_shards_keeps_the_tie_and_reduces_once_per_step(tmp_path, data_root, restore_env):
    from torch.distributed.tensor import DTensor

    from gpt2x.train import train_step

    run = setup_run(tmp_path, data_root, "parallel=fsdp", "trainer.total_batch_tokens=384")
    model = run.model
    assert run.dist.kind is ParallelKind.fsdp and model is run.raw_model
    assert model.lm_head.weight is model.transformer.wte.weight  # weight tying survived
    assert all(isinstance(p, DTensor) for p in model.parameters())
    # the optimizer holds the sharded parameters (it was built after fully_shard)
    assert {id(p) for g in run.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()
    }

    def reduces(accum: int) -> int:
        run.grad_accum = accum
        with torch.profiler.profile() as prof:
            row = train_step(run, 0)
        assert isinstance(row["grad_norm"], float)  # not a DTensor
        # FSDP2 labels each gradient reduce-scatter "FSDP::post_backward_reduce (<module>)"
        return sum("FSDP::post_backward_reduce" in e.name for e in prof.events())

    groups = len(model.transformer.h) + 1  # one FSDP group per block, plus the root
    assert reduces(3) == reduces(1) == groups


def test_mixed_precision_policy_follows_the_precision_group():
    from omegaconf import OmegaConf

    def policy(dtype, reduce="auto"):
        return distributed.mixed_precision_policy(OmegaConf.create({"dtype": dtype}), reduce)

    assert policy("fp32") is None
    bf16 = policy("bf16")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    assert policy("bf16", "fp32").reduce_dtype == torch.float32
    fp16 = policy("fp16")
    assert (fp16.param_dtype, fp16.reduce_dtype) == (torch.float16, torch.float32)


def test_scheduler_env_from_slurm_and_submitit():
    slurm = {
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
        "SLURM_NTASKS": "16",
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_JOB_ID": "987654",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "gpu-[007-008]",
    }
    env = distributed.scheduler_env(slurm)
    assert env["RANK"] == "11" and env["LOCAL_RANK"] == "3" and env["WORLD_SIZE"] == "16"
    assert env["LOCAL_WORLD_SIZE"] == "8" and env["MASTER_ADDR"] == "gpu-007"
    assert (
        env["MASTER_PORT"]
        == distributed.scheduler_env({**slurm, "SLURM_PROCID": "0"})["MASTER_PORT"]
    )  # every task derives the same port
    assert 20000 <= int(env["MASTER_PORT"]) < 40000
    # the batch script itself (no job step) is not a rank of anything
    assert distributed.scheduler_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) is None
    local = distributed.scheduler_env(
        {
            "SUBMITIT_LOCAL_GLOBALID": "1",
            "SUBMITIT_LOCAL_LOCALID": "1",
            "SUBMITIT_LOCAL_NTASKS": "2",
            "SUBMITIT_LOCAL_JOB_ID": "77",
        }
    )
    assert (local["RANK"], local["WORLD_SIZE"], local["MASTER_ADDR"]) == ("1", "2", "127.0.0.1")
    assert distributed.scheduler_env({}) is None
    for nodelist, first in [
        ("node1", "node1"),
        ("a[01-04,9],b2", "a01"),
        ("n[3]-ib,x", "n3-ib"),
        ("c1,c2", "c1"),
    ]:
        assert distributed._first_host(nodelist) == first


def test_export_scheduler_env_leaves_torchrun_and_single_tasks_alone(monkeypatch):
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "0")
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "1")
    assert not distributed.export_scheduler_env() and "RANK" not in os.environ
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "2")
    monkeypatch.setenv("RANK", "1")  # torchrun's own variables win
    assert not distributed.export_scheduler_env()
    monkeypatch.delenv("RANK")
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [os.environ.pop(k, None) for k in LAUNCH_ENV])
        assert distributed.export_scheduler_env()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "2")


def test_restarted_torchrun_attempts_use_their_own_store_keys(monkeypatch):
    """After an in-place restart the process group's keys live under the attempt number, so a
    restarted worker never reads the dead attempt's addresses (one node only)."""
    import datetime

    agent = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = datetime.timedelta(seconds=30)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    store = distributed._restart_safe_store(timeout)
    store.set("rank_0", "127.0.0.1:1234")
    assert agent.get("gpt2x/attempt_2/rank_0") == b"127.0.0.1:1234"
    assert not agent.check(["rank_0"])
    # several nodes may number their restarts differently, and without torchrun's agent store
    # rank 0 hosts a fresh store per launch: both keep torch's default
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert distributed._restart_safe_store(timeout) is None
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert distributed._restart_safe_store(timeout) is None


# ----------------------------------------------------------------------------- compile, devices


@pytest.mark.slow
def test_fsdp_compile_covers_blocks_and_head(tmp_path):
    """Under FSDP2, compile_model compiles every block and head_and_loss (ln_f + lm_head + loss),
    not only what dynamo reaches through the FSDP root; inductor's losses equal eager FSDP's."""
    out = tmp_path / "compile.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(Path(__file__).parent / "compile_worker.py"),
            str(out),
            "--inductor",
        ],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2
    blocks = [g for g in r["graphs"] if "scaled_dot_product_attention" in g["ops"]]
    heads = [g for g in r["graphs"] if "cross_entropy" in g["ops"]]
    # one graph serves both blocks (same code), called n_layer=2 times x 2 steps
    assert sum(g["calls"] for g in blocks) == 2 * 2
    assert sum(g["calls"] for g in heads) == 2
    assert all("linear" in g["ops"] and "layer_norm" in g["ops"] for g in heads)
    assert r["compiled"] == pytest.approx(r["eager"], rel=1e-5)
    assert r["eager"][1] != r["eager"][0]  # the optimizer step changed the loss
    assert not any("_orig_mod" in k for k in r["keys"])


def test_compile_model_scopes():
    from gpt2x.model import GPT, GPTConfig

    def tiny() -> GPT:
        return GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=2, n_head=1, n_embd=8))

    whole = distributed.compile_model(tiny(), ParallelKind.single, mode="default")
    assert isinstance(whole, torch._dynamo.eval_frame.OptimizedModule)
    per_block = tiny()
    keys = list(per_block.state_dict())
    out = distributed.compile_model(per_block, ParallelKind.single, scope="block")
    assert out is per_block and list(out.state_dict()) == keys  # in place, same names
    assert all(b._compiled_call_impl is not None for b in out.transformer.h)
    # under fsdp the scope is always per block (compiling the root misses GPT.forward)
    fsdp = distributed.compile_model(tiny(), ParallelKind.fsdp, scope="model")
    assert all(b._compiled_call_impl is not None for b in fsdp.transformer.h)
    with pytest.raises(ConfigError, match="use model or block"):
        distributed.compile_model(tiny(), ParallelKind.single, scope="layer")


def world_of_one(kind: str, **parallel) -> tuple[torch.nn.Module, distributed.Dist]:
    """A tiny GPT wrapped for `kind` in this process (a real 1-rank gloo group)."""
    from gpt2x.model import GPT, GPTConfig

    for key in LAUNCH_ENV:
        os.environ.pop(key, None)
    d = distributed.setup(SimpleNamespace(kind=kind, backend="auto", **parallel), "cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    return distributed.wrap_model(model, d), d


def test_fsdp_root_stays_gathered_from_forward_to_backward(restore_env):
    """The root (wte = lm_head, wpe, ln_f) keeps FSDP2's root default: not resharded after
    forward, so backward does not all-gather it again; blocks follow
    parallel.reshard_after_forward. FSDP2 swaps the module's parameters: DTensor = sharded."""
    from torch.distributed.tensor import DTensor

    x = torch.randint(0, 64, (2, 16))
    for reshard in (True, False):
        model, _ = world_of_one("fsdp", reshard_after_forward=reshard)
        _, loss = model(x, x)
        assert not isinstance(model.transformer.wte.weight, DTensor)
        assert not isinstance(model.transformer.ln_f.weight, DTensor)
        assert isinstance(model.transformer.h[0].mlp.c_fc.weight, DTensor) is reshard
        loss.backward()
        assert isinstance(model.transformer.wte.weight, DTensor)  # resharded after backward
        distributed.teardown()


def test_ddp_gradients_are_views_into_its_buckets(restore_env):
    model, _ = world_of_one("ddp")
    assert model.gradient_as_bucket_view
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    # a tiny model fits one bucket: every gradient is a view of the same flat buffer
    storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda as on a machine with 4 GPUs; set_device calls are recorded."""
    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(torch.device(dev)))
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    return calls


def test_each_rank_takes_its_own_gpu(fake_gpus, monkeypatch):
    cuda = torch.device
    assert distributed.pick_device("cuda", 3, world_size=8) == cuda("cuda", 3)
    assert distributed.pick_device("auto", 2, world_size=8) == cuda("cuda", 2)
    # one GPU per task bound by the scheduler: rank 5 sees one device, cuda:0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.pick_device("cuda", 5, world_size=8) == cuda("cuda", 0)
    # an explicit index is fine for a world of one (a 1-rank ddp/fsdp run included)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.pick_device("cuda:2", 0, world_size=1) == cuda("cuda", 2)


def test_explicit_gpu_index_with_several_ranks_is_a_config_error(fake_gpus, monkeypatch):
    with pytest.raises(ConfigError, match="use trainer.device=cuda "):
        distributed.pick_device("cuda:0", 1, world_size=2)
    with pytest.raises(ConfigError, match="only 4 CUDA device"):
        distributed.pick_device("cuda:4", 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks on a 4-GPU node
    with pytest.raises(ConfigError, match="nproc_per_node"):
        distributed.pick_device("cuda", 5, world_size=8)
    # through setup, before any process group: the one-line error, nothing initialised
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = SimpleNamespace(kind="ddp", backend="auto")
    with pytest.raises(ConfigError, match="puts all 2 ranks on one GPU"):
        distributed.setup(cfg, "cuda:0")
    assert not torch.distributed.is_initialized() and fake_gpus == []


def test_single_process_on_gpu_n_makes_it_the_current_device(fake_gpus):
    d = distributed.setup(SimpleNamespace(kind="single"), "cuda:3")
    assert d.device == torch.device("cuda", 3) and fake_gpus == [torch.device("cuda", 3)]
