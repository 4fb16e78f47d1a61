"""Tests for flash_attention.py: the tiled forward and backward equal SDPA and autograd through
naive attention (random and hypothesis-drawn shapes, causal, GQA, odd lengths), the online softmax,
the skipped tiles, the memory counter, the HBM traffic counts, sliding-window attention with its
rolling cache, the optional Triton kernel (under the Triton interpreter), each bad-input rule,
the claim wording, and the ``--quick`` run."""

from __future__ import annotations

import doctest
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import flash_attention as fa
from flash_attention import (
    BLOCK_COMPUTED,
    BLOCK_MASKED,
    BLOCK_SKIPPED,
    EQUALITY_CASES,
    LiveTensorBytes,
    RollingKVCache,
    block_plan,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    hbm_traffic_bytes,
    naive_attention,
    online_softmax,
    peak_bytes,
    skipped_block_formula,
    sliding_window_attention,
    sliding_window_mask,
)

ATOL = 1e-5  # float32
CPU = torch.device("cpu")


def qkv(b, h, hk, tq, tk, d, dtype=torch.float32):
    return (
        torch.randn(b, h, tq, d, dtype=dtype),
        torch.randn(b, hk, tk, d, dtype=dtype),
        torch.randn(b, hk, tk, d, dtype=dtype),
    )


def reference(q, k, v, causal):
    """SDPA with the bottom-right causal triangle spelled out (queries = the last q_len keys)."""
    tq, tk = q.shape[2], k.shape[2]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else None
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
    )


