"""The training state and its checkpointer, in-process on a tiny model: TrainState speaks
state_dict generically over its fields, the Checkpointer saves and loads every stateful part
together, trainer.pt keeps the layout older checkpoints have (and such a checkpoint, built here
the way gpt2x wrote it before the TrainState, still loads), and "distributed" is one test."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from gpt2x.checkpoint import LOSS_HISTORY, Checkpointer, TrainState
from gpt2x.checkpoint import state as checkpoint_state
from gpt2x.checkpoint import store as checkpoint_store
from gpt2x.config import ParallelKind
from gpt2x.model import GPT, GPTConfig
from gpt2x.training import distributed
from gpt2x.training.optim import build_optimizer

# trainer.pt's keys as gpt2x wrote them before the TrainState (and still does)
TRAINER_KEYS = {
    "step",
    "tokens_seen",
    "loader",
    "scaler",
    "rng",
    "world_size",
    "loss_history",
    "skip_batches",
    "rollbacks",
    "lr_schedule",
}


class Position:
    """A stand-in train loader: only its position is state."""

    def __init__(self, batch: int = 0):
        self.batch = batch

    def state_dict(self) -> dict:
        return {"batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.batch = state["batch"]


def tiny(seed: int):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    optim_cfg = SimpleNamespace(
        lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, fused=False
    )
    optimizer = build_optimizer(model, optim_cfg)
    x = torch.randint(0, 64, (2, 8))
    model(x, x)[1].backward()
    optimizer.step()
    return model, optimizer


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------
# TrainState


def test_train_state_round_trips_by_its_fields_and_defaults_what_is_missing():
    state = TrainState(step=7, tokens_seen=896, loss_history=[4.0, 3.5], skip_batches={5: 1})
    state.rollbacks.append({"step": 5, "to_step": 4, "error": "loss is nan at step 5"})
    saved = state.state_dict()
    assert set(saved) == {"step", "tokens_seen", "loss_history", "skip_batches", "rollbacks"}
    state.loss_history.append(3.0)  # the saved dict is a copy, not a view
    assert saved["loss_history"] == [4.0, 3.5]

    fresh = TrainState()
    fresh.load_state_dict({**saved, "loader": {"batch": 9}})  # other parts' keys are not its own
    assert fresh == TrainState(7, 896, [4.0, 3.5], {5: 1}, saved["rollbacks"])
    fresh.load_state_dict({"step": 2, "tokens_seen": 256})  # a checkpoint older than the rest
    assert fresh == TrainState(step=2, tokens_seen=256)


def test_a_field_added_to_the_train_state_is_checkpointed_without_other_edits(tmp_path):
    @dataclass
    class WithEma(TrainState):
        ema_loss: float = 0.0

    model, optimizer = tiny(0)
    Checkpointer(tmp_path, model, optimizer, WithEma(step=3, ema_loss=2.5)).save()
    loaded = Checkpointer(tmp_path, model, optimizer, WithEma())
    loaded.load(tmp_path / "checkpoints" / "step_000003")
    assert (loaded.state.step, loaded.state.ema_loss) == (3, 2.5)
    # a checkpoint written before the field existed gives its default
    Checkpointer(tmp_path, model, optimizer, TrainState(step=4)).save()
    loaded.load(tmp_path / "checkpoints" / "step_000004")
    assert (loaded.state.step, loaded.state.ema_loss) == (4, 0.0)


def test_loss_history_keeps_the_recent_losses_and_a_rollback_keeps_the_history():
    state = TrainState()
    for i in range(LOSS_HISTORY + 7):
        state.record_loss(float(i))
    assert state.loss_history == [float(i) for i in range(7, LOSS_HISTORY + 7)]

    state = TrainState(step=9, skip_batches={5: 1}, rollbacks=[{"step": 5}])
    with state.keeping_history():  # what a rollback does around loading the older checkpoint
        state.load_state_dict(TrainState(step=4).state_dict())
    assert (state.step, state.skip_batches, state.rollbacks) == (4, {5: 1}, [{"step": 5}])


# ---------------------------------------------------------------------------------------------
# the checkpointer


def test_checkpointer_saves_and_loads_every_part_together(tmp_path):
    model, optimizer = tiny(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    state = TrainState(step=6, tokens_seen=768, loss_history=[3.0], skip_batches={2: 1})
    saver = Checkpointer(
        tmp_path, model, optimizer, state, scaler=scaler, loader=Position(7), keep_last=1
    )
    torch.manual_seed(123)
    path = saver.save(info={"lr_schedule": {"next_step": 6}})
    expected_draw = torch.rand(3)  # what the RNG gives right after the save
    assert saver.last == path and path.name == "step_000006"
    trainer = torch.load(path / checkpoint_store.TRAINER_FILE, weights_only=True)
    assert set(trainer) == TRAINER_KEYS  # the file keeps its layout
    assert trainer["loader"] == {"batch": 7} and trainer["world_size"] == 1

    model2, optimizer2 = tiny(1)
    scaler2, loader2 = torch.amp.GradScaler("cpu", init_scale=2.0), Position()
    loader = Checkpointer(tmp_path, model2, optimizer2, scaler=scaler2, loader=loader2)
    loader.load(path)
    assert loader.last == path
    assert loader.state == state and loader.state is not state
    assert loader2.batch == 7 and scaler2.get_scale() == 64.0
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved
    assert_same_weights(model, model2)
    for k, v in optimizer.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], optimizer2.state_dict()["state"][k]["exp_avg"])

    state.step = 8
    saver.save()  # keep_last=1: the older one is pruned after the new one is complete
    assert [s for s, _ in checkpoint_store.list_checkpoints(tmp_path / "checkpoints")] == [8]


def old_layout_checkpoint(run_dir, model, optimizer, **trainer) -> None:
    """A checkpoint written the way gpt2x wrote one before the TrainState and the Checkpointer:
    files, meta.json and trainer.pt's dict spelled out by hand."""
    aliases = checkpoint_state.tied_aliases(model)
    tensors = {
        k: v.contiguous()
        for k, v in checkpoint_state.gather_model_state(model).items()
        if k not in aliases
    }
    root = checkpoint_store.checkpoints_dir(run_dir)
    files = [
        (checkpoint_store.MODEL_FILE, checkpoint_store.save_safetensors, tensors),
        (
            checkpoint_store.OPTIM_FILE,
            checkpoint_store.save_torch,
            checkpoint_state.gather_optimizer_state(model, optimizer),
        ),
        (checkpoint_store.TRAINER_FILE, checkpoint_store.save_torch, trainer),
        (checkpoint_store.CONFIG_FILE, checkpoint_store.save_json, {}),
    ]
    meta = {
        "format": checkpoint_store.FORMAT,
        "version": 1,
        "step": trainer["step"],
        "tokens_seen": trainer["tokens_seen"],
        "created_at": "2026-01-01T00:00:00+0000",
        "world_size": 1,
        "tied": aliases,
        "torch": torch.__version__,
    }
    final = root / checkpoint_store.step_dir_name(trainer["step"])
    checkpoint_store.write_checkpoint(root, final, files, meta)


