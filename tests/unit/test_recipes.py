"""Training recipes in a plain process: the terms they add, the teacher, the data splits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from segrl.config import MethodConfig, load_config
from segrl.data.build import build_dataset, build_training_sets, dataset_ids, split_labeled
from segrl.data.labels import DataError
from segrl.methods.recipes import MeanTeacherRecipe, SupervisedRecipe, build_recipe, strong_views
from segrl.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(n: int = 2, h: int = 32, w: int = 40, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, h, w, generator=g),
            "mask": torch.randint(0, 4, (n, h, w), generator=g)}


def test_strong_views_keep_shape_and_mark_cutout_pixels():
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 40)
    views, cut = strong_views(images)
    assert views.shape == images.shape and cut.shape == (6, 32, 40) and cut.dtype == torch.bool
    assert cut.any()  # with p=0.5 over six images, some cutout happened (fixed seed)
    # Cutout pixels are painted with the normalised mean colour (0).
    assert torch.all(views.permute(0, 2, 3, 1)[cut] == 0)


def test_supervised_recipe_is_plain_cross_entropy():
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 4)
    x = batch()
    out = SupervisedRecipe(model, MethodConfig()).losses(model, x, None, epoch=0)
    expected = torch.nn.functional.cross_entropy(model(x["image"]), x["mask"])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_mean_teacher_cold_start_then_all_terms():
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 4)
    cfg = MethodConfig(name="mean_teacher", cold_start_epochs=1, classmix=True, replay_buffer=4)
    recipe = build_recipe(cfg, model, torch.tensor([1000, 100, 10, 1]), 255, seed=0)
    assert isinstance(recipe, MeanTeacherRecipe)
    cold = recipe.losses(model, batch(), batch(seed=1), epoch=0)
    assert set(cold) == {"loss", "loss_x"}
    warm = recipe.losses(model, batch(), batch(seed=1), epoch=1)
    assert set(warm) == {"loss", "loss_x", "loss_mix"}  # S4AL: the mixed images are the unlabeled term
    assert torch.isfinite(warm["loss"]) and warm["loss"].requires_grad
    expected = warm["loss_x"] + cfg.lambda_mix * warm["loss_mix"]
    assert warm["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert len(recipe.buffer) == 2  # the unlabeled batch went into the replay buffer


def test_teacher_follows_the_student_and_is_what_is_evaluated():
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 4)
    recipe = MeanTeacherRecipe(model, MethodConfig(name="mean_teacher", ema_momentum=0.5))
    assert recipe.eval_model(model) is recipe.teacher.model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = next(recipe.teacher.model.parameters()).clone()
    recipe.after_step(model, step=5)  # m_5 = min(1 - 1/6, 0.5) = 0.5
    after = next(recipe.teacher.model.parameters())
    assert torch.allclose(after, before + 0.5)
    restored = MeanTeacherRecipe(build_model("lraspp_mobilenet_v3_large", 4), MethodConfig(name="mean_teacher"))
    restored.load_state_dict(recipe.state_dict())
    assert torch.equal(next(restored.teacher.model.parameters()), after)


def test_labeled_count_and_id_file_split_the_train_split(tmp_path):
    cfg = load_config(overrides=["data.synthetic_train_images=10", "data.labeled_count=3"])
    train = build_dataset(cfg.data, "train", train=True)
    labeled, unlabeled, ids = split_labeled(cfg.data, train, seed=0)
    assert len(labeled) == 3 and len(unlabeled) == 7 and len(ids) == 3
    assert split_labeled(cfg.data, train, seed=0)[2] == ids  # fixed by the seed
    (tmp_path / "ids.txt").write_text(f"{ids[0]}\n{ids[2]}\n")
    cfg2 = load_config(overrides=["data.synthetic_train_images=10", f"data.labeled_ids={tmp_path / 'ids.txt'}"])
    labeled2, unlabeled2, ids2 = split_labeled(cfg2.data, train, seed=5)
    assert sorted(ids2) == sorted([ids[0], ids[2]]) and len(unlabeled2) == 8
    (tmp_path / "bad.txt").write_text("nope\n")
    cfg3 = load_config(overrides=["data.synthetic_train_images=10", f"data.labeled_ids={tmp_path / 'bad.txt'}"])
    with pytest.raises(DataError, match="'nope'"):
        split_labeled(cfg3.data, train, seed=0)


def test_excluded_ids_leave_the_train_split_for_every_consumer_and_bad_lists_are_refused(tmp_path):
    every = ["data.synthetic_train_images=10", "data.synthetic_val_images=3"]
    ids = dataset_ids(build_dataset(load_config(overrides=every).data, "train", train=True))
    (tmp_path / "near_val.txt").write_text(f"{ids[1]}\n\n{ids[7]}\n{ids[1]}\n")
    cfg = load_config(overrides=[*every, f"data.exclude_ids={tmp_path / 'near_val.txt'}"]).data
    train = build_dataset(cfg, "train", train=True)
    assert dataset_ids(train) == [i for i in ids if i not in (ids[1], ids[7])]
    assert [s["id"] for s in train] == dataset_ids(train)  # the frames themselves, not only their names
    assert len(build_dataset(cfg, "val", train=False)) == 3  # evaluation is untouched
    drawn = build_training_sets(replace(cfg, labeled_count=4), seed=0)
    assert len(drawn.labeled) == 4 and len(drawn.unlabeled) == 4
    assert not {ids[1], ids[7]} & set(dataset_ids(drawn.labeled) + dataset_ids(drawn.unlabeled))
    (tmp_path / "typo.txt").write_text(f"{ids[0]}\nframe_9999\n")
    with pytest.raises(DataError, match=r"typo.txt lists id 'frame_9999' that is not in the split \(1 unknown"):
        build_dataset(replace(cfg, exclude_ids=str(tmp_path / "typo.txt")), "train", train=True)
    (tmp_path / "all.txt").write_text("\n".join(ids))
    with pytest.raises(DataError, match="lists every one of the split's 10 ids"):
        build_dataset(replace(cfg, exclude_ids=str(tmp_path / "all.txt")), "train", train=True)


def test_synthetic_unlabeled_frames_come_from_the_other_domain():
    cfg = load_config(overrides=["data.synthetic_train_images=4", "data.synthetic_unlabeled_images=6"])
    train = build_dataset(cfg.data, "train", train=True)
    labeled, unlabeled, _ = split_labeled(cfg.data, train, seed=0)
    assert len(labeled) == 4 and len(unlabeled) == 6 and unlabeled.domain == "target"


def test_unknown_method_is_rejected_by_name():
    from segrl.config import ConfigError

    with pytest.raises(ConfigError, match="method.name"):
        load_config(overrides=["method.name=fixmatch"])


def test_labor_probe_forward_leaves_the_model_and_the_random_stream_as_they_were():
    """A supervised step with LabOR's selector (which reads unlabeled features) must change
    the model exactly as the same step without it: same BatchNorm running statistics and
    the same random stream afterwards (the old train-mode probe moved the statistics)."""
    import copy

    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 4)
    probed = copy.deepcopy(model)
    x, u = batch(), batch(seed=1)
    torch.manual_seed(1)
    SupervisedRecipe(model, MethodConfig()).losses(model, x, None, epoch=0)
    plain_rng = torch.get_rng_state()
    recipe = build_recipe(MethodConfig(labor_selector=True), probed, None, 255, seed=0)
    torch.manual_seed(1)
    out = recipe.losses(probed, x, u, epoch=0)
    assert "labor_discrepancy" in out and probed.training
    assert torch.equal(torch.get_rng_state(), plain_rng)
    for (name, expected), (_, got) in zip(model.named_buffers(), probed.named_buffers(), strict=True):
        assert torch.equal(expected, got), name


def padded_batch(seed: int) -> dict:
    """Unlabeled images whose left 16 columns are crop padding (valid False)."""
    u = batch(seed=seed)
    u["mask"].fill_(255)
    u["valid"] = torch.ones(2, 32, 40, dtype=torch.bool)
    u["valid"][..., :16] = False
    return u


def test_mean_teacher_learns_no_pseudo_label_on_padding_and_forwards_one_view_per_image():
    """Balanced ClassMix with a replay buffer: crop padding never gets a pseudo label (also
    after mixing), the student forwards B labeled + B mixed images, the buffer keeps the weak
    views (not strong ones the teacher would re-label), and the teacher's BatchNorm statistics
    come from its own forward of weak views, not from the student's strong/mixed batch."""
    import copy

    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 4)
    cfg = MethodConfig(name="mean_teacher", cold_start_epochs=0, classmix=True, replay_buffer=4)
    recipe = build_recipe(cfg, model, torch.tensor([1000, 100, 10, 1]), 255, seed=0)
    sizes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(args[0].shape[0]), with_kwargs=True)
    first, second = padded_batch(1), padded_batch(2)
    expected_teacher = copy.deepcopy(recipe.teacher.model)
    for module in expected_teacher.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.train()
    with torch.no_grad():
        expected_teacher(first["image"])  # one BatchNorm update on the weak views
    _, outputs = recipe.compute(model, batch(), first, epoch=0)
    recipe.after_step(model, step=0)
    teacher_buffers = dict(recipe.teacher.model.named_buffers())
    for name, value in expected_teacher.named_buffers():
        assert torch.allclose(teacher_buffers[name], value, atol=1e-6), name
    assert (outputs.pseudo_u[~first["valid"]] == 255).all()
    stored, _ = recipe.buffer.sample(2)
    assert sorted(stored.sum((1, 2, 3)).tolist()) == pytest.approx(sorted(first["image"].sum((1, 2, 3)).tolist()))
    _, outputs = recipe.compute(model, batch(), second, epoch=0)  # sources from the buffer now
    assert (outputs.pseudo_u[~second["valid"]] == 255).all()
    assert sizes == [4, 4]  # 2 labeled + 2 mixed, no extra un-mixed or second mixed batch


