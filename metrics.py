"""
metrics.py -- evaluation: how good are the images. FID, sFID, Inception Score, precision/recall against a
reference set (class-to-image, the paper's table); the sharded, resumable sampling of the 50,000 images they
need (sample.py --per_class); and a paired reward benchmark of two checkpoints (text-to-image, train.py --eval).

    python metrics.py samples.npz VIRTUAL_imagenet256_labeled.npz     # IS, FID, sFID, precision, recall
    python metrics.py samples.npz ref_images/ --out metrics.json       # a folder of reference images
    python metrics.py                                                   # smoke demo: random features, no network
    python train.py --preset t2i_xl --eval --eval_ckpt TUNED --prompts eval_prompts.jsonl   # reward benchmark

Image metrics follow the OpenAI/ADM evaluator (guided-diffusion evaluations/evaluator.py), which the paper and
LlamaGen report: InceptionV3 pool features (2048) for FID and precision/recall, the first 7 channels of the
17x17 `mixed_6/conv` map (2023 numbers) for sFID, softmax of the bias-free logits over splits of 5000 for IS,
k = 3 nearest-neighbour balls on squared distances for precision/recall (Kynkaanniemi et al. 2019), and the
reference batch's own `mu`/`sigma` (`mu_s`/`sigma_s`) when the .npz has them. The network is torch-fidelity's
port of the TF-Inception graph (bilinear resize to 299 as TF 1.x, (x - 128) / 128). How it departs: PyTorch
instead of TensorFlow, so numbers match the ADM evaluator closely but not to the last digit; the square root in
the Frechet distance comes from the eigenvalues of sigma1 @ sigma2 (as torchmetrics) instead of scipy's sqrtm;
distances for precision/recall are float32 (ADM tries float16 first). For paper-identical numbers run the ADM
evaluator on the same npz (see the README).

FID sampling follows LlamaGen's sample_c2i_ddp.py (bicubic resize of 384-px images to 256 before rounding, the
ADM evaluator's npz layout) and departs from it in three ways: every image has its own seed (seed, class,
index), so the npz does not depend on the number of ranks or the batch size; each finished batch is a shard on
disk, so a killed run continues where it stopped; the npz is written from the shards in one pass, without a
folder of 50,000 PNGs.

The reward benchmark samples `eval_images` images per condition (class or prompt) with a seed per condition,
shards the conditions over ranks, and reports every reward's mean +- standard error over conditions; with a
second checkpoint, both see the same seeds and it reports paired differences, their standard errors and the
tuned model's win rate, and writes a side-by-side grid (base left, tuned right) and a JSON summary.
"""
import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import distributed
from checkpoint import CheckpointError, load_gpt
from cli import (UserError, as_umask_allows, atomic_write, check_device, check_not_locked, check_writable_file,
                 disk_full_is_one_sentence, exclusive, parse_config, run, save_npz)
from conditions import encode_prompts
from fid import LooFID, frechet_distance, mean_cov
from model import generate, sample_logits
from plots import side_by_side
from tokenizer import to_uint8

