"""Grouped-query attention: MHA, GQA and MQA with a KV cache, copy-free head sharing, decode speed.

The problem
-----------
Generating a token reads the whole key/value cache of every layer. With multi-head attention
(MHA) the cache stores one key and one value vector per head, per layer, per token:
``2 * n_layers * n_heads * head_dim`` numbers per token. For Llama-2-70B's shape (80 layers,
64 heads of 128 dimensions) in bf16 that is 2.5 MiB per token, 320 GiB at a 128K context:
more than the weights, more than any single GPU. And decoding is memory-bound: each step does
about one multiply-add per cached number it reads, so time per token grows with cache bytes.

The idea
--------
Let several query heads share one key/value head. Multi-query attention (MQA, Shazeer 2019)
keeps a single KV head for all query heads; grouped-query attention (GQA, Ainslie et al. 2023)
keeps ``n_kv_heads`` of them, each read by a group of ``group = n_heads / n_kv_heads`` query
heads. The cache shrinks by ``group`` while the number of query heads, and so the attention
FLOPs, stay the same: each key loaded from memory serves ``group`` queries, so the arithmetic
intensity of decoding rises by ``group``. MHA (``n_kv_heads = n_heads``) and MQA
(``n_kv_heads = 1``) are the two ends of GQA. A trained MHA checkpoint can be turned into GQA by
mean-pooling the key and value projection heads of each group, then briefly "uptraining".

The math
--------
x: (batch, seq_len, d_model). Query head h in 0..n_heads-1 reads KV head j = h // group::

    q_h = RoPE(x W_q,h)     k_j = RoPE(x W_k,j)     v_j = x W_v,j          (seq_len, head_dim)
    o_h = softmax(q_h k_j^T / sqrt(head_dim) + causal mask) v_j
    y   = concat(o_0 .. o_{n_heads-1}) W_o

    KV cache bytes = 2 * n_layers * batch * n_kv_heads * seq_len * head_dim * bytes_per_number
    attention FLOPs per decode step and layer = 4 * batch * n_heads * seq_len * head_dim
        (q.k over the cached keys and probs.v over the cached values, 2 FLOPs per multiply-add)
    arithmetic intensity = FLOPs / cache bytes read = 2 * group / bytes_per_number
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

Memory is measured, not assumed: ``AllocationTracker`` watches every ATen operator while a step
runs and records each new tensor storage it returns (bytes, operator) and the peak of the live
total. A fused kernel's private scratch space, freed before it returns, is not seen. It is built
on torch's private ``TorchDispatchMode`` (the one hook that sees CPU allocations); if a future
torch changes it, a self-check says so and the script runs on without the memory numbers.

Decode times are medians over 3 rounds in which MHA, GQA and MQA are timed back to back, so one
slow call or a burst of background load cannot set a ratio; the spread between rounds is printed.

Where it is used
----------------
MQA: PaLM, Falcon-7B, StarCoder. GQA: Llama-2-70B, Llama-3 (all sizes), Mistral-7B, Mixtral,
Qwen2, Gemma-2 and most open models since 2023. (DeepSeek-V2/V3 compress the cache differently,
with a latent: see ``multihead_latent_attention.py``.)

Run it
------
    uv run python grouped_query_attention.py           # default sizes (about 35 s on a 2-core CPU)
    uv run python grouped_query_attention.py --quick   # small sizes, a few seconds
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
- Touvron et al., "Llama 2", 2023, arXiv 2307.09288; Llama Team, "The Llama 3 Herd of Models",
  2024, arXiv 2407.21783; Jiang et al., "Mistral 7B", 2023, arXiv 2310.06825; Jiang et al.,
  "Mixtral of Experts", 2024, arXiv 2401.04088 (the model shapes in ``REAL_MODELS``).
- Reference code: huggingface/transformers ``src/transformers/models/llama/modeling_llama.py``
  (``LlamaAttention``, ``repeat_kv``, ``eager_attention_forward``: same parameter names and
  half-split RoPE, tested equal); meta-llama/llama ``llama/model.py`` (``Attention`` with
  ``wq wk wv wo``, ``repeat_kv`` and a cache laid out ``(batch, seq, n_kv_heads, head_dim)``,
  interleaved RoPE).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import textwrap
import weakref
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The one private torch API in this file. A TorchDispatchMode sees every ATen operator and the
# tensors it returns, which is the only way to see what a step allocates on a CPU (torch.profiler's
# memory events cost seconds of start-up and import torch._dynamo); torch's own FlopCounterMode is
# built on it. It is used only by AllocationTracker and MatmulFlopCounter (section 2). If a future
# torch moves it, those measurements are reported as skipped, with the reason, and the rest runs.
try:
    from torch.utils._python_dispatch import TorchDispatchMode
except ImportError as err:  # a torch that moved it
    TorchDispatchMode = object  # the classes below still define; dispatch_mode_problem() says why
    _DISPATCH_IMPORT_ERROR = f"torch.utils._python_dispatch.TorchDispatchMode: {err}"
else:
    _DISPATCH_IMPORT_ERROR = ""

# =============================================================================
# 1. Implementation
# =============================================================================


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
    """(q_len, kv_len) bool: True where query i (at position kv_len - q_len + i) sees key j."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def kv_cache_bytes(
    n_layers: int, batch_size: int, n_kv_heads: int, seq_len: int, head_dim: int, bytes_per: int
) -> int:
    """2 (keys and values) * n_layers * batch * n_kv_heads * seq_len * head_dim * bytes_per."""
    return 2 * n_layers * batch_size * n_kv_heads * seq_len * head_dim * bytes_per


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
    """Pre-allocated key/value cache of one attention layer, holding only the n_kv_heads KV heads.

    ``k_cache`` and ``v_cache`` are plain tensors of shape (batch, n_kv_heads, max_seq_len,
    head_dim), allocated once; ``update`` writes new keys/values in place at ``start_pos`` and
    returns views of the filled prefix, so a decode step never reallocates the cache. Writing at
    ``start_pos < length`` rewinds: positions from ``start_pos + n`` on count as empty again.
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
        for name, value in [
            ("batch_size", batch_size),
            ("n_kv_heads", n_kv_heads),
            ("max_seq_len", max_seq_len),
            ("head_dim", head_dim),
        ]:
            if value < 1:
                raise ValueError(f"{name} ({value}) must be >= 1")
        self.batch_size, self.n_kv_heads = batch_size, n_kv_heads
        self.max_seq_len, self.head_dim = max_seq_len, head_dim
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # number of filled positions

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (batch, n_kv_heads, n, head_dim) at start_pos; return views of the prefix."""
        expected = (self.batch_size, self.n_kv_heads, self.head_dim)
        if k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != expected or v.shape != k.shape:
            raise ValueError(
                f"k and v (shapes {tuple(k.shape)} and {tuple(v.shape)}) must both have shape "
                f"(batch_size, n_kv_heads, n, head_dim) = ({expected[0]}, {expected[1]}, n, "
                f"{expected[2]})"
            )
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


