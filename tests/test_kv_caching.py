"""Tests for kv_caching.py: the cache changes how much is computed, never what is computed."""

from __future__ import annotations

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
        cache = model.new_cache(1, kind=kind)
        parts = [model(ids[:, s : s + chunk], s, cache) for s in range(0, 23, chunk)]
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
    caches = model.new_cache(2, max_seq_len=16)
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
    by_model = kv.real_model_cache_table()["at_context_bytes"]  # the README's keys
    assert by_model["llama_3_8b"] == rows["Llama-3-8B"]["at_context_bytes"]
    assert by_model["deepseek_v3_mla"] == rows["DeepSeek-V3 (MLA)"]["at_context_bytes"]
    assert len(by_model) == len(rows)  # no two models share a key


def test_reset_really_resets(model):
    prompt = prompt_ids()
    for kind in ("static", "concat"):
        cache = model.new_cache(1, kind=kind)
        with torch.no_grad():
            first = model(prompt, cache=cache)
            for layer in cache:
                layer.reset()
            assert all(layer.length == 0 for layer in cache)
            if kind == "static":
                assert all(torch.count_nonzero(c.k_cache) == 0 for c in cache)
            else:
                assert all(c.nbytes == 0 for c in cache)
            with pytest.raises(ValueError, match="would leave a gap"):
                model(prompt[:, :1], start_pos=5, cache=cache)  # the old tokens are gone
            torch.testing.assert_close(model(prompt, cache=cache), first, atol=ATOL, rtol=0)


def test_weight_bytes_count_the_tied_head_once():
    d, L, V, S = CFG.d_model, CFG.n_layers, CFG.vocab_size, CFG.max_seq_len
    # wte + wpe + per layer (12 d^2 weights + 9 d biases + 2 LayerNorms) + ln_f; no lm_head.
    expected = V * d + S * d + L * (12 * d * d + 9 * d + 4 * d) + 2 * d
    assert sum(p.numel() for p in GPT(CFG).parameters()) == expected


def test_concat_cost_counts_the_bytes_a_concat_step_copies(model, monkeypatch):
    positions = [3, 9, 20]
    # Cache updates that take 3, 4, 3 ms (concat) and 1 ms (static) per round, next to a 1 ms
    # static step: 2, 3, 2 ms extra, so the concat step should take 3x, 4x, 3x a static step.
    rounds = {"concat": [0.003, 0.004, 0.003], "static": [0.001] * 3}
    monkeypatch.setattr(kv, "interleaved_rounds", lambda fns, *a, **k: rounds)
    measured = kv.spread([1.4, 1.5, 1.6])  # per-round concat/static ratios at the last position
    bench = {
        "positions": positions,
        "step_ms": {"static": [1.0] * 3, "concat": [1.0, 1.0, 1.5]},
        "concat_vs_static_at_longest_spread": measured,
    }
    cc = kv.concat_cost_analysis(model, bench, min_run_time=0.01)
    # The old prefix a concat step re-copies is exactly what a concat cache holding 20 tokens holds.
    caches = model.new_cache(1, kind="concat")
    with torch.no_grad():
        model(prompt_ids(length=20), cache=caches)
    assert cc["bytes_copied_per_step"] == sum(c.nbytes for c in caches)
    assert cc["measured_concat_vs_static_spread"] == measured
    predicted = cc["predicted_concat_vs_static_spread"]  # 1 + extra update time / static step
    assert (predicted["lo"], predicted["center"], predicted["hi"]) == pytest.approx((3, 3, 4))
    assert cc["extra_ms"] == pytest.approx(2.0) and cc["update_ms"]["concat"] == pytest.approx(3)
    # Llama-2-7B config.json: 32 layers x 32 KV heads x 128 dims, K and V, bf16, at 32K tokens.
    at_32k = cc["llama_2_7b"][1]
    assert at_32k["bytes_copied_per_step"] == 2 * 32 * 32 * 128 * 2 * 32768
    weights = cc["llama_2_7b_weight_bytes"]
    expected = 1 + 2 * at_32k["cache_bytes"] / (weights + at_32k["cache_bytes"])
    assert at_32k["memory_bound_concat_vs_static_ratio"] == pytest.approx(expected)
    assert at_32k["memory_bound_concat_vs_static_ratio"] > 2  # the cache outweighs the weights


