"""
test_checkpoint.py -- checkpoint.py: every checkpoint layout the readers accept, bad files, the Hub cache offline,
self-describing round trips, and train.py's step-directory saves (resume across world sizes, kill -9).
"""
import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
import torch

import checkpoint
import cli
import distributed
import hub
import train
from checkpoint import CheckpointError, RELEASES, load_gpt, read_state_dict, save_gpt, load_vq, save_vq
from cli import UserError, parse_config
from conftest import (ATOL, HERE, SCALE_ARGS, assert_same_weights, fixture, latest_weights, on_ranks, run_train, tiny_gpt,
                      tiny_vq, train_on)
from model import config_for


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


def test_training_configs_are_the_loaded_models_configs(tmp_path, monkeypatch):
    """train.py plans memory with training_configs before loading: the configs it names are those of the models
    load_training_models then builds (random init; self-describing files, whose header differs from the flags'
    default vocabulary), and a release is planned from the table alone, offline, with nothing downloaded."""
    gpt, vq = str(tmp_path / 'g.safetensors'), str(tmp_path / 'v.safetensors')
    save_gpt(tiny_gpt(), gpt)  # the LlamaGen fixtures: GPT-tiny's shape, 4x4 tokens, 10 classes; a 2x VQ
    save_vq(tiny_vq(), vq)
    for flags in ([], ['--ckpt', gpt, '--vq_ckpt', vq]):
        cfg = parse_config(train.TrainConfig, [*SCALE_ARGS, '--out_dir', str(tmp_path / 'o'), *flags],
                           presets=train.TRAIN_PRESETS)
        planned_gpt, planned_vq = checkpoint.training_configs(cfg)
        policy, _, v = checkpoint.load_training_models(cfg, torch.device('cpu'))
        assert (planned_gpt, planned_vq) == (policy.config, v.config)
    assert planned_gpt.num_classes == 10 and planned_gpt != config_for('GPT-tiny', 8, 2, vocab_size=64)  # header's
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'empty'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # a download would raise: the Hub cache is empty
    cfg = parse_config(train.TrainConfig, ['--preset', 'c2i_xl', '--out_dir', str(tmp_path / 'xl')],
                       presets=train.TRAIN_PRESETS)
    assert checkpoint.training_configs(cfg)[0] == config_for('GPT-XL', 384, 16)


def test_an_hf_checkpoint_is_planned_from_its_header_alone(tmp_path, monkeypatch):
    """An hf:// safetensors checkpoint that is not cached is planned from its header (two range requests), never
    downloaded for the plan: hf_hub_download may only look in the cache. Offline, one sentence naming --ckpt."""
    import huggingface_hub
    path = str(tmp_path / 'g.safetensors')
    save_gpt(tiny_gpt(), path)
    calls = []

    def download(repo, filename, local_files_only=False, **kw):
        calls.append((repo, filename, local_files_only))
        raise huggingface_hub.errors.LocalEntryNotFoundError('not in the cache')  # an empty cache

    class Header:  # what parse_safetensors_file_metadata returns, read here from the real file
        metadata = checkpoint.file_metadata(path)

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', download)
    monkeypatch.setattr(huggingface_hub, 'parse_safetensors_file_metadata', lambda repo, filename, **kw: Header)
    monkeypatch.setattr(hub, 'hub_unreachable', lambda: None)
    assert checkpoint.gpt_config('hf://someone/tuned/g.safetensors') == tiny_gpt().config
    assert calls == [('someone/tuned', 'g.safetensors', True)]  # the cache was asked, nothing downloaded
    monkeypatch.setattr(hub, 'hub_unreachable', lambda: 'no network')
    with pytest.raises(checkpoint.CheckpointError, match=r'header of g.safetensors .* --ckpt PATH$'):
        checkpoint.gpt_config('hf://someone/tuned/g.safetensors')
    assert checkpoint.header_metadata('hf://someone/tuned/g.pt') == {}  # a .pt holds no config: nothing asked
    assert len(calls) == 2


