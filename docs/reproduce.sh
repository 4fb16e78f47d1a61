#!/usr/bin/env bash
# Reproduce everything: run every script at its default settings, refresh docs/figures/ (the
# PNGs and results.json the README shows), time each script's default and --quick runs and the
# test suite, then re-render README.md from those results. Every duration the README states
# comes from docs/figures/reproduce/results.json, written here. Run it on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts=(
    kv_caching positional_embeddings swiglu grouped_query_attention multihead_latent_attention
    flash_attention tokenization training quantization fine_tuning
)
quick_out=$(mktemp -d)
trap 'rm -rf "$quick_out"' EXIT
start=$SECONDS
default_times="" quick_times="" quick_max=0
for i in "${!scripts[@]}"; do
    name=${scripts[$i]}
    echo "=== [$((i + 1))/${#scripts[@]}] $name.py -> docs/figures/$name/"
    rm -rf "docs/figures/$name"
    t=$SECONDS
    uv run python "$name.py" --no-show --out "docs/figures/$name"
    default_times+="${default_times:+, }\"$name\": $((SECONDS - t))"
    t=$SECONDS
    uv run python "$name.py" --quick --no-show --out "$quick_out/$name" >/dev/null
    quick=$((SECONDS - t))
    quick_times+="${quick_times:+, }\"$name\": $quick"
    quick_max=$((quick > quick_max ? quick : quick_max))
done
uv run python docs/render_readme.py  # the suite checks the README against the new results
echo "=== uv run pytest"
t=$SECONDS
pytest_status=0
uv run pytest -q -p no:cacheprovider || pytest_status=$?
pytest_seconds=$((SECONDS - t))
seconds=$((SECONDS - start))
mkdir -p docs/figures/reproduce
awk -v s="$seconds" -v d="$default_times" -v q="$quick_times" -v qm="$quick_max" \
    -v p="$pytest_seconds" 'BEGIN {
        printf "{\"seconds\": %d, \"minutes\": %.2f, \"script_seconds\": {%s}, ", s, s / 60, d
        printf "\"quick_seconds\": {%s}, \"quick_seconds_max\": %d, ", q, qm
        printf "\"pytest_seconds\": %d, \"pytest_minutes\": %.1f}\n", p, p / 60
    }' > docs/figures/reproduce/results.json
uv run python docs/render_readme.py
echo "reproduced everything in $seconds s"
# A failing suite still leaves the measured durations written, then fails the script.
exit "$pytest_status"
