"""
world.py -- a miniature of AR-GRPO's world that a laptop CPU builds in minutes: data, tokenizer,
generator, rewards and held-out judges, all trained here from a seed (nanoGPT's prepare.py analogue).

    python world.py                        # smoke demo: the tests' tiny world (about a minute), its summary
    python world.py --preset demo          # build (or load) the demo world and print its summary
    python train.py --preset demo          # the headline: GRPO in this world, base vs tuned vs control
    python study.py --preset demo --study all    # the (lr, beta) sweep and 3 seeds, real vs shuffled rewards

What each part stands for in the paper (AR-GRPO, arXiv 2508.06924, on ImageNet with LlamaGen):
  data        procedural shapes: 10 classes (5 shapes x 2 colour families) with random position, size,
              background and clutter; a train split and a held-out split       ~ ImageNet
  tokenizer   tokenizer.VQModel trained with the VQ-VAE objective              ~ LlamaGen's VQ-16
  generator   model.GPT (c2i) pretrained by next-token cross-entropy, class dropout for CFG ~ LlamaGen c2i
  world_class reward: P(target class) from a CNN trained on the train split   ~ CLIP (semantic fidelity)
  world_real  reward: a real-vs-generated discriminator against base samples  ~ a realism / quality judge
  judge       a classifier of another architecture and seed, trained on the held-out split, never a
              reward: class accuracy of samples and a mini-FID in its feature space ~ the paper's evaluation
How it departs: the VQ is trained with L2 reconstruction + codebook + commitment only (LlamaGen adds a
perceptual and a GAN loss) on a subset of the images; the reward classifier and the judge also see
tokenized (reconstructed) images, since this VQ blurs far more than LlamaGen's; the FID features come from
the small judge, not Inception. Everything is cached under out/world/<hash of the WorldConfig>, so a
changed config builds a new world (bump VERSION when the code changes what a config builds).
"""
import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, asdict, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file, load_file

from checkpoint import load_gpt, load_vq, save_gpt, save_vq
from fid import frechet_distance, mean_cov
from model import GPT, config_for, generate
from rewards import parse_spec
from tokenizer import VQConfig, VQModel, to_uint8

VERSION = 3  # bump when the world's code changes what a config builds


@dataclass
class WorldConfig:
    preset: str = 'tiny'  # a WORLD_PRESETS name; its values are defaults the flags override
    seed: int = 0  # everything random in the world derives from it
    image_size: int = 16  # pixels per side
    n_train: int = 600  # training images (VQ, GPT, reward classifier)
    n_heldout: int = 300  # held-out images (the judge and the mini-FID reference only)
    codebook_size: int = 64  # VQ codes = the GPT's vocabulary
    vq_ch: int = 32  # VQ base width (GroupNorm(32) needs a multiple of 32)
    vq_images: int = 600  # training images the VQ sees (its convolutions are the slow part on a CPU)
    vq_epochs: int = 2  # passes over those images
    gpt_layers: int = 2  # generator depth
    gpt_dim: int = 64  # generator width
    gpt_epochs: int = 2  # pretraining passes; few on purpose: a decent but imperfect base
    net_epochs: int = 2  # epochs of each small CNN (reward classifier, judge, discriminator)
    fakes: int = 300  # base samples the discriminator learns to tell from real
    cfg_scale: float = 1.5  # CFG of the discriminator's fakes (= the GRPO demo's sampling CFG)
    eval_per_class: int = 10  # samples per class in the base-vs-tuned evaluation
    root: str = 'out/world'  # cache root; the world lives in root/<hash>


WORLD_PRESETS = {
    'tiny': dict(n_train=2000, n_heldout=1000, vq_images=500, vq_epochs=3, gpt_epochs=10, net_epochs=6,
                 fakes=500, eval_per_class=20),  # tests and the smoke demo: about a minute
    'demo': dict(n_train=8000, n_heldout=2000, codebook_size=128, vq_images=1500, vq_epochs=3, gpt_layers=4,
                 gpt_dim=128, gpt_epochs=8, net_epochs=10, fakes=4000, eval_per_class=50),
}
NOT_KEYED = {'preset', 'root', 'eval_per_class'}  # fields that do not change what is built

