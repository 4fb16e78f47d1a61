"""Training: a Llama built from this repository's parts, trained on real text by a visible loop.

The problem
-----------
Every earlier script builds one piece of a language model and checks it against a reference,
but none of them trains a model on text. Training is where the pieces meet, and where the
mistakes are easy to make and hard to see: gradient accumulation that scales the loss wrongly
when the micro-batches hold different numbers of tokens, a clip threshold applied per
micro-batch, weight decay on norms and biases, a warm-up that is off by one step, a resumed run
that does not continue the same trajectory (the data sampler or the schedule restart).

The idea
--------
Assemble a Llama from the parts already taught and tested (``GroupedQueryAttention`` from
``grouped_query_attention.py``, RoPE inside it; ``SwiGLUFeedForward`` and ``RMSNorm`` from
``swiglu.py``; the byte-level BPE tokenizer of ``tokenization.py``), with the parameter names
of Hugging Face's ``LlamaForCausalLM`` so a state_dict moves between the two with
``strict=True``. Then write every part of the training loop out, each tested against its
reference: AdamW against ``torch.optim.AdamW``, the schedules against ``transformers``', the
clipping against ``torch.nn.utils.clip_grad_norm_``, token-weighted accumulation against the
one big batch, a resumed run against the uninterrupted one.

The math
--------
Model, for token ids t_1 .. t_T (each layer: pre-norm, residual)::

    (1) h_0 = E[t]                                        (batch, T, d_model)
    (2) h   = h + Attention(RMSNorm(h))                   GQA with RoPE, causal
    (3) h   = h + SwiGLU(RMSNorm(h))
    (4) logits = RMSNorm(h_L) W_head^T                    W_head = E when tied
    (5) loss = -(1/N) sum over the N predicted tokens of log softmax(logits)[next token]

AdamW (Loshchilov and Hutter 2019), for a gradient g at step t::

    (6) theta <- theta (1 - lr * wd)                      decoupled decay, only >= 2-D weights
    (7) m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    (8) theta <- theta - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Schedules (step s, peak lr, warm-up w, S steps, floor r * lr)::

    (9)  warm-up + cosine:  lr * s / w  for s < w,  else
         lr * (r + (1 - r) * 0.5 * (1 + cos(pi * (s - w) / (S - w))))
    (10) warmup-stable-decay: lr * (r + (1 - r) s / w) for s < w, lr until S - D, then a
         cosine from lr to r * lr over the last D steps

Clipping by the global norm, and accumulation weighted by tokens (micro-batch i holds n_i of
the N = sum_i n_i predicted tokens)::

    (11) ||g|| = sqrt(sum_p ||g_p||^2);   g <- g * min(1, c / (||g|| + 1e-6))
    (12) loss_i = (sum of token losses in micro-batch i) / N;  sum_i grad(loss_i) = grad(5)

Dividing each micro-batch's *mean* loss by k instead gives every micro-batch the same weight
whatever its token count: wrong as soon as the counts differ (padding, unequal lengths).

Cost (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B)::

    (13) training FLOPs per token = 6 N + 12 n_layers * d_attn * T     (N: matmul weights)
    (14) MFU = achieved FLOP/s / the matmul FLOP/s this machine reaches
    (15) bits per byte = (sum of token losses in nats) / ln 2 / (UTF-8 bytes of those tokens)
    (16) memory = 4 N (weights) + 4 N (gradients) + 8 N (AdamW m, v) + activations (fp32)

Where it is used
----------------
nanoGPT's ``train.py`` and ``model.py`` (AdamW decaying only >= 2-D tensors, warm-up + cosine,
accumulation, clipping), nanochat (bits per byte, an optimizer tested against torch.optim),
Hugging Face's ``Trainer`` (token-weighted loss across accumulation steps, transformers PR
35438), Llama and every open model since. ``evaluation.py``, ``quantization.py`` and
``fine_tuning.py`` load the ``model.pt`` the default run writes, or call ``train`` themselves.

Run it
------
    uv run python training.py           # default run (run time: README, measured)
    uv run python training.py --quick   # small sizes, a fast check
    uv run python training.py --steps 600 --bf16 --out DIR --no-show

It prints each check and measurement, saves every figure as PNG, every printed number in
``results.json`` and the trained model (``model.pt``: state_dict and config) with its tokenizer
(``tokenizer.tiktoken``) under ``--out`` (default ``figures/training/``).

References
----------
- Loshchilov and Hutter, "Decoupled Weight Decay Regularization", 2019, arXiv 1711.05101.
- Kingma and Ba, "Adam: A Method for Stochastic Optimization", 2015, arXiv 1412.6980.
- Touvron et al., "LLaMA", 2023, arXiv 2302.13971; Hu et al., "MiniCPM", 2024,
  arXiv 2404.06395 (warmup-stable-decay).
- Kaplan et al., "Scaling Laws for Neural Language Models", 2020, arXiv 2001.08361 (6 N).
- Reference code: karpathy/nanoGPT ``train.py`` (``get_lr``, accumulation, clipping) and
  ``model.py`` (``configure_optimizers``, ``estimate_mfu``); pytorch/pytorch
  ``torch/optim/adamw.py``, ``torch/nn/utils/clip_grad.py``; huggingface/transformers
  ``src/transformers/optimization.py`` (``get_cosine_schedule_with_warmup``,
  ``get_cosine_with_min_lr_schedule_with_warmup``, ``get_wsd_schedule``) and
  ``models/llama/modeling_llama.py`` (``LlamaForCausalLM``: same names, tested equal).

Contents
--------
2. Core: ``_check_sizes``, ``_check_positive``, ``ModelConfig``, ``LlamaDecoderLayer``,
   ``LlamaModel``, ``Llama`` (``forward``, ``new_cache``, ``generate``); the loop's pieces
   ``IGNORE``, ``token_loss_sum``, ``accumulate_gradients``, ``clip_grad_norm``, ``AdamW``,
   ``param_groups``, ``cosine_lr``, ``wsd_lr``, ``TrainConfig``, ``lr_at``; ``train``.
3. Baselines and apparatus: the door checks (``_fields_from_hf_config``,
   ``_check_model_config``, ``_check_ids``, ``_check_generate``, ``_check_adamw``,
   ``SCHEDULES``, ``_check_train_config``, ``_check_train_args``, ``_check_checkpoint``);
   checkpoints (``make_checkpoint``, ``load_checkpoint``); the data (``get_batch``,
   ``evaluate``, ``_record_eval``, ``TOKENIZER_FILE``, ``TOKENIZER_VOCAB``, ``load_data``,
   ``val_windows``); the saved model for later scripts (``DEFAULT_MODEL_DIR``,
   ``trained_model_dir``, ``load_trained_model``); ``ngram_baselines``, ``bits_per_byte``,
   ``matmul_param_count``, ``flops_per_token``, ``matmul_peak_flops``, ``SavedTensorBytes``,
   ``activation_bytes_formula``, ``to_hf_llama``.
4. Experiments: ``claim``, ``print_claims``, ``PARITY_CASES``, ``check_hf_parity``,
   ``check_adamw``, ``check_schedules``, ``check_clipping``, ``check_accumulation``,
   ``check_resume``, ``check_loop``, ``run_default_training``, ``memory_account``,
   ``measure_bf16``, ``ABLATIONS``, ``run_ablation``, ``measure_baselines``, ``summarize_run``,
   ``measure_step``, ``loss_title``, ``ablation_title``, ``training_claims``.
5. Figures: ``plot_loss``, ``plot_lr_grad_norm``, ``plot_ablation``, ``plot_memory``.
6. Main: ``SIZES``, ``parse_args``, ``main_configs``, ``ablation_configs``, ``make_figures``,
   ``model_files``, the ``print_<stage>`` helpers, ``main``.
7. Plumbing (identical in every script).

Read first: ``Llama`` (equations 1-4: which class comes from which script), then ``train`` and
the pieces in the order it calls them: ``lr_at``, ``get_batch``, ``accumulate_gradients``,
``clip_grad_norm``, ``AdamW.step``; ``check_accumulation`` shows the mistake (12) avoids.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import numbers
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

from grouped_query_attention import GroupedQueryAttention
from swiglu import RMSNorm, SwiGLUFeedForward
from tokenization import GPT4_PATTERN, BPETokenizer, load_corpus, tiktoken_file_bytes

# =============================================================================
# 2. Core: the Llama from the earlier scripts' parts, and every part of the training loop
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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The sizes of a Llama; the names in comments are transformers' ``LlamaConfig`` fields."""

    vocab_size: int  # vocab_size
    d_model: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads
    hidden_dim: int  # intermediate_size
    max_seq_len: int  # max_position_embeddings
    head_dim: int | None = None  # head_dim (None: d_model // n_heads)
    rope_base: float = 10000.0  # rope_parameters["rope_theta"]
    norm_eps: float = 1e-6  # rms_norm_eps
    tie_embeddings: bool = True  # tie_word_embeddings

    def __post_init__(self) -> None:
        _check_model_config(self)

    @classmethod
    def from_hf_config(cls, config) -> ModelConfig:
        """The config of a transformers ``LlamaConfig`` (rope_theta in either place it lives)."""
        return cls(**_fields_from_hf_config(config))


class LlamaDecoderLayer(nn.Module):
    """One pre-norm block, (2) and (3); the names are transformers' ``LlamaDecoderLayer``'s."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)  # from swiglu.py
        self.self_attn = GroupedQueryAttention(  # from grouped_query_attention.py (RoPE inside)
            cfg.d_model,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            max_seq_len=cfg.max_seq_len,
            rope_base=cfg.rope_base,
            sharing="sdpa",
        )
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLUFeedForward(cfg.d_model, hidden_dim=cfg.hidden_dim)  # from swiglu.py

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), start_pos, cache)  # (2)
        return x + self.mlp(self.post_attention_layernorm(x))  # (3) (batch, seq_len, d_model)


class LlamaModel(nn.Module):
    """The decoder stack without the head: ``model.*`` in a ``LlamaForCausalLM`` state_dict."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, ids: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        h = self.embed_tokens(ids)  # (1) (batch, seq_len, d_model)
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, None if cache is None else cache[i])
        return self.norm(h)


