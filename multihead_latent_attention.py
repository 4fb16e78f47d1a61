"""Multi-head Latent Attention (MLA): DeepSeek's latent KV cache, decoupled RoPE, absorption.

The problem
-----------
Autoregressive decoding keeps every past key and value. Multi-head attention (MHA) caches
``2 * n_heads * head_dim`` numbers per token per layer: for DeepSeek-V2's 128 heads of 128 dims
over 60 layers that is 3.75 MiB per token in bf16, so a 128K-token context needs 480 GiB of
cache. GQA and MQA shrink it by sharing keys and values between heads, and pay in quality.

The idea
--------
MLA (DeepSeek-V2, section 2.1) caches one small latent vector per token instead of per-head keys
and values: ``c_kv`` (``kv_lora_rank`` = 512 numbers) from which every head's key and value can be
rebuilt by an up-projection, plus one shared rotary key ``k_pe`` (``qk_rope_head_dim`` = 64):
576 numbers per token per layer, 57x less than MHA at the same heads. Because the up-projections
are linear, decoding never has to rebuild the keys: the key up-projection is folded into the
query and the value up-projection into the output ("absorption"), and attention runs directly
on the cached latents. RoPE cannot be applied to the up-projected keys (it would sit between the
two matrices being folded), so positions are carried by a separate, small, "decoupled" rotary
part of each query head and one rotary key shared by all heads.

The math (DeepSeek-V2 section 2.1, its equation numbers; per token t, head i; checkpoint names)
--------
    (9)  c_kv_t  = RMSNorm(W_DKV h_t)            kv_a_proj_with_mqa rows [:d_c], kv_a_layernorm
    (10) k_nope_{t,i} = W_UK_i c_kv_t            kv_b_proj rows of head i, first qk_nope_head_dim
    (11) v_{t,i}      = W_UV_i c_kv_t            kv_b_proj rows of head i, last v_head_dim
    (12) c_q_t   = RMSNorm(W_DQ h_t)             q_a_proj, q_a_layernorm  (or plain q_proj)
    (13) q_nope_{t,i} = W_UQ_i c_q_t             q_b_proj rows of head i, first qk_nope_head_dim
    (14) q_pe_{t,i}   = RoPE_t(W_QR_i c_q_t)     q_b_proj rows of head i, last qk_rope_head_dim
    (15) k_pe_t  = RoPE_t(W_KR h_t)              kv_a_proj_with_mqa rows [d_c:]   (one head)
    (16) q_{t,i} = [q_nope_{t,i}; q_pe_{t,i}]
    (17) k_{j,i} = [k_nope_{j,i}; k_pe_j]        (k_pe_j shared by every head)
    (18) o_{t,i} = sum_{j<=t} softmax_j(q_{t,i} . k_{j,i} / sqrt(d_nope + d_rope)) v_{j,i}
    (19) u_t     = W_O [o_{t,1}; ...; o_{t,n_heads}]                      o_proj
Here d_nope = qk_nope_head_dim (the paper's d_h), d_rope = qk_rope_head_dim (d_h^R), d_c =
kv_lora_rank; "nope" = no position encoding (the content part, the paper's superscript C), "pe"
= the rotary part (superscript R).
The paper's equations omit the two RMSNorms on the latents (its section 3.1.2 mentions them);
DeepSeek's checkpoints have them. Only ``c_kv_t`` and ``k_pe_t`` are cached:
``(kv_lora_rank + qk_rope_head_dim)`` numbers per token per layer, which with DeepSeek-V2's
d_c = 4 d_h and d_rope = d_h / 2 is 9/2 d_h. Table 1 of the paper counts elements per token over
all l layers: MHA 2 n_h d_h l, GQA 2 n_g d_h l, MQA 2 d_h l, MLA (d_c + d_h^R) l ~ 9/2 d_h l,
"equal to GQA with only 2.25 groups".

Absorption (why decoding need not rebuild keys and values), for head i, query t, key j; numbered
(A1)-(A4) here, as these lines are not in the paper:
    (A1) q_nope_{t,i} . k_nope_{j,i} = (W_UQ_i c_q_t)^T (W_UK_i c_kv_j)
                                     = (W_UK_i^T q_nope_{t,i}) . c_kv_j
    (A2) score_{t,j,i} = (q_lat_{t,i} . c_kv_j + q_pe_{t,i} . k_pe_j) / sqrt(d_nope + d_rope),
         with q_lat_{t,i} = W_UK_i^T q_nope_{t,i}  (d_c numbers per head)
    (A3) o_{t,i} = sum_j a_{t,j,i} W_UV_i c_kv_j = W_UV_i (sum_j a_{t,j,i} c_kv_j)
                 = W_UV_i o_lat_{t,i}      (a = the softmax weights)
    (A4) u_t = sum_i W_O_i W_UV_i o_lat_{t,i}      (W_O_i = the o_proj columns of head i)
So every head attends over the same cached latents (an MQA with a 576-dim key and a 512-dim
value). Per decode step and cached token that is 2 n_heads (2 d_c + d_rope) FLOPs, instead of
the 2 n_heads d_c (d_nope + d_v) it takes to rebuild the token's keys and values through
``kv_b_proj`` (see ``decode_flops``).
The paper phrases (A1) as folding W_UK into W_UQ (one position-free matrix W_UQ_i^T W_UK_i) and
(A4) as folding W_UV into W_O. DeepSeek-V3's ``inference/model.py`` (absorb mode) and
``attend_absorbed`` below instead apply W_UK_i^T to q_nope and W_UV_i to o_lat at run time:
same result, fewer FLOPs and parameters than the merged matrices (W_O_i W_UV_i alone would be
d_model x d_c per head).
Why RoPE on the nope part would break this: with k_nope_{j,i} = R_j W_UK_i c_kv_j and
q_nope_{t,i} = R_t W_UQ_i c_q_t, line (A1) becomes c_q_t^T W_UQ_i^T R_(j-t) W_UK_i c_kv_j: a
rotation that differs for every cached token j sits between W_UQ_i and W_UK_i, so no fixed matrix
can be folded into the query and every cached key would have to be rebuilt at every step.
Hence the decoupled ``q_pe`` / ``k_pe``: position lives in a small extra part that is cached
already rotated.

Where it is used
----------------
DeepSeek-V2 (236B), DeepSeek-V2-Lite, DeepSeek-V3 / R1 (671B), Kimi K2 and other DeepSeek-V3
derivatives. Serving engines decode with the absorbed form; for long prefills, where many
queries share the cost of rebuilding keys and values, the naive (expanded) form is cheaper.

Run it
------
    uv run python multihead_latent_attention.py          # default sizes (README: how long)
    uv run python multihead_latent_attention.py --quick  # small sizes, a fast check
    uv run python multihead_latent_attention.py --out DIR --no-show --device cpu --seed 0

It prints each check and measurement, saves every figure as PNG and every printed number in
``results.json`` under ``--out`` (default ``figures/multihead_latent_attention/``; ``--quick``
writes to ``figures/multihead_latent_attention/quick/``).

References
----------
- DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language
  Model", 2024, arXiv 2405.04434 (section 2.1 MLA, Table 1 KV cache per token, appendix C).
- DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024, arXiv 2412.19437 (section 2.1.1).
- Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021,
  arXiv 2104.09864.
- Reference code: deepseek-ai/DeepSeek-V3 ``inference/model.py`` (class ``MLA``: its "absorb"
  mode caches ``kv_cache`` / ``pe_cache`` and attends as ``attend_absorbed``; its "naive" mode
  caches expanded per-head ``k_cache`` / ``v_cache``, a different trade-off from our naive mode);
  huggingface/transformers ``src/transformers/models/deepseek_v3/modeling_deepseek_v3.py``
  (``DeepseekV3Attention``, which caches the latents and re-expands them like our naive mode;
  ``apply_rotary_pos_emb_interleave``), which the tests compare against.

Contents
--------
2. Core: ``MLAConfig``; validation helpers (``_check_sizes`` ...); ``RMSNorm``; RoPE
   (``rope_inv_freq``, ``rope_cos_sin``, ``rotate_half``, ``apply_rope``,
   ``apply_rope_deinterleaved``); ``MultiHeadLatentAttention`` (``project_queries``,
   ``compress_kv``, ``attend_naive``, ``attend_absorbed``, ``new_cache``); ``LatentKVCache``.
3. Baselines and apparatus: ``causal_mask`` and the cache-write rules (``_check_cache_write``,
   ``_check_cache_tensor``); ``deepseek_v2_config``, ``deepseek_v3_config``; ``KVCache`` and
   ``RopeMHABaseline`` (plain MHA), ``SwiGLU``, ``MLABlock``, ``MLALanguageModel``;
   ``run_chunks``; cache byte counts (``measured_cache_bytes_per_token``, ``kv_cache_bytes``,
   ``mla_bytes_per_token_formula``); ``decode_flops``, ``decode_setup``.
4. Experiments: ``absorption_fold_check``, ``check_correctness``, ``table1_cache_elements``,
   ``deepseek_cache``, ``benchmark_decode``, ``make_claims`` (with ``claim``, ``print_claims``).
5. Figures: ``plot_mla_data_flow``, ``plot_cache_vs_context``, ``plot_decode_time``,
   ``plot_decode_flops`` and the pure functions that word their titles.
6. Main: ``parse_args``, the ``print_*`` helpers, ``main``.
7. Plumbing (identical in every script): timer, device, machine info, flags, ``save_outputs``.

Read first: the math above, then ``MultiHeadLatentAttention``: ``compress_kv`` (what is cached),
``attend_naive`` and ``attend_absorbed`` side by side (the paper's equations (9)-(19) and the
absorption's (A1)-(A4) are tagged on the lines that compute them), then
``LatentKVCache.update``; ``decode_flops`` for the cost of each path.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib
import matplotlib.patches
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# 2. Core: the latent cache, decoupled RoPE, naive and absorbed attention
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


def _check_rope_base(rope_base: float) -> None:
    """RoPE's base must be finite and > 1 (at 1 every frequency is 1; below, they grow)."""
    _check_positive(rope_base=rope_base)
    if rope_base <= 1:
        raise ValueError(f"rope_base ({rope_base}) must be > 1")


