"""FedPFT: clients tune LoRA on a sub-FM (low-saliency FFN neurons pruned), aligned with the full FM by layer-level
distillation before FL and by neuron-level distillation every `align-interval` rounds during FL.

Ablations: `align-before=false` (FedPFT_D), `align-during=false` (FedPFT_B), both false (FedPFT_N).
"""

from __future__ import annotations

import copy
from logging import INFO
from collections import OrderedDict

import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common.logger import log
from transformers import PreTrainedModel

from fedpt_app.compression.alignment import (distill, ffn_parameters, neuron_masks, only_trainable,
                                             product_regularizer)
from fedpt_app.compression.apoz import neurons_to_update
from fedpt_app.compression.ffn import compress, find_ffns
from fedpt_app.messages import APOZ_KEY, FFN_UPDATE_KEY
from fedpt_app.models.classifier import cached_base
from fedpt_app.models.loading import resolve_model_ref
from fedpt_app.models.lora import load_adapter_state
from fedpt_app.strategies.fedpetuning import FedPETuning
from fedpt_app.validation import UpdateRules

VERSION_KEY = "ffn-version"


class FedPFT(FedPETuning):
    algorithm = "fedpft"
    _counting = False  # this round's clients count APoZ (an alignment round)
    _apoz: tuple[dict[int, torch.Tensor], int] | None = None  # summed zero counts per layer, summed tokens

    # ---- the sub-FM ---------------------------------------------------------------------------------------
    def client_base(self, full: PreTrainedModel) -> PreTrainedModel:
        config = self.config
        self.layers = config.compressed_layer_indices(len(find_ffns(full)))
        recipe = {"kind": "sub-fm", "model": resolve_model_ref(config.foundation_model), "ratio": config.compress_ratio,
                  "layers": self.layers, "num_labels": len(self.label_names), "align_before": config.align_before,
                  **self.distillation_recipe()}
        return cached_base(recipe, lambda: self.build_sub_fm(full))

    def build_sub_fm(self, full: PreTrainedModel) -> PreTrainedModel:
        """Prune, then (unless ablated) layer-level distillation: hidden states + mu * normalized W1·W2 error."""
        sub = copy.deepcopy(full)
        compress(sub, self.layers, self.config.compress_ratio)
        if self.config.align_before and self.config.align_steps:
            teacher_ffns, student_ffns = find_ffns(full), find_ffns(sub)
            parameters = [p for layer in self.layers for p in ffn_parameters(student_ffns[layer], with_norms=True)]
            with only_trainable(sub, parameters):
                result = distill(full, sub, parameters, self.public_batches(0), steps=self.config.align_steps,
                                 lr=self.config.align_lr, pairs=[(layer + 1, layer + 1) for layer in self.layers],
                                 regularizer=lambda: self.config.align_mu * product_regularizer(
                                     teacher_ffns, student_ffns, self.layers))
            log(INFO, "[fedpt-app] layer-level distillation before FL: loss %.4f -> %.4f in %d steps (%.1f s)",
                result.first_loss, result.last_loss, result.steps, result.seconds)
        return sub

    # ---- neuron-level alignment during FL ----------------------------------------------------------------
    def alignment_due(self, server_round: int) -> bool:
        return self.config.align_during and server_round % self.config.align_interval == 0

    def round_entries(self, server_round: int) -> dict:
        self._apoz = None
        self._counting = self.alignment_due(server_round)
        return {**super().round_entries(server_round), "count-apoz": self._counting}

    def update_rules(self, max_norm: float) -> UpdateRules:
        rules = super().update_rules(max_norm)
        if not self._counting:
            return rules
        ffns = find_ffns(self.model)
        return UpdateRules(**{**rules.__dict__, "apoz_widths": {f"layer-{layer}": ffns[layer].width
                                                                 for layer in self.layers}})

    def screen_replies(self, replies: list[Message]) -> tuple[list[Message], list[str], list[float]]:
        usable, problems, norms = super().screen_replies(replies)
        if self._counting:  # APoZ: counts and tokens summed over clients before dividing
            records = [msg.content[APOZ_KEY] for msg in usable]
            self._apoz = ({layer: sum(torch.from_numpy(r[f"layer-{layer}"].numpy()).double() for r in records)
                           for layer in self.layers}, int(sum(float(r["tokens"].numpy()[0]) for r in records)))
        return usable, problems, norms

    def server_step(self, server_round: int, state: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """On alignment rounds: update the highest-APoZ neurons so the sub-FM (with the new global adapter)
        matches the full FM (with it too); the changed FFN weights go to the clients with the next round."""
        if not self._counting or self._apoz is None:
            return state
        counts, tokens = self._apoz
        update = neurons_to_update(counts, tokens, self.config.align_proportion)
        load_adapter_state(self.full_model, self.plugged(state))
        load_adapter_state(self.model, state)
        ffns = find_ffns(self.model)
        masks = {p: m for layer in self.layers for p, m in neuron_masks(ffns[layer], update[layer]).items()}
        with only_trainable(self.model, list(masks)):
            result = distill(self.full_model, self.model, list(masks), self.public_batches(server_round),
                             steps=self.config.align_round_steps, lr=self.config.align_lr,
                             pairs=[(layer + 1, layer + 1) for layer in self.layers], gradient_masks=masks)
        self.base_version += 1
        self._round.update({"align_loss": result.last_loss, "align_loss_first": result.first_loss,
                            "align_seconds": result.seconds,
                            "apoz_mean": float(sum(c.sum() for c in counts.values()) /
                                               (tokens * sum(c.numel() for c in counts.values())))})
        return state

    def ffn_state(self) -> OrderedDict[str, torch.Tensor]:
        """The compressed layers' FFN weights, named as in the base model's state dict."""
        base = self.model.get_base_model()
        names = {id(parameter): name for name, parameter in base.named_parameters()}
        ffns = find_ffns(base)
        return OrderedDict((names[id(p)], p.detach().cpu().float().clone()) for layer in self.layers
                           for p in ffn_parameters(ffns[layer], with_norms=False))

    def base_updates(self) -> dict[str, ArrayRecord]:
        if self.base_version == 0:
            return {}
        return {FFN_UPDATE_KEY: ArrayRecord({key: Array(t.numpy()) for key, t in self.ffn_state().items()})}

    # ---- checkpointing -----------------------------------------------------------------------------------
    def server_state(self) -> dict[str, torch.Tensor]:
        if self.base_version == 0:
            return {}
        return {VERSION_KEY: torch.tensor(self.base_version), **self.ffn_state()}

    def restore_server_state(self, state: dict[str, torch.Tensor]) -> None:
        if VERSION_KEY not in state:
            return
        ffn = {key: tensor for key, tensor in state.items() if key != VERSION_KEY}
        missing = set(ffn) - set(dict(self.model.get_base_model().named_parameters()))
        if missing:
            raise ValueError(f"The checkpoint's FFN weights do not fit the sub-FM: {sorted(missing)[:3]}")
        self.model.get_base_model().load_state_dict(ffn, strict=False)
        self.base_version = int(state[VERSION_KEY])
