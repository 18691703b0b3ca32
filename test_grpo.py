"""
test_grpo.py -- grpo.py: each function against an independent computation (hand numbers, torch.distributions,
plain REINFORCE, probabilities instead of log-probs).
"""
import math

import pytest
import torch
from torch.distributions import Categorical

import grpo
from grpo import (cfg_mix, clipped_surrogate, group_advantages, grpo_loss, kl_k3, policy_logprobs, token_entropy,
                  token_logprobs)


def test_advantages_hand_computed():
    # rewards 1,2,3,4: mean 2.5, deviations -1.5,-.5,.5,1.5, sample std sqrt(5/3) = 1.2909944
    A = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4, eps=0.0)
    torch.testing.assert_close(A, torch.tensor([-1.1618950, -0.3872983, 0.3872983, 1.1618950]))
    # default eps = 1e-4 is added to the std, as in TRL
    A = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4)
    torch.testing.assert_close(A, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (1.2909944 + 1e-4))
    # two groups of 2: [0, 1] -> std 1/sqrt(2), deviations +-0.5 -> +-0.7071068
    A = group_advantages(torch.tensor([0.0, 1.0, 5.0, 3.0]), 2, eps=0.0)
    torch.testing.assert_close(A, torch.tensor([-0.7071068, 0.7071068, 0.7071068, -0.7071068]))


def test_advantages_sum_to_zero_per_group():
    torch.manual_seed(0)
    r = torch.rand(6 * 8) * 10
    for scale_std in (True, False):
        A = group_advantages(r, 8, scale_std=scale_std).view(6, 8)
        torch.testing.assert_close(A.sum(1), torch.zeros(6), atol=1e-5, rtol=0)
    # with std scaling, each group has sample std ~1 (eps makes it slightly smaller)
    A = group_advantages(r, 8, eps=0.0).view(6, 8)
    torch.testing.assert_close(A.std(1), torch.ones(6))


def test_advantages_flat_group_is_zero_not_nan():
    # 8 x 0.1 in float32: the mean is off by 7e-9, so naive (r - mean) / std would be ~+-1
    r = torch.cat([torch.full((8,), 0.1), torch.full((8,), 0.7), torch.arange(8.0)])
    for scale_std, eps in ((True, 1e-4), (True, 0.0), (False, 1e-4)):
        A = group_advantages(r, 8, scale_std=scale_std, eps=eps)
        assert (A[:16] == 0).all()
        assert torch.isfinite(A).all() and A[16:].abs().sum() > 0


def test_advantages_no_std_is_r_minus_mean():
    r = torch.tensor([1.0, 2.0, 6.0, 10.0, 10.0, 16.0])
    A = group_advantages(r, 3, scale_std=False)
    torch.testing.assert_close(A, torch.tensor([-2.0, -1.0, 3.0, -2.0, -2.0, 4.0]))


def test_advantages_bad_group_size_raises():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 1)


def test_token_logprobs_matches_categorical():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    tokens = torch.randint(0, 11, (3, 5))
    for t in (1.0, 0.7, 1.5):
        ref = Categorical(logits=logits / t).log_prob(tokens)
        torch.testing.assert_close(token_logprobs(logits, tokens, temperature=t), ref)
    # low-precision logits are promoted: float32 result, close to the float32 reference
    lp = token_logprobs(logits.bfloat16(), tokens)
    assert lp.dtype == torch.float32
    ref = Categorical(logits=logits.bfloat16().float()).log_prob(tokens)
    torch.testing.assert_close(lp, ref)


