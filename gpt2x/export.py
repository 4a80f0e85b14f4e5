"""`python -m gpt2x.export checkpoint=<path> out=<dir>`: a Hugging Face GPT-2 folder.

Writes `config.json` + `model.safetensors` that `transformers.GPT2LMHeadModel.from_pretrained`
loads with the same logits (GPT.export_hf); the padding rows of a padded vocabulary
(model.vocab_size=50304) are dropped, keeping the tokenizer's 50257 tokens.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from gpt2x import CONF_DIR, checkpoint
from gpt2x.config import register_configs
from gpt2x.tools import fail


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> Path:
    try:
        model, meta, _ = checkpoint.load_model(cfg.checkpoint, "cpu")
    except checkpoint.CheckpointError as e:
        fail(str(e))
    out = Path(cfg.out).expanduser()
    try:
        model.export_hf(out, vocab_size=cfg.vocab_size)
    except (ValueError, OSError) as e:
        fail(f"cannot export to {out}: {e}")
    print(f"wrote {out} (Hugging Face GPT-2, step {meta['step']})")
    return out


register_configs()

if __name__ == "__main__":
    main()
