"""Tests for distributed_training.py: every equality of a 2-process gloo run (the ring against
torch's collectives, data parallelism against DDP and one process, ZeRO 1-3 and FSDP2 against
one-process AdamW, tensor parallelism against the full layer and DTensor, both pipeline
schedules against one process), the bytes and memory against their formulas, the launcher's
teardown (a failing and a hanging worker), the schedules' bubble in unit slots, the
DistributedSampler shard, each bad-input rule, the claims' wording, and the --quick run.

The process start-up is shared: the --quick run (one fork of two workers, through conftest's
``run_main``) carries every equality; three small launches test the launcher itself."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import distributed_training as dt
from distributed_training import (
    LLAMA2,
    bubble_formula,
    check_parallel_sizes,
    gpipe_schedule,
    idle_sentence,
    launch_workers,
    llama2_params,
    memory_formula,
    one_f_one_b_schedule,
    ring_schedule,
    schedule_idle_fraction,
    shard_indices,
)

TOL = 1e-6  # the tolerance the claims use for the trained parameters


@pytest.fixture
def quick(run_main):
    """The --quick run's results (2 workers, gloo), shared with the house tests."""
    return run_main(dt).results


# ----------------------------------------------------------------------------- equalities (2 ranks)


def test_ring_equals_torch_collectives_and_sends_2_n_minus_1_over_n(quick):
    ring = quick["ring"]
    assert quick["world_size"] == 2
    assert ring["all_reduce_max_err"] <= 1e-5
    assert ring["reduce_scatter_max_err"] <= 1e-5
    assert ring["all_gather_max_err"] == 0  # copies, no arithmetic
    n = quick["world_size"]
    for sent in ring["bytes_sent_per_rank"]:
        assert sent == 2 * (n - 1) / n * 4 * ring["numel"] == ring["bytes_formula"]


def test_data_parallel_equals_ddp_and_one_process(quick):
    dp = quick["data_parallel"]
    assert dp["max_err_vs_ddp_fp64"] <= TOL
    assert dp["max_err_vs_one_process_fp64"] <= TOL
    assert dp["ddp_max_err_vs_one_process_fp64"] <= TOL
    # fp32: the same bucketed average as DDP; one process rounds its sums differently and
    # Adam's 1 / (sqrt(v) + eps) magnifies that where gradients are tiny
    assert dp["max_err_vs_ddp"] <= TOL
    assert dp["max_err_vs_one_process"] <= 1e-3
    # the averaged gradient itself (AdamW would hide a missing 1/N nearly: scale-free but eps)
    assert dp["grad_max_err_vs_one_process_fp64"] <= 1e-12
    assert dp["grad_max_err_vs_one_process"] <= 1e-6


def test_accumulation_communicates_only_on_the_last_micro_step(quick):
    dp = quick["data_parallel"]
    assert dp["accumulation"] >= 2
    assert dp["all_reduces_per_step"] == dp["buckets"]  # once per bucket, not per micro-step
    assert dp["ddp_all_reduces_per_step_no_sync"] >= 1  # DDP's hook really ran (0 == 2 * 0)
    assert dp["ddp_all_reduces_per_step_without_no_sync"] == (
        dp["accumulation"] * dp["ddp_all_reduces_per_step_no_sync"]
    )
    for sent in dp["bytes_per_step_per_rank"]:
        assert sent == dp["bytes_formula"]


def test_zero_stages_and_fsdp2_equal_one_process_adamw(quick):
    for stage in ("zero1", "zero2", "zero3", "fsdp2"):
        assert quick["zero"][stage]["max_err_vs_one_process_fp64"] <= TOL, stage
        assert quick["zero"][stage]["max_err_vs_one_process"] <= 1e-3, stage
    for stage in ("zero1", "zero2", "zero3"):
        assert quick["zero"][stage]["max_err_vs_fsdp2_fp64"] <= TOL, stage
        assert quick["zero"][stage]["max_err_vs_fsdp2"] <= TOL, stage
        # each rank's reduce-scattered slice of the averaged first-step gradient
        assert quick["zero"][stage]["grad_max_err_vs_one_process_fp64"] <= 1e-12, stage
        assert quick["zero"][stage]["grad_max_err_vs_one_process"] <= 1e-6, stage


def test_fsdp2_really_shards_the_model_state(quick):
    """FSDP2 holds 1/N of parameters, gradients and AdamW state (to 1%: its uneven last rows),
    like ZeRO-3, not the whole model as DDP does."""
    mem, n = quick["memory"], quick["world_size"]
    ddp = mem["ddp"]["measured"][0]
    for rank in mem["fsdp2"]["measured"]:
        for part in ("params", "grads", "optimizer"):
            assert 0.99 * ddp[part] <= n * rank[part] <= 1.01 * ddp[part], part


