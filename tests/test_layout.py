"""The package's shape: layers import only downward (no cycle, read from the source), the run
folder layer and the report never load torch, and a wheel built from the repo runs on its own."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "gpt2x"
# the commands (`python -m gpt2x.<command>`): nothing below them imports them
TRAINER_COMMANDS = {"gpt2x.train", "gpt2x.prepare", "gpt2x.sample", "gpt2x.export", "gpt2x.evaluate"}
LAB_COMMANDS = {"gpt2x.ablate", "gpt2x.report", "gpt2x.sweep"}


def torch_free() -> list[str]:
    """The run record and the lab (and the lab's commands) run on any machine: no torch."""
    mods = [module_name(f) for d in ("record", "lab") for f in sorted((PACKAGE / d).glob("*.py"))]
    return [*mods, "gpt2x.training.turns", "gpt2x.report", "gpt2x.sweep"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every gpt2x import of every module, top-level and function-local alike."""
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                dep = owner(t) if t.startswith("gpt2x") else None
                # a submodule may use its own package's __init__ (re-exports)
                if dep and dep != mod and not mod.startswith(dep + "."):
                    graph[mod].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "gpt2x.train" in graph and graph["gpt2x.train"]  # the graph was really read
    assert cycles(graph) == []


def test_a_cycle_is_found_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def layer(mod: str) -> str:
    """config/model (the ground), record, data/checkpoint/training (components), commands, lab."""
    if mod in TRAINER_COMMANDS or mod == "gpt2x.tools":
        return "commands"
    if mod in LAB_COMMANDS or mod.startswith("gpt2x.lab"):
        return "lab"
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("record", "data", "checkpoint", "training") else "ground"


# which layer may import which (besides itself): the folders are the layers, bottom to top
MAY_IMPORT = {
    "ground": {"ground"},
    "record": {"ground"},
    "data": {"ground", "record"},
    "checkpoint": {"ground", "record", "data"},
    "training": {"ground", "record", "data", "checkpoint"},
    "commands": {"ground", "record", "data", "checkpoint", "training", "commands"},
    "lab": {"ground", "record", "training", "lab"},  # training: torch-free parts only (below)
}


def test_every_import_goes_down_the_layers():
    graph = import_graph()
    assert {layer(m) for m in graph} == set(MAY_IMPORT)  # every folder has its modules
    for mod, deps in graph.items():
        for dep in deps:
            assert layer(dep) in MAY_IMPORT[layer(mod)] | {layer(mod)}, f"{mod} imports {dep}"
    # nanoGPT's model.py imports nothing of its repo; gpt2x's, only its chunked-loss kernel
    assert "gpt2x.model" in graph and graph["gpt2x.model"] <= {"gpt2x.chunked_loss"}
    assert graph["gpt2x.chunked_loss"] == set()
    # the lab reaches into training only for what needs no torch
    lab_uses = {d for m, deps in graph.items() if layer(m) == "lab" for d in deps}
    assert {d for d in lab_uses if layer(d) == "training"} <= set(torch_free())


@pytest.mark.parametrize("module", torch_free())
def test_the_run_record_and_the_lab_never_load_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_no_project_file_points_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    needle = "../" + "shared"
    hits = [
        f
        for f in tracked
        if (REPO / f).is_file() and needle in (REPO / f).read_text(errors="ignore")
    ]
    assert hits == []


@pytest.mark.slow
def test_a_built_wheel_trains_from_an_unrelated_folder(tmp_path):
    """pip wheel . -> a fresh virtual environment (torch etc. from this one, via
    --system-site-packages) -> `python -m gpt2x.train debug=fast_dev_run` elsewhere."""
    dist = tmp_path / "dist"
    leftover = not (REPO / "build").exists()  # setuptools builds in <repo>/build: clean it up
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            dist,
            REPO,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    if leftover:
        shutil.rmtree(REPO / "build", ignore_errors=True)
    (wheel,) = dist.glob("gpt2x-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # a fresh environment, nothing installed
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the wheel, installed into the fresh environment's own site-packages
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site, wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # its dependencies (torch, hydra, ...) from this environment, without installing them again:
    # a path in a .pth file is added to sys.path but its own .pth files (this environment's
    # editable gpt2x hook) are not run, so `import gpt2x` finds the wheel
    outer = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (Path(site) / "outer_deps.pth").write_text(outer + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    where = subprocess.run(
        [py, "-c", "import gpt2x; print(gpt2x.CONF_DIR)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where == str(Path(site) / "gpt2x" / "conf")  # the wheel's own configs
    assert (Path(where).parent / "assets" / "hellaswag_sample.jsonl").is_file()  # package data
    for group in (
        "experiment/ladder/fp32.yaml", "experiment/ladder/nano_cpu.yml",
        "sweep/batch_size.yaml",
        "model/gpt2.yaml",
    ):
        assert (Path(where) / group).is_file(), group
    proc = subprocess.run(
        [
            py,
            "-m",
            "gpt2x.train",
            "debug=fast_dev_run",
            "trainer.device=cpu",
            "model.n_layer=1",
            "model.n_embd=32",
            "model.n_head=2",
            "model.block_size=32",
            "trainer.micro_batch_size=2",
            f"paths.data_dir={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"status": "completed"' in (tmp_path / "run" / "record.json").read_text()


def test_the_torch_floor_is_the_one_the_imports_need():
    """pyproject's torch floor is where FSDP2 and DTensor became public: the import paths the
    code uses exist, and the floor is stated once."""
    import re as _re

    import torch
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # noqa: F401
    from torch.distributed.tensor import DTensor  # noqa: F401

    text = (REPO / "pyproject.toml").read_text()
    (floor,) = _re.findall(r'"torch>=([\d.]+)"', text)
    assert floor == "2.6"
    have = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert have >= (2, 6)
