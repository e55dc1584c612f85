"""FedPT's distillation: the KD loss against a hand-computed KL, and the teacher cache against recomputation."""

import math

import pytest
import torch

from fedpt_app.instruct.builtin import builtin_instruction_split
from fedpt_app.instruct.decoding import positions_of
from fedpt_app.instruct.distill import DistillConfig, ProxyDistiller, kd_loss, response_count, response_positions
from fedpt_app.instruct.prompts import collate, tokenize_rows
from fedpt_app.instruct.proxy import LocalLogitsProvider, shared_vocab_size, tuned_and_base
from fedpt_app.models.lora import LoraSpec, adapter_state, load_adapter_state, lora_model
from fedpt_app.serving.wire import approximate_top_k


def test_kd_loss_is_the_temperature_scaled_kl_from_teacher_to_student():
    teacher = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # softmax: [0.25, 0.75]
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # softmax: [0.5, 0.5]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # T = 2: teacher softmax [1/(1+sqrt 3), sqrt 3/(1+sqrt 3)], student uniform, times T^2 = 4
    p = 1.0 / (1.0 + math.sqrt(3.0))
    expected_t2 = 4.0 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(expected_t2, rel=1e-6)
    assert kd_loss(teacher, teacher, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_is_finite_when_the_teacher_rules_a_token_out():
    """A teacher logit of -inf (probability 0) contributes nothing, as in the KL's definition (0·log 0 = 0)."""
    teacher = torch.tensor([[0.0, math.log(3.0), -math.inf]])
    student = torch.tensor([[0.0, 0.0, 0.0]])  # softmax: [1/3, 1/3, 1/3]
    expected = 0.25 * math.log(0.25 / (1 / 3)) + 0.75 * math.log(0.75 / (1 / 3))
    loss = kd_loss(student, teacher, 1.0)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(expected, rel=1e-5)
    student.requires_grad_(True)
    kd_loss(student, teacher, 1.0).backward()
    assert torch.isfinite(student.grad).all()


def test_kd_loss_averages_over_positions():
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    single = kd_loss(student[:1], teacher[:1], 1.0)
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(single.item() / 2, rel=1e-6)


def test_response_positions_are_those_predicting_response_tokens():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 4, -100, -100, -100]])
    assert response_positions(labels).tolist() == [
        [False, True, True, False, False],
        [True, False, False, False, False],
    ]


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tiny_large_dir, tiny_tokenizer):
    small = lora_model(str(tiny_model_dir), LoraSpec(4, 8.0, target_modules=("q_proj", "v_proj")), seed=0)
    large = LocalLogitsProvider(str(tiny_large_dir), shared_vocab_size(str(tiny_model_dir), str(tiny_large_dir)))
    examples, _ = tokenize_rows(tiny_tokenizer, builtin_instruction_split("server")[:24], 64, 48)
    return small, large, examples


def _distiller(pair, tmp_path, mode, budget_mb=64.0, steps=3, top_k=0, tail="uniform"):
    small, large, examples = pair
    config = DistillConfig(1.0, 1.0, steps, 5e-3, 8, seed=0, teacher_top_k=top_k, teacher_tail=tail)
    return ProxyDistiller(
        small, large, examples, config, pad_token_id=0, cache_mode=mode, cache_budget_mb=budget_mb, cache_dir=tmp_path
    )


def _teacher_adapter(small):
    generator = torch.Generator().manual_seed(1)
    return {key: torch.randn(value.shape, generator=generator) * 0.3 for key, value in adapter_state(small).items()}


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_teacher_equals_recomputed_teacher(pair, tmp_path, mode):
    cached = _distiller(pair, tmp_path, mode)
    recomputed = _distiller(pair, tmp_path, "off")
    assert cached.cache.enabled and not recomputed.cache.enabled
    if mode == "disk":
        assert (tmp_path / "teacher-cache-values.npy").exists()
    small, _, examples = pair
    load_adapter_state(small, _teacher_adapter(small))
    for indices in ([0, 1, 2, 3], [5, 17, 9]):
        batch = collate([examples[i] for i in indices], pad_token_id=0)
        fast, slow = cached.teacher(indices, batch), recomputed.teacher(indices, batch)
        assert fast.shape == slow.shape and fast.shape[0] > len(indices)
        # float16 storage: absolute error within half a unit in the last place of the logit magnitudes
        torch.testing.assert_close(fast, slow, atol=2e-3 * slow.abs().max().item(), rtol=1e-3)


