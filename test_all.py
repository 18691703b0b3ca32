"""
test_all.py -- every test of the project, on CPU, in a few minutes.

    python -m pytest -q test_all.py

Tests compare against references: the outputs of the original LlamaGen code stored in
../shared/fixtures/llamagen (see its README), independent computations, or round trips.
"""
import argparse
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.distributions import Categorical

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
FIX = os.path.join(HERE, '..', 'shared', 'fixtures', 'llamagen')

import model
import rewards
import sample
import tokenizer
import train
import grpo
from grpo import (cfg_mix, clipped_surrogate, group_advantages, grpo_loss, kl_k3, policy_logprobs, token_entropy,
                  token_logprobs)
from model import (GPT, GPTConfig, CheckpointError, RELEASES, config_for, generate, load_gpt, load_into,
                   read_state_dict, save_gpt, precompute_freqs_cis_2d)
from rewards import (ClassColor, ClipIQA, ClipScore, Colorfulness, HPSv2, WeightsUnavailable, build_reward,
                     class_target_color, clip_preprocess, load_clip, load_hps, parse_spec)
from sample import UserError, encode_prompts, load_t5, parse_config, to_uint8
from tokenizer import VQConfig, VQModel, load_vq, save_vq, VQ_PRESETS

ATOL = 1e-4


def fixture(name):
    return os.path.join(FIX, name)


def tiny_gpt(weights='c2i_tiny.safetensors', config='c2i_tiny_config.json'):
    cfg = GPTConfig(**json.load(open(fixture(config)))['model_args'])
    sd, _ = read_state_dict(fixture(weights))
    return load_into(GPT(cfg), sd, weights).eval()


def tiny_vq():
    c = json.load(open(fixture('vq_tiny_config.json')))
    sd, _ = read_state_dict(fixture('vq_tiny.pt'))
    return load_into(VQModel(VQConfig(**c['model_args'], ch=c['encoder_decoder_ch'])), sd, 'vq_tiny').eval()


def cached_logits(model, cond, tokens, cond_mask=None):
    """Teacher tokens fed one by one through the KV cache -> (B, N, V), as the fixtures recorded."""
    cache = model.new_kv_cache(cond.shape[0])
    out = [model(tokens[:, :0], cond, kv_cache=cache, cond_mask=cond_mask)[:, -1]]
    for j in range(tokens.shape[1] - 1):
        out.append(model(tokens[:, j:j + 1], kv_cache=cache)[:, -1])
    return torch.stack(out, 1)


def forced_generate(model, cond, tokens, **kw):
    """Run the real generate() with a sampler that records the logits it is handed and returns
    the teacher token: exactly how the fixture's kv_cfg4 logits were recorded."""
    seen = []

    def sample_fn(logits):
        seen.append(logits.clone())
        j = len(seen) - 1
        return tokens[:, j], torch.zeros(tokens.shape[0])
    generate(model, cond, sample_fn=sample_fn, **kw)
    return torch.stack(seen, 1)


# -----------------------------------------------------------------------------
# model.py: parity with LlamaGen


@torch.no_grad()
def test_c2i_parity():
    m, e = tiny_gpt(), load_file(fixture('c2i_tiny_expected.safetensors'))
    cls, tok = e['input.class_ids'], e['input.tokens']
    torch.testing.assert_close(m(tok[:, :-1], cls), e['logits.teacher_forced'], atol=ATOL, rtol=0)
    torch.testing.assert_close(m(tok[:, :-1], torch.full_like(cls, 10)), e['logits.teacher_forced_uncond'],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_logits(m, cls, tok), e['logits.kv_cached'], atol=ATOL, rtol=0)
    torch.testing.assert_close(forced_generate(m, cls, tok, cfg_scale=4.0), e['logits.kv_cfg4'], atol=ATOL, rtol=0)
    torch.testing.assert_close(forced_generate(m, cls, tok, cfg_scale=4.0, cfg_interval=4),
                               e['logits.kv_cfg4_interval4'], atol=ATOL, rtol=0)
    greedy, _ = generate(m, cls, cfg_scale=4.0, temperature=0)
    assert torch.equal(greedy, e['generate.greedy_cfg4_tokens'])


def test_rope_table():
    e = load_file(fixture('c2i_tiny_expected.safetensors'))
    torch.testing.assert_close(precompute_freqs_cis_2d(4, 16, 10000, 1), e['rope.freqs_cis'], atol=1e-6, rtol=0)


