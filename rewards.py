"""
Batched image rewards for GRPO: semantic fidelity, perceptual quality, realism.

Scorers: clip (semantic fidelity, CLIPScore), quality (perceptual quality, CLIP-IQA), hps (human
preference, HPSv2.1), the judge's realism, no_artifacts and vlm_quality (a vision-language model asked
about each image), clip_binned / hps_binned (the paper's 4-level steps of a cosine), and the weight-free
colorfulness and class_color for offline demos. Each is `scorer(images, conditions) -> Tensor[B]` float32,
images (B, 3, H, W) in the VQ decoder's range [-1, 1] on any device, conditions B ImageNet class ids or B
prompts; preprocessing in torch on the device, one forward per batch, bf16 on GPU, each backbone loaded
once per process (clip and quality share one; the three judge scorers share one).
Run: `python rewards.py` (offline smoke demo); `build_reward("clip=1,hps=1")(images, conds)` in training,
`build_reward("paper")` for the paper's recipe (PAPER below).

Follows AR-GRPO (arXiv 2508.06924), which rewards CLIP, HPSv2, MANIQA and a Qwen2.5-VL judge, except:
- `quality` is CLIP-IQA (Wang, Chan, Loy, AAAI 2023) instead of MANIQA, whose weights AR-GRPO never shipped,
  on the `clip` ViT-L-14 at 224 px with its positional embedding, where CLIP-IQA drops the positional
  embedding and scores RN50 at native size; scoring is batched on the device, not one PIL image at a time.
- The judge: the paper's code has the VLM *generate* a JSON answer (up to 256 tokens at temperature 0.6, one
  image at a time) and parses it. Here each question asks for a one-token answer that is read from the
  next-token logits of one batched, left-padded forward: P(good answer) renormalised over the answer tokens
  (Yes/No), or the expected rubric score sum_d d P(d) over the digits 0-5. Deterministic, continuous (a
  reward that ranks images within a group instead of a few tied integers), no parser that can fail, and
  orders of magnitude cheaper (bench.py). The question wording is ours.
HPS follows hpsv2/img_score.py (full state dict; diag of normalised img @ text).
"""
import base64
import concurrent.futures
import functools
import io
import json
import math
import os
import urllib.error
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F
import open_clip
from huggingface_hub import hf_hub_download

from model import cache_only_if_offline, hub_cache_dir
from open_clip.constants import OPENAI_DATASET_MEAN as OPENAI_MEAN, OPENAI_DATASET_STD as OPENAI_STD
from PIL import Image

HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
JUDGE = "Qwen/Qwen2.5-VL-3B-Instruct"  # the paper's judge
SCORERS = ("clip", "quality", "hps", "colorfulness", "class_color", "clip_binned", "hps_binned",
           "realism", "no_artifacts", "vlm_quality", "world_class", "world_real")
# the paper's total reward (its c2i and t2i scripts), MANIQA replaced by `quality`; its CLIP is ViT-B/32
PAPER = dict(clip=5, clip_binned=1, hps=5, hps_binned=1, quality=2, vlm_quality=0.25, realism=0.25,
             no_artifacts=0.25)
PAPER_CLIP = ("ViT-B-32", "openai")  # (open_clip arch, weights) of the recipe's clip and clip_binned


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable (e.g. offline)."""


class JudgeError(ValueError):
    """A served judge is unreachable or answers something unusable (the CLI exits with code 2)."""


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
    """Human preference (HPSv2.1): CLIPScore on HPS's ViT-H-14 with its long-side resize + pad."""

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
# the paper's binned cosine


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


# -----------------------------------------------------------------------------
# the judge: a vision-language model answering one token per question


RUBRIC = ("Score this image for the prompt \"{}\", one point for each: the main object matches the prompt; "
          "the image is complete; it looks real and reasonable; it is clear and of high quality; it is free "
          "of noise and artifacts. Answer with the total, one digit from 0 to 5.")
JUDGE_QUESTIONS = {  # name -> (question, answer tokens, value of each answer): the score is sum P(a) v(a)
    "realism": ("Is this image AI-generated? Answer Yes or No.", ("Yes", "No"), (0.0, 1.0)),
    "no_artifacts": ("Does this image show any strange or unnatural feature? Answer Yes or No.",
                     ("Yes", "No"), (0.0, 1.0)),
    "vlm_quality": (RUBRIC, tuple("012345"), (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)),
}


