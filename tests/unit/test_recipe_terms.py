"""Known answers for the recipe parts added on top of the loss terms: tail-class anchor
sampling, the contrastive and adversarial terms, ProDA and distillation recipes, batch
ratios, snapshots, ST++ splits and the domain split of CamVid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segrl.config import ConfigError, MethodConfig, TrainConfig, load_config
from segrl.data.build import build_training_sets
from segrl.engine.selftrain import rank_by_stability, split_reliable
from segrl.engine.train import (
    _class_counts,
    batch_sizes,
    check_cold_start_ends,
    concat_batches,
    plan_steps,
    snapshot_schedule,
)
from segrl.losses import inverse_sqrt_frequency_weights, tail_anchor_counts
from segrl.methods.recipes import build_recipe
from segrl.methods.terms import AdversarialTerm, ContrastiveTerm, StepOutputs
from segrl.models import build_model
from segrl.training import build_optimizer, continue_from, read_training_state, save_training_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CAMVID = Path(__file__).resolve().parents[3] / "shared" / "data" / "camvid"


def batch(n: int = 2, h: int = 32, w: int = 40, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, h, w, generator=g), "mask": torch.randint(0, 4, (n, h, w), generator=g)}


def test_tail_anchor_counts_share_anchors_by_probability_among_present_classes():
    probs = torch.tensor([0.1, 0.3, 0.6, 0.0])
    present = torch.tensor([True, True, True, False])
    # 10 anchors per class x 3 present = 30, shared 0.1 : 0.3 : 0.6
    assert tail_anchor_counts(probs, present, 10).tolist() == [3, 9, 18, 0]
    # a present class of ~0 probability still gets one anchor
    assert tail_anchor_counts(torch.tensor([1.0, 0.0]), torch.tensor([True, True]), 4).tolist() == [8, 1]
    assert tail_anchor_counts(probs, torch.zeros(4, dtype=torch.bool), 10).tolist() == [0, 0, 0, 0]


def test_contrastive_term_fills_its_bank_and_favours_low_confidence_classes():
    torch.manual_seed(0)
    cfg = MethodConfig(lambda_contrastive=1.0, contrastive_anchors=4, contrastive_negatives=8,
                       contrastive_threshold=0.0, projection_dim=8)
    term = ContrastiveTerm(cfg, feature_channels=16, num_classes=3, seed=0)
    feats = torch.randn(2, 16, 4, 5)
    mask = torch.zeros(2, 32, 40, dtype=torch.long)
    mask[:, :, 20:] = 1
    mask[:, 16:, :] = 2
    # class 2 is predicted with low confidence, classes 0/1 with high confidence
    logits = torch.zeros(2, 3, 32, 40)
    logits[:, 0][mask == 0] = 6.0
    logits[:, 1][mask == 1] = 6.0
    logits[:, 2][mask == 2] = 0.5
    out = StepOutputs(logits, feats, mask)
    first = term(out)  # bank empty: no negatives yet, zero loss, bank filled afterwards
    assert first.item() == 0.0 and (term.memory.counts() > 0).all()
    second = term(out)
    assert second.item() > 0 and second.requires_grad
    probs = term.confidence.sampling_probabilities()
    assert probs[2] > probs[0] and probs[2] > probs[1]


def test_confidence_bank_scores_classes_on_labeled_ground_truth_not_on_pseudo_labels():
    """STAL: a class's confidence is the model's probability of the true class on labeled
    pixels. The model is sure of class 0 everywhere; the right half is truly class 1, so
    class 1 is a low-confidence (tail) class, whatever the teacher says on unlabeled images."""
    cfg = MethodConfig(lambda_contrastive=1.0, contrastive_threshold=0.0, projection_dim=8)
    term = ContrastiveTerm(cfg, feature_channels=16, num_classes=3, seed=0)
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[..., 4:] = 1
    logits = torch.zeros(1, 3, 8, 8)
    logits[:, 0] = 4.0
    teacher = torch.zeros(1, 3, 8, 8)
    teacher[:, 1] = 0.99  # the teacher is sure of class 1 on the unlabeled image
    teacher[:, 0] = teacher[:, 2] = 0.005
    term(StepOutputs(logits, torch.randn(1, 16, 2, 2), mask, logits, torch.randn(1, 16, 2, 2),
                     teacher.argmax(1), teacher.max(1).values, teacher))
    p = torch.tensor([4.0, 0.0, 0.0]).softmax(0)
    assert term.confidence.confidence.tolist() == pytest.approx([p[0].item(), p[1].item(), 0.0], abs=1e-6)


def test_class_weighting_weighs_the_labeled_cross_entropy_of_every_recipe():
    """train.class_weighting=inverse_sqrt_frequency reaches the loss: the recipe's labeled CE
    is torch's class-weighted CE, with weights from the labeled pixels of each class."""
    class Labeled(torch.utils.data.Dataset):
        classes, ignore_index = ("a", "b", "c", "d"), 255

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"mask": torch.tensor([[0, 0, 0, 1], [2, 3, 255, 0]])}

    cfg = load_config(overrides=["train.class_weighting=inverse_sqrt_frequency"])
    counts = _class_counts(cfg, Labeled())
    assert counts.tolist() == [4, 1, 1, 1]
    assert _class_counts(load_config(), Labeled()) is None  # neither ClassMix nor weighting: no pass
    weights = inverse_sqrt_frequency_weights(counts)
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 4)
    x = batch()
    for name in ("supervised", "pseudo_label"):
        recipe = build_recipe(MethodConfig(name=name), model, None, 255, seed=0, class_weight=weights)
        loss = recipe.losses(model, x, None, epoch=0)["loss"]
        expected = torch.nn.functional.cross_entropy(model(x["image"]), x["mask"], weight=weights)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_adversarial_discriminator_step_makes_target_outputs_more_source_like_for_the_generator():
    torch.manual_seed(0)
    cfg = MethodConfig(lambda_adv=1.0, discriminator_lr=1e-2)
    term = AdversarialTerm(cfg, num_classes=3, ndf=8)
    source_logits = torch.zeros(2, 3, 64, 64)
    source_logits[:, 0] = 5.0  # source: confident class 0
    target_logits = torch.zeros(2, 3, 64, 64, requires_grad=True)  # target: uncertain
    for _ in range(30):  # the discriminator learns to tell them apart
        term(StepOutputs(source_logits, torch.zeros(1), torch.zeros(1), target_logits))
        term.discriminator_step()
    with torch.no_grad():
        before = term.discriminator(target_logits.softmax(1)).sigmoid().mean().item()
    optimizer = torch.optim.SGD([target_logits], lr=50.0)
    for _ in range(5):  # the generator side: target outputs move to fool it
        loss = term(StepOutputs(source_logits, torch.zeros(1), torch.zeros(1), target_logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = term.discriminator(target_logits.softmax(1)).sigmoid().mean().item()
        source_share = target_logits.softmax(1)[:, 0].mean().item()
    assert after > before  # judged more source-like
    assert source_share > 1 / 3  # by becoming more like the source's outputs


def test_proda_recipe_rectifies_with_prototypes_and_keeps_its_state(tmp_path):
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 4)
    recipe = build_recipe(MethodConfig(name="proda", lambda_contrastive=0.1, contrastive_threshold=0.0),
                          model, None, 255, seed=0)
    out = recipe.losses(model, batch(), batch(seed=1), epoch=0)
    assert {"loss_x", "loss_u", "loss_structure", "loss_contrastive"} <= set(out)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert recipe.prototypes.initialized.any()
    expected = out["loss_x"] + out["loss_u"] + 0.1 * out["loss_structure"] + out["loss_contrastive"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    state = recipe.state_dict()
    fresh = build_recipe(MethodConfig(name="proda", lambda_contrastive=0.1), model, None, 255, seed=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.prototypes.prototypes, recipe.prototypes.prototypes)


def test_distill_recipe_learns_a_frozen_teacher_from_its_weights_file(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("lraspp_mobilenet_v3_large", 4)
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    student = build_model("lraspp_mobilenet_v3_large", 4)
    recipe = build_recipe(MethodConfig(name="distill", teacher_weights=str(path)), student, None, 255, seed=0)
    out = recipe.losses(student, batch(), batch(seed=1), epoch=0)
    assert out["loss_u"].item() > 0 and out["loss"].requires_grad
    assert not any(p.requires_grad for p in recipe.teacher.model.parameters())
    # the same network as its own teacher: zero KL on uncut pixels up to the strong view
    same = build_recipe(MethodConfig(name="distill", teacher_weights=str(path)), teacher, None, 255, seed=0)
    assert same.losses(teacher, batch(), batch(seed=1), epoch=0)["loss_u"].item() < out["loss_u"].item()


def test_supervised_recipe_with_an_adversarial_term_is_adaptsegnet_and_trains_on_target_maps():
    # Source-only plus lambda_adv once added a zero: the target batch went through a no-grad probe
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 4)
    recipe = build_recipe(MethodConfig(lambda_adv=1.0), model, None, 255, seed=0)
    assert recipe.needs_unlabeled
    x, u = batch(), batch(seed=1)
    assert recipe.losses(model, x, u, epoch=0)["loss_adv"].item() > 0
    _, outputs = recipe.compute(model, x, u, epoch=0)
    model.zero_grad()
    recipe.terms[0](outputs).backward()  # the alignment term alone moves the segmentation network
    assert sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None) > 0
    # and the labeled loss is the plain cross-entropy on the labeled half of the forward
    plain = build_recipe(MethodConfig(), model, None, 255, seed=0)
    torch.manual_seed(1)
    joint = recipe.losses(model, x, u, epoch=0)["loss_x"]
    assert joint.item() == pytest.approx(plain.losses(model, x, None, epoch=0)["loss_x"].item(), rel=0.2)


def test_supervised_recipe_with_labor_selector_snapshots_its_heads():
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 4)
    recipe = build_recipe(MethodConfig(labor_selector=True), model, None, 255, seed=0)
    assert recipe.needs_unlabeled
    out = recipe.losses(model, batch(), batch(seed=1), epoch=0)
    assert out["labor_discrepancy"].item() >= 0
    assert set(recipe.snapshot_extras()) == {"labor_heads"}