def grads(attend, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


# ----------------------------------------------------------------------------- equalities


@pytest.mark.parametrize("case", list(EQUALITY_CASES))
def test_forward_and_backward_equal_sdpa_and_naive_autograd(case):
    b, h, hk, tq, tk, d, causal, bq, bk = EQUALITY_CASES[case]
    q, k, v = qkv(b, h, hk, tq, tk, d)
    do = torch.randn_like(q)
    mine = grads(lambda q, k, v: flash_attention(q, k, v, causal, bq, bk), q, k, v, do)
    ref = grads(lambda q, k, v: reference(q, k, v, causal), q, k, v, do)
    naive = grads(lambda q, k, v: naive_attention(q, k, v, causal), q, k, v, do)
    for a, r, n in zip(mine, ref, naive, strict=True):
        assert_close(a, r, atol=ATOL, rtol=0)
        assert_close(a, n, atol=ATOL, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(0, 2),
    hk=st.integers(1, 3),
    group=st.integers(1, 3),
    tq=st.integers(1, 40),
    extra=st.integers(0, 20),
    d=st.sampled_from([1, 4, 8]),
    bq=st.integers(1, 24),
    bk=st.integers(1, 24),
    causal=st.booleans(),
)
def test_forward_equals_sdpa_on_drawn_shapes(b, hk, group, tq, extra, d, bq, bk, causal):
    q, k, v = qkv(b, hk * group, hk, tq, tq + extra, d)
    out, lse = flash_attention_forward(q, k, v, causal, bq, bk)
    assert_close(out, reference(q, k, v, causal), atol=ATOL, rtol=0)
    # L is the logsumexp of each row of the (masked) scores
    s = (q.reshape(b, hk, group * tq, d) @ k.transpose(-2, -1)).view(b, hk, group, tq, tq + extra)
    if causal:
        s = s.masked_fill(~torch.ones(tq, tq + extra, dtype=torch.bool).tril(extra), -math.inf)
    expected = torch.logsumexp(s / math.sqrt(d), dim=-1).reshape(b, hk * group, tq)
    assert_close(lse, expected, atol=ATOL, rtol=0)


@settings(max_examples=12, deadline=None)
@given(
    hk=st.integers(1, 2),
    group=st.integers(1, 3),
    tq=st.integers(1, 24),
    extra=st.integers(0, 10),
    bq=st.integers(1, 16),
    bk=st.integers(1, 16),
    causal=st.booleans(),
)
def test_backward_equals_sdpa_autograd_on_drawn_shapes(hk, group, tq, extra, bq, bk, causal):
    q, k, v = qkv(2, hk * group, hk, tq, tq + extra, 8)
    out, lse = flash_attention_forward(q, k, v, causal, bq, bk)
    do = torch.randn_like(q)
    mine = flash_attention_backward(q, k, v, out, lse, do, causal, bq, bk)
    ref = grads(lambda q, k, v: reference(q, k, v, causal), q, k, v, do)[1:]
    for a, r in zip(mine, ref, strict=True):
        assert_close(a, r, atol=ATOL, rtol=0)


def test_autograd_saves_no_t_by_t_tensor():
    """What autograd keeps for the backward: naive attention keeps P (T x T), the tiled version
    only q, k, v, O and L."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 64, 64, 8))
    saved = {}
    for name, attend in (("naive", naive_attention), ("flash", flash_attention)):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, sizes=sizes: sizes.append(t.numel()) or t, lambda t: t
        ):
            attend(q, k, v, causal=True)
        saved[name] = max(sizes)
    assert saved["naive"] >= 2 * 64 * 64  # P, for 2 heads
    assert saved["flash"] == q.numel()  # the largest saved tensor is q-sized


def test_gradcheck_in_float64_on_a_tiny_gqa_causal_case():
    q, k, v = (t.requires_grad_() for t in qkv(1, 4, 2, 5, 7, 3, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=2, block_k=3), (q, k, v)
    )


def test_second_order_gradients_raise_instead_of_being_dropped():
    """Algorithm 2 is not itself differentiable: a create_graph backward through it must fail
    loudly (once_differentiable), not return a silently wrong second derivative."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 8, 8, 4, dtype=torch.float64))
    (dq,) = torch.autograd.grad(flash_attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        dq.sum().backward()


def test_bf16_error_is_at_most_twice_the_naive_bf16_error():
    bf16 = fa._bf16_errors(CPU)
    assert bf16["max_ratio"] <= fa.BF16_ERROR_RATIO
    assert all(e > 0 for e in bf16["err_naive"].values())  # bf16 really rounds


def test_non_contiguous_inputs_from_the_batch_seq_heads_layout():
    """Real models hold (batch, seq_len, heads, head_dim) and transpose: no copy is required."""
    q = torch.randn(2, 6, 4, 8).transpose(1, 2)  # (b, T, h, d) -> (b, h, T, d), a view
    k, v = (torch.randn(2, 9, 2, 8).transpose(1, 2) for _ in range(2))
    do = torch.randn(2, 6, 4, 8).transpose(1, 2)
    assert not q.is_contiguous()
    mine = grads(lambda q, k, v: flash_attention(q, k, v, True, 4, 4), q, k, v, do)
    ref = grads(lambda q, k, v: reference(q, k, v, True), q, k, v, do)
    for a, r in zip(mine, ref, strict=True):
        assert_close(a, r, atol=ATOL, rtol=0)


def test_explicit_scale_is_used():
    q, k, v = qkv(1, 2, 2, 9, 9, 4)
    out, _ = flash_attention_forward(q, k, v, block_q=4, block_k=4, scale=0.3)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=ATOL, rtol=0)


def test_empty_batch_and_empty_queries_return_empty_results():
    q, k, v = qkv(0, 2, 1, 5, 5, 4)
    assert flash_attention_forward(q, k, v, True)[0].shape == (0, 2, 5, 4)
    q, k, v = qkv(1, 2, 1, 0, 5, 4)
    assert flash_attention_forward(q, k, v, True)[0].shape == (1, 2, 0, 4)


# ----------------------------------------------------------------------------- online softmax


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 100), block=st.integers(1, 30), shift=st.floats(-50, 50))
def test_online_softmax_equals_softmax(n, block, shift):
    x = torch.randn(n, dtype=torch.float64) * 5 + shift
    y, m, l = online_softmax(x, block)
    assert_close(y, torch.softmax(x, dim=0), atol=1e-12, rtol=0)
    assert len(m) == len(l) == math.ceil(n / block)
    assert m[-1] == x.max().item()  # the running max ends at the max
    assert m == sorted(m)  # and never decreases
    assert l[-1] == pytest.approx(torch.exp(x - x.max()).sum().item(), rel=1e-12)


# ----------------------------------------------------------------------------- tiling


