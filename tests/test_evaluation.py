"""Tests for evaluation.py: sliding-window perplexity against transformers' loss and plain
non-overlapping evaluation, bits per byte, the token boundary and log-likelihoods against
lm-evaluation-harness (HFLM on a transformers Llama with our weights and a fast tokenizer built
from our ranks), acc/acc_norm against lm-eval's own process_results, BLEU against sacrebleu,
ROUGE-L against rouge-score, pass@k against its closed form and Monte Carlo, ECE on inputs with a
known answer, bootstrap determinism, each bad-input rule, the titles, and the --quick run."""

from __future__ import annotations

import functools
import logging
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import evaluation
import training
from evaluation import (
    NgramLM,
    bootstrap_interval,
    check_pass_at_k,
    choose_answers,
    corpus_bleu,
    encode_pair,
    expected_calibration_error,
    loglikelihood,
    loglikelihood_tokens,
    paired_bootstrap,
    pass_at_k,
    perplexity,
    rouge_l,
    score_windows,
)
from tokenization import ENDOFTEXT


@functools.cache
def data() -> dict:
    return training.load_data()


@functools.cache
def trained() -> training.Llama:
    """training.py's saved model when present, else a small random Llama of the same vocab."""
    if (training.DEFAULT_MODEL_DIR / "model.pt").is_file():
        return training.load_trained_model(training.DEFAULT_MODEL_DIR, {"val_windows": 1}, 0)[0]
    cfg = training.ModelConfig(
        vocab_size=data()["tok"].n_vocab,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        max_seq_len=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return training.Llama(cfg).eval()


@functools.cache
def hf_model():
    pytest.importorskip("transformers")
    hf = training.to_hf_llama(trained().config)
    hf.load_state_dict(trained().state_dict(), strict=True)
    return hf


@functools.cache
def hf_tokenizer():
    """The script's transformers fast tokenizer built from our ranks (EOS <|endoftext|>)."""
    pytest.importorskip("transformers")
    return evaluation.fast_tokenizer_from_ranks()


@functools.cache
def hflm():
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    return huggingface.HFLM(pretrained=hf_model(), tokenizer=hf_tokenizer(), batch_size=16)


def val_ids(n: int) -> torch.Tensor:
    return data()["val"][:n]


# ---- perplexity ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "window", "stride"), [(300, 128, 64), (300, 128, 128), (257, 64, 24), (200, 32, 1)]
)
def test_perplexity_equals_transformers_token_weighted_loss(n, window, stride):
    torch.set_num_threads(1)
    ids = val_ids(n)
    ours = perplexity(trained(), ids, window, stride)
    ref = evaluation.hf_guide_perplexity(hf_model(), ids, window, stride)
    assert math.isclose(ours["perplexity"], ref, rel_tol=1e-6)


def test_the_guide_as_written_undercounts_later_windows():
    ids = val_ids(300)
    right = evaluation.hf_guide_perplexity(hf_model(), ids, 128, 64)
    written = evaluation.hf_guide_perplexity(hf_model(), ids, 128, 64, as_written=True)
    assert not math.isclose(right, written, rel_tol=1e-4)
    # exactly: each window's mean loss weighted by its scored tokens, minus 1 after the first
    s = score_windows(trained(), ids, 128, 64)
    sums = torch.zeros(s["n_windows"], dtype=torch.float64).index_add_(0, s["window"], s["loss"])
    counts = torch.bincount(s["window"]).double()
    weights = counts - (torch.arange(s["n_windows"]) > 0).double()
    expected = math.exp(((sums / counts) * weights).sum().item() / weights.sum().item())
    assert math.isclose(written, expected, rel_tol=1e-6)
    assert math.isclose(right, math.exp(s["loss"].mean().item()), rel_tol=1e-6)
    # with stride == window every window's label 0 is valid: the guide's count is right
    same = evaluation.hf_guide_perplexity(hf_model(), ids, 128, 128, as_written=True)
    assert math.isclose(same, evaluation.hf_guide_perplexity(hf_model(), ids, 128, 128))


def test_stride_equal_to_window_is_plain_non_overlapping_evaluation():
    window = 64
    ids = val_ids(5 * window)
    chunks = ids.view(5, window)  # non-overlapping, each predicts its window - 1 next tokens
    plain = training.evaluate(trained(), chunks)
    ours = perplexity(trained(), ids, window, window)
    assert ours["tokens"] == 5 * (window - 1)
    assert math.isclose(ours["loss"], plain, rel_tol=1e-6)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 90), window=st.integers(2, 20), data_=st.data())
