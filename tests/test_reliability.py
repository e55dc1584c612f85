"""Reliability: bad client replies are dropped and the rest aggregate; checkpoints are atomic; clients send only
adapter tensors and scalar metrics."""

import pickle
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict

from fedpt_app.config import RunConfig
from fedpt_app.device.dispatch import train
from fedpt_app.federation.aggregation import fedavg
from fedpt_app.federation.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from fedpt_app.federation.round_state import RoundState
from fedpt_app.federation.screening import RoundFailedError
from fedpt_app.instruct.strategies.fedavg import FedAvgSmall
from fedpt_app.models.lora import from_array_record, to_array_record
from fedpt_app.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY

GOOD_METRICS = {
    "train-loss": 1.5,
    "train-seconds": 0.1,
    "model-loads": 1,
    "peak-rss-mb": 500.0,
    "cuda-peak-mb": 0.0,
    "rows-truncated": 0,
}


def _received(node_id: int, content: RecordDict | None = None, error: Error | None = None) -> Message:
    """A reply as the server receives it from node `node_id`."""
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id="instruction",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata) if error is None else Message(error=error, metadata=metadata)


def _reply(node_id: int, state: dict[str, torch.Tensor], examples=10, dtype="float32", **extra) -> Message:
    records = {
        ARRAYS_KEY: to_array_record(state, dtype),
        METRICS_KEY: MetricRecord({"num-examples": examples, **GOOD_METRICS}),
    }
    return _received(node_id, RecordDict({**records, **extra}))


@pytest.fixture
def strategy(tiny_model_dir, tmp_path):
    config = RunConfig.from_mapping(
        {
            "algorithm": "fedavg",
            "small-model": str(tiny_model_dir),
            "large-model": str(tiny_model_dir),
            "lora-target-modules": "q_proj,v_proj",
            "min-train-nodes": 2,
            "max-update-norm": 50.0,
            "max-num-examples": 1000,
            "output-dir": str(tmp_path / "out"),
        }
    )
    strategy = FedAvgSmall(config)
    broadcast = from_array_record(strategy.initial_arrays())
    strategy.round = RoundState(1, broadcast=broadcast, lr=0.001, sent=10)
    return strategy


