"""Differential privacy: clipping, the noised uniform mean, and the client-side clipping mod."""

import math
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedpt_app.device.mods import clip_when_asked_mod
from fedpt_app.federation.privacy import clipped, noisy_mean
from fedpt_app.models.lora import from_array_record, to_array_record
from fedpt_app.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY

BROADCAST = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[0.0], [0.0]])}


def test_an_update_above_the_norm_is_scaled_onto_it_and_one_below_is_kept():
    big = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([[0.0], [4.0]])}  # update (3, 0, 0, 4): norm 5
    clipped_big = clipped(big, BROADCAST, clipping_norm=1.0)
    torch.testing.assert_close(clipped_big["a"], torch.tensor([1.6, 1.0]))  # 1 + 3/5
    torch.testing.assert_close(clipped_big["b"], torch.tensor([[0.0], [0.8]]))  # 4/5
    small = {"a": torch.tensor([1.3, 1.0]), "b": torch.tensor([[0.0], [0.4]])}  # norm 0.5
    kept = clipped(small, BROADCAST, clipping_norm=1.0)
    assert all(torch.allclose(kept[key], small[key]) for key in small)


def test_the_noised_mean_is_uniform_and_its_noise_has_the_dp_fedavg_deviation():
    states = [{"w": torch.zeros(20_000)}, {"w": torch.full((20_000,), 2.0)}]
    exact, stdv = noisy_mean(states, clipping_norm=1.0, noise_multiplier=0.0)
    assert stdv == 0.0 and torch.equal(exact["w"], torch.ones(20_000))
    noisy, stdv = noisy_mean(states, clipping_norm=0.5, noise_multiplier=2.0)
    assert stdv == 2.0 * 0.5 / 2
    noise = noisy["w"] - 1.0
    assert abs(noise.mean().item()) < 0.03 and math.isclose(noise.std().item(), stdv, rel_tol=0.05)


def _message(content: RecordDict, reply_to: str = "") -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=3,
        dst_node_id=0,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def _instruction(extra_config: dict) -> Message:
    return _message(
        RecordDict(
            {ARRAYS_KEY: to_array_record(BROADCAST, "float32"), CONFIG_KEY: ConfigRecord({"lr": 0.1, **extra_config})}
        )
    )


def _far_away_client(msg: Message, context: Context) -> Message:
    """A ClientApp whose update has norm 5."""
    state = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([[0.0], [4.0]])}
    return _message(
        RecordDict({ARRAYS_KEY: to_array_record(state, "float32"), METRICS_KEY: MetricRecord({"num-examples": 1})}),
        reply_to="m",
    )


def test_the_client_mod_clips_only_when_the_round_asks_for_it():
    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    asked = clip_when_asked_mod(_instruction({KEY_CLIPPING_NORM: 1.0}), context, _far_away_client)
    update = {key: value - BROADCAST[key] for key, value in from_array_record(asked.content[ARRAYS_KEY]).items()}
    assert math.isclose(math.sqrt(sum(float(v.pow(2).sum()) for v in update.values())), 1.0, rel_tol=1e-6)
    untouched = clip_when_asked_mod(_instruction({}), context, _far_away_client)
    assert torch.equal(from_array_record(untouched.content[ARRAYS_KEY])["b"], torch.tensor([[0.0], [4.0]]))
    assert isinstance(untouched.content[ARRAYS_KEY], ArrayRecord)
