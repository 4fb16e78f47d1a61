"""Tests for multihead_latent_attention.py: MLA equals Hugging Face's DeepseekV3Attention, the
naive and absorbed decoding paths agree, the latent cache holds exactly what the paper says and
no more, and every number the script prints is computed the way it claims."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multihead_latent_attention as mla
from multihead_latent_attention import (
    ATTENTION_MODES,
    KVCache,
    LatentKVCache,
    MLAConfig,
    MLALanguageModel,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    apply_rope,
    apply_rope_interleaved,
    causal_mask,
    rope_cos_sin,
    run_chunks,
)

TOL = 1e-5  # fp32 throughout
SMALL = {
    "d_model": 64,
    "n_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "max_seq_len": 64,
}


def small_config(**overrides) -> MLAConfig:
    return MLAConfig(**{**SMALL, **overrides})


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere, RMSNorm gains included (their default of 1 hides mistakes)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return module.eval()


# --- reference: Hugging Face transformers --------------------------------------------------------


@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_matches_transformers_deepseek_v3_attention(rope_interleave, q_lora_rank):
    hf = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    cfg = small_config(q_lora_rank=q_lora_rank, rope_interleave=rope_interleave)
    hf_cfg = hf.DeepseekV3Config(
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        max_position_embeddings=cfg.max_seq_len,
        # "default" RoPE: no YaRN, so HF's yarn mscale leaves the softmax scale alone.
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        rope_interleave=rope_interleave,
        attention_bias=False,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
    )
    ours = randomise(MultiHeadLatentAttention(cfg))
    ref = hf.DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # same parameter names and shapes
    assert ref.scaling == pytest.approx(ours.softmax_scale)

    batch, seq_len = 2, 11
    x = torch.randn(batch, seq_len, cfg.d_model)
    positions = torch.arange(seq_len).expand(batch, -1)
    cos, sin = hf.DeepseekV3RotaryEmbedding(hf_cfg)(x, positions)
    mask = torch.zeros(1, 1, seq_len, seq_len).masked_fill(
        ~causal_mask(seq_len, seq_len), float("-inf")
    )
    with torch.no_grad():
        expected, _ = ref(x, (cos, sin), mask)
        for mode in ATTENTION_MODES:
            torch.testing.assert_close(ours(x, mode=mode), expected, atol=TOL, rtol=0)
            # and the same through the latent cache, prefill then single-token steps
            got = run_chunks(ours, x, [5, 1, 3, 1, 1], mode)
            torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


# --- naive == absorbed == uncached ---------------------------------------------------------------


@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_naive_equals_absorbed_prefill_decode_chunked(rope_interleave, q_lora_rank):
    attn = randomise(
        MultiHeadLatentAttention(
            small_config(q_lora_rank=q_lora_rank, rope_interleave=rope_interleave)
        )
    )
    x = torch.randn(2, 20, attn.config.d_model)
    with torch.no_grad():
        prefill = {m: attn(x, mode=m) for m in ATTENTION_MODES}
        chunked = {m: run_chunks(attn, x, [7, 1, 9, 1, 1, 1], m) for m in ATTENTION_MODES}
    torch.testing.assert_close(prefill["absorbed"], prefill["naive"], atol=TOL, rtol=0)
    torch.testing.assert_close(chunked["absorbed"], chunked["naive"], atol=TOL, rtol=0)
    # the last three chunks are single-token decode steps against the cache
    torch.testing.assert_close(
        chunked["absorbed"][:, -3:], prefill["naive"][:, -3:], atol=TOL, rtol=0
    )


@settings(max_examples=25, deadline=None)
@given(
    n_heads=st.integers(1, 4),
    nope=st.integers(1, 12),
    half_rope=st.integers(1, 6),
    v_dim=st.integers(1, 12),
    kv_rank=st.integers(1, 24),
    q_rank=st.one_of(st.none(), st.integers(1, 24)),
    interleave=st.booleans(),
    cuts=st.lists(st.integers(1, 5), min_size=1, max_size=5),
)
def test_any_shapes_and_chunking_give_uncached_output(
    n_heads, nope, half_rope, v_dim, kv_rank, q_rank, interleave, cuts
):
    cfg = MLAConfig(
        d_model=16,
        n_heads=n_heads,
        q_lora_rank=q_rank,
        kv_lora_rank=kv_rank,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=2 * half_rope,
        v_head_dim=v_dim,
        max_seq_len=32,
        rope_interleave=interleave,
    )
    attn = randomise(MultiHeadLatentAttention(cfg))
    x = torch.randn(1, sum(cuts), cfg.d_model)
    with torch.no_grad():
        ref = attn(x, mode="naive")
        for mode in ATTENTION_MODES:
            torch.testing.assert_close(run_chunks(attn, x, cuts, mode), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_cached_generation_equals_uncached_and_feeds_one_token(mode):
    lm = randomise(MLALanguageModel(small_config(), vocab_size=50, n_layers=2, ffn_hidden_dim=64))
    prompt = torch.randint(0, 50, (2, 5))
    seen = []
    hook = lm.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape[1])
    )
    cached = lm.generate(prompt, 10, use_cache=True, mode=mode)
    hook.remove()
    assert seen == [5] + [1] * 9  # prefill, then one token per step over the latent cache
    assert torch.equal(cached, lm.generate(prompt, 10, use_cache=False, mode=mode))
    assert cached.shape == (2, 15)


def test_mha_baseline_cached_equals_uncached():
    mha = randomise(MultiHeadAttention(d_model=32, n_heads=4, head_dim=8))
    x = torch.randn(2, 9, 32)
    cache = KVCache(2, 4, 9, 8)
    with torch.no_grad():
        chunked = torch.cat(
            [mha(x[:, :6], 0, cache), mha(x[:, 6:8], 6, cache), mha(x[:, 8:], 8, cache)], dim=1
        )
        torch.testing.assert_close(chunked, mha(x), atol=TOL, rtol=0)


def test_mha_baseline_runs_in_bf16_close_to_fp32():
    mha = randomise(MultiHeadAttention(d_model=32, n_heads=4, head_dim=8))
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        ref = mha(x)
        out = mha.to(torch.bfloat16)(x.to(torch.bfloat16))  # raised a dtype error before the fix
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (eps 2^-7 = 0.0078); a few roundings through 4 matmuls and
    # a softmax stay within a few percent of the output scale.
    torch.testing.assert_close(out.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)


# --- the cache -----------------------------------------------------------------------------------


def test_cache_stores_only_normalised_latent_and_rotated_rope_key():
    cfg = small_config()
    attn = randomise(MultiHeadLatentAttention(cfg))
    x = torch.randn(2, 6, cfg.d_model)
    cache = attn.new_cache(2, 10)
    with torch.no_grad():
        attn(x, 0, cache, "absorbed")
        kv_a = attn.kv_a_proj_with_mqa(x)
        c_kv = attn.kv_a_layernorm(kv_a[..., : cfg.kv_lora_rank])
        cos, sin = rope_cos_sin(torch.arange(6), cfg.qk_rope_head_dim, cfg.rope_base)
        k_pe = apply_rope_interleaved(kv_a[..., cfg.kv_lora_rank :], cos, sin)
    tensors = {k for k, v in vars(cache).items() if isinstance(v, torch.Tensor)}
    assert tensors == {"kv_cache", "pe_cache"}
    assert cache.kv_cache.shape == (2, 10, cfg.kv_lora_rank)
    assert cache.pe_cache.shape == (2, 10, cfg.qk_rope_head_dim)
    assert cache.length == 6
    torch.testing.assert_close(cache.kv_cache[:, :6], c_kv, atol=TOL, rtol=0)
    torch.testing.assert_close(cache.pe_cache[:, :6], k_pe, atol=TOL, rtol=0)
    assert not cache.kv_cache[:, 6:].any() and not cache.pe_cache[:, 6:].any()
    assert cache.nbytes == 2 * 10 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    cache.reset()
    assert cache.length == 0 and not cache.kv_cache.any()


def test_kv_cache_reset_zeroes_the_buffers():
    cache = KVCache(1, 2, 8, 4)
    cache.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 0)
    cache.reset()
    assert cache.length == 0 and not cache.k_cache.any() and not cache.v_cache.any()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 2, 8, 4), r"batch_size \(0\) must be >= 1"),
        ((1, 0, 8, 4), r"n_kv_heads \(0\) must be >= 1"),
        ((1, 2, 0, 4), r"max_seq_len \(0\) must be >= 1"),
        ((1, 2, 8, 0), r"head_dim \(0\) must be >= 1"),
    ],
)
def test_kv_cache_sizes_must_be_positive(args, match):
    with pytest.raises(ValueError, match=match):
        KVCache(*args)


@pytest.mark.parametrize(
    ("k_shape", "v_shape"),
    [
        ((1, 4, 1, 4), (1, 4, 1, 4)),  # wrong number of heads
        ((2, 2, 1, 4), (2, 2, 1, 4)),  # wrong batch
        ((1, 2, 1, 8), (1, 2, 1, 8)),  # wrong head_dim
        ((1, 2, 1, 4), (1, 2, 2, 4)),  # k and v disagree
        ((2, 1, 4), (2, 1, 4)),  # not 4-D
    ],
)
def test_kv_cache_update_checks_shapes(k_shape, v_shape):
    cache = KVCache(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"must both have shape \(batch_size, n_kv_heads, n, "):
        cache.update(torch.randn(k_shape), torch.randn(v_shape), 0)
    assert cache.length == 0 and not cache.k_cache.any()  # nothing was written


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
        mla._check_cache_write(*args)
    mla._check_cache_write(2, 6, 2, 8)  # appending right at the end, filling it exactly: fine


def test_cache_bytes_equal_formula_in_bf16():
    cache = LatentKVCache(3, 7, 512, 64, dtype=torch.bfloat16)
    assert cache.nbytes == 3 * 7 * (512 + 64) * 2
    assert KVCache(3, 8, 7, 128, dtype=torch.bfloat16).nbytes == 2 * 3 * 8 * 7 * 128 * 2


def test_published_configs_give_published_per_token_sizes():
    # huggingface.co/deepseek-ai/DeepSeek-V2 and DeepSeek-V3 config.json
    v2, v3 = MLAConfig.deepseek_v2(), MLAConfig.deepseek_v3()
    for cfg, d_model in ((v2, 5120), (v3, 7168)):
        assert (cfg.d_model, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank) == (
            d_model,
            128,
            1536,
            512,
        )
        assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (128, 64, 128)
    bf16 = torch.bfloat16
    # (kv_lora_rank + qk_rope_head_dim) * layers * 2 bytes: 576 * 60 * 2 and 576 * 61 * 2
    assert mla.measured_cache_bytes_per_token("mla", 60, bf16, config=v2) == 69_120
    assert mla.measured_cache_bytes_per_token("mla", 61, bf16, config=v3) == 70_272
    real = mla.real_model_cache()
    assert real["measured_equals_formula"]
    assert real["models"]["deepseek_v2_mla"]["bytes_per_token"] == 69_120
    assert real["models"]["deepseek_v3_mla"]["bytes_per_token"] == 70_272
    # Llama-2/3-70B: 80 layers, 8 kv heads of 128: 2 * 8 * 128 * 80 * 2 bytes
    assert real["models"]["llama_3_70b"]["bytes_per_token"] == 327_680
    assert real["mha_to_mla_ratio_deepseek_v2"] == pytest.approx(2 * 128 * 128 / 576)
    assert round(real["mha_to_mla_ratio_deepseek_v2"], 1) == 56.9
    # DeepSeek-V2 abstract: 93.3% less KV cache than DeepSeek 67B, which needs the 6-bit KV
    # quantisation of its section 3.2.3: bf16 MLA alone gives much less.
    assert round(real["reduction_vs_deepseek_67b_with_6bit_kv"], 3) == 0.933
    assert real["reduction_vs_deepseek_67b_bf16"] < 0.85
    assert real["models"]["deepseek_v2_mla"]["gib_at_context"]["128k"] == pytest.approx(
        69_120 * 131_072 / 2**30
    )


def test_table1_reproduced_from_tensors():
    # DeepSeek-V2 Table 1: MHA 2 n_h d_h l, GQA 2 n_g d_h l, MQA 2 d_h l, MLA (d_c + d_h^R) l
    # ~ 9/2 d_h l, "equal to GQA with only 2.25 groups" (d_c = 4 d_h, d_h^R = d_h / 2)
    t = mla.table1_cache_elements(MLAConfig.deepseek_v2(), n_groups=8)
    d_h = 128
    assert t["elements_per_token_per_layer"] == {
        "mha": 2 * 128 * d_h,
        "gqa_8_groups": 2 * 8 * d_h,
        "mqa": 2 * d_h,
        "mla": 9 * d_h // 2,
    }
    assert t["measured_equals_formula"]
    assert t["mla_in_units_of_head_dim"] == 4.5
    assert t["mla_equivalent_gqa_groups"] == 2.25
    default = MLAConfig()  # the scaled-down default keeps the proportions
    assert default.kv_lora_rank == 4 * default.qk_nope_head_dim
    assert default.qk_rope_head_dim == default.qk_nope_head_dim // 2
    assert mla.table1_cache_elements(default)["mla_equivalent_gqa_groups"] == 2.25


# --- the math behind the claims ------------------------------------------------------------------


def test_interleaved_rope_is_half_split_rope_on_permuted_pairs():
    x = torch.randn(3, 5, 8)
    cos, sin = rope_cos_sin(torch.arange(5), 8)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved pair (2i, 2i+1) -> (i, i + 4)
    inverse = torch.argsort(perm)
    expected = apply_rope(x[..., perm], cos, sin)[..., inverse]
    torch.testing.assert_close(apply_rope_interleaved(x, cos, sin), expected)
    # and its scores depend on relative position only
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        c, s = rope_cos_sin(torch.tensor([m, n]), 8)
        return apply_rope_interleaved(q, c[0], s[0]) @ apply_rope_interleaved(k, c[1], s[1])

    torch.testing.assert_close(score(3, 7), score(10, 14), atol=1e-5, rtol=0)


def test_fold_is_exact_without_rope_and_breaks_with_rope_on_the_nope_part():
    fold = mla.absorption_fold_check(small_config(), "cpu")
    assert fold["max_abs_err_fold_without_rope"] < 1e-5 * fold["max_abs_score"]
    assert fold["max_abs_err_fold_with_rope_on_nope"] > 0.1 * fold["max_abs_score"]


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_decode_flop_formula_matches_torch_flop_counter(q_lora_rank):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = small_config(q_lora_rank=q_lora_rank)
    attn, context = MultiHeadLatentAttention(cfg).eval(), 13
    mha = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.qk_nope_head_dim).eval()
    with torch.no_grad():
        fns = mla.decode_setup(cfg, context, "cpu", attn, mha)
        for impl, fn in fns.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            assert counter.get_total_flops() == mla.decode_flops(cfg, context, impl), impl
    assert mla.decode_flops(cfg, 1000, "naive") > 5 * mla.decode_flops(cfg, 1000, "absorbed")


def test_flops_per_cached_token_match_the_docstring():
    # module docstring: each cached token costs absorbed 2 h (2 d_c + d_rope) FLOPs per step;
    # naive pays 2 h d_c (d_nope + d_v) just to rebuild its key and value (plus attention)
    cfg = MLAConfig.deepseek_v2()
    h, d_c = cfg.n_heads, cfg.kv_lora_rank
    per_token = {
        k: mla.decode_flops(cfg, 101, k) - mla.decode_flops(cfg, 100, k)
        for k in ("absorbed", "naive", "mha")
    }
    assert per_token["absorbed"] == 2 * h * (2 * d_c + cfg.qk_rope_head_dim)
    rebuild = 2 * h * d_c * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    assert per_token["naive"] == rebuild + 2 * h * (cfg.qk_head_dim + cfg.v_head_dim)
    assert per_token["mha"] == 2 * 2 * h * cfg.qk_nope_head_dim


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    [
        "d_model",
        "n_heads",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "max_seq_len",
    ],
)
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_sizes_raise(field, value):
    with pytest.raises(ValueError, match=rf"^{field} \({value}\) must be a positive integer$"):
        small_config(**{field: value})


def test_non_positive_q_lora_rank_raises():
    with pytest.raises(ValueError, match=r"q_lora_rank \(0\) must be a positive integer or None"):
        small_config(q_lora_rank=0)


def test_odd_rope_head_dim_raises():
    with pytest.raises(ValueError, match=r"qk_rope_head_dim \(7\) must be even"):
        small_config(qk_rope_head_dim=7)


def test_non_positive_rope_base_raises():
    with pytest.raises(ValueError, match=r"rope_base \(0.0\) must be positive"):
        small_config(rope_base=0.0)


def test_unknown_mode_raises():
    attn = MultiHeadLatentAttention(small_config())
    lm = MLALanguageModel(small_config(), vocab_size=10, n_layers=1, ffn_hidden_dim=8)
    message = r"mode \('fast'\) must be one of 'naive', 'absorbed'"
    with pytest.raises(ValueError, match=message):
        attn(torch.randn(1, 2, 64), mode="fast")
    with pytest.raises(ValueError, match=message):
        lm.generate(torch.zeros(1, 2, dtype=torch.long), 3, mode="fast")


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_cache_overflow_raises_and_says_how_much_fits(mode):
    attn = MultiHeadLatentAttention(small_config())
    cache = attn.new_cache(1, 8)
    attn(torch.randn(1, 6, 64), 0, cache, mode)
    with pytest.raises(
        ValueError,
        match=r"cache overflow: writing 3 tokens at start_pos 6 needs "
        r"9 positions, but max_seq_len is 8 \(room for 2 more\)",
    ):
        attn(torch.randn(1, 3, 64), 6, cache, mode)
    assert cache.length == 6  # nothing was written


@pytest.mark.parametrize("cache_cls", ["latent", "kv"])
def test_chunk_leaving_a_gap_raises(cache_cls):
    message = (
        r"start_pos \(6\) would leave a gap: the cache holds 4 tokens, so start_pos must "
        r"be <= 4"
    )
    if cache_cls == "latent":
        attn = MultiHeadLatentAttention(small_config())
        cache = attn.new_cache(1, 16)
        attn(torch.randn(1, 4, 64), 0, cache)
        with pytest.raises(ValueError, match=message):
            attn(torch.randn(1, 1, 64), 6, cache)
    else:
        cache = KVCache(1, 2, 16, 4)
        cache.update(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), 0)
        with pytest.raises(ValueError, match=message):
            cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), 6)


def test_other_bad_input_raises():
    attn = MultiHeadLatentAttention(small_config())
    with pytest.raises(ValueError, match=r"start_pos \(-1\) must be >= 0"):
        attn(torch.randn(1, 1, 64), -1)
    with pytest.raises(ValueError, match=r"batch_size \(0\) must be >= 1"):
        LatentKVCache(0, 8, 32, 8)
    cache = LatentKVCache(2, 8, 32, 8)
    with pytest.raises(ValueError, match=r"c_kv shape \(\(1, 3, 32\)\) must be \(batch_size=2"):
        cache.update(torch.randn(1, 3, 32), torch.randn(1, 3, 8), 0)
    with pytest.raises(ValueError, match=r"vocab_size \(0\) must be >= 1"):
        MLALanguageModel(small_config(), vocab_size=0, n_layers=1, ffn_hidden_dim=8)
    lm = MLALanguageModel(small_config(), vocab_size=10, n_layers=1, ffn_hidden_dim=8)
    with pytest.raises(ValueError, match=r"max_new_tokens \(0\) must be a positive integer"):
        lm.generate(torch.zeros(1, 2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"impl \('gqa'\) must be one of"):
        mla.decode_flops(small_config(), 4, "gqa")


# --- the script ----------------------------------------------------------------------------------


def test_main_quick_writes_figures_and_results(run_main):
    run = run_main(mla)
    assert {p.name for p in run.pngs} == {
        "mla_data_flow.png",
        "cache_vs_context.png",
        "real_model_cache.png",
        "decode_time.png",
        "decode_flops.png",
    }
    r = run.results
    assert list(r) == ["meta", "correctness", "table1", "real_models", "decode", "goals"]
    assert r["correctness"]["all_within_tolerance"]
    assert r["correctness"]["generation"]["identical_naive"]
    assert r["correctness"]["generation"]["identical_absorbed"]
    assert r["table1"]["measured_equals_formula"] and r["real_models"]["measured_equals_formula"]
    d = r["decode"]
    assert set(d["time_ms"]) == set(d["flops"]) == {"mha", "naive", "absorbed"}
    assert all(len(v) == len(d["contexts"]) for v in d["time_ms"].values())
    cfg = MLAConfig(**d["config"])  # fp32 caches of the benchmarked layer, measured == formula
    assert d["cache_bytes_per_token_per_layer"] == {
        "mha": 2 * cfg.n_heads * cfg.qk_nope_head_dim * 4,
        "mla": (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4,
    }
    assert d["flops"]["naive"] == [mla.decode_flops(cfg, t, "naive") for t in d["contexts"]]
    assert d["cache_bytes_ratio_mha_vs_mla"] == pytest.approx(
        2 * cfg.n_heads * cfg.qk_nope_head_dim / (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    )
    assert d["flop_ratio_absorbed_vs_mha"] == pytest.approx(
        [
            mla.decode_flops(cfg, t, "absorbed") / mla.decode_flops(cfg, t, "mha")
            for t in d["contexts"]
        ]
    )
    assert d["time_ratio_mha_vs_absorbed"] == pytest.approx(
        [m / a for m, a in zip(d["time_ms"]["mha"], d["time_ms"]["absorbed"], strict=True)]
    )
    assert r["table1"]["paper_formula"] == {
        "mha": "2 n_h d_h",
        "gqa_8_groups": "2 n_g d_h",
        "mqa": "2 d_h",
        "mla": "d_c + d_h^R",
    }
    assert "Table 1" in run.stdout and "MHA/absorbed" in run.stdout
    g = r["goals"]
    assert set(g) == {
        "absorbed_vs_naive_speedup_at_longest_context",
        "absorbed_at_least_5x_faster_than_naive",
        "naive_vs_absorbed_flop_ratio_at_longest_context",
        "time_ratio_over_flop_ratio",
        "cache_bytes_equal_formula",
        "mha_to_mla_ratio_deepseek_v2",
        "mha_to_mla_ratio_is_56_9x",
    }
    # memory goals are exact (no timing): they must hold; speed goals are only recorded
    assert g["cache_bytes_equal_formula"] is True and g["mha_to_mla_ratio_is_56_9x"] is True
    assert isinstance(g["absorbed_at_least_5x_faster_than_naive"], bool)
