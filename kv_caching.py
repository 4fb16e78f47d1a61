"""KV caching: n generated tokens cost O(n d^2 + n^2 d) FLOPs instead of O(n^2 d^2 + n^3 d).

The problem
-----------
A decoder-only transformer generates one token at a time. Step t needs the keys and values of
all t previous tokens. Without a cache, the model runs a full forward pass over the whole prefix
at every step, so step t costs O(t * d_model^2 + t^2 * d_model) FLOPs and generating n tokens
costs O(n^2 d_model^2 + n^3 d_model) in total (quadratic in n for the weight matmuls, cubic for
attention). Almost all of that work is
recomputing keys and values that were already computed at the previous step: in a causal model
the key and value of token j never change once token j is known.

The idea
--------
Keep the keys and values of every layer in a cache. A decode step then runs the model on the
*one* new token: it computes that token's query, key and value, appends k and v to the cache,
and attends from the one query to all cached keys. Step t now costs O(d_model^2 + t * d_model):
the weight matmuls are constant, only the (cheap) attention read grows with t, so n tokens cost
O(n d_model^2 + n^2 d_model) in total: linear in n for the matmuls, still quadratic for the
attention reads (which stay small next to the matmuls while n << d_model). The price is
memory: the cache holds 2 * n_layers * n_heads * head_dim numbers per token, and for a real
model at a long context it can be larger than the weights (see ``RELEASED_MODELS``). Decoding is
then bound by memory bandwidth: every step reads every weight and the whole cache once.

Two ways to hold the cache:
- ``ConcatKVCache`` grows with ``torch.cat``: simple, but every step copies the whole cache.
- ``KVCache`` pre-allocates ``(batch, n_heads, max_seq_len, head_dim)`` buffers and writes the new
  token in place at ``start_pos``, returning views of the filled prefix. Production code does one
  half of this each: Meta's llama pre-allocates ``(bsz, max_seq_len, n_kv_heads, head_dim)`` (seq
  before heads) and returns prefix slices ``cache_k[:bsz, :start_pos + seqlen]``; gpt-fast
  pre-allocates ``(B, H, S, D)`` as here but returns the *whole* buffer plus a mask, so every step
  has the same shapes (what ``torch.compile`` and CUDA graphs need).

The math
--------
One attention layer, one head, for the new tokens at positions start_pos .. start_pos + q_len - 1
(hidden states x of shape (batch, q_len, d_model)):

  (1) q, k_new, v_new = x W_q, x W_k, x W_v                each (batch, n_heads, q_len, head_dim)
  (2) K = concat(K_cache, k_new), V = concat(V_cache, v_new) each (batch, n_heads, kv_len, head_dim)
      kv_len = start_pos + q_len
  (3) S = q K^T / sqrt(head_dim)                            (batch, n_heads, q_len, kv_len)
  (4) S[i, j] = -inf  unless  j <= start_pos + i             (causal mask, offset by start_pos!)
  (5) out = softmax(S) V                                    (batch, n_heads, q_len, head_dim)

The mask offset is the classic bug: a chunk of q_len tokens appended to a cache needs the
bottom-right-aligned triangle ``tril(diagonal=kv_len - q_len)``, not the top-left one that
``scaled_dot_product_attention(is_causal=True)`` builds. ``attention(..., impl="explicit")``
writes the formula out line by line; ``impl="sdpa"`` is the same thing through PyTorch's fused
kernel.

FLOPs of the decode step at context length n (derived in ``decode_step_flops``), with
P = 12 * d_model^2 weights per layer and the LM head run on the last position only:
    with cache:     2 * n_layers * P     + 4 * n_layers * n * d_model   + 2 * d_model * vocab
    without cache:  2 * n_layers * P * n + 4 * n_layers * n^2 * d_model + 2 * d_model * vocab
Cache bytes: 2 * n_layers * batch * n_heads * seq_len * head_dim * bytes_per_element.

Where it is used
----------------
Every autoregressive LLM server: Hugging Face ``transformers`` (``DynamicCache``, ``StaticCache``),
vLLM (paged KV cache), Meta's llama reference code, gpt-fast, llama.cpp. GQA and MLA exist to
shrink this cache (see ``grouped_query_attention.py`` and ``multihead_latent_attention.py``);
``real_model_cache.png`` compares released MHA, GQA and MLA models' caches.

Run it
------
    uv run python kv_caching.py              # default sizes (run time: README, measured)
    uv run python kv_caching.py --quick      # small sizes, writes to figures/kv_caching/quick/
    uv run python kv_caching.py --out DIR --no-show --device cpu --seed 0
    uv run python kv_caching.py --hf-model gpt2   # also real GPT-2 text, if the weights are cached

It prints each check, measurement and claim, saves every figure as PNG and every printed number
in ``results.json`` under ``--out`` (default ``figures/kv_caching/``).

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
  (bsz, seq, n_kv_heads, head_dim) written at ``start_pos``, prefix slices read back);
  pytorch-labs/gpt-fast ``model.py`` (``KVCache.update``: (B, H, S, D), whole buffer returned);
  huggingface/transformers ``src/transformers/models/gpt2/modeling_gpt2.py`` (the weights we load).

Contents
--------
2. Core: the validation helpers, ``causal_mask``, ``KVCache`` (pre-allocated, written in place),
   ``attention``, ``CausalSelfAttention``, ``Block``, ``GPT`` (``forward``, ``new_cache``,
   ``generate``).
3. Baselines and apparatus: ``ConcatKVCache`` (the ``torch.cat`` baseline), sampling
   (``sample_next``), ``GPTConfig``, ``MLP`` (GPT's config and feed-forward, kept here so the
   core stays one screen of cache and attention; ``GPT`` also uses ``check_token_ids``,
   ``_sample`` and ``CACHE_KINDS`` from here), ``gpt2``, ``load_hf_gpt2`` (behind
   ``GPT.from_hf_gpt2``), ``kv_cache_bytes``, ``mla_cache_bytes``, ``decode_step_flops``,
   ``fit_loglog_slope``, ``decode_positions``, ``interleaved_rounds``, ``spread``,
   ``check_token_ids``, ``RELEASED_MODELS``, ``llama_param_count``, bandwidth probes,
   ``tiny_widths``, ``main_decode_cost``.
4. Experiments: ``check_correctness``, ``benchmark_decode``, ``scaling_analysis``,
   ``concat_cost_analysis``, ``measure_memory``, ``real_model_cache_table``,
   ``bandwidth_analysis``, ``attention_picture``, ``hf_demo``, the claims (``claim``,
   ``growth_verdict``, ``estimate_claim``, ``decode_claims``).
5. Figures: ``plot_decode_time``, ``plot_cumulative_time``, ``plot_cache_vs_context``,
   ``plot_real_model_cache``, ``plot_decode_attention`` and the titles they compute.
6. Main: ``parse_args``, ``SIZES``, the ``print_*`` helpers (``print_claims`` too), ``main``.
7. Plumbing (identical in every script).

Read first: ``KVCache.update`` (write in place at ``start_pos``, return views of the prefix),
then ``causal_mask`` and ``attention`` (why a chunk appended to a cache needs the
bottom-right-aligned triangle), then ``GPT.forward`` and ``GPT.generate`` (prefill once, then one
token per step). ``decode_step_flops`` derives the per-step cost with and without the cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import numbers
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# 2. Core: the KV cache, the attention that reads it, the GPT that uses it
# =============================================================================


def _check_sizes(**sizes: int) -> None:
    """Every size (a dimension, a count) must be an integer (not a bool) of at least 1."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} ({value!r}) must be an int")
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")


def _check_start_pos(start_pos: int) -> None:
    """A position to start writing at: an integer (not a bool) of at least 0."""
    if isinstance(start_pos, bool) or not isinstance(start_pos, numbers.Integral):
        raise TypeError(f"start_pos ({start_pos!r}) must be an int")
    if start_pos < 0:
        raise ValueError(f"start_pos ({start_pos}) must be >= 0")


def _check_float_tensor(name: str, t: torch.Tensor, last_dim: int | None = None) -> None:
    """A floating-point tensor (no silent casts of ints), with ``last_dim`` features if given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} dtype ({t.dtype}) must be a floating-point dtype")
    if last_dim is not None and (t.dim() == 0 or t.shape[-1] != last_dim):
        raise ValueError(f"{name} (shape {tuple(t.shape)}) must end in {last_dim} features")


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Boolean (q_len, kv_len) mask, True where query i may attend to key j.

    The queries are the last ``q_len`` of the ``kv_len`` positions (bottom-right aligned), so
    query i sits at absolute position ``kv_len - q_len + i`` and sees keys ``j <= that``.
    """
    offset = kv_len - q_len
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=offset)


def _check_cache_write(start_pos: int, n: int, length: int, max_seq_len: int) -> None:
    """The rules every cache enforces: start_pos >= 0, no gap before it, no write past the end."""
    _check_start_pos(start_pos)
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


def _check_cache_tensor(name: str, t: torch.Tensor, like: torch.Tensor, shape: tuple) -> None:
    """``t`` must match the cache buffer ``like`` in dtype and device and have ``shape``
    (``None`` in ``shape`` is the number of new tokens, free)."""
    _check_float_tensor(name, t)
    if t.dim() != len(shape) or any(
        s is not None and s != d for s, d in zip(shape, t.shape, strict=True)
    ):
        wanted = ", ".join("n" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} (shape {tuple(t.shape)}) must have shape ({wanted})")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} ({t.dtype} on {t.device}) must match the cache ({like.dtype} on "
            f"{like.device}); no silent casts"
        )


class KVCache:
    """Pre-allocated keys and values of one attention layer, written in place.

    ``k_cache`` and ``v_cache`` are ``(batch, n_kv_heads, max_seq_len, head_dim)`` buffers
    (gpt-fast's layout; Meta's llama keeps ``(batch, seq, n_kv_heads, head_dim)``; ``n_kv_heads =
    n_heads`` without grouped-query attention), allocated once. ``update`` copies the new
    keys/values into positions ``start_pos : start_pos + n`` and returns *views* of the filled
    prefix, as Meta's llama does (gpt-fast returns the whole buffer and masks its empty tail, so
    shapes stay fixed for torch.compile): no allocation and no copy of the old entries, whatever
    the context. Writing at ``start_pos < length`` rewinds: later positions no longer count.

    >>> cache = KVCache(batch_size=1, n_kv_heads=2, max_seq_len=8, head_dim=4)
    >>> k, v = cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), start_pos=0)
    >>> tuple(k.shape), cache.length, cache.nbytes  # a view of 3 positions; 2 x 64 floats held
    ((1, 2, 3, 4), 3, 512)
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        _check_sizes(
            batch_size=batch_size, n_kv_heads=n_kv_heads, max_seq_len=max_seq_len, head_dim=head_dim
        )
        self.batch_size, self.n_kv_heads = batch_size, n_kv_heads
        self.max_seq_len, self.head_dim = max_seq_len, head_dim
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # number of filled positions

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (batch, n_kv_heads, n, head_dim) at ``start_pos``; return the prefix views."""
        shape = (self.batch_size, self.n_kv_heads, None, self.head_dim)
        _check_cache_tensor("k", k, self.k_cache, shape)
        _check_cache_tensor("v", v, self.v_cache, tuple(k.shape))
        n = k.shape[2]
        _check_cache_write(start_pos, n, self.length, self.max_seq_len)
        self.k_cache[:, :, start_pos : start_pos + n] = k
        self.v_cache[:, :, start_pos : start_pos + n] = v
        self.length = start_pos + n
        # Views, not copies: (batch, n_kv_heads, start_pos + n, head_dim)
        return self.k_cache[:, :, : self.length], self.v_cache[:, :, : self.length]

    def reset(self) -> None:
        """Forget every token (zero the buffers, so a stale read would show as wrong output)."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the two buffers, measured from the tensors."""
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache))


ATTN_IMPLS = ("sdpa", "explicit")