def test_guided_logprobs_are_log_softmax_of_cfg_mixture():
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    tokens = torch.randint(0, 9, (2, 4))
    s, t = 4.0, 0.9
    torch.testing.assert_close(cfg_mix(cond, uncond, s), uncond + s * (cond - uncond))
    mix = uncond + s * (cond - uncond)
    ref = torch.log_softmax(mix / t, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(policy_logprobs(cond, uncond, tokens, "guided", s, t), ref)
    # cond mode ignores uncond; at CFG scale 1 both modes agree
    ref = torch.log_softmax(cond / t, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(policy_logprobs(cond, None, tokens, "cond", s, t), ref)
    torch.testing.assert_close(policy_logprobs(cond, uncond, tokens, "guided", 1.0, t), ref)


def test_guided_gradients_reach_both_halves():
    torch.manual_seed(0)
    cond = torch.randn(2, 3, 7, requires_grad=True)
    uncond = torch.randn(2, 3, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3))
    policy_logprobs(cond, uncond, tokens, "guided", 3.0).sum().backward()
    assert cond.grad.abs().sum() > 0 and uncond.grad.abs().sum() > 0
    # d/d uncond = (1 - s)/s * d/d cond, since both enter only through the mixture
    torch.testing.assert_close(uncond.grad, cond.grad * (1 - 3.0) / 3.0)


def test_policy_logprobs_bad_mode_raises():
    x, tok = torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError):
        policy_logprobs(x, x, tok, "mixture", 2.0)
    with pytest.raises(ValueError):
        policy_logprobs(x, None, tok, "guided", 2.0)


def test_token_entropy_matches_categorical():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 13) * 2
    torch.testing.assert_close(token_entropy(logits), Categorical(logits=logits).entropy())
    torch.testing.assert_close(token_entropy(torch.zeros(1, 2, 13)), torch.full((1, 2), math.log(13)))


def test_ratio_one_gradient_is_reinforce_with_group_baseline():
    torch.manual_seed(0)
    B, T, V = 8, 6, 10
    logits = torch.randn(B, T, V, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    A = group_advantages(torch.rand(B), 4)
    logp = token_logprobs(logits, tokens)
    loss, stats = grpo_loss(logp, logp.detach(), A)
    (g,) = torch.autograd.grad(loss, logits)
    # independent REINFORCE: -(A * log pi).mean with log pi from torch.distributions
    logits2 = logits.detach().clone().requires_grad_(True)
    ref = -(A[:, None] * Categorical(logits=logits2).log_prob(tokens)).mean()
    (g_ref,) = torch.autograd.grad(ref, logits2)
    torch.testing.assert_close(g, g_ref)
    # the value differs: at rho == 1 the surrogate is -mean(A), ~0 for group-centred A
    torch.testing.assert_close(loss, -A.mean(), atol=1e-6, rtol=0)
    assert stats["clip_frac"] == 0 and stats["ratio_min"] == 1 and stats["ratio_max"] == 1


def test_clipped_side_has_zero_gradient():
    # row 0 has A = +1, row 1 has A = -1; ratios chosen away from the 0.8 / 1.2 edges
    ratio = torch.tensor([[0.5, 1.0, 1.1, 1.5], [0.5, 0.9, 1.0, 1.5]])
    A = torch.tensor([1.0, -1.0])
    logp_old = torch.randn(2, 4)
    logp = (ratio.log() + logp_old).requires_grad_(True)
    pg = clipped_surrogate(logp, logp_old, A)
    # by hand: A>0 -> -min(r, clip r): -0.5, -1, -1.1, -1.2 ; A<0 -> max(r, clip r): .8, .9, 1, 1.5
    torch.testing.assert_close(pg, torch.tensor([[-0.5, -1.0, -1.1, -1.2], [0.8, 0.9, 1.0, 1.5]]))
    (g,) = torch.autograd.grad(pg.sum(), logp)
    # clip binds at (0,3): A>0, r>1.2 and (1,0): A<0, r<0.8 -> zero grad; elsewhere d/dlogp = -A r
    expect = -A[:, None] * ratio
    expect[0, 3] = expect[1, 0] = 0.0
    torch.testing.assert_close(g, expect)
    loss, stats = grpo_loss(logp, logp_old, A)
    assert stats["clip_frac"].item() == pytest.approx(2 / 8)
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["ratio_mean"].item() == pytest.approx(ratio.mean().item())
    torch.testing.assert_close(loss, pg.mean())


def test_asymmetric_clip_range():
    # eps_low=0.1, eps_high=0.3: r=1.25 is inside for A>0, r=0.85 is clipped for A<0
    ratio = torch.tensor([[1.25, 1.35], [0.85, 0.95]])
    A = torch.tensor([2.0, -2.0])
    pg = clipped_surrogate(ratio.log(), torch.zeros(2, 2), A, eps_low=0.1, eps_high=0.3)
    torch.testing.assert_close(pg, torch.tensor([[-2.5, -2.6], [1.8, 1.9]]))
    _, stats = grpo_loss(ratio.log(), torch.zeros(2, 2), A, eps_low=0.1, eps_high=0.3)
    assert stats["clip_frac"].item() == pytest.approx(2 / 4)


def test_k3_nonnegative_zero_at_equal_and_matches_probability_formula():
    torch.manual_seed(0)
    logp, ref = torch.randn(64, 32) * 3, torch.randn(64, 32) * 3
    k3 = kl_k3(logp, ref)
    assert (k3 >= 0).all()
    # independent: with r = pi_ref / pi (in float64 probabilities), k3 = r - log r - 1
    r = ref.double().exp() / logp.double().exp()
    torch.testing.assert_close(k3.double(), r - r.log() - 1, rtol=1e-5, atol=1e-6)
    assert (kl_k3(logp, logp) == 0).all()
    # tiny differences: the naive exp(d) - d - 1 can round below 0; k3 must not
    near = logp + torch.randn(64, 32) * 1e-6
    assert (kl_k3(logp, near) >= 0).all()
    # gradient w.r.t. logp is 1 - pi_ref / pi
    lp = logp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kl_k3(lp, ref).sum(), lp)
    torch.testing.assert_close(g.double(), 1 - r, rtol=1e-4, atol=1e-5)


