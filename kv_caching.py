"""KV caching: generate with a GPT-style transformer in linear, not quadratic, time.

The problem
-----------
A decoder-only transformer generates one token at a time. Step t needs the keys and values of
all t previous tokens. Without a cache, the model runs a full forward pass over the whole prefix
at every step, so step t costs O(t * d_model^2 + t^2 * d_model) FLOPs and generating n tokens
costs O(n^2) (quadratic in the prefix, for the matmuls) or worse. Almost all of that work is
recomputing keys and values that were already computed at the previous step: in a causal model
the key and value of token j never change once token j is known.

The idea
--------
Keep the keys and values of every layer in a cache. A decode step then runs the model on the
*one* new token: it computes that token's query, key and value, appends k and v to the cache,
and attends from the one query to all cached keys. Step t now costs O(d_model^2 + t * d_model):
the weight matmuls are constant, only the (cheap) attention read grows with t. The price is
memory: the cache holds 2 * n_layers * n_heads * head_dim numbers per token, and for a real
model at a long context it can be larger than the weights (see ``REAL_MODELS``). Decoding is then
bound by memory bandwidth: every step reads every weight and the whole cache once.

Two ways to hold the cache:
- ``ConcatKVCache`` grows with ``torch.cat``: simple, but every step copies the whole cache.
- ``KVCache`` pre-allocates ``(batch, n_heads, max_seq_len, head_dim)`` buffers and writes the new
  token in place at ``start_pos``, returning views of the filled prefix (Meta's llama, gpt-fast).

The math
--------
One attention layer, one head, for the new tokens at positions start_pos .. start_pos + q_len - 1
(hidden states x of shape (batch, q_len, d_model)):

    q, k_new, v_new = x W_q, x W_k, x W_v                  each (batch, n_heads, q_len, head_dim)
    K = concat(K_cache, k_new), V = concat(V_cache, v_new)  each (batch, n_heads, kv_len, head_dim)
    kv_len = start_pos + q_len
    S = q K^T / sqrt(head_dim)                              (batch, n_heads, q_len, kv_len)
    S[i, j] = -inf  unless  j <= start_pos + i               (causal mask, offset by start_pos!)
    out = softmax(S) V                                      (batch, n_heads, q_len, head_dim)

The mask offset is the classic bug: a chunk of q_len tokens appended to a cache needs the
bottom-right-aligned triangle ``tril(diagonal=kv_len - q_len)``, not the top-left one that
``scaled_dot_product_attention(is_causal=True)`` builds. ``explicit_attention`` below writes the
formula out line by line; ``attention`` is the same thing through PyTorch's fused kernel.

FLOPs of the decode step at context length n (derived in ``decode_step_flops``), with
P = 12 * d_model^2 weights per layer and the LM head run on the last position only:
    with cache:     2 * n_layers * P     + 4 * n_layers * n * d_model   + 2 * d_model * vocab
    without cache:  2 * n_layers * P * n + 4 * n_layers * n^2 * d_model + 2 * d_model * vocab
Cache bytes: 2 * n_layers * batch * n_heads * seq_len * head_dim * bytes_per_element.

Where it is used
----------------
Every autoregressive LLM server: Hugging Face ``transformers`` (``DynamicCache``, ``StaticCache``),
vLLM (paged KV cache), Meta's llama reference code, gpt-fast, llama.cpp. GQA and MLA exist to
shrink this cache (see ``grouped_query_attention.py`` and ``multihead_latent_attention.py``).

Run it
------
    uv run python kv_caching.py              # default sizes (about 45 s on a 2-core CPU)
    uv run python kv_caching.py --quick      # small sizes, a few seconds
    uv run python kv_caching.py --out DIR --no-show --device cpu --seed 0
    uv run python kv_caching.py --hf-model gpt2   # also real GPT-2 text, if the weights are cached

It prints each check and measurement, saves every figure as PNG and every printed number in
``results.json`` under ``--out`` (default ``figures/kv_caching/``).

References
----------
- Vaswani et al., "Attention Is All You Need", 2017, arXiv 1706.03762.
- Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2), 2019.
- Pope et al., "Efficiently Scaling Transformer Inference", 2022, arXiv 2211.05102
  (KV cache memory, decoding is memory-bandwidth bound, model bandwidth utilisation).
- Ainslie et al., "GQA", 2023, arXiv 2305.13245; DeepSeek-AI, "DeepSeek-V2" (MLA), 2024,
  arXiv 2405.04434, and "DeepSeek-V3 Technical Report", 2024, arXiv 2412.19437.
- Reference code: karpathy/nanoGPT ``model.py`` (the GPT-2 model, no cache);
  meta-llama/llama ``llama/model.py`` (``Attention.forward``: pre-allocated ``cache_k``/``cache_v``
  written at ``start_pos``); pytorch-labs/gpt-fast ``model.py`` (``KVCache.update``);
  huggingface/transformers ``src/transformers/models/gpt2/modeling_gpt2.py`` (the weights we load).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# 1. Implementation
# =============================================================================


def _check_sizes(**sizes: int) -> None:
    """Every size (a dimension, a count) must be at least 1; the error names the argument."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2-style model. The defaults are the demo size used by the benchmark."""

    vocab_size: int = 4096
    max_seq_len: int = 1024
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    layer_norm_eps: float = 1e-5  # GPT-2's layer_norm_epsilon
    attn_impl: str = "sdpa"  # "sdpa" (fused kernel) or "explicit" (the formula, line by line)

    def __post_init__(self) -> None:
        _check_sizes(
            vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
        )
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.attn_impl not in ("sdpa", "explicit"):
            raise ValueError(f"attn_impl ({self.attn_impl!r}) must be one of 'sdpa', 'explicit'")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def gpt2() -> GPTConfig:
    """GPT-2 small (124M): openai-community/gpt2 config.json (n_layer 12, n_head 12, n_embd 768)."""
    return GPTConfig(vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12)


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """(q_len, kv_len) bool: True where query i (at position kv_len - q_len + i) sees key j."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def _check_cache_kv(
    k: torch.Tensor, v: torch.Tensor, batch_size: int, n_heads: int, head_dim: int
) -> None:
    """k and v must be (batch_size, n_heads, n, head_dim) for this cache, with the same n."""
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (batch_size, n_heads, head_dim):
            raise ValueError(
                f"{name} (shape {tuple(t.shape)}) must have shape (batch_size, n_heads, n, "
                f"head_dim) = ({batch_size}, {n_heads}, n, {head_dim})"
            )
    if v.shape != k.shape:
        raise ValueError(f"v (shape {tuple(v.shape)}) must have the shape of k {tuple(k.shape)}")


def _check_cache_write(start_pos: int, n: int, length: int, max_seq_len: int) -> None:
    """The rules every cache enforces: start_pos >= 0, no gap before it, no write past the end."""
    if start_pos < 0:
        raise ValueError(f"start_pos ({start_pos}) must be >= 0")
    if start_pos > length:
        raise ValueError(
            f"start_pos ({start_pos}) would leave a gap: the cache holds {length} tokens, "
            f"so start_pos must be <= {length}"
        )
    if start_pos + n > max_seq_len:
        raise ValueError(
            f"cache overflow: writing {n} tokens at start_pos {start_pos} needs "
            f"{start_pos + n} positions, but max_seq_len is {max_seq_len} "
            f"(room for {max_seq_len - start_pos} more)"
        )


class KVCache:
    """Pre-allocated keys and values of one attention layer (Meta's llama, gpt-fast).

    ``k_cache`` and ``v_cache`` are ``(batch, n_heads, max_seq_len, head_dim)`` buffers allocated
    once. ``update`` copies the new keys/values into positions ``start_pos : start_pos + n`` in
    place and returns *views* of the filled prefix ``[:, :, :start_pos + n]``: no allocation and no
    copy of the old entries, whatever the context length. Writing at ``start_pos < length``
    overwrites (everything after ``start_pos + n`` is then stale and no longer counted).
    """

    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        _check_sizes(
            batch_size=batch_size, n_heads=n_heads, max_seq_len=max_seq_len, head_dim=head_dim
        )
        self.batch_size, self.n_heads = batch_size, n_heads
        self.max_seq_len, self.head_dim = max_seq_len, head_dim
        shape = (batch_size, n_heads, max_seq_len, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # number of filled positions

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (batch, n_heads, n, head_dim) at ``start_pos``; return the prefix views."""
        _check_cache_kv(k, v, self.batch_size, self.n_heads, self.head_dim)
        n = k.shape[2]
        _check_cache_write(start_pos, n, self.length, self.max_seq_len)
        self.k_cache[:, :, start_pos : start_pos + n] = k
        self.v_cache[:, :, start_pos : start_pos + n] = v
        self.length = start_pos + n
        return self.k_cache[:, :, : self.length], self.v_cache[:, :, : self.length]

    def reset(self) -> None:
        """Forget every token (zero the buffers, so a stale read would show as wrong output)."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache))


class ConcatKVCache:
    """The textbook cache: ``torch.cat`` the new keys/values onto the old ones.

    Same interface as ``KVCache``. Every ``update`` allocates a new ``(batch, n_heads,
    start_pos + n, head_dim)`` tensor and copies the whole old cache into it, so a decode step
    costs O(context) extra memory traffic and an allocation: kept to measure why production code
    pre-allocates. ``nbytes`` counts only what is held (it grows with the context).
    """

    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        _check_sizes(
            batch_size=batch_size, n_heads=n_heads, max_seq_len=max_seq_len, head_dim=head_dim
        )
        self.batch_size, self.n_heads = batch_size, n_heads
        self.max_seq_len, self.head_dim = max_seq_len, head_dim
        self.k_cache = torch.zeros(batch_size, n_heads, 0, head_dim, dtype=dtype, device=device)
        self.v_cache = torch.zeros(batch_size, n_heads, 0, head_dim, dtype=dtype, device=device)
        self.length = 0

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (batch, n_heads, n, head_dim) at ``start_pos``; return the new tensors."""
        _check_cache_kv(k, v, self.batch_size, self.n_heads, self.head_dim)
        n = k.shape[2]
        _check_cache_write(start_pos, n, self.length, self.max_seq_len)
        # (batch, n_heads, start_pos + n, head_dim): a fresh tensor, the old prefix copied in.
        self.k_cache = torch.cat((self.k_cache[:, :, :start_pos], k), dim=2)
        self.v_cache = torch.cat((self.v_cache[:, :, :start_pos], v), dim=2)
        self.length = start_pos + n
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        self.k_cache = self.k_cache[:, :, :0].clone()
        self.v_cache = self.v_cache[:, :, :0].clone()
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache))


