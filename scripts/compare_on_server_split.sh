#!/usr/bin/env bash
# Choose a default on the server split, never on the test split: `fedpt-app compare` of the given algorithm variants
# with every seed's runs evaluated on that seed's own server split of the built-in instruction set (written as JSON
# lines and passed as test-dataset), then one table over all runs (OUTPUT/comparison.md).
# Usage: scripts/compare_on_server_split.sh OUTPUT ALGORITHMS [SEEDS]   (SEEDS default "0 1 2")
# Used for kd-teacher-tail (docs/serving.md#top-k-teacher) and proxy-adapter (docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
output="$1" algorithms="$2" seeds="${3:-0 1 2}"
mkdir -p "$output"
for seed in $seeds; do
  python -c "
import json, sys
from fedpt_app.instruct.data import load_splits
with open(sys.argv[1], 'w') as handle:
    for row in load_splits('builtin', 0.1, int(sys.argv[2]))['server']:
        handle.write(json.dumps(row) + '\n')" "$output/server-split-seed$seed.jsonl" "$seed"
  fedpt-app compare --seeds "$seed" --output "$output" --algorithms "$algorithms" \
    --run-config "test-dataset='$output/server-split-seed$seed.jsonl'"
done
python - "$output" $seeds <<'PY'
import sys
from pathlib import Path
from fedpt_app.tools.compare import read_metrics, write_report

output, seeds = Path(sys.argv[1]), [int(seed) for seed in sys.argv[2:]]
folders = sorted(folder for folder in output.iterdir() if folder.is_dir() and (folder / f"seed{seeds[0]}").is_dir())
runs = {folder.name: {seed: read_metrics(folder / f"seed{seed}") for seed in seeds} for folder in folders}
write_report(runs, output, "instruct", {folder.name: folder.name for folder in folders})
PY
