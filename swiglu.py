"""SwiGLU: the gated feed-forward layer of Llama, against ReLU/GELU at equal parameter count.

The problem
-----------
Every transformer block ends in a position-wise feed-forward network (FFN). The original one
(Vaswani et al. 2017) is two matrices with a ReLU between them, hidden size 4 d. A ReLU throws
away every negative pre-activation: its derivative is exactly 0 there, so at any moment about
half of the (token, unit) pairs pass no gradient, and a unit whose pre-activation is negative for
every token is "dead" (its input weights receive no gradient at all).

The idea
--------
Shazeer (2020) replaces the single activation by a *gated linear unit*: two parallel projections,
one passed through an activation and used as a gate that multiplies the other, element-wise.
With the Swish (SiLU) activation this is SwiGLU, used by PaLM, Llama 1/2/3, Mistral, Qwen and
DeepSeek. The gate is smooth, the product lets a unit flip sign and scale with its input, and
the third matrix is paid for by shrinking the hidden size from 4 d to 2/3 * 4 d = 8/3 d, so
parameters and FLOPs stay those of the ReLU FFN.

The math
--------
Activations (x a scalar, applied element-wise):
    ReLU(x)        = max(0, x)                           ReLU'(x) = 1[x > 0]
    GELU(x)        = x * Phi(x),  Phi = standard normal CDF     GELU'(x) = Phi(x) + x * phi(x)
    sigmoid(x)     = 1 / (1 + exp(-x))
    Swish_b(x)     = x * sigmoid(b x)       (Ramachandran et al. 2017; b = 1 is SiLU)
    SiLU'(x)       = sigmoid(x) * (1 + x * (1 - sigmoid(x)))
Swish_0(x) = x / 2 (linear); Swish_b(x) -> ReLU(x) as b -> infinity. SiLU is not monotone: its
minimum is at x* with 1 + x*(1 - sigmoid(x*)) = 0, x* = -1.278..., where SiLU(x*) = x* + 1.

FFNs, x of shape (batch, seq_len, d_model), hidden size h, no biases. The numbers (1)-(8) are
this file's: (1) is Shazeer's eqs. 2-3, and (2)-(6) are the five lines of his eq. 6, the FFNs
built from the GLU variants of his eqs. 4-5.
(1) FFN_act(x)    = act(x W1) W2                       W1: (d, h), W2: (h, d)   params 2 d h
(2) FFN_GLU(x)    = (sigmoid(x W) * x V) W2            W, V: (d, h), W2: (h, d)  params 3 d h
(3) FFN_Bilinear  = (x W * x V) W2
(4) FFN_ReGLU     = (ReLU(x W) * x V) W2
(5) FFN_GEGLU     = (GELU(x W) * x V) W2
(6) FFN_SwiGLU    = (Swish_1(x W) * x V) W2
Names used here (Hugging Face LlamaMLP): W -> gate_proj, V -> up_proj, W2 -> down_proj
(Meta's llama/model.py FeedForward: w1 = gate, w3 = up, w2 = down). For the ungated FFN,
W1 -> up_proj and W2 -> down_proj (T5: wi, wo).

(7) Parameter matching: 3 d h_gated = 2 d h  =>  h_gated = 2/3 h = 8/3 d for h = 4 d. This script
rounds 2/3 h to the nearest integer and picks d divisible by 3, so the match is exact.
Llama's rule (Meta's llama/model.py): h = int(2/3 * 4 d); h = int(ffn_dim_multiplier * h) if a
multiplier is given; then round *up* to a multiple of `multiple_of` (hardware-friendly sizes).
Llama-2-7B: d 4096, multiple_of 256 -> 11008 (2.69 d, not 2.67 d).

(8) FLOPs per token: 2 FLOPs per multiply-add, so 2 * (number of weights) for the matmuls:
4 d h ungated, 6 d h gated (equal at matched h), plus h for the gate product. The activation's own
cost (1 op for ReLU, a dozen for GELU/SiLU) is not counted; the timings show it.

The experiments (what the script measures, in order):
1. Activations and their derivatives; the SwiGLU gate surface silu(a) * b next to relu(a) * b.
2. Llama's rule against the published sizes 11008, 14336, 28672.
3. One FFN layer of each kind at equal parameters: parameters and FLOPs (formula, checked
   against the modules), forward and forward+backward speed relative to the ReLU FFN (median
   and spread over interleaved timing rounds).
4. Gradient flow through a 24-layer pre-norm residual stack of each FFN kind, at init and
   after a few Adam steps (torch.optim.Adam): per-layer gradient norms, the share of
   exactly-zero derivatives and of dead units (zero gradient from every input). The steps use
   the training comparison's learning rate (Adam, 1e-2) and the task has only vocab^2 distinct
   inputs, so a ReLU unit that a few large updates push negative for all of them stays dead.
5. Training at equal parameters on a task the script generates: predict the next token from
   the two previous ones, where every pair has its own random next-token distribution. Why this
   task: it isolates what an FFN does in a language model (a learned associative memory from a
   context representation to next-token logits), it needs the *interaction* of the two tokens
   (their embeddings are summed, so without an FFN the model stays far from the optimum), and
   its best possible loss (the table's entropy) is known exactly, so the loss above that floor
   is what each FFN failed to learn. The loss is evaluated exactly over all contexts (no
   sampling noise); every run (a seed of a variant) draws its own initialisation and batches,
   so runs are independent. Every variant gets the same optimiser (Adam, lr 1e-2 with cosine
   decay), not tuned per variant. "Better than ReLU on every seed" means its worst seed ends
   below ReLU's best seed; with no real difference that happens by chance with probability
   1 / C(2n, n) for n seeds each (0.05 for the default 3, 0.17 for 2), which the script prints
   next to the verdict; the claim counts as shown only when that chance is at most 0.05.
   Why it can differ from Shazeer (T5-base, 65k steps, C4 span corruption): a tiny model,
   hundreds of steps (early-training speed, not the converged quality), no attention, and a
   task made of pure pairwise interactions, where any multiplicative unit (even Bilinear, with
   no nonlinearity in its gate) has a built-in advantage. Read the result as "what a gate buys
   on this task at this scale", with the seed spread as its error bar.

Where it is used
----------------
SwiGLU: PaLM, LLaMA 1/2/3, Mistral/Mixtral, Qwen, DeepSeek-V2/V3 (expert and dense FFNs).
GEGLU: T5 v1.1, Gemma. ReLU FFN: original Transformer, T5 v1.0. GELU FFN: BERT, GPT-2/3.

Run it
------
    uv run python swiglu.py              # default sizes (run time: README, measured)
    uv run python swiglu.py --quick      # small sizes (writes figures/swiglu/quick/)
    uv run python swiglu.py --out DIR --no-show --device cpu --seed 0 --seeds 5 --steps 1000

It prints each check and measurement and the claims they bear out (or not), then saves every
figure as PNG and every printed number in ``results.json`` under ``--out`` (default
``figures/swiglu/``), all at once at the end.

References
----------
- Shazeer, "GLU Variants Improve Transformer", 2020, arXiv 2002.05202 (section 2, eqs. 4-6:
  the GLU variants and their FFNs; section 3, table 1: log-perplexity after 65k steps, T5-base).
- Vaswani et al., "Attention Is All You Need", 2017, arXiv 1706.03762 (the ReLU FFN, 4 d).
- Geva et al., "Transformer Feed-Forward Layers Are Key-Value Memories", 2021,
  arXiv 2012.14913 (why the training task here is an associative memory).
- Dauphin et al., "Language Modeling with Gated Convolutional Networks", 2016, arXiv 1612.08083
  (the GLU).
- Ramachandran et al., "Searching for Activation Functions", 2017, arXiv 1710.05941
  (Swish); Hendrycks and Gimpel, "Gaussian Error Linear Units", 2016, arXiv 1606.08415.
- Touvron et al., "LLaMA", 2023, arXiv 2302.13971; "Llama 2", 2023, arXiv 2307.09288;
  Llama Team, "The Llama 3 Herd of Models", 2024, arXiv 2407.21783.
- Reference code: huggingface/transformers ``src/transformers/models/llama/modeling_llama.py``
  (``LlamaMLP``, tested equal here); meta-llama/llama ``llama/model.py`` (``FeedForward``, the
  hidden-size rule) and the ``params.json`` of each checkpoint (dim, multiple_of,
  ffn_dim_multiplier).

Contents
--------
2. Core: the activations (``relu``, ``sigmoid``, ``gelu``, ``swish``), ``llama_hidden_dim``,
   ``SwiGLUFeedForward`` (the headline), ``FeedForward`` (eq. 1), ``GatedFeedForward`` (eqs.
   2-6), ``matched_hidden_dim`` (eq. 7), ``make_ffn``; the validation helpers at the top.
3. Baselines and apparatus: ``RMSNorm``, ``ResidualFFNStack`` (a transformer without
   attention), ``PairTask`` (the generated task), the cost formulas ``ffn_param_count``,
   ``ffn_matmul_flops_per_token``, ``ffn_flops_per_token`` (eq. 8) and ``measured_matmul_flops``.
4. Experiments: ``check_activations``, ``check_gated_variants``, ``llama_sizes``,
   ``param_matched_table`` (timings), ``gradient_flow`` / ``gradient_flow_comparison``,
   ``training_comparison``, and ``swiglu_claims`` (the printed claims, computed from the numbers).
5. Figures: one ``plot_<png name>`` per figure; ``ffn_speed_title`` and friends word the titles.
6. Main: ``parse_args``, the ``print_<stage>`` helpers, ``main``.
7. Plumbing (identical in every script): timer, device, machine info, flags, saving.

Read first: ``SwiGLUFeedForward`` (the three lines Llama runs) and ``llama_hidden_dim``, then
``GatedFeedForward`` next to Shazeer's eq. 6 (this file's 2-6), then ``gradient_flow`` and
``PairTask``.
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
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# 2. Core: the activations, SwiGLUFeedForward, the gated family and the 8/3 d rule
# =============================================================================

# --- Validation at the door: the shared vocabulary, then this script's own helpers ------------


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


def _check_counts(**counts: int) -> None:
    """Every count (steps, a batch, layers of a stack) must be an integer (not a bool) >= 0."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} ({value!r}) must be an int")
        if value < 0:
            raise ValueError(f"{name} ({value}) must be >= 0")


