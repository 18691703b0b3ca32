"""
fid.py -- the Frechet distance (FID's formula), and a leave-one-out FID reward for GRPO.

    python fid.py        # smoke demo on random features: who earns a positive reward, one step's timing at d = 64

    FD(mu1, S1, mu2, S2) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

`frechet_distance` is the project's one Frechet distance (FID, sFID, the world's demo metrics). `LooFID` is a reward
scorer, `scorer(images, conditions) -> Tensor[B]`, that credits each image with how much it pulls the generated
feature distribution toward a fixed reference (mu_r, S_r) of real images:

    r_i = FD(moments updated with the batch without image i) - FD(moments updated with the whole batch)

where the generated moments are a moving average over training steps. An image from a part of the reference the
policy under-samples earns r_i > 0; one more near-duplicate of an over-represented mode earns r_i < 0.

Follows the distribution-level reward of "Policy-based Tuning of Autoregressive Image Models with Instance- and
Distribution-Level Rewards" (arXiv 2603.23086), which has no public code; every definition below is ours:
1. The moving estimate is an exponential moving average of the feature mean and (uncentred) second moment, bias-
   corrected as Adam's: after t steps it is the weighted mean of all batches seen, batch s weighted decay^(t-s), so
   the first step is simply the first batch's moments (no zero start, no special case). State: float64.
2. "Without image i" keeps the batch's share a_t and averages the other B - 1 images: well defined for B >= 2
   (at the first step the moments of B - 1 >= 1 images). The covariance is the weighted mixture's own (biased)
   covariance M - m m^T, so one remaining image gives S_g = 0 rather than the 0/0 of an unbiased estimate.
3. Exact, no first-order approximation: B + 1 symmetric eigendecompositions of d x d per step on one process
   (loo_fid says how), 10x faster than recomputing the B + 1 distances (bench.py --only loo_fid).
4. Every rank gathers the global batch's features, computes the EMA update and the batch FD identically (the
   state never diverges between ranks and needs no broadcast), and the leave-one-out terms of its own images
   only: 1 + B / world eigendecompositions per rank and step.
5. The reward's scale follows the batch's share: r_i is about c = a_t / (B - 1) times a per-image term, large at
   the first step (a_1 = 1), then settling to (1 - decay) / (B - 1) within ~1 / (1 - decay) steps. Group-
   normalised advantages cancel that when loo_fid is the only reward, not when it is weighted with others.
"""
import time

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# the Frechet distance


def as_f64(a):
    """numpy array, list or tensor (any device) -> float64 tensor (on the tensor's device)."""
    return a.detach().double() if torch.is_tensor(a) else torch.as_tensor(np.asarray(a), dtype=torch.float64)


def sqrtm_psd(sigma):
    """S = V diag(sqrt(max(w, 0))) V^T where sigma = V diag(w) V^T: the symmetric PSD root, S S = sigma.

    (d, d) -> (d, d). eigh reads one triangle only; eigenvalues below zero are round-off on a PSD input."""
    w, v = torch.linalg.eigh(sigma)
    return (v * w.clamp(min=0).sqrt()) @ v.T  # (d, d)


