"""Classifiers for FedPFT and its baselines: load a foundation model (text: a sequence classifier; vision: an image
classifier), ship a (compressed) base model to clients as tensors plus its config, and attach LoRA on attention plus
the classification head.

The base a client trains on (the full FM, the sub-FM, or FedOT's emulator) reaches it as a `ModelPackage`: the HF
config (with the FFN widths of a pruned model) and the weights. The client rebuilds it with the matching
`AutoModelFor...Classification.from_config`, so a device needs no model files, only the tokenizer or image processor.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import INFO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.logger import log
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from fedpt_app.classify.compression.ffn import ffn_widths, resize_ffns
from fedpt_app.classify.inputs import is_vision_config
from fedpt_app.models.loading import (
    LOAD_COUNTS,
    ModelLoadError,
    cache_root,
    default_device,
    file_lock,
    load_tokenizer,
    resolve_model_ref,
)
from fedpt_app.models.lora import LoraSpec, with_initial_state


def load_classifier(model_ref: str, num_labels: int, seed: int = 0) -> PreTrainedModel:
    """A fresh (uncached: compression edits it) foundation model with a `num_labels` head, seeded head init, in
    float32 whatever the checkpoint's dtype (server and devices compute alike), with a padding token if it reads
    text (decoders such as GPT-2 and Llama classify at the last non-padding token and need one)."""
    source = resolve_model_ref(model_ref)
    try:
        auto_class = classifier_class(AutoConfig.from_pretrained(source))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto_class.from_pretrained(
                source, num_labels=num_labels, dtype=torch.float32, ignore_mismatched_sizes=True
            )
    except Exception as error:  # transformers raises several types for a missing or unreachable model
        raise ModelLoadError(
            f"Could not load foundation model {model_ref!r} ({source}) as a classifier: {error}"
        ) from error
    LOAD_COUNTS[model_ref] += 1
    if not is_vision_config(model.config) and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = load_tokenizer(model_ref).pad_token_id
    model.requires_grad_(False)
    return model.to(default_device()).eval()


def classifier_class(config: PretrainedConfig) -> type:
    """The Auto class of a classifier on this backbone: image classification for vision models."""
    return AutoModelForImageClassification if is_vision_config(config) else AutoModelForSequenceClassification


@dataclass(frozen=True)
class ModelPackage:
    """A base model as it travels: its HF config (JSON, FFN widths included) and its weights."""

    config_json: str
    state: OrderedDict[str, torch.Tensor]

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelPackage:
        widths = ffn_widths(model)  # first: finding the FFNs records their names in the config
        config = model.config.to_dict()
        config["fedpt_ffn_widths"] = widths
        state = OrderedDict((key, tensor.detach().cpu().float().clone()) for key, tensor in model.state_dict().items())
        return cls(json.dumps(config, sort_keys=True), state)

    @property
    def digest(self) -> str:
        """Identifies the package: clients cache what they received under it."""
        digest = hashlib.sha256(self.config_json.encode())
        for key, tensor in self.state.items():
            digest.update(key.encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()[:16]

    def to_array_record(self) -> ArrayRecord:
        return ArrayRecord({key: Array(tensor.numpy()) for key, tensor in self.state.items()})

    @classmethod
    def from_record(cls, config_json: str, record: ArrayRecord) -> ModelPackage:
        return cls(
            config_json,
            OrderedDict((key, torch.from_numpy(array.numpy().astype(np.float32))) for key, array in record.items()),
        )

    def build(self) -> PreTrainedModel:
        """The model, rebuilt from config and weights (frozen, eval mode, on the default device)."""
        config_dict = json.loads(self.config_json)
        widths = config_dict.pop("fedpt_ffn_widths")
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        model = classifier_class(config).from_config(config)
        resize_ffns(model, widths)
        missing, unexpected = model.load_state_dict(self.state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"Model package does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        model.requires_grad_(False)
        return model.to(default_device()).eval()


def lora_classifier(
    model: PreTrainedModel, spec: LoraSpec, seed: int = 0, layers: Sequence[int] | None = None
) -> PeftModel:
    """LoRA on attention (peft's per-architecture default unless `spec` names modules; query and value on vision
    transformers, which peft has no default for) plus the trainable head; `layers` restricts LoRA to those
    transformer blocks (FedOT's adapter)."""
    targets = list(spec.target_modules) if spec.target_modules else None
    if is_vision_config(model.config):  # peft's sequence-classification task would pass input_ids to the model
        head = next((name for name in ("classifier", "head") if hasattr(model, name)), None)
        if head is None:
            raise ValueError(f"{type(model).__name__} has no 'classifier' or 'head' module for the task head")
        task = {"task_type": None, "modules_to_save": [head], "target_modules": targets or _vision_attention(model)}
    else:
        task = {"task_type": "SEQ_CLS", "target_modules": targets}
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        layers_to_transform=list(layers) if layers is not None else None,
        bias="none",
        **task,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same initial A matrices in every process
        peft_model = get_peft_model(model, config)
    return with_initial_state(peft_model).eval()


def _vision_attention(model: PreTrainedModel) -> list[str]:
    """The query and value projections of a vision transformer, by the names its version of transformers uses."""
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    for pair in (("query", "value"), ("q_proj", "v_proj")):
        if set(pair) <= linear:
            return list(pair)
    raise ValueError(f"Found no query/value projections in {type(model).__name__}: name them with lora-target-modules")


def cached_base(recipe: dict, build: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    """A derived base model (sub-FM, emulator) built once per `recipe` (everything that determines it: model,
    compression, distillation data and steps) and reused from the model cache afterwards."""
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root() / "derived-bases" / f"{recipe['kind']}-{key}.pt"
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            saved = torch.load(path, weights_only=True)
            log(INFO, "[fedpt-app] reusing the %s built before: %s", recipe["kind"], path)
            return ModelPackage(saved["config_json"], OrderedDict(saved["state"])).build()
        model = build()
        package = ModelPackage.of(model)
        temporary = path.with_suffix(".tmp")
        torch.save({"config_json": package.config_json, "state": dict(package.state), "recipe": recipe}, temporary)
        temporary.replace(path)
        return model
