import json
from collections import Counter

import pytest

from fedpt_app.device.partition import PartitionSpec, load_partition
from fedpt_app.instruct.builtin import (
    CATEGORIES,
    CATEGORY_KINDS,
    KNOWLEDGE_TABLES,
    builtin_instruction_split,
    fact_prompts,
    pretraining_corpus,
)
from fedpt_app.instruct.data import DatasetError, load_splits, load_test_rows, training_rows


def test_builtin_dataset_is_deterministic_with_disjoint_splits():
    assert builtin_instruction_split("train") == builtin_instruction_split("train")
    splits = load_splits("builtin")
    assert len(CATEGORIES) >= 6
    assert set(Counter(row["category"] for row in splits["train"])) == set(CATEGORIES)
    keys = {split: {(r["instruction"], r["context"]) for r in rows} for split, rows in splits.items()}
    assert not keys["test"] & keys["server"]
    assert set(builtin_instruction_split("train")[0]) == {"instruction", "context", "response", "category"}


def test_pretraining_corpus_never_uses_the_instruction_format():
    assert not any("### " in document for document in pretraining_corpus(200, seed=0))


def test_knowledge_questions_of_each_split_ask_about_other_entities():
    splits = load_splits("builtin")
    prefixes = {
        category: fact_about("ENTITY", "").question.split("ENTITY")[0]
        for category, (_, fact_about) in KNOWLEDGE_TABLES.items()
    }

    def entities(rows, category):
        return {row["instruction"][len(prefixes[category]) :] for row in rows if row["category"] == category}

    for category in KNOWLEDGE_TABLES:
        test, server, train = (entities(splits[name], category) for name in ("test", "server", "train"))
        assert test and server and train
        assert not (test & server or test & train or server & train), category


def test_every_answer_is_phrased_as_in_the_corpus_and_every_fact_is_stated_there():
    rows = builtin_instruction_split("test")
    assert all(row["response"].startswith("the answer is ") and row["response"].endswith(".") for row in rows)
    assert {CATEGORY_KINDS[category] for category in CATEGORIES} == {"knowledge", "skill"}
    corpus = " ".join(pretraining_corpus(3000, seed=0))
    row = next(row for row in rows if row["category"] == "home_town")
    assert row["instruction"] in corpus  # the question in plain text, the fact itself behind it
    category, prompt, answer = next(fact for fact in fact_prompts() if fact[1].startswith(row["instruction"]))
    assert (category, f"{prompt} {answer}.") == ("home_town", f"{row['instruction']} {row['response'][:-1]}.")


def _rows(spec, num):
    return [load_partition(spec, pid, training_rows) for pid in range(num)]


def _key(row):
    return (row["instruction"], row["context"], row["response"])


def test_iid_partitions_are_equal_and_disjoint():
    parts = _rows(PartitionSpec("builtin", "iid", 5, "category"), 5)
    assert len({len(p) for p in parts}) == 1
    keys = [_key(r) for p in parts for r in p]
    assert len(keys) == len(load_splits("builtin")["train"])


def test_dirichlet_partitions_cover_train_and_skew_categories():
    parts = _rows(PartitionSpec("builtin", "dirichlet", 4, "category", dirichlet_alpha=0.3), 4)
    assert sum(len(p) for p in parts) == len(load_splits("builtin")["train"])
    shares = [Counter(r["category"] for r in p).most_common(1)[0][1] / len(p) for p in parts]
    assert max(shares) > 1.5 / len(CATEGORIES)  # far from uniform


def test_pathological_partitions_hold_k_categories_each():
    parts = _rows(PartitionSpec("builtin", "pathological", 6, "category", classes_per_partition=2), 6)
    assert all(len({r["category"] for r in p}) == 2 for p in parts)


def test_empty_partition_is_a_clear_error(tmp_path):
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(10)))
    with pytest.raises(DatasetError, match="empty"):
        load_partition(PartitionSpec(str(data), "iid", 9, "category"), 8, training_rows)


def test_malformed_jsonl_row_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": \n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: malformed JSON"):
        load_splits(str(data))


def test_row_missing_a_field_names_file_and_line(tmp_path):
    data = tmp_path / "missing.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(DatasetError, match=r"missing\.jsonl:2: missing or empty 'response'"):
        load_splits(str(data))


def test_csv_file_and_column_aliases(tmp_path):
    data = tmp_path / "rows.csv"
    data.write_text("prompt,input,output,category\n" + "".join(f"q{i},,a{i},c{i % 2}\n" for i in range(30)))
    splits = load_splits(str(data), test_fraction=0.1)
    assert [len(splits[s]) for s in ("test", "server", "train")] == [3, 3, 24]
    assert splits["train"][0]["response"].startswith("a")


def test_missing_dataset_file_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_splits(str(tmp_path / "nope.jsonl"))


def test_hub_path_with_a_local_dataset_folder(tmp_path):
    """`datasets.load_dataset` is the hub code path; a local folder in Dolly's format stands in for the hub."""
    folder = tmp_path / "dolly-standin"
    folder.mkdir()
    rows = [{"instruction": f"q{i}", "context": "", "response": f"a{i}", "category": "open_qa"} for i in range(40)]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    splits = load_splits(str(folder))
    assert sum(len(part) for part in splits.values()) == 40
    assert len(load_test_rows("builtin", str(folder), 0.1, 0)) == 40  # a separate test set is used whole


def test_world_facts_splits_are_disjoint_with_the_documented_schema():
    splits = load_splits("world-facts")
    assert len(splits["test"]) >= 200  # the default test-fraction keeps at least 200 test rows
    for rows in splits.values():
        for row in rows:
            assert set(row) == {"instruction", "context", "response", "category"}
            assert row["category"] in {"capital", "city-country"} and row["response"] and not row["context"]
    questions = {split: {row["instruction"] for row in rows} for split, rows in splits.items()}
    assert sum(map(len, questions.values())) == sum(map(len, splits.values()))  # every question asked once
    assert not questions["test"] & (questions["train"] | questions["server"])
    assert not questions["server"] & questions["train"]
    assert {row["category"] for row in splits["test"]} == {"capital", "city-country"}
    gabon = next(
        row for rows in splits.values() for row in rows if row["instruction"] == "What is the capital of Gabon?"
    )
    assert gabon["response"] == "Libreville"
    assert load_splits.__wrapped__("world-facts") == splits  # rebuilt from the package's data: the same rows
