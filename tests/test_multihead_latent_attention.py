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
    MultiHeadLatentAttention,
    RopeMHABaseline,
    apply_rope,
    apply_rope_deinterleaved,
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
    from transformers import DynamicCache

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
    hf_cache = DynamicCache()
    with torch.no_grad():
        expected, _ = ref(x, (cos, sin), mask, cache=hf_cache)
        for mode in ATTENTION_MODES:
            torch.testing.assert_close(ours(x, mode=mode), expected, atol=TOL, rtol=0)
            # and the same through the latent cache, prefill then single-token steps
            got = run_chunks(ours, x, [5, 1, 3, 1, 1], mode)
            torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
            # what is cached is what transformers caches, in the same layout: the normalised
            # latent and the rotated shared rope key (de-interleaved when rope_interleave)
            cache = ours.new_cache(batch)
            ours(x, 0, cache, mode)
            layer = hf_cache.layers[0]  # keys: (batch, 1, seq_len, d_c), values: k_pe
            torch.testing.assert_close(
                cache.kv_cache[:, :seq_len], layer.keys[:, 0], atol=TOL, rtol=0
            )
            torch.testing.assert_close(
                cache.pe_cache[:, :seq_len], layer.values[:, 0], atol=TOL, rtol=0
            )


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


@settings(max_examples=25, deadline=None, derandomize=True)
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
    seen = []  # tokens fed to the first layer's attention at each call
    hook = lm.layers[0].self_attn.kv_a_proj_with_mqa.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape[1])
    )
    cached = lm.generate(prompt, 10, use_cache=True, mode=mode)
    hook.remove()
    assert seen == [5] + [1] * 9  # prefill, then one token per step over the latent cache
    assert torch.equal(cached, lm.generate(prompt, 10, use_cache=False, mode=mode))
    assert cached.shape == (2, 15)


def test_mha_baseline_cached_equals_uncached():
    mha = randomise(RopeMHABaseline(d_model=32, n_heads=4, head_dim=8))
    x = torch.randn(2, 9, 32)
    cache = mha.new_cache(2, 9)
    assert (cache.k_cache.shape, cache.max_seq_len) == ((2, 4, 9, 8), 9)
    with torch.no_grad():
        chunked = torch.cat(
            [mha(x[:, :6], 0, cache), mha(x[:, 6:8], 6, cache), mha(x[:, 8:], 8, cache)], dim=1
        )
        torch.testing.assert_close(chunked, mha(x), atol=TOL, rtol=0)


def test_mha_baseline_runs_in_bf16_close_to_fp32():
    mha = randomise(RopeMHABaseline(d_model=32, n_heads=4, head_dim=8))
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        ref = mha(x)
        out = mha.to(torch.bfloat16)(x.to(torch.bfloat16))  # raised a dtype error before the fix
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (eps 2^-7 = 0.0078); a few roundings through 4 matmuls and
    # a softmax stay within a few percent of the output scale.
    torch.testing.assert_close(out.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)


# --- the cache -----------------------------------------------------------------------------------


def deepseek_v3_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """DeepSeek-V3 ``inference/model.py`` ``precompute_freqs_cis`` + ``apply_rotary_emb`` (no
    YaRN): each adjacent pair (x_2i, x_2i+1) is one complex number, turned by m theta_i in place."""
    d = x.shape[-1]
    freqs = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs_cis = torch.polar(
        torch.ones(len(positions), d // 2), torch.outer(positions.float(), freqs)
    )
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis).flatten(-2).to(x.dtype)