# -----------------------------------------------------------------------------
# the metric math, on features (independent of the network, tested on random numbers); the Frechet
# distance itself is fid.py's


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) per consecutive split of `split_size` images, averaged over the splits
    (the ADM evaluator's splits; the original improved-GAN code used 10 splits). logits (N, K)."""
    p = torch.as_tensor(np.asarray(logits), dtype=torch.float64).softmax(-1)  # (N, K)
    scores = []
    for part in p.split(split_size):
        kl = (part * (part.log() - part.mean(0, keepdim=True).log())).sum(-1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def _sq_distances(a, b):
    """Squared Euclidean distances (len(a), len(b)) as the ADM evaluator: max(|a|^2 - 2 a.b + |b|^2, 0)."""
    return (a.square().sum(1)[:, None] - 2 * a @ b.T + b.square().sum(1)[None, :]).clamp_min(0)


def knn_radii(features, k=3, block=4096):
    """Squared distance of every point to its k-th nearest neighbour (the point itself is the 0-th)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    return torch.cat([_sq_distances(x[i:i + block], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), block)])


def precision_recall(ref, samples, k=3, block=4096):
    """Precision: the fraction of samples inside some reference point's k-NN ball; recall: the fraction of
    reference points inside some sample's ball (Kynkaanniemi et al. 2019, as the ADM evaluator). (N, D) each."""
    r, s = (torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in (ref, samples))
    r_rad, s_rad = knn_radii(r, k, block), knn_radii(s, k, block)

    def covered(points, centres, radii):  # (len(points),) bool: inside any ball
        return torch.cat([(_sq_distances(points[i:i + block], centres) <= radii[None]).any(1)
                          for i in range(0, len(points), block)])
    return covered(s, r, r_rad).double().mean().item(), covered(r, s, s_rad).double().mean().item()

# -----------------------------------------------------------------------------
# features: torch-fidelity's TF-Inception port, weights from the torch hub cache


INCEPTION_URL = ('https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/'
                 'weights-inception-2015-12-05-6726825d.pth')


class WeightsMissing(RuntimeError):
    """Inception weights that cannot be found or fetched; the message is one sentence for the user."""


class TFInception(torch.nn.Module):
    """uint8 images (B, 3, H, W) -> dict(pool (B, 2048), logits (B, 1008), spatial (B, 2023)) float32.
    `spatial` is the ReLU output of Mixed_6d's 1x1 branch (TF: mixed_6/conv), channels 0..6, flattened in
    TF's (h, w, c) order so that ADM reference batches' `mu_s`/`sigma_s` line up."""

    def __init__(self, weights_path):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        self.net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'],
                                               feature_extractor_weights_path=weights_path)
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: setattr(self, '_spatial', out))

    @torch.no_grad()
    def forward(self, x):
        pool, logits = self.net(x)
        spatial = self._spatial[:, :7].permute(0, 2, 3, 1).flatten(1).float()  # (B, 17 * 17 * 7)
        return dict(pool=pool, logits=logits, spatial=spatial)


def load_inception(path=None, device='cpu'):
    """TFInception from `path`, or the torch hub cache, or a download; offline and not cached: one sentence."""
    if path is None:
        path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(INCEPTION_URL))
        if not os.path.isfile(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, path, progress=False)  # temp file, then rename
            except Exception as e:
                raise WeightsMissing(f"the Inception weights {os.path.basename(INCEPTION_URL)} are not in {path} and "
                                     f"could not be downloaded ({type(e).__name__}); fetch {INCEPTION_URL} where "
                                     f"there is network into that folder, or pass --inception FILE") from None
    elif not os.path.isfile(path):
        raise WeightsMissing(f"--inception {path} does not exist; pass the torch-fidelity Inception .pth file")
    try:  # torch-fidelity unpickles the file in full: make sure first that it holds tensors only
        torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise WeightsMissing(f"{path} is not a plain state_dict of tensors ({type(e).__name__}); use "
                             f"{os.path.basename(INCEPTION_URL)} from torch-fidelity") from None
    return TFInception(path).to(device).eval()