def _attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + causal mask): (batch, n_heads, q_len, kv_len)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (3) (batch, n_heads, q_len, kv_len)
    scores = scores.masked_fill(~causal_mask(q_len, kv_len, q.device), float("-inf"))  # (4)
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # each row sums to 1


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """``attention`` without the checks (its callers checked): (batch, n_heads, q_len, head_dim)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if impl == "explicit":
        return _attention_weights(q, k) @ v  # (5)
    if q_len == 1:  # one decode query sees every key: no mask, SDPA's fastest path
        return F.scaled_dot_product_attention(q, k, v)
    if q_len == kv_len:  # no cache before these tokens: is_causal's top-left triangle is right
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_len, kv_len, q.device))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa"
) -> torch.Tensor:
    """Causal attention (3)-(5) of q (batch, n_heads, q_len, head_dim) over k, v (batch, n_heads,
    kv_len, head_dim), q_len <= kv_len: query i sits at position kv_len - q_len + i (mask aligned
    bottom-right). ``impl`` "explicit" writes the formula out, "sdpa" calls PyTorch's kernel."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"impl ({impl!r}) must be one of 'sdpa', 'explicit'")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float_tensor(name, t, last_dim=None if name == "q" else q.shape[-1])
        if t.dim() != 4 or t.shape[:2] != q.shape[:2] or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} ({t.dtype}, {tuple(t.shape)}) must be 4-d and match q's")
    if v.shape[2] != k.shape[2] or q.shape[2] > k.shape[2]:
        raise ValueError(
            f"q, k, v lengths ({q.shape[2]}, {k.shape[2]}, {v.shape[2]}) need q <= k = v"
        )
    return _attend(q, k, v, impl)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (GPT-2's ``attn``): with a cache, the new k, v are
    written at ``start_pos`` and the queries attend to all start_pos + q_len cached keys."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.impl = config.n_heads, config.head_dim, config.attn_impl
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)  # W_q|W_k|W_v
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)  # W_o

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        batch, q_len, d_model = x.shape
        q, k, v = self.c_attn(x).split(d_model, dim=2)  # (1) each (batch, q_len, d_model)
        # (batch, q_len, d_model) -> (batch, n_heads, q_len, head_dim)
        q, k, v = (
            t.view(batch, q_len, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)
        )
        if cache is not None:  # (2) k, v: (batch, n_heads, start_pos + q_len, head_dim)
            k, v = cache.update(k, v, start_pos)
        y = _attend(q, k, v, self.impl)  # (3)-(5) (batch, n_heads, q_len, head_dim)
        y = y.transpose(1, 2).reshape(batch, q_len, d_model)  # heads side by side again
        return self.c_proj(y)


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), start_pos, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, pre-LN blocks, final LN, tied LM head.

    Parameter names follow Hugging Face's ``GPT2LMHeadModel`` (and nanoGPT), so
    ``from_hf_gpt2`` only has to transpose the Conv1D weights.

    >>> model = GPT(GPTConfig(vocab_size=50, max_seq_len=16, d_model=16, n_layers=2, n_heads=4))
    >>> ids = torch.zeros(1, 5, dtype=torch.long)  # (batch, seq_len) token ids
    >>> cache = model.new_cache(batch_size=1)  # one KVCache per layer
    >>> tuple(cache[0].k_cache.shape)  # (batch, n_heads, max_seq_len, head_dim)
    (1, 4, 16, 4)
    >>> model(ids, start_pos=0, cache=cache).shape, model(ids[:, :1], 5, cache).shape
    (torch.Size([1, 5, 50]), torch.Size([1, 1, 50]))
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
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
        for name, p in self.named_parameters():  # GPT-2's init; LayerNorms keep ones and zeros
            if name.endswith(".bias") and ".ln_" not in name:
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):  # residual projections scaled down
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
            elif p.dim() == 2:  # embeddings (the LM head is tied to wte) and Linear weights
                nn.init.normal_(p, mean=0.0, std=0.02)

    def new_cache(
        self, batch_size: int, max_seq_len=None, dtype=None, device=None, *, kind: str = "static"
    ) -> list:
        """One cache per layer, ``kind`` 'static' (``KVCache``) or 'concat' (``ConcatKVCache``);
        None: the model's max_seq_len, the weights' dtype and device."""
        max_seq_len = self.config.max_seq_len if max_seq_len is None else max_seq_len
        _check_sizes(batch_size=batch_size, max_seq_len=max_seq_len)
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len ({max_seq_len}) must be <= {self.config.max_seq_len}")
        if kind not in CACHE_KINDS:
            raise ValueError(f"kind ({kind!r}) must be one of 'static', 'concat'")
        dtype = self.lm_head.weight.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype ({dtype!r}) must be a torch.dtype")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype ({dtype}) must be a floating-point dtype")
        device, c = self.lm_head.weight.device if device is None else device, self.config
        # Plain multi-head attention: each layer caches n_kv_heads = n_heads heads.
        layer = CACHE_KINDS[kind]
        return [
            layer(batch_size, c.n_heads, max_seq_len, c.head_dim, dtype, device)
            for _ in range(c.n_layers)
        ]

    def forward(
        self, x: torch.Tensor, start_pos: int = 0, cache=None, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (batch, seq_len, vocab_size) for token ids ``x`` (batch, seq_len) at positions
        start_pos ..; without a cache start_pos is 0; with one (from ``new_cache``) this is a
        prefill, one decode token or a chunk after the cached ones. ``last_only``: last position."""
        check_token_ids(x, "x", self.config, self.lm_head.weight.device, start_pos)
        if cache is None and start_pos != 0:
            raise ValueError(f"start_pos ({start_pos}) must be 0 when no cache is given")
        if cache is not None and (
            not isinstance(cache, list | tuple)
            or len(cache) != self.config.n_layers
            or cache[0].batch_size != len(x)
        ):
            raise ValueError(f"cache must be new_cache's n_layers caches for batch_size {len(x)}")
        return self._forward(x, start_pos, cache, last_only)

    def _forward(self, x, start_pos: int, cache, last_only: bool) -> torch.Tensor:
        """The model itself, on inputs ``forward`` or ``generate`` checked."""
        positions = torch.arange(start_pos, start_pos + x.shape[1], device=x.device)
        h = self.transformer.wte(x) + self.transformer.wpe(positions)  # (batch, seq, d_model)
        for i, block in enumerate(self.transformer.h):
            h = block(h, start_pos, None if cache is None else cache[i])
        h = self.transformer.ln_f(h)
        if last_only:
            h = h[:, -1:]  # (batch, 1, d_model)
        return self.lm_head(h)  # (batch, seq or 1, vocab_size)

    @torch.inference_mode()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        use_cache: bool = True,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cache_kind: str = "static",
        return_logits: bool = False,
    ):
        """Append ``max_new_tokens`` tokens to ``ids`` (batch, prompt_len): greedy at temperature
        0, else sampled (``sample_next``). With a cache: one prefill pass over the prompt, then one
        single-token pass per new token; without: a full pass over the sequence per token. Returns
        the ids, and with ``return_logits`` the (batch, max_new_tokens, vocab) logits used."""
        check_token_ids(ids, "ids", self.config, self.lm_head.weight.device)
        _check_sizes(max_new_tokens=max_new_tokens)
        _check_sampling(temperature, top_k, generator)
        if not isinstance(use_cache, bool) or not isinstance(return_logits, bool):
            raise TypeError(f"use_cache ({use_cache!r}), return_logits must be bools")
        if cache_kind not in CACHE_KINDS:
            raise ValueError(f"cache_kind ({cache_kind!r}) must be one of 'static', 'concat'")
        (batch, prompt_len), max_len = ids.shape, self.config.max_seq_len
        if prompt_len + max_new_tokens > max_len:
            raise ValueError(
                f"max_new_tokens ({max_new_tokens}) + prompt length ({prompt_len}) exceeds "
                f"max_seq_len ({max_len}): at most {max(max_len - prompt_len, 0)} new tokens fit"
            )
        cache = None  # sized for this generation only, not for max_seq_len
        if use_cache and batch > 0:  # (a batch of 0 runs without one, to empty results)
            cache = self.new_cache(batch, prompt_len + max_new_tokens, kind=cache_kind)
        logits = self._forward(ids, 0, cache, last_only=True)  # prefill (or the whole prompt)
        all_logits = []
        for step in range(max_new_tokens):
            logits = logits[:, -1]  # (batch, vocab)
            all_logits.append(logits)
            next_id = _sample(logits, temperature, top_k, generator)  # (batch, 1)
            ids = torch.cat((ids, next_id), dim=1)
            if step == max_new_tokens - 1:
                break
            if cache is not None:  # the new token only, at its absolute position
                logits = self._forward(next_id, ids.shape[1] - 1, cache, last_only=True)
            else:  # the whole sequence again
                logits = self._forward(ids, 0, None, last_only=True)
        return (ids, torch.stack(all_logits, dim=1)) if return_logits else ids

    @classmethod
    def from_hf_gpt2(cls, model_or_state_dict, n_heads: int | None = None) -> GPT:
        """A ``GPT`` with Hugging Face GPT-2 weights: see ``load_hf_gpt2`` (section 3)."""
        return load_hf_gpt2(model_or_state_dict, n_heads)


# =============================================================================
# 3. Baselines and apparatus: GPT-2 weights, cost formulas, timers, released models
# =============================================================================


def _check_positive(**values: float) -> None:
    """Every value (a base, a factor, an eps) must be a finite real number > 0."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} ({value!r}) must be a real number")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} ({value}) must be finite and > 0")


class ConcatKVCache:
    """The textbook cache: ``torch.cat`` the new keys/values onto the old ones.

    Same interface as ``KVCache``. Every ``update`` allocates a new ``(batch, n_kv_heads,
    start_pos + n, head_dim)`` tensor and copies the whole old cache into it, so a decode step
    costs O(context) extra memory traffic and an allocation: kept to measure why production code
    pre-allocates. ``nbytes`` counts only what is held (it grows with the context).

    >>> static, concat = KVCache(1, 2, 8, 4), ConcatKVCache(1, 2, 8, 4)
    >>> k = v = torch.ones(1, 2, 3, 4)  # 3 new tokens: (batch, n_kv_heads, n, head_dim)
    >>> [tuple(c.update(k, v, start_pos=0)[0].shape) for c in (static, concat)]
    [(1, 2, 3, 4), (1, 2, 3, 4)]
    >>> static.nbytes, concat.nbytes  # 8 positions reserved vs 3 held, fp32 K and V
    (512, 192)
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        _check_sizes(
            batch_size=batch_size, n_kv_heads=n_kv_heads, max_seq_len=max_seq_len, head_dim=head_dim
        )
        self.batch_size, self.n_kv_heads = batch_size, n_kv_heads
        self.max_seq_len, self.head_dim = max_seq_len, head_dim
        empty = (batch_size, n_kv_heads, 0, head_dim)
        self.k_cache = torch.zeros(empty, dtype=dtype, device=device)
        self.v_cache = torch.zeros(empty, dtype=dtype, device=device)
        self.length = 0

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (batch, n_kv_heads, n, head_dim) at ``start_pos``; return the new tensors."""
        shape = (self.batch_size, self.n_kv_heads, None, self.head_dim)
        _check_cache_tensor("k", k, self.k_cache, shape)
        _check_cache_tensor("v", v, self.v_cache, tuple(k.shape))
        n = k.shape[2]
        _check_cache_write(start_pos, n, self.length, self.max_seq_len)
        # (batch, n_kv_heads, start_pos + n, head_dim): a fresh tensor, the old prefix copied in.
        self.k_cache = torch.cat((self.k_cache[:, :, :start_pos], k), dim=2)
        self.v_cache = torch.cat((self.v_cache[:, :, :start_pos], v), dim=2)
        self.length = start_pos + n
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        """Forget every token."""
        self.k_cache = self.k_cache[:, :, :0].clone()
        self.v_cache = self.v_cache[:, :, :0].clone()
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the two tensors, measured from the tensors."""
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache))


CACHE_KINDS = {"static": KVCache, "concat": ConcatKVCache}


def check_token_ids(ids, name: str, config: GPTConfig, device, start_pos: int = 0) -> None:
    """Token ids (batch, seq_len >= 1), int64/int32, on ``device``, inside the vocabulary, and
    fitting in max_seq_len after ``start_pos`` (the door checks of ``GPT.forward``/``generate``)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} ({ids.dtype}, {tuple(ids.shape)}) must be (batch, seq_len) ids")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device}, the model on {device}")
    _check_start_pos(start_pos)
    if start_pos + ids.shape[1] > config.max_seq_len:
        n, limit = ids.shape[1], config.max_seq_len
        raise ValueError(f"{name}: start_pos {start_pos} + {n} tokens > max_seq_len {limit}")
    if ids.numel() and ids.device.type != "meta":  # meta tensors have no values to check
        if not 0 <= int(ids.min()) <= int(ids.max()) < config.vocab_size:
            raise ValueError(f"{name} holds a token id outside [0, {config.vocab_size})")