def test_cache_stores_only_normalised_latent_and_rotated_rope_key():
    cfg = small_config()
    attn = randomise(MultiHeadLatentAttention(cfg))
    x = torch.randn(2, 6, cfg.d_model)
    cache = attn.new_cache(2, 10)
    with torch.no_grad():
        attn(x, 0, cache, "absorbed")
        kv_a = x @ attn.kv_a_proj_with_mqa.weight.T  # [W_DKV h | W_KR h]
        latent = kv_a[..., : cfg.kv_lora_rank]
        rms = latent.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
        c_kv = latent * rms * attn.kv_a_layernorm.weight
        in_place = deepseek_v3_rope(kv_a[..., cfg.kv_lora_rank :], torch.arange(6), cfg.rope_base)
        k_pe = torch.cat((in_place[..., 0::2], in_place[..., 1::2]), dim=-1)  # de-interleaved
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
    with pytest.raises(ValueError, match=r"^[kv] \(shape .*\) must have shape \("):
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
    v2, v3 = mla.deepseek_v2_config(), mla.deepseek_v3_config()
    for cfg, d_model in ((v2, 5120), (v3, 7168)):
        assert (cfg.d_model, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank) == (
            d_model,
            128,
            1536,
            512,
        )
        assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (128, 64, 128)
        assert (cfg.max_seq_len, cfg.rope_base, cfg.rope_interleave) == (163840, 10000.0, True)
    bf16 = torch.bfloat16
    # (kv_lora_rank + qk_rope_head_dim) * layers * 2 bytes: 576 * 60 * 2 and 576 * 61 * 2
    assert mla.measured_cache_bytes_per_token("mla", 60, bf16, config=v2) == 69_120
    assert mla.measured_cache_bytes_per_token("mla", 61, bf16, config=v3) == 70_272
    ds = mla.deepseek_cache()
    assert ds["measured_equals_formula"]
    assert ds["models"]["deepseek_v2_mla"]["bytes_per_token"] == 69_120
    assert ds["models"]["deepseek_v3_mla"]["bytes_per_token"] == 70_272
    # DeepSeek 67B: 95 layers, 8 kv heads of 128: 2 * 8 * 128 * 95 * 2 bytes
    assert ds["models"]["deepseek_67b"]["bytes_per_token"] == 389_120
    assert ds["mha_to_mla_ratio_deepseek_v2"] == pytest.approx(2 * 128 * 128 / 576)
    assert round(ds["mha_to_mla_ratio_deepseek_v2"], 1) == 56.9
    # DeepSeek-V2 abstract: 93.3% less KV cache than DeepSeek 67B, which needs the 6-bit KV
    # quantisation of its section 3.2.3: bf16 MLA alone gives much less.
    assert round(ds["reduction_vs_deepseek_67b_with_6bit_kv"], 3) == 0.933
    assert ds["reduction_vs_deepseek_67b_bf16"] < 0.85


def test_table1_reproduced_from_tensors():
    # DeepSeek-V2 Table 1: MHA 2 n_h d_h l, GQA 2 n_g d_h l, MQA 2 d_h l, MLA (d_c + d_h^R) l
    # ~ 9/2 d_h l, "equal to GQA with only 2.25 groups" (d_c = 4 d_h, d_h^R = d_h / 2)
    t = mla.table1_cache_elements(mla.deepseek_v2_config(), n_groups=8)
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
    # rotating the interleaved pairs, returned de-interleaved (evens, then odds)
    torch.testing.assert_close(
        apply_rope_deinterleaved(x, cos, sin), apply_rope(x[..., perm], cos, sin)
    )
    # the permutation undone gives DeepSeek-V3's in-place layout: pair (2i, 2i+1) turned by m th_i
    inplace = apply_rope_deinterleaved(x, cos, sin)[..., inverse]
    theta = cos[:, :4], sin[:, :4]
    even, odd = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(inplace[..., 0::2], even * theta[0] - odd * theta[1])
    torch.testing.assert_close(inplace[..., 1::2], odd * theta[0] + even * theta[1])
    # and its scores depend on relative position only
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        c, s = rope_cos_sin(torch.tensor([m, n]), 8)
        return apply_rope_deinterleaved(q, c[0], s[0]) @ apply_rope_deinterleaved(k, c[1], s[1])

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
    mha = RopeMHABaseline(cfg.d_model, cfg.n_heads, cfg.qk_nope_head_dim, cfg.max_seq_len).eval()
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
    cfg = mla.deepseek_v2_config()
    h, d_c = cfg.n_heads, cfg.kv_lora_rank
    per_token = {
        k: mla.decode_flops(cfg, 101, k) - mla.decode_flops(cfg, 100, k)
        for k in ("absorbed", "naive", "mha")
    }
    assert per_token["absorbed"] == 2 * h * (2 * d_c + cfg.qk_rope_head_dim)
    rebuild = 2 * h * d_c * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    assert per_token["naive"] == rebuild + 2 * h * (cfg.qk_head_dim + cfg.v_head_dim)
    assert per_token["mha"] == 2 * 2 * h * cfg.qk_nope_head_dim


