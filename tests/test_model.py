"""GPT model: shapes, init, weight tying, attention implementations, HF import/export, sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2x.config import AttnImpl
from gpt2x.model import GPT, GPTConfig, check_attention

TINY = dict(block_size=32, n_layer=2, n_head=4, n_embd=64)


def tiny(vocab_size: int = 96, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, "vocab_size": vocab_size, **kw}))


def tokens(vocab: int, B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Make every parameter distinct (biases non-zero, LayerNorm weights != 1), so a missing
    transpose or a mis-mapped tensor changes the output instead of hiding behind init values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def hf_logits(hf: GPT2LMHeadModel, idx: torch.Tensor) -> torch.Tensor:
    hf.eval()
    with torch.no_grad():
        return hf(idx).logits


# ---- forward, loss, init, tying ------------------------------------------------------------


def test_shapes_and_initial_loss_is_uniform():
    V = 50257
    model = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=32))
    idx, targets = tokens(V, B=3, T=16), tokens(V, B=3, T=16, seed=2)
    # (targets independent of idx: with tied embeddings, the input token itself gets a
    # slightly higher logit, so targets=idx would give a loss visibly below ln V)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, V)
    assert loss.shape == ()
    # small init => nearly uniform predictions => cross-entropy ~ ln V
    assert abs(loss.item() - math.log(V)) < 0.1
    assert model(idx)[1] is None


def test_loss_ignores_minus_one_targets():
    model = tiny()
    idx = tokens(96)
    targets = idx.clone()
    targets[:, 8:] = -1
    logits, loss = model(idx, targets)
    ref = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 96), idx[:, :8].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6)


def test_rejects_sequences_longer_than_block_size():
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(96, T=33))


def test_weight_tying_survives_an_optimizer_step():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.lm_head.weight.detach().clone()
    idx = tokens(96)
    model(idx, idx)[1].backward()
    opt.step()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not torch.equal(model.lm_head.weight, before)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def test_init_statistics():
    L = 4
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=L, n_head=4, n_embd=128))
    h = model.transformer.h
    for w in (h[0].attn.c_attn.weight, h[1].mlp.c_fc.weight, model.transformer.wte.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.1)
    resid = 0.02 / math.sqrt(2 * L)
    for w in (h[0].attn.c_proj.weight, h[3].mlp.c_proj.weight):
        assert w.std().item() == pytest.approx(resid, rel=0.1)
    assert all(torch.count_nonzero(b) == 0 for n, b in model.named_parameters() if "bias" in n)
    assert torch.all(h[0].ln_1.weight == 1)


def test_bias_false_has_no_biases_and_runs():
    model = tiny(bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert torch.isfinite(model(tokens(96), tokens(96))[1])


def test_num_params_and_flops_of_gpt2_124m():
    with torch.device("meta"):
        model = GPT(GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768))
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params() == 124_439_808 - 1024 * 768  # wpe excluded
    N = 124_439_808 - 1024 * 768
    assert model.flops_per_token(1024) == 6 * N + 12 * 12 * 12 * 64 * 1024
    assert model.flops_per_token(1024) == pytest.approx(8.6e8, rel=0.01)


# ---- attention implementations -------------------------------------------------------------


def _grads(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_attention_implementations_agree_fp32():
    ref = tiny()
    perturb_(ref)
    idx = tokens(96, T=32)
    outs, grads = {}, {}
    for impl in ("naive", "sdpa", "flash"):
        model = GPT(GPTConfig(**{**TINY, "vocab_size": 96, "attn": impl}))
        model.load_state_dict(ref.state_dict())
        logits, loss = model(idx, idx)
        loss.backward()
        outs[impl], grads[impl] = logits.detach(), _grads(model)
    for impl in ("sdpa", "flash"):
        assert (outs[impl] - outs["naive"]).abs().max().item() <= 1e-5
        for n, g in grads["naive"].items():
            assert torch.allclose(grads[impl][n], g, atol=1e-5, rtol=1e-4), n


def test_naive_attention_is_causal():
    model = tiny()
    model.eval()
    idx = tokens(96, B=1, T=16)
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 96
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)  # the past does not see the future
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-6)


@pytest.mark.parametrize("impl", ["naive", "sdpa", "flash"])
def test_bf16_autocast_on_cpu_close_to_fp32(impl):
    model = tiny(attn=impl)
    perturb_(model)
    idx = tokens(96)
    _, loss32 = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss16 = model(idx, idx)
    assert logits.dtype == torch.bfloat16
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.05


def test_dropout_active_only_in_training():
    model = tiny(dropout=0.2, attn="sdpa")
    idx = tokens(96)
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_check_attention_naive_and_sdpa_never_raise_on_cpu():
    for impl in ("naive", "sdpa"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            check_attention(impl, torch.device("cpu"), dtype)
            check_attention(impl, "cpu", dtype, dropout=0.1)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's "kernel not used because"
def test_check_attention_flash_on_cpu_matches_what_torch_does():
    # torch 2.x ships a CPU flash kernel: without dropout it runs in fp32 and bf16 ...
    for dtype in (torch.float32, torch.bfloat16):
        check_attention("flash", "cpu", dtype)
    tiny(attn="flash")(tokens(96))  # ... and the model really runs with it
    # ... but it has no dropout: the check must say so, and the model must indeed fail
    with pytest.raises(ValueError) as e:
        check_attention("flash", "cpu", torch.float32, dropout=0.1)
    msg = str(e.value)
    assert "\n" not in msg and "dropout" in msg and "attn=sdpa" in msg
    model = tiny(attn="flash", dropout=0.1)
    model.train()
    with pytest.raises(RuntimeError):
        model(tokens(96))
    model.eval()  # no dropout at eval time: works
    model(tokens(96))


def test_check_attention_messages(monkeypatch):
    import gpt2x.model as m

    with pytest.raises(ValueError, match="unknown"):
        check_attention("xformers", "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown"):
        GPTConfig(attn="xformers")
    # Hydra hands over config.AttnImpl members; they must behave like the plain strings
    assert GPTConfig(attn=AttnImpl.flash).attn == "flash"
    check_attention(AttnImpl.sdpa, "cpu", torch.float32)
    # what a CUDA box without flash-in-fp32 reports; translate it to the one-line fix
    monkeypatch.setattr(m, "_try_attention", lambda *a: "No available kernel")
    with pytest.raises(ValueError) as e:
        check_attention("flash", "cuda", torch.float32)
    assert str(e.value) == (
        "attn=flash needs bf16/fp16 on CUDA (got fp32); use precision=bf16 or attn=sdpa"
    )
    with pytest.raises(ValueError, match="attn=flash cannot run on cuda with bf16.*attn=sdpa"):
        check_attention("flash", "cuda", torch.bfloat16)


# ---- torch.compile -------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_matches_eager():
    model = tiny(attn="flash")
    perturb_(model)
    model.eval()
    idx = tokens(96)
    eager = model(idx)[0]
    compiled = torch.compile(model)(idx)[0]
    assert (compiled - eager).abs().max().item() <= 1e-4


# ---- Hugging Face interop ------------------------------------------------------------------


def hf_tiny(vocab: int = 96) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = GPT2LMHeadModel(cfg)
    perturb_(hf)
    return hf


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_from_pretrained_local_dir_matches_hf(tmp_path, attn):
    hf = hf_tiny()
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path), attn=attn)
    model.eval()
    assert model.config.vocab_size == 96 and model.config.block_size == 32
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = tokens(96, T=32)
    ref = hf_logits(GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager"), idx)
    assert (model(idx)[0] - ref).abs().max().item() <= 1e-4


def test_from_pretrained_with_padded_vocab(tmp_path):
    hf_tiny(vocab=96).save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path), vocab_size=128)
    model.eval()
    assert model.config.vocab_size == 128
    assert torch.count_nonzero(model.transformer.wte.weight[96:]) == 0  # documented: zero rows
    idx = tokens(96)
    ref = hf_logits(GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager"), idx)
    logits = model(idx)[0]
    assert logits.shape[-1] == 128
    assert (logits[..., :96] - ref).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="smaller"):
        GPT.from_pretrained(str(tmp_path), vocab_size=64)


@pytest.mark.parametrize("vocab,real", [(96, 96), (128, 96)])
def test_export_hf_round_trip(tmp_path, vocab, real):
    model = tiny(vocab_size=vocab)
    perturb_(model)
    model.eval()
    model.export_hf(tmp_path, vocab_size=real)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    hf = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert hf.config.vocab_size == real
    idx = tokens(real)
    ours = model(idx)[0][..., :real]
    assert (hf_logits(hf, idx) - ours).abs().max().item() <= 1e-4
    # and back again
    again = GPT.from_pretrained(str(tmp_path), vocab_size=vocab)
    again.eval()
    assert (again(idx)[0][..., :real] - ours).abs().max().item() <= 1e-4


def test_export_hf_without_biases(tmp_path):
    model = tiny(bias=False)
    perturb_(model)
    model.eval()
    model.export_hf(tmp_path, vocab_size=96)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager")
    idx = tokens(96)
    assert (hf_logits(hf, idx) - model(idx)[0]).abs().max().item() <= 1e-4


# ---- generation ----------------------------------------------------------------------------


def test_generate_is_deterministic_with_a_seeded_generator():
    model = tiny()
    perturb_(model)
    prompt = tokens(96, B=2, T=4)

    def sample(seed, **kw):
        return model.generate(prompt, 20, generator=torch.Generator().manual_seed(seed), **kw)

    a, b = sample(0), sample(0)
    assert a.shape == (2, 24)
    assert torch.equal(a[:, :4], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(1))
    assert torch.equal(sample(3, top_k=5), sample(3, top_k=5))


def test_generate_respects_vocab_limit():
    V, padded = 80, 96
    model = tiny(vocab_size=padded)
    with torch.no_grad():
        # make every hidden state equal to d, and the padding rows point along d:
        # without the limit, padding ids would dominate the distribution
        d = torch.randn(64)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(d)
        model.transformer.wte.weight[V:] = 0.5 * d
    prompt = tokens(V, B=4, T=2)
    g = torch.Generator().manual_seed(0)
    unlimited = model.generate(prompt, 20, generator=g)
    assert (unlimited >= V).any()  # the test can fail
    for kw in (dict(), dict(top_k=10), dict(temperature=0.0), dict(temperature=2.0)):
        out = model.generate(prompt, 20, generator=g, vocab_limit=V, **kw)
        assert (out < V).all(), kw


def test_greedy_equals_argmax_rollout_and_crops_context():
    model = tiny()
    perturb_(model)
    model.train()  # generate must switch dropout off and restore the mode
    prompt = tokens(96, B=2, T=20)
    out = model.generate(prompt, 20, temperature=0.0, vocab_limit=90)  # 40 > block_size 32
    assert model.training
    model.eval()
    idx = prompt
    with torch.no_grad():
        for _ in range(20):
            logits = model(idx[:, -32:])[0][:, -1, :90]
            idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, idx)


# ---- chunked LM head + loss ----------------------------------------------------------------


def _loss_and_grads(
    loss: str, *, bf16: bool = False, mask: bool = False, seed: int = 0, **kw
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """One fwd+bwd of a perturbed tiny model (same weights and batch for every variant)."""
    model = tiny(loss=loss, **kw)
    perturb_(model, seed)
    idx, targets = tokens(96, T=16, seed=seed + 1), tokens(96, T=16, seed=seed + 2)
    if mask:
        targets[:, 10:] = -1  # how validation pads its last batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, value = model(idx, targets)
    value.backward()
    return value.detach(), _grads(model), logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _hidden(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The residual stream that forward hands to head_and_loss."""
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))
    for block in model.transformer.h:
        x = block(x)
    return x


