"""Tests for swiglu.py: every claim the script prints, the HF reference, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import swiglu
from swiglu import (
    GATED,
    UNGATED,
    FeedForward,
    GatedFeedForward,
    PairTask,
    ResidualFFNStack,
    SwiGLUFeedForward,
    ffn_matmul_flops_per_token,
    ffn_param_count,
    llama_hidden_dim,
    make_ffn,
    matched_hidden_dim,
    swish,
)

ATOL = 1e-5  # float32 comparisons


# --- the reference: transformers' LlamaMLP --------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_equals_transformers_llama_mlp(bias):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    d_model, hidden = 64, 176
    config = transformers.LlamaConfig(
        hidden_size=d_model,
        intermediate_size=hidden,
        hidden_act="silu",
        mlp_bias=bias,
        num_attention_heads=4,
        num_hidden_layers=1,
    )
    ref = LlamaMLP(config).eval()
    ours = SwiGLUFeedForward(d_model, hidden_dim=hidden, bias=bias)
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names, same shapes
    x = torch.randn(2, 7, d_model)  # (batch, seq_len, d_model)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=0)


def test_llama_sized_swiglu_loads_into_llama_mlp():
    """The Llama rule's size is HF's intermediate_size: a 'Llama-style' d=96 layer round-trips."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    ours = SwiGLUFeedForward(96, multiple_of=32)  # int(2/3 * 384) = 256 -> 256
    assert ours.hidden_dim == llama_hidden_dim(96, 32) == 256
    config = transformers.LlamaConfig(
        hidden_size=96, intermediate_size=ours.hidden_dim, num_attention_heads=4
    )
    ref = LlamaMLP(config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), atol=ATOL, rtol=0)


# --- Llama's hidden-size rule -----------------------------------------------------------------

# (dim, multiple_of, ffn_dim_multiplier) from each checkpoint's params.json and the published
# intermediate_size: Llama-2-7B, Llama-3-8B, Llama-2-70B / Llama-3-70B.
PUBLISHED = [(4096, 256, None, 11008), (4096, 1024, 1.3, 14336), (8192, 4096, 1.3, 28672)]


@pytest.mark.parametrize(("d_model", "multiple_of", "multiplier", "published"), PUBLISHED)
def test_llama_hidden_dim_reproduces_published_sizes(d_model, multiple_of, multiplier, published):
    assert llama_hidden_dim(d_model, multiple_of, multiplier) == published


def test_llama_sizes_report_matches_published():
    rows = swiglu.llama_sizes()
    assert all(r["matches_published"] for r in rows.values())
    # Llama-2-7B pays 11008 / (8/3 * 4096) - 1 = 0.78 % more than exact 8/3 d for the rounding.
    assert rows["Llama-2-7B"]["params_ratio_to_relu_4d"] == pytest.approx(3 * 11008 / (8 * 4096))


def test_swiglu_default_hidden_dim_follows_llama_rule():
    with torch.device("meta"):  # no memory for a 4096 x 11008 layer
        layer = SwiGLUFeedForward(4096)
    assert layer.hidden_dim == 11008
    assert layer.gate_proj.weight.shape == (11008, 4096)
    assert layer.down_proj.weight.shape == (4096, 11008)


@settings(max_examples=25, deadline=None)
@given(
    d_model=st.integers(1, 10_000),
    multiple_of=st.sampled_from([1, 8, 64, 256, 1024]),
    multiplier=st.one_of(st.none(), st.floats(0.5, 2.0)),
)
def test_llama_hidden_dim_is_smallest_multiple_at_least_the_scaled_two_thirds(
    d_model, multiple_of, multiplier
):
    hidden = llama_hidden_dim(d_model, multiple_of, multiplier)
    target = int(8 * d_model / 3)
    if multiplier is not None:
        target = int(multiplier * target)
    assert hidden % multiple_of == 0
    assert target <= hidden < target + multiple_of


# --- parameters and FLOPs ---------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("variant", ["relu", "swiglu"])  # the two classes; variants share them
def test_param_count_matches_formula(variant, bias):
    d_model, hidden = 12, 20
    ffn = make_ffn(variant, d_model, hidden, bias=bias)
    n_params = sum(p.numel() for p in ffn.parameters())
    assert n_params == ffn_param_count(d_model, hidden, variant in GATED, bias)


def test_swiglu_param_count_matches_formula():
    ffn = SwiGLUFeedForward(24, hidden_dim=40, bias=True)
    assert sum(p.numel() for p in ffn.parameters()) == 3 * 24 * 40 + 2 * 40 + 24


