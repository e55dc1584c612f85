"""FedAvg-large: clients LoRA-tune the large model itself, the white-box reference FedPT saves memory against."""

from __future__ import annotations

from fedpt_app.federation.strategy import State
from fedpt_app.instruct.strategies.base import InstructStrategy


class FedAvgLarge(InstructStrategy):
    trained_role = "large"

    def evaluate_models(self, server_round: int, state: State) -> dict[str, float]:
        return self.evaluate_trained_model(state)
