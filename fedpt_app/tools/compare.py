"""`fedpt-app compare`: algorithms × seeds on the same config, each seed with the same client schedule for every
algorithm; final-round scores as mean ± std over the seeds, in comparison.md, comparison.json and plots.

An entry of `--algorithms` is an algorithm or a variant of one with its own overrides, for ablations:
`fedpft,fedpft[align-before=false],fedpft[align-before=false align-during=false]`.

Scores are the final round's (no round is picked on the test set). Standard deviations are over seeds (sample
standard deviation, n - 1), so they show how much a result depends on the seed: partitions, client schedule,
adapter initialisation and data order all change with it.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpt_app.algorithms import ALGORITHMS, CLASSIFY, INSTRUCT, names
from fedpt_app.config import ConfigError
from fedpt_app.plots import plot_final_bars, plot_score_curves
from fedpt_app.tools.preflight import preflight
from fedpt_app.tools.simulation import run_simulation, validate_overrides

SCORE_PREFIXES = (
    "rouge_l_",
    "exact_match_",
    "contains_",
    "accuracy_",
    "knowledge_exact_match_",
    "skill_exact_match_",
)
MODELS = {INSTRUCT: ("small", "proxy", "large"), CLASSIFY: ("full", "sub")}
METRICS = {INSTRUCT: ("rouge_l", "exact_match", "contains"), CLASSIFY: ("accuracy",)}
SET_BY_COMPARE = {"algorithm", "seed", "output-dir"}
PAIR = re.compile(r"""\s*([\w-]+)=("(?:[^"\\]|\\.)*"|'[^']*'|[^\s"']+)""")  # key=value, a value quoted or bare


@dataclass(frozen=True)
class Entry:
    """One line of the comparison: an algorithm, or a variant of it with its own overrides."""

    label: str
    algorithm: str
    overrides: str = ""

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.label).strip("-")


def parse_entries(spec: str | Sequence[str]) -> list[Entry]:
    """`a,b[key=value key=value],...` (commas inside brackets belong to the overrides); every override is a
    key=value pair (the keys are checked with the whole config before any run starts)."""
    entries = [_entry(part.strip()) for part in (_split(spec) if isinstance(spec, str) else spec) if part.strip()]
    if len({entry.folder for entry in entries}) != len(entries):
        raise ConfigError(f"--algorithms names an entry twice: {[entry.label for entry in entries]}")
    return entries


def _split(spec: str) -> list[str]:
    parts, current, depth = [], "", 0
    for char in spec:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ConfigError(f"Unbalanced brackets in --algorithms {spec!r}")
        if char == "," and depth == 0:
            parts, current = [*parts, current], ""
        else:
            current += char
    if depth:
        raise ConfigError(f"Unbalanced brackets in --algorithms {spec!r}")
    return [*parts, current]


def _entry(part: str) -> Entry:
    match = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", part)
    if match is None or match.group(1) not in ALGORITHMS:
        raise ConfigError(
            f"Unknown algorithm entry {part!r}; write ALGORITHM or ALGORITHM[key=value ...], from {names()}"
        )
    overrides = (match.group(2) or "").strip()
    pairs = override_pairs(overrides, where=repr(part))
    if match.group(2) is not None and not pairs:
        raise ConfigError(f"{part!r}: the overrides in brackets must be key=value pairs, got {overrides!r}")
    if set(pairs) & SET_BY_COMPARE:
        raise ConfigError(f"{part!r}: compare sets {sorted(SET_BY_COMPARE)} itself; leave them out of the brackets")
    return Entry(part, match.group(1), overrides)


def override_pairs(run_config: str, where: str = "--run-config") -> dict[str, str]:
    """key -> value as written (quotes kept) of a `--run-config` string; a later pair replaces an earlier one."""
    matches = list(PAIR.finditer(run_config))
    if "".join(match.group(0) for match in matches).replace(" ", "") != run_config.replace(" ", ""):
        raise ConfigError(f"{where} {run_config!r}: write space-separated key=value pairs")
    return {match.group(1): match.group(2) for match in matches}


