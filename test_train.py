"""
test_train.py -- train.py: the GRPO loop end to end on tiny models (the reward rises, exact resume, non-finite
rewards, t2i prompt files, the global batch), its rollout diagnostics, and its user errors.
"""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tfi

import conditions
import grpo
import metrics
import train
from checkpoint import CheckpointError
from hub import WeightsUnavailable
from cli import UserError, parse_config
from fid import LooFID, mean_cov
from conftest import HERE, cuda, fixture, offline_hf_home, run_train
from model import GPT, GPTConfig, generate


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
    assert conditions.read_prompts(str(p)) == ['a red fox in snow', 'two blue cups on a table']
    assert conditions.read_prompts(str(tmp_path / 'p.json')) == ['a cat', 'a dog']
    assert conditions.read_prompts(str(tmp_path / 'p.txt')) == ['a cat', 'a dog']
    (tmp_path / 'empty.txt').write_text('\n \n')
    (tmp_path / 'bad.jsonl').write_text('{"text": "no prompt key"}\n')
    for bad, msg in [(tmp_path / 'missing.txt', 'does not exist'), (tmp_path / 'empty.txt', 'holds no prompts'),
                     (tmp_path / 'bad.jsonl', 'is not a .json list')]:
        with pytest.raises(ValueError, match=msg):
            run_train(tmp_path / 'bad', *args, '--prompts', str(bad))


@cuda
def test_gpu_train_steps(tmp_path):
    rows = run_train(tmp_path, '--max_steps', '3', '--device', 'cuda', '--cfg_scale', '2.0', '--compile')
    assert len(rows) == 3 and all(np.isfinite(r['reward']) and np.isfinite(r['grad_norm']) for r in rows)


def test_one_nonfinite_reward_does_not_skip_the_step(tmp_path, monkeypatch):
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


def test_global_batch_and_flag_errors(tmp_path, monkeypatch):
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


def test_token_diagnostics_against_brute_force():
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


def test_a_failure_after_validation_leaves_nothing_behind(tmp_path, monkeypatch):
    """Validation passes, then the reward weights cannot be fetched (offline): out_dir was never created."""
    offline_hf_home(monkeypatch, tmp_path / 'hf')
    with pytest.raises(WeightsUnavailable):
        run_train(tmp_path / 'o' / 'run', '--rewards', 'clip=1', '--max_steps', '1')
    assert not os.path.exists(tmp_path / 'o')


# -----------------------------------------------------------------------------
# beyond the paper: guidance-free rollouts, the entropy bonus, the leave-one-out FID reward


def _tiny_run(tmp_path, *args):
    cfg = parse_config(train.TrainConfig, ['--preset', 'demo_color', '--image_size', '8', '--out_dir', str(tmp_path),
                                           *args], presets=train.TRAIN_PRESETS)
    run = train.setup(cfg)
    train.start_training(cfg, run)
    return cfg, run


def test_guidance_free_rollout_is_on_policy_and_its_step_runs(tmp_path):
    """At --cfg_scale 1 the rollout samples from the conditional branch alone (one forward per token, no null
    half), so the log-probs the update computes teacher-forced equal those of the distribution that drew the
    tokens; a whole step runs and updates the weights."""
    cfg, run = _tiny_run(tmp_path, '--cfg_scale', '1', '--beta', '0.05')
    torch.nn.init.normal_(run.policy.output.weight, std=0.05)  # LlamaGen zero-inits it: make the logits non-trivial
    cond = torch.tensor([0, 3, 5, 7])
    tokens, sampled = generate(run.policy, cond, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp, logits = train.sequence_logprobs(cfg, run.policy, tokens, cond, None)
    torch.testing.assert_close(logp, sampled, atol=1e-5, rtol=0)  # on-policy: ratio 1 by construction
    direct = run.policy(tokens[:, :-1], cond).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logp, direct, atol=1e-6, rtol=0)
    before = {k: v.clone() for k, v in run.policy.state_dict().items()}
    metrics, _ = train.grpo_step(cfg, run, 0)
    assert metrics['skipped'] == 0 and math.isfinite(metrics['loss'])
    assert any(not torch.equal(before[k], v) for k, v in run.policy.state_dict().items())


