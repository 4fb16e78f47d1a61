"""Grouped-query attention: MHA, GQA and MQA with a KV cache, copy-free head sharing, decode speed.

The problem
-----------
Generating a token reads the whole key/value cache of every layer. With multi-head attention
(MHA) the cache stores one key and one value vector per head, per layer, per token:
``2 * n_layers * n_heads * head_dim`` numbers per token. For Llama-2-70B's shape (80 layers,
64 heads of 128 dimensions) in bf16 that is 2.5 MiB per token, 320 GiB at a 128K context:
more than the weights, more than any single GPU. And decoding is memory-bound (the time goes
into reading memory, not into arithmetic): each step does about one multiply-add per cached
number it reads, so time per token grows with cache bytes.

The idea
--------
Let several query heads share one key/value head. Multi-query attention (MQA, Shazeer 2019)
keeps a single KV head for all query heads; grouped-query attention (GQA, Ainslie et al. 2023)
keeps ``n_kv_heads`` of them, each read by a group of ``group = n_heads / n_kv_heads`` query
heads. The cache shrinks by ``group`` while the number of query heads, and so the attention
FLOPs, stay the same: each key loaded from memory serves ``group`` queries, so the arithmetic
intensity of decoding (FLOPs per byte read) rises by ``group``. MHA (``n_kv_heads = n_heads``)
and MQA (``n_kv_heads = 1``) are the two ends of GQA. A trained MHA checkpoint can be turned
into GQA by mean-pooling the key and value projection heads of each group, then briefly
"uptraining" (continuing training for a few percent of the original steps).

The math
--------
x: (batch, seq_len, d_model). Query head h in 0..n_heads-1 reads KV head j = h // group::

    (1) q_h = RoPE(x W_q,h)     k_j = RoPE(x W_k,j)     v_j = x W_v,j        (seq_len, head_dim)
    (2) o_h = softmax(q_h k_j^T / sqrt(head_dim) + causal mask) v_j,   j = h // group
    (3) y   = concat(o_0 .. o_{n_heads-1}) W_o

    (4) KV cache bytes = 2 * n_layers * batch * n_kv_heads * seq_len * head_dim * bytes_per_number
    (5) attention FLOPs per decode step and layer = 4 * batch * n_heads * seq_len * head_dim
        (q.k over the cached keys and probs.v over the cached values, 2 FLOPs per multiply-add)
    (6) arithmetic intensity = (5) / (4) per layer = 2 * group / bytes_per_number
        (= group FLOP/byte in bf16: MHA sits at 1, GQA-8 at 8)

Three ways for a group of query heads to read one KV head, all equal (tested):

- ``repeat_kv``: ``k[:, :, None].expand(b, n_kv, group, T, d)`` is a view (stride 0 along the
  group), but the ``reshape`` to ``(b, n_heads, T, d)`` cannot be a view, so it allocates and
  fills ``group`` copies of the cached keys, and again of the values, on every step: a
  temporary as large as the layer's whole MHA cache, written and then read again. Two
  exceptions, both measured: with ``group == 1`` (MHA) there is nothing to repeat, and with
  ``n_kv_heads == 1`` (MQA) the reshape only merges a size-1 dimension into the stride-0 one,
  so it stays a view. This is what ``transformers``' eager attention and Meta's
  ``llama/model.py`` do.
- ``grouped``: view the queries as ``(b, n_kv, group, q_len, d)`` and fold the group into the
  query rows, ``(b, n_kv, group * q_len, d)``, so one matmul per KV head multiplies all of its
  query rows by the cached keys themselves. The keys and values are never copied. For a decode
  step (q_len = 1) the query reshape is a view too; for a multi-token chunk it copies the
  queries (the size of the new tokens, not of the cache). Do not let ``torch.matmul`` broadcast a
  size-1 group dimension of ``k`` instead: matmul expands the broadcast batch dimensions and
  reshapes them for ``bmm``, which silently makes the same ``group`` copies (measured in the
  tests).
- ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` (torch >= 2.5). Whether
  it copies depends on the kernel it picks: a fused kernel that supports GQA (on a CPU, the flash
  kernel) reads KV head ``h // group`` in place; the reference "math" fallback copies k and v
  out to n_heads heads, like ``repeat_kv`` (both measured in the tests). The script records
  which kernel ran and what it allocated on your machine.

Memory is measured, not assumed: ``AllocationTracker`` (a ``TorchDispatchMode``: torch calls it
for every ATen operator) records each new tensor storage a step allocates (bytes, operator) and
the peak of the live total. A fused kernel's private scratch space, freed before it returns, is
not seen. Its first use costs about 3 s of start-up (torch imports ``torch._dynamo`` then).

Decode times are medians over rounds in which MHA, GQA and MQA are timed back to back, so one
slow call or a burst of background load cannot set a ratio; the spread between rounds is
printed, and more rounds are run while it is larger than the difference being measured.

Where it is used
----------------
MQA: PaLM, Falcon-7B, StarCoder. GQA: Llama-2-70B, Llama-3 (all sizes), Mistral-7B, Mixtral,
Qwen2, Gemma-2 and most open models since 2023. (DeepSeek-V2/V3 compress the cache differently,
with a latent: see ``multihead_latent_attention.py``; ``kv_caching.py`` compares the caches of
released models.)

Run it
------
    uv run python grouped_query_attention.py           # default sizes (the README gives the time)
    uv run python grouped_query_attention.py --quick   # small sizes, a fast check
    uv run python grouped_query_attention.py --out DIR --no-show --device cpu --seed 0

It prints each check and measurement, saves every figure as PNG and every printed number in
``results.json`` under ``--out`` (default ``figures/grouped_query_attention/``).

References
----------
- Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
  Checkpoints", 2023, arXiv 2305.13245 (sections 2.1-2.2: mean-pooling conversion, uptraining).
- Shazeer, "Fast Transformer Decoding: One Write-Head is All You Need", 2019, arXiv 1911.02150.
- Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021,
  arXiv 2104.09864.
- Touvron et al., "Llama 2", 2023, arXiv 2307.09288 (Llama-2-70B's shape, in
  ``LLAMA2_70B_SHAPE``).
- Reference code: huggingface/transformers ``src/transformers/models/llama/modeling_llama.py``
  (``LlamaAttention``, ``repeat_kv``, ``eager_attention_forward``: same parameter names and
  half-split RoPE, tested equal); meta-llama/llama ``llama/model.py`` (``Attention`` with
  ``wq wk wv wo``, ``repeat_kv`` and a cache laid out ``(batch, seq, n_kv_heads, head_dim)``,
  interleaved RoPE).

Contents
--------
2. Core: the shared validation helpers (``_check_sizes``, ``_check_start_pos``,
   ``_check_positive``, ``_check_float_tensor``); half-split RoPE
   (``rope_inv_freq``, ``rope_cos_sin``, ``rotate_half``, ``apply_rope``); ``causal_mask``;
   ``repeat_kv`` (``_repeat_kv``: unchecked) and the three sharing methods
   (``_attention_repeat_kv``, ``_attention_grouped``, ``_attention_sdpa``, ``SHARING_METHODS``,
   ``attend``); ``GroupedQueryAttention``; the cache
   (``_check_cache_write``, ``_check_cache_tensor``, ``KVCache``); ``mha_to_gqa``.
3. Baselines and apparatus: the checks behind the core's doors (``_check_sharing``,
   ``_check_layer``, ``_check_input``, ``_check_new_cache``, ``_check_qkv``);
   ``PlainMultiHeadAttention`` (the MHA baseline), ``mha_with_similar_heads``,
   ``kv_cache_bytes``, ``LLAMA2_70B_SHAPE``, ``mib``, ``divisors_descending``, ``round_ratios``,
   ``AllocationTracker``, ``MatmulFlopCounter``, ``measure_allocations``.
4. Experiments: ``check_correctness``, ``analyze_cache_memory``, ``cache_vs_context``,
   ``benchmark_decode``, ``step_vs_cache_note``, ``analyze_conversion``, ``speedup_phrase``,
   ``claim``, ``print_claims``, ``weigh_claims``.
5. Figures: ``tokens_label``, the titles computed from the numbers (``gqa_*_title*``),
   ``plot_head_sharing``, ``plot_cache_vs_context``, ``plot_decode_time``,
   ``plot_sharing_methods``, ``plot_conversion_error``.
6. Main: ``parse_args``, ``SIZES``, the ``print_<stage>`` helpers (``_round_spread``), ``main``.
7. Plumbing (identical in every script): timer, device, machine info, flags, ``save_outputs``.

Read first: ``GroupedQueryAttention`` (its ``# NEW vs MHA:`` lines mark where it departs from
``PlainMultiHeadAttention`` in section 3), then ``repeat_kv`` and the three sharing methods side
by side, then ``mha_to_gqa``; ``AllocationTracker`` shows how the memory claims are measured.
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
import statistics
import tempfile
import textwrap
import weakref
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# =============================================================================
# 2. Core: GroupedQueryAttention, the three ways to share a KV head, the cache
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


def _check_positive(**values: float) -> None:
    """Every value (a base, a factor, an eps) must be a finite real number > 0."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} ({value!r}) must be a real number")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} ({value}) must be finite and > 0")


def _check_float_tensor(name: str, t: torch.Tensor, last_dim: int | None = None) -> None:
    """A floating-point tensor (no silent casts of ints), with ``last_dim`` features if given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} dtype ({t.dtype}) must be a floating-point dtype")
    if last_dim is not None and (t.dim() == 0 or t.shape[-1] != last_dim):
        raise ValueError(f"{name} (shape {tuple(t.shape)}) must end in {last_dim} features")


def rope_inv_freq(head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """theta_i = base^(-2i/head_dim) for i = 0 .. head_dim/2 - 1.  Shape (head_dim/2,)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / base**exponents