def _check_hidden_states(x: torch.Tensor, d_model: int, weight: torch.Tensor) -> None:
    """x must be (batch, seq_len, d_model), in the weights' dtype and on their device."""
    _check_float_tensor("x", x, d_model)
    if x.dim() != 3:
        raise ValueError(f"x (shape {tuple(x.shape)}) must be 3-D: (batch, seq_len, {d_model})")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"x ({x.dtype}, {x.device}) must match the weights' dtype, device")


def _check_positions(start_pos: int, seq_len: int, max_seq_len: int) -> None:
    """Positions start_pos .. start_pos + seq_len - 1 must lie below max_seq_len."""
    _check_start_pos(start_pos)
    if start_pos + seq_len > max_seq_len:
        raise ValueError(
            f"start_pos ({start_pos}) + seq_len ({seq_len}) > max_seq_len ({max_seq_len})"
        )


def _cache_length(max_seq_len: int | None, limit: int) -> int:
    """A cache's length: ``limit`` (the module's max_seq_len) when None, else 1 .. limit."""
    if max_seq_len is None:
        return limit
    _check_sizes(max_seq_len=max_seq_len)
    if max_seq_len > limit:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be <= the module's ({limit})")
    return max_seq_len


ATTENTION_MODES = ("naive", "absorbed")


def _check_mode(mode: str) -> None:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"mode ({mode!r}) must be one of 'naive', 'absorbed'")


@dataclass
class MLAConfig:
    """Sizes of one MLA layer, named as in the Hugging Face DeepSeek-V2/V3 ``config.json``.

    The default is DeepSeek-V2 scaled down, proportions kept: d_h = ``qk_nope_head_dim`` =
    ``v_head_dim`` = 64, d_c = ``kv_lora_rank`` = 4 d_h, ``qk_rope_head_dim`` = d_h / 2.
    ``q_lora_rank=None``: a plain ``q_proj`` (DeepSeek-V2-Lite). ``rope_interleave``: RoPE on
    adjacent pairs (x0, x1), ... as DeepSeek's checkpoints; False: half-split (``rotate_half``).
    """

    d_model: int = 1024
    n_heads: int = 16
    q_lora_rank: int | None = 384
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    max_seq_len: int = 8192
    rope_base: float = 10000.0
    rope_interleave: bool = True

    def __post_init__(self) -> None:
        _check_sizes(d_model=self.d_model, n_heads=self.n_heads, kv_lora_rank=self.kv_lora_rank)
        _check_sizes(qk_nope_head_dim=self.qk_nope_head_dim, v_head_dim=self.v_head_dim)
        _check_sizes(qk_rope_head_dim=self.qk_rope_head_dim, max_seq_len=self.max_seq_len)
        if self.q_lora_rank is not None:  # None: no query compression, a plain q_proj
            _check_sizes(q_lora_rank=self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (pairs)")
        _check_rope_base(self.rope_base)
        if not isinstance(self.rope_interleave, bool):
            raise TypeError(f"rope_interleave ({self.rope_interleave!r}) must be a bool")

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key size: the content part plus the rotary part (192 in DeepSeek-V2)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as Llama and DeepSeek do)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        _check_sizes(dim=dim)
        _check_positive(eps=eps)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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


def apply_rope_deinterleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Interleaved RoPE (DeepSeek, Meta, RoFormer) on the adjacent pairs (x_2i, x_2i+1), given
    the half-split cos/sin of :func:`rope_cos_sin`; returns the pairs de-interleaved (evens, then
    odds) as Hugging Face's ``apply_rotary_pos_emb_interleave``. DeepSeek-V3 keeps them in place:
    the same dot products. Like :func:`apply_rope` it trusts its caller to pass matching shapes.
    """
    x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)  # (..., head_dim): evens, then odds
    return apply_rope(x, cos, sin)


class MultiHeadLatentAttention(nn.Module):
    """MLA as in DeepSeek-V2/V3; parameter names match Hugging Face's ``DeepseekV3Attention``.

    ``mode="naive"`` rebuilds per-head keys and values from every cached latent at every call
    (as Hugging Face does); ``"absorbed"`` folds W_UK into the query and W_UV into the output and
    attends in latent space (DeepSeek-V3 ``attn_impl="absorb"``): the same output. Softmax scale
    (d_nope + d_rope) ** -0.5; the released checkpoints stretch RoPE to long contexts with YaRN,
    which also multiplies that scale by a factor mscale^2 (YaRN is not implemented here).

    >>> cfg = MLAConfig(d_model=64, n_heads=4, q_lora_rank=32, kv_lora_rank=32,
    ...                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_seq_len=32)
    >>> attn = MultiHeadLatentAttention(cfg)
    >>> attn(torch.randn(2, 5, 64)).shape  # (batch, seq_len, d_model), no cache
    torch.Size([2, 5, 64])
    >>> cache = attn.new_cache(2)  # latents only: kv_lora_rank + qk_rope_head_dim per token
    >>> cache.kv_cache.shape, cache.pe_cache.shape
    (torch.Size([2, 32, 32]), torch.Size([2, 32, 8]))
    >>> _ = attn(torch.randn(2, 5, 64), 0, cache, mode="absorbed")  # prefill 5 tokens
    >>> attn(torch.randn(2, 1, 64), 5, cache, mode="absorbed").shape  # decode token 6
    torch.Size([2, 1, 64])
    """

    def __init__(self, config: MLAConfig) -> None:
        super().__init__()
        if not isinstance(config, MLAConfig):
            raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
        self.config = c = config
        self.n_heads = c.n_heads
        self.softmax_scale = c.qk_head_dim**-0.5  # 1 / sqrt(d_nope + d_rope)
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.d_model, c.n_heads * c.qk_head_dim, bias=False)
        else:  # NEW vs MHA: queries through a low-rank latent c_q too (saves activations)
            self.q_a_proj = nn.Linear(c.d_model, c.q_lora_rank, bias=False)  # W_DQ
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, c.n_heads * c.qk_head_dim, bias=False)
        # NEW vs MHA: no k_proj / v_proj. W_DKV and W_KR stacked: one matmul gives [c_kv | k_pe]
        # ("with_mqa": k_pe is a single head shared by all query heads).
        self.kv_a_proj_with_mqa = nn.Linear(
            c.d_model, c.kv_lora_rank + c.qk_rope_head_dim, bias=False
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        # W_UK and W_UV stacked per head: rows [h * (d_nope + d_v) : ...] = [W_UK_h; W_UV_h].
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(c.n_heads * c.v_head_dim, c.d_model, bias=False)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_cos_sin(positions, self.config.qk_rope_head_dim, self.config.rope_base)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (seq_len, qk_rope_head_dim)
        if self.config.rope_interleave:
            return apply_rope_deinterleaved(x, cos, sin)
        return apply_rope(x, cos, sin)

    def project_queries(self, x: torch.Tensor, positions: torch.Tensor):
        """q_nope (batch, n_heads, seq_len, d_nope), rotated q_pe (..., d_rope)."""
        c = self.config
        batch, seq_len, _ = x.shape
        if c.q_lora_rank is None:
            q = self.q_proj(x)
        else:  # (12) c_q = RMSNorm(W_DQ h), then (13)-(14) W_UQ c_q and W_QR c_q in one matmul
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, seq_len, c.n_heads, c.qk_head_dim).transpose(1, 2)
        # (batch, n_heads, seq_len, d_nope + d_rope)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)  # (13), (14)
        # NEW vs MHA: RoPE only on the small decoupled part q_pe, never on q_nope
        return q_nope, self.rope(q_pe, positions)  # (14) RoPE_t(W_QR c_q)

    def compress_kv(self, x: torch.Tensor, positions: torch.Tensor):
        """What gets cached: c_kv (batch, seq_len, d_c), rotated k_pe (batch, seq_len, d_rope)."""
        c = self.config
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), self.rope(k_pe, positions)  # (9), (15)

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Rebuild per-head keys and values from every cached latent, then standard attention."""
        c = self.config
        batch, kv_len, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(batch, kv_len, c.n_heads, c.qk_nope_head_dim + c.v_head_dim)
        kv = kv.transpose(1, 2)  # (batch, n_heads, kv_len, d_nope + d_v)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)  # (10), (11)
        k_pe = k_pe[:, None].expand(-1, c.n_heads, -1, -1)  # one rope key shared by all heads
        q = torch.cat((q_nope, q_pe), dim=-1)  # (16) (batch, n_heads, q_len, d_nope + d_rope)
        k = torch.cat((k_nope, k_pe), dim=-1)  # (17) (batch, n_heads, kv_len, d_nope + d_rope)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
        return torch.matmul(self.softmax(scores, mask), v)  # (18) (batch, n_heads, q_len, d_v)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """NEW vs MHA: attend in latent space, W_UK folded into the query, W_UV after the sum."""
        c = self.config
        w = self.kv_b_proj.weight.view(c.n_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
        # w_uk (n_heads, d_nope, d_c), w_uv (n_heads, d_v, d_c)
        q_lat = torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk)  # (A1) W_UK^T q_nope: (b, h, s, d_c)
        scores = (
            torch.einsum("bhsc,btc->bhst", q_lat, c_kv)  # (A2) content part, latent keys
            + torch.einsum("bhsr,btr->bhst", q_pe, k_pe)  # (A2) rope part, shared key
        ) * self.softmax_scale
        attn = self.softmax(scores, mask)
        o_lat = torch.einsum("bhst,btc->bhsc", attn, c_kv)  # (A3) sum_j a c_kv_j: (b, h, s, d_c)
        return torch.einsum("bhsc,hvc->bhsv", o_lat, w_uv)  # (A3) W_UV o_lat: (b, h, s, d_v)

    @staticmethod
    def softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)

    def forward(self, x: torch.Tensor, start_pos=0, cache=None, mode="naive") -> torch.Tensor:
        """x (batch, seq_len, d_model) at positions start_pos.. -> (batch, seq_len, d_model)."""
        _check_hidden_states(x, self.config.d_model, self.o_proj.weight)
        _check_positions(start_pos, x.shape[1], self.config.max_seq_len)
        if cache is not None and not isinstance(cache, LatentKVCache):
            raise TypeError(f"cache must be a LatentKVCache or None, got {type(cache).__name__}")
        _check_mode(mode)
        return self._attend(x, start_pos, cache, mode)

    def _attend(self, x, start_pos, cache, mode):
        """forward without the door checks (MLABlock calls it after the LM checked its input)."""
        batch, seq_len, _ = x.shape
        positions = torch.arange(start_pos, start_pos + seq_len, device=x.device)
        q_nope, q_pe = self.project_queries(x, positions)
        c_kv, k_pe = self.compress_kv(x, positions)
        if cache is not None:  # NEW vs MHA: the cache holds the compressed latents, not k and v
            c_kv, k_pe = cache.update(c_kv, k_pe, start_pos)
        kv_len = c_kv.shape[1]
        mask = causal_mask(seq_len, kv_len, x.device) if seq_len > 1 else None
        attend = self.attend_naive if mode == "naive" else self.attend_absorbed
        o = attend(q_nope, q_pe, c_kv, k_pe, mask)  # (batch, n_heads, seq_len, d_v)
        o = o.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.config.v_head_dim)
        return self.o_proj(o)  # (19); absorbed, with (A3) before it, this is (A4)

    def new_cache(self, batch_size, max_seq_len=None, dtype=None, device=None) -> LatentKVCache:
        """An empty :class:`LatentKVCache`; None: the config's max_seq_len, the weights' dtype
        and device."""
        c, w = self.config, self.o_proj.weight
        return LatentKVCache(
            batch_size,
            _cache_length(max_seq_len, c.max_seq_len),
            c.kv_lora_rank,
            c.qk_rope_head_dim,
            w.dtype if dtype is None else dtype,
            w.device if device is None else device,
        )


