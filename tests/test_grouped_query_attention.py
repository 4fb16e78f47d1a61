"""Tests for grouped_query_attention.py: every claim the script prints, the reference
implementation in transformers, the three head-sharing methods, the cache, the conversion, the
memory measurement, and each bad-input rule."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grouped_query_attention as gqa
from grouped_query_attention import (
    SHARING_METHODS,
    AllocationTracker,
    GroupedQueryAttention,
    KVCache,
    MatmulFlopCounter,
    MultiHeadAttention,
    attend,
    causal_mask,
    kv_cache_bytes,
    measure_allocations,
    mha_to_gqa,
    repeat_kv,
)

ATOL = 1e-5  # fp32 throughout


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    """Max absolute difference within atol. (torch.testing.assert_close would do; its first call
    imports torch.distributed, seconds on a small CPU.)"""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= atol, f"max |actual - expected| = {err:.3g} > atol {atol:g}"


def reference_attention(q, k, v, mask):
    """One head at a time, straight from the definition: query head h reads KV head h // group."""
    group = q.shape[1] // k.shape[1]
    heads = []
    for h in range(q.shape[1]):
        j = h // group
        scores = q[:, h] @ k[:, j].transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(scores.softmax(dim=-1) @ v[:, j])
    return torch.stack(heads, dim=1)


# ----------------------------------------------------------------------------- equivalences


def test_mha_equals_gqa_with_as_many_kv_heads_as_query_heads():
    mha = MultiHeadAttention(64, 8, max_seq_len=32)
    gqa_layer = GroupedQueryAttention(64, 8, 8, max_seq_len=32)
    gqa_layer.load_state_dict(mha.state_dict(), strict=True)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        assert_close(gqa_layer(x), mha(x))
        cache_m, cache_g = mha.new_cache(2), gqa_layer.new_cache(2)
        for i in range(10):
            step = x[:, i : i + 1]
            assert_close(gqa_layer(step, i, cache_g), mha(step, i, cache_m))


