"""One strategy class per algorithm; `STRATEGIES` maps the `algorithm` config value to its class."""

from fedpt_app.strategies.fedavg import FedAvgLora
from fedpt_app.strategies.fedavg_large import FedAvgLarge
from fedpt_app.strategies.fedavg_pt import FedAvgProxyTuning
from fedpt_app.strategies.fedot import FedOT
from fedpt_app.strategies.fedpetuning import FedPETuning
from fedpt_app.strategies.fedpft import FedPFT
from fedpt_app.strategies.fedpt import FedPT

STRATEGIES = {cls.algorithm: cls for cls in (FedPT, FedAvgLora, FedAvgProxyTuning, FedAvgLarge, FedPFT, FedPETuning,
                                             FedOT)}

__all__ = ["STRATEGIES", "FedAvgLarge", "FedAvgLora", "FedAvgProxyTuning", "FedOT", "FedPETuning", "FedPFT", "FedPT"]
