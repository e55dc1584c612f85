"""Around a run: trackers read back with their own readers, the privacy budget against the accountant's values, the
quiet terminal, and preflight errors in one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedpt_app.config import ConfigError, PrivacyConfig, RunConfig
from fedpt_app.federation.metrics_log import MetricsLog
from fedpt_app.federation.privacy import PrivacyBudget, PrivacyBudgetSpent
from fedpt_app.tools.cli import final_table
from fedpt_app.tools.preflight import preflight
from fedpt_app.tools.simulation import quiet_line

ROWS = [
    {"round": 0, "algorithm": "fedavg", "train_loss": None, "rouge_l_small": 20.0, "problems": []},
    {"round": 1, "algorithm": "fedavg", "train_loss": 1.5, "rouge_l_small": 30.0, "clients_sampled": ["partition-0"]},
    {"round": 2, "algorithm": "fedavg", "train_loss": 1.2, "rouge_l_small": 35.0, "clients_sampled": ["partition-1"]},
]


def test_every_tracker_receives_the_rows_and_the_summary(tmp_path, monkeypatch):
    started_in = tmp_path / "started-in"  # nothing may land in the folder the run started from
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log = MetricsLog(
        tmp_path,
        {"algorithm": "fedavg", "lr": 0.003},
        score_names=("rouge_l_small",),
        report_to=("tensorboard", "wandb", "mlflow"),
    )
    for row in ROWS:
        log.append(row, num_rounds=2)
    log.write_summary({"algorithm": "fedavg"})

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("rouge_l_small")] == [(0, 20.0), (1, 30.0), (2, 35.0)]
    assert [e.value for e in events.Scalars("train_loss")] == pytest.approx([1.5, 1.2])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedpt-app").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "rouge_l_small")] == [
        (0, 20.0),
        (1, 30.0),
        (2, 35.0),
    ]
    assert run.data.params["lr"] == "0.003"
    assert json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert list(started_in.iterdir()) == [] and any((tmp_path / "mlflow-artifacts").rglob("summary.json"))

    # W&B offline: the run file holds wandb's protobuf records (wandb 0.31 ships no Python reader of it; `wandb sync`
    # uploads it), read here with wandb's own record schema
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]
    assert [(row["_step"], row["rouge_l_small"]) for row in history] == [(0, 20.0), (1, 30.0), (2, 35.0)]
    config = {
        item.key: json.loads(item.value_json)
        for record in records
        if record.WhichOneof("record_type") == "run"
        for item in record.run.config.update
    }
    assert config["lr"] == 0.003
    summary = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for record in records
        if record.WhichOneof("record_type") == "summary"
        for item in record.summary.update
    }
    assert summary["final/rouge_l_small"] == 35.0 and summary["rounds"] == 2


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file: a LevelDB-style log (a 7-byte header, then 32 KiB blocks of records,
    each with a 7-byte header: crc32, length, type full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, position, block, records, pending = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:
            break
    return records


def _hand_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """The Gaussian mechanism without subsampling: RDP α·steps/(2σ²) at every order α, turned into (ε, δ) as Opacus
    does (Balle et al. 2020), minimized over Opacus' default orders."""
    from opacus.accountants.rdp import RDPAccountant

    best = math.inf
    for order in RDPAccountant.DEFAULT_ALPHAS:
        rdp = order * steps / (2 * noise_multiplier**2)
        eps = rdp + math.log((order - 1) / order) - (math.log(delta) + math.log(order)) / (order - 1)
        best = min(best, eps)
    return best


def test_a_resumed_runs_tensorboard_shows_each_round_once_without_the_discarded_ones(tmp_path):
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLog(tmp_path, {}, report_to=("tensorboard",))
    for number in range(4):  # rounds 2 and 3 after the last checkpoint, which was round 1
        first.append({"round": number, "train_loss": float(number)}, num_rounds=4)
    first.write_summary({})
    time.sleep(1.1)  # event files are named by the second they start in
    resumed = MetricsLog(tmp_path, {}, keep_rounds_upto=1, report_to=("tensorboard",))
    resumed.append({"round": 2, "train_loss": 20.0}, num_rounds=4)
    resumed.write_summary({})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(0, 0.0), (1, 1.0), (2, 20.0)]


