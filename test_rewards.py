"""
test_rewards.py -- rewards.py on a tiny random-weight open_clip model (no network, seconds on CPU): each scorer
against an independent reference (open_clip's own PIL transform, a hand-written CLIP-IQA softmax, hand-computed
colourfulness), the combination, the paper's recipe, loading and offline errors.
"""
import json
import math
import re
import time

from PIL import Image
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import train
from conftest import TINY, TINY_CFG, make_images, offline_hf_home, run_train
from rewards import (ClassColor, ClipIQA, ClipScore, Colorfulness, HPSv2, WeightsUnavailable, build_reward,
                     class_target_color, clip_preprocess, load_clip, load_hps, parse_spec)
from rewards import binned


PIL_TOL = 0.02  # max |torch - PIL| on normalised pixels; measured <= 0.0165, i.e. ~1.1 uint8 levels


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


def test_binned_edges(tiny):
    c = torch.tensor([-1.0, -1e-6, 0.0, 0.2999, 0.3, 0.5999, 0.6, 1.0, float('nan')])
    out = binned(c)
    assert out[:-1].tolist() == [-1.0, -1.0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5] and math.isnan(out[-1])
    images, ids = make_images(), [3, 4, 5, 6]  # clip_binned alone: the binned CLIPScore
    _, raw = build_reward('clip_binned=1', clip_model=TINY, clip_pretrained=None)(images, ids)
    assert torch.equal(raw['clip_binned'], binned(ClipScore(*tiny)(images, ids)))


TINY_B = 'judge-test-tiny-b'  # a second tiny open_clip, standing in for the recipe's ViT-B-32


@pytest.fixture(scope='session')
def paper_backbones(tiny, judge, tmp_path_factory):
    """Keyword arguments of build_reward that put tiny random models under every term of the recipe."""
    d = tmp_path_factory.mktemp('paper')
    (d / f'{TINY_B}.json').write_text(json.dumps({**TINY_CFG, 'embed_dim': 24}))
    open_clip.add_model_config(d / f'{TINY_B}.json')
    torch.manual_seed(2)
    torch.save({'state_dict': open_clip.create_model(TINY).state_dict()}, d / 'hps.pt')
    return dict(clip_model=TINY, clip_pretrained=None, paper_clip=(TINY_B, None), hps_model=TINY,
                hps_ckpt=str(d / 'hps.pt'), judge=judge)


def test_paper_recipe_is_the_weighted_sum(paper_backbones, tiny, monkeypatch, tmp_path):
    weights = dict(clip=5, clip_binned=1, hps=5, hps_binned=1, quality=2, vlm_quality=0.25, realism=0.25,
                   no_artifacts=0.25)  # the paper's scripts, written out again
    reward = build_reward('paper', **paper_backbones)
    assert reward.scorers['clip'].model is load_clip(TINY_B, None, 'cpu')[0]  # the recipe's own CLIP
    assert reward.scorers['quality'].model is tiny[0]  # quality stays on clip_model
    images, ids = make_images(4, 16, 16, seed=5), [1, 2, 3, 4]
    total, raw = reward(images, ids)
    assert set(raw) == set(weights)
    torch.testing.assert_close(raw['clip_binned'], binned(raw['clip']), atol=0, rtol=0)
    torch.testing.assert_close(raw['hps_binned'], binned(raw['hps']), atol=0, rtol=0)
    torch.testing.assert_close(total, sum(w * raw[k] for k, w in weights.items()))
    # through train.py: every weighted term in metrics.jsonl, and the logged reward is their sum
    monkeypatch.setattr(train, 'build_reward', lambda spec, **kw: build_reward(spec, **{
        **kw, **paper_backbones}))
    run_train(tmp_path, '--rewards', 'paper', '--max_steps', '2', '--beta', '0')
    for row in map(json.loads, open(tmp_path / 'metrics.jsonl')):
        assert {f'term_{k}' for k in weights} <= set(row) and row['nonfinite'] == 0
        assert row['reward'] == pytest.approx(sum(w * row[f'{k}_mean'] for k, w in weights.items()), abs=1e-5)
        assert row['reward'] == pytest.approx(sum(row[f'term_{k}'] for k in weights), abs=1e-5)
