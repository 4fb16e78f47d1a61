"""Tests for training.py: the Llama against transformers' LlamaForCausalLM, every piece of the
loop against its reference (torch.optim.AdamW, transformers' schedules, clip_grad_norm_, the one
big batch, the uninterrupted run), bad input, the claims' wording and the --quick run."""

from __future__ import annotations

import copy
import dataclasses
import doctest
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import training
from training import (
    IGNORE,
    AdamW,
    Llama,
    ModelConfig,
    TrainConfig,
    accumulate_gradients,
    clip_grad_norm,
    cosine_lr,
    get_batch,
    param_groups,
    train,
    val_windows,
    wsd_lr,
)

transformers = pytest.importorskip("transformers")

TINY = {
    "vocab_size": 61,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "hidden_dim": 48,
    "max_seq_len": 32,
}


def tiny_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread while training: on a shared 2-core machine, threads that must synchronise
    make a tiny model's step many times slower (REFERENCES.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """A toy stream with structure to learn: a repeated random phrase with noise."""
    g = torch.Generator().manual_seed(0)
    phrase = torch.randint(0, TINY["vocab_size"], (37,), generator=g)
    stream = phrase.repeat(60)
    noise = torch.rand(len(stream), generator=g) < 0.1
    return torch.where(
        noise, torch.randint(0, TINY["vocab_size"], stream.shape, generator=g), stream
    )


@pytest.fixture
def quick_run(run_main):  # run_main caches the run for the session
    return run_main(training)


# ---- The model against transformers ----


@pytest.mark.parametrize("case", list(training.PARITY_CASES))
def test_logits_equal_llama_for_causal_lm_with_the_same_weights(case):
    cfg = tiny_cfg(**training.PARITY_CASES[case])
    hf = training.to_hf_llama(cfg)
    ours = Llama(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    back = training.to_hf_llama(cfg)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(ids).logits, ref, atol=1e-5, rtol=0)
    assert ModelConfig.from_hf_config(hf.config) == cfg


def test_tied_head_is_one_tensor_and_untied_two():
    tied, untied = Llama(tiny_cfg()), Llama(tiny_cfg(tie_embeddings=False))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    v, d = TINY["vocab_size"], TINY["d_model"]
    assert (
        sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
        == v * d
    )