def test_llama_param_count_matches_transformers():
    transformers = pytest.importorskip("transformers")
    m = next(r for r in kv.RELEASED_MODELS if r["name"] == "Llama-2-7B")
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
        (23.0, 1.98, 3.45, 0.31, "unexplained"),  # neither floor covers half of 21 ms
        (1.0, 1.2, 0.5, 0.1, "not_separable"),  # tiny widths slower than the step: noise
        (1.0, 1.0, 0.5, 0.1, "not_separable"),
    ],
)
def test_main_decode_cost_follows_the_measurements(step, overhead, memory, compute, expected):
    assert kv.main_decode_cost(step, overhead, memory, compute) == expected


def test_an_impossible_utilisation_is_remeasured_then_dropped(model, monkeypatch):
    calls = []

    def slow_copy(n_bytes, device, min_run_time):  # a copy benchmark that underestimates
        calls.append(n_bytes)
        return 1e-6  # GB/s: any real step moves more than this

    monkeypatch.setattr(kv, "copy_bandwidth_gb_per_s", slow_copy)
    bw = kv.bandwidth_analysis({"tiny": model}, 4, 2**16, 0.01, 0)
    assert bw["bandwidth_remeasured"] and calls == [2**16, 4 * 2**16]  # measured again, 4x bytes
    row = bw["models"][0]
    assert row["bandwidth_utilisation_ratio"] is None and row["matvec_utilisation_ratio"] is None
    assert "measurement is wrong" in row["utilisation_note"]
    assert "%" not in kv.bound_claim(row)["statement"]


def test_an_overhead_above_the_step_is_reported_as_noise_not_clamped(model, monkeypatch, capsys):
    # The --quick run the reviewer saw: the tiny-width step timed slower than the real step.
    for probe in ("copy_bandwidth_gb_per_s", "matvec_bandwidth_gb_per_s"):
        monkeypatch.setattr(kv, probe, lambda *args: 1e3)  # GB/s
    monkeypatch.setattr(kv, "matmul_flops_per_s", lambda *args: 1e12)
    steps = iter([0.002, 0.003])  # real step 2 ms, then the tiny-width step 3 ms
    monkeypatch.setattr(kv, "median_time_s", lambda fn, t=0.2: next(steps))
    bw = kv.bandwidth_analysis({"tiny": model}, 4, 2**16, 0.01, 0)
    row = bw["models"][0]
    assert row["overhead_share_ratio"] is None and row["main_cost_kind"] == "not_separable"
    assert not any(key.startswith("beyond") for key in row)
    kv.print_bandwidth(bw)
    out = capsys.readouterr().out
    assert "timing noise" in out and "of the step" not in out
    c = kv.bound_claim(row)
    assert not c["held"] and "not separable" in c["statement"]


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
                model(ids[:, :-1], cache=cache)
            counter = FlopCounterMode(display=False)
            with counter:
                model(ids[:, -1:], kv_len - 1, cache, last_only=True)
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
    step_ms = {  # step time ~ n^1 without a cache, ~ n^0 with one
        "no_cache": [0.1 * n for n in kv_lens],
        "concat": [2.0] * 8,
        "static": [1.0] * 8,
    }
    # Two rounds: the second 10% slower at the long contexts (a slope a little above the first).
    rounds = {
        m: [[t, t * (1.1 if i >= 4 else 1.0)] for i, t in enumerate(ts)]
        for m, ts in step_ms.items()
    }
    growth = {  # last step / first step, per round
        m: kv.spread([r_last / r_first for r_first, r_last in zip(ts[0], ts[-1], strict=True)])
        for m, ts in rounds.items()
    }
    bench = {"positions": positions, "step_ms": step_ms, "step_ms_rounds": rounds, "rounds": 2}
    bench["static_last_vs_first_step_spread"] = growth["static"]  # 1.0x and 1.1x: flat
    bench["no_cache_last_vs_first_step_spread"] = growth["no_cache"]
    s = kv.scaling_analysis(CFG, bench)
    assert "nearly flat" in s["verdict"] and "\n" not in s["verdict"]
    assert s["fitted_slope"]["no_cache"] == pytest.approx(1.0)
    assert s["fitted_slope"]["static"] == pytest.approx(0.0, abs=1e-9)
    assert s["fitted_slope_spread"]["static"]["lo"] == pytest.approx(0.0, abs=1e-9)
    assert s["fitted_slope_spread"]["static"]["hi"] > 0.01
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