class LatentKVCache:
    """MLA's pre-allocated cache: only the normalised latent and the rotated shared rope key.

    ``kv_cache`` (batch, max_seq_len, kv_lora_rank) holds c_kv = kv_a_layernorm(W_DKV h);
    ``pe_cache`` (batch, max_seq_len, qk_rope_head_dim) holds k_pe = RoPE(W_KR h), already rotated
    (so a cached token never needs its position again); with ``rope_interleave`` its pairs are
    de-interleaved as Hugging Face caches them (DeepSeek-V3's ``inference/model.py`` keeps them
    in place: a permutation apart, the same scores). Same buffer names as DeepSeek-V3; same
    methods and rules as :class:`KVCache`.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        _check_sizes(batch_size=batch_size, max_seq_len=max_seq_len)
        _check_sizes(kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype ({dtype!r}) must be a floating-point torch.dtype")
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim
        shape = (batch_size, max_seq_len)
        self.kv_cache = torch.zeros(*shape, kv_lora_rank, dtype=dtype, device=device)
        self.pe_cache = torch.zeros(*shape, qk_rope_head_dim, dtype=dtype, device=device)
        self.length = 0  # number of filled positions

    def update(self, c_kv, k_pe, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write c_kv (batch, n, d_c), k_pe (batch, n, d_rope) at ``start_pos``; return views
        of every filled position so far."""
        _check_cache_tensor("c_kv", c_kv, self.kv_cache, (self.batch_size, None, self.kv_lora_rank))
        n = c_kv.shape[1]
        _check_cache_tensor(
            "k_pe", k_pe, self.pe_cache, (self.batch_size, n, self.qk_rope_head_dim)
        )
        _check_cache_write(start_pos, n, self.length, self.max_seq_len)
        self.kv_cache[:, start_pos : start_pos + n] = c_kv
        self.pe_cache[:, start_pos : start_pos + n] = k_pe
        self.length = start_pos + n
        return self.kv_cache[:, : self.length], self.pe_cache[:, : self.length]  # views

    def reset(self) -> None:
        """Forget every token (zero the buffers, so a stale read would show as wrong output)."""
        self.kv_cache.zero_()
        self.pe_cache.zero_()
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the two buffers, measured from the tensors."""
        return sum(t.numel() * t.element_size() for t in (self.kv_cache, self.pe_cache))


# =============================================================================
# 3. Baselines and apparatus: plain MHA with its KVCache, a small MLA language model, costs
# =============================================================================


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


def deepseek_v2_config() -> MLAConfig:
    """DeepSeek-V2 (236B, 60 layers): huggingface.co/deepseek-ai/DeepSeek-V2 ``config.json``
    (its YaRN rope scaling, factor 40 over 4096 tokens, is not implemented here)."""
    return MLAConfig(5120, 128, 1536, 512, 128, 64, 128, 163840, 10000.0, True)


def deepseek_v3_config() -> MLAConfig:
    """DeepSeek-V3 (671B, 61 layers): huggingface.co/deepseek-ai/DeepSeek-V3 ``config.json``
    (YaRN as V2, not implemented here)."""
    return MLAConfig(7168, 128, 1536, 512, 128, 64, 128, 163840, 10000.0, True)


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


def kv_cache_bytes(
    n_layers: int, batch_size: int, n_kv_heads: int, seq_len: int, head_dim: int, bytes_per: int
) -> int:
    """2 (keys and values) * n_layers * batch * n_kv_heads * seq_len * head_dim * bytes_per."""
    return 2 * n_layers * batch_size * n_kv_heads * seq_len * head_dim * bytes_per


class RopeMHABaseline(nn.Module):
    """Baseline: Llama-style MHA (half-split RoPE on the whole head) with a :class:`KVCache`,
    at the same heads and head size as the MLA layer it is compared with."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        max_seq_len: int = 8192,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        _check_sizes(d_model=d_model, n_heads=n_heads, head_dim=head_dim, max_seq_len=max_seq_len)
        if head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even (RoPE rotates pairs)")
        _check_rope_base(rope_base)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.max_seq_len, self.rope_base = max_seq_len, rope_base
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None):
        """x (batch, seq_len, d_model) at positions start_pos.. -> (batch, seq_len, d_model)."""
        _check_hidden_states(x, self.d_model, self.o_proj.weight)
        _check_positions(start_pos, x.shape[1], self.max_seq_len)
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        batch, seq_len, _ = x.shape
        shape = (batch, seq_len, self.n_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (batch, n_heads, seq_len, head_dim)
        k = self.k_proj(x).view(shape).transpose(1, 2)  # (batch, n_heads, seq_len, head_dim)
        v = self.v_proj(x).view(shape).transpose(1, 2)  # (batch, n_heads, seq_len, head_dim)
        positions = torch.arange(start_pos, start_pos + seq_len, device=x.device)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_base)  # (seq_len, head_dim)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5
        if seq_len > 1:
            scores = scores.masked_fill(~causal_mask(seq_len, k.shape[2], x.device), float("-inf"))
        o = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return self.o_proj(o.transpose(1, 2).reshape(batch, seq_len, -1))

    def new_cache(self, batch_size, max_seq_len=None, dtype=None, device=None) -> KVCache:
        """An empty :class:`KVCache`; None: this module's max_seq_len, dtype and device."""
        w = self.o_proj.weight
        return KVCache(
            batch_size,
            self.n_heads,
            _cache_length(max_seq_len, self.max_seq_len),
            self.head_dim,
            w.dtype if dtype is None else dtype,
            w.device if device is None else device,
        )


class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), the Llama / DeepSeek dense MLP."""

    def __init__(self, d_model: int, hidden_dim: int) -> None:
        super().__init__()
        _check_sizes(d_model=d_model, hidden_dim=hidden_dim)
        self.gate_proj = nn.Linear(d_model, hidden_dim, bias=False)
        self.up_proj = nn.Linear(d_model, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLABlock(nn.Module):
    """Pre-norm decoder layer: x + MLA(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). Called by
    :class:`MLALanguageModel`, which checks the input once for all layers."""

    def __init__(self, config: MLAConfig, ffn_hidden_dim: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model)
        self.self_attn = MultiHeadLatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model)
        self.mlp = SwiGLU(config.d_model, ffn_hidden_dim)

    def forward(self, x, start_pos=0, cache=None, mode="naive"):
        x = x + self.self_attn._attend(self.input_layernorm(x), start_pos, cache, mode)
        return x + self.mlp(self.post_attention_layernorm(x))


def _check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, device: torch.device) -> None:
    """Token ids: an integer tensor (batch, seq_len) of values in [0, vocab_size), on ``device``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} (token ids) must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} (token ids) dtype ({ids.dtype}) must be torch.int64 or int32")
    if ids.dim() != 2:
        raise ValueError(f"{name} (token ids, shape {tuple(ids.shape)}) must be (batch, seq_len)")
    if ids.device != device:
        raise ValueError(f"{name} (token ids, on {ids.device}) must be on the model's {device}")
    if ids.numel() and not 0 <= ids.min().item() <= ids.max().item() < vocab_size:
        raise ValueError(
            f"{name} (token ids from {ids.min().item()} to {ids.max().item()}) must lie in "
            f"[0, vocab_size) = [0, {vocab_size})"
        )


