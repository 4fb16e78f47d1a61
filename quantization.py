"""Quantization: int8, int4 and NF4 from scratch, bit-exact with the libraries, on a real model.

The problem
-----------
A model's weights are float32 (4 bytes each) or bf16 (2 bytes). Generating one token reads every
weight once, so on most machines decoding is limited by how fast memory delivers those bytes, and
a model must fit in memory at all. Storing weights in 8 or 4 bits cuts the bytes 4-8x, at a cost
in accuracy that depends on *how* the 256 or 16 levels are placed: one scale per row or per
small group, a uniform grid or levels matched to the weights' bell-shaped distribution, rounding
each weight to its nearest level or correcting the rounding error as you go. And a smaller
model is not automatically a faster one: the codes must be turned back into floats somewhere.

The idea
--------
1. int8, symmetric, one scale per output channel (gpt-fast's ``dynamically_quantize_per_channel``,
   LLM.int8()'s vector-wise scales): a row's largest weight sets its scale.
2. int4 group-wise with a scale and a zero point per group of 64 inputs (gpt-fast's
   ``group_quantize_tensor``), two codes packed per byte: 16 levels evenly spread from the group's
   min to its max.
3. NF4 (QLoRA): 16 levels at the quantiles of a normal distribution, so each level is used about
   equally often by normally distributed weights, with an exact 0; one absmax per block of 64;
   then double quantization stores those absmax constants themselves in 8 bits.
4. GPTQ: quantize a layer column by column and push each column's rounding error onto the
   columns not yet quantized, weighted by the inverse Hessian of the layer's inputs, so the
   *output* W X stays close even where single weights move.
5. ``QuantizedLinear`` holds the codes and dequantizes in ``forward``; ``quantize_model`` swaps
   every ``nn.Linear`` of a model for one.

The math
--------
For a weight matrix W (out, in), n = out * in weights::

    (1) int8:  s_r = max_j |W_rj| / 127.5,   q = clamp(round(W_rj / s_r), -128, 127),
               W_hat = q s_r
    (2) int4:  per group g: s_g = (max - min) / 15, z_g = min + 8 s_g (bf16),
               q = clamp(round((W - (z_g - 8 s_g)) / s_g), 0, 15)
    (3)        W_hat = (q - 8) s_g + z_g
    (4) NF4:   q_i = Phi^-1(p_i) / max_i Phi^-1(p_i), p: 8 points of linspace(0.9677083, 0.5, 9)
               and 7 of linspace(0.9677083, 0.5, 8) mirrored, plus 0 (QLoRA eq. 4)
    (5)        a_b = max |W| in block b (64 weights), q = nearest code to W / a_b,
               W_hat = code[q] a_b
    (6) double quantization: c = mean(a), a - c in 8-bit blocks of 256, one float32 per block
    (7) GPTQ:  H = X X^T / n; for column i: q_i = quant(w_i),
               W[:, j>i] -= (w_i - q_i) / [H^-1]_ii [H^-1]_i,j>i
    (8) bytes: int8 n + 4 out; int4 n/2 + 4 n/64; NF4 n/2 + 4 n/64 (4.5 bits per weight);
               NF4 + double quant n/2 + n/64 + 4 ceil(n/64/256) + 4 (4.127 bits)

Where it is used
----------------
gpt-fast and torchao (int8 weight-only, int4 group-wise, GPTQ), bitsandbytes and QLoRA (NF4 with
double quantization: the frozen base of ``fine_tuning.py``, next in the learning path, which
takes NF4 from here), llama.cpp's Q4/Q8 formats (block-wise scales), AutoGPTQ. Weight-only int8
speeds decoding up where memory is the bottleneck and a fused kernel dequantizes in registers
(GPUs); on a CPU through plain PyTorch the conversion costs more than the bytes it saves, and
the speed comes from int8 x int8 matmuls instead (measured here).

Run it
------
    uv run python quantization.py                   # default run (run time: README, measured)
    uv run python quantization.py --quick           # a tiny model trained here, a fast check
    uv run python quantization.py --model DIR       # quantize DIR/model.pt (from training.py)

The default run quantizes ``docs/figures/training/model.pt`` (training.py's default run) when it
exists, else trains a small Llama through ``training.train``; results.json says which. It
evaluates every scheme on the held-out text, prints the table, the parities and the timings, and
saves the figures and ``results.json`` under ``--out`` (default ``figures/quantization/``).

References
----------
- Dettmers, Lewis, Belkada and Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication for
  Transformers at Scale", 2022, arXiv 2208.07339 (vector-wise scales, outlier features).
- Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers", 2022, arXiv 2210.17323.
- Dettmers, Pagnoni, Holtzman and Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs",
  2023, arXiv 2305.14314 (NF4, eq. 4; double quantization).
- Reference code: pytorch-labs/gpt-fast ``quantize.py`` (``dynamically_quantize_per_channel``,
  ``get_group_qparams``, ``group_quantize_tensor_from_qparams``, ``GPTQ``);
  bitsandbytes-foundation/bitsandbytes ``bitsandbytes/functional.py`` (``create_normal_map``,
  ``create_dynamic_map``, ``quantize_4bit``: tested byte for byte) and
  ``bitsandbytes/backends/default/ops.py``; IST-DASLab/gptq ``gptq.py``.

Contents
--------
2. Core: ``WEIGHT_DTYPES``, ``SCHEMES``, ``STORED`` (what each scheme keeps),
   ``quantize_int8``/``dequantize_int8`` (1), ``quantize_int4``, ``int4_qparams``,
   ``dequantize_int4`` (2, 3), ``pack_nibbles``/``unpack_nibbles``, ``nf4_codebook`` (4),
   ``_nearest_code``, ``quantize_nf4``/``dequantize_nf4`` (5), ``dynamic_map_8bit``,
   ``double_quantize``/``double_dequantize`` (6), ``gptq_quantize_int4`` (7),
   ``QuantizedLinear``, ``quantized_bytes`` (8), ``quantize_model``.
3. Baselines and apparatus: the door checks (``_check_weight``, ``_check_codes``,
   ``_check_scheme`` and the shared ``_check_sizes``, ``_check_positive``,
   ``_check_float_tensor``), ``calibration_ids`` and ``calibrate`` (Hessians and activation maxima),
   ``DynamicInt8Linear`` and ``dynamic_int8_model`` (the int8 x int8 path),
   ``bitsandbytes_functional``, ``model_weight_bytes``, ``LABELS``, ``QUANTIZED_ROWS``.
4. Experiments: ``claim``, ``print_claims``, ``_int4_reference`` and
   ``check_quantizer_parity``, ``measure_bytes``, ``gptq_on_random``, ``build_models``,
   ``token_losses``, ``evaluate_models``, ``paired_gaps``, ``layer_errors``,
   ``mean_layer_errors``, ``weight_errors``, ``measure_outliers``, ``benchmark_decode``,
   ``benchmark_linear``, ``GPTQ_PAIRS``, ``gap_closed``, ``gptq_sentence``,
   ``tradeoff_title``, ``quantization_claims``.
5. Figures: ``COLOURS``, ``plot_codebook``, ``plot_error_histograms``, ``plot_tradeoff``,
   ``plot_layer_error``, ``plot_outliers``.
6. Main: ``SIZES``, ``parse_args``, the ``print_*`` helpers, ``quantization_figures``, ``main``.
7. Plumbing (identical in every script).

Read first: ``quantize_int8`` (the whole idea in four lines), ``nf4_codebook`` and
``quantize_nf4``, then ``gptq_quantize_int4``, then ``QuantizedLinear``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import itertools
import json
import logging
import math
import numbers
import os
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import training

# =============================================================================
# 2. Core: int8, int4 and NF4 codes, GPTQ, QuantizedLinear
# =============================================================================

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what bitsandbytes accepts too
SCHEMES = ("int8", "int4", "nf4", "nf4_dq")  # the codes QuantizedLinear stores
STORED = {  # the tensors each scheme stores
    "int8": ("q", "scale"),
    "int4": ("packed", "scale", "zero"),
    "nf4": ("packed", "absmax"),
    "nf4_dq": ("packed", "absmax_codes", "absmax2", "offset"),
}


# --- int8: symmetric absmax per output channel (gpt-fast's dynamically_quantize_per_channel)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1) s_r = max_j |w_rj| / 127.5, q_rj = clamp(round(w_rj / s_r), -128, 127).

    Returns int8 codes (out, in) and float32 scales (out,): one scale per output channel, so a
    row with large weights does not coarsen the others."""
    _check_weight(w)
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).eps)  # (1)
    q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)  # (out, in)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w_hat_rj = q_rj s_r (float32)."""
    _check_codes(q, torch.int8, shape=(None, None))
    _check_codes(scale, torch.float32, "scale", (q.shape[0],))
    return q.float() * scale[:, None]


