"""Positional embeddings: sinusoidal encodings and RoPE, proven, measured and drawn.

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
    uv run python positional_embeddings.py              # default sizes (about 7 s on a 2-core CPU)
    uv run python positional_embeddings.py --quick      # small sizes, a few seconds
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
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

# =============================================================================
# 1. Implementation
# =============================================================================

# ---- argument checks shared by every public entry point --------------------------------------


def _check_even(name: str, value: int) -> None:
    """Rotations act on pairs of dimensions, so the dimension must be a positive even number."""
    if not isinstance(value, int) or value <= 0 or value % 2 != 0:
        raise ValueError(
            f"{name} ({value}) must be a positive even integer (dimensions form pairs)"
        )


def _check_base(name: str, value: float) -> None:
    """base^(-2i/d) only decreases with i (slower clocks for later pairs) when base > 1."""
    if not value > 1.0:
        raise ValueError(f"{name} ({value}) must be > 1 so that frequencies decrease along pairs")


def _check_non_negative(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} ({value}) must be >= 0")


def _check_factor(factor: float) -> None:
    if not factor >= 1.0:
        raise ValueError(f"factor ({factor}) must be >= 1 (it is the context extension ratio)")


# ---- sinusoidal encodings (Vaswani et al. 2017, section 3.5) ---------------------------------


def _sinusoidal_inv_freq(d_model: int, base: float, dtype: torch.dtype, device=None):
    """rope_inv_freq's formula in ``dtype`` (rope_inv_freq is float32, as in every RoPE code)."""
    return 1.0 / base ** (torch.arange(0, d_model, 2, dtype=dtype, device=device) / d_model)


