"""Tokenization: byte-level BPE trained from scratch on real text, identical to tiktoken.

The problem
-----------
A language model reads integers, not text. Characters are too many (Unicode has ~150,000) and
too short (a model would spend its context on single letters); whole words leave every new word
unknown. GPT-2 and many models since (GPT-3/4, Llama 3, Qwen, Mistral's Tekken) use byte-level
byte pair encoding (BPE): start from the 256 byte values, so every string encodes and nothing is
ever unknown, then learn merges of frequent neighbours until the vocabulary has the size you
want. Three things make BPE confusing in practice: training is slow when written the obvious way
(recount every pair after every merge), the tie-break between equally frequent pairs is
implicit in each trainer's code, not documented, so two trainers on the same text learn
different vocabularies, and the encoder does not replay the training merges: it merges the
pair whose *concatenated bytes* have the lowest rank.

The idea
--------
1. Pre-tokenize: a regular expression splits the text into chunks (words with their leading
   space, runs of digits, punctuation, whitespace). Merges never cross a chunk boundary, so no
   token glues "the" to the next word. GPT-2's pattern (r50k_base) and GPT-4's (cl100k_base:
   case-insensitive contractions, digits in groups of at most 3, newlines kept apart) are here.
2. Train on distinct chunks: the text's about 92,000 chunks are only about 6,300 different
   ones. Count each once, weighted by how often it occurs. After a merge, update only the counts
   of the chunks that held the merged pair (an index pair -> chunks says which), and keep the
   pairs in a heap ordered by (count, first occurrence), with lazy updates.
3. Encode like tiktoken: within each chunk, repeatedly merge the adjacent pair whose
   concatenation has the lowest rank, until no adjacent pair is a token. A per-chunk cache
   makes a word seen once free the next time.

The math
--------
A chunk c with frequency f_c is a list of token ids t_c,1 .. t_c,L. Training repeats::

    (1) count(a, b) = sum_c f_c * #{i : t_c,i = a, t_c,i+1 = b}     (overlaps count: "aaa" has 2)
    (2) (a, b) = argmax count, ties -> the pair that occurs first in the text
        new token = bytes(a) + bytes(b), rank = the vocabulary size so far;
        replace (a, b) by it in every chunk, left to right, never overlapping
    (3) first occurrence of (a, b) = (index of the first chunk holding it, byte offset there)

The tie-break in (2) is implicit in ``tiktoken._educational.bpe_train``, not a documented rule:
it fills a ``collections.Counter`` in text order and takes ``max``, which keeps the first of
equal maxima, so among equal counts the pair met first in the text wins. We reproduce that, and
our ranks are identical to bpe_train's (tested). Hugging Face ``tokenizers``' BpeTrainer breaks
ties by the smaller pair of its own token ids instead, so it learns mostly the same merges (the
share is in results.json) in another order, from the first tie the two rules break differently
(the script prints where and why).

Encoding chunk bytes x_1 .. x_n, as tiktoken does::

    (4) while some adjacent (p_i, p_i+1) has bytes(p_i) + bytes(p_i+1) in the ranks:
            merge the one with the lowest rank (the leftmost among equal ranks)

A chunk that is itself a token is that token (tiktoken's shortcut). Ranks are looked up by
bytes, so a token that two different pairs spell would be one token: if training met a second
pair spelling an existing token, the token would keep its first rank (bpe_train would move it to
a new rank, leaving its old rank empty, and give the next new token that same new rank). We have
never seen this happen (not on the corpus, nor in a random search of 100,000 small texts over
"abc"), so the guard in ``learn_merges`` is untested.

Where it is used
----------------
Byte-level BPE: GPT-2, GPT-3 and GPT-4 (tiktoken's r50k_base and cl100k_base), Llama 3
(tiktoken, 128K tokens), Qwen, and Mistral's Tekken (tiktoken-style). SentencePiece works on
characters instead: BPE with a byte fallback in Llama 1-2, Mistral 7B, Mixtral and Gemma, a
unigram model in T5. The default run writes ``figures/tokenization/tokenizer.tiktoken`` (4096
ranks, GPT-4's pattern, ``<|endoftext|>`` = 4096); ``training.py``, next in the learning path,
reads the committed copy, ``docs/figures/tokenization/tokenizer.tiktoken``, with
``BPETokenizer.load`` (``tiktoken.load.load_tiktoken_bpe`` reads it too).

Run it
------
    uv run python tokenization.py                  # default run: 170 s wall, 57 s CPU (*)
    uv run python tokenization.py --quick          # small sizes: 41 s wall (*)
    uv run python tokenization.py --text FILE      # train on your own text instead
    uv run python tokenization.py --vocab-size 8192 --out DIR --no-show

(*) Measured once on a shared 2-core CPU under a load average of about 9 (other jobs running).

The corpus is CPython's own help text (``pydoc_data.topics.topics``: every Python has it, no
download). Topics are joined in sorted key order; every 10th topic, starting with the first, is
held out for measuring compression and speed. With ``--text FILE``, every 10th paragraph
(blank-line separated) is held out, or the last tenth of a file with fewer than 10 paragraphs.
It prints each check and measurement, saves the figures, ``results.json`` and the trained
tokenizer under ``--out`` (default ``figures/tokenization/``).

References
----------
- Sennrich, Haddow and Birch, "Neural Machine Translation of Rare Words with Subword Units",
  2016, arXiv 1508.07909 (BPE for text); Gage, "A New Algorithm for Data Compression", 1994.
- Radford et al., "Language Models are Unsupervised Multitask Learners", 2019 (GPT-2: byte-level
  BPE, merges never across character categories).
- Reference code: openai/tiktoken ``tiktoken/_educational.py`` (``bpe_train``, ``bpe_encode``:
  ranks tested identical), ``src/lib.rs`` (``byte_pair_merge``: encode tested identical) and
  ``tiktoken_ext/openai_public.py`` (the patterns); karpathy/minbpe ``minbpe/regex.py``
  (``RegexTokenizer``); huggingface/tokenizers ``tokenizers/src/models/bpe/trainer.rs``
  (``BpeTrainer``; its ``Merge`` ordering is the other tie-break).

Contents
--------
2. Core: ``GPT2_PATTERN``, ``GPT4_PATTERN``, ``count_chunks`` (pre-tokenize and deduplicate),
   ``_merge_pair``, ``learn_merges`` (the incremental trainer), ``BPETokenizer`` (``train``,
   ``encode``, ``decode``, ``save``, ``load``), ``tiktoken_file_bytes``.
3. Baselines and apparatus: ``naive_train`` (recount everything), ``LINES_PATTERN`` (the trainer
   without a pattern), ``ADVERSARIAL`` strings, ``load_corpus`` and ``split_text``, ``prefix``
   (a smaller vocabulary), the bridges to tiktoken and HF ``tokenizers`` (``tiktoken_encoding``,
   ``hf_from_ranks``, ``hf_train``), ``naive_scan_tokens`` and ``estimate_naive_time`` (the
   naive trainer's time at a size too slow to run), ``time_call_s``.
4. Experiments: ``check_parity``, ``divergence_why``, ``explain_hf_divergence``,
   ``benchmark_training``,
   ``benchmark_encode``, ``boundary_tokens``, ``measure_compression``, the figure titles and
   ``tokenization_claims``.
5. Figures: ``plot_compression``, ``plot_sentence_splits``, ``plot_token_lengths``,
   ``plot_training_time``.
6. Main: ``parse_args``, the ``print_*`` helpers, ``main``.
7. Plumbing (identical in every script).

Read first: ``count_chunks``, then ``naive_train`` (the algorithm in twenty lines), then
``learn_merges`` (the same merges, incrementally) and ``BPETokenizer._encode_chunk`` (4).
"""

from __future__ import annotations

import argparse
import base64
import collections
import functools
import heapq
import json
import logging
import numbers
import os
import platform
import shutil
import statistics
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import regex
import torch

# =============================================================================
# 2. Core: pre-tokenization, the incremental trainer, the rank-based encoder
# =============================================================================

# tiktoken's split patterns (tiktoken_ext/openai_public.py): r50k_base (GPT-2, GPT-3) and
# cl100k_base (GPT-3.5, GPT-4). Possessive quantifiers (++, ?+) only make them faster.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"


