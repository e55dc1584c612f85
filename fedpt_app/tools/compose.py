"""The docker compose demo: one SuperLink, its ServerApp executor, and N SuperNodes with their ClientApp executors.

`fedpt-app compose --supernodes N` writes it (docker/compose.yaml holds N=2); `docker/up.sh` regenerates it for
`SUPERNODES=N` and starts it. TLS and SuperNode authentication are on: the credentials come from
`scripts/make-certificates.sh docker/credentials N`, and a one-shot `register` service adds every SuperNode's
public key before the SuperNodes start. Executors talk to their SuperNode's runtime API inside the compose network.
Flower's images run as the non-root user `app` (UID 49999), which cannot read the host's private keys (mode 600)
nor write to fresh named volumes: a one-shot `init-volumes` service (root) copies the credentials into a volume
owned by that user and hands it the state and model-cache volumes.
"""

from __future__ import annotations

from pathlib import Path

import yaml

FLWR_VERSION = "1.42.0"
SUPERLINK_PORT = 8000  # Fleet, Control and Runtime APIs share one HTTPS port in Flower 1.4x
RUNTIME_PORT = 9094  # a SuperNode's runtime API, for its ClientApp executor
CREDENTIALS = "/credentials"
EXECUTOR_BUILD = {
    "context": "..",
    "dockerfile": "docker/superexec.Dockerfile",
    "args": {
        "FLWR_VERSION": FLWR_VERSION,
        "TORCH_SPEC": "${TORCH_SPEC:-torch==2.13.0}",
        "TORCH_INDEX": "${TORCH_INDEX:-}",
        "PIP_OFFLINE": "${PIP_OFFLINE:-}",
    },
}
EXECUTOR_IMAGE = "fedpt-app-superexec:latest"


CREDENTIAL_VOLUME = f"credentials:{CREDENTIALS}:ro"
FLOWER_UID = 49999  # the `app` user of Flower's official images


def compose_spec(num_supernodes: int) -> dict:
    if num_supernodes < 1:
        raise ValueError(f"Need at least one SuperNode, got {num_supernodes}")
    services = {
        "init-volumes": _init_volumes(),
        "superlink": _superlink(),
        "serverapp": _serverapp(),
        "register": _register(num_supernodes),
    }
    for index in range(1, num_supernodes + 1):
        services[f"supernode-{index}"] = _supernode(index, num_supernodes)
        services[f"clientapp-{index}"] = _clientapp(index)
    return {"services": services, "volumes": {"credentials": {}, "superlink-state": {}, "model-cache": {}}}


def _init_volumes() -> dict:
    """One-shot, as root: the credentials readable (keys private) by Flower's user, the volumes writable by it."""
    script = (  # a fresh copy of every credential but the CA's private key ($$: a literal $ for compose)
        f"rm -f {CREDENTIALS}/* && for file in /host-credentials/*; do"
        f' [ "$${{file##*/}}" = ca.key ] || cp "$$file" {CREDENTIALS}/ || exit 1; done'
        f" && chown -R {FLOWER_UID}:{FLOWER_UID} {CREDENTIALS} /state /cache"
        f" && chmod 600 {CREDENTIALS}/* && chmod 644 {CREDENTIALS}/*.crt {CREDENTIALS}/*.pub"
    )
    return {
        "image": f"flwr/superlink:{FLWR_VERSION}",
        "user": "root",
        "entrypoint": ["sh", "-c", script],
        "volumes": [
            "./credentials:/host-credentials:ro",
            f"credentials:{CREDENTIALS}",
            "superlink-state:/state",
            "model-cache:/cache",
        ],
    }


def _after_init_volumes() -> dict:
    return {"init-volumes": {"condition": "service_completed_successfully"}}


def _superlink() -> dict:
    return {
        "image": f"flwr/superlink:{FLWR_VERSION}",
        "command": [
            "--isolation",
            "process",
            "--host",
            "0.0.0.0",
            "--port",
            str(SUPERLINK_PORT),
            "--ssl-ca-certfile",
            f"{CREDENTIALS}/ca.crt",
            "--ssl-certfile",
            f"{CREDENTIALS}/superlink.crt",
            "--ssl-keyfile",
            f"{CREDENTIALS}/superlink.key",
            "--enable-supernode-auth",
            "--database",
            "/state/superlink.db",
        ],
        "ports": [f"{SUPERLINK_PORT}:{SUPERLINK_PORT}"],
        "volumes": [CREDENTIAL_VOLUME, "superlink-state:/state"],
        "depends_on": _after_init_volumes(),
    }