def _check_bools(**flags: bool) -> None:
    """Every flag (bias, gated) must be a real bool: no 'yes', 1 or None standing in for one."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} ({value!r}) must be a bool")


def _check_ffn_choice(name: str, value, choices) -> None:
    """``activation ('tanh') must be one of 'relu', 'gelu', 'silu'``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} ({value!r}) must be a str")
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} ({value!r}) must be one of {valid}")


# --- Activations, written out from their definitions -------------------------------------------
# The modules below call torch's fused kernels (F.relu, F.gelu, F.silu, torch.sigmoid), as
# production code does; check_activations() tests these written-out forms against them.


def relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU(x) = max(0, x)."""
    _check_float_tensor("x", x)
    return torch.where(x > 0, x, torch.zeros_like(x))


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(x) = 1 / (1 + exp(-x)), the GLU gate of Dauphin et al."""
    _check_float_tensor("x", x)
    return 1.0 / (1.0 + torch.exp(-x))


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) = x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 (the exact form, not tanh)."""
    _check_float_tensor("x", x)
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def swish(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Swish_beta(x) = x * sigmoid(beta * x).  beta = 1 is SiLU (F.silu), beta = 0 is x / 2,
    beta -> infinity is ReLU: a smooth ReLU whose sharpness beta sets (any finite beta)."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta ({beta!r}) must be a real number")
    if not math.isfinite(beta):
        raise ValueError(f"beta ({beta}) must be finite")
    _check_float_tensor("x", x)
    return x * sigmoid(beta * x)


# The ungated FFN's activation (Vaswani: ReLU; BERT/GPT-2: GELU; SiLU for comparison).
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}

# Shazeer's gated family: variant name -> the activation applied to the gate x W.
GATE_ACTIVATIONS = {
    "glu": torch.sigmoid,  # (2) Dauphin et al. 2016
    "bilinear": lambda a: a,  # (3) no activation: a pure product of two linear maps
    "reglu": F.relu,  # (4)
    "geglu": F.gelu,  # (5)
    "swiglu": F.silu,  # (6) Swish_1 = SiLU
}
UNGATED = tuple(ACTIVATIONS)  # ('relu', 'gelu', 'silu')
GATED = tuple(GATE_ACTIVATIONS)  # ('glu', 'bilinear', 'reglu', 'geglu', 'swiglu')
VARIANTS = UNGATED + GATED


def _check_multiplier(ffn_dim_multiplier: float | None) -> None:
    if ffn_dim_multiplier is not None:
        _check_positive(ffn_dim_multiplier=ffn_dim_multiplier)


def llama_hidden_dim(
    d_model: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None
) -> int:
    """Llama's FFN hidden size: 2/3 of 4 d, times ffn_dim_multiplier, rounded up to multiple_of.

    Meta's llama/model.py truncates with int() at each step and then rounds up, so e.g.
    Llama-2-7B: int(2/3 * 16384) = 10922 -> 43 * 256 = 11008.
    """
    _check_sizes(d_model=d_model, multiple_of=multiple_of)
    _check_multiplier(ffn_dim_multiplier)
    hidden = int(2 * (4 * d_model) / 3)  # (7) the parameter-matching 2/3 of the classic 4 d
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)  # Llama 3 / Llama-2-70B widen it by 1.3
    if hidden < 1:
        raise ValueError(
            f"ffn_dim_multiplier ({ffn_dim_multiplier}) leaves no hidden unit for d_model "
            f"({d_model}): int(ffn_dim_multiplier * int(8/3 d)) must be >= 1"
        )
    return multiple_of * -(-hidden // multiple_of)  # ceil(hidden / multiple_of) * multiple_of


class SwiGLUFeedForward(nn.Module):
    """Llama's FFN: down_proj(silu(gate_proj(x)) * up_proj(x)), tested against HF ``LlamaMLP``.

    hidden_dim=None sizes it by Llama's rule (``llama_hidden_dim``); an explicit hidden_dim is
    used as is (it is HF's ``intermediate_size``). The state_dict keys are HF's:
    gate_proj.weight, up_proj.weight, down_proj.weight (+ .bias when bias=True, HF mlp_bias).
    Input and output: (batch, seq_len, d_model), or any (..., d_model).

    >>> ffn = SwiGLUFeedForward(d_model=96, multiple_of=32)  # Llama's rule: 8/3 * 96 = 256
    >>> ffn.hidden_dim
    256
    >>> ffn(torch.randn(2, 5, 96)).shape
    torch.Size([2, 5, 96])
    >>> sorted(ffn.state_dict())
    ['down_proj.weight', 'gate_proj.weight', 'up_proj.weight']
    """

    def __init__(
        self,
        d_model: int,
        hidden_dim: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if hidden_dim is None:
            hidden_dim = llama_hidden_dim(d_model, multiple_of, ffn_dim_multiplier)
        else:  # the sizing arguments are checked even when hidden_dim overrides them
            _check_sizes(d_model=d_model, hidden_dim=hidden_dim, multiple_of=multiple_of)
            _check_multiplier(ffn_dim_multiplier)
        _check_bools(bias=bias)
        self.d_model, self.hidden_dim = d_model, hidden_dim
        self.gate_proj = nn.Linear(d_model, hidden_dim, bias=bias)  # W (Meta: w1)
        self.up_proj = nn.Linear(d_model, hidden_dim, bias=bias)  # V (Meta: w3)
        self.down_proj = nn.Linear(hidden_dim, d_model, bias=bias)  # W2 (Meta: w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_float_tensor("x", x, self.d_model)
        # F.silu(a) == swish(a, beta=1) == a * sigmoid(a); checked in check_activations.
        gate = F.silu(self.gate_proj(x))  # (batch, seq_len, hidden_dim), in (-0.28, inf)
        return self.down_proj(gate * self.up_proj(x))  # (6) -> (batch, seq_len, d_model)


class FeedForward(nn.Module):
    """The classic FFN (1): down_proj(act(up_proj(x))), hidden size usually 4 d (Vaswani)."""

    def __init__(
        self, d_model: int, hidden_dim: int, activation: str = "relu", bias: bool = False
    ) -> None:
        super().__init__()
        _check_sizes(d_model=d_model, hidden_dim=hidden_dim)
        _check_ffn_choice("activation", activation, ACTIVATIONS)
        _check_bools(bias=bias)
        self.d_model, self.hidden_dim, self.activation = d_model, hidden_dim, activation
        self.act_fn = ACTIVATIONS[activation]
        self.up_proj = nn.Linear(d_model, hidden_dim, bias=bias)  # W1 (T5: wi)
        self.down_proj = nn.Linear(hidden_dim, d_model, bias=bias)  # W2 (T5: wo)

    def first_proj(self) -> nn.Linear:
        """The projection whose output goes through the activation (for dead-unit counting)."""
        return self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_float_tensor("x", x, self.d_model)
        # (1) (batch, seq_len, d_model) -> (batch, seq_len, hidden_dim) -> (batch, seq_len, d_model)
        return self.down_proj(self.act_fn(self.up_proj(x)))


class GatedFeedForward(nn.Module):
    """Shazeer's gated FFNs (2)-(6): down_proj(gate_act(gate_proj(x)) * up_proj(x)).

    variant: 'glu' (sigmoid gate), 'bilinear' (no activation), 'reglu', 'geglu', 'swiglu'.
    Three matrices instead of two, so at equal parameters hidden_dim is 2/3 of the ungated one.
    """

    def __init__(
        self, d_model: int, hidden_dim: int, variant: str = "swiglu", bias: bool = False
    ) -> None:
        super().__init__()
        _check_sizes(d_model=d_model, hidden_dim=hidden_dim)
        _check_ffn_choice("variant", variant, GATE_ACTIVATIONS)
        _check_bools(bias=bias)
        self.d_model, self.hidden_dim, self.variant = d_model, hidden_dim, variant
        self.act_fn = GATE_ACTIVATIONS[variant]
        self.gate_proj = nn.Linear(d_model, hidden_dim, bias=bias)  # W: the gate
        self.up_proj = nn.Linear(d_model, hidden_dim, bias=bias)  # V: the value being gated
        self.down_proj = nn.Linear(hidden_dim, d_model, bias=bias)  # W2

    def first_proj(self) -> nn.Linear:
        return self.gate_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_float_tensor("x", x, self.d_model)
        # gate and value: (batch, seq_len, hidden_dim) each; their product is the hidden state.
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # (2)-(6)


def _matched_hidden(d_model: int, variant: str, ungated_factor: int = 4) -> int:
    """(7) without the checks: ungated_factor * d ungated, round(2/3 of it) gated."""
    hidden = ungated_factor * d_model
    return hidden if variant in UNGATED else round(2 * hidden / 3)


def matched_hidden_dim(d_model: int, variant: str, ungated_factor: int = 4) -> int:
    """Hidden size at equal parameters (7): 4 d ungated, round(2/3 * 4 d) = round(8/3 d) gated."""
    _check_sizes(d_model=d_model, ungated_factor=ungated_factor)
    _check_ffn_choice("variant", variant, VARIANTS)
    return _matched_hidden(d_model, variant, ungated_factor)


def make_ffn(variant: str, d_model: int, hidden_dim: int | None = None, bias: bool = False):
    """One FFN of any variant, at the parameter-matched hidden size unless one is given.
    The FFN's constructor checks d_model, hidden_dim and bias: once, at its door."""
    _check_ffn_choice("variant", variant, VARIANTS)
    if hidden_dim is None and isinstance(d_model, numbers.Integral):
        hidden_dim = _matched_hidden(d_model, variant)
    if variant in UNGATED:
        return FeedForward(d_model, hidden_dim, variant, bias)
    return GatedFeedForward(d_model, hidden_dim, variant, bias)


# =============================================================================
# 3. Baselines and apparatus: a residual FFN stack, a task for it, cost formulas
# =============================================================================

FFN_LABELS = {
    "relu": "ReLU FFN",
    "gelu": "GELU FFN",
    "silu": "SiLU FFN",
    "glu": "GLU",
    "bilinear": "Bilinear",
    "reglu": "ReGLU",
    "geglu": "GEGLU",
    "swiglu": "SwiGLU",
    "none": "no FFN",
}


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


class ResidualFFNStack(nn.Module):
    """A transformer with the attention removed: h_{l+1} = h_l + FFN_l(RMSNorm(h_l)).

    Input: ``context_len`` token ids, each embedded with its own position's table and summed,
    (batch, context_len) -> (batch, d_model). Because the embeddings are *summed*, any
    interaction between the tokens (the next token depends on the pair, not on each alone)
    must be computed by the FFNs. Output: next-token logits (batch, vocab_size).
    n_layers = 0 gives the no-FFN baseline (embeddings -> RMSNorm -> head).
    """

    def __init__(
        self, variant: str, vocab_size: int, context_len: int, d_model: int, n_layers: int
    ) -> None:
        super().__init__()
        _check_ffn_choice("variant", variant, VARIANTS)
        _check_sizes(vocab_size=vocab_size, context_len=context_len, d_model=d_model)
        _check_counts(n_layers=n_layers)
        self.vocab_size, self.context_len = vocab_size, context_len
        self.embed = nn.Embedding(context_len * vocab_size, d_model)
        self.layers = nn.ModuleList(make_ffn(variant, d_model) for _ in range(n_layers))
        self.norms = nn.ModuleList(RMSNorm(d_model) for _ in range(n_layers))
        self.final_norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.layer_inputs: list[torch.Tensor] = []  # filled when record=True (gradient flow)

    def forward(self, x: torch.Tensor, record: bool = False) -> torch.Tensor:
        """x: token ids (batch, context_len), integers in [0, vocab_size)."""
        _check_context_ids(x, self.vocab_size, self.context_len)
        if x.device != self.head.weight.device:
            raise ValueError(
                f"x (on {x.device}) must be on the model's device, {self.head.weight.device}"
            )
        _check_bools(record=record)
        offsets = torch.arange(self.context_len, device=x.device) * self.vocab_size
        h = self.embed(x + offsets).sum(dim=1)  # (batch, context_len, d) -> (batch, d)
        self.layer_inputs = []
        for norm, ffn in zip(self.norms, self.layers, strict=True):
            normed = norm(h)
            if record:
                self.layer_inputs.append(normed)
            h = h + ffn(normed)  # the residual stream carries gradients past every FFN
        return self.head(self.final_norm(h))


def _check_context_ids(x: torch.Tensor, vocab_size: int, context_len: int) -> None:
    """Token ids: an integer tensor (batch, context_len) with every id in [0, vocab_size)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x (token ids) must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"x (token ids) dtype ({x.dtype}) must be an integer dtype")
    if x.dim() != 2 or x.shape[1] != context_len:
        raise ValueError(f"x (token ids, shape {tuple(x.shape)}) must be (batch, {context_len})")
    if x.numel() and x.device.type != "meta" and not 0 <= int(x.min()) <= int(x.max()) < vocab_size:
        raise ValueError(
            f"x (token ids in [{int(x.min())}, {int(x.max())}]) must be in [0, {vocab_size})"
        )


MAX_TABLE_ENTRIES = 2**24  # PairTask's limit: 16.8 M entries, 64 MiB of float32 probabilities


class PairTask:
    """Next token given the previous ``context_len`` tokens, from a random conditional table.

    p(y | context) = softmax(temperature * z[context]) with z standard normal: every context has
    its own, unrelated distribution, so the task is an associative memory (the role Geva et al.
    2021 found FFNs play in language models) that needs the tokens' *interaction*. The best
    possible loss is known exactly: the mean entropy of the table. Contexts are drawn uniformly.
    The table has vocab_size**context_len rows; sizes beyond MAX_TABLE_ENTRIES are refused.
    """

    def __init__(
        self, vocab_size: int, context_len: int = 2, temperature: float = 2.0, seed: int = 0
    ) -> None:
        _check_sizes(vocab_size=vocab_size, context_len=context_len)
        _check_positive(temperature=temperature)
        _check_seeds(seed=seed)
        # Decide from logarithms first: vocab_size**context_len can be an astronomical integer.
        log2_rows = context_len * math.log2(vocab_size)
        if log2_rows > 30 or vocab_size**context_len * (vocab_size + context_len) > (
            MAX_TABLE_ENTRIES
        ):
            raise ValueError(
                f"vocab_size ({vocab_size}) and context_len ({context_len}) need a table of "
                f"vocab_size**context_len x (vocab_size + context_len) = 2**{log2_rows:.1f} x "
                f"{vocab_size + context_len} entries, more than the limit {MAX_TABLE_ENTRIES:,}"
            )
        g = torch.Generator().manual_seed(seed)
        self.vocab_size, self.context_len = vocab_size, context_len
        n_contexts = vocab_size**context_len
        powers = vocab_size ** torch.arange(context_len - 1, -1, -1)  # most significant first
        # every context, as its digits in base vocab_size: (n_contexts, context_len)
        self.contexts = torch.arange(n_contexts)[:, None] // powers % vocab_size
        logits = temperature * torch.randn(n_contexts, vocab_size, generator=g)
        self.probs = logits.softmax(dim=-1)  # (n_contexts, vocab_size)
        self.entropy_floor = float(-(self.probs * self.probs.log()).sum(-1).mean())

    def sample(self, batch_size: int, generator: torch.Generator):
        """Uniform contexts and next tokens sampled from the table (fresh data every step)."""
        _check_counts(batch_size=batch_size)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        idx = torch.randint(len(self.contexts), (batch_size,), generator=generator)
        if batch_size == 0:  # an empty batch: nothing to sample (multinomial refuses 0 rows)
            return self.contexts[idx], torch.zeros(0, dtype=torch.long)
        targets = torch.multinomial(self.probs[idx], 1, generator=generator).squeeze(1)
        return self.contexts[idx], targets

    @torch.no_grad()
    def expected_loss(self, model: nn.Module, device) -> float:
        """Exact expected cross-entropy over all contexts and next tokens (no sampling noise)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        log_q = model(self.contexts.to(_ffn_device(device))).float().log_softmax(-1).cpu()
        return float(-(self.probs * log_q).sum(-1).mean())


def _check_seeds(**seeds: int) -> None:
    """Every seed must be an integer (not a bool) in [0, 2**63), the range --seed takes."""
    for name, value in seeds.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} ({value!r}) must be an int")
        if not 0 <= value < 2**63:
            raise ValueError(f"{name} ({value}) must be in [0, 2**63)")


