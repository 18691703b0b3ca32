"""
world.py -- a miniature of AR-GRPO's world that a laptop CPU builds in minutes: data, tokenizer, generator,
the paper's three reward dimensions as learned nets, and a held-out judge, all trained here from one seed
(nanoGPT's prepare.py analogue).

    python world.py                                # smoke demo: the tests' tiny world (seconds), its summary
    python world.py --preset demo                  # build (or load) the demo world and print its summary
    python world.py --preset demo --world_seed 1   # another world: other images, other nets, same recipe
    python train.py --preset demo                  # the headline: GRPO in this world, base vs tuned vs control
    python study.py --preset demo                  # the README's table: 3 GRPO seeds x 2 worlds

What each part stands for in the paper (AR-GRPO, arXiv 2508.06924, on ImageNet with LlamaGen):
  data           10 procedural classes (5 shapes x warm/cool colour) with random position, size, hue
                 and background; a train split and a held-out split                      ~ ImageNet
  tokenizer      tokenizer.VQModel, 4x4 tokens per image, VQ-VAE objective               ~ LlamaGen VQ-16
  generator      model.GPT c2i pretrained by next-token cross-entropy, class dropout     ~ LlamaGen c2i
  world_class    reward, semantic fidelity: P(target class) from a CNN on the train split ~ CLIP
  world_quality  reward, perceptual quality: a no-reference net trained, as IQA models are, to predict how
                 strongly a train image was distorted (blur, noise, blocking, colour cast) ~ MANIQA
  world_real     reward, realism: P(real) from a discriminator of VQ-reconstructed train images vs base
                 samples                                                                 ~ the VLM realism judge
  loo_fid        beyond the paper (fid.LooFID): a leave-one-out FID reward in the reward classifier's features
                 against the train split's statistics                                     ~ Inception FID
  judge          a classifier of another architecture trained on the held-out split, never a reward: class
                 accuracy of samples and a mini-FID in its feature space                 ~ the paper's evaluation
How it departs: the VQ has only L2 reconstruction + codebook + commitment losses (LlamaGen adds perceptual
and GAN losses); the reward classifier and the judge also see VQ reconstructions, as the discriminator's
real images are reconstructions, so that they judge a decoded sample's content rather than the tokenizer;
the FID features come from the small judge, not Inception. Every part is cached under
out/world/<hash of the WorldConfig>: a changed config builds a new world (bump VERSION when the code
changes what a config builds). All of it runs on one thread (THREADS), so a machine prints the same
numbers on any core count; another CPU rounds differently and prints other digits (README).
"""
import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tqdm import tqdm

from checkpoint import load_gpt, load_vq, save_gpt, save_safetensors, save_vq
from cli import UserError, atomic_write, check_range, check_writable_dir, save_npz
from fid import LooFID, frechet_distance, mean_cov
from model import GPT, config_for, generate
from plots import class_rows, plot_runs
from rewards import parse_spec
from tokenizer import VQConfig, VQModel, to_uint8

VERSION = 4  # bump when the world's code changes what a config builds


@dataclass
class WorldConfig:
    preset: str = 'tiny'  # a WORLD_PRESETS name; its values are defaults the flags override
    world_seed: int = 0  # everything random in the world derives from it (train.py --world_seed picks it)
    image_size: int = 16  # pixels per side
    grid: int = 4  # tokens per side; the VQ downsamples by image_size / grid (a power of 2)
    n_train: int = 2000  # training images: VQ, generator and the three reward nets
    n_heldout: int = 1000  # held-out images: the judge, the mini-FID reference, every held-out figure
    codebook_size: int = 128  # VQ codes = the generator's vocabulary
    vq_ch: int = 32  # VQ base width (GroupNorm(32) needs a multiple of 32)
    vq_steps: int = 100  # VQ optimizer steps (its convolutions are the slow part of the build on a CPU)
    vq_batch: int = 16  # images per VQ step (16 reconstructs better than 32 for the same compute, measured)
    vq_lr: float = 2e-3  # VQ Adam learning rate (warm-up, then cosine to 0)
    gpt_layers: int = 2  # generator depth
    gpt_dim: int = 64  # generator width
    gpt_epochs: int = 4  # pretraining passes; few on purpose: a decent but imperfect base
    classifier_epochs: int = 3  # epochs of the reward classifier (train images and their reconstructions)
    quality_epochs: int = 4  # epochs of the quality net (each pass distorts the images afresh)
    fakes: int = 500  # base samples the discriminator learns from (n_heldout more measure its AUC)
    disc_epochs: int = 3  # discriminator epochs
    judge_epochs: int = 10  # epochs of the held-out judge (held-out images and their reconstructions)
    cfg_scale: float = 1.0  # CFG of the discriminator's base samples (= the demo's sampling CFG; 1 = none)
    eval_per_class: int = 20  # samples per class when a generator is measured (base vs tuned)
    root: str = 'out/world'  # cache root; the world lives in root/<hash>

    def validate(self):
        """Every value checked before anything is built (cli.parse_config calls it). Raises UserError."""
        check_range(self, 'world_seed', lo=0)
        check_range(self, 'image_size grid n_train n_heldout vq_steps vq_batch gpt_layers gpt_epochs '
                          'classifier_epochs quality_epochs fakes disc_epochs judge_epochs eval_per_class', lo=1)
        check_range(self, 'codebook_size', lo=2)
        check_range(self, 'vq_lr', lo=0, lo_open=True)
        check_range(self, 'cfg_scale', lo=0)
        ds = self.image_size // self.grid
        if self.image_size % self.grid or ds < 2 or ds & (ds - 1):
            raise UserError(f"--image_size {self.image_size} must be a power-of-2 multiple (2 or more) of --grid "
                            f"{self.grid}, the VQ's downsampling; e.g. --image_size 16 --grid 4")
        if self.vq_ch % 32:
            raise UserError(f"--vq_ch must be a multiple of 32 (the VQ's GroupNorm has 32 groups), got {self.vq_ch}")
        if self.gpt_dim % 16:  # 4 heads, each split into row and column halves of rotation pairs (2D RoPE)
            raise UserError(f"--gpt_dim must be a multiple of 16 (4 heads of 2D RoPE), got {self.gpt_dim}")
        if min(self.fakes, self.n_train, self.n_heldout) < NUM_CLASSES:
            raise UserError(f"--n_train, --n_heldout and --fakes must be at least {NUM_CLASSES}, one per class")
        if self.fakes > self.n_train:
            raise UserError(f"--fakes {self.fakes} must be at most --n_train {self.n_train}: the discriminator pairs "
                            f"each base sample with a reconstructed train image")
        check_writable_dir(self.root, '--root')


