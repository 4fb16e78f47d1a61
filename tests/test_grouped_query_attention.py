"""Tests for grouped_query_attention.py: every claim the script prints, the reference
implementation in transformers, the three head-sharing methods, the cache, the conversion, the
memory measurement, the titles and claims computed from the numbers, and each family of
bad-input rules."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import grouped_query_attention as gqa
from grouped_query_attention import (
    SHARING_METHODS,
    AllocationTracker,
    GroupedQueryAttention,
    KVCache,
    MatmulFlopCounter,
    PlainMultiHeadAttention,
    attend,
    causal_mask,
    kv_cache_bytes,
    measure_allocations,
    mha_to_gqa,
    repeat_kv,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}  # fp32 throughout
EXACT = {"atol": 0.0, "rtol": 0.0}


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


def test_headline_docstring_example_runs():
    result = doctest.testmod(gqa, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0


# ----------------------------------------------------------------------------- equivalences


def test_mha_equals_gqa_with_as_many_kv_heads_as_query_heads():
    mha = PlainMultiHeadAttention(64, 8, max_seq_len=32)
    gqa_layer = GroupedQueryAttention(64, 8, 8, max_seq_len=32)
    gqa_layer.load_state_dict(mha.state_dict(), strict=True)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        assert_close(gqa_layer(x), mha(x), **TOL)
        cache_m, cache_g = mha.new_cache(2), gqa_layer.new_cache(2)
        for i in range(10):
            step = x[:, i : i + 1]
            assert_close(gqa_layer(step, i, cache_g), mha(step, i, cache_m), **TOL)


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
            ours.sharing = sharing
            assert_close(ours(x, start), expected, **TOL)


def test_repeat_kv_matches_transformers_and_maps_head_h_to_h_over_group():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

    x = torch.randn(2, 3, 5, 4)
    assert_close(repeat_kv(x, 4), hf_repeat_kv(x, 4), **EXACT)
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
        assert_close(attend(q, k, v, mask, sharing), expected, **TOL)


def test_causal_mask_is_offset_for_a_chunk():
    # 2 new queries at absolute positions 3 and 4 over 5 keys
    assert causal_mask(2, 5).tolist() == [[True] * 4 + [False], [True] * 5]


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
@pytest.mark.parametrize("sharing", list(SHARING_METHODS))
def test_cached_decode_equals_full_forward_at_every_position(n_kv_heads, sharing):
    attn = GroupedQueryAttention(32, 8, n_kv_heads, max_seq_len=16, sharing=sharing)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        full = attn(x)
        cache = attn.new_cache(2)
        for i in range(11):
            step = attn(x[:, i : i + 1], i, cache)
            assert_close(step, full[:, i : i + 1], **TOL)
        assert cache.length == 11


@pytest.mark.parametrize("sizes", [(1, 10), (5, 4, 2), (3, 3, 3, 1, 1), (11,)])
@pytest.mark.parametrize("sharing", list(SHARING_METHODS))
def test_chunked_prefill_equals_full_forward(sizes, sharing):
    attn = GroupedQueryAttention(32, 8, 2, max_seq_len=16, sharing=sharing)
    x = torch.randn(2, sum(sizes), 32)
    with torch.no_grad():
        full = attn(x)
        cache, pos, outs = attn.new_cache(2), 0, []
        for n in sizes:
            outs.append(attn(x[:, pos : pos + n], pos, cache))
            pos += n
    assert_close(torch.cat(outs, dim=1), full, **TOL)


@pytest.mark.parametrize("sharing", list(SHARING_METHODS))
def test_empty_batch_and_empty_sequence_give_empty_outputs(sharing):
    attn = GroupedQueryAttention(32, 8, 2, max_seq_len=16, sharing=sharing)
    assert attn(torch.randn(0, 3, 32)).shape == (0, 3, 32)
    assert attn(torch.randn(2, 0, 32)).shape == (2, 0, 32)


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


def test_new_cache_defaults_to_the_layer_and_takes_a_shorter_length():
    attn = GroupedQueryAttention(64, 8, 2, max_seq_len=20).to(torch.bfloat16)
    cache = attn.new_cache(2, max_seq_len=5, dtype=torch.float32)
    assert cache.k_cache.shape == (2, 2, 5, 8) and cache.k_cache.dtype == torch.float32
    assert attn.new_cache(1).k_cache.dtype == torch.bfloat16


def test_cache_update_writes_in_place_returns_views_and_can_rewind():
    cache = KVCache(1, 2, 8, 4)
    k, v = torch.randn(2, 1, 2, 5, 4)
    k_all, v_all = cache.update(k, v, 0)
    assert k_all.data_ptr() == cache.k_cache.data_ptr() and k_all.shape == (1, 2, 5, 4)
    assert_close(cache.v_cache[:, :, :5], v, **EXACT)
    k_all, _ = cache.update(k[:, :, :1], v[:, :, :1], 2)  # rewind to position 2
    assert cache.length == 3 and k_all.shape[2] == 3
    cache.reset()
    assert cache.length == 0
    assert not cache.k_cache.any() and not cache.v_cache.any()  # zeroed, not just forgotten


def test_cache_overflow_and_gap_say_how_much_fits():
    attn = GroupedQueryAttention(32, 4, 2, max_seq_len=16)
    cache = KVCache(1, 2, 6, 8)
    attn(torch.randn(1, 4, 32), 0, cache)
    with pytest.raises(ValueError, match=r"needs 7 positions, but max_seq_len is 6 \(room for 2"):
        attn(torch.randn(1, 3, 32), 4, cache)
    with pytest.raises(ValueError, match=r"start_pos \(5\) would leave a gap"):
        attn(torch.randn(1, 1, 32), 5, cache)


@pytest.mark.parametrize(
    ("n_tokens", "expected"), [(512, "512"), (1024, "1K"), (4096, "4K"), (1536, "1,536")]
)
def test_tokens_label_is_right_at_every_size(n_tokens, expected):
    assert gqa.tokens_label(n_tokens) == expected


# ----------------------------------------------------------------------------- conversion


def test_mha_to_gqa_is_exact_when_n_kv_heads_equals_n_heads():
    mha = PlainMultiHeadAttention(64, 8, max_seq_len=16)
    converted = mha_to_gqa(mha, 8)
    for name, tensor in mha.state_dict().items():  # every weight carried over bit for bit
        assert_close(converted.state_dict()[name], tensor, **EXACT)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        assert_close(converted(x), mha(x), **TOL)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_mha_to_gqa_is_exact_when_heads_within_each_group_are_identical(n_kv_heads):
    mha = PlainMultiHeadAttention(64, 8, max_seq_len=16)
    group = 8 // n_kv_heads
    with torch.no_grad():
        for proj in (mha.k_proj, mha.v_proj):
            one_per_group = torch.randn(n_kv_heads, 8, 64) / 8  # (n_kv_heads, head_dim, d_model)
            proj.weight.copy_(one_per_group.repeat_interleave(group, dim=0).reshape(64, 64))
        x = torch.randn(2, 7, 64)
        assert_close(mha_to_gqa(mha, n_kv_heads)(x), mha(x), **TOL)


def test_mha_to_gqa_mean_pools_each_group_and_is_lossy_on_random_weights():
    mha = PlainMultiHeadAttention(32, 4, max_seq_len=16, bias=True)
    out = mha_to_gqa(mha, 2)  # groups: source heads {0, 1} and {2, 3}; head_dim 8
    w = mha.k_proj.weight
    assert_close(out.k_proj.weight[8:16], (w[16:24] + w[24:32]) / 2, **TOL)
    assert_close(out.v_proj.bias[:8], mha.v_proj.bias.view(4, 8)[:2].mean(0), **TOL)
    assert_close(out.q_proj.weight, mha.q_proj.weight, **EXACT)
    assert out.sharing == "grouped" and mha_to_gqa(layer(sharing="sdpa"), 1).sharing == "sdpa"
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
    out = torch.empty(0)  # an out= tensor that the operator must grow is new memory too
    grown = measure_allocations(lambda: torch.mm(x[:8], x, out=out))
    assert grown["total_bytes"] == 8 * 256 * 4


def test_grouped_makes_no_kv_sized_copy_and_repeat_kv_does():
    b, h, n_kv, t, d = 1, 16, 2, 512, 32
    q = torch.randn(b, h, 1, d)
    k, v = torch.randn(2, b, n_kv, t, d)
    k_bytes = k.numel() * 4
    grouped = measure_allocations(lambda: attend(q, k, v, None, "grouped"))
    repeated = measure_allocations(lambda: attend(q, k, v, None, "repeat_kv"))
    assert grouped["largest_allocation_bytes"] < k_bytes
    assert repeated["largest_allocation_bytes"] == (h // n_kv) * k_bytes  # group copies of k
    assert repeated["peak_bytes"] >= 2 * (h // n_kv) * k_bytes  # ... and of v, live together


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
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # the fused CPU kernel, forced: it must run
        fused = measure_allocations(lambda: attend(q, k, v, None, "sdpa"))
    assert "_scaled_dot_product_flash_attention_for_cpu" in fused["ops"]
    assert fused["largest_allocation_bytes"] < k.numel() * 4  # reads KV head h // group in place


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
def test_attention_flops_do_not_depend_on_n_kv_heads(n_kv_heads):
    b, h, t, d = 2, 8, 64, 16
    q = torch.randn(b, h, 1, d)
    k, v = torch.randn(2, b, n_kv_heads, t, d)
    with torch.no_grad(), MatmulFlopCounter() as counter:
        attend(q, k, v, None, "grouped")
    assert counter.flops == 4 * b * h * t * d


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_matmul_flop_counter_agrees_with_torch_flop_counter(grad_mode):
    # inference_mode hands matmul to the mode whole, and a Linear with bias runs addmm: both
    # must be counted, not silently missed.
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 8, 1, 16)
    k, v = torch.randn(2, 2, 2, 64, 16)
    with grad_mode(), MatmulFlopCounter() as ours, FlopCounterMode(display=False) as ref:
        attend(q, k, v, None, "grouped")
    assert ours.flops == ref.get_total_flops() == 4 * 2 * 8 * 64 * 16
    layer = GroupedQueryAttention(64, 8, 2, max_seq_len=16, bias=True)
    with grad_mode(), MatmulFlopCounter() as ours, FlopCounterMode(display=False) as ref:
        layer(torch.randn(2, 5, 64))
    assert ours.flops == ref.get_total_flops() > 0


def test_cache_memory_analysis_matches_formula_and_intensity_equals_group():
    mem = gqa.analyze_cache_memory(2, 8, 16, 64, torch.device("cpu"))
    assert mem["measured_equals_formula"] and mem["flops_equal_formula"]
    for r in mem["rows"]:
        assert r["mha_bytes_over_this"] == 8 / r["n_kv_heads"]
        # bf16: 4*h*T*d FLOPs over 2*n_kv*T*d*2 bytes = h / n_kv = the group size
        assert r["arithmetic_intensity_flops_per_byte"] == r["group_size"]


def test_cache_vs_context_uses_llama2_70b_published_shape():
    cvc = gqa.cache_vs_context()
    # Llama-2-70B config.json: 80 layers, 64 heads, 8 KV heads, head_dim 128; bf16 = 2 bytes.
    per_token = 2 * 80 * 8 * 128 * 2
    assert cvc["bytes"]["GQA"][0] == 1024 * per_token
    assert cvc["bytes"]["MHA"][-1] == 8 * cvc["bytes"]["GQA"][-1] == 64 * cvc["bytes"]["MQA"][-1]
    assert cvc["bytes"]["MHA"][-1] == 320 * 2**30  # 128K tokens: the docstring's 320 GiB


def fake_timer(outlier_call: int):
    """A median_time_s stand-in: 1 ms for every call except one, which returns 1 s."""
    calls = []

    def median_time_s(fn, min_run_time=0.2):
        fn()
        calls.append(fn)
        return 1.0 if len(calls) == outlier_call else 1e-3

    return median_time_s, calls


@pytest.mark.parametrize("outlier_call", [1, 5, 23, 40])
def test_one_slow_round_does_not_move_a_decode_time_or_speedup(monkeypatch, outlier_call):
    timer, calls = fake_timer(outlier_call)
    monkeypatch.setattr(gqa, "median_time_s", timer)
    dec = gqa.benchmark_decode(32, 8, 4, [16, 32], 0.0, torch.device("cpu"), 3, 3)
    # 3 rounds x (2 contexts x 3 methods x 3 configs steps + 3 methods x 3 configs cores)
    assert len(calls) == 3 * (2 * 3 * 3 + 3 * 3) and dec["rounds"] == 3
    for cfg in dec["configs"].values():
        for m in SHARING_METHODS:
            assert cfg["step_ms"][m] == [1.0, 1.0] and cfg["core_ms_at_longest"][m] == 1.0
            assert cfg["speedup_vs_mha"][m] == [1.0, 1.0]
            assert all(len(r) == 3 for r in cfg["step_ms_rounds"][m])
    assert dec["largest_round_spread"] == pytest.approx(999.0)  # (1000 - 1) / 1 ms: reported


def test_decode_benchmark_gqa_has_a_divisor_of_n_heads_kv_heads(monkeypatch):
    monkeypatch.setattr(gqa, "median_time_s", lambda fn, min_run_time=0.2: 1e-3)
    dec = gqa.benchmark_decode(40, 20, 2, [8], 0.0, torch.device("cpu"), 1, 1)  # 20 // 8 = 2
    assert dec["configs"]["GQA"]["n_kv_heads"] == 2
    dec = gqa.benchmark_decode(50, 25, 2, [8], 0.0, torch.device("cpu"), 1, 1)  # 3 does not divide
    assert dec["configs"]["GQA"]["n_kv_heads"] == 1


def test_noisy_rounds_are_repeated_up_to_max_rounds(monkeypatch):
    # Times cycle through 7 values (18 calls a round): the per-round speed-ups scatter around 1
    # by more than their distance from 1, so the benchmark keeps measuring until max_rounds.
    times = iter([1e-3, 2e-3, 3e-3, 1.5e-3, 2.5e-3, 1.2e-3, 2.8e-3] * 1000)
    monkeypatch.setattr(gqa, "median_time_s", lambda fn, min_run_time=0.2: next(times))
    dec = gqa.benchmark_decode(32, 8, 4, [16], 0.0, torch.device("cpu"), 2, 5)
    assert dec["rounds"] == 5
    steady = iter([1e-3] * 1000)
    monkeypatch.setattr(gqa, "median_time_s", lambda fn, min_run_time=0.2: next(steady))
    assert gqa.benchmark_decode(32, 8, 4, [16], 0.0, torch.device("cpu"), 2, 5)["rounds"] == 2


def test_round_ratios_compare_times_taken_in_the_same_round():
    assert gqa.round_ratios([2.0, 20.0, 2.0], [1.0, 10.0, 10.0]) == [2.0, 2.0, 0.2]


# ----------------------------------------------------------------------------- words from numbers


@pytest.mark.parametrize(
    ("speedups", "words"),
    [
        ([1.5, 1.6, 1.7], "A was 1.60x faster than B"),
        ([0.5, 0.5, 0.6], "A was 2.00x slower than B"),  # contrary
        ([0.9, 1.0, 1.3], "A was not measurably faster than B (too noisy)"),  # noisy
    ],
)
def test_versus_follows_the_rounds(speedups, words):
    assert gqa.speedup_phrase("A", speedups, "B") == words


def test_titles_follow_the_numbers():
    fast = gqa.gqa_decode_time_title(4096, {"GQA": [1.5, 1.6], "MQA": [1.8, 2.0]})
    assert "GQA 1.55x faster than MHA" in fast and "4K" in fast
    contrary = gqa.gqa_decode_time_title(4096, {"GQA": [0.5, 0.5], "MQA": [0.9, 1.2]})
    assert "GQA 2.00x slower than MHA" in contrary and "MQA not measurably faster" in contrary
    time_title, memory_title = gqa.gqa_sharing_methods_titles(2048, [0.8, 1.3], 100, 100)
    assert "not measurably faster" in time_title and "x the copy-free" not in memory_title
    assert "(rounds 0.8-1.3x)" in time_title  # the spread behind the median, in the title
    assert "allocates 8.0x" in gqa.gqa_sharing_methods_titles(2048, [2.0, 3.0], 2**20, 8 * 2**20)[1]
    assert "allocates 2.5x" in gqa.gqa_sharing_methods_titles(2048, [2.0], 2**20, 5 * 2**19)[1]
    close = gqa.gqa_sharing_methods_titles(2048, [2.0], 100 * 2**10, 105 * 2**10)[1]
    assert "x the copy-free" not in close and "105.0 KiB" in close  # no rounded "1x"


def decode_for_note(gqa_core_ms: float) -> dict:
    """The numbers step_vs_cache_note reads: MHA's core streams 8 KV heads in 8 ms."""

    def cfg(n_kv: int, core_ms: float) -> dict:
        return {
            "n_kv_heads": n_kv,
            "bytes_read_per_step": [n_kv * 2**20],
            "core_ms_at_longest": {"grouped": core_ms},
            "core_gb_per_s_at_longest": {"grouped": 10.0},
            "core_flops_at_longest": 4e6,
        }

    configs = {"MHA": cfg(8, 8.0), "GQA": cfg(2, gqa_core_ms), "MQA": cfg(1, 1.5)}
    return {"d_model": 64, "n_heads": 8, "head_dim": 8, "configs": configs}