def test_every_token_is_scored_once_with_the_most_context(n, window, data_):
    stride = data_.draw(st.integers(1, window))
    model = NgramLM(torch.arange(50) % 7, 7, 2)
    ids = torch.arange(n) % 7
    s = score_windows(model, ids, window, stride)
    if stride < window:
        assert torch.equal(s["target"], torch.arange(1, n))  # each target once, in order
        later = s["window"] > 0
        assert (s["context"][later] >= window - stride).all()
    else:  # non-overlapping: each window's first token has no context and is skipped
        assert torch.equal(s["target"], torch.tensor([t for t in range(1, n) if t % window]))
    assert (s["context"] >= 1).all() and (s["context"] <= window - 1).all()
    assert ((s["confidence"] > 0) & (s["confidence"] <= 1)).all()


def test_window_average_differs_only_when_windows_score_different_counts():
    ids = val_ids(300)
    uneven = perplexity(trained(), ids, 128, 64)  # first window 127 targets, later 64, last 44
    assert not math.isclose(uneven["perplexity"], uneven["window_averaged"], rel_tol=1e-4)
    even = perplexity(trained(), val_ids(4 * 33), 33, 33)  # 4 windows of 32 targets each
    assert even["tokens"] == 4 * 32
    assert math.isclose(even["perplexity"], even["window_averaged"], rel_tol=1e-12)


def test_bits_per_byte_counts_the_utf8_bytes_of_the_scored_text():
    ids = val_ids(400)
    s = score_windows(trained(), ids, 128, 32)
    scored = torch.cat([ids[:1], ids[s["target"]]])[None]
    bpb = training.bits_per_byte(s["loss"].mean().item(), scored, data()["token_bytes"])
    text_bytes = len(data()["tok"].decode_bytes(ids[1:].tolist()))  # the text after token 0
    assert math.isclose(bpb, s["loss"].sum().item() / math.log(2) / text_bytes, rel_tol=1e-12)


# ---- token boundaries and log-likelihoods against lm-evaluation-harness -------------------------


def test_encode_pair_moves_trailing_spaces_and_handles_an_empty_context():
    tok = data()["tok"]
    ctx, cont = encode_pair(tok, "The value is ", "returned")
    assert ctx == tok.encode_ordinary("The value is")
    assert cont == tok.encode_ordinary(" returned")  # the space went with the continuation
    assert encode_pair(tok, "The value is", " returned") == (ctx, cont)
    ctx, cont = encode_pair(tok, "", "Hello")
    assert ctx == [tok.special_tokens[ENDOFTEXT]] and cont == tok.encode_ordinary("Hello")


def requests(n_long: int = 3) -> list[tuple[str, str]]:
    text = " ".join(training.load_data.__doc__.split())
    heldout = evaluation.prose_paragraphs(__import__("tokenization").load_corpus()["heldout"])
    pairs = [
        ("The value is ", "returned"),  # trailing space moves
        ("The value is", " returned."),  # continuation starts with a space
        ("", "Hello world"),  # empty context: the prefix token
        ("x = 1\n", "y = 2"),  # a trailing newline moves too
        ("Assignments to", ' "__debug__" are illegal.'),
        (text, " tokenizer"),
    ]
    for words in sorted(heldout, key=len)[-n_long:]:  # the longest paragraphs
        pairs.append((" ".join(words[:-2]) * 3, " " + " ".join(words[-2:])))  # > 128: truncated
    return pairs


def test_our_tokenizer_equals_the_fast_tokenizer_built_from_its_ranks():
    tok, fast = data()["tok"], hf_tokenizer()
    texts = [c + k for c, k in requests()] + [__import__("tokenization").load_corpus()["heldout"]]
    for text in texts:
        assert fast.encode(text) == tok.encode_ordinary(text)