class MLALanguageModel(nn.Module):
    """A small decoder-only LM on MLA: embedding, MLA blocks, final RMSNorm, LM head."""

    def __init__(
        self, config: MLAConfig, vocab_size: int, n_layers: int, ffn_hidden_dim: int
    ) -> None:
        super().__init__()
        if not isinstance(config, MLAConfig):
            raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
        _check_sizes(vocab_size=vocab_size, n_layers=n_layers, ffn_hidden_dim=ffn_hidden_dim)
        self.config, self.vocab_size = config, vocab_size
        self.embed_tokens = nn.Embedding(vocab_size, config.d_model)
        self.layers = nn.ModuleList(MLABlock(config, ffn_hidden_dim) for _ in range(n_layers))
        self.norm = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int = 0,
        cache: list[LatentKVCache] | None = None,
        mode: str = "naive",
    ) -> torch.Tensor:
        """x: token ids (batch, seq_len) at positions start_pos.. -> logits (batch, seq_len,
        vocab_size). ``cache``: one :class:`LatentKVCache` per layer (see :meth:`new_cache`)."""
        _check_token_ids("x", x, self.vocab_size, self.embed_tokens.weight.device)
        _check_positions(start_pos, x.shape[1], self.config.max_seq_len)
        if cache is not None and (
            not isinstance(cache, list | tuple)
            or len(cache) != len(self.layers)
            or not all(isinstance(c, LatentKVCache) for c in cache)
        ):
            raise ValueError(
                f"cache ({type(cache).__name__}) must be a list of {len(self.layers)} "
                "LatentKVCache, one per layer"
            )
        _check_mode(mode)
        return self._logits(x, start_pos, cache, mode)

    def _logits(self, x, start_pos, cache, mode):
        h = self.embed_tokens(x)  # (batch, seq_len, d_model)
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, None if cache is None else cache[i], mode)
        return self.lm_head(self.norm(h))

    def new_cache(
        self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None
    ) -> list[LatentKVCache]:
        """One empty :class:`LatentKVCache` per layer."""
        return [
            layer.self_attn.new_cache(batch_size, max_seq_len, dtype, device)
            for layer in self.layers
        ]

    @torch.no_grad()
    def generate(
        self, ids: torch.Tensor, max_new_tokens: int, use_cache: bool = True, mode: str = "naive"
    ) -> torch.Tensor:
        """Greedy decoding. With ``use_cache`` each step feeds only the newest token and attends
        over the per-layer :class:`LatentKVCache`; without it each step re-runs the whole prefix.
        Refuses at once a prompt plus new tokens longer than ``config.max_seq_len``."""
        _check_token_ids("ids", ids, self.vocab_size, self.embed_tokens.weight.device)
        _check_sizes(max_new_tokens=max_new_tokens)
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache ({use_cache!r}) must be a bool")
        _check_mode(mode)
        batch, prompt_len = ids.shape
        if prompt_len == 0:
            raise ValueError("ids (token ids, shape (batch, 0)) must hold a prompt of >= 1 token")
        if prompt_len + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"max_new_tokens ({max_new_tokens}) + the prompt ({prompt_len} tokens) need "
                f"{prompt_len + max_new_tokens} positions, but max_seq_len is "
                f"{self.config.max_seq_len}"
            )
        if batch == 0:
            return ids.new_empty(0, prompt_len + max_new_tokens)
        if not use_cache:
            for _ in range(max_new_tokens):
                next_token = self._logits(ids, 0, None, mode)[:, -1].argmax(dim=-1, keepdim=True)
                ids = torch.cat((ids, next_token), dim=1)
            return ids
        cache = self.new_cache(batch, prompt_len + max_new_tokens)
        logits = self._logits(ids, 0, cache, mode)  # prefill: the whole prompt at once
        for step in range(max_new_tokens):
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat((ids, next_token), dim=1)
            if step + 1 < max_new_tokens:
                logits = self._logits(next_token, prompt_len + step, cache, mode)  # one token
        return ids


def run_chunks(
    attn: MultiHeadLatentAttention, x: torch.Tensor, chunk_sizes: list[int], mode: str
) -> torch.Tensor:
    """Feed ``x`` through a fresh cache in consecutive chunks; concatenate the outputs."""
    if any(
        isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in chunk_sizes
    ):
        raise ValueError(f"chunk_sizes ({chunk_sizes}) must be ints >= 1")
    if sum(chunk_sizes) != x.shape[1]:
        raise ValueError(f"chunk_sizes ({chunk_sizes}) must add up to seq_len ({x.shape[1]})")
    cache = attn.new_cache(x.shape[0], x.shape[1])
    outs, start = [], 0
    for n in chunk_sizes:
        outs.append(attn(x[:, start : start + n], start, cache, mode))
        start += n
    return torch.cat(outs, dim=1)


def _check_config(config: MLAConfig) -> None:
    if not isinstance(config, MLAConfig):
        raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")


