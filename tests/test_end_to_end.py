"""End-to-end `flwr run .` simulations on the embedded tiny preset (pre-trained once into FEDPT_CACHE)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedpt_app.models.loading import resolve_model_ref, tiny_preset_dir
from fedpt_app.models.lora import LoraSpec, adapter_state, lora_model, to_array_record
from fedpt_app.serving.background import service_process
from fedpt_app.tools.simulation import run_simulation, validate_overrides
from tests.test_logits_service import free_port


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
    return _simulate(tmp_path_factory.mktemp("fedavg"), f"algorithm='fedavg' report-to='tensorboard' {QUICK}")


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
    model = lora_model(config.instruct.small_model, LoraSpec.from_settings(config.lora), seed=config.seed)
    adapter_bytes = to_array_record(adapter_state(model), config.federation.wire_dtype).count_bytes()
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
    base = AutoModelForCausalLM.from_pretrained(resolve_model_ref(config.instruct.small_model))
    model = PeftModel.from_pretrained(base, output / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_a_run_writes_its_plots_and_its_tensorboard_events(fedavg_run):
    _, output, _ = fedavg_run
    assert all((output / "plots" / name).stat().st_size > 10_000 for name in ("scores.png", "traffic.png", "time.png"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("rouge_l_small")] == [0, 1, 2]
    assert [event.value for event in events.Scalars("rouge_l_small")] == pytest.approx(
        [row["rouge_l_small"] for row in _rows(output)]
    )


def test_export_writes_an_adapter_and_a_merged_model_others_load(fedavg_run, tmp_path):
    """Loaded in a fresh process: the adapter through the base it names, the merged model with transformers alone;
    both give the same logits, and the card states the run's facts."""
    import subprocess
    import sys

    _, output, _ = fedavg_run
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpt_app.tools.cli",
            "export",
            "--run",
            str(output),
            "--out",
            str(tmp_path / "export"),
            "--merge",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    check = f"""
import json, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = json.load(open("{tmp_path}/export/adapter/adapter_config.json"))["base_model_name_or_path"]
assert base == "{resolve_model_ref("tiny-small")}", base  # an absolute folder: the embedded preset's
tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "{tmp_path}/export/adapter").eval()
merged = AutoModelForCausalLM.from_pretrained("{tmp_path}/export/merged").eval()
ids = torch.tensor([[1, 5, 9, 14, 3]])
with torch.no_grad():
    print(float((tuned(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max()))
"""
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert float(loaded.stdout.strip().splitlines()[-1]) < 1e-4
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| algorithm | `fedavg` |" in card and "rouge_l_small" in card and "| rounds | 2 of 2" in card


def test_a_run_stops_before_the_round_that_would_pass_its_privacy_target(tmp_path):
    """fraction-train=0.5 plans ε = 7.41 over 4 rounds (q = 0.5), under the target of 8; but min-train-nodes=2 of 2
    nodes makes q = 1: ε = 4.73 after round 1, 7.08 after round 2, and round 3 would reach 9.01."""
    outcome, output, _ = _simulate(
        tmp_path,
        "algorithm='fedavg' num-server-rounds=4 fraction-train=0.5 min-train-nodes=2 eval-samples=9 "
        "max-new-tokens=8 dp-mode='server' dp-noise-multiplier=1.0 dp-target-epsilon=8.0",
    )
    assert outcome.succeeded, outcome.log[-3000:]
    assert "Round 3 would bring ε to 9.01 > dp-target-epsilon=8" in outcome.log
    rows = _rows(output)
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert [row["dp_sample_rate"] for row in rows[1:]] == [1.0, 1.0]
    assert [round(row["epsilon"], 3) for row in rows[1:]] == [4.729, 7.077]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["rounds"] == 2 and round(summary["epsilon"], 3) == 7.077 and summary["dp_delta"] == 1e-5
    assert (output / "adapter" / "adapter_model.safetensors").exists()


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
    summary = json.loads((output / "summary.json").read_text())
    assert summary["final"]["rouge_l_proxy"] is not None
    assert not [key for key in summary if key.startswith("best_")]  # no round picked on the test set


