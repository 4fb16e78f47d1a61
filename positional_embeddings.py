"""Positional embeddings: sinusoidal encodings and RoPE, tested, measured and drawn.

The problem
-----------
Attention is blind to order. Scores are dot products q_m . k_n, and a softmax over a set: shuffle
the tokens and every token gets the same output, shuffled. "dog bites man" and "man bites dog"
look identical to a transformer layer unless position is written into the vectors somewhere.

The idea
--------
Sinusoidal encodings (Vaswani et al. 2017) *add* a fixed vector PE(pos) to each token embedding.
Each pair of dimensions holds (sin, cos) of pos * theta_i, a clock hand turning at its own speed,
so PE(pos + k) is a rotation of PE(pos) that depends on k alone.

RoPE (Su et al., RoFormer) *rotates* q and k instead: each pair of dimensions of the query at
position m is turned by the angle m * theta_i, each pair of the key at n by n * theta_i. A dot
product of two rotated vectors only sees the difference of their angles, so the score depends on
the content and on the offset n - m, never on m itself: absolute rotations give relative attention.

The math
--------
Frequencies (shared by both schemes), for pair i = 0 .. d/2 - 1:

    theta_i = base^(-2i / d),   base = 10000            wavelength_i = 2 pi / theta_i tokens

Sinusoidal (Vaswani et al. section 3.5), PE of shape (seq_len, d_model):

    PE[pos, 2i] = sin(pos * theta_i)        PE[pos, 2i + 1] = cos(pos * theta_i)
    PE(pos + k) = M_k PE(pos),   M_k = blockdiag_i [[cos k theta_i,  sin k theta_i],
                                                    [-sin k theta_i, cos k theta_i]]

RoPE (RoFormer eq. 13-16), for one pair (x_a, x_b) of a query or key at position m:

    [x_a']   [cos m theta_i   -sin m theta_i] [x_a]
    [x_b'] = [sin m theta_i    cos m theta_i] [x_b]        R_m = blockdiag of these 2x2 blocks

    <R_m q, R_n k> = q^T R_m^T R_n k = q^T R_(n-m) k = <q, R_(n-m) k>      (rotations compose)

Which dimensions form a pair is a layout choice, and the source of much confusion:

    interleaved (RoFormer, Meta llama, DeepSeek):  pair i = (x_2i, x_2i+1), read as the complex
        number z_i = x_2i + j x_2i+1 and rotated by multiplying by e^(j m theta_i) (RoFormer eq. 34)
    half-split (Hugging Face, GPT-NeoX):           pair i = (x_i, x_i+d/2), computed as
        x * cos + rotate_half(x) * sin,  rotate_half(x1, x2) = (-x2, x1)

The two are the same rotation on permuted coordinates. A checkpoint trained in one layout runs
in the other once the rows of W_q and W_k are permuted head by head (as transformers'
convert_llama_weights_to_hf.py does); the attention scores are then identical.

Long-term decay (RoFormer section 3.4.3, eq. 35-37). Read pair k of q and of k as complex
numbers q~_k, k~_k and let h_k = q~_k conj(k~_k) (h_(d/2) = 0). The score is
Re sum_k h_k e^(j (m-n) theta_k), and Abel summation bounds it:

    |sum_k h_k e^(j (m-n) theta_k)| <= (max_k |h_(k+1) - h_k|) * sum_(l=1..d/2) |S_l|,
    S_l = sum_(k<l) e^(j (m-n) theta_k).

The factor that depends on the distance alone, divided by the number of pairs, is what their
Figure 2 plots as the "relative upper bound": (1 / (d/2)) sum_l |S_l|, which shrinks as |m - n|
grows (from (d/2 + 1)/2 at distance 0). It bounds |score| from above; the score itself need not
decay for every q, k (see the expected scores in the decay figure).

Context extension (all change theta_i only, plus an attention temperature for YaRN), with s the
extension factor and L the trained context:

    PI (linear):    theta_i' = theta_i / s                         (Chen et al. 2023)
    NTK-aware:      base' = base * s^(d / (d - 2))   (static; "dynamic" recomputes s from seq_len)
    YaRN:           per-pair ramp between theta_i (fast pairs, > beta_fast turns in L tokens) and
                    theta_i / s (slow pairs, < beta_slow turns); q and k scaled by 0.1 ln s + 1
    Llama 3.1:      wavelength < L / high_freq_factor: keep; > L / low_freq_factor: theta_i / s;
                    in between: smooth interpolation

Where it is used
----------------
Sinusoidal: the original Transformer and many encoders. RoPE: GPT-NeoX, GPT-J, Llama 1-3, Mistral,
Qwen, Gemma, DeepSeek-V2/V3 (on a decoupled slice of each head), most open LLMs since 2023.
YaRN: Qwen2.5 long-context, DeepSeek-V3; Llama 3.1 scaling: Llama 3.1-3.3.

Run it
------
    uv run python positional_embeddings.py              # default sizes (README: measured time)
    uv run python positional_embeddings.py --quick      # small sizes, into figures/.../quick/
    uv run python positional_embeddings.py --out DIR --no-show --device cpu --seed 0

It prints each check and measurement, saves every figure as PNG and every printed number in
``results.json`` under ``--out`` (default ``figures/positional_embeddings/``).

References
----------
- Vaswani et al., "Attention Is All You Need", 2017, arXiv 1706.03762 (section 3.5).
- Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021,
  arXiv 2104.09864 (eq. 13-16 rotation, eq. 34 complex form, section 3.4.3 long-term decay).
- Chen et al., "Extending Context Window of Large Language Models via Positional
  Interpolation", 2023, arXiv 2306.15595.
- bloc97, "NTK-Aware Scaled RoPE", r/LocalLLaMA, 2023; emozilla, "Dynamically Scaled RoPE", 2023.
- Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models", 2023,
  arXiv 2309.00071.
- Llama Team, "The Llama 3 Herd of Models", 2024, arXiv 2407.21783.
- Reference code: huggingface/transformers ``src/transformers/modeling_rope_utils.py``
  (``ROPE_INIT_FUNCTIONS``: linear, dynamic, yarn, llama3),
  ``src/transformers/models/llama/modeling_llama.py`` (``LlamaRotaryEmbedding``,
  ``rotate_half``, ``apply_rotary_pos_emb``), ``src/transformers/models/llama/
  convert_llama_weights_to_hf.py`` (``permute``); meta-llama/llama ``llama/model.py``
  (``precompute_freqs_cis``, ``apply_rotary_emb``); meta-llama/llama-models
  ``models/llama3/reference_impl/model.py`` (``apply_scaling``); deepseek-ai/DeepSeek-V3
  ``inference/model.py`` (``precompute_freqs_cis`` with YaRN, ``apply_rotary_emb``).

Contents
--------
2. Core: validation at the door (``_check_*``); RoPE, half-split layout (``rope_inv_freq``,
   ``rope_cos_sin``, ``rotate_half``, ``apply_rope``); RoPE, interleaved layout
   (``rope_freqs_cis``, ``apply_rope_complex``, ``rope_cos_sin_interleaved``,
   ``rotate_every_two``, ``apply_rope_interleaved``); ``RotaryEmbedding``; sinusoidal encodings
   (``sinusoidal_encoding``, ``SinusoidalPositionalEncoding``).
3. Baselines and apparatus: context extension (``default_inv_freq``, ``linear_scaling_inv_freq``,
   ``ntk_aware_inv_freq``, ``dynamic_ntk_inv_freq``, ``yarn_mscale``, ``yarn_inv_freq``,
   ``llama3_inv_freq``, ``rope_scaling_inv_freq``); explicit matrices
   (``sinusoidal_shift_matrix``, ``rope_rotation_matrix``); the layout permutation
   (``interleaved_to_half_split_index``, ``permute_for_half_split``, ``permute_for_interleaved``);
   score patterns (``attention_score_matrices``, ``toeplitz_deviation``).
4. Experiments: ``check_sinusoidal``, ``check_rope``, ``rope_long_term_decay``,
   ``check_attention_patterns``, ``context_extension``, ``benchmark_rope``, ``rope_claims``.
5. Figures: one ``plot_<png name>`` per figure, and the functions that word their titles.
6. Main: ``parse_args``, the ``print_<stage>`` helpers, ``main``.
7. Plumbing (identical in every script): timer, device, machine info, flags, ``save_outputs``.

Read first: ``rope_inv_freq`` .. ``apply_rope`` (the four lines every RoPE model runs), then
``RotaryEmbedding``, ``apply_rope_complex`` next to RoFormer eq. 34, ``permute_for_half_split``,
then ``yarn_inv_freq`` and ``llama3_inv_freq`` next to transformers' ``modeling_rope_utils.py``.
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
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

# =============================================================================
# 2. Core: RoPE in both layouts, RotaryEmbedding, sinusoidal encodings, context extension
# =============================================================================

# ---- validation at the door: the house vocabulary, then this script's rules ------------------


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


def _check_pair_dim(**dims: int) -> None:
    """Rotations act on pairs of dimensions: every dimension must be an even int >= 2."""
    _check_sizes(**dims)
    for name, value in dims.items():
        if value % 2:
            raise ValueError(f"{name} ({value}) must be even (dimensions form pairs)")


def _check_frequency_base(name: str, value: float) -> None:
    """theta_i = base^(-2i/d) slows down along the pairs only when base > 1 (and finite)."""
    _check_positive(**{name: value})
    if value <= 1:
        raise ValueError(f"{name} ({value}) must be > 1 so that frequencies decrease along pairs")


def _check_extension_factor(factor: float) -> None:
    _check_positive(factor=factor)
    if factor < 1:
        raise ValueError(f"factor ({factor}) must be >= 1 (it is the context extension ratio)")


def _check_length(**lengths: int) -> None:
    """A length that may be 0 (an empty table is a correct answer): an int (not a bool) >= 0."""
    for name, value in lengths.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} ({value!r}) must be an int")
        if value < 0:
            raise ValueError(f"{name} ({value}) must be >= 0")


def _check_float_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype ({dtype!r}) must be a floating-point torch.dtype")


def _check_rotary_positions(seq_len, positions, start_pos, max_seq_len: int, device) -> None:
    """Rows of a (max_seq_len, head_dim) table: ``start_pos .. start_pos + seq_len - 1``, or an
    integer tensor ``positions`` of shape (seq_len,) or (batch, seq_len) on the table's device."""
    _check_length(seq_len=seq_len)
    _check_start_pos(start_pos)
    if positions is None:
        if start_pos + seq_len > max_seq_len:
            raise ValueError(
                f"start_pos ({start_pos}) + seq_len ({seq_len}) needs {start_pos + seq_len} "
                f"positions, but max_seq_len is {max_seq_len} "
                f"(room for {max(max_seq_len - start_pos, 0)} more)"
            )
        return
    if start_pos != 0:
        raise ValueError(f"start_pos ({start_pos}) must be 0 when positions are given")
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions dtype ({positions.dtype}) must be an integer dtype")
    if positions.dim() not in (1, 2) or positions.shape[-1] != seq_len:
        raise ValueError(
            f"positions (shape {tuple(positions.shape)}) must have shape (seq_len,) or "
            f"(batch, seq_len) with seq_len = {seq_len}"
        )
    if positions.device != device:
        raise ValueError(f"positions (on {positions.device}) must be on {device}, as the table")
    if positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < max_seq_len:
        raise ValueError(
            f"positions (min {int(positions.min())}, max {int(positions.max())}) must lie in "
            f"0 .. {max_seq_len - 1}: the cos/sin table holds max_seq_len ({max_seq_len}) rows"
        )


