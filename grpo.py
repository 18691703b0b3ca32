"""
GRPO math for autoregressive image generators: pure functions, one per equation.
Run `python grpo.py` for a toy demo. Equations follow DeepSeekMath GRPO (arXiv 2402.03300)
as written in huggingface/trl grpo_trainer.py, applied as in AR-GRPO (arXiv 2508.06924):

    A_i   = (r_i - mean_g r) / (std_g r + eps)                 group-relative advantage
    rho   = exp(logp - logp_old)                               per-token ratio
    L_pg  = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
    k3    = exp(ref - logp) - (ref - logp) - 1                 KL(pi || pi_ref) estimator, >= 0
    L     = mean over tokens of (L_pg + beta k3)  [- c H, H = mean per-token entropy, c adapted toward H*]

How this differs from textbook PPO: no value function or critic (the baseline is the mean
reward of the G images drawn for the same condition), and the KL to a frozen reference
sits in the loss with the k3 estimator, not in the reward.
How it differs from the paper's code, which makes one update per rollout: there
logp_old = logp.detach(), so rho == 1, clipping never acts and the gradient is
-A grad(logp), REINFORCE with a group baseline plus KL; and it takes log-probs from the
conditional branch while sampling with CFG, so the update is slightly off-policy. Two options
it lacks, both off by default: num_iterations > 1 updates per rollout (the train.py loop;
then rho and the clip really act) and logprob_mode='guided' (log-probs under the CFG mixture
that drew the tokens: on-policy). Log-probs use the full softmax, ignoring top-k, as TRL does.
"""
import math

import torch
from torch.utils.checkpoint import checkpoint


def group_advantages(rewards, group_size, scale_std=True, eps=1e-4):
    """A_i = (r_i - mean_g) / (std_g + eps), or r_i - mean_g when scale_std=False.

    rewards (N,) group-major: rows g*G .. g*G+G-1 share one condition. std_g is the sample
    (Bessel-corrected) std, torch.std, as in TRL. A flat group gets exactly zero advantages.
    A non-finite reward (a scorer that failed on one image) gets zero advantage and is left
    out of its group's mean and std; a group with fewer than two finite rewards gets zeros.
    """
    if group_size < 2 or rewards.numel() % group_size != 0:
        raise ValueError(f"need group_size >= 2 dividing the number of rewards "
                         f"({rewards.numel()}), got group_size={group_size}")
    r = rewards.float().reshape(-1, group_size)  # (num_groups, G)
    finite = torch.isfinite(r)
    if not finite.all():  # rare (one host sync); all-finite input keeps the textbook ops below, bit for bit
        return _masked_advantages(r, finite, scale_std, eps).view(-1)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    # flat group: its float mean can be off by an ulp (8 x 0.1) and eps=0 gives 0/0, so zero it
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)  # (num_groups, 1)
    return adv.masked_fill(flat, 0.0).view(-1)  # (N,)


