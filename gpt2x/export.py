"""`python -m gpt2x.export checkpoint=<path> out=<dir>`: a Hugging Face GPT-2 folder.

Writes `config.json` + `model.safetensors` that `transformers.GPT2LMHeadModel.from_pretrained`
loads with the same logits (GPT.export_hf); the padding rows of a padded vocabulary
(model.vocab_size=50304) are dropped, keeping the tokenizer's 50257 tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from gpt2x import checkpoint

OPTIONS = {
    "checkpoint": ("", "checkpoint folder, run folder or checkpoints/ folder"),
    "out": ("", "output folder for the Hugging Face model"),
    "vocab_size": (50257, "embedding rows to keep (the GPT-2 tokenizer's 50257)"),
}


def main(argv: Sequence[str] | None = None) -> Path:
    args = checkpoint.parse_kv(
        "gpt2x.export",
        sys.argv[1:] if argv is None else argv,
        OPTIONS,
        required=["checkpoint", "out"],
    )
    try:
        model, meta, _ = checkpoint.load_model(args["checkpoint"], "cpu")
    except checkpoint.CheckpointError as e:
        checkpoint.fail(str(e))
    out = Path(args["out"]).expanduser()
    try:
        model.export_hf(out, vocab_size=args["vocab_size"])
    except (ValueError, OSError) as e:
        checkpoint.fail(f"cannot export to {out}: {e}")
    print(f"wrote {out} (Hugging Face GPT-2, step {meta['step']})")
    return out


if __name__ == "__main__":
    main()
