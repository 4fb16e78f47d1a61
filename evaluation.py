"""Evaluation: perplexity, bits per byte, multiple choice, BLEU, ROUGE-L, pass@k and calibration.

The problem
-----------
``training.py`` ends with a model and one number, its validation loss. The numbers people quote
about a language model are easy to get subtly wrong: perplexity averaged per window instead of
per token (the last, shorter window then weighs as much as a full one), sliding windows that
skip or double-count a token at every boundary, a score that depends on whether the space
between a question and its answer belongs to the question or to the answer, ``acc`` and
``acc_norm`` reported interchangeably (they can differ by 15 points on HellaSwag), accuracies
quoted without their noise, perplexities compared across tokenizers (a token is not a unit of
text). Each is a few lines of code; each is tested here against the tool people trust.

The idea
--------
1. Perplexity with sliding windows (Hugging Face's "Perplexity of fixed-length models"): windows
   of ``window`` tokens start every ``stride`` tokens; each scores only the tokens no earlier
   window scored, so every token is scored once, with ``window - stride`` tokens of context or
   more. Average the losses over *tokens* (1), not over windows (2).
2. Bits per byte (2'): the same summed loss over the UTF-8 bytes of the scored text, a unit that
   does not depend on the tokenizer (nanochat's, ``training.bits_per_byte``).
3. Log-likelihood of a continuation given a context, with lm-evaluation-harness's token
   boundary: trailing spaces move from the context to the continuation, context + continuation
   is encoded whole and split after the context's tokens, an empty context becomes one prefix
   token, an input too long loses tokens on the left. Multiple choice picks the choice of
   highest log-likelihood (``acc``) or of highest log-likelihood per character (``acc_norm``);
   the task here: after a few dozen words of held-out prose, are the next 4 words the real
   ones or 4 words from another paragraph? (Every choice has 4 words, so acc cannot win by
   picking the choice with fewer words, but characters and tokens still differ.)
4. Noise: a bootstrap over the questions gives each accuracy a 95% interval; a *paired*
   bootstrap of the difference between two models on the same questions says whether they
   differ at all. Perplexity is resampled by window (neighbouring tokens are not independent),
   BLEU and ROUGE-L by prompt.
5. Generation: BLEU (n-gram precision with a brevity penalty) and ROUGE-L (longest common
   subsequence) of greedy continuations against the true text; pass@k, the chance that at
   least one of k samples is correct, estimated without bias from n >= k samples.
6. Calibration: when the model's top token has probability p, is it right a fraction p of the
   time? Expected calibration error and a reliability diagram.

The math
--------
Token ids x_0 .. x_{N-1}; window w starts at b_w = w * stride and holds x_{b_w} .. x_{e_w - 1},
e_w = min(b_w + window, N); it scores the targets T_w = {t : max(e_{w-1}, b_w + 1) <= t < e_w}
(e_{-1} = 1), each with the log-probability log p(x_t | x_{b_w} .. x_{t-1})::

    (1) PPL       = exp( sum_w sum_{t in T_w} -log p(x_t | ...) / sum_w |T_w| )   token-weighted
    (2) PPL_win   = exp( (1/W) sum_w [ sum_{t in T_w} -log p(x_t | ...) / |T_w| ] )  window mean
    (2') BPB      = sum_w sum_{t in T_w} -log p(x_t | ...) / (ln 2 * UTF-8 bytes of the targets)
    (3) ll(c | x) = sum_{j} log p(c_j | x, c_<j),  greedy = every c_j is the argmax
    (4) acc = [argmax_i ll_i = gold],  acc_norm = [argmax_i ll_i / len(choice_i) = gold]
    (5) bootstrap: B resamples of the n questions with replacement; 95% interval = the 2.5%
        and 97.5% quantiles of the B mean accuracies (of the B mean differences, paired)
    (6) BLEU = BP * exp( (1/4) sum_{n=1..4} log p_n ),  p_n = clipped n-gram matches / n-grams,
        BP = min(1, exp(1 - ref_len / hyp_len))
    (7) ROUGE-L: P = LCS / len(hyp), R = LCS / len(ref), F = 2 P R / (P + R)
    (8) pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1..n} (1 - k / i)
    (9) ECE = sum_b (|B_b| / n) |acc(B_b) - conf(B_b)|, bins of equal width in [0, 1]

When stride = window the windows do not overlap and T_w loses its first token (it has no
context inside the window): that is plain non-overlapping evaluation, which scores N - W tokens.

Where it is used
----------------
lm-evaluation-harness (``loglikelihood``, ``acc``, ``acc_norm``, bootstrap standard errors),
Hugging Face's perplexity guide and ``evaluate``, nanochat (bits per byte), sacrebleu (WMT's
BLEU), rouge-score (summarisation), HumanEval (pass@k), every model card's benchmark table.

Run it
------
    uv run python evaluation.py                  # default run (run time: README, measured)
    uv run python evaluation.py --quick          # a tiny model trained here, a fast check
    uv run python evaluation.py --model DIR      # evaluate DIR/model.pt (from training.py)

The default run evaluates ``docs/figures/training/model.pt`` (training.py's default run) when it
exists, else trains a small Llama through ``training.train``; results.json says which. It
compares the trained model with an untrained one of the same shape and with unigram and bigram
counts, prints the report card with intervals and the parities, and saves the figures and
``results.json`` under ``--out`` (default ``figures/evaluation/``).

References
----------
- Hugging Face, "Perplexity of fixed-length models" (transformers docs, ``perplexity.md``):
  GPT-2 large on WikiText-2, 19.44 at stride 1024, 16.44 at stride 512.
- Gao et al., "The Language Model Evaluation Harness", 2024, arXiv 2405.14782; reference code
  EleutherAI/lm-evaluation-harness ``lm_eval/api/model.py`` (``_encode_pair``,
  ``loglikelihood``), ``lm_eval/models/huggingface.py`` (``_loglikelihood_tokens``),
  ``lm_eval/api/task.py`` (``process_results``: ``acc``, ``acc_norm``).
- Papineni et al., "BLEU", ACL 2002; Post, "A Call for Clarity in Reporting BLEU Scores", 2018,
  arXiv 1804.08771 (mjpost/sacrebleu ``sacrebleu/metrics/bleu.py``,
  ``sacrebleu/tokenizers/tokenizer_13a.py``).
- Lin, "ROUGE", ACL workshop 2004 (google-research/google-research ``rouge/rouge_scorer.py``).
- Chen et al., "Evaluating Large Language Models Trained on Code", 2021, arXiv 2107.03374
  (the unbiased pass@k estimator and its stable product form).
- Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural Networks", 2017,
  arXiv 1706.04599 (ECE, reliability diagrams, 15 bins).
- Efron and Tibshirani, "An Introduction to the Bootstrap", 1993 (percentile intervals).

Contents
--------
2. Core: ``perplexity``, ``score_windows`` and ``window_perplexities`` (1, 2), ``encode_pair``,
   ``loglikelihood_tokens`` and ``loglikelihood`` (3), ``choose_answers`` (4),
   ``bootstrap_interval`` and ``paired_bootstrap`` (5), ``tokenize_13a``, ``bleu_stats``,
   ``bleu_from_stats`` and ``corpus_bleu`` (6), ``rouge_tokens`` and ``rouge_l`` (7),
   ``pass_at_k`` (8), ``expected_calibration_error`` (9).
3. Baselines and apparatus: the door checks (``_check_eval_ids``, ``_check_window_stride`` and
   the shared ``_check_sizes``, ``_check_positive``), ``NgramLM`` (unigram and bigram counts
   with a model's interface), ``fast_tokenizer_from_ranks`` (a transformers tokenizer from our
   ranks, for lm-eval), ``untrained_like``, ``continue_ids``, and the tasks built from the
   text: ``prose_paragraphs``, ``build_choice_task``, ``generation_prompts``,
   ``phrase_task``.
4. Experiments: ``claim``, ``print_claims``, ``hf_guide_perplexity``, ``check_references``,
   ``check_lm_eval``, ``PASS_AT_K_CASES``, ``check_pass_at_k``, ``evaluate_card_model``,
   ``CARD_MODELS``, ``CARD_PAIRS``, ``CARD_HIGHER_IS_BETTER``, ``bootstrap_statistic``,
   ``report_card``, ``compare_card_models``, ``stride_sweep``, ``position_losses``,
   ``stride_title``, ``position_title``, ``accuracy_title``, ``difference_phrase``,
   ``reading_phrases``, ``evaluation_claims``.
5. Figures: ``CARD_LABELS``, ``CARD_COLOURS``, ``plot_perplexity_vs_stride``,
   ``plot_loss_by_position``, ``plot_reliability``, ``plot_accuracy``.
6. Main: ``SIZES``, ``parse_args``, the ``print_*`` helpers, ``evaluation_figures``,
   ``lm_eval_requests``, ``build_card_tasks``, ``compared_models``, ``card_results``, ``main``.
7. Plumbing (identical in every script).

Read first: ``perplexity`` and ``score_windows`` (the sliding window), then ``encode_pair`` and
``loglikelihood_tokens`` (where the token boundary goes), then ``bootstrap_interval`` and
``paired_bootstrap``, then ``compare_card_models`` (which differences are inside the noise).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import numbers
import os
import platform
import re
import shutil
import tempfile
import types
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn as nn

import training
from tokenization import ENDOFTEXT, load_corpus

# =============================================================================
# 2. Core: sliding-window perplexity, log-likelihoods, intervals, BLEU, ROUGE-L, pass@k, ECE
# =============================================================================


def perplexity(model: nn.Module, ids: torch.Tensor, window: int, stride: int) -> dict:
    """Sliding-window perplexity of ``model`` on token ids (N,): (1) token-weighted, the right
    one, next to (2) exp of the mean over windows of each window's mean loss, the one people
    get wrong (the windows score different numbers of tokens). Each target is scored once,
    after as much context as the window allows; see ``score_windows``.

    Returns ``perplexity`` (1), ``window_averaged`` (2), ``loss`` (nats per token),
    ``tokens`` (targets scored) and ``windows``.

    >>> cfg = training.ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2,
    ...                            n_kv_heads=1, hidden_dim=32, max_seq_len=16)
    >>> model = training.Llama(cfg).eval()  # untrained: about uniform over 50 tokens
    >>> ids = torch.arange(40) % 50
    >>> r = perplexity(model, ids, window=16, stride=8)
    >>> round(r["perplexity"]), r["tokens"], r["windows"]  # targets 1..39, each once
    (50, 39, 4)
    >>> perplexity(model, ids, window=16, stride=16)["tokens"]  # no overlap: 3 tokens unscored
    37
    """
    return window_perplexities(score_windows(model, ids, window, stride))


@torch.no_grad()
def score_windows(
    model: nn.Module, ids: torch.Tensor, window: int, stride: int, batch_size: int = 16
) -> dict:
    """Score every target of ``ids`` (N,) once with sliding windows (the math, T_w).

    Window w reads ids[b_w : e_w] (b_w = w * stride, at most ``window`` tokens) and scores the
    targets after the last one an earlier window scored; the logit at position i predicts the
    token at i + 1. Returns float64/int64 tensors, one entry per scored target in text order:
    ``loss`` (-log p, nats), ``target`` (its position t), ``context`` (tokens the model saw
    before it, t - b_w), ``window`` (w), ``confidence`` (the top token's probability) and
    ``correct`` (whether the top token is the target); and ``n_windows``.
    """
    _check_eval_ids(ids)
    _check_window_stride(window, stride)
    n, spans, prev_end = len(ids), [], 1
    for begin in range(0, n - 1, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)  # the first target no earlier window scored
        if first < end:
            spans.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    by_len = collections.defaultdict(list)  # equal-length windows go through the model together
    for w, span in enumerate(spans):
        by_len[span[1] - span[0]].append((w, *span))
    parts = []
    for group in by_len.values():
        for chunk in range(0, len(group), batch_size):
            rows = group[chunk : chunk + batch_size]
            x = torch.stack([ids[b:e] for _, b, e, _ in rows])  # (batch, length)
            logits = model(x)  # (batch, length, vocab)
            for i, (w, b, e, first) in enumerate(rows):
                t = torch.arange(first, e)  # target positions in the text
                lp = logits[i, t - b - 1].double().log_softmax(-1)  # (targets, vocab): one earlier
                top = lp.max(-1)
                parts.append(
                    {
                        "loss": -lp.gather(1, ids[t, None]).squeeze(1),
                        "target": t,
                        "context": t - b,
                        "window": torch.full_like(t, w),
                        "confidence": top.values.exp(),
                        "correct": top.indices == ids[t],
                    }
                )
    order = torch.cat([p["target"] for p in parts]).argsort()
    out = {k: torch.cat([p[k] for p in parts])[order] for k in parts[0]}
    return {**out, "n_windows": len(spans)}


def window_perplexities(scores: dict) -> dict:
    """(1) and (2) from ``score_windows``'s output: token-weighted and window-averaged."""
    loss, win = scores["loss"], scores["window"]
    per_window = torch.zeros(scores["n_windows"], dtype=torch.float64).index_add_(0, win, loss)
    counts = torch.bincount(win, minlength=scores["n_windows"]).double()
    token_mean = loss.mean().item()  # (1) every token weighs the same
    window_mean = (per_window / counts).mean().item()  # (2) every window weighs the same
    return {
        "perplexity": math.exp(token_mean),
        "window_averaged": math.exp(window_mean),
        "loss": token_mean,
        "tokens": len(loss),
        "windows": scores["n_windows"],
    }


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's token boundary between ``context`` and ``continuation``.

    Trailing whitespace of the context moves to the continuation (" Paris" is one token; a
    space left at the end of the context would make it two, and an unnatural pair); then
    context + continuation is encoded whole and the continuation is what follows the
    context's own tokens. An empty context becomes the prefix token
    ``<|endoftext|>`` (this tokenizer's only special token, as lm-eval's ``prefix_token_id``
    falls back to the EOS token), unless the continuation itself starts with that token."""
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise TypeError("context and continuation must be str")
    if not continuation:
        raise ValueError("continuation ('') must not be empty")
    if context == "":
        prefix = tokenizer.special_tokens[ENDOFTEXT]
        cont = tokenizer.encode_ordinary(continuation)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode_ordinary(context + continuation)
    ctx = tokenizer.encode_ordinary(context)
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def loglikelihood_tokens(
    model: nn.Module, pairs: list, max_len: int, batch_size: int = 16
) -> list[tuple[float, bool]]:
    """(3) For each (context ids, continuation ids): the summed log-probability of the
    continuation and whether greedy decoding would produce it. The input is
    (context + continuation)[-(max_len + 1):][:-1] (lm-eval: truncate from the left, the last
    token is only a target); rows are right-padded into batches (a causal model's earlier
    positions never see the padding)."""
    _check_sizes(max_len=max_len, batch_size=batch_size)
    inputs = []
    for ctx, cont in pairs:
        if not ctx or not cont or len(cont) > max_len:
            raise ValueError(f"pairs: each needs a context and 1..{max_len} (max_len) targets")
        inputs.append((ctx + cont)[-(max_len + 1) :][:-1])
    out = []
    for start in range(0, len(pairs), batch_size):
        rows = inputs[start : start + batch_size]
        width = max(len(r) for r in rows)
        x = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # (batch, width)
        logits = model(x)  # (batch, width, vocab)
        for i, r in enumerate(rows):
            cont = torch.tensor(pairs[start + i][1])
            # the logit at position j predicts token j + 1: the continuation, the last
            # len(cont) tokens of context + continuation, is predicted by the input's last
            # len(cont) positions (the padding after them is never read)
            last = logits[i, len(r) - len(cont) : len(r)]  # (len(cont), vocab)
            lp = last.double().log_softmax(-1)
            ll = lp.gather(1, cont[:, None]).sum().item()  # (3)
            out.append((ll, bool((lp.argmax(-1) == cont).all())))
    return out


def loglikelihood(
    model: nn.Module, tokenizer, context: str, continuation: str, max_len: int | None = None
) -> tuple[float, bool]:
    """log p(continuation | context) in nats and whether it is the greedy continuation, with
    lm-evaluation-harness's token boundary (``encode_pair``) and truncation (max_len: the
    model's ``max_seq_len`` by default)."""
    max_len = model.config.max_seq_len if max_len is None else max_len
    return loglikelihood_tokens(model, [encode_pair(tokenizer, context, continuation)], max_len)[0]


def choose_answers(lls: torch.Tensor, choices: list[list[str]], gold: torch.Tensor) -> dict:
    """(4) lm-eval's multiple-choice metrics, per question: ``acc`` (highest log-likelihood),
    ``acc_norm`` (highest log-likelihood per character of the choice string, as lm-eval's
    ``len(choice)``: characters, the target delimiter not counted) and ``acc_bytes`` (per UTF-8
    byte). ``lls`` is (questions, choices); returns 0/1 float64 tensors.

    Why normalise: a log-likelihood is a sum of negative terms, one per token, so a longer
    choice scores lower just for being longer and ``acc`` leans to short choices. Dividing by
    the length in characters, not tokens, keeps the unit the same for every model (tokens
    differ between tokenizers, characters of the same string do not)."""
    chars = torch.tensor([[len(c) for c in q] for q in choices], dtype=torch.float64)
    nbytes = torch.tensor([[len(c.encode()) for c in q] for q in choices], dtype=torch.float64)
    return {
        "acc": (lls.argmax(1) == gold).double(),  # (4)
        "acc_norm": ((lls / chars).argmax(1) == gold).double(),  # (4)
        "acc_bytes": ((lls / nbytes).argmax(1) == gold).double(),
    }


def bootstrap_interval(values: torch.Tensor, n_boot: int, seed: int, level: float = 0.95):
    """(5) The mean of ``values`` (per question) and its percentile bootstrap interval: the
    (1 - level) / 2 and (1 + level) / 2 quantiles of the means of ``n_boot`` resamples with
    replacement. Deterministic for a seed (its own generator)."""
    _check_sizes(n_boot=n_boot)
    _check_positive(level=level)
    if level >= 1 or values.dim() != 1 or len(values) == 0:
        raise ValueError(f"level ({level}) must be < 1, values 1-D and not empty")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (n_boot, len(values)), generator=gen)  # (n_boot, n)
    means = values.double()[idx].mean(1)  # (5) one mean per resample
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2]).double())
    return {"mean": values.double().mean().item(), "low": lo.item(), "high": hi.item()}


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, n_boot: int, seed: int) -> dict:
    """(5) mean(a - b) on the same questions and its 95% interval, resampling questions (the
    pair stays together): much narrower than two separate intervals when a and b agree on
    most questions. ``inside_noise``: the interval holds 0."""
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must score the same items")
    out = bootstrap_interval(a.double() - b.double(), n_boot, seed)  # (5) on the differences
    return {**out, "inside_noise": out["low"] <= 0 <= out["high"]}