def test_fedpt_broadcasts_the_distilled_adapter(fedpt_run):
    _, output, config = fedpt_run
    model = lora_model(config.instruct.small_model, LoraSpec.from_settings(config.lora), seed=config.seed)
    adapter_bytes = to_array_record(adapter_state(model), config.federation.wire_dtype).count_bytes()
    assert all(row["bytes_up"] == row["bytes_down"] == 2 * adapter_bytes for row in _rows(output)[1:])


def test_fedpt_scores_its_proxy_with_the_adapter_proxy_adapter_names(fedpt_run, tmp_path):
    """By default (proxy-adapter='aggregate') FedPT's reported proxy answers come from the last round's aggregate
    (saved as proxy-adapter/, the distillation's teacher) and its small's from the distilled adapter/; with
    proxy-adapter='distilled' both come from adapter/, while training, and so adapter/, stay bit for bit the same.
    The answers are re-decoded here with FedAvg+PT's evaluation, which scores one adapter for small and proxy."""
    import dataclasses

    from peft import set_peft_model_state_dict

    from fedpt_app.instruct.strategies.fedavg_pt import FedAvgProxyTuning
    from fedpt_app.tools.export import export_run

    _, output, config = fedpt_run
    assert config.instruct.proxy_adapter == "aggregate"
    outcome, distilled_output, _ = _simulate(tmp_path, f"{QUICK} kd-steps=4 kd-samples=64 proxy-adapter='distilled'")
    assert outcome.succeeded, outcome.log[-3000:]
    distilled = load_file(output / "adapter" / "adapter_model.safetensors")
    distilled_run_adapter = load_file(distilled_output / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(distilled[key], distilled_run_adapter[key]) for key in distilled_run_adapter)
    aggregate = load_file(output / "proxy-adapter" / "adapter_model.safetensors")
    assert aggregate.keys() == distilled.keys()
    assert not all(torch.equal(aggregate[key], distilled[key]) for key in aggregate)  # distillation moved it
    assert json.loads((output / "summary.json").read_text())["proxy_adapter_dir"] == str(output / "proxy-adapter")
    assert not (distilled_output / "proxy-adapter").exists()

    evaluator = FedAvgProxyTuning(dataclasses.replace(config, output_dir=str(tmp_path / "again")))

    def answers_with(adapter: dict, model_name: str) -> list[str]:
        set_peft_model_state_dict(evaluator.model, adapter)
        evaluator.evaluate_models(config.federation.num_server_rounds, adapter_state(evaluator.model))
        return answers_of(tmp_path / "again", model_name)

    assert answers_with(distilled, "small") == answers_of(output, "small") == answers_of(distilled_output, "small")
    assert answers_with(distilled, "proxy") == answers_of(distilled_output, "proxy")
    assert answers_with(aggregate, "proxy") == answers_of(output, "proxy")
    assert answers_of(output, "proxy") != answers_of(distilled_output, "proxy")  # so the checks tell them apart

    exported = export_run(output, tmp_path / "export")
    assert load_file(Path(exported["proxy-adapter"]) / "adapter_model.safetensors").keys() == aggregate.keys()
    assert "proxy-adapter/" in (tmp_path / "export" / "README.md").read_text()
    shutil.copytree(output / "proxy-adapter", distilled_output / "proxy-adapter")  # a stale one, of an earlier run
    assert "proxy-adapter" not in export_run(distilled_output, tmp_path / "export-distilled")


def answers_of(output: Path, model_name: str) -> list[str]:
    lines = (output / f"predictions_{model_name}.jsonl").read_text().splitlines()
    return [json.loads(line)["prediction"] for line in lines]


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
    large = lora_model(config.instruct.large_model, LoraSpec.from_settings(config.lora), seed=config.seed)
    adapter_bytes = to_array_record(adapter_state(large), config.federation.wire_dtype).count_bytes()
    assert all(row["bytes_up"] == 2 * adapter_bytes for row in rows[1:])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["adapter_base_model"] == config.instruct.large_model


