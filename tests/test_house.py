"""House-wide checks that hold for every top-level script (see ../shared/CONVENTIONS.md).

- Layout: the module docstring ends in a Contents block; the section banners 2-7 appear in order;
  the core is short and the headline class near the top; ``main`` is a thin list of stages; the
  headline's docstring example runs (doctest).
- One text per shared name: every top-level name defined in more than one script has the same
  source in each (per-script roles such as ``main`` or ``plot_*`` excepted), and section 7, the
  plumbing, is identical everywhere.
- Command line: ``--help`` lists the shared flags, each with help text and its default; bad flag
  values exit 2 with a one-line message before writing anything; ``--quick`` has its own folder.
- Importing a script does no work; ``python <script>.py --quick --no-show`` runs headless with no
  warning, prints one numbered progress line per stage, and writes its figures and a
  ``results.json`` with a ``meta`` block; every script is shipped by the package.
"""

from __future__ import annotations

import ast
import collections
import doctest
import importlib
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "kv_caching",
    "positional_embeddings",
    "swiglu",
    "grouped_query_attention",
    "multihead_latent_attention",
    "flash_attention",
    "tokenization",
    "training",
    "evaluation",
    "quantization",
    "distributed_training",
    "fine_tuning",
]
SHARED_FLAGS = ["--quick", "--out", "--no-show", "--device", "--seed"]
HEADLINE = {
    "kv_caching": "KVCache",
    "positional_embeddings": "RotaryEmbedding",
    "swiglu": "SwiGLUFeedForward",
    "grouped_query_attention": "GroupedQueryAttention",
    "multihead_latent_attention": "MultiHeadLatentAttention",
    "flash_attention": "flash_attention_forward",
    "tokenization": "BPETokenizer",
    "training": "Llama",
    "evaluation": "perplexity",
    "quantization": "QuantizedLinear",
    "distributed_training": "ring_all_reduce",
    "fine_tuning": "LoRALinear",
}
SECTIONS = ["Core", "Baselines and apparatus", "Experiments", "Figures", "Main", "Plumbing"]
BANNER = re.compile(r"^# (\d)\. ([A-Z][a-z]+(?: [a-z]+)*)", flags=re.MULTILINE)
# Roles every script fills for itself: the same name on purpose, a body of its own.
PER_SCRIPT_ROLES = {"main", "parse_args", "check_correctness", "benchmark_decode", "SIZES"}
PER_SCRIPT_PREFIXES = ("plot_", "print_")
# Where the optimizer is the lesson it is written out (and tested against torch.optim); elsewhere
# scripts use torch.optim.
OPTIMIZER_IS_THE_LESSON = {"training"}


def _source(stem: str) -> str:
    return (ROOT / f"{stem}.py").read_text()


def _top_level(stem: str) -> dict[str, str]:
    """Top-level name -> its source text (functions, classes, assignments)."""
    src = _source(stem)
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        else:
            continue
        for name in names:
            out[name] = ast.get_source_segment(src, node)
    return out


def _banners(stem: str) -> list[tuple[int, str, int]]:
    """(section number, title, line number) of each section banner."""
    src = _source(stem)
    return [
        (int(m.group(1)), m.group(2), src[: m.start()].count("\n") + 1)
        for m in BANNER.finditer(src)
    ]


# ---- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", SCRIPTS)
def test_docstring_ends_with_contents_and_banners_are_in_order(stem):
    doc = ast.get_docstring(ast.parse(_source(stem)))
    assert re.search(r"^Contents\n-+$", doc, flags=re.MULTILINE), f"{stem}: no Contents block"
    banners = _banners(stem)
    assert [(n, t) for n, t, _ in banners] == list(enumerate(SECTIONS, start=2)), banners
    assert "# 7. Plumbing (identical in every script)" in _source(stem)


@pytest.mark.parametrize("stem", SCRIPTS)
def test_core_first_and_main_thin(stem):
    src = _source(stem)
    lines = src.splitlines()
    tree = ast.parse(src)
    docstring_end = tree.body[0].end_lineno
    (_, _, core_start), (_, _, core_end) = _banners(stem)[:2]
    core = [line for line in lines[core_start : core_end - 1] if line.strip()]
    assert len(core) <= 330, f"{stem}: the core has {len(core)} non-blank lines (target ~300)"
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    headline = defs[HEADLINE[stem]]
    assert core_start < headline.lineno < core_end, f"{HEADLINE[stem]} is not in the core"
    offset = headline.lineno - docstring_end
    assert offset <= 275, f"{HEADLINE[stem]} starts {offset} lines after the docstring"
    main_lines = defs["main"].end_lineno - defs["main"].lineno + 1
    assert main_lines <= 60, f"{stem}: main has {main_lines} lines (target ~50)"


@pytest.mark.parametrize("stem", SCRIPTS)
def test_headline_docstring_example_runs(stem):
    module = importlib.import_module(stem)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module) if t.examples]
    assert any(t.name.split(".")[1:2] == [HEADLINE[stem]] for t in tests), (
        f"{HEADLINE[stem]}'s docstring has no example"
    )
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.parametrize("stem", SCRIPTS)
def test_no_start_up_hacks_and_no_tracker_words(stem):
    src = _source(stem)
    assert "_should_skip_dynamo" not in src, f"{stem} overrides a private torch method"
    if stem not in OPTIMIZER_IS_THE_LESSON:
        assert not re.search(r"^class Adam\w*\b", src, flags=re.MULTILINE), f"{stem}: own optimizer"
    assert not re.search(r"\bgoals?\b", src), f"{stem} speaks of goals: say claims"
    assert not re.search(r"\bthe issue\b", src), f"{stem} refers to an issue tracker"


# ---- one text per shared name ------------------------------------------------------------------


