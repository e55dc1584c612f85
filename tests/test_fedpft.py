"""FedPFT maths on tiny config-built models, against hand computations: saliency and pruning, the W1·W2
regularizer's gradient, APoZ counting, masked alignment, plug-in keys, FedOT's layout, model packages."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from fedpt_app.classify.compression.alignment import distill, neuron_masks, only_trainable, product_regularizer
from fedpt_app.classify.compression.apoz import count_zero_activations, neurons_to_update
from fedpt_app.classify.compression.emulator import EmulatorLayout, blocks_path, build_emulator, plug_into_full
from fedpt_app.classify.compression.ffn import compress, find_ffns, most_salient, neuron_saliency
from fedpt_app.classify.models import ModelPackage, lora_classifier
from fedpt_app.config import ClassifyConfig, ConfigError, RunConfig
from fedpt_app.models.lora import LoraSpec, adapter_state


def tiny_bert(layers: int = 3, hidden: int = 4, ffn: int = 6, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=20,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=ffn,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def set_layer_ffn(model, layer: int, up_first_column: list[float], down_first_row: list[float]) -> None:
    """W1 row j = (a_j, 0, 0, 0), W2 column j = (b_j, 0, 0, 0): saliency_j = sqrt(a_j^2 + b_j^2)."""
    ffn = find_ffns(model)[layer]
    with torch.no_grad():
        ffn.up.weight.zero_()
        ffn.up.weight[:, 0] = torch.tensor(up_first_column)
        ffn.up.bias.copy_(torch.arange(ffn.width, dtype=torch.float32))
        ffn.down.weight.zero_()
        ffn.down.weight[0, :] = torch.tensor(down_first_row)


def test_saliency_and_the_kept_neurons_match_a_hand_computation():
    model = tiny_bert()
    set_layer_ffn(model, 1, [3, 0, 1.2, 0.5, 2, 0], [4, 1, 0, 0, 0, 2.5])
    ffn = find_ffns(model)[1]
    assert torch.allclose(neuron_saliency(ffn), torch.tensor([5, 1, 1.2, 0.5, 2, 2.5], dtype=torch.float64))
    assert most_salient(ffn, 3).tolist() == [0, 4, 5]  # top 3 by saliency, in original order
    kept = compress(model, [1], 0.5)
    assert kept[1].tolist() == [0, 4, 5]
    assert [f.width for f in find_ffns(model)] == [6, 3, 6]


def test_the_pruned_ffn_is_the_full_ffn_restricted_to_the_kept_neurons():
    model = tiny_bert(hidden=8, ffn=12)
    full = copy.deepcopy(find_ffns(model)[1])
    up, down = copy.deepcopy(full.up), copy.deepcopy(full.down)
    kept = compress(model, [1], 0.75)[1]
    pruned = find_ffns(model)[1]
    x = torch.randn(5, 8)
    activation = torch.nn.functional.gelu
    expected = activation(x @ up.weight[kept].T + up.bias[kept]) @ down.weight[:, kept].T + down.bias
    assert torch.allclose(pruned.down(activation(pruned.up(x))), expected, atol=1e-6)
    assert pruned.width == 3 and len(kept) == 3


def test_compressed_layers_default_to_all_but_first_and_last():
    assert ClassifyConfig().compressed_layer_indices(6) == [1, 2, 3, 4]
    assert ClassifyConfig(compressed_layers="0,2").compressed_layer_indices(6) == [0, 2]
    with pytest.raises(ConfigError, match="layer 7"):
        ClassifyConfig(compressed_layers="7").compressed_layer_indices(6)


def test_the_product_regularizer_has_the_hand_value_and_a_gradient():
    teacher = tiny_bert(hidden=8, ffn=12)
    student = copy.deepcopy(teacher)
    compress(student, [1], 0.5)
    student.requires_grad_(False)
    teacher_ffns, student_ffns = find_ffns(teacher), find_ffns(student)
    t = teacher_ffns[1].down.weight @ teacher_ffns[1].up.weight
    s = student_ffns[1].down.weight @ student_ffns[1].up.weight
    with only_trainable(student, [student_ffns[1].up.weight, student_ffns[1].down.weight]):
        value = product_regularizer(teacher_ffns, student_ffns, [1])
        value.backward()
    assert math.isclose(float(value.detach()), float((t - s).pow(2).sum() / t.pow(2).sum()), rel_tol=1e-5)
    assert student_ffns[1].up.weight.grad.abs().sum() > 0 and student_ffns[1].down.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in student.parameters())  # flags restored


def test_apoz_counts_non_positive_pre_activations_on_real_tokens_only():
    model = tiny_bert()
    ffn = find_ffns(model)[1]
    with torch.no_grad():  # pre-activation = bias whatever the input
        ffn.up.weight.zero_()
        ffn.up.bias.copy_(torch.tensor([1.0, -1.0, 0.0, 2.0, -0.5, 0.1]))
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 0, 0, 0, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]),
    }
    counts, tokens = count_zero_activations(model, [1], [batch])
    assert tokens == 7
    assert counts[1].tolist() == [0, 7, 7, 0, 7, 0]


def test_the_highest_apoz_neurons_are_chosen_for_update():
    counts = {1: torch.tensor([5.0, 0.0, 3.0, 1.0]), 2: torch.tensor([0.0, 4.0, 4.5, 1.0])}
    update = neurons_to_update(counts, tokens=5, proportion=0.5)
    assert update[1].tolist() == [True, False, True, False]
    assert update[2].tolist() == [False, True, True, False]


def test_frozen_neurons_do_not_change_during_alignment():
    teacher = tiny_bert(hidden=8, ffn=12)
    student = copy.deepcopy(teacher)
    compress(student, [1], 0.5)
    ffn = find_ffns(student)[1]
    before_up, before_down = ffn.up.weight.detach().clone(), ffn.down.weight.detach().clone()
    update = torch.tensor([True, False, True, False, False, True])
    masks = neuron_masks(ffn, update)
    torch.manual_seed(0)
    data = [
        {"input_ids": torch.randint(1, 20, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
        for _ in range(3)
    ]
    with only_trainable(student, list(masks)):
        result = distill(
            teacher, student, list(masks), iter(data), pairs=[(2, 2)], steps=3, lr=0.05, gradient_masks=masks
        )
    assert result.steps == 3
    frozen = ~update
    assert torch.equal(ffn.up.weight[frozen], before_up[frozen])
    assert torch.equal(ffn.down.weight[:, frozen], before_down[:, frozen])
    assert not torch.equal(ffn.up.weight[update], before_up[update])


def test_the_sub_fm_adapter_plugs_into_the_full_fm():
    full = tiny_bert(hidden=8, ffn=12)
    sub = copy.deepcopy(full)
    compress(sub, [1], 0.75)
    spec = LoraSpec(r=2, alpha=4.0)
    full_state = adapter_state(lora_classifier(full, spec))
    sub_state = adapter_state(lora_classifier(sub, spec))
    assert {k: v.shape for k, v in sub_state.items()} == {k: v.shape for k, v in full_state.items()}
    assert any("classifier" in key for key in sub_state) and any("lora_A" in key for key in sub_state)


def test_fedot_layout_and_plugging_back():
    layout = EmulatorLayout.choose(12)
    assert (layout.adapter_layers, layout.emulator_layers, layout.kept_middle) == (2, 3, [2, 6, 9])
    layout = EmulatorLayout.choose(6)
    assert (layout.adapter_layers, layout.emulator_layers, layout.kept_middle) == (1, 2, [1, 4])
    with pytest.raises(ValueError, match="middle"):
        EmulatorLayout.choose(4, adapter_layers=2)
    full = tiny_bert(layers=6, hidden=8, ffn=12)
    emulator = build_emulator(full, layout)
    assert emulator.config.num_hidden_layers == 4
    spec = LoraSpec(r=2, alpha=4.0)
    emulator_state = adapter_state(lora_classifier(emulator, spec, layers=layout.emulator_adapter_layers))
    full_state = adapter_state(lora_classifier(copy.deepcopy(full), spec, layers=layout.full_adapter_layers))
    plugged = plug_into_full(emulator_state, layout, blocks_path(full))
    assert set(plugged) == set(full_state)
    assert any(".layer.5." in key for key in plugged) and not any(".layer.3." in key for key in plugged)


def test_a_model_package_rebuilds_the_pruned_model_exactly():
    model = tiny_bert(hidden=8, ffn=12)
    compress(model, [1], 0.75)
    package = ModelPackage.of(model)
    rebuilt = ModelPackage.from_record(package.config_json, package.to_array_record()).build()
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    assert ModelPackage.of(rebuilt).digest == package.digest


def test_classification_config_is_validated():
    with pytest.raises(ConfigError, match="compress-ratio"):
        RunConfig.from_mapping({"algorithm": "fedpft", "compress-ratio": 1.0})
    with pytest.raises(ConfigError, match="no instruction-tuning models"):
        RunConfig.from_mapping({"algorithm": "fedavg", "preset": "minilm-rt"})
    config = RunConfig.from_mapping({"algorithm": "fedpft"})
    assert (config.classify.foundation_model, config.data.dataset, config.data.partitioner) == (
        "all-minilm-l6-v2",
        "rotten-tomatoes",
        "dirichlet",
    )


def test_apoz_replies_are_validated():
    import numpy as np
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from fedpt_app.classify.compression.apoz import apoz_record_problem
    from fedpt_app.federation.screening import UpdateRules, check_reply
    from fedpt_app.models.lora import to_array_record
    from fedpt_app.protocol import APOZ_KEY, ARRAYS_KEY, METRICS_KEY
    from tests.test_reliability import GOOD_METRICS, _received

    state = {"lora_A": torch.zeros(2, 4)}
    rules = UpdateRules(
        state,
        "float32",
        0.0,
        1000,
        extra_records={APOZ_KEY: functools.partial(apoz_record_problem, widths={"layer-1": 3}, max_length=4)},
    )

    def reply(counts, tokens=10.0, with_apoz=True):
        records = {
            ARRAYS_KEY: to_array_record(state, "float32"),
            METRICS_KEY: MetricRecord({"num-examples": 5, **GOOD_METRICS}),
        }
        if with_apoz:
            records[APOZ_KEY] = ArrayRecord(
                {"layer-1": Array(np.array(counts, dtype=np.float64)), "tokens": Array(np.array([tokens]))}
            )
        return _received(7, RecordDict(records))

    assert check_reply(reply([0, 3, 10]), rules).problem is None
    assert "integer counts" in check_reply(reply([0, 3, 11]), rules).problem  # more zeros than tokens
    assert "shape" in check_reply(reply([0, 3]), rules).problem
    assert "positive integer" in check_reply(reply([0, 0, 0], tokens=0.0), rules).problem
    assert "records" in check_reply(reply([0, 0, 0], with_apoz=False), rules).problem
    assert check_reply(reply([0, 0, 0], tokens=20.0), rules).problem is None  # 5 examples × 4 tokens
    assert "exceeds num-examples × max-length" in check_reply(reply([0, 0, 0], tokens=21.0), rules).problem


def test_a_derived_base_is_built_once_per_recipe(tmp_path, monkeypatch):
    from fedpt_app.classify.models import cached_base

    monkeypatch.setenv("FEDPT_CACHE", str(tmp_path))
    builds = []

    def build():
        builds.append(1)
        model = tiny_bert(hidden=8, ffn=12)
        compress(model, [1], 0.75)
        return model

    first = cached_base({"kind": "sub-fm", "ratio": 0.75}, build)
    second = cached_base({"kind": "sub-fm", "ratio": 0.75}, build)
    cached_base({"kind": "sub-fm", "ratio": 0.5}, build)
    assert len(builds) == 2
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(first(input_ids=ids).logits, second(input_ids=ids).logits, atol=1e-6)


def test_fedpft_sends_each_client_what_it_lacks_and_checkpoints_its_aligned_ffns(tiny_bert_dir, tmp_path, monkeypatch):
    from flwr.app import Error

    from fedpt_app.classify.strategies.fedpft import FedPFT
    from fedpt_app.models.lora import from_array_record
    from fedpt_app.protocol import BASE_MODEL_KEY, FFN_UPDATE_KEY, MISSING_BASE
    from tests.test_reliability import _received

    monkeypatch.setenv("FEDPT_CACHE", str(tmp_path / "cache"))
    config = RunConfig.from_mapping(
        {
            "algorithm": "fedpft",
            "foundation-model": str(tiny_bert_dir),
            "align-steps": 2,
            "align-round-steps": 3,
            "public-samples": 32,
            "max-length": 16,
            "eval-samples": 16,
            "output-dir": str(tmp_path / "out"),
        }
    )
    strategy = FedPFT(config)
    strategy.schedule.identities.update({5: "partition-5", 6: "partition-6"})  # what the identity query learns
    round_config, _ = strategy.open_round(1, strategy.initial_arrays())

    def delivered(node_id: int) -> set[str]:
        node_config, records = strategy.deliveries(node_id, round_config)
        assert bool(node_config.base.config_json) == (BASE_MODEL_KEY in records)  # the base travels with its config
        return set(records)

    assert delivered(5) == {BASE_MODEL_KEY}  # a new client gets the sub-FM
    strategy.holders["partition-5"] = 0
    assert delivered(5) == set()  # sent once
    # an alignment round: APoZ from clients, then neuron-level distillation of the highest-APoZ half
    state = from_array_record(strategy.initial_arrays())
    before = {k: v.clone() for k, v in strategy.ffn_state().items()}
    strategy.counting_apoz = True  # as if round 1 (opened above) were an alignment round
    strategy.apoz = ({layer: torch.arange(16, dtype=torch.float64) for layer in strategy.layers}, 100)
    strategy.server_step(1, state)
    assert strategy.base_version == 1 and strategy.round.notes["align_loss"] >= 0.0
    after = strategy.ffn_state()
    up = next(key for key in after if "layer.1.intermediate.dense.weight" in key)
    assert torch.equal(after[up][:8], before[up][:8])  # the lower-APoZ half stays frozen
    assert not torch.equal(after[up][8:], before[up][8:])
    assert delivered(5) == {FFN_UPDATE_KEY}  # an older copy gets the changed FFNs only
    assert delivered(6) == {BASE_MODEL_KEY, FFN_UPDATE_KEY}
    # the aligned FFNs and who holds the base are part of the checkpoint: a restarted server takes them back (its
    # nodes get new ids, but keep their identities)
    restarted = FedPFT(config)
    restarted.restore_server_state(strategy.server_state())
    assert restarted.base_version == 1 and restarted.holders == {"partition-5": 0}
    assert all(torch.equal(restarted.ffn_state()[key], after[key]) for key in after)
    restarted.schedule.identities.update({42: "partition-5"})
    restarted.open_round(2, restarted.initial_arrays())
    assert set(restarted.deliveries(42, restarted.round_config(2))[1]) == {FFN_UPDATE_KEY}
    # a device that lost its base says so, and gets the whole base again next time
    lost = _received(42, error=Error(code=0, reason=f"ClientApp raised MissingBaseError: {MISSING_BASE}: no copy"))
    restarted.accept_replies([], [lost])
    assert "partition-5" not in restarted.holders
    assert set(restarted.deliveries(42, restarted.round_config(2))[1]) == {BASE_MODEL_KEY, FFN_UPDATE_KEY}


def test_each_device_keeps_its_own_copy_of_the_base_and_says_when_it_has_none(tmp_path, monkeypatch):
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from fedpt_app.classify import base_store
    from fedpt_app.config import LoraSettings
    from fedpt_app.protocol import BASE_MODEL_KEY, FFN_UPDATE_KEY, MISSING_BASE, ClientBase
    from tests.test_reliability import _received

    monkeypatch.setenv("FEDPT_CACHE", str(tmp_path))
    monkeypatch.setattr(base_store, "_BASE", {})
    package = ModelPackage.of(tiny_bert(hidden=8, ffn=12))
    base = ClientBase("sub-fm-test", 0, config_json=package.config_json)

    def sent(records: dict) -> Message:
        return _received(1, content=RecordDict(records))  # its metadata does not matter here

    base_store.receive_base(sent({BASE_MODEL_KEY: package.to_array_record()}), base, LoraSettings(), 0, "partition-0")
    # the weights once (named by their content), what each device holds under its own name
    assert sorted(path.name for path in (tmp_path / "client-bases").iterdir()) == ["partition-0", "sub-fm-test.pt"]
    base_store._BASE.clear()  # a fresh process: only the files remain
    with pytest.raises(base_store.MissingBaseError, match=MISSING_BASE):
        base_store.receive_base(sent({}), base, LoraSettings(), 0, "partition-1")  # never received it
    kept = base_store.receive_base(sent({}), base, LoraSettings(), 0, "partition-0")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(kept.get_base_model()(input_ids=ids).logits, package.build()(input_ids=ids).logits)
    # another device receiving the base (version 0) leaves the first one's newer version alone
    newer = dataclasses.replace(base, version=1)
    ffn = {
        name: tensor + 1.0 for name, tensor in kept.get_base_model().state_dict().items() if ".intermediate." in name
    }
    update = {FFN_UPDATE_KEY: ArrayRecord({name: Array(tensor.numpy()) for name, tensor in ffn.items()})}
    base_store.receive_base(sent(update), newer, LoraSettings(), 0, "partition-0")
    base_store.receive_base(sent({BASE_MODEL_KEY: package.to_array_record()}), base, LoraSettings(), 0, "partition-1")
    base_store._BASE.clear()
    reloaded = base_store.receive_base(sent({}), newer, LoraSettings(), 0, "partition-0")
    assert all(torch.equal(reloaded.get_base_model().state_dict()[name], ffn[name]) for name in ffn)


def test_a_decoder_foundation_model_classifies_in_float32_with_a_padding_token(tiny_llama_fm_dir):
    from fedpt_app.classify.models import load_classifier
    from fedpt_app.models.loading import load_tokenizer

    model = load_classifier(str(tiny_llama_fm_dir), 2)  # saved in float16, without a pad_token_id
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert model.config.pad_token_id == load_tokenizer(str(tiny_llama_fm_dir)).pad_token_id
    padded = torch.tensor([[101, 2023, 102, 0, 0], [101, 2023, 3185, 2001, 102]])
    logits = model(input_ids=padded, attention_mask=(padded != 0).long()).logits  # needs the pad token
    assert logits.shape == (2, 2)


def test_a_fedot_emulator_of_a_decoder_renumbers_its_kept_layers(tiny_llama_fm_dir):
    from fedpt_app.classify.models import load_classifier

    full = load_classifier(str(tiny_llama_fm_dir), 2)
    emulator = build_emulator(full, EmulatorLayout.choose(4))
    blocks = emulator.get_submodule(blocks_path(emulator))
    assert [block.self_attn.layer_idx for block in blocks] == list(range(len(blocks))) == [0, 1, 2]
    ids = torch.tensor([[101, 2023, 3185, 102]])
    assert emulator(input_ids=ids).logits.shape == (1, 2)  # the KV cache sized for 3 layers: no IndexError


def test_a_model_of_two_layers_or_fewer_names_the_layers_to_compress():
    with pytest.raises(ConfigError, match="2 layers.*compressed-layers"):
        ClassifyConfig().compressed_layer_indices(2)
    assert ClassifyConfig(compressed_layers="1").compressed_layer_indices(2) == [1]


def _architectures():
    """name -> builder of (a tiny config-built model, inputs for one forward)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MPNetConfig,
        MPNetForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    size = dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=40)
    return {
        "bert": lambda: (tiny_bert(layers=4, hidden=16, ffn=40), {"input_ids": torch.tensor([[1, 2, 3]])}),
        "roberta": lambda: (
            RobertaForSequenceClassification(RobertaConfig(vocab_size=50, **size)),
            {"input_ids": torch.tensor([[3, 4, 5]])},
        ),
        "mpnet": lambda: (
            MPNetForSequenceClassification(MPNetConfig(vocab_size=50, **size)),
            {"input_ids": torch.tensor([[3, 4, 5]])},
        ),
        "vit": lambda: (
            ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, **size)),
            {"pixel_values": torch.randn(1, 3, 8, 8)},
        ),
        "gpt2": lambda: (
            GPT2LMHeadModel(
                GPT2Config(vocab_size=50, n_embd=16, n_layer=4, n_head=2, n_inner=40, bos_token_id=0, eos_token_id=0)
            ),
            {"input_ids": torch.tensor([[1, 2]])},
        ),
        "llama": lambda: (
            LlamaForCausalLM(LlamaConfig(vocab_size=50, num_key_value_heads=1, **size)),
            {"input_ids": torch.tensor([[1, 2]])},
        ),
    }


@pytest.mark.parametrize("name", ["bert", "roberta", "mpnet", "vit", "gpt2", "llama"])
def test_ffns_are_found_by_structure_and_pruned_in_every_architecture(name):
    model, inputs = _architectures()[name]()
    ffns = find_ffns(model)
    assert len(ffns) == 4 and all(ffn.width == 40 for ffn in ffns)
    assert (ffns[0].gate_name is not None) == (name == "llama")
    compress(model, RunConfig().classify.compressed_layer_indices(4), 0.75)
    assert [ffn.width for ffn in find_ffns(model)] == [40, 10, 10, 40]
    model.eval()(**inputs)  # the pruned model still runs