CACHE_KINDS = {"static": KVCache, "concat": ConcatKVCache}


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) with masked scores set to -inf.

    q (batch, n_heads, q_len, head_dim), k (batch, n_heads, kv_len, head_dim),
    mask (q_len, kv_len) bool. Returns (batch, n_heads, q_len, kv_len), each row sums to 1.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (batch, n_heads, q_len, kv_len)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The readable path: softmax(q k^T / sqrt(d) + mask) v -> (batch, n_heads, q_len, head_dim)."""
    return attention_weights(q, k, mask) @ v


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa"
) -> torch.Tensor:
    """Causal attention of q_len new queries over kv_len keys (the last q_len keys are theirs).

    ``impl="sdpa"`` calls PyTorch's fused ``scaled_dot_product_attention``; ``impl="explicit"``
    is the same formula written out in ``explicit_attention`` / ``attention_weights`` (read
    those; the tests prove the two agree). The mask is ``causal_mask(q_len, kv_len)``, aligned
    bottom-right: query i sits at absolute position kv_len - q_len + i. A single decode query
    (q_len == 1) sees every key, so it needs no mask at all and SDPA takes its fastest path.
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    if impl == "explicit":
        return explicit_attention(q, k, v, causal_mask(q_len, kv_len, q.device))
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if q_len == kv_len:
        # No cache before these tokens: the usual square triangle (is_causal aligns top-left,
        # which is only right when q_len == kv_len).
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_len, kv_len, q.device))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional KV cache (GPT-2's ``attn``).

    [q | k | v] = x W_qkv + b (one ``c_attn`` matmul), split into n_heads heads of head_dim;
    with a cache the new k, v are written at ``start_pos`` and attention reads all
    start_pos + q_len of them; out = concat_heads(softmax(q K^T / sqrt(head_dim) + mask) V) W_o.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.impl = config.n_heads, config.head_dim, config.attn_impl
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)  # W_q|W_k|W_v
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)  # W_o

    def forward(
        self, x: torch.Tensor, cache: KVCache | ConcatKVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        batch, q_len, d_model = x.shape
        q, k, v = self.c_attn(x).split(d_model, dim=2)  # each (batch, q_len, d_model)
        # (batch, q_len, d_model) -> (batch, n_heads, q_len, head_dim)
        q, k, v = (
            t.view(batch, q_len, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)
        )
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # (batch, n_heads, start_pos + q_len, head_dim)
        y = attention(q, k, v, self.impl)  # (batch, n_heads, q_len, head_dim)
        y = y.transpose(1, 2).reshape(batch, q_len, d_model)  # heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    """GELU feed-forward, d_model -> 4 d_model -> d_model. GPT-2 uses the tanh approximation."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache=None, start_pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start_pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, pre-LN blocks, final LN, tied LM head.

    Parameter names follow Hugging Face's ``GPT2LMHeadModel`` (and nanoGPT), so
    ``from_hf_gpt2`` only has to transpose the Conv1D weights.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                wpe=nn.Embedding(config.max_seq_len, config.d_model),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
                ln_f=nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: logits = h @ wte^T
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled down
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(
        self, batch_size: int, kind: str = "static", max_seq_len: int | None = None
    ) -> list[KVCache] | list[ConcatKVCache]:
        """One cache per layer, on the model's device and dtype. ``kind``: 'static' or 'concat'."""
        if kind not in CACHE_KINDS:
            raise ValueError(f"kind ({kind!r}) must be one of 'static', 'concat'")
        max_seq_len = self.config.max_seq_len if max_seq_len is None else max_seq_len
        weight = self.lm_head.weight
        return [
            CACHE_KINDS[kind](
                batch_size,
                self.config.n_heads,
                max_seq_len,
                self.config.head_dim,
                dtype=weight.dtype,
                device=weight.device,
            )
            for _ in range(self.config.n_layers)
        ]

    def _check_ids(self, idx: torch.Tensor, name: str = "idx") -> None:
        if idx.dim() != 2:
            raise ValueError(f"{name} shape ({tuple(idx.shape)}) must be (batch, seq_len)")
        if idx.shape[1] == 0:
            raise ValueError(f"{name} is empty (seq_len 0): give at least one token")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} contains token id {bad}, outside the vocabulary "
                f"[0, {self.config.vocab_size - 1}] (vocab_size {self.config.vocab_size})"
            )

    def forward(
        self,
        idx: torch.Tensor,
        cache: list | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for token ids ``idx`` (batch, seq_len) sitting at positions start_pos ...

        - no cache: ``start_pos`` must be 0, the whole sequence is processed (training, or
          generation without a cache);
        - with a cache (one per layer, from ``new_cache``): prefill (start_pos 0, many tokens),
          one decode token, or a chunk appended to what the cache holds.
        ``last_only`` computes the LM head for the last position only (all generation needs).
        Returns (batch, seq_len, vocab_size), or (batch, 1, vocab_size) with ``last_only``.
        """
        self._check_ids(idx)
        seq_len = idx.shape[1]
        if cache is None and start_pos != 0:
            raise ValueError(f"start_pos ({start_pos}) must be 0 when no cache is given")
        if start_pos < 0:
            raise ValueError(f"start_pos ({start_pos}) must be >= 0")
        if start_pos + seq_len > self.config.max_seq_len:
            raise ValueError(
                f"start_pos ({start_pos}) + seq_len ({seq_len}) must lie in "
                f"[1, max_seq_len ({self.config.max_seq_len})]: the position embedding has "
                f"max_seq_len rows"
            )
        if cache is not None and len(cache) != self.config.n_layers:
            raise ValueError(
                f"cache ({len(cache)} layer caches) must hold one per block, "
                f"n_layers ({self.config.n_layers})"
            )
        positions = torch.arange(start_pos, start_pos + seq_len, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (batch, seq, d_model)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i], start_pos)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:]  # (batch, 1, d_model)
        return self.lm_head(x)

    @torch.inference_mode()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        use_cache: bool = True,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cache_kind: str = "static",
        return_logits: bool = False,
    ):
        """Append ``max_new_tokens`` tokens to ``idx`` (batch, prompt_len).

        temperature 0 is greedy (argmax); otherwise sample from softmax(logits / temperature),
        restricted to the ``top_k`` largest logits if given, drawing with ``generator``. With a
        cache: one prefill pass over the prompt, then one single-token pass per new token. Without:
        a full pass over the whole sequence per new token. Returns (batch, prompt_len +
        max_new_tokens) ids, and with ``return_logits`` also the (batch, max_new_tokens, vocab)
        logits each token was chosen from.
        """
        self._check_ids(idx)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
        if temperature < 0:
            raise ValueError(f"temperature ({temperature}) must be >= 0 (0 means greedy)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k ({top_k}) must be >= 1 (or None for no top-k filter)")
        prompt_len, max_len = idx.shape[1], self.config.max_seq_len
        if prompt_len + max_new_tokens > max_len:
            raise ValueError(
                f"prompt length ({prompt_len}) + max_new_tokens ({max_new_tokens}) = "
                f"{prompt_len + max_new_tokens} exceeds max_seq_len ({max_len}): "
                f"at most {max(max_len - prompt_len, 0)} new tokens fit after this prompt"
            )
        cache = None
        if use_cache:  # sized for this generation only, not for max_seq_len
            cache = self.new_cache(idx.shape[0], cache_kind, prompt_len + max_new_tokens)
            logits = self(idx, cache, start_pos=0, last_only=True)  # prefill
        else:
            logits = self(idx, last_only=True)
        all_logits = []
        for step in range(max_new_tokens):
            logits = logits[:, -1]  # (batch, vocab)
            all_logits.append(logits)
            next_id = sample_next(logits, temperature, top_k, generator)  # (batch, 1)
            idx = torch.cat((idx, next_id), dim=1)
            if step == max_new_tokens - 1:
                break
            if use_cache:  # the new token only, at its absolute position
                logits = self(next_id, cache, start_pos=idx.shape[1] - 1, last_only=True)
            else:  # the whole sequence again
                logits = self(idx, last_only=True)
        if return_logits:
            return idx, torch.stack(all_logits, dim=1)
        return idx

    @classmethod
    def from_hf_gpt2(cls, model_or_state_dict, n_heads: int | None = None) -> GPT:
        """A ``GPT`` with Hugging Face GPT-2 weights (a ``GPT2LMHeadModel`` or its state dict).

        HF's GPT-2 uses ``Conv1D`` layers whose weight is stored (in_features, out_features), the
        transpose of ``nn.Linear``'s (out, in): ``c_attn``, ``c_proj`` and ``c_fc`` weights are
        transposed, everything else copies by name. A bare state dict does not say how many heads
        the model has, so pass ``n_heads`` with one.
        """
        if isinstance(model_or_state_dict, nn.Module):
            hf_config = model_or_state_dict.config
            activation = getattr(hf_config, "activation_function", "gelu_new")
            if activation not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(
                    f"activation_function ({activation!r}) must be one of 'gelu_new', "
                    f"'gelu_pytorch_tanh' (the tanh GELU this model implements)"
                )
            if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
                raise ValueError("scale_attn_by_inverse_layer_idx (True) is not supported")
            n_heads, eps = hf_config.n_head, hf_config.layer_norm_epsilon
            state = model_or_state_dict.state_dict()
        else:
            if n_heads is None:
                raise ValueError("n_heads (None) must be given when loading from a state dict")
            state, eps = dict(model_or_state_dict), 1e-5  # GPT-2's layer_norm_epsilon
        if "wte.weight" in state:  # a GPT2Model state dict: no "transformer." prefix
            state = {f"transformer.{key}": value for key, value in state.items()}
        wte = state["transformer.wte.weight"]  # (vocab_size, d_model)
        n_layers = 1 + max(
            int(key.split(".")[2]) for key in state if key.startswith("transformer.h.")
        )
        config = GPTConfig(
            vocab_size=wte.shape[0],
            max_seq_len=state["transformer.wpe.weight"].shape[0],
            d_model=wte.shape[1],
            n_layers=n_layers,
            n_heads=n_heads,
            bias="transformer.ln_f.bias" in state,
            layer_norm_eps=eps,
        )
        model = cls(config)
        conv1d = (
            "attn.c_attn.weight",
            "attn.c_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        )
        ours = {}
        for key in model.state_dict():
            if key == "lm_head.weight":
                ours[key] = state.get(key, wte)  # tied to wte
            elif key.endswith(conv1d):
                ours[key] = state[key].t()  # Conv1D (in, out) -> Linear (out, in)
            else:
                ours[key] = state[key]
        model.load_state_dict(ours, strict=True)
        return model


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (batch, 1) from last-position logits (batch, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# =============================================================================
# 2. Analysis: correctness checks, benchmarks, memory accounting
# =============================================================================


BENCHMARK_THREADS = 1  # threads median_time_s times with, recorded in results.json


def median_time_s(fn, min_run_time: float = 0.2) -> float:
    """Median seconds per call of ``fn()`` by ``torch.utils.benchmark`` (warm-up, device sync)."""
    # Imported here, not at the top: importing it loads torch.utils.cpp_extension, which logs
    # "No CUDA runtime is found" on machines with a CUDA toolkit but no GPU.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        cpp_logger.setLevel(level)
    # One thread (the Timer's default): the small kernels timed here give steadier numbers on
    # one core than when threads must synchronise, and the ratios, not the speed, are the point.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=BENCHMARK_THREADS)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def kv_cache_bytes(
    n_layers: int, batch: int, n_kv_heads: int, seq_len: int, head_dim: int, bytes_per_element: int
) -> int:
    """2 (K and V) * n_layers * batch * n_kv_heads * seq_len * head_dim * bytes_per_element."""
    return 2 * n_layers * batch * n_kv_heads * seq_len * head_dim * bytes_per_element


def mla_cache_bytes(
    n_layers: int,
    batch: int,
    seq_len: int,
    kv_lora_rank: int,
    rope_head_dim: int,
    bytes_per_element: int,
) -> int:
    """MLA caches a latent c_kv (kv_lora_rank) and one shared RoPE key (rope_head_dim) per token."""
    return n_layers * batch * seq_len * (kv_lora_rank + rope_head_dim) * bytes_per_element


def decode_step_flops(config: GPTConfig, kv_len: int, use_cache: bool) -> int:
    """Matmul FLOPs of the step that processes the token at position kv_len - 1 (batch 1).

    Per token and layer the weights c_attn (3 d^2), attn.c_proj (d^2), c_fc (4 d^2) and
    mlp.c_proj (4 d^2) cost 2 * 12 d^2 FLOPs; the LM head (d * vocab) runs on the last
    position only (``last_only``). Attention of q queries over kv_len keys costs
    4 * q * kv_len * d per layer (q k^T and weights @ v, all heads together).
      with cache:    1 token,       q = 1
      without cache: kv_len tokens, q = kv_len (the full score matrix, as SDPA computes it)
    LayerNorms, GELU, softmax and biases are O(d) per token and left out.
    """
    d, n_layers = config.d_model, config.n_layers
    n_tokens = 1 if use_cache else kv_len
    weights = n_tokens * n_layers * 2 * 12 * d * d + 2 * d * config.vocab_size
    attn = n_layers * 4 * n_tokens * kv_len * d
    return weights + attn


def fit_loglog_slope(x, y) -> float:
    """Slope b of log y = a + b log x (least squares): y ~ x^b."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


@torch.inference_mode()
def check_correctness(
    model: GPT, prompt: torch.Tensor, max_new_tokens: int, chunk: int = 3
) -> dict:
    """Cached generation must reproduce uncached generation, logit for logit.

    Greedy-decodes ``max_new_tokens`` without a cache and with each cache kind, compares the
    logits every token was chosen from, and checks two more ways of computing the same thing:
    a prefill in chunks of ``chunk`` tokens, and the explicit-softmax attention path.
    """
    ids_ref, logits_ref = model.generate(
        prompt, max_new_tokens, use_cache=False, return_logits=True
    )
    out = {"n_new_tokens": max_new_tokens, "prompt_len": prompt.shape[1]}
    for kind in CACHE_KINDS:
        ids, logits = model.generate(prompt, max_new_tokens, cache_kind=kind, return_logits=True)
        out[f"max_abs_err_logits_{kind}_vs_no_cache"] = float((logits - logits_ref).abs().max())
        out[f"ids_identical_{kind}_vs_no_cache"] = bool(torch.equal(ids, ids_ref))
    full = model(ids_ref)  # (1, seq_len, vocab): one pass over the whole sequence
    cache = model.new_cache(1, "static")
    chunks = [
        model(ids_ref[:, s : s + chunk], cache, start_pos=s)
        for s in range(0, ids_ref.shape[1], chunk)
    ]
    out["chunk_size"] = chunk
    out["max_abs_err_chunked_prefill"] = float((torch.cat(chunks, dim=1) - full).abs().max())
    explicit = GPT(replace(model.config, attn_impl="explicit")).to(prompt.device)
    explicit.load_state_dict(model.state_dict())
    out["max_abs_err_explicit_vs_sdpa"] = float((explicit(ids_ref) - full).abs().max())
    return out


def decode_positions(prompt_len: int, total_len: int, n_points: int) -> list[int]:
    """A geometric grid of decode positions from prompt_len to total_len - 2 (the last step)."""
    grid = np.geomspace(prompt_len, total_len - 2, n_points)
    return sorted({int(round(p)) for p in grid})


CACHE_ROUNDS = 3  # alternating timing rounds of the concat and static steps at each position


@torch.inference_mode()
def benchmark_decode(
    model: GPT, prompt_len: int, total_len: int, n_points: int, min_run_time: float, seed: int
) -> dict:
    """Median time of one decode step at a grid of positions, for each method.

    A step at position p processes the token at p, with p tokens before it:
      no_cache: a full forward over ids[:, :p + 1] (what ``generate(use_cache=False)`` does);
      static / concat: one token, with a cache already holding p tokens. The static step writes
        in place; the concat step rebuilds a (p + 1)-token tensor, as it would while generating.
    Generation time is estimated as the prefill plus the step times summed over every decode
    position (linear interpolation between the measured grid points), and cross-checked against
    a direct timing of ``generate`` with the static cache.
    """
    gen = torch.Generator().manual_seed(seed)
    device = model.lm_head.weight.device
    ids = torch.randint(model.config.vocab_size, (1, total_len), generator=gen).to(device)
    positions = decode_positions(prompt_len, total_len, n_points)
    step_s: dict[str, list[float]] = {"no_cache": [], "concat": [], "static": []}
    for p in positions:
        step_s["no_cache"].append(
            median_time_s(lambda p=p: model(ids[:, : p + 1], last_only=True), min_run_time)
        )
        steps = {}
        for kind in ("concat", "static"):
            cache = model.new_cache(1, kind, total_len)
            model(ids[:, :p], cache, start_pos=0)  # prefill p tokens

            def step(p=p, cache=cache):
                return model(ids[:, p : p + 1], cache, start_pos=p, last_only=True)

            steps[kind] = step
        # The two caches differ by a few percent, less than the drift of a shared machine
        # between two timings: alternate them for CACHE_ROUNDS rounds and keep the medians.
        rounds: dict[str, list[float]] = {kind: [] for kind in steps}
        for _ in range(CACHE_ROUNDS):
            for kind, step in steps.items():
                rounds[kind].append(median_time_s(step, min_run_time))
        for kind, times in rounds.items():
            step_s[kind].append(float(np.median(times)))
    prefill_s = median_time_s(lambda: model(ids[:, :prompt_len], last_only=True), min_run_time)
    all_positions = np.arange(prompt_len, total_len - 1)  # every decode step of the generation
    generation_s = {
        m: prefill_s + float(np.interp(all_positions, positions, t).sum())
        for m, t in step_s.items()
    }
    n_new = total_len - prompt_len
    prompt = ids[:, :prompt_len]
    measured_static_s = median_time_s(lambda: model.generate(prompt, n_new), min_run_time)
    return {
        "prompt_len": prompt_len,
        "total_len": total_len,
        "n_new_tokens": n_new,
        "positions": positions,
        "step_ms": {m: [1e3 * t for t in ts] for m, ts in step_s.items()},
        "prefill_ms": 1e3 * prefill_s,
        "generation_s": generation_s,
        "tokens_per_s": {m: n_new / t for m, t in generation_s.items()},
        "speedup_static_vs_no_cache": generation_s["no_cache"] / generation_s["static"],
        "speedup_concat_vs_no_cache": generation_s["no_cache"] / generation_s["concat"],
        "static_generate_measured_s": measured_static_s,
        "static_estimate_vs_measured_ratio": generation_s["static"] / measured_static_s,
    }


def scaling_analysis(config: GPTConfig, bench: dict) -> dict:
    """Fitted log-log slope of step time vs context length, next to the analytic FLOPs.

    Slope ~1 means time per step grows linearly with the context (so generation is quadratic);
    slope ~0 means constant time per step (generation is linear).
    """
    kv_lens = [p + 1 for p in bench["positions"]]
    flops = {
        "no_cache": [decode_step_flops(config, n, use_cache=False) for n in kv_lens],
        "static": [decode_step_flops(config, n, use_cache=True) for n in kv_lens],
    }
    return {
        "kv_lens": kv_lens,
        "fitted_slope": {m: fit_loglog_slope(kv_lens, t) for m, t in bench["step_ms"].items()},
        "flops_per_step": flops,
        "analytic_flops_slope": {m: fit_loglog_slope(kv_lens, f) for m, f in flops.items()},
        "flops_ratio_no_cache_vs_cache_at_longest": flops["no_cache"][-1] / flops["static"][-1],
    }


def measure_memory(config: GPTConfig, lengths: list[int], batch: int = 1) -> dict:
    """Bytes of real cache tensors (both kinds, fp32 and bf16) vs the formula, per length."""
    rows = []
    shape = (config.n_layers, batch, config.n_heads, config.head_dim)
    for dtype in (torch.float32, torch.bfloat16):
        width = torch.tensor([], dtype=dtype).element_size()
        for seq_len in lengths:
            static = [
                KVCache(batch, config.n_heads, seq_len, config.head_dim, dtype)
                for _ in range(config.n_layers)
            ]
            concat = []
            for _ in range(config.n_layers):  # a concat cache holds what was written into it
                layer = ConcatKVCache(batch, config.n_heads, seq_len, config.head_dim, dtype)
                kv = torch.zeros(batch, config.n_heads, seq_len, config.head_dim, dtype=dtype)
                layer.update(kv, kv, start_pos=0)
                concat.append(layer)
            formula = kv_cache_bytes(shape[0], batch, shape[2], seq_len, shape[3], width)
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "seq_len": seq_len,
                    "static_bytes": sum(c.nbytes for c in static),
                    "concat_bytes": sum(c.nbytes for c in concat),
                    "formula_bytes": formula,
                }
            )
    all_match = all(r["static_bytes"] == r["concat_bytes"] == r["formula_bytes"] for r in rows)
    if not all_match:
        raise RuntimeError("measured cache bytes disagree with the formula")
    return {
        "batch": batch,
        "rows": rows,
        "bytes_per_token_fp32": kv_cache_bytes(shape[0], batch, shape[2], 1, shape[3], 4),
        "measured_equals_formula": all_match,
    }


