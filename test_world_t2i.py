"""
test_world_t2i.py -- the text-to-image miniature (world_t2i.py) on CPU: the real caption path, each reward against
chance on held-out data, a short GRPO run through train.py's loop, the files the report writes, and the rule that
stops the generator's pretraining, and GRPO raising the held-out judge's score for each of three seeds.

The 'tiny_t2i' preset (the demo's 24 px scenes, 2,000 train scenes) is built once per session (tiny_t2i below, a
few minutes on two cores); every figure is on data the part never trained on. GenEval's rules themselves are
test_geneval.py's.
"""
import json
import os
from dataclasses import replace
import math

import numpy as np
import pytest
import torch

import geneval
import miniature
import scenes
import sample
import study
import train
import world_t2i
from cli import UserError, parse_config
from conditions import encode_prompts, load_t5
from model import GPT, config_for
from rewards import build_reward
from tokenizer import to_uint8


@pytest.fixture(scope='session')
def tiny_t2i(tmp_path_factory):
    wc = world_t2i.preset_config('tiny_t2i', root=str(tmp_path_factory.mktemp('world_t2i')))
    with miniature.fixed_threads():
        return world_t2i.load_or_build(wc, log=lambda *a: None)


def heldout_seen(w):
    """The held-out scenes of seen kinds: (images float, captions, specs)."""
    n = w.config.n_heldout
    return w.heldout_x[:n], w.heldout_prompts[:n], w.heldout_specs[:n]

# ----------------------------------------------------------------------------- the caption path


def test_t2i_caption_path_shapes_and_masks(tiny_t2i):
    """The world's tokenizer and T5 load as FLAN-T5-XL does (conditions.load_t5); every vocabulary word is its own
    token; captions come out left-padded with the mask over their words and T5's </s>; the GPT reads them."""
    tok, t5 = load_t5(f'{tiny_t2i.dir}/t5')
    ids = tok(scenes.VOCAB, add_special_tokens=False)['input_ids']
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(scenes.VOCAB)
    assert tok.unk_token_id not in {i[0] for i in ids}
    prompts = ['a red disk', 'a blue square to the left of a green ring']
    L = tiny_t2i.config.caption_len
    emb, mask = encode_prompts(prompts, tok, t5, max_length=L)
    assert emb.shape == (2, L, tiny_t2i.config.t5_dim) and mask.shape == (2, L)
    for row, p in zip(mask, prompts):
        n = len(p.split()) + 1  # the words and </s>
        assert row.tolist() == [0] * (L - n) + [1] * n
    assert (emb[mask == 0] == 0).all() and (emb[mask == 1].abs().sum(-1) > 0).all()
    gpt = tiny_t2i.gpt
    tokens = torch.zeros(2, gpt.config.block_size - 1, dtype=torch.long)
    assert gpt(tokens, emb, cond_mask=mask).shape == (2, gpt.config.block_size, gpt.config.vocab_size)
    same, _ = world_t2i.encode_captions(prompts + prompts[:1], (tok, t5), L)  # the build's encoder: the same rows
    assert torch.equal(same[:2], emb) and torch.equal(same[2], emb[0])


@pytest.mark.parametrize('L', [120, 12])
def test_t2i_null_caption_is_the_rows_cfg_samples_against(L):
    """The caption dropout's null caption is the last L rows of LlamaGen's 120-row buffer (all of it at LlamaGen's
    120), with every position attended: the rows model.GPT.null_cond hands CFG, so guidance meets what was trained."""
    cfg = config_for(None, 16, 4, n_layer=1, n_head=4, dim=32, vocab_size=16, model_type='t2i', caption_dim=8,
                     cls_token_num=L)
    gpt = GPT(cfg)
    null, mask = world_t2i.null_caption(gpt, 3)
    rows = gpt.cls_embedding.uncond_embedding[120 - L:]  # (L, 8)
    assert torch.equal(null, rows.expand(3, -1, -1)) and torch.equal(gpt.null_cond(torch.zeros(3, L, 8)), null)
    assert mask.shape == (3, L) and mask.all()

# ----------------------------------------------------------------------------- the rewards, on held-out data


