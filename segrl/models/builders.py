"""Builders over torchvision segmentation models, from scratch or from a weights file."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation as tvseg

BATCHNORM_MOMENTUM = 0.1


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or made for another architecture."""


class SegmentationNet(nn.Module):
    """A torchvision segmentation model split into backbone, decoder and classifier.

    Two families are supported:

    * LR-ASPP (``classifier`` is ``LRASPPHead``): features are the 128-channel
      attention-gated high-level branch upsampled to the low-level (1/8) grid;
      logits = low-level classifier + high-level classifier of those features.
    * DeepLabV3 (``classifier`` is ``DeepLabHead``): features are the 256-channel
      output of ASPP and the 3x3 conv; logits = the final 1x1 conv of them.
    """

    def __init__(self, arch: str, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.backbone = model.backbone
        self.classifier = model.classifier
        self.is_lraspp = isinstance(model.classifier, tvseg.lraspp.LRASPPHead)
        self.feature_channels = 128 if self.is_lraspp else 256

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) at the decoder's own resolution (1/8 or 1/16 of the input)."""
        parts = self.backbone(x)
        head = self.classifier
        if self.is_lraspp:
            low, high = parts["low"], parts["high"]
            gated = head.cbr(high) * head.scale(high)
            features = F.interpolate(gated, size=low.shape[-2:], mode="bilinear", align_corners=False)
            logits = head.low_classifier(low) + head.high_classifier(features)
            return logits, features
        features = parts["out"]
        for layer in list(head)[:-1]:
            features = layer(features)
        return head[-1](features), features

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.decode(x)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (logits, features) if return_features else logits

    def classifier_layers(self) -> list[str]:
        """Parameter-name prefixes of the layers whose shape depends on the class count."""
        if self.is_lraspp:
            return ["classifier.low_classifier.", "classifier.high_classifier."]
        return [f"classifier.{len(self.classifier) - 1}."]


def _lraspp_mnv3(num_classes: int) -> nn.Module:
    return tvseg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)


def _deeplab(factory: Callable[..., nn.Module]) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return factory(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)

    return build


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "lraspp_mobilenet_v3_large": _lraspp_mnv3,
    "deeplabv3_mobilenet_v3_large": _deeplab(tvseg.deeplabv3_mobilenet_v3_large),
    "deeplabv3_resnet50": _deeplab(tvseg.deeplabv3_resnet50),
    "deeplabv3_resnet101": _deeplab(tvseg.deeplabv3_resnet101),
}


def build_model(
    arch: str,
    num_classes: int,
    weights: str | None = None,
    endpoint_url: str | None = None,
) -> SegmentationNet:
    """A :class:`SegmentationNet` of ``arch`` with ``num_classes`` outputs.

    From scratch (randomly initialised) unless ``weights`` names a state dict file,
    a local path or ``s3://`` URI, which is loaded with ``weights_only=True``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model arch {arch!r}; valid names: {', '.join(ARCHITECTURES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    net = SegmentationNet(arch, ARCHITECTURES[arch](num_classes), num_classes)
    # torchvision's MobileNetV3 uses BatchNorm momentum 0.01, tuned for long ImageNet runs:
    # after a few hundred steps from scratch its running statistics still remember the
    # random init, and the eval-mode model predicts one class. 0.1 tracks within ~50 steps.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = BATCHNORM_MOMENTUM
    if weights:
        load_weights(net, weights, endpoint_url)
    return net


def _read_state_dict(uri: str, endpoint_url: str | None) -> Mapping[str, torch.Tensor]:
    from segrl.data.labels import DataError
    from segrl.data.manifest import read_bytes

    try:
        data = read_bytes(uri, endpoint_url)
    except DataError as exc:
        raise WeightsError(f"weights file {uri} cannot be read: {exc}") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals
        raise WeightsError(f"weights file {uri} is not a PyTorch state dict: {exc}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a segrl training checkpoint
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {uri} does not hold a state dict of tensors")
    return state


def load_weights(net: SegmentationNet, uri: str, endpoint_url: str | None = None) -> list[str]:
    """Load the state dict at ``uri`` into ``net``; returns the names left at their init.

    Accepted: a state dict of the same architecture (torchvision's or segrl's), or a
    segrl checkpoint (its ``model`` entry). Only the class-count-dependent classifier
    layers may differ in shape (fine-tuning to a new label set: they stay random) and
    torchvision's auxiliary classifier is dropped. Anything else (another backbone,
    missing layers) raises :class:`WeightsError` naming the file and the first problem.
    """
    state = {k.removeprefix("module."): v for k, v in _read_state_dict(uri, endpoint_url).items()}
    state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    own = net.state_dict()
    head = tuple(net.classifier_layers())
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(head))
    where = f"weights file {uri} does not fit model.arch '{net.arch}'"
    if unexpected:
        raise WeightsError(f"{where}: unexpected parameter '{unexpected[0]}' ({len(unexpected)} in all)")
    if missing:
        raise WeightsError(f"{where}: missing parameter '{missing[0]}' ({len(missing)} in all)")
    skipped = []
    for name, tensor in list(state.items()):
        if tensor.shape != own[name].shape:
            if not name.startswith(head):
                raise WeightsError(
                    f"{where}: parameter '{name}' has shape {tuple(tensor.shape)}, "
                    f"the model needs {tuple(own[name].shape)}"
                )
            skipped.append(name)
            del state[name]
    net.load_state_dict(state, strict=False)
    return sorted(set(own) - set(state))
