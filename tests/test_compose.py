"""The docker compose demo: generated for N SuperNodes, TLS and authentication on, valid for docker-compose."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedpt_app.tools.compose import compose_spec, write_compose

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def test_the_committed_compose_file_is_the_generated_one_for_two_supernodes(tmp_path):
    assert write_compose(2, tmp_path / "compose.yaml").read_text() == (DOCKER / "compose.yaml").read_text()


def test_n_supernodes_each_hold_their_own_partition_with_tls_and_authentication():
    services = compose_spec(3)["services"]
    nodes = [services[f"supernode-{k}"] for k in (1, 2, 3)]
    configs = [node["command"][node["command"].index("--node-config") + 1] for node in nodes]
    assert [config.split()[0] for config in configs] == ["partition-id=0", "partition-id=1", "partition-id=2"]
    assert all("num-partitions=3" in config for config in configs)
    for k, node in enumerate(nodes, start=1):
        assert "--insecure" not in node["command"] and "--root-certificates" in node["command"]
        assert f"/credentials/supernode-{k}" in node["command"]
        assert node["depends_on"]["register"]["condition"] == "service_completed_successfully"
        assert services[f"clientapp-{k}"]["command"][-1] == f"supernode-{k}:9094"
    superlink = services["superlink"]["command"]
    assert "--enable-supernode-auth" in superlink and "--insecure" not in superlink
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"} <= set(superlink)
    assert "./outputs:/outputs" in services["serverapp"]["volumes"]
    assert all("model-cache:/cache" in services[name]["volumes"] for name in ("serverapp", "clientapp-1"))
    assert "supernode-3.pub" in services["register"]["entrypoint"][-1]


def test_at_least_one_supernode():
    with pytest.raises(ValueError, match="at least one"):
        compose_spec(0)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_accepts_the_files(tmp_path):
    shutil.copytree(DOCKER, tmp_path / "docker", ignore=shutil.ignore_patterns("credentials", "outputs"))
    write_compose(4, tmp_path / "docker" / "compose.yaml")
    result = subprocess.run(
        ["docker-compose", "-f", "compose.yaml", "-f", "compose.gpu.yaml", "config"],
        cwd=tmp_path / "docker",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert set(yaml.safe_load(result.stdout)["services"]) >= {"superlink", "serverapp", "supernode-4", "clientapp-4"}


def _dependencies(services: dict, name: str) -> set[str]:
    depends = services[name].get("depends_on", [])
    direct = set(depends if isinstance(depends, list) else depends)
    return direct.union(*(_dependencies(services, other) for other in direct))


def test_flower_services_start_after_the_volumes_are_handed_to_flowers_user():
    """Flower's images run as UID 49999: the host's private keys (mode 600) are copied into a volume it owns."""
    services = compose_spec(2)["services"]
    init = services["init-volumes"]
    assert init["user"] == "root" and "./credentials:/host-credentials:ro" in init["volumes"]
    assert "chown -R 49999:49999 /credentials /state /cache" in init["entrypoint"][-1]
    assert "= ca.key ] || cp" in init["entrypoint"][-1]  # the CA's private key stays on the host
    for name, service in services.items():
        volumes = service.get("volumes", [])
        assert not any(volume.startswith("./credentials:/credentials") for volume in volumes), name
        if name != "init-volumes" and any(volume.split(":")[0] in {"credentials", "model-cache"} for volume in volumes):
            assert "init-volumes" in _dependencies(services, name), name
