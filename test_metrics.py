"""
test_metrics.py -- metrics.py: sharded, resumable FID sampling (every image once, any rank count, kill and
resume), the metric math against numpy, the Inception adapter, and the paired reward benchmark.
"""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tfi
from PIL import Image

import checkpoint
import cli
import fid
import metrics
import sample
import train
from cli import UserError, parse_config
from conftest import HERE, run_train
from rewards import build_reward


def _fid_args(ckpts, npz, *more):
    """FID sampling of the tiny fixtures: 4 classes x 2 images, 8x8 px, batch 3 -> shards of 3, 3, 2."""
    return ['--ckpt', ckpts['c2i'], '--vq_ckpt', ckpts['vq'], '--device', 'cpu', '--class', '0', '1', '2', '3',
            '--per_class', '2', '--batch', '3', '--eval_size', '0', '--npz', str(npz), *more]


@pytest.fixture(scope='session')
def fid_single(ckpts, tmp_path_factory):
    """The reference: one process, images and labels of the merged npz."""
    npz = tmp_path_factory.mktemp('fid') / 'single.npz'
    sample.main(_fid_args(ckpts, npz))
    z = np.load(npz)
    return z['arr_0'], z['arr_1']


def test_fid_sharding_every_pair_once_for_1_2_3_ranks(ckpts, fid_single, tmp_path, monkeypatch):
    single, labels = fid_single
    assert single.shape == (8, 8, 8, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    written = []
    real_write = metrics.write_shard
    monkeypatch.setattr(metrics, 'write_shard', lambda p, im, lab, idx: (written.append(idx.tolist()),
                                                                         real_write(p, im, lab, idx)))
    for world in (1, 2, 3):  # every rank's share in turn, in this process, then rank 0's merge
        npz = tmp_path / f'w{world}.npz'
        cfg = parse_config(sample.SampleConfig, _fid_args(ckpts, npz))
        ids = cfg.validate()
        gpt, vq = sample.load_models(cfg, ids, 'cpu')
        metrics.prepare_shards(cfg, ids)
        per_rank = []
        for rank in range(world):
            written.clear()
            metrics.sample_shards(cfg, gpt, vq, np.repeat(ids, 2), rank, world, 'cpu')
            per_rank.append(sorted(i for idx in written for i in idx))
        assert sorted(i for r in per_rank for i in r) == list(range(8))  # each (class, index) exactly once
        assert all(per_rank)  # 3 shards: every rank had work
        metrics.merge_shards(cfg, np.repeat(ids, 2))
        z = np.load(npz)
        assert np.array_equal(z['arr_0'], single) and np.array_equal(z['arr_1'], labels)
        assert not os.path.exists(str(npz) + '.shards')  # merged, then removed
        # read back the way the ADM evaluator streams it (npy header in the zip, then raw batches)
        assert np.array_equal(np.concatenate(list(metrics.image_batches(str(npz), 5))), single)


def test_batch_size_does_not_change_the_images(ckpts, fid_single, tmp_path, monkeypatch):
    """Another --batch runs the GPT and the VQ decoder at other batch shapes, where a CPU's kernels may round
    differently (AVX-512 did, by one grey level in one pixel of 1536). What holds by construction is that every
    image draws its tokens from its own uniform numbers: the tokens are the same, and the pixels within one grey
    level. (Across world sizes the shards, and so the shapes, are the same: there the npz is bitwise equal.)"""
    single, _ = fid_single
    real_decode, tokens = metrics.decode_uint8, {}
    monkeypatch.setattr(metrics, 'decode_uint8', lambda vq, t, size=0: (tokens[batch].append(t), real_decode(vq, t, size))[1])
    for batch in ('3', '1', '8'):
        tokens[batch] = []
        npz = tmp_path / f'b{batch}.npz'
        sample.main(_fid_args(ckpts, npz, '--batch', batch))
        images = np.load(npz)['arr_0']
        assert np.abs(images.astype(int) - single.astype(int)).max() <= 1, batch
        assert torch.equal(torch.cat(tokens[batch]), torch.cat(tokens['3'])), batch
    # resized for FID as LlamaGen: bicubic to eval_size, then rounded
    sample.main(_fid_args(ckpts, tmp_path / 'r.npz', '--eval_size', '12', '--class', '0', '--per_class', '1'))
    assert np.load(tmp_path / 'r.npz')['arr_0'].shape == (1, 12, 12, 3)


def test_killed_run_resumes_without_duplicates_or_gaps(ckpts, fid_single, tmp_path, monkeypatch):
    single, _ = fid_single
    npz = tmp_path / 'k.npz'
    calls = []
    real_write = metrics.write_shard

    def killed_after_two(path, *a):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run dies after 2 of its 3 shards
        calls.append(path)
        real_write(path, *a)
    monkeypatch.setattr(metrics, 'write_shard', killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        sample.main(_fid_args(ckpts, npz))
    assert not npz.exists() and len(os.listdir(str(npz) + '.shards')) == 3  # 2 shards + settings.json
    # another seed with the shards still there: refused before anything loads
    with pytest.raises(UserError, match='other settings'):
        sample.main(_fid_args(ckpts, npz, '--seed', '1'))
    monkeypatch.setattr(metrics, 'write_shard', lambda path, *a: (calls.append(path), real_write(path, *a)))
    sample.main(_fid_args(ckpts, npz))  # continues: only the missing shard is sampled
    assert len(calls) == 3 and len(set(calls)) == 3, calls
    z = np.load(npz)
    assert np.array_equal(z['arr_0'], single)


def test_torchrun_two_ranks_match_one_process(ckpts, fid_single, tmp_path):
    single, labels = fid_single
    npz = tmp_path / 't.npz'
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                        'sample.py', *_fid_args(ckpts, npz)], cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    z = np.load(npz)
    assert np.array_equal(z['arr_0'], single) and np.array_equal(z['arr_1'], labels)


def test_inception_score_matches_numpy():
    g = np.random.default_rng(1)
    logits = g.normal(size=(120, 7)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in (p[:50], p[50:100], p[100:]):  # split_size 50: 50, 50, 20
        py = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * np.log(q / py)) for q in part])))
    assert metrics.inception_score(logits, split_size=50) == pytest.approx(np.mean(scores), rel=1e-10)
    assert metrics.inception_score(np.repeat(np.eye(5) * 60, 4, 0)) == pytest.approx(5, rel=1e-6)  # 5 sure classes