# -----------------------------------------------------------------------------
# data: procedural class-conditional images


SHAPES = ('disk', 'square', 'triangle', 'ring', 'cross')  # class c: SHAPES[c % 5], colour family c // 5
NUM_CLASSES = 2 * len(SHAPES)


def hsv(h, s, v):  # floats in [0, 1] -> an RGB tuple of ints
    import colorsys
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1, s, v))


def draw_image(c, rng, size=16, ss=4):
    """One (size, size, 3) uint8 image of class c, drawn at ss x the size and box-filtered down.

    The shape (one of 5) and its colour family (warm or cool hue) make the class; its position, size,
    exact hue, the background (dim, low-saturation, a gradient) and 1-3 random-colour clutter marks vary."""
    S = size * ss
    bg = np.array([hsv(rng.random(), 0.3 * rng.random(), 0.1 + 0.4 * rng.random()) for _ in range(2)], float)
    t = np.linspace(0, 1, S)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, S)[None, :, None]
    img = Image.fromarray((bg[0] * (1 - t) + bg[1] * t + np.zeros((S, S, 3))).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 4)):  # clutter: short lines of any colour
        x, y = rng.uniform(0, S, 2)
        dx, dy = rng.uniform(-S / 4, S / 4, 2)
        d.line([x, y, x + dx, y + dy], fill=hsv(rng.random(), rng.random(), 0.3 + 0.5 * rng.random()), width=ss)
    hue = rng.uniform(-0.05, 0.08) if c // len(SHAPES) == 0 else rng.uniform(0.52, 0.66)  # red-orange / blue
    col = hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0))
    r = rng.uniform(0.22, 0.36) * S  # half the shape's extent
    cx, cy = rng.uniform(r + ss, S - r - ss, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    shape = SHAPES[c % len(SHAPES)]
    if shape == 'disk':
        d.ellipse(box, fill=col)
    elif shape == 'square':
        d.rectangle(box, fill=col)
    elif shape == 'triangle':
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=col)
    elif shape == 'ring':
        d.ellipse(box, outline=col, width=max(ss, int(0.45 * r)))
    else:  # cross
        w = 0.38 * r
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    return np.asarray(img.resize((size, size), Image.BOX))


