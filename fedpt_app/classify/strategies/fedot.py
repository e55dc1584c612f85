"""FedOT (Offsite-Tuning in FL): clients train LoRA (and the head) on the bottom and top adapter layers of an
emulator whose middle was layer-dropped and distilled before FL; the adapter is plugged back around the full FM's
original middle layers for evaluation."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from logging import INFO

from flwr.common.logger import log
from transformers import PreTrainedModel

from fedpt_app.classify.compression.alignment import distill, only_trainable
from fedpt_app.classify.compression.emulator import EmulatorLayout, blocks_path, build_emulator, plug_into_full
from fedpt_app.classify.compression.ffn import transformer_blocks
from fedpt_app.classify.models import cached_base
from fedpt_app.classify.strategies.base import ClassifyStrategy
from fedpt_app.federation.strategy import State
from fedpt_app.models.loading import resolve_model_ref
from fedpt_app.models.lora import LoraSpec


class FedOT(ClassifyStrategy):
    def client_base(self, full: PreTrainedModel) -> PreTrainedModel:
        classify = self.config.classify
        self.layout = EmulatorLayout.choose(
            len(transformer_blocks(full)), classify.fedot_adapter_layers, classify.fedot_emulator_layers
        )
        self.blocks_path = blocks_path(full)
        recipe = {
            "kind": "emulator",
            "model": resolve_model_ref(classify.foundation_model),
            "layout": [self.layout.adapter_layers, self.layout.emulator_layers],
            "num_labels": len(self.label_names),
            **self.distillation_recipe(),
        }
        return cached_base(recipe, lambda: self.build_emulator(full))

    def build_emulator(self, full: PreTrainedModel) -> PreTrainedModel:
        """Layer drop, then distil the emulator's middle to reproduce the full middle's output."""
        emulator = build_emulator(full, self.layout)
        blocks = transformer_blocks(emulator)
        middle = range(self.layout.adapter_layers, self.layout.adapter_layers + self.layout.emulator_layers)
        parameters = [p for index in middle for p in blocks[index].parameters()]
        classify = self.config.classify
        if classify.align_steps:
            with only_trainable(emulator, parameters):
                result = distill(
                    full,
                    emulator,
                    parameters,
                    self.public_batches(0),
                    steps=classify.align_steps,
                    lr=classify.align_lr,
                    pairs=[self.layout.distill_pair],
                )
            log(
                INFO,
                "[fedpt-app] emulator distillation before FL: loss %.4f -> %.4f in %d steps (%.1f s)",
                result.first_loss,
                result.last_loss,
                result.steps,
                result.seconds,
            )
        return emulator

    def lora_spec(self) -> LoraSpec:
        """LoRA on the adapter layers only would train a fraction (2·adapter / all layers) of FedPFT's parameters;
        the rank grows by the inverse of that fraction (alpha with it, so alpha/r stays), so the three methods train
        about as many parameters (`fedot-lora-r` sets the rank by hand)."""
        spec = super().lora_spec()
        rank = self.config.classify.fedot_lora_r or round(
            spec.r * self.layout.num_layers / len(self.layout.full_adapter_layers)
        )
        return dataclasses.replace(spec, r=rank, alpha=spec.alpha * rank / spec.r)

    def full_lora_layers(self) -> list[int]:
        return self.layout.full_adapter_layers

    def client_lora_layers(self) -> list[int]:
        return self.layout.emulator_adapter_layers

    def plugged(self, state: State) -> State:
        return OrderedDict(plug_into_full(state, self.layout, self.blocks_path))
