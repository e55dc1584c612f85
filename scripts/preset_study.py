"""What the tiny preset's models can learn, centrally (no federation): the numbers behind the preset's design.

    python scripts/preset_study.py [--steps 400] [--lr 3e-3] [--alpha 1.0] [--split server]

Builds (or finds) the preset, LoRA-tunes the small and the large model on the built-in train split for `--steps`
steps, and prints exact match per category on `--split` (the server split by default: choose settings there, never
on the test split) for the untuned models, the tuned small, the
proxy-tuned large (`zL + alpha (zs_tuned - zs_base)`) and the tuned large; then the proxy's and the tuned small's
exact match on the knowledge questions that only the large model can answer in plain text. Greedy decoding with
the same prompt template, LoRA targets and decoding as a run. First, per category, how often each untuned model
completes "the answer is" with the answer after the plain-text question and after the prompt template.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fedpt_app.instruct.builtin import CATEGORIES, CATEGORY_KINDS, builtin_instruction_split
from fedpt_app.instruct.decoding import DecodingConfig, model_step
from fedpt_app.instruct.evaluation import evaluate_generation, exact_match
from fedpt_app.instruct.prompts import batches, build_prompt, tokenize_rows
from fedpt_app.instruct.proxy import LocalLogitsProvider, proxy_step
from fedpt_app.instruct.tiny_preset import completes
from fedpt_app.models.loading import load_causal_lm, load_tokenizer, tiny_preset_dir
from fedpt_app.models.lora import LoraSpec, lora_model

LORA = LoraSpec(r=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))  # the run's defaults


def tuned(ref: str, rows: list[dict], tokenizer, steps: int, lr: float, seed: int):
    model = lora_model(ref, LORA, seed=seed)
    examples, _ = tokenize_rows(tokenizer, rows, 96, 80)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator, step = torch.Generator().manual_seed(seed), 0
    model.train()
    while step < steps:
        for batch in batches(examples, 16, tokenizer.pad_token_id, generator):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == steps:
                break
    return model.eval()


def answers(new_step, tokenizer, prompts: list[str], references: list[str]) -> list[str]:
    """Greedy answers in the run's evaluation path (batches of 64, a fresh step function per batch)."""
    decoding = DecodingConfig(max_new_tokens=16)
    return evaluate_generation(new_step, tokenizer, prompts, references, decoding=decoding, batch_size=64).predictions


GROUPS = ("all", "knowledge", "skill", *CATEGORIES)  # the columns of both tables


def percent_by_group(rows: list[dict], hits: list[bool]) -> str:
    """Table cells: the share of `hits` that are true (percent) over all rows, per kind, then per category."""
    groups: dict[str, list[bool]] = {"all": list(hits)}
    for row, hit in zip(rows, hits, strict=True):
        groups.setdefault(CATEGORY_KINDS[row["category"]], []).append(hit)
        groups.setdefault(row["category"], []).append(hit)
    return " | ".join(f"{100 * sum(groups[key]) / len(groups[key]):.1f}" for key in GROUPS)


def print_completions(rows: list[dict], plain: dict[str, list[bool]], in_template: dict[str, list[bool]]) -> None:
    """Per category, the share of rows each untuned model completes with the answer, in plain text and in the
    template."""
    print("\nuntuned models completing 'the answer is' with the answer (%)\n")
    print("| model | after | " + " | ".join(GROUPS) + " |")
    print("|---" * (len(GROUPS) + 2) + "|")
    for context, hits_of in (("the plain-text question", plain), ("the prompt template", in_template)):
        for name, hits in hits_of.items():
            print(f"| {name} | {context} | {percent_by_group(rows, hits)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("server", "test"), default="server")
    parser.add_argument("--preset", type=Path, default=None, help="a preset folder (default: the built tiny preset)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    folder = args.preset or tiny_preset_dir()
    print("preset report:", json.dumps(json.loads((folder / "report.json").read_text())))
    small_ref, large_ref = str(folder / "small"), str(folder / "large")
    tokenizer = load_tokenizer(small_ref)
    vocab = len(tokenizer)
    rows = builtin_instruction_split(args.split)
    prompts = [build_prompt(row["instruction"], row["context"]) for row in rows]
    references = [row["response"] for row in rows]
    small, large = load_causal_lm(small_ref), LocalLogitsProvider(large_ref, vocab)

    # who knows the fact: "<question> the answer is" completed in plain text
    plain = [" ".join(p for p in (row["context"], row["instruction"]) if p) + " the answer is" for row in rows]
    answers_only = [reference[len("the answer is ") : -1] for reference in references]
    knows = {
        name: completes(model, tokenizer, plain, answers_only)
        for name, model in (("small", small), ("large", large.model))
    }
    # the same after "<prompt template>the answer is": where the proxy's answer token is chosen, once the small's
    # offset has written the phrase, the untuned large has to bring the fact there for the proxy to gain from it
    templated = [prompt + "the answer is" for prompt in prompts]
    knows_in_template = {
        name: completes(model, tokenizer, templated, answers_only)
        for name, model in (("small", small), ("large", large.model))
    }
    print_completions(rows, knows, knows_in_template)
    # in this order: peft puts the adapter into the process's one copy of each base model
    results = {
        "untuned small": answers(lambda: model_step(small, vocab), tokenizer, prompts, references),
        "untuned large": answers(lambda: model_step(large.model, vocab), tokenizer, prompts, references),
    }
    train_rows = builtin_instruction_split("train")
    tuned_small = tuned(small_ref, train_rows, tokenizer, args.steps, args.lr, args.seed)
    results["tuned small"] = answers(lambda: model_step(tuned_small, vocab), tokenizer, prompts, references)
    proxy_name = f"proxy (alpha {args.alpha:g})"
    results[proxy_name] = answers(lambda: proxy_step(large, tuned_small, args.alpha), tokenizer, prompts, references)
    tuned_large = tuned(large_ref, train_rows, tokenizer, args.steps, args.lr, args.seed)
    results["tuned large"] = answers(lambda: model_step(tuned_large, vocab), tokenizer, prompts, references)
    print(
        f"\ncentral LoRA, {args.steps} steps of 16 at lr {args.lr:g}; exact match (%), {len(rows)} {args.split} rows\n"
    )
    print("| model | " + " | ".join(GROUPS) + " |")
    print("|---" * (len(GROUPS) + 1) + "|")
    for name, predictions in results.items():
        hits = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
        print(f"| {name} | {percent_by_group(rows, hits)} |")
    only_large = [
        i
        for i, row in enumerate(rows)
        if CATEGORY_KINDS[row["category"]] == "knowledge" and knows["large"][i] and not knows["small"][i]
    ]
    for name in ("tuned small", proxy_name):
        hits = sum(exact_match(results[name][i], references[i]) for i in only_large)
        print(f"{name}: {hits}/{len(only_large)} of the knowledge questions only the large model answers in plain text")
    print("\nexamples:")
    for row, small_answer, proxy_answer in list(zip(rows, results["tuned small"], results[proxy_name], strict=True))[
        :6
    ]:
        print(f"  {row['instruction']} | tuned small: {small_answer} | proxy: {proxy_answer} | ref: {row['response']}")


if __name__ == "__main__":
    main()