def test_a_checkpoint_in_the_earlier_layout_loads(tmp_path):
    model, optimizer = tiny(0)
    torch.manual_seed(5)
    rng = checkpoint_state.rng_state()
    expected_draw = torch.rand(2)
    old = {
        "step": 4,
        "tokens_seen": 512,
        "loader": {"batch": 5},
        "scaler": {},  # a disabled GradScaler's
        "rng": [rng],
        "world_size": 1,
        "loss_history": [4.1, 3.9],
        "skip_batches": {3: 1},
        "rollbacks": [{"step": 3, "to_step": 2, "error": "loss is nan at step 3"}],
        "lr_schedule": {"next_step": 4, "max_steps": 8, "next_lr": 0.001},
    }
    old_layout_checkpoint(tmp_path / "a", model, optimizer, **old)
    model2, optimizer2 = tiny(1)
    position = Position()
    ckpt = Checkpointer(tmp_path / "a", model2, optimizer2, loader=position)
    ckpt.load(tmp_path / "a" / "checkpoints" / "step_000004")
    assert ckpt.state == TrainState(4, 512, [4.1, 3.9], {3: 1}, old["rollbacks"])
    assert position.batch == 5 and torch.equal(torch.rand(2), expected_draw)
    assert_same_weights(model, model2)

    # older still: before rollbacks were kept, a trainer.pt had neither list
    del old["skip_batches"], old["rollbacks"]
    old_layout_checkpoint(tmp_path / "b", model, optimizer, **old)
    ckpt.load(tmp_path / "b" / "checkpoints" / "step_000004")
    assert ckpt.state == TrainState(4, 512, [4.1, 3.9])


# ---------------------------------------------------------------------------------------------
# one predicate for "distributed"


def test_distributed_is_more_than_one_process_in_a_process_group(monkeypatch):
    cpu = torch.device("cpu")
    two = distributed.Dist(ParallelKind.ddp, 0, 0, 2, cpu)
    assert not distributed.is_distributed(2) and not two.is_distributed  # no process group
    assert checkpoint_store.broadcast("mine", two) == "mine"  # so no collective is tried
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert distributed.is_distributed(2) and two.is_distributed
    # a ddp world of one has a process group but no peers
    assert not distributed.Dist(ParallelKind.ddp, 0, 0, 1, cpu).is_distributed