WORLD_PRESETS = {
    # the tests and the smoke demo: 8x8 px, every part trained a little (seconds)
    'tiny': dict(image_size=8, n_train=2000, n_heldout=1000, codebook_size=64, vq_steps=120, vq_lr=3e-3,
                 gpt_epochs=4, classifier_epochs=10, quality_epochs=8, fakes=2000, disc_epochs=20, judge_epochs=16,
                 eval_per_class=50),
    # python train.py --preset demo: each size chosen by measurement (README), about 4 1/2 minutes of one core
    'demo': dict(n_train=8000, n_heldout=2000, codebook_size=256, vq_steps=750, gpt_layers=4, gpt_dim=96,
                 gpt_epochs=5, classifier_epochs=3, quality_epochs=6, fakes=8000, disc_epochs=10, judge_epochs=10,
                 eval_per_class=100),
}
NOT_KEYED = {'preset', 'root', 'eval_per_class'}  # fields that do not change what is built

# -----------------------------------------------------------------------------
# data: procedural class-conditional images

SHAPES = ('disk', 'square', 'triangle', 'ring', 'cross')  # class c: SHAPES[c % 5] in colour COLOURS[c // 5]
COLOURS = ('warm', 'cool')
NUM_CLASSES = len(SHAPES) * len(COLOURS)
CLASS_NAMES = [f"{COLOURS[c // len(SHAPES)]} {SHAPES[c % len(SHAPES)]}" for c in range(NUM_CLASSES)]


def hsv(h, s, v):  # floats in [0, 1] -> an RGB tuple of ints
    import colorsys
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1, s, v))


def draw_image(c, rng, size=16, ss=4):
    """One (size, size, 3) uint8 image of class c, drawn at ss x the size and box-filtered down.

    The class is the shape (one of 5) and its colour family (red-orange or blue); the position, the size,
    the exact hue and brightness, and the background (a dim, low-saturation gradient) vary."""
    S = size * ss
    bg = np.array([hsv(rng.random(), 0.3 * rng.random(), 0.1 + 0.35 * rng.random()) for _ in range(2)], float)
    t = np.linspace(0, 1, S)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, S)[None, :, None]
    img = Image.fromarray((bg[0] * (1 - t) + bg[1] * t + np.zeros((S, S, 3))).astype(np.uint8))
    d = ImageDraw.Draw(img)
    hue = rng.uniform(-0.05, 0.08) if c // len(SHAPES) == 0 else rng.uniform(0.52, 0.66)
    col = hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0))
    r = rng.uniform(0.24, 0.38) * S  # half the shape's extent
    cx, cy = rng.uniform(r + ss / 2, S - r - ss / 2, 2)  # half a pixel from the edge, at least
    box = [cx - r, cy - r, cx + r, cy + r]
    shape = SHAPES[c % len(SHAPES)]
    if shape == 'disk':
        d.ellipse(box, fill=col)
    elif shape == 'square':
        d.rectangle(box, fill=col)
    elif shape == 'triangle':
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=col)
    elif shape == 'ring':
        d.ellipse(box, outline=col, width=max(ss, int(0.4 * r)))
    else:  # cross
        w = 0.36 * r
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    return np.asarray(img.resize((size, size), Image.BOX))


