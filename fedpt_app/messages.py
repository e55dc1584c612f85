"""Names of the records in the messages between ServerApp and ClientApp (the wire protocol)."""

ARRAYS_KEY = "arrays"  # ArrayRecord: adapter tensors
METRICS_KEY = "metrics"  # MetricRecord: num-examples, train-loss, train-seconds, model-loads
CONFIG_KEY = "config"  # ConfigRecord: server-round, lr
# FedPFT and its baselines
BASE_MODEL_KEY = "base-model"  # ArrayRecord: the model a client trains on, sent once per client
FFN_UPDATE_KEY = "ffn-update"  # ArrayRecord: the sub-FM's FFN weights after a neuron-level alignment
APOZ_KEY = "apoz"  # ArrayRecord in a reply: per-layer zero-activation counts ("layer-N") and "tokens"
