"""
Batched image rewards for GRPO: semantic fidelity, perceptual quality, realism.

Scorers: clip (semantic fidelity, CLIPScore), quality (perceptual quality, CLIP-IQA), hps (realism /
human preference, HPSv2.1), and the weight-free colorfulness and class_color for offline demos. Each is
`scorer(images, conditions) -> Tensor[B]` float32, images (B, 3, H, W) in the VQ decoder's range [-1, 1]
on any device, conditions B ImageNet class ids or B prompts; preprocessing in torch on the device, one
forward per batch, bf16 autocast on GPU, each backbone loaded once per process (clip and quality share).
Run: `python rewards.py` (offline smoke demo); `build_reward("clip=1,hps=1")(images, conds)` in training.

Follows AR-GRPO (arXiv 2508.06924), which rewards CLIP, HPSv2 and MANIQA, except: `quality` is CLIP-IQA
(Wang, Chan, Loy, AAAI 2023) instead of MANIQA, whose weights AR-GRPO never shipped, on the `clip`
ViT-L-14 at 224 px instead of CLIP-IQA's RN50 at native size; scoring is batched on the device, not one
PIL image at a time. HPS follows hpsv2/img_score.py (full state dict; diag of normalised img @ text).
"""
import functools
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import open_clip
from huggingface_hub import hf_hub_download

from model import cache_only_if_offline, hub_cache_dir
from open_clip.constants import OPENAI_DATASET_MEAN as OPENAI_MEAN, OPENAI_DATASET_STD as OPENAI_STD

HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
SCORERS = ("clip", "quality", "hps", "colorfulness", "class_color", "world_class", "world_real")


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable (e.g. offline)."""


# -----------------------------------------------------------------------------
# preprocessing and conditions


def to_unit(images):  # (B, 3, H, W) in [-1, 1], possibly overshooting -> float32 in [0, 1]
    return (images.float().clamp(-1, 1) + 1) / 2


def clip_preprocess(images, size, mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode="shortest"):
    """(B, 3, H, W) in [-1, 1] -> normalised CLIP pixels (B, 3, size, size), batched in torch.

    'shortest' = open_clip's eval transform (torchvision Resize(size) + CenterCrop); 'longest' = HPSv2's
    ResizeMaxSize (long side to size, black padding). Like PIL, resize width then height with the
    antialiased filter (bicubic a=-0.5) and clamp in between, so overshoot saturates as in uint8.
    """
    x = to_unit(images)
    h, w = x.shape[-2:]
    if resize_mode == "shortest":  # torchvision: the long side becomes int(size * long / short)
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    else:  # 'longest', as open_clip ResizeKeepRatio: round(side * size / long)
        assert resize_mode == "longest", f"resize_mode {resize_mode!r} is not supported"
        nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    for hw in ((h, nw), (nh, nw)):  # as PIL: a width pass, then a height pass, clamped in between
        if hw != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=hw, mode="bicubic", antialias=True).clamp(0, 1)
    ph, pw = max(size - nh, 0), max(size - nw, 0)  # pad, then centre-crop, as center_crop_or_pad
    x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
    top, left = int(round((x.shape[-2] - size) / 2)), int(round((x.shape[-1] - size) / 2))
    x = x[..., top:top + size, left:left + size]
    return (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)


def class_ids(conditions, n):
    """Conditions -> list of n ImageNet class ids, or None when they are n prompts."""
    if len(conditions) != n:
        raise ValueError(f"got {len(conditions)} conditions for {n} images; pass one per image.")
    if all(isinstance(c, str) for c in conditions):
        return None
    ids = [int(c) for c in conditions]  # LongTensor (B,) or list of ints
    if any(not 0 <= i < len(open_clip.IMAGENET_CLASSNAMES) for i in ids):
        raise ValueError(f"class ids must be ImageNet ids in 0..999, got {ids}.")
    return ids


def condition_texts(conditions, n, templates=False):
    """One tuple of texts per image: (prompt,), or for a class id ("a photo of a {class}.",) or its
    CLIP ImageNet templates (80, averaged by encode_texts)."""
    ids = class_ids(conditions, n)
    if ids is None:
        return [(c,) for c in conditions]
    names = [open_clip.IMAGENET_CLASSNAMES[i] for i in ids]
    tmpl = open_clip.OPENAI_IMAGENET_TEMPLATES if templates else [lambda c: f"a photo of a {c}."]
    return [tuple(t(c) for t in tmpl) for c in names]


# -----------------------------------------------------------------------------
# scorers on an open_clip model


class ClipScorer(nn.Module):
    """Shared plumbing of the open_clip scorers. model: an open_clip CLIP (frozen here); tokenizer:
    open_clip.get_tokenizer(arch); size, mean, std from model.visual.preprocess_cfg (bicubic resize)."""

    def __init__(self, model, tokenizer, resize_mode=None):
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        cfg = getattr(model.visual, "preprocess_cfg", {})
        size = cfg.get("size", model.visual.image_size)
        self.size = size if isinstance(size, int) else size[0]  # square towers only
        self.mean, self.std = tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))
        self.resize_mode = resize_mode or cfg.get("resize_mode", "shortest")
        self.text_cache = {}  # tuple of texts -> (D,) feature: class prompts repeat every step

    def _run(self, encode, x):  # -> (N, D) unit-norm float32 features, bf16 autocast on GPU
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            return F.normalize(encode(x).float(), dim=-1)

    def encode_texts(self, keys):  # list of text tuples -> (len, D); a tuple's features averaged
        new = [k for k in dict.fromkeys(keys) if k not in self.text_cache]  # dedupe (GRPO groups)
        if new:
            tokens = self.tokenizer([t for k in new for t in k]).to(next(self.model.parameters()).device)
            feats = self._run(self.model.encode_text, tokens).split([len(k) for k in new])
            if len(self.text_cache) > 10_000:
                self.text_cache.clear()
            self.text_cache.update({k: F.normalize(f.mean(0), dim=-1) for k, f in zip(new, feats)})
        return torch.stack([self.text_cache[k] for k in keys])

    @torch.no_grad()
    def forward(self, images, conditions):
        x = images.to(next(self.model.parameters()).device)
        pixels = clip_preprocess(x, self.size, self.mean, self.std, self.resize_mode)
        return self.score_pixels(pixels, conditions).to(images.device)


class ClipScore(ClipScorer):
    """Semantic fidelity (CLIPScore): cosine(image, text) in [-1, 1], without CLIPScore's
    2.5 * max(., 0) rescale; real image-caption pairs score ~0.2-0.35 with ViT-L-14."""

    def __init__(self, model, tokenizer, templates=False, resize_mode=None):
        super().__init__(model, tokenizer, resize_mode)
        self.templates = templates

    def score_pixels(self, pixels, conditions):  # (B, 3, S, S) normalised -> (B,)
        texts = self.encode_texts(condition_texts(conditions, len(pixels), self.templates))
        return (self._run(self.model.encode_image, pixels) * texts).sum(-1)


class ClipIQA(ClipScorer):
    """Perceptual quality (CLIP-IQA): softmax over the antonym pair of logit_scale * cosine (CLIP's
    fixed 100, as CLIP-IQA uses); the positive prompt's probability, in (0, 1). Ignores conditions."""

    def __init__(self, model, tokenizer, prompts=("Good photo.", "Bad photo."), logit_scale=100.0):
        super().__init__(model, tokenizer)
        self.prompts, self.logit_scale = prompts, logit_scale

    def score_pixels(self, pixels, conditions):  # (B, 3, S, S) normalised -> (B,)
        anchors = self.encode_texts([(p,) for p in self.prompts])  # (2, D)
        logits = self.logit_scale * self._run(self.model.encode_image, pixels) @ anchors.T  # (B, 2)
        return logits.softmax(-1)[:, 0]