# ---- RoPE, half-split layout (Hugging Face, GPT-NeoX): the house default ----------------------
# Shared verbatim with grouped_query_attention.py and multihead_latent_attention.py. They do not
# validate (callers do): these four lines are what every RoPE model runs in its forward.


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


# ---- RoPE, interleaved layout (RoFormer, Meta llama, DeepSeek) -------------------------------
# Public helpers like the four above: they validate the sizes and ranks they are given.


def rope_freqs_cis(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """e^(j m theta_i) as complex64, (seq_len, head_dim/2): Meta's ``precompute_freqs_cis``.

    One complex number per pair holds both cos and sin, so this table is half the bytes of the
    half-split (cos, sin) pair, whose two halves repeat each value.
    """
    _check_pair_dim(head_dim=head_dim)
    _check_frequency_base("base", base)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dim() != 1:
        raise ValueError(f"positions (shape {tuple(positions.shape)}) must be 1-D (seq_len,)")
    angles = torch.outer(positions.float(), rope_inv_freq(head_dim, base, positions.device))
    return torch.polar(torch.ones_like(angles), angles)  # |z| = 1, arg z = m * theta_i


def apply_rope_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """RoFormer eq. 34: read pair (x_2i, x_2i+1) as x_2i + j x_2i+1 and multiply by e^(j m theta_i).

    x: (..., seq_len, head_dim) in the interleaved layout, freqs_cis: (seq_len, head_dim/2).
    (Meta's code keeps (batch, seq_len, n_heads, head_dim) and reshapes freqs_cis to broadcast;
    with the house layout (batch, n_heads, seq_len, head_dim) it broadcasts as is.)
    """
    if not isinstance(freqs_cis, torch.Tensor) or freqs_cis.dim() != 2:
        raise ValueError("freqs_cis must be a (seq_len, head_dim/2) complex tensor")
    _check_float_tensor("x", x, 2 * freqs_cis.shape[-1])
    if x.dim() < 2 or x.shape[-2] != freqs_cis.shape[0]:
        raise ValueError(f"x (shape {tuple(x.shape)}) must have seq_len {freqs_cis.shape[0]}")
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (..., seq_len, head_dim/2, 2)
    z = torch.view_as_complex(pairs)  # (..., seq_len, head_dim/2) complex
    rotated = torch.view_as_real(z * freqs_cis)  # RoFormer eq. 34; (..., seq_len, head_dim/2, 2)
    return rotated.flatten(-2).type_as(x)  # (..., seq_len, head_dim)


def rope_cos_sin_interleaved(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos and sin of m * theta_i, each (seq_len, head_dim), every angle repeated twice in a row."""
    _check_pair_dim(head_dim=head_dim)
    _check_frequency_base("base", base)
    angles = torch.outer(positions.float(), rope_inv_freq(head_dim, base, positions.device))
    angles = angles.repeat_interleave(2, dim=-1)  # (seq_len, head_dim): a0, a0, a1, a1, ...
    return angles.cos(), angles.sin()


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotate_half for the interleaved layout."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]  # (..., head_dim/2) each
    return torch.stack((-x_odd, x_even), dim=-1).flatten(-2)  # (..., head_dim)


def apply_rope_interleaved(x, cos, sin):
    """The real-valued interleaved form (GPT-J): x * cos + rotate_every_two(x) * sin, with cos and
    sin from ``rope_cos_sin_interleaved`` (each angle twice in a row, not the half-split table)."""
    return x * cos + rotate_every_two(x) * sin


# ---- the module -------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """RoPE for q and k in the half-split layout, with cos/sin cached for ``max_seq_len`` positions.

    ``forward(q, k, positions=None, start_pos=0)`` rotates q (batch, n_heads, seq_len, head_dim)
    and k (batch, n_kv_heads, seq_len, head_dim): the same batch, seq_len, dtype and device.
    Positions are ``start_pos .. start_pos + seq_len - 1`` (decoding with a KV cache) or an
    integer tensor ``positions`` of shape (seq_len,) (every sequence) or (batch, seq_len) (one row
    per sequence: padding, packing). Positions outside the table raise ValueError: the table is
    not extended, since that would run the model at angles it never saw; extending the context is
    a decision, made up front by choosing ``rope_scaling`` and ``max_seq_len``.

    ``rope_scaling`` mirrors transformers' ``rope_parameters`` without rope_theta, e.g.
    ``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}``
    (transformers' ``rope_theta`` is this module's ``rope_base``). "dynamic" also needs
    ``max_position_embeddings`` and is evaluated once, at seq_len = max_seq_len.

    >>> rope = RotaryEmbedding(head_dim=8, max_seq_len=16)
    >>> q, k = torch.ones(2, 4, 5, 8), torch.ones(2, 1, 5, 8)  # k: fewer (kv) heads
    >>> q_rot, k_rot = rope(q, k, start_pos=3)  # positions 3 .. 7
    >>> tuple(q_rot.shape), tuple(k_rot.shape), tuple(rope.cos_sin(5, start_pos=3)[0].shape)
    ((2, 4, 5, 8), (2, 1, 5, 8), (5, 8))
    >>> bool(torch.allclose(q_rot.norm(dim=-1), q.norm(dim=-1)))  # rotations keep norms
    True
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        rope_base: float = 10000.0,
        rope_scaling: dict | None = None,
        device=None,
    ) -> None:
        super().__init__()
        _check_pair_dim(head_dim=head_dim)
        _check_sizes(max_seq_len=max_seq_len)
        _check_frequency_base("rope_base", rope_base)
        if rope_scaling is not None and not isinstance(rope_scaling, dict):
            raise TypeError(f"rope_scaling ({rope_scaling!r}) must be a dict or None")
        self.head_dim, self.max_seq_len = head_dim, max_seq_len
        params = dict(rope_scaling or {})
        rope_type = params.pop("rope_type", "default")
        if rope_type == "dynamic":
            params.setdefault("seq_len", max_seq_len)
        inv_freq, self.attention_scaling = rope_scaling_inv_freq(
            rope_type, head_dim, rope_base, **params
        )
        inv_freq = inv_freq.to(device)  # (head_dim/2,)
        angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (max_seq_len, head_dim), half-split
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_cached", angles.cos() * self.attention_scaling, persistent=False)
        self.register_buffer("sin_cached", angles.sin() * self.attention_scaling, persistent=False)

    def cos_sin(
        self, seq_len: int, positions: torch.Tensor | None = None, start_pos: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the table: (seq_len, head_dim), or (batch, 1, seq_len, head_dim) for
        (batch, seq_len) positions (the 1 broadcasts over heads)."""
        _check_rotary_positions(
            seq_len, positions, start_pos, self.max_seq_len, self.cos_cached.device
        )
        if positions is None:
            rows = slice(start_pos, start_pos + seq_len)
            return self.cos_cached[rows], self.sin_cached[rows]
        cos, sin = self.cos_cached[positions], self.sin_cached[positions]  # (..., seq_len, hd)
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (batch, 1, seq_len, head_dim)
        return cos, sin

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor | None = None,
        start_pos: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for name, t in (("q", q), ("k", k)):
            _check_float_tensor(name, t, self.head_dim)
            if t.dim() != 4 or t.device != self.cos_cached.device:
                raise ValueError(
                    f"{name} (shape {tuple(t.shape)} on {t.device}) must be (batch, heads, "
                    f"seq_len, {self.head_dim}) on {self.cos_cached.device}"
                )
        if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.dtype != q.dtype:
            raise ValueError(
                f"k (shape {tuple(k.shape)}, {k.dtype}) must have q's batch, seq_len and dtype "
                f"(shape {tuple(q.shape)}, {q.dtype}): no broadcasting, no casts"
            )
        cos, sin = self.cos_sin(q.shape[2], positions, start_pos)
        if cos.dim() == 4 and cos.shape[0] != q.shape[0]:
            raise ValueError(f"positions (shape {tuple(positions.shape)}) must have q's batch")
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # RoFormer eq. 13-16


# ---- sinusoidal encodings (Vaswani et al. 2017, section 3.5): added, not rotated -------------


def _sinusoidal_inv_freq(d_model: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/d_model) in float64 (rope_inv_freq's formula; that one is float32)."""
    return 1.0 / base ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)


