"""
rewards.py -- batched image rewards for GRPO, one per dimension the paper scores: semantic fidelity (CLIP, HPS),
perceptual quality (CLIP-IQA) and realism (a vision-language judge), and `build_reward`, their weighted sum.

    python rewards.py                       # offline smoke demo: weight-free scorers, a tiny random CLIP and judge
    build_reward("clip=1,hps=1")(images, conds)      # in training; build_reward("paper") = the paper's recipe

The scorer contract: `scorer(images, conditions) -> Tensor[B]` float32, images (B, 3, H, W) in the VQ decoder's
range [-1, 1] on any device, conditions B ImageNet class ids or B prompts. Preprocessing runs in torch on the
device, one forward per batch, bf16 on GPU, each backbone loaded once per process (clip and quality share one;
the three judge scorers share one judge). Any module with this signature can join a sum: the miniature world
hands its learned scorers to `build_reward(..., extra=...)` the same way.

Follows AR-GRPO (arXiv 2508.06924), which rewards CLIP, HPSv2, MANIQA and a Qwen2.5-VL judge, except:
- `quality` is CLIP-IQA (Wang, Chan, Loy, AAAI 2023) instead of MANIQA, whose weights AR-GRPO never shipped,
  on the `clip` ViT-L-14 at 224 px with its positional embedding, where CLIP-IQA drops the positional
  embedding and scores RN50 at native size; scoring is batched on the device, not one PIL image at a time.
- The judge answers each question with one token read from the next-token logits (judge.py says how and why),
  so its scores are continuous where the paper's are 0/1 and 0-5 integers. The question wording is ours.
HPS follows hpsv2/img_score.py (full state dict; diag of normalised img @ text).
"""
import functools
import math
import os

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from open_clip.constants import OPENAI_DATASET_MEAN as OPENAI_MEAN, OPENAI_DATASET_STD as OPENAI_STD

from hub import WeightsUnavailable, fetch_weights, hub_cache_dir
from judge import JUDGE, ServedJudge, load_judge
from tokenizer import to_unit

HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
SCORERS = ("clip", "quality", "hps", "colorfulness", "class_color", "clip_binned", "hps_binned",
           "realism", "no_artifacts", "vlm_quality")
# the paper's total reward (its c2i and t2i scripts), MANIQA replaced by `quality`; its CLIP is ViT-B/32
PAPER = dict(clip=5, clip_binned=1, hps=5, hps_binned=1, quality=2, vlm_quality=0.25, realism=0.25,
             no_artifacts=0.25)
PAPER_CLIP = ("ViT-B-32", "openai")  # (open_clip arch, weights) of the recipe's clip and clip_binned

# -----------------------------------------------------------------------------
# semantic fidelity: does the image show the class or the prompt? (CLIPScore, HPSv2.1 on CLIP towers)


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


class HPSv2(ClipScore):
    """Human preference (HPSv2.1): CLIPScore on HPS's ViT-H-14 with its long-side resize + pad."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, templates=False, resize_mode="longest")


# -----------------------------------------------------------------------------
# perceptual quality: is it a good photo? (CLIP-IQA, no reference, ignores the condition)


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


# -----------------------------------------------------------------------------
# realism: does a vision-language judge take it for a real photo? (the judge itself: judge.py)


RUBRIC = ("Score this image for the prompt \"{}\", one point for each: the main object matches the prompt; "
          "the image is complete; it looks real and reasonable; it is clear and of high quality; it is free "
          "of noise and artifacts. Answer with the total, one digit from 0 to 5.")
JUDGE_QUESTIONS = {  # name -> (question, answer tokens, value of each answer): the score is sum P(a) v(a)
    "realism": ("Is this image AI-generated? Answer Yes or No.", ("Yes", "No"), (0.0, 1.0)),
    "no_artifacts": ("Does this image show any strange or unnatural feature? Answer Yes or No.",
                     ("Yes", "No"), (0.0, 1.0)),
    "vlm_quality": (RUBRIC, tuple("012345"), (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)),
}


class JudgeScore(nn.Module):
    """One of JUDGE_QUESTIONS on a judge (VLMJudge or ServedJudge): E[value of the answer] =
    P(No) for realism / no_artifacts, in [0, 1]; the expected rubric score for vlm_quality, in [0, 5]."""

    def __init__(self, judge, name):
        super().__init__()
        self.judge, self.name = judge, name

    def forward(self, images, conditions):
        question, answers, values = JUDGE_QUESTIONS[self.name]
        ids = class_ids(conditions, len(images))
        subjects = conditions if ids is None else [open_clip.IMAGENET_CLASSNAMES[i] for i in ids]
        questions = [question.format(s) for s in subjects]  # only the rubric names the subject
        p = self.judge.answer_probs(images, questions, answers)  # (B, K)
        return (p @ p.new_tensor(values)).to(images.device)


# -----------------------------------------------------------------------------
# the paper's binned cosine, and weight-free scorers for offline smoke runs


def binned(c):
    """The paper's steps of a cosine c: -1 (c < 0), 0.5 (0 <= c < 0.3), 1 (0.3 <= c < 0.6), 1.5 (c >= 0.6).
    A NaN stays NaN, so that the GRPO step's non-finite rule sees it."""
    steps = c.new_tensor([-1.0, 0.5, 1.0, 1.5])
    out = steps[torch.bucketize(c, c.new_tensor([0.0, 0.3, 0.6]), right=True)]  # right: edges go up
    return out.masked_fill(c.isnan(), math.nan)