def _check_heads(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None) -> int:
    """Validate the head arguments at the public boundary; return head_dim."""
    if d_model < 1:
        raise ValueError(f"d_model ({d_model}) must be >= 1")
    if n_heads < 1:
        raise ValueError(f"n_heads ({n_heads}) must be >= 1")
    if not 1 <= n_kv_heads <= n_heads:
        raise ValueError(f"n_kv_heads ({n_kv_heads}) must be between 1 and n_heads ({n_heads})")
    if n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
    if head_dim is None:
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by n_heads ({n_heads}) "
                f"when head_dim is not given"
            )
        head_dim = d_model // n_heads
    if head_dim < 2 or head_dim % 2 != 0:
        raise ValueError(
            f"head_dim ({head_dim}) must be a positive even number "
            f"(RoPE rotates pairs of dimensions)"
        )
    return head_dim


def _check_input(x: torch.Tensor, d_model: int, start_pos: int, max_seq_len: int) -> None:
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x (shape {tuple(x.shape)}) must have shape (batch, seq_len, {d_model})")
    if start_pos < 0:
        raise ValueError(f"start_pos ({start_pos}) must be >= 0")
    if start_pos + x.shape[1] > max_seq_len:
        raise ValueError(
            f"start_pos + seq_len ({start_pos} + {x.shape[1]}) must be <= max_seq_len "
            f"({max_seq_len})"
        )


class MultiHeadAttention(nn.Module):
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
        self.head_dim = _check_heads(d_model, n_heads, n_heads, None)
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len ({max_seq_len}) must be >= 1")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_heads
        self.max_seq_len, self.rope_base = max_seq_len, rope_base
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)

    def new_cache(self, batch_size: int, dtype=None, device=None) -> KVCache:
        """A cache for this layer: n_heads key/value heads (the full MHA size)."""
        w = self.k_proj.weight
        return KVCache(
            batch_size,
            self.n_heads,
            self.max_seq_len,
            self.head_dim,
            dtype or w.dtype,
            device or w.device,
        )

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None):
        """x (batch, seq_len, d_model) at positions start_pos.. -> (batch, seq_len, d_model)."""
        _check_input(x, self.d_model, start_pos, self.max_seq_len)
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


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, n_kv_heads, T, d) -> (batch, n_kv_heads * n_rep, T, d): KV head j becomes heads
    j*n_rep .. j*n_rep + n_rep - 1. The expand is a view; the reshape copies when n_rep > 1
    (unless n_kv_heads == 1: merging a size-1 dimension into the stride-0 one stays a view)."""
    if n_rep == 1:
        return x
    b, n_kv, t, d = x.shape
    x = x.unsqueeze(2).expand(b, n_kv, n_rep, t, d)  # view: stride 0 along n_rep
    return x.reshape(b, n_kv * n_rep, t, d)  # a copy, n_rep times the input's size


def attention_repeat_kv(q, k, v, mask=None):
    """Copy each KV head to its `group` query heads, then plain attention over n_heads heads.

    q (b, n_heads, q_len, d); k, v (b, n_kv_heads, kv_len, d); mask (q_len, kv_len) bool or None.
    """
    group = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, group), repeat_kv(v, group)  # (b, n_heads, kv_len, d): copies if group > 1
    q = q / math.sqrt(q.shape[-1])  # scale the q_len queries, not the kv_len scores
    scores = q @ k.transpose(-2, -1)  # (b, n_heads, q_len, kv_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v  # (b, n_heads, q_len, d)


def attention_grouped(q, k, v, mask=None):
    """Group the queries by KV head so each KV head is multiplied as is: no copy of k or v.

    Query head h = j * group + r (r = 0..group-1) reads KV head j, so viewing the heads as
    (n_kv_heads, group) lines every query head up with its KV head. Folding (group, q_len) into
    one row dimension makes each KV head one plain matmul operand of shape (kv_len, d).
    """
    b, h, s, d = q.shape
    n_kv, t = k.shape[1], k.shape[2]
    group = h // n_kv
    q = q.view(b, n_kv, group, s, d)  # (b, n_kv_heads, group, q_len, d): a view
    q = q.reshape(b, n_kv, group * s, d) / math.sqrt(d)  # reshape: a view when q_len == 1
    scores = q @ k.transpose(-2, -1)  # (b, n_kv_heads, group * q_len, kv_len)
    scores = scores.view(b, n_kv, group, s, t)  # (b, n_kv_heads, group, q_len, kv_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # (q_len, kv_len) broadcasts
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    out = probs.view(b, n_kv, group * s, t) @ v  # (b, n_kv_heads, group * q_len, d)
    return out.view(b, h, s, d)  # (b, n_heads, q_len, d): head j * group + r, a view


def attention_sdpa(q, k, v, mask=None):
    """PyTorch's fused attention; enable_gqa=True lets n_heads query heads share n_kv_heads."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


SHARING_METHODS = {
    "repeat_kv": attention_repeat_kv,
    "grouped": attention_grouped,
    "sdpa": attention_sdpa,
}


def attend(q, k, v, mask=None, sharing: str = "grouped") -> torch.Tensor:
    """Attention of q (b, n_heads, q_len, d) over k, v (b, n_kv_heads, kv_len, d) by `sharing`."""
    if sharing not in SHARING_METHODS:
        choices = ", ".join(repr(name) for name in SHARING_METHODS)
        raise ValueError(f"sharing ({sharing!r}) must be one of {choices}")
    return SHARING_METHODS[sharing](q, k, v, mask)


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): n_heads query heads share n_kv_heads KV heads.

    n_kv_heads == n_heads is MHA, n_kv_heads == 1 is MQA. Same parameters as transformers'
    LlamaAttention (q_proj (n_heads*head_dim, d_model), k_proj and v_proj (n_kv_heads*head_dim,
    d_model), o_proj), so its state_dict loads with strict=True; half-split RoPE on q and k.
    ``max_seq_len`` is the longest sequence (prompt + generated) it accepts and sizes its caches.
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
    ) -> None:
        super().__init__()
        self.head_dim = _check_heads(d_model, n_heads, n_kv_heads, head_dim)
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len ({max_seq_len}) must be >= 1")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.group = n_heads // n_kv_heads  # query heads per KV head
        self.max_seq_len, self.rope_base = max_seq_len, rope_base
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)

    def new_cache(self, batch_size: int, dtype=None, device=None) -> KVCache:
        """A cache for this layer holding n_kv_heads key/value heads for max_seq_len positions."""
        w = self.k_proj.weight
        return KVCache(
            batch_size,
            self.n_kv_heads,
            self.max_seq_len,
            self.head_dim,
            dtype or w.dtype,
            device or w.device,
        )

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        sharing: str = "grouped",
    ) -> torch.Tensor:
        """x (batch, seq_len, d_model) at positions start_pos.. -> (batch, seq_len, d_model).

        With a cache, the new keys/values are written at start_pos and the queries attend to the
        whole prefix; the causal mask is offset so query i (position start_pos + i) sees keys
        0..start_pos + i. A single-token step needs no mask (it may see every cached key).
        """
        _check_input(x, self.d_model, start_pos, self.max_seq_len)
        if sharing not in SHARING_METHODS:
            choices = ", ".join(repr(name) for name in SHARING_METHODS)
            raise ValueError(f"sharing ({sharing!r}) must be one of {choices}")
        b, s, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, s, self.n_heads, d).transpose(1, 2)
        # (batch, n_heads, seq_len, head_dim)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, d).transpose(1, 2)
        # (batch, n_kv_heads, seq_len, head_dim): the only keys/values that are ever stored
        positions = torch.arange(start_pos, start_pos + s, device=x.device)
        cos, sin = rope_cos_sin(positions, d, self.rope_base)  # (seq_len, head_dim)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # (batch, n_kv_heads, start_pos + s, head_dim)
        mask = None if s == 1 else causal_mask(s, k.shape[2], x.device)
        out = attend(q, k, v, mask, sharing)  # (batch, n_heads, seq_len, head_dim)
        out = out.transpose(1, 2).reshape(b, s, self.n_heads * d)  # (batch, seq_len, n_heads*d)
        return self.o_proj(out)


