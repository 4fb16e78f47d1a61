#!/usr/bin/env bash
# Reproduce everything: run every script at its default settings, refresh docs/figures/ (the
# PNGs and results.json the README shows), then re-render README.md from those results.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts=(kv_caching positional_embeddings swiglu grouped_query_attention multihead_latent_attention)
start=$SECONDS
for i in "${!scripts[@]}"; do
    name=${scripts[$i]}
    echo "=== [$((i + 1))/${#scripts[@]}] $name.py -> docs/figures/$name/"
    rm -rf "docs/figures/$name"
    uv run python "$name.py" --no-show --out "docs/figures/$name"
done
seconds=$((SECONDS - start))
mkdir -p docs/figures/reproduce
awk -v s="$seconds" 'BEGIN { printf "{\"seconds\": %d, \"minutes\": %.2f}\n", s, s / 60 }' \
    > docs/figures/reproduce/results.json
uv run python docs/render_readme.py
echo "reproduced everything in $seconds s"
