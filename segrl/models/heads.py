"""Extra heads that self-training recipes put on top of a segmentation network.

* :class:`ProjectionHead`: pixel embeddings for contrastive learning (STAL, ReCo).
* :class:`OutputDiscriminator`: output-space discriminator (AdaptSegNet).
* :class:`TwoHeadClassifier`: two classifiers over shared features (LabOR / MCD).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """1x1 conv - BN - ReLU - 1x1 conv, L2-normalised over channels (ReCo, Liu et al.
    ICLR 2022; STAL's contrastive branch).

    ``B x in_channels x h x w`` -> ``B x out_dim x h x w`` with unit-norm pixel vectors,
    so dot products in the contrastive loss are cosine similarities.
    """

    def __init__(self, in_channels: int, out_dim: int = 128, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),  # BN follows: a bias is redundant
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_dim, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=1)


class OutputDiscriminator(nn.Module):
    """AdaptSegNet's fully convolutional discriminator (Tsai et al., CVPR 2018).

    Input softmax maps ``B x num_classes x H x W``; five 4x4 convs of stride 2
    (``ndf, 2ndf, 4ndf, 8ndf, 1`` channels) with LeakyReLU(0.2) between them; output a
    logit map ``B x 1 x H/32 x W/32`` (source = 1, target = 0).
    """

    def __init__(self, num_classes: int, ndf: int = 64) -> None:
        super().__init__()
        widths = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.Conv2d(cin, cout, 4, stride=2, padding=1),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.net(probs)


class TwoHeadClassifier(nn.Module):
    """Two independent 1x1-conv classifiers over shared features (LabOR, Shin et al.
    ICCV 2021, after MCD).

    ``B x in_channels x h x w`` -> ``(logits_a, logits_b)``, each ``B x C x h x w``, or
    bilinearly resized to ``size`` when given. The heads start from different random
    weights; their disagreement is what LabOR labels.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.head_a = nn.Conv2d(in_channels, num_classes, 1)
        self.head_b = nn.Conv2d(in_channels, num_classes, 1)

    def forward(
        self, features: torch.Tensor, size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits_a, logits_b = self.head_a(features), self.head_b(features)
        if size is not None:
            logits_a = F.interpolate(logits_a, size=size, mode="bilinear", align_corners=False)
            logits_b = F.interpolate(logits_b, size=size, mode="bilinear", align_corners=False)
        return logits_a, logits_b