def _check_sampling(temperature: float, top_k: int | None, generator=None) -> None:
    """temperature: finite and >= 0 (0 is greedy); top_k: None or an int >= 1."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature ({temperature!r}) must be a real number")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature ({temperature}) must be finite and >= 0 (0 means greedy)")
    if top_k is not None:
        _check_sizes(top_k=top_k)


def _sample(logits, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """``sample_next`` without the checks (generate checked them once)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (batch, 1) from last-position logits (batch, vocab): greedy at temperature
    0, else a draw from softmax(logits / temperature) over the ``top_k`` largest logits."""
    _check_float_tensor("logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits (shape {tuple(logits.shape)}) must be (batch, vocab)")
    _check_sampling(temperature, top_k, generator)
    return _sample(logits, temperature, top_k, generator)


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
        sizes = ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads")
        _check_sizes(**{name: getattr(self, name) for name in sizes})
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        _check_positive(layer_norm_eps=self.layer_norm_eps)
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias ({self.bias!r}) must be a bool")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl ({self.attn_impl!r}) must be one of 'sdpa', 'explicit'")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class MLP(nn.Module):
    """GPT-2's feed-forward (the cache does not touch it): d_model -> 4 d_model -> d_model, with
    the tanh approximation of GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


def gpt2() -> GPTConfig:
    """GPT-2 small (124M): openai-community/gpt2 config.json (n_layer 12, n_head 12, n_embd 768)."""
    return GPTConfig(vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12)


# GPT2Config flags this GPT implements only at these values (modeling_gpt2.py reads them all).
HF_GPT2_FIXED_FLAGS = {
    "scale_attn_weights": True,  # scores divided by sqrt(head_dim)
    "scale_attn_by_inverse_layer_idx": False,  # ... and not also by 1 / (layer_idx + 1)
    "reorder_and_upcast_attn": False,  # fp32 q k^T in another order (Mistral's GPT-2 variant)
    "add_cross_attention": False,  # decoder-only: no encoder to attend to
}
HF_GPT2_CONV1D = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


def _check_hf_gpt2_config(config) -> None:
    """Refuse GPT2Config settings this GPT does not implement (they would load silently wrong)."""
    for flag, value in HF_GPT2_FIXED_FLAGS.items():
        if getattr(config, flag, value) != value:
            raise ValueError(f"{flag} ({getattr(config, flag)!r}) is not supported (only {value})")
    activation = getattr(config, "activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"activation_function ({activation!r}) must be 'gelu_new' or 'gelu_pytorch_tanh' "
            f"(the tanh GELU this model implements)"
        )
    n_inner = getattr(config, "n_inner", None)
    if n_inner not in (None, 4 * config.n_embd):
        raise ValueError(f"n_inner ({n_inner}) must be None or 4 * n_embd ({4 * config.n_embd})")


def load_hf_gpt2(model_or_state_dict, n_heads: int | None = None) -> GPT:
    """A ``GPT`` with Hugging Face GPT-2 weights (a ``GPT2LMHeadModel``/``GPT2Model`` or its
    state dict).

    HF's GPT-2 uses ``Conv1D`` layers whose weight is stored (in_features, out_features), the
    transpose of ``nn.Linear``'s (out, in): ``c_attn``, ``c_proj`` and ``c_fc`` weights are
    transposed, everything else copies by name. The shapes give vocab_size, max_seq_len, d_model
    and n_layers; they do not give the number of heads (c_attn is (d, 3 d) for any head count),
    so a bare state dict needs ``n_heads`` (a model brings its config). Configs and state dicts
    this GPT does not implement are refused, naming the setting, key or shape.
    """
    if isinstance(model_or_state_dict, nn.Module):
        config = getattr(model_or_state_dict, "config", None)
        if getattr(config, "model_type", None) != "gpt2":
            raise TypeError(
                f"model_or_state_dict ({type(model_or_state_dict).__name__}) must be a Hugging "
                f"Face GPT-2 model or its state dict"
            )
        _check_hf_gpt2_config(config)
        if n_heads is not None and n_heads != config.n_head:
            raise ValueError(
                f"n_heads ({n_heads}) disagrees with the model's n_head ({config.n_head})"
            )
        n_heads, eps = config.n_head, config.layer_norm_epsilon
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        if n_heads is None:
            raise ValueError("n_heads (None) must be given with a state dict (shapes do not say)")
        state, eps = dict(model_or_state_dict), 1e-5  # GPT-2's layer_norm_epsilon
    else:
        raise TypeError(
            f"model_or_state_dict ({type(model_or_state_dict).__name__}) must be a Hugging Face "
            f"GPT-2 model or its state dict"
        )
    if "wte.weight" in state:  # a GPT2Model state dict: no "transformer." prefix
        state = {f"transformer.{key}": value for key, value in state.items()}
    needed = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight"]
    if any(key not in state for key in needed):
        missing = [key for key in needed if key not in state]
        raise ValueError(f"model_or_state_dict is not a GPT-2 state dict: missing keys {missing}")
    wte = state["transformer.wte.weight"]  # (vocab_size, d_model)
    layers = {int(key.split(".")[2]) for key in state if key.startswith("transformer.h.")}
    model = GPT(
        GPTConfig(
            vocab_size=wte.shape[0],
            max_seq_len=state["transformer.wpe.weight"].shape[0],
            d_model=wte.shape[1],
            n_layers=max(layers) + 1,
            n_heads=n_heads,
            bias="transformer.ln_f.bias" in state,
            layer_norm_eps=eps,
        )
    )
    ours, missing = {}, []
    for key, param in model.state_dict().items():
        if key == "lm_head.weight":
            ours[key] = state.get(key, wte)  # tied to wte
        elif key not in state:
            missing.append(key)
        else:
            ours[key] = state[key].t() if key.endswith(HF_GPT2_CONV1D) else state[key]
            if ours[key].shape != param.shape:
                raise ValueError(
                    f"{key} (shape {tuple(state[key].shape)}) does not fit d_model "
                    f"{model.config.d_model} (this GPT needs {tuple(param.shape)}, Conv1D "
                    f"weights stored (in, out)); n_inner must be 4 * d_model"
                )
    if missing:
        raise ValueError(f"model_or_state_dict is missing {len(missing)} GPT-2 keys: {missing[:6]}")
    model.load_state_dict(ours, strict=True)
    return model


def kv_cache_bytes(
    n_layers: int, batch_size: int, n_kv_heads: int, seq_len: int, head_dim: int, bytes_per: int
) -> int:
    """2 (keys and values) * n_layers * batch * n_kv_heads * seq_len * head_dim * bytes_per."""
    return 2 * n_layers * batch_size * n_kv_heads * seq_len * head_dim * bytes_per


def mla_cache_bytes(
    n_layers: int, batch: int, seq_len: int, kv_lora_rank: int, rope_head_dim: int, bytes_per: int
) -> int:
    """MLA caches a latent c_kv (kv_lora_rank) and one shared RoPE key (rope_head_dim) per token."""
    return n_layers * batch * seq_len * (kv_lora_rank + rope_head_dim) * bytes_per


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
    _check_sizes(kv_len=kv_len)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache ({use_cache!r}) must be a bool")
    d, n_layers = config.d_model, config.n_layers
    n_tokens = 1 if use_cache else kv_len
    weights = n_tokens * n_layers * 2 * 12 * d * d + 2 * d * config.vocab_size
    attn = n_layers * 4 * n_tokens * kv_len * d
    return weights + attn


def fit_loglog_slope(x, y) -> float:
    """Slope b of log y = a + b log x (least squares): y ~ x^b. Needs 2+ positive points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.ndim != 1 or len(x) < 2 or len(np.unique(x)) < 2 or not (x > 0).all():
        raise ValueError(f"x ({x.tolist()}) must hold 2 or more distinct positive values")
    if y.shape != x.shape or not (y > 0).all() or not np.isfinite(y).all():
        raise ValueError(f"y ({y.tolist()}) must hold one finite positive value per x")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def decode_positions(prompt_len: int, total_len: int, n_points: int) -> list[int]:
    """A geometric grid of decode positions from prompt_len to total_len - 2 (the last step)."""
    _check_sizes(prompt_len=prompt_len, total_len=total_len, n_points=n_points)
    if total_len < prompt_len + 2:
        raise ValueError(f"total_len ({total_len}) must be >= prompt_len + 2 ({prompt_len + 2})")
    grid = np.geomspace(prompt_len, total_len - 2, n_points)
    return sorted({int(round(p)) for p in grid})


ROUNDS = 3  # interleaved timing rounds; a claim's spread is the min..max over them
MAX_ROUNDS = 9  # more rounds, while the spread of a comparison still straddles 1x


def interleaved_rounds(
    fns: dict, min_run_time: float, rounds: int = ROUNDS, settled=None
) -> dict[str, list[float]]:
    """Seconds per call of each fn, timed in interleaved rounds (a, b, c, a, b, c, ...).

    A shared machine's speed drifts between two timings; alternating the methods lets each round
    compare them under the same load, and the rounds give a spread. One warm-up round (a quarter
    of ``min_run_time`` per fn) runs first and is discarded, so that allocator and cache warm-up
    cannot make one round an outlier that decides a min-max spread. After ``rounds`` rounds more
    are run, up to ``MAX_ROUNDS``, while ``settled(times)`` is False (spread exceeds effect).
    """
    if not isinstance(fns, dict) or not fns or not all(map(callable, fns.values())):
        raise ValueError(f"fns ({fns!r}) must be a non-empty dict of functions to time")
    _check_sizes(rounds=rounds)
    _check_positive(min_run_time=min_run_time)
    for fn in fns.values():  # the discarded warm-up round
        median_time_s(fn, min_run_time / 4)
    times: dict[str, list[float]] = {name: [] for name in fns}
    done = 0
    while True:
        for name, fn in fns.items():
            times[name].append(median_time_s(fn, min_run_time))
        done += 1
        if done >= MAX_ROUNDS or (done >= rounds and (settled is None or settled(times))):
            return times


def spread(values, center: float | None = None) -> dict:
    """Range (lo, hi) of repeated measurements or per-round ratios, and their median as the
    center, unless an estimate ``center`` is given (then the range is widened to include it)."""
    if len(values) == 0:
        raise ValueError("values ([]) must hold at least one measurement")
    values = [float(v) for v in values] + ([] if center is None else [float(center)])
    mid = float(np.median(values)) if center is None else float(center)
    return {"center": mid, "lo": min(values), "hi": max(values)}


def one_sided(ratios) -> bool:
    """True when every per-round ratio lies on one side of 1x (the spread does not straddle it)."""
    return min(ratios) > 1 or max(ratios) < 1


# Published configs (Hugging Face config.json of each repository, and the papers).
# n_kv_heads < n_heads is grouped-query attention; DeepSeek's MLA caches a latent instead.
RELEASED_MODELS = [
    dict(name="GPT-2 small", n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64,
         max_context=1024, source="openai-community/gpt2 config.json (n_layer 12, n_head 12)"),
    dict(name="GPT-2 XL", n_layers=48, n_heads=25, n_kv_heads=25, head_dim=64, max_context=1024,
         source="openai-community/gpt2-xl config.json (n_layer 48, n_head 25, n_embd 1600)"),
    dict(name="Llama-2-7B", n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
         max_context=4096, vocab_size=32000, intermediate_size=11008,
         source="meta-llama/Llama-2-7b-hf config.json; Touvron et al. 2023, arXiv 2307.09288"),
    dict(name="Llama-2-70B", n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
         max_context=4096, source="meta-llama/Llama-2-70b-hf config.json (8 KV heads)"),
    dict(name="Llama-3-8B", n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
         max_context=8192, source="meta-llama/Meta-Llama-3-8B config.json; arXiv 2407.21783"),
    dict(name="Mistral-7B", n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
         max_context=32768, source="mistralai/Mistral-7B-v0.1 config.json; arXiv 2310.06825"),
    dict(name="DeepSeek-V2 (MLA)", n_layers=60, n_heads=128, kv_lora_rank=512,
         qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_context=131072,
         source="deepseek-ai/DeepSeek-V2 config.json; arXiv 2405.04434"),
    dict(name="DeepSeek-V3 (MLA)", n_layers=61, n_heads=128, kv_lora_rank=512,
         qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_context=163840,
         source="deepseek-ai/DeepSeek-V3 config.json (kv_lora_rank 512, qk_rope_head_dim 64); "
         "arXiv 2412.19437"),
]  # fmt: skip


def llama_param_count(m: dict) -> int:
    """Parameters of a Llama-2-style model from its config (untied embedding and LM head).

    Per layer: q, o (d x d), k, v (d x n_kv_heads * head_dim), gate, up, down (d x ffn) and two
    RMSNorm weights; plus the embedding, the LM head and the final norm.
    """
    d, ffn = m["n_heads"] * m["head_dim"], m["intermediate_size"]
    kv = m["n_kv_heads"] * m["head_dim"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d
    return 2 * m["vocab_size"] * d + m["n_layers"] * per_layer + d


def copy_bandwidth_gb_per_s(n_bytes: int, device: torch.device, min_run_time: float) -> float:
    """This machine's memory bandwidth: copying n_bytes reads n_bytes and writes n_bytes.

    The destination is allocated once: a plain ``clone()`` would get fresh pages from the OS at
    every call on a CPU and time the page faults, not the memory.
    """
    _check_sizes(n_bytes=n_bytes)
    src = torch.ones(max(n_bytes // 4, 1), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_time_s(lambda: dst.copy_(src), min_run_time) / 1e9


def matvec_bandwidth_gb_per_s(n_bytes: int, device: torch.device, min_run_time: float) -> float:
    """Bytes of an fp32 (rows, 4096) matrix read per second by one matrix-vector product.

    A batch-1 decode step is made of exactly this (every Linear sees one token), so this is the
    most a decode step can hope for on this machine, usually a little below the copy bandwidth.
    """
    _check_sizes(n_bytes=n_bytes)
    cols = 4096
    weight = torch.ones(max(n_bytes // (4 * cols), 1), cols, device=device)
    x = torch.ones(cols, device=device)
    return weight.numel() * 4 / median_time_s(lambda: weight @ x, min_run_time) / 1e9


def matmul_flops_per_s(device: torch.device, n: int, min_run_time: float) -> float:
    """This machine's fp32 matmul throughput on an (n, n) @ (n, n) product (2 n^3 FLOPs)."""
    _check_sizes(n=n)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return 2 * n**3 / median_time_s(lambda: a @ b, min_run_time)


