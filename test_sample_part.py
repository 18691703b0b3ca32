"""
Tests for sample.py against references: torchvision save_image / make_grid for the PNG, a direct
model.generate + VQ decode for the images, LlamaGen's own left-padding loop (sample_t2i.py) and
per-prompt unpadded T5 encodings for encode_prompts, plus the user errors (exit code 2, one line).
Uses the tiny LlamaGen fixtures in ../shared/fixtures/llamagen, rewritten as self-describing files.
Run: python -m pytest -q test_sample_part.py
"""
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import pytest
import torch
from PIL import Image

import model
import sample
import tokenizer
from model import CheckpointError
from sample import UserError, encode_prompts, load_t5, parse_config, to_uint8

ROOT = os.path.dirname(os.path.abspath(__file__))
FX = os.path.join(ROOT, '..', 'shared', 'fixtures', 'llamagen')


def _gpt(weights, config):
    cfg = model.GPTConfig(**json.load(open(os.path.join(FX, config)))['model_args'])
    sd, _ = model.read_state_dict(os.path.join(FX, weights))
    return model.load_into(model.GPT(cfg), sd, weights).eval()


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """Self-describing copies of the tiny fixtures and a tiny random T5 saved with save_pretrained."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    d = tmp_path_factory.mktemp('ckpts')
    model.save_gpt(_gpt('c2i_tiny.safetensors', 'c2i_tiny_config.json'), str(d / 'c2i.safetensors'))
    model.save_gpt(_gpt('t2i_tiny.safetensors', 't2i_tiny_config.json'), str(d / 't2i.safetensors'))  # cls 120
    vq_args = json.load(open(os.path.join(FX, 'vq_tiny_config.json')))['model_args']
    vq = tokenizer.VQModel(tokenizer.VQConfig(**vq_args, ch=32))
    model.load_into(vq, model.read_state_dict(os.path.join(FX, 'vq_tiny.pt'))[0], 'vq_tiny.pt')
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
    return subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), *args], cwd=cwd, capture_output=True,
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
