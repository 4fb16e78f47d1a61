"""Shared pytest fixtures for the script tests.

Every test starts from the same random state (``seed_everything``), figures never open a
window (the ``Agg`` backend), and ``run_main`` runs a script's ``main([...])`` the way a
learner would, into a temporary output folder, and returns what it wrote.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import matplotlib
import numpy as np
import pytest
import torch

# Headless and deterministic before any test imports pyplot.
matplotlib.use("Agg")
os.environ.setdefault("MPLBACKEND", "Agg")

SEED = 1234


@pytest.fixture(autouse=True)
def seed_everything() -> int:
    """Seed Python, NumPy and PyTorch before every test, so each test is reproducible alone."""
    random.seed(SEED)
    np.random.seed(SEED)  # noqa: NPY002 (the legacy global state, for code that uses it)
    torch.manual_seed(SEED)
    return SEED


@pytest.fixture(autouse=True)
def close_figures():
    """Close every figure a test opened, so memory does not grow across the suite."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """A fresh, empty output folder for a script's figures and results.json."""
    path = tmp_path / "out"
    path.mkdir()
    return path


@dataclass
class ScriptRun:
    """What one ``main([...])`` call produced."""

    out_dir: Path
    results: dict
    pngs: list[Path]


@pytest.fixture
def run_main(out_dir: Path) -> Callable[..., ScriptRun]:
    """Run ``module.main(["--quick", "--no-show", "--out", out_dir, *extra])``.

    Returns the parsed ``results.json`` and the PNG files written, so a smoke test can check
    both the expected keys and that every figure was saved.
    """

    def _run(module: ModuleType, *extra: str, quick: bool = True) -> ScriptRun:
        argv = ["--no-show", "--out", str(out_dir), "--device", "cpu", *extra]
        if quick:
            argv.insert(0, "--quick")
        module.main(argv)
        results_path = out_dir / "results.json"
        assert results_path.is_file(), f"{module.__name__}.main did not write results.json"
        results = json.loads(results_path.read_text())
        pngs = sorted(out_dir.glob("*.png"))
        return ScriptRun(out_dir=out_dir, results=results, pngs=pngs)

    return _run