def _ffn_device(device) -> torch.device:
    """A device name or torch.device, refused with its name when torch does not know it."""
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device ({device!r}) must be a str or torch.device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device ({device!r}) is not a device torch knows") from None


# --- Cost formulas (8) and a counter that checks them -------------------------------------------


def ffn_param_count(d_model: int, hidden_dim: int, gated: bool, bias: bool = False) -> int:
    """2 d h (+ h + d biases) ungated; 3 d h (+ 2 h + d biases) gated."""
    _check_sizes(d_model=d_model, hidden_dim=hidden_dim)
    _check_bools(gated=gated, bias=bias)
    n_in = 2 if gated else 1  # gate_proj and up_proj, or up_proj alone
    return (n_in + 1) * d_model * hidden_dim + (n_in * hidden_dim + d_model if bias else 0)


def ffn_matmul_flops_per_token(d_model: int, hidden_dim: int, gated: bool) -> int:
    """(8) 2 FLOPs per multiply-add: 4 d h ungated, 6 d h gated."""
    _check_sizes(d_model=d_model, hidden_dim=hidden_dim)
    _check_bools(gated=gated)
    return 2 * (3 if gated else 2) * d_model * hidden_dim


def ffn_flops_per_token(d_model: int, hidden_dim: int, gated: bool) -> int:
    """Matmul FLOPs plus the gate product (h multiplies); the activation itself not counted."""
    return ffn_matmul_flops_per_token(d_model, hidden_dim, gated) + (hidden_dim if gated else 0)


def measured_matmul_flops(module: nn.Module, x: torch.Tensor) -> int:
    """Matmul FLOPs of one forward, from the shapes each nn.Linear really sees: 2 * (tokens x
    in_features x out_features). (tests/test_swiglu.py checks the same against torch's
    FlopCounterMode.)"""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    _check_float_tensor("x", x)
    total = 0

    def count(linear: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += 2 * inputs[0].numel() * linear.out_features  # numel = tokens * in_features

    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(count) for m in linears]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


class _single_thread:
    """On CPU, run a block with one thread: the tiny matmuls of the training stages are
    dominated by thread synchronisation, which is slow (and erratic on a shared machine)."""

    def __init__(self, device) -> None:
        self.active = torch.device(device).type == "cpu"

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        if self.active:
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.saved)


# =============================================================================
# 4. Experiments: checks, timings, gradient flow, training, and the claims they bear out
# =============================================================================


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


def _autograd_derivative(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad


def swish_minimum(tol: float = 1e-12) -> tuple[float, float]:
    """Where SiLU is smallest: bisection on SiLU'(x) = sigmoid(x) (1 + x (1 - sigmoid(x))) = 0.

    At the root 1 - sigmoid(x*) = -1/x*, so SiLU(x*) = x* sigmoid(x*) = x* + 1.
    """
    _check_positive(tol=tol)
    lo, hi = -3.0, -0.5  # SiLU' < 0 at -3 and > 0 at -0.5
    for _ in range(200):  # 2.5 / 2**200: far below float resolution, so the loop always ends
        if hi - lo <= tol:
            break
        mid = 0.5 * (lo + hi)
        s = 1.0 / (1.0 + math.exp(-mid))
        if 1.0 + mid * (1.0 - s) < 0:  # sign of SiLU'(mid), as sigmoid > 0
            lo = mid
        else:
            hi = mid
    x_star = 0.5 * (lo + hi)
    return x_star, x_star / (1.0 + math.exp(-x_star))


def check_activations(n_points: int = 10001) -> dict:
    """Written-out activations equal torch's kernels; autograd derivatives equal closed forms."""
    _check_sizes(n_points=n_points)
    x = torch.linspace(-8, 8, n_points, dtype=torch.float64)
    phi = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)  # standard normal density
    s = sigmoid(x)
    x_star, silu_min = swish_minimum()
    return {
        "swish_beta1_vs_silu_max_abs_err": max_abs_err(swish(x, 1.0), F.silu(x)),
        "swish_beta0_vs_half_x_max_abs_err": max_abs_err(swish(x, 0.0), x / 2),
        "swish_beta20_vs_relu_max_abs_err": max_abs_err(swish(x, 20.0), F.relu(x)),
        "relu_vs_torch_max_abs_err": max_abs_err(relu(x), F.relu(x)),
        "gelu_vs_torch_max_abs_err": max_abs_err(gelu(x), F.gelu(x)),
        "sigmoid_vs_torch_max_abs_err": max_abs_err(s, torch.sigmoid(x)),
        "silu_derivative_vs_closed_form_max_abs_err": max_abs_err(
            _autograd_derivative(F.silu, x), s * (1 + x * (1 - s))
        ),
        "gelu_derivative_vs_closed_form_max_abs_err": max_abs_err(
            _autograd_derivative(F.gelu, x), 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * phi
        ),
        "silu_minimum_x": x_star,
        "silu_minimum_value": silu_min,
    }