def trace_sqrt_psd(mats):
    """tr(A^(1/2)) = sum_k sqrt(lambda_k(A)) for each symmetric PSD A of a stack (n, d, d) -> (n,)."""
    return torch.linalg.eigvalsh(mats).clamp(min=0).sqrt().sum(-1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FD = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), float64 -> Python float.

    tr((sigma1 sigma2)^(1/2)) = sum_k sqrt(lambda_k(S sigma2 S)), S = sigma1^(1/2) (sqrtm_psd). Why: sigma1 sigma2 =
    S (S sigma2) and S sigma2 S = (S sigma2) S have the same eigenvalues (AB and BA always do, even for singular
    sigma1), and S sigma2 S is symmetric PSD, so a symmetric solver returns them real, >= 0 up to round-off and
    backward-stably. The general eig of sigma1 @ sigma2 (metrics.py until now, torchmetrics) works on a non-
    symmetric matrix and returns round-off imaginary parts; scipy's sqrtm (the ADM evaluator) can return complex
    or inaccurate roots for the singular covariances of small sample sets. All agree to round-off on good inputs.
    Inputs: numpy arrays or tensors, mu (d,), sigma (d, d) symmetric PSD.
    """
    mu1, mu2 = as_f64(mu1).reshape(-1), as_f64(mu2).reshape(-1)
    s1, s2 = as_f64(sigma1).reshape(len(mu1), -1), as_f64(sigma2).reshape(len(mu2), -1)  # np.cov of d=1: 0-d
    if not all(torch.isfinite(t).all() for t in (mu1, mu2, s1, s2)):  # an eigen-solver fed NaN may crash
        raise ValueError("frechet_distance got means or covariances that are not finite (the covariance of a "
                         "single feature vector, or NaN features)")
    root = sqrtm_psd(s1)
    tr_covmean = trace_sqrt_psd(root @ s2 @ root)
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def mean_cov(features):
    """(N, D) -> mean (D,) and the unbiased covariance (D, D), float64 numpy, as np.mean / np.cov(rowvar=False)."""
    x = as_f64(features).cpu()
    return x.mean(0).numpy(), torch.cov(x.T).numpy()

# -----------------------------------------------------------------------------
# moving moments of the generated features (state = (w, m, M), float64)


def ema_init(d, device=None):
    """The empty state: total weight w = 0, mean m = 0 (d,), second moment M = 0 (d, d)."""
    z = dict(dtype=torch.float64, device=device)
    return torch.zeros((), **z), torch.zeros(d, **z), torch.zeros(d, d, **z)


def ema_update(state, x, decay):
    """One step of the bias-corrected EMA of the mean and second moment over the B rows of x (B, d):

        w_t = decay w_(t-1) + (1 - decay)            (w_0 = 0, so w_t = 1 - decay^t)
        a_t = (1 - decay) / w_t                      (the batch's share: a_1 = 1, then -> 1 - decay)
        m_t = (1 - a_t) m_(t-1) + a_t mean_j x_j
        M_t = (1 - a_t) M_(t-1) + a_t mean_j x_j x_j^T

    i.e. the moments of every image seen, batch s weighted decay^(t-s) / w_t. Storing w (not t) keeps this true
    when a resumed run changes the decay. Returns ((w_t, m_t, M_t), a_t); a_t is a 0-d tensor.
    """
    w, m, M = state
    w_new = decay * w + (1 - decay)
    a = (1 - decay) / w_new
    x = x.double()
    return (w_new, (1 - a) * m + a * x.mean(0), (1 - a) * M + a * (x.T @ x) / len(x)), a


def covariance(m, M):
    """S = M - m m^T: the covariance of the weighted mixture the moments describe (biased, no n - 1)."""
    return M - torch.outer(m, m)  # (d, d)

# -----------------------------------------------------------------------------
# the leave-one-out reward


def loo_fid(x, state, decay, mu_r, root_r, rows=slice(None), chunk=8):
    """Rewards r_i = FD_(-i) - FD for the images x[rows], the batch FD, and the new state; x (B, d) the global
    batch, B >= 2. Ranks pass their own rows: the update and FD need all of x, each FD_(-i) only its image.

    FD      = FD((m, S) after ema_update(state, x), (mu_r, S_r))
    FD_(-i) = the same with the B - 1 rows j != i as the batch and the same share a = a_t:
              m_(-i) = (1 - a) m_(t-1) + a mean_(j!=i) x_j,  M_(-i) = (1 - a) M_(t-1) + a mean_(j!=i) x_j x_j^T
    Cheap and exact: with c = a / (B - 1), xbar = mean_j x_j, e_i = x_i - xbar and u_i = x_i - m (m, S updated with
    the whole batch), taking x_i's share out of mean and second moment and expanding M - m m^T around m gives
              m_(-i) = m - c e_i
              S_(-i) = K - c u_i u_i^T - c^2 e_i e_i^T,    K = S + c mean_j u_j u_j^T   (common to all i)
    so with R = S_r^(1/2) computed once (root_r; FD is symmetric, so the fixed side takes the root),
              tr((S_r S_(-i))^(1/2)) = sum_k sqrt(lambda_k(R K R - c v_i v_i^T - c^2 g_i g_i^T)),  v = R u, g = R e.
    Per step: R S R (two d x d matmuls; R K R = R S R + c mean_j v_j v_j^T), each image's matrix a rank-2 update
    of R K R (O(d^2)), and one symmetric eigvalsh each, `chunk` images per call to bound memory (chunk d x d
    float64 matrices): 1 + len(rows) eigendecompositions of d x d (B + 1 on one process). Recomputing each FD
    from scratch costs B + 1 covariances and B + 1 general (non-symmetric) eigs. tr S_(-i) and |m_(-i) - mu_r|^2
    are O(d) per image.
    """
    B = len(x)
    if B < 2:
        raise ValueError(f"loo_fid needs at least 2 images in the global batch (one left out), got {B}")
    x = x.double()
    new_state, a = ema_update(state, x, decay)
    _, m, M = new_state
    S = covariance(m, M)  # (d, d)
    c = a / (B - 1)
    u, e = x - m, x - x.mean(0)  # (B, d) each
    v, g = u @ root_r, e @ root_r  # (B, d): rows R u_i, R e_i (R symmetric)
    P = root_r @ S @ root_r  # (d, d)  R S R, for the batch FD
    A = P + (c / B) * (v.T @ v)  # (d, d)  R K R
    trace_r = root_r.square().sum()  # tr(S_r) = tr(R R) = |R|_F^2
    fd = (m - mu_r).square().sum() + S.trace() + trace_r - 2 * trace_sqrt_psd(P)
    Y = torch.stack([v[rows], g[rows]], -1)  # (b, d, 2) the images asked for
    coef = torch.stack([c, c * c]).to(Y)  # (2,): R S_(-i) R = A - Y_i diag(c, c^2) Y_i^T
    ts = []
    for y in Y.split(chunk):  # (n, d, 2): n images' (n, d, d) matrices at a time, one output tensor
        ts.append(trace_sqrt_psd(torch.baddbmm(A.expand(len(y), -1, -1), y * coef, y.transpose(1, 2), alpha=-1)))
    trace_K = S.trace() + c * u.square().sum() / B
    u, e = u[rows], e[rows]  # (b, d)
    trace_loo = trace_K - c * u.square().sum(1) - c ** 2 * e.square().sum(1)  # (b,) tr S_(-i)
    fd_loo = (m - c * e - mu_r).square().sum(1) + trace_loo + trace_r - 2 * torch.cat(ts)  # (b,)
    return fd_loo - fd, fd, new_state

# -----------------------------------------------------------------------------
# the scorer


def all_gather_rows(x):
    """(b, d) on each rank -> ((world * b, d) in rank order, this rank's first row). Identity on one process.

    Every rank must pass the same b (train.py's step layout does); gloo and nccl both move float64."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), dist.get_rank() * len(x)


class LooFID(torch.nn.Module):
    """Leave-one-out FID reward: forward(images, conditions) -> (b,) float32 for this rank's b images.

    features: images (b, 3, H, W) in [-1, 1] -> (b, d) on the images' device, frozen (the miniature: the reward
    classifier's penultimate layer; real runs: metrics.py's TF-Inception pool features). mu_r (d,), sigma_r
    (d, d): the reference's moments. decay: the EMA's per-step decay. gather: local (b, ...) -> (global
    (B, ...), this rank's first row), default all_gather_rows; used twice per call (features, then rewards), so
    every rank must call forward once per training step at the same point. Each call updates the EMA state.
    state_dict() holds only that state (weight, mean, second), float64 buffers, for an exact resume; the
    reference and features are rebuilt from the config. float64 because M - m m^T cancels and each r_i is a
    difference of two FDs about B times smaller than them. After a call, self.last holds the step's diagnostics:
    fd (the batch FD, after the update), reward_mean and reward_std (over the global batch, std with n - 1), as
    Python floats.
    """

    def __init__(self, features, mu_r, sigma_r, decay=0.9, gather=all_gather_rows, chunk=8):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"the EMA decay must be in [0, 1), got {decay}")
        # not a submodule: the feature network belongs to whoever built it; its weights stay out of our state
        object.__setattr__(self, "features", features)
        self.decay, self.gather, self.chunk = decay, gather, chunk
        mu_r, sigma_r = as_f64(mu_r), as_f64(sigma_r)
        self.register_buffer("mu_r", mu_r, persistent=False)  # (d,)
        self.register_buffer("root_r", sqrtm_psd(sigma_r), persistent=False)  # (d, d) S_r^(1/2), once per run
        w, m, M = ema_init(len(mu_r), mu_r.device)
        self.register_buffer("weight", w)  # 0 = no step yet
        self.register_buffer("mean", m)  # (d,)
        self.register_buffer("second", M)  # (d, d)
        self.last = {}

    @torch.no_grad()
    def forward(self, images, conditions=None):
        local = self.features(images).double()  # (b, d); conditions are not used
        x, start = self.gather(local)  # (B, d) the global batch, identical on every rank
        mine = slice(start, start + len(local))  # this rank's images: only their leave-one-out terms are computed
        state = (self.weight, self.mean, self.second)
        r, fd, (w, m, M) = loo_fid(x.to(self.mean.device), state, self.decay, self.mu_r, self.root_r, mine,
                                   self.chunk)  # (b,)
        for buf, new in zip((self.weight, self.mean, self.second), (w, m, M)):
            buf.copy_(new)
        r_all, _ = self.gather(r)  # (B,) every rank's rewards, for the logged mean and spread
        self.last = dict(fd=fd.item(), reward_mean=r_all.mean().item(), reward_std=r_all.std().item())
        return r.float().to(images.device)  # (b,)

# -----------------------------------------------------------------------------


def _demo():
    """Reference: two modes in d = 64, 50/50. The policy over-samples mode A (7 of 8 images in a batch)."""
    torch.manual_seed(0)
    d, n = 64, 4000
    modes = torch.stack([torch.full((d,), -1.0), torch.full((d,), 1.0)])  # (2, d)
    ref = modes[torch.arange(n) % 2] + 0.5 * torch.randn(n, d)  # (n, d)
    mu_r, sigma_r = mean_cov(ref)
    scorer = LooFID(lambda feats: feats, mu_r, sigma_r, decay=0.9)  # features = identity: "images" are features
    for step in range(5):
        batch = modes[(torch.arange(8) == 7).long()] + 0.5 * torch.randn(8, d)  # rows 0-6 mode A, row 7 mode B
        batch[1] = batch[0] + 0.01 * torch.randn(d)  # a near-duplicate of another image of the crowded mode
        t0 = time.perf_counter()
        r = scorer(batch, None)
        ms = 1e3 * (time.perf_counter() - t0)
        print(f"step {step}  FD {scorer.last['fd']:8.3f}  reward mean {scorer.last['reward_mean']:+.4f} std "
              f"{scorer.last['reward_std']:.4f}  dup {r[1].item():+.4f}  mode-A {r[2].item():+.4f}  "
              f"mode-B {r[7].item():+.4f}  {ms:.1f} ms")
    fd_direct = frechet_distance(mu_r, sigma_r, scorer.mean, covariance(scorer.mean, scorer.second))
    print(f"batch FD recomputed from the state: {fd_direct:.3f}; FD(ref, ref) = "
          f"{frechet_distance(mu_r, sigma_r, mu_r, sigma_r):.2e}")


if __name__ == "__main__":
    _demo()