def tiny_widths(config: GPTConfig) -> GPTConfig:
    """Same layers, heads and operators, but head_dim 2 and an 8-token vocabulary.

    A decode step of this model reads almost no bytes and does almost no arithmetic, so its time
    is what every step pays regardless of width: Python, operator dispatch, small-kernel calls.
    It is a lower bound on that fixed cost (a wide model's kernels may take slower paths).
    """
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
    return replace(config, vocab_size=8, d_model=2 * config.n_heads)


MAIN_COSTS = {
    "overhead": "per-operator overhead (Python and operator dispatch)",
    "memory": "memory traffic (reading the weights and the cache)",
    "arithmetic": "arithmetic (matmul FLOPs)",
    "unexplained": "not explained by either floor (memory traffic and arithmetic each cover "
    "less than half of the time beyond the overhead)",
    "not_separable": "overhead not separable (timing noise: the tiny-width step was not faster "
    "than the real one)",
}
FLOOR_SHARE = 0.5  # a floor names the main cost only if it covers half the time past overhead


def main_decode_cost(
    step_s: float, overhead_s: float, memory_floor_s: float, compute_floor_s: float
) -> str:
    """Name what most of a measured decode step is spent on (a key of ``MAIN_COSTS``).

    The step is split into the measured fixed overhead (``tiny_widths`` model) and the rest,
    which grows with the widths. An overhead that is not below the step is timing noise: nothing
    can be separated ('not_separable'). An overhead of at least half the step is the main cost.
    Otherwise the larger of the two floors (bytes / copy bandwidth, FLOPs / matmul throughput)
    names the main cost only if it covers at least ``FLOOR_SHARE`` of the rest; if neither does,
    the step is 'unexplained' by them (e.g. slow kernel paths or allocations).
    """
    _check_positive(step_s=step_s, overhead_s=overhead_s)
    _check_positive(memory_floor_s=memory_floor_s, compute_floor_s=compute_floor_s)
    if overhead_s >= step_s:
        return "not_separable"
    if overhead_s >= 0.5 * step_s:
        return "overhead"
    if max(memory_floor_s, compute_floor_s) < FLOOR_SHARE * (step_s - overhead_s):
        return "unexplained"
    return "memory" if memory_floor_s >= compute_floor_s else "arithmetic"


# =============================================================================
# 4. Experiments: correctness, decode benchmark, memory, bandwidth, claims
# =============================================================================


def model_summary(model: GPT) -> dict:
    """The demo model's config, head_dim and parameter count (the tied head counted once)."""
    n_params = sum(p.numel() for p in model.parameters())
    return {**model.config.__dict__, "head_dim": model.config.head_dim, "n_params": n_params}


@torch.inference_mode()
def check_correctness(
    model: GPT, prompt: torch.Tensor, max_new_tokens: int, chunk: int = 3
) -> dict:
    """Cached generation must reproduce uncached generation, logit for logit.

    Greedy-decodes ``max_new_tokens`` without a cache and with each cache kind, compares the
    logits every token was chosen from, and checks two more ways of computing the same thing:
    a prefill in chunks of ``chunk`` tokens, and the explicit-softmax attention path.
    """
    _check_sizes(chunk=chunk)
    ids_ref, logits_ref = model.generate(
        prompt, max_new_tokens, use_cache=False, return_logits=True
    )
    out = {"n_new_tokens": max_new_tokens, "prompt_len": prompt.shape[1]}
    for kind in CACHE_KINDS:
        ids, logits = model.generate(prompt, max_new_tokens, cache_kind=kind, return_logits=True)
        out[f"max_abs_err_logits_{kind}_vs_no_cache"] = max_abs_err(logits, logits_ref)
        out[f"ids_identical_{kind}_vs_no_cache"] = bool(torch.equal(ids, ids_ref))
    full = model(ids_ref)  # (1, seq_len, vocab): one pass over the whole sequence
    cache = model.new_cache(1)
    chunks = [
        model(ids_ref[:, s : s + chunk], start_pos=s, cache=cache)
        for s in range(0, ids_ref.shape[1], chunk)
    ]
    out["chunk_size"] = chunk
    out["max_abs_err_chunked_prefill"] = max_abs_err(torch.cat(chunks, dim=1), full)
    explicit = GPT(replace(model.config, attn_impl="explicit")).to(prompt.device)
    explicit.load_state_dict(model.state_dict())
    out["max_abs_err_explicit_vs_sdpa"] = max_abs_err(explicit(ids_ref), full)
    return out


METHODS = ("no_cache", "concat", "static")


@torch.inference_mode()
def benchmark_decode(
    model: GPT, prompt_len: int, total_len: int, n_points: int, min_run_time: float, seed: int
) -> dict:
    """Time one decode step at a grid of positions, for each method, in interleaved rounds.

    A step at position p processes the token at p, with p tokens before it:
      no_cache: a full forward over ids[:, :p + 1] (what ``generate(use_cache=False)`` does);
      static / concat: one token, with a cache already holding p tokens. The static step writes
        in place; the concat step rebuilds a (p + 1)-token tensor, as it would while generating.
    At each position the three are timed in ``ROUNDS`` interleaved rounds (more at the last
    position while concat vs static is within the noise). Every step is timed through
    ``GPT._forward``, the path ``generate`` runs (``forward``'s door checks are not in it).
    Generation time is *estimated*, per round: the prefill plus the step times summed over every
    decode position (linear interpolation between the grid points); the static estimate is
    checked against ``generate`` timed directly (``static_estimate_vs_measured_ratio``).
    """
    decode_positions(prompt_len, total_len, n_points)  # checks the sizes
    if total_len > model.config.max_seq_len:
        raise ValueError(
            f"total_len ({total_len}) must be <= max_seq_len ({model.config.max_seq_len})"
        )
    gen = torch.Generator().manual_seed(seed)
    device = model.lm_head.weight.device
    ids = torch.randint(model.config.vocab_size, (1, total_len), generator=gen).to(device)
    positions = decode_positions(prompt_len, total_len, n_points)
    rounds: dict[str, list[list[float]]] = {m: [] for m in METHODS}  # [position][round] seconds
    for p in positions:
        # model._forward: the path generate() runs (forward's door checks are not timed)
        fns = {"no_cache": lambda p=p: model._forward(ids[:, : p + 1], 0, None, True)}
        for kind in ("concat", "static"):
            cache = model.new_cache(1, total_len, kind=kind)
            model(ids[:, :p], cache=cache)  # prefill p tokens

            def step(p=p, cache=cache):
                return model._forward(ids[:, p : p + 1], p, cache, True)

            fns[kind] = step
        last = p == positions[-1]

        def settled(t):
            return one_sided([c / s for c, s in zip(t["concat"], t["static"], strict=True)])

        times = interleaved_rounds(fns, min_run_time, settled=settled if last else None)
        for m in METHODS:
            rounds[m].append(times[m])
    prefill_s = median_time_s(
        lambda: model._forward(ids[:, :prompt_len], 0, None, True), min_run_time
    )
    all_positions = np.arange(prompt_len, total_len - 1)  # every decode step of the generation
    gen_rounds = {  # one generation-time estimate per round
        m: [
            prefill_s + float(np.interp(all_positions, positions, [t[r] for t in ts]).sum())
            for r in range(ROUNDS)
        ]
        for m, ts in rounds.items()
    }
    n_new = total_len - prompt_len
    step_s = {m: [float(np.median(t)) for t in ts] for m, ts in rounds.items()}
    generation_s = {  # from the median step times: the curves of cumulative_time.png
        m: prefill_s + float(np.interp(all_positions, positions, t).sum())
        for m, t in step_s.items()
    }
    measured_static_s = median_time_s(
        lambda: model.generate(ids[:, :prompt_len], n_new), min_run_time
    )

    def ratios(a, b):
        return [x / y for x, y in zip(a, b, strict=True)]

    return {
        "prompt_len": prompt_len,
        "total_len": total_len,
        "n_new_tokens": n_new,
        "positions": positions,
        "n_positions": len(positions),
        "rounds": ROUNDS,
        "step_ms": {m: [1e3 * t for t in ts] for m, ts in step_s.items()},
        "step_ms_lo": {m: [1e3 * min(t) for t in ts] for m, ts in rounds.items()},
        "step_ms_hi": {m: [1e3 * max(t) for t in ts] for m, ts in rounds.items()},
        "step_ms_rounds": {m: [[1e3 * x for x in t] for t in ts] for m, ts in rounds.items()},
        "prefill_ms": 1e3 * prefill_s,
        "generation_s": generation_s,
        "tokens_per_s": {m: n_new / t for m, t in generation_s.items()},
        "speedup_static_vs_no_cache": generation_s["no_cache"] / generation_s["static"],
        "speedup_concat_vs_no_cache": generation_s["no_cache"] / generation_s["concat"],
        "speedup_static_vs_no_cache_spread": spread(
            ratios(gen_rounds["no_cache"], gen_rounds["static"]),
            generation_s["no_cache"] / generation_s["static"],
        ),
        "static_last_vs_first_step_spread": spread(
            ratios(rounds["static"][-1][:ROUNDS], rounds["static"][0])
        ),
        "no_cache_last_vs_first_step_spread": spread(
            ratios(rounds["no_cache"][-1][:ROUNDS], rounds["no_cache"][0])
        ),
        "concat_vs_static_at_longest_spread": spread(
            ratios(rounds["concat"][-1], rounds["static"][-1])
        ),
        "static_generate_measured_s": measured_static_s,
        "static_estimate_vs_measured_ratio": generation_s["static"] / measured_static_s,
        "speedup_measured_static_vs_no_cache": generation_s["no_cache"] / measured_static_s,
    }