@torch.no_grad()
def test_gqa_parity_and_cache():
    m = tiny_gpt('c2i_tiny_gqa.safetensors', 'c2i_tiny_gqa_config.json')
    e = load_file(fixture('c2i_tiny_gqa_expected.safetensors'))
    cls, tok = e['input.class_ids'], e['input.tokens']
    torch.testing.assert_close(m(tok[:, :-1], cls), e['logits.teacher_forced'], atol=ATOL, rtol=0)
    # the reference cache crashes on GQA; ours must reproduce the teacher-forced logits step by step
    assert m.new_kv_cache(3).k[0].shape[1] == 2
    torch.testing.assert_close(cached_logits(m, cls, tok), e['logits.teacher_forced'], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize('variant', ['cls120', 'cls8'])
def test_t2i_parity(variant):
    config = 't2i_tiny_config.json' if variant == 'cls120' else 't2i_tiny_cls8_config.json'
    m = tiny_gpt('t2i_tiny.safetensors', config)
    e = {k[len(variant) + 1:]: v for k, v in load_file(fixture('t2i_tiny_expected.safetensors')).items()
         if k.startswith(variant + '.')}
    emb, mask, tok = e['input.caption_embs'], e['input.emb_masks'], e['input.tokens']
    torch.testing.assert_close(m(tok[:, :-1], emb, cond_mask=mask), e['logits.teacher_forced'], atol=ATOL, rtol=0)
    torch.testing.assert_close(m(tok[:, :-1], emb), e['logits.teacher_forced_nomask'], atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_logits(m, emb, tok, mask), e['logits.kv_cached'], atol=ATOL, rtol=0)
    if variant == 'cls120':
        torch.testing.assert_close(m(tok[:, :-1], m.null_cond(emb), cond_mask=mask),
                                   e['logits.teacher_forced_uncond'], atol=ATOL, rtol=0)
        torch.testing.assert_close(forced_generate(m, emb, tok, cond_mask=mask, cfg_scale=4.0), e['logits.kv_cfg4'],
                                   atol=ATOL, rtol=0)
        greedy, _ = generate(m, emb, cond_mask=mask, cfg_scale=4.0, temperature=0)
        assert torch.equal(greedy, e['generate.greedy_cfg4_tokens'])
    else:  # the reference cannot run CFG here (its null caption has 120 rows); we say so clearly
        with pytest.raises(ValueError, match='120 caption positions'):
            generate(m, emb, cond_mask=mask, cfg_scale=4.0)


# -----------------------------------------------------------------------------
# model.py: generation properties


def _random_head(m, seed=0):
    torch.nn.init.normal_(m.output.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
    return m


@torch.no_grad()
def test_cached_generation_equals_uncached():
    m = _random_head(tiny_gpt())
    cls = torch.tensor([1, 2, 5, 9])
    for cfg_scale in (1.0, 3.0):
        tok, logp = generate(m, cls, cfg_scale=cfg_scale, top_k=20, generator=torch.Generator().manual_seed(1))
        # recompute every step's sampling distribution without a cache: the full prefix each time
        cond = m(tok[:, :-1], cls)
        uncond = m(tok[:, :-1], m.null_cond(cls))
        mix = uncond + (cond - uncond) * cfg_scale if cfg_scale > 1 else cond
        kth = mix.topk(20, -1).values[..., -1:]
        ref = mix.masked_fill(mix < kth, float('-inf')).log_softmax(-1).gather(-1, tok[..., None])[..., 0]
        torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_cfg_scale_one_is_no_cfg():
    m = _random_head(tiny_gpt())
    cls, tok = torch.tensor([0, 4, 4]), torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    cond = m(tok[:, :-1], cls)  # plain conditional model, no unconditional half anywhere
    # scale 1 runs no unconditional half; scale 1 + 1e-6 runs the full 2B batch through the mixture
    torch.testing.assert_close(forced_generate(m, cls, tok, cfg_scale=1.0), cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(forced_generate(m, cls, tok, cfg_scale=1.0 + 1e-6), cond, atol=1e-4, rtol=0)


@torch.no_grad()
def test_sampling_determinism():
    m = _random_head(tiny_gpt())
    cls = torch.tensor([0, 4, 4])
    run = lambda seed: generate(m, cls, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


@torch.no_grad()
def test_sampling_filters():
    from model import sample_logits
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    for _ in range(20):
        tok, lp = sample_logits(logits, top_k=3, generator=g)
        assert all(t in logits[i].topk(3).indices for i, t in enumerate(tok))
        tok, _ = sample_logits(logits, top_p=0.3, generator=g)
        p = logits.softmax(-1)
        for i, t in enumerate(tok):  # a token is kept iff the mass of strictly better tokens is < top_p
            assert p[i][p[i] > p[i, t]].sum() < 0.3


# -----------------------------------------------------------------------------
# tokenizer.py: parity with LlamaGen


@torch.no_grad()
def test_vq_parity():
    vq, e = tiny_vq(), load_file(fixture('vq_tiny_expected.safetensors'))
    x = e['input.images']
    h = vq.encoder(x)
    torch.testing.assert_close(h, e['encoder_out'], atol=ATOL, rtol=0)
    z = vq.quant_conv(h)
    torch.testing.assert_close(z, e['pre_quant'], atol=ATOL, rtol=0)
    zq, idx = vq.quantize(z)
    torch.testing.assert_close(zq, e['quant'], atol=ATOL, rtol=0)
    assert torch.equal(idx, e['indices'])
    codes = vq.encode(x)
    assert codes.shape == (2, 8, 8) and torch.equal(codes.flatten(), e['indices'])
    torch.testing.assert_close(vq.decode(codes), e['decoded'], atol=ATOL, rtol=0)
    torch.testing.assert_close(vq.decode(codes.flatten(1)), e['decoded'], atol=ATOL, rtol=0)
    torch.testing.assert_close(vq(x), e['reconstructed'], atol=ATOL, rtol=0)


# -----------------------------------------------------------------------------
# full-size models: keys, shapes and parameter counts of the released checkpoints


@pytest.mark.parametrize('name', sorted(os.listdir(os.path.join(FIX, 'real_size'))))
def test_real_size_manifest(name):
    man = json.load(open(os.path.join(FIX, 'real_size', name)))
    with torch.device('meta'):
        if name.startswith('vq'):
            m = VQModel(VQConfig(**man['model_args'], ch=man['encoder_decoder_ch']))
        else:
            m = GPT(GPTConfig(**man['model_args']))
    sd = m.state_dict()
    assert list(sd) == list(man['state_dict'])  # same keys, same order
    assert {k: list(v.shape) for k, v in sd.items()} == man['state_dict']
    assert sum(p.numel() for p in m.parameters()) == man['num_parameters']
    assert sorted(k for k, _ in m.named_buffers()) == sorted(man['buffers_in_state_dict'])


def test_presets_match_manifests():
    # config_for(preset, image_size) gives the same config LlamaGen used for each release
    for rel, man in [('c2i_B_256', 'gpt_B_c2i_256'), ('c2i_XL_384', 'gpt_XL_c2i_384'),
                     ('t2i_XL_stage1_256', 'gpt_XL_t2i_256'), ('c2i_XXL_384', 'gpt_XXL_c2i_384')]:
        r = RELEASES[rel]
        kw = {k: r[k] for k in ('model_type', 'cls_token_num') if k in r}
        cfg = config_for(r['preset'], r['image_size'], **kw)
        want = json.load(open(os.path.join(FIX, 'real_size', man + '.json')))['model_args']
        assert {k: getattr(cfg, k) for k in want} == want


# -----------------------------------------------------------------------------
# checkpoint readers


def _expected_logits():
    e = load_file(fixture('c2i_tiny_expected.safetensors'))
    return e['input.class_ids'], e['input.tokens'], e['logits.teacher_forced']


TINY_KW = dict(preset=None, image_size=64, dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10)


@pytest.mark.parametrize('layout', ['model', 'module', 'state_dict', 'bare', 'safetensors', 'prefix_module',
                                    'prefix_orig_mod', 'wrapper', 'freqs_cis', 'namespace'])
def test_checkpoint_layouts(tmp_path, layout):
    sd, _ = read_state_dict(fixture('c2i_tiny.pt'))
    path = str(tmp_path / 'ckpt.pt')
    if layout in ('model', 'module', 'state_dict'):
        torch.save({layout: sd}, path)
    elif layout == 'bare':
        torch.save(sd, path)
    elif layout == 'safetensors':
        path = str(tmp_path / 'ckpt.safetensors')
        save_file(sd, path)
    elif layout == 'prefix_module':
        torch.save({'model': {'module.' + k: v for k, v in sd.items()}}, path)
    elif layout == 'prefix_orig_mod':
        torch.save({'model': {'_orig_mod.' + k: v for k, v in sd.items()}}, path)
    elif layout == 'wrapper':  # AR-GRPO's HF Trainer files: gpt_model.* and vq_model.* in one file
        vq, _ = read_state_dict(fixture('vq_tiny.pt'))
        path = str(tmp_path / 'model.safetensors')
        save_file({**{'gpt_model.' + k: v for k, v in sd.items()}, **{'vq_model.' + k: v for k, v in vq.items()}},
                  path)
        c = json.load(open(fixture('vq_tiny_config.json')))
        v = load_vq(path, **c['model_args'], ch=32)
        torch.testing.assert_close(v.state_dict()['decoder.conv_out.weight'], vq['decoder.conv_out.weight'])
    elif layout == 'freqs_cis':
        torch.save({'model': {**sd, 'freqs_cis': torch.zeros(17, 8, 2)}}, path)
    elif layout == 'namespace':  # a LlamaGen training checkpoint: weights_only=True needs the allow-list
        torch.save({'model': sd, 'optimizer': {}, 'steps': 5, 'args': argparse.Namespace(lr=1e-4)}, path)
    m = load_gpt(path, **TINY_KW)
    cls, tok, want = _expected_logits()
    with torch.no_grad():
        torch.testing.assert_close(m(tok[:, :-1], cls), want, atol=ATOL, rtol=0)


def test_bad_checkpoints(tmp_path):
    good = fixture('c2i_tiny.pt')
    truncated = tmp_path / 'trunc.pt'
    truncated.write_bytes(open(good, 'rb').read()[:5000])
    junk = tmp_path / 'junk.safetensors'
    junk.write_bytes(b'not a checkpoint at all')
    for path in (truncated, junk):
        with pytest.raises(CheckpointError, match='could not read'):
            load_gpt(str(path), **TINY_KW)
    with pytest.raises(CheckpointError, match='does not fit'):  # wrong width
        load_gpt(good, **{**TINY_KW, 'dim': 128, 'n_head': 8})
    with pytest.raises(CheckpointError, match='not a known release'):
        load_gpt(str(tmp_path / 'missing.pt'), **TINY_KW)
    with pytest.raises(ValueError, match='unknown model preset'):
        config_for('GPT-Z')
    for e in (CheckpointError('x'),):
        assert '\n' not in str(e)


def test_self_describing_roundtrip(tmp_path):
    m, vq = tiny_gpt(), tiny_vq()
    save_gpt(m, str(tmp_path / 'g.safetensors'), step=3)
    save_vq(vq, str(tmp_path / 'v.safetensors'))
    m2, vq2 = load_gpt(str(tmp_path / 'g.safetensors')), load_vq(str(tmp_path / 'v.safetensors'))
    assert m2.config == m.config and vq2.config == vq.config
    for a, b in ((m, m2), (vq, vq2)):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    # the file stays LlamaGen-keyed: a plain safetensors reader sees the reference names
    assert set(load_file(str(tmp_path / 'g.safetensors'))) == set(load_file(fixture('c2i_tiny.safetensors')))


def _lay_into_hub_cache(home, repo, filename, src):
    """Place a file exactly as huggingface_hub stores a download: snapshots/REV/FILE + refs/main."""
    rev = 'a' * 40
    base = home / 'hub' / ('models--' + repo.replace('/', '--'))
    (base / 'snapshots' / rev).mkdir(parents=True)
    (base / 'refs').mkdir()
    (base / 'refs' / 'main').write_text(rev)
    (base / 'snapshots' / rev / filename).write_bytes(open(src, 'rb').read())


def test_release_from_hub_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HOME', str(tmp_path))
    monkeypatch.delenv('HF_HUB_CACHE', raising=False)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setitem(RELEASES, 'tiny_test', dict(repo='FoundationVision/LlamaGen', file='c2i_tiny_test.pt',
                                                     preset=None, image_size=64))
    with pytest.raises(CheckpointError, match='not in the cache') as err:
        load_gpt('tiny_test', dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10)
    assert str(tmp_path) in str(err.value) and '--ckpt PATH' in str(err.value)
    _lay_into_hub_cache(tmp_path, 'FoundationVision/LlamaGen', 'c2i_tiny_test.pt', fixture('c2i_tiny.pt'))
    m = load_gpt('tiny_test', preset=None, dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10)
    cls, tok, want = _expected_logits()
    with torch.no_grad():
        torch.testing.assert_close(m(tok[:, :-1], cls), want, atol=ATOL, rtol=0)


# -----------------------------------------------------------------------------
# train.py



def run_train(out_dir, *args):
    """The colourfulness smoke preset at 8x8 px (4x4 tokens): a GRPO step takes ~50 ms on a CPU."""
    return train.main(['--preset', 'demo_color', '--image_size', '8', '--grid_every', '0', '--out_dir', str(out_dir),
                       *args])


def test_demo_reward_rises(tmp_path):
    rows = run_train(tmp_path, '--max_steps', '60', '--lr', '1e-2', '--beta', '0')
    r = np.array([row['reward'] for row in rows])
    first, last = r[:10], r[-10:]
    se = np.sqrt(first.var(ddof=1) / 10 + last.var(ddof=1) / 10)
    assert last.mean() - first.mean() > 5 * se, (first.mean(), last.mean(), se)
    assert os.path.isfile(tmp_path / 'reward_curve.png')
    logged = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [x['step'] for x in logged] == list(range(1, 61))
    for key in ('reward', 'colorfulness_mean', 'colorfulness_std', 'kl', 'clip_frac', 'entropy', 'grad_norm',
                'step_time', 'images_per_s'):
        assert all(np.isfinite(x[key]) for x in logged), key


def test_resume_is_exact(tmp_path):
    # PPO-style reuse, minibatches, micro-batches and the KL all active; every state must round-trip
    common = ['--save_every', '3', '--num_iterations', '2', '--minibatch_size', '16', '--micro_batch_size', '8',
              '--beta', '0.1', '--logprob_mode', 'guided', '--cfg_scale', '2.0']
    run_train(tmp_path / 'a', '--max_steps', '6', *common)
    run_train(tmp_path / 'b', '--max_steps', '3', *common)
    run_train(tmp_path / 'b', '--max_steps', '6', '--resume', *common)
    a, b = (load_file(str(tmp_path / r / 'latest' / 'model.safetensors')) for r in 'ab')
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(x) for x in open(tmp_path / 'a' / 'metrics.jsonl')]
    rb = [json.loads(x) for x in open(tmp_path / 'b' / 'metrics.jsonl')]
    strip = lambda rows: [{k: v for k, v in r.items() if 'time' not in k and 'per_s' not in k} for r in rows]
    assert strip(ra) == strip(rb)
    assert max(r['clip_frac'] for r in ra) > 0  # with num_iterations 2 the clip really acts
    # resuming with other settings is refused
    with pytest.raises(ValueError, match='differs from the checkpoint'):
        run_train(tmp_path / 'b', '--max_steps', '9', '--resume', *common[:-1], '3.0')


def test_nonfinite_rewards_skip_then_stop(tmp_path, monkeypatch):
    real = train.build_reward

    def flaky(*args, **kwargs):
        inner = real(*args, **kwargs)
        calls = []

        def reward(images, conds):
            calls.append(1)
            total, raw = inner(images, conds)
            return (total * float('nan') if len(calls) in (2, 4, 5, 6) else total), raw
        return reward
    monkeypatch.setattr(train, 'build_reward', flaky)
    rows = run_train(tmp_path, '--max_steps', '10', '--save_every', '100')
    assert [r['skipped'] for r in rows] == [0, 1, 0, 1, 1, 1]  # step 2 skipped, steps 4-6: three in a row
    assert os.path.isfile(tmp_path / 'latest' / 'model.safetensors')  # saved before stopping
    state = torch.load(tmp_path / 'latest' / 'state.pt', weights_only=True)
    assert state['step'] == 6


def test_train_user_errors(tmp_path):
    cases = [(['--rewards', 'nope=1'], 'unknown reward'), (['--group_size', '1'], 'group_size'),
             (['--classes', '5000'], '--classes must be in'), (['--resume'], 'no checkpoint'),
             (['--minibatch_size', '5'], 'must divide'), (['--ckpt', fixture('c2i_tiny.pt'), '--model', 'GPT-tiny'],
                                                          'does not fit|does not match')]
    for args, msg in cases:
        with pytest.raises((ValueError, CheckpointError), match=msg):
            run_train(tmp_path / 'x', '--max_steps', '1', *args)
    # through the command line: one line on stderr, exit code 2, no traceback
    p = subprocess.run([sys.executable, 'train.py', '--preset', 'demo_color', '--group_size', '1', '--out_dir',
                        str(tmp_path / 'y')], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 2 and 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_eval_same_seeds(tmp_path):
    a = run_train(tmp_path, '--eval', '--eval_conds', '3', '--eval_images', '2')
    b = run_train(tmp_path, '--eval', '--eval_conds', '3', '--eval_images', '2')
    assert a == b and set(a['base']) == {'reward', 'colorfulness'}


def test_t2i_training_with_prompt_files(ckpts, tmp_path):
    """Text-to-image GRPO end to end: tiny t2i GPT, tiny T5, a .jsonl prompt file, guided log-probs."""
    p = tmp_path / 'prompts.jsonl'
    p.write_text('{"prompt": "a red fox in snow"}\n\n{"prompt": "two blue cups on a table"}\n')
    args = ['--ckpt', ckpts['t2i'], '--t5', ckpts['t5'], '--cfg_scale', '4.0', '--logprob_mode', 'guided',
            '--conds_per_rank', '2', '--group_size', '4', '--max_steps', '2']
    rows = run_train(tmp_path / 'run', *args, '--prompts', str(p), '--grid_every', '1')
    assert len(rows) == 2 and all(np.isfinite(r['kl']) for r in rows)
    assert os.path.isfile(tmp_path / 'run' / 'grid_00002.png')
    (tmp_path / 'p.json').write_text(json.dumps(['a cat', '', 'a dog']))
    (tmp_path / 'p.txt').write_text('a cat\n\n a dog \n')
    assert train.read_prompts(str(p)) == ['a red fox in snow', 'two blue cups on a table']
    assert train.read_prompts(str(tmp_path / 'p.json')) == ['a cat', 'a dog']
    assert train.read_prompts(str(tmp_path / 'p.txt')) == ['a cat', 'a dog']
    (tmp_path / 'empty.txt').write_text('\n \n')
    (tmp_path / 'bad.jsonl').write_text('{"text": "no prompt key"}\n')
    for bad, msg in [(tmp_path / 'missing.txt', 'does not exist'), (tmp_path / 'empty.txt', 'holds no prompts'),
                     (tmp_path / 'bad.jsonl', 'is not a .json list')]:
        with pytest.raises(ValueError, match=msg):
            run_train(tmp_path / 'bad', *args, '--prompts', str(bad))


def test_torchrun_two_ranks_stay_in_sync(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517',
                        'train.py', '--preset', 'demo_color', '--image_size', '8', '--max_steps', '4', '--save_every', '2',
                        '--device', 'cpu', '--out_dir', str(tmp_path)], cwd=HERE, capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count('ranks in sync: 2 replicas') == 2  # checked at steps 2 and 4
    rows = [json.loads(x) for x in open(tmp_path / 'metrics.jsonl')]
    assert [r['step'] for r in rows] == [1, 2, 3, 4]
    assert rows[0]['images_per_s'] > 0

# -----------------------------------------------------------------------------
# grpo.py
# Tests for grpo.py: each function against an independent computation (hand numbers,
# torch.distributions, plain REINFORCE, probabilities instead of log-probs).


# ---------------------------------------------------------------------------- advantages

def test_advantages_hand_computed():
    # rewards 1,2,3,4: mean 2.5, deviations -1.5,-.5,.5,1.5, sample std sqrt(5/3) = 1.2909944
    A = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4, eps=0.0)
    torch.testing.assert_close(A, torch.tensor([-1.1618950, -0.3872983, 0.3872983, 1.1618950]))
    # default eps = 1e-4 is added to the std, as in TRL
    A = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4)
    torch.testing.assert_close(A, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (1.2909944 + 1e-4))
    # two groups of 2: [0, 1] -> std 1/sqrt(2), deviations +-0.5 -> +-0.7071068
    A = group_advantages(torch.tensor([0.0, 1.0, 5.0, 3.0]), 2, eps=0.0)
    torch.testing.assert_close(A, torch.tensor([-0.7071068, 0.7071068, 0.7071068, -0.7071068]))


def test_advantages_sum_to_zero_per_group():
    torch.manual_seed(0)
    r = torch.rand(6 * 8) * 10
    for scale_std in (True, False):
        A = group_advantages(r, 8, scale_std=scale_std).view(6, 8)
        torch.testing.assert_close(A.sum(1), torch.zeros(6), atol=1e-5, rtol=0)
    # with std scaling, each group has sample std ~1 (eps makes it slightly smaller)
    A = group_advantages(r, 8, eps=0.0).view(6, 8)
    torch.testing.assert_close(A.std(1), torch.ones(6))


def test_advantages_flat_group_is_zero_not_nan():
    # 8 x 0.1 in float32: the mean is off by 7e-9, so naive (r - mean) / std would be ~+-1
    r = torch.cat([torch.full((8,), 0.1), torch.full((8,), 0.7), torch.arange(8.0)])
    for scale_std, eps in ((True, 1e-4), (True, 0.0), (False, 1e-4)):
        A = group_advantages(r, 8, scale_std=scale_std, eps=eps)
        assert (A[:16] == 0).all()
        assert torch.isfinite(A).all() and A[16:].abs().sum() > 0


def test_advantages_no_std_is_r_minus_mean():
    r = torch.tensor([1.0, 2.0, 6.0, 10.0, 10.0, 16.0])
    A = group_advantages(r, 3, scale_std=False)
    torch.testing.assert_close(A, torch.tensor([-2.0, -1.0, 3.0, -2.0, -2.0, 4.0]))


def test_advantages_bad_group_size_raises():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 1)

# ---------------------------------------------------------------------------- log-probs

def test_token_logprobs_matches_categorical():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    tokens = torch.randint(0, 11, (3, 5))
    for t in (1.0, 0.7, 1.5):
        ref = Categorical(logits=logits / t).log_prob(tokens)
        torch.testing.assert_close(token_logprobs(logits, tokens, temperature=t), ref)
    # low-precision logits are promoted: float32 result, close to the float32 reference
    lp = token_logprobs(logits.bfloat16(), tokens)
    assert lp.dtype == torch.float32
    ref = Categorical(logits=logits.bfloat16().float()).log_prob(tokens)
    torch.testing.assert_close(lp, ref)


def test_guided_logprobs_are_log_softmax_of_cfg_mixture():
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    tokens = torch.randint(0, 9, (2, 4))
    s, t = 4.0, 0.9
    torch.testing.assert_close(cfg_mix(cond, uncond, s), uncond + s * (cond - uncond))
    mix = uncond + s * (cond - uncond)
    ref = torch.log_softmax(mix / t, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(policy_logprobs(cond, uncond, tokens, "guided", s, t), ref)
    # cond mode ignores uncond; at CFG scale 1 both modes agree
    ref = torch.log_softmax(cond / t, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(policy_logprobs(cond, None, tokens, "cond", s, t), ref)
    torch.testing.assert_close(policy_logprobs(cond, uncond, tokens, "guided", 1.0, t), ref)


def test_guided_gradients_reach_both_halves():
    torch.manual_seed(0)
    cond = torch.randn(2, 3, 7, requires_grad=True)
    uncond = torch.randn(2, 3, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3))
    policy_logprobs(cond, uncond, tokens, "guided", 3.0).sum().backward()
    assert cond.grad.abs().sum() > 0 and uncond.grad.abs().sum() > 0
    # d/d uncond = (1 - s)/s * d/d cond, since both enter only through the mixture
    torch.testing.assert_close(uncond.grad, cond.grad * (1 - 3.0) / 3.0)


def test_policy_logprobs_bad_mode_raises():
    x, tok = torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError):
        policy_logprobs(x, x, tok, "mixture", 2.0)
    with pytest.raises(ValueError):
        policy_logprobs(x, None, tok, "guided", 2.0)


def test_token_entropy_matches_categorical():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 13) * 2
    torch.testing.assert_close(token_entropy(logits), Categorical(logits=logits).entropy())
    torch.testing.assert_close(token_entropy(torch.zeros(1, 2, 13)), torch.full((1, 2), math.log(13)))

# ---------------------------------------------------------------------------- surrogate and loss