class Binned(nn.Module):
    """binned(scorer(...)); CombinedReward reuses the score of `base` when that term is in the sum too."""

    def __init__(self, scorer, base):
        super().__init__()
        self.scorer, self.base = scorer, base

    def forward(self, images, conditions):
        return binned(self.scorer(images, conditions))


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


# -----------------------------------------------------------------------------
# preprocessing (batched, in torch on the device) and conditions -> texts


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
# loading (once per process) and the weighted combination


@functools.cache  # once per process and (arch, weights, device): clip and quality share the result
def load_clip(arch="ViT-L-14", pretrained="openai", device="cpu"):
    """-> (open_clip model, tokenizer). pretrained: an open_clip tag (fetched from the HF hub into HF_HOME),
    a checkpoint file (OpenAI weights need arch 'ViT-L-14-quickgelu'), or None for random weights."""
    tag = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    what = f"CLIP weights {arch}/{pretrained} (HF repo {tag.get('hf_hub', '').rstrip('/')})"
    path = fetch_weights(what, lambda: open_clip.download_pretrained(tag), "clip_pretrained") if tag else pretrained
    pp = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
    model = open_clip.create_model(arch, pretrained=path, device=device, force_preprocess_cfg=pp,
                                   force_quick_gelu=tag.get("quick_gelu", False))
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(arch)


@functools.cache
def load_hps(ckpt=None, arch="ViT-H-14", device="cpu"):
    """-> (HPSv2.1 model, tokenizer): `arch` built empty, then checkpoint['state_dict'], which holds
    every weight, loaded strictly. ckpt: a local file, or None to fetch it from the HF hub."""
    if ckpt is None:
        ckpt = fetch_weights(f"HPSv2.1 weights ({HPS_FILE} from HF repo {HPS_REPO})",
                      lambda: hf_hub_download(HPS_REPO, HPS_FILE, cache_dir=hub_cache_dir()), "hps_ckpt")
    elif not os.path.isfile(ckpt):
        raise WeightsUnavailable(f"HPS checkpoint {ckpt} does not exist; pass the path of {HPS_FILE}.")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(f"{ckpt} is not an HPSv2 checkpoint (no 'state_dict' key); pass {HPS_FILE}.")
    model = open_clip.create_model(arch, pretrained=None)
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval().requires_grad_(False), open_clip.get_tokenizer(arch)


def parse_spec(spec, extra=()):
    """'clip=1,quality=0.5' or {'clip': 1, 'quality': 0.5} -> {name: float weight}. 'paper' stands for the paper's
    recipe (PAPER), alone or as one item: 'paper,loo_fid=0.5'. `extra`: names of scorers the caller will hand to
    build_reward (the miniature world's, loo_fid)."""
    if isinstance(spec, dict):
        items = spec.items()
    else:  # a part without '=' gets the weight '', which fails below ('paper' excepted)
        items = [part.partition("=")[::2] for part in str(spec).split(",")]
    items = [kv for name, w in items for kv in (PAPER.items() if str(name).strip() == "paper" and w == "" else
                                               [(name, w)])]
    known = SCORERS + tuple(extra)
    weights = {}
    for name, w in items:
        name = str(name).strip()
        if name not in known:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; known rewards: {', '.join(known)}, "
                             f"or 'paper' for the paper's recipe.")
        try:
            w = float(w)
        except (TypeError, ValueError):
            w = math.nan
        if name in weights or not math.isfinite(w):
            raise ValueError(f"bad reward spec {spec!r}; give each reward once as name=weight, e.g. 'clip=1'.")
        weights[name] = w
    return weights