def scaling_analysis(config: GPTConfig, bench: dict) -> dict:
    """Fitted log-log slope of step time vs context length, next to the analytic FLOPs.

    Slope ~1 means time per step grows linearly with the context (so generation is quadratic);
    slope ~0 means constant time per step (generation is linear). The slope is also fitted to
    each timing round alone, which gives its spread.
    """
    kv_lens = [p + 1 for p in bench["positions"]]
    flops = {
        "no_cache": [decode_step_flops(config, n, use_cache=False) for n in kv_lens],
        "static": [decode_step_flops(config, n, use_cache=True) for n in kv_lens],
    }
    per_round = {
        m: [fit_loglog_slope(kv_lens, [t[r] for t in ts]) for r in range(bench["rounds"])]
        for m, ts in bench["step_ms_rounds"].items()
    }
    fitted = {m: fit_loglog_slope(kv_lens, t) for m, t in bench["step_ms"].items()}
    return {
        "kv_lens": kv_lens,
        "fitted_slope": fitted,
        "verdict": decode_slopes_title(
            fitted,
            bench["static_last_vs_first_step_spread"],
            bench["no_cache_last_vs_first_step_spread"],
        ).replace(";\n", "; "),  # the figure's title
        "fitted_slope_spread": {m: spread(s) for m, s in per_round.items()},
        "flops_per_step": flops,
        "analytic_flops_slope": {m: fit_loglog_slope(kv_lens, f) for m, f in flops.items()},
        "flops_ratio_no_cache_vs_cache_at_longest": flops["no_cache"][-1] / flops["static"][-1],
    }


@torch.inference_mode()
def concat_cost_analysis(model: GPT, bench: dict, min_run_time: float) -> dict:
    """What the concat cache pays on top of the static one at the longest measured context.

    At position p a concat step copies the old prefix of K and V of every layer into a new tensor:
    ``kv_cache_bytes(n_layers, 1, n_heads, p, head_dim, width)`` bytes read and as many written,
    where the static cache writes one token in place. Both cache updates are timed alone (all
    layers, interleaved rounds); their difference, next to the static step, predicts the
    concat/static step ratio, which is compared with the measured one, spreads included.
    For scale, the same copy for Llama-2-7B in bf16 at 4K and 32K tokens: a decode step that is
    bound by memory traffic reads weights + cache with a static cache, and 2 x cache more with
    concat, so concat/static ~ 1 + 2 cache / (weights + cache).
    """
    c = model.config
    p = bench["positions"][-1]
    weight = model.lm_head.weight
    new = torch.randn(1, c.n_heads, 1, c.head_dim, dtype=weight.dtype, device=weight.device)
    prefix = torch.randn(1, c.n_heads, p, c.head_dim, dtype=weight.dtype, device=weight.device)
    fns = {}
    for kind in ("concat", "static"):
        caches = model.new_cache(1, p + 1, kind=kind)
        for layer in caches:
            layer.update(prefix, prefix, 0)

        def update_all(caches=caches):
            for layer in caches:
                layer.update(new, new, p)  # rewrites position p: the same work every call

        fns[kind] = update_all
    update_s = interleaved_rounds(fns, min_run_time)
    static_step_ms = bench["step_ms"]["static"][-1]
    extra_ms = [1e3 * (a - b) for a, b in zip(update_s["concat"], update_s["static"], strict=True)]
    llama = next(m for m in RELEASED_MODELS if m["name"] == "Llama-2-7B")
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
        "update_ms": {kind: 1e3 * float(np.median(t)) for kind, t in update_s.items()},
        "extra_ms": float(np.median(extra_ms)),
        "static_step_ms": static_step_ms,
        "extra_vs_static_step_ratio": float(np.median(extra_ms)) / static_step_ms,
        "predicted_concat_vs_static_spread": spread([1 + e / static_step_ms for e in extra_ms]),
        "measured_concat_vs_static_spread": bench["concat_vs_static_at_longest_spread"],
        "llama_2_7b_weight_bytes": weight_bytes,
        "llama_2_7b": projection,
    }


def measure_memory(config: GPTConfig, lengths: list[int], batch: int = 1) -> dict:
    """Bytes of real cache tensors (both kinds, fp32 and bf16) vs the formula, per length."""
    if not lengths:
        raise ValueError("lengths ([]) must hold at least one sequence length")
    _check_sizes(batch=batch, **{f"lengths[{i}]": n for i, n in enumerate(lengths)})
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


CONTEXTS = (4096, 32768, 131072)


def real_model_cache_table(bytes_per_element: int = 2) -> dict:
    """KV cache of one sequence (batch 1) for released models, per token and at 4K/32K/128K."""
    _check_sizes(bytes_per_element=bytes_per_element)
    rows = []
    for m in RELEASED_MODELS:
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
            kind = "MLA"
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
    return {
        "bytes_per_element": bytes_per_element,
        "contexts": list(CONTEXTS),
        "rows": rows,
        # The same sizes keyed by model ("llama_3_8b"), so the README names what it quotes.
        "at_context_bytes": {_slug(r["name"]): r["at_context_bytes"] for r in rows},
    }


def _slug(name: str) -> str:
    """'DeepSeek-V3 (MLA)' -> 'deepseek_v3_mla': a model name as a results.json key."""
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


