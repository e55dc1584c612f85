"""Load on `fedpt-app serve`: N concurrent clients send a fixed number of completions to a real uvicorn server
on loopback, once with request batching (--max-batch) and once without (max-batch 1), side by side.

    python bench/serve_load.py [--run DIR | --small S --large L --adapter A] [--model proxy|small|large]
                               [--clients 8] [--requests 64] [--max-tokens 32] [--max-batch 8]
                               [--batch-wait-ms 5] [--repeats 1]

Without --run or the model flags: the default preset's pair (--run-config overrides) with a random adapter, as
bench/proxy_decoding.py does. Greedy, so both settings must give the same answers (checked). Errors must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass

import openai
import torch

from fedpt_app.instruct.data import load_test_rows
from fedpt_app.instruct.prompts import build_prompt
from fedpt_app.serving.background import serve_in_background
from fedpt_app.serving.batched_generation import ServedModel
from fedpt_app.serving.openai_api import create_app, load_served_model
from fedpt_app.serving.openai_schema import ServerSettings
from fedpt_app.tools.simulation import validate_overrides


@dataclass
class LoadResult:
    errors: int
    latencies: list[float]
    tokens: int
    seconds: float
    answers: list[str | None]
    batch_sizes: list[int]

    def row(self, name: str) -> str:
        p50, p99 = percentile(self.latencies, 50), percentile(self.latencies, 99)
        batch = statistics.mean(self.batch_sizes) if self.batch_sizes else float("nan")
        rate = self.tokens / self.seconds
        return f"{name:<14}{self.errors:>7}{1000 * p50:>10.0f}{1000 * p99:>10.0f}{rate:>11.1f}{batch:>12.1f}"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def median_run(results: list[LoadResult]) -> LoadResult:
    return sorted(results, key=lambda result: result.tokens / result.seconds)[len(results) // 2]


def random_adapter_models(run_config: str, folder: str) -> tuple[str, str, str, float]:
    """The preset's pair with a small random adapter saved to `folder` (what a run would have tuned)."""
    from fedpt_app.models.lora import LoraSpec, adapter_state, load_adapter_state, lora_model

    instruct = (config := validate_overrides(run_config)).instruct
    small = lora_model(instruct.small_model, LoraSpec.from_settings(config.lora), seed=config.seed)
    generator = torch.Generator().manual_seed(0)
    load_adapter_state(
        small, {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in adapter_state(small).items()}
    )
    small.save_pretrained(folder)
    return instruct.small_model, instruct.large_model, folder, instruct.proxy_alpha


def served_model(args: argparse.Namespace, folder: str) -> ServedModel:
    if args.run or args.small or args.large:
        from fedpt_app.tools.serving_commands import _serve_models

        small, large, adapter = _serve_models(args)
        return load_served_model(args.model, small, large, adapter, alpha=args.alpha)
    small, large, adapter, alpha = random_adapter_models(args.run_config, folder)
    return load_served_model(args.model, small, large, adapter, alpha=alpha)


async def load(base_url: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> tuple:
    """`clients` workers take the prompts in turn; (errors, latencies, completion tokens, seconds, answers)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    answers: list[str | None] = [None] * len(prompts)
    latencies: list[float] = []
    counts = {"errors": 0, "tokens": 0}
    pending = iter(range(len(prompts)))

    async def worker() -> None:
        for index in pending:
            began = time.perf_counter()
            try:
                answer = await client.completions.create(
                    model=model, prompt=prompts[index], max_tokens=max_tokens, temperature=0, stop=["###"]
                )
            except openai.OpenAIError as error:
                counts["errors"] += 1
                print(f"  request {index} failed: {error}")
                continue
            latencies.append(time.perf_counter() - began)
            counts["tokens"] += answer.usage.completion_tokens
            answers[index] = answer.choices[0].text

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - began
    await client.close()
    return counts["errors"], latencies, counts["tokens"], seconds, answers


def measure(model: ServedModel, prompts: list[str], args: argparse.Namespace, max_batch: int) -> LoadResult:
    app = create_app(model, ServerSettings(max_batch=max_batch, batch_wait_ms=args.batch_wait_ms))
    with serve_in_background(app) as root:
        base_url = f"{root}/v1"
        asyncio.run(load(base_url, model.name, prompts[:2], 2, 4))  # warm-up
        scheduler = app.state.service.scheduler
        warm = len(scheduler.batch_sizes)
        errors, latencies, tokens, seconds, answers = asyncio.run(
            load(base_url, model.name, prompts, args.clients, args.max_tokens)
        )
        return LoadResult(errors, latencies, tokens, seconds, answers, scheduler.batch_sizes[warm:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="", help="a finished run's output-dir")
    parser.add_argument("--small", default="")
    parser.add_argument("--large", default="")
    parser.add_argument("--adapter", default="")
    parser.add_argument("--model", choices=("proxy", "small", "large"), default="proxy")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--run-config", default="", help="overrides for the default preset's pair")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; the median one (by tokens/s) shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder:
        model = served_model(args, folder)
        data = validate_overrides(args.run_config)
        rows = load_test_rows(data.data.dataset, data.data.test_dataset, data.data.test_fraction, data.seed)
        prompts = [build_prompt(row["instruction"], row.get("context", "")) for row in rows]
        prompts = [prompts[i % len(prompts)] for i in range(args.requests)]
        print(
            f"serve_load: {model.name}, {args.requests} requests from {args.clients} clients, max_tokens "
            f"{args.max_tokens}, greedy, batch wait {args.batch_wait_ms:g} ms, {torch.get_num_threads()} threads"
        )
        runs: dict[int, list[LoadResult]] = {args.max_batch: [], 1: []}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both settings alike
            for max_batch, results in runs.items():
                results.append(measure(model, prompts, args, max_batch))
        batched, single = (median_run(results) for results in runs.values())
    print(f"{'':14}{'errors':>7}{'p50 ms':>10}{'p99 ms':>10}{'tokens/s':>11}{'mean batch':>12}")
    print(batched.row(f"max-batch {args.max_batch}"))
    print(single.row("max-batch 1"))
    same = sum(a == b for a, b in zip(batched.answers, single.answers, strict=True) if a is not None)
    print(
        f"batching speed-up: tokens/s x{(batched.tokens / batched.seconds) / (single.tokens / single.seconds):.2f}, "
        f"p50 latency x{percentile(single.latencies, 50) / percentile(batched.latencies, 50):.2f}; "
        f"same answers {same}/{args.requests}"
    )
    errors = sum(result.errors for results in runs.values() for result in results)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
