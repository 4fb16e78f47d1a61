"""Distributed training: data, tensor, pipeline and sharded (ZeRO) parallelism on torch.distributed.

The problem
-----------
One device holds one copy of a model and works through one batch at a time. Training a larger
model, or a batch faster, means spreading the work over several processes (GPUs, machines) that
only see their own memory and talk through messages. Each way of cutting the work (the batch,
the model's state, each layer's matrices, the stack of layers) trades memory for communication,
and each is easy to get subtly wrong: gradient accumulation that communicates on every
micro-step, a data shard that repeats the same order every epoch, a loss averaged over the wrong
count, a sharded optimizer that drifts from the one it replaces.

The idea
--------
1. Collectives from point-to-point: a **ring all-reduce** is a reduce-scatter (each rank ends
   with the sum of one chunk) then an all-gather (each rank passes its summed chunk around), each
   N-1 steps of "send a chunk to the next rank, receive one from the previous". Every collective
   below is built on it, so every byte a strategy sends is counted.
2. Data parallelism (DDP): every rank holds the whole model and a shard of the batch; after
   backward the gradients are averaged in buckets; with gradient accumulation only the last
   micro-step communicates. A ``DistributedSampler``-style shard: one seeded permutation per
   epoch (``set_epoch``), rank r takes every N-th index. Where DDP differs (same numbers, other
   timing): it all-reduces each bucket from an autograd hook as soon as the bucket's gradients
   are ready, overlapping communication with the rest of backward (ours waits for the whole
   backward); its default hook divides by N before the sum, not after; it broadcasts rank 0's
   parameters at construction (here every rank builds them from one seed); and it sizes its
   first bucket smaller (1 MiB) and rebuilds the buckets after the first step in the order the
   gradients arrived, so its bucket count per step can differ from ours.
3. ZeRO (Rajbhandari et al.): data parallelism without the N copies of the model state. Stage
   1 shards the AdamW state, stage 2 also the gradients (reduce-scatter instead of all-reduce),
   stage 3 also the parameters (all-gathered before each layer's use, freed after).
4. Tensor parallelism (Megatron-LM): split each layer's matrices. SwiGLU: gate/up by columns,
   down by rows; attention by heads (query and KV heads, for GQA). Two operators make it exact:
   f (identity forward, all-reduce backward) before the block, g (all-reduce forward, identity
   backward) after it.
5. Pipeline parallelism: consecutive layers on consecutive ranks, the batch cut into m
   micro-batches; GPipe runs all forwards then all backwards, 1F1B interleaves them (fewer
   activations held); both leave the same bubble.

The math
--------
N ranks, a tensor of n elements, Psi parameters, element size 4 bytes (fp32 here)::

    (1) ring all-reduce: 2 (N-1) steps of n/N elements: each rank sends 2 (N-1)/N n elements
        (reduce-scatter and all-gather each send (N-1)/N n), whatever N is
    (2) data parallel: g = (1/N) sum_r g_r, the gradient of the mean loss over the global batch
        when every rank's micro-batches hold the same number of tokens; with k micro-steps each
        rank's loss is divided by k and the all-reduce runs once, after the k-th
    (3) per-rank model state, fp32 AdamW (params 4, grads 4, m and v 8 bytes per parameter):
        DDP 16 Psi;  ZeRO-1 4 Psi + 4 Psi + 8 Psi/N;  ZeRO-2 4 Psi + (4 + 8) Psi/N;
        ZeRO-3 16 Psi/N. The paper's mixed precision (bf16 params and grads, K = 12 bytes of
        fp32 master copy, m, v): (2 + 2 + K) Psi, 2 Psi + 2 Psi + K Psi/N, 2 Psi + (2 + K) Psi/N,
        (2 + 2 + K) Psi/N
    (4) communication per rank per step: DDP, ZeRO-1, ZeRO-2: 2 (N-1)/N Psi elements (ZeRO:
        reduce-scatter of the gradients + all-gather of the parameters); ZeRO-3: 3 (N-1)/N Psi
        (parameters gathered in forward and again in backward), here less (N-1)/N Psi_head:
        the last unit (norm and head) is gathered once, its forward runs inside backward
    (5) tensor parallel MLP: Y = g( silu(X W_gate^(r)) * (X W_up^(r)) W_down^(r) ), W_gate, W_up
        split by columns, W_down by rows; attention: heads split, W_o by rows
    (6) f: forward x -> x, backward dL/dx = sum_r dL/dx_r (all-reduce);  g: forward
        y = sum_r y_r (all-reduce), backward dL/dy_r = dL/dy: each is the other's transpose
    (7) pipeline bubble (p stages, m micro-batches, equal forward and backward times per stage):
        idle fraction = (p - 1) / (m + p - 1), for GPipe and for 1F1B (Narayanan et al.
        write the same bubble as (p - 1) / m of the ideal, bubble-free time). Equal layers per stage
        are not equal times (the head over a 4,097-token vocabulary costs several layers), so
        the run also cuts the model by measured time (torchgpipe's balance_by_time)

Why float64 for the equalities of trained parameters: N ranks sum a gradient in another order
than one process does, so in fp32 the sums differ in their last bits. AdamW's step,
lr m / (sqrt(v) + eps), is about lr sign(g) whatever the gradient's size, so where a gradient is
as tiny as that rounding (a sum that nearly cancels) the two runs can step by visibly different
amounts. Every strategy therefore also trains in float64, where the equalities are held to 1e-6;
the fp32 gaps are reported beside them.

Where it is used
----------------
PyTorch DDP (``torch/nn/parallel/distributed.py``: buckets, ``no_sync``), FSDP2
(``torch.distributed.fsdp.fully_shard``: ZeRO-3 on DTensors), DeepSpeed ZeRO 1/2/3, Megatron-LM
(tensor and pipeline parallelism, 1F1B), DTensor's ``parallelize_module``, torchtitan (all of
them composed for Llama). The model is ``training.py``'s ``Llama`` (untied embeddings here, so
the first and last pipeline stages own separate matrices).

Run it
------
    uv run python distributed_training.py                  # spawns 2 workers (fork), gloo
    uv run python distributed_training.py --world-size 4   # 4 workers
    uv run python distributed_training.py --quick          # small sizes, a fast check
    uv run torchrun --nproc-per-node 2 distributed_training.py --quick --no-show --out DIR

The script starts its own workers (``torch.multiprocessing``, the ``fork`` start method where
there is one) on a free port, gives every collective a timeout, passes the numbers back as plain
Python, destroys the process group and joins every worker (killing them if they hang). Under
``torchrun`` (RANK and WORLD_SIZE set) the same code runs in place and rank 0 writes the outputs.
Across machines, run on each of M machines (node rank i = 0 .. M-1, the first one's address)::

    torchrun --nnodes M --nproc-per-node G --node-rank i \\
        --master-addr HOST0 --master-port 29500 distributed_training.py
    # or elastic rendezvous: --rdzv-backend c10d --rdzv-endpoint HOST0:29500 --rdzv-id job1

The backend is NCCL when the device is CUDA (one GPU per rank), else gloo. Every strategy runs
in one worker session; results.json holds every equality as a max abs error, the bytes each
rank sent per step against (1) and (4), the per-rank memory against (3) and its extrapolation
to Llama-2 7B and 70B, step times, and the pipeline's event times.

References
----------
- Rajbhandari, Rasley, Ruwase and He, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", 2019, arXiv 1910.02054 (section 5 and figure 1: the memory formulas).
- Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
  Parallelism", 2019, arXiv 1909.08053 (section 3: f and g).
- Huang et al., "GPipe", 2018, arXiv 1811.06965; Narayanan et al., "Efficient Large-Scale
  Language Model Training on GPU Clusters Using Megatron-LM", 2021, arXiv 2104.04473 (1F1B,
  the bubble, (p - 1) / m of the ideal time there, (p - 1) / (m + p - 1) of the total here).
- Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", 2020,
  arXiv 2006.15704 (DDP's buckets and no_sync); Zhao et al., "PyTorch FSDP", 2023,
  arXiv 2304.11277.
- Patarasuk and Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations",
  2009 (the ring).
- Touvron et al., "Llama 2", 2023, arXiv 2307.09288 (the 7B and 70B configurations).
- Reference code: pytorch/pytorch ``torch/nn/parallel/distributed.py``,
  ``torch/utils/data/distributed.py`` (``DistributedSampler``),
  ``torch/distributed/fsdp/_fully_shard/``, ``torch/distributed/tensor/parallel/style.py``
  (``ColwiseParallel``, ``RowwiseParallel``), ``torch/distributed/pipelining/schedules.py``;
  NVIDIA/Megatron-LM ``megatron/core/tensor_parallel/mappings.py`` (f and g) and
  ``megatron/core/pipeline_parallel/schedules.py`` (and ``transformer/transformer_config.py``:
  ``num_layers_in_last_pipeline_stage``); kakaobrain/torchgpipe ``torchgpipe/balance/__init__.py``
  (``balance_by_time``: stages cut by measured time); deepspeedai/DeepSpeed
  ``deepspeed/runtime/zero/stage_1_and_2.py``.

Contents
--------
2. Core: ``RingComm`` (counted send/recv), ``ring_schedule``, ``ring_reduce_scatter``,
   ``ring_all_gather``, ``ring_all_reduce`` (1); ``shard_indices``, ``gradient_buckets``,
   ``all_reduce_gradients``, ``data_parallel_step`` (2); ``llama_units``, ``run_units``,
   ``units_loss``, ``ZeroShardedTrainer`` (3, 4); ``CopyToTensorParallel`` (f),
   ``ReduceFromTensorParallel`` (g), ``TensorParallelBlock`` (5, 6); ``gpipe_schedule``,
   ``one_f_one_b_schedule``, ``run_pipeline`` (7).
3. Baselines and apparatus: the door checks (``_check_sizes``, ``_check_float_tensor``,
   ``_check_tp_divides``, ``_check_tp_layer``, ``check_parallel_sizes``); the launcher
   (``start_method``, ``free_port``, ``dist_backend``, ``under_torchrun``, ``worker_main``,
   ``launch_workers``: fork, timeouts, teardown, torchrun); accounting
   (``zero_full_parameters``, ``held_bytes``, ``optimizer_state_bytes``, ``STRATEGIES``,
   ``BYTES_FP32``, ``BYTES_PAPER``, ``memory_formula``, ``comm_formula``, ``LLAMA2``,
   ``llama2_params``, ``schedule_idle_fraction``, ``bubble_formula``); the model and data
   (``model_config``, ``seeded_llama``, ``rank_batches``, ``global_batches``); the references
   (``reference_train``, ``reference_gradient``, ``zero_rank_slices``, ``ddp_train``,
   ``fsdp2_train``, ``dtensor_block``).
4. Experiments: ``claim``, ``print_claims``, ``STEP_ADAMW``; in every worker ``check_ring``,
   ``check_data_parallel``, ``check_zero``, ``check_tensor_parallel``, ``equal_layer_stages``,
   ``balanced_stages``, ``unit_seconds``, ``check_pipeline``, ``worker_experiments``; then
   ``check_sampler``, ``summarize``, ``summarize_pipeline``, ``stage_name``, ``pipeline_idle``,
   ``MEMORY_ROWS``, ``STRATEGY_LABELS``, ``memory_table``, ``communication_table``,
   ``step_times``, ``extrapolate_memory``, ``zero_paper_check``, ``zero3_phrase``,
   ``idle_sentence``, ``split_label``, ``distributed_claims``.
5. Figures: ``KIND_COLOURS``, ``timeline_title``, ``plot_pipeline_timeline``, ``plot_memory``,
   ``plot_communication``, ``plot_ring``.
6. Main: ``SIZES``, ``parse_args``, ``run_sizes``, the ``print_*`` helpers,
   ``distributed_figures``, ``setup_info``, ``main``.
7. Plumbing (identical in every script).

Read first: ``ring_schedule`` and ``ring_all_reduce`` (the whole of (1)), then
``data_parallel_step``, ``ZeroShardedTrainer.step``, ``TensorParallelBlock`` with the two
operators, and ``one_f_one_b_schedule`` with ``run_pipeline``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import itertools
import json
import logging
import math
import numbers
import os
import platform
import queue
import shutil
import socket
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import training
from grouped_query_attention import GroupedQueryAttention
from swiglu import SwiGLUFeedForward

# =============================================================================
# 2. Core: the ring, data parallelism, ZeRO, tensor parallelism, pipeline schedules
# =============================================================================


class RingComm:
    """This rank's place on the ring (the default process group) and its only way to talk,
    every byte it sends counted under a label (``sent``), every all-reduce too (``calls``)."""

    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("RingComm needs an initialised process group (init_process_group)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.sent: collections.Counter = collections.Counter()  # label -> bytes this rank sent
        self.calls: collections.Counter = collections.Counter()  # label -> all-reduces

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, label: str) -> None:
        """send -> rank + 1 while recv <- rank - 1 (isend first: no rank waits on a send)."""
        request = dist.isend(send.contiguous(), (self.rank + 1) % self.world_size)
        dist.recv(recv, (self.rank - 1) % self.world_size)
        request.wait()
        self.sent[label] += send.numel() * send.element_size()

    def send(self, t: torch.Tensor, dst: int, label: str):
        """Start sending ``t`` to ``dst``; returns the request (keep ``t`` alive until waited)."""
        self.sent[label] += t.numel() * t.element_size()
        return dist.isend(t, dst)

    def recv(self, shape: tuple, src: int, device) -> torch.Tensor:
        t = torch.empty(shape, device=device)
        dist.recv(t, src)
        return t


def ring_schedule(world_size: int, rank: int) -> list[tuple[int, int]]:
    """(chunk sent, chunk received) at each of the 2 (N-1) steps of a ring all-reduce (1).

    Reduce-scatter, step s: send chunk (r - s - 1) mod N, receive (r - s - 2) mod N and add it,
    so after N-1 steps rank r holds the full sum of chunk r. All-gather, step s: send chunk
    (r - s) mod N (summed), receive (r - s - 1) mod N and keep it."""
    _check_sizes(world_size=world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank!r}) must be an int in [0, world_size={world_size})")
    n = world_size
    reduce_scatter = [((rank - s - 1) % n, (rank - s - 2) % n) for s in range(n - 1)]
    all_gather = [((rank - s) % n, (rank - s - 1) % n) for s in range(n - 1)]
    return reduce_scatter + all_gather


def ring_reduce_scatter(flat: torch.Tensor, comm: RingComm, label: str) -> torch.Tensor:
    """Sum ``flat`` (1-D, same length on every rank) over the ranks, keeping only this rank's
    chunk (flat.tensor_split(N)[rank], returned as a view of ``flat``; the rest is scratch)."""
    chunks = flat.tensor_split(comm.world_size)  # N views, lengths differ by at most 1
    for send, recv in ring_schedule(comm.world_size, comm.rank)[: comm.world_size - 1]:
        incoming = torch.empty_like(chunks[recv])
        comm.exchange(chunks[send], incoming, label)
        chunks[recv].add_(incoming)  # (1) partial sums travel one rank further each step
    return chunks[comm.rank]


def ring_all_gather(flat: torch.Tensor, comm: RingComm, label: str) -> torch.Tensor:
    """Fill ``flat`` (1-D) on every rank from each rank's own chunk flat.tensor_split(N)[r]."""
    chunks = flat.tensor_split(comm.world_size)
    for send, recv in ring_schedule(comm.world_size, comm.rank)[comm.world_size - 1 :]:
        comm.exchange(chunks[send], chunks[recv], label)  # recv writes into flat's own view
    return flat


