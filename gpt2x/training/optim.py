"""Optimizers and the warmup + cosine learning-rate schedule.

`optim.name=adamw` (the lecture's): AdamW, weight decay on 2-D parameters only.
`optim.name=muon` (beyond the lecture, as modded-nanogpt splits it): torch.optim.Muon for the
transformer blocks' weight matrices, AdamW for everything else (the token embedding, which is
also the tied LM head, the position embedding, LayerNorm gains and all biases).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping

import torch

from gpt2x.model import Block

OPTIMIZERS = ("adamw", "muon")

# Muon defaults: Keller Jordan's reference usage (github.com/KellerJordan/Muon, README: hidden
# weights at lr=0.02, weight_decay=0.01; momentum 0.95 with Nesterov is its default and
# torch.optim.Muon's). Override with optim.muon_lr / muon_momentum / muon_weight_decay.
MUON_LR = 0.02
MUON_MOMENTUM = 0.95
MUON_WEIGHT_DECAY = 0.01


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.AdamW | MuonAdamW:
    """The optimizer named by optim.name (default adamw); `model` may be wrapped (DDP,
    torch.compile): parameters are found by module, not by name."""
    name = getattr(optim_cfg, "name", "adamw")  # configs from before optim.name are adamw
    name = str(getattr(name, "value", name))  # accept an Enum member too
    if name == "adamw":
        return _adamw([p for p in model.parameters() if p.requires_grad], optim_cfg)
    if name == "muon":
        return build_muon(model, optim_cfg)
    raise ValueError(f"optim.name={name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")


def _adamw(params: list[torch.nn.Parameter], optim_cfg) -> torch.optim.AdamW:
    """AdamW over two groups: matmul weights and embeddings decay; biases and LayerNorm don't.

    `optim.fused=true` runs the update as one fused kernel per group (the ladder's "fused" rung).
    Otherwise torch chooses (fused=None): the multi-tensor `foreach` update on CUDA, as the
    lecture's rungs before `fused` ran. Passing fused=False would select torch's per-tensor
    for-loop instead and overstate the fused rung's gain.
    """
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": optim_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=optim_cfg.lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2),
        eps=optim_cfg.eps,
        fused=True if optim_cfg.fused else None,
    )


def muon_split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(Muon's parameters, AdamW's parameters): the 2-D weights inside the transformer blocks
    (c_attn, c_proj, c_fc) go to Muon; everything else, each tied weight once, to AdamW."""
    hidden = {
        id(p)
        for m in model.modules()
        if isinstance(m, Block)
        for p in m.parameters()
        if p.dim() == 2
    }
    if not hidden:
        raise ValueError("optim.name=muon found no transformer blocks in the model; use adamw")
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    return [p for p in params if id(p) in hidden], [p for p in params if id(p) not in hidden]


def build_muon(model: torch.nn.Module, optim_cfg) -> MuonAdamW:
    if not hasattr(torch.optim, "Muon"):
        version = ".".join(torch.__version__.split(".")[:2])
        raise ValueError(
            f"optim.name=muon needs torch.optim.Muon (torch >= 2.9); this is torch {version}; "
            "use optim.name=adamw"
        )
    if optim_cfg.lr <= 0:
        raise ValueError(
            f"optim.name=muon scales muon_lr relative to optim.lr={optim_cfg.lr}; set lr > 0"
        )
    muon_params, adamw_params = muon_split(model)
    muon_lr = float(getattr(optim_cfg, "muon_lr", MUON_LR))
    muon = torch.optim.Muon(
        # lr_scale: set_lr gives this group lr * muon_lr / optim.lr, so one schedule
        # warms up and decays both optimizers
        [{"params": muon_params, "lr_scale": muon_lr / optim_cfg.lr}],
        lr=muon_lr,
        momentum=float(getattr(optim_cfg, "muon_momentum", MUON_MOMENTUM)),
        weight_decay=float(getattr(optim_cfg, "muon_weight_decay", MUON_WEIGHT_DECAY)),
    )
    return MuonAdamW(_adamw(adamw_params, optim_cfg), muon)


class _States(Mapping):
    """The children's per-parameter states as one read-only view (their keys are disjoint).
    Not a ChainMap: its lookup would insert empty entries into the first defaultdict."""

    def __init__(self, *states: dict):
        self.maps = states

    def __getitem__(self, param: torch.Tensor) -> dict:
        for state in self.maps:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return itertools.chain.from_iterable(self.maps)

    def __len__(self) -> int:
        return sum(len(state) for state in self.maps)

    def clear(self) -> None:
        for state in self.maps:
            state.clear()


class MuonAdamW:
    """AdamW and Muon, used like one optimizer by the trainer, GradScaler and the checkpointer.

    param_groups lists AdamW's groups, then Muon's (the same dicts: setting a group's lr sets
    it in the child). Iterating yields the two torch optimizers, which is how
    torch.distributed.checkpoint's get/set_optimizer_state_dict take several optimizers:
    they see two plain torch optimizers and key both states by parameter name.
    GradScaler (fp16) works too: it unscales every group's gradients, then calls step().
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Optimizer):
        self.adamw, self.muon = adamw, muon

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter((self.adamw, self.muon))

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self for g in opt.param_groups]

    @property
    def state(self) -> _States:
        return _States(*(opt.state for opt in self))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure; compute the loss before step()")
        for opt in self:
            opt.step()

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])

    def __repr__(self) -> str:
        return f"MuonAdamW(\n{self.adamw!r},\n{self.muon!r})"


def lr_at(step: int, optim_cfg, max_steps: int) -> float:
    """Linear warmup to optim.lr over warmup_steps, then cosine decay to lr*min_lr_ratio."""
    max_lr = optim_cfg.lr
    min_lr = max_lr * optim_cfg.min_lr_ratio
    warmup = optim_cfg.warmup_steps
    decay_steps = optim_cfg.decay_steps or max_steps
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """Set every group's lr to `lr` times its lr_scale (1 unless the group has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