def gated_formula(variant: str, x: torch.Tensor, W, V, W2) -> torch.Tensor:
    """(2)-(6), Shazeer's eq. 6 (2002.05202), written from the paper with the activations above.
    W, V: (h, d) and W2: (d, h) as stored by nn.Linear, so x W (paper) is x @ W.T here."""
    _check_ffn_choice("variant", variant, GATED)
    _check_float_tensor("x", x)
    _check_float_tensor("W", W, x.shape[-1])
    _check_float_tensor("V", V, x.shape[-1])
    _check_float_tensor("W2", W2, W.shape[0])
    if V.shape != W.shape:
        raise ValueError(f"V (shape {tuple(V.shape)}) must have W's shape {tuple(W.shape)}")
    a, b = x @ W.T, x @ V.T
    gate = {
        "glu": sigmoid,
        "bilinear": lambda t: t,
        "reglu": relu,
        "geglu": gelu,
        "swiglu": swish,
    }[variant](a)
    return (gate * b) @ W2.T


def check_gated_variants(d_model: int = 16, hidden_dim: int = 24, n_tokens: int = 64) -> dict:
    """Each GatedFeedForward variant equals its formula; SwiGLUFeedForward equals 'swiglu'."""
    _check_sizes(d_model=d_model, hidden_dim=hidden_dim, n_tokens=n_tokens)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n_tokens, d_model, generator=g, dtype=torch.float64)
    errs = {}
    for variant in GATED:
        ffn = GatedFeedForward(d_model, hidden_dim, variant).double()
        W, V, W2 = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
        with torch.no_grad():
            errs[variant] = max_abs_err(ffn(x), gated_formula(variant, x, W, V, W2))
    swiglu = SwiGLUFeedForward(d_model, hidden_dim).double()
    family = GatedFeedForward(d_model, hidden_dim, "swiglu").double()
    family.load_state_dict(swiglu.state_dict(), strict=True)
    with torch.no_grad():
        swiglu_err = max_abs_err(swiglu(x), family(x))
    return {
        "variant_vs_formula_max_abs_err": errs,
        "swiglu_ffn_vs_gated_family_max_abs_err": swiglu_err,
    }


# Published configurations, from each checkpoint's params.json (meta-llama on Hugging Face /
# meta-llama/llama and llama3 repositories) and the HF config's intermediate_size:
#   Llama-2-7B:  {"dim": 4096, "multiple_of": 256, "ffn_dim_multiplier": null}  -> 11008
#   Llama-3-8B:  {"dim": 4096, "multiple_of": 1024, "ffn_dim_multiplier": 1.3}  -> 14336
#   Llama-2-70B: {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3}  -> 28672
#   Llama-3-70B: {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3}  -> 28672
LLAMA_CONFIGS = {
    "Llama-2-7B": (4096, 256, None, 11008),
    "Llama-3-8B": (4096, 1024, 1.3, 14336),
    "Llama-2-70B": (8192, 4096, 1.3, 28672),
    "Llama-3-70B": (8192, 4096, 1.3, 28672),
}


def llama_sizes() -> dict:
    """Llama's hidden sizes from the rule, against the published ones, and what they cost."""
    rows = {}
    for name, (d_model, multiple_of, multiplier, published) in LLAMA_CONFIGS.items():
        hidden = llama_hidden_dim(d_model, multiple_of, multiplier)
        rows[name] = {
            "d_model": d_model,
            "multiple_of": multiple_of,
            "ffn_dim_multiplier": multiplier,
            "hidden_dim": hidden,
            "published_hidden_dim": published,
            "matches_published": hidden == published,
            "hidden_over_d_model": hidden / d_model,
            # parameters of the SwiGLU FFN relative to a ReLU FFN with hidden 4 d
            "params_ratio_to_relu_4d": ffn_param_count(d_model, hidden, True)
            / ffn_param_count(d_model, 4 * d_model, False),
        }
    return rows


def _speed_stats(base_ms: list[float], ms: list[float]) -> dict:
    """Speed relative to the baseline, round by round (base time / time: > 1 is faster):
    the median and the spread (min, max) over the rounds."""
    speeds = [b / t for b, t in zip(base_ms, ms, strict=True)]
    return {"median": float(np.median(speeds)), "lo": min(speeds), "hi": max(speeds)}


def _check_bench_variants(variants) -> None:
    if not isinstance(variants, tuple | list):
        raise TypeError(f"variants ({variants!r}) must be a tuple or list of variant names")
    for variant in variants:
        _check_ffn_choice("variants", variant, VARIANTS)
    if "relu" not in variants or len(set(variants)) != len(variants):
        raise ValueError(f"variants ({variants!r}) must include 'relu' (the baseline), once each")


def param_matched_table(
    d_model: int,
    n_tokens: int,
    device,
    min_run_time: float,
    rounds: int = 3,
    variants: tuple[str, ...] = VARIANTS,
) -> dict:
    """FFN variants at the matched hidden size: params and FLOPs (formula and counted), and
    forward and forward+backward speed relative to the ReLU FFN (hidden 4 d).

    Timing: ``rounds`` interleaved rounds over all variants (a burst of load on a shared machine
    then hurts one round, not one variant); each round gives every variant's speed relative to
    ReLU's in that same round, reported as the median and spread over rounds. While SwiGLU's
    forward+backward spread is wider than its distance from 1 (the effect), up to ``rounds``
    more rounds are run.
    """
    _check_sizes(d_model=d_model, n_tokens=n_tokens, rounds=rounds)
    _check_positive(min_run_time=min_run_time)
    _check_bench_variants(variants)
    device = _ffn_device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n_tokens, d_model, generator=g).to(device)  # (batch, seq_len, d_model)
    grad_out = torch.randn(1, n_tokens, d_model, generator=g).to(device)
    rows, timed = {}, {}
    for variant in variants:
        gated = variant in GATED
        hidden = matched_hidden_dim(d_model, variant)
        ffn = make_ffn(variant, d_model, hidden).to(device)

        def forward(ffn=ffn):
            with torch.inference_mode():
                ffn(x)

        def forward_backward(ffn=ffn):
            ffn.zero_grad(set_to_none=True)
            # = ffn(x).backward(grad_out), whose explicit gradient argument makes torch import
            # sympy (~2 s) on first use; the extra multiply-sum is d FLOPs per token.
            (ffn(x) * grad_out).sum().backward()

        timed[variant] = {"forward": forward, "fwd_bwd": forward_backward}
        rows[variant] = {
            "gated": gated,
            "hidden_dim": hidden,
            "hidden_over_d_model": hidden / d_model,
            "params": sum(p.numel() for p in ffn.parameters()),
            "params_formula": ffn_param_count(d_model, hidden, gated),
            "matmul_flops_per_token": ffn_matmul_flops_per_token(d_model, hidden, gated),
            "matmul_flops_per_token_counted": measured_matmul_flops(ffn, x) // n_tokens,
            "flops_per_token": ffn_flops_per_token(d_model, hidden, gated),
        }
    ms = {v: {"forward": [], "fwd_bwd": []} for v in variants}
    watched = "swiglu" if "swiglu" in variants else variants[-1]
    for done in range(2 * rounds):
        if done >= rounds:  # extra rounds only while the spread exceeds the effect
            s = _speed_stats(ms["relu"]["fwd_bwd"], ms[watched]["fwd_bwd"])
            if s["hi"] - s["lo"] <= abs(s["median"] - 1):
                break
        for variant, fns in timed.items():
            for key, fn in fns.items():
                ms[variant][key].append(1e3 * median_time_s(fn, min_run_time))
    base = rows["relu"]
    for variant, row in rows.items():
        row["params_ratio"] = row["params"] / base["params"]
        row["flops_ratio"] = row["flops_per_token"] / base["flops_per_token"]
        for key in ("forward", "fwd_bwd"):
            row[f"{key}_ms"] = float(np.median(ms[variant][key]))
            row[f"{key}_ms_rounds"] = ms[variant][key]
            stats = _speed_stats(ms["relu"][key], ms[variant][key])
            row[f"{key}_speed_vs_relu"] = stats["median"]
            row[f"{key}_speed_vs_relu_lo"] = stats["lo"]
            row[f"{key}_speed_vs_relu_hi"] = stats["hi"]
    return {
        "d_model": d_model,
        "n_tokens": n_tokens,
        "rounds": len(ms["relu"]["forward"]),
        "rounding": "gated hidden = round(2/3 * 4 d); d divisible by 3 makes it exact",
        "rows": rows,
    }


def _layer_grad_norms(model: ResidualFFNStack) -> list[float]:
    """L2 norm of the gradient of all parameters of each FFN layer: one number per layer."""
    norms = []
    for ffn in model.layers:
        squares = [p.grad.float().pow(2).sum() for p in ffn.parameters() if p.grad is not None]
        norms.append(float(torch.stack(squares).sum().sqrt()) if squares else 0.0)
    return norms


def _unit_stats(model: ResidualFFNStack) -> tuple[float, float]:
    """(dead-unit fraction, zero-derivative fraction) over all layers, after a backward pass.

    dead unit: a hidden unit whose input row in the first projection (up_proj ungated,
    gate_proj gated) gets exactly zero gradient from the loss over *every* input of the task
    (population_backward): the gradient can no longer move it; it revives only if the inputs
    it sees change. For ReLU that means a <= 0 for every input.
    zero derivative: an (input, unit) pair where act'(pre-activation) is exactly 0.
    """
    dead, units, zero_deriv, pairs = 0, 0, 0, 0
    for ffn, x in zip(model.layers, model.layer_inputs, strict=True):
        proj = ffn.first_proj()
        dead += int((proj.weight.grad == 0).all(dim=1).sum())
        units += proj.weight.shape[0]
        with torch.enable_grad():
            deriv = _autograd_derivative(ffn.act_fn, proj(x.detach()).detach())
        zero_deriv += int((deriv == 0).sum())
        pairs += deriv.numel()
    return dead / units, zero_deriv / pairs


