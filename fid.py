"""
fid.py -- the Frechet distance between two Gaussians fitted to features: FID's formula, used by metrics.py
(Inception features) and by the miniature's mini-FID (world.py, its judge's features).

    python fid.py        # smoke demo: FD of random feature sets
"""
import numpy as np
import torch


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) in float64.
    tr((sigma1 sigma2)^(1/2)) = sum of the square roots of the eigenvalues of sigma1 sigma2 (real and >= 0:
    the product is similar to sigma1^(1/2) sigma2 sigma1^(1/2)); round-off may leave tiny imaginary parts."""
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    tr_covmean = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def mean_cov(features):
    """(N, D) -> mean (D,) and the unbiased covariance (D, D), float64, as np.mean / np.cov(rowvar=False)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    return x.mean(0).numpy(), torch.cov(x.T).numpy()


if __name__ == '__main__':
    g = np.random.default_rng(0)
    a, b = g.normal(size=(2000, 16)), g.normal(0.3, 1.0, size=(2000, 16))
    print(f"FD(a, a) = {abs(frechet_distance(*mean_cov(a), *mean_cov(a))):.1e}; FD(a, b shifted by 0.3) = "
          f"{frechet_distance(*mean_cov(a), *mean_cov(b)):.3f} (about 16 * 0.09 = 1.44)")