def resave(src, dst, world, *args):
    """Load the newest save of src on `world` ranks and write it again, unchanged, as a save of dst."""
    def fn():
        cfg = parse_config(train.TrainConfig, [*SCALE_ARGS, '--out_dir', str(src), '--resume', *args],
                           presets=train.TRAIN_PRESETS)
        rank, w, device = distributed.init(cfg.device)
        policy, _, _ = checkpoint.load_training_models(cfg, device)
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad])
        step, bad, _ = checkpoint.load_checkpoint(cfg, policy, opt)
        cfg.out_dir = str(dst)
        os.makedirs(dst, exist_ok=True)
        checkpoint.save_checkpoint(cfg, policy, opt, step, bad, rank, w)
    assert on_ranks(world, fn, distributed=world > 1 or '--fsdp' in args)


def test_resume_across_world_sizes(tmp_path):
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


def test_kill_9_then_resume_is_bitwise(tmp_path):
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

# -----------------------------------------------------------------------------
# the run directory: never replaced unasked, one writer, a torn log line, a full disk, file modes


def _rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, 'metrics.jsonl'))]


def test_a_fresh_run_never_replaces_a_run_unasked(tmp_path, capsys):
    r = tmp_path / 'r'
    run_train(r, '--max_steps', '4', '--save_every', '2')
    before = latest_weights(r)
    with pytest.raises(UserError, match='holds a run .step_000004, 4 rows'):  # validation: nothing computed
        run_train(r, '--max_steps', '1', '--save_every', '1')
    assert sorted(os.listdir(r)) == ['.lock', 'latest', 'metrics.jsonl', 'reward_curve.png', 'run.json',
                                     'step_000002', 'step_000004']  # the last two saves
    assert len(_rows(r)) == 4 and all(torch.equal(before[k], v) for k, v in latest_weights(r).items())
    # a run started from code (the demo's) is checked when it opens the directory, too
    cfg = parse_config(train.TrainConfig, ['--preset', 'demo_color', '--image_size', '8', '--out_dir', str(tmp_path / 'x')],
                       presets=train.TRAIN_PRESETS)
    cfg.out_dir = str(r)
    with pytest.raises(UserError, match='holds a run'):
        with checkpoint.open_run(cfg):
            pass
    # --overwrite: the old run is moved aside, kept until the new run's first save, then deleted
    real_save = checkpoint.save_checkpoint
    seen = []

    def spy(cfg, *a):  # what the directory holds just before the new run's first save
        seen.append(sorted(os.listdir(r / checkpoint.REPLACED)))
        return real_save(cfg, *a)
    train.save_checkpoint = spy
    try:
        run_train(r, '--max_steps', '1', '--save_every', '1', '--overwrite')
    finally:
        train.save_checkpoint = real_save
    assert seen == [['latest', 'metrics.jsonl', 'reward_curve.png', 'run.json', 'step_000002', 'step_000004']]
    assert 'moved to' in capsys.readouterr().out
    assert sorted(os.listdir(r)) == ['.lock', 'latest', 'metrics.jsonl', 'reward_curve.png', 'run.json', 'step_000001']
    assert [row['step'] for row in _rows(r)] == [1]