def test_t2i_rewards_beat_chance_on_heldout_data(tiny_t2i):
    """Through rewards.build_reward as train.py calls them: the semantic rewards prefer a scene's own caption to
    another scene's; quality falls with distortion; realism tells reconstructions from base samples."""
    w = tiny_t2i
    spec = 'geneval=1,world_clip=1,world_quality=1,world_real=1'
    reward = build_reward(spec, extra=world_t2i.reward_scorers(w.dir, spec))
    x, captions, _ = heldout_seen(w)
    other = [captions[(i + 7) % len(captions)] for i in range(len(captions))]
    _, raw = reward(x, captions)
    _, raw_other = reward(x, other)
    assert all(v.shape == (len(x),) and 0 <= v.min() <= v.max() <= 1 for v in raw.values())
    for name in ('geneval', 'world_clip'):
        auc = miniature.roc_auc(raw[name], raw_other[name])
        assert auc > 0.65, (name, auc)
    gen = torch.Generator().manual_seed(5)
    distorted, level = miniature.random_distortions(x, gen)
    assert miniature.spearman(reward.scorers['world_quality'](distorted, captions), -level) > 0.3
    rec = miniature.decode_all(w.vq, miniature.encode_all(w.vq, x))
    fakes = miniature.decode_all(w.vq, world_t2i.sample_tokens(w.gpt, w.t5, captions, 1.0, 77))
    real = reward.scorers['world_real']
    assert miniature.roc_auc(real(rec, captions), real(fakes, captions)) > 0.6


def test_t2i_heldout_npz_round_trips_its_scenes(tiny_t2i):
    """heldout.npz: uint8 NHWC images, each caption parses to the spec stored beside it, and its ground-truth scene
    (JSON) satisfies every atom of that caption under GenEval's rules."""
    images, prompts, specs, objects = world_t2i.load_split(tiny_t2i.dir, 'heldout')
    c = tiny_t2i.config
    assert images.dtype == np.uint8 and images.shape == (c.n_heldout + c.n_unseen, c.image_size, c.image_size, 3)
    for p, s, o in zip(prompts, specs, objects):
        assert scenes.parse(p) == s and all(geneval.check(s, o))
    unseen = [scenes.is_unseen(s) for s in specs]
    assert not any(unseen[:c.n_heldout]) and all(unseen[c.n_heldout:])
    train_specs = world_t2i.load_split(tiny_t2i.dir, 'train')[2]
    assert not any(scenes.is_unseen(s) for s in train_specs)  # the generator never read an unseen prompt

# ----------------------------------------------------------------------------- GRPO through train.py


def grpo_config(w, out_dir, seed, **kw):
    return train.TrainConfig(**{**train.TRAIN_PRESETS['demo_t2i'], 'world': w.dir, 'max_steps': 30, 'seed': seed,
                                'rewards': 'geneval=1', 'lr': 1e-3, 'beta': 0.0, 'out_dir': str(out_dir), **kw})