def make_split(n, seed, size):
    """n images with balanced labels -> (images (n, 3, size, size) float32 in [-1, 1], labels (n,) int64)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    x = np.stack([draw_image(int(c), rng, size) for c in labels])  # (n, H, W, 3) uint8
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.from_numpy(labels).long()

# -----------------------------------------------------------------------------
# tokenizer: tokenizer.VQModel trained with the VQ-VAE objective


def warmup_cosine(opt, steps):
    """Linear warm-up over the first 10% of the steps, then a cosine decay to 0."""
    warm = max(1, steps // 10)
    lr = lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))  # a factor on lr
    return torch.optim.lr_scheduler.LambdaLR(opt, lr)


def batches(n, bs, gen):
    """Shuffled index batches over n items (the last one may be short)."""
    return torch.randperm(n, generator=gen).split(bs)


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


def train_vq(wc, x, gen):
    """A small VQModel (downsample 4) fit to the training images; dead codes restart on random latents."""
    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))  # a seeded init
    vq = VQModel(VQConfig(codebook_size=wc.codebook_size, codebook_embed_dim=8, encoder_ch_mult=[1, 1, 2],
                          decoder_ch_mult=[1, 1, 2], z_channels=32, ch=wc.vq_ch))
    x = x[:wc.vq_images]  # the VQ is the costly part on a CPU: it sees a subset
    opt = torch.optim.Adam(vq.parameters(), lr=1e-3)
    steps = wc.vq_epochs * math.ceil(len(x) / 32)
    sched = warmup_cosine(opt, steps)
    for epoch in range(wc.vq_epochs):
        used = torch.zeros(wc.codebook_size, dtype=torch.bool)
        for b in batches(len(x), 32, gen):
            loss, rec, idx = vq_loss(vq, x[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            used[idx] = True
        if epoch < wc.vq_epochs - 1:  # codes no latent chose this epoch restart on a random latent
            with torch.no_grad():
                z = F.normalize(vq.quant_conv(vq.encoder(x[torch.randperm(len(x), generator=gen)[:256]])), dim=1)
                z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                dead = (~used).nonzero().flatten()
                vq.quantize.embedding.weight[dead] = z[torch.randint(len(z), (len(dead),), generator=gen)]
    return vq.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vq, x, bs=256):
    """images (n, 3, H, W) -> codes (n, h*w) int64."""
    return torch.cat([vq.encode(x[i:i + bs]).flatten(1) for i in range(0, len(x), bs)])


@torch.no_grad()
def decode_all(vq, codes, bs=256):
    return torch.cat([vq.decode(codes[i:i + bs]).clamp(-1, 1) for i in range(0, len(codes), bs)])

# -----------------------------------------------------------------------------
# generator: model.GPT pretrained by next-token cross-entropy, nanoGPT style


def train_gpt(wc, codes, labels, gen):
    """A c2i GPT on the tokenised training set. Class dropout as LlamaGen trains it: 10% of the labels
    become the null class (row num_classes), which is what makes CFG possible."""
    cfg = config_for(None, wc.image_size, 4, n_layer=wc.gpt_layers, n_head=4, dim=wc.gpt_dim,
                     vocab_size=wc.codebook_size, num_classes=NUM_CLASSES, class_dropout_prob=0.1)
    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
    gpt = GPT(cfg).train()  # dropout on while pretraining, as LlamaGen
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3, weight_decay=0.05, betas=(0.9, 0.95))
    steps = wc.gpt_epochs * math.ceil(len(codes) / 128)
    sched = warmup_cosine(opt, steps)
    for _ in range(wc.gpt_epochs):
        for b in batches(len(codes), 128, gen):
            y = labels[b].clone()
            y[torch.rand(len(b), generator=gen) < cfg.class_dropout_prob] = NUM_CLASSES  # class dropout
            logits = gpt(codes[b][:, :-1], y)  # (B, N, V): logits[:, j] predicts token j
            loss = F.cross_entropy(logits.flatten(0, 1), codes[b].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
            opt.step()
            sched.step()
    return gpt.eval().requires_grad_(False)


@torch.no_grad()
def sample_tokens(gpt, labels, cfg_scale, seed, bs=500):
    """Tokens (n, N) for the given labels, drawn in batches from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([generate(gpt, labels[i:i + bs], cfg_scale=cfg_scale, generator=gen)[0]
                      for i in range(0, len(labels), bs)])

# -----------------------------------------------------------------------------
# the small CNNs: reward classifier (~ CLIP), discriminator (~ realism judge), held-out judge


def reward_classifier():
    """world_class's network: three 3x3 convs, global average pool, 10 logits."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
                         nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, NUM_CLASSES))


def discriminator():
    """world_real's network: a smaller conv stack -> one real-vs-generated logit."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(16, 32, 3, 2, 1),
                         nn.LeakyReLU(0.2), nn.Conv2d(32, 64, 3, 2, 1), nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 1))


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


def fit(net, x, y, epochs, gen, loss_fn=F.cross_entropy, lr=2e-3, bs=128):
    """Adam with a one-cycle schedule; returns the network frozen in eval mode."""
    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
    net.apply(lambda m: m.reset_parameters() if hasattr(m, 'reset_parameters') else None)  # seeded init
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = warmup_cosine(opt, epochs * math.ceil(len(x) / bs))
    net.train()
    for _ in range(epochs):
        for b in batches(len(x), bs, gen):
            loss = loss_fn(net(x[b]).squeeze(-1), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def predict(net, x, bs=500):
    return torch.cat([net(x[i:i + bs]) for i in range(0, len(x), bs)])

# -----------------------------------------------------------------------------
# building the world (cached) and loading it back


def world_dir(wc):
    """root/<12 hex digits of the hash of the config fields that change what is built>."""
    key = {k: v for k, v in asdict(wc).items() if k not in NOT_KEYED} | {'version': VERSION}
    return os.path.join(wc.root, hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12])


def save_net(net, path):
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)


def load_net(path, net):
    net.load_state_dict(load_file(path))
    return net.eval().requires_grad_(False)


