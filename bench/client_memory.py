"""Client cost per round, FedPT (the device tunes the small model) vs FedAvg-large (it tunes the large one):
peak memory of a client process doing one round of local training, and the bytes it sends and receives.

    python bench/client_memory.py [--run-config "..."] [--num-partitions 4] [--steps 8]

Each side runs in its own fresh process (what a device would run: imports, base model load, LoRA, AdamW steps on
its partition), so peak RSS is not polluted by the other model. CUDA peak is reported where a GPU exists.
The paper reports 36-44% less client memory and 36-40% less traffic for FedPT than for FedAvg-large.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CLIENT = r"""
import json, resource, sys, time
import torch
from fedpt_app.device.partition import PartitionSpec, load_partition
from fedpt_app.device.training import train_lora
from fedpt_app.instruct.data import training_rows
from fedpt_app.instruct.device_task import PARTITION_COLUMN, trained_model
from fedpt_app.instruct.prompts import batches, tokenize_rows
from fedpt_app.models.loading import load_tokenizer
from fedpt_app.models.lora import LoraSpec, adapter_state, lora_model, to_array_record
from fedpt_app.tools.simulation import validate_overrides

run_config, role, partitions, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = validate_overrides(run_config)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
after_imports = rss()
ref, quantization = trained_model(config, role)
data, training = config.data, config.training
spec = PartitionSpec(data.dataset, data.partitioner, partitions, PARTITION_COLUMN, data.dirichlet_alpha,
                     data.classes_per_partition, data.test_fraction, config.seed)
tokenizer = load_tokenizer(ref)
examples, _ = tokenize_rows(tokenizer, load_partition(spec, 0, training_rows), training.max_length,
                            training.max_length)  # prompts are cut only where one alone fills max-length
examples = examples[:steps * training.batch_size]
model = lora_model(ref, LoraSpec.from_settings(config.lora), quantization, config.seed)
began = time.perf_counter()
result = train_lora(model, examples, batches, epochs=1, lr=training.lr, batch_size=training.batch_size,
                    pad_token_id=tokenizer.pad_token_id, seed=0)
payload = to_array_record(adapter_state(model), config.federation.wire_dtype).count_bytes()
print(json.dumps({"model": ref, "params": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "rss_after_imports_mb": after_imports, "peak_rss_mb": rss(),
                  "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
                  "step_seconds": result.seconds / result.steps, "bytes_per_round": 2 * payload}))
"""


def measure(run_config: str, role: str, partitions: int, steps: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, run_config, role, str(partitions), str(steps)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"The {role} client failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--num-partitions", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    sides = {
        "fedpt (small)": measure(args.run_config, "small", args.num_partitions, args.steps),
        "fedavg-large (large)": measure(args.run_config, "large", args.num_partitions, args.steps),
    }
    print(
        f"{'client':<22}{'params':>12}{'trainable':>11}{'peak RSS MB':>13}{'model+train MB':>16}"
        f"{'CUDA peak MB':>14}{'s/step':>8}{'bytes/round':>13}"
    )
    for name, m in sides.items():
        print(
            f"{name:<22}{m['params']:>12,}{m['trainable']:>11,}{m['peak_rss_mb']:>13.0f}"
            f"{m['peak_rss_mb'] - m['rss_after_imports_mb']:>16.0f}{m['cuda_peak_mb']:>14.0f}"
            f"{m['step_seconds']:>8.3f}{m['bytes_per_round']:>13,}"
        )
    small, large = sides["fedpt (small)"], sides["fedavg-large (large)"]
    saving = lambda key: 100 * (1 - small[key] / large[key]) if large[key] else 0.0  # noqa: E731
    above_imports = lambda m: m["peak_rss_mb"] - m["rss_after_imports_mb"]  # noqa: E731
    print(
        f"\nFedPT vs FedAvg-large: peak RSS -{saving('peak_rss_mb'):.0f}%, "
        f"model+training memory -{100 * (1 - above_imports(small) / max(above_imports(large), 1e-9)):.0f}%, "
        f"traffic -{saving('bytes_per_round'):.0f}%"
        + (f", CUDA peak -{saving('cuda_peak_mb'):.0f}%" if large["cuda_peak_mb"] else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
