import pytest
import torch

from fedpt_app.federation.aggregation import fedavg


def test_fedavg_weights_by_num_examples_hand_computed():
    a = {"lora_A": torch.tensor([[1.0, 2.0]]), "lora_B": torch.tensor([[0.0], [4.0]])}
    b = {"lora_A": torch.tensor([[3.0, 6.0]]), "lora_B": torch.tensor([[2.0], [0.0]])}
    averaged = fedavg([a, b], [10, 30])  # weights 1/4 and 3/4
    assert torch.equal(averaged["lora_A"], torch.tensor([[2.5, 5.0]]))
    assert torch.equal(averaged["lora_B"], torch.tensor([[1.5], [1.0]]))


def test_fedavg_upcasts_half_precision_payloads():
    a = {"w": torch.tensor([1.0], dtype=torch.float16)}
    averaged = fedavg([a, a], [1, 1])
    assert averaged["w"].dtype == torch.float32 and averaged["w"].item() == 1.0


def test_fedavg_rejects_bad_weights():
    with pytest.raises(ValueError):
        fedavg([{"w": torch.ones(1)}], [0])
    with pytest.raises(ValueError):
        fedavg([{"w": torch.ones(1)}], [1, 2])
