"""Image classification: the offline digits, image folders and hub-style data files read with `datasets`, labels
by name, a vision FM through the same strategies (pixel batches, APoZ over patches), and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fedpt_app.classify.data import load_classification_splits, read_classification_file
from fedpt_app.classify.images import is_image_source, load_image_rows
from fedpt_app.classify.inputs import ImageInputs, TextInputs, check_inputs_match, model_inputs
from fedpt_app.datafiles import DatasetError


def _image_folder(root, counts: dict[str, int]):
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for index in range(count):
            pixels = np.full((6, 6, 3), 40 * index, dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    return root


def test_the_offline_digits_are_split_like_the_text_sets():
    splits = load_classification_splits("digits", "", 0.1, 0)
    assert splits.kind == "image" and splits.label_names == tuple("0123456789")
    assert len(splits.train) + len(splits.public) + len(splits.test) == 1797
    assert len(splits.test) == len(splits.public) == 179
    first = splits.train[0]["image"]
    assert first.size == (8, 8) and first.mode == "RGB"
    assert {row["label"] for row in splits.public} == {-1}
    assert max(np.asarray(row["image"]).max() for row in splits.train[:50]) == 255  # 16 grey levels -> 255


def test_an_image_folder_has_labels_by_folder_and_a_devices_folder_maps_by_name(tmp_path):
    folder = _image_folder(tmp_path / "pets", {"cat": 3, "dog": 2})
    rows, test_rows, names = load_image_rows(str(folder))
    assert names == ("cat", "dog") and test_rows is None
    assert sorted(row["label"] for row in rows) == [0, 0, 0, 1, 1]
    device = _image_folder(tmp_path / "device", {"dog": 2})  # sorted on its own, "dog" would be label 0
    mapped, names = read_classification_file(str(device), ("cat", "dog"))
    assert names == ("cat", "dog") and [row["label"] for row in mapped] == [1, 1]
    stranger = _image_folder(tmp_path / "stranger", {"cat": 1, "fox": 1})
    with pytest.raises(DatasetError, match=r"labels \['fox'\] are not among the run's labels"):
        read_classification_file(str(stranger), ("cat", "dog"))


def test_a_test_folder_with_splits_is_read_from_its_test_split(tmp_path):
    _image_folder(tmp_path / "split" / "train", {"cat": 3, "dog": 3})
    _image_folder(tmp_path / "split" / "test", {"cat": 1, "dog": 1})
    train_rows, names = read_classification_file(str(tmp_path / "split"), ("cat", "dog"))
    test_rows, _ = read_classification_file(str(tmp_path / "split"), ("cat", "dog"), held_out=True)
    assert (len(train_rows), len(test_rows)) == (6, 2)


def test_hub_style_data_files_find_their_image_and_label_columns(tmp_path):
    """A local stand-in for a hub image dataset: parquet files with an Image and a ClassLabel column, as
    `datasets` writes them (`img` and `label`, as in uoft-cs/cifar10), with a test split."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"img": ImageFeature(), "label": ClassLabel(names=["plane", "car"])})
    folder = tmp_path / "cifar-like" / "data"
    folder.mkdir(parents=True)
    for split, count in (("train", 6), ("test", 2)):
        images = [Image.fromarray(np.full((4, 4, 3), 30 * i, dtype=np.uint8)) for i in range(count)]
        table = Dataset.from_dict({"img": images, "label": [i % 2 for i in range(count)]}, features=features)
        table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    rows, test_rows, names = load_image_rows(str(tmp_path / "cifar-like"))
    assert names == ("plane", "car") and len(rows) == 6 and len(test_rows) == 2
    assert rows[0]["image"].mode == "RGB" and rows[1]["label"] == 1
    hidden = Dataset.from_dict({"img": images, "label": [-1, -1]}, features=features)  # test labels withheld
    hidden.to_parquet(str(folder / "test-00000-of-00001.parquet"))
    assert load_image_rows(str(tmp_path / "cifar-like"))[1] is None  # the test rows then come from train
    no_labels = tmp_path / "no-labels" / "data"
    no_labels.mkdir(parents=True)
    Dataset.from_dict({"img": [Image.new("RGB", (2, 2))]}, features=Features({"img": ImageFeature()})).to_parquet(
        str(no_labels / "train.parquet")
    )
    with pytest.raises(DatasetError, match="class-label column"):
        load_image_rows(str(tmp_path / "no-labels"))
    with pytest.raises(DatasetError, match="Could not load image dataset"):
        load_image_rows(str(tmp_path / "nowhere/at-all"))


def test_dataset_references_name_their_kind():
    assert is_image_source("digits") and is_image_source("uoft-cs/cifar10")
    assert not is_image_source("rotten-tomatoes") and not is_image_source("glue/sst2")
    assert not is_image_source("data/reviews.csv")


def test_a_vision_fm_reads_pixels_and_refuses_text(tiny_vit_dir):
    inputs = model_inputs(str(tiny_vit_dir))
    assert isinstance(inputs, ImageInputs) and isinstance(model_inputs("all-minilm-l6-v2"), TextInputs)
    rows = load_classification_splits("digits", "", 0.1, 0).train[:3]
    batch = next(inputs.batches(inputs.encode(rows, 16), 3))  # processed batch by batch
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["labels"].tolist() == [r["label"] for r in rows]
    assert inputs.tokens_per_example(16) == 16 + 2  # 4×4 patches, a class token (and room for a distillation one)
    with pytest.raises(DatasetError, match="reads images but dataset 'rotten-tomatoes' holds texts"):
        check_inputs_match(inputs, "text", "rotten-tomatoes")


def test_a_test_set_of_the_other_kind_is_refused(tmp_path):
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("text,label\ngreat,0\n")
    with pytest.raises(DatasetError, match="holds texts, dataset digits images"):
        load_classification_splits("digits", str(reviews), 0.1, 0)


def test_apoz_counts_every_patch_of_an_image(tiny_vit_dir):
    from fedpt_app.classify.compression.apoz import count_zero_activations
    from fedpt_app.classify.compression.ffn import find_ffns
    from fedpt_app.classify.models import load_classifier

    model = load_classifier(str(tiny_vit_dir), 10)
    inputs = model_inputs(str(tiny_vit_dir))
    examples = inputs.encode(load_classification_splits("digits", "", 0.1, 0).train[:5], 16)
    counts, tokens = count_zero_activations(model, [1, 2], inputs.batches(examples, 2))
    assert tokens == 5 * 17  # 16 patches and the class token per image
    captured = []
    handle = find_ffns(model)[1].activation_source.register_forward_hook(lambda m, i, out: captured.append(out))
    with torch.no_grad():
        model(pixel_values=inputs.pixels(examples)["pixel_values"])
    handle.remove()
    assert torch.equal(counts[1], (captured[0] <= 0).sum(dim=(0, 1)).double())