# Published configs (Hugging Face config.json of each repository, and the papers).
# n_kv_heads < n_heads is grouped-query attention; DeepSeek-V3 caches an MLA latent instead.
REAL_MODELS = [
    dict(
        name="GPT-2 small",
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        head_dim=64,
        max_context=1024,
        source="openai-community/gpt2 config.json (n_layer 12, n_head 12, n_embd 768)",
    ),
    dict(
        name="GPT-2 XL",
        n_layers=48,
        n_heads=25,
        n_kv_heads=25,
        head_dim=64,
        max_context=1024,
        source="openai-community/gpt2-xl config.json (n_layer 48, n_head 25, n_embd 1600)",
    ),
    dict(
        name="Llama-2-7B",
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        max_context=4096,
        vocab_size=32000,  # also used for its weight count in ``concat_cost_analysis``
        intermediate_size=11008,
        source="meta-llama/Llama-2-7b-hf config.json; Touvron et al. 2023, arXiv 2307.09288",
    ),
    dict(
        name="Llama-2-70B",
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        head_dim=128,
        max_context=4096,
        source="meta-llama/Llama-2-70b-hf config.json (GQA, 8 KV heads); arXiv 2307.09288",
    ),
    dict(
        name="Llama-3-8B",
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        max_context=8192,
        source="meta-llama/Meta-Llama-3-8B config.json (GQA, 8 KV heads); arXiv 2407.21783",
    ),
    dict(
        name="Mistral-7B",
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        max_context=32768,
        source="mistralai/Mistral-7B-v0.1 config.json (GQA; sliding_window 4096 would cap it); "
        "Jiang et al. 2023, arXiv 2310.06825",
    ),
    dict(
        name="DeepSeek-V3 (MLA)",
        n_layers=61,
        n_heads=128,
        n_kv_heads=128,
        head_dim=None,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        max_context=163840,
        source="deepseek-ai/DeepSeek-V3 config.json (kv_lora_rank 512, qk_rope_head_dim 64); "
        "arXiv 2412.19437, MLA from arXiv 2405.04434",
    ),
]