@pytest.mark.parametrize("tail", ["uniform", "drop", "union"])
def test_a_top_k_teacher_is_the_large_models_top_k_plus_the_whole_offset(pair, tmp_path, tail):
    """Cached (k values, ids and the tail mass per position) or recomputed, the teacher is the large model's top-5
    log-probabilities, the rest filled by `tail`, plus alpha x the small model's offset over the whole vocabulary;
    "union" keeps only the large model's and the tuned small's top-5 tokens (the latter at the tail's share)."""
    small, large, examples = pair
    cached, recomputed = (_distiller(pair, tmp_path, mode, top_k=5, tail=tail) for mode in ("disk", "off"))
    assert cached.cache.nbytes == int(cached.cache.offsets[-1]) * (5 * 6 + 4)
    load_adapter_state(small, _teacher_adapter(small))
    indices = [0, 3, 7]
    batch = collate([examples[i] for i in indices], pad_token_id=0)
    mask = response_positions(batch["labels"])
    inputs = (batch["input_ids"], batch["attention_mask"], positions_of(batch["attention_mask"]))
    (tuned, base), _ = tuned_and_base(small, large.vocab_size, *inputs)
    tuned, base = tuned[mask], base[mask]
    large_rows = large.logits_at(*inputs, mask)
    expected = approximate_top_k(large_rows, 5, "drop" if tail == "drop" else "uniform") + tuned - base
    if tail == "union":
        keep = torch.isfinite(approximate_top_k(large_rows, 5, "drop")) | torch.isfinite(
            approximate_top_k(tuned, 5, "drop")
        )
        expected = expected.masked_fill(~keep, -torch.inf)
    torch.testing.assert_close(recomputed.teacher(indices, batch), expected)
    torch.testing.assert_close(cached.teacher(indices, batch), expected, atol=5e-3, rtol=1e-3)  # float16 values
    finite = torch.isfinite(expected).sum(-1)
    if tail == "drop":
        assert (finite == 5).all()
    elif tail == "union":
        assert ((finite >= 5) & (finite <= 10)).all() and (finite > 5).any()
    else:
        assert (finite == large.vocab_size).all()


def test_approximate_top_k_hand_computed():
    rows = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.1]]))
    dropped = approximate_top_k(rows, 2, "drop")
    assert torch.equal(torch.isfinite(dropped), torch.tensor([[True, False, True, False]]))
    spread = approximate_top_k(rows, 2, "uniform").exp()  # the 0.2 outside the top 2, split over 2 tokens
    torch.testing.assert_close(spread, torch.tensor([[0.5, 0.1, 0.3, 0.1]]))
    torch.testing.assert_close(approximate_top_k(approximate_top_k(rows, 2, "uniform"), 2, "uniform"), spread.log())


def test_a_cache_over_budget_falls_back_to_recomputing(pair, tmp_path):
    assert _distiller(pair, tmp_path, "memory", budget_mb=0.0).cache.mode == "off"