def check_reward_flags(spec, extra=(), judge_url="", judge=JUDGE):
    """Before any model loads: known reward names, a served judge's URL, a judge name. Raises UserError."""
    from cli import UserError
    try:
        parse_spec(spec, extra)
    except ValueError as e:
        raise UserError(str(e)) from None
    if judge_url and not judge_url.startswith(("http://", "https://")):
        raise UserError(f"--judge_url {judge_url!r} is not an http(s) URL; pass e.g. http://HOST:8000/v1")
    if not judge:
        raise UserError("--judge is empty; pass a Hub name or a save_pretrained directory of the judge")


class CombinedReward(nn.Module):
    """(images, conditions) -> (sum_k w_k * score_k (B,), {name: raw score (B,)}), raw for logging."""

    def __init__(self, scorers, weights):
        super().__init__()
        self.scorers, self.weights = nn.ModuleDict(scorers), dict(weights)

    @torch.no_grad()
    def forward(self, images, conditions):
        raw = {}
        for name, s in self.scorers.items():  # binned terms come last: they reuse their base's score
            reuse = isinstance(s, Binned) and s.base in raw
            raw[name] = binned(raw[s.base]) if reuse else s(images, conditions)
        return sum(self.weights[k] * v for k, v in raw.items()), raw


def build_reward(spec, device="cpu", clip_model="ViT-L-14", clip_pretrained="openai", clip_templates=False,
                 hps_model="ViT-H-14", hps_ckpt=None, paper_clip=PAPER_CLIP, judge=JUDGE, judge_url="",
                 judge_model="", extra=None):
    """spec -> CombinedReward. clip_model/clip_pretrained: open_clip arch and tag or file, shared by clip
    and quality (spec 'paper': clip and clip_binned on paper_clip instead); clip_templates: average CLIP's
    80 ImageNet prompts for class ids; hps_model/hps_ckpt: HPS architecture and checkpoint file (None = HF
    hub); judge: Hub name or directory of the judge, or a built judge (VLMJudge, ServedJudge); judge_url:
    an OpenAI-compatible server (http://HOST:PORT/v1) to ask instead, for the model judge_model (or judge);
    extra: {name: scorer} built by the caller (the miniature world's learned rewards), usable in the spec."""
    extra = extra or {}
    weights = parse_spec(spec, extra)
    clip_arch = paper_clip if "paper" in str(spec).split(",") else (clip_model, clip_pretrained)
    if judge_url:
        judge = ServedJudge(judge_url, judge_model or judge)
    scorers = {}
    for name in sorted(weights, key=lambda k: k.endswith("_binned")):  # binned last: see CombinedReward
        base = name.removesuffix("_binned")
        if base in ("clip", "quality"):
            model, tok = load_clip(*(clip_arch if base == "clip" else (clip_model, clip_pretrained)), str(device))
            scorers[name] = ClipScore(model, tok, clip_templates) if base == "clip" else ClipIQA(model, tok)
        elif base == "hps":
            scorers[name] = HPSv2(*load_hps(hps_ckpt, hps_model, str(device)))
        elif name in JUDGE_QUESTIONS:
            scorers[name] = JudgeScore(load_judge(judge, str(device)) if isinstance(judge, str) else judge, name)
        elif name in extra:
            scorers[name] = extra[name]
        else:
            scorers[name] = Colorfulness() if name == "colorfulness" else ClassColor()
        if name != base:
            scorers[name] = Binned(scorers[name], base)
    return CombinedReward(scorers, weights)


if __name__ == "__main__":
    from judge import tiny_judge
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
    cos = torch.tensor([-0.2, 0.0, 0.29, 0.3, 0.6])
    print("binned cosines:", dict(zip([round(c, 2) for c in cos.tolist()], binned(cos).tolist())))
    judge = tiny_judge()  # random weights: the answers mean nothing, the plumbing is real
    print("tiny random judge (realism, no_artifacts in [0, 1], vlm_quality in [0, 5]):",
          {n: [round(v, 3) for v in JudgeScore(judge, n)(blobs[:4], ids[:4]).tolist()] for n in JUDGE_QUESTIONS})