@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "head_dim", "bias"),
    [
        (8, 8, None, False),
        (8, 2, None, False),
        (8, 1, None, False),
        (8, 2, None, True),
        (4, 2, 32, False),
    ],
    ids=["MHA", "GQA", "MQA", "GQA-bias", "GQA-head_dim"],
)
def test_matches_transformers_llama_attention(n_heads, n_kv_heads, head_dim, bias):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    d_model, seq_len, start = 64, 9, 5
    config = LlamaConfig(
        hidden_size=d_model,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        attention_bias=bias,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    ref = LlamaAttention(config, layer_idx=0).eval()
    ours = GroupedQueryAttention(d_model, n_heads, n_kv_heads, head_dim, max_seq_len=64, bias=bias)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, seq_len, d_model)
    position_ids = torch.arange(start, start + seq_len).unsqueeze(0)  # not starting at 0
    cos, sin = LlamaRotaryEmbedding(config)(x, position_ids)
    blocked = ~causal_mask(seq_len, seq_len)
    mask = torch.zeros(2, 1, seq_len, seq_len).masked_fill(blocked, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected, _ = ref(x, position_embeddings=(cos, sin), attention_mask=mask)
        for sharing in SHARING_METHODS:
            assert_close(ours(x, start, sharing=sharing), expected)


def test_repeat_kv_matches_transformers_and_maps_head_h_to_h_over_group():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

    x = torch.randn(2, 3, 5, 4)
    assert_close(repeat_kv(x, 4), hf_repeat_kv(x, 4), atol=0)
    index = torch.arange(3.0).view(1, 3, 1, 1)
    assert repeat_kv(index, 4).flatten().tolist() == [h // 4 for h in range(12)]


@settings(max_examples=25, deadline=None)
@given(
    n_kv_heads=st.sampled_from([1, 2, 3, 6]),
    batch=st.integers(1, 2),
    q_len=st.integers(1, 6),
    extra=st.integers(0, 7),
)
def test_three_sharing_methods_equal_the_per_head_definition(n_kv_heads, batch, q_len, extra):
    n_heads, d = 6, 8
    kv_len = q_len + extra  # queries are the last q_len positions: an offset causal mask
    q = torch.randn(batch, n_heads, q_len, d)
    k, v = torch.randn(2, batch, n_kv_heads, kv_len, d)
    mask = causal_mask(q_len, kv_len)
    expected = reference_attention(q, k, v, mask)
    for sharing in SHARING_METHODS:
        assert_close(attend(q, k, v, mask, sharing), expected)


def test_causal_mask_is_offset_for_a_chunk():
    # 2 new queries at absolute positions 3 and 4 over 5 keys
    assert causal_mask(2, 5).tolist() == [[True] * 4 + [False], [True] * 5]


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
@pytest.mark.parametrize("sharing", list(SHARING_METHODS))
def test_cached_decode_equals_full_forward_at_every_position(n_kv_heads, sharing):
    attn = GroupedQueryAttention(32, 8, n_kv_heads, max_seq_len=16)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        full = attn(x, sharing=sharing)
        cache = attn.new_cache(2)
        for i in range(11):
            step = attn(x[:, i : i + 1], i, cache, sharing)
            assert_close(step, full[:, i : i + 1])
        assert cache.length == 11


@pytest.mark.parametrize("sizes", [(1, 10), (5, 4, 2), (3, 3, 3, 1, 1), (11,)])
@pytest.mark.parametrize("sharing", list(SHARING_METHODS))
def test_chunked_prefill_equals_full_forward(sizes, sharing):
    attn = GroupedQueryAttention(32, 8, 2, max_seq_len=16)
    x = torch.randn(2, sum(sizes), 32)
    with torch.no_grad():
        full = attn(x, sharing=sharing)
        cache, pos, outs = attn.new_cache(2), 0, []
        for n in sizes:
            outs.append(attn(x[:, pos : pos + n], pos, cache, sharing))
            pos += n
    assert_close(torch.cat(outs, dim=1), full)


# ----------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_kv_heads", [8, 4, 1])
def test_cache_holds_only_n_kv_heads_and_its_bytes_equal_the_formula(n_kv_heads, dtype):
    attn = GroupedQueryAttention(64, 8, n_kv_heads, max_seq_len=20).to(dtype)
    cache = attn.new_cache(3)
    assert cache.k_cache.shape == cache.v_cache.shape == (3, n_kv_heads, 20, 8)
    size = torch.tensor([], dtype=dtype).element_size()
    assert cache.nbytes == kv_cache_bytes(1, 3, n_kv_heads, 20, 8, size)
    assert cache.nbytes == 2 * 3 * n_kv_heads * 20 * 8 * size  # the formula, written out
    with torch.no_grad():  # a forward pass stores n_kv_heads heads, not n_heads
        attn(torch.randn(3, 4, 64).to(dtype), 0, cache)
    assert cache.length == 4


def test_cache_update_writes_in_place_returns_views_and_can_rewind():
    cache = KVCache(1, 2, 8, 4)
    k, v = torch.randn(2, 1, 2, 5, 4)
    k_all, v_all = cache.update(k, v, 0)
    assert k_all.data_ptr() == cache.k_cache.data_ptr() and k_all.shape == (1, 2, 5, 4)
    assert_close(cache.v_cache[:, :, :5], v, atol=0)
    k_all, _ = cache.update(k[:, :, :1], v[:, :, :1], 2)  # rewind to position 2
    assert cache.length == 3 and k_all.shape[2] == 3
    cache.reset()
    assert cache.length == 0
    assert not cache.k_cache.any() and not cache.v_cache.any()  # zeroed, not just forgotten


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 1, 0, 8), r"start_pos \(-1\) must be >= 0"),
        ((3, 1, 2, 8), r"start_pos \(3\) would leave a gap: the cache holds 2 tokens, so "),
        ((6, 3, 6, 8), r"cache overflow: writing 3 tokens at start_pos 6 needs 9 positions, but "),
    ],
)
def test_check_cache_write_rules(args, match):
    with pytest.raises(ValueError, match=match):
        gqa._check_cache_write(*args)
    gqa._check_cache_write(2, 6, 2, 8)  # appending right at the end, filling it exactly: fine


