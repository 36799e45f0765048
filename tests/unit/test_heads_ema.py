"""EMA teacher arithmetic and the shapes of the extra heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segrl.models.ema import EMATeacher, ema_momentum
from segrl.models.heads import OutputDiscriminator, ProjectionHead, TwoHeadClassifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _linear(weight: float, bias: float) -> nn.Linear:
    layer = nn.Linear(1, 1)
    with torch.no_grad():
        layer.weight.fill_(weight)
        layer.bias.fill_(bias)
    return layer


def test_momentum_warm_up_values():
    assert ema_momentum(0, 0.99) == 0.0
    assert ema_momentum(1, 0.99) == 0.5
    assert ema_momentum(9, 0.99) == pytest.approx(0.9)
    assert ema_momentum(1000, 0.99) == 0.99


def test_teacher_is_a_frozen_eval_copy():
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    teacher = EMATeacher(student, momentum=0.9)
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert not teacher(torch.randn(3, 2)).requires_grad


def test_ema_update_exact_on_a_linear_layer():
    student = _linear(1.0, 0.0)
    teacher = EMATeacher(student, momentum=0.9)
    with torch.no_grad():
        student.weight.fill_(3.0)
        student.bias.fill_(-1.0)
    assert teacher.update(student, step=1) == 0.5  # warm-up momentum
    assert teacher.model.weight.item() == pytest.approx(0.5 * 1.0 + 0.5 * 3.0)  # 2.0
    assert teacher.model.bias.item() == pytest.approx(0.5 * 0.0 + 0.5 * -1.0)  # -0.5
    assert teacher.update(student, step=100) == 0.9  # capped at m
    assert teacher.model.weight.item() == pytest.approx(0.9 * 2.0 + 0.1 * 3.0)  # 2.1
    assert teacher.model.bias.item() == pytest.approx(0.9 * -0.5 + 0.1 * -1.0)  # -0.55
    teacher.update(student, step=0)  # m_0 = 0: an exact copy
    assert teacher.model.weight.item() == 3.0 and teacher.model.bias.item() == -1.0


def test_buffers_are_copied_not_averaged():
    student = nn.BatchNorm1d(2).train()
    teacher = EMATeacher(student, momentum=0.99)
    student(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
    teacher.update(student, step=50)
    assert torch.equal(teacher.model.running_mean, student.running_mean)
    assert torch.equal(teacher.model.running_var, student.running_var)
    assert teacher.model.num_batches_tracked.item() == 1


def test_ddp_style_wrapper_is_unwrapped_and_state_round_trips():
    class Wrapper(nn.Module):  # stands in for DistributedDataParallel's .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    student = _linear(2.0, 1.0)
    teacher = EMATeacher(Wrapper(student), momentum=0.5)
    assert isinstance(teacher.model, nn.Linear)
    with torch.no_grad():
        student.weight.fill_(4.0)
    teacher.update(Wrapper(student), step=10)
    assert teacher.model.weight.item() == 3.0
    other = EMATeacher(_linear(0.0, 0.0), momentum=0.1)
    other.load_state_dict(teacher.state_dict())
    assert other.model.weight.item() == 3.0 and other.momentum == 0.5


def test_projection_head_unit_norm_embeddings():
    head = ProjectionHead(16, out_dim=8).eval()
    out = head(torch.randn(2, 16, 5, 7))
    assert out.shape == (2, 8, 5, 7)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 5, 7), atol=1e-5)


def test_output_discriminator_downsamples_by_32_to_one_logit():
    disc = OutputDiscriminator(num_classes=5, ndf=4)
    assert disc(torch.randn(2, 5, 64, 96)).shape == (2, 1, 2, 3)
    slopes = [m.negative_slope for m in disc.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2] * 4


def test_two_heads_are_independent_and_resizable():
    heads = TwoHeadClassifier(8, 3)
    feats = torch.randn(2, 8, 4, 4)
    logits_a, logits_b = heads(feats)
    assert logits_a.shape == logits_b.shape == (2, 3, 4, 4)
    assert not torch.allclose(logits_a, logits_b)  # different random init
    big_a, big_b = heads(feats, size=(16, 16))
    assert big_a.shape == big_b.shape == (2, 3, 16, 16)
    logits_a.sum().backward()
    assert heads.head_a.weight.grad is not None and heads.head_b.weight.grad is None