def test_step_vs_cache_note_follows_the_core_times():
    # GQA's 2 of 8 KV heads at MHA's bandwidth: 8 ms * 2 / 8 = 2 ms
    assert "as memory-bound as MHA's" in gqa.step_vs_cache_note(decode_for_note(1.9))
    slower = gqa.step_vs_cache_note(decode_for_note(3.0))
    assert "as memory-bound" not in slower and "would take 2.00 ms" in slower
    assert "its attention core takes 3.00 ms" in slower and "still takes 1.50 ms" in slower


def conv_rows(identical: float, similar: float, random: float) -> dict:
    rows = [
        {
            "group_size": 1,
            "relative_err_identical": 0.0,
            "relative_err_similar": 0.0,
            "relative_err_random": 0.0,
        },
        {
            "group_size": 2,
            "relative_err_identical": identical,
            "relative_err_similar": similar,
            "relative_err_random": random,
        },
    ]
    return {"rows": rows}


def test_conversion_title_follows_the_errors():
    assert "exact for identical heads" in gqa.gqa_conversion_title(conv_rows(1e-7, 0.1, 0.9))
    contrary = gqa.gqa_conversion_title(conv_rows(0.2, 0.9, 0.1))
    assert "not exact" in contrary and "not always better" in contrary


def test_claims_follow_contrary_and_noisy_timings(monkeypatch):
    monkeypatch.setattr(gqa, "median_time_s", lambda fn, min_run_time=0.2: 1e-3)
    dec = gqa.benchmark_decode(32, 8, 4, [16], 0.0, torch.device("cpu"), 2, 2)
    dec["configs"]["GQA"]["speedup_vs_mha_rounds"]["grouped"][-1] = [0.5, 0.5]  # contrary
    dec["configs"]["MQA"]["speedup_vs_mha_rounds"]["grouped"][-1] = [0.9, 1.2]  # noisy
    corr = {"max_abs_err": 1e-7, "atol": 1e-5, "all_within_atol": True}
    mem = gqa.analyze_cache_memory(1, 8, 4, 16, torch.device("cpu"))
    conv = gqa.analyze_conversion(16, 4, 0.1, torch.device("cpu"))
    claims = gqa.weigh_claims(corr, mem, dec, conv)
    assert not claims["gqa_decode"]["held"]
    assert "2.00x slower than MHA's" in claims["gqa_decode"]["statement"]
    assert not claims["mqa_decode"]["held"]
    assert "not measurably faster than MHA's" in claims["mqa_decode"]["statement"]
    # equal times in every round: neither faster nor slower
    assert not claims["copy_free_vs_repeat_kv"]["held"]
    assert "not measurably faster" in claims["copy_free_vs_repeat_kv"]["statement"]


