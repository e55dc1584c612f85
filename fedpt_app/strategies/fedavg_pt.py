"""FedAvg+PT: FedAvg of the small model's adapter, evaluated as a proxy-tuned large model (no distillation)."""

from __future__ import annotations

from collections import OrderedDict

import torch

from fedpt_app.config import RunConfig
from fedpt_app.models.lora import load_adapter_state
from fedpt_app.proxy import LocalLogitsProvider, large_only_step, proxy_step, shared_vocab_size
from fedpt_app.strategies.fedavg import FedAvgLora


class FedAvgProxyTuning(FedAvgLora):
    algorithm = "fedavg-pt"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        vocab_size = shared_vocab_size(config.small_model, config.large_model)  # before any training
        self.large = LocalLogitsProvider(config.large_model, vocab_size, config.large_model_quantization)

    def evaluate_models(self, server_round: int, state: OrderedDict[str, torch.Tensor]) -> dict[str, float]:
        """The small model with the global adapter, and the proxy-tuned large (round 0: the untuned large)."""
        scores = super().evaluate_models(server_round, state)
        if server_round == 0:  # the adapter's B is zero: the proxy is exactly the untuned large model
            return scores | self.evaluate_step("large", lambda: large_only_step(self.large))
        load_adapter_state(self.model, state)
        alpha = self.config.proxy_alpha
        return scores | self.evaluate_step("proxy", lambda: proxy_step(self.large, self.model, alpha))
