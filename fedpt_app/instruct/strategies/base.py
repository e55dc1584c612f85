"""What the instruct family's strategies share: clients LoRA-tune one model of a same-tokenizer causal-LM pair (the
small one, unless `trained_role` is "large"); the server evaluates by greedy decoding, Rouge-L and exact match, and
FedAvg+PT and FedPT also evaluate the proxy-tuned large model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from logging import INFO

from flwr.common.logger import log
from transformers import PreTrainedTokenizerBase

from fedpt_app.config import ConfigError, RunConfig
from fedpt_app.federation.strategy import FederatedStrategy, State
from fedpt_app.instruct.builtin import CATEGORY_KINDS
from fedpt_app.instruct.data import load_splits, load_test_rows
from fedpt_app.instruct.decoding import DecodingConfig, StepFn, end_token_ids, model_step
from fedpt_app.instruct.evaluation import evaluate_generation, exact_match_by_group
from fedpt_app.instruct.prompts import Truncation, covering_length, fit_prompt
from fedpt_app.instruct.proxy import (
    LogitsProvider,
    large_only_step,
    proxy_step,
    refuse_embedding_lora,
)
from fedpt_app.models.loading import load_tokenizer
from fedpt_app.models.lora import LoraSpec, load_adapter_state, lora_model
from fedpt_app.protocol import RoundConfig
from fedpt_app.serving.providers import load_logits_provider


class InstructStrategy(FederatedStrategy):
    trained_role = "small"  # which of the pair the clients LoRA-tune: "small" or "large"
    score_names = tuple(
        f"{metric}_{model}" for metric in ("exact_match", "rouge_l") for model in ("small", "proxy", "large")
    )
    loss_names = ("kd_loss",)

    def load_task(self) -> None:
        config, instruct, data = self.config, self.config.instruct, self.config.data
        large = self.trained_role == "large"
        self.model_ref = instruct.large_model if large else instruct.small_model
        quantization = instruct.large_model_quantization if large else "none"
        self.tokenizer = load_tokenizer(self.model_ref)
        self.model = lora_model(self.model_ref, LoraSpec.from_settings(config.lora), quantization, config.seed)
        self.server_rows = load_splits(data.dataset, data.test_fraction, config.seed)["server"]
        self.max_new_tokens, self.prompt_budget = generation_budget(self.tokenizer, self.server_rows, config)
        self.test_rows = load_test_rows(
            data.dataset, data.test_dataset, data.test_fraction, config.seed, config.evaluation.eval_samples
        )
        fitted = [
            fit_prompt(self.tokenizer, row["instruction"], row.get("context", ""), self.prompt_budget)
            for row in self.test_rows
        ]
        self.test_prompts = [prompt for prompt, _ in fitted]
        cut = sum(was_cut for _, was_cut in fitted)
        log(INFO, "%s", Truncation(len(fitted), cut, 0, cut).describe("test split (evaluation prompts)"))
        self.end_ids = end_token_ids(self.model)

    def round_config(self, number: int) -> RoundConfig:
        return dataclasses.replace(
            super().round_config(number), trained_model=self.trained_role, prompt_budget=self.prompt_budget
        )

    def summary_fields(self) -> dict[str, str]:
        return {
            "adapter_base_model": self.model_ref,
            "small_model": self.config.instruct.small_model,
            "large_model": self.config.instruct.large_model,
        }

    # ---- evaluation -----------------------------------------------------------------------------------------
    def evaluate_step(self, name: str, new_step: Callable[[], StepFn]) -> dict[str, float]:
        """Greedy answers on the test rows from one decoding setup, reported as `rouge_l_<name>`,
        `exact_match_<name>` and `contains_<name>`; the answers go to predictions_<name>.jsonl."""
        decoding = DecodingConfig(max_new_tokens=self.max_new_tokens, end_token_ids=self.end_ids)
        references = [row["response"] for row in self.test_rows]
        scores = evaluate_generation(
            new_step,
            self.tokenizer,
            self.test_prompts,
            references,
            decoding=decoding,
            batch_size=self.config.evaluation.eval_batch_size,
        )
        self.write_predictions(name, scores.predictions)
        metrics = {
            f"rouge_l_{name}": scores.rouge_l,
            f"exact_match_{name}": scores.exact_match,
            f"contains_{name}": scores.contains,
        }
        kinds = [CATEGORY_KINDS.get(row["category"]) for row in self.test_rows]
        if all(kinds):  # the built-in set: exact match on knowledge and on skill questions apart
            by_kind = exact_match_by_group(scores.predictions, references, kinds)
            metrics |= {f"{kind}_exact_match_{name}": value for kind, value in by_kind.items()}
        return metrics

    def write_predictions(self, model_name: str, predictions: list[str]) -> None:
        """The latest evaluation's answers, to read what the model says (overwritten at each evaluation)."""
        with (self.metrics.output_dir / f"predictions_{model_name}.jsonl").open("w") as handle:
            for row, prediction in zip(self.test_rows, predictions, strict=True):
                handle.write(
                    json.dumps(
                        {
                            "category": row["category"],
                            "instruction": row["instruction"],
                            "context": row.get("context", ""),
                            "reference": row["response"],
                            "prediction": prediction,
                        }
                    )
                    + "\n"
                )

    def evaluate_trained_model(self, state: State) -> dict[str, float]:
        """The tuned model itself, with the global adapter."""
        load_adapter_state(self.model, state)
        return self.evaluate_step(self.trained_role, lambda: model_step(self.model, len(self.tokenizer)))

    # ---- the proxy-tuned large model (FedAvg+PT, FedPT) -----------------------------------------------------
    def load_large(self) -> LogitsProvider:
        """The large model as a logits provider, over the vocabulary it shares with the small (checked first): its
        weights loaded here, or a service queried over the network (`large-model` a URL)."""
        refuse_embedding_lora(self.model)
        instruct = self.config.instruct
        large = load_logits_provider(
            instruct.small_model, instruct.large_model, instruct.large_model_quantization, self.tokenizer
        )
        self.end_ids = tuple(sorted({*self.end_ids, *large.end_token_ids}))
        return large

    def evaluate_small_and_proxy(
        self, server_round: int, state: State, large: LogitsProvider, proxy_state: State | None = None
    ) -> dict[str, float]:
        """The small model with the global adapter, and the proxy-tuned large with `proxy_state` (default: the
        global adapter too; round 0: the untuned large)."""
        scores = self.evaluate_trained_model(state)
        if server_round == 0:  # the adapter's B is zero: the proxy is exactly the untuned large model
            return scores | self.evaluate_step("large", lambda: large_only_step(large))
        load_adapter_state(self.model, state if proxy_state is None else proxy_state)
        alpha = self.config.instruct.proxy_alpha
        return scores | self.evaluate_step("proxy", lambda: proxy_step(large, self.model, alpha))


def generation_budget(
    tokenizer: PreTrainedTokenizerBase, server_rows: Sequence[dict], config: RunConfig
) -> tuple[int, int]:
    """(max new tokens, prompt budget): `max-new-tokens`, or with 0 the length that holds 95% of the server split's
    references in full; prompts get the rest of `max-length`."""
    max_new_tokens = config.instruct.max_new_tokens
    if not max_new_tokens:
        max_new_tokens = covering_length(tokenizer, server_rows)
        log(INFO, "[fedpt-app] max-new-tokens: %d tokens hold 95%% of the server split's references", max_new_tokens)
    budget = config.training.max_length - max_new_tokens
    if budget < 16:
        raise ConfigError(
            f"max-length={config.training.max_length} leaves {budget} tokens for the prompt after "
            f"{max_new_tokens} new tokens: raise max-length (or lower max-new-tokens)"
        )
    return max_new_tokens, budget
