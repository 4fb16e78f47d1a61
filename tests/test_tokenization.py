"""Tests for tokenization.py: ranks identical to tiktoken's reference trainer and to the naive
one, encode identical to tiktoken's Rust encoder, round trips on arbitrary Unicode, special
tokens, the tiktoken file format, HF's different tie-break, each bad-input rule, the claims'
wording, and the --quick run."""

from __future__ import annotations

import doctest
import functools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tokenization
from tokenization import (
    ADVERSARIAL,
    ENDOFTEXT,
    GPT2_PATTERN,
    GPT4_PATTERN,
    LINES_PATTERN,
    BPETokenizer,
    boundary_tokens,
    compression_title,
    count_chunks,
    explain_hf_divergence,
    learn_merges,
    load_corpus,
    naive_train,
    prefix,
    tokenization_claims,
    training_title,
)

PATTERNS = [GPT2_PATTERN, GPT4_PATTERN]


@functools.cache
def corpus() -> dict:
    return load_corpus()


@functools.cache
def small_tokenizer() -> BPETokenizer:
    """1024 ranks from 60,000 characters of the training split (about 0.2 s)."""
    return BPETokenizer.train(corpus()["train"][:60_000], 1024, GPT4_PATTERN)


@functools.cache
def tiktoken_twin(tok: BPETokenizer):
    import tiktoken

    return tiktoken.Encoding(
        name="twin",
        pat_str=tok.pattern,
        mergeable_ranks=tok.mergeable_ranks,
        special_tokens=tok.special_tokens,
    )


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("pattern", PATTERNS, ids=["gpt2", "gpt4"])
def test_ranks_equal_tiktoken_educational_bpe_train(pattern):
    from tiktoken._educational import bpe_train

    text = corpus()["train"][:8_000]
    ours = BPETokenizer.train(text, 300, pattern).mergeable_ranks
    assert ours == bpe_train(text, 300, pattern, visualise=None)


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet="ab c1'\n", min_size=1, max_size=80), extra=st.integers(1, 24))
def test_ranks_equal_bpe_train_on_tie_heavy_texts(text, extra):
    """A seven-symbol alphabet makes ties at every step: the tie-break must match exactly."""
    from tiktoken._educational import bpe_train

    ours = BPETokenizer.train(text, 256 + extra, GPT2_PATTERN).mergeable_ranks
    assert ours == naive_train(text, 256 + extra, GPT2_PATTERN)
    assert ours == naive_train(text, 256 + extra, GPT2_PATTERN, dedup=True)
    # bpe_train fails (max of nothing) past the last possible merge: ask for what ours reached
    # (a second pair spelling an existing token, where bpe_train would move it to a new rank,
    # was never observed: see the module docstring)
    assert ours == bpe_train(text, len(ours), GPT2_PATTERN, visualise=None)


def test_incremental_equals_naive_on_real_text():
    text = corpus()["train"][:100_000]
    for pattern in PATTERNS:
        ours = BPETokenizer.train(text, 512, pattern).mergeable_ranks
        assert ours == naive_train(text, 512, pattern, dedup=True)


def test_tie_break_takes_the_pair_met_first_in_the_text():
    # every pair occurs once: the first merge is the first pair of the text
    assert BPETokenizer.train("ab cd", 257, GPT2_PATTERN).merges[0][:2] == (b"a", b"b")
    assert BPETokenizer.train("cd ab", 257, GPT2_PATTERN).merges[0][:2] == (b"c", b"d")
    # a count beats position: "cd" occurs twice
    assert BPETokenizer.train("ab\ncd\ncd", 257, GPT2_PATTERN).merges[0][:2] == (b"c", b"d")
    # overlaps count, as in bpe_train: "aaa" holds (a, a) twice, "bb" holds (b, b) once
    assert BPETokenizer.train("bb aaa", 257, GPT2_PATTERN).merges[0][:2] == (b"a", b"a")


def test_training_is_deterministic_and_smaller_vocabularies_are_prefixes():
    text = corpus()["train"][:30_000]
    big = BPETokenizer.train(text, 600, GPT4_PATTERN)
    assert big.mergeable_ranks == BPETokenizer.train(text, 600, GPT4_PATTERN).mergeable_ranks
    small = BPETokenizer.train(text, 400, GPT4_PATTERN)
    assert prefix(big, 400).mergeable_ranks == small.mergeable_ranks