CONTEXTS = (4096, 32768, 131072)


def real_model_cache_table(bytes_per_element: int = 2) -> dict:
    """KV cache of one sequence (batch 1) for published models, per token and at 4K/32K/128K."""
    rows = []
    for m in REAL_MODELS:
        if "kv_lora_rank" in m:
            per_token = mla_cache_bytes(
                m["n_layers"], 1, 1, m["kv_lora_rank"], m["qk_rope_head_dim"], bytes_per_element
            )
            # Without MLA: every head caches a (nope + rope)-dim key and a v_head_dim value.
            mha_per_token = (
                m["n_layers"]
                * m["n_heads"]
                * (m["qk_nope_head_dim"] + m["qk_rope_head_dim"] + m["v_head_dim"])
                * bytes_per_element
            )
            kind = "MLA latent"
        else:
            per_token = kv_cache_bytes(
                m["n_layers"], 1, m["n_kv_heads"], 1, m["head_dim"], bytes_per_element
            )
            mha_per_token = kv_cache_bytes(
                m["n_layers"], 1, m["n_heads"], 1, m["head_dim"], bytes_per_element
            )
            kind = "GQA" if m["n_kv_heads"] < m["n_heads"] else "MHA"
        rows.append(
            {
                "name": m["name"],
                "kind": kind,
                "per_token_bytes": per_token,
                "mha_equivalent_per_token_bytes": mha_per_token,
                "at_context_bytes": {str(n): per_token * n for n in CONTEXTS},
                "max_context": m["max_context"],
                "source": m["source"],
            }
        )
    return {"bytes_per_element": bytes_per_element, "contexts": list(CONTEXTS), "rows": rows}


