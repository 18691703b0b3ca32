"""
test_cli.py -- cli.py's contract for every command: the bad-input battery (every row a command line that must end
in exit code 2 with one sentence naming the problem, no traceback, and nothing written), flags -> config, atomic
outputs. Rows run in-process through cli.run (the scripts' own entry wrapper), so each costs about the
validation time, not a model load.
"""
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import torch

import bench
import cli
import metrics
import sample
import study
import train
import world
import world_t2i
from checkpoint import CheckpointError, save_gpt
from cli import UserError, parse_config
from conftest import HERE, tiny_gpt
from rewards import WeightsUnavailable


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


def _bad_input_files(tmp):
    """Files the rows refer to, made fresh per row: {name: path}."""
    f = dict(file=tmp / 'a_file', bin=tmp / 'binary.txt', prompts=tmp / 'p.txt', ckpt=tmp / 'tiny.safetensors',
             run=tmp / 'run', empty=tmp / 'empty', one=tmp / 'one.npz', none=tmp / 'none.npz', nul=tmp / 'nul.txt',
             huge=tmp / 'huge.txt')
    f['file'].write_text('x')
    f['bin'].write_bytes(b'\xff\xfe\x00\x81' * 64)
    f['prompts'].write_text('a red fox\n')
    save_gpt(tiny_gpt(), str(f['ckpt']))
    (f['run'] / 'step_000002').mkdir(parents=True)  # what a finished run leaves: a save and its log
    (f['run'] / 'metrics.jsonl').write_text('{"step": 1}\n{"step": 2}\n')
    f['empty'].mkdir()
    np.savez(f['one'], arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    np.savez(f['none'], arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    f['nul'].write_bytes(b'\x00' * 100_000)  # valid UTF-8, but no text
    with open(f['huge'], 'wb') as h:  # 2 GiB, sparse: costs no disk, and nothing may read it whole
        h.truncate(2 << 30)
    f['two'] = tmp / 'two.npz'
    np.savez(f['two'], arr_0=np.zeros((2, 8, 8, 3), np.uint8), arr_1=np.zeros(2, np.int64))
    f['onel'] = tmp / 'one_labelled.npz'
    np.savez(f['onel'], arr_0=np.zeros((1, 8, 8, 3), np.uint8), arr_1=np.zeros(1, np.int64))
    f['worldsave'] = tmp / 'world_save.safetensors'  # a save of a world that was deleted since
    gone = str(tmp / 'gone')
    save_gpt(tiny_gpt(), str(f['worldsave']), sampling=json.dumps(dict(
        vq_ckpt=gone + '/vq.safetensors', cfg=1.0, top_k=0, world=gone, class_names=['warm disk'] * 10)))
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
    ('train', TRAIN + ['--lr', 'nan'], '--lr must be a finite number'),
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
    ('train', TRAIN + ['--out_dir', '{file}/sub'], 'cannot be created'),
    ('train', TRAIN + ['--out_dir', '/proc/ar_grpo_run'], 'is not a writable directory'),
    ('train', TRAIN + ['--device', 'tpu'], '--device must be cpu, cuda, cuda:N or mps'),
    # bench.py
    ('bench', ['--device', 'gpu'], '--device must be cpu, cuda, cuda:N or mps'),
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
    ('train', TRAIN + ['--world_seed', '-1'], '--world_seed must be >= 0'),
    ('train', TRAIN + ['--world_seed', '1'], '--world_seed picks the seed of a world preset'),
    ('train', TRAIN + ['--rewards', 'world_class=1'], 'need a world'),
    ('train', TRAIN + ['--kl_images', '-1'], '--kl_images must be >= 0'),
    ('train', TRAIN + ['--lora_rank', '-2'], '--lora_rank must be >= 0'),
    ('train', TRAIN + ['--lora_rank', '4', '--lora_targets', 'wq'], '--lora_targets must name'),
    ('train', TRAIN + ['--fsdp'], 'launch with torchrun'),
    # a run is never replaced unasked
    ('train', TRAIN + ['--out_dir', '{run}'], 'holds a run (step_000002, 2 rows of metrics.jsonl)'),
    ('train', TRAIN + ['--out_dir', '{run}', '--resume', '--overwrite'], 'pass one of them'),
    # every float flag is a finite number
    ('train', TRAIN + ['--beta', 'inf'], '--beta must be a finite number'),
    ('train', TRAIN + ['--lora_rank', '4', '--lora_alpha', 'nan'], '--lora_alpha must be a finite number'),
    ('train', TRAIN + ['--cfg_scale=-inf'], '--cfg_scale must be a finite number'),
    ('bench', ['--cfg_scale', 'nan'], '--cfg_scale must be a finite number'),
    # a device this torch build and machine have
    ('train', TRAIN + ['--device', 'mps'], 'has no MPS'),
    ('bench', ['--device', 'mps'], 'has no MPS'),
    # a --world directory must hold a world
    ('train', TRAIN + ['--world', '{empty}'], 'holds no world'),
    ('train', TRAIN + ['--world', '{file}'], 'is neither a world preset'),
    # sizes that cannot fit are refused before the rollout allocates them
    ('train', TRAIN + ['--group_size', '100000000'], 'needs about'),
    ('train', TRAIN + ['--conds_per_rank', '1000000000'], 'needs about'),
    # metrics.py: a set of fewer than two images has no covariance
    ('metrics', ['{one}', '{one}'], 'holds 1 image(s); FID needs at least 2'),
    ('metrics', ['{none}', '{one}'], 'holds 0 image(s)'),
    ('metrics', ['{prompts}', '{one}'], 'is not an .npz with images'),
    # issue 23's battery: seeds beyond 64 bits, an empty --out_dir, a --resume with nothing to resume (no folder
    # made, no .lock left), prompt files that are no text, a flag named by its name, what a study owns
    ('train', TRAIN + ['--seed', '99999999999999999999'], '--seed must be >= 0 and <= 2**31 - 1'),
    ('train', TRAIN + ['--world_seed', '99999999999999999999'], '--world_seed must be >= 0 and <= 2**31 - 1'),
    ('world', ['--world_seed', '99999999999999999999', '--root', '{tmp}/w'], '--world_seed must be >= 0 and <='),
    ('world', ['--gpt_target', '1.5', '--root', '{tmp}/w'], '--gpt_target must be'),
    ('world', ['--gpt_check_per_class', '0', '--root', '{tmp}/w'], '--gpt_check_per_class must be'),
    # the text-to-image world's pretraining flags (issue 25)
    ('world_t2i', ['--gpt_target', '1.5', '--root', '{tmp}/w'], '--gpt_target must be'),
    ('world_t2i', ['--gpt_batch', '0', '--root', '{tmp}/w'], '--gpt_batch must be'),
    ('world_t2i', ['--gpt_check_per_tag', '0', '--root', '{tmp}/w'], '--gpt_check_per_tag must be'),
    ('study', ['--seeds', '0', '99999999999999999999', '--out_dir', '{tmp}/s'], '--seeds must be >= 0 and <='),
    ('train', TRAIN + ['--out_dir', ''], '--out_dir is empty'),
    ('study', ['--out_dir', ''], '--out_dir is empty'),
    ('train', TRAIN + ['--out_dir', '{tmp}/nowhere', '--resume'], 'no checkpoint in'),
    ('train', TRAIN + ['--out_dir', '{empty}', '--resume'], 'no checkpoint in'),
    ('train', TRAIN + ['--ckpt', 't2i_XL_stage1_256', '--prompts', '{empty}'], 'is a directory'),
    ('train', TRAIN + ['--ckpt', 't2i_XL_stage1_256', '--prompts', '{nul}'], 'holds NUL bytes'),
    ('train', TRAIN + ['--ckpt', 't2i_XL_stage1_256', '--prompts', '{huge}'], 'is 2048 MiB, more than the 256 MiB'),
    ('train', ['--preset', 'demo_t2i', '--prompts', '{prompts}'], "unknown word 'fox'"),  # the miniature's words
    ('metrics', ['--bogus', '1'], 'unrecognized arguments: --bogus 1'),
    ('study', ['--variants', '--out_dir {tmp}/elsewhere', '--out_dir', '{tmp}/s'], 'sets --out_dir, which the study'),
    ('study', ['--variants', '--beta 0.2 --seed 3', '--out_dir', '{tmp}/s'], 'sets --seed, which the study'),
    # trackers (tracking.py) and the miniature's scoring command (world.py --eval)
    ('train', TRAIN + ['--report_to', 'mlflow'], '--report_to must be one of none, tensorboard, wandb'),
    ('world', ['--eval', '{tmp}/nope.npz'], 'is not a file'),
    ('world', ['--eval', '{prompts}'], 'is not an .npz with images `arr_0` and labels `arr_1`'),
    ('world', ['--eval', '{onel}'], 'must be uint8 images (n >= 2, H, W, 3) with n labels'),
    ('world', ['--eval', '{two}', '--world', '{empty}'], 'holds no built world'),
    ('world', ['--eval', '{two}', '--world_seed', '-1'], '--world_seed must be >= 0'),
    # sample.py with a save made in a world whose directory is gone
    ('sample', ['--ckpt', '{worldsave}', '--class', 'warm disk'], 'which is gone'),
]


if not torch.cuda.is_available():
    BAD_INPUTS += [('bench', ['--device', 'cuda'], 'torch sees no GPU'),
                   ('train', TRAIN + ['--device', 'cuda'], 'torch sees no GPU'),
                   ('train', TRAIN + ['--device', 'cuda:3'], 'torch sees no GPU')]


_ERRORS = (ValueError, CheckpointError, WeightsUnavailable)


@pytest.mark.parametrize('script,argv,phrase', BAD_INPUTS,
                         ids=[' '.join(r[1][len(TRAIN) * (r[1][:len(TRAIN)] == TRAIN):]) for r in BAD_INPUTS])
def test_bad_input_battery(script, argv, phrase, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # a row that reached the Hub would fail on a different message
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    files = _bad_input_files(tmp_path)
    out = tmp_path / 'out'
    args = [a.format(tmp=tmp_path, **files) for a in argv]
    if script == 'train' and '--out_dir' not in args:
        args += ['--out_dir', str(out)]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))  # every file, at every depth
    main = dict(train=train.main, bench=bench.main, metrics=metrics.main, world=world.main, world_t2i=world_t2i.main, study=study.main,
                sample=sample.main)[script]
    code = cli.run(main, args, errors=_ERRORS)
    err = capsys.readouterr().err
    assert code == 2, err
    assert phrase in err, err
    assert 'Traceback' not in err and err.count('\n') == 1 and err.startswith('error: ')
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before  # no output dir, file or lock


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
