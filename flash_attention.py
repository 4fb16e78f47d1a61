"""FlashAttention-2 from scratch: attention in tiles with an online softmax, forward and backward.

The problem
-----------
Standard attention computes the scores S = Q K^T / sqrt(d), the probabilities P = softmax(S) and
O = P V, and keeps S and P, two T x T matrices per head, in memory. At T = 8192 that is 256 MiB
per head in fp32 for S alone; memory grows as T^2, and on a GPU the time is spent moving S and P
between the large, slow HBM and the small on-chip SRAM, not on the arithmetic.

The idea
--------
FlashAttention (Dao et al. 2022) never builds S or P. It cuts Q into blocks of rows and K, V into
blocks of columns, loads one Q block and one K, V block at a time into fast memory, and keeps for
each query row a running maximum m, a running sum l and an unnormalised output O~. When a new
block of keys raises the maximum, the old sum and output are rescaled by e^(m_old - m_new): the
*online softmax* (Milakov and Gimelshein 2018). After the last key block one division gives the
exact softmax output. Memory is O(T) (the output and two numbers per row), the result is equal to
standard attention up to floating-point rounding, and HBM traffic falls from Theta(N d + N^2) to
Theta(N^2 d^2 / M) for an SRAM of M elements (Theorem 2 of the 2022 paper). The backward pass
stores only O and the logsumexp L per row and recomputes P block by block from Q, K and L.
FlashAttention-2 (Dao 2023) puts the query blocks in the outer loop, so each query block owns its
output and running statistics, and rescales O~ once at the end instead of at every step.

The math (FlashAttention-2, arXiv 2307.08691, Algorithm 1; s = the softmax scale)
--------
    for each query block Q_i (B_r rows):                                          (A1.3)
        O~ = 0, l = 0, m = -inf                                                   (A1.5)
        for each key/value block K_j, V_j (B_c rows):                             (A1.6)
            S_ij   = s Q_i K_j^T                              (B_r x B_c)         (A1.8)
            m_new  = max(m, rowmax(S_ij));  P~ = exp(S_ij - m_new)                (A1.9)
            l      = e^(m - m_new) l + rowsum(P~)                                 (A1.9)
            O~     = diag(e^(m - m_new)) O~ + P~ V_j;  m = m_new                  (A1.10)
        O_i = diag(l)^-1 O~                                                       (A1.12)
        L_i = m + log(l)          (the logsumexp of each row of S, for the backward)  (A1.13)
The paper prints line 10 with diag(e^(m - m_new))^-1; the factor that keeps O~ consistent is
e^(m - m_new) itself (reported as Dao-AILab/flash-attention #991), as kernels compute it.
Backward (Algorithm 2), with D = rowsum(dO * O) computed once                     (A2.4)
    for each key/value block K_j, V_j, and inside it each query block Q_i:        (A2.5, A2.8)
        S = s Q_i K_j^T; P = exp(S - L_i)  (recomputed, never stored)             (A2.10, A2.11)
        dV_j += P^T dO_i;  dP = dO_i V_j^T;  dS = P * (dP - D_i)                  (A2.12-14)
        dQ_i += s dS K_j;  dK_j += s dS^T Q_i                                     (A2.15, A2.16)
Causal: a key block entirely above the diagonal is skipped, the block on the diagonal is masked,
so about half of the T^2 / (B_r B_c) blocks are never computed. The causal mask is bottom-right
aligned (queries are the last q_len of kv_len positions), as ``causal_mask`` in the other scripts.
GQA: n_heads / n_kv_heads query heads share each key/value head; here the group is folded into
the query rows, so K and V are never copied per query head.

Other attention optimizations (briefly): sliding-window attention (Mistral 7B) lets each token
see only the last ``window`` keys; its rolling-buffer KV cache stores position p in slot
p mod window, so the cache stays window tokens long however long the text gets.

Where it is used
----------------
FlashAttention-2 and -3 are the attention kernels of nearly every LLM training and serving stack
(PyTorch's ``F.scaled_dot_product_attention`` dispatches to a FlashAttention kernel on recent
GPUs and to a tiled CPU kernel here; vLLM, TensorRT-LLM, Hugging Face ``attn_implementation=
"flash_attention_2"``). Sliding windows: Mistral 7B (v0.1, W = 4096), Gemma 2 and 3 (local layers
alternating with global ones).

Run it
------
    uv run python flash_attention.py          # default sizes
    uv run python flash_attention.py --quick  # small sizes, a fast check
    uv run python flash_attention.py --out DIR --no-show --device cpu --seed 0

It prints each check and measurement, saves every figure as PNG and every printed number in
``results.json`` under ``--out`` (default ``figures/flash_attention/``).

References
----------
- Dao, Fu, Ermon, Rudra, Re, "FlashAttention: Fast and Memory-Efficient Exact Attention with
  IO-Awareness", 2022, arXiv 2205.14135 (Algorithm 0 standard attention, Theorem 2 HBM accesses).
- Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", 2023,
  arXiv 2307.08691 (Algorithm 1 forward, Algorithm 2 backward, section 3.1.1 causal masking).
- Milakov and Gimelshein, "Online normalizer calculation for softmax", 2018, arXiv 1805.02867.
- Jiang et al., "Mistral 7B", 2023, arXiv 2310.06825 (sliding window, rolling buffer cache).
- Reference code: Dao-AILab/flash-attention ``tests/test_flash_attn.py`` (``attention_ref`` and
  the "at most 2x the error of the PyTorch implementation" criterion used here for bf16);
  triton-lang/triton ``python/tutorials/06-fused-attention.py`` (the Triton forward kernel);
  mistralai/mistral-src ``mistral/cache.py`` (the rolling buffer cache).

Contents
--------
2. Core: causal_mask, naive_attention, online_softmax, flash_attention_forward (the headline),
   flash_attention_backward, FlashAttentionFunction, flash_attention, sliding_window_mask,
   sliding_window_attention, RollingKVCache; then the checks at the door (_check_*).
3. Baselines and apparatus: sdpa_attention, block_plan, skipped_block_formula,
   hbm_traffic_bytes, sram_bytes, AtenCallCounter, LiveTensorBytes, peak_bytes,
   flash_attention_forward_triton.
4. Experiments: check_equality, online_softmax_demo, tiling_plan, measure_peak_memory, hbm_traffic,
   benchmark_speed, check_sliding_window, check_triton, the claim and title wording helpers.
5. Figures: plot_tiling, plot_online_softmax, plot_peak_memory, plot_hbm_traffic, plot_speed.
6. Main: parse_args, print_* helpers, main.
7. Plumbing (identical in every script).
Read first: online_softmax (the trick on one vector), then flash_attention_forward next to
Algorithm 1, naive_attention beside it, then flash_attention_backward next to Algorithm 2.
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
import weakref
from functools import partial
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# =============================================================================
# 2. Core: naive attention, the online softmax, FlashAttention-2 forward and backward
# =============================================================================


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Boolean (q_len, kv_len) mask, True where query i may attend to key j.

    The queries are the last ``q_len`` of the ``kv_len`` positions (bottom-right aligned), so
    query i sits at absolute position ``kv_len - q_len + i`` and sees keys ``j <= that``.
    """
    offset = kv_len - q_len
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=offset)