def test_ratio_one_gradient_is_reinforce_with_group_baseline():
    torch.manual_seed(0)
    B, T, V = 8, 6, 10
    logits = torch.randn(B, T, V, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    A = group_advantages(torch.rand(B), 4)
    logp = token_logprobs(logits, tokens)
    loss, stats = grpo_loss(logp, logp.detach(), A)
    (g,) = torch.autograd.grad(loss, logits)
    # independent REINFORCE: -(A * log pi).mean with log pi from torch.distributions
    logits2 = logits.detach().clone().requires_grad_(True)
    ref = -(A[:, None] * Categorical(logits=logits2).log_prob(tokens)).mean()
    (g_ref,) = torch.autograd.grad(ref, logits2)
    torch.testing.assert_close(g, g_ref)
    # the value differs: at rho == 1 the surrogate is -mean(A), ~0 for group-centred A
    torch.testing.assert_close(loss, -A.mean(), atol=1e-6, rtol=0)
    assert stats["clip_frac"] == 0 and stats["ratio_min"] == 1 and stats["ratio_max"] == 1


def test_clipped_side_has_zero_gradient():
    # row 0 has A = +1, row 1 has A = -1; ratios chosen away from the 0.8 / 1.2 edges
    ratio = torch.tensor([[0.5, 1.0, 1.1, 1.5], [0.5, 0.9, 1.0, 1.5]])
    A = torch.tensor([1.0, -1.0])
    logp_old = torch.randn(2, 4)
    logp = (ratio.log() + logp_old).requires_grad_(True)
    pg = clipped_surrogate(logp, logp_old, A)
    # by hand: A>0 -> -min(r, clip r): -0.5, -1, -1.1, -1.2 ; A<0 -> max(r, clip r): .8, .9, 1, 1.5
    torch.testing.assert_close(pg, torch.tensor([[-0.5, -1.0, -1.1, -1.2], [0.8, 0.9, 1.0, 1.5]]))
    (g,) = torch.autograd.grad(pg.sum(), logp)
    # clip binds at (0,3): A>0, r>1.2 and (1,0): A<0, r<0.8 -> zero grad; elsewhere d/dlogp = -A r
    expect = -A[:, None] * ratio
    expect[0, 3] = expect[1, 0] = 0.0
    torch.testing.assert_close(g, expect)
    loss, stats = grpo_loss(logp, logp_old, A)
    assert stats["clip_frac"].item() == pytest.approx(2 / 8)
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["ratio_mean"].item() == pytest.approx(ratio.mean().item())
    torch.testing.assert_close(loss, pg.mean())


def test_asymmetric_clip_range():
    # eps_low=0.1, eps_high=0.3: r=1.25 is inside for A>0, r=0.85 is clipped for A<0
    ratio = torch.tensor([[1.25, 1.35], [0.85, 0.95]])
    A = torch.tensor([2.0, -2.0])
    pg = clipped_surrogate(ratio.log(), torch.zeros(2, 2), A, eps_low=0.1, eps_high=0.3)
    torch.testing.assert_close(pg, torch.tensor([[-2.5, -2.6], [1.8, 1.9]]))
    _, stats = grpo_loss(ratio.log(), torch.zeros(2, 2), A, eps_low=0.1, eps_high=0.3)
    assert stats["clip_frac"].item() == pytest.approx(2 / 4)


def test_k3_nonnegative_zero_at_equal_and_matches_probability_formula():
    torch.manual_seed(0)
    logp, ref = torch.randn(64, 32) * 3, torch.randn(64, 32) * 3
    k3 = kl_k3(logp, ref)
    assert (k3 >= 0).all()
    # independent: with r = pi_ref / pi (in float64 probabilities), k3 = r - log r - 1
    r = ref.double().exp() / logp.double().exp()
    torch.testing.assert_close(k3.double(), r - r.log() - 1, rtol=1e-5, atol=1e-6)
    assert (kl_k3(logp, logp) == 0).all()
    # tiny differences: the naive exp(d) - d - 1 can round below 0; k3 must not
    near = logp + torch.randn(64, 32) * 1e-6
    assert (kl_k3(logp, near) >= 0).all()
    # gradient w.r.t. logp is 1 - pi_ref / pi
    lp = logp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kl_k3(lp, ref).sum(), lp)
    torch.testing.assert_close(g.double(), 1 - r, rtol=1e-4, atol=1e-5)


def test_k3_mean_estimates_kl_under_samples_from_policy():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(6), torch.randn(6)
    p, q = Categorical(logits=p_logits), Categorical(logits=q_logits)
    x = p.sample((200_000,))
    est = kl_k3(p.log_prob(x), q.log_prob(x)).mean()
    exact = torch.distributions.kl_divergence(p, q)
    assert abs(est.item() - exact.item()) < 0.02 * max(1.0, exact.item())


def test_grpo_loss_with_kl_matches_independent_sum():
    torch.manual_seed(0)
    B, T, beta = 4, 5, 0.04
    logp, ref = torch.randn(B, T) - 2, torch.randn(B, T) - 2
    logp_old = logp + 0.3 * torch.randn(B, T)
    A = torch.tensor([1.0, -0.5, 0.0, 2.0])
    loss, stats = grpo_loss(logp, logp_old, A, ref_logp=ref, beta=beta)
    # independent: probabilities, explicit clamp, k3 as r - log r - 1
    rho = logp.exp() / logp_old.exp()
    surr = -torch.minimum(rho * A[:, None], rho.clamp(0.8, 1.2) * A[:, None])
    r = ref.exp() / logp.exp()
    k3 = r - r.log() - 1
    torch.testing.assert_close(loss, surr.mean() + beta * k3.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["pg_loss"], surr.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["kl"], k3.mean(), rtol=1e-5, atol=1e-6)
    # beta = 0: KL still reported, not in the loss; no reference: KL reported as 0
    loss0, stats0 = grpo_loss(logp, logp_old, A, ref_logp=ref, beta=0.0)
    torch.testing.assert_close(loss0, surr.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats0["kl"], k3.mean(), rtol=1e-5, atol=1e-6)
    _, stats1 = grpo_loss(logp, logp_old, A)
    assert stats1["kl"].item() == 0.0
    assert all(not v.requires_grad for v in stats.values())


# -----------------------------------------------------------------------------
# rewards.py
# Tests for rewards.py, on a tiny random-weight open_clip model (no network, a few seconds on CPU).
#
# Each test compares against an independent reference: open_clip's own PIL transform, a hand-written
# CLIP-IQA softmax, a hand-computed colourfulness, scores of the in-memory model for HPS loading.


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


# -----------------------------------------------------------------------------
# sample.py
# Tests for sample.py against references: torchvision save_image / make_grid for the PNG, a direct
# model.generate + VQ decode for the images, LlamaGen's own left-padding loop (sample_t2i.py) and
# per-prompt unpadded T5 encodings for encode_prompts, plus the user errors (exit code 2, one line).
# Uses the tiny LlamaGen fixtures in ../shared/fixtures/llamagen, rewritten as self-describing files.




def _gpt(weights, config):
    cfg = model.GPTConfig(**json.load(open(os.path.join(FIX, config)))['model_args'])
    sd, _ = model.read_state_dict(os.path.join(FIX, weights))
    return model.load_into(model.GPT(cfg), sd, weights).eval()


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """Self-describing copies of the tiny fixtures and a tiny random T5 saved with save_pretrained."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    d = tmp_path_factory.mktemp('ckpts')
    model.save_gpt(_gpt('c2i_tiny.safetensors', 'c2i_tiny_config.json'), str(d / 'c2i.safetensors'))
    model.save_gpt(_gpt('t2i_tiny.safetensors', 't2i_tiny_config.json'), str(d / 't2i.safetensors'))  # cls 120
    vq_args = json.load(open(os.path.join(FIX, 'vq_tiny_config.json')))['model_args']
    vq = tokenizer.VQModel(tokenizer.VQConfig(**vq_args, ch=32))
    model.load_into(vq, model.read_state_dict(os.path.join(FIX, 'vq_tiny.pt'))[0], 'vq_tiny.pt')
    tokenizer.save_vq(vq, str(d / 'vq.safetensors'))
    tok = ByT5Tokenizer()  # needs no files
    torch.manual_seed(0)  # d_model = the t2i fixture's caption_dim
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    t5.save_pretrained(str(d / 't5'))
    tok.save_pretrained(str(d / 't5'))
    return {k: str(d / v) for k, v in dict(c2i='c2i.safetensors', t2i='t2i.safetensors', vq='vq.safetensors',
                                              t5='t5').items()}


def _run(ckpts, kind, *args, out=None):
    base = ['--ckpt', ckpts[kind], '--vq_ckpt', ckpts['vq'], '--device', 'cpu', '--t5', ckpts['t5']]
    return sample.main([*args, *base, '--out', out or ''])


# ---------------------------------------------------------------------------- c2i end to end

def test_c2i_png_npz_match_torchvision_and_direct_generate(ckpts, tmp_path):
    from torchvision.utils import save_image
    png, npz = tmp_path / 'g.png', tmp_path / 'g.npz'
    imgs = _run(ckpts, 'c2i', '--class', '3', '7', '--n', '3', '--seed', '5', '--npz', str(npz), out=str(png))
    assert imgs.shape == (6, 8, 8, 3) and imgs.dtype == np.uint8  # 4x4 tokens, VQ downsamples by 2
    arr = np.load(npz)['arr_0']
    assert arr.dtype == np.uint8 and arr.shape == (6, 8, 8, 3) and (arr == imgs).all()
    # reference: the same generator stream through model.generate and the VQ decoder, saved the
    # way LlamaGen saves (torchvision save_image, nrow = images per row, value_range (-1, 1))
    gpt, vq = model.load_gpt(ckpts['c2i']), tokenizer.load_vq(ckpts['vq'])
    gen = torch.Generator('cpu').manual_seed(5)
    tokens, _ = model.generate(gpt, torch.tensor([3, 3, 3, 7, 7, 7]), cfg_scale=4.0, top_k=2000, generator=gen)
    with torch.no_grad():
        x = vq.decode(tokens.view(6, 4, 4))
    buf = io.BytesIO()
    save_image(x, buf, format='png', nrow=3, normalize=True, value_range=(-1, 1))
    ref = np.asarray(Image.open(buf))
    got = np.asarray(Image.open(png))
    assert got.shape == ref.shape == (2 * 10 + 2, 3 * 10 + 2, 3)  # 2-pixel gaps as make_grid
    assert (got == ref).all()


def test_seed_determinism(ckpts):
    a = _run(ckpts, 'c2i', '--class', '1', '--n', '4', '--seed', '0')
    b = _run(ckpts, 'c2i', '--class', '1', '--n', '4', '--seed', '0')
    c = _run(ckpts, 'c2i', '--class', '1', '--n', '4', '--seed', '1')
    assert (a == b).all()
    assert (a != c).any()


def test_class_by_name_equals_class_id(ckpts):
    import open_clip
    name = open_clip.IMAGENET_CLASSNAMES[3]  # 'tiger shark'; the tiny model has classes 0..9
    by_id = _run(ckpts, 'c2i', '--class', '3', '--n', '2')
    by_name = _run(ckpts, 'c2i', '--class', f' {name.upper()} ', '--n', '2')
    assert (by_id == by_name).all()
    with pytest.raises(UserError, match="did you mean|close matches: 'tiger shark'"):
        sample.class_ids(['tigr shark'])


def test_to_uint8_rounds_like_save_image():
    from torchvision.utils import save_image
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16) * 2.4 - 1.2  # beyond [-1, 1] too
    x[0, 0, 0, :5] = torch.tensor([-1.0, 1.0, 0.0, 1 / 255 - 1, 0.5 / 127.5 - 1])
    buf = io.BytesIO()
    save_image(x, buf, format='png', normalize=True, value_range=(-1, 1))
    ref = np.asarray(Image.open(buf))
    assert (to_uint8(x)[0].permute(1, 2, 0).numpy() == ref).all()

# ---------------------------------------------------------------------------- t2i

def _llamagen_left_pad(emb, mask):
    """LlamaGen sample_t2i.py's loop, written out: rotate each row by its valid count, flip the mask."""
    new_mask = torch.flip(mask, dims=[-1])
    rows = []
    for e, m in zip(emb, mask):
        k = int(m.sum().item())
        rows.append(torch.cat([e[k:], e[:k]]))
    return torch.stack(rows) * new_mask[:, :, None], new_mask


