"""Optimizers: AdamW as in the lecture, Muon + AdamW as one optimizer, the lr schedule."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from gpt2x.model import GPT, GPTConfig
from gpt2x.training.optim import MuonAdamW, build_optimizer, lr_at, muon_split, set_lr


def optim_cfg(**kw) -> SimpleNamespace:
    """Today's optim config fields (no `name`: configs written before optim.name)."""
    base = dict(
        lr=1e-3,
        min_lr_ratio=0.1,
        warmup_steps=3,
        decay_steps=None,
        beta1=0.9,
        beta2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        fused=False,
    )
    return SimpleNamespace(**{**base, **kw})


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, n_layer=2, n_head=4, n_embd=64, vocab_size=96))


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = torch.randint(0, 96, (4, 17), generator=g)
        out.append((b[:, :-1].contiguous(), b[:, 1:].contiguous()))
    return out


def train(model: GPT, opt, cfg, steps: range, data, scaler=None) -> list[float]:
    """The trainer's step: schedule, zero_grad, backward, (GradScaler) step."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for step in steps:
        set_lr(opt, lr_at(step, cfg, max_steps=20))
        opt.zero_grad(set_to_none=True)
        x, y = data[step % len(data)]
        _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    return losses


def names(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


# ---- AdamW: today's behaviour --------------------------------------------------------------


def test_adamw_is_the_default_and_unchanged():
    model = tiny()
    opt = build_optimizer(model, optim_cfg())  # no optim.name
    assert type(opt) is torch.optim.AdamW
    assert build_optimizer(model, optim_cfg(name="adamw")).param_groups[0].keys() == (
        opt.param_groups[0].keys()
    )
    decay, no_decay = opt.param_groups
    assert [p.dim() for p in decay["params"]] == [2] * len(decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    n = len(list(model.parameters()))  # the tied head is listed once
    assert len(decay["params"]) + len(no_decay["params"]) == n
    assert "lr_scale" not in decay and "lr_scale" not in no_decay
    set_lr(opt, 3.7e-4)
    assert [g["lr"] for g in opt.param_groups] == [3.7e-4, 3.7e-4]  # exactly, not scaled


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match="optim.name='sgd' is unknown; use one of adamw, muon"):
        build_optimizer(tiny(), optim_cfg(name="sgd"))


# ---- Muon + AdamW --------------------------------------------------------------------------


def test_muon_split_hidden_matrices_vs_the_rest():
    model = tiny()
    muon, adamw = muon_split(model)
    expected = [
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert names(model, muon) == expected
    rest = names(model, adamw)
    assert rest.count("transformer.wte.weight") == 1  # embedding == tied LM head, once
    assert "lm_head.weight" not in rest  # (named_parameters lists the tied weight as wte)
    assert "transformer.wpe.weight" in rest
    assert all(n.endswith(".bias") or "ln_" in n or "wte" in n or "wpe" in n for n in rest)
    assert len(muon) + len(adamw) == len(list(model.parameters()))
    # a wrapper (torch.compile here; DDP alike) finds the same parameters by module
    wrapped_muon, wrapped_adamw = muon_split(torch.compile(model))
    assert [id(p) for p in wrapped_muon] == [id(p) for p in muon]
    assert [id(p) for p in wrapped_adamw] == [id(p) for p in adamw]
    with pytest.raises(ValueError, match="no transformer blocks"):
        muon_split(torch.nn.Linear(4, 4))


def test_muon_optimizer_groups_and_lr_scale():
    model = tiny()
    opt = build_optimizer(model, optim_cfg(name="muon", muon_lr=0.05, muon_weight_decay=0.0))
    assert isinstance(opt, MuonAdamW)
    adamw, muon = list(opt)
    assert type(adamw) is torch.optim.AdamW and type(muon) is torch.optim.Muon
    assert opt.param_groups == adamw.param_groups + muon.param_groups
    assert muon.param_groups[0]["momentum"] == 0.95  # the default
    assert muon.param_groups[0]["weight_decay"] == 0.0
    set_lr(opt, 2e-4)  # what the trainer does every step
    assert [g["lr"] for g in adamw.param_groups] == [2e-4, 2e-4]
    assert muon.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.05 / 1e-3, rel=1e-12)


def test_muon_trains_and_each_optimizer_moves_its_own_parameters():
    data = batches(1)  # one fixed batch: the loss must fall fast
    cfg = optim_cfg(name="muon", warmup_steps=1)
    model = tiny()
    losses = train(model, build_optimizer(model, cfg), cfg, range(30), data)
    assert losses[-1] < losses[0] - 1.5, losses  # 4.56 -> ~2.3 when measured

    # muon_lr=0 freezes exactly Muon's parameters: the split and the lr scale are real
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = optim_cfg(name="muon", muon_lr=0.0, muon_weight_decay=0.0)
    train(model, build_optimizer(model, cfg), cfg, range(2), data)
    hidden = set(names(model, muon_split(model)[0]))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in hidden), n


def test_muon_zero_grad_and_state_view():
    model = tiny()
    cfg = optim_cfg(name="muon")
    opt = build_optimizer(model, cfg)
    assert not opt.state  # no step yet: what the checkpointer checks
    train(model, opt, cfg, range(1), batches(1))
    assert opt.state and len(opt.state) == len(list(model.parameters()))
    assert "momentum_buffer" in opt.state[model.transformer.h[0].mlp.c_fc.weight]
    assert "exp_avg" in opt.state[model.transformer.wte.weight]
    # reading the view adds nothing to either child (their states are defaultdicts)
    assert len(opt.adamw.state) + len(opt.muon.state) == len(opt.state)
    assert model.transformer.h[0].mlp.c_fc.weight not in opt.adamw.state
    with pytest.raises(KeyError):
        opt.state[torch.nn.Parameter(torch.zeros(1))]
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    opt.state.clear()
    assert not opt.adamw.state and not opt.muon.state
    with pytest.raises(ValueError, match="no closure"):
        opt.step(lambda: 0.0)


def test_muon_state_dict_round_trip_resumes_bit_identically():
    data, cfg = batches(8), optim_cfg(name="muon")
    model = tiny()
    opt = build_optimizer(model, cfg)
    train(model, opt, cfg, range(4), data)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    expected = train(model, opt, cfg, range(4, 8), data)

    again = tiny()
    again.load_state_dict(saved_model)
    opt2 = build_optimizer(again, cfg)
    opt2.load_state_dict(saved_opt)
    assert train(again, opt2, cfg, range(4, 8), data) == expected


def test_muon_through_distributed_checkpoint_state_dict(tmp_path):
    # exactly what gpt2x.checkpoint does (full state dicts offloaded to CPU, torch.save,
    # weights_only load), in one process: the resumed run continues with identical losses
    data, cfg = batches(8), optim_cfg(name="muon")
    model = tiny()
    opt = build_optimizer(model, cfg)
    train(model, opt, cfg, range(4), data)
    state = get_optimizer_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    assert "transformer.wte.weight" in state["state"]  # keyed by name
    assert "momentum_buffer" in state["state"]["transformer.h.1.attn.c_proj.weight"]
    assert [g.get("lr_scale") for g in state["param_groups"]] == [None, None, 20.0]
    torch.save({"model": model.state_dict(), "optim": state}, tmp_path / "ckpt.pt")
    expected = train(model, opt, cfg, range(4, 8), data)

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    again = tiny()
    again.load_state_dict(saved["model"])
    opt2 = build_optimizer(again, cfg)
    set_optimizer_state_dict(
        again, opt2, saved["optim"], options=StateDictOptions(full_state_dict=True, strict=True)
    )
    assert train(again, opt2, cfg, range(4, 8), data) == expected


def test_muon_under_grad_scaler():
    # fp16's GradScaler unscales every group then steps: with a power-of-two scale the result
    # is bit-identical to an unscaled step, and an inf gradient skips both optimizers
    data, cfg = batches(3), optim_cfg(name="muon")
    ref = tiny()
    ref_losses = train(ref, build_optimizer(ref, cfg), cfg, range(3), data)
    model = tiny()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    opt = build_optimizer(model, cfg)
    assert train(model, opt, cfg, range(3), data, scaler=scaler) == ref_losses
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    x, y = data[0]
    scaler.scale(model(x, y)[1]).backward()
    model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**9


def test_muon_missing_from_torch(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    monkeypatch.setattr(torch, "__version__", "2.7.1+cu126")
    with pytest.raises(ValueError) as e:
        build_optimizer(tiny(), optim_cfg(name="muon"))
    assert str(e.value) == (
        "optim.name=muon needs torch.optim.Muon (torch >= 2.9); this is torch 2.7; "
        "use optim.name=adamw"
    )


# ---- schedule ------------------------------------------------------------------------------


def test_lr_schedule_warmup_cosine_floor():
    cfg = optim_cfg(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(12, cfg, 20) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(20, cfg, 20) == lr_at(99, cfg, 20) == pytest.approx(0.1)