def llama_param_count(m: dict) -> int:
    """Parameters of a Llama-2-style model from its config (untied embedding and LM head).

    Per layer: q, o (d x d), k, v (d x n_kv_heads * head_dim), gate, up, down (d x ffn) and two
    RMSNorm weights; plus the embedding, the LM head and the final norm.
    """
    d, ffn, kv = (
        m["n_heads"] * m["head_dim"],
        m["intermediate_size"],
        m["n_kv_heads"] * m["head_dim"],
    )
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d
    return 2 * m["vocab_size"] * d + m["n_layers"] * per_layer + d


@torch.inference_mode()
def concat_cost_analysis(model: GPT, bench: dict, min_run_time: float) -> dict:
    """What the concat cache pays on top of the static one at the longest measured context.

    At position p a concat step copies the old prefix of K and V of every layer into a new tensor:
    ``kv_cache_bytes(n_layers, 1, n_heads, p, head_dim, width)`` bytes read and as many written,
    where the static cache writes one token in place. Both cache updates are timed alone (all
    layers); their difference, next to the static step, predicts the concat/static step ratio.
    For scale, the same copy for Llama-2-7B in bf16 at 4K and 32K tokens: a decode step that is
    bound by memory traffic reads weights + cache with a static cache, and 2 x cache more with
    concat, so concat/static ~ 1 + 2 cache / (weights + cache).
    """
    c = model.config
    p = bench["positions"][-1]
    weight = model.lm_head.weight
    new = torch.randn(1, c.n_heads, 1, c.head_dim, dtype=weight.dtype, device=weight.device)
    prefix = torch.randn(1, c.n_heads, p, c.head_dim, dtype=weight.dtype, device=weight.device)
    update_s = {}
    for kind in ("concat", "static"):
        caches = model.new_cache(1, kind, p + 1)
        for layer in caches:
            layer.update(prefix, prefix, 0)

        def update_all(caches=caches):
            for layer in caches:
                layer.update(new, new, p)  # rewrites position p: the same work every call

        update_s[kind] = median_time_s(update_all, min_run_time)
    static_step_ms = bench["step_ms"]["static"][-1]
    extra_ms = 1e3 * (update_s["concat"] - update_s["static"])
    llama = next(m for m in REAL_MODELS if m["name"] == "Llama-2-7B")
    weight_bytes = 2 * llama_param_count(llama)  # bf16
    projection = []
    for n in (4096, 32768):
        cache = kv_cache_bytes(llama["n_layers"], 1, llama["n_kv_heads"], n, llama["head_dim"], 2)
        projection.append(
            {
                "context": n,
                "cache_bytes": cache,
                "bytes_copied_per_step": cache,
                "memory_bound_concat_vs_static_ratio": 1 + 2 * cache / (weight_bytes + cache),
            }
        )
    return {
        "position": p,
        "bytes_copied_per_step": kv_cache_bytes(
            c.n_layers, 1, c.n_heads, p, c.head_dim, weight.element_size()
        ),
        "update_ms": {kind: 1e3 * t for kind, t in update_s.items()},
        "extra_ms": extra_ms,
        "static_step_ms": static_step_ms,
        "extra_vs_static_step_ratio": extra_ms / static_step_ms,
        "predicted_concat_vs_static_ratio": 1 + extra_ms / static_step_ms,
        "measured_concat_vs_static_ratio": bench["step_ms"]["concat"][-1] / static_step_ms,
        "llama_2_7b_weight_bytes": weight_bytes,
        "llama_2_7b": projection,
    }


def copy_bandwidth_gb_per_s(n_bytes: int, device: torch.device, min_run_time: float) -> float:
    """This machine's memory bandwidth: copying n_bytes reads n_bytes and writes n_bytes.

    The destination is allocated once: a plain ``clone()`` would get fresh pages from the OS at
    every call on a CPU and time the page faults, not the memory.
    """
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / median_time_s(lambda: dst.copy_(src), min_run_time) / 1e9


