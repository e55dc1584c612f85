"""FedPFT: clients tune LoRA on a sub-FM (low-saliency FFN neurons pruned), aligned with the full FM by layer-level
distillation before FL and by neuron-level distillation every `align-interval` rounds during FL.

Ablations: `align-before=false` (FedPFT_D), `align-during=false` (FedPFT_B), both false (FedPFT_N).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable
from logging import INFO

import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from transformers import PreTrainedModel

from fedpt_app.classify.compression.alignment import (
    distill,
    ffn_parameters,
    neuron_masks,
    only_trainable,
    product_regularizer,
)
from fedpt_app.classify.compression.apoz import apoz_record_problem, neurons_to_update
from fedpt_app.classify.compression.ffn import compress, find_ffns
from fedpt_app.classify.models import cached_base
from fedpt_app.classify.strategies.base import HOLDER, ClassifyStrategy
from fedpt_app.federation.strategy import State
from fedpt_app.models.loading import resolve_model_ref
from fedpt_app.models.lora import load_adapter_state
from fedpt_app.protocol import APOZ_KEY, FFN_UPDATE_KEY, RoundConfig

VERSION_KEY = "ffn-version"


class FedPFT(ClassifyStrategy):
    def load_task(self) -> None:
        self.counting_apoz = False  # this round's clients count APoZ (an alignment round)
        self.apoz: tuple[dict[int, torch.Tensor], int] | None = None  # summed zero counts per layer, summed tokens
        super().load_task()

    # ---- the sub-FM ---------------------------------------------------------------------------------------
    def client_base(self, full: PreTrainedModel) -> PreTrainedModel:
        classify = self.config.classify
        self.layers = classify.compressed_layer_indices(len(find_ffns(full)))
        recipe = {
            "kind": "sub-fm",
            "model": resolve_model_ref(classify.foundation_model),
            "ratio": classify.compress_ratio,
            "layers": self.layers,
            "num_labels": len(self.label_names),
            "align_before": classify.align_before,
            **self.distillation_recipe(),
        }
        return cached_base(recipe, lambda: self.build_sub_fm(full))

    def build_sub_fm(self, full: PreTrainedModel) -> PreTrainedModel:
        """Prune, then (unless ablated) layer-level distillation: hidden states + mu * normalized W1·W2 error."""
        classify = self.config.classify
        sub = copy.deepcopy(full)
        compress(sub, self.layers, classify.compress_ratio)
        if classify.align_before and classify.align_steps:
            teacher_ffns, student_ffns = find_ffns(full), find_ffns(sub)
            parameters = [p for layer in self.layers for p in ffn_parameters(student_ffns[layer], with_norms=True)]
            with only_trainable(sub, parameters):
                result = distill(
                    full,
                    sub,
                    parameters,
                    self.public_batches(0),
                    steps=classify.align_steps,
                    lr=classify.align_lr,
                    pairs=[(layer + 1, layer + 1) for layer in self.layers],
                    regularizer=lambda: (
                        classify.align_mu * product_regularizer(teacher_ffns, student_ffns, self.layers)
                    ),
                )
            log(
                INFO,
                "[fedpt-app] layer-level distillation before FL: loss %.4f -> %.4f in %d steps (%.1f s)",
                result.first_loss,
                result.last_loss,
                result.steps,
                result.seconds,
            )
        return sub

    # ---- neuron-level alignment during FL ----------------------------------------------------------------
    def alignment_due(self, server_round: int) -> bool:
        classify = self.config.classify
        return classify.align_during and server_round % classify.align_interval == 0

    def round_config(self, number: int) -> RoundConfig:
        self.apoz = None
        self.counting_apoz = self.alignment_due(number)
        return dataclasses.replace(super().round_config(number), count_apoz=self.counting_apoz)

    def reply_records(self) -> dict[str, Callable[[object, MetricRecord], str | None]]:
        if not self.counting_apoz:
            return {}
        ffns = find_ffns(self.model)
        widths = {f"layer-{layer}": ffns[layer].width for layer in self.layers}
        positions = self.inputs.tokens_per_example(self.config.training.max_length)
        rule = functools.partial(apoz_record_problem, widths=widths, max_length=positions)
        return {APOZ_KEY: rule}

    def accept_replies(self, usable: list[Message], errors: list[Message]) -> None:
        super().accept_replies(usable, errors)
        if self.counting_apoz:  # APoZ: counts and tokens summed over clients before dividing
            records = [msg.content[APOZ_KEY] for msg in usable]
            self.apoz = (
                {
                    layer: sum(torch.from_numpy(r[f"layer-{layer}"].numpy()).double() for r in records)
                    for layer in self.layers
                },
                int(sum(float(r["tokens"].numpy()[0]) for r in records)),
            )

    def server_step(self, server_round: int, state: State) -> State:
        """On alignment rounds: update the highest-APoZ neurons so the sub-FM (with the new global adapter)
        matches the full FM (with it too); the changed FFN weights go to the clients with the next round."""
        if not self.counting_apoz or self.apoz is None:
            return state
        classify = self.config.classify
        counts, tokens = self.apoz
        update = neurons_to_update(counts, tokens, classify.align_proportion)
        load_adapter_state(self.full_model, self.plugged(state))
        load_adapter_state(self.model, state)
        ffns = find_ffns(self.model)
        masks = {p: m for layer in self.layers for p, m in neuron_masks(ffns[layer], update[layer]).items()}
        with only_trainable(self.model, list(masks)):
            result = distill(
                self.full_model,
                self.model,
                list(masks),
                self.public_batches(server_round),
                steps=classify.align_round_steps,
                lr=classify.align_lr,
                pairs=[(layer + 1, layer + 1) for layer in self.layers],
                gradient_masks=masks,
            )
        self.base_version += 1
        self.round.note(
            align_loss=result.last_loss,
            align_loss_first=result.first_loss,
            align_seconds=result.seconds,
            apoz_mean=float(sum(c.sum() for c in counts.values()) / (tokens * sum(c.numel() for c in counts.values()))),
        )
        return state

    def ffn_state(self) -> State:
        """The compressed layers' FFN weights, named as in the base model's state dict."""
        base = self.model.get_base_model()
        names = {id(parameter): name for name, parameter in base.named_parameters()}
        ffns = find_ffns(base)
        return OrderedDict(
            (names[id(p)], p.detach().cpu().float().clone())
            for layer in self.layers
            for p in ffn_parameters(ffns[layer], with_norms=False)
        )

    def base_updates(self) -> dict[str, ArrayRecord]:
        if self.base_version == 0:
            return {}
        return {FFN_UPDATE_KEY: ArrayRecord({key: Array(t.numpy()) for key, t in self.ffn_state().items()})}

    # ---- checkpointing -----------------------------------------------------------------------------------
    def server_state(self) -> dict[str, torch.Tensor]:
        if self.base_version == 0:
            return super().server_state()
        return {**super().server_state(), VERSION_KEY: torch.tensor(self.base_version), **self.ffn_state()}

    def restore_server_state(self, state: dict[str, torch.Tensor]) -> None:
        super().restore_server_state(state)
        if VERSION_KEY not in state:
            return
        ffn = {key: tensor for key, tensor in state.items() if key != VERSION_KEY and not key.startswith(HOLDER)}
        missing = set(ffn) - set(dict(self.model.get_base_model().named_parameters()))
        if missing:
            raise ValueError(f"The checkpoint's FFN weights do not fit the sub-FM: {sorted(missing)[:3]}")
        self.model.get_base_model().load_state_dict(ffn, strict=False)
        self.base_version = int(state[VERSION_KEY])