def test_generate_with_cache_equals_recomputation_and_top_k_1_is_greedy():
    model = Llama(tiny_cfg()).eval()
    prompt = torch.randint(0, TINY["vocab_size"], (3, 4))
    out = model.generate(prompt, 12)
    full = prompt
    with torch.no_grad():
        for _ in range(12):
            full = torch.cat([full, model(full)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, full)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 12, temperature=0.7, top_k=1, generator=g), out)
    a = model.generate(prompt, 8, 1.0, 10, torch.Generator().manual_seed(5))
    b = model.generate(prompt, 8, 1.0, 10, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_doctest_of_llama():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(Llama, "Llama", globs=dict(vars(training))):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


# ---- The loop's pieces against their references ----


def test_adamw_equals_torch_adamw_over_50_steps():
    result = training.check_adamw(steps=50)
    assert result["max_abs_err"] <= 1e-6
    assert result["max_param_change"] > 1e-2  # the check compares parameters that moved


def test_weight_decay_only_on_matrices():
    model = Llama(tiny_cfg(tie_embeddings=False))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["params"]
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["params"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    norm = model.model.norm.weight
    opt = AdamW(param_groups(model, 0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = model.lm_head.weight.detach().clone()
    opt.step()  # zero gradients: only the decay moves anything
    torch.testing.assert_close(model.lm_head.weight, before * (1 - 0.1 * 0.5))
    torch.testing.assert_close(norm, torch.ones_like(norm))


def test_schedules_equal_transformers():
    result = training.check_schedules(steps=100, warmup=10, decay=30)
    assert result["worst"] <= 1e-12


def test_schedule_landmarks():
    assert cosine_lr(0, 1.0, 10, 100) == 0.0
    assert cosine_lr(10, 1.0, 10, 100) == 1.0
    assert cosine_lr(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert cosine_lr(500, 1.0, 10, 100, 0.1) == pytest.approx(0.1)  # stays at the floor
    assert wsd_lr(0, 1.0, 10, 20, 100, 0.1) == pytest.approx(0.1)
    assert wsd_lr(50, 1.0, 10, 20, 100, 0.1) == 1.0
    assert wsd_lr(100, 1.0, 10, 20, 100, 0.1) == pytest.approx(0.1)


def test_clipping_equals_clip_grad_norm_():
    assert training.check_clipping()["worst"] <= 1e-6
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_grad_norm([p], math.inf) == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0, 0.0, 0.0]))


def test_token_weighted_accumulation_gives_the_big_batch_gradient():
    result = training.check_accumulation()
    assert len(set(result["tokens_per_micro_batch"])) == len(result["tokens_per_micro_batch"])
    assert result["token_weighted_grad_err"] <= 1e-6
    assert result["token_weighted_loss_err"] <= 1e-6
    assert result["naive_grad_err"] > 1e-3  # the mistake the weighting avoids is visible


def test_resume_reproduces_the_uninterrupted_run_and_runs_are_deterministic():
    result = training.check_resume(steps=10, stop=4)
    assert result["resumed_losses_identical"]
    assert result["resumed_val_identical"]
    assert result["rerun_identical"]
    assert result["max_loss_diff"] == 0.0


def test_loss_falls_on_a_tiny_model(tokens):
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=4, eval_every=20)
    run = train(tiny_cfg(), cfg, tokens, val_windows(tokens[-300:], 16))
    h = run["history"]
    assert h["val_loss"][-1] < h["val_loss"][0] - 1.0
    assert h["lr"][0] == 0.0 and max(h["lr"]) == pytest.approx(1e-2)
    assert run["checkpoint"]["step"] == 40


def test_checkpoint_survives_torch_save_and_refuses_another_shape(tokens):
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=8, warmup_steps=1, eval_every=3)
    windows = val_windows(tokens[-100:], 8)
    first = train(tiny_cfg(), cfg, tokens, windows, stop_at=3)
    buffer = io.BytesIO()
    torch.save(first["checkpoint"], buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=False)
    train(tiny_cfg(), cfg, tokens, windows, checkpoint=ckpt)
    with pytest.raises(ValueError, match="checkpoint"):
        train(tiny_cfg(d_model=64), cfg, tokens, windows, checkpoint=ckpt)
    with pytest.raises(ValueError, match="checkpoint"):
        train(tiny_cfg(tie_embeddings=False), cfg, tokens, windows, checkpoint=ckpt)


def test_memory_account_matches_the_formula():
    model = Llama(tiny_cfg())
    batch = get_batch(torch.randint(0, 61, (500,)), 4, 16, torch.Generator().manual_seed(0))
    memory = training.memory_account(model, batch)
    assert memory["exact"]
    measured, formula = memory["measured"]["activations"], memory["formula"]["activations"]
    assert abs(measured - formula) / formula < 0.05


# ---- Bad input: every door refuses it, naming the argument ----

