"""The server side, task-agnostic: the round lifecycle, reply screening, aggregation, differential privacy, the
SecAgg+ bridge, checkpoints and the metrics log. A device never imports this package."""
