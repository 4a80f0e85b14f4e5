"""GPT-2 in one file: config, model, Hugging Face import/export, and an attention check.

The architecture is GPT-2 exactly (Radford et al. 2019): token + learned position embeddings,
pre-LayerNorm blocks, GELU(tanh) MLP 4x wide, final LayerNorm, LM head tied to the token
embedding. Parameter names follow Hugging Face's GPT-2, so loading a checkpoint is a rename-free
copy; only HF's Conv1D layers (which store weights as (in, out)) need a transpose.

Nothing here knows about optimizers or parallelism, and precision only as autocast sets it (the
chunked loss follows autocast by hand): the trainer wraps this module.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from gpt2x.chunked_loss import chunked_cross_entropy

ATTN_IMPLS = ("naive", "sdpa", "flash")
LOSS_IMPLS = ("plain", "chunked")
# loss=chunked's kernel: "gpt2x" (gpt2x/chunked_loss.py: compiled chunks, any torch) or "torch"
# (torch.nn.functional.linear_cross_entropy, torch >= 2.13, whose chunks' softmax runs as eager
# ops: 3.7x slower in bf16 at the nano shape on a CPU, docs/beyond.md; kept to compare against)
LOSS_KERNELS = ("gpt2x", "torch")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # 50304 pads to a multiple of 128 (faster matmuls)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2
    attn: str = "naive"  # "naive" | "sdpa" | "flash"
    # "plain": logits (B*T, V), then cross-entropy | "chunked": LM head + cross-entropy fused,
    # loss_chunk_size rows at a time, never holding the whole (B*T, V) logits
    loss: str = "plain"
    # 512 rows: one chunk's logits at V=50304 are 52 MB in bf16 (the lecture's 16x1024 batch
    # needs 1.6 GB for all of them, 3.3 GB more for their fp32 softmax), and each chunk's matmul
    # stays large (40 GFLOP at 768 wide); measured on CPU, docs/beyond.md
    loss_chunk_size: int = 512
    loss_kernel: str = "gpt2x"  # one of LOSS_KERNELS
    # recompute each block's activations in backward instead of storing them (training only)
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.attn = str(getattr(self.attn, "value", self.attn))  # accept config.AttnImpl too
        self.loss = str(getattr(self.loss, "value", self.loss))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.attn not in ATTN_IMPLS:
            raise ValueError(f"attn={self.attn!r} is unknown; use one of {', '.join(ATTN_IMPLS)}")
        if self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size} must be >= 1")
        check_loss_impl(self.loss, self.loss_kernel)


def check_loss_impl(loss: str, kernel: str = "gpt2x") -> None:
    """Raise ValueError (one line naming the fix) if loss implementation `loss` (with
    loss=chunked: its `kernel`) is unknown or this torch lacks it."""
    loss = str(getattr(loss, "value", loss))
    if loss not in LOSS_IMPLS:
        raise ValueError(f"loss={loss!r} is unknown; use one of {', '.join(LOSS_IMPLS)}")
    if kernel not in LOSS_KERNELS:
        raise ValueError(
            f"loss_kernel={kernel!r} is unknown; use one of {', '.join(LOSS_KERNELS)}"
        )
    has_torch_op = hasattr(F, "linear_cross_entropy") and hasattr(nn, "LinearCrossEntropyOptions")
    if loss == "chunked" and kernel == "torch" and not has_torch_op:
        version = ".".join(torch.__version__.split(".")[:2])
        raise ValueError(
            "loss_kernel='torch' needs torch.nn.functional.linear_cross_entropy (torch >= 2.13); "
            f"this is torch {version}; use loss_kernel='gpt2x'"
        )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.attn = config.attn
        # q, k, v for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        if self.attn == "naive":
            # the textbook version; materialises the (T, T) score matrix per head
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf"))  # a token sees only its past
            att = F.softmax(att, dim=-1)
            att = F.dropout(att, p=p, training=self.training)
            y = att @ v
        elif self.attn == "sdpa":
            # PyTorch picks the fastest available kernel (flash, memory-efficient, cuDNN, math)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            # flash only: fail loudly instead of silently falling back to a slower kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        # pre-LN: normalise the branch input, keep the residual stream itself un-normalised
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: one Parameter is both the input embedding and the output projection
        self.lm_head.weight = self.transformer.wte.weight

        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two branches to the residual stream, so shrink
        # the projections that write into it to keep its variance independent of depth
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # LayerNorm keeps PyTorch's default: weight 1, bias 0

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, return_logits: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """idx, targets: (B, T) token ids. Returns logits (B, T, vocab_size) and the mean
        cross-entropy over targets (positions with target -1 are ignored), or None. With
        loss=chunked and targets, logits are None (see head_and_loss). The training loop passes
        return_logits=False: logits returned from a compiled forward that needs gradients cost a
        zero-filled (B*T, vocab) gradient in its backward (19% of a nano CPU step)."""
        return self.head_and_loss(self.trunk(idx), targets, return_logits)

    def trunk(self, idx: Tensor) -> Tensor:
        """Embeddings and the transformer blocks: the residual stream (B, T, C) before ln_f."""
        seq_len, block_size = idx.size(1), self.config.block_size
        if seq_len > block_size:
            raise ValueError(f"sequence length {seq_len} exceeds block_size={block_size}")
        pos = torch.arange(seq_len, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            if self.config.activation_checkpointing and self.training:
                # keep only the block's input; its activations are recomputed in backward
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def logits_at(self, idx: Tensor, positions: Tensor) -> Tensor:
        """Logits (K, vocab_size) at the flat positions (indices into B*T) only: scoring a few
        positions (HellaSwag's endings) skips the LM head, the largest matmul of a small model,
        everywhere else."""
        x = self.transformer.ln_f(self.trunk(idx))
        return self.lm_head(x.reshape(-1, x.size(-1)).index_select(0, positions))

    def head_and_loss(
        self, x: Tensor, targets: Tensor | None = None, return_logits: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """Final LayerNorm, LM head and loss of the residual stream x (B, T, C). Returns
        (logits, None) without targets; with targets (logits, loss) for loss=plain and
        (None, loss) for loss=chunked, which never materialises the logits, or with
        return_logits=False."""
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x), None
        if self.config.loss == "chunked":
            return None, self._chunked_loss(x, targets)
        logits = self.lm_head(x)
        # fp32 for the softmax over ~50k classes, even when the matmuls ran in bf16
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
        )
        return (logits if return_logits else None), loss

    def _chunked_loss(self, x: Tensor, targets: Tensor) -> Tensor:
        weight = self.lm_head.weight
        device_type = x.device.type
        # The chunked head runs outside autocast; it follows autocast by hand. Training under
        # bf16 autocast: the head's matmuls in bf16, as autocast's would, the logits' softmax
        # and the sums in fp32 (the plain path's fp32 cross-entropy over bf16 logits). Without
        # grad it stays fp32: no backward to speed up, and validation losses keep full
        # precision. fp16 stays fp32 too: the summed loss would overflow fp16's 65504.
        autocast_bf16 = (
            torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.bfloat16
        )
        dtype = torch.bfloat16 if autocast_bf16 and torch.is_grad_enabled() else torch.float32
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        chunk = self.config.loss_chunk_size
        if self.config.loss_kernel == "gpt2x":
            total = chunked_cross_entropy(x, weight, targets, chunk, dtype, ignore_index=-1)
        else:
            # torch's op returns its input dtype (a bf16 sum is rounded once: a few 1e-3)
            total = F.linear_cross_entropy(
                x.to(dtype),
                weight.to(dtype),
                targets,
                reduction="sum",  # "mean" would scale loss and gradients by 1/count in bf16
                ignore_index=-1,
                options=nn.LinearCrossEntropyOptions(
                    batch_chunk_size=chunk, acc_dtype=torch.float32
                ),
            )
        return total.float() / (targets != -1).sum()

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; tied weights count once. non_embedding leaves out the position
        embedding (nanoGPT's convention: the token embedding is also the LM head, a matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6N for the weight matmuls plus
        12*L*H*Q*T for attention scores and values (PaLM appendix B, as in nanoGPT)."""
        c = self.config
        return 6.0 * self.num_params() + 12.0 * c.n_layer * c.n_embd * seq_len

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        vocab_limit: int | None = None,
    ) -> Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 is greedy.
        vocab_limit: ids >= it (the padding rows of a padded vocab) are never sampled.
        The generator must live on idx's device. Runs in eval mode (no dropout)."""
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                # the model has no positions beyond block_size: condition on the latest tokens
                logits, _ = self(idx[:, -self.config.block_size :])
                logits = logits[:, -1, :].float()
                if vocab_limit is not None:
                    logits[:, vocab_limit:] = float("-inf")
                if temperature == 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    nxt = torch.multinomial(probs, num_samples=1, generator=generator)
                idx = torch.cat((idx, nxt), dim=1)
        finally:
            self.train(was_training)
        return idx

    # ---- Hugging Face interop ---------------------------------------------------------------
    # HF's GPT-2 uses Conv1D, a Linear whose weight is stored transposed as (in, out)
    _CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str,
        vocab_size: int | None = None,
        dropout: float = 0.0,
        **options,
    ) -> GPT:
        """Load HF GPT-2 weights: a Hub name ("gpt2", "gpt2-medium", ...; needs network or the
        HF cache) or a local HF directory. The shape is the checkpoint's; `options` are the
        GPTConfig fields that do not change the weights (attn, loss, loss_chunk_size,
        activation_checkpointing). vocab_size > the checkpoint's pads the embedding with zero
        rows, which leaves the logits of the real tokens unchanged."""
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        shape = pretrained_shape(hf.config, name_or_dir)
        vocab_size = shape["vocab_size"] if vocab_size is None else vocab_size
        if vocab_size < shape["vocab_size"]:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than {name_or_dir}'s {shape['vocab_size']}"
            )
        config = GPTConfig(
            **{**shape, "vocab_size": vocab_size}, dropout=dropout, bias=True, **options
        )
        model = cls(config)
        theirs = hf.state_dict()
        with torch.no_grad():
            for name, p in model.named_parameters():  # lm_head.weight is wte's, listed once
                src = theirs[name]
                if name.endswith(cls._CONV1D):
                    src = src.t()
                if name == "transformer.wte.weight":
                    p.zero_()  # padding rows stay zero
                    p[: src.size(0)].copy_(src)
                else:
                    p.copy_(src)
        return model

    def export_hf(self, out_dir: str | Path, vocab_size: int = 50257) -> None:
        """Write a HF GPT-2 folder (config.json + model.safetensors) that
        GPT2LMHeadModel.from_pretrained loads with identical logits. Only the first vocab_size
        embedding rows are kept, dropping the padding rows of a padded vocab."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        if vocab_size > c.vocab_size:
            raise ValueError(f"vocab_size={vocab_size} exceeds the model's {c.vocab_size}")
        eot = vocab_size - 1 if vocab_size == 50257 else None  # <|endoftext|> of the tokenizer
        hc = GPT2Config(
            vocab_size=vocab_size,
            n_positions=c.block_size,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            activation_function="gelu_new",
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=c.dropout,
            layer_norm_epsilon=1e-5,
            bos_token_id=eot,
            eos_token_id=eot,
            tie_word_embeddings=True,
        )
        hf = GPT2LMHeadModel(hc)
        ours = {k: v.detach() for k, v in self.state_dict().items()}
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name not in ours:
                    # bias=False: HF always has biases; zeros compute the same function
                    if not name.endswith(".bias"):
                        raise KeyError(f"export_hf: no parameter for {name}")
                    p.zero_()
                    continue
                src = ours[name]
                if name.endswith(self._CONV1D):
                    src = src.t()
                if name == "transformer.wte.weight":
                    src = src[:vocab_size]
                p.copy_(src.to(device=p.device, dtype=p.dtype))
        hf.save_pretrained(str(out_dir))


def pretrained_shape(hf_config, name_or_dir: str) -> dict:
    """The GPTConfig shape (block_size, vocab_size, n_layer, n_head, n_embd) of a Hugging Face
    GPT-2 config; ValueError for a variant this implementation does not compute identically."""
    hc = hf_config
    unsupported = {
        "activation_function": hc.activation_function not in ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": hc.n_inner not in (None, 4 * hc.n_embd),
        "layer_norm_epsilon": hc.layer_norm_epsilon != 1e-5,
        "scale_attn_weights": not hc.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": hc.scale_attn_by_inverse_layer_idx,
        "add_cross_attention": hc.add_cross_attention,
        "tie_word_embeddings": not getattr(hc, "tie_word_embeddings", True),
    }
    bad = [f"{k}={getattr(hc, k, None)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{name_or_dir}: unsupported GPT-2 variant ({', '.join(bad)})")
    return dict(
        block_size=hc.n_positions,
        vocab_size=hc.vocab_size,
        n_layer=hc.n_layer,
        n_head=hc.n_head,
        n_embd=hc.n_embd,
    )


def check_attention(
    impl: str,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    head_dim: int = 64,
    dropout: float = 0.0,
) -> None:
    """Raise ValueError (one line naming the fix) if attention `impl` cannot run on `device`
    with activations in `dtype` (the autocast dtype). Decided by running a tiny attention call:
    what a kernel supports depends on the PyTorch build, the GPU and the dtype."""
    impl = str(getattr(impl, "value", impl))  # accept config.AttnImpl too
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn={impl!r} is unknown; use attn=naive, attn=sdpa or attn=flash")
    if impl == "naive":
        return  # plain matmuls and softmax run everywhere
    device = torch.device(device)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )
    reason = _try_attention(impl, device, dtype, head_dim, dropout)
    if reason is None:
        return
    if impl == "sdpa":
        raise ValueError(
            f"attn=sdpa cannot run on {device.type} with {name} ({reason}); use attn=naive"
        )
    if device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"attn=flash needs bf16/fp16 on CUDA (got {name}); use precision=bf16 or attn=sdpa"
        )
    # CPU's flash kernel has no dropout: if it works without, name dropout as the problem
    if dropout > 0 and _try_attention(impl, device, dtype, head_dim, 0.0) is None:
        raise ValueError(
            f"attn=flash on {device.type} does not support dropout (model.dropout={dropout}); "
            "set model.dropout=0 or use attn=sdpa"
        )
    raise ValueError(
        f"attn=flash cannot run on {device.type} with {name} ({reason}); use attn=sdpa"
    )


def _try_attention(
    impl: str, device: torch.device, dtype: torch.dtype, head_dim: int, dropout: float
) -> str | None:
    """Run one tiny causal attention forward + backward; return why it failed, or None."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            q = torch.randn(1, 1, 8, head_dim, device=device, dtype=dtype, requires_grad=True)
            if impl == "flash":
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    y = F.scaled_dot_product_attention(q, q, q, dropout_p=dropout, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, q, q, dropout_p=dropout, is_causal=True)
            y.float().sum().backward()
            return None
        except RuntimeError as e:
            # torch explains kernel refusals in warnings; the exception says only "No kernel"
            why = [str(w.message) for w in caught if "not used because" not in str(w.message)]
            why = why or [str(e)]
            why = re.sub(r"\s*\(Triggered internally at .*?\)", "", why[0])
            return " ".join(why.split())  # one line
