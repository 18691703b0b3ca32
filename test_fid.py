"""
test_fid.py -- fid.py: the Frechet distance against independent numpy computations.
"""
import numpy as np
import pytest
import torch

import fid
from fid import frechet_distance, mean_cov


def _np_sqrtm_psd(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_matches_numpy():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(300, 20)), g.normal(0.2, 1.3, size=(300, 20)) @ g.normal(size=(20, 20)) * 0.3
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    for m, s in ((mu1, s1), (mu2, s2)):
        got_m, got_s = fid.mean_cov(a if m is mu1 else b)
        np.testing.assert_allclose(got_m, m, rtol=1e-12)
        np.testing.assert_allclose(got_s, s, rtol=1e-10, atol=1e-12)
    r1 = _np_sqrtm_psd(s1)  # tr sqrt(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2), a symmetric PSD matrix
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_np_sqrtm_psd(r1 @ s2 @ r1))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_frechet_distance_of_features_other_order():
    """fid.frechet_distance of two feature sets against an independent numpy computation: tr sqrt(C1 C2) from the
    eigenvalues of C2^(1/2) C1 C2^(1/2) (the other order), each square root by numpy eigh."""
    g = np.random.default_rng(0)
    a = g.normal(size=(300, 6)) @ g.normal(size=(6, 6))
    b = g.normal(size=(200, 6)) @ g.normal(size=(6, 6)) + 0.5

    def sqrtm_psd(c):
        w, v = np.linalg.eigh(c)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s2 = sqrtm_psd(c2)
    want = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1) + np.trace(c2)
            - 2 * np.trace(sqrtm_psd(s2 @ c1 @ s2)))
    got = frechet_distance(*mean_cov(torch.from_numpy(a).float()), *mean_cov(torch.from_numpy(b).float()))
    assert got == pytest.approx(want, rel=1e-4)
    assert frechet_distance(*mean_cov(a), *mean_cov(a)) == pytest.approx(0, abs=1e-6)
