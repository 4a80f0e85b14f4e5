# ruff: noqa: F401, F821
# (F401: unused imports, as in the lecture's file; F821: master_process is a global of its
# script body)
"""A stand-in for build-nanogpt's train_gpt2.py: the same interface, a one-layer model. Loaded by
benchmarks/cpu_speed.py's lecture worker (tests/test_cpu_speed.py, the GPU check's rehearsal)."""

import math
import subprocess
from dataclasses import dataclass

import torch
import torch.nn as nn
from hellaswag import render_example  # the lecture's own module beside it (fails offline)
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        print(f"stand-in GPT: vocab_size={config.vocab_size} n_embd={config.n_embd}")
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), device=idx.device)
        logits = self.lm_head(self.wte(idx) + self.wpe(pos))
        print(f"stand-in logits: {logits.dtype}")
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, device_type):
        if master_process:  # a global of the lecture's script body
            print(f"configure_optimizers({weight_decay}, {learning_rate}, {device_type})")
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)


# the script's training run: loading the model must never execute it
raise SystemExit("the stand-in's training run was executed")
