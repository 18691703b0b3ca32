"""
Batched image rewards for GRPO: semantic fidelity, perceptual quality, realism.

Every scorer has one signature, `scorer(images, conditions) -> Tensor[B]` (float32):
images are a (B, 3, H, W) float batch in the VQ decoder's range [-1, 1] (clamped), on any
device; conditions are B ImageNet class ids (class-to-image) or B prompts (text-to-image).
Preprocessing runs in torch on the device, one forward per batch, under no_grad, with bf16
autocast on GPU; each backbone is loaded once per process and shared.

    clip          semantic fidelity: CLIPScore, cosine(image, text), open_clip ViT-L-14/openai
    quality       perceptual quality: CLIP-IQA, P("Good photo.") on the same ViT-L-14
    hps           human preference: HPSv2.1, open_clip ViT-H-14 + xswu/HPSv2 weights
    colorfulness  weight-free: Hasler-Susstrunk colourfulness (offline demos and tests)
    class_color   weight-free: mean colour vs a fixed per-class colour (class-to-image)

Run: `python rewards.py` (offline smoke demo). Use: `reward = build_reward("clip=1,quality=1,
hps=1", device="cuda"); total, raw = reward(images, class_ids_or_prompts)`.

Follows AR-GRPO (arXiv 2508.06924), which rewards CLIP, HPSv2 and MANIQA scores, with these
departures: `quality` is CLIP-IQA (Wang, Chan, Loy, AAAI 2023) instead of MANIQA, whose
weights AR-GRPO never shipped, computed with the `clip` ViT-L-14 at 224 px rather than
CLIP-IQA's RN50 at native resolution; scoring is batched on the device rather than one PIL
image at a time; HPS follows hpsv2/img_score.py (full state dict, normalised features, diag).
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import open_clip
from huggingface_hub import constants as hf_constants, hf_hub_download
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
SCORERS = ("clip", "quality", "hps", "colorfulness", "class_color")


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable (e.g. offline)."""

# -----------------------------------------------------------------------------
# preprocessing and conditions


def to_unit(images):
    """(B, 3, H, W) in [-1, 1], possibly overshooting -> float32 in [0, 1]."""
    return (images.float().clamp(-1, 1) + 1) / 2


def clip_preprocess(images, size, mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode="shortest",
                    interpolation="bicubic"):
    """(B, 3, H, W) in [-1, 1] -> normalised CLIP pixels (B, 3, size, size), batched in torch.

    'shortest' = open_clip's eval transform (torchvision Resize(size) + CenterCrop); 'longest'
    = HPSv2's ResizeMaxSize (long side to size, black padding). antialias=True makes torch use
    PIL's filter (bicubic a=-0.5, widened on downscale); the clamp mimics PIL's uint8 saturation.
    """
    x = to_unit(images)
    h, w = x.shape[-2:]
    if resize_mode == "shortest":  # torchvision: long side becomes int(size * long / short)
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    elif resize_mode == "longest":  # open_clip ResizeKeepRatio: round(side * size / long)
        nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    else:
        raise ValueError(f"resize_mode must be 'shortest' or 'longest', not {resize_mode!r}.")
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode=interpolation, antialias=True, align_corners=False)
        x = x.clamp(0, 1)
    ph, pw = max(size - nh, 0), max(size - nw, 0)  # pad then centre-crop, as center_crop_or_pad
    x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
    top, left = int(round((x.shape[-2] - size) / 2)), int(round((x.shape[-1] - size) / 2))
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


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
    """One tuple of texts per image: (prompt,), or the class prompt(s) for a class id."""
    ids = class_ids(conditions, n)
    if ids is None:
        return [(c,) for c in conditions]
    names = [open_clip.IMAGENET_CLASSNAMES[i] for i in ids]
    if templates:  # CLIP's 80 ImageNet prompts, averaged in encode_texts
        return [tuple(t(c) for t in open_clip.OPENAI_IMAGENET_TEMPLATES) for c in names]
    return [(f"a photo of a {c}.",) for c in names]

# -----------------------------------------------------------------------------
# scorers on an open_clip model


