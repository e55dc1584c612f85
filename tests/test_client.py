"""The ClientApp's node configuration: a device's own data file and model cache."""

import json
import types

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fedpt_app.config import RunConfig
from fedpt_app.device.dispatch import train
from fedpt_app.instruct.data import DatasetError
from fedpt_app.instruct.strategies.fedavg import FedAvgSmall
from fedpt_app.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from tests.test_reliability import _received


@pytest.fixture
def instruction(tiny_model_dir, tmp_path):
    config = RunConfig.from_mapping(
        {
            "algorithm": "fedavg",
            "small-model": str(tiny_model_dir),
            "lora-target-modules": "q_proj,v_proj",
            "output-dir": str(tmp_path / "out"),
        }
    )
    arrays = FedAvgSmall(config).initial_arrays()
    return _received(
        0,
        RecordDict(
            {
                ARRAYS_KEY: arrays,
                CONFIG_KEY: ConfigRecord({"lr": 0.001, "model": "small", "server-round": 1, "prompt-budget": 72}),
            }
        ),
    )


def _context(tiny_model_dir, node_config):
    return Context(
        run_id=1,
        node_id=5,
        node_config=node_config,
        state=RecordDict(),
        run_config={
            "algorithm": "fedavg",
            "small-model": str(tiny_model_dir),
            "lora-target-modules": "q_proj,v_proj",
            "local-epochs": 1,
        },
    )


def test_a_device_trains_on_its_own_data_file_and_uses_its_model_cache(
    tiny_model_dir, instruction, tmp_path, monkeypatch
):
    # set first so that monkeypatch restores the caller's FEDPT_CACHE after the device overwrites it
    monkeypatch.setenv("FEDPT_CACHE", str(tmp_path / "before"))
    rows = [
        {"instruction": f"Say {word}.", "context": "", "response": word, "category": "echo"}
        for word in ("red", "green", "blue")
    ]
    data_file = tmp_path / "device.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cache = tmp_path / "device-cache"
    reply = train(instruction, _context(tiny_model_dir, {"data-file": str(data_file), "model-cache": str(cache)}))
    assert reply.content[METRICS_KEY]["num-examples"] == 3
    import os

    assert os.environ["FEDPT_CACHE"] == str(cache)


def test_a_device_without_data_is_a_clear_error(tiny_model_dir, instruction, tmp_path):
    with pytest.raises(ValueError, match="partition-id"):
        train(instruction, _context(tiny_model_dir, {}))
    with pytest.raises(DatasetError, match="does not exist"):
        train(instruction, _context(tiny_model_dir, {"data-file": str(tmp_path / "missing.jsonl")}))


def test_local_steps_stop_training_inside_the_epochs():
    import torch

    from fedpt_app.device.training import train_lora

    class Mean(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, values):
            return types.SimpleNamespace(loss=(self.weight - values.mean()).pow(2).sum())

    def batches(examples, batch_size, pad_token_id, generator):
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield {"values": torch.tensor([examples[i] for i in order[start : start + batch_size]])}

    def steps(max_steps):
        common = dict(epochs=2, lr=0.1, batch_size=2, pad_token_id=0, seed=0, max_steps=max_steps)
        return train_lora(Mean(), [1.0, 2.0, 3.0, 4.0, 5.0], batches, **common).steps

    assert steps(None) == 6  # 3 batches of (2, 2, 1) examples, twice
    assert steps(4) == 4
    assert steps(10) == 6  # the epochs end first