def test_memory_measured_equals_formula(quick):
    mem, n = quick["memory"], quick["world_size"]
    assert mem["all_equal_formula"]
    for stage in ("zero1", "zero2", "zero3"):
        psi = quick["zero"][stage]["psi_padded"]
        for rank in mem[stage]["measured"]:
            assert rank["optimizer"] == 8 * psi // n  # AdamW's m and v of the slice
    ddp, z1, z2, z3 = (mem[s]["measured"][0] for s in ("ddp", "zero1", "zero2", "zero3"))
    assert ddp["total"] > z1["total"] > z2["total"] > z3["total"]
    assert z3["params"] == z3["grads"] == mem["zero3"]["formula"]["params"]


def test_communication_measured_equals_formula(quick):
    com = quick["communication"]
    assert com["all_equal_formula"]
    assert com["zero1"]["measured"] == com["zero2"]["measured"] == com["ddp"]["measured"]
    assert 1 < com["zero3"]["measured"] / com["ddp"]["measured"] <= 1.5
    # 3/2 of DDP less the head's forward gather: (3 Psi - Psi_head) / (2 Psi)
    z3 = quick["zero"]["zero3"]
    share = z3["psi_last_padded"] / z3["psi_padded"]
    ratio = com["zero3"]["measured"] / com["ddp"]["measured"]
    assert ratio == pytest.approx(1.5 - share / 2, rel=1e-3)


def test_tensor_parallel_equals_full_layer_and_dtensor(quick):
    for block in ("mlp", "attention"):
        tp = quick["tensor_parallel"][block]
        for key in ("y", "dx"):
            assert tp[f"{key}_max_err"] <= 1e-5, (block, key)
            assert tp[f"dtensor_{key}_max_err"] <= 1e-5, (block, key)
        for key in ("grad_max_err", "dtensor_grad_max_err"):  # fp32 sums over the tokens
            assert tp[key] <= 1e-6 * tp["grad_scale"], (block, key)
        assert tp["params_bytes_ours"] * quick["world_size"] == tp["params_bytes_full"]
        assert tp["params_bytes_dtensor"] == tp["params_bytes_ours"]  # DTensor really sharded
        for sent in tp["bytes_per_step_per_rank"]:
            assert sent == tp["bytes_formula"]  # f backward + g forward: 2 all-reduces


def test_pipeline_gradients_equal_one_process_and_bubble_in_slots(quick):
    p = quick["pipeline"]
    for name in ("gpipe", "1f1b"):
        assert p["slots"][name]["idle_fraction"] == pytest.approx(p["bubble_formula"], abs=1e-12)
    n_units = len(p["unit_ms"])
    for split in ("equal", "balanced"):
        stages = p[split]["stages"]
        assert sum(stages, []) == list(range(n_units))  # every unit once, in order
        for name in ("gpipe", "1f1b"):
            run = p[split][name]
            assert run["grad_max_err"] <= 1e-5
            assert 0 <= run["idle_fraction_measured"]["min"] <= 1
            assert len(run["events"]) == p["n_stages"]
            for events in run["events"]:  # each rank's computations in order, none overlapping
                assert len(events) == 2 * p["n_micro"]
                assert all(a[3] <= b[2] + 1e-9 for a, b in zip(events, events[1:], strict=False))
            for sent, formula in zip(
                run["bytes_per_step_per_rank"], p["bytes_formula_per_rank"], strict=True
            ):
                assert sent == formula
        assert p[split]["gpipe"]["loss"] == pytest.approx(p[split]["1f1b"]["loss"], abs=1e-6)
    # the balanced split is never worse than the equal one on the costs it was cut by
    assert max(p["balanced"]["stage_cost_ms"]) <= max(p["equal"]["stage_cost_ms"])


def test_quick_run_writes_figures_results_and_claims(run_main):
    run = run_main(dt)
    assert {p.name for p in run.pngs} == {
        f"{n}.png" for n in ("pipeline_timeline", "memory", "communication", "ring")
    }
    r = run.results
    assert {
        "ring",
        "sampler",
        "data_parallel",
        "zero",
        "tensor_parallel",
        "pipeline",
        "memory",
        "communication",
        "step_ms",
        "extrapolation",
        "claims",
    } <= r.keys()
    for name, c in r["claims"].items():
        if not name.startswith("bubble_measured"):  # timing: honest either way
            assert c["held"], c["statement"]
    assert r["setup"]["launcher"] == "fork" and r["setup"]["backend"] == "gloo"
    assert "[5/5] drawing figures ..." in run.stdout


