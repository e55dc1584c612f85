"""Proxy decoding throughput: the KV-cached, merged proxy step vs the large model alone, vs large + one small
forward per token (the target's reference), and vs the naive three-model loop without KV cache.

    python bench/proxy_decoding.py [--run-config "..."] [--new-tokens 128] [--batch-sizes 1,8]

Every variant decodes the same prompts for exactly --new-tokens tokens (EOS ignored), greedy.
Targets: proxy >= 0.85 x (large + one small forward); the speed-up over the naive loop at 128 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedpt_app.instruct.data import load_test_rows
from fedpt_app.instruct.decoding import DecodingConfig, decode, model_step
from fedpt_app.instruct.prompts import build_prompt
from fedpt_app.instruct.proxy import (
    LocalLogitsProvider,
    large_only_step,
    naive_proxy_step,
    proxy_step,
    shared_vocab_size,
)
from fedpt_app.models.loading import load_tokenizer
from fedpt_app.models.lora import LoraSpec, adapter_state, load_adapter_state, lora_model
from fedpt_app.tools.simulation import validate_overrides


def large_plus_small_step(large, small):
    """The reference cost: the large model and ONE small forward per token, both KV-cached."""
    large_step, small_step = large_only_step(large), model_step(small, large.vocab_size)

    def step(input_ids, attention_mask, position_ids):
        return (
            large_step(input_ids, attention_mask, position_ids)
            + small_step(input_ids, attention_mask, position_ids)[:, : large.vocab_size]
        )

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=3, help="median over this many interleaved runs")
    args = parser.parse_args()
    config = validate_overrides(args.run_config)
    instruct, data = config.instruct, config.data
    tokenizer = load_tokenizer(instruct.small_model)
    small = lora_model(instruct.small_model, LoraSpec.from_settings(config.lora), seed=config.seed)
    generator = torch.Generator().manual_seed(0)
    load_adapter_state(
        small, {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in adapter_state(small).items()}
    )
    small.eval()
    large = LocalLogitsProvider(
        instruct.large_model,
        shared_vocab_size(instruct.small_model, instruct.large_model),
        instruct.large_model_quantization,
    )
    rows = load_test_rows(data.dataset, data.test_dataset, data.test_fraction, config.seed)
    decoding = DecodingConfig(max_new_tokens=args.new_tokens, stop_strings=(), ignore_eos=True)
    variants = {
        "large alone": lambda: large_only_step(large),
        "large + 1 small fwd": lambda: large_plus_small_step(large, small),
        "proxy (merged, KV)": lambda: proxy_step(large, small, instruct.proxy_alpha),
        "naive proxy (no KV)": lambda: naive_proxy_step(large, small, instruct.proxy_alpha),
    }
    print(
        f"pair {instruct.small_model} / {instruct.large_model}, {args.new_tokens} new tokens, greedy, "
        f"{torch.get_num_threads()} threads, device {next(small.parameters()).device}"
    )
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        prompts = [build_prompt(row["instruction"], row.get("context", "")) for row in rows[:batch_size]]
        decode(proxy_step(large, small, 1.0), tokenizer, prompts, DecodingConfig(max_new_tokens=4))  # warm-up
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
            for name, new_step in variants.items():
                began = time.perf_counter()
                outputs = decode(new_step(), tokenizer, prompts, decoding)
                samples[name].append(batch_size * args.new_tokens / (time.perf_counter() - began))
                assert len(outputs) == batch_size
        rates = {name: statistics.median(values) for name, values in samples.items()}
        reference = rates["large + 1 small fwd"]
        print(f"\nbatch {batch_size}: {'variant':<22}{'tokens/s':>10}{'x large+1 small':>17}{'x large alone':>15}")
        for name, rate in rates.items():
            print(f"{'':9}{name:<22}{rate:>10.1f}{rate / reference:>17.2f}{rate / rates['large alone']:>15.2f}")
        print(
            f"{'':9}speed-up of the proxy over the naive loop: "
            f"{rates['proxy (merged, KV)'] / rates['naive proxy (no KV)']:.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
