"""
test_sample.py -- sample.py against references: torchvision save_image / make_grid for the PNG, a direct
model.generate + VQ decode for the images, and the user errors (exit code 2, one line).
"""
import open_clip
from torchvision.utils import save_image
import io
import json
import os
import re
import subprocess
import sys

from PIL import Image
import numpy as np
import pytest
import torch

import checkpoint
import conditions
import model
import sample
from checkpoint import CheckpointError
from cli import UserError
from conditions import encode_prompts, load_t5
from conftest import HERE
from tokenizer import to_uint8


def run_sample(ckpts, kind, *args, out=None):
    """sample.py on the tiny self-describing checkpoints (the ckpts fixture), in-process."""
    base = ['--ckpt', ckpts[kind], '--vq_ckpt', ckpts['vq'], '--device', 'cpu', '--t5', ckpts['t5']]
    return sample.main([*args, *base, '--out', out or ''])


def test_class_by_name_equals_class_id(ckpts):
    name = open_clip.IMAGENET_CLASSNAMES[3]  # 'tiger shark'; the tiny model has classes 0..9
    by_id = run_sample(ckpts, 'c2i', '--class', '3', '--n', '2')
    by_name = run_sample(ckpts, 'c2i', '--class', f' {name.upper()} ', '--n', '2')
    assert (by_id == by_name).all()
    with pytest.raises(UserError, match="did you mean|close matches: 'tiger shark'"):
        conditions.class_ids(['tigr shark'])


def test_c2i_png_npz_match_torchvision_and_direct_generate(ckpts, tmp_path):
    png, npz = tmp_path / 'g.png', tmp_path / 'g.npz'
    imgs = run_sample(ckpts, 'c2i', '--class', '3', '7', '--n', '3', '--seed', '5', '--npz', str(npz), out=str(png))
    assert imgs.shape == (6, 8, 8, 3) and imgs.dtype == np.uint8  # 4x4 tokens, VQ downsamples by 2
    arr = np.load(npz)['arr_0']
    assert arr.dtype == np.uint8 and arr.shape == (6, 8, 8, 3) and (arr == imgs).all()
    # reference: the same generator stream through model.generate and the VQ decoder, saved the
    # way LlamaGen saves (torchvision save_image, nrow = images per row, value_range (-1, 1))
    gpt, vq = checkpoint.load_gpt(ckpts['c2i']), checkpoint.load_vq(ckpts['vq'])
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
    with pytest.raises(UserError, match='already exists'):  # the grid's npz, too, is replaced only when asked
        run_sample(ckpts, 'c2i', '--class', '3', '--n', '1', '--npz', str(npz))
    assert (np.load(npz)['arr_0'] == imgs).all()
    run_sample(ckpts, 'c2i', '--class', '3', '--n', '1', '--npz', str(npz), '--overwrite')
    assert np.load(npz)['arr_0'].shape == (1, 8, 8, 3)


def test_seed_determinism(ckpts):
    a = run_sample(ckpts, 'c2i', '--class', '1', '--n', '4', '--seed', '0')
    b = run_sample(ckpts, 'c2i', '--class', '1', '--n', '4', '--seed', '0')
    c = run_sample(ckpts, 'c2i', '--class', '1', '--n', '4', '--seed', '1')
    assert (a == b).all()
    assert (a != c).any()


def test_to_uint8_rounds_like_save_image():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16) * 2.4 - 1.2  # beyond [-1, 1] too
    x[0, 0, 0, :5] = torch.tensor([-1.0, 1.0, 0.0, 1 / 255 - 1, 0.5 / 127.5 - 1])
    buf = io.BytesIO()
    save_image(x, buf, format='png', normalize=True, value_range=(-1, 1))
    ref = np.asarray(Image.open(buf))
    assert (to_uint8(x)[0].permute(1, 2, 0).numpy() == ref).all()