def test_cache_contents_equal_transformers_past_key_values():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        attn_implementation="eager",
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = GPT.from_hf_gpt2(hf).eval()
    ids, n = prompt_ids(batch=2, length=9), 9
    cache = ours.new_cache(2)
    with torch.no_grad():
        out = hf(ids, attention_mask=torch.ones_like(ids), use_cache=True)
        ours(ids[:, :6], cache=cache)  # a prefill, then a chunk after the cached tokens
        ours(ids[:, 6:], start_pos=6, cache=cache)
    pkv = out.past_key_values
    for i, layer in enumerate(cache):  # both (batch, n_heads, seq_len, head_dim)
        hf_k = pkv.layers[i].keys if hasattr(pkv, "layers") else pkv[i][0]
        hf_v = pkv.layers[i].values if hasattr(pkv, "layers") else pkv[i][1]
        torch.testing.assert_close(layer.k_cache[:, :, :n], hf_k, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.v_cache[:, :, :n], hf_v, atol=ATOL, rtol=0)
        assert layer.length == n and not layer.k_cache[:, :, n:].any()  # nothing past n written


def test_warm_up_round_is_discarded_and_rounds_continue_until_settled(monkeypatch):
    times = iter([100.0, 100.0] + [1.0, 2.0] * kv.MAX_ROUNDS)  # warm-up round: 100 s outliers
    monkeypatch.setattr(kv, "median_time_s", lambda fn, t=0.2: next(times))
    got = kv.interleaved_rounds({"a": lambda: None, "b": lambda: None}, 0.01)
    assert got == {"a": [1.0] * kv.ROUNDS, "b": [2.0] * kv.ROUNDS}  # no 100 s round kept
    times = iter([1.0] * (2 + 2 * kv.MAX_ROUNDS))
    never = kv.interleaved_rounds({"a": lambda: None, "b": lambda: None}, 0.01, settled=lambda t: 0)
    assert len(never["a"]) == len(never["b"]) == kv.MAX_ROUNDS


@pytest.mark.parametrize(("q_len", "kv_len"), [(1, 9), (4, 9), (9, 9)])  # decode, chunk, prefill
def test_attention_matches_transformers_eager_attention_with_an_explicit_causal_mask(q_len, kv_len):
    pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    q, k, v = (
        torch.randn(2, 3, q_len, 8),
        torch.randn(2, 3, kv_len, 8),
        torch.randn(2, 3, kv_len, 8),
    )
    # The queries are the last q_len positions: query i sees keys j <= kv_len - q_len + i.
    allowed = torch.tensor([[j <= kv_len - q_len + i for j in range(kv_len)] for i in range(q_len)])
    additive = torch.zeros(q_len, kv_len).masked_fill(~allowed, float("-inf"))
    expected, _ = eager_attention_forward(torch.nn.Module().eval(), q, k, v, additive)
    for impl in ("explicit", "sdpa"):  # HF returns (batch, q_len, heads, head_dim)
        torch.testing.assert_close(
            kv.attention(q, k, v, impl).transpose(1, 2), expected, atol=ATOL, rtol=0
        )


def test_hf_demo_without_weights_says_so_and_carries_on():
    pytest.importorskip("transformers")
    result = kv.hf_demo("kv-caching-tests/no-such-model", torch.device("cpu"), 4, 0.01)
    assert result["available"] is False and "no local copy" in result["reason"]


# ----- bad input: one test per rule family ---------------------------------------------------