def test_the_budget_spends_what_the_rdp_accountant_computes():
    budget = PrivacyBudget(PrivacyConfig(dp_mode="server", dp_noise_multiplier=1.0, dp_delta=1e-5))
    assert budget.epsilon() == 0.0
    spent = [budget.spend(1.0) for _ in range(3)]
    assert spent == pytest.approx([_hand_epsilon(1.0, steps, 1e-5) for steps in (1, 2, 3)], rel=1e-9)
    assert spent[1] == pytest.approx(7.077, abs=1e-3)
    subsampled = PrivacyBudget(PrivacyConfig(dp_mode="server", dp_noise_multiplier=1.0, dp_delta=1e-5))
    assert [round(subsampled.spend(0.5), 3) for _ in range(2)] == [3.894, 5.377]
    resumed = PrivacyBudget(PrivacyConfig(dp_mode="server", dp_noise_multiplier=1.0, dp_delta=1e-5), [1.0, 1.0])
    assert resumed.epsilon() == pytest.approx(spent[1])


def test_a_plan_over_the_target_is_refused_and_a_round_over_it_stops_the_run():
    privacy = PrivacyConfig(dp_mode="server", dp_noise_multiplier=1.0, dp_target_epsilon=8.0)
    budget = PrivacyBudget(privacy)
    budget.check_plan(rounds=4, sample_rate=0.5)  # ε = 7.41
    with pytest.raises(ConfigError, match=r"5 rounds at sampling rate 0.5 .* ε=8.23"):
        budget.check_plan(rounds=5, sample_rate=0.5)
    budget.spend(1.0)
    budget.spend(1.0)  # ε = 7.08
    with pytest.raises(PrivacyBudgetSpent, match=r"Round 3 would bring ε to 9.01"):
        budget.check_round(3, 1.0)
    with pytest.raises(ConfigError, match="dp-target-epsilon"):
        RunConfig.from_mapping({"dp-target-epsilon": 1.0})  # no DP: no target


def test_the_preflight_plans_privacy_at_the_rate_the_nodes_give():
    """fraction-train=0.5 of 2 nodes with min-train-nodes=2 samples both: q = 1, and 4 rounds pass ε = 8."""
    config = RunConfig.from_mapping(
        {
            "num-server-rounds": 4,
            "fraction-train": 0.5,
            "min-train-nodes": 2,
            "dp-mode": "server",
            "dp-noise-multiplier": 1.0,
            "dp-target-epsilon": 8.0,
        }
    )
    preflight(config)  # the node count unknown: q = fraction-train = 0.5, ε = 7.41
    preflight(config, num_nodes=4)  # 2 of 4: q = 0.5
    with pytest.raises(ConfigError, match="4 rounds at sampling rate 1 "):
        preflight(config, num_nodes=2)


def test_the_quiet_terminal_keeps_the_apps_lines_and_errors_only():
    assert quiet_line("\x1b[92mINFO \x1b[0m:      [fedpt-app] round 1/10 | train_loss 1.8\n") == (
        "[fedpt-app] round 1/10 | train_loss 1.8\n"
    )
    assert quiet_line("INFO :      [ROUND 2/10]\n") is None
    assert quiet_line("\x1b[36m(ClientAppActor pid=31241)\x1b[0m INFO : [fedpt-app] node 2's training rows\n") is None
    assert quiet_line("/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray\n") is None
    assert quiet_line("ERROR :     ServerApp thread raised an exception\n") is not None