@torch.no_grad()
def extract(extractor, batches, device='cpu'):
    """uint8 NHWC batches -> dict of (N, D) float64 numpy features, one batch on the device at a time."""
    out = {}
    for b in batches:
        x = torch.as_tensor(np.ascontiguousarray(b)).to(device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        for k, v in extractor(x).items():
            out.setdefault(k, []).append(v.double().cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp')


def npz_images(path):
    """The number of images in an .npz's `arr_0`, from its header (nothing else is read)."""
    with zipfile.ZipFile(path) as z, z.open('arr_0.npy') as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = read(f)[0]
    return shape[0] if shape else 0


def image_batches(source, batch=64):
    """uint8 NHWC batches from an .npz (`arr_0`) or a folder of images (same-size runs batched together)."""
    if os.path.isdir(source):
        names = sorted(f for f in os.listdir(source) if f.lower().endswith(IMAGE_EXTENSIONS))
        run = []
        for f in names:
            im = np.asarray(Image.open(os.path.join(source, f)).convert('RGB'))
            if run and (len(run) == batch or im.shape != run[0].shape):
                yield np.stack(run)
                run = []
            run.append(im)
        if run:
            yield np.stack(run)
        return
    with zipfile.ZipFile(source) as z, z.open('arr_0.npy') as f:  # streamed: 50k images need not fit in memory
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{source}: arr_0 must be uint8 images (N, H, W, 3), got {dtype} {shape}")
        for i in range(0, shape[0], batch):
            n = min(batch, shape[0] - i)
            yield np.frombuffer(bytearray(f.read(n * math.prod(shape[1:]))), np.uint8).reshape(n, *shape[1:])

# -----------------------------------------------------------------------------
# FID / sFID / IS / precision / recall of a sample set against a reference


def reference_stats(ref, extractor, device, batch):
    """(features or None, {'pool': (mu, sigma), 'spatial': (mu, sigma)}) of a reference .npz or folder.
    An ADM reference batch carries its statistics (`mu`, `sigma`, `mu_s`, `sigma_s`) and 10k images."""
    stats, feats = {}, None
    if not os.path.isdir(ref):
        z = np.load(ref)
        if 'mu' in z:
            stats['pool'] = (z['mu'], z['sigma'])
        if 'mu_s' in z:
            stats['spatial'] = (z['mu_s'], z['sigma_s'])
        if 'arr_0' not in z:
            return None, stats
    feats = extract(extractor, image_batches(ref, batch), device)
    for k in ('pool', 'spatial'):
        if k not in stats and k in feats:
            stats[k] = mean_cov(feats[k])
    return feats, stats


def check_image_set(path, flag, stats_ok):
    """Before any network loads: `path` is an .npz with at least 2 images `arr_0` (or, where stats_ok, ADM
    statistics `mu`/`sigma`), or, for a reference, a folder of images. Raises UserError naming `flag`."""
    usage = "; usage: python metrics.py SAMPLES.npz REF.npz|DIR" if flag in ('samples', 'ref') else ""
    if not path or not os.path.exists(path):
        raise UserError(f"{flag} {path!r} does not exist{usage}")
    if os.path.isdir(path):
        if not stats_ok:
            raise UserError(f"{flag} {path} is a folder; pass the .npz that sample.py --per_class wrote")
        if not any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(path)):
            raise UserError(f"{flag} {path} holds no .png/.jpg/.webp images; pass a folder of images or an .npz")
        return
    names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
    if 'arr_0.npy' not in names and not (stats_ok and 'mu.npy' in names):
        raise UserError(f"{flag} {path} is not an .npz with images `arr_0`" +
                        (" or ADM statistics `mu`/`sigma`" if stats_ok else "") +
                        "; write one with sample.py --per_class (or np.savez)")
    n = npz_images(path) if 'arr_0.npy' in names and 'mu.npy' not in names else 2
    if n < 2:  # before the Inception network is even loaded
        raise UserError(f"{flag} {path} holds {n} image(s); FID needs at least 2 (the covariance of one "
                        f"image is undefined)")


def compute_metrics(samples, ref, extractor, device='cpu', batch=64, split_size=5000, k=3):
    """All the ADM evaluator's numbers for an .npz of samples against a reference (.npz or folder). Precision
    and recall need more than k images on each side; a set too small, or features that are not finite, is one
    sentence (the covariance of one image is undefined, and the eigen-solver must never see a NaN)."""
    ref_feats, ref_stats = reference_stats(ref, extractor, device, batch)
    f = extract(extractor, image_batches(samples, batch), device)
    for name, feats in (('samples', f), ('ref', ref_feats or {})):
        for kind, x in feats.items():
            if len(x) < 2:
                raise UserError(f"{name} holds {len(x)} image(s); the Frechet distance needs at least 2")
            if not np.isfinite(x).all():
                raise UserError(f"the Inception {kind} features of {name} are not finite; check the images")
    out = dict(n_samples=len(f['pool']), inception_score=inception_score(f['logits'], split_size),
               fid=frechet_distance(*mean_cov(f['pool']), *ref_stats['pool']))
    if 'spatial' in f and 'spatial' in ref_stats:
        out['sfid'] = frechet_distance(*mean_cov(f['spatial']), *ref_stats['spatial'])
    if ref_feats is not None and min(len(ref_feats['pool']), len(f['pool'])) > k:  # the k-NN balls need > k points
        out['precision'], out['recall'] = precision_recall(ref_feats['pool'], f['pool'], k)
        out['n_reference'] = len(ref_feats['pool'])
    return out


def loo_fid_reward(fid_ref, decay, device, inception=None, batch=64):
    """The leave-one-out FID reward (fid.LooFID) of a real run: TF-Inception pool features of the decoded images
    (rounded to uint8, as the evaluator will see them), against the statistics of --fid_ref (an ADM reference
    batch's own mu/sigma, or the features of its images / of a folder of images)."""
    extractor = load_inception(inception, device)
    _, stats = reference_stats(fid_ref, extractor, device, batch)

    def features(images):  # (B, 3, H, W) in [-1, 1] -> (B, 2048)
        return extractor(to_uint8(images).to(device))['pool']
    return LooFID(features, *stats['pool'], decay=decay).to(device)


# -----------------------------------------------------------------------------
# FID sampling (sample.py --per_class): images in class-major order, image g seeded by (seed, g), batches as
# shards on disk, merged into the ADM evaluator's npz


def decode_uint8(vq, tokens, size=0):
    """tokens (B, T) -> images (B, S, S, 3) uint8. With a `size` other than the native one, the decoder
    output is first resized bicubically, as LlamaGen's sample_c2i_ddp.py does for FID (384 -> 256)."""
    side = math.isqrt(tokens.shape[1])  # the token grid is square
    with torch.no_grad():
        x = vq.decode(tokens.view(-1, side, side))  # (B, 3, H, W), about [-1, 1]
    if size and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode='bicubic')
    return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


