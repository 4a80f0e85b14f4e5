"""`python -m gpt2x.sample checkpoint=<path> prompt="..."`: text from a training checkpoint.

`checkpoint` is a checkpoint folder (`<run>/checkpoints/step_000100`), a run folder or its
`checkpoints/` folder (the newest intact checkpoint). Works for checkpoints of compiled and
uncompiled runs alike (the files never hold torch.compile's `_orig_mod.` names).

    python -m gpt2x.sample checkpoint=outputs/runs/<id> prompt="ROMEO:" max_new_tokens=100 \
        temperature=0.8 top_k=50 seed=1 num_samples=3
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from gpt2x import checkpoint

OPTIONS = {
    "checkpoint": ("", "checkpoint folder, run folder or checkpoints/ folder"),
    "prompt": ("\n", "text to continue"),
    "max_new_tokens": (100, "tokens to generate per sample"),
    "temperature": (1.0, "softmax temperature; 0 = greedy"),
    "top_k": (50, "sample from the k most likely tokens; 0 = all"),
    "seed": (1337, "random seed"),
    "num_samples": (1, "number of samples"),
    "device": ("auto", "auto | cpu | cuda | cuda:N | mps"),
}


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
    from gpt2x.tokenizer import get_tokenizer

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


def main(argv: Sequence[str] | None = None) -> list[str]:
    args = checkpoint.parse_kv(
        "gpt2x.sample", sys.argv[1:] if argv is None else argv, OPTIONS, required=["checkpoint"]
    )
    if args["num_samples"] < 1 or args["max_new_tokens"] < 0 or args["temperature"] < 0:
        checkpoint.fail("num_samples must be >= 1, max_new_tokens and temperature >= 0")
    device = checkpoint.pick_device(args["device"])
    try:
        model, meta, _ = checkpoint.load_model(args["checkpoint"], device)
    except checkpoint.CheckpointError as e:
        checkpoint.fail(str(e))
    print(f"# {meta['path']} (step {meta['step']})", file=sys.stderr)
    texts = generate(
        model,
        args["prompt"],
        args["max_new_tokens"],
        args["temperature"],
        args["top_k"],
        args["seed"],
        args["num_samples"],
        device,
    )
    for i, text in enumerate(texts):
        if i:
            print("\n---------------")
        print(text)
    return texts


if __name__ == "__main__":
    main()