def make_split(n, seed, size):
    """n images with balanced labels from the random stream `seed` (an int or a list of ints) ->
    (images (n, size, size, 3) uint8, labels (n,) int64), as numpy arrays: the ADM layout."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    return np.stack([draw_image(int(c), rng, size) for c in labels]), labels.astype(np.int64)


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


PARTS = ('vq', 'gpt', 'classifier', 'quality', 'fakes', 'discriminator', 'judge')

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

# -----------------------------------------------------------------------------
# generator: model.GPT pretrained by next-token cross-entropy, nanoGPT style


def train_gpt(wc, codes, labels, bs=64):
    """A c2i GPT on the tokenised training set. Class dropout as LlamaGen trains it: 10% of the labels
    become the null class (row num_classes), which is what makes CFG possible. Batches of 64 sequences:
    measured, they reach a lower loss than 128 at a higher learning rate for the same compute."""
    gen = seeded(wc, 'gpt')
    cfg = config_for(None, wc.image_size, wc.image_size // wc.grid, n_layer=wc.gpt_layers, n_head=4,
                     dim=wc.gpt_dim, vocab_size=wc.codebook_size, num_classes=NUM_CLASSES, class_dropout_prob=0.1)
    gpt = GPT(cfg).train()  # dropout on while pretraining, as LlamaGen
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3, weight_decay=0.05, betas=(0.9, 0.95))
    sched = warmup_cosine(opt, wc.gpt_epochs * math.ceil(len(codes) / bs))
    for epoch in (bar := progress(range(wc.gpt_epochs), 'generator, epochs')):
        for b in batches(len(codes), bs, gen):
            y = labels[b].clone()
            y[torch.rand(len(b), generator=gen) < cfg.class_dropout_prob] = NUM_CLASSES  # class dropout
            logits = gpt(codes[b][:, :-1], y)  # (B, N, V): logits[:, j] predicts token j
            loss = F.cross_entropy(logits.flatten(0, 1), codes[b].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return gpt.eval().requires_grad_(False)


@torch.no_grad()
def sample_tokens(gpt, labels, cfg_scale, seed, bs=500):
    """Tokens (n, N) for the given labels, drawn in batches from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([generate(gpt, labels[i:i + bs], cfg_scale=cfg_scale, generator=gen)[0]
                      for i in range(0, len(labels), bs)])

# -----------------------------------------------------------------------------
# distortions: the quality net's training data, as IQA datasets (KADID, TID) grade synthetic distortions

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
# the small CNNs: reward classifier (~ CLIP), quality net (~ MANIQA), discriminator (~ realism judge), judge


def conv_stack(widths, act):
    """3x3 convs, the first at full resolution and each later one halving it: widths (3, w1, w2, ...)."""
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Conv2d(a, b, 3, 1 if i == 0 else 2, 1), act()]
    return layers