def _shifted(state, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    return {key: value + scale * torch.randn(value.shape, generator=generator) for key, value in state.items()}


def test_bad_replies_are_dropped_and_the_good_ones_aggregate_as_if_alone(strategy):
    broadcast = strategy.round.broadcast
    good_a, good_b = _shifted(broadcast, 0.01, 1), _shifted(broadcast, 0.01, 2)
    nan_state = dict(good_a, **{next(iter(good_a)): torch.full_like(next(iter(good_a.values())), float("nan"))})
    first_key = next(iter(good_a))
    wrong_shape = dict(good_a, **{first_key: torch.zeros(3, 3)})
    missing_key = {key: value for key, value in good_a.items() if key != first_key}
    replies = [
        _reply(11, good_a, examples=30),
        _received(12, error=Error(code=0, reason="ClientApp raised RuntimeError: out of memory")),
        _reply(13, nan_state),
        _reply(14, wrong_shape),
        _reply(15, missing_key),
        _reply(16, good_a, dtype="float16"),  # not the configured wire dtype
        _reply(17, good_a, examples=0),
        _reply(18, good_a, examples=10**9),
        _reply(19, _shifted(broadcast, 100.0, 3)),  # update norm far above max-update-norm
        _reply(20, good_a, leak=ConfigRecord({"text": "my private prompt"})),
        _reply(21, good_b, examples=10),
    ]
    strategy.round.sent = len(replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = fedavg([good_a, good_b], [30.0, 10.0])
    for key, value in from_array_record(arrays).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-7)
    row = strategy.round
    assert (row.clients, row.failures, row.rejected, row.num_examples) == (2, 1, 8, 40)
    problems = " | ".join(row.problems)
    for node, reason in [
        (12, "out of memory"),
        (13, "NaN"),
        (14, "shape"),
        (15, "missing"),
        (16, "dtype"),
        (17, "num-examples 0"),
        (18, "num-examples"),
        (19, "update norm"),
        (20, "reply holds records"),
    ]:
        assert f"node {node}: " in problems and reason in problems, (node, reason, problems)


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(strategy):
    states = [_shifted(strategy.round.broadcast, 0.01, seed) for seed in range(4)]
    replies = [_reply(30 + i, state, examples=7 + i) for i, state in enumerate(states)]
    strategy.round.sent = len(replies)
    forward, _ = strategy.aggregate_train(1, replies)
    backward, _ = strategy.aggregate_train(1, replies[::-1])
    for key in forward:
        assert np.array_equal(forward[key].numpy(), backward[key].numpy())


def test_too_few_usable_replies_stop_the_round_with_the_reasons(strategy):
    replies = [_reply(41, strategy.round.broadcast), _reply(42, strategy.round.broadcast, examples=-3)]
    with pytest.raises(RoundFailedError, match=r"only 1 usable replies.*8 timed out.*node 42: num-examples -3"):
        strategy.aggregate_train(3, replies)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    state = {"w": torch.arange(4.0)}
    save_checkpoint(tmp_path, Checkpoint.capture(2, state, {"seed": 0}))
    broken = Checkpoint.capture(3, state, {"seed": 0, "unpicklable": lambda: None})
    with pytest.raises((pickle.PicklingError, AttributeError)):  # "Can't pickle local object"
        save_checkpoint(tmp_path, broken)  # fails half-way through torch.save
    restored = load_checkpoint(tmp_path)
    assert restored.completed_round == 2 and torch.equal(restored.adapter["w"], state["w"])
    assert [path.name for path in tmp_path.iterdir() if not path.name.startswith(".")] == [CHECKPOINT_FILE]


def test_checkpoint_restores_the_rng_state(tmp_path):
    import random

    random.seed(5)
    torch.manual_seed(5)
    save_checkpoint(tmp_path, Checkpoint.capture(1, {"w": torch.zeros(1)}, {}))
    expected = (random.random(), torch.rand(1))
    load_checkpoint(tmp_path).restore_rng()
    assert (random.random(), torch.rand(1)) == expected


def test_resuming_with_another_config_is_refused_and_a_finished_run_starts_afresh(tmp_path):
    save_checkpoint(tmp_path, Checkpoint.capture(1, {"w": torch.zeros(1)}, {"lr": 0.003, "seed": 0}))
    with pytest.raises(CheckpointError, match=r"differs in \['lr'\]"):
        resumable_checkpoint(tmp_path, {"lr": 0.01, "seed": 0})
    assert resumable_checkpoint(tmp_path, {"lr": 0.003, "seed": 0}).completed_round == 1
    save_checkpoint(tmp_path, Checkpoint.capture(2, {"w": torch.zeros(1)}, {"lr": 0.003, "seed": 0}, finished=True))
    assert resumable_checkpoint(tmp_path, {"lr": 0.01, "seed": 0}) is None
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read the checkpoint"):
        resumable_checkpoint(tmp_path, {})


def test_a_client_reply_holds_only_adapter_tensors_and_scalar_metrics(tiny_model_dir, strategy):
    run_config = {
        "algorithm": "fedavg",
        "small-model": str(tiny_model_dir),
        "lora-target-modules": "q_proj,v_proj",
        "local-epochs": 1,
    }
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config=run_config,
    )
    instruction = _received(
        0,
        RecordDict(
            {
                ARRAYS_KEY: strategy.initial_arrays(),
                CONFIG_KEY: ConfigRecord({"lr": 0.001, "model": "small", "server-round": 1, "prompt-budget": 72}),
            }
        ),
    )
    reply = train(instruction, context)
    assert set(reply.content) == {ARRAYS_KEY, METRICS_KEY}
    arrays, metrics = reply.content[ARRAYS_KEY], reply.content[METRICS_KEY]
    assert set(arrays) == set(strategy.round.broadcast) and all("lora_" in key for key in arrays)
    assert all(isinstance(array, Array) and array.dtype == "float32" for array in arrays.values())
    assert all(isinstance(value, (int, float)) for value in metrics.values())
    assert set(metrics) == {"num-examples", *GOOD_METRICS}
