"""
miniature.py -- the building blocks that both offline worlds share: world.py (class-to-image) and
world_t2i.py (text-to-image) build their tokenizer, quality net and discriminator, and measure their
generators, with these functions, so each world file holds only what is its own (its data, its
conditioning, its semantic rewards and judge, its report).

    python miniature.py    # smoke demo: a few distortion levels of one image and their predicted statistics

Everything here is a plain function of a world config `wc` (any dataclass with the fields it reads: world_seed,
image_size, grid, codebook_size, vq_*, quality_epochs, disc_epochs) and tensors; nothing reads a file it did
not get a path to. Images are float (B, 3, H, W) in [-1, 1] (the decoder's range) unless a docstring says uint8.
"""
import contextlib
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import save_safetensors
from cli import UserError, atomic_write, save_npz
from fid import frechet_distance, mean_cov
from safetensors.torch import load_file
from tokenizer import VQConfig, VQModel


# -----------------------------------------------------------------------------
# images as arrays: the ADM layout of .npz files, and the float range the nets read


def to_float(u8):
    """uint8 (n, H, W, 3) numpy -> float32 (n, 3, H, W) tensor in [-1, 1], the decoder's range."""
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1


def save_adm(path, images, labels):
    """The ADM evaluator's .npz layout: `arr_0` uint8 (n, H, W, 3), `arr_1` int64 class labels (n,); whole or
    not at all (a temp file renamed into place), with the mode open() would give."""
    atomic_write({path: lambda tmp: save_npz(tmp, arr_0=images, arr_1=labels)})


def load_adm(path):
    with np.load(path) as z:
        return z['arr_0'], z['arr_1']


# -----------------------------------------------------------------------------
# training helpers shared by every part


def progress(iterable, desc, total=None):
    """One tqdm bar per phase of the build, left on screen when done, so a newcomer sees where time goes."""
    return tqdm(iterable, desc=f"world: {desc}", total=total, leave=True, dynamic_ncols=True, mininterval=1)


def warmup_cosine(opt, steps):
    """Linear warm-up over the first 10% of the steps, then a cosine decay to 0."""
    warm = max(1, steps // 10)
    lr = lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))  # a factor on lr
    return torch.optim.lr_scheduler.LambdaLR(opt, lr)


def batches(n, bs, gen):
    """Shuffled index batches over n items (the last one may be short)."""
    return torch.randperm(n, generator=gen).split(bs)


def seeded(wc, part):
    """A generator for one part of the build: parts draw from separate streams, so resizing one part
    (say, the discriminator's epochs) leaves every other part as it was. Also seeds the nets' init."""
    seed = wc.world_seed * 1000 + PARTS.index(part)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


PARTS = ('vq', 'gpt', 'classifier', 'quality', 'fakes', 'discriminator', 'judge', 't5', 'detector', 'clip')


# -----------------------------------------------------------------------------
# tokenizer: tokenizer.VQModel trained with the VQ-VAE objective


