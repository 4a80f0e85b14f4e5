"""Checkpoints: atomic save, verified load, exact resume (docs/checkpoints.md).

One checkpoint is one folder `<run_dir>/checkpoints/step_000100/` (100 optimization steps done,
so a resumed run starts with step index 100):

    model.safetensors  the weights (tied aliases such as lm_head.weight stored once)
    optimizer.pt       AdamW state, keyed by parameter name (torch.save, weights_only-loadable)
    trainer.pt         the TrainState's fields (step, tokens seen, recent losses for the spike
                       check, batches skipped and rollbacks), GradScaler, train-loader position,
                       RNG states per rank
    config.json        the resolved run config
    meta.json          format version, step, tokens_seen, size + sha256 of every file above;
                       written LAST: a folder without a readable meta.json is not a checkpoint

Atomicity: everything is written into `step_000100.tmp/`, each file fsync'ed, meta.json last,
then the folder is renamed to `step_000100/`. A kill or a failed write (ENOSPC, ...) leaves at
most a `*.tmp` folder, which is never considered a checkpoint and is removed by the next save;
older checkpoints are only pruned (`keep_last`) after a new one is complete.

State is gathered with `torch.distributed.checkpoint.state_dict.get_model_state_dict` /
`get_optimizer_state_dict` (full state dicts, offloaded to CPU), which work for a plain module,
DDP and FSDP2 alike; all ranks call `Checkpointer.save`, rank 0 writes. A sharded FSDP path
(`torch.distributed.checkpoint.save` into the same folder layout) can be added inside
`Checkpointer.save`/`load` without changing their callers.

    state.py  what is saved and restored: `TrainState`, `Checkpointer` (every stateful part of
              a run), `save`/`restore` (the same without a run), `load_model` (inference)
    store.py  files: atomic write, verify, list/prune, resolve a path or `trainer.resume`
"""

from gpt2x.checkpoint.state import (
    LOSS_HISTORY,
    Checkpointer,
    TrainState,
    check_architecture,
    clean_keys,
    gather_model_state,
    load_model,
    load_model_state,
    restore,
    save,
)
from gpt2x.checkpoint.store import (
    CONFIG_FILE,
    META_FILE,
    MODEL_FILE,
    OPTIM_FILE,
    TRAINER_FILE,
    CheckpointError,
    checkpoints_dir,
    latest,
    list_checkpoints,
    preflight,
    read_config,
    read_meta,
    resolve,
    resolve_resume,
    verify,
)

__all__ = [
    "CONFIG_FILE",
    "LOSS_HISTORY",
    "META_FILE",
    "MODEL_FILE",
    "OPTIM_FILE",
    "TRAINER_FILE",
    "CheckpointError",
    "Checkpointer",
    "TrainState",
    "check_architecture",
    "checkpoints_dir",
    "clean_keys",
    "gather_model_state",
    "latest",
    "list_checkpoints",
    "load_model",
    "load_model_state",
    "preflight",
    "read_config",
    "read_meta",
    "resolve",
    "resolve_resume",
    "restore",
    "save",
    "verify",
]
