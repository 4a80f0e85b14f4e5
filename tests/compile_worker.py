"""torchrun worker for tests/test_distributed.py: what `compile_model` compiles under FSDP2.

    torchrun --standalone --nproc_per_node=2 tests/compile_worker.py OUT.json [--inductor]

Builds a tiny GPT on every rank (same seed), shards it with `wrap_model` (parallel=fsdp, CPU,
gloo), and runs 2 AdamW steps: once eager, once through `compile_model` with a backend that
records each compiled graph's ops and counts its calls. With --inductor the recording backend
hands its graphs to inductor, so the compiled losses are inductor's. Rank 0 writes OUT.json.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import torch

from gpt2x.config import ParallelKind
from gpt2x.model import GPT, GPTConfig
from gpt2x.training import distributed

SHAPE = dict(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32, attn="sdpa")
STEPS = 2


def make_model(d: distributed.Dist) -> torch.nn.Module:
    torch.manual_seed(0)
    return distributed.wrap_model(GPT(GPTConfig(**SHAPE)), d)


def train(model: torch.nn.Module, d: distributed.Dist) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1 + d.rank)  # each rank its own batch
    out = []
    for _ in range(STEPS):
        x = torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=gen)
        y = torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=gen)
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        out.append(distributed.all_reduce_mean(loss.detach(), d).item())
    return out


def main() -> None:
    out_path, inductor = sys.argv[1], "--inductor" in sys.argv
    cfg = SimpleNamespace(kind="fsdp", backend="auto", reshard_after_forward=True)
    d = distributed.setup(cfg, "cpu")
    graphs: list[dict] = []

    def recording(gm: torch.fx.GraphModule, example_inputs):
        ops = sorted(
            {
                getattr(n.target, "__name__", str(n.target))
                for n in gm.graph.nodes
                if n.op in ("call_function", "call_method", "call_module")
            }
        )
        entry = {"ops": ops, "calls": 0}
        graphs.append(entry)
        if inductor:
            from torch._inductor.compile_fx import compile_fx

            fn = compile_fx(gm, example_inputs)
        else:
            fn = gm.forward

        def run(*args):
            entry["calls"] += 1
            return fn(*args)

        return run

    try:
        eager = train(make_model(d), d)
        model = distributed.compile_model(
            make_model(d), ParallelKind.fsdp, mode=None, scope="model", backend=recording
        )
        compiled = train(model, d)
        if d.is_main:
            result = {
                "eager": eager,
                "compiled": compiled,
                "graphs": graphs,
                "keys": list(model.state_dict()),
                "world_size": d.world_size,
            }
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