def rope_cos_sin(positions, head_dim, base=10000.0):
    """cos and sin of m * theta_i, each (seq_len, head_dim), half-split layout."""
    angles = torch.outer(positions.float(), rope_inv_freq(head_dim, base, positions.device))
    angles = torch.cat((angles, angles), dim=-1)  # (seq_len, head_dim)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i + d/2}) by its angle: x * cos + rotate_half(x) * sin."""
    return x * cos + rotate_half(x) * sin


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Boolean (q_len, kv_len) mask, True where query i may attend to key j.

    The queries are the last ``q_len`` of the ``kv_len`` positions (bottom-right aligned), so
    query i sits at absolute position ``kv_len - q_len + i`` and sees keys ``j <= that``.
    """
    offset = kv_len - q_len
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=offset)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, n_kv_heads, T, d) -> (batch, n_kv_heads * n_rep, T, d): KV head j becomes heads
    j*n_rep .. j*n_rep + n_rep - 1 (transformers' ``repeat_kv``). The expand is a view; the
    reshape copies when n_rep > 1 (unless n_kv_heads == 1: then it stays a view)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x (shape {tuple(x.shape)}) must be 4-D (batch, n_kv_heads, T, d)")
    _check_sizes(n_rep=n_rep)
    return _repeat_kv(x, n_rep)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """repeat_kv without the checks: the decode step's hot path (its inputs checked upstream)."""
    if n_rep == 1:
        return x
    b, n_kv, t, d = x.shape
    x = x.unsqueeze(2).expand(b, n_kv, n_rep, t, d)  # view: stride 0 along n_rep
    return x.reshape(b, n_kv * n_rep, t, d)  # a copy, n_rep times the input's size


def _attention_repeat_kv(q, k, v, mask=None):
    """Copy each KV head to its `group` query heads, then plain attention over n_heads heads.
    q (b, n_heads, q_len, d); k, v (b, n_kv_heads, kv_len, d); mask (q_len, kv_len) bool or None."""
    group = q.shape[1] // k.shape[1]
    # (b, n_heads, kv_len, d): copies the cache `group` times when group > 1
    k, v = _repeat_kv(k, group), _repeat_kv(v, group)
    q = q / math.sqrt(q.shape[-1])  # scale the q_len queries, not the kv_len scores
    scores = q @ k.transpose(-2, -1)  # (2) (b, n_heads, q_len, kv_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v  # (2) (b, n_heads, q_len, d)


def _attention_grouped(q, k, v, mask=None):
    """Group the queries by KV head so each KV head is multiplied as is: no copy of k or v.
    Query head h = j * group + r reads KV head j: viewing the heads as (n_kv_heads, group) and
    folding (group, q_len) into rows makes each KV head one plain (kv_len, d) matmul operand."""
    b, h, s, d = q.shape
    n_kv, t = k.shape[1], k.shape[2]
    group = h // n_kv
    q = q.view(b, n_kv, group, s, d)  # (b, n_kv_heads, group, q_len, d): a view
    q = q.reshape(b, n_kv, group * s, d) / math.sqrt(d)  # reshape: a view when q_len == 1
    scores = q @ k.transpose(-2, -1)  # (2) (b, n_kv_heads, group * q_len, kv_len)
    scores = scores.view(b, n_kv, group, s, t)  # (b, n_kv_heads, group, q_len, kv_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # (q_len, kv_len) broadcasts
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    out = probs.view(b, n_kv, group * s, t) @ v  # (2) (b, n_kv_heads, group * q_len, d)
    return out.view(b, h, s, d)  # (b, n_heads, q_len, d): head j * group + r, a view


