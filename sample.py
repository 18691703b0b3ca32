"""
sample.py -- draw images from a LlamaGen generator (class ids/names or text prompts) into a PNG grid,
or, with --per_class, tens of thousands of them into one FID .npz, sharded over torchrun ranks.

Follows LlamaGen's autoregressive/sample/sample_c2i.py and sample_t2i.py: their sampling defaults
(c2i cfg 4.0, top_k 2000; t2i cfg 7.5, top_k 1000), FLAN-T5-XL captions of 120 tokens left-padded as
sample_t2i.py does, save_image's rounding. The grid has a row of --n images per condition. With --per_class
the images are drawn by metrics.py's sharded, resumable FID sampler (its docstring says how it departs from
LlamaGen's sample_c2i_ddp.py).

    python sample.py                          # LlamaGen's 8 demo classes with c2i_B_256 + vq_ds16_c2i
    python sample.py --class 207 "golden retriever" --n 4 --seed 0
    python sample.py --prompt "a blue Porsche 356 parked in front of a yellow brick wall"
    python sample.py --prompt "two yellow rings" --ckpt out/demo_t2i/tuned/latest/model.safetensors  # the miniature
    python sample.py --class 207 --ckpt out/run/latest/model.safetensors --npz samples.npz
    python sample.py --ckpt out/demo/tuned/latest/model.safetensors --class "warm disk" --n 8   # the miniature
    torchrun --nproc_per_node=8 sample.py --preset paper_c2i --ckpt c2i_XL_384 --per_class 50 --npz xl.npz
"""
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import distributed
from checkpoint import (CheckpointError, check_generator, check_pair, header_config, load_gpt, load_vq, peek_gpt_config,
                        vq_downsample)
from cli import UserError, atomic_write, check_device, check_writable_file, parse_config, run, save_npz
from conditions import class_ids, encode_prompts, load_t5
from memory import check_fits, sampling_bytes
from metrics import check_shards, decode_uint8, sample_fid
from model import GPT_PRESETS, generate
from plots import image_grid


# Evaluation settings as presets (flags override them): the paper's class-to-image evaluation and LlamaGen's own.
SAMPLE_PRESETS = {
    'paper_c2i': dict(cfg=2.0, top_k=0, top_p=1.0, temperature=1.0),  # AR-GRPO: cfg 2.0, no top-k
    'llamagen_c2i': dict(cfg=4.0, top_k=2000, top_p=1.0, temperature=1.0),  # LlamaGen sample_c2i(_ddp).py
}
DEMO_CLASSES = ['207', '360', '387', '974', '88', '979', '417', '279']  # LlamaGen sample_c2i.py's labels