# --- bad input: one test per rule family ---------------------------------------------------------

SIZE_FIELDS = [
    "d_model",
    "n_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "max_seq_len",
    "q_lora_rank",
]


def _attn():
    return MultiHeadLatentAttention(small_config())


def _lm():
    return MLALanguageModel(small_config(), vocab_size=10, n_layers=2, ffn_hidden_dim=16)


def _ids(*shape):
    return torch.zeros(shape, dtype=torch.long)


TYPE_CASES = {  # wrong type where an int, a bool, a tensor or a module's object is needed
    "config float size": (lambda: small_config(n_heads=2.0), "n_heads"),
    "config bool size": (lambda: small_config(d_model=True), "d_model"),
    "config str size": (lambda: small_config(kv_lora_rank="32"), "kv_lora_rank"),
    "config None size": (lambda: small_config(max_seq_len=None), "max_seq_len"),
    "config bool q_lora_rank": (lambda: small_config(q_lora_rank=True), "q_lora_rank"),
    "rope_base str": (lambda: small_config(rope_base="1e4"), "rope_base"),
    "rope_base bool": (lambda: small_config(rope_base=True), "rope_base"),
    "rope_interleave str": (lambda: small_config(rope_interleave="no"), "rope_interleave"),
    "rope_interleave int": (lambda: small_config(rope_interleave=1), "rope_interleave"),
    "module config dict": (lambda: MultiHeadLatentAttention({}), "config"),
    "lm config None": (lambda: MLALanguageModel(None, 10, 1, 8), "config"),
    "forward x list": (lambda: _attn()([[0.0] * 64]), "x"),
    "forward start_pos float": (lambda: _attn()(torch.randn(1, 2, 64), 1.5), "start_pos"),
    "forward start_pos bool": (lambda: _attn()(torch.randn(1, 2, 64), True), "start_pos"),
    "forward cache str": (lambda: _attn()(torch.randn(1, 2, 64), 0, "cache"), "cache"),
    "forward MHA cache": (lambda: _attn()(torch.randn(1, 2, 64), 0, KVCache(1, 4, 8, 16)), "cache"),
    "new_cache batch float": (lambda: _attn().new_cache(1.0), "batch_size"),
    "new_cache length str": (lambda: _attn().new_cache(1, "8"), "max_seq_len"),
    "latent cache bool size": (lambda: LatentKVCache(True, 8, 32, 8), "batch_size"),
    "baseline float heads": (lambda: RopeMHABaseline(32, 4.0, 8), "n_heads"),
    "baseline start_pos None": (
        lambda: RopeMHABaseline(32, 4, 8)(torch.randn(1, 2, 32), None),
        "start_pos",
    ),
    "lm float vocab": (lambda: MLALanguageModel(small_config(), 10.0, 1, 8), "vocab_size"),
    "generate float count": (lambda: _lm().generate(_ids(1, 2), 1.5), "max_new_tokens"),
    "generate bool count": (lambda: _lm().generate(_ids(1, 2), True), "max_new_tokens"),
    "generate use_cache str": (lambda: _lm().generate(_ids(1, 2), 2, use_cache="no"), "use_cache"),
    "decode_flops context float": (
        lambda: mla.decode_flops(small_config(), 1.5, "naive"),
        "context",
    ),
}