def ring_all_reduce(tensor: torch.Tensor, comm: RingComm, label: str = "all_reduce"):
    """Sum ``tensor`` over every rank, in place, by a ring (1): reduce-scatter then all-gather,
    each N-1 exchanges with the neighbours. Each rank sends 2 (N-1)/N of the tensor's bytes
    (counted in ``comm.sent[label]``), whatever N: the ring's bandwidth does not grow with N.
    Equal to ``dist.all_reduce`` (tested, and printed by ``check_ring``).

    ``ring_schedule`` is the bookkeeping, one (sent, received) chunk pair per step; with 3
    ranks, rank 0 sends chunks 2, 1 while reducing and ends with the sum of chunk 0:

    >>> ring_schedule(world_size=3, rank=0)  # 2 reduce-scatter steps, then 2 all-gather steps
    [(2, 1), (1, 0), (0, 2), (2, 1)]
    >>> [ring_schedule(3, r)[1][1] for r in range(3)]  # the chunk each rank owns, fully summed
    [0, 1, 2]
    >>> [len(ring_schedule(n, 0)) for n in (1, 2, 4, 8)]  # 2 (N-1) steps of n/N elements each
    [0, 2, 6, 14]
    """
    _check_float_tensor("tensor", tensor)
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.flatten()
    comm.calls[label] += 1
    ring_reduce_scatter(flat, comm, label)
    ring_all_gather(flat, comm, label)
    if flat.data_ptr() != tensor.data_ptr():
        tensor.copy_(flat.view_as(tensor))
    return tensor


# --- data parallelism (2)


