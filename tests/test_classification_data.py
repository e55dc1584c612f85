"""Classification data: the offline Rotten Tomatoes source, local files with clear errors, label-skew partitions."""

from __future__ import annotations

import pytest

from fedpt_app.classify.data import (
    collate,
    load_classification_splits,
    read_classification_file,
    training_rows,
)
from fedpt_app.classify.inputs import TextInputs
from fedpt_app.datafiles import content_key
from fedpt_app.device.partition import PartitionSpec, load_partition
from fedpt_app.instruct.data import DatasetError
from fedpt_app.models.loading import load_tokenizer


def test_rotten_tomatoes_splits_are_disjoint_and_unlabeled_where_public():
    splits = load_classification_splits("rotten-tomatoes", "", 0.1, 0)
    assert splits.label_names == ("rotten", "fresh")
    assert len(splits.train) + len(splits.public) + len(splits.test) == 12_808  # the critic snippets, no plots
    assert len(splits.test) == len(splits.public) == 1280
    assert {row["label"] for row in splits.train} == {0, 1} and {row["label"] for row in splits.public} == {-1}
    texts = [{row["text"] for row in split} for split in (splits.train, splits.public, splits.test)]
    assert not (texts[0] & texts[2]) or len(texts[0] & texts[2]) < 20  # a few critics repeat a snippet verbatim


def test_local_files_number_label_names_and_name_the_bad_line(tmp_path):
    good = tmp_path / "reviews.csv"
    good.write_text("text,label\ngreat film,pos\ndull,neg\nfine,pos\n")
    rows, names = read_classification_file(str(good))
    assert names == ("neg", "pos") and [row["label"] for row in rows] == [1, 0, 1]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"text": "a question?", "text_pair": "an answer", "label": 1}\n{"text": "", "label": 0}\n')
    with pytest.raises(DatasetError, match=r"pairs.jsonl:2: missing or empty 'text'"):
        read_classification_file(str(pairs))
    with pytest.raises(DatasetError, match="does not exist"):
        read_classification_file(str(tmp_path / "missing.csv"))


def test_a_devices_labels_map_by_name_onto_the_runs_labels(tmp_path):
    # Rotten Tomatoes numbers rotten=0, fresh=1; sorted per file, a device's "fresh"/"rotten" would be swapped
    device_file = tmp_path / "mine.jsonl"
    device_file.write_text('{"text": "loved it", "label": "fresh"}\n{"text": "awful", "label": "rotten"}\n')
    rows, names = read_classification_file(str(device_file), ("rotten", "fresh"))
    assert names == ("rotten", "fresh") and [row["label"] for row in rows] == [1, 0]
    only_one = tmp_path / "only-fresh.csv"  # a device may hold some of the labels only
    only_one.write_text("text,label\nloved it,fresh\n")
    assert [row["label"] for row in read_classification_file(str(only_one), ("rotten", "fresh"))[0]] == [1]
    unknown = tmp_path / "typo.jsonl"
    unknown.write_text('{"text": "loved it", "label": "fresh"}\n{"text": "meh", "label": "mixed"}\n')
    with pytest.raises(DatasetError, match=r"typo.jsonl:2: label 'mixed' is not one of the run's labels"):
        read_classification_file(str(unknown), ("rotten", "fresh"))
    digits = tmp_path / "digits.csv"  # label names that are digits map by name, not by position
    digits.write_text("text,label\nlow,1\nhigh,3\n")
    assert [row["label"] for row in read_classification_file(str(digits), ("1", "2", "3"))[0]] == [0, 2]
    out_of_range = tmp_path / "index.jsonl"
    out_of_range.write_text('{"text": "loved it", "label": 2}\n')
    with pytest.raises(DatasetError, match=r"index.jsonl:1: label 2"):
        read_classification_file(str(out_of_range), ("rotten", "fresh"))


def test_a_separate_test_file_maps_onto_the_datasets_labels(tmp_path):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\n" + "".join(f"text {i},{'neg' if i % 2 else 'pos'}\n" for i in range(20)))
    test.write_text("text,label\nonly positive,pos\n")  # sorted on its own, "pos" would be label 0
    splits = load_classification_splits(str(train), str(test), 0.1, 0)
    assert splits.label_names == ("neg", "pos") and [row["label"] for row in splits.test] == [1]


def test_local_files_are_cache_keys_by_content(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label\na,x\n")
    first = content_key(str(data))
    data.write_text("text,label\na,y\n")  # the same path, other data
    assert first.startswith("sha256:") and content_key(str(data)) != first
    assert content_key("rotten-tomatoes") == "rotten-tomatoes"  # a named dataset is its name
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.png").write_bytes(b"x")
    before = content_key(str(folder))
    (folder / "cat" / "2.png").write_bytes(b"y")  # a folder that gained a file is another dataset
    assert before.startswith("sha256:") and content_key(str(folder)) != before


def test_sentence_pairs_are_encoded_together_and_padded(tmp_path):
    tokenizer = load_tokenizer("all-minilm-l6-v2")
    encoded = TextInputs("all-minilm-l6-v2").encode(
        [{"text": "is it good?", "text_pair": "yes it is", "label": 1}, {"text": "no", "text_pair": "bad", "label": 0}],
        16,
    )
    batch = collate(encoded, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["attention_mask"].shape
    assert batch["token_type_ids"][0].max() == 1 and batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()


def _label_share_spread(alpha: float) -> float:
    spec = PartitionSpec("rotten-tomatoes", "dirichlet", 10, "label", dirichlet_alpha=alpha, seed=0)
    shares = []
    for partition_id in range(10):
        labels = [row["label"] for row in load_partition(spec, partition_id, training_rows)]
        shares.append(sum(labels) / len(labels))
    return max(shares) - min(shares)


def test_dirichlet_label_skew_with_flwr_datasets_shrinks_as_alpha_grows():
    spreads = [_label_share_spread(alpha) for alpha in (1.0, 5.0, 10.0)]
    assert spreads[0] > spreads[1] > spreads[2] > 0.0, spreads
