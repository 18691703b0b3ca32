"""
test_all.py -- every test of the project, on CPU, in a few minutes.

    python -m pytest -q test_all.py

Tests compare against references: the outputs of the original LlamaGen code stored in
../shared/fixtures/llamagen (see its README), independent computations, or round trips.
"""
import argparse
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
FIX = os.path.join(HERE, '..', 'shared', 'fixtures', 'llamagen')

from model import (GPT, GPTConfig, CheckpointError, RELEASES, config_for, generate, load_gpt, load_into,
                   read_state_dict, save_gpt, precompute_freqs_cis_2d)
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


import numpy as np
import subprocess
import train


def run_train(out_dir, *args):
    """The offline demo preset at 8x8 px (4x4 tokens): a GRPO step takes ~50 ms on a CPU."""
    return train.main(['--preset', 'demo', '--image_size', '8', '--grid_every', '0', '--out_dir', str(out_dir),
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
    a, b = load_file(str(tmp_path / 'a' / 'model.safetensors')), load_file(str(tmp_path / 'b' / 'model.safetensors'))
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
    assert os.path.isfile(tmp_path / 'model.safetensors')  # saved before stopping
    state = torch.load(tmp_path / 'state.pt', weights_only=True)
    assert state['step'] == 6


def test_train_user_errors(tmp_path):
    cases = [(['--rewards', 'nope=1'], 'unknown reward'), (['--group_size', '1'], 'group_size'),
             (['--classes', '5000'], 'class ids must be in'), (['--resume'], 'no checkpoint'),
             (['--minibatch_size', '5'], 'must divide'), (['--ckpt', fixture('c2i_tiny.pt'), '--model', 'GPT-tiny'],
                                                          'does not fit|does not match')]
    for args, msg in cases:
        with pytest.raises((ValueError, CheckpointError), match=msg):
            run_train(tmp_path / 'x', '--max_steps', '1', *args)
    # through the command line: one line on stderr, exit code 2, no traceback
    p = subprocess.run([sys.executable, 'train.py', '--preset', 'demo', '--group_size', '1', '--out_dir',
                        str(tmp_path / 'y')], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 2 and 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_eval_same_seeds(tmp_path):
    a = run_train(tmp_path, '--eval', '--eval_conds', '3', '--eval_images', '2')
    b = run_train(tmp_path, '--eval', '--eval_conds', '3', '--eval_images', '2')
    assert a == b and set(a) == {'reward', 'colorfulness'}


def test_torchrun_two_ranks_stay_in_sync(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517',
                        'train.py', '--preset', 'demo', '--image_size', '8', '--max_steps', '4', '--save_every', '2',
                        '--device', 'cpu', '--out_dir', str(tmp_path)], cwd=HERE, capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count('ranks in sync: 2 replicas') == 2  # checked at steps 2 and 4
    rows = [json.loads(x) for x in open(tmp_path / 'metrics.jsonl')]
    assert [r['step'] for r in rows] == [1, 2, 3, 4]
    assert rows[0]['images_per_s'] > 0


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
