"""
test_distributed.py -- distributed.py under 2 CPU ranks (gloo): replicas stay in sync, FSDP2 equals DDP, a
group spanning ranks gets its whole group's advantages.
"""
import json
import os
import subprocess
import sys

import torch

import grpo
import train
from conftest import HERE, assert_same_weights, latest_weights, on_ranks, train_on
from grpo import group_advantages


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


def test_fsdp_equals_ddp(tmp_path):
    train_on(2, tmp_path / 'ddp', '--max_steps', '3', '--save_every', '3')
    train_on(2, tmp_path / 'fsdp', '--max_steps', '3', '--save_every', '3', '--fsdp')
    rows = [[json.loads(x) for x in open(tmp_path / d / 'metrics.jsonl')] for d in ('ddp', 'fsdp')]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows):
        for k in ('loss', 'kl', 'reward', 'grad_norm'):
            assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])
    assert_same_weights(latest_weights(tmp_path / 'ddp'), latest_weights(tmp_path / 'fsdp'), atol=1e-5)
    assert len(os.listdir(tmp_path / 'fsdp' / 'latest' / 'dcp')) == 3  # .metadata + one shard per rank


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