# ----------------------------------------------------------------------------- bad input

LAYER = {"d_model": 64, "n_heads": 8, "n_kv_heads": 2, "max_seq_len": 16}


def layer(**changes):
    kw = {**LAYER, **changes}
    return GroupedQueryAttention(kw.pop("d_model"), kw.pop("n_heads"), kw.pop("n_kv_heads"), **kw)


def x_(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


Q, K, V = torch.randn(1, 8, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)

TYPES = {  # wrong types: floats, bools, None, strings where an int (or a tensor) is needed
    "d_model": lambda: layer(d_model=64.0),
    "n_heads": lambda: layer(n_heads=2.0, n_kv_heads=1),
    "n_kv_heads": lambda: layer(n_kv_heads=None),
    "head_dim": lambda: layer(head_dim=True),
    "max_seq_len": lambda: layer(max_seq_len=16.0),
    "rope_base": lambda: layer(rope_base="10000"),
    "bias": lambda: layer(bias=1),
    "sharing": lambda: layer(sharing=None),
    "start_pos": lambda: layer()(x_(1, 3, 64), 1.5),
    "cache": lambda: layer()(x_(1, 3, 64), 0, "a cache"),
    "batch_size": lambda: layer().new_cache(True),
    "dtype": lambda: layer().new_cache(1, dtype="float32"),
    "n_rep": lambda: repeat_kv(K, 2.0),
    "x": lambda: layer()([[0.0] * 64]),
    "attn": lambda: mha_to_gqa(nn.Linear(4, 4), 1),
    "mask": lambda: attend(Q, K, V, torch.ones(3, 5)),
    "x  ": lambda: repeat_kv([[0.0]], 2),
    "min_run_time": lambda: gqa.benchmark_decode(32, 8, 4, [16], "0.1", torch.device("cpu")),
}
RANGES = {  # values out of their range: sizes < 1, bases <= 1 or not finite, divisibility
    "d_model": lambda: layer(d_model=0),
    "n_heads": lambda: layer(d_model=96, n_heads=12, n_kv_heads=5),
    "n_kv_heads": lambda: layer(n_kv_heads=16),
    "head_dim": lambda: layer(head_dim=7),
    "max_seq_len": lambda: layer(max_seq_len=-1),
    "rope_base": lambda: layer(rope_base=float("nan")),
    "start_pos": lambda: layer()(x_(1, 3, 64), -1),
    "n_rep": lambda: repeat_kv(K, 0),
    "sharing": lambda: layer(sharing="fast"),
    "n_kv_heads ": lambda: mha_to_gqa(PlainMultiHeadAttention(64, 8, max_seq_len=8), 3),
    "batch_size": lambda: KVCache(0, 2, 8, 4),
}
LENGTHS = {  # sequence lengths against max_seq_len on every path
    "max_seq_len": lambda: layer()(x_(1, 17, 64)),
    "max_seq_len ": lambda: layer()(x_(1, 3, 64), 14),
    "max_seq_len  ": lambda: layer().new_cache(1, max_seq_len=17),
    "max_seq_len   ": lambda: KVCache(1, 2, 4, 8).update(x_(1, 2, 5, 8), x_(1, 2, 5, 8), 0),
    "start_pos": lambda: KVCache(1, 2, 8, 8).update(x_(1, 2, 1, 8), x_(1, 2, 1, 8), 3),
}
DTYPES = {  # floating tensors where floats are needed, and no silent casts
    "x": lambda: layer()(torch.ones(1, 3, 64, dtype=torch.long)),
    "x ": lambda: layer()(x_(1, 3, 64, dtype=torch.float64)),
    "q": lambda: attend(Q.long(), K, V),
    "k": lambda: KVCache(1, 2, 8, 8).update(x_(1, 2, 1, 8, dtype=torch.float64), x_(1, 2, 1, 8), 0),
    "dtype": lambda: layer().new_cache(1, dtype=torch.int64),
    "cache": lambda: layer()(x_(1, 3, 64), 0, KVCache(1, 2, 16, 8, torch.bfloat16)),
}
CONTRACTS = {  # shapes that must fit together
    "x": lambda: layer()(x_(1, 3, 63)),
    "x ": lambda: layer()(x_(3, 64)),
    "cache": lambda: layer()(x_(1, 3, 64), 0, KVCache(1, 4, 16, 8)),
    "cache ": lambda: layer()(x_(2, 3, 64), 0, KVCache(1, 2, 16, 8)),
    "k": lambda: attend(Q, x_(1, 3, 5, 8), x_(1, 3, 5, 8)),
    "v": lambda: attend(Q, K, x_(1, 2, 4, 8)),
    "mask": lambda: attend(Q, K, V, torch.ones(2, 2, dtype=torch.bool)),
    "mask ": lambda: attend(Q, K, V, torch.zeros(3, 5, dtype=torch.bool)),  # a row sees nothing
    "k ": lambda: KVCache(1, 2, 8, 4).update(x_(1, 3, 1, 4), x_(1, 3, 1, 4), 0),
    "k  ": lambda: attend(x_(1, 0, 3, 8), K, V),  # no query heads to share a KV head
    "x  ": lambda: repeat_kv(x_(2, 5, 8), 2),
}


def _raises_naming(family: dict, name: str) -> None:
    with pytest.raises((ValueError, TypeError), match=rf"\b{name.strip()}\b"):
        family[name]()


@pytest.mark.parametrize("name", list(TYPES))
def test_wrong_types_are_refused_naming_the_argument(name):
    _raises_naming(TYPES, name)


@pytest.mark.parametrize("name", list(RANGES))
def test_values_out_of_range_are_refused_naming_the_argument(name):
    _raises_naming(RANGES, name)


@pytest.mark.parametrize("name", list(LENGTHS))
def test_lengths_beyond_max_seq_len_are_refused(name):
    _raises_naming(LENGTHS, name)


@pytest.mark.parametrize("name", list(DTYPES))
def test_wrong_dtypes_are_refused_not_cast(name):
    _raises_naming(DTYPES, name)


@pytest.mark.parametrize("name", list(CONTRACTS))
def test_shapes_that_do_not_fit_are_refused(name):
    _raises_naming(CONTRACTS, name)


BAD_SIZES = st.one_of(
    st.integers(max_value=0),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)


@settings(max_examples=40, deadline=None)
@given(which=st.sampled_from(["d_model", "n_heads", "n_kv_heads", "max_seq_len"]), bad=BAD_SIZES)
def test_any_bad_size_is_refused_naming_it(which, bad):
    with pytest.raises((ValueError, TypeError), match=which):
        layer(**{which: bad})


def test_d_model_need_not_divide_when_head_dim_is_given():
    attn = GroupedQueryAttention(100, 8, 2, head_dim=16, max_seq_len=8)
    assert attn(torch.randn(1, 3, 100)).shape == (1, 3, 100)


# ----------------------------------------------------------------------------- smoke


def test_main_quick_writes_figures_and_results(run_main):
    run = run_main(gqa)
    assert [p.name for p in run.pngs] == sorted(
        f"{name}.png"
        for name in [
            "head_sharing",
            "cache_vs_context",
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
        "cache_vs_context",
        "decode",
        "conversion",
        "claims",
    ]
    assert r["correctness"]["all_within_atol"]
    assert r["cache_memory"]["measured_equals_formula"] and r["cache_memory"]["flops_equal_formula"]
    assert set(r["decode"]["configs"]) == {"MHA", "GQA", "MQA"}
    assert 3 <= r["decode"]["rounds"] <= r["decode"]["max_rounds"]
    assert f"median of {r['decode']['rounds']} rounds" in run.stdout
    claims = r["claims"]
    for c in claims.values():
        assert c["statement"] in run.stdout
    assert claims["correct"]["held"] and claims["cache_bytes"]["held"]
    assert claims["gqa_decode"]["held"] == (claims["gqa_decode"]["speedup_min"] > 1)
    # an allocation count, not a timing: the copy-free step never copies the cached keys
    memory = claims["copy_free_memory"]
    assert memory["held"] and memory["repeat_kv_peak_bytes"] > memory["k_cache_bytes"]
