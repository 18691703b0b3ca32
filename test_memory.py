"""
test_memory.py -- memory.py: the plan against hand-counted bytes, and the memory flags' bad inputs.
"""
import os
import shutil
import subprocess
import sys

import pytest

import model
from cli import UserError
from conftest import HERE, run_train
from model import config_for
from memory import count_params, memory_plan


def test_memory_flags_bad_inputs(tmp_path, monkeypatch):
    with monkeypatch.context() as m:  # as under torchrun: then --compile is the complaint
        m.setenv('RANK', '0')
        with pytest.raises(UserError, match='--fsdp does not support --compile'):
            run_train(tmp_path / 'x', '--fsdp', '--compile')
    (tmp_path / 'file').write_text('x')
    rows = [(['--lora_rank', '-1'], '--lora_rank must be'), (['--lora_rank', '4', '--lora_alpha', '0'], '--lora_alpha'),
            (['--lora_targets', 'wq'], '--lora_targets must name'), (['--fsdp'], 'launch with torchrun'),
            (['--out_dir', str(tmp_path / 'file')], 'is a file'),
            (['--out_dir', str(tmp_path / 'file' / 'sub')], 'cannot be created')]
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


def test_memory_plan():
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
