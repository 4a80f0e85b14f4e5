"""`python -m gpt2x.export checkpoint=<path> out=<dir>`: a Hugging Face GPT-2 folder.

Writes `config.json` + `model.safetensors` that `transformers.GPT2LMHeadModel.from_pretrained`
loads with the same logits (GPT.export_hf); the padding rows of a padded vocabulary
(model.vocab_size=50304) are dropped, keeping the tokenizer's 50257 tokens. The tokenizer the run
trained with goes along (`vocab.json`, `merges.txt`, `tokenizer.json`, `tokenizer_config.json`:
GPT-2's BPE, gpt2x.data.tokenizer), so `AutoTokenizer.from_pretrained(out)` and
`pipeline("text-generation", out)` work offline, out of the box.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from gpt2x import CONF_DIR, checkpoint
from gpt2x.config import register_configs
from gpt2x.data.tokenizer import N_VOCAB, bpe_files
from gpt2x.tools import fail


def save_tokenizer(out: Path, max_length: int) -> None:
    """GPT-2's tokenizer files into `out`: the BPE files as transformers names them, and the
    fast tokenizer transformers builds from them (model_max_length: the model's context)."""
    from transformers import GPT2TokenizerFast

    vocab_bpe, encoder_json = bpe_files()
    shutil.copyfile(encoder_json, out / "vocab.json")
    shutil.copyfile(vocab_bpe, out / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(out), model_max_length=max_length)
    tokenizer.save_pretrained(str(out))


def export(model, out: Path, vocab_size: int) -> bool:
    """The model and, when its vocabulary is GPT-2's, the tokenizer; True if it was written."""
    model.export_hf(out, vocab_size=vocab_size)
    if vocab_size != N_VOCAB:  # a toy vocabulary: GPT-2's tokenizer would produce unknown ids
        return False
    save_tokenizer(out, model.config.block_size)
    return True


def check_out(out: Path) -> None:
    """out= is a new folder, an empty one, or an earlier export (replaced); anything else (a
    file, a run folder, a folder of other things) is one line and nothing is written."""
    if out.exists() and not out.is_dir():
        fail(f"out={out} is a file; give a folder to write the Hugging Face model into")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        fail(
            f"out={out} is not empty and holds no Hugging Face model; give a new or empty "
            "folder (an earlier export is replaced)"
        )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> Path:
    for key in ("checkpoint", "out"):
        if OmegaConf.is_missing(cfg, key):
            fail(
                f"{key}= is required: python -m gpt2x.export checkpoint=<checkpoint or run "
                "folder> out=<folder to write>"
            )
    out = Path(cfg.out).expanduser()
    check_out(out)
    try:
        model, meta, _ = checkpoint.load_model(cfg.checkpoint, "cpu")
    except checkpoint.CheckpointError as e:
        fail(str(e))
    try:
        with_tokenizer = export(model, out, cfg.vocab_size)
    except (ValueError, OSError) as e:
        fail(f"cannot export to {out}: {e}")
    what = "model + tokenizer" if with_tokenizer else f"model only: vocab_size={cfg.vocab_size}"
    print(f"wrote {out} (Hugging Face GPT-2, step {meta['step']}, {what})")
    return out


register_configs()

if __name__ == "__main__":
    main()
