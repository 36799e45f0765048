"""Segmentation networks: torchvision models that also hand back their decoder features.

``build_model(arch, num_classes, weights=None)`` returns a :class:`SegmentationNet`
whose ``forward(x)`` gives logits ``B x C x H x W`` at the input resolution and
``forward(x, return_features=True)`` gives ``(logits, features)`` with features
``B x D x h x w`` from the last layer before the classifier (what contrastive and
prototype losses work on; ``D = net.feature_channels``).

Parameter names are torchvision's own (``backbone.*``, ``classifier.*``), so a
state dict saved from a torchvision model of the same architecture loads as is.
"""

from segrl.models.builders import (
    ARCHITECTURES,
    SegmentationNet,
    WeightsError,
    build_model,
    load_weights,
)

__all__ = ["ARCHITECTURES", "SegmentationNet", "WeightsError", "build_model", "load_weights"]