def _serverapp() -> dict:
    return {
        "build": EXECUTOR_BUILD,
        "image": EXECUTOR_IMAGE,
        # results land in the host's docker/outputs as Flower's user: umask 000 leaves them removable by the host user
        "entrypoint": ["sh", "-c", 'umask 000 && exec flower-superexec "$$@"', "flower-superexec"],
        "command": [
            "--root-certificates",
            f"{CREDENTIALS}/ca.crt",
            "--runtime-api-address",
            f"superlink:{SUPERLINK_PORT}",
        ],
        "environment": ["FEDPT_CACHE=/cache", "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}"],
        "volumes": [CREDENTIAL_VOLUME, "model-cache:/cache", "./outputs:/outputs"],
        "depends_on": {"superlink": {"condition": "service_started"}, **_after_init_volumes()},
    }


def _register(num_supernodes: int) -> dict:
    """One-shot: allow the demo's SuperNodes to join."""
    return {
        "image": EXECUTOR_IMAGE,
        "entrypoint": ["sh", "-c", _register_script(num_supernodes)],
        "volumes": [CREDENTIAL_VOLUME],
        "depends_on": ["superlink", "serverapp"],
        "restart": "on-failure",
    }


def _supernode(index: int, num_supernodes: int) -> dict:
    return {
        "image": f"flwr/supernode:{FLWR_VERSION}",
        "command": [
            "--superlink",
            f"superlink:{SUPERLINK_PORT}",
            "--root-certificates",
            f"{CREDENTIALS}/ca.crt",
            "--auth-supernode-private-key",
            f"{CREDENTIALS}/supernode-{index}",
            "--isolation",
            "process",
            "--host",
            "0.0.0.0",
            "--port",
            str(RUNTIME_PORT),
            "--node-config",
            f'partition-id={index - 1} num-partitions={num_supernodes} model-cache="/cache"',
        ],
        "volumes": [CREDENTIAL_VOLUME],
        "depends_on": {"register": {"condition": "service_completed_successfully"}},
    }


def _clientapp(index: int) -> dict:
    return {
        "image": EXECUTOR_IMAGE,
        "command": ["--insecure", "--runtime-api-address", f"supernode-{index}:{RUNTIME_PORT}"],
        # the demo's devices share one host: without a thread cap, OpenMP threads oversubscribe the cores
        "environment": [
            "FEDPT_CACHE=/cache",
            "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}",
            "OMP_NUM_THREADS=${CLIENTAPP_THREADS:-1}",
        ],
        "volumes": ["model-cache:/cache"],
        "depends_on": [f"supernode-{index}", "serverapp"],
    }


def _register_script(num_supernodes: int) -> str:
    """Shell for the `register` service; a key registered by an earlier `up` counts as done."""
    connection = (
        f'mkdir -p $$HOME/.flwr && printf \'[superlink]\\ndefault = "demo"\\n[superlink.demo]\\n'
        f'address = "superlink:{SUPERLINK_PORT}"\\nroot-certificates = "{CREDENTIALS}/ca.crt"\\n\' '
        f"> $$HOME/.flwr/config.toml"
    )
    registrations = " && ".join(
        f"{{ out=$$(flwr supernode register {CREDENTIALS}/supernode-{index}.pub demo 2>&1) || "
        f'echo "$$out" | grep -q "already in use"; }}'
        for index in range(1, num_supernodes + 1)
    )
    return f"{connection} && {registrations}"


def write_compose(num_supernodes: int, path: Path) -> Path:
    header = (
        f"# Generated by `fedpt-app compose --supernodes {num_supernodes}` (fedpt_app/tools/compose.py); "
        "regenerate rather than edit.\n# Start with docker/up.sh (credentials, build, up). See "
        "docs/deployment.md.\n"
    )
    path.write_text(header + yaml.safe_dump(compose_spec(num_supernodes), sort_keys=False, width=120))
    return path