def test_matched_hidden_dim_matches_params_within_rounding():
    """3 d h_g vs 2 d (4 d): rounding 8/3 d moves 3 h_g by at most 1, so |ratio - 1| <= 1/(8 d),
    and the match is exact when 3 divides d (every residue of d mod 3, many times over)."""
    for d_model in range(1, 200):
        ungated = ffn_param_count(d_model, matched_hidden_dim(d_model, "relu"), gated=False)
        gated = ffn_param_count(d_model, matched_hidden_dim(d_model, "swiglu"), gated=True)
        assert abs(gated / ungated - 1) <= 1 / (8 * d_model) + 1e-12, d_model
        assert (gated == ungated) == (d_model % 3 == 0), d_model


@pytest.mark.parametrize("variant", ["relu", "swiglu"])
def test_matmul_flops_formula_matches_flop_counter(variant):
    from torch.utils.flop_counter import FlopCounterMode

    d_model, hidden, n_tokens = 12, 32, 10
    ffn = make_ffn(variant, d_model, hidden)
    x = torch.randn(1, n_tokens, d_model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ffn(x)
    expected = ffn_matmul_flops_per_token(d_model, hidden, variant in GATED) * n_tokens
    assert counter.get_total_flops() == expected
    assert swiglu.measured_matmul_flops(ffn, x) == expected


# --- activations ------------------------------------------------------------------------------


def test_swish_definition_and_limits():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(swish(x), F.silu(x))  # beta = 1 is SiLU
    torch.testing.assert_close(swish(x, 1.0), x * torch.sigmoid(x))
    torch.testing.assert_close(swish(x, 0.0), x / 2)  # beta = 0: linear
    # beta -> infinity: ReLU; the gap max|x sigmoid(bx) - relu(x)| shrinks like 1/b.
    gaps = [float((swish(x, b) - F.relu(x)).abs().max()) for b in (5.0, 50.0, 500.0)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


def test_check_activations_errors_are_rounding_only():
    act = swiglu.check_activations(n_points=2001)
    for key, value in act.items():
        if key.endswith("max_abs_err") and "beta20" not in key:
            assert value < 1e-12, key
    assert act["swish_beta20_vs_relu_max_abs_err"] < 0.02


def test_silu_minimum_is_where_derivative_vanishes_and_equals_x_plus_one():
    x_star, value = swiglu.swish_minimum()
    x = torch.tensor(x_star, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(F.silu(x), x)
    assert abs(float(grad)) < 1e-10
    assert value == pytest.approx(x_star + 1, abs=1e-10)
    assert value == pytest.approx(float(F.silu(torch.tensor(x_star, dtype=torch.float64))))
    grid = torch.linspace(-5, 5, 100001, dtype=torch.float64)
    assert float(F.silu(grid).min()) >= value - 1e-12


# --- the gated family and the classic FFN ------------------------------------------------------


def _gate(variant: str, a: torch.Tensor) -> torch.Tensor:
    """The gates of Shazeer 2020, eqs. 4-5, from the definitions (not the module's kernels)."""
    if variant == "glu":
        return 1 / (1 + torch.exp(-a))
    if variant == "bilinear":
        return a
    if variant == "reglu":
        return a.clamp_min(0)
    if variant == "geglu":
        return a * 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    if variant == "swiglu":
        return a / (1 + torch.exp(-a))
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", GATED)
def test_gated_variant_matches_its_definition(variant):
    ffn = GatedFeedForward(16, 24, variant)
    x = torch.randn(2, 5, 16)
    W, V, W2 = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    expected = (_gate(variant, x @ W.T) * (x @ V.T)) @ W2.T  # (sigma(xW) * xV) W2, etc.
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), expected, atol=ATOL, rtol=0)


def test_check_gated_variants_reports_rounding_only():
    res = swiglu.check_gated_variants()
    assert set(res["variant_vs_formula_max_abs_err"]) == set(GATED)
    assert max(res["variant_vs_formula_max_abs_err"].values()) < 1e-12
    assert res["swiglu_ffn_vs_gated_family_max_abs_err"] < 1e-12


@pytest.mark.parametrize(
    ("activation", "fn"),
    [
        ("relu", lambda a: a.clamp_min(0)),
        ("gelu", lambda a: a * 0.5 * (1 + torch.erf(a / math.sqrt(2)))),
        ("silu", lambda a: a / (1 + torch.exp(-a))),
    ],
)
def test_feed_forward_matches_its_definition(activation, fn):
    ffn = FeedForward(16, 64, activation, bias=True)
    x = torch.randn(3, 4, 16)
    h = fn(x @ ffn.up_proj.weight.T + ffn.up_proj.bias)
    expected = h @ ffn.down_proj.weight.T + ffn.down_proj.bias
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), expected, atol=ATOL, rtol=0)


# --- the task, gradient flow, dead units ------------------------------------------------------


class _Oracle(nn.Module):
    """Outputs the true log-probabilities of the table: its expected loss is the entropy."""

    def __init__(self, task: PairTask) -> None:
        super().__init__()
        self.task = task

    def forward(self, context):
        index = context[:, 0] * self.task.vocab_size + context[:, 1]
        return self.task.probs[index].log()