def test_distillation_trains_only_the_adapter_towards_the_teacher(pair, tmp_path):
    small, _, _ = pair
    distiller = _distiller(pair, tmp_path, "memory", steps=12)
    start = _teacher_adapter(small)
    base_before = {name: p.detach().clone() for name, p in small.named_parameters() if "lora_" not in name}
    first = distiller.run_round(1, start)
    assert set(first.state) == set(start)
    assert any(not torch.equal(first.state[key], start[key]) for key in start)
    assert all(torch.equal(p, base_before[name]) for name, p in small.named_parameters() if "lora_" not in name)
    # The teacher is fixed for the round: distilling longer from the same start ends closer to it.
    distiller.config = DistillConfig(alpha=1.0, temperature=1.0, steps=1, lr=5e-3, batch_size=8, seed=0)
    one_step = distiller.run_round(1, start)
    assert first.loss < one_step.loss


@pytest.mark.parametrize("mode", ["memory", "off"])
def test_the_teacher_gives_the_same_logits_at_every_step_while_the_student_moves(pair, tmp_path, mode):
    """Each step sees every example (4 examples, batch 4): the teacher's rows per example never change, although the
    student's adapter (the same LoRA modules the teacher borrows for its forward) changes every step."""
    small, large, examples = pair
    config = DistillConfig(alpha=1.0, temperature=1.0, steps=4, lr=5e-2, batch_size=4, seed=0)
    distiller = ProxyDistiller(small, large, examples[:4], config, 0, mode, 64.0, tmp_path)
    seen: list[dict[int, torch.Tensor]] = []
    teacher = distiller.teacher

    def recording(indices, batch):
        rows = teacher(indices, batch)
        counts = [response_count(examples[i]) for i in indices]
        seen.append({i: part.clone() for i, part in zip(indices, rows.split(counts), strict=True)})
        return rows

    distiller.teacher = recording
    start = _teacher_adapter(small)
    result = distiller.run_round(1, start)
    assert len(seen) == 4 and any(not torch.equal(result.state[key], start[key]) for key in start)
    for step in seen[1:]:
        assert all(torch.equal(step[i], seen[0][i]) for i in range(4))


def test_fedpt_broadcasts_the_distilled_adapter_not_the_plain_average(tiny_model_dir, tiny_large_dir, tmp_path):
    """The same two replies, aggregated by FedPT with kd-steps=0 and with kd-steps=4 (same seed): without
    distillation the result is the hand-computed FedAvg; with it, the next round broadcasts the distilled adapter,
    which differs from that average."""
    from fedpt_app.config import RunConfig
    from fedpt_app.instruct.strategies.fedpt import FedPT
    from fedpt_app.models.lora import from_array_record
    from tests.test_reliability import _reply, _shifted

    def aggregate(kd_steps: int):
        config = RunConfig.from_mapping(
            {
                "algorithm": "fedpt",
                "small-model": str(tiny_model_dir),
                "large-model": str(tiny_large_dir),
                "lora-target-modules": "q_proj,v_proj",
                "kd-steps": kd_steps,
                "kd-samples": 16,
                "kd-batch-size": 4,
                "eval-samples": 4,
                "output-dir": str(tmp_path / f"kd{kd_steps}"),
            }
        )
        strategy = FedPT(config)
        strategy.open_round(1, strategy.initial_arrays())
        broadcast = strategy.round.broadcast
        states = [_shifted(broadcast, 0.05, 1), _shifted(broadcast, 0.05, 2)]
        strategy.round.sent = 2
        arrays, _ = strategy.aggregate_train(
            1, [_reply(11, states[0], examples=30), _reply(12, states[1], examples=10)]
        )
        _, wire = strategy.open_round(2, arrays)
        hand = {key: (30 * states[0][key] + 10 * states[1][key]) / 40 for key in states[0]}
        return from_array_record(wire), hand, strategy

    plain, hand, _ = aggregate(0)
    for key, value in hand.items():
        torch.testing.assert_close(plain[key], value, rtol=0, atol=1e-6)
    distilled, _, strategy = aggregate(4)
    expected = strategy.distiller.run_round(1, plain).state  # the same distillation from the same average, again
    assert all(torch.equal(distilled[key], expected[key]) for key in expected)
    assert any((distilled[key] - plain[key]).abs().max() > 1e-4 for key in plain)
