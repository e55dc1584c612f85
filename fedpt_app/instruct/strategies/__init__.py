"""The instruct family's strategies: FedPT and its baselines FedAvg, FedAvg+PT and FedAvg-large."""