RANGE_CASES = {  # values out of range, non-finite, not divisible
    "config zero size": (lambda: small_config(v_head_dim=0), "v_head_dim"),
    "config negative size": (lambda: small_config(n_heads=-4), "n_heads"),
    "q_lora_rank 0": (lambda: small_config(q_lora_rank=0), "q_lora_rank"),
    "odd rope dim": (lambda: small_config(qk_rope_head_dim=7), "qk_rope_head_dim"),
    "rope_base 0.5": (lambda: small_config(rope_base=0.5), "rope_base"),
    "rope_base 1": (lambda: small_config(rope_base=1), "rope_base"),
    "rope_base inf": (lambda: small_config(rope_base=math.inf), "rope_base"),
    "rope_base nan": (lambda: small_config(rope_base=math.nan), "rope_base"),
    "rope_base -1": (lambda: small_config(rope_base=-1.0), "rope_base"),
    "mode": (lambda: _attn()(torch.randn(1, 2, 64), mode="fast"), "mode"),
    "lm mode": (lambda: _lm()(_ids(1, 2), mode="fast"), "mode"),
    "generate mode": (lambda: _lm().generate(_ids(1, 2), 3, mode="fast"), "mode"),
    "start_pos -1": (lambda: _attn()(torch.randn(1, 2, 64), -1), "start_pos"),
    "new_cache batch 0": (lambda: _attn().new_cache(0), "batch_size"),
    "new_cache length 0": (lambda: _attn().new_cache(1, 0), "max_seq_len"),
    "latent cache rank 0": (lambda: LatentKVCache(1, 8, 0, 8), "kv_lora_rank"),
    "kv cache heads 0": (lambda: KVCache(1, 0, 8, 4), "n_kv_heads"),
    "baseline n_heads 0": (lambda: RopeMHABaseline(32, 0, 8), "n_heads"),
    "baseline head_dim 0": (lambda: RopeMHABaseline(32, 4, 0), "head_dim"),
    "baseline odd head_dim": (lambda: RopeMHABaseline(32, 4, 7), "head_dim"),
    "baseline rope_base 1": (lambda: RopeMHABaseline(32, 4, 8, rope_base=1.0), "rope_base"),
    "baseline start_pos -2": (
        lambda: RopeMHABaseline(32, 4, 8)(torch.randn(1, 2, 32), -2),
        "start_pos",
    ),
    "swiglu hidden 0": (lambda: mla.SwiGLU(16, 0), "hidden_dim"),
    "rmsnorm eps 0": (lambda: mla.RMSNorm(8, eps=0.0), "eps"),
    "lm vocab 0": (lambda: MLALanguageModel(small_config(), 0, 1, 8), "vocab_size"),
    "lm layers 0": (lambda: MLALanguageModel(small_config(), 10, 0, 8), "n_layers"),
    "generate count 0": (lambda: _lm().generate(_ids(1, 2), 0), "max_new_tokens"),
    "token id = vocab": (lambda: _lm()(torch.tensor([[1, 10]])), "vocab_size"),
    "token id -1": (lambda: _lm()(torch.tensor([[1, -1]])), "vocab_size"),
    "generate token id": (lambda: _lm().generate(torch.tensor([[11]]), 2), "vocab_size"),
    "decode_flops impl": (lambda: mla.decode_flops(small_config(), 4, "gqa"), "impl"),
    "decode_flops context": (lambda: mla.decode_flops(small_config(), -1, "naive"), "context"),
    "table1 groups 0": (lambda: mla.table1_cache_elements(small_config(), n_groups=0), "n_groups"),
    "fold tokens 0": (lambda: mla.absorption_fold_check(small_config(), "cpu", 0), "n_tokens"),
}

LENGTH_CASES = {  # sequence length against max_seq_len (64) on every path
    "forward past the end": (lambda: _attn()(torch.randn(1, 1, 64), 100), "max_seq_len"),
    "forward too long": (lambda: _attn()(torch.randn(1, 65, 64)), "max_seq_len"),
    "lm forward too long": (lambda: _lm()(_ids(1, 65)), "max_seq_len"),
    "lm start_pos past": (lambda: _lm()(_ids(1, 4), 62), "max_seq_len"),
    "generate too long, no cache": (
        lambda: _lm().generate(_ids(1, 4), 10**6, use_cache=False),
        "max_new_tokens",
    ),
    "generate too long, cache": (lambda: _lm().generate(_ids(1, 4), 61), "max_seq_len"),
    "new_cache longer than config": (lambda: _attn().new_cache(1, 65), "max_seq_len"),
    "baseline past its end": (
        lambda: RopeMHABaseline(32, 4, 8, max_seq_len=8)(torch.randn(1, 9, 32)),
        "max_seq_len",
    ),
    "cache overflow": (
        lambda: LatentKVCache(1, 4, 8, 2).update(torch.randn(1, 5, 8), torch.randn(1, 5, 2), 0),
        "max_seq_len",
    ),
}

