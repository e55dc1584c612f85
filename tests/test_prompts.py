import torch

from fedpt_app.instruct.prompts import (
    IGNORE_INDEX,
    build_prompt,
    collate,
    covering_length,
    fit_prompt,
    tokenize_example,
    tokenize_rows,
)


def test_prompt_template_with_and_without_context():
    assert build_prompt("Say hi.") == "### Instruction:\nSay hi.\n\n### Response:\n"
    assert build_prompt("Reverse.", "a b") == "### Instruction:\nReverse.\n\n### Input:\na b\n\n### Response:\n"


def test_loss_covers_response_tokens_only(tiny_tokenizer):
    row = {"instruction": "What is 2 plus 2?", "context": "", "response": "2 plus 2 is 4."}
    example, prompt_cut, response_cut = tokenize_example(tiny_tokenizer, row, max_length=200, prompt_budget=176)
    assert not prompt_cut and not response_cut
    prompt_len = len(tiny_tokenizer(build_prompt(row["instruction"]))["input_ids"])
    response = tiny_tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example.labels[prompt_len:] == response
    assert example.input_ids == example.input_ids[:prompt_len] + response


def test_a_long_prompt_loses_the_end_of_its_context_and_the_row_is_kept(tiny_tokenizer):
    context = "The capital of france is paris. " * 20
    row = {"instruction": "What is the capital of france?", "context": context, "response": "Paris."}
    budget = 40
    example, prompt_cut, response_cut = tokenize_example(tiny_tokenizer, row, max_length=56, prompt_budget=budget)
    assert prompt_cut and not response_cut
    prompt, _ = fit_prompt(tiny_tokenizer, row["instruction"], context, budget)  # evaluation cuts it the same way
    prompt_ids = tiny_tokenizer(prompt)["input_ids"]
    assert len(prompt_ids) <= budget and example.input_ids[: len(prompt_ids)] == prompt_ids
    assert prompt.startswith(build_prompt(row["instruction"], "The capital")[: -len("\n\n### Response:\n")])
    assert len(tiny_tokenizer(build_prompt(row["instruction"], context))["input_ids"]) > budget
    response = tiny_tokenizer("Paris.", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert example.labels[len(prompt_ids) :] == response  # the whole response is still learned


def test_an_instruction_too_long_for_the_budget_is_cut_and_a_long_response_stops_at_max_length(tiny_tokenizer):
    row = {
        "instruction": "What is the capital of france? " * 10,
        "context": "",
        "response": "The answer is paris. " * 9,
    }
    example, prompt_cut, response_cut = tokenize_example(tiny_tokenizer, row, max_length=48, prompt_budget=24)
    assert prompt_cut and response_cut and len(example.input_ids) == 48
    examples, truncation = tokenize_rows(tiny_tokenizer, [row, row], max_length=48, prompt_budget=24)
    assert len(examples) == 2 and (truncation.prompts_cut, truncation.responses_cut, truncation.rows_cut) == (2, 2, 2)


def test_the_covering_length_holds_95_percent_of_the_responses_with_their_eos(tiny_tokenizer):
    rows = [{"response": " ".join(["cold"] * n)} for n in range(1, 21)]  # 20 responses of 1..20 words
    lengths = sorted(len(tiny_tokenizer(row["response"], add_special_tokens=False)["input_ids"]) + 1 for row in rows)
    assert covering_length(tiny_tokenizer, rows) == lengths[18]  # 19 of 20 fit


def test_collate_pads_right_and_masks_padding(tiny_tokenizer):
    rows = [
        {"instruction": "Hi", "context": "", "response": "ok"},
        {"instruction": "What is the opposite of hot?", "context": "", "response": "cold"},
    ]
    examples = [tokenize_example(tiny_tokenizer, row, 64, 48)[0] for row in rows]
    batch = collate(examples, pad_token_id=tiny_tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch["input_ids"].shape[0] == 2
    assert torch.all(batch["attention_mask"][0, short:] == 0) and torch.all(batch["labels"][0, short:] == IGNORE_INDEX)
    assert torch.all(batch["input_ids"][0, short:] == tiny_tokenizer.pad_token_id)