def test_t2i_grpo_writes_a_report_that_round_trips(tiny_t2i, tmp_path):
    """world_t2i.run_demo with train.py's own loop: report.json holds what was measured under every name the
    issue lists, and the samples' npz files hold the measured images and their prompts."""
    cfg = grpo_config(tiny_t2i, tmp_path, 0, max_steps=4)
    res = world_t2i.run_demo(cfg, train.train, log=lambda *a: None)
    report = json.load(open(tmp_path / 'report.json'))
    prov = report.pop('provenance')  # where the result came from (provenance.py)
    assert report == res and set(report) == {'base', 'tuned', 'control'}
    assert prov['seeds']['seed'] == 0 and prov['world']['dir'] == os.path.abspath(tiny_t2i.dir)
    keys = ['geneval_overall', 'geneval_overall_se', 'geneval_unseen', 'geneval_unseen_se', 'mini_fid', 'mini_fid_se',
            'pixel_diversity', 'pixel_diversity_se', 'kl_to_base'] + [f'geneval_{t}' for t in scenes.TAGS]
    assert all(math.isfinite(report[part][k]) for part in report for k in keys)
    assert report['base']['kl_to_base'] == pytest.approx(0, abs=1e-6)
    table = '\n'.join(study.summarise('t2i', {(0, 0): report}, world_t2i))  # the study's table reads it too
    assert table.count('| 0 | 0 |') == 1 and 'control gain' in table
    base, images, prompts, _ = world_t2i.measure(tiny_t2i, tiny_t2i.gpt, cfg.cfg_scale, tiny_t2i.config.eval_per_prompt)
    assert base == pytest.approx(res['base'])  # the same seeds again
    with np.load(tmp_path / 'samples_base.npz') as z:
        assert np.array_equal(z['arr_0'], to_uint8(images).permute(0, 2, 3, 1).numpy())
        assert z['prompts'].tolist() == prompts
    for name in ('before_after.png', 'curves.png', 'report.md'):
        assert (tmp_path / name).stat().st_size > 0
    # python sample.py --prompt ... --ckpt <the tuned checkpoint> finds the world's VQ and T5 by itself
    ckpt, out = str(tmp_path / 'tuned' / 'latest' / 'model.safetensors'), str(tmp_path / 's.png')
    drawn = sample.main(['--prompt', 'two yellow rings', '--ckpt', ckpt, '--n', '2', '--out', out])
    assert drawn.shape == (2, tiny_t2i.config.image_size, tiny_t2i.config.image_size, 3)
    # typed as a person types it: the same caption to the tokenizer, so the same images
    assert np.array_equal(sample.main(['--prompt', ' Two  Yellow rings.', '--ckpt', ckpt, '--n', '2', '--out', out]),
                          drawn)
    with pytest.raises(UserError, match="unknown word 'pink'"):
        sample.main(['--prompt', 'two pink rings', '--ckpt', ckpt, '--out', out])


def test_t2i_grpo_raises_the_heldout_single_object_score_for_each_seed(tiny_t2i, tmp_path):
    """Issue 25's RL outcome at test size: GRPO through train.py on the train split's single-object captions,
    rewarded by the reward detector alone, raises the held-out judge's single_object accuracy (its seen prompts,
    64 fixed-seed samples each) by more than 3 standard errors in each of three GRPO seeds. Why single objects:
    the tiny generator (base 0.09 overall) is nearly blind to the other categories, where a 2,000-scene
    detector is gamed before the generator learns (README). Measured on two threads, GRPO seeds 0-4 (README, the
    text-to-image section): +4.3 to +8.0 s.e. in this world, +8.1 to +11.9 and +3.8 to +9.2 in tiny worlds 1 and
    2 -- another CPU rounds this world differently, and other worlds stand in for that. The shuffled-reward
    control (seed 2 here) must not gain 2 s.e.: -0.8 to -1.9 s.e. over seeds 0-4. ~4.5 min on two cores."""
    w = tiny_t2i
    captions = open(os.path.join(w.dir, 'prompts_train.txt')).read().split('\n')
    singles = sorted({c for c in captions if c and scenes.parse(c)['tag'] == 'single_object'})
    (tmp_path / 'singles.txt').write_text('\n'.join(singles) + '\n')
    prompts = [p for p in w.prompts['seen']['single_object'] for _ in range(64)]
    specs = [scenes.parse(p) for p in prompts]

    def judged(gpt):  # (accuracy, its standard error) on the same seeds for every generator
        images = miniature.decode_all(w.vq, world_t2i.sample_tokens(gpt, w.t5, prompts, 1.0, 1234))
        return geneval.accuracy(specs, geneval.detect(w.judge, images))['single_object'][:2]

    with miniature.fixed_threads(2):  # as measured
        base = judged(w.gpt)
    for seed in range(3):
        cfg = grpo_config(w, tmp_path / str(seed), seed, prompts=str(tmp_path / 'singles.txt'), max_steps=120,
                          beta=0.02)
        world_t2i.prepare(cfg, log=lambda *a: None)
        with miniature.fixed_threads(2):
            train.train(cfg)
            tuned = judged(world_t2i.load_gpt(str(tmp_path / str(seed) / 'latest' / 'model.safetensors')))
        gain = (tuned[0] - base[0]) / math.hypot(base[1], tuned[1])
        assert gain > 3, f"seed {seed}: single_object {base[0]:.3f} -> {tuned[0]:.3f} is {gain:+.1f} s.e."
    # the shuffled-reward control from the same start and seed does not gain: the reward, not the updates, is why
    cfg = replace(cfg, shuffle_rewards=True, out_dir=str(tmp_path / 'control'))
    with miniature.fixed_threads(2):
        train.train(cfg)
        control = judged(world_t2i.load_gpt(str(tmp_path / 'control' / 'latest' / 'model.safetensors')))
    gain = (control[0] - base[0]) / math.hypot(base[1], control[1])
    assert gain < 2, f"control: single_object {base[0]:.3f} -> {control[0]:.3f} is {gain:+.1f} s.e."


