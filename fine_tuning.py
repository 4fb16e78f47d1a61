"""Fine-tuning: full fine-tuning, LoRA, QLoRA and prefix tuning of a trained Llama, equal to peft.

The problem
-----------
A pre-trained model cannot yet do the task you have in mind. Training all of its weights on
the task (full fine-tuning) works, but every weight then needs a gradient and two AdamW
moments (16 bytes per parameter in fp32 before any activation), every task needs a whole new
copy of the model, and the model tends to forget what it knew. Parameter-efficient fine-tuning
keeps the pre-trained weights frozen and trains a small number of new parameters instead.

The idea
--------
1. LoRA (Hu et al.): next to a frozen linear W (out x in), learn a low-rank update B A with
   A (r x in) and B (out x r), r << min(in, out). B starts at zero, so training starts from
   the pre-trained model exactly. After training, B A can be added into W (merge): no extra
   cost at inference; or kept apart, one small adapter per task.
2. QLoRA (Dettmers et al.): the frozen W is stored in 4-bit NF4 with double quantization
   (``quantization.py``) and dequantized on the fly for each matmul; only LoRA on top trains,
   and gradients flow through the dequantized W to the adapter's input. The base costs ~4.1 bits
   per weight instead of 32. QLoRA computes in bf16 on a GPU (its eq. 5: X, the dequantized W and
   the adapters in bf16); here all of it is float32, because on this CPU bf16 is
   not faster through plain PyTorch and it changes the numbers: bitsandbytes' own CPU inference
   kernel, which casts to bf16, differs from its float32 path by ~3e-3 in the logits (measured
   in ``check_qlora_parity``).
3. Prefix tuning (Li and Liang): learn, for every layer, n virtual tokens' keys and values and
   put them in front of the real tokens' in the attention (here: written into the model's KV
   cache before the real tokens, so grouped-query attention's n_kv_heads < n_heads works).

The math
--------
For a frozen linear layer y = W x (W: out x in)::

    (1) LoRA:    y = W x + s B A dropout(x),     A: r x in (Kaiming uniform), B: out x r (zeros)
    (2) scaling: s = alpha / r   (LoRA),   (3) s = alpha / sqrt(r)   (rsLoRA, Kalajdzievski)
    (4) merge:   W' = W + s B A;   unmerge: W = W' - s B A
    (5) trainable parameters per layer: r (in + out)   vs   in * out for full fine-tuning
    (6) QLoRA:   y = dequant_NF4(W_q) x + s B A dropout(x)     (W_q frozen, ~4.127 bits/weight)
    (7) prefix:  attention of query i over [P_k; K] and [P_v; V], P_k, P_v: n_virtual x d per
                 layer and KV head; with prefix_projection P = MLP(E) = W2 tanh(W1 E + b1) + b2
    (8) the fraction of a matrix's energy a rank-r approximation keeps (Eckart-Young):
                 sum_{i <= r} sigma_i^2 / sum_i sigma_i^2
    (9) AdamW state: 2 numbers per trainable parameter (m, v), plus one step count per tensor

Where it is used
----------------
Hugging Face ``peft`` (LoRA, QLoRA through bitsandbytes, prefix tuning; the key names every
adapter on the Hub uses, and ours), the LoRA adapters served next to one base model (S-LoRA,
vLLM's multi-LoRA), QLoRA's Guanaco (a 65B model fine-tuned on one 48 GB GPU), rasbt's
LLMs-from-scratch appendix E (LoRA on GPT-2). Paged optimizers (QLoRA's third idea) page the
optimizer state to CPU RAM through CUDA unified memory when the GPU runs short; there is no
GPU here, so they are out of scope.

Run it
------
    uv run python fine_tuning.py                 # default run (run time: README, measured)
    uv run python fine_tuning.py --quick         # a tiny model trained here, a fast check
    uv run python fine_tuning.py --model DIR     # fine-tune DIR/model.pt (from training.py)

The default run fine-tunes ``docs/figures/training/model.pt`` (training.py's default run) when
it exists, else a small Llama trained through ``training.train``; results.json says which. It
checks LoRA, QLoRA and prefix tuning against peft (not under --quick: importing peft alone
takes longer than the whole quick run), chooses a learning rate per family (full fine-tuning,
LoRA, prefix tuning) on a dev split of the task, trains every method on a word-reversal task,
prints the comparison table and the claims, and saves the figures and ``results.json`` under
``--out`` (default ``figures/fine_tuning/``).

References
----------
- Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv 2106.09685.
- Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023,
  arXiv 2312.03732 (rsLoRA).
- Dettmers, Pagnoni, Holtzman and Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized
  LLMs", 2023, arXiv 2305.14314.
- Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", 2021,
  arXiv 2101.00190.
- Biderman et al., "LoRA Learns Less and Forgets Less", 2024, arXiv 2405.09673 (learning
  against forgetting over learning rates, the trade-off this script measures on its task).
- Lester, Al-Rfou and Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning",
  2021, arXiv 2104.08691 (prompt-based tuning closes the gap to fine-tuning only at scale).
- Reference code: huggingface/peft ``src/peft/tuners/lora/layer.py`` (``LoraLayer``,
  ``Linear``: ``update_layer``, ``reset_lora_parameters``, ``merge``, ``get_delta_weight``),
  ``src/peft/tuners/lora/bnb.py`` (``Linear4bit``), ``src/peft/tuners/prefix_tuning/model.py``
  (``PrefixEncoder``), ``src/peft/peft_model.py`` (``get_prompt``),
  ``src/peft/utils/save_and_load.py`` (``get_peft_model_state_dict``); microsoft/LoRA
  ``loralib/layers.py``; rasbt/LLMs-from-scratch ``appendix-E``.

Contents
--------
2. Core: ``LORA_TARGETS``, ``LoRALinear`` (1)-(5), ``apply_lora``, ``lora_layers``,
   ``merge_and_unload``, ``PEFT_PREFIX``, ``lora_state_dict``, ``load_lora_state_dict``,
   ``from_peft_state_dict``, ``qlora_model`` (6), ``KVPrefix`` and ``PrefixTunedLlama`` (7).
3. Baselines and apparatus: the door checks (``_check_lora_args``, ``_check_targets``,
   ``_check_prefix_args`` and the shared ``_check_sizes``, ``_check_positive``,
   ``_check_float_tensor``), ``trainable_parameters``; the task (``REVERSE_WORDS``,
   ``reversal_task``, ``task_info``, ``task_batch``, ``reversal_accuracy``); the methods
   (``TUNING_METHODS``, ``LORA_ALPHA_PER_R``, ``LR_FAMILIES``, ``lr_family``, ``tuning_label``,
   ``build_tuned_model``, ``answer_losses``, ``finetune_method``, ``train_step_memory`` (9));
   the references (``peft_modules``,
   ``parity_llama_config``, ``hf_and_our_llama``, ``save_peft_adapter``,
   ``qlora_from_bitsandbytes``).
4. Experiments: ``claim``, ``print_claims``, ``check_peft_parity``, ``check_qlora_parity``,
   ``check_prefix_parity``, ``check_own_rules``, ``pick_learning_rate``,
   ``choose_learning_rates``, ``compare_fine_tuning``, ``prefix_one_example``,
   ``benchmark_train_steps``, ``delta_w_spectra`` (8), ``accuracy_gap_phrase``,
   ``tuning_accuracy_title``, ``gentlest_rate``, ``fine_tuning_claims``.
5. Figures: ``METHOD_COLOURS``, ``MEMORY_PARTS``, ``plot_loss_curves``,
   ``plot_accuracy_vs_params``, ``plot_learning_vs_forgetting``, ``plot_memory``,
   ``plot_delta_w_spectra``.
6. Main: ``SIZES``, ``parse_args``, the ``print_*`` helpers, ``run_peft_parity``,
   ``fine_tuning_figures``, ``main``.
7. Plumbing (identical in every script).

Read first: ``LoRALinear`` (the whole of LoRA in its forward and ``merge``), ``apply_lora``,
then ``KVPrefix`` and ``PrefixTunedLlama``, then ``qlora_model``.
"""

from __future__ import annotations

import argparse
import copy
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
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn as nn

import training
from quantization import QuantizedLinear, quantize_model

# =============================================================================
# 2. Core: LoRA, QLoRA, prefix tuning
# =============================================================================

