"""FedAvg: FedAvg of the small model's LoRA adapter, evaluated as the tuned small model."""

from __future__ import annotations

from fedpt_app.federation.strategy import State
from fedpt_app.instruct.strategies.base import InstructStrategy


class FedAvgSmall(InstructStrategy):
    def evaluate_models(self, server_round: int, state: State) -> dict[str, float]:
        return self.evaluate_trained_model(state)