def test_check_cache_write_is_the_same_rule_as_the_mla_script():
    import multihead_latent_attention as mla

    assert gqa._check_cache_write.__code__.co_code == mla._check_cache_write.__code__.co_code
    assert gqa._check_cache_write.__code__.co_consts == mla._check_cache_write.__code__.co_consts


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 2, 8, 4), r"batch_size \(0\) must be >= 1"),
        ((1, 0, 8, 4), r"n_kv_heads \(0\) must be >= 1"),
        ((1, 2, 0, 4), r"max_seq_len \(0\) must be >= 1"),
        ((1, 2, 8, 0), r"head_dim \(0\) must be >= 1"),
    ],
)
def test_cache_sizes_must_be_positive(args, match):
    with pytest.raises(ValueError, match=match):
        KVCache(*args)


@pytest.mark.parametrize(
    ("n_tokens", "expected"), [(512, "512"), (1024, "1K"), (4096, "4K"), (1536, "1,536")]
)
def test_tokens_label_is_right_at_every_size(n_tokens, expected):
    assert gqa.tokens_label(n_tokens) == expected


# ----------------------------------------------------------------------------- conversion


def test_mha_to_gqa_is_exact_when_n_kv_heads_equals_n_heads():
    mha = MultiHeadAttention(64, 8, max_seq_len=16)
    converted = mha_to_gqa(mha, 8)
    for name, tensor in mha.state_dict().items():  # every weight carried over bit for bit
        assert_close(converted.state_dict()[name], tensor, atol=0)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        assert_close(converted(x), mha(x))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_mha_to_gqa_is_exact_when_heads_within_each_group_are_identical(n_kv_heads):
    mha = MultiHeadAttention(64, 8, max_seq_len=16)
    group = 8 // n_kv_heads
    with torch.no_grad():
        for proj in (mha.k_proj, mha.v_proj):
            one_per_group = torch.randn(n_kv_heads, 8, 64) / 8  # (n_kv_heads, head_dim, d_model)
            proj.weight.copy_(one_per_group.repeat_interleave(group, dim=0).reshape(64, 64))
        x = torch.randn(2, 7, 64)
        assert_close(mha_to_gqa(mha, n_kv_heads)(x), mha(x))


def test_mha_to_gqa_mean_pools_each_group_and_is_lossy_on_random_weights():
    mha = MultiHeadAttention(32, 4, max_seq_len=16, bias=True)
    out = mha_to_gqa(mha, 2)  # groups: source heads {0, 1} and {2, 3}; head_dim 8
    w = mha.k_proj.weight
    assert_close(out.k_proj.weight[8:16], (w[16:24] + w[24:32]) / 2)
    assert_close(out.v_proj.bias[:8], mha.v_proj.bias.view(4, 8)[:2].mean(0))
    assert_close(out.q_proj.weight, mha.q_proj.weight, atol=0)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        y = mha(x)
        assert ((out(x) - y).norm() / y.norm()).item() > 0.05  # pooling different heads loses


def test_conversion_analysis_errors_order_as_printed():
    conv = gqa.analyze_conversion(32, 4, 0.1, torch.device("cpu"))
    for r in conv["rows"]:
        if r["group_size"] == 1:  # nothing pooled: only float32 rounding
            assert max(r["relative_err_random"], r["relative_err_similar"]) < 1e-6
        else:
            assert r["relative_err_identical"] < 1e-6
            assert r["relative_err_similar"] < r["relative_err_random"]


# ----------------------------------------------------------------------------- measurements


def test_allocation_tracker_counts_a_copy_and_not_a_view():
    x = torch.randn(256, 256)
    assert measure_allocations(lambda: x.view(-1)[:100])["total_bytes"] == 0  # views
    copy = measure_allocations(lambda: x.t().contiguous())
    assert copy["largest_allocation_bytes"] == copy["peak_bytes"] == x.numel() * 4
    with AllocationTracker() as tracker:  # freed temporaries leave the live total
        for _ in range(3):
            x.clone()
    assert tracker.total_bytes == 3 * x.numel() * 4 and tracker.live_bytes == 0


