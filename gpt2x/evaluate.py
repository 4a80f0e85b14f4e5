"""`python -m gpt2x.evaluate checkpoint=<path> [hellaswag=true]`: evaluate a checkpoint.

Validation loss is computed exactly as the trainer does (`gpt2x.train.validation_loss_sum` over
the first `eval_tokens // seq_len` windows of the prepared val split, the same set for any batch
or world size), so it reproduces the run's `val_loss` for the same checkpoint; `hellaswag=true`
adds HellaSwag acc / acc_norm (gpt2x/hellaswag.py). Prints one JSON line.

    python -m gpt2x.evaluate checkpoint=outputs/runs/<id> hellaswag=true hellaswag_limit=500
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from gpt2x import checkpoint
from gpt2x.config import TrainerConfig

OPTIONS = {
    "checkpoint": ("", "checkpoint folder, run folder or checkpoints/ folder"),
    "val": (True, "compute the validation loss"),
    "eval_tokens": (0, "validation tokens; 0 = the run's trainer.eval_tokens"),
    "data_dir": ("", "prepared data folder; '' = the run's data.dir"),
    "hellaswag": (False, "also score HellaSwag"),
    "hellaswag_path": ("", "hellaswag jsonl; '' = the run's trainer.hellaswag_path or val split"),
    "hellaswag_limit": (0, "score only the first N examples; 0 = all"),
    "precision": ("", "fp32 | bf16; '' = the run's autocast dtype"),
    "device": ("auto", "auto | cpu | cuda | cuda:N | mps"),
}


def val_loss(
    model, config: dict, data_dir: str | Path, eval_tokens: int, autocast_ctx, device
) -> float:
    """The trainer's validation loss for this model, in one process."""
    from gpt2x.data import ShardLoader
    from gpt2x.train import validation_loss_sum

    t = config["trainer"]
    reader = ShardLoader(data_dir, "val", batch_size=1, seq_len=t["seq_len"], shuffle=False)
    model.eval()
    total, count = validation_loss_sum(
        model, reader, eval_tokens, t["micro_batch_size"], 0, 1, device, autocast_ctx
    ).tolist()
    return total / count


def main(argv: Sequence[str] | None = None) -> dict:
    from gpt2x.data import DataError
    from gpt2x.hellaswag import HellaSwagError, evaluate_hellaswag, hellaswag_path
    from gpt2x.precision import autocast

    args = checkpoint.parse_kv(
        "gpt2x.evaluate",
        sys.argv[1:] if argv is None else argv,
        OPTIONS,
        required=["checkpoint"],
    )
    device = checkpoint.pick_device(args["device"])
    try:
        model, meta, config = checkpoint.load_model(args["checkpoint"], device)
    except checkpoint.CheckpointError as e:
        checkpoint.fail(str(e))
    dtype = args["precision"] or config.get("precision", {}).get("dtype", "fp32")
    if dtype not in ("fp32", "bf16", "fp16") or (dtype == "fp16" and device.type != "cuda"):
        checkpoint.fail(f"precision={dtype} cannot run on {device.type}; use precision=fp32")

    def autocast_ctx():
        return autocast(SimpleNamespace(dtype=dtype), device)

    result: dict = {
        "checkpoint": meta["path"],
        "step": meta["step"],
        "tokens_seen": meta["tokens_seen"],
    }
    t = config.get("trainer", {})
    if args["val"]:
        data_dir = args["data_dir"] or config.get("data", {}).get("dir", "")
        eval_tokens = args["eval_tokens"] or int(t.get("eval_tokens", TrainerConfig.eval_tokens))
        try:
            result["val_loss"] = val_loss(
                model, config, data_dir, eval_tokens, autocast_ctx, device
            )
        except (DataError, OSError, KeyError) as e:
            checkpoint.fail(f"validation data {data_dir!r}: {e} (set data_dir=...)")
    if args["hellaswag"]:
        try:
            path = args["hellaswag_path"] or t.get("hellaswag_path") or hellaswag_path("val")
            res = evaluate_hellaswag(
                lambda x: model(x)[0],
                _encode(),
                path,
                limit=args["hellaswag_limit"] or None,
                device=device,
                autocast_ctx=autocast_ctx(),
                max_len=model.config.block_size,
            )
        except HellaSwagError as e:
            checkpoint.fail(str(e))
        result.update(
            hellaswag_acc=res["acc"],
            hellaswag_acc_norm=res["acc_norm"],
            hellaswag_n=res["n"],
            hellaswag_path=str(path),
        )
    print(
        json.dumps(
            {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in result.items()
            }
        )
    )
    return result


def _encode():
    from gpt2x.tokenizer import get_tokenizer

    return get_tokenizer().encode_ordinary


if __name__ == "__main__":
    main()