BAD_CONFIGS = {
    "vocab_size": ({"vocab_size": 0}, ValueError),
    "d_model": ({"d_model": 32.0}, TypeError),
    "n_layers": ({"n_layers": True}, TypeError),
    "n_heads": ({"n_heads": -1}, ValueError),
    "n_kv_heads": ({"n_kv_heads": 3}, ValueError),  # does not divide n_heads = 4
    "hidden_dim": ({"hidden_dim": None}, TypeError),
    "max_seq_len": ({"max_seq_len": 0}, ValueError),
    "head_dim": ({"head_dim": 7}, ValueError),  # odd: RoPE rotates pairs
    "rope_base": ({"rope_base": float("nan")}, ValueError),
    "norm_eps": ({"norm_eps": 0.0}, ValueError),
    "tie_embeddings": ({"tie_embeddings": 1}, TypeError),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_model_config_names_the_argument(name):
    overrides, error = BAD_CONFIGS[name]
    with pytest.raises(error, match=name):
        tiny_cfg(**overrides)


BAD_TRAIN = {
    "steps": ({"steps": 0}, ValueError),
    "steps ": ({"steps": -3}, ValueError),
    "accum_steps": ({"accum_steps": 0}, ValueError),
    "batch_size": ({"batch_size": 2.5}, TypeError),
    "lr": ({"lr": -1e-3}, ValueError),
    "lr ": ({"lr": "1e-3"}, TypeError),
    "weight_decay": ({"weight_decay": -0.1}, ValueError),
    "betas": ({"betas": (0.9, 1.0)}, ValueError),
    "schedule": ({"schedule": "linear"}, ValueError),
    "warmup_steps": ({"warmup_steps": 50}, ValueError),  # longer than steps
    "grad_clip": ({"grad_clip": 0.0}, ValueError),
    "min_lr_ratio": ({"min_lr_ratio": 1.5}, ValueError),
    "bf16": ({"bf16": "yes"}, TypeError),
}


@pytest.mark.parametrize("name", list(BAD_TRAIN))
def test_bad_train_config_names_the_argument(name):
    overrides, error = BAD_TRAIN[name]
    base = {"steps": 10, "warmup_steps": 2}
    with pytest.raises(error, match=name.strip()):
        TrainConfig(**{**base, **overrides})


def test_bad_calls_name_the_argument(tokens):
    model = Llama(tiny_cfg())
    windows = val_windows(tokens[-100:], 8)
    cases = [
        (lambda: model(torch.zeros(1, 33, dtype=torch.long)), "max_seq_len"),
        (lambda: model(torch.zeros(1, 4)), "ids"),
        (lambda: model(torch.full((1, 4), 61)), "ids"),
        (lambda: model(torch.zeros(1, 4, dtype=torch.long), start_pos=-1), "start_pos"),
        (lambda: model.generate(torch.zeros(1, 30, dtype=torch.long), 3), "max_seq_len"),
        (lambda: model.generate(torch.zeros(1, 3, dtype=torch.long), 0), "max_new_tokens"),
        (lambda: model.generate(torch.zeros(1, 3, dtype=torch.long), 2, -1.0), "temperature"),
        (lambda: model.generate(torch.zeros(1, 3, dtype=torch.long), 2, 1.0, 0), "top_k"),
        (lambda: model.new_cache(1, max_seq_len=64), "max_seq_len"),
        (lambda: AdamW(model.parameters(), lr=-1.0), "lr"),
        (lambda: Llama("config"), "cfg"),
        (
            lambda: train(
                tiny_cfg(), TrainConfig(steps=2, seq_len=40, warmup_steps=0), tokens, windows
            ),
            "seq_len",
        ),
        (
            lambda: train(
                tiny_cfg(), TrainConfig(steps=2, seq_len=8, warmup_steps=0), tokens.float(), windows
            ),
            "train_tokens",
        ),
        (
            lambda: train(
                tiny_cfg(),
                TrainConfig(steps=2, seq_len=8, warmup_steps=0),
                tokens,
                windows,
                stop_at=3,
            ),
            "stop_at",
        ),
        (
            lambda: accumulate_gradients(
                model, [(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), IGNORE))]
            ),
            "micro_batches",
        ),
    ]
    for call, name in cases:
        with pytest.raises((ValueError, TypeError), match=name):
            call()


def test_loop_pieces_refuse_bad_input_by_name(tokens):
    model = Llama(tiny_cfg())
    windows = val_windows(tokens[-100:], 8)
    x = tokens[:8].view(2, 4)
    g = torch.Generator()
    cases = [
        (lambda: clip_grad_norm(model.parameters(), 0.0), "max_norm"),
        (lambda: clip_grad_norm(model.parameters(), float("nan")), "max_norm"),
        (lambda: cosine_lr(-1, 1.0, 1, 10), "step"),
        (lambda: cosine_lr(1, -1.0, 1, 10), "max_lr"),
        (lambda: cosine_lr(1, 1.0, 20, 10), "warmup_steps"),
        (lambda: cosine_lr(1, 1.0, 1, 10, 2.0), "min_lr_ratio"),
        (lambda: wsd_lr(1, 1.0, 5, 6, 10), "decay_steps"),
        (lambda: param_groups(model, -0.1), "weight_decay"),
        (lambda: get_batch(tokens.float(), 2, 4, g), "tokens"),
        (lambda: get_batch(tokens, 2, 4, 0), "generator"),
        (lambda: training.evaluate(model, tokens), "windows"),
        (lambda: training.token_loss_sum(torch.zeros(2, 3, 5), x), "targets"),
        (lambda: accumulate_gradients(model, []), "micro_batches"),
        (lambda: accumulate_gradients(model, [(x, x[:, :2])]), "micro_batches"),
        (lambda: accumulate_gradients(model, [(x, x)], 1), "bf16"),
    ]
    for call, name in cases:
        with pytest.raises((ValueError, TypeError), match=name):
            call()
    training.evaluate(model, windows)  # the good calls pass