def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_adapter(tmp_path):
    """Kill the ServerApp process mid-run, rerun with the same output-dir: the final adapters (FedPT's distilled
    adapter/ and its proxy's proxy-adapter/, restored from the checkpoint's server state) are bit for bit the
    uninterrupted run's, with half of the 4 clients sampled per round (the client schedule depends on the seed and
    the round only, not on the node ids Flower assigns at each start)."""
    import os
    import signal
    import threading
    import time

    from fedpt_app.federation.checkpoint import load_checkpoint
    from fedpt_app.tools.simulation import local_superlink_pids, stop_local_superlink

    overrides = "num-server-rounds=4 fraction-train=0.5 eval-interval=0 kd-steps=4 kd-samples=32"
    full, full_output, _ = _simulate(tmp_path / "full", overrides, num_supernodes=4)
    assert full.succeeded, full.log[-3000:]

    home, output = tmp_path / "crash" / "flwr", tmp_path / "crash" / "out"
    run_config = f"{overrides} output-dir='{output}'"
    outcomes = []
    runner = threading.Thread(
        target=lambda: outcomes.append(run_simulation(run_config, num_supernodes=4, flwr_home=home, echo=None))
    )
    runner.start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and runner.is_alive():
        if (output / "checkpoint.pt").exists() and load_checkpoint(output).completed_round >= 1:
            break
        time.sleep(0.05)
    for pid in local_superlink_pids(home):  # the crash: the ServerApp's process dies, then the rest
        if "flwr-simulation" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            os.kill(pid, signal.SIGKILL)
    stop_local_superlink(home)
    runner.join(timeout=300)
    assert outcomes and not outcomes[0].succeeded
    interrupted_at = load_checkpoint(output).completed_round
    assert 1 <= interrupted_at < 4 and not (output / "summary.json").exists()

    resumed = run_simulation(run_config, num_supernodes=4, flwr_home=home, echo=None)
    assert resumed.succeeded, resumed.log[-3000:]
    assert f"resuming from the checkpoint of round {interrupted_at}" in resumed.log
    assert [row["round"] for row in _rows(output)] == [0, 1, 2, 3, 4]
    schedule = [row["clients_sampled"] for row in _rows(full_output)[1:]]
    assert [row["clients_sampled"] for row in _rows(output)[1:]] == schedule
    assert all(len(clients) == 2 for clients in schedule) and len({tuple(c) for c in schedule}) > 1
    for folder in ("adapter", "proxy-adapter"):  # the distilled small, and the aggregate its proxy uses
        uninterrupted = load_file(full_output / folder / "adapter_model.safetensors")
        after_resume = load_file(output / folder / "adapter_model.safetensors")
        assert uninterrupted.keys() == after_resume.keys()
        assert all(torch.equal(uninterrupted[key], after_resume[key]) for key in uninterrupted)


