import pytest

from fedpt_app import algorithms
from fedpt_app.algorithms import ALGORITHMS
from fedpt_app.config import ConfigError, RunConfig
from fedpt_app.presets import PRESETS
from fedpt_app.tools.simulation import default_run_config, validate_overrides


def test_pyproject_declares_every_key_with_a_valid_default():
    defaults = default_run_config()
    assert sorted(defaults) == sorted(RunConfig.keys())
    config = RunConfig.from_mapping(defaults)
    assert config.instruct.small_model == PRESETS["tiny"].small_model and config.data.dataset == "builtin"


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as error:
        RunConfig.from_mapping({"num-server-round": 3})
    assert "num-server-round" in str(error.value) and "num-server-rounds" in str(error.value)
    assert "Valid keys" in str(error.value)


@pytest.mark.parametrize(
    "key,value",
    [
        ("lr", "fast"),
        ("num-server-rounds", 2.5),
        ("lora-r", True),
        ("small-model", 3),
        ("secure-aggregation", 1),
        ("secure-aggregation", "yes"),
    ],
)
def test_wrong_type_is_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_mapping({key: value})


@pytest.mark.parametrize(
    "key,value",
    [
        ("lr", -1.0),
        ("fraction-train", 1.5),
        ("lora-r", 0),
        ("algorithm", "fedsgd"),
        ("partitioner", "shards"),
        ("output-dir", "relative/dir"),
        ("preset", "huge"),
        ("round-timeout", 0.0),
        ("max-update-norm", -1.0),
        ("max-num-examples", 0),
        ("dp-mode", "local"),
        ("dp-clipping-norm", 0.0),
        ("dp-noise-multiplier", -0.1),
        ("secagg-reconstruction-threshold", 0.5),
        ("local-steps", -2),
    ],
)
def test_out_of_range_values_are_rejected(key, value):
    with pytest.raises(ConfigError):
        RunConfig.from_mapping({key: value})


def test_int_is_accepted_for_float_keys():
    assert RunConfig.from_mapping({"lr": 1}).training.lr == 1.0


def test_explicit_keys_override_the_preset():
    config = RunConfig.from_mapping({"preset": "smollm2", "dataset": "/data/mine.jsonl"})
    assert config.instruct.small_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config.data.dataset == "/data/mine.jsonl"


def test_local_steps_default_to_the_familys_choice():
    assert RunConfig.from_mapping({"algorithm": "fedpt"}).local_step_cap() is None  # whole epochs
    assert RunConfig.from_mapping({"algorithm": "fedpft"}).local_step_cap() == 50  # a first result in minutes
    assert RunConfig.from_mapping({"algorithm": "fedpft", "local-steps": 0}).local_step_cap() is None
    assert RunConfig.from_mapping({"algorithm": "fedavg", "local-steps": 7}).local_step_cap() == 7


def test_learning_rate_decays_linearly_over_rounds():
    config = RunConfig.from_mapping({"lr": 1.0, "num-server-rounds": 4})
    assert [config.round_lr(r) for r in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]


def test_validate_overrides_parses_flower_syntax():
    config = validate_overrides("num-server-rounds=7 small-model='/models/x'")
    assert config.federation.num_server_rounds == 7 and config.instruct.small_model == "/models/x"
    with pytest.raises(ConfigError, match="Valid keys"):
        validate_overrides("num-rounds=7")


def test_every_algorithm_has_one_strategy_class():
    assert all(isinstance(algorithms.strategy_class(name), type) for name in ALGORITHMS)


def test_dataclass_defaults_equal_the_pyproject_defaults():
    assert RunConfig.from_mapping({}) == RunConfig.from_mapping(default_run_config())


def test_every_algorithm_has_exactly_one_strategy_class():
    strategies = {name: algorithms.strategy_class(name) for name in ALGORITHMS}
    assert len(set(strategies.values())) == len(strategies)


def test_secure_aggregation_and_dp_together_are_refused():
    with pytest.raises(ConfigError, match="cannot be combined"):
        RunConfig.from_mapping({"secure-aggregation": True, "dp-mode": "client"})


def test_a_relative_output_root_is_made_absolute_where_the_command_starts(tmp_path, monkeypatch):
    from fedpt_app.config import default_output_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDPT_OUTPUT_ROOT", "runs")
    assert default_output_root() == tmp_path / "runs"
    assert RunConfig.from_mapping({}).output_path().is_relative_to(tmp_path / "runs")