# --- int4: group-wise asymmetric, scale and zero point (gpt-fast's group_quantize_tensor)


def quantize_int4(w: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, ...]:
    """(2) per group g of ``group_size`` inputs in a row: s_g = (max - min) / 15 (>= 1e-6),
    z_g = min + 8 s_g (both stored in bf16, as gpt-fast), q = clamp(round((w - (z_g - 8 s_g))
    / s_g), 0, 15). Returns uint8 codes 0..15 (out, in), scales and zeros (out, in / group)."""
    _check_weight(w, group_size=group_size)
    scale, zero = int4_qparams(w.float().reshape(-1, group_size))  # (out * n_groups, 1) each
    q = _int4_codes(w.float().reshape(-1, group_size), scale, zero).reshape(w.shape)
    n_groups = w.shape[1] // group_size
    return q, scale.reshape(-1, n_groups), zero.reshape(-1, n_groups)


def int4_qparams(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2) scale and zero of each row of ``groups`` (n, group_size), rounded to bf16."""
    lo, hi = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    scale = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zero = (lo + scale.float() * 8).to(torch.bfloat16)  # the value code 8 stands for
    return scale, zero


def _int4_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    lo = zero.float() - scale.float() * 8  # the value code 0 stands for
    return torch.round((groups - lo) / scale.float()).clamp(0, 15).to(torch.uint8)  # (2)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(3) w_hat = (q - 8) s_g + z_g, float32 (out, in)."""
    _check_codes(q, torch.uint8, shape=(None, None))
    _check_codes(scale, torch.bfloat16, "scale", (q.shape[0], None))
    _check_codes(zero, torch.bfloat16, "zero", tuple(scale.shape))
    if scale.shape[1] == 0 or q.shape[1] % scale.shape[1]:
        raise ValueError(f"scale ({scale.shape[1]} groups) must divide in_features ({q.shape[1]})")
    group_size = q.shape[1] // scale.shape[1]
    groups = q.reshape(-1, group_size).float() - 8  # (out * n_groups, group_size)
    w = groups * scale.reshape(-1, 1).float() + zero.reshape(-1, 1).float()  # (3)
    return w.reshape(q.shape)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' order):
    byte_i = q_2i << 4 | q_2i+1. ``q`` is uint8 codes 0..15 with an even number of them."""
    _check_codes(q, torch.uint8)
    flat = q.flatten()
    if flat.numel() % 2 or (flat > 15).any():
        raise ValueError(f"q ({flat.numel()} codes) must hold an even number of codes 0..15")
    return (flat[0::2] << 4) | flat[1::2]  # (numel / 2,)


def unpack_nibbles(packed: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: uint8 codes 0..15 of ``shape``."""
    _check_codes(packed, torch.uint8, "packed", (None,))
    if 2 * packed.numel() != math.prod(shape):
        raise ValueError(f"shape {tuple(shape)} must hold 2 x {packed.numel()} codes (packed)")
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(shape)


# --- NF4: 16 normal quantiles, block-wise absmax, double quantization (QLoRA)


@functools.cache
def nf4_codebook() -> torch.Tensor:
    """(4) QLoRA's NormalFloat-4: q_i = Phi^-1(p_i) / max, with 8 positive quantiles at
    p in linspace(delta, 0.5, 9)[:-1] and 7 negative ones at linspace(delta, 0.5, 8)[:-1], plus
    an exact 0, normalised to [-1, 1]. delta = 0.9677083 = 1 - (1/32 + 1/30) / 2 puts the
    extreme quantiles half a bin inside the tails (both halves' bins averaged). Computed in
    float32 as bitsandbytes' ``create_normal_map`` does, it equals its table exactly."""
    delta = 0.9677083
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, 9)[:-1].double())  # (4)
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, 8)[:-1].double())
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return values / values.max()  # 16 values, sorted, -1 and 1 at the ends


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code``: the midpoints are the decision
    boundaries (a tie goes to the lower value, as bitsandbytes' torch.bucketize)."""
    return torch.bucketize(x, (code[:-1] + code[1:]) / 2).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(5) Flatten w, cut it into blocks of ``block_size``, a_b = max |w| in block b,
    q = nearest NF4 code to w / a_b. Returns packed nibbles (numel / 2,) and absmax (blocks,)."""
    _check_weight(w, block_size=block_size)
    blocks = w.float().reshape(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (5)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    return pack_nibbles(_nearest_code(scaled.flatten(), nf4_codebook())), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple) -> torch.Tensor:
    """w_hat = code[q] * a_b, float32 of ``shape`` (blocks as ``quantize_nf4`` cut them)."""
    values = nf4_codebook()[unpack_nibbles(packed, shape).flatten().long()]  # (numel,)
    _check_codes(absmax, torch.float32, "absmax", (None,))
    if len(absmax) == 0 or values.numel() % len(absmax):
        raise ValueError(f"absmax ({len(absmax)} blocks) must divide {values.numel()} weights")
    return (values.reshape(len(absmax), -1) * absmax[:, None]).reshape(shape)


@functools.cache
def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map``, Dettmers 2015): for
    e = 0..6, the 2^e midpoints of linspace(0.1, 1, 2^e + 1) times 10^(e - 6), both signs,
    then 0 and 1. 256 sorted values: dense near 0, as the absmax deviations are."""
    values = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (e - 6)) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()
    return torch.tensor(sorted([*values, 0.0, 1.0]), dtype=torch.float32)