DTYPE_CASES = {  # floating tensors where floats are needed, integer ids, no silent casts
    "x int": (lambda: _attn()(torch.ones(1, 2, 64, dtype=torch.long)), "x"),
    "x float64 vs float32 weights": (lambda: _attn()(torch.randn(1, 2, 64).double()), "x"),
    "baseline x int": (lambda: RopeMHABaseline(32, 4, 8)(torch.ones(1, 2, 32).long()), "x"),
    "float ids": (lambda: _lm()(torch.ones(1, 2)), "x"),
    "generate float ids": (lambda: _lm().generate(torch.ones(1, 2), 2), "ids"),
    "cache float64": (
        lambda: _attn()(torch.randn(1, 2, 64), 0, _attn().new_cache(1, dtype=torch.float64)),
        "c_kv",
    ),
    "new_cache int dtype": (lambda: _attn().new_cache(1, dtype=torch.int64), "dtype"),
    "cache update int": (
        lambda: LatentKVCache(1, 8, 8, 2).update(
            torch.ones(1, 1, 8).long(), torch.ones(1, 1, 2), 0
        ),
        "c_kv",
    ),
}

CONTRACT_CASES = {  # ranks, last dimensions, shapes that must agree, cache bookkeeping
    "x 2-D": (lambda: _attn()(torch.randn(3, 64)), "x"),
    "x last dim": (lambda: _attn()(torch.randn(1, 3, 65)), "x"),
    "baseline x last dim": (lambda: RopeMHABaseline(32, 4, 8)(torch.randn(1, 3, 33)), "x"),
    "ids 1-D": (lambda: _lm()(torch.tensor([1, 2, 3])), "x"),
    "generate 1-D ids": (lambda: _lm().generate(torch.tensor([1, 2]), 2), "ids"),
    "generate empty prompt": (lambda: _lm().generate(_ids(1, 0), 2), "ids"),
    "lm cache empty list": (lambda: _lm()(_ids(1, 2), 0, []), "cache"),
    "lm cache one too many": (
        lambda: (lm := _lm())(_ids(1, 2), 0, lm.new_cache(1) + lm.new_cache(1)[:1]),
        "cache",
    ),
    "cache of another config": (
        lambda: _attn()(
            torch.randn(1, 2, 64),
            0,
            MultiHeadLatentAttention(small_config(kv_lora_rank=16)).new_cache(1),
        ),
        "c_kv",
    ),
    "cache batch": (lambda: _attn()(torch.randn(1, 2, 64), 0, _attn().new_cache(2)), "c_kv"),
    "cache gap": (lambda: _attn()(torch.randn(1, 2, 64), 3, _attn().new_cache(1)), "start_pos"),
    "update k_pe length": (
        lambda: LatentKVCache(1, 8, 8, 2).update(torch.randn(1, 3, 8), torch.randn(1, 2, 2), 0),
        "k_pe",
    ),
    "update c_kv 2-D": (
        lambda: LatentKVCache(1, 8, 8, 2).update(torch.randn(3, 8), torch.randn(1, 3, 2), 0),
        "c_kv",
    ),
    "kv update k vs v": (
        lambda: KVCache(1, 2, 8, 4).update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 2, 4), 0),
        "v",
    ),
    "run_chunks sum": (
        lambda: run_chunks(_attn(), torch.randn(1, 3, 64), [5], "naive"),
        "chunk_sizes",
    ),
    "run_chunks zero": (
        lambda: run_chunks(_attn(), torch.randn(1, 3, 64), [0, 3], "naive"),
        "chunk_sizes",
    ),
}


@pytest.mark.parametrize(
    ("family", "case"),
    [
        (family, case)
        for family, cases in (
            ("types", TYPE_CASES),
            ("ranges", RANGE_CASES),
            ("lengths", LENGTH_CASES),
            ("dtypes", DTYPE_CASES),
            ("contracts", CONTRACT_CASES),
        )
        for case in cases
    ],
)
def test_bad_input_raises_naming_the_argument(family, case):
    cases = {
        "types": TYPE_CASES,
        "ranges": RANGE_CASES,
        "lengths": LENGTH_CASES,
        "dtypes": DTYPE_CASES,
        "contracts": CONTRACT_CASES,
    }[family]
    fn, name = cases[case]
    with torch.no_grad(), pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        fn()


