"""GRPO's advantage, surrogate, KL and aggregations against hand-computed values."""
import math

import pytest
import torch

from common.args import apply_preset
from grpo import PRESETS, Args, aggregate, clipped_surrogate, group_advantages, k3_kl, overlong_penalty


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    a = group_advantages(r, 4, "group")
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    assert a[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4),
                                            0.5 / (std + 1e-4)])
    mean2 = 0.75
    std2 = math.sqrt(((0.25 ** 2) * 3 + 0.75 ** 2) / 3)
    assert a[4:].tolist() == pytest.approx([(x - mean2) / (std2 + 1e-4) for x in [1, 1, 0, 1]])
    assert group_advantages(r, 4, "none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25])
    batch_std = r.std().item()
    assert group_advantages(r, 4, "batch").tolist() == pytest.approx(
        [x / (batch_std + 1e-4) for x in [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25]])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_groups_zero_advantage_no_nan(scale):
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    a = group_advantages(r, 3, scale)
    assert torch.isfinite(a).all() and (a == 0).all()
    assert (group_advantages(torch.zeros(6), 3, scale) == 0).all()


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[0.5, 1.1, 1.5, 0.7]]))
    adv = torch.tensor([[1.0, 1.0, 1.0, -2.0]])
    loss, ratio = clipped_surrogate(new, old, adv, 0.2, 0.28)
    # ratio 0.5, A>0: min(0.5, 0.8) = 0.5; 1.1: 1.1; 1.5 clipped to 1.28; 0.7, A<0: min(-1.4, -1.6) = -1.6
    assert loss.tolist()[0] == pytest.approx([-0.5, -1.1, -1.28, 1.6], rel=1e-5)
    assert ratio.tolist()[0] == pytest.approx([0.5, 1.1, 1.5, 0.7], rel=1e-5)


def test_surrogate_gradient_is_policy_gradient_at_ratio_one():
    s = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.5]])
    loss, _ = clipped_surrogate(s, s.detach(), adv, 0.2, 0.2)
    loss.sum().backward()
    assert s.grad[0].tolist() == pytest.approx([-0.5, 1.5])  # d(-rho A)/ds = -A at rho = 1


def test_k3_kl():
    s, ref = torch.tensor([-1.0, -0.5, -2.0]), torch.tensor([-1.0, -1.5, -1.0])
    want = [math.exp(r - x) - (r - x) - 1 for x, r in zip(s.tolist(), ref.tolist())]
    assert k3_kl(s, ref).tolist() == pytest.approx(want)
    assert k3_kl(s, s).abs().max() == 0 and (k3_kl(s, ref) >= 0).all()


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "sequence", 2, 4, 8).item() == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)
    assert aggregate(per_token, mask, "token", 2, 4, 8).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(per_token, mask, "constant", 2, 4, 8).item() == pytest.approx((1 + 2 + 3 + 4) / (2 * 8))
    # Micro-batches with minibatch-level denominators add up to the whole-minibatch value.
    for mode in ("sequence", "token", "constant"):
        whole = aggregate(per_token, mask, mode, 2, 4, 8)
        parts = aggregate(per_token[:1], mask[:1], mode, 2, 4, 8) + aggregate(per_token[1:], mask[1:], mode, 2, 4, 8)
        assert parts.item() == pytest.approx(whole.item())
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "bogus", 2, 4, 8)


def test_overlong_penalty():
    lengths = torch.tensor([5, 12, 14, 16, 16])
    truncated = torch.tensor([False, False, False, False, True])
    assert overlong_penalty(lengths, truncated, 16, 4).tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_presets_set_fields():
    a = apply_preset(Args(preset="dr-grpo"), PRESETS)
    assert (a.adv_scale, a.loss_agg, a.beta) == ("none", "constant", 0.0)
    a = apply_preset(Args(preset="dapo"), PRESETS)
    assert (a.loss_agg, a.eps_high, a.dynamic_sampling) == ("token", 0.28, True)
    assert apply_preset(Args(), PRESETS).loss_agg == "token" and set(PRESETS) == {"grpo", "dr-grpo", "dapo"}
    # An explicit flag wins over the preset (README's DAPO recipe sets its own overlong cache).
    a = apply_preset(Args(preset="dapo", overlong_cache=512, max_new_tokens=4096), PRESETS)
    assert (a.overlong_cache, a.dynamic_sampling, a.eps_high) == (512, True, 0.28)