def test_naive_train_without_dedup_pre_tokenizes_once(monkeypatch):
    def refuse(*args):
        raise AssertionError("count_chunks called: the text would be split twice")

    monkeypatch.setattr(tokenization, "count_chunks", refuse)
    assert len(naive_train("ab ab abc", 258, GPT2_PATTERN)) == 258


def test_naive_estimate_follows_tokens_rescanned():
    text = corpus()["train"][:20_000]
    tok = BPETokenizer.train(text, 600, GPT4_PATTERN)
    scan = tokenization.naive_scan_tokens(text, tok, [256, 300, 600])
    assert scan[0] == len(text.encode("utf-8"))  # before any merge: one token per byte
    assert scan[0] > scan[1] > scan[2]  # fewer tokens to rescan as they merge
    est = functools.partial(tokenization.estimate_naive_time, text, tok)
    probe = est(600, [264, 280], [[1.0], [2.0]])
    grid, tokens = probe["tokens_per_scan"].values()
    assert grid[0] == 256 and grid[-1] == 600 and {264, 280} <= set(grid)
    assert (600 - 256) * tokens[-1] <= probe["tokens_rescanned"] <= (600 - 256) * tokens[0]
    assert probe["valid"] and probe["seconds_per_token"]["median"] > 0
    assert "estimate, not measured" in probe["method"]
    # at the largest measured size it is the measurement; beyond, linear in the slope
    assert est(280, [264, 280], [[1.0], [2.0]])["median"] == pytest.approx(2.0)
    steeper = est(600, [264, 280], [[1.0], [3.0]])
    assert steeper["median"] - 3.0 == pytest.approx(2 * (probe["median"] - 2.0))
    assert not est(600, [264, 280], [[2.0], [1.0]])["valid"]


def test_divergence_why_follows_the_id_comparison():
    a = {"pair": ["x", "y"], "count": 5, "first_chunk_index": 1, "first_chunk": "xy"}
    b = {"pair": ["u", "v"], "count": 5, "first_chunk_index": 9, "first_chunk": "uv"}
    smaller = tokenization.divergence_why({**a, "hf_ids": [9, 9]}, {**b, "hf_ids": [3, 4]})
    assert "HF takes the smaller pair of its token ids ((3, 4) < (9, 9))" in smaller
    larger = tokenization.divergence_why({**a, "hf_ids": [1, 2]}, {**b, "hf_ids": [3, 4]})
    assert "smaller pair" not in larger and "(3, 4) vs (1, 2)" in larger
    counts = tokenization.divergence_why({**a, "hf_ids": [1, 2]}, {**b, "count": 4, "hf_ids": []})
    assert counts.startswith("the counts differ (5 vs 4)")


def test_training_stops_when_no_pair_is_left():
    tok = BPETokenizer.train("ab ab", 1000, GPT2_PATTERN)
    assert [t for t, r in tok.mergeable_ranks.items() if r >= 256] == [b"ab", b" ab"]


def test_hf_trainer_diverges_at_a_tie_and_the_explanation_is_its_tie_break():
    d = explain_hf_divergence(corpus()["train"][:100_000], 700, GPT4_PATTERN)
    assert d["diverges"], "expected HF's order to differ somewhere on 100 KB at vocab 700"
    assert d["tie"]
    ours, hf = d["ours"], d["hf"]
    assert ours["count"] == hf["count"]
    assert ours["first_chunk_index"] < hf["first_chunk_index"]  # ours: met first in the text
    assert tuple(hf["hf_ids"]) < tuple(ours["hf_ids"])  # HF's: the smaller pair of ids
    assert d["same_merge_set_fraction"] > 0.9


def test_the_pattern_prevents_merges_across_words_spaces_and_digits():
    text = corpus()["train"][:60_000]
    for pattern in PATTERNS:
        ranks = BPETokenizer.train(text, 700, pattern).mergeable_ranks
        assert boundary_tokens(ranks)["count"] == 0
    lines = boundary_tokens(BPETokenizer.train(text, 700, LINES_PATTERN).mergeable_ranks)
    assert lines["count"] > 0
    assert any(" " in t[1:] for t in lines["examples"].get("two words", []))