def test_precision_recall_toy_set():
    # 1-D, k = 3. Reference points 0..9: the k-th neighbour (self = 0th) is 2 away inside, 3 at the ends.
    # Samples: five near the reference at 0.1 .. 4.1 and five far away at 100 .. 104.
    ref = np.arange(10.0)[:, None]
    samples = np.concatenate([np.arange(5) + 0.1, np.arange(5) + 100.0])[:, None]
    precision, recall = metrics.precision_recall(ref, samples)
    assert precision == 0.5  # exactly the five near samples lie in some reference ball
    # the sample at 4.1 has radius 3 (to 1.1), reaching 7.1: references 0..7 are covered, 8 and 9 are not
    assert recall == 0.8
    assert metrics.precision_recall(ref, ref) == (1.0, 1.0)


class _TinyExtractor(torch.nn.Module):
    """A random-weight stand-in for TFInception: the same input (uint8) and output keys, no download."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        h = self.conv((x.float() - 128) / 128).relu()  # (B, 6, h, w)
        pool = h.mean((2, 3))
        return dict(pool=pool, logits=self.fc(pool), spatial=h[:, :2, :3, :3].flatten(1))


def test_metrics_end_to_end_tiny_extractor(tmp_path):
    g = np.random.default_rng(0)
    fake = g.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    real = np.clip(g.normal(128, 40, size=(30, 16, 16, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / 'fake.npz', arr_0=fake)
    np.savez(tmp_path / 'real_images.npz', arr_0=real)
    (tmp_path / 'real').mkdir()
    for i, im in enumerate(real):
        Image.fromarray(im).save(tmp_path / 'real' / f'{i:03d}.png')
    ex = _TinyExtractor().eval()
    f = metrics.extract(ex, [fake[:25], fake[25:]])
    r = metrics.extract(ex, [real])
    mu_s, sig_s = fid.mean_cov(r['spatial'])
    np.savez(tmp_path / 'adm_ref.npz', arr_0=real, mu=r['pool'].mean(0), sigma=np.cov(r['pool'], rowvar=False),
             mu_s=mu_s, sigma_s=sig_s)  # an ADM-style reference batch: statistics plus images
    expect = dict(fid=fid.frechet_distance(*fid.mean_cov(f['pool']), *fid.mean_cov(r['pool'])),
                  sfid=fid.frechet_distance(*fid.mean_cov(f['spatial']), mu_s, sig_s),
                  inception_score=metrics.inception_score(f['logits']),
                  precision=metrics.precision_recall(r['pool'], f['pool'])[0])
    for ref in ('real_images.npz', 'real', 'adm_ref.npz'):  # images in an npz, a folder, precomputed statistics
        got = metrics.compute_metrics(str(tmp_path / 'fake.npz'), str(tmp_path / ref), ex, batch=7)
        assert got['n_samples'] == 40 and got['n_reference'] == 30
        for k, v in expect.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (ref, k)
    same = metrics.compute_metrics(str(tmp_path / 'fake.npz'), str(tmp_path / 'fake.npz'), ex)
    assert abs(same['fid']) < 1e-6 and same['precision'] == same['recall'] == 1.0
    # degenerate sets are one sentence, never a crash of the eigen-solver (it segfaulted on NaN)
    np.savez(tmp_path / 'three.npz', arr_0=fake[:3])  # FID yes; precision/recall need more than k = 3 points
    assert 'precision' not in metrics.compute_metrics(str(tmp_path / 'three.npz'), str(tmp_path / 'real'), ex)
    nan = lambda x: {k: v * float('nan') for k, v in ex(x).items()}
    with pytest.raises(UserError, match='features of samples are not finite'):
        metrics.compute_metrics(str(tmp_path / 'fake.npz'), str(tmp_path / 'real'), nan)
    with pytest.raises(ValueError, match='not finite'):
        fid.frechet_distance(*fid.mean_cov(f['pool'][:1]), *fid.mean_cov(r['pool']))  # one image: NaN covariance


def test_tf_inception_adapter_shapes(monkeypatch):
    # torch-fidelity's network with random weights (the real ones cannot be downloaded here): the adapter's
    # three outputs have the ADM evaluator's sizes, 2048 / 1008 / 17 * 17 * 7 = 2023
    monkeypatch.setattr(tfi, 'load_state_dict_from_url', lambda *a, **k: {})
    monkeypatch.setattr(tfi.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, sd: None)
    net = metrics.TFInception(None).eval()
    out = net(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8))
    assert {k: tuple(v.shape) for k, v in out.items()} == dict(pool=(2, 2048), logits=(2, 1008), spatial=(2, 2023))
    assert (out['spatial'] >= 0).all() and out['spatial'].dtype == torch.float32  # a ReLU output


def test_inception_offline_and_cli_errors(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'th'))

    def offline(*a, **k):
        raise OSError('no network')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(metrics.WeightsMissing) as e:
        metrics.load_inception()
    assert '\n' not in str(e.value) and '--inception' in str(e.value) and 'weights-inception' in str(e.value)
    np.savez(tmp_path / 's.npz', arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / 'junk.npz').write_bytes(b'not a zip')
    (tmp_path / 'empty').mkdir()
    np.savez(tmp_path / 'other.npz', x=np.zeros(3))
    for argv, msg in [([str(tmp_path / 's.npz'), str(tmp_path / 'nope.npz')], 'does not exist'),
                      ([str(tmp_path / 'junk.npz'), str(tmp_path / 's.npz')], 'is not an .npz with images'),
                      ([str(tmp_path / 's.npz'), str(tmp_path / 'other.npz')], 'or ADM statistics'),
                      ([str(tmp_path / 's.npz'), str(tmp_path / 'empty')], 'holds no .png'),
                      ([str(tmp_path / 'empty'), str(tmp_path / 's.npz')], 'is a folder'),
                      ([str(tmp_path / 's.npz'), str(tmp_path / 's.npz'), '--batch', '0'], '--batch'),
                      ([str(tmp_path / 's.npz'), str(tmp_path / 's.npz'), '--inception', 'x.pth'], '--inception')]:
        with pytest.raises((UserError, metrics.WeightsMissing), match=msg):
            metrics.main(argv)


def test_paired_eval_of_a_checkpoint_against_itself_is_zero(tmp_path):
    run_train(tmp_path / 'run', '--max_steps', '1', '--beta', '0')  # a checkpoint to compare
    ck = str(tmp_path / 'run' / 'latest' / 'model.safetensors')
    common = ['--eval', '--eval_conds', '3', '--eval_images', '2', '--beta', '0']
    s = run_train(tmp_path / 'self', '--ckpt', ck, '--eval_ckpt', ck, *common)
    for r, p in s['paired'].items():
        assert p == dict(diff=0.0, se=0.0, win_rate=0.5), r
        assert s['base'][r] == s['tuned'][r]
    grid = np.asarray(Image.open(tmp_path / 'self' / 'eval_side_by_side.png'))
    half = (grid.shape[1] - 8) // 2
    assert np.array_equal(grid[:, :half], grid[:, -half:])  # same seeds: the two sides are the same images
    assert json.load(open(tmp_path / 'self' / 'eval.json'))['paired']['reward']['win_rate'] == 0.5
    # random init against the trained step: the base side equals a single-model evaluation on the same seeds
    both = run_train(tmp_path / 'both', '--eval_ckpt', ck, *common)
    alone = run_train(tmp_path / 'alone', *common)
    assert both['base'] == alone['base'] and 'paired' not in alone
    for r, p in both['paired'].items():
        assert p['diff'] == pytest.approx(both['tuned'][r]['mean'] - both['base'][r]['mean'], abs=1e-12)


def test_reward_eval_shards_are_the_whole(tmp_path):
    # conditions i = rank, rank + world, ...: two ranks' shares together are the one-rank result, exactly
    cfg = parse_config(train.TrainConfig, ['--preset', 'demo_color', '--image_size', '8', '--eval', '--eval_images', '2'],
                       presets=train.TRAIN_PRESETS)
    policy, _, vq = checkpoint.load_training_models(cfg, torch.device('cpu'))
    reward_fn = build_reward(cfg.rewards)
    models, conds = {'base': policy}, list(range(5))
    run = lambda rank, world: metrics.score_conditions(cfg, models, vq, reward_fn, conds, None, torch.device('cpu'),
                                                       rank, world)
    one, two = run(0, 1), sorted(run(0, 2) + run(1, 2), key=lambda r: r[0])
    assert [r[0] for r in one] == [r[0] for r in two] == conds
    for (_, s1, p1), (_, s2, p2) in zip(one, two):
        assert all(np.array_equal(s1['base'][k], s2['base'][k]) for k in s1['base'])
        assert np.array_equal(p1['base'], p2['base'])


def test_mean_se_and_paired_by_hand():
    x = np.array([[1.0, 3.0], [2.0, 2.0], [6.0, 4.0]])  # condition means 2, 2, 5
    m, se = metrics.mean_se(x)
    assert m == pytest.approx(3.0) and se == pytest.approx(np.std([2, 2, 5], ddof=1) / np.sqrt(3))
    p = metrics.paired(x, x + np.array([[1.0, -1.0], [0.0, 2.0], [0.5, 0.5]]))
    assert p['win_rate'] == pytest.approx((1 + 0 + 0.5 + 1 + 1 + 1) / 6)
    assert p['diff'] == pytest.approx(np.mean([0, 1, 0.5]))


# -----------------------------------------------------------------------------
# FID sampling never loses work: one writer per --npz, a full disk, a finished npz, torn or stale shards


def test_one_writer_per_npz(ckpts, tmp_path):
    npz = tmp_path / 'x.npz'
    cfg = parse_config(sample.SampleConfig, _fid_args(ckpts, npz))
    with cli.exclusive(metrics.npz_lock(cfg), '--npz', str(npz)):  # another run holds it (this very process)
        with pytest.raises(UserError, match=rf'--npz {npz} is in use by another run \(pid {os.getpid()}\)'):
            sample.main(_fid_args(ckpts, npz))
    assert sorted(os.listdir(tmp_path)) == ['.x.npz.lock']  # no shards, no npz


def test_full_disk_while_sampling_keeps_whole_shards_and_resumes(ckpts, fid_single, tmp_path, monkeypatch):
    npz = tmp_path / 'x.npz'
    real, calls = metrics.save_npz, []

    def second_is_full(path, **arrays):
        calls.append(path)
        if len(calls) == 2:
            with open(path, 'wb') as f:
                f.write(b'PK half a shard')
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(path, **arrays)
    monkeypatch.setattr(metrics, 'save_npz', second_is_full)
    with pytest.raises(UserError, match=r'no space left on the device while writing .*000001\.npz'):
        sample.main(_fid_args(ckpts, npz))
    shards = sorted(os.listdir(str(npz) + '.shards'))
    assert shards == ['000000.npz', 'settings.json'] and not any('tmp' in f for f in os.listdir(tmp_path))
    monkeypatch.undo()
    sample.main(_fid_args(ckpts, npz))  # space again: the same command samples the missing shards only
    assert np.array_equal(np.load(npz)['arr_0'], fid_single[0])


def test_a_finished_npz_and_stale_shards_are_never_lost(ckpts, fid_single, tmp_path):
    npz = tmp_path / 'x.npz'
    sample.main(_fid_args(ckpts, npz))
    with pytest.raises(UserError, match='already exists'):  # a second sampling into a finished npz
        sample.main(_fid_args(ckpts, npz, '--seed', '3'))
    sample.main(_fid_args(ckpts, npz, '--seed', '3', '--overwrite'))  # asked: replaced once the new one is whole
    sample.main(_fid_args(ckpts, tmp_path / 'y.npz', '--seed', '3'))
    assert np.array_equal(np.load(npz)['arr_1'], np.load(tmp_path / 'y.npz')['arr_1'])
    assert np.array_equal(np.load(npz)['arr_0'], np.load(tmp_path / 'y.npz')['arr_0'])
    # shards of another configuration: refused; --no-resume keeps them aside until the first new shard
    other = tmp_path / 'o.npz'
    shards = tmp_path / 'o.npz.shards'
    shards.mkdir()
    (shards / 'settings.json').write_text('{"seed": 99')  # torn by a kill
    with pytest.raises(UserError, match='cannot be read'):
        sample.main(_fid_args(ckpts, other))
    (shards / 'settings.json').write_text(json.dumps({'seed': 99}))
    (shards / '000000.npz').write_bytes(b'an old shard')
    with pytest.raises(UserError, match='other settings'):
        sample.main(_fid_args(ckpts, other))
    seen = []
    real = metrics.write_shard
    metrics.write_shard = lambda *a: (seen.append(os.path.isfile(tmp_path / 'o.npz.shards.replaced' / '000000.npz')),
                                      real(*a))
    try:
        sample.main(_fid_args(ckpts, other, '--no-resume'))
    finally:
        metrics.write_shard = real
    assert seen[0] and not os.path.exists(tmp_path / 'o.npz.shards.replaced')  # kept until a new shard was whole
    assert np.array_equal(np.load(other)['arr_0'], fid_single[0])


def test_metrics_on_16px_miniature_images_against_a_heldout_npz(tmp_path, monkeypatch):
    """The miniature's case: samples_tuned.npz against the world's heldout.npz, both 16 px in the ADM layout (labels
    in arr_1), through torch-fidelity's network (random weights here: the real ones cannot be downloaded), which
    resizes them to 299 inside. The command's numbers are the metric math on the features the network gave. Only
    16 of the feature dimensions are kept, and three images a side: a 2048-d eigen-solve and a 299-px forward each
    cost seconds to minutes on a busy 2-core CPU (precision/recall need more than k = 3 images)."""
    import world
    from miniature import save_adm
    samples, held = world.make_split(3, 1, 16), world.make_split(3, 2, 16)
    save_adm(str(tmp_path / 'samples_tuned.npz'), *samples)
    save_adm(str(tmp_path / 'heldout.npz'), *held)
    monkeypatch.setattr(tfi, 'load_state_dict_from_url', lambda *a, **k: {})
    monkeypatch.setattr(tfi.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, sd: None)
    torch.manual_seed(0)
    net = metrics.TFInception(None).eval()
    seen, calls = [], []
    net.net.Conv2d_1a_3x3.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[1:])))

    def recorded(x):  # the network as the command calls it, 16 feature dimensions kept, inputs and outputs recorded
        out = {k: v if k == 'logits' else v[:, :16] for k, v in net(x).items()}
        calls.append((x.permute(0, 2, 3, 1).numpy().copy(), {k: v.double().numpy() for k, v in out.items()}))
        return out
    monkeypatch.setattr(metrics, 'load_inception', lambda path=None, device='cpu': recorded)
    got = metrics.main([str(tmp_path / 'samples_tuned.npz'), str(tmp_path / 'heldout.npz'), '--batch', '2',
                        '--out', str(tmp_path / 'm.json')])
    assert set(seen) == {(3, 299, 299)}  # every 16-px batch was resized to Inception's 299 px
    x = np.concatenate([c[0] for c in calls])
    feats = {k: np.concatenate([c[1][k] for c in calls]) for k in calls[0][1]}
    assert np.array_equal(x, np.concatenate([held[0], samples[0]]))  # the reference first, then the samples
    r, f = ({k: v[s] for k, v in feats.items()} for s in (slice(0, 3), slice(3, None)))
    want = dict(fid=fid.frechet_distance(*fid.mean_cov(f['pool']), *fid.mean_cov(r['pool'])),
                sfid=fid.frechet_distance(*fid.mean_cov(f['spatial']), *fid.mean_cov(r['spatial'])),
                inception_score=metrics.inception_score(f['logits']))
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12) and v > 0, k
    assert got['n_samples'] == 3 and 'precision' not in got and json.load(open(tmp_path / 'm.json')) == got