def test_a_missing_model_or_data_file_is_one_line_naming_the_key_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"^small-model='/no/such/model': Model path '/no/such/model' does not"):
        preflight(RunConfig.from_mapping({"small-model": "/no/such/model"}))
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"instruction": "Say hi.", "response": "hi"}\n{"instruction": "broken\n')
    with pytest.raises(ConfigError, match=r"^dataset='.*data.jsonl': .*data.jsonl:2: malformed JSON"):
        preflight(RunConfig.from_mapping({"dataset": str(bad)}))
    with pytest.raises(ConfigError, match=r"^foundation-model='/no/fm'"):
        preflight(RunConfig.from_mapping({"algorithm": "fedpft", "foundation-model": "/no/fm"}))
    preflight(RunConfig.from_mapping({}))  # the defaults resolve (the embedded preset is built on first use)

    result = subprocess.run(
        [sys.executable, "-m", "fedpt_app.tools.cli", "check-config", "--run-config", "small-model='/no/such/model'"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "fedpt-app check-config: small-model='/no/such/model': Model path '/no/such/model' does not exist or is "
        "not a model folder"
    ]


def test_compare_entries_are_algorithms_or_variants_with_their_own_overrides():
    from fedpt_app.tools.compare import Entry, parse_entries

    entries = parse_entries("fedpft, fedpft[align-before=false compressed-layers='1,2'],fedot")
    assert entries == [
        Entry("fedpft", "fedpft"),
        Entry(
            "fedpft[align-before=false compressed-layers='1,2']", "fedpft", "align-before=false compressed-layers='1,2'"
        ),
        Entry("fedot", "fedot"),
    ]
    assert entries[1].folder == "fedpft-align-before-false-compressed-layers-1-2"
    with pytest.raises(ConfigError, match="Unknown algorithm entry 'fedsgd"):
        parse_entries("fedpft,fedsgd[lr=1]")
    with pytest.raises(ConfigError, match="twice"):
        parse_entries("fedpft,fedpft")
    for typo in ("fedpft[align-before = false]", "fedpft[no-align]", "fedpft[]", "fedpft]", "fedpft[lr=1"):
        with pytest.raises(ConfigError, match="key=value|Unbalanced|Unknown"):
            parse_entries(typo)


def test_a_variants_override_replaces_the_shared_one_and_compares_own_keys_are_refused(tmp_path):
    from fedpt_app.tools.compare import parse_entries, run_overrides
    from fedpt_app.tools.simulation import validate_overrides

    (variant,) = parse_entries("fedpft[local-steps=0 lora-target-modules='query value']")
    overrides = run_overrides("preset='minilm-rt' local-steps=100 lr=0.002", variant, 2, tmp_path)
    config = validate_overrides(overrides)  # a key given twice would be a TOML error
    assert (config.training.local_steps, config.training.lr, config.seed) == (0, 0.002, 2)
    assert config.lora.target_modules == "query value"
    assert config.output_path() == tmp_path / variant.folder / "seed2"
    with pytest.raises(ConfigError, match="compare sets"):
        parse_entries("fedpft[seed=3]")
    with pytest.raises(ConfigError, match="--run-config 'lr=1 lr=2'"):
        validate_overrides("lr=1 lr=2")


def test_the_runs_closing_table_shows_the_untuned_and_final_models_and_three_answers(tmp_path):
    rows = [
        {"round": 0, "rouge_l_small": 20.0, "exact_match_small": 0.0, "rouge_l_large": 21.0, "exact_match_large": 1.0},
        {
            "round": 1,
            "rouge_l_small": 60.0,
            "exact_match_small": 30.0,
            "rouge_l_proxy": 70.0,
            "exact_match_proxy": 45.0,
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {"algorithm": "fedpt", "rounds": 1, "total_seconds": 5.0, "final": rows[1]}
    summary["proxy_adapter_dir"] = str(tmp_path / "proxy-adapter")
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    answers = [("capital", "what is the capital of peru?", "the answer is lima.")] * 2 + [
        ("parity", "is 3 even or odd?", "the answer is odd."),
        ("job", "what is the job of anna quill?", "the answer is cook."),
        ("color", "what color is snow?", "the answer is white."),
    ]
    (tmp_path / "predictions_proxy.jsonl").write_text(
        "".join(
            json.dumps({"category": c, "instruction": q, "context": "", "reference": a, "prediction": a}) + "\n"
            for c, q, a in answers
        )
    )
    lines = final_table(tmp_path).splitlines()
    table = {line.split("  ")[0]: line.split()[-2:] for line in lines if line.startswith(("small", "large", "proxy"))}
    assert table == {
        "small (untuned)": ["20.0", "0.0"],
        "large (untuned)": ["21.0", "1.0"],
        "small": ["60.0", "30.0"],
        "proxy": ["70.0", "45.0"],
    }
    examples = lines[lines.index("answers of the proxy model (test split):") + 1 :][:3]
    questions = [line.split(" -> ")[0].strip() for line in examples]
    assert questions == ["what is the capital of peru?", "is 3 even or odd?", "what is the job of anna quill?"]
    assert (
        lines[-1] == f"files: {tmp_path} (metrics.jsonl, summary.json, predictions, plots/, adapter/, proxy-adapter/)"
    )