def test_k3_mean_estimates_kl_under_samples_from_policy():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(6), torch.randn(6)
    p, q = Categorical(logits=p_logits), Categorical(logits=q_logits)
    x = p.sample((200_000,))
    est = kl_k3(p.log_prob(x), q.log_prob(x)).mean()
    exact = torch.distributions.kl_divergence(p, q)
    assert abs(est.item() - exact.item()) < 0.02 * max(1.0, exact.item())


def test_grpo_loss_with_kl_matches_independent_sum():
    torch.manual_seed(0)
    B, T, beta = 4, 5, 0.04
    logp, ref = torch.randn(B, T) - 2, torch.randn(B, T) - 2
    logp_old = logp + 0.3 * torch.randn(B, T)
    A = torch.tensor([1.0, -0.5, 0.0, 2.0])
    loss, stats = grpo_loss(logp, logp_old, A, ref_logp=ref, beta=beta)
    # independent: probabilities, explicit clamp, k3 as r - log r - 1
    rho = logp.exp() / logp_old.exp()
    surr = -torch.minimum(rho * A[:, None], rho.clamp(0.8, 1.2) * A[:, None])
    r = ref.exp() / logp.exp()
    k3 = r - r.log() - 1
    torch.testing.assert_close(loss, surr.mean() + beta * k3.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["pg_loss"], surr.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["kl"], k3.mean(), rtol=1e-5, atol=1e-6)
    # beta = 0: KL still reported, not in the loss; no reference: KL reported as 0
    loss0, stats0 = grpo_loss(logp, logp_old, A, ref_logp=ref, beta=0.0)
    torch.testing.assert_close(loss0, surr.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats0["kl"], k3.mean(), rtol=1e-5, atol=1e-6)
    _, stats1 = grpo_loss(logp, logp_old, A)
    assert stats1["kl"].item() == 0.0
    assert all(not v.requires_grad for v in stats.values())