def test_entropy_bonus_enters_the_loss_and_its_coefficient_adapts(tmp_path):
    cfg, run = _tiny_run(tmp_path, '--entropy_coef', '0.5', '--entropy_target', '9', '--entropy_lr', '0.1')
    m0, _ = train.grpo_step(cfg, run, 0)
    assert m0['entropy_coef'] == 0.5 and m0['entropy_bonus'] > 0
    assert m0['loss'] == pytest.approx(m0['pg_loss'] + cfg.beta * m0['kl'] - 0.5 * m0['entropy_bonus'], abs=1e-5)
    # c <- max(0, c + lr (target - H)) with the step's entropy; the next step uses it
    assert run.entropy_coef == pytest.approx(grpo.adapt_entropy_coef(0.5, m0['entropy'], 9.0, 0.1), rel=1e-6)
    m1, _ = train.grpo_step(cfg, run, 1)
    assert m1['entropy_coef'] == pytest.approx(grpo.adapt_entropy_coef(0.5, m0['entropy'], 9.0, 0.1), rel=1e-6)


class _Colours(torch.nn.Module):
    """A stand-in feature extractor for loo_fid: mean colour and its spread per channel (d = 6)."""

    def forward(self, images):
        x = images.float().flatten(2)  # (B, 3, HW)
        return torch.cat([x.mean(-1), x.std(-1)], 1)


def _fake_loo(monkeypatch):
    def loo(fid_ref, decay, device, inception=None):
        g = torch.Generator().manual_seed(1)
        ref = torch.rand(200, 3, 8, 8, generator=g) * 2 - 1
        return LooFID(_Colours(), *mean_cov(_Colours()(ref)), decay=decay)
    monkeypatch.setattr(metrics, 'loo_fid_reward', loo)


def test_loo_fid_state_and_entropy_coefficient_resume_exactly(tmp_path, monkeypatch):
    """3 steps + resume to 5 equal 5 uninterrupted steps, with loo_fid's moving statistics and an adapting entropy
    coefficient in the state: both are saved and restored."""
    _fake_loo(monkeypatch)
    ref = tmp_path / 'ref.npz'
    np.savez(ref, arr_0=np.zeros((2, 8, 8, 3), np.uint8))  # validated only: the fake reward ignores it
    args = ['--rewards', 'colorfulness=1,loo_fid=20', '--fid_ref', str(ref), '--entropy_coef', '0.01',
            '--entropy_target', '5', '--entropy_lr', '0.01', '--save_every', '1']
    run_train(tmp_path / 'a', *args, '--max_steps', '3')
    run_train(tmp_path / 'a', *args, '--max_steps', '5', '--resume')
    run_train(tmp_path / 'b', *args, '--max_steps', '5')
    ra, rb = ([json.loads(x) for x in open(tmp_path / d / 'metrics.jsonl')] for d in 'ab')
    keys = ['reward', 'loo_fid_mean', 'loo_fid_fd', 'entropy_coef', 'loss', 'kl']
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]
    sa, sb = (torch.load(tmp_path / d / 'latest' / 'state.pt', weights_only=True)['extra'] for d in 'ab')
    assert all(torch.equal(sa['rewards']['loo_fid'][k], sb['rewards']['loo_fid'][k]) for k in sb['rewards']['loo_fid'])
    assert sa['entropy_coef'] == sb['entropy_coef'] != 0.01