def mla_bytes_per_token_formula(config: MLAConfig, n_layers: int, bytes_per_elem: int) -> int:
    """(kv_lora_rank + qk_rope_head_dim) * n_layers * bytes: the latent plus the shared rope key."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * n_layers * bytes_per_elem


def measured_cache_bytes_per_token(
    kind: str,
    n_layers: int,
    dtype: torch.dtype,
    *,
    config: MLAConfig | None = None,
    n_kv_heads: int = 0,
    head_dim: int = 0,
    n_tokens: int = 4,
) -> int:
    """Allocate the real per-layer caches (``kind`` "mla" or "kv") for ``n_tokens`` tokens;
    return their bytes / n_tokens."""
    _check_sizes(n_layers=n_layers, n_tokens=n_tokens)
    if kind == "mla":
        _check_config(config)
        caches = [
            LatentKVCache(1, n_tokens, config.kv_lora_rank, config.qk_rope_head_dim, dtype=dtype)
            for _ in range(n_layers)
        ]
    elif kind == "kv":
        caches = [KVCache(1, n_kv_heads, n_tokens, head_dim, dtype=dtype) for _ in range(n_layers)]
    else:
        raise ValueError(f"kind ({kind!r}) must be 'mla' or 'kv'")
    return sum(cache.nbytes for cache in caches) // n_tokens


def decode_flops(config: MLAConfig, context: int, impl: str) -> int:
    """Matmul FLOPs (2 * m * n * k) of one decode step, batch 1, with ``context`` cached tokens.

    The new token attends over L = context + 1 keys. d = d_model, h = n_heads, d_c = kv_lora_rank.
    naive:    projections + kv_b_proj on all L latents 2 L d_c h (d_nope + d_v) + attention
              2 h L (d_nope + d_rope) + 2 h L d_v
    absorbed: projections + W_UK into the query 2 h d_nope d_c + attention 2 h L (d_c + d_rope)
              + 2 h L d_c + W_UV after it 2 h d_c d_v
    mha:      q/k/v projections 3 * 2 d h d_h + attention 2 * 2 h L d_h + o_proj 2 h d_h d,
              with d_h = qk_nope_head_dim (the same heads and head size)
    Per cached token absorbed pays 2 h (2 d_c + d_rope), MHA 4 h d_h: absorbed attention runs
    over the latent width (d_c + d_rope per head), not over head_dim.
    """
    _check_config(config)
    if isinstance(context, bool) or not isinstance(context, numbers.Integral):
        raise TypeError(f"context ({context!r}) must be an int")
    if context < 0:
        raise ValueError(f"context ({context}) must be >= 0")
    c, L = config, context + 1
    h, d, d_c = c.n_heads, c.d_model, c.kv_lora_rank
    if impl == "mha":
        d_h = c.qk_nope_head_dim
        return 3 * 2 * d * h * d_h + 2 * 2 * h * L * d_h + 2 * h * d_h * d
    if c.q_lora_rank is None:
        q = 2 * d * h * c.qk_head_dim
    else:
        q = 2 * d * c.q_lora_rank + 2 * c.q_lora_rank * h * c.qk_head_dim
    common = q + 2 * d * (d_c + c.qk_rope_head_dim) + 2 * h * c.v_head_dim * d
    if impl == "naive":
        rebuild = 2 * L * d_c * h * (c.qk_nope_head_dim + c.v_head_dim)
        return common + rebuild + 2 * h * L * c.qk_head_dim + 2 * h * L * c.v_head_dim
    if impl == "absorbed":
        return (
            common
            + 2 * h * c.qk_nope_head_dim * d_c
            + 2 * h * L * (d_c + c.qk_rope_head_dim)
            + 2 * h * L * d_c
            + 2 * h * d_c * c.v_head_dim
        )
    raise ValueError(f"impl ({impl!r}) must be one of 'mha', 'naive', 'absorbed'")


def decode_setup(config: MLAConfig, context: int, device, mla=None, mha=None):
    """Caches pre-filled with ``context`` random tokens and one-token decode closures."""
    c = config
    x = torch.randn(1, 1, c.d_model, device=device)
    fns = {}
    if mha is not None:
        kv = mha.new_cache(1, context + 1, device=device)
        kv.update(
            torch.randn(1, c.n_heads, context, c.qk_nope_head_dim, device=device),
            torch.randn(1, c.n_heads, context, c.qk_nope_head_dim, device=device),
            0,
        )
        fns["mha"] = lambda: mha(x, context, kv)
    if mla is not None:
        latent = mla.new_cache(1, context + 1, device=device)
        latent.update(
            torch.randn(1, context, c.kv_lora_rank, device=device),
            torch.randn(1, context, c.qk_rope_head_dim, device=device),
            0,
        )
        # every call rewrites position `context` (start_pos == length - 1 after the first call)
        fns["naive"] = lambda: mla(x, context, latent, "naive")
        fns["absorbed"] = lambda: mla(x, context, latent, "absorbed")
    return fns


# =============================================================================
# 4. Experiments: correctness, cache sizes (Table 1), decode cost; each returns a dict
# =============================================================================


def absorption_fold_check(config: MLAConfig, device, n_tokens: int = 16) -> dict:
    """Fold W_UK into the query with one precomputed matrix M_i = W_UQ_i^T W_UK_i: exact without
    RoPE on the content part, wrong as soon as that part is rotated (R_(j-t) sits inside)."""
    _check_config(config)
    _check_sizes(n_tokens=n_tokens)
    c = config
    d_q = c.q_lora_rank or c.d_model
    w_uq = torch.randn(c.n_heads, c.qk_nope_head_dim, d_q, device=device) / math.sqrt(d_q)
    w_uk = torch.randn(c.n_heads, c.qk_nope_head_dim, c.kv_lora_rank, device=device)
    w_uk = w_uk / math.sqrt(c.kv_lora_rank)
    c_q = torch.randn(n_tokens, d_q, device=device)
    c_kv = torch.randn(n_tokens, c.kv_lora_rank, device=device)
    q = torch.einsum("hdq,tq->htd", w_uq, c_q)  # q_nope (n_heads, tokens, d_nope)
    k = torch.einsum("hdc,tc->htd", w_uk, c_kv)  # k_nope (n_heads, tokens, d_nope)
    merged = torch.einsum("hdq,hdc->hqc", w_uq, w_uk)  # M_i (n_heads, d_q, d_c), position-free
    folded = torch.einsum("tq,hqc,jc->htj", c_q, merged, c_kv)
    positions = torch.arange(n_tokens, device=device)
    cos, sin = rope_cos_sin(positions, c.qk_nope_head_dim, c.rope_base)
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return {
        "max_abs_err_fold_without_rope": max_abs_err(folded, q @ k.transpose(-1, -2)),
        "max_abs_err_fold_with_rope_on_nope": max_abs_err(folded, q_rot @ k_rot.transpose(-1, -2)),
        "max_abs_score": (q @ k.transpose(-1, -2)).abs().max().item(),
    }


def check_correctness(device: torch.device, quick: bool) -> dict:
    """Naive vs absorbed vs uncached on one MLA layer; cached vs uncached greedy generation."""
    tol = 1e-5
    cfg = MLAConfig()
    attn = MultiHeadLatentAttention(cfg).to(device).eval()
    batch, seq_len = 2, 24 if quick else 48
    x = torch.randn(batch, seq_len, cfg.d_model, device=device)
    chunks = [seq_len // 3, 1, seq_len - seq_len // 3 - 2, 1]  # chunked prefill, then decode
    with torch.inference_mode():
        full = {m: attn(x, mode=m) for m in ATTENTION_MODES}  # uncached: the reference
        decode = {m: run_chunks(attn, x, [seq_len - 1, 1], m) for m in ATTENTION_MODES}
        chunked = {m: run_chunks(attn, x, chunks, m) for m in ATTENTION_MODES}
        step = {m: run_chunks(attn, x, [1] * seq_len, m) for m in ATTENTION_MODES}
    errs = {
        "max_abs_err_naive_vs_absorbed_prefill": max_abs_err(full["naive"], full["absorbed"]),
        "max_abs_err_naive_vs_absorbed_decode": max_abs_err(
            decode["naive"][:, -1:], decode["absorbed"][:, -1:]
        ),
        "max_abs_err_naive_vs_absorbed_chunked_prefill": max_abs_err(
            chunked["naive"], chunked["absorbed"]
        ),
    }
    for m in ATTENTION_MODES:
        ref = full["naive"]
        errs[f"max_abs_err_cached_vs_uncached_{m}"] = max(
            max_abs_err(decode[m], ref), max_abs_err(chunked[m], ref), max_abs_err(step[m], ref)
        )
    out = {
        "config": asdict(cfg),
        "batch": batch,
        "seq_len": seq_len,
        "chunk_sizes": chunks,
        "max_abs_output": full["naive"].abs().max().item(),
        **errs,
        "tolerance": tol,
        "all_within_tolerance": all(v <= tol for v in errs.values()),
    }
    lm_cfg = MLAConfig(128, 4, 64, 64, 32, 16, 32, max_seq_len=64)
    lm = MLALanguageModel(lm_cfg, vocab_size=256, n_layers=2, ffn_hidden_dim=256).to(device).eval()
    prompt = torch.randint(0, 256, (2, 8), device=device)
    n_new = 12 if quick else 24
    uncached = lm.generate(prompt, n_new, use_cache=False)
    gen = {m: lm.generate(prompt, n_new, use_cache=True, mode=m) for m in ATTENTION_MODES}
    out["generation"] = {
        "prompt_len": prompt.shape[1],
        "new_tokens": n_new,
        "uncached_tokens": uncached[0, prompt.shape[1] :].tolist(),
        "identical_naive": bool(torch.equal(gen["naive"], uncached)),
        "identical_absorbed": bool(torch.equal(gen["absorbed"], uncached)),
    }
    out["absorption_fold"] = absorption_fold_check(cfg, device)
    return out


def table1_cache_elements(config: MLAConfig, n_groups: int = 8) -> dict:
    """DeepSeek-V2 Table 1 for one layer (l = 1), measured from the cache tensors (elements).

    Table 1 counts elements per token over l layers: MHA 2 n_h d_h l, GQA 2 n_g d_h l, MQA
    2 d_h l, MLA (d_c + d_h^R) l ~ 9/2 d_h l (exactly 9/2 when d_c = 4 d_h and d_h^R = d_h / 2),
    i.e. the cache of GQA with 2.25 groups. Here d_h = qk_nope_head_dim (128 in DeepSeek-V2).
    """
    _check_config(config)
    _check_sizes(n_groups=n_groups)
    n_h, d_h = config.n_heads, config.qk_nope_head_dim
    gqa = f"gqa_{n_groups}_groups"

    f32 = torch.float32  # 4 bytes per element

    def kv(n_kv_heads: int) -> int:
        return (
            measured_cache_bytes_per_token("kv", 1, f32, n_kv_heads=n_kv_heads, head_dim=d_h) // 4
        )

    elems = {
        "mha": kv(n_h),
        gqa: kv(n_groups),
        "mqa": kv(1),
        "mla": measured_cache_bytes_per_token("mla", 1, f32, config=config) // 4,
    }
    paper = {"mha": "2 n_h d_h", gqa: "2 n_g d_h", "mqa": "2 d_h", "mla": "d_c + d_h^R"}
    formula = {
        "mha": kv_cache_bytes(1, 1, n_h, 1, d_h, 1),
        gqa: kv_cache_bytes(1, 1, n_groups, 1, d_h, 1),
        "mqa": kv_cache_bytes(1, 1, 1, 1, d_h, 1),
        "mla": mla_bytes_per_token_formula(config, 1, 1),
    }
    return {
        "n_heads": n_h,
        "head_dim": d_h,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "elements_per_token_per_layer": elems,
        "paper_formula": paper,
        "formula_elements_per_token_per_layer": formula,
        "measured_equals_formula": elems == formula,
        "mla_in_units_of_head_dim": elems["mla"] / d_h,  # paper: about 9/2
        "mla_equivalent_gqa_groups": elems["mla"] / (2 * d_h),  # paper: 2.25
        "mha_to_mla_ratio": elems["mha"] / elems["mla"],
    }


# num_hidden_layers in config.json. V3's extra multi-token-prediction layer
# (num_nextn_predict_layers 1, used only for speculative decoding) is not counted.
DEEPSEEK_LAYERS = {"deepseek_v2": 60, "deepseek_v3": 61}
# deepseek-ai/deepseek-llm-67b-base config.json: 95 layers, 8 kv heads of 8192 / 64 = 128.
DEEPSEEK_67B = {"n_layers": 95, "n_kv_heads": 8, "head_dim": 128}
# DeepSeek-V2 section 3.2.3: for serving, "we also perform KV cache quantization ... to
# further compress each element in its KV cache into 6 bits on average".
PAPER_KV_BITS = 6


def deepseek_cache() -> dict:
    """bf16 cache bytes per token over all layers (measured and formula) of DeepSeek-V2/V3 with
    MLA and of the same models with MHA; the paper's "93.3% less than DeepSeek 67B" checked."""
    bf16 = torch.bfloat16
    models = {}
    for key, cfg in (
        ("deepseek_v2", deepseek_v2_config()),
        ("deepseek_v3", deepseek_v3_config()),
    ):
        n_layers, heads, d_h = DEEPSEEK_LAYERS[key], cfg.n_heads, cfg.qk_nope_head_dim
        models[f"{key}_mla"] = {
            "bytes_per_token": measured_cache_bytes_per_token("mla", n_layers, bf16, config=cfg),
            "formula_bytes_per_token": mla_bytes_per_token_formula(cfg, n_layers, 2),
            "n_layers": n_layers,
        }
        models[f"{key}_as_mha"] = {
            "bytes_per_token": measured_cache_bytes_per_token(
                "kv", n_layers, bf16, n_kv_heads=heads, head_dim=d_h
            ),
            "formula_bytes_per_token": kv_cache_bytes(n_layers, 1, heads, 1, d_h, 2),
            "n_layers": n_layers,
        }
    m67 = DEEPSEEK_67B
    models["deepseek_67b"] = {
        "bytes_per_token": measured_cache_bytes_per_token(
            "kv", m67["n_layers"], bf16, n_kv_heads=m67["n_kv_heads"], head_dim=m67["head_dim"]
        ),
        "formula_bytes_per_token": kv_cache_bytes(
            m67["n_layers"], 1, m67["n_kv_heads"], 1, m67["head_dim"], 2
        ),
        "n_layers": m67["n_layers"],
    }
    per_token = {k: m["bytes_per_token"] for k, m in models.items()}
    v2 = per_token["deepseek_v2_mla"]
    return {
        "models": models,
        "measured_equals_formula": all(
            m["bytes_per_token"] == m["formula_bytes_per_token"] for m in models.values()
        ),
        "mha_to_mla_ratio_deepseek_v2": per_token["deepseek_v2_as_mha"] / v2,
        "mha_to_mla_ratio_deepseek_v3": per_token["deepseek_v3_as_mha"]
        / per_token["deepseek_v3_mla"],
        "reduction_vs_deepseek_67b_bf16": 1 - v2 / per_token["deepseek_67b"],
        "reduction_vs_deepseek_67b_with_6bit_kv": 1
        - v2 * PAPER_KV_BITS / 16 / per_token["deepseek_67b"],
        "paper_reduction_claim": 0.933,
    }


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _times(x: float) -> str:
    """A ratio for print: 2 significant digits near 1, one decimal above 2."""
    return f"{x:.2f}x" if x < 1.995 else f"{x:.1f}x"