def sinusoidal_encoding(
    seq_len: int,
    d_model: int,
    base: float = 10000.0,
    start_pos: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos * theta_i), PE[pos, 2i + 1] = cos(pos * theta_i).  (seq_len, d_model)

    Rows are positions ``start_pos .. start_pos + seq_len - 1``. Computed in float64 and cast to
    ``dtype`` at the end, so every entry is its formula rounded once: computing in bfloat16 would
    round the positions themselves (8 significant bits: 257 becomes 256) and be off by up to ~1.
    """
    _check_length(seq_len=seq_len)
    _check_pair_dim(d_model=d_model)
    _check_frequency_base("base", base)
    _check_start_pos(start_pos)
    _check_float_dtype(dtype)
    positions = torch.arange(start_pos, start_pos + seq_len, dtype=torch.float64)
    angles = torch.outer(positions, _sinusoidal_inv_freq(d_model, base))  # (seq_len, d_model/2)
    # stack -> (seq_len, d_model/2, 2) = (sin, cos) per pair; flatten -> sin, cos, sin, cos, ...
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return pe.to(dtype=dtype, device=device)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds PE(start_pos .. start_pos + seq_len - 1) to x (batch, seq_len, d_model).

    The table holds ``max_seq_len`` positions; positions beyond it raise ValueError. (Vaswani et
    al. also scale embeddings by sqrt(d_model) and apply dropout: that is the embedding layer's
    and the block's business, not the encoding's.)
    """

    def __init__(self, d_model: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        _check_sizes(max_seq_len=max_seq_len)
        self.d_model, self.max_seq_len = d_model, max_seq_len
        pe = sinusoidal_encoding(max_seq_len, d_model, base)  # validates d_model and base
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        _check_float_tensor("x", x, self.d_model)
        if x.dim() < 2 or x.device != self.pe.device:
            raise ValueError(
                f"x (shape {tuple(x.shape)} on {x.device}) must be "
                f"(..., seq_len, {self.d_model}) on {self.pe.device}"
            )
        _check_rotary_positions(x.shape[-2], None, start_pos, self.max_seq_len, self.pe.device)
        return x + self.pe[start_pos : start_pos + x.shape[-2]].to(x.dtype)


# =============================================================================
# 3. Baselines and apparatus: context-extension schemes, rotation matrices, layout permutation
# =============================================================================

# ---- context extension: new inverse frequencies (and an attention scale) -----------------------
# Each takes the keys of transformers' ``config.rope_parameters`` and returns (inv_freq
# (head_dim/2,), attention_scaling) like transformers' ROPE_INIT_FUNCTIONS; attention_scaling
# multiplies cos and sin, so the logits by its square. ``rope_theta`` is RotaryEmbedding's
# ``rope_base`` under transformers' name.


def _check_extension(head_dim: int, rope_theta: float, factor: float, **lengths: int) -> None:
    """The arguments every scaling function shares: even head_dim, base > 1, factor >= 1."""
    _check_pair_dim(head_dim=head_dim)
    _check_frequency_base("rope_theta", rope_theta)
    _check_extension_factor(factor)
    _check_sizes(**lengths)


def _check_ntk_head_dim(head_dim: int) -> None:
    if head_dim < 4:
        raise ValueError(f"head_dim ({head_dim}) must be >= 4 for NTK scaling (exponent d/(d-2))")


def default_inv_freq(head_dim: int, rope_theta: float = 10000.0) -> tuple[torch.Tensor, float]:
    """Plain RoPE: theta_i = rope_theta^(-2i/head_dim), no attention scaling."""
    _check_extension(head_dim, rope_theta, 1.0)
    return rope_inv_freq(head_dim, rope_theta), 1.0


def linear_scaling_inv_freq(
    head_dim: int, rope_theta: float, factor: float
) -> tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al. 2023): position m -> m / s, i.e. theta_i -> theta_i / s.
    Every pair slows down by s; the fast pairs lose resolution (neighbours 1/s of a step apart)."""
    _check_extension(head_dim, rope_theta, factor)
    return rope_inv_freq(head_dim, rope_theta) / factor, 1.0  # PI


def ntk_aware_inv_freq(
    head_dim: int, rope_theta: float, factor: float
) -> tuple[torch.Tensor, float]:
    """Static NTK-aware scaling (bloc97 2023): base' = base * s^(d / (d - 2)), so
    theta_i' = theta_i * s^(-2i / (d - 2)): pair 0 is kept, the slowest pair divided by exactly s.
    (transformers has no static type; its "dynamic" type is ``dynamic_ntk_inv_freq``.)"""
    _check_extension(head_dim, rope_theta, factor)
    _check_ntk_head_dim(head_dim)
    new_base = rope_theta * factor ** (head_dim / (head_dim - 2))  # NTK-aware
    return rope_inv_freq(head_dim, new_base), 1.0


def dynamic_ntk_inv_freq(
    head_dim: int,
    rope_theta: float,
    factor: float,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Dynamic NTK (emozilla 2023, transformers "dynamic"): NTK scaling whose strength grows with
    the current length seq_len (default and minimum: the trained length L):

        base' = base * (s * seq_len / L - (s - 1))^(d / (d - 2))

    Plain RoPE up to L; at seq_len = s * L the stretch is s^2 - s + 1, not s (57 for s = 8).
    """
    seq_len = max_position_embeddings if seq_len is None else seq_len
    L = max_position_embeddings
    _check_extension(head_dim, rope_theta, factor, max_position_embeddings=L, seq_len=seq_len)
    _check_ntk_head_dim(head_dim)
    stretch = factor * max(seq_len, L) / L - (factor - 1)  # 1 up to the trained length
    new_base = rope_theta * stretch ** (head_dim / (head_dim - 2))
    return rope_inv_freq(head_dim, new_base), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. eq. 22); 1 when there is no extension."""
    _check_positive(scale=scale, mscale=mscale)
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(
    head_dim: int,
    rope_theta: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
    truncate: bool = True,
) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, "NTK-by-parts" + attention temperature).

    Pair i turns r_i = L theta_i / (2 pi) times over the trained length L. Pairs with
    r_i > beta_fast keep theta_i (extrapolate), pairs with r_i < beta_slow get theta_i / s
    (interpolate, as PI), a linear ramp in between (eq. 18-20); the ramp runs over the pair
    indices i(r) = d ln(L / (2 pi r)) / (2 ln base), floored/ceiled when ``truncate`` and clipped
    at d - 1 as in DeepSeek-V3 and transformers. q and k are scaled by sqrt(1/t) = 0.1 ln s + 1
    (eq. 22); DeepSeek's variant divides mscale(s, mscale) by mscale(s, mscale_all_dim).
    """
    L = original_max_position_embeddings
    _check_extension(head_dim, rope_theta, factor, original_max_position_embeddings=L)
    _check_positive(beta_fast=beta_fast, beta_slow=beta_slow)
    if not beta_fast > beta_slow:
        raise ValueError(f"beta_fast ({beta_fast}) must be > beta_slow ({beta_slow})")
    optional = {"mscale": mscale, "mscale_all_dim": mscale_all_dim}
    _check_positive(**{k: v for k, v in optional.items() if v is not None})
    if not isinstance(truncate, bool):
        raise TypeError(f"truncate ({truncate!r}) must be a bool")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    _check_positive(attention_factor=attention_factor)

    def pair_index(n_rotations: float) -> float:  # i(r) above
        return head_dim * math.log(L / (n_rotations * 2 * math.pi)) / (2 * math.log(rope_theta))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if high == low:
        high += 0.001  # avoid 0/0 in the ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = rope_inv_freq(head_dim, rope_theta)  # (head_dim/2,)
    # ramp 0: keep theta_i (fast pairs), ramp 1: theta_i / s (slow pairs); eq. 18-20
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
    return inv_freq, float(attention_factor)


def llama3_inv_freq(
    head_dim: int,
    rope_theta: float,
    factor: float,
    original_max_position_embeddings: int,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> tuple[torch.Tensor, float]:
    """Llama 3.1 scaling (Meta's ``apply_scaling``; published: s=8, low=1, high=4, L=8192).

    wavelength_i = 2 pi / theta_i.  Short wavelengths (< L / high_freq_factor) are kept, long ones
    (> L / low_freq_factor) are divided by s, and in between
        theta_i' = (1 - a) theta_i / s + a theta_i,   a = (L / wavelength_i - low) / (high - low).
    """
    L = original_max_position_embeddings
    _check_extension(head_dim, rope_theta, factor, original_max_position_embeddings=L)
    _check_positive(low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor)
    if not high_freq_factor > low_freq_factor:
        raise ValueError(
            f"high_freq_factor ({high_freq_factor}) must be > low_freq_factor ({low_freq_factor})"
        )
    inv_freq = rope_inv_freq(head_dim, rope_theta)
    wavelength = 2 * math.pi / inv_freq
    smooth = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)  # a
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelength > L / low_freq_factor, inv_freq / factor, blended)
    out = torch.where(wavelength < L / high_freq_factor, inv_freq, out)
    return out, 1.0


ROPE_SCALING_FUNCTIONS = {
    "default": default_inv_freq,
    "linear": linear_scaling_inv_freq,
    "ntk": ntk_aware_inv_freq,
    "dynamic": dynamic_ntk_inv_freq,
    "yarn": yarn_inv_freq,
    "llama3": llama3_inv_freq,
}


def rope_scaling_inv_freq(
    rope_type: str, head_dim: int, rope_theta: float = 10000.0, **params
) -> tuple[torch.Tensor, float]:
    """Dispatch on ``rope_type`` as transformers does on ``config.rope_parameters["rope_type"]``."""
    if not isinstance(rope_type, str) or rope_type not in ROPE_SCALING_FUNCTIONS:
        valid = ", ".join(repr(name) for name in ROPE_SCALING_FUNCTIONS)
        raise ValueError(f"rope_type ({rope_type!r}) must be one of {valid}")
    return ROPE_SCALING_FUNCTIONS[rope_type](head_dim, rope_theta, **params)


# ---- explicit matrices: the math made visible, for reading and checking, not for speed -------


