"""Speculative proxy decoding: the same greedy tokens as plain proxy decoding, the drafts kept exactly when the proxy
agrees with them, and sampled text distributed as the proxy's."""

from collections import Counter
from math import ceil

import pytest
import torch
from transformers import DynamicCache

from fedpt_app.instruct.decoding import (
    DecodingConfig,
    causal_lm_logits,
    crop_cache,
    decode,
    model_step,
    positions_of,
    sampling_probs,
)
from fedpt_app.instruct.proxy import LocalLogitsProvider, proxy_step
from fedpt_app.instruct.speculative import bfloat16_drafter, speculative_decode, speculative_generate
from fedpt_app.models.loading import load_tokenizer

PROMPTS = [
    "### Instruction:\nWhat is the capital of Peru?\n\n### Response:\n",
    "### Instruction:\nIs 7 even or odd?\n\n### Response:\n",
    "### Instruction:\nCount the letters in 'abc'.\n\n### Response:\n",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of tiny forwards: on a busy machine, a second intra-op thread spin-waits for a core and makes each
    one 50x slower (measured: 5 ms vs 0.25 s per speculative_decode call on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


class TunedSmallAsLarge:
    """The tuned small model itself (or its negation) as the large model: with alpha=0 the proxy is then exactly
    the drafter, whose greedy drafts must all be kept, or its negation, whose argmax never is the drafter's."""

    end_token_ids = ()

    def __init__(self, small, vocab_size: int, sign: float) -> None:
        self.small, self.vocab_size, self.sign = small, vocab_size, sign

    def logits(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False, last=0):
        logits, cache = causal_lm_logits(self.small, input_ids, attention_mask, position_ids, cache, use_cache)
        return self.sign * logits[:, -last:, : self.vocab_size], cache


def test_crop_cache_keeps_the_first_positions_of_a_transformers_cache():
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
    crop_cache(cache, 3)
    assert cache.get_seq_length() == 3


def greedy_tokens(large, small, tokenizer, prompt: str, config: DecodingConfig) -> list[int]:
    """The token ids plain proxy decoding picks for `prompt`."""
    step, picked = proxy_step(large, small, 1.0), []

    def recording_step(input_ids, attention_mask, position_ids):
        logits = step(input_ids, attention_mask, position_ids)
        picked.append(int(logits[0].argmax()))
        return logits

    decode(recording_step, tokenizer, [prompt], config)
    return picked


@pytest.fixture(scope="module")
def greedy_cases(large, tuned_small, tokenizer):
    """(config, prompts, plain proxy decoding's output): free; stopped at an end token the rows reach at different
    steps; the same with EOS ignored; stopped at a stop string. Batch 1, and a left-padded batch of 3."""
    free = DecodingConfig(max_new_tokens=20, stop_strings=())
    tokens = greedy_tokens(large, tuned_small, tokenizer, PROMPTS[0], free)
    end_token = next(token for token in tokens if token != tokens[0])
    text = decode(proxy_step(large, tuned_small, 1.0), tokenizer, PROMPTS[:1], free)[0]
    configs = [
        free,
        DecodingConfig(max_new_tokens=20, stop_strings=(), end_token_ids=(end_token,)),
        DecodingConfig(max_new_tokens=20, stop_strings=(), end_token_ids=(end_token,), ignore_eos=True),
        DecodingConfig(max_new_tokens=20, stop_strings=(text[8:10], "###")),
    ]
    cases = [
        (config, prompts, decode(proxy_step(large, tuned_small, 1.0), tokenizer, prompts, config))
        for config in configs
        for prompts in [[prompt] for prompt in PROMPTS] + [PROMPTS]
    ]
    free_out, ended, ignored, stopped = (plain for _, prompts, plain in cases if len(prompts) == 3)
    assert ended != free_out and ignored == free_out and stopped != free_out  # each setting changes the output
    return cases


@pytest.mark.parametrize("draft_tokens", [1, 3, 6])
def test_greedy_speculative_decoding_equals_plain_proxy_decoding(
    large, tuned_small, tokenizer, greedy_cases, draft_tokens
):
    for config, prompts, plain in greedy_cases:
        fast, stats = speculative_decode(large, tuned_small, tokenizer, prompts, config, draft_tokens=draft_tokens)
        assert fast == plain, (config, prompts)
        assert stats.target_forwards <= config.max_new_tokens


def test_a_bfloat16_drafter_changes_the_speed_never_the_answers(large, tuned_small, tokenizer, greedy_cases):
    drafter = bfloat16_drafter(tuned_small)
    assert next(drafter.parameters()).dtype == torch.bfloat16
    assert next(tuned_small.parameters()).dtype == torch.float32  # the verifying small is left as it was
    accepted = 0
    for config, prompts, plain in greedy_cases:
        fast, stats = speculative_decode(
            large, tuned_small, tokenizer, prompts, config, draft_tokens=3, drafter=drafter
        )
        assert fast == plain, (config, prompts)
        accepted += stats.accepted
    assert accepted > 0  # its drafts are used, not only corrected


@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
def test_drafts_are_kept_exactly_when_the_proxy_agrees(tuned_small, tokenizer, draft_tokens):
    config = DecodingConfig(max_new_tokens=12, stop_strings=(), ignore_eos=True)
    for sign, rate, forwards in ((1.0, 1.0, ceil(12 / (draft_tokens + 1))), (-1.0, 0.0, 12)):
        large = TunedSmallAsLarge(tuned_small, len(tokenizer), sign)
        plain = decode(proxy_step(large, tuned_small, 0.0), tokenizer, PROMPTS[:1], config)
        fast, stats = speculative_decode(
            large, tuned_small, tokenizer, PROMPTS[:1], config, alpha=0.0, draft_tokens=draft_tokens
        )
        assert fast == plain
        assert (stats.acceptance_rate, stats.target_forwards) == (rate, forwards)


def test_generate_wraps_instructions_in_the_prompt_template(large, tuned_small, tokenizer):
    config = DecodingConfig(max_new_tokens=8)
    answers, stats = speculative_generate(large, tuned_small, tokenizer, ["Is 7 even or odd?", "Hi"], config=config)
    plain = decode(proxy_step(large, tuned_small, 1.0), tokenizer, PROMPTS[1:2], config)
    assert answers[0] == plain[0] and len(answers) == 2 and stats.target_forwards > 0


SAMPLED = DecodingConfig(max_new_tokens=2, temperature=0.03, top_p=0.8, stop_strings=(), ignore_eos=True)
DRAWS = 1200


def exact_text_distribution(new_step, tokenizer, prompt: str, config: DecodingConfig) -> dict[str, float]:
    """P(the two-token continuation's text) when each token is drawn as `pick_next` draws it from `new_step()`."""
    ids = tokenizer([prompt], return_tensors="pt")["input_ids"]

    def next_probs(sequence: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(sequence)
        return sampling_probs(new_step()(sequence, mask, positions_of(mask))[0], config)

    first, texts = next_probs(ids), Counter()
    for token in first.nonzero().flatten().tolist():
        second = next_probs(torch.cat([ids, torch.tensor([[token]])], dim=1))
        for following in second.nonzero().flatten().tolist():
            text = tokenizer.decode([token, following], skip_special_tokens=True).strip()
            texts[text] += float(first[token] * second[following])
    return texts


def chi_square_p_value(observed: Counter, expected: dict[str, float], draws: int) -> float:
    """Pearson's test of the observed texts against the expected distribution; texts expected fewer than 5 times
    share one cell."""
    cells = [text for text, probability in expected.items() if probability * draws >= 5]
    rest_expected = max(draws * (1.0 - sum(expected[text] for text in cells)), 1e-9)
    rest_observed = draws - sum(observed[text] for text in cells)
    statistic = sum((observed[text] - draws * expected[text]) ** 2 / (draws * expected[text]) for text in cells)
    statistic += (rest_observed - rest_expected) ** 2 / rest_expected
    return float(torch.special.gammaincc(torch.tensor(len(cells) / 2), torch.tensor(statistic / 2)))  # df = cells


def test_speculative_sampling_keeps_the_proxy_distribution(tiny_model_dir, tuned_small, tokenizer):
    """Base small as the "large" and alpha=1.5: the proxy and the drafter differ, so drafts are kept, replaced and
    followed by bonus tokens; the texts still follow the proxy's distribution, and the drafter's own would not."""
    base, alpha, prompt = LocalLogitsProvider(str(tiny_model_dir), len(tokenizer)), 1.5, PROMPTS[0]
    expected = exact_text_distribution(lambda: proxy_step(base, tuned_small, alpha), tokenizer, prompt, SAMPLED)
    observed, kept = Counter(), []
    for seed in range(DRAWS):
        config = DecodingConfig(**{**SAMPLED.__dict__, "seed": seed})
        texts, stats = speculative_decode(base, tuned_small, tokenizer, [prompt], config, alpha=alpha, draft_tokens=1)
        observed[texts[0]] += 1
        kept.append(stats.acceptance_rate)
    assert 0.1 < sum(kept) / DRAWS < 0.9  # both acceptance and rejection are exercised
    assert chi_square_p_value(observed, expected, DRAWS) > 1e-3

    drafter = exact_text_distribution(lambda: model_step(tuned_small, len(tokenizer)), tokenizer, prompt, SAMPLED)
    texts = list(drafter)
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(torch.tensor([drafter[text] for text in texts]), DRAWS, True, generator=generator)
    assert chi_square_p_value(Counter(texts[i] for i in draws.tolist()), expected, DRAWS) < 1e-6