class VLMJudge:
    """A Hugging Face image-text-to-text model (model, processor) as a judge: answer_probs asks B
    questions about B images in one forward and reads the answers from the next-token logits."""

    def __init__(self, model, processor):
        self.model, self.processor = model.eval().requires_grad_(False), processor
        self.chats, self.ids = {}, {}  # question -> chat text; answers -> token ids (both repeat every step)

    def chat(self, question):  # the user turn (image, question) and the assistant prompt, as the model's template
        if question not in self.chats:
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            self.chats[question] = self.processor.apply_chat_template(turn, add_generation_prompt=True)
        return self.chats[question]

    def answer_ids(self, answers):  # each answer must be exactly one token, or it has no single logit
        if answers not in self.ids:
            ids = [self.processor.tokenizer.encode(a, add_special_tokens=False) for a in answers]
            if any(len(i) != 1 for i in ids):
                raise ValueError(f"the judge's tokenizer splits the answers {answers} into {ids}; use a judge "
                                 f"whose vocabulary has each as one token.")
            self.ids[answers] = [i[0] for i in ids]
        return self.ids[answers]

    @torch.no_grad()
    def answer_probs(self, images, questions, answers):
        """(B, 3, H, W) in [-1, 1], B questions, K answer words -> (B, K) float32: P(answer), renormalised
        over the K. Left padding puts every row's last token at -1, so a row scores as it would alone."""
        dev = self.model.device
        pixels = to_unit(images.to(dev)) * 255  # the processor's own rescale (1/255) and normalise follow
        batch = self.processor(text=[self.chat(q) for q in questions], images=pixels, padding=True,
                               padding_side="left", return_tensors="pt", device=dev)  # resize etc. in torch
        batch = {k: v.to(dev, self.model.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
        logits = self.model(**batch, logits_to_keep=1).logits[:, -1].float()  # (B, V): the next token
        return logits[:, self.answer_ids(tuple(answers))].softmax(-1)  # (B, K)


class ServedJudge:
    """The same questions to a judge behind an OpenAI-compatible /chat/completions (vLLM, sglang): one
    request per image, sent concurrently, the answers read from the first token's top_logprobs. An answer
    outside the server's top 20 counts as probability 0 (in-process it gets its exact, tiny probability)."""

    def __init__(self, url, model, workers=16, timeout=120.0):
        self.url, self.name, self.workers, self.timeout = url.rstrip("/"), model, workers, timeout

    def ask(self, image_url, question, answers):  # -> K probabilities, renormalised over the answers
        body = dict(model=self.name, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20,
                    messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                           {"type": "text", "text": question}]}])
        req = urllib.request.Request(self.url + "/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:  # one attempt, bounded by the timeout: a dead server fails the step instead of hanging it
            with urllib.request.urlopen(req, timeout=self.timeout) as reply:
                top = json.load(reply)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            logp = {t["token"]: float(t["logprob"]) for t in top}
        except urllib.error.HTTPError as e:
            raise JudgeError(f"the judge server at {self.url} answered HTTP {e.code} ({e.reason}); check "
                             f"--judge_url and --judge_model.") from None
        except (urllib.error.URLError, OSError) as e:
            raise JudgeError(f"could not reach the judge server at {self.url} ({getattr(e, 'reason', e)}); "
                             f"start it or fix --judge_url.") from None
        except (ValueError, KeyError, IndexError, TypeError):
            logp = {}  # not chat-completions JSON with log-probs: reported as below
        p = [math.exp(logp[a]) if a in logp else 0.0 for a in answers]
        if not sum(p) > 0:
            raise JudgeError(f"the judge server at {self.url} replied without log-probs for any of the answers "
                             f"{', '.join(answers)}; serve an OpenAI-compatible /chat/completions with logprobs.")
        return [x / sum(p) for x in p]

    def answer_probs(self, images, questions, answers):  # as VLMJudge.answer_probs
        u8 = (to_unit(images) * 255 + 0.5).floor().byte().permute(0, 2, 3, 1).cpu().numpy()  # as save_image
        urls = []
        for im in u8:  # PNG: lossless, so the server sees the same uint8 pixels
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        with concurrent.futures.ThreadPoolExecutor(min(self.workers, len(urls))) as pool:
            rows = list(pool.map(lambda uq: self.ask(*uq, answers), zip(urls, questions)))
        return torch.tensor(rows, dtype=torch.float32, device=images.device)


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


TINY_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
             "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
             "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen's, minus the system turn


def tiny_judge(seed=0, std=1.0):
    """A random ~30k-parameter Qwen2.5-VL judge built in memory, for demos, tests and bench.py: a word-level
    tokenizer of 18 tokens (Qwen's chat and vision tokens, the answers, the rest -> [UNK]), patch 4, merge 2.
    std: init scale of the weights; large, so that answer probabilities differ visibly between images."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    vocab = {t: i for i, t in enumerate(special + ["[UNK]", "user", "assistant", "Yes", "No", *"012345"])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                   pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token=special[0],
                                  additional_special_tokens=special[1:], chat_template=TINY_CHAT)
    patches = dict(patch_size=4, merge_size=2, temporal_patch_size=2)  # images go in multiples of 8 px
    processor = Qwen2_5_VLProcessor(Qwen2VLImageProcessor(**patches, min_pixels=8 * 8, max_pixels=32 * 32), tok,
                                    Qwen2VLVideoProcessor(**patches), chat_template=TINY_CHAT)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, initializer_range=std, pad_token_id=0, bos_token_id=0,
                eos_token_id=2,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=16, out_hidden_size=32, fullatt_block_indexes=[1],
                  initializer_range=std)
    ids = {k: vocab[f"<|{v}|>"] for k, v in [("image_token_id", "image_pad"), ("video_token_id", "video_pad"),
                                              ("vision_start_token_id", "vision_start"),
                                              ("vision_end_token_id", "vision_end")]}
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
    return VLMJudge(model, processor)


# -----------------------------------------------------------------------------
# loading (once per process) and the weighted combination


def _fetch(what, download, arg, local="a local file"):
    try:
        with cache_only_if_offline():  # offline: fail at once instead of retrying for ~25 s
            return download()
    except Exception as e:  # offline, not in the cache, or a hub error
        raise WeightsUnavailable(f"{what} are not in the Hugging Face cache {hub_cache_dir()} and "
                                 f"could not be downloaded ({type(e).__name__}); set HF_HOME to a cache that "
                                 f"has them or pass {local} as {arg}.") from None


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


@functools.cache
def load_judge(name=JUDGE, device="cpu"):
    """-> VLMJudge: any image-text-to-text model (AutoModelForImageTextToText + AutoProcessor) by Hub name
    or save_pretrained directory; bf16 on GPU, float32 on CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32

    def download():
        kw = dict(cache_dir=hub_cache_dir())
        return AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, **kw), AutoProcessor.from_pretrained(name, **kw)
    model, processor = _fetch(f"judge weights {name}", download, "judge", "a save_pretrained directory")
    return VLMJudge(model.to(device), processor)


