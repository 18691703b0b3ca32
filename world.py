"""
world.py -- a miniature of AR-GRPO's world that a laptop CPU builds in minutes: data, tokenizer, generator,
the paper's three reward dimensions as learned nets, and a held-out judge, all trained here from one seed
(nanoGPT's prepare.py analogue).

    python world.py                                # smoke demo: the tests' tiny world (seconds), its summary
    python world.py --preset demo                  # build (or load) the demo world and print its summary
    python world.py --preset demo --world_seed 1   # another world: other images, other nets, same recipe
    python world.py --eval out/demo/samples_tuned.npz   # score an .npz as the report does (judge, mini-FID, ...)
    python train.py --preset demo                  # the headline: GRPO in this world, base vs tuned vs control
    python study.py --preset demo                  # the README's table: 3 GRPO seeds x 5 worlds

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
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, asdict, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from checkpoint import load_gpt, load_vq, save_gpt, save_vq
from cli import UserError, atomic_write, check_range, check_seed, check_writable_dir, check_writable_file
from fid import LooFID, mean_cov
from miniature import (MEASURE_SEED, THREADS, WorldReward, batches, conv_stack, decode_all, discriminator,
                       diversity_and_se, encode_all, expected_level, fid_and_se, fid_of, fit, fixed_threads, load_adm,
                       load_net, model_stats, predict, progress, quality_net, random_distortions, read_summary,
                       roc_auc, save_adm, save_net, seeded, spearman, to_float, token_stats, train_discriminator,
                       train_quality, train_vq, warmup_cosine)
from model import GPT, config_for, generate
from plots import class_rows, plot_runs
from provenance import one_line, provenance
from rewards import parse_spec
from tokenizer import to_uint8


VERSION = 5  # bump when the world's code changes what a config builds
CACHE_ENV = 'AR_GRPO_WORLD_CACHE'  # where worlds are cached: this environment variable, else out/world


def cache_root():
    """The world cache folder (read now, not at import, so a test or a shell can move it)."""
    return os.environ.get(CACHE_ENV) or 'out/world'


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
    gpt_epochs: int = 4  # most pretraining passes; few on purpose: a decent but imperfect base
    gpt_target: float = 0.0  # > 0: stop pretraining once the reward classifier recognises this share of base samples
    gpt_check_per_class: int = 20  # base samples per class behind that share (measured twice an epoch)
    classifier_epochs: int = 3  # epochs of the reward classifier (train images and their reconstructions)
    quality_epochs: int = 4  # epochs of the quality net (each pass distorts the images afresh)
    fakes: int = 500  # base samples the discriminator learns from (n_heldout more measure its AUC)
    disc_epochs: int = 3  # discriminator epochs
    judge_epochs: int = 10  # epochs of the held-out judge (held-out images and their reconstructions)
    cfg_scale: float = 1.0  # CFG of the discriminator's base samples (= the demo's sampling CFG; 1 = none)
    eval_per_class: int = 20  # samples per class when a generator is measured (base vs tuned)
    root: str = field(default_factory=cache_root)  # cache root; the world lives in root/<hash>

    def validate(self):
        """Every value checked before anything is built (cli.parse_config calls it). Raises UserError."""
        check_seed(self, 'world_seed')  # a seed beyond 64 bits failed after the world folder was made
        check_range(self, 'image_size grid n_train n_heldout vq_steps vq_batch gpt_layers gpt_epochs '
                          'classifier_epochs quality_epochs fakes disc_epochs judge_epochs eval_per_class', lo=1)
        check_range(self, 'codebook_size', lo=2)
        check_range(self, 'vq_lr', lo=0, lo_open=True)
        check_range(self, 'gpt_target', lo=0, hi=1)
        check_range(self, 'gpt_check_per_class', lo=1)
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
                 gpt_epochs=12, gpt_target=0.3, classifier_epochs=10, quality_epochs=8, fakes=2000, disc_epochs=20,
                 judge_epochs=16,
                 eval_per_class=50),
    # python train.py --preset demo: each size chosen by measurement (README), about 4 1/2 minutes of one core
    'demo': dict(n_train=8000, n_heldout=2000, codebook_size=256, vq_steps=750, gpt_layers=4, gpt_dim=96,
                 gpt_epochs=16, gpt_target=0.55, gpt_check_per_class=30, classifier_epochs=3, quality_epochs=6,
                 fakes=8000, disc_epochs=10, judge_epochs=10,
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


# -----------------------------------------------------------------------------
# generator: model.GPT pretrained by next-token cross-entropy, nanoGPT style


def train_gpt(wc, codes, labels, check=None, bs=64):
    """A c2i GPT on the tokenised training set -> (gpt, [check(gpt) after each epoch]). Class dropout as LlamaGen
    trains it: 10% of the labels become the null class (row num_classes), which is what makes CFG possible.
    Batches of 64 sequences: measured, they reach a lower loss than 128 at a higher learning rate for the same
    compute. How long: up to wc.gpt_epochs, and with wc.gpt_target > 0 it stops at the first half epoch at which
    check(gpt) (the reward classifier's accuracy on base samples, never the judge) reaches gpt_target. A fixed
    number of epochs gave base accuracies from 0.31 to 0.68 across worlds and CPUs (issue 23); stopping at a
    measured level puts every world's base in the band the demo is built for."""
    gen = seeded(wc, 'gpt')
    cfg = config_for(None, wc.image_size, wc.image_size // wc.grid, n_layer=wc.gpt_layers, n_head=4,
                     dim=wc.gpt_dim, vocab_size=wc.codebook_size, num_classes=NUM_CLASSES, class_dropout_prob=0.1)
    gpt = GPT(cfg).train()  # dropout on while pretraining, as LlamaGen
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3, weight_decay=0.05, betas=(0.9, 0.95))
    sched = warmup_cosine(opt, wc.gpt_epochs * math.ceil(len(codes) / bs))
    checks = []
    for epoch in (bar := progress(range(wc.gpt_epochs), 'generator, epochs (at most)')):
        order = batches(len(codes), bs, gen)
        for i, b in enumerate(order):
            y = labels[b].clone()
            y[torch.rand(len(b), generator=gen) < cfg.class_dropout_prob] = NUM_CLASSES  # class dropout
            logits = gpt(codes[b][:, :-1], y)  # (B, N, V): logits[:, j] predicts token j
            loss = F.cross_entropy(logits.flatten(0, 1), codes[b].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
            opt.step()
            sched.step()
            half = (i + 1) % math.ceil(len(order) / 2) == 0 or i + 1 == len(order)  # checked twice an epoch
            if check is not None and half:
                checks.append(check(gpt.eval()))  # sampling uses its own generator: the training stream is intact
                gpt.train()
                if wc.gpt_target and checks[-1] >= wc.gpt_target:
                    break
        bar.set_postfix(loss=f"{loss.item():.3f}", **({'base_acc': f"{checks[-1]:.3f}"} if checks else {}),
                        refresh=False)
        if checks and wc.gpt_target and checks[-1] >= wc.gpt_target:
            break
    return gpt.eval().requires_grad_(False), checks


def base_accuracy(wc, vq, classifier):
    """check() for train_gpt: the reward classifier's accuracy on wc.gpt_check_per_class base samples per class
    at the demo's CFG, from a fixed seed (the judge is held out: it never steers the build)."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(wc.gpt_check_per_class)
    return lambda gpt: (predict(classifier, decode_all(vq, sample_tokens(gpt, labels, wc.cfg_scale, 4242))).argmax(1)
                        == labels).float().mean().item()


@torch.no_grad()
def sample_tokens(gpt, labels, cfg_scale, seed, bs=500):
    """Tokens (n, N) for the given labels, drawn in batches from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([generate(gpt, labels[i:i + bs], cfg_scale=cfg_scale, generator=gen)[0]
                      for i in range(0, len(labels), bs)])

# -----------------------------------------------------------------------------
# the world's own CNNs: reward classifier (~ CLIP) and judge (quality net and discriminator: miniature.py)


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


# -----------------------------------------------------------------------------
# the world's rewards as rewards.py scorers: scorer(images, conditions) -> Tensor[B]


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
    nets = dict(classifier=train_classifier(wc, x, rec, y))  # before the generator: it sets how long that trains
    lap('classifier')
    gpt, checks = train_gpt(wc, codes, y, base_accuracy(wc, vq, nets['classifier']))
    save_gpt(gpt, os.path.join(d, 'gpt.safetensors'))
    lap('generator')
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
    stats |= dict(gpt_half_epochs_run=len(checks), gpt_checks=[round(c, 4) for c in checks],
                  codebook_used=int(codes.unique().numel()), vq_mse=F.mse_loss(rech, xh).item(),
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


def preset_config(name, world_seed=0, root=None):
    """The WorldConfig of a preset name and a world seed, cached under root (None: cache_root())."""
    root = root or cache_root()
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



@torch.no_grad()
def score_images(w, images, labels):
    """The figures of a set of images that need no generator: each reward's mean (by its name), the held-out
    judge's accuracy (+- its standard error) and mini-FID to the held-out images, within-class pixel diversity
    (RMS distance). images (n, 3, H, W) in [-1, 1], labels (n,). measure() and `world.py --eval` both call it on
    what the .npz holds (uint8 pixels), so the command reproduces the report's figures to the last digit."""
    hit = (predict(w.judge, images).argmax(1) == labels).float()
    feats = lambda x: predict(w.judge.body, x)
    out = {name: scorer(images, labels).mean().item() for name, scorer in w.scorers.items()}
    fid, fid_se = fid_and_se(feats(w.heldout_x), feats(images))  # the s.e. a bootstrap's
    div, div_se = diversity_and_se(images, labels)  # within-class, its s.e. over classes
    return out | dict(judge_accuracy=hit.mean().item(), judge_accuracy_se=(hit.std() / math.sqrt(len(hit))).item(),
                      mini_fid=fid, mini_fid_se=fid_se, pixel_diversity=div, pixel_diversity_se=div_se)


@torch.no_grad()
def measure(w, gpt, cfg_scale, per_class, seed=MEASURE_SEED):
    """Sample per_class images of every class with fixed seeds and score them on everything: score_images'
    figures, token diversity, entropy and KL to the base. The decoded images are rounded to uint8 first, as
    samples_*.npz stores them. -> (results dict, images (n, 3, H, W), labels (n,))."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    tokens = sample_tokens(gpt, labels, cfg_scale, seed)
    images = to_float(to_uint8(decode_all(w.vq, tokens)).permute(0, 2, 3, 1).numpy())  # what the npz holds
    out = score_images(w, images, labels)
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


CURVE_PER_CLASS, CURVE_SEED = 10, 999  # the curve's held-out accuracy: fewer samples than the report's, other seeds


def checkpoint_metadata(d):
    """What a train.py save in the world d records beside its sampling settings (checkpoint.sampling_metadata),
    so that sample.py --ckpt finds the VQ and takes the world's class names for --class."""
    return dict(world=os.path.abspath(d), world_hash=os.path.basename(os.path.normpath(d)), class_names=CLASS_NAMES)


def accuracy_hook(w, tcfg, every=10, per_class=CURVE_PER_CLASS):
    """A train.py hook: held-out judge accuracy on fixed seeds every `every` steps (the curve)."""
    def hook(step, policy):
        if step % every:
            return {}
        labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        images = decode_all(w.vq, sample_tokens(policy, labels, tcfg.cfg_scale, CURVE_SEED))
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
        plot_runs(os.path.join(tcfg.out_dir, 'curves.png'), {k: r['rows'] for k, r in runs.items()},
                  f"held-out judge accuracy, {CURVE_PER_CLASS} samples/class (report: {w.config.eval_per_class})")
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
    """The four checks of one GRPO seed against its base (three without a control)
    -> [(check, value, limit, met, margin)], margin = how far the value is on the right side of its limit, in
    standard errors of the difference (issue 23 asks for >= 2 in every run, so that a run on another CPU, whose
    rounding moves it by about the spread over seeds, still meets the target). The s.e. of accuracy is the
    binomial one; of mini-FID a bootstrap's; of pixel diversity the spread over classes (measure)."""
    se = lambda *s: math.sqrt(sum(x * x for x in s)) or float('inf')
    b, t = base, tuned
    need = b['judge_accuracy'] + (1 - b['judge_accuracy']) / 2  # half the base's error made good
    checks = [('tuned judge accuracy >= base + half its error', t['judge_accuracy'], need, t['judge_accuracy'] >= need,
               (t['judge_accuracy'] - need) / se(t['judge_accuracy_se'], b['judge_accuracy_se'] / 2)),
              ('tuned mini-FID <= base', t['mini_fid'], b['mini_fid'], t['mini_fid'] <= b['mini_fid'],
               (b['mini_fid'] - t['mini_fid']) / se(t.get('mini_fid_se', 0), b.get('mini_fid_se', 0))),
              ('tuned pixel diversity >= 0.5 x base', t['pixel_diversity'], 0.5 * b['pixel_diversity'],
               t['pixel_diversity'] >= 0.5 * b['pixel_diversity'],
               (t['pixel_diversity'] - 0.5 * b['pixel_diversity'])
               / se(t.get('pixel_diversity_se', 0), b.get('pixel_diversity_se', 0) / 2))]
    if control:
        two_se = 2 * math.hypot(b['judge_accuracy_se'], control['judge_accuracy_se'])
        gain = control['judge_accuracy'] - b['judge_accuracy']
        checks.append(('control accuracy gain <= 2 s.e.', gain, two_se, gain <= two_se, (two_se - gain) / two_se * 2))
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


def report_provenance(w, tcfg):
    """report.json's `provenance` (provenance.py): the TrainConfig, every seed (the GRPO seed, the world's own
    seed, the measurement's and the curve's sampling seeds, the demo's torch seed), the world, code, machine."""
    return provenance(tcfg, w.dir, extra_seeds=dict(world_seed=w.config.world_seed, measure_seed=MEASURE_SEED,
                                                    curve_seed=CURVE_SEED, demo_torch_seed=0))


def write_report(out_dir, w, tcfg, res, times):
    """report.md (the table the README quotes, the target checks, times, provenance) and report.json
    ({"base": {...}, "tuned": {...}, "control": {...}, "provenance": {...}}, every measured number by name)."""
    prov = report_provenance(w, tcfg)
    n = NUM_CLASSES * w.config.eval_per_class
    lines = [world_line(w), '',
             f"{n} samples ({w.config.eval_per_class} per class, same seeds), cfg {tcfg.cfg_scale}, {tcfg.max_steps} "
             f"steps, lr {tcfg.lr}, beta {tcfg.beta}, group {tcfg.group_size}, rewards {tcfg.rewards}", '',
             '| metric | base | GRPO |' + (' shuffled-reward control |' if 'control' in res else ''),
             '|---' * (1 + len(res)) + '|']
    for key, name, fmt in ROWS:
        cell = lambda r: format(r[key], fmt) + (f" ± {r['judge_accuracy_se']:.3f}" if key == 'judge_accuracy' else '')
        lines.append(f"| {name} | " + ' | '.join(cell(r) for r in res.values()) + ' |')
    lines += ['', 'targets (margin: how far inside the limit, in standard errors):']
    lines += [f"- {name}: {v:.3f} vs {lim:.3f}: {'met' if ok else 'MISSED'}, margin {m:.1f} s.e."
              for name, v, lim, ok, m in targets(res['base'], res['tuned'], res.get('control'))]
    lines.append("times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    lines.append(f"provenance (report.json has all of it): {one_line(prov)}")
    table = '\n'.join(lines) + '\n'
    print(table, flush=True)
    text = json.dumps({**res, 'provenance': prov}, indent=1)
    atomic_write({os.path.join(out_dir, 'report.md'): lambda tmp: Path(tmp).write_text(table),
                  os.path.join(out_dir, 'report.json'): lambda tmp: Path(tmp).write_text(text)})


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
# python world.py --eval samples.npz: any ADM-layout samples scored as the report scores its own


@dataclass
class EvalConfig:
    eval: str = ''  # the samples: an ADM-layout .npz, uint8 images `arr_0` (n, H, W, 3) and class labels `arr_1`
    world: str = 'demo'  # the world whose held-out judge scores them: a preset name or a built world's directory
    world_seed: int = 0  # with a preset: the world of this seed
    root: str = 'out/world'  # with a preset: the cache root the world was built under
    out: str = ''  # the figures as JSON; '' = beside the samples, NAME.eval.json

    def validate(self):
        check_range(self, 'world_seed', lo=0)
        if not os.path.isfile(self.eval):
            raise UserError(f"--eval {self.eval!r} is not a file; pass an .npz of samples (e.g. out/demo/"
                            f"samples_tuned.npz)")
        try:
            with np.load(self.eval) as z:
                shape, dtype, n_labels = z['arr_0'].shape, z['arr_0'].dtype, z['arr_1'].shape
        except Exception as e:
            raise UserError(f"--eval {self.eval} is not an .npz with images `arr_0` and labels `arr_1` "
                            f"({type(e).__name__}); write one as sample.py --npz or np.savez(arr_0=, arr_1=) "
                            f"do") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or n_labels != shape[:1] or shape[0] < 2:
            raise UserError(f"--eval {self.eval}: arr_0 must be uint8 images (n >= 2, H, W, 3) with n labels in arr_1, "
                            f"got {dtype} {shape} and {n_labels} labels")
        self.world = world_dir(preset_config(self.world, self.world_seed, self.root)) \
            if self.world in WORLD_PRESETS else self.world
        if not os.path.isfile(os.path.join(self.world, 'world.json')):
            raise UserError(f"--world {self.world} holds no built world (no world.json); build it with python "
                            f"world.py --preset demo, or pass the directory the samples' world was built in")
        self.out = self.out or os.path.splitext(self.eval)[0] + '.eval.json'
        check_writable_file(self.out, '--out')


def evaluate(ec, log=print):
    """score_images on the .npz's pixels, one thread as the report was measured -> the figures (also written)."""
    with fixed_threads():
        w = World(ec.world)
        images, labels = load_adm(ec.eval)
        size, n_classes = w.config.image_size, NUM_CLASSES
        if images.shape[1:3] != (size, size) or labels.min() < 0 or labels.max() >= n_classes:
            raise UserError(f"--eval {ec.eval} holds {images.shape[1]}x{images.shape[2]} images with labels "
                            f"{labels.min()}..{labels.max()}; the world {w.dir} judges {size}x{size} images of "
                            f"classes 0..{n_classes - 1}")
        out = score_images(w, to_float(images), torch.from_numpy(labels).long())
    out |= dict(n=len(images), samples=os.path.abspath(ec.eval), world=w.dir)
    log(f"{ec.eval}, {len(images)} images judged in {w.dir}: held-out judge accuracy {out['judge_accuracy']:.3f} ± "
        f"{out['judge_accuracy_se']:.3f}, mini-FID {out['mini_fid']:.2f}, pixel diversity {out['pixel_diversity']:.3f}"
        f"; rewards " + ", ".join(f"{k} {out[k]:.3f}" for k in w.scorers) + f" (written to {ec.out})")
    atomic_write({ec.out: lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1))})
    return out

# -----------------------------------------------------------------------------
# main: build (or load) a world and print its summary; or --eval


def main(argv=None):
    import sys
    from cli import parse_config
    argv = sys.argv[1:] if argv is None else argv
    if any(a == '--eval' or a.startswith('--eval=') for a in argv):  # the scoring command: its own flags
        return evaluate(parse_config(EvalConfig, argv))
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