def test_pair_task_floor_is_the_oracle_loss_and_a_lower_bound():
    task = PairTask(8, context_len=2, seed=3)
    assert task.contexts.shape == (64, 2)
    torch.testing.assert_close(task.probs.sum(-1), torch.ones(64))
    assert task.expected_loss(_Oracle(task), "cpu") == pytest.approx(task.entropy_floor, abs=1e-6)
    model = ResidualFFNStack("relu", 8, 2, 12, 1)  # any model is above the floor (Gibbs)
    assert task.expected_loss(model, "cpu") > task.entropy_floor
    # Sampled next tokens follow the table: their marginal is the table's mean row.
    g = torch.Generator().manual_seed(0)
    ctx, y = task.sample(20000, g)
    assert ctx.shape == (20000, 2) and y.shape == (20000,)
    empirical = torch.bincount(y, minlength=8).float() / len(y)
    torch.testing.assert_close(empirical, task.probs.mean(0), atol=0.015, rtol=0)


def test_gradient_flow_returns_one_finite_norm_per_layer():
    task = PairTask(8, seed=0)
    res = swiglu.gradient_flow("swiglu", task, 12, 5, 2, 1e-2, 32, 0, "cpu")
    for stage in ("init", "trained"):
        norms = res[f"grad_norm_{stage}"]
        assert len(norms) == 5
        assert all(math.isfinite(n) and n > 0 for n in norms)
        assert 0 <= res[f"dead_unit_fraction_{stage}"] <= 1
    assert res["zero_derivative_fraction_init"] == 0.0  # SiLU' vanishes only at one point
    # Pre-norm: each FFN sees a unit-RMS input and the residual passes dL/dh unchanged, so at
    # init every layer gets a gradient of the same size.
    assert 0.5 < res["first_over_last_layer_grad_norm_init"] < 2.0
    norms = res["grad_norm_init"]
    assert res["max_over_min_layer_grad_norm_init"] == pytest.approx(max(norms) / min(norms))
    assert res["max_over_min_layer_grad_norm_init"] < 2.0


def test_relu_zero_derivative_fraction_is_about_half_at_init():
    """Symmetric pre-activations without bias: ReLU'(a) = 0 for about half of (token, unit)."""
    task = PairTask(8, seed=0)
    relu = swiglu.gradient_flow("relu", task, 24, 3, 0, 1e-2, 32, 0, "cpu")
    assert 0.35 < relu["zero_derivative_fraction_init"] < 0.65
    gelu = swiglu.gradient_flow("gelu", task, 24, 3, 0, 1e-2, 32, 0, "cpu")
    assert gelu["zero_derivative_fraction_init"] == 0.0


def test_unit_stats_counts_a_unit_that_is_off_for_every_input():
    task = PairTask(8, seed=0)
    model = ResidualFFNStack("relu", 8, 2, 12, 1)
    with torch.no_grad():
        model.layers[0].up_proj.weight[3] = -10 * model.layers[0].up_proj.weight[3].abs()
        model.layers[0].up_proj.weight[5] = 0.0  # pre-activation 0, ReLU'(0) = 0 in PyTorch
    # Unit 3 is negative for every input only if its inputs are positive: make them so.
    with torch.no_grad():
        model.embed.weight.abs_()
        model.norms[0].weight.abs_()
    swiglu.population_backward(model, task, "cpu")
    dead, zero = swiglu._unit_stats(model)
    grad_rows = model.layers[0].up_proj.weight.grad
    n_dead = int((grad_rows == 0).all(dim=1).sum())
    assert n_dead >= 2 and grad_rows[3].abs().sum() == 0 and grad_rows[5].abs().sum() == 0
    assert dead == pytest.approx(n_dead / 48)
    assert zero > 0


def test_short_training_lowers_the_loss_and_statistics_are_consistent():
    threads = torch.get_num_threads()
    res = swiglu.training_comparison(12, 1, 6, 20, 1e-2, 32, [0, 1], 10, "cpu")
    assert torch.get_num_threads() == threads  # the single-thread block restores the setting
    for variant, r in res["variants"].items():
        finals = np.array(r["final_losses"])
        assert r["final_loss_mean"] == pytest.approx(finals.mean())
        assert r["final_loss_std"] == pytest.approx(finals.std(ddof=1))  # sample std
        assert min(min(r["curve_mean"]), finals.min()) >= res["task"]["entropy_floor_nats"]
        if variant != "none":
            assert r["curve_mean"][-1] < r["curve_mean"][0]  # it learns
            assert r["ffn_params"] == res["variants"]["relu"]["ffn_params"]  # 12 % 3 == 0
    means = [res["variants"][v]["final_loss_mean"] for v in res["ranking"]]
    assert means == sorted(means)
    assert res["eval_steps"] == [0, 10, 20]