def shard_indices(n_samples: int, world_size: int, rank: int, seed: int, epoch: int) -> list:
    """``DistributedSampler``'s shard: one permutation of the samples seeded by seed + epoch
    (so ``set_epoch`` reshuffles, identically on every rank), padded by wrapping to a multiple
    of N, then every N-th index from ``rank``. Every rank gets the same count."""
    _check_sizes(n_samples=n_samples, world_size=world_size)
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed + epoch))
    order = order.tolist()
    total = -(-n_samples // world_size) * world_size  # ceil to a multiple of N
    order = (order * -(-total // n_samples))[:total]  # pad by repeating from the start
    return order[rank:total:world_size]


def gradient_buckets(params: list, bucket_bytes: int) -> list[list]:
    """Parameters in reverse order (backward produces the last layer's gradients first, as
    DDP's buckets), cut into buckets of about ``bucket_bytes``."""
    buckets, size = [[]], 0
    for p in reversed(params):
        if buckets[-1] and size + p.numel() * p.element_size() > bucket_bytes:
            buckets, size = [*buckets, []], 0
        buckets[-1].append(p)
        size += p.numel() * p.element_size()
    return buckets


def all_reduce_gradients(buckets: list[list], comm: RingComm) -> None:
    """(2) g <- (1/N) sum_r g_r, one ring all-reduce per bucket of flattened gradients."""
    for bucket in buckets:
        flat = torch.cat([p.grad.flatten() for p in bucket])  # (bucket numel,)
        ring_all_reduce(flat, comm, "dp_all_reduce").div_(comm.world_size)
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
            p.grad.copy_(g.view_as(p))


def data_parallel_step(model, optimizer, micro_batches: list, buckets, comm) -> float:
    """One optimizer step of data parallelism with gradient accumulation: backward on each of
    the k micro-batches (loss / k), the gradients averaged over the ranks once, after the last
    (2): communicating on every micro-step would send k times the bytes for the same result.
    Returns this rank's mean loss."""
    k, total = len(micro_batches), 0.0
    for ids, targets in micro_batches:
        loss = units_loss(llama_units(model), ids, targets) / k  # equal tokens per micro-batch
        loss.backward()  # accumulates into p.grad, no communication
        total += loss.item()
    all_reduce_gradients(buckets, comm)  # (2) the last micro-step only
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# --- ZeRO (3, 4)


def llama_units(model: training.Llama) -> list[nn.Module]:
    """The Llama cut where the activation is (batch, seq_len, d_model): the embedding, each
    decoder layer, the final norm with the head. ZeRO-3 gathers one unit at a time; the
    pipeline gives each stage consecutive units."""
    return [model.model.embed_tokens, *model.model.layers, nn.Sequential(model.model.norm,
            model.lm_head)]  # fmt: skip


def run_units(units: list, h: torch.Tensor) -> torch.Tensor:
    for unit in units:
        h = unit(h)  # (batch, seq_len, d_model), the last gives logits (batch, seq_len, vocab)
    return h


def units_loss(units: list, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(run_units(units, ids).flatten(0, 1), targets.flatten())  # token mean


class ZeroShardedTrainer:
    """ZeRO data parallelism (Rajbhandari et al. 2019), stage 1, 2 or 3, for a Llama.

    Each unit's parameters live in one flat buffer padded to a multiple of N; rank r owns the
    slice [r S, (r + 1) S) and ``torch.optim.AdamW`` keeps m and v for that slice only (stage
    1). Gradients are reduce-scattered, so each rank receives the average of its own slice;
    stage 1 holds the full gradient buffer while it does, stage 2 keeps only the slice. After
    the step the slices are all-gathered back into every rank's full buffer. Stage 3 keeps only
    the slice of the parameters too: each unit is all-gathered just before its forward (and
    again before its recomputed forward in backward) and freed after (3, 4)."""

    def __init__(self, model: training.Llama, stage: int, comm: RingComm, **adamw) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"stage ({stage!r}) must be 1, 2 or 3")
        self.stage, self.comm, n, r = stage, comm, comm.world_size, comm.rank
        self.units = llama_units(model)
        self.params = [list(u.parameters()) for u in self.units]
        self.shapes = [[p.shape for p in ps] for ps in self.params]
        self.flats, self.shards = [], []
        for ps in self.params:
            size = -(-sum(p.numel() for p in ps) // n)  # S = ceil(unit numel / N)
            flat = torch.zeros(size * n, dtype=ps[0].dtype, device=ps[0].device)  # (N S,)
            torch.cat([p.detach().flatten() for p in ps], out=flat[: sum(p.numel() for p in ps)])
            shard = flat[r * size : (r + 1) * size]  # stages 1, 2: a view, stepped in place
            self.shards.append(nn.Parameter(shard.clone() if stage == 3 else shard))
            self.flats.append(None if stage == 3 else flat)
            self.point_unit(len(self.flats) - 1, self.flats[-1])
        self.optimizer = torch.optim.AdamW(self.shards, **adamw)  # (3) m, v: 8 S bytes per unit
        self.grad_buffers: list = [None] * len(self.units)
        self.held: dict = {}  # bytes of parameters and gradients at the last step (see step)

    def point_unit(self, u: int, flat) -> None:
        """Make unit u's parameters views of ``flat`` (None: free them, stage 3)."""
        offset = 0
        for p, shape in zip(self.params[u], self.shapes[u], strict=True):
            numel = math.prod(shape)
            p.data = p.new_empty(0) if flat is None else flat[offset:][:numel].view(shape)
            offset += numel

    def gather_unit(self, u: int) -> None:
        """Stage 3: all-gather unit u's full parameters from every rank's slice."""
        flat = self.shards[u].new_empty(self.shards[u].numel() * self.comm.world_size)
        flat.tensor_split(self.comm.world_size)[self.comm.rank].copy_(self.shards[u].detach())
        self.point_unit(u, ring_all_gather(flat, self.comm, "zero_params"))

    def _reduce_gradients(self, u: int) -> None:
        """Reduce-scatter unit u's gradients: this rank keeps the average of its slice."""
        ps, shard = self.params[u], self.shards[u]
        flat = shard.new_zeros(shard.numel() * self.comm.world_size)  # (N S,)
        torch.cat([p.grad.flatten() for p in ps], out=flat[: sum(p.numel() for p in ps)])
        for p in ps:
            p.grad = None
        own = ring_reduce_scatter(flat, self.comm, "zero_grads").div_(self.comm.world_size)
        shard.grad = own if self.stage == 1 else own.clone()  # stage 1 holds all of flat
        self.grad_buffers[u] = flat if self.stage == 1 else None

    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> float:
        """One AdamW step on this rank's batch; returns its loss."""
        if self.stage < 3:
            loss = units_loss(self.units, ids, targets)
            loss.backward()
            for u in range(len(self.units)):
                self._reduce_gradients(u)
        else:
            loss = self._forward_backward_sharded(ids, targets)
        self.held = {  # what this rank holds at the step (3): measured, not assumed
            "params": held_bytes(self.shards if self.stage == 3 else self.flats),
            "grads": held_bytes([*self.grad_buffers, *(s.grad for s in self.shards)]),
        }
        self.optimizer.step()  # each rank steps its slice only
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_buffers = [None] * len(self.units)
        for flat in self.flats if self.stage < 3 else []:
            ring_all_gather(flat, self.comm, "zero_params")  # every rank's slice, everywhere
        return loss.item()

    def _forward_backward_sharded(self, ids, targets) -> torch.Tensor:
        """Stage 3: forward unit by unit without autograd (gather, run, free), keeping each
        unit's input; backward from the last unit: gather, recompute with autograd, backward,
        reduce-scatter the gradients, free. The last unit is gathered once."""
        inputs, h = [], ids
        with torch.no_grad():
            for u, unit in enumerate(self.units[:-1]):
                self.gather_unit(u)
                inputs.append(h)
                h = unit(h)
                self.point_unit(u, None)
        inputs.append(h)
        grad = loss = None
        for u in reversed(range(len(self.units))):
            self.gather_unit(u)
            x = inputs[u] if u == 0 else inputs[u].detach().requires_grad_()
            out = self.units[u](x)
            if u == len(self.units) - 1:
                loss = F.cross_entropy(out.flatten(0, 1), targets.flatten())
                loss.backward()
            else:
                out.backward(grad)
            grad = x.grad if u > 0 else None
            self._reduce_gradients(u)
            self.point_unit(u, None)
        return loss


# --- tensor parallelism (5, 6)


class CopyToTensorParallel(torch.autograd.Function):
    """Megatron's f: identity forward; backward all-reduces dL/dx over the ranks (6), since x
    fed every rank's shard and each shard contributes part of its gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: RingComm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ring_all_reduce(grad.contiguous().clone(), ctx.comm, "tp_all_reduce"), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's g: forward all-reduces the ranks' partial outputs (6); backward is the
    identity, since every partial sum y_r enters y with weight 1."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, comm: RingComm) -> torch.Tensor:
        return ring_all_reduce(y.contiguous().clone(), comm, "tp_all_reduce")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class TensorParallelBlock(nn.Module):
    """This rank's shard of a SwiGLU MLP or a GQA attention layer, between f and g (5, 6).

    MLP: gate_proj and up_proj keep rows [r h, (r + 1) h) of h = hidden_dim / N (a column split
    of W x in the paper's x W notation), down_proj the matching columns (a row split). Attention:
    query heads [r H/N, (r + 1) H/N) and KV heads [r K/N, (r + 1) K/N) (each query head's KV
    head stays on its rank), o_proj the matching columns. forward(x) = g(shard(f(x)))."""

    def __init__(self, layer: nn.Module, comm: RingComm) -> None:
        super().__init__()
        self.comm, n, r = comm, comm.world_size, comm.rank
        _check_tp_layer(layer, n)
        if isinstance(layer, SwiGLUFeedForward):
            h = layer.hidden_dim // n
            self.shard = SwiGLUFeedForward(layer.d_model, hidden_dim=h)
            splits = {"gate_proj": (h, 0), "up_proj": (h, 0), "down_proj": (h, 1)}
        else:  # GroupedQueryAttention
            d = layer.head_dim
            self.shard = GroupedQueryAttention(
                layer.d_model, layer.n_heads // n, layer.n_kv_heads // n, d,
                max_seq_len=layer.max_seq_len, rope_base=layer.rope_base, sharing="sdpa",
            )  # fmt: skip
            q, kv = layer.n_heads // n * d, layer.n_kv_heads // n * d
            splits = {"q_proj": (q, 0), "k_proj": (kv, 0), "v_proj": (kv, 0), "o_proj": (q, 1)}
        with torch.no_grad():  # column parallel: output features (dim 0) split; row: inputs (1)
            for name, (size, dim) in splits.items():
                mine = getattr(layer, name).weight.split(size, dim)[r]
                getattr(self.shard, name).weight.copy_(mine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = CopyToTensorParallel.apply(x, self.comm)  # f
        return ReduceFromTensorParallel.apply(self.shard(x), self.comm)  # g: sum of partials


# --- pipeline parallelism (7)


def gpipe_schedule(n_stages: int, n_micro: int) -> list[list[tuple[str, int]]]:
    """Each stage's actions: the m forwards, then the m backwards (GPipe)."""
    _check_sizes(n_stages=n_stages, n_micro=n_micro)
    one = [("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)]
    return [list(one) for _ in range(n_stages)]


def one_f_one_b_schedule(n_stages: int, n_micro: int) -> list[list[tuple[str, int]]]:
    """1F1B (PipeDream-Flush, Megatron): stage s runs p - s - 1 warm-up forwards, then
    alternates one forward and one backward, then drains the backwards. A stage holds at most
    p - s micro-batches' activations, instead of m."""
    _check_sizes(n_stages=n_stages, n_micro=n_micro)
    out = []
    for s in range(n_stages):
        warm = min(n_stages - s - 1, n_micro)
        acts = [("F", i) for i in range(warm)]
        for i in range(n_micro - warm):
            acts += [("F", warm + i), ("B", i)]
        out.append(acts + [("B", i) for i in range(n_micro - warm, n_micro)])
    return out


def run_pipeline(stage: list, actions: list, micro_batches: list, comm: RingComm, act_shape):
    """Run this rank's ``actions`` of a schedule over its ``stage`` (a list of units): F
    receives the activation from rank - 1 (the first stage reads the ids), runs the stage and
    sends the output to rank + 1 (the last computes the loss / m); B receives dL/d(output)
    from rank + 1, backpropagates and sends dL/d(input) to rank - 1. Sends are asynchronous,
    so no schedule deadlocks. Returns the summed loss (last stage) and the (kind, micro-batch,
    start, end) of every compute, in seconds from a common barrier."""
    first, last, m = comm.rank == 0, comm.rank == comm.world_size - 1, len(micro_batches)
    inputs, outputs, pending, events, total = {}, {}, [], [], 0.0
    dist.barrier()
    t0 = time.perf_counter()
    for kind, i in actions:
        ids, targets = micro_batches[i]
        if kind == "F":
            x = ids if first else comm.recv(act_shape, comm.rank - 1, ids.device).requires_grad_()
            start = time.perf_counter()
            h = run_units(stage, x)
            if last:
                h = F.cross_entropy(h.flatten(0, 1), targets.flatten()) / m
                total += h.item()
            else:
                pending.append(comm.send(h.detach(), comm.rank + 1, "pp_activations"))
            inputs[i], outputs[i] = x, h
        else:
            grad = None if last else comm.recv(act_shape, comm.rank + 1, ids.device)
            start = time.perf_counter()
            outputs.pop(i).backward(grad)
            x = inputs.pop(i)
            if not first:
                pending.append(comm.send(x.grad, comm.rank - 1, "pp_gradients"))
        events.append((kind, i, start - t0, time.perf_counter() - t0))
    for request in pending:
        request.wait()
    return total, events


# =============================================================================
# 3. Baselines and apparatus: door checks, the launcher, bytes, formulas, the references
# =============================================================================


def _check_sizes(**sizes: int) -> None:
    """Every size (a dimension, a count) must be an integer (not a bool) of at least 1."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} ({value!r}) must be an int")
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")


def _check_float_tensor(name: str, t: torch.Tensor, last_dim: int | None = None) -> None:
    """A floating-point tensor (no silent casts of ints), with ``last_dim`` features if given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} dtype ({t.dtype}) must be a floating-point dtype")
    if last_dim is not None and (t.dim() == 0 or t.shape[-1] != last_dim):
        raise ValueError(f"{name} (shape {tuple(t.shape)}) must end in {last_dim} features")


def _check_tp_divides(world_size: int, **sizes: int) -> None:
    """Tensor parallelism splits each of ``sizes`` (heads, KV heads, hidden units) evenly."""
    _check_sizes(world_size=world_size, **sizes)
    for name, value in sizes.items():
        if value % world_size:
            raise ValueError(f"world_size ({world_size}) must divide {name} ({value})")


def _check_tp_layer(layer: nn.Module, world_size: int) -> None:
    """A SwiGLU MLP or a GQA attention layer without biases (their split is not written out),
    whose hidden units or query and KV heads ``world_size`` divides."""
    if not isinstance(layer, SwiGLUFeedForward | GroupedQueryAttention):
        name = type(layer).__name__
        raise TypeError(f"layer must be a SwiGLUFeedForward or GroupedQueryAttention, got {name}")
    if any(m.bias is not None for m in layer.modules() if isinstance(m, nn.Linear)):
        raise ValueError("layer has biases: TensorParallelBlock splits bias-free layers (Llama's)")
    if isinstance(layer, SwiGLUFeedForward):
        _check_tp_divides(world_size, hidden_dim=layer.hidden_dim)
    else:
        _check_tp_divides(world_size, n_heads=layer.n_heads, n_kv_heads=layer.n_kv_heads)


def check_parallel_sizes(
    world_size: int, n_heads: int, n_kv_heads: int, n_layers: int, batch_size: int, n_micro: int
) -> None:
    """The door of a run: N ranks must split the heads and KV heads (tensor parallel), the
    layers (pipeline stages), and the batch, itself cut into ``n_micro`` micro-batches."""
    _check_sizes(world_size=world_size, n_micro=n_micro)
    _check_tp_divides(
        world_size, n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=n_layers, batch_size=batch_size
    )
    if batch_size % n_micro:
        raise ValueError(f"n_micro ({n_micro}) must divide batch_size ({batch_size})")


def start_method(device_type: str) -> str:
    """How ``launch_workers`` starts its processes: fork where the platform has it (~4x faster
    to start than spawn), spawn for CUDA (a process that has touched CUDA cannot be forked)."""
    return "fork" if "fork" in mp.get_all_start_methods() and device_type != "cuda" else "spawn"


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for MASTER_PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_backend(device_type: str) -> str:
    """NCCL for CUDA tensors (one GPU per rank), gloo for CPU tensors."""
    return "nccl" if device_type == "cuda" else "gloo"


def under_torchrun() -> bool:
    """torchrun (and any launcher of its kind) sets RANK, WORLD_SIZE and MASTER_ADDR."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def worker_main(fn, args: tuple, world_size: int, device_type: str, timeout_s: float):
    """One rank's whole session: join the group (every collective times out after
    ``timeout_s``), run ``fn(*args)``, gather each rank's result (plain Python) on rank 0, and
    destroy the group whatever happens. Returns the list of per-rank results on rank 0, None
    elsewhere."""
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(
        dist_backend(device_type),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        out = fn(*args)
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(out, gathered, dst=0)
        return gathered
    finally:
        dist.destroy_process_group()


def _worker_entry(rank, world_size, port, fn, args, device_type, timeout_s, results) -> None:
    """What each started process runs: the rendezvous address, then ``worker_main``; rank 0
    puts the results on the queue, a failing rank its error. An error inside ``fn`` is put
    before the group is torn down, so the first cause comes before the other ranks' "connection
    reset" that it provokes."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    reported = []

    def report(err: Exception) -> None:
        if not reported:
            reported.append(True)
            results.put(("error", f"rank {rank} raised {type(err).__name__}: {err}".strip(),
                         traceback.format_exc()))  # fmt: skip

    def reporting_fn(*a):
        try:
            return fn(*a)
        except Exception as err:
            report(err)
            raise

    try:
        gathered = worker_main(reporting_fn, args, world_size, device_type, timeout_s)
        if rank == 0:
            results.put(("ok", gathered, ""))
    except Exception as err:
        report(err)


def launch_workers(
    fn, args: tuple, world_size: int, device_type: str = "cpu", timeout_s: float = 300
) -> list | None:
    """Run ``fn(*args)`` on ``world_size`` ranks of one process group and return their results
    (rank order). Starts the workers on this machine (``start_method``) on a free port, and
    always joins every one: a worker that fails, dies or outlives ``timeout_s`` gets them all
    killed, then an error. Under torchrun this process is one of the ranks (None if not 0)."""
    _check_sizes(world_size=world_size)
    if under_torchrun():
        return worker_main(fn, args, world_size, device_type, timeout_s)
    ctx = mp.get_context(start_method(device_type))
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker_entry,
            args=(r, world_size, port, fn, args, device_type, timeout_s, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline, ok = time.monotonic() + timeout_s, False
    try:
        while True:
            try:
                status, payload, trace = results.get(timeout=0.2)
                break
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    why = f"exit codes {dead}" if dead else f"no result within {timeout_s} s"
                    raise RuntimeError(f"the workers failed: {why}") from None
        if status == "error":  # the first cause in full; the others fail in turn, one line each
            then, until = [], time.monotonic() + 1
            while time.monotonic() < until:
                with contextlib.suppress(queue.Empty):
                    then.append(results.get(timeout=0.1)[1].splitlines()[0][:200])
            after = "".join(f"\n  then {line}" for line in then)
            raise RuntimeError(f"a worker failed: {payload}{after}\n\n{trace}")
        ok = True
        return payload
    finally:
        for p in procs:
            if ok:
                p.join(timeout=30)
            if p.is_alive():
                p.kill()
            p.join()


def zero_full_parameters(trainer: ZeroShardedTrainer) -> torch.Tensor:
    """Every parameter of a ZeRO trainer's model, concatenated in ``llama_units`` order
    (gathered unit by unit for stage 3, then freed again)."""
    out = []
    for u, ps in enumerate(trainer.params):
        if trainer.stage == 3:
            trainer.gather_unit(u)
        out += [p.detach().flatten().clone() for p in ps]
        if trainer.stage == 3:
            trainer.point_unit(u, None)
    return torch.cat(out)


def held_bytes(tensors) -> int:
    """Bytes of memory the tensors hold, from their storages (a view counts its storage once,
    a DTensor its local shard): what a rank really keeps, padding included."""
    storages = {}
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of AdamW's m and v (the per-tensor step counters, 4 bytes each, left out)."""
    return held_bytes(t for s in optimizer.state.values() for k, t in s.items() if k != "step")


STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
BYTES_FP32 = {"params": 4, "grads": 4, "optimizer": 8}  # fp32 weights and gradients, AdamW m, v
BYTES_PAPER = {"params": 2, "grads": 2, "optimizer": 12}  # ZeRO's mixed precision, K = 12


def memory_formula(strategy: str, psi: float, n: int, per_param: dict = BYTES_FP32) -> dict:
    """(3) Per-rank bytes of parameters, gradients and optimizer state for psi parameters on
    n ranks: ZeRO stage k divides k of the three terms by n (1: the optimizer state; 2: and the
    gradients; 3: and the parameters)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy ({strategy!r}) must be one of {', '.join(STRATEGIES)}")
    sharded = {"ddp": (), "zero1": ("optimizer",), "zero2": ("optimizer", "grads")}.get(
        strategy, ("optimizer", "grads", "params")
    )
    out = {k: b * psi / (n if k in sharded else 1) for k, b in per_param.items()}
    return {**out, "total": sum(out.values())}


def comm_formula(strategy: str, psi: float, n: int, last_unit: float = 0.0) -> float:
    """(1), (4) Bytes one rank sends per step in fp32: all-reduce 2 (N-1)/N 4 Psi (DDP;
    ZeRO-1/2 as reduce-scatter + all-gather); ZeRO-3 adds the backward gathers (3 (N-1)/N
    4 Psi), less the last unit's forward gather (its forward runs once, inside backward; FSDP2
    likewise leaves its root module gathered after forward, to be used again at once)."""
    ring = (n - 1) / n * 4
    return {"ddp": 2, "zero1": 2, "zero2": 2, "zero3": 3}[strategy] * ring * psi - (
        ring * last_unit if strategy == "zero3" else 0.0
    )


# Published configurations (meta-llama/Llama-2-7b-hf and Llama-2-70b-hf config.json; Touvron et
# al. 2023, table 1): vocab, d_model, layers, heads, KV heads, hidden_dim (untied embeddings).
LLAMA2 = {
    "Llama-2-7B": {
        "vocab": 32000,
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 32,
        "hidden_dim": 11008,
    },
    "Llama-2-70B": {
        "vocab": 32000,
        "d_model": 8192,
        "n_layers": 80,
        "n_heads": 64,
        "n_kv_heads": 8,
        "hidden_dim": 28672,
    },
}


def llama2_params(c: dict) -> int:
    """Parameters of a Llama: embedding + head, per layer 4 attention matrices (K/V of
    n_kv_heads heads), 3 MLP matrices and 2 norms, and the final norm."""
    head_dim = c["d_model"] // c["n_heads"]
    attn = 2 * c["d_model"] ** 2 + 2 * c["d_model"] * c["n_kv_heads"] * head_dim
    layer = attn + 3 * c["d_model"] * c["hidden_dim"] + 2 * c["d_model"]
    return 2 * c["vocab"] * c["d_model"] + c["n_layers"] * layer + c["d_model"]


def schedule_idle_fraction(schedules: list, t_forward=1, t_backward=1) -> dict:
    """Play a pipeline schedule in time slots: each stage runs its actions in order, a forward
    as soon as the previous stage's forward of that micro-batch is done, a backward as soon as
    the next stage's backward is; a forward lasts ``t_forward`` and a backward ``t_backward``
    (numbers, or one per stage: measured durations). Returns the slots, the makespan and the
    idle fraction 1 - busy / (p * makespan), which (7) predicts as (p - 1) / (m + p - 1) when
    every stage takes the same time."""
    p = len(schedules)
    t_f = list(t_forward) if isinstance(t_forward, list | tuple) else [t_forward] * p
    t_b = list(t_backward) if isinstance(t_backward, list | tuple) else [t_backward] * p
    done: dict = {}  # (kind, stage, micro-batch) -> finish time
    free, pos, slots = [0] * p, [0] * p, [[] for _ in range(p)]
    while any(pos[s] < len(schedules[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] == len(schedules[s]):
                continue
            kind, i = schedules[s][pos[s]]
            dep = ("F", s - 1, i) if kind == "F" else ("B", s + 1, i) if s < p - 1 else ("F", s, i)
            if kind == "F" and s == 0:
                ready = 0
            elif dep in done:
                ready = done[dep]
            else:
                continue
            start = max(free[s], ready)
            free[s] = done[(kind, s, i)] = start + (t_f[s] if kind == "F" else t_b[s])
            slots[s].append((kind, i, start, free[s]))
            pos[s], progressed = pos[s] + 1, True
        if not progressed:
            raise ValueError("schedules deadlock: an action waits on one that never runs")
    makespan = max(free)
    busy = sum(e - b for stage in slots for _, _, b, e in stage)
    return {"slots": slots, "makespan": makespan, "idle_fraction": 1 - busy / (p * makespan)}


def bubble_formula(n_stages: int, n_micro: int) -> float:
    """(7) The pipeline's idle fraction with equal stage times: (p - 1) / (m + p - 1)."""
    _check_sizes(n_stages=n_stages, n_micro=n_micro)
    return (n_stages - 1) / (n_micro + n_stages - 1)


def model_config(sizes: dict, vocab_size: int) -> training.ModelConfig:
    """The small Llama every strategy trains (untied: each pipeline end owns its matrix)."""
    return training.ModelConfig(
        vocab_size=vocab_size, max_seq_len=sizes["seq_len"], tie_embeddings=False, **sizes["model"]
    )


def seeded_llama(cfg: training.ModelConfig, seed: int, device, dtype=torch.float32):
    """The same initial weights on every rank (a local RNG: the global one is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return training.Llama(cfg).to(device=device, dtype=dtype)


def rank_batches(tokens, sizes: dict, world_size: int, rank: int, seed: int, device) -> list:
    """This rank's (ids, targets) per step: windows of seq_len + 1 tokens, step t taking the
    first batch_size indices of the sampler's shard for epoch t (a fresh shuffle each step)."""
    s, b = sizes["seq_len"], sizes["batch_size"]
    n = len(tokens) // (s + 1)
    windows = tokens[: n * (s + 1)].view(n, s + 1)  # (n_samples, seq_len + 1)
    out = []
    for step in range(sizes["steps"]):
        w = windows[shard_indices(n, world_size, rank, seed, epoch=step)[:b]].to(device)
        out.append((w[:, :-1], w[:, 1:]))  # (batch, seq_len) each
    return out


def global_batches(tokens, sizes: dict, world_size: int, seed: int, device) -> list:
    """Every rank's batch of each step, concatenated in rank order: the one-process batch."""
    per_rank = [rank_batches(tokens, sizes, world_size, r, seed, device) for r in range(world_size)]
    return [
        tuple(torch.cat([per_rank[r][t][j] for r in range(world_size)]) for j in range(2))
        for t in range(sizes["steps"])
    ]


def reference_train(model: training.Llama, batches: list, adamw: dict) -> torch.Tensor:
    """One process, the whole batch, torch.optim.AdamW: the parameters after the steps. The
    model's own forward, not ``llama_units``: the reference owes nothing to the code it checks."""
    optimizer = torch.optim.AdamW(model.parameters(), **adamw)
    for ids, targets in batches:
        F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def reference_gradient(model: training.Llama, ids, targets) -> torch.Tensor:
    """One process's gradient of the mean loss over the whole batch (the model's own forward),
    flat in ``model.parameters()`` order (= ``llama_units`` order). AdamW's step depends on
    the gradient's scale only through eps, so a sum left undivided by N moves the parameters
    only a little (1.7e-4 in a --quick run); the first step's gradient, compared too, shows it
    at full size (7.7e-2)."""
    F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _first_step_gradient(optimizer: torch.optim.Optimizer, get) -> list:
    """A list that receives ``get()`` (the gradient the optimizer is about to apply) at the
    optimizer's first step, through a step pre-hook."""
    seen: list = []
    optimizer.register_step_pre_hook(lambda *_: seen.append(get()) if not seen else None)
    return seen


def zero_rank_slices(trainer: ZeroShardedTrainer, flat: torch.Tensor) -> torch.Tensor:
    """This rank's slices of a full flat vector (``llama_units`` order), each unit padded to
    N S and cut as the trainer cuts it: what this rank's shards hold of that vector."""
    out, offset, n = [], 0, trainer.comm.world_size
    for shapes, shard in zip(trainer.shapes, trainer.shards, strict=True):
        numel = sum(math.prod(shape) for shape in shapes)
        unit = flat.new_zeros(shard.numel() * n)
        unit[:numel] = flat[offset : offset + numel]
        out.append(unit.tensor_split(n)[trainer.comm.rank])
        offset += numel
    return torch.cat(out)


def ddp_train(model, batches: list, k: int, adamw: dict, bucket_bytes: int, no_sync: bool):
    """torch's DistributedDataParallel on the same micro-batches, with ``no_sync`` on all but
    the last micro-step (or without it, the classic mistake); a comm hook counts DDP's
    all-reduces. Returns the parameters, the all-reduces of each step and its seconds (DDP
    re-buckets after its first step, so the last step's count is the steady one)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_bytes / 2**20)
    calls = {"n": 0}
    per_step = []

    def counting_hook(state, bucket):
        state["n"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(calls, counting_hook)
    optimizer = torch.optim.AdamW(ddp.parameters(), **adamw)
    times = []
    for ids, targets in batches:
        start = time.perf_counter()
        micro = list(zip(ids.chunk(k), targets.chunk(k), strict=True))
        for j, (x, y) in enumerate(micro):
            sync = not no_sync or j == k - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                (F.cross_entropy(ddp(x).flatten(0, 1), y.flatten()) / k).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        per_step.append(calls["n"] - sum(per_step))
    params = torch.cat([p.detach().flatten() for p in ddp.module.parameters()])
    return params, per_step, times


def fsdp2_train(model: training.Llama, batches: list, adamw: dict, mesh) -> dict:
    """torch's FSDP2 (``fully_shard`` on each decoder layer, then the whole model: ZeRO-3 on
    DTensors). Returns the full parameters after the steps, the bytes of this rank's shards
    of parameters, gradients and AdamW state, and seconds per step."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), **adamw)
    times, grads = [], 0
    for ids, targets in batches:
        start = time.perf_counter()
        F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()).backward()
        grads = held_bytes(p.grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "params": torch.cat([p.full_tensor().detach().flatten() for p in model.parameters()]),
        "bytes": {
            "params": held_bytes(model.parameters()),
            "grads": grads,
            "optimizer": optimizer_state_bytes(optimizer),
        },
        "times": times,
    }


def dtensor_block(layer: nn.Module, mesh) -> nn.Module:
    """The production counterpart of ``TensorParallelBlock``: DTensor's ``parallelize_module``
    with ColwiseParallel (gate/up, q/k/v) and RowwiseParallel (down, o) on a copy of the same
    layer. Attention's head counts become the local ones, as torchtitan does for Llama."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    layer = copy.deepcopy(layer)
    if isinstance(layer, SwiGLUFeedForward):
        plan = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel()}
        plan["down_proj"] = RowwiseParallel()
    else:
        plan = {name: ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj")}
        plan["o_proj"] = RowwiseParallel()
        layer.n_heads //= mesh.size()
        layer.n_kv_heads //= mesh.size()
    return parallelize_module(layer, mesh, plan)


# =============================================================================
# 4. Experiments: each strategy against its reference, in every worker; the summary on rank 0
# =============================================================================


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


STEP_ADAMW = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def _timed(fn, rounds: int) -> list[float]:
    """Seconds of ``rounds`` calls of ``fn``, each started together on every rank (a barrier):
    a distributed step is as slow as its slowest rank, so Timer's per-process loop is not used."""
    times = []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def check_ring(comm: RingComm, sizes: dict, seed: int, device) -> dict:
    """Ring all-reduce, reduce-scatter and all-gather against dist.all_reduce,
    reduce_scatter_tensor and all_gather_into_tensor on random tensors; the bytes this rank
    sent against (1); both timed."""
    n, numel = comm.world_size, sizes["ring_numel"] * comm.world_size
    g = torch.Generator().manual_seed(seed + comm.rank)
    x = torch.randn(numel, generator=g).to(device)
    ours, ref = ring_all_reduce(x.clone(), comm, "ring"), x.clone()
    dist.all_reduce(ref)
    own = ring_reduce_scatter(x.clone(), comm, "ring_rs").clone()
    ref_rs = torch.empty(numel // n, device=device)
    dist.reduce_scatter_tensor(ref_rs, x.clone())
    gathered = torch.zeros(numel, device=device)
    gathered.tensor_split(n)[comm.rank].copy_(x[: numel // n])
    ring_all_gather(gathered, comm, "ring_ag")
    ref_ag = torch.empty(numel, device=device)
    dist.all_gather_into_tensor(ref_ag, x[: numel // n].contiguous())
    t_ours = _timed(lambda: ring_all_reduce(x.clone(), comm, "ring_timed"), sizes["rounds"])
    t_ref = _timed(lambda: dist.all_reduce(x.clone()), sizes["rounds"])
    return {
        "numel": numel,
        "all_reduce_max_err": max_abs_err(ours, ref),
        "reduce_scatter_max_err": max_abs_err(own, ref_rs),
        "all_gather_max_err": max_abs_err(gathered, ref_ag),
        "bytes_sent": comm.sent["ring"],
        "bytes_formula": 2 * (n - 1) / n * numel * 4,
        "ms_ours": 1e3 * statistics.median(t_ours),
        "ms_torch": 1e3 * statistics.median(t_ref),
    }


def check_sampler(world_size: int, seed: int, n_samples: tuple = (10, 11, 64)) -> dict:
    """``shard_indices`` against torch's DistributedSampler for every rank, two epochs."""
    from torch.utils.data import DistributedSampler

    same, cases = 0, 0
    for n in n_samples:
        for rank in range(world_size):
            sampler = DistributedSampler(range(n), world_size, rank, shuffle=True, seed=seed)
            for epoch in (0, 1):
                sampler.set_epoch(epoch)
                same += list(sampler) == shard_indices(n, world_size, rank, seed, epoch)
                cases += 1
    e0 = shard_indices(64, world_size, 0, seed, 0)
    return {
        "equal": same,
        "cases": cases,
        "epoch_reshuffles": e0 != shard_indices(64, world_size, 0, seed, 1),
    }


def _param_bytes(model: nn.Module, optimizer) -> dict:
    return {
        "params": held_bytes(model.parameters()),
        "grads": held_bytes(p.grad for p in model.parameters()),
        "optimizer": optimizer_state_bytes(optimizer),
    }


def check_data_parallel(comm, cfg, sizes, seed, device, batches, reference, dtype) -> dict:
    """Our data parallelism (k micro-batches, one bucketed all-reduce per step) against
    DistributedDataParallel with no_sync and against one process on the global batch; the
    all-reduces per step of ours, of DDP with no_sync and of DDP without it; bytes, memory."""
    k, steps = sizes["accumulation"], sizes["steps"]
    model = seeded_llama(cfg, seed, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), **STEP_ADAMW)
    buckets = gradient_buckets(list(model.parameters()), sizes["bucket_bytes"])
    grad0 = _first_step_gradient(
        optimizer, lambda: torch.cat([p.grad.flatten() for p in model.parameters()])
    )
    times = []
    for ids, targets in batches:
        micro = list(zip(ids.chunk(k), targets.chunk(k), strict=True))
        start = time.perf_counter()
        data_parallel_step(model, optimizer, micro, buckets, comm)
        times.append(time.perf_counter() - start)
    ours = torch.cat([p.detach().flatten() for p in model.parameters()])
    args = (batches, k, STEP_ADAMW, sizes["bucket_bytes"])
    ddp, ddp_calls, ddp_times = ddp_train(
        seeded_llama(cfg, seed, device, dtype), *args, no_sync=True
    )
    naive = seeded_llama(cfg, seed, device, dtype)  # the same steps without no_sync, to count
    _, naive_calls, _ = ddp_train(naive, *args, no_sync=False)
    units_loss(llama_units(model), *batches[0]).backward()  # gradients present, as at a step
    psi = sum(p.numel() for p in model.parameters())
    return {
        "max_err_vs_ddp": max_abs_err(ours, ddp),
        "max_err_vs_one_process": max_abs_err(ours, reference["params"]),
        "ddp_max_err_vs_one_process": max_abs_err(ddp, reference["params"]),
        "grad_max_err_vs_one_process": max_abs_err(grad0[0], reference["grad"]),
        "buckets": len(buckets),
        "all_reduces_per_step": comm.calls["dp_all_reduce"] / steps,
        "ddp_all_reduces_per_step_no_sync": ddp_calls[-1],
        "ddp_all_reduces_per_step_without_no_sync": naive_calls[-1],
        "bytes_per_step": comm.sent["dp_all_reduce"] / steps,
        "bytes_formula": comm_formula("ddp", psi, comm.world_size),
        "memory": _param_bytes(model, optimizer),
        "step_s": times,
        "ddp_step_s": ddp_times,
        "psi": psi,
    }


def check_zero(comm, cfg, sizes, seed, device, mesh, batches, reference, dtype) -> dict:
    """ZeRO stages 1-3 and FSDP2 against one process: parameters after the steps, the bytes
    each rank sent per step, the bytes it held (parameters and gradients at the optimizer
    step, AdamW state after it), seconds per step. Not counted: the full gradients stage 2
    holds until its reduce-scatter after backward, the unit stage 3 holds while running it."""
    out, params = {}, {}
    for stage in (1, 2, 3):
        model = seeded_llama(cfg, seed, device, dtype)
        trainer = ZeroShardedTrainer(model, stage, comm, **STEP_ADAMW)
        grad0 = _first_step_gradient(
            trainer.optimizer, lambda t=trainer: torch.cat([s.grad for s in t.shards])
        )
        before, times, held = dict(comm.sent), [], {}
        for ids, targets in batches:
            start = time.perf_counter()
            trainer.step(ids, targets)
            times.append(time.perf_counter() - start)
        sent = sum(comm.sent[k] - before.get(k, 0) for k in ("zero_grads", "zero_params"))
        held = dict(trainer.held)
        params[stage] = zero_full_parameters(trainer)
        held["optimizer"] = optimizer_state_bytes(trainer.optimizer)
        psi_pad = sum(s.numel() for s in trainer.shards) * comm.world_size
        last = trainer.shards[-1].numel() * comm.world_size
        out[f"zero{stage}"] = {
            "max_err_vs_one_process": max_abs_err(params[stage], reference["params"]),
            "grad_max_err_vs_one_process": max_abs_err(
                grad0[0], zero_rank_slices(trainer, reference["grad"])
            ),
            "bytes_per_step": sent / len(batches),
            "bytes_formula": comm_formula(f"zero{stage}", psi_pad, comm.world_size, last),
            "memory": held,
            "memory_formula": memory_formula(f"zero{stage}", psi_pad, comm.world_size),
            "psi_padded": psi_pad,
            "psi_last_padded": last,  # the norm and head, gathered once by ZeRO-3
            "step_s": times,
        }
    fsdp = fsdp2_train(seeded_llama(cfg, seed, device, dtype), batches, STEP_ADAMW, mesh)
    for stage in (1, 2, 3):
        out[f"zero{stage}"]["max_err_vs_fsdp2"] = max_abs_err(params[stage], fsdp["params"])
    out["fsdp2"] = {
        "max_err_vs_one_process": max_abs_err(fsdp["params"], reference["params"]),
        "memory": fsdp["bytes"],
        "step_s": fsdp["times"],
    }
    return out


def check_tensor_parallel(comm, cfg, sizes, seed, device, mesh) -> dict:
    """Our TensorParallelBlock (f and g) and DTensor's parallelize_module against the unsharded
    layer, for the SwiGLU MLP and the GQA attention of one decoder layer: the output, dL/dx and
    this rank's slice of every weight gradient; the bytes f and g sent; the bytes of weights
    each holds (DTensor's: its local shards); timings."""
    layer = seeded_llama(cfg, seed, device).model.layers[0]
    g = torch.Generator().manual_seed(seed + 1)  # the same x and dL/dy on every rank
    shape = (sizes["batch_size"], sizes["seq_len"], cfg.d_model)
    x, dy = torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
    out = {}
    for name, block in (("mlp", layer.mlp), ("attention", layer.self_attn)):
        runs = {}
        for kind, module in (
            ("full", block),
            ("ours", TensorParallelBlock(block, comm)),
            ("dtensor", dtensor_block(block, mesh)),
        ):
            module.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            before = comm.sent["tp_all_reduce"]
            y = module(xi)
            y.backward(dy)
            grads = {
                n.split(".")[-2]: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad)
                for n, p in module.named_parameters()
            }
            runs[kind] = {
                "y": y.detach(),
                "dx": xi.grad,
                "grads": grads,
                "sent": comm.sent["tp_all_reduce"] - before,
                "param_bytes": held_bytes(module.parameters()),  # a DTensor: its local shard
            }
            runs[kind]["s"] = _timed(lambda m=module: _forward_backward(m, x, dy), sizes["rounds"])
        full, ours, dt = runs["full"], runs["ours"], runs["dtensor"]
        grad_err = max(
            max_abs_err(ours["grads"][k], _local_slice(full["grads"][k], k, comm))
            for k in ours["grads"]
        )
        out[name] = {
            "y_max_err": max_abs_err(ours["y"], full["y"]),
            "dx_max_err": max_abs_err(ours["dx"], full["dx"]),
            "grad_max_err": grad_err,
            "grad_scale": max(g.abs().max().item() for g in full["grads"].values()),
            "dtensor_y_max_err": max_abs_err(ours["y"], dt["y"]),
            "dtensor_dx_max_err": max_abs_err(ours["dx"], dt["dx"]),
            "dtensor_grad_max_err": max(
                max_abs_err(ours["grads"][k], dt["grads"][k]) for k in ours["grads"]
            ),
            "bytes_per_step": ours["sent"],
            "bytes_formula": 2 * 2 * (comm.world_size - 1) / comm.world_size * x.numel() * 4,
            "tokens": x.shape[0] * x.shape[1],
            "params_bytes_full": full["param_bytes"],
            "params_bytes_ours": ours["param_bytes"],
            "params_bytes_dtensor": dt["param_bytes"],
            "ms_full": 1e3 * statistics.median(full["s"]),
            "ms_ours": 1e3 * statistics.median(ours["s"]),
            "ms_dtensor": 1e3 * statistics.median(dt["s"]),
        }
    return out


def _forward_backward(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> float:
    """One timed call: forward, backward, and reading the output (DTensor's row-parallel
    output is an asynchronous all-reduce: unread, it would never be waited on)."""
    y = module(x)
    y.backward(dy)
    return y.sum().item()


COLUMN_SPLIT = ("gate_proj", "up_proj", "q_proj", "k_proj", "v_proj")


def _local_slice(full_grad: torch.Tensor, name: str, comm: RingComm) -> torch.Tensor:
    """This rank's slice of a full weight gradient: rows for a column split, columns else."""
    dim = 0 if name in COLUMN_SPLIT else 1
    return full_grad.tensor_split(comm.world_size, dim=dim)[comm.rank]


def equal_layer_stages(n_layers: int, n_stages: int) -> list[list[int]]:
    """The textbook split, as ``llama_units`` indices: n_layers / N decoder layers per stage,
    the embedding (unit 0) on the first stage, the norm and head (unit n_layers + 1) on the
    last. Equal layers are not equal times: the head over a large vocabulary costs several."""
    per = n_layers // n_stages
    stages = [list(range(1 + s * per, 1 + (s + 1) * per)) for s in range(n_stages)]
    return (
        [[0, *stages[0]], *stages[1:-1], [*stages[-1], n_layers + 1]]
        if n_stages > 1
        else [[0, *stages[0], n_layers + 1]]
    )


def balanced_stages(costs: list, n_stages: int) -> list[list[int]]:
    """Cut the units (one cost each, in model order) into ``n_stages`` contiguous, non-empty
    runs whose largest total cost is the smallest possible (every cut is tried: fine for tens
    of units). torchgpipe's ``balance_by_time`` does this with measured times; Megatron-LM
    gives the last stage fewer layers for the same reason (``num_layers_in_last_pipeline_stage``,
    ``account_for_loss_in_pipeline_split``).

    >>> balanced_stages([0, 1, 1, 1, 1, 4], 2)  # embedding, 4 layers, head: the head alone
    [[0, 1, 2, 3, 4], [5]]
    """
    _check_sizes(n_stages=n_stages)
    if n_stages > len(costs):
        raise ValueError(f"n_stages ({n_stages}) must be <= the number of units ({len(costs)})")

    def bounds(cuts: tuple) -> list:
        return list(zip((0, *cuts), (*cuts, len(costs)), strict=True))

    best = min(
        itertools.combinations(range(1, len(costs)), n_stages - 1),
        key=lambda cuts: max(sum(costs[a:b]) for a, b in bounds(cuts)),
    )
    return [list(range(a, b)) for a, b in bounds(best)]


def unit_seconds(units: list, ids, targets, comm: RingComm, rounds: int = 3) -> list[float]:
    """Each unit's forward + backward seconds on one micro-batch (the loss counted with the
    last unit), median of ``rounds``, averaged over the ranks by a ring all-reduce: every rank
    gets the same numbers, so every rank cuts the model the same way."""
    per_round = []
    for _ in range(rounds):
        inputs, outputs, seconds, h = [], [], [], ids
        for unit in units:
            x = h.detach().requires_grad_() if h.is_floating_point() else h
            start = time.perf_counter()
            h = unit(x)
            seconds.append(time.perf_counter() - start)
            inputs.append(x)
            outputs.append(h)
        start = time.perf_counter()
        F.cross_entropy(h.flatten(0, 1), targets.flatten()).backward()
        seconds[-1] += time.perf_counter() - start
        for u in reversed(range(len(units) - 1)):
            start = time.perf_counter()
            outputs[u].backward(inputs[u + 1].grad)
            seconds[u] += time.perf_counter() - start
        per_round.append(seconds)
    medians = [statistics.median(s) for s in zip(*per_round, strict=True)]
    costs = torch.tensor(medians, dtype=torch.float64, device=ids.device)  # NCCL: on the GPU
    return (ring_all_reduce(costs, comm, "pp_costs") / comm.world_size).tolist()


def check_pipeline(comm, cfg, sizes, seed, device, batch) -> dict:
    """GPipe and 1F1B over m micro-batches against one process's gradients on the same batch,
    on two splits of the model into stages: equal layers per stage, and balanced by each unit's
    measured time; then each (split, schedule) timed in interleaved rounds, the event times of
    every round kept. Memory: the equal split's stage, at its optimizer step."""
    model = seeded_llama(cfg, seed, device)
    units = llama_units(model)
    ids, targets = batch
    F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()).backward()  # the reference
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    m = sizes["n_micro"]
    micro = list(zip(ids.chunk(m), targets.chunk(m), strict=True))
    act_shape = (len(ids) // m, ids.shape[1], cfg.d_model)
    model.zero_grad(set_to_none=True)
    costs = unit_seconds(units, *micro[0], comm)
    schedules = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}
    splits = {
        "equal": equal_layer_stages(cfg.n_layers, comm.world_size),
        "balanced": balanced_stages(costs, comm.world_size),
    }
    out = {"n_micro": m, "unit_ms": [1e3 * c for c in costs]}
    stage = {k: [units[i] for i in v[comm.rank]] for k, v in splits.items()}
    for split, stages in splits.items():
        stage_params = [p for u in stage[split] for p in u.parameters()]
        res = {"stages": stages}
        for name, make in schedules.items():
            model.zero_grad(set_to_none=True)
            before = comm.sent["pp_activations"] + comm.sent["pp_gradients"]
            acts = make(comm.world_size, m)[comm.rank]
            loss, _ = run_pipeline(stage[split], acts, micro, comm, act_shape)
            err = max(max_abs_err(p.grad, reference[names[id(p)]]) for p in stage_params)
            res[name] = {
                "grad_max_err": err,
                "loss": loss,
                "bytes_per_step": comm.sent["pp_activations"] + comm.sent["pp_gradients"] - before,
                "events": [],
            }
        out[split] = res
    act_bytes = math.prod(act_shape) * 4
    first, last = comm.rank == 0, comm.rank == comm.world_size - 1
    out["bytes_formula"] = m * act_bytes * ((not last) + (not first))
    for _ in range(sizes["rounds"]):
        for split, name in itertools.product(splits, schedules):
            model.zero_grad(set_to_none=True)
            acts = schedules[name](comm.world_size, m)[comm.rank]
            _, events = run_pipeline(stage[split], acts, micro, comm, act_shape)
            out[split][name]["events"].append(events)
    model.zero_grad(set_to_none=True)  # one more step of the equal split, for its memory
    run_pipeline(stage["equal"], gpipe_schedule(comm.world_size, m)[comm.rank], micro, comm,
                 act_shape)  # fmt: skip
    stage_params = [p for u in stage["equal"] for p in u.parameters()]
    optimizer = torch.optim.AdamW(stage_params, **STEP_ADAMW)
    optimizer.step()
    out["memory"] = {
        "params": held_bytes(stage_params),
        "grads": held_bytes(p.grad for p in stage_params),
        "optimizer": optimizer_state_bytes(optimizer),
    }
    return out


def worker_experiments(sizes: dict, seed: int, device_type: str, tokens) -> dict:
    """Everything one rank runs, in order; the numbers come back as plain Python."""
    from torch.distributed.device_mesh import init_device_mesh

    comm = RingComm()
    device = (
        torch.device(device_type, torch.cuda.current_device())
        if device_type == "cuda"
        else torch.device("cpu")
    )
    mesh = init_device_mesh(device_type, (comm.world_size,))
    cfg = model_config(sizes, sizes["vocab_size"])
    batches = rank_batches(tokens, sizes, comm.world_size, comm.rank, seed, device)
    whole = global_batches(tokens, sizes, comm.world_size, seed, device)
    s, b = sizes["seq_len"], sizes["pipeline_batch"]
    windows = tokens[: b * (s + 1)].view(b, s + 1).to(device)  # the pipeline's batch
    pipe_batch = (windows[:, :-1], windows[:, 1:])
    ref = {  # one process on the global batch, in both dtypes: parameters after the steps
        dtype: {  # and the first step's gradient
            "params": reference_train(seeded_llama(cfg, seed, device, dtype), whole, STEP_ADAMW),
            "grad": reference_gradient(seeded_llama(cfg, seed, device, dtype), *whole[0]),
        }
        for dtype in (torch.float64, torch.float32)
    }

    def in_both(check, *args) -> dict:
        """The strategy in fp32 (bytes, memory, time, the fp32 gap) and in float64, where the
        parameters can be held to 1e-6 (see "Why float64" at the top)."""
        out = check(RingComm(), *args, batches, ref[torch.float32], torch.float32)
        exact = check(RingComm(), *args, batches, ref[torch.float64], torch.float64)
        return _with_float64_errors(out, exact)

    out = {"rank": comm.rank, "world_size": comm.world_size}
    start = time.perf_counter()
    for name, run in (
        ("ring", lambda: check_ring(comm, sizes, seed, device)),
        ("data_parallel", lambda: in_both(check_data_parallel, cfg, sizes, seed, device)),
        ("zero", lambda: in_both(check_zero, cfg, sizes, seed, device, mesh)),
        ("tensor_parallel", lambda: check_tensor_parallel(comm, cfg, sizes, seed, device, mesh)),
        ("pipeline", lambda: check_pipeline(comm, cfg, sizes, seed, device, pipe_batch)),
    ):
        out[name] = run()
        if comm.rank == 0:
            print(f"  rank 0: {name} checked ({time.perf_counter() - start:.1f} s)", flush=True)
    return _plain(out)


def _with_float64_errors(out: dict, exact: dict) -> dict:
    """``out`` (fp32) with every ``max_err`` key of ``exact`` (float64) added as ``..._fp64``."""
    merged = {}
    for k, v in out.items():
        merged[k] = _with_float64_errors(v, exact[k]) if isinstance(v, dict) else v
        if "max_err" in k:
            merged[f"{k}_fp64"] = exact[k]
    return merged


def _plain(x):
    """Tensors and numpy scalars to Python numbers and lists, recursively (what is sent back)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, torch.Tensor | np.generic):
        return x.tolist()
    return x


def _step_ms(per_rank: list, get) -> dict:
    """A distributed step lasts as long as its slowest rank: max over ranks of each step's
    seconds, then the median (min-max) over the steps after the first (warm-up), in ms."""
    steps = list(zip(*[get(r) for r in per_rank], strict=True))
    slowest = [1e3 * max(s) for s in steps]
    return _spread(slowest[1:] if len(slowest) > 1 else slowest)


def pipeline_idle(events_per_rank: list) -> dict:
    """Measured idle fraction of one pipeline run: 1 - busy / (p * makespan), the makespan
    from the first rank's start to the last event's end, and each rank's own fraction."""
    makespan = max(e[3] for events in events_per_rank for e in events)
    busy = [sum(e[3] - e[2] for e in events) for events in events_per_rank]
    return {
        "idle_fraction": 1 - sum(busy) / (len(busy) * makespan),
        "per_rank": [1 - b / makespan for b in busy],
        "makespan_ms": 1e3 * makespan,
    }


def summarize(per_rank: list, sizes: dict, seed: int) -> dict:
    """Rank 0's view of every worker's numbers: each equality as the worst rank's max error,
    bytes and memory per rank with their formulas, step times, the pipeline's idle fractions."""
    n = len(per_rank)
    r0 = per_rank[0]

    def worst(get) -> float:
        return max(get(r) for r in per_rank)

    ring = {k: worst(lambda r, k=k: r["ring"][k]) for k in r0["ring"] if k.endswith("max_err")}
    ring.update({k: r0["ring"][k] for k in ("numel", "bytes_formula", "ms_ours", "ms_torch")})
    ring["bytes_sent_per_rank"] = [r["ring"]["bytes_sent"] for r in per_rank]
    dp = {
        k: worst(lambda r, k=k: r["data_parallel"][k])
        for k in r0["data_parallel"]
        if "max_err" in k
    }
    for k in (
        "buckets",
        "all_reduces_per_step",
        "ddp_all_reduces_per_step_no_sync",
        "ddp_all_reduces_per_step_without_no_sync",
        "bytes_formula",
        "psi",
    ):
        dp[k] = r0["data_parallel"][k]
    dp["bytes_per_step_per_rank"] = [r["data_parallel"]["bytes_per_step"] for r in per_rank]
    dp["accumulation"], dp["steps"] = sizes["accumulation"], sizes["steps"]
    zero = {}
    for stage in ("zero1", "zero2", "zero3", "fsdp2"):
        z = {
            k: worst(lambda r, s=stage, k=k: r["zero"][s][k])
            for k in r0["zero"][stage]
            if "max_err" in k
        }
        for k in ("bytes_formula", "memory_formula", "psi_padded", "psi_last_padded"):
            if k in r0["zero"][stage]:
                z[k] = r0["zero"][stage][k]
        if "bytes_per_step" in r0["zero"][stage]:
            z["bytes_per_step_per_rank"] = [r["zero"][stage]["bytes_per_step"] for r in per_rank]
        zero[stage] = z
    tp = {}
    for block in ("mlp", "attention"):
        tp[block] = {
            k: worst(lambda r, k=k, b=block: r["tensor_parallel"][b][k])
            for k in r0["tensor_parallel"][block]
            if "max_err" in k
        }
        for k in (
            "grad_scale",
            "tokens",
            "bytes_formula",
            "params_bytes_full",
            "params_bytes_ours",
            "params_bytes_dtensor",
            "ms_full",
            "ms_ours",
            "ms_dtensor",
        ):
            tp[block][k] = r0["tensor_parallel"][block][k]
        tp[block]["bytes_per_step_per_rank"] = [
            r["tensor_parallel"][block]["bytes_per_step"] for r in per_rank
        ]
    return {
        "world_size": n,
        "ring": ring,
        "sampler": check_sampler(n, seed),
        "data_parallel": dp,
        "zero": zero,
        "tensor_parallel": tp,
        "pipeline": summarize_pipeline(per_rank, sizes),
        "memory": memory_table(per_rank),
        "communication": communication_table(per_rank, sizes),
        "step_ms": step_times(per_rank),
        "extrapolation": extrapolate_memory(),
        "zero_paper_check": zero_paper_check(),
    }


def summarize_pipeline(per_rank: list, sizes: dict) -> dict:
    """Both schedules in unit slots (the formula's world), then for each split (equal layers,
    balanced by time) and schedule: the worst gradient error, the measured idle fraction over
    the rounds, the median round's events, and the schedule replayed with that round's measured
    per-rank forward and backward times (what unequal stages alone would give)."""
    n, m = len(per_rank), sizes["n_micro"]
    unit_ms = per_rank[0]["pipeline"]["unit_ms"]
    out = {"n_stages": n, "n_micro": m, "bubble_formula": bubble_formula(n, m), "unit_ms": unit_ms}
    out["layer_ms_median"] = statistics.median(unit_ms[1:-1])  # forward + backward, 1 micro-batch
    out["head_ms"] = unit_ms[-1]  # final norm, LM head and loss
    out["slots"] = {}
    for name, make in (("gpipe", gpipe_schedule), ("1f1b", one_f_one_b_schedule)):
        slots = schedule_idle_fraction(make(n, m))
        out["slots"][name] = {
            "idle_fraction": slots["idle_fraction"],
            "idle_fraction_backward_2x": schedule_idle_fraction(make(n, m), 1, 2)["idle_fraction"],
            "slots": slots["slots"],
        }
    for split in ("equal", "balanced"):
        stages = per_rank[0]["pipeline"][split]["stages"]
        out[split] = {
            "stages": stages,
            "stage_names": [stage_name(st, len(unit_ms)) for st in stages],
            "stage_cost_ms": [sum(unit_ms[i] for i in st) for st in stages],
        }
        for name, make in (("gpipe", gpipe_schedule), ("1f1b", one_f_one_b_schedule)):
            runs = [r["pipeline"][split][name] for r in per_rank]
            rounds = [
                pipeline_idle([r["events"][i] for r in runs]) for i in range(len(runs[0]["events"]))
            ]
            fractions = [x["idle_fraction"] for x in rounds]
            median_round = sorted(range(len(rounds)), key=lambda i: fractions[i])[len(rounds) // 2]
            events = [r["events"][median_round] for r in runs]
            durations = [  # each rank's median forward and backward, in this round
                [statistics.median(e[3] - e[2] for e in ev if e[0] == kind) for ev in events]
                for kind in ("F", "B")
            ]
            out[split][name] = {
                "grad_max_err": max(r["grad_max_err"] for r in runs),
                "loss": runs[-1]["loss"],
                "idle_fraction_measured": _spread(fractions),
                "makespan_ms": _spread([x["makespan_ms"] for x in rounds]),
                "idle_fraction_stage_times": schedule_idle_fraction(make(n, m), *durations)[
                    "idle_fraction"
                ],
                "stage_ms": {k: [1e3 * t for t in d] for k, d in zip("FB", durations, strict=True)},
                "events": events,
                "bytes_per_step_per_rank": [r["bytes_per_step"] for r in runs],
            }
    out["bytes_formula_per_rank"] = [r["pipeline"]["bytes_formula"] for r in per_rank]
    return out


def stage_name(units: list, n_units: int) -> str:
    """A stage's units in words: "embedding + 2 layers", "2 layers + head", "head"."""
    layers = sum(0 < u < n_units - 1 for u in units)
    parts = (["embedding"] if 0 in units else []) + ([f"{layers} layer{'s' * (layers != 1)}"]
             if layers else []) + (["head"] if n_units - 1 in units else [])  # fmt: skip
    return " + ".join(parts)


MEMORY_ROWS = ("ddp", "zero1", "zero2", "zero3", "fsdp2", "pipeline")
STRATEGY_LABELS = {
    "ddp": "data parallel (ours = DDP)",
    "zero1": "ZeRO-1 (optimizer state)",
    "zero2": "ZeRO-2 (+ gradients)",
    "zero3": "ZeRO-3 (+ parameters)",
    "fsdp2": "FSDP2 fully_shard",
    "pipeline": "pipeline stage 0 (equal layers)",
    "tensor_parallel": "tensor parallel layer",
    "gpipe": "GPipe",
    "1f1b": "1F1B",
}


def memory_table(per_rank: list) -> dict:
    """Per strategy, per rank: measured bytes of parameters, gradients and AdamW state, and
    the formula (3) where there is one (padded Psi for ZeRO, the model's Psi for DDP)."""
    out = {}
    for row in MEMORY_ROWS:
        ranks = []
        for r in per_rank:
            src = (
                r["data_parallel"]
                if row == "ddp"
                else r["pipeline"]
                if row == "pipeline"
                else r["zero"][row]
            )
            mem = dict(src["memory"])  # the pipeline: the equal split's stage
            mem["total"] = sum(mem.values())
            ranks.append(mem)
        out[row] = {"measured": ranks}
    psi, n = per_rank[0]["data_parallel"]["psi"], len(per_rank)
    out["ddp"]["formula"] = memory_formula("ddp", psi, n)
    for stage in ("zero1", "zero2", "zero3"):
        out[stage]["formula"] = per_rank[0]["zero"][stage]["memory_formula"]
    out["all_equal_formula"] = all(
        math.isclose(m[k], out[row]["formula"][k])
        for row in ("ddp", "zero1", "zero2", "zero3")
        for m in out[row]["measured"]
        for k in ("params", "grads", "optimizer")
    )
    return out


def communication_table(per_rank: list, sizes: dict) -> dict:
    """Bytes rank 0 sent in one training step of each strategy, the formula, and what the step
    covered (the data-parallel batch, the pipeline's batch, one tensor-parallel layer)."""
    r, n = per_rank[0], len(per_rank)
    batch = f"{sizes['batch_size'] * n} windows"
    out = {
        "ddp": {
            "measured": r["data_parallel"]["bytes_per_step"],
            "formula": r["data_parallel"]["bytes_formula"],
            "note": batch,
        }
    }
    for stage in ("zero1", "zero2", "zero3"):
        z = r["zero"][stage]
        out[stage] = {"measured": z["bytes_per_step"], "formula": z["bytes_formula"], "note": batch}
    for name in ("gpipe", "1f1b"):
        out[name] = {
            "measured": r["pipeline"]["equal"][name]["bytes_per_step"],
            "formula": r["pipeline"]["bytes_formula"],
            "note": f"{sizes['pipeline_batch']} windows",
        }
    tp = r["tensor_parallel"]
    out["tensor_parallel"] = {
        "measured": tp["mlp"]["bytes_per_step"] + tp["attention"]["bytes_per_step"],
        "formula": tp["mlp"]["bytes_formula"] + tp["attention"]["bytes_formula"],
        "note": f"1 layer, {sizes['batch_size']} windows",
    }
    out["all_equal_formula"] = all(
        math.isclose(v["measured"], v["formula"]) for v in out.values() if isinstance(v, dict)
    )
    return out


def step_times(per_rank: list) -> dict:
    return {
        "ddp_ours": _step_ms(per_rank, lambda r: r["data_parallel"]["step_s"]),
        "ddp_torch": _step_ms(per_rank, lambda r: r["data_parallel"]["ddp_step_s"]),
        **{
            s: _step_ms(per_rank, lambda r, s=s: r["zero"][s]["step_s"])
            for s in ("zero1", "zero2", "zero3", "fsdp2")
        },
    }


def extrapolate_memory(devices: tuple = (8, 64)) -> dict:
    """(3) with the paper's mixed precision (2 + 2 + 12 bytes per parameter) for Llama-2 7B and
    70B on 8 and 64 devices, in GB (1e9 bytes, the paper's unit): model state only."""
    out = {}
    for name, c in LLAMA2.items():
        psi = llama2_params(c)
        out[name] = {"params": psi}
        for n in devices:
            out[name][f"{n}_devices"] = {
                s: memory_formula(s, psi, n, BYTES_PAPER)["total"] / 1e9 for s in STRATEGIES
            }
    return out


def zero_paper_check() -> dict:
    """The ZeRO paper's figure 1 example: 7.5B parameters on 64 GPUs, K = 12: 120, 31.4, 16.6
    and 1.9 GB per GPU. Our formula (3) on the same inputs."""
    ours = {s: memory_formula(s, 7.5e9, 64, BYTES_PAPER)["total"] / 1e9 for s in STRATEGIES}
    paper = {"ddp": 120.0, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}
    return {
        "ours_gb": ours,
        "paper_gb": paper,
        "max_abs_diff_gb": max(abs(round(ours[s], 1) - paper[s]) for s in STRATEGIES),
    }


def zero3_phrase(com: dict) -> str:
    """ZeRO-3's bytes per step as a multiple of DDP's, in words (one rank sends nothing)."""
    if com["ddp"]["measured"] == 0:
        return "with one rank nothing is sent"
    return f"ZeRO-3 sends {com['zero3']['measured'] / com['ddp']['measured']:.2f}x DDP's bytes"


def idle_sentence(split: dict, name: str, formula: float, label: str) -> tuple[str, bool]:
    """How the measured idle fraction of a schedule on one split of the model compares with (7),
    in words, and, when it differs, what the schedule replayed with each rank's measured forward
    and backward times predicts: the share of the gap that unequal stages, which (7) assumes
    away, account for (the rest, not measured, is likely waiting on messages and cores)."""
    meas, staged = split[name]["idle_fraction_measured"], split[name]["idle_fraction_stage_times"]
    inside = meas["min"] <= formula <= meas["max"] or abs(meas["median"] - formula) < 0.05
    text = (
        f"{STRATEGY_LABELS[name]}, {label}: measured idle fraction {meas['median']:.2f} (rounds "
        f"{meas['min']:.2f}-{meas['max']:.2f}) vs the bubble formula {formula:.2f}"
    )
    if inside:
        return text + ": within 0.05 or the run-to-run spread", True
    share = (staged - formula) / (meas["median"] - formula)  # of the gap, from stage times
    if share >= 1:
        why = "unequal stages account for all of the gap"
    elif share <= 0:
        why = "unequal stages account for none of the gap; the rest is not measured here"
    else:
        why = (
            f"unequal stages account for {share:.0%} of the gap; the rest is not measured here"
            " (likely waiting on gloo messages and on the shared cores)"
        )
    return (
        f"{text}: this run did not show the formula; replayed with each rank's measured "
        f"forward and backward times the schedule idles {staged:.2f}: {why}",
        False,
    )


def split_label(split: dict) -> str:
    """ "equal layers (embedding + 2 layers | 2 layers + head: 31 | 92 ms)" for a claim."""
    names, costs = " | ".join(split["stage_names"]), split["stage_cost_ms"]
    return f"{names}: {' | '.join(f'{c:.0f}' for c in costs)} ms per micro-batch"


def distributed_claims(r: dict) -> dict:
    """The claims, worded from the numbers."""
    tol, n = 1e-6, r["world_size"]
    ring = r["ring"]
    ring_err = max(
        ring["all_reduce_max_err"], ring["reduce_scatter_max_err"], ring["all_gather_max_err"]
    )
    claims = {
        "ring_equals_all_reduce": claim(
            f"ring all-reduce, reduce-scatter and all-gather from send/recv equal torch's "
            f"collectives to {ring_err:.1e} on {ring['numel']:,} floats over {n} ranks",
            ring_err <= 1e-5,
        ),
        "ring_bytes": claim(
            f"each rank sent {min(ring['bytes_sent_per_rank']):,} bytes in a ring all-reduce of "
            f"{4 * ring['numel']:,}: 2(N-1)/N of the tensor is {ring['bytes_formula']:,.0f}",
            all(math.isclose(b, ring["bytes_formula"]) for b in ring["bytes_sent_per_rank"]),
        ),
    }
    s = r["sampler"]
    claims["sampler_equals_torch"] = claim(
        f"shard_indices equals DistributedSampler in {s['equal']} of {s['cases']} (size, rank, "
        f"epoch) cases; set_epoch reshuffles: {s['epoch_reshuffles']}",
        s["equal"] == s["cases"] and s["epoch_reshuffles"],
    )
    dp = r["data_parallel"]
    exact = max(
        dp["max_err_vs_ddp_fp64"],
        dp["max_err_vs_one_process_fp64"],
        dp["grad_max_err_vs_one_process_fp64"],
    )
    claims["data_parallel_equal"] = claim(
        f"after {dp['steps']} AdamW steps our data parallelism equals DistributedDataParallel "
        f"to {dp['max_err_vs_ddp_fp64']:.1e} and one process on the global batch to "
        f"{dp['max_err_vs_one_process_fp64']:.1e} in float64 (fp32: {dp['max_err_vs_ddp']:.1e} "
        f"and {dp['max_err_vs_one_process']:.1e}, rounding magnified by Adam); its averaged "
        f"first-step gradient equals one process's to {dp['grad_max_err_vs_one_process']:.1e} "
        "in fp32",
        exact <= tol and dp["grad_max_err_vs_one_process"] <= 1e-6,
    )
    claims["accumulation_communicates_once"] = claim(
        f"with {dp['accumulation']} micro-steps, ours all-reduces {dp['all_reduces_per_step']:.0f} "
        f"buckets per step ({dp['buckets']} buckets); DDP with no_sync "
        f"{dp['ddp_all_reduces_per_step_no_sync']:.0f}, without it "
        f"{dp['ddp_all_reduces_per_step_without_no_sync']:.0f}",
        dp["all_reduces_per_step"] == dp["buckets"]
        and dp["ddp_all_reduces_per_step_without_no_sync"]
        == dp["accumulation"] * dp["ddp_all_reduces_per_step_no_sync"],
    )
    z, stages = r["zero"], ("zero1", "zero2", "zero3", "fsdp2")
    zmax = max(z[s]["max_err_vs_one_process_fp64"] for s in stages)
    zgrad = max(z[s]["grad_max_err_vs_one_process"] for s in ("zero1", "zero2", "zero3"))
    claims["zero_equal"] = claim(
        "ZeRO stages 1, 2, 3 and FSDP2 equal one-process AdamW to "
        + ", ".join(f"{z[s]['max_err_vs_one_process_fp64']:.1e}" for s in stages)
        + " in float64; in fp32 ZeRO-3 equals FSDP2 to "
        f"{z['zero3']['max_err_vs_fsdp2']:.1e} and one process to "
        f"{z['zero3']['max_err_vs_one_process']:.1e}; each rank's reduce-scattered slice of "
        f"the first-step gradient equals one process's to {zgrad:.1e} (fp32)",
        zmax <= tol and zgrad <= 1e-6,
    )
    mem = r["memory"]
    claims["memory_equals_formula"] = claim(
        "per-rank bytes of parameters, gradients and AdamW state measured from the tensors "
        + ("equal" if mem["all_equal_formula"] else "do NOT all equal")
        + " formula (3) for DDP and ZeRO 1-3; ZeRO-3 holds "
        f"{mem['zero3']['measured'][0]['total']:,} bytes per rank vs "
        f"{mem['ddp']['measured'][0]['total']:,} for DDP",
        mem["all_equal_formula"],
    )
    com = r["communication"]
    head_share = r["zero"]["zero3"]["psi_last_padded"] / r["zero"]["zero3"]["psi_padded"]
    claims["communication_equals_formula"] = claim(
        "bytes sent per step "
        + ("equal" if com["all_equal_formula"] else "do NOT all equal")
        + f" formulas (1), (4); {zero3_phrase(com)}: 3/2 less the head's forward gather, "
        f"3/2 - Psi_head / (2 Psi) with the norm and head {head_share:.0%} of the parameters",
        com["all_equal_formula"],
    )
    tp = r["tensor_parallel"]
    tp_err = max(v for b in tp.values() for k, v in b.items() if k in ("y_max_err", "dx_max_err"))
    rel = max(b[k] / b["grad_scale"] for b in tp.values() for k in b if "grad_max_err" in k)
    claims["tensor_parallel_equal"] = claim(
        f"tensor-parallel MLP and attention (f, g) equal the unsharded layer and DTensor's "
        f"parallelize_module in output and dL/dx to {tp_err:.1e}, in weight gradients to "
        f"{rel:.1e} of the largest gradient (fp32 sums of {tp['mlp']['tokens']} tokens)",
        tp_err <= 1e-5 and rel <= 1e-6,
    )
    p = r["pipeline"]
    p_err = max(p[sp][s]["grad_max_err"] for sp in ("equal", "balanced") for s in ("gpipe", "1f1b"))
    claims["pipeline_equal"] = claim(
        f"GPipe and 1F1B gradients, on both splits of the model, equal one process's to "
        f"{p_err:.1e}",
        p_err <= 1e-5,
    )
    slots = {s: p["slots"][s]["idle_fraction"] for s in ("gpipe", "1f1b")}
    claims["bubble_in_slots"] = claim(
        f"in unit time slots both schedules idle {slots['gpipe']:.4f} and {slots['1f1b']:.4f} of "
        f"the time: (p-1)/(m+p-1) = {p['bubble_formula']:.4f}",
        all(math.isclose(v, p["bubble_formula"]) for v in slots.values()),
    )
    for split, what in (("equal", "equal layers"), ("balanced", "balanced by measured time")):
        for name in ("gpipe", "1f1b"):
            label = f"{what} ({split_label(p[split])})"
            text, held = idle_sentence(p[split], name, p["bubble_formula"], label)
            claims[f"bubble_measured_{split}_{name}"] = claim(text, held)
    zp = r["zero_paper_check"]
    claims["zero_paper_numbers"] = claim(
        "formula (3) gives the ZeRO paper's 7.5B-on-64-GPUs figures: "
        + ", ".join(f"{zp['ours_gb'][s]:.1f}" for s in STRATEGIES)
        + " GB (paper: 120, 31.4, 16.6, 1.9)",
        zp["max_abs_diff_gb"] < 0.051,
    )
    return claims


# =============================================================================
# 5. Figures (one function per figure, each returns the Figure)
# =============================================================================

KIND_COLOURS = {"F": "tab:blue", "B": "tab:orange"}


def timeline_title(p: dict) -> str:
    """The Gantt figure's message, from the slot and the measured idle fractions of each split."""

    def idle(split: dict) -> str:
        g, o = (split[s]["idle_fraction_measured"]["median"] for s in ("gpipe", "1f1b"))
        costs = split["stage_cost_ms"]
        ratio = max(costs) / min(costs)
        return f"(slowest stage {ratio:.1f}x the fastest) GPipe {g:.2f}, 1F1B {o:.2f}"

    return (
        f"Pipeline over {p['n_stages']} ranks, {p['n_micro']} micro-batches: the bubble formula "
        f"(p-1)/(m+p-1) = {p['bubble_formula']:.2f} assumes equal stages (unit slots: "
        f"{p['slots']['gpipe']['idle_fraction']:.2f}). Measured idle (gloo, shared CPU cores):\n"
        f"equal layers per stage {idle(p['equal'])};\nbalanced by measured time "
        f"{idle(p['balanced'])}"
    )


def plot_pipeline_timeline(p: dict, title: str) -> plt.Figure:
    """Each rank's forwards (blue) and backwards (orange) per micro-batch, one column per
    schedule: top, the schedule in unit time slots; then the measured event times of one run
    (the median round) with equal layers per stage, and with stages balanced by measured time,
    on one time axis so the two splits compare."""
    fig, axes = plt.subplots(3, 2, figsize=(13, 9))
    rows = (
        ("schedule in unit slots (F = B = 1)", lambda name: p["slots"][name]["slots"], 1),
        ("measured, equal layers", lambda name: p["equal"][name]["events"], 1e3),
        ("measured, balanced by time", lambda name: p["balanced"][name]["events"], 1e3),
    )
    span = 1e3 * max(e[3] for sp in ("equal", "balanced") for s in ("gpipe", "1f1b")
                     for ev in p[sp][s]["events"] for e in ev)  # fmt: skip
    for col, name in enumerate(("gpipe", "1f1b")):
        for row, (what, get, scale) in enumerate(rows):
            ax, per_rank = axes[row][col], get(name)
            width = max(e[3] for ev in per_rank for e in ev) * scale if row == 0 else span
            for rank, events in enumerate(per_rank):
                for kind, i, start, end in events:
                    ax.barh(rank, (end - start) * scale, left=start * scale, height=0.6,
                            color=KIND_COLOURS[kind], edgecolor="white")  # fmt: skip
                    if (end - start) * scale > 0.02 * width:  # a number only where it fits
                        ax.text((start + end) / 2 * scale, rank, str(i), ha="center",
                                va="center", fontsize=7, color="white")  # fmt: skip
            split = None if row == 0 else p["equal" if row == 1 else "balanced"]
            names = [f"rank {r}" for r in range(len(per_rank))]
            if split is not None:
                names = [f"{n}\n{s}" for n, s in zip(names, split["stage_names"], strict=True)]
            ax.set_yticks(range(len(per_rank)), names, fontsize=8)
            ax.invert_yaxis()
            if row == 0:
                ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
                ax.set_xlabel("time slot")
            else:
                ax.set_xlim(0, span * 1.02)
                ax.set_xlabel("time since the barrier (ms)")
            idle = (p["slots"][name]["idle_fraction"] if row == 0
                    else split[name]["idle_fraction_measured"]["median"])  # fmt: skip
            ax.set_title(f"{STRATEGY_LABELS[name]}, {what}: idle {idle:.2f}", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    fig.legend(handles, ["forward (micro-batch no.)", "backward"], loc="lower center", ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def plot_memory(memory: dict) -> plt.Figure:
    """Rank 0's bytes of parameters, gradients and optimizer state per strategy (stacked),
    with formula (3)'s total as a black tick where there is one."""
    fig, ax = plt.subplots(figsize=(10, 4.8))
    parts = (("params", "tab:blue"), ("grads", "tab:orange"), ("optimizer", "tab:green"))
    rows = [r for r in MEMORY_ROWS if r in memory]
    for i, row in enumerate(rows):
        m, bottom = memory[row]["measured"][0], 0
        for part, colour in parts:
            ax.bar(i, m[part] / 2**20, bottom=bottom, color=colour, label=part if i == 0 else None)
            bottom += m[part] / 2**20
        if "formula" in memory[row]:
            ax.plot(
                [i - 0.4, i + 0.4],
                [memory[row]["formula"]["total"] / 2**20] * 2,
                "k-",
                lw=2,
                label="formula (3)" if row == "ddp" else None,
            )
    ax.set_xticks(range(len(rows)), [STRATEGY_LABELS[r] for r in rows], rotation=15, fontsize=8)
    ax.set_ylabel("bytes held by rank 0 (MiB)")
    ax.legend(fontsize=8)
    ddp, z3 = memory["ddp"]["measured"][0]["total"], memory["zero3"]["measured"][0]["total"]
    ax.set_title(
        f"Per-rank model state: ZeRO-3 holds {z3 / ddp:.2f} of data parallelism's bytes "
        f"({len(memory['ddp']['measured'])} ranks, fp32, measured from the tensors)"
    )
    fig.tight_layout()
    return fig


def plot_communication(com: dict) -> plt.Figure:
    """Bytes rank 0 sends in one step of each strategy, measured (bars) and formula (ticks)."""
    rows = [k for k, v in com.items() if isinstance(v, dict)]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for i, row in enumerate(rows):
        ax.bar(i, com[row]["measured"] / 2**20, color="tab:purple")
        ax.plot(
            [i - 0.4, i + 0.4],
            [com[row]["formula"] / 2**20] * 2,
            "k-",
            lw=2,
            label="formula (1), (4)" if i == 0 else None,
        )
    labels = [f"{STRATEGY_LABELS[r]}\n({com[r]['note']})" for r in rows]
    ax.set_xticks(range(len(rows)), labels, rotation=15, fontsize=8)
    ax.set_ylabel("bytes sent by rank 0 per step (MiB)")
    ax.legend(fontsize=8)
    for i, row in enumerate(rows):
        ax.text(i, com[row]["measured"] / 2**20, f"{com[row]['measured'] / 2**10:,.0f} KiB",
                ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_title(
        f"Communication per training step: ZeRO-1/2 send what DDP sends, {zero3_phrase(com)};\n"
        "pipeline and tensor parallelism send activations (their size, not the model's)"
    )
    fig.tight_layout()
    return fig


def plot_ring(world_size: int = 4) -> plt.Figure:
    """The ring all-reduce's 2 (N-1) steps: which chunk each rank sends to the next."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    steps = [ring_schedule(world_size, r) for r in range(world_size)]  # rank -> step -> pair
    n_steps = len(steps[0])
    grid = np.array([[steps[r][s][0] for r in range(world_size)] for s in range(n_steps)])
    ax.imshow(grid, cmap="tab10", vmin=0, vmax=9, aspect="auto")
    for s in range(n_steps):
        for r in range(world_size):
            send, recv = steps[r][s]
            verb = "add" if s < world_size - 1 else "keep"
            ax.text(
                r,
                s,
                f"send c{send} -> r{(r + 1) % world_size}\n{verb} c{recv}",
                ha="center",
                va="center",
                fontsize=8,
            )
    ax.set_xticks(range(world_size), [f"rank {r}" for r in range(world_size)])
    labels = [f"reduce-scatter {s + 1}" for s in range(world_size - 1)]
    labels += [f"all-gather {s + 1}" for s in range(world_size - 1)]
    ax.set_yticks(range(n_steps), labels)
    ax.set_title(
        f"Ring all-reduce on {world_size} ranks: {n_steps} steps, each rank sends one chunk "
        f"(1/{world_size} of the tensor) per step,\n"
        f"2(N-1)/N = {2 * (world_size - 1) / world_size:.2f}"
        " of the tensor in all; colour = chunk sent"
    )
    fig.tight_layout()
    return fig


# =============================================================================
# 6. Main
# =============================================================================

SIZES = {
    "quick": {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 64},
        "seq_len": 16,
        "batch_size": 4,  # per rank, per step
        "accumulation": 2,
        "steps": 3,
        "n_micro": 4,
        "pipeline_batch": 8,  # windows, cut into n_micro micro-batches
        "ring_numel": 2**14,  # per rank: the ring's tensor is N times this
        "bucket_bytes": 2**17,
        "rounds": 3,
    },
    "default": {
        "model": {"d_model": 64, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "hidden_dim": 192},
        "seq_len": 64,
        "batch_size": 8,
        "accumulation": 2,
        "steps": 5,
        "n_micro": 8,
        "pipeline_batch": 64,
        "ring_numel": 2**19,
        "bucket_bytes": 2**20,
        "rounds": 5,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser()
    parser.add_argument(
        "--world-size",
        type=positive_int,
        default=2,
        help="worker processes to start (ignored under torchrun, which sets WORLD_SIZE); must "
        "divide the heads, KV heads and layers (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="AdamW steps per strategy (default: 3 with --quick, else 5)",
    )
    parser.add_argument(
        "--micro-batches",
        type=positive_int,
        default=None,
        help="pipeline micro-batches m; must divide its batch of 8 windows with --quick, else 64 "
        "(default: 4 with --quick, else 8)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_int,
        default=300,
        help="seconds before a collective or the whole worker session fails (default: %(default)s)",
    )
    args = parse_flags(parser, argv)
    sizes = run_sizes(args)
    try:
        check_parallel_sizes(
            args.world_size,
            sizes["model"]["n_heads"],
            sizes["model"]["n_kv_heads"],
            sizes["model"]["n_layers"],
            sizes["pipeline_batch"],
            sizes["n_micro"],
        )
    except ValueError as err:
        flag = "--micro-batches" if "n_micro" in str(err) else "--world-size"
        parser.error(f"argument {flag}: {err}")
    return args


def run_sizes(args: argparse.Namespace) -> dict:
    """SIZES for this run, with the flags applied (under torchrun, its WORLD_SIZE wins)."""
    sizes = copy.deepcopy(SIZES["quick" if args.quick else "default"])
    if under_torchrun():
        args.world_size = int(os.environ["WORLD_SIZE"])
    sizes["steps"] = args.steps or sizes["steps"]
    sizes["n_micro"] = args.micro_batches or sizes["n_micro"]
    return sizes


def print_setup(setup: dict) -> None:
    print(
        f"  {setup['world_size']} ranks ({setup['launcher']}, {setup['backend']}); Llama "
        f"{setup['parameters']:,} parameters, {setup['config']['n_layers']} layers; batch "
        f"{setup['batch_per_rank']} x {setup['seq_len']} tokens per rank, {setup['steps']} steps"
    )


def print_ring(r: dict) -> None:
    ring = r["ring"]
    print(
        f"  ring all-reduce of {ring['numel']:,} floats: max err {ring['all_reduce_max_err']:.1e} "
        f"vs dist.all_reduce; rank 0 sent {ring['bytes_sent_per_rank'][0]:,} bytes (formula "
        f"{ring['bytes_formula']:,.0f}); {ring['ms_ours']:.2f} ms vs torch "
        f"{ring['ms_torch']:.2f} ms"
    )


def print_strategies(r: dict) -> None:
    dp, z, t = r["data_parallel"], r["zero"], r["step_ms"]
    print(
        f"  data parallel: vs DDP {dp['max_err_vs_ddp']:.1e}, vs one process "
        f"{dp['max_err_vs_one_process']:.1e}; all-reduces per step: ours "
        f"{dp['all_reduces_per_step']:.0f}, DDP no_sync "
        f"{dp['ddp_all_reduces_per_step_no_sync']:.0f}"
        f", DDP without {dp['ddp_all_reduces_per_step_without_no_sync']:.0f}"
    )
    for s in ("zero1", "zero2", "zero3", "fsdp2"):
        m = r["memory"][s]["measured"][0]
        print(
            f"  {STRATEGY_LABELS[s]:<26} max err {z[s]['max_err_vs_one_process']:.1e}; "
            "rank 0 holds "
            f"{m['params']:>9,} + {m['grads']:>9,} + {m['optimizer']:>9,} bytes; step "
            f"{t[s]['median']:.1f} ms"
        )
    for b, v in r["tensor_parallel"].items():
        print(
            f"  tensor parallel {b}: y {v['y_max_err']:.1e}, dx {v['dx_max_err']:.1e}, grads "
            f"{v['grad_max_err']:.1e}; vs DTensor {v['dtensor_y_max_err']:.1e}"
        )
    p = r["pipeline"]
    for split in ("equal", "balanced"):
        sp = p[split]
        print(f"  pipeline, {split} split ({' | '.join(sp['stage_names'])}):")
        for s in ("gpipe", "1f1b"):
            print(
                f"    {STRATEGY_LABELS[s]}: grads max err {sp[s]['grad_max_err']:.1e}; idle "
                f"measured {sp[s]['idle_fraction_measured']['median']:.2f}, slots "
                f"{p['slots'][s]['idle_fraction']:.2f}, formula {p['bubble_formula']:.2f}"
            )


def print_extrapolation(ext: dict) -> None:
    for name, row in ext.items():
        cells = "; ".join(
            f"{k.split('_')[0]} devices: " + ", ".join(f"{s} {v:.1f}" for s, v in per.items())
            for k, per in row.items()
            if k != "params"
        )
        print(f"  {name} ({row['params'] / 1e9:.2f}B), GB per device: {cells}")


def distributed_figures(r: dict) -> dict:
    return {
        "pipeline_timeline": plot_pipeline_timeline(r["pipeline"], timeline_title(r["pipeline"])),
        "memory": plot_memory(r["memory"]),
        "communication": plot_communication(r["communication"]),
        "ring": plot_ring(max(r["world_size"], 4)),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.set_num_threads(1)  # the workers too: 2 cores shared by N processes
    device_type = "cuda" if device.type == "cuda" else "cpu"  # mps: gloo on the CPU
    sizes = run_sizes(args)
    rank0 = not under_torchrun() or os.environ["RANK"] == "0"
    say = print if rank0 else (lambda *a, **k: None)
    n = 5
    say(f"[1/{n}] loading the text and sizing the model ...")
    data = training.load_data()
    sizes["vocab_size"] = data["info"]["vocab_size"]
    results: dict = {"meta": run_meta(args, device)}
    results["setup"] = setup_info(args, sizes, device_type)
    say(f"[2/{n}] running every strategy on {args.world_size} ranks ...")
    per_rank = launch_workers(
        worker_experiments,
        (sizes, args.seed, device_type, data["train"]),
        args.world_size,
        device_type,
        args.timeout,
    )
    if not rank0:
        return {}
    print_setup(results["setup"])
    print(f"[3/{n}] comparing each strategy with its reference ...")
    results.update(summarize(per_rank, sizes, args.seed))
    print_ring(results)
    print_strategies(results)
    print(f"[4/{n}] extrapolating memory to Llama-2 ...")
    print_extrapolation(results["extrapolation"])
    results["claims"] = distributed_claims(results)
    print_claims(results["claims"])
    print(f"[5/{n}] drawing figures ...")
    figures = distributed_figures(results)
    save_outputs(args.out, figures, results, show=not args.no_show)
    return results


def setup_info(args, sizes: dict, device_type: str) -> dict:
    cfg = model_config(sizes, sizes["vocab_size"])
    launcher = "torchrun" if under_torchrun() else start_method(device_type)
    return {
        "world_size": args.world_size,
        "launcher": launcher,
        "backend": dist_backend(device_type),
        "config": {k: v for k, v in vars(cfg).items()},
        "parameters": sum(p.numel() for p in seeded_llama(cfg, 0, "cpu").parameters()),
        "batch_per_rank": sizes["batch_size"],
        "seq_len": sizes["seq_len"],
        "steps": sizes["steps"],
        "accumulation": sizes["accumulation"],
        "n_micro": sizes["n_micro"],
        "pipeline_batch": sizes["pipeline_batch"],
        "adamw": {k: list(v) if isinstance(v, tuple) else v for k, v in STEP_ADAMW.items()},
    }


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