def test_loglikelihood_equals_lm_eval_hflm():
    torch.set_num_threads(1)
    from lm_eval.api.instance import Instance

    reqs = requests()
    # a continuation the model would produce greedily, so is_greedy is True at least once
    ctx = "The value of"
    ids = torch.tensor([data()["tok"].encode_ordinary(ctx)])
    greedy = trained().generate(ids, 3)[0, ids.shape[1] :].tolist()
    reqs.append((ctx, data()["tok"].decode(greedy)))
    theirs = hflm().loglikelihood(
        [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)], disable_tqdm=True
    )
    ours = [loglikelihood(trained(), data()["tok"], c, k) for c, k in reqs]
    assert any(len(encode_pair(data()["tok"], c, k)[0]) + 5 > 129 for c, k in reqs)
    for (ll, greedy_ok), (ref_ll, ref_greedy) in zip(ours, theirs, strict=True):
        # float32's resolution: lm-eval sums the log-probabilities in float32
        assert math.isclose(ll, ref_ll, rel_tol=1e-6), (ll, ref_ll)
        assert greedy_ok == ref_greedy
    assert ours[-1][1], "the greedy continuation is not greedy"


def test_check_lm_eval_reports_parity_and_a_greedy_request():
    torch.set_num_threads(1)
    r = evaluation.check_lm_eval(trained(), data()["tok"], requests(0)[1:4])
    assert r["requests"] == 4  # the three given and the model's own greedy continuation
    assert r["max_rel_err"] < 1e-6 and r["is_greedy_agree"] == 4
    assert r["greedy_true"] >= 1


def test_acc_and_acc_norm_equal_lm_eval_process_results():
    from lm_eval.api.task import ConfigurableTask

    gen = torch.Generator().manual_seed(0)
    questions = evaluation.build_choice_task(
        __import__("tokenization").load_corpus()["heldout"], 40, 4, 0
    )
    lls = -torch.rand(40, 4, generator=gen, dtype=torch.float64) * 60
    choices = [q["choices"] for q in questions]
    gold = torch.tensor([q["gold"] for q in questions])
    ours = choose_answers(lls, choices, gold)
    for i, q in enumerate(questions):
        fake = types.SimpleNamespace(
            config=types.SimpleNamespace(process_results=None),
            OUTPUT_TYPE="multiple_choice",
            _metric_fn_list={"acc": None, "acc_norm": None, "acc_bytes": None},
            doc_to_choice=lambda doc: doc["choices"],
            doc_to_target=lambda doc: doc["gold"],
            multiple_input=False,
            multiple_target=False,
        )
        results = [(ll, False) for ll in lls[i].tolist()]
        ref = ConfigurableTask.process_results(fake, q, results)
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert ours[metric][i].item() == ref[metric], (metric, i)
    assert not torch.equal(ours["acc"], ours["acc_norm"])  # the two really differ here


def test_choice_task_gold_is_the_real_next_words_and_distractors_come_from_elsewhere():
    text = __import__("tokenization").load_corpus()["heldout"]
    paras = [" ".join(p) for p in evaluation.prose_paragraphs(text)]
    qs = evaluation.build_choice_task(text, 60, 4, 3, n_words=4)
    assert qs == evaluation.build_choice_task(text, 60, 4, 3, n_words=4)  # fixed by the seed
    golds = set()
    for q in qs:
        assert all(len(c.split()) == 4 for c in q["choices"]) and len(set(q["choices"])) == 4
        gold = q["choices"][q["gold"]]
        home = [p for p in paras if q["context"] + " " + gold in p]
        assert home, "the gold choice does not follow its context"
        others = [c for i, c in enumerate(q["choices"]) if i != q["gold"]]
        assert all(any(c in p for p in paras) for c in others)
        assert len(q["context"].split()) >= 8
        golds.add((q["context"], gold))
    assert len(golds) == 60
    assert len({q["gold"] for q in qs}) == 4  # the gold is not always in one place
    with pytest.raises(ValueError, match="n_questions"):
        evaluation.build_choice_task(text, 10**5, 4, 0)


def test_loglikelihood_tokens_truncates_from_the_left_like_a_shorter_context():
    model = trained()
    tok = data()["tok"]
    ctx, cont = encode_pair(tok, "One two three four five six seven", " eight nine")
    long = loglikelihood_tokens(model, [(ctx, cont)], max_len=6)[0]
    short = loglikelihood_tokens(model, [((ctx + cont)[-7:][: 7 - len(cont)], cont)], 128)[0]
    assert math.isclose(long[0], short[0], rel_tol=1e-9) and long[1] == short[1]


# ---- intervals ---------------------------------------------------------------------------------