# ----------------------------------------------------------------------------- the launcher


def _ring_on_odd_sizes(numel: int) -> list:
    """Runs on every rank: ring all-reduce of uneven chunks vs dist.all_reduce."""
    comm = dt.RingComm()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(comm.rank))
    ref = x.clone()
    dist.all_reduce(ref)
    return [dt.max_abs_err(dt.ring_all_reduce(x.clone(), comm), ref), comm.sent["all_reduce"]]


def _fails_on_rank_1() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank 1 breaks")
    dist.barrier()  # rank 0 waits here until the launcher kills it


def _hangs() -> None:
    time.sleep(60)


def test_launcher_ring_on_3_ranks_with_uneven_chunks():
    results = launch_workers(_ring_on_odd_sizes, (1001,), 3, timeout_s=60)
    assert [len(r) for r in results] == [2, 2, 2]
    assert max(r[0] for r in results) <= 1e-5
    # chunks of 334, 334, 333: rank r sends all but its own chunk, then all but chunk r + 1
    assert [r[1] for r in results] == [
        4 * (2 * 1001 - 334 - 334),
        4 * (2 * 1001 - 334 - 333),
        4 * (2 * 1001 - 333 - 334),
    ]
    assert not mp.active_children()


def test_launcher_reports_a_failing_worker_and_kills_the_rest():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="^a worker failed: rank 1 raised ValueError: rank 1"):
        launch_workers(_fails_on_rank_1, (), 2, timeout_s=30)  # the cause first, not rank 0's
    assert time.monotonic() - start < 20  # not the collective timeout
    assert not mp.active_children()


def test_launcher_kills_hanging_workers_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="no result within"):
        launch_workers(_hangs, (), 2, timeout_s=2)
    assert time.monotonic() - start < 15
    assert not mp.active_children()


# ----------------------------------------------------------------------------- pure pieces


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 40))
def test_ring_schedule_reduces_every_chunk_once(n, numel):
    """Play the schedule with numbers in one process: every rank ends with the full sum, and
    each rank sends 2 (N-1) chunks."""
    data = [torch.arange(numel, dtype=torch.float64) * (r + 1) for r in range(n)]
    chunks = [list(d.tensor_split(n)) for d in data]
    sched = [ring_schedule(n, r) for r in range(n)]
    for step in range(2 * (n - 1)):
        outgoing = [chunks[r][sched[r][step][0]].clone() for r in range(n)]
        for r in range(n):
            send, recv = sched[(r - 1) % n][step][0], sched[r][step][1]
            assert send == recv  # what rank r - 1 sends is what rank r expects
            incoming = outgoing[(r - 1) % n]
            chunks[r][recv] = chunks[r][recv] + incoming if step < n - 1 else incoming
    total = sum(data)
    for r in range(n):
        torch.testing.assert_close(torch.cat(chunks[r]), total)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 16), st.sampled_from([(1, 1), (1, 2), (2, 3)]))
def test_bubble_in_unit_slots_equals_formula(p, m, times):
    for make in (gpipe_schedule, one_f_one_b_schedule):
        sched = make(p, m)
        assert all(sorted(s) == sorted(sched[0]) for s in sched)  # every F and B once
        got = schedule_idle_fraction(sched, *times)["idle_fraction"]
        assert got == pytest.approx(bubble_formula(p, m), abs=1e-12)


def test_unequal_stages_idle_more_than_the_formula():
    # the last stage twice as slow (the LM head): the others wait on it
    sched = gpipe_schedule(2, 4)
    got = schedule_idle_fraction(sched, [1, 2], [1, 2])
    assert got["idle_fraction"] > bubble_formula(2, 4)
    assert got["makespan"] == 1 + 2 * 4 + 2 * 4 + 1  # fill, the slow stage's work, drain


def test_one_f_one_b_holds_fewer_activations_than_gpipe():
    def peak(actions):
        live = best = 0
        for kind, _ in actions:
            live += 1 if kind == "F" else -1
            best = max(best, live)
        return best

    p, m = 4, 8
    assert [peak(a) for a in gpipe_schedule(p, m)] == [m] * p
    assert [peak(a) for a in one_f_one_b_schedule(p, m)] == [p - s for s in range(p)]


def test_sampler_equals_distributed_sampler():
    r = dt.check_sampler(3, seed=7)
    assert r["equal"] == r["cases"] and r["epoch_reshuffles"]
    shards = [shard_indices(10, 4, rank, 0, 0) for rank in range(4)]
    assert len({len(s) for s in shards}) == 1  # padded to equal shares
    assert set().union(*shards) == set(range(10))