def hf_gpt2(**overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, attn_implementation="eager", **overrides,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


CACHE_ARGS = {"batch_size": 1, "n_kv_heads": 2, "max_seq_len": 8, "head_dim": 4}
K1 = torch.zeros(1, 2, 1, 4)


@pytest.mark.parametrize("kind", ["static", "concat"])
@pytest.mark.parametrize("arg", list(CACHE_ARGS))
@pytest.mark.parametrize("value", [2.0, True, None, "3"])
def test_types_sizes_must_be_ints(kind, arg, value):
    with pytest.raises(TypeError, match=arg):
        kv.CACHE_KINDS[kind](**{**CACHE_ARGS, arg: value})


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda m: GPTConfig(n_heads=2.0), "n_heads"),
        (lambda m: GPTConfig(vocab_size=True), "vocab_size"),
        (lambda m: GPTConfig(layer_norm_eps="x"), "layer_norm_eps"),
        (lambda m: GPTConfig(bias="yes"), "bias"),
        (lambda m: m.generate(prompt_ids(), True), "max_new_tokens"),  # a bool is not a count
        (lambda m: m.generate(prompt_ids(), 2.5), "max_new_tokens"),
        (lambda m: m.generate(prompt_ids(), 3, temperature="hot"), "temperature"),
        (lambda m: m.generate(prompt_ids(), 3, temperature=1.0, top_k=1.5), "top_k"),
        (lambda m: m.generate(prompt_ids(), 3, use_cache="no"), "use_cache"),
        (lambda m: m.generate(prompt_ids(), 3, temperature=1.0, generator=7), "generator"),
        (lambda m: m(prompt_ids(), start_pos=1.5, cache=m.new_cache(1)), "start_pos"),
        (lambda m: m(prompt_ids(), start_pos=True, cache=m.new_cache(1)), "start_pos"),
        (lambda m: m([[1, 2]]), "x"),
        (lambda m: m.new_cache(2.0), "batch_size"),
        (lambda m: m.new_cache(1, max_seq_len=True), "max_seq_len"),
        (lambda m: m.new_cache(1, dtype="x"), "dtype"),  # as grouped_query_attention's
        (lambda m: GPT.from_hf_gpt2("gpt2"), "model_or_state_dict"),
        (lambda m: GPT.from_hf_gpt2(torch.nn.Linear(2, 2)), "model_or_state_dict"),
        (lambda m: kv.tiny_widths("config"), "config"),
    ],
)
def test_types(model, call, name):
    with pytest.raises(TypeError, match=name):
        call(model)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda m: GPTConfig(d_model=30, n_heads=4), "d_model"),  # divisibility
        (lambda m: GPTConfig(n_layers=0), "n_layers"),
        (lambda m: GPTConfig(layer_norm_eps=-1.0), "layer_norm_eps"),  # NaN otherwise
        (lambda m: GPTConfig(layer_norm_eps=float("nan")), "layer_norm_eps"),
        (lambda m: GPTConfig(attn_impl="flash"), "attn_impl"),
        (lambda m: kv.attention(K1, K1, K1, impl="flash"), "impl"),  # no quiet SDPA fall-back
        (lambda m: m.generate(prompt_ids(), 0), "max_new_tokens"),
        (lambda m: m.generate(prompt_ids(), 3, temperature=-1.0), "temperature"),
        (lambda m: m.generate(prompt_ids(), 3, temperature=float("inf")), "temperature"),
        (lambda m: m.generate(prompt_ids(), 3, temperature=1.0, top_k=0), "top_k"),
        (lambda m: kv.sample_next(torch.randn(2, 9), temperature=-1.0), "temperature"),
        (lambda m: kv.sample_next(torch.randn(2, 9), temperature=1.0, top_k=0), "top_k"),
        (lambda m: m.generate(prompt_ids(), 3, cache_kind="paged"), "cache_kind"),
        (lambda m: m.new_cache(1, kind="paged"), "kind"),
        (lambda m: m.new_cache(0), "batch_size"),
        (lambda m: m.new_cache(1, max_seq_len=0), "max_seq_len"),  # no fall-back to the default
        (lambda m: KVCache(1, 2, 8, 4).update(K1, K1, -1), "start_pos"),
        (lambda m: m(prompt_ids(), start_pos=-1, cache=m.new_cache(1)), "start_pos"),
        (lambda m: kv.decode_step_flops(CFG, 0, True), "kv_len"),
        (lambda m: kv.fit_loglog_slope([1, 2, 3], [1.0, 0.0, 2.0]), "y"),
        (lambda m: kv.decode_positions(16, 10, 4), "total_len"),
        (lambda m: kv.measure_memory(CFG, []), "lengths"),
        (lambda m: kv.real_model_cache_table(0), "bytes_per_element"),
        (lambda m: kv.attention_picture(m, prompt_ids(), layer=9), "layer"),
        (lambda m: kv.main_decode_cost(-1.0, 1.0, 1.0, 1.0), "step_s"),
        (lambda m: kv.interleaved_rounds({}, 0.01), "fns"),
        (lambda m: kv.interleaved_rounds({"a": lambda: None}, 0.0), "min_run_time"),
        (lambda m: kv.spread([]), "values"),
    ],
)
def test_ranges(model, call, name):
    with pytest.raises(ValueError, match=name):
        call(model)


