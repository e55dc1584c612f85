"""The ClientApp's node configuration: a device's own data file and model cache."""

import json

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
    monkeypatch.delenv("FEDPT_CACHE", raising=False)
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