def build(wc, log=print):
    """Build every part of the world into world_dir(wc) and return its summary (also world.json)."""
    d, t0, gen, times = world_dir(wc), time.perf_counter(), torch.Generator().manual_seed(wc.seed), {}
    os.makedirs(d, exist_ok=True)
    lap = lambda name: times.__setitem__(name, round(time.perf_counter() - t0 - sum(times.values()), 1))
    x, y = make_split(wc.n_train, wc.seed, wc.image_size)
    xh, yh = make_split(wc.n_heldout, wc.seed + 1, wc.image_size)  # a different stream: unseen images
    lap('data')
    vq = train_vq(wc, x, gen)
    codes = encode_all(vq, x)
    lap('vq')
    log(f"world: VQ trained in {times['vq']} s; pretraining the generator")
    gpt = train_gpt(wc, codes, y, gen)
    lap('gpt')
    # both classifiers see real images and the same images through the tokenizer, so that they judge the
    # content of decoded samples rather than the VQ's blur (Inception and CLIP recognise LlamaGen's
    # reconstructions; this small VQ's are far blurrier)
    rec, rech = decode_all(vq, codes), decode_all(vq, encode_all(vq, xh))
    clf = fit(reward_classifier(), torch.cat([x, rec]), torch.cat([y, y]), wc.net_epochs, gen)
    judge = fit(Judge(wc.image_size), torch.cat([xh, rech]), torch.cat([yh, yh]), wc.net_epochs, gen)  # held out
    lap('classifiers')
    # the discriminator: VQ reconstructions of training images (real through the same decoder) vs base samples
    fake_y = torch.arange(wc.fakes) % NUM_CLASSES
    fakes = decode_all(vq, sample_tokens(gpt, fake_y, wc.cfg_scale, wc.seed + 2))
    real = rec[:wc.fakes]
    xd, yd = torch.cat([real, fakes]), torch.cat([torch.ones(len(real)), torch.zeros(len(fakes))])
    disc = fit(discriminator(), xd, yd, wc.net_epochs, gen, F.binary_cross_entropy_with_logits)
    lap('discriminator')
    save_vq(vq, os.path.join(d, 'vq.safetensors'))
    save_gpt(gpt, os.path.join(d, 'gpt.safetensors'))
    for name, net in (('classifier', clf), ('judge', judge), ('discriminator', disc)):
        save_net(net, os.path.join(d, f'{name}.safetensors'))
    torch.save(dict(x=xh, y=yh), os.path.join(d, 'heldout.pt'))
    summary = dict(config=asdict(wc), build_s=times, **world_stats(vq, clf, judge, disc, x, y, xh, yh))
    json.dump(summary, open(os.path.join(d, 'world.json'), 'w'), indent=1)
    return summary


@torch.no_grad()
def world_stats(vq, clf, judge, disc, x, y, xh, yh):
    """How good each part is on data it did not train on."""
    rec = decode_all(vq, encode_all(vq, xh))
    acc = lambda net, a, b: (predict(net, a).argmax(1) == b).float().mean().item()
    return dict(vq_mse=F.mse_loss(rec, xh).item(),  # held-out reconstruction error, pixels in [-1, 1]
                mean_image_mse=F.mse_loss(x.mean(0, keepdim=True).expand_as(xh), xh).item(),  # chance level
                codebook_used=int(encode_all(vq, x).unique().numel()),
                classifier_acc=acc(clf, xh, yh), classifier_acc_recon=acc(clf, rec, yh),
                judge_acc=acc(judge, x, y),  # the judge never saw the train split
                judge_acc_recon=acc(judge, decode_all(vq, encode_all(vq, x[:2000])), y[:2000]),
                disc_real=torch.sigmoid(predict(disc, rec)).mean().item())