def parse_spec(spec):
    """'clip=1,quality=0.5' or {'clip': 1, 'quality': 0.5} -> {name: float weight}; 'paper' -> PAPER."""
    if spec == "paper":
        return {k: float(w) for k, w in PAPER.items()}
    if isinstance(spec, dict):
        items = spec.items()
    else:  # a part without '=' gets the weight '', which fails below
        items = [part.partition("=")[::2] for part in str(spec).split(",")]
    weights = {}
    for name, w in items:
        name = str(name).strip()
        if name not in SCORERS:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; known rewards: {', '.join(SCORERS)}, "
                             f"or 'paper' for the paper's recipe.")
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
        raw = {}
        for name, s in self.scorers.items():  # binned terms come last: they reuse their base's score
            reuse = isinstance(s, Binned) and s.base in raw
            raw[name] = binned(raw[s.base]) if reuse else s(images, conditions)
        return sum(self.weights[k] * v for k, v in raw.items()), raw


def build_reward(spec, device="cpu", clip_model="ViT-L-14", clip_pretrained="openai", clip_templates=False,
                 hps_model="ViT-H-14", hps_ckpt=None, paper_clip=PAPER_CLIP, judge=JUDGE, judge_url="",
                 judge_model="", world=""):
    """spec -> CombinedReward. clip_model/clip_pretrained: open_clip arch and tag or file, shared by clip
    and quality (spec 'paper': clip and clip_binned on paper_clip instead); clip_templates: average CLIP's
    80 ImageNet prompts for class ids; hps_model/hps_ckpt: HPS architecture and checkpoint file (None = HF
    hub); judge: Hub name or directory of the judge, or a built judge (VLMJudge, ServedJudge); judge_url:
    an OpenAI-compatible server (http://HOST:PORT/v1) to ask instead, for the model judge_model (or judge);
    world: a world.py preset or directory, for world_class / world_real."""
    weights = parse_spec(spec)
    clip_arch = paper_clip if spec == "paper" else (clip_model, clip_pretrained)
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
        elif name.startswith("world_"):
            import world as world_py  # lazily: world.py imports the training stack
            scorers[name] = WorldScorer(world_py.load_reward_net(world, name), name[6:])
        else:
            scorers[name] = Colorfulness() if name == "colorfulness" else ClassColor()
        if name != base:
            scorers[name] = Binned(scorers[name], base)
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
    cos = torch.tensor([-0.2, 0.0, 0.29, 0.3, 0.6])
    print("binned cosines:", dict(zip([round(c, 2) for c in cos.tolist()], binned(cos).tolist())))
    judge = tiny_judge()  # random weights: the answers mean nothing, the plumbing is real
    print("tiny random judge (realism, no_artifacts in [0, 1], vlm_quality in [0, 5]):",
          {n: [round(v, 3) for v in JudgeScore(judge, n)(blobs[:4], ids[:4]).tolist()] for n in JUDGE_QUESTIONS})
