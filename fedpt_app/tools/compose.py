"""The docker compose demo: one SuperLink, its ServerApp executor, and N SuperNodes with their ClientApp executors.

`fedpt-app compose --supernodes N` writes it (docker/compose.yaml holds N=2); `docker/up.sh` regenerates it for
`SUPERNODES=N` and starts it. TLS and SuperNode authentication are on: the credentials come from
`scripts/make-certificates.sh docker/credentials N`, and a one-shot `register` service adds every SuperNode's
public key before the SuperNodes start. Executors talk to their SuperNode's runtime API inside the compose network.
"""

from __future__ import annotations

from pathlib import Path

import yaml

FLWR_VERSION = "1.42.0"
SUPERLINK_PORT = 8000  # Fleet, Control and Runtime APIs share one HTTPS port in Flower 1.4x
RUNTIME_PORT = 9094  # a SuperNode's runtime API, for its ClientApp executor
CREDENTIALS = "/credentials"
EXECUTOR_BUILD = {"context": "..", "dockerfile": "docker/superexec.Dockerfile",
                  "args": {"FLWR_VERSION": FLWR_VERSION, "TORCH_SPEC": "${TORCH_SPEC:-torch==2.13.0}",
                           "TORCH_INDEX": "${TORCH_INDEX:-}"}}
EXECUTOR_IMAGE = "fedpt-app-superexec:latest"


def compose_spec(num_supernodes: int) -> dict:
    if num_supernodes < 1:
        raise ValueError(f"Need at least one SuperNode, got {num_supernodes}")
    credentials = [f"./credentials:{CREDENTIALS}:ro"]
    services: dict[str, dict] = {
        "superlink": {
            "image": f"flwr/superlink:{FLWR_VERSION}",
            "command": ["--isolation", "process", "--host", "0.0.0.0", "--port", str(SUPERLINK_PORT),
                        "--ssl-ca-certfile", f"{CREDENTIALS}/ca.crt",
                        "--ssl-certfile", f"{CREDENTIALS}/superlink.crt",
                        "--ssl-keyfile", f"{CREDENTIALS}/superlink.key",
                        "--enable-supernode-auth", "--database", "/state/superlink.db"],
            "ports": [f"{SUPERLINK_PORT}:{SUPERLINK_PORT}"],
            "volumes": [*credentials, "superlink-state:/state"],
        },
        "serverapp": {
            "build": EXECUTOR_BUILD, "image": EXECUTOR_IMAGE,
            "command": ["--root-certificates", f"{CREDENTIALS}/ca.crt",
                        "--runtime-api-address", f"superlink:{SUPERLINK_PORT}"],
            "environment": ["FEDPT_CACHE=/cache", "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}"],
            "volumes": [*credentials, "model-cache:/cache", "./outputs:/outputs"],
            "depends_on": ["superlink"],
        },
        "register": {  # one-shot: allow the demo's SuperNodes to join
            "image": EXECUTOR_IMAGE,
            "entrypoint": ["sh", "-c", _register_script(num_supernodes)],
            "volumes": credentials,
            "depends_on": ["superlink", "serverapp"],
            "restart": "on-failure",
        },
    }
    for index in range(1, num_supernodes + 1):
        services[f"supernode-{index}"] = {
            "image": f"flwr/supernode:{FLWR_VERSION}",
            "command": ["--superlink", f"superlink:{SUPERLINK_PORT}",
                        "--root-certificates", f"{CREDENTIALS}/ca.crt",
                        "--auth-supernode-private-key", f"{CREDENTIALS}/supernode-{index}",
                        "--isolation", "process", "--host", "0.0.0.0", "--port", str(RUNTIME_PORT),
                        "--node-config",
                        f'partition-id={index - 1} num-partitions={num_supernodes} model-cache="/cache"'],
            "volumes": credentials,
            "depends_on": {"register": {"condition": "service_completed_successfully"}},
        }
        services[f"clientapp-{index}"] = {
            "image": EXECUTOR_IMAGE,
            "command": ["--insecure", "--runtime-api-address", f"supernode-{index}:{RUNTIME_PORT}"],
            # the demo's devices share one host: without a thread cap, OpenMP threads oversubscribe the cores
            "environment": ["FEDPT_CACHE=/cache", "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}",
                            "OMP_NUM_THREADS=${CLIENTAPP_THREADS:-1}"],
            "volumes": ["model-cache:/cache"],
            "depends_on": [f"supernode-{index}", "serverapp"],
        }
    return {"services": services,
            "volumes": {"superlink-state": {}, "model-cache": {}}}


def _register_script(num_supernodes: int) -> str:
    """Shell for the `register` service; a key registered by an earlier `up` counts as done."""
    connection = (f'mkdir -p $$HOME/.flwr && printf \'[superlink]\\ndefault = "demo"\\n[superlink.demo]\\n'
                  f'address = "superlink:{SUPERLINK_PORT}"\\nroot-certificates = "{CREDENTIALS}/ca.crt"\\n\' '
                  f'> $$HOME/.flwr/config.toml')
    registrations = " && ".join(
        f'{{ out=$$(flwr supernode register {CREDENTIALS}/supernode-{index}.pub demo 2>&1) || '
        f'echo "$$out" | grep -q "already in use"; }}' for index in range(1, num_supernodes + 1))
    return f"{connection} && {registrations}"


def write_compose(num_supernodes: int, path: Path) -> Path:
    header = (f"# Generated by `fedpt-app compose --supernodes {num_supernodes}` (fedpt_app/tools/compose.py); "
              "regenerate rather than edit.\n# Start with docker/up.sh (credentials, build, up). See README, "
              "'Deployment'.\n")
    path.write_text(header + yaml.safe_dump(compose_spec(num_supernodes), sort_keys=False, width=120))
    return path