def speed_phrase(ratio: dict, fast: str, slow: str) -> str:
    """Word a time ratio (``slow``'s time / ``fast``'s, median and min..max over rounds) by what
    was measured: who was faster by how much, or that the rounds could not tell them apart."""
    med, lo, hi = ratio["median"], ratio["min"], ratio["max"]
    if lo > 1:
        return f"{fast} is {_times(med)} faster than {slow} (rounds: {_times(lo)}-{_times(hi)})"
    if hi < 1:
        return (
            f"{slow} is {_times(1 / med)} faster than {fast} "
            f"(rounds: {_times(1 / hi)}-{_times(1 / lo)})"
        )
    return (
        f"this run could not tell {fast} and {slow} apart ({slow} / {fast} time "
        f"{_times(lo)}-{_times(hi)} over the rounds)"
    )


def benchmark_decode(
    config: MLAConfig, contexts: list[int], device, rounds: int, min_run_time: float
) -> dict:
    """Time one decode step (batch 1) of MHA, naive MLA and absorbed MLA for each cached context.

    ``rounds`` interleaved rounds: in each, every context and implementation is timed once
    (``median_time_s``), the three taking turns in a rotating order, so a change of machine load
    hits all three. Ratios are taken within a round, then summarised as median and spread
    (min..max over rounds). When the naive/absorbed spread at the longest context includes 1
    (no clear answer), up to ``rounds`` more rounds are run.
    """
    _check_config(config)
    _check_sizes(rounds=rounds)
    c = replace(config, max_seq_len=max(contexts) + 1)  # room for the decoded token
    mla = MultiHeadLatentAttention(c).to(device).eval()
    mha = RopeMHABaseline(c.d_model, c.n_heads, c.qk_nope_head_dim, c.max_seq_len, c.rope_base)
    mha = mha.to(device).eval()
    impls = ("mha", "naive", "absorbed")
    seconds = {k: [[] for _ in contexts] for k in impls}  # [context][round]
    with torch.inference_mode():
        fns = [decode_setup(c, t, device, mla, mha) for t in contexts]

        def unclear() -> bool:  # the naive/absorbed spread at the longest context includes 1
            r = [n / a for n, a in zip(seconds["naive"][-1], seconds["absorbed"][-1], strict=True)]
            return min(r) <= 1 <= max(r)

        n_rounds = 0
        while n_rounds < rounds or (n_rounds < 2 * rounds and unclear()):
            for i, f in enumerate(fns):
                for k in impls[n_rounds % 3 :] + impls[: n_rounds % 3]:
                    seconds[k][i].append(median_time_s(f[k], min_run_time))
            n_rounds += 1

    def ratio(a: str, b: str) -> list[dict]:  # time of a / time of b, paired within rounds
        pairs = zip(seconds[a], seconds[b], strict=True)
        return [_spread([x / y for x, y in zip(sa, sb, strict=True)]) for sa, sb in pairs]

    flops = {k: [decode_flops(c, t, k) for t in contexts] for k in impls}
    cache_bytes = {
        "mha": measured_cache_bytes_per_token(
            "kv", 1, torch.float32, n_kv_heads=c.n_heads, head_dim=c.qk_nope_head_dim
        ),
        "mla": measured_cache_bytes_per_token("mla", 1, torch.float32, config=c),
    }
    naive_vs_abs = ratio("naive", "absorbed")
    flop_ratio = [n / a for n, a in zip(flops["naive"], flops["absorbed"], strict=True)]
    return {
        "config": asdict(c),
        "batch": 1,
        "dtype": "float32",
        "contexts": contexts,
        "rounds": n_rounds,
        "time_ms": {k: [statistics.median(s) * 1e3 for s in seconds[k]] for k in impls},
        "time_ms_min": {k: [min(s) * 1e3 for s in seconds[k]] for k in impls},
        "time_ms_max": {k: [max(s) * 1e3 for s in seconds[k]] for k in impls},
        "flops": flops,
        "speedup_absorbed_vs_naive": naive_vs_abs,  # > 1: absorbed is faster
        "speedup_absorbed_vs_mha": ratio("mha", "absorbed"),  # > 1: absorbed is faster
        "flop_ratio_naive_vs_absorbed": flop_ratio,
        "flop_ratio_absorbed_vs_mha": [
            a / m for a, m in zip(flops["absorbed"], flops["mha"], strict=True)
        ],
        "latent_width_per_head": c.kv_lora_rank + c.qk_rope_head_dim,
        "mha_head_dim": c.qk_nope_head_dim,
        "cache_bytes_per_token_per_layer": cache_bytes,
        "cache_bytes_ratio_mha_vs_mla": cache_bytes["mha"] / cache_bytes["mla"],
        # arithmetic per cache byte read: the FLOPs one more cached token adds, over its bytes
        "flops_per_cache_byte": {
            k: (decode_flops(c, 1, impl) - decode_flops(c, 0, impl)) / cache_bytes[k]
            for k, impl in (("mha", "mha"), ("mla", "absorbed"))
        },
        # the comparisons at the longest context in words, direction and spread included
        "absorbed_vs_naive_phrase": speed_phrase(naive_vs_abs[-1], "absorbed MLA", "naive MLA"),
        "absorbed_vs_mha_phrase": speed_phrase(ratio("mha", "absorbed")[-1], "absorbed MLA", "MHA"),
    }


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


def make_claims(results: dict) -> dict:
    """The script's claims, each worded from the numbers measured in this run."""
    corr, t1, ds, bench = (
        results[k] for k in ("correctness", "table1", "deepseek_cache", "decode")
    )
    err = max(v for k, v in corr.items() if k.startswith("max_abs_err_"))
    gen = corr["generation"]
    fold = corr["absorption_fold"]
    fold_ok = (
        fold["max_abs_err_fold_without_rope"] < 1e-4 * fold["max_abs_score"]
        and fold["max_abs_err_fold_with_rope_on_nope"] > 0.1 * fold["max_abs_score"]
    )
    same = gen["identical_naive"] and gen["identical_absorbed"]
    longest, speed = bench["contexts"][-1], bench["speedup_absorbed_vs_naive"][-1]
    mla_elems = t1["elements_per_token_per_layer"]["mla"]
    return {
        "naive_equals_absorbed": claim(
            f"naive and absorbed MLA, cached and uncached, agree: max |error| {err:.1e} "
            + ("<=" if corr["all_within_tolerance"] else ">")
            + f" tolerance {corr['tolerance']:.0e}",
            corr["all_within_tolerance"],
            max_abs_err=err,
        ),
        "cached_generation_identical": claim(
            f"greedy generation of {gen['new_tokens']} tokens from the latent cache "
            + ("gives the same tokens as" if same else "differs from")
            + " generation without a cache (naive and absorbed)",
            same,
        ),
        "decoupled_rope_needed": claim(
            "folding W_UK into the query is exact without RoPE on the content part (max |error| "
            f"{fold['max_abs_err_fold_without_rope']:.1e}) and off by up to "
            f"{fold['max_abs_err_fold_with_rope_on_nope']:.2f} with it (scores up to "
            f"{fold['max_abs_score']:.2f})"
            + ("" if fold_ok else ": this run did not show the difference"),
            fold_ok,
        ),
        "table1_reproduced": claim(
            f"at DeepSeek-V2's shapes MLA caches {mla_elems} elements per token and layer = "
            f"{t1['mla_in_units_of_head_dim']:.2f} d_h, like GQA with "
            f"{t1['mla_equivalent_gqa_groups']:.2f} groups (Table 1: 9/2 d_h, 2.25 groups); "
            f"tensors {'==' if t1['measured_equals_formula'] else '!='} formula",
            t1["measured_equals_formula"] and t1["mla_equivalent_gqa_groups"] == 2.25,
            mla_elements=mla_elems,
        ),
        "mla_cache_smaller_than_mha": claim(
            f"DeepSeek-V2's MLA cache is {ds['mha_to_mla_ratio_deepseek_v2']:.1f}x smaller than "
            "the same model's with MHA (bf16, all layers; tensors "
            f"{'==' if ds['measured_equals_formula'] else '!='} formula)",
            ds["measured_equals_formula"] and ds["mha_to_mla_ratio_deepseek_v2"] > 1,
            ratio=ds["mha_to_mla_ratio_deepseek_v2"],
        ),
        "absorbed_faster_than_naive": claim(
            f"at {longest:,} cached tokens "
            + speed_phrase(speed, "absorbed MLA", "naive MLA")
            + f"; naive does {bench['flop_ratio_naive_vs_absorbed'][-1]:.1f}x absorbed's FLOPs",
            speed["min"] > 1,
            speedup_median=speed["median"],
            speedup_min=speed["min"],
            speedup_max=speed["max"],
        ),
    }


