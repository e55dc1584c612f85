"""The deployment engine for real: SuperLink and SuperNodes as processes on loopback (the compose topology),
insecure and with TLS + SuperNode authentication, 2 rounds of the default preset each."""

import json
import subprocess

import pytest

from fedpt_app.models.loading import tiny_preset_dir
from fedpt_app.tools.deployment import LocalDeployment

QUICK = "num-server-rounds=2 fraction-train=1.0 eval-samples=9 max-new-tokens=8 kd-steps=2"


def _rows(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def preset():
    tiny_preset_dir()  # built once here, shared by every device through model-cache


def _check_two_rounds(outcome, output, algorithm):
    assert outcome.succeeded, outcome.log[-3000:]
    rows = _rows(output)
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["algorithm"] == algorithm for row in rows)
    assert all(row["clients"] == 2 and row["failures"] == 0 for row in rows[1:])


def test_insecure_deployment_runs_two_rounds(tmp_path):
    deployment = LocalDeployment(tmp_path, num_supernodes=2, secure=False)
    try:
        with deployment:
            output = tmp_path / "out"
            outcome = deployment.run(f"algorithm='fedavg' {QUICK} output-dir='{output}'", echo=None)
            _check_two_rounds(outcome, output, "fedavg")
    finally:
        assert deployment.alive() == []


def test_tls_with_supernode_authentication_runs_and_refuses_unregistered_devices(tmp_path):
    deployment = LocalDeployment(tmp_path, num_supernodes=2, secure=True)
    try:
        with deployment:
            output = tmp_path / "out"
            outcome = deployment.run(f"{QUICK} output-dir='{output}'", echo=None)  # the default: FedPT
            _check_two_rounds(outcome, output, "fedpt")

            rogue_key = tmp_path / "rogue"
            subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(rogue_key)], check=True)
            rogue = deployment.start_supernode(1, private_key=rogue_key, name="rogue")
            assert rogue.wait(timeout=120) != 0
            assert "Failed to activate SuperNode" in (deployment.logs / "rogue.log").read_text()
            assert "No SuperNode found with the given public key" in (deployment.logs / "superlink.log").read_text()
    finally:
        assert deployment.alive() == []
