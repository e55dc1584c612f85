import torch

from fedpt_app.instruct.prompts import IGNORE_INDEX, build_prompt, collate, tokenize_example


def test_prompt_template_with_and_without_context():
    assert build_prompt("Say hi.") == "### Instruction:\nSay hi.\n\n### Response:\n"
    assert build_prompt("Reverse.", "a b") == "### Instruction:\nReverse.\n\n### Input:\na b\n\n### Response:\n"


def test_loss_covers_response_tokens_only(tiny_tokenizer):
    row = {"instruction": "What is 2 plus 2?", "context": "", "response": "2 plus 2 is 4."}
    example = tokenize_example(tiny_tokenizer, row, max_length=200)
    prompt_len = len(tiny_tokenizer(build_prompt(row["instruction"]))["input_ids"])
    response = tiny_tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example.labels[prompt_len:] == response
    assert example.input_ids == example.input_ids[:prompt_len] + response


def test_example_without_room_for_the_response_is_dropped(tiny_tokenizer):
    row = {"instruction": "What is the capital of france? " * 5, "context": "", "response": "Paris."}
    assert tokenize_example(tiny_tokenizer, row, max_length=8) is None


def test_collate_pads_right_and_masks_padding(tiny_tokenizer):
    rows = [
        {"instruction": "Hi", "context": "", "response": "ok"},
        {"instruction": "What is the opposite of hot?", "context": "", "response": "cold"},
    ]
    examples = [tokenize_example(tiny_tokenizer, row, 64) for row in rows]
    batch = collate(examples, pad_token_id=tiny_tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch["input_ids"].shape[0] == 2
    assert torch.all(batch["attention_mask"][0, short:] == 0) and torch.all(batch["labels"][0, short:] == IGNORE_INDEX)
    assert torch.all(batch["input_ids"][0, short:] == tiny_tokenizer.pad_token_id)