# ----------------------------------------------------------------------------- flags


def test_t2i_train_flags(tmp_path):
    with pytest.raises(UserError, match='--world'):
        train.check_train_config(train.TrainConfig(**{**train.TRAIN_PRESETS['demo_t2i'], 'world': str(tmp_path),
                                                      'out_dir': str(tmp_path / 'o')}))
    with pytest.raises(UserError, match='unknown reward'):
        parse_config(train.TrainConfig, ['--preset', 'demo_t2i', '--rewards', 'geneval=1,nope=1',
                                         '--out_dir', str(tmp_path / 'o')], presets=train.TRAIN_PRESETS)
    (tmp_path / 'p.txt').write_text('Two Yellow rings.\ntwo pink rings\n')  # a typed file: case, a full stop
    with pytest.raises(UserError, match="unknown word 'pink'"):  # before anything is built or loaded
        train.check_train_config(train.TrainConfig(**{**train.TRAIN_PRESETS['demo_t2i'], 'prompts': str(
            tmp_path / 'p.txt'), 'out_dir': str(tmp_path / 'o')}))
    assert scenes.canonical_prompts(['Two  Yellow rings.']) == ['two yellow rings']  # as the captions are written
    parse = lambda *a: parse_config(world_t2i.T2IWorldConfig, [*a, '--root', str(tmp_path)],
                                    presets=world_t2i.T2I_PRESETS)
    cfg = parse('--preset', 'demo_t2i')
    assert cfg.image_size >= 24 and cfg.n_train == world_t2i.T2I_PRESETS['demo_t2i']['n_train']
    assert world_t2i.world_dir(cfg) != world_t2i.world_dir(parse('--preset', 'demo_t2i', '--world_seed', '1'))
    assert world_t2i.world_dir(cfg) == world_t2i.world_dir(parse('--preset', 'demo_t2i', '--eval_per_prompt', '3'))
    with pytest.raises(UserError, match='--image_size'):
        parse_config(world_t2i.T2IWorldConfig, ['--image_size', '20', '--grid', '6', '--root', str(tmp_path)])


def test_t2i_pretraining_stops_at_the_first_check_that_reaches_the_target():
    """train_gpt checks twice an epoch and stops at the first check >= gpt_target; without a target it runs every
    epoch. The check here is a scripted sequence, so where it must stop is known without training anything."""
    wc = world_t2i.T2IWorldConfig(image_size=8, grid=4, codebook_size=8, t5_dim=8, caption_len=4, gpt_dim=16,
                                  gpt_layers=1, gpt_batch=4, gpt_epochs=5, gpt_target=0.5)
    n = 16  # 4 batches an epoch: checks after batches 2 and 4
    codes, emb, mask = torch.randint(8, (n, 4)), torch.randn(n, 4, 8), torch.ones(n, 4, dtype=torch.long)
    seq = iter([0.1, 0.2, 0.3, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    _, checks = world_t2i.train_gpt(wc, codes, emb, mask, check=lambda gpt: next(seq))
    assert checks == [0.1, 0.2, 0.3, 0.6]  # stopped in the second epoch, at its second check
    seq = iter([0.0] * 10)
    _, checks = world_t2i.train_gpt(replace(wc, gpt_target=0.0), codes, emb, mask, check=lambda gpt: next(seq))
    assert len(checks) == 2 * wc.gpt_epochs