def _attention_sdpa(q, k, v, mask=None):
    """PyTorch's fused attention; enable_gqa=True lets n_heads query heads share n_kv_heads."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (2)


SHARING_METHODS = {
    "repeat_kv": _attention_repeat_kv,
    "grouped": _attention_grouped,
    "sdpa": _attention_sdpa,
}


def attend(q, k, v, mask=None, sharing: str = "grouped") -> torch.Tensor:
    """Attention of q (b, n_heads, q_len, d) over k, v (b, n_kv_heads, kv_len, d) by `sharing`;
    mask (q_len, kv_len) bool, True where a query may see a key (None: every key)."""
    _check_qkv(q, k, v, mask)
    _check_sharing(sharing)
    return SHARING_METHODS[sharing](q, k, v, mask)


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): n_heads query heads share n_kv_heads KV heads.

    n_kv_heads == n_heads is MHA, n_kv_heads == 1 is MQA. Parameters as transformers'
    ``LlamaAttention`` (a Llama layer's state_dict loads with ``strict=True``), half-split RoPE.
    ``max_seq_len``: the longest sequence it accepts. ``sharing``: how a group of query heads
    reads its KV head, "grouped" (copy-free), "repeat_kv" (copies, as transformers) or "sdpa".

    >>> attn = GroupedQueryAttention(64, n_heads=8, n_kv_heads=2, max_seq_len=16)
    >>> x = torch.randn(1, 5, 64)  # (batch, seq_len, d_model)
    >>> attn(x).shape
    torch.Size([1, 5, 64])
    >>> cache = attn.new_cache(batch_size=1)
    >>> cache.k_cache.shape  # (batch, n_kv_heads, max_seq_len, head_dim): 2 KV heads, not 8
    torch.Size([1, 2, 16, 8])
    >>> prefill = attn(x[:, :4], 0, cache)  # the first 4 tokens, written to the cache
    >>> attn(x[:, 4:], 4, cache).shape  # decode the 5th token at position 4
    torch.Size([1, 1, 64])
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int | None = None,
        *,
        max_seq_len: int,
        rope_base: float = 10000.0,
        bias: bool = False,
        sharing: str = "grouped",
    ) -> None:
        super().__init__()
        self.head_dim = d = _check_layer(
            d_model, n_heads, n_kv_heads, head_dim, max_seq_len, rope_base, bias
        )
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.group = n_heads // n_kv_heads  # NEW vs MHA: query heads per KV head
        self.max_seq_len, self.rope_base = max_seq_len, rope_base
        self.sharing = sharing  # checked by the setter below
        self.q_proj = nn.Linear(d_model, n_heads * d, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * d, bias=bias)  # NEW vs MHA: n_kv_heads
        self.v_proj = nn.Linear(d_model, n_kv_heads * d, bias=bias)  # NEW vs MHA: n_kv_heads
        self.o_proj = nn.Linear(n_heads * d, d_model, bias=bias)

    @property
    def sharing(self) -> str:
        return self._sharing

    @sharing.setter
    def sharing(self, value: str) -> None:
        _check_sharing(value)
        self._sharing = value

    def new_cache(self, batch_size: int, max_seq_len=None, dtype=None, device=None) -> KVCache:
        """An empty cache for this layer; max_seq_len, dtype and device default to the layer's."""
        max_seq_len = _check_new_cache(self, max_seq_len, dtype)
        w = self.k_proj.weight
        dtype, device = w.dtype if dtype is None else dtype, w.device if device is None else device
        # NEW vs MHA: n_kv_heads heads are cached, not n_heads: (4) shrinks by `group`
        return KVCache(batch_size, self.n_kv_heads, max_seq_len, self.head_dim, dtype, device)

    def forward(
        self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None
    ) -> torch.Tensor:
        """x (batch, seq_len, d_model) at positions start_pos.. -> (batch, seq_len, d_model).
        With a cache, k and v are written at start_pos and query i (position start_pos + i) sees
        keys 0..start_pos + i through an offset causal mask (one new token needs no mask)."""
        _check_input(self, x, start_pos, cache)
        b, s, _ = x.shape
        d = self.head_dim
        # (1) q: (batch, n_heads, seq_len, head_dim)
        q = self.q_proj(x).view(b, s, self.n_heads, d).transpose(1, 2)
        # (1) NEW vs MHA: k, v (batch, n_kv_heads, seq_len, head_dim), all that is cached
        k = self.k_proj(x).view(b, s, self.n_kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, d).transpose(1, 2)
        positions = torch.arange(start_pos, start_pos + s, device=x.device)
        cos, sin = rope_cos_sin(positions, d, self.rope_base)  # (seq_len, head_dim)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (1) RoPE
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # (batch, n_kv_heads, start_pos + s, head_dim)
        mask = None if s == 1 else causal_mask(s, k.shape[2], x.device)
        # NEW vs MHA: query head h reads KV head h // group, by the chosen sharing method
        out = SHARING_METHODS[self.sharing](q, k, v, mask)  # (2) (batch, n_heads, s, head_dim)
        out = out.transpose(1, 2).reshape(b, s, self.n_heads * d)  # (batch, s, n_heads * d)
        return self.o_proj(out)  # (3)


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
    """Pre-allocated keys and values of one attention layer (Meta's llama, gpt-fast).

    ``k_cache`` and ``v_cache`` are ``(batch, n_kv_heads, max_seq_len, head_dim)`` buffers
    (``n_kv_heads = n_heads`` without grouped-query attention), allocated once. ``update`` copies
    the new keys/values into positions ``start_pos : start_pos + n`` in place and returns *views*
    of the filled prefix: no allocation and no copy of the old entries, whatever the context.
    Writing at ``start_pos < length`` rewinds: positions after ``start_pos + n`` no longer count.

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


def mha_to_gqa(attn: nn.Module, n_kv_heads: int) -> GroupedQueryAttention:
    """Convert a multi-head (or finer grouped) layer to n_kv_heads KV heads by mean-pooling.

    Ainslie et al. 2023, sections 2.1-2.2: new KV head i is the mean of the r = (source
    n_kv_heads) / n_kv_heads source heads its query heads read, W_k,i = (1/r) sum_{m<r}
    W_k,(i*r + m), the same for W_v (pooling before RoPE = pooling the rotated keys: RoPE is
    linear). q_proj, o_proj (and a grouped source's ``sharing``) are copied. Exact when each
    group's heads are identical.
    """
    if not isinstance(attn, (GroupedQueryAttention, PlainMultiHeadAttention)):
        raise TypeError(f"attn must be an attention layer of this file, not {type(attn).__name__}")
    _check_sizes(n_kv_heads=n_kv_heads)
    src_kv = attn.n_kv_heads
    if n_kv_heads > src_kv or src_kv % n_kv_heads:
        raise ValueError(
            f"n_kv_heads ({n_kv_heads}) must divide the source layer's n_kv_heads ({src_kv})"
        )
    d, r = attn.head_dim, src_kv // n_kv_heads
    has_bias = attn.q_proj.bias is not None
    out = GroupedQueryAttention(
        attn.d_model,
        attn.n_heads,
        n_kv_heads,
        head_dim=d,
        max_seq_len=attn.max_seq_len,
        rope_base=attn.rope_base,
        bias=has_bias,
        sharing=getattr(attn, "sharing", "grouped"),  # PlainMultiHeadAttention has none
    ).to(device=attn.q_proj.weight.device, dtype=attn.q_proj.weight.dtype)
    with torch.no_grad():
        out.q_proj.load_state_dict(attn.q_proj.state_dict())
        out.o_proj.load_state_dict(attn.o_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(attn, name), getattr(out, name)
            # (n_kv_heads * r * head_dim, d_model) -> (n_kv_heads, r, head_dim, d_model)
            w = src.weight.view(n_kv_heads, r, d, attn.d_model)
            dst.weight.copy_(w.mean(dim=1).reshape(n_kv_heads * d, attn.d_model))
            if has_bias:
                dst.bias.copy_(src.bias.view(n_kv_heads, r, d).mean(dim=1).reshape(-1))
    return out


# =============================================================================
# 3. Baselines and apparatus: plain MHA, cost formulas, allocation and FLOP counters
# =============================================================================


# ---- The checks behind the doors of section 2 (constructors, forward, new_cache, attend) ----


def _check_sharing(sharing: str) -> None:
    """One of the three sharing methods, by name."""
    if not isinstance(sharing, str):
        raise TypeError(f"sharing ({sharing!r}) must be a str")
    if sharing not in SHARING_METHODS:
        choices = ", ".join(repr(name) for name in SHARING_METHODS)
        raise ValueError(f"sharing ({sharing!r}) must be one of {choices}")


def _check_layer(d_model, n_heads, n_kv_heads, head_dim, max_seq_len, rope_base, bias) -> int:
    """The constructor arguments of an attention layer; returns head_dim."""
    _check_sizes(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, max_seq_len=max_seq_len)
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
    if head_dim is None and d_model % n_heads:
        raise ValueError(
            f"d_model ({d_model}) must be divisible by n_heads ({n_heads}) (or give head_dim)"
        )
    head_dim = d_model // n_heads if head_dim is None else head_dim
    _check_sizes(head_dim=head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim ({head_dim}) must be even (RoPE rotates pairs)")
    _check_positive(rope_base=rope_base)
    if rope_base <= 1:
        raise ValueError(f"rope_base ({rope_base}) must be > 1 (so frequencies fall with i)")
    if not isinstance(bias, bool):
        raise TypeError(f"bias ({bias!r}) must be a bool")
    return head_dim


def _check_input(layer: nn.Module, x: torch.Tensor, start_pos: int, cache) -> None:
    """forward's door: x (batch, seq_len, d_model) like the weights, within max_seq_len, a cache
    that fits."""
    _check_float_tensor("x", x, layer.d_model)
    w = layer.q_proj.weight
    if x.dim() != 3 or (x.dtype, x.device) != (w.dtype, w.device):
        raise ValueError(
            f"x ({x.dtype} on {x.device}, shape {tuple(x.shape)}) must be 3-D and "
            f"match the weights ({w.dtype} on {w.device})"
        )
    _check_start_pos(start_pos)
    if start_pos + x.shape[1] > layer.max_seq_len:
        raise ValueError(
            f"start_pos + seq_len ({start_pos} + {x.shape[1]}) must be <= "
            f"max_seq_len ({layer.max_seq_len})"
        )
    if cache is None:
        return
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    have = (cache.batch_size, cache.n_kv_heads, cache.head_dim, cache.k_cache.dtype)
    want = (len(x), layer.n_kv_heads, layer.head_dim, x.dtype)
    if have != want:
        raise ValueError(f"cache (batch, n_kv_heads, head_dim, dtype) {have} must be {want}")


def _check_new_cache(layer: nn.Module, max_seq_len, dtype) -> int:
    """new_cache's door: returns max_seq_len (None: the layer's)."""
    max_seq_len = layer.max_seq_len if max_seq_len is None else max_seq_len
    _check_sizes(max_seq_len=max_seq_len)
    if max_seq_len > layer.max_seq_len:
        raise ValueError(
            f"max_seq_len ({max_seq_len}) must be <= the layer's ({layer.max_seq_len})"
        )
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype ({dtype!r}) must be a torch.dtype")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype ({dtype}) must be a floating-point dtype")
    return max_seq_len


def _check_qkv(q, k, v, mask) -> None:
    """attend's door: q, k, v floating 4-D tensors that fit together, and the mask."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float_tensor(name, t)
        if t.dim() != 4 or (t.dtype, t.device) != (q.dtype, q.device):
            raise ValueError(f"{name} ({t.dtype}, shape {tuple(t.shape)}) must be 4-D, like q")
    if (
        v.shape != k.shape
        or 0 in (q.shape[1], k.shape[1])
        or q.shape[1] % k.shape[1]
        or ((q.shape[0], q.shape[3]) != (k.shape[0], k.shape[3]))
    ):
        raise ValueError(
            f"k, v {tuple(k.shape)}, {tuple(v.shape)} must be alike, with q's batch "
            f"and head_dim and a number of heads that divides q's {q.shape[1]}"
        )
    if mask is not None and (
        not isinstance(mask, torch.Tensor)
        or mask.dtype != torch.bool
        or mask.shape != (q.shape[2], k.shape[2])
        or not mask.any(-1).all()
    ):
        raise ValueError(
            f"mask must be bool (q_len, kv_len) = ({q.shape[2]}, {k.shape[2]}) "
            f"with a visible key in every row"
        )