def population_backward(model: ResidualFFNStack, task: PairTask, device) -> float:
    """Gradients (no update) of the exact expected loss over *every* context of the task,
    recording each FFN's input: a unit with zero gradient here is off for every input."""
    if not isinstance(model, ResidualFFNStack):
        raise TypeError(f"model must be a ResidualFFNStack, got {type(model).__name__}")
    if not isinstance(task, PairTask):
        raise TypeError(f"task must be a PairTask, got {type(task).__name__}")
    device = _ffn_device(device)
    log_q = model(task.contexts.to(device), record=True).log_softmax(-1)
    loss = -(task.probs.to(device) * log_q).sum(-1).mean()
    loss.backward()
    return float(loss.detach())


def _train_step(model, task, optimizer, batch_size, generator, device) -> None:
    """One minibatch of sampled next tokens: cross-entropy, its gradients, one Adam step."""
    context, targets = task.sample(batch_size, generator)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(context.to(device)), targets.to(device)).backward()
    optimizer.step()


def _check_run_args(steps, lr, batch_size, seed, device) -> torch.device:
    """The arguments gradient_flow and training_comparison share, checked at their door."""
    _check_counts(steps=steps)
    _check_sizes(batch_size=batch_size)
    _check_positive(lr=lr)
    _check_seeds(seed=seed)
    return _ffn_device(device)


def gradient_flow(
    variant: str,
    task: PairTask,
    d_model: int,
    n_layers: int,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device,
) -> dict:
    """Per-layer gradient norms, dead units and the exact expected loss of a deep stack, at
    init and after ``steps`` Adam steps (torch.optim.Adam, constant ``lr``)."""
    if not isinstance(task, PairTask):
        raise TypeError(f"task must be a PairTask, got {type(task).__name__}")
    device = _check_run_args(steps, lr, batch_size, seed, device)
    _check_sizes(n_layers=n_layers)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ResidualFFNStack(variant, task.vocab_size, task.context_len, d_model, n_layers)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    out = {}
    for stage in ("init", "trained"):
        if stage == "trained":
            for _ in range(steps):
                _train_step(model, task, optimizer, batch_size, generator, device)
        model.zero_grad(set_to_none=True)
        out[f"loss_{stage}"] = population_backward(model, task, device)  # exact expected loss
        out[f"grad_norm_{stage}"] = _layer_grad_norms(model)
        dead, zero = _unit_stats(model)
        out[f"dead_unit_fraction_{stage}"] = dead
        out[f"zero_derivative_fraction_{stage}"] = zero
    norms = out["grad_norm_init"]
    out["first_over_last_layer_grad_norm_init"] = norms[0] / norms[-1]
    out["max_over_min_layer_grad_norm_init"] = max(norms) / min(norms)
    return out


def smallest_in_most_layers(norms_by_variant: dict[str, list[float]]) -> dict:
    """Which variant has the smallest gradient norm in the most layers, and in how many."""
    names = list(norms_by_variant)
    per_layer = np.array([norms_by_variant[v] for v in names])  # (n_variants, n_layers)
    wins = np.bincount(per_layer.argmin(axis=0), minlength=len(names))
    best = names[int(wins.argmax())]
    return {
        "variant": best,
        "label": FFN_LABELS[best],
        "layers": int(wins.max()),
        "n_layers": per_layer.shape[1],
    }


def gradient_flow_comparison(
    d_model: int,
    n_layers: int,
    steps: int,
    lr: float,
    batch_size: int,
    vocab_size: int,
    seed: int,
    device,
) -> dict:
    """gradient_flow for every variant on one PairTask; which ends with the smallest norms, and
    how its loss then ranks."""
    task = PairTask(vocab_size, context_len=2, seed=seed)
    flow = {"n_layers": n_layers, "d_model": d_model, "steps": steps, "lr": lr, "variants": {}}
    with _single_thread(device):
        for variant in VARIANTS:
            flow["variants"][variant] = gradient_flow(
                variant, task, d_model, n_layers, steps, lr, batch_size, seed, device
            )
    trained = {v: r["grad_norm_trained"] for v, r in flow["variants"].items()}
    small = smallest_in_most_layers(trained)
    losses = {v: r["loss_trained"] for v, r in flow["variants"].items()}
    small["loss_rank"] = sorted(losses, key=losses.get).index(small["variant"]) + 1
    small["statement"] = trained_norms_statement(small, losses, steps, lr, math.log(vocab_size))
    flow["smallest_after_training"] = small
    return flow


def trained_norms_statement(
    small: dict, losses: dict[str, float], steps: int, lr: float, uniform: float
) -> str:
    """Which FFN keeps the smallest gradients after training, and whether its loss is also the
    lowest (``uniform``: the loss of a uniform guess, for scale): a small gradient means a flat
    loss there, not necessarily a low one."""
    variant, rank = small["variant"], small["loss_rank"]
    best = min(losses, key=losses.get)
    head = (
        f"After {steps} Adam steps (lr {lr:g}) the {small['label']}'s gradient norm is the "
        f"smallest in {small['layers']} of {small['n_layers']} layers"
    )
    if rank == 1:
        return f"{head}, and its loss, {losses[variant]:.3f} nats, is also the lowest"
    return (
        f"{head}, yet its loss ranks {rank} of {len(losses)} ({losses[variant]:.3f} nats; "
        f"lowest: {FFN_LABELS[best]}, {losses[best]:.3f}; a uniform guess: {uniform:.3f}): a "
        "small gradient is not a low loss"
    )


def _run_seed(seed: int, variant: str) -> int:
    """The seed of one training run: its own stream for every (seed, variant) pair. Runs of
    different variants then share neither the initialisation nor the sampled batches, so
    under "no real difference" their final losses are independent and exchangeable, which
    the chance level 1 / C(2n, n) assumes (runs sharing a seed would be paired instead)."""
    index = (*VARIANTS, "none").index(variant)
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)
    return int(state[0]) % 2**63


