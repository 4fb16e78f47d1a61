"""Tests for quantization.py: NF4 byte for byte against bitsandbytes, int8 and int4 against
gpt-fast's formulas, packing, exact byte counts, GPTQ against round-to-nearest, QuantizedLinear
and the model swap, each bad-input rule, the claims' wording, and the --quick run."""

from __future__ import annotations

import doctest
import functools
import logging
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import quantization
from quantization import (
    SCHEMES,
    QuantizedLinear,
    dequantize_int4,
    dequantize_int8,
    dequantize_nf4,
    double_dequantize,
    double_quantize,
    dynamic_map_8bit,
    gap_closed,
    gptq_quantize_int4,
    nf4_codebook,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantize_nf4,
    quantized_bytes,
    tradeoff_title,
    unpack_nibbles,
)


@functools.cache
def bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return pytest.importorskip(
        "bitsandbytes.functional", reason="bitsandbytes (dev group) is not installed"
    )


def weight(out_features: int, in_features: int, seed: int = 0, dtype=torch.float32):
    """A weight with a trained-looking spread, an outlier row and column, and a zero block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    w[1, 3] = 0.5
    w[:, 5] *= 10
    w[0, :64] = 0  # an all-zero block: absmax 0
    return w.to(dtype)


SHAPES = [(64, 128), (96, 256), (17, 192)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# ----------------------------------------------------------------------------- NF4 vs bitsandbytes


def test_nf4_codebook_equals_bitsandbytes():
    ours, ref = nf4_codebook(), bnb().get_4bit_type("nf4", device="cpu")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)
    assert ours[7] == 0 and ours[0] == -1 and ours[-1] == 1  # exact zero, [-1, 1]
    assert (ours.diff() > 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nf4_packed_bytes_and_absmax_equal_bitsandbytes(shape, dtype):
    w = weight(*shape, dtype=dtype)
    packed, absmax = quantize_nf4(w, 64)
    ref, state = bnb().quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref.flatten())  # byte for byte, high nibble first
    assert torch.equal(absmax, state.absmax)
    deq = dequantize_nf4(packed, absmax, w.shape)
    # bitsandbytes returns the input's dtype: compare there
    torch.testing.assert_close(deq.to(dtype), bnb().dequantize_4bit(ref, state))


def test_nf4_block_size_other_than_64_equals_bitsandbytes():
    w = weight(32, 256)
    packed, absmax = quantize_nf4(w, 128)
    ref, state = bnb().quantize_4bit(w, blocksize=128, quant_type="nf4")
    assert torch.equal(packed, ref.flatten()) and torch.equal(absmax, state.absmax)


def test_double_quantization_against_bitsandbytes():
    """The 8-bit code is bitsandbytes' own; its CPU kernel's search is approximate near the
    midpoints (and in the dense codes near 0), so codes agree almost everywhere, and where they
    differ ours is the nearer one."""
    assert torch.equal(dynamic_map_8bit(), bnb().create_dynamic_map())
    w = weight(300, 512, seed=3)
    packed, absmax = quantize_nf4(w, 64)
    dq = double_quantize(absmax, 256)
    ref, state = bnb().quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert torch.equal(dq["absmax2"], state.absmax)
    assert (dq["codes"] == ref).float().mean() > 0.97
    code = dynamic_map_8bit()
    x = (absmax - absmax.mean()) / state.absmax.repeat_interleave(256)[: len(absmax)]
    ours_gap = (x - code[dq["codes"].long()]).abs()
    assert (ours_gap <= (x - code[ref.long()]).abs() + 1e-7).all()
    # the whole NF4 + double quant weight agrees with bitsandbytes' compressed statistics
    q2, st2 = bnb().quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, q2.flatten())
    theirs = {
        "codes": st2.absmax,
        "absmax2": st2.state2.absmax,
        "offset": st2.offset,
        "block_size": 256,
    }  # our dequantization of their codes is theirs
    ours = dequantize_nf4(q2.flatten(), double_dequantize(theirs), w.shape)
    torch.testing.assert_close(ours, bnb().dequantize_4bit(q2, st2))


def test_double_quantization_costs_0_127_bits_per_parameter():
    # QLoRA: 8 / 64 + 32 / (64 * 256) = 0.127 bits of constants per weight, down from 0.5
    n = 64 * 256 * 64
    extra = 8 * (quantized_bytes("nf4_dq", 64 * 256, 64) - n // 2) / n
    assert extra == pytest.approx(8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert 8 * (quantized_bytes("nf4", 64 * 256, 64) - n // 2) / n == 0.5


def test_double_dequantize_is_close_to_the_absmax():
    absmax = torch.rand(1000) * 0.1 + 0.01
    back = double_dequantize(double_quantize(absmax))
    assert ((back - absmax).abs() / absmax).max() < 0.05


# ----------------------------------------------------------------------------- int8 and int4


def gpt_fast_int8(x: torch.Tensor):
    """gpt-fast quantize.py dynamically_quantize_per_channel(x, -128, 127, torch.int8)."""
    eps = torch.finfo(torch.float32).eps
    min_val, max_val = torch.aminmax(x, dim=1)
    min_val_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_val_pos = torch.max(max_val, torch.zeros_like(max_val))
    max_val_pos = torch.max(-min_val_neg, max_val_pos)
    scales = max_val_pos / (float(127 - -128) / 2)
    scales = torch.clamp(scales, min=eps).to(x.dtype)
    quant = torch.clamp(torch.round(x / scales.unsqueeze(-1)), -128, 127).to(torch.int8)
    return quant, scales


def gpt_fast_int4(w: torch.Tensor, groupsize: int):
    """gpt-fast get_group_qparams + group_quantize_tensor_from_qparams (n_bit 4), in float32
    from the bf16-rounded scales and zeros."""
    to_quant = w.reshape(-1, groupsize)
    max_val, min_val = to_quant.amax(dim=1, keepdim=True), to_quant.amin(dim=1, keepdim=True)
    scales = ((max_val - min_val).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zeros = (min_val + scales.float() * 8).to(torch.bfloat16)
    lo = zeros.float() - scales.float() * 8
    q = to_quant.sub(lo).div(scales.float()).round().clamp_(0, 15).to(torch.int32).reshape_as(w)
    dq = (q.reshape(-1, groupsize) - 8) * scales.float() + zeros.float()
    return q, scales.reshape(w.shape[0], -1), zeros.reshape(w.shape[0], -1), dq.reshape_as(w)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_equals_gpt_fast(shape):
    w = weight(*shape)
    q, scale = quantize_int8(w)
    ref_q, ref_scale = gpt_fast_int8(w)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    w_hat = dequantize_int8(q, scale)
    assert ((w_hat - w).abs() <= scale[:, None] / 2 + 1e-7).all()  # half a step at most


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int4_equals_gpt_fast(shape, group_size):
    w = weight(*shape)
    q, scale, zero = quantize_int4(w, group_size)
    ref_q, ref_scale, ref_zero, ref_dq = gpt_fast_int4(w, group_size)
    assert torch.equal(q.int(), ref_q)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    assert torch.equal(dequantize_int4(q, scale, zero), ref_dq)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15


def test_int4_error_is_at_most_about_half_a_step():
    w = weight(64, 256)
    q, scale, zero = quantize_int4(w, 64)
    err = (dequantize_int4(q, scale, zero) - w).abs().reshape(-1, 64)
    # half a step, plus what the bf16 zero point's rounding moved the grid by
    assert (
        err <= scale.reshape(-1, 1).float() * 0.5 + zero.float().abs().reshape(-1, 1) / 128
    ).all()


@settings(max_examples=30, deadline=None)
@given(
    codes=st.lists(st.integers(0, 15), min_size=1, max_size=40).map(
        lambda c: c + c[:1] * (len(c) % 2)
    )
)
def test_nibbles_round_trip_high_nibble_first(codes):
    q = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.numel() == len(codes) // 2
    assert int(packed[0]) == codes[0] * 16 + codes[1]
    assert torch.equal(unpack_nibbles(packed, q.shape), q)


# ----------------------------------------------------------------------------- bytes


@settings(max_examples=25, deadline=None)
@given(
    out_features=st.integers(1, 40),
    groups=st.integers(1, 6),
    scheme=st.sampled_from(SCHEMES),
)
def test_measured_bytes_equal_the_formula(out_features, groups, scheme):
    lin = nn.Linear(64 * groups, out_features, bias=False)
    q = QuantizedLinear.from_linear(lin, scheme)
    assert q.nbytes == quantized_bytes(scheme, out_features, 64 * groups)
    assert q.bits_per_param == 8 * q.nbytes / (out_features * 64 * groups)


def test_bits_per_parameter_of_each_scheme():
    n_out, n_in = 256 * 4, 256  # 4096 blocks of 64: double quant blocks fill exactly
    bits = {s: 8 * quantized_bytes(s, n_out, n_in) / (n_out * n_in) for s in SCHEMES}
    assert bits["int4"] == bits["nf4"] == 4.5
    assert bits["int8"] == pytest.approx(8 + 32 / n_in)
    # QLoRA's 4 + 8 / 64 + 32 / (64 * 256), plus the float32 offset c once per tensor
    assert bits["nf4_dq"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / (n_out * n_in))


# ----------------------------------------------------------------------------- GPTQ


def correlated_layer(seed: int, out_features: int = 48, in_features: int = 128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    x = torch.randn(1024, in_features, generator=g) @ torch.randn(
        in_features, in_features, generator=g
    )
    return w, x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_reduces_layer_output_error_against_rtn(seed):
    w, x = correlated_layer(seed)
    hessian = x.T @ x / len(x)
    rtn = dequantize_int4(*quantize_int4(w, 64))
    gptq = dequantize_int4(*gptq_quantize_int4(w, hessian, 64))
    err_rtn = (x @ (rtn - w).T).norm()
    err_gptq = (x @ (gptq - w).T).norm()
    assert err_gptq < 0.8 * err_rtn


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    """Uncorrelated inputs: H^-1 is diagonal, no error is passed on, GPTQ rounds to nearest."""
    w = weight(32, 128)
    q, scale, zero = gptq_quantize_int4(w, torch.diag(torch.rand(128) + 0.5), 64)
    ref = quantize_int4(w, 64)
    assert torch.equal(q, ref[0]) and torch.equal(scale, ref[1]) and torch.equal(zero, ref[2])


def test_gptq_handles_dead_inputs():
    w, x = correlated_layer(0)
    x[:, 7] = 0
    q, scale, zero = gptq_quantize_int4(w, x.T @ x / len(x), 64)
    assert torch.isfinite(dequantize_int4(q, scale, zero)).all()


# ----------------------------------------------------------------------------- QuantizedLinear


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_linear_forward_is_linear_with_the_dequantized_weight(scheme):
    lin = nn.Linear(128, 40)
    q = QuantizedLinear.from_linear(lin, scheme)
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantize(), lin.bias))
    assert q(x).shape == (3, 5, 40)
    assert q(torch.randn(0, 128)).shape == (0, 40)  # an empty batch gives an empty result
    rel = (q.dequantize() - lin.weight).norm() / lin.weight.norm()
    assert rel < {"int8": 0.01, "int4": 0.15, "nf4": 0.15, "nf4_dq": 0.15}[scheme]


def test_quantize_model_swaps_every_linear_but_the_head():
    model = nn.ModuleDict(
        {
            "block": nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)),
            "lm_head": nn.Linear(64, 10),
        }
    )
    q = quantize_model(model, "nf4")
    assert isinstance(q["block"][0], QuantizedLinear) and isinstance(q["block"][2], QuantizedLinear)
    assert isinstance(q["lm_head"], nn.Linear)
    assert isinstance(model["block"][0], nn.Linear)  # the original is left alone


def test_doctest_in_the_headline_class():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(QuantizedLinear, "QuantizedLinear", globs=vars(quantization)):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted > 0
    assert runner.summarize(verbose=False).failed == 0


# ----------------------------------------------------------------------------- bad input

W = torch.randn(8, 128)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: quantize_int4(W, 48), "group_size"),  # does not divide 128
        (lambda: quantize_int4(W, 0), "group_size"),
        (lambda: quantize_int4(W, -64), "group_size"),
        (lambda: quantize_int4(W, 64.0), "group_size"),
        (lambda: quantize_int4(W, True), "group_size"),
        (lambda: quantize_nf4(W, 0), "block_size"),
        (lambda: quantize_nf4(W, 96), "block_size"),
        (lambda: quantize_nf4(W, None), "block_size"),
        (lambda: double_quantize(torch.rand(10), 0), "block_size"),
        (lambda: gptq_quantize_int4(W, torch.eye(128), 0), "group_size"),
        (lambda: quantized_bytes("nf4", 0, 64), "out_features"),
        (lambda: quantized_bytes("nf4", 8, 64, 0), "block_size"),
    ],
)
def test_size_and_divisibility_rules(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()


@pytest.mark.parametrize(
    "bad",
    [
        torch.randn(128),
        torch.randn(2, 8, 128),
        torch.randn(8, 128, dtype=torch.float64),
        torch.randint(0, 5, (8, 128)),
        torch.full((8, 128), float("nan")),
        W.tolist(),
    ],
    ids=["1-D", "3-D", "float64", "int64", "nan", "list"],
)
@pytest.mark.parametrize("fn", [quantize_int8, quantize_int4, quantize_nf4])
def test_weight_rank_dtype_and_type_rules(fn, bad):
    with pytest.raises((ValueError, TypeError), match="w"):
        fn(bad)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: gptq_quantize_int4(W, torch.eye(64)), "hessian"),
        (lambda: gptq_quantize_int4(W, torch.eye(128, dtype=torch.int64)), "hessian"),
        (lambda: QuantizedLinear.from_linear(nn.Linear(128, 8), "int3"), "scheme"),
        (lambda: QuantizedLinear.from_linear(W, "nf4"), "linear"),
        (
            lambda: QuantizedLinear.from_linear(nn.Linear(128, 8), "nf4", hessian=torch.eye(128)),
            "hessian",
        ),
        (lambda: quantize_model(nn.Linear(128, 8), "fp8"), "scheme"),
        (lambda: quantized_bytes("int2", 8, 64), "scheme"),
        (lambda: pack_nibbles(torch.tensor([1, 2, 3], dtype=torch.uint8)), "q"),
        (lambda: pack_nibbles(torch.tensor([16, 2], dtype=torch.uint8)), "q"),
        (lambda: pack_nibbles(torch.tensor([1, 2])), "q"),
        (lambda: dequantize_int8(torch.zeros(2, 2), torch.ones(2)), "q"),
        (lambda: unpack_nibbles(torch.zeros(4), (8,)), "packed"),
        (lambda: unpack_nibbles(torch.zeros(4, dtype=torch.uint8), (9,)), "packed"),
        (lambda: dequantize_int8(torch.zeros(2, 2, dtype=torch.int8), torch.ones(3)), "scale"),
        (
            lambda: dequantize_int4(
                torch.zeros(2, 64, dtype=torch.uint8), torch.ones(2, 3), torch.ones(2, 3)
            ),
            "scale",
        ),
        (
            lambda: dequantize_nf4(torch.zeros(32, dtype=torch.uint8), torch.ones(3), (8, 8)),
            "absmax",
        ),
        (lambda: double_quantize(torch.rand(2, 10)), "absmax"),
        (lambda: double_quantize(torch.rand(0)), "absmax"),
        (lambda: double_dequantize({"codes": torch.zeros(3)}), "dq"),
        (lambda: gptq_quantize_int4(W, torch.eye(128), damp=-1.0), "damp"),
        (lambda: gptq_quantize_int4(W, -torch.eye(128)), "hessian"),
        (lambda: gptq_quantize_int4(W, torch.full((128, 128), float("nan"))), "hessian"),
        (lambda: QuantizedLinear({}, "nf4", (8, 128)), "weights"),
        (lambda: QuantizedLinear.from_linear(nn.Linear(128, 8), "nf4")(torch.randn(2, 64)), "x"),
        (
            lambda: QuantizedLinear.from_linear(nn.Linear(128, 8), "int8")(
                torch.ones(2, 128).long()
            ),
            "x",
        ),
        (lambda: quantize_model("model", "nf4"), "model"),
        (lambda: quantize_model(nn.Sequential(nn.Linear(128, 8)), "int4", {}), "hessians"),
        (lambda: quantized_bytes("nf4", 8, 64, 48), "block_size"),
        (lambda: quantization.DynamicInt8Linear(W), "linear"),
        (lambda: quantization.calibrate(nn.Linear(4, 4), torch.randn(2, 4)), "ids"),
    ],
)
def test_contract_rules(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()


@settings(max_examples=30, deadline=None)
@given(size=st.one_of(st.integers(-5, 0), st.floats(allow_nan=True), st.booleans(), st.none()))
def test_any_bad_group_size_is_refused(size):
    with pytest.raises((ValueError, TypeError), match="group_size"):
        quantize_int4(W, size)


# ----------------------------------------------------------------------------- claims


def table(ppl: dict) -> dict:
    bits = {"fp32": 32, "bf16": 16, "int8": 8.4, "int4": 4.5, "int4_gptq": 4.5, "int4_pc": 4.2}
    bits.update({"int4_pc_gptq": 4.2, "nf4": 4.5, "nf4_dq": 4.13})
    return {k: {"perplexity": v, "linear_bits_per_param": bits[k]} for k, v in ppl.items()}


USUAL = {"fp32": 10.0, "bf16": 10.0, "int8": 10.01, "int4": 11.0, "int4_gptq": 10.3}
USUAL.update({"int4_pc": 12.0, "int4_pc_gptq": 10.5, "nf4": 10.5, "nf4_dq": 10.52})


def gaps(ppl: dict = USUAL, stderr: float = 0.001) -> dict:
    """Paired loss gaps to fp32 as the perplexities imply, each with ``stderr``."""
    return {k: {"loss_gap": math.log(v / ppl["fp32"]), "stderr": stderr} for k, v in ppl.items()}


@pytest.mark.parametrize("pair", ["group64", "per_channel"])
def test_gap_closed_and_the_gptq_wording_follow_the_numbers(pair):
    rtn, gptq = quantization.GPTQ_PAIRS[pair]
    ppl = {**USUAL, rtn: 11.0, gptq: 10.3}
    assert gap_closed(ppl, rtn, gptq) == pytest.approx(0.7)
    assert math.isnan(gap_closed({**ppl, rtn: 9.9}, rtn, gptq))
    text, held, short = quantization.gptq_sentence(table(ppl), gaps(ppl), pair)
    assert held and "closes 70%" in text and short in tradeoff_title(table(ppl), gaps(ppl))
    worse = {**ppl, gptq: 10.8}
    text, held, _ = quantization.gptq_sentence(table(worse), gaps(worse), pair)
    assert not held and "closes only 20%" in text
    worse = {**ppl, gptq: 11.5}
    text, held, _ = quantization.gptq_sentence(table(worse), gaps(worse), pair)
    assert not held and "did not beat" in text
    # a gap within 2 standard errors is noise, however much GPTQ "closed" of it
    noise = gaps(ppl, stderr=0.1)
    text, held, short = quantization.gptq_sentence(table(ppl), noise, pair)
    assert not held and "cannot show" in text and short in tradeoff_title(table(ppl), noise)


def results_for(ppl: dict, wo=(0.5, 0.4, 0.6), dyn=(2.0, 1.5, 2.5), gptq_err=0.04) -> dict:
    spread = lambda m, lo, hi: {"median": m, "min": lo, "max": hi}  # noqa: E731
    row = {"measured": 100, "formula": 100, "bits_per_param": 4.5}
    return {
        "parity": {
            "layers": 2,
            "nf4_packed_bytes_identical": 2,
            "nf4_absmax_identical": 2,
            "nf4_codebook_max_err": 0.0,
        },
        "bytes": {
            "int8": row,
            "int4": row,
            "nf4": row,
            "nf4_dq": {**row, "bits_per_param": 4.127},
            "all_equal": True,
        },
        "table": table(ppl),
        "loss_gaps": gaps(ppl),
        "gptq_random": {
            "shape": [8, 64],
            "output_rel_err_rtn": 0.09,
            "output_rel_err_gptq": gptq_err,
        },
        "linear_speed": {
            "batches": [1, 64],
            "batch_1": {"speedup_vs_fp32": {"int8": spread(*wo)}},
            "batch_64": {"speedup_vs_fp32": {"int8_dynamic": spread(*dyn)}},
        },
    }


def test_claims_hold_on_the_usual_numbers():
    claims = quantization.quantization_claims(results_for(USUAL))
    assert all(c["held"] for c in claims.values()), claims


def test_claims_wording_follows_contrary_numbers():
    claims = quantization.quantization_claims(
        results_for(
            {**USUAL, "int4_gptq": 10.8, "int4_pc_gptq": 11.9},
            wo=(1.1, 0.9, 1.3),
            dyn=(1.1, 0.8, 1.4),
            gptq_err=0.2,
        )
    )
    assert not any(
        c["held"] for k, c in claims.items() if k not in ("nf4_bit_exact", "bytes_match_formula")
    )
    assert "closes only 20%" in claims["gptq_closes_half_the_gap_group64"]["statement"]
    assert "closes only 5%" in claims["gptq_closes_half_the_gap_per_channel"]["statement"]
    assert "not smaller" in claims["gptq_beats_rtn_on_random"]["statement"]
    assert "did not show it clearly slower" in claims["weight_only_int8_slower_here"]["statement"]
    assert "did not show it faster" in claims["dynamic_int8_faster"]["statement"]
    claims = quantization.quantization_claims(results_for({**USUAL, "int4": 10.001}))
    assert "cannot show" in claims["gptq_closes_half_the_gap_group64"]["statement"]


# ----------------------------------------------------------------------------- on a Llama


@functools.cache
def tiny_llama():
    """A random-weight Llama of training.py (2 layers, 64 wide): the model-level checks need
    its structure, not its training."""
    import training

    cfg = training.ModelConfig(
        vocab_size=97,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        max_seq_len=32,
    )
    torch.manual_seed(0)
    return training.Llama(cfg).eval()


IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_llama_keeps_its_logits_and_generates(scheme):
    model = tiny_llama()
    q = quantize_model(model, scheme)
    swapped = [n for n, m in q.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(swapped) == 7 * model.config.n_layers  # q k v o gate up down
    assert isinstance(q.lm_head, nn.Linear)
    with torch.no_grad():
        ref, out = model(IDS), q(IDS)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < {"int8": 0.01, "int4": 0.2, "nf4": 0.2, "nf4_dq": 0.2}[scheme]
    assert q.generate(IDS[:, :4], max_new_tokens=3).shape == (2, 7)  # through the KV cache


def test_calibration_gives_each_linear_a_hessian_and_gptq_helps_the_model():
    model = tiny_llama()
    calib = quantization.calibrate(model, IDS)
    assert len(calib) == 7 * model.config.n_layers
    for name, s in calib.items():
        n = model.get_submodule(name).in_features
        assert s["hessian"].shape == (n, n) and s["act_absmax"].shape == (n,)
        torch.testing.assert_close(s["hessian"], s["hessian"].T)
        assert torch.linalg.eigvalsh(s["hessian"].double()).min() > -1e-6  # X^T X / n is PSD
    hessians = {n: s["hessian"] for n, s in calib.items()}
    with torch.no_grad():
        ref = model(IDS)
        err = {
            "rtn": (quantize_model(model, "int4")(IDS) - ref).norm(),
            "gptq": (quantize_model(model, "int4", hessians)(IDS) - ref).norm(),
        }
    assert err["gptq"] < err["rtn"]  # on the calibration text itself


def test_model_bytes_count_a_tied_weight_once():
    model = tiny_llama()
    b = quantization.model_weight_bytes(model)
    params = {p.data_ptr(): p.numel() * 4 for p in model.parameters()}
    buffers = sum(t.numel() * t.element_size() for t in model.buffers() if t.is_floating_point())
    assert b["total"] == sum(params.values()) + buffers
    q = quantize_model(model, "nf4")
    assert quantization.model_weight_bytes(q)["quantized"] == sum(
        quantized_bytes("nf4", *m.shape) for m in q.modules() if isinstance(m, QuantizedLinear)
    )


def test_dynamic_int8_linear_is_close_to_fp32():
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(5, 64)
    y = quantization.DynamicInt8Linear(lin)(x)
    assert ((y - lin(x)).norm() / lin(x).norm()).item() < 0.02


# ----------------------------------------------------------------------------- the script


@pytest.mark.parametrize(
    "argv, flag", [(["--model", "/nonexistent"], "--model"), (["--seed", "-1"], "--seed")]
)
def test_bad_flags_exit_with_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quantization.parse_args(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_quick_run_writes_the_table_parities_and_figures(run_main):
    run = run_main(quantization)
    r = run.results
    assert set(r["table"]) == {"fp32", "bf16", *quantization.QUANTIZED_ROWS}
    for row in r["table"].values():
        assert row["perplexity"] > 1 and 0 < row["bits_per_byte"] and row["model_bytes"] > 0
    assert r["bytes"]["all_equal"]
    assert r["parity"]["nf4_packed_bytes_identical"] == r["parity"]["layers"]
    assert r["parity"]["nf4_absmax_identical"] == r["parity"]["layers"]
    assert r["parity"]["int4_equal_gpt_fast_formula"] == r["parity"]["layers"]
    assert "training.train" in r["model"]["source"]
    assert {"decode", "linear_speed", "outliers", "layer_error", "gptq_random"} <= r.keys()
    assert set(r["claims"]) >= {
        "gptq_closes_half_the_gap_per_channel",
        "nf4_bit_exact",
        "dynamic_int8_faster",
    }
    names = {p.name for p in run.pngs}
    assert names == {
        f"{n}.png" for n in ("codebook", "error_histograms", "tradeoff", "layer_error", "outliers")
    }
    assert "[7/7] drawing figures ..." in run.stdout