class RewardClassifier(nn.Module):
    """world_class's network: four 3x3 convs (each after the first halves the resolution), global average
    pool -> 128 features, 10 logits. features() is also the feature space of a distribution-level reward over
    the train split (a later issue)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*conv_stack((3, 32, 64, 128, 128), nn.GELU), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, x):  # (B, 3, H, W) in [-1, 1] -> (B, 128) penultimate features
        return self.body(x)

    def forward(self, x):  # -> (B, 10) logits
        return self.head(self.body(x))


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


class Judge(nn.Module):
    """The held-out judge, another architecture on purpose: 5x5 conv + max-pooling + a dense layer whose
    64 features are the mini-FID's space (as Inception's pool features are FID's)."""

    def __init__(self, size=16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 48, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(48, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(96 * (size // 4) ** 2, 64), nn.ReLU())
        self.head = nn.Linear(64, NUM_CLASSES)

    def features(self, x):  # (B, 3, H, W) in [-1, 1] -> (B, 64)
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def fit(net, n, batch_fn, loss_fn, epochs, gen, desc, lr=2e-3, bs=128, weight_decay=0.0):
    """Adam(W) with warm-up and cosine over `epochs` passes of n items; batch_fn(indices) -> (inputs, targets)
    (so the quality net can distort each batch afresh). Returns the network frozen in eval mode."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = warmup_cosine(opt, epochs * math.ceil(n / bs))
    net.train()
    for _ in (bar := progress(range(epochs), f"{desc}, epochs")):
        for b in batches(n, bs, gen):
            inputs, targets = batch_fn(b)
            loss = loss_fn(net(inputs).squeeze(-1), targets)
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
# the world's rewards as rewards.py scorers: scorer(images, conditions) -> Tensor[B]


class WorldReward(nn.Module):
    """One learned reward of the world: images (B, 3, H, W) in [-1, 1] at the world's size, conditions B class
    ids -> (B,) float32 in [0, 1], one forward per batch on the images' device.
    kind 'class': P(target class); 'quality': 1 - expected distortion level / 4; 'real': P(real)."""

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


INSTANCE = ('world_class', 'world_quality', 'world_real')  # the paper's three dimensions, one image at a time
REWARDS = INSTANCE + ('loo_fid',)  # every reward a world hands to rewards.build_reward, by its --rewards name
NETS = dict(world_class=('classifier', 'class'), world_quality=('quality', 'quality'),
            world_real=('discriminator', 'real'))  # name -> (weights file, WorldReward kind)


def reward_scorers(world, spec='world_class=1,world_quality=1,world_real=1', fid_decay=0.9):
    """{name: scorer} of the world's rewards that the reward spec names, to hand to rewards.build_reward.
    world: a built world's directory (or a preset name: world seed 0). loo_fid here is fid.LooFID in the reward
    classifier's penultimate features (128-d) against the train split's statistics: never the held-out split,
    which the judge owns."""
    d = resolve(world)
    if not os.path.isfile(os.path.join(d, 'world.json')):
        raise FileNotFoundError(f"the world {world!r} is not built ({d}); run python world.py --preset demo")
    size = read_summary(d)['config']['image_size']
    make = dict(classifier=RewardClassifier, quality=lambda: quality_net(size),
                discriminator=lambda: discriminator(size))
    net = lambda file: load_net(os.path.join(d, f'{file}.safetensors'), make[file]())  # only the nets the spec names
    out = {}
    for name in parse_spec(spec, REWARDS):
        if name in NETS:
            out[name] = WorldReward(net(NETS[name][0]), NETS[name][1])
        elif name == 'loo_fid':
            classifier = net('classifier')
            x, _ = load_train_split(d)
            ref = mean_cov(predict(classifier.features, x))
            features = lambda images, net=classifier: net.to(images.device).features(images.float().clamp(-1, 1))
            out[name] = LooFID(features, *ref, decay=fid_decay)
    return out


def check_flags(world, rewards, world_seed=0):
    """train.py's --world, --world_seed and the world's rewards, before anything is built. Raises UserError."""
    if world and world not in WORLD_PRESETS and not os.path.isdir(world):
        raise UserError(f"--world {world!r} is neither a world preset ({', '.join(WORLD_PRESETS)}) "
                        f"nor a directory built by world.py; pass --world demo")
    if world and world not in WORLD_PRESETS and not os.path.isfile(os.path.join(world, 'world.json')):
        raise UserError(f"--world {world} holds no world (no world.json); build one with python world.py, or pass "
                        f"--world demo")
    if world_seed < 0:
        raise UserError(f"--world_seed must be >= 0, got {world_seed}")
    if world_seed and world not in WORLD_PRESETS:
        raise UserError(f"--world_seed picks the seed of a world preset, but --world is {world or 'not set'}; pass "
                        f"--world demo (a built directory has its own seed)")
    if any(n in INSTANCE for n in parse_spec(rewards, REWARDS)) and not world:
        raise UserError("the world_class / world_quality / world_real rewards need a world; pass --world demo (or "
                        "--preset demo)")

# -----------------------------------------------------------------------------
# building the world (cached) and loading it back


def world_dir(wc):
    """root/<12 hex digits of the hash of the config fields that change what is built>."""
    key = {k: v for k, v in asdict(wc).items() if k not in NOT_KEYED} | {'version': VERSION}
    return os.path.join(wc.root, hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12])


def save_net(net, path):
    save_safetensors({k: v.contiguous() for k, v in net.state_dict().items()}, path)


def read_summary(d):
    """world.json of the world in d; a torn or unreadable one is one sentence naming it and what to do."""
    path = os.path.join(d, 'world.json')
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); delete {d} and the world is rebuilt on the next run") from None


def load_net(path, net):
    net.load_state_dict(load_file(path))
    return net.eval().requires_grad_(False)


def build(wc, log=print):
    """Build every part of the world into world_dir(wc), in the order each needs the last, and return its
    summary (also world.json): what each part scores on data it never trained on, and the seconds it took."""
    d, times, t = world_dir(wc), {}, [time.perf_counter()]
    os.makedirs(d, exist_ok=True)

    def lap(name):  # seconds since the previous lap
        times[name], t[0] = round(time.perf_counter() - t[0], 1), time.perf_counter()
    log(f"world: drawing {wc.n_train} train and {wc.n_heldout} held-out images")
    (x, y), (xh, yh) = build_data(wc, d)
    lap('data')
    vq = train_vq(wc, x)
    save_vq(vq, os.path.join(d, 'vq.safetensors'))
    log("world: tokenizing every image")
    codes = encode_all(vq, x)
    rec, rech = decode_all(vq, codes), decode_all(vq, encode_all(vq, xh))  # train / held-out through the VQ
    lap('tokenizer')
    gpt = train_gpt(wc, codes, y)
    save_gpt(gpt, os.path.join(d, 'gpt.safetensors'))
    lap('generator')
    nets = dict(classifier=train_classifier(wc, x, rec, y))
    lap('classifier')
    nets['quality'] = train_quality(wc, x)
    lap('quality')
    fakes, held_fakes, held_y = base_samples(wc, gpt, vq)
    nets['discriminator'] = train_discriminator(wc, rec[:wc.fakes], fakes)
    lap('discriminator')
    nets['judge'] = train_judge(wc, xh, rech, yh)
    lap('judge')
    for name, net in nets.items():
        save_net(net, os.path.join(d, f'{name}.safetensors'))
    log("world: measuring every part on held-out data")
    stats = world_stats(wc, nets, (x, rec, y), (xh, rech, yh), (held_fakes, held_y))
    stats |= dict(codebook_used=int(codes.unique().numel()), vq_mse=F.mse_loss(rech, xh).item(),
                  mean_image_mse=F.mse_loss(x.mean(0, keepdim=True).expand_as(xh), xh).item())  # chance level
    summary = dict(config=asdict(wc), build_s=times, **stats)
    text = json.dumps(summary, indent=1)  # written last and whole (a temp file renamed): marks the world complete
    atomic_write({os.path.join(d, 'world.json'): lambda tmp: Path(tmp).write_text(text)})
    return summary


def build_data(wc, d):
    """The train and held-out splits from separate random streams of the world seed, saved in the ADM layout
    (train.npz, heldout.npz) -> ((x, y), (xh, yh)) as float tensors in [-1, 1] and int64 labels."""
    out = []
    for split, n, stream in (('train', wc.n_train, 0), ('heldout', wc.n_heldout, 1)):
        images, labels = make_split(n, [wc.world_seed, stream], wc.image_size)
        save_adm(os.path.join(d, f'{split}.npz'), images, labels)
        out.append((to_float(images), torch.from_numpy(labels)))
    return out


def train_classifier(wc, x, rec, y):
    """world_class: the reward classifier, on the train images and the same images through the VQ (so that
    it reads a decoded sample's content, not the tokenizer's softness)."""
    gen = seeded(wc, 'classifier')
    xs, ys = torch.cat([x, rec]), torch.cat([y, y])
    return fit(RewardClassifier(), len(xs), lambda b: (xs[b], ys[b]), F.cross_entropy, wc.classifier_epochs, gen,
               'reward classifier', lr=3e-3)


def train_quality(wc, x):
    """world_quality: tell the distortion level of train images distorted afresh in every batch."""
    gen = seeded(wc, 'quality')
    return fit(quality_net(wc.image_size), len(x), lambda b: random_distortions(x[b], gen), F.cross_entropy,
               wc.quality_epochs, gen, 'quality net')


@torch.no_grad()
def base_samples(wc, gpt, vq):
    """Decoded base samples at the demo's CFG, classes balanced: wc.fakes for the discriminator to learn from,
    and n_heldout more from another seed that it never sees -> (fakes, held-out fakes, their labels)."""
    gen = seeded(wc, 'fakes')
    out = []
    for n in progress((wc.fakes, wc.n_heldout), 'base samples for the discriminator (train, held-out)'):
        labels = torch.arange(n) % NUM_CLASSES
        seed = int(torch.randint(2 ** 31, (1,), generator=gen))
        out.append((decode_all(vq, sample_tokens(gpt, labels, wc.cfg_scale, seed)), labels))
    return out[0][0], out[1][0], out[1][1]


def train_discriminator(wc, real, fakes):
    """world_real: VQ reconstructions of train images (real through the same decoder) vs base samples."""
    gen = seeded(wc, 'discriminator')
    xs, ys = torch.cat([real, fakes]), torch.cat([torch.ones(len(real)), torch.zeros(len(fakes))])
    return fit(discriminator(wc.image_size), len(xs), lambda b: (xs[b], ys[b]), F.binary_cross_entropy_with_logits,
               wc.disc_epochs, gen, 'discriminator', weight_decay=0.05)


def train_judge(wc, xh, rech, yh):
    """The held-out judge: the held-out images and their reconstructions; no reward ever sees it."""
    gen = seeded(wc, 'judge')
    xs, ys = torch.cat([xh, rech]), torch.cat([yh, yh])
    return fit(Judge(wc.image_size), len(xs), lambda b: (xs[b], ys[b]), F.cross_entropy, wc.judge_epochs, gen,
               'held-out judge')


@torch.no_grad()
def world_stats(wc, nets, train, heldout, fakes):
    """How good each part is on data it did not train on. train and heldout: (images, reconstructions,
    labels); fakes: (held-out base samples, labels)."""
    (x, rec, y), (xh, rech, yh), (held_fakes, fakes_y) = train, heldout, fakes
    acc = lambda net, a, b: (predict(net, a).argmax(1) == b).float().mean().item()
    gen = torch.Generator().manual_seed(wc.world_seed * 1000 + 999)  # the held-out distortions
    distorted, level = random_distortions(xh, gen)
    real_p, fake_p = (predict(nets['discriminator'], a)[:, 0] for a in (rech, held_fakes))
    feats = lambda a: predict(nets['judge'].body, a)
    return dict(classifier_acc=acc(nets['classifier'], xh, yh), classifier_acc_recon=acc(nets['classifier'], rech, yh),
                quality_spearman=spearman(expected_level(predict(nets['quality'], distorted)), level),
                disc_auc=roc_auc(real_p, fake_p),  # held-out reals (through the VQ) vs held-out base samples
                disc_real=torch.sigmoid(real_p).mean().item(), disc_fake=torch.sigmoid(fake_p).mean().item(),
                judge_acc=acc(nets['judge'], x, y),  # the judge never saw the train split
                judge_acc_recon=acc(nets['judge'], rec, y),
                base_judge_acc=acc(nets['judge'], held_fakes, fakes_y),
                mini_fid_recon=fid_of(feats(xh), feats(rech)))  # the VQ's floor for any generator


class World:
    """A built world loaded back: vq, gpt (the base), classifier, judge, the three reward scorers, held-out data."""

    def __init__(self, d):
        if not os.path.isfile(os.path.join(d, 'world.json')):
            raise FileNotFoundError(f"no world in {d}; build it with python world.py --preset demo")
        self.dir, self.summary = d, read_summary(d)
        known = {f.name for f in fields(WorldConfig)}  # a world.json of an older version may hold other keys
        self.config = WorldConfig(**{k: v for k, v in self.summary['config'].items() if k in known})
        self.vq = load_vq(os.path.join(d, 'vq.safetensors')).requires_grad_(False)
        self.gpt = load_gpt(os.path.join(d, 'gpt.safetensors')).requires_grad_(False)
        self.judge = load_net(os.path.join(d, 'judge.safetensors'), Judge(self.config.image_size))
        self.scorers = reward_scorers(d)  # the three instance rewards: {'world_class': ..., ...}
        self.classifier = self.scorers['world_class'].net
        images, labels = load_adm(os.path.join(d, 'heldout.npz'))
        self.heldout_x, self.heldout_y = to_float(images), torch.from_numpy(labels)

    def train_split(self):
        return load_train_split(self.dir)


def load_train_split(d):
    """The train split the generator and the rewards learned from: (images (n, 3, H, W) in [-1, 1], labels)."""
    images, labels = load_adm(os.path.join(d, 'train.npz'))
    return to_float(images), torch.from_numpy(labels)


# The world's CPU work runs on one thread, whatever the machine: float sums then happen in one order, so the
# demo prints the same numbers on any core count. Measured on the old world: built and tuned with 2 threads
# instead of 1, the same seeds gave a tuned held-out accuracy of 0.656 instead of 0.826 (RL amplifies
# rounding differences, and the world itself is trained on them). Another CPU model rounds differently too:
# that is why the README gives the spread over seeds and worlds, not one run's digits.
THREADS = 1


@contextlib.contextmanager
def fixed_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def preset_config(name, world_seed=0, root='out/world'):
    """The WorldConfig of a preset name and a world seed."""
    return WorldConfig(**{**WORLD_PRESETS[name], 'preset': name, 'world_seed': world_seed, 'root': root})


def resolve(name, world_seed=0):
    """A world preset name ('demo', 'tiny') or a directory -> the directory of that world."""
    return world_dir(preset_config(name, world_seed)) if name in WORLD_PRESETS else name


def load_or_build(wc, log=print):
    d = world_dir(wc)
    if not os.path.isfile(os.path.join(d, 'world.json')):
        t = time.perf_counter()
        log(f"world: building {wc.preset!r} (world seed {wc.world_seed}) into {d}, once: it is cached by config hash")
        build(wc, log)
        log(f"world: built in {time.perf_counter() - t:.0f} s")
    return World(d)

# -----------------------------------------------------------------------------
# measuring: held-out figures of the parts, and a generator's rewards, judges, diversity, KL to the base


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


@torch.no_grad()
def measure(w, gpt, cfg_scale, per_class, seed=1234):
    """Sample per_class images of every class with fixed seeds and score them on everything: each reward's
    mean (by its name), the held-out judge's accuracy (+- its standard error) and mini-FID to the held-out
    images, within-class pixel diversity (RMS distance), token diversity, entropy and KL to the base.
    -> (results dict, images (n, 3, H, W), labels (n,))."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    tokens = sample_tokens(gpt, labels, cfg_scale, seed)
    images = decode_all(w.vq, tokens)
    hit = (predict(w.judge, images).argmax(1) == labels).float()
    feats = lambda x: predict(w.judge.body, x)
    out = {name: scorer(images, labels).mean().item() for name, scorer in w.scorers.items()}
    out |= dict(judge_accuracy=hit.mean().item(), judge_accuracy_se=(hit.std() / math.sqrt(len(hit))).item(),
                mini_fid=fid_of(feats(w.heldout_x), feats(images)),
                pixel_diversity=pairwise_mean(images.flatten(1), labels, lambda a, b: (a - b).pow(2).mean(-1).sqrt()))
    out |= token_stats(tokens, labels) | model_stats(gpt, w.gpt, tokens, labels)
    out['forward_passes'] = tokens.shape[1] * (2 if cfg_scale > 1 else 1)  # CFG's unconditional half doubles them
    return out, images, labels

# -----------------------------------------------------------------------------
# the demo: GRPO in the world (train.py's own loop), a shuffled-reward control, the report


def prepare(tcfg, log=print):
    """Build or load tcfg.world (a preset at tcfg.world_seed, or a directory) and point the TrainConfig at its
    generator, tokenizer and reward nets."""
    if tcfg.world in WORLD_PRESETS:
        with fixed_threads():
            w = load_or_build(preset_config(tcfg.world, tcfg.world_seed), log)
    else:
        w = World(tcfg.world)
    tcfg.ckpt = tcfg.ckpt or os.path.join(w.dir, 'gpt.safetensors')  # '' = the world's pretrained base
    tcfg.vq_ckpt = tcfg.vq_ckpt or os.path.join(w.dir, 'vq.safetensors')
    tcfg.world, tcfg.image_size = w.dir, w.config.image_size
    return w


def accuracy_hook(w, tcfg, every=10, per_class=10):
    """A train.py hook: held-out judge accuracy on fixed seeds every `every` steps (the curve)."""
    def hook(step, policy):
        if step % every:
            return {}
        labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        images = decode_all(w.vq, sample_tokens(policy, labels, tcfg.cfg_scale, 999))
        return {'judge_acc': (predict(w.judge, images).argmax(1) == labels).float().mean().item()}
    return hook


def run_pair(w, tcfg, train_fn, log=print, control=True):
    """GRPO with the real rewards and (control=True) the shuffled control from the same start and seeds ->
    {name: run} (rows: train.py's metrics per step, led by the base's judge accuracy as step 0)."""
    runs = {}
    for name, shuffle in (('tuned', False), ('control', True))[:1 + control]:
        cfg = replace(tcfg, shuffle_rewards=shuffle, out_dir=os.path.join(tcfg.out_dir, name))
        hook = accuracy_hook(w, cfg)
        t = time.perf_counter()
        rows = [{'step': 0, **hook(0, w.gpt)}] + train_fn(cfg, hook)
        secs = time.perf_counter() - t
        gpt = load_gpt(os.path.join(cfg.out_dir, 'latest', 'model.safetensors')).requires_grad_(False)
        runs[name] = dict(rows=rows, seconds=secs, gpt=gpt)
        log(f"world: {name} run, {len(rows) - 1} GRPO steps in {secs:.0f} s")
    return runs


def run_demo(tcfg, train_fn, log=print, control=True):
    """python train.py --preset demo: the world, GRPO + control, then base vs tuned vs control measured on the
    same seeds -> report.md, report.json, samples_*.npz, before_after.png, curves.png in tcfg.out_dir."""
    with fixed_threads():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        w = prepare(tcfg, log)
        t1 = time.perf_counter()
        runs = run_pair(w, tcfg, train_fn, log, control)
        t2 = time.perf_counter()
        models = dict(base=w.gpt) | {k: r['gpt'] for k, r in runs.items()}
        measured = {k: measure(w, m, tcfg.cfg_scale, w.config.eval_per_class) for k, m in models.items()}
        res = {k: v[0] for k, v in measured.items()}
        times = dict(world_s=t1 - t0, grpo_s=t2 - t1, **{f'{k}_s': r['seconds'] for k, r in runs.items()},
                     eval_s=time.perf_counter() - t2)
        write_report(tcfg.out_dir, w, tcfg, res, times)
        save_samples(tcfg.out_dir, {k: v[1:] for k, v in measured.items()})
        write_before_after(os.path.join(tcfg.out_dir, 'before_after.png'), w, measured, res)
        plot_runs(os.path.join(tcfg.out_dir, 'curves.png'), {k: r['rows'] for k, r in runs.items()})
    return res


ROWS = [('world_class', 'reward: P(target class), reward classifier', '.3f'),
        ('world_quality', 'reward: quality, 1 - predicted distortion level / 4', '.3f'),
        ('world_real', 'reward: P(real), discriminator', '.3f'),
        ('judge_accuracy', 'held-out judge: class accuracy', '.3f'),
        ('mini_fid', 'held-out judge: mini-FID to held-out images', '.2f'),
        ('pixel_diversity', 'pixel diversity: within-class RMS distance', '.3f'),
        ('token_hamming', 'token diversity: within-class Hamming distance', '.3f'),
        ('distinct', 'distinct token sequences', '.3f'),
        ('top_token_share', 'share of the most common token', '.3f'),
        ('entropy', 'per-token entropy (nats)', '.3f'),
        ('kl_to_base', 'KL to the base (nats/token)', '.4f'),
        ('forward_passes', 'forward passes per image (tokens x 2 with CFG)', '.0f')]


def targets(base, tuned, control=None):
    """The four checks of one GRPO seed against its base (three without a control) -> [(check, value, limit, met)]."""
    need = base['judge_accuracy'] + (1 - base['judge_accuracy']) / 2  # half the base's error made good
    checks = [('tuned judge accuracy >= base + half its error', tuned['judge_accuracy'], need,
             tuned['judge_accuracy'] >= need),
            ('tuned mini-FID <= base', tuned['mini_fid'], base['mini_fid'], tuned['mini_fid'] <= base['mini_fid']),
            ('tuned pixel diversity >= 0.5 x base', tuned['pixel_diversity'], 0.5 * base['pixel_diversity'],
             tuned['pixel_diversity'] >= 0.5 * base['pixel_diversity'])]
    if control:
        two_se = 2 * math.hypot(base['judge_accuracy_se'], control['judge_accuracy_se'])
        gain = control['judge_accuracy'] - base['judge_accuracy']
        checks.append(('control accuracy gain <= 2 s.e.', gain, two_se, gain <= two_se))
    return checks


def world_line(w):
    """The world's own held-out figures in one paragraph (world.py's summary and the report's header)."""
    s, c = w.summary, w.config
    return (f"world {w.dir} (seed {c.world_seed}): VQ held-out MSE {s['vq_mse']:.4f} vs {s['mean_image_mse']:.4f} for "
            f"the mean image, {s['codebook_used']}/{c.codebook_size} codes used; reward classifier "
            f"{s['classifier_acc']:.3f} on held-out images, {s['classifier_acc_recon']:.3f} on their reconstructions; "
            f"quality net Spearman {s['quality_spearman']:.3f} on held-out distorted images; discriminator AUC "
            f"{s['disc_auc']:.3f} (held-out reals through the VQ vs held-out base samples); judge "
            f"{s['judge_acc']:.3f} on train images ({s['judge_acc_recon']:.3f} reconstructed), base samples "
            f"{s['base_judge_acc']:.3f}; mini-FID of reconstructions (the VQ's floor) {s['mini_fid_recon']:.2f}; "
            f"built in {sum(s['build_s'].values()):.0f} s")


def write_report(out_dir, w, tcfg, res, times):
    """report.md (the table the README quotes, the target checks, times) and report.json
    ({"base": {...}, "tuned": {...}, "control": {...}}, every measured number by name)."""
    n = NUM_CLASSES * w.config.eval_per_class
    lines = [world_line(w), '',
             f"{n} samples ({w.config.eval_per_class} per class, same seeds), cfg {tcfg.cfg_scale}, {tcfg.max_steps} "
             f"steps, lr {tcfg.lr}, beta {tcfg.beta}, group {tcfg.group_size}, rewards {tcfg.rewards}", '',
             '| metric | base | GRPO |' + (' shuffled-reward control |' if 'control' in res else ''),
             '|---' * (1 + len(res)) + '|']
    for key, name, fmt in ROWS:
        cell = lambda r: format(r[key], fmt) + (f" ± {r['judge_accuracy_se']:.3f}" if key == 'judge_accuracy' else '')
        lines.append(f"| {name} | " + ' | '.join(cell(r) for r in res.values()) + ' |')
    lines += ['', 'targets:'] + [f"- {name}: {v:.3f} vs {lim:.3f}: {'met' if ok else 'MISSED'}"
                                 for name, v, lim, ok in targets(res['base'], res['tuned'], res.get('control'))]
    lines.append("times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    table = '\n'.join(lines) + '\n'
    print(table, flush=True)
    atomic_write({os.path.join(out_dir, 'report.md'): lambda tmp: Path(tmp).write_text(table),
                  os.path.join(out_dir, 'report.json'): lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1))})


def save_samples(out_dir, samples):
    """samples_{base,tuned,control}.npz in the ADM layout, from {name: (images, labels)}."""
    for name, (images, labels) in samples.items():
        save_adm(os.path.join(out_dir, f'samples_{name}.npz'), to_uint8(images).permute(0, 2, 3, 1).numpy(),
                 labels.numpy())

# -----------------------------------------------------------------------------
# pictures: the before/after grid and the curves, drawn with PIL (no plotting dependency)


def write_before_after(path, w, measured, res, cols=6, real=3):
    """One row per class: `real` held-out images | `cols` base samples | `cols` GRPO samples drawn with the same
    seeds. Under each sample the held-out judge's verdict (never a reward): a green bar, or a red bar and the
    class it saw instead. measured: {'base'|'tuned': (results, images, labels)}, class-major."""
    per = w.config.eval_per_class
    tiles = lambda x: to_uint8(x.flatten(0, 1)).permute(0, 2, 3, 1).reshape(*x.shape[:2], *x.shape[3:], 3).numpy()
    reals = torch.stack([w.heldout_x[w.heldout_y == c][:real] for c in range(NUM_CLASSES)])  # (10, real, 3, H, W)
    blocks = [('held-out real images', tiles(reals), None)]
    for key, title in (('base', 'base: the pretrained generator'), ('tuned', 'after GRPO (same seeds)')):
        images = measured[key][1]
        seen = predict(w.judge, images).argmax(1).view(NUM_CLASSES, per)[:, :cols]  # (10, cols)
        blocks.append((title, tiles(images.view(NUM_CLASSES, per, *images.shape[1:])[:, :cols]), seen.numpy()))
    acc = lambda k: f"{res[k]['judge_accuracy']:.0%}"
    control = f", shuffled-reward control {acc('control')}" if 'control' in res else ''
    class_rows(path, blocks, CLASS_NAMES, f"held-out judge (green: recognises the class, red: saw another) over all "
               f"{NUM_CLASSES * per} samples: base {acc('base')}, after GRPO {acc('tuned')}{control}")


# -----------------------------------------------------------------------------
# main: build (or load) a world and print its summary


def main(argv=None):
    from cli import parse_config
    wc = parse_config(WorldConfig, argv, presets=WORLD_PRESETS)  # runs wc.validate()
    torch.set_num_threads(THREADS)  # see fixed_threads
    w = load_or_build(wc)
    print(world_line(w))
    base = measure(w, w.gpt, wc.cfg_scale, wc.eval_per_class)[0]
    print(f"base generator at cfg {wc.cfg_scale}:", json.dumps({k: round(v, 4) for k, v in base.items()}))


if __name__ == '__main__':
    import sys
    from cli import run
    sys.exit(run(main, errors=(UserError, FileNotFoundError)))  # a bad flag: one sentence, exit code 2