class Llama(nn.Module):
    """A Llama: embeddings, n_layers of (RMSNorm, GQA, RMSNorm, SwiGLU), norm, LM head (4).

    The state_dict keys are those of transformers' ``LlamaForCausalLM`` (``model.embed_tokens``,
    ``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.gate_proj``, ``model.norm``,
    ``lm_head``), so its weights load with ``strict=True`` both ways (logits tested equal).
    ``forward(ids, start_pos=0, cache=None)`` takes token ids (batch, seq_len) and returns
    logits (batch, seq_len, vocab_size); ``cache`` is ``new_cache``'s list, one per layer.

    >>> cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
    ...                   hidden_dim=64, max_seq_len=16)
    >>> model = Llama(cfg)
    >>> ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    >>> model(ids).shape  # (batch, seq_len, vocab_size)
    torch.Size([2, 5, 100])
    >>> cache = model.new_cache(batch_size=2)  # one KVCache per layer
    >>> len(cache), cache[0].k_cache.shape  # (batch, n_kv_heads, max_seq_len, head_dim)
    (2, torch.Size([2, 2, 16, 8]))
    >>> model.generate(ids, max_new_tokens=3).shape  # greedy, with the cache
    torch.Size([2, 8])
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, two names
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, 0.02) for every matrix (as transformers' initializer_range), norms at 1."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, ids: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        _check_ids(self, ids, start_pos, cache)
        return self.lm_head(self.model(ids, start_pos, cache))  # (4) (batch, seq_len, vocab)

    def new_cache(self, batch_size: int, max_seq_len=None, dtype=None, device=None) -> list:
        """One GQA ``KVCache`` per layer (each layer checks the arguments)."""
        return [
            layer.self_attn.new_cache(batch_size, max_seq_len, dtype, device)
            for layer in self.model.layers
        ]

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens to ``ids`` (batch, seq_len): greedy when
        ``temperature`` is 0, else sampled from softmax(logits / temperature), over the
        ``top_k`` most likely tokens if given. Prefill once, then one token per step."""
        _check_generate(self, ids, max_new_tokens, temperature, top_k)
        cache = self.new_cache(len(ids))
        logits = self(ids, 0, cache)[:, -1]  # prefill: (batch, vocab_size)
        out = [ids]
        for i in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)  # (batch, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self(nxt, ids.shape[1] + i, cache)[:, -1]  # decode one token
        return torch.cat(out, dim=1)  # (batch, seq_len + max_new_tokens)


IGNORE = -100  # target id of a padded position: no loss, no gradient (as F.cross_entropy)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of the token losses (5), number of predicted tokens); IGNORE targets count 0."""
    _check_logits_targets(logits, targets)
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


def accumulate_gradients(model: nn.Module, micro_batches: list, bf16: bool = False) -> float:
    """Backward over micro-batches [(ids, targets), ...], each weighted by its tokens (12), so
    the summed gradient is the one big batch's. Returns the big batch's mean token loss."""
    _check_micro_batches(micro_batches, bf16)
    n_total = sum(int((y != IGNORE).sum()) for _, y in micro_batches)
    if n_total == 0:
        raise ValueError("micro_batches hold no target to predict (every target is IGNORE)")
    total = 0.0
    for x, y in micro_batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)  # (batch, seq_len, vocab_size)
        loss_sum, _ = token_loss_sum(logits, y)
        (loss_sum / n_total).backward()  # (12): divide by ALL tokens, not by k
        total += loss_sum.item()
    return total / n_total


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Scale the gradients so their global norm is at most ``max_norm`` (11); returns the
    norm before clipping (``math.inf`` disables the clipping, the norm is still returned)."""
    _check_max_norm(max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # (11) never scales up
    for g in grads:
        g.mul_(coef)
    return norm.item()


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay, (6)-(8), written out: ``torch.optim.AdamW``'s
    single-tensor algorithm, tested equal to it. Its state (m, v, step per tensor) saves and
    loads with ``state_dict`` like any torch optimizer."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        _check_adamw(lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)  # m
                    state["exp_avg_sq"] = torch.zeros_like(p)  # v
                state["step"] += 1
                t, m, v, g = state["step"], state["exp_avg"], state["exp_avg_sq"], p.grad
                p.mul_(1 - lr * wd)  # (6) decoupled: not through the gradient
                m.lerp_(g, 1 - b1)  # (7) m = b1 m + (1 - b1) g
                v.mul_(b2).addcmul_(g, g, value=1 - b2)  # (7)
                bias1, bias2 = 1 - b1**t, 1 - b2**t  # (8) bias corrections
                denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias1)  # (8)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's grouping: weight decay on every >= 2-D tensor (matmul weights, embeddings),
    none on 1-D ones (norm gains, biases). A tied tensor appears once."""
    _check_adamw(0.0, (0.0, 0.0), 1.0, weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() dedups ties
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def cosine_lr(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.0) -> float:
    """(9): linear warm-up from 0, then a half cosine down to ``min_lr_ratio * max_lr``
    (transformers' ``get_cosine_with_min_lr_schedule_with_warmup``; past total_steps it stays
    at the floor, where transformers' cosine would rise again)."""
    _check_schedule(step, max_lr, warmup_steps, 0, total_steps, min_lr_ratio)
    if step < warmup_steps:
        return max_lr * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def wsd_lr(step, max_lr, warmup_steps, decay_steps, total_steps, min_lr_ratio=0.0) -> float:
    """(10) warmup-stable-decay (transformers' ``get_wsd_schedule``, linear warm-up from
    ``min_lr_ratio * max_lr``, cosine decay): the decay is the last ``decay_steps`` steps."""
    _check_schedule(step, max_lr, warmup_steps, decay_steps, total_steps, min_lr_ratio)
    r = min_lr_ratio
    stable_end = total_steps - decay_steps
    if step < warmup_steps:
        return max_lr * (r + (1 - r) * step / max(1, warmup_steps))
    if step < stable_end:
        return max_lr
    progress = min(1.0, (step - stable_end) / max(1, decay_steps))
    return max_lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: steps, batch (batch_size x accum_steps windows of seq_len + 1 tokens)."""

    steps: int
    batch_size: int = 8
    seq_len: int = 64
    accum_steps: int = 1
    lr: float = 3e-3
    schedule: str = "cosine"  # "cosine" (9), "wsd" (10) or "constant"
    warmup_steps: int = 10
    decay_steps: int = 0  # wsd only
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # math.inf: no clipping
    eval_every: int = 25
    bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check_train_config(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of step ``step`` (0-based) under ``cfg.schedule``."""
    if cfg.schedule == "cosine":
        return cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    if cfg.schedule == "wsd":
        return wsd_lr(step, cfg.lr, cfg.warmup_steps, cfg.decay_steps, cfg.steps, cfg.min_lr_ratio)
    return cfg.lr


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    train_tokens: torch.Tensor,
    val_windows: torch.Tensor,
    checkpoint: dict | None = None,
    stop_at: int | None = None,
    on_eval=None,
) -> dict:
    """Train a fresh Llama (or resume ``checkpoint``) for ``cfg.steps`` steps (or until step
    ``stop_at``); evaluate on ``val_windows`` every ``cfg.eval_every`` steps and at the end,
    calling ``on_eval(step, model, val_loss)``. Returns the model, the history and a
    checkpoint that continues the run exactly."""
    stop_at = _check_train_args(model_cfg, cfg, train_tokens, val_windows, checkpoint, stop_at)
    with torch.random.fork_rng(devices=[]):  # the same init for a seed, global RNG untouched
        torch.manual_seed(cfg.seed)
        model = Llama(model_cfg)
    opt = AdamW(param_groups(model, cfg.weight_decay), cfg.lr, cfg.betas, cfg.eps)
    data_rng = torch.Generator().manual_seed(cfg.seed + 1)  # the sampler's own stream
    first, hist = 0, {k: [] for k in ("step", "loss", "lr", "grad_norm", "val_step", "val_loss")}
    if checkpoint is not None:
        first, hist = load_checkpoint(checkpoint, model, opt, data_rng)
    seconds = cpu_seconds = 0.0  # wall-clock and this process's CPU time, without evaluation
    for step in range(first, stop_at):
        if step % cfg.eval_every == 0:
            _record_eval(model, val_windows, step, hist, on_eval)
        start, cpu_start = time.perf_counter(), time.process_time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)  # (9) or (10)
        batches = [
            get_batch(train_tokens, cfg.batch_size, cfg.seq_len, data_rng)
            for _ in range(cfg.accum_steps)
        ]
        loss = accumulate_gradients(model, batches, cfg.bf16)  # (12)
        grad_norm = clip_grad_norm(model.parameters(), cfg.grad_clip)  # (11), once per step
        opt.step()  # (6)-(8)
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        hist["step"].append(step)
        hist["loss"].append(loss)
        hist["lr"].append(lr_at(step, cfg))
        hist["grad_norm"].append(grad_norm)
    if stop_at == cfg.steps:
        _record_eval(model, val_windows, cfg.steps, hist, on_eval)
    ckpt = make_checkpoint(model, opt, stop_at, data_rng, hist, cfg)
    return {
        "model": model,
        "history": hist,
        "checkpoint": ckpt,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "train_config": cfg,
    }


# =============================================================================
# 3. Baselines and apparatus: door checks, data, n-gram baselines, FLOPs, memory
# =============================================================================


