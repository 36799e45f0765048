"""Per-class banks: confidence EMA, feature queues and ProDA prototypes, by hand."""

from __future__ import annotations

import pytest
import torch

from segrl.methods.banks import ClassConfidenceBank, FeatureMemoryBank, PrototypeBank


def _probs(*pixels: list[float]) -> torch.Tensor:
    """Per-pixel class probabilities -> 1 x C x 1 x N."""
    return torch.tensor(pixels).T.reshape(1, -1, 1, len(pixels))


def test_confidence_bank_ema_exact():
    bank = ClassConfidenceBank(num_classes=3, alpha=0.9)
    probs = _probs([0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.5, 0.5, 0.0])
    bank.update(probs, torch.tensor([[[0, 0, 1, 255]]]))
    assert bank.confidence.tolist() == pytest.approx([0.7, 0.7, 0.0])  # first sight: set
    bank.update(_probs([0.4, 0.6, 0.0]), torch.tensor([[[0]]]))
    assert bank.confidence.tolist() == pytest.approx([0.9 * 0.7 + 0.1 * 0.4, 0.7, 0.0])
    assert bank.seen.tolist() == [True, True, False]


def test_confidence_bank_favours_low_confidence_and_round_trips():
    bank = ClassConfidenceBank(num_classes=3)
    bank.load_state_dict(
        {
            "confidence": torch.tensor([0.9, 0.5, 0.1]),
            "seen": torch.ones(3, dtype=torch.bool),
            "alpha": 0.99,
        }
    )
    probs = bank.sampling_probabilities()
    assert probs.tolist() == pytest.approx(torch.tensor([0.1, 0.5, 0.9]).softmax(0).tolist())
    assert probs[2] > probs[1] > probs[0]
    copy = ClassConfidenceBank(num_classes=3)
    copy.load_state_dict(bank.state_dict())
    assert torch.equal(copy.confidence, bank.confidence) and copy.alpha == 0.99


def test_feature_bank_fifo_per_class():
    bank = FeatureMemoryBank(num_classes=3, dim=2, size_per_class=2)
    bank.push(torch.tensor([[1.0, 1], [2, 2], [9, 9]]), torch.tensor([0, 0, 255]))
    bank.push(torch.tensor([[3.0, 3], [5, 5]]), torch.tensor([0, 1]))
    assert bank.get(0).tolist() == [[2.0, 2.0], [3.0, 3.0]]  # 1 evicted, oldest first
    assert bank.get(1).tolist() == [[5.0, 5.0]]
    assert bank.counts().tolist() == [2, 1, 0]
    means = bank.means()
    assert means.tolist() == [[2.5, 2.5], [5.0, 5.0], [0.0, 0.0]]  # empty class: zeros, no NaN


def test_feature_bank_negatives_exclude_the_class_and_balance_the_others():
    bank = FeatureMemoryBank(num_classes=3, dim=1, size_per_class=100, seed=0)
    bank.push(torch.zeros(100, 1), torch.zeros(100, dtype=torch.long))  # head class 0
    bank.push(torch.ones(2, 1), torch.ones(2, dtype=torch.long))  # tail class 1
    bank.push(torch.full((5, 1), 2.0), torch.full((5,), 2))
    negatives = bank.sample_negatives(exclude_class=2, m=1000)
    assert negatives.shape == (1000, 1) and not (negatives == 2.0).any()
    share_tail = (negatives == 1.0).float().mean().item()
    assert 0.4 < share_tail < 0.6  # per class, not per entry
    assert bank.sample_negatives(0, 0).shape == (0, 1)
    lonely = FeatureMemoryBank(num_classes=2, dim=1, size_per_class=4)
    lonely.push(torch.ones(1, 1), torch.zeros(1, dtype=torch.long))
    assert lonely.sample_negatives(0, 5).shape == (0, 1)


def test_feature_bank_state_round_trip_repeats_draws():
    bank = FeatureMemoryBank(num_classes=2, dim=2, size_per_class=8, seed=3)
    bank.push(torch.randn(8, 2), torch.tensor([0, 1] * 4))
    copy = FeatureMemoryBank(num_classes=2, dim=2, size_per_class=8)
    copy.load_state_dict(bank.state_dict())
    assert torch.equal(copy.sample_negatives(0, 4), bank.sample_negatives(0, 4))


def test_prototype_bank_averages_its_first_batches_then_follows_the_momentum():
    """A class's prototype is the mean of its first batches' centroids (not the first batch
    with weight 0.9 after it), until the momentum m caps the warm-up n / (n + 1)."""
    bank = PrototypeBank(num_classes=3, dim=2, momentum=0.9)
    capped = PrototypeBank(num_classes=3, dim=2, momentum=0.25)
    # 1 x 2 x 1 x 3 features: pixels (1, 2) and (3, 4) of class 0, (5, 6) ignored
    first = torch.tensor([[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]).view(1, 2, 1, 3), torch.tensor([[[0, 0, 255]]])
    second = torch.tensor([[12.0, 7.0], [13.0, 8.0]]).view(1, 2, 1, 2), torch.tensor([[[0, 1]]])
    for b in (bank, capped):
        b.update(*first)
    assert bank.prototypes.tolist() == [[2.0, 3.0], [0.0, 0.0], [0.0, 0.0]]  # initialised
    assert bank.initialized.tolist() == [True, False, False]
    for b in (bank, capped):
        b.update(*second)
    assert bank.prototypes[0].tolist() == pytest.approx([(2 + 12) / 2, (3 + 13) / 2])
    assert capped.prototypes[0].tolist() == pytest.approx([0.25 * 2 + 0.75 * 12, 0.25 * 3 + 0.75 * 13])
    assert bank.prototypes[1].tolist() == [7.0, 8.0]
    copy = PrototypeBank(num_classes=3, dim=2)
    copy.load_state_dict(bank.state_dict())
    assert torch.equal(copy.prototypes, bank.prototypes) and copy.momentum == 0.9
    assert copy.batches.tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="nearest"):
        bank.update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