class HPSv2(ClipScore):
    """Realism / human preference (HPSv2.1): CLIPScore on HPS's ViT-H-14 with its long-side resize + pad."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, templates=False, resize_mode="longest")


# -----------------------------------------------------------------------------
# weight-free scorers: meaningful alone, they drive the offline demos


class Colorfulness(nn.Module):
    """Hasler & Susstrunk (2003): M = sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2) with
    rg = R - G, yb = (R + G) / 2 - B on [0, 1] pixels, i.e. the paper's [0, 255] value / 255.
    0 for grey, 0.32 is the paper's 'highly colourful', ~1.07 at most (red/blue halves)."""

    @torch.no_grad()
    def forward(self, images, conditions=None):
        r, g, b = to_unit(images).flatten(2).unbind(1)  # (B, HW) each
        rg, yb = r - g, 0.5 * (r + g) - b  # opponent colour channels
        sd = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()
        return sd + 0.3 * (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()


def class_target_color(ids):
    """(B,) ids -> (B, 3) RGB in [0.1, 0.9], 0.49 from mid-grey; golden-ratio hue steps part neighbours."""
    hue = (torch.as_tensor(ids, dtype=torch.float64) * 0.6180339887498949) % 1
    phase = torch.tensor([0.0, 1 / 3, 2 / 3], dtype=torch.float64)
    return (0.5 + 0.4 * torch.cos(2 * math.pi * (hue[:, None] + phase))).float()


class ClassColor(nn.Module):
    """Class-to-image toy reward: 1 - |mean RGB - class colour| / sqrt(3) on [0, 1] pixels. Range
    [0, 1], 1 = exact match, 0.717 for mid-grey; linear in the distance, so it never saturates."""

    @torch.no_grad()
    def forward(self, images, conditions):
        ids = class_ids(conditions, len(images))
        if ids is None:
            raise ValueError("class_color needs class ids, not prompts; use it for class-to-image.")
        mean = to_unit(images).mean((2, 3))  # (B, 3)
        return 1 - (mean - class_target_color(ids).to(mean.device)).norm(dim=-1) / math.sqrt(3)


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


# -----------------------------------------------------------------------------
# loading (once per process) and the weighted combination


def _fetch(what, download, arg):
    try:
        with cache_only_if_offline():  # offline: fail at once instead of retrying for ~25 s
            return download()
    except Exception as e:  # offline, not in the cache, or a hub error
        raise WeightsUnavailable(f"{what} are not in the Hugging Face cache {hub_cache_dir()} and "
                                 f"could not be downloaded ({type(e).__name__}); set HF_HOME to a cache that "
                                 f"has them or pass a local file as {arg}.") from None


@functools.cache  # once per process and (arch, weights, device): clip and quality share the result
def load_clip(arch="ViT-L-14", pretrained="openai", device="cpu"):
    """-> (open_clip model, tokenizer). pretrained: an open_clip tag (fetched from the HF hub into HF_HOME),
    a checkpoint file (OpenAI weights need arch 'ViT-L-14-quickgelu'), or None for random weights."""
    tag = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    what = f"CLIP weights {arch}/{pretrained} (HF repo {tag.get('hf_hub', '').rstrip('/')})"
    path = _fetch(what, lambda: open_clip.download_pretrained(tag), "clip_pretrained") if tag else pretrained
    pp = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
    model = open_clip.create_model(arch, pretrained=path, device=device, force_preprocess_cfg=pp,
                                   force_quick_gelu=tag.get("quick_gelu", False))
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(arch)


@functools.cache
def load_hps(ckpt=None, arch="ViT-H-14", device="cpu"):
    """-> (HPSv2.1 model, tokenizer): `arch` built empty, then checkpoint['state_dict'], which holds
    every weight, loaded strictly. ckpt: a local file, or None to fetch it from the HF hub."""
    if ckpt is None:
        ckpt = _fetch(f"HPSv2.1 weights ({HPS_FILE} from HF repo {HPS_REPO})",
                      lambda: hf_hub_download(HPS_REPO, HPS_FILE, cache_dir=hub_cache_dir()), "hps_ckpt")
    elif not os.path.isfile(ckpt):
        raise WeightsUnavailable(f"HPS checkpoint {ckpt} does not exist; pass the path of {HPS_FILE}.")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(f"{ckpt} is not an HPSv2 checkpoint (no 'state_dict' key); pass {HPS_FILE}.")
    model = open_clip.create_model(arch, pretrained=None)
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval().requires_grad_(False), open_clip.get_tokenizer(arch)


def parse_spec(spec):
    """'clip=1,quality=0.5' or {'clip': 1, 'quality': 0.5} -> {name: float weight}."""
    if isinstance(spec, dict):
        items = spec.items()
    else:  # a part without '=' gets the weight '', which fails below
        items = [part.partition("=")[::2] for part in str(spec).split(",")]
    weights = {}
    for name, w in items:
        name = str(name).strip()
        if name not in SCORERS:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; known rewards: {', '.join(SCORERS)}.")
        try:
            w = float(w)
        except (TypeError, ValueError):
            w = math.nan
        if name in weights or not math.isfinite(w):
            raise ValueError(f"bad reward spec {spec!r}; give each reward once as name=weight, e.g. 'clip=1'.")
        weights[name] = w
    return weights


class CombinedReward(nn.Module):
    """(images, conditions) -> (sum_k w_k * score_k (B,), {name: raw score (B,)}), raw for logging."""

    def __init__(self, scorers, weights):
        super().__init__()
        self.scorers, self.weights = nn.ModuleDict(scorers), dict(weights)

    @torch.no_grad()
    def forward(self, images, conditions):
        raw = {name: scorer(images, conditions) for name, scorer in self.scorers.items()}
        return sum(self.weights[k] * v for k, v in raw.items()), raw


def build_reward(spec, device="cpu", clip_model="ViT-L-14", clip_pretrained="openai", clip_templates=False,
                 hps_model="ViT-H-14", hps_ckpt=None, world=""):
    """spec -> CombinedReward. clip_model/clip_pretrained: open_clip arch and tag or file, shared by clip
    and quality; clip_templates: average CLIP's 80 ImageNet prompts for class ids; hps_model/hps_ckpt:
    HPS architecture and checkpoint file (None = HF hub); world: a world.py preset or directory (world_*)."""
    scorers, weights = {}, parse_spec(spec)
    for name in weights:
        if name in ("clip", "quality"):
            model, tok = load_clip(clip_model, clip_pretrained, str(device))
            scorers[name] = ClipScore(model, tok, clip_templates) if name == "clip" else ClipIQA(model, tok)
        elif name == "hps":
            scorers[name] = HPSv2(*load_hps(hps_ckpt, hps_model, str(device)))
        elif name.startswith("world_"):
            import world as world_py  # lazily: world.py imports the training stack
            scorers[name] = WorldScorer(world_py.load_reward_net(world, name), name[6:])
        else:
            scorers[name] = Colorfulness() if name == "colorfulness" else ClassColor()
    return CombinedReward(scorers, weights)


if __name__ == "__main__":
    torch.manual_seed(0)
    ids, reward = torch.arange(8), build_reward("colorfulness=1,class_color=1")
    blobs = F.interpolate(torch.rand(8, 3, 4, 4) * 2 - 1, size=16, mode="bilinear")  # decoder-like
    colours = class_target_color(ids)[:, :, None, None].expand(8, 3, 16, 16) * 2 - 1  # scores 1
    for name, images in [("noise", torch.rand(8, 3, 16, 16) * 2 - 1), ("blobs", blobs), ("colours", colours)]:
        total, raw = reward(images, ids)
        print(f"{name:>7}: " + "  ".join(f"{k} {v.mean():.3f}±{v.std():.3f}" for k, v in raw.items()))
    tiny = open_clip.CLIP(16, dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
                          dict(width=16, heads=2, layers=1)), open_clip.get_tokenizer("ViT-B-32")
    print("tiny random-weight CLIP, plumbing only:", {c.__name__: tuple(c(*tiny)(blobs, ids).shape)
                                                     for c in (ClipScore, ClipIQA, HPSv2)})