@pytest.mark.parametrize("field", SIZE_FIELDS)
@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    bad=st.one_of(
        st.integers(max_value=0),
        st.floats(allow_nan=True),
        st.booleans(),
        st.text(max_size=3),
    )
)
def test_any_bad_size_is_refused_naming_the_field(field, bad):
    with pytest.raises((ValueError, TypeError), match=rf"^{field} \("):
        small_config(**{field: bad})


def test_too_long_generation_is_refused_before_any_work():
    lm = _lm()
    calls = []
    lm.embed_tokens.register_forward_pre_hook(lambda module, args: calls.append(1))
    for use_cache in (False, True):
        with pytest.raises(ValueError, match=r"max_new_tokens \(1000000\)"):
            lm.generate(_ids(1, 4), 10**6, use_cache=use_cache)
    assert calls == []  # refused at once, nothing was run
    assert lm.generate(_ids(1, 4), 60).shape == (1, 64)  # filling max_seq_len exactly is fine


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_cache_overflow_and_gap_leave_the_cache_untouched(mode):
    attn = MultiHeadLatentAttention(small_config())
    cache = attn.new_cache(1, 8)
    attn(torch.randn(1, 6, 64), 0, cache, mode)
    before = cache.kv_cache.clone()
    with pytest.raises(ValueError, match=r"cache overflow: writing 3 tokens at start_pos 6 "):
        attn(torch.randn(1, 3, 64), 6, cache, mode)
    with pytest.raises(ValueError, match=r"start_pos \(7\) would leave a gap"):
        attn(torch.randn(1, 1, 64), 7, cache, mode)
    assert cache.length == 6 and torch.equal(cache.kv_cache, before)  # nothing was written


def test_a_batch_of_zero_gives_an_empty_result():
    lm = _lm().eval()
    with torch.no_grad():
        assert lm(_ids(0, 3)).shape == (0, 3, 10)
        assert _attn()(torch.randn(0, 3, 64)).shape == (0, 3, 64)
    assert lm.generate(_ids(0, 3), 4).shape == (0, 7)


def test_new_cache_defaults_and_the_lm_gives_one_cache_per_layer():
    attn = _attn()
    cache = attn.new_cache(3)
    assert (cache.batch_size, cache.max_seq_len, cache.kv_cache.dtype) == (3, 64, torch.float32)
    assert attn.to(torch.float64).new_cache(1, 5).kv_cache.dtype == torch.float64
    caches = _lm().new_cache(2, 16)
    assert len(caches) == 2 and all(c.max_seq_len == 16 for c in caches)


# --- claims and titles follow the numbers --------------------------------------------------------


def _ratio(median, lo, hi):
    return {"median": median, "min": lo, "max": hi}


def test_speed_phrase_follows_the_measured_direction_and_spread():
    fast = mla.speed_phrase(_ratio(8.0, 6.0, 9.0), "absorbed MLA", "naive MLA")
    assert fast.startswith("absorbed MLA is 8.0x faster than naive MLA")
    contrary = mla.speed_phrase(_ratio(0.5, 0.4, 0.8), "absorbed MLA", "naive MLA")
    assert contrary.startswith("naive MLA is 2.0x faster than absorbed MLA")
    noisy = mla.speed_phrase(_ratio(1.05, 0.7, 1.6), "absorbed MLA", "MHA")
    assert "could not tell" in noisy and "faster" not in noisy


def _bench(speed, naive_flops=40.0, vs_mha=1.9):
    return {
        "contexts": [128, 1024],
        "rounds": 3,
        "speedup_absorbed_vs_naive": [speed, speed],
        "flop_ratio_naive_vs_absorbed": [naive_flops, naive_flops],
        "flop_ratio_absorbed_vs_mha": [vs_mha, vs_mha],
        "latent_width_per_head": 288,
        "mha_head_dim": 64,
    }


