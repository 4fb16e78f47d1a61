"""The README shows what the scripts measured: its numbers come from the committed results.

``docs/README.template.md`` holds placeholders such as ``{{kv_caching:goals.static_speedup}}``;
``docs/render_readme.py`` fills them from ``docs/figures/<script>/results.json``. These tests
fail when README.md was edited by hand, when a placeholder names a key a script no longer writes,
or when the README shows a figure that is not committed.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _renderer():
    spec = importlib.util.spec_from_file_location("render_readme", DOCS / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_rendered_from_the_committed_results():
    rendered = _renderer().render((DOCS / "README.template.md").read_text())
    assert (ROOT / "README.md").read_text() == rendered, (
        "README.md is out of date: run `uv run python docs/render_readme.py`"
    )


def test_every_image_in_the_readme_is_committed():
    readme = (ROOT / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert images, "the README shows no figure"
    for image in images:
        assert (ROOT / image).is_file(), f"README shows {image}, which does not exist"


def test_committed_results_come_from_default_runs_of_every_script():
    stems = sorted(p.stem for p in ROOT.glob("*.py"))
    for stem in stems:
        results = json.loads((DOCS / "figures" / stem / "results.json").read_text())
        assert results["meta"]["script"] == f"{stem}.py"
        assert results["meta"]["quick"] is False, f"{stem}: README numbers must be default runs"


def test_renderer_formats_and_reports_missing_keys(tmp_path):
    render = _renderer().render
    (tmp_path / "demo").mkdir()
    results = {"a": {"b": [1.23456, 2]}, "ok": True, "n": 69120}
    (tmp_path / "demo" / "results.json").write_text(json.dumps(results))
    text = "{{demo:a.b.0}} {{demo:a.b.-1}} {{demo:a.b.0|.1f}} {{demo:ok}} {{demo:n}}"
    assert render(text, tmp_path) == "1.23 2 1.2 yes 69,120"
    assert render("{{demo:n|KiB.1f}} {{demo:n|MiB}}", tmp_path) == "67.5 KiB 0.0659 MiB"
    with pytest.raises(LookupError, match="no key 'missing'"):
        render("{{demo:a.missing}}", tmp_path)


# A sentence that states a measured outcome takes its direction from results.json: a comparative
# word within three words of a measured number must come from a placeholder too
# (``{{x:claims.y.statement}}``, a ``..._phrase``),
# unless the numbers it compares are exact arithmetic (byte counts from published configs), or the
# word only defines how to read a ratio ("bigger is faster").
COMPARATIVE = re.compile(
    r"\b(faster|slower|smaller|larger|bigger|lower|higher|smallest|largest|lowest|highest|"
    r"fewer|less|more|beats?|wins?|outperforms?|better|worse|below|above|exceeds?)\b",
    flags=re.IGNORECASE,
)
PLACEHOLDER = re.compile(r"\{\{(\w+):([\w.\-]+)(?:\|[^}]*)?\}\}")
# Keys whose values are exact arithmetic on published shapes, not measurements.
EXACT_KEYS = re.compile(
    r"(meta|config)\.|cache_bytes_ratio|bytes_per_token|deepseek_cache\.|table1\.|"
    r"elements_per_token|cache_vs_context\.|real_models\.|flop"
)
# Keys whose values are themselves the computed wording (the direction comes with them).
WORDING_KEYS = re.compile(r"(statement|phrase|label|direction|verdict|title)$")
DEFINITIONS = re.compile(
    r"\b(bigger|higher|lower|smaller) (is|=|means) (faster|better|shorter|worse)\b|"
    r"\b(described|shown|listed|table|figure|method) (below|above)\b|"
    r"\b(largest|smallest|highest|lowest|strongest) (error|value|entry|column|channel|row)\b|"
    r"\bthe machine (described )?above\b|\b2-core machine described above\b",
    flags=re.IGNORECASE,
)


def _sentences(template: str):
    text = re.sub(r"```.*?```", "", template, flags=re.DOTALL)
    for block in re.split(r"\n\s*\n|\n(?=\|)|\n(?=- )", text):
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z*`(])|\s\|\s", block):
            yield " ".join(sentence.split())


def test_measured_comparisons_take_their_direction_from_the_results():
    template = (DOCS / "README.template.md").read_text()
    fixed = []
    for sentence in _sentences(template):
        measured = [m for m in PLACEHOLDER.finditer(sentence) if not EXACT_KEYS.search(m.group(2))]
        if not measured or any(WORDING_KEYS.search(m.group(2)) for m in measured):
            continue
        # A comparative word within three words of a measured number states its direction.
        marked = DEFINITIONS.sub(
            " ",
            PLACEHOLDER.sub(
                lambda m: " MEASURED " if not EXACT_KEYS.search(m.group(2)) else " EXACT ", sentence
            ),
        )
        words = re.findall(r"[\w*-]+", marked)
        near = [
            w
            for i, w in enumerate(words)
            if COMPARATIVE.fullmatch(w.strip("*")) and "MEASURED" in words[max(0, i - 3) : i + 4]
        ]
        if near:
            fixed.append(f"{near}: {sentence[:160]}")
    assert not fixed, "sentences comparing measured numbers with fixed words:\n" + "\n".join(fixed)