def test_grouped_makes_no_kv_sized_copy_and_repeat_kv_does():
    b, h, n_kv, t, d = 1, 16, 2, 512, 32
    q = torch.randn(b, h, 1, d)
    k, v = torch.randn(2, b, n_kv, t, d)
    k_bytes = k.numel() * 4
    grouped = measure_allocations(lambda: attend(q, k, v, None, "grouped"))
    repeated = measure_allocations(lambda: attend(q, k, v, None, "repeat_kv"))
    sdpa = measure_allocations(lambda: attend(q, k, v, None, "sdpa"))
    assert grouped["largest_allocation_bytes"] < k_bytes
    assert repeated["largest_allocation_bytes"] == (h // n_kv) * k_bytes  # group copies of k
    assert repeated["peak_bytes"] >= 2 * (h // n_kv) * k_bytes  # ... and of v, live together
    if any(op.startswith("_scaled_dot_product") for op in sdpa["ops"]):  # a fused kernel ran
        assert sdpa["largest_allocation_bytes"] < k_bytes


def test_repeat_kv_copies_nothing_for_mqa_and_matmul_broadcast_would_copy():
    # Docstring claims: MQA's reshape stays a view; broadcasting a size-1 group dimension
    # through torch.matmul makes the group copies that the grouped method avoids.
    k = torch.randn(1, 1, 512, 32)
    assert measure_allocations(lambda: repeat_kv(k, 16))["total_bytes"] == 0
    k = torch.randn(1, 2, 512, 32)
    q = torch.randn(1, 2, 8, 1, 32)  # (b, n_kv_heads, group, q_len, d)
    trap = measure_allocations(lambda: q @ k.unsqueeze(2).transpose(-2, -1))
    assert trap["largest_allocation_bytes"] == 8 * k.numel() * 4


def test_sdpa_copies_only_on_its_math_fallback():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 16, 1, 32)
    k, v = torch.randn(2, 1, 2, 512, 32)
    with sdpa_kernel([SDPBackend.MATH]):
        math_path = measure_allocations(lambda: attend(q, k, v, None, "sdpa"))
    assert math_path["largest_allocation_bytes"] == 8 * k.numel() * 4  # k copied to 16 heads


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
def test_attention_flops_do_not_depend_on_n_kv_heads(n_kv_heads):
    b, h, t, d = 2, 8, 64, 16
    q = torch.randn(b, h, 1, d)
    k, v = torch.randn(2, b, n_kv_heads, t, d)
    with torch.no_grad(), MatmulFlopCounter() as counter:
        attend(q, k, v, None, "grouped")
    assert counter.flops == 4 * b * h * t * d


def test_cache_memory_analysis_matches_formula_and_intensity_equals_group():
    mem = gqa.analyze_cache_memory(2, 8, 16, 64, torch.device("cpu"))
    assert mem["measured_equals_formula"] and mem["flops_equal_formula"]
    for r in mem["rows"]:
        assert r["cache_ratio_vs_mha"] == r["n_kv_heads"] / 8
        # bf16: 4*h*T*d FLOPs over 2*n_kv*T*d*2 bytes = h / n_kv = the group size
        assert r["arithmetic_intensity_flops_per_byte"] == r["group_size"]


def test_real_model_cache_from_published_configs():
    real = {m["name"]: m for m in gqa.analyze_real_models()["models"]}
    # Llama-2-70B config.json: 80 layers, 64 heads, 8 KV heads, head_dim 128; bf16 = 2 bytes.
    assert real["Llama-2-70B"]["per_token_bytes"] == 2 * 80 * 8 * 128 * 2
    assert real["Llama-2-70B"]["reduction_vs_mha"] == 8
    assert real["Llama-3-8B"]["reduction_vs_mha"] == 4
    assert real["Llama-2-7B"]["reduction_vs_mha"] == 1  # MHA
    assert real["Llama-2-7B"]["bytes_at_context"][0] == 2 * 2**30  # 4096 tokens: 2 GiB


def test_dispatch_mode_self_check_passes_on_this_torch():
    # The private TorchDispatchMode API works here; if a torch update breaks it, this fails
    # (and the script itself runs on without the memory numbers: see the next test).
    assert gqa.dispatch_mode_problem() == ""


def fake_timer(outlier_call: int):
    """A median_time_s stand-in: 1 ms for every call except one, which returns 1 s."""
    calls = []

    def median_time_s(fn, min_run_time=0.2):
        fn()
        calls.append(fn)
        return 1.0 if len(calls) == outlier_call else 1e-3

    return median_time_s, calls


@pytest.mark.parametrize("outlier_call", [1, 5, 23, 40])
def test_one_slow_round_does_not_move_a_decode_time_or_ratio(monkeypatch, outlier_call):
    timer, calls = fake_timer(outlier_call)
    monkeypatch.setattr(gqa, "median_time_s", timer)
    dec = gqa.benchmark_decode(32, 8, 4, [16, 32], 0.0, torch.device("cpu"), rounds=3)
    # 3 rounds x (2 contexts x 3 methods x 3 configs steps + 3 methods x 3 configs cores)
    assert len(calls) == 3 * (2 * 3 * 3 + 3 * 3) and dec["rounds"] == 3
    for cfg in dec["configs"].values():
        for m in SHARING_METHODS:
            assert cfg["step_ms"][m] == [1.0, 1.0] and cfg["core_ms_at_longest"][m] == 1.0
            assert cfg["step_ratio_vs_mha"][m] == [1.0, 1.0]
            assert all(len(r) == 3 for r in cfg["step_ms_rounds"][m])
    assert dec["largest_round_spread"] == pytest.approx(999.0)  # (1000 - 1) / 1 ms: reported


def test_paired_ratio_compares_times_taken_in_the_same_round():
    # Rounds 1-2 are quiet (a/b = 0.5); round 3 slowed b only. The median of the per-round
    # ratios stays 0.5, while the ratio of the two medians (10 / 2) would say 5.
    a, b = [1.0, 10.0, 10.0], [2.0, 20.0, 2.0]
    assert gqa.paired_ratio(a, b) == 0.5
    assert statistics.median(a) / statistics.median(b) == 5.0


def test_without_the_private_dispatch_api_the_analyses_still_run(monkeypatch):
    # Simulate a future torch where the self-check fails: memory and FLOP counts become None,
    # timing, goals and the figure still work.
    monkeypatch.setattr(gqa, "dispatch_mode_problem", lambda: "simulated: API moved")
    timer, _ = fake_timer(0)
    monkeypatch.setattr(gqa, "median_time_s", timer)
    dec = gqa.benchmark_decode(32, 8, 4, [16, 32], 0.0, torch.device("cpu"), rounds=1)
    assert dec["allocation_tracking_problem"] == "simulated: API moved"
    assert dec["configs"]["GQA"]["memory_at_longest"]["grouped"] is None
    goals = gqa.decode_goals(dec)
    assert goals["copy_free_allocates_no_kv_sized_copy"] is None
    assert goals["copy_free_no_slower_than_repeat_kv"] is True
    gqa.plt.close(gqa.plot_sharing_methods(dec))
    mem = gqa.analyze_cache_memory(1, 4, 8, 16, torch.device("cpu"))
    assert mem["flops_equal_formula"] is None and mem["measured_equals_formula"]
    assert gqa.measure_allocations(lambda: None) is None


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"n_heads": 12, "n_kv_heads": 5, "d_model": 96},
            r"n_heads \(12\) must be divisible by n_kv_heads \(5\)",
        ),
        ({"n_heads": 8, "n_kv_heads": 0}, r"n_kv_heads \(0\) must be between 1 and n_heads \(8\)"),
        ({"n_heads": 8, "n_kv_heads": -2}, r"n_kv_heads \(-2\) must be between 1"),
        ({"n_heads": 8, "n_kv_heads": 16}, r"n_kv_heads \(16\) must be between 1 and n_heads"),
        (
            {"d_model": 100, "n_heads": 8, "n_kv_heads": 2},
            r"d_model \(100\) must be divisible by n_heads \(8\) when head_dim is not given",
        ),
        ({"n_heads": 8, "n_kv_heads": 2, "head_dim": 7}, r"head_dim \(7\) must be .*even"),
        ({"d_model": 24, "n_heads": 8, "n_kv_heads": 2}, r"head_dim \(3\) must be .*even"),
    ],
)
def test_bad_head_arguments_raise(kwargs, match):
    args = {"d_model": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        GroupedQueryAttention(**args, max_seq_len=16)


def test_d_model_need_not_divide_when_head_dim_is_given():
    attn = GroupedQueryAttention(100, 8, 2, head_dim=16, max_seq_len=8)
    assert attn(torch.randn(1, 3, 100)).shape == (1, 3, 100)


def test_cache_overflow_says_how_much_fits():
    attn = GroupedQueryAttention(32, 4, 2, max_seq_len=16)
    cache = KVCache(1, 2, 6, 8)
    attn(torch.randn(1, 4, 32), 0, cache)
    with pytest.raises(
        ValueError,
        match=r"cache overflow: writing 3 tokens at start_pos 4 needs "
        r"7 positions, but max_seq_len is 6 \(room for 2 more\)",
    ):
        attn(torch.randn(1, 3, 32), 4, cache)
    with pytest.raises(ValueError, match=r"start_pos \(5\) would leave a gap: the cache holds 4"):
        attn(torch.randn(1, 1, 32), 5, cache)
    with pytest.raises(
        ValueError, match=r"start_pos \+ seq_len \(15 \+ 2\) must be <= max_seq_len"
    ):
        attn(torch.randn(1, 2, 32), 15)
    with pytest.raises(ValueError, match=r"must both have shape \(batch_size, n_kv_heads"):
        cache.update(torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), 4)  # MHA-sized keys


