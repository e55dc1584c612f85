"""Client cost of FedPFT (sub-FM) vs FedPETuning (full FM) vs FedOT (emulator): training step time, peak memory
and bytes on the wire, on the offline MiniLM + Rotten Tomatoes preset (or any foundation model).

    python bench/fedpft_client_cost.py [--model all-minilm-l6-v2 | --bert-base] [--steps 20] [--batch-size 16]
                                       [--max-length 64] [--rounds 100] [--align-interval 10]

The server side builds each base (pruning / layer drop only: distillation changes values, not cost) and writes it
as the package a device receives; each device side then runs in its own fresh process, as a device would: rebuild
the base from the package, attach LoRA, train `--steps` AdamW steps on Rotten Tomatoes batches. Step time excludes
a warm-up step. Memory is read from the kernel's RSS counters, with the peak reset (/proc/self/clear_refs) once the
data is ready and again once the model is built: "model" is the resident growth for the built base with LoRA,
"load peak" the transient peak while rebuilding it from the package, "training" the peak above the model during the
AdamW steps (activations, gradients, optimizer state).
The FedPFT paper claims the sub-FM needs about half of the full FM's compute (BERT-base: 81M -> 47M transformer
parameters at ratio 0.75 on 10 of 12 layers). `--bert-base` measures that shape offline: a 12-layer encoder built
from the BERT-base config (hidden 768, FFN 3072; random weights: cost does not depend on them) with the MiniLM
package's tokenizer (the same 30,522-token BERT vocabulary).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DEVICE = r"""
import gc, json, sys, time
import torch
from fedpt_app.classify.data import batches, load_classification_splits
from fedpt_app.classify.inputs import TextInputs
from fedpt_app.classify.models import ModelPackage, lora_classifier
from fedpt_app.models.lora import LoraSpec
from fedpt_app.device.training import train_lora

package_file, model_ref, steps, batch_size, max_length = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
layers = json.loads(sys.argv[6])
def status_mb(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

inputs = TextInputs(model_ref)
rows = load_classification_splits("rotten-tomatoes").train[:(steps + 1) * batch_size]
examples = inputs.encode(rows, max_length)
def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:  # the kernel's peak RSS (VmHWM) restarts from now
        handle.write("5")
    return status_mb("VmRSS")

baseline = reset_peak()
saved = torch.load(package_file, weights_only=True)
model = lora_classifier(ModelPackage(saved["config_json"], saved["state"]).build(), LoraSpec(8, 16.0), 0, layers)
del saved  # the received tensors were copied into the model
common = dict(make_batches=batches, epochs=1, lr=1e-3, batch_size=batch_size, pad_token_id=inputs.pad_token_id,
              seed=0)
gc.collect()
loaded_peak, before_training = status_mb("VmHWM"), reset_peak()
train_lora(model, examples[:batch_size], **common)  # warm-up step
result = train_lora(model, examples[batch_size:], **common)
print(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "model_mb": before_training - baseline, "load_peak_mb": loaded_peak - baseline,
                  "training_mb": status_mb("VmHWM") - before_training,
                  "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
                  "step_seconds": result.seconds / result.steps}))
"""


def build_bases(model_ref: str, ratio: float) -> dict:
    """{name: (base model, LoRA layers or None, FFN update bytes per alignment)} as each algorithm's server builds."""
    from fedpt_app.classify.compression.alignment import ffn_parameters
    from fedpt_app.classify.compression.emulator import EmulatorLayout, build_emulator
    from fedpt_app.classify.compression.ffn import compress, find_ffns, transformer_blocks
    from fedpt_app.classify.models import load_classifier
    from fedpt_app.config import RunConfig

    full = load_classifier(model_ref, 2)
    layers = RunConfig().classify.compressed_layer_indices(len(transformer_blocks(full)))
    sub = copy.deepcopy(full)
    compress(sub, layers, ratio)
    ffn_bytes = 4 * sum(p.numel() for layer in layers for p in ffn_parameters(find_ffns(sub)[layer], with_norms=False))
    layout = EmulatorLayout.choose(len(transformer_blocks(full)))
    return {
        "FedPETuning (full FM)": (full, None, 0),
        f"FedPFT (sub-FM, ratio {ratio})": (sub, None, ffn_bytes),
        f"FedOT (emulator {layout.adapter_layers}+{layout.emulator_layers}+{layout.adapter_layers})": (
            build_emulator(full, layout),
            layout.emulator_adapter_layers,
            0,
        ),
    }