def mha_to_gqa(attn: nn.Module, n_kv_heads: int) -> GroupedQueryAttention:
    """Convert a multi-head (or finer grouped) layer to n_kv_heads KV heads by mean-pooling.

    Ainslie et al. 2023, section 2.1 (uptraining starts from the key and value projection
    matrices mean-pooled across heads) and 2.2 (for GQA, each group's key and value head is the
    mean of the original heads in that group). New KV head i serves query heads
    i*group .. (i+1)*group - 1, so it is the mean of the r = (source n_kv_heads) / n_kv_heads
    source KV heads those query heads read: W_k,i = (1/r) sum_{m<r} W_k,(i*r + m), and the
    same for W_v. RoPE is the same linear map for every head, so pooling the projection before
    RoPE equals pooling the rotated keys. q_proj and o_proj are copied. The result is exact
    when every group's heads are identical; otherwise the paper uptrains (about 5% of the
    pre-training steps) to recover quality.
    """
    src_kv = attn.n_kv_heads
    if not 1 <= n_kv_heads <= src_kv:
        raise ValueError(
            f"n_kv_heads ({n_kv_heads}) must be between 1 and the source layer's n_kv_heads "
            f"({src_kv})"
        )
    if src_kv % n_kv_heads != 0:
        raise ValueError(
            f"the source layer's n_kv_heads ({src_kv}) must be divisible by n_kv_heads "
            f"({n_kv_heads})"
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
    )
    out = out.to(device=attn.q_proj.weight.device, dtype=attn.q_proj.weight.dtype)
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