def test_every_seed_criterion_and_its_chance_level():
    """Complete separation of n vs n seeds happens by chance with probability 1 / C(2n, n):
    count it over all orderings of 2n exchangeable losses."""
    import itertools

    n = 3
    hits = sum(max(order[:n]) < min(order[n:]) for order in itertools.permutations(range(2 * n)))
    assert hits / math.factorial(2 * n) == pytest.approx(1 / math.comb(2 * n, n)) == 0.05
    res = swiglu.training_comparison(12, 1, 6, 4, 1e-2, 16, [0, 1, 2], 2, "cpu")
    assert res["chance_of_every_seed_if_no_difference"] == pytest.approx(0.05)
    relu = res["variants"]["relu"]["final_losses"]
    for variant in UNGATED[1:] + GATED:
        separated = max(res["variants"][variant]["final_losses"]) < min(relu)
        assert (variant in res["better_than_relu_on_every_seed"]) == separated
        finals = np.array(res["variants"][variant]["final_losses"])
        assert res["variants"][variant]["final_loss_std"] == pytest.approx(finals.std(ddof=1))


# --- bad input: one test per rule family, each naming the argument ----------------------------

_SIZE_BUILDERS = {  # every public entry point that takes a size, with the size as `v`
    "d_model": [
        lambda v: FeedForward(v, 32),
        lambda v: GatedFeedForward(v, 32),
        lambda v: SwiGLUFeedForward(v),
        lambda v: SwiGLUFeedForward(v, hidden_dim=16),
        lambda v: llama_hidden_dim(v),
        lambda v: matched_hidden_dim(v, "relu"),
        lambda v: make_ffn("swiglu", v),
        lambda v: ffn_param_count(v, 8, True),
        lambda v: ResidualFFNStack("relu", 8, 2, v, 1),
    ],
    "hidden_dim": [
        lambda v: FeedForward(8, v),
        lambda v: GatedFeedForward(8, v),
        lambda v: SwiGLUFeedForward(8, hidden_dim=v),
        lambda v: ffn_matmul_flops_per_token(8, v, False),
    ],
    "multiple_of": [lambda v: llama_hidden_dim(64, v), lambda v: SwiGLUFeedForward(64, None, v)],
    "ungated_factor": [lambda v: matched_hidden_dim(8, "swiglu", v)],
    "vocab_size": [lambda v: PairTask(v), lambda v: ResidualFFNStack("relu", v, 2, 12, 1)],
    "context_len": [lambda v: PairTask(8, v), lambda v: ResidualFFNStack("relu", 8, v, 12, 1)],
    "n_tokens": [lambda v: swiglu.check_gated_variants(8, 8, v)],
    "rounds": [lambda v: swiglu.param_matched_table(6, 4, "cpu", 0.001, v, ("relu",))],
    "eval_every": [lambda v: swiglu.training_comparison(6, 1, 4, 2, 1e-2, 8, [0], v, "cpu")],
}
_SIZE_CASES = [(name, build) for name, builds in _SIZE_BUILDERS.items() for build in builds]
_NOT_INTS = [2.0, True, "8", None]


_TYPE_CASES = [
    (name, build, bad)
    for name, build in _SIZE_CASES
    for bad in _NOT_INTS
    if not (bad is None and build is _SIZE_BUILDERS["hidden_dim"][2])  # None: Llama's rule
]


@pytest.mark.parametrize(("name", "build", "bad"), _TYPE_CASES)
def test_types_a_size_that_is_not_an_int_is_refused(name, build, bad):
    with pytest.raises(TypeError, match=rf"{name} \({bad!r}\) must be an int"):
        build(bad)


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("activation", lambda: FeedForward(8, 32, 3)),
        ("variant", lambda: GatedFeedForward(8, 32, ["swiglu"])),
        ("bias", lambda: FeedForward(8, 32, "relu", "yes")),
        ("bias", lambda: SwiGLUFeedForward(8, 16, bias=1)),
        ("gated", lambda: ffn_param_count(8, 8, None)),
        ("ffn_dim_multiplier", lambda: llama_hidden_dim(64, 8, "1.3")),
        ("ffn_dim_multiplier", lambda: SwiGLUFeedForward(64, ffn_dim_multiplier=True)),
        ("eps", lambda: swiglu.RMSNorm(8, "1e-6")),
        ("temperature", lambda: PairTask(8, 2, None)),
        ("seed", lambda: PairTask(8, 2, 2.0, 1.5)),
        ("beta", lambda: swish(torch.randn(3), "1")),
        ("x", lambda: swish([1.0, 2.0])),
        ("x", lambda: SwiGLUFeedForward(8, 16)([[1.0] * 8])),
        ("x", lambda: ResidualFFNStack("relu", 8, 2, 12, 1)([[0, 1]])),
        ("generator", lambda: PairTask(8).sample(4, None)),
        ("model", lambda: PairTask(8).expected_loss("x", "cpu")),
        ("task", lambda: swiglu.gradient_flow("relu", "x", 6, 2, 1, 1e-2, 8, 0, "cpu")),
        ("steps", lambda: swiglu.gradient_flow("relu", PairTask(4), 6, 2, 2.5, 1e-2, 8, 0, "cpu")),
        ("seeds", lambda: swiglu.training_comparison(6, 1, 4, 2, 1e-2, 8, None, 1, "cpu")),
        ("seeds", lambda: swiglu.training_comparison(6, 1, 4, 2, 1e-2, 8, [True], 1, "cpu")),
        ("device", lambda: swiglu.param_matched_table(6, 4, 0, 0.001, 1, ("relu",))),
        ("variants", lambda: swiglu.param_matched_table(6, 4, "cpu", 0.001, 1, "relu")),
    ],
)
def test_types_other_arguments_of_the_wrong_type_are_refused(name, call):
    with pytest.raises(TypeError, match=name):
        call()