_PUNCT_13A = re.compile(r"([{|}~\[\\\]^_`\s!\"#$%&()*+:;<=>?@/])")  # spaced apart


def tokenize_13a(line: str) -> list[str]:
    """mteval-v13a's tokenization (sacrebleu's default): punctuation and symbols become
    tokens; a period or comma too, unless it sits between digits (3.14, 1,000); a dash after
    a digit too."""
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    line = _PUNCT_13A.sub(r" \1 ", f" {line} ")
    line = re.sub(r"([^0-9])([.,])", r"\1 \2 ", line)
    line = re.sub(r"([.,])([^0-9])", r" \1 \2", line)
    line = re.sub(r"([0-9])(-)", r"\1 \2 ", line)
    return line.split()


def bleu_stats(hypotheses: list[str], references: list[str], max_order: int = 4):
    """BLEU's sufficient statistics per pair, (pairs, 2 max_order + 2) int64: clipped n-gram
    matches and hypothesis n-grams for n = 1..max_order, then both lengths in 13a tokens."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"references ({len(references)}) and hypotheses ({len(hypotheses)}) must pair up"
        )
    rows = []
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = tokenize_13a(hyp), tokenize_13a(ref)
        match, total = [], []
        for n in range(1, max_order + 1):
            hc = collections.Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            rc = collections.Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            match.append(sum(min(c, rc[g]) for g, c in hc.items()))  # clipped counts
            total.append(sum(hc.values()))
        rows.append([*match, *total, len(h), len(r)])
    return torch.tensor(rows, dtype=torch.int64).view(-1, 2 * max_order + 2)


def bleu_from_stats(stats: torch.Tensor) -> float:
    """(6) BLEU (0-100) from statistics summed over the corpus, as sacrebleu: brevity penalty
    on the summed lengths, "exp" smoothing (an order with no match counts 1 / (2^k total), k
    the number of such orders so far), 0 when nothing matches."""
    max_order = (len(stats) - 2) // 2
    match, total = stats[:max_order].tolist(), stats[max_order : 2 * max_order].tolist()
    hyp_len, ref_len = int(stats[-2]), int(stats[-1])
    if not any(match) or 0 in total:
        return 0.0
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    log_p, smooth = 0.0, 1.0
    for m, t in zip(match, total, strict=True):
        if m == 0:
            smooth *= 2
        log_p += math.log(100.0 * (m if m else 1 / smooth) / t)
    return bp * math.exp(log_p / max_order)  # (6)


def corpus_bleu(hypotheses: list[str], references: list[str]) -> dict:
    """(6) Corpus BLEU with one reference per hypothesis, sacrebleu's defaults: 13a tokens,
    n-grams up to 4 clipped by the reference's, counts summed over the corpus first."""
    stats = bleu_stats(hypotheses, references).sum(0)
    return {"score": bleu_from_stats(stats), "hyp_len": int(stats[-2]), "ref_len": int(stats[-1])}


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer (no stemming): lowercase, every run of characters
    other than a-z and 0-9 is a separator."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(reference: str, hypothesis: str) -> dict:
    """(7) ROUGE-L precision, recall and F of one hypothesis against its reference, from the
    longest common subsequence of their tokens (a dynamic programme over the two lists)."""
    ref, hyp = rouge_tokens(reference), rouge_tokens(hypothesis)
    if not ref or not hyp:
        return {"precision": 0.0, "recall": 0.0, "fmeasure": 0.0}
    prev = [0] * (len(hyp) + 1)  # LCS lengths of ref[:i] vs hyp[:j], one row at a time
    for r in ref:
        row = [0]
        for j, h in enumerate(hyp):
            row.append(prev[j] + 1 if r == h else max(prev[j + 1], row[j]))
        prev = row
    p, rec = prev[-1] / len(hyp), prev[-1] / len(ref)  # (7)
    return {"precision": p, "recall": rec, "fmeasure": 2 * p * rec / (p + rec) if p + rec else 0.0}


