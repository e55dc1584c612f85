"""How much each evaluation fix moves a finished run's scores: its final adapter evaluated under the old protocol,
then with each fix added in turn (same models, same seed).

    python bench/evaluation_fixes.py --run ~/fedpt-app-runs/fedpt-tiny-seed0 [--models small,proxy]

Old protocol: the first 90 rows of the test split, 24 new tokens, stop only at the tokenizer's EOS (or `###`),
plain decoding over every logit row, prompts never cut. Fixes, cumulatively: + every end token of the generation
configs, + plain decoding over the tokenizer's vocabulary, + prompts cut by the training rule, + the whole test split,
+ the covering generation length (95% of the server split's references).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft import PeftModel

from fedpt_app.config import RunConfig
from fedpt_app.instruct.data import load_splits, load_test_rows
from fedpt_app.instruct.decoding import DecodingConfig, end_token_ids, model_step
from fedpt_app.instruct.evaluation import evaluate_generation
from fedpt_app.instruct.prompts import build_prompt, covering_length, fit_prompt
from fedpt_app.instruct.proxy import LocalLogitsProvider, proxy_step, shared_vocab_size
from fedpt_app.models.loading import load_causal_lm, load_tokenizer

STEPS = (
    "old protocol",
    "+ every end token",
    "+ vocabulary cut",
    "+ long prompts cut by the training rule",
    "+ whole test split",
    "+ covering generation length",
)


def settings(step: int, config: RunConfig, tokenizer, ends: tuple[int, ...]) -> dict:
    instruct, data = config.instruct, config.data
    server = load_splits(data.dataset, data.test_fraction, config.seed)["server"]
    length = covering_length(tokenizer, server) if step >= 5 else 24
    return {
        "ends": ends if step >= 1 else (),
        "vocab": len(tokenizer) if step >= 2 else None,
        "cut": step >= 3,
        "rows": 0 if step >= 4 else 90,
        "length": instruct.max_new_tokens or length,
        "budget": config.training.max_length - (instruct.max_new_tokens or length),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished instruct run's output-dir")
    parser.add_argument("--models", default="small,proxy")
    args = parser.parse_args()
    run = Path(args.run).expanduser()
    config = RunConfig.from_mapping(
        {key.replace("_", "-"): value for key, value in json.loads((run / "config.json").read_text()).items()}
    )
    instruct, data = config.instruct, config.data
    tokenizer = load_tokenizer(instruct.small_model)
    small = PeftModel.from_pretrained(load_causal_lm(instruct.small_model), run / "adapter").eval()
    large = LocalLogitsProvider(instruct.large_model, shared_vocab_size(instruct.small_model, instruct.large_model))
    ends = end_token_ids(small, large.model)
    everything = load_test_rows(data.dataset, data.test_dataset, data.test_fraction, config.seed)
    print(f"run {run} ({config.algorithm}, seed {config.seed}); scores in %: Rouge-L / exact match")
    print(f"{'evaluation':44}" + "".join(f"{model:>22}" for model in args.models.split(",")))
    for step, label in enumerate(STEPS):
        s = settings(step, config, tokenizer, ends)
        rows = everything[: s["rows"]] if s["rows"] else everything
        prompts = [
            fit_prompt(tokenizer, row["instruction"], row.get("context", ""), s["budget"])[0]
            if s["cut"]
            else build_prompt(row["instruction"], row.get("context", ""))
            for row in rows
        ]
        decoding = DecodingConfig(max_new_tokens=s["length"], end_token_ids=s["ends"])
        cells = []
        for model in args.models.split(","):
            if model == "small":
                new_step = lambda vocab=s["vocab"] or 10**9: model_step(small, vocab)  # noqa: E731
            else:
                new_step = lambda: proxy_step(large, small, instruct.proxy_alpha)  # noqa: E731
            scores = evaluate_generation(
                new_step, tokenizer, prompts, [row["response"] for row in rows], decoding=decoding, batch_size=32
            )
            cells.append(f"{scores.rouge_l:6.1f} / {scores.exact_match:5.1f}")
        print(f"{label:44}" + "".join(f"{cell:>22}" for cell in cells) + f"   ({len(rows)} rows, {s['length']} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