def test_batch_sizes_follow_the_configured_ratio():
    assert batch_sizes(8, (1.0, 0.0, 1.0)) == (8, 0, 8)
    assert batch_sizes(8, (3.0, 1.0, 2.0)) == (6, 2, 4)
    assert batch_sizes(4, (1.0, 1.0, 0.0)) == (2, 2, 0)
    with pytest.raises(ValueError, match="batch_ratio"):
        batch_sizes(2, (0.1, 10.0, 1.0))


def test_a_steps_run_trains_exactly_its_steps_and_an_epochs_run_whole_epochs():
    # 90 steps over 36-step epochs: three epochs, the last cut at step 90 (not 108)
    assert plan_steps(90, 4, 36) == (3, 90)
    assert plan_steps(72, 4, 36) == (2, 72)
    assert plan_steps(5, 4, 36) == (1, 5)
    assert plan_steps(0, 4, 36) == (4, 144)


def test_a_mean_teacher_whose_cold_start_outlasts_the_run_is_refused():
    """Before: ssl_camvid's mean-teacher rows asked a 5-epoch cold start of 5-epoch runs and
    trained supervised only, reported as a mean teacher."""
    teacher = MethodConfig(name="mean_teacher", cold_start_epochs=5)
    with pytest.raises(ConfigError, match=r"'method.cold_start_epochs' = 5 covers every one of the run's 5 epochs"):
        check_cold_start_ends(teacher, 5, 1.0)
    check_cold_start_ends(teacher, 6, 1.0)  # the last epoch learns from the pool
    check_cold_start_ends(teacher, 5, 0.5)  # later rounds continue its clock and schedule
    check_cold_start_ends(MethodConfig(name="supervised", cold_start_epochs=5), 5, 1.0)  # no cold start to end