def test_mean_teacher_learns_no_pseudo_label_in_the_cutout_boxes_of_its_batched_strong_views(monkeypatch):
    """The strong views are made for the whole (mixed) batch at once; every pixel a cutout
    box blanked, and every crop-padding pixel, is ignore in the pseudo labels learned."""
    import segrl.methods.recipes as recipes
    from segrl.data.batch_augment import BatchStrongView

    boxes = []
    always_cut = BatchStrongView(cutout_p=1.0)

    def recording(images):
        views, cut = always_cut(images)
        boxes.append(cut)
        return views, cut

    monkeypatch.setattr(recipes, "STRONG_VIEW", recording)
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 4)
    cfg = MethodConfig(name="mean_teacher", cold_start_epochs=0, classmix=True)
    recipe = build_recipe(cfg, model, torch.tensor([1000, 100, 10, 1]), 255, seed=0)
    unlabeled = padded_batch(1)
    _, outputs = recipe.compute(model, batch(), unlabeled, epoch=0)
    (cut,) = boxes
    assert cut.shape == (2, 32, 40) and cut.any(1).any(1).all()  # a box in each image
    assert (outputs.pseudo_u[cut] == 255).all()
    assert (outputs.pseudo_u[~cut & unlabeled["valid"]] != 255).all()  # the rest is learned
