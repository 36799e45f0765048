"""ClassMix alignment, Balanced ClassMix sampling and the replay buffer."""

from __future__ import annotations

import pytest
import torch

from segrl.data.classmix import (
    ReplayBuffer,
    balanced_class_probabilities,
    batch_mix_masks,
    classmix,
    sample_mix_classes,
)


def _pair() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    image_a = torch.rand(3, 4, 5, generator=g)
    image_b = torch.rand(3, 4, 5, generator=g) + 2.0  # disjoint values: origin is visible
    mask_a = torch.randint(0, 4, (4, 5), generator=g)
    mask_a[0, :2] = 255
    mask_b = torch.randint(0, 4, (4, 5), generator=g)
    mask_b[3, 3:] = 255
    return image_a, mask_a, image_b, mask_b


def test_classmix_keeps_image_and_mask_aligned():
    image_a, mask_a, image_b, mask_b = _pair()
    image, mask, paste = classmix(image_a, mask_a, image_b, mask_b, [1, 3, 255])
    assert torch.equal(paste, (mask_a == 1) | (mask_a == 3))  # 255 is never pasted
    assert torch.equal(image[:, paste], image_a[:, paste])
    assert torch.equal(mask[paste], mask_a[paste])
    assert torch.equal(image[:, ~paste], image_b[:, ~paste])
    assert torch.equal(mask[~paste], mask_b[~paste])
    # b's ignored pixels stay ignored wherever nothing was pasted over them
    assert (mask[(mask_b == 255) & ~paste] == 255).all()


def test_classmix_batched_and_no_classes():
    image_a, mask_a, image_b, mask_b = (t.unsqueeze(0).repeat(2, *[1] * t.dim()) for t in _pair())
    image, mask, paste = classmix(image_a, mask_a, image_b, mask_b, torch.tensor([2]))
    assert image.shape == (2, 3, 4, 5) and mask.shape == paste.shape == (2, 4, 5)
    image, mask, paste = classmix(image_a, mask_a, image_b, mask_b, [])
    assert not paste.any() and torch.equal(image, image_b) and torch.equal(mask, mask_b)


def test_balanced_probabilities_formula():
    counts = torch.tensor([99.0, 9.0, 0.0])  # smoothed: 100, 10, 1 -> inverse freq 1:10:100
    probs = balanced_class_probabilities(counts, temperature=1.0, uniform_mix=0.0)
    assert probs.tolist() == pytest.approx([1 / 111, 10 / 111, 100 / 111])
    uniform = balanced_class_probabilities(counts, temperature=0.0)
    assert uniform.tolist() == pytest.approx([1 / 3] * 3)
    mixed = balanced_class_probabilities(counts, temperature=1.0, uniform_mix=0.3)
    assert mixed[0].item() == pytest.approx(0.7 / 111 + 0.1)
    assert mixed.sum().item() == pytest.approx(1.0)


def test_balanced_sampling_picks_tail_classes_more_often():
    counts = torch.tensor([10000.0, 5000.0, 100.0, 10.0])
    probs = balanced_class_probabilities(counts, temperature=0.5)
    present = torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(4)
    for _ in range(2000):
        chosen = sample_mix_classes(present, probs, generator=g)
        assert chosen.numel() == 2 and chosen.unique().numel() == 2  # half, no repeats
        hits[chosen] += 1
    # expected about 1330, 940, 220, 190 of 4000 picks (0.66, 0.24, 0.05, 0.05 weights)
    assert hits[3] > hits[2] > max(hits[0], hits[1])
    assert hits[3] > 3 * hits[0]


def test_sample_mix_classes_edge_cases():
    probs = torch.full((5,), 0.2)
    assert sample_mix_classes(torch.tensor([4]), probs).tolist() == [4]  # at least one
    assert sample_mix_classes(torch.tensor([], dtype=torch.long), probs).numel() == 0
    assert sample_mix_classes(torch.tensor([1, 2, 3]), probs, k=5).numel() == 3
    only = sample_mix_classes(torch.tensor([1, 2]), torch.tensor([0.0, 0.0, 1.0]), k=1)
    assert only.tolist() == [2]