def pass_at_k(n: int, c: int, k: int) -> float:
    """(8) The unbiased pass@k from n samples of which c are correct (Chen et al. 2021): the
    chance that k of the n drawn without replacement hold a correct one. The product form
    never builds the huge binomials."""
    _check_sizes(n=n, k=k)
    if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c <= n:
        raise ValueError(f"c ({c!r}) must be an int in 0..n ({n})")
    if k > n:
        raise ValueError(f"k ({k}) must be <= n ({n}): pass@k needs at least k samples")
    if n - c < k:
        return 1.0  # every draw of k holds a correct sample
    return 1.0 - math.prod(1 - k / i for i in range(n - c + 1, n + 1))  # (8)


def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15
) -> dict:
    """(9) ECE over ``n_bins`` equal-width bins (lo, hi] of the top-1 probability (15, as Guo
    et al.): the bin-size-weighted mean gap between accuracy and mean confidence. Also returns
    each bin's count, mean confidence and accuracy (the reliability diagram)."""
    _check_sizes(n_bins=n_bins)
    if confidence.shape != correct.shape or confidence.dim() != 1 or len(confidence) == 0:
        raise ValueError("confidence and correct must be 1-D, non-empty, of the same length")
    conf, corr = confidence.double(), correct.double()
    b = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1  # bin of each prediction
    count = torch.bincount(b, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, corr)
    safe = count.clamp(min=1)
    ece = ((acc_sum - conf_sum).abs() / len(conf)).sum().item()  # (9)
    return {
        "ece": ece,
        "n_bins": n_bins,
        "count": count.long().tolist(),
        "confidence": (conf_sum / safe).tolist(),
        "accuracy": (acc_sum / safe).tolist(),
    }


# =============================================================================
# 3. Baselines and apparatus: door checks, n-gram scorers, tasks built from the held-out text
# =============================================================================


def _check_sizes(**sizes: int) -> None:
    """Every size (a dimension, a count) must be an integer (not a bool) of at least 1."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} ({value!r}) must be an int")
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")


def _check_eval_ids(ids) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 1:
        raise TypeError("ids must be a 1-D int64 tensor of token ids")
    if len(ids) < 2:
        raise ValueError(f"ids ({len(ids)} tokens) must hold at least 2 tokens (empty text?)")


def _check_window_stride(window: int, stride: int) -> None:
    _check_sizes(window=window, stride=stride)
    if window < 2:
        raise ValueError(
            f"window ({window}) must be >= 2: a window scores its tokens after the first"
        )
    if stride > window:
        raise ValueError(f"stride ({stride}) must be <= window ({window}), or tokens go unscored")


def _check_positive(**values: float) -> None:
    """Every value (a base, a factor, an eps) must be a finite real number > 0."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} ({value!r}) must be a real number")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} ({value}) must be finite and > 0")