FID_SETTINGS = ('ckpt', 'vq_ckpt', 'model', 'image_size', 'dtype', 'seed', 'cfg', 'cfg_interval', 'top_k', 'top_p',
                'temperature', 'per_class', 'batch', 'eval_size')  # what the images depend on


def fid_settings(cfg, ids):
    return json.loads(json.dumps({**{k: getattr(cfg, k) for k in FID_SETTINGS}, 'classes': ids}))


def shard_dir(cfg):
    return cfg.npz + '.shards'


def npz_lock(cfg):  # beside the target, hidden: .NAME.npz.lock
    return os.path.join(os.path.dirname(os.path.abspath(cfg.npz)), '.' + os.path.basename(cfg.npz) + '.lock')


def shard_path(cfg, s):
    return os.path.join(shard_dir(cfg), f'{s:06d}.npz')


def check_shards(cfg, ids):
    """Before loading: the shards of an interrupted run are reused only if made with the same settings, and a
    finished --npz is replaced only when asked. (They live beside --npz, whose folder validate() found writable.)"""
    check_not_locked(npz_lock(cfg), '--npz', cfg.npz)
    if os.path.isfile(cfg.npz) and not cfg.overwrite:
        raise UserError(f"--npz {cfg.npz} already exists (a finished sampling); choose another --npz, or pass "
                        f"--overwrite to replace it once the new one is complete")
    path = os.path.join(shard_dir(cfg), 'settings.json')
    if cfg.resume and os.path.isfile(path):
        try:
            old = json.load(open(path))
        except (OSError, ValueError):
            raise UserError(f"{path} cannot be read (torn by a kill or a full disk?); delete {shard_dir(cfg)} or "
                            f"pass --no-resume to start afresh (the old shards are kept until the first new one)"
                            ) from None
        new = fid_settings(cfg, ids)
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            raise UserError(f"{shard_dir(cfg)} holds shards of an interrupted run made with other settings "
                            f"({diff[0]}={old.get(diff[0])!r} there); use the same settings, or --no-resume to "
                            f"start afresh")