def _fields_from_hf_config(config) -> dict:
    """ModelConfig's fields from a transformers ``LlamaConfig``; refuses what Llama lacks."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None)  # None: d_model // n_heads
    if (
        rope.get("rope_type", "default") != "default"
        or config.attention_bias
        or getattr(config, "mlp_bias", False)
    ):
        raise ValueError("config must use plain RoPE (rope_type 'default') and no biases")
    return dict(
        vocab_size=config.vocab_size,
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        hidden_dim=config.intermediate_size,
        max_seq_len=config.max_position_embeddings,
        head_dim=None if head_dim == config.hidden_size // config.num_attention_heads else head_dim,
        rope_base=float(theta),
        norm_eps=config.rms_norm_eps,
        tie_embeddings=config.tie_word_embeddings,
    )


def _check_model_config(cfg: ModelConfig) -> None:
    """ModelConfig's door: sizes, divisibility, RoPE base, eps, the tie flag."""
    _check_sizes(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        hidden_dim=cfg.hidden_dim,
        max_seq_len=cfg.max_seq_len,
    )
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(
            f"n_heads ({cfg.n_heads}) must be divisible by n_kv_heads ({cfg.n_kv_heads})"
        )
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})")
    head_dim = cfg.d_model // cfg.n_heads if cfg.head_dim is None else cfg.head_dim
    _check_sizes(head_dim=head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim ({head_dim}) must be even (RoPE rotates pairs)")
    _check_positive(rope_base=cfg.rope_base, norm_eps=cfg.norm_eps)
    if not isinstance(cfg.tie_embeddings, bool):
        raise TypeError(f"tie_embeddings ({cfg.tie_embeddings!r}) must be a bool")


def _check_ids(model: Llama, ids, start_pos, cache) -> None:
    """forward's door: integer ids (batch, seq_len) in the vocabulary, within max_seq_len."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        raise ValueError(f"ids ({ids.dtype}, shape {tuple(ids.shape)}) must be 2-D int64/int32")
    cfg = model.config
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        raise ValueError(f"ids must lie in [0, vocab_size) = [0, {cfg.vocab_size})")
    if isinstance(start_pos, bool) or not isinstance(start_pos, numbers.Integral):
        raise TypeError(f"start_pos ({start_pos!r}) must be an int")
    if start_pos < 0 or start_pos + ids.shape[1] > cfg.max_seq_len:
        raise ValueError(
            f"start_pos + seq_len ({start_pos} + {ids.shape[1]}) must be in "
            f"[0, max_seq_len ({cfg.max_seq_len})]"
        )
    if cache is not None and (not isinstance(cache, list) or len(cache) != cfg.n_layers):
        raise TypeError(f"cache must be new_cache's list of {cfg.n_layers} KVCaches")


def _check_generate(model: Llama, ids, max_new_tokens, temperature, top_k) -> None:
    """generate's door: the whole length is checked before any work."""
    _check_ids(model, ids, 0, None)
    _check_sizes(max_new_tokens=max_new_tokens)
    if ids.shape[1] == 0 or len(ids) == 0:
        raise ValueError(f"ids (shape {tuple(ids.shape)}) must hold a prompt of >= 1 token")
    total = ids.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"seq_len + max_new_tokens ({ids.shape[1]} + {max_new_tokens} = {total}) must be "
            f"<= max_seq_len ({model.config.max_seq_len})"
        )
    if temperature != 0:
        _check_positive(temperature=temperature)
    if top_k is not None:
        _check_sizes(top_k=top_k)


def _check_adamw(lr, betas, eps, weight_decay) -> None:
    """AdamW's door: lr >= 0, 0 <= beta < 1, eps > 0, weight_decay >= 0."""
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} ({value!r}) must be a real number")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} ({value}) must be finite and >= 0")
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise TypeError(f"betas ({betas!r}) must be a pair of numbers")
    for b in betas:
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0 <= b < 1:
            raise ValueError(f"betas ({betas!r}) must each lie in [0, 1)")
    _check_positive(eps=eps)


def _check_logits_targets(logits, targets) -> None:
    """token_loss_sum's door: float logits (batch, seq_len, vocab), int64 targets (batch, seq)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("logits and targets must be torch.Tensors")
    if not logits.is_floating_point() or logits.dim() != 3:
        raise ValueError(f"logits ({logits.dtype}, {tuple(logits.shape)}) must be 3-D floating")
    if targets.dtype != torch.int64 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"targets ({targets.dtype}, {tuple(targets.shape)}) must be int64 of shape "
            f"{tuple(logits.shape[:2])}"
        )


def _check_micro_batches(micro_batches, bf16) -> None:
    """accumulate_gradients' door: a non-empty list of (ids, targets) pairs of one shape each."""
    if not isinstance(micro_batches, list | tuple) or not micro_batches:
        raise TypeError("micro_batches must be a non-empty list of (ids, targets) pairs")
    for pair in micro_batches:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise TypeError("micro_batches must hold (ids, targets) pairs")
        x, y = pair
        if not isinstance(y, torch.Tensor) or not isinstance(x, torch.Tensor):
            raise TypeError("micro_batches must hold (ids, targets) pairs of tensors")
        if y.shape != x.shape or y.dtype != torch.int64:
            raise ValueError(
                f"micro_batches targets ({y.dtype}, {tuple(y.shape)}) must be int64 shaped "
                f"like their ids {tuple(x.shape)}"
            )
    if not isinstance(bf16, bool):
        raise TypeError(f"bf16 ({bf16!r}) must be a bool")


def _check_max_norm(max_norm) -> None:
    """clip_grad_norm's door: max_norm > 0 (math.inf: measure the norm, clip nothing)."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"max_norm ({max_norm!r}) must be a real number")
    if not max_norm > 0:
        raise ValueError(f"max_norm ({max_norm}) must be > 0 (math.inf: no clipping)")


def _check_schedule(step, max_lr, warmup_steps, decay_steps, total_steps, min_lr_ratio) -> None:
    """The schedules' door: steps are ints >= 0, the phases fit, lr >= 0, 0 <= ratio <= 1."""
    for name, value in (
        ("step", step),
        ("warmup_steps", warmup_steps),
        ("decay_steps", decay_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} ({value!r}) must be an int")
        if value < 0:
            raise ValueError(f"{name} ({value}) must be >= 0")
    _check_sizes(total_steps=total_steps)
    if warmup_steps + decay_steps > total_steps:
        raise ValueError(
            f"warmup_steps + decay_steps ({warmup_steps} + {decay_steps}) must be <= "
            f"total_steps ({total_steps})"
        )
    if isinstance(max_lr, bool) or not isinstance(max_lr, numbers.Real):
        raise TypeError(f"max_lr ({max_lr!r}) must be a real number")
    if not math.isfinite(max_lr) or max_lr < 0:
        raise ValueError(f"max_lr ({max_lr}) must be finite and >= 0")
    if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, numbers.Real):
        raise TypeError(f"min_lr_ratio ({min_lr_ratio!r}) must be a real number")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio ({min_lr_ratio}) must lie in [0, 1]")