class NgramLM(nn.Module):
    """A unigram or bigram model with a language model's interface: ``forward(ids)`` returns
    log-probabilities (batch, seq_len, vocab) for the next token, so every scorer above runs on
    it unchanged. Counted on the training tokens; the unigram is add-one smoothed, the bigram
    interpolated, p(b | a) = (c(a, b) + alpha p(b)) / (c(a) + alpha), as
    ``training.ngram_baselines`` (whose alpha, the best on the validation targets, is used)."""

    def __init__(self, train_ids: torch.Tensor, vocab_size: int, order: int, alpha: float = 1.0):
        super().__init__()
        _check_sizes(vocab_size=vocab_size)
        _check_positive(alpha=alpha)
        if order not in (1, 2):
            raise ValueError(f"order ({order}) must be 1 (unigram) or 2 (bigram)")
        uni = torch.bincount(train_ids, minlength=vocab_size).double() + 1
        p_uni = uni / uni.sum()
        if order == 1:
            table = p_uni.log()[None].float()  # (1, vocab): the same for every context
        else:
            pair = train_ids[:-1] * vocab_size + train_ids[1:]
            counts = torch.bincount(pair, minlength=vocab_size * vocab_size).double()
            counts = counts.view(vocab_size, vocab_size)  # (previous token, next token)
            p = (counts + alpha * p_uni) / (counts.sum(1, keepdim=True) + alpha)
            table = p.log().float()  # (vocab, vocab)
        self.order = order
        self.register_buffer("table", table)
        # the attributes the scorers read from a model's config; no context limit
        self.config = types.SimpleNamespace(max_seq_len=10**9, vocab_size=vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.order == 1:
            return self.table.expand(*ids.shape, -1)  # (batch, seq_len, vocab)
        return self.table[ids]  # (batch, seq_len, vocab)


def fast_tokenizer_from_ranks(path: Path = training.TOKENIZER_FILE):
    """A transformers fast tokenizer from our tiktoken ranks file, for lm-evaluation-harness:
    ``TikTokenConverter`` rebuilds BPE merges from the ranks (each token splits into the two
    lower-ranked tokens that make it), with our GPT-4 split pattern and ``<|endoftext|>`` as
    its EOS, which lm-eval's empty-context prefix falls back to (it has no BOS). Tested to
    encode the texts used here exactly as ``BPETokenizer`` does. Needs transformers."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from tokenization import GPT4_PATTERN

    conv = TikTokenConverter(
        vocab_file=str(path), pattern=GPT4_PATTERN, extra_special_tokens=[ENDOFTEXT]
    )
    return PreTrainedTokenizerFast(tokenizer_object=conv.converted(), eos_token=ENDOFTEXT)


def untrained_like(model: training.Llama, seed: int) -> training.Llama:
    """A Llama of the same config, freshly initialised (seeded; the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return training.Llama(model.config).eval()


@torch.no_grad()
def continue_ids(
    model: nn.Module,
    prompts: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append ``max_new_tokens`` to ``prompts`` (batch, T): greedy at temperature 0, else
    sampled from softmax(logits / temperature). No cache (any model with ``forward(ids)``
    works, the n-gram scorers too); the model reads at most its ``max_seq_len`` last tokens.
    Returns only the new tokens (batch, max_new_tokens)."""
    _check_sizes(max_new_tokens=max_new_tokens)
    ids, limit = prompts, model.config.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -limit:])[:, -1].double()  # (batch, vocab)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = (logits / temperature).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompts.shape[1] :]


def prose_paragraphs(text: str) -> list[list[str]]:
    """The prose of ``text`` as paragraphs of words (split at whitespace, punctuation kept):
    blank-line separated blocks, without indented blocks (code, grammar rules), grammar
    lines (``::=``) and titles (underlined with stars)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        if block.strip() and not block.startswith((" ", "\t")) and "::=" not in block:
            if "***" not in block:
                out.append(block.split())
    return [p for p in out if p]


def build_choice_task(
    text: str,
    n_questions: int,
    n_choices: int,
    seed: int,
    n_words: int = 4,
    min_context: int = 8,
    max_context: int = 40,
) -> list[dict]:
    """Multiple-choice questions from held-out prose: the context is up to ``max_context``
    words of a paragraph (at least ``min_context``), the gold choice is the ``n_words`` words
    that really follow them, the others are ``n_words`` consecutive words from other
    paragraphs (seeded). Every choice has the same number of words, so no choice wins by being
    short in words; characters and tokens still differ (what acc_norm is about). The gold spans
    of two questions never overlap, but questions from one paragraph share words (one's gold can
    be part of another's context), so they are not quite independent for the bootstrap. Each
    question: ``context``, ``choices`` (strings without the leading space; the request adds " "
    as lm-eval's target delimiter) and ``gold``."""
    _check_sizes(
        n_questions=n_questions, n_choices=n_choices, n_words=n_words, min_context=min_context
    )
    if max_context < min_context:
        raise ValueError(f"max_context ({max_context}) must be >= min_context ({min_context})")
    paras = prose_paragraphs(text)
    spans = [(p, s) for p, w in enumerate(paras) for s in range(len(w) - n_words + 1)]
    cuts = [  # (paragraph, first gold word): gold spans n_words apart never overlap
        (p, s)
        for p, w in enumerate(paras)
        for s in range(min_context, len(w) - n_words + 1, n_words)
    ]
    if len(cuts) < n_questions or len({p for p, _ in spans}) < 2:
        raise ValueError(f"n_questions ({n_questions}): the text holds only {len(cuts)}")
    gen = torch.Generator().manual_seed(seed)
    questions = []
    for q in torch.randperm(len(cuts), generator=gen)[:n_questions].tolist():
        p, s = cuts[q]
        words = paras[p]
        choices = [" ".join(words[s : s + n_words])]
        while len(choices) < n_choices:
            dp, ds = spans[int(torch.randint(len(spans), (1,), generator=gen))]
            other = " ".join(paras[dp][ds : ds + n_words])
            if dp != p and other not in choices:
                choices.append(other)
        gold = int(torch.randint(n_choices, (1,), generator=gen))
        choices[0], choices[gold] = choices[gold], choices[0]
        context = " ".join(words[max(0, s - max_context) : s])
        questions.append({"context": context, "choices": choices, "gold": gold})
    return questions


def generation_prompts(
    ids: torch.Tensor, n: int, prompt_len: int, answer_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prompts of ``prompt_len`` tokens at seeded places of ``ids`` and the true
    ``answer_len`` tokens after each: (n, prompt_len) and (n, answer_len)."""
    _check_sizes(n=n, prompt_len=prompt_len, answer_len=answer_len)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(ids) - prompt_len - answer_len, (n,), generator=gen).tolist()
    rows = torch.stack([ids[s : s + prompt_len + answer_len] for s in starts])
    return rows[:, :prompt_len], rows[:, prompt_len:]


def phrase_task(
    train_ids: torch.Tensor, n_prompts: int, prompt_len: int, answer_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """pass@k's checkable task: continue a passage of the *training* text with exactly its
    next ``answer_len`` tokens (recall of memorised text: right or wrong, no judge needed).
    Prompts start at seeded places of the training tokens."""
    return generation_prompts(train_ids, n_prompts, prompt_len, answer_len, seed)


# =============================================================================
# 4. Experiments: parity with the references, the report card, strides, positions, claims
# =============================================================================


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


def hf_guide_perplexity(hf_model, ids: torch.Tensor, window: int, stride: int, as_written=False):
    """The loop of Hugging Face's perplexity guide on a transformers model: labels -100 on the
    context, the model's mean loss over the labels it scores times their number, summed.

    The model shifts the labels inside (position i predicts label i + 1), so it scores the
    labels at positions 1.. that are not -100. The guide as written (transformers docs,
    ``perplexity.md``: ``num_loss_tokens = num_valid_tokens - batch_size``) weighs each
    window's mean loss by (labels != -100) minus 1 (``as_written``): right when a window's
    label 0 is valid (the first window, or stride = window), one too few for every later window
    when they overlap, whose label 0 is already -100. Each token is still scored once and each
    window's mean loss is right; only the weights are off (by 1 / stride), so the guide's
    perplexity is a little off whenever the windows overlap and differ in mean loss."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            trg_len = end - prev_end
            x = ids[begin:end][None]
            labels = x.clone()
            labels[:, :-trg_len] = -100
            scored = int((labels[:, 1:] != -100).sum())  # what the shifted loss averages over
            weight = int((labels != -100).sum()) - 1 if as_written else scored
            if scored > 0:
                nll_sum += hf_model(x, labels=labels).loss.double().item() * weight
                n_tokens += weight
            prev_end = end
            if end == len(ids):
                break
    return math.exp(nll_sum / n_tokens)


def check_references(
    model, tok, ids: torch.Tensor, generated: dict, requests: list, slow: bool
) -> dict:
    """Ours vs the references on the same inputs: perplexity (window = the model's context,
    stride half of it) vs the guide's loop on transformers' LlamaForCausalLM holding our
    weights; corpus BLEU vs sacrebleu; ROUGE-L vs rouge-score (every pair); log-likelihoods of
    ``requests`` vs lm-evaluation-harness. Each as an absolute error. The references are dev
    dependencies, imported here; ``slow`` False (--quick) leaves out the three slow imports
    (transformers, rouge-score pulls nltk, lm-eval scikit-learn), which
    tests/test_evaluation.py checks."""
    out: dict = {}
    window, stride = model.config.max_seq_len, model.config.max_seq_len // 2
    out["perplexity"] = "not run under --quick (slow import): see the tests"
    try:
        if slow:
            hf = training.to_hf_llama(model.config)
            hf.load_state_dict(model.state_dict(), strict=True)
            ours = perplexity(model, ids, window, stride)["perplexity"]
            ref = hf_guide_perplexity(hf, ids, window, stride)
            written = hf_guide_perplexity(hf, ids, window, stride, as_written=True)
            out["perplexity"] = {
                "ours": ours,
                "transformers": ref,
                "abs_err": abs(ours - ref),
                "guide_as_written": written,
            }
    except ImportError:
        out["perplexity"] = "transformers not installed: not checked"
    hyps, refs = generated["hypotheses"], generated["references"]
    try:
        import sacrebleu

        ref = sacrebleu.corpus_bleu(hyps, [refs]).score
        ours = corpus_bleu(hyps, refs)["score"]
        out["bleu"] = {"ours": ours, "sacrebleu": ref, "abs_err": abs(ours - ref)}
    except ImportError:
        out["bleu"] = "sacrebleu not installed: not checked"
    if not slow:
        out["rouge_l"] = out["lm_eval"] = "not run under --quick (slow import): see the tests"
        return out
    try:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        errs = [
            abs(rouge_l(r, h)["fmeasure"] - scorer.score(r, h)["rougeL"].fmeasure)
            for h, r in zip(hyps, refs, strict=True)
        ]
        out["rouge_l"] = {"pairs": len(errs), "max_abs_err": max(errs)}
    except ImportError:
        out["rouge_l"] = "rouge-score not installed: not checked"
    out["lm_eval"] = check_lm_eval(model, tok, requests)
    return out


def check_lm_eval(model: training.Llama, tok, requests: list[tuple[str, str]]) -> dict:
    """Our ``loglikelihood`` vs lm-evaluation-harness's ``HFLM.loglikelihood`` on the same
    (context, continuation) strings: a transformers LlamaForCausalLM holding our weights and the
    fast tokenizer built from our ranks, run offline (imported here: slow, a dev dependency).

    They agree to float32's resolution, not float64's: HFLM takes log_softmax in float32 and
    sums a continuation's log-probabilities in float32, and a sum near -300 nats is stored in
    steps of 2^-15 = 3.1e-5 nats (we sum in float64); our Llama's and transformers' float32
    logits also differ by a few 1e-6 (another order of the same operations). Hence the
    relative error, about 1e-7, is the number to judge."""
    try:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        hf = training.to_hf_llama(model.config)
    except ImportError:
        return {"skipped": "lm-eval or transformers not installed: not checked"}
    hf.load_state_dict(model.state_dict(), strict=True)
    lm = HFLM(pretrained=hf, tokenizer=fast_tokenizer_from_ranks(), batch_size=16)
    # one request whose continuation is the model's own greedy one, so is_greedy is tested
    # on a True as well as on Falses
    ctx = requests[0][0].rstrip()  # encode_pair would move a trailing space
    prompt = torch.tensor([tok.encode_ordinary(ctx)[-(model.config.max_seq_len - 4) :]])
    requests = [*requests, (ctx, tok.decode(continue_ids(model, prompt, 3)[0].tolist()))]
    insts = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]
    theirs = lm.loglikelihood(insts, disable_tqdm=True)
    pairs = [encode_pair(tok, c, k) for c, k in requests]
    ours = loglikelihood_tokens(model, pairs, model.config.max_seq_len)
    errs = [abs(a[0] - b[0]) for a, b in zip(ours, theirs, strict=True)]
    rel = [e / abs(b[0]) for e, b in zip(errs, theirs, strict=True)]
    same = sum(a[1] == b[1] for a, b in zip(ours, theirs, strict=True))
    return {
        "requests": len(requests),
        "max_abs_err": max(errs),
        "max_rel_err": max(rel),
        "largest_abs_ll": max(abs(b[0]) for b in theirs),
        "is_greedy_agree": same,
        "greedy_true": sum(b[1] for b in theirs),
    }


PASS_AT_K_CASES = [(n, c, k) for n, c in ((20, 0), (20, 3), (20, 19), (200, 7)) for k in (1, 5, 10)]


def check_pass_at_k(cases: list[tuple[int, int, int]], draws: int, seed: int) -> dict:
    """pass@k (product form) vs the closed form with math.comb, and vs a Monte Carlo estimate:
    draw k of n samples (c correct) without replacement ``draws`` times, count the draws with
    a correct one. The Monte Carlo error is reported in standard errors."""
    gen = torch.Generator().manual_seed(seed)
    rows, worst_closed, worst_z = [], 0.0, 0.0
    for n, c, k in cases:
        ours = pass_at_k(n, c, k)
        closed = 1 - math.comb(n - c, k) / math.comb(n, k)
        picks = torch.rand(draws, n, generator=gen).argsort(1)[:, :k]  # k distinct of n
        mc = (picks < c).any(1).double().mean().item()  # samples 0..c-1 are the correct ones
        se = max(math.sqrt(ours * (1 - ours) / draws), 1 / draws)
        rows.append({"n": n, "c": c, "k": k, "ours": ours, "closed": closed, "monte_carlo": mc})
        worst_closed = max(worst_closed, abs(ours - closed))
        worst_z = max(worst_z, abs(mc - ours) / se)
    return {
        "cases": rows,
        "closed_form_max_abs_err": worst_closed,
        "monte_carlo_max_z": worst_z,
        "draws": draws,
    }


def evaluate_card_model(
    model: nn.Module, data: dict, tasks: dict, sizes: dict, seed: int, scores: dict | None = None
) -> dict:
    """Everything the report card needs from one model, each pass computed once: the
    sliding-window scores (perplexity, bits per byte, calibration; ``scores`` if the stride
    sweep already has them), the multiple-choice log-likelihoods, greedy continuations (BLEU,
    ROUGE-L) and sampled ones (pass@k)."""
    tok, ids = data["tok"], tasks["ids"]
    if scores is None:
        scores = score_windows(model, ids, sizes["window"], sizes["stride"])
    ppl = window_perplexities(scores)
    # (2'): training.bits_per_byte counts the bytes of windows[:, 1:], so put a dummy first
    # token before the scored targets: only the text that was scored counts (with stride =
    # window, each window's first token is not scored and its bytes are not counted)
    scored = torch.cat([ids[:1], ids[scores["target"]]])[None]  # (1, 1 + targets)
    questions = tasks["choice"]
    pairs = [encode_pair(tok, q["context"], " " + c) for q in questions for c in q["choices"]]
    lls = loglikelihood_tokens(model, pairs, tasks["max_len"])
    lls = torch.tensor([ll for ll, _ in lls]).view(len(questions), -1)
    gold = torch.tensor([q["gold"] for q in questions])
    answers = choose_answers(lls, [q["choices"] for q in questions], gold)
    prompts, truth = tasks["generation"]
    hyps = [tok.decode(r) for r in continue_ids(model, prompts, truth.shape[1]).tolist()]
    refs = [tok.decode(r) for r in truth.tolist()]
    p_prompts, p_truth = tasks["phrases"]
    n = sizes["samples"]
    gen = torch.Generator().manual_seed(seed)
    samples = continue_ids(
        model, p_prompts.repeat_interleave(n, 0), p_truth.shape[1], sizes["temperature"], gen
    )
    correct = (samples == p_truth.repeat_interleave(n, 0)).all(1).view(len(p_truth), n)
    c = correct.sum(1).tolist()
    pass_k = {f"pass_at_{k}": sum(pass_at_k(n, ci, k) for ci in c) / len(c) for k in sizes["ks"]}
    calib = expected_calibration_error(scores["confidence"], scores["correct"], sizes["bins"])
    win = scores["window"]
    chars = torch.tensor([[len(c) for c in q["choices"]] for q in questions])
    shortest, norm_picks = chars.argmin(1), (lls / chars).argmax(1)
    rouge = [rouge_l(r, h)["fmeasure"] for h, r in zip(hyps, refs, strict=True)]
    return {
        "items": {  # per window, per prompt: what the bootstrap resamples
            "window_loss": torch.zeros(ppl["windows"], dtype=torch.float64).index_add_(
                0, win, scores["loss"]
            ),
            "window_tokens": torch.bincount(win, minlength=ppl["windows"]).double(),
            "bleu_stats": bleu_stats(hyps, refs),
            "rouge_l": torch.tensor(rouge, dtype=torch.float64),
        },
        "row": {
            "perplexity": ppl["perplexity"],
            "window_averaged": ppl["window_averaged"],
            "loss": ppl["loss"],
            "bits_per_byte": training.bits_per_byte(ppl["loss"], scored, data["token_bytes"]),
            "tokens": ppl["tokens"],
            "bleu": corpus_bleu(hyps, refs)["score"],
            "rouge_l": sum(rouge) / len(rouge),
            # how often each rule picks the choice with the fewest characters (the length bias)
            "acc_picks_shortest": (lls.argmax(1) == shortest).double().mean().item(),
            "acc_norm_picks_shortest": (norm_picks == shortest).double().mean().item(),
            "gold_is_shortest": (gold == shortest).double().mean().item(),
            "ece": calib["ece"],
            "top1_accuracy": scores["correct"].double().mean().item(),
            "correct_per_prompt": c,
            **pass_k,
        },
        "answers": answers,
        "calibration": calib,
        "generated": {"hypotheses": hyps, "references": refs},
    }


CARD_MODELS = ("trained", "untrained", "unigram", "bigram")
CARD_PAIRS = (
    ("trained", "untrained"),
    ("trained", "bigram"),
    ("trained", "unigram"),
    ("bigram", "untrained"),
)
CARD_HIGHER_IS_BETTER = {
    "acc": True,
    "acc_norm": True,
    "loss": False,
    "bleu": True,
    "rouge_l": True,
}


def bootstrap_statistic(stat, n: int, n_boot: int, seed: int) -> dict:
    """The percentile 95% interval of a statistic of n items over ``n_boot`` resamples (the
    same resampled indices as ``bootstrap_interval`` for the same seed, so every model and
    every metric sees the same resamples). ``stat`` maps indices (resamples, n) to
    (resamples,) values; ``value`` is the statistic of all the items."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=gen)
    values = stat(idx).double()
    lo, hi = torch.quantile(values, torch.tensor([0.025, 0.975]).double())
    return {"value": stat(torch.arange(n)[None]).item(), "low": lo.item(), "high": hi.item()}


def _metric_stats(items: dict) -> dict:
    """metric -> (stat(idx), number of items) for ``bootstrap_statistic``: loss per token over
    resampled windows (windows, not tokens, are resampled: neighbouring tokens are not
    independent), corpus BLEU and mean ROUGE-L over resampled prompts."""
    loss, count = items["window_loss"], items["window_tokens"]
    stats, rouge = items["bleu_stats"], items["rouge_l"]
    return {
        "loss": (lambda idx: loss[idx].sum(1) / count[idx].sum(1), len(loss)),
        "bleu": (
            lambda idx: torch.tensor([bleu_from_stats(stats[i].sum(0)) for i in idx]),
            len(stats),
        ),
        "rouge_l": (lambda idx: rouge[idx].mean(1), len(rouge)),
    }


def report_card(evaluated: dict, n_boot: int, seed: int) -> dict:
    """Each model's row with 95% bootstrap intervals: acc, acc_norm and acc_bytes over
    questions; perplexity over windows; BLEU and ROUGE-L over prompts."""
    card = {}
    for name, ev in evaluated.items():
        row = {k: v for k, v in ev["row"].items() if k != "correct_per_prompt"}
        for metric in ("acc", "acc_norm", "acc_bytes"):
            row[metric] = bootstrap_interval(ev["answers"][metric], n_boot, seed)
        iv = {
            m: bootstrap_statistic(stat, n, n_boot, seed)
            for m, (stat, n) in _metric_stats(ev["items"]).items()
        }
        row["perplexity_interval"] = [math.exp(iv["loss"]["low"]), math.exp(iv["loss"]["high"])]
        row["bleu_interval"] = [iv["bleu"]["low"], iv["bleu"]["high"]]
        row["rouge_l_interval"] = [iv["rouge_l"]["low"], iv["rouge_l"]["high"]]
        card[name] = row
    return card


def compare_card_models(evaluated: dict, n_boot: int, seed: int) -> dict:
    """Paired bootstraps of a - b for each pair of models and metric: acc and acc_norm over
    questions, loss per token over windows (the same windows for both), BLEU and ROUGE-L over
    prompts; a difference is inside the noise when its 95% interval holds 0."""
    out = {}
    for a, b in CARD_PAIRS:
        ea, eb = evaluated[a], evaluated[b]
        for metric in ("acc", "acc_norm"):
            d = paired_bootstrap(ea["answers"][metric], eb["answers"][metric], n_boot, seed)
            out[f"{a}_minus_{b}_{metric}"] = {"a": a, "b": b, "metric": metric, **d}
        fa, fb = _metric_stats(ea["items"]), _metric_stats(eb["items"])
        for metric, (stat_a, n) in fa.items():  # the same resamples of the same items
            stat_b = fb[metric][0]
            d = bootstrap_statistic(
                lambda idx, sa=stat_a, sb=stat_b: sa(idx) - sb(idx), n, n_boot, seed
            )
            d = {"mean": d.pop("value"), **d, "inside_noise": d["low"] <= 0 <= d["high"]}
            out[f"{a}_minus_{b}_{metric}"] = {"a": a, "b": b, "metric": metric, **d}
        per_window = [e["items"]["window_loss"] / e["items"]["window_tokens"] for e in (ea, eb)]
        # why pairing narrows the interval: both models find the same windows hard or easy
        out[f"{a}_minus_{b}_loss"]["window_correlation"] = torch.corrcoef(torch.stack(per_window))[
            0, 1
        ].item()
    return out


def stride_sweep(model: nn.Module, ids: torch.Tensor, window: int, strides: list[int]) -> tuple:
    """Token-weighted (1) and window-averaged (2) perplexity at each stride; the loss by
    context length from the non-overlapping pass (stride = window). Also returns the scores
    of every stride (stride -> ``score_windows``'s dict), for reuse."""
    rows, by_position, all_scores = [], None, {}
    for stride in strides:
        scores = all_scores[stride] = score_windows(model, ids, window, stride)
        rows.append({"stride": stride, **window_perplexities(scores)})
        if stride == window:
            by_position = position_losses(scores, window)
    return {"window": window, "rows": rows, "by_position": by_position}, all_scores


def position_losses(scores: dict, window: int) -> dict:
    """Mean loss of the targets seen after 1, 2, .. window - 1 tokens of context."""
    ctx = scores["context"]
    total = torch.zeros(window, dtype=torch.float64).index_add_(0, ctx, scores["loss"])
    count = torch.bincount(ctx, minlength=window).double()
    keep = count > 0
    return {
        "context": torch.arange(window)[keep].tolist(),
        "loss": (total[keep] / count[keep]).tolist(),
        "count": count[keep].long().tolist(),
    }


def stride_title(sweep: dict) -> str:
    """The stride figure's message, from the numbers: no overlap vs the best overlap."""
    rows = sweep["rows"]
    none, best = rows[0], min(rows, key=lambda r: r["perplexity"])
    gap = max(abs(r["window_averaged"] / r["perplexity"] - 1) for r in rows)
    if best["perplexity"] < none["perplexity"]:
        first = (
            f"Token-weighted perplexity {none['perplexity']:.1f} without overlap (stride "
            f"{none['stride']}), {best['perplexity']:.1f} at best (stride {best['stride']}): "
            "more context per token"
        )
    else:
        first = (
            f"Token-weighted perplexity {none['perplexity']:.1f} without overlap: overlapping "
            "windows did not lower it in this run"
        )
    last = rows[-1]
    if best is not last and best["perplexity"] < none["perplexity"]:
        first += (
            f";\nstride {last['stride']} gives {last['perplexity']:.1f} (context past "
            f"{sweep['window'] - best['stride']} tokens did not lower it further)"
        )
    return (
        f"{first};\nthe window average is off by up to {100 * gap:.1f}% (every window weighs "
        "the same, whatever the number of tokens it scores)"
    )


def position_title(by_position: dict) -> str:
    """The loss-by-position figure's message, from the numbers."""
    loss = by_position["loss"]
    early = sum(loss[:4]) / len(loss[:4])
    late = sum(loss[-16:]) / len(loss[-16:])
    verb = "falls" if late < early else "does not fall"
    return (
        f"Loss {verb} with context: {early:.2f} nats over the first 4 positions, {late:.2f} "
        f"over the last 16 (context {by_position['context'][-1]})"
    )


def accuracy_title(comparisons: dict, n_questions: int) -> str:
    """The accuracy figure's message: the trained model's acc against the untrained model's and
    the bigram's, and whether each paired difference stands out of the noise."""
    parts = []
    for other in ("untrained", "bigram"):
        d = comparisons[f"trained_minus_{other}_acc"]
        where = "inside" if d["inside_noise"] else "outside"
        parts.append(
            f"trained - {other} {100 * d['mean']:+.1f} points [{100 * d['low']:+.1f}, "
            f"{100 * d['high']:+.1f}]: {where} the noise"
        )
    return f"acc on {n_questions} questions, 95% paired intervals: " + ";\n".join(parts)


def difference_phrase(d: dict) -> str:
    """'acc: trained - untrained = +2.0 points [95% paired interval -4.0, +8.0]', in the
    metric's unit (points for accuracies, nats per token for the loss)."""
    scale, unit = {
        "acc": (100, " points"),
        "acc_norm": (100, " points"),
        "loss": (1, " nats"),
        "bleu": (1, " BLEU"),
        "rouge_l": (1, ""),
    }[d["metric"]]
    fmt = ".3f" if d["metric"] in ("loss", "rouge_l") else ".1f"
    return (
        f"{d['metric']}: {d['a']} - {d['b']} = {scale * d['mean']:+{fmt}}{unit} [95% paired "
        f"interval {scale * d['low']:+{fmt}}, {scale * d['high']:+{fmt}}]"
    )


def reading_phrases(results: dict) -> dict:
    """Sentences for the README that state measured outcomes, worded from the numbers: whether
    the accuracy intervals hold chance, whether separate and paired intervals disagree, and
    which way acc and acc_norm lean on length."""
    card, n = results["report_card"], results["tasks"]["choices"]
    holds = [m for m in card if card[m]["acc"]["low"] <= 1 / n <= card[m]["acc"]["high"]]
    if len(holds) == len(card):
        chance = (
            f"every model's acc interval holds chance ({100 / n:.0f}%): this small test cannot "
            "tell the real next words from the others for any of them"
        )
    else:
        above = [CARD_LABELS[m] for m in card if card[m]["acc"]["low"] > 1 / n]
        below = [CARD_LABELS[m] for m in card if card[m]["acc"]["high"] < 1 / n]
        chance = f"the acc intervals of {' and '.join(above) or 'no model'} lie above chance"
        chance += f" ({100 / n:.0f}%)"
        if holds:
            chance += f", those of {' and '.join(CARD_LABELS[m] for m in holds)} hold it"
        if below:
            chance += f", those of {' and '.join(below)} lie below it"
    t, b = card["trained"]["perplexity_interval"], card["bigram"]["perplexity_interval"]
    d = results["comparisons"]["trained_minus_bigram_loss"]
    overlap = t[0] <= b[1] and b[0] <= t[1]
    paired = (
        f"the perplexity intervals of the trained model and the bigram "
        f"{'overlap' if overlap else 'do not overlap'} ([{t[0]:.0f}, {t[1]:.0f}] and "
        f"[{b[0]:.0f}, {b[1]:.0f}]), and the paired interval of their loss difference "
        f"({d['low']:+.3f} to {d['high']:+.3f} nats) "
        + ("holds 0" if d["inside_noise"] else "does not hold 0")
        + f"; their losses per window correlate (r = {d['window_correlation']:.2f})"
        + (
            ", so the pairing cancels the windows' shared difficulty"
            if overlap and not d["inside_noise"] and d["window_correlation"] > 0.5
            else ""
        )
    )
    r = card["trained"]
    length = (
        f"acc picked the shortest choice in {100 * r['acc_picks_shortest']:.0f}% of the "
        f"questions and acc_norm in {100 * r['acc_norm_picks_shortest']:.0f}%, while the right "
        f"answer was the shortest in {100 * r['gold_is_shortest']:.0f}%"
    )
    return {"chance_phrase": chance, "paired_phrase": paired, "length_phrase": length}


def evaluation_claims(results: dict) -> dict:
    """The claims, worded from the numbers."""
    claims = {}
    ref = results["references"]
    if isinstance(ref["perplexity"], dict):
        e = ref["perplexity"]["abs_err"] / ref["perplexity"]["transformers"]
        claims["perplexity_equals_transformers"] = claim(
            f"sliding-window perplexity equals the guide's loop on transformers' Llama with our "
            f"weights: relative error {e:.1e}",
            e < 1e-5,
        )
    if isinstance(ref["bleu"], dict):
        claims["bleu_equals_sacrebleu"] = claim(
            f"corpus BLEU equals sacrebleu's: abs error {ref['bleu']['abs_err']:.1e}",
            ref["bleu"]["abs_err"] < 1e-9,
        )
    if isinstance(ref["rouge_l"], dict):
        claims["rouge_equals_rouge_score"] = claim(
            f"ROUGE-L F equals rouge-score's on {ref['rouge_l']['pairs']} pairs: max abs error "
            f"{ref['rouge_l']['max_abs_err']:.1e}",
            ref["rouge_l"]["max_abs_err"] < 1e-12,
        )
    if isinstance(ref["lm_eval"], dict) and "max_abs_err" in ref["lm_eval"]:
        r = ref["lm_eval"]
        claims["loglikelihood_equals_lm_eval"] = claim(
            f"loglikelihood equals lm-evaluation-harness's HFLM on {r['requests']} requests: "
            f"max relative error {r['max_rel_err']:.1e} (float32's resolution: max abs error "
            f"{r['max_abs_err']:.1e} nats on log-likelihoods down to -{r['largest_abs_ll']:.0f}),"
            f" is_greedy agrees on {r['is_greedy_agree']} ({r['greedy_true']} of them greedy)",
            r["max_rel_err"] < 1e-6 and r["is_greedy_agree"] == r["requests"],
        )
    p = results["pass_at_k_check"]
    claims["pass_at_k_unbiased"] = claim(
        f"pass@k's product form equals 1 - C(n-c,k)/C(n,k) to {p['closed_form_max_abs_err']:.1e}"
        f" and Monte Carlo within {p['monte_carlo_max_z']:.1f} standard errors",
        p["closed_form_max_abs_err"] < 1e-12 and p["monte_carlo_max_z"] < 4,
    )
    rows = results["stride_sweep"]["rows"]
    lower = rows[-1]["perplexity"] < rows[0]["perplexity"]
    claims["overlap_lowers_perplexity"] = claim(
        f"overlapping windows (stride {rows[-1]['stride']}) give perplexity "
        f"{rows[-1]['perplexity']:.2f} vs {rows[0]['perplexity']:.2f} without overlap"
        + ("" if lower else "; this run did not show it lower"),
        lower,
    )
    card = results["report_card"]
    better = card["trained"]["perplexity"] < card["bigram"]["perplexity"]
    claims["trained_beats_bigram_perplexity"] = claim(
        f"the trained model's perplexity {card['trained']['perplexity']:.1f} "
        + ("beats" if better else "does not beat")
        + f" the bigram's {card['bigram']['perplexity']:.1f} (untrained "
        f"{card['untrained']['perplexity']:.0f})",
        better,
    )
    for key, d in results["comparisons"].items():
        claims[f"{key}_outside_noise"] = claim(
            f"{difference_phrase(d)}: "
            + ("inside" if d["inside_noise"] else "outside")
            + " the noise",
            not d["inside_noise"] and (d["mean"] > 0) == CARD_HIGHER_IS_BETTER[d["metric"]],
        )
    return claims


# =============================================================================
# 5. Figures (one function per figure, each returns the Figure)
# =============================================================================

CARD_LABELS = {
    "trained": "trained Llama",
    "untrained": "untrained Llama (same shape)",
    "unigram": "unigram counts",
    "bigram": "bigram counts",
}
CARD_COLOURS = {
    "trained": "tab:blue",
    "untrained": "tab:grey",
    "unigram": "tab:orange",
    "bigram": "tab:green",
}


def plot_perplexity_vs_stride(sweep: dict, title: str) -> plt.Figure:
    rows = sweep["rows"]
    strides = [r["stride"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.plot(strides, [r["perplexity"] for r in rows], "o-", label="token-weighted (1): right")
    ax.plot(
        strides,
        [r["window_averaged"] for r in rows],
        "s--",
        label="mean over windows (2): each window weighs the same",
    )
    for r in rows:
        ax.annotate(
            f"{r['windows']} windows",
            (r["stride"], r["perplexity"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(5, 5),
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(strides, [str(s) for s in strides])
    ax.set_xlim(max(strides) * 1.3, min(strides) / 1.3)  # left to right: more context
    ax.set_xlabel(
        f"stride in tokens (window {sweep['window']} tokens; to the right, more overlap and "
        "more context per token)"
    )
    ax.set_ylabel("perplexity on the held-out text")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_loss_by_position(by_position: dict, flat: dict, title: str) -> plt.Figure:
    """Mean loss against the number of tokens the model saw before the target; the n-gram
    scorers' losses (which ignore context beyond one token) as flat references."""
    fig, ax = plt.subplots(figsize=(9, 5.2))
    ctx, loss, width = by_position["context"], by_position["loss"], 8
    ax.plot(
        ctx,
        loss,
        color=CARD_COLOURS["trained"],
        alpha=0.3,
        lw=1,
        label=f"{CARD_LABELS['trained']}, each position ({by_position['count'][0]} windows)",
    )
    groups = [range(i, min(i + width, len(ctx))) for i in range(0, len(ctx), width)]
    ax.plot(
        [sum(ctx[i] for i in g) / len(g) for g in groups],
        [sum(loss[i] for i in g) / len(g) for g in groups],
        "o-",
        color=CARD_COLOURS["trained"],
        label=f"the same, mean of {width} positions",
    )
    for name, loss in flat.items():
        ax.axhline(
            loss,
            color=CARD_COLOURS[name],
            ls="--",
            lw=1,
            label=f"{CARD_LABELS[name]} (any position): {loss:.2f}",
        )
    ax.set_xlabel("tokens of context before the target (its position in a non-overlapping window)")
    ax.set_ylabel("mean loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_reliability(calibration: dict) -> plt.Figure:
    """Per model: accuracy of the top-1 guess against its probability, bin by bin (the
    diagonal is perfect calibration), and below it how many predictions fall in each bin."""
    names = list(calibration)
    fig, axes = plt.subplots(
        2,
        len(names),
        figsize=(5.5 * len(names), 6),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1]},
        squeeze=False,
    )
    for col, name in enumerate(names):
        c, ax, below = calibration[name], axes[0, col], axes[1, col]
        n = c["n_bins"]
        used = [i for i in range(n) if c["count"][i] > 0]
        centres = [(i + 0.5) / n for i in used]
        ax.bar(
            centres,
            [c["accuracy"][i] for i in used],
            width=1 / n,
            alpha=0.7,
            color=CARD_COLOURS[name],
            edgecolor="black",
            label="accuracy in the bin",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot(
            [c["confidence"][i] for i in used],
            [c["accuracy"][i] for i in used],
            "k.",
            label="(mean confidence, accuracy)",
        )
        ax.set_ylim(0, 1)
        ax.set_title(f"{CARD_LABELS[name]}: ECE {c['ece']:.3f}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        below.bar(centres, [c["count"][i] for i in used], width=1 / n, color="grey")
        below.set_yscale("log")
        below.set_xlim(0, 1)
        below.set_xlabel("top-1 probability (confidence)")
    axes[0, 0].set_ylabel("fraction of top-1 guesses right")
    axes[1, 0].set_ylabel("predictions (log)")
    fig.suptitle(
        f"Reliability diagrams: {calibration[names[0]]['n_bins']} equal-width bins, every "
        "next-token prediction on the held-out text"
    )
    fig.tight_layout()
    return fig


def plot_accuracy(card: dict, n_choices: int, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for j, metric in enumerate(("acc", "acc_norm")):
        for i, name in enumerate(card):
            r = card[name][metric]
            x = i + (j - 0.5) * 0.3
            ax.errorbar(
                x,
                100 * r["mean"],
                yerr=[[100 * (r["mean"] - r["low"])], [100 * (r["high"] - r["mean"])]],
                fmt="o" if j == 0 else "s",
                color=CARD_COLOURS[name],
                capsize=4,
                mfc=CARD_COLOURS[name] if j == 0 else "white",
            )
    ax.axhline(100 / n_choices, color="black", ls=":", label=f"chance ({100 / n_choices:.0f}%)")
    ax.plot([], [], "ko", label="acc (filled)")
    ax.plot([], [], "ks", mfc="white", label="acc_norm (open)")
    ax.set_xticks(range(len(card)), [CARD_LABELS[n] for n in card], fontsize=8)
    ax.set_ylabel("accuracy, % (bars: 95% bootstrap interval)")
    top = max(card[n][m]["high"] for n in card for m in ("acc", "acc_norm"))
    ax.set_ylim(0, min(100, 100 * top + 15))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# =============================================================================
# 6. Main
# =============================================================================

SIZES = {
    "quick": {
        "fallback": {  # the model trained through training.train when no model.pt is given
            "model": {
                "d_model": 64,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "hidden_dim": 128,
            },
            "train": {
                "steps": 30,
                "batch_size": 8,
                "seq_len": 64,
                "warmup_steps": 5,
                "eval_every": 30,
                "lr": 6e-3,
            },
            "val_windows": 8,
        },
        "eval_tokens": 800,
        "stride": 16,
        "strides_per_window": [1, 2, 4],
        "questions": 40,
        "choices": 4,
        "choice_words": 4,
        "prompts": 8,
        "prompt_len": 16,
        "answer_len": 12,
        "phrase_prompts": 8,
        "phrase_answer": 2,
        "samples": 10,
        "ks": [1, 5, 10],
        "temperature": 1.0,
        "bins": 15,
        "n_boot": 500,
        "parity_tokens": 200,
        "mc_draws": 2000,
    },
    "default": {
        "fallback": {
            "model": {
                "d_model": 128,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "hidden_dim": 384,
            },
            "train": {
                "steps": 150,
                "batch_size": 16,
                "seq_len": 64,
                "warmup_steps": 15,
                "eval_every": 150,
                "lr": 6e-3,
            },
            "val_windows": 64,
        },
        "eval_tokens": None,  # all the held-out tokens
        "stride": 64,
        "strides_per_window": [1, 2, 4, 8],
        "questions": 250,
        "choices": 4,
        "choice_words": 4,
        "prompts": 64,
        "prompt_len": 48,
        "answer_len": 24,
        "phrase_prompts": 32,
        "phrase_answer": 2,
        "samples": 20,
        "ks": [1, 5, 10],
        "temperature": 1.0,
        "bins": 15,
        "n_boot": 2000,
        "parity_tokens": 600,
        "mc_draws": 20000,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser()
    parser.epilog = (
        "evaluation.py computes on the CPU whatever --device says (the models are small; an "
        "unavailable device is still refused); results.json records cpu."
    )
    parser.add_argument(
        "--model",
        type=training.trained_model_dir,
        default=None,
        metavar="DIR",
        help="folder with training.py's model.pt (default: docs/figures/training if it has one,"
        " else a small model is trained here; --quick always trains one)",
    )
    return parse_flags(parser, argv)


def print_model(info: dict) -> None:
    c = info["config"]
    print(
        f"  {info['source']}\n  {c['n_layers']} layers, d_model {c['d_model']}, context "
        f"{c['max_seq_len']}, {info['parameters']:,} parameters"
    )


def print_references(ref: dict, p: dict) -> None:
    for name, r in ref.items():
        if not isinstance(r, dict) or "skipped" in r:
            print(f"  {name}: {r if not isinstance(r, dict) else r['skipped']}")
        elif name == "rouge_l":
            print(
                f"  ROUGE-L F vs rouge-score on {r['pairs']} pairs: max abs err "
                f"{r['max_abs_err']:.1e}"
            )
        elif name == "lm_eval":
            print(
                f"  loglikelihood vs lm-eval HFLM on {r['requests']} requests: max rel err "
                f"{r['max_rel_err']:.1e} (abs {r['max_abs_err']:.1e} nats: lm-eval sums in "
                f"float32), is_greedy agrees on {r['is_greedy_agree']} ({r['greedy_true']} "
                "of them greedy)"
            )
        else:
            ref_name = "transformers" if name == "perplexity" else "sacrebleu"
            print(
                f"  {name}: ours {r['ours']:.6f}, {ref_name} {r[ref_name]:.6f}, "
                f"abs err {r['abs_err']:.1e}"
            )
        if name == "perplexity" and isinstance(r, dict):
            print(
                f"  (the guide's loop as written, one token too few per overlapping window: "
                f"{r['guide_as_written']:.6f})"
            )
    print(
        f"  pass@k: closed form max abs err {p['closed_form_max_abs_err']:.1e}, Monte Carlo "
        f"({p['draws']} draws) within {p['monte_carlo_max_z']:.1f} s.e."
    )


def print_sweep(sweep: dict) -> None:
    for r in sweep["rows"]:
        print(
            f"  window {sweep['window']}, stride {r['stride']:>3}: {r['windows']:>4} windows, "
            f"{r['tokens']:,} tokens, perplexity {r['perplexity']:.3f} token-weighted vs "
            f"{r['window_averaged']:.3f} window-averaged"
        )


def print_card(card: dict, t: dict) -> None:
    print(
        f"  {t['eval_tokens']:,} held-out tokens (window {t['window']}, stride {t['stride']}), "
        f"{t['questions']} questions x {t['choices']} choices, {t['prompts']} prompts; "
        "[95% bootstrap intervals]"
    )
    print(
        f"  {'model':<29} {'perplexity':>19} {'bits/B':>6} {'acc %':>17} {'acc_norm %':>17} "
        f"{'BLEU':>16} {'ROUGE-L':>7} {'ECE':>5} {'pass@1':>6} {'pass@10':>7}"
    )
    for name, r in card.items():
        acc = [
            f"{100 * r[m]['mean']:4.1f} [{100 * r[m]['low']:4.1f},{100 * r[m]['high']:5.1f}]"
            for m in ("acc", "acc_norm")
        ]
        lo, hi = r["perplexity_interval"]
        print(
            f"  {CARD_LABELS[name]:<29} {r['perplexity']:>6.1f} [{lo:5.0f},{hi:5.0f}] "
            f"{r['bits_per_byte']:>6.3f} {acc[0]:>17} {acc[1]:>17} {r['bleu']:>5.2f} "
            f"[{r['bleu_interval'][0]:4.2f},{r['bleu_interval'][1]:4.2f}] {r['rouge_l']:>7.3f} "
            f"{r['ece']:>5.3f} {r['pass_at_1']:>6.3f} {r['pass_at_10']:>7.3f}"
        )


def print_comparisons(comparisons: dict) -> None:
    for d in comparisons.values():
        print(f"  {difference_phrase(d)} {'inside' if d['inside_noise'] else 'OUTSIDE'} the noise")


def evaluation_figures(results: dict) -> dict:
    sweep, card = results["stride_sweep"], results["report_card"]
    flat = {n: card[n]["loss"] for n in ("unigram", "bigram")}
    return {
        "perplexity_vs_stride": plot_perplexity_vs_stride(sweep, stride_title(sweep)),
        "loss_by_position": plot_loss_by_position(
            sweep["by_position"], flat, position_title(sweep["by_position"])
        ),
        "reliability": plot_reliability(
            {k: results["calibration"][k] for k in ("trained", "bigram")}
        ),
        "accuracy": plot_accuracy(
            card,
            results["tasks"]["choices"],
            accuracy_title(results["comparisons"], results["tasks"]["questions"]),
        ),
    }


def lm_eval_requests(tasks: dict, n_questions: int = 12) -> list[tuple[str, str]]:
    """The requests checked against lm-eval: every choice of the first questions (as this
    script scores them), and the boundary cases (trailing space, empty context, newline)."""
    out = [(q["context"], " " + c) for q in tasks["choice"][:n_questions] for c in q["choices"]]
    return out + [("The value is ", "returned"), ("", "Hello world"), ("x = 1\n", "y = 2")]


def build_card_tasks(data: dict, model: nn.Module, cfg: dict, seed: int) -> dict:
    """The evaluation inputs, fixed by the seed: held-out ids, questions, prompts, phrases."""
    ids = data["val"] if cfg["eval_tokens"] is None else data["val"][: cfg["eval_tokens"]]
    questions = build_choice_task(
        load_corpus()["heldout"], cfg["questions"], cfg["choices"], seed, cfg["choice_words"]
    )
    return {
        "ids": ids,
        "max_len": model.config.max_seq_len,
        "choice": questions,
        "generation": generation_prompts(
            data["val"], cfg["prompts"], cfg["prompt_len"], cfg["answer_len"], seed
        ),
        "phrases": phrase_task(
            data["train"], cfg["phrase_prompts"], cfg["prompt_len"], cfg["phrase_answer"], seed
        ),
    }


def compared_models(model: training.Llama, data: dict, seed: int, alpha_windows: int) -> dict:
    """The trained model, an untrained one of its shape, unigram and bigram counts (the
    bigram's alpha chosen by ``training.ngram_baselines`` on the first ``alpha_windows``
    validation windows: the held-out text, which favours the bigram)."""
    vocab, window = model.config.vocab_size, model.config.max_seq_len
    windows = training.val_windows(data["val"], window - 1, alpha_windows)
    alpha = training.ngram_baselines(data["train"], windows, vocab)["bigram_alpha"]
    return {
        "trained": model,
        "untrained": untrained_like(model, seed + 1),
        "unigram": NgramLM(data["train"], vocab, 1),
        "bigram": NgramLM(data["train"], vocab, 2, alpha),
    }


def card_results(evaluated: dict, tasks: dict, sizes: dict, seed: int) -> dict:
    """The report card, what it was measured on, and every model's reliability data."""
    return {
        "tasks": {
            "questions": len(tasks["choice"]),
            "choices": sizes["choices"],
            "eval_tokens": len(tasks["ids"]),
            "prompts": len(tasks["generation"][0]),
            "pass_at_k_passages": len(tasks["phrases"][0]),
            "pass_at_k_tokens": tasks["phrases"][1].shape[1],
            "pass_at_k_samples": sizes["samples"],
            "pass_at_k_temperature": sizes["temperature"],
            "window": sizes["window"],
            "stride": sizes["stride"],
        },
        "report_card": report_card(evaluated, sizes["n_boot"], seed),
        "calibration": {k: evaluated[k]["calibration"] for k in evaluated},
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if resolve_device(args.device).type != "cpu":
        print(f"--device {args.device}: evaluation.py computes on the CPU (small models)")
    device = torch.device("cpu")  # every pass here is a small CPU pass, whatever --device says
    torch.set_num_threads(1)
    cfg = SIZES["quick" if args.quick else "default"]
    results: dict = {"meta": run_meta(args, device)}
    n = 6
    print(f"[1/{n}] loading the model and building the tasks ...")
    model_dir = args.model or (None if args.quick else training.DEFAULT_MODEL_DIR)
    model, data, _, results["model"] = training.load_trained_model(
        model_dir, cfg["fallback"], args.seed
    )
    print_model(results["model"])
    tasks = build_card_tasks(data, model, cfg, args.seed)
    window = model.config.max_seq_len
    sizes = {**cfg, "window": window, "stride": min(cfg["stride"], window)}
    print(f"[2/{n}] scoring the held-out text at every stride ...")
    strides = [window // k for k in cfg["strides_per_window"]]
    results["stride_sweep"], swept = stride_sweep(model, tasks["ids"], window, strides)
    print_sweep(results["stride_sweep"])
    print(f"[3/{n}] evaluating trained, untrained, unigram and bigram models ...")
    models = compared_models(model, data, args.seed, cfg["fallback"]["val_windows"])
    reuse = {"trained": swept.get(sizes["stride"])}  # the sweep scored this stride already
    evaluated = {
        k: evaluate_card_model(m, data, tasks, sizes, args.seed, reuse.get(k))
        for k, m in models.items()
    }
    results.update(card_results(evaluated, tasks, sizes, args.seed))
    print_card(results["report_card"], results["tasks"])
    print(f"[4/{n}] comparing models with paired bootstraps ...")
    results["comparisons"] = compare_card_models(evaluated, cfg["n_boot"], args.seed)
    print_comparisons(results["comparisons"])
    print(f"[5/{n}] checking parity with transformers, sacrebleu, rouge-score, math.comb ...")
    ids, generated = tasks["ids"][: cfg["parity_tokens"]], evaluated["trained"]["generated"]
    results["references"] = check_references(
        model, data["tok"], ids, generated, lm_eval_requests(tasks), not args.quick
    )
    results["pass_at_k_check"] = check_pass_at_k(PASS_AT_K_CASES, cfg["mc_draws"], args.seed)
    print_references(results["references"], results["pass_at_k_check"])
    results["claims"] = evaluation_claims(results)
    results["phrases"] = reading_phrases(results)
    print_claims(results["claims"])
    print(f"[6/{n}] drawing figures ...")
    figures = evaluation_figures(results)
    save_outputs(args.out, figures, results, show=not args.no_show)
    return results


# =============================================================================
# 7. Plumbing (identical in every script)
# =============================================================================

BENCHMARK_THREADS = 1  # threads median_time_s times with, recorded in results.json


def median_time_s(fn, min_run_time: float = 0.2) -> float:
    """Median seconds per call of ``fn()`` by ``torch.utils.benchmark`` (warm-up, device sync).

    One thread: the small kernels timed here give steadier numbers on one core than when threads
    must synchronise, and the ratios, not the speed, are the point.
    """
    # Imported here (slow to import). It imports cpp_extension, which logs "No CUDA runtime is
    # found" on machines with a CUDA toolkit but no GPU: noise for these timings.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=BENCHMARK_THREADS)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| (broadcast), computed in float64; 0.0 when there is nothing to compare."""
    diff = a.double() - b.double()
    return diff.abs().max().item() if diff.numel() else 0.0


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit choice must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device ('cuda') is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device ('mps') is not available on this machine")
    return torch.device(name)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Where the numbers came from, saved next to them in results.json."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "benchmark_threads": BENCHMARK_THREADS,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def run_meta(args: argparse.Namespace, device: torch.device) -> dict:
    """The ``meta`` block of results.json: which script, which flags, which machine."""
    return {
        "script": Path(__file__).name,
        "quick": args.quick,
        "seed": args.seed,
        **machine_info(device),
    }


def positive_int(text: str) -> int:
    """argparse type for counts (``--steps``): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 2**63)")
    return value


def _device(text: str) -> str:
    if text not in ("auto", "cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda, mps")
    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def base_parser() -> argparse.ArgumentParser:
    """The flags every script shares; a script adds its own, then calls ``parse_flags``."""
    stem = Path(__file__).stem
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes, a fast check; writes to figures/{stem}/quick/ unless --out is given",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder for the PNG figures and results.json (default: figures/{stem}/)",
    )
    parser.add_argument("--no-show", action="store_true", help="do not open figure windows")
    parser.add_argument(
        "--device",
        type=_device,
        default="auto",
        metavar="{auto,cpu,cuda,mps}",
        help="auto, cpu, cuda or mps; auto picks cuda, then mps, then cpu (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=_seed, default=0, help="random seed, in [0, 2**63) (default: %(default)s)"
    )
    return parser


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, fill in ``--out``, and refuse an output folder that cannot be written (exit 2)."""
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("figures") / Path(__file__).stem / ("quick" if args.quick else "")
    existing = args.out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == args.out and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} exists and is not a directory")
    try:  # the one sure test of writability: make (and remove) a folder there
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError:
        parser.error(f"argument --out: cannot write in {existing}")
    return args


def interactive_backend() -> bool:
    """True when matplotlib can open windows (so ``plt.show()`` would not warn)."""
    from matplotlib.backends import BackendFilter, backend_registry

    interactive = backend_registry.list_builtin(BackendFilter.INTERACTIVE)
    return matplotlib.get_backend().lower() in [name.lower() for name in interactive]


def save_outputs(
    out: Path, figures: dict, results: dict, show: bool, files: dict | None = None
) -> None:
    """Write every figure as ``<name>.png``, any other ``files`` (name -> bytes) and
    ``results.json`` into ``out``, all or nothing.

    Everything is first written into a hidden folder inside ``out`` and then moved into place,
    results.json last: a run that fails leaves no half-written output, and a results.json that
    exists belongs to the files beside it. ``show`` opens the figures when a window can open.
    """
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=out))
    try:
        for name, fig in figures.items():
            fig.savefig(staging / f"{name}.png", dpi=120)
        for name, data in (files or {}).items():
            (staging / name).write_bytes(data)
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        names = [f"{name}.png" for name in figures] + list(files or {}) + ["results.json"]
        for file_name in names:
            os.replace(staging / file_name, out / file_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"saved {len(figures)} figures and results.json to {out}/")
    if show and interactive_backend():
        plt.show()
    plt.close("all")


if __name__ == "__main__":
    main()