def matvec_bandwidth_gb_per_s(n_bytes: int, device: torch.device, min_run_time: float) -> float:
    """Bytes of an fp32 (rows, 4096) matrix read per second by one matrix-vector product.

    A batch-1 decode step is made of exactly this (every Linear sees one token), so this is the
    most a decode step can hope for on this machine, usually a little below the copy bandwidth.
    """
    cols = 4096
    weight = torch.ones(n_bytes // (4 * cols), cols, device=device)
    x = torch.ones(cols, device=device)
    return weight.numel() * 4 / median_time_s(lambda: weight @ x, min_run_time) / 1e9


def matmul_flops_per_s(device: torch.device, n: int, min_run_time: float) -> float:
    """This machine's fp32 matmul throughput on an (n, n) @ (n, n) product (2 n^3 FLOPs)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return 2 * n**3 / median_time_s(lambda: a @ b, min_run_time)


def tiny_widths(config: GPTConfig) -> GPTConfig:
    """Same layers, heads and operators, but head_dim 2 and an 8-token vocabulary.

    A decode step of this model reads almost no bytes and does almost no arithmetic, so its time
    is what every step pays regardless of width: Python, operator dispatch, small-kernel calls.
    It is a lower bound on that fixed cost (a wide model's kernels may take slower paths).
    """
    return replace(config, vocab_size=8, d_model=2 * config.n_heads)


MAIN_COSTS = {
    "overhead": "per-operator overhead (Python and operator dispatch)",
    "memory": "memory traffic (reading the weights and the cache)",
    "arithmetic": "arithmetic (matmul FLOPs)",
}


def main_decode_cost(
    step_s: float, overhead_s: float, memory_floor_s: float, compute_floor_s: float
) -> str:
    """Name what most of a measured decode step is spent on (a key of ``MAIN_COSTS``).

    The step is split into the measured fixed overhead (``tiny_widths`` model) and the rest,
    which grows with the widths. If the overhead is at least half the step, it is the main cost.
    Otherwise the rest is spent moving bytes or doing FLOPs, and the larger of the two floors
    (bytes / copy bandwidth, FLOPs / matmul throughput) says which one the hardware limits.
    """
    if overhead_s >= 0.5 * step_s:
        return "overhead"
    return "memory" if memory_floor_s >= compute_floor_s else "arithmetic"


@torch.inference_mode()
def bandwidth_analysis(
    models: dict[str, GPT], context_len: int, copy_bytes: int, min_run_time: float, seed: int
) -> dict:
    """A decode step reads every weight and the whole cache once: how close to memory speed?

    bytes_read = weight bytes (tied embedding counted once) + cache bytes for context_len + 1
    tokens; achieved GB/s = bytes_read / step time; utilisation = achieved / copy bandwidth
    (model bandwidth utilisation, Pope et al. 2022), and also / matrix-vector bandwidth, the
    operation decode is made of. To name the main cost honestly, the step is compared with
    three measured quantities: the step of the same model at tiny widths (``tiny_widths``: the
    fixed per-operator overhead), bytes / copy bandwidth (memory floor) and FLOPs / matmul
    throughput (arithmetic floor); ``main_decode_cost`` turns them into a label.
    """
    device = next(iter(models.values())).lm_head.weight.device
    copy_gbs = copy_bandwidth_gb_per_s(copy_bytes, device, min_run_time)
    matvec_gbs = matvec_bandwidth_gb_per_s(copy_bytes, device, min_run_time)
    flops_per_s = matmul_flops_per_s(device, 1024, min_run_time)
    gen = torch.Generator().manual_seed(seed)

    def step_time_s(model: GPT) -> float:
        ids = torch.randint(model.config.vocab_size, (1, context_len + 1), generator=gen)
        ids = ids.to(device)
        cache = model.new_cache(1, "static", context_len + 1)
        model(ids[:, :context_len], cache, start_pos=0)
        return median_time_s(
            lambda: model(ids[:, -1:], cache, start_pos=context_len, last_only=True),
            min_run_time,
        )

    rows = []
    for name, model in models.items():
        c = model.config
        step_s = step_time_s(model)
        overhead_s = step_time_s(GPT(tiny_widths(c)).to(device).eval())
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        width = model.lm_head.weight.element_size()
        cache_bytes = kv_cache_bytes(c.n_layers, 1, c.n_heads, context_len + 1, c.head_dim, width)
        bytes_read = weight_bytes + cache_bytes
        achieved = bytes_read / step_s / 1e9
        memory_floor_s = bytes_read / (copy_gbs * 1e9)
        compute_floor_s = decode_step_flops(c, context_len + 1, use_cache=True) / flops_per_s
        cost = main_decode_cost(step_s, overhead_s, memory_floor_s, compute_floor_s)
        # The bytes over the part of the step that the fixed overhead does not explain.
        beyond_gbs = bytes_read / max(step_s - overhead_s, 1e-9) / 1e9
        rows.append(
            {
                "name": name,
                "n_params": sum(p.numel() for p in model.parameters()),
                "weight_bytes": weight_bytes,
                "cache_bytes": cache_bytes,
                "bytes_read_per_step": bytes_read,
                "step_ms": 1e3 * step_s,
                "achieved_gb_per_s": achieved,
                "bandwidth_utilisation_ratio": achieved / copy_gbs,
                "matvec_utilisation_ratio": achieved / matvec_gbs,
                "overhead_ms": 1e3 * overhead_s,
                "overhead_share_ratio": overhead_s / step_s,
                "beyond_overhead_ms": 1e3 * (step_s - overhead_s),
                "beyond_overhead_gb_per_s": beyond_gbs,
                "beyond_overhead_matvec_ratio": beyond_gbs / matvec_gbs,
                "memory_floor_ms": 1e3 * memory_floor_s,
                "compute_floor_ms": 1e3 * compute_floor_s,
                "main_cost_kind": cost,
                "main_cost": MAIN_COSTS[cost],
            }
        )
    return {
        "context_len": context_len,
        "copy_bytes": copy_bytes,
        "copy_bandwidth_gb_per_s": copy_gbs,
        "matvec_bandwidth_gb_per_s": matvec_gbs,
        "matmul_gflops_per_s": flops_per_s / 1e9,
        "models": rows,
    }


@torch.inference_mode()
def attention_picture(model: GPT, ids: torch.Tensor, layer: int = 0, head: int = 0) -> dict:
    """Attention weights of one head for a short sequence (batch 1), for the decode-step figure."""
    n = ids.shape[1]
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(n, device=ids.device))
    for block in model.transformer.h[:layer]:
        x = block(x)
    block = model.transformer.h[layer]
    q, k, _ = block.attn.c_attn(block.ln_1(x)).split(model.config.d_model, dim=2)
    # (1, n, d_model) -> (1, n_heads, n, head_dim)
    q, k = (
        t.view(1, n, model.config.n_heads, model.config.head_dim).transpose(1, 2) for t in (q, k)
    )
    weights = attention_weights(q, k, causal_mask(n, n, ids.device))[0, head]  # (n, n)
    return {
        "layer": layer,
        "head": head,
        "weights": weights.cpu().tolist(),
        "scores_computed_no_cache": n * n,
        "scores_computed_with_cache": n,
    }


def hf_demo(name: str, device: torch.device, max_new_tokens: int, min_run_time: float) -> dict:
    """Real GPT-2 text with and without the cache, if ``transformers`` and the weights are local."""
    try:
        from transformers import AutoTokenizer, GPT2LMHeadModel
    except ImportError:
        return {"model": name, "available": False, "reason": "transformers is not installed"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        hf_model = GPT2LMHeadModel.from_pretrained(name, local_files_only=True)
    except OSError:
        return {
            "model": name,
            "available": False,
            "reason": f"no local copy of {name!r} in the Hugging Face cache (no download is tried)",
        }
    model = GPT.from_hf_gpt2(hf_model).to(device).eval()
    prompt_text = "The key to fast text generation with a transformer is"
    prompt = tokenizer(prompt_text, return_tensors="pt").input_ids.to(device)
    ids_cache = model.generate(prompt, max_new_tokens, use_cache=True)
    ids_no_cache = model.generate(prompt, max_new_tokens, use_cache=False)
    with_s = median_time_s(lambda: model.generate(prompt, max_new_tokens), min_run_time)
    without_s = median_time_s(
        lambda: model.generate(prompt, max_new_tokens, use_cache=False), min_run_time
    )
    return {
        "model": name,
        "available": True,
        "prompt": prompt_text,
        "text": tokenizer.decode(ids_cache[0]),
        "n_new_tokens": max_new_tokens,
        "ids_identical_cache_vs_no_cache": bool(torch.equal(ids_cache, ids_no_cache)),
        "generate_with_cache_s": with_s,
        "generate_without_cache_s": without_s,
        "speedup_cache_vs_no_cache": without_s / with_s,
    }


def goals(bench: dict, bandwidth: dict) -> dict:
    """The issue's goals as measured values and booleans (never asserted in tests)."""
    static, concat = bench["step_ms"]["static"], bench["step_ms"]["concat"]
    largest = bandwidth["models"][-1]
    return {
        "static_vs_no_cache_speedup": bench["speedup_static_vs_no_cache"],
        "static_at_least_10x_faster": bench["speedup_static_vs_no_cache"] >= 10,
        "static_last_vs_first_step_ratio": static[-1] / static[0],
        "static_nearly_flat_within_1_5x": static[-1] / static[0] <= 1.5,
        "concat_vs_static_at_longest_ratio": concat[-1] / static[-1],
        "static_no_slower_than_concat_at_longest": static[-1] <= concat[-1],
        "bandwidth_utilisation_ratio": largest["bandwidth_utilisation_ratio"],
        "bandwidth_model": largest["name"],
        "main_cost": largest["main_cost"],
    }


# =============================================================================
# 3. Figures (one function per figure, each returns the Figure)
# =============================================================================

METHOD_STYLE = {
    "no_cache": dict(label="no cache", color="tab:red", marker="o"),
    "concat": dict(label="concat cache (torch.cat)", color="tab:orange", marker="s"),
    "static": dict(label="static cache (pre-allocated)", color="tab:blue", marker="^"),
}


def plot_decode_time(bench: dict, scaling: dict) -> plt.Figure:
    """decode_time.png: per-step time vs context; uncached rises, cached stays flat."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for method, ms in bench["step_ms"].items():
        style = METHOD_STYLE[method]
        slope = scaling["fitted_slope"][method]
        ax.plot(
            scaling["kv_lens"], ms, **{**style, "label": f"{style['label']}, slope {slope:.2f}"}
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(scaling["kv_lens"], [str(n) for n in scaling["kv_lens"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        set_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))  # 20, not 2 x 10^1
    ax.set_xlabel("context length at this step (tokens, log scale)")
    ax.set_ylabel("time per decode step (ms, log scale)")
    ax.set_title("Without a cache each step grows with the context;\nwith a cache it stays flat")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_cumulative_time(bench: dict) -> plt.Figure:
    """cumulative_time.png: total generation time, quadratic without a cache, linear with."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    all_positions = np.arange(bench["prompt_len"], bench["total_len"] - 1)
    n_tokens = np.arange(1, len(all_positions) + 2)  # the prefill makes the first token
    for method, ms in bench["step_ms"].items():
        steps_s = np.interp(all_positions, bench["positions"], ms) / 1e3
        cumulative = bench["prefill_ms"] / 1e3 + np.concatenate(([0.0], np.cumsum(steps_s)))
        ax.plot(
            n_tokens,
            cumulative,
            color=METHOD_STYLE[method]["color"],
            label=f"{METHOD_STYLE[method]['label']}: {cumulative[-1]:.2f} s",
        )
    ax.set_xlabel(f"new tokens generated after a {bench['prompt_len']}-token prompt")
    ax.set_ylabel("cumulative generation time (s)")
    ax.set_title(
        f"Generation time: quadratic without a cache, linear with one\n"
        f"(static cache {bench['speedup_static_vs_no_cache']:.1f}x faster in total)"
    )
    ax.legend()
    ax.grid(True, alpha=0.3)
    return fig


def plot_cache_vs_context(memory: dict) -> plt.Figure:
    """cache_vs_context.png: cache bytes grow linearly with context; measured = formula."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for dtype, color in (("float32", "tab:blue"), ("bfloat16", "tab:green")):
        rows = [r for r in memory["rows"] if r["dtype"] == dtype]
        lengths = [r["seq_len"] for r in rows]
        mib = 2.0**20
        ax.plot(
            lengths,
            [r["formula_bytes"] / mib for r in rows],
            color=color,
            label=f"formula, {dtype}",
        )
        ax.plot(
            lengths,
            [r["static_bytes"] / mib for r in rows],
            "o",
            color=color,
            ms=9,
            mfc="none",
            label=f"measured static cache, {dtype}",
        )
        ax.plot(
            lengths,
            [r["concat_bytes"] / mib for r in rows],
            "x",
            color=color,
            ms=7,
            label=f"measured concat cache, {dtype}",
        )
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache size, all layers (MiB)")
    ax.set_title("Cache memory grows linearly with the context: measured = formula")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return fig


def plot_real_model_cache(real: dict) -> plt.Figure:
    """real_model_cache.png: real models' cache sizes at long context; GQA and MLA shrink it."""
    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    rows = real["rows"]
    x = np.arange(len(rows))
    width = 0.27
    colors = ("tab:green", "tab:blue", "tab:purple")
    containers = []
    for i, (n, color) in enumerate(zip(real["contexts"], colors, strict=True)):
        gib = [r["at_context_bytes"][str(n)] / 2**30 for r in rows]
        bars = ax.bar(
            x + (i - 1) * width,
            gib,
            width,
            color=color,
            edgecolor="white",
            label=f"{n // 1024}K tokens",
        )
        containers.append((n, bars))
    hatched = matplotlib.patches.Patch(
        facecolor="lightgrey",
        edgecolor="white",
        hatch="//",
        label="longer than the model\nwas trained for",
    )
    ax.legend(
        handles=[*ax.get_legend_handles_labels()[0], hatched],
        title="context",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    for n, bars in containers:  # hatched after the legend, so its colour keys stay plain
        for bar, r in zip(bars, rows, strict=True):
            if n > r["max_context"]:
                bar.set_hatch("//")
    ax.set_xticks(x, [f"{r['name']}\n({r['kind']})" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("KV cache of one sequence, bf16 (GiB, log scale)")
    ax.set_xlabel("model (attention type)")
    ax.set_title("At long context the cache reaches tens of GiB; GQA and MLA shrink it")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return fig


def plot_decode_attention(picture: dict) -> plt.Figure:
    """decode_attention.png: a cached decode step computes one score row, not the square."""
    weights = np.array(picture["weights"])
    n = weights.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("lightgrey")
    no_cache = np.ma.masked_where(np.triu(np.ones((n, n)), k=1) == 1, weights)
    with_cache = np.ma.masked_all((n, n))
    with_cache[-1] = weights[-1]
    titles = (
        f"No cache: the step recomputes all {n}x{n} scores\n(and every K, V) to use one row",
        f"With cache: one query row against {n} keys;\nK, V of tokens 0..{n - 2} come from cache",
    )
    for ax, data, title in zip(axes, (no_cache, with_cache), titles, strict=True):
        image = ax.imshow(data, cmap=cmap, vmin=0, vmax=weights.max())
        ax.set_title(title)
        ax.set_xlabel("key position j (token index)")
        ax.set_ylabel("query position i (token index)")
        ax.set_xticks(range(0, n, 2))
        ax.set_yticks(range(0, n, 2))
    axes[1].annotate(
        "new token",
        xy=(0, n - 1),
        xytext=(1, n - 4),
        color="black",
        arrowprops=dict(arrowstyle="->"),
    )
    fig.colorbar(image, ax=axes, label="attention weight (softmax probability); grey: not computed")
    fig.suptitle(
        f"What one decode step computes (layer {picture['layer']}, head {picture['head']})"
    )
    return fig


# =============================================================================
# 4. Command line
# =============================================================================


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit choice must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device ('cuda') is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device ('mps') is not available on this machine")
    return torch.device(name)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Where the numbers came from, saved next to them in results.json."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "benchmark_threads": BENCHMARK_THREADS,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def interactive_backend() -> bool:
    """True when matplotlib can open windows (so ``plt.show()`` would not warn)."""
    from matplotlib.backends import BackendFilter, backend_registry

    interactive = backend_registry.list_builtin(BackendFilter.INTERACTIVE)
    return matplotlib.get_backend().lower() in [name.lower() for name in interactive]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, whole run in ~15 s")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("figures") / Path(__file__).stem,
        help="folder for the PNG figures and results.json (default: %(default)s)",
    )
    parser.add_argument("--no-show", action="store_true", help="do not open figure windows")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hf-model",
        default=None,
        metavar="NAME",
        help="also generate real text with this Hugging Face GPT-2 (e.g. gpt2), from the local "
        "cache only; skipped with one line if transformers or the weights are missing",
    )
    return parser.parse_args(argv)


# Sizes: the demo model, the generation benchmarked, and the model used for the bandwidth check.
SIZES = {
    "quick": dict(
        config=GPTConfig(vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4),
        prompt_len=8,
        total_len=128,
        n_points=4,
        correctness_tokens=24,
        min_run_time=0.02,
        memory_lengths=[16, 32, 64, 128],
        copy_bytes=64 * 2**20,
        bandwidth_context=64,
        big=(
            "GPT-2-shaped, 4 layers",
            GPTConfig(vocab_size=8192, max_seq_len=128, d_model=512, n_layers=4, n_heads=8),
        ),
    ),
    "default": dict(
        config=GPTConfig(),
        prompt_len=16,
        total_len=1024,
        n_points=8,
        correctness_tokens=64,
        min_run_time=0.2,
        memory_lengths=[128, 256, 512, 1024],
        copy_bytes=256 * 2**20,
        bandwidth_context=128,
        big=("GPT-2 small shape (124M)", gpt2()),
    ),
}


def print_correctness(c: dict) -> None:
    """Stage 1: cached vs uncached logits and ids, chunked prefill, explicit vs SDPA."""
    print(f"  {c['n_new_tokens']} greedy tokens after a {c['prompt_len']}-token prompt")
    for kind in CACHE_KINDS:
        print(
            f"  {kind:6s} cache vs no cache: max |logit diff| "
            f"{c[f'max_abs_err_logits_{kind}_vs_no_cache']:.2e}, "
            f"identical ids: {c[f'ids_identical_{kind}_vs_no_cache']}"
        )
    print(
        f"  prefill in chunks of {c['chunk_size']} vs one pass: max |logit diff| "
        f"{c['max_abs_err_chunked_prefill']:.2e}"
    )
    print(
        f"  explicit softmax vs SDPA attention: max |logit diff| "
        f"{c['max_abs_err_explicit_vs_sdpa']:.2e}"
    )


def print_decode(b: dict, s: dict) -> None:
    """Stage 2: per-step times and FLOPs, total generation time and speedups."""
    print(
        f"  {'context':>8s} {'no cache':>11s} {'concat':>11s} {'static':>11s}   "
        f"{'GFLOP no cache':>14s} {'GFLOP cached':>12s}"
    )
    for i, n in enumerate(s["kv_lens"]):
        ms = [b["step_ms"][m][i] for m in ("no_cache", "concat", "static")]
        flops = [s["flops_per_step"][m][i] / 1e9 for m in ("no_cache", "static")]
        print(
            f"  {n:8d} "
            + " ".join(f"{t:8.3f} ms" for t in ms)
            + f"   {flops[0]:14.4f} {flops[1]:12.4f}"
        )
    print(
        f"  generating {b['n_new_tokens']} tokens (prefill {b['prefill_ms']:.2f} ms "
        f"+ interpolated steps):"
    )
    for m in b["step_ms"]:
        print(
            f"    {m:8s} {b['generation_s'][m]:7.3f} s  {b['tokens_per_s'][m]:8.1f} tokens/s"
            f"  log-log slope {s['fitted_slope'][m]:5.2f}"
        )
    print(
        f"  speedup over no cache: static {b['speedup_static_vs_no_cache']:.1f}x, "
        f"concat {b['speedup_concat_vs_no_cache']:.1f}x"
    )
    print(
        f"  analytic FLOPs slope: no cache {s['analytic_flops_slope']['no_cache']:.2f}, "
        f"cached {s['analytic_flops_slope']['static']:.2f}; at the longest context the "
        f"uncached step does {s['flops_ratio_no_cache_vs_cache_at_longest']:.0f}x the FLOPs"
    )
    print(
        f"  static generate() timed directly: {b['static_generate_measured_s']:.3f} s "
        f"(estimate / measured = {b['static_estimate_vs_measured_ratio']:.2f}x)"
    )


def print_concat_cost(cc: dict) -> None:
    """Stage 2: why concat is slower than static (bytes copied per step), here and at scale."""
    print(
        f"  concat's extra work at context {cc['position'] + 1}: each step copies "
        f"{cc['bytes_copied_per_step'] / 2**20:.1f} MiB of cached K, V into new tensors"
    )
    print(
        f"    cache updates alone: concat {cc['update_ms']['concat']:.3f} ms, static "
        f"{cc['update_ms']['static']:.3f} ms, difference {cc['extra_ms']:+.3f} ms = "
        f"{100 * cc['extra_vs_static_step_ratio']:.0f}% of the {cc['static_step_ms']:.2f} ms step"
    )
    print(
        f"    so concat/static should be {cc['predicted_concat_vs_static_ratio']:.2f}x; "
        f"measured {cc['measured_concat_vs_static_ratio']:.2f}x"
    )
    gib = 2**30
    print(
        f"    at scale: Llama-2-7B, bf16, {cc['llama_2_7b_weight_bytes'] / gib:.1f} GiB of weights:"
    )
    for r in cc["llama_2_7b"]:
        print(
            f"      {r['context'] // 1024:3d}K tokens: copies "
            f"{r['bytes_copied_per_step'] / gib:4.1f} GiB per step -> memory-bound concat/static "
            f"{r['memory_bound_concat_vs_static_ratio']:.2f}x"
        )


def print_memory(mem: dict, real: dict) -> None:
    """Stage 3: measured vs formula cache bytes, then real models' cache sizes."""
    print(f"  {'dtype':>8s} {'tokens':>7s} {'static':>11s} {'concat':>11s} {'formula':>11s}")
    for r in mem["rows"]:
        mib = [r[key] / 2**20 for key in ("static_bytes", "concat_bytes", "formula_bytes")]
        print(f"  {r['dtype']:>8s} {r['seq_len']:7d} " + " ".join(f"{x:7.3f} MiB" for x in mib))
    print(f"  measured equals formula: {mem['measured_equals_formula']}")
    print("  real models, one sequence in bf16:")
    print(
        f"  {'model':>18s} {'type':>10s} {'per token':>11s} "
        + " ".join(f"{n // 1024:>8d}K" for n in real["contexts"])
    )
    for r in real["rows"]:
        sizes = [r["at_context_bytes"][str(n)] / 2**30 for n in real["contexts"]]
        print(
            f"  {r['name']:>18s} {r['kind']:>10s} {r['per_token_bytes'] / 2**10:7.1f} KiB "
            + " ".join(f"{x:5.2f} GiB" for x in sizes)
        )
    ds = real["rows"][-1]
    print(
        f"  ({ds['name']}: MHA with the same heads would cache "
        f"{ds['mha_equivalent_per_token_bytes'] / 2**10:.0f} KiB per token, "
        f"{ds['mha_equivalent_per_token_bytes'] / ds['per_token_bytes']:.0f}x more)"
    )


def print_bandwidth(bw: dict) -> None:
    """Stage 4: machine bandwidth and what share of it a decode step achieves."""
    print(
        f"  this machine: copy {bw['copy_bandwidth_gb_per_s']:.1f} GB/s (copying "
        f"{bw['copy_bytes'] / 2**20:.0f} MiB), matrix-vector product "
        f"{bw['matvec_bandwidth_gb_per_s']:.1f} GB/s, "
        f"matmul {bw['matmul_gflops_per_s']:.1f} GFLOP/s"
    )
    for r in bw["models"]:
        print(
            f"  {r['name']}: reads {r['bytes_read_per_step'] / 2**20:.1f} MiB per step "
            f"({r['weight_bytes'] / 2**20:.1f} weights + {r['cache_bytes'] / 2**20:.2f} cache) "
            f"in {r['step_ms']:.2f} ms = {r['achieved_gb_per_s']:.1f} GB/s, "
            f"{100 * r['bandwidth_utilisation_ratio']:.0f}% of copy and "
            f"{100 * r['matvec_utilisation_ratio']:.0f}% of matvec bandwidth"
        )
        print(
            f"    same operators at tiny widths: {r['overhead_ms']:.2f} ms "
            f"({100 * r['overhead_share_ratio']:.0f}% of the step); floors: memory "
            f"{r['memory_floor_ms']:.2f} ms, arithmetic {r['compute_floor_ms']:.2f} ms"
        )
        print(f"    -> main cost: {r['main_cost']}")
        if r["main_cost_kind"] != "overhead":
            print(
                f"       the other {r['beyond_overhead_ms']:.2f} ms move the bytes at "
                f"{r['beyond_overhead_gb_per_s']:.1f} GB/s, "
                f"{100 * r['beyond_overhead_matvec_ratio']:.0f}% of the matvec bandwidth"
            )


def print_hf_demo(hf: dict) -> None:
    """Stage 5: the Hugging Face GPT-2 text and its cache speedup, or why it was skipped."""
    if not hf["available"]:
        print(f"  skipped: {hf['reason']}")
        return
    print(f"  {hf['text']!r}")
    print(
        f"  identical ids with and without cache: {hf['ids_identical_cache_vs_no_cache']}; "
        f"{hf['generate_with_cache_s']:.2f} s vs {hf['generate_without_cache_s']:.2f} s "
        f"({hf['speedup_cache_vs_no_cache']:.1f}x)"
    )


def print_goals(g: dict) -> None:
    """The issue's goals with their measured values."""
    print(
        f"  goals: static {g['static_vs_no_cache_speedup']:.1f}x faster than no cache "
        f"(>= 10x: {g['static_at_least_10x_faster']}); last/first static step "
        f"{g['static_last_vs_first_step_ratio']:.2f}x (<= 1.5x: "
        f"{g['static_nearly_flat_within_1_5x']}); concat/static at the longest "
        f"{g['concat_vs_static_at_longest_ratio']:.2f}x (static no slower: "
        f"{g['static_no_slower_than_concat_at_longest']}); bandwidth utilisation "
        f"{100 * g['bandwidth_utilisation_ratio']:.0f}% ({g['bandwidth_model']}, main cost: "
        f"{g['main_cost']})"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "meta": {
            "script": Path(__file__).name,
            "quick": args.quick,
            "seed": args.seed,
            **machine_info(device),
        }
    }
    n_stages = 6
    size = SIZES["quick" if args.quick else "default"]
    config = size["config"]
    model = GPT(config).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    results["config"] = {**config.__dict__, "head_dim": config.head_dim, "n_params": n_params}
    gen = torch.Generator().manual_seed(args.seed)

    print(f"[1/{n_stages}] checking correctness: cached vs uncached generation ...")
    print(
        f"model: {config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, "
        f"vocab {config.vocab_size}, {n_params / 1e6:.2f}M parameters"
    )
    prompt = torch.randint(config.vocab_size, (1, size["prompt_len"]), generator=gen).to(device)
    results["correctness"] = check_correctness(model, prompt, size["correctness_tokens"])
    print_correctness(results["correctness"])

    print(f"[2/{n_stages}] benchmarking decode steps at {size['n_points']} positions ...")
    b = results["decode"] = benchmark_decode(
        model,
        size["prompt_len"],
        size["total_len"],
        size["n_points"],
        size["min_run_time"],
        args.seed,
    )
    s = results["scaling"] = scaling_analysis(config, b)
    print_decode(b, s)
    results["concat_cost"] = concat_cost_analysis(model, b, size["min_run_time"])
    print_concat_cost(results["concat_cost"])

    print(f"[3/{n_stages}] measuring cache memory ...")
    results["memory"] = measure_memory(config, size["memory_lengths"])
    results["real_models"] = real_model_cache_table()
    print_memory(results["memory"], results["real_models"])

    print(f"[4/{n_stages}] measuring memory bandwidth of a decode step ...")
    big_name, big_config = size["big"]
    models = {"demo model": model, big_name: GPT(big_config).to(device).eval()}
    results["bandwidth"] = bandwidth_analysis(
        models, size["bandwidth_context"], size["copy_bytes"], size["min_run_time"], args.seed
    )
    del models  # frees the big model
    print_bandwidth(results["bandwidth"])

    print(f"[5/{n_stages}] Hugging Face GPT-2 demo ...")
    if args.hf_model is None:
        results["hf_demo"] = {
            "model": None,
            "available": False,
            "reason": "not requested (pass --hf-model gpt2)",
        }
    else:
        results["hf_demo"] = hf_demo(args.hf_model, device, 32, size["min_run_time"])
    print_hf_demo(results["hf_demo"])
    results["goals"] = goals(b, results["bandwidth"])
    print_goals(results["goals"])

    print(f"[6/{n_stages}] drawing figures ...")
    picture_ids = torch.randint(config.vocab_size, (1, 12), generator=gen).to(device)
    results["attention_picture"] = attention_picture(model, picture_ids)
    figures = {
        "decode_time": plot_decode_time(b, s),
        "cumulative_time": plot_cumulative_time(b),
        "cache_vs_context": plot_cache_vs_context(results["memory"]),
        "real_model_cache": plot_real_model_cache(results["real_models"]),
        "decode_attention": plot_decode_attention(results["attention_picture"]),
    }
    for name, fig in figures.items():
        fig.savefig(args.out / f"{name}.png", dpi=120)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {len(figures)} figures and results.json to {args.out}/")
    if not args.no_show and interactive_backend():
        plt.show()
    plt.close("all")
    return results


if __name__ == "__main__":
    main()