LORA_TARGETS = {  # peft's target_modules for a Llama
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all_linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update, y = W x + s B A dropout(x) (1).

    ``base_layer`` is an ``nn.Linear`` (LoRA) or ``quantization.QuantizedLinear`` (QLoRA);
    ``lora_A`` (r x in) starts Kaiming-uniform as ``nn.Linear``'s own init, ``lora_B``
    (out x r) at zero, so a new adapter leaves the model's output unchanged. The names are
    peft's (``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``), so the state_dict keys
    are peft's without its ``.default`` adapter name. Where it differs from peft's
    ``lora.Linear``: one adapter, not a dict of named ones; merging a merged layer (or
    unmerging an unmerged one) raises ``ValueError`` where peft warns and does nothing; and
    ``x`` is not cast to ``lora_A``'s dtype (peft casts it, then the sum back to the base's
    dtype): here the base and the adapter share one float dtype.

    >>> layer = LoRALinear(nn.Linear(64, 32, bias=False), r=4, alpha=8)
    >>> x = torch.randn(2, 64)
    >>> torch.equal(layer(x), layer.base_layer(x))  # B = 0: the same output at the start
    True
    >>> [n for n, p in layer.named_parameters() if p.requires_grad]  # the frozen W is not here
    ['lora_A.weight', 'lora_B.weight']
    >>> layer.scaling, layer.n_trainable  # (2) alpha / r, (5) r (in + out) = 4 * 96
    (2.0, 384)
    >>> _ = nn.init.normal_(layer.lora_B.weight)  # as if trained
    >>> before = layer(x)
    >>> layer.merge()  # (4) W += s B A: the same function, one matmul
    >>> torch.allclose(layer(x), before, atol=1e-5)
    True
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        _check_lora_args(base_layer, r, alpha, dropout, use_rslora)
        self.base_layer = base_layer.requires_grad_(False)  # frozen
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r  # (3) or (2)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False)  # r x in
        self.lora_B = nn.Linear(r, self.out_features, bias=False)  # out x r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's (and peft's)
        nn.init.zeros_(self.lora_B.weight)  # B A = 0 at the start
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as peft's layers expose it (``new_cache`` reads its dtype
        and device)."""
        return self.base_layer.weight

    @property
    def n_trainable(self) -> int:
        return self.r * (self.in_features + self.out_features)  # (5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # W x, frozen (dequantized on the fly under QLoRA (6))
        if self.merged:
            return y  # s B A lives inside W now
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # (1)

    def delta_weight(self) -> torch.Tensor:
        """s B A (out x in), the update LoRA adds to W (4)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """(4) W += s B A. Over a 4-bit base the sum is quantized again (as peft does for
        bitsandbytes): the merged layer then differs from the unmerged one by NF4's rounding."""
        if self.merged:
            raise ValueError("merge: the layer is already merged (merged=True); unmerge() first")
        self._set_base_weight(self.base_layer.weight + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """(4) W -= s B A: the inverse of ``merge`` (exact up to float rounding on a float base)."""
        if not self.merged:
            raise ValueError("unmerge: the layer is not merged (merged=False); merge() first")
        self._set_base_weight(self.base_layer.weight - self.delta_weight())
        self.merged = False

    def _set_base_weight(self, w: torch.Tensor) -> None:
        if isinstance(self.base_layer, nn.Linear):
            self.base_layer.weight.copy_(w)
            return
        plain = nn.Linear(self.in_features, self.out_features, bias=False)  # QLoRA: requantize
        plain.weight.copy_(w)
        new = QuantizedLinear.from_linear(plain, self.base_layer.scheme)
        for name, t in new.named_buffers():
            getattr(self.base_layer, name).copy_(t)


def apply_lora(
    model: nn.Module,
    target_modules: tuple | list,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap each linear layer whose name ends in one of
    ``target_modules`` (peft's rule: ``q_proj`` matches ``model.layers.0.self_attn.q_proj``)
    in a ``LoRALinear``, in place (as ``peft.get_peft_model``). Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_lora_args(None, r, alpha, dropout, use_rslora)
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | QuantizedLinear) and not isinstance(m, LoRALinear)
    }
    _check_targets(target_modules, linears)
    model.requires_grad_(False)
    for name, module in linears.items():
        if _is_lora_target(name, target_modules):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, LoRALinear(module, r, alpha, dropout, use_rslora))
    return model


def _is_lora_target(name: str, target_modules) -> bool:
    """peft's rule: a module is a target when its name is, or ends in ``.`` + , a target."""
    return any(name == t or name.endswith("." + t) for t in target_modules)


def lora_layers(model: nn.Module) -> dict:
    """Name -> ``LoRALinear`` of every adapted layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every ``LoRALinear`` (4) and put its base layer back in its place, in place (as
    peft's ``merge_and_unload``): a plain model again, with the same keys as before LoRA."""
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    return model


PEFT_PREFIX = "base_model.model."  # what a PeftModel puts before the wrapped model's keys


