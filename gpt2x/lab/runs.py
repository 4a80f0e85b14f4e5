"""Run folders loaded for comparison (docs/report.md): each record.json with its metrics and
eval rows, a display name per run (repeats of one configuration share it), runs grouped into
configurations. Torch-free; the numbers are gpt2x.lab.summary's.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2x import TRAIN_MODULE
from gpt2x.record.failure import one_line
from gpt2x.record.folder import EVAL, METRICS, RECORD, config_hash, read_jsonl

REPEAT_IN_NAME = re.compile(r"(?<=[_,])repeat=\d+,?")


class ReportError(RuntimeError):
    """A problem with the input (missing folder, no records); the message is one line."""


@dataclass
class Run:
    """One run folder: its record.json, metrics rows, eval rows and a display name."""

    path: Path
    record: dict
    metrics: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    name: str = ""
    named_by_folder: bool = False  # no `experiment`: the name is the folder's (a sweep job's)

    @property
    def status(self) -> str:
        return str(self.record.get("status") or "unknown")

    @property
    def error(self) -> str | None:
        err = self.record.get("error")
        return one_line(err) if err else None

    @property
    def ok(self) -> bool:
        """Finished normally: the only runs whose numbers are compared."""
        return self.status == "completed" and not self.error

    @property
    def config(self) -> dict:
        cfg = self.record.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def repeat(self) -> int:
        r = self.config.get("repeat")
        return r if isinstance(r, int) and not isinstance(r, bool) else 0

    @property
    def group(self) -> tuple[str, str]:
        """Runs that differ only in `repeat` are repeats of one configuration: one table row."""
        if not self.config:
            return (self.name, str(self.path))
        return (self.name, config_hash({k: v for k, v in self.config.items() if k != "repeat"}))


def _by_step(rows: list[dict]) -> list[dict]:
    """One row per step in step order; a resumed run's repeated steps keep their last row."""
    if not rows or not all(isinstance(r.get("step"), int) for r in rows):
        return rows
    last: dict[int, dict] = {}
    for r in rows:
        last[r["step"]] = r
    return [last[s] for s in sorted(last)]


def _natural_key(text: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def load_run(folder: str | Path) -> Run:
    folder = Path(folder)
    record_path = folder / RECORD
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"no record.json in {folder}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read {record_path}: {one_line(e)}") from None
    if not isinstance(record, dict):
        raise ReportError(f"cannot read {record_path}: not a JSON object")
    experiment = str(record.get("experiment") or "")
    return Run(
        path=folder,
        record=record,
        metrics=_by_step(read_jsonl(folder / METRICS)),
        evals=read_jsonl(folder / EVAL),
        name=experiment or _config_name(folder.name),
        named_by_folder=not experiment,
    )


def _config_name(folder: str) -> str:
    """A sweep job's folder (`<job num>_<overrides>`) without its job number and `repeat=N`,
    so the repeats of one configuration share a name (one row)."""
    if not REPEAT_IN_NAME.search(folder):
        return folder
    return re.sub(r"^\d+_", "", REPEAT_IN_NAME.sub("", folder)).rstrip(",") or folder


def load_runs(paths: str | Path | Iterable[str | Path]) -> list[Run]:
    """Every run under the given folders (recursively), in the order the folders are given.

    Within one folder, runs are ordered by start time (then by path, numbers compared as
    numbers). Failed runs are kept. Display names that collide get their folder name appended.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs: list[Run] = []
    seen: set[Path] = set()
    for p in paths:
        folder = Path(p)
        if not folder.exists():
            raise ReportError(f"no such folder: {folder}")
        if folder.is_file():
            if folder.name != RECORD:
                raise ReportError(f"not a folder: {folder}")
            found = [folder]
        else:
            found = list(folder.rglob(RECORD))
        if not found:
            raise ReportError(f"no record.json found under {folder}")
        here = [load_run(f.parent) for f in found if f.parent.resolve() not in seen]
        seen.update(r.path.resolve() for r in here)
        here.sort(key=lambda r: (str(r.record.get("started_at") or ""), _natural_key(str(r.path))))
        runs.extend(here)
    _what_varies(runs)
    _disambiguate(runs)
    return runs


def _what_varies(runs: list[Run]) -> None:
    """Runs without an experiment name (sweep jobs) are named by their overrides (the record's,
    else the folder's `key=value,...`), which repeat every override of the command line:
    overrides that every such run has are left out, so a name shows what varies
    (`trainer.micro_batch_size=4`). Runs that differ in nothing else keep their folder's name."""
    named = [r for r in runs if r.named_by_folder]
    if len(named) < 2:
        return
    items = [_name_items(r) for r in named]
    common = set(items[0]).intersection(*items[1:])
    for run, parts in zip(named, items):
        run.name = ",".join(p for p in parts if p not in common) or run.name


def _name_items(run: Run) -> list[str]:
    overrides = run.record.get("overrides")
    if isinstance(overrides, list) and overrides:  # `repeat` never names a row (one row)
        return [str(o) for o in overrides if not str(o).lstrip("+").startswith("repeat=")]
    return run.name.split(",")


def _disambiguate(runs: list[Run]) -> None:
    """Runs of different configurations that share a name get their folder name appended
    (repeats of one configuration keep the name: they are one row)."""
    groups: dict[str, set] = {}
    for r in runs:
        groups.setdefault(r.name, set()).add(r.group)
    for r in runs:
        if len(groups[r.name]) > 1 and r.name != r.path.name:
            r.name = f"{r.name} [{r.path.name}]"


def group_runs(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs grouped into configurations (repeats together), in first-seen order."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return [sorted(g, key=lambda r: r.repeat) for g in groups.values()]


def rerun_command(run: Run) -> str:
    """The command that reproduces a run: the trainer with the run's recorded overrides."""
    overrides = run.record.get("overrides") or []
    ws = run.record.get("world_size") or 1
    launch = (
        f"torchrun --standalone --nproc_per_node={ws} -m {TRAIN_MODULE}"
        if isinstance(ws, int) and ws > 1
        else f"python -m {TRAIN_MODULE}"
    )
    return " ".join([launch, *(shlex.quote(str(o)) for o in overrides)])


# --------------------------------------------------------------------------------------------
# Values read from records


def number(value: Any) -> float | None:
    """A float from a JSON value (the record writes NaN/inf as strings); None if not a number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def config_value(config: dict, key: str) -> Any:
    """`a.b.c` looked up in a nested config dict; None where absent."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def distinct(values: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for v in values:
        if v not in (None, "") and str(v) not in out:
            out.append(str(v))
    return out