def test_held_bytes_counts_a_storage_once():
    flat = torch.zeros(100)
    views = [flat[:50], flat[50:], flat.view(10, 10)]
    assert dt.held_bytes(views) == 400
    assert dt.held_bytes([flat, torch.zeros(3, dtype=torch.float64), None]) == 424


def test_gradient_buckets_start_from_the_last_parameter_and_respect_the_size():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 20, 30, 40)]
    buckets = dt.gradient_buckets(params, bucket_bytes=4 * 50)
    assert [[p.numel() for p in b] for b in buckets] == [[40], [30, 20], [10]]
    assert dt.gradient_buckets(params, bucket_bytes=1)[0][0] is params[-1]  # one per bucket


def test_torchrun_is_detected_from_its_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    assert not dt.under_torchrun()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert dt.under_torchrun()
    assert dt.parse_args(["--quick", "--world-size", "1"]).world_size == 2  # WORLD_SIZE wins


def test_memory_formula_gives_the_zero_paper_numbers():
    # ZeRO paper, figure 1: 7.5B parameters, 64 GPUs, K = 12: 120, 31.4, 16.6, 1.9 GB
    got = [memory_formula(s, 7.5e9, 64, dt.BYTES_PAPER)["total"] / 1e9 for s in dt.STRATEGIES]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]
    # fp32 here: 16 Psi for DDP, all of it divided by N for ZeRO-3
    assert memory_formula("ddp", 10, 4)["total"] == 160
    assert memory_formula("zero3", 10, 4)["total"] == 40


def test_llama2_parameter_counts_match_the_published_models():
    # meta-llama/Llama-2-7b-hf and -70b-hf: 6,738,415,616 and 68,976,648,192 parameters
    assert llama2_params(LLAMA2["Llama-2-7B"]) == 6_738_415_616
    assert llama2_params(LLAMA2["Llama-2-70B"]) == 68_976_648_192


def test_comm_formula_ratios():
    psi, n = 1000, 4
    assert dt.comm_formula("ddp", psi, n) == 2 * 3 / 4 * 4 * psi
    assert dt.comm_formula("zero3", psi, n) == pytest.approx(1.5 * dt.comm_formula("ddp", psi, n))


# ----------------------------------------------------------------------------- claims' wording


def test_idle_sentence_says_when_the_run_did_not_show_the_bubble():
    split = {
        "gpipe": {
            "idle_fraction_measured": {"median": 0.6, "min": 0.55, "max": 0.7},
            "idle_fraction_stage_times": 0.55,
        },
    }
    text, held = idle_sentence(split, "gpipe", 0.2, "equal layers")
    assert not held and "did not show" in text and "0.60" in text and "equal layers" in text
    assert "unequal stages account for 88% of the gap" in text  # (0.55 - 0.2) / (0.6 - 0.2)
    split["gpipe"]["idle_fraction_stage_times"] = 0.25
    assert (
        "account for 12% of the gap; the rest is not measured"
        in idle_sentence(split, "gpipe", 0.2, "x")[0]
    )
    split["gpipe"]["idle_fraction_stage_times"] = 0.65
    assert "account for all of the gap" in idle_sentence(split, "gpipe", 0.2, "x")[0]
    split["gpipe"]["idle_fraction_stage_times"] = 0.15
    assert "account for none of the gap" in idle_sentence(split, "gpipe", 0.2, "x")[0]
    split["gpipe"]["idle_fraction_measured"] = {"median": 0.21, "min": 0.18, "max": 0.25}
    text, held = idle_sentence(split, "gpipe", 0.2, "x")
    assert held and "within" in text


def test_zero3_phrase_handles_one_rank():
    com = {"ddp": {"measured": 0}, "zero3": {"measured": 0}}
    assert dt.zero3_phrase(com) == "with one rank nothing is sent"
    com = {"ddp": {"measured": 100}, "zero3": {"measured": 150}}
    assert dt.zero3_phrase(com) == "ZeRO-3 sends 1.50x DDP's bytes"


def test_timeline_title_reports_the_measured_numbers():
    def split(g, o, costs):
        return {
            "stage_cost_ms": costs,
            "gpipe": {"idle_fraction_measured": {"median": g}},
            "1f1b": {"idle_fraction_measured": {"median": o}},
        }

    p = {
        "n_stages": 2,
        "n_micro": 4,
        "bubble_formula": 0.2,
        "slots": {"gpipe": {"idle_fraction": 0.2}},
        "equal": split(0.61, 0.33, [10, 30]),
        "balanced": split(0.27, 0.24, [20, 21]),
    }
    title = dt.timeline_title(p)
    for number in ("0.61", "0.33", "0.20", "0.27", "0.24", "3.0x"):
        assert number in title