def bert_base_folder(folder: Path) -> str:
    """A 12-layer encoder from the BERT-base config, saved with the MiniLM package's (BERT) tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedpt_app.models.packaged import packaged_folder

    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(packaged_folder("all-minilm-l6-v2")).save_pretrained(folder)
    return str(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--bert-base", action="store_true", help="a 12-layer encoder from the BERT-base config")
    parser.add_argument("--compress-ratio", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=100, help="rounds a client takes part in, for the totals")
    parser.add_argument("--align-interval", type=int, default=10)
    args = parser.parse_args()

    import torch

    from fedpt_app.classify.models import ModelPackage, lora_classifier
    from fedpt_app.models.lora import LoraSpec, adapter_state, to_array_record

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        if args.bert_base:
            args.model = bert_base_folder(Path(folder) / "bert-base")
        for name, (base, lora_layers, ffn_bytes) in build_bases(args.model, args.compress_ratio).items():
            package = ModelPackage.of(base)
            package_file = Path(folder) / "package.pt"
            torch.save({"config_json": package.config_json, "state": dict(package.state)}, package_file)
            adapter = to_array_record(
                adapter_state(lora_classifier(copy.deepcopy(base), LoraSpec(8, 16.0), 0, lora_layers)), "float32"
            ).count_bytes()
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    DEVICE,
                    str(package_file),
                    args.model,
                    str(args.steps),
                    str(args.batch_size),
                    str(args.max_length),
                    json.dumps(lora_layers),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            alignments = args.rounds // args.align_interval if ffn_bytes else 0
            results[name] = {
                **measured,
                "model_bytes": package.to_array_record().count_bytes(),
                "adapter_bytes": adapter,
                "ffn_update_bytes": ffn_bytes,
                "total_bytes": package.to_array_record().count_bytes()
                + 2 * args.rounds * adapter
                + alignments * ffn_bytes,
            }
    reference = results[next(iter(results))]
    shape = "BERT-base config (12 layers)" if args.bert_base else args.model
    print(
        f"Client cost per device, {shape}, batch {args.batch_size} x {args.max_length} tokens, "
        f"{args.steps} steps; bytes over {args.rounds} rounds, FedPFT aligning every {args.align_interval}"
    )
    print(
        "| method | params | trainable | step (s) | vs full | model MB | vs full | load peak MB | training MB | "
        "model down (MB, once) | adapter per round (MB, each way) | FFN update per alignment (MB) | "
        "total (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['params'] / 1e6:.1f}M | {r['trainable'] / 1e3:.0f}K | {r['step_seconds']:.3f} | "
            f"{r['step_seconds'] / reference['step_seconds']:.2f}x | {r['model_mb']:.0f} | "
            f"{r['model_mb'] / reference['model_mb']:.2f}x | {r['load_peak_mb']:.0f} | {r['training_mb']:.0f} | "
            f"{r['model_bytes'] / 1e6:.1f} | {r['adapter_bytes'] / 1e6:.3f} | {r['ffn_update_bytes'] / 1e6:.2f} | "
            f"{r['total_bytes'] / 1e6:.1f} |"
        )
    if any(r["cuda_peak_mb"] for r in results.values()):
        print("CUDA peak MB: " + ", ".join(f"{name} {r['cuda_peak_mb']:.0f}" for name, r in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