# loss=chunked's kernels: gpt2x's own (any torch) and torch's linear_cross_entropy (>= 2.13)
KERNELS = [
    "gpt2x",
    pytest.param(
        "torch",
        marks=pytest.mark.skipif(
            not hasattr(torch.nn.functional, "linear_cross_entropy"),
            reason="torch < 2.13 has no linear_cross_entropy",
        ),
    ),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask", [False, True])
def test_chunked_loss_matches_plain_fp32(mask, kernel):
    ref, ref_grads, ref_logits = _loss_and_grads("plain", mask=mask)
    # chunk of 7 rows: 32 rows in 5 chunks, the last one partial
    value, grads, logits = _loss_and_grads(
        "chunked", mask=mask, loss_chunk_size=7, loss_kernel=kernel
    )
    assert ref_logits is not None and logits is None  # chunked never builds the logits
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    assert "transformer.wte.weight" in grads  # the tied head: embedding + head gradient
    for n, g in ref_grads.items():
        assert torch.allclose(grads[n], g, rtol=1e-4, atol=1e-6), n
        assert _rel(grads[n], g) < 1e-5, n


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask", [False, True])
def test_chunked_loss_under_bf16_autocast_is_as_accurate_as_plain(mask, kernel):
    # the fp32 run is the reference for both bf16 paths: bf16 matmuls cost ~1% of gradient
    # accuracy in either; both are fp32 softmaxes over bf16 logits (torch's kernel rounds its
    # summed value to bf16 once more: 2**-9 relative)
    ref, ref_grads, _ = _loss_and_grads("plain", mask=mask)
    plain, plain_grads, _ = _loss_and_grads("plain", bf16=True, mask=mask)
    value, grads, _ = _loss_and_grads(
        "chunked", bf16=True, mask=mask, loss_chunk_size=7, loss_kernel=kernel
    )
    assert value.dtype == torch.float32
    assert plain.item() == pytest.approx(ref.item(), rel=5e-3)
    assert value.item() == pytest.approx(ref.item(), rel=5e-3)
    for n, g in ref_grads.items():
        assert _rel(plain_grads[n], g) < 2e-2, n
        assert _rel(grads[n], g) < 2e-2, n
    # not vacuous: the bf16 runs do differ from fp32
    assert max(_rel(grads[n], g) for n, g in ref_grads.items()) > 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
def test_chunked_loss_without_grad_stays_fp32_under_autocast(kernel):
    # evaluation (no backward): the chunked head runs in fp32, so the validation loss is at
    # least as precise as the plain path's fp32 softmax over bf16 logits
    plain, chunked = tiny(), tiny(loss="chunked", loss_chunk_size=5, loss_kernel=kernel)
    perturb_(plain)
    chunked.load_state_dict(plain.state_dict())
    idx, targets = tokens(96), tokens(96, seed=2)
    targets[1, 4:] = -1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, ref = plain(idx, targets)
        x = _hidden(plain, idx)
        _, value = chunked(idx, targets)
    # the exact fp32 head on the same (bf16-computed) hidden states
    exact = torch.nn.functional.cross_entropy(
        plain.lm_head(plain.transformer.ln_f(x.float())).float().view(-1, 96),
        targets.view(-1),
        ignore_index=-1,
    )
    assert value.item() == pytest.approx(exact.item(), rel=1e-5)
    assert value.item() == pytest.approx(ref.item(), rel=2e-3)


def test_chunked_without_targets_returns_logits_like_plain():
    plain, chunked = tiny(), tiny(loss="chunked")
    perturb_(plain)
    chunked.load_state_dict(plain.state_dict())
    idx = tokens(96)
    logits, value = chunked(idx)
    assert value is None
    assert torch.equal(logits, plain(idx)[0])
    # sampling works on the chunked model as on the plain one
    a, b = (
        m.generate(idx, 5, generator=torch.Generator().manual_seed(0)) for m in (plain, chunked)
    )
    assert torch.equal(a, b)


def test_head_and_loss_is_the_tail_of_forward():
    model = tiny()
    perturb_(model)
    idx, targets = tokens(96), tokens(96, seed=2)
    x = _hidden(model, idx)
    logits, value = model.head_and_loss(x, targets)
    ref_logits, ref = model(idx, targets)
    assert torch.equal(logits, ref_logits) and torch.equal(value, ref)
    assert model.head_and_loss(x)[1] is None
    # what the training loop asks for: the same loss, no logits
    none, value = model(idx, targets, return_logits=False)
    assert none is None and torch.equal(value, ref)


def test_loss_option_errors(monkeypatch):
    import gpt2x.model as m

    with pytest.raises(ValueError, match="loss='fused' is unknown; use one of plain, chunked"):
        GPTConfig(loss="fused")
    with pytest.raises(ValueError, match="loss_chunk_size=0 must be >= 1"):
        GPTConfig(loss="chunked", loss_chunk_size=0)
    with pytest.raises(ValueError, match="loss_kernel='cuda' is unknown; use one of gpt2x, torch"):
        GPTConfig(loss="chunked", loss_kernel="cuda")
    m.check_loss_impl("plain")
    m.check_loss_impl("chunked")
    # an older torch (the GPU machine's 2.11): no linear_cross_entropy
    monkeypatch.delattr(m.F, "linear_cross_entropy", raising=False)
    monkeypatch.setattr(m.torch, "__version__", "2.9.1+cu128")
    expected = (
        "loss_kernel='torch' needs torch.nn.functional.linear_cross_entropy (torch >= 2.13); "
        "this is torch 2.9; use loss_kernel='gpt2x'"
    )
    with pytest.raises(ValueError) as e:
        GPT(GPTConfig(**TINY, vocab_size=96, loss="chunked", loss_kernel="torch"))
    assert str(e.value) == expected
    with pytest.raises(ValueError) as e:
        m.check_loss_impl("chunked", "torch")
    assert str(e.value) == expected
    tiny()  # loss=plain does not need it
    # nor does loss=chunked with gpt2x's own kernel (the default): it trains as plain does
    ref, ref_grads, _ = _loss_and_grads("plain")
    value, grads, _ = _loss_and_grads("chunked", loss_chunk_size=7)
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, g in ref_grads.items():
        assert _rel(grads[n], g) < 1e-5, n


# ---- activation checkpointing --------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_changes_nothing_but_memory(dropout):
    results = []
    for ac in (False, True):
        model = tiny(activation_checkpointing=ac, dropout=dropout, attn="sdpa")
        perturb_(model)
        model.train()
        torch.manual_seed(123)  # the same dropout masks; recomputation must replay them
        idx = tokens(96)
        _, value = model(idx, idx)
        value.backward()
        results.append((value.detach(), _grads(model)))
    (ref, ref_grads), (value, grads) = results
    assert torch.equal(value, ref)
    for n, g in ref_grads.items():
        assert torch.allclose(grads[n], g, rtol=1e-6, atol=1e-7), n


def test_activation_checkpointing_only_in_training(monkeypatch):
    import gpt2x.model as m

    calls = []

    def counting(fn, *args, **kw):
        calls.append(kw)
        return fn(*args)

    monkeypatch.setattr(m, "checkpoint", counting)
    model = tiny(activation_checkpointing=True)
    model.train()
    model(tokens(96))
    assert calls == [{"use_reentrant": False}] * 2  # one per block
    calls.clear()
    model.eval()
    model(tokens(96))
    assert calls == []
    tiny()(tokens(96))  # off by default
    assert calls == []


# ---- float8 (gpt2x.training.float8) -----------------------------------------------------------------

FP8_HINT = (
    "(float8 training needs an NVIDIA GPU with compute capability 8.9+, e.g. H100/H200); "
    "use precision=bf16"
)


def test_float8_module_filter_picks_the_block_linears():
    from gpt2x.training.float8 import float8_module_filter

    model = tiny()
    picked = [n for n, m in model.named_modules() if float8_module_filter(m, n)]
    assert picked == [
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert not float8_module_filter(model.lm_head, "lm_head")  # the tied head stays
    assert not float8_module_filter(model.transformer.h[0].ln_1, "transformer.h.0.ln_1")
    # a wrapper's prefix does not hide a block; dims not multiples of 16 are skipped
    assert float8_module_filter(nn.Linear(32, 48), "_orig_mod.transformer.h.3.mlp.c_fc")
    assert not float8_module_filter(nn.Linear(32, 40), "transformer.h.0.mlp.c_fc")
    assert not float8_module_filter(nn.Linear(24, 48), "transformer.h.0.mlp.c_fc")
    assert not float8_module_filter(nn.Linear(32, 48), "transformer.hh.0.c_fc")


def test_float8_filter_with_torchao_conversion():
    # torchao's swap itself runs anywhere (only the float8 matmuls need the GPU)
    float8 = pytest.importorskip("torchao.float8")
    from gpt2x.training.float8 import float8_module_filter

    model = tiny()
    weight = model.transformer.h[0].mlp.c_fc.weight
    float8.convert_to_float8_training(model, module_filter_fn=float8_module_filter)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds.pop("lm_head") == "Linear"
    assert set(kinds.values()) == {"Float8Linear"} and len(kinds) == 8
    assert model.lm_head.weight is model.transformer.wte.weight  # tying intact
    assert model.transformer.h[0].mlp.c_fc.weight is weight  # the same Parameters


def test_float8_unavailable_messages(monkeypatch):
    import sys

    from gpt2x.training import float8

    for device in ("cpu", torch.device("cpu")):
        with pytest.raises(float8.Float8Unavailable) as e:
            float8.convert_to_float8(tiny(), device)
        assert str(e.value) == f"precision=fp8 is not available on cpu {FP8_HINT}"
        assert isinstance(e.value, ValueError)
    # the GPUs this machine does not have, as torch.cuda would report them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(float8.Float8Unavailable, match="on cuda \\(no CUDA device is visible\\)"):
        float8.check_float8("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    with pytest.raises(float8.Float8Unavailable) as e:
        float8.check_float8("cuda")
    assert str(e.value) == (
        f"precision=fp8 is not available on NVIDIA A100-SXM4-80GB (compute capability 8.0) "
        f"{FP8_HINT}"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # "not installed"
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(
        float8.Float8Unavailable, match="^precision=fp8 needs torchao: pip install torchao$"
    ):
        float8.check_float8("cuda")


def test_chunked_loss_under_fp16_autocast_does_not_overflow():
    # 16,384 rows of loss ~4.6 sum past fp16's 65504: the chunked head must not sum in fp16
    model = tiny(loss="chunked")
    idx, targets = tokens(96, B=512, T=32), tokens(96, B=512, T=32, seed=2)
    _, ref = tiny()(idx, targets)
    with torch.autocast("cpu", dtype=torch.float16):
        _, value = model(idx, targets)
    value.backward()
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(ref.item(), rel=1e-3)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_logits_at_equals_the_full_logits_at_those_positions():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 97, (3, 16))
    positions = torch.tensor([0, 5, 17, 31, 47])  # flat indices into 3 x 16
    with torch.no_grad():
        full = model(idx)[0].reshape(-1, 97)
        torch.testing.assert_close(model.logits_at(idx, positions), full[positions])