def test_pipeline_splits():
    assert dt.equal_layer_stages(4, 2) == [[0, 1, 2], [3, 4, 5]]
    assert dt.equal_layer_stages(4, 1) == [[0, 1, 2, 3, 4, 5]]
    assert dt.equal_layer_stages(8, 4) == [[0, 1, 2], [3, 4], [5, 6], [7, 8, 9]]
    assert dt.stage_name([0, 1, 2], 6) == "embedding + 2 layers"
    assert dt.stage_name([3, 4, 5], 6) == "2 layers + head"
    assert dt.stage_name([5], 6) == "head"
    assert dt.balanced_stages([0.1, 1, 1, 1, 1, 4], 2) == [[0, 1, 2, 3, 4], [5]]
    assert dt.balanced_stages([1, 1, 1, 1], 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="n_stages"):
        dt.balanced_stages([1, 2], 3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 10), min_size=1, max_size=8), st.integers(1, 8))
def test_balanced_stages_are_contiguous_and_no_worse_than_any_equal_cut(costs, p):
    """Contiguous, non-empty, every unit once; no stage costs more than the costliest stage of
    cutting into equal unit counts (one of the cuts it tried)."""
    p = min(p, len(costs))
    stages = dt.balanced_stages(costs, p)
    assert len(stages) == p and all(stages) and sum(stages, []) == list(range(len(costs)))
    bounds = [round(k * len(costs) / p) for k in range(p + 1)]
    equal = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    assert max(sum(costs[i] for i in s) for s in stages) <= equal + 1e-9


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"world_size": 0}, "world_size"),
        ({"world_size": 3}, "n_heads"),
        ({"world_size": 4, "n_kv_heads": 2}, "n_kv_heads"),
        ({"world_size": 2, "n_layers": 3}, "n_layers"),
        ({"world_size": 2, "batch_size": 5}, "batch_size"),
        ({"n_micro": 0}, "n_micro"),
        ({"n_micro": 3}, "n_micro"),
    ],
)
def test_bad_sizes_name_the_argument(kwargs, name):
    args = {
        "world_size": 2,
        "n_heads": 4,
        "n_kv_heads": 4,
        "n_layers": 4,
        "batch_size": 8,
        "n_micro": 4,
        **kwargs,
    }
    with pytest.raises(ValueError, match=name):
        check_parallel_sizes(**args)


def test_bad_arguments_of_the_core_name_the_argument():
    with pytest.raises(ValueError, match="world_size"):
        ring_schedule(0, 0)
    with pytest.raises(ValueError, match="rank"):
        ring_schedule(2, 2)
    with pytest.raises(ValueError, match="n_micro"):
        gpipe_schedule(2, 0)
    with pytest.raises(ValueError, match="n_micro"):
        one_f_one_b_schedule(2, 0)
    with pytest.raises(ValueError, match="n_samples"):
        shard_indices(0, 2, 0, 0, 0)
    with pytest.raises(ValueError, match="stage"):
        dt.ZeroShardedTrainer(None, 4, None)
    with pytest.raises(ValueError, match="world_size"):
        launch_workers(_hangs, (), 0)
    with pytest.raises(TypeError, match="n_stages"):
        bubble_formula(2.5, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        dt.RingComm()
    attention = dt.GroupedQueryAttention(32, 4, 2, max_seq_len=8)
    with pytest.raises(ValueError, match="n_kv_heads"):
        dt._check_tp_layer(attention, 4)
    with pytest.raises(ValueError, match="n_heads"):
        dt._check_tp_layer(attention, 3)
    with pytest.raises(ValueError, match="hidden_dim"):
        dt._check_tp_layer(dt.SwiGLUFeedForward(32, hidden_dim=66), 4)
    with pytest.raises(ValueError, match="biases"):
        dt._check_tp_layer(dt.SwiGLUFeedForward(32, hidden_dim=64, bias=True), 2)
    with pytest.raises(TypeError, match="layer"):
        dt._check_tp_layer(torch.nn.Linear(4, 4), 2)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--world-size", "0"], "--world-size"),
        (["--world-size", "3"], "--world-size"),
        (["--micro-batches", "3"], "--micro-batches"),
        (["--micro-batches", "0"], "--micro-batches"),
    ],
)
def test_bad_flags_exit_2(argv, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        dt.main(["--quick", "--no-show", "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bubble_formula_value():
    assert math.isclose(bubble_formula(4, 8), 3 / 11)
    assert bubble_formula(1, 5) == 0  # one stage never waits
