"""
bench_loo.py -- the cost of one leave-one-out FID reward step (fid.LooFID) against recomputing every Frechet
distance from scratch, in the same run. A section for bench.py (the lead moves it there).

    python bench_loo.py                        # d = 2048, B = 32, reps = 3: many minutes on a small CPU
    python bench_loo.py --d 256 --B 16         # seconds
    python bench_loo.py --baseline_reps 1      # time the slow baseline once

LooFID: one EMA update, R K R (two d x d matmuls) and B + 1 symmetric eigvalsh (fid.loo_fid). Baseline, as
metrics.py computed the distance before fid.py: for each of the B + 1 moment sets (whole batch, batch without i)
the moments and covariance from scratch and tr((S_g S_r)^(1/2)) from the general eigenvalues of S_g @ S_r.
Random features and a random full-rank PSD reference, float64; the EMA state starts full rank (a run past its
first d / B steps), so no eigenvalue is zero. Timings are medians after one untimed warm-up of LooFID (the
baseline is not warmed up: each rep is B + 1 independent eigs). Prints one JSON line per measurement, as bench.py.
Measured 2026-11-30, d = 2048, B = 32, reps = 3, on 2 cores of an "Intel(R) Xeon(R) Processor" shared with other
jobs (load 4-7): LooFID 87.5 s a step (64.8 CPU s), from scratch 904 s (649 CPU s), 10.3x; rewards agree to 5e-12.
"""
import argparse
import json
import statistics
import time

import torch

import fid


def fd_from_scratch(x_rest, state, decay, mu_r, sigma_r):
    """FD of the moments after an EMA step with the rows x_rest (n, d), the covariance via the general eig of
    S_g @ S_r (metrics.py's frechet_distance before fid.py): the naive cost of one of the B + 1 distances."""
    (w, m, M), _ = fid.ema_update(state, x_rest, decay)
    S = M - torch.outer(m, m)
    tr_covmean = torch.linalg.eigvals(S @ sigma_r).sqrt().real.sum()
    return ((m - mu_r).square().sum() + S.trace() + sigma_r.trace() - 2 * tr_covmean).item()


def naive_rewards(x, state, decay, mu_r, sigma_r):
    fd = fd_from_scratch(x, state, decay, mu_r, sigma_r)
    keep = torch.ones(len(x), dtype=torch.bool)
    out = []
    for i in range(len(x)):
        keep[i] = False
        out.append(fd_from_scratch(x[keep], state, decay, mu_r, sigma_r) - fd)
        keep[i] = True
    return torch.tensor(out, dtype=torch.float64)


def median_time(fn, reps):
    """Median wall seconds and median CPU seconds (all threads) of reps calls; on a shared machine the CPU
    seconds move less with the neighbours' load than the wall clock does."""
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def bench_loo_fid(d=2048, B=32, reps=3, baseline_reps=None, chunk=8, decay=0.95):
    """Seconds per LooFID step and per naive step at feature size d, global batch B; prints JSON lines."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    f = randn(d, d) / d ** 0.5
    sigma_r = f @ f.T + 0.1 * torch.eye(d, dtype=torch.float64)  # (d, d) full-rank PSD reference
    mu_r = randn(d)
    h = randn(4 * d, d)  # a prior EMA state: the moments of 4 d earlier images
    state = (torch.tensor(0.5, dtype=torch.float64), h.mean(0), h.T @ h / len(h))
    x = randn(B, d) + 0.3

    t0 = time.perf_counter()
    scorer = fid.LooFID(lambda feats: feats, mu_r, sigma_r, decay=decay, chunk=chunk)  # S_r^(1/2), once per run
    t_setup = time.perf_counter() - t0

    def step():  # one training step from the same prior state
        scorer.load_state_dict(dict(weight=state[0], mean=state[1], second=state[2]))
        return scorer(x, None)
    step()  # warm-up
    t_loo, c_loo, _ = median_time(step, reps)
    t_naive, c_naive, r_naive = median_time(lambda: naive_rewards(x, state, decay, mu_r, sigma_r),
                                            baseline_reps or reps)
    r = fid.loo_fid(x, state, decay, scorer.mu_r, scorer.root_r, chunk=chunk)[0]  # float64 (the scorer returns float32)
    rows = [dict(name="loo_fid_step", value=t_loo, unit="s", d=d, B=B, chunk=chunk, threads=torch.get_num_threads(),
                 baseline=t_naive, ratio=t_naive / t_loo, reps=reps, baseline_reps=baseline_reps or reps),
            dict(name="loo_fid_step_cpu", value=c_loo, unit="cpu s", baseline=c_naive, ratio=c_naive / c_loo),
            dict(name="loo_fid_setup", value=t_setup, unit="s", d=d, note="S_r^(1/2): one eigh per run"),
            dict(name="loo_fid_vs_naive_max_abs_diff", value=(r - r_naive).abs().max().item(), unit="FD",
                 reward_scale=r.abs().max().item(), batch_fd=scorer.last["fd"])]
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline_reps", type=int, default=None, help="default: --reps")
    p.add_argument("--chunk", type=int, default=8)
    a = p.parse_args()
    bench_loo_fid(a.d, a.B, a.reps, a.baseline_reps, a.chunk)