def naive_attention(q, k, v, causal=False, scale=None, mask=None) -> torch.Tensor:
    """Standard attention (Algorithm 0 of FlashAttention): builds the whole T x T S and P.

    q (batch, n_heads, q_len, head_dim), k and v (batch, n_kv_heads, kv_len, head_dim). ``mask``
    (bool, (q_len, kv_len), True = may attend) replaces ``causal`` for other patterns.
    """
    scale = _check_attention_inputs(q, k, v, causal, scale)
    b, h, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    bad = not isinstance(mask, torch.Tensor) or (mask.shape, mask.dtype) != ((tq, tk), torch.bool)
    if mask is not None and (causal or bad or mask.device != q.device):
        raise ValueError(
            f"mask must be a bool ({tq}, {tk}) tensor on q's device ({q.device}), without causal"
        )
    if causal:
        mask = causal_mask(tq, tk, q.device)
    # NEW vs MHA: fold the group of n_heads / n_kv_heads query heads into the query rows.
    qf = q.reshape(b, hk, h // hk * tq, d)  # (batch, n_kv_heads, group * q_len, head_dim)
    # S = s Q K^T, the whole (batch, n_kv_heads, group * q_len, kv_len) score matrix
    s = (qf @ k.transpose(-2, -1)) * scale
    if mask is not None:
        s = s.view(b, hk, h // hk, tq, tk).masked_fill(~mask, float("-inf")).view_as(s)
    p = torch.softmax(s, dim=-1)  # P, a second T x T matrix
    return (p @ v).view(b, h, tq, d)  # O = P V


def online_softmax(x: torch.Tensor, block: int) -> tuple[torch.Tensor, list[float], list[float]]:
    """softmax(x) of a 1-D tensor from one pass over blocks of ``block`` values.

    Returns the softmax and, after each block, the running max m and the running sum l (of
    e^(x - m) over the values seen so far): the statistics Algorithm 1 keeps per query row.
    """
    _check_float_tensor("x", x)
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"x (shape {tuple(x.shape)}) must be a non-empty 1-D tensor")
    _check_sizes(block=block)
    m = torch.tensor(float("-inf"), dtype=x.dtype)
    l = torch.tensor(0.0, dtype=x.dtype)
    ms, ls = [], []
    for j0 in range(0, x.numel(), block):
        xj = x[j0 : j0 + block]
        m_new = torch.maximum(m, xj.max())  # (A1.9) running max
        l = torch.exp(m - m_new) * l + torch.exp(xj - m_new).sum()  # (A1.9) rescale, then add
        m = m_new
        ms.append(m.item())
        ls.append(l.item())
    return torch.exp(x - m) / l, ms, ls  # the outputs, from the final m and l


def _kv_blocks(i0, i1, q_len, kv_len, block_k, causal):
    """Key blocks (j0, j1, needs_mask) that query rows i0..i1-1 visit; the rest are skipped."""
    offset = kv_len - q_len  # query i sits at position offset + i (bottom-right aligned)
    end = min(kv_len, offset + i1) if causal else kv_len  # blocks from `end` on: all above
    for j0 in range(0, end, block_k):
        j1 = min(j0 + block_k, kv_len)
        yield j0, j1, causal and j1 - 1 > offset + i0  # some key right of row i0's diagonal


def _tile_mask(i0, i1, j0, j1, offset, device) -> torch.Tensor:
    """causal_mask(q_len, kv_len)[i0:i1, j0:j1] without building the whole mask."""
    rows = torch.arange(i0, i1, device=device) + offset  # the queries' absolute positions
    return torch.arange(j0, j1, device=device) <= rows.unsqueeze(-1)


def flash_attention_forward(
    q, k, v, causal=False, block_q=64, block_k=64, scale=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward (Algorithm 1): attention in tiles, never the T x T matrices.

    q (batch, n_heads, q_len, head_dim); k, v (batch, n_kv_heads, kv_len, head_dim) with
    n_kv_heads dividing n_heads (GQA). Returns O (like q) and the logsumexp L (batch, n_heads,
    q_len) of each score row, which the backward uses to recompute P. Half-precision inputs are
    multiplied with float32 accumulation, as on the GPU. No autograd graph is recorded: for
    gradients use ``flash_attention`` (or ``flash_attention_backward`` with O and L).

    >>> q, k = torch.ones(1, 4, 100, 16), torch.ones(1, 2, 100, 16)  # 4 query heads, 2 KV heads
    >>> O, L = flash_attention_forward(q, k, k, causal=True, block_q=32, block_k=32)
    >>> tuple(O.shape), tuple(L.shape), round(L[0, 0, -1].item(), 3)  # L = log(100 e^4)
    ((1, 4, 100, 16), (1, 4, 100), 8.605)
    """
    scale = _check_attention_inputs(q, k, v, causal, scale)
    _check_sizes(block_q=block_q, block_k=block_k)
    return _flash_forward(q, k, v, causal, block_q, block_k, scale)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32 for half types (the kernel's registers), else in the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.no_grad()
def _flash_forward(q, k, v, causal, block_q, block_k, scale):
    b, h, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g, acc = h // hk, _acc_dtype(q.dtype)
    q5 = q.view(b, hk, g, tq, d)  # NEW vs MHA: (batch, n_kv_heads, group, q_len, head_dim)
    o = torch.empty_like(q)
    lse = torch.empty(b, h, tq, dtype=acc, device=q.device)
    o5, lse4 = o.view(b, hk, g, tq, d), lse.view(b, hk, g, tq)
    for i0 in range(0, tq, block_q):  # (A1.3) outer loop over query blocks
        i1 = min(i0 + block_q, tq)
        # (A1.4) load Q_i, the group folded into the rows: (batch, n_kv_heads, group * B_r, d)
        qi = q5[:, :, :, i0:i1].reshape(b, hk, g * (i1 - i0), d).to(acc) * scale  # pre-scaled
        o_acc = torch.zeros(b, hk, g * (i1 - i0), d, dtype=acc, device=q.device)  # (A1.5) O~
        l = torch.zeros(b, hk, g * (i1 - i0), dtype=acc, device=q.device)  # (A1.5) l
        m = torch.full_like(l, float("-inf"))  # (A1.5) m
        for j0, j1, needs_mask in _kv_blocks(i0, i1, tq, tk, block_k, causal):  # (A1.6)
            kj, vj = k[:, :, j0:j1].to(acc), v[:, :, j0:j1].to(acc)  # (A1.7) load K_j, V_j
            s = qi @ kj.transpose(-2, -1)  # (A1.8) S_ij = (s Q_i) K_j^T, (batch, n_kv, g B_r, B_c)
            if needs_mask:  # the diagonal block: mask keys after each query's position
                keep = _tile_mask(i0, i1, j0, j1, tk - tq, q.device)  # (B_r, B_c)
                s.view(b, hk, g, i1 - i0, j1 - j0).masked_fill_(~keep, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))  # (A1.9) m = max(m, rowmax(S_ij))
            p = s.sub_(m_new.unsqueeze(-1)).exp_()  # (A1.9) P~ = exp(S_ij - m), in place of S_ij
            alpha = torch.exp(
                m - m_new
            )  # e^(m_old - m_new) <= 1: shrinks terms summed vs the old max
            l = alpha * l + p.sum(dim=-1)  # (A1.9) l = e^(m_old - m) l + rowsum(P~)
            # (A1.10) O~ = diag(e^(m_old - m)) O~ + P~ V_j (P~ rounded to V's dtype, as the kernel)
            o_acc.mul_(alpha.unsqueeze(-1)).add_(p.to(v.dtype).to(acc) @ vj)
            m = m_new
        o_acc.div_(l.unsqueeze(-1))  # (A1.12) O_i = diag(l)^-1 O~, once, at the end
        o5[:, :, :, i0:i1] = o_acc.view(b, hk, g, i1 - i0, d)  # (A1.14) write O_i
        lse4[:, :, :, i0:i1] = (m + torch.log(l)).view(b, hk, g, i1 - i0)  # (A1.13, A1.15) L_i
    return o, lse


def flash_attention_backward(
    q, k, v, o, lse, do, causal=False, block_q=64, block_k=64, scale=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward (Algorithm 2): dq, dk, dv from q, k, v, O, L and dO.

    P is recomputed tile by tile from q, k and the logsumexp L, never stored. With GQA, dk and dv
    sum over the query heads of each group (the folded rows do it in the matmul).
    """
    scale = _check_attention_inputs(q, k, v, causal, scale)
    _check_sizes(block_q=block_q, block_k=block_k)
    for name, t, shape in (("o", o, q.shape), ("do", do, q.shape), ("lse", lse, q.shape[:3])):
        _check_float_tensor(name, t)
        if t.shape != shape:
            raise ValueError(f"{name} (shape {tuple(t.shape)}) must have shape {tuple(shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} (on {t.device}) must be on q's device ({q.device})")
    return _flash_backward(q, k, v, o, lse, do, causal, block_q, block_k, scale)


@torch.no_grad()
def _flash_backward(q, k, v, o, lse, do, causal, block_q, block_k, scale):
    b, h, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g, acc = h // hk, _acc_dtype(q.dtype)
    q5, do5 = q.view(b, hk, g, tq, d), do.view(b, hk, g, tq, d)  # NEW vs MHA: group axis
    lse4 = lse.view(b, hk, g, tq).to(acc)
    # (A2.4) D = rowsum(dO * O): the softmax backward dS = P * (dP - rowsum(P * dP)) needs
    # rowsum(P * dP), equal to rowsum(dO * O) since dP = dO V^T and O = P V; one row sum, from O.
    dsum = (do.to(acc) * o.to(acc)).sum(dim=-1).view(b, hk, g, tq)
    dq = torch.zeros(b, hk, g, tq, d, dtype=acc, device=q.device)  # (A2.3)
    dk = torch.zeros(b, hk, tk, d, dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    blocks = [(i0, min(i0 + block_q, tq)) for i0 in range(0, tq, block_q)]
    visits: dict[int, list] = {}  # key block j0 -> the query blocks that see it
    for i0, i1 in blocks:
        for j0, j1, needs_mask in _kv_blocks(i0, i1, tq, tk, block_k, causal):
            visits.setdefault(j0, []).append((i0, i1, j1, needs_mask))
    for j0, rows in visits.items():  # (A2.5) outer loop over key/value blocks
        j1 = rows[0][2]
        kj, vj = k[:, :, j0:j1].to(acc), v[:, :, j0:j1].to(acc)  # (A2.6) load K_j, V_j
        dkj, dvj = torch.zeros_like(kj), torch.zeros_like(vj)  # (A2.7)
        for i0, i1, _, needs_mask in rows:  # (A2.8) inner loop over the query blocks
            n = g * (i1 - i0)
            # (A2.9) load Q_i (pre-scaled, as in the forward) and dO_i: (batch, n_kv, g B_r, d)
            qi = q5[:, :, :, i0:i1].reshape(b, hk, n, d).to(acc) * scale
            doi = do5[:, :, :, i0:i1].reshape(b, hk, n, d).to(acc)
            s = qi @ kj.transpose(-2, -1)  # (A2.10) S = (s Q_i) K_j^T
            if needs_mask:
                keep = _tile_mask(i0, i1, j0, j1, tk - tq, q.device)
                s = s.view(b, hk, g, i1 - i0, j1 - j0).masked_fill(~keep, float("-inf"))
                s = s.view(b, hk, n, j1 - j0)
            p = torch.exp(s - lse4[:, :, :, i0:i1].reshape(b, hk, n, 1))  # (A2.11) P, recomputed
            # (A2.12) dV_j += P^T dO_i (sums the group's rows); P rounded to the input dtype
            # before the matmul, as the kernel does (a no-op in float32)
            dvj += p.to(v.dtype).to(acc).transpose(-2, -1) @ doi
            dp = doi @ vj.transpose(-2, -1)  # (A2.13) dP = dO_i V_j^T
            ds = p * (dp - dsum[:, :, :, i0:i1].reshape(b, hk, n, 1))  # (A2.14) dS = P*(dP - D_i)
            ds = ds.to(q.dtype).to(acc)  # rounded to the input dtype before the matmuls, as P
            dq[:, :, :, i0:i1] += (scale * ds @ kj).view(b, hk, g, i1 - i0, d)  # (A2.15)
            dkj += ds.transpose(-2, -1) @ qi  # (A2.16) dK_j += s dS^T Q_i = dS^T (s Q_i)
        dk[:, :, j0:j1], dv[:, :, j0:j1] = dkj, dvj  # (A2.18) write dK_j, dV_j
    return dq.view(b, h, tq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd glue: the forward saves only q, k, v, O and L (no T x T tensor) for Algorithm 2."""

    @staticmethod
    def forward(ctx, q, k, v, causal, block_q, block_k, scale):
        o, lse = _flash_forward(q, k, v, causal, block_q, block_k, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.config = (causal, block_q, block_k, scale)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # Algorithm 2 is not differentiable itself
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_backward(q, k, v, o, lse, do.contiguous(), *ctx.config)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, causal=False, block_q=64, block_k=64, scale=None) -> torch.Tensor:
    """O = attention(q, k, v) by FlashAttention-2, differentiable: ``loss.backward()`` runs
    Algorithm 2. Same shapes and rules as ``flash_attention_forward``."""
    scale = _check_attention_inputs(q, k, v, causal, scale)
    _check_sizes(block_q=block_q, block_k=block_k)
    return FlashAttentionFunction.apply(q, k, v, causal, block_q, block_k, scale)


def sliding_window_mask(q_len: int, kv_len: int, window: int, device=None) -> torch.Tensor:
    """(q_len, kv_len) bool: query at position p (bottom-right aligned) sees keys p - window < j
    <= p, the last ``window`` positions including its own: the convention of Hugging Face
    ``transformers`` (``masking_utils.sliding_window_overlay``: kv_idx > q_idx - window) and of
    flash-attn called with ``window_size=(window - 1, 0)``: W keys, so the rolling
    cache of W slots holds exactly what a query sees. mistral-src's reference mask
    (``triu(diagonal=-sliding_window)``) keeps W + 1 keys."""
    _check_sizes(q_len=q_len, kv_len=kv_len, window=window)
    if q_len > kv_len:
        raise ValueError(f"q_len ({q_len}) must be <= kv_len ({kv_len}): queries are the last keys")
    ones = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    return ones.tril(kv_len - q_len) & ~ones.tril(kv_len - q_len - window)


def sliding_window_attention(q, k, v, window: int, scale=None) -> torch.Tensor:
    """Attention in which each query sees only the last ``window`` keys (naive reference)."""
    _check_attention_inputs(q, k, v, True, scale)
    mask = sliding_window_mask(q.shape[2], k.shape[2], window, q.device)
    return naive_attention(q, k, v, scale=scale, mask=mask)


class RollingKVCache:
    """A rolling buffer (Mistral 7B's): position p is kept in slot p % window, so the cache holds
    at most ``window`` tokens (batch, n_kv_heads, window, head_dim) however long the text grows."""

    def __init__(self, batch_size, n_kv_heads, window, head_dim, dtype=torch.float32, device=None):
        _check_sizes(batch_size=batch_size, n_kv_heads=n_kv_heads, window=window, head_dim=head_dim)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype ({dtype}) must be a floating-point torch.dtype")
        shape = (batch_size, n_kv_heads, window, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.window, self.length = window, 0  # length: tokens seen so far (not stored)

    def update(self, k, v, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (batch, n_kv_heads, n, head_dim) at ``start_pos`` (= tokens seen so far);
        return the keys and values the new queries need: the up to ``window`` cached positions
        before them, then the new ones, in position order (attend with ``sliding_window_mask``)."""
        b, h, _, d = self.k_cache.shape
        for name, t in (("k", k), ("v", v)):
            _check_float_tensor(name, t)
            if t.dim() != 4 or t.shape[:2] != (b, h) or t.shape[3] != d or t.shape != k.shape:
                raise ValueError(
                    f"{name} (shape {tuple(t.shape)}) must have shape ({b}, {h}, n, {d})"
                )
            if t.dtype != self.k_cache.dtype or t.device != self.k_cache.device:
                raise ValueError(
                    f"{name} ({t.dtype} on {t.device}) must match the cache's dtype and device"
                )
        _check_start_pos(start_pos)
        if start_pos != self.length:
            raise ValueError(
                f"start_pos ({start_pos}) must equal the tokens seen so far ({self.length}): "
                "a rolling buffer only appends"
            )
        n, w = k.shape[2], self.window
        old = torch.arange(max(0, start_pos - w), start_pos, device=k.device) % w  # their slots
        k_ctx = torch.cat((self.k_cache[:, :, old], k), dim=2)  # (batch, n_kv, <= w + n, d)
        v_ctx = torch.cat((self.v_cache[:, :, old], v), dim=2)
        keep = min(n, w)  # only the newest `window` of the new tokens are kept
        slots = torch.arange(start_pos + n - keep, start_pos + n, device=k.device) % w
        self.k_cache[:, :, slots] = k[:, :, n - keep :]
        self.v_cache[:, :, slots] = v[:, :, n - keep :]
        self.length = start_pos + n
        return k_ctx, v_ctx

    @property
    def nbytes(self) -> int:
        """Bytes held by the two buffers, measured from the tensors."""
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache))


# Validation at the door, shared by every entry point above.


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


def _check_attention_inputs(q, k, v, causal, scale) -> float:
    """The rules of every attention entry point; returns the softmax scale (1/sqrt(d) if None).

    q (batch, n_heads, q_len, head_dim); k, v (batch, n_kv_heads, kv_len, head_dim), n_kv_heads
    dividing n_heads; one float dtype and device; causal needs q_len <= kv_len.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(
                f"{name} (shape {tuple(t.shape)}) must have 4 dims "
                "(batch, heads, seq_len, head_dim)"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} ({t.dtype} on {t.device}) must match q's dtype and device")
    if k.shape != v.shape:
        raise ValueError(f"v (shape {tuple(v.shape)}) must have k's shape {tuple(k.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k batch ({k.shape[0]}) must equal q batch ({q.shape[0]})")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k head_dim ({k.shape[3]}) must equal q head_dim ({q.shape[3]})")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"n_heads ({q.shape[1]}) must be divisible by n_kv_heads ({k.shape[1]}, k.shape[1])"
        )
    if k.shape[2] < 1 or q.shape[3] < 1:
        raise ValueError(f"kv_len ({k.shape[2]}) and head_dim ({q.shape[3]}) must be >= 1")
    if not isinstance(causal, bool):
        raise TypeError(f"causal ({causal!r}) must be a bool")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"causal with q_len ({q.shape[2]}) > kv_len ({k.shape[2]}): the queries are the last "
            "q_len of the kv_len positions, so q_len must be <= kv_len"
        )
    if scale is None:
        return 1.0 / math.sqrt(q.shape[3])
    _check_positive(scale=scale)
    return float(scale)


# =============================================================================
# 3. Baselines and apparatus: SDPA, the block plan, the HBM traffic model, memory counters
# =============================================================================

BLOCK_COMPUTED, BLOCK_MASKED, BLOCK_SKIPPED = 0, 1, 2  # the codes of block_plan


def sdpa_attention(q, k, v, causal=False) -> torch.Tensor:
    """PyTorch's fused ``F.scaled_dot_product_attention`` (a tiled C++ kernel on the CPU).

    SDPA's ``is_causal`` aligns the triangle top-left; for q_len != kv_len the bottom-right
    mask of ``causal_mask`` is passed explicitly instead.
    """
    _check_attention_inputs(q, k, v, causal, None)
    gqa = k.shape[1] != q.shape[1]
    if causal and q.shape[2] != k.shape[2]:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def block_plan(q_len: int, kv_len: int, block_q: int, block_k: int, causal: bool) -> np.ndarray:
    """(query blocks, key blocks) array of BLOCK_COMPUTED / BLOCK_MASKED / BLOCK_SKIPPED: what
    flash_attention_forward does with each tile (the same ``_kv_blocks`` rule drives both)."""
    _check_sizes(q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k)
    if not isinstance(causal, bool):
        raise TypeError(f"causal ({causal!r}) must be a bool")
    if causal and q_len > kv_len:
        raise ValueError(
            f"causal with q_len ({q_len}) > kv_len ({kv_len}): q_len must be <= kv_len"
        )
    plan = np.full((-(-q_len // block_q), -(-kv_len // block_k)), BLOCK_SKIPPED)
    for i, i0 in enumerate(range(0, q_len, block_q)):
        i1 = min(i0 + block_q, q_len)
        for j0, _, needs_mask in _kv_blocks(i0, i1, q_len, kv_len, block_k, causal):
            plan[i, j0 // block_k] = BLOCK_MASKED if needs_mask else BLOCK_COMPUTED
    return plan


def skipped_block_formula(seq_len: int, block: int) -> int:
    """Causal, q_len = kv_len = T, square blocks: n = ceil(T / block) blocks a side, of which the
    n (n - 1) / 2 strictly above the diagonal are skipped (fraction (n - 1) / 2n -> 1/2)."""
    _check_sizes(seq_len=seq_len, block=block)
    n = -(-seq_len // block)
    return n * (n - 1) // 2


def hbm_traffic_bytes(seq_len: int, head_dim: int, block: int, bytes_per: int = 2) -> dict:
    """HBM bytes read + written by one head's attention forward, by a model (no hardware counter).

    standard (Algorithm 0): read Q, K, write S; read S, write P; read P, V, write O:
        (4 N d + 4 N^2) elements: Theta(N d + N^2).
    tiled (FlashAttention-2 Algorithm 1, B_r = B_c = block): read each Q_i and write each O_i
        once (2 N d), read all of K and V once per query block (2 N d ceil(N / B_r)), write L
        (N floats): Theta(N^2 d / B_r) = Theta(N^2 d^2 / M) with an SRAM of M ~ 4 B_r d elements.
    Theorem 2 of the 2022 paper counts FlashAttention-1's loop order (K, V outside, Q, O read and
    written once per key block); FA2's order counted here has the same Theta. Non-causal: the
    model visits every tile (a causal pass skips about half of the K, V reads).
    """
    _check_sizes(seq_len=seq_len, head_dim=head_dim, block=block, bytes_per=bytes_per)
    n, d = seq_len, head_dim
    standard = (4 * n * d + 4 * n * n) * bytes_per
    tiled = (2 * n * d + 2 * n * d * -(-n // block)) * bytes_per + 4 * n
    return {"standard": standard, "tiled": tiled, "ratio": standard / tiled}


def sram_bytes(block: int, head_dim: int, bytes_per: int = 2) -> int:
    """On-chip memory (SRAM + registers) one tile step needs: Q_i, K_j, V_j and O~_i (block x d
    each, O~ in float32), the S / P tile (block x block, float32) and m, l (float32). Real kernels
    keep S, P and O~ in registers, the loaded tiles in shared memory (SRAM)."""
    _check_sizes(block=block, head_dim=head_dim, bytes_per=bytes_per)
    return 3 * block * head_dim * bytes_per + block * head_dim * 4 + block * block * 4 + 8 * block


class AtenCallCounter(TorchDispatchMode):
    """Counts the ATen calls (every operation that reaches PyTorch's dispatcher: matmuls, exps,
    slices, views, copies) made while active: the small calls a Python loop pays for one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def aten_calls(fn) -> int:
    """ATen calls made by ``fn()``."""
    with torch.no_grad(), AtenCallCounter() as counter:
        fn()
    return counter.calls


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensors allocated while active, measured on any device, CPU included.

    Every ATen call passes through ``__torch_dispatch__``; each output whose storage is new (not an
    input's, not already counted) adds its bytes, and a finalizer on every tensor using that
    storage subtracts them when the last one dies. ``peak`` is the most live at once above what
    existed before. Scratch space private to one fused kernel (SDPA's) is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, tensors using it]
        self.live_bytes = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _leaf_tensors((args, kwargs))}
        for t in _leaf_tensors(out):
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr in self.live:  # a view of (or in place on) a tensor allocated while tracking
                self.live[ptr][1] += 1
            elif ptr in inputs or nbytes == 0:  # a view of memory that existed before
                continue
            else:
                self.live[ptr] = [nbytes, 1]
                self.live_bytes += nbytes
                self.peak = max(self.peak, self.live_bytes)
            weakref.finalize(t, self._release, ptr)
        return out


def _leaf_tensors(tree):
    """Every tensor in nested tuples, lists and dicts."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, list | tuple):
        for x in tree:
            yield from _leaf_tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _leaf_tensors(x)


def peak_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs (its output included, its inputs not):
    ``torch.cuda.max_memory_allocated`` on a GPU, LiveTensorBytes elsewhere."""
    if not callable(fn):
        raise TypeError(f"fn ({fn!r}) must be callable")
    if not isinstance(device, torch.device):
        raise TypeError(f"device ({device!r}) must be a torch.device")
    if device.type == "cuda":
        with torch.no_grad():
            fn()  # warm-up: cuBLAS allocates its workspace on the first matmul, once
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.no_grad(), LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


_TRITON_KERNEL: list = []  # the compiled kernel, defined on first use (importing does no work)


def _triton_kernel():
    """Define the Triton kernel on first call (needs ``triton``; runs on a CUDA GPU, or on CPU
    tensors under ``TRITON_INTERPRET=1``). The program for query block i of head (b, h)."""
    if _TRITON_KERNEL:
        return _TRITON_KERNEL[0]
    import triton
    import triton.language as tl

    @triton.jit
    def fwd_kernel(
        Q,
        K,
        V,
        O,
        L,
        sq_b,
        sq_h,
        sk_b,
        sk_h,
        n_heads,
        group,
        q_len,
        kv_len,
        scale,
        CAUSAL: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        i, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: b * stride may pass 2^31
        b, h = bh // n_heads, bh % n_heads
        hk = h // group  # NEW vs MHA: the KV head of this query head, no copy of K, V
        rows = i * BLOCK_Q + tl.arange(0, BLOCK_Q)
        dims = tl.arange(0, HEAD_DIM)
        q_ptr = Q + b * sq_b + h * sq_h + rows[:, None] * HEAD_DIM + dims[None, :]
        q = tl.load(q_ptr, mask=rows[:, None] < q_len, other=0.0)  # (A1.4) load Q_i
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # (A1.5)
        l = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
        offset = kv_len - q_len
        end = kv_len
        if CAUSAL:  # skip the key blocks above the diagonal
            end = tl.minimum(kv_len, offset + (i + 1) * BLOCK_Q)
        for j0 in range(0, end, BLOCK_K):  # (A1.6)
            cols = j0 + tl.arange(0, BLOCK_K)
            kv_off = b * sk_b + hk * sk_h + cols[:, None] * HEAD_DIM + dims[None, :]
            k = tl.load(K + kv_off, mask=cols[:, None] < kv_len, other=0.0)  # (A1.7)
            v = tl.load(V + kv_off, mask=cols[:, None] < kv_len, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale  # (A1.8)
            keep = cols[None, :] < kv_len
            if CAUSAL:
                keep = keep & (cols[None, :] <= offset + rows[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # (A1.9)
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = alpha * l + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # (A1.10)
            m = m_new
        acc = acc / l[:, None]  # (A1.12)
        tl.store(
            O + b * sq_b + h * sq_h + rows[:, None] * HEAD_DIM + dims[None, :],
            acc.to(O.dtype.element_ty),
            mask=rows[:, None] < q_len,
        )  # (A1.14)
        tl.store(L + bh * q_len + rows, m + tl.log(l), mask=rows < q_len)  # (A1.13, A1.15)

    _TRITON_KERNEL.append(fwd_kernel)
    return fwd_kernel


def triton_available() -> bool:
    """True when ``triton`` imports (whether a GPU or the interpreter can run it is separate)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attention_forward_triton(q, k, v, causal=False, block_q=64, block_k=64, scale=None):
    """The forward of ``flash_attention_forward`` as one Triton kernel (one program per query block
    and head). Optional: needs ``triton`` and a CUDA tensor (or ``TRITON_INTERPRET=1`` set before
    the first call, which runs it on CPU tensors, slowly). Block sizes and head_dim must be powers
    of two >= 16 (``tl.dot`` tiles); dtypes float32, float16, bfloat16 (``tl.dot`` has no float64;
    float32 may run as tf32 on the GPU). Under the interpreter bfloat16 ``tl.dot`` gives wrong
    numbers (a limit of the interpreter, not of the kernel): use float16 or float32 there."""
    scale = _check_attention_inputs(q, k, v, causal, scale)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q dtype ({q.dtype}) must be float32, float16 or bfloat16 for Triton")
    _check_sizes(block_q=block_q, block_k=block_k)
    for name, n in (("block_q", block_q), ("block_k", block_k), ("head_dim", q.shape[3])):
        if n < 16 or n & (n - 1):
            raise ValueError(f"{name} ({n}) must be a power of two >= 16 for the Triton kernel")
    if not triton_available():
        raise ImportError("flash_attention_forward_triton needs the triton package")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"q (on {q.device}) must be on a CUDA device (or set TRITON_INTERPRET=1)")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, tq, d = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(b, h, tq, dtype=torch.float32, device=q.device)
    grid = (-(-tq // block_q), b * h)
    _triton_kernel()[grid](
        q,
        k,
        v,
        o,
        lse,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        h,
        h // k.shape[1],
        tq,
        k.shape[2],
        scale,
        CAUSAL=causal,
        BLOCK_Q=block_q,
        BLOCK_K=block_k,
        HEAD_DIM=d,
    )
    return o, lse


# =============================================================================
# 4. Experiments: equality, the online softmax, tiling, memory, HBM traffic, speed
# =============================================================================


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


FP32_TOLERANCE = 1e-5  # max |error| allowed against SDPA and naive attention in float32
BF16_ERROR_RATIO = 2.0  # Dao's test: bf16 error vs an exact reference <= 2x the PyTorch bf16 error
MEMORY_RATIO_TARGET = 20.0  # the tiled forward's peak at T = 4096 is >= 20x below naive's
EQUALITY_CASES = {  # name: (batch, n_heads, n_kv_heads, q_len, kv_len, head_dim, causal, B_r, B_c)
    "non_causal": (2, 4, 4, 128, 128, 32, False, 32, 32),
    "causal": (2, 4, 4, 128, 128, 32, True, 32, 32),
    "causal_odd_len": (2, 4, 4, 100, 100, 32, True, 32, 16),
    "causal_gqa": (2, 8, 2, 96, 96, 32, True, 32, 32),
    "causal_q_shorter_gqa": (1, 4, 2, 40, 100, 32, True, 16, 32),
}


def _random_qkv(batch, n_heads, n_kv_heads, q_len, kv_len, head_dim, device, dtype=torch.float32):
    q = torch.randn(batch, n_heads, q_len, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, n_kv_heads, kv_len, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, n_kv_heads, kv_len, head_dim, device=device, dtype=dtype)
    return q, k, v


def _grads(attend, q, k, v, do) -> tuple[torch.Tensor, ...]:
    """Output and (dq, dk, dv) of attend(q, k, v) for the upstream gradient do."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def check_equality(device: torch.device) -> dict:
    """Forward and backward of the tiled version against SDPA and autograd through the naive
    T x T version (float32, several shapes), and the bf16 error against a float64 reference."""
    cases = {}
    for name, (b, h, hk, tq, tk, d, causal, bq, bk) in EQUALITY_CASES.items():
        q, k, v = _random_qkv(b, h, hk, tq, tk, d, device)
        do = torch.randn_like(q)
        flash = _grads(partial(flash_attention, causal=causal, block_q=bq, block_k=bk), q, k, v, do)
        naive = _grads(partial(naive_attention, causal=causal), q, k, v, do)
        sdpa = _grads(partial(sdpa_attention, causal=causal), q, k, v, do)
        cases[name] = {
            "shape": [b, h, hk, tq, tk, d],
            "blocks": [bq, bk],
            "forward_vs_sdpa": max_abs_err(flash[0], sdpa[0]),
            "forward_vs_naive": max_abs_err(flash[0], naive[0]),
            "backward_vs_sdpa": max(
                max_abs_err(a, b) for a, b in zip(flash[1:], sdpa[1:], strict=True)
            ),
            "backward_vs_naive": max(
                max_abs_err(a, b) for a, b in zip(flash[1:], naive[1:], strict=True)
            ),
        }
    out = {"tolerance": FP32_TOLERANCE, "n_cases": len(cases), "cases": cases}
    for key in ("forward", "backward"):
        out[f"max_abs_err_{key}"] = max(
            max(c[f"{key}_vs_sdpa"], c[f"{key}_vs_naive"]) for c in cases.values()
        )
    out["bf16"] = _bf16_errors(device)
    return out


def _bf16_errors(device: torch.device) -> dict:
    """bf16 tiled and bf16 naive attention, each against float64 attention on the same inputs."""
    q, k, v = _random_qkv(2, 4, 2, 256, 256, 64, device, torch.bfloat16)
    do = torch.randn_like(q)
    exact = _grads(
        lambda q, k, v: naive_attention(q, k, v, True),
        *(t.double() for t in (q, k, v)),
        do.double(),
    )
    flash = _grads(lambda q, k, v: flash_attention(q, k, v, True), q, k, v, do)
    naive = _grads(lambda q, k, v: naive_attention(q, k, v, True), q, k, v, do)
    names = ("out", "dq", "dk", "dv")
    err_flash = {n: max_abs_err(a, e) for n, a, e in zip(names, flash, exact, strict=True)}
    err_naive = {n: max_abs_err(a, e) for n, a, e in zip(names, naive, exact, strict=True)}
    ratios = {n: err_flash[n] / err_naive[n] for n in names}
    return {
        "shape": [2, 4, 2, 256, 256, 64],
        "err_flash": err_flash,
        "err_naive": err_naive,
        "ratio_flash_vs_naive": ratios,
        "max_ratio": max(ratios.values()),
    }


def online_softmax_demo(n: int = 64, block: int = 8) -> dict:
    """The online softmax on one vector whose values drift upwards, so the running max changes
    several times and the running sum must be rescaled each time."""
    x = torch.randn(n, dtype=torch.float64) + torch.linspace(0.0, 4.0, n, dtype=torch.float64)
    y, m, l = online_softmax(x, block)
    return {
        "n": n,
        "block": block,
        "x": x.tolist(),
        "running_max": m,
        "running_sum": l,
        "max_abs_err_vs_softmax": max_abs_err(y, torch.softmax(x, dim=0)),
    }


def tiling_plan(seq_len: int, block: int, seq_lens: list[int]) -> dict:
    """The causal block plan at ``seq_len``; the skipped fraction against T (plan vs formula)."""
    plan = block_plan(seq_len, seq_len, block, block, causal=True)
    counted = [int((block_plan(t, t, block, block, True) == BLOCK_SKIPPED).sum()) for t in seq_lens]
    formula = [skipped_block_formula(t, block) for t in seq_lens]
    total = [(-(-t // block)) ** 2 for t in seq_lens]
    return {
        "seq_len": seq_len,
        "block": block,
        "plan": plan.tolist(),
        "n_blocks": plan.size,
        "n_computed": int((plan == BLOCK_COMPUTED).sum()),
        "n_masked": int((plan == BLOCK_MASKED).sum()),
        "n_skipped": int((plan == BLOCK_SKIPPED).sum()),
        "skipped_fraction": float((plan == BLOCK_SKIPPED).mean()),
        "seq_lens": seq_lens,
        "skipped_counted": counted,
        "skipped_formula": formula,
        "skipped_fraction_vs_len": [s / n for s, n in zip(counted, total, strict=True)],
        "counted_equals_formula": counted == formula,
    }


def _fit_slope(xs: list[float], ys: list[float]) -> float:
    """Slope of log(y) against log(x), least squares."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def measure_peak_memory(
    device: torch.device,
    seq_lens: list[int],
    n_heads: int = 2,
    head_dim: int = 64,
    block: int = 128,
    report=None,
) -> dict:
    """Peak bytes allocated by each forward (no grad), from the real allocations, against T;
    ``report(t, {method: bytes})`` is called as each T is done."""
    methods = {
        "naive": lambda q, k, v: naive_attention(q, k, v),
        "flash": lambda q, k, v: flash_attention_forward(q, k, v, block_q=block, block_k=block),
        "sdpa": lambda q, k, v: sdpa_attention(q, k, v),
    }
    peak = {name: [] for name in methods}
    for t in seq_lens:
        q, k, v = _random_qkv(1, n_heads, n_heads, t, t, head_dim, device)
        for name, fn in methods.items():
            peak[name].append(peak_bytes(partial(fn, q, k, v), device))
        del q, k, v
        if report is not None:
            report(t, {name: p[-1] for name, p in peak.items()})
    at = max((t for t in seq_lens if t <= 4096), default=seq_lens[-1])
    i = seq_lens.index(at)
    out_bytes = [n_heads * t * head_dim * 4 for t in seq_lens]  # |O|, float32
    lse_bytes = [n_heads * t * 4 for t in seq_lens]  # L, one float32 per row
    naive_formula = [2 * n_heads * t * t * 4 + o for t, o in zip(seq_lens, out_bytes, strict=True)]
    workspace = [f - o - l for f, o, l in zip(peak["flash"], out_bytes, lse_bytes, strict=True)]
    linear = [f - workspace[-1] for f in peak["flash"]]  # O + L once the fixed part is removed
    return {
        "config": {
            "batch": 1,
            "n_heads": n_heads,
            "head_dim": head_dim,
            "block": block,
            "dtype": "float32",
            "causal": False,
        },
        "method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "LiveTensorBytes",
        "seq_lens": seq_lens,
        "peak_bytes": peak,
        "output_bytes": out_bytes,
        "lse_bytes": lse_bytes,
        "naive_formula": "2 * n_heads * T^2 * 4 (S and P, float32) + |O|",
        "naive_formula_bytes": naive_formula,
        "naive_equals_formula": peak["naive"] == naive_formula,
        "slope_fitted_over": seq_lens[-3:],
        "slope": {name: _fit_slope(seq_lens[-3:], p[-3:]) for name, p in peak.items()},
        "slope_flash_minus_workspace": _fit_slope(seq_lens[-3:], linear[-3:]),
        "ratio_at": at,
        "flash_workspace_bytes_vs_len": workspace,
        "flash_workspace_constant": len(set(workspace)) == 1,
        "flash_workspace_bytes": workspace[-1],
        "ratio_naive_vs_flash": peak["naive"][i] / peak["flash"][i],
    }


def hbm_traffic(seq_len: int, head_dims: list[int], blocks: list[int]) -> dict:
    """The Theorem 2 byte counts (bf16) at ``seq_len``: standard vs tiled for each block size,
    with the SRAM each block needs; and the two against T at block 128, head_dim 64."""
    by_block = {}
    for d in head_dims:
        rows = [hbm_traffic_bytes(seq_len, d, b) for b in blocks]
        by_block[str(d)] = {
            "standard_bytes": rows[0]["standard"],
            "tiled_bytes": [r["tiled"] for r in rows],
            "ratio": [r["ratio"] for r in rows],
            "sram_bytes": [sram_bytes(b, d) for b in blocks],
        }
    lens = [512, 1024, 2048, 4096, 8192, 16384]
    vs_len = [hbm_traffic_bytes(t, 64, 128) for t in lens]
    return {
        "seq_len": seq_len,
        "bytes_per_element": 2,
        "blocks": blocks,
        "by_head_dim": by_block,
        "seq_lens": lens,
        "standard_vs_len": [r["standard"] for r in vs_len],
        "tiled_vs_len": [r["tiled"] for r in vs_len],
        "ratio_block_128_d_64": hbm_traffic_bytes(seq_len, 64, 128)["ratio"],
        "ratio_block_16_d_64_words": less_or_more(hbm_traffic_bytes(seq_len, 64, 16)["ratio"]),
        "largest_block_in_192_kib": {
            d: max(
                (b for b, x in zip(blocks, r["sram_bytes"], strict=True) if x <= 192 * 1024),
                default=None,
            )
            for d, r in by_block.items()
        },
    }


def _time_interleaved(fns: dict, rounds: int, min_run_time: float, max_rounds: int = 7) -> dict:
    """Median seconds per call of each fn over rounds in which all are timed back to back; the
    spread is (max - min) / median over the rounds. A noisy run (spread > 25%) gets more rounds,
    up to ``max_rounds``."""
    times = {name: [] for name in fns}
    for done in range(1, max_rounds + 1):
        for name, fn in fns.items():
            times[name].append(median_time_s(fn, min_run_time))
        spread = {n: (max(ts) - min(ts)) / statistics.median(ts) for n, ts in times.items()}
        if done >= rounds and max(spread.values()) <= 0.25:
            break
    med = {n: 1e3 * statistics.median(ts) for n, ts in times.items()}
    return {"time_ms": med, "spread": spread, "rounds": done}


def benchmark_speed(device: torch.device, quick: bool) -> dict:
    """Naive, the Python tiled loop and SDPA side by side (causal), then the tiled loop's time
    against the block size."""
    b, h, t, d = (1, 2, 256, 64) if quick else (1, 4, 1024, 64)
    rounds, min_run = 3, (0.05 if quick else 0.2)
    q, k, v = _random_qkv(b, h, h, t, t, d, device)
    q8, k8, v8 = _random_qkv(b, h, h, t, t, 8, device)  # head_dim 8: 8x less matmul arithmetic
    with torch.no_grad():
        main_run = _time_interleaved(
            {
                "naive": lambda: naive_attention(q, k, v, True),
                "flash": lambda: flash_attention_forward(q, k, v, True),
                "sdpa": lambda: sdpa_attention(q, k, v, True),
                "flash_head_dim_8": lambda: flash_attention_forward(q8, k8, v8, True),
            },
            rounds,
            min_run,
        )
        blocks = [16, 32, 64, 128] if quick else [16, 32, 64, 128, 256]
        sweep = _time_interleaved(
            {
                str(bl): lambda bl=bl: flash_attention_forward(q, k, v, True, bl, bl)
                for bl in blocks
            },
            rounds,
            min_run,
        )
    ms = main_run["time_ms"]
    n_tiles = int((block_plan(t, t, 64, 64, True) != BLOCK_SKIPPED).sum())
    calls = aten_calls(lambda: flash_attention_forward(q, k, v, True))
    sweep_calls = [
        aten_calls(lambda bl=bl: flash_attention_forward(q, k, v, True, bl, bl)) for bl in blocks
    ]
    return {
        "config": {
            "batch": b,
            "n_heads": h,
            "seq_len": t,
            "head_dim": d,
            "causal": True,
            "block": 64,
            "dtype": "float32",
        },
        **main_run,
        "flash_vs_sdpa_time_ratio": ms["flash"] / ms["sdpa"],
        "naive_vs_sdpa_time_ratio": ms["naive"] / ms["sdpa"],
        "flash_vs_naive_time_ratio": ms["flash"] / ms["naive"],
        "flash_vs_sdpa_words": times_word(ms["flash"] / ms["sdpa"], "SDPA"),
        "naive_vs_sdpa_words": times_word(ms["naive"] / ms["sdpa"], "SDPA"),
        "flash_vs_naive_words": times_word(ms["flash"] / ms["naive"], "naive attention"),
        "flash_tiles": n_tiles,
        "flash_us_per_tile": 1e3 * ms["flash"] / n_tiles,
        "flash_aten_calls": calls,
        "flash_aten_calls_per_tile": calls / n_tiles,
        "head_dim_8_vs_64_time_ratio": ms["flash_head_dim_8"] / ms["flash"],
        "overhead_words": overhead_words(ms["flash_head_dim_8"] / ms["flash"]),
        "block_sweep": {
            "blocks": blocks,
            "time_ms": [sweep["time_ms"][str(x)] for x in blocks],
            "spread": [sweep["spread"][str(x)] for x in blocks],
            "aten_calls": sweep_calls,
            "fastest_block": min(blocks, key=lambda x: sweep["time_ms"][str(x)]),
        },
    }


def check_sliding_window(device: torch.device, window: int = 16, seq_len: int = 80) -> dict:
    """Decoding through a RollingKVCache (a prefill, single tokens, a chunk longer than the
    window) equals the masked naive reference, and the cache bytes stay fixed."""
    q, k, v = _random_qkv(1, 4, 2, seq_len, seq_len, 16, device)
    reference = sliding_window_attention(q, k, v, window)
    cache = RollingKVCache(1, 2, window, 16, device=device)
    big = min(2 * window, seq_len - 40)  # a chunk longer than the window, if it fits
    chunks = [10] + [1] * 20 + [big] + [1] * (seq_len - 30 - big)
    outs, nbytes, pos = [], [], 0
    for n in chunks:
        k_ctx, v_ctx = cache.update(k[:, :, pos : pos + n], v[:, :, pos : pos + n], pos)
        outs.append(sliding_window_attention(q[:, :, pos : pos + n], k_ctx, v_ctx, window))
        nbytes.append(cache.nbytes)
        pos += n
    full_cache_bytes = sum(t.numel() * t.element_size() for t in (k, v))  # every position kept
    return {
        "window": window,
        "seq_len": seq_len,
        "chunks": chunks,
        "max_abs_err_vs_masked_reference": max_abs_err(torch.cat(outs, dim=2), reference),
        "cache_bytes": nbytes[-1],
        "cache_bytes_constant": len(set(nbytes)) == 1,
        "full_cache_bytes": full_cache_bytes,
        "window_fraction_of_mask": float(
            sliding_window_mask(seq_len, seq_len, window).float().sum()
            / causal_mask(seq_len, seq_len).float().sum()
        ),
    }


TRITON_FP32_TOLERANCE = 1e-2  # max |error| in float32: tl.dot may round its inputs to tf32
TRITON_CASES = {"equal_len": (1000, 1000), "q_shorter": (300, 1000)}  # (q_len, kv_len), causal


def check_triton(device: torch.device) -> dict:
    """The Triton kernel against float64 attention, when a CUDA GPU and triton exist: float32
    within TRITON_FP32_TOLERANCE (tf32), float16 and bfloat16 within Dao's criterion (at most
    BF16_ERROR_RATIO x the error of PyTorch's attention in that dtype), for q_len = kv_len and
    q_len < kv_len; the logsumexp against the Python forward."""
    if device.type != "cuda" or not triton_available():
        why = "no CUDA device" if device.type != "cuda" else "triton is not installed"
        return {
            "ran": False,
            "status": f"not run here ({why}); the tests run it on the CPU through Triton's "
            "interpreter (TRITON_INTERPRET=1)",
        }
    cases = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for name, (tq, tk) in TRITON_CASES.items():
            q, k, v = _random_qkv(2, 8, 2, tq, tk, 64, device, dtype)
            exact = naive_attention(*(t.double() for t in (q, k, v)), True)
            o, lse = flash_attention_forward_triton(q, k, v, True)
            err = max_abs_err(o, exact)
            err_torch = max_abs_err(sdpa_attention(q, k, v, True), exact)  # PyTorch, same dtype
            limit = (
                TRITON_FP32_TOLERANCE if dtype == torch.float32 else BF16_ERROR_RATIO * err_torch
            )
            cases[f"{str(dtype)[6:]}_{name}"] = {
                "q_len": tq,
                "kv_len": tk,
                "max_abs_err_vs_float64": err,
                "pytorch_err_vs_float64": err_torch,
                "limit": limit,
                "max_abs_err_lse_vs_python": max_abs_err(
                    lse, flash_attention_forward(q, k, v, True)[1]
                ),
                "held": err <= limit,
            }
    held = all(c["held"] for c in cases.values())
    worst = max(cases.values(), key=lambda c: c["max_abs_err_vs_float64"] / c["limit"])
    return {
        "ran": True,
        "status": f"ran on {torch.cuda.get_device_name(device)}, causal, float32 / float16 / "
        f"bfloat16, q_len = kv_len and q_len < kv_len: within the limits in every case: {held} "
        f"(worst: {worst['max_abs_err_vs_float64']:.1e} against a limit of {worst['limit']:.1e})",
        "fp32_tolerance": TRITON_FP32_TOLERANCE,
        "half_error_ratio": BF16_ERROR_RATIO,
        "cases": cases,
        "held": held,
    }


def times_word(ratio: float, than: str) -> str:
    """A time ratio t_a / t_b as words about a: '3.2x slower than b', 'about as fast as b'."""
    if not math.isfinite(ratio) or ratio <= 0:
        return f"not comparable with {than}"
    if abs(math.log(ratio)) < math.log(1.05):
        return f"about as fast as {than}"
    return (
        f"{ratio:.1f}x slower than {than}" if ratio > 1 else f"{1 / ratio:.1f}x faster than {than}"
    )


def less_or_more(ratio: float) -> str:
    """A ratio standard / tiled as words about the tiled one: '3.9x less', '2.0x MORE'."""
    if abs(math.log(ratio)) < math.log(1.05):
        return "about as much"
    return f"{ratio:.1f}x less" if ratio >= 1 else f"{1 / ratio:.1f}x MORE"


def memory_statement(ratio: float, at: int, target: float = MEMORY_RATIO_TARGET) -> dict:
    """The memory claim from the measured peak ratio naive / tiled at T = ``at``."""
    if ratio >= target:
        text = (
            f"at T={at} the tiled forward's peak allocation is {ratio:.0f}x smaller than "
            f"naive attention's (at least {target:.0f}x expected)"
        )
    elif ratio > 1:
        text = (
            f"at T={at} the tiled forward's peak allocation is only {ratio:.1f}x smaller than "
            f"naive attention's: this run did not show the {target:.0f}x"
        )
    else:
        text = (
            f"at T={at} the tiled forward's peak allocation is {1 / ratio:.1f}x LARGER than "
            "naive attention's: this run did not show the saving"
        )
    return claim(text, ratio >= target, ratio=ratio, seq_len=at)


def slope_statement(naive: float, flash: float, flash_linear: float | None = None) -> dict:
    """The scaling claim from the fitted log-log slopes of peak memory vs T; ``flash_linear`` is
    the tiled slope once its fixed tile workspace is subtracted (the fixed part bends the fit)."""
    tiled = flash if flash_linear is None else flash_linear
    held = abs(naive - 2) <= 0.3 and abs(tiled - 1) <= 0.1
    text = (
        f"peak memory grows as T^{naive:.2f} for naive attention and T^{flash:.2f} for the "
        "tiled forward"
    )
    if flash_linear is not None:
        text += f" (T^{flash_linear:.2f} once its fixed tile workspace is subtracted)"
    text += ": quadratic vs linear" if held else ": this run did not show quadratic vs linear"
    return claim(text, held, slope_naive=naive, slope_flash=flash, slope_flash_linear=tiled)


def overhead_words(head_dim_8_vs_64: float) -> str:
    """What the head_dim-8 timing says: time that barely falls with 8x less matmul arithmetic is
    mostly a fixed cost per call."""
    if head_dim_8_vs_64 >= 0.5:
        return "so a fixed cost per call, not arithmetic, is the likely main cost"
    return "so arithmetic is a large share of it in this run"


def speed_statement(speed: dict) -> dict:
    """The speed claim: the Python tiled loop against SDPA's fused kernel, with the spread."""
    ratio = speed["flash_vs_sdpa_time_ratio"]
    spread = max(speed["spread"]["flash"], speed["spread"]["sdpa"])
    r8 = speed["head_dim_8_vs_64_time_ratio"]
    why = overhead_words(r8)
    text = (
        f"the Python tiled loop is {times_word(ratio, 'SDPA')} (spread {spread:.0%} over "
        f"rounds): each of its {speed['flash_tiles']} tiles costs "
        f"{speed['flash_us_per_tile']:.0f} us and {speed['flash_aten_calls_per_tile']:.0f} ATen "
        f"calls (counted); at head_dim 8 (8x less matmul arithmetic) it takes {r8:.0%} of the "
        f"time, {why}. SDPA runs the same algorithm with larger tiles, as compiled C++"
    )
    slower = ratio > 1 + spread
    if 1 < ratio <= 1 + spread:
        text = (
            f"the Python tiled loop was {times_word(ratio, 'SDPA')}, within this run's spread "
            f"({spread:.0%}): too noisy to show the cost of its many small calls"
        )
    elif ratio <= 1:
        text = (
            f"the Python tiled loop was {times_word(ratio, 'SDPA')} in this run (spread "
            f"{spread:.0%}): this run did not show the cost of its many small calls"
        )
    return claim(text, slower, ratio=ratio, spread=spread)


def memory_title(mem: dict) -> str:
    """The peak-memory figure's title, from the measured slopes and ratio."""
    ratio, s = mem["ratio_naive_vs_flash"], mem["slope"]
    word = f"{ratio:.0f}x less" if ratio >= 1 else f"{1 / ratio:.1f}x MORE"
    return (
        f"Peak memory: naive ~ T^{s['naive']:.2f}, tiled ~ T^{s['flash']:.2f}; "
        f"tiled uses {word} at T={mem['ratio_at']}"
    )


def hbm_titles(traffic: dict) -> tuple[str, str]:
    """The two titles of the HBM figure, from the modelled ratios and on-chip bytes."""
    row, blocks = traffic["by_head_dim"]["64"], traffic["blocks"]
    lo, hi = row["ratio"][0], row["ratio"][-1]
    trend = "less the bigger its tiles" if hi > lo else "NOT less with bigger tiles"
    left = (
        f"HBM traffic model (T={traffic['seq_len']}, bf16, non-causal), head_dim 64:\n"
        f"the tiled version moves {less_or_more(lo)} at blocks of {blocks[0]}, "
        f"{less_or_more(hi)} at blocks of {blocks[-1]}:\n{trend}"
    )
    fits = ", ".join(
        f"head_dim {d}: {b if b is not None else 'none'}"
        for d, b in traffic["largest_block_in_192_kib"].items()
    )
    right = (
        "On-chip memory (SRAM + registers) for one tile step:\nQ_i, K_j, V_j, O~_i and the S tile;"
        f" largest block within an A100 SM's 192 KiB:\n{fits}"
    )
    return left, right


def sweep_title(speed: dict) -> str:
    """The block-size panel's title, from the measured times and counted calls."""
    sw = speed["block_sweep"]
    i = sw["blocks"].index(sw["fastest_block"])
    return (
        f"Tiled loop vs block size: fastest at {sw['fastest_block']} ({sw['time_ms'][i]:.1f} ms)\n"
        f"ATen calls: {sw['aten_calls'][0]} at blocks of {sw['blocks'][0]}, "
        f"{sw['aten_calls'][-1]} at {sw['blocks'][-1]}"
    )


def speed_title(speed: dict) -> str:
    """The timing figure's title, from the measured ratios."""
    return (
        f"T={speed['config']['seq_len']}, causal, 1 thread: the Python tiled loop is\n"
        f"{times_word(speed['flash_vs_sdpa_time_ratio'], 'SDPA')}, naive "
        f"{times_word(speed['naive_vs_sdpa_time_ratio'], 'SDPA')}"
    )


def collect_claims(
    eq: dict, demo: dict, tiling: dict, mem: dict, traffic: dict, speed: dict, window: dict
) -> dict:
    """Every claim the run prints, each computed from the numbers above."""
    fwd, bwd, bf16 = eq["max_abs_err_forward"], eq["max_abs_err_backward"], eq["bf16"]
    frac = tiling["skipped_fraction_vs_len"][-1]
    ok = fwd <= FP32_TOLERANCE and bwd <= FP32_TOLERANCE
    return {
        "fp32_equal": claim(
            f"float32 forward and backward equal SDPA and autograd through naive attention to "
            f"{max(fwd, bwd):.1e} (tolerance {FP32_TOLERANCE:.0e}), over {len(eq['cases'])} "
            "shapes: causal, odd lengths, GQA" + ("" if ok else ": this run exceeded it"),
            ok,
            max_abs_err_forward=fwd,
            max_abs_err_backward=bwd,
        ),
        "bf16_error": claim(
            f"in bf16 the tiled version's error against float64 is at most {bf16['max_ratio']:.2f}x"
            f" that of naive bf16 attention (output and gradients; at most {BF16_ERROR_RATIO:g}x "
            "allowed)",
            bf16["max_ratio"] <= BF16_ERROR_RATIO,
            max_ratio=bf16["max_ratio"],
        ),
        "online_softmax": claim(
            f"the online softmax over blocks of {demo['block']} equals torch.softmax to "
            f"{demo['max_abs_err_vs_softmax']:.1e}",
            demo["max_abs_err_vs_softmax"] <= 1e-12,
            max_abs_err=demo["max_abs_err_vs_softmax"],
        ),
        "skipped_blocks": claim(
            f"causal: the counted skipped blocks equal n(n-1)/2 at every T "
            f"({tiling['counted_equals_formula']}), {frac:.1%} of the blocks at T="
            f"{tiling['seq_lens'][-1]} (tends to 1/2)",
            tiling["counted_equals_formula"] and abs(frac - 0.5) < 0.01,
            fraction=frac,
        ),
        "memory_ratio": memory_statement(mem["ratio_naive_vs_flash"], mem["ratio_at"]),
        "memory_slope": slope_statement(
            mem["slope"]["naive"], mem["slope"]["flash"], mem["slope_flash_minus_workspace"]
        ),
        "naive_memory_formula": claim(
            f"naive attention's measured peak equals {mem['naive_formula']} at every T "
            f"({mem['naive_equals_formula']})",
            mem["naive_equals_formula"],
        ),
        "hbm_traffic": claim(
            f"HBM traffic model (non-causal, no hardware counter) at T={traffic['seq_len']}, "
            f"head_dim 64, blocks of 128: standard attention moves "
            f"{traffic['ratio_block_128_d_64']:.1f}x the bytes of the tiled one",
            traffic["ratio_block_128_d_64"] > 1,
            ratio=traffic["ratio_block_128_d_64"],
        ),
        "speed": speed_statement(speed),
        "sliding_window": claim(
            f"sliding window {window['window']}: decoding through the rolling cache equals the "
            f"masked reference to {window['max_abs_err_vs_masked_reference']:.1e}, with the cache "
            f"fixed at {window['cache_bytes']} bytes (a full cache: {window['full_cache_bytes']})",
            window["max_abs_err_vs_masked_reference"] <= FP32_TOLERANCE
            and window["cache_bytes_constant"],
            max_abs_err=window["max_abs_err_vs_masked_reference"],
        ),
    }


# =============================================================================
# 5. Figures
# =============================================================================


def plot_tiling(tiling: dict) -> plt.Figure:
    """Which (query block, key block) tiles are computed, masked or skipped under causal, and the
    skipped fraction against T."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [1, 1.2]})
    colors = ["#4c72b0", "#f0a04b", "#e8e8e8"]
    plan = np.array(tiling["plan"])
    ax.imshow(plan, cmap=ListedColormap(colors), vmin=-0.5, vmax=2.5)
    n_q, n_k = plan.shape
    ax.set_xticks(np.arange(n_k) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_q) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel(f"key/value block j (B_c = {tiling['block']} keys)")
    ax.set_ylabel(f"query block i (B_r = {tiling['block']} queries)")
    ax.set_title(
        f"Causal, T={tiling['seq_len']}: {tiling['n_skipped']} of {tiling['n_blocks']} "
        "tiles skipped",
        fontsize=10,
    )
    labels = [
        f"computed ({tiling['n_computed']})",
        f"masked, on the diagonal ({tiling['n_masked']})",
        f"skipped, above it ({tiling['n_skipped']})",
    ]
    ax.legend(
        handles=[Patch(color=c, label=t) for c, t in zip(colors, labels, strict=True)],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        ncol=1,
        fontsize=8,
        frameon=False,
    )
    lens, frac = tiling["seq_lens"], tiling["skipped_fraction_vs_len"]
    ax2.plot(lens, frac, "o-", label="counted from the block plan")
    n = [-(-t // tiling["block"]) for t in lens]
    ax2.plot(lens, [(k - 1) / (2 * k) for k in n], "k:", label="formula (n - 1) / 2n")
    ax2.axhline(0.5, color="grey", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(lens, [str(t) for t in lens])
    ax2.set_ylim(0, 0.55)
    ax2.set_xlabel("sequence length T (queries = keys)")
    ax2.set_ylabel("fraction of tiles skipped")
    ax2.set_title(
        f"Skipped fraction -> 1/2 ({frac[-1]:.1%} at T={lens[-1]}, blocks of {tiling['block']})",
        fontsize=10,
    )
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_online_softmax(demo: dict) -> plt.Figure:
    """The vector, block by block, with the running max; and the running sum after each block."""
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    x, block, n = np.array(demo["x"]), demo["block"], demo["n"]
    edges = np.arange(0, n, block)
    for k, j0 in enumerate(edges):
        idx = np.arange(j0, min(j0 + block, n))
        ax.bar(idx, x[idx], color=f"C{k % 2}", width=0.8)
    ends = [min(j0 + block, n) - 0.5 for j0 in edges]
    ax.step(
        [-0.5, *ends],
        [demo["running_max"][0], *demo["running_max"]],
        where="pre",
        color="k",
        label="running max m after each block",
    )
    ax.set_ylabel("x_j")
    ax.set_title(
        f"Online softmax over blocks of {block}: m only grows; when it does, l is "
        f"rescaled by e^(m_old - m_new)\n(final softmax = torch.softmax to "
        f"{demo['max_abs_err_vs_softmax']:.0e})",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8)
    ax2.plot(
        ends,
        demo["running_sum"],
        "o-",
        color="C2",
        label="running sum l = sum of e^(x_j - m) over the blocks seen",
    )
    raised = [i for i in range(1, len(ends)) if demo["running_max"][i] > demo["running_max"][i - 1]]
    ax2.plot(
        [ends[i] for i in raised],
        [demo["running_sum"][i] for i in raised],
        "o",
        mfc="none",
        mec="C3",
        ms=11,
        label="blocks that raised m (old l rescaled)",
    )
    ax2.set_xlabel("position j in the vector (blocks alternate in colour)")
    ax2.set_ylabel("l")
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_peak_memory(mem: dict) -> plt.Figure:
    """Peak bytes allocated by each forward against T, log-log, with the fitted slopes."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    names = {
        "naive": "naive (builds S and P)",
        "flash": "tiled, FlashAttention-2 (Python)",
        "sdpa": "SDPA (fused; its private scratch is not seen)",
    }
    lens = mem["seq_lens"]
    for name, label in names.items():
        mib = [b / 2**20 for b in mem["peak_bytes"][name]]
        ax.plot(lens, mib, "o-", label=f"{label}: slope {mem['slope'][name]:.2f}")
    ax.plot(lens, [b / 2**20 for b in mem["output_bytes"]], "k:", label="the output O itself")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lens, [str(t) for t in lens])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("peak allocated during the forward (MiB)")
    c = mem["config"]
    ax.set_title(
        memory_title(mem) + f"\n(batch 1, {c['n_heads']} heads, head_dim {c['head_dim']}, fp32, "
        f"blocks of {c['block']}; measured by {mem['method']};\nslopes fitted over T = "
        f"{mem['slope_fitted_over'][0]} .. {mem['slope_fitted_over'][-1]})",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_hbm_traffic(traffic: dict) -> plt.Figure:
    """Standard / tiled HBM bytes (the Theorem 2 counts) against the block size, and the SRAM one
    tile step needs."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    blocks = traffic["blocks"]
    for d, row in traffic["by_head_dim"].items():
        ax.plot(blocks, row["ratio"], "o-", label=f"head_dim {d}")
        ax2.plot(blocks, [b / 1024 for b in row["sram_bytes"]], "o-", label=f"head_dim {d}")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("block size B_r = B_c")
    ax.set_ylabel("standard bytes / tiled bytes")
    left, right = hbm_titles(traffic)
    ax.set_title(left, fontsize=9)
    ax.legend(fontsize=8)
    ax2.axhline(192, color="C3", ls="--", lw=1, label="A100: 192 KiB L1/shared memory per SM")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("block size B_r = B_c")
    ax2.set_ylabel("on-chip memory for one tile step (KiB)")
    for a in (ax, ax2):
        a.set_xticks(blocks, [str(b) for b in blocks])
    ax2.set_title(right, fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_speed(speed: dict) -> plt.Figure:
    """Median time of each method with its spread, and the tiled loop against the block size."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = ["naive", "flash", "sdpa"]
    labels = ["naive", "tiled (Python loop)", "SDPA (fused C++)"]
    ms = [speed["time_ms"][n] for n in names]
    err = [speed["time_ms"][n] * speed["spread"][n] / 2 for n in names]
    ax.bar(labels, ms, yerr=err, capsize=4, color=["C0", "C1", "C2"])
    for x, (name, t, e) in enumerate(zip(names, ms, err, strict=True)):
        ratio = speed["time_ms"][name] / speed["time_ms"]["sdpa"]
        word = "" if name == "sdpa" else f"\n{times_word(ratio, 'SDPA')}"
        ax.annotate(
            f"{t:.2f} ms{word}",
            (x, t + e),
            xytext=(0, 12),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    ax.set_ylim(0, 1.3 * max(m + e for m, e in zip(ms, err, strict=True)))
    ax.set_ylabel("median time per forward (ms)")
    ax.set_xlabel("error bars: spread (max - min) over the interleaved rounds", fontsize=8)
    ax.set_title(speed_title(speed), fontsize=9)
    sweep = speed["block_sweep"]
    err2 = [t * s / 2 for t, s in zip(sweep["time_ms"], sweep["spread"], strict=True)]
    ax2.errorbar(
        sweep["blocks"],
        sweep["time_ms"],
        yerr=err2,
        fmt="o-",
        capsize=3,
        color="C1",
        label="tiled (Python loop)",
    )
    ax2.axhline(speed["time_ms"]["sdpa"], color="C2", ls="--", label="SDPA (fused C++), reference")
    ax2.legend(fontsize=8, loc="upper right")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax2.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax2.set_xticks(sweep["blocks"], [str(b) for b in sweep["blocks"]])
    ax2.set_xlabel("block size B_r = B_c")
    ax2.set_ylabel("median time per forward (ms)")
    ax2.set_title(sweep_title(speed), fontsize=9)
    fig.tight_layout()
    return fig


# =============================================================================
# 6. Main
# =============================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser()
    return parse_flags(parser, argv)


def print_equality(eq: dict) -> None:
    print(
        f"  {'case':<22} {'shape (b,h,hkv,Tq,Tk,d)':<26} {'fwd vs SDPA':>11} {'fwd vs naive':>12}"
        f" {'bwd vs SDPA':>11} {'bwd vs naive':>12}"
    )
    for name, c in eq["cases"].items():
        print(
            f"  {name:<22} {str(tuple(c['shape'])):<26} {c['forward_vs_sdpa']:>11.1e} "
            f"{c['forward_vs_naive']:>12.1e} {c['backward_vs_sdpa']:>11.1e} "
            f"{c['backward_vs_naive']:>12.1e}"
        )
    bf = eq["bf16"]
    for n, r in bf["ratio_flash_vs_naive"].items():
        print(
            f"  bf16 {n:<4} error vs float64: tiled {bf['err_flash'][n]:.2e}, naive "
            f"{bf['err_naive'][n]:.2e} (ratio {r:.2f})"
        )


def print_online_softmax(demo: dict) -> None:
    print(
        f"  {demo['n']} values in blocks of {demo['block']}; running max m: "
        + ", ".join(f"{m:.2f}" for m in demo["running_max"])
    )
    print(
        "  running sum l: "
        + ", ".join(f"{s:.2f}" for s in demo["running_sum"])
        + f"; max |online - torch.softmax| = {demo['max_abs_err_vs_softmax']:.1e}"
    )


def print_tiling(tiling: dict) -> None:
    print(
        f"  T={tiling['seq_len']}, blocks of {tiling['block']}: {tiling['n_computed']} computed, "
        f"{tiling['n_masked']} masked, {tiling['n_skipped']} skipped of {tiling['n_blocks']}"
    )
    print(
        "  skipped fraction vs T: "
        + ", ".join(
            f"{t}: {f:.3f}"
            for t, f in zip(tiling["seq_lens"], tiling["skipped_fraction_vs_len"], strict=True)
        )
        + f"; counted == n(n-1)/2: {tiling['counted_equals_formula']}"
    )


def print_memory_row(t: int, peak: dict) -> None:
    p = [peak[n] / 2**20 for n in ("naive", "flash", "sdpa")]
    print(
        f"  T={t:>5}: peak MiB naive {p[0]:8.2f}, tiled {p[1]:6.2f}, SDPA {p[2]:6.2f}", flush=True
    )


def print_memory(mem: dict) -> None:
    s = mem["slope"]
    print(
        f"  log-log slopes: naive {s['naive']:.2f}, tiled {s['flash']:.2f} "
        f"({mem['slope_flash_minus_workspace']:.2f} without its fixed workspace of "
        f"{mem['flash_workspace_bytes'] / 2**20:.2f} MiB), SDPA {s['sdpa']:.2f};"
        f" naive / tiled at T={mem['ratio_at']}: {mem['ratio_naive_vs_flash']:.1f}x"
    )
    print(f"  naive peak = {mem['naive_formula']} at every T: {mem['naive_equals_formula']}")


def print_traffic(traffic: dict) -> None:
    row = traffic["by_head_dim"]["64"]
    print(
        f"  T={traffic['seq_len']}, head_dim 64, bf16: standard "
        f"{row['standard_bytes'] / 2**20:.0f} MiB; tiled by block: "
        + ", ".join(
            f"{b}: {t / 2**20:.0f} MiB ({less_or_more(r)})"
            for b, t, r in zip(traffic["blocks"], row["tiled_bytes"], row["ratio"], strict=True)
        )
    )


def print_speed(speed: dict) -> None:
    c, ms, sp = speed["config"], speed["time_ms"], speed["spread"]
    print(
        f"  batch {c['batch']}, {c['n_heads']} heads, T={c['seq_len']}, head_dim {c['head_dim']}"
        f", causal, fp32, 1 thread, median of {speed['rounds']} interleaved rounds:"
    )
    for name in ("naive", "flash", "sdpa"):
        print(f"  {name:<6} {ms[name]:8.2f} ms (spread {sp[name]:.0%})")
    print(
        f"  tiled: {speed['flash_vs_sdpa_words']}, {speed['flash_vs_naive_words']}; naive: "
        f"{speed['naive_vs_sdpa_words']}"
    )
    print(
        f"  tiled: {speed['flash_aten_calls']} ATen calls for {speed['flash_tiles']} tiles "
        f"({speed['flash_aten_calls_per_tile']:.1f} per tile, {speed['flash_us_per_tile']:.0f} us "
        f"per tile); at head_dim 8 {ms['flash_head_dim_8']:.2f} ms "
        f"({speed['head_dim_8_vs_64_time_ratio']:.0%} of head_dim 64)"
    )
    sw = speed["block_sweep"]
    print(
        "  tiled loop by block size: "
        + ", ".join(f"{b}: {t:.1f} ms" for b, t in zip(sw["blocks"], sw["time_ms"], strict=True))
    )


def print_window(window: dict, triton: dict) -> None:
    print(
        f"  window {window['window']}, {window['seq_len']} tokens in chunks: max |error| vs "
        f"masked reference {window['max_abs_err_vs_masked_reference']:.1e}; cache "
        f"{window['cache_bytes']} bytes at every step (full cache {window['full_cache_bytes']})"
    )
    print(f"  Triton kernel: {triton['status']}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    results: dict = {"meta": run_meta(args, device)}
    n = 7
    print(f"[1/{n}] checking equality with SDPA and naive attention (fp32, bf16) ...")
    results["equality"] = eq = check_equality(device)
    print_equality(eq)
    print(f"[2/{n}] running the online softmax on one vector ...")
    results["online_softmax"] = demo = online_softmax_demo()
    print_online_softmax(demo)
    print(f"[3/{n}] planning causal tiles ...")
    lens = [256, 512, 1024, 2048, 4096, 8192, 16384]
    results["tiling"] = tiling = tiling_plan(512, 64, lens)
    print_tiling(tiling)
    print(f"[4/{n}] measuring peak memory against T ...")
    mem_lens = [256, 512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192]
    results["memory"] = mem = measure_peak_memory(device, mem_lens, report=print_memory_row)
    print_memory(mem)
    print(f"[5/{n}] modelling HBM traffic (FlashAttention Theorem 2) ...")
    results["hbm_traffic"] = traffic = hbm_traffic(4096, [64, 128], [16, 32, 64, 128, 256, 512])
    print_traffic(traffic)
    print(f"[6/{n}] timing naive, tiled and SDPA side by side ...")
    results["speed"] = speed = benchmark_speed(device, args.quick)
    print_speed(speed)
    print(f"[7/{n}] checking sliding-window attention and the Triton kernel ...")
    results["sliding_window"] = window = check_sliding_window(device)
    results["triton"] = triton = check_triton(device)
    print_window(window, triton)
    results["claims"] = collect_claims(eq, demo, tiling, mem, traffic, speed, window)
    print("claims:")
    print_claims(results["claims"])
    figures = {
        "tiling": plot_tiling(tiling),
        "online_softmax": plot_online_softmax(demo),
        "peak_memory": plot_peak_memory(mem),
        "hbm_traffic": plot_hbm_traffic(traffic),
        "speed": plot_speed(speed),
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