def test_bootstrap_is_deterministic_for_a_seed_and_brackets_the_mean():
    values = (torch.rand(200, generator=torch.Generator().manual_seed(1)) < 0.6).double()
    a, b = bootstrap_interval(values, 1000, 7), bootstrap_interval(values, 1000, 7)
    assert a == b
    assert a != bootstrap_interval(values, 1000, 8)
    assert a["low"] < a["mean"] < a["high"]
    se = math.sqrt(a["mean"] * (1 - a["mean"]) / 200)  # the normal approximation's width
    assert abs((a["high"] - a["low"]) / (2 * 1.96 * se) - 1) < 0.15


def test_paired_bootstrap_sees_a_small_consistent_gain_that_separate_intervals_miss():
    gen = torch.Generator().manual_seed(2)
    a = (torch.rand(300, generator=gen) < 0.5).double()
    b = a.clone()
    b[torch.nonzero(a == 0).flatten()[:15]] = 1  # b wins 15 questions, loses none
    d = paired_bootstrap(b, a, 2000, 0)
    assert not d["inside_noise"] and d["low"] > 0
    ia, ib = bootstrap_interval(a, 2000, 0), bootstrap_interval(b, 2000, 0)
    assert ib["low"] < ia["high"]  # the separate intervals overlap
    same = paired_bootstrap(a, a, 500, 0)
    assert same["inside_noise"] and same["low"] == same["high"] == 0


# ---- BLEU, ROUGE-L, pass@k, ECE ----------------------------------------------------------------


WORDS = [
    "the",
    "a",
    "value",
    "is",
    "returned",
    "x",
    "3.14",
    "1,000",
    "(see",
    "below).",
    "don't",
    "A-1",
    "2-3",
    "&amp;",
    "foo,bar",
    "end.",
    "Object's",
    "<skipped>",
    "été",
]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(WORDS), max_size=25),
            st.lists(st.sampled_from(WORDS), min_size=1, max_size=25),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_bleu_equals_sacrebleu(pairs):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = [" ".join(h) for h, _ in pairs]
    refs = [" ".join(r) for _, r in pairs]
    ref = sacrebleu.corpus_bleu(hyps, [refs])
    ours = corpus_bleu(hyps, refs)
    assert math.isclose(ours["score"], ref.score, rel_tol=1e-9, abs_tol=1e-12)
    assert (ours["hyp_len"], ours["ref_len"]) == (ref.sys_len, ref.ref_len)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_rouge_l_equals_rouge_score(reference, hypothesis):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    ref = rouge_scorer.RougeScorer(["rougeL"]).score(reference, hypothesis)["rougeL"]
    ours = rouge_l(reference, hypothesis)
    assert math.isclose(ours["fmeasure"], ref.fmeasure, abs_tol=1e-12)
    assert math.isclose(ours["precision"], ref.precision, abs_tol=1e-12)
    assert math.isclose(ours["recall"], ref.recall, abs_tol=1e-12)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), data_=st.data())
def test_pass_at_k_equals_the_closed_form(n, data_):
    c = data_.draw(st.integers(0, n))
    k = data_.draw(st.integers(1, n))
    closed = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert math.isclose(pass_at_k(n, c, k), closed, abs_tol=1e-12)


def test_pass_at_k_matches_monte_carlo():
    r = check_pass_at_k([(10, 2, 3), (20, 1, 5), (20, 0, 1), (15, 14, 2)], 20000, 0)
    assert r["closed_form_max_abs_err"] < 1e-12
    assert r["monte_carlo_max_z"] < 4.5
    assert pass_at_k(10, 0, 5) == 0 and pass_at_k(10, 6, 5) == 1  # no correct; no way to miss