def test_a_second_writer_exits_2_naming_the_first_which_finishes(tmp_path):
    """Two real processes on one out_dir: the second gets one sentence with the first's pid, exit 2, and
    touches nothing; the first finishes as if alone (its rows in order, its save whole)."""
    r = tmp_path / 'r'
    args = [sys.executable, 'train.py', '--preset', 'demo_color', '--image_size', '8', '--grid_every', '0',
            '--out_dir', str(r), '--save_every', '1000']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    first = subprocess.Popen(args + ['--max_steps', '150'], cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (r / 'metrics.jsonl').exists() and time.time() < deadline:  # the first has the lock and is running
        time.sleep(0.2)
    second = subprocess.run(args + ['--max_steps', '3'], cwd=HERE, env=env, capture_output=True, text=True,
                            timeout=120)
    third = subprocess.run(args + ['--max_steps', '3', '--overwrite'], cwd=HERE, env=env, capture_output=True,
                           text=True, timeout=120)  # passes the "holds a run" check: the lock still refuses it
    assert first.poll() is None, 'the first run ended before the others started; make it longer'
    for p in (second, third):
        assert p.returncode == 2 and f'in use by another run (pid {first.pid})' in p.stderr, p.stderr
        assert 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert first.wait(timeout=300) == 0
    assert [row['step'] for row in _rows(r)] == list(range(1, 151))
    assert os.listdir(r / 'latest') and checkpoint.newest_checkpoint(str(r)).endswith('step_000150')


def test_a_torn_last_line_of_the_log_is_dropped_on_resume(tmp_path, capsys):
    r = tmp_path / 'r'
    run_train(r, '--max_steps', '2', '--save_every', '1')
    with open(r / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 3, "reward": 0.4')  # killed (or out of space) in the middle of an append
    run_train(r, '--max_steps', '3', '--save_every', '1', '--resume')
    assert 'dropped the torn last line' in capsys.readouterr().out
    assert [row['step'] for row in _rows(r)] == [1, 2, 3]
    lines = open(r / 'metrics.jsonl').read().split('\n')  # a bad line elsewhere is named, not guessed at
    open(r / 'metrics.jsonl', 'w').write('\n'.join([lines[0], '{"st', *lines[1:]]))
    with pytest.raises(UserError, match='metrics.jsonl line 2 is not JSON'):
        run_train(r, '--max_steps', '4', '--save_every', '1', '--resume')


def test_a_full_disk_during_a_save_keeps_the_previous_save(tmp_path, monkeypatch):
    r = tmp_path / 'r'
    run_train(r, '--max_steps', '1', '--save_every', '1')
    before = latest_weights(r)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(checkpoint.torch, 'save', full)  # state.pt, the last file of a save
    code = cli.run(lambda a: run_train(r, *a), ['--max_steps', '2', '--save_every', '1', '--resume'],
                   errors=(ValueError,))
    assert code == 2
    assert sorted(d for d in os.listdir(r) if 'step' in d) == ['step_000001']  # no temp save left over
    assert all(torch.equal(before[k], v) for k, v in latest_weights(r).items())
    monkeypatch.undo()
    run_train(r, '--max_steps', '2', '--save_every', '1', '--resume')  # space again: it continues
    assert [row['step'] for row in _rows(r)] == [1, 2]


def test_full_disk_message_names_the_path(tmp_path, monkeypatch, capsys):
    r = tmp_path / 'r'

    def full(*a, **k):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(checkpoint.torch, 'save', full)
    assert cli.run(lambda a: run_train(r, *a), ['--max_steps', '1'], errors=(ValueError,)) == 2
    err = capsys.readouterr().err
    assert 'no space left on the device while writing the save' in err and '.tmp_step_000001' in err
    assert 'there was no earlier save' in err and sum(line.startswith('error: ') for line in err.splitlines()) == 1


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_train(tmp_path / 'r', '--max_steps', '2', '--save_every', '1', '--grid_every', '1',
                  '--lora_rank', '2', '--cfg_scale', '1.0')
    finally:
        os.umask(old)
    modes = {os.path.relpath(os.path.join(d, f), tmp_path): oct(os.stat(os.path.join(d, f)).st_mode & 0o777)
             for d, _, fs in os.walk(tmp_path / 'r') for f in fs}
    assert 'r/step_000002/model.safetensors' in modes and 'r/step_000002/adapter_model.safetensors' in modes
    assert 'r/grid_00002.png' in modes and 'r/metrics.jsonl' in modes
    assert set(modes.values()) == {'0o644'}, modes

# -----------------------------------------------------------------------------
# nothing lost, third ring (issue 23): a second --overwrite, lost log rows, a damaged newest save, torch.save's
# own full-disk error


def _killed_before_its_first_save(monkeypatch, r, *args):
    """A run that dies just before its first save (as kill -9 would leave it, the lock aside)."""
    def die(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'save_checkpoint', die)
    with pytest.raises(KeyboardInterrupt):
        run_train(r, *args)
    monkeypatch.undo()


def test_a_second_overwrite_before_a_save_never_deletes_the_replaced_run(tmp_path, monkeypatch):
    r = tmp_path / 'r'
    run_train(r, '--max_steps', '2', '--save_every', '1')
    original = latest_weights(r)
    _killed_before_its_first_save(monkeypatch, r, '--max_steps', '1', '--overwrite')
    _killed_before_its_first_save(monkeypatch, r, '--max_steps', '1', '--overwrite')
    kept = lambda d: load_file(os.path.join(d, 'latest', 'model.safetensors'))
    assert all(torch.equal(original[k], v) for k, v in kept(r / '.replaced').items())  # still the only copy
    assert [row['step'] for row in _rows(r / '.replaced_2')] == [1]  # the first replacement's row, beside it
    with pytest.raises(UserError, match=r'holds a run \(.*the run --overwrite moved to .replaced'):
        run_train(r, '--max_steps', '1')  # a fresh run's first save would delete it: refused
    with pytest.raises(UserError, match=r'no checkpoint in .*\.replaced'):
        run_train(r, '--max_steps', '1', '--resume')
    run_train(r, '--max_steps', '1', '--overwrite')  # the new run saves: now the replaced runs go
    assert sorted(os.listdir(r)) == ['.lock', 'latest', 'metrics.jsonl', 'reward_curve.png', 'run.json', 'step_000001']


def test_a_resume_refused_creates_no_folder_and_no_lock(tmp_path):
    for r in (tmp_path / 'absent', tmp_path / 'empty'):
        if r.name == 'empty':
            r.mkdir()
        with pytest.raises(UserError, match='no checkpoint in'):
            run_train(r, '--max_steps', '1', '--resume')
    assert os.listdir(tmp_path) == ['empty'] and os.listdir(tmp_path / 'empty') == []


def test_log_rows_the_log_lost_come_back_from_the_save(tmp_path, capsys):
    """metrics.jsonl cut to 2 rows, deleted, or its last row (of a saved step) torn: --resume restores each row
    from the copy in the newest save, so the log ends whole, as an uninterrupted run's (same steps, same rewards)."""
    run_train(tmp_path / 'ref', '--max_steps', '9', '--save_every', '3')
    r, strip = tmp_path / 'r', lambda rows: [(row['step'], row['reward']) for row in rows]
    run_train(r, '--max_steps', '6', '--save_every', '3')
    lines = open(r / 'metrics.jsonl').readlines()
    open(r / 'metrics.jsonl', 'w').writelines(lines[:2])  # cut
    run_train(r, '--max_steps', '7', '--save_every', '3', '--resume')
    os.remove(r / 'metrics.jsonl')  # deleted
    run_train(r, '--max_steps', '8', '--save_every', '3', '--resume')
    lines = open(r / 'metrics.jsonl').readlines()
    open(r / 'metrics.jsonl', 'w').writelines(lines[:-1] + [lines[-1][:15]])  # torn row of saved step 8
    run_train(r, '--max_steps', '9', '--save_every', '3', '--resume')
    out = capsys.readouterr().out
    assert 'restored the rows of steps 3-6' in out and 'restored the rows of steps 1-7' in out
    assert 'restored the row of step 8' in out
    assert strip(_rows(r)) == strip(_rows(tmp_path / 'ref'))
    # a save without the copy (an older save): the hole is named, not kept silent
    os.remove(r / 'step_000009' / 'metrics.jsonl')
    lines = open(r / 'metrics.jsonl').readlines()
    open(r / 'metrics.jsonl', 'w').writelines(lines[:4])
    run_train(r, '--max_steps', '9', '--save_every', '3', '--resume')  # nothing left to do: still said
    assert 'has no row for steps 5-9' in capsys.readouterr().out


def _damage(path):
    """model.safetensors: bytes overwritten in the middle (its checksum catches it); else cut in half (torn)."""
    with open(path, 'r+b') as f:
        if str(path).endswith('.safetensors'):
            f.seek(os.path.getsize(path) // 2)
            f.write(b'\x00garbage\xff' * 8)
        else:
            f.truncate(os.path.getsize(path) // 2)


def test_a_damaged_newest_save_never_advises_deleting_the_only_copy(tmp_path, capsys):
    r = tmp_path / 'r'
    run_train(r, '--max_steps', '3', '--save_every', '1')  # saves 2 and 3 are kept
    assert sorted(d for d in os.listdir(r) if d.startswith('step_')) == ['step_000002', 'step_000003']
    for f in ('state.pt', 'model.safetensors', 'dcp/__0_0.distcp'):
        backup = (r / 'step_000003' / f).read_bytes()
        _damage(r / 'step_000003' / f)
        with pytest.raises(UserError, match='resume from the older save step_000002') as e:
            run_train(r, '--max_steps', '3', '--save_every', '1', '--resume')  # nothing left to do: still checked
        assert 'delete' not in str(e.value)
        (r / 'step_000003' / f).write_bytes(backup)
    os.rename(r / 'step_000003', tmp_path / 'moved')  # as advised: the older save resumes
    run_train(r, '--max_steps', '3', '--save_every', '1', '--resume')
    assert [row['step'] for row in _rows(r)] == [1, 2, 3]
    one = tmp_path / 'one'
    run_train(one, '--max_steps', '1', '--save_every', '1')
    _damage(one / 'step_000001' / 'model.safetensors')
    with pytest.raises(UserError, match="model.safetensors is truncated or corrupt.*only save: keep it") as e:
        run_train(one, '--max_steps', '1', '--resume')
    assert 'delete' not in str(e.value)


def test_torch_saves_own_short_write_is_a_full_disk_sentence(tmp_path, monkeypatch, capsys):
    """torch.save's zip writer on a full disk raises RuntimeError ('inline_container.cc ... unexpected pos'), not
    OSError. The writer is made to fail for real: a file-size limit of 100 bytes while it writes state.pt."""
    import resource
    r = tmp_path / 'r'
    run_train(r, '--max_steps', '1', '--save_every', '1')
    before, real = latest_weights(r), torch.save

    def short_write(*a, **k):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
        try:
            return real(*a, **k)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)
    monkeypatch.setattr(checkpoint.torch, 'save', short_write)
    code = cli.run(lambda a: run_train(r, *a), ['--max_steps', '2', '--save_every', '1', '--resume'])
    err = capsys.readouterr().err
    assert code == 2 and sum(line.startswith('error: ') for line in err.splitlines()) == 1, err
    assert 'Traceback' not in err and 'inline_container' not in err
    assert 'no space left on the device while writing the save' in err and '.tmp_step_000002 (removed)' in err
    assert 'the previous save step_000001 is intact' in err
    assert sorted(d for d in os.listdir(r) if 'step' in d) == ['step_000001']  # no temp save left over
    assert all(torch.equal(before[k], v) for k, v in latest_weights(r).items())
    with pytest.raises(UserError, match='no space left on the device while writing .*x.pt'):  # any other torch.save
        with cli.disk_full_is_one_sentence(str(tmp_path / 'x.pt')):
            short_write({'x': torch.zeros(1000)}, str(tmp_path / 'x.pt'))