def _check_int(**values: int) -> None:
    """An integer that may be negative (an offset): not a bool, not a float."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} ({value!r}) must be an int")


def sinusoidal_shift_matrix(
    k: int, d_model: int, base: float = 10000.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """M_k with PE(pos + k) = M_k PE(pos) for every pos.  (d_model, d_model), block diagonal.

    From sin(a + b) = sin a cos b + cos a sin b and cos(a + b) = cos a cos b - sin a sin b with
    a = pos * theta_i, b = k * theta_i: block i is [[cos b, sin b], [-sin b, cos b]], a rotation
    that depends on k only. This is the "attend by relative positions" hint of section 3.5.
    """
    _check_int(k=k)
    _check_pair_dim(d_model=d_model)
    _check_frequency_base("base", base)
    _check_float_dtype(dtype)
    angle = k * _sinusoidal_inv_freq(d_model, base)  # (d_model/2,)
    c, s = angle.cos(), angle.sin()
    blocks = torch.stack((torch.stack((c, s), -1), torch.stack((-s, c), -1)), -2)  # (d/2, 2, 2)
    return torch.block_diag(*blocks).to(dtype)


def rope_rotation_matrix(
    position: int,
    head_dim: int,
    base: float = 10000.0,
    layout: str = "half_split",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The explicit (head_dim, head_dim) rotation R_m of RoFormer eq. 15, for reading, not speed.

    ``apply_rope(x, cos, sin)`` equals ``x @ R_m.T``; the matrix makes R_m^T R_n = R_(n-m) visible.
    """
    _check_int(position=position)
    _check_pair_dim(head_dim=head_dim)
    _check_frequency_base("base", base)
    _check_float_dtype(dtype)
    if layout not in ("half_split", "interleaved"):
        raise ValueError(f"layout ({layout!r}) must be one of 'half_split', 'interleaved'")
    angle = position * rope_inv_freq(head_dim, base).to(dtype)  # (head_dim/2,)
    c, s = angle.cos(), angle.sin()
    half = head_dim // 2
    i = torch.arange(half)
    a, b = (i, i + half) if layout == "half_split" else (2 * i, 2 * i + 1)  # pair i = dims (a, b)
    R = torch.zeros(head_dim, head_dim, dtype=dtype)
    R[a, a], R[a, b], R[b, a], R[b, b] = c, -s, s, c  # RoFormer eq. 15
    return R


# ---- the layout permutation (transformers' convert_llama_weights_to_hf.py ``permute``) -------