@pytest.mark.parametrize(("seq_len", "block"), [(64, 64), (100, 16), (512, 64), (4096, 128)])
def test_skipped_tiles_equal_the_formula_and_tend_to_half(seq_len, block):
    plan = block_plan(seq_len, seq_len, block, block, causal=True)
    n = math.ceil(seq_len / block)
    # from first principles: block (i, j) is skipped iff its first key comes after its last query
    expected = sum(
        1 for i in range(n) for j in range(n) if j * block > min(seq_len, (i + 1) * block) - 1
    )
    assert (plan == BLOCK_SKIPPED).sum() == expected == skipped_block_formula(seq_len, block)
    assert (plan == BLOCK_MASKED).sum() == n  # the diagonal
    assert (block_plan(seq_len, seq_len, block, block, causal=False) == BLOCK_COMPUTED).all()
    assert skipped_block_formula(1 << 16, 64) / (1024**2) == pytest.approx(0.5, abs=1e-3)


def test_forward_really_skips_the_tiles_above_the_diagonal():
    """Matmul FLOPs of the causal forward / the non-causal one = visited tiles / all tiles."""
    q, k, v = qkv(1, 2, 2, 256, 256, 16)
    flops = {}
    for causal in (False, True):
        with FlopCounterMode(display=False) as counter:
            flash_attention_forward(q, k, v, causal, 32, 32)
        flops[causal] = counter.get_total_flops()
    plan = block_plan(256, 256, 32, 32, causal=True)
    assert flops[True] / flops[False] == pytest.approx((plan != BLOCK_SKIPPED).mean())


def test_backward_also_skips_the_tiles_above_the_diagonal():
    """The backward's matmul FLOPs, causal / non-causal = visited tiles / all tiles, too."""
    q, k, v = qkv(1, 2, 2, 256, 256, 16)
    do = torch.randn_like(q)
    flops = {}
    for causal in (False, True):
        out, lse = flash_attention_forward(q, k, v, causal, 32, 32)
        with FlopCounterMode(display=False) as counter:
            flash_attention_backward(q, k, v, out, lse, do, causal, 32, 32)
        flops[causal] = counter.get_total_flops()
    plan = block_plan(256, 256, 32, 32, causal=True)
    assert flops[True] / flops[False] == pytest.approx((plan != BLOCK_SKIPPED).mean())


def test_bottom_right_alignment_with_fewer_queries_than_keys():
    plan = block_plan(16, 64, 16, 16, causal=True)  # the 16 queries are positions 48..63
    assert plan.tolist() == [[BLOCK_COMPUTED] * 3 + [BLOCK_MASKED]]


# ----------------------------------------------------------------------------- memory, traffic


def test_live_tensor_bytes_counts_allocations_not_views():
    x = torch.ones(16, 16)
    with LiveTensorBytes() as tracker:
        x.view(-1)  # a view: nothing allocated
        y = x.clone()
        y.view(-1).add_(1)  # in place on a view: nothing allocated
        z = x * 2  # y and z alive together
        del y
    assert tracker.peak == 2 * x.numel() * 4
    assert tracker.live_bytes == z.numel() * 4  # y was freed


def test_peak_memory_naive_holds_the_scores_and_tiled_does_not():
    b, h, t, d, block = 1, 2, 256, 16, 32
    q, k, v = qkv(b, h, h, t, t, d)
    scores = b * h * t * t * 4
    out = b * h * t * d * 4
    naive = peak_bytes(lambda: naive_attention(q, k, v), CPU)
    flash = peak_bytes(lambda: flash_attention_forward(q, k, v, False, block, block), CPU)
    assert naive >= 2 * scores  # S and P at once (softmax reads S while writing P)
    tile = b * h * block * max(block, d) * 4
    assert out < flash <= out + 10 * tile  # O, L and a few tiles: no T x T tensor


def _alg1_traffic_by_loop(n, d, block, bytes_per):
    """Count HBM reads and writes by walking Algorithm 1's loops (no closed form)."""
    elements = 0
    for i0 in range(0, n, block):
        rows = min(block, n - i0)
        elements += rows * d  # load Q_i
        for j0 in range(0, n, block):
            elements += 2 * min(block, n - j0) * d  # load K_j, V_j
        elements += rows * d  # write O_i
    return elements * bytes_per + 4 * n  # + L in float32