def vq_config(wc):
    """LlamaGen's VQ architecture at this size: one level per halving, the last one twice as wide."""
    levels = int(math.log2(wc.image_size // wc.grid))  # downsample 4 -> ch_mult [1, 1, 2]
    mult = [1] * levels + [2]
    return VQConfig(codebook_size=wc.codebook_size, codebook_embed_dim=8, encoder_ch_mult=mult,
                    decoder_ch_mult=mult, z_channels=32, ch=wc.vq_ch)


def vq_loss(vq, x, beta=0.25):
    """VQ-VAE (van den Oord et al. 2017): |x - D(sg-straight-through(e))|^2 + |sg(z) - e|^2 + beta |z - sg(e)|^2,
    with LlamaGen's l2-normalised latents and codes. x (B, 3, H, W) -> (loss, recon mse, codes (B*h*w,))."""
    z = vq.quant_conv(vq.encoder(x))  # (B, C, h, w)
    zq, idx = vq.quantize(z)  # nearest unit codes, (B, C, h, w)
    zn = F.normalize(z, dim=1)  # the latent the codes are matched to
    codebook, commit = F.mse_loss(zq, zn.detach()), F.mse_loss(zn, zq.detach())
    zst = zn + (zq - zn).detach()  # straight-through: decoder gradients flow to the encoder
    rec = F.mse_loss(vq.decoder(vq.post_quant_conv(zst)), x)
    return rec + codebook + beta * commit, rec, idx


@torch.no_grad()
def restart_dead_codes(vq, x, used, gen):
    """Codes no latent chose lately move onto random latents of a random batch (a standard VQ fix: without
    it a small codebook ends with a third of its codes unused)."""
    z = F.normalize(vq.quant_conv(vq.encoder(x[torch.randperm(len(x), generator=gen)[:256]])), dim=1)
    z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (256*h*w, C) latents
    dead = (~used).nonzero().flatten()
    vq.quantize.embedding.weight[dead] = z[torch.randint(len(z), (len(dead),), generator=gen)]
    used.zero_()


def train_vq(wc, x, restart_every=100):
    """A VQModel fit to the training images for wc.vq_steps steps of wc.vq_batch images; dead codes restart
    every restart_every steps over the first 80% of training (the rest settles the codes that survived)."""
    gen, bs = seeded(wc, 'vq'), wc.vq_batch
    vq = VQModel(vq_config(wc))
    opt = torch.optim.Adam(vq.parameters(), lr=wc.vq_lr)
    sched = warmup_cosine(opt, wc.vq_steps)
    order = torch.cat([batches(len(x), len(x), gen)[0] for _ in range(math.ceil(wc.vq_steps * bs / len(x)))])
    used = torch.zeros(wc.codebook_size, dtype=torch.bool)
    for step in (bar := progress(range(wc.vq_steps), 'VQ tokenizer, steps')):
        loss, rec, idx = vq_loss(vq, x[order[step * bs:(step + 1) * bs]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        used[idx] = True
        if (step + 1) % restart_every == 0 and step < 0.8 * wc.vq_steps:
            restart_dead_codes(vq, x, used, gen)
        bar.set_postfix(recon_mse=f"{rec.item():.4f}", refresh=False)
    return vq.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vq, x, bs=500):
    """images (n, 3, H, W) -> codes (n, h*w) int64."""
    return torch.cat([vq.encode(x[i:i + bs]).flatten(1) for i in range(0, len(x), bs)])


@torch.no_grad()
def decode_all(vq, codes, bs=500):
    """codes (n, h*w) -> images (n, 3, H, W) clamped to [-1, 1]."""
    return torch.cat([vq.decode(codes[i:i + bs]).clamp(-1, 1) for i in range(0, len(codes), bs)])


LEVELS = 5  # level 0 = untouched, 1..4 = ever stronger


BLUR_SIGMA = (0.5, 0.75, 1.0, 1.4)  # Gaussian blur, pixels


NOISE_STD = (0.06, 0.12, 0.2, 0.3)  # additive Gaussian noise, in the [-1, 1] pixel range


BLOCK_MIX, BLOCK_STEPS = (0.3, 0.55, 0.8, 1.0), (24, 12, 7, 4)  # 2x2 block averaging, then grey levels per channel


CAST = (0.12, 0.22, 0.34, 0.5)  # colour cast: a random RGB direction of this length


def blur(x, sigma):
    r = 3
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x)
    x = F.pad(x, (r, r, r, r), mode='reflect')
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1).contiguous(), groups=3)  # rows, then columns
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1).contiguous(), groups=3)


def blocking(x, mix, steps):
    """JPEG-like blocking (2x2 blocks averaged, mixed in) and quantisation (`steps` levels per channel)."""
    blocks = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode='nearest')
    x = (1 - mix) * x + mix * blocks
    return torch.round((x + 1) / 2 * (steps - 1)) / (steps - 1) * 2 - 1