def image_seed(seed, g):
    """The seed of image g (its place in class-major order): the same whatever rank or batch draws it."""
    return seed * 2 ** 32 + g


def per_image_sampler(seeds, n_tokens, cfg, device):
    """A generate() sample_fn whose row i draws token j by inverse CDF from uniform j of seeds[i]'s stream."""
    u = torch.stack([torch.rand(n_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                     for s in seeds]).to(device)  # (B, T)
    columns = iter(u.unbind(1))  # generate() samples the tokens in order, one call per position
    return lambda logits: sample_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p, uniform=next(columns))


def write_shard(path, images, labels, index):
    """One shard, whole or not at all: a killed or out-of-space run leaves whole shards only."""
    try:
        with disk_full_is_one_sentence(path):
            save_npz(path + '.tmp', images=images, labels=labels, index=index)
            os.replace(path + '.tmp', path)
    finally:
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')


def sample_shards(cfg, gpt, vq, labels, rank, world, device):
    """This rank's shards (s = rank, rank + world, ...) that are not on disk yet."""
    from tqdm import tqdm
    starts = range(0, len(labels), cfg.batch)
    todo = [s for s in range(rank, len(starts), world) if not os.path.isfile(shard_path(cfg, s))]
    done = sum(min(cfg.batch, len(labels) - a) for s, a in enumerate(starts) if os.path.isfile(shard_path(cfg, s)))
    bar = tqdm(total=len(labels), initial=done, unit='img', disable=rank != 0, dynamic_ncols=True)
    for s in todo:
        a, b = starts[s], min(starts[s] + cfg.batch, len(labels))
        sampler = per_image_sampler([image_seed(cfg.seed, g) for g in range(a, b)], gpt.config.block_size, cfg, device)
        tokens, _ = generate(gpt, torch.as_tensor(labels[a:b], device=device), cfg_scale=cfg.cfg,
                             cfg_interval=cfg.cfg_interval, compile=cfg.compile, sample_fn=sampler)  # (b - a, T)
        write_shard(shard_path(cfg, s), decode_uint8(vq, tokens, cfg.eval_size), labels[a:b], np.arange(a, b))
        if rank == 0:  # a new shard is in place: the run --no-resume replaced can go
            shutil.rmtree(shard_dir(cfg) + '.replaced', ignore_errors=True)
        bar.update(min((b - a) * world, bar.total - bar.n))  # the ranks run in step: rank 0 counts for all
    bar.close()