def _honest_round(config, partitions, num_partitions: int) -> tuple[list[dict], list[float]]:
    """The first round of the given partitions' clients, recomputed here with the run's seeds: (adapters, weights)."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedpt_app.device.dispatch import train
    from fedpt_app.models.lora import from_array_record
    from fedpt_app.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, RoundConfig
    from tests.test_reliability import _received

    model = lora_model(config.instruct.small_model, LoraSpec.from_settings(config.lora), seed=config.seed)
    initial = to_array_record(adapter_state(model), "float32")
    budget = config.training.max_length - config.instruct.max_new_tokens
    round_config = RoundConfig(1, config.round_lr(1), trained_model="small", prompt_budget=budget).to_record()
    states, weights = [], []
    for partition in partitions:
        node_config = {"partition-id": partition, "num-partitions": num_partitions}
        context = Context(
            run_id=1, node_id=partition, node_config=node_config, state=RecordDict(), run_config=config.to_mapping()
        )
        instruction = _received(0, RecordDict({ARRAYS_KEY: initial, CONFIG_KEY: ConfigRecord(dict(round_config))}))
        reply = train(instruction, context)
        states.append(from_array_record(reply.content[ARRAYS_KEY]))
        weights.append(float(reply.content[METRICS_KEY]["num-examples"]))
    return states, weights


def _hand_fedavg(states: list[dict], weights: list[float]) -> dict:
    """sum_k w_k·A_k / sum_k w_k for every tensor, written out here rather than taken from the app."""
    return {
        key: sum(w * state[key].double() for state, w in zip(states, weights, strict=True)) / sum(weights)
        for key in states[0]
    }


def test_a_round_with_crashing_nan_and_misshapen_clients_aggregates_the_honest_ones(tmp_path):
    """5 real ClientApps, 3 of them faulty (tests/fault_app): the round completes, the faults are counted and
    named, and the global adapter is exactly FedAvg of the two honest clients' updates."""
    import shutil

    app = tmp_path / "app"
    app.mkdir()
    project = Path(__file__).resolve().parent.parent
    shutil.copy(project / "server_app.py", app)
    shutil.copy(project / "tests" / "fault_app" / "faulty_client_app.py", app)
    pyproject = (project / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        pyproject.replace('clientapp = "client_app:app"', 'clientapp = "faulty_client_app:app"')
    )
    tiny_preset_dir()
    output = tmp_path / "out"
    run_config = (
        f"algorithm='fedavg' num-server-rounds=1 fraction-train=1.0 eval-samples=9 max-new-tokens=16 "
        f"output-dir='{output}'"
    )
    outcome = run_simulation(run_config, num_supernodes=5, app_dir=app, flwr_home=tmp_path / "flwr", echo=None)
    assert outcome.succeeded, outcome.log[-3000:]
    row = _rows(output)[1]
    assert (row["clients"], row["failures"], row["rejected"]) == (2, 1, 2)
    problems = " | ".join(row["problems"])
    assert "injected fault" in problems and "NaN" in problems and "has shape" in problems

    expected = _hand_fedavg(*_honest_round(validate_overrides(run_config), (0, 1), 5))
    final = load_file(output / "adapter" / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(final[key].double(), value, rtol=0, atol=1e-5)


def test_client_side_dp_clips_on_the_devices_and_noises_the_aggregate(tmp_path):
    outcome, output, _ = _simulate(
        tmp_path,
        "algorithm='fedavg' num-server-rounds=2 fraction-train=1.0 "
        "eval-samples=9 dp-mode='client' dp-clipping-norm=0.05 "
        "dp-noise-multiplier=0.5",
    )
    assert outcome.succeeded, outcome.log[-3000:]
    for row in _rows(output)[1:]:
        assert row["clients"] == 2 and row["rejected"] == 0
        assert row["update_norm_max"] <= 0.05 * 1.001  # clipped by Flower's fixedclipping_mod on each device
        assert row["dp_noise_stdv"] == pytest.approx(0.5 * 0.05 / 2)


def test_secure_aggregation_runs_secagg_plus_and_aggregates_like_fedavg(tmp_path):
    outcome, output, _ = _simulate(
        tmp_path,
        "algorithm='fedpt' num-server-rounds=2 fraction-train=1.0 eval-samples=9 kd-steps=2 secure-aggregation=true",
        num_supernodes=3,
    )
    assert outcome.succeeded, outcome.log[-3000:]
    assert "aggregate_fit: received 3 results and 0 failures" in outcome.log  # logged by SecAggPlusWorkflow
    rows = _rows(output)
    assert [row["round"] for row in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"] == 3 and row["secure_aggregation"] == "secagg+" and row["bytes_up"] is None
        assert row["kd_loss"] is not None and row["train_loss"] > 0
    assert (output / "adapter" / "adapter_model.safetensors").exists()


def test_secure_aggregation_gives_the_fedavg_of_the_clients_adapters(tmp_path):
    """One FedAvg round under SecAgg+: the final adapter is the hand-computed FedAvg of the three clients' adapters,
    up to SecAgg+'s quantization (2^22 levels over [-8, 8])."""
    run = "algorithm='fedavg' num-server-rounds=1 fraction-train=1.0 eval-samples=9 max-new-tokens=16 "
    outcome, output, config = _simulate(tmp_path, run + "secure-aggregation=true", num_supernodes=3)
    assert outcome.succeeded, outcome.log[-3000:]
    expected = _hand_fedavg(*_honest_round(config, (0, 1, 2), 3))
    final = load_file(output / "adapter" / "adapter_model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(final[key].double(), value, rtol=0, atol=2e-5)


def test_compare_gives_every_algorithm_the_same_clients_and_reports_mean_and_std_over_seeds(tmp_path, monkeypatch):
    from fedpt_app.tools import simulation
    from fedpt_app.tools.compare import run_comparison

    tiny_preset_dir()
    run = simulation.run_simulation
    monkeypatch.setattr(
        "fedpt_app.tools.compare.run_simulation",
        lambda overrides, num_supernodes, client_gpus, verbose: run(
            overrides, num_supernodes=num_supernodes, client_gpus=client_gpus, flwr_home=tmp_path / "flwr", echo=None
        ),
    )
    output = tmp_path / "compare"
    assert run_comparison(
        "fedavg,fedavg-pt,fedavg-pt[proxy-alpha=0.5]",  # an ablation variant with its own overrides
        "num-server-rounds=2 fraction-train=0.5 eval-samples=9 max-new-tokens=8",
        output,
        num_supernodes=4,
        seeds=(0, 1),
    )
    variant = json.loads((output / "fedavg-pt-proxy-alpha-0.5" / "seed0" / "config.json").read_text())
    assert variant["proxy_alpha"] == 0.5 and variant["algorithm"] == "fedavg-pt"
    schedules = {
        (name, seed): [row["clients_sampled"] for row in _rows(output / name / f"seed{seed}")[1:]]
        for name in ("fedavg", "fedavg-pt")
        for seed in (0, 1)
    }
    assert schedules[("fedavg", 0)] == schedules[("fedavg-pt", 0)]  # same seed: the same clients every round
    assert schedules[("fedavg", 1)] == schedules[("fedavg-pt", 1)]
    assert schedules[("fedavg", 0)] != schedules[("fedavg", 1)]
    summary = json.loads((output / "comparison.json").read_text())
    finals = [_rows(output / "fedavg" / f"seed{seed}")[-1]["rouge_l_small"] for seed in (0, 1)]
    stats = summary["algorithms"]["fedavg"]["rouge_l_small"]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(sum(finals) / 2)
    assert stats["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
    assert "exact_match_proxy" in summary["algorithms"]["fedavg-pt"] and summary["seeds"] == [0, 1]
    assert "fedavg-pt[proxy-alpha=0.5]" in summary["algorithms"]
    assert "± " in (output / "comparison.md").read_text()
    assert (output / "rouge_l.png").stat().st_size > 10_000 and (output / "exact_match.png").exists()


@pytest.fixture
def logits_service(tmp_path):
    """`fedpt-app serve-logits` for the preset's large model, as its owner would start it, in its own process."""
    token_file = tmp_path / "token"
    token_file.write_text("e2e-token-0123456789abcdef\n")
    port = free_port()
    command = [
        "fedpt-app",
        "serve-logits",
        "--model",
        "tiny-large",
        "--port",
        str(port),
        "--token-file",
        str(token_file),
    ]
    with service_process(command, f"http://127.0.0.1:{port}", ready_path="/healthz", timeout_s=120) as url:
        yield url, "e2e-token-0123456789abcdef"


def test_fedpt_with_the_large_model_behind_serve_logits_matches_the_local_run(
    fedpt_run, logits_service, tmp_path, monkeypatch
):
    url, token = logits_service
    monkeypatch.setenv("FEDPT_LOGITS_TOKEN", token)  # the ServerApp reads it; it never enters the run config
    outcome, output, config = _simulate(tmp_path, f"{QUICK} kd-steps=4 kd-samples=64 large-model='{url}'")
    assert outcome.succeeded, outcome.log[-3000:]
    assert config.instruct.large_model == url and token not in json.dumps(config.to_mapping())
    remote_rows, local_rows = _rows(output), _rows(fedpt_run[1])
    scores = [key for key in local_rows[1] if key.startswith(("rouge_l_", "exact_match_"))]
    assert "rouge_l_proxy" in scores and "exact_match_proxy" in scores
    for remote_row, local_row in zip(remote_rows, local_rows, strict=True):
        for key in scores + ["kd_loss"]:
            if local_row.get(key) is not None:
                assert remote_row[key] == pytest.approx(local_row[key], rel=1e-4, abs=1e-4), (key, remote_row["round"])
