"""Speculative proxy decoding throughput: the tuned small model drafts --draft-tokens tokens, one large forward and one
merged small forward verify them, vs plain proxy decoding (one large forward per token).

    python bench/speculative_decoding.py [--run-config "..."] [--adapter RUN/adapter | --tune-steps N]
        [--new-tokens 128] [--batch-sizes 1,8] [--draft-tokens 4] [--drafter float32,bfloat16]

Both decode the same prompts for exactly --new-tokens tokens (EOS ignored, no stop strings), greedy, in interleaved
repeats; the speed-up is the median of the per-repeat ratios. --drafter lists the drafters to measure side by side:
`float32` is the tuned small itself, `bfloat16` a merged bfloat16 copy of it (`bfloat16_drafter`); the proxy that
verifies the drafts is the same float32 computation in every variant. A random adapter drafts poorly (the proxy
rarely agrees with it): pass a finished run's trained adapter for a realistic acceptance rate.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
from peft import PeftModel

from fedpt_app.instruct.data import load_splits, load_test_rows
from fedpt_app.instruct.decoding import DecodingConfig, decode
from fedpt_app.instruct.prompts import batches, build_prompt, tokenize_rows
from fedpt_app.instruct.proxy import LocalLogitsProvider, proxy_step, shared_vocab_size
from fedpt_app.instruct.speculative import SpeculativeStats, bfloat16_drafter, speculative_decode
from fedpt_app.models.loading import load_causal_lm, load_tokenizer
from fedpt_app.models.lora import LoraSpec, adapter_state, load_adapter_state, lora_model
from fedpt_app.tools.simulation import validate_overrides


def tuned_small(config, adapter_dir: str, tune_steps: int) -> tuple[PeftModel, str]:
    """The small model with the saved adapter in `adapter_dir`, or LoRA-tuned here for `tune_steps` steps on the
    train split (a drafter that learned the task's answer format), or else with a small random adapter; and which."""
    instruct = config.instruct
    if adapter_dir:
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise SystemExit(f"--adapter {adapter_dir!r} is not a saved peft adapter folder (no adapter_config.json)")
        return PeftModel.from_pretrained(load_causal_lm(instruct.small_model), adapter_dir).eval(), adapter_dir
    small = lora_model(instruct.small_model, LoraSpec.from_settings(config.lora), seed=config.seed)
    if tune_steps:
        tune(small, config, tune_steps)
        return small.eval(), f"LoRA-tuned here for {tune_steps} steps of 8 on the train split (lr {config.training.lr})"
    generator = torch.Generator().manual_seed(0)
    load_adapter_state(
        small, {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in adapter_state(small).items()}
    )
    return small.eval(), "random (a poor drafter: pass --adapter or --tune-steps for a trained one)"


def tune(small: PeftModel, config, steps: int) -> None:
    tokenizer = load_tokenizer(config.instruct.small_model)
    rows = load_splits(config.data.dataset, config.data.test_fraction, config.seed)["train"]
    examples, _ = tokenize_rows(tokenizer, rows, config.training.max_length, config.training.max_length // 2)
    optimizer = torch.optim.AdamW([p for p in small.parameters() if p.requires_grad], lr=config.training.lr)
    small.train()
    one_pass = batches(examples, 8, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    for batch in itertools.islice(one_pass, steps):
        small(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--adapter", default="", help="a saved peft adapter folder of the small model (RUN/adapter)")
    parser.add_argument("--tune-steps", type=int, default=0, help="without --adapter: LoRA-tune the small here first")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--drafter", default="float32", help="comma-separated: float32 (the tuned small), bfloat16")
    parser.add_argument("--repeats", type=int, default=3, help="median over this many interleaved runs")
    args = parser.parse_args()
    config = validate_overrides(args.run_config)
    instruct, data = config.instruct, config.data
    tokenizer = load_tokenizer(instruct.small_model)
    small, adapter = tuned_small(config, args.adapter, args.tune_steps)
    large = LocalLogitsProvider(
        instruct.large_model,
        shared_vocab_size(instruct.small_model, instruct.large_model),
        instruct.large_model_quantization,
    )
    alpha = instruct.proxy_alpha
    rows = load_test_rows(data.dataset, data.test_dataset, data.test_fraction, config.seed)
    decoding = DecodingConfig(max_new_tokens=args.new_tokens, stop_strings=(), ignore_eos=True)
    print(
        f"pair {instruct.small_model} / {instruct.large_model}, alpha {alpha}, adapter {adapter}\n"
        f"{args.new_tokens} new tokens, greedy, {args.draft_tokens} draft tokens, "
        f"{torch.get_num_threads()} threads, device {next(small.parameters()).device}"
    )
    builders = {"float32": lambda: None, "bfloat16": lambda: bfloat16_drafter(small)}
    if not set(args.drafter.split(",")) <= set(builders):
        raise SystemExit(f"--drafter {args.drafter!r}: choose among {', '.join(builders)}")
    drafters = {name: builders[name]() for name in args.drafter.split(",")}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        prompts = [build_prompt(row["instruction"], row.get("context", "")) for row in rows[:batch_size]]
        warm_up = DecodingConfig(max_new_tokens=4)
        decode(proxy_step(large, small, alpha), tokenizer, prompts, warm_up)
        options = {"alpha": alpha, "draft_tokens": args.draft_tokens}
        for drafter in drafters.values():
            speculative_decode(large, small, tokenizer, prompts, warm_up, drafter=drafter, **options)
        plain_rates, fast_rates = [], {name: [] for name in drafters}
        stats = {name: SpeculativeStats() for name in drafters}
        identical = dict.fromkeys(drafters, True)
        for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
            began = time.perf_counter()
            plain = decode(proxy_step(large, small, alpha), tokenizer, prompts, decoding)
            plain_rates.append(batch_size * args.new_tokens / (time.perf_counter() - began))
            for name, drafter in drafters.items():
                began = time.perf_counter()
                fast, run_stats = speculative_decode(
                    large, small, tokenizer, prompts, decoding, drafter=drafter, **options
                )
                fast_rates[name].append(batch_size * args.new_tokens / (time.perf_counter() - began))
                stats[name].add(run_stats)
                identical[name] &= fast == plain
        print(f"\nbatch {batch_size}: {'variant':<30}{'tokens/s':>10}")
        print(f"{'':9}{'plain proxy':<30}{statistics.median(plain_rates):>10.1f}")
        for name in drafters:
            speed_up = statistics.median(spec / base for spec, base in zip(fast_rates[name], plain_rates, strict=True))
            print(f"{'':9}{f'speculative, {name} drafter':<30}{statistics.median(fast_rates[name]):>10.1f}")
            print(
                f"{'':11}speed-up {speed_up:.2f}x, acceptance {stats[name].acceptance_rate:.0%}, "
                f"{args.repeats * args.new_tokens / stats[name].target_forwards:.2f} tokens per large forward, "
                f"greedy outputs identical: {'yes' if identical[name] else 'NO'}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
