"""FedPT's server round: distillation with the round-invariant teacher cache vs recomputing the teacher vs the
student's training alone (teacher logits already in memory), measured side by side in one process.

    python bench/teacher_cache.py [--run-config "..."] [--rounds 3]

Uses the configured pair and server split (default: the tiny preset, the whole server split, kd-steps 20).
Target: a cached round costs at most 1.5x the student alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedpt_app.instruct.data import load_splits
from fedpt_app.instruct.distill import DistillConfig, ProxyDistiller
from fedpt_app.instruct.prompts import collate, tokenize_rows
from fedpt_app.instruct.proxy import LocalLogitsProvider, shared_vocab_size
from fedpt_app.models.loading import load_tokenizer
from fedpt_app.models.lora import LoraSpec, adapter_state, load_adapter_state, lora_model
from fedpt_app.tools.simulation import validate_overrides


class StudentOnly(ProxyDistiller):
    """The same round with the teacher logits handed over from memory: the floor any teacher can reach."""

    def __init__(self, *args, teachers: dict, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teachers = teachers

    def teacher(self, indices, batch):
        return self.teachers[tuple(indices)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = validate_overrides(args.run_config)
    torch.manual_seed(config.seed)
    instruct = config.instruct
    tokenizer = load_tokenizer(instruct.small_model)
    small = lora_model(instruct.small_model, LoraSpec.from_settings(config.lora), seed=config.seed)
    large = LocalLogitsProvider(
        instruct.large_model,
        shared_vocab_size(instruct.small_model, instruct.large_model),
        instruct.large_model_quantization,
    )
    rows = load_splits(config.data.dataset, config.data.test_fraction, config.seed)["server"]
    examples = tokenize_rows(
        tokenizer, rows[: instruct.kd_samples] if instruct.kd_samples else rows, config.training.max_length
    )
    distill = DistillConfig(
        instruct.proxy_alpha,
        instruct.kd_temperature,
        instruct.kd_steps,
        instruct.kd_lr,
        instruct.kd_batch_size,
        config.seed,
    )
    generator = torch.Generator().manual_seed(1)
    start = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in adapter_state(small).items()}

    def build(mode: str, **extra) -> tuple[ProxyDistiller, float]:
        began = time.perf_counter()
        cls = StudentOnly if extra else ProxyDistiller
        distiller = cls(
            small, large, examples, distill, tokenizer.pad_token_id, mode, 1e9, config.output_path(), **extra
        )
        return distiller, time.perf_counter() - began

    cached, cache_build = build("memory")
    recompute, _ = build("off")
    load_adapter_state(small, start)
    teachers = {
        tuple(ix): cached.teacher(ix, collate([examples[i] for i in ix], tokenizer.pad_token_id))
        for r in range(1, args.rounds + 1)
        for ix in cached.batch_indices(r)
    }
    student, _ = build("off", teachers=teachers)
    timings = {name: [] for name in ("student alone", "cached teacher", "recomputed teacher")}
    for server_round in range(1, args.rounds + 1):  # interleaved, so drift hits all three alike
        for name, distiller in (
            ("student alone", student),
            ("cached teacher", cached),
            ("recomputed teacher", recompute),
        ):
            timings[name].append(distiller.run_round(server_round, start).seconds)
    floor = statistics.median(timings["student alone"])
    print(
        f"pair {instruct.small_model} / {instruct.large_model}; {len(examples)} distillation examples, "
        f"{distill.steps} steps x batch {distill.batch_size}; cache {cached.cache.nbytes / 2**20:.1f} MB "
        f"built once in {cache_build:.2f} s"
    )
    print(f"{'server round':<22}{'median s':>10}{'x student alone':>18}")
    for name, values in timings.items():
        print(f"{name:<22}{statistics.median(values):>10.3f}{statistics.median(values) / floor:>18.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
