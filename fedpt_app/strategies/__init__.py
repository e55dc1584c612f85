"""One strategy class per algorithm; `STRATEGIES` maps the `algorithm` config value to its class."""

from fedpt_app.strategies.fedavg import FedAvgLora

STRATEGIES = {cls.algorithm: cls for cls in (FedAvgLora,)}

__all__ = ["STRATEGIES", "FedAvgLora"]
