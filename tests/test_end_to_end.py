"""End-to-end `flwr run .` simulations on the embedded tiny preset (pre-trained once into FEDPT_CACHE)."""

import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedpt_app.models.loading import resolve_model_ref, tiny_preset_dir
from fedpt_app.models.lora import LoraSpec, adapter_state, lora_model, to_array_record
from fedpt_app.simulation import run_simulation, validate_overrides


def _simulate(tmp_path, overrides: str, num_supernodes: int = 2):
    tiny_preset_dir()  # build the preset here, visibly, rather than inside the ServerApp
    output = tmp_path / "out"
    run_config = f"{overrides} output-dir='{output}'"
    outcome = run_simulation(run_config, num_supernodes=num_supernodes, flwr_home=tmp_path / "flwr", echo=None)
    return outcome, output, validate_overrides(run_config)


QUICK = "num-server-rounds=2 fraction-train=1.0 eval-samples=27 max-new-tokens=16"


def _rows(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
    return _simulate(tmp_path_factory.mktemp("fedavg"),
                     f"algorithm='fedavg' {QUICK}")


def test_fedavg_run_completes_and_writes_metrics(fedavg_run):
    outcome, output, _ = fedavg_run
    assert outcome.succeeded, outcome.log[-3000:]
    rows = _rows(output)
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["algorithm"] == "fedavg" for row in rows)
    assert rows[2]["train_loss"] < rows[1]["train_loss"]
    assert all(0.0 <= row["rouge_l_small"] <= 100.0 for row in rows)
    assert rows[1]["lr"] > rows[2]["lr"]
    assert "[fedpt-app] round 2/2" in outcome.log
    summary = json.loads((output / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final"]["round"] == 2


def test_bytes_are_the_adapter_payload_times_clients(fedavg_run):
    _, output, config = fedavg_run
    rows = _rows(output)
    model = lora_model(config.small_model, LoraSpec.from_run_config(config), seed=config.seed)
    adapter_bytes = to_array_record(adapter_state(model), config.wire_dtype).count_bytes()
    for row in rows[1:]:
        assert row["clients"] == 2
        assert row["bytes_up"] == row["bytes_down"] == adapter_bytes * 2


def test_each_process_loads_its_base_model_once(fedavg_run):
    _, output, _ = fedavg_run
    rows = _rows(output)
    assert all(row["server_model_loads"] == 1 for row in rows)
    assert all(row["client_model_loads"] == 1 for row in rows[1:])


def test_final_adapter_loads_with_peft(fedavg_run):
    _, output, config = fedavg_run
    base = AutoModelForCausalLM.from_pretrained(resolve_model_ref(config.small_model))
    model = PeftModel.from_pretrained(base, output / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_bad_dataset_stops_the_run_before_training(tmp_path):
    outcome, output, _ = _simulate(tmp_path, "dataset='/no/such/data.jsonl' num-server-rounds=1")
    assert outcome.status == "finished:failed"
    assert "/no/such/data.jsonl" in outcome.details and "does not exist" in outcome.details
    assert not (output / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def fedpt_run(tmp_path_factory):
    return _simulate(tmp_path_factory.mktemp("fedpt"), f"{QUICK} kd-steps=4 kd-samples=64")


def test_fedpt_is_the_default_and_distils_every_round(fedpt_run):
    outcome, output, config = fedpt_run
    assert outcome.succeeded, outcome.log[-3000:]
    assert config.algorithm == "fedpt"
    rows = _rows(output)
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[0]["rouge_l_small"] is not None and rows[0]["rouge_l_large"] is not None
    for row in rows[1:]:
        assert row["kd_loss"] > 0.0 and row["teacher_cache"] == "memory"
        assert 0.0 <= row["rouge_l_small"] <= 100.0 and 0.0 <= row["rouge_l_proxy"] <= 100.0
    assert (output / "predictions_proxy.jsonl").exists()
    assert json.loads((output / "summary.json").read_text())["best_rouge_l_proxy"] is not None


def test_fedpt_broadcasts_the_distilled_adapter(fedpt_run):
    _, output, config = fedpt_run
    model = lora_model(config.small_model, LoraSpec.from_run_config(config), seed=config.seed)
    adapter_bytes = to_array_record(adapter_state(model), config.wire_dtype).count_bytes()
    assert all(row["bytes_up"] == row["bytes_down"] == 2 * adapter_bytes for row in _rows(output)[1:])


def test_fedavg_pt_evaluates_the_proxy_without_distilling(tmp_path):
    outcome, output, _ = _simulate(tmp_path, f"algorithm='fedavg-pt' {QUICK}")
    assert outcome.succeeded, outcome.log[-3000:]
    rows = _rows(output)
    assert rows[0]["rouge_l_large"] is not None
    assert all(row["rouge_l_proxy"] is not None and "kd_loss" not in row for row in rows[1:])


def test_fedavg_large_tunes_the_large_model_and_sends_its_bigger_adapter(tmp_path):
    outcome, output, config = _simulate(tmp_path, f"algorithm='fedavg-large' {QUICK}")
    assert outcome.succeeded, outcome.log[-3000:]
    rows = _rows(output)
    assert all(row["rouge_l_large"] is not None and row["rouge_l_small"] is None for row in rows)
    large = lora_model(config.large_model, LoraSpec.from_run_config(config), seed=config.seed)
    adapter_bytes = to_array_record(adapter_state(large), config.wire_dtype).count_bytes()
    assert all(row["bytes_up"] == 2 * adapter_bytes for row in rows[1:])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["adapter_base_model"] == config.large_model
