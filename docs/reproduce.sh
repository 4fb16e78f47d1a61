#!/usr/bin/env bash
# Reproduce everything: run every script at its default settings, refresh docs/figures/ (the
# PNGs and results.json the README shows), time each script's default and --quick runs and the
# test suite, then re-render README.md from those results. Every duration the README states
# comes from docs/figures/reproduce/results.json, written here. Run it on an idle machine.
#
#   bash docs/reproduce.sh                    # every script, then the suite
#   bash docs/reproduce.sh training quantization
#                                             # only these scripts (after changing them), then
#                                             # the suite; the other scripts keep the durations
#                                             # recorded by their last run
set -euo pipefail
cd "$(dirname "$0")/.."
scripts=(
    kv_caching positional_embeddings swiglu grouped_query_attention multihead_latent_attention
    flash_attention tokenization training evaluation quantization fine_tuning
    distributed_training
)
if (($# > 0)); then
    for name in "$@"; do
        [[ " ${scripts[*]} " == *" $name "* ]] || { echo "unknown script: $name" >&2; exit 2; }
    done
    scripts=("$@")
fi
quick_out=$(mktemp -d)
trap 'rm -rf "$quick_out"' EXIT
times="$quick_out/times.tsv"  # kind, script, seconds
for i in "${!scripts[@]}"; do
    name=${scripts[$i]}
    echo "=== [$((i + 1))/${#scripts[@]}] $name.py -> docs/figures/$name/"
    rm -rf "docs/figures/$name"
    t=$SECONDS
    uv run python "$name.py" --no-show --out "docs/figures/$name"
    printf 'script_seconds\t%s\t%d\n' "$name" $((SECONDS - t)) >> "$times"
    t=$SECONDS
    uv run python "$name.py" --quick --no-show --out "$quick_out/$name" >/dev/null
    printf 'quick_seconds\t%s\t%d\n' "$name" $((SECONDS - t)) >> "$times"
done
uv run python docs/render_readme.py  # the suite checks the README against the new results
echo "=== uv run pytest"
t=$SECONDS
pytest_status=0
uv run pytest -q -p no:cacheprovider || pytest_status=$?
printf 'pytest_seconds\t-\t%d\n' $((SECONDS - t)) >> "$times"
# Merge into the recorded durations; "seconds" is what a full run takes: the sum of every
# script's default and --quick run and the suite.
uv run python - "$times" <<'PY'
import json, sys
from pathlib import Path

path = Path("docs/figures/reproduce/results.json")
old = json.loads(path.read_text()) if path.is_file() else {}
new = {"script_seconds": dict(old.get("script_seconds", {})),
       "quick_seconds": dict(old.get("quick_seconds", {}))}
for line in Path(sys.argv[1]).read_text().splitlines():
    kind, name, seconds = line.split("\t")
    if kind == "pytest_seconds":
        new["pytest_seconds"] = int(seconds)
    else:
        new[kind][name] = int(seconds)
seconds = sum(new["script_seconds"].values()) + sum(new["quick_seconds"].values())
seconds += new["pytest_seconds"]
out = {"seconds": seconds, "minutes": round(seconds / 60, 2), **new,
       "quick_seconds_max": max(new["quick_seconds"].values()),
       "pytest_minutes": round(new["pytest_seconds"] / 60, 1)}
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps(out) + "\n")
PY
uv run python docs/render_readme.py
echo "reproduced in $SECONDS s"
# A failing suite still leaves the measured durations written, then fails the script.
exit "$pytest_status"