def test_snapshots_are_evenly_spaced_and_end_at_the_last_step():
    assert snapshot_schedule(90, 3) == {30, 60, 90}
    assert snapshot_schedule(10, 1) == {10}
    assert snapshot_schedule(10, 0) == set()


def test_concat_batches_joins_tensors_and_id_lists():
    a = {"image": torch.zeros(2, 3, 4, 4), "id": ["a", "b"]}
    b = {"image": torch.ones(1, 3, 4, 4), "id": ["c"]}
    joined = concat_batches(a, b)
    assert joined["image"].shape[0] == 3 and joined["id"] == ["a", "b", "c"]


def test_st_plus_plus_ranks_by_stability_and_splits_by_ratio():
    ranked = rank_by_stability(["d", "a", "c", "b"], [0.2, 0.9, 0.9, 0.5])
    assert ranked == ["a", "c", "b", "d"]  # ties by id
    assert split_reliable(ranked, 0.5) == (["a", "c"], ["b", "d"])
    assert split_reliable(ranked, 0.01) == (["a"], ["c", "b", "d"])


@pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid")
def test_camvid_day_to_dusk_split_holds_out_the_same_dusk_frames_for_every_seed():
    cfg = load_config(overrides=["data.dataset=camvid", f"data.root={CAMVID}", "data.target_prefixes=[0001TP]",
                                 "data.target_eval_count=20", "data.target_labeled_count=2"])
    a = build_training_sets(cfg.data, seed=0)
    b = build_training_sets(cfg.data, seed=1)
    assert a.target_eval_ids == b.target_eval_ids and len(a.target_eval_ids) == 20
    assert all(i.startswith("0001TP") for i in a.target_eval_ids)
    assert len(a.labeled) == 305 and len(a.target_labeled) == 2 and len(a.unlabeled) == 40
    day = set(a.labeled_ids) - {a.target_labeled.base.ids[i] for i in a.target_labeled.indices}
    assert not any(i.startswith("0001TP") for i in day)
    unlabeled = {a.unlabeled.base.ids[i] for i in a.unlabeled.indices}
    assert not unlabeled & set(a.target_eval_ids)