class _LightDispatchMode(TorchDispatchMode):
    """A TorchDispatchMode that does not wrap ``__torch_dispatch__`` in ``torch._dynamo.disable``.

    torch 2.15 wraps every mode's ``__torch_dispatch__`` that way unless the (private, documented
    in its docstring as a rollout flag) classmethod ``_should_skip_dynamo`` returns False; the
    wrapper imports torch._dynamo, about 4.5 s of CPU, on first use. Nothing here is compiled, so
    it is not needed. If a later torch drops the flag this override is simply never called: the
    counts stay right and only the first measurement gets slower.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


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


class AllocationTracker(_LightDispatchMode):
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
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket.__name__))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
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


_dispatch_problem: list[str] = []  # filled once by dispatch_mode_problem()


def dispatch_mode_problem() -> str:
    """'' when AllocationTracker and MatmulFlopCounter work with this torch, else the reason.

    Checked once, on known cases: a view allocates nothing, a 1 KiB clone allocates 1 KiB and is
    freed, a (4 x 8) @ (8 x 2) matmul is 128 FLOPs. A torch that changed the private API fails
    here with a clear message instead of producing wrong numbers.
    """
    if not _dispatch_problem:
        problem = _DISPATCH_IMPORT_ERROR
        if not problem:
            x = torch.ones(16, 16)
            try:
                with torch.no_grad(), AllocationTracker() as tracker:
                    x.view(-1)
                    x.clone()
                with torch.no_grad(), MatmulFlopCounter() as counter:
                    torch.ones(4, 8) @ torch.ones(8, 2)
                seen = (tracker.total_bytes, tracker.live_bytes, counter.flops)
                if seen != (x.numel() * 4, 0, 128):
                    problem = (
                        f"self-check counted (bytes, live, FLOPs) = {seen}, not (1024, 0, 128)"
                    )
            except (AttributeError, TypeError, RuntimeError) as err:
                problem = f"{type(err).__name__}: {err}"
        _dispatch_problem.append(problem)
    return _dispatch_problem[0]


def measure_allocations(fn) -> dict | None:
    """Run fn() once under AllocationTracker; bytes allocated and which operators ran.

    None when the tracker does not work with this torch (``dispatch_mode_problem()`` says why).
    Runs under no_grad, not inference_mode: inference_mode skips the autograd dispatch keys, where
    composite operators such as matmul are split into the ATen calls that really allocate.
    """
    if dispatch_mode_problem():
        return None
    with torch.no_grad(), AllocationTracker() as tracker:
        fn()
    return {
        "peak_bytes": tracker.peak_bytes,
        "total_bytes": tracker.total_bytes,
        "largest_allocation_bytes": tracker.largest_bytes,
        "largest_allocation_op": tracker.largest_op,
        "ops": sorted(set(tracker.ops)),
    }


class MatmulFlopCounter(_LightDispatchMode):
    """Count the FLOPs of every matrix multiply that actually runs (2 per multiply-add).

    Attention's FLOPs are its two batched matmuls, q.k^T and probs.v; softmax and scaling are
    O(T) per head and left out, as in the 4*h*T*d formula. (torch.utils.flop_counter does the
    same for every operator, but costs seconds to import.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm):
            self.flops += 2 * out.numel() * args[0].shape[-1]  # (.., m, k) @ (.., k, n)
        return out


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute elementwise difference between a and b."""
    return (a - b).abs().max().item()


def check_correctness(device: torch.device, atol: float = 1e-5) -> dict:
    """The script's claims on a small layer: MHA == GQA(n_kv_heads=n_heads), the three sharing
    methods agree, cached decode == full forward at every position, chunked prefill == full."""
    d_model, n_heads, seq_len = 64, 8, 12
    out: dict = {"d_model": d_model, "n_heads": n_heads, "seq_len": seq_len, "atol": atol}
    x = torch.randn(2, seq_len, d_model, device=device)
    with torch.no_grad():
        mha = MultiHeadAttention(d_model, n_heads, max_seq_len=32).to(device)
        gqa_full = GroupedQueryAttention(d_model, n_heads, n_heads, max_seq_len=32).to(device)
        gqa_full.load_state_dict(mha.state_dict(), strict=True)
        out["mha_vs_gqa_max_abs_err"] = max_abs_err(mha(x), gqa_full(x))
        per_kv = {}
        for n_kv in (n_heads, 2, 1):
            attn = GroupedQueryAttention(d_model, n_heads, n_kv, max_seq_len=32).to(device)
            full = attn(x, sharing="repeat_kv")
            err_methods = max(max_abs_err(full, attn(x, sharing=m)) for m in ("grouped", "sdpa"))
            decode_err = chunk_err = 0.0
            for method in SHARING_METHODS:
                cache = attn.new_cache(2)
                steps = [attn(x[:, i : i + 1], i, cache, method) for i in range(seq_len)]
                decode_err = max(decode_err, max_abs_err(torch.cat(steps, dim=1), full))
                cache = attn.new_cache(2)
                chunks, pos = [], 0
                for size in (5, 4, 3):  # 5 + 4 + 3 = seq_len
                    chunks.append(attn(x[:, pos : pos + size], pos, cache, method))
                    pos += size
                chunk_err = max(chunk_err, max_abs_err(torch.cat(chunks, dim=1), full))
            per_kv[str(n_kv)] = {
                "sharing_methods_max_abs_err": err_methods,
                "cached_decode_max_abs_err": decode_err,
                "chunked_prefill_max_abs_err": chunk_err,
            }
    out["per_n_kv_heads"] = per_kv
    errors = [out["mha_vs_gqa_max_abs_err"]] + [e for r in per_kv.values() for e in r.values()]
    out["all_within_atol"] = bool(max(errors) <= atol)
    return out


def divisors_descending(n: int) -> list[int]:
    return [k for k in range(n, 0, -1) if n % k == 0]


def analyze_cache_memory(
    n_layers: int, n_heads: int, head_dim: int, seq_len: int, device: torch.device
) -> dict:
    """Cache bytes measured from real KVCache tensors vs the formula, for n_kv_heads = n_heads..1,
    and the attention FLOPs of one decode step (counted by MatmulFlopCounter) vs 4*h*T*d.
    Counted FLOPs are None when the dispatch-mode counter does not work with this torch."""
    dtype, batch = torch.bfloat16, 1
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for n_kv in divisors_descending(n_heads):
        caches = [KVCache(batch, n_kv, seq_len, head_dim, dtype, device) for _ in range(n_layers)]
        measured = sum(c.nbytes for c in caches)
        formula = kv_cache_bytes(n_layers, batch, n_kv, seq_len, head_dim, bytes_per)
        flops_formula = 4 * batch * n_heads * seq_len * head_dim
        flops = None
        if not dispatch_mode_problem():
            q = torch.randn(batch, n_heads, 1, head_dim, dtype=dtype, device=device)
            with torch.no_grad(), MatmulFlopCounter() as counter:
                attention_grouped(q, caches[0].k_cache, caches[0].v_cache)
            flops = counter.flops
        read = caches[0].nbytes  # one layer's cache, read once per decode step
        rows.append(
            {
                "n_kv_heads": n_kv,
                "group_size": n_heads // n_kv,
                "measured_bytes": measured,
                "formula_bytes": formula,
                "cache_ratio_vs_mha": measured
                / kv_cache_bytes(n_layers, batch, n_heads, seq_len, head_dim, bytes_per),
                "attention_flops_per_layer": flops,
                "formula_flops_per_layer": flops_formula,
                "cache_bytes_read_per_layer": read,
                "arithmetic_intensity_flops_per_byte": flops_formula / read,
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
        "flops_equal_formula": None
        if dispatch_mode_problem()
        else all(r["attention_flops_per_layer"] == r["formula_flops_per_layer"] for r in rows),
    }


# Published shapes, from each model's config.json on the Hugging Face Hub (hidden_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads; head_dim = hidden_size /
# num_attention_heads = 128 for all) and the papers' architecture tables.
REAL_MODELS = [
    {
        "name": "Llama-2-7B",
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 32,
        "head_dim": 128,
        "source": "meta-llama/Llama-2-7b-hf config.json; arXiv 2307.09288",
    },
    {
        "name": "Llama-2-70B",
        "n_layers": 80,
        "n_heads": 64,
        "n_kv_heads": 8,
        "head_dim": 128,
        "source": "meta-llama/Llama-2-70b-hf config.json; arXiv 2307.09288",
    },
    {
        "name": "Llama-3-8B",
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "head_dim": 128,
        "source": "meta-llama/Meta-Llama-3-8B config.json; arXiv 2407.21783 Table 3",
    },
    {
        "name": "Llama-3-70B",
        "n_layers": 80,
        "n_heads": 64,
        "n_kv_heads": 8,
        "head_dim": 128,
        "source": "meta-llama/Meta-Llama-3-70B config.json; arXiv 2407.21783 Table 3",
    },
    {
        "name": "Mistral-7B",
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "head_dim": 128,
        "source": "mistralai/Mistral-7B-v0.1 config.json; arXiv 2310.06825 Table 1",
    },
    {
        "name": "Mixtral-8x7B",
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "head_dim": 128,
        "source": "mistralai/Mixtral-8x7B-v0.1 config.json; arXiv 2401.04088 Table 1",
    },
]


def analyze_real_models(contexts=(4096, 32768, 131072)) -> dict:
    """bf16 KV cache per token and at each context for the published shapes, vs MHA of the same
    shape (n_kv_heads = n_heads). Full attention everywhere (Mistral-7B's 4096-token sliding
    window would cap its cache at 4K; the table shows what full attention would need)."""
    bytes_per, rows = 2, []
    for m in REAL_MODELS:
        per_token = kv_cache_bytes(m["n_layers"], 1, m["n_kv_heads"], 1, m["head_dim"], bytes_per)
        mha = kv_cache_bytes(m["n_layers"], 1, m["n_heads"], 1, m["head_dim"], bytes_per)
        rows.append(
            {
                **m,
                "per_token_bytes": per_token,
                "mha_per_token_bytes": mha,
                "reduction_vs_mha": mha / per_token,
                "bytes_at_context": [per_token * t for t in contexts],
                "mha_bytes_at_context": [mha * t for t in contexts],
            }
        )
    return {"dtype": "bfloat16", "batch_size": 1, "context_lengths": list(contexts), "models": rows}


def paired_ratio(a_rounds: list[float], b_rounds: list[float]) -> float:
    """Median over rounds of a / b, each ratio from two times taken moments apart in one round:
    load that drifts between rounds cancels (a ratio of two medians could mix rounds)."""
    return statistics.median(a / b for a, b in zip(a_rounds, b_rounds, strict=True))


def benchmark_decode(
    d_model: int,
    n_heads: int,
    head_dim: int,
    contexts: list[int],
    min_run_time: float,
    device: torch.device,
    rounds: int = 3,
) -> dict:
    """Time one decode step (1 new token, batch 1, fp32) against a cache of T tokens, for MHA,
    GQA (n_heads/8 KV heads) and MQA through each sharing method; plus the attention core alone
    (one query token against the cache, no projections) and what a step allocates, at the
    longest context.

    Robust to a stray slow call: every time is the median over ``rounds`` rounds, and within a
    round MHA, GQA and MQA are timed back to back, so a burst of background load hits both terms
    of a ratio, or one round only; each ratio is the median of the per-round ratios. A round is
    ``median_time_s`` over >= ``min_run_time`` s of calls after a warm-up call; a step slower
    than that is timed once per round. The raw per-round times are kept (``*_rounds``) to show
    the spread.

    The caches are filled once with random keys/values (their values do not change the cost). A
    step at context T writes position T and reads T + 1 positions; before each measurement the
    cache is marked full again (every position up to the longest context still holds a key).
    """
    configs = {"MHA": n_heads, "GQA": max(1, n_heads // 8), "MQA": 1}
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
        caches[name].length = longest  # start_pos t <= length: any context can be timed next
        return lambda: layers[name](x, t, caches[name], sharing)

    def core(name: str, sharing: str):
        k = caches[name].k_cache[:, :, : longest + 1]  # (1, n_kv_heads, T + 1, head_dim)
        v = caches[name].v_cache[:, :, : longest + 1]
        return lambda: attend(queries[name], k, v, None, sharing)

    memory = {
        n: {m: measure_allocations(step(n, longest, m)) for m in SHARING_METHODS} for n in configs
    }
    step_rounds = {n: {m: [[] for _ in contexts] for m in SHARING_METHODS} for n in configs}
    core_rounds = {n: {m: [] for m in SHARING_METHODS} for n in configs}
    with torch.inference_mode():
        for _ in range(rounds):
            for i, t in enumerate(contexts):
                for m in SHARING_METHODS:
                    for n in configs:  # back to back: the three terms of a ratio
                        ms = 1e3 * median_time_s(step(n, t, m), min_run_time)
                        step_rounds[n][m][i].append(ms)
            for m in SHARING_METHODS:
                for n in configs:
                    core_rounds[n][m].append(1e3 * median_time_s(core(n, m), min_run_time))

    result: dict = {
        "d_model": d_model,
        "n_heads": n_heads,
        "head_dim": head_dim,
        "dtype": "float32",
        "batch_size": 1,
        "context_lengths": contexts,
        "rounds": rounds,
        "min_run_time_s": min_run_time,
        "configs": {},
    }
    elem = 4  # float32
    for name, n_kv in configs.items():
        attn = layers[name]
        weights = sum(p.numel() * p.element_size() for p in attn.parameters())
        core_ms = {m: statistics.median(core_rounds[name][m]) for m in SHARING_METHODS}
        core_bytes = kv_cache_bytes(1, 1, n_kv, longest + 1, head_dim, elem)  # keys + values read
        core_flops = 4 * n_heads * (longest + 1) * head_dim  # q.k and probs.v
        result["configs"][name] = {
            "n_kv_heads": n_kv,
            "group_size": attn.group,
            "step_ms": {
                m: [statistics.median(r) for r in step_rounds[name][m]] for m in SHARING_METHODS
            },
            "step_ms_rounds": step_rounds[name],
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
    mha = result["configs"]["MHA"]
    for cfg in result["configs"].values():
        cfg["step_ratio_vs_mha"] = {
            m: [
                paired_ratio(a, b)
                for a, b in zip(cfg["step_ms_rounds"][m], mha["step_ms_rounds"][m], strict=True)
            ]
            for m in SHARING_METHODS
        }
        cfg["bytes_ratio_vs_mha"] = [
            a / b
            for a, b in zip(cfg["bytes_read_per_step"], mha["bytes_read_per_step"], strict=True)
        ]
        cfg["core_ratio_vs_mha_at_longest"] = {
            m: paired_ratio(
                cfg["core_ms_rounds_at_longest"][m], mha["core_ms_rounds_at_longest"][m]
            )
            for m in SHARING_METHODS
        }
    # Noise report: the widest (max - min) / median over the rounds of any printed time.
    spread, where = 0.0, ""
    for name, cfg in result["configs"].items():
        for m in SHARING_METHODS:
            steps = zip(contexts, cfg["step_ms_rounds"][m], strict=True)
            labelled = [(f"at {t} tokens", r) for t, r in steps]
            labelled.append((f"core at {longest} tokens", cfg["core_ms_rounds_at_longest"][m]))
            for label, r in labelled:
                s = (max(r) - min(r)) / statistics.median(r)
                if s >= spread:
                    spread, where = s, f"{name} {m} {label}"
    result["largest_round_spread"] = spread
    result["largest_round_spread_at"] = where
    sdpa_memory = memory["GQA"]["sdpa"]
    if sdpa_memory is None:
        result["sdpa_kernel"] = "unknown (allocation tracking unavailable)"
    else:
        fused = [op for op in sdpa_memory["ops"] if op.startswith("_scaled_dot_product")]
        result["sdpa_kernel"] = fused[0] if fused else "math (no fused kernel ran)"
    result["allocation_tracking_problem"] = dispatch_mode_problem()
    return result


def decode_goals(decode: dict) -> dict:
    """The issue's goals, measured at the longest context (never asserted in tests).

    Memory goals are None when allocation tracking is unavailable with this torch.
    """
    gqa, mha, mqa = (decode["configs"][n] for n in ("GQA", "MHA", "MQA"))
    ratio = gqa["step_ratio_vs_mha"]["grouped"][-1]
    grouped_ms, repeat_ms = gqa["step_ms"]["grouped"][-1], gqa["step_ms"]["repeat_kv"][-1]
    copy_free_ratio = paired_ratio(
        gqa["step_ms_rounds"]["grouped"][-1], gqa["step_ms_rounds"]["repeat_kv"][-1]
    )
    core_ratio = gqa["core_ratio_vs_mha_at_longest"]["grouped"]
    mem_g, mem_r = gqa["memory_at_longest"]["grouped"], gqa["memory_at_longest"]["repeat_kv"]
    kv_ratio = gqa["n_kv_heads"] / mha["n_kv_heads"]
    proj_bytes = 2 * decode["d_model"] * decode["n_heads"] * decode["head_dim"] * 4
    read_gqa, read_mha = gqa["bytes_read_per_step"][-1], mha["bytes_read_per_step"][-1]
    core_g, core_m = gqa["core_ms_at_longest"]["grouped"], mha["core_ms_at_longest"]["grouped"]
    core_q = mqa["core_ms_at_longest"]["grouped"]
    bw_mha = mha["core_gb_per_s_at_longest"]["grouped"]
    memory_bound_ms = core_m * kv_ratio  # GQA's cache streamed at MHA's bandwidth
    remaining = (
        f"A step reads every weight plus the cache: GQA {read_gqa / 2**20:.1f} MiB vs MHA "
        f"{read_mha / 2**20:.1f} MiB, a bytes ratio of {read_gqa / read_mha:.3f}x, not "
        f"{kv_ratio:.3f}x, because q_proj and o_proj ({proj_bytes / 2**20:.1f} MiB) do not shrink "
        f"with n_kv_heads. The attention core alone takes {core_ratio:.3f}x of MHA's time: "
        f"streaming GQA's cache at MHA's {bw_mha:.1f} GB/s would take {memory_bound_ms:.2f} ms, "
        f"and it takes {core_g:.2f} ms"
    )
    if core_g <= memory_bound_ms:
        remaining += ", so the core is as memory-bound as MHA's and shrinks with the cache."
    else:
        remaining += (
            f". MQA's core, with 1/{gqa['n_kv_heads']} of GQA's cache, still takes "
            f"{core_q:.2f} ms, an upper bound on the part that does not shrink with n_kv_heads: "
            f"the same {gqa['core_flops_at_longest'] / 1e6:.0f} MFLOP per step in skinny "
            f"(group x head_dim) @ (head_dim x T) matmuls, and the n_heads x T scores written, "
            f"softmaxed and read again."
        )
    goals = {
        "context_length": decode["context_lengths"][-1],
        "gqa_n_kv_heads": gqa["n_kv_heads"],
        "kv_cache_ratio": kv_ratio,
        "gqa_vs_mha_step_time_ratio": ratio,
        "gqa_vs_mha_bytes_read_ratio": gqa["bytes_ratio_vs_mha"][-1],
        "gqa_vs_mha_core_time_ratio": core_ratio,
        "mha_core_gb_per_s": bw_mha,
        "gqa_core_memory_bound_ms": memory_bound_ms,
        "gqa_core_ms": core_g,
        "mqa_core_ms": core_q,
        "gqa_core_gflops_per_s": gqa["core_gflops_per_s_at_longest"]["grouped"],
        "gqa_step_at_most_half_of_mha": bool(ratio <= 0.5),
        "remaining_cost": remaining,
        "copy_free_step_ms": grouped_ms,
        "repeat_kv_step_ms": repeat_ms,
        "copy_free_vs_repeat_kv_time_ratio": copy_free_ratio,
        "copy_free_no_slower_than_repeat_kv": bool(copy_free_ratio <= 1.0),
        "k_cache_bytes": gqa["k_cache_bytes_at_longest"],
        "copy_free_peak_bytes": None,
        "copy_free_largest_allocation_bytes": None,
        "repeat_kv_peak_bytes": None,
        "copy_free_allocates_no_kv_sized_copy": None,
    }
    if mem_g is not None and mem_r is not None:
        goals["copy_free_peak_bytes"] = mem_g["peak_bytes"]
        goals["copy_free_largest_allocation_bytes"] = mem_g["largest_allocation_bytes"]
        goals["repeat_kv_peak_bytes"] = mem_r["peak_bytes"]
        goals["copy_free_allocates_no_kv_sized_copy"] = bool(
            mem_g["largest_allocation_bytes"] < gqa["k_cache_bytes_at_longest"]
        )
    return goals


def mha_with_similar_heads(
    d_model: int, n_heads: int, group_size: int, noise: float, device=None
) -> MultiHeadAttention:
    """An MHA layer whose key/value heads within each group of `group_size` heads are
    base + noise * N(0, std of the init): noise=0 makes them identical (the case where pooling is
    exact), small noise makes them similar (the case uptraining relies on)."""
    mha = MultiHeadAttention(d_model, n_heads, max_seq_len=64).to(device)
    d = mha.head_dim
    with torch.no_grad():
        for proj in (mha.k_proj, mha.v_proj):
            w = proj.weight.view(n_heads, d, d_model)  # (n_heads, head_dim, d_model)
            base = w[::group_size].clone()  # (n_groups, head_dim, d_model)
            heads = base.repeat_interleave(group_size, dim=0)  # (n_heads, head_dim, d_model)
            w.copy_(heads + noise * w.std() * torch.randn_like(heads))
    return mha


def analyze_conversion(d_model: int, n_heads: int, noise: float, device) -> dict:
    """Relative output error ||y_gqa - y_mha|| / ||y_mha|| of mha_to_gqa for each group count,
    on random weights, on heads similar within each group, and on identical heads."""
    x = torch.randn(2, 32, d_model, device=device)
    rows = []
    with torch.no_grad():
        for n_kv in divisors_descending(n_heads):
            group, row = n_heads // n_kv, {"n_kv_heads": n_kv, "group_size": n_heads // n_kv}
            for kind, mha in [
                ("random", MultiHeadAttention(d_model, n_heads, max_seq_len=64).to(device)),
                ("similar", mha_with_similar_heads(d_model, n_heads, group, noise, device)),
                ("identical", mha_with_similar_heads(d_model, n_heads, group, 0.0, device)),
            ]:
                y, y_gqa = mha(x), mha_to_gqa(mha, n_kv)(x)
                row[f"relative_err_{kind}"] = ((y_gqa - y).norm() / y.norm()).item()
                row[f"max_abs_err_{kind}"] = max_abs_err(y_gqa, y)
            rows.append(row)
    return {"d_model": d_model, "n_heads": n_heads, "similar_noise": noise, "rows": rows}


# =============================================================================
# 3. Figures (one function per figure, each returns the Figure)
# =============================================================================

METHOD_STYLE = {"grouped": "-", "repeat_kv": "--", "sdpa": ":"}
CONFIG_COLOR = {"MHA": "tab:red", "GQA": "tab:blue", "MQA": "tab:green"}


def tokens_label(n_tokens: int) -> str:
    """A context length as a tick label: "512", "4K", "1,536" (exact at every size)."""
    if n_tokens >= 1024 and n_tokens % 1024 == 0:
        return f"{n_tokens // 1024}K"
    return f"{n_tokens:,}"


def plot_head_sharing(n_heads: int = 8) -> plt.Figure:
    """Which KV head each query head reads, read off repeat_kv applied to the KV head indices."""
    kv_list = divisors_descending(n_heads)
    fig, axes = plt.subplots(1, len(kv_list), figsize=(3 * len(kv_list), 3.9), layout="constrained")
    names = {n_heads: "MHA", 1: "MQA"}
    for ax, n_kv in zip(axes, kv_list, strict=True):
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


def plot_cache_vs_context(real: dict) -> plt.Figure:
    """Cache size vs context for Llama-2-70B's shape with every possible n_kv_heads."""
    m = next(r for r in real["models"] if r["name"] == "Llama-2-70B")
    contexts = np.array([2**k for k in range(10, 18)])
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for n_kv in divisors_descending(m["n_heads"]):
        per_token = kv_cache_bytes(m["n_layers"], 1, n_kv, 1, m["head_dim"], 2)
        label = {m["n_heads"]: " (MHA)", 8: " (Llama-2-70B)", 1: " (MQA)"}.get(n_kv, "")
        ax.plot(
            contexts,
            contexts * per_token / 2**30,
            marker="o",
            ms=3,
            label=f"n_kv_heads={n_kv}{label}",
        )
    ax.axhline(80e9 / 2**30, color="black", ls="--", lw=1)
    ax.text(contexts[0], 80e9 / 2**30 * 1.15, "one 80 GB GPU", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache (GiB, bf16, batch 1)")
    ax.set_title("Llama-2-70B shape: cache grows with context; n_kv_heads divides it")
    ax.legend(fontsize=8, ncol=2)
    return fig


def plot_real_model_cache(real: dict, context_index: int = 1) -> plt.Figure:
    """Actual (GQA) vs same-shape MHA cache per model at one context."""
    models = real["models"]
    t = real["context_lengths"][context_index]
    x = np.arange(len(models))
    actual = [r["bytes_at_context"][context_index] / 2**30 for r in models]
    mha = [r["mha_bytes_at_context"][context_index] / 2**30 for r in models]
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    ax.bar(
        x - 0.2,
        mha,
        0.4,
        color="lightgray",
        hatch="//",
        edgecolor="gray",
        label="same shape with MHA (n_kv_heads = n_heads)",
    )
    bars = ax.bar(x + 0.2, actual, 0.4, color="tab:blue", label="as released")
    for bar, r in zip(bars, models, strict=True):
        ax.annotate(
            f"{r['reduction_vs_mha']:.0f}x",
            (bar.get_x() + 0.2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_xticks(x, [r["name"] for r in models], rotation=20)
    ax.set_ylabel(f"KV cache at {tokens_label(t)} tokens (GiB, bf16)")
    ax.set_title(f"Released models' KV cache at {tokens_label(t)} tokens, and the reduction vs MHA")
    ax.set_ylim(0, 1.3 * max(mha))  # room for the legend above the bars
    ax.legend(loc="upper center", ncol=2)
    return fig


def plot_decode_time(decode: dict) -> plt.Figure:
    """Decode step time vs context for MHA, GQA and MQA, each through the three methods."""
    fig, ax = plt.subplots(figsize=(8.5, 4.5), layout="constrained")
    t = decode["context_lengths"]
    for name, cfg in decode["configs"].items():
        for method, style in METHOD_STYLE.items():
            ax.plot(t, cfg["step_ms"][method], ls=style, marker="o", ms=3, color=CONFIG_COLOR[name])
    ratio = decode["configs"]["GQA"]["step_ratio_vs_mha"]["grouped"][-1]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(t, [tokens_label(v) for v in t])
    ax.minorticks_off()
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("cached context length (tokens)")
    ax.set_ylabel("time per decode step (ms, log scale)")
    ax.set_title(f"Decode step: GQA takes {ratio:.2f}x MHA's time at {tokens_label(t[-1])} tokens")
    # Two small legends instead of one of 9 entries: colour = config, line style = method,
    configs = [
        matplotlib.lines.Line2D(
            [],
            [],
            color=CONFIG_COLOR[n],
            marker="o",
            ms=3,
            label=f"{n} (n_kv_heads={c['n_kv_heads']})",
        )
        for n, c in decode["configs"].items()
    ]
    methods = [
        matplotlib.lines.Line2D([], [], color="black", ls=s, label=m)
        for m, s in METHOD_STYLE.items()
    ]
    # outside the axes, so no measured line is ever hidden behind them.
    fig.legend(handles=configs, loc="outside right upper", title="config (colour)")
    fig.legend(handles=methods, loc="outside right lower", title="sharing (line style)")
    return fig


def plot_sharing_methods(decode: dict) -> plt.Figure:
    """Attention core time and memory allocated per step, per sharing method, longest context."""
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    names, methods = list(decode["configs"]), list(SHARING_METHODS)
    x = np.arange(len(names))
    width = 0.8 / len(methods)
    colors = {"repeat_kv": "tab:orange", "grouped": "tab:blue", "sdpa": "tab:purple"}
    for i, method in enumerate(methods):
        offset = (i - (len(methods) - 1) / 2) * width
        times = [decode["configs"][n]["core_ms_at_longest"][method] for n in names]
        ax_t.bar(x + offset, times, width, label=method, color=colors[method])
        memory = [decode["configs"][n]["memory_at_longest"][method] for n in names]
        if None not in memory:
            peaks = [mm["peak_bytes"] / 2**20 for mm in memory]
            ax_m.bar(x + offset, peaks, width, color=colors[method])
    if decode["allocation_tracking_problem"]:
        reason = textwrap.fill(decode["allocation_tracking_problem"], 50)
        ax_m.text(
            0.5,
            0.5,
            f"allocations not measured:\n{reason}",
            transform=ax_m.transAxes,
            ha="center",
            va="center",
            fontsize=9,
        )
    k_bytes = [decode["configs"][n]["k_cache_bytes_at_longest"] / 2**20 for n in names]
    ax_m.hlines(k_bytes, x - 0.45, x + 0.45, color="black", lw=2, zorder=3)
    ax_t.plot([], [], color="black", lw=2, label="size of the layer's cached keys (right)")
    labels = [f"{n}\n(n_kv_heads={decode['configs'][n]['n_kv_heads']})" for n in names]
    t = decode["context_lengths"][-1]
    ax_t.set_xticks(x, labels)
    ax_t.set_ylabel("attention core time (ms)")
    ax_t.set_title(f"Attention core at {tokens_label(t)} tokens: repeat_kv pays for its copy")
    ax_m.set_xticks(x, labels)
    ax_m.set_yscale("log")
    ax_m.set_ylabel("peak memory allocated in one step (MiB, log)")
    ax_m.set_title("repeat_kv allocates group copies of the GQA cache")
    fig.legend(loc="outside lower center", ncol=4)
    return fig


def plot_conversion_error(conv: dict) -> plt.Figure:
    """Relative output error of mean-pooling conversion vs group size."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
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
    ax.text(g[0], eps * 1.6, f"float32 rounding ({eps:.1e})", fontsize=8, color="gray")
    if any(r[f"relative_err_{kind}"] == 0.0 for r in rows for kind in labels):
        ax.text(g[0], floor * 1.6, "exactly 0 is drawn at 1e-9", fontsize=8, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(g, [str(v) for v in g])
    ax.set_xlabel(f"group size = n_heads / n_kv_heads (n_heads = {conv['n_heads']})")
    ax.set_ylabel("relative output error ||y_gqa - y_mha|| / ||y_mha||")
    ax.set_title("Mean-pooling KV heads: exact for identical heads, small for similar ones")
    ax.legend(fontsize=8)
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
    return parser.parse_args(argv)


def mib(n_bytes: float) -> str:
    """Bytes in MiB, or in KiB below 1 MiB (so small allocations do not print as 0.0)."""
    if n_bytes < 2**20:
        return f"{n_bytes / 2**10:,.1f} KiB"
    return f"{n_bytes / 2**20:,.1f} MiB"


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
    if args.quick:
        mem_cfg = {"n_layers": 2, "n_heads": 16, "head_dim": 32, "seq_len": 512}
        bench_cfg = {"d_model": 256, "n_heads": 16, "head_dim": 16, "contexts": [512, 2048]}
        conv_cfg, min_run_time, rounds = {"d_model": 64, "n_heads": 8}, 0.001, 3
    else:
        mem_cfg = {"n_layers": 4, "n_heads": 32, "head_dim": 64, "seq_len": 2048}
        bench_cfg = {
            "d_model": 2048,
            "n_heads": 32,
            "head_dim": 64,
            "contexts": [4096, 8192, 16384, 32768],
        }
        # 3 rounds of >= 0.1 s per time: a stray slow call or load burst cannot set a ratio
        conv_cfg, min_run_time, rounds = {"d_model": 256, "n_heads": 16}, 0.1, 3

    print(f"[1/{n_stages}] checking correctness ...")
    corr = results["correctness"] = check_correctness(device)
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
    print(f"  all within atol {corr['atol']:.0e}: {corr['all_within_atol']}")

    print(f"[2/{n_stages}] measuring cache memory and attention FLOPs ...")
    mem = results["cache_memory"] = analyze_cache_memory(device=device, **mem_cfg)
    print(
        f"  {mem['n_layers']} layers, {mem['n_heads']} query heads, head_dim {mem['head_dim']}, "
        f"{mem['seq_len']} tokens, bf16"
    )
    print(
        f"  {'n_kv_heads':>10} {'measured':>12} {'formula':>12} {'vs MHA':>7} "
        f"{'FLOPs/step/layer':>17} {'FLOP/byte':>10}"
    )
    for r in mem["rows"]:
        intensity, flops = r["arithmetic_intensity_flops_per_byte"], r["attention_flops_per_layer"]
        print(
            f"  {r['n_kv_heads']:>10} {mib(r['measured_bytes']):>12} "
            f"{mib(r['formula_bytes']):>12} {r['cache_ratio_vs_mha']:>6.3f}x "
            f"{'not counted' if flops is None else f'{flops:,}':>17} {intensity:>10.1f}"
        )
    print(
        f"  measured == formula: {mem['measured_equals_formula']}; FLOPs == 4*h*T*d for every "
        f"n_kv_heads: {mem['flops_equal_formula']}"
    )
    if dispatch_mode_problem():
        print(f"  FLOPs and allocations not counted with this torch: {dispatch_mode_problem()}")

    print(f"[3/{n_stages}] KV cache of released models ...")
    real = results["real_models"] = analyze_real_models()
    ctx_heads = " ".join(f"{f'at {tokens_label(t)}':>10}" for t in real["context_lengths"])
    print(
        f"  {'model':<13} {'layers':>6} {'heads':>5} {'kv':>3} {'per token':>10} {ctx_heads} "
        f"{'MHA at 128K':>12} {'vs MHA':>7}"
    )
    for r in real["models"]:
        cols = " ".join(f"{b / 2**30:>6.1f} GiB" for b in r["bytes_at_context"])
        print(
            f"  {r['name']:<13} {r['n_layers']:>6} {r['n_heads']:>5} {r['n_kv_heads']:>3} "
            f"{r['per_token_bytes'] / 2**10:>6.0f} KiB {cols} "
            f"{r['mha_bytes_at_context'][-1] / 2**30:>8.1f} GiB {r['reduction_vs_mha']:>6.0f}x"
        )

    print(f"[4/{n_stages}] benchmarking decode steps ...")
    dec = results["decode"] = benchmark_decode(
        bench_cfg["d_model"],
        bench_cfg["n_heads"],
        bench_cfg["head_dim"],
        bench_cfg["contexts"],
        min_run_time,
        device,
        rounds,
    )
    print(
        f"  d_model {dec['d_model']}, {dec['n_heads']} query heads, head_dim {dec['head_dim']}, "
        f"fp32, batch 1; sdpa ran {dec['sdpa_kernel']}"
    )
    timing_note = (
        f"each time: median of {dec['rounds']} rounds (MHA, GQA, MQA timed back to back), each "
        f"round >= {dec['min_run_time_s']} s of calls; each ratio: median of the per-round "
        f"ratios; widest round-to-round spread "
        f"{100 * dec['largest_round_spread']:.0f}% ({dec['largest_round_spread_at']})"
    )
    print(textwrap.fill(timing_note, 96, initial_indent=" " * 2, subsequent_indent=" " * 4))
    print(
        f"  {'config':<16} {'method':<10} "
        + " ".join(f"{f'{t}':>16}" for t in dec["context_lengths"])
    )
    for name, cfg in dec["configs"].items():
        for m in SHARING_METHODS:
            cols = " ".join(
                f"{ms:>7.2f} ms {r:>5.2f}x"
                for ms, r in zip(cfg["step_ms"][m], cfg["step_ratio_vs_mha"][m], strict=True)
            )
            print(f"  {name + ' kv=' + str(cfg['n_kv_heads']):<16} {m:<10} {cols}")
    print(
        f"  at {dec['context_lengths'][-1]} tokens: {'config':<8} {'method':<10} "
        f"{'core time':>10} {'vs MHA':>7} {'peak alloc':>12} {'largest alloc (op)':>28}"
    )
    for name, cfg in dec["configs"].items():
        for m in SHARING_METHODS:
            mm = cfg["memory_at_longest"][m]
            alloc = (
                "not measured"
                if mm is None
                else (
                    f"{mib(mm['peak_bytes']):>12} {mib(mm['largest_allocation_bytes']):>12} "
                    f"({mm['largest_allocation_op']})"
                )
            )
            print(
                f"  {'':<16}{name:<8} {m:<10} {cfg['core_ms_at_longest'][m]:>7.2f} ms "
                f"{cfg['core_ratio_vs_mha_at_longest'][m]:>6.2f}x {alloc}"
            )
        print(
            f"  {'':<16}{name:<8} cached keys of the layer: {mib(cfg['k_cache_bytes_at_longest'])}"
        )
    goals = results["goals"] = decode_goals(dec)
    print(
        f"  goal: GQA step / MHA step = {goals['gqa_vs_mha_step_time_ratio']:.3f}x "
        f"(cache ratio {goals['kv_cache_ratio']:.3f}x, bytes ratio "
        f"{goals['gqa_vs_mha_bytes_read_ratio']:.3f}x); <= 0.5x: "
        f"{goals['gqa_step_at_most_half_of_mha']}"
    )
    print(
        textwrap.fill(
            goals["remaining_cost"], 96, initial_indent=" " * 4, subsequent_indent=" " * 4
        )
    )
    print(
        f"  goal: copy-free / repeat_kv step time = "
        f"{goals['copy_free_vs_repeat_kv_time_ratio']:.3f}x, no slower: "
        f"{goals['copy_free_no_slower_than_repeat_kv']}"
    )
    largest, k_bytes = goals["copy_free_largest_allocation_bytes"], goals["k_cache_bytes"]
    if largest is None:
        memory_line = f"allocations not measured: {dec['allocation_tracking_problem']}"
    else:
        memory_line = (
            f"peak allocated in one step: copy-free {mib(goals['copy_free_peak_bytes'])}, "
            f"repeat_kv {mib(goals['repeat_kv_peak_bytes'])}; copy-free largest allocation "
            f"{mib(largest)} < the layer's cached keys {mib(k_bytes)}: "
            f"{goals['copy_free_allocates_no_kv_sized_copy']}"
        )
    print(textwrap.fill(memory_line, 96, initial_indent=" " * 4, subsequent_indent=" " * 4))

    print(f"[5/{n_stages}] converting MHA to GQA by mean-pooling KV heads ...")
    conv = results["conversion"] = analyze_conversion(
        conv_cfg["d_model"], conv_cfg["n_heads"], 0.1, device
    )
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

    print(f"[6/{n_stages}] drawing figures ...")
    figures = {
        "head_sharing": plot_head_sharing(),
        "cache_vs_context": plot_cache_vs_context(real),
        "real_model_cache": plot_real_model_cache(real),
        "decode_time": plot_decode_time(dec),
        "sharing_methods": plot_sharing_methods(dec),
        "conversion_error": plot_conversion_error(conv),
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
