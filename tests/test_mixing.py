"""vit.mixing: label smoothing in both conventions, and per-sample CutMix / MixUp keyed by
(seed, epoch, index)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vit import mixing
from vit.mixing import MixConfig

H, W = 8, 12  # non-square, so a swapped axis shows


def distinct_images(count):
    """Image i is the constant i + 1 in every pixel: a pixel's value says whose it is."""
    return (torch.arange(count, dtype=torch.float32) + 1).view(count, 1, 1, 1).expand(count, 3, H, W).contiguous()


# ---------------------------------------------------------------------------------------
# Label smoothing

def test_torch_convention_is_cross_entropys_label_smoothing():
    labels = torch.tensor([0, 3, 9, 3])
    targets = mixing.smooth_targets(labels, 10, 0.1, "torch")
    assert targets.dtype == torch.float32 and targets.shape == (4, 10)
    assert torch.allclose(targets[1, 3], torch.tensor(0.91)) and torch.allclose(targets[1, 0], torch.tensor(0.01))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixing.soft_target_cross_entropy(logits, targets),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_reference_convention_puts_smoothing_on_the_other_classes():
    labels = torch.tensor([2, 7])
    targets = mixing.smooth_targets(labels, 10, 0.1, "reference")
    on, off = mixing.smoothing_values(10, 0.1, "reference")
    assert (on, off) == (0.9, 0.1 / 9)
    assert targets[0, 2] == torch.tensor(0.9) and targets[1, 7] == torch.tensor(0.9)
    assert (targets[0][torch.arange(10) != 2] == torch.tensor(0.1 / 9)).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(2))
    # -(0.9 log p_true + 0.1/9 sum of the other log p), as the reference's loss computes it.
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    log_p = F.log_softmax(logits, dim=-1)
    expected = -(0.9 * log_p[[0, 1], labels] + 0.1 / 9 * (log_p.sum(-1) - log_p[[0, 1], labels])).mean()
    torch.testing.assert_close(mixing.soft_target_cross_entropy(logits, targets), expected)


def test_no_smoothing_is_one_hot_in_both_conventions():
    labels = torch.tensor([1, 0, 4])
    for convention in mixing.SMOOTHING_CONVENTIONS:
        assert torch.equal(mixing.smooth_targets(labels, 5, 0.0, convention), F.one_hot(labels, 5).float())


def test_smoothing_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown label smoothing convention 'timm'"):
        mixing.smooth_targets(torch.tensor([0]), 10, 0.1, "timm")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        mixing.smooth_targets(torch.tensor([0]), 10, 1.5)


# ---------------------------------------------------------------------------------------
# CutMix and MixUp

def test_config_follows_timms_rules():
    assert MixConfig() == MixConfig(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5,
                                    label_smoothing=0.1, smoothing_convention="torch", num_classes=10)
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        MixConfig(mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match=r"prob must be in \[0, 1\]"):
        MixConfig(prob=1.5)
    with pytest.raises(ValueError, match="unknown label smoothing convention"):
        MixConfig(smoothing_convention="other")


@pytest.mark.parametrize("config", [MixConfig(), MixConfig(mixup_alpha=0.0, cutmix_alpha=1.0),
                                    MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                                              smoothing_convention="reference")],
                         ids=["mixup", "cutmix", "both-reference-smoothing"])
def test_targets_are_distributions(config):
    n = 64
    images, labels = torch.randn(n, 3, H, W), torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(2))
    mixed, targets = mixing.mix_batch(images, labels, torch.arange(n), seed=0, epoch=0, config=config)
    assert mixed.shape == images.shape and mixed.dtype == images.dtype
    assert targets.shape == (n, 10) and (targets >= 0).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(n), rtol=0, atol=1e-6)


def test_cutmix_target_weights_are_the_pasted_areas_exactly():
    n = 400
    config = MixConfig(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    images, labels = distinct_images(n), torch.arange(n) % 10
    indices = torch.arange(5000, 5000 + n)
    params = mixing.draw_mix_params(indices, seed=1, epoch=2, config=config, height=H, width=W)
    mixed, targets = mixing.apply_mix(images, labels, params, config)
    partner = mixing.partner_positions(n, None, "cpu")
    pasted = (mixed == images[partner]).all(dim=1).sum(dim=(1, 2))  # pixels now holding the partner's value
    assert ((mixed == images) | (mixed == images[partner])).all()
    expected = pasted.to(torch.float32) / (H * W)
    assert torch.equal(params.partner_weight, expected)
    assert torch.equal(params.weight, 1 - expected)
    # Partners here always have another label: the target puts exactly these weights there.
    assert torch.equal(targets[torch.arange(n), labels[partner]], expected)
    assert torch.equal(targets[torch.arange(n), labels], 1 - expected)
    # The pasted pixels are the box, and boxes clipped at the border (touching it) occur.
    top, bottom, left, right = params.box.unbind(1)
    assert torch.equal(pasted, (bottom - top) * (right - left))
    assert ((top == 0) | (bottom == H) | (left == 0) | (right == W)).sum() > n // 4
    assert (pasted > 0).sum() > 0.9 * n and (pasted < H * W).all()


def test_mixup_blends_by_lambda_and_its_weights_follow_beta():
    n = 20_000
    alpha = 0.4
    config = MixConfig(mixup_alpha=alpha, cutmix_alpha=0.0, label_smoothing=0.0)
    images, labels = torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(3)), torch.arange(n) % 10
    params = mixing.draw_mix_params(torch.arange(n), seed=4, epoch=0, config=config, height=H, width=W)
    mixed, targets = mixing.apply_mix(images, labels, params, config)
    partner = mixing.partner_positions(n, None, "cpu")
    lam, other = params.weight.view(n, 1, 1, 1), params.partner_weight.view(n, 1, 1, 1)
    assert torch.equal(mixed, lam * images + other * images[partner])
    assert torch.equal(targets[torch.arange(n), labels], params.weight)
    assert torch.equal(params.partner_weight, 1 - params.weight) and not params.cutmix.any()
    # lambda ~ Beta(alpha, alpha): two-sample Kolmogorov-Smirnov against numpy at the 0.1% level.
    reference = np.sort(np.random.default_rng(5).beta(alpha, alpha, n))
    ours = np.sort(params.weight.double().numpy())
    grid = np.concatenate([ours, reference])
    distance = np.abs(np.searchsorted(ours, grid, side="right") - np.searchsorted(reference, grid, side="right")).max() / n
    assert distance < 1.95 * math.sqrt(2 / n)


