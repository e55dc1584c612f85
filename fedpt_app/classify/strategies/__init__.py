"""The classify family's strategies: FedPFT and its baselines FedPETuning and FedOT."""