def test_lengths(model):
    """Sequence length against max_seq_len (64) on every path, and the cache's own rules."""
    cases = [
        (lambda: model.generate(prompt_ids(length=5), 60), r"max_new_tokens \(60\)"),
        (lambda: model.generate(prompt_ids(length=5), 10**6, use_cache=False), "max_new_tokens"),
        (lambda: model(prompt_ids(length=65)), "max_seq_len"),
        (
            lambda: model(prompt_ids(length=3), start_pos=62, cache=model.new_cache(1)),
            "max_seq_len",
        ),
        (lambda: model.new_cache(1, max_seq_len=65), "max_seq_len"),
        (lambda: model(prompt_ids(length=1), start_pos=2), "start_pos"),  # no cache: start at 0
        (lambda: model(prompt_ids(length=1), start_pos=4, cache=model.new_cache(1)), "start_pos"),
        (lambda: model(prompt_ids(length=5), cache=model.new_cache(1, 4)), "overflow"),
        (lambda: model(prompt_ids(), cache=model.new_cache(1)[:1]), "cache"),
        (lambda: model(prompt_ids(batch=2), cache=model.new_cache(1)), "cache"),
        (lambda: model(torch.zeros(1, 0, dtype=torch.long)), "x"),
        (lambda: model.generate(torch.zeros(1, 0, dtype=torch.long), 3), "ids"),
        (lambda: KVCache(1, 2, 4, 4).update(*[torch.zeros(1, 2, 5, 4)] * 2, 0), "overflow"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


@pytest.mark.parametrize("kind", ["static", "concat"])
@pytest.mark.parametrize(
    ("k", "v", "name"),
    [
        (torch.zeros(1, 2, 1, 4, dtype=torch.float64), None, "k"),  # no silent cast to float32
        (torch.zeros(1, 2, 1, 4, dtype=torch.long), None, "k"),
        (K1, torch.zeros(1, 2, 1, 4, dtype=torch.float64), "v"),
        (torch.zeros(2, 2, 1, 4), None, "k"),  # batch
        (torch.zeros(1, 3, 1, 4), None, "k"),  # heads
        (torch.zeros(1, 2, 1, 5), None, "k"),  # head_dim
        (torch.zeros(2, 1, 4), None, "k"),  # not 4-d
        (K1, torch.zeros(1, 2, 3, 4), "v"),  # as many values as keys
    ],
)
def test_dtypes_and_shapes_at_the_cache(kind, k, v, name):
    cache = kv.CACHE_KINDS[kind](**CACHE_ARGS)
    with pytest.raises(ValueError, match=rf"^{name} "):
        cache.update(k, k if v is None else v, 0)
    assert cache.length == 0  # nothing was written


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda m: m(prompt_ids().float()), "x"),  # ids must be integers
        (lambda m: m(prompt_ids()[0]), "x"),  # and (batch, seq_len)
        (lambda m: m(torch.tensor([[1, 97]])), "x"),  # in the vocabulary
        (lambda m: m.generate(torch.tensor([[-1, 2]]), 3), "ids"),
        (lambda m: m.new_cache(1, dtype=torch.long), "dtype"),
        (lambda m: kv.sample_next(torch.ones(2, 9, dtype=torch.long), 1.0), "logits"),
        (lambda m: kv.sample_next(torch.randn(1, 2, 9), 1.0), "logits"),
        (lambda m: kv.attention(K1.long(), K1, K1), "q"),
        (lambda m: kv.attention(K1, K1.double(), K1), "k"),
        (lambda m: kv.attention(torch.zeros(2, 1, 4), K1, K1), "q"),
        (lambda m: kv.attention(K1, torch.zeros(1, 2, 3, 5), K1), "k"),
    ],
)
def test_dtypes_and_shapes_at_the_model(model, call, name):
    with pytest.raises(ValueError, match=name):
        call(model)


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_contract_no_more_queries_than_keys(impl):
    # Explicit gave NaN rows and SDPA another (finite) answer; both refuse now.
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="q, k, v lengths"):
        kv.attention(q, k, k, impl)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"scale_attn_weights": False}, "scale_attn_weights"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"n_inner": 100}, "n_inner"),
        ({"activation_function": "relu"}, "activation_function"),
    ],
)
def test_contract_from_hf_gpt2_refuses_configs_it_does_not_implement(overrides, name):
    with pytest.raises(ValueError, match=name):
        GPT.from_hf_gpt2(hf_gpt2(**overrides))