def _batch(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(start, start + n, dtype=torch.float)
    return ids.view(n, 1, 1, 1).expand(n, 3, 2, 2), ids.long().view(n, 1, 1).expand(n, 2, 2)


def test_replay_buffer_fifo_and_sampling():
    buffer = ReplayBuffer(capacity=4, seed=0)
    buffer.add(_batch(0, 3))
    images, masks = _batch(3, 3)
    buffer.add({"image": images, "mask": masks})
    assert len(buffer) == 4  # samples 0 and 1 were evicted
    images, masks = buffer.sample(4)
    assert sorted(images[:, 0, 0, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]  # all, no repeats
    assert torch.equal(images[:, 0].long(), masks)  # pairs stay together
    images, _ = buffer.sample(10)
    assert images.shape == (10, 3, 2, 2) and set(images[:, 0, 0, 0].tolist()) <= {2, 3, 4, 5}
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(2).sample(1)


def test_replay_buffer_draws_uniformly_and_state_round_trips():
    buffer = ReplayBuffer(capacity=4, seed=1)
    buffer.add(_batch(0, 4))
    counts = torch.zeros(4)
    for _ in range(400):
        counts[buffer.sample(1)[1][0, 0, 0]] += 1
    assert counts.min() > 70  # 100 each expected
    restored = ReplayBuffer(capacity=1, seed=99)
    restored.load_state_dict(buffer.state_dict())
    assert len(restored) == 4
    assert torch.equal(restored.sample(3)[1], buffer.sample(3)[1])  # same generator state


def test_batch_mix_masks_draw_like_sample_mix_classes_image_by_image():
    """Each image's classes: half of its own present ones, with the same tail-biased
    frequencies as the per-image draw (the batched one draws all images at once)."""
    probs = balanced_class_probabilities(torch.tensor([10000.0, 5000.0, 100.0, 10.0]), temperature=0.5)
    labels = torch.arange(4).repeat_interleave(3).view(1, 3, 4).expand(2000, 3, 4)  # every class, 3 pixels
    paste = batch_mix_masks(labels, probs, generator=torch.Generator().manual_seed(0))
    picked = paste.view(2000, 4, 3)
    assert (picked.all(2) == picked.any(2)).all()  # a class is pasted whole or not at all
    per_image = picked.any(2)
    assert (per_image.sum(1) == 2).all()  # half of the four present classes
    batched = per_image.float().mean(0)
    g, reference = torch.Generator().manual_seed(1), torch.zeros(4)
    for _ in range(2000):
        reference[sample_mix_classes(torch.arange(4), probs, generator=g)] += 1
    torch.testing.assert_close(batched, reference / 2000, atol=0.04, rtol=0)


def test_batch_mix_masks_only_paste_present_classes_never_ignore_and_differ_per_image():
    labels = torch.full((3, 4, 6), 255)
    labels[0, :, :3] = 2  # one class: always that one
    labels[1] = torch.tensor([0, 1, 2, 3, 4, 5]).repeat(4, 1)  # six classes: three
    # image 2: all ignore: nothing to paste
    probs = torch.full((6,), 1 / 6)
    paste = batch_mix_masks(labels, probs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(paste[0], labels[0] == 2)
    assert paste[1].any(0).sum() == 3 and (paste[1].all(0) == paste[1].any(0)).all()
    assert not paste[2].any()
    draws = {tuple(batch_mix_masks(labels[1:2].expand(8, -1, -1), probs)[i, 0].tolist()) for i in range(8)}
    assert len(draws) > 1  # each image draws its own classes


def test_batch_mix_masks_fall_back_to_uniform_when_no_present_class_weighs_anything():
    labels = torch.tensor([[[0, 1]]])
    paste = batch_mix_masks(labels, torch.tensor([0.0, 0.0, 1.0]), generator=torch.Generator().manual_seed(0))
    assert paste.sum() == 1