def test_unknown_sharing_method_lists_the_valid_ones():
    attn = GroupedQueryAttention(32, 4, 2, max_seq_len=8)
    match = r"sharing \('fast'\) must be one of 'repeat_kv', 'grouped', 'sdpa'"
    with pytest.raises(ValueError, match=match):
        attn(torch.randn(1, 2, 32), sharing="fast")
    with pytest.raises(ValueError, match=match):
        attend(
            torch.randn(1, 4, 1, 8),
            torch.randn(1, 2, 3, 8),
            torch.randn(1, 2, 3, 8),
            sharing="fast",
        )


@pytest.mark.parametrize(
    ("n_kv_heads", "match"),
    [
        (0, r"n_kv_heads \(0\) must be between 1 and the source layer's n_kv_heads \(8\)"),
        (16, r"n_kv_heads \(16\) must be between 1"),
        (3, r"source layer's n_kv_heads \(8\) must be divisible by n_kv_heads \(3\)"),
    ],
)
def test_mha_to_gqa_bad_n_kv_heads(n_kv_heads, match):
    with pytest.raises(ValueError, match=match):
        mha_to_gqa(MultiHeadAttention(64, 8, max_seq_len=8), n_kv_heads)


# ----------------------------------------------------------------------------- smoke


def test_main_quick_writes_figures_and_results(run_main):
    run = run_main(gqa)
    assert [p.name for p in run.pngs] == sorted(
        f"{name}.png"
        for name in [
            "head_sharing",
            "cache_vs_context",
            "real_model_cache",
            "decode_time",
            "sharing_methods",
            "conversion_error",
        ]
    )
    r = run.results
    assert list(r) == [
        "meta",
        "correctness",
        "cache_memory",
        "real_models",
        "decode",
        "goals",
        "conversion",
    ]
    assert r["correctness"]["all_within_atol"]
    assert r["cache_memory"]["measured_equals_formula"] and r["cache_memory"]["flops_equal_formula"]
    assert set(r["decode"]["configs"]) == {"MHA", "GQA", "MQA"}
    assert r["decode"]["rounds"] == 3 and r["decode"]["allocation_tracking_problem"] == ""
    assert f"median of {r['decode']['rounds']} rounds" in run.stdout
    goals = r["goals"]
    assert goals["gqa_step_at_most_half_of_mha"] == (goals["gqa_vs_mha_step_time_ratio"] <= 0.5)
    assert goals["copy_free_no_slower_than_repeat_kv"] == (
        goals["copy_free_vs_repeat_kv_time_ratio"] <= 1.0
    )
    assert isinstance(goals["copy_free_allocates_no_kv_sized_copy"], bool)
    assert goals["kv_cache_ratio"] == r["decode"]["configs"]["GQA"]["n_kv_heads"] / 16