@torch.inference_mode()
def bandwidth_analysis(
    models: dict[str, GPT], context_len: int, copy_bytes: int, min_run_time: float, seed: int
) -> dict:
    """A decode step reads every weight and the whole cache once: how close to memory speed?

    bytes_read = weight bytes (tied embedding counted once) + cache bytes for context_len + 1
    tokens; achieved GB/s = bytes_read / step time; utilisation = achieved / copy bandwidth
    (model bandwidth utilisation, Pope et al. 2022), and also / matrix-vector bandwidth, the
    operation decode is made of. A utilisation above 100% is impossible: it means the copy
    benchmark underestimated the bandwidth (e.g. the weights fit in the CPU's cache), so the
    bandwidth is measured again with 4x the bytes, and if it still happens the utilisation is
    dropped (None) with a note. To name the main cost, the step is compared with the step of the
    same model at tiny widths (``tiny_widths``: the fixed per-operator overhead), bytes / copy
    bandwidth (memory floor) and FLOPs / matmul throughput (arithmetic floor).
    """
    _check_sizes(context_len=context_len, copy_bytes=copy_bytes)
    device = next(iter(models.values())).lm_head.weight.device
    copy_gbs = copy_bandwidth_gb_per_s(copy_bytes, device, min_run_time)
    matvec_gbs = matvec_bandwidth_gb_per_s(copy_bytes, device, min_run_time)
    flops_per_s = matmul_flops_per_s(device, 1024, min_run_time)
    gen = torch.Generator().manual_seed(seed)

    def step_time_s(model: GPT) -> float:
        ids = torch.randint(model.config.vocab_size, (1, context_len + 1), generator=gen)
        ids = ids.to(device)
        cache = model.new_cache(1, context_len + 1)
        model(ids[:, :context_len], cache=cache)
        step = ids[:, -1:]  # timed on generate()'s path, without forward's door checks
        return median_time_s(lambda: model._forward(step, context_len, cache, True), min_run_time)

    measured = []
    for name, model in models.items():
        c = model.config
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        width = model.lm_head.weight.element_size()
        cache_bytes = kv_cache_bytes(c.n_layers, 1, c.n_heads, context_len + 1, c.head_dim, width)
        step_s = step_time_s(model)
        overhead_s = step_time_s(GPT(tiny_widths(c)).to(device).eval())
        flops = decode_step_flops(c, context_len + 1, use_cache=True)
        measured.append((name, model, weight_bytes, cache_bytes, step_s, overhead_s, flops))
    remeasured = any(
        (w + cb) / s / 1e9 > min(copy_gbs, matvec_gbs) for _, _, w, cb, s, _, _ in measured
    )
    if remeasured:  # impossible utilisation: measure the bandwidth again, over 4x the bytes
        copy_gbs = max(copy_gbs, copy_bandwidth_gb_per_s(4 * copy_bytes, device, min_run_time))
        matvec_gbs = max(
            matvec_gbs, matvec_bandwidth_gb_per_s(4 * copy_bytes, device, min_run_time)
        )
    rows = []
    for name, model, weight_bytes, cache_bytes, step_s, overhead_s, flops in measured:
        bytes_read = weight_bytes + cache_bytes
        achieved = bytes_read / step_s / 1e9
        memory_floor_s = bytes_read / (copy_gbs * 1e9)
        compute_floor_s = flops / flops_per_s
        cost = main_decode_cost(step_s, overhead_s, memory_floor_s, compute_floor_s)
        possible = achieved <= copy_gbs and achieved <= matvec_gbs
        rows.append(
            {
                "name": name,
                "n_params": sum(p.numel() for p in model.parameters()),
                "weight_bytes": weight_bytes,
                "cache_bytes": cache_bytes,
                "bytes_read_per_step": bytes_read,
                "step_ms": 1e3 * step_s,
                "achieved_gb_per_s": achieved,
                "bandwidth_utilisation_ratio": achieved / copy_gbs if possible else None,
                "matvec_utilisation_ratio": achieved / matvec_gbs if possible else None,
                "utilisation_note": None
                if possible
                else (
                    f"the step moved {achieved:.1f} GB/s, more than the measured copy "
                    f"({copy_gbs:.1f} GB/s) and matvec ({matvec_gbs:.1f} GB/s) bandwidths even "
                    f"after re-measuring: the bandwidth measurement is wrong here (the weights "
                    f"may sit in the CPU cache), so no utilisation is given"
                ),
                "overhead_ms": 1e3 * overhead_s,
                # None when the tiny-width step was not faster: no share can be given
                "overhead_share_ratio": overhead_s / step_s if overhead_s < step_s else None,
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
        "bandwidth_remeasured": remeasured,
        "matmul_gflops_per_s": flops_per_s / 1e9,
        "models": rows,
    }


@torch.inference_mode()
def attention_picture(model: GPT, ids: torch.Tensor, layer: int = 0, head: int = 0) -> dict:
    """Attention weights of one head for a short sequence (batch 1), for the decode-step figure."""
    check_token_ids(ids, "ids", model.config, model.lm_head.weight.device)
    if ids.shape[0] != 1:
        raise ValueError(f"ids (shape {tuple(ids.shape)}) must hold one sequence (batch 1)")
    for name, value, n in (
        ("layer", layer, model.config.n_layers),
        ("head", head, model.config.n_heads),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < n:
            raise ValueError(f"{name} ({value!r}) must be an int in [0, {n - 1}]")
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
    weights = _attention_weights(q, k)[0, head]  # (n, n)
    return {
        "layer": layer,
        "head": head,
        "weights": weights.cpu().tolist(),
        "scores_computed_no_cache": n * n,
        "scores_computed_with_cache": n,
    }


def check_hf_checkpoint(name: str) -> None:
    """A Hugging Face model name, or a local folder that holds a GPT-2 checkpoint's config.json."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name ({name!r}) must be a model name or a folder")
    path = Path(name)
    if path.exists():
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"name ({name!r}) is a local path without config.json: no checkpoint")
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if model_type != "gpt2":
            raise ValueError(f"name ({name!r}): its config.json is not a GPT-2 config")


def hf_demo(
    name: str | None, device: torch.device, max_new_tokens: int, min_run_time: float
) -> dict:
    """Real GPT-2 text with and without the cache, if ``transformers`` and the weights are local.

    ``name`` None: not requested. A local folder must hold a GPT-2 checkpoint (checked first).
    """
    if name is None:
        return {"model": None, "available": False, "reason": "not requested (pass --hf-model gpt2)"}
    check_hf_checkpoint(name)
    _check_sizes(max_new_tokens=max_new_tokens)
    try:
        from transformers import AutoTokenizer, GPT2LMHeadModel
    except ImportError:
        return {"model": name, "available": False, "reason": "transformers is not installed"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        hf_model = GPT2LMHeadModel.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        return {
            "model": name,
            "available": False,
            "reason": f"no local copy of {name!r} in the Hugging Face cache (no download is "
            f"tried): {str(err).splitlines()[0][:120]}",
        }
    model = GPT.from_hf_gpt2(hf_model).to(device).eval()
    prompt_text = "The key to fast text generation with a transformer is"
    prompt = tokenizer(prompt_text, return_tensors="pt").input_ids.to(device)
    ids_cache = model.generate(prompt, max_new_tokens, use_cache=True)
    ids_no_cache = model.generate(prompt, max_new_tokens, use_cache=False)
    times = interleaved_rounds(
        {
            "with": lambda: model.generate(prompt, max_new_tokens),
            "without": lambda: model.generate(prompt, max_new_tokens, use_cache=False),
        },
        min_run_time,
    )
    return {
        "model": name,
        "available": True,
        "prompt": prompt_text,
        "text": tokenizer.decode(ids_cache[0]),
        "n_new_tokens": max_new_tokens,
        "ids_identical_cache_vs_no_cache": bool(torch.equal(ids_cache, ids_no_cache)),
        "generate_with_cache_s": float(np.median(times["with"])),
        "generate_without_cache_s": float(np.median(times["without"])),
        "speedup_cache_vs_no_cache_spread": spread(
            [b / a for a, b in zip(times["with"], times["without"], strict=True)]
        ),
    }


FLAT_GROWTH = 1.5  # a cached step that grows at most 1.5x over the sweep reads as "flat"


def growth_verdict(s: dict, nc: dict) -> str:
    """How a cached step grew from the first to the last context (per-round spread ``s``),
    next to the uncached step's growth ``nc``: 'faster' (the median shrank below
    1 / ``FLAT_GROWTH``: warm-up or load), 'noisy' (the spreads overlap), 'flat' (at most
    ``FLAT_GROWTH``x in every round) or 'grew'.
    The one rule behind both ``flat_claim`` and the decode_time.png title."""
    if s["center"] < 1 / FLAT_GROWTH:
        return "faster"
    if s["hi"] >= nc["lo"]:
        return "noisy"
    return "flat" if s["hi"] <= FLAT_GROWTH else "grew"


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def _range(s: dict, fmt: str = ".2f") -> str:
    """'1.24x (range 1.03-1.75x)': the median and the min-max over the timing rounds."""
    return f"{s['center']:{fmt}}x (range {s['lo']:{fmt}}-{s['hi']:{fmt}}x)"


def speedup_claim(s: dict, n_tokens: int, n_positions: int) -> dict:
    """Static cache vs no cache over a whole generation, *estimated* from step times at
    ``n_positions`` contexts (interpolated); ``s`` is the per-round speedup spread."""
    head = (
        f"estimated from step times at {n_positions} contexts (interpolated over every step), "
        f"generating {n_tokens} tokens without a cache takes {_range(s, '.1f')} the time it "
        f"takes with a static cache"
    )
    if s["lo"] > 1:
        text = f"{head}: the cache is estimated faster"
    elif s["hi"] < 1:
        text = f"{head}: the cache was slower in this run, too small a model to show the saving"
    else:
        text = f"{head}: within this run's noise, too noisy to show the saving"
    return claim(text, s["lo"] > 1, **s)


ESTIMATE_TOLERANCE = 1.25  # estimate and direct measurement "agree" within this factor


def estimate_claim(estimated_s: float, measured_s: float, no_cache_s: float) -> dict:
    """Does the static generation time estimated from step times match ``generate`` timed
    directly? Also gives the speedup with the measured static time in the denominator."""
    ratio, tol = estimated_s / measured_s, ESTIMATE_TOLERANCE
    head = (
        f"the static-cache generation time estimated from step times ({estimated_s:.3f} s) is "
        f"{ratio:.2f}x the time of generate() measured directly ({measured_s:.3f} s)"
    )
    held = 1 / tol <= ratio <= tol
    if held:
        text = f"{head}: they agree within {tol:.2f}x"
    else:
        why = (
            "generate() also samples, appends ids and allocates its cache"
            if ratio < 1
            else "the two were timed minutes apart on a shared machine, whose load drifts"
        )
        text = (
            f"{head}: they differ by more than {tol:.2f}x, so the estimated times are "
            f"approximate ({why})"
        )
    speedup = no_cache_s / measured_s
    faster = f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"
    text += f"; with the measured static time, the static cache is {faster} than no cache"
    return claim(text, held, ratio=ratio, measured_speedup=speedup)


def flat_claim(s: dict, nc: dict, first: int, last: int, flops: float) -> dict:
    """Growth of a static-cache step from the first to the last context (spread ``s``), next to
    the uncached step's (spread ``nc``) and the cached step's FLOPs growth ``flops``."""
    head = (
        f"over the timing rounds, from context {first} to {last} a static-cache step grew "
        f"{_range(s)} (its FLOPs {flops:.2f}x) and an uncached step {_range(nc, '.1f')}"
    )
    verdict = growth_verdict(s, nc)
    text = {
        "faster": f"{head}: the first cached steps were slower (warm-up or load)",
        "noisy": f"{head}: the spreads overlap, too noisy to separate them",
        "flat": f"{head}: the cached step stays nearly flat (within {FLAT_GROWTH}x)",
        "grew": f"{head}: the cached step grows far less, though not flat (the cache read grows)",
    }[verdict]
    return claim(text, verdict in ("flat", "grew"), **s, no_cache=nc, flops_ratio=flops)


def concat_claim(s: dict, context: int, bytes_copied: int) -> dict:
    """Concat vs static step at the longest context; ``s`` is the per-round ratio spread."""
    head = (
        f"over the timing rounds, a concat-cache step at context {context}, which copies "
        f"{bytes_copied / 2**20:.1f} MiB of K and V, took {_range(s)} the time of a static step"
    )
    if s["lo"] > 1:
        text = f"{head}: the in-place cache is faster"
    elif s["hi"] < 1:
        text = f"{head}: the concat cache was faster in this run; its copy is too small to show"
    else:
        text = f"{head}: the difference is within this run's noise, too noisy to show the copy"
    return claim(text, s["lo"] > 1, **s)


def prediction_claim(predicted: dict, measured: dict) -> dict:
    """Does the concat/static ratio predicted from the cache updates alone match the steps?

    Held only when the measured spread lies on one side of 1x (the steps do differ) and the two
    spreads overlap: an overlap with a measurement that straddles 1x proves nothing."""
    head = (
        f"timed alone, the cache updates predict a concat/static step ratio of "
        f"{_range(predicted)};"
        f" the steps measured {_range(measured)}"
    )
    agree = predicted["lo"] <= measured["hi"] and measured["lo"] <= predicted["hi"]
    if not one_sided([measured["lo"], measured["hi"]]):  # the steps show no difference at all
        text = (
            f"{head}: the measured spread straddles 1x, so the prediction could not be tested "
            f"at this noise"
        )
        return claim(text, False, predicted=predicted, measured=measured)
    if agree:
        text = f"{head}: they agree within the spread"
    else:
        side = "above" if measured["center"] > predicted["center"] else "below"
        text = (
            f"{head}: the measurement is {side} the prediction beyond the spread, so the copy "
            f"alone does not explain the step difference in this run"
        )
    return claim(text, agree, predicted=predicted, measured=measured)


def bound_claim(row: dict) -> dict:
    """What a decode step's time goes to; the usual story is memory traffic."""
    u = row["bandwidth_utilisation_ratio"]
    share = f", {u:.0%} of the copy bandwidth" if u is not None else " (utilisation dropped)"
    head = (
        f"a decode step of the {row['name']} reads {row['bytes_read_per_step'] / 2**20:.1f} MiB "
        f"in {row['step_ms']:.2f} ms = {row['achieved_gb_per_s']:.1f} GB/s{share}"
    )
    if row["main_cost_kind"] == "memory":
        return claim(f"{head}: memory traffic is its main cost", True, main_cost=row["main_cost"])
    if row["main_cost_kind"] in ("unexplained", "not_separable"):
        text = f"{head}: its time is {row['main_cost']}, so this run does not show memory traffic"
        return claim(text, False, main_cost=row["main_cost"])
    return claim(
        f"{head}: its main cost is {row['main_cost']}, not memory traffic, at this size",
        False,
        main_cost=row["main_cost"],
    )


def decode_claims(bench: dict, scaling: dict, concat_cost: dict, bandwidth: dict) -> dict:
    """The claims this script prints, each computed from the measured numbers."""
    return {
        "static_faster": speedup_claim(
            bench["speedup_static_vs_no_cache_spread"],
            bench["n_new_tokens"],
            len(bench["positions"]),
        ),
        "estimate_matches_measured": estimate_claim(
            bench["generation_s"]["static"],
            bench["static_generate_measured_s"],
            bench["generation_s"]["no_cache"],
        ),
        "static_flat": flat_claim(
            bench["static_last_vs_first_step_spread"],
            bench["no_cache_last_vs_first_step_spread"],
            scaling["kv_lens"][0],
            scaling["kv_lens"][-1],
            scaling["flops_per_step"]["static"][-1] / scaling["flops_per_step"]["static"][0],
        ),
        "static_vs_concat": concat_claim(
            bench["concat_vs_static_at_longest_spread"],
            concat_cost["position"] + 1,
            concat_cost["bytes_copied_per_step"],
        ),
        "concat_cost_explained": prediction_claim(
            concat_cost["predicted_concat_vs_static_spread"],
            concat_cost["measured_concat_vs_static_spread"],
        ),
        "decode_bound": bound_claim(bandwidth["models"][-1]),
    }


# =============================================================================
# 5. Figures: one function per figure, each returns the Figure; titles follow the numbers
# =============================================================================

KV_METHOD_STYLE = {
    "no_cache": dict(label="no cache", color="tab:red", marker="o"),
    "concat": dict(label="concat cache (torch.cat)", color="tab:orange", marker="s"),
    "static": dict(label="static cache (pre-allocated)", color="tab:blue", marker="^"),
}
KIND_COLORS = {"MHA": "tab:red", "GQA": "tab:blue", "MLA": "tab:green"}


def _log_tick(value: float, _pos=None) -> str:
    """Label 1, 2, 3 and 5 times a power of ten on a log axis, as plain numbers."""
    lead = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if any(math.isclose(lead, d) for d in (1, 2, 3, 5)) else ""


def decode_slopes_title(slopes: dict, growth: dict, no_cache_growth: dict) -> str:
    """The decode_time.png title: the fitted log-log slopes, and the static step's growth from
    the first to the last context judged by ``growth_verdict`` (the same rule as ``flat_claim``)."""
    nc = slopes["no_cache"]
    if nc >= 0.5:
        first = f"Without a cache each step grows with the context (slope {nc:.2f})"
    else:
        first = f"Without a cache the step grew little here (slope {nc:.2f}): context too short"
    grew = f"grew {growth['center']:.2f}x, slope {slopes['static']:.2f}"
    second = {
        "faster": f"the static-cache step got faster with context ({grew}): timing noise",
        "noisy": f"static-cache step ({grew}) within the noise of the uncached one",
        "flat": f"with a static cache it stays nearly flat ({grew}, within {FLAT_GROWTH}x)",
        "grew": f"with a static cache it grows far less, though not flat ({grew})",
    }[growth_verdict(growth, no_cache_growth)]
    return f"{first};\n{second}"


def plot_decode_time(bench: dict, scaling: dict) -> plt.Figure:
    """decode_time.png: per-step time vs context, with the range over the timing rounds."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for method, ms in bench["step_ms"].items():
        style = KV_METHOD_STYLE[method]
        s = scaling["fitted_slope_spread"][method]
        label = f"{style['label']}: slope {scaling['fitted_slope'][method]:.2f}"
        lo, hi = np.array(bench["step_ms_lo"][method]), np.array(bench["step_ms_hi"][method])
        ax.errorbar(
            scaling["kv_lens"],
            ms,
            yerr=[np.array(ms) - lo, hi - np.array(ms)],
            capsize=3,
            **{
                **style,
                "label": f"{label} (slope fitted to each round: {s['lo']:.2f} to {s['hi']:.2f})",
            },
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(scaling["kv_lens"], [str(n) for n in scaling["kv_lens"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        set_formatter(matplotlib.ticker.FuncFormatter(_log_tick))  # 20, not 2 x 10^1
    ax.set_xlabel("context length at this step (tokens, log scale)")
    ax.set_ylabel("time per decode step (ms, log scale)")
    growth = (
        bench["static_last_vs_first_step_spread"],
        bench["no_cache_last_vs_first_step_spread"],
    )
    ax.set_title(decode_slopes_title(scaling["fitted_slope"], *growth), fontsize=10)
    ax.legend(
        title=f"median of {bench['rounds']}+ timing rounds; bars: min-max",
        fontsize=8,
        title_fontsize=8,
        loc="upper left",
    )
    ax.grid(True, which="both", alpha=0.3)
    return fig


def cumulative_time_title(s: dict, measured_speedup: float) -> str:
    """The cumulative_time.png title, from the per-round static-vs-no-cache speedup spread of the
    estimate and the speedup with the directly measured static generate() time."""
    if s["lo"] > 1:
        verdict = f"the static cache is estimated {s['center']:.1f}x faster in total"
    elif s["hi"] < 1:
        verdict = (
            f"the static cache was estimated slower here ({s['center']:.2f}x): model too small"
        )
    else:
        verdict = f"cache vs no cache within the noise ({s['center']:.2f}x): too noisy to show"
    return (
        f"Estimated cumulative generation time: {verdict}\n(range {s['lo']:.1f}-{s['hi']:.1f}x "
        f"over rounds; {measured_speedup:.1f}x with the static generate() timed directly)"
    )


def _a_tokens(n: int) -> str:
    """'a 16-token', 'an 8-token', 'an 11-token': the article as the number is spoken."""
    spoken_vowel = str(n).startswith("8") or n in (11, 18) or 11_000 <= n < 12_000
    return f"{'an' if spoken_vowel else 'a'} {n}-token"


def plot_cumulative_time(bench: dict) -> plt.Figure:
    """cumulative_time.png: total generation time, quadratic without a cache, linear with."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    all_positions = np.arange(bench["prompt_len"], bench["total_len"] - 1)
    n_tokens = np.arange(1, len(all_positions) + 2)  # the prefill makes the first token
    lines = {"no_cache": "-", "concat": "--", "static": ":"}  # concat and static nearly overlap
    for method, ms in bench["step_ms"].items():
        steps_s = np.interp(all_positions, bench["positions"], ms) / 1e3
        cumulative = bench["prefill_ms"] / 1e3 + np.concatenate(([0.0], np.cumsum(steps_s)))
        style = KV_METHOD_STYLE[method]
        ax.plot(
            n_tokens,
            cumulative,
            lines[method],
            color=style["color"],
            marker=style["marker"],
            markevery=max(len(n_tokens) // 8, 1),
            lw=2,
            mfc="none",
            label=f"{style['label']}: {cumulative[-1]:.2f} s",
        )
    ax.set_xlabel(f"new tokens generated after {_a_tokens(bench['prompt_len'])} prompt")
    ax.set_ylabel("cumulative generation time (s)")
    title = cumulative_time_title(
        bench["speedup_static_vs_no_cache_spread"], bench["speedup_measured_static_vs_no_cache"]
    )
    ax.set_title(title, fontsize=10)
    ax.legend(
        title=f"estimated: median step times at {len(bench['positions'])} contexts, interpolated",
        fontsize=8,
        title_fontsize=8,
    )
    ax.grid(True, alpha=0.3)
    return fig


def plot_cache_vs_context(memory: dict) -> plt.Figure:
    """cache_vs_context.png: cache bytes grow linearly with context; measured vs formula."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    mib = 2.0**20
    for dtype, color in (("float32", "tab:blue"), ("bfloat16", "tab:green")):
        rows = [r for r in memory["rows"] if r["dtype"] == dtype]
        lengths = [r["seq_len"] for r in rows]
        ax.plot(lengths, [r["formula_bytes"] / mib for r in rows], color=color,
                label=f"formula, {dtype}")  # fmt: skip
        ax.plot(lengths, [r["static_bytes"] / mib for r in rows], "o", color=color, ms=9,
                mfc="none", label=f"measured static cache, {dtype}")  # fmt: skip
        ax.plot(lengths, [r["concat_bytes"] / mib for r in rows], "x", color=color, ms=7,
                label=f"measured concat cache, {dtype}")  # fmt: skip
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache size, all layers (MiB)")
    agree = "measured = formula" if memory["measured_equals_formula"] else "measured != formula!"
    ax.set_title(f"Cache memory grows linearly with the context: {agree}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return fig


def real_model_cache_title(real: dict, context: int) -> str:
    """The real_model_cache.png title: the largest cache of each attention type at ``context``."""
    parts = []
    for kind in KIND_COLORS:
        rows = [r for r in real["rows"] if r["kind"] == kind]
        if rows:
            big = max(rows, key=lambda r: r["at_context_bytes"][str(context)])
            parts.append(f"{kind} up to {big['at_context_bytes'][str(context)] / 2**30:.1f} GiB")
    return f"KV cache of one {context // 1024}K-token sequence (bf16): " + ", ".join(parts)


def plot_real_model_cache(real: dict, context: int = 32768) -> plt.Figure:
    """real_model_cache.png: released MHA, GQA and MLA models' caches side by side (GiB)."""
    fig, (ax, ax_tok) = plt.subplots(
        1, 2, figsize=(12, 5), layout="constrained", gridspec_kw={"width_ratios": [3, 2]}
    )
    rows = real["rows"]
    x = np.arange(len(rows))
    colors = [KIND_COLORS[r["kind"]] for r in rows]
    gib = [r["at_context_bytes"][str(context)] / 2**30 for r in rows]
    bars = ax.bar(x, gib, color=colors, edgecolor="white")
    for bar, r, value in zip(bars, rows, gib, strict=True):
        beyond = context > r["max_context"]
        bar.set_hatch("//" if beyond else "")
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
    names = [f"{r['name'].removesuffix(' (MLA)')}\n({r['kind']})" for r in rows]
    ax.set_xticks(x, names, fontsize=8, rotation=30, ha="right")
    ax.set_ylabel(f"KV cache at {context // 1024}K tokens (GiB)")
    ax.grid(True, axis="y", alpha=0.3)
    handles = [matplotlib.patches.Patch(color=c, label=k) for k, c in KIND_COLORS.items()]
    handles.append(matplotlib.patches.Patch(facecolor="white", edgecolor="grey", hatch="//",
                                            label="longer than trained for"))  # fmt: skip
    ax.legend(handles=handles, title="attention type", fontsize=8, loc="upper right")
    kib = [r["per_token_bytes"] / 2**10 for r in rows]
    # Dots, not bars: a bar's length on a log axis depends on where the axis starts.
    ax_tok.scatter(kib, x, color=colors, s=50, zorder=3)
    for y, value in zip(x, kib, strict=True):
        ax_tok.annotate(
            f"{value:.0f}", (value, y), xytext=(7, 0), textcoords="offset points", va="center",
            fontsize=8,
        )  # fmt: skip
    ax_tok.set_yticks(x, [r["name"] for r in rows], fontsize=8)
    ax_tok.invert_yaxis()
    ax_tok.set_xscale("log")
    ax_tok.set_xlim(min(kib) / 2, max(kib) * 2)
    ax_tok.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_log_tick))
    ax_tok.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_log_tick))
    ax_tok.set_xlabel("cache per token, any context (KiB, log scale)")
    ax_tok.grid(True, which="both", alpha=0.3)
    fig.suptitle(real_model_cache_title(real, context))
    return fig


