"""Training losses: ~0 for perfect logits, large for wrong ones, stable, Falk weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from core.losses import LOSSES, bce_loss, dice_loss, falk_weight_map, make_loss


def _target(seed=0, shape=(2, 2, 6, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) > 0.6).float()


@pytest.mark.parametrize("name", LOSSES)
def test_perfect_logits_give_almost_zero_and_wrong_ones_a_large_loss(name):
    target = _target()
    perfect = (target * 2 - 1) * 30.0
    loss = make_loss(name)
    weight = torch.rand(target.shape[0], 1, *target.shape[2:]) + 0.5
    w = weight if loss.needs_weight_map else None
    good = float(loss(perfect, target, w))
    bad = float(loss(-perfect, target, w))
    unsure = float(loss(torch.zeros_like(target), target, w))
    assert good < 1e-3
    assert bad > 0.9
    assert good < unsure < bad


def test_dice_is_per_channel_so_a_missed_rare_channel_still_costs():
    target = torch.zeros(1, 2, 4, 8, 8)
    target[:, 0] = 1.0                 # channel 0: everywhere
    target[:, 1, 1:4, 2:6, 2:6] = 1.0  # channel 1: 48 of 256 voxels
    logits = (target * 2 - 1) * 30.0
    logits[:, 1] = -30.0               # the rare channel is missed entirely
    # one channel perfect, one totally wrong: the mean Dice loss is about 1/2
    assert float(dice_loss(logits, target)) == pytest.approx(0.5, abs=0.05)


def test_losses_are_finite_and_float32_for_half_precision_logits():
    target = _target(1)
    logits = ((target * 2 - 1) * 200.0).to(torch.bfloat16).requires_grad_()
    for name in LOSSES:
        loss = make_loss(name)(logits, target, torch.ones_like(target[:, :1]))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        logits.grad = None


def test_weighted_bce_weights_count():
    target = torch.zeros(1, 1, 2, 2, 2)
    logits = torch.full_like(target, 3.0)  # all wrong, equally
    w = torch.ones_like(target)
    assert float(bce_loss(logits, target, w)) == pytest.approx(float(bce_loss(logits, target)))
    # a wrong voxel weighted 10x more than a right one pulls the mean towards its loss
    logits2 = logits.clone()
    logits2[..., 0, 0, 0] = -3.0
    w2 = torch.ones_like(target)
    w2[..., 0, 0, 1] = 10.0
    assert float(bce_loss(logits2, target, w2)) > float(bce_loss(logits2, target))


def test_weighted_bce_dice_is_bce_dice_with_the_weights_on_its_bce():
    target = _target(2)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(target.shape, generator=g)
    ones = torch.ones_like(target[:, :1])
    weighted = make_loss("weighted_bce_dice")
    assert weighted.needs_weight_map
    assert float(weighted(logits, target, ones)) == pytest.approx(
        float(make_loss("bce_dice")(logits, target)), rel=1e-6)
    # the voxels a weight map stresses move the loss; without a map it refuses
    wrong = (logits > 0).float() != target
    stress = torch.where(wrong[:, :1], 10.0, 1.0)
    assert float(weighted(logits, target, stress)) > float(weighted(logits, target, ones))
    with pytest.raises(ValueError, match="weight map"):
        weighted(logits, target)


def test_unknown_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="dice"):
        make_loss("focal")


def test_falk_weights_are_high_in_the_gap_between_close_cells():
    cells = np.zeros((5, 20, 40), np.uint16)
    cells[:, 4:16, 4:18] = 1
    cells[:, 4:16, 20:36] = 2      # 2-voxel gap at x = 18, 19
    w = falk_weight_map(cells, w0=10.0, sigma_vox=3.0)
    gap = w[2, 10, 18]
    outside = w[2, 10, 0]        # background next to one cell only
    far = w[2, 0, 0]
    inside = w[2, 10, 10]
    assert gap > 5.0 * outside
    assert gap > 5.0 * far
    # class balance: w = 0.5 / (class frequency), so the rarer class weighs more
    fg = float((cells > 0).mean())
    assert inside == pytest.approx(0.5 / fg)
    assert far == pytest.approx(0.5 / (1 - fg), rel=0.05)
    assert np.allclose(w[cells > 0], inside)
    # no separation term without a second cell nearby
    single = falk_weight_map((cells == 1).astype(np.uint8), w0=10.0, sigma_vox=3.0)
    assert np.unique(single).size == 2  # the two class weights, nothing else


def test_falk_weight_distances_follow_the_voxel_size():
    cells = np.zeros((9, 9, 30), np.uint16)
    cells[:, :, :10] = 1
    cells[:, :, 13:] = 2  # 3-voxel gap along X
    fine = falk_weight_map(cells, w0=10, sigma_vox=3, voxel_size=(1.0, 1.0, 1.0))
    # X voxels twice as coarse as Z: the same gap is twice as wide in units of the finest voxel
    coarse = falk_weight_map(cells, w0=10, sigma_vox=3, voxel_size=(0.5, 1.0, 1.0))
    assert coarse[4, 4, 11] < fine[4, 4, 11]