def sinusoidal_encoding(
    seq_len: int,
    d_model: int,
    base: float = 10000.0,
    start_pos: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos * theta_i), PE[pos, 2i + 1] = cos(pos * theta_i).  (seq_len, d_model)

    theta_i = 1 / base^(2i / d_model) are the same frequencies RoPE uses (``rope_inv_freq``),
    here computed in ``dtype``. Rows are positions ``start_pos .. start_pos + seq_len - 1``.
    ``dtype=torch.float64`` gives the formula to ~1e-13, which the shift check below uses; in
    float32 each angle pos * theta_i is rounded to ~6e-8 relative, so entries drift by ~6e-8 * pos.
    """
    _check_even("d_model", d_model)
    _check_base("base", base)
    _check_non_negative("seq_len", seq_len)
    _check_non_negative("start_pos", start_pos)
    positions = torch.arange(start_pos, start_pos + seq_len, dtype=dtype, device=device)
    inv_freq = _sinusoidal_inv_freq(d_model, base, dtype, device)  # (d_model/2,)
    angles = torch.outer(positions, inv_freq)  # (seq_len, d_model/2)
    # stack -> (seq_len, d_model/2, 2) = (sin, cos) per pair; flatten -> sin, cos, sin, cos, ...
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def sinusoidal_shift_matrix(
    k: int, d_model: int, base: float = 10000.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """M_k with PE(pos + k) = M_k PE(pos) for every pos.  (d_model, d_model), block diagonal.

    From sin(a + b) = sin a cos b + cos a sin b and cos(a + b) = cos a cos b - sin a sin b with
    a = pos * theta_i, b = k * theta_i: block i is [[cos b, sin b], [-sin b, cos b]], a rotation
    that depends on k only. This is the "attend by relative positions" hint of section 3.5.
    """
    _check_even("d_model", d_model)
    _check_base("base", base)
    angle = k * _sinusoidal_inv_freq(d_model, base, dtype)  # (d_model/2,)
    c, s = angle.cos(), angle.sin()
    blocks = torch.stack((torch.stack((c, s), -1), torch.stack((-s, c), -1)), -2)  # (d/2, 2, 2)
    return torch.block_diag(*blocks)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds PE(start_pos .. start_pos + seq_len - 1) to token embeddings (batch, seq_len, d_model).

    The table is precomputed for ``max_seq_len`` positions; asking for positions beyond it raises
    a ValueError (no silent extension: the formula extends, but a model never trained there).
    Vaswani et al. also multiply embeddings by sqrt(d_model) and apply dropout to the sum; those
    belong to the embedding layer and the block, not to the encoding, and are left out.
    """

    def __init__(self, d_model: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        _check_even("d_model", d_model)
        _check_base("base", base)
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len ({max_seq_len}) must be >= 1")
        self.d_model, self.max_seq_len = d_model, max_seq_len
        self.register_buffer(
            "pe", sinusoidal_encoding(max_seq_len, d_model, base), persistent=False
        )

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        seq_len = x.shape[-2]
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x.shape[-1] ({x.shape[-1]}) must equal d_model ({self.d_model})")
        _check_non_negative("start_pos", start_pos)
        if start_pos + seq_len > self.max_seq_len:
            raise ValueError(
                f"start_pos ({start_pos}) + seq_len ({seq_len}) needs {start_pos + seq_len} "
                f"positions, but max_seq_len is {self.max_seq_len} "
                f"(room for {max(self.max_seq_len - start_pos, 0)} more)"
            )
        return x + self.pe[start_pos : start_pos + seq_len].to(x.dtype)


# ---- RoPE, half-split layout (Hugging Face, GPT-NeoX): the house default ----------------------
# These four functions are shared verbatim with grouped_query_attention.py and
# multihead_latent_attention.py. They do not validate: the public modules below do.


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


def rope_freqs_cis(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """e^(j m theta_i) as complex64, (seq_len, head_dim/2): Meta's ``precompute_freqs_cis``.

    One complex number per pair holds both cos and sin, so this table is half the bytes of the
    half-split (cos, sin) pair, whose two halves repeat each value.
    """
    angles = torch.outer(positions.float(), rope_inv_freq(head_dim, base, positions.device))
    return torch.polar(torch.ones_like(angles), angles)  # |z| = 1, arg z = m * theta_i


def apply_rope_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """RoFormer eq. 34: read pair (x_2i, x_2i+1) as x_2i + j x_2i+1 and multiply by e^(j m theta_i).

    x: (..., seq_len, head_dim) in the interleaved layout, freqs_cis: (seq_len, head_dim/2).
    (Meta's code keeps (batch, seq_len, n_heads, head_dim) and reshapes freqs_cis to broadcast;
    with the house layout (batch, n_heads, seq_len, head_dim) it broadcasts as is.)
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (..., seq_len, head_dim/2, 2)
    z = torch.view_as_complex(pairs)  # (..., seq_len, head_dim/2) complex
    rotated = torch.view_as_real(z * freqs_cis)  # (..., seq_len, head_dim/2, 2)
    return rotated.flatten(-2).type_as(x)  # (..., seq_len, head_dim)


def rope_cos_sin_interleaved(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos and sin of m * theta_i, each (seq_len, head_dim), every angle repeated twice in a row."""
    angles = torch.outer(positions.float(), rope_inv_freq(head_dim, base, positions.device))
    angles = angles.repeat_interleave(2, dim=-1)  # (seq_len, head_dim): a0, a0, a1, a1, ...
    return angles.cos(), angles.sin()


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotate_half for the interleaved layout."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]  # (..., head_dim/2) each
    return torch.stack((-x_odd, x_even), dim=-1).flatten(-2)  # (..., head_dim)


def apply_rope_interleaved(x, cos, sin):
    """The real-valued interleaved form (GPT-J): x * cos + rotate_every_two(x) * sin."""
    return x * cos + rotate_every_two(x) * sin


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
    _check_even("head_dim", head_dim)
    if layout not in ("half_split", "interleaved"):
        raise ValueError(f"layout ({layout!r}) must be one of 'half_split', 'interleaved'")
    angle = position * rope_inv_freq(head_dim, base).to(dtype)  # (head_dim/2,)
    c, s = angle.cos(), angle.sin()
    half = head_dim // 2
    i = torch.arange(half)
    a, b = (i, i + half) if layout == "half_split" else (2 * i, 2 * i + 1)  # pair i = dims (a, b)
    R = torch.zeros(head_dim, head_dim, dtype=dtype)
    R[a, a], R[a, b], R[b, a], R[b, b] = c, -s, s, c
    return R


# ---- the layout permutation (transformers' convert_llama_weights_to_hf.py ``permute``) -------


def interleaved_to_half_split_index(head_dim: int) -> torch.Tensor:
    """Index p with x_half = x_interleaved[..., p]: (0, 2, 4, ..., d-2, 1, 3, ..., d-1).

    Pair i sits at dims (2i, 2i+1) in the interleaved layout and at (i, i + d/2) in half-split.
    """
    _check_even("head_dim", head_dim)
    # (head_dim/2, 2): row i = pair i; transpose -> (2, head_dim/2): all first halves, then seconds
    return torch.arange(head_dim).view(head_dim // 2, 2).t().reshape(-1)


def permute_for_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q_proj / k_proj weight (n_heads * head_dim, d_model), head by head,
    from the interleaved layout (Meta checkpoints) to the half-split one (transformers).

    Then q_half = x @ W'^T equals q_interleaved[..., p] with p = interleaved_to_half_split_index,
    so half-split RoPE on q_half is interleaved RoPE on q_interleaved, permuted; dot products
    q.k do not see a permutation applied to both. Use n_kv_heads for k_proj.
    """
    out_features, in_features = weight.shape
    if n_heads <= 0 or out_features % n_heads != 0:
        raise ValueError(f"weight rows ({out_features}) must be divisible by n_heads ({n_heads})")
    head_dim = out_features // n_heads
    _check_even("head_dim", head_dim)
    w = weight.view(n_heads, head_dim // 2, 2, in_features)  # rows of head h: pair i, member j
    w = w.transpose(1, 2)  # (n_heads, 2, head_dim/2, in_features): members first, then pairs
    return w.reshape(out_features, in_features)


def permute_for_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``permute_for_half_split``: half-split rows back to interleaved rows."""
    out_features, in_features = weight.shape
    if n_heads <= 0 or out_features % n_heads != 0:
        raise ValueError(f"weight rows ({out_features}) must be divisible by n_heads ({n_heads})")
    head_dim = out_features // n_heads
    _check_even("head_dim", head_dim)
    w = weight.view(n_heads, 2, head_dim // 2, in_features).transpose(1, 2)
    return w.reshape(out_features, in_features)  # (n_heads * head_dim, in_features)


# ---- context extension: new inverse frequencies (and attention scale) ------------------------
# Each function takes the keys of transformers' ``config.rope_parameters`` (rope_theta, factor,
# original_max_position_embeddings, ...) and returns (inv_freq (head_dim/2,), attention_scaling),
# like transformers' ROPE_INIT_FUNCTIONS. attention_scaling multiplies cos and sin, so q and k
# are each scaled by it and the logits by its square. Their ``rope_theta`` (transformers' name)
# is the ``rope_base`` of RotaryEmbedding and the RoPE helpers above.


def default_inv_freq(head_dim: int, rope_theta: float = 10000.0) -> tuple[torch.Tensor, float]:
    """Plain RoPE: theta_i = rope_theta^(-2i/head_dim), no attention scaling."""
    _check_even("head_dim", head_dim)
    _check_base("rope_theta", rope_theta)
    return rope_inv_freq(head_dim, rope_theta), 1.0


def linear_scaling_inv_freq(
    head_dim: int, rope_theta: float, factor: float
) -> tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al. 2023): position m -> m / s, i.e. theta_i -> theta_i / s.

    Every pair slows down by s, so s * L positions span the angles L positions spanned in
    training. The fast pairs lose resolution: neighbours now differ by 1/s of a trained step.
    """
    _check_even("head_dim", head_dim)
    _check_base("rope_theta", rope_theta)
    _check_factor(factor)
    return rope_inv_freq(head_dim, rope_theta) / factor, 1.0


def ntk_aware_inv_freq(
    head_dim: int, rope_theta: float, factor: float
) -> tuple[torch.Tensor, float]:
    """Static NTK-aware scaling (bloc97 2023): base' = base * s^(d / (d - 2)).

    theta_i' = base'^(-2i/d) = theta_i * s^(-2i / (d - 2)): pair 0 (fastest) is untouched and the
    slowest pair i = d/2 - 1 is divided by exactly s, a geometric blend in between. (transformers
    has no static type; its "dynamic" type is ``dynamic_ntk_inv_freq``.)
    """
    _check_even("head_dim", head_dim)
    _check_base("rope_theta", rope_theta)
    _check_factor(factor)
    if head_dim < 4:
        raise ValueError(f"head_dim ({head_dim}) must be >= 4 for NTK scaling (exponent d/(d-2))")
    new_base = rope_theta * factor ** (head_dim / (head_dim - 2))
    return rope_inv_freq(head_dim, new_base), 1.0


def dynamic_ntk_inv_freq(
    head_dim: int,
    rope_theta: float,
    factor: float,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Dynamic NTK (emozilla 2023, transformers "dynamic"): NTK base scaling whose strength
    grows with the current length, so sequences within the trained length see plain RoPE.

        seq_len <- max(seq_len, max_position_embeddings)
        base'   = base * (s * seq_len / max_position_embeddings - (s - 1))^(d / (d - 2))

    At the trained length the stretch is 1 (plain RoPE); at seq_len = s * L it is s^2 - s + 1,
    not s, so the slowest pair is slowed by 57x for s = 8 (see the context-extension figure).
    """
    _check_even("head_dim", head_dim)
    _check_base("rope_theta", rope_theta)
    _check_factor(factor)
    if max_position_embeddings <= 0:
        raise ValueError(f"max_position_embeddings ({max_position_embeddings}) must be >= 1")
    seq_len = max(seq_len or max_position_embeddings, max_position_embeddings)
    stretch = factor * seq_len / max_position_embeddings - (factor - 1)  # 1 at the trained length
    new_base = rope_theta * stretch ** (head_dim / (head_dim - 2))
    return rope_inv_freq(head_dim, new_base), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. eq. 22); 1 when there is no extension."""
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

    Pair i turns r_i = L / wavelength_i = L theta_i / (2 pi) times over the trained length L.
    Pairs with r_i > beta_fast keep theta_i (they have seen every angle: extrapolate), pairs with
    r_i < beta_slow use theta_i / s (interpolate, as PI), a linear ramp in between (eq. 18-20).
    The pair index where r_i = r is i(r) = d ln(L / (2 pi r)) / (2 ln base); the ramp runs over
    i from i(beta_fast) to i(beta_slow), floored/ceiled when ``truncate`` (DeepSeek-V3 and
    transformers clip the upper end at d - 1 rather than d/2 - 1; we do the same).

    The softmax temperature: logits * 1/t with sqrt(1/t) = 0.1 ln s + 1, returned as the scale
    for cos and sin. DeepSeek's variant divides mscale(s, mscale) by mscale(s, mscale_all_dim).
    """
    _check_even("head_dim", head_dim)
    _check_base("rope_theta", rope_theta)
    _check_factor(factor)
    if original_max_position_embeddings <= 0:
        raise ValueError(
            f"original_max_position_embeddings ({original_max_position_embeddings}) must be >= 1"
        )
    if not beta_fast > beta_slow:
        raise ValueError(f"beta_fast ({beta_fast}) must be > beta_slow ({beta_slow})")

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def pair_index(n_rotations: float) -> float:  # i(r) above
        L = original_max_position_embeddings
        return head_dim * math.log(L / (n_rotations * 2 * math.pi)) / (2 * math.log(rope_theta))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if high == low:
        high += 0.001  # avoid 0/0 in the ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = rope_inv_freq(head_dim, rope_theta)  # (head_dim/2,)
    # ramp 0: keep theta_i (fast pairs), ramp 1: theta_i / s (slow pairs)
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
    _check_even("head_dim", head_dim)
    _check_base("rope_theta", rope_theta)
    _check_factor(factor)
    if original_max_position_embeddings <= 0:
        raise ValueError(
            f"original_max_position_embeddings ({original_max_position_embeddings}) must be >= 1"
        )
    if not high_freq_factor > low_freq_factor:
        raise ValueError(
            f"high_freq_factor ({high_freq_factor}) must be > low_freq_factor ({low_freq_factor})"
        )
    L = original_max_position_embeddings
    inv_freq = rope_inv_freq(head_dim, rope_theta)
    wavelength = 2 * math.pi / inv_freq
    smooth = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
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
    if rope_type not in ROPE_SCALING_FUNCTIONS:
        valid = ", ".join(repr(name) for name in ROPE_SCALING_FUNCTIONS)
        raise ValueError(f"rope_type ({rope_type!r}) must be one of {valid}")
    return ROPE_SCALING_FUNCTIONS[rope_type](head_dim, rope_theta, **params)


# ---- the module -------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """RoPE for q and k in the half-split layout, with cos/sin cached for ``max_seq_len`` positions.

    ``forward(q, k, positions=None, start_pos=0)`` rotates q and k of shape
    (batch, n_heads, seq_len, head_dim) (k may have n_kv_heads heads). Positions are either
    ``start_pos .. start_pos + seq_len - 1`` (decoding with a KV cache) or an explicit
    ``positions`` tensor of shape (seq_len,) or (batch, seq_len) (padding, packing).

    Positions outside the table raise ValueError; the table is not extended. The formula would
    extend, but silently growing a buffer inside a forward hides off-by-one bugs in cache code and
    runs the model at angles it never saw: extending the context is a decision, made by choosing
    ``rope_scaling`` and ``max_seq_len`` up front. (transformers' "dynamic" type instead recomputes
    frequencies as sequences grow; here it is evaluated once, at seq_len = max_seq_len.)

    ``rope_scaling`` mirrors transformers' ``rope_parameters`` without rope_theta, e.g.
    ``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}``.
    transformers' ``rope_theta`` is this module's ``rope_base`` (the scaling functions below keep
    transformers' name ``rope_theta`` so their arguments match ``rope_parameters`` key for key).
    "dynamic" also needs ``max_position_embeddings`` (the trained length), which transformers
    reads from the model config rather than from ``rope_parameters``.
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
        _check_even("head_dim", head_dim)
        _check_base("rope_base", rope_base)
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len ({max_seq_len}) must be >= 1")
        self.head_dim, self.max_seq_len = head_dim, max_seq_len
        positions = torch.arange(max_seq_len, device=device)
        if rope_scaling is None:
            inv_freq, self.attention_scaling = rope_inv_freq(head_dim, rope_base, device), 1.0
            cos, sin = rope_cos_sin(positions, head_dim, rope_base)  # (max_seq_len, head_dim)
        else:
            params = dict(rope_scaling)
            rope_type = params.pop("rope_type", "default")
            if rope_type == "dynamic":
                params.setdefault("seq_len", max_seq_len)
            inv_freq, self.attention_scaling = rope_scaling_inv_freq(
                rope_type, head_dim, rope_base, **params
            )
            inv_freq = inv_freq.to(device)
            angles = torch.outer(positions.float(), inv_freq)  # (max_seq_len, head_dim/2)
            angles = torch.cat((angles, angles), dim=-1)  # (max_seq_len, head_dim)
            cos = angles.cos() * self.attention_scaling
            sin = angles.sin() * self.attention_scaling
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def cos_sin(
        self, seq_len: int, positions: torch.Tensor | None = None, start_pos: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the table: (seq_len, head_dim), or (batch, 1, seq_len, head_dim) for
        (batch, seq_len) positions (the 1 broadcasts over heads)."""
        if positions is None:
            _check_non_negative("start_pos", start_pos)
            if start_pos + seq_len > self.max_seq_len:
                raise ValueError(
                    f"start_pos ({start_pos}) + seq_len ({seq_len}) needs {start_pos + seq_len} "
                    f"positions, but max_seq_len is {self.max_seq_len} "
                    f"(room for {max(self.max_seq_len - start_pos, 0)} more)"
                )
            rows = slice(start_pos, start_pos + seq_len)
            return self.cos_cached[rows], self.sin_cached[rows]
        if start_pos != 0:
            raise ValueError(f"start_pos ({start_pos}) must be 0 when positions are given")
        if positions.shape[-1] != seq_len:
            raise ValueError(
                f"positions.shape[-1] ({positions.shape[-1]}) must equal seq_len ({seq_len})"
            )
        if positions.numel() > 0:
            low, high = int(positions.min()), int(positions.max())
            if low < 0:
                raise ValueError(f"positions (min {low}) must be >= 0")
            if high >= self.max_seq_len:
                raise ValueError(
                    f"positions (max {high}) must be < max_seq_len ({self.max_seq_len}): the "
                    f"cos/sin table holds positions 0 .. {self.max_seq_len - 1}"
                )
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
            if t.shape[-1] != self.head_dim:
                raise ValueError(
                    f"{name}.shape[-1] ({t.shape[-1]}) must equal head_dim ({self.head_dim})"
                )
        cos, sin = self.cos_sin(q.shape[-2], positions, start_pos)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


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


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| (broadcast) as a Python float; 0.0 when there is nothing to compare."""
    diff = a - b
    return float(diff.abs().max()) if diff.numel() else 0.0


def check_sinusoidal(
    d_model: int = 128, seq_len: int = 1024, base: float = 10000.0, shifts=(1, 3, 10, 100, 300)
) -> dict:
    """PE(pos + k) = M_k PE(pos) for all pos, with M_k a rotation built from k alone.

    Also PE(pos) . PE(pos + k) = sum_i cos(k theta_i): dot products see only the offset.
    Checked in float64 (exact math) and float32 (what a model stores: angle rounding ~ pos * 6e-8).
    """
    pe64 = sinusoidal_encoding(seq_len, d_model, base, dtype=torch.float64)  # (seq_len, d_model)
    pe32 = sinusoidal_encoding(seq_len, d_model, base)
    inv_freq = _sinusoidal_inv_freq(d_model, base, torch.float64)
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


def attention_score_matrices(
    seq_len: int = 64, head_dim: int = 64, base: float = 10000.0
) -> dict[str, torch.Tensor]:
    """Scores q_m . k_n / sqrt(d) with q = k = x (no learned projections, to see position alone),
    for no encoding, sinusoidal added, and RoPE; on random content (a different x at every
    position) and on constant content (the same x everywhere). Each (seq_len, seq_len)."""
    positions = torch.arange(seq_len)
    pe = sinusoidal_encoding(seq_len, head_dim, base)
    cos, sin = rope_cos_sin(positions, head_dim, base)
    out = {}
    for content, x in (
        ("random", torch.randn(seq_len, head_dim)),
        ("constant", torch.randn(1, head_dim).expand(seq_len, head_dim)),
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
    n = scores.shape[0]
    return max(max_abs_err(d, d.mean()) for d in (scores.diagonal(o) for o in range(-n + 1, n)))


def check_attention_patterns(mats: dict[str, torch.Tensor]) -> dict:
    """With constant content, RoPE scores depend only on n - m; sinusoidal ones do not, because
    (x + PE_m).(x + PE_n) has the absolute terms x.PE_m + x.PE_n."""
    return {f"toeplitz_max_dev_{name}": toeplitz_deviation(s) for name, s in mats.items()}


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
    batch: int, n_heads: int, seq_len: int, head_dim: int, device: torch.device, min_run_time: float
) -> dict:
    """Time per call of rotating one (batch, n_heads, seq_len, head_dim) tensor, four ways, and the
    bytes of each table (measured from the tensors, checked against the formula)."""
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
    with torch.inference_mode():
        times = {name: median_time_s(fn, min_run_time) for name, fn in variants.items()}
    ref = times["half_split_cached"]
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
        **{f"{name}_ms": t * 1e3 for name, t in times.items()},
        **{
            f"{name}_vs_half_split_cached_ratio": t / ref
            for name, t in times.items()
            if name != "half_split_cached"
        },
        **table_bytes,
    }


# =============================================================================
# 3. Figures (one function per figure, each returns the Figure)
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


def plot_rope_decay(decay: dict) -> plt.Figure:
    """See RoFormer's bound on |score| shrink with distance; the expected score decays if q = k."""
    d = np.array(decay["distances"])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    ax0.plot(d, decay["relative_upper_bound"], color="C0")
    ax0.set_xlabel("relative distance n - m (tokens)")
    ax0.set_ylabel("relative upper bound (1/(d/2)) Σ_l |S_l|")
    ax0.set_title(f"RoFormer Fig. 2: the bound on |score| decays (d={decay['head_dim']})")
    mean, std = np.array(decay["mc_random_mean"]), np.array(decay["mc_random_std"])
    ax1.fill_between(d, mean - std, mean + std, color="C1", alpha=0.2, label="random q, k: ±1 std")
    ax1.plot(d, mean, color="C1", lw=1, label="random q, k: mean (Monte Carlo)")
    ax1.plot(d, decay["expected_identical"], color="C0", lw=2, label="q = k: 2 Σ cos(Δθ_i)")
    ax1.plot(
        d, decay["mc_identical_mean"], color="k", lw=0, marker=".", ms=2, label="q = k: Monte Carlo"
    )
    ax1.set_xlabel("relative distance n - m (tokens)")
    ax1.set_ylabel("expected score <R_m q, R_n k>, q, k ~ N(0, I)")
    ax1.set_title("Expected score: decays if q = k, 0 if q, k independent")
    ax1.legend(fontsize=8)
    return fig


def plot_attention_scores(mats: dict[str, torch.Tensor]) -> plt.Figure:
    """See constant-content RoPE scores form stripes (n - m only); sinusoidal ones do not."""
    fig, axes = plt.subplots(2, 3, figsize=(12, 8), layout="constrained", sharex=True, sharey=True)
    titles = {"none": "no encoding", "sinusoidal": "sinusoidal added", "rope": "RoPE"}
    for row, content in enumerate(("random", "constant")):
        vmax = max(float(mats[f"{content}_{s}"].abs().max()) for s in titles)
        for col, (scheme, title) in enumerate(titles.items()):
            ax = axes[row, col]
            im = ax.imshow(
                mats[f"{content}_{scheme}"].numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax
            )
            ax.set_title(f"{title}, {content} content")
            ax.label_outer()  # shared axes: labels on the left column and bottom row only
            ax.set_xlabel("key position n" if row == 1 else "")
            ax.set_ylabel("query position m" if col == 0 else "")
        fig.colorbar(im, ax=axes[row].tolist(), label="score q·k/√d", shrink=0.9)
    fig.suptitle(
        "Scores q·k/√d with q = k = x: with constant content RoPE depends on n - m only "
        "(stripes), sinusoidal does not"
    )
    return fig


def plot_context_extension(ext: dict) -> plt.Figure:
    """See which pairs each method stretches: PI slows all, NTK/YaRN/Llama 3.1 keep fast ones."""
    L, s = ext["original_max_position_embeddings"], ext["factor"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    styles = ["-", "--", "-.", ":", "-", "--"]
    for (name, row), ls in zip(ext["methods"].items(), styles, strict=True):
        inv_freq = np.array(row["inv_freq"])
        i = np.arange(len(inv_freq))
        label = name + (
            f" (scale {row['attention_scaling']:.3f})" if row["attention_scaling"] != 1 else ""
        )
        ax0.semilogy(i, 2 * np.pi / inv_freq, ls=ls, lw=1.8, label=label)
        ax1.plot(i, inv_freq / np.array(ext["methods"]["original"]["inv_freq"]), ls=ls, lw=1.8)
    ax0.axhline(L, color="gray", lw=1)
    ax0.text(0, L * 1.3, f"trained context L = {L}", color="gray")
    ax0.axhline(s * L, color="gray", lw=1, ls=":")
    ax0.text(0, s * L * 1.3, f"target s·L = {int(s * L)}", color="gray")
    ax0.set_xlabel("pair index i")
    ax0.set_ylabel("wavelength 2π/θ_i (tokens)")
    ax0.set_title("Wavelengths: who gets stretched")
    ax0.legend(fontsize=8)
    ax1.axhline(1 / s, color="gray", lw=1, ls=":")
    ax1.text(0, 1 / s + 0.02, f"1/s = {1 / s:g}", color="gray")
    ax1.set_xlabel("pair index i")
    ax1.set_ylabel("θ_i' / θ_i")
    ax1.set_title("Frequency ratio to original RoPE")
    fig.suptitle(
        f"Context extension x{s:g} (head_dim {ext['head_dim']}, rope_theta {ext['rope_theta']:g}): "
        "fast pairs kept by NTK/YaRN/Llama 3.1, all slowed by PI"
    )
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
    n_stages = 7
    if args.quick:
        sizes = {
            "pe_len": 512,
            "trials": 300,
            "mc": 1024,
            "bench": (1, 8, 256, 64),
            "min_run_time": 0.005,
        }
    else:
        sizes = {
            "pe_len": 2048,
            "trials": 5000,
            "mc": 16384,
            "bench": (1, 32, 2048, 128),
            "min_run_time": 0.3,
        }

    print(f"[1/{n_stages}] sinusoidal: PE(pos + k) = M_k PE(pos) for every pos ...")
    sin_res = results["sinusoidal"] = check_sinusoidal(seq_len=sizes["pe_len"])
    print(f"  d_model {sin_res['d_model']}, positions 0..{sin_res['seq_len'] - 1}")
    print(
        f"  {'k':>5} {'shift err f64':>14} {'shift err f32':>14} {'|M^T M - I|':>12} "
        f"{'dot vs Σcos':>12}"
    )
    for r in sin_res["shifts"]:
        print(
            f"  {r['k']:>5} {r['max_abs_err_shift_float64']:>14.2e} "
            f"{r['max_abs_err_shift_float32']:>14.2e} {r['max_abs_err_orthogonal']:>12.2e} "
            f"{r['max_abs_err_dot_vs_formula']:>12.2e}"
        )
    print(
        f"  wavelengths {sin_res['shortest_wavelength_tokens']:.2f} .. "
        f"{sin_res['longest_wavelength_tokens']:.0f} tokens"
    )

    print(f"[2/{n_stages}] RoPE: norms, relative scores, layouts, cache slices ...")
    rope_res = results["rope"] = check_rope(n_trials=sizes["trials"])
    labels = {
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
    print(
        f"  {rope_res['n_trials']} random (q, k, m, n), positions < {rope_res['max_position']}, "
        f"head_dim {rope_res['head_dim']}; worst error:"
    )
    for key, label in labels.items():
        note = "  <- the layout bug" if key.endswith("unpermuted") else ""
        print(f"  {label:<48} {rope_res[key]:.2e}{note}")

    print(f"[3/{n_stages}] long-term decay of scores with distance ...")
    decay = results["decay"] = rope_long_term_decay(n_samples=sizes["mc"])
    print(f"  head_dim {decay['head_dim']}, {decay['n_samples']} Monte Carlo samples")
    print(f"  {'distance':>8} {'rel. bound (1/(d/2)) Σ|S_l|':>28} {'E score, q = k':>15}")
    for mark in decay["marks"]:
        print(
            f"  {mark['distance']:>8} {mark['relative_upper_bound']:>28.2f} "
            f"{mark['expected_identical']:>15.2f}"
        )
    print(
        f"  Monte Carlo vs analytic (q = k): max |z| = "
        f"{decay['max_abs_z_identical_mc_vs_analytic']:.2f}; random q, k mean vs 0: "
        f"max |z| = {decay['max_abs_z_random_mean_vs_zero']:.2f}"
    )

    print(f"[4/{n_stages}] attention-score patterns ...")
    mats = attention_score_matrices()
    att = results["attention_patterns"] = check_attention_patterns(mats)
    print("  spread along diagonals (0 = depends on n - m only):")
    for name, value in att.items():
        print(f"  {name.removeprefix('toeplitz_max_dev_'):<20} {value:.2e}")

    print(f"[5/{n_stages}] context extension: inverse frequencies per scheme ...")
    ext = results["context_extension"] = context_extension()
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

    print(f"[6/{n_stages}] benchmarking apply_rope layouts ...")
    bench = results["benchmark"] = benchmark_rope(*sizes["bench"], device, sizes["min_run_time"])
    print(f"  shape (batch, n_heads, seq_len, head_dim) = {tuple(bench['shape'])} on {device}")
    for name in (
        "half_split_cached",
        "half_split_uncached",
        "interleaved_complex",
        "interleaved_real",
    ):
        ratio = bench.get(f"{name}_vs_half_split_cached_ratio", 1.0)
        print(f"  {name:<22} {bench[name + '_ms']:>8.3f} ms  {ratio:>5.2f}x")
    print(
        f"  tables: cos+sin {bench['cos_sin_cache_bytes'] / 2**20:.2f} MiB, "
        f"freqs_cis {bench['freqs_cis_bytes'] / 2**20:.2f} MiB"
    )

    print(f"[7/{n_stages}] drawing figures ...")
    figures = {
        "sinusoidal_encoding": plot_sinusoidal_encoding(),
        "rope_rotation": plot_rope_rotation(),
        "rope_layouts": plot_rope_layouts(),
        "rope_decay": plot_rope_decay(decay),
        "attention_scores": plot_attention_scores(mats),
        "context_extension": plot_context_extension(ext),
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