# =============================================================================
# 5. Figures: one function per figure, each returns the Figure; titles worded from the data
# =============================================================================


def plot_mla_data_flow(config: MLAConfig) -> plt.Figure:
    """A drawn diagram of MLA's data flow with DeepSeek-V2's shapes."""
    c = config
    fig, ax = plt.subplots(figsize=(11, 6.4), layout="constrained")
    ax.set_xlim(0, 16.9)
    ax.set_ylim(0, 9.4)
    ax.axis("off")
    colours = {
        "in": "#e8e8e8",
        "q": "#cfe2ff",
        "kv": "#ffe5b4",
        "cache": "#b7e4c7",
        "naive": "#f8d7da",
        "abs": "#d1f2eb",
    }

    def box(x, y, w, h, text, kind, lw=1.0):
        ax.add_patch(
            matplotlib.patches.FancyBboxPatch(
                (x, y), w, h, boxstyle="round,pad=0.05", fc=colours[kind], ec="#444444", lw=lw
            )
        )
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=11)

    def arrow(x0, y0, x1, y1, label="", colour="#333333"):
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 1.3},
        )
        if label:
            ax.text(
                (x0 + x1) / 2, (y0 + y1) / 2 + 0.12, label, ha="center", va="bottom", fontsize=10
            )

    qk, d_c, d_r = c.qk_head_dim, c.kv_lora_rank, c.qk_rope_head_dim
    d_nope, n_h = c.qk_nope_head_dim, c.n_heads
    box(0.1, 4.3, 1.4, 1.0, f"$h_t$\n({c.d_model})", "in")
    # query path (top row)
    box(
        2.0,
        7.1,
        2.8,
        1.4,
        f"q_a_proj $W^{{DQ}}$\n+ q_a_layernorm\n→ $c^Q_t$ ({c.q_lora_rank})",
        "q",
    )
    box(
        5.3,
        7.1,
        3.0,
        1.4,
        f"q_b_proj $W^{{UQ}}, W^{{QR}}$\n{n_h} heads ×\n[{d_nope} nope | {d_r} rope]",
        "q",
    )
    box(8.8, 7.9, 2.6, 0.8, f"$q^C_{{t,i}}$: {n_h} × {d_nope}", "q")
    box(8.8, 6.5, 2.6, 0.9, f"RoPE →\n$q^R_{{t,i}}$: {n_h} × {d_r}", "q")
    arrow(1.5, 5.0, 2.0, 7.6)
    arrow(4.8, 7.8, 5.3, 7.8)
    arrow(8.3, 8.0, 8.8, 8.3)
    arrow(8.3, 7.5, 8.8, 7.0)
    # key/value path (bottom row)
    box(
        2.0,
        1.5,
        2.8,
        1.6,
        f"kv_a_proj_with_mqa\n$W^{{DKV}}, W^{{KR}}$\n{c.d_model} → {d_c} + {d_r}",
        "kv",
    )
    box(5.3, 2.55, 3.0, 1.1, f"kv_a_layernorm\n→ $c^{{KV}}_t$ ({d_c})", "kv")
    box(5.3, 0.9, 3.0, 1.1, f"RoPE → $k^R_t$ ({d_r})\nshared by all heads", "kv")
    arrow(1.5, 4.6, 2.0, 2.6)
    arrow(4.8, 2.6, 5.3, 3.1)
    arrow(4.8, 2.0, 5.3, 1.5)
    box(
        8.8,
        0.9,
        2.6,
        2.75,
        f"LatentKVCache\nkv_cache: {d_c}\npe_cache: {d_r}\n= {d_c + d_r} numbers\n"
        f"per token, layer\n(MHA: {2 * n_h * d_nope:,})",
        "cache",
        lw=2.0,
    )
    arrow(8.3, 3.1, 8.8, 3.1)
    arrow(8.3, 1.5, 8.8, 1.5)
    # the two ways to attend
    box(
        12.0,
        5.3,
        4.7,
        2.3,
        "naive: kv_b_proj ($W^{UK}, W^{UV}$)\n"
        f"rebuilds $k^C, v^C$ ({n_h} × {d_nope} each)\nof every cached token, every step,"
        f"\nthen attention, head dim {qk}",
        "naive",
    )
    box(
        12.0,
        1.35,
        4.7,
        3.2,
        f"absorbed: $\\tilde q_{{t,i}} = W^{{UK\\top}}_i q^C_{{t,i}}$ ({n_h} × {d_c})\n"
        "$a_{t,j,i} = $softmax$_j(\\tilde q \\cdot c^{KV}_j + q^R \\cdot k^R_j)$\n"
        "$\\bar o_{t,i} = \\sum_j a_{t,j,i}\\, c^{KV}_j$  (latent)\n"
        "$o_{t,i} = W^{UV}_i \\bar o_{t,i}$\nno key or value is ever built",
        "abs",
    )
    # queries and cache meet on one bus that feeds both modes: either gets all of them
    bus_x = 11.7
    for y in (8.3, 7.0, 2.3):  # q^C, q^R, the cache
        ax.plot([11.4, bus_x], [y, y], color="#333333", lw=1.3)
    ax.plot([bus_x, bus_x], [2.3, 8.3], color="#333333", lw=1.3)
    arrow(bus_x, 6.45, 12.0, 6.45)  # to naive
    arrow(bus_x, 2.95, 12.0, 2.95)  # to absorbed
    ax.text(
        14.35,
        4.95,
        "mode='naive' or 'absorbed':\nsame queries and cache, same output",
        ha="center",
        va="center",
        fontsize=10.5,
        style="italic",
    )
    box(13.0, 0.1, 2.7, 0.75, f"o_proj → $u_t$ ({c.d_model})", "in")
    # DeepSeek-V2's equation numbers (and the docstring's (A1)-(A3)) at each box's corner
    for x, y, eqs in (
        (2.0, 8.5, "(12)"),
        (5.3, 8.5, "(13), (14)"),
        (8.8, 8.7, "(13)"),
        (8.8, 7.4, "(14)"),
        (2.0, 3.1, "(9), (15)"),
        (5.3, 3.65, "(9)"),
        (5.3, 2.0, "(15)"),
        (12.0, 7.6, "(10), (11), (16)-(18)"),
        (12.0, 1.35, "(A1)-(A3)"),
        (13.0, 0.85, "(19)"),
    ):
        ax.text(x + 0.05, y + 0.05, f"eq. {eqs}", fontsize=9, color="#555555", va="bottom")
    arrow(14.35, 1.35, 14.35, 0.85)
    ax.plot([16.7, 16.85, 16.85], [6.4, 6.4, 0.47], color="#333333", lw=1.3)
    arrow(16.85, 0.47, 15.7, 0.47)
    ax.set_title(
        f"MLA data flow at DeepSeek-V2's sizes: only {d_c} + {d_r} = {d_c + d_r} numbers per "
        "token and layer are cached;\nabsorbed decoding attends over them directly "
        "(softmax scale 1/$\\sqrt{" + str(qk) + "}$ omitted)",
        fontsize=12,
    )
    return fig


def decode_time_title(bench: dict) -> str:
    longest = bench["contexts"][-1]
    phrase = speed_phrase(bench["speedup_absorbed_vs_naive"][-1], "absorbed MLA", "naive MLA")
    return (
        f"One decode step (median of {bench['rounds']} rounds, bars: min-max):\n"
        f"at {longest:,} cached tokens {phrase}"
    )


def decode_flops_title(bench: dict) -> str:
    """Who does more matmul FLOPs at the longest context, and why absorbed MLA can do more
    than MHA: its attention runs over the latent width, not over head_dim."""
    longest = bench["contexts"][-1]
    naive = bench["flop_ratio_naive_vs_absorbed"][-1]
    vs_mha = bench["flop_ratio_absorbed_vs_mha"][-1]
    first = f"Matmul FLOPs per decode step at {longest:,} tokens: " + (
        f"naive MLA does {naive:.1f}x absorbed's;"
        if naive >= 1
        else f"absorbed MLA does {1 / naive:.1f}x naive's;"
    )
    width, d_h = bench["latent_width_per_head"], bench["mha_head_dim"]
    second = (
        f"absorbed does {vs_mha:.1f}x MHA's because its attention runs over the latent width"
        if vs_mha > 1
        else f"absorbed does {1 / vs_mha:.1f}x fewer than MHA, though it attends over the width"
    )
    return f"{first}\n{second}\nd_c + d_R = {width} per head instead of head_dim {d_h}"


def _cache_name(key: str) -> str:
    """'mha' -> 'MHA', 'gqa_8_groups' -> 'GQA-8' (the keys of ``table1_cache_elements``)."""
    return key.upper() if "_" not in key else "GQA-" + key.split("_")[1]


def cache_title(elements: dict) -> str:
    """Compare MLA's elements per token with each baseline, direction from the numbers."""
    mla = elements["mla"]
    parts = []
    for key, other in elements.items():
        if key != "mla":
            name = _cache_name(key)
            parts.append(
                f"{other / mla:.1f}x less than {name}"
                if other > mla
                else f"{mla / other:.1f}x more than {name}"
            )
    rest = ", ".join(parts[1:-1]) + " and " + parts[-1]
    return f"At DeepSeek-V2's shapes MLA caches {parts[0]},\n{rest}"


