import pytest

from fedpt_app.instruct.evaluation import (
    contains_rate,
    contains_reference,
    exact_match_by_group,
    normalize_answer,
    score,
)


def test_rouge_l_and_exact_match_hand_computed():
    # LCS("the capital is paris", "paris is the capital") = "the capital" (2 tokens): P = R = 2/4 -> F1 0.5
    rouge, exact = score(["the capital is paris", "Cold."], ["paris is the capital", "cold"])
    assert rouge == pytest.approx((50.0 + 100.0) / 2)
    assert exact == 50.0


def test_normalization_ignores_case_punctuation_and_spacing():
    assert normalize_answer("  The capital of France is Paris. ") == "the capital of france is paris"


def test_exact_match_by_group_hand_computed():
    predictions = ["the answer is lima.", "the answer is 3", "the answer is odd", "The answer is Rome."]
    references = ["the answer is lima.", "the answer is 4.", "the answer is odd.", "the answer is rome."]
    groups = ["knowledge", "skill", "skill", "knowledge"]
    assert exact_match_by_group(predictions, references, groups) == {"knowledge": 100.0, "skill": 50.0}


def test_contains_reference_matches_whole_words_in_order():
    assert contains_reference("The capital of Gabon is Libreville.", "Libreville")
    assert contains_reference("It is in the United States.", "united states")
    assert not contains_reference("Nigeria", "Niger")  # a word, not a substring
    assert not contains_reference("States United", "United States")
    assert contains_rate(["Lima.", "It is Lima", "Quito"], ["lima", "Lima", "Lima"]) == pytest.approx(200.0 / 3)
