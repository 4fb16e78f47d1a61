#!/usr/bin/env bash
# Reproduce everything: run every script at its default settings, refresh docs/figures/ (the
# PNGs and results.json the README shows), record how long each took, then re-render README.md
# from those results.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts=(kv_caching positional_embeddings swiglu grouped_query_attention multihead_latent_attention tokenization training)
start=$SECONDS
timings=""
for i in "${!scripts[@]}"; do
    name=${scripts[$i]}
    echo "=== [$((i + 1))/${#scripts[@]}] $name.py -> docs/figures/$name/"
    rm -rf "docs/figures/$name"
    script_start=$SECONDS
    uv run python "$name.py" --no-show --out "docs/figures/$name"
    timings+="${timings:+, }\"$name\": $((SECONDS - script_start))"
done
seconds=$((SECONDS - start))
mkdir -p docs/figures/reproduce
awk -v s="$seconds" -v t="$timings" \
    'BEGIN { printf "{\"seconds\": %d, \"minutes\": %.2f, \"script_seconds\": {%s}}\n", s, s / 60, t }' \
    > docs/figures/reproduce/results.json
uv run python docs/render_readme.py
echo "reproduced everything in $seconds s"
