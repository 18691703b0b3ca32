"""
test_fid.py -- fid.py: the Frechet distance and the leave-one-out FID reward.

    python -m pytest -q test_fid.py          # CPU, offline, a few seconds

References are written here independently, in float64 numpy: explicit per-image means and second moments,
covariances, and matrix square roots from np.linalg.eigh (the other multiplication order from fid.py's).
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fid
from conftest import on_ranks

# ----------------------------------------------------------------------------- numpy references


def np_sqrtm(a):  # symmetric PSD square root
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def np_fd(mu1, s1, mu2, s2):
    """FID's formula with the root taken of s2 (fid.py roots s1), tr((s1 s2)^1/2) = tr((R s1 R)^1/2), R = s2^1/2."""
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)  # np.cov of one feature is 0-d
    r = np_sqrtm(s2)
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s1 @ r), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


def np_moments(history, decay, batch):
    """Mean and second moment of all images of history + [batch], batch s of t weighted decay^(t-s): fid.py's
    bias-corrected EMA written as the weighted average it is meant to be, not as a recursion."""
    batches = history + [batch]
    wts = np.array([decay ** (len(batches) - 1 - s) for s in range(len(batches))])
    wts = wts / wts.sum()
    m = sum(w * b.mean(0) for w, b in zip(wts, batches))
    M = sum(w * b.T @ b / len(b) for w, b in zip(wts, batches))
    return m, M, wts[-1]  # the last is the batch's share a_t


def np_loo_rewards(history, batch, decay, mu_r, s_r):
    """r_i = FD(moments with batch minus row i, same share a_t) - FD(moments with the whole batch), by brute force."""
    m, M, a = np_moments(history, decay, batch)
    full = np_fd(m, M - np.outer(m, m), mu_r, s_r)
    out = []
    for i in range(len(batch)):
        rest = np.delete(batch, i, axis=0)  # (B - 1, d)
        m_i = m + a * (rest.mean(0) - batch.mean(0))  # swap the batch's mean for the rest's, weight a
        M_i = M + a * (rest.T @ rest / len(rest) - batch.T @ batch / len(batch))
        out.append(np_fd(m_i, M_i - np.outer(m_i, m_i), mu_r, s_r) - full)
    return np.array(out), full, (m, M)


def random_reference(rng, d, n=None):
    x = rng.standard_normal((n or 3 * d, d)) @ rng.standard_normal((d, d)) / math.sqrt(d) + rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


def identity_scorer(mu_r, s_r, decay, **kw):
    return fid.LooFID(lambda feats: feats, mu_r, s_r, decay=decay, **kw)  # "images" are the features

# ----------------------------------------------------------------------------- fid.py: the Frechet distance


def test_frechet_distance_matches_numpy_other_order():
    rng = np.random.default_rng(0)
    for d in (1, 4, 16):
        (mu1, s1), (mu2, s2) = random_reference(rng, d), random_reference(rng, d)
        got = fid.frechet_distance(mu1, s1, mu2, s2)
        assert isinstance(got, float)
        assert abs(got - np_fd(mu1, s1, mu2, s2)) < 1e-9 * max(1.0, got)
        # tensors in, same answer; FD is symmetric
        t = [torch.tensor(a, dtype=torch.float32) for a in (mu2, s2, mu1, s1)]
        assert abs(fid.frechet_distance(*t) - got) < 1e-3 * max(1.0, got)
    # a singular covariance (fewer samples than dimensions): still real and finite. Any method agrees only to
    # ~sqrt(eps) per zero eigenvalue there: round-off of 1e-16 on an eigenvalue 0 becomes 1e-8 after the sqrt
    x, y = rng.standard_normal((5, 12)), rng.standard_normal((40, 12))
    (mx, sx), (my, sy) = fid.mean_cov(x), fid.mean_cov(y)
    assert abs(fid.frechet_distance(mx, sx, my, sy) - np_fd(mx, sx, my, sy)) < 1e-6


