"""Evaluation between training steps, never inside the timed step: the validation loss
(every trainer.eval_every steps and at the end), HellaSwag (trainer.hellaswag_every) and text
samples (trainer.sample_every, and sample.txt at the end). All of it runs under `inference`:
eval mode, no gradients, eager, so a compiled model never recompiles for it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from gpt2x.data.tokenizer import get_tokenizer
from gpt2x.training import distributed
from gpt2x.training.hellaswag import evaluate_hellaswag
from gpt2x.training.precision import autocast
from gpt2x.training.run import Run
from gpt2x.training.validation import validation_loss_sum

log = logging.getLogger("gpt2x.train")


def evaluate_and_log(run: Run, step: int, with_hellaswag: bool) -> float:
    """The validation loss (and HellaSwag) after step `step`, to the record, W&B and the log."""
    val_loss = evaluate(run)
    row = {"step": step, "val_loss": val_loss, "tokens_seen": run.state.tokens_seen}
    if with_hellaswag:
        row.update(hellaswag(run))
    run.record.log_eval(row)
    if run.wandb:
        run.wandb.log_eval(row)
    if run.dist.is_main:
        hs = row.get("hellaswag_acc_norm")
        log.info(
            "step %d | val loss %.4f%s",
            step + 1,  # steps done, as the step lines count
            val_loss,
            "" if hs is None else f" | hellaswag acc_norm {hs:.4f}",
        )
    return val_loss


@contextlib.contextmanager
def inference(model: torch.nn.Module):
    """Evaluation and sampling: eval mode, no gradients, and every torch.compile'd function run
    eagerly. Eval mode under no_grad is another graph for torch.compile, so a compiled model
    would recompile at its first evaluation (seconds to minutes per run, and once more per new
    length when sampling); eager runs the same math and compiles nothing."""
    model.eval()
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        model.train()


def evaluate(run: Run) -> float:
    """Mean per-token loss over the fixed validation set (trainer.eval_tokens), all ranks."""
    cfg, d = run.cfg, run.dist
    with inference(run.model):
        totals = validation_loss_sum(
            run.model,
            run.val_loader,
            cfg.trainer.eval_tokens,
            cfg.trainer.micro_batch_size,
            d.rank,
            d.world_size,
            d.device,
            lambda: autocast(cfg.precision, d.device),
        )
    total, count = distributed.all_reduce_sum(totals, d).tolist()
    return total / count


def hellaswag(run: Run) -> dict:
    """HellaSwag, batched (eagerly, see `inference`), examples split over ranks and the counts
    all-reduced once (gpt2x.training.hellaswag)."""
    cfg, d = run.cfg, run.dist
    with inference(run.model):
        res = evaluate_hellaswag(
            lambda x: run.model(x)[0],
            get_tokenizer().encode_ordinary,
            run.hellaswag_file,
            limit=cfg.trainer.hellaswag_limit or None,
            rank=d.rank,
            world_size=d.world_size,
            device=d.device,
            autocast_ctx=autocast(cfg.precision, d.device),
            max_len=cfg.model.block_size,
            # the head at the endings only (the plain module; under FSDP the root's own
            # parameters are gathered by its forward, so the whole forward runs there)
            logits_at=None if d.is_sharded else run.raw_model.logits_at,
        )
    return {
        "hellaswag_acc": res["acc"],
        "hellaswag_acc_norm": res["acc_norm"],
        "hellaswag_n": res["n"],
    }


def sample(run: Run, max_new_tokens: int, seed: int) -> str:
    """Text from the plain module, eagerly (see `inference`: a compiled one would recompile for
    every new length)."""
    cfg, d = run.cfg, run.dist
    enc = get_tokenizer()
    ids = enc.encode(cfg.trainer.sample_prompt, allowed_special={"<|endoftext|>"})
    idx = torch.tensor([ids], dtype=torch.long, device=d.device)
    gen = torch.Generator(device=d.device).manual_seed(seed)
    with inference(run.raw_model), autocast(cfg.precision, d.device):
        out = run.raw_model.generate(
            idx, max_new_tokens, temperature=1.0, top_k=50, generator=gen, vocab_limit=enc.n_vocab
        )
    return enc.decode(out[0].tolist())


def write_sample(run: Run, step: int, final: bool) -> None:
    """A sample into sample.txt (the final one) or samples.jsonl (every trainer.sample_every)."""
    cfg, d = run.cfg, run.dist
    # under FSDP every forward all-gathers parameters: all ranks sample, rank 0 writes
    if not (d.is_main or d.is_sharded):
        return
    text = sample(run, cfg.trainer.sample_tokens, cfg.trainer.seed)
    if not d.is_main:
        return
    run_dir = Path(cfg.paths.run_dir)
    if final:
        (run_dir / "sample.txt").write_text(text)
    else:
        run.record.log_sample(step, text)
    log.info("sample: (step %d)\n%s", step, text)