def _train_run(variant, task, d_model, n_layers, steps, lr, batch_size, seed, eval_every, device):
    """Adam on fresh samples each step, cosine decay to 0 (the final loss is then a property
    of the model, not of the step size); the exact expected loss every ``eval_every`` steps.
    ``seed`` seeds both the initialisation and the sampled batches."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    n_layers = 0 if variant == "none" else n_layers
    ffn = "relu" if variant == "none" else variant
    model = ResidualFFNStack(ffn, task.vocab_size, task.context_len, d_model, n_layers)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # lr * (1 + cos(pi * t / steps)) / 2 at step t + 1: from lr at the first step towards 0
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    eval_steps, losses = [0], [task.expected_loss(model, device)]
    for step in range(1, steps + 1):
        _train_step(model, task, optimizer, batch_size, generator, device)
        schedule.step()
        if step % eval_every == 0 or step == steps:
            eval_steps.append(step)
            losses.append(task.expected_loss(model, device))
    ffn_params = sum(p.numel() for p in model.layers.parameters())
    return {"steps": eval_steps, "losses": losses, "ffn_params": ffn_params}


# Shazeer 2020 (arXiv 2002.05202), table 1: log-perplexity on C4 after 65,536 steps, T5-base.
SHAZEER_T5_BASE_LOG_PPL = {"relu": 1.997, "swiglu": 1.944}


def training_comparison(
    d_model: int,
    n_layers: int,
    vocab_size: int,
    steps: int,
    lr: float,
    batch_size: int,
    seeds: list[int],
    eval_every: int,
    device,
) -> dict:
    """Every variant (and no FFN) on the same task, several seeds: mean and std of the losses."""
    if not isinstance(seeds, list | tuple) or not seeds:
        raise TypeError(f"seeds ({seeds!r}) must be a non-empty list of ints")
    _check_seeds(**{f"seeds[{i}]": s for i, s in enumerate(seeds)})
    _check_sizes(d_model=d_model, n_layers=n_layers, steps=steps, eval_every=eval_every)
    device = _check_run_args(steps, lr, batch_size, seeds[0], device)
    task = PairTask(vocab_size, context_len=2, seed=seeds[0])
    variants = {}
    for variant in (*VARIANTS, "none"):
        with _single_thread(device):
            run_seeds = [_run_seed(s, variant) for s in seeds]
            runs = [
                _train_run(
                    variant, task, d_model, n_layers, steps, lr, batch_size, s, eval_every, device
                )
                for s in run_seeds
            ]
        curves = np.array([r["losses"] for r in runs])  # (n_seeds, n_evals)
        final = curves[:, -1]
        ddof = 1 if len(seeds) > 1 else 0  # sample std (n - 1); 0 for a single seed
        variants[variant] = {
            "ffn_params": runs[0]["ffn_params"],
            "curve_mean": curves.mean(0).tolist(),
            "curve_std": curves.std(0, ddof=ddof).tolist(),
            "final_losses": final.tolist(),
            "final_loss_mean": float(final.mean()),
            "final_loss_std": float(final.std(ddof=ddof)),
            "excess_loss_mean": float(final.mean() - task.entropy_floor),
            "run_seeds": run_seeds,
        }
    ranked = sorted(VARIANTS, key=lambda v: variants[v]["final_loss_mean"])
    for rank, variant in enumerate(ranked, start=1):
        variants[variant]["rank"] = rank  # 1 = lowest mean final loss of the FFN variants
    relu = variants["relu"]
    # "Better than ReLU on every seed": its worst seed ends below ReLU's best seed. If the
    # variant made no difference, all 2n final losses (independent runs, see _run_seed) would
    # be exchangeable and this complete separation would happen by chance with probability
    # 1 / C(2n, n) (0.05 for 3 seeds each: the exact one-sided Mann-Whitney test), per
    # comparison.
    every_seed = [
        v
        for v in VARIANTS
        if v != "relu" and max(variants[v]["final_losses"]) < min(relu["final_losses"])
    ]
    return {
        "task": {
            "name": "next token from a random table p(y | two previous tokens)",
            "vocab_size": vocab_size,
            "context_len": task.context_len,
            "n_contexts": len(task.contexts),
            "entropy_floor_nats": task.entropy_floor,
            "uniform_loss_nats": math.log(vocab_size),
        },
        "d_model": d_model,
        "n_layers": n_layers,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seeds": list(seeds),
        "eval_steps": runs[0]["steps"],
        "variants": variants,
        "ranking": ranked,
        "better_than_relu_on_every_seed": every_seed,
        "chance_of_every_seed_if_no_difference": 1 / math.comb(2 * len(seeds), len(seeds)),
        "best_minus_relu_final_loss": variants[ranked[0]]["final_loss_mean"]
        - relu["final_loss_mean"],
        "swiglu_minus_relu_final_loss": variants["swiglu"]["final_loss_mean"]
        - relu["final_loss_mean"],
        "bilinear_minus_swiglu_final_loss": variants["bilinear"]["final_loss_mean"]
        - variants["swiglu"]["final_loss_mean"],
        "shazeer_t5_base_65k_log_perplexity": SHAZEER_T5_BASE_LOG_PPL,
    }


# --- Claims: sentences computed from the numbers ------------------------------------------------

SPEED_TOLERANCE = 1.2  # "about the same cost": speeds within 1.2x of each other either way


def ffn_speed_phrase(speed: float) -> str:
    """'1.06x faster than' / '1.03x slower than' / 'as fast as' (speed = base time / time)."""
    if round(speed, 2) == 1.0:
        return "as fast as"
    return f"{speed:.2f}x faster than" if speed > 1 else f"{1 / speed:.2f}x slower than"


def speed_claim(speed: float, lo: float, hi: float, rounds: int) -> dict:
    """Equal FLOPs should mean about equal time; say what the rounds showed."""
    measured = (
        f"At equal parameters and FLOPs, a SwiGLU forward+backward ran {ffn_speed_phrase(speed)} "
        f"the ReLU FFN's (median of {rounds} rounds; speed {lo:.2f}x-{hi:.2f}x across them)"
    )
    if 1 / SPEED_TOLERANCE <= lo and hi <= SPEED_TOLERANCE:
        verdict, held = f": the same cost within {SPEED_TOLERANCE}x, as equal FLOPs predict", True
    elif hi < 1 / SPEED_TOLERANCE or lo > SPEED_TOLERANCE:
        verdict, held = (
            f": more than {SPEED_TOLERANCE}x apart, which equal FLOPs do not predict",
            False,
        )
    else:
        verdict = f": too noisy in this run to show the same cost within {SPEED_TOLERANCE}x"
        held = False
    return claim(measured + verdict, held, speed=speed, speed_lo=lo, speed_hi=hi, rounds=rounds)


CHANCE_LEVEL = 0.05  # "shown": a result this run would give by chance at most 5% of the time


def seeds_needed(chance_level: float = CHANCE_LEVEL) -> int:
    """Fewest seeds per variant n whose complete separation, 1 / C(2n, n), is <= chance_level."""
    _check_positive(chance_level=chance_level)
    n = 1
    while 1 / math.comb(2 * n, n) > chance_level:  # C(2n, n) >= 2**n: ends for any level > 0
        n += 1
    return n


def every_seed_claim(finals: list[float], relu_finals: list[float], chance: float) -> dict:
    """SwiGLU below ReLU on every seed: its worst seed under ReLU's best, and that outcome
    rare by chance (<= CHANCE_LEVEL) if the FFNs made no difference."""
    n, below = len(finals), sum(f < min(relu_finals) for f in finals)
    diff = float(np.mean(finals) - np.mean(relu_finals))
    separated = max(finals) < min(relu_finals)
    held = separated and chance <= CHANCE_LEVEL
    if held:
        statement = (
            f"SwiGLU ended below the ReLU FFN on every seed: its worst of {n} seeds beat ReLU's "
            f"best (mean {diff:+.3f} nats; with no real difference the chance is {chance:.2f})"
        )
    elif separated:
        statement = (
            f"SwiGLU ended below the ReLU FFN on all {n} seeds (mean {diff:+.3f} nats), but with "
            f"{n} seeds each that happens by chance with probability {chance:.2f} even with no "
            f"real difference: too few seeds to show it (at most {CHANCE_LEVEL} needs "
            f"{seeds_needed()} or more)"
        )
    else:
        statement = (
            f"This run did not show SwiGLU below the ReLU FFN on every seed: {below} of {n} "
            f"SwiGLU seeds ended below ReLU's best (mean {diff:+.3f} nats, "
            f"{'lower' if diff < 0 else 'not lower'} on average; chance level {chance:.2f})"
        )
    return claim(
        statement, held, swiglu_minus_relu_final_loss=diff, seeds_below=below, n=n, chance=chance
    )


def dead_units_claim(dead: dict[str, float], steps: int, lr: float) -> dict:
    """ReLU units die during training while the smooth and gated FFNs keep theirs."""
    others = {v: d for v, d in dead.items() if v != "relu"}
    worst = max(others, key=others.get)
    held = dead["relu"] > others[worst]
    if held:
        rest = (
            f"at most {100 * others[worst]:.1f}% of any other FFN's"
            if others[worst] > 0
            else "and none of any other FFN's"
        )
        statement = (
            f"After {steps} Adam steps at lr {lr:g}, {100 * dead['relu']:.1f}% of the ReLU FFN's "
            f"hidden units are dead (zero gradient from every input), {rest}"
        )
    else:
        statement = (
            f"This run did not show ReLU units dying more than the others: after {steps} Adam "
            f"steps at lr {lr:g}, {100 * dead['relu']:.1f}% of the ReLU FFN's units are dead, "
            f"{100 * others[worst]:.1f}% of the {FFN_LABELS[worst]}'s"
        )
    return claim(statement, held, relu=dead["relu"], max_other=others[worst], max_other_ffn=worst)


def flat_init_claim(spread: float, n_layers: int) -> dict:
    """Pre-norm residual stacks pass gradients to every layer alike at initialisation."""
    held = spread < 2.0
    if held:
        statement = (
            f"At initialisation each FFN's per-layer gradient norms agree within {spread:.2f}x "
            f"across the {n_layers} layers of this pre-norm residual stack: no layer's gradient "
            "vanishes with depth"
        )
    else:
        statement = (
            f"At initialisation the per-layer gradient norms differ by up to {spread:.2f}x "
            f"across {n_layers} layers, so this run does not show them flat with depth"
        )
    return claim(statement, held, max_over_min=spread, n_layers=n_layers)


def swiglu_claims(results: dict) -> dict:
    """Every claim the script prints, from the numbers of the stages before."""
    sizes = results["llama_sizes"]
    rows = results["param_matched"]["rows"]
    flow, train = results["gradient_flow"], results["training"]
    matched = sum(r["matches_published"] for r in sizes.values())
    deviation = max(abs(r["params_ratio"] - 1) for r in rows.values())
    counted = all(
        r["params"] == r["params_formula"]
        and r["matmul_flops_per_token"] == r["matmul_flops_per_token_counted"]
        for r in rows.values()
    )
    published = ", ".join(sorted({str(r["published_hidden_dim"]) for r in sizes.values()}))
    equal = "exactly" if deviation == 0 else f"within {100 * deviation:.2f}% of"
    sw = rows["swiglu"]  # main times SwiGLU in every configuration
    return {
        "llama_sizes": claim(
            f"Llama's rule gives the published hidden size ({published}) for {matched} of "
            f"{len(sizes)} Llama configurations",
            matched == len(sizes),
            matched=matched,
            n=len(sizes),
        ),
        "equal_params_and_flops": claim(
            f"At 8/3 d every gated FFN has {equal} the parameters and matmul FLOPs of the 4 d "
            f"ReLU FFN; the counts from the modules {'equal' if counted else 'differ from'} the "
            "formulas",
            counted and deviation == 0,
            max_params_ratio_deviation=deviation,
            counts_equal_formulas=counted,
        ),
        "swiglu_speed": speed_claim(
            sw["fwd_bwd_speed_vs_relu"],
            sw["fwd_bwd_speed_vs_relu_lo"],
            sw["fwd_bwd_speed_vs_relu_hi"],
            results["param_matched"]["rounds"],
        ),
        "flat_gradients_at_init": flat_init_claim(
            max(r["max_over_min_layer_grad_norm_init"] for r in flow["variants"].values()),
            flow["n_layers"],
        ),
        "relu_units_die": dead_units_claim(
            {v: r["dead_unit_fraction_trained"] for v, r in flow["variants"].items()},
            flow["steps"],
            flow["lr"],
        ),
        "swiglu_beats_relu": every_seed_claim(
            train["variants"]["swiglu"]["final_losses"],
            train["variants"]["relu"]["final_losses"],
            train["chance_of_every_seed_if_no_difference"],
        ),
    }


# =============================================================================
# 5. Figures: one plot_<png name> per figure, each returns the Figure
# =============================================================================

FFN_COLORS = {
    "relu": "tab:red",
    "gelu": "tab:orange",
    "silu": "tab:brown",
    "glu": "tab:purple",
    "bilinear": "tab:gray",
    "reglu": "tab:pink",
    "geglu": "tab:green",
    "swiglu": "tab:blue",
    "none": "black",
}


def _ffn_style(variant: str) -> dict:
    return {
        "color": FFN_COLORS[variant],
        "linestyle": "--" if variant in GATED else "-",
        "label": FFN_LABELS[variant],
    }


def plot_activations() -> plt.Figure:
    """See ReLU's derivative vanish for all x < 0 while GELU/SiLU dip below 0 and stay smooth."""
    x = torch.linspace(-5, 5, 1001)
    curves = {
        "ReLU": relu,
        "GELU": gelu,
        "SiLU = Swish$_1$": swish,
        "sigmoid (GLU gate)": sigmoid,
    }
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), layout="constrained")
    for name, fn in curves.items():
        axes[0].plot(x, fn(x), label=name)
        axes[1].plot(x, _autograd_derivative(fn, x), label=name)
    x_star, y_star = swish_minimum()
    axes[0].plot([x_star], [y_star], "k.", ms=8)
    axes[0].annotate(
        f"SiLU min {y_star:.3f}\nat x={x_star:.3f}",
        (x_star, y_star),
        (-4.8, 1.5),
        arrowprops={"arrowstyle": "->"},
    )
    axes[0].set_ylim(-1, 3)
    axes[0].set_title("Activations: GELU and SiLU are smooth ReLUs\nthat dip below 0")
    axes[1].set_title(
        "Derivatives: ReLU's is exactly 0 for every x < 0;\nGELU's and SiLU's only at one point"
    )
    axes[1].set_ylim(-0.2, 1.2)
    for beta in (0.0, 0.5, 1.0, 2.0, 10.0):
        axes[2].plot(x, swish(x, beta), label=f"beta = {beta:g}")
    axes[2].set_ylim(-1, 3)
    axes[2].set_title("Swish$_\\beta$(x) = x sigmoid($\\beta$x): from x/2 (beta 0)\nto ReLU")
    for ax, ylabel in zip(axes, ("f(x)", "f'(x)", "Swish$_\\beta$(x)"), strict=True):
        ax.set_xlabel("pre-activation x (dimensionless)")
        ax.set_ylabel(ylabel)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.legend(fontsize=9)
    return fig


