"""`python -m gpt2x.sample checkpoint=<path> prompt="..."`: text from a training checkpoint.

`checkpoint` is a checkpoint folder (`<run>/checkpoints/step_000100`), a run folder or its
`checkpoints/` folder (the newest intact checkpoint). Works for every rung's checkpoint on every
device (compiled runs' files never hold `_orig_mod.` names; a flash-attention run runs with
sdpa where the flash kernel cannot, see gpt2x.checkpoint.state.inference_attention).

    python -m gpt2x.sample checkpoint=outputs/runs/<id> prompt="ROMEO:" max_new_tokens=100 \
        temperature=0.8 top_k=50 seed=1 num_samples=3
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gpt2x import CONF_DIR, checkpoint
from gpt2x.config import ConfigError, register_configs
from gpt2x.data.tokenizer import get_tokenizer
from gpt2x.tools import fail
from gpt2x.training.distributed import pick_device
from gpt2x.training.precision import autocast


def generate(
    model,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    num_samples: int,
    device: torch.device,
) -> list[str]:
    enc = get_tokenizer()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k or None,
        generator=gen,
        vocab_limit=enc.n_vocab,
    )
    return [enc.decode(row.tolist()) for row in out]


def run_dtype(requested: str, config: dict, device: torch.device) -> str:
    """The autocast dtype to run a checkpoint in: the one asked for, else the run's own; fp16
    needs CUDA."""
    dtype = requested or str(config.get("precision", {}).get("dtype", "fp32"))
    if dtype not in ("fp32", "bf16", "fp16"):
        fail(f"precision={dtype} is unknown; use precision=fp32, bf16 or fp16")
    if dtype == "fp16" and device.type != "cuda":
        fail(f"precision=fp16 needs CUDA, this is {device.type}; use precision=bf16 or fp32")
    return dtype


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sample")
def main(cfg: DictConfig) -> list[str]:
    if OmegaConf.is_missing(cfg, "checkpoint"):
        fail(
            'checkpoint= is required: python -m gpt2x.sample checkpoint=<checkpoint or run '
            'folder> prompt="To be"'
        )
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0 or cfg.temperature < 0:
        fail("num_samples must be >= 1, max_new_tokens and temperature >= 0")
    try:
        device = pick_device(cfg.device, 0)
        ckpt = checkpoint.resolve(cfg.checkpoint)
        dtype = run_dtype(cfg.precision, checkpoint.read_config(ckpt), device)
        model, meta, _ = checkpoint.load_model(ckpt, device, dtype=dtype)
    except (checkpoint.CheckpointError, ConfigError) as e:
        fail(str(e))
    print(f"# {meta['path']} (step {meta['step']})", file=sys.stderr)
    with autocast(SimpleNamespace(dtype=dtype), device):
        texts = generate(
            model,
            cfg.prompt,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.seed,
            cfg.num_samples,
            device,
        )
    for i, text in enumerate(texts):
        if i:
            print("\n---------------")
        print(text)
    return texts


register_configs()

if __name__ == "__main__":
    main()