def test_t2i_end_to_end_matches_direct_generate(ckpts, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    prompts = ['a red cube', 'two cats on a sofa']
    imgs = run_sample(ckpts, 't2i', '--prompt', *prompts, '--n', '2', '--seed', '3', '--cfg', '3.0')
    assert imgs.shape == (4, 8, 8, 3)
    gpt, vq = checkpoint.load_gpt(ckpts['t2i']), checkpoint.load_vq(ckpts['vq'])
    emb, mask = encode_prompts(prompts, *load_t5(ckpts['t5']), max_length=120)
    tokens, _ = model.generate(gpt, emb.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), cfg_scale=3.0,
                               top_k=1000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = to_uint8(vq.decode(tokens.view(4, 4, 4))).permute(0, 2, 3, 1).numpy()
    assert (imgs == ref).all()


@pytest.fixture(scope='session')
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
            (['--prompt', 'a cat', '--class'], 'is a class-to-image model'),  # a self-describing c2i file given a prompt
            (['--image_size', '64'], 'contradicts'),  # the file holds an 8-px model
            (['--class', '10'], '0..9'),  # read from the file's header, before loading
            (['--class', '1000', '--ckpt', 'c2i_B_256'], '0..999'),  # before the release is fetched
            (['--preset', 'fast'], 'invalid choice'),
            (['--out', str(a_file / 'g.png')], '--out ' + str(a_file / 'g.png') + ' cannot be written'),  # a folder that is a file
            (['--npz', str(tmp / 'dir.npz')], 'is a directory'),  # a directory
            (['--per_class', '1', '--npz', str(tmp / 'stale.npz')], 'other settings'),
            (['--per_class', '1', '--npz', str(tmp / 'done.npz')], 'already exists'),  # a finished sampling
            (['--npz', str(tmp / 'done.npz')], 'already exists'),  # a grid's npz too is replaced only when asked
            (['--prompt', ' ', '--class'], '--prompt must not be empty'),
            (['--top_p', 'nan'], '--top_p must be a finite number'), (['--device', 'mps'], 'has no MPS')]
    np.savez(tmp / 'done.npz', arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    if not torch.cuda.is_available():
        rows.append((['--device', 'cuda'], 'no GPU'))
    return rows


def test_sample_bad_inputs_in_process(ckpts, tmp_path, monkeypatch):
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


def test_sample_bad_input_cli_and_torchrun(ckpts, tmp_path):
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


def test_sizes_that_cannot_fit_are_refused_before_sampling(ckpts, tmp_path):
    """After loading (the GPT's size is then known), before generate() allocates its KV cache."""
    for args, out in ((['--class', '3', '--per_class', '10000000', '--batch', '100000000', '--npz', str(tmp_path / 'x.npz')],
                       None), (['--class', '3', '--n', '100000000'], str(tmp_path / 'g.png'))):
        with pytest.raises(UserError, match='needs about .* GiB but this cpu has'):
            run_sample(ckpts, 'c2i', *args, out=out)
    assert os.listdir(tmp_path) == []


WORLD_NAMES = [f"{c} {s}" for c in ('warm', 'cool') for s in ('disk', 'square', 'triangle', 'ring', 'cross')]


def _world_save(ckpts, path, vq, world, **settings):
    """The tiny c2i model saved as train.py saves it in a world: its sampling settings and the world's names."""
    gpt = checkpoint.load_gpt(ckpts['c2i'])
    meta = {**dict(vq_ckpt=vq, cfg=1.0, cfg_interval=-1, top_k=0, top_p=1.0, temperature=1.0, world=world,
                   world_hash=os.path.basename(world), class_names=WORLD_NAMES), **settings}
    checkpoint.save_gpt(gpt, str(path), sampling=json.dumps(meta))
    return str(path)


def test_a_world_save_samples_with_its_own_settings_and_class_names(ckpts, tmp_path):
    """No --vq_ckpt, --cfg, --top_k: the save's own; --class takes the world's names. The reference is the same
    weights sampled with every setting spelled out."""
    ckpt = _world_save(ckpts, tmp_path / 'w.safetensors', ckpts['vq'], str(tmp_path), temperature=0.8)
    got = sample.main(['--ckpt', ckpt, '--class', 'WARM disk', 'cool ring', '--n', '2', '--device', 'cpu', '--out', ''])
    want = run_sample(ckpts, 'c2i', '--class', '0', '8', '--n', '2', '--cfg', '1', '--top_k', '0',
                      '--temperature', '0.8')
    assert np.array_equal(got, want)
    cfg = sample.SampleConfig(ckpt=ckpt, cfg=3.0, temperature=1.0)  # a flag beats the save's setting
    assert (cfg.cfg, cfg.temperature, cfg.top_k, cfg.vq_ckpt) == (3.0, 1.0, 0, ckpts['vq'])
    assert sample.SampleConfig(ckpt=ckpt).classes == WORLD_NAMES  # no --class: every class of the world
    assert sample.SampleConfig(ckpt=ckpts['c2i']).cfg == 4.0  # a file without sampling settings: LlamaGen's


def test_a_world_save_whose_world_is_gone_or_name_unknown_is_one_sentence(ckpts, tmp_path):
    gone = tmp_path / 'world' / 'abc'
    ckpt = _world_save(ckpts, tmp_path / 'w.safetensors', str(gone / 'vq.safetensors'), str(gone))
    for args, msg in [(['--class', '0'], f'trained in the world {gone}, which is gone'),
                      (['--class', 'warm dsk', '--vq_ckpt', ckpts['vq']], 'its classes are warm disk, warm square')]:
        with pytest.raises(UserError, match=msg):
            sample.main(['--ckpt', ckpt, *args, '--device', 'cpu', '--out', str(tmp_path / 'x.png')])
    assert sorted(os.listdir(tmp_path)) == ['w.safetensors']