def plot_gate_surface() -> plt.Figure:
    """See SwiGLU's gate pass a little (sign flipped) for a < 0, where ReGLU's is shut."""
    a = torch.linspace(-4, 4, 201)
    A, B = torch.meshgrid(a, a, indexing="xy")  # A varies along columns (x axis), B along rows
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    for ax, (name, act) in zip(
        axes, (("SwiGLU: silu(a) * b", F.silu), ("ReGLU: relu(a) * b", F.relu)), strict=True
    ):
        z = act(A) * B
        mesh = ax.pcolormesh(A, B, z, cmap="RdBu_r", vmin=-8, vmax=8, shading="auto")
        ax.contour(A, B, z, levels=[-4, -2, -1, -0.25, 0.25, 1, 2, 4], colors="k", linewidths=0.6)
        ax.set_xlabel("gate pre-activation a = (x W)_j")
        ax.set_ylabel("value b = (x V)_j")
        ax.set_title(
            f"{name}\n"
            + (
                "smooth: a < 0 still passes a little (sign flipped)"
                if act is F.silu
                else "hard: the gate is shut for a < 0"
            )
        )
    fig.colorbar(mesh, ax=axes, label="hidden unit output (dimensionless)")
    return fig


def ffn_speed_title(table: dict) -> str:
    """The ffn_speed title, from the numbers: equal costs, and whether the speeds bear it out."""
    rows, rounds = table["rows"], table["rounds"]
    deviation = max(abs(r["params_ratio"] - 1) for r in rows.values())
    others = [v for v in rows if v != "relu"]
    band = (1 / SPEED_TOLERANCE, SPEED_TOLERANCE)
    keys = ("forward", "fwd_bwd")

    def inside(v: str, suffix: str) -> bool:
        return all(band[0] <= rows[v][f"{k}_speed_vs_relu{suffix}"] <= band[1] for k in keys)

    median_out = [FFN_LABELS[v] for v in others if not inside(v, "")]
    spread_out = [v for v in others if not (inside(v, "_lo") and inside(v, "_hi"))]
    if median_out:
        speed = (
            f"but the median speed of {', '.join(median_out)} is more than {SPEED_TOLERANCE}x "
            f"from the ReLU FFN's ({rounds} rounds)"
        )
    elif spread_out:
        speed = (
            f"and every median speed is within {SPEED_TOLERANCE}x of the ReLU FFN's; "
            f"{len(spread_out)} of "
            f"{len(others)} left that band in some of the {rounds} rounds (whiskers: timing spread)"
        )
    else:
        speed = (
            f"and every one ran within {SPEED_TOLERANCE}x of the ReLU FFN's speed in all "
            f"{rounds} rounds"
        )
    equal = "exactly" if deviation == 0 else f"within {100 * deviation:.2f}%"
    return (
        f"Gated FFNs at 8/3 d and ungated at 4 d have the ReLU FFN's parameters and matmul FLOPs "
        f"({equal}),\n{speed}"
    )


def plot_ffn_speed(table: dict) -> plt.Figure:
    """See every FFN, at equal parameters and FLOPs, run at about the ReLU FFN's speed."""
    rows = table["rows"]
    names = list(rows)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(11, 4.8), layout="constrained")
    ax.axhspan(
        1 / SPEED_TOLERANCE, SPEED_TOLERANCE, color="0.92", label=f"within {SPEED_TOLERANCE}x"
    )
    ax.axhline(1.0, color="k", lw=0.8)
    lows = []
    for offset, key, label, color in (
        (-0.15, "forward", "forward", "tab:blue"),
        (0.15, "fwd_bwd", "forward + backward", "tab:orange"),
    ):
        med = np.array([rows[n][f"{key}_speed_vs_relu"] for n in names])
        lo = np.array([rows[n][f"{key}_speed_vs_relu_lo"] for n in names])
        hi = np.array([rows[n][f"{key}_speed_vs_relu_hi"] for n in names])
        lows.extend([lo.min(), hi.max()])
        ax.errorbar(
            x + offset,
            med,
            yerr=[med - lo, hi - med],
            fmt="o",
            capsize=4,
            color=color,
            label=f"{label}: median, min-max over rounds",
        )
    ax.set_ylim(min(0.7, min(lows) - 0.05), max(1.3, max(lows) + 0.05))
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xticks(x, [f"{FFN_LABELS[n]}\nh={rows[n]['hidden_dim']}" for n in names], fontsize=9)
    ax.set_ylabel("speed vs ReLU FFN (x; > 1 is faster)")
    ax.set_title(
        ffn_speed_title(table)
        + f"\n(d_model={table['d_model']}, {table['n_tokens']} tokens, one FFN layer, "
        f"{table['rounds']} interleaved rounds)",
        fontsize=10,
    )
    fig.legend(loc="outside lower center", ncol=3, fontsize=9)
    return fig


def grad_norms_titles(flow: dict) -> tuple[str, str]:
    """(figure title, right panel title), from the numbers."""
    spread = max(r["max_over_min_layer_grad_norm_init"] for r in flow["variants"].values())
    if spread < 2.0:
        top = f"at init each FFN's per-layer gradient norms agree within {spread:.2f}x (none "
        top += "vanishes with depth)"
    else:
        top = f"at init the per-layer gradient norms differ by up to {spread:.2f}x"
    right = textwrap.fill(flow["smallest_after_training"]["statement"], 80)
    return f"{flow['n_layers']}-layer pre-norm residual stack: {top}", right


def plot_grad_norms(flow: dict) -> plt.Figure:
    """See per-layer gradient norms agree across depth at init (nothing vanishes), then trained."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), layout="constrained", sharey=True)
    top, right = grad_norms_titles(flow)
    for ax, stage in zip(axes, ("init", "trained"), strict=True):
        for variant, res in flow["variants"].items():
            norms = res[f"grad_norm_{stage}"]
            ax.semilogy(range(1, len(norms) + 1), norms, marker=".", **_ffn_style(variant))
        ax.set_xlabel("layer (1 = next to the input)")
    axes[0].set_title("At initialisation")
    axes[1].set_title(right, fontsize=10)
    axes[0].set_ylabel("||dL/d(FFN params)||$_2$ (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(top)
    return fig


def dead_units_title(flow: dict) -> str:
    dead = {v: r["dead_unit_fraction_trained"] for v, r in flow["variants"].items()}
    return dead_units_claim(dead, flow["steps"], flow["lr"])["statement"]


def plot_dead_units(flow: dict) -> plt.Figure:
    """See ReLU units die during the Adam steps while every other FFN keeps (almost) all of its."""
    variants = list(flow["variants"])
    x = np.arange(len(variants))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), layout="constrained")
    width = 0.38
    for ax, key, title in (
        (axes[0], "zero_derivative_fraction", "(token, unit) pairs with act'(a) = 0"),
        (axes[1], "dead_unit_fraction", "dead units: zero gradient from every input"),
    ):
        top = 0.0
        for i, stage in enumerate(("init", "trained")):
            vals = [100 * flow["variants"][v][f"{key}_{stage}"] for v in variants]
            trained = f"after {flow['steps']} Adam steps (lr {flow['lr']:g})"
            label = "at init" if stage == "init" else trained
            bars = ax.bar(
                x + (i - 0.5) * width, vals, width, label=label if ax is axes[0] else None
            )
            labels = [f"{v:.1f}" if v >= 0.1 else f"{v:.1g}" if v > 0 else "" for v in vals]
            ax.bar_label(bars, labels, fontsize=8)
            top = max(top, *vals)
        ax.set_ylim(0, max(1.0, 1.15 * top))
        ax.set_xticks(x, [FFN_LABELS[v] for v in variants], rotation=30, fontsize=9)
        ax.set_ylabel("share of all (%)")
        ax.set_title(f"{title}\n(no bar: exactly 0%)", fontsize=10)
    fig.legend(loc="outside lower center", ncol=2, fontsize=9)
    fig.suptitle(dead_units_title(flow), fontsize=11)
    return fig


def plot_training_curves(train: dict) -> plt.Figure:
    """See each FFN's loss above the entropy floor fall, and which ends lowest across seeds."""
    fig, axes = plt.subplots(
        1, 2, figsize=(13, 4.8), layout="constrained", gridspec_kw={"width_ratios": [3, 2]}
    )
    steps = np.array(train["eval_steps"])
    floor = train["task"]["entropy_floor_nats"]
    for variant, res in train["variants"].items():
        mean, std = np.array(res["curve_mean"]), np.array(res["curve_std"])
        style = _ffn_style(variant)
        axes[0].plot(steps, mean - floor, **style)
        axes[0].fill_between(
            steps, mean - floor - std, mean - floor + std, alpha=0.15, color=style["color"]
        )
    axes[0].set_yscale("log")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("expected loss - entropy floor (nats, log scale)")
    axes[0].set_title(f"Loss curves, mean $\\pm$ std over {len(train['seeds'])} seeds")
    axes[0].legend(fontsize=8, ncol=3, loc="lower left")  # the curves start top left
    names = train["ranking"]
    for i, variant in enumerate(names):
        res = train["variants"][variant]
        finals = np.array(res["final_losses"])
        axes[1].errorbar(
            i,
            res["final_loss_mean"],
            yerr=res["final_loss_std"],
            fmt="o",
            color=FFN_COLORS[variant],
            capsize=4,
        )
        axes[1].plot(np.full(len(finals), i), finals, "x", color=FFN_COLORS[variant], alpha=0.6)
    axes[1].set_xticks(range(len(names)), [FFN_LABELS[v] for v in names], rotation=30, fontsize=9)
    axes[1].set_ylabel("final expected loss (nats)")
    axes[1].set_title("Final loss per seed (x) and mean $\\pm$ std, best first")
    fig.suptitle(training_curves_title(train))
    return fig


