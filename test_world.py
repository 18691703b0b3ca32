"""
test_world.py -- world.py's miniature on the 'tiny' preset (seconds): every part is trained, the GRPO gain is
measured by the held-out judge that no reward uses.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import train
import world
from checkpoint import load_gpt
from cli import UserError
from conftest import HERE


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


def test_world_cache_key_follows_the_config():
    a = world.WorldConfig()
    assert world.world_dir(a) == world.world_dir(world.replace(a, eval_per_class=99, preset='demo'))
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
