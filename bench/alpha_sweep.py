"""Proxy quality against the proxy strength (the FedPT paper's Figure 4): a finished run's final adapter, the
proxy-tuned large model decoded on the test split (or the server split) for each `proxy-alpha`.

    python bench/alpha_sweep.py --run ~/fedpt-app-runs/compare-world-facts/fedpt/seed-0 --alphas 0,0.5,1,1.5,2
        [--split test|server]

alpha 0 is the untuned large model itself. The run's own evaluation settings are used (test rows, generation length,
prompt cut, the large model's quantization); the table is printed and, with `--plot`, drawn. The run's alpha was
not chosen from this sweep: read it as a sensitivity curve, not as a tuned setting (it is measured on the test split).
To choose an alpha, sweep `--split server` (the server's own rows, never the test split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft import PeftModel

from fedpt_app.config import RunConfig
from fedpt_app.instruct.data import load_splits, load_test_rows
from fedpt_app.instruct.decoding import DecodingConfig, end_token_ids
from fedpt_app.instruct.evaluation import evaluate_generation
from fedpt_app.instruct.prompts import covering_length, fit_prompt
from fedpt_app.instruct.proxy import large_only_step, proxy_step
from fedpt_app.models.loading import load_causal_lm, load_tokenizer
from fedpt_app.serving.providers import load_logits_provider


def run_config(run: Path) -> RunConfig:
    saved = json.loads((run / "config.json").read_text())
    return RunConfig.from_mapping({key.replace("_", "-"): value for key, value in saved.items()})


def plot(alphas: list[float], scores: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(5, 3.5))
    for metric, values in scores.items():
        axes.plot(alphas, values, marker="o", label=metric)
    axes.set_xlabel("proxy-alpha")
    axes.set_ylabel("score (%)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    print(f"plot: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished FedPT or FedAvg+PT run's output-dir")
    parser.add_argument("--alphas", default="0,0.5,1,1.5,2")
    parser.add_argument("--split", choices=("test", "server"), default="test", help="the rows to score")
    parser.add_argument("--plot", default="", help="write the curve to this PNG file")
    args = parser.parse_args()
    run = Path(args.run).expanduser()
    config = run_config(run)
    instruct, data = config.instruct, config.data
    tokenizer = load_tokenizer(instruct.small_model)
    small = PeftModel.from_pretrained(load_causal_lm(instruct.small_model), run / "adapter").eval()
    large = load_logits_provider(
        instruct.small_model, instruct.large_model, instruct.large_model_quantization, tokenizer
    )
    server = load_splits(data.dataset, data.test_fraction, config.seed)["server"]
    rows = server
    if args.split == "test":
        rows = load_test_rows(
            data.dataset, data.test_dataset, data.test_fraction, config.seed, config.evaluation.eval_samples
        )
    length = instruct.max_new_tokens or covering_length(tokenizer, server)
    budget = config.training.max_length - length
    prompts = [fit_prompt(tokenizer, row["instruction"], row["context"], budget)[0] for row in rows]
    references = [row["response"] for row in rows]
    decoding = DecodingConfig(max_new_tokens=length, end_token_ids=tuple({*end_token_ids(small), *large.end_token_ids}))
    alphas = [float(value) for value in args.alphas.split(",")]
    print(
        f"run {run} ({config.algorithm}, seed {config.seed}, its alpha {instruct.proxy_alpha}); "
        f"{len(rows)} {args.split} rows"
    )
    print(f"{'alpha':>6}{'Rouge-L':>9}{'exact':>8}{'contains':>10}")
    scores: dict[str, list[float]] = {"Rouge-L": [], "exact match": [], "contains": []}
    for alpha in alphas:
        new_step = (
            (lambda: large_only_step(large)) if alpha == 0 else (lambda alpha=alpha: proxy_step(large, small, alpha))
        )
        result = evaluate_generation(
            new_step,
            tokenizer,
            prompts,
            references,
            decoding=decoding,
            batch_size=config.evaluation.eval_batch_size,
        )
        for metric, value in zip(scores, (result.rouge_l, result.exact_match, result.contains), strict=True):
            scores[metric].append(value)
        print(f"{alpha:>6g}{result.rouge_l:>9.1f}{result.exact_match:>8.1f}{result.contains:>10.1f}", flush=True)
    if args.plot:
        plot(alphas, scores, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
