"""FedAvg-large: clients LoRA-tune the large model itself, the white-box reference FedPT saves memory against."""

from __future__ import annotations

from fedpt_app.strategies.fedavg import FedAvgLora


class FedAvgLarge(FedAvgLora):
    algorithm = "fedavg-large"
    trained_role = "large"