@dataclass
class SampleConfig:
    preset: Optional[str] = field(default=None, metadata=dict(choices=list(SAMPLE_PRESETS)))  # sampling settings
    classes: List[str] = field(default_factory=list, metadata=dict(flag='--class'))  # c2i: ids or ImageNet names
    prompts: List[str] = field(default_factory=list, metadata=dict(flag='--prompt'))  # t2i: one or more prompts
    n: Optional[int] = None  # images per class / prompt (one grid row each); None = 4
    seed: int = 0  # seeds the sampling generator: same seed, same images
    cfg: Optional[float] = None  # CFG scale; None = the --ckpt's own, else 4.0 (c2i) / 7.5 (t2i); <= 1 = off
    cfg_interval: int = -1  # CFG for the first cfg_interval + 2 tokens only; -1 = every token
    top_k: Optional[int] = None  # None = the --ckpt's own, else 2000 (c2i) or 1000 (t2i); 0 = no top-k
    top_p: Optional[float] = None  # nucleus filtering; 1 = off; None = the --ckpt's own (a train.py save), else 1
    temperature: Optional[float] = None  # softmax temperature; 0 = greedy; None = the --ckpt's own, else 1
    ckpt: Optional[str] = None  # release, hf://OWNER/REPO/FILE or file; None = c2i_B_256 / t2i_XL_stage1_256
    vq_ckpt: Optional[str] = None  # VQ release or file; None = the --ckpt's own (its world's), else vq_ds16_c2i/t2i
    model: Optional[str] = field(default=None, metadata=dict(choices=list(GPT_PRESETS)))  # for a file w/o config
    image_size: Optional[int] = None  # pixels, for a file without config; None = the release's (or 256)
    t5: str = 'google/flan-t5-xl'  # t2i text encoder: Hub name or local save_pretrained directory
    device: Optional[str] = None  # None = cuda if available, else cpu
    dtype: Optional[str] = field(default=None, metadata=dict(choices=['float32', 'bfloat16', 'float16']))  # the GPT
    compile: bool = False  # torch.compile the decode step
    out: Optional[str] = None  # PNG grid; None = samples.png (none with --per_class); '' = none
    npz: Optional[str] = None  # images as uint8 NHWC `arr_0` (+ labels `arr_1`), the ADM FID evaluator's format
    # FID sampling: --per_class images of every class (or of the --class list), seeded per image
    per_class: Optional[int] = None  # images per class into --npz (default samples.npz); torchrun shards them
    batch: Optional[int] = None  # images per generate call (and per shard on disk); None = 32
    eval_size: Optional[int] = None  # pixels, bicubic resize as LlamaGen's FID; None = 256, 0 = native size
    resume: Optional[bool] = None  # keep the finished shards of an interrupted run (None = yes); --no-resume: afresh
    overwrite: bool = False  # replace an existing --npz (written whole at the end; --per_class: once complete)

    def __post_init__(self):  # defaults that depend on the condition, so the printed config is final
        t2i = bool(self.prompts)
        self._world = t2i_world_of(self.ckpt) if t2i and self.ckpt else None
        if self._world:  # the text-to-image miniature: its own VQ and text encoder; guidance-free as it was tuned
            import scenes
            self.prompts = [scenes.canonical(p) for p in self.prompts]  # as its tokenizer knows the words
            self.vq_ckpt = self.vq_ckpt or os.path.join(self._world, 'vq.safetensors')
            self.t5 = os.path.join(self._world, 't5') if self.t5 == 'google/flan-t5-xl' else self.t5
            self.cfg, self.top_k = (1.0 if self.cfg is None else self.cfg), (0 if self.top_k is None else self.top_k)
        saved = saved_sampling(self.ckpt)  # a train.py save says how it was sampled while it trained
        for k in ('cfg', 'top_k', 'top_p', 'temperature', 'vq_ckpt'):
            setattr(self, k, saved.get(k) if getattr(self, k) is None else getattr(self, k))
        if not t2i and self.per_class is None:  # no condition: the world's classes, or LlamaGen's eight demo labels
            self.classes = self.classes or list(saved.get('class_names') or DEMO_CLASSES)
        self.cfg = (7.5 if t2i else 4.0) if self.cfg is None else self.cfg
        self.top_k = (1000 if t2i else 2000) if self.top_k is None else self.top_k
        self.top_p = 1.0 if self.top_p is None else self.top_p
        self.temperature = 1.0 if self.temperature is None else self.temperature
        self.ckpt = self.ckpt or ('t2i_XL_stage1_256' if t2i else 'c2i_B_256')
        self.vq_ckpt = self.vq_ckpt or ('vq_ds16_t2i' if t2i else 'vq_ds16_c2i')
        self.device = self.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        self.dtype = self.dtype or ('bfloat16' if self.device.startswith('cuda') else 'float32')
        if self.per_class is not None and self.npz is None:
            self.npz = 'samples.npz'
        if self.npz and not self.npz.endswith('.npz'):  # as np.savez names it
            self.npz += '.npz'
        if self.out is None:
            self.out = '' if self.per_class is not None else 'samples.png'
        fid = self.per_class is not None  # the FID-only flags get their defaults only there (see validate)
        self.n = 4 if self.n is None and not fid else self.n
        for k, default in (('batch', 32), ('eval_size', 256), ('resume', True)):
            setattr(self, k, default if getattr(self, k) is None and fid else getattr(self, k))

    def validate(self):
        """Every check that needs no model, before anything is loaded: ranges, combinations, the checkpoint's
        header, writable outputs. Returns the class ids (or None); raises UserError naming the flag."""
        self._check_ranges()
        self._check_combinations()
        check_world(self.ckpt, self.vq_ckpt)
        ids = self.class_ids()  # bad names fail here
        if self._world:  # the miniature knows only its world's words: an unknown one is one sentence
            import scenes
            scenes.canonical_prompts(self.prompts)
        check_generator(peek_gpt_config(self.ckpt), self.ckpt, bool(self.prompts), ids or (), self.image_size,
                        vq_downsample(self.vq_ckpt), flags=('--prompt', '--class'))
        for path in filter(None, (self.out, self.npz)):
            check_writable_file(path, '--out' if path == self.out else '--npz')
        _check(self.per_class is not None or not self.npz or not os.path.isfile(self.npz) or self.overwrite,
               f"--npz {self.npz} already exists; choose another --npz, or pass --overwrite to replace it")
        if self.per_class is not None:
            check_shards(self, ids)
        return ids

    def class_ids(self):
        """--class as ids (None without --class): a world's class names for a save made in a world (saved_sampling),
        else ImageNet's."""
        if not self.classes:
            return None
        names = saved_sampling(self.ckpt).get('class_names')
        return world_class_ids(self.classes, names) if names else class_ids(self.classes)

    def _check_ranges(self):
        fid = self.per_class is not None
        for flag, ok, want in [('n', fid or self.n >= 1, 'at least 1'),
                               ('per_class', not fid or self.per_class >= 1, 'at least 1'),
                               ('batch', not fid or self.batch >= 1, 'at least 1'),
                               ('eval_size', not fid or self.eval_size >= 0, '>= 0 (0 = native size)'),
                               ('seed', 0 <= self.seed < 2 ** 31, 'in 0 .. 2**31 - 1'),
                               ('temperature', math.isfinite(self.temperature) and self.temperature >= 0,
                                '>= 0 (0 = greedy)'),
                               ('top_p', 0 < self.top_p <= 1, 'in (0, 1] (1 = off)'),
                               ('top_k', self.top_k >= 0, '>= 0 (0 = off)'),
                               ('cfg', math.isfinite(self.cfg) and self.cfg >= 0, 'a number >= 0 (<= 1 = off)'),
                               ('cfg_interval', self.cfg_interval >= -1, '>= -1 (-1 = every token)'),
                               ('image_size', self.image_size is None or self.image_size >= 1, 'positive')]:
            _check(ok, f"--{flag} must be {want}, got {getattr(self, flag)}")
        check_device(self.device)

    def _check_combinations(self):
        _check(not (self.classes and self.prompts),
               "give either --class (class-to-image) or --prompt (text-to-image), not both")
        _check(all(p.strip() for p in self.prompts), "--prompt must not be empty; give the text to draw, in quotes")
        if self.per_class is None:  # a grid: the FID flags would be silently ignored
            given = [k for k in ('batch', 'eval_size', 'resume') if getattr(self, k) is not None]
            _check(not given, f"--{(given or [''])[0]} applies to --per_class (FID) sampling only; drop it or "
                              f"add --per_class N")
            _check(int(os.environ.get('WORLD_SIZE', '1')) == 1, "under torchrun only --per_class sampling is "
                                                                 "sharded over ranks; run the grid with plain python")
            return
        _check(self.n is None, "--n is the grid's images per condition; --per_class sets the FID images per class")
        _check(not self.prompts, "--per_class samples every class for FID (class-to-image); drop --prompt or "
                                 "--per_class")
        _check(not self.out, "--out writes a grid of every image, which --per_class does not do; drop --out (the "
                             "images go to --npz)")
        _check(bool(self.npz), "--per_class needs an --npz file to write the images to")