def _is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter as peft saves it (``get_peft_model_state_dict``): only ``lora_A``/``lora_B``,
    keys ``base_model.model.<path>.lora_A.weight`` (no ``.default``)."""
    return {
        PEFT_PREFIX + k: v.detach().clone()
        for k, v in model.state_dict().items()
        if _is_lora_key(k)
    }


def load_lora_state_dict(model: nn.Module, adapter: dict) -> None:
    """Load a peft-format adapter (``lora_state_dict``'s keys, or peft's saved
    ``adapter_model``) into ``model``'s LoRA layers, with ``strict=True``: every LoRA weight
    must be there, and nothing else."""
    ours = from_peft_state_dict(adapter)
    wanted = {k for k in model.state_dict() if _is_lora_key(k)}
    if set(ours) != wanted:
        missing, extra = sorted(wanted - set(ours)), sorted(set(ours) - wanted)
        raise ValueError(
            f"adapter keys must be the model's LoRA weights: missing {missing[:4]}"
            f", unexpected {extra[:4]}"
        )
    model.load_state_dict({**model.state_dict(), **ours}, strict=True)


def from_peft_state_dict(state: dict) -> dict:
    """peft's keys -> ours: drop ``base_model.model.`` and the adapter name ``.default``
    (a whole ``PeftModel.state_dict()`` then loads into our LoRA model with strict=True)."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix(PEFT_PREFIX)
        out[k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = v
    return out


def qlora_model(
    model: nn.Module,
    target_modules: tuple | list,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> nn.Module:
    """(6) QLoRA: a copy of ``model`` whose linear layers (the LM head aside) are NF4 with
    double quantization (``quantization.quantize_model(model, "nf4_dq")``: block 64, absmax
    constants in 8 bits, blocks of 256), dequantized at every forward, with LoRA on
    ``target_modules``. The embedding and norms stay float and frozen."""
    return apply_lora(
        quantize_model(model, "nf4_dq"), target_modules, r, alpha, dropout, use_rslora
    )


class KVPrefix(nn.Module):
    """(7) Trainable keys and values of ``num_virtual_tokens`` virtual tokens for every layer
    and KV head: peft's ``PrefixEncoder`` (the same parameter names and layout). With
    ``prefix_projection`` an embedding of width n_kv_heads * head_dim goes through a two-layer
    tanh MLP (Li and Liang's reparameterisation); else the embedding holds them directly.
    Init as peft's default (``init_weights=None``: ``nn.Embedding``'s and ``nn.Linear``'s own);
    unlike peft, which builds a model loaded with ``inference_mode=True`` without the MLP (its
    embedding then holds the MLP's output), this always keeps the MLP when asked for it.

    ``forward(batch_size)`` returns one (keys, values) pair per layer, each
    (batch, n_kv_heads, num_virtual_tokens, head_dim): the KV-cache layout."""

    def __init__(
        self,
        cfg: training.ModelConfig,
        num_virtual_tokens: int,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_prefix_args(cfg, num_virtual_tokens, prefix_projection, encoder_hidden_size)
        self.n_layers, self.n_kv_heads = cfg.n_layers, cfg.n_kv_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        self.num_virtual_tokens = num_virtual_tokens
        token_dim = cfg.n_kv_heads * self.head_dim  # NEW vs MHA: n_kv_heads, not n_heads
        width = cfg.n_layers * 2 * token_dim  # a key and a value per layer
        self.prefix_projection = prefix_projection
        if prefix_projection:
            hidden = encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width)
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)

    def forward(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        p = self.embedding.weight  # (n_virtual, token_dim or width)
        if self.prefix_projection:
            p = self.transform(p)  # (7) MLP(E): (n_virtual, width)
        n = self.num_virtual_tokens
        # (n_virtual, n_layers, 2, n_kv_heads, head_dim) -> (n_layers, 2, n_kv_heads, n_virtual, hd)
        p = p.view(n, self.n_layers, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        p = p.unsqueeze(2).expand(-1, -1, batch_size, -1, -1, -1)  # a batch dim after the 2
        return [(layer[0], layer[1]) for layer in p]  # each (batch, n_kv_heads, n_virtual, hd)


class PrefixTunedLlama(nn.Module):
    """A frozen ``training.Llama`` whose every attention layer sees ``prefix``'s keys and
    values first (7): they are written into the model's own KV cache at positions
    0..n_virtual - 1 (no RoPE on them, as peft hands them to transformers' cache), and the real
    tokens start at position n_virtual, as transformers numbers them after a cache of that
    length. Gradients reach the prefix through the cache write (autograd records the in-place
    copy), so ``grouped_query_attention`` and ``training`` need no change."""

    def __init__(self, model: training.Llama, prefix: KVPrefix) -> None:
        super().__init__()
        if not isinstance(model, training.Llama) or not isinstance(prefix, KVPrefix):
            raise TypeError("model must be a training.Llama and prefix a KVPrefix")
        self.model = model.requires_grad_(False)
        self.prefix = prefix

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> list:
        """The model's caches with the prefix already written in (length n_virtual)."""
        cache = self.model.new_cache(batch_size, max_seq_len)
        for layer_cache, (k, v) in zip(cache, self.prefix(batch_size), strict=True):
            layer_cache.update(k.to(layer_cache.k_cache.dtype), v.to(layer_cache.v_cache.dtype), 0)
        return cache

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.prefix.num_virtual_tokens
        cache = self.new_cache(len(ids), n + ids.shape[1])
        return self.model(ids, n, cache)  # real tokens at positions n.. (batch, seq, vocab)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding after the prefix: prefill ``ids``, then one token per step."""
        _check_sizes(max_new_tokens=max_new_tokens)
        n = self.prefix.num_virtual_tokens
        cache = self.new_cache(len(ids), n + ids.shape[1] + max_new_tokens)
        logits = self.model(ids, n, cache)[:, -1]
        out = [ids]
        for i in range(max_new_tokens):
            out.append(logits.argmax(-1, keepdim=True))  # (batch, 1)
            if i + 1 < max_new_tokens:
                logits = self.model(out[-1], n + ids.shape[1] + i, cache)[:, -1]
        return torch.cat(out, dim=1)  # (batch, seq_len + max_new_tokens)


# =============================================================================
# 3. Baselines and apparatus: door checks, the task, methods, training, memory, peft adapters
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


def _check_lora_args(base_layer, r, alpha, dropout, use_rslora) -> None:
    """LoRALinear's and apply_lora's door (``base_layer`` None: not checked here)."""
    if base_layer is not None and not isinstance(base_layer, nn.Linear | QuantizedLinear):
        raise TypeError(
            f"base_layer must be an nn.Linear or QuantizedLinear, got {type(base_layer).__name__}"
        )
    _check_sizes(r=r)
    _check_positive(alpha=alpha)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout ({dropout!r}) must be a real number")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout ({dropout}) must be in [0, 1)")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora ({use_rslora!r}) must be a bool")


def _check_targets(target_modules, linears: dict) -> None:
    """Every name in ``target_modules`` must end the name of at least one linear layer."""
    if isinstance(target_modules, str) or not isinstance(target_modules, list | tuple):
        raise TypeError(f"target_modules ({target_modules!r}) must be a list or tuple of names")
    if not target_modules or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(f"target_modules ({target_modules!r}) must be a non-empty list of names")
    for t in target_modules:
        if not any(_is_lora_target(name, [t]) for name in linears):
            known = sorted({name.rpartition(".")[2] for name in linears})
            raise ValueError(
                f"target_modules: {t!r} names no linear layer of the model; it has {known}"
            )


def _check_prefix_args(cfg, num_virtual_tokens, prefix_projection, encoder_hidden_size) -> None:
    if not isinstance(cfg, training.ModelConfig):
        raise TypeError(f"cfg must be a training.ModelConfig, got {type(cfg).__name__}")
    _check_sizes(num_virtual_tokens=num_virtual_tokens)
    if num_virtual_tokens >= cfg.max_seq_len:
        raise ValueError(
            f"num_virtual_tokens ({num_virtual_tokens}) must leave room in max_seq_len "
            f"({cfg.max_seq_len}) for real tokens"
        )
    if not isinstance(prefix_projection, bool):
        raise TypeError(f"prefix_projection ({prefix_projection!r}) must be a bool")
    if encoder_hidden_size is not None:
        _check_sizes(encoder_hidden_size=encoder_hidden_size)


def trainable_parameters(model: nn.Module) -> int:
    """Parameters that receive gradients (peft's ``get_nb_trainable_parameters()[0]``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- the task: reverse a short list of words (the answer is exactly checkable)

REVERSE_WORDS = (  # candidates; those that are one token with a leading space are used
    "one two three four five list file class name key value line word code data type time "
    "text table string number error object module set user"
).split()


def reversal_task(tok, n_words: int, n_train: int, n_test: int, seed: int, n_dev: int = 0) -> dict:
    """Prompt "reverse: w1 w2 .. wn ->", answer " wn .. w2 w1" then a newline, every word one
    token of ``tok``: distinct random word lists, disjoint between the splits ``train`` (to
    train on), ``dev`` (to choose the learning rate on) and ``test`` (held out, reported).
    Returns token ids ``prompt`` (N, prompt_len) and ``answer`` (N, n_words + 1) and the splits."""
    _check_sizes(n_words=n_words, n_train=n_train, n_test=n_test)
    if isinstance(n_dev, bool) or not isinstance(n_dev, numbers.Integral):
        raise TypeError(f"n_dev ({n_dev!r}) must be an int")
    if n_dev < 0:
        raise ValueError(f"n_dev ({n_dev}) must be >= 0")
    words = [w for w in REVERSE_WORDS if len(tok.encode_ordinary(" " + w)) == 1]
    n_all = n_train + n_dev + n_test
    if len(words) < n_words or math.perm(len(words), n_words) < n_all:
        raise ValueError(
            f"n_train + n_dev + n_test ({n_all}) must be at most the "
            f"{math.perm(len(words), n_words)} lists of n_words ({n_words}) distinct words"
        )
    gen = torch.Generator().manual_seed(seed)
    every = list(itertools.permutations(range(len(words)), n_words))
    order = torch.randperm(len(every), generator=gen)[:n_all].tolist()
    lists = [every[i] for i in order]
    head, arrow, newline = (tok.encode_ordinary(s) for s in ("reverse:", " ->", "\n"))
    ids = [tok.encode_ordinary(" " + w)[0] for w in words]
    prompt = torch.tensor([head + [ids[i] for i in lst] + arrow for lst in lists])
    answer = torch.tensor([[ids[i] for i in reversed(lst)] + newline for lst in lists])
    example = tok.decode(prompt[0].tolist() + answer[0].tolist())
    return {
        "prompt": prompt,
        "answer": answer,
        "train": torch.arange(n_train),
        "dev": torch.arange(n_train, n_train + n_dev),
        "test": torch.arange(n_train + n_dev, n_all),
        "words": words,
        "example": example,
    }


def task_info(task: dict, sizes: dict) -> dict:
    """What results.json says about the task: its sizes, the training steps and batch size
    (``sizes`` is a ``SIZES`` entry), its words and one example."""
    prompt, _, answer = task["example"].partition(" ->")
    return {
        **sizes["task"],
        "steps": sizes["steps"],
        "batch_size": sizes["batch_size"],
        "words": task["words"],
        "n_vocab_words": len(task["words"]),
        "uniform_word_loss": math.log(len(task["words"])),  # a uniform guess among the words
        "example_prompt": prompt + " ->",
        "example_answer": answer.strip(),
    }


def task_batch(task: dict, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of examples ``idx``; the prompt's targets are IGNORE, so
    the loss is taken on the answer tokens only."""
    seq = torch.cat([task["prompt"][idx], task["answer"][idx]], dim=1)  # (batch, prompt + answer)
    targets = seq[:, 1:].clone()
    targets[:, : task["prompt"].shape[1] - 1] = training.IGNORE  # no loss on the prompt
    return seq[:, :-1], targets


@torch.no_grad()
def reversal_accuracy(model: nn.Module, task: dict, split: str = "test", batch_size: int = 256):
    """The fraction of ``split``'s prompts whose greedy continuation is exactly the answer."""
    was_training = model.training
    model.eval()
    idx = task[split]
    n_new, hits = task["answer"].shape[1], 0
    for chunk in idx.split(batch_size):
        prompt = task["prompt"][chunk]
        out = model.generate(prompt, n_new)[:, prompt.shape[1] :]
        hits += int((out == task["answer"][chunk]).all(dim=1).sum())
    model.train(was_training)
    return hits / len(idx)


# --- the methods compared, and how each is trained

TUNING_METHODS = {  # name -> how the model is adapted
    "full": {"kind": "full"},
    "lora_r1_attn": {"kind": "lora", "r": 1, "targets": "attention"},
    "lora_r1_all": {"kind": "lora", "r": 1, "targets": "all_linear"},
    "lora_r4_attn": {"kind": "lora", "r": 4, "targets": "attention"},
    "lora_r4_all": {"kind": "lora", "r": 4, "targets": "all_linear"},
    "lora_r8_all": {"kind": "lora", "r": 8, "targets": "all_linear"},
    "lora_r16_attn": {"kind": "lora", "r": 16, "targets": "attention"},
    "lora_r16_all": {"kind": "lora", "r": 16, "targets": "all_linear"},
    "qlora_r8_all": {"kind": "qlora", "r": 8, "targets": "all_linear"},
    "prefix": {"kind": "prefix", "tokens": 16, "projection": False},
    "prefix_mlp": {"kind": "prefix", "tokens": 16, "projection": True},
}
LORA_ALPHA_PER_R = 2.0  # alpha = 2 r: scaling 2 at every rank (peft's defaults r 8, alpha 16)


LR_FAMILIES = {  # family -> the method whose dev-split sweep chooses the family's learning rate
    "full": "full",
    "lora": "lora_r8_all",  # every LoRA rank and target set, and QLoRA, use its choice
    "prefix": "prefix",  # with and without the MLP
}


def lr_family(name: str) -> str:
    """The learning-rate family of method ``name``: QLoRA is LoRA over another base."""
    kind = TUNING_METHODS[name]["kind"]
    return "lora" if kind == "qlora" else kind


def tuning_label(name: str) -> str:
    spec = TUNING_METHODS[name]
    if spec["kind"] == "full":
        return "full fine-tuning"
    if spec["kind"] == "prefix":
        return f"prefix ({spec['tokens']} tokens{', MLP' if spec['projection'] else ''})"
    where = "attention" if spec["targets"] == "attention" else "all linear"
    return f"{'QLoRA' if spec['kind'] == 'qlora' else 'LoRA'} r={spec['r']} {where}"


def build_tuned_model(base: training.Llama, name: str, seed: int) -> nn.Module:
    """A copy of ``base`` adapted as ``TUNING_METHODS[name]`` says, its new weights seeded."""
    spec = TUNING_METHODS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
        if spec["kind"] == "full":
            return model.requires_grad_(True)
        if spec["kind"] == "prefix":
            prefix = KVPrefix(model.config, spec["tokens"], spec["projection"])
            return PrefixTunedLlama(model, prefix)
        r, targets = spec["r"], LORA_TARGETS[spec["targets"]]
        make = qlora_model if spec["kind"] == "qlora" else apply_lora
        return make(model, targets, r, LORA_ALPHA_PER_R * r)


def _reversal_loss(model: nn.Module, batch) -> torch.Tensor:
    loss_sum, count = training.token_loss_sum(model(batch[0]), batch[1])
    return loss_sum / count


@torch.no_grad()
def answer_losses(model: nn.Module, task: dict, split: str) -> list[float]:
    """The mean loss (nats) at each answer position (word, ..., newline) over ``split``'s lists,
    teacher-forced, in eval mode; their mean is the task loss."""
    was_training = model.training
    model.eval()
    x, y = task_batch(task, task[split])
    logp = model(x).log_softmax(-1)[:, task["prompt"].shape[1] - 1 :]  # the answer positions
    y = y[:, task["prompt"].shape[1] - 1 :]
    model.train(was_training)
    return (-logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)).mean(0).tolist()


def finetune_method(
    model: nn.Module, task: dict, steps: int, lr: float, batch_size: int, seed: int
):
    """AdamW (torch.optim, no weight decay) on the trainable parameters, on random batches of
    the task's train split, ``lr`` after a linear warm-up of steps / 10, loss on the answer
    tokens only. Returns the per-step losses and the optimizer (its state is measured)."""
    _check_sizes(steps=steps, batch_size=batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(seed)
    train_idx, losses = task["train"], []
    model.train()
    for _ in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (batch_size,), generator=gen)]
        loss = _reversal_loss(model, task_batch(task, idx))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses, opt