# ----------------------------------------------------------------------------- encode, decode


def test_encode_equals_hf_tokenizers_built_from_our_merges():
    tok = small_tokenizer()
    heldout = corpus()["heldout"]
    hf = tokenization.hf_from_ranks(tok)
    assert hf.encode(heldout).ids == tok.encode(heldout)
    assert hf.decode(tok.encode(heldout)) == heldout


def test_encode_equals_tiktoken_on_heldout_and_adversarial_strings():
    tok = small_tokenizer()
    enc = tiktoken_twin(tok)
    heldout = corpus()["heldout"]
    assert tok.encode(heldout) == enc.encode(heldout)
    for s in ADVERSARIAL:
        assert tok.encode(s) == enc.encode(s), repr(s)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_encode_equals_tiktoken_and_round_trips_on_arbitrary_unicode(s):
    tok = small_tokenizer()
    ids = tok.encode_ordinary(s)
    assert ids == tiktoken_twin(tok).encode_ordinary(s)
    assert tok.decode(ids) == s


SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.characters(), SURROGATES), max_size=20).map("".join))
def test_lone_surrogates_become_replacement_characters_as_in_tiktoken(s):
    assume(ENDOFTEXT not in s)
    tok = small_tokenizer()
    expected = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert tok.decode(tok.encode(s)) == expected
    assert tok.encode(s) == tiktoken_twin(tok).encode(s)
    assert tok.encode_ordinary(s) == tiktoken_twin(tok).encode_ordinary(s)


def test_cache_gives_the_same_ids_cold_and_warm():
    tok = small_tokenizer()
    text = corpus()["heldout"][:5_000]
    warm = tok.encode(text)
    tok._cache.clear()
    assert tok.encode(text) == warm


def test_special_tokens():
    tok = small_tokenizer()
    eot = tok.special_tokens[ENDOFTEXT]
    assert eot == len(tok.mergeable_ranks) == tok.n_vocab - 1
    ids = tok.encode(f"a{ENDOFTEXT}b", allowed_special={ENDOFTEXT})
    assert ids == tok.encode("a") + [eot] + tok.encode("b")
    assert ids == tiktoken_twin(tok).encode(f"a{ENDOFTEXT}b", allowed_special="all")
    assert tok.decode(ids) == f"a{ENDOFTEXT}b"
    assert eot not in tok.encode_ordinary(ENDOFTEXT)  # plain text, when asked
    with pytest.raises(ValueError, match="text"):
        tok.encode(f"a{ENDOFTEXT}b")  # disallowed by default, as in tiktoken


def test_saved_file_reads_back_through_tiktokens_loader(tmp_path):
    import tiktoken.load

    tok = small_tokenizer()
    path = tmp_path / "tokenizer.tiktoken"
    tok.save(path)
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == tok.mergeable_ranks
    loaded = BPETokenizer.load(path, GPT4_PATTERN)
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens
    text = corpus()["heldout"][:3_000]
    assert loaded.encode(text) == tok.encode(text)
    first = path.read_text().splitlines()[0].split()
    assert first == ["AA==", "0"]  # base64 of byte 0, rank 0


def test_doctest_in_the_headline_class():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(BPETokenizer, "BPETokenizer", globs=vars(tokenization)):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted > 0
    assert runner.summarize(verbose=False).failed == 0


# ----------------------------------------------------------------------------- bad input

TEXT = "some text to learn from"


@pytest.mark.parametrize(
    "vocab_size, error",
    [
        (300.0, TypeError),
        (True, TypeError),
        ("300", TypeError),
        (None, TypeError),
        (255, ValueError),
        (0, ValueError),
        (-5, ValueError),
    ],
)
def test_vocab_size_rules(vocab_size, error):
    with pytest.raises(error, match="vocab_size"):
        BPETokenizer.train(TEXT, vocab_size)
    with pytest.raises(error, match="vocab_size"):
        naive_train(TEXT, vocab_size, GPT2_PATTERN)


