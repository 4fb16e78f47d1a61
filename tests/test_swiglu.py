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
    """Shazeer 2020, eqs. 5-6, from the definitions (not the module's kernels)."""
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


def test_adam_equals_torch_adam():
    """The written-out Adam (used so --quick need not import torch._dynamo) is torch's Adam."""
    g = torch.Generator().manual_seed(0)
    ours, ref = (ResidualFFNStack("swiglu", 6, 2, 12, 2) for _ in range(2))
    ref.load_state_dict(ours.state_dict())
    opt_ours = swiglu.Adam(ours.parameters(), lr=1e-2)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    task = PairTask(6, seed=0)
    for step in range(5):
        ctx, y = task.sample(32, g)
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            lr = swiglu.cosine_lr(step, 5, 1e-2)
            if opt is opt_ours:
                opt.lr = lr
            else:
                opt.param_groups[0]["lr"] = lr
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(ctx), y).backward()
            opt.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert swiglu.cosine_lr(0, 10, 1.0) == 1.0 and swiglu.cosine_lr(5, 10, 1.0) == 0.5
    assert swiglu.cosine_lr(10, 10, 1.0) == pytest.approx(0.0, abs=1e-15)


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


# --- bad input -------------------------------------------------------------------------------


def test_unknown_activation_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"activation \('tanh'\) must be one of 'relu', 'gelu'"):
        FeedForward(8, 32, "tanh")


def test_unknown_gated_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"variant \('swish'\) must be one of 'glu', 'bilinear'"):
        GatedFeedForward(8, 32, "swish")


# Each public constructor checks its own sizes (0 is the boundary; negatives below).
@pytest.mark.parametrize(
    "build",
    [
        lambda d: FeedForward(d, 32),
        lambda d: GatedFeedForward(d, 32),
        lambda d: SwiGLUFeedForward(d),
        lambda d: llama_hidden_dim(d),
    ],
)
def test_zero_d_model(build):
    with pytest.raises(ValueError, match=r"d_model \(0\) must be >= 1"):
        build(0)


@pytest.mark.parametrize(
    "build",
    [
        lambda h: FeedForward(8, h),
        lambda h: GatedFeedForward(8, h),
        lambda h: SwiGLUFeedForward(8, hidden_dim=h),
    ],
)
def test_zero_hidden_dim(build):
    with pytest.raises(ValueError, match=r"hidden_dim \(0\) must be >= 1"):
        build(0)


def test_negative_sizes():
    with pytest.raises(ValueError, match=r"d_model \(-4\) must be >= 1"):
        GatedFeedForward(-4, 32)
    with pytest.raises(ValueError, match=r"hidden_dim \(-1\) must be >= 1"):
        FeedForward(8, -1)
    with pytest.raises(ValueError, match=r"d_model \(8.0\) must be an integer >= 1"):
        FeedForward(8.0, 32)  # a float size is refused too, not silently truncated


@pytest.mark.parametrize("bad", [0, -256])
def test_non_positive_multiple_of(bad):
    with pytest.raises(ValueError, match=rf"multiple_of \({bad}\) must be >= 1"):
        llama_hidden_dim(4096, bad)
    with pytest.raises(ValueError, match=rf"multiple_of \({bad}\) must be >= 1"):
        SwiGLUFeedForward(64, multiple_of=bad)


@pytest.mark.parametrize("bad", [0.0, -1.3])
def test_non_positive_ffn_dim_multiplier(bad):
    with pytest.raises(ValueError, match=rf"ffn_dim_multiplier \({bad}\) must be > 0"):
        llama_hidden_dim(4096, 256, bad)
    with pytest.raises(ValueError, match=rf"ffn_dim_multiplier \({bad}\) must be > 0"):
        SwiGLUFeedForward(64, ffn_dim_multiplier=bad)


@pytest.mark.parametrize("flag", ["--steps", "--seeds"])
def test_non_positive_flag_raises_before_writing(flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"{flag} \(0\) must be >= 1"):
        swiglu.main(["--quick", "--no-show", "--out", str(out), flag, "0"])
    assert list(tmp_path.iterdir()) == []  # neither --out nor the default figures/ was created


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
        "goals",
    ]
    rows = res["param_matched"]["rows"]
    assert list(rows) == list(res["meta"]["config"]["bench_variants"])
    assert rows["relu"]["forward_ratio"] == 1.0
    for r in rows.values():
        assert r["params"] == r["params_formula"]
        assert r["matmul_flops_per_token"] == r["matmul_flops_per_token_counted"]
        assert r["params_ratio"] == 1.0  # the quick d_model is divisible by 3
        assert r["forward_ms"] > 0 and r["fwd_bwd_ms"] > 0
    flow = res["gradient_flow"]
    for r in flow["variants"].values():
        assert len(r["grad_norm_init"]) == len(r["grad_norm_trained"]) == flow["n_layers"]
    assert res["goals"]["llama_sizes_reproduced"] is True
    assert res["goals"]["params_match_formula"] is True
    train = res["training"]
    assert set(train["variants"]) == set(UNGATED + GATED) | {"none"}
    assert len(train["variants"]["relu"]["final_losses"]) == len(train["seeds"])
    goals = res["goals"]
    assert goals["swiglu_beats_relu_on_every_seed"] == (
        "swiglu" in train["better_than_relu_on_every_seed"]
    )
    assert ("beats ReLU on every seed" in run.stdout) == goals["swiglu_beats_relu_on_every_seed"]
    # The printed paper numbers are the ones stored (Shazeer 2020, table 1).
    assert train["shazeer_t5_base_65k_log_perplexity"] == {"relu": 1.997, "swiglu": 1.944}