class World:
    """A built world loaded back: vq, gpt (the base), classifier, judge, discriminator, held-out data."""

    def __init__(self, d):
        if not os.path.isfile(os.path.join(d, 'world.json')):
            raise FileNotFoundError(f"no world in {d}; build it with python world.py --preset demo")
        self.dir, self.summary = d, json.load(open(os.path.join(d, 'world.json')))
        known = {f.name for f in fields(WorldConfig)}  # a world.json of an older version may hold other keys
        self.config = WorldConfig(**{k: v for k, v in self.summary['config'].items() if k in known})
        self.vq = load_vq(os.path.join(d, 'vq.safetensors')).requires_grad_(False)
        self.gpt = load_gpt(os.path.join(d, 'gpt.safetensors')).requires_grad_(False)
        self.classifier = load_net(os.path.join(d, 'classifier.safetensors'), reward_classifier())
        self.judge = load_net(os.path.join(d, 'judge.safetensors'), Judge(self.config.image_size))
        self.discriminator = load_net(os.path.join(d, 'discriminator.safetensors'), discriminator())
        held = torch.load(os.path.join(d, 'heldout.pt'), weights_only=True)
        self.heldout_x, self.heldout_y = held['x'], held['y']


# The world's CPU work runs on one thread, whatever the machine: float sums then happen in one order, so the
# demo prints the same numbers on any core count. Measured here: built and tuned with 2 threads instead of 1,
# the same seeds gave a tuned held-out accuracy of 0.656 instead of 0.826 (RL amplifies rounding differences,
# and the world itself is trained on them). One thread costs time (world 289 s instead of 167 s on 2 cores).
THREADS = 1


@contextlib.contextmanager
def fixed_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def resolve(name, root='out/world'):
    """A world preset name ('demo', 'tiny') or a directory -> the directory of that world."""
    if name in WORLD_PRESETS:
        return world_dir(replace(WorldConfig(**WORLD_PRESETS[name]), preset=name, root=root))
    return name


def load_or_build(wc, log=print):
    d = world_dir(wc)
    if not os.path.isfile(os.path.join(d, 'world.json')):
        t = time.perf_counter()
        log(f"world: building {wc.preset!r} into {d} (once; cached by config hash)")
        build(wc, log)
        log(f"world: built in {time.perf_counter() - t:.0f} s")
    return World(d)

# -----------------------------------------------------------------------------
# measuring a generator: rewards, held-out judges, diversity, KL to the base


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
                hamming=pairwise_mean(tokens, labels, lambda a, b: (a != b).float().mean(-1)),
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
    """Sample per_class images of every class with fixed seeds and score them on everything."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    tokens = sample_tokens(gpt, labels, cfg_scale, seed)
    images = decode_all(w.vq, tokens)
    hit = (predict(w.judge, images).argmax(1) == labels).float()
    feats = lambda x: torch.cat([w.judge.features(x[i:i + 500]) for i in range(0, len(x), 500)])
    out = dict(world_class=predict(w.classifier, images).softmax(-1).gather(1, labels[:, None]).mean().item(),
               world_real=torch.sigmoid(predict(w.discriminator, images)).mean().item(),
               judge_acc=hit.mean().item(), judge_acc_se=(hit.std() / math.sqrt(len(hit))).item(),
               mini_fid=frechet_distance(*mean_cov(feats(w.heldout_x)), *mean_cov(feats(images))),
               pixel_div=pairwise_mean(images.flatten(1), labels, lambda a, b: (a - b).pow(2).mean(-1).sqrt()))
    out |= token_stats(tokens, labels) | model_stats(gpt, w.gpt, tokens, labels)
    return out, images


REWARDS = ('world_class', 'world_real')  # the world's rewards, by the names --rewards takes


class WorldScorer(nn.Module):
    """The miniature world's learned rewards (world.py), stand-ins for the paper's: 'class' = P(target
    class) from the reward classifier (~ CLIP fidelity), 'real' = the discriminator's P(real) (~ a realism
    judge). Both in (0, 1); one forward per batch on the images' device."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    @torch.no_grad()
    def forward(self, images, conditions):
        self.net.to(images.device)
        logits = self.net(images.float().clamp(-1, 1))  # trained on [-1, 1] pixels at the world's size
        if self.kind == "real":
            return torch.sigmoid(logits[:, 0])
        ids = torch.as_tensor([int(c) for c in conditions], device=images.device)
        return logits.softmax(-1).gather(1, ids[:, None])[:, 0]


