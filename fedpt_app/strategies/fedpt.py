"""FedPT: FedAvg+PT plus, every round, distillation of the proxy-tuned large model into the small adapter."""

from __future__ import annotations

from collections import OrderedDict

import torch

from fedpt_app.config import RunConfig
from fedpt_app.data.prompts import tokenize_rows
from fedpt_app.data.sources import load_splits
from fedpt_app.distill import DistillConfig, ProxyDistiller
from fedpt_app.strategies.fedavg_pt import FedAvgProxyTuning


class FedPT(FedAvgProxyTuning):
    algorithm = "fedpt"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        server_rows = load_splits(config.dataset, config.test_fraction, config.seed)["server"]
        if config.kd_samples:
            server_rows = server_rows[:config.kd_samples]
        distill_config = DistillConfig(alpha=config.proxy_alpha, temperature=config.kd_temperature,
                                       steps=config.kd_steps, lr=config.kd_lr, batch_size=config.kd_batch_size,
                                       seed=config.seed)
        self.distiller = ProxyDistiller(self.model, self.large, tokenize_rows(self.tokenizer, server_rows,
                                                                              config.max_length),
                                        distill_config, self.tokenizer.pad_token_id, config.teacher_cache,
                                        config.teacher_cache_mb, self.metrics.output_dir)

    def server_step(self, server_round: int, state: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """Distil the proxy (teacher: this round's aggregate) into the adapter that the next round broadcasts."""
        result = self.distiller.run_round(server_round, state)
        self._round.update({"kd_loss": result.loss, "kd_seconds": result.seconds,
                            "teacher_cache": self.distiller.cache.mode})
        return result.state
