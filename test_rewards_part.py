"""
Tests for rewards.py, on a tiny random-weight open_clip model (no network, a few seconds on CPU).

Run: python -m pytest -q test_rewards_part.py
Each test compares against an independent reference: open_clip's own PIL transform, a hand-written
CLIP-IQA softmax, a hand-computed colourfulness, scores of the in-memory model for HPS loading.
"""
import json
import math
import re
import time

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from rewards import (ClassColor, ClipIQA, ClipScore, Colorfulness, HPSv2, WeightsUnavailable, build_reward,
                     class_target_color, clip_preprocess, load_clip, load_hps, parse_spec)

TINY = "rewards-test-tiny"  # ~0.9M parameters, builds in ~10 ms; vocab 49408 so the real tokenizer fits
TINY_CFG = dict(embed_dim=16,
                vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
                text_cfg=dict(context_length=77, vocab_size=49408, width=16, heads=2, layers=1))
PIL_TOL = 0.02  # max |torch - PIL| on normalised pixels; measured <= 0.0165, i.e. ~1.1 uint8 levels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return load_clip(TINY, None, "cpu")  # (model, tokenizer), random weights


def make_images(b=4, h=16, w=16, seed=0):
    """Smooth random images in [-1.1, 1.1] (the decoder may overshoot), like a random VQ decoder's."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, max(h // 4, 1), max(w // 4, 1), generator=g) * 2.2 - 1.1
    return F.interpolate(low, size=(h, w), mode="bilinear") + 0.05 * torch.randn(b, 3, h, w, generator=g)


def scorers(tiny):
    model, tok = tiny
    return {"clip": ClipScore(model, tok), "quality": ClipIQA(model, tok), "hps": HPSv2(model, tok),
            "colorfulness": Colorfulness(), "class_color": ClassColor()}


def prompts_for(ids):
    return [f"a photo of a {open_clip.IMAGENET_CLASSNAMES[i]}." for i in ids]


def features(model, tok, images, texts, resize_mode="shortest"):
    """Independent reference features: unit-norm image and text embeddings."""
    pixels = clip_preprocess(images, 32, resize_mode=resize_mode)
    img = F.normalize(model.encode_image(pixels), dim=-1)
    return img, F.normalize(model.encode_text(tok(texts)), dim=-1)

# -----------------------------------------------------------------------------
# the scorer contract


def test_shapes_dtype_ranges(tiny):
    images, ids = make_images(), torch.tensor([1, 207, 980, 1])
    for name, s in scorers(tiny).items():
        out = s(images, ids)
        assert out.shape == (4,) and out.dtype == torch.float32 and torch.isfinite(out).all(), name
    out = scorers(tiny)
    assert ((out["quality"](images, ids) >= 0) & (out["quality"](images, ids) <= 1)).all()
    assert ((out["class_color"](images, ids) >= 0) & (out["class_color"](images, ids) <= 1)).all()
    assert (out["clip"](images, ids).abs() <= 1 + 1e-5).all()


def test_batch_equals_one_by_one_and_deterministic(tiny):
    images, ids = make_images(5, 24, 20), [3, 3, 500, 999, 0]  # non-square, a repeated class
    for name, s in scorers(tiny).items():
        batched = s(images, ids)
        single = torch.cat([s(images[i:i + 1], ids[i:i + 1]) for i in range(5)])
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5, msg=name)
        if hasattr(s, "text_cache"):
            s.text_cache.clear()  # recomputing the text features must not change anything either
        assert torch.equal(s(images, ids), batched), name


def test_class_ids_equal_formatted_prompts(tiny):
    images, ids = make_images(), [0, 1, 2, 945]
    s = ClipScore(*tiny)
    from_prompts = s(images, prompts_for(ids))
    for conds in (ids, torch.tensor(ids), torch.tensor(ids, dtype=torch.int32)):
        torch.testing.assert_close(s(images, conds), from_prompts, atol=0, rtol=0)


def test_clip_score_matches_reference(tiny):
    model, tok = tiny
    images, prompts = make_images(), ["a red car", "a cat", "a red car", "two dogs on a beach"]
    img, txt = features(model, tok, images, prompts)
    torch.testing.assert_close(ClipScore(model, tok)(images, prompts), (img * txt).sum(-1), atol=1e-5, rtol=0)


def test_class_templates_average_normalised_text_features(tiny):
    model, tok = tiny
    images, ids = make_images(2), [7, 300]
    names = [open_clip.IMAGENET_CLASSNAMES[i] for i in ids]
    img = features(model, tok, images, ["x"])[0]
    ref = []
    for i, c in enumerate(names):
        t = F.normalize(model.encode_text(tok([f(c) for f in open_clip.OPENAI_IMAGENET_TEMPLATES])), dim=-1)
        ref.append(img[i] @ F.normalize(t.mean(0), dim=-1))
    torch.testing.assert_close(ClipScore(model, tok, templates=True)(images, ids), torch.stack(ref), atol=1e-5,
                               rtol=0)


def test_clip_iqa_is_softmax_over_antonym_pair(tiny):
    model, tok = tiny
    images = make_images(6)
    img, txt = features(model, tok, images, ["Good photo.", "Bad photo."])
    cos = img @ txt.T  # (B, 2)
    assert ClipIQA(model, tok).logit_scale == 100.0  # CLIP's fixed scale, as CLIP-IQA uses
    for scale in (100.0, 1.0):  # 100 saturates on a random model, so also check an unsaturated scale
        ref = torch.exp(scale * cos[:, 0]) / (torch.exp(scale * cos[:, 0]) + torch.exp(scale * cos[:, 1]))
        out = ClipIQA(model, tok, logit_scale=scale)(images, ["conditions are ignored"] * 6)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert 0 < out.min() and out.max() < 1 and out.std() > 0


def test_conditions_errors(tiny):
    images = make_images(2)
    with pytest.raises(ValueError, match="conditions for 2 images"):
        ClipScore(*tiny)(images, [1, 2, 3])
    with pytest.raises(ValueError, match="0..999"):
        ClipScore(*tiny)(images, [1, 1000])
    with pytest.raises(ValueError, match="needs class ids"):
        ClassColor()(images, ["a cat", "a dog"])

# -----------------------------------------------------------------------------
# preprocessing vs open_clip's PIL transform


@pytest.mark.parametrize("h,w,mode", [(16, 16, "shortest"), (8, 8, "shortest"), (64, 64, "shortest"),
                                      (48, 40, "shortest"), (256, 256, "shortest"), (40, 64, "longest"),
                                      (37, 53, "longest"), (32, 32, "shortest")])
def test_torch_preprocess_matches_open_clip_pil(h, w, mode):
    # quantise to uint8 first: that is what the PIL path sees; noisy images stress the bicubic overshoot
    images = torch.rand(3, 3, h, w, generator=torch.Generator().manual_seed(h * w)) * 2 - 1
    u8 = ((images + 1) / 2 * 255).round().byte()
    tf = open_clip.image_transform(32, is_train=False, resize_mode=mode)
    ref = torch.stack([tf(Image.fromarray(u.permute(1, 2, 0).numpy())) for u in u8])
    out = clip_preprocess(u8.float() / 255 * 2 - 1, 32, resize_mode=mode)
    assert out.shape == ref.shape == (3, 3, 32, 32)
    assert (out - ref).abs().max() < PIL_TOL
    assert (out - ref).abs().mean() < 0.01


def test_scores_match_per_image_pil_loop(tiny):
    """The batched path against the one-image-at-a-time PIL baseline (what bench.py times)."""
    model, tok = tiny
    images, ids = make_images(4, 40, 40), [5, 6, 7, 8]
    for s in (ClipScore(model, tok), HPSv2(model, tok)):
        tf = open_clip.image_transform(s.size, False, s.mean, s.std, s.resize_mode)
        ref = []
        for i in range(4):
            u8 = ((images[i].clamp(-1, 1) + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy()
            ref.append(s.score_pixels(tf(Image.fromarray(u8))[None], ids[i:i + 1]))
        torch.testing.assert_close(s(images, ids), torch.cat(ref), atol=2e-3, rtol=0)

# -----------------------------------------------------------------------------
# weight-free scorers


def test_colorfulness_hand_computed():
    # one red and one blue pixel: rg = [1, 0], yb = [0.5, -1]
    images = torch.tensor([[[1.0, -1.0]], [[-1.0, -1.0]], [[-1.0, 1.0]]])[None]  # (1, 3, 1, 2) in [-1, 1]
    sd, mu = math.sqrt(0.5 ** 2 + 0.75 ** 2), math.sqrt(0.5 ** 2 + 0.25 ** 2)
    torch.testing.assert_close(Colorfulness()(images), torch.tensor([sd + 0.3 * mu]))
    grey = torch.full((2, 3, 4, 4), 0.2)
    assert torch.equal(Colorfulness()(grey), torch.zeros(2))
    # the paper's [0, 255] formula via numpy on a random image, divided by 255
    x = make_images(1)[0].clamp(-1, 1)
    r, g, b = ((x + 1) / 2 * 255).double().numpy()
    rg, yb = r - g, 0.5 * (r + g) - b
    ref = (np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)) / 255
    assert abs(Colorfulness()(x[None]).item() - ref) < 1e-5


def test_class_color_targets_and_spread():
    ids = torch.arange(16)
    target = class_target_color(ids)
    assert target.min() >= 0.1 - 1e-6 and target.max() <= 0.9 + 1e-6
    assert torch.equal(class_target_color([3]), class_target_color(torch.tensor([3])))  # deterministic
    exact = target[:, :, None, None].expand(16, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(ClassColor()(exact, ids), torch.ones(16))
    grey = torch.zeros(16, 3, 8, 8)  # mid-grey is 0.49 from every target: 1 - 0.49 / sqrt(3)
    torch.testing.assert_close(ClassColor()(grey, ids), torch.full((16,), 1 - 0.4 * math.sqrt(1.5) / math.sqrt(3)))
    # not saturated on random images: mid-range and with a spread a policy can climb
    r = ClassColor()(make_images(64, 16, 16), torch.arange(64))
    assert 0.5 < r.mean() < 0.9 and r.std() > 0.01

# -----------------------------------------------------------------------------
# combination, spec parsing, loading


def test_combined_reward_is_weighted_sum_and_shares_backbone(tiny):
    model, tok = tiny
    images, ids = make_images(), [10, 20, 30, 40]
    spec = "clip=1, quality=0.5,colorfulness=2,class_color=-0.25"
    reward = build_reward(spec, clip_model=TINY, clip_pretrained=None)
    total, raw = reward(images, ids)
    assert set(raw) == {"clip", "quality", "colorfulness", "class_color"}
    assert reward.scorers["clip"].model is reward.scorers["quality"].model is model  # loaded once
    ref = {"clip": ClipScore(model, tok)(images, ids), "quality": ClipIQA(model, tok)(images, ids),
           "colorfulness": Colorfulness()(images), "class_color": ClassColor()(images, ids)}
    for k in ref:
        torch.testing.assert_close(raw[k], ref[k])
    expected = ref["clip"] + 0.5 * ref["quality"] + 2 * ref["colorfulness"] - 0.25 * ref["class_color"]
    torch.testing.assert_close(total, expected)
    total2, _ = build_reward({"clip": 1, "quality": 0.5, "colorfulness": 2, "class_color": -0.25},
                             clip_model=TINY, clip_pretrained=None)(images, ids)
    torch.testing.assert_close(total2, total)


def test_parse_spec_and_errors():
    assert parse_spec("clip=1,quality=0.5, hps=2") == {"clip": 1.0, "quality": 0.5, "hps": 2.0}
    assert parse_spec({"colorfulness": 1}) == {"colorfulness": 1.0}
    with pytest.raises(ValueError, match="known rewards: clip, quality, hps, colorfulness, class_color"):
        parse_spec("clip=1,maniqa=1")
    for bad in ("clip", "clip=abc", "clip=1,clip=2", "clip=nan", "clip=1,", "", {"clip": "x"}):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_hps_loads_from_state_dict_file(tiny, tmp_path):
    torch.manual_seed(1)  # a different random model than the fixture's, saved in HPSv2's file format
    model = open_clip.create_model(TINY).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hps.pt")
    loaded, tok = load_hps(str(tmp_path / "hps.pt"), TINY, "cpu")
    images, prompts = make_images(3, 40, 24), ["a castle", "a cat", "a castle at night"]
    out = HPSv2(loaded, tok)(images, prompts)
    torch.testing.assert_close(out, HPSv2(model, tok)(images, prompts), atol=0, rtol=0)
    img, txt = features(model, tok, images, prompts, resize_mode="longest")  # HPSv2: diag(img @ txt.T)
    torch.testing.assert_close(out, torch.diagonal(img @ txt.T), atol=1e-5, rtol=0)
    torch.save({"model": model.state_dict()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an HPSv2 checkpoint"):
        load_hps(str(tmp_path / "bad.pt"), TINY, "cpu")
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        load_hps(str(tmp_path / "missing.pt"), TINY, "cpu")


def offline_hf_home(monkeypatch, home):
    """HF_HUB_OFFLINE=1 and HF_HOME=home; huggingface_hub reads both at import, so patch its constants too."""
    import huggingface_hub.constants as hf_constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))


def test_clip_loads_from_local_checkpoint(tiny, tmp_path):
    model, tok = tiny
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    loaded, _ = load_clip(TINY, str(tmp_path / "clip.pt"), "cpu")
    assert loaded is not model
    images, ids = make_images(), [1, 2, 3, 4]
    torch.testing.assert_close(ClipScore(loaded, tok)(images, ids), ClipScore(model, tok)(images, ids))


def test_hps_loads_from_populated_hf_cache(tiny, monkeypatch, tmp_path):
    # the layout hf_hub_download leaves behind: refs/main names the snapshot that holds the file
    offline_hf_home(monkeypatch, tmp_path)
    repo = tmp_path / "hub" / "models--xswu--HPSv2"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    torch.save({"state_dict": tiny[0].state_dict()}, repo / "snapshots" / ("0" * 40) / "HPS_v2.1_compressed.pt")
    loaded, tok = load_hps(None, TINY, "cpu")
    images, prompts = make_images(2), ["a cat", "a dog"]
    torch.testing.assert_close(HPSv2(loaded, tok)(images, prompts), HPSv2(*tiny)(images, prompts))


def test_offline_failure_is_fast_and_one_sentence(monkeypatch, tmp_path):
    offline_hf_home(monkeypatch, tmp_path)
    for load, weights in [(lambda: load_clip("ViT-L-14", "openai", "cpu"), "ViT-L-14/openai"),
                          (lambda: load_hps(None, "ViT-H-14", "cpu"), "HPS_v2.1_compressed.pt"),
                          (lambda: build_reward("hps=1"), "xswu/HPSv2")]:
        t0 = time.perf_counter()
        with pytest.raises(WeightsUnavailable) as err:
            load()
        msg = str(err.value)
        assert time.perf_counter() - t0 < 3.0  # fails before building the 0.4B / 1B model
        assert weights in msg and "HF_HOME" in msg and str(tmp_path) in msg
        assert "\n" not in msg and msg.endswith(".") and not re.search(r"[.!?]\s+[A-Z]", msg)
