"""Fill README.md from docs/README.template.md and the committed results of each script.

Every measured number in the README is a placeholder ``{{<script>:<key.path>}}`` or
``{{<script>:<key.path>|<format>}}`` resolved from ``docs/figures/<script>/results.json``, so
the README cannot drift from what the scripts measured. The format is a Python format spec,
optionally led by GiB, MiB or KiB to convert bytes. List entries are indexed by number
(``decode.time_ms.naive.-1`` is the last one). Run after refreshing the figures:

    uv run python docs/render_readme.py          # rewrite README.md
    uv run python docs/render_readme.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
PLACEHOLDER = re.compile(r"\{\{(\w+):([\w.\-]+)(?:\|([^}]*))?\}\}")


def lookup(results: dict, path: str):
    """Follow a dotted path through nested dicts and lists ("a.b.0.c", negative indices too)."""
    value = results
    for part in path.split("."):
        if isinstance(value, list):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(f"{path!r}: no key {part!r}")
    return value


UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}


def format_value(value, spec: str | None) -> str:
    """Booleans read as yes/no; numbers use ``spec`` (default: 3 significant digits).

    A spec starting with a byte unit converts first: ``GiB.1f`` shows 68719476736 as "64.0 GiB".
    """
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec and spec[:3] in UNITS:
        return f"{format_value(value / UNITS[spec[:3]], spec[3:] or None)} {spec[:3]}"
    if spec:
        return format(value, spec)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def render(template: str, figures_dir: Path = DOCS / "figures") -> str:
    cache: dict[str, dict] = {}

    def substitute(match: re.Match) -> str:
        script, path, spec = match.groups()
        if script not in cache:
            cache[script] = json.loads((figures_dir / script / "results.json").read_text())
        try:
            return format_value(lookup(cache[script], path), spec)
        except (KeyError, IndexError, ValueError) as err:
            message = err.args[0] if err.args else repr(err)
            raise LookupError(f"README placeholder {match.group(0)}: {message}") from None

    return PLACEHOLDER.sub(substitute, template)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check README.md is current")
    args = parser.parse_args(argv)
    rendered = render((DOCS / "README.template.md").read_text())
    readme = ROOT / "README.md"
    if args.check:
        if readme.read_text() != rendered:
            print("README.md is out of date: run `uv run python docs/render_readme.py`")
            return 1
        print("README.md is up to date")
        return 0
    readme.write_text(rendered)
    print(f"wrote {readme.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