def t2i_world_of(ckpt):
    """The world_t2i.py directory a checkpoint belongs to, or None: the world's own base (gpt.safetensors beside
    world.json and t5/), or a train.py save whose state.pt beside it names that world as its --world."""
    if not os.path.isfile(ckpt):
        return None
    d = os.path.dirname(os.path.abspath(ckpt))
    world = lambda w: bool(w) and os.path.isfile(os.path.join(w, 'world.json')) and os.path.isdir(os.path.join(w, 't5'))
    if world(d):
        return d
    try:
        w = torch.load(os.path.join(d, 'state.pt'), weights_only=True)['config'].get('world', '')
    except Exception:  # no save of train.py's, or another kind of file: not the miniature
        return None
    return w if world(w) else None


def _check(ok, message):
    if not ok:
        raise UserError(message)

# -----------------------------------------------------------------------------
# a train.py save knows how to sample it: its VQ, CFG, top-k, temperature, and a world's class names


def saved_sampling(ckpt):
    """The sampling settings in a train.py save's header (checkpoint.sampling_metadata), {} for anything else."""
    return header_config(ckpt, 'sampling') or {}


def check_world(ckpt, vq_ckpt):
    """A save made in a world (world.py) samples with that world's VQ: if the world's directory is gone, say so."""
    saved = saved_sampling(ckpt)
    if saved.get('world') and vq_ckpt == saved.get('vq_ckpt') and not os.path.isfile(vq_ckpt):
        raise UserError(f"{ckpt} was trained in the world {saved['world']}, which is gone (its VQ {vq_ckpt} is "
                        f"missing); rebuild it with the same world flags (python world.py --preset demo), or pass "
                        f"--vq_ckpt")