def check_flags(world, rewards):
    """train.py's --world and the world's rewards, before anything is built. Raises UserError."""
    from cli import UserError
    if world and world not in WORLD_PRESETS and not os.path.isdir(world):
        raise UserError(f"--world {world!r} is neither a world preset ({', '.join(WORLD_PRESETS)}) "
                        f"nor a directory built by world.py; pass --world demo")
    if world and world not in WORLD_PRESETS and not os.path.isfile(os.path.join(world, 'world.json')):
        raise UserError(f"--world {world} holds no world (no world.json); build one with python world.py, or pass "
                        f"--world demo")
    if 'world_' in rewards and not world:
        raise UserError("the world_class / world_real rewards need a world; pass --world demo (or --preset demo)")


def reward_scorers(world, spec, fid_decay=0.9):
    """{name: scorer} of the world's rewards that the reward spec names, to hand to rewards.build_reward."""
    return {n: reward_scorer(world, n) for n in parse_spec(spec, REWARDS) if n in REWARDS}


def reward_scorer(world, name):
    """The scorer named `name` (one of REWARDS) of a world (a preset or a directory), to hand to
    rewards.build_reward: 'world_class' -> the reward classifier, 'world_real' -> the discriminator."""
    d = resolve(world)
    if not os.path.isfile(os.path.join(d, 'world.json')):
        raise FileNotFoundError(f"the world {world!r} is not built ({d}); run python world.py --preset {world}")
    if name == 'world_class':
        return WorldScorer(load_net(os.path.join(d, 'classifier.safetensors'), reward_classifier()), 'class')
    return WorldScorer(load_net(os.path.join(d, 'discriminator.safetensors'), discriminator()), 'real')

# -----------------------------------------------------------------------------
# the demo: GRPO in the world (train.py's own loop), a shuffled-reward control, the report


def prepare(tcfg, log=print):
    """Build or load tcfg.world and point the TrainConfig at its generator, tokenizer and reward nets."""
    if tcfg.world in WORLD_PRESETS:
        with fixed_threads():
            w = load_or_build(WorldConfig(**{**WORLD_PRESETS[tcfg.world], 'preset': tcfg.world}), log)
    else:
        w = World(tcfg.world)
    tcfg.ckpt = tcfg.ckpt or os.path.join(w.dir, 'gpt.safetensors')  # '' = the world's pretrained base
    tcfg.vq_ckpt = tcfg.vq_ckpt or os.path.join(w.dir, 'vq.safetensors')
    tcfg.world, tcfg.image_size = w.dir, w.config.image_size
    return w


def accuracy_hook(w, tcfg, every=10, per_class=8):
    """A train.py hook: held-out judge accuracy on fixed seeds every `every` steps (the curve)."""
    def hook(step, policy):
        if step % every and step != 1:
            return {}
        labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        images = decode_all(w.vq, sample_tokens(policy, labels, tcfg.cfg_scale, 999))
        return {'judge_acc': (predict(w.judge, images).argmax(1) == labels).float().mean().item()}
    return hook


def run_pair(w, tcfg, train_fn, log=print):
    """GRPO with the real rewards and the shuffled control from the same start and seeds -> results."""
    runs = {}
    for name, shuffle in (('tuned', False), ('control', True)):
        cfg = replace(tcfg, shuffle_rewards=shuffle, out_dir=os.path.join(tcfg.out_dir, name))
        t = time.perf_counter()
        rows = train_fn(cfg, accuracy_hook(w, cfg))
        secs = time.perf_counter() - t
        gpt = load_gpt(os.path.join(cfg.out_dir, 'latest', 'model.safetensors')).requires_grad_(False)
        runs[name] = dict(rows=rows, seconds=secs, gpt=gpt)
        log(f"world: {name} run, {len(rows)} GRPO steps in {secs:.0f} s")
    return runs


def run_demo(tcfg, train_fn, log=print):
    """python train.py --preset demo: world, base, GRPO + control, the base-vs-tuned table, grids, curves."""
    with fixed_threads():
        return _run_demo(tcfg, train_fn, log)


