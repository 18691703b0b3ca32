"""
test_tracking.py -- tracking.py and provenance.py: what TensorBoard holds is what metrics.jsonl holds (read back
with tensorboard's own event reader), run.json records each start of a run, --report_to wandb without the package
is one sentence, and the provenance is this checkout's and this machine's.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import provenance
import tracking
import train
from cli import UserError
from conftest import HERE, run_train


def events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(log_dir, size_guidance={'scalars': 0, 'images': 0, 'tensors': 0})  # 0 = keep every event
    ea.Reload()
    return ea


def test_tensorboard_holds_every_metrics_scalar_the_grids_and_the_config(tmp_path):
    run_train(tmp_path, '--max_steps', '3', '--grid_every', '2', '--report_to', 'tensorboard', '--seed', '7')
    rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    ea = events(str(tmp_path / 'tb'))
    logged = set(ea.Tags()['scalars'])
    assert logged == set(tracking.scalars(rows[0])) and 'reward' in logged
    for k in logged:  # every scalar at every step, as float32 (the event file's precision)
        assert [(e.step, e.value) for e in ea.Scalars(k)] == \
            [(r['step'], pytest.approx(float(np.float32(r[k])), nan_ok=True)) for r in rows], k
    [grid] = ea.Images('reward_grid')  # grid_every 2 of 3 steps: step 2's grid, the very PNG train.py wrote
    assert (grid.step, grid.width, grid.height) == (2, *Image.open(tmp_path / 'grid_00002.png').size)
    config = ea.Tensors('config/text_summary')[0].tensor_proto.string_val[0].decode()
    assert json.loads(config.strip('`\n'))['seed'] == 7


def test_run_json_records_each_start(tmp_path):
    run_train(tmp_path, '--max_steps', '2', '--seed', '5')
    starts = json.load(open(tmp_path / 'run.json'))['starts']
    assert [s['step'] for s in starts] == [0] and starts[0]['provenance']['seeds']['seed'] == 5
    assert not (tmp_path / 'tb').exists()  # --report_to none: no tracker, run.json only
    run_train(tmp_path, '--max_steps', '3', '--seed', '5', '--resume')
    starts = json.load(open(tmp_path / 'run.json'))['starts']
    assert [s['step'] for s in starts] == [0, 2] and starts[1]['provenance']['config']['max_steps'] == 3


def test_report_to_bad_values_are_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(UserError, match='--report_to must be one of none, tensorboard, wandb'):
        run_train(tmp_path / 'a', '--report_to', 'mlflow')
    monkeypatch.setitem(sys.modules, 'wandb', None)  # as on a machine without it (import raises ImportError)
    with pytest.raises(UserError, match='--report_to wandb needs the wandb package'):
        run_train(tmp_path / 'b', '--report_to', 'wandb')
    assert not os.listdir(tmp_path)  # refused before anything was written


@pytest.mark.skipif(not __import__('importlib').util.find_spec('wandb'), reason='wandb is not installed here')
def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    run_train(tmp_path, '--max_steps', '2', '--report_to', 'wandb')
    assert list((tmp_path / 'wandb').glob('offline-run-*'))


def test_provenance_is_this_checkout_and_machine(tmp_path):
    cfg = train.TrainConfig(seed=11, world_seed=2)
    p = provenance.provenance(cfg, extra_seeds=dict(measure_seed=1234))
    assert p['seeds'] == dict(seed=11, world_seed=2, measure_seed=1234) and p['config']['lr'] == cfg.lr
    head = subprocess.run(['git', '-C', HERE, 'rev-parse', 'HEAD'], capture_output=True, text=True)
    if head.returncode == 0:  # run from a checkout: its commit (marked -dirty with local changes)
        assert p['git_commit'].split('-')[0] == head.stdout.strip()
    assert provenance.git_commit(str(tmp_path)) is None  # not a checkout: none, not a guess
    assert p['versions']['torch'] == torch.__version__ and p['versions']['numpy'] == np.__version__
    assert p['machine']['torch_threads'] == torch.get_num_threads() and p['machine']['cpu']
    assert p['machine']['gpu'] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert p['world'] is None and json.loads(json.dumps(p)) == p  # JSON-ready as it is
    w = tmp_path / 'abc123'
    w.mkdir()
    assert provenance.provenance(cfg, str(w))['world'] == dict(dir=str(w), hash='abc123')
