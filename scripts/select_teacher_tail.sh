#!/usr/bin/env bash
# Choose kd-teacher-tail on the server split, never on the test split (docs/serving.md#top-k-teacher): FedPT with a
# top-20 teacher under each tail, every seed's run evaluated on that seed's own server split, 3 seeds.
# Usage: scripts/select_teacher_tail.sh [OUTPUT]   (default ~/fedpt-app-runs/topk-tail-server-split)
set -euo pipefail
cd "$(dirname "$0")/.."
output="${1:-$HOME/fedpt-app-runs/topk-tail-server-split}"
mkdir -p "$output"
for seed in 0 1 2; do
  python -c "
import json, sys
from fedpt_app.instruct.data import load_splits
with open(sys.argv[1], 'w') as handle:
    for row in load_splits('builtin', 0.1, int(sys.argv[2]))['server']:
        handle.write(json.dumps(row) + '\n')" "$output/server-split-seed$seed.jsonl" "$seed"
  fedpt-app compare --seeds "$seed" --output "$output" \
    --algorithms "fedpt[kd-teacher-top-k=20 kd-teacher-tail='drop'],fedpt[kd-teacher-top-k=20 kd-teacher-tail='uniform'],fedpt[kd-teacher-top-k=20 kd-teacher-tail='union']" \
    --run-config "test-dataset='$output/server-split-seed$seed.jsonl'"
done
python - "$output" <<'PY'
import sys
from pathlib import Path
from fedpt_app.tools.compare import read_metrics, write_report

output = Path(sys.argv[1])
folders = sorted(folder for folder in output.iterdir() if folder.is_dir() and folder.name.startswith("fedpt"))
runs = {folder.name: {seed: read_metrics(folder / f"seed{seed}") for seed in (0, 1, 2)} for folder in folders}
write_report(runs, output, "instruct", {folder.name: folder.name for folder in folders})
PY