def test_a_continued_round_keeps_the_projection_head_banks_and_labor_heads(tmp_path):
    """al.retrain=continue: the next round starts with the terms' trained state (projection
    head, memory and confidence banks, LabOR's heads and their optimiser), not fresh ones."""
    cfg = MethodConfig(lambda_contrastive=1.0, contrastive_threshold=0.0, projection_dim=8, labor_selector=True)
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 4)
    recipe = build_recipe(cfg, model, None, 255, seed=0)
    recipe.losses(model, batch(), batch(seed=1), epoch=0)
    optimizer = build_optimizer(torch.nn.ModuleList([model, *recipe.trainable_modules()]), TrainConfig())
    save_training_state(tmp_path, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                        step=1, epoch=1, config={}, recipe_state=recipe.state_dict())
    fresh_model = build_model("lraspp_mobilenet_v3_large", 4)
    fresh = build_recipe(cfg, fresh_model, None, 255, seed=1)
    fresh_optimizer = build_optimizer(torch.nn.ModuleList([fresh_model, *fresh.trainable_modules()]), TrainConfig())
    continue_from(read_training_state(str(tmp_path / "checkpoint.pt")), fresh_model, fresh_optimizer, fresh)
    labor, contrastive = recipe.terms
    labor_next, contrastive_next = fresh.terms
    assert torch.equal(contrastive_next.memory.counts(), contrastive.memory.counts())
    assert torch.equal(contrastive_next.confidence.confidence, contrastive.confidence.confidence)
    for a, b in zip(contrastive.module.parameters(), contrastive_next.module.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(labor.selector.heads.parameters(), labor_next.selector.heads.parameters(), strict=True):
        assert torch.equal(a, b)