def test_frechet_distance_of_a_distribution_with_itself_is_zero():
    mu, s = random_reference(np.random.default_rng(1), 16)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-9
    assert abs(fid.frechet_distance(np.zeros(3), np.zeros((3, 3)), np.zeros(3), np.zeros((3, 3)))) == 0


def test_mean_cov_is_numpy_mean_and_cov():
    x = np.random.default_rng(2).standard_normal((30, 7))
    m, c = fid.mean_cov(x)
    np.testing.assert_allclose(m, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(c, np.cov(x, rowvar=False), atol=1e-12)


# ----------------------------------------------------------------------------- fid.py: moments and the LOO reward


@pytest.mark.parametrize("B", [2, 3, 8, 32])
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("prior_steps", [0, 2])
def test_loo_rewards_equal_brute_force(B, decay, prior_steps):
    rng = np.random.default_rng(B * 100 + prior_steps)
    d = 6 if B < 8 else 13
    mu_r, s_r = random_reference(rng, d)
    history = [rng.standard_normal((int(rng.integers(2, 9)), d)) * 0.8 + 0.5 for _ in range(prior_steps)]
    batch = rng.standard_normal((B, d))
    batch[1] = batch[0] + 0.01  # a near-duplicate: the rank-2 update must stay exact there too
    scorer = identity_scorer(mu_r, s_r, decay, chunk=3)  # chunk < B exercises the split
    for h in history:  # earlier steps, with other batch sizes
        scorer(torch.tensor(h), None)
    r = scorer(torch.tensor(batch), None)
    want, full, (m, M) = np_loo_rewards(history, batch, decay, mu_r, s_r)
    assert r.dtype == torch.float32 and r.shape == (B,)
    # the float64 rewards before the float32 cast, through the pure function on the pre-step state
    scorer2 = identity_scorer(mu_r, s_r, decay)
    for h in history:
        scorer2(torch.tensor(h), None)
    r64, fd64, state = fid.loo_fid(torch.tensor(batch), (scorer2.weight, scorer2.mean, scorer2.second), decay,
                                   scorer2.mu_r, scorer2.root_r, chunk=5)
    np.testing.assert_allclose(r64.numpy(), want, atol=1e-6, rtol=0)
    # a rank's share: the same numbers for the rows it asks for
    part = fid.loo_fid(torch.tensor(batch), (scorer2.weight, scorer2.mean, scorer2.second), decay, scorer2.mu_r,
                       scorer2.root_r, rows=slice(1, None))[0]
    np.testing.assert_allclose(part.numpy(), want[1:], atol=1e-6, rtol=0)
    np.testing.assert_allclose(r.numpy(), want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=1e-6)
    assert abs(fd64.item() - full) < 1e-6 and abs(scorer.last["fd"] - full) < 1e-6
    # the EMA state after the step is the weighted average of every batch seen
    np.testing.assert_allclose(scorer.mean.numpy(), m, atol=1e-12)
    np.testing.assert_allclose(scorer.second.numpy(), M, atol=1e-12)
    assert abs(scorer.weight.item() - (1 - decay ** (prior_steps + 1))) < 1e-12
    assert abs(scorer.last["reward_mean"] - want.mean()) < 1e-6
    assert abs(scorer.last["reward_std"] - want.std(ddof=1)) < 1e-6


def test_first_step_of_two_images_leaves_one_image_with_zero_covariance():
    """B = 2 at the first step: each leave-one-out moment set is one image, covariance exactly 0 (why biased)."""
    rng = np.random.default_rng(4)
    mu_r, s_r = random_reference(rng, 5)
    x = rng.standard_normal((2, 5))
    r = fid.loo_fid(torch.tensor(x), fid.ema_init(5), 0.9, torch.tensor(mu_r), fid.sqrtm_psd(torch.tensor(s_r)))[0]
    (m, s), full = fid.mean_cov(x), None
    full = np_fd(x.mean(0), s / 2, mu_r, s_r)  # biased covariance of two images = unbiased / 2
    want = [np_fd(x[1 - i], np.zeros((5, 5)), mu_r, s_r) - full for i in range(2)]
    np.testing.assert_allclose(r.numpy(), want, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.loo_fid(torch.tensor(x[:1]), fid.ema_init(5), 0.9, torch.tensor(mu_r), fid.sqrtm_psd(torch.tensor(s_r)))


def test_rewards_favour_the_under_represented_mode():
    """Reference 50/50 between two modes; batches 7:1 for mode A -> mode B earns > 0 and the most, a near-
    duplicate in A < 0, and A's images < 0 on average."""
    g = torch.Generator().manual_seed(0)
    d = 8
    modes = torch.stack([torch.full((d,), -1.0), torch.full((d,), 1.0)]).double()
    ref = modes[torch.arange(2000) % 2] + 0.5 * torch.randn(2000, d, generator=g, dtype=torch.float64)
    scorer = identity_scorer(*fid.mean_cov(ref), decay=0.9)
    for _ in range(3):
        x = modes[(torch.arange(8) == 7).long()] + 0.5 * torch.randn(8, d, generator=g, dtype=torch.float64)
        x[1] = x[0] + 0.01
        r = scorer(x, None)
        assert r[7] > 0 > r[1] and r[7] > r[:7].max() and r[:7].mean() < 0


def test_state_dict_round_trip_resumes_exactly():
    rng = np.random.default_rng(5)
    mu_r, s_r = random_reference(rng, 7)
    net = torch.nn.Linear(7, 7).double()  # a module as the feature function: its weights stay out of the state
    a = fid.LooFID(net, mu_r, s_r, decay=0.8)
    batches = [torch.tensor(rng.standard_normal((6, 7))) for _ in range(3)]
    with torch.no_grad():
        a(batches[0], None), a(batches[1], None)
    sd = a.state_dict()
    assert set(sd) == {"weight", "mean", "second"} and all(v.dtype == torch.float64 for v in sd.values())
    b = fid.LooFID(net, mu_r, s_r, decay=0.8)
    b.load_state_dict({k: v.clone() for k, v in sd.items()})
    with torch.no_grad():
        ra, rb = a(batches[2], None), b(batches[2], None)
    assert torch.equal(ra, rb) and torch.equal(a.second, b.second) and a.last == b.last

# ----------------------------------------------------------------------------- fid.py: two gloo ranks


def test_two_gloo_ranks_equal_one_process(tmp_path):
    rng = np.random.default_rng(6)
    d, B = 9, 8
    mu_r, s_r = random_reference(rng, d)
    steps = [torch.tensor(rng.standard_normal((B, d))) for _ in range(3)]
    one = identity_scorer(mu_r, s_r, 0.7)
    want = [one(x, None) for x in steps]

    def rank_fn():
        dist.init_process_group('gloo')  # RANK, WORLD_SIZE, MASTER_ADDR/PORT set by on_ranks, as torchrun would
        rank = dist.get_rank()
        scorer = identity_scorer(mu_r, s_r, 0.7)  # default gather: dist.all_gather
        got = [scorer(x[rank * B // 2:(rank + 1) * B // 2].float(), None) for x in steps]  # float32 features
        torch.save(dict(got=got, state=scorer.state_dict(), last=scorer.last), tmp_path / f"rank{rank}.pt")
        dist.destroy_process_group()

    assert on_ranks(2, rank_fn)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for g, w in zip(out["got"], want):
            # features sent as float32 here: compare with tolerance to the float64 single-process run
            torch.testing.assert_close(g, w[rank * B // 2:(rank + 1) * B // 2], atol=1e-3, rtol=1e-4)
        for k, v in out["state"].items():
            torch.testing.assert_close(v, one.state_dict()[k], atol=1e-6, rtol=1e-6)
    # exactly the same: both ranks agree bit for bit, and with one process fed the same float32 features
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"]) and r0["last"] == r1["last"]
    exact = identity_scorer(mu_r, s_r, 0.7)
    last = [exact(x.float(), None) for x in steps][-1]
    assert torch.equal(torch.cat([r0["got"][-1], r1["got"][-1]]), last)
    assert all(torch.equal(r0["state"][k], exact.state_dict()[k]) for k in r0["state"])
