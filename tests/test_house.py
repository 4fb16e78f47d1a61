"""House-wide checks that hold for every top-level script (see ../shared/CONVENTIONS.md).

- ``--help`` works and lists the shared flags;
- importing a script does no work: it prints nothing, opens no figure, writes no file, and
  leaves the global random state alone;
- ``python <script>.py --quick --no-show`` runs headless with no warning, prints one numbered
  progress line per stage, and writes its figures and a ``results.json`` with a ``meta`` block;
- every script is shipped by the package, so ``import <script>`` works after ``pip install -e .``.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "positional_embeddings",
    "swiglu",
    "kv_caching",
    "grouped_query_attention",
    "multihead_latent_attention",
    "tokenization",
    "training",
]
SHARED_FLAGS = ["--quick", "--out", "--no-show", "--device", "--seed"]


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