def distort(x, kind, level, gen):
    """x (B, 3, H, W) in [-1, 1]; kind (B,) in 0..3 (blur, noise, blocking, colour cast); level (B,) in
    0..LEVELS-1 -> the distorted images (B, 3, H, W), clamped to [-1, 1]. Level 0 leaves an image as it is."""
    out = x.clone()
    for lv in range(1, LEVELS):
        i = lv - 1
        for k in range(4):
            m = (kind == k) & (level == lv)
            if not m.any():
                continue
            xm = x[m]
            if k == 0:
                out[m] = blur(xm, BLUR_SIGMA[i])
            elif k == 1:
                out[m] = xm + NOISE_STD[i] * torch.randn(xm.shape, generator=gen)
            elif k == 2:
                out[m] = blocking(xm, BLOCK_MIX[i], BLOCK_STEPS[i])
            else:
                d = F.normalize(torch.randn(len(xm), 3, generator=gen), dim=1)  # (b, 3) a random cast
                out[m] = xm + CAST[i] * d[:, :, None, None]
    return out.clamp(-1, 1)


def random_distortions(x, gen):
    """Each image with a random kind and level (level 0 as often as each other) -> (images, levels (B,) int64)."""
    kind = torch.randint(4, (len(x),), generator=gen)
    level = torch.randint(LEVELS, (len(x),), generator=gen)
    return distort(x, kind, level, gen), level


def expected_level(logits):
    """The quality net's (B, LEVELS) logits -> its expected distortion level (B,), in [0, LEVELS - 1]."""
    return (logits.softmax(-1) * torch.arange(LEVELS, device=logits.device)).sum(-1)


# -----------------------------------------------------------------------------
# the small CNNs both worlds use: quality net (~ MANIQA), discriminator (~ realism judge)


def conv_stack(widths, act):
    """3x3 convs, the first at full resolution and each later one halving it: widths (3, w1, w2, ...)."""
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Conv2d(a, b, 3, 1 if i == 0 else 2, 1), act()]
    return layers