def _masked_advantages(r, finite, scale_std, eps):
    """group_advantages over the finite entries of r (num_groups, G) only; zeros elsewhere."""
    n = finite.sum(dim=1, keepdim=True)  # (num_groups, 1) finite rewards per group
    x = torch.where(finite, r, 0.0)
    dev = torch.where(finite, x - x.sum(dim=1, keepdim=True) / n.clamp(min=1), 0.0)  # r_i - mean_g
    adv = dev
    if scale_std:  # sample std over the n finite rewards
        adv = dev / ((dev ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt().add(eps)
    hi = torch.where(finite, r, -math.inf).amax(dim=1, keepdim=True)
    flat = hi == torch.where(finite, r, math.inf).amin(dim=1, keepdim=True)  # flat among the finite ones
    return adv.masked_fill(flat | (n < 2) | ~finite, 0.0)


def token_logprobs(logits, tokens, temperature=1.0):
    """log p(token) = x[token] - logsumexp(x), x = logits / temperature, in float32.

    logits (B, T, V) any float dtype, tokens (B, T) int64 -> (B, T) float32.
    Gather + logsumexp instead of log_softmax: with V=16384, T=576 the only full-size
    tensor kept is the float32 copy of the logits, not a second (B, T, V) of log-probs.
    """
    x = logits.float()  # LlamaGen quirk: logits in float32 (a copy only if bf16/fp16)
    if temperature != 1.0:
        x = x / temperature
    picked = x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(x, dim=-1)  # (B, T)


def cfg_mix(cond_logits, uncond_logits, scale):
    """x = uncond + scale * (cond - uncond); scale = 1 gives cond.

    LlamaGen quirk: CFG on raw logits, before temperature and softmax."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


def policy_logprobs(cond_logits, uncond_logits, tokens, mode, cfg_scale, temperature=1.0):
    """log pi(token), (B, T). 'cond' (paper): log softmax(cond / t), uncond may be None.

    'guided': log softmax(cfg_mix(cond, uncond, s) / t), the distribution the tokens were
    drawn from; gradients reach both halves (cond with weight s, uncond with 1 - s).
    """
    if mode == "cond":
        return token_logprobs(cond_logits, tokens, temperature)
    if mode == "guided":
        if uncond_logits is None:
            raise ValueError("logprob_mode='guided' needs the unconditional logits; pass them or use 'cond'")
        return token_logprobs(cfg_mix(cond_logits, uncond_logits, cfg_scale), tokens, temperature)
    raise ValueError(f"unknown logprob_mode {mode!r}; use 'cond' or 'guided'")


def clipped_surrogate(logp, logp_old, advantages, eps_low=0.2, eps_high=0.2):
    """L_pg = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = exp(logp - logp_old).

    logp, logp_old (B, T); advantages (B,) broadcast over the tokens of each image.
    Where the clipped branch wins, the loss is constant in logp and its gradient is zero.
    """
    A = advantages.unsqueeze(1)  # (B, 1)
    ratio = torch.exp(logp - logp_old)  # (B, T)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    return -torch.minimum(ratio * A, clipped * A)  # (B, T)


def kl_k3(logp, ref_logp):
    """k3 = exp(ref - logp) - (ref - logp) - 1, unbiased for KL(pi || pi_ref) when tokens ~ pi.

    (B, T) -> (B, T). Written as expm1(d) - d: same value, but never negative in floating
    point (expm1(d) >= d and rounding is monotone), where exp(d) - d - 1 can dip below 0.
    """
    d = ref_logp - logp
    return torch.expm1(d) - d  # (B, T)


def token_entropy(logits):
    """H = logsumexp(x) - sum_v softmax(x)_v x_v, x = float32 logits. (B, T, V) -> (B, T).

    A diagnostic (call under torch.no_grad()); one image x (T, V) at a time keeps the softmax
    temporaries small. .float() is free for LlamaGen's logits, already float32.
    """
    return torch.stack([torch.logsumexp(x, -1) - (x.softmax(-1) * x).sum(-1) for x in logits.float()])


def mean_token_entropy(logits, temperature=1.0):
    """H = mean over b, t of logsumexp(z) - sum_v softmax(z)_v z_v, z = logits / temperature; differentiable.

    logits (B, T, V): the policy's full-vocabulary logits along the sampled sequences, the ones token_logprobs
    sees (cond, or cfg_mix(cond, uncond, s) under logprob_mode='guided') -> 0-d float32. A bonus in the loss:
    L = L_grpo - c H. dH/dz_v = -p_v (log p_v + H_bt). Why checkpointed image by image: the plain expression
    keeps softmax(z) (and z, a copy when t != 1) for backward, one or two more (B, T, V) float32 tensors
    (B x 38 MB at T = 576, V = 16384); here autograd keeps only the logits themselves, which the log-probs
    keep anyway, and backward recomputes one image's (T, V) softmax at a time.
    """
    def per_image(x):  # (T, V) -> (T,)
        z = x.float() / temperature if temperature != 1.0 else x.float()
        return torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)
    return torch.stack([checkpoint(per_image, x, use_reentrant=False) for x in logits]).mean()


def adapt_entropy_coef(coef, entropy, target, lr):
    """c_(k+1) = max(0, c_k + lr (H* - H_k)): one projected dual-ascent step on the constraint H >= H*.

    Adaptive, not fixed, because the right fixed c changes during a run: GRPO lowers the policy's entropy step
    by step (fewer modes: the collapse a distribution-level reward fights), a c strong enough to stop that early
    keeps raising entropy, toward noise tokens (log V = 9.7 nats), once the rewards saturate. A target says how
    much entropy to keep, in nats (train.py logs `entropy`; e.g. a fraction of the base model's); c grows while
    H < H* and falls back to exactly 0 once the constraint is slack. SAC's automatic temperature (arXiv
    1812.05905) with an additive step instead of log c, so c can start at and return to 0. lr = 0: fixed c.
    H is the step's detached mean entropy, averaged over ranks, so every rank holds the same c (checkpoint it).
    """
    return max(0.0, coef + lr * (target - entropy))


def grpo_loss(logp, logp_old, advantages, ref_logp=None, beta=0.0, eps_low=0.2, eps_high=0.2):
    """L = mean over all B*T tokens of (L_pg + beta * k3); returns (loss, stats).

    Every image has the same number of tokens, so the token mean equals TRL's per-sequence
    mean then batch mean. stats are 0-d detached tensors (no GPU sync here; call .item()
    when logging): pg_loss, kl (mean k3, reported whenever ref_logp is given, 0 otherwise),
    clip_frac (TRL's definition: fraction of tokens where the clip binds, i.e.
    rho > 1 + eps_high with A > 0 or rho < 1 - eps_low with A < 0), ratio_mean/min/max.
    """
    pg = clipped_surrogate(logp, logp_old, advantages, eps_low, eps_high)  # (B, T)
    k3 = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)  # (B, T)
    # beta == 0 drops the term outright, so an overflowing k3 cannot leak NaN into the grads
    loss = (pg + beta * k3).mean() if beta != 0.0 else pg.mean()
    with torch.no_grad():
        ratio = torch.exp(logp - logp_old)  # (B, T)
        A = advantages.unsqueeze(1)  # (B, 1)
        clip = ((ratio > 1 + eps_high) & (A > 0)) | ((ratio < 1 - eps_low) & (A < 0))
        stats = dict(pg_loss=pg.mean(), kl=k3.mean(), clip_frac=clip.float().mean(),
                     ratio_mean=ratio.mean(), ratio_min=ratio.min(), ratio_max=ratio.max())
    return loss, stats


if __name__ == "__main__":
    torch.manual_seed(0)
    # two conditions, G=4 images each; the second group is flat -> zeros, not NaN
    rewards = torch.tensor([0.2, 0.5, 0.9, 0.4, 0.7, 0.7, 0.7, 0.7])
    adv = group_advantages(rewards, 4)  # (8,)
    print("advantages ", [round(a, 4) for a in adv.tolist()])
    nan = rewards.clone().index_fill_(0, torch.tensor([2]), float("nan"))  # one failed score in group 1
    print("one NaN    ", [round(a, 4) for a in group_advantages(nan, 4).tolist()])
    print("no std     ", [round(a, 4) for a in group_advantages(rewards, 4, scale_std=False).tolist()])
    # one loss on random logits: mu = 1 (rho == 1, paper) and a stale logp_old (mu > 1)
    B, T, V = 8, 16, 32
    logits = torch.randn(B, T, V, requires_grad=True)
    tokens = torch.distributions.Categorical(logits=logits.detach()).sample()  # (B, T)
    logp = token_logprobs(logits, tokens)
    ref = logp.detach() + 0.1 * torch.randn(B, T)
    for name, old in [("mu=1", logp.detach()), ("stale", logp.detach() + 0.3 * torch.randn(B, T))]:
        loss, stats = grpo_loss(logp, old, adv, ref_logp=ref, beta=0.04)
        print(f"{name:6s} loss {loss.item():+.4f} " + " ".join(f"{k} {v.item():.4f}" for k, v in stats.items()))
    H = mean_token_entropy(logits)  # differentiable: the bonus L - c H
    print(f"entropy {H.item():.4f} (uniform: {math.log(V):.4f}); c after one step toward H* = 3.5: "
          f"{adapt_entropy_coef(0.01, H.item(), 3.5, lr=0.05):.4f}")