def _distinct_storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tied weight counts once)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def train_step_memory(model: nn.Module, opt: torch.optim.Optimizer, batch) -> dict:
    """The bytes one training step holds, measured from the real tensors: the model's weights
    and buffers (frozen ones and NF4 codes included), the gradients, AdamW's state (from
    ``opt.state``: m, v and a step count per tensor) and the activations autograd saves for
    backward (``training.SavedTensorBytes``: under QLoRA the dequantized weights are among
    them, held from forward to backward). Their sum is what the step holds at its fullest, an
    upper bound of the true peak (the activations are freed during the backward pass while the
    gradients appear). Next to the formula (9) for the gradients and the optimizer."""
    with training.SavedTensorBytes(model) as saved:
        loss = _reversal_loss(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    measured = {
        "weights": _distinct_storage_bytes([*model.parameters(), *model.buffers()]),
        "gradients": sum(g.numel() * g.element_size() for g in grads),
        "optimizer": sum(
            t.numel() * t.element_size()
            for s in opt.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        ),
        "activations": saved.nbytes,
    }
    model.zero_grad(set_to_none=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    formula = {"gradients": 4 * n, "optimizer": 8 * n + 4 * len(trainable)}  # (9) fp32
    return {
        "measured": measured,
        "formula": formula,
        "total": sum(measured.values()),
        "exact": all(measured[k] == formula[k] for k in formula),
    }


# --- the references: peft, transformers and bitsandbytes (the dev group), imported when used


def peft_modules():
    """``peft`` (and with it transformers and bitsandbytes), quietened, or None where it is
    not installed. Importing it takes ~15 s here."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import peft
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return peft


def parity_llama_config(n_kv_heads: int = 2) -> training.ModelConfig:
    """A small Llama for the parity checks (widths multiples of NF4's block of 64)."""
    return training.ModelConfig(
        vocab_size=128,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        hidden_dim=128,
        max_seq_len=32,
    )


def hf_and_our_llama(cfg: training.ModelConfig, seed: int) -> tuple:
    """A random transformers ``LlamaForCausalLM`` and our ``training.Llama`` with its weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = training.to_hf_llama(cfg)
    ours = training.Llama(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours.eval()


def save_peft_adapter(model: nn.Module, folder: Path) -> None:
    """Write ``model``'s LoRA adapter as a peft folder: ``adapter_config.json`` (LoRA's r,
    alpha, targets) and ``adapter_model.bin`` (``lora_state_dict``), which
    ``PeftModel.from_pretrained(base, folder)`` loads."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("model has no LoRA layer to save (apply_lora first)")
    first = layers[0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.r,
        "lora_alpha": first.alpha,
        "use_rslora": first.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({n.rpartition(".")[2] for n in lora_layers(model)}),
        "inference_mode": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    torch.save(lora_state_dict(model), folder / "adapter_model.bin")


def qlora_from_bitsandbytes(peft_model, base: training.Llama) -> nn.Module:
    """Our QLoRA model holding the very NF4 codes, 8-bit absmax codes and constants of a peft
    model over bitsandbytes ``Linear4bit`` layers, and its LoRA weights: what ``qlora_model``
    builds, with bitsandbytes' codes instead of ours (they differ in a few double-quantized
    absmax codes, see quantization.py), so the forward passes can be compared exactly."""
    import bitsandbytes

    model = copy.deepcopy(base)
    for name, m in peft_model.base_model.model.named_modules():
        if isinstance(m, bitsandbytes.nn.Linear4bit):
            qs = m.weight.quant_state
            weights = {
                "packed": m.weight.data.flatten(),
                "absmax_codes": qs.absmax,
                "absmax2": qs.state2.absmax,
                "offset": qs.offset.reshape(()),
            }
            path = name.removesuffix(".base_layer")
            parent, _, child = path.rpartition(".")
            layer = QuantizedLinear(weights, "nf4_dq", tuple(qs.shape))
            setattr(model.get_submodule(parent), child, layer)
    return model


# =============================================================================
# 4. Experiments: parity with peft, the methods side by side, the update's rank, claims
# =============================================================================


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


def _parity_ids(cfg: training.ModelConfig, seed: int, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def check_peft_parity(peft, seed: int, r: int = 4, alpha: float = 8.0) -> dict:
    """LoRA on every linear layer of a small GQA Llama, ours vs ``peft.get_peft_model`` with
    ``init_lora_weights=False`` (B nonzero) on transformers' ``LlamaForCausalLM`` with the same
    weights, peft's whole state_dict loaded into ours (strict=True): logits, trainable counts,
    merged weights vs ``merge_and_unload``; then the adapter both ways (ours saved as a peft
    folder and loaded by ``PeftModel.from_pretrained``; peft's ``get_peft_model_state_dict``
    loaded into ours), for LoRA's scaling (2) and rsLoRA's (3)."""
    cfg = parity_llama_config(2)
    hf, ours = hf_and_our_llama(cfg, seed)
    targets = list(LORA_TARGETS["all_linear"])
    ids = _parity_ids(cfg, seed)
    out: dict = {"config": {"r": r, "alpha": alpha, "targets": targets}}
    for use_rslora in (False, True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ref = peft.get_peft_model(
                copy.deepcopy(hf),
                peft.LoraConfig(
                    r=r,
                    lora_alpha=alpha,
                    target_modules=targets,
                    init_lora_weights=False,
                    use_rslora=use_rslora,
                ),
            ).eval()
        mine = apply_lora(copy.deepcopy(ours), targets, r, alpha, use_rslora=use_rslora)
        mine.load_state_dict(from_peft_state_dict(ref.state_dict()), strict=True)
        want = ref(input_ids=ids).logits
        row = {
            "logits_max_err": max_abs_err(mine(ids), want),
            "adapter_effect_max": max_abs_err(ours(ids), want),  # what the parity could miss
            "trainable_ours": trainable_parameters(mine),
            "trainable_peft": ref.get_nb_trainable_parameters()[0],
        }
        with tempfile.TemporaryDirectory() as folder:  # ours -> peft
            save_peft_adapter(mine, Path(folder))
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), folder).eval()
            row["saved_adapter_in_peft_max_err"] = max_abs_err(loaded(input_ids=ids).logits, want)
        back = apply_lora(copy.deepcopy(ours), targets, r, alpha, use_rslora=use_rslora)
        load_lora_state_dict(back, peft.get_peft_model_state_dict(ref))  # peft -> ours, strict
        row["peft_adapter_in_ours_max_err"] = max_abs_err(back(ids), want)
        merged = merge_and_unload(mine).state_dict()
        ref_merged = ref.merge_and_unload().state_dict()
        row["merged_keys_equal"] = sorted(merged) == sorted(ref_merged)
        row["merged_weight_max_err"] = max(max_abs_err(merged[k], ref_merged[k]) for k in merged)
        row["merged_bit_identical"] = all(torch.equal(merged[k], ref_merged[k]) for k in merged)
        out["rslora" if use_rslora else "lora"] = row
    return out


@torch.no_grad()
def check_qlora_parity(peft, seed: int, r: int = 4, alpha: float = 8.0) -> dict:
    """QLoRA, ours vs peft over transformers + bitsandbytes: the model saved, loaded back with
    ``BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype float32)`` on this CPU,
    LoRA (``init_lora_weights=False``) on every linear layer. Our model with bitsandbytes'
    codes (``qlora_from_bitsandbytes``) gives the same logits; ``qlora_model`` (our own
    quantization) is compared too: its packed NF4 bytes equal bitsandbytes', a few
    double-quantized absmax codes differ."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    cfg = parity_llama_config(2)
    hf, ours = hf_and_our_llama(cfg, seed)
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        q = LlamaForCausalLM.from_pretrained(
            folder, quantization_config=bnb_config, device_map="cpu", attn_implementation="eager"
        )
    targets = list(LORA_TARGETS["all_linear"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = peft.get_peft_model(
            q,
            peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False),
        ).eval()
    adapter = peft.get_peft_model_state_dict(ref)
    base = qlora_from_bitsandbytes(ref, ours)
    ids = _parity_ids(cfg, seed)
    base_logits = base(ids)  # the NF4 model without the adapter
    mine = apply_lora(base, targets, r, alpha)
    load_lora_state_dict(mine, adapter)
    own = qlora_model(ours, targets, r, alpha)
    load_lora_state_dict(own, adapter)
    # bitsandbytes' layer in training mode: dequantize, then the matmul in the compute dtype.
    # In eval mode with an input that needs no gradient, on a CPU with AVX512-BF16, it instead
    # repacks its weight (in place, once) and runs a kernel that casts the input and the
    # absmax to bf16 whatever the compute dtype: compared last, as what bf16 costs.
    want = ref.train()(input_ids=ids).logits
    ours_logits = mine(ids)
    bf16_kernel = ref.eval()(input_ids=ids).logits
    packed = [
        torch.equal(a.packed, b.packed)
        for a, b in zip(
            (m.base_layer for m in lora_layers(mine).values()),
            (m.base_layer for m in lora_layers(own).values()),
            strict=True,
        )
    ]
    codes = torch.cat([m.base_layer.absmax_codes for m in lora_layers(own).values()])
    ref_codes = torch.cat([m.base_layer.absmax_codes for m in lora_layers(mine).values()])
    return {
        "compute_dtype": "float32",
        "logits_max_err": max_abs_err(ours_logits, want),
        "adapter_effect_max": max_abs_err(base_logits, want),  # what the parity could miss
        "own_quantization_logits_max_err": max_abs_err(own(ids), want),
        "bitsandbytes_cpu_inference_kernel_max_err": max_abs_err(ours_logits, bf16_kernel),
        "packed_identical_layers": sum(packed),
        "layers": len(packed),
        "absmax_codes_agree": (codes == ref_codes).float().mean().item(),
        "trainable_ours": trainable_parameters(mine),
        "trainable_peft": ref.get_nb_trainable_parameters()[0],
    }


@torch.no_grad()
def check_prefix_parity(peft, seed: int, num_virtual_tokens: int = 5) -> dict:
    """Prefix tuning, ours (``PrefixTunedLlama``) vs ``peft.PrefixTuningConfig`` on the same
    transformers model and prompt-encoder weights, with and without ``prefix_projection``, for
    multi-head (n_kv_heads = n_heads = 4) and grouped-query (n_kv_heads = 2) attention: the
    logits, and the gradients reaching the prompt encoder (ours through the KV-cache write)."""
    out = {}
    for n_kv in (4, 2):
        cfg = parity_llama_config(n_kv)
        hf, ours = hf_and_our_llama(cfg, seed)
        ids = _parity_ids(cfg, seed)
        for projection in (False, True):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                ref = peft.get_peft_model(
                    copy.deepcopy(hf),
                    peft.PrefixTuningConfig(
                        task_type="CAUSAL_LM",
                        num_virtual_tokens=num_virtual_tokens,
                        prefix_projection=projection,
                    ),
                ).eval()
            prefix = KVPrefix(cfg, num_virtual_tokens, projection)
            encoder = "prompt_encoder.default."
            prefix.load_state_dict(
                {k.removeprefix(encoder): v for k, v in ref.state_dict().items() if encoder in k},
                strict=True,
            )
            mine = PrefixTunedLlama(copy.deepcopy(ours), prefix)
            with torch.enable_grad():  # d(sum of weighted logits)/d(prompt encoder), both
                want = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                got = mine(ids)
                w = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed))
                (want * w).sum().backward()
                (got * w).sum().backward()
            ref_grads = {
                k.removeprefix(encoder): p.grad
                for k, p in ref.named_parameters()
                if encoder in k and p.grad is not None
            }
            grads = {k: p.grad for k, p in prefix.named_parameters()}
            name = f"{'mha' if n_kv == cfg.n_heads else 'gqa'}_{'mlp' if projection else 'plain'}"
            out[name] = {
                "n_heads": cfg.n_heads,
                "n_kv_heads": n_kv,
                "prefix_projection": projection,
                "logits_max_err": max_abs_err(got, want),
                "grad_keys_equal": sorted(ref_grads) == sorted(grads),
                "grad_max_err": max(max_abs_err(grads[k], ref_grads[k]) for k in grads),
                "grad_max_abs": max(g.abs().max().item() for g in grads.values()),
                "trainable_ours": trainable_parameters(mine),
                "trainable_peft": ref.get_nb_trainable_parameters()[0],
            }
    return out


def check_own_rules(seed: int) -> dict:
    """What needs no reference: merge then unmerge gives W back (float rounding), a merged
    layer's output equals the unmerged one's, a merge over an NF4 base is quantized again and
    differs by that rounding (peft #1043, #2321), and the prefix's gradient flows through the
    KV-cache write."""
    cfg = parity_llama_config(2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ours = training.Llama(cfg).eval()  # no transformers needed here (a slow import)
    ids = _parity_ids(cfg, seed)
    out = {}
    for kind, make in (("lora", apply_lora), ("qlora", qlora_model)):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)  # lora_A's init and B's values: the same in every run
            model = make(copy.deepcopy(ours), list(LORA_TARGETS["all_linear"]), 4, 8.0)
            for layer in lora_layers(model).values():
                nn.init.normal_(layer.lora_B.weight, std=0.02)  # as if trained
        layers = list(lora_layers(model).values())
        w0 = [layer.base_layer.weight.clone() for layer in layers]
        with torch.no_grad():
            before = model(ids)
            for layer in layers:
                layer.merge()
            merged = model(ids)
            for layer in layers:
                layer.unmerge()
        out[kind] = {
            "merged_vs_unmerged_logits_max_err": max_abs_err(merged, before),
            "unmerge_weight_max_err": max(
                max_abs_err(layer.base_layer.weight, w) for layer, w in zip(layers, w0, strict=True)
            ),
        }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PrefixTunedLlama(copy.deepcopy(ours), KVPrefix(cfg, 4))
    model(ids).logsumexp(-1).mean().backward()
    grad = model.prefix.embedding.weight.grad
    out["prefix_grad_norm"] = 0.0 if grad is None else grad.norm().item()
    out["frozen_params_with_grad"] = sum(p.grad is not None for p in model.model.parameters())
    return out


def pick_learning_rate(candidates: dict, within: float = 0.01) -> str:
    """The dev split decides (``candidates``: lr as text -> {"lr", "dev_accuracy",
    "dev_loss", ...}): among the rates within ``within`` of the best dev exact match, the
    lowest, the gentlest step that does the task (exact match cannot tell them apart, and a
    smaller step moves the pre-trained model less); the dev loss breaks exact ties of rate."""
    best = max(c["dev_accuracy"] for c in candidates.values())
    good = [k for k, c in candidates.items() if c["dev_accuracy"] >= best - within]
    return min(good, key=lambda k: (candidates[k]["lr"], candidates[k]["dev_loss"]))


def choose_learning_rates(
    base: training.Llama, task: dict, windows: torch.Tensor, sizes: dict, seed: int
):
    """Each family's learning rate, as a practitioner would choose it: its representative
    method (``LR_FAMILIES``) trained at every rate of ``sizes["lr_grid"][family]`` on the train
    split, scored on the dev split (never on the test split), ``pick_learning_rate``. Also the
    validation loss on the original text after each run (forgetting, for the trade-off figure).
    Returns the choice and the representatives' runs at the chosen rate (not trained again)."""
    choice, runs = {}, {}
    for family, name in LR_FAMILIES.items():
        before = training.evaluate(build_tuned_model(base, name, seed), windows)
        candidates, kept = {}, {}
        for lr in sizes["lr_grid"][family]:
            model = build_tuned_model(base, name, seed)
            losses, opt = finetune_method(
                model, task, sizes["steps"], lr, sizes["batch_size"], seed
            )
            candidates[f"{lr:g}"] = {
                "lr": lr,
                "dev_accuracy": reversal_accuracy(model, task, "dev"),
                "dev_loss": statistics.mean(answer_losses(model, task, "dev")),
                "forgetting": training.evaluate(model, windows) - before,
            }
            kept[f"{lr:g}"] = (model, opt, losses)
            c = candidates[f"{lr:g}"]
            print(
                f"  {tuning_label(name):<22} lr {lr:<7g} dev exact match {c['dev_accuracy']:6.1%}, "
                f"dev loss {c['dev_loss']:.3f}, forgetting {c['forgetting']:+.3f}"
            )
        best = pick_learning_rate(candidates)
        choice[family] = {"method": name, "candidates": candidates, "chosen": best}
        runs[name] = kept[best]
    return choice, runs


def compare_fine_tuning(
    base: training.Llama,
    task: dict,
    windows: torch.Tensor,
    sizes: dict,
    seed: int,
    lr_choice,
    runs: dict,
):
    """Every method of ``TUNING_METHODS`` from the same base model, the same batches (same
    seed) and steps, at its family's chosen learning rate (the representatives' runs come from
    ``choose_learning_rates``): exact-match accuracy on the held-out word lists before and
    after, the validation loss on the original text before and after (forgetting), trainable
    parameters, the bytes of a training step (``train_step_memory``) and the loss curve.
    Returns the table and the trained models and optimizers (for the spectra and step times)."""
    table, trained = {}, {}
    batch = task_batch(task, task["train"][: sizes["batch_size"]])
    for i, name in enumerate(TUNING_METHODS):
        model = build_tuned_model(base, name, seed)
        row = {
            "label": tuning_label(name),
            "trainable": trainable_parameters(model),
            "accuracy_before": reversal_accuracy(model, task),
            "val_loss_before": training.evaluate(model, windows),
        }
        family = lr_choice[lr_family(name)]
        lr = family["candidates"][family["chosen"]]["lr"]
        if name in runs:
            model, opt, losses = runs[name]
        else:
            losses, opt = finetune_method(
                model, task, sizes["steps"], lr, sizes["batch_size"], seed
            )
        row.update(
            {
                "lr": lr,
                "losses": losses,
                "final_loss": statistics.mean(losses[-max(1, len(losses) // 10) :]),
                "accuracy_after": reversal_accuracy(model, task),
                "train_accuracy_after": reversal_accuracy(model, task, "train"),
                "answer_losses": answer_losses(model, task, "test"),
                "val_loss_after": training.evaluate(model, windows),
            }
        )
        row["forgetting"] = row["val_loss_after"] - row["val_loss_before"]
        row["memory"] = train_step_memory(model, opt, batch)
        table[name] = row
        trained[name] = (model, opt)
        print(
            f"  ({i + 1}/{len(TUNING_METHODS)}) {row['label']:<26} lr {lr:<6g} accuracy "
            f"{row['accuracy_before']:.0%} -> {row['accuracy_after']:.0%}, "
            f"task loss {row['final_loss']:.3f}"
        )
    full = table["full"]["trainable"]
    for row in table.values():
        row["trainable_fraction_of_full"] = row["trainable"] / full
    return table, trained


def prefix_one_example(base: training.Llama, task: dict, steps: int, lr: float, seed: int):
    """Can prefix tuning fit ONE training list? (A broken gradient could not.) ``prefix``
    trained on the first train list alone: its task loss at the start and the end, and
    whether its greedy answer is then exact."""
    one = {**task, "train": task["train"][:1]}
    model = build_tuned_model(base, "prefix", seed)
    losses, _ = finetune_method(model, one, steps, lr, 8, seed)
    return {
        "steps": steps,
        "lr": lr,
        "loss_start": losses[0],
        "loss_end": statistics.mean(losses[-max(1, steps // 10) :]),
        "exact": reversal_accuracy(model, one, "train") == 1.0,
    }


def benchmark_train_steps(
    trained: dict, task: dict, batch_size: int, rounds: int, min_run_time: float
):
    """Seconds per training step (forward, backward, AdamW step) of every method, rounds
    interleaved (median, min-max), on the same batch; run after the accuracies are measured
    (the steps move the weights)."""
    batch = task_batch(task, task["train"][:batch_size])
    times: dict = {name: [] for name in trained}

    def step(model, opt):
        _reversal_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(rounds):
        for name, (model, opt) in trained.items():
            model.train()
            times[name].append(median_time_s(lambda m=model, o=opt: step(m, o), min_run_time))
            model.eval()
    full = statistics.median(times["full"])
    return {
        name: {
            "ms": {
                "median": 1e3 * statistics.median(t),
                "min": 1e3 * min(t),
                "max": 1e3 * max(t),
            },
            "speed_vs_full": full / statistics.median(t),
        }
        for name, t in times.items()
    }


def delta_w_spectra(base: training.Llama, tuned: training.Llama, ranks=(1, 4, 8, 16)) -> dict:
    """The LoRA paper's question: the singular values of the full fine-tuning update
    dW = W_tuned - W_base of every linear layer of the blocks, and the fraction of its energy
    ||dW||_F^2 the best rank-r approximation keeps (8); next to a random Gaussian matrix of the
    same shape (no low-rank structure), the baseline that fraction should be read against."""
    tuned_w = dict(tuned.named_parameters())
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for name, p in base.named_parameters():
        if ".layers." not in name or p.dim() != 2:
            continue
        s = torch.linalg.svdvals((tuned_w[name] - p).detach().double())
        noise = torch.linalg.svdvals(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        energy, noise_energy = s.square().cumsum(0), noise.square().cumsum(0)
        key = name.removesuffix(".weight")
        layers[key] = {
            "singular_values": s.tolist(),
            "energy": {str(r): (energy[r - 1] / energy[-1]).item() for r in ranks},
            "random_energy": {
                str(r): (noise_energy[r - 1] / noise_energy[-1]).item() for r in ranks
            },
            "norm_ratio": (s.square().sum().sqrt() / p.detach().double().norm()).item(),
        }
    mean = {str(r): statistics.mean(v["energy"][str(r)] for v in layers.values()) for r in ranks}
    random_mean = {
        str(r): statistics.mean(v["random_energy"][str(r)] for v in layers.values()) for r in ranks
    }
    return {
        "ranks": list(ranks),
        "layers": layers,
        "mean_energy": mean,
        "random_mean_energy": random_mean,
    }


def accuracy_gap_phrase(ours: float, ref: float, what: str = "full fine-tuning") -> str:
    """How an accuracy compares with ``ref``'s, in points, worded from the numbers."""
    points = 100 * (ours - ref)
    if abs(points) < 0.5:
        return f"level with {what}"
    return f"{abs(points):.1f} points {'above' if points > 0 else 'below'} {what}"


def tuning_accuracy_title(table: dict) -> str:
    """The accuracy figure's message, from the numbers."""
    full, lora = table["full"], table["lora_r8_all"]
    return (
        f"LoRA r=8 on all linear layers: {100 * lora['accuracy_after']:.1f}% exact match, "
        f"{accuracy_gap_phrase(lora['accuracy_after'], full['accuracy_after'])} "
        f"({100 * full['accuracy_after']:.1f}%),\nwith "
        f"{100 * lora['trainable_fraction_of_full']:.2f}% of its trainable parameters"
    )


def _parity_claims(parity: dict) -> dict:
    claims = {}
    if "lora" in parity:
        p, q = parity["lora"], parity["lora"]["lora"]
        rows = (p["lora"], p["rslora"])
        err = max(row["logits_max_err"] for row in rows)
        effect = min(row["adapter_effect_max"] for row in rows)
        counts = all(row["trainable_ours"] == row["trainable_peft"] for row in rows)
        merged = all(
            row["merged_keys_equal"] and row["merged_weight_max_err"] <= 1e-6 for row in rows
        )
        claims["lora_equals_peft"] = claim(
            f"LoRA (alpha / r and rsLoRA) equals peft's logits to {err:.1e} (the adapter alone "
            f"moves them by {effect:.1e}); merged weights "
            + ("bit-identical to" if q["merged_bit_identical"] else "within ")
            + ("" if q["merged_bit_identical"] else f"{q['merged_weight_max_err']:.1e} of")
            + f" merge_and_unload; trainable parameters {q['trainable_ours']:,} "
            + ("= peft's" if counts else f"vs peft's {q['trainable_peft']:,}"),
            err <= 1e-6 and counts and merged and effect > 100 * err,
            logits_max_err=err,
        )
        a = max(q["saved_adapter_in_peft_max_err"], q["peft_adapter_in_ours_max_err"])
        claims["adapter_round_trip"] = claim(
            f"our saved adapter loads in peft and peft's in ours (strict=True), logits to {a:.1e}",
            a <= 1e-6,
        )
    if "qlora" in parity:
        q = parity["qlora"]
        claims["qlora_equals_peft"] = claim(
            f"QLoRA with bitsandbytes' NF4 codes equals peft + bitsandbytes Linear4bit to "
            f"{q['logits_max_err']:.1e}, the adapter alone moving them by "
            f"{q['adapter_effect_max']:.1e} (our own quantization: "
            f"{q['own_quantization_logits_max_err']:.1e}, "
            f"{100 * q['absmax_codes_agree']:.1f}% of the double-quantized absmax codes agree)",
            q["logits_max_err"] <= 1e-5 and q["adapter_effect_max"] > 100 * q["logits_max_err"],
        )
    if "prefix" in parity:
        errs = {k: v["logits_max_err"] for k, v in parity["prefix"].items()}
        counts = all(v["trainable_ours"] == v["trainable_peft"] for v in parity["prefix"].values())
        grad = max(v["grad_max_err"] for v in parity["prefix"].values())
        keys = all(v["grad_keys_equal"] for v in parity["prefix"].values())
        claims["prefix_equals_peft"] = claim(
            f"prefix tuning equals peft's PrefixTuningConfig for MHA and GQA, with and without "
            f"the MLP: logits to {max(errs.values()):.1e}, the prompt encoder's gradients to "
            f"{grad:.1e}",
            max(errs.values()) <= 1e-5 and counts and keys and grad <= 1e-4,
        )
    return claims


def gentlest_rate(candidates: dict, at_least: float = 0.95) -> dict | None:
    """The candidate with the lowest learning rate that reaches ``at_least`` dev exact match."""
    good = [c for c in candidates.values() if c["dev_accuracy"] >= at_least]
    return min(good, key=lambda c: c["lr"]) if good else None


def _matched_forgetting_claim(choice: dict, at_least: float = 0.95) -> dict:
    """Forgetting compared where both methods do the task: at each one's gentlest rate that
    reaches ``at_least`` dev exact match (a lower rate forgets less and learns less)."""
    full, lora = (gentlest_rate(choice[f]["candidates"], at_least) for f in ("full", "lora"))
    if full is None or lora is None:
        who = "full fine-tuning" if full is None else "LoRA"
        return claim(
            f"no learning rate of the grid brought {who} to {at_least:.0%} dev exact match, so "
            "forgetting is not compared at matched accuracy",
            False,
        )
    less = lora["forgetting"] < full["forgetting"]
    return claim(
        f"at matched accuracy (each one's lowest learning rate reaching {at_least:.0%} dev exact "
        f"match), full fine-tuning (lr {full['lr']:g}, {100 * full['dev_accuracy']:.1f}% dev) "
        f"moves the validation loss on the original text by {full['forgetting']:+.3f} nats, "
        f"LoRA r=8 (lr {lora['lr']:g}, {100 * lora['dev_accuracy']:.1f}% dev) by "
        f"{lora['forgetting']:+.3f}" + ("" if less else ": LoRA did not forget less here"),
        less,
        full_forgetting=full["forgetting"],
        lora_forgetting=lora["forgetting"],
    )


def _chosen_rate_forgetting_claim(full: dict, lora: dict, choice: dict) -> dict:
    """Forgetting at the rates the dev split chose (the table's rows), and whether full
    fine-tuning's rate is above its gentlest one that does the task (then the gap includes the
    rate, and the matched comparison is the fair one)."""
    gentlest = gentlest_rate(choice["full"]["candidates"])
    statement = (
        f"at the rates chosen on dev (full fine-tuning lr {full['lr']:g}, LoRA r=8 lr "
        f"{lora['lr']:g}) the validation loss on the original text moves by "
        f"{full['forgetting']:+.3f} nats after full fine-tuning, {lora['forgetting']:+.3f} after "
        "LoRA r=8"
        + ("" if lora["forgetting"] < full["forgetting"] else ": LoRA did not forget less here")
    )
    if gentlest is not None and full["lr"] > gentlest["lr"]:
        statement += (
            f"; full fine-tuning's rate is {full['lr'] / gentlest['lr']:.0f}x its gentlest that "
            f"reaches 95% dev exact match ({100 * gentlest['dev_accuracy']:.1f}% there vs "
            f"{100 * choice['full']['candidates'][choice['full']['chosen']]['dev_accuracy']:.1f}%),"
            " so this gap includes the rate: the comparison at matched accuracy is the fair one"
        )
    return claim(statement, lora["forgetting"] < full["forgetting"])


def _prefix_diagnosis_claim(results: dict) -> dict:
    """Is prefix tuning's result a broken gradient or the method's reach? Worded from the
    one-list fit, the gradient parity with peft (when run) and the per-position task losses."""
    fit, row = results["prefix_one_example"], results["table"]["prefix"]
    words, newline = row["answer_losses"][:-1], row["answer_losses"][-1]
    uniform = results["task"]["uniform_word_loss"]
    grads = [v["grad_max_err"] for v in results["parity"].get("prefix", {}).values()]
    grad_ok = bool(grads) and max(grads) <= 1e-4
    statement = (
        f"on one training list alone prefix tuning's task loss goes {fit['loss_start']:.2f} -> "
        f"{fit['loss_end']:.2f} in {fit['steps']} steps, greedy answer "
        f"{'exact' if fit['exact'] else 'not exact'}"
        + (f"; its gradients equal peft's to {max(grads):.1e}" if grads else "")
        + f"; on the task its word tokens end at {', '.join(f'{w:.2f}' for w in words)} nats "
        f"({'above' if min(words) > uniform else 'not all above'} {uniform:.2f}, a uniform guess "
        f"among the {results['task']['n_vocab_words']} words) and the newline at {newline:.2f}"
    )
    if fit["exact"] and min(words) > uniform:
        ends = "learns where the answer ends and " if newline < 0.1 else ""
        statement += f": it {ends}can memorise, not which words"
    return claim(statement, fit["exact"] and (grad_ok or not grads), grad_checked=bool(grads))


def fine_tuning_claims(results: dict) -> dict:
    """The claims, worded from the numbers."""
    claims = _parity_claims(results["parity"])
    own = results["own_checks"]
    claims["merge_is_the_same_function"] = claim(
        f"merging changes the logits by {own['lora']['merged_vs_unmerged_logits_max_err']:.1e} "
        f"over a float base but by {own['qlora']['merged_vs_unmerged_logits_max_err']:.1e} over "
        "an NF4 base, where the merged weight is quantized again",
        own["qlora"]["merged_vs_unmerged_logits_max_err"]
        > own["lora"]["merged_vs_unmerged_logits_max_err"],
    )
    t = results["table"]
    full, lora = t["full"], t["lora_r8_all"]
    base_acc = max(row["accuracy_before"] for row in t.values())
    claims["base_model_fails"] = claim(
        f"before fine-tuning the model gets {100 * base_acc:.1f}% of the held-out lists right",
        base_acc == 0,
    )
    gap = full["accuracy_after"] - lora["accuracy_after"]
    d = results["model"]["config"]["d_model"]
    why = [
        "more than 5 points apart" if gap > 0.05 else "",
        f"not under 5%: a rank-8 update of a d x d matrix trains 2 * 8 / d of it, {16 / d:.1%} "
        f"at this model's d_model {d}, 0.4% at d_model 4096"
        if lora["trainable_fraction_of_full"] >= 0.05
        else "",
        "full fine-tuning did not learn the task" if full["accuracy_after"] <= base_acc else "",
    ]
    why = "; ".join(w for w in why if w)
    claims["lora_r8_near_full"] = claim(
        f"LoRA r=8 on all linear layers: {100 * lora['accuracy_after']:.1f}% exact match, "
        f"{accuracy_gap_phrase(lora['accuracy_after'], full['accuracy_after'])} "
        f"({100 * full['accuracy_after']:.1f}%), training "
        f"{100 * lora['trainable_fraction_of_full']:.2f}% of its parameters"
        + (f" ({why})" if why else ""),
        gap <= 0.05
        and lora["trainable_fraction_of_full"] < 0.05
        and full["accuracy_after"] > base_acc,
        accuracy_gap=gap,
    )
    pairs = [(r, t[f"lora_r{r}_attn"], t[f"lora_r{r}_all"]) for r in (1, 4, 16)]
    claims["all_linear_beats_attention"] = claim(
        "at the same rank, LoRA on all linear layers vs attention only: "
        + ", ".join(
            f"r={r} {100 * b['accuracy_after']:.0f}% vs {100 * a['accuracy_after']:.0f}%"
            for r, a, b in pairs
        )
        + (
            ""
            if all(b["accuracy_after"] >= a["accuracy_after"] for _, a, b in pairs)
            else " (not higher at every rank)"
        ),
        all(b["accuracy_after"] >= a["accuracy_after"] for _, a, b in pairs)
        and any(b["accuracy_after"] > a["accuracy_after"] for _, a, b in pairs),
    )
    opt = full["memory"]["measured"]["optimizer"] / lora["memory"]["measured"]["optimizer"]
    claims["optimizer_state_smaller"] = claim(
        f"AdamW's state for LoRA r=8 is {opt:.0f}x smaller than for full fine-tuning "
        f"({lora['memory']['measured']['optimizer']:,} vs "
        f"{full['memory']['measured']['optimizer']:,} bytes, measured = formula (9))",
        opt > 10 and all(r["memory"]["exact"] for r in t.values()),
        ratio=opt,
    )
    claims["forgetting_at_matched_accuracy"] = _matched_forgetting_claim(results["lr_choice"])
    claims["less_forgetting"] = _chosen_rate_forgetting_claim(full, lora, results["lr_choice"])
    q = t["qlora_r8_all"]
    ratio = lora["memory"]["measured"]["weights"] / q["memory"]["measured"]["weights"]
    claims["qlora_smaller_weights"] = claim(
        f"QLoRA's weights take {ratio:.2f}x fewer bytes than LoRA's (the embedding stays float), "
        f"accuracy {100 * q['accuracy_after']:.1f}% vs {100 * lora['accuracy_after']:.1f}%",
        ratio > 1,
    )
    pre = {k: t[k]["accuracy_after"] for k in ("prefix", "prefix_mlp")}
    claims["prefix_tuning_learns"] = claim(
        f"prefix tuning: {100 * pre['prefix']:.0f}% exact match without the MLP, "
        f"{100 * pre['prefix_mlp']:.0f}% with it, after {len(t['prefix']['losses'])} steps"
        + ("" if max(pre.values()) > base_acc else " (it did not learn the task in this budget)"),
        max(pre.values()) > base_acc,
    )
    claims["prefix_gradient_works"] = _prefix_diagnosis_claim(results)
    st = results["step_time"]
    speed, full_ms, lora_ms = (
        st["lora_r8_all"]["speed_vs_full"],
        st["full"]["ms"],
        st["lora_r8_all"]["ms"],
    )
    claims["lora_step_faster"] = claim(
        f"a LoRA r=8 training step runs at {speed:.2f}x full fine-tuning's speed "
        f"({lora_ms['median']:.1f} ms, {lora_ms['min']:.1f}-{lora_ms['max']:.1f}, vs "
        f"{full_ms['median']:.1f} ms, {full_ms['min']:.1f}-{full_ms['max']:.1f})"
        + (
            ""
            if lora_ms["max"] < full_ms["min"]
            else ": the ranges over the rounds overlap, so this run shows no clear speed-up"
        ),
        lora_ms["max"] < full_ms["min"],
        speed=speed,
    )
    s = results["spectra"]
    e8, n8 = s["mean_energy"]["8"], s["random_mean_energy"]["8"]
    claims["update_is_low_rank"] = claim(
        f"a rank-8 approximation keeps {100 * e8:.1f}% of the full fine-tuning update's energy "
        f"(mean over layers) vs {100 * n8:.1f}% for a random matrix of the same shape",
        e8 > 2 * n8,
    )
    return claims


# =============================================================================
# 5. Figures (one function per figure, each returns the Figure)
# =============================================================================

METHOD_COLOURS = {
    "full": "black",
    "lora_r1_attn": "#c6dbef",
    "lora_r1_all": "#fdd0a2",
    "lora_r4_attn": "#6baed6",
    "lora_r4_all": "#fd8d3c",
    "lora_r8_all": "#d94801",
    "lora_r16_attn": "#08519c",
    "lora_r16_all": "#7f2704",
    "qlora_r8_all": "tab:green",
    "prefix": "tab:purple",
    "prefix_mlp": "tab:pink",
}


def _moving_average(values: list[float], window: int) -> list[float]:
    window = max(1, min(window, len(values)))
    c = [0.0, *itertools.accumulate(values)]
    return [(c[i + 1] - c[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def plot_loss_curves(table: dict) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(10, 5))
    for name, row in table.items():
        losses = row["losses"]
        ax.plot(
            range(1, len(losses) + 1),
            _moving_average(losses, max(1, len(losses) // 20)),
            color=METHOD_COLOURS[name],
            lw=2.2 if name in ("full", "lora_r8_all") else 1.3,
            label=f"{row['label']}: {row['final_loss']:.3f}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("task loss on the answer tokens (nats, log; moving average)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="final loss")
    best = min(table, key=lambda n: table[n]["final_loss"])
    ax.set_title(
        f"Training loss of every method, same batches: {table[best]['label']} ends lowest "
        f"({table[best]['final_loss']:.3f})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_accuracy_vs_params(table: dict, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for name, row in table.items():
        kind = TUNING_METHODS[name]["kind"]
        marker = {"full": "s", "lora": "o", "qlora": "D", "prefix": "^"}[kind]
        ax.scatter(
            row["trainable"],
            100 * row["accuracy_after"],
            s=70,
            marker=marker,
            color=METHOD_COLOURS[name],
            edgecolor="black",
            zorder=3,
            label=f"{row['label']}: {100 * row['accuracy_after']:.1f}%",
        )
    ax.axhline(100 * table["full"]["accuracy_after"], color="black", ls="--", lw=1)
    base = max(row["accuracy_before"] for row in table.values())
    ax.axhline(
        100 * base, color="grey", ls=":", lw=1, label=f"before fine-tuning: {100 * base:.0f}%"
    )
    ax.set_xscale("log")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("exact match on held-out word lists (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_learning_vs_forgetting(choice: dict) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = {"full": "black", "lora": "#d94801", "prefix": "tab:purple"}
    for family, c in choice.items():
        cands = sorted(c["candidates"].values(), key=lambda v: v["lr"])
        x = [v["forgetting"] for v in cands]
        y = [100 * v["dev_accuracy"] for v in cands]
        ax.plot(x, y, "o-", color=colours[family], label=tuning_label(c["method"]))
        left = family == "lora"  # its labels to the left, off the full fine-tuning ones
        for v in cands:
            ax.annotate(
                f"lr {v['lr']:g}",
                (v["forgetting"], 100 * v["dev_accuracy"]),
                textcoords="offset points",
                xytext=(-12, -4) if left else (8, -13),
                ha="right" if left else "left",
                fontsize=8,
                color=colours[family],
            )
        chosen = c["candidates"][c["chosen"]]
        ax.scatter(
            chosen["forgetting"],
            100 * chosen["dev_accuracy"],
            s=260,
            facecolors="none",
            edgecolors=colours[family],
            lw=1.5,
        )
    ax.scatter([], [], s=160, facecolors="none", edgecolors="grey", label="rate chosen (dev)")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("forgetting: validation loss on the original text, after - before (nats)")
    ax.set_ylabel("exact match on the dev word lists (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    ax.set_title(
        "Learning against forgetting over each family's learning-rate grid\n"
        "(same steps and batches; dev split; circled: the rate chosen and used below)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations")


def plot_memory(table: dict) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(10, 5.5))
    names = list(table)
    left = [0.0] * len(names)
    colours = {
        "weights": "#9ecae1",
        "gradients": "#fdae6b",
        "optimizer": "#e6550d",
        "activations": "#bcbddc",
    }
    for part in MEMORY_PARTS:
        values = [table[n]["memory"]["measured"][part] / 2**20 for n in names]
        ax.barh(range(len(names)), values, left=left, color=colours[part], label=part)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_yticks(range(len(names)), [table[n]["label"] for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("bytes of one training step, measured from the tensors (MiB)")
    ax.legend(fontsize=8, loc="lower right")
    full, lora = table["full"]["memory"], table["lora_r8_all"]["memory"]
    ax.set_title(
        f"Memory of a training step: full fine-tuning {full['total'] / 2**20:.2f} MiB, "
        f"LoRA r=8 {lora['total'] / 2**20:.2f} MiB;\ngradients and AdamW state shrink with the "
        "trainable parameters, the frozen weights and the activations stay",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_delta_w_spectra(spectra: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    colours = dict(zip(kinds, plt.get_cmap("tab10").colors, strict=False))
    seen = set()
    for name, layer in spectra["layers"].items():
        kind = name.rpartition(".")[2]
        s = torch.tensor(layer["singular_values"])
        axes[0].plot(
            range(1, len(s) + 1),
            (s / s[0]).tolist(),
            color=colours[kind],
            lw=1,
            label=kind if kind not in seen else None,
        )
        seen.add(kind)
    axes[0].set_yscale("log")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("index i of the singular value (log)")
    axes[0].set_ylabel("sigma_i / sigma_1 of dW (log)")
    axes[0].legend(fontsize=8, title="layer", loc="lower left")
    axes[0].set_title("singular values of every layer's full fine-tuning update", fontsize=10)
    ranks = spectra["ranks"]
    axes[1].plot(
        ranks,
        [100 * spectra["mean_energy"][str(r)] for r in ranks],
        "o-",
        color="tab:red",
        label="full fine-tuning update dW",
    )
    axes[1].plot(
        ranks,
        [100 * spectra["random_mean_energy"][str(r)] for r in ranks],
        "s--",
        color="grey",
        label="random matrix, same shapes",
    )
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks(ranks, [str(r) for r in ranks])
    axes[1].set_ylim(0, 100)
    axes[1].set_xlabel("rank r of the approximation")
    axes[1].set_ylabel("energy kept, sum_{i<=r} sigma_i^2 / sum sigma_i^2 (%)")
    axes[1].legend(fontsize=8, loc="upper left")
    axes[1].grid(alpha=0.3)
    e8, n8 = spectra["mean_energy"].get("8"), spectra["random_mean_energy"].get("8")
    fig.suptitle(
        f"Is the full fine-tuning update low-rank? Rank 8 keeps {100 * e8:.0f}% of its energy, "
        f"{100 * n8:.0f}% for random matrices",
        fontsize=11,
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
            "val_windows": 8,
        },
        "task": {"n_words": 2, "n_train": 100, "n_dev": 25, "n_test": 50},
        "steps": 6,
        "batch_size": 16,
        "lr_grid": {"full": (1e-3, 3e-3), "lora": (3e-3,), "prefix": (3e-2,)},
        "prefix_one_example": {"steps": 10, "lr": 0.1},
        "val_windows": 8,
        "rounds": 1,
        "min_run_time": 0.01,
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
            "val_windows": 32,
        },
        "task": {"n_words": 2, "n_train": 400, "n_dev": 76, "n_test": 76},  # 552 lists in all
        "steps": 300,
        "batch_size": 32,
        "lr_grid": {  # full fine-tuning's usual rates are lower than LoRA's, prefix's higher
            "full": (3e-4, 1e-3, 3e-3),
            "lora": (1e-3, 3e-3, 1e-2),
            "prefix": (3e-2, 1e-1),
        },
        "prefix_one_example": {"steps": 200, "lr": 0.1},
        "val_windows": 32,
        "rounds": 3,
        "min_run_time": 0.05,
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
        f"  {info['source']}\n  {c['n_layers']} layers, d_model {c['d_model']}, {c['n_heads']} "
        f"heads, {c['n_kv_heads']} KV heads, {info['parameters']:,} parameters"
    )


def print_parity(parity: dict, own: dict) -> None:
    if "skipped" in parity:
        print(f"  peft parity: {parity['skipped']}")
    if "lora" in parity:
        for kind in ("lora", "rslora"):
            p = parity["lora"][kind]
            print(
                f"  {kind:<6} vs peft: logits max err {p['logits_max_err']:.1e}, merged weights "
                f"{'bit-identical' if p['merged_bit_identical'] else p['merged_weight_max_err']}"
                f", trainable {p['trainable_ours']:,} (peft {p['trainable_peft']:,}), adapter "
                f"ours->peft {p['saved_adapter_in_peft_max_err']:.1e}, peft->ours "
                f"{p['peft_adapter_in_ours_max_err']:.1e}"
            )
    if "qlora" in parity:
        q = parity["qlora"]
        print(
            f"  QLoRA vs peft + bitsandbytes (nf4, double quant, fp32 compute): logits max err "
            f"{q['logits_max_err']:.1e} with bitsandbytes' codes, "
            f"{q['own_quantization_logits_max_err']:.1e} with ours"
        )
    for name, p in parity.get("prefix", {}).items():
        print(
            f"  prefix {name:<9} ({p['n_heads']} heads, {p['n_kv_heads']} KV heads) vs peft: "
            f"logits max err {p['logits_max_err']:.1e}, gradients {p['grad_max_err']:.1e} "
            f"(largest {p['grad_max_abs']:.1f}), trainable {p['trainable_ours']:,} "
            f"(peft {p['trainable_peft']:,})"
        )
    print(
        f"  merge changes the logits by {own['lora']['merged_vs_unmerged_logits_max_err']:.1e} "
        f"(float base), {own['qlora']['merged_vs_unmerged_logits_max_err']:.1e} (NF4 base); "
        f"prefix gradient through the cache: norm {own['prefix_grad_norm']:.3f}"
    )


def print_task(info: dict) -> None:
    print(
        f"  {info['n_train']} train / {info['n_dev']} dev / {info['n_test']} held-out lists of "
        f"{info['n_words']} of "
        f"{info['n_vocab_words']} words, e.g. {info['example_prompt']!r} -> "
        f"{info['example_answer']!r}"
    )


def print_table(table: dict, steps: dict) -> None:
    head = f"{'method':<26} {'trainable':>10} {'acc before':>10} {'acc after':>9}"
    print(f"  {head} {'forgetting':>10} {'optimizer B':>12} {'step total B':>12} {'ms/step':>8}")
    for name, r in table.items():
        m = r["memory"]["measured"]
        print(
            f"  {r['label']:<26} {r['trainable']:>10,} {r['accuracy_before']:>10.1%} "
            f"{r['accuracy_after']:>9.1%} {r['forgetting']:>+10.3f} {m['optimizer']:>12,} "
            f"{r['memory']['total']:>12,} {steps[name]['ms']['median']:>8.1f}"
        )


def print_lr_choice(choice: dict) -> None:
    print(
        "  chosen (the lowest rate within 1 point of the best dev exact match): "
        + ", ".join(f"{family} {c['chosen']}" for family, c in choice.items())
    )


def print_prefix_one_example(fit: dict) -> None:
    print(
        f"  one list, {fit['steps']} steps at lr {fit['lr']:g}: task loss "
        f"{fit['loss_start']:.3f} -> {fit['loss_end']:.3f}, greedy answer "
        f"{'exact' if fit['exact'] else 'not exact'}"
    )


def print_spectra(spectra: dict) -> None:
    cells = ", ".join(
        f"r={r}: {100 * spectra['mean_energy'][str(r)]:.1f}% "
        f"(random {100 * spectra['random_mean_energy'][str(r)]:.1f}%)"
        for r in spectra["ranks"]
    )
    print(f"  energy of the full fine-tuning update kept at rank {cells}")


def run_peft_parity(quick: bool, seed: int) -> dict:
    if quick:
        return {"skipped": "not under --quick (importing peft takes ~15 s); see the default run"}
    peft = peft_modules()
    if peft is None:
        return {"skipped": "peft is not installed (the dev group)"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notes about peft's calls
        return {
            "lora": check_peft_parity(peft, seed),
            "qlora": check_qlora_parity(peft, seed),
            "prefix": check_prefix_parity(peft, seed),
        }


def fine_tuning_figures(results: dict) -> dict:
    t = results["table"]
    return {
        "loss_curves": plot_loss_curves(t),
        "accuracy_vs_params": plot_accuracy_vs_params(t, tuning_accuracy_title(t)),
        "memory": plot_memory(t),
        "learning_vs_forgetting": plot_learning_vs_forgetting(results["lr_choice"]),
        "delta_w_spectra": plot_delta_w_spectra(results["spectra"]),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)  # the models here train on the CPU
    torch.set_num_threads(1)
    sizes = SIZES["quick" if args.quick else "default"]
    results: dict = {"meta": run_meta(args, device)}
    n = 8
    print(f"[1/{n}] loading the model ...")
    model_dir = args.model or (None if args.quick else training.DEFAULT_MODEL_DIR)
    model, data, _, results["model"] = training.load_trained_model(
        model_dir, sizes["fallback"], args.seed
    )
    print_model(results["model"])
    print(f"[2/{n}] checking LoRA, QLoRA and prefix tuning against peft ...")
    results["parity"] = run_peft_parity(args.quick, args.seed)
    results["own_checks"] = check_own_rules(args.seed)
    print_parity(results["parity"], results["own_checks"])
    print(f"[3/{n}] choosing each family's learning rate on the dev split ...")
    task = reversal_task(data["tok"], seed=args.seed, **sizes["task"])
    results["task"] = task_info(task, sizes)
    print_task(results["task"])
    longest = max(s.get("tokens", 0) for s in TUNING_METHODS.values())
    windows = training.val_windows(
        data["val"], model.config.max_seq_len - longest, sizes["val_windows"]
    )
    results["lr_choice"], runs = choose_learning_rates(model, task, windows, sizes, args.seed)
    print_lr_choice(results["lr_choice"])
    print(f"[4/{n}] fine-tuning every method on the task ...")
    results["table"], trained = compare_fine_tuning(
        model, task, windows, sizes, args.seed, results["lr_choice"], runs
    )
    print(f"[5/{n}] prefix tuning on one training example ...")
    one = sizes["prefix_one_example"]
    results["prefix_one_example"] = prefix_one_example(model, task, seed=args.seed, **one)
    print_prefix_one_example(results["prefix_one_example"])
    print(f"[6/{n}] measuring the rank of the full fine-tuning update ...")
    results["spectra"] = delta_w_spectra(model, trained["full"][0])
    print_spectra(results["spectra"])
    print(f"[7/{n}] timing a training step of every method ...")
    results["step_time"] = benchmark_train_steps(
        trained, task, sizes["batch_size"], sizes["rounds"], sizes["min_run_time"]
    )
    print_table(results["table"], results["step_time"])
    results["claims"] = fine_tuning_claims(results)
    print_claims(results["claims"])
    print(f"[8/{n}] drawing figures ...")
    figures = fine_tuning_figures(results)
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
