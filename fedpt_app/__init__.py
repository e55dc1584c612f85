"""fedpt-app: federated proxy-tuning (FedPT), federated proxy fine-tuning (FedPFT) and their baselines on Flower."""

__version__ = "0.1.0"