def test_encode_prompts_left_padding(ckpts, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    tok, enc = load_t5(ckpts['t5'])  # a save_pretrained directory loads offline
    prompts = ['A red  Cube', 'two cats on a sofa, photo', 'x' * 200]  # the last one is truncated
    emb, mask = encode_prompts(prompts, tok, enc, max_length=120)
    assert emb.shape == (3, 120, 32) and emb.dtype == torch.float32 and mask.dtype == torch.int64
    lens = [len('a red cube') + 1, len(prompts[1]) + 1, 120]  # ByT5: one token per byte, plus </s>
    for i, n in enumerate(lens):
        assert mask[i].tolist() == [0] * (120 - n) + [1] * n  # valid rows at the end
        assert (emb[i, :120 - n] == 0).all() and (emb[i, 120 - n:].abs().sum(-1) > 0).all()
    # reference 1: each prompt encoded alone, without padding, gives the valid rows
    for i, p in enumerate(prompts[:2]):
        ids = tok(' '.join(p.lower().split()), return_tensors='pt').input_ids
        with torch.no_grad():
            alone = enc(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(emb[i, 120 - lens[i]:], alone, atol=1e-5, rtol=1e-5)
    # reference 2: LlamaGen's loop on the right-padded encoder output
    b = tok([' '.join(p.lower().split()) for p in prompts], max_length=120, padding='max_length',
            truncation=True, return_tensors='pt')
    with torch.no_grad():
        right = enc(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    ref_emb, ref_mask = _llamagen_left_pad(right, b.attention_mask)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(emb, ref_emb, atol=0, rtol=0)


def test_t2i_end_to_end_matches_direct_generate(ckpts, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    prompts = ['a red cube', 'two cats on a sofa']
    imgs = _run(ckpts, 't2i', '--prompt', *prompts, '--n', '2', '--seed', '3', '--cfg', '3.0')
    assert imgs.shape == (4, 8, 8, 3)
    gpt, vq = model.load_gpt(ckpts['t2i']), tokenizer.load_vq(ckpts['vq'])
    emb, mask = encode_prompts(prompts, *load_t5(ckpts['t5']), max_length=120)
    tokens, _ = model.generate(gpt, emb.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), cfg_scale=3.0,
                               top_k=1000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = to_uint8(vq.decode(tokens.view(4, 4, 4))).permute(0, 2, 3, 1).numpy()
    assert (imgs == ref).all()


def test_load_t5_offline_is_fast_and_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HOME', str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        load_t5('google/flan-t5-xl')
    msg = str(e.value)
    assert 'google/flan-t5-xl' in msg and '--t5' in msg and '\n' not in msg

# ---------------------------------------------------------------------------- errors

@pytest.fixture(scope='module')
def bad_files(ckpts, tmp_path_factory):
    d = tmp_path_factory.mktemp('bad')
    data = open(ckpts['c2i'], 'rb').read()
    (d / 'truncated.safetensors').write_bytes(data[:len(data) // 2])
    (d / 'corrupt.pt').write_bytes(os.urandom(4096))
    return {k: str(d / f) for k, f in dict(truncated='truncated.safetensors', corrupt='corrupt.pt').items()}


@pytest.mark.parametrize('case', [
    ['--class', '3', '--prompt', 'x'],  # both conditions
    ['--class', '3', '--n', '0'],
    ['--class', '3', '--bogus', '1'],  # unknown flag
    ['--class', '3', '--model', 'GPT-Q'],  # unknown preset
    ['--class', 'golden retreiver'],  # unknown name
    ['--class', '10'],  # out of range: the tiny model has 10 classes (10 is the null class)
    ['--class', '-1'],
    ['--prompt', 'a cat'],  # prompt to a c2i model
    ['--class', '3', 'T2I'],  # class to a t2i model
    ['--class', '3', '--ckpt', 't2i_XL_stage1_256'],  # known from the release table, before any download
    ['--class', '3', '--ckpt', 'MISSING'],
    ['--class', '3', '--ckpt', 'TRUNCATED'],
    ['--class', '3', '--ckpt', 'CORRUPT'],
    ['--class', '3', '--ckpt', 'VQ'],  # a VQ file: no GPT keys
    ['--class', '3', '--model', 'GPT-B'],  # the tiny weights into GPT-B: wrong shapes
    ['--class', '3', '--vq_ckpt', 'C2I'],  # a GPT file as the VQ
])
def test_user_errors_in_process(ckpts, bad_files, tmp_path, case):
    files = {'MISSING': str(tmp_path / 'nope.pt'), 'TRUNCATED': bad_files['truncated'],
             'CORRUPT': bad_files['corrupt'], 'VQ': ckpts['vq'], 'C2I': ckpts['c2i']}
    ckpt = ckpts['t2i'] if case[-1] == 'T2I' else ckpts['c2i']
    args = [files.get(a, a) for a in case if a != 'T2I']
    args = ['--ckpt', ckpt, '--vq_ckpt', ckpts['vq'], '--device', 'cpu'] + args  # later flags win
    out = tmp_path / 'x.png'
    with pytest.raises((ValueError, CheckpointError)) as e:
        sample.main(args + ['--out', str(out), '--npz', str(tmp_path / 'x.npz')])
    assert '\n' not in str(e.value) and str(e.value).strip()
    assert not out.exists() and not (tmp_path / 'x.npz').exists()


def _cli(args, cwd, **env):
    return subprocess.run([sys.executable, os.path.join(HERE, 'sample.py'), *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_cli_bad_class_exits_2_with_one_line(ckpts, tmp_path):
    r = _cli(['--class', '12', '--ckpt', ckpts['c2i'], '--vq_ckpt', ckpts['vq'], '--device', 'cpu'], tmp_path)
    assert r.returncode == 2
    assert r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr and '0..9' in r.stderr
    assert not os.listdir(tmp_path)  # no samples.png


def test_cli_default_release_offline_message(tmp_path):
    hf_home = tmp_path / 'hf'
    hf_home.mkdir()
    work = tmp_path / 'work'
    work.mkdir()
    r = _cli([], work, HF_HUB_OFFLINE='1', HF_HOME=str(hf_home))
    assert r.returncode == 2
    assert r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr
    assert 'c2i_B_256.pt' in r.stderr and '--ckpt' in r.stderr
    assert not os.listdir(work)

# ---------------------------------------------------------------------------- parse_config


@dataclass
class _Toy:
    preset: Optional[str] = None  # a name in the presets
    xs: List[int] = field(default_factory=list, metadata=dict(flag='--x'))  # several ints
    k: Optional[int] = None  # optional int
    lr: float = 1e-3  # a float
    flag: bool = False  # a bool
    on: bool = True  # a bool that defaults to on
    mode: str = field(default='a', metadata=dict(choices=['a', 'b']))  # a choice


def test_parse_config_generic(capsys):
    presets = {'fast': dict(lr=0.5, k=3)}
    c = parse_config(_Toy, ['--x', '1', '2', '--flag', '--no-on', '--mode', 'b', '--k=7'], presets=presets)
    assert c == _Toy(xs=[1, 2], k=7, flag=True, on=False, mode='b')
    c = parse_config(_Toy, ['--preset', 'fast', '--k', '9'], presets=presets)  # flags beat the preset
    assert (c.lr, c.k) == (0.5, 9)
    assert capsys.readouterr().out.count('_Toy: {') == 2  # printed once per call
    for bad in (['--lr', 'x'], ['--mode', 'c'], ['--xs', '1'], ['--fla'], ['--preset', 'slow']):
        with pytest.raises(UserError):
            parse_config(_Toy, bad, presets=presets)


# -----------------------------------------------------------------------------
# bench.py: runs end to end (no timing is asserted anywhere)


def test_bench_quick_runs(tmp_path):
    import bench
    bench.RESULTS.clear()
    rows = bench.main(['--quick', '--out', str(tmp_path / 'b.jsonl')])
    names = {r['name'] for r in rows}
    assert {'sample_kv_cache', 'kv_cache_vs_recompute', 'cfg_one_batch_vs_two_forwards', 'reward_batched_vs_pil_loop',
            'grpo_step', 'grpo_step_rollout', 'grpo_overhead_beyond_rollout', 'compile_vs_eager'} <= names
    fractions = [r['value'] for r in rows if r['name'] in ('grpo_step_rollout', 'grpo_step_decode', 'grpo_step_reward',
                                                             'grpo_step_update')]
    assert 0.9 < sum(fractions) <= 1.0 + 1e-6  # the parts account for the step
    assert len(open(tmp_path / 'b.jsonl').readlines()) == len(rows)


# -----------------------------------------------------------------------------
# GPU (skipped without one): the same parity on the device, bf16 and torch.compile close to eager

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')


@cuda
@torch.no_grad()
def test_gpu_parity_float32():
    m, e = tiny_gpt().cuda(), load_file(fixture('c2i_tiny_expected.safetensors'))
    cls, tok = e['input.class_ids'].cuda(), e['input.tokens'].cuda()
    torch.testing.assert_close(m(tok[:, :-1], cls).cpu(), e['logits.teacher_forced'], atol=ATOL, rtol=0)
    torch.testing.assert_close(forced_generate(m, cls, tok, cfg_scale=4.0).cpu(), e['logits.kv_cfg4'], atol=ATOL, rtol=0)
    vq, ev = tiny_vq().cuda(), load_file(fixture('vq_tiny_expected.safetensors'))
    assert torch.equal(vq.encode(ev['input.images'].cuda()).flatten().cpu(), ev['indices'])


@cuda
@torch.no_grad()
def test_gpu_bf16_compile_close_to_eager():
    m = _random_head(tiny_gpt()).cuda()
    e = load_file(fixture('c2i_tiny_expected.safetensors'))
    cls, tok = e['input.class_ids'].cuda(), e['input.tokens'].cuda()
    ref = forced_generate(m, cls, tok, cfg_scale=4.0)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        eager = forced_generate(m, cls, tok, cfg_scale=4.0)
        compiled = forced_generate(m, cls, tok, cfg_scale=4.0, compile=True)
        compiled_again = forced_generate(m, cls, tok, cfg_scale=4.0, compile=True)  # replays the graphs
    scale = ref.abs().max()
    assert (eager - ref).abs().max() < 0.05 * scale
    assert (compiled - eager).abs().max() < 0.05 * scale
    torch.testing.assert_close(compiled_again, compiled)


@cuda
def test_gpu_train_steps(tmp_path):
    rows = run_train(tmp_path, '--max_steps', '3', '--device', 'cuda', '--cfg_scale', '2.0', '--compile')
    assert len(rows) == 3 and all(np.isfinite(r['reward']) and np.isfinite(r['grad_norm']) for r in rows)


# -----------------------------------------------------------------------------
# bad input battery (issue 13): every row is a command line that must end in exit code 2 with one sentence
# naming the problem, no traceback, and nothing written to the output path. Rows run in-process through
# cli.run (the scripts' own entry wrapper), so each costs about the validation time, not a model load.

import bench
import cli


def _bad_input_files(tmp):
    """Files the rows refer to, made fresh per row: {name: path}."""
    f = dict(file=tmp / 'a_file', bin=tmp / 'binary.txt', prompts=tmp / 'p.txt', ckpt=tmp / 'tiny.safetensors')
    f['file'].write_text('x')
    f['bin'].write_bytes(b'\xff\xfe\x00\x81' * 64)
    f['prompts'].write_text('a red fox\n')
    save_gpt(tiny_gpt(), str(f['ckpt']))
    return {k: str(v) for k, v in f.items()}


TRAIN = ['--preset', 'demo_color', '--image_size', '8']
BAD_INPUTS = [  # (script, argv with {placeholders}, phrase of the message)
    # zero or negative where a positive number is needed
    ('train', TRAIN + ['--save_every', '0'], '--save_every must be >= 1'),
    ('train', TRAIN + ['--conds_per_rank', '0'], '--conds_per_rank must be >= 1'),
    ('train', TRAIN + ['--num_iterations', '0'], '--num_iterations must be >= 1'),
    ('train', TRAIN + ['--max_steps', '0'], '--max_steps must be >= 1'),
    ('train', TRAIN + ['--group_size', '1'], '--group_size must be >= 2'),
    ('train', TRAIN + ['--lr', '0'], '--lr must be > 0'),
    ('train', TRAIN + ['--beta', '-0.1'], '--beta must be >= 0'),
    ('train', TRAIN + ['--eps_low', '1'], '--eps_low must be >= 0 and < 1'),
    ('train', TRAIN + ['--lr', 'nan'], '--lr must be > 0'),
    # sampling knobs that used to be accepted silently
    ('train', TRAIN + ['--temperature', '-1'], '--temperature must be > 0'),
    ('train', TRAIN + ['--top_p', '0'], '--top_p must be > 0 and <= 1'),
    ('train', TRAIN + ['--top_p', '2'], '--top_p must be > 0 and <= 1'),
    ('train', TRAIN + ['--top_k', '-5'], '--top_k must be >= 0'),
    ('train', TRAIN + ['--cfg_interval', '-2'], '--cfg_interval must be >= -1'),
    ('train', TRAIN + ['--dtype', 'int8'], '--dtype must be one of'),
    ('train', TRAIN + ['--logprob_mode', 'mixed'], '--logprob_mode must be one of'),
    ('train', TRAIN + ['--minibatch_size', '5'], 'must divide'),
    ('train', TRAIN + ['--rewards', 'colorfulness=1,beauty=2'], "unknown reward 'beauty'"),
    ('train', TRAIN + ['--bogus', '1'], 'unrecognized arguments'),
    # contradictions, visible before loading
    ('train', TRAIN + ['--prompts', '{prompts}'], 'class-to-image model'),
    ('train', TRAIN + ['--ckpt', 'c2i_B_256', '--prompts', '{prompts}'], 'class-to-image model'),
    ('train', TRAIN + ['--ckpt', 't2i_XL_stage1_256'], 'pass --prompts FILE'),
    ('train', TRAIN + ['--ckpt', '{ckpt}', '--vq_ckpt', 'vq_ds16_c2i', '--image_size', '256'],
     '--image_size 256 contradicts'),
    ('train', TRAIN + ['--ckpt', 'c2i_B_256', '--classes', '1000'], '--classes must be in 0..999'),  # before any fetch
    ('train', TRAIN + ['--classes', '-3'], '--classes must be class ids >= 0'),
    # input files
    ('train', TRAIN + ['--ckpt', 't2i_XL_stage1_256', '--prompts', '{bin}'], 'could not be read as UTF-8'),
    ('train', TRAIN + ['--ckpt', 't2i_XL_stage1_256', '--prompts', '{tmp}/nope.txt'], 'does not exist'),
    # output locations, checked before anything is computed
    ('train', TRAIN + ['--out_dir', '{file}'], 'is a file, not a directory'),
    ('train', TRAIN + ['--out_dir', '{file}/sub'], 'is not a writable directory'),
    ('train', TRAIN + ['--out_dir', '/proc/ar_grpo_run'], 'is not a writable directory'),
    ('train', TRAIN + ['--device', 'tpu'], '--device must be cpu, cuda or cuda:N'),
    # bench.py
    ('bench', ['--device', 'gpu'], '--device must be cpu, cuda or cuda:N'),
    ('bench', ['--reps', '0'], '--reps must be >= 1'),
    ('bench', ['--image_size', '100'], 'multiple of 16'),
    ('bench', ['--only', 'kv', 'warp'], '--only takes sections'),
    ('bench', ['--model', 'GPT-Q'], '--model must be one of'),
    ('bench', ['--out', '{file}/b.jsonl'], 'cannot be written'),
    ('bench', ['--out', '{tmp}'], 'is a directory'),
    ('bench', ['--judge_batch', '0'], '--judge_batch must be >= 1'),
    ('bench', ['--judge_tokens', '0'], '--judge_tokens must be >= 1'),
    # the flags of the judge, the global batch, evaluation, the miniature world and the memory options
    ('train', TRAIN + ['--images_per_step', '12'], 'must be a multiple of --group_size'),
    ('train', TRAIN + ['--judge_url', 'localhost:8000'], 'is not an http(s) URL'),
    ('train', TRAIN + ['--eval_ckpt', '{ckpt}'], 'add --eval'),
    ('train', TRAIN + ['--eval', '--eval_ckpt', '{tmp}/nope.safetensors'], 'is not a release'),
    ('train', TRAIN + ['--world', 'nowhere'], 'is neither a world preset'),
    ('train', TRAIN + ['--rewards', 'world_class=1'], 'need a world'),
    ('train', TRAIN + ['--kl_images', '-1'], '--kl_images must be >= 0'),
    ('train', TRAIN + ['--lora_rank', '-2'], '--lora_rank must be >= 0'),
    ('train', TRAIN + ['--lora_rank', '4', '--lora_targets', 'wq'], '--lora_targets must name'),
    ('train', TRAIN + ['--fsdp'], 'launch with torchrun'),
]
if not torch.cuda.is_available():
    BAD_INPUTS += [('bench', ['--device', 'cuda'], 'torch sees no GPU'),
                   ('train', TRAIN + ['--device', 'cuda'], 'torch sees no GPU')]
_ERRORS = (ValueError, CheckpointError, WeightsUnavailable)


@pytest.mark.parametrize('script,argv,phrase', BAD_INPUTS, ids=[' '.join(r[1][len(TRAIN) * (r[0] == 'train'):])
                                                               for r in BAD_INPUTS])
def test_bad_input_battery(script, argv, phrase, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # a row that reached the Hub would fail on a different message
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    files = _bad_input_files(tmp_path)
    out = tmp_path / 'out'
    args = [a.format(tmp=tmp_path, **files) for a in argv]
    if script == 'train' and '--out_dir' not in args:
        args += ['--out_dir', str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    main = dict(train=train.main, bench=bench.main)[script]
    code = cli.run(main, args, errors=_ERRORS)
    err = capsys.readouterr().err
    assert code == 2, err
    assert phrase in err, err
    assert 'Traceback' not in err and err.count('\n') == 1 and err.startswith('error: ')
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output dir, no output file


def test_bad_input_exits_2_from_the_command_line(tmp_path):
    """The real entry points: exit status 2, one line, no traceback, output directory untouched."""
    for script, args in [('train.py', TRAIN + ['--save_every', '0', '--out_dir', str(tmp_path / 'o')]),
                         ('bench.py', ['--reps', '0'])]:
        p = subprocess.run([sys.executable, script, *args], cwd=HERE, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith('error: ')
    assert not (tmp_path / 'o').exists()


def test_bad_input_under_torchrun_is_said_once(tmp_path):
    """Two CPU ranks, the same config error on both: one sentence on stderr, every rank exits 2."""
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29613',
                        'train.py', *TRAIN, '--save_every', '0', '--out_dir', str(tmp_path / 'o')],
                       cwd=HERE, capture_output=True, text=True, timeout=180, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode != 0
    assert p.stderr.count('--save_every must be >= 1') == 1, p.stderr[-3000:]
    codes = re.findall(r'exitcode\s*:\s*(-?\d+)', p.stderr)  # torchrun's summary: one entry per failed rank
    assert codes and set(codes) == {'2'}, p.stderr[-3000:]
    assert not (tmp_path / 'o').exists()


def test_atomic_write_is_all_or_nothing(tmp_path):
    a, b = tmp_path / 'a.txt', tmp_path / 'b.txt'

    def fail(tmp):
        raise OSError('disk full')
    with pytest.raises(OSError):
        cli.atomic_write({str(a): lambda t: Path(t).write_text('A'), str(b): fail})
    assert os.listdir(tmp_path) == []  # neither file, no temp left over
    cli.atomic_write({str(a): lambda t: Path(t).write_text('A'), str(b): lambda t: Path(t).write_text('B')})
    assert (a.read_text(), b.read_text()) == ('A', 'B') and sorted(os.listdir(tmp_path)) == ['a.txt', 'b.txt']

# ----------------------------------------------------------------------------- judge (issue 9)
# The VLM judge on a tiny random Qwen2.5-VL (rewards.tiny_judge: ~30k parameters, seconds on CPU) against the
# plain transformers processor + forward one image at a time; the served judge through a real HTTP server on
# 127.0.0.1; the paper's recipe through train.py; the binning; the non-finite rule; prompt files; global batch.

import base64
import http.server
import socket
import threading

from rewards import JudgeError, JudgeScore, binned, tiny_judge

JUDGE_NAMES = ('realism', 'no_artifacts', 'vlm_quality')
ANSWERS = {'realism': (('Yes', 0), ('No', 1)), 'no_artifacts': (('Yes', 0), ('No', 1)),
           'vlm_quality': tuple((str(d), d) for d in range(6))}  # written out again: an independent reference


@pytest.fixture(scope='module')
def judge():
    return tiny_judge(seed=0)


def u8_images(b, h, w, seed):
    """Images whose [0, 1] pixels are exact uint8 levels, so a PNG round trip (served judge) changes nothing."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g).float() / 127.5 - 1


@torch.no_grad()
def judge_reference(judge, image, question, name):
    """One image, the whole chat through the plain processor and model; full softmax, then renormalised."""
    proc, model = judge.processor, judge.model
    chat = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': question}]}]
    text = proc.apply_chat_template(chat, add_generation_prompt=True)
    inputs = proc(text=[text], images=[(image.clamp(-1, 1) + 1) * 127.5], return_tensors='pt')
    p = model(**inputs).logits[0, -1].softmax(-1)
    ids = [proc.tokenizer.convert_tokens_to_ids(a) for a, _ in ANSWERS[name]]
    return sum(p[i] * v for i, (_, v) in zip(ids, ANSWERS[name])) / p[ids].sum()


def judge_question(name, subject):
    q = rewards.JUDGE_QUESTIONS[name][0]
    return q.format(subject) if name == 'vlm_quality' else q


def test_judge_batched_equals_per_image_reference(judge):
    # sizes: kept (16x16), rounded to the patch grid (20x12 -> 16x16), shrunk to max_pixels (40x28 -> 32x24)
    cases = [((16, 16), [207, 1, 980]), ((20, 12), ['a cat', 'two dogs on a red sofa at night', 'x']),
             ((40, 28), ['a photo of 3 birds', 'a tabby cat', 'sky'])]
    for seed, ((h, w), conds) in enumerate(cases):
        images = make_images(3, h, w, seed)
        subjects = [c if isinstance(c, str) else open_clip.IMAGENET_CLASSNAMES[c] for c in conds]
        for name in JUDGE_NAMES:
            got = JudgeScore(judge, name)(images, conds)
            ref = torch.stack([judge_reference(judge, im, judge_question(name, s), name)
                               for im, s in zip(images, subjects)])
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
            perm = torch.tensor([2, 0, 1])
            torch.testing.assert_close(JudgeScore(judge, name)(images[perm], [conds[i] for i in perm]), got[perm],
                                       atol=1e-5, rtol=0)
    assert got.min() >= 0 and got.max() <= 5 and got.std() > 1e-3  # a random judge still tells images apart


class FakeJudgeServer(http.server.ThreadingHTTPServer):
    """OpenAI-style /v1/chat/completions on 127.0.0.1 backed by the tiny judge: the PNG and question of each
    request through the plain processor + forward, the top-20 log-probs of the first token returned.
    mode: 'ok', 'http500', or 'no_logprobs' (a reply without the log-probs)."""

    def __init__(self, judge):
        super().__init__(('127.0.0.1', 0), FakeJudgeHandler)
        self.judge, self.mode, self.lock, self.requests = judge, 'ok', threading.Lock(), []


class FakeJudgeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    @torch.no_grad()
    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        srv.requests.append((self.path, {k: v for k, v in body.items() if k != 'messages'}))
        if srv.mode == 'http500':
            self.send_error(500, 'boom')
            return
        parts = {c['type']: c for c in body['messages'][0]['content']}
        png = parts['image_url']['image_url']['url'].split(',', 1)[1]
        image = torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(png))))).permute(2, 0, 1).float()
        proc, model = srv.judge.processor, srv.judge.model
        chat = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': parts['text']['text']}]}]
        inputs = proc(text=[proc.apply_chat_template(chat, add_generation_prompt=True)], images=[image],
                      return_tensors='pt')
        with srv.lock:
            logp = model(**inputs).logits[0, -1].float().log_softmax(-1)
        top = logp.topk(min(20, len(logp)))
        entries = [{'token': proc.tokenizer.convert_ids_to_tokens(i), 'logprob': v}
                   for v, i in zip(top.values.tolist(), top.indices.tolist())]
        choice = {'message': {'role': 'assistant', 'content': entries[0]['token']},
                  'logprobs': {'content': [{**entries[0], 'top_logprobs': entries}]}}
        reply = {'choices': [choice]} if srv.mode == 'ok' else {'choices': [{'message': choice['message']}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)



def test_judge_served_equals_in_process_and_fails_cleanly(judge):
    srv = FakeJudgeServer(judge)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        url = f'http://127.0.0.1:{srv.server_address[1]}/v1'
        images, conds = u8_images(5, 20, 12, seed=3), ['a red car', 'a', 'two cats', 'x y', 'a dog']
        reward = build_reward('realism=1,vlm_quality=0.5', judge_url=url, judge_model='tiny')
        total, raw = reward(images, conds)
        for name in ('realism', 'vlm_quality'):
            torch.testing.assert_close(raw[name], JudgeScore(judge, name)(images, conds), atol=1e-4, rtol=0)
        assert len(srv.requests) == 10 and all(p == '/v1/chat/completions' for p, _ in srv.requests)
        assert all(b['max_tokens'] == 1 and b['logprobs'] is True and b['top_logprobs'] == 20 and b['model'] == 'tiny'
                   for _, b in srv.requests)
        for mode, msg in [('http500', 'answered HTTP 500'), ('no_logprobs', 'without log-probs')]:
            srv.mode = mode
            with pytest.raises(JudgeError, match=msg) as err:
                reward(images[:2], conds[:2])
            assert url in str(err.value) and '\n' not in str(err.value)
    finally:
        srv.shutdown()
        srv.server_close()
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(('127.0.0.1', 0))
        closed = f'http://127.0.0.1:{s.getsockname()[1]}/v1'
    with pytest.raises(JudgeError, match='could not reach the judge server at ' + re.escape(closed)):
        build_reward('no_artifacts=1', judge_url=closed, judge_model='tiny')(images[:1], [1])


def test_judge_binned_edges(tiny):
    c = torch.tensor([-1.0, -1e-6, 0.0, 0.2999, 0.3, 0.5999, 0.6, 1.0, float('nan')])
    out = binned(c)
    assert out[:-1].tolist() == [-1.0, -1.0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5] and math.isnan(out[-1])
    images, ids = make_images(), [3, 4, 5, 6]  # clip_binned alone: the binned CLIPScore
    _, raw = build_reward('clip_binned=1', clip_model=TINY, clip_pretrained=None)(images, ids)
    assert torch.equal(raw['clip_binned'], binned(ClipScore(*tiny)(images, ids)))


TINY_B = 'judge-test-tiny-b'  # a second tiny open_clip, standing in for the recipe's ViT-B-32


@pytest.fixture(scope='module')
def paper_backbones(tiny, judge, tmp_path_factory):
    """Keyword arguments of build_reward that put tiny random models under every term of the recipe."""
    d = tmp_path_factory.mktemp('paper')
    (d / f'{TINY_B}.json').write_text(json.dumps({**TINY_CFG, 'embed_dim': 24}))
    open_clip.add_model_config(d / f'{TINY_B}.json')
    torch.manual_seed(2)
    torch.save({'state_dict': open_clip.create_model(TINY).state_dict()}, d / 'hps.pt')
    return dict(clip_model=TINY, clip_pretrained=None, paper_clip=(TINY_B, None), hps_model=TINY,
                hps_ckpt=str(d / 'hps.pt'), judge=judge)


def test_judge_paper_recipe_is_the_weighted_sum(paper_backbones, tiny, monkeypatch, tmp_path):
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


def test_judge_nonfinite_reward_left_out_of_its_group():
    nan, inf = float('nan'), float('inf')
    r = torch.tensor([1.0, 2.0, nan, 4.0, 5.0, inf, nan, 5.0, 3.0, nan, nan, -inf, 0.5, 0.7, 0.2, 0.9])
    adv = group_advantages(r, 4)
    m, s = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)  # the finite 1, 2, 4
    expected = [(1 - m) / (s + 1e-4), (2 - m) / (s + 1e-4), 0, (4 - m) / (s + 1e-4)]
    expected += [0, 0, 0, 0] + [0, 0, 0, 0]  # flat among its finite rewards; a single finite reward
    torch.testing.assert_close(adv[:12], torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv[12:], group_advantages(r[12:], 4), atol=1e-6, rtol=0)  # as if alone
    torch.testing.assert_close(group_advantages(r, 4, scale_std=False)[:4], torch.tensor([1 - m, 2 - m, 0, 4 - m]))


def test_judge_one_nonfinite_reward_does_not_skip_the_step(tmp_path, monkeypatch):
    real = train.build_reward

    def one_nan(*args, **kwargs):  # image 3 of every step fails to score
        inner = real(*args, **kwargs)

        def reward(images, conds):
            total, raw = inner(images, conds)
            return total.index_fill(0, torch.tensor([3]), math.nan), raw
        return reward
    monkeypatch.setattr(train, 'build_reward', one_nan)
    rows = run_train(tmp_path, '--max_steps', '2')
    assert [(r['skipped'], r['nonfinite']) for r in rows] == [(0, 1), (0, 1)]
    assert all(np.isfinite(r['reward']) and np.isfinite(r['grad_norm']) for r in rows)


def test_judge_prompt_file_formats(tmp_path):
    files = {'t2i.json': json.dumps([{'conversations': [{'from': 'human', 'value': 'a red fox'},
                                                        {'from': 'gpt', 'value': 'ignored'}]},
                                     {'conversations': [{'value': ' two cups '}]}]),
             'coco.json': json.dumps({'images': [], 'annotations': [{'image_id': 1, 'caption': 'a red fox\n'},
                                                                    {'image_id': 2, 'caption': 'two cups'}]}),
             'geneval.jsonl': '{"tag": "single_object", "prompt": "a red fox"}\n{"prompt": "two cups"}\n'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert train.read_prompts(str(tmp_path / name)) == ['a red fox', 'two cups'], name
    (tmp_path / 'bin.txt').write_bytes(bytes(range(128, 256)))
    (tmp_path / 'bad.json').write_text(json.dumps([{'conversations': []}]))
    for name, msg in [('bin.txt', 'could not be read as UTF-8'), ('bad.json', 'conversations')]:
        with pytest.raises(UserError, match=msg) as err:
            train.read_prompts(str(tmp_path / name))
        assert name in str(err.value) and '\n' not in str(err.value)


def test_judge_global_batch_and_flag_errors(tmp_path, monkeypatch):
    seen = []
    real = train.build_reward

    def counting(*args, **kwargs):
        inner = real(*args, **kwargs)
        return lambda images, conds: (seen.append(len(images)), inner(images, conds))[1]
    monkeypatch.setattr(train, 'build_reward', counting)
    run_train(tmp_path, '--images_per_step', '16', '--group_size', '8', '--max_steps', '1')
    assert seen == [16]  # one rank samples the whole global batch: 2 groups of 8
    monkeypatch.setenv('WORLD_SIZE', '3')  # validate() only: nothing is built before it fails
    for args, msg in [(['--images_per_step', '16'], 'of the 3 rank'), (['--images_per_step', '12'], 'multiple of'),
                      (['--images_per_step', '-8'], '--images_per_step must be >= 0'),
                      (['--judge_url', 'localhost:8000/v1'], 'is not an http'), (['--judge', ''], 'is empty')]:
        with pytest.raises(UserError, match=msg):
            run_train(tmp_path / 'x', *args)
    monkeypatch.delenv('WORLD_SIZE')
    # the command line, for an unreachable judge: exit 2, no traceback, the last line one sentence
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        closed = f'http://127.0.0.1:{s.getsockname()[1]}/v1'
    p = subprocess.run([sys.executable, 'train.py', '--preset', 'demo_color', '--image_size', '8', '--rewards', 'realism=1',
                        '--judge_url', closed, '--max_steps', '1', '--out_dir', str(tmp_path / 'cli')],
                       cwd=HERE, capture_output=True, text=True)
    last = p.stderr.strip().splitlines()[-1]  # tqdm's bar comes before it
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-500:]
    assert last.startswith('error: could not reach the judge server at ' + closed) and last.endswith('.')


def test_judge_offline_is_fast_and_one_sentence(monkeypatch, tmp_path):
    offline_hf_home(monkeypatch, tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as err:
        rewards.load_judge('Qwen/Qwen2.5-VL-3B-Instruct', 'cpu')
    msg = str(err.value)
    assert time.perf_counter() - t0 < 3.0 and 'Qwen/Qwen2.5-VL-3B-Instruct' in msg and 'HF_HOME' in msg
    assert '\n' not in msg and msg.endswith('.') and not re.search(r'[.!?]\s+[A-Z]', msg)

# ----------------------------------------------------------------------------- evalx (issue 11)
# Evaluation at the paper's scale: sharded FID sampling (sample.py --per_class), the metric math and plumbing
# (metrics.py, against numpy written here and toy sets with known answers), the paired reward benchmark
# (train.py --eval --eval_ckpt), and sample.py's bad-input battery (issue 13, sample.py part).

import metrics


def _fid_args(ckpts, npz, *more):
    """FID sampling of the tiny fixtures: 4 classes x 2 images, 8x8 px, batch 3 -> shards of 3, 3, 2."""
    return ['--ckpt', ckpts['c2i'], '--vq_ckpt', ckpts['vq'], '--device', 'cpu', '--class', '0', '1', '2', '3',
            '--per_class', '2', '--batch', '3', '--eval_size', '0', '--npz', str(npz), *more]


@pytest.fixture(scope='module')
def fid_single(ckpts, tmp_path_factory):
    """The reference: one process, images and labels of the merged npz."""
    npz = tmp_path_factory.mktemp('fid') / 'single.npz'
    sample.main(_fid_args(ckpts, npz))
    z = np.load(npz)
    return z['arr_0'], z['arr_1']


def test_evalx_sample_logits_uniform_is_the_filtered_distribution():
    # stratified uniforms u = (m + 0.5) / M hit every token about M * p times: within one of it
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 2
    M = 2000
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (1.0, 12, 0.9)]:
        x = logits.numpy() / temperature
        for row in range(3):
            ref = np.exp(x[row] - x[row].max())
            ref[np.argsort(-x[row])[top_k:] if top_k else []] = 0  # top-k, then the nucleus of what is left
            ref /= ref.sum()
            order = np.argsort(-ref)
            keep = np.cumsum(ref[order]) - ref[order] <= top_p  # kept if the mass before it is <= top_p
            ref[order[~keep]] = 0
            ref /= ref.sum()
            u = (torch.arange(M, dtype=torch.float64) + 0.5) / M
            tok, logp = model.sample_logits(logits[row].expand(M, -1), temperature, top_k, top_p, uniform=u)
            counts = np.bincount(tok.numpy(), minlength=40)
            assert np.abs(counts - M * ref).max() <= 1 + 1e-9, (temperature, top_k, top_p)
            np.testing.assert_allclose(logp.exp().numpy(), ref[tok.numpy()], rtol=1e-5)


def test_evalx_fid_sharding_every_pair_once_for_1_2_3_ranks(ckpts, fid_single, tmp_path, monkeypatch):
    single, labels = fid_single
    assert single.shape == (8, 8, 8, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    written = []
    real_write = sample.write_shard
    monkeypatch.setattr(sample, 'write_shard', lambda p, im, lab, idx: (written.append(idx.tolist()),
                                                                         real_write(p, im, lab, idx)))
    for world in (1, 2, 3):  # every rank's share in turn, in this process, then rank 0's merge
        npz = tmp_path / f'w{world}.npz'
        cfg = parse_config(sample.SampleConfig, _fid_args(ckpts, npz))
        ids = cfg.validate()
        gpt, vq = sample.load_models(cfg, ids, 'cpu')
        sample.prepare_shards(cfg, ids)
        per_rank = []
        for rank in range(world):
            written.clear()
            sample.sample_shards(cfg, gpt, vq, np.repeat(ids, 2), rank, world, 'cpu')
            per_rank.append(sorted(i for idx in written for i in idx))
        assert sorted(i for r in per_rank for i in r) == list(range(8))  # each (class, index) exactly once
        assert all(per_rank)  # 3 shards: every rank had work
        sample.merge_shards(cfg, np.repeat(ids, 2))
        z = np.load(npz)
        assert np.array_equal(z['arr_0'], single) and np.array_equal(z['arr_1'], labels)
        assert not os.path.exists(str(npz) + '.shards')  # merged, then removed
        # read back the way the ADM evaluator streams it (npy header in the zip, then raw batches)
        assert np.array_equal(np.concatenate(list(metrics.image_batches(str(npz), 5))), single)


def test_evalx_batch_size_does_not_change_the_images(ckpts, fid_single, tmp_path):
    single, _ = fid_single
    for batch in ('1', '8'):
        npz = tmp_path / f'b{batch}.npz'
        sample.main(_fid_args(ckpts, npz, '--batch', batch))
        assert np.array_equal(np.load(npz)['arr_0'], single)
    # resized for FID as LlamaGen: bicubic to eval_size, then rounded
    sample.main(_fid_args(ckpts, tmp_path / 'r.npz', '--eval_size', '12', '--class', '0', '--per_class', '1'))
    assert np.load(tmp_path / 'r.npz')['arr_0'].shape == (1, 12, 12, 3)


def test_evalx_killed_run_resumes_without_duplicates_or_gaps(ckpts, fid_single, tmp_path, monkeypatch):
    single, _ = fid_single
    npz = tmp_path / 'k.npz'
    calls = []
    real_write = sample.write_shard

    def killed_after_two(path, *a):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run dies after 2 of its 3 shards
        calls.append(path)
        real_write(path, *a)
    monkeypatch.setattr(sample, 'write_shard', killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        sample.main(_fid_args(ckpts, npz))
    assert not npz.exists() and len(os.listdir(str(npz) + '.shards')) == 3  # 2 shards + settings.json
    # another seed with the shards still there: refused before anything loads
    with pytest.raises(UserError, match='other settings'):
        sample.main(_fid_args(ckpts, npz, '--seed', '1'))
    monkeypatch.setattr(sample, 'write_shard', lambda path, *a: (calls.append(path), real_write(path, *a)))
    sample.main(_fid_args(ckpts, npz))  # continues: only the missing shard is sampled
    assert len(calls) == 3 and len(set(calls)) == 3
    z = np.load(npz)
    assert np.array_equal(z['arr_0'], single)


def test_evalx_torchrun_two_ranks_match_one_process(ckpts, fid_single, tmp_path):
    single, labels = fid_single
    npz = tmp_path / 't.npz'
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                        'sample.py', *_fid_args(ckpts, npz)], cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    z = np.load(npz)
    assert np.array_equal(z['arr_0'], single) and np.array_equal(z['arr_1'], labels)

# ---------------------------------------------------------------------------- metric math


def _np_sqrtm_psd(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_evalx_frechet_distance_matches_numpy():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(300, 20)), g.normal(0.2, 1.3, size=(300, 20)) @ g.normal(size=(20, 20)) * 0.3
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    for m, s in ((mu1, s1), (mu2, s2)):
        got_m, got_s = metrics.mean_cov(a if m is mu1 else b)
        np.testing.assert_allclose(got_m, m, rtol=1e-12)
        np.testing.assert_allclose(got_s, s, rtol=1e-10, atol=1e-12)
    r1 = _np_sqrtm_psd(s1)  # tr sqrt(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2), a symmetric PSD matrix
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_np_sqrtm_psd(r1 @ s2 @ r1))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_evalx_inception_score_matches_numpy():
    g = np.random.default_rng(1)
    logits = g.normal(size=(120, 7)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in (p[:50], p[50:100], p[100:]):  # split_size 50: 50, 50, 20
        py = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * np.log(q / py)) for q in part])))
    assert metrics.inception_score(logits, split_size=50) == pytest.approx(np.mean(scores), rel=1e-10)
    assert metrics.inception_score(np.repeat(np.eye(5) * 60, 4, 0)) == pytest.approx(5, rel=1e-6)  # 5 sure classes


def test_evalx_precision_recall_toy_set():
    # 1-D, k = 3. Reference points 0..9: the k-th neighbour (self = 0th) is 2 away inside, 3 at the ends.
    # Samples: five near the reference at 0.1 .. 4.1 and five far away at 100 .. 104.
    ref = np.arange(10.0)[:, None]
    samples = np.concatenate([np.arange(5) + 0.1, np.arange(5) + 100.0])[:, None]
    precision, recall = metrics.precision_recall(ref, samples)
    assert precision == 0.5  # exactly the five near samples lie in some reference ball
    # the sample at 4.1 has radius 3 (to 1.1), reaching 7.1: references 0..7 are covered, 8 and 9 are not
    assert recall == 0.8
    assert metrics.precision_recall(ref, ref) == (1.0, 1.0)


class _TinyExtractor(torch.nn.Module):
    """A random-weight stand-in for TFInception: the same input (uint8) and output keys, no download."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        h = self.conv((x.float() - 128) / 128).relu()  # (B, 6, h, w)
        pool = h.mean((2, 3))
        return dict(pool=pool, logits=self.fc(pool), spatial=h[:, :2, :3, :3].flatten(1))


def test_evalx_metrics_end_to_end_tiny_extractor(tmp_path):
    g = np.random.default_rng(0)
    fake = g.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    real = np.clip(g.normal(128, 40, size=(30, 16, 16, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / 'fake.npz', arr_0=fake)
    np.savez(tmp_path / 'real_images.npz', arr_0=real)
    (tmp_path / 'real').mkdir()
    for i, im in enumerate(real):
        Image.fromarray(im).save(tmp_path / 'real' / f'{i:03d}.png')
    ex = _TinyExtractor().eval()
    f = metrics.extract(ex, [fake[:25], fake[25:]])
    r = metrics.extract(ex, [real])
    mu_s, sig_s = metrics.mean_cov(r['spatial'])
    np.savez(tmp_path / 'adm_ref.npz', arr_0=real, mu=r['pool'].mean(0), sigma=np.cov(r['pool'], rowvar=False),
             mu_s=mu_s, sigma_s=sig_s)  # an ADM-style reference batch: statistics plus images
    expect = dict(fid=metrics.frechet_distance(*metrics.mean_cov(f['pool']), *metrics.mean_cov(r['pool'])),
                  sfid=metrics.frechet_distance(*metrics.mean_cov(f['spatial']), mu_s, sig_s),
                  inception_score=metrics.inception_score(f['logits']),
                  precision=metrics.precision_recall(r['pool'], f['pool'])[0])
    for ref in ('real_images.npz', 'real', 'adm_ref.npz'):  # images in an npz, a folder, precomputed statistics
        got = metrics.compute_metrics(str(tmp_path / 'fake.npz'), str(tmp_path / ref), ex, batch=7)
        assert got['n_samples'] == 40 and got['n_reference'] == 30
        for k, v in expect.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (ref, k)
    same = metrics.compute_metrics(str(tmp_path / 'fake.npz'), str(tmp_path / 'fake.npz'), ex)
    assert abs(same['fid']) < 1e-6 and same['precision'] == same['recall'] == 1.0


def test_evalx_tf_inception_adapter_shapes(monkeypatch):
    # torch-fidelity's network with random weights (the real ones cannot be downloaded here): the adapter's
    # three outputs have the ADM evaluator's sizes, 2048 / 1008 / 17 * 17 * 7 = 2023
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    monkeypatch.setattr(tfi, 'load_state_dict_from_url', lambda *a, **k: {})
    monkeypatch.setattr(tfi.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, sd: None)
    net = metrics.TFInception(None).eval()
    out = net(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8))
    assert {k: tuple(v.shape) for k, v in out.items()} == dict(pool=(2, 2048), logits=(2, 1008), spatial=(2, 2023))
    assert (out['spatial'] >= 0).all() and out['spatial'].dtype == torch.float32  # a ReLU output


def test_evalx_inception_offline_and_cli_errors(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'th'))

    def offline(*a, **k):
        raise OSError('no network')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(metrics.WeightsMissing) as e:
        metrics.load_inception()
    assert '\n' not in str(e.value) and '--inception' in str(e.value) and 'weights-inception' in str(e.value)
    np.savez(tmp_path / 's.npz', arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / 'junk.npz').write_bytes(b'not a zip')
    (tmp_path / 'empty').mkdir()
    np.savez(tmp_path / 'other.npz', x=np.zeros(3))
    for argv, msg in [([str(tmp_path / 's.npz'), str(tmp_path / 'nope.npz')], 'does not exist'),
                      ([str(tmp_path / 'junk.npz'), str(tmp_path / 's.npz')], 'is not an .npz with images'),
                      ([str(tmp_path / 's.npz'), str(tmp_path / 'other.npz')], 'or ADM statistics'),
                      ([str(tmp_path / 's.npz'), str(tmp_path / 'empty')], 'holds no .png'),
                      ([str(tmp_path / 'empty'), str(tmp_path / 's.npz')], 'is a folder'),
                      ([str(tmp_path / 's.npz'), str(tmp_path / 's.npz'), '--batch', '0'], '--batch'),
                      ([str(tmp_path / 's.npz'), str(tmp_path / 's.npz'), '--inception', 'x.pth'], '--inception')]:
        with pytest.raises((UserError, metrics.WeightsMissing), match=msg):
            metrics.main(argv)

# ---------------------------------------------------------------------------- reward benchmark


def test_evalx_paired_eval_of_a_checkpoint_against_itself_is_zero(tmp_path):
    run_train(tmp_path / 'run', '--max_steps', '1', '--beta', '0')  # a checkpoint to compare
    ck = str(tmp_path / 'run' / 'latest' / 'model.safetensors')
    common = ['--eval', '--eval_conds', '3', '--eval_images', '2', '--beta', '0']
    s = run_train(tmp_path / 'self', '--ckpt', ck, '--eval_ckpt', ck, *common)
    for r, p in s['paired'].items():
        assert p == dict(diff=0.0, se=0.0, win_rate=0.5), r
        assert s['base'][r] == s['tuned'][r]
    grid = np.asarray(Image.open(tmp_path / 'self' / 'eval_side_by_side.png'))
    half = (grid.shape[1] - 8) // 2
    assert np.array_equal(grid[:, :half], grid[:, -half:])  # same seeds: the two sides are the same images
    assert json.load(open(tmp_path / 'self' / 'eval.json'))['paired']['reward']['win_rate'] == 0.5
    # random init against the trained step: the base side equals a single-model evaluation on the same seeds
    both = run_train(tmp_path / 'both', '--eval_ckpt', ck, *common)
    alone = run_train(tmp_path / 'alone', *common)
    assert both['base'] == alone['base'] and 'paired' not in alone
    for r, p in both['paired'].items():
        assert p['diff'] == pytest.approx(both['tuned'][r]['mean'] - both['base'][r]['mean'], abs=1e-12)


def test_evalx_reward_eval_shards_are_the_whole(tmp_path):
    # conditions i = rank, rank + world, ...: two ranks' shares together are the one-rank result, exactly
    cfg = parse_config(train.TrainConfig, ['--preset', 'demo_color', '--image_size', '8', '--eval', '--eval_images', '2'],
                       presets=train.TRAIN_PRESETS)
    policy, _, vq = train.build_models(cfg, torch.device('cpu'))
    reward_fn = build_reward(cfg.rewards)
    models, conds = {'base': policy}, list(range(5))
    run = lambda rank, world: metrics.score_conditions(cfg, models, vq, reward_fn, conds, None, torch.device('cpu'),
                                                       rank, world)
    one, two = run(0, 1), sorted(run(0, 2) + run(1, 2), key=lambda r: r[0])
    assert [r[0] for r in one] == [r[0] for r in two] == conds
    for (_, s1, p1), (_, s2, p2) in zip(one, two):
        assert all(np.array_equal(s1['base'][k], s2['base'][k]) for k in s1['base'])
        assert np.array_equal(p1['base'], p2['base'])


def test_evalx_mean_se_and_paired_by_hand():
    x = np.array([[1.0, 3.0], [2.0, 2.0], [6.0, 4.0]])  # condition means 2, 2, 5
    m, se = metrics.mean_se(x)
    assert m == pytest.approx(3.0) and se == pytest.approx(np.std([2, 2, 5], ddof=1) / np.sqrt(3))
    p = metrics.paired(x, x + np.array([[1.0, -1.0], [0.0, 2.0], [0.5, 0.5]]))
    assert p['win_rate'] == pytest.approx((1 + 0 + 0.5 + 1 + 1 + 1) / 6)
    assert p['diff'] == pytest.approx(np.mean([0, 1, 0.5]))

# ---------------------------------------------------------------------------- sample.py bad inputs (issue 13)


def _bad_rows(ckpts, tmp):
    """(argv, phrase of the one-sentence message). Every row must fail before any sample is drawn."""
    a_file = tmp / 'a_file'
    a_file.write_text('x')
    (tmp / 'dir.npz').mkdir(exist_ok=True)
    stale = tmp / 'stale.npz.shards'
    stale.mkdir(exist_ok=True)
    (stale / 'settings.json').write_text(json.dumps({'seed': 99}))
    rows = [(['--temperature', '-1'], '--temperature must be'), (['--temperature', 'nan'], '--temperature must be'),
            (['--top_p', '0'], '--top_p must be'), (['--top_p', '2'], '--top_p must be'),
            (['--top_k', '-1'], '--top_k must be'), (['--n', '0'], '--n must be'),
            (['--cfg', 'inf'], '--cfg must be'), (['--cfg_interval', '-2'], '--cfg_interval must be'),
            (['--seed', '-1'], '--seed must be'), (['--image_size', '0'], '--image_size must be'),
            (['--per_class', '0'], '--per_class must be'), (['--per_class', '1', '--batch', '0'], '--batch must be'),
            (['--per_class', '1', '--eval_size', '-1'], '--eval_size must be'),
            (['--per_class', '1', '--prompt', 'a cat', '--class'], '--per_class samples every class'),
            (['--per_class', '1', '--out', str(tmp / 'g.png')], '--out writes a grid'),
            (['--per_class', '1', '--npz', ''], 'needs an --npz'), (['--per_class', '1', '--n', '2'], '--n is the grid'),
            (['--batch', '4'], '--batch applies to --per_class'), (['--no-resume'], '--resume applies to --per_class'),
            (['--prompt', 'a cat', '--class'], 'is a c2i model'),  # a self-describing c2i file given a prompt
            (['--image_size', '64'], 'contradicts'),  # the file holds an 8-px model
            (['--class', '10'], '0..9'),  # read from the file's header, before loading
            (['--class', '1000', '--ckpt', 'c2i_B_256'], '0..999'),  # before the release is fetched
            (['--preset', 'fast'], 'invalid choice'),
            (['--out', str(a_file / 'g.png')], '--out ' + str(a_file / 'g.png') + ' cannot be written'),  # a folder that is a file
            (['--npz', str(tmp / 'dir.npz')], 'is a directory'),  # a directory
            (['--per_class', '1', '--npz', str(tmp / 'stale.npz')], 'other settings')]
    if not torch.cuda.is_available():
        rows.append((['--device', 'cuda'], 'no GPU'))
    return rows


def test_evalx_sample_bad_inputs_in_process(ckpts, tmp_path, monkeypatch):
    from model import CheckpointError
    calls = []
    monkeypatch.setattr(sample, 'load_models', lambda *a: calls.append(a))  # nothing may get that far
    out, npz = tmp_path / 'o.png', tmp_path / 'o.npz'
    for argv, phrase in _bad_rows(ckpts, tmp_path):
        args = ['--ckpt', ckpts['c2i'], '--vq_ckpt', ckpts['vq'], '--device', 'cpu', '--npz', str(npz)]
        args += [] if '--per_class' in argv else ['--out', str(out)]  # --per_class writes the npz only
        args += argv[:-1] if argv[-1] == '--class' else ['--class', '3', *argv]  # '--class' last: no class
        with pytest.raises((ValueError, CheckpointError)) as e:  # the CLI's exit-2 errors
            sample.main(args)
        msg = str(e.value)
        assert phrase in msg and '\n' not in msg, (argv, msg)
        assert not out.exists() and not npz.exists() and not os.path.exists(str(npz) + '.shards'), argv
    assert not calls
    monkeypatch.setenv('WORLD_SIZE', '2')  # a grid under torchrun
    with pytest.raises(UserError, match='only --per_class'):
        sample.main(['--ckpt', ckpts['c2i'], '--vq_ckpt', ckpts['vq'], '--device', 'cpu', '--class', '3'])


def test_evalx_sample_bad_input_cli_and_torchrun(ckpts, tmp_path):
    args = ['--ckpt', ckpts['c2i'], '--vq_ckpt', ckpts['vq'], '--device', 'cpu', '--per_class', '1',
            '--top_p', '2', '--npz', str(tmp_path / 'x.npz')]
    r = _cli(args, tmp_path)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr and '--top_p' in r.stderr
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                        os.path.join(HERE, 'sample.py'), *args], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    both = p.stdout + p.stderr
    # the sentence once (rank 0), the rank's exit code 2 in torchrun's own report (which torchrun prints)
    assert p.returncode != 0 and both.count('error: --top_p must be') == 1, both[-3000:]
    assert re.search(r'exitcode\s*:\s*2', both)
    assert not any(line.startswith('  File "' + HERE) for line in both.splitlines())  # no traceback of ours
    assert os.listdir(tmp_path) == []

# ----------------------------------------------------------------------------- scale (issue 12)
# Memory options (scale.py; train.py --grad_ckpt / --fsdp / --lora_rank) and step-directory checkpoints.
# Multi-rank runs fork this process with torchrun's environment (gloo on CPU): no interpreter start-up and no
# re-import per rank, which keeps these tests to seconds.
import shutil
import signal
import socket
import traceback
from scale import LoRALinear, add_lora, adapters_off, merge_lora

SCALE_ARGS = ['--preset', 'demo_color', '--image_size', '8', '--grid_every', '0', '--device', 'cpu', '--conds_per_rank', '2',
              '--group_size', '4', '--beta', '0.1', '--cfg_scale', '2.0', '--logprob_mode', 'guided']


def on_ranks(world, fn, distributed=None, timeout=120):
    """fn() on `world` forked copies of this process, each with RANK/WORLD_SIZE/... set as torchrun would
    (distributed=False: a plain single process). True if every rank exits 0."""
    distributed = world > 1 if distributed is None else distributed
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    pids = []
    for r in range(world):
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            code = 1
            try:
                signal.alarm(timeout)  # a hung rank dies instead of hanging the suite
                if distributed:
                    os.environ.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
                torch.set_num_threads(1)
                fn()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return all(os.waitpid(p, 0)[1] == 0 for p in pids)


def train_on(world, out_dir, *args):
    argv = [*SCALE_ARGS, '--out_dir', str(out_dir), *args]
    assert on_ranks(world, lambda: train.main(argv), distributed=world > 1 or '--fsdp' in args), out_dir


def latest_weights(out_dir):
    return load_file(os.path.join(str(out_dir), 'latest', 'model.safetensors'))


def assert_same_weights(a, b, atol):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def test_scale_grad_ckpt_equals_plain():
    torch.manual_seed(0)
    m = GPT(config_for('GPT-tiny', 32, 4, vocab_size=64)).eval()
    torch.nn.init.normal_(m.output.weight, std=0.02)
    tc = train.TrainConfig(cfg_scale=2.0, logprob_mode='guided')
    x, y, w = torch.randint(64, (3, 64)), torch.tensor([1, 2, 3]), torch.randn(3, 64)
    calls = []
    m.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    out = {}
    for ckpt in (False, True):
        m.grad_ckpt = ckpt
        m.zero_grad(set_to_none=True)
        calls.clear()
        loss = (train.sequence_logprobs(tc, m, x, y, None)[0] * w).sum()
        loss.backward()
        out[ckpt] = loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}, len(calls)
    assert out[False][2] == 1 and out[True][2] == 2  # the block really ran again in backward
    assert torch.allclose(out[False][0], out[True][0], atol=1e-6, rtol=0)
    for k, g in out[False][1].items():
        assert torch.allclose(g, out[True][1][k], atol=1e-6, rtol=0), k
    with torch.no_grad():  # the cached decode never checkpoints and samples the same tokens
        a = generate(m, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))[0]
        m.grad_ckpt = False
        assert torch.equal(a, generate(m, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))[0])


def test_scale_lora_zero_kl_and_merged_checkpoint(tmp_path):
    torch.manual_seed(0)
    base = GPT(config_for('GPT-tiny', 32, 4, vocab_size=64)).eval()
    torch.nn.init.normal_(base.output.weight, std=0.02)
    adapted = GPT(base.config).eval()
    adapted.load_state_dict(base.state_dict())
    n = add_lora(adapted, 4, 8)
    x, y = torch.randint(64, (2, 63)), torch.tensor([1, 2])
    assert torch.equal(adapted(x, y), base(x, y))  # B = 0: the policy is the base, bitwise
    assert n == sum(p.numel() for p in adapted.parameters() if p.requires_grad) == 2 * 4 * sum(
        m.weight.shape[0] + m.weight.shape[1] for m in adapted.modules() if isinstance(m, LoRALinear)) // 2
    # training from a base with a non-zero output head (LlamaGen zero-inits it, and then no gradient reaches
    # the blocks): the KL to the base (adapters off) is exactly 0 at the first step, then moves
    torch.manual_seed(1)
    start = GPT(config_for('GPT-tiny', 8, 2, vocab_size=64))
    torch.nn.init.normal_(start.output.weight, std=0.02)
    save_gpt(start, str(tmp_path / 'base.safetensors'))
    lora = ['--ckpt', str(tmp_path / 'base.safetensors'), '--lora_rank', '4', '--lora_alpha', '8']
    rows = run_train(tmp_path, '--max_steps', '3', '--save_every', '3', '--beta', '0.1', '--lr', '3e-2', *lora)
    assert rows[0]['kl'] == 0.0 and rows[-1]['kl'] > 0
    # the adapted model, rebuilt from the base and the PEFT-format adapter file...
    cfg = parse_config(train.TrainConfig, ['--preset', 'demo_color', '--image_size', '8', *lora], presets=train.TRAIN_PRESETS)
    policy, ref, _ = train.build_models(cfg, torch.device('cpu'))
    peft = load_file(str(tmp_path / 'latest' / 'adapter_model.safetensors'))
    assert all(k.startswith('base_model.model.layers.') and '.lora_' in k for k in peft)
    missing, unexpected = policy.load_state_dict({k[len('base_model.model.'):]: v for k, v in peft.items()}, strict=False)
    assert not unexpected and not any('lora' in k for k in missing)
    conf = json.load(open(tmp_path / 'latest' / 'adapter_config.json'))
    assert conf['peft_type'] == 'LORA' and conf['r'] == 4 and conf['lora_alpha'] == 8
    # ... equals the merged checkpoint as sample.py --ckpt loads it
    merged = load_gpt(str(tmp_path / 'latest' / 'model.safetensors'))
    x, y = torch.randint(64, (2, 16)), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.allclose(merged(x, y), policy(x, y), atol=1e-5, rtol=0)
        assert not torch.allclose(ref(x, y), policy(x, y), atol=1e-5)  # the reference is the base
    # resume restores the adapters and their AdamW state exactly (the frozen base comes from --ckpt again)
    run_train(tmp_path / 'half', '--max_steps', '2', '--save_every', '1', '--beta', '0.1', '--lr', '3e-2', *lora)
    run_train(tmp_path / 'half', '--max_steps', '3', '--save_every', '3', '--beta', '0.1', '--lr', '3e-2', '--resume',
              *lora)
    a, b = latest_weights(tmp_path), latest_weights(tmp_path / 'half')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scale_fsdp_equals_ddp(tmp_path):
    train_on(2, tmp_path / 'ddp', '--max_steps', '3', '--save_every', '3')
    train_on(2, tmp_path / 'fsdp', '--max_steps', '3', '--save_every', '3', '--fsdp')
    rows = [[json.loads(x) for x in open(tmp_path / d / 'metrics.jsonl')] for d in ('ddp', 'fsdp')]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows):
        for k in ('loss', 'kl', 'reward', 'grad_norm'):
            assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])
    assert_same_weights(latest_weights(tmp_path / 'ddp'), latest_weights(tmp_path / 'fsdp'), atol=1e-5)
    assert len(os.listdir(tmp_path / 'fsdp' / 'latest' / 'dcp')) == 3  # .metadata + one shard per rank


def resave(src, dst, world, *args):
    """Load the newest save of src on `world` ranks and write it again, unchanged, as a save of dst."""
    def fn():
        cfg = parse_config(train.TrainConfig, [*SCALE_ARGS, '--out_dir', str(src), '--resume', *args],
                           presets=train.TRAIN_PRESETS)
        rank, w, device = train.setup_distributed(cfg)
        policy, _, _ = train.build_models(cfg, device)
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad])
        step, bad = train.load_checkpoint(cfg, policy, opt)
        cfg.out_dir = str(dst)
        os.makedirs(dst, exist_ok=True)
        train.save_checkpoint(cfg, policy, opt, step, bad, rank, w)
    assert on_ranks(world, fn, distributed=world > 1 or '--fsdp' in args)


def test_scale_resume_across_world_sizes(tmp_path):
    """A save made by 2 FSDP ranks is loaded by 1 rank and written again; 2 ranks resume from that and end
    where an uninterrupted 2-rank run ends. And the other way: 1 rank -> 2 FSDP ranks -> 1 rank."""
    for world, other, flags in ((2, 1, ['--fsdp']), (1, 2, [])):
        d = tmp_path / f'w{world}'
        train_on(world, d / 'full', '--max_steps', '4', '--save_every', '2', *flags)
        train_on(world, d / 'half', '--max_steps', '2', '--save_every', '2', *flags)
        resave(d / 'half', d / 'moved', other, '--fsdp' if other > 1 else '--no-fsdp')
        assert os.readlink(d / 'moved' / 'latest') == 'step_000002'
        moved = os.path.relpath(d / 'moved')  # and re-spelt relative: not a config change
        train_on(world, moved, '--max_steps', '4', '--save_every', '2', '--resume', *flags)
        assert_same_weights(latest_weights(d / 'full'), latest_weights(d / 'moved'), atol=1e-6)


def test_scale_kill_9_then_resume_is_bitwise(tmp_path):
    """kill -9 at 10 moments of a run that saves every step: 5 at random times, 5 from inside a save (the
    process kills itself just before its n-th os.replace, i.e. between the files, the directory rename and
    the `latest` switch). After each, --resume continues from the newest whole save; the end is bitwise the
    uninterrupted run."""
    args = ['--max_steps', '12', '--save_every', '1']
    train_on(1, tmp_path / 'ref', *args)
    rng, run, in_save, resumed = np.random.default_rng(0), tmp_path / 'run', 0, 0

    def segment(kill_at_replace):
        has_save = os.path.isdir(run) and any(d.startswith('step_') for d in os.listdir(run))
        argv = [*SCALE_ARGS, '--out_dir', str(run), *args] + (['--resume'] if has_save else [])
        if kill_at_replace:
            real, calls = os.replace, [0]

            def replace(a, b):
                calls[0] += 1
                if calls[0] == kill_at_replace:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(a, b)
            os.replace = replace  # in the forked child only
        train.main(argv)
        return has_save

    for i in range(10):
        if i % 2 == 0:  # from inside a save
            on_ranks(1, lambda: segment(int(rng.integers(4, 12))), distributed=False)
            in_save += 1
            continue
        pid = os.fork()  # at a random time
        if pid == 0:
            torch.set_num_threads(1)
            try:
                segment(0)
            finally:
                os._exit(0)
        time.sleep(float(rng.uniform(0.05, 0.6)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    steps = [d for d in os.listdir(run) if d.startswith('step_')]
    assert steps  # a whole save exists after every kill (the first one waits for 4 os.replace calls)
    train_on(1, run, *args, '--resume')
    a, b = latest_weights(tmp_path / 'ref'), latest_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda d: [{k: v for k, v in json.loads(x).items() if 'time' not in k and 'per_s' not in k}
                       for x in open(d / 'metrics.jsonl')]
    assert strip(tmp_path / 'ref') == strip(run)
    assert not [d for d in os.listdir(run) if d.startswith('.tmp_')]


def test_scale_bad_inputs(tmp_path, monkeypatch):
    with monkeypatch.context() as m:  # as under torchrun: then --compile is the complaint
        m.setenv('RANK', '0')
        with pytest.raises(UserError, match='--fsdp does not support --compile'):
            run_train(tmp_path / 'x', '--fsdp', '--compile')
    (tmp_path / 'file').write_text('x')
    rows = [(['--lora_rank', '-1'], '--lora_rank must be'), (['--lora_rank', '4', '--lora_alpha', '0'], '--lora_alpha'),
            (['--lora_targets', 'wq'], '--lora_targets must name'), (['--fsdp'], 'launch with torchrun'),
            (['--out_dir', str(tmp_path / 'file')], 'is a file'),
            (['--out_dir', str(tmp_path / 'file' / 'sub')], 'is not a writable directory')]
    for args, msg in rows:
        with pytest.raises(UserError, match=msg):
            run_train(tmp_path / 'x', '--max_steps', '1', *args)
    run_train(tmp_path / 'r', '--max_steps', '1', '--save_every', '1')
    last = tmp_path / 'r' / 'step_000001'
    damaged = [('model.safetensors', None, 'model.safetensors is missing'),
               ('state.pt', b'PK\x03\x04 truncated', 'state.pt is truncated or corrupt'),
               ('dcp/__0_0.distcp', b'x', 'sharded state .* is truncated, corrupt')]
    for name, content, msg in damaged:
        shutil.copytree(last, tmp_path / 'keep')
        if content is None:
            os.remove(last / name)
        else:
            (last / name).write_bytes(content)
        with pytest.raises(UserError, match=msg):
            run_train(tmp_path / 'r', '--max_steps', '2', '--resume')
        shutil.rmtree(last)
        shutil.move(tmp_path / 'keep', last)
    # through the command line: one sentence on stderr, exit code 2, no traceback, before any model loads
    (last / 'state.pt').write_bytes(b'PK\x03\x04 truncated')
    p = subprocess.run([sys.executable, 'train.py', '--preset', 'demo_color', '--image_size', '8', '--resume', '--out_dir',
                        str(tmp_path / 'r')], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 2 and 'Traceback' not in p.stderr and 'truncated or corrupt' in p.stderr


def test_scale_memory_plan():
    from scale import count_params, memory_plan
    xl = config_for('GPT-XL', 384)
    P, _ = count_params(xl)
    assert abs(P - 775e6) / 775e6 < 0.01  # LlamaGen's figure for GPT-XL (c2i, vocab 16384)
    _, L = count_params(xl, lora_rank=16)  # r * (in + out) per adapted linear layer
    h = model.find_multiple(int(2 * 4 * 1280 / 3), 256)
    assert L == 36 * 16 * ((1280 + 3 * 1280) + (1280 + 1280) + 2 * (1280 + h) + (h + 1280))
    ddp = memory_plan(xl, beta=0.1)
    assert (ddp['weights'], ddp['grads'], ddp['optimizer'], ddp['reference']) == (4 * P, 4 * P, 8 * P, 4 * P)
    fsdp = memory_plan(xl, world=4, fsdp=True)
    assert fsdp['optimizer'] == 8 * P / 4 and fsdp['gathered'] == 2 * P
    lora = memory_plan(xl, lora_rank=16)
    assert lora['reference'] == 0 and lora['optimizer'] == 8 * L
    assert memory_plan(xl, grad_ckpt=True)['activations'] < ddp['activations'] / 4


def test_groups_spanning_ranks_get_whole_group_advantages(tmp_path):
    """The paper's 32 images on 8 GPUs has half a group per rank: here 8 images in one group of 8 on 2 ranks.
    Each rank's advantages must be its slice of the advantages of the gathered group, in rank order."""
    def run(rank_dir):
        real_reward, real_loss = train.build_reward, grpo.grpo_loss
        log = {'rewards': [], 'adv': []}

        def reward(*args, **kwargs):
            inner = real_reward(*args, **kwargs)

            def fn(images, conds):
                total, raw = inner(images, conds)
                log['rewards'].append(total.clone())
                return total, raw
            return fn

        def loss(logp, old, adv, *args, **kwargs):
            log['adv'].append(adv.clone())
            return real_loss(logp, old, adv, *args, **kwargs)
        train.build_reward, grpo.grpo_loss = reward, loss
        train.main(['--preset', 'demo_color', '--image_size', '8', '--grid_every', '0', '--device', 'cpu',
                    '--group_size', '8', '--images_per_step', '8', '--max_steps', '2', '--out_dir', str(tmp_path / 'run')])
        torch.save(log, tmp_path / f"rank{os.environ['RANK']}.pt")
    assert on_ranks(2, lambda: run(tmp_path))
    logs = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    for step in range(2):
        rewards = torch.cat([log['rewards'][step] for log in logs])  # (8,) rank 0's 4 images, then rank 1's
        assert all(len(log['rewards'][step]) == 4 for log in logs)
        expected = group_advantages(rewards, 8)
        torch.testing.assert_close(torch.cat([log['adv'][step] for log in logs]), expected, rtol=0, atol=0)

# ----------------------------------------------------------------------------- world (issue 10)
# world.py's miniature on the 'tiny' preset (a few hundred images, seconds): every part is trained, the
# GRPO gain is measured by the held-out judge that no reward uses.
import world


@pytest.fixture(scope='module')
def tiny_world(tmp_path_factory):
    wc = world.WorldConfig(**world.WORLD_PRESETS['tiny'], root=str(tmp_path_factory.mktemp('world')))
    return world.load_or_build(wc, log=lambda *a: None)


def test_world_vq_reconstructs_better_than_the_mean_image(tiny_world):
    w = tiny_world
    x = w.heldout_x
    rec = world.decode_all(w.vq, world.encode_all(w.vq, x))
    mean_image = x.mean(0, keepdim=True)  # the best constant prediction of held-out images
    assert ((rec - x) ** 2).mean() < 0.8 * ((mean_image - x) ** 2).mean()
    assert w.summary['codebook_used'] > 1


def test_world_base_samples_are_recognisable(tiny_world):
    res, images = world.measure(tiny_world, tiny_world.gpt, 1.5, 20)
    assert images.shape == (200, 3, 16, 16)
    assert res['judge_acc'] > 1 / world.NUM_CLASSES + 4 * res['judge_acc_se'], res
    assert res['kl_to_base'] == pytest.approx(0, abs=1e-6)  # the base against itself


def test_world_grpo_raises_heldout_accuracy(tiny_world, tmp_path):
    """train.py's own loop on the world's rewards; the judge (never a reward) must see the gain."""
    d = tiny_world.dir
    rows = train.train(train.TrainConfig(**{**train.TRAIN_PRESETS['demo'], 'world': d, 'max_steps': 60, 'lr': 5e-4,
                                            'out_dir': str(tmp_path), 'ckpt': os.path.join(d, 'gpt.safetensors'),
                                            'vq_ckpt': os.path.join(d, 'vq.safetensors')}))
    assert all(np.isfinite(r['kl_start']) for r in rows) and rows[-1]['kl_start'] > 0  # logged at beta = 0
    tuned = load_gpt(str(tmp_path / 'latest' / 'model.safetensors'))
    b, _ = world.measure(tiny_world, tiny_world.gpt, 1.5, 40)
    t, _ = world.measure(tiny_world, tuned, 1.5, 40)
    se = math.hypot(b['judge_acc_se'], t['judge_acc_se'])
    assert t['judge_acc'] - b['judge_acc'] > 3 * se, (b, t)
    assert t['kl_to_base'] > 0


def test_world_mini_fid_is_the_frechet_distance():
    """world.frechet_distance against an independent numpy computation: tr sqrt(C1 C2) from the
    eigenvalues of C2^(1/2) C1 C2^(1/2) (the other order), each square root by numpy eigh."""
    g = np.random.default_rng(0)
    a = g.normal(size=(300, 6)) @ g.normal(size=(6, 6))
    b = g.normal(size=(200, 6)) @ g.normal(size=(6, 6)) + 0.5

    def sqrtm_psd(c):
        w, v = np.linalg.eigh(c)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s2 = sqrtm_psd(c2)
    want = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1) + np.trace(c2)
            - 2 * np.trace(sqrtm_psd(s2 @ c1 @ s2)))
    got = world.frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert got == pytest.approx(want, rel=1e-4)
    assert world.frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0, abs=1e-6)


def test_world_token_diagnostics_against_brute_force():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, (12, 7), generator=g)  # 3 groups of 4
    d = train.token_diversity(tokens, torch.arange(12) // 4)
    ham = np.mean([np.mean([(tokens[4 * k + i] != tokens[4 * k + j]).float().mean().item()
                            for i in range(4) for j in range(4) if i != j]) for k in range(3)])
    assert d['hamming'] == pytest.approx(ham, rel=1e-6)
    # a rank may hold part of a group (groups spanning ranks): the mean over all same-group pairs
    group = torch.tensor([0, 0, 0, 1, 1, 2])  # the last image has no partner on this rank
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j and group[i] == group[j]]
    ham = np.mean([(tokens[i] != tokens[j]).float().mean().item() for i, j in pairs])
    assert train.token_diversity(tokens[:6], group)['hamming'] == pytest.approx(ham, rel=1e-6)
    assert d['top_token_share'] == pytest.approx(np.bincount(tokens.flatten().numpy()).max() / tokens.numel())
    r = torch.arange(12.0)
    s = train.shuffle_within_groups(r, 4, seed=1)
    assert all(sorted(s[4 * k:4 * k + 4].tolist()) == r[4 * k:4 * k + 4].tolist() for k in range(3))
    assert not torch.equal(s, r) and torch.equal(s, train.shuffle_within_groups(r, 4, seed=1))
    m = GPT(GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=8, num_classes=3, block_size=4)).eval()
    m2 = GPT(GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=8, num_classes=3, block_size=4)).eval()
    torch.nn.init.normal_(m2.output.weight)
    t, c = torch.randint(8, (2, 4), generator=g), torch.tensor([0, 2])
    assert train.kl_to_start(m, m, t, c) == pytest.approx(0, abs=1e-7)
    p, q = m2(t[:, :-1], c).softmax(-1), m(t[:, :-1], c).softmax(-1)
    assert train.kl_to_start(m2, m, t, c) == pytest.approx((p * (p / q).log()).sum(-1).mean().item(), rel=1e-5)


def test_world_cache_key_follows_the_config():
    a = world.WorldConfig()
    assert world.world_dir(a) == world.world_dir(world.replace(a, eval_per_class=99, study=True))
    assert world.world_dir(a) != world.world_dir(world.replace(a, seed=1))


def test_world_user_errors(tmp_path):
    cases = [(['--preset', 'demo', '--world', 'nowhere'], 'is neither a world preset'),
             (['--preset', 'demo_color', '--rewards', 'world_class=1'], 'need a world'),
             (['--preset', 'demo', '--kl_images', '-1'], '--kl_images')]
    for args, msg in cases:  # refused before any world is built or model loaded
        with pytest.raises(UserError, match=msg):
            train.main([*args, '--out_dir', str(tmp_path)])
    with pytest.raises(UserError, match='--study'):
        world.main(['--study', 'everything'])
    p = subprocess.run([sys.executable, 'train.py', *cases[0][0]], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 2 and cases[0][1] in p.stderr and 'Traceback' not in p.stderr, p.stderr
