#!/usr/bin/env bash
# The Qwen2.5-Coder world-facts comparison (docs/results.md) on a GPU, with the large model in 4-bit (bitsandbytes
# NF4), then the CUDA peak memory of each device role: the clients (they tune the 0.5B model, or the 1.5B one for
# fedavg-large) and the server (the large model for evaluation and the teacher, the small one for distillation).
#   scripts/gpu_world_facts.sh [OUTPUT_DIR]   (SEEDS=0,1 CLIENT_GPUS=0.25 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh
python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
  echo "[gpu_world_facts] no CUDA device visible to torch" >&2
  exit 1
}
OUTPUT="${1:-$HOME/fedpt-app-runs/compare-world-facts-gpu}"
fedpt-app fetch-models qwen2.5-coder-gguf
fedpt-app compare --algorithms fedavg,fedavg-pt,fedpt,fedavg-large --seeds "${SEEDS:-0,1}" \
  --client-gpus "${CLIENT_GPUS:-0.25}" --output "$OUTPUT" \
  --run-config "preset='qwen2.5-coder-gguf' dataset='world-facts' partitioner='iid' large-model-quantization='4bit' \
num-server-rounds=3 local-steps=8 batch-size=4 lr=0.001 max-length=48 max-new-tokens=12 kd-steps=8 kd-batch-size=8 \
kd-samples=64 eval-batch-size=72"
python - "$OUTPUT" <<'EOF'
import json, pathlib, sys

print(f"{'algorithm':14}{'device tunes':>14}{'client CUDA peak MB':>21}{'server CUDA peak MB':>21}")
for folder in sorted(path for path in pathlib.Path(sys.argv[1]).iterdir() if path.is_dir()):
    rows = [json.loads(line) for run in folder.glob("seed*") for line in (run / "metrics.jsonl").open()]
    client = max((row.get("client_cuda_peak_mb", 0.0) for row in rows), default=0.0)
    server = max((row.get("server_cuda_peak_mb", 0.0) for row in rows), default=0.0)
    tunes = "1.5B (4-bit)" if folder.name == "fedavg-large" else "0.5B"
    print(f"{folder.name:14}{tunes:>14}{client:>21,.0f}{server:>21,.0f}")
EOF