def _check_sizes(**sizes: int) -> None:
    """Every size (a dimension, a count) must be an integer (not a bool) of at least 1."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} ({value!r}) must be an int")
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")


def _check_vocab_size(vocab_size: int) -> None:
    _check_sizes(vocab_size=vocab_size)
    if vocab_size < 256:
        raise ValueError(f"vocab_size ({vocab_size}) must be >= 256: one token per byte first")


def _check_str(name: str, value: str, nonempty: bool = False) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if nonempty and not value:
        raise ValueError(f"{name} is empty: it must hold at least one character")


def _compile_pattern(pattern: str) -> regex.Pattern:
    _check_str("pattern", pattern, nonempty=True)
    try:
        return regex.compile(pattern)
    except regex.error as err:
        raise ValueError(
            f"pattern ({pattern!r}) is not a valid regular expression: {err}"
        ) from None


def count_chunks(text: str, pattern: str) -> dict[bytes, int]:
    """Pre-tokenize: split ``text`` with ``pattern`` and count each distinct chunk (UTF-8 bytes).

    The dict keeps the order in which chunks first occur in the text: the tie-break needs it.
    """
    _check_str("text", text)
    counts: dict[bytes, int] = {}
    for piece in _compile_pattern(pattern).findall(text):
        key = piece.encode("utf-8")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _merge_pair(word: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replace each (a, b) in ``word`` by ``new_id``, left to right, never overlapping."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_merges(chunks: dict[bytes, int], vocab_size: int) -> tuple[list[bytes], list[tuple]]:
    """Byte-level BPE on deduplicated chunks with incremental pair counts (equations (1)-(3)).

    ``chunks`` maps each distinct chunk to its frequency, in first-occurrence order. Returns the
    vocabulary (token bytes, index = rank) and the merges ``(left id, right id, count)`` in order.
    Stops early, with a smaller vocabulary, when no adjacent pair is left to merge.
    """
    _check_vocab_size(vocab_size)
    if not isinstance(chunks, dict) or not all(
        isinstance(c, bytes) and isinstance(f, int) and f >= 1 for c, f in chunks.items()
    ):
        raise TypeError("chunks must be a dict of bytes -> count >= 1 (see count_chunks)")
    vocab = [bytes([i]) for i in range(256)]
    rank = {token: i for i, token in enumerate(vocab)}
    words = [list(chunk) for chunk in chunks]  # each chunk as a list of token ids
    freqs = list(chunks.values())
    counts: dict[tuple[int, int], int] = collections.defaultdict(int)  # (1) weighted pair counts
    where: dict[tuple[int, int], set[int]] = collections.defaultdict(set)  # pair -> chunk ids
    first: dict[tuple[int, int], tuple[int, int]] = {}
    for c, (word, f) in enumerate(zip(words, freqs, strict=True)):
        offset = 0
        for pair in pairwise(word):
            counts[pair] += f
            where[pair].add(c)
            first.setdefault(pair, (c, offset))  # (chunk id, byte offset): its first occurrence
            offset += 1

    def first_seen(pair: tuple[int, int]) -> tuple[int, int]:
        """(3) The pair's first occurrence now: the earliest chunk holding it, then the offset."""
        c = min(where[pair])
        offset = 0
        for x, y in pairwise(words[c]):
            if (x, y) == pair:
                return c, offset
            offset += len(vocab[x])
        raise AssertionError("unreachable: where[] lists a chunk without the pair")

    # A max-heap of (count, first occurrence) with lazy updates: counts only fall and first
    # occurrences only move later, except for pairs a merge creates, which get a fresh entry. So
    # every entry is at least as good as its pair's truth, and an entry that is still true when
    # it reaches the top is the best pair. A stale one is pushed back with its true values.
    heap = [(-n, first[pair], pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(vocab) < vocab_size and heap:
        neg_count, key, pair = heapq.heappop(heap)
        n = counts.get(pair, 0)
        if n == 0:
            continue
        if -neg_count != n:  # stale count
            heapq.heappush(heap, (-n, first_seen(pair), pair))
            continue
        if key != (true_key := first_seen(pair)):  # stale first occurrence
            heapq.heappush(heap, (-n, true_key, pair))
            continue
        a, b = pair  # (2) the most frequent pair, first seen first among equals
        token = vocab[a] + vocab[b]
        if token not in rank:  # two pairs can spell the same bytes: keep the first rank
            rank[token] = len(vocab)
            vocab.append(token)
        new_id = rank[token]
        merges.append((a, b, n))
        touched = set()
        for c in list(where[pair]):  # only the chunks that hold the pair
            old, f = words[c], freqs[c]
            new = words[c] = _merge_pair(old, a, b, new_id)
            old_pairs, new_pairs = list(pairwise(old)), list(pairwise(new))
            for p in old_pairs:
                counts[p] -= f
            for p in new_pairs:
                counts[p] += f
            for p in set(old_pairs) - set(new_pairs):
                where[p].discard(c)
            for p in set(new_pairs) - set(old_pairs):
                where[p].add(c)
            touched.update(p for p in new_pairs if new_id in p)
        for p in touched:  # the only pairs whose count can grow: fresh heap entries
            heapq.heappush(heap, (-counts[p], first_seen(p), p))
    return vocab, merges


class BPETokenizer:
    """A byte-level BPE tokenizer: split with a regex, then merge bytes by rank, as tiktoken.

    ``mergeable_ranks`` maps token bytes to ranks ``0 .. n-1`` and holds all 256 single bytes
    (default: only them); ``special_tokens`` maps names to ids after the ranks (default:
    ``<|endoftext|>`` = n). ``train`` learns the ranks; ``save``/``load`` use tiktoken's file.
    ``mergeable_ranks`` is read-only: the decoder and the chunk cache are built from it, so a
    change in place would leave them stale; build a new tokenizer instead.

    >>> tok = BPETokenizer.train("low lower lowest " * 20, vocab_size=260, pattern=GPT2_PATTERN)
    >>> [tok.decode([i]) for i in range(256, 260)]
    ['lo', 'low', ' low', ' lowe']
    >>> ids = tok.encode("lowest low<|endoftext|>", allowed_special="all")
    >>> ids, tok.decode(ids)
    ([257, 101, 115, 116, 258, 260], 'lowest low<|endoftext|>')
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int] | None = None,
        pattern: str = GPT4_PATTERN,
        special_tokens: dict[str, int] | None = None,
    ) -> None:
        if mergeable_ranks is None:
            mergeable_ranks = {bytes([i]): i for i in range(256)}
        if not isinstance(mergeable_ranks, dict):
            raise TypeError(f"mergeable_ranks must be a dict, got {type(mergeable_ranks).__name__}")
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)) or not all(
            isinstance(t, bytes) for t in mergeable_ranks
        ):
            raise ValueError("mergeable_ranks must map bytes to the ranks 0 .. n-1, each once")
        if any(bytes([i]) not in mergeable_ranks for i in range(256)):
            raise ValueError("mergeable_ranks must hold all 256 single bytes (byte-level BPE)")
        if special_tokens is None:
            special_tokens = {ENDOFTEXT: n}
        if (
            not isinstance(special_tokens, dict)
            or any(
                not isinstance(s, str)
                or not s
                or isinstance(i, bool)
                or not isinstance(i, int)
                or i < n
                for s, i in special_tokens.items()
            )
            or len(set(special_tokens.values())) != len(special_tokens)
        ):
            raise ValueError(f"special_tokens ({special_tokens!r}) must map names to ids >= {n}")
        self.pattern, self._regex = pattern, _compile_pattern(pattern)
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(special_tokens)
        self.merges: list[tuple[bytes, bytes, int]] | None = None  # set by train
        self._decoder = {i: t for t, i in self.mergeable_ranks.items()}
        self._decoder.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self._cache: dict[str, list[int]] = {}  # chunk -> ids: a word seen once is looked up

    @property
    def n_vocab(self) -> int:
        """Number of ids: the ranks and the special tokens."""
        return max(self._decoder) + 1

    @classmethod
    def train(cls, text: str, vocab_size: int, pattern: str = GPT4_PATTERN) -> BPETokenizer:
        """Learn ``vocab_size`` ranks (256 bytes + merges) from ``text``; same ranks as
        ``tiktoken._educational.bpe_train(text, vocab_size, pattern)`` (see the docstring)."""
        _check_str("text", text, nonempty=True)
        _check_vocab_size(vocab_size)
        vocab, merges = learn_merges(count_chunks(text, pattern), vocab_size)
        tok = cls({token: i for i, token in enumerate(vocab)}, pattern)
        tok.merges = [(vocab[a], vocab[b], n) for a, b, n in merges]
        return tok

    def _encode_chunk(self, piece: bytes) -> list[int]:
        """(4) Merge the adjacent pair whose concatenation has the lowest rank, until none has."""
        ranks = self.mergeable_ranks
        if piece in ranks:  # tiktoken's shortcut: a chunk that is a token is that token
            return [ranks[piece]]
        parts = [piece[i : i + 1] for i in range(len(piece))]
        none = len(ranks)  # "not a token": above every rank
        # pair_ranks[i] = rank of parts[i] + parts[i + 1]; a merge changes only its neighbours
        pair_ranks = [ranks.get(a + b, none) for a, b in pairwise(parts)]
        while pair_ranks and (best_rank := min(pair_ranks)) < none:
            i = pair_ranks.index(best_rank)  # the leftmost among equal ranks
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], none)
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], none)
        return [ranks[p] for p in parts]

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text``, special token names treated as plain text."""
        _check_str("text", text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (half of a UTF-16 pair, not encodable as
            # UTF-8) become U+FFFD, the replacement character, as in tiktoken
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids, cache = [], self._cache
        for piece in self._regex.findall(text):
            chunk_ids = cache.get(piece)
            if chunk_ids is None:
                chunk_ids = cache[piece] = self._encode_chunk(piece.encode("utf-8"))
            ids.extend(chunk_ids)
        return ids

    def encode(self, text: str, allowed_special: str | set = frozenset()) -> list[int]:
        """Ids of ``text``; special tokens named in ``allowed_special`` ("all" for every one)
        become their ids, any other special token in the text is an error (as in tiktoken)."""
        _check_str("text", text)
        if allowed_special == "all":
            allowed_special = set(self.special_tokens)
        if not isinstance(allowed_special, set | frozenset):
            raise TypeError(f"allowed_special ({allowed_special!r}) must be a set or 'all'")
        if unknown := set(allowed_special) - set(self.special_tokens):
            raise ValueError(f"allowed_special names unknown special tokens {sorted(unknown)}")
        for name in set(self.special_tokens) - set(allowed_special):
            if name in text:
                raise ValueError(
                    f"text contains the special token {name!r}, which is not in allowed_special;"
                    f" pass allowed_special={{{name!r}}} to encode it as a special token"
                )
        if not allowed_special:
            return self.encode_ordinary(text)
        names = sorted(allowed_special, key=len, reverse=True)
        ids = []
        for i, part in enumerate(regex.split(f"({'|'.join(map(regex.escape, names))})", text)):
            ids.extend([self.special_tokens[part]] if i % 2 else self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of ``ids``, joined (may end inside a UTF-8 character)."""
        if not isinstance(ids, list | tuple):
            raise TypeError(f"ids must be a list of ints, got {type(ids).__name__}")
        decoder = self._decoder
        is_id = lambda i: isinstance(i, numbers.Integral) and not isinstance(i, bool)  # noqa: E731
        for i in ids:
            if not is_id(i) or i not in decoder:
                raise ValueError(
                    f"ids holds {i!r}, not an id of this vocabulary (0 .. {self.n_vocab - 1})"
                )
        return b"".join(decoder[i] for i in ids)

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``; bytes that are not valid UTF-8 become U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike) -> None:
        """Write the ranks in tiktoken's format: base64(token) and rank, one line each. As in
        tiktoken, the pattern and the special tokens are not in the file: they are code."""
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path ({path!r}) must be a str or a path")
        Path(path).write_bytes(tiktoken_file_bytes(self.mergeable_ranks))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        pattern: str = GPT4_PATTERN,
        special_tokens: dict[str, int] | None = None,
    ) -> BPETokenizer:
        """Read a tiktoken ranks file (``save``'s, or tiktoken's own ``.tiktoken`` files).
        Empty lines are skipped, as ``tiktoken.load.load_tiktoken_bpe`` skips them."""
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path ({path!r}) must be a str or a path")
        ranks: dict[bytes, int] = {}
        for n, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
            if not line:  # as tiktoken: only empty lines (a line of spaces is an error)
                continue
            fields, where = (
                line.decode("utf-8", errors="replace").split(),
                f"path ({path}) line {n}",
            )
            if len(fields) != 2:
                raise ValueError(f"{where} has {len(fields)} fields, not 'base64-token rank'")
            token, rank = fields
            try:
                token_bytes = base64.b64decode(token, validate=True)
            except ValueError:
                raise ValueError(f"{where}: token {token[:40]!r} is not base64") from None
            if not rank.isdigit():
                raise ValueError(f"{where}: rank {rank[:40]!r} of token {token!r} is not an int")
            ranks[token_bytes] = int(rank)
        try:
            return cls(ranks, pattern, special_tokens)
        except ValueError as err:
            raise ValueError(f"path ({path}): {err}") from None


def tiktoken_file_bytes(mergeable_ranks: dict[bytes, int]) -> bytes:
    """tiktoken's ranks file: ``base64(token) rank`` per line, in rank order."""
    ordered = sorted(mergeable_ranks.items(), key=lambda item: item[1])
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ordered)


# =============================================================================
# 3. Baselines and apparatus: the naive trainer, the corpus, tiktoken and HF bridges
# =============================================================================

# The trainer "without a pattern": it splits only after each newline, so a merge may cross a
# word, space, digit or punctuation boundary (splitting nowhere would make training quadratic).
LINES_PATTERN = r"[^\n]*\n|[^\n]+"
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, "lines": LINES_PATTERN}
PATTERN_LABELS = {
    "gpt2": "GPT-2 pattern (r50k)",
    "gpt4": "GPT-4 pattern (cl100k)",
    "lines": "no pattern (lines only)",
}
HELDOUT_EVERY = 10  # every 10th topic (or paragraph), starting with the first, is held out

# Strings a tokenizer gets wrong first: emoji (with skin tone and flag sequences), CJK, combining
# marks, long whitespace runs, digit runs, lone surrogates (halves of a UTF-16 pair, which UTF-8
# cannot encode: replaced by U+FFFD, the replacement character), control bytes.
ADVERSARIAL = [
    "Hello 👋🏽 world 🇺🇸! 🧑‍💻",
    "日本語のテキストと中文字符，한국어",
    "e\u0301 n\u0303 a\u0308\u0304 Z\u0351\u036b\u0343a\u0360l\u0358g\u0350o",
    " " * 40 + "x\n\n\n\t\t  \r\n" + " " * 7,
    "3.14159265358979 1234567890 00000000000 ١٢٣ Ⅷ",
    "lone \ud800 surrogates \udfff here",
    "don't I'LL 'S we've THEY'RE",
    "tab\tnew\nline\r\nwin\r\n\r\n",
    "\x00\x01 control \x7f\x1b[0m",
    "x" * 300,
    "",
]
SENTENCE = "The naïve loop calls len(items) 10000 times; a for-loop doesn't."


def naive_train(text: str, vocab_size: int, pattern: str, dedup: bool = False) -> dict[bytes, int]:
    """The textbook trainer, the baseline: after every merge, recount every pair of every chunk.

    ``dedup=False`` walks every chunk of the text, as minbpe's ``RegexTokenizer`` and
    ``tiktoken._educational.bpe_train`` do; ``dedup=True`` walks each distinct chunk once,
    weighted by its count. Same tie-break as ``learn_merges`` (``max`` keeps the first pair it
    met, and the Counter meets pairs in text order), so the same ranks.
    """
    _check_str("text", text, nonempty=True)
    _check_vocab_size(vocab_size)
    if not isinstance(dedup, bool):
        raise TypeError(f"dedup ({dedup!r}) must be a bool")
    if dedup:  # pre-tokenize once, as the other branch does: the speed-up compares merging only
        chunks = count_chunks(text, pattern)
        words, weights = [list(c) for c in chunks], list(chunks.values())
    else:
        words, weights = [list(p.encode("utf-8")) for p in regex.findall(pattern, text)], None
    vocab = [bytes([i]) for i in range(256)]
    rank = {token: i for i, token in enumerate(vocab)}
    while len(vocab) < vocab_size:
        counts: collections.Counter = collections.Counter()
        if weights is None:
            for w in words:
                counts.update(pairwise(w))
        else:
            for w, f in zip(words, weights, strict=True):
                for pair in pairwise(w):
                    counts[pair] += f
        if not counts:
            break
        a, b = max(counts, key=counts.__getitem__)  # the first pair met among the most frequent
        token = vocab[a] + vocab[b]
        if token not in rank:
            rank[token] = len(vocab)
            vocab.append(token)
        words = [_merge_pair(w, a, b, rank[token]) if a in w else w for w in words]
    return rank


def split_text(parts: list[str]) -> tuple[str, str]:
    """(train, held-out): every ``HELDOUT_EVERY``-th part, starting with the first, held out."""
    train = [p for i, p in enumerate(parts) if i % HELDOUT_EVERY]
    heldout = [p for i, p in enumerate(parts) if not i % HELDOUT_EVERY]
    return "\n\n".join(train), "\n\n".join(heldout)


def load_corpus(text: str | None = None, name: str | None = None) -> dict:
    """CPython's help topics (or ``text``), split into train and held-out parts, with sizes."""
    if text is None:
        from pydoc_data.topics import topics  # CPython's help() text: in every installation

        parts, source = [topics[k] for k in sorted(topics)], "pydoc_data.topics.topics"
        rule = f"topics in sorted key order; every {HELDOUT_EVERY}th, from the first, held out"
    else:
        _check_str("text", text, nonempty=True)
        parts, source = [p for p in regex.split(r"\n\s*\n", text) if p.strip()], name or "text"
        rule = f"paragraphs; every {HELDOUT_EVERY}th, from the first, held out"
    if len(parts) >= HELDOUT_EVERY:
        train, heldout = split_text(parts)
    else:
        cut = len(text) * (HELDOUT_EVERY - 1) // HELDOUT_EVERY
        train, heldout = text[:cut], text[cut:]
        rule = f"fewer than {HELDOUT_EVERY} paragraphs: the last tenth of the text held out"
    if not train.strip():
        raise ValueError(f"text ({source}) leaves no training text after holding out a tenth")
    return {
        "source": source,
        "python": platform.python_version(),
        "rule": rule,
        "n_parts": len(parts),
        "train": train,
        "heldout": heldout,
        "train_bytes": len(train.encode("utf-8")),
        "heldout_bytes": len(heldout.encode("utf-8")),
    }


def prefix(tok: BPETokenizer, vocab_size: int) -> BPETokenizer:
    """The tokenizer a shorter training would have learned: BPE ranks grow one merge at a time,
    so the first ``vocab_size`` ranks are exactly those of training to ``vocab_size``."""
    _check_vocab_size(vocab_size)
    ranks = {t: r for t, r in tok.mergeable_ranks.items() if r < vocab_size}
    return BPETokenizer(ranks, tok.pattern)


def tiktoken_encoding(tok: BPETokenizer):
    """tiktoken's Rust encoder built from our ranks and pattern (no download); None without it."""
    try:
        import tiktoken
    except ImportError:
        return None
    return tiktoken.Encoding(
        name=f"ours_{len(tok.mergeable_ranks)}",
        pat_str=tok.pattern,
        mergeable_ranks=tok.mergeable_ranks,
        special_tokens=tok.special_tokens,
    )


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (HF's ByteLevel alphabet): printable
    Latin-1 bytes map to themselves, the others to U+0100 onwards (a space becomes 'Ġ')."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _hf_pre_tokenizer(pattern: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def hf_from_ranks(tok: BPETokenizer):
    """HF ``tokenizers`` BPE built from our merges (GPT-2's byte-to-unicode strings); None
    without the package or without merges (a tokenizer loaded from a file)."""
    try:
        from tokenizers import Tokenizer, decoders, models
    except ImportError:
        return None
    if tok.merges is None:
        return None
    b2u = gpt2_byte_to_unicode()
    text = lambda token: "".join(b2u[b] for b in token)  # noqa: E731
    vocab = {text(t): r for t, r in tok.mergeable_ranks.items()}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[(text(a), text(b)) for a, b, _ in tok.merges]))
    hf.pre_tokenizer, hf.decoder = _hf_pre_tokenizer(tok.pattern), decoders.ByteLevel()
    return hf


def hf_train(text: str, vocab_size: int, pattern: str) -> dict | None:
    """HF's BpeTrainer on the same text and pattern: its merges (as bytes) and token ids."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        return None
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = _hf_pre_tokenizer(pattern)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False, min_frequency=0
    )
    hf.train_from_iterator([text], trainer)
    model = json.loads(hf.to_str())["model"]
    u2b = {u: b for b, u in gpt2_byte_to_unicode().items()}
    to_bytes = lambda s: bytes(u2b[ch] for ch in s)  # noqa: E731
    pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    return {
        "merges": [(to_bytes(a), to_bytes(b)) for a, b in pairs],
        "ids": {to_bytes(s): i for s, i in model["vocab"].items()},
    }


def naive_scan_tokens(text: str, tok: BPETokenizer, vocab_sizes: list[int]) -> list[int]:
    """Tokens the naive trainer rescans when its vocabulary has v entries, for each v: every
    chunk of ``text`` (with repeats) as the first v ranks encode it (a prefix tokenizer)."""
    chunks = count_chunks(text, tok.pattern)
    out = []
    for v in vocab_sizes:
        small = prefix(tok, v)
        out.append(sum(f * len(small._encode_chunk(c)) for c, f in chunks.items()))
    return out


def estimate_naive_time(
    text: str, tok: BPETokenizer, vocab_size: int, sizes: list[int], seconds: list[list[float]]
) -> dict:
    """Estimate (not a measurement) of the naive trainer's seconds to ``vocab_size``: its cost
    per merge is one rescan of every token, and tokens get fewer as they merge. Per round, the
    slope between the naive times measured at the smallest and largest of ``sizes`` gives the
    seconds per rescanned token; times the tokens rescanned from there to ``vocab_size``
    (``naive_scan_tokens`` on a grid of sizes, summed over merges by the trapezoid rule).
    Checked once on 80,000 characters: 32 s estimated from 264 and 280 tokens, 28 s measured
    at 768 (time per merge x merges, the rule this replaces, gave 47 s)."""
    lo, hi = min(sizes), max(sizes)
    step = max((vocab_size - 256) // 32, 1)
    grid = sorted({*range(256, vocab_size, step), vocab_size, *sizes})
    tokens = naive_scan_tokens(text, tok, grid)
    scanned = [0.0]  # scanned[i]: tokens rescanned by the merges from 256 to grid[i]
    for (u, n), (w, m) in pairwise(zip(grid, tokens, strict=True)):
        scanned.append(scanned[-1] + (w - u) * (n + m) / 2)
    at = dict(zip(grid, scanned, strict=True))
    t_lo, t_hi = seconds[sizes.index(lo)], seconds[sizes.index(hi)]
    per_token = [(b - a) / (at[hi] - at[lo]) for a, b in zip(t_lo, t_hi, strict=True)]
    estimates = [b + c * (at[vocab_size] - at[hi]) for b, c in zip(t_hi, per_token, strict=True)]
    return {
        "vocab_size": vocab_size,
        "estimated": True,
        "method": (
            f"estimate, not measured: seconds per rescanned token from the slope of the measured "
            f"naive times between {lo} and {hi} tokens (per round), times the tokens rescanned "
            f"from {hi} to {vocab_size} (counted with prefix tokenizers at {len(grid)} sizes)"
        ),
        "valid": statistics.median(per_token) > 0,
        "seconds_per_token": _median_spread(per_token),
        "tokens_rescanned": at[vocab_size],
        "tokens_per_scan": {"vocab_sizes": grid, "tokens": tokens},
        **_median_spread(estimates),
    }


def time_call_s(fn) -> tuple[float, object]:
    """Seconds for one call of ``fn``, and what it returned. For the trainers (0.1 s to many s
    of pure Python, no device) one call is a measurement: torch's Timer, which repeats and warms
    up, would only multiply the run time. Callers interleave rounds and report the spread."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


# =============================================================================
# 4. Experiments: parity, training and encode speed, compression
# =============================================================================


def claim(statement: str, held: bool, **numbers) -> dict:
    """One printed claim: a sentence computed from the measured ``numbers`` it rests on, and
    whether they bear out the usual story (``held``). Goes into results.json under ``claims``."""
    return {"statement": statement, "held": bool(held), **numbers}


def print_claims(claims: dict) -> None:
    """Each claim on one line, marked by whether this run's numbers bore it out."""
    for c in claims.values():
        print(f"  [{'held' if c['held'] else 'not shown by this run'}] {c['statement']}")


def show(token: bytes) -> str:
    """A token as readable text (bytes that are not UTF-8 as U+FFFD)."""
    return token.decode("utf-8", errors="replace")


def _first_difference(ours: dict[bytes, int], ref: dict[bytes, int]) -> dict | None:
    """The lowest rank at which two rank tables hold different tokens, or None."""
    by_rank = lambda ranks: {r: t for t, r in ranks.items()}  # noqa: E731
    mine, theirs = by_rank(ours), by_rank(ref)
    for r in range(max(len(mine), len(theirs))):
        if mine.get(r) != theirs.get(r):
            return {
                "rank": r,
                "ours": show(mine.get(r, b"")),
                "reference": show(theirs.get(r, b"")),
            }
    return None


def check_parity(corpus: dict, tok: BPETokenizer, parity_chars: int, parity_vocab: int) -> dict:
    """Ranks vs tiktoken's bpe_train; encode vs tiktoken's and HF's encoders built from our
    ranks; round trips; the saved file through tiktoken's loader. Skipped parts say why."""
    out: dict = {"bpe_train": {}, "tiktoken": None, "hf_tokenizers": None}
    text = corpus["train"][:parity_chars]
    try:
        from tiktoken._educational import bpe_train
    except ImportError as err:
        out["skipped"] = f"tiktoken is not installed ({err}); uv sync installs the dev group"
        bpe_train = None
    for name in ("gpt2", "gpt4"):
        ours = BPETokenizer.train(text, parity_vocab, PATTERNS[name]).mergeable_ranks
        row = {"text_chars": len(text), "vocab_size": parity_vocab}
        if bpe_train is not None:
            ref = bpe_train(text, parity_vocab, PATTERNS[name], visualise=None)
            row.update(identical=ours == ref, first_difference=_first_difference(ours, ref))
        out["bpe_train"][name] = row
    heldout, special = corpus["heldout"], f"before{ENDOFTEXT}after"
    # lone surrogates cannot be UTF-8: both encoders replace each one by U+FFFD
    replaced = [
        s.encode("utf-16", "surrogatepass").decode("utf-16", "replace") for s in ADVERSARIAL
    ]
    out["round_trip"] = {
        "heldout": tok.decode(tok.encode(heldout)) == heldout,
        "adversarial": sum(
            tok.decode(tok.encode(s)) == r for s, r in zip(ADVERSARIAL, replaced, strict=True)
        ),
        "n_adversarial": len(ADVERSARIAL),
        "special": tok.decode(tok.encode(special, allowed_special="all")) == special,
    }
    enc = tiktoken_encoding(tok)
    if enc is not None:
        import tiktoken.load

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tokenizer.tiktoken"
            tok.save(path)
            loaded_by_tiktoken = tiktoken.load.load_tiktoken_bpe(str(path))
            reloaded = BPETokenizer.load(path, tok.pattern)
        same = [tok.encode(s) == enc.encode(s) for s in ADVERSARIAL]
        out["tiktoken"] = {
            "heldout_identical": tok.encode(heldout) == enc.encode(heldout),
            "adversarial_identical": sum(same),
            "n_adversarial": len(ADVERSARIAL),
            "adversarial_different": [s for s, ok in zip(ADVERSARIAL, same, strict=True) if not ok],
            "special_identical": tok.encode(special, allowed_special="all")
            == enc.encode(special, allowed_special="all"),
            "saved_file_loads_identical": loaded_by_tiktoken == tok.mergeable_ranks
            and reloaded.mergeable_ranks == tok.mergeable_ranks,
        }
    hf = hf_from_ranks(tok)
    if hf is not None:
        out["hf_tokenizers"] = {"heldout_identical": hf.encode(heldout).ids == tok.encode(heldout)}
    return out


def pair_stats_after(text: str, pattern: str, merges: list[tuple]) -> tuple[dict, dict, list]:
    """Replay ``merges`` on the distinct chunks: each pair's weighted count and the index of
    the first chunk that holds it (the training state after those merges)."""
    chunks = count_chunks(text, pattern)
    rank = {bytes([i]): i for i in range(256)}
    words = [list(c) for c in chunks]
    for a, b, _ in merges:
        rank.setdefault(a + b, len(rank))
        words = [
            _merge_pair(w, rank[a], rank[b], rank[a + b]) if rank[a] in w else w for w in words
        ]
    token = {i: t for t, i in rank.items()}
    counts: dict = collections.Counter()
    first: dict = {}
    for c, (w, f) in enumerate(zip(words, chunks.values(), strict=True)):
        for x, y in pairwise(w):
            counts[token[x], token[y]] += f
            first.setdefault((token[x], token[y]), c)
    return counts, first, list(chunks)


def divergence_why(a: dict, b: dict) -> str:
    """Why ours took pair ``a`` and HF pair ``b`` at the first merge where they differ, worded
    from the numbers: the counts, the first chunks, and the comparison of HF's token ids."""
    label = lambda d: "+".join(repr(p) for p in d["pair"])  # noqa: E731
    if a["count"] == b["count"]:
        ids_a, ids_b = tuple(a["hf_ids"]), tuple(b["hf_ids"])
        if None in ids_a + ids_b:
            hf_rule = f"HF's token ids {ids_b} and {ids_a} are not all known"
        elif ids_b < ids_a:
            hf_rule = f"HF takes the smaller pair of its token ids ({ids_b} < {ids_a})"
        else:
            hf_rule = (
                f"HF's pair does not have the smaller token ids ({ids_b} vs {ids_a}), so that "
                f"rule does not explain its choice"
            )
        why = (
            f"a tie: {label(a)} and {label(b)} both occur {a['count']} times. Ours (like "
            f"bpe_train) takes the pair met first in the text ({label(a)} in chunk "
            f"#{a['first_chunk_index']} {a['first_chunk']!r}, the other in chunk "
            f"#{b['first_chunk_index']}); {hf_rule}"
        )
    else:
        why = f"the counts differ ({a['count']} vs {b['count']}): the trainers count differently"
    return why


def explain_hf_divergence(text: str, vocab_size: int, pattern: str) -> dict | None:
    """Train ours and HF's BpeTrainer on the same text; find the first merge where their orders
    differ and say why from the counts and each trainer's tie-break. None without HF."""
    hf = hf_train(text, vocab_size, pattern)
    if hf is None:
        return None
    ours = BPETokenizer.train(text, vocab_size, pattern).merges
    mine = [(a, b) for a, b, _ in ours]
    theirs = hf["merges"]
    out = {
        "vocab_size": vocab_size,
        "n_merges": len(mine),
        "same_merge_set_fraction": len(set(mine) & set(theirs)) / max(len(mine), 1),
    }
    k = next((i for i, (x, y) in enumerate(zip(mine, theirs, strict=False)) if x != y), None)
    if k is None:
        return {**out, "diverges": False, "why": "HF learned the same merges in the same order"}
    counts, first, chunks = pair_stats_after(text, pattern, ours[:k])

    def describe(pair):
        c = first.get(pair)
        return {
            "pair": [show(pair[0]), show(pair[1])],
            "count": counts.get(pair, 0),
            "first_chunk_index": c,
            "first_chunk": None if c is None else show(chunks[c]),
            "hf_ids": [hf["ids"].get(pair[0]), hf["ids"].get(pair[1])],
        }

    a, b = describe(mine[k]), describe(theirs[k])
    why = divergence_why(a, b)
    return {
        **out,
        "diverges": True,
        "merge_index": k,
        "rank": 256 + k,
        "ours": a,
        "hf": b,
        "tie": a["count"] == b["count"],
        "why": why,
    }


def _median_spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def benchmark_training(
    text: str, vocab_sizes: list[int], naive_vocab_sizes: list[int], rounds: int
) -> dict:
    """Seconds to train (GPT-4 pattern) with the incremental trainer at every size and with the
    two naive ones at the small sizes, rounds interleaved; ranks compared once."""
    pattern = GPT4_PATTERN
    trainers = {
        "incremental": lambda v: BPETokenizer.train(text, v, pattern).mergeable_ranks,
        "naive_dedup": lambda v: naive_train(text, v, pattern, dedup=True),
        "naive": lambda v: naive_train(text, v, pattern),
    }
    vocab_sizes = sorted({*vocab_sizes, *naive_vocab_sizes})
    sizes = {
        "incremental": vocab_sizes,
        "naive_dedup": naive_vocab_sizes,
        "naive": naive_vocab_sizes,
    }
    times = {name: {v: [] for v in sizes[name]} for name in trainers}
    identical = {v: True for v in naive_vocab_sizes}
    split_s = []  # the regex split alone: the floor under the incremental trainer's times
    for r in range(rounds):
        start = time.perf_counter()
        split_s.append(time_call_s(functools.partial(count_chunks, text, pattern))[0])
        ranks: dict[int, list] = collections.defaultdict(list)
        for name, train in trainers.items():
            for v in sizes[name]:
                seconds, result = time_call_s(functools.partial(train, v))
                times[name][v].append(seconds)
                ranks[v].append(result)
        for v in naive_vocab_sizes:  # the three trainers learned the same ranks, every round
            identical[v] = identical[v] and all(x == ranks[v][0] for x in ranks[v])
        print(f"  round {r + 1}/{rounds}: {time.perf_counter() - start:.1f} s")
    out = {"pattern": "gpt4", "text_bytes": len(text.encode("utf-8")), "rounds": rounds}
    for name in trainers:
        stats = [_median_spread(times[name][v]) for v in sizes[name]]
        out[name] = {
            "vocab_sizes": sizes[name],
            **{f"{k}_s": [s[k] for s in stats] for k in ("median", "min", "max")},
        }
    v = max(naive_vocab_sizes)
    for name in ("naive", "naive_dedup"):
        ratios = [n / i for n, i in zip(times[name][v], times["incremental"][v], strict=True)]
        out[f"speedup_vs_{name}"] = {"vocab_size": v, **_median_spread(ratios)}
        s = out[f"speedup_vs_{name}"]
        s["phrase"] = (
            f"{s['median']:.1f}x faster" if s["median"] >= 1 else (f"{1 / s['median']:.1f}x slower")
        )
    big = max(vocab_sizes)
    est = estimate_naive_time(
        text,
        BPETokenizer.train(text, big, pattern),
        big,
        naive_vocab_sizes,
        [times["naive"][u] for u in naive_vocab_sizes],
    )
    est["minutes"] = est["median"] / 60
    est["speedup"] = est["median"] / statistics.median(times["incremental"][big])
    out["naive_estimate"] = est
    out["split"] = _median_spread(split_s)
    out["ranks_identical"] = {
        "vocab_sizes": naive_vocab_sizes,
        "identical": [identical[v] for v in naive_vocab_sizes],
    }
    return out


def benchmark_encode(tok: BPETokenizer, text: str, min_run_time: float, rounds: int) -> dict:
    """Encode throughput (MB/s of UTF-8) on ``text``: ours with a cold and a warm chunk cache,
    tiktoken's and HF's encoders built from the same ranks; rounds interleaved, one thread."""

    def cold():
        tok._cache.clear()
        return tok.encode(text)

    fns = {"ours_cold_cache": cold, "ours_warm_cache": lambda: tok.encode(text)}
    enc, hf = tiktoken_encoding(tok), hf_from_ranks(tok)
    if enc is not None:
        fns["tiktoken"] = lambda: enc.encode(text)
    if hf is not None:
        fns["hf_tokenizers"] = lambda: hf.encode(text).ids
    n_bytes = len(text.encode("utf-8"))
    mbps: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            mbps[name].append(n_bytes / median_time_s(fn, min_run_time) / 1e6)
    out = {
        "text_bytes": n_bytes,
        "rounds": rounds,
        "min_run_time_s": min_run_time,
        "mb_per_s": {name: _median_spread(v) for name, v in mbps.items()},
    }
    if enc is not None:
        ratios = [t / o for t, o in zip(mbps["tiktoken"], mbps["ours_cold_cache"], strict=True)]
        out["tiktoken_vs_ours_cold"] = _median_spread(ratios)
    return out


BOUNDARY_KINDS = {  # first match wins
    "two words": r"\p{L}\s+\p{L}",
    "word + following space": r"\p{L}\s",
    "letters + digits": r"\p{L}\p{N}|\p{N}\p{L}",
}


def boundary_tokens(mergeable_ranks: dict[bytes, int]) -> dict:
    """Tokens that cross a word, space or digit boundary (what GPT-2's and GPT-4's patterns
    forbid), counted by kind, with the first few examples by rank."""
    kinds: collections.Counter = collections.Counter()
    examples: dict[str, list[str]] = {}
    for token, _ in sorted(mergeable_ranks.items(), key=lambda item: item[1]):
        text = show(token)
        kind = next((k for k, p in BOUNDARY_KINDS.items() if regex.search(p, text)), None)
        if kind is not None:
            kinds[kind] += 1
            examples.setdefault(kind, [])
            if len(examples[kind]) < 5:
                examples[kind].append(text)
    sample = [t for kind in BOUNDARY_KINDS for t in examples.get(kind, [])][:3]
    return {
        "count": sum(kinds.values()),
        "by_kind": dict(kinds),
        "examples": examples,
        "sample": ", ".join(repr(t) for t in sample),
    }


def measure_compression(
    train: str, heldout: str, vocab_sizes: list[int], boundary_vocab: int
) -> tuple[dict, BPETokenizer]:
    """Held-out bytes per token at each vocabulary size for each pattern (one training to the
    largest size per pattern: smaller vocabularies are its prefixes), and the tokens that cross
    word/space/digit boundaries. Also returns the GPT-4-pattern tokenizer."""
    out = {
        "vocab_sizes": vocab_sizes,
        "train_bytes": len(train.encode("utf-8")),
        "heldout_bytes": len(heldout.encode("utf-8")),
        "boundary_vocab_size": boundary_vocab,
        "bytes_per_token": {},
        "vocab_reached": {},
        "boundary_tokens": {},
    }
    for name, pattern in PATTERNS.items():
        tok = BPETokenizer.train(train, max(vocab_sizes), pattern)
        if name == "gpt4":
            gpt4 = tok
        n = len(tok.mergeable_ranks)
        out["vocab_reached"][name] = n
        out["bytes_per_token"][name] = [
            out["heldout_bytes"] / max(len(prefix(tok, v).encode(heldout)), 1)
            for v in vocab_sizes
            if v <= n
        ]
        out["boundary_tokens"][name] = boundary_tokens(prefix(tok, boundary_vocab).mergeable_ranks)
    return out, gpt4


def compression_title(compression: dict) -> str:
    """The compression figure's message (two lines), from the numbers."""
    bpt = compression["bytes_per_token"]
    g4, lines = bpt["gpt4"], bpt["lines"]
    v = compression["vocab_sizes"][len(g4) - 1]
    if all(b > a for a, b in pairwise(g4)):
        first = f"Held-out bytes per token rise from {g4[0]:.2f} to {g4[-1]:.2f} at {v} tokens"
    else:
        first = (
            f"Held-out bytes per token do not rise steadily with vocabulary ({g4[-1]:.2f} at {v})"
        )
    n = min(len(g4), len(lines))
    more = "more" if lines[n - 1] > g4[n - 1] else "less"
    b = compression["boundary_tokens"]
    crossing, patterned = b["lines"]["count"], b["gpt2"]["count"] + b["gpt4"]["count"]
    second = (
        f"no pattern compresses {more} ({lines[n - 1]:.2f} vs {g4[n - 1]:.2f}), with {crossing} "
        f"tokens across word/space/digit boundaries (patterns: {patterned})"
    )
    return f"{first} (GPT-4 pattern);\n{second}"


def training_title(training: dict) -> str:
    """The training-time figure's message, from the numbers."""
    s = training["speedup_vs_naive"]
    faster = "faster" if s["median"] > 1 else "slower"
    ratio = s["median"] if s["median"] > 1 else 1 / s["median"]
    return (
        f"Incremental counts on distinct chunks: {ratio:.0f}x {faster} than recounting every "
        f"pair at {s['vocab_size']} tokens"
    )


def tokenization_claims(
    parity: dict, training: dict, encode: dict, compression: dict, vocab_size: int
) -> dict:
    """Each claim a sentence computed from the numbers, saying what was measured."""
    claims = {}
    rows = parity["bpe_train"]
    if all("identical" in r for r in rows.values()):
        same = all(r["identical"] for r in rows.values())
        r = rows["gpt4"]
        claims["ranks_equal_bpe_train"] = claim(
            f"trained ranks {'are identical' if same else 'differ from'} "
            f"{'to ' if same else ''}tiktoken's bpe_train on {r['text_chars']:,} characters at "
            f"vocab {r['vocab_size']} (GPT-2 and GPT-4 patterns)",
            same,
        )
    if parity["tiktoken"] is not None:
        t = parity["tiktoken"]
        ok = t["heldout_identical"] and t["adversarial_identical"] == t["n_adversarial"]
        claims["encode_equals_tiktoken"] = claim(
            f"encode gives {'the same ids as' if ok else 'different ids from'} tiktoken's Rust "
            f"encoder built from our ranks on the held-out text "
            f"({'same' if t['heldout_identical'] else 'different'}) and on "
            f"{t['adversarial_identical']} of {t['n_adversarial']} adversarial strings",
            ok,
        )
    rt = parity["round_trip"]
    ok = rt["heldout"] and rt["adversarial"] == rt["n_adversarial"] and rt["special"]
    claims["round_trip"] = claim(
        f"decode(encode(s)) == s {'held' if ok else 'did not hold everywhere'}: held-out text "
        f"{'yes' if rt['heldout'] else 'no'}, {rt['adversarial']} of {rt['n_adversarial']} "
        f"adversarial strings (lone surrogates as U+FFFD), with {ENDOFTEXT} "
        f"{'yes' if rt['special'] else 'no'}",
        ok,
    )
    i = training["incremental"]["vocab_sizes"].index(vocab_size)
    t_med = training["incremental"]["median_s"][i]
    t_lo, t_hi = training["incremental"]["min_s"][i], training["incremental"]["max_s"][i]
    claims["train_time"] = claim(
        f"training a {vocab_size}-token vocabulary on {training['text_bytes'] / 1e3:.0f} KB took "
        f"{t_med:.2f} s (median of {training['rounds']}, {t_lo:.2f}-{t_hi:.2f} s): "
        f"{'within' if t_med <= 10 else 'over'} 10 s",
        t_med <= 10,
        seconds=t_med,
    )
    s = training["speedup_vs_naive"]
    claims["speedup_vs_naive"] = claim(
        f"incremental training was {s['median']:.1f}x as fast as recounting every pair at vocab "
        f"{s['vocab_size']} (per-round ratios {s['min']:.1f}-{s['max']:.1f}x): "
        + ("at least 10x" if s["min"] >= 10 else "this run did not show 10x"),
        s["min"] >= 10,
        speedup=s["median"],
    )
    if "tiktoken_vs_ours_cold" in encode:
        r = encode["tiktoken_vs_ours_cold"]
        ours = encode["mb_per_s"]["ours_cold_cache"]["median"]
        claims["encode_speed"] = claim(
            f"tiktoken encoded {r['median']:.1f}x faster than our pure-Python encoder with a cold "
            f"cache ({ours:.2f} MB/s; per-round ratios {r['min']:.1f}-{r['max']:.1f}x): "
            + ("within 10x" if r["max"] <= 10 else "not within 10x in this run"),
            r["max"] <= 10,
            tiktoken_vs_ours=r["median"],
        )
    b = compression["boundary_tokens"]
    crossing = b["lines"]["count"]
    patterned = b["gpt2"]["count"] + b["gpt4"]["count"]
    claims["pattern_prevents_boundary_merges"] = claim(
        f"without a pattern, {crossing} of {compression['boundary_vocab_size']} tokens "
        f"cross a word, space or digit boundary; with GPT-2's or GPT-4's pattern, {patterned}",
        crossing > 0 and patterned == 0,
        without_pattern=crossing,
        with_patterns=patterned,
    )
    g4 = compression["bytes_per_token"]["gpt4"]
    rises = all(y > x for x, y in pairwise(g4))
    claims["compression_rises_with_vocab"] = claim(
        f"held-out bytes per token {'rise' if rises else 'do not rise steadily'} with the "
        f"vocabulary: {g4[0]:.2f} at {compression['vocab_sizes'][0]} to {g4[-1]:.2f} at "
        f"{compression['vocab_sizes'][len(g4) - 1]} (GPT-4 pattern)",
        rises,
    )
    return claims


# =============================================================================
# 5. Figures (one function per figure, each returns the Figure)
# =============================================================================

TOKEN_COLOURS = ["#fbb4ae", "#b3cde3", "#ccebc5", "#decbe4", "#fed9a6", "#e5d8bd"]


def plot_compression(compression: dict) -> plt.Figure:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5), width_ratios=[3, 2])
    sizes = compression["vocab_sizes"]
    for name, values in compression["bytes_per_token"].items():
        ax.plot(sizes[: len(values)], values, "o-", label=PATTERN_LABELS[name])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(v) for v in sizes])
    ax.set_xlabel("vocabulary size (tokens)")
    ax.set_ylabel("held-out bytes per token (higher = shorter sequences)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    names = list(compression["boundary_tokens"])
    bottom = [0] * len(names)
    for kind in BOUNDARY_KINDS:
        counts = [compression["boundary_tokens"][n]["by_kind"].get(kind, 0) for n in names]
        bx.bar([PATTERN_LABELS[n].split(" (")[0] for n in names], counts, bottom=bottom, label=kind)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    bx.set_ylabel(f"tokens (of {compression['boundary_vocab_size']}) across a boundary")
    bx.set_title("what the pattern prevents", fontsize=10)
    bx.legend(loc="upper left", fontsize=9)
    bx.grid(axis="y", alpha=0.3)
    fig.suptitle(compression_title(compression), fontsize=10)
    fig.tight_layout()
    return fig


def _visible(text: str) -> str:
    return text.replace(" ", "·").replace("\n", "↵").replace("\t", "→")


def plot_sentence_splits(tok: BPETokenizer, vocab_sizes: list[int], sentence: str) -> plt.Figure:
    rows = [v for v in vocab_sizes if v <= len(tok.mergeable_ranks)]
    fig, ax = plt.subplots(figsize=(12, 0.9 * len(rows) + 1.2))
    width = 0
    for row, v in enumerate(rows):
        small = prefix(tok, v)
        pieces = [_visible(small.decode([i])) for i in small.encode(sentence)]
        x, y = 0.0, len(rows) - 1 - row
        for k, piece in enumerate(pieces):
            ax.add_patch(
                plt.Rectangle(
                    (x, y - 0.35),
                    len(piece),
                    0.7,
                    linewidth=0.6,
                    edgecolor="0.3",
                    facecolor=TOKEN_COLOURS[k % 6],
                )
            )
            ax.text(
                x + len(piece) / 2,
                y,
                piece,
                ha="center",
                va="center",
                family="monospace",
                fontsize=10,
            )
            x += len(piece)
        width = max(width, x)
        ax.text(-1, y, f"vocab {v}: {len(pieces)} tokens", ha="right", va="center", fontsize=10)
    ax.set_xlim(-17, width + 1)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.axis("off")
    n_bytes = len(sentence.encode("utf-8"))
    ax.set_title(
        f"One sentence ({n_bytes} bytes) split by the GPT-4-pattern tokenizer at growing "
        f"vocabulary (· is a space; � is part of a UTF-8 character)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_token_lengths(tok: BPETokenizer, heldout: str) -> plt.Figure:
    vocab_lengths = [len(t) for t in tok.mergeable_ranks]
    used = [len(tok._decoder[i]) for i in tok.encode(heldout)]
    longest = min(max(vocab_lengths), 16)
    bins = list(range(1, longest + 1))
    clip = lambda n: min(n, longest)  # noqa: E731
    share = lambda lengths: [  # noqa: E731
        sum(1 for n in lengths if clip(n) == b) / max(len(lengths), 1) for b in bins
    ]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(
        [b - 0.2 for b in bins],
        share(vocab_lengths),
        0.4,
        label=f"vocabulary entries ({len(vocab_lengths)})",
    )
    ax.bar(
        [b + 0.2 for b in bins],
        share(used),
        0.4,
        label=f"tokens of the held-out text ({len(used):,})",
    )
    ax.set_xticks(bins, [str(b) if b < longest else f"{b}+" for b in bins])
    ax.set_xlabel("token length (bytes)")
    ax.set_ylabel("share")
    mean_vocab = sum(vocab_lengths) / len(vocab_lengths)
    mean_used = sum(used) / max(len(used), 1)
    ax.set_title(
        f"{len(tok.mergeable_ranks)}-token vocabulary: entries average {mean_vocab:.1f} bytes, "
        f"tokens in use {mean_used:.1f}"
        + (" (tokens in use are shorter on average)" if mean_used < mean_vocab else ""),
        fontsize=10,
    )
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_training_time(training: dict) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = {
        "naive": "naive: recount every chunk after each merge",
        "naive_dedup": "naive on distinct chunks (weighted)",
        "incremental": "incremental counts on distinct chunks (ours)",
    }
    for name in ("naive", "naive_dedup", "incremental"):
        t = training[name]
        med = t["median_s"]
        err = [
            [m - lo for m, lo in zip(med, t["min_s"], strict=True)],
            [hi - m for m, hi in zip(med, t["max_s"], strict=True)],
        ]
        merges = [v - 256 for v in t["vocab_sizes"]]
        ax.errorbar(merges, med, yerr=err, fmt="o-", capsize=3, label=labels[name])
    naive, est = training["naive"], training["naive_estimate"]
    if est["valid"]:  # the estimate, drawn as its own dotted line, never as a measurement
        ax.plot(
            [naive["vocab_sizes"][-1] - 256, est["vocab_size"] - 256],
            [naive["median_s"][-1], est["median"]],
            ":",
            color="C0",
            label=f"naive, estimated (not measured): {est['minutes']:.1f} min for "
            f"{est['vocab_size']} tokens\n(slope per rescanned token x tokens rescanned)",
        )
    split = training["split"]["median"]
    ax.axhline(split, color="0.5", lw=0.8, ls="--")
    ax.text(
        training["incremental"]["vocab_sizes"][0] - 256,
        split,
        f"regex split alone: {split:.2f} s (the incremental floor)",
        color="0.4",
        fontsize=8,
        va="bottom",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    merges = [v - 256 for v in training["incremental"]["vocab_sizes"]]
    ax.set_xticks(merges, [str(m) for m in merges], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("merges learned (vocabulary size - 256)")
    ax.set_ylabel(f"training time (s, median of {training['rounds']}; bars: min-max)")
    ax.set_title(training_title(training), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    return fig


# =============================================================================
# 6. Main
# =============================================================================

SIZES = {
    "quick": {
        "parity_chars": 10_000,
        "parity_vocab": 300,
        "hf_vocab": 512,
        "rounds": 2,
        "bench_chars": 60_000,
        "train_vocab_sizes": [264, 272, 512],
        "naive_vocab_sizes": [264, 272],
        "encode_min_run_time": 0.02,
        "compression_vocab_sizes": [256, 512, 1024],
        "split_vocab_sizes": [256, 512, 1024],
    },
    "default": {
        "parity_chars": 50_000,
        "parity_vocab": 384,
        "hf_vocab": 1024,
        "rounds": 3,
        "bench_chars": None,  # the whole training split
        "train_vocab_sizes": [264, 272, 280, 512, 1024, 2048, 4096, 8192],
        "naive_vocab_sizes": [264, 272, 280],
        "encode_min_run_time": 0.2,
        "compression_vocab_sizes": [256, 512, 1024, 2048, 4096, 8192],
        "split_vocab_sizes": [256, 512, 1024, 4096],
    },
}


def _text_file(path: str) -> tuple[str, str]:
    """argparse type for ``--text``: a readable, non-empty UTF-8 file -> (its text, its name)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {err}") from None
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{path} is empty: there is nothing to train on")
    return text, Path(path).name


def _vocab_size(text: str) -> int:
    value = positive_int(text)
    if value < 256:
        raise argparse.ArgumentTypeError(f"{value} must be >= 256 (one token per byte first)")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser()
    parser.add_argument(
        "--text",
        type=_text_file,
        default=None,
        metavar="FILE",
        help="train on this UTF-8 file instead of CPython's help text (default: pydoc topics)",
    )
    parser.add_argument(
        "--vocab-size",
        type=_vocab_size,
        default=4096,
        help="ranks of the tokenizer written to tokenizer.tiktoken, >= 256 (default: %(default)s)",
    )
    return parse_flags(parser, argv)


def print_corpus(corpus: dict) -> None:
    print(
        f"  {corpus['source']} (Python {corpus['python']}): {corpus['n_parts']} parts, "
        f"{corpus['rule']}"
    )
    print(f"  train {corpus['train_bytes']:,} bytes, held out {corpus['heldout_bytes']:,} bytes")


def describe_tokenizer(tok: BPETokenizer, seconds: float, text: str) -> dict:
    chunks = count_chunks(text, tok.pattern)
    return {
        "pattern": "gpt4",
        "chunks": sum(chunks.values()),
        "distinct_chunks": len(chunks),
        "vocab_size": len(tok.mergeable_ranks),
        "n_vocab": tok.n_vocab,
        "special_tokens": tok.special_tokens,
        "file": "tokenizer.tiktoken",
        "train_s": seconds,
        "first_merges": [f"{show(a)!r}+{show(b)!r} ({n})" for a, b, n in tok.merges[:8]],
        "last_merge": [show(tok.merges[-1][0]), show(tok.merges[-1][1]), tok.merges[-1][2]]
        if tok.merges
        else None,
    }


def print_tokenizer(info: dict) -> None:
    print(
        f"  {info['vocab_size']} ranks + {ENDOFTEXT} = {info['n_vocab'] - 1}, trained in "
        f"{info['train_s']:.2f} s; written as {info['file']} with the figures"
    )
    print(
        f"  the training text is {info['chunks']:,} chunks, {info['distinct_chunks']:,} of them "
        f"distinct: the trainer counts pairs in those, weighted"
    )
    print(f"  first merges: {', '.join(info['first_merges'])}")
    if info["last_merge"]:
        a, b, n = info["last_merge"]
        print(f"  last merge: {a!r}+{b!r}, seen {n} times")


def print_parity(parity: dict) -> None:
    if "skipped" in parity:
        print(f"  tiktoken checks skipped: {parity['skipped']}")
    for name, r in parity["bpe_train"].items():
        if "identical" in r:
            diff = "" if r["identical"] else f", first difference {r['first_difference']}"
            print(
                f"  ranks vs tiktoken _educational.bpe_train ({PATTERN_LABELS[name]}, "
                f"{r['text_chars']:,} chars, vocab {r['vocab_size']}): identical {r['identical']}"
                f"{diff}"
            )
    t = parity["tiktoken"]
    if t is not None:
        print(
            f"  encode vs tiktoken.Encoding(our ranks): held-out identical {t['heldout_identical']}"
            f", adversarial {t['adversarial_identical']}/{t['n_adversarial']}, with "
            f"{ENDOFTEXT} {t['special_identical']}"
        )
        print(
            f"  tokenizer.tiktoken read back by tiktoken.load.load_tiktoken_bpe and "
            f"BPETokenizer.load: identical {t['saved_file_loads_identical']}"
        )
    if parity["hf_tokenizers"] is not None:
        print(
            f"  encode vs HF tokenizers BPE(our merges): held-out identical "
            f"{parity['hf_tokenizers']['heldout_identical']}"
        )
    rt = parity["round_trip"]
    print(
        f"  decode(encode(s)) == s: held-out {rt['heldout']}, adversarial {rt['adversarial']}/"
        f"{rt['n_adversarial']} (lone surrogates compared as U+FFFD), special {rt['special']}"
    )
    d = parity.get("hf_divergence")
    if d is not None:
        print(
            f"  HF BpeTrainer at vocab {d['vocab_size']}: "
            f"{100 * d['same_merge_set_fraction']:.1f}% of the same merges; order "
            + (
                f"first differs at merge {d['merge_index']} (rank {d['rank']}): {d['why']}"
                if d["diverges"]
                else "identical"
            )
        )


def print_training(training: dict) -> None:
    print(
        f"  {training['text_bytes']:,} bytes, GPT-4 pattern, median of {training['rounds']} "
        f"interleaved rounds (min-max)"
    )
    for name in ("naive", "naive_dedup", "incremental"):
        t = training[name]
        cells = [
            f"{v}: {m:.2f} s ({lo:.2f}-{hi:.2f})"
            for v, m, lo, hi in zip(
                t["vocab_sizes"], t["median_s"], t["min_s"], t["max_s"], strict=True
            )
        ]
        print(f"  {name:<12} " + "; ".join(cells))
    for name in ("naive", "naive_dedup"):
        s = training[f"speedup_vs_{name}"]
        print(
            f"  incremental vs {name} at {s['vocab_size']}: {s['median']:.1f}x "
            f"({s['min']:.1f}-{s['max']:.1f}x)"
        )
    sp = training["split"]
    print(
        f"  the regex split alone (count_chunks): {sp['median']:.2f} s "
        f"({sp['min']:.2f}-{sp['max']:.2f}), the floor under the incremental times"
    )
    e = training["naive_estimate"]
    if e["valid"]:
        print(
            f"  naive would take about {e['minutes']:.1f} min for {e['vocab_size']} tokens "
            f"({e['min'] / 60:.1f}-{e['max'] / 60:.1f} over rounds), {e['speedup']:.0f}x the "
            f"incremental time; {e['method']}"
        )
    else:
        print(f"  no naive estimate: the measured naive times did not grow ({e['method']})")
    r = training["ranks_identical"]
    print(f"  the three trainers learn identical ranks at {r['vocab_sizes']}: {r['identical']}")


def print_encode(encode: dict) -> None:
    print(
        f"  {encode['text_bytes']:,} bytes of held-out text, median of {encode['rounds']} "
        f"rounds of torch.utils.benchmark medians, one thread"
    )
    for name, s in encode["mb_per_s"].items():
        print(f"  {name:<16} {s['median']:7.2f} MB/s ({s['min']:.2f}-{s['max']:.2f})")


def print_compression(compression: dict) -> None:
    sizes = compression["vocab_sizes"]
    print("  held-out bytes per token   " + " ".join(f"{v:>6}" for v in sizes))
    for name, values in compression["bytes_per_token"].items():
        print(f"  {PATTERN_LABELS[name]:<26} " + " ".join(f"{b:6.2f}" for b in values))
    v = compression["boundary_vocab_size"]
    for name, b in compression["boundary_tokens"].items():
        examples = "; ".join(
            f"{k} {b['by_kind'][k]}: {', '.join(map(repr, e[:3]))}"
            for k, e in b["examples"].items()
        )
        print(
            f"  {PATTERN_LABELS[name]}: {b['count']} of {v} tokens cross a word/space/digit "
            f"boundary{' (' + examples + ')' if examples else ''}"
        )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cfg = SIZES["quick" if args.quick else "default"]
    results: dict = {"meta": run_meta(args, device)}
    n = 7
    print(f"[1/{n}] loading the corpus ...")
    corpus = load_corpus(*(args.text or ()))
    bench_text = corpus["train"][: cfg["bench_chars"]]  # what training is timed and compared on
    results["corpus"] = {k: v for k, v in corpus.items() if k not in ("train", "heldout")}
    print_corpus(results["corpus"])

    print(f"[2/{n}] training a {args.vocab_size}-token tokenizer (GPT-4 pattern) ...")
    start = time.perf_counter()
    tok = BPETokenizer.train(corpus["train"], args.vocab_size, GPT4_PATTERN)
    results["tokenizer"] = describe_tokenizer(tok, time.perf_counter() - start, corpus["train"])
    print_tokenizer(results["tokenizer"])

    print(f"[3/{n}] checking parity with tiktoken and HF tokenizers ...")
    parity = results["parity"] = check_parity(corpus, tok, cfg["parity_chars"], cfg["parity_vocab"])
    parity["hf_divergence"] = explain_hf_divergence(corpus["train"], cfg["hf_vocab"], GPT4_PATTERN)
    print_parity(parity)

    print(f"[4/{n}] timing training: naive recount vs incremental ...")
    sizes = [*cfg["train_vocab_sizes"], args.vocab_size]
    training = results["training"] = benchmark_training(
        bench_text, sizes, cfg["naive_vocab_sizes"], cfg["rounds"]
    )
    print_training(training)

    print(f"[5/{n}] timing encode: ours vs tiktoken vs HF tokenizers ...")
    encode = results["encode"] = benchmark_encode(
        tok, corpus["heldout"], cfg["encode_min_run_time"], cfg["rounds"]
    )
    print_encode(encode)

    print(f"[6/{n}] measuring compression vs vocabulary size ...")
    boundary_vocab = min(args.vocab_size, cfg["compression_vocab_sizes"][-1])
    compression, gpt4 = measure_compression(
        bench_text, corpus["heldout"], cfg["compression_vocab_sizes"], boundary_vocab
    )
    results["compression"] = compression
    print_compression(compression)
    results["claims"] = tokenization_claims(parity, training, encode, compression, args.vocab_size)
    print_claims(results["claims"])

    print(f"[7/{n}] drawing figures ...")
    figures = {
        "compression": plot_compression(compression),
        "sentence_splits": plot_sentence_splits(gpt4, cfg["split_vocab_sizes"], SENTENCE),
        "token_lengths": plot_token_lengths(tok, corpus["heldout"]),
        "training_time": plot_training_time(training),
    }
    files = {"tokenizer.tiktoken": tiktoken_file_bytes(tok.mergeable_ranks)}
    save_outputs(args.out, figures, results, show=not args.no_show, files=files)
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