def training_curves_title(train: dict) -> str:
    """The training_curves.png title: the FFN weights (equal or not, counted), steps, task floor."""
    counts = {r["ffn_params"] for v, r in train["variants"].items() if v != "none"}
    params = (
        f"Equal parameters ({counts.pop():,} FFN weights each)"
        if len(counts) == 1
        else f"{min(counts):,} to {max(counts):,} FFN weights"
    )
    return (
        f"{params}, {train['steps']} steps, {len(train['seeds'])} seeds: next token from a "
        f"random pair table (floor {train['task']['entropy_floor_nats']:.3f} nats)"
    )


# =============================================================================
# 6. Main: flags, the printed tables, and the stages
# =============================================================================

# Sizes of --quick and the default run. d_model divisible by 3: 8/3 d is an integer.
SIZES = {
    "quick": {
        "bench_d": 48,
        "bench_tokens": 128,
        "min_run_time": 0.01,
        "bench_rounds": 3,
        "bench_variants": ("relu", "swiglu"),  # 4 timers per round, not 16
        "flow_d": 48,
        "flow_layers": 6,
        "flow_steps": 3,
        "train_d": 48,
        "train_layers": 2,
        "vocab": 16,
        "steps": 30,
        "seeds": 2,
        "eval_every": 10,
        "batch_size": 64,
        "lr": 1e-2,
    },
    "default": {
        "bench_d": 384,
        "bench_tokens": 1024,
        "min_run_time": 0.1,
        "bench_rounds": 5,
        "bench_variants": VARIANTS,
        "flow_d": 48,
        "flow_layers": 24,
        "flow_steps": 50,
        "train_d": 48,
        "train_layers": 2,
        "vocab": 32,
        "steps": 600,
        "seeds": 3,
        "eval_every": 25,
        "batch_size": 256,
        "lr": 1e-2,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser()
    quick, default = SIZES["quick"], SIZES["default"]
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help=f"training seeds per variant (default: {quick['seeds']} with --quick, else "
        f"{default['seeds']})",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"training steps per run (default: {quick['steps']} with --quick, else "
        f"{default['steps']})",
    )
    return parse_flags(parser, argv)


def _run_sizes(args: argparse.Namespace) -> dict:
    """This run's sizes: --quick or the default, with --steps and --seeds applied."""
    cfg = dict(SIZES["quick" if args.quick else "default"])
    for key in ("steps", "seeds"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def print_checks(act: dict, gated: dict) -> None:
    checks = {
        "swish(x, beta=1) vs F.silu": "swish_beta1_vs_silu_max_abs_err",
        "swish(x, beta=0) vs x/2": "swish_beta0_vs_half_x_max_abs_err",
        "swish(x, beta=20) vs ReLU": "swish_beta20_vs_relu_max_abs_err",
        "written-out ReLU vs F.relu": "relu_vs_torch_max_abs_err",
        "written-out GELU vs F.gelu": "gelu_vs_torch_max_abs_err",
        "written-out sigmoid vs torch": "sigmoid_vs_torch_max_abs_err",
        "SiLU' autograd vs closed form": "silu_derivative_vs_closed_form_max_abs_err",
        "GELU' autograd vs closed form": "gelu_derivative_vs_closed_form_max_abs_err",
    }
    for label, key in checks.items():
        print(f"  {label:<32} max abs err {act[key]:.1e}")
    print(
        f"  SiLU minimum {act['silu_minimum_value']:.4f} at x = {act['silu_minimum_x']:.4f} "
        "(= x + 1, SiLU is not monotone)"
    )
    for variant, err in gated["variant_vs_formula_max_abs_err"].items():
        print(f"  {FFN_LABELS[variant]:<9} module vs Shazeer's formula  max abs err {err:.1e}")
    print(
        f"  SwiGLUFeedForward vs GatedFeedForward('swiglu') max abs err "
        f"{gated['swiglu_ffn_vs_gated_family_max_abs_err']:.1e}"
    )


def print_llama_sizes(sizes: dict) -> None:
    print(
        f"  {'model':<12} {'d':>5} {'mult_of':>7} {'x':>4} {'hidden':>6} {'published':>9} "
        f"{'h/d':>6} {'params vs 4d ReLU':>17}"
    )
    for name, r in sizes.items():
        mult = "-" if r["ffn_dim_multiplier"] is None else f"{r['ffn_dim_multiplier']:g}"
        print(
            f"  {name:<12} {r['d_model']:>5} {r['multiple_of']:>7} {mult:>4} "
            f"{r['hidden_dim']:>6} {r['published_hidden_dim']:>9} "
            f"{r['hidden_over_d_model']:>6.3f} {r['params_ratio_to_relu_4d']:>16.3f}x"
        )


def print_param_matched(table: dict) -> None:
    print(
        f"  {'FFN':<9} {'hidden':>6} {'params':>9} {'MFLOP/tok':>9} {'fwd ms':>8} {'f+b ms':>8}"
        f"  speed vs ReLU: forward, forward+backward (median [min-max], {table['rounds']} rounds)"
    )
    for variant, r in table["rows"].items():
        speeds = "  ".join(
            f"{r[f'{k}_speed_vs_relu']:.2f}x [{r[f'{k}_speed_vs_relu_lo']:.2f}-"
            f"{r[f'{k}_speed_vs_relu_hi']:.2f}]"
            for k in ("forward", "fwd_bwd")
        )
        print(
            f"  {FFN_LABELS[variant]:<9} {r['hidden_dim']:>6} {r['params']:>9,} "
            f"{r['flops_per_token'] / 1e6:>9.3f} {r['forward_ms']:>8.3f} {r['fwd_bwd_ms']:>8.3f}"
            f"  {speeds}"
        )


def print_gradient_flow(flow: dict) -> None:
    print(
        f"  {'FFN':<9} {'init grad norm: layer 1/last':>28} {'max/min':>7} "
        f"{'zero-deriv init':>15} {'trained':>8} {'dead units init':>15} {'trained':>8} "
        f"{'loss trained':>12}"
    )
    for variant, r in flow["variants"].items():
        print(
            f"  {FFN_LABELS[variant]:<9} {r['first_over_last_layer_grad_norm_init']:>27.2f}x "
            f"{r['max_over_min_layer_grad_norm_init']:>6.2f}x "
            f"{100 * r['zero_derivative_fraction_init']:>14.1f}% "
            f"{100 * r['zero_derivative_fraction_trained']:>7.1f}% "
            f"{100 * r['dead_unit_fraction_init']:>14.1f}% "
            f"{100 * r['dead_unit_fraction_trained']:>7.1f}% "
            f"{r['loss_trained']:>12.4f}"
        )
    print(f"  {flow['smallest_after_training']['statement']}")


def print_training(train: dict) -> None:
    print(
        f"  task: {train['task']['name']}, vocab {train['task']['vocab_size']}: entropy floor "
        f"{train['task']['entropy_floor_nats']:.4f} nats, uniform guess "
        f"{train['task']['uniform_loss_nats']:.4f} nats"
    )
    print(f"  {'FFN':<9} {'FFN params':>10} {'final loss (nats)':>20} {'above floor':>11}")
    for variant in (*train["ranking"], "none"):
        r = train["variants"][variant]
        print(
            f"  {FFN_LABELS[variant]:<9} {r['ffn_params']:>10,} {r['final_loss_mean']:>11.4f} "
            f"+- {r['final_loss_std']:.4f} {r['excess_loss_mean']:>11.4f}"
        )
    every_seed = train["better_than_relu_on_every_seed"]
    print(
        f"  below ReLU on every seed (worst seed below ReLU's best; chance of that with no "
        f"real difference {train['chance_of_every_seed_if_no_difference']:.3f} per variant): "
        f"{', '.join(FFN_LABELS[v] for v in every_seed) or 'none'}"
    )
    paper = train["shazeer_t5_base_65k_log_perplexity"]
    print(
        f"  best: {FFN_LABELS[train['ranking'][0]]}, {train['best_minus_relu_final_loss']:+.4f} "
        f"nats vs ReLU; SwiGLU - ReLU = {train['swiglu_minus_relu_final_loss']:+.4f} nats "
        f"(Shazeer, T5-base, 65k steps: {paper['swiglu'] - paper['relu']:+.3f} log-perplexity); "
        f"Bilinear - SwiGLU = {train['bilinear_minus_swiglu_final_loss']:+.4f} nats"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)  # a bad flag exits here (status 2), before any work or file
    cfg = _run_sizes(args)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    results: dict = {"meta": run_meta(args, device)}
    results["meta"]["config"] = cfg
    n = 6
    print(f"[1/{n}] checking activations and the gated variants ...")
    results["activations"] = check_activations()
    results["gated_variants"] = check_gated_variants()
    print_checks(results["activations"], results["gated_variants"])
    print(f"[2/{n}] Llama's hidden-size rule ...")
    results["llama_sizes"] = llama_sizes()
    print_llama_sizes(results["llama_sizes"])
    print(f"[3/{n}] timing one FFN layer of each kind at equal parameters ...")
    results["param_matched"] = param_matched_table(
        cfg["bench_d"], cfg["bench_tokens"], device, cfg["min_run_time"],
        cfg["bench_rounds"], cfg["bench_variants"],
    )  # fmt: skip
    print_param_matched(results["param_matched"])
    print(f"[4/{n}] gradient flow through {cfg['flow_layers']} pre-norm layers ...")
    results["gradient_flow"] = gradient_flow_comparison(
        cfg["flow_d"], cfg["flow_layers"], cfg["flow_steps"], cfg["lr"], cfg["batch_size"],
        cfg["vocab"], args.seed, device,
    )  # fmt: skip
    print_gradient_flow(results["gradient_flow"])
    print(f"[5/{n}] training {len(VARIANTS) + 1} models x {cfg['seeds']} seeds ...")
    seeds = [(args.seed + i) % 2**63 for i in range(cfg["seeds"])]
    results["training"] = training_comparison(
        cfg["train_d"], cfg["train_layers"], cfg["vocab"], cfg["steps"], cfg["lr"],
        cfg["batch_size"], seeds, cfg["eval_every"], device,
    )  # fmt: skip
    print_training(results["training"])
    results["claims"] = swiglu_claims(results)
    print_claims(results["claims"])
    print(f"[6/{n}] drawing figures ...")
    figures = {
        "activations": plot_activations(),
        "gate_surface": plot_gate_surface(),
        "ffn_speed": plot_ffn_speed(results["param_matched"]),
        "grad_norms": plot_grad_norms(results["gradient_flow"]),
        "dead_units": plot_dead_units(results["gradient_flow"]),
        "training_curves": plot_training_curves(results["training"]),
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
