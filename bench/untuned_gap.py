"""Before any tuning: how much more the large model knows than the small one on a dataset's test split, and whether
holding the large model in bfloat16 changes its answers (and how much faster it is).

    python bench/untuned_gap.py --run-config "preset='qwen2.5-coder-gguf' dataset='world-facts'" --max-new-tokens 24

Prints, per model (the untuned small, the untuned large in float32 and in bfloat16): Rouge-L, exact match, the share
of answers that contain the reference (per category too), the decoding time, and the share of the large model's
answers that bfloat16 leaves unchanged. Greedy decoding with the project's evaluation code; untuned models write
whole sentences, so `--max-new-tokens` should leave room for one.
"""

from __future__ import annotations

import argparse
import gc
import time

from fedpt_app.instruct.data import load_test_rows
from fedpt_app.instruct.decoding import DecodingConfig, end_token_ids, model_step
from fedpt_app.instruct.evaluation import contains_reference, evaluate_generation
from fedpt_app.instruct.prompts import build_prompt
from fedpt_app.instruct.proxy import LocalLogitsProvider, large_only_step, shared_vocab_size
from fedpt_app.models.loading import load_causal_lm, load_tokenizer
from fedpt_app.tools.simulation import validate_overrides


def by_category(rows, predictions) -> str:
    hits: dict[str, list[bool]] = {}
    for row, prediction in zip(rows, predictions, strict=True):
        hits.setdefault(row["category"], []).append(contains_reference(prediction, row["response"]))
    return " ".join(f"{name} {100.0 * sum(values) / len(values):.1f}" for name, values in sorted(hits.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="preset='qwen2.5-coder-gguf' dataset='world-facts'")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", default="small,float32,bfloat16", help="which of the three to evaluate")
    args = parser.parse_args()
    config = validate_overrides(args.run_config)
    instruct, data = config.instruct, config.data
    rows = load_test_rows(data.dataset, data.test_dataset, data.test_fraction, config.seed)
    tokenizer = load_tokenizer(instruct.small_model)
    prompts = [build_prompt(row["instruction"], row["context"]) for row in rows]
    references = [row["response"] for row in rows]
    vocab = shared_vocab_size(instruct.small_model, instruct.large_model)
    setups = {
        "small (untuned)": lambda: model_step(load_causal_lm(instruct.small_model), len(tokenizer)),
        "large (untuned, float32)": lambda: large_only_step(LocalLogitsProvider(instruct.large_model, vocab)),
        "large (untuned, bfloat16)": lambda: large_only_step(LocalLogitsProvider(instruct.large_model, vocab, "bf16")),
    }
    ends = end_token_ids(load_causal_lm(instruct.small_model), load_causal_lm(instruct.large_model))
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, end_token_ids=ends)
    print(f"{config.data.dataset}: {len(rows)} test rows, {args.max_new_tokens} new tokens, seed {config.seed}")
    print(f"{'model':32}{'Rouge-L':>9}{'exact':>8}{'contains':>10}{'seconds':>9}  contains by category")
    answers = {}
    wanted = args.models.split(",")
    for name, new_step in setups.items():
        if not any(model in name for model in wanted):
            continue
        load_causal_lm.cache_clear()  # one model in memory at a time (the loader caches every model it loads)
        gc.collect()
        new_step()  # loaded before the clock starts
        started = time.perf_counter()
        scores = evaluate_generation(
            new_step, tokenizer, prompts, references, decoding=decoding, batch_size=args.batch_size
        )
        seconds = time.perf_counter() - started
        answers[name] = scores.predictions
        print(
            f"{name:32}{scores.rouge_l:>9.1f}{scores.exact_match:>8.1f}{scores.contains:>10.1f}{seconds:>9.0f}  "
            + by_category(rows, scores.predictions),
            flush=True,
        )
    if len(answers) < 3:
        return
    full, half = (answers[name] for name in list(answers)[1:])
    same = sum(a == b for a, b in zip(full, half, strict=True))
    print(f"bfloat16 leaves {same} of {len(rows)} large-model answers unchanged ({100.0 * same / len(rows):.1f}%)")


if __name__ == "__main__":
    main()