def merge_shards(cfg, labels):
    """Check that the shards hold images 0..N-1 exactly once, in order, and stream them into one npz in the
    ADM evaluator's layout (uint8 NHWC `arr_0`, labels `arr_1`): temp file, then rename; then drop the shards."""
    paths = [shard_path(cfg, s) for s in range(-(-len(labels) // cfg.batch))]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{len(missing)} of {len(paths)} shards are missing (e.g. {missing[0]}); run the same "
                        f"command again to sample them")
    shape = (len(labels), *np.load(paths[0])['images'].shape[1:])  # (N, H, W, 3)
    seen = 0
    try:
        # stored, not compressed, as np.savez
        with disk_full_is_one_sentence(cfg.npz), zipfile.ZipFile(cfg.npz + '.tmp', 'w', allowZip64=True) as z:
            with z.open('arr_0.npy', 'w', force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, dict(descr='|u1', fortran_order=False, shape=shape))
                for p in paths:  # one shard in memory at a time
                    shard = np.load(p)
                    n = len(shard['index'])
                    if not (np.array_equal(shard['index'], np.arange(seen, seen + n)) and seen + n <= len(labels)
                            and np.array_equal(shard['labels'], labels[seen:seen + n])
                            and shard['images'].shape[1:] == shape[1:]):
                        raise UserError(f"shard {p} does not hold images {seen}.. of this run; delete "
                                        f"{shard_dir(cfg)} and sample again")
                    f.write(np.ascontiguousarray(shard['images']).tobytes())
                    seen += n
            with z.open('arr_1.npy', 'w') as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
        if seen != len(labels):
            raise UserError(f"the shards hold {seen} images, not {len(labels)}; delete {shard_dir(cfg)} and "
                            f"sample again")
    except BaseException:
        if os.path.exists(cfg.npz + '.tmp'):
            os.remove(cfg.npz + '.tmp')  # all or nothing
        raise
    as_umask_allows(cfg.npz + '.tmp')
    os.replace(cfg.npz + '.tmp', cfg.npz)
    shutil.rmtree(shard_dir(cfg))
    print(f"wrote {shape} uint8 images and their labels to {cfg.npz}")


def prepare_shards(cfg, ids):
    """Rank 0, before sampling: the shard folder, with the settings a resumed run is checked against. With
    --no-resume the old shards are moved aside (NPZ.shards.replaced), deleted once a new shard is in place."""
    if not cfg.resume and os.path.isdir(shard_dir(cfg)):
        shutil.rmtree(shard_dir(cfg) + '.replaced', ignore_errors=True)
        os.replace(shard_dir(cfg), shard_dir(cfg) + '.replaced')
    os.makedirs(shard_dir(cfg), exist_ok=True)
    atomic_write({os.path.join(shard_dir(cfg), 'settings.json'):
                  lambda tmp: Path(tmp).write_text(json.dumps(fid_settings(cfg, ids)))})


def sample_fid(cfg, gpt, vq, ids, rank, world, device):
    """--per_class images of every class, sharded over ranks; rank 0 merges them into cfg.npz. Rank 0 holds a
    lock on the target for the whole run (.NPZ.lock beside it): one writer per --npz."""
    labels = np.repeat(np.asarray(ids if ids is not None else range(gpt.config.num_classes), np.int64),
                       cfg.per_class)  # (N,) class-major
    lock = npz_lock(cfg)
    with contextlib.ExitStack() as stack:
        def take():
            os.makedirs(os.path.dirname(lock), exist_ok=True)
            stack.enter_context(exclusive(lock, '--npz', cfg.npz))
            prepare_shards(cfg, ids)
        distributed.rank0_decides(take, rank, world)
        sample_shards(cfg, gpt, vq, labels, rank, world, device)
        if world > 1:
            dist.barrier()
        if rank == 0:
            merge_shards(cfg, labels)
    return labels


# -----------------------------------------------------------------------------
# reward benchmark: every configured reward on fixed conditions and seeds, one or two checkpoints


def mean_se(per_cond):
    """(C, n) scores, n images for each of C conditions -> (mean, standard error). The error is over the
    condition means (images of one prompt are not independent); with one condition, over the images."""
    x = np.asarray(per_cond, dtype=np.float64)
    m = x.mean(1) if len(x) > 1 else x.ravel()
    return float(x.mean()), float(m.std(ddof=1) / math.sqrt(len(m))) if len(m) > 1 else 0.0


def paired(base, tuned):
    """Paired comparison of (C, n) scores drawn on the same seeds: mean and standard error of tuned - base,
    and the tuned model's win rate over image pairs (a tie counts half)."""
    d = np.asarray(tuned, np.float64) - np.asarray(base, np.float64)
    diff, se = mean_se(d)
    return dict(diff=diff, se=se, win_rate=float(((d > 0) + 0.5 * (d == 0)).mean()))


@torch.no_grad()
def sample_condition(cfg, gpt, vq, cond, mask, seed, device):
    """eval_images samples of one condition from a generator seeded by `seed` (the same for every
    checkpoint): images (n, 3, H, W) float in about [-1, 1]."""
    n = cfg.eval_images
    cond = cond.repeat_interleave(n, 0)
    mask = None if mask is None else mask.repeat_interleave(n, 0)
    gen = torch.Generator(device).manual_seed(seed)
    amp = torch.autocast('cuda', dtype=getattr(torch, cfg.dtype)) if device.type == 'cuda' else contextlib.nullcontext()
    with amp:  # as train.py's rollout, so the base model's numbers are those of a training-time evaluation
        tokens, _ = generate(gpt, cond, mask, cfg.cfg_scale, cfg.cfg_interval, cfg.temperature, cfg.top_k, cfg.top_p,
                             generator=gen, compile=cfg.compile)
        return vq.decode(tokens).float()


def eval_models(cfg, policy, vq, device):
    """{'base': policy} plus {'tuned': eval_ckpt} loaded to fit it (same vocabulary, grid and condition)."""
    models = {'base': policy}
    if cfg.eval_ckpt:
        tuned = load_gpt(cfg.eval_ckpt, preset=cfg.model, image_size=cfg.image_size, device=device,
                         downsample=vq.config.downsample, model_type=policy.config.model_type).eval()
        keys = ('model_type', 'vocab_size', 'block_size', 'cls_token_num', 'num_classes')
        bad = [k for k in keys if getattr(tuned.config, k) != getattr(policy.config, k)]
        if bad:
            raise UserError(f"--eval_ckpt {cfg.eval_ckpt} does not fit --ckpt {cfg.ckpt or 'random init'} "
                            f"({bad[0]} {getattr(tuned.config, bad[0])} vs {getattr(policy.config, bad[0])}); "
                            f"compare checkpoints of the same model")
        models['tuned'] = tuned
    return models


def score_conditions(cfg, models, vq, reward_fn, conds, t5, device, rank, world, keep_images=8):
    """This rank's share of the conditions (i = rank, rank + world, ...) -> [(i, {model: {reward: (n,)}},
    {model: uint8 images (n, H, W, 3)} for the first keep_images conditions)]."""
    out = []
    for i in range(rank, len(conds), world):
        c = conds[i]
        if isinstance(c, str):
            emb, mask = encode_prompts([c], *t5, max_length=models['base'].config.cls_token_num)
            cond, mask = emb.to(device), mask.to(device)
        else:
            cond, mask = torch.tensor([c], device=device), None
        scores, pics = {}, {}
        for name, gpt in models.items():
            images = sample_condition(cfg, gpt, vq, cond, mask, cfg.seed + i, device)
            total, raw = reward_fn(images, [c] * len(images))
            scores[name] = {k: v.float().cpu().numpy() for k, v in {'reward': total, **raw}.items()}  # (n,) each
            if i < keep_images:
                pics[name] = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        out.append((i, scores, pics))
    return out


def summarize(cfg, conds, results, verbose=True):
    """Gathered per-condition results -> the JSON summary (and the printed table)."""
    names = list(results[0][1])
    rewards = list(results[0][1]['base'])
    scores = {m: {r: np.stack([s[m][r] for _, s, _ in results]) for r in rewards} for m in names}  # (C, n)
    summary = dict(ckpt=cfg.ckpt or 'random init', eval_ckpt=cfg.eval_ckpt, conditions=len(conds),
                   images_per_condition=cfg.eval_images, seed=cfg.seed, seeds='seed + condition index',
                   **{m: {r: dict(zip(('mean', 'se'), mean_se(scores[m][r]))) for r in rewards} for m in names})
    if 'tuned' in names:
        summary['paired'] = {r: paired(scores['base'][r], scores['tuned'][r]) for r in rewards}
    if not verbose:
        return summary
    print(f"eval: {len(conds)} conditions x {cfg.eval_images} images, seeds {cfg.seed} + condition index")
    for r in rewards:
        line = '  '.join(f"{m} {summary[m][r]['mean']:.4f} +- {summary[m][r]['se']:.4f}" for m in names)
        if 'tuned' in names:
            p = summary['paired'][r]
            line += f"  tuned - base {p['diff']:+.4f} +- {p['se']:.4f}  win rate {p['win_rate']:.3f}"
        print(f"  {r:>14}: {line}")
    return summary


def reward_eval(cfg, policy, vq, reward_fn, prompts, t5, device, rank=0, world=1):
    """train.py --eval: sample, score, gather on rank 0, print; write eval.json (and eval_side_by_side.png
    with --eval_ckpt) into out_dir. Returns the summary dict (on every rank)."""
    pool = prompts if policy.config.model_type == 't2i' else (cfg.classes or list(range(policy.config.num_classes)))
    conds = pool[:cfg.eval_conds] if cfg.eval_conds else list(pool)
    models = eval_models(cfg, policy, vq, device)
    mine = score_conditions(cfg, models, vq, reward_fn, conds, t5, device, rank, world)
    everything = [None] * world
    if world > 1:
        dist.all_gather_object(everything, mine)
    else:
        everything = [mine]
    results = sorted((r for part in everything for r in part), key=lambda r: r[0])
    summary = summarize(cfg, conds, results, verbose=rank == 0)
    if rank == 0:
        text = json.dumps(summary, indent=1)
        outputs = {os.path.join(cfg.out_dir, 'eval.json'): lambda tmp: Path(tmp).write_text(text)}
        if 'tuned' in models:
            rows = [(p['base'], p['tuned']) for _, _, p in results if p]
            outputs[os.path.join(cfg.out_dir, 'eval_side_by_side.png')] = lambda tmp: side_by_side(rows, tmp)
        atomic_write(outputs)
        print(f"wrote {', '.join(outputs)}")
    return summary

# -----------------------------------------------------------------------------
# the command: python metrics.py SAMPLES.npz REF.npz|DIR


@dataclass
class MetricsConfig:
    samples: str = ''  # .npz of generated images (uint8 NHWC `arr_0`), e.g. from sample.py --per_class
    ref: str = ''  # reference: an ADM reference batch .npz (mu/sigma + images) or a folder of images
    inception: Optional[str] = None  # torch-fidelity Inception weights (.pth); None = torch hub cache / download
    device: Optional[str] = None  # None = cuda if available, else cpu
    batch: int = 64  # images per Inception forward
    split_size: int = 5000  # Inception Score split size (ADM: 5000)
    out: str = ''  # also write the numbers as JSON here; '' = print only

    def validate(self):
        check_image_set(self.samples, 'samples', stats_ok=False)
        check_image_set(self.ref, 'ref', stats_ok=True)
        if self.batch < 1 or self.split_size < 1:
            raise UserError(f"--batch and --split_size must be at least 1, got {self.batch} and {self.split_size}")
        check_device(self.device)
        if self.out:
            check_writable_file(self.out, '--out')


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pos = list(itertools.takewhile(lambda a: not a.startswith('--'), argv[:2]))  # SAMPLES REF, first, no flags
    argv = [x for k, v in zip(('--samples', '--ref'), pos) for x in (k, v)] + argv[len(pos):]
    cfg = parse_config(MetricsConfig, argv)
    cfg.validate()
    device = cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    out = compute_metrics(cfg.samples, cfg.ref, load_inception(cfg.inception, device), device, cfg.batch,
                          cfg.split_size)
    for k, v in out.items():
        print(f"{k}: {v}")
    if cfg.out:
        atomic_write({cfg.out: lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1))})
    return out

# -----------------------------------------------------------------------------
# smoke demo: the metric math on random features (no network, no weights)


def _demo():
    """The metric math on random features: no network, no weights."""
    g = np.random.default_rng(0)
    a, b = g.normal(size=(2000, 16)), g.normal(0.3, 1.0, size=(2000, 16))
    print(f"FID(a, a) = {abs(frechet_distance(*mean_cov(a), *mean_cov(a))):.1e}; FID(a, b shifted by 0.3) = "
          f"{frechet_distance(*mean_cov(a), *mean_cov(b)):.3f} (about 16 * 0.09 = 1.44)")
    print(f"IS of uniform logits = {inception_score(np.zeros((100, 10))):.3f} (1); of one-hot logits over 10 "
          f"classes = {inception_score(np.repeat(np.eye(10) * 50, 10, 0)):.3f} (10)")
    print("precision, recall of a against itself = (%.2f, %.2f); against b = (%.2f, %.2f)"
          % (*precision_recall(a, a), *precision_recall(a, b)))


if __name__ == '__main__':
    if len(sys.argv) == 1:
        _demo()
        sys.exit(0)
    sys.exit(run(main, errors=(ValueError, CheckpointError, WeightsMissing)))  # one sentence, exit 2