class PlainMultiHeadAttention(nn.Module):
    """The baseline: every query head has its own key/value head (Vaswani et al. 2017), with RoPE.

    Written plainly, with no head sharing, so the grouped module can be tested against it.
    Parameter names follow Llama (q_proj k_proj v_proj o_proj).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        max_seq_len: int,
        rope_base: float = 10000.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim = _check_layer(d_model, n_heads, n_heads, None, max_seq_len, rope_base, bias)
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_heads
        self.max_seq_len, self.rope_base = max_seq_len, rope_base
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)

    def new_cache(self, batch_size: int, max_seq_len=None, dtype=None, device=None) -> KVCache:
        """A cache for this layer: n_heads key/value heads (the full MHA size)."""
        max_seq_len = _check_new_cache(self, max_seq_len, dtype)
        w = self.k_proj.weight
        dtype, device = w.dtype if dtype is None else dtype, w.device if device is None else device
        return KVCache(batch_size, self.n_heads, max_seq_len, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None):
        """x (batch, seq_len, d_model) at positions start_pos.. -> (batch, seq_len, d_model)."""
        _check_input(self, x, start_pos, cache)
        b, s, _ = x.shape
        h, d = self.n_heads, self.head_dim
        q = self.q_proj(x).view(b, s, h, d).transpose(1, 2)  # (batch, n_heads, seq_len, head_dim)
        k = self.k_proj(x).view(b, s, h, d).transpose(1, 2)  # (batch, n_heads, seq_len, head_dim)
        v = self.v_proj(x).view(b, s, h, d).transpose(1, 2)  # (batch, n_heads, seq_len, head_dim)
        positions = torch.arange(start_pos, start_pos + s, device=x.device)
        cos, sin = rope_cos_sin(positions, d, self.rope_base)  # (seq_len, head_dim)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # (batch, n_heads, start_pos + seq_len, head_dim)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (batch, n_heads, seq_len, kv_len)
        scores = scores.masked_fill(~causal_mask(s, k.shape[2], x.device), float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = probs @ v  # (batch, n_heads, seq_len, head_dim)
        out = out.transpose(1, 2).reshape(b, s, h * d)  # (batch, seq_len, n_heads * head_dim)
        return self.o_proj(out)


def mha_with_similar_heads(
    d_model: int, n_heads: int, group_size: int, noise: float, device=None
) -> PlainMultiHeadAttention:
    """An MHA layer whose key/value heads within each group of `group_size` heads are
    base + noise * N(0, std of the init): noise=0 makes them identical (the case where pooling is
    exact), small noise makes them similar (the case uptraining relies on)."""
    mha = PlainMultiHeadAttention(d_model, n_heads, max_seq_len=64).to(device)
    _check_sizes(group_size=group_size)
    if n_heads % group_size:
        raise ValueError(f"group_size ({group_size}) must divide n_heads ({n_heads})")
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not 0 <= noise < math.inf:
        raise ValueError(f"noise ({noise!r}) must be a finite number >= 0")
    d = mha.head_dim
    with torch.no_grad():
        for proj in (mha.k_proj, mha.v_proj):
            w = proj.weight.view(n_heads, d, d_model)  # (n_heads, head_dim, d_model)
            base = w[::group_size].clone()  # (n_groups, head_dim, d_model)
            heads = base.repeat_interleave(group_size, dim=0)  # (n_heads, head_dim, d_model)
            w.copy_(heads + noise * w.std() * torch.randn_like(heads))
    return mha


def kv_cache_bytes(
    n_layers: int, batch_size: int, n_kv_heads: int, seq_len: int, head_dim: int, bytes_per: int
) -> int:
    """2 (keys and values) * n_layers * batch * n_kv_heads * seq_len * head_dim * bytes_per."""
    return 2 * n_layers * batch_size * n_kv_heads * seq_len * head_dim * bytes_per


# Llama-2-70B: meta-llama/Llama-2-70b-hf config.json (num_hidden_layers 80, num_attention_heads
# 64, num_key_value_heads 8, hidden_size 8192 -> head_dim 128); arXiv 2307.09288.
LLAMA2_70B_SHAPE = {"n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "head_dim": 128}


def mib(n_bytes: float) -> str:
    """Bytes in MiB, or in KiB below 1 MiB (so small allocations do not print as 0.0)."""
    if n_bytes < 2**20:
        return f"{n_bytes / 2**10:,.1f} KiB"
    return f"{n_bytes / 2**20:,.1f} MiB"


def divisors_descending(n: int) -> list[int]:
    """Every n_kv_heads that divides n: n, ..., 1."""
    _check_sizes(n=n)
    return [k for k in range(n, 0, -1) if n % k == 0]


def round_ratios(slow: list[float], fast: list[float]) -> list[float]:
    """slow / fast per round (a speed-up, bigger is better), each from two times taken moments
    apart in one round: load that drifts between rounds cancels."""
    if len(slow) != len(fast) or not slow:
        raise ValueError(f"slow and fast (lengths {len(slow)}, {len(fast)}) must be equal, >= 1")
    if min(slow) <= 0 or min(fast) <= 0:
        raise ValueError("slow and fast must hold times > 0")
    return [a / b for a, b in zip(slow, fast, strict=True)]


def _tensors(obj):
    """Every tensor inside nested tuples, lists and dicts (an operator's args or outputs)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class AllocationTracker(TorchDispatchMode):
    """Measure the memory an operation allocates, on any device, CPU included.

    While active, every ATen operator call passes through ``__torch_dispatch__``. Each output
    tensor whose storage is new (not one of the inputs' storages, not a view of an earlier
    output) is an allocation: its bytes are added to ``live_bytes`` and subtracted when the last
    tensor using that storage is freed. Reports ``peak_bytes`` (most live at once, above what
    existed before), ``total_bytes`` (sum of all allocations) and the largest allocation with the
    operator that made it. Private scratch space inside one fused kernel is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, tensors alive]
        self.live_bytes = self.peak_bytes = self.total_bytes = 0
        self.largest_bytes, self.largest_op = 0, ""
        self.ops: list[str] = []

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # The inputs' storages before the call: an ``out=`` tensor the operator grows gets new
        # memory (a new data_ptr), which is an allocation, not an in-place write.
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket.__name__))
        for t in _tensors(out):
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr in self.live:  # a view of something allocated while tracking
                self.live[ptr][1] += 1
            elif ptr in inputs or nbytes == 0:  # in place, or a view of pre-existing memory
                continue
            else:
                self.live[ptr] = [nbytes, 1]
                self.live_bytes += nbytes
                self.total_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                if nbytes > self.largest_bytes:
                    self.largest_bytes, self.largest_op = nbytes, str(func.overloadpacket.__name__)
            weakref.finalize(t, self._release, ptr)
        return out


class MatmulFlopCounter(TorchDispatchMode):
    """Count the FLOPs of every matrix multiply that actually runs (2 per multiply-add).

    Attention's FLOPs are its two batched matmuls, q.k^T and probs.v; softmax and scaling are
    O(T) per head and left out, as in formula (5). ``mm``/``bmm`` and their bias-adding forms
    ``addmm``/``baddbmm`` (a Linear with bias) are counted; a composite operator that reaches
    the mode whole (``matmul`` under ``inference_mode``) is split into the ATen calls it makes,
    so no multiply escapes. ``torch.utils.flop_counter.FlopCounterMode`` counts the same way
    (tested equal); this one shows the whole rule.
    """

    MATMULS = {  # operator -> position of the (.., m, k) operand among its arguments
        torch.ops.aten.mm: 0,  # (a, b)
        torch.ops.aten.bmm: 0,
        torch.ops.aten.addmm: 1,  # (bias, a, b)
        torch.ops.aten.baddbmm: 1,
    }

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in self.MATMULS:
            out = func(*args, **kwargs)  # (.., m, k) @ (.., k, n) -> (.., m, n)
            self.flops += 2 * out.numel() * args[self.MATMULS[func.overloadpacket]].shape[-1]
            return out
        with self:  # a composite operator: run its decomposition, which comes back here
            out = func.decompose(*args, **kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


def measure_allocations(fn) -> dict:
    """Run fn() once under AllocationTracker; bytes allocated and which operators ran.

    Runs under no_grad, not inference_mode: inference_mode skips the autograd dispatch keys, where
    composite operators such as matmul are split into the ATen calls that really allocate.
    """
    if not callable(fn):
        raise TypeError(f"fn ({fn!r}) must be callable")
    with torch.no_grad(), AllocationTracker() as tracker:
        fn()
    return {
        "peak_bytes": tracker.peak_bytes,
        "total_bytes": tracker.total_bytes,
        "largest_allocation_bytes": tracker.largest_bytes,
        "largest_allocation_op": tracker.largest_op,
        "ops": sorted(set(tracker.ops)),
    }


# =============================================================================
# 4. Experiments: correctness, cache bytes and FLOPs, decode timing, conversion, claims
# =============================================================================


def check_correctness(device: torch.device, atol: float = 1e-5) -> dict:
    """On a small layer: MHA == GQA(n_kv_heads=n_heads), the three sharing methods agree, cached
    decode == full forward at every position, chunked prefill == full forward."""
    _check_positive(atol=atol)
    d_model, n_heads, seq_len = 64, 8, 12
    out: dict = {"d_model": d_model, "n_heads": n_heads, "seq_len": seq_len, "atol": atol}
    x = torch.randn(2, seq_len, d_model, device=device)
    with torch.no_grad():
        mha = PlainMultiHeadAttention(d_model, n_heads, max_seq_len=32).to(device)
        gqa_full = GroupedQueryAttention(d_model, n_heads, n_heads, max_seq_len=32).to(device)
        gqa_full.load_state_dict(mha.state_dict(), strict=True)
        out["mha_vs_gqa_max_abs_err"] = max_abs_err(mha(x), gqa_full(x))
        per_kv = {}
        for n_kv in (n_heads, 2, 1):
            attn = GroupedQueryAttention(d_model, n_heads, n_kv, max_seq_len=32).to(device)
            attn.sharing = "repeat_kv"
            full = attn(x)
            err_methods = decode_err = chunk_err = 0.0
            for method in SHARING_METHODS:
                attn.sharing = method
                err_methods = max(err_methods, max_abs_err(full, attn(x)))
                cache = attn.new_cache(2)
                steps = [attn(x[:, i : i + 1], i, cache) for i in range(seq_len)]
                decode_err = max(decode_err, max_abs_err(torch.cat(steps, dim=1), full))
                cache, chunks, pos = attn.new_cache(2), [], 0
                for size in (5, 4, 3):  # 5 + 4 + 3 = seq_len
                    chunks.append(attn(x[:, pos : pos + size], pos, cache))
                    pos += size
                chunk_err = max(chunk_err, max_abs_err(torch.cat(chunks, dim=1), full))
            per_kv[str(n_kv)] = {
                "sharing_methods_max_abs_err": err_methods,
                "cached_decode_max_abs_err": decode_err,
                "chunked_prefill_max_abs_err": chunk_err,
            }
    out["per_n_kv_heads"] = per_kv
    errors = [out["mha_vs_gqa_max_abs_err"]] + [e for r in per_kv.values() for e in r.values()]
    out["max_abs_err"] = max(errors)
    out["all_within_atol"] = bool(max(errors) <= atol)
    return out


def analyze_cache_memory(
    n_layers: int, n_heads: int, head_dim: int, seq_len: int, device: torch.device
) -> dict:
    """Cache bytes measured from real KVCache tensors vs formula (4), for n_kv_heads = n_heads..1,
    and the attention FLOPs of one decode step (counted by MatmulFlopCounter) vs formula (5)."""
    _check_sizes(n_layers=n_layers, n_heads=n_heads, head_dim=head_dim, seq_len=seq_len)
    dtype, batch = torch.bfloat16, 1
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    mha_bytes = kv_cache_bytes(n_layers, batch, n_heads, seq_len, head_dim, bytes_per)
    rows = []
    for n_kv in divisors_descending(n_heads):
        caches = [KVCache(batch, n_kv, seq_len, head_dim, dtype, device) for _ in range(n_layers)]
        measured = sum(c.nbytes for c in caches)
        q = torch.randn(batch, n_heads, 1, head_dim, dtype=dtype, device=device)
        with torch.no_grad(), MatmulFlopCounter() as counter:
            attend(q, caches[0].k_cache, caches[0].v_cache, None, "grouped")
        flops_formula = 4 * batch * n_heads * seq_len * head_dim  # (5)
        read = caches[0].nbytes  # one layer's cache, read once per decode step
        rows.append(
            {
                "n_kv_heads": n_kv,
                "group_size": n_heads // n_kv,
                "measured_bytes": measured,
                "formula_bytes": kv_cache_bytes(
                    n_layers, batch, n_kv, seq_len, head_dim, bytes_per
                ),
                "mha_bytes_over_this": mha_bytes / measured,
                "attention_flops_per_layer": counter.flops,
                "formula_flops_per_layer": flops_formula,
                "cache_bytes_read_per_layer": read,
                "arithmetic_intensity_flops_per_byte": counter.flops / read,  # (6), counted
            }
        )
        del caches
    return {
        "n_layers": n_layers,
        "n_heads": n_heads,
        "head_dim": head_dim,
        "seq_len": seq_len,
        "batch_size": batch,
        "dtype": "bfloat16",
        "rows": rows,
        "measured_equals_formula": all(r["measured_bytes"] == r["formula_bytes"] for r in rows),
        "flops_equal_formula": all(
            r["attention_flops_per_layer"] == r["formula_flops_per_layer"] for r in rows
        ),
    }


def cache_vs_context(shape: dict = LLAMA2_70B_SHAPE, max_log2: int = 17) -> dict:
    """Formula (4) for one model shape as MHA, as released (GQA) and as MQA, in bf16, batch 1,
    at 1K .. 2^max_log2 tokens; next to the memory of one 80 GB GPU."""
    _check_sizes(max_log2=max_log2, **shape)
    contexts = [2**k for k in range(10, max_log2 + 1)]
    kinds = {"MHA": shape["n_heads"], "GQA": shape["n_kv_heads"], "MQA": 1}
    return {
        "shape": dict(shape),
        "dtype": "bfloat16",
        "batch_size": 1,
        "context_lengths": contexts,
        "n_kv_heads": kinds,
        "bytes": {
            kind: [
                kv_cache_bytes(shape["n_layers"], 1, n, t, shape["head_dim"], 2) for t in contexts
            ]
            for kind, n in kinds.items()
        },
        "gpu_bytes": 80 * 10**9,  # an "80 GB" GPU (A100/H100 80GB): 80e9 bytes = 74.5 GiB
    }


def benchmark_decode(
    d_model: int,
    n_heads: int,
    head_dim: int,
    contexts: list[int],
    min_run_time: float,
    device: torch.device,
    rounds: int = 3,
    max_rounds: int = 6,
) -> dict:
    """Time one decode step (1 new token, batch 1, fp32) against a cache of T tokens, for MHA,
    GQA (n_heads/8 KV heads, or the next divisor of n_heads below) and MQA through each sharing
    method; plus the attention core alone (one query token against the cache, no projections)
    and what a step allocates, at the longest context.

    Robust to a stray slow call: within a round MHA, GQA and MQA are timed back to back, so a
    burst of background load hits both terms of a ratio, or one round only; each time is the
    median over the rounds and each speed-up the median of the per-round speed-ups. After
    ``rounds`` rounds, more are run (up to ``max_rounds``) while a headline speed-up's spread
    over the rounds is larger than its distance from 1. The per-round times are kept.

    The caches are filled once with random keys/values (their values do not change the cost). A
    step at context T writes position T and reads T + 1 positions; before each measurement the
    cache is marked full again (every position up to the longest context still holds a key).
    """
    _check_sizes(d_model=d_model, n_heads=n_heads, head_dim=head_dim, rounds=rounds)
    _check_sizes(max_rounds=max_rounds, **{f"contexts[{i}]": t for i, t in enumerate(contexts)})
    if not contexts or max_rounds < rounds:
        raise ValueError(f"contexts ({contexts}) must be non-empty, max_rounds >= rounds")
    if isinstance(min_run_time, bool) or not isinstance(min_run_time, numbers.Real):
        raise TypeError(f"min_run_time ({min_run_time!r}) must be a real number")
    if not 0 <= min_run_time < math.inf:
        raise ValueError(f"min_run_time ({min_run_time}) must be finite and >= 0")
    # GQA: groups of 8 query heads (Llama-2-70B's), or the nearest smaller n_kv_heads that divides
    gqa_kv = next(k for k in divisors_descending(n_heads) if k <= max(1, n_heads // 8))
    configs = {"MHA": n_heads, "GQA": gqa_kv, "MQA": 1}
    contexts, longest = sorted(contexts), max(contexts)
    layers, caches, queries = {}, {}, {}
    x = torch.randn(1, 1, d_model, device=device)
    for name, n_kv in configs.items():
        attn = GroupedQueryAttention(d_model, n_heads, n_kv, head_dim, max_seq_len=longest + 1)
        layers[name] = attn.to(device).eval()
        caches[name] = attn.new_cache(1)
        shape = (1, n_kv, longest, head_dim)
        caches[name].update(torch.randn(shape, device=device), torch.randn(shape, device=device), 0)
        queries[name] = torch.randn(1, n_heads, 1, head_dim, device=device)

    def step(name: str, t: int, sharing: str):
        layers[name].sharing = sharing
        caches[name].length = longest  # start_pos t <= length: any context can be timed next
        return lambda: layers[name](x, t, caches[name])

    def core(name: str, sharing: str):
        k = caches[name].k_cache[:, :, : longest + 1]  # (1, n_kv_heads, T + 1, head_dim)
        v = caches[name].v_cache[:, :, : longest + 1]
        return lambda: SHARING_METHODS[sharing](queries[name], k, v, None)

    memory = {
        n: {m: measure_allocations(step(n, longest, m)) for m in SHARING_METHODS} for n in configs
    }
    step_rounds = {n: {m: [[] for _ in contexts] for m in SHARING_METHODS} for n in configs}
    core_rounds = {n: {m: [] for m in SHARING_METHODS} for n in configs}

    def headline_speedups() -> list[list[float]]:
        mha, gqa, mqa = (step_rounds[n] for n in configs)
        return [
            round_ratios(mha["grouped"][-1], gqa["grouped"][-1]),
            round_ratios(mha["grouped"][-1], mqa["grouped"][-1]),
            round_ratios(gqa["repeat_kv"][-1], gqa["grouped"][-1]),
        ]

    done = 0
    with torch.inference_mode():
        while done < rounds or (
            done < max_rounds
            and any(max(r) - min(r) > abs(statistics.median(r) - 1) for r in headline_speedups())
        ):
            for i, t in enumerate(contexts):
                for m in SHARING_METHODS:
                    for n in configs:  # back to back: the three terms of a ratio
                        ms = 1e3 * median_time_s(step(n, t, m), min_run_time)
                        step_rounds[n][m][i].append(ms)
            for m in SHARING_METHODS:
                for n in configs:
                    core_rounds[n][m].append(1e3 * median_time_s(core(n, m), min_run_time))
            done += 1

    result: dict = {
        "d_model": d_model,
        "n_heads": n_heads,
        "head_dim": head_dim,
        "dtype": "float32",
        "batch_size": 1,
        "context_lengths": contexts,
        "rounds": done,
        "min_rounds": rounds,
        "max_rounds": max_rounds,
        "min_run_time_s": min_run_time,
        "configs": {},
    }
    elem = 4  # float32
    mha_rounds = step_rounds["MHA"]
    for name, n_kv in configs.items():
        attn = layers[name]
        weights = sum(p.numel() * p.element_size() for p in attn.parameters())
        core_ms = {m: statistics.median(core_rounds[name][m]) for m in SHARING_METHODS}
        core_bytes = kv_cache_bytes(1, 1, n_kv, longest + 1, head_dim, elem)  # keys + values read
        core_flops = 4 * n_heads * (longest + 1) * head_dim  # (5) q.k and probs.v
        speedups = {
            m: [
                round_ratios(a, b) for a, b in zip(mha_rounds[m], step_rounds[name][m], strict=True)
            ]
            for m in SHARING_METHODS
        }
        result["configs"][name] = {
            "n_kv_heads": n_kv,
            "group_size": attn.group,
            "step_ms": {
                m: [statistics.median(r) for r in rs] for m, rs in step_rounds[name].items()
            },
            "step_ms_rounds": step_rounds[name],
            "speedup_vs_mha_rounds": speedups,
            "speedup_vs_mha": {m: [statistics.median(r) for r in rs] for m, rs in speedups.items()},
            "core_ms_at_longest": core_ms,
            "core_ms_rounds_at_longest": core_rounds[name],
            "core_flops_at_longest": core_flops,
            "core_gflops_per_s_at_longest": {m: core_flops / ms / 1e6 for m, ms in core_ms.items()},
            "core_gb_per_s_at_longest": {m: core_bytes / ms / 1e6 for m, ms in core_ms.items()},
            "memory_at_longest": memory[name],
            "weight_bytes": weights,
            "k_cache_bytes_at_longest": (longest + 1) * n_kv * head_dim * elem,
            # Bytes a step must read: all weights plus the cached keys and values of T+1 tokens.
            "bytes_read_per_step": [
                weights + kv_cache_bytes(1, 1, n_kv, t + 1, head_dim, elem) for t in contexts
            ],
        }
    # Noise report: the widest (max - min) / median over the rounds of any printed time.
    spread, where = 0.0, ""
    for name, cfg in result["configs"].items():
        for m in SHARING_METHODS:
            labelled = [
                (f"at {t} tokens", r)
                for t, r in zip(contexts, cfg["step_ms_rounds"][m], strict=True)
            ]
            labelled.append((f"core at {longest} tokens", cfg["core_ms_rounds_at_longest"][m]))
            for label, r in labelled:
                s = (max(r) - min(r)) / statistics.median(r)
                if s >= spread:
                    spread, where = s, f"{name} {m} {label}"
    result["largest_round_spread"] = spread
    result["largest_round_spread_at"] = where
    fused = [op for op in memory["GQA"]["sdpa"]["ops"] if op.startswith("_scaled_dot_product")]
    result["sdpa_kernel"] = fused[0] if fused else "math (no fused kernel ran)"
    result["step_vs_cache_note"] = step_vs_cache_note(result)
    return result


def step_vs_cache_note(decode: dict) -> str:
    """Why GQA's step does not shrink as much as its cache, in this run's numbers."""
    gqa, mha, mqa = (decode["configs"][n] for n in ("GQA", "MHA", "MQA"))
    kv_ratio = gqa["n_kv_heads"] / mha["n_kv_heads"]
    proj_bytes = 2 * decode["d_model"] * decode["n_heads"] * decode["head_dim"] * 4
    read_gqa, read_mha = gqa["bytes_read_per_step"][-1], mha["bytes_read_per_step"][-1]
    core_g, core_m = gqa["core_ms_at_longest"]["grouped"], mha["core_ms_at_longest"]["grouped"]
    memory_bound_ms = core_m * kv_ratio  # GQA's cache streamed at MHA's bandwidth
    note = (
        f"A step reads every weight plus the cache: GQA {read_gqa / 2**20:.1f} MiB vs MHA "
        f"{read_mha / 2**20:.1f} MiB ({read_mha / read_gqa:.2f}x less, while the cache alone is "
        f"{1 / kv_ratio:.0f}x smaller), because q_proj and o_proj ({proj_bytes / 2**20:.1f} MiB) "
        f"do not shrink with n_kv_heads. Streaming GQA's cache at MHA's "
        f"{mha['core_gb_per_s_at_longest']['grouped']:.1f} GB/s would take "
        f"{memory_bound_ms:.2f} ms; its attention core takes {core_g:.2f} ms"
    )
    if core_g <= memory_bound_ms:
        return note + ", so the core is as memory-bound as MHA's and shrinks with the cache."
    return note + (
        f". MQA's core, with 1/{gqa['n_kv_heads']} of GQA's cache, still takes "
        f"{mqa['core_ms_at_longest']['grouped']:.2f} ms: the part that does not shrink with "
        f"n_kv_heads is the same {gqa['core_flops_at_longest'] / 1e6:.0f} MFLOP per step in "
        f"skinny (group x head_dim) @ (head_dim x T) matmuls, and the n_heads x T scores written, "
        f"softmaxed and read again."
    )


def analyze_conversion(d_model: int, n_heads: int, noise: float, device) -> dict:
    """Relative output error ||y_gqa - y_mha|| / ||y_mha|| of mha_to_gqa for each group count,
    on random weights, on heads similar within each group, and on identical heads."""
    _check_sizes(d_model=d_model, n_heads=n_heads)
    x = torch.randn(2, 32, d_model, device=device)
    rows = []
    with torch.no_grad():
        for n_kv in divisors_descending(n_heads):
            group, row = n_heads // n_kv, {"n_kv_heads": n_kv, "group_size": n_heads // n_kv}
            for kind, mha in [
                ("random", PlainMultiHeadAttention(d_model, n_heads, max_seq_len=64).to(device)),
                ("similar", mha_with_similar_heads(d_model, n_heads, group, noise, device)),
                ("identical", mha_with_similar_heads(d_model, n_heads, group, 0.0, device)),
            ]:
                y, y_gqa = mha(x), mha_to_gqa(mha, n_kv)(x)
                row[f"relative_err_{kind}"] = ((y_gqa - y).norm() / y.norm()).item()
                row[f"max_abs_err_{kind}"] = max_abs_err(y_gqa, y)
            rows.append(row)
    return {"d_model": d_model, "n_heads": n_heads, "similar_noise": noise, "rows": rows}


def speedup_phrase(a: str, speedups: list[float], b: str, verb: str = "was ") -> str:
    """'a was 1.62x faster than b', '... slower ...', or 'not measurably faster' when the
    per-round speed-ups (b's time / a's time) straddle 1."""
    lo, mid, hi = min(speedups), statistics.median(speedups), max(speedups)
    if lo > 1:
        return f"{a} {verb}{mid:.2f}x faster than {b}"
    if hi < 1:
        return f"{a} {verb}{1 / mid:.2f}x slower than {b}"
    return f"{a} {verb}not measurably faster than {b} (too noisy)"


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


def weigh_claims(corr: dict, mem: dict, dec: dict, conv: dict) -> dict:
    """Each claim of the script, as a sentence computed from this run's numbers."""
    gqa, mha = dec["configs"]["GQA"], dec["configs"]["MHA"]
    t, n = tokens_label(dec["context_lengths"][-1]), dec["rounds"]
    claims = {
        "correct": claim(
            f"GroupedQueryAttention matched plain MHA (n_kv_heads = n_heads), its three sharing "
            f"methods agreed, and cached decode and chunked prefill matched the full forward: "
            f"largest difference {corr['max_abs_err']:.1e}, "
            f"{'within' if corr['all_within_atol'] else 'above'} the tolerance {corr['atol']:.0e}",
            corr["all_within_atol"],
            max_abs_err=corr["max_abs_err"],
            atol=corr["atol"],
        ),
    }
    rows = mem["rows"]
    claims["cache_bytes"] = claim(
        f"The cache bytes measured from the tensors "
        f"{'equal' if mem['measured_equals_formula'] else 'differ from'} the formula "
        f"2 * n_layers * batch * n_kv_heads * seq_len * head_dim * bytes for every n_kv_heads: "
        f"{mib(rows[0]['measured_bytes'])} for MHA, {mib(rows[-1]['measured_bytes'])} for MQA "
        f"({rows[-1]['mha_bytes_over_this']:.0f}x smaller)",
        mem["measured_equals_formula"],
        mha_bytes=rows[0]["measured_bytes"],
        mqa_bytes=rows[-1]["measured_bytes"],
    )
    claims["flops_unchanged"] = claim(
        f"The attention FLOPs counted in one decode step "
        f"{'equal' if mem['flops_equal_formula'] else 'differ from'} 4*h*T*d for every "
        f"n_kv_heads: sharing KV heads shrinks the cache, not the arithmetic",
        mem["flops_equal_formula"],
        flops=rows[0]["attention_flops_per_layer"],
    )
    mhas = "MHA's"
    for name in ("GQA", "MQA"):
        r = dec["configs"][name]["speedup_vs_mha_rounds"]["grouped"][-1]
        k = dec["configs"][name]["n_kv_heads"]
        step = f"the copy-free decode step of {name} ({k} KV head{'s' if k > 1 else ''})"
        claims[f"{name.lower()}_decode"] = claim(
            f"At {t} cached tokens {speedup_phrase(step, r, mhas)} (median of {n} rounds; per "
            f"round {min(r):.2f}-{max(r):.2f}x); its cache is {mha['n_kv_heads'] // k}x smaller",
            min(r) > 1,
            speedup=statistics.median(r),
            speedup_min=min(r),
            speedup_max=max(r),
        )
    r = round_ratios(gqa["step_ms_rounds"]["repeat_kv"][-1], gqa["step_ms_rounds"]["grouped"][-1])
    claims["copy_free_vs_repeat_kv"] = claim(
        f"At {t} tokens {speedup_phrase('the copy-free GQA decode step', r, 'the repeat_kv one')} "
        f"(median of {n} rounds; per round "
        f"{min(r):.2f}-{max(r):.2f}x)",
        min(r) > 1,
        speedup=statistics.median(r),
        speedup_min=min(r),
        speedup_max=max(r),
    )
    mem_g, mem_r = gqa["memory_at_longest"]["grouped"], gqa["memory_at_longest"]["repeat_kv"]
    small = mem_g["largest_allocation_bytes"] < gqa["k_cache_bytes_at_longest"]
    claims["copy_free_memory"] = claim(
        f"In one GQA decode step at {t} tokens the copy-free method's largest allocation was "
        f"{mib(mem_g['largest_allocation_bytes'])}, {'smaller' if small else 'not smaller'} than "
        f"the layer's cached keys ({mib(gqa['k_cache_bytes_at_longest'])}); repeat_kv's peak was "
        f"{mib(mem_r['peak_bytes'])} against the copy-free {mib(mem_g['peak_bytes'])}",
        small,
        copy_free_peak_bytes=mem_g["peak_bytes"],
        repeat_kv_peak_bytes=mem_r["peak_bytes"],
        k_cache_bytes=gqa["k_cache_bytes_at_longest"],
    )
    pooled = [r for r in conv["rows"] if r["group_size"] > 1]
    exact = max(r["relative_err_identical"] for r in pooled)
    helps = all(r["relative_err_similar"] < r["relative_err_random"] for r in pooled)
    claims["conversion"] = claim(
        f"Mean-pooling KV heads (mha_to_gqa) gave a relative output error of at most {exact:.1e} "
        f"on identical heads ({'float32 rounding' if exact <= 1e-6 else 'not exact'}), and on "
        f"similar heads an error "
        f"{'below' if helps else 'not always below'} that on random weights (at group "
        f"{pooled[-1]['group_size']}: {pooled[-1]['relative_err_similar']:.3f} vs "
        f"{pooled[-1]['relative_err_random']:.3f})",
        exact <= 1e-6 and helps,
        identical_max_relative_err=exact,
    )
    return claims


# =============================================================================
# 5. Figures: one function per figure, each returns the Figure; titles come from the numbers
# =============================================================================

CONFIG_COLOR = {"MHA": "tab:red", "GQA": "tab:blue", "MQA": "tab:green"}
SHARING_COLOR = {"repeat_kv": "tab:orange", "grouped": "tab:blue", "sdpa": "tab:purple"}


def tokens_label(n_tokens: int) -> str:
    """A context length as a tick label: "512", "4K", "1,536" (exact at every size)."""
    _check_sizes(n_tokens=n_tokens)
    if n_tokens >= 1024 and n_tokens % 1024 == 0:
        return f"{n_tokens // 1024}K"
    return f"{n_tokens:,}"


def gqa_decode_time_title(context: int, speedups: dict[str, list[float]]) -> str:
    """From the per-round speed-ups vs MHA of each config at the longest context."""
    parts = [speedup_phrase(name, r, "MHA", "") for name, r in speedups.items()]
    return f"Copy-free decode step at {tokens_label(context)} tokens: " + ", ".join(parts)


def gqa_sharing_methods_titles(
    context: int, core_speedups: list[float], peak_grouped: int, peak_repeat: int
) -> tuple[str, str]:
    """(time panel, memory panel) titles for GQA at the longest context."""
    time_title = f"GQA attention core at {tokens_label(context)} tokens:\n" + speedup_phrase(
        "copy-free", core_speedups, "repeat_kv", ""
    )
    # the median of per-round ratios, not the ratio of the bars: give the rounds' range too
    time_title += f" (rounds {min(core_speedups):.3g}-{max(core_speedups):.3g}x)"
    if peak_repeat >= 1.1 * peak_grouped > 0:
        ratio = peak_repeat / peak_grouped
        memory_title = (
            f"repeat_kv allocates {ratio:.{0 if ratio >= 10 else 1}f}x the copy-free peak"
        )
    else:
        memory_title = (
            f"repeat_kv allocates {mib(peak_repeat)}, copy-free {mib(peak_grouped)} at peak"
        )
    return time_title, memory_title + "\nin one GQA step (log scale)"


def gqa_cache_vs_context_title(cvc: dict) -> str:
    t, at = cvc["context_lengths"][-1], {k: b[-1] / 2**30 for k, b in cvc["bytes"].items()}
    sizes = ", ".join(
        f"{kind}{'-' + str(n) if kind == 'GQA' else ''} {at[kind]:.3g} GiB"
        for kind, n in cvc["n_kv_heads"].items()
    )
    return f"Llama-2-70B's shape, KV cache at {tokens_label(t)} tokens (bf16): {sizes}"


def gqa_conversion_title(conv: dict) -> str:
    pooled = [r for r in conv["rows"] if r["group_size"] > 1]
    exact = max(r["relative_err_identical"] for r in pooled) <= 1e-6
    helps = all(r["relative_err_similar"] < r["relative_err_random"] for r in pooled)
    first = (
        "exact for identical heads (to float32 rounding)"
        if exact
        else "not exact even for identical heads"
    )
    second = "smaller error for similar heads" if helps else "similar heads not always better"
    return f"Mean-pooling KV heads: {first},\n{second} than for random ones"


def plot_head_sharing(n_heads: int = 8) -> plt.Figure:
    """Which KV head each query head reads, read off repeat_kv applied to the KV head indices."""
    kv_list = divisors_descending(n_heads)
    fig, axes = plt.subplots(1, len(kv_list), figsize=(3 * len(kv_list), 3.9), layout="constrained")
    names = {n_heads: "MHA", 1: "MQA"}
    for ax, n_kv in zip(np.atleast_1d(axes), kv_list, strict=True):
        index = torch.arange(n_kv, dtype=torch.float32).view(1, n_kv, 1, 1)
        reads = repeat_kv(index, n_heads // n_kv).flatten().long()  # KV head of each query head
        grid = np.full((n_heads, n_kv), np.nan)
        grid[np.arange(n_heads), reads.numpy()] = reads.numpy()
        ax.imshow(grid, cmap="tab10", vmin=0, vmax=9, aspect="auto")
        ax.set_xticks(range(n_kv))
        ax.set_yticks(range(n_heads))
        ax.set_xlabel("KV head")
        ax.set_ylabel("query head")
        label = names.get(n_kv, f"GQA-{n_kv}")
        ax.set_title(f"{label}: n_kv_heads={n_kv}\ngroup = {n_heads // n_kv}")
    fig.suptitle(f"Query head h reads KV head h // group ({n_heads} query heads)")
    return fig


def plot_cache_vs_context(cvc: dict) -> plt.Figure:
    """KV cache size vs context for Llama-2-70B's shape as MHA, as released (GQA-8) and as MQA."""
    t = np.array(cvc["context_lengths"])
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    for kind, n_kv in cvc["n_kv_heads"].items():
        gib = np.array(cvc["bytes"][kind]) / 2**30
        label = f"{kind}: n_kv_heads = {n_kv}" + (" (as released)" if kind == "GQA" else "")
        ax.plot(t, gib, marker="o", ms=3, color=CONFIG_COLOR[kind], label=label)
    gpu = cvc["gpu_bytes"] / 2**30
    ax.axhline(gpu, color="black", ls="--", lw=1, label=f"one 80 GB GPU = {gpu:.1f} GiB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(t, [tokens_label(int(v)) for v in t])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache (GiB, bf16, batch 1)")
    ax.set_title(gqa_cache_vs_context_title(cvc), fontsize=10)
    fig.legend(loc="outside lower center", ncol=2, fontsize=9)
    return fig


def plot_decode_time(decode: dict) -> plt.Figure:
    """Copy-free decode step time vs context for MHA, GQA and MQA, with the spread over rounds."""
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    t = decode["context_lengths"]
    for name, cfg in decode["configs"].items():
        ms, rounds = np.array(cfg["step_ms"]["grouped"]), cfg["step_ms_rounds"]["grouped"]
        err = [ms - [min(r) for r in rounds], [max(r) for r in rounds] - ms]
        ax.errorbar(
            t,
            ms,
            yerr=err,
            marker="o",
            ms=4,
            capsize=3,
            color=CONFIG_COLOR[name],
            label=f"{name} (n_kv_heads = {cfg['n_kv_heads']})",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(t, [tokens_label(v) for v in t])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("cached context length (tokens, log scale)")
    ax.set_ylabel("time per decode step (ms)")
    speedups = {
        n: decode["configs"][n]["speedup_vs_mha_rounds"]["grouped"][-1] for n in ("GQA", "MQA")
    }
    ax.set_title(gqa_decode_time_title(t[-1], speedups), fontsize=10)
    fig.legend(
        loc="outside lower center",
        ncol=3,
        fontsize=9,
        title=f"one attention layer, fp32, batch 1; bars: min-max over {decode['rounds']} rounds",
    )
    return fig


def plot_sharing_methods(decode: dict) -> plt.Figure:
    """Attention core time (with its spread) and memory allocated per step, per sharing method,
    at the longest context."""
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    names, methods = list(decode["configs"]), list(SHARING_METHODS)
    x = np.arange(len(names))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        offset = (i - (len(methods) - 1) / 2) * width
        cfgs = [decode["configs"][n] for n in names]
        times = np.array([c["core_ms_at_longest"][method] for c in cfgs])
        rounds = [c["core_ms_rounds_at_longest"][method] for c in cfgs]
        err = [times - [min(r) for r in rounds], [max(r) for r in rounds] - times]
        label = "grouped (copy-free)" if method == "grouped" else method
        ax_t.bar(
            x + offset, times, width, yerr=err, capsize=3, label=label, color=SHARING_COLOR[method]
        )
        peaks = [c["memory_at_longest"][method]["peak_bytes"] / 2**20 for c in cfgs]
        ax_m.bar(x + offset, peaks, width, color=SHARING_COLOR[method])
    k_bytes = [decode["configs"][n]["k_cache_bytes_at_longest"] / 2**20 for n in names]
    ax_m.hlines(k_bytes, x - 0.45, x + 0.45, color="black", lw=2, zorder=3)
    ax_t.plot([], [], color="black", lw=2, label="size of the layer's cached keys (right)")
    labels = [f"{n}\n(n_kv_heads={decode['configs'][n]['n_kv_heads']})" for n in names]
    gqa = decode["configs"]["GQA"]
    core = round_ratios(
        gqa["core_ms_rounds_at_longest"]["repeat_kv"], gqa["core_ms_rounds_at_longest"]["grouped"]
    )
    mem = gqa["memory_at_longest"]
    time_title, memory_title = gqa_sharing_methods_titles(
        decode["context_lengths"][-1],
        core,
        mem["grouped"]["peak_bytes"],
        mem["repeat_kv"]["peak_bytes"],
    )
    ax_t.set_xticks(x, labels)
    ax_t.set_ylabel(f"attention core time (ms; bars: min-max over {decode['rounds']} rounds)")
    ax_t.set_title(time_title, fontsize=10)
    ax_m.set_xticks(x, labels)
    ax_m.set_yscale("log")
    ax_m.set_ylabel("peak memory allocated in one step (MiB, log)")
    ax_m.set_title(memory_title, fontsize=10)
    ax_m.text(
        0.99,
        0.99,
        "sdpa: a fused kernel; its private\nscratch memory is not seen here",
        transform=ax_m.transAxes,
        ha="right",
        va="top",
        fontsize=8,
        color=SHARING_COLOR["sdpa"],
    )
    fig.legend(loc="outside lower center", ncol=4)
    return fig


def plot_conversion_error(conv: dict) -> plt.Figure:
    """Relative output error of mean-pooling conversion vs group size."""
    fig, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    rows = [r for r in conv["rows"] if r["group_size"] > 1]  # group 1 is exact (error 0)
    g = [r["group_size"] for r in rows]
    labels = {
        "random": "random weights",
        "similar": f"similar heads in each group (noise {conv['similar_noise']})",
        "identical": "identical heads in each group",
    }
    floor = 1e-9  # exact zeros cannot sit on a log axis: drawn here
    for kind, label in labels.items():
        err = [max(r[f"relative_err_{kind}"], floor) for r in rows]
        ax.plot(g, err, marker="o", label=label)
    eps = torch.finfo(torch.float32).eps
    ax.axhline(eps, color="gray", ls=":", lw=1)
    ax.text(g[0], eps * 1.6, f"float32 machine epsilon ({eps:.1e})", fontsize=8, color="gray")
    if any(r[f"relative_err_{kind}"] == 0.0 for r in rows for kind in labels):
        ax.text(g[0], floor * 1.6, "exactly 0 is drawn at 1e-9", fontsize=8, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(g, [str(v) for v in g])
    ax.minorticks_off()
    ax.set_xlabel(f"group size = n_heads / n_kv_heads (n_heads = {conv['n_heads']})")
    ax.set_ylabel("relative output error ||y_gqa - y_mha|| / ||y_mha||")
    ax.set_title(gqa_conversion_title(conv), fontsize=10)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    return fig


# =============================================================================
# 6. Main: the stages, each one call and one print
# =============================================================================

SIZES = {
    "quick": {
        "memory": {"n_layers": 2, "n_heads": 16, "head_dim": 32, "seq_len": 512},
        "decode": {
            "d_model": 256,
            "n_heads": 16,
            "head_dim": 16,
            "contexts": [512, 2048],
            "min_run_time": 0.001,
            "rounds": 3,
            "max_rounds": 6,
        },
        "conversion": {"d_model": 64, "n_heads": 8, "noise": 0.1},
    },
    "default": {
        "memory": {"n_layers": 4, "n_heads": 32, "head_dim": 64, "seq_len": 2048},
        # rounds of >= 0.1 s of calls per time: a stray slow call or load burst cannot set a ratio
        "decode": {
            "d_model": 2048,
            "n_heads": 32,
            "head_dim": 64,
            "contexts": [4096, 8192, 16384, 32768],
            "min_run_time": 0.1,
            "rounds": 3,
            "max_rounds": 6,
        },
        "conversion": {"d_model": 256, "n_heads": 16, "noise": 0.1},
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_flags(base_parser(), argv)


def print_correctness(corr: dict) -> None:
    print(
        f"  MHA vs GroupedQueryAttention(n_kv_heads=n_heads), same weights: max |diff| "
        f"{corr['mha_vs_gqa_max_abs_err']:.1e}"
    )
    print(f"  {'n_kv_heads':>10} {'3 methods agree':>16} {'cached decode':>14} {'chunked':>10}")
    for n_kv, r in corr["per_n_kv_heads"].items():
        print(
            f"  {n_kv:>10} {r['sharing_methods_max_abs_err']:>16.1e} "
            f"{r['cached_decode_max_abs_err']:>14.1e} {r['chunked_prefill_max_abs_err']:>10.1e}"
        )


def print_cache_memory(mem: dict) -> None:
    print(
        f"  {mem['n_layers']} layers, {mem['n_heads']} query heads, head_dim {mem['head_dim']}, "
        f"{mem['seq_len']} tokens, bf16"
    )
    print(
        f"  {'n_kv_heads':>10} {'measured':>12} {'formula':>12} {'MHA / this':>11} "
        f"{'FLOPs/step/layer':>17} {'FLOP/byte':>10}"
    )
    for r in mem["rows"]:
        print(
            f"  {r['n_kv_heads']:>10} {mib(r['measured_bytes']):>12} "
            f"{mib(r['formula_bytes']):>12} {r['mha_bytes_over_this']:>10.0f}x "
            f"{r['attention_flops_per_layer']:>17,} "
            f"{r['arithmetic_intensity_flops_per_byte']:>10.1f}"
        )


def print_cache_vs_context(cvc: dict) -> None:
    s = cvc["shape"]
    print(f"  {s['n_layers']} layers, {s['n_heads']} query heads, head_dim {s['head_dim']}, bf16")
    print(f"  {'tokens':>8} " + " ".join(f"{k + ' GiB':>10}" for k in cvc["n_kv_heads"]))
    for i, t in enumerate(cvc["context_lengths"]):
        cols = " ".join(f"{cvc['bytes'][k][i] / 2**30:>10.2f}" for k in cvc["n_kv_heads"])
        print(f"  {tokens_label(t):>8} {cols}")
    print(f"  one 80 GB GPU holds {cvc['gpu_bytes'] / 2**30:.1f} GiB")


def _round_spread(r: list[float]) -> str:
    return f"{100 * (max(r) - min(r)) / statistics.median(r):.0f}%"


def print_decode(dec: dict) -> None:
    print(
        f"  d_model {dec['d_model']}, {dec['n_heads']} query heads, head_dim {dec['head_dim']}, "
        f"fp32, batch 1; sdpa ran {dec['sdpa_kernel']}"
    )
    note = (
        f"each time: median of {dec['rounds']} rounds (MHA, GQA, MQA timed back to back), each "
        f"round >= {dec['min_run_time_s']} s of calls; in brackets the spread (max - min) / "
        f"median over the rounds; widest spread {100 * dec['largest_round_spread']:.0f}% "
        f"({dec['largest_round_spread_at']})"
    )
    print(textwrap.fill(note, 96, initial_indent=" " * 2, subsequent_indent=" " * 4))
    head = " ".join(f"{f'{t} tokens':>17}" for t in dec["context_lengths"])
    print(f"  {'config':<16} {'method':<10} {head}")
    for name, cfg in dec["configs"].items():
        for m in SHARING_METHODS:
            cols = " ".join(
                f"{ms:>8.2f} ms ({_round_spread(r):>4})"
                for ms, r in zip(cfg["step_ms"][m], cfg["step_ms_rounds"][m], strict=True)
            )
            print(f"  {name + ' kv=' + str(cfg['n_kv_heads']):<16} {m:<10} {cols}")
    t = dec["context_lengths"][-1]
    print(
        f"  attention core at {t} tokens: {'config':<6} {'method':<10} {'time (spread)':>16} "
        f"{'peak alloc':>11} {'largest alloc (op)':>28}"
    )
    for name, cfg in dec["configs"].items():
        for m in SHARING_METHODS:
            mm, r = cfg["memory_at_longest"][m], cfg["core_ms_rounds_at_longest"][m]
            print(
                f"  {'':<30}{name:<6} {m:<10} {cfg['core_ms_at_longest'][m]:>8.2f} ms "
                f"({_round_spread(r):>4}) {mib(mm['peak_bytes']):>11} "
                f"{mib(mm['largest_allocation_bytes']):>11} ({mm['largest_allocation_op']})"
            )
        print(
            f"  {'':<30}{name:<6} cached keys of the layer: {mib(cfg['k_cache_bytes_at_longest'])}"
        )
    print(textwrap.fill(dec["step_vs_cache_note"], 96, initial_indent="  ", subsequent_indent="  "))


def print_conversion(conv: dict) -> None:
    print(
        f"  d_model {conv['d_model']}, {conv['n_heads']} heads; relative output error "
        f"(similar = noise {conv['similar_noise']})"
    )
    print(f"  {'n_kv_heads':>10} {'group':>6} {'random':>10} {'similar':>10} {'identical':>10}")
    for r in conv["rows"]:
        print(
            f"  {r['n_kv_heads']:>10} {r['group_size']:>6} {r['relative_err_random']:>10.2e} "
            f"{r['relative_err_similar']:>10.2e} {r['relative_err_identical']:>10.2e}"
        )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    sizes = SIZES["quick" if args.quick else "default"]
    results: dict = {"meta": run_meta(args, device)}
    n = 7

    print(f"[1/{n}] checking correctness ...")
    results["correctness"] = check_correctness(device)
    print_correctness(results["correctness"])

    print(f"[2/{n}] measuring cache memory and attention FLOPs ...")
    results["cache_memory"] = analyze_cache_memory(device=device, **sizes["memory"])
    print_cache_memory(results["cache_memory"])

    print(f"[3/{n}] computing the cache of Llama-2-70B's shape as MHA, GQA and MQA ...")
    results["cache_vs_context"] = cache_vs_context()
    print_cache_vs_context(results["cache_vs_context"])

    print(f"[4/{n}] benchmarking decode steps ...")
    results["decode"] = benchmark_decode(device=device, **sizes["decode"])
    print_decode(results["decode"])

    print(f"[5/{n}] converting MHA to GQA by mean-pooling KV heads ...")
    results["conversion"] = analyze_conversion(device=device, **sizes["conversion"])
    print_conversion(results["conversion"])

    print(f"[6/{n}] weighing the claims ...")
    results["claims"] = weigh_claims(
        results["correctness"], results["cache_memory"], results["decode"], results["conversion"]
    )
    print_claims(results["claims"])

    print(f"[7/{n}] drawing figures ...")
    figures = {
        "head_sharing": plot_head_sharing(),
        "cache_vs_context": plot_cache_vs_context(results["cache_vs_context"]),
        "decode_time": plot_decode_time(results["decode"]),
        "sharing_methods": plot_sharing_methods(results["decode"]),
        "conversion_error": plot_conversion_error(results["conversion"]),
    }
    save_outputs(args.out, figures, results, show=not args.no_show)
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