def _check_token_tensor(name: str, t, dims: int, min_len: int) -> None:
    """Token ids: an int64 tensor of ``dims`` dimensions, at least ``min_len`` along the last."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64 or t.dim() != dims or t.shape[-1] < min_len or not t.numel():
        raise ValueError(
            f"{name} ({t.dtype}, shape {tuple(t.shape)}) must be {dims}-D int64 with at least "
            f"{min_len} tokens along the last dimension"
        )


SCHEDULES = ("cosine", "wsd", "constant")


def _check_train_config(cfg: TrainConfig) -> None:
    """TrainConfig's door: counts >= 1, lr >= 0, a known schedule that fits in the steps."""
    _check_sizes(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        accum_steps=cfg.accum_steps,
        eval_every=cfg.eval_every,
    )
    for name in ("warmup_steps", "decay_steps", "seed"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} ({value!r}) must be an int")
        if value < 0:
            raise ValueError(f"{name} ({value}) must be >= 0")
    _check_adamw(cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule ({cfg.schedule!r}) must be one of {', '.join(SCHEDULES)}")
    if cfg.warmup_steps + (cfg.decay_steps if cfg.schedule == "wsd" else 0) > cfg.steps:
        raise ValueError(
            f"warmup_steps + decay_steps ({cfg.warmup_steps} + {cfg.decay_steps}) must be "
            f"<= steps ({cfg.steps})"
        )
    if isinstance(cfg.min_lr_ratio, bool) or not isinstance(cfg.min_lr_ratio, numbers.Real):
        raise TypeError(f"min_lr_ratio ({cfg.min_lr_ratio!r}) must be a real number")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio ({cfg.min_lr_ratio!r}) must lie in [0, 1]")
    if isinstance(cfg.grad_clip, bool) or not isinstance(cfg.grad_clip, numbers.Real):
        raise TypeError(f"grad_clip ({cfg.grad_clip!r}) must be a real number (math.inf: off)")
    if not cfg.grad_clip > 0:
        raise ValueError(f"grad_clip ({cfg.grad_clip}) must be > 0 (math.inf: no clipping)")
    if not isinstance(cfg.bf16, bool):
        raise TypeError(f"bf16 ({cfg.bf16!r}) must be a bool")


def _check_train_args(model_cfg, cfg, train_tokens, val_windows, checkpoint, stop_at) -> int:
    """train's door; returns the step to stop at."""
    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"seq_len ({cfg.seq_len}) must be <= max_seq_len ({model_cfg.max_seq_len})"
        )
    for name, t, dims in (("train_tokens", train_tokens, 1), ("val_windows", val_windows, 2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64 or t.dim() != dims or not t.numel():
            raise ValueError(f"{name} ({t.dtype}, shape {tuple(t.shape)}) must be {dims}-D int64")
        if int(t.min()) < 0 or int(t.max()) >= model_cfg.vocab_size:
            raise ValueError(f"{name} must lie in [0, vocab_size) = [0, {model_cfg.vocab_size})")
    if len(train_tokens) <= cfg.seq_len:
        raise ValueError(
            f"train_tokens ({len(train_tokens)} tokens) must be longer than seq_len ({cfg.seq_len})"
        )
    if val_windows.shape[1] < 2 or val_windows.shape[1] - 1 > model_cfg.max_seq_len:
        raise ValueError(
            f"val_windows (shape {tuple(val_windows.shape)}) must be windows of 2 .. "
            f"max_seq_len + 1 tokens"
        )
    stop_at = cfg.steps if stop_at is None else stop_at
    _check_sizes(stop_at=stop_at)
    if stop_at > cfg.steps:
        raise ValueError(f"stop_at ({stop_at}) must be <= steps ({cfg.steps})")
    if checkpoint is not None and (not isinstance(checkpoint, dict) or "step" not in checkpoint):
        raise TypeError("checkpoint must be the dict make_checkpoint returns")
    if checkpoint is not None and checkpoint["step"] >= stop_at:
        raise ValueError(f"checkpoint (at step {checkpoint['step']}) must be before {stop_at}")
    return stop_at


def _check_checkpoint(checkpoint, model: Llama) -> None:
    """A checkpoint must come from a model of the same config (shapes, vocabulary, ties)."""
    keys = {"model_config", "model", "optimizer", "step", "data_rng", "torch_rng", "history"}
    if not isinstance(checkpoint, dict) or not keys <= checkpoint.keys():
        raise TypeError(f"checkpoint must be a dict with the keys {sorted(keys)}")
    mine = dataclasses.asdict(model.config)
    if checkpoint["model_config"] != mine:
        diff = {k: v for k, v in checkpoint["model_config"].items() if mine.get(k) != v}
        raise ValueError(f"checkpoint is of another model: {diff} (this model: {mine})")


# ---- Checkpoints: what a resumed run needs ----


def make_checkpoint(model, optimizer, step, data_rng, history, cfg: TrainConfig) -> dict:
    """Everything a resumed run needs to continue the same trajectory: the weights, the
    optimizer's m, v and step counts, the next step (the schedule is a function of it), the
    sampler's RNG state (the data position), the global RNG state and the history so far."""
    return {
        "model_config": dataclasses.asdict(model.config),
        "train_config": dataclasses.asdict(cfg),
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data_rng": data_rng.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": {k: list(v) for k, v in history.items()},
    }


def load_checkpoint(checkpoint: dict, model, optimizer, data_rng) -> tuple[int, dict]:
    """Restore a ``make_checkpoint`` dict in place; returns (next step, history)."""
    _check_checkpoint(checkpoint, model)
    model.load_state_dict(checkpoint["model"], strict=True)
    optimizer.load_state_dict(checkpoint["optimizer"])
    data_rng.set_state(checkpoint["data_rng"])
    torch.set_rng_state(checkpoint["torch_rng"])
    return checkpoint["step"], {k: list(v) for k, v in checkpoint["history"].items()}


# ---- The data: tokenization.py's corpus and tokenizer ----


def get_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows of seq_len + 1 tokens: inputs (batch, seq_len) and the next tokens."""
    _check_sizes(batch_size=batch_size, seq_len=seq_len)
    _check_token_tensor("tokens", tokens, 1, min_len=seq_len + 1)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    starts = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]  # (batch, seq_len) each


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean token loss (5) over fixed windows (n, seq_len + 1), batch by batch."""
    _check_sizes(batch_size=batch_size)
    _check_token_tensor("windows", windows, 2, min_len=2)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for w in windows.split(batch_size):
        loss_sum, n = token_loss_sum(model(w[:, :-1]), w[:, 1:])
        total, count = total + loss_sum.item(), count + n
    model.train(was_training)
    return total / count


def _record_eval(model, val_windows, step, hist, on_eval) -> None:
    val = evaluate(model, val_windows)
    hist["val_step"].append(step)
    hist["val_loss"].append(val)
    if on_eval is not None:
        on_eval(step, model, val)


TOKENIZER_FILE = Path(__file__).resolve().parent / "docs/figures/tokenization/tokenizer.tiktoken"
TOKENIZER_VOCAB = 4096  # ranks of tokenization.py's default tokenizer


def load_data(tokenizer_file: Path | None = TOKENIZER_FILE) -> dict:
    """tokenization.py's corpus (CPython's help topics: train and held-out parts) and its
    tokenizer: loaded from ``tokenizer_file`` if present, else trained the same way (GPT-4
    pattern, 4096 ranks, on the train part). Returns the tokenizer, the token ids and sizes."""
    corpus = load_corpus()
    if tokenizer_file is not None and Path(tokenizer_file).is_file():
        tok = BPETokenizer.load(tokenizer_file, GPT4_PATTERN)
        path, root = Path(tokenizer_file).resolve(), Path(__file__).resolve().parent
        source = f"loaded {path.relative_to(root) if path.is_relative_to(root) else path}"
    else:
        tok = BPETokenizer.train(corpus["train"], TOKENIZER_VOCAB, GPT4_PATTERN)
        source = f"trained here ({TOKENIZER_VOCAB} ranks, GPT-4 pattern, as tokenization.py)"
    train_ids = torch.tensor(tok.encode_ordinary(corpus["train"]), dtype=torch.int64)
    val_ids = torch.tensor(tok.encode_ordinary(corpus["heldout"]), dtype=torch.int64)
    token_bytes = torch.tensor([len(tok.decode_bytes([i])) for i in range(tok.n_vocab)])
    info = {
        "corpus": corpus["source"],
        "split_rule": corpus["rule"],
        "tokenizer": source,
        "vocab_size": tok.n_vocab,
        "train_bytes": corpus["train_bytes"],
        "val_bytes": corpus["heldout_bytes"],
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "bytes_per_token": corpus["train_bytes"] / len(train_ids),
    }
    return {
        "tok": tok,
        "train": train_ids,
        "val": val_ids,
        "token_bytes": token_bytes,
        "info": info,
    }


def val_windows(val_ids: torch.Tensor, seq_len: int, max_windows: int | None = None):
    """Consecutive non-overlapping windows of seq_len + 1 tokens (each predicts seq_len)."""
    _check_sizes(seq_len=seq_len)
    n = (len(val_ids) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"val_ids ({len(val_ids)} tokens) must be longer than seq_len ({seq_len})")
    return torch.stack([val_ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "docs/figures/training"


def trained_model_dir(text: str) -> Path:
    """argparse type of a ``--model DIR`` flag: a folder holding this script's model.pt."""
    path = Path(text)
    if not (path / "model.pt").is_file():
        raise argparse.ArgumentTypeError(f"{path} holds no model.pt")
    return path


def load_trained_model(model_dir: Path | None, train_sizes: dict, seed: int) -> tuple:
    """The model this script's default run saved, for the scripts after it (evaluation,
    quantization, fine-tuning): ``model_dir/model.pt`` if it exists, else a small Llama trained
    here through ``train`` with ``train_sizes`` ({"model": ModelConfig fields, "train":
    TrainConfig fields without the seed, "val_windows": n}), saying which in ``info["source"]``.
    Returns (the model in eval mode, ``load_data()``'s dict, n validation windows, info)."""
    data = load_data()
    path = None if model_dir is None else Path(model_dir) / "model.pt"
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        cfg = ModelConfig(**saved["config"])
        model = Llama(cfg)
        model.load_state_dict(saved["state_dict"], strict=True)
        root = Path(__file__).resolve().parent
        shown = path.resolve().relative_to(root) if path.resolve().is_relative_to(root) else path
        source = f"loaded {shown}"
    else:
        m, t = train_sizes["model"], train_sizes["train"]
        cfg = ModelConfig(vocab_size=data["info"]["vocab_size"], max_seq_len=t["seq_len"], **m)
        tcfg = TrainConfig(**t, seed=seed)
        windows = val_windows(data["val"], t["seq_len"], 8)
        model = train(cfg, tcfg, data["train"], windows)["model"]
        why = "--quick" if model_dir is None else f"no {path.name} in {model_dir.name}/"
        source = f"trained here through training.train ({t['steps']} steps; {why})"
    model.eval()
    windows = val_windows(data["val"], cfg.max_seq_len, train_sizes["val_windows"])
    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "source": source,
        "config": dataclasses.asdict(cfg),
        "parameters": n_params,
        "val_windows": len(windows),
        "val_tokens": windows[:, 1:].numel(),
    }
    return model, data, windows, info


def ngram_baselines(train_ids: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> dict:
    """Mean token loss on the windows' targets of a unigram and a bigram model counted on the
    train tokens. Unigram: add-one smoothing. Bigram: interpolated with the unigram,
    p(b | a) = (c(a, b) + alpha p(b)) / (c(a) + alpha), alpha the best of a grid on these
    same targets, so the baseline is as strong as it can be made (it favours the baseline)."""
    uni = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    p_uni = uni / uni.sum()
    pair = train_ids[:-1] * vocab_size + train_ids[1:]
    counts = torch.bincount(pair, minlength=vocab_size * vocab_size).double()
    counts = counts.view(vocab_size, vocab_size)  # (previous token, next token)
    prev, nxt = windows[:, :-1].flatten(), windows[:, 1:].flatten()
    row_totals = counts.sum(-1)  # c(a): how often each token is followed by any token
    unigram = -p_uni[nxt].log().mean().item()
    bigram = {}
    for alpha in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0):
        p = (counts[prev, nxt] + alpha * p_uni[nxt]) / (row_totals[prev] + alpha)
        bigram[alpha] = -p.log().mean().item()
    best = min(bigram, key=bigram.get)
    return {"unigram": unigram, "bigram": bigram[best], "bigram_alpha": best}


def bits_per_byte(loss: float, windows: torch.Tensor, token_bytes: torch.Tensor) -> float:
    """(15): the mean token loss (nats) times the tokens, over ln 2 and the UTF-8 bytes."""
    targets = windows[:, 1:].flatten()
    return loss * len(targets) / math.log(2) / int(token_bytes[targets].sum())


def matmul_param_count(cfg: ModelConfig) -> int:
    """N in (13): the weights of every matmul (the LM head included; the embedding lookup and
    the norm gains are not matmuls)."""
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    attn = 2 * cfg.d_model * cfg.n_heads * hd + 2 * cfg.d_model * cfg.n_kv_heads * hd
    ffn = 3 * cfg.d_model * cfg.hidden_dim
    return cfg.n_layers * (attn + ffn) + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """(13): 6 N for the matmuls (forward 2 N, backward 4 N) + 12 n_layers d_attn T for
    attention's q k^T and p v (PaLM's count: the full T x T, as nanoGPT's estimate_mfu)."""
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    return 6 * matmul_param_count(cfg) + 12 * cfg.n_layers * cfg.n_heads * hd * seq_len


def matmul_peak_flops(shapes: list[tuple[int, int, int]], min_run_time: float) -> dict:
    """The matmul FLOP/s this machine reaches (one thread, fp32) at the model's shapes
    (m, k, n): 2 m k n / median time. The best is the peak MFU is measured against."""
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / median_time_s(lambda a=a, b=b: a @ b, min_run_time)
    return {"per_shape": rates, "peak": max(rates.values())}


class SavedTensorBytes:
    """Bytes of the tensors autograd saves for backward (the activations), counted once per
    storage and without the parameters: ``with SavedTensorBytes(model) as s: loss = ...``."""

    def __init__(self, model: nn.Module) -> None:
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.param_ptrs:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def activation_bytes_formula(cfg: ModelConfig, batch_size: int, seq_len: int) -> dict:
    """fp32 activations saved for backward, per token, from what each op keeps (the fused
    attention kernel keeps its log-sum-exp, not the T x T probabilities): per layer, each of
    the two RMSNorms 3 d + 1 (input, 1/rms, normalised, scaled), attention 2 q + 2 kv + h
    (roped q and k, v, output, log-sum-exp), SwiGLU 4 hidden_dim (gate, up, silu, product);
    then the final norm 3 d + 1 and the logits' log-softmax, vocab_size numbers (which
    dominate when the vocabulary is large); the int64 ids and targets, 2 + 2. RoPE's cos/sin
    tables and the causal mask (per layer, not per token) are left out."""
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    d, q, kv, f, h = cfg.d_model, cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.hidden_dim, cfg.n_heads
    per_layer = 2 * (3 * d + 1) + 2 * q + 2 * kv + h + 4 * f
    per_token = cfg.n_layers * per_layer + (3 * d + 1) + cfg.vocab_size + 4
    return {"per_token_numbers": per_token, "bytes": 4 * batch_size * seq_len * per_token}


def to_hf_llama(cfg: ModelConfig):
    """A randomly initialised transformers ``LlamaForCausalLM`` of this config (eager
    attention, float32); needs transformers (the dev group)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        intermediate_size=cfg.hidden_dim,
        max_position_embeddings=cfg.max_seq_len,
        head_dim=cfg.head_dim or cfg.d_model // cfg.n_heads,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(hf_cfg).float().eval()


# =============================================================================
# 4. Experiments: parity with the references, the loop's pieces, the training run, claims
# =============================================================================


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


PARITY_CASES = {  # name -> ModelConfig overrides of a tiny Llama
    "gqa_tied": {"n_heads": 4, "n_kv_heads": 2, "tie_embeddings": True},
    "gqa_untied": {"n_heads": 4, "n_kv_heads": 2, "tie_embeddings": False},
    "mha_untied": {"n_heads": 4, "n_kv_heads": 4, "tie_embeddings": False},
    "mqa_rope_theta_500000": {"n_heads": 4, "n_kv_heads": 1, "rope_base": 500000.0},
}


def check_hf_parity(seq_len: int = 24) -> dict:
    """Our Llama against transformers' LlamaForCausalLM with the same weights: the state_dict
    loads with strict=True both ways, and the logits agree; generate with the cache equals
    greedy decoding by full recomputation."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {"skipped": "transformers is not installed (it is in the dev group)"}
    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, overrides in PARITY_CASES.items():
        base = {"vocab_size": 101, "d_model": 64, "n_layers": 2, "hidden_dim": 96}
        cfg = ModelConfig(**base, max_seq_len=64, **overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            hf, ours, back = to_hf_llama(cfg), Llama(cfg).eval(), to_hf_llama(cfg)
        ours.load_state_dict(hf.state_dict(), strict=True)  # HF -> ours
        back.load_state_dict(ours.state_dict(), strict=True)  # ours -> HF
        ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=gen)
        with torch.no_grad():
            ref = hf(ids).logits
            err = max_abs_err(ours(ids), ref)
            err_back = max_abs_err(back(ids).logits, ref)
        out[name] = {"max_abs_err": err, "roundtrip_max_abs_err": err_back, **overrides}
    cfg = ModelConfig(
        vocab_size=101,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=96,
        max_seq_len=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = Llama(cfg).eval()
    prompt = torch.randint(0, 101, (2, 5), generator=gen)
    cached = model.generate(prompt, 20)
    full = prompt
    with torch.no_grad():
        for _ in range(20):
            full = torch.cat([full, model(full)[:, -1:].argmax(-1)], dim=1)
    out["generate_cached_equals_recompute"] = bool(torch.equal(cached, full))
    out["worst_max_abs_err"] = max(
        max(r["max_abs_err"], r["roundtrip_max_abs_err"])
        for r in out.values()
        if isinstance(r, dict)
    )
    return out


def _tiny_setup(seed: int = 0):
    """A tiny Llama and a toy token stream for the loop checks."""
    cfg = ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        max_seq_len=32,
    )
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (2000,), generator=g)
    return cfg, tokens, g


def check_adamw(steps: int = 50) -> dict:
    """Our AdamW against torch.optim.AdamW: the same model, grouping and gradients, 50 steps."""
    cfg, tokens, g = _tiny_setup()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ours = Llama(cfg)
    ref = Llama(cfg)
    ref.load_state_dict(ours.state_dict())
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    opt_ours = AdamW(param_groups(ours, 0.1), **kw)
    opt_ref = torch.optim.AdamW(param_groups(ref, 0.1), **kw)
    for _ in range(steps):
        batch = [get_batch(tokens, 4, 16, g)]
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            accumulate_gradients(model, batch)
            opt.step()
            opt.zero_grad()
    err = max(max_abs_err(a, b) for a, b in zip(ours.parameters(), ref.parameters(), strict=True))
    moved = max(
        max_abs_err(a, b) for a, b in zip(ours.parameters(), Llama(cfg).parameters(), strict=True)
    )
    return {"steps": steps, "max_abs_err": err, "max_param_change": moved}


def check_schedules(steps: int = 100, warmup: int = 10, decay: int = 30) -> dict:
    """Our schedules against transformers' (LambdaLR factors times the peak lr)."""
    try:
        from transformers import (
            get_cosine_schedule_with_warmup,
            get_cosine_with_min_lr_schedule_with_warmup,
            get_wsd_schedule,
        )
    except ImportError:
        return {"skipped": "transformers is not installed (it is in the dev group)"}
    peak = 3e-3

    def trace(make) -> list[float]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
        sched, lrs = make(opt), []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs

    cases = {
        "cosine": (
            lambda o: get_cosine_schedule_with_warmup(o, warmup, steps),
            lambda s: cosine_lr(s, peak, warmup, steps, 0.0),
        ),
        "cosine_min_lr_0.1": (
            lambda o: get_cosine_with_min_lr_schedule_with_warmup(
                o, warmup, steps, min_lr_rate=0.1
            ),
            lambda s: cosine_lr(s, peak, warmup, steps, 0.1),
        ),
        "wsd_min_lr_0.1": (
            lambda o: get_wsd_schedule(o, warmup, decay, steps, min_lr_ratio=0.1),
            lambda s: wsd_lr(s, peak, warmup, decay, steps, 0.1),
        ),
    }
    out = {}
    for name, (make, ours) in cases.items():
        ref = trace(make)
        out[name] = max(abs(ours(s) - r) for s, r in enumerate(ref))
    out["worst"] = max(out.values())
    return out


def check_clipping() -> dict:
    """Our clip_grad_norm against torch.nn.utils.clip_grad_norm_ (norm and clipped grads)."""
    cfg, tokens, g = _tiny_setup()
    model = Llama(cfg)
    accumulate_gradients(model, [get_batch(tokens, 4, 16, g)])
    grads = [p.grad.clone() for p in model.parameters()]
    out = {}
    for max_norm in (0.01, 1e6):
        params = [nn.Parameter(torch.zeros_like(q)) for q in grads]
        ref_params = [nn.Parameter(torch.zeros_like(q)) for q in grads]
        for p, r, q in zip(params, ref_params, grads, strict=True):
            p.grad, r.grad = q.clone(), q.clone()
        norm = clip_grad_norm(params, max_norm)
        ref = torch.nn.utils.clip_grad_norm_(ref_params, max_norm).item()
        err = max(max_abs_err(p.grad, r.grad) for p, r in zip(params, ref_params, strict=True))
        out[f"max_norm_{max_norm:g}"] = {"norm": norm, "norm_err": abs(norm - ref), "grad_err": err}
    out["worst"] = max(max(v["norm_err"], v["grad_err"]) for v in out.values())
    return out


def check_accumulation() -> dict:
    """Micro-batches of unequal length, one of them padded (IGNORE targets), accumulated with
    token weights (12), against the one big padded batch; and the naive mean-over-k."""
    cfg, tokens, g = _tiny_setup()
    model = Llama(cfg)
    lengths = [(3, 20), (1, 6), (2, 11)]  # (windows, seq_len): 60, 6 and 22 predicted tokens
    micro = [get_batch(tokens, b, s, g) for b, s in lengths]
    x, y = micro[2]
    y = y.clone()
    y[1, 7:] = IGNORE  # padding inside a micro-batch: 4 targets that must not count
    micro[2] = (x, y)
    longest = max(s for _, s in lengths)
    big_x = torch.cat([F.pad(x, (0, longest - x.shape[1])) for x, _ in micro])
    big_y = torch.cat([F.pad(y, (0, longest - y.shape[1]), value=IGNORE) for _, y in micro])

    def grads_of(fn) -> list[torch.Tensor]:
        model.zero_grad()
        loss = fn()
        return loss, [p.grad.clone() for p in model.parameters()]

    def big() -> float:
        loss_sum, n = token_loss_sum(model(big_x), big_y)
        (loss_sum / n).backward()
        return loss_sum.item() / n

    def naive() -> float:  # the mistake: mean loss per micro-batch, divided by k
        total = 0.0
        for x, y in micro:
            loss_sum, n = token_loss_sum(model(x), y)
            (loss_sum / n / len(micro)).backward()
            total += loss_sum.item() / n / len(micro)
        return total

    big_loss, ref = grads_of(big)
    acc_loss, acc = grads_of(lambda: accumulate_gradients(model, micro))
    naive_loss, wrong = grads_of(naive)
    return {
        "tokens_per_micro_batch": [int((y != IGNORE).sum()) for _, y in micro],
        "token_weighted_grad_err": max(max_abs_err(a, b) for a, b in zip(acc, ref, strict=True)),
        "token_weighted_loss_err": abs(acc_loss - big_loss),
        "naive_grad_err": max(max_abs_err(a, b) for a, b in zip(wrong, ref, strict=True)),
        "naive_loss_err": abs(naive_loss - big_loss),
    }


def check_resume(steps: int = 12, stop: int = 5) -> dict:
    """An uninterrupted run against one stopped at ``stop`` and resumed from its checkpoint
    (through torch.save and torch.load), and a second uninterrupted run (determinism)."""
    cfg, tokens, _ = _tiny_setup()
    windows = val_windows(tokens[:400], 16)
    tc = TrainConfig(
        steps=steps, batch_size=4, seq_len=16, accum_steps=2, warmup_steps=3, eval_every=4
    )
    full = train(cfg, tc, tokens, windows)["history"]
    again = train(cfg, tc, tokens, windows)["history"]
    first = train(cfg, tc, tokens, windows, stop_at=stop)
    buffer = io.BytesIO()
    torch.save(first["checkpoint"], buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=False)
    resumed = train(cfg, tc, tokens, windows, checkpoint=ckpt)["history"]
    return {
        "steps": steps,
        "stopped_at": stop,
        "resumed_losses_identical": resumed["loss"] == full["loss"],
        "resumed_val_identical": resumed["val_loss"] == full["val_loss"],
        "rerun_identical": again["loss"] == full["loss"],
        "max_loss_diff": max(
            abs(a - b) for a, b in zip(resumed["loss"], full["loss"], strict=True)
        ),
    }


def check_loop() -> dict:
    """Every piece of the loop against its reference."""
    return {
        "adamw": check_adamw(),
        "schedules": check_schedules(),
        "clipping": check_clipping(),
        "accumulation": check_accumulation(),
        "resume": check_resume(),
    }


PROMPT = "The "  # the start of every generated sample


def run_default_training(
    data: dict, model_cfg: ModelConfig, cfg: TrainConfig, windows, sizes: dict, prompt: str = PROMPT
) -> dict:
    """Train the model of ``model_cfg`` on the corpus, printing progress; generate a sample
    from ``prompt`` at ``n_samples`` evaluation points (the first, the last, evenly between).
    Returns the trained run, its history, the samples, tokens/s and MFU's numerator."""
    sample_tokens, n_samples = sizes["sample_tokens"], sizes["n_samples"]
    evals = list(range(0, cfg.steps, cfg.eval_every)) + [cfg.steps]
    picks = {evals[round(i * (len(evals) - 1) / (n_samples - 1))] for i in range(n_samples)}
    tok, samples, start = data["tok"], [], time.perf_counter()
    prompt_ids = torch.tensor([tok.encode_ordinary(prompt)])

    def on_eval(step: int, model: Llama, val: float) -> None:
        print(
            f"  step {step:>4}/{cfg.steps}  val loss {val:.3f}  "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        if step in picks:
            g = torch.Generator().manual_seed(0)
            ids = model.generate(prompt_ids, sample_tokens, 0.8, 40, g)[0].tolist()
            samples.append({"step": step, "val_loss": val, "text": tok.decode(ids)})

    run = train(model_cfg, cfg, data["train"], windows, on_eval=on_eval)
    tokens = cfg.steps * cfg.accum_steps * cfg.batch_size * cfg.seq_len
    flops = flops_per_token(model_cfg, cfg.seq_len)
    return {
        **run,
        "samples": samples,
        "tokens_trained": tokens,
        "epochs": tokens / len(data["train"]),
        "train_seconds": run["train_seconds"],
        "step_seconds": run["train_seconds"] / cfg.steps,
        "step_cpu_seconds": run["train_cpu_seconds"] / cfg.steps,
        "tokens_per_s": tokens / run["train_seconds"],
        "flops_per_token": flops,
        "achieved_flops": flops * tokens / run["train_seconds"],
    }


def memory_account(model: Llama, batch) -> dict:
    """The bytes of one training step, measured from the real tensors (16), next to the
    formula: weights, gradients and AdamW's m and v (4 N, 4 N, 8 N in fp32) and the
    activations autograd saves for backward (``SavedTensorBytes``)."""
    model = Llama(model.config)
    n = sum(p.numel() for p in model.parameters())  # a tied tensor once
    opt = AdamW(param_groups(model, 0.1), lr=1e-4)
    with SavedTensorBytes(model) as saved:
        logits = model(batch[0])
        loss_sum, count = token_loss_sum(logits, batch[1])
    (loss_sum / count).backward()
    opt.step()
    measured = {
        "parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()),
        "optimizer": sum(
            t.numel() * t.element_size()
            for s in opt.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        ),
        "activations": saved.nbytes,
    }
    b, s = batch[0].shape
    formula = {
        "parameters": 4 * n,
        "gradients": 4 * n,
        "optimizer": 8 * n,
        "activations": activation_bytes_formula(model.config, b, s)["bytes"],
    }
    return {
        "n_params": n,
        "batch": b,
        "seq_len": s,
        "measured": measured,
        "formula": formula,
        "exact": all(measured[k] == formula[k] for k in ("parameters", "gradients", "optimizer")),
    }


def measure_bf16(model: Llama, batch, rounds: int, min_run_time: float) -> dict:
    """bf16 autocast on this device against fp32: the loss of the same batch under each, and
    the time of a forward + backward, in rounds that alternate the two (medians, spread)."""
    x, y = batch
    losses = {}
    with torch.no_grad():
        for name, on in (("fp32", False), ("bf16", True)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
                loss_sum, n = token_loss_sum(model(x), y)
            losses[name] = loss_sum.item() / n

    def step(on: bool) -> None:
        accumulate_gradients(model, [batch], on)
        model.zero_grad(set_to_none=True)

    times = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for name, on in (("fp32", False), ("bf16", True)):
            times[name].append(median_time_s(lambda on=on: step(on), min_run_time))
    ratios = [a / b for a, b in zip(times["fp32"], times["bf16"], strict=True)]
    return {
        "loss_fp32": losses["fp32"],
        "loss_bf16": losses["bf16"],
        "loss_abs_diff": abs(losses["bf16"] - losses["fp32"]),
        "step_ms_fp32": 1e3 * statistics.median(times["fp32"]),
        "step_ms_bf16": 1e3 * statistics.median(times["bf16"]),
        "speedup": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "rounds": rounds,
    }


ABLATIONS = {  # name -> TrainConfig overrides of the tiny baseline run
    "warm-up + cosine + clip": {},
    "no warm-up": {"warmup_steps": 0},
    "no clipping": {"grad_clip": math.inf},
    "constant LR": {"schedule": "constant", "warmup_steps": 0},
}


def run_ablation(data: dict, model_cfg: ModelConfig, base: TrainConfig, windows) -> dict:
    """The same tiny model and data trained with one part of the recipe removed at a time."""
    out = {}
    for name, overrides in ABLATIONS.items():
        run = train(model_cfg, dataclasses.replace(base, **overrides), data["train"], windows)
        h = run["history"]
        out[name] = {
            "val_step": h["val_step"],
            "val_loss": h["val_loss"],
            "loss": h["loss"],
            "final_val_loss": h["val_loss"][-1],
            "max_grad_norm": max(h["grad_norm"]),
        }
        print(f"  {name:<24} final val loss {h['val_loss'][-1]:.3f}", flush=True)
    return out


def measure_baselines(data: dict, model_cfg: ModelConfig, windows, sizes: dict) -> dict:
    """The losses to beat, on the same validation windows: the untrained model (its seed is
    the run's), unigram and bigram counts; and the matmul FLOP/s that MFU is measured against."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = evaluate(Llama(model_cfg), windows)
    tokens = 512
    shapes = [
        (tokens, model_cfg.d_model, model_cfg.hidden_dim),
        (tokens, model_cfg.d_model, model_cfg.vocab_size),
        (512, 512, 512),
    ]
    peak = matmul_peak_flops(shapes, sizes["peak_min_run_time"])
    return {
        "untrained": untrained,
        **ngram_baselines(data["train"], windows, model_cfg.vocab_size),
        "val_windows": len(windows),
        "val_tokens_predicted": windows[:, 1:].numel(),
        "peak_gflops": peak["peak"] / 1e9,
        "matmul_gflops": {k: v / 1e9 for k, v in peak["per_shape"].items()},
    }


def summarize_run(run: dict, data: dict, windows, baselines: dict) -> tuple[dict, dict]:
    """The numbers of the main run for results.json, and its MFU (None if above 100%)."""
    model_cfg, train_cfg = run["model"].config, run["train_config"]
    h = run["history"]
    final = h["val_loss"][-1]
    info = {
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": {k: v for k, v in dataclasses.asdict(train_cfg).items()},
        "n_params": sum(p.numel() for p in run["model"].parameters()),
        "final_val_loss": final,
        "final_bpb": bits_per_byte(final, windows, data["token_bytes"]),
        "bigram_bpb": bits_per_byte(baselines["bigram"], windows, data["token_bytes"]),
        "unigram_bpb": bits_per_byte(baselines["unigram"], windows, data["token_bytes"]),
        "final_train_loss": h["loss"][-1],
        **{
            k: run[k]
            for k in (
                "samples",
                "tokens_trained",
                "epochs",
                "train_seconds",
                "train_cpu_seconds",
                "step_seconds",
                "step_cpu_seconds",
                "tokens_per_s",
                "flops_per_token",
            )
        },
        "history": {k: h[k] for k in ("val_step", "val_loss")},
    }
    mfu = run["achieved_flops"] / (baselines["peak_gflops"] * 1e9)
    return info, {
        "achieved_gflops": run["achieved_flops"] / 1e9,
        "peak_gflops": baselines["peak_gflops"],
        "mfu": mfu if 0 < mfu <= 1 else None,
        "formula": "6 N + 12 n_layers d_attn seq_len FLOPs per token, N = matmul weights",
    }


def measure_step(model: Llama, data: dict, cfg: TrainConfig, sizes: dict) -> tuple[dict, dict]:
    """The memory account and the bf16 measurement, on one batch of the main run's shape."""
    batch = get_batch(
        data["train"], cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed)
    )
    memory = memory_account(model, batch)
    return memory, measure_bf16(model, batch, sizes["bf16_rounds"], sizes["bf16_min_run_time"])


def loss_title(val: float, bigram: float, unigram: float) -> str:
    """The loss figure's title, from the numbers: where the model ended against the baselines."""
    if val < bigram:
        return (
            f"Validation loss {val:.2f} ends below the bigram baseline ({bigram:.2f}): "
            f"the model uses more than the previous token"
        )
    if val < unigram:
        return (
            f"Validation loss {val:.2f} beats the unigram ({unigram:.2f}) but not the "
            f"bigram baseline ({bigram:.2f}) in this run"
        )
    return (
        f"Validation loss {val:.2f} did not get below the unigram baseline ({unigram:.2f}) "
        f"in this run"
    )


def ablation_title(ablation: dict) -> str:
    """The ablation figure's title: which variant ended lowest, and by how much."""
    finals = {k: v["final_val_loss"] for k, v in ablation.items()}
    best = min(finals, key=finals.get)
    ordered = sorted(finals.values())
    gap = ordered[1] - ordered[0] if len(ordered) > 1 else 0.0
    return f"Lowest final validation loss: {best} ({finals[best]:.3f}, {gap:.3f} below the next)"


def training_claims(results: dict) -> dict:
    """The claims, each a sentence computed from the measured numbers of ``results``."""
    parity, loop, baselines = results["parity"], results["loop"], results["baselines"]
    run_info, mfu, memory, bf16 = (results[k] for k in ("run", "mfu", "memory", "bf16"))
    val, bigram = run_info["final_val_loss"], baselines["bigram"]
    claims = {
        "below_bigram": claim(
            f"validation loss {val:.3f} ({run_info['final_bpb']:.3f} bits per byte) is "
            + (f"{bigram - val:.3f} below" if val < bigram else f"{val - bigram:.3f} above")
            + f" the bigram baseline {bigram:.3f} of the same tokens",
            val < bigram,
            val_loss=val,
            bigram=bigram,
        ),
    }
    if "skipped" not in parity:
        err = parity["worst_max_abs_err"]
        claims["parity"] = claim(
            f"our Llama's logits match LlamaForCausalLM's with the same weights to {err:.1e} "
            f"(GQA, MHA, MQA, tied and untied, rope_theta 500000; limit 1e-5)"
            + (
                ""
                if parity["generate_cached_equals_recompute"]
                else "; but cached generation differs from recomputation"
            ),
            err <= 1e-5 and parity["generate_cached_equals_recompute"],
            max_abs_err=err,
        )
    adamw = loop["adamw"]["max_abs_err"]
    claims["adamw"] = claim(
        f"our AdamW matches torch.optim.AdamW over {loop['adamw']['steps']} steps to "
        f"{adamw:.1e} (limit 1e-6)",
        adamw <= 1e-6,
        max_abs_err=adamw,
    )
    if "skipped" not in loop["schedules"]:
        sched = loop["schedules"]["worst"]
        claims["schedules"] = claim(
            f"our cosine and warmup-stable-decay schedules match transformers' to {sched:.1e}",
            sched <= 1e-12,
            max_abs_err=sched,
        )
    clip = loop["clipping"]["worst"]
    claims["clipping"] = claim(
        f"our clipping matches torch.nn.utils.clip_grad_norm_ to {clip:.1e}",
        clip <= 1e-6,
        max_abs_err=clip,
    )
    acc = loop["accumulation"]
    claims["accumulation"] = claim(
        f"token-weighted accumulation of micro-batches of {acc['tokens_per_micro_batch']} tokens "
        f"gives the big batch's gradient to {acc['token_weighted_grad_err']:.1e}; averaging "
        f"per micro-batch is off by {acc['naive_grad_err']:.1e}",
        acc["token_weighted_grad_err"] <= 1e-6 < acc["naive_grad_err"],
        max_abs_err=acc["token_weighted_grad_err"],
        naive_max_abs_err=acc["naive_grad_err"],
    )
    res = loop["resume"]
    claims["resume"] = claim(
        f"a run resumed at step {res['stopped_at']} "
        + ("reproduces" if res["resumed_losses_identical"] else "does not reproduce")
        + f" the uninterrupted run's {res['steps']} losses exactly",
        res["resumed_losses_identical"] and res["resumed_val_identical"],
        max_loss_diff=res["max_loss_diff"],
    )
    m = mfu["mfu"]
    claims["mfu"] = claim(
        f"training reached {m:.0%} of the matmul FLOP/s measured on this machine "
        f"({mfu['achieved_gflops']:.1f} of {mfu['peak_gflops']:.1f} GFLOP/s)"
        if m is not None
        else "MFU is not reported: the measured peak was below the achieved rate",
        m is not None and 0 < m <= 1,
        mfu=m,
    )
    claims["memory"] = claim(
        "weights, gradients and AdamW state measured from the tensors "
        + ("equal" if memory["exact"] else "differ from")
        + " 4 N, 4 N and 8 N bytes",
        memory["exact"],
    )
    finals = {k: v["final_val_loss"] for k, v in results["ablation"].items()}
    claims["ablation"] = claim(
        ablation_title(results["ablation"]) + " (tiny model, one seed)",
        min(finals, key=finals.get) == next(iter(finals)),
        **{k.replace(" ", "_").replace("+", "and"): v for k, v in finals.items()},
    )
    faster = bf16["speedup"]
    claims["bf16"] = claim(
        "bf16 autocast on this CPU: a training step "
        + (
            f"{faster:.2f} x faster"
            if bf16["speedup_min"] > 1
            else f"{1 / faster:.2f} x slower"
            if bf16["speedup_max"] < 1
            else f"not measurably faster ({faster:.2f} x, spread {bf16['speedup_min']:.2f}-"
            f"{bf16['speedup_max']:.2f})"
        )
        + f", loss changed by {bf16['loss_abs_diff']:.1e}",
        bf16["speedup_min"] > 1,
        speedup=faster,
    )
    return claims


# =============================================================================
# 5. Figures (one function per figure, each returns the Figure)
# =============================================================================


def plot_loss(history: dict, baselines: dict, title: str) -> plt.Figure:
    """Train loss per step and validation loss, with the baselines as horizontal lines."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.plot(
        history["step"],
        history["loss"],
        color="tab:blue",
        alpha=0.5,
        lw=1,
        label="train loss (each step's batch)",
    )
    ax.plot(
        history["val_step"],
        history["val_loss"],
        "o-",
        color="tab:orange",
        label="validation loss (held-out topics)",
    )
    for key, colour, label in (
        ("untrained", "grey", "untrained model"),
        ("unigram", "tab:red", "unigram baseline"),
        ("bigram", "tab:green", "bigram baseline"),
    ):
        ax.axhline(
            baselines[key], color=colour, ls="--", lw=1.2, label=f"{label} ({baselines[key]:.2f})"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title, fontsize=9.5)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_lr_grad_norm(history: dict, grad_clip: float) -> plt.Figure:
    """The learning rate the schedule set at each step, and the gradient norm before clipping."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(history["step"], history["lr"], color="tab:purple")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("learning rate")
    ax1.set_title("Schedule: linear warm-up, cosine to a floor", fontsize=10)
    ax2.plot(history["step"], history["grad_norm"], color="tab:blue", lw=1)
    if math.isfinite(grad_clip):
        clipped = sum(g > grad_clip for g in history["grad_norm"])
        ax2.axhline(
            grad_clip,
            color="tab:red",
            ls="--",
            label=f"clip threshold {grad_clip:g} ({clipped} of {len(history['step'])} "
            f"steps clipped)",
        )
        ax2.legend(fontsize=8, loc="upper right")
    ax2.set_yscale("log")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("global gradient norm (before clipping)")
    ax2.set_title("Gradient norm", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_ablation(ablation: dict, title: str) -> plt.Figure:
    """Validation loss of the tiny runs side by side, and their final values."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    names = list(ablation)
    styles = ["-", "--", ":", "-."]  # curves that coincide (nothing was clipped) stay visible
    for i, name in enumerate(names):
        r = ablation[name]
        ax1.plot(
            r["val_step"],
            r["val_loss"],
            marker="o",
            ms=5 - i,
            ls=styles[i % 4],
            lw=2.2 - 0.4 * i,
            label=name,
            color=f"C{i}",
        )
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("validation loss (nats per token)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    finals = [ablation[n]["final_val_loss"] for n in names]
    bars = ax2.barh(names, finals, color=[f"C{i}" for i in range(len(names))])
    ax2.bar_label(bars, fmt="%.3f", fontsize=8)
    lo, hi = min(finals), max(finals)
    ax2.set_xlim(lo - 0.5 * (hi - lo + 0.05), hi + 0.5 * (hi - lo + 0.05))
    ax2.set_xlabel("final validation loss (nats per token)")
    ax2.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_memory(memory: dict) -> plt.Figure:
    """Bytes of one training step by kind: measured from the tensors next to the formula."""
    kinds = list(memory["measured"])
    fig, ax = plt.subplots(figsize=(8, 4))
    y = range(len(kinds))
    mib = 2**20
    m = [memory["measured"][k] / mib for k in kinds]
    f = [memory["formula"][k] / mib for k in kinds]
    b1 = ax.barh([i - 0.2 for i in y], m, height=0.4, label="measured from the tensors")
    b2 = ax.barh([i + 0.2 for i in y], f, height=0.4, label="formula (16)", alpha=0.7)
    ax.bar_label(b1, fmt="%.1f MiB", fontsize=8)
    ax.bar_label(b2, fmt="%.1f MiB", fontsize=8)
    ax.set_yticks(list(y), kinds)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.25 * max(m + f))
    ax.set_xlabel("MiB (fp32)")
    ax.set_title(
        f"Memory of one training step: {memory['n_params'] / 1e6:.2f} M parameters, batch "
        f"{memory['batch']} x {memory['seq_len']} tokens",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


# =============================================================================
# 6. Main
# =============================================================================

SIZES = {
    "quick": {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128},
        "train": {
            "steps": 30,
            "batch_size": 8,
            "seq_len": 32,
            "warmup_steps": 5,
            "eval_every": 10,
            "lr": 6e-3,
        },
        "val_windows": 24,
        "ablation_model": {
            "d_model": 32,
            "n_layers": 1,
            "n_heads": 2,
            "n_kv_heads": 1,
            "hidden_dim": 64,
        },
        "ablation_train": {
            "steps": 12,
            "batch_size": 4,
            "seq_len": 32,
            "warmup_steps": 4,
            "eval_every": 4,
            "lr": 1e-2,
        },
        "sample_tokens": 16,
        "n_samples": 2,
        "peak_min_run_time": 0.02,
        "bf16_rounds": 1,
        "bf16_min_run_time": 0.02,
    },
    "default": {
        # sized on this 2-core CPU: ~0.3 s per step when idle, ~2 minutes of training
        "model": {"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 384},
        "train": {
            "steps": 400,
            "batch_size": 16,
            "seq_len": 128,
            "warmup_steps": 30,
            "eval_every": 50,
            "lr": 6e-3,
        },
        "val_windows": None,  # all of the held-out text
        "ablation_model": {
            "d_model": 64,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "hidden_dim": 128,
        },
        "ablation_train": {
            "steps": 60,
            "batch_size": 8,
            "seq_len": 64,
            "warmup_steps": 10,
            "eval_every": 10,
            "lr": 1e-2,
        },
        "sample_tokens": 40,
        "n_samples": 4,
        "peak_min_run_time": 0.2,
        "bf16_rounds": 3,
        "bf16_min_run_time": 0.2,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser()
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="optimizer steps of the main run (default: 400, --quick: 30)",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="train the main run under bf16 autocast (default: fp32)"
    )
    return parse_flags(parser, argv)


def print_data(info: dict) -> None:
    print(
        f"  corpus {info['corpus']}: {info['train_bytes']:,} train bytes, "
        f"{info['val_bytes']:,} validation bytes ({info['split_rule']})"
    )
    print(
        f"  tokenizer: {info['tokenizer']}; {info['vocab_size']} ids, "
        f"{info['train_tokens']:,} train and {info['val_tokens']:,} validation tokens "
        f"({info['bytes_per_token']:.2f} bytes per token)"
    )


def print_parity(parity: dict) -> None:
    if "skipped" in parity:
        print(f"  skipped: {parity['skipped']}")
        return
    for name, r in parity.items():
        if isinstance(r, dict):
            print(
                f"  {name:<24} logits max |diff| {r['max_abs_err']:.1e} (ours <- HF), "
                f"{r['roundtrip_max_abs_err']:.1e} (HF <- ours), strict=True both ways"
            )
    print(
        f"  generate with the KV cache == greedy recomputation: "
        f"{parity['generate_cached_equals_recompute']}"
    )


def print_loop(loop: dict) -> None:
    a, s, c, acc, r = (
        loop[k] for k in ("adamw", "schedules", "clipping", "accumulation", "resume")
    )
    print(
        f"  AdamW vs torch.optim.AdamW, {a['steps']} steps: max |diff| {a['max_abs_err']:.1e} "
        f"(parameters moved up to {a['max_param_change']:.2f})"
    )
    if "skipped" in s:
        print(f"  schedules: skipped: {s['skipped']}")
    else:
        print(
            "  schedules vs transformers: "
            + ", ".join(f"{k} {v:.1e}" for k, v in s.items() if k != "worst")
        )
    print(f"  clipping vs clip_grad_norm_: max |diff| {c['worst']:.1e}")
    print(
        f"  accumulation, micro-batches of {acc['tokens_per_micro_batch']} tokens: "
        f"token-weighted grad max |diff| {acc['token_weighted_grad_err']:.1e}, naive "
        f"mean-over-k {acc['naive_grad_err']:.1e}"
    )
    print(
        f"  resume at step {r['stopped_at']} of {r['steps']}: losses identical "
        f"{r['resumed_losses_identical']}, rerun identical {r['rerun_identical']}"
    )


def print_baselines(baselines: dict) -> None:
    print(
        f"  untrained {baselines['untrained']:.3f}, unigram {baselines['unigram']:.3f}, "
        f"bigram {baselines['bigram']:.3f} (alpha {baselines['bigram_alpha']:g}) nats per "
        f"token; matmul peak {baselines['peak_gflops']:.1f} GFLOP/s (one thread)"
    )


def print_run(run_info: dict, mfu: dict) -> None:
    print(
        f"  {run_info['n_params']:,} parameters, {run_info['tokens_trained']:,} tokens "
        f"({run_info['epochs']:.1f} epochs) in {run_info['train_seconds']:.0f} s: "
        f"{run_info['step_seconds']:.2f} s per step ({run_info['step_cpu_seconds']:.2f} s of CPU "
        f"time), {run_info['tokens_per_s']:,.0f} tokens/s"
    )
    print(
        f"  final validation loss {run_info['final_val_loss']:.3f} nats per token, "
        f"{run_info['final_bpb']:.3f} bits per byte; MFU "
        + ("not reported (above 100%: a wrong peak)" if mfu["mfu"] is None else f"{mfu['mfu']:.0%}")
    )
    for s in run_info["samples"]:
        print(f"  sample at step {s['step']} (val {s['val_loss']:.2f}): {s['text']!r}")


def print_memory(memory: dict, bf16: dict) -> None:
    for k, v in memory["measured"].items():
        f = memory["formula"][k]
        print(f"  {k:<12} measured {v / 2**20:8.2f} MiB   formula {f / 2**20:8.2f} MiB")
    print(
        f"  bf16 autocast: loss {bf16['loss_bf16']:.4f} vs fp32 {bf16['loss_fp32']:.4f}; "
        f"step {bf16['step_ms_bf16']:.0f} ms vs {bf16['step_ms_fp32']:.0f} ms "
        f"({bf16['speedup']:.2f} x, rounds {bf16['speedup_min']:.2f}-{bf16['speedup_max']:.2f})"
    )


def main_configs(args, sizes: dict, data: dict) -> tuple[ModelConfig, TrainConfig, torch.Tensor]:
    """The main run's model and training configs, and its validation windows."""
    t = dict(sizes["train"])
    if args.steps is not None:
        t["steps"] = args.steps
        t["warmup_steps"] = min(t["warmup_steps"], args.steps // 10)
        t["eval_every"] = max(1, min(t["eval_every"], args.steps))
    model_cfg = ModelConfig(
        vocab_size=data["info"]["vocab_size"], max_seq_len=t["seq_len"], **sizes["model"]
    )
    train_cfg = TrainConfig(**t, bf16=args.bf16, seed=args.seed)
    return model_cfg, train_cfg, val_windows(data["val"], t["seq_len"], sizes["val_windows"])


def ablation_configs(sizes: dict, data: dict, args) -> tuple:
    """The tiny model, baseline TrainConfig and validation windows of the ablation."""
    t = sizes["ablation_train"]
    model_cfg = ModelConfig(
        vocab_size=data["info"]["vocab_size"], max_seq_len=t["seq_len"], **sizes["ablation_model"]
    )
    windows = val_windows(data["val"], t["seq_len"], 32)
    return model_cfg, TrainConfig(**t, seed=args.seed), windows


def make_figures(run: dict, results: dict, train_cfg: TrainConfig) -> dict:
    base, ablation = results["baselines"], results["ablation"]
    title = loss_title(results["run"]["final_val_loss"], base["bigram"], base["unigram"])
    return {
        "loss": plot_loss(run["history"], base, title),
        "lr_grad_norm": plot_lr_grad_norm(run["history"], train_cfg.grad_clip),
        "ablation": plot_ablation(ablation, ablation_title(ablation)),
        "memory": plot_memory(results["memory"]),
    }


def model_files(model: Llama, tok: BPETokenizer) -> dict:
    """model.pt (state_dict and config, for torch.load) and tokenizer.tiktoken, as bytes."""
    buffer = io.BytesIO()
    torch.save(
        {"config": dataclasses.asdict(model.config), "state_dict": model.state_dict()}, buffer
    )
    return {
        "model.pt": buffer.getvalue(),
        "tokenizer.tiktoken": tiktoken_file_bytes(tok.mergeable_ranks),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)  # the loop runs on the CPU (the point is to read it)
    torch.set_num_threads(1)  # steady on a shared 2-core machine; the peak is timed on 1 too
    sizes = SIZES["quick" if args.quick else "default"]
    results: dict = {"meta": run_meta(args, device)}
    n = 7
    print(f"[1/{n}] loading the corpus and the tokenizer ...")
    data = load_data()
    results["data"] = data["info"]
    print_data(results["data"])
    print(f"[2/{n}] checking our Llama against transformers' LlamaForCausalLM ...")
    results["parity"] = check_hf_parity()
    print_parity(results["parity"])
    print(f"[3/{n}] checking AdamW, schedules, clipping, accumulation, resume ...")
    results["loop"] = check_loop()
    print_loop(results["loop"])
    print(f"[4/{n}] measuring the baselines and the matmul peak ...")
    model_cfg, train_cfg, windows = main_configs(args, sizes, data)
    results["baselines"] = measure_baselines(data, model_cfg, windows, sizes)
    print_baselines(results["baselines"])
    print(f"[5/{n}] training a {model_cfg.n_layers}-layer Llama for {train_cfg.steps} steps ...")
    run = run_default_training(data, model_cfg, train_cfg, windows, sizes)
    results["run"], results["mfu"] = summarize_run(run, data, windows, results["baselines"])
    print_run(results["run"], results["mfu"])
    print(f"[6/{n}] measuring memory and bf16 autocast ...")
    results["memory"], results["bf16"] = measure_step(run["model"], data, train_cfg, sizes)
    print_memory(results["memory"], results["bf16"])
    print(f"[7/{n}] ablation at a tiny size, claims and figures ...")
    results["ablation"] = run_ablation(data, *ablation_configs(sizes, data, args))
    results["claims"] = training_claims(results)
    print_claims(results["claims"])
    figures = make_figures(run, results, train_cfg)
    files = model_files(run["model"], data["tok"])
    save_outputs(args.out, figures, results, show=not args.no_show, files=files)
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
