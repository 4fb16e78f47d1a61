"""Shared pytest fixtures for the script tests.

Every test starts from the same random state (``seed_everything``), figures never open a
window (the ``Agg`` backend), and ``run_main`` runs a script the way a learner would
(``python <script>.py --quick --no-show``) into a temporary output folder and returns what it
wrote and printed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
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
    """What one run of a script produced."""

    out_dir: Path
    results: dict
    pngs: list[Path]
    stdout: str
    stderr: str
    import_report: dict


# Runs in a fresh interpreter, in an empty working folder: import the script and record any work
# the import did, check ``--help``, then run ``main(argv)`` as ``python <script>.py argv`` would.
_RUNNER = """
import contextlib, io, json, os, sys
import numpy, torch
stem, report_path, *argv = sys.argv[1:]
torch_rng = torch.random.get_rng_state().clone()
numpy_rng = numpy.random.get_state()[1].copy()
with contextlib.redirect_stdout(io.StringIO()) as printed:
    module = __import__(stem)
import matplotlib.pyplot as plt
report = {
    "printed": printed.getvalue(),
    "figures": plt.get_fignums(),
    "files": sorted(os.listdir(".")),
    "torch_rng_unchanged": bool(torch.equal(torch_rng, torch.random.get_rng_state())),
    "numpy_rng_unchanged": bool((numpy_rng == numpy.random.get_state()[1]).all()),
}
with contextlib.redirect_stdout(io.StringIO()) as help_text:
    try:
        module.main(["--help"])
    except SystemExit as exit:
        report["help_exit"] = exit.code
report["help"] = help_text.getvalue()
with open(report_path, "w") as f:
    json.dump(report, f)
module.main(argv)
"""

_RUNS: dict[tuple, ScriptRun] = {}


@pytest.fixture
def run_main(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., ScriptRun]:
    """Run a script the way a learner does: ``python <script>.py --quick --no-show --out DIR``.

    It runs in a fresh Python process (so the checks for warnings, for a headless backend and
    for an import that does no work are real), on the CPU, at most once per test session for
    the same arguments: the per-script smoke tests and the house-wide tests share the run.
    Returns the parsed ``results.json``, the PNG files written, what the script printed, and
    what importing it did (``import_report``).
    """

    def _run(module: ModuleType, *extra: str, quick: bool = True) -> ScriptRun:
        key = (module.__name__, extra, quick)
        if key not in _RUNS:
            out = tmp_path_factory.mktemp(module.__name__)
            workdir = tmp_path_factory.mktemp(f"{module.__name__}_cwd")
            report_path = out.parent / f"{out.name}_import_report.json"
            argv = ["--no-show", "--out", str(out), "--device", "cpu", *extra]
            if quick:
                argv.insert(0, "--quick")
            env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
            env["PYTHONPATH"] = str(Path(module.__file__).resolve().parent)
            proc = subprocess.run(
                [sys.executable, "-c", _RUNNER, module.__name__, str(report_path), *argv],
                cwd=workdir,
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
                check=False,
            )
            assert proc.returncode == 0, (
                f"{module.__name__} {' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}"
            )
            results_path = out / "results.json"
            assert results_path.is_file(), f"{module.__name__} did not write results.json"
            _RUNS[key] = ScriptRun(
                out_dir=out,
                results=json.loads(results_path.read_text()),
                pngs=sorted(out.glob("*.png")),
                stdout=proc.stdout,
                stderr=proc.stderr,
                import_report=json.loads(report_path.read_text()),
            )
        return _RUNS[key]

    return _run
