"""`fedpt-app export`: a finished run's adapter as others can load it, optionally merged, with a model card.

`OUT/adapter/` is the run's peft adapter whose `base_model_name_or_path` resolves for others: the hub id when the
base came from the hub, otherwise the absolute path of the base's folder on this machine (the embedded preset's
models live in `$FEDPT_CACHE/tiny-preset-v3-seed0/`, packaged models in their package or `$FEDPT_CACHE/gguf/`).
A FedPT run (default `proxy-adapter='aggregate'`) also gets `OUT/proxy-adapter/`, the adapter of its reported proxy.
`--merge` writes `OUT/merged/`: the base with the adapter merged in, as safetensors with its tokenizer (or image
processor), which `AutoModelForCausalLM.from_pretrained` (instruct family) or
`AutoModelForSequenceClassification.from_pretrained` (`AutoModelForImageClassification` for a vision FM) loads
without peft. `OUT/README.md` is a model card with the run's facts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fedpt_app.algorithms import CLASSIFY
from fedpt_app.config import ConfigError, RunConfig


def read_run(run: Path) -> tuple[dict[str, Any], RunConfig]:
    """(summary.json, the run's config) of a finished run's output folder."""
    summary_path, config_path = run / "summary.json", run / "config.json"
    if not summary_path.is_file() or not config_path.is_file() or not (run / "adapter").is_dir():
        raise ConfigError(
            f"--run {str(run)!r} is not a finished run's output-dir (no summary.json, config.json and adapter/)"
        )
    flat = json.loads(config_path.read_text())
    return json.loads(summary_path.read_text()), RunConfig.from_mapping(
        {k.replace("_", "-"): v for k, v in flat.items()}
    )


def portable_reference(ref: str) -> str:
    """A base reference others can resolve: a hub id stays, anything else becomes its absolute folder."""
    from fedpt_app.models.loading import resolve_model_ref

    resolved = resolve_model_ref(ref)
    return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved


def export_run(run: Path, out: Path, merge: bool = False) -> dict[str, str]:
    run, out = run.expanduser().resolve(), out.expanduser().resolve()
    if out == run:
        raise ConfigError(f"--out {str(out)!r} must not be the run folder {str(run)!r}")
    summary, config = read_run(run)
    base = portable_reference(summary["adapter_base_model"])
    adapter = copy_adapter(run / "adapter", out / "adapter", base)
    written = {"adapter": str(adapter)}
    if summary.get("proxy_adapter_dir"):  # FedPT: the adapter of the proxy it reports (not a stale earlier run's)
        written["proxy-adapter"] = str(copy_adapter(run / "proxy-adapter", out / "proxy-adapter", base))
    if merge:
        written["merged"] = str(merge_adapter(base, adapter, out / "merged", config, summary))
    (out / "README.md").write_text(model_card(summary, config, base, merge, "proxy-adapter" in written))
    written["card"] = str(out / "README.md")
    return written


def copy_adapter(source: Path, destination: Path, base: str) -> Path:
    """A saved peft adapter, its base given as `base`."""
    shutil.copytree(source, destination, dirs_exist_ok=True)
    adapter_config = json.loads((destination / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base
    (destination / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return destination


def merge_adapter(base: str, adapter: Path, destination: Path, config: RunConfig, summary: dict) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM

    from fedpt_app.models.loading import load_tokenizer

    vision = False
    if config.family.name == CLASSIFY:
        from fedpt_app.classify.inputs import is_vision_config
        from fedpt_app.classify.models import classifier_class

        base_config = AutoConfig.from_pretrained(base)
        vision = is_vision_config(base_config)
        labels = summary.get("label_names")
        if not labels:
            raise ConfigError("--merge needs the run's label names (summary.json of runs before 2026-11-30 lacks them)")
        model = classifier_class(base_config).from_pretrained(
            base,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: index for index, name in enumerate(labels)},
            dtype=torch.float32,
            ignore_mismatched_sizes=True,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    preprocessor = AutoImageProcessor.from_pretrained(base) if vision else load_tokenizer(base)  # as in training
    if not vision and getattr(merged.config, "pad_token_id", None) is None:  # a decoder classifier needs one
        merged.config.pad_token_id = preprocessor.pad_token_id
    merged.save_pretrained(destination, safe_serialization=True)
    preprocessor.save_pretrained(destination)
    return destination


def model_card(summary: dict, config: RunConfig, base: str, merged: bool, proxy_adapter: bool = False) -> str:
    facts = "\n".join(f"| {name} | {value} |" for name, value in card_facts(summary, config, base).items())
    use = "Load the adapter with `PeftModel.from_pretrained(base, 'adapter')`" + (
        ", or the merged model in `merged/` with transformers alone." if merged else "."
    )
    if proxy_adapter:
        use += (
            " The proxy-tuned large model's scores were measured with `proxy-adapter/` (the last round's aggregate, "
            "which FedPT distilled into `adapter/`): pass it to `fedpt-app generate --adapter` for the proxy."
        )
    return (
        f"# {config.algorithm} adapter (fedpt-app)\n\nA LoRA adapter trained with federated learning by fedpt-app: "
        f"{config.method.description}.\n\n| fact | value |\n|---|---|\n{facts}\n\n{use}\n"
    )


def card_facts(summary: dict, config: RunConfig, base: str) -> dict[str, str]:
    final = summary.get("final") or {}
    scores = {
        key: value
        for key, value in final.items()
        if key.startswith(("rouge_l_", "exact_match_", "contains_", "accuracy_")) and value is not None
    }
    privacy, federation, lora = config.privacy, config.federation, config.lora
    dp = "none"
    if privacy.dp_mode != "off":
        dp = (
            f"DP-FedAvg, {privacy.dp_mode} clipping at {privacy.dp_clipping_norm:g}, noise multiplier "
            f"{privacy.dp_noise_multiplier:g}; ε = {summary.get('epsilon', float('nan')):.3g} "
            f"at δ = {privacy.dp_delta:g}"
        )
    return {
        "algorithm": f"`{config.algorithm}`",
        "base model": f"`{base}`",
        "rounds": f"{summary.get('rounds')} of {federation.num_server_rounds}, {federation.fraction_train:g} of the "
        f"clients per round (at least {federation.min_train_nodes})",
        "clients": f"{final.get('clients', '-')} in the last round",
        "data": f"`{config.data.dataset}` ({config.data.partitioner} partitions); test: "
        f"`{config.data.test_dataset or 'its own held-out split'}`",
        "LoRA": f"r = {lora.r}, alpha = {lora.alpha:g}, target modules `{lora.target_modules or 'peft default'}`",
        "final scores": ", ".join(f"{key} {value:.1f}" for key, value in scores.items()) or "-",
        "traffic": f"{summary.get('total_bytes_up', 0) / 1e6:.2f} MB up, "
        f"{summary.get('total_bytes_down', 0) / 1e6:.2f} MB down",
        "differential privacy": dp,
        "secure aggregation": "SecAgg+" if privacy.secure_aggregation else "none",
        "seed": str(config.seed),
    }
