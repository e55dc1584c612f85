"""The ClientApp's mods, the device halves of differential privacy and secure aggregation.

- `clip_when_asked_mod`: Flower's `fixedclipping_mod` on rounds whose config carries a clipping norm
  (`dp-mode='client'`, see fedpt_app/federation/privacy.py); other messages pass through untouched.
- `secure_aggregation_mod`: Flower's `secaggplus_mod` on SecAgg+ rounds (see
  fedpt_app/federation/secure_aggregation.py), translating its legacy fit messages to and from the app's own train
  messages; other messages pass through untouched.
"""

from __future__ import annotations

from collections import OrderedDict

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from fedpt_app import algorithms
from fedpt_app.config import RunConfig
from fedpt_app.protocol import ARRAYS_KEY, CLIPPING_NORM_KEY, CONFIG_KEY, METRICS_KEY, RoundConfig


def clip_when_asked_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    configs = list(msg.content.config_records.values())
    if any(CLIPPING_NORM_KEY in config for config in configs):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda fit_msg, ctx: _train_from_legacy_fit(fit_msg, ctx, call_next))


def _train_from_legacy_fit(msg: Message, context: Context, train: ClientAppCallable) -> Message:
    """Run the app's train task on a legacy fit message, and answer in the legacy fit-result layout."""
    fit_ins = recorddict_to_fitins(msg.content, keep_input=True)
    config = RunConfig.from_mapping(context.run_config)
    round_config = ConfigRecord(dict(fit_ins.config))
    keys = algorithms.device_task(config.algorithm).adapter_keys(config, RoundConfig.from_record(round_config))
    arrays = ArrayRecord(
        OrderedDict(
            (key, Array(values)) for key, values in zip(keys, parameters_to_ndarrays(fit_ins.parameters), strict=True)
        )
    )
    msg.content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: round_config})
    reply = train(msg, context)
    if reply.has_error():
        return reply
    metrics = dict(reply.content[METRICS_KEY])
    fit_res = FitRes(
        Status(Code.OK, "ok"),
        ndarrays_to_parameters([array.numpy() for array in reply.content[ARRAYS_KEY].values()]),
        int(metrics.pop("num-examples")),
        metrics,
    )
    reply.content = fitres_to_recorddict(fit_res, keep_input=True)
    return reply