@settings(max_examples=30, deadline=None)
@given(st.integers(max_value=255))
def test_any_vocab_size_below_256_is_refused(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(TEXT, vocab_size)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: BPETokenizer.train("", 300), "text"),
        (lambda: BPETokenizer.train(b"bytes", 300), "text"),
        (lambda: BPETokenizer.train(None, 300), "text"),
        (lambda: BPETokenizer.train(TEXT, 300, pattern="(unclosed"), "pattern"),
        (lambda: BPETokenizer.train(TEXT, 300, pattern=""), "pattern"),
        (lambda: BPETokenizer.train(TEXT, 300, pattern=None), "pattern"),
        (lambda: load_corpus(""), "text"),
        (lambda: count_chunks(None, GPT2_PATTERN), "text"),
        (lambda: count_chunks("x", "(unclosed"), "pattern"),
        (lambda: learn_merges([b"ab"], 300), "chunks"),
        (lambda: learn_merges({b"ab": 0}, 300), "chunks"),
        (lambda: learn_merges({"ab": 1}, 300), "chunks"),
        (lambda: learn_merges({b"ab": 1}, 10), "vocab_size"),
        (lambda: prefix(small_tokenizer(), 100), "vocab_size"),
        (lambda: naive_train("x y", 260, GPT2_PATTERN, dedup="yes"), "dedup"),
        (lambda: small_tokenizer().save(None), "path"),
    ],
)
def test_training_text_and_pattern_rules(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()


@pytest.mark.parametrize(
    "ids",
    [[-1], [10**6], [1.5], ["a"], [None], [True], "abc", None, 5],
)
def test_decode_refuses_ids_outside_the_vocabulary(ids):
    with pytest.raises((ValueError, TypeError), match="ids"):
        small_tokenizer().decode(ids)


@pytest.mark.parametrize(
    "text, allowed, name",
    [
        (f"x{ENDOFTEXT}", frozenset(), "text"),
        ("x", {"<|unknown|>"}, "allowed_special"),
        ("x", "some", "allowed_special"),
        ("x", ["<|endoftext|>"], "allowed_special"),
        (b"x", frozenset(), "text"),
        (None, frozenset(), "text"),
    ],
)
def test_encode_rules(text, allowed, name):
    with pytest.raises((ValueError, TypeError), match=name):
        small_tokenizer().encode(text, allowed_special=allowed)


BYTES = {bytes([i]): i for i in range(256)}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"mergeable_ranks": [b"a"]}, "mergeable_ranks"),
        ({"mergeable_ranks": {b"a": 0}}, "mergeable_ranks"),
        ({"mergeable_ranks": {**BYTES, b"ab": 300}}, "mergeable_ranks"),
        ({"mergeable_ranks": {**BYTES, "ab": 256}}, "mergeable_ranks"),
        ({"special_tokens": {ENDOFTEXT: 3}}, "special_tokens"),
        ({"special_tokens": {ENDOFTEXT: 256, "<|x|>": 256}}, "special_tokens"),
        ({"special_tokens": {"": 256}}, "special_tokens"),
        ({"special_tokens": ["<|x|>"]}, "special_tokens"),
        ({"pattern": "[a-"}, "pattern"),
    ],
)
def test_constructor_rules(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        BPETokenizer(**kwargs)


def test_load_refuses_a_file_that_is_not_tiktokens_format(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_text("not base64 at all\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken\) line 1 has 4 fields"):
        BPETokenizer.load(path)
    path.write_text("A%A= 0\n")
    with pytest.raises(ValueError, match=r"line 1: token 'A%A=' is not base64"):
        BPETokenizer.load(path)
    path.write_text("AA== x1\n")
    with pytest.raises(ValueError, match=r"line 1: rank 'x1' of token 'AA==' is not an int"):
        BPETokenizer.load(path)
    path.write_text("AA== 0\nAA== 1\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken\): mergeable_ranks"):
        BPETokenizer.load(path)
    path.write_text("AA== 5\n")  # a rank with a gap
    with pytest.raises(ValueError, match=r"bad.tiktoken\): mergeable_ranks"):
        BPETokenizer.load(path)
    with pytest.raises(TypeError, match="path"):
        BPETokenizer.load(None)


def test_load_skips_empty_lines_as_tiktoken_does(tmp_path):
    import tiktoken.load

    tok = small_tokenizer()
    path = tmp_path / "tokenizer.tiktoken"
    lines = tokenization.tiktoken_file_bytes(tok.mergeable_ranks).splitlines(keepends=True)
    path.write_bytes(b"\n" + b"".join(lines[:10]) + b"\n\n" + b"".join(lines[10:]) + b"\n")
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == tok.mergeable_ranks
    assert BPETokenizer.load(path).mergeable_ranks == tok.mergeable_ranks


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--vocab-size", "100"], "--vocab-size"),
        (["--vocab-size", "lots"], "--vocab-size"),
        (["--text", "/nonexistent/file.txt"], "--text"),
    ],
)
def test_bad_flags_exit_with_one_line(argv, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        tokenization.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert flag in err[-1]
    assert not (tmp_path / "out").exists()


def test_empty_text_file_is_a_flag_error(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SystemExit):
        tokenization.main(["--text", str(empty), "--out", str(tmp_path / "out")])
    assert "is empty" in capsys.readouterr().err


def test_learners_text_is_split_by_paragraphs():
    text = "\n\n".join(f"paragraph {i} with words" for i in range(20))
    c = load_corpus(text, "mine.txt")
    assert c["heldout"].startswith("paragraph 0 ") and "paragraph 10 " in c["heldout"]
    assert "paragraph 1 " in c["train"] and "paragraph 10 " not in c["train"]
    short = load_corpus("one paragraph only, but long enough to split", "short.txt")
    assert short["train"] + short["heldout"] == "one paragraph only, but long enough to split"


# ----------------------------------------------------------------------------- claims and titles


def _numbers(
    same=True,
    speedup=(40.0, 30.0, 50.0),
    t4096=0.5,
    tiktoken_ratio=(3.0, 2.5, 3.5),
    crossing=200,
    rises=True,
):
    parity = {
        "bpe_train": {
            n: {"text_chars": 1000, "vocab_size": 300, "identical": same} for n in ("gpt2", "gpt4")
        },
        "tiktoken": {
            "heldout_identical": same,
            "adversarial_identical": 11 if same else 9,
            "n_adversarial": 11,
        },
        "round_trip": {"heldout": same, "adversarial": 11, "n_adversarial": 11, "special": True},
    }
    med, lo, hi = speedup
    training = {
        "text_bytes": 434_000,
        "rounds": 3,
        "incremental": {
            "vocab_sizes": [288, 4096],
            "median_s": [0.1, t4096],
            "min_s": [0.1, t4096],
            "max_s": [0.1, t4096],
        },
        "speedup_vs_naive": {"vocab_size": 288, "median": med, "min": lo, "max": hi},
        "naive": {"vocab_sizes": [288], "median_s": [4.0], "min_s": [3.0], "max_s": [5.0]},
        "naive_dedup": {"vocab_sizes": [288], "median_s": [1.0], "min_s": [1.0], "max_s": [1.0]},
        "naive_estimate": {
            "vocab_size": 4096,
            "valid": True,
            "median": 470.0,
            "minutes": 470.0 / 60,
            "speedup": 940.0,
        },
        "split": {"median": 0.05, "min": 0.05, "max": 0.05},
    }
    med, lo, hi = tiktoken_ratio
    encode = {
        "mb_per_s": {"ours_cold_cache": {"median": 1.0}},
        "tiktoken_vs_ours_cold": {"median": med, "min": lo, "max": hi},
    }
    g4 = [1.0, 2.0, 2.5] if rises else [1.0, 2.5, 2.4]
    compression = {
        "vocab_sizes": [256, 512, 1024],
        "boundary_vocab_size": 1024,
        "bytes_per_token": {"gpt2": [1.0, 2.0, 2.4], "gpt4": g4, "lines": [1.0, 2.1, 2.6]},
        "boundary_tokens": {
            "gpt2": {"count": 0},
            "gpt4": {"count": 0},
            "lines": {"count": crossing},
        },
    }
    return parity, training, encode, compression


def test_claims_hold_on_the_usual_numbers():
    claims = tokenization_claims(*_numbers(), vocab_size=4096)
    assert all(c["held"] for c in claims.values()), claims


def test_claims_wording_follows_contrary_numbers():
    numbers = _numbers(
        same=False,
        speedup=(12.0, 4.0, 20.0),
        t4096=14.0,
        tiktoken_ratio=(9.0, 6.0, 15.0),
        crossing=0,
        rises=False,
    )
    claims = tokenization_claims(*numbers, vocab_size=4096)
    assert not any(c["held"] for c in claims.values()), claims
    text = {k: c["statement"] for k, c in claims.items()}
    assert "differ" in text["ranks_equal_bpe_train"]
    assert "different ids" in text["encode_equals_tiktoken"]
    assert "did not hold" in text["round_trip"] and "no" in text["round_trip"]
    assert "over 10 s" in text["train_time"]
    assert "did not show 10x" in text["speedup_vs_naive"] and "4.0-20.0" in text["speedup_vs_naive"]
    assert "not within 10x" in text["encode_speed"]
    assert "do not rise" in text["compression_rises_with_vocab"]
    assert claims["train_time"]["held"] is False
    assert text["train_time"].endswith("took 14.00 s (median of 3, 14.00-14.00 s): over 10 s")


def test_titles_follow_the_numbers():
    _, training, _, compression = _numbers()
    assert "40x faster" in training_title(training)
    training["speedup_vs_naive"]["median"] = 0.5
    assert "2x slower" in training_title(training)
    assert "rise from 1.00 to 2.50" in compression_title(compression)
    assert "no pattern compresses more" in compression_title(compression)
    _, _, _, flat = _numbers(rises=False)
    flat["bytes_per_token"]["lines"] = [1.0, 2.0, 2.0]
    assert "do not rise steadily" in compression_title(flat)
    assert "no pattern compresses less" in compression_title(flat)


def test_figures_draw_from_contrary_numbers():
    _, training, _, compression = _numbers(rises=False, crossing=0)
    compression["boundary_tokens"] = {
        n: {"count": 0, "by_kind": {}} for n in ("gpt2", "gpt4", "lines")
    }
    tokenization.plot_training_time(training)
    tokenization.plot_compression(compression)


# ----------------------------------------------------------------------------- the script


def test_quick_run_writes_figures_results_and_the_tokenizer(run_main):
    import tiktoken.load

    run = run_main(tokenization)
    names = {p.name for p in run.pngs}
    assert names == {
        "compression.png",
        "sentence_splits.png",
        "token_lengths.png",
        "training_time.png",
    }
    r = run.results
    assert {
        "meta",
        "corpus",
        "tokenizer",
        "parity",
        "training",
        "encode",
        "compression",
        "claims",
    } <= r.keys()
    assert r["corpus"]["python"] and r["corpus"]["train_bytes"] > r["corpus"]["heldout_bytes"] > 0
    for name in (
        "ranks_equal_bpe_train",
        "encode_equals_tiktoken",
        "round_trip",
        "pattern_prevents_boundary_merges",
        "compression_rises_with_vocab",
    ):
        assert r["claims"][name]["held"], r["claims"][name]
    assert r["parity"]["hf_tokenizers"]["heldout_identical"] is True
    ranks = tiktoken.load.load_tiktoken_bpe(str(run.out_dir / "tokenizer.tiktoken"))
    assert len(ranks) == r["tokenizer"]["vocab_size"] == 4096
    assert r["training"]["ranks_identical"]["identical"] == [True] * len(
        r["training"]["ranks_identical"]["vocab_sizes"]
    )


def test_committed_tokenizer_file_is_what_training_gives_on_this_python():
    """training.py loads docs/figures/tokenization/tokenizer.tiktoken: it must be exactly what
    BPETokenizer.train learns from the corpus (the help text changes between Python versions)."""
    import json
    import platform
    from pathlib import Path

    folder = Path(tokenization.__file__).parent / "docs" / "figures" / "tokenization"
    results = json.loads((folder / "results.json").read_text())
    if results["corpus"]["python"] != platform.python_version():
        pytest.skip(f"committed on Python {results['corpus']['python']}: another help text")
    loaded = BPETokenizer.load(folder / "tokenizer.tiktoken")
    vocab_size = results["tokenizer"]["vocab_size"]
    trained = BPETokenizer.train(corpus()["train"], vocab_size, GPT4_PATTERN)
    assert loaded.mergeable_ranks == trained.mergeable_ranks
    assert loaded.special_tokens == {ENDOFTEXT: vocab_size}