def test_paper_recipe_plus_loo_fid_runs_on_random_inception(tmp_path, monkeypatch):
    """The real-scale path (--rewards ...,loo_fid=W --fid_ref REF.npz) through metrics.loo_fid_reward on
    torch-fidelity's TF-Inception with random weights (the real ones cannot be downloaded here) and a tiny GPT."""
    monkeypatch.setattr(tfi, 'load_state_dict_from_url', lambda *a, **k: {})
    monkeypatch.setattr(tfi.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, sd: None)
    monkeypatch.setattr(metrics, 'load_inception', lambda path=None, device='cpu': metrics.TFInception(None).eval())
    ref = tmp_path / 'ref.npz'
    g = np.random.default_rng(0)
    np.savez(ref, arr_0=g.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))  # images: their features are computed
    rows = run_train(tmp_path / 'r', '--rewards', 'colorfulness=1,loo_fid=1', '--fid_ref', str(ref), '--max_steps',
                     '1', '--conds_per_rank', '1', '--group_size', '3')
    assert len(rows) == 1 and math.isfinite(rows[0]['loo_fid_fd']) and rows[0]['loo_fid_std'] > 0
    with pytest.raises(UserError, match='needs reference statistics'):
        run_train(tmp_path / 'x', '--rewards', 'paper,loo_fid=0.5')
    with pytest.raises(UserError, match='is a training reward'):
        run_train(tmp_path / 'x', '--rewards', 'colorfulness=1,loo_fid=0.5', '--fid_ref', str(ref), '--eval')


def test_sampler_copy_follows_the_policy_and_its_logprob_gap_is_small(tmp_path):
    """The rollout's 16-bit copy (train.inference_copy, bf16 here on the CPU) holds the policy's weights cast, again
    after an optimizer step; rollout() samples from it exactly what generate() does; its log-probs of the sampled
    tokens are near the float32 policy's (the update recomputes them there), and a float32 copy's are the same."""
    cfg, run = _tiny_run(tmp_path, '--cfg_scale', '2', '--logprob_mode', 'guided')
    torch.nn.init.normal_(run.policy.output.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    assert train.rollout_policy(cfg, run) is run.policy  # CPU: no copy
    sampler = train.inference_copy(run.policy, torch.bfloat16)
    cast = lambda: {k: v.to(torch.bfloat16) for k, v in run.policy.state_dict().items()}
    assert all(torch.equal(v, cast()[k]) for k, v in sampler.state_dict().items())
    run.policy.output.weight.grad = torch.randn_like(run.policy.output.weight)
    run.opt.step()
    assert train.inference_copy(run.policy, torch.bfloat16, sampler) is sampler
    assert all(torch.equal(v, cast()[k]) for k, v in sampler.state_dict().items())
    cond = torch.tensor([0, 3, 5, 7])
    tokens, _, _ = train.rollout(cfg, sampler, run.vq, cond, None, torch.Generator().manual_seed(0), run.device)
    again, logp_sampler = generate(sampler, cond, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)
    with torch.no_grad():
        logp_policy = train.sequence_logprobs(cfg, run.policy, tokens, cond, None)[0]
        exact = generate(train.inference_copy(run.policy, torch.float32), cond, cfg_scale=2.0,
                         generator=torch.Generator().manual_seed(0))[1]
    gap = (logp_sampler - logp_policy).abs()
    assert 0 < gap.max() < 0.1 and gap.mean() < 0.02  # bf16 rounding, not a different distribution
    torch.testing.assert_close(exact, logp_policy, atol=1e-5, rtol=0)


@cuda
def test_gpu_rollout_samples_from_a_refreshed_bf16_copy(tmp_path):
    cfg, run = _tiny_run(tmp_path, '--device', 'cuda', '--cfg_scale', '2')
    torch.nn.init.normal_(run.policy.output.weight, std=0.05)
    metrics, _ = train.grpo_step(cfg, run, 0)
    assert metrics['skipped'] == 0 and next(run.sampler.parameters()).dtype == torch.bfloat16
    assert train.rollout_policy(cfg, run) is run.sampler  # the same copy, refreshed: the step's update is in it
    for (k, v), p in zip(run.sampler.state_dict().items(), run.policy.state_dict().values()):
        assert torch.equal(v, p.to(v.dtype)), k