def plot_decode_attention(picture: dict) -> plt.Figure:
    """decode_attention.png: a cached decode step computes one score row, not the square."""
    weights = np.array(picture["weights"])
    n = weights.shape[0]
    # Each row is scaled by its own largest weight: row 0 is a single 1.0, the last row spreads
    # ~1/n over n keys, and one shared scale would paint the row this figure is about dark.
    relative = weights / weights.max(axis=1, keepdims=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 6.2), layout="constrained")
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("lightgrey")
    no_cache = np.ma.masked_where(np.triu(np.ones((n, n)), k=1) == 1, relative)
    with_cache = np.ma.masked_all((n, n))
    with_cache[-1] = relative[-1]
    titles = (
        f"No cache: all {n}x{n} scores (and every K, V)\nrecomputed to use the last row;\n"
        f"grey: masked (future keys)",
        f"With cache: one query row against {n} keys;\nK, V of tokens 0..{n - 2} come from the "
        f"cache;\ngrey: not computed in this step",
    )
    for ax, data, title in zip(axes, (no_cache, with_cache), titles, strict=True):
        image = ax.imshow(data, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xlabel("key position j (token index)")
        ax.set_ylabel("query position i (token index)")
        ax.set_xticks(range(0, n, 2))
        ax.set_yticks(range(0, n, 2))
    axes[1].annotate(
        f"query of the new token (row {n - 1})",
        xy=((n - 1) / 2, n - 1.5),  # the top edge of the last row, mid-way along it
        xytext=((n - 1) / 2, n - 5),
        ha="center",
        arrowprops=dict(arrowstyle="->"),
    )
    fig.colorbar(image, ax=axes, label="attention weight / its row's largest (each row sums to 1)")
    fig.suptitle(
        f"What one decode step computes (layer {picture['layer']}, head {picture['head']})"
    )
    return fig


def plot_figures(results: dict) -> dict:
    """Every figure of the run, by PNG name."""
    return {
        "decode_time": plot_decode_time(results["decode"], results["scaling"]),
        "cumulative_time": plot_cumulative_time(results["decode"]),
        "cache_vs_context": plot_cache_vs_context(results["memory"]),
        "real_model_cache": plot_real_model_cache(results["real_models"]),
        "decode_attention": plot_decode_attention(results["attention_picture"]),
    }


# =============================================================================
# 6. Main: flags, sizes, printed tables, the stages
# =============================================================================


def _hf_model(text: str) -> str:
    try:
        check_hf_checkpoint(text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser()
    parser.add_argument(
        "--hf-model",
        type=_hf_model,
        default=None,
        metavar="NAME",
        help="also generate real text with this Hugging Face GPT-2 (a name such as gpt2, or a "
        "local checkpoint folder), from local files only; skipped with one line if transformers "
        "or the weights are missing (default: none)",
    )
    return parse_flags(parser, argv)


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
N_STAGES = 6


def print_config(config: dict) -> None:
    print(
        f"model: {config['n_layers']} layers, d_model {config['d_model']}, {config['n_heads']} "
        f"heads, vocab {config['vocab_size']}, {config['n_params'] / 1e6:.2f}M parameters"
    )


def print_correctness(c: dict) -> None:
    """Stage 1: cached vs uncached logits and ids, chunked prefill, explicit vs SDPA."""
    print(f"  {c['n_new_tokens']} greedy tokens after {_a_tokens(c['prompt_len'])} prompt")
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
    print(f"  explicit softmax vs SDPA: max |logit diff| {c['max_abs_err_explicit_vs_sdpa']:.2e}")


def print_decode(b: dict, s: dict) -> None:
    """Stage 2: per-step times (median and range over rounds), FLOPs, generation time."""
    print(
        f"  {'context':>8s} {'no cache (ms)':>24s} {'concat (ms)':>24s} {'static (ms)':>24s}"
        f"   {'GFLOP no cache':>14s} {'GFLOP cached':>12s}"
    )
    for i, n in enumerate(s["kv_lens"]):
        cells = [
            f"{b['step_ms'][m][i]:7.3f} ({b['step_ms_lo'][m][i]:.2f}-{b['step_ms_hi'][m][i]:.2f})"
            for m in METHODS
        ]
        flops = [s["flops_per_step"][m][i] / 1e9 for m in ("no_cache", "static")]
        print(
            f"  {n:8d} "
            + " ".join(f"{c:>24s}" for c in cells)
            + f"   {flops[0]:14.4f} {flops[1]:12.4f}"
        )
    print(
        f"  generating {b['n_new_tokens']} tokens, estimated (prefill {b['prefill_ms']:.2f} ms + "
        f"step times at {len(b['positions'])} contexts, interpolated):"
    )
    for m in METHODS:
        sl = s["fitted_slope_spread"][m]
        print(
            f"    {m:8s} {b['generation_s'][m]:7.3f} s  {b['tokens_per_s'][m]:8.1f} tokens/s  "
            f"log-log slope {s['fitted_slope'][m]:5.2f} (rounds {sl['lo']:.2f} to {sl['hi']:.2f})"
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
        f"{cc['bytes_copied_per_step'] / 2**20:.1f} MiB of cached K, V into new tensors; "
        f"cache updates alone: concat {cc['update_ms']['concat']:.3f} ms, static "
        f"{cc['update_ms']['static']:.3f} ms ({cc['extra_ms']:+.3f} ms)"
    )
    gib = 2**30
    print(
        f"  at scale: Llama-2-7B, bf16, {cc['llama_2_7b_weight_bytes'] / gib:.1f} GiB of weights:"
    )
    for r in cc["llama_2_7b"]:
        print(
            f"    {r['context'] // 1024:3d}K tokens: copies "
            f"{r['bytes_copied_per_step'] / gib:4.1f} GiB per step -> memory-bound concat/static "
            f"{r['memory_bound_concat_vs_static_ratio']:.2f}x"
        )


def print_memory(mem: dict, real: dict) -> None:
    """Stage 3: measured vs formula cache bytes, then released models' cache sizes."""
    print(f"  {'dtype':>8s} {'tokens':>7s} {'static':>11s} {'concat':>11s} {'formula':>11s}")
    for r in mem["rows"]:
        mib = [r[key] / 2**20 for key in ("static_bytes", "concat_bytes", "formula_bytes")]
        print(f"  {r['dtype']:>8s} {r['seq_len']:7d} " + " ".join(f"{x:7.3f} MiB" for x in mib))
    print(f"  measured equals formula: {mem['measured_equals_formula']}")
    print("  released models, one sequence in bf16:")
    print(
        f"  {'model':>18s} {'type':>4s} {'per token':>11s} "
        + " ".join(f"{n // 1024:>8d}K" for n in real["contexts"])
        + "  (vs MHA with the same heads)"
    )
    for r in real["rows"]:
        sizes = [r["at_context_bytes"][str(n)] / 2**30 for n in real["contexts"]]
        print(
            f"  {r['name']:>18s} {r['kind']:>4s} {r['per_token_bytes'] / 2**10:7.1f} KiB "
            + " ".join(f"{x:5.2f} GiB" for x in sizes)
            + (
                f"  {r['mha_equivalent_per_token_bytes'] / r['per_token_bytes']:.0f}x smaller"
                if r["kind"] != "MHA"
                else ""
            )
        )


def print_bandwidth(bw: dict) -> None:
    """Stage 4: machine bandwidth and what share of it a decode step achieves."""
    again = (
        " (measured twice: a step beat the first measurement)" if bw["bandwidth_remeasured"] else ""
    )
    print(
        f"  this machine: copy {bw['copy_bandwidth_gb_per_s']:.1f} GB/s, matrix-vector product "
        f"{bw['matvec_bandwidth_gb_per_s']:.1f} GB/s{again}, "
        f"matmul {bw['matmul_gflops_per_s']:.1f} GFLOP/s"
    )
    for r in bw["models"]:
        u, m = r["bandwidth_utilisation_ratio"], r["matvec_utilisation_ratio"]
        share = f"{u:.0%} of copy and {m:.0%} of matvec bandwidth" if u is not None else "n/a"
        print(
            f"  {r['name']}: reads {r['bytes_read_per_step'] / 2**20:.1f} MiB per step "
            f"({r['weight_bytes'] / 2**20:.1f} weights + {r['cache_bytes'] / 2**20:.2f} cache) "
            f"in {r['step_ms']:.2f} ms = {r['achieved_gb_per_s']:.1f} GB/s, {share}"
        )
        if r["utilisation_note"]:
            print(f"    {r['utilisation_note']}")
        o = r["overhead_share_ratio"]
        share = f"{o:.0%} of the step" if o is not None else "not below the step: timing noise"
        print(
            f"    same operators at tiny widths: {r['overhead_ms']:.2f} ms ({share}); floors: "
            f"memory {r['memory_floor_ms']:.2f} ms, arithmetic {r['compute_floor_ms']:.2f} ms "
            f"-> main cost: {r['main_cost']}"
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
        f"(cache {_range(hf['speedup_cache_vs_no_cache_spread'], '.1f')} faster)"
    )


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    size = SIZES["quick" if args.quick else "default"]
    results: dict = {"meta": run_meta(args, device)}
    model = GPT(size["config"]).to(device).eval()
    results["config"] = model_summary(model)
    print_config(results["config"])

    print(f"[1/{N_STAGES}] checking correctness: cached vs uncached generation ...")
    prompt = torch.randint(model.config.vocab_size, (1, size["prompt_len"]), generator=gen)
    results["correctness"] = check_correctness(model, prompt.to(device), size["correctness_tokens"])
    print_correctness(results["correctness"])

    print(f"[2/{N_STAGES}] benchmarking decode steps at {size['n_points']} positions ...")
    sweep = (size["prompt_len"], size["total_len"], size["n_points"], size["min_run_time"])
    results["decode"] = benchmark_decode(model, *sweep, args.seed)
    results["scaling"] = scaling_analysis(model.config, results["decode"])
    print_decode(results["decode"], results["scaling"])
    results["concat_cost"] = concat_cost_analysis(model, results["decode"], size["min_run_time"])
    print_concat_cost(results["concat_cost"])

    print(f"[3/{N_STAGES}] measuring cache memory ...")
    results["memory"] = measure_memory(model.config, size["memory_lengths"])
    results["real_models"] = real_model_cache_table()
    print_memory(results["memory"], results["real_models"])

    print(f"[4/{N_STAGES}] measuring memory bandwidth of a decode step ...")
    models = {"demo model": model, size["big"][0]: GPT(size["big"][1]).to(device).eval()}
    results["bandwidth"] = bandwidth_analysis(
        models, size["bandwidth_context"], size["copy_bytes"], size["min_run_time"], args.seed
    )
    print_bandwidth(results["bandwidth"])

    print(f"[5/{N_STAGES}] Hugging Face GPT-2 demo, then the claims ...")
    results["hf_demo"] = hf_demo(args.hf_model, device, 32, size["min_run_time"])
    print_hf_demo(results["hf_demo"])
    measured = (results["decode"], results["scaling"], results["concat_cost"])
    results["claims"] = decode_claims(*measured, results["bandwidth"])
    print_claims(results["claims"])

    print(f"[6/{N_STAGES}] drawing figures ...")
    picture_ids = torch.randint(model.config.vocab_size, (1, 12), generator=gen).to(device)
    results["attention_picture"] = attention_picture(model, picture_ids)
    save_outputs(args.out, plot_figures(results), results, show=not args.no_show)
    return results


# =============================================================================
# 7. Plumbing (identical in every script)
# =============================================================================

BENCHMARK_THREADS = 1  # threads median_time_s times with, recorded in results.json


def median_time_s(fn, min_run_time: float = 0.2) -> float:
    """Median seconds per call of ``fn()`` by ``torch.utils.benchmark`` (warm-up, device sync).

    One thread: the small kernels timed here give steadier numbers on one core than when threads
    must synchronise, and the ratios, not the speed, are the point.
    """
    # Imported here (slow to import). It imports cpp_extension, which logs "No CUDA runtime is
    # found" on machines with a CUDA toolkit but no GPU: noise for these timings.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=BENCHMARK_THREADS)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| (broadcast), computed in float64; 0.0 when there is nothing to compare."""
    diff = a.double() - b.double()
    return diff.abs().max().item() if diff.numel() else 0.0


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


def run_meta(args: argparse.Namespace, device: torch.device) -> dict:
    """The ``meta`` block of results.json: which script, which flags, which machine."""
    return {
        "script": Path(__file__).name,
        "quick": args.quick,
        "seed": args.seed,
        **machine_info(device),
    }


def positive_int(text: str) -> int:
    """argparse type for counts (``--steps``): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 2**63)")
    return value


def _device(text: str) -> str:
    if text not in ("auto", "cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda, mps")
    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def base_parser() -> argparse.ArgumentParser:
    """The flags every script shares; a script adds its own, then calls ``parse_flags``."""
    stem = Path(__file__).stem
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes, a fast check; writes to figures/{stem}/quick/ unless --out is given",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder for the PNG figures and results.json (default: figures/{stem}/)",
    )
    parser.add_argument("--no-show", action="store_true", help="do not open figure windows")
    parser.add_argument(
        "--device",
        type=_device,
        default="auto",
        metavar="{auto,cpu,cuda,mps}",
        help="auto, cpu, cuda or mps; auto picks cuda, then mps, then cpu (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=_seed, default=0, help="random seed, in [0, 2**63) (default: %(default)s)"
    )
    return parser


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, fill in ``--out``, and refuse an output folder that cannot be written (exit 2)."""
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("figures") / Path(__file__).stem / ("quick" if args.quick else "")
    existing = args.out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == args.out and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} exists and is not a directory")
    try:  # the one sure test of writability: make (and remove) a folder there
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError:
        parser.error(f"argument --out: cannot write in {existing}")
    return args


def interactive_backend() -> bool:
    """True when matplotlib can open windows (so ``plt.show()`` would not warn)."""
    from matplotlib.backends import BackendFilter, backend_registry

    interactive = backend_registry.list_builtin(BackendFilter.INTERACTIVE)
    return matplotlib.get_backend().lower() in [name.lower() for name in interactive]


def save_outputs(
    out: Path, figures: dict, results: dict, show: bool, files: dict | None = None
) -> None:
    """Write every figure as ``<name>.png``, any other ``files`` (name -> bytes) and
    ``results.json`` into ``out``, all or nothing.

    Everything is first written into a hidden folder inside ``out`` and then moved into place,
    results.json last: a run that fails leaves no half-written output, and a results.json that
    exists belongs to the files beside it. ``show`` opens the figures when a window can open.
    """
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=out))
    try:
        for name, fig in figures.items():
            fig.savefig(staging / f"{name}.png", dpi=120)
        for name, data in (files or {}).items():
            (staging / name).write_bytes(data)
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        names = [f"{name}.png" for name in figures] + list(files or {}) + ["results.json"]
        for file_name in names:
            os.replace(staging / file_name, out / file_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"saved {len(figures)} figures and results.json to {out}/")
    if show and interactive_backend():
        plt.show()
    plt.close("all")


if __name__ == "__main__":
    main()