def run_overrides(run_config: str, entry: Entry, seed: int, output: Path) -> str:
    """The shared overrides, then the entry's (a variant's value wins over the shared one), then compare's own."""
    pairs = {
        **override_pairs(run_config),
        **override_pairs(entry.overrides),
        "algorithm": f"'{entry.algorithm}'",
        "seed": str(seed),
        "output-dir": f"'{output / entry.folder / f'seed{seed}'}'",
    }
    return " ".join(f"{key}={value}" for key, value in pairs.items())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def spread(values: Sequence[float]) -> dict:
    """{"mean", "std" (over seeds, n - 1; 0 for one value), "n"}."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def final_row(rows: Sequence[dict]) -> dict:
    """The last evaluated round after training ({} when none was)."""
    return next((row for row in reversed(rows) if row["round"] > 0 and _scores(row)), {})


def _scores(row: dict) -> dict[str, float]:
    return {key: value for key, value in row.items() if key.startswith(SCORE_PREFIXES) and value is not None}


def costs(rows: Sequence[dict]) -> dict[str, float]:
    trained = [row for row in rows if row["round"] > 0]
    per_client = [
        ((row["bytes_up"] or 0) + (row["bytes_down"] or 0)) / max(row.get("clients", 1), 1) for row in trained
    ]
    return {
        "kb_per_client_round": sum(per_client) / len(per_client) / 1e3 if per_client else 0.0,
        "client_peak_rss_mb": max((row.get("client_peak_rss_mb") or 0.0 for row in trained), default=0.0),
        "run_seconds": sum(row.get("round_seconds", 0.0) for row in rows),
    }


def summarize(runs: dict[str, dict[int, list[dict]]]) -> dict:
    """comparison.json: per algorithm, every final-round score key and cost as mean/std/n over the seeds; the
    untuned models of round 0 likewise."""
    algorithms = {}
    for name, by_seed in runs.items():
        finals = [final_row(rows) for rows in by_seed.values()]
        keys = sorted({key for row in finals for key in _scores(row)})
        entry = {key: spread([row[key] for row in finals if row.get(key) is not None]) for key in keys}
        run_costs = [costs(rows) for rows in by_seed.values()]
        entry.update({key: spread([cost[key] for cost in run_costs]) for key in run_costs[0]})
        algorithms[name] = entry
    untuned_rows = [rows[0] for by_seed in runs.values() for rows in by_seed.values() if rows and rows[0]["round"] == 0]
    untuned_keys = sorted({key for row in untuned_rows for key in _scores(row)})
    untuned = {key: spread([row[key] for row in untuned_rows if row.get(key) is not None]) for key in untuned_keys}
    return {
        "seeds": sorted({seed for by_seed in runs.values() for seed in by_seed}),
        "algorithms": algorithms,
        "untuned": untuned,
    }


def _cell(stats: dict | None, fmt: str = "{:.1f}") -> str:
    if not stats:
        return "-"
    return f"{fmt.format(stats['mean'])} ± {fmt.format(stats['std'])}"


def markdown_table(summary: dict, family: str) -> str:
    columns = [f"{metric}_{model}" for metric in METRICS[family] for model in MODELS[family]]
    header = ["seeds", *columns, "KB per client per round", "client peak RSS MB", "run seconds"]
    lines = ["| algorithm | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    if summary["untuned"]:
        untuned = [_cell(summary["untuned"].get(c)) for c in columns]
        lines.append("| untuned (round 0) | " + " | ".join(["-", *untuned]) + " | - | - | - |")
    for name, entry in summary["algorithms"].items():
        cells = [str(entry["run_seconds"]["n"])] + [_cell(entry.get(c)) for c in columns]
        cells += [
            _cell(entry["kb_per_client_round"]),
            _cell(entry["client_peak_rss_mb"], "{:.0f}"),
            _cell(entry["run_seconds"], "{:.0f}"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_comparison(
    algorithms: str | Sequence[str],
    run_config: str,
    output: Path,
    num_supernodes: int = 4,
    seeds: Sequence[int] = (0,),
    verbose: bool = False,
    client_gpus: float = 0,
) -> bool:
    entries = parse_entries(algorithms)
    if not entries:
        raise ConfigError(f"Name at least one algorithm; choose from {names()}")
    if len({ALGORITHMS[entry.algorithm].family for entry in entries}) > 1:
        raise ConfigError(
            f"compare either instruction-tuning algorithms {names(INSTRUCT)} or classification "
            f"ones {names(CLASSIFY)}, not both: they are scored differently"
        )
    if set(override_pairs(run_config)) & SET_BY_COMPARE:
        raise ConfigError(f"compare sets {sorted(SET_BY_COMPARE)} itself; leave them out of --run-config")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct integers, got {list(seeds)}")
    output = output.expanduser().resolve()
    configs = {(entry, seed): run_overrides(run_config, entry, seed, output) for seed in seeds for entry in entries}
    for overrides in configs.values():  # check every configuration before the first run starts
        preflight(validate_overrides(overrides), num_supernodes)
    all_ok = True
    for (entry, seed), overrides in configs.items():
        print(f"[fedpt-app compare] running {entry.label}, seed {seed} -> {output / entry.folder}", flush=True)
        outcome = run_simulation(overrides, num_supernodes=num_supernodes, client_gpus=client_gpus, verbose=verbose)
        if not outcome.succeeded:
            print(f"[fedpt-app compare] {entry.label}, seed {seed} ended as {outcome.status}: {outcome.details}")
            all_ok = False
    runs = {
        entry.label: {
            seed: read_metrics(output / entry.folder / f"seed{seed}")
            for seed in seeds
            if (output / entry.folder / f"seed{seed}" / "summary.json").exists()
        }
        for entry in entries
    }
    folders = {entry.label: entry.folder for entry in entries}
    family = ALGORITHMS[entries[0].algorithm].family.name
    write_report({label: by_seed for label, by_seed in runs.items() if by_seed}, output, family, folders)
    return all_ok


def write_report(
    runs: dict[str, dict[int, list[dict]]], output: Path, family: str, folders: dict[str, str] | None = None
) -> None:
    summary = summarize(runs)
    folders = folders or {name: name for name in runs}
    summary["runs"] = {
        name: {f"seed{seed}": str(output / folders[name] / f"seed{seed}") for seed in by_seed}
        for name, by_seed in runs.items()
    }
    table = markdown_table(summary, family)
    output.mkdir(parents=True, exist_ok=True)
    (output / "comparison.md").write_text(table)
    (output / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = [plot_score_curves(runs, metric, MODELS[family], output / f"{metric}.png") for metric in METRICS[family]]
    plots += [
        plot_final_bars(summary, metric, MODELS[family], output / f"{metric}_final.png") for metric in METRICS[family]
    ]
    print(table)
    print(
        f"[fedpt-app compare] wrote {output / 'comparison.md'}, comparison.json and {', '.join(p.name for p in plots)}"
    )
