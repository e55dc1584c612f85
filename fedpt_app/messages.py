"""Names of the records in the messages between ServerApp and ClientApp (the wire protocol)."""

ARRAYS_KEY = "arrays"  # ArrayRecord: adapter tensors
METRICS_KEY = "metrics"  # MetricRecord: num-examples, train-loss, train-seconds, model-loads
CONFIG_KEY = "config"  # ConfigRecord: server-round, lr