def double_quantize(absmax: torch.Tensor, block_size: int = 256) -> dict:
    """(6) QLoRA's double quantization of the NF4 constants: c = mean(a), then a - c in
    blocks of ``block_size`` with 8-bit dynamic codes and one float32 absmax per block:
    32 / 64 = 0.5 bits per parameter become 8 / 64 + 32 / (64 * 256) = 0.127."""
    _check_codes(absmax, torch.float32, "absmax", (None,))
    _check_sizes(block_size=block_size, absmax_blocks=absmax.numel())
    offset = absmax.mean()
    centred = absmax - offset  # (6)
    n = centred.numel()
    padded = torch.cat([centred, centred.new_zeros(-n % block_size)]).reshape(-1, block_size)
    absmax2 = padded.abs().amax(dim=1)  # (ceil(n / block_size),)
    scaled = (padded * (1.0 / absmax2.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    codes = _nearest_code(scaled.flatten()[:n], dynamic_map_8bit())
    return {"codes": codes, "absmax2": absmax2, "offset": offset, "block_size": block_size}


def double_dequantize(dq: dict) -> torch.Tensor:
    """a_hat = code8[codes] * absmax2_block + c, from ``double_quantize``'s dict."""
    if not isinstance(dq, dict) or set(dq) != {"codes", "absmax2", "offset", "block_size"}:
        raise TypeError("dq must be the dict double_quantize returns")
    values = dynamic_map_8bit()[dq["codes"].long()]
    n, b = values.numel(), dq["block_size"]
    padded = torch.cat([values, values.new_zeros(-n % b)]).reshape(-1, b)
    return (padded * dq["absmax2"][:, None]).flatten()[:n] + dq["offset"]


# --- GPTQ: round one column at a time, push its error onto the columns not yet rounded


def gptq_quantize_int4(
    w: torch.Tensor, hessian: torch.Tensor, group_size: int = 64, damp: float = 0.01
) -> tuple[torch.Tensor, ...]:
    """(7) GPTQ (Frantar et al. 2022) for the int4 code of ``quantize_int4``.

    Minimise ||W X - W_hat X||^2 with H = X X^T / n from calibration inputs X: for column i,
    round it, then spread its error over the later columns through the inverse Hessian,
    W[:, j>i] -= (w_i - q_i) / [H^-1]_ii * [H^-1]_i,j>i. H^-1's rows come from the upper
    Cholesky factor of H^-1 (the paper's trick); ``damp`` * mean diag(H) is added for stability.
    A group's scale and zero are set from the (already updated) weights when its first column
    is reached. Returns codes, scales and zeros in ``quantize_int4``'s format."""
    _check_weight(w, group_size=group_size)
    n = w.shape[1]
    _check_float_tensor("hessian", hessian)
    _check_positive(damp=damp)
    if hessian.shape != (n, n) or not torch.isfinite(hessian).all():
        raise ValueError(f"hessian (shape {tuple(hessian.shape)}) must be ({n}, {n}), finite")
    W = w.float().clone()
    H = hessian.double().clone()
    dead = H.diagonal() == 0  # inputs that were always 0: any weight works, use 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise ValueError("hessian must be positive semi-definite (X^T X of real inputs)") from None
    Hinv = Hinv.float()  # (in, in) upper triangular
    q = torch.empty_like(W, dtype=torch.uint8)
    scales, zeros = [], []
    for i in range(n):
        if i % group_size == 0:
            scale, zero = int4_qparams(W[:, i : i + group_size])  # (out, 1) each
            scales.append(scale)
            zeros.append(zero)
        q[:, i : i + 1] = _int4_codes(W[:, i : i + 1], scale, zero)
        w_hat = (q[:, i : i + 1].float() - 8) * scale.float() + zero.float()  # (3)
        err = (W[:, i : i + 1] - w_hat) / Hinv[i, i]  # (out, 1)
        W[:, i:] -= err * Hinv[i : i + 1, i:]  # (7) the later columns absorb the error
    return q, torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


class QuantizedLinear(nn.Module):
    """A ``nn.Linear`` whose weight is stored as int8, int4, NF4 or NF4 with double
    quantization, dequantized at every forward (weight-only quantization).

    ``QuantizedLinear.from_linear(linear, scheme)`` quantizes a trained layer (int4 by GPTQ
    when a ``hessian`` is given); ``nbytes`` is measured from the stored tensors and equals
    ``quantized_bytes`` (tested). ``forward(x)`` takes (..., in_features).

    >>> layer = nn.Linear(128, 32, bias=False)
    >>> q = QuantizedLinear.from_linear(layer, "nf4")  # block 64
    >>> q(torch.randn(2, 128)).shape  # (batch, out_features)
    torch.Size([2, 32])
    >>> q.nbytes, q.nbytes == quantized_bytes("nf4", 32, 128)  # 2048 nibble bytes + 64 absmax
    (2304, True)
    >>> q.bits_per_param  # 4 bits + 32 bits of absmax per 64 weights
    4.5
    """

    def __init__(self, weights: dict, scheme: str, shape: tuple, bias=None) -> None:
        super().__init__()
        _check_scheme(scheme)
        _check_sizes(out_features=shape[0], in_features=shape[1])
        if set(weights) != set(STORED[scheme]):
            raise ValueError(f"weights ({sorted(weights)}) must be {scheme}'s {STORED[scheme]}")
        self.scheme, self.shape = scheme, tuple(shape)
        self.out_features, self.in_features = self.shape
        for name, t in weights.items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, scheme: str, block_size: int | None = None, hessian=None
    ) -> QuantizedLinear:
        """Quantize ``linear.weight`` with ``scheme`` (block: int4 group 64, NF4 block 64)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_scheme(scheme)
        if hessian is not None and scheme != "int4":
            raise ValueError(f"hessian (GPTQ) works with scheme 'int4', not {scheme!r}")
        w = linear.weight.detach()
        b = 64 if block_size is None else block_size
        if scheme == "int8":
            q, scale = quantize_int8(w)
            weights = {"q": q, "scale": scale}
        elif scheme == "int4":
            q, scale, zero = (
                quantize_int4(w, b) if hessian is None else gptq_quantize_int4(w, hessian, b)
            )
            weights = {"packed": pack_nibbles(q), "scale": scale, "zero": zero}
        else:
            packed, absmax = quantize_nf4(w, b)
            weights = {"packed": packed, "absmax": absmax}
            if scheme == "nf4_dq":
                dq = double_quantize(absmax)
                weights = {
                    "packed": packed,
                    "absmax_codes": dq["codes"],
                    "absmax2": dq["absmax2"],
                    "offset": dq["offset"],
                }
        return cls(weights, scheme, w.shape, linear.bias)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out_features, in_features) the codes stand for."""
        if self.scheme == "int8":
            return dequantize_int8(self.q, self.scale)
        if self.scheme == "int4":
            return dequantize_int4(unpack_nibbles(self.packed, self.shape), self.scale, self.zero)
        absmax = (
            self.absmax
            if self.scheme == "nf4"
            else double_dequantize(
                {
                    "codes": self.absmax_codes,
                    "absmax2": self.absmax2,
                    "offset": self.offset,
                    "block_size": 256,
                }
            )
        )
        return dequantize_nf4(self.packed, absmax, self.shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, as ``nn.Linear.weight`` reads (bitsandbytes' layers too)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_float_tensor("x", x, self.in_features)
        if self.scheme == "int8":  # scale after the matmul: one multiply per output
            return F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype) + (
                0 if self.bias is None else self.bias
            )
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored codes and constants (the bias not counted), from the tensors."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / (self.out_features * self.in_features)


def quantized_bytes(scheme: str, out_features: int, in_features: int, block_size: int = 64) -> int:
    """(8) Bytes of a (out, in) weight: fp32 4 n, bf16 2 n, int8 n + 4 out, int4 n / 2 +
    2 * 2 n / g (bf16 scale and zero per group), NF4 n / 2 + 4 n / 64, NF4 + double quant
    n / 2 + n / 64 + 4 ceil(n / 64 / 256) + 4 (the offset)."""
    _check_scheme(scheme, ("fp32", "bf16", *SCHEMES))
    _check_sizes(out_features=out_features, in_features=in_features, block_size=block_size)
    if in_features % block_size:
        raise ValueError(f"block_size ({block_size}) must divide in_features ({in_features})")
    n = out_features * in_features
    blocks = n // block_size
    return {
        "fp32": 4 * n,
        "bf16": 2 * n,
        "int8": n + 4 * out_features,
        "int4": n // 2 + 4 * blocks,
        "nf4": n // 2 + 4 * blocks,
        "nf4_dq": n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4,
    }[scheme]


def quantize_model(
    model: nn.Module,
    scheme: str,
    hessians: dict | None = None,
    skip: tuple = ("lm_head",),
    block_size: int | None = None,
    per_channel: bool = False,
) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` (but those named in ``skip``) replaced by a
    ``QuantizedLinear``; ``hessians`` (name -> H) makes the int4 layers GPTQ's;
    ``per_channel`` makes each int4 group a whole row (block = in_features)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel ({per_channel!r}) must be a bool")
    _check_scheme(scheme)
    new = copy.deepcopy(model)
    for name, module in list(new.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in skip:
            if hessians is not None and name not in hessians:
                raise ValueError(f"hessians has no entry for the linear {name!r}")
            hessian = None if hessians is None else hessians[name]
            parent, _, child = name.rpartition(".")
            block = module.in_features if per_channel else block_size
            q = QuantizedLinear.from_linear(module, scheme, block, hessian)
            setattr(new.get_submodule(parent) if parent else new, child, q)
    return new


# =============================================================================
# 3. Baselines and apparatus: door checks, the model, calibration, dynamic int8, bitsandbytes
# =============================================================================


def _check_sizes(**sizes: int) -> None:
    """Every size (a dimension, a count) must be an integer (not a bool) of at least 1."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} ({value!r}) must be an int")
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")


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


def _check_weight(w: torch.Tensor, **block: int) -> None:
    """A 2-D (out_features, in_features) float32/bf16/fp16 matrix, finite, whose rows split
    into blocks of the given size (``group_size`` of int4, ``block_size`` of NF4)."""
    _check_float_tensor("w", w)
    if w.dim() != 2:
        raise ValueError(f"w (shape {tuple(w.shape)}) must be 2-D (out_features, in_features)")
    if w.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"w dtype ({w.dtype}) must be one of float32, bfloat16, float16")
    if not torch.isfinite(w).all():
        raise ValueError("w holds inf or nan: a scale of inf cannot be stored")
    for name, size in block.items():
        _check_sizes(**{name: size})
        if w.shape[1] % size:
            raise ValueError(f"{name} ({size}) must divide in_features ({w.shape[1]}) of w")


def _check_scheme(scheme: str, allowed: tuple = SCHEMES) -> None:
    if scheme not in allowed:
        raise ValueError(f"scheme ({scheme!r}) must be one of {', '.join(allowed)}")


def _check_codes(q: torch.Tensor, dtype: torch.dtype, name: str = "q", shape=None) -> None:
    """A tensor of ``dtype`` (codes or constants), of ``shape`` if given (None: any size)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype != dtype:
        raise ValueError(f"{name} dtype ({q.dtype}) must be {dtype}")
    if shape is not None and (
        q.dim() != len(shape)
        or any(s is not None and s != d for s, d in zip(shape, q.shape, strict=True))
    ):
        raise ValueError(f"{name} (shape {tuple(q.shape)}) must have shape {tuple(shape)}")


QUANTIZED_ROWS = ("int8", "int4", "int4_gptq", "int4_pc", "int4_pc_gptq", "nf4", "nf4_dq")
LABELS = {
    "fp32": "fp32",
    "bf16": "bf16",
    "int8": "int8 (per channel)",
    "int4": "int4 RTN (group 64)",
    "int4_gptq": "int4 GPTQ (group 64)",
    "int4_pc": "int4 RTN (per channel)",
    "int4_pc_gptq": "int4 GPTQ (per channel)",
    "nf4": "NF4 (block 64)",
    "nf4_dq": "NF4 + double quant",
    "int8_dynamic": "int8 dynamic (int8 x int8)",
}


def calibration_ids(train_ids: torch.Tensor, windows: torch.Tensor, n: int, seed: int):
    """``n`` random windows of the training text, as long as the validation windows' inputs."""
    seq_len = windows.shape[1] - 1
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(train_ids) - seq_len, (n,), generator=gen).tolist()
    return torch.stack([train_ids[s : s + seq_len] for s in starts])  # (n, seq_len)


@torch.no_grad()
def calibrate(model: nn.Module, ids: torch.Tensor, skip: tuple = ("lm_head",)) -> dict:
    """Run ``ids`` (batch, seq_len) through ``model`` and record, for the input x of every
    ``nn.Linear`` (but ``skip``): H = X^T X / n (GPTQ's Hessian, up to a factor 2) and the
    largest |x| of each input channel (where activation outliers sit)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
        raise ValueError("ids must be a 2-D int64 tensor of token ids (batch, seq_len)")
    stats: dict = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in skip:

            def hook(mod, inputs, output, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()  # (tokens, in)
                s = stats.setdefault(name, {"H": 0, "n": 0, "act_absmax": 0})
                s["H"] = s["H"] + x.T @ x
                s["n"] += len(x)
                s["act_absmax"] = torch.maximum(
                    torch.as_tensor(s["act_absmax"], dtype=x.dtype), x.abs().amax(dim=0)
                )

            hooks.append(module.register_forward_hook(hook))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {
        name: {"hessian": (s["H"] / s["n"]).float(), "act_absmax": s["act_absmax"].float()}
        for name, s in stats.items()
    }


class DynamicInt8Linear(nn.Module):
    """The path where int8 is *faster* on a CPU: weights int8 per output channel (1), and the
    activations quantized per row on the fly (absmax / 127), then an int8 x int8 -> int32
    matmul (``torch._int_mm``, the kernel torchao's dynamic int8 uses) and one rescale."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float()
        self.w_scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.w_t = torch.round(w / self.w_scale[:, None]).to(torch.int8).T  # (in, out) view

    @property
    def weight(self) -> torch.Tensor:
        return self.w_t.T.float() * self.w_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()  # (tokens, in)
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        x_q = torch.round(x / x_scale).to(torch.int8)
        y = torch._int_mm(x_q, self.w_t).float() * x_scale * self.w_scale  # (tokens, out)
        return y.reshape(*shape[:-1], -1)


def dynamic_int8_model(model: nn.Module, skip: tuple = ("lm_head",)) -> nn.Module:
    new = copy.deepcopy(model)
    for name, module in list(new.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in skip:
            parent, _, child = name.rpartition(".")
            setattr(new.get_submodule(parent), child, DynamicInt8Linear(module))
    return new


def bitsandbytes_functional():
    """``bitsandbytes.functional`` (a dev dependency), or None where it is not installed. Its
    CPU backend logs a line about an optional kernels package at import: silenced here."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    return bnb_functional


def model_weight_bytes(model: nn.Module) -> dict:
    """Bytes of the quantized linears (codes and constants), of the float tensors left (the
    embedding, norms, the LM head when untied), and both, measured from the tensors; a tied
    weight counts once."""
    quant = sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedLinear))
    seen, rest = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if isinstance(owner, QuantizedLinear) or t.data_ptr() in seen:
            continue
        if t.is_floating_point():
            seen.add(t.data_ptr())
            rest += t.numel() * t.element_size()
    return {"quantized": quant, "float": rest, "total": quant + rest}


# =============================================================================
# 4. Experiments: parity, bytes, GPTQ vs RTN, the model at every scheme, speed, claims
# =============================================================================


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


def _int4_reference(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """gpt-fast's get_group_qparams + group_quantize_tensor_from_qparams, step by step."""
    groups = w.float().reshape(-1, group_size)
    lo, hi = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16).float()
    zeros = (lo + scales * 8).to(torch.bfloat16).float()
    min_val = zeros - scales * 8
    return groups.sub(min_val).div(scales).round().clamp(0, 15).reshape(w.shape)


def check_quantizer_parity(weights: dict, bnb_functional) -> dict:
    """On the model's own weights: NF4 codebook, packed bytes, absmax and dequantization vs
    bitsandbytes (CPU), double quantization codes vs bitsandbytes' 8-bit blockwise code,
    int8 and int4 vs gpt-fast's formulas, and pack/unpack round trips."""
    out: dict = {"layers": len(weights)}
    int8_same = int4_same = roundtrip = 0
    for w in weights.values():
        q, s = quantize_int8(w)
        int8_same += torch.equal(
            q,
            torch.clamp(torch.round(w / (w.abs().amax(1) / 127.5)[:, None]), -128, 127).to(
                torch.int8
            ),
        ) and torch.equal(s, w.abs().amax(1) / 127.5)
        q4, _, _ = quantize_int4(w, 64)
        int4_same += torch.equal(q4.float(), _int4_reference(w, 64))
        roundtrip += torch.equal(unpack_nibbles(pack_nibbles(q4), q4.shape), q4)
    out["int8_equal_gpt_fast_formula"] = int8_same
    out["int4_equal_gpt_fast_formula"] = int4_same
    out["nibble_round_trips"] = roundtrip
    if bnb_functional is None:
        out["bitsandbytes"] = "not installed: NF4 parity not checked"
        return out
    code = bnb_functional.get_4bit_type("nf4", device="cpu")
    out["nf4_codebook_max_err"] = max_abs_err(nf4_codebook(), code)
    bytes_same = absmax_same = 0
    deq_err, dq_agree, dq_total, dq_nearer = 0.0, 0, 0, 0
    for w in weights.values():
        packed, absmax = quantize_nf4(w, 64)
        ref, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        bytes_same += torch.equal(packed, ref.flatten())
        absmax_same += torch.equal(absmax, state.absmax)
        deq = dequantize_nf4(packed, absmax, w.shape)
        deq_err = max(deq_err, max_abs_err(deq, bnb_functional.dequantize_4bit(ref, state)))
        dq = double_quantize(absmax)
        ref_codes, _ = bnb_functional.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
        dq_agree += int((dq["codes"] == ref_codes).sum())
        x = (absmax - absmax.mean()) / dq["absmax2"].repeat_interleave(256)[: len(absmax)]
        code8 = dynamic_map_8bit()
        ours_gap = (x - code8[dq["codes"].long()]).abs()
        dq_nearer += int((ours_gap <= (x - code8[ref_codes.long()]).abs()).sum())
        dq_total += len(absmax)
    out.update(
        {
            "nf4_packed_bytes_identical": bytes_same,
            "nf4_absmax_identical": absmax_same,
            "nf4_dequantize_max_err": deq_err,
            "double_quant_codes_agree": dq_agree / dq_total,
            "double_quant_codes_never_farther": dq_nearer / dq_total,
        }
    )
    return out


def measure_bytes(model: nn.Module) -> dict:
    """Every scheme's bytes of every quantized linear, measured, against formula (8)."""
    out = {}
    for scheme in SCHEMES:
        qmodel = quantize_model(model, scheme)
        layers = [m for m in qmodel.modules() if isinstance(m, QuantizedLinear)]
        measured = sum(m.nbytes for m in layers)
        formula = sum(quantized_bytes(scheme, *m.shape) for m in layers)
        n = sum(m.out_features * m.in_features for m in layers)
        out[scheme] = {"measured": measured, "formula": formula, "bits_per_param": 8 * measured / n}
    out["all_equal"] = all(v["measured"] == v["formula"] for v in out.values())
    return out


def gptq_on_random(out_features: int, in_features: int, tokens: int, seed: int) -> dict:
    """GPTQ vs round-to-nearest on a random layer with correlated, outlier-bearing inputs:
    the relative error of the layer's output W X (what GPTQ minimises), and of the weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    x = torch.randn(tokens, in_features, generator=g) @ mix  # correlated channels
    x[:, :4] *= 8  # a few outlier channels, as in trained models
    hessian = x.T @ x / tokens
    rtn = dequantize_int4(*quantize_int4(w, 64))
    gptq = dequantize_int4(*gptq_quantize_int4(w, hessian, 64))
    ref = x @ w.T

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    return {
        "shape": [out_features, in_features],
        "tokens": tokens,
        "output_rel_err_rtn": rel(x @ rtn.T, ref),
        "output_rel_err_gptq": rel(x @ gptq.T, ref),
        "weight_rel_err_rtn": rel(rtn, w),
        "weight_rel_err_gptq": rel(gptq, w),
    }


def build_models(model: nn.Module, calib: dict) -> dict:
    """The model at every row of the table (quantized linears; embedding, norms and the LM
    head stay fp32, except in the bf16 row, where everything is bf16)."""
    hessians = {name: s["hessian"] for name, s in calib.items()}
    return {
        "fp32": model,
        "bf16": copy.deepcopy(model).to(torch.bfloat16),
        "int8": quantize_model(model, "int8"),
        "int4": quantize_model(model, "int4"),
        "int4_gptq": quantize_model(model, "int4", hessians),
        "int4_pc": quantize_model(model, "int4", per_channel=True),
        "int4_pc_gptq": quantize_model(model, "int4", hessians, per_channel=True),
        "nf4": quantize_model(model, "nf4"),
        "nf4_dq": quantize_model(model, "nf4_dq"),
    }


def _float_bytes(name: str) -> int:
    return 2 if name == "bf16" else 4


@torch.no_grad()
def token_losses(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """The loss of every predicted token of ``windows`` (n, seq_len + 1), flattened, float64."""
    out = []
    for w in windows.split(batch_size):
        logits = model(w[:, :-1]).float()  # (batch, seq_len, vocab)
        out.append(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="none"))
    return torch.cat(out).double()


def evaluate_models(models: dict, windows: torch.Tensor, token_bytes: torch.Tensor) -> tuple:
    """Validation loss, perplexity and bits per byte of each model, and its weight bytes; also
    returns every model's per-token losses (for paired comparisons)."""
    out, losses = {}, {}
    for name, m in models.items():
        losses[name] = token_losses(m, windows)
        loss = losses[name].mean().item()
        b = model_weight_bytes(m)
        n = sum(
            mod.out_features * mod.in_features
            for mod in m.modules()
            if isinstance(mod, QuantizedLinear)
        )
        out[name] = {
            "val_loss": loss,
            "perplexity": math.exp(loss),
            "bits_per_byte": training.bits_per_byte(loss, windows, token_bytes),
            "model_bytes": b["total"],
            "linear_bits_per_param": 8 * b["quantized"] / n if n else 8 * _float_bytes(name),
        }
    return out, losses


def paired_gaps(losses: dict) -> dict:
    """Each scheme's mean loss minus fp32's on the same tokens, with the standard error of
    that paired difference (std of the per-token differences / sqrt(tokens)): a gap of less
    than ~2 standard errors is not told apart from evaluation noise."""
    ref = losses["fp32"]
    out = {}
    for name, l in losses.items():
        d = l - ref
        out[name] = {"loss_gap": d.mean().item(), "stderr": (d.std() / len(d) ** 0.5).item()}
    for pair, (rtn, gptq) in GPTQ_PAIRS.items():
        d = losses[gptq] - losses[rtn]
        se = (d.std() / len(d) ** 0.5).item()
        out[f"gptq_minus_rtn_{pair}"] = {"loss_gap": d.mean().item(), "stderr": se}
    return out


def layer_errors(model: nn.Module, models: dict) -> dict:
    """Relative RMSE ||W_hat - W|| / ||W|| of every quantized linear, per scheme."""
    ref = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for scheme, m in models.items():
        if scheme not in QUANTIZED_ROWS:
            continue
        out[scheme] = {
            name: ((q.dequantize() - ref[name]).norm() / ref[name].norm()).item()
            for name, q in m.named_modules()
            if isinstance(q, QuantizedLinear)
        }
    return out


def mean_layer_errors(errors: dict) -> dict:
    """Each scheme's mean relative RMSE over the layers, and how GPTQ's compares with RTN's."""
    mean = {scheme: statistics.mean(e.values()) for scheme, e in errors.items()}
    larger = mean["int4_gptq"] > mean["int4"]
    return {**mean, "gptq_vs_rtn": "larger" if larger else "not larger"}


def weight_errors(model: nn.Module, models: dict, max_values: int = 200_000) -> dict:
    """(W_hat - W) / std(W) of every quantized weight, per scheme (a sample, for histograms)."""
    ref = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for scheme, m in models.items():
        if scheme not in QUANTIZED_ROWS:
            continue
        errs = [
            ((q.dequantize() - ref[n]) / ref[n].std()).flatten()
            for n, q in m.named_modules()
            if isinstance(q, QuantizedLinear)
        ]
        out[scheme] = torch.cat(errs)[:max_values]
    return out


def measure_outliers(model: nn.Module, calib: dict) -> dict:
    """Per input channel: the largest |activation| and the largest |weight| of each linear,
    as multiples of their medians (LLM.int8()'s outlier features), and what scales do about
    the strongest one: int8 with one scale per tensor vs per output channel vs int4 groups."""
    weights = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    layers = {}
    for name, s in calib.items():
        act = s["act_absmax"]
        col = weights[name].abs().amax(dim=0)  # largest |w| of each input channel
        layers[name] = {
            "act_max_over_median": (act.max() / act.median()).item(),
            "weight_max_over_median": (col.max() / col.median()).item(),
            "act_top_channel": int(act.argmax()),
        }
    worst = max(layers, key=lambda n: layers[n]["act_max_over_median"])
    w, act = weights[worst], calib[worst]["act_absmax"]
    per_tensor_scale = w.abs().max() / 127.5
    per_tensor = torch.round(w / per_tensor_scale).clamp(-128, 127) * per_tensor_scale
    hessian = calib[worst]["hessian"]

    def out_err(w_hat):  # relative error of the layer's output on the calibration inputs
        d = w_hat - w
        return (torch.trace(d @ hessian @ d.T) / torch.trace(w @ hessian @ w.T)).sqrt().item()

    return {
        "layers": layers,
        "worst_layer": worst,
        "worst_act_max_over_median": layers[worst]["act_max_over_median"],
        "worst_weight_max_over_median": layers[worst]["weight_max_over_median"],
        "worst_act_absmax": act.tolist(),
        "worst_weight_col_absmax": w.abs().amax(dim=0).tolist(),
        "output_rel_err": {
            "int8_per_tensor": out_err(per_tensor),
            "int8_per_channel": out_err(dequantize_int8(*quantize_int8(w))),
            "int4_group64": out_err(dequantize_int4(*quantize_int4(w, 64))),
        },
    }


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@torch.no_grad()
def benchmark_decode(models: dict, prompt_len: int, rounds: int, min_run_time: float) -> dict:
    """Seconds per decode step (one token, KV cache, batch 1) of each model, rounds
    interleaved; the bytes each step reads are the model's weights (the cache is tiny here)."""
    times: dict = {name: [] for name in models}
    ids = torch.zeros(1, prompt_len, dtype=torch.long)
    caches = {}
    for name, m in models.items():
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        caches[name] = m.new_cache(1, dtype=dtype)
        m(ids, 0, caches[name])
    nxt = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(rounds):
        for name, m in models.items():
            cache = caches[name]
            step = functools.partial(m, nxt, prompt_len, cache)
            times[name].append(median_time_s(step, min_run_time))
    fp32 = statistics.median(times["fp32"])
    return {
        "prompt_len": prompt_len,
        "rounds": rounds,
        "ms": {n: _spread([1e3 * t for t in v]) for n, v in times.items()},
        "speedup_vs_fp32": {n: fp32 / statistics.median(v) for n, v in times.items()},
        "bytes_read": {n: model_weight_bytes(m)["total"] for n, m in models.items()},
    }


@torch.no_grad()
def benchmark_linear(
    in_features: int, out_features: int, batches: list, rounds: int, min_run_time: float
) -> dict:
    """One linear layer at batch 1 (decode) and a large batch: fp32, weight-only int8 (the
    int8 -> fp32 conversion of every weight, every call: the dequantization cost), NF4, and
    dynamic int8 (int8 x int8 -> int32 matmul): where quantization is slower and faster."""
    lin = nn.Linear(in_features, out_features, bias=False)
    layers = {
        "fp32": lin,
        "int8": QuantizedLinear.from_linear(lin, "int8"),
        "nf4": QuantizedLinear.from_linear(lin, "nf4"),
        "int8_dynamic": DynamicInt8Linear(lin),
    }
    out: dict = {"shape": [out_features, in_features], "batches": batches, "rounds": rounds}
    for b in batches:
        x = torch.randn(b, in_features)
        times: dict = {n: [] for n in layers}
        for _ in range(rounds):
            for n, layer in layers.items():
                times[n].append(median_time_s(lambda layer=layer, x=x: layer(x), min_run_time))
        ratios = {
            n: _spread([f / t for f, t in zip(times["fp32"], v, strict=True)])
            for n, v in times.items()
        }
        out[f"batch_{b}"] = {
            "us": {n: _spread([1e6 * t for t in v]) for n, v in times.items()},
            "speedup_vs_fp32": ratios,
        }
    return out


GPTQ_PAIRS = {"group64": ("int4", "int4_gptq"), "per_channel": ("int4_pc", "int4_pc_gptq")}


def gap_closed(ppl: dict, rtn: str = "int4", gptq: str = "int4_gptq") -> float:
    """The fraction of RTN int4's perplexity gap to fp32 that GPTQ removes (nan: no gap)."""
    gap = ppl[rtn] - ppl["fp32"]
    return (ppl[rtn] - ppl[gptq]) / gap if gap > 0 else math.nan


def gptq_sentence(table: dict, gaps: dict, pair: str) -> tuple[str, bool, str]:
    """Whether GPTQ closed at least half of RTN int4's perplexity gap (``pair``: "group64" or
    "per_channel"), worded from the numbers, and whether RTN's gap is larger than the
    evaluation noise at all. Returns the sentence, whether it held, and a short form."""
    rtn, gptq = GPTQ_PAIRS[pair]
    ppl = {k: v["perplexity"] for k, v in table.items()}
    g, se = gaps[rtn]["loss_gap"], gaps[rtn]["stderr"]
    what = "int4 " + pair.replace("group64", "group 64").replace("_", " ")
    numbers = f"RTN {ppl[rtn]:.3f}, GPTQ {ppl[gptq]:.3f}, fp32 {ppl['fp32']:.3f}"
    if not g > 2 * se:
        short = f"{what}: RTN's gap is within 2 s.e., this run cannot show GPTQ closing it"
        long = (
            f"{what}: RTN's loss is within 2 standard errors of fp32's ({g:+.5f} +- {se:.5f} "
            f"nats per token; {numbers}): this run cannot show GPTQ closing a gap"
        )
        return long, False, short
    closed = gap_closed(ppl, rtn, gptq)
    if closed >= 1:
        short = f"{what}: GPTQ closes all ({100 * closed:.0f}%) of RTN's perplexity gap to fp32"
    elif closed >= 0.5:
        short = f"{what}: GPTQ closes {100 * closed:.0f}% of RTN's perplexity gap to fp32"
    elif closed > 0:
        short = f"{what}: GPTQ closes only {100 * closed:.0f}% of RTN's gap to fp32"
    else:
        short = f"{what}: GPTQ did not beat RTN in this run"
    return f"{short} ({numbers}; RTN's gap {g / se:.1f} standard errors)", closed >= 0.5, short


def tradeoff_title(table: dict, gaps: dict) -> str:
    """The trade-off figure's message, from the numbers."""
    ppl = {k: v["perplexity"] for k, v in table.items()}
    first = (
        f"int8 costs {100 * (ppl['int8'] / ppl['fp32'] - 1):+.2f}% perplexity at "
        f"{table['int8']['linear_bits_per_param']:.2f} bits per parameter, "
        f"NF4 {100 * (ppl['nf4'] / ppl['fp32'] - 1):+.2f}% at "
        f"{table['nf4']['linear_bits_per_param']:.2f}"
    )
    lines = [gptq_sentence(table, gaps, pair)[2] for pair in GPTQ_PAIRS]
    return "\n".join([first, *lines])


def quantization_claims(results: dict) -> dict:
    """The claims, worded from the numbers."""
    claims = {}
    p = results["parity"]
    if "nf4_packed_bytes_identical" in p:
        n = p["layers"]
        same = p["nf4_packed_bytes_identical"] == n and p["nf4_absmax_identical"] == n
        claims["nf4_bit_exact"] = claim(
            f"NF4 packed bytes and absmax equal bitsandbytes' quantize_4bit in "
            f"{min(p['nf4_packed_bytes_identical'], p['nf4_absmax_identical'])} of {n} layers; "
            f"codebook max error {p['nf4_codebook_max_err']:.1e}",
            same and p["nf4_codebook_max_err"] <= 1e-7,
            layers=n,
        )
    b = results["bytes"]
    claims["bytes_match_formula"] = claim(
        "measured bytes of every quantized tensor "
        + ("equal" if b["all_equal"] else "do NOT all equal")
        + f" formula (8); NF4 + double quant stores {b['nf4_dq']['bits_per_param']:.3f} bits "
        f"per parameter vs {b['nf4']['bits_per_param']:.3f} for NF4",
        b["all_equal"] and b["nf4_dq"]["bits_per_param"] < b["nf4"]["bits_per_param"],
    )
    ppl = {k: v["perplexity"] for k, v in results["table"].items()}
    for pair, (rtn, gptq) in GPTQ_PAIRS.items():
        text, held, _ = gptq_sentence(results["table"], results["loss_gaps"], pair)
        closed = gap_closed(ppl, rtn, gptq)
        claims[f"gptq_closes_half_the_gap_{pair}"] = claim(
            text, held, gap_closed=closed if math.isfinite(closed) else None
        )
    r = results["gptq_random"]
    claims["gptq_beats_rtn_on_random"] = claim(
        f"on a random {r['shape'][0]}x{r['shape'][1]} layer GPTQ's output error is "
        f"{r['output_rel_err_gptq']:.4f} vs RTN's {r['output_rel_err_rtn']:.4f}"
        + ("" if r["output_rel_err_gptq"] < r["output_rel_err_rtn"] else " (not smaller)"),
        r["output_rel_err_gptq"] < r["output_rel_err_rtn"],
    )
    lin = results["linear_speed"]
    b1, bn = lin[f"batch_{lin['batches'][0]}"], lin[f"batch_{lin['batches'][-1]}"]
    wo, dyn = b1["speedup_vs_fp32"]["int8"], bn["speedup_vs_fp32"]["int8_dynamic"]
    claims["weight_only_int8_slower_here"] = claim(
        f"weight-only int8 runs at {wo['median']:.2f}x fp32's speed at batch "
        f"{lin['batches'][0]} ({wo['min']:.2f}-{wo['max']:.2f}x): "
        + (
            "slower, the int8 -> fp32 conversion costs more than the bytes saved"
            if wo["max"] < 1
            else "this run did not show it clearly slower"
        ),
        wo["max"] < 1,
    )
    claims["dynamic_int8_faster"] = claim(
        f"dynamic int8 (int8 x int8 matmul) runs {dyn['median']:.2f}x fp32's speed at batch "
        f"{lin['batches'][-1]} ({dyn['min']:.2f}-{dyn['max']:.2f}x)"
        + ("" if dyn["min"] > 1 else "; this run did not show it faster throughout"),
        dyn["min"] > 1,
    )
    return claims


# =============================================================================
# 5. Figures (one function per figure, each returns the Figure)
# =============================================================================

COLOURS = {
    "fp32": "black",
    "bf16": "grey",
    "int8": "tab:blue",
    "int4": "tab:red",
    "int4_gptq": "tab:orange",
    "int4_pc": "tab:brown",
    "int4_pc_gptq": "tab:pink",
    "nf4": "tab:green",
    "nf4_dq": "tab:olive",
    "int8_dynamic": "tab:purple",
}


def plot_codebook(weights: dict) -> plt.Figure:
    """NF4's 16 levels on the weights of the model, scaled by their block absmax, next to the
    16 evenly spaced levels of int4 for the same block."""
    block_values = torch.cat(
        [
            (w.reshape(-1, 64) / w.reshape(-1, 64).abs().amax(1, keepdim=True))
            for w in weights.values()
        ]
    ).flatten()
    nf4 = nf4_codebook().tolist()
    uniform = torch.linspace(-1, 1, 16).tolist()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, levels, name in (
        (axes[0], nf4, "NF4 (normal quantiles)"),
        (axes[1], uniform, "int4 (uniform grid, drawn for a block spanning -absmax..absmax)"),
    ):
        ax.hist(
            block_values.numpy(),
            bins=200,
            density=True,
            color="lightsteelblue",
            label="model weights / block absmax (block 64)",
        )
        for i, v in enumerate(levels):
            ax.axvline(v, color="tab:red", lw=1, label="the 16 levels" if i == 0 else None)
        ax.set_title(name)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the data
        ax.set_xlabel("weight / absmax of its block")
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("density")
    gaps = [b - a for a, b in itertools.pairwise(nf4)]
    fig.suptitle(
        f"NF4 spaces its levels {max(gaps) / min(gaps):.1f}x closer near 0 than in the tails, "
        "where normal weights are dense; int4 spaces them evenly"
    )
    fig.tight_layout()
    return fig


def plot_error_histograms(errors: dict) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    stds = {}
    for name, e in errors.items():
        stds[name] = e.std().item()
        ax.hist(
            e.numpy(),
            bins=200,
            range=(-1, 1),
            histtype="step",
            color=COLOURS[name],
            label=f"{LABELS[name]}: std {stds[name]:.3f}",
            log=True,
        )
    ax.set_xlabel("weight error (W_hat - W) / std(W) of its layer")
    ax.set_ylabel("count (log)")
    ax.legend(fontsize=8, loc="upper right")
    best, worst = min(stds, key=stds.get), max(stds, key=stds.get)
    ax.set_title(
        f"Weight error: {LABELS[best]} smallest (std {stds[best]:.3f}),\n"
        f"{LABELS[worst]} largest ({stds[worst]:.3f}), in units of each layer's weight std"
    )
    fig.tight_layout()
    return fig


def plot_tradeoff(table: dict, gaps: dict, title: str) -> plt.Figure:
    """Perplexity vs bits per parameter; the bars are +-2 standard errors of each scheme's
    paired loss difference to fp32 (how far apart two schemes must be to be told apart)."""
    fig, ax = plt.subplots(figsize=(11, 5))
    seen: dict = collections.Counter()  # schemes at the same bits are drawn side by side
    for name, row in table.items():
        k = seen[round(row["linear_bits_per_param"], 1)]
        seen[round(row["linear_bits_per_param"], 1)] += 1
        ax.errorbar(
            row["linear_bits_per_param"] * 1.025**k,
            row["perplexity"],
            yerr=2 * gaps[name]["stderr"] * row["perplexity"],  # d ppl = ppl d loss
            fmt="o",
            color=COLOURS[name],
            capsize=4,
            label=f"{LABELS[name]}: {row['perplexity']:.3f}",
            zorder=3,
        )
    ax.axhline(table["fp32"]["perplexity"], color="black", ls="--", lw=1, label="fp32 level")
    ax.set_xscale("log", base=2)
    ax.set_xticks([4, 4.5, 8, 16, 32], ["4", "4.5", "8", "16", "32"])
    ax.set_xlabel(
        "bits per parameter of the linear layers (log scale; equal bits drawn side by side)"
    )
    ax.set_ylabel("validation perplexity (bars: +-2 s.e. of the gap to fp32)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # off the data
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_layer_error(errors: dict) -> plt.Figure:
    names = list(next(iter(errors.values())))
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(names) + 3), 4.8))
    width = 0.8 / len(errors)
    for i, (scheme, e) in enumerate(errors.items()):
        ax.bar(
            [j + i * width for j in range(len(names))],
            [e[n] for n in names],
            width,
            color=COLOURS[scheme],
            label=LABELS[scheme],
        )
    short = [
        n.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for n in names
    ]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], short, rotation=70, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("relative RMSE ||W_hat - W|| / ||W|| (log)")
    ax.legend(fontsize=8, ncol=3, loc="upper left", bbox_to_anchor=(0, -0.3))
    mean = {s: statistics.mean(e.values()) for s, e in errors.items()}
    gptq = "larger" if mean["int4_gptq"] > mean["int4"] else "not larger"
    ax.set_title(
        f"Per-layer weight error, mean: int8 {mean['int8']:.4f}, int4 RTN {mean['int4']:.3f}, "
        f"NF4 {mean['nf4']:.3f};\nGPTQ's ({mean['int4_gptq']:.3f}) is {gptq} than RTN's: "
        "it minimises the layer's output error, not the weights'"
    )
    fig.tight_layout()
    return fig


def plot_outliers(outliers: dict) -> plt.Figure:
    act = outliers["worst_act_absmax"]
    col = outliers["worst_weight_col_absmax"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    axes[0].bar(range(len(act)), act, color="tab:purple", width=1.0)
    axes[0].set_xlabel("input channel")
    axes[0].set_ylabel("max |activation| over the calibration tokens")
    axes[0].set_title(f"activations into {outliers['worst_layer']}", fontsize=9)
    axes[1].bar(range(len(col)), col, color="tab:blue", width=1.0)
    axes[1].set_xlabel("input channel")
    axes[1].set_ylabel("max |weight| in the column")
    axes[1].set_title("its weights, per input channel", fontsize=9)
    layer = outliers["layers"][outliers["worst_layer"]]
    e = outliers["output_rel_err"]
    fig.suptitle(
        f"Largest activation {layer['act_max_over_median']:.1f}x its layer's median channel; "
        f"int8 output error {e['int8_per_tensor']:.4f} with one scale per tensor, "
        f"{e['int8_per_channel']:.4f} per channel",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


# =============================================================================
# 6. Main
# =============================================================================

SIZES = {
    "quick": {
        "fallback": {  # the model trained through training.train when no model.pt is given
            "model": {
                "d_model": 64,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "hidden_dim": 128,
            },
            "train": {
                "steps": 30,
                "batch_size": 8,
                "seq_len": 32,
                "warmup_steps": 5,
                "eval_every": 30,
                "lr": 6e-3,
            },
            "val_windows": 16,
        },
        "val_windows": 16,
        "calib_windows": 8,
        "random_layer": (64, 128, 512),
        "decode_prompt": 8,
        "linear": (512, 512),
        "batches": [1, 64],
        "rounds": 2,
        "min_run_time": 0.02,
    },
    "default": {
        "fallback": {
            "model": {
                "d_model": 128,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "hidden_dim": 384,
            },
            "train": {
                "steps": 150,
                "batch_size": 16,
                "seq_len": 64,
                "warmup_steps": 15,
                "eval_every": 150,
                "lr": 6e-3,
            },
            "val_windows": 64,
        },
        "val_windows": 64,
        "calib_windows": 32,
        "random_layer": (256, 512, 4096),
        "decode_prompt": 32,
        "linear": (2048, 2048),
        "batches": [1, 64],
        "rounds": 3,
        "min_run_time": 0.1,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser()
    parser.add_argument(
        "--model",
        type=training.trained_model_dir,
        default=None,
        metavar="DIR",
        help="folder with training.py's model.pt (default: docs/figures/training if it has one,"
        " else a small model is trained here; --quick always trains one)",
    )
    return parse_flags(parser, argv)


def print_model(info: dict) -> None:
    c = info["config"]
    print(
        f"  {info['source']}\n  {c['n_layers']} layers, d_model {c['d_model']}, "
        f"{info['parameters']:,} parameters; {info['val_windows']} validation windows "
        f"({info['val_tokens']:,} tokens)"
    )


def print_parity(p: dict) -> None:
    n = p["layers"]
    print(
        f"  int8 = gpt-fast formula in {p['int8_equal_gpt_fast_formula']}/{n} layers, int4 in "
        f"{p['int4_equal_gpt_fast_formula']}/{n}, nibble round trips {p['nibble_round_trips']}/{n}"
    )
    if "bitsandbytes" in p:
        print(f"  bitsandbytes {p['bitsandbytes']}")
        return
    print(
        f"  NF4 vs bitsandbytes: codebook max err {p['nf4_codebook_max_err']:.1e}, packed bytes "
        f"identical {p['nf4_packed_bytes_identical']}/{n}, absmax identical "
        f"{p['nf4_absmax_identical']}/{n}, dequantize max err {p['nf4_dequantize_max_err']:.1e}"
    )
    print(
        f"  double quant codes = bitsandbytes' {100 * p['double_quant_codes_agree']:.1f}% "
        f"(ours at least as near as theirs: {100 * p['double_quant_codes_never_farther']:.1f}%;"
        " its CPU kernel's search is approximate near midpoints)"
    )


def print_bytes(b: dict) -> None:
    for scheme in SCHEMES:
        r = b[scheme]
        print(
            f"  {LABELS[scheme]:<22} {r['measured']:>10,} bytes (formula {r['formula']:,}), "
            f"{r['bits_per_param']:.3f} bits/param"
        )


def print_gptq(r: dict) -> None:
    print(
        f"  random {r['shape'][0]}x{r['shape'][1]} layer, {r['tokens']} tokens: output rel err "
        f"RTN {r['output_rel_err_rtn']:.4f}, GPTQ {r['output_rel_err_gptq']:.4f} (weights "
        f"{r['weight_rel_err_rtn']:.4f} vs {r['weight_rel_err_gptq']:.4f})"
    )


def print_table(table: dict, gaps: dict) -> None:
    head = f"{'scheme':<22} {'perplexity':>10} {'loss - fp32 (+- s.e.)':>22} {'bits/byte':>9}"
    print(f"  {head} {'bits/param':>10} {'bytes':>11}")
    for name, r in table.items():
        g = gaps[name]
        print(
            f"  {LABELS[name]:<22} {r['perplexity']:>10.3f} {g['loss_gap']:>+13.5f} +- "
            f"{g['stderr']:.5f} {r['bits_per_byte']:>9.4f} {r['linear_bits_per_param']:>10.3f} "
            f"{r['model_bytes']:>11,}"
        )
    for pair in GPTQ_PAIRS:
        g = gaps[f"gptq_minus_rtn_{pair}"]
        print(
            f"  GPTQ - RTN loss, {pair.replace('64', ' 64').replace('_', ' ')}, same tokens: "
            f"{g['loss_gap']:+.5f} +- {g['stderr']:.5f} nats"
        )


def print_outliers(o: dict) -> None:
    layer = o["layers"][o["worst_layer"]]
    e = o["output_rel_err"]
    print(
        f"  strongest activation outlier: {o['worst_layer']} channel {layer['act_top_channel']},"
        f" {layer['act_max_over_median']:.1f}x the median channel (weights "
        f"{layer['weight_max_over_median']:.1f}x)"
    )
    print(
        f"  its output error: int8 per tensor {e['int8_per_tensor']:.4f}, per channel "
        f"{e['int8_per_channel']:.4f}, int4 group 64 {e['int4_group64']:.4f}"
    )


def print_speed(decode: dict, lin: dict) -> None:
    print(f"  decode step (batch 1, KV cache at {decode['prompt_len']}), median (min-max):")
    for name, s in decode["ms"].items():
        print(
            f"  {LABELS[name]:<26} {s['median']:7.3f} ms ({s['min']:.3f}-{s['max']:.3f}), "
            f"reads {decode['bytes_read'][name]:>10,} bytes, "
            f"{decode['speedup_vs_fp32'][name]:.2f}x fp32's speed"
        )
    for b in lin["batches"]:
        r = lin[f"batch_{b}"]["speedup_vs_fp32"]
        cells = ", ".join(f"{n} {s['median']:.2f}x" for n, s in r.items() if n != "fp32")
        print(f"  one {lin['shape'][0]}x{lin['shape'][1]} linear, batch {b}: {cells} fp32")


def quantization_figures(model: nn.Module, models: dict, weights: dict, results: dict) -> dict:
    return {
        "codebook": plot_codebook(weights),
        "error_histograms": plot_error_histograms(weight_errors(model, models)),
        "tradeoff": plot_tradeoff(
            results["table"],
            results["loss_gaps"],
            tradeoff_title(results["table"], results["loss_gaps"]),
        ),
        "layer_error": plot_layer_error(results["layer_error"]),
        "outliers": plot_outliers(results["outliers"]),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if resolve_device(args.device).type != "cpu":
        print(f"--device {args.device}: quantization.py computes on the CPU (its int8 kernels)")
    device = torch.device("cpu")  # the quantized kernels measured here are CPU ones
    torch.set_num_threads(1)
    cfg = SIZES["quick" if args.quick else "default"]
    results: dict = {"meta": run_meta(args, device)}
    n = 7
    print(f"[1/{n}] loading the model ...")
    model_dir = args.model or (None if args.quick else training.DEFAULT_MODEL_DIR)
    model, data, windows, results["model"] = training.load_trained_model(
        model_dir, cfg["fallback"], args.seed
    )
    print_model(results["model"])
    print(f"[2/{n}] checking parity with bitsandbytes and gpt-fast's formulas ...")
    weights = {
        k: m.weight.detach()
        for k, m in model.named_modules()
        if isinstance(m, nn.Linear) and not k.endswith("lm_head")
    }
    results["parity"] = check_quantizer_parity(weights, bitsandbytes_functional())
    print_parity(results["parity"])
    print(f"[3/{n}] measuring bytes, and GPTQ vs RTN on a random layer ...")
    results["bytes"] = measure_bytes(model)
    print_bytes(results["bytes"])
    results["gptq_random"] = gptq_on_random(*cfg["random_layer"], seed=args.seed)
    print_gptq(results["gptq_random"])
    print(f"[4/{n}] calibrating, quantizing and evaluating every scheme ...")
    calib = calibrate(
        model, calibration_ids(data["train"], windows, cfg["calib_windows"], args.seed)
    )
    models = build_models(model, calib)
    results["table"], losses = evaluate_models(models, windows, data["token_bytes"])
    results["loss_gaps"] = paired_gaps(losses)
    print_table(results["table"], results["loss_gaps"])
    results["layer_error"] = layer_errors(model, models)
    results["layer_error_mean"] = mean_layer_errors(results["layer_error"])
    print(f"[5/{n}] finding outliers ...")
    results["outliers"] = measure_outliers(model, calib)
    print_outliers(results["outliers"])
    print(f"[6/{n}] timing decode steps and one linear layer ...")
    models["int8_dynamic"] = dynamic_int8_model(model)
    results["decode"] = benchmark_decode(
        models, cfg["decode_prompt"], cfg["rounds"], cfg["min_run_time"]
    )
    results["linear_speed"] = benchmark_linear(
        *cfg["linear"], cfg["batches"], cfg["rounds"], cfg["min_run_time"]
    )
    print_speed(results["decode"], results["linear_speed"])
    results["claims"] = quantization_claims(results)
    print_claims(results["claims"])
    print(f"[7/{n}] drawing figures ...")
    figures = quantization_figures(model, models, weights, results)
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
