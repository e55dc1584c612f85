"""What proxy-tuning loses when the large model only answers with its top-k log-probabilities (an OpenAI-compatible
endpoint), against full log-probabilities, on a finished run's test split, side by side in one run.

    python bench/top_k_logprobs.py --run DIR [--ks 5,20,100] [--tails uniform,drop]

The large model is served by `fedpt-app serve --model large` (another process, loopback) and queried through
`large-model='openai+http://…#top_k=K&tail=T'`; the reference decodes with the full distribution in this process.
Reported per k and tail: exact match, Rouge-L, the share of answers identical to the full-logits ones, bytes/token.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from peft import PeftModel

from fedpt_app.instruct.data import load_splits, load_test_rows
from fedpt_app.instruct.decoding import DecodingConfig, end_token_ids
from fedpt_app.instruct.evaluation import evaluate_generation
from fedpt_app.instruct.prompts import build_prompt, covering_length
from fedpt_app.instruct.proxy import LocalLogitsProvider, proxy_step, shared_vocab_size
from fedpt_app.models.loading import load_causal_lm, load_tokenizer
from fedpt_app.serving.background import service_process
from fedpt_app.serving.remote import OpenAICompletionsProvider
from fedpt_app.tools.simulation import validate_overrides

PORT = 18766


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished FedPT or FedAvg+PT run's output-dir")
    parser.add_argument("--ks", default="5,20,100")
    parser.add_argument("--tails", default="uniform,drop")
    args = parser.parse_args()
    summary = json.loads((Path(args.run) / "summary.json").read_text())
    small_ref, large_ref, adapter = summary["small_model"], summary["large_model"], summary["adapter_dir"]
    config = validate_overrides(f"small-model='{small_ref}' large-model='{large_ref}'")
    tokenizer = load_tokenizer(small_ref)
    small = PeftModel.from_pretrained(load_causal_lm.__wrapped__(small_ref), adapter).eval()
    local = LocalLogitsProvider(large_ref, shared_vocab_size(small_ref, large_ref))
    data = config.data
    rows = load_test_rows(data.dataset, data.test_dataset, data.test_fraction, config.seed)
    prompts = [build_prompt(row["instruction"], row.get("context", "")) for row in rows]
    references = [row["response"] for row in rows]
    server_rows = load_splits(data.dataset, data.test_fraction, config.seed)["server"]
    decoding = DecodingConfig(
        max_new_tokens=covering_length(tokenizer, server_rows), end_token_ids=end_token_ids(small, local.model)
    )

    def evaluate(provider):
        return evaluate_generation(
            lambda: proxy_step(provider, small, 1.0), tokenizer, prompts, references, decoding=decoding, batch_size=32
        )

    full = evaluate(local)
    max_k = max(int(k) for k in args.ks.split(","))
    command = ["fedpt-app", "serve", "--model", "large", "--large", large_ref, "--port", str(PORT)]
    command += ["--max-logprobs", str(max_k), "--max-batch", "32"]
    with service_process(command, f"http://127.0.0.1:{PORT}", ready_path="/v1/models") as url:
        print(f"pair {small_ref} / {large_ref} (vocabulary {local.vocab_size}), {len(rows)} test prompts, greedy")
        print(f"{'large model':<26}{'exact match':>12}{'Rouge-L':>9}{'same answers':>14}{'bytes/token':>13}{'s':>7}")
        print(f"{'full log-probs (local)':<26}{full.exact_match:>12.1f}{full.rouge_l:>9.1f}{100.0:>13.1f}%{0:>13}")
        for k in (int(k) for k in args.ks.split(",")):
            for tail in args.tails.split(","):
                ref = f"openai+{url}/v1#model=fedpt-large&top_k={k}&tail={tail}"
                remote = OpenAICompletionsProvider(ref, tokenizer, token="unused")
                began = time.perf_counter()
                scores = evaluate(remote)
                same = sum(a == b for a, b in zip(scores.predictions, full.predictions, strict=True))
                tokens = sum(len(tokenizer(p).input_ids) + 1 for p in scores.predictions)
                wire = (remote.bytes_sent + remote.bytes_received) / tokens
                print(
                    f"{f'top-{k}, tail {tail}':<26}{scores.exact_match:>12.1f}{scores.rouge_l:>9.1f}"
                    f"{100 * same / len(rows):>13.1f}%{wire:>13,.0f}{time.perf_counter() - began:>7.0f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
