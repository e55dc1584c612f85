"""FedAvg+PT: FedAvg of the small model's adapter, evaluated as a proxy-tuned large model (no distillation)."""

from __future__ import annotations

from fedpt_app.config import RunConfig
from fedpt_app.federation.strategy import State
from fedpt_app.instruct.strategies.base import InstructStrategy


class FedAvgProxyTuning(InstructStrategy):
    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.large = self.load_large()

    def evaluate_models(self, server_round: int, state: State) -> dict[str, float]:
        return self.evaluate_small_and_proxy(server_round, state, self.large)
