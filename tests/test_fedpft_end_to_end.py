"""End-to-end `flwr run .` simulations of FedPFT, FedOT and FedPETuning on a tiny config-built BERT (with the
MiniLM package's tokenizer) and the offline Rotten Tomatoes data: 2 rounds, 3 clients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedpt_app.classify.compression.alignment import ffn_parameters
from fedpt_app.classify.compression.ffn import compress, find_ffns
from fedpt_app.classify.models import ModelPackage, load_classifier
from fedpt_app.tools.simulation import run_simulation, validate_overrides

QUICK = (
    "num-server-rounds=2 fraction-train=1.0 local-epochs=1 max-length=32 eval-samples=128 public-samples=64 "
    "align-steps=4 align-round-steps=2 align-interval=1"
)


def _simulate(tmp_path, tiny_bert_dir, overrides: str):
    output = tmp_path / "out"
    run_config = f"{overrides} foundation-model='{tiny_bert_dir}' {QUICK} output-dir='{output}'"
    outcome = run_simulation(run_config, num_supernodes=3, flwr_home=tmp_path / "flwr", echo=None)
    assert outcome.succeeded, outcome.log[-4000:]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    return rows, output, validate_overrides(run_config)


def _package_bytes(model) -> int:
    return ModelPackage.of(model).to_array_record().count_bytes()


def test_fedpft_sends_the_sub_fm_once_aligns_with_client_apoz_and_reports_both_accuracies(tmp_path, tiny_bert_dir):
    rows, output, config = _simulate(tmp_path, tiny_bert_dir, "algorithm='fedpft'")
    sub = load_classifier(str(tiny_bert_dir), 2)
    compress(sub, [1, 2], 0.75)
    assert rows[1]["bytes_down_model"] == 3 * _package_bytes(sub)  # the sub-FM, to each of the 3 clients
    # round 2: only the FFN tensors of the layers round 1's alignment changed (layers 1 and 2: W1 16x32, b1, W2 32x16,
    # b2), as an ArrayRecord (count_bytes includes each array's name and header)
    names = {id(parameter): name for name, parameter in sub.named_parameters()}
    ffns = find_ffns(sub)
    update = ArrayRecord(
        {
            names[id(p)]: Array(p.detach().numpy())
            for layer in (1, 2)
            for p in ffn_parameters(ffns[layer], with_norms=False)
        }
    )
    assert sum(array.numpy().size for array in update.values()) == 2 * (16 * 32 + 16 + 32 * 16 + 32)
    assert rows[2]["bytes_down_model"] == 3 * update.count_bytes()
    apoz_bytes = ArrayRecord(
        {"layer-1": Array(np.zeros(16)), "layer-2": Array(np.zeros(16)), "tokens": Array(np.zeros(1))}
    ).count_bytes()
    for row in rows[1:]:
        assert row["failures"] == 0 and row["rejected"] == 0
        assert row["align_loss"] >= 0.0 and 0.0 < row["apoz_mean"] < 1.0
        # up: the adapter each client got back, plus its APoZ counts (float64: layers 1 and 2 of width 16, tokens)
        assert row["bytes_up"] == row["bytes_down"] - row["bytes_down_model"] + 3 * apoz_bytes
    for row in rows:
        assert 0.0 <= row["accuracy_full"] <= 100.0 and 0.0 <= row["accuracy_sub"] <= 100.0
    # the saved adapter is the plug-in: it loads onto the full FM, and exports as a merged classifier
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    plugged = PeftModel.from_pretrained(base, output / "adapter").eval()
    from fedpt_app.tools.export import export_run

    written = export_run(output, tmp_path / "export", merge=True)
    merged = AutoModelForSequenceClassification.from_pretrained(written["merged"]).eval()
    assert merged.config.id2label == {0: "rotten", 1: "fresh"}
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, plugged(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_fedot_trains_the_emulator_adapter_and_plugs_it_into_the_full_fm(tmp_path, tiny_bert_dir):
    rows, output, _ = _simulate(tmp_path, tiny_bert_dir, "algorithm='fedot'")
    assert all(row["accuracy_full"] is not None and row["accuracy_sub"] is not None for row in rows)
    assert rows[1]["bytes_down_model"] > 0 and rows[2]["bytes_down_model"] == 0
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    plugged = PeftModel.from_pretrained(base, output / "adapter")
    lora_layers = {name.split(".layer.")[1].split(".")[0] for name, _ in plugged.named_parameters() if "lora_A" in name}
    assert lora_layers == {"0", "3"}  # 4 layers: 1 adapter layer per side, around the original middle


def test_fedpetuning_sends_the_full_fm_once(tmp_path, tiny_bert_dir):
    rows, _, _ = _simulate(tmp_path, tiny_bert_dir, "algorithm='fedpetuning'")
    full = load_classifier(str(tiny_bert_dir), 2)
    assert rows[1]["bytes_down_model"] == 3 * _package_bytes(full) and rows[2]["bytes_down_model"] == 0
    assert all(row["accuracy_full"] is not None and row["accuracy_sub"] is None for row in rows)


@pytest.mark.parametrize("algorithm", ["fedpft", "fedpetuning", "fedot"])
def test_a_decoder_foundation_model_runs_every_algorithm(tmp_path, tiny_llama_fm_dir, algorithm):
    """A 4-layer Llama saved in float16 with no padding token, as a new user would bring a decoder."""
    rows, output, _ = _simulate(tmp_path, tiny_llama_fm_dir, f"algorithm='{algorithm}'")
    assert all(row["failures"] == 0 and row["rejected"] == 0 for row in rows[1:])
    assert all(0.0 <= row["accuracy_full"] <= 100.0 for row in rows)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama_fm_dir, num_labels=2, dtype=torch.float32)
    base.config.pad_token_id = 0  # the MiniLM tokenizer's [PAD], as in training
    plugged = PeftModel.from_pretrained(base, output / "adapter").eval()
    from fedpt_app.tools.export import export_run

    merged = AutoModelForSequenceClassification.from_pretrained(
        export_run(output, tmp_path / "export", merge=True)["merged"]
    ).eval()
    assert merged.config.pad_token_id == 0  # batched inputs find their last real token
    padded = torch.tensor([[101, 2023, 102, 0], [101, 2023, 3185, 102]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=padded, attention_mask=(padded != 0).long()).logits,
            plugged(input_ids=padded, attention_mask=(padded != 0).long()).logits,
        )


@pytest.mark.parametrize("algorithm", ["fedpft", "fedpetuning", "fedot"])
def test_a_vision_foundation_model_runs_every_algorithm_on_the_digits(tmp_path, tiny_vit_dir, algorithm):
    """A config-built ViT (no pretrained one installs offline) on the offline handwritten digits."""
    from transformers import AutoModelForImageClassification

    from fedpt_app.tools.export import export_run

    rows, output, _ = _simulate(tmp_path, tiny_vit_dir, f"algorithm='{algorithm}' dataset='digits'")
    assert all(row["failures"] == 0 and row["rejected"] == 0 for row in rows[1:])
    assert all(0.0 <= row["accuracy_full"] <= 100.0 for row in rows)
    written = export_run(output, tmp_path / "export", merge=True)
    merged = AutoModelForImageClassification.from_pretrained(written["merged"]).eval()
    base = AutoModelForImageClassification.from_pretrained(tiny_vit_dir, num_labels=10)
    plugged = PeftModel.from_pretrained(base, output / "adapter").eval()
    pixels = torch.rand(2, 3, 16, 16)
    assert merged.config.id2label[3] == "3"
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, plugged(pixel_values=pixels).logits)
