"""FedPETuning: clients LoRA-tune the full foundation model (attention plus the classification head), FedAvg."""

from __future__ import annotations

from transformers import PreTrainedModel

from fedpt_app.classify.strategies.base import ClassifyStrategy


class FedPETuning(ClassifyStrategy):
    def client_base(self, full: PreTrainedModel) -> PreTrainedModel:
        return full
