"""FedPT: FedAvg of the small model's adapter; every round the server builds the proxy-tuned large model from the
aggregate and distils it back into the small model, and the distilled adapter is what the next round broadcasts.

The paper leaves open which adapter the proxy FedPT delivers uses. By default (`proxy-adapter='aggregate'`) it is
the round's aggregate, the distillation's teacher (saved as `proxy-adapter/`), whose proxy does not add the large
model's predictions a second time through a small already distilled towards them (chosen on the server split:
docs/results.md); with 'distilled' it is the distilled one, the small FedPT reports and saves (`adapter/`)."""

from __future__ import annotations

from collections import OrderedDict
from logging import INFO

import torch
from flwr.common.logger import log

from fedpt_app.config import RunConfig
from fedpt_app.federation.strategy import State
from fedpt_app.instruct.distill import DistillConfig, ProxyDistiller
from fedpt_app.instruct.prompts import tokenize_rows
from fedpt_app.instruct.strategies.base import InstructStrategy

PROXY_PREFIX = "proxy."  # the proxy's adapter in the checkpoint's server state


class FedPT(InstructStrategy):
    def __init__(self, config: RunConfig) -> None:
        self.proxy_state: State | None = None  # proxy-adapter='aggregate': the latest round's aggregate
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
        """The distilled small (`state`), and the proxy with `proxy-adapter`'s adapter."""
        return self.evaluate_small_and_proxy(server_round, state, self.large, proxy_state=self.proxy_state)

    def server_step(self, server_round: int, state: State) -> State:
        """Distil the proxy (teacher: this round's aggregate) into the adapter that the next round broadcasts."""
        if self.config.instruct.proxy_adapter == "aggregate":
            self.proxy_state = OrderedDict((name, tensor.detach().clone()) for name, tensor in state.items())
        result = self.distiller.run_round(server_round, state)
        self.round.note(kd_loss=result.loss, kd_seconds=result.seconds, teacher_cache=self.distiller.cache.mode)
        return result.state

    def other_adapters(self) -> dict[str, State]:
        return {} if self.proxy_state is None else {"proxy-adapter": self.proxy_state}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {} if self.proxy_state is None else {PROXY_PREFIX + name: t for name, t in self.proxy_state.items()}

    def restore_server_state(self, state: dict[str, torch.Tensor]) -> None:
        proxy = [(name.removeprefix(PROXY_PREFIX), tensor) for name, tensor in state.items()]
        self.proxy_state = OrderedDict(proxy) if proxy else None