def quality_net(size):
    """world_quality's network: three 3x3 convs down to a (size/4)^2 map, then a small MLP over every position
    (blur and noise are local, a colour cast is global: the dense layer sees both) -> LEVELS logits, one per
    distortion level. Trained as a classifier over the levels (measured: it learns several times faster than
    regressing the level), scored by the expected level."""
    return nn.Sequential(*conv_stack((3, 32, 64, 96), nn.ReLU), nn.Flatten(), nn.Linear(96 * (size // 4) ** 2, 64),
                         nn.ReLU(), nn.Linear(64, LEVELS))


def discriminator(size):
    """world_real's network: narrow 3x3 convs down to a 2x2 map, then a dense layer over every position (a
    malformed shape is a matter of where things are, which global pooling would discard) -> one real-vs-generated
    logit. Narrow on purpose: measured, more images and steps buy more held-out AUC than more width does."""
    n = int(math.log2(size // 2))  # stride-2 convs down to 2x2
    widths = (3,) + tuple(16 * 2 ** i for i in range(n + 1))  # 16 px: (3, 16, 32, 64, 128)
    return nn.Sequential(*conv_stack(widths, lambda: nn.LeakyReLU(0.2)), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(widths[-1] * 4, 1))


def fit(net, n, batch_fn, loss_fn, epochs, gen, desc, lr=2e-3, bs=128, weight_decay=0.0):
    """Adam(W) with warm-up and cosine over `epochs` passes of n items; batch_fn(indices) -> (inputs, targets)
    (so the quality net can distort each batch afresh), scored by loss_fn(net(inputs), targets); with loss_fn None,
    batch_fn(indices) returns the batch's loss itself (a contrastive loss over two inputs). Returns the network
    frozen in eval mode."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = warmup_cosine(opt, epochs * math.ceil(n / bs))
    net.train()
    for _ in (bar := progress(range(epochs), f"{desc}, epochs")):
        for b in batches(n, bs, gen):
            out = batch_fn(b)
            loss = out if loss_fn is None else loss_fn(net(out[0]).squeeze(-1), out[1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def predict(net, x, bs=500):
    return torch.cat([net(x[i:i + bs]) for i in range(0, len(x), bs)])


# -----------------------------------------------------------------------------
# saving and loading the nets and a world's summary; the two rewards trained the same way in both worlds


def save_net(net, path):
    save_safetensors({k: v.contiguous() for k, v in net.state_dict().items()}, path)


def load_net(path, net):
    net.load_state_dict(load_file(path))
    return net.eval().requires_grad_(False)


def read_summary(d):
    """world.json of the world in d; a torn or unreadable one is one sentence naming it and what to do."""
    path = os.path.join(d, 'world.json')
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); delete {d} and the world is rebuilt on the next run") from None


class WorldReward(nn.Module):
    """One learned reward of a world as a rewards.py scorer: images (B, 3, H, W) in [-1, 1] at the world's size,
    conditions (B class ids for 'class'; unread otherwise) -> (B,) float32 in [0, 1], one forward per batch on the
    images' device. kind 'class': P(target class); 'quality': 1 - expected distortion level / 4; 'real': P(real)."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    @torch.no_grad()
    def forward(self, images, conditions):
        self.net.to(images.device)
        out = self.net(images.float().clamp(-1, 1))  # trained on [-1, 1] pixels
        if self.kind == 'real':
            return torch.sigmoid(out[:, 0])
        if self.kind == 'quality':
            return 1 - expected_level(out) / (LEVELS - 1)
        ids = torch.as_tensor([int(c) for c in conditions], device=images.device)
        return out.softmax(-1).gather(1, ids[:, None])[:, 0]


def train_quality(wc, x):
    """world_quality: tell the distortion level of train images distorted afresh in every batch."""
    gen = seeded(wc, 'quality')
    return fit(quality_net(wc.image_size), len(x), lambda b: random_distortions(x[b], gen), F.cross_entropy,
               wc.quality_epochs, gen, 'quality net')


def train_discriminator(wc, real, fakes):
    """world_real: VQ reconstructions of train images (real through the same decoder) vs base samples."""
    gen = seeded(wc, 'discriminator')
    xs, ys = torch.cat([real, fakes]), torch.cat([torch.ones(len(real)), torch.zeros(len(fakes))])
    return fit(discriminator(wc.image_size), len(xs), lambda b: (xs[b], ys[b]), F.binary_cross_entropy_with_logits,
               wc.disc_epochs, gen, 'discriminator', weight_decay=0.05)


# -----------------------------------------------------------------------------
# one thread


# The world's CPU work runs on one thread, whatever the machine: float sums then happen in one order, so the
# demo prints the same numbers on any core count. Measured on the old world: built and tuned with 2 threads
# instead of 1, the same seeds gave a tuned held-out accuracy of 0.656 instead of 0.826 (RL amplifies
# rounding differences, and the world itself is trained on them). Another CPU model rounds differently too:
# that is why the README gives the spread over seeds and worlds, not one run's digits.
THREADS = 1


@contextlib.contextmanager
def fixed_threads(threads=THREADS):
    """Run the block on exactly `threads` torch threads (the count, not the machine's cores, fixes the order of
    float sums; world_t2i runs on 2), then restore the caller's count."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# statistics: ranks, Spearman, ROC AUC, FID, diversity, KL to the base


BOOTSTRAP = 20  # resamples behind the mini-FID's standard error (each one FID in the judge's 64-d features)
MEASURE_SEED = 1234  # the sampling seed of every measured generator (base, tuned, control: the same images' seeds)


def ranks(x):
    """Ranks 1..n of x (n,), ties sharing the mean of their positions (as scipy.stats.rankdata)."""
    x = x.double()
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    _, tie = torch.unique(x, return_inverse=True)  # tie[i]: the group of values equal to x[i]
    mean = torch.zeros(int(tie.max()) + 1, dtype=x.dtype).index_add_(0, tie, r) / torch.bincount(tie)
    return mean[tie]


def spearman(a, b):
    """Spearman's rank correlation: Pearson's on the (tie-averaged) ranks."""
    return torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1].item()


def roc_auc(pos, neg):
    """ROC AUC = P(a positive scores above a negative), ties counting half: Mann-Whitney U / (n_pos n_neg)."""
    r = ranks(torch.cat([pos, neg]))[:len(pos)]
    return ((r.sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))).item()


def fid_of(f1, f2):
    """FID's formula (fid.frechet_distance) between two feature sets (n, d)."""
    return frechet_distance(*mean_cov(f1), *mean_cov(f2))


def pairwise_mean(x, labels, fn):
    """Mean of fn(a, b) over all pairs of distinct rows with the same label (within-class diversity)."""
    vals = []
    for c in labels.unique():
        g = x[labels == c]
        m = fn(g[:, None], g[None])  # (n, n)
        vals.append(m.sum() / (len(g) * (len(g) - 1)))  # the diagonal is 0
    return torch.stack(vals).mean().item()


def fid_and_se(ref, f):
    """FID between reference features ref (n, d) and samples' features f (m, d), and its standard error: the
    spread of the FID over BOOTSTRAP resamples of f, drawn with MEASURE_SEED (the same features, the same s.e.)."""
    gen = torch.Generator().manual_seed(MEASURE_SEED)
    boot = [fid_of(ref, f[torch.randint(len(f), (len(f),), generator=gen)]) for _ in range(BOOTSTRAP)]
    return fid_of(ref, f), float(np.std(boot, ddof=1))


def diversity_and_se(images, labels):
    """Within-label pixel diversity of images (n, 3, H, W): the RMS distance between two images of one label,
    averaged per label, then over labels (= pairwise_mean), and its standard error over labels."""
    rms = lambda a, b: (a - b).pow(2).mean(-1).sqrt()
    per = torch.tensor([pairwise_mean(images[labels == c].flatten(1), labels[labels == c], rms)
                        for c in labels.unique()])
    return per.mean().item(), (per.std() / math.sqrt(len(per))).item()


def token_stats(tokens, labels):
    """Token-level diversity: distinct sequences, within-class Hamming distance, top-token share."""
    counts = torch.bincount(tokens.flatten())
    return dict(distinct=len(torch.unique(tokens, dim=0)) / len(tokens),
                token_hamming=pairwise_mean(tokens, labels, lambda a, b: (a != b).float().mean(-1)),
                top_token_share=(counts.max() / tokens.numel()).item())


@torch.no_grad()
def model_stats(gpt, base, tokens, labels, bs=500):
    """Per-token entropy of the model on its own samples and KL(model || base) per token (nats), from
    the conditional next-token distributions along the sampled prefixes."""
    ent, kl = [], []
    for i in range(0, len(tokens), bs):
        t, y = tokens[i:i + bs], labels[i:i + bs]
        lp, lq = gpt(t[:, :-1], y).log_softmax(-1), base(t[:, :-1], y).log_softmax(-1)  # (b, N, V)
        ent.append(-(lp.exp() * lp).sum(-1).flatten())
        kl.append((lp.exp() * (lp - lq)).sum(-1).flatten())
    return dict(entropy=torch.cat(ent).mean().item(), kl_to_base=torch.cat(kl).mean().item())


# -----------------------------------------------------------------------------
# appended for the text-to-image world (world_t2i.py)


def discriminator_any(size):
    """discriminator() for a side that is not a power of 2: the same stride-2 convs, ending on a ceil(size / 2^n)
    square map (24 px: 3x3) before the dense layer; at 16 px it is discriminator(16) layer for layer."""
    n = int(math.log2(size // 2))
    widths = (3,) + tuple(16 * 2 ** i for i in range(n + 1))
    cells = math.ceil(size / 2 ** n) ** 2
    return nn.Sequential(*conv_stack(widths, lambda: nn.LeakyReLU(0.2)), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(widths[-1] * cells, 1))


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    # a smoke demo: one image at every distortion level, and the statistics on a toy case
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 16, 16, generator=gen).mul(2).sub(1).repeat(LEVELS * 4, 1, 1, 1)
    kind, level = torch.arange(4).repeat_interleave(LEVELS), torch.arange(LEVELS).repeat(4)
    d = distort(x, kind, level, gen)
    rms = (d - x).pow(2).flatten(1).mean(1).sqrt().view(4, LEVELS)
    for k, name in enumerate(('blur', 'noise', 'blocking', 'colour cast')):
        print(f"{name:12s} RMS change per level:", ' '.join(f"{v:.3f}" for v in rms[k].tolist()))
    a, b = torch.randn(200, 8, generator=gen), torch.randn(200, 8, generator=gen)
    print(f"spearman(a, a^3) = {spearman(a[:, 0], a[:, 0] ** 3):.3f} (1 by definition); "
          f"ROC AUC of N(1,1) vs N(0,1) = {roc_auc(a[:, 0] + 1, b[:, 0]):.3f} (about 0.76); "
          f"FID of two draws of N(0, I_8) = {fid_of(a, b):.3f} (near 0)")