def test_contract_from_hf_gpt2_checks_state_dicts():
    hf = hf_gpt2()
    with pytest.raises(ValueError, match="n_heads"):  # shapes do not give the head count
        GPT.from_hf_gpt2(hf.state_dict())
    with pytest.raises(ValueError, match="n_heads"):  # ... and 3 does not divide d_model 32
        GPT.from_hf_gpt2(hf.state_dict(), n_heads=3)
    with pytest.raises(ValueError, match=r"n_heads \(2\) disagrees"):
        GPT.from_hf_gpt2(hf, n_heads=2)
    with pytest.raises(ValueError, match=r"missing keys \['transformer.wte.weight'"):
        GPT.from_hf_gpt2({"model.embed_tokens.weight": torch.zeros(5, 4)}, n_heads=1)
    state = hf.state_dict()
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing 1 GPT-2 keys: \['transformer.h.1.mlp.c_fc"):
        GPT.from_hf_gpt2(state, n_heads=4)
    state = hf.state_dict()
    state["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(32, 100)  # n_inner 100
    with pytest.raises(ValueError, match="mlp.c_fc.weight"):
        GPT.from_hf_gpt2(state, n_heads=4)


def test_contract_hf_demo_checks_a_local_folder_first(tmp_path):
    with pytest.raises(ValueError, match="name"):
        kv.hf_demo(str(tmp_path), torch.device("cpu"), 4, 0.01)  # no config.json: no checkpoint
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a GPT-2 config"):
        kv.hf_demo(str(tmp_path), torch.device("cpu"), 4, 0.01)


def test_contract_bad_hf_model_folder_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        kv.main(["--quick", "--no-show", "--out", str(out), "--hf-model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--hf-model" in capsys.readouterr().err
    assert not out.exists()


@settings(max_examples=40, deadline=None)
@given(
    arg=st.sampled_from(["vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"]),
    value=st.one_of(
        st.integers(max_value=0),
        st.floats(allow_nan=True),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
    ),
)
def test_hypothesis_bad_sizes_are_refused_naming_the_argument(arg, value):
    with pytest.raises((ValueError, TypeError), match=arg):
        GPTConfig(**{arg: value})


# ----- edge cases with a correct answer ---------------------------------------------------------


def test_a_batch_of_zero_gives_empty_results(model):
    empty = torch.zeros(0, 5, dtype=torch.long)
    with torch.no_grad():
        assert model(empty).shape == (0, 5, CFG.vocab_size)
    ids, logits = model.generate(empty, 3, return_logits=True)
    assert ids.shape == (0, 8) and logits.shape == (0, 3, CFG.vocab_size)


def test_meta_ids_on_a_meta_model_trace_shapes():
    with torch.device("meta"):
        model = GPT(CFG)
        ids = torch.zeros(2, 7, dtype=torch.long)
    assert model(ids).shape == (2, 7, CFG.vocab_size)
    cache = model.new_cache(2)
    assert model(ids, cache=cache).shape == (2, 7, CFG.vocab_size)
    assert cache[0].k_cache.device.type == "meta"


# ----- claims and titles follow the numbers -----------------------------------------------------


def s(lo, median, hi):
    return {"lo": lo, "center": median, "hi": hi}


def test_speedup_claim_follows_the_spread():
    faster = kv.speedup_claim(s(20.0, 23.0, 25.0), 1008, 8)
    assert faster["held"] and "estimated" in faster["statement"]
    assert "at 8 contexts" in faster["statement"] and "took" not in faster["statement"]
    noisy = kv.speedup_claim(s(0.8, 1.1, 1.4), 8, 4)
    assert not noisy["held"] and "too noisy" in noisy["statement"]
    slower = kv.speedup_claim(s(0.5, 0.6, 0.7), 8, 4)
    assert not slower["held"] and "slower" in slower["statement"]
    assert "range 20.0-25.0x" in faster["statement"]


@pytest.mark.parametrize(
    ("estimated", "measured", "held", "words"),
    [
        (1.0, 1.1, True, "agree"),
        (0.72, 1.0, False, "differ"),  # the run the reviewer saw: estimate / measured = 0.72
        (1.4, 1.0, False, "differ"),
    ],
)
def test_estimate_claim_compares_the_estimate_with_generate_timed(estimated, measured, held, words):
    c = kv.estimate_claim(estimated, measured, no_cache_s=20.0)
    assert c["held"] is held and words in c["statement"]
    assert c["ratio"] == pytest.approx(estimated / measured)
    assert c["measured_speedup"] == pytest.approx(20.0 / measured)
    assert f"{20.0 / measured:.1f}x faster" in c["statement"]
    assert "1.2x slower" in kv.estimate_claim(1.0, 1.0, no_cache_s=0.8)["statement"]
    assert "also samples" in kv.estimate_claim(0.72, 1.0, 20.0)["statement"]  # generate slower
    assert "also samples" not in kv.estimate_claim(1.8, 1.0, 20.0)["statement"]


def test_flat_claim_follows_the_spread():
    nc = s(20.0, 30.0, 35.0)  # the uncached step grew 30x from the first context to the last
    flat = kv.flat_claim(s(1.0, 1.2, 1.4), nc, 17, 1023, 1.4)
    assert flat["held"] and "nearly flat" in flat["statement"]
    grew = kv.flat_claim(s(1.6, 1.74, 1.9), nc, 17, 1023, 1.4)  # the run the learner saw
    assert grew["held"] and "not flat" in grew["statement"] and "1.74x" in grew["statement"]
    noisy = kv.flat_claim(s(1.1, 1.4, 3.0), s(1.5, 2.0, 2.5), 9, 127, 1.1)
    assert not noisy["held"] and "too noisy" in noisy["statement"]
    faster = kv.flat_claim(s(0.4, 0.5, 0.6), nc, 9, 127, 1.1)
    assert not faster["held"] and "slower" in faster["statement"]


def test_concat_claim_follows_the_spread():
    assert kv.concat_claim(s(1.05, 1.09, 1.12), 1023, 2**20)["held"]
    reverse = kv.concat_claim(s(0.8, 0.86, 0.9), 1023, 2**20)  # concat faster in this run
    assert not reverse["held"] and "concat cache was faster" in reverse["statement"]
    noisy = kv.concat_claim(s(0.9, 1.02, 1.1), 1023, 2**20)
    assert not noisy["held"] and "noise" in noisy["statement"]


def test_prediction_claim_says_when_the_measurement_disagrees():
    agree = kv.prediction_claim(s(1.1, 1.17, 1.2), s(1.05, 1.15, 1.3))
    assert agree["held"] and "agree" in agree["statement"]
    below = kv.prediction_claim(s(1.1, 1.17, 1.2), s(0.8, 0.86, 0.9))  # the bare 1.17 vs 0.86
    assert not below["held"] and "below the prediction" in below["statement"]
    # The spreads overlap, but the measurement straddles 1x: the overlap proves nothing.
    untested = kv.prediction_claim(s(1.0, 1.05, 1.1), s(0.9, 1.02, 1.2))
    assert not untested["held"] and "could not be tested" in untested["statement"]


def test_bound_claim_never_prints_an_impossible_utilisation():
    row = {
        "name": "demo", "bytes_read_per_step": 2**20, "step_ms": 1.0, "achieved_gb_per_s": 1.0,
        "bandwidth_utilisation_ratio": None, "main_cost_kind": "overhead",
        "main_cost": kv.MAIN_COSTS["overhead"],
    }  # fmt: skip
    c = kv.bound_claim(row)
    assert not c["held"] and "%" not in c["statement"] and "not memory traffic" in c["statement"]
    row.update(bandwidth_utilisation_ratio=0.49, main_cost_kind="memory")
    assert kv.bound_claim(row)["held"] and "49%" in kv.bound_claim(row)["statement"]


SLOPES = {"no_cache": 0.86, "concat": 0.1, "static": 0.09}
NC_GROWTH = s(20.0, 30.0, 35.0)


@pytest.mark.parametrize(
    ("growth", "nc", "expected"),
    [
        (s(1.0, 1.2, 1.4), NC_GROWTH, "stays nearly flat"),
        (s(1.6, 1.74, 1.9), NC_GROWTH, "though not flat"),  # slope ~0.1, yet 1.74x: not flat
        (s(0.4, 0.5, 0.6), NC_GROWTH, "timing noise"),
        (s(0.5, 0.53, 0.72), NC_GROWTH, "timing noise"),  # a --quick run: shrank, not "flat"
        (s(1.1, 1.4, 3.0), s(1.5, 2.0, 2.5), "within the noise"),
    ],
)
def test_decode_time_title_and_flat_claim_use_one_criterion(growth, nc, expected):
    title = kv.decode_slopes_title(SLOPES, growth, nc)
    assert expected in title and "slope 0.09" in title
    flat = kv.flat_claim(growth, nc, 17, 1023, 1.4)
    # The figure and the printed claim (and so the README) never contradict each other.
    assert ("nearly flat" in title) == ("nearly flat" in flat["statement"])
    assert ("not flat" in title) == ("not flat" in flat["statement"])
    assert ("noise" in title) == (not flat["held"])
    small = kv.decode_slopes_title({**SLOPES, "no_cache": 0.2}, growth, nc)
    assert "grew little" in small


def test_cumulative_time_title_follows_the_spread():
    faster = kv.cumulative_time_title(s(20.0, 23.0, 25.0), 16.6)
    assert "estimated 23.0x faster in total" in faster and "16.6x with the static" in faster
    assert "too noisy" in kv.cumulative_time_title(s(0.9, 1.1, 1.3), 1.0)
    assert "slower" in kv.cumulative_time_title(s(0.5, 0.6, 0.7), 0.6)


def test_real_model_cache_title_names_each_attention_type():
    title = kv.real_model_cache_title(kv.real_model_cache_table(), 32768)
    assert "MHA up to 16.0 GiB" in title  # Llama-2-7B: 32 layers x 32 heads x 128 x 2 x 2 B
    assert "GQA" in title and "MLA" in title


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
        "claims",
        "attention_picture",
    }
    c = r["correctness"]
    for kind in ("static", "concat"):
        assert c[f"max_abs_err_logits_{kind}_vs_no_cache"] < ATOL
        assert c[f"ids_identical_{kind}_vs_no_cache"] is True
    assert c["max_abs_err_chunked_prefill"] < ATOL and c["max_abs_err_explicit_vs_sdpa"] < ATOL
    d = r["decode"]
    assert set(d["step_ms"]) == {"no_cache", "concat", "static"}
    assert d["n_positions"] == len(d["positions"]) == len(d["step_ms_rounds"]["static"])
    assert all(len(t) >= kv.ROUNDS for ts in d["step_ms_rounds"].values() for t in ts)
    # The figure title and the printed claim judge the static step's growth by one rule.
    flat = r["claims"]["static_flat"]["statement"]
    assert ("nearly flat" in r["scaling"]["verdict"]) == ("nearly flat" in flat)
    assert "estimated" in r["claims"]["static_faster"]["statement"]
    assert r["memory"]["measured_equals_formula"] is True
    assert r["scaling"]["analytic_flops_slope"]["no_cache"] > 0.9  # derived, not timed
    assert abs(r["scaling"]["analytic_flops_slope"]["static"]) < 0.2
    assert set(r["claims"]) == {
        "static_faster",
        "estimate_matches_measured",
        "static_flat",
        "static_vs_concat",
        "concat_cost_explained",
        "decode_bound",
    }
    for claim in r["claims"].values():
        assert isinstance(claim["held"], bool) and claim["statement"]
        assert "goal" not in claim["statement"] and "issue" not in claim["statement"]
        assert claim["statement"] in run.stdout
    for bw in r["bandwidth"]["models"]:
        assert bw["bytes_read_per_step"] == bw["weight_bytes"] + bw["cache_bytes"]
        assert bw["main_cost"] == kv.MAIN_COSTS[bw["main_cost_kind"]]
        u = bw["bandwidth_utilisation_ratio"]
        assert (u is None) == (bw["utilisation_note"] is not None)
        assert u is None or 0 < u <= 1  # never above 100%
        share = bw["overhead_share_ratio"]
        assert share is None or 0 < share < 1  # None: overhead not separable from noise
        assert (share is None) == (bw["main_cost_kind"] == "not_separable")
        assert not any(key.startswith("beyond") for key in bw)
    assert not re.search(r"\b(1\d\d|[2-9]\d\d)% of copy", run.stdout)
    assert r["concat_cost"]["position"] == r["decode"]["positions"][-1]
    assert r["hf_demo"]["available"] is False