def world_class_ids(specs, names):
    """--class values (ids, or a world's class names, case-insensitive) -> list of int."""
    keys = [' '.join(str(s).lower().split()) for s in specs]
    lower = [n.lower() for n in names]
    for s, k in zip(specs, keys):
        if not k.lstrip('-').isdigit() and k not in lower:
            raise UserError(f"unknown class name {s!r} for this checkpoint's world; its classes are "
                            f"{', '.join(names)} (or pass a class id)")
    return [int(k) if k.lstrip('-').isdigit() else lower.index(k) for k in keys]


# -----------------------------------------------------------------------------
# sampling: a grid of a few conditions, or sharded FID sampling


def load_models(cfg, ids, device):
    """(GPT, VQ), with the checks that need the loaded models (a file without a config says less)."""
    gpt = load_gpt(cfg.ckpt, preset=cfg.model, image_size=cfg.image_size, device=device,
                   dtype=getattr(torch, cfg.dtype), downsample=vq_downsample(cfg.vq_ckpt) or 16,
                   model_type='t2i' if cfg.prompts else 'c2i')
    vq = load_vq(cfg.vq_ckpt, device=device)  # float32, as LlamaGen decodes
    check_generator(asdict(gpt.config), cfg.ckpt, bool(cfg.prompts), ids or (), flags=('--prompt', '--class'))
    check_pair(gpt, vq, cfg.ckpt, cfg.vq_ckpt, cfg.image_size)
    conds = len(ids) if ids is not None else (len(cfg.prompts) or gpt.config.num_classes)
    batch = min(cfg.batch, cfg.per_class * conds) if cfg.per_class is not None else conds * cfg.n  # one generate call
    check_fits(sampling_bytes(gpt.config, batch, cfg.cfg > 1, torch.finfo(getattr(torch, cfg.dtype)).bits // 8),
               device, f"sampling {batch} images in one batch", "lower --batch (or --n, or the number of conditions)")
    return gpt, vq


def sample_grid(cfg, gpt, vq, ids, device):
    """One generate call for every condition x n, one random stream; the PNG grid (and the npz)."""
    if ids is not None:  # cond: (N,) class ids, or (N, L, D) caption embeddings and (N, L) mask; N = conds * n
        cond, mask = torch.tensor(ids, device=device).repeat_interleave(cfg.n), None
    else:
        t5 = load_t5(cfg.t5, device, torch.float32 if cfg.dtype == 'float32' else torch.bfloat16)  # fp16 overflows
        emb, mask = encode_prompts(cfg.prompts, *t5, max_length=gpt.config.cls_token_num)
        cond, mask = emb.repeat_interleave(cfg.n, 0), mask.repeat_interleave(cfg.n, 0)
    gen = torch.Generator(device).manual_seed(cfg.seed)  # the only source of randomness
    tokens, _ = generate(gpt, cond, mask, cfg_scale=cfg.cfg, cfg_interval=cfg.cfg_interval, top_k=cfg.top_k,
                         top_p=cfg.top_p, temperature=cfg.temperature, generator=gen, compile=cfg.compile)  # (N, T)
    images = decode_uint8(vq, tokens)  # (N, H, W, 3)
    outputs = {}
    if cfg.out:
        outputs[cfg.out] = lambda tmp: Image.fromarray(image_grid(images, cfg.n)).save(tmp, format='PNG')
    if cfg.npz:
        labels = {} if ids is None else dict(arr_1=np.repeat(ids, cfg.n))
        outputs[cfg.npz] = lambda tmp: save_npz(tmp, arr_0=images, **labels)
    atomic_write(outputs)  # only now that everything has succeeded
    print(f"wrote {images.shape} uint8 images to {' and '.join(outputs) or 'no file'}")
    return images


def main(argv=None):
    """Sample, then write the PNG grid (and .npz), or with --per_class the FID npz. Returns the images
    (grid) or the labels of the npz (--per_class)."""
    cfg = parse_config(SampleConfig, argv, presets=SAMPLE_PRESETS)  # runs cfg.validate() before any load
    ids = cfg.class_ids()
    rank, world, device = distributed.init(cfg.device, timeout_min=120)  # rank 0 merges while the others wait
    try:
        gpt, vq = load_models(cfg, ids, device)
        if cfg.per_class is None:
            return sample_grid(cfg, gpt, vq, ids, device)
        return sample_fid(cfg, gpt, vq, ids, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(run(main, errors=(ValueError, CheckpointError)))  # one sentence, exit 2 (rank 0 says it once)
