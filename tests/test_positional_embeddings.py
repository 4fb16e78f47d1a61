"""Tests for positional_embeddings.py: every printed claim, the transformers references, bad input.

Tolerances: float64 math is checked to ~1e-12. RoPE angles m * theta_i are float32 in every
implementation, so each angle carries a rounding error up to max_pos * 2^-24 rad; a score of unit
vectors built from three such angles is then off by at most ~3 * max_pos * 2^-24 (plus a few ulp),
which is the tolerance ``angle_atol`` below.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import positional_embeddings as pe

SETTINGS = settings(max_examples=25, deadline=None)


def angle_atol(max_pos: int) -> float:
    """Worst score error of unit vectors from float32 angles up to max_pos (see the docstring)."""
    return 4 * max(max_pos, 1) * 2.0**-24 + 1e-6


def unit(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)


# ---- sinusoidal ------------------------------------------------------------------------------


def test_sinusoidal_matches_vaswani_formula():
    # Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).
    d_model, seq_len = 16, 50
    table = pe.sinusoidal_encoding(seq_len, d_model, dtype=torch.float64)
    assert table.shape == (seq_len, d_model)
    for pos in (0, 1, 7, 49):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_start_pos_is_a_slice_and_module_adds_it():
    full = pe.sinusoidal_encoding(40, 32)
    assert_close(pe.sinusoidal_encoding(10, 32, start_pos=25), full[25:35])
    module = pe.SinusoidalPositionalEncoding(d_model=32, max_seq_len=40)
    x = torch.randn(2, 10, 32)
    assert_close(module(x, start_pos=25), x + full[25:35])
    assert_close(module(x), x + full[:10])


@SETTINGS
@given(k=st.integers(0, 600), d_model=st.sampled_from([2, 8, 64, 128]))
def test_sinusoidal_shift_is_a_rotation_independent_of_pos(k, d_model):
    table = pe.sinusoidal_encoding(700, d_model, dtype=torch.float64)  # (700, d_model)
    M = pe.sinusoidal_shift_matrix(k, d_model)
    # the same M_k maps PE(pos) to PE(pos + k) for every pos ...
    assert_close(table[: 700 - k] @ M.T, table[k:], atol=1e-10, rtol=0)
    # ... it is orthogonal, block diagonal (pairs 2i, 2i+1 only) ...
    assert_close(M.T @ M, torch.eye(d_model, dtype=torch.float64), atol=1e-12, rtol=0)
    pair = torch.arange(d_model) // 2
    assert (M[pair[:, None] != pair[None, :]] == 0).all()
    # ... so dot products PE(pos) . PE(pos + k) depend on k only: sum_i cos(k theta_i).
    dots = (table[: 700 - k] * table[k:]).sum(-1)
    theta = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    expected = torch.cos(k * theta).sum()
    assert_close(dots, expected.expand_as(dots), atol=1e-10, rtol=0)


def test_check_sinusoidal_reports_what_the_math_says():
    res = pe.check_sinusoidal(d_model=32, seq_len=300, shifts=(1, 50))
    assert res["max_abs_err_shift_float64"] < 1e-12
    assert res["max_abs_err_shift_float32"] < angle_atol(300)
    assert res["max_abs_err_orthogonal"] < 1e-12
    assert res["max_abs_err_dot_vs_formula"] < 1e-10
    assert res["shortest_wavelength_tokens"] == pytest.approx(2 * math.pi)


# ---- RoPE: the math ----------------------------------------------------------------------------


@SETTINGS
@given(
    m=st.integers(0, 4096),
    n=st.integers(0, 4096),
    head_dim=st.sampled_from([2, 16, 64, 128]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rope_scores_depend_only_on_the_offset_and_norms_are_kept(m, n, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = unit(head_dim, generator=g), unit(head_dim, generator=g)

    def rot(x, pos):
        cos, sin = pe.rope_cos_sin(torch.tensor([pos]), head_dim)
        return pe.apply_rope(x, cos, sin)[0]

    q_m, k_n = rot(q, m), rot(k, n)
    assert abs(q_m.norm().item() - 1.0) < 1e-6
    lhs, rhs = (q_m @ k_n).item(), (q @ rot(k, n - m)).item()  # n - m may be negative
    assert abs(lhs - rhs) < angle_atol(max(m, n))


@SETTINGS
@given(
    m=st.integers(-300, 300),
    n=st.integers(-300, 300),
    layout=st.sampled_from(["half_split", "interleaved"]),
)
def test_rotation_matrices_compose(m, n, layout):
    # RoFormer eq. 16: R_m^T R_n = R_(n-m), exactly in float64.
    R_m = pe.rope_rotation_matrix(m, 32, layout=layout)
    R_n = pe.rope_rotation_matrix(n, 32, layout=layout)
    expected = pe.rope_rotation_matrix(n - m, 32, layout=layout)
    assert_close(R_m.T @ R_n, expected, atol=1e-12, rtol=0)


def test_each_layout_equals_its_rotation_matrix():
    head_dim, positions = 16, torch.tensor([0, 1, 5, 100, 1000])
    x = torch.randn(len(positions), head_dim)
    cos, sin = pe.rope_cos_sin(positions, head_dim)
    half = pe.apply_rope(x, cos, sin)
    complex_form = pe.apply_rope_complex(x, pe.rope_freqs_cis(positions, head_dim))
    for row, m in enumerate(positions.tolist()):
        R_half = pe.rope_rotation_matrix(m, head_dim, layout="half_split").float()
        R_il = pe.rope_rotation_matrix(m, head_dim, layout="interleaved").float()
        assert_close(half[row], R_half @ x[row], atol=angle_atol(1000), rtol=0)
        assert_close(complex_form[row], R_il @ x[row], atol=angle_atol(1000), rtol=0)


def test_complex_form_equals_real_interleaved_form():
    positions = torch.arange(37)
    x = torch.randn(2, 3, 37, 64)  # (batch, n_heads, seq_len, head_dim)
    cos, sin = pe.rope_cos_sin_interleaved(positions, 64)
    assert_close(
        pe.apply_rope_complex(x, pe.rope_freqs_cis(positions, 64)),
        pe.apply_rope_interleaved(x, cos, sin),
        atol=1e-6,
        rtol=0,
    )


def test_permutation_moves_interleaved_pairs_to_half_split_pairs():
    head_dim, n_heads, d_model = 8, 3, 5
    assert pe.interleaved_to_half_split_index(head_dim).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    w = torch.randn(n_heads * head_dim, d_model)
    w_half = pe.permute_for_half_split(w, n_heads)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            base = h * head_dim
            # interleaved pair i = rows (2i, 2i+1) -> half-split pair i = rows (i, i + d/2)
            assert_close(w_half[base + i], w[base + 2 * i], atol=0, rtol=0)
            assert_close(w_half[base + i + head_dim // 2], w[base + 2 * i + 1], atol=0, rtol=0)
    assert_close(pe.permute_for_interleaved(w_half, n_heads), w, atol=0, rtol=0)


def test_layouts_give_identical_scores_after_the_permutation_and_different_ones_without():
    res = pe.check_rope(head_dim=32, max_pos=512, n_trials=200, d_model=64, n_heads=2, seq_len=24)
    assert res["max_abs_err_layout_scores"] < 1e-5
    assert res["max_abs_err_half_split_vs_interleaved_q"] < 1e-5
    assert res["max_abs_err_layout_scores_unpermuted"] > 0.1  # the bug the permutation prevents
    assert res["max_abs_err_norm"] < 1e-6
    assert res["max_abs_err_scores_offset_only"] < angle_atol(512)
    assert res["max_abs_err_matrix_compose_float64"] < 1e-12
    assert res["max_abs_err_apply_rope_vs_matrix"] < angle_atol(512)
    assert res["max_abs_err_complex_vs_interleaved"] < 1e-5
    assert res["max_abs_err_start_pos_vs_full"] == 0.0
    assert res["max_abs_err_positions_vs_start_pos"] == 0.0


# ---- RotaryEmbedding ---------------------------------------------------------------------------


def test_rotary_start_pos_equals_slice_of_full_call_and_positions():
    rope = pe.RotaryEmbedding(head_dim=16, max_seq_len=64)
    q, k = torch.randn(2, 3, 40, 16), torch.randn(2, 1, 40, 16)  # k with fewer (kv) heads
    full_q, full_k = rope(q, k)
    for start in (0, 1, 17, 39):
        part_q, part_k = rope(q[:, :, start:], k[:, :, start:], start_pos=start)
        assert_close(part_q, full_q[:, :, start:], atol=0, rtol=0)
        assert_close(part_k, full_k[:, :, start:], atol=0, rtol=0)
    # per-sequence positions (batch, seq_len), e.g. left padding
    positions = torch.stack((torch.arange(40), torch.arange(40) + 20))
    pos_q, _ = rope(q, k, positions=positions)
    assert_close(pos_q[0], full_q[0], atol=0, rtol=0)
    assert_close(pos_q[1], rope(q[1:], k[1:], positions=positions[1])[0][0])


def test_apply_rope_matches_transformers_llama():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    n_heads, head_dim, seq_len = 4, 64, 33
    config = LlamaConfig(
        hidden_size=n_heads * head_dim,
        num_attention_heads=n_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    q, k = torch.randn(2, n_heads, seq_len, head_dim), torch.randn(2, n_heads, seq_len, head_dim)
    position_ids = torch.stack((torch.arange(seq_len), torch.arange(seq_len) + 100))
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(q, position_ids)  # (batch, seq_len, head_dim)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)

    cos, sin = pe.rope_cos_sin(position_ids[1], head_dim)
    assert_close(cos, cos_hf[1], atol=1e-6, rtol=0)
    assert_close(sin, sin_hf[1], atol=1e-6, rtol=0)
    q_ours, k_ours = pe.RotaryEmbedding(head_dim, 256)(q, k, positions=position_ids)
    assert_close(q_ours, q_hf, atol=1e-5, rtol=0)
    assert_close(k_ours, k_hf, atol=1e-5, rtol=0)


# ---- context extension against transformers' ROPE_INIT_FUNCTIONS -------------------------------

# Published configs, cited: Llama 3.1 8B config.json (rope_scaling: factor 8, low_freq_factor 1,
# high_freq_factor 4, original_max_position_embeddings 8192, rope_theta 5e5); gpt-oss config.json
# (yarn, factor 32, beta_fast 32, beta_slow 1, original 4096, truncate false, rope_theta 150000).
SCALING_CASES = [
    ("linear", 64, 4096, {"rope_theta": 10000.0, "factor": 4.0}, {}),
    ("dynamic", 64, 2048, {"rope_theta": 10000.0, "factor": 2.0}, {"seq_len": 5000}),
    ("dynamic", 128, 2048, {"rope_theta": 10000.0, "factor": 4.0}, {"seq_len": 100}),
    (
        "yarn",
        64,
        16384,
        {"rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096},
        {},
    ),
    (
        "yarn",
        64,
        163840,
        {
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
        },
        {},
    ),
    (
        "yarn",
        64,
        131072,
        {
            "rope_theta": 150000.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        {},
    ),
    (
        "llama3",
        128,
        131072,
        {
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {},
    ),
]


@pytest.mark.parametrize(
    ("rope_type", "head_dim", "max_position_embeddings", "params", "call"), SCALING_CASES
)
def test_scaling_matches_transformers(rope_type, head_dim, max_position_embeddings, params, call):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": rope_type, **params},
    )
    inv_hf, scale_hf = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **call)
    extra = {"max_position_embeddings": max_position_embeddings} if rope_type == "dynamic" else {}
    inv_ours, scale_ours = pe.rope_scaling_inv_freq(rope_type, head_dim, **params, **extra, **call)
    assert_close(inv_ours, inv_hf.float(), rtol=2e-6, atol=0)
    assert scale_ours == pytest.approx(scale_hf, rel=1e-12)


def test_rotary_embedding_with_yarn_matches_llama_rotary_embedding():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        head_dim=32,
        max_position_embeddings=1024,
        rope_parameters={**scaling, "rope_theta": 10000.0},
    )
    positions = torch.arange(0, 1024, 7)[None]  # (1, seq_len)
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(torch.zeros(1), positions)
    rope = pe.RotaryEmbedding(32, 1024, rope_base=10000.0, rope_scaling=scaling)
    assert rope.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1)  # YaRN eq. 22
    cos, sin = rope.cos_sin(positions.shape[-1], positions=positions[0])
    assert_close(cos, cos_hf[0], atol=1e-5, rtol=0)
    assert_close(sin, sin_hf[0], atol=1e-5, rtol=0)


def test_scaling_endpoints_from_first_principles():
    head_dim, theta, s = 128, 500000.0, 8.0
    orig = pe.rope_inv_freq(head_dim, theta)
    pi, _ = pe.linear_scaling_inv_freq(head_dim, theta, s)
    assert_close(pi, orig / s)
    ntk, _ = pe.ntk_aware_inv_freq(head_dim, theta, s)
    # base' = base * s^(d/(d-2)): the fastest pair is kept, the slowest divided by exactly s
    assert ntk[0].item() == pytest.approx(orig[0].item())
    assert ntk[-1].item() == pytest.approx(orig[-1].item() / s, rel=1e-5)
    assert (ntk <= orig * (1 + 1e-6)).all() and (ntk >= orig / s * (1 - 1e-5)).all()
    ext = pe.context_extension(head_dim, theta, s, 8192)["methods"]
    for name in ("YaRN", "Llama 3.1"):
        assert ext[name]["ratio_fastest_pair"] == pytest.approx(1.0)
        assert ext[name]["ratio_slowest_pair"] == pytest.approx(1 / s, rel=1e-5)
    assert ext["linear (PI)"]["pairs_divided_by_factor"] == head_dim // 2
    assert ext["YaRN"]["attention_scaling"] == pytest.approx(0.1 * math.log(s) + 1)
    # dynamic NTK at seq_len = s * L: stretch = s * s - (s - 1), so the slowest pair / (s^2 - s + 1)
    assert ext["dynamic NTK at s*L"]["ratio_slowest_pair"] == pytest.approx(1 / 57, rel=1e-5)
    dyn_at_L, _ = pe.dynamic_ntk_inv_freq(head_dim, theta, s, 8192, seq_len=8192)
    assert_close(dyn_at_L, orig)  # within the trained length: plain RoPE


# ---- long-term decay and attention patterns ----------------------------------------------------


@pytest.fixture(scope="module")
def decay():
    torch.manual_seed(0)
    return pe.rope_long_term_decay(head_dim=64, max_distance=500, n_samples=2048)


def test_decay_curves_match_their_formulas(decay):
    # every e^(j 0) = 1, so |S_l| = l and the mean over l = 1..d/2 is (d/2 + 1) / 2
    bound = decay["relative_upper_bound"]
    assert decay["relative_upper_bound_at_0"] == pytest.approx((64 // 2 + 1) / 2)
    assert max(bound) <= bound[0] + 1e-9
    assert max(bound[256:]) < 0.5 * bound[0]  # RoFormer Figure 2: it has halved well before 256
    assert decay["expected_identical"][0] == pytest.approx(64)  # E|q|^2 = head_dim
    # Monte Carlo within 5 standard errors of the analytic curve and of 0, at every distance
    assert decay["max_abs_z_identical_mc_vs_analytic"] < 5
    assert decay["max_abs_z_random_mean_vs_zero"] < 5


@SETTINGS
@given(m=st.integers(0, 500), n=st.integers(0, 500), seed=st.integers(0, 2**31 - 1))
def test_roformer_bound_bounds_the_real_score(m, n, seed, decay):
    """score = Re sum_k h_k e^(j (m-n) theta_k) and |score| <= max_k |h_(k+1) - h_k| sum_l |S_l|,
    where sum_l |S_l| = (d/2) * the relative upper bound the script plots (RoFormer eq. 35-37)."""
    head_dim, half = 64, 32
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    c_m, s_m = pe.rope_cos_sin(torch.tensor([m]), head_dim)
    c_n, s_n = pe.rope_cos_sin(torch.tensor([n]), head_dim)
    score = (pe.apply_rope(q, c_m, s_m) @ pe.apply_rope(k, c_n, s_n).T).item()

    # half-split pair k as a complex number
    qc = torch.complex(q[:half].double(), q[half:].double())
    kc = torch.complex(k[:half].double(), k[half:].double())
    h = qc * kc.conj()
    theta = pe.rope_inv_freq(head_dim).double()
    phases = torch.polar(torch.ones(half, dtype=torch.float64), (m - n) * theta)
    assert score == pytest.approx((h * phases).sum().real.item(), abs=angle_atol(500) * 64)
    sum_abs_S = phases.cumsum(0).abs().sum().item()  # |S_1| + .. + |S_(d/2)|
    assert half * decay["relative_upper_bound"][abs(m - n)] == pytest.approx(sum_abs_S, rel=1e-12)
    h_next = torch.cat((h[1:], torch.zeros(1, dtype=h.dtype)))  # h_(d/2) = 0
    assert abs(score) <= (h_next - h).abs().max().item() * sum_abs_S + 1e-9


def test_toeplitz_deviation_can_tell_relative_from_absolute():
    toeplitz = torch.tensor([[1.0, 2.0, 3.0], [4.0, 1.0, 2.0], [5.0, 4.0, 1.0]])
    assert pe.toeplitz_deviation(toeplitz) == 0.0
    toeplitz[2, 2] = 0.0
    assert pe.toeplitz_deviation(toeplitz) > 0.5


def test_rope_scores_are_relative_and_sinusoidal_ones_are_not():
    res = pe.check_attention_patterns(seq_len=32, head_dim=32)
    assert res["toeplitz_max_dev_constant_rope"] < 1e-4
    assert res["toeplitz_max_dev_constant_none"] < 1e-5
    assert res["toeplitz_max_dev_constant_sinusoidal"] > 0.1


# ---- bad input: one test per rule family, matching the argument's name -----------------------


def _rope8():
    return pe.RotaryEmbedding(head_dim=4, max_seq_len=8)


def _qk(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


QK = (_qk(1, 1, 4, 4), _qk(1, 1, 4, 4))

# (argument named in the message, call)
BAD_TYPES = [
    ("head_dim", lambda: pe.RotaryEmbedding(8.0, 8)),
    ("max_seq_len", lambda: pe.RotaryEmbedding(8, True)),
    ("max_seq_len", lambda: pe.SinusoidalPositionalEncoding(8, None)),
    ("d_model", lambda: pe.sinusoidal_encoding(4, "8")),
    ("seq_len", lambda: pe.sinusoidal_encoding(2.5, 8)),
    ("start_pos", lambda: _rope8()(*QK, start_pos=1.0)),
    ("start_pos", lambda: pe.sinusoidal_encoding(4, 8, start_pos=True)),
    ("rope_base", lambda: pe.RotaryEmbedding(8, 8, rope_base="1e4")),
    ("rope_scaling", lambda: pe.RotaryEmbedding(8, 8, rope_scaling="yarn")),
    ("original_max_position_embeddings", lambda: pe.yarn_inv_freq(8, 1e4, 2.0, 64.5)),
    ("original_max_position_embeddings", lambda: pe.llama3_inv_freq(8, 1e4, 2.0, 64.0)),
    ("max_position_embeddings", lambda: pe.dynamic_ntk_inv_freq(8, 1e4, 2.0, None)),
    ("seq_len", lambda: pe.dynamic_ntk_inv_freq(8, 1e4, 2.0, 64, seq_len=2.5)),
    ("mscale", lambda: pe.yarn_inv_freq(8, 1e4, 2.0, 64, mscale="1", mscale_all_dim=1.0)),
    ("truncate", lambda: pe.yarn_inv_freq(8, 1e4, 2.0, 64, truncate="no")),
    ("n_heads", lambda: pe.permute_for_half_split(torch.zeros(16, 4), 2.0)),
    ("weight", lambda: pe.permute_for_half_split([[0.0]], 1)),
    ("position", lambda: pe.rope_rotation_matrix(1.5, 8)),
    ("k", lambda: pe.sinusoidal_shift_matrix(0.5, 8)),
    ("positions", lambda: _rope8()(*QK, positions=[0, 1, 2, 3])),
    ("q", lambda: _rope8()("q", QK[1])),
]

BAD_RANGES = [
    ("head_dim", lambda: pe.RotaryEmbedding(7, 8)),
    ("head_dim", lambda: pe.RotaryEmbedding(0, 8)),
    ("d_model", lambda: pe.sinusoidal_encoding(4, 7)),
    ("d_model", lambda: pe.SinusoidalPositionalEncoding(9, 4)),
    ("head_dim", lambda: pe.rope_scaling_inv_freq("linear", 63, factor=2.0)),
    ("head_dim", lambda: pe.permute_for_half_split(torch.zeros(10, 3), n_heads=2)),
    ("max_seq_len", lambda: pe.RotaryEmbedding(8, 0)),
    ("max_seq_len", lambda: pe.SinusoidalPositionalEncoding(4, 0)),
    ("base", lambda: pe.sinusoidal_encoding(4, 8, base=1.0)),
    ("rope_base", lambda: pe.RotaryEmbedding(8, 8, rope_base=0.5)),
    ("rope_base", lambda: pe.RotaryEmbedding(8, 8, rope_base=math.inf)),
    ("rope_theta", lambda: pe.linear_scaling_inv_freq(8, rope_theta=1.0, factor=2.0)),
    ("rope_theta", lambda: pe.ntk_aware_inv_freq(8, math.nan, 2.0)),
    ("factor", lambda: pe.linear_scaling_inv_freq(8, 1e4, 0.5)),
    ("factor", lambda: pe.ntk_aware_inv_freq(8, 1e4, math.inf)),
    ("factor", lambda: pe.dynamic_ntk_inv_freq(8, 1e4, 0.5, 1024)),
    ("factor", lambda: pe.yarn_inv_freq(8, 1e4, math.inf, 1024)),
    ("factor", lambda: pe.llama3_inv_freq(8, 1e4, -2.0, 1024)),
    ("factor", lambda: pe.RotaryEmbedding(8, 8, rope_scaling={"rope_type": "linear", "factor": 0})),
    ("head_dim", lambda: pe.dynamic_ntk_inv_freq(2, 1e4, 2.0, 64)),
    ("head_dim", lambda: pe.ntk_aware_inv_freq(2, 1e4, 2.0)),
    ("max_position_embeddings", lambda: pe.dynamic_ntk_inv_freq(8, 1e4, 2.0, 0)),
    ("original_max_position_embeddings", lambda: pe.yarn_inv_freq(8, 1e4, 2.0, 0)),
    ("original_max_position_embeddings", lambda: pe.llama3_inv_freq(8, 1e4, 2.0, 0)),
    ("beta_slow", lambda: pe.yarn_inv_freq(8, 1e4, 2.0, 1024, beta_slow=0.0)),
    ("beta_fast", lambda: pe.yarn_inv_freq(8, 1e4, 2.0, 1024, beta_fast=1.0, beta_slow=32.0)),
    ("mscale", lambda: pe.yarn_inv_freq(8, 1e4, 2.0, 64, mscale=-1.0, mscale_all_dim=1.0)),
    ("mscale_all_dim", lambda: pe.yarn_inv_freq(8, 1e4, 2.0, 64, mscale=1.0, mscale_all_dim=-1)),
    ("attention_factor", lambda: pe.yarn_inv_freq(8, 1e4, 2.0, 64, attention_factor=math.inf)),
    ("low_freq_factor", lambda: pe.llama3_inv_freq(8, 1e4, 2.0, 1024, low_freq_factor=0.0)),
    ("high_freq_factor", lambda: pe.llama3_inv_freq(8, 1e4, 2.0, 1024, low_freq_factor=4.0)),
    ("n_heads", lambda: pe.permute_for_interleaved(torch.zeros(16, 4), 0)),
    ("n_heads", lambda: pe.permute_for_interleaved(torch.zeros(16, 4), 3)),
    ("start_pos", lambda: _rope8()(*QK, start_pos=-1)),
    ("start_pos", lambda: pe.sinusoidal_encoding(4, 8, start_pos=-2)),
    ("seq_len", lambda: pe.sinusoidal_encoding(-1, 8)),
]

# positions and lengths against the table: raise, never extend or wrap
BAD_LENGTHS = [
    ("positions", lambda: _rope8()(*QK, positions=torch.tensor([0, 1, 2, 8]))),
    ("positions", lambda: _rope8()(*QK, positions=torch.tensor([-1, 0, 1, 2]))),
    ("start_pos", lambda: _rope8()(*QK, start_pos=6)),
    ("start_pos", lambda: _rope8().cos_sin(4, start_pos=5)),
    ("start_pos", lambda: pe.SinusoidalPositionalEncoding(4, 8)(torch.zeros(1, 4, 4), start_pos=5)),
    ("k", lambda: _rope8()(_qk(1, 1, 4, 4), _qk(1, 1, 1, 4))),  # k of another length
    ("k", lambda: _rope8()(_qk(1, 1, 4, 4), _qk(3, 1, 4, 4))),  # k of another batch
    ("positions", lambda: _rope8()(*QK, positions=torch.arange(3))),
    ("positions", lambda: _rope8()(_qk(2, 1, 4, 4), _qk(2, 1, 4, 4), positions=torch.zeros(3, 4))),
]

BAD_DTYPES = [
    ("q", lambda: _rope8()(_qk(1, 1, 4, 4, dtype=torch.int64), QK[1])),
    ("k", lambda: _rope8()(QK[0], _qk(1, 1, 4, 4, dtype=torch.int32))),
    ("k", lambda: _rope8()(QK[0], _qk(1, 1, 4, 4, dtype=torch.float64))),
    ("x", lambda: pe.SinusoidalPositionalEncoding(4, 8)(torch.zeros(1, 2, 4, dtype=torch.long))),
    ("positions", lambda: _rope8()(*QK, positions=torch.arange(4.0))),
    ("dtype", lambda: pe.sinusoidal_encoding(4, 8, dtype=torch.int64)),
    ("dtype", lambda: pe.rope_rotation_matrix(1, 8, dtype=torch.bool)),
    ("dtype", lambda: pe.sinusoidal_shift_matrix(1, 8, dtype="float32")),
    ("weight", lambda: pe.permute_for_half_split(torch.zeros(16, 4, dtype=torch.long), 2)),
]

# shapes and choices the contract names
BAD_CONTRACTS = [
    ("q", lambda: _rope8()(_qk(1, 1, 4, 6), _qk(1, 1, 4, 6))),  # head_dim 6 != 4
    ("q", lambda: _rope8()(_qk(4, 4), _qk(4, 4))),  # not (batch, heads, seq_len, head_dim)
    ("x", lambda: pe.SinusoidalPositionalEncoding(8, 8)(torch.zeros(1, 2, 6))),
    ("positions", lambda: _rope8()(*QK, positions=torch.zeros(1, 2, 4, dtype=torch.long))),
    ("start_pos", lambda: _rope8()(*QK, positions=torch.arange(4), start_pos=1)),
    ("layout", lambda: pe.rope_rotation_matrix(0, 8, layout="neox")),
    ("rope_type", lambda: pe.rope_scaling_inv_freq("longrope", 8)),
    ("rope_type", lambda: pe.RotaryEmbedding(8, 8, rope_scaling={"rope_type": "xpos"})),
    ("weight", lambda: pe.permute_for_half_split(torch.zeros(16), 2)),
    ("x", lambda: pe.apply_rope_complex(torch.zeros(4, 7), pe.rope_freqs_cis(torch.arange(4), 8))),
    ("positions", lambda: pe.rope_freqs_cis(torch.zeros(2, 2), 8)),
]


def _check_family(arg, fn):
    with pytest.raises((ValueError, TypeError), match=arg):
        fn()


@pytest.mark.parametrize(("arg", "fn"), BAD_TYPES)
def test_bad_types_raise_naming_the_argument(arg, fn):
    _check_family(arg, fn)


@pytest.mark.parametrize(("arg", "fn"), BAD_RANGES)
def test_bad_ranges_raise_naming_the_argument(arg, fn):
    _check_family(arg, fn)


@pytest.mark.parametrize(("arg", "fn"), BAD_LENGTHS)
def test_positions_beyond_the_table_and_mismatched_lengths_raise(arg, fn):
    _check_family(arg, fn)


@pytest.mark.parametrize(("arg", "fn"), BAD_DTYPES)
def test_bad_dtypes_raise_instead_of_casting(arg, fn):
    _check_family(arg, fn)


@pytest.mark.parametrize(("arg", "fn"), BAD_CONTRACTS)
def test_broken_contracts_raise_naming_the_argument(arg, fn):
    _check_family(arg, fn)


@SETTINGS
@given(
    head_dim=st.one_of(
        st.integers(-8, 1), st.integers(1, 64).map(lambda n: 2 * n + 1), st.floats(), st.none()
    ),
    max_seq_len=st.one_of(st.integers(-8, 0), st.floats(), st.booleans(), st.text(max_size=2)),
    which=st.sampled_from(["head_dim", "max_seq_len"]),
)
def test_bad_sizes_from_hypothesis_raise_naming_the_argument(head_dim, max_seq_len, which):
    args = {"head_dim": 8, "max_seq_len": 8}
    args[which] = head_dim if which == "head_dim" else max_seq_len
    with pytest.raises((ValueError, TypeError), match=which):
        pe.RotaryEmbedding(**args)


def test_edge_cases_with_an_answer_get_it():
    rope = pe.RotaryEmbedding(8, 16)
    q, k = rope(torch.zeros(0, 2, 3, 8), torch.zeros(0, 1, 3, 8))  # a batch of 0
    assert q.shape == (0, 2, 3, 8) and k.shape == (0, 1, 3, 8)
    assert pe.sinusoidal_encoding(0, 8).shape == (0, 8)  # no positions
    q, _ = rope(torch.zeros(1, 1, 0, 8), torch.zeros(1, 1, 0, 8), start_pos=16)  # nothing new
    assert q.shape == (1, 1, 0, 8)


@pytest.mark.parametrize(("dtype", "seq_len"), [(torch.bfloat16, 512), (torch.float16, 4096)])
def test_low_precision_sinusoidal_table_is_the_float64_table_rounded_once(dtype, seq_len):
    exact = pe.sinusoidal_encoding(seq_len, 64, dtype=torch.float64)
    low = pe.sinusoidal_encoding(seq_len, 64, dtype=dtype)
    assert low.dtype == dtype
    # entries lie in [-1, 1]: rounding once errs by at most half the spacing at 1, eps / 2
    assert (low.double() - exact).abs().max().item() <= torch.finfo(dtype).eps / 2


def test_headline_docstring_example_runs():
    import doctest

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(pe.RotaryEmbedding, "RotaryEmbedding", globs=dict(vars(pe))):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted >= 3
    assert runner.summarize(verbose=False).failed == 0


# ---- wording that follows the numbers ----------------------------------------------------------


def test_speed_sentence_follows_the_rounds():
    text, held = pe.speed_sentence("A", {"median": 2.0, "min": 1.8, "max": 2.2}, 5)
    assert held and "2.00x faster" in text and "1.80-2.20x" in text
    text, held = pe.speed_sentence("A", {"median": 0.5, "min": 0.4, "max": 0.8}, 5)
    assert held and "2.00x slower" in text and "1.25-2.50x" in text
    text, held = pe.speed_sentence("A", {"median": 1.3, "min": 0.7, "max": 1.9}, 5)  # noisy
    assert not held and "did not show" in text and "faster" not in text


def test_figure_titles_follow_the_numbers():
    assert "falls 5.0x" in pe.decay_title(32.5, 6.5, 256)
    assert "did not fall" in pe.decay_title(6.5, 32.5, 256)  # contrary input
    assert "falls" in pe.expected_score_title(128, 41, 2.0)
    assert "does not fall" in pe.expected_score_title(41, 128, 2.0)
    assert "NOT 0" in pe.expected_score_title(128, 41, 9.0)
    assert "0 within noise" in pe.expected_score_title(128, 41, 2.0)
    title = pe.attention_scores_title(3e-6, 1.7)
    assert "RoPE scores depend on n - m only" in title
    assert "neither" in pe.attention_scores_title(0.5, 1.7)
    assert "only sinusoidal" in pe.attention_scores_title(0.5, 1e-6)
    assert "both" in pe.attention_scores_title(1e-6, 1e-6)


def test_context_extension_titles_follow_the_ratios():
    ext = pe.context_extension(
        head_dim=64, rope_theta=1e4, factor=4.0, original_max_position_embeddings=512
    )
    title = pe.context_extension_title(ext)
    assert "YaRN" in title.split("keep the fastest pair")[0]
    assert "linear (PI) slows it too" in title
    rows = ext["methods"]
    assert pe.extension_panel_title("PI", rows["linear (PI)"], 4.0) == "PI: all 32 pairs slowed 4x"
    assert "q, k x1.139" in pe.extension_panel_title("YaRN", rows["YaRN"], 4.0)
    # contrary input: a "scheme" that keeps everything says so
    assert "every pair unchanged" in pe.extension_panel_title("o", rows["original"], 4.0)
    ext["methods"]["YaRN"]["ratio_fastest_pair"] = 0.5
    assert "YaRN" in pe.context_extension_title(ext).split("keep the fastest pair")[1]


def test_claims_follow_the_numbers():
    results = {
        "rope": {
            "max_position": 4096,
            "n_trials": 10,
            "max_abs_err_scores_offset_only": 1e-5,
            "max_abs_err_layout_scores": 1e-6,
            "max_abs_err_layout_scores_unpermuted": 5.0,
        },
        "attention_patterns": {
            "toeplitz_max_dev_constant_rope": 1e-6,
            "toeplitz_max_dev_constant_sinusoidal": 1.5,
        },
        "decay": {
            "relative_upper_bound_at_0": 32.5,
            "relative_upper_bound_at_max_distance": 6.5,
            "distances": [0, 256],
        },
        "benchmark": {
            "rounds": 5,
            "speedup_vs_half_split_cached": {
                "half_split_uncached": {"median": 0.5, "min": 0.45, "max": 0.55},
                "interleaved_complex": {"median": 1.1, "min": 0.9, "max": 1.3},
            },
        },
    }
    claims = pe.rope_claims(results)
    assert all(c["held"] for k, c in claims.items() if k != "complex_form_speed")
    assert not claims["complex_form_speed"]["held"]  # noisy: no direction claimed
    # contrary numbers: every claim says it was not shown
    results["rope"]["max_abs_err_scores_offset_only"] = 0.1
    results["rope"]["max_abs_err_layout_scores_unpermuted"] = 1e-6
    results["attention_patterns"]["toeplitz_max_dev_constant_rope"] = 1.0
    results["decay"]["relative_upper_bound_at_max_distance"] = 40.0
    results["benchmark"]["speedup_vs_half_split_cached"]["half_split_uncached"] = {
        "median": 1.5,
        "min": 1.2,
        "max": 1.8,
    }
    claims = pe.rope_claims(results)
    assert not any(c["held"] for c in claims.values())
    assert "MORE than" in claims["relative_scores"]["statement"]
    assert "did not separate" in claims["constant_content_stripes"]["statement"]
    assert "did not decay" in claims["bound_decays"]["statement"]
    assert "faster" in claims["cached_cos_sin"]["statement"]


# ---- smoke test --------------------------------------------------------------------------------


def test_main_quick_writes_every_figure_and_result(run_main):
    run = run_main(pe)
    assert {p.name for p in run.pngs} == {
        "sinusoidal_encoding.png",
        "rope_rotation.png",
        "rope_layouts.png",
        "rope_decay.png",
        "attention_scores.png",
        "context_extension.png",
    }
    r = run.results
    assert list(r) == [
        "meta",
        "sinusoidal",
        "rope",
        "decay",
        "attention_patterns",
        "context_extension",
        "benchmark",
        "claims",
    ]
    # the printed worst errors are the ones the tests above bound
    assert r["sinusoidal"]["max_abs_err_shift_float64"] < 1e-12
    assert r["rope"]["max_abs_err_norm"] < 1e-6
    assert r["rope"]["max_abs_err_scores_offset_only"] < angle_atol(r["rope"]["max_position"])
    assert r["rope"]["max_abs_err_layout_scores"] < 1e-5
    assert r["rope"]["max_abs_err_layout_scores_unpermuted"] > 0.1
    assert r["decay"]["max_abs_z_identical_mc_vs_analytic"] < 5
    assert r["decay"]["max_abs_z_random_mean_vs_zero"] < 5
    half = r["decay"]["head_dim"] // 2
    assert r["decay"]["marks"][0]["relative_upper_bound"] == pytest.approx((half + 1) / 2)
    assert r["attention_patterns"]["toeplitz_max_dev_constant_rope"] < 1e-4
    assert set(r["context_extension"]["methods"]) == {
        "original",
        "linear (PI)",
        "NTK-aware (static)",
        "dynamic NTK at s*L",
        "YaRN",
        "Llama 3.1",
    }
    bench = r["benchmark"]
    for name in ("half_split_uncached", "interleaved_complex", "interleaved_real"):
        s = bench["speedup_vs_half_split_cached"][name]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    assert bench["cos_sin_cache_bytes"] == 2 * bench["freqs_cis_bytes"]
    for key in ("relative_scores", "layouts_agree_after_permutation", "constant_content_stripes"):
        assert r["claims"][key]["held"], r["claims"][key]["statement"]
    assert "[held]" in run.stdout