def test_advantages_nonfinite_reward_left_out_of_its_group():
    nan, inf = float('nan'), float('inf')
    r = torch.tensor([1.0, 2.0, nan, 4.0, 5.0, inf, nan, 5.0, 3.0, nan, nan, -inf, 0.5, 0.7, 0.2, 0.9])
    adv = group_advantages(r, 4)
    m, s = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)  # the finite 1, 2, 4
    expected = [(1 - m) / (s + 1e-4), (2 - m) / (s + 1e-4), 0, (4 - m) / (s + 1e-4)]
    expected += [0, 0, 0, 0] + [0, 0, 0, 0]  # flat among its finite rewards; a single finite reward
    torch.testing.assert_close(adv[:12], torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv[12:], group_advantages(r[12:], 4), atol=1e-6, rtol=0)  # as if alone
    torch.testing.assert_close(group_advantages(r, 4, scale_std=False)[:4], torch.tensor([1 - m, 2 - m, 0, 4 - m]))


# -----------------------------------------------------------------------------
# the entropy term


def test_mean_token_entropy_by_hand():
    # p = (1/4, 3/4): H = 1/4 log 4 + 3/4 log(4/3); uniform over 3: log 3
    logits = torch.tensor([[[0.0, math.log(3.0), -1e4], [2.0, 2.0, 2.0]]])  # (1, 2, 3); -1e4: p = 0 exactly
    h1 = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    assert abs(grpo.mean_token_entropy(logits).item() - (h1 + math.log(3)) / 2) < 1e-6
    # temperature 2 on (0, log 3): p = (1, sqrt 3) / (1 + sqrt 3)
    q = torch.tensor([1.0, math.sqrt(3)], dtype=torch.float64) / (1 + math.sqrt(3))
    h = -(q * q.log()).sum().item()
    got = grpo.mean_token_entropy(torch.tensor([[[0.0, math.log(3.0)]]]), temperature=2.0)
    assert abs(got.item() - h) < 1e-6


def test_mean_token_entropy_gradient_matches_categorical():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 11, dtype=torch.float32) * 2
    for t in (1.0, 0.7):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ha = grpo.mean_token_entropy(a, temperature=t)
        hb = Categorical(logits=b / t).entropy().mean()
        ha.backward(), hb.backward()
        torch.testing.assert_close(ha, hb)
        torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)
        # and the closed form dH/dz = -p (log p + H) / (B T) through z = x / t
        p = (x / t).softmax(-1)
        h = -(p * p.log()).sum(-1, keepdim=True)
        torch.testing.assert_close(a.grad, -p * (p.log() + h) / (t * 15), atol=1e-7, rtol=1e-5)


def test_mean_token_entropy_keeps_no_vocabulary_sized_activations():
    """Autograd saves only views of the logits (one per image) for backward, no softmax or scaled copy."""
    logits = torch.randn(3, 4, 50, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        grpo.mean_token_entropy(logits, temperature=0.5)
    big = [t for t in saved if t.numel() >= 50]
    assert big and all(t.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr() for t in big)


def test_adapt_entropy_coef_by_hand():
    assert grpo.adapt_entropy_coef(0.1, 2.0, 3.0, lr=0.05) == pytest.approx(0.15)  # below target: more bonus
    assert grpo.adapt_entropy_coef(0.1, 4.0, 3.0, lr=0.05) == pytest.approx(0.05)  # above: less
    assert grpo.adapt_entropy_coef(0.01, 9.0, 3.0, lr=0.05) == 0.0  # never negative
    assert grpo.adapt_entropy_coef(0.0, 2.5, 3.0, lr=0.1) == pytest.approx(0.05)  # starts from 0
    assert grpo.adapt_entropy_coef(0.3, 1.0, 3.0, lr=0.0) == 0.3  # lr = 0: a fixed coefficient
