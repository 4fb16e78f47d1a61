"""Tests for kv_caching.py: the cache changes how much is computed, never what is computed."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import kv_caching as kv
from kv_caching import GPT, ConcatKVCache, GPTConfig, KVCache

ATOL = 1e-5  # fp32 throughout
CFG = GPTConfig(vocab_size=97, max_seq_len=64, d_model=32, n_layers=2, n_heads=4)


def tiny_model(config: GPTConfig = CFG) -> GPT:
    """A small GPT with weights large enough that attention is far from uniform."""
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture
def model() -> GPT:
    return tiny_model()


def prompt_ids(batch: int = 1, length: int = 5, vocab: int = CFG.vocab_size) -> torch.Tensor:
    return torch.randint(vocab, (batch, length))


# ----- cached == uncached -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["static", "concat"])
def test_cached_logits_equal_uncached_at_every_step(model, kind):
    prompt = prompt_ids()
    ids_ref, logits_ref = model.generate(prompt, 20, use_cache=False, return_logits=True)
    ids, logits = model.generate(prompt, 20, cache_kind=kind, return_logits=True)
    torch.testing.assert_close(logits, logits_ref, atol=ATOL, rtol=0)
    assert torch.equal(ids, ids_ref)
    # Independently of generate(): the logits each token was picked from are those of one full
    # forward pass over the final sequence, at the position before that token.
    with torch.no_grad():
        full = model(ids)  # (1, 25, vocab)
    torch.testing.assert_close(logits, full[:, 4:-1], atol=ATOL, rtol=0)
    assert torch.equal(ids[:, 5:], full[:, 4:-1].argmax(-1))


def test_seeded_sampling_same_tokens_with_and_without_cache(model):
    prompt = prompt_ids()

    def sample(use_cache: bool, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return model.generate(
            prompt, 30, use_cache=use_cache, temperature=0.9, top_k=20, generator=gen
        )

    with_cache, without_cache = sample(True, 7), sample(False, 7)
    assert torch.equal(with_cache, without_cache)
    assert not torch.equal(with_cache, model.generate(prompt, 30))  # it really sampled
    assert not torch.equal(with_cache, sample(True, 8))  # and the seed matters


def test_top_k_1_is_greedy(model):
    prompt = prompt_ids()
    gen = torch.Generator().manual_seed(0)
    sampled = model.generate(prompt, 15, temperature=1.5, top_k=1, generator=gen)
    assert torch.equal(sampled, model.generate(prompt, 15))


@pytest.mark.parametrize("kind", ["static", "concat"])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_equals_one_forward(model, chunk, kind):
    ids = prompt_ids(length=23)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, kind)
        parts = [model(ids[:, s : s + chunk], cache, start_pos=s) for s in range(0, 23, chunk)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=ATOL, rtol=0)
    assert cache[0].length == 23


def test_causal_mask_is_offset_for_a_chunk_after_the_cache():
    # Query i of a 3-token chunk after 4 cached tokens sits at absolute position 4 + i and may
    # see keys 0 .. 4 + i. The top-left triangle (is_causal=True in SDPA) would be wrong here.
    q_len, kv_len = 3, 7
    expected = torch.tensor(
        [[j <= kv_len - q_len + i for j in range(kv_len)] for i in range(q_len)]
    )
    assert torch.equal(kv.causal_mask(q_len, kv_len), expected)
    assert not torch.equal(expected, torch.ones(q_len, kv_len, dtype=torch.bool).tril())


def test_batch_of_3_cached_equals_uncached_and_each_row_alone(model):
    prompts = prompt_ids(batch=3, length=6)
    ids, logits = model.generate(prompts, 12, return_logits=True)
    ids_ref, logits_ref = model.generate(prompts, 12, use_cache=False, return_logits=True)
    torch.testing.assert_close(logits, logits_ref, atol=ATOL, rtol=0)
    assert torch.equal(ids, ids_ref)
    for row in range(3):
        ids_row, logits_row = model.generate(prompts[row : row + 1], 12, return_logits=True)
        torch.testing.assert_close(logits[row : row + 1], logits_row, atol=ATOL, rtol=0)
        assert torch.equal(ids[row : row + 1], ids_row)


def test_static_and_concat_caches_hold_the_same_keys_and_values():
    static, concat = KVCache(2, 3, 16, 4), ConcatKVCache(2, 3, 16, 4)
    start = 0
    for n in (5, 1, 1, 3):  # a prefill, two decode steps, a chunk
        k, v = torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 4)
        ks, vs = static.update(k, v, start)
        kc, vc = concat.update(k, v, start)
        start += n
        assert ks.shape == kc.shape == (2, 3, start, 4)
        assert torch.equal(ks, kc) and torch.equal(vs, vc)
    assert static.length == concat.length == 10


def test_static_cache_writes_in_place_and_returns_views():
    cache = KVCache(1, 2, 8, 4)
    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    k_prefix, v_prefix = cache.update(k, v, 0)
    assert k_prefix.data_ptr() == cache.k_cache.data_ptr()  # a view, not a copy
    assert v_prefix.data_ptr() == cache.v_cache.data_ptr()
    assert torch.equal(cache.k_cache[:, :, :5], k)
    assert torch.count_nonzero(cache.k_cache[:, :, 5:]) == 0
    # Rewriting at start_pos 2 makes positions >= 3 stale: the cache then holds 3 tokens.
    k_prefix, _ = cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), 2)
    assert cache.length == 3 and k_prefix.shape[2] == 3


def test_explicit_softmax_path_equals_sdpa(model):
    explicit = GPT(replace(CFG, attn_impl="explicit")).eval()
    explicit.load_state_dict(model.state_dict())
    ids = prompt_ids(batch=2, length=11)
    with torch.no_grad():
        torch.testing.assert_close(explicit(ids), model(ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        explicit.generate(ids, 8, return_logits=True)[1],
        model.generate(ids, 8, return_logits=True)[1],
        atol=ATOL,
        rtol=0,
    )
    for q_len, kv_len in [(1, 9), (4, 9), (9, 9)]:  # decode, chunk, prefill
        q, k, v = (
            torch.randn(2, 3, q_len, 8),
            torch.randn(2, 3, kv_len, 8),
            torch.randn(2, 3, kv_len, 8),
        )
        torch.testing.assert_close(
            kv.attention(q, k, v, "explicit"), kv.attention(q, k, v, "sdpa"), atol=ATOL, rtol=0
        )


# ----- memory --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    n_heads=st.integers(1, 4),
    seq_len=st.integers(1, 33),
    head_dim=st.integers(1, 16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_measured_bytes_equal_formula(batch, n_heads, seq_len, head_dim, dtype):
    width = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}[dtype]
    expected = 2 * batch * n_heads * seq_len * head_dim * width  # K and V, one layer
    static = KVCache(batch, n_heads, seq_len, head_dim, dtype)
    assert (
        static.nbytes == expected == kv.kv_cache_bytes(1, batch, n_heads, seq_len, head_dim, width)
    )
    concat = ConcatKVCache(batch, n_heads, seq_len, head_dim, dtype)
    assert concat.nbytes == 0  # holds nothing yet, unlike the pre-allocated one
    kv_new = torch.zeros(batch, n_heads, seq_len, head_dim, dtype=dtype)
    concat.update(kv_new, kv_new, 0)
    assert concat.nbytes == expected


def test_memory_table_matches_formula_for_the_model_cache(model):
    result = kv.measure_memory(CFG, [4, 16])
    assert result["measured_equals_formula"]
    assert len(result["rows"]) == 4  # 2 dtypes x 2 lengths
    caches = model.new_cache(2, "static", max_seq_len=16)
    assert (
        sum(c.nbytes for c in caches) == 2 * CFG.n_layers * 2 * CFG.n_heads * 16 * CFG.head_dim * 4
    )


def test_real_model_table_uses_the_published_configs():
    rows = {r["name"]: r for r in kv.real_model_cache_table()["rows"]}
    # Llama-2-7B config.json: 32 layers, 32 heads of 128 dims; bf16 = 2 bytes.
    assert rows["Llama-2-7B"]["per_token_bytes"] == 2 * 32 * 32 * 128 * 2
    # GQA with 8 KV heads out of 64 (Llama-2-70B) caches 8x less than MHA would.
    assert (
        rows["Llama-2-70B"]["mha_equivalent_per_token_bytes"]
        == 8 * rows["Llama-2-70B"]["per_token_bytes"]
    )
    # DeepSeek-V3 config.json: 61 layers caching a 512-dim latent plus a 64-dim RoPE key.
    assert rows["DeepSeek-V3 (MLA)"]["per_token_bytes"] == 61 * (512 + 64) * 2
    assert rows["Llama-3-8B"]["at_context_bytes"]["131072"] == 131072 * 2 * 32 * 8 * 128 * 2


def test_reset_really_resets(model):
    prompt = prompt_ids()
    for kind in ("static", "concat"):
        cache = model.new_cache(1, kind)
        with torch.no_grad():
            first = model(prompt, cache)
            for layer in cache:
                layer.reset()
            assert all(layer.length == 0 for layer in cache)
            if kind == "static":
                assert all(torch.count_nonzero(c.k_cache) == 0 for c in cache)
            else:
                assert all(c.nbytes == 0 for c in cache)
            with pytest.raises(ValueError, match="would leave a gap"):
                model(prompt[:, :1], cache, start_pos=5)  # the old tokens are gone
            torch.testing.assert_close(model(prompt, cache), first, atol=ATOL, rtol=0)


def test_weight_bytes_count_the_tied_head_once():
    d, L, V, S = CFG.d_model, CFG.n_layers, CFG.vocab_size, CFG.max_seq_len
    # wte + wpe + per layer (12 d^2 weights + 9 d biases + 2 LayerNorms) + ln_f; no lm_head.
    expected = V * d + S * d + L * (12 * d * d + 9 * d + 4 * d) + 2 * d
    assert sum(p.numel() for p in GPT(CFG).parameters()) == expected


def test_concat_cost_counts_the_bytes_a_concat_step_copies(model):
    positions = [3, 9, 20]
    bench = {"positions": positions, "step_ms": {"static": [1.0] * 3, "concat": [1.0, 1.0, 1.5]}}
    cc = kv.concat_cost_analysis(model, bench, min_run_time=0.01)
    # The old prefix a concat step re-copies is exactly what a concat cache holding 20 tokens holds.
    caches = model.new_cache(1, "concat")
    with torch.no_grad():
        model(prompt_ids(length=20), caches)
    assert cc["bytes_copied_per_step"] == sum(c.nbytes for c in caches)
    assert cc["measured_concat_vs_static_ratio"] == pytest.approx(1.5)
    assert cc["predicted_concat_vs_static_ratio"] == pytest.approx(1 + cc["extra_ms"] / 1.0)
    # Llama-2-7B config.json: 32 layers x 32 KV heads x 128 dims, K and V, bf16, at 32K tokens.
    at_32k = cc["llama_2_7b"][1]
    assert at_32k["bytes_copied_per_step"] == 2 * 32 * 32 * 128 * 2 * 32768
    weights = cc["llama_2_7b_weight_bytes"]
    expected = 1 + 2 * at_32k["cache_bytes"] / (weights + at_32k["cache_bytes"])
    assert at_32k["memory_bound_concat_vs_static_ratio"] == pytest.approx(expected)
    assert at_32k["memory_bound_concat_vs_static_ratio"] > 2  # the cache outweighs the weights


def test_llama_param_count_matches_transformers():
    transformers = pytest.importorskip("transformers")
    m = next(r for r in kv.REAL_MODELS if r["name"] == "Llama-2-7B")
    config = transformers.LlamaConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["n_heads"] * m["head_dim"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["n_layers"],
        num_attention_heads=m["n_heads"],
        num_key_value_heads=m["n_kv_heads"],
        tie_word_embeddings=False,
    )
    with torch.device("meta"):  # shapes only, no memory
        hf = transformers.LlamaForCausalLM(config)
    assert kv.llama_param_count(m) == sum(p.numel() for p in hf.parameters())


def test_tiny_widths_keep_every_operator():
    tiny = kv.tiny_widths(CFG)
    assert (tiny.n_layers, tiny.n_heads, tiny.head_dim) == (CFG.n_layers, CFG.n_heads, 2)
    names = [n for n, _ in GPT(CFG).named_parameters()]
    assert [n for n, _ in GPT(tiny).named_parameters()] == names  # same modules, same order


@pytest.mark.parametrize(
    ("step", "overhead", "memory", "compute", "expected"),
    [
        (10.0, 6.0, 1.0, 0.1, "overhead"),  # most of the step is there at tiny widths too
        (42.0, 6.0, 20.0, 3.0, "memory"),  # GPT-2-small-like: the width-dependent part wins
        (42.0, 6.0, 3.0, 20.0, "arithmetic"),
    ],
)
def test_main_decode_cost_follows_the_measurements(step, overhead, memory, compute, expected):
    assert kv.main_decode_cost(step, overhead, memory, compute) == expected


# ----- FLOPs and scaling ----------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kv_len", [1, 10, 37])
def test_analytic_flops_match_the_flop_counter(kv_len, use_cache):
    model = tiny_model(replace(CFG, attn_impl="explicit"))
    ids = prompt_ids(length=kv_len)
    with torch.no_grad():
        if use_cache:
            cache = model.new_cache(1)
            if kv_len > 1:
                model(ids[:, :-1], cache)
            counter = FlopCounterMode(display=False)
            with counter:
                model(ids[:, -1:], cache, start_pos=kv_len - 1, last_only=True)
        else:
            counter = FlopCounterMode(display=False)
            with counter:
                model(ids, last_only=True)
    assert counter.get_total_flops() == kv.decode_step_flops(CFG, kv_len, use_cache)


def test_loglog_slope_recovers_a_power_law():
    x = [8, 16, 64, 300]
    assert kv.fit_loglog_slope(x, [3 * n**1.5 for n in x]) == pytest.approx(1.5)
    assert kv.fit_loglog_slope(x, [2.0] * 4) == pytest.approx(0.0, abs=1e-12)


def test_decode_grid_and_scaling_fit_on_synthetic_timings():
    positions = kv.decode_positions(16, 512, 8)
    assert positions[0] == 16 and positions[-1] == 510  # the first and last decode steps
    assert positions == sorted(set(positions))
    kv_lens = [p + 1 for p in positions]
    bench = {  # step time ~ n^1 without a cache, ~ n^0 with one
        "positions": positions,
        "step_ms": {
            "no_cache": [0.1 * n for n in kv_lens],
            "concat": [2.0] * 8,
            "static": [1.0] * 8,
        },
    }
    s = kv.scaling_analysis(CFG, bench)
    assert s["fitted_slope"]["no_cache"] == pytest.approx(1.0)
    assert s["fitted_slope"]["static"] == pytest.approx(0.0, abs=1e-9)
    assert s["flops_per_step"]["static"][0] == kv.decode_step_flops(CFG, 17, use_cache=True)


def test_attention_picture_is_a_causal_softmax(model):
    picture = kv.attention_picture(model, prompt_ids(length=8))
    weights = torch.tensor(picture["weights"])  # (8, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(8), atol=ATOL, rtol=0)
    assert torch.count_nonzero(weights.triu(diagonal=1)) == 0  # no query sees the future
    assert picture["scores_computed_no_cache"] == 64 and picture["scores_computed_with_cache"] == 8


# ----- Hugging Face GPT-2 ---------------------------------------------------------------------


def test_from_hf_gpt2_matches_transformers():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=97,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="eager",  # the plain softmax(q k^T / sqrt(d)) v reference
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so every mapping is exercised
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = GPT.from_hf_gpt2(hf).eval()
    ids = prompt_ids(batch=2, length=9)
    # No explicit causal mask at model level: GPT2LMHeadModel builds its own causal mask inside,
    # and its attention_mask argument only masks padding (all ones here: no padding).
    with torch.no_grad():
        expected = hf(ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(ours(ids), expected, atol=ATOL, rtol=0)
        hf_ids = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            min_new_tokens=12,
        )
    assert torch.equal(ours.generate(ids, 12), hf_ids)
    assert torch.equal(ours.generate(ids, 12, use_cache=False), hf_ids)
    from_state = GPT.from_hf_gpt2(hf.state_dict(), n_heads=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_state(ids), expected, atol=ATOL, rtol=0)


def test_hf_demo_without_weights_says_so_and_carries_on():
    pytest.importorskip("transformers")
    result = kv.hf_demo("kv-caching-tests/no-such-model", torch.device("cpu"), 4, 0.01)
    assert result["available"] is False and "no local copy" in result["reason"]


# ----- bad input ------------------------------------------------------------------------------


def test_d_model_must_be_divisible_by_n_heads():
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_heads \(4\)"):
        GPTConfig(d_model=30, n_heads=4)


def test_prompt_plus_new_tokens_must_fit(model):
    with pytest.raises(ValueError, match=r"max_seq_len \(64\): at most 59 new tokens fit"):
        model.generate(prompt_ids(length=5), 60)


def test_writing_past_the_cache_end(model):
    cache = KVCache(1, 2, 4, 8)
    cache.update(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), 0)
    with pytest.raises(
        ValueError, match=r"cache overflow: writing 3 tokens at start_pos 2 needs 5"
    ):
        cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 2)
    caches = model.new_cache(1, "concat", max_seq_len=4)
    with pytest.raises(ValueError, match=r"max_seq_len is 4 \(room for 4 more\)"):
        model(prompt_ids(length=5), caches)


def test_start_pos_must_not_leave_a_gap(model):
    caches = model.new_cache(1)
    with torch.no_grad():
        model(prompt_ids(length=3), caches)
    with pytest.raises(ValueError, match=r"start_pos \(4\) would leave a gap: the cache holds 3"):
        model(prompt_ids(length=1), caches, start_pos=4)
    with pytest.raises(ValueError, match=r"start_pos \(2\) must be 0 when no cache is given"):
        model(prompt_ids(length=1), start_pos=2)


@pytest.mark.parametrize("kind", ["static", "concat"])
def test_negative_start_pos(model, kind):
    cache = kv.CACHE_KINDS[kind](1, 2, 8, 4)
    k = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match=r"^start_pos \(-1\) must be >= 0$"):
        cache.update(k, k, -1)
    assert cache.length == 0  # nothing was written
    caches = model.new_cache(1, kind)
    with pytest.raises(ValueError, match=r"^start_pos \(-1\) must be >= 0$"):
        model(prompt_ids(length=1), caches, start_pos=-1)


@pytest.mark.parametrize("kind", ["static", "concat"])
@pytest.mark.parametrize("arg", ["batch_size", "n_heads", "max_seq_len", "head_dim"])
@pytest.mark.parametrize("value", [0, -2])
def test_cache_sizes_must_be_at_least_1(kind, arg, value):
    sizes = {"batch_size": 1, "n_heads": 2, "max_seq_len": 8, "head_dim": 4, arg: value}
    with pytest.raises(ValueError, match=rf"^{arg} \({value}\) must be >= 1$"):
        kv.CACHE_KINDS[kind](**sizes)


@pytest.mark.parametrize("kind", ["static", "concat"])
@pytest.mark.parametrize(
    ("bad_shape", "why"),
    [
        ((2, 2, 1, 4), "batch"),
        ((1, 3, 1, 4), "n_heads"),
        ((1, 2, 1, 5), "head_dim"),
        ((2, 1, 4), "not 4-d"),
    ],
)
def test_cache_update_checks_k_and_v_shapes(kind, bad_shape, why):
    cache = kv.CACHE_KINDS[kind](1, 2, 8, 4)
    good, bad = torch.zeros(1, 2, 1, 4), torch.zeros(bad_shape)
    expected = r"must have shape \(batch_size, n_heads, n, head_dim\) = \(1, 2, n, 4\)"
    with pytest.raises(ValueError, match=rf"^k \(shape {re.escape(str(bad_shape))}\) {expected}"):
        cache.update(bad, good, 0)
    with pytest.raises(ValueError, match=rf"^v \(shape {re.escape(str(bad_shape))}\) {expected}"):
        cache.update(good, bad, 0)
    assert cache.length == 0, why


@pytest.mark.parametrize("kind", ["static", "concat"])
def test_cache_update_needs_as_many_values_as_keys(kind):
    cache = kv.CACHE_KINDS[kind](1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"v \(shape \(1, 2, 3, 4\)\) must have the shape of k"):
        cache.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 3, 4), 0)


def test_temperature_must_not_be_negative(model):
    with pytest.raises(ValueError, match=r"temperature \(-0.5\) must be >= 0"):
        model.generate(prompt_ids(), 3, temperature=-0.5)


def test_top_k_must_be_at_least_1(model):
    with pytest.raises(ValueError, match=r"top_k \(0\) must be >= 1"):
        model.generate(prompt_ids(), 3, temperature=1.0, top_k=0)


def test_empty_prompt(model):
    with pytest.raises(ValueError, match=r"idx is empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)


@pytest.mark.parametrize("bad", [-1, 97])
def test_token_ids_outside_the_vocabulary(model, bad):
    ids = prompt_ids()
    ids[0, 2] = bad
    with pytest.raises(ValueError, match=rf"token id {bad}, outside the vocabulary \[0, 96\]"):
        model.generate(ids, 3)


def test_unknown_choices_list_the_valid_ones(model):
    with pytest.raises(ValueError, match=r"kind \('paged'\) must be one of 'static', 'concat'"):
        model.new_cache(1, "paged")
    with pytest.raises(ValueError, match=r"attn_impl \('flash'\) must be one of"):
        GPTConfig(attn_impl="flash")


# ----- the script ------------------------------------------------------------------------------


def test_main_quick_smoke(run_main):
    run = run_main(kv)
    assert {p.name for p in run.pngs} == {
        "decode_time.png",
        "cumulative_time.png",
        "cache_vs_context.png",
        "real_model_cache.png",
        "decode_attention.png",
    }
    r = run.results
    assert set(r) == {
        "meta",
        "config",
        "correctness",
        "decode",
        "scaling",
        "concat_cost",
        "memory",
        "real_models",
        "bandwidth",
        "hf_demo",
        "goals",
        "attention_picture",
    }
    c = r["correctness"]
    for kind in ("static", "concat"):
        assert c[f"max_abs_err_logits_{kind}_vs_no_cache"] < ATOL
        assert c[f"ids_identical_{kind}_vs_no_cache"] is True
    assert c["max_abs_err_chunked_prefill"] < ATOL and c["max_abs_err_explicit_vs_sdpa"] < ATOL
    assert set(r["decode"]["step_ms"]) == {"no_cache", "concat", "static"}
    assert all(t > 0 for ts in r["decode"]["step_ms"].values() for t in ts)
    assert r["memory"]["measured_equals_formula"] is True
    assert r["scaling"]["analytic_flops_slope"]["no_cache"] > 0.9  # derived, not timed
    assert abs(r["scaling"]["analytic_flops_slope"]["static"]) < 0.2
    assert set(r["goals"]) >= {
        "static_vs_no_cache_speedup",
        "static_at_least_10x_faster",
        "static_last_vs_first_step_ratio",
        "static_nearly_flat_within_1_5x",
        "static_no_slower_than_concat_at_longest",
        "bandwidth_utilisation_ratio",
        "main_cost",
    }
    for bw in r["bandwidth"]["models"]:
        assert bw["bytes_read_per_step"] == bw["weight_bytes"] + bw["cache_bytes"]
        assert bw["main_cost"] == kv.MAIN_COSTS[bw["main_cost_kind"]]
        assert bw["main_cost_kind"] == kv.main_decode_cost(
            bw["step_ms"], bw["overhead_ms"], bw["memory_floor_ms"], bw["compute_floor_ms"]
        )
    assert r["bandwidth"]["matvec_bandwidth_gb_per_s"] > 0
    assert r["concat_cost"]["position"] == r["decode"]["positions"][-1]
    assert r["hf_demo"]["available"] is False
    assert math.isfinite(r["goals"]["bandwidth_utilisation_ratio"])