def test_titles_follow_contrary_and_noisy_numbers():
    assert "absorbed MLA is 12.0x faster" in mla.decode_time_title(_bench(_ratio(12, 10, 13)))
    assert "naive MLA is 2.0x faster" in mla.decode_time_title(_bench(_ratio(0.5, 0.4, 0.6)))
    assert "could not tell" in mla.decode_time_title(_bench(_ratio(1.1, 0.8, 1.4)))
    title = mla.decode_flops_title(_bench(_ratio(2, 2, 2)))
    assert "naive MLA does 40.0x absorbed's" in title and "latent width" in title
    assert "288 per head instead of head_dim 64" in title
    assert "1.9x MHA's" in title
    title = mla.decode_flops_title(_bench(_ratio(2, 2, 2), naive_flops=0.5, vs_mha=0.5))
    assert "absorbed MLA does 2.0x naive's" in title and "2.0x fewer than MHA" in title
    assert "less than MHA" in mla.cache_title({"mha": 100, "gqa_8_groups": 20, "mqa": 5, "mla": 10})
    assert "2.0x more than MQA" in mla.cache_title(
        {"mha": 100, "gqa_8_groups": 20, "mqa": 5, "mla": 10}
    )


def test_claim_on_speed_is_not_held_when_the_rounds_disagree(run_main):
    results = dict(run_main(mla).results)
    results["decode"] = {**results["decode"], **_bench(_ratio(1.1, 0.8, 1.4))}
    claims = mla.make_claims(results)
    speed = claims["absorbed_faster_than_naive"]
    assert not speed["held"] and "could not tell" in speed["statement"]
    results["decode"] = {**results["decode"], **_bench(_ratio(0.5, 0.4, 0.6))}
    speed = mla.make_claims(results)["absorbed_faster_than_naive"]
    assert not speed["held"] and "naive MLA is 2.0x faster" in speed["statement"]


def test_docstring_example_runs():
    import doctest

    result = doctest.testmod(mla)
    assert result.attempted >= 5 and result.failed == 0


# --- the script ----------------------------------------------------------------------------------


def test_rounds_flag_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit:
        mla.main(["--rounds", "0", "--no-show"])
    assert exit.value.code == 2
    assert "--rounds" in capsys.readouterr().err


def test_main_quick_writes_figures_and_results(run_main):
    run = run_main(mla)
    assert {p.name for p in run.pngs} == {
        "mla_data_flow.png",
        "cache_vs_context.png",
        "decode_time.png",
        "decode_flops.png",
    }
    r = run.results
    assert list(r) == ["meta", "correctness", "table1", "deepseek_cache", "decode", "claims"]
    assert r["correctness"]["all_within_tolerance"]
    assert r["correctness"]["generation"]["identical_naive"]
    assert r["correctness"]["generation"]["identical_absorbed"]
    assert r["table1"]["measured_equals_formula"] and r["deepseek_cache"]["measured_equals_formula"]
    d = r["decode"]
    assert set(d["time_ms"]) == set(d["flops"]) == {"mha", "naive", "absorbed"}
    assert d["rounds"] >= 3
    for k, times in d["time_ms"].items():  # one finite, positive time per context
        assert len(times) == len(d["contexts"]) and all(0 < t < math.inf for t in times), k
    cfg = MLAConfig(**d["config"])  # fp32 caches of the benchmarked layer, measured == formula
    assert d["cache_bytes_per_token_per_layer"] == {
        "mha": 2 * cfg.n_heads * cfg.qk_nope_head_dim * 4,
        "mla": (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4,
    }
    assert "Table 1" in run.stdout and "absorbed vs MHA" in run.stdout
    claims = r["claims"]
    assert set(claims) == {
        "naive_equals_absorbed",
        "cached_generation_identical",
        "decoupled_rope_needed",
        "table1_reproduced",
        "mla_cache_smaller_than_mha",
        "absorbed_faster_than_naive",
    }
    # exact claims (no timing) must hold; the speed claim is only recorded, with its spread
    for key in ("naive_equals_absorbed", "cached_generation_identical", "table1_reproduced"):
        assert claims[key]["held"] is True, claims[key]
    assert claims["mla_cache_smaller_than_mha"]["held"] is True
    # arithmetic per cache byte, from the module docstring: one cached token costs absorbed MLA
    # 2 h (2 d_c + d_rope) FLOPs for (d_c + d_rope) fp32 numbers, MHA 4 h d_h for 2 h d_h numbers
    h, d_c, d_r = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    assert d["flops_per_cache_byte"] == pytest.approx(
        {"mla": 2 * h * (2 * d_c + d_r) / ((d_c + d_r) * 4), "mha": 4 / (2 * 4)}
    )
    assert all(c["statement"] in run.stdout for c in claims.values())