def _run_demo(tcfg, train_fn, log):
    torch.manual_seed(0)
    t0 = time.perf_counter()
    w = prepare(tcfg, log)
    t1 = time.perf_counter()
    runs = run_pair(w, tcfg, train_fn, log)
    t2 = time.perf_counter()
    per = w.config.eval_per_class
    res = {'base': measure(w, w.gpt, tcfg.cfg_scale, per)}
    res |= {k: measure(w, runs[k]['gpt'], tcfg.cfg_scale, per) for k in ('tuned', 'control')}
    times = dict(world_s=t1 - t0, grpo_s=t2 - t1, tuned_s=runs['tuned']['seconds'],
                 control_s=runs['control']['seconds'], eval_s=time.perf_counter() - t2)
    table = report(w, tcfg, {k: v[0] for k, v in res.items()}, times)
    print(table, flush=True)
    open(os.path.join(tcfg.out_dir, 'report.md'), 'w').write(table)
    write_before_after(os.path.join(tcfg.out_dir, 'before_after.png'), w, res['base'][1], res['tuned'][1], per)
    plot_lines(os.path.join(tcfg.out_dir, 'curves.png'), runs)
    return {k: v[0] for k, v in res.items()}


ROWS = [('world_class', 'reward: P(target class), reward classifier', '.3f'),
        ('world_real', 'reward: P(real), discriminator', '.3f'),
        ('judge_acc', 'held-out judge: class accuracy', '.3f'),
        ('mini_fid', 'held-out judge: mini-FID to held-out images', '.2f'),
        ('pixel_div', 'pixel diversity: within-class RMS distance', '.3f'),
        ('hamming', 'token diversity: within-class Hamming distance', '.3f'),
        ('distinct', 'distinct token sequences', '.3f'),
        ('top_token_share', 'share of the most common token', '.3f'),
        ('entropy', 'per-token entropy (nats)', '.3f'),
        ('kl_to_base', 'KL to the base (nats/token)', '.4f')]