def _shared_names() -> dict[str, dict[str, str]]:
    by_name: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for stem in SCRIPTS:
        for name, text in _top_level(stem).items():
            by_name[name][stem] = text
    return {
        name: texts
        for name, texts in sorted(by_name.items())
        if len(texts) > 1
        and name not in PER_SCRIPT_ROLES
        and not name.startswith(PER_SCRIPT_PREFIXES)
    }


def test_shared_names_have_one_text():
    shared = _shared_names()
    assert {"KVCache", "causal_mask", "median_time_s", "save_outputs"} <= shared.keys()
    differing = {
        name: sorted(texts) for name, texts in shared.items() if len(set(texts.values())) > 1
    }
    assert not differing, f"shared names whose text differs between scripts: {differing}"


def test_plumbing_is_identical_in_every_script():
    blocks = {}
    for stem in SCRIPTS:
        src = _source(stem)
        start = src.index("# 7. Plumbing (identical in every script)")
        end = src.index('\nif __name__ == "__main__":')
        blocks[stem] = src[start:end]
    assert len(set(blocks.values())) == 1, "section 7 differs between scripts"


# ---- command line ------------------------------------------------------------------------------


def _parser(stem: str, monkeypatch):
    """The script's argparse parser, as ``parse_args`` builds it (before parsing)."""
    module = importlib.import_module(stem)
    captured = {}

    def grab(parser, argv):
        captured["parser"] = parser
        raise SystemExit(0)

    monkeypatch.setattr(module, "parse_flags", grab)
    with pytest.raises(SystemExit):
        module.parse_args([])
    return captured["parser"]


@pytest.mark.parametrize("stem", SCRIPTS)
def test_every_flag_has_help_with_its_default(stem, monkeypatch):
    for action in _parser(stem, monkeypatch)._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{stem} {action.option_strings[0]} has no help text"
        if action.default not in (None, False):
            assert "default" in action.help, f"{stem} {action.option_strings[0]}: no default"


def _bad_flags(tmp_path: Path) -> dict[str, list[str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = {
        "out": ["--out", str(a_file)],
        "out-under-a-file": ["--out", str(a_file / "sub")],
        "seed": ["--seed", str(2**70)],
        "seed-negative": ["--seed", "-1"],
        "device": ["--device", "tpu"],
    }
    if not torch.cuda.is_available():
        cases["device-unavailable"] = ["--device", "cuda"]
    return cases


@pytest.mark.parametrize("stem", SCRIPTS)
def test_bad_flags_exit_2_with_one_line_and_write_nothing(stem, tmp_path, capsys, monkeypatch):
    module = importlib.import_module(stem)
    monkeypatch.chdir(tmp_path)
    for case, argv in _bad_flags(tmp_path).items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--quick", "--no-show", *argv])
        assert exit_info.value.code == 2, f"{stem} {case}"
        err = capsys.readouterr().err.strip().splitlines()
        flag = argv[0]
        assert err and f"argument {flag}" in err[-1], f"{stem} {case}: {err}"
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, f"{stem} {case} wrote"


@pytest.mark.parametrize("stem", SCRIPTS)
def test_quick_run_writes_to_its_own_folder(stem, tmp_path, monkeypatch):
    module = importlib.import_module(stem)
    monkeypatch.chdir(tmp_path)
    assert module.parse_args([]).out == Path("figures") / stem
    assert module.parse_args(["--quick"]).out == Path("figures") / stem / "quick"


# ---- import and quick run ----------------------------------------------------------------------


@pytest.mark.parametrize("stem", SCRIPTS)
def test_import_does_no_work_and_help_lists_shared_flags(stem, run_main):
    report = run_main(importlib.import_module(stem)).import_report
    assert report["printed"] == ""
    assert report["figures"] == []
    assert report["files"] == []
    assert report["torch_rng_unchanged"]
    assert report["numpy_rng_unchanged"]
    assert report["help_exit"] == 0
    for flag in SHARED_FLAGS:
        assert flag in report["help"], f"{stem} --help does not list {flag}"


@pytest.mark.parametrize("stem", SCRIPTS)
def test_quick_run_is_headless_quiet_and_reports_progress(stem, run_main):
    run = run_main(importlib.import_module(stem))
    assert "warning" not in run.stderr.lower(), run.stderr
    stages = re.findall(r"^\[(\d+)/(\d+)\] \S.* \.\.\.$", run.stdout, flags=re.MULTILINE)
    assert stages, f"{stem} printed no '[i/n] stage ...' progress line"
    totals = {int(total) for _, total in stages}
    assert len(totals) == 1, f"{stem} progress lines disagree on the stage count: {totals}"
    assert [int(i) for i, _ in stages] == list(range(1, totals.pop() + 1))
    meta = run.results["meta"]
    assert meta["script"] == f"{stem}.py"
    assert meta["quick"] is True
    assert {"torch", "device", "seed"} <= meta.keys()
    assert run.pngs, f"{stem} saved no figure"
    for png in run.pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png.name} is not a PNG"
    assert not list(run.out_dir.glob(".writing-*")), f"{stem} left its staging folder"


def test_every_top_level_script_is_tested_and_shipped():
    on_disk = sorted(p.stem for p in ROOT.glob("*.py"))
    assert on_disk == sorted(SCRIPTS)
    for stem in SCRIPTS:
        assert (ROOT / "tests" / f"test_{stem}.py").is_file(), f"{stem} has no test file"
    pyproject = (ROOT / "pyproject.toml").read_text()
    only_include = re.search(r"only-include = \[(.*?)\]", pyproject, flags=re.DOTALL)
    assert only_include is not None
    shipped = sorted(re.findall(r'"(\w+)\.py"', only_include.group(1)))
    assert shipped == sorted(SCRIPTS)