def test_switch_and_mix_probabilities():
    n = 20_000
    params = mixing.draw_mix_params(torch.arange(n), seed=6, epoch=0, height=H, width=W,
                                    config=MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.6, switch_prob=0.3))
    mixed = params.weight < 1
    for count, p in ((int(mixed.sum()), 0.6), (int(params.cutmix.sum()), 0.6 * 0.3)):
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)), (count, p)
    everything_cut = mixing.draw_mix_params(torch.arange(n), seed=6, epoch=0, height=H, width=W,
                                            config=MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0))
    assert everything_cut.cutmix.all()


def test_rate_zero_is_the_identity():
    n = 32
    images, labels = torch.randn(n, 3, H, W), torch.randint(0, 10, (n,))
    for convention in mixing.SMOOTHING_CONVENTIONS:
        config = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0, smoothing_convention=convention)
        mixed, targets = mixing.mix_batch(images, labels, torch.arange(n), seed=0, epoch=0, config=config)
        assert torch.equal(mixed, images)
        assert torch.equal(targets, mixing.smooth_targets(labels, 10, 0.1, convention))


def test_partners_are_neighbours_and_draws_follow_the_keys():
    assert mixing.partner_positions(6, None, "cpu").tolist() == [1, 0, 3, 2, 5, 4]
    assert mixing.partner_positions(5, None, "cpu").tolist() == [1, 0, 3, 2, 4]  # the odd one out stays
    assert mixing.partner_positions(6, 3, "cpu").tolist() == [1, 0, 2, 4, 3, 5]
    with pytest.raises(ValueError, match="not a whole number of groups"):
        mixing.partner_positions(7, 3, "cpu")
    config = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0)
    indices = torch.tensor([40, 3, 17, 8, 21, 5])
    params = mixing.draw_mix_params(indices, seed=7, epoch=1, config=config, height=H, width=W)
    order = torch.tensor([2, 5, 0, 1, 4, 3])
    shuffled = mixing.draw_mix_params(indices[order], seed=7, epoch=1, config=config, height=H, width=W)
    for field in ("weight", "partner_weight", "cutmix", "box"):
        assert torch.equal(getattr(shuffled, field), getattr(params, field)[order]), field
    images, labels = distinct_images(6), torch.arange(6)
    first = mixing.mix_batch(images, labels, indices, seed=7, epoch=1, config=config)
    again = mixing.mix_batch(images, labels, indices, seed=7, epoch=1, config=config)
    other_epoch = mixing.mix_batch(images, labels, indices, seed=7, epoch=2, config=config)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other_epoch[1])
    # Only the partner's pixels and label enter: sample 0 lies between images 0 and 1 (the
    # constants 1 and 2), and its target's weight beyond smoothing is on labels 0 and 1.
    assert first[0][0].min() >= 1 and first[0][0].max() <= 2
    torch.testing.assert_close(first[1][0, 2:], torch.full((8,), mixing.smoothing_values(10, 0.1)[1]),
                               rtol=0, atol=1e-8)


def test_a_batch_split_over_processes_mixes_as_one_process():
    n = 16
    config = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0)
    images, labels = torch.randn(n, 3, H, W), torch.randint(0, 10, (n,))
    indices = torch.randperm(1000)[:n]
    whole = mixing.mix_batch(images, labels, indices, seed=8, epoch=0, config=config)
    halves = [mixing.mix_batch(images[s], labels[s], indices[s], seed=8, epoch=0, config=config)
              for s in (slice(0, 8), slice(8, 16))]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
    # Many batches in one call (group_size) mix as the batches one by one.
    grouped = mixing.mix_batch(images, labels, indices, seed=8, epoch=0, config=config, group_size=8)
    assert torch.equal(grouped[0], torch.cat([h[0] for h in halves]))


def test_a_sample_without_partner_is_left_unmixed():
    n = 5
    config = MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0)
    images, labels = torch.randn(n, 3, H, W), torch.arange(n)
    mixed, targets = mixing.mix_batch(images, labels, torch.arange(n), seed=9, epoch=0, config=config)
    assert torch.equal(mixed[4], images[4])
    assert torch.equal(targets[4], mixing.smooth_targets(labels[4:], 10, 0.1)[0])


def test_mixing_needs_float_images():
    with pytest.raises(TypeError, match="expected float images"):
        mixing.mix_batch(torch.zeros(2, 3, H, W, dtype=torch.uint8), torch.arange(2), torch.arange(2), seed=0,
                         epoch=0, config=MixConfig())
