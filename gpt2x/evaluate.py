"""`python -m gpt2x.evaluate checkpoint=<path> [hellaswag=true]`: evaluate a checkpoint, or a
Hugging Face GPT-2 (`hf_model=gpt2`, a Hub name or a local folder) for the published baselines.

Validation loss is computed exactly as the trainer does (gpt2x.training.validation: the first
`eval_tokens // seq_len` windows of the prepared val split, the same set for any batch or world
size), so it reproduces a run's `val_loss` for the same checkpoint; `hellaswag=true` adds
HellaSwag acc / acc_norm (gpt2x.training.hellaswag, batched). Prints one JSON line.

    python -m gpt2x.evaluate checkpoint=outputs/runs/<id> hellaswag=true hellaswag_limit=500
    python -m gpt2x.evaluate hf_model=gpt2 hellaswag=true \
        data_dir=~/.cache/gpt2x/data/fineweb_edu          # OpenAI GPT-2 124M's own numbers
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import hydra
from omegaconf import DictConfig

from gpt2x import CONF_DIR, checkpoint
from gpt2x.config import ConfigError, TrainerConfig, register_configs
from gpt2x.data import DataError
from gpt2x.data.tokenizer import get_tokenizer
from gpt2x.model import GPT
from gpt2x.record.failure import one_line
from gpt2x.sample import run_dtype
from gpt2x.tools import fail
from gpt2x.training.distributed import pick_device
from gpt2x.training.hellaswag import HellaSwagError, evaluate_hellaswag, hellaswag_path
from gpt2x.training.precision import autocast
from gpt2x.training.validation import val_reader, validation_loss_sum

# a Hugging Face model has no run config: the reproduce recipe's validation set (20 batches of
# 64 x 1024 tokens on each of 8 ranks, as in the lecture) and batch
HF_EVAL_TOKENS = 20 * 64 * 1024 * 8
HF_MICRO_BATCH = 16


def load(cfg: DictConfig, device) -> tuple[GPT, dict, dict, str]:
    """(model, result header, the run's config or {}, autocast dtype) of what to evaluate."""
    if bool(cfg.checkpoint) == bool(cfg.hf_model):
        fail("give one of checkpoint=<checkpoint or run folder> or hf_model=<gpt2 | folder>")
    if cfg.hf_model:
        dtype = run_dtype(cfg.precision or "fp32", {}, device)
        try:
            model = GPT.from_pretrained(cfg.hf_model)
        except OSError as e:  # no network and nothing cached
            fail(
                f"cannot load hf_model={cfg.hf_model} ({one_line(e)}); with no network, "
                "download it where there is one (huggingface-cli download gpt2) or pass a local "
                "folder: hf_model=/path/to/gpt2"
            )
        return model.to(device).eval(), {"hf_model": cfg.hf_model}, {}, dtype
    ckpt = checkpoint.resolve(cfg.checkpoint)
    config = checkpoint.read_config(ckpt)
    dtype = run_dtype(cfg.precision, config, device)
    model, meta, config = checkpoint.load_model(ckpt, device, dtype=dtype)
    header = {"checkpoint": meta["path"], "step": meta["step"], "tokens_seen": meta["tokens_seen"]}
    return model, header, config, dtype


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    try:
        device = pick_device(cfg.device, 0)
        model, result, config, dtype = load(cfg, device)
    except (checkpoint.CheckpointError, ConfigError) as e:
        fail(str(e))

    def autocast_ctx():
        return autocast(SimpleNamespace(dtype=dtype), device)

    t = config.get("trainer", {})
    if cfg.val:
        data_dir = cfg.data_dir or config.get("data", {}).get("dir", "")
        if not data_dir:
            fail("no validation data: set data_dir=<a prepared data folder> (or val=false)")
        eval_tokens = cfg.eval_tokens or int(
            t.get("eval_tokens", HF_EVAL_TOKENS if cfg.hf_model else TrainerConfig.eval_tokens)
        )
        batch = cfg.micro_batch_size or int(t.get("micro_batch_size", HF_MICRO_BATCH))
        seq_len = int(t.get("seq_len", model.config.block_size))
        try:
            reader = val_reader(Path(data_dir).expanduser(), seq_len)
            total, count = validation_loss_sum(
                model, reader, eval_tokens, batch, 0, 1, device, autocast_ctx
            ).tolist()
        except (DataError, OSError) as e:
            fail(f"validation data {data_dir!r}: {e} (set data_dir=...)")
        result.update(val_loss=total / count, val_tokens=int(count), data_dir=str(data_dir))
    if cfg.hellaswag:
        try:
            path = (
                cfg.hellaswag_path
                or t.get("hellaswag_path")
                or hellaswag_path("val", option="hellaswag_path")
            )
            res = evaluate_hellaswag(
                lambda x: model(x)[0],
                get_tokenizer().encode_ordinary,
                path,
                limit=cfg.hellaswag_limit or None,
                device=device,
                autocast_ctx=autocast_ctx(),
                max_len=model.config.block_size,
                examples_per_batch=cfg.hellaswag_batch,
                logits_at=model.logits_at,
            )
        except HellaSwagError as e:
            fail(str(e))
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


register_configs()

if __name__ == "__main__":
    main()