def report(w, tcfg, res, times):
    """The markdown table the README quotes, with the world's own quality and the target checks."""
    s = w.summary
    n = NUM_CLASSES * w.config.eval_per_class
    lines = [f"world {w.dir}: VQ held-out MSE {s['vq_mse']:.4f} (mean image {s['mean_image_mse']:.4f}), "
             f"{s['codebook_used']}/{w.config.codebook_size} codes used; reward classifier {s['classifier_acc']:.3f} "
             f"on held-out images ({s['classifier_acc_recon']:.3f} reconstructed); judge {s['judge_acc']:.3f} on "
             f"train images ({s['judge_acc_recon']:.3f} reconstructed); built in {sum(s['build_s'].values()):.0f} s",
             f"{n} samples ({w.config.eval_per_class} per class, same seeds), cfg {tcfg.cfg_scale}, "
             f"{tcfg.max_steps} steps, lr {tcfg.lr}, beta {tcfg.beta}, rewards {tcfg.rewards}", '',
             '| metric | base | GRPO | shuffled-reward control |', '|---|---|---|---|']
    for key, name, fmt in ROWS:
        cell = lambda r: format(r[key], fmt) + (f" ± {r['judge_acc_se']:.3f}" if key == 'judge_acc' else '')
        lines.append(f"| {name} | {cell(res['base'])} | {cell(res['tuned'])} | {cell(res['control'])} |")
    b, t = res['base'], res['tuned']
    need = b['judge_acc'] + (1 - b['judge_acc']) / 2
    lines += ['', f"targets: judge accuracy {t['judge_acc']:.3f} vs >= {need:.3f} (half the base's error): "
              f"{'met' if t['judge_acc'] >= need else 'MISSED'}; mini-FID {t['mini_fid']:.2f} vs <= "
              f"{1.1 * b['mini_fid']:.2f}: {'met' if t['mini_fid'] <= 1.1 * b['mini_fid'] else 'MISSED'}; pixel "
              f"diversity {t['pixel_div']:.3f} vs > {b['pixel_div'] / 2:.3f}: "
              f"{'met' if t['pixel_div'] > b['pixel_div'] / 2 else 'MISSED'}",
              "times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())]
    return '\n'.join(lines) + '\n'


def write_before_after(path, w, before, after, per_class, cols=8, real=3, zoom=4):
    """One row per class: `real` held-out images | `cols` base samples | `cols` GRPO samples drawn with the same
    seeds. Under each sample a bar: green when the held-out judge (never a reward) recognises its class."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    pick = lambda x: x.view(NUM_CLASSES, per_class, *x.shape[1:])[:, :cols]  # (10, cols, ...)
    ok = {k: pick(predict(w.judge, x).argmax(1) == labels) for k, x in (('base', before), ('tuned', after))}
    reals = torch.stack([w.heldout_x[w.heldout_y == c][:real] for c in range(NUM_CLASSES)])  # (10, real, 3, H, W)
    H, W = before.shape[-2:]
    t, gap, top, left = H * zoom, 6, 16, 70  # tile side, gap between blocks, header and label widths (px)
    blocks = [('held-out real', reals, None), ('base', pick(before), ok['base']), ('GRPO', pick(after), ok['tuned'])]
    xs = [left]
    for _, imgs, _ in blocks[:-1]:
        xs.append(xs[-1] + imgs.shape[1] * t + gap)
    canvas = Image.new('RGB', (xs[-1] + cols * t, top + NUM_CLASSES * (t + 4)), 'white')
    draw = ImageDraw.Draw(canvas)
    for x0, (title, imgs, hits) in zip(xs, blocks):
        draw.text((x0, 2), title, fill='black')
        tiles = to_uint8(imgs).permute(0, 1, 3, 4, 2).cpu().numpy()  # (10, n, H, W, 3)
        for c in range(NUM_CLASSES):
            y = top + c * (t + 4)
            for k in range(tiles.shape[1]):
                canvas.paste(Image.fromarray(tiles[c, k]).resize((t, t), Image.NEAREST), (x0 + k * t, y))
                if hits is not None:  # the judge's verdict: a 3-px bar under the tile
                    colour = (40, 170, 60) if hits[c, k] else (210, 50, 40)
                    draw.rectangle([x0 + k * t + 1, y + t, x0 + (k + 1) * t - 2, y + t + 2], fill=colour)
    for c in range(NUM_CLASSES):
        draw.text((2, top + c * (t + 4) + t // 2 - 6), f"{SHAPES[c % 5]}, {('warm', 'cool')[c // 5]}", fill='black')
    canvas.save(path)


def plot_lines(path, runs, size=(720, 300), pad=36):
    """Two panels drawn with PIL: the mean reward per step and held-out judge accuracy, GRPO (blue)
    beside the shuffled control (orange)."""
    img = Image.new('RGB', (size[0], 2 * size[1]), 'white')
    d = ImageDraw.Draw(img)
    colours = {'tuned': (20, 60, 200), 'control': (230, 120, 20)}
    for panel, key in enumerate(('reward', 'judge_acc')):
        series = {k: [(r['step'], r[key]) for r in v['rows'] if key in r] for k, v in runs.items()}
        ys = [y for s in series.values() for _, y in s]
        lo, hi = min(ys), max(max(ys), min(ys) + 1e-6)
        x1, y0 = max(x for s in series.values() for x, _ in s), panel * size[1]
        box = [pad, y0 + pad, size[0] - pad, y0 + size[1] - pad]
        d.rectangle(box, outline='black')
        for k, s in series.items():
            pts = [(pad + x / x1 * (box[2] - pad), box[3] - (y - lo) / (hi - lo) * (box[3] - box[1])) for x, y in s]
            d.line(pts, fill=colours[k], width=2)
        d.text((pad, y0 + 10), f"{key} per step: GRPO (blue) vs shuffled control (orange)   {lo:.3f} .. {hi:.3f}",
               fill='black')
    img.save(path)

# -----------------------------------------------------------------------------
# main: build and summarise


def main(argv=None):
    from cli import parse_config
    wc = parse_config(WorldConfig, argv, presets=WORLD_PRESETS)
    torch.set_num_threads(THREADS)  # see fixed_threads
    w = load_or_build(wc)
    print(json.dumps({k: v for k, v in w.summary.items() if k != 'config'}, indent=1))
    base, _ = measure(w, w.gpt, wc.cfg_scale, wc.eval_per_class)
    print("base generator at cfg", wc.cfg_scale, json.dumps({k: round(v, 4) for k, v in base.items()}))


if __name__ == '__main__':
    import sys
    from cli import run
    sys.exit(run(main))  # a bad flag: one sentence, exit code 2, as train.py