def interleaved_to_half_split_index(head_dim: int) -> torch.Tensor:
    """Index p with x_half = x_interleaved[..., p]: (0, 2, 4, ..., d-2, 1, 3, ..., d-1).

    Pair i sits at dims (2i, 2i+1) in the interleaved layout and at (i, i + d/2) in half-split.
    """
    _check_pair_dim(head_dim=head_dim)
    # (head_dim/2, 2): row i = pair i; transpose -> (2, head_dim/2): all first halves, then seconds
    return torch.arange(head_dim).view(head_dim // 2, 2).t().reshape(-1)


def _check_qk_weight(weight: torch.Tensor, n_heads: int) -> int:
    """A (n_heads * head_dim, d_model) projection weight with an even head_dim; returns head_dim."""
    _check_float_tensor("weight", weight)
    _check_sizes(n_heads=n_heads)
    if weight.dim() != 2 or weight.shape[0] % n_heads:
        raise ValueError(
            f"weight (shape {tuple(weight.shape)}) must be 2-D with rows divisible by "
            f"n_heads ({n_heads})"
        )
    if weight.shape[0] // n_heads % 2:
        raise ValueError(
            f"weight rows / n_heads = head_dim ({weight.shape[0] // n_heads}) must be even "
            "(dimensions form pairs)"
        )
    return weight.shape[0] // n_heads


def permute_for_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q_proj / k_proj weight (n_heads * head_dim, d_model), head by head,
    from the interleaved layout (Meta checkpoints) to the half-split one (transformers).

    Then q_half = x @ W'^T equals q_interleaved[..., p] with p = interleaved_to_half_split_index,
    so half-split RoPE on q_half is interleaved RoPE on q_interleaved, permuted; dot products
    q.k do not see a permutation applied to both. Use n_kv_heads for k_proj.
    """
    head_dim = _check_qk_weight(weight, n_heads)
    out_features, in_features = weight.shape
    w = weight.view(n_heads, head_dim // 2, 2, in_features)  # rows of head h: pair i, member j
    w = w.transpose(1, 2)  # (n_heads, 2, head_dim/2, in_features): members first, then pairs
    return w.reshape(out_features, in_features)


def permute_for_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``permute_for_half_split``: half-split rows back to interleaved rows."""
    head_dim = _check_qk_weight(weight, n_heads)
    out_features, in_features = weight.shape
    w = weight.view(n_heads, 2, head_dim // 2, in_features).transpose(1, 2)
    return w.reshape(out_features, in_features)  # (n_heads * head_dim, in_features)


# ---- score patterns: what a layer sees of position alone ---------------------------------------


def attention_score_matrices(
    seq_len: int = 64, head_dim: int = 64, base: float = 10000.0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Scores q_m . k_n / sqrt(d) with q = k = x (no learned projections, to see position alone),
    for no encoding, sinusoidal added, and RoPE; on random content (a different x at every
    position) and on constant content (the same x everywhere). Each (seq_len, seq_len)."""
    _check_sizes(seq_len=seq_len)
    _check_pair_dim(head_dim=head_dim)
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(seq_len)
    pe = sinusoidal_encoding(seq_len, head_dim, base)
    cos, sin = rope_cos_sin(positions, head_dim, base)
    out = {}
    for content, x in (
        ("random", torch.randn(seq_len, head_dim, generator=g)),
        ("constant", torch.randn(1, head_dim, generator=g).expand(seq_len, head_dim)),
    ):
        for scheme, v in (
            ("none", x),
            ("sinusoidal", x + pe),
            ("rope", apply_rope(x, cos, sin)),
        ):
            out[f"{content}_{scheme}"] = v @ v.T / math.sqrt(head_dim)
    return out


def toeplitz_deviation(scores: torch.Tensor) -> float:
    """Largest spread along any diagonal: 0 exactly when scores depend only on n - m."""
    _check_float_tensor("scores", scores)
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores (shape {tuple(scores.shape)}) must be a square matrix")
    n = scores.shape[0]
    return max(
        (max_abs_err(d, d.mean()) for d in (scores.diagonal(o) for o in range(-n + 1, n))),
        default=0.0,
    )


# =============================================================================
# 4. Experiments: checks and benchmarks, each returning a dict for results.json
# =============================================================================


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


def check_sinusoidal(
    d_model: int = 128, seq_len: int = 1024, base: float = 10000.0, shifts=(1, 3, 10, 100, 300)
) -> dict:
    """PE(pos + k) = M_k PE(pos) for all pos, with M_k a rotation built from k alone.

    Also PE(pos) . PE(pos + k) = sum_i cos(k theta_i): dot products see only the offset.
    Checked in float64 (exact math) and in float32 (the table a model stores, rounded once).
    """
    _check_pair_dim(d_model=d_model)
    _check_sizes(seq_len=seq_len)
    pe64 = sinusoidal_encoding(seq_len, d_model, base, dtype=torch.float64)  # (seq_len, d_model)
    pe32 = sinusoidal_encoding(seq_len, d_model, base)
    inv_freq = _sinusoidal_inv_freq(d_model, base)
    eye = torch.eye(d_model, dtype=torch.float64)
    rows = []
    for k in shifts:
        M = sinusoidal_shift_matrix(k, d_model, base)  # (d_model, d_model), depends on k only
        first = slice(0, seq_len - k)  # positions pos whose pos + k is still in the table
        dots = (pe64[k:] * pe64[first]).sum(-1)  # PE(pos) . PE(pos + k) for every pos
        rows.append(
            {
                "k": k,
                "max_abs_err_shift_float64": max_abs_err(pe64[k:], pe64[first] @ M.T),
                "max_abs_err_shift_float32": max_abs_err(pe32[k:], pe32[first] @ M.T.float()),
                "max_abs_err_orthogonal": max_abs_err(M.T @ M, eye),
                "max_abs_err_dot_vs_formula": max_abs_err(dots, torch.cos(k * inv_freq).sum()),
            }
        )
    worst = {key: max(r[key] for r in rows) for key in rows[0] if key != "k"}
    wavelength = 2 * math.pi / inv_freq
    return {
        "d_model": d_model,
        "seq_len": seq_len,
        "base": base,
        "shifts": rows,
        **worst,
        "shortest_wavelength_tokens": float(wavelength[0]),
        "longest_wavelength_tokens": float(wavelength[-1]),
    }


def check_rope(
    head_dim: int = 64,
    max_pos: int = 4096,
    n_trials: int = 2000,
    base: float = 10000.0,
    d_model: int = 256,
    n_heads: int = 4,
    seq_len: int = 64,
) -> dict:
    """RoPE's properties on random inputs, worst case over ``n_trials`` random (q, k, m, n).

    q and k are unit vectors, so score errors are relative to |q||k|. Angles are float32 (as in
    every implementation), so errors stay below ~max_pos * 6e-8 (2.4e-4 at 4096 positions).
    """
    _check_pair_dim(head_dim=head_dim)
    _check_sizes(max_pos=max_pos, n_trials=n_trials, d_model=d_model, n_heads=n_heads)
    _check_sizes(seq_len=seq_len)
    q = torch.nn.functional.normalize(torch.randn(n_trials, head_dim), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(n_trials, head_dim), dim=-1)
    m = torch.randint(0, max_pos, (n_trials,))
    n = torch.randint(0, max_pos, (n_trials,))
    cos_m, sin_m = rope_cos_sin(m, head_dim, base)  # (n_trials, head_dim): one position per row
    cos_n, sin_n = rope_cos_sin(n, head_dim, base)
    cos_d, sin_d = rope_cos_sin(n - m, head_dim, base)  # the offset may be negative: R_-k = R_k^T
    q_m, k_n = apply_rope(q, cos_m, sin_m), apply_rope(k, cos_n, sin_n)

    norm_err = max_abs_err(q_m.norm(dim=-1), q.norm(dim=-1))
    offset_err = max_abs_err((q_m * k_n).sum(-1), (q * apply_rope(k, cos_d, sin_d)).sum(-1))

    # Matrix form (RoFormer eq. 15), float64: R_m^T R_n = R_(n-m), and apply_rope = x @ R_m^T.
    matrix_err, compose_err = 0.0, 0.0
    for mi, ni in zip(m[:8].tolist(), n[:8].tolist(), strict=True):
        R_m = rope_rotation_matrix(mi, head_dim, base)
        R_n = rope_rotation_matrix(ni, head_dim, base)
        compose_err = max(
            compose_err, max_abs_err(R_m.T @ R_n, rope_rotation_matrix(ni - mi, head_dim, base))
        )
        x = q[:1]
        c, s = rope_cos_sin(torch.tensor([mi]), head_dim, base)
        matrix_err = max(matrix_err, max_abs_err(apply_rope(x, c, s).double(), x.double() @ R_m.T))

    # Interleaved: the complex form (Meta) equals the real form (GPT-J rotate_every_two).
    positions = torch.arange(seq_len)
    x = torch.randn(2, n_heads, seq_len, head_dim)  # (batch, n_heads, seq_len, head_dim)
    freqs_cis = rope_freqs_cis(positions, head_dim, base)
    cos_i, sin_i = rope_cos_sin_interleaved(positions, head_dim, base)
    complex_err = max_abs_err(
        apply_rope_complex(x, freqs_cis), apply_rope_interleaved(x, cos_i, sin_i)
    )

    # Layouts: an interleaved model, and the same model converted to half-split by permuting rows.
    h = torch.randn(seq_len, d_model)  # hidden states of one sequence
    w_q = torch.randn(n_heads * head_dim, d_model) / math.sqrt(d_model)
    w_k = torch.randn(n_heads * head_dim, d_model) / math.sqrt(d_model)

    def heads(w):  # (seq_len, n_heads * head_dim) -> (n_heads, seq_len, head_dim)
        return (h @ w.T).view(seq_len, n_heads, head_dim).transpose(0, 1)

    q_il = apply_rope_complex(heads(w_q), freqs_cis)
    k_il = apply_rope_complex(heads(w_k), freqs_cis)
    cos, sin = rope_cos_sin(positions, head_dim, base)
    q_hs = apply_rope(heads(permute_for_half_split(w_q, n_heads)), cos, sin)
    k_hs = apply_rope(heads(permute_for_half_split(w_k, n_heads)), cos, sin)
    q_wrong = apply_rope(heads(w_q), cos, sin)  # interleaved weights run as half-split: a bug
    k_wrong = apply_rope(heads(w_k), cos, sin)
    scale = 1 / math.sqrt(head_dim)
    scores_il = q_il @ k_il.transpose(-1, -2) * scale  # (n_heads, seq_len, seq_len)
    scores_hs = q_hs @ k_hs.transpose(-1, -2) * scale
    scores_wrong = q_wrong @ k_wrong.transpose(-1, -2) * scale
    perm = interleaved_to_half_split_index(head_dim)

    # The module: start_pos = a slice of the full table; positions = start_pos.
    rope = RotaryEmbedding(head_dim, max_seq_len=2 * seq_len, rope_base=base)
    qq, kk = torch.randn(2, 1, n_heads, seq_len, head_dim).unbind(0)
    full_q, full_k = rope(qq, kk)
    start = seq_len // 3
    part_q, part_k = rope(qq[:, :, start:], kk[:, :, start:], start_pos=start)
    pos_q, _ = rope(qq[:, :, start:], kk[:, :, start:], positions=torch.arange(start, seq_len))
    start_pos_err = max(
        max_abs_err(full_q[:, :, start:], part_q), max_abs_err(full_k[:, :, start:], part_k)
    )

    return {
        "head_dim": head_dim,
        "n_trials": n_trials,
        "max_position": max_pos,
        "max_abs_err_norm": norm_err,
        "max_abs_err_scores_offset_only": offset_err,
        "max_abs_err_matrix_compose_float64": compose_err,
        "max_abs_err_apply_rope_vs_matrix": matrix_err,
        "max_abs_err_complex_vs_interleaved": complex_err,
        "max_abs_err_half_split_vs_interleaved_q": max_abs_err(q_hs, q_il[..., perm]),
        "max_abs_err_layout_scores": max_abs_err(scores_hs, scores_il),
        "max_abs_err_layout_scores_unpermuted": max_abs_err(scores_wrong, scores_il),
        "max_abs_err_start_pos_vs_full": start_pos_err,
        "max_abs_err_positions_vs_start_pos": max_abs_err(pos_q, part_q),
    }


def rope_long_term_decay(
    head_dim: int = 128,
    max_distance: int = 256,
    base: float = 10000.0,
    n_samples: int = 4096,
    start: int = 100,
    chunk: int = 4096,
) -> dict:
    """Scores vs relative distance Delta = n - m, three ways.

    1. RoFormer's relative upper bound (section 3.4.3, their Figure 2): (1 / (d/2)) sum_l |S_l|,
       S_l = sum_(k<l) e^(j Delta theta_k). Times (d/2) max_k |h_(k+1) - h_k| it bounds |score|.
    2. Identical q = k ~ N(0, I): E<R_m q, R_(m+Delta) q> = sum_i E[q_a^2 + q_b^2] cos(Delta
       theta_i) = 2 sum_i cos(Delta theta_i), equal to head_dim at Delta = 0 (analytic and MC).
    3. Independent q, k ~ N(0, I): the expected score is 0 at every distance (Monte Carlo).
    The Monte Carlo puts q at position ``start`` and k at ``start + Delta``.
    """
    _check_pair_dim(head_dim=head_dim)
    _check_sizes(max_distance=max_distance, n_samples=n_samples, chunk=chunk)
    _check_start_pos(start)
    distances = torch.arange(max_distance + 1)
    theta = rope_inv_freq(head_dim, base).double()  # (head_dim/2,)
    phase = torch.outer(distances.double(), theta)  # (D, head_dim/2): Delta * theta_k
    S = torch.polar(torch.ones_like(phase), phase).cumsum(-1)  # S_1 .. S_(d/2), (D, head_dim/2)
    relative_bound = S.abs().mean(-1)  # (D,): (1 / (d/2)) sum_l |S_l|
    expected_identical = 2 * phase.cos().sum(-1)  # (D,)

    cos_q, sin_q = rope_cos_sin(torch.tensor([start]), head_dim, base)  # (1, head_dim)
    cos_k, sin_k = rope_cos_sin(start + distances, head_dim, base)  # (D, head_dim)

    def scores(q_rot, v):  # <q_rot, apply_rope(v at start + Delta)> for every Delta: (size, D)
        # apply_rope(v, cos, sin) = v * cos + rotate_half(v) * sin, so the dot product with q_rot
        # at all D distances is two matrix products (no (size, D, head_dim) tensor).
        return (q_rot * v) @ cos_k.T + (q_rot * rotate_half(v)) @ sin_k.T

    sums = torch.zeros(4, len(distances), dtype=torch.float64)  # sum, sum of squares, x2 kinds
    for begin in range(0, n_samples, chunk):
        size = min(chunk, n_samples - begin)
        q = torch.randn(size, head_dim)
        k = torch.randn(size, head_dim)
        q_rot = apply_rope(q, cos_q, sin_q)  # q at position start: (size, head_dim)
        same, indep = scores(q_rot, q).double(), scores(q_rot, k).double()  # (size, D) each
        sums += torch.stack((same.sum(0), same.pow(2).sum(0), indep.sum(0), indep.pow(2).sum(0)))
    mean_same, mean_indep = sums[0] / n_samples, sums[2] / n_samples
    std_same = (sums[1] / n_samples - mean_same**2).clamp_min(0).sqrt()
    std_indep = (sums[3] / n_samples - mean_indep**2).clamp_min(0).sqrt()
    sem = math.sqrt(n_samples)
    z_same = (mean_same - expected_identical) / (std_same / sem)  # Monte Carlo vs analytic
    z_indep = mean_indep / (std_indep / sem)
    marks = sorted({d for d in (0, 1, 4, 16, 64, 256, max_distance) if d <= max_distance})
    return {
        "head_dim": head_dim,
        "n_samples": n_samples,
        "distances": distances.tolist(),
        "relative_upper_bound": relative_bound.tolist(),
        "expected_identical": expected_identical.tolist(),
        "mc_identical_mean": mean_same.tolist(),
        "mc_random_mean": mean_indep.tolist(),
        "mc_random_std": std_indep.tolist(),
        "relative_upper_bound_at_0": float(relative_bound[0]),
        "relative_upper_bound_at_max_distance": float(relative_bound[-1]),
        "marks": [
            {
                "distance": d,
                "relative_upper_bound": float(relative_bound[d]),
                "expected_identical": float(expected_identical[d]),
            }
            for d in marks
        ],
        "max_abs_z_identical_mc_vs_analytic": float(z_same.abs().max()),
        "max_abs_z_random_mean_vs_zero": float(z_indep.abs().max()),
    }


def check_attention_patterns(seq_len: int = 64, head_dim: int = 64, seed: int = 0) -> dict:
    """With constant content, RoPE scores depend only on n - m; sinusoidal ones do not, because
    (x + PE_m).(x + PE_n) has the absolute terms x.PE_m + x.PE_n. The spread along diagonals of
    each score matrix of ``attention_score_matrices`` (0: a function of n - m alone)."""
    mats = attention_score_matrices(seq_len, head_dim, seed=seed)
    return {
        "seq_len": seq_len,
        "head_dim": head_dim,
        "seed": seed,
        **{f"toeplitz_max_dev_{name}": toeplitz_deviation(s) for name, s in mats.items()},
    }


def context_extension(
    head_dim: int = 128,
    rope_theta: float = 500000.0,
    factor: float = 8.0,
    original_max_position_embeddings: int = 8192,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> dict:
    """Inverse frequencies of each scheme at one config (default: Llama 3.1 8B's published
    config.json: head_dim 128, rope_theta 5e5, factor 8, low 1, high 4, original length 8192)."""
    L = original_max_position_embeddings
    _check_extension(head_dim, rope_theta, factor, original_max_position_embeddings=L)
    methods = {
        "original": default_inv_freq(head_dim, rope_theta),
        "linear (PI)": linear_scaling_inv_freq(head_dim, rope_theta, factor),
        "NTK-aware (static)": ntk_aware_inv_freq(head_dim, rope_theta, factor),
        "dynamic NTK at s*L": dynamic_ntk_inv_freq(
            head_dim, rope_theta, factor, L, int(factor * L)
        ),
        "YaRN": yarn_inv_freq(head_dim, rope_theta, factor, L),
        "Llama 3.1": llama3_inv_freq(
            head_dim, rope_theta, factor, L, low_freq_factor, high_freq_factor
        ),
    }
    original = methods["original"][0]
    rows = {}
    for name, (inv_freq, scale) in methods.items():
        ratio = inv_freq / original
        rows[name] = {
            "inv_freq": inv_freq.tolist(),
            "attention_scaling": scale,
            "ratio_fastest_pair": float(ratio[0]),
            "ratio_slowest_pair": float(ratio[-1]),
            "pairs_unchanged": int((ratio > 1 - 1e-6).sum()),
            "pairs_divided_by_factor": int(((ratio * factor - 1).abs() < 1e-5).sum()),
            "longest_wavelength_tokens": float(2 * math.pi / inv_freq[-1]),
        }
    return {
        "head_dim": head_dim,
        "rope_theta": rope_theta,
        "factor": factor,
        "original_max_position_embeddings": L,
        "low_freq_factor": low_freq_factor,
        "high_freq_factor": high_freq_factor,
        "methods": rows,
    }


def benchmark_rope(
    batch: int,
    n_heads: int,
    seq_len: int,
    head_dim: int,
    device: torch.device,
    min_run_time: float,
    rounds: int = 5,
) -> dict:
    """Time per call of rotating one (batch, n_heads, seq_len, head_dim) tensor, four ways, in
    ``rounds`` interleaved rounds (every variant once per round, so load drifts hit all alike);
    per variant the median over rounds, and per comparison the median and range of the per-round
    ratios t(half_split_cached) / t(variant) (> 1: the variant is faster). When a range straddles
    1, the rounds are repeated once more. Also the bytes of each table (measured, checked against
    the formula)."""
    _check_sizes(batch=batch, n_heads=n_heads, seq_len=seq_len, rounds=rounds)
    _check_pair_dim(head_dim=head_dim)
    _check_positive(min_run_time=min_run_time)
    x = torch.randn(batch, n_heads, seq_len, head_dim, device=device)
    positions = torch.arange(seq_len, device=device)
    rope = RotaryEmbedding(head_dim, seq_len, device=device)
    cos, sin = rope.cos_sin(seq_len)
    freqs_cis = rope_freqs_cis(positions, head_dim)
    cos_i, sin_i = rope_cos_sin_interleaved(positions, head_dim)
    variants = {
        "half_split_cached": lambda: apply_rope(x, cos, sin),
        "half_split_uncached": lambda: apply_rope(x, *rope_cos_sin(positions, head_dim)),
        "interleaved_complex": lambda: apply_rope_complex(x, freqs_cis),
        "interleaved_real": lambda: apply_rope_interleaved(x, cos_i, sin_i),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for attempt in range(2):
        with torch.inference_mode():
            for _ in range(rounds):
                for name, fn in variants.items():
                    times[name].append(median_time_s(fn, min_run_time))
        ref = times["half_split_cached"]
        speedups = {
            name: [r / t for r, t in zip(ref, ts, strict=True)]
            for name, ts in times.items()
            if name != "half_split_cached"
        }
        if attempt or all(min(s) > 1 or max(s) < 1 for s in speedups.values()):
            break
    table_bytes = {
        "cos_sin_cache_bytes": sum(t.numel() * t.element_size() for t in (cos, sin)),
        "freqs_cis_bytes": freqs_cis.numel() * freqs_cis.element_size(),
    }
    formula = {  # float32: 4 bytes; complex64: 8 bytes per pair
        "cos_sin_cache_bytes": 2 * seq_len * head_dim * 4,
        "freqs_cis_bytes": seq_len * (head_dim // 2) * 8,
    }
    if table_bytes != formula:
        raise RuntimeError(f"measured table bytes {table_bytes} != formula {formula}")
    return {
        "shape": [batch, n_heads, seq_len, head_dim],
        "rounds": len(ref),
        **{f"{name}_ms": float(np.median(t)) * 1e3 for name, t in times.items()},
        **{f"{name}_ms_min": min(t) * 1e3 for name, t in times.items()},
        **{f"{name}_ms_max": max(t) * 1e3 for name, t in times.items()},
        "speedup_vs_half_split_cached": {
            name: {"median": float(np.median(s)), "min": min(s), "max": max(s)}
            for name, s in speedups.items()
        },
        **table_bytes,
    }


def speed_sentence(name: str, speedup: dict, rounds: int) -> tuple[str, bool]:
    """How ``name`` compares with half-split + cached cos/sin, from the per-round ratios
    t(half_split_cached) / t(name): a direction only when every round agrees on it."""
    med, low, high = speedup["median"], speedup["min"], speedup["max"]
    ref = "half-split with cached cos/sin"
    if low > 1:
        spread = f"{low:.2f}-{high:.2f}x over {rounds} rounds"
        return f"{name} is {med:.2f}x faster than {ref} ({spread})", True
    if high < 1:
        spread = f"{1 / high:.2f}-{1 / low:.2f}x over {rounds} rounds"
        return f"{name} is {1 / med:.2f}x slower than {ref} ({spread})", True
    return (
        f"{name} and {ref} took the same time within noise (speed ratio {low:.2f}-{high:.2f}x "
        f"over {rounds} rounds): this run did not show a difference",
        False,
    )


def rope_claims(results: dict) -> dict:
    """The claims this run prints, each a sentence computed from the numbers it rests on."""
    rope, att, decay = results["rope"], results["attention_patterns"], results["decay"]
    tol = 4 * rope["max_position"] * 2.0**-24 + 1e-6  # float32 angles up to max_position
    err = rope["max_abs_err_scores_offset_only"]
    relative = err <= tol
    layout, unpermuted = (
        rope["max_abs_err_layout_scores"],
        rope["max_abs_err_layout_scores_unpermuted"],
    )
    layouts = layout < 1e-4 < 0.1 < unpermuted
    dev_rope, dev_sin = (
        att["toeplitz_max_dev_constant_rope"],
        att["toeplitz_max_dev_constant_sinusoidal"],
    )
    stripes = dev_rope < 1e-4 < 0.1 < dev_sin
    b0, b1 = decay["relative_upper_bound_at_0"], decay["relative_upper_bound_at_max_distance"]
    bench = results["benchmark"]
    uncached = bench["speedup_vs_half_split_cached"]["half_split_uncached"]
    cache_text, _ = speed_sentence(
        "half-split computing cos/sin every call", uncached, bench["rounds"]
    )
    complex_text, complex_held = speed_sentence(
        "Meta's complex form",
        bench["speedup_vs_half_split_cached"]["interleaved_complex"],
        bench["rounds"],
    )
    return {
        "relative_scores": claim(
            f"<R_m q, R_n k> = <q, R_(n-m) k> to {err:.1e} over {rope['n_trials']} random pairs "
            + ("(within" if relative else "(MORE than")
            + f" the {tol:.1e} float32 angles allow)",
            relative,
            max_abs_err=err,
            tolerance=tol,
        ),
        "layouts_agree_after_permutation": claim(
            f"half-split with permuted W_q, W_k gives the interleaved scores to {layout:.1e}; "
            f"without the permutation they are off by {unpermuted:.2f}",
            layouts,
            max_abs_err=layout,
            max_abs_err_unpermuted=unpermuted,
        ),
        "constant_content_stripes": claim(
            f"RoPE scores of the same content at every position vary along a diagonal of the "
            f"score matrix by {dev_rope:.1e}, sinusoidal ones by {dev_sin:.2f}: "
            + ("only RoPE depends on n - m alone" if stripes else "this run did not separate them"),
            stripes,
            rope=dev_rope,
            sinusoidal=dev_sin,
        ),
        "bound_decays": claim(
            f"RoFormer's relative upper bound on |score| goes from {b0:.1f} at distance 0 to "
            f"{b1:.1f} at distance {decay['distances'][-1]}"
            + ("" if b1 < b0 else ": it did not decay in this run"),
            b1 < b0,
            at_0=b0,
            at_max_distance=b1,
        ),
        "cached_cos_sin": claim(cache_text, uncached["max"] < 1),
        "complex_form_speed": claim(complex_text, complex_held),
    }


# =============================================================================
# 5. Figures: one plot_<png name> per figure, each returning the Figure
# =============================================================================


def plot_sinusoidal_encoding(
    seq_len: int = 128, d_model: int = 128, base: float = 10000.0
) -> plt.Figure:
    """See fast clocks on the left dimensions, slow on the right; wavelengths grow geometrically."""
    pe = sinusoidal_encoding(seq_len, d_model, base)
    wavelength = 2 * math.pi / rope_inv_freq(d_model, base)
    fig, (ax0, ax1) = plt.subplots(
        1, 2, figsize=(11, 4.5), layout="constrained", gridspec_kw={"width_ratios": [1.4, 1]}
    )
    im = ax0.imshow(pe.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
    fig.colorbar(im, ax=ax0, label="PE value")
    ax0.set_xlabel("dimension (even: sin, odd: cos)")
    ax0.set_ylabel("position")
    ax0.set_title("Sinusoidal PE: fast clocks on the left, slow on the right")
    ax1.semilogy(np.arange(d_model // 2), wavelength.numpy(), marker=".", lw=1)
    ax1.axhline(seq_len, color="gray", ls="--", label=f"{seq_len} positions shown")
    ax1.set_xlabel("pair index i (dimensions 2i, 2i+1)")
    ax1.set_ylabel("wavelength 2π/θ_i (tokens)")
    ax1.set_title("Wavelength per pair grows geometrically")
    ax1.legend()
    return fig


def plot_rope_rotation(head_dim: int = 64, base: float = 10000.0) -> plt.Figure:
    """See one pair of a query turn by m·θ_i at positions 0..7: fast pair vs slow pair."""
    positions = torch.arange(8)
    cos, sin = rope_cos_sin(positions, head_dim, base)
    half = head_dim // 2
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), layout="constrained")
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(positions)))
    theta = rope_inv_freq(head_dim, base)
    for ax, pair in zip(axes, (0, half // 4), strict=True):
        x = torch.zeros(head_dim)
        x[pair], x[pair + half] = 1.0, 0.0  # the pair (x_i, x_(i+d/2)) = (1, 0)
        rotated = apply_rope(x, cos, sin)  # (8, head_dim)
        t = np.linspace(0, 2 * np.pi, 200)
        ax.plot(np.cos(t), np.sin(t), color="lightgray", lw=1)
        for m, color in zip(positions.tolist(), colors, strict=True):
            a, b = float(rotated[m, pair]), float(rotated[m, pair + half])
            ax.annotate(
                "", xy=(a, b), xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": color}
            )
            r = 1.12 if pair == 0 else 1.1 + 0.06 * (m % 2)  # stagger crowded labels
            ax.text(r * a, r * b, f"m={m}", color=color, ha="center", va="center", fontsize=9)
        ax.set_xlim(-1.35, 1.35)
        ax.set_ylim(-1.35, 1.35)
        ax.set_aspect("equal")
        ax.set_xlabel(f"x_{pair} (first half)")
        ax.set_ylabel(f"x_{pair + half} (second half)")
        speed = "fast" if pair == 0 else "slow"
        ax.set_title(f"{speed} pair i={pair}: θ={float(theta[pair]):.3g} rad/token")
    fig.suptitle("RoPE turns pair i of the token at position m by m·θ_i (positions 0..7)")
    return fig


def plot_rope_layouts(head_dim: int = 8) -> plt.Figure:
    """See the same pairs in both layouts, and the permutation from interleaved to half-split."""
    perm = interleaved_to_half_split_index(head_dim).tolist()
    half = head_dim // 2
    colors = plt.cm.tab10(np.arange(half))
    fig, ax = plt.subplots(figsize=(9, 3.8), layout="constrained")
    for j in range(head_dim):
        for y, pair, name in ((1.0, j // 2, f"x{j}"), (0.0, j % half, f"x{perm[j]}")):
            ax.add_patch(plt.Rectangle((j, y), 0.9, 0.5, color=colors[pair], alpha=0.7))
            ax.text(j + 0.45, y + 0.25, name, ha="center", va="center")
        # interleaved dim perm[j] moves to half-split slot j
        ax.annotate(
            "",
            xy=(j + 0.45, 0.52),
            xytext=(perm[j] + 0.45, 0.98),
            arrowprops={"arrowstyle": "->", "color": "gray", "lw": 0.8},
        )
    ax.text(-0.2, 1.25, "interleaved\n(Meta, RoFormer)", ha="right", va="center")
    ax.text(-0.2, 0.25, "half-split\n(HF, NeoX)", ha="right", va="center")
    ax.set_xlim(-2.6, head_dim)
    ax.set_ylim(-0.1, 1.6)
    ax.axis("off")
    ax.set_title(
        f"Same pairs (colour = pair index), different order: x_half = x_interleaved[{perm}]"
    )
    return fig


def decay_title(bound_at_0: float, bound_at_max: float, max_distance: int) -> str:
    """What the bound panel shows, from its two end points."""
    if bound_at_max < bound_at_0:
        return (
            f"RoFormer's bound on |score| falls {bound_at_0 / bound_at_max:.1f}x, "
            f"from {bound_at_0:.1f} to {bound_at_max:.1f} by distance {max_distance}"
        )
    return (
        f"RoFormer's bound on |score| did not fall in this run ({bound_at_0:.1f} at 0, "
        f"{bound_at_max:.1f} at distance {max_distance})"
    )


def expected_score_title(at_0: float, at_max: float, max_abs_z: float) -> str:
    """What the expected-score panel shows: the q = k curve and the independent-q, k mean."""
    trend = "falls" if abs(at_max) < abs(at_0) else "does not fall"
    zero = "0 within noise" if max_abs_z < 5 else f"NOT 0 (|z| {max_abs_z:.1f})"
    return f"Expected score: {trend} {at_0:.0f} -> {at_max:.0f} if q = k; {zero} if independent"


def plot_rope_decay(decay: dict) -> plt.Figure:
    """See RoFormer's bound on |score| shrink with distance; the expected score decays if q = k."""
    d = np.array(decay["distances"])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    ax0.plot(d, decay["relative_upper_bound"], color="C0")
    ax0.set_xlabel("relative distance n - m (tokens)")
    ax0.set_ylabel(r"relative upper bound $(2/d)\,\sum_{l=1}^{d/2}\,|S_l|$")
    ax0.set_title(
        decay_title(
            decay["relative_upper_bound_at_0"],
            decay["relative_upper_bound_at_max_distance"],
            int(d[-1]),
        ),
        fontsize=10,
    )
    ax0.text(  # S_l defined where it is plotted (RoFormer eq. 35-37)
        0.97,
        0.95,
        r"$S_l = \sum_{k<l} e^{\,i (m-n) \theta_k}$: partial sums of unit phasors"
        "\n"
        r"$|\mathrm{score}| \leq \max_k |h_{k+1} - h_k| \cdot \sum_l |S_l|$"
        "\n"
        r"$h_k$: pair $k$ of $q$ times conj(pair $k$ of $k$), as complex numbers"
        f"\nhead_dim d = {decay['head_dim']}",
        transform=ax0.transAxes,
        ha="right",
        va="top",
        fontsize=9,
        bbox={"facecolor": "white", "edgecolor": "lightgray"},
    )
    mean, std = np.array(decay["mc_random_mean"]), np.array(decay["mc_random_std"])
    ax1.fill_between(
        d, mean - std, mean + std, color="C1", alpha=0.2, label="independent q, k: ±1 std"
    )
    ax1.plot(d, mean, color="C1", lw=1, label="independent q, k: mean (Monte Carlo)")
    ax1.plot(d, decay["expected_identical"], color="C0", lw=2, label="q = k: 2 Σ_i cos((n-m) θ_i)")
    ax1.plot(
        d, decay["mc_identical_mean"], color="k", lw=0, marker=".", ms=2, label="q = k: Monte Carlo"
    )
    ax1.set_xlabel("relative distance n - m (tokens)")
    ax1.set_ylabel("expected score <R_m q, R_n k>, q, k ~ N(0, I)")
    ax1.set_title(
        expected_score_title(
            decay["expected_identical"][0],
            decay["expected_identical"][-1],
            decay["max_abs_z_random_mean_vs_zero"],
        ),
        fontsize=10,
    )
    ax1.legend(fontsize=8, loc="upper right")
    return fig


def attention_scores_title(dev_rope: float, dev_sinusoidal: float, tol: float = 1e-4) -> str:
    """The message of attention_scores.png, from the spread along the diagonals."""
    rope_rel, sin_rel = dev_rope < tol, dev_sinusoidal < tol
    if rope_rel and not sin_rel:
        return (
            "Same content at every position: RoPE scores depend on n - m only (curves coincide), "
            "sinusoidal ones also on m"
        )
    if rope_rel and sin_rel:
        return "Same content at every position: both depend on n - m only in this run"
    if sin_rel:
        return (
            "Same content at every position: in this run only sinusoidal scores depend on "
            "n - m alone"
        )
    return "Same content at every position: in this run neither depends on n - m alone"


def plot_attention_scores(att: dict) -> plt.Figure:
    """See that with the same content everywhere RoPE scores depend on n - m alone, sinusoidal
    ones do not: the heat maps have constant diagonals, and the score-vs-offset curves of
    queries at different positions m coincide."""
    mats = attention_score_matrices(att["seq_len"], att["head_dim"], seed=att["seed"])
    n = att["seq_len"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 9), layout="constrained")
    queries = [0, n // 4, n // 2]
    offsets = np.arange(n - queries[-1])
    schemes = (("sinusoidal", "sinusoidal", "x + PE_m"), ("rope", "RoPE", "R_m x"))
    for col, (scheme, name, qk) in enumerate(schemes):
        scores = mats[f"constant_{scheme}"]
        dev = att[f"toeplitz_max_dev_constant_{scheme}"]
        ax = axes[0, col]
        im = ax.imshow(scores.numpy(), cmap="viridis")
        fig.colorbar(im, ax=ax, label="score q·k/√d", shrink=0.8)
        ax.set_xlabel("key position n")
        ax.set_ylabel("query position m")
        ax.set_title(f"{name}: score of q_m = k_m = {qk} with k_n")
        ax = axes[1, col]
        for m, ls, lw in zip(queries, ("-", "--", ":"), (4, 2.5, 1.5), strict=True):
            ax.plot(
                offsets, scores[m, m + offsets].numpy(), ls=ls, lw=lw, label=f"query at m = {m}"
            )
        ax.set_xlabel("offset n - m (tokens)")
        ax.set_ylabel("score q·k/√d")
        verdict = "curves coincide" if dev < 1e-4 else "curves differ"
        ax.set_title(f"{name}: {verdict} (diagonal spread {dev:.1g})")
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(
        attention_scores_title(
            att["toeplitz_max_dev_constant_rope"], att["toeplitz_max_dev_constant_sinusoidal"]
        )
    )
    return fig


def extension_panel_title(name: str, row: dict, factor: float) -> str:
    """Which pairs one scheme keeps and which it slows, from its frequency ratios."""
    n = len(row["inv_freq"])
    kept, divided = row["pairs_unchanged"], row["pairs_divided_by_factor"]
    slowest = 1 / row["ratio_slowest_pair"]
    if kept == n:
        text = "every pair unchanged"
    elif divided == n:
        text = f"all {n} pairs slowed {factor:g}x"
    else:
        text = f"{kept} of {n} pairs kept" if kept else "no pair kept"
        text += (
            f", {divided} slowed {factor:g}x" if divided > 1 else f", slowest slowed {slowest:.3g}x"
        )
    if row["attention_scaling"] != 1:
        text += f"; q, k x{row['attention_scaling']:.3f}"
    return f"{name}: {text}"


def context_extension_title(ext: dict) -> str:
    """Who keeps the fast pairs and who slows them, from the fastest pair's ratio per scheme."""
    methods = {k: v for k, v in ext["methods"].items() if k != "original"}
    keep = [k for k, v in methods.items() if abs(v["ratio_fastest_pair"] - 1) < 1e-6]
    slow = [k for k in methods if k not in keep]

    def names(items: list[str]) -> str:
        return " and ".join([", ".join(items[:-1]), items[-1]]) if len(items) > 1 else items[0]

    parts = [f"{names(keep)} keep the fastest pair"] if keep else []
    parts += [f"{names(slow)} slow{'s' if len(slow) == 1 else ''} it too"] if slow else []
    return (
        f"Context extension x{ext['factor']:g} (head_dim {ext['head_dim']}, rope_theta "
        f"{ext['rope_theta']:g}, trained on L = {ext['original_max_position_embeddings']}):\n"
        + "; ".join(parts)
    )


def plot_context_extension(ext: dict) -> plt.Figure:
    """See which pairs each scheme stretches, one scheme per panel against plain RoPE."""
    L, s = ext["original_max_position_embeddings"], ext["factor"]
    original = 2 * np.pi / np.array(ext["methods"]["original"]["inv_freq"])
    i = np.arange(len(original))
    schemes = [name for name in ext["methods"] if name != "original"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8), layout="constrained", sharey=True)
    for j, (ax, name) in enumerate(zip(axes.flat, schemes, strict=False)):  # 6 axes, 5 schemes
        color = f"C{j}"
        row = ext["methods"][name]
        ax.semilogy(i, original, color="gray", ls="--", lw=1.5, label="original RoPE")
        ax.semilogy(i, 2 * np.pi / np.array(row["inv_freq"]), color=color, lw=2.2, label=name)
        ax.axhline(L, color="k", lw=0.8, ls=":", label=f"trained context L = {L}")
        ax.axhline(s * L, color="k", lw=0.8, ls="-.", label=f"target s·L = {s * L:g}")
        ax.set_title(extension_panel_title(name, row, s), fontsize=9.5)
        ax.legend(fontsize=7.5, loc="upper left")
        ax.set_xlabel("pair index i (fast pairs on the left)")
    for ax in axes[:, 0]:
        ax.set_ylabel("wavelength 2π/θ_i (tokens)")
    for ax in axes.flat[len(schemes) :]:
        ax.axis("off")
        ax.text(
            0.02,
            0.95,
            "How to read a panel\n\n"
            "wavelength = tokens per full turn of pair i.\n"
            "Pairs below L turned many times in training:\n"
            "their angles are all familiar, so keeping them\n"
            "keeps local word order sharp.\n"
            "Pairs above L never completed a turn in training:\n"
            "slowing them by s keeps s·L tokens within\n"
            "angles the model saw.",
            transform=ax.transAxes,
            va="top",
            fontsize=10,
        )
    fig.suptitle(context_extension_title(ext), fontsize=11)
    return fig


# =============================================================================
# 6. Main: the stages, each one call and one print
# =============================================================================

SIZES = {
    "quick": {"pe_len": 512, "trials": 300, "mc": 1024, "bench": (1, 8, 256, 64), "time": 0.005},
    "default": {
        "pe_len": 2048,
        "trials": 5000,
        "mc": 16384,
        "bench": (1, 32, 2048, 128),
        "time": 0.1,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_flags(base_parser(), argv)


def print_sinusoidal(res: dict) -> None:
    print(f"  d_model {res['d_model']}, positions 0..{res['seq_len'] - 1}")
    print(
        f"  {'k':>5} {'shift err f64':>14} {'shift err f32':>14} {'|M^T M - I|':>12} "
        f"{'dot vs Σcos':>12}"
    )
    for r in res["shifts"]:
        print(
            f"  {r['k']:>5} {r['max_abs_err_shift_float64']:>14.2e} "
            f"{r['max_abs_err_shift_float32']:>14.2e} {r['max_abs_err_orthogonal']:>12.2e} "
            f"{r['max_abs_err_dot_vs_formula']:>12.2e}"
        )
    print(
        f"  wavelengths {res['shortest_wavelength_tokens']:.2f} .. "
        f"{res['longest_wavelength_tokens']:.0f} tokens"
    )


ROPE_LABELS = {
    "max_abs_err_norm": "| |R_m q| - |q| |  (unit q)",
    "max_abs_err_scores_offset_only": "<R_m q, R_n k> - <q, R_(n-m) k>",
    "max_abs_err_matrix_compose_float64": "R_m^T R_n - R_(n-m)  (float64 matrices)",
    "max_abs_err_apply_rope_vs_matrix": "apply_rope(x) - x R_m^T",
    "max_abs_err_complex_vs_interleaved": "complex (Meta) - real interleaved",
    "max_abs_err_half_split_vs_interleaved_q": "q half-split - q interleaved[perm]",
    "max_abs_err_layout_scores": "scores: half-split(permuted W) - interleaved",
    "max_abs_err_layout_scores_unpermuted": "scores: half-split(unpermuted W) - interleaved",
    "max_abs_err_start_pos_vs_full": "RotaryEmbedding start_pos - full slice",
    "max_abs_err_positions_vs_start_pos": "RotaryEmbedding positions - start_pos",
}


def print_rope(res: dict) -> None:
    print(
        f"  {res['n_trials']} random (q, k, m, n), positions < {res['max_position']}, "
        f"head_dim {res['head_dim']}; worst error:"
    )
    for key, label in ROPE_LABELS.items():
        note = "  <- the layout bug" if key.endswith("unpermuted") else ""
        print(f"  {label:<48} {res[key]:.2e}{note}")


def print_decay(decay: dict) -> None:
    print(f"  head_dim {decay['head_dim']}, {decay['n_samples']} Monte Carlo samples")
    print(f"  {'distance':>8} {'rel. bound (1/(d/2)) Σ|S_l|':>28} {'E score, q = k':>15}")
    for mark in decay["marks"]:
        print(
            f"  {mark['distance']:>8} {mark['relative_upper_bound']:>28.2f} "
            f"{mark['expected_identical']:>15.2f}"
        )
    print(
        f"  Monte Carlo vs analytic (q = k): max |z| = "
        f"{decay['max_abs_z_identical_mc_vs_analytic']:.2f}; independent q, k mean vs 0: "
        f"max |z| = {decay['max_abs_z_random_mean_vs_zero']:.2f}"
    )


def print_attention_patterns(att: dict) -> None:
    print("  spread along diagonals (0 = depends on n - m only):")
    for name, value in att.items():
        if name.startswith("toeplitz_max_dev_"):
            print(f"  {name.removeprefix('toeplitz_max_dev_'):<20} {value:.2e}")


def print_context_extension(ext: dict) -> None:
    print(
        f"  head_dim {ext['head_dim']}, rope_theta {ext['rope_theta']:g}, factor "
        f"{ext['factor']:g}, trained length {ext['original_max_position_embeddings']}"
    )
    print(
        f"  {'scheme':<20} {'θ0 ratio':>9} {'θlast ratio':>11} {'kept':>5} {'/s':>4} "
        f"{'attn scale':>10}"
    )
    for name, row in ext["methods"].items():
        print(
            f"  {name:<20} {row['ratio_fastest_pair']:>9.4f} {row['ratio_slowest_pair']:>11.4f} "
            f"{row['pairs_unchanged']:>5} {row['pairs_divided_by_factor']:>4} "
            f"{row['attention_scaling']:>10.4f}"
        )


def print_benchmark(bench: dict) -> None:
    print(
        f"  shape (batch, n_heads, seq_len, head_dim) = {tuple(bench['shape'])}, "
        f"{bench['rounds']} interleaved rounds; median (min-max) per call, speed vs cached:"
    )
    for name in (
        "half_split_cached",
        "half_split_uncached",
        "interleaved_complex",
        "interleaved_real",
    ):
        s = bench["speedup_vs_half_split_cached"].get(name, {"median": 1.0, "min": 1.0, "max": 1.0})
        print(
            f"  {name:<22} {bench[name + '_ms']:>8.3f} ms ({bench[name + '_ms_min']:.3f}-"
            f"{bench[name + '_ms_max']:.3f})  {s['median']:>5.2f}x ({s['min']:.2f}-{s['max']:.2f})"
        )
    print(
        f"  tables: cos+sin {bench['cos_sin_cache_bytes'] / 2**20:.2f} MiB, "
        f"freqs_cis {bench['freqs_cis_bytes'] / 2**20:.2f} MiB"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    sizes = SIZES["quick" if args.quick else "default"]
    results: dict = {"meta": run_meta(args, device)}
    n = 8
    print(f"[1/{n}] sinusoidal: PE(pos + k) = M_k PE(pos) for every pos ...")
    results["sinusoidal"] = check_sinusoidal(seq_len=sizes["pe_len"])
    print_sinusoidal(results["sinusoidal"])
    print(f"[2/{n}] RoPE: norms, relative scores, layouts, cache slices ...")
    results["rope"] = check_rope(n_trials=sizes["trials"])
    print_rope(results["rope"])
    print(f"[3/{n}] long-term decay of scores with distance ...")
    results["decay"] = rope_long_term_decay(n_samples=sizes["mc"])
    print_decay(results["decay"])
    print(f"[4/{n}] attention-score patterns ...")
    results["attention_patterns"] = check_attention_patterns(seed=args.seed)
    print_attention_patterns(results["attention_patterns"])
    print(f"[5/{n}] context extension: inverse frequencies per scheme ...")
    results["context_extension"] = context_extension()
    print_context_extension(results["context_extension"])
    print(f"[6/{n}] benchmarking apply_rope layouts on {device} ...")
    results["benchmark"] = benchmark_rope(*sizes["bench"], device, sizes["time"])
    print_benchmark(results["benchmark"])
    print(f"[7/{n}] claims ...")
    results["claims"] = rope_claims(results)
    print_claims(results["claims"])
    print(f"[8/{n}] drawing figures ...")
    figures = {
        "sinusoidal_encoding": plot_sinusoidal_encoding(),
        "rope_rotation": plot_rope_rotation(),
        "rope_layouts": plot_rope_layouts(),
        "rope_decay": plot_rope_decay(results["decay"]),
        "attention_scores": plot_attention_scores(results["attention_patterns"]),
        "context_extension": plot_context_extension(results["context_extension"]),
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
