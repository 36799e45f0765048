"""Model builders: shapes, features, weights files and their errors."""

from __future__ import annotations

import pytest
import torch

from segrl.models import ARCHITECTURES, WeightsError, build_model

SMALL = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"]


@pytest.mark.parametrize("arch", SMALL)
def test_logits_at_input_size_and_features_before_classifier(arch):
    net = build_model(arch, 5).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        logits = net(x)
        logits2, features = net(x, return_features=True)
    assert logits.shape == (2, 5, 64, 80)
    assert torch.allclose(logits, logits2)
    assert features.shape[:2] == (2, net.feature_channels)
    assert features.shape[-1] < 80  # decoder resolution, not upsampled


def test_resnet_archs_are_registered_and_build():
    assert {"deeplabv3_resnet50", "deeplabv3_resnet101"} <= set(ARCHITECTURES)
    net = build_model("deeplabv3_resnet50", 3).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 33, 41)).shape == (1, 3, 33, 41)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match="lraspp_mobilenet_v3_large"):
        build_model("unet", 3)


def test_weights_round_trip_from_state_dict_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = build_model("lraspp_mobilenet_v3_large", 4).eval()
    plain, ckpt = tmp_path / "w.pt", tmp_path / "ckpt.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"model": source.state_dict(), "step": 3}, ckpt)
    x = torch.randn(1, 3, 48, 64)
    for path in (plain, ckpt):
        torch.manual_seed(1)
        loaded = build_model("lraspp_mobilenet_v3_large", 4, weights=str(path)).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), source(x))


def test_torchvision_state_dict_keys_load_directly(tmp_path):
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    tv = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    net = build_model("deeplabv3_mobilenet_v3_large", 3, weights=str(tmp_path / "tv.pt"))
    assert torch.equal(net.backbone["0"][0].weight, tv.backbone["0"][0].weight)


def test_other_class_count_keeps_backbone_and_reinitialises_classifier(tmp_path):
    source = build_model("lraspp_mobilenet_v3_large", 21)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    net = build_model("lraspp_mobilenet_v3_large", 4, weights=str(tmp_path / "w.pt"))
    assert torch.equal(net.classifier.cbr[0].weight, source.classifier.cbr[0].weight)
    assert net.classifier.low_classifier.weight.shape[0] == 4


def test_weights_of_another_architecture_are_rejected_by_name(tmp_path):
    torch.save(build_model("deeplabv3_mobilenet_v3_large", 4).state_dict(), tmp_path / "dl.pt")
    with pytest.raises(WeightsError, match=r"dl\.pt.*lraspp_mobilenet_v3_large"):
        build_model("lraspp_mobilenet_v3_large", 4, weights=str(tmp_path / "dl.pt"))


def test_missing_and_non_torch_weights_files_are_named(tmp_path):
    with pytest.raises(WeightsError, match="nope.pt"):
        build_model("lraspp_mobilenet_v3_large", 4, weights=str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        build_model("lraspp_mobilenet_v3_large", 4, weights=str(tmp_path / "junk.pt"))


def test_weights_from_s3(s3_env, tmp_path):
    from segrl.storage import open_store

    source = build_model("lraspp_mobilenet_v3_large", 4).eval()
    store = open_store(s3_env.root("weights"))
    with store.open_output("w.pt") as out:
        torch.save(source.state_dict(), out)
    net = build_model("lraspp_mobilenet_v3_large", 4, weights=store.uri("w.pt")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), source(x))


def test_batchnorm_tracks_statistics_quickly_for_short_runs_from_scratch():
    net = build_model("lraspp_mobilenet_v3_large", 3)
    momenta = {m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}