@pytest.mark.parametrize(
    ("name", "call"),
    [
        *[(n, lambda b=b: b(0)) for n, b in _SIZE_CASES],
        *[(n, lambda b=b: b(-3)) for n, b in _SIZE_CASES],
        ("n_layers", lambda: ResidualFFNStack("relu", 8, 2, 12, -1)),  # 0 is the no-FFN baseline
        ("n_layers", lambda: swiglu.gradient_flow("relu", PairTask(4), 6, 0, 1, 1e-2, 8, 0, "cpu")),
        ("steps", lambda: swiglu.gradient_flow("relu", PairTask(4), 6, 2, -1, 1e-2, 8, 0, "cpu")),
        ("batch_size", lambda: PairTask(8).sample(-1, torch.Generator())),
        ("eps", lambda: swiglu.RMSNorm(8, 0.0)),  # would give NaN on a zero input
        ("eps", lambda: swiglu.RMSNorm(8, -1e-6)),
        ("ffn_dim_multiplier", lambda: llama_hidden_dim(4096, 256, 0.0)),
        ("ffn_dim_multiplier", lambda: SwiGLUFeedForward(64, ffn_dim_multiplier=-1.3)),
        ("ffn_dim_multiplier", lambda: llama_hidden_dim(4096, 256, math.inf)),
        ("ffn_dim_multiplier", lambda: llama_hidden_dim(2, 8, 0.1)),  # int(0.1 * 5) = 0 units
        ("temperature", lambda: PairTask(8, 2, math.nan)),
        ("seed", lambda: PairTask(8, 2, 2.0, -1)),
        ("seeds", lambda: swiglu.training_comparison(6, 1, 4, 2, 1e-2, 8, [0, -1], 1, "cpu")),
        ("lr", lambda: swiglu.training_comparison(6, 1, 4, 2, 0.0, 8, [0], 1, "cpu")),
        ("lr", lambda: swiglu.gradient_flow("relu", PairTask(4), 6, 2, 1, math.inf, 8, 0, "cpu")),
        ("min_run_time", lambda: swiglu.param_matched_table(6, 4, "cpu", math.nan, 1, ("relu",))),
        ("tol", lambda: swiglu.swish_minimum(0.0)),  # used to loop forever
        ("beta", lambda: swish(torch.randn(3), math.nan)),
        ("activation", lambda: FeedForward(8, 32, "tanh")),
        ("variant", lambda: GatedFeedForward(8, 32, "swish")),
        ("variant", lambda: matched_hidden_dim(8, "tanh")),
        ("variant", lambda: swiglu.gated_formula("relu", *[torch.randn(2, 2)] * 4)),
        ("device", lambda: swiglu.training_comparison(6, 1, 4, 2, 1e-2, 8, [0], 1, "tpu")),
    ],
)
def test_ranges_out_of_range_values_are_refused(name, call):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("x", lambda: FeedForward(8, 16)(torch.randn(2, 3, 7))),
        ("x", lambda: GatedFeedForward(8, 16)(torch.randn(2, 3, 9))),
        ("x", lambda: SwiGLUFeedForward(8, 16)(torch.tensor(1.0))),
        ("x", lambda: ResidualFFNStack("relu", 8, 2, 12, 1)(torch.zeros(3, 3, dtype=torch.long))),
        ("x", lambda: ResidualFFNStack("relu", 8, 2, 12, 1)(torch.zeros(2, dtype=torch.long))),
        (
            "W",
            lambda: swiglu.gated_formula(
                "swiglu", torch.randn(2, 8), *[torch.randn(4, 7)] * 2, torch.randn(8, 4)
            ),
        ),  # fmt: skip
        (
            "V",
            lambda: swiglu.gated_formula(
                "swiglu", torch.randn(2, 8), torch.randn(4, 8), torch.randn(5, 8), torch.randn(8, 4)
            ),
        ),  # fmt: skip
    ],
)
def test_lengths_shapes_that_do_not_fit_are_refused(name, call):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("x", lambda: SwiGLUFeedForward(8, 16)(torch.ones(2, 8, dtype=torch.long))),
        ("x", lambda: FeedForward(8, 16)(torch.ones(2, 8, dtype=torch.int32))),
        ("x", lambda: swiglu.relu(torch.tensor([1, -1]))),
        ("x", lambda: swiglu.gelu(torch.tensor([1, -1]))),
        ("x", lambda: ResidualFFNStack("relu", 8, 2, 12, 1)(torch.zeros(3, 2))),  # float ids
    ],
)
def test_dtypes_integer_activations_and_float_ids_are_refused(name, call):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("vocab_size", lambda: PairTask(2000, 3)),  # used to try to allocate 64 GB
        ("context_len", lambda: PairTask(10, 10**9)),
        ("vocab_size", lambda: PairTask(10**6, 2)),
        ("x", lambda: ResidualFFNStack("relu", 8, 2, 12, 1)(torch.full((3, 2), 8))),
        ("x", lambda: ResidualFFNStack("relu", 8, 2, 12, 1)(torch.full((3, 2), -1))),
        ("x", lambda: ResidualFFNStack("relu", 8, 2, 12, 1).to("meta")(torch.zeros(3, 2).long())),
        ("variants", lambda: swiglu.param_matched_table(6, 4, "cpu", 0.001, 1, ("swiglu",))),
        ("variants", lambda: swiglu.param_matched_table(6, 4, "cpu", 0.001, 1, ("relu", "relu"))),
    ],
)
def test_contracts_tables_ids_and_baselines_are_enforced(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_pair_task_limit_is_stated_and_the_largest_allowed_table_builds():
    with pytest.raises(ValueError, match=f"limit {swiglu.MAX_TABLE_ENTRIES:,}"):
        PairTask(2000, 3)
    with pytest.raises(ValueError, match="vocab_size"):
        PairTask(64, 3)  # 64**3 rows x (64 + 3) = 17.6 M entries: just over 2**24
    task = PairTask(60, 3)  # 60**3 rows x 63 = 13.6 M entries: under the limit
    assert task.contexts.shape == (60**3, 3)
    assert task.contexts[-1].tolist() == [59, 59, 59]


def test_empty_batches_give_empty_results():
    task = PairTask(8)
    ctx, y = task.sample(0, torch.Generator().manual_seed(0))
    assert ctx.shape == (0, 2) and y.shape == (0,)
    assert ResidualFFNStack("swiglu", 8, 2, 12, 2)(ctx).shape == (0, 8)
    assert SwiGLUFeedForward(8, 16)(torch.randn(0, 5, 8)).shape == (0, 5, 8)


def test_zero_layers_is_the_no_ffn_baseline():
    model = ResidualFFNStack("relu", 8, 2, 12, 0)
    assert len(model.layers) == 0
    assert model(torch.zeros(3, 2, dtype=torch.long)).shape == (3, 8)


@settings(max_examples=40, deadline=None)
@given(
    arg=st.sampled_from(["d_model", "hidden_dim"]),
    bad=st.one_of(
        st.integers(max_value=0),
        st.floats(allow_nan=True),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
    ),
    cls=st.sampled_from([FeedForward, GatedFeedForward, SwiGLUFeedForward]),
)
def test_hypothesis_bad_sizes_raise_an_error_naming_the_argument(arg, bad, cls):
    if cls is SwiGLUFeedForward and arg == "hidden_dim" and bad is None:
        return  # hidden_dim=None is Llama's rule
    sizes = {"d_model": 8, "hidden_dim": 16, arg: bad}
    with pytest.raises((ValueError, TypeError), match=arg):
        cls(**sizes)


@pytest.mark.parametrize(("flag", "value"), [("--steps", "0"), ("--seeds", "-1"), ("--steps", "x")])
def test_flags_a_non_positive_count_exits_2_with_one_line_before_writing(
    flag, value, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        swiglu.main(["--quick", "--no-show", "--out", str(out), flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"error: argument {flag}: " in err[-1], err  # the prog name is the runner's
    assert list(tmp_path.iterdir()) == []  # neither --out nor the default figures/ was created


def test_headline_docstring_example_runs():
    import doctest

    result = doctest.testmod(swiglu, verbose=False)
    assert result.attempted >= 3 and result.failed == 0


# --- claims and titles follow the numbers --------------------------------------------------------


@pytest.mark.parametrize(
    ("speed", "lo", "hi", "held", "words"),
    [
        (1.02, 0.95, 1.08, True, "1.02x faster than"),
        (0.97, 0.90, 1.05, True, "1.03x slower than"),
        (1.00, 0.4, 1.8, False, "too noisy"),  # noisy: the spread crosses the band
        (0.5, 0.45, 0.55, False, "more than 1.2x apart"),  # contrary: clearly slower
        (1.6, 1.5, 1.7, False, "more than 1.2x apart"),
    ],
)
def test_speed_claim_wording_follows_the_numbers(speed, lo, hi, held, words):
    c = swiglu.speed_claim(speed, lo, hi, rounds=5)
    assert c["held"] is held
    assert words in c["statement"]
    assert f"{lo:.2f}x-{hi:.2f}x" in c["statement"]  # printed with its spread


def test_every_seed_claim_wording_follows_the_numbers():
    won = swiglu.every_seed_claim([1.0, 1.1, 1.2], [1.3, 1.4, 1.5], 0.05)
    assert won["held"] and "on every seed" in won["statement"] and "0.05" in won["statement"]
    mixed = swiglu.every_seed_claim([1.0, 1.35, 1.2], [1.3, 1.4, 1.5], 0.05)
    assert not mixed["held"] and "did not show" in mixed["statement"]
    assert "2 of 3" in mixed["statement"] and "lower on average" in mixed["statement"]
    lost = swiglu.every_seed_claim([1.6, 1.7, 1.8], [1.3, 1.4, 1.5], 0.05)
    assert not lost["held"] and "not lower on average" in lost["statement"]
    # Separated, but with 2 seeds each that happens by chance 1 / C(4, 2) = 1/6 of the time.
    lucky = swiglu.every_seed_claim([1.0, 1.1], [1.3, 1.4], 1 / 6)
    assert not lucky["held"] and "too few seeds" in lucky["statement"]
    assert "0.17" in lucky["statement"] and "3 or more" in lucky["statement"]


@pytest.mark.parametrize(("level", "n"), [(0.5, 1), (0.2, 2), (0.05, 3), (0.01, 5)])
def test_seeds_needed_is_the_fewest_with_a_small_enough_chance(level, n):
    """1 / C(2n, n): 1/2, 1/6, 1/20, 1/70, 1/252 for n = 1..5."""
    assert swiglu.seeds_needed(level) == n


def test_training_runs_are_independent_across_variants_and_seeds():
    """The chance level 1 / C(2n, n) needs independent runs: no two runs share a seed (which
    would give them the same batches and the same embedding initialisation)."""
    variants = (*UNGATED, *GATED, "none")
    seeds = [swiglu._run_seed(s, v) for s in range(4) for v in variants]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    res = swiglu.training_comparison(12, 1, 6, 2, 1e-2, 8, [0, 1], 1, "cpu")
    assert res["variants"]["relu"]["run_seeds"] != res["variants"]["swiglu"]["run_seeds"]


def test_dead_units_and_flat_init_claims_follow_the_numbers():
    dies = swiglu.dead_units_claim({"relu": 0.3, "gelu": 0.0, "swiglu": 0.01}, 50, 1e-2)
    assert dies["held"] and "30.0%" in dies["statement"] and "lr 0.01" in dies["statement"]
    contrary = swiglu.dead_units_claim({"relu": 0.0, "gelu": 0.0, "swiglu": 0.02}, 50, 1e-2)
    assert not contrary["held"] and "did not show" in contrary["statement"]
    assert "SwiGLU" in contrary["statement"]
    assert swiglu.flat_init_claim(1.3, 24)["held"]
    steep = swiglu.flat_init_claim(5.0, 24)
    assert not steep["held"] and "does not show" in steep["statement"]


def _table(speeds: dict[str, tuple[float, float, float]]) -> dict:
    rows = {}
    for v, (med, lo, hi) in speeds.items():
        rows[v] = {"params_ratio": 1.0}
        for key in ("forward", "fwd_bwd"):
            rows[v] |= {f"{key}_speed_vs_relu": med, f"{key}_speed_vs_relu_lo": lo,
                        f"{key}_speed_vs_relu_hi": hi}  # fmt: skip
    return {"rows": rows, "rounds": 5}


def test_ffn_speed_title_follows_the_numbers():
    calm = swiglu.ffn_speed_title(_table({"relu": (1, 1, 1), "swiglu": (0.98, 0.95, 1.02)}))
    assert "every one ran within 1.2x" in calm
    noisy = swiglu.ffn_speed_title(_table({"relu": (1, 1, 1), "swiglu": (1.0, 0.5, 1.9)}))
    assert "every median speed is within 1.2x" in noisy and "1 of 1 left that band" in noisy
    slow = swiglu.ffn_speed_title(_table({"relu": (1, 1, 1), "swiglu": (0.5, 0.45, 0.55)}))
    assert "median speed of SwiGLU is more than 1.2x" in slow and "every" not in slow


def test_smallest_in_most_layers_counts_layers():
    res = swiglu.smallest_in_most_layers({"relu": [1, 1, 3], "silu": [2, 0.5, 0.1]})
    assert res == {"variant": "silu", "label": "SiLU FFN", "layers": 2, "n_layers": 3}


def test_trained_norms_statement_says_whether_the_smallest_gradient_has_the_lowest_loss():
    small = {"variant": "silu", "label": "SiLU FFN", "layers": 2, "n_layers": 3}
    also = swiglu.trained_norms_statement({**small, "loss_rank": 1}, {"silu": 2.0}, 50, 1e-2, 3.0)
    assert "also the lowest" in also and "2 of 3 layers" in also and "lr 0.01" in also
    losses = {"silu": 2.5, "relu": 2.6, "swiglu": 2.1}
    not_lowest = swiglu.trained_norms_statement({**small, "loss_rank": 2}, losses, 50, 1e-2, 3.0)
    assert "ranks 2 of 3" in not_lowest and "lowest: SwiGLU, 2.100" in not_lowest
    assert "uniform guess: 3.000" in not_lowest
    assert "also the lowest" not in not_lowest


def test_training_title_counts_the_ffn_weights():
    def train(counts):
        variants = {v: {"ffn_params": c} for v, c in counts.items()}
        task = {"entropy_floor_nats": 2.0}
        return {"variants": variants, "steps": 10, "seeds": [0, 1], "task": task}

    equal = swiglu.training_curves_title(train({"relu": 96, "swiglu": 96, "none": 0}))
    assert equal.startswith("Equal parameters (96 FFN weights each)")
    unequal = swiglu.training_curves_title(train({"relu": 96, "swiglu": 90, "none": 0}))
    assert unequal.startswith("90 to 96 FFN weights") and "Equal" not in unequal


# --- smoke test ------------------------------------------------------------------------------


def test_main_quick_writes_figures_and_results(run_main):
    run = run_main(swiglu)
    assert {p.name for p in run.pngs} == {
        "activations.png",
        "gate_surface.png",
        "ffn_speed.png",
        "grad_norms.png",
        "dead_units.png",
        "training_curves.png",
    }
    res = run.results
    assert list(res) == [
        "meta",
        "activations",
        "gated_variants",
        "llama_sizes",
        "param_matched",
        "gradient_flow",
        "training",
        "claims",
    ]
    table = res["param_matched"]
    rows = table["rows"]
    assert list(rows) == list(res["meta"]["config"]["bench_variants"])
    assert rows["relu"]["forward_speed_vs_relu"] == 1.0
    for r in rows.values():
        assert r["params"] == r["params_formula"]
        assert r["matmul_flops_per_token"] == r["matmul_flops_per_token_counted"]
        assert r["params_ratio"] == 1.0  # the quick d_model is divisible by 3
        assert r["forward_ms"] > 0 and r["fwd_bwd_ms"] > 0
        for key in ("forward", "fwd_bwd"):
            assert len(r[f"{key}_ms_rounds"]) == table["rounds"] >= 3
            lo, med, hi = (r[f"{key}_speed_vs_relu{s}"] for s in ("_lo", "", "_hi"))
            assert 0 < lo <= med <= hi
    flow = res["gradient_flow"]
    for r in flow["variants"].values():
        assert len(r["grad_norm_init"]) == len(r["grad_norm_trained"]) == flow["n_layers"]
    small = flow["smallest_after_training"]
    trained = {v: r["grad_norm_trained"] for v, r in flow["variants"].items()}
    assert swiglu.smallest_in_most_layers(trained).items() <= small.items()
    losses = sorted(r["loss_trained"] for r in flow["variants"].values())
    assert flow["variants"][small["variant"]]["loss_trained"] == losses[small["loss_rank"] - 1]
    assert small["statement"] in run.stdout
    claims = res["claims"]
    assert claims["llama_sizes"]["held"] is True
    assert claims["equal_params_and_flops"]["held"] is True
    train = res["training"]
    assert set(train["variants"]) == set(UNGATED + GATED) | {"none"}
    assert len(train["variants"]["relu"]["final_losses"]) == len(train["seeds"])
    chance = train["chance_of_every_seed_if_no_difference"]
    assert chance == 1 / math.comb(2 * len(train["seeds"]), len(train["seeds"]))
    assert claims["swiglu_beats_relu"]["held"] == (
        "swiglu" in train["better_than_relu_on_every_seed"] and chance <= 0.05
    )
    for c in claims.values():  # every claim is printed, marked by whether it held
        mark = "held" if c["held"] else "not shown by this run"
        assert f"[{mark}] {c['statement']}" in run.stdout
    # Shazeer 2020, table 1 (65,536 steps): the paper's difference is printed next to ours.
    assert train["shazeer_t5_base_65k_log_perplexity"] == {"relu": 1.997, "swiglu": 1.944}
    assert "65k steps: -0.053 log-perplexity" in run.stdout
