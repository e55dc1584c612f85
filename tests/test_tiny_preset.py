"""The tiny preset's recipe on config-built models: the small is cut from the large and distilled from it."""

import torch
from transformers import LlamaForCausalLM

from fedpt_app.classify.compression.ffn import find_ffns, most_salient
from fedpt_app.instruct.builtin import (
    KNOWLEDGE_TABLES,
    WEB_ANSWER_PHRASINGS,
    builtin_instruction_split,
    web_answer_rows,
)
from fedpt_app.instruct.tiny_preset import (
    Derivation,
    TrainSettings,
    derive_small,
    distillation_loss,
    opened_by_rows,
    pack_blocks,
    with_templated_rows,
)
from tests.conftest import tiny_llama


def _large(tiny_tokenizer, seed=0) -> LlamaForCausalLM:
    return tiny_llama(tiny_tokenizer, hidden=32, layers=3, seed=seed)


def test_distillation_loss_is_the_per_token_kl_from_the_teacher(tiny_tokenizer):
    teacher, student = _large(tiny_tokenizer, seed=0), _large(tiny_tokenizer, seed=1)
    batch = torch.randint(3, len(tiny_tokenizer), (2, 5))
    assert distillation_loss(teacher)(teacher, batch).item() < 1e-6
    with torch.no_grad():
        p = torch.softmax(teacher(input_ids=batch).logits, -1)
        q = torch.softmax(student(input_ids=batch).logits, -1)
        expected = (p * (p.log() - q.log())).sum(-1).mean()
        assert torch.allclose(distillation_loss(teacher)(student, batch), expected, atol=1e-5)


def test_the_small_is_the_large_cut_to_some_blocks_and_its_most_salient_neurons(tiny_tokenizer, tmp_path):
    large = _large(tiny_tokenizer)
    salient = [most_salient(find_ffns(large)[index], 16) for index in (0, 2)]
    no_training = TrainSettings(steps=0, batch_size=2, lr=1e-3, warmup=1)
    small = derive_small(large, torch.zeros(4, 8, dtype=torch.long), Derivation((0, 2), 16, no_training, 0.0), 0, print)
    assert small.config.num_hidden_layers == 2 and small.config.intermediate_size == 16
    assert torch.equal(small.model.embed_tokens.weight, large.model.embed_tokens.weight)
    for position, index in enumerate((0, 2)):
        small_block, large_block = small.model.layers[position], large.model.layers[index]
        assert torch.equal(small_block.self_attn.q_proj.weight, large_block.self_attn.q_proj.weight)
        assert torch.equal(small_block.mlp.up_proj.weight, large_block.mlp.up_proj.weight[salient[position]])
        assert torch.equal(small_block.mlp.down_proj.weight, large_block.mlp.down_proj.weight[:, salient[position]])
    small.save_pretrained(tmp_path)  # an ordinary Llama folder: loads with the plain config
    batch = torch.randint(3, len(tiny_tokenizer), (1, 6))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(reloaded(input_ids=batch).logits, small.eval()(input_ids=batch).logits, atol=1e-6)


def test_distilling_brings_the_small_closer_to_the_large(tiny_tokenizer):
    large = _large(tiny_tokenizer)
    blocks = torch.randint(3, len(tiny_tokenizer), (16, 12), generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(steps=0, batch_size=4, lr=3e-3, warmup=1)
    before = derive_small(large, blocks, Derivation((0, 2), 8, settings, 0.0), 0, print)
    after = derive_small(large, blocks, Derivation((0, 2), 8, TrainSettings(40, 4, 3e-3, 1), 0.0), 0, print)
    loss = distillation_loss(large)
    with torch.no_grad():
        assert loss(after, blocks).item() < 0.8 * loss(before, blocks).item()


def test_templated_documents_replace_a_share_of_the_corpus():
    corpus = [f"the capital of country{i} is city{i}." for i in range(10)]
    rows = [{"instruction": "is 3 even or odd?", "context": "", "response": "the answer is odd."}]
    documents = with_templated_rows(corpus, rows, 0.3, seed=0)
    assert len(documents) == 10
    templated = [d for d in documents if d.startswith("### Instruction:\n")]
    assert templated == ["### Instruction:\nis 3 even or odd?\n\n### Response:\nthe answer is odd."] * 3
    assert sorted(set(documents) - set(templated)) == sorted(corpus[3:])


def test_the_large_model_s_web_answers_vary_in_phrasing_and_never_ask_about_test_entities():
    rows = web_answer_rows(600, seed=0)
    test_questions = {
        row["instruction"] for row in builtin_instruction_split("test") if row["category"] in KNOWLEDGE_TABLES
    }
    assert not test_questions & {row["instruction"] for row in rows}
    openings = {row["response"].split()[0] for row in rows}
    assert {"the", "it"} <= openings and len(openings) > 10  # the three phrasings, bare answers among them
    parity = [row for row in rows if row["instruction"].endswith("even or odd?")]
    assert parity
    for row in parity:
        kind = "even" if int(row["instruction"].split()[1]) % 2 == 0 else "odd"
        assert row["response"] in {phrasing.format(answer=kind) for phrasing in WEB_ANSWER_PHRASINGS}


def test_opened_documents_run_on_after_the_templated_answer():
    corpus = [f"the capital of country{i} is city{i}." for i in range(10)]
    rows = [{"instruction": "is 3 even or odd?", "context": "", "response": "it is odd."}]
    documents = opened_by_rows(corpus, rows, 0.3, seed=0)
    opened = [(text, document) for text, document in zip(corpus, documents, strict=True) if text != document]
    assert len(opened) == 3
    for text, document in opened:
        assert document == f"### Instruction:\nis 3 even or odd?\n\n### Response:\nit is odd. {text}"


def test_packing_joins_documents_with_eos_into_full_blocks_and_reuses_known_encodings(tiny_tokenizer):
    documents = ["the capital of france is paris.", "ivy has 2 hats.", "is 4 even or odd?"]
    stream = []
    for text in documents:
        stream += tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    full = len(stream) // 4 * 4
    assert pack_blocks(tiny_tokenizer, documents, block_size=4).flatten().tolist() == stream[:full]

    encoded: dict[str, list[int]] = {}
    first = pack_blocks(tiny_tokenizer, documents[:2], block_size=4, encoded=encoded)
    assert set(encoded) == set(documents[:2])
    encoded[documents[0]] = [7, 7, 7]  # a known encoding is used as is, not recomputed
    again = pack_blocks(tiny_tokenizer, documents, block_size=4, encoded=encoded)
    assert set(encoded) == set(documents)
    assert again.flatten().tolist()[:4] == [7, 7, 7, tiny_tokenizer.eos_token_id]
    assert not torch.equal(first[0], again[0])
