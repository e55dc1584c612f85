"""FedPT: FedAvg of the small model's adapter; every round the proxy-tuned large model is distilled back into it,
and the distilled adapter is what the next round broadcasts."""

from __future__ import annotations

from logging import INFO

from flwr.common.logger import log

from fedpt_app.config import RunConfig
from fedpt_app.federation.strategy import State
from fedpt_app.instruct.distill import DistillConfig, ProxyDistiller
from fedpt_app.instruct.prompts import tokenize_rows
from fedpt_app.instruct.strategies.base import InstructStrategy


class FedPT(InstructStrategy):
    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.large = self.load_large()
        instruct = config.instruct
        server_rows = self.server_rows[: instruct.kd_samples] if instruct.kd_samples else self.server_rows
        distill_config = DistillConfig(
            alpha=instruct.proxy_alpha,
            temperature=instruct.kd_temperature,
            steps=instruct.kd_steps,
            lr=instruct.kd_lr,
            batch_size=instruct.kd_batch_size,
            seed=config.seed,
            teacher_top_k=instruct.kd_teacher_top_k,
            teacher_tail=instruct.kd_teacher_tail,
        )
        examples, truncation = tokenize_rows(
            self.tokenizer, server_rows, config.training.max_length, self.prompt_budget
        )
        log(INFO, "%s", truncation.describe("server split (distillation)"))
        self.distiller = ProxyDistiller(
            self.model,
            self.large,
            examples,
            distill_config,
            self.tokenizer.pad_token_id,
            instruct.teacher_cache,
            instruct.teacher_cache_mb,
            self.metrics.output_dir,
        )

    def evaluate_models(self, server_round: int, state: State) -> dict[str, float]:
        return self.evaluate_small_and_proxy(server_round, state, self.large)

    def server_step(self, server_round: int, state: State) -> State:
        """Distil the proxy (teacher: this round's aggregate) into the adapter that the next round broadcasts."""
        result = self.distiller.run_round(server_round, state)
        self.round.note(kd_loss=result.loss, kd_seconds=result.seconds, teacher_cache=self.distiller.cache.mode)
        return result.state