@pytest.mark.parametrize(("n", "d", "block"), [(4096, 64, 128), (1000, 32, 64), (64, 16, 64)])
def test_hbm_traffic_closed_form_equals_walking_the_loops(n, d, block):
    """The closed form against the same model written as loops (same assumptions: every tile
    visited, no causal skipping): a check of the algebra, not of the model against hardware."""
    counts = hbm_traffic_bytes(n, d, block, bytes_per=2)
    assert counts["tiled"] == _alg1_traffic_by_loop(n, d, block, 2)
    # Algorithm 0: read Q, K, write S; read S, write P; read P, V, write O
    assert counts["standard"] == 2 * (2 * n * d + n * n + n * n + n * n + n * n + n * d + n * d)


# ----------------------------------------------------------------------------- sliding window


def test_sliding_window_mask_from_its_definition():
    mask = sliding_window_mask(5, 9, 3)
    for i in range(5):
        p = 9 - 5 + i
        assert mask[i].tolist() == [p - 3 < j <= p for j in range(9)]


@pytest.mark.parametrize(("window", "seq_len"), [(16, 80), (4, 70), (64, 80)])
def test_rolling_cache_decode_equals_masked_reference_with_bounded_bytes(window, seq_len):
    out = fa.check_sliding_window(CPU, window=window, seq_len=seq_len)
    assert out["max_abs_err_vs_masked_reference"] <= ATOL
    assert out["cache_bytes_constant"]
    assert out["cache_bytes"] == 2 * 1 * 2 * window * 16 * 4
    assert out["full_cache_bytes"] == 2 * 1 * 2 * seq_len * 16 * 4
    if window < seq_len - 40:  # room for it: one chunk is longer than the window (overwrites)
        assert max(out["chunks"]) > window