@settings(max_examples=25, deadline=None)
@given(
    field=st.sampled_from(["vocab_size", "d_model", "n_layers", "n_heads", "hidden_dim"]),
    value=st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.none()),
)
def test_any_bad_size_is_refused_by_name(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        tiny_cfg(**{field: value})


# ---- Claims and titles follow the numbers ----


def test_loss_title_follows_the_numbers():
    assert "below the bigram" in training.loss_title(4.0, 5.0, 6.0)
    assert "not the bigram" in training.loss_title(5.5, 5.0, 6.0)
    assert "did not get below the unigram" in training.loss_title(7.0, 5.0, 6.0)
    ablation = {"a": {"final_val_loss": 3.0}, "b": {"final_val_loss": 2.5}}
    assert "b (2.500" in training.ablation_title(ablation)


def test_claims_follow_contrary_numbers(quick_run):
    results = copy.deepcopy(quick_run.results)
    results["run"]["final_val_loss"] = results["baselines"]["bigram"] + 0.5
    results["bf16"].update(speedup=0.5, speedup_min=0.4, speedup_max=0.6)
    results["loop"]["resume"]["resumed_losses_identical"] = False
    results["loop"]["accumulation"]["token_weighted_grad_err"] = 1e-2
    claims = training.training_claims(results)
    assert not claims["below_bigram"]["held"] and "above" in claims["below_bigram"]["statement"]
    assert not claims["bf16"]["held"] and "slower" in claims["bf16"]["statement"]
    assert not claims["resume"]["held"] and "does not reproduce" in claims["resume"]["statement"]
    assert not claims["accumulation"]["held"]
    results["run"]["final_val_loss"] = results["baselines"]["bigram"] - 0.5
    results["bf16"].update(speedup=1.5, speedup_min=1.4, speedup_max=1.6)
    claims = training.training_claims(results)
    assert claims["below_bigram"]["held"] and "below" in claims["below_bigram"]["statement"]
    assert claims["bf16"]["held"] and "faster" in claims["bf16"]["statement"]


# ---- The --quick run ----


def test_quick_run_writes_figures_model_and_tokenizer(quick_run):
    results = quick_run.results
    names = {p.name for p in quick_run.pngs}
    assert names == {"loss.png", "lr_grad_norm.png", "ablation.png", "memory.png"}
    for key in (
        "data",
        "parity",
        "loop",
        "baselines",
        "run",
        "mfu",
        "memory",
        "bf16",
        "ablation",
        "claims",
    ):
        assert key in results
    assert results["parity"]["worst_max_abs_err"] <= 1e-5
    mfu = results["mfu"]["mfu"]
    assert mfu is None or 0 < mfu <= 1
    assert 0 < results["run"]["final_bpb"] < 8
    saved = torch.load(quick_run.out_dir / "model.pt", weights_only=True)
    model = Llama(ModelConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"], strict=True)
    from tokenization import BPETokenizer

    tok = BPETokenizer.load(quick_run.out_dir / "tokenizer.tiktoken")
    assert tok.n_vocab == model.config.vocab_size == results["data"]["vocab_size"]


def test_tokenizer_trained_here_when_the_file_is_absent(tmp_path, monkeypatch):
    calls, real = [], training.BPETokenizer

    class FakeTokenizer:
        @classmethod
        def train(cls, text, vocab_size, pattern):
            calls.append(vocab_size)
            return real({bytes([i]): i for i in range(256)}, pattern)

    monkeypatch.setattr(training, "BPETokenizer", FakeTokenizer)
    data = training.load_data(tmp_path / "missing.tiktoken")
    assert calls == [training.TOKENIZER_VOCAB]
    assert data["info"]["tokenizer"].startswith("trained here")
    assert data["info"]["vocab_size"] == 257


def test_train_config_replace_keeps_validation():
    cfg = TrainConfig(steps=10, warmup_steps=2)
    with pytest.raises(ValueError, match="accum_steps"):
        dataclasses.replace(cfg, accum_steps=0)