def plot_cache_vs_context(table: dict, n_layers: int) -> plt.Figure:
    """Cache size vs context for MHA / GQA / MQA / MLA at DeepSeek-V2's shapes, bf16."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    contexts = np.array([2**k for k in range(10, 18)])  # 1K .. 128K
    labels = {
        "mha": f"MHA ({table['n_heads']} heads)",
        "mqa": "MQA (1 kv head)",
        "mla": f"MLA ({table['kv_lora_rank']} + {table['qk_rope_head_dim']})",
    }
    for key, elems in table["elements_per_token_per_layer"].items():
        label = labels[key] if key in labels else f"{_cache_name(key)} ({key[4:-7]} kv heads)"
        gib = contexts * elems * n_layers * 2 / 2**30
        ax.loglog(contexts, gib, marker="o", ms=3, label=label, lw=2.5 if key == "mla" else 1.5)
    ax.set_xticks(contexts, [f"{t // 1024}K" for t in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache, {n_layers} layers, bf16 (GiB)")
    ax.set_title(cache_title(table["elements_per_token_per_layer"]))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    return fig


DECODE_LABELS = {
    "mha": "MHA (same heads, head dim)",
    "naive": "MLA naive (rebuild K, V)",
    "absorbed": "MLA absorbed (latent space)",
}


def plot_decode_lines(bench: dict, values: dict, ylabel: str, title: str, spread=None):
    """One line per implementation against the cached context, log-log with plain tick labels;
    ``spread`` = (lows, highs) per implementation draws min-max error bars."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    for k, label in DECODE_LABELS.items():
        y = np.array(values[k])
        yerr = None if spread is None else [y - spread[0][k], np.array(spread[1][k]) - y]
        ax.errorbar(bench["contexts"], y, yerr=yerr, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(bench["contexts"], [f"{t:,}" for t in bench["contexts"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("cached context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10.5)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    return fig


def plot_decode_time(bench: dict) -> plt.Figure:
    """Measured time of one decode step, median over rounds with min-max bars."""
    return plot_decode_lines(
        bench,
        bench["time_ms"],
        "time per decode step (ms, log scale)",
        decode_time_title(bench),
        spread=(bench["time_ms_min"], bench["time_ms_max"]),
    )


def plot_decode_flops(bench: dict) -> plt.Figure:
    """Matmul FLOPs of one decode step, counted from the shapes (``decode_flops``)."""
    mflops = {k: np.array(v) / 1e6 for k, v in bench["flops"].items()}
    return plot_decode_lines(
        bench, mflops, "matmul FLOPs per decode step (MFLOP, log scale)", decode_flops_title(bench)
    )


# =============================================================================
# 6. Main: parse the flags, run the stages, print, save
# =============================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser()
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=None,
        help="interleaved timing rounds of the decode benchmark (default: 5, 3 with --quick)",
    )
    args = parse_flags(parser, argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    return args


def print_correctness(corr: dict) -> None:
    print(
        f"  one MLA layer (default config), batch {corr['batch']}, {corr['seq_len']} tokens, "
        f"fp32, tolerance {corr['tolerance']:.0e} (outputs up to {corr['max_abs_output']:.2f})"
    )
    for key, value in corr.items():
        if key.startswith("max_abs_err_"):
            print(f"  max |error| {key[12:].replace('_', ' '):<36} {value:.2e}")
    gen, fold = corr["generation"], corr["absorption_fold"]
    print(
        f"  greedy generation, {gen['new_tokens']} tokens: cached naive == uncached: "
        f"{gen['identical_naive']}, cached absorbed == uncached: {gen['identical_absorbed']}"
    )
    print(
        f"  folding W_UQ^T W_UK into one matrix: max |error| "
        f"{fold['max_abs_err_fold_without_rope']:.1e} without RoPE, "
        f"{fold['max_abs_err_fold_with_rope_on_nope']:.2f} with RoPE on the nope part "
        f"(scores up to {fold['max_abs_score']:.2f})"
    )


def print_table1(table: dict) -> None:
    d_h = table["head_dim"]
    print(
        f"  DeepSeek-V2 shapes: n_h {table['n_heads']}, d_h {d_h}, n_g 8, d_c "
        f"{table['kv_lora_rank']}, d_h^R {table['qk_rope_head_dim']}; Table 1 counts l layers, "
        "here one"
    )
    formula = table["formula_elements_per_token_per_layer"]
    for key, elems in table["elements_per_token_per_layer"].items():
        print(
            f"  {key:<14} {table['paper_formula'][key]:<12} {elems:>7,} elements measured = "
            f"{elems / d_h:6.2f} d_h (formula {formula[key]:,})"
        )
    print(
        f"  MLA = {table['mla_in_units_of_head_dim']:.2f} d_h (paper: about 9/2 d_h), like GQA "
        f"with {table['mla_equivalent_gqa_groups']:.2f} groups (paper: 2.25); "
        f"{table['mha_to_mla_ratio']:.1f}x smaller than MHA"
    )


def print_deepseek_cache(ds: dict) -> None:
    print(f"  {'model (bf16, all layers)':<26} {'layers':>6} {'bytes/token':>12} {'formula':>12}")
    for key, m in ds["models"].items():
        print(
            f"  {key:<26} {m['n_layers']:>6} {m['bytes_per_token']:>12,} "
            f"{m['formula_bytes_per_token']:>12,}"
        )
    with_6bit, paper = ds["reduction_vs_deepseek_67b_with_6bit_kv"], ds["paper_reduction_claim"]
    print(
        f"  MLA is {ds['mha_to_mla_ratio_deepseek_v2']:.1f}x (V2) and "
        f"{ds['mha_to_mla_ratio_deepseek_v3']:.1f}x (V3) smaller than the same model with MHA. "
        f"Against DeepSeek 67B (GQA-8, 95 layers) bf16 MLA saves "
        f"{ds['reduction_vs_deepseek_67b_bf16']:.1%}; with the paper's ~{PAPER_KV_BITS}-bit cache "
        f"elements (its section 3.2.3) {with_6bit:.1%}, "
        + ("matching the paper's" if round(with_6bit, 3) == paper else "not the paper's")
        + f" {paper:.1%}."
    )


def print_decode(bench: dict, device: torch.device) -> None:
    cache = bench["cache_bytes_per_token_per_layer"]
    print(
        f"  default MLAConfig, batch 1, fp32, {device}, median of {bench['rounds']} interleaved "
        f"rounds (min-max); cache per token per layer: MHA {cache['mha']:,} B, "
        f"MLA {cache['mla']:,} B"
    )
    print("  speedups > 1x mean absorbed MLA is faster; FLOPs counted from the shapes (matmuls)")
    print(
        f"  {'context':>7} {'MHA ms':>8} {'naive ms':>9} {'absorbed ms':>11}  "
        f"{'absorbed vs naive':>21} {'(FLOPs)':>8}  {'absorbed vs MHA':>19}"
    )
    for i, t in enumerate(bench["contexts"]):
        sn, sm = bench["speedup_absorbed_vs_naive"][i], bench["speedup_absorbed_vs_mha"][i]
        ms = {k: v[i] for k, v in bench["time_ms"].items()}
        print(
            f"  {t:>7} {ms['mha']:>8.3f} {ms['naive']:>9.3f} {ms['absorbed']:>11.3f}  "
            f"{sn['median']:>6.2f}x ({sn['min']:.2f}-{sn['max']:.2f}) "
            f"{bench['flop_ratio_naive_vs_absorbed'][i]:>7.1f}x  "
            f"{sm['median']:>5.2f}x ({sm['min']:.2f}-{sm['max']:.2f})"
        )
    longest, fpb = bench["contexts"][-1], bench["flops_per_cache_byte"]
    print(
        f"  vs MHA at {longest:,} tokens: "
        + speed_phrase(bench["speedup_absorbed_vs_mha"][-1], "absorbed MLA", "MHA")
        + f"; absorbed does {bench['flop_ratio_absorbed_vs_mha'][-1]:.1f}x MHA's matmul FLOPs "
        f"(its attention runs over d_c + d_R = {bench['latent_width_per_head']} per head, not "
        f"head_dim {bench['mha_head_dim']}) and reads {bench['cache_bytes_ratio_mha_vs_mla']:.1f}x "
        f"fewer cache bytes: per cached token {fpb['mla']:.1f} FLOPs per cache byte read, MHA "
        f"{fpb['mha']:.1f}"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    results: dict = {"meta": run_meta(args, device)}
    n = 5
    print(f"[1/{n}] checking correctness (naive vs absorbed vs uncached) ...")
    results["correctness"] = check_correctness(device, args.quick)
    print_correctness(results["correctness"])
    print(f"[2/{n}] measuring cache elements per token (DeepSeek-V2 Table 1, l = 1) ...")
    v2 = deepseek_v2_config()
    results["table1"] = table1_cache_elements(v2)
    print_table1(results["table1"])
    print(f"[3/{n}] measuring DeepSeek-V2/V3 caches, MLA vs MHA (bf16, batch 1) ...")
    results["deepseek_cache"] = deepseek_cache()
    print_deepseek_cache(results["deepseek_cache"])
    print(f"[4/{n}] benchmarking one decode step vs cached context ...")
    contexts = [128, 256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096, 8192]
    min_run_time = 0.01 if args.quick else 0.06
    results["decode"] = benchmark_decode(MLAConfig(), contexts, device, args.rounds, min_run_time)
    print_decode(results["decode"], device)
    results["claims"] = make_claims(results)
    print_claims(results["claims"])
    print(f"[5/{n}] drawing figures ...")
    figures = {
        "mla_data_flow": plot_mla_data_flow(v2),
        "cache_vs_context": plot_cache_vs_context(
            results["table1"], DEEPSEEK_LAYERS["deepseek_v2"]
        ),
        "decode_time": plot_decode_time(results["decode"]),
        "decode_flops": plot_decode_flops(results["decode"]),
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