def test_ece_is_zero_when_calibrated_and_the_gap_when_overconfident():
    conf = torch.tensor([0.25] * 4 + [0.5] * 2 + [0.8] * 5 + [1.0] * 3, dtype=torch.float64)
    correct = torch.tensor([1, 0, 0, 0] + [1, 0] + [1, 1, 1, 1, 0] + [1, 1, 1])
    assert expected_calibration_error(conf, correct)["ece"] == pytest.approx(0, abs=1e-12)
    over = expected_calibration_error(
        torch.full((10,), 0.9, dtype=torch.float64), torch.tensor([1] * 6 + [0] * 4)
    )
    assert over["ece"] == pytest.approx(0.3, abs=1e-12)
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(200_000, generator=gen)
    sampled = torch.rand(200_000, generator=gen) < p  # right with probability p: calibrated
    assert expected_calibration_error(p, sampled)["ece"] < 0.01
    bins = expected_calibration_error(p, sampled, n_bins=10)
    assert sum(bins["count"]) == 200_000 and len(bins["accuracy"]) == 10


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_input_raises_naming_the_argument():
    model, ids = NgramLM(torch.arange(20) % 5, 5, 1), torch.arange(10) % 5
    with pytest.raises(ValueError, match="window"):
        perplexity(model, ids, 1, 1)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, 4, 0)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, 4, 5)
    with pytest.raises(ValueError, match="ids"):
        perplexity(model, torch.tensor([], dtype=torch.long), 4, 2)
    with pytest.raises(TypeError, match="ids"):
        perplexity(model, ids.float(), 4, 2)
    with pytest.raises(TypeError, match="window"):
        perplexity(model, ids, 4.0, 2)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError, match="c"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="references"):
        corpus_bleu(["a b"], ["a b", "c"])
    with pytest.raises(ValueError, match="continuation"):
        encode_pair(data()["tok"], "context", "")
    with pytest.raises(ValueError, match="max_len"):
        loglikelihood_tokens(model, [([1], [1, 2, 3])], max_len=2)
    with pytest.raises(ValueError, match="confidence"):
        expected_calibration_error(torch.tensor([0.5]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_interval(torch.ones(3), 0, 0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(torch.ones(3), 10, 0, level=1.5)
    with pytest.raises(ValueError, match="a "):
        paired_bootstrap(torch.ones(3), torch.ones(4), 10, 0)
    with pytest.raises(ValueError, match="order"):
        NgramLM(torch.arange(20) % 5, 5, 3)


# ---- titles and claims -------------------------------------------------------------------------


def test_titles_follow_the_numbers():
    rows = [
        {"stride": 128, "perplexity": 10.0, "window_averaged": 10.5, "windows": 2},
        {"stride": 64, "perplexity": 9.0, "window_averaged": 9.2, "windows": 4},
    ]
    assert "10.0 without overlap (stride 128), 9.0 at best (stride 64)" in evaluation.stride_title(
        {"rows": rows}
    )
    rows.append({"stride": 32, "perplexity": 9.5, "window_averaged": 9.3, "windows": 8})
    title = evaluation.stride_title({"rows": rows, "window": 128})
    assert "stride 32 gives 9.5 (context past 64 tokens did not lower it further)" in title
    rows.pop()
    rows[1]["perplexity"] = 11.0
    assert "did not lower it" in evaluation.stride_title({"rows": rows})
    assert "further" not in evaluation.stride_title({"rows": rows})
    assert "off by up to 16.4%" in evaluation.stride_title({"rows": rows})  # 9.2 vs 11.0
    pos = {"context": list(range(1, 21)), "loss": [5.0] * 4 + [4.0] * 16}
    assert "Loss falls" in evaluation.position_title(pos)
    pos["loss"] = [4.0] * 4 + [5.0] * 16
    assert "does not fall" in evaluation.position_title(pos)
    d = {"mean": 0.05, "low": -0.01, "high": 0.11, "inside_noise": True}
    e = {"mean": 0.12, "low": 0.02, "high": 0.2, "inside_noise": False}
    title = evaluation.accuracy_title(
        {"trained_minus_untrained_acc": e, "trained_minus_bigram_acc": d}, 50
    )
    assert "trained - untrained +12.0 points [+2.0, +20.0]: outside the noise" in title
    assert "trained - bigram +5.0 points [-1.0, +11.0]: inside the noise" in title


def test_quick_run_writes_the_report_card_parities_and_figures(run_main):
    run = run_main(evaluation)
    r = run.results
    assert set(r["report_card"]) == set(evaluation.CARD_MODELS)
    for row in r["report_card"].values():
        assert row["perplexity"] > 1 and row["bits_per_byte"] > 0 and 0 <= row["ece"] <= 1
        assert 0 <= row["acc"]["low"] <= row["acc"]["mean"] <= row["acc"]["high"] <= 1
        assert 0 <= row["bleu"] <= 100 and 0 <= row["rouge_l"] <= 1
    assert r["references"]["bleu"]["abs_err"] < 1e-9
    for slow in ("perplexity", "rouge_l", "lm_eval"):  # the tests above check these
        assert "--quick" in r["references"][slow]
    assert set(r["comparisons"]) == {
        f"{a}_minus_{b}_{m}"
        for a, b in evaluation.CARD_PAIRS
        for m in evaluation.CARD_HIGHER_IS_BETTER
    }
    assert "training.train" in r["model"]["source"]
    assert r["claims"]["bleu_equals_sacrebleu"]["held"]
    assert r["claims"]["pass_at_k_unbiased"]["held"]
    assert r["meta"]["device"] == "cpu"
    names = {p.name for p in run.pngs}
    assert names == {
        f"{n}.png" for n in ("perplexity_vs_stride", "loss_by_position", "reliability", "accuracy")
    }
    assert "[6/6] drawing figures ..." in run.stdout


def test_cross_entropy_reference_for_the_scores():
    ids = val_ids(128)
    s = score_windows(trained(), ids, 128, 128)
    with torch.no_grad():
        ref = F.cross_entropy(trained()(ids[None, :-1])[0], ids[1:], reduction="none")
    torch.testing.assert_close(s["loss"], ref.double(), rtol=1e-5, atol=1e-5)


def test_bootstrap_statistic_resamples_like_bootstrap_interval_and_pairs_windows():
    values = torch.rand(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = evaluation.bootstrap_statistic(lambda idx: values[idx].mean(1), 50, 400, 5)
    b = bootstrap_interval(values, 400, 5)
    assert (a["value"], a["low"], a["high"]) == pytest.approx((b["mean"], b["low"], b["high"]))
    # a constant per-token gap between two models is found exactly, whatever the resample
    loss = torch.rand(30, dtype=torch.float64) * 100
    tokens = torch.randint(1, 50, (30,)).double()
    items_a = {"window_loss": loss, "window_tokens": tokens}
    items_b = {"window_loss": loss - 0.5 * tokens, "window_tokens": tokens}
    empty = {"bleu_stats": torch.zeros(0), "rouge_l": torch.zeros(0)}
    fa, n = evaluation._metric_stats({**items_a, **empty})["loss"]
    fb, _ = evaluation._metric_stats({**items_b, **empty})["loss"]
    assert n == 30
    d = evaluation.bootstrap_statistic(lambda idx: fa(idx) - fb(idx), 30, 300, 0)
    assert d["value"] == pytest.approx(0.5) and d["low"] == pytest.approx(0.5)


def test_bleu_bootstrap_value_is_the_corpus_bleu():
    hyps = ["the value is returned", "a b c d e", "x y", "the cat sat on the mat"]
    refs = ["the value is returned here", "a b c d f", "x z", "the cat sat on a mat"]
    stats = evaluation.bleu_stats(hyps, refs)
    r = evaluation.bootstrap_statistic(
        lambda idx: torch.tensor([evaluation.bleu_from_stats(stats[i].sum(0)) for i in idx]),
        4,
        200,
        0,
    )
    assert r["value"] == pytest.approx(corpus_bleu(hyps, refs)["score"])
    assert r["low"] <= r["high"]


def fake_results(better: bool) -> dict:
    """The numbers evaluation_claims reads, pointing one way or the other."""
    ppl = (10.0, 12.0) if better else (12.0, 10.0)
    d = {
        "mean": 0.05 if better else -0.05,
        "low": 0.01 if better else -0.1,
        "high": 0.1 if better else 0.02,
        "inside_noise": not better,
    }
    return {
        "references": {
            "perplexity": {"abs_err": 1e-9, "transformers": 10.0, "ours": 10.0},
            "bleu": {"abs_err": 0.0},
            "rouge_l": "skipped",
            "lm_eval": "skipped",
        },
        "pass_at_k_check": {"closed_form_max_abs_err": 0.0, "monte_carlo_max_z": 1.0},
        "stride_sweep": {
            "rows": [{"stride": 8, "perplexity": ppl[1]}, {"stride": 2, "perplexity": ppl[0]}]
        },
        "report_card": {
            "trained": {"perplexity": ppl[0]},
            "bigram": {"perplexity": ppl[1]},
            "untrained": {"perplexity": 100.0},
        },
        "comparisons": {
            "trained_minus_bigram_acc": {"a": "trained", "b": "bigram", "metric": "acc", **d}
        },
    }


def test_claims_say_what_was_measured_either_way():
    good = evaluation.evaluation_claims(fake_results(True))
    bad = evaluation.evaluation_claims(fake_results(False))
    assert good["overlap_lowers_perplexity"]["held"]
    assert not bad["overlap_lowers_perplexity"]["held"]
    assert "did not show it lower" in bad["overlap_lowers_perplexity"]["statement"]
    assert "does not beat" in bad["trained_beats_bigram_perplexity"]["statement"]
    assert "beats" in good["trained_beats_bigram_perplexity"]["statement"]
    key = "trained_minus_bigram_acc_outside_noise"
    assert good[key]["held"] and "outside the noise" in good[key]["statement"]
    assert not bad[key]["held"] and "inside the noise" in bad[key]["statement"]
    assert "rouge_equals_rouge_score" not in good  # not run: no claim


def test_reading_phrases_follow_the_numbers():
    row = {
        "acc": {"low": 0.2, "high": 0.4},
        "perplexity_interval": [180, 220],
        "acc_picks_shortest": 0.7,
        "acc_norm_picks_shortest": 0.1,
        "gold_is_shortest": 0.3,
    }
    card = {m: dict(row) for m in evaluation.CARD_MODELS}
    d = {"low": -0.2, "high": -0.1, "inside_noise": False, "window_correlation": 0.9}
    results = {
        "report_card": card,
        "tasks": {"choices": 4},
        "comparisons": {"trained_minus_bigram_loss": d},
    }
    p = evaluation.reading_phrases(results)
    assert "every model's acc interval holds chance (25%)" in p["chance_phrase"]
    assert "overlap" in p["paired_phrase"] and "does not hold 0" in p["paired_phrase"]
    assert "(r = 0.90), so the pairing cancels" in p["paired_phrase"]
    d["window_correlation"] = 0.1
    assert "cancels" not in evaluation.reading_phrases(results)["paired_phrase"]
    d["window_correlation"] = 0.9
    card["trained"] = {**row, "acc": {"low": 0.3, "high": 0.5}, "perplexity_interval": [100, 120]}
    d.update(low=-0.1, high=0.1, inside_noise=True)
    p = evaluation.reading_phrases(results)
    assert p["chance_phrase"].startswith("the acc intervals of trained Llama lie above chance")
    assert p["chance_phrase"].endswith("bigram counts hold it")
    assert "do not overlap" in p["paired_phrase"] and "holds 0" in p["paired_phrase"]
    assert "acc picked the shortest choice in 70%" in p["length_phrase"]


def test_continue_ids_greedy_equals_generate_with_the_cache():
    ids = val_ids(40).view(2, 20)
    ours = evaluation.continue_ids(trained(), ids, 6)
    assert torch.equal(ours, trained().generate(ids, 6)[:, 20:])
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = evaluation.continue_ids(trained(), ids, 4, temperature=1.0, generator=gen_a)
    assert torch.equal(a, evaluation.continue_ids(trained(), ids, 4, 1.0, gen_b))


def test_compare_card_models_pairs_the_same_items_and_measures_their_correlation():
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(20, 64, (40,), generator=gen).double()
    hard = torch.rand(40, generator=gen, dtype=torch.float64) * 3  # shared difficulty
    answers = (torch.rand(100, generator=gen) < 0.5).double()

    def fake(shift: float) -> dict:
        stats = evaluation.bleu_stats(["the value is returned"] * 5, ["the value is here"] * 5)
        return {
            "answers": {"acc": answers, "acc_norm": answers},
            "items": {
                "window_loss": (hard + 4 + shift) * tokens,
                "window_tokens": tokens,
                "bleu_stats": stats,
                "rouge_l": torch.full((5,), 0.5, dtype=torch.float64),
            },
        }

    evaluated = {"trained": fake(-0.1), "untrained": fake(3), "unigram": fake(1), "bigram": fake(0)}
    out = evaluation.compare_card_models(evaluated, 300, 0)
    d = out["trained_minus_bigram_loss"]
    assert d["mean"] == pytest.approx(-0.1) and d["high"] == pytest.approx(-0.1)
    assert not d["inside_noise"] and d["window_correlation"] == pytest.approx(1.0)
    same = out["trained_minus_bigram_acc"]  # identical answers: a difference of exactly 0
    assert same["inside_noise"] and same["low"] == same["high"] == 0