class ClipScorer(nn.Module):
    """Plumbing shared by the open_clip scorers: batched preprocessing, unit-norm features.

    model: an open_clip CLIP (frozen here); tokenizer: open_clip.get_tokenizer(name). Size,
    mean, std and interpolation come from model.visual.preprocess_cfg (set by open_clip).
    Exposes .model, .tokenizer, .size, .mean, .std, .resize_mode for bench.py.
    """

    def __init__(self, model, tokenizer, resize_mode=None):
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        cfg = getattr(model.visual, "preprocess_cfg", {})
        size = cfg.get("size", model.visual.image_size)
        self.size = size if isinstance(size, int) else size[0]  # square towers only
        self.mean, self.std = tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))
        self.resize_mode = resize_mode or cfg.get("resize_mode", "shortest")
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.text_cache = {}  # tuple of texts -> (D,) feature; class prompts repeat every step

    def _autocast(self, x):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda)

    def encode_images(self, pixels):  # (B, 3, S, S) -> (B, D) unit norm, float32
        with self._autocast(pixels):
            return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def encode_texts(self, keys):  # list of text tuples -> (len, D); a tuple's features averaged
        device = next(self.model.parameters()).device
        new = [k for k in dict.fromkeys(keys) if k not in self.text_cache]  # dedupe (GRPO groups)
        if new:
            tokens = self.tokenizer([t for k in new for t in k]).to(device)
            with self._autocast(tokens):
                feats = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            if len(self.text_cache) > 10_000:
                self.text_cache.clear()
            for k, f in zip(new, feats.split([len(k) for k in new])):
                self.text_cache[k] = F.normalize(f.mean(0), dim=-1)
        return torch.stack([self.text_cache[k] for k in keys])

    @torch.no_grad()
    def forward(self, images, conditions):
        device = next(self.model.parameters()).device
        pixels = clip_preprocess(images.to(device), self.size, self.mean, self.std,
                                 self.resize_mode, self.interpolation)
        return self.score_pixels(pixels, conditions).to(images.device)

    def pil_transform(self):
        """open_clip's own PIL eval transform with this scorer's settings."""
        return open_clip.image_transform(self.size, is_train=False, mean=self.mean, std=self.std,
                                         resize_mode=self.resize_mode, interpolation=self.interpolation)

    @torch.no_grad()
    def score_pil_loop(self, images, conditions):
        """Baseline, not for training: one uint8 PIL image at a time through open_clip's
        transform, text encoded per image too, as AR-GRPO's reward code does (bench, tests)."""
        device, tf = next(self.model.parameters()).device, self.pil_transform()
        scores = []
        for i in range(len(images)):
            u8 = (to_unit(images[i]) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            self.text_cache.clear()
            scores.append(self.score_pixels(tf(Image.fromarray(u8))[None].to(device), conditions[i:i + 1]))
        return torch.cat(scores).to(images.device)


class ClipScore(ClipScorer):
    """Semantic fidelity (CLIPScore): cosine(image, text) in [-1, 1], without CLIPScore's
    2.5 * max(., 0) rescale; text = the prompt or "a photo of a {class}." (or 80 templates)."""

    def __init__(self, model, tokenizer, templates=False, resize_mode=None):
        super().__init__(model, tokenizer, resize_mode)
        self.templates = templates

    def score_pixels(self, pixels, conditions):
        texts = self.encode_texts(condition_texts(conditions, len(pixels), self.templates))
        return (self.encode_images(pixels) * texts).sum(-1)  # (B,)


class ClipIQA(ClipScorer):
    """Perceptual quality (CLIP-IQA): softmax over the antonym pair of 100 * cosine logits
    (CLIP's fixed logit scale, as CLIP-IQA uses), probability of the positive; in (0, 1).
    Conditions are ignored."""

    def __init__(self, model, tokenizer, prompts=("Good photo.", "Bad photo.")):
        super().__init__(model, tokenizer)
        self.prompts = prompts

    def score_pixels(self, pixels, conditions):
        anchors = self.encode_texts([(p,) for p in self.prompts])  # (2, D)
        return (100 * self.encode_images(pixels) @ anchors.T).softmax(-1)[:, 0]  # (B,)


class HPSv2(ClipScore):
    """Realism / human preference (HPSv2.1): cosine of image and prompt features of the HPS
    fine-tuned ViT-H-14, after HPSv2's long-side resize + pad; real generations score ~0.2-0.35."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, templates=False, resize_mode="longest")

# -----------------------------------------------------------------------------
# weight-free scorers: they mean something alone and drive the offline demos


class Colorfulness(nn.Module):
    """Hasler & Susstrunk (2003) M = sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2),
    rg = R - G, yb = (R + G) / 2 - B, on [0, 1] pixels: the paper's [0, 255] value / 255.
    0 for grey images, ~0.32 'highly colourful' in the paper, ~1.07 max (red/blue halves)."""

    @torch.no_grad()
    def forward(self, images, conditions=None):
        r, g, b = to_unit(images).flatten(2).unbind(1)  # (B, HW) each
        rg, yb = r - g, 0.5 * (r + g) - b  # opponent colour channels
        sd = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()
        mu = (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()
        return sd + 0.3 * mu


def class_target_color(ids):
    """(B,) class ids -> (B, 3) RGB in [0.1, 0.9]: a hue wheel stepped by the golden ratio so
    neighbouring classes get distant hues; every target lies 0.49 from mid-grey."""
    hue = (torch.as_tensor(ids, dtype=torch.float64) * 0.6180339887498949) % 1
    phase = torch.tensor([0.0, 1 / 3, 2 / 3], dtype=torch.float64)
    return (0.5 + 0.4 * torch.cos(2 * math.pi * (hue[:, None] + phase))).float()


class ClassColor(nn.Module):
    """Class-to-image toy reward: 1 - |mean RGB - target colour of the class| / sqrt(3), on
    [0, 1] pixels; range [0, 1], 1 = exact match, ~0.72 for mid-grey (random) images."""

    @torch.no_grad()
    def forward(self, images, conditions):
        ids = class_ids(conditions, len(images))
        if ids is None:
            raise ValueError("class_color needs class ids, not prompts; use it for class-to-image.")
        mean = to_unit(images).mean((2, 3))  # (B, 3)
        target = class_target_color(ids).to(mean.device)
        return 1 - (mean - target).norm(dim=-1) / math.sqrt(3)

# -----------------------------------------------------------------------------
# loading (once per process) and the weighted combination

_MODELS = {}  # (kind, arch, weights, device) -> (model, tokenizer)


def _fetch(what, download, how):
    try:
        return download()
    except Exception as e:  # offline, missing from the cache, or a hub error
        raise WeightsUnavailable(
            f"{what} are not in the Hugging Face cache {hf_constants.HF_HUB_CACHE} and could not be "
            f"downloaded ({type(e).__name__}); set HF_HOME to a cache that has them or pass {how}.") from None


def load_clip(arch="ViT-L-14", pretrained="openai", device="cpu"):
    """open_clip (model, tokenizer), cached. pretrained: an open_clip tag (fetched from the HF
    hub into HF_HOME), a local checkpoint path (for OpenAI weights use arch 'ViT-L-14-quickgelu'),
    or None for random weights (tests)."""
    key = ("clip", arch, pretrained, str(device))
    if key not in _MODELS:
        tag = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
        if pretrained and not tag and not os.path.isfile(pretrained):
            raise ValueError(f"{pretrained!r} is neither an open_clip tag of {arch} nor a file; "
                             f"see open_clip.list_pretrained().")
        path = pretrained if not tag else _fetch(
            f"CLIP weights {arch}/{pretrained} (HF repo {tag.get('hf_hub', '').rstrip('/')})",
            lambda: open_clip.download_pretrained(tag), "a local checkpoint path as clip_pretrained")
        pp = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
        model = open_clip.create_model(arch, pretrained=path, device=device, force_preprocess_cfg=pp,
                                       force_quick_gelu=tag.get("quick_gelu", False))
        _MODELS[key] = (model.eval().requires_grad_(False), open_clip.get_tokenizer(arch))
    return _MODELS[key]


def load_hps(ckpt=None, arch="ViT-H-14", device="cpu"):
    """HPSv2.1 (model, tokenizer), cached: `arch` built empty, then the checkpoint's full
    state dict (checkpoint['state_dict']) loaded strictly. ckpt: a local file or None (HF hub)."""
    key = ("hps", arch, ckpt, str(device))
    if key not in _MODELS:
        if ckpt is None:
            ckpt = _fetch(f"HPSv2.1 weights ({HPS_FILE} from HF repo {HPS_REPO})",
                          lambda: hf_hub_download(HPS_REPO, HPS_FILE), "a local file as hps_ckpt")
        elif not os.path.isfile(ckpt):
            raise WeightsUnavailable(f"HPS checkpoint {ckpt} does not exist; pass the path of {HPS_FILE} "
                                     f"from the HF repo {HPS_REPO} as hps_ckpt.")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "state_dict" not in state:
            raise ValueError(f"{ckpt} is not an HPSv2 checkpoint (no 'state_dict' key); pass {HPS_FILE}.")
        model = open_clip.create_model(arch, pretrained=None)  # HPS overwrites every weight
        model.load_state_dict(state["state_dict"])
        _MODELS[key] = (model.to(device).eval().requires_grad_(False), open_clip.get_tokenizer(arch))
    return _MODELS[key]


def parse_spec(spec):
    """'clip=1,quality=0.5' or {'clip': 1, 'quality': 0.5} -> {name: float weight}."""
    items = spec.items() if isinstance(spec, dict) else [p.partition("=")[::2] for p in str(spec).split(",")]
    weights = {}
    for name, w in items:
        name = name.strip()
        try:
            w = float(w)
        except (TypeError, ValueError):
            w = math.nan
        if name not in SCORERS:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; known rewards are {', '.join(SCORERS)}.")
        if not math.isfinite(w) or name in weights:
            raise ValueError(f"bad reward spec {spec!r}; write each reward once as name=weight, e.g. 'clip=1,hps=0.5'.")
        weights[name] = w
    return weights


class CombinedReward(nn.Module):
    """total = sum_k w_k * score_k (B,), returned with every raw score {name: (B,)} for logging."""

    def __init__(self, scorers, weights):
        super().__init__()
        self.scorers, self.weights = nn.ModuleDict(scorers), dict(weights)

    @torch.no_grad()
    def forward(self, images, conditions):
        raw = {name: s(images, conditions) for name, s in self.scorers.items()}
        return sum(self.weights[k] * v for k, v in raw.items()), raw


def build_reward(spec, device="cpu", clip_model="ViT-L-14", clip_pretrained="openai",
                 clip_templates=False, hps_model="ViT-H-14", hps_ckpt=None):
    """spec -> CombinedReward. clip_model/clip_pretrained: open_clip arch and tag or file
    (shared by clip and quality); clip_templates: average CLIP's 80 ImageNet prompts for class
    ids; hps_model/hps_ckpt: HPS architecture and checkpoint file (None = HF hub)."""
    scorers, weights = {}, parse_spec(spec)
    for name in weights:
        if name in ("clip", "quality"):
            model, tok = load_clip(clip_model, clip_pretrained, device)
            scorers[name] = ClipScore(model, tok, clip_templates) if name == "clip" else ClipIQA(model, tok)
        elif name == "hps":
            scorers[name] = HPSv2(*load_hps(hps_ckpt, hps_model, device))
        else:
            scorers[name] = Colorfulness() if name == "colorfulness" else ClassColor()
    return CombinedReward(scorers, weights)

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    torch.manual_seed(0)
    B, ids = 8, torch.arange(8)
    noise = torch.rand(B, 3, 16, 16) * 2 - 1  # i.i.d. pixels in [-1, 1]
    blobs = F.interpolate(torch.rand(B, 3, 4, 4) * 2 - 1, size=16, mode="bilinear")  # decoder-like
    target = class_target_color(ids)[:, :, None, None].expand(B, 3, 16, 16) * 2 - 1
    reward = build_reward("colorfulness=1,class_color=1")
    for name, images in [("noise", noise), ("blobs", blobs), ("class colours", target)]:
        total, raw = reward(images, ids)
        print(f"{name:>13}: " + "  ".join(f"{k} {v.mean():.3f}±{v.std():.3f}" for k, v in raw.items())
              + f"  total {total.mean():.3f}")
    # the CLIP scorers on a tiny random-weight backbone: plumbing only, the numbers mean nothing
    tiny = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8,
                          head_width=16), text_cfg=dict(width=16, heads=2, layers=1)).eval()
    tok = open_clip.get_tokenizer("ViT-B-32")
    for scorer in (ClipScore(tiny, tok), ClipIQA(tiny, tok), HPSv2(tiny, tok)):
        s = scorer(blobs, ids)
        print(f"{type(scorer).__name__:>13} (tiny random CLIP): {s.shape} {s.mean():.4f}")
    print("real scorers: build_reward('clip=1,quality=1,hps=1', device='cuda') (weights via HF_HOME)")