def test_sliding_window_attention_equals_full_attention_when_window_covers_everything():
    q, k, v = qkv(1, 4, 2, 12, 12, 8)
    assert_close(sliding_window_attention(q, k, v, 12), reference(q, k, v, True), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- Triton

# Under TRITON_INTERPRET=1, bfloat16 tl.dot returns wrong numbers (a limit of the interpreter,
# which emulates it with numpy; float16 and float32 are right), so bfloat16 is checked only on a
# GPU (test_triton_kernel_on_cuda). float16: Dao's criterion, at most 2x the error of PyTorch's
# float16 attention against float64.
_TRITON_CHECK = """
import torch, flash_attention as fa
torch.manual_seed(0)
for causal, tq, tk in ((False, 80, 80), (True, 80, 80), (True, 40, 100)):
    q = torch.randn(1, 4, tq, 16); k = torch.randn(1, 2, tk, 16); v = torch.randn(1, 2, tk, 16)
    o, lse = fa.flash_attention_forward_triton(q, k, v, causal, 32, 16)
    o_ref, lse_ref = fa.flash_attention_forward(q, k, v, causal, 32, 16)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=0)
    q, k, v = (t.half() for t in (q, k, v))
    o, lse = fa.flash_attention_forward_triton(q, k, v, causal, 32, 16)
    exact = fa.naive_attention(q.double(), k.double(), v.double(), causal)
    err = fa.max_abs_err(o, exact)
    err_torch = fa.max_abs_err(fa.naive_attention(q, k, v, causal), exact)
    assert 0 < err <= fa.BF16_ERROR_RATIO * err_torch, (err, err_torch)
    torch.testing.assert_close(lse, fa.flash_attention_forward(q, k, v, causal, 32, 16)[1])
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_equals_the_python_forward_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = str(Path(fa.__file__).resolve().parent)
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_on_cuda():
    """float32 (tf32 tolerance), float16 and bfloat16 (Dao's 2x criterion), q_len = kv_len and
    q_len < kv_len: the same cases the script's check_triton prints."""
    pytest.importorskip("triton")
    out = fa.check_triton(torch.device("cuda"))
    assert out["ran"] and len(out["cases"]) == 6
    for name, c in out["cases"].items():
        assert c["held"], (name, c)
        assert c["max_abs_err_lse_vs_python"] <= 1e-2, (name, c)


def test_triton_refuses_what_it_cannot_tile():
    q, k, v = qkv(1, 2, 2, 8, 8, 12)
    with pytest.raises(ValueError, match="head_dim"):
        fa.flash_attention_forward_triton(q, k, v)
    q, k, v = qkv(1, 2, 2, 16, 16, 16, dtype=torch.float64)  # tl.dot has no float64
    with pytest.raises(ValueError, match="dtype"):
        fa.flash_attention_forward_triton(q, k, v)


# ----------------------------------------------------------------------------- bad input


def _good():
    return qkv(1, 4, 2, 6, 8, 4)


def _call(fn_name, **changes):
    q, k, v = _good()
    kwargs = {"q": q, "k": k, "v": v, "causal": False, "block_q": 4, "block_k": 4, "scale": None}
    kwargs.update(changes)
    fn = getattr(fa, fn_name)
    if fn_name == "naive_attention":
        kwargs.pop("block_q"), kwargs.pop("block_k")
    return fn(**kwargs)


TYPE_CASES = [
    ({"block_q": 2.0}, "block_q"),
    ({"block_q": True}, "block_q"),
    ({"block_k": "4"}, "block_k"),
    ({"block_k": None}, "block_k"),
    ({"causal": 1}, "causal"),
    ({"causal": "yes"}, "causal"),
    ({"scale": "0.5"}, "scale"),
    ({"q": [[1.0]]}, "q"),
    ({"k": None}, "k"),
]
RANGE_CASES = [
    ({"block_q": 0}, "block_q"),
    ({"block_k": -3}, "block_k"),
    ({"scale": 0.0}, "scale"),
    ({"scale": float("nan")}, "scale"),
    ({"scale": float("inf")}, "scale"),
]
SHAPE_CASES = [
    ({"k": torch.randn(1, 2, 8, 5), "v": torch.randn(1, 2, 8, 5)}, "head_dim"),
    ({"k": torch.randn(1, 3, 8, 4), "v": torch.randn(1, 3, 8, 4)}, "n_kv_heads"),
    ({"q": torch.randn(4, 6, 4)}, "q"),
    ({"v": torch.randn(1, 2, 7, 4)}, "v"),
    ({"k": torch.randn(2, 2, 8, 4), "v": torch.randn(2, 2, 8, 4)}, "batch"),
    ({"k": torch.randn(1, 2, 0, 4), "v": torch.randn(1, 2, 0, 4)}, "kv_len"),
    ({"causal": True, "q": torch.randn(1, 4, 9, 4)}, "q_len"),
]
DTYPE_CASES = [
    ({"q": torch.ones(1, 4, 6, 4, dtype=torch.int64)}, "q dtype"),
    ({"k": torch.randn(1, 2, 8, 4, dtype=torch.float64)}, "k"),
    ({"v": torch.ones(1, 2, 8, 4, dtype=torch.bool)}, "v dtype"),
]
FUNCTIONS = ["flash_attention_forward", "flash_attention", "naive_attention"]


BAD_CALLS = [
    (fn_name, changes, name)
    for fn_name in FUNCTIONS
    for changes, name in TYPE_CASES + RANGE_CASES + SHAPE_CASES + DTYPE_CASES
    if fn_name != "naive_attention" or not any(key.startswith("block") for key in changes)
]


@pytest.mark.parametrize(("fn_name", "changes", "name"), BAD_CALLS)
def test_bad_input_is_refused_naming_the_argument(fn_name, changes, name):
    with pytest.raises((ValueError, TypeError), match=name):
        _call(fn_name, **changes)


def test_backward_refuses_mismatched_saved_tensors():
    q, k, v = _good()
    out, lse = flash_attention_forward(q, k, v)
    do = torch.randn_like(q)
    with pytest.raises(ValueError, match="lse"):
        flash_attention_backward(q, k, v, out, lse[:, :, :-1], do)
    with pytest.raises(ValueError, match="do"):
        flash_attention_backward(q, k, v, out, lse, do[:, :2])
    with pytest.raises((ValueError, TypeError), match="o"):
        flash_attention_backward(q, k, v, None, lse, do)
    with pytest.raises(TypeError, match="block_k"):
        flash_attention_backward(q, k, v, out, lse, do, block_k=2.5)


@settings(max_examples=25, deadline=None)
@given(
    which=st.sampled_from(["block_q", "block_k"]),
    value=st.one_of(st.integers(-100, 0), st.floats(allow_nan=True), st.booleans(), st.text()),
)
def test_bad_block_sizes_are_refused(which, value):
    with pytest.raises((ValueError, TypeError), match=which):
        _call("flash_attention_forward", **{which: value})


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: online_softmax(torch.randn(2, 3), 2), "x"),
        (lambda: online_softmax(torch.arange(4), 2), "x dtype"),
        (lambda: online_softmax(torch.randn(4), 0), "block"),
        (lambda: sliding_window_mask(4, 4, 0), "window"),
        (lambda: block_plan(0, 4, 2, 2, True), "q_len"),
        (lambda: RollingKVCache(1, 2, 0, 4), "window"),
        (lambda: RollingKVCache(1, 2.0, 4, 4), "n_kv_heads"),
        (
            lambda: RollingKVCache(1, 2, 4, 4).update(
                torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 5), 0
            ),
            "k",
        ),
        (
            lambda: RollingKVCache(1, 2, 4, 4).update(
                torch.randn(1, 2, 3, 4), torch.randn(1, 2, 2, 4), 0
            ),
            "v",
        ),
        (
            lambda: RollingKVCache(1, 2, 4, 4).update(
                torch.randn(1, 2, 3, 4).double(), torch.randn(1, 2, 3, 4).double(), 0
            ),
            "k",
        ),
        (
            lambda: RollingKVCache(1, 2, 4, 4).update(
                torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), 2
            ),
            "start_pos",
        ),
        (
            lambda: RollingKVCache(1, 2, 4, 4).update(
                torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), -1
            ),
            "start_pos",
        ),
        (lambda: naive_attention(*_good(), mask=torch.ones(6, 8)), "mask"),
        (lambda: naive_attention(*_good(), causal=True, mask=torch.ones(6, 8).bool()), "mask"),
        (lambda: fa.sdpa_attention(*qkv(1, 3, 2, 4, 4, 4)), "n_kv_heads"),
        (lambda: sliding_window_mask(5, 3, 2), "q_len"),
        (lambda: block_plan(8, 4, 2, 2, True), "q_len"),
        (lambda: block_plan(4, 4, 2, 2, 1), "causal"),
        (lambda: skipped_block_formula(64, 0), "block"),
        (lambda: hbm_traffic_bytes(64, 1.5, 8), "head_dim"),
        (lambda: hbm_traffic_bytes(64, 16, 8, bytes_per=0), "bytes_per"),
        (lambda: fa.sram_bytes(-1, 16), "block"),
        (lambda: RollingKVCache(1, 2, 4, 4, dtype=torch.int64), "dtype"),
        (lambda: peak_bytes(3, CPU), "fn"),
        (lambda: peak_bytes(lambda: None, "cpu"), "device"),
    ],
)
def test_other_entry_points_refuse_bad_input(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()


# ----------------------------------------------------------------------------- claim wording


def test_memory_claim_and_title_follow_the_numbers():
    assert fa.memory_statement(50.0, 4096)["held"]
    assert "50x smaller" in fa.memory_statement(50.0, 4096)["statement"]
    low = fa.memory_statement(5.0, 4096)
    assert not low["held"] and "did not show" in low["statement"]
    worse = fa.memory_statement(0.5, 4096)
    assert not worse["held"] and "LARGER" in worse["statement"]
    mem = {"ratio_naive_vs_flash": 0.5, "slope": {"naive": 1.0, "flash": 2.0}, "ratio_at": 512}
    assert "MORE" in fa.memory_title(mem)
    assert fa.slope_statement(2.0, 1.05)["held"]
    flat = fa.slope_statement(1.2, 1.1)
    assert not flat["held"] and "did not show" in flat["statement"]


def test_speed_claim_and_words_follow_the_numbers():
    speed = {
        "flash_vs_sdpa_time_ratio": 30.0,
        "naive_vs_sdpa_time_ratio": 0.5,
        "spread": {"flash": 0.1, "sdpa": 0.2},
        "flash_tiles": 10,
        "flash_us_per_tile": 80.0,
        "flash_aten_calls_per_tile": 31.0,
        "head_dim_8_vs_64_time_ratio": 0.9,
        "config": {"seq_len": 256},
    }
    assert fa.speed_statement(speed)["held"]
    assert "30.0x slower" in fa.speed_statement(speed)["statement"]
    assert "31 ATen calls" in fa.speed_statement(speed)["statement"]
    assert "fixed cost per call" in fa.speed_statement(speed)["statement"]
    speed["head_dim_8_vs_64_time_ratio"] = 0.2  # arithmetic dominated: the wording follows
    assert "arithmetic is a large share" in fa.speed_statement(speed)["statement"]
    assert "naive 2.0x faster than SDPA" in fa.speed_title(speed)
    speed["flash_vs_sdpa_time_ratio"] = 0.8
    contrary = fa.speed_statement(speed)
    assert not contrary["held"] and "1.2x faster" in contrary["statement"]
    speed["flash_vs_sdpa_time_ratio"] = 1.1  # inside the 20% spread: not shown
    noisy = fa.speed_statement(speed)
    assert (
        not noisy["held"] and "1.1x slower" in noisy["statement"] and "noisy" in noisy["statement"]
    )
    assert fa.times_word(1.02, "b") == "about as fast as b"
    assert fa.times_word(float("nan"), "b") == "not comparable with b"
    assert fa.times_word(0.25, "b") == "4.0x faster than b"
    assert fa.less_or_more(0.5) == "2.0x MORE" and fa.less_or_more(4) == "4.0x less"


def test_hbm_and_sweep_titles_follow_the_numbers():
    traffic = fa.hbm_traffic(4096, [64, 128], [16, 32, 64, 128, 256, 512])
    left, right = fa.hbm_titles(traffic)
    assert "2.0x MORE at blocks of 16" in left and "14.4x less at blocks of 512" in left
    assert "less the bigger its tiles" in left
    assert "head_dim 64: 128" in right  # 256 needs 288 KiB (sram_bytes), over 192
    assert fa.sram_bytes(256, 64) > 192 * 1024 >= fa.sram_bytes(128, 64)
    traffic["by_head_dim"]["64"]["ratio"] = [4.0, 2.0]
    traffic["blocks"] = [16, 32]
    assert "NOT less" in fa.hbm_titles(traffic)[0]
    speed = {
        "block_sweep": {
            "blocks": [16, 64],
            "time_ms": [9.0, 3.0],
            "fastest_block": 64,
            "aten_calls": [900, 60],
        }
    }
    assert "fastest at 64 (3.0 ms)" in fa.sweep_title(speed) and "900 at blocks of 16" in (
        fa.sweep_title(speed)
    )


def test_headline_docstring_example_runs():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(flash_attention_forward, globs={"torch": torch, **vars(fa)}):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted >= 3
    assert runner.summarize(verbose=False).failed == 0


# ----------------------------------------------------------------------------- the script


def test_quick_run_writes_its_figures_and_results(run_main):
    run = run_main(fa)
    names = sorted(p.name for p in run.pngs)
    assert names == sorted(
        f"{n}.png" for n in ("tiling", "online_softmax", "peak_memory", "hbm_traffic", "speed")
    )
    r = run.results
    assert {
        "meta",
        "equality",
        "online_softmax",
        "tiling",
        "memory",
        "hbm_traffic",
        "speed",
        "sliding_window",
        "triton",
        "claims",
    } <= r.keys()
    assert r["equality"]["max_abs_err_forward"] <= ATOL
    assert r["equality"]["max_abs_err_backward"] <= ATOL
    assert r["tiling"]["counted_equals_formula"]
    assert r["memory"]["ratio_naive_vs_flash"] > 1
    # the measured naive peak is S, P and O, byte for byte (house rule: formula beside measurement)
    assert r["memory"]["naive_equals_formula"]
    assert r["memory"]["flash_workspace_constant"]  # tiled: O + L grow, the tile workspace not
    assert r["speed"]["flash_aten_calls"] > r["speed"]["flash_tiles"]
    for c in r["claims"].values():
        assert isinstance(c["held"], bool) and c["statement"]
    assert "goal" not in run.stdout.lower() and "issue" not in run.stdout.lower()
