"""
sample.py -- draw images from a LlamaGen generator (class ids/names or text prompts) into a PNG grid,
or, with --per_class, tens of thousands of them into one FID .npz, sharded over torchrun ranks.

Follows LlamaGen's autoregressive/sample/sample_c2i.py and sample_t2i.py: their sampling defaults
(c2i cfg 4.0, top_k 2000; t2i cfg 7.5, top_k 1000), FLAN-T5-XL captions of 120 tokens left-padded as
sample_t2i.py does, save_image's rounding. The grid has a row of --n images per condition.

    python sample.py                          # LlamaGen's 8 demo classes with c2i_B_256 + vq_ds16_c2i
    python sample.py --class 207 "golden retriever" --n 4 --seed 0
    python sample.py --prompt "a blue Porsche 356 parked in front of a yellow brick wall"
    python sample.py --class 207 --ckpt out/run/latest/model.safetensors --npz samples.npz
    torchrun --nproc_per_node=8 sample.py --preset paper_c2i --ckpt c2i_XL_384 --per_class 50 --npz xl.npz

FID sampling (--per_class) follows LlamaGen's sample_c2i_ddp.py (bicubic resize of 384-px images to
256 before rounding, the ADM evaluator's npz layout) and departs from it in three ways: every image
has its own seed (seed, class, index), so the npz does not depend on the number of ranks or the
batch size; each finished batch is a shard on disk, so a killed run continues where it stopped;
the npz is written from the shards in one pass, without a folder of 50,000 PNGs.
"""
import datetime, difflib, json, math, os, shutil, sys, zipfile
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cli import UserError, check_writable_file, parse_config, run  # noqa: F401 (UserError, parse_config: re-exported)
from model import (CheckpointError, GPT_PRESETS, peek_gpt_config, cache_only_if_offline, generate, hub_cache_dir, load_gpt,
                   sample_logits)
from tokenizer import load_vq, vq_downsample


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
    cfg: Optional[float] = None  # classifier-free guidance scale; None = 4.0 (c2i) or 7.5 (t2i); <= 1 = off
    cfg_interval: int = -1  # CFG for the first cfg_interval + 2 tokens only; -1 = every token
    top_k: Optional[int] = None  # None = 2000 (c2i) or 1000 (t2i); 0 = no top-k
    top_p: float = 1.0  # nucleus filtering; 1 = off
    temperature: float = 1.0  # softmax temperature; 0 = greedy
    ckpt: Optional[str] = None  # release, hf://OWNER/REPO/FILE or file; None = c2i_B_256 / t2i_XL_stage1_256
    vq_ckpt: Optional[str] = None  # VQ release or file; None = vq_ds16_c2i / vq_ds16_t2i
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

    def __post_init__(self):  # defaults that depend on the condition, so the printed config is final
        t2i = bool(self.prompts)
        if not t2i and self.per_class is None:  # no condition at all: LlamaGen sample_c2i.py's eight demo labels
            self.classes = self.classes or list(DEMO_CLASSES)
        self.cfg = (7.5 if t2i else 4.0) if self.cfg is None else self.cfg
        self.top_k = (1000 if t2i else 2000) if self.top_k is None else self.top_k
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
        ids = class_ids(self.classes) if self.classes else None  # bad names fail here
        self._check_against_checkpoint(ids)
        for path in filter(None, (self.out, self.npz)):
            check_writable_file(path, '--out' if path == self.out else '--npz')
        if self.per_class is not None:
            check_shards(self, ids)
        return ids

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
        _check(self.device.split(':')[0] in ('cpu', 'cuda', 'mps'),
               f"--device must be cpu, cuda[:N] or mps, got {self.device}")
        _check(not self.device.startswith('cuda') or torch.cuda.is_available(),
               f"--device {self.device} was asked for but torch sees no GPU here; use --device cpu")

    def _check_combinations(self):
        _check(not (self.classes and self.prompts),
               "give either --class (class-to-image) or --prompt (text-to-image), not both")
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

    def _check_against_checkpoint(self, ids):
        """What the release table or a self-describing file's header tells before loading: the kind of
        model (class or text), the number of classes, the image size."""
        kind = 't2i' if self.prompts else 'c2i'
        gpt = peek_gpt_config(self.ckpt)
        if not gpt:  # a file without a config: checked once loaded
            return
        got = gpt.get('model_type', 'c2i')
        if got != kind:
            raise UserError(f"{self.ckpt} is a {got} model; pass {'--prompt' if got == 't2i' else '--class'} instead")
        n = gpt.get('num_classes', 1000)
        if ids is not None and any(not 0 <= i < n for i in ids):
            raise UserError(f"class ids must be in 0..{n - 1} for {self.ckpt}, got {ids}")
        ds = vq_downsample(self.vq_ckpt)
        if not (self.image_size and ds and 'block_size' in gpt):  # otherwise checked once loaded
            return
        if (self.image_size // ds) ** 2 != gpt['block_size']:
            raise UserError(f"--image_size {self.image_size} contradicts {self.ckpt}, which holds a "
                            f"{math.isqrt(gpt['block_size']) * ds}-px model; drop --image_size")


def _check(ok, message):
    if not ok:
        raise UserError(message)


def load_t5(name='google/flan-t5-xl', device='cpu', dtype=torch.float32):
    """(tokenizer, T5 encoder in eval mode) from a local directory, the Hugging Face cache or the Hub.
    Offline it fails at once with CheckpointError (cache-only lookups when the Hub is unreachable)."""
    from transformers import AutoTokenizer, T5EncoderModel
    try:
        with cache_only_if_offline():
            kw = dict(cache_dir=hub_cache_dir())
            tok = AutoTokenizer.from_pretrained(name, **kw)
            return tok, T5EncoderModel.from_pretrained(name, dtype=dtype, **kw).to(device).eval()
    except Exception as e:
        raise CheckpointError(f"could not load the text encoder {name} ({type(e).__name__}): it is not a "
                              f"save_pretrained directory nor in the cache {hub_cache_dir()}, and the Hub is "
                              f"unreachable or refused; download it where there is network (or point HF_HOME at a "
                              f"cache that has it), or pass --t5 DIR") from None


@torch.no_grad()
def encode_prompts(prompts, tokenizer, encoder, max_length=120):
    """B prompts -> (emb (B, L, D) float32, mask (B, L) int64) with L = max_length, left-padded.
    LlamaGen quirk (sample_t2i.py): T5 encodes right-padded tokens, then each row is rotated so its
    n valid rows come last (row j <- row (j + n) mod L), padded rows are zeroed and the mask flipped.
    Prompts are lowercased and whitespace-folded, as LlamaGen's clean_caption (minus URL/HTML rules).
    """
    texts = [' '.join(p.lower().split()) for p in prompts]
    batch = tokenizer(texts, max_length=max_length, padding='max_length', truncation=True,
                      padding_side='right', return_tensors='pt')
    dev = next(encoder.parameters()).device
    ids, mask = batch['input_ids'].to(dev), batch['attention_mask'].to(dev)  # (B, L); mask 1..1 0..0
    emb = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, L, D)
    src = (torch.arange(ids.shape[1], device=dev) + mask.sum(1, keepdim=True)) % ids.shape[1]  # (B, L)
    emb = emb.gather(1, src[..., None].expand_as(emb))
    mask = mask.flip(-1)  # 0..0 1..1
    return emb * mask[..., None], mask


def class_ids(specs):
    """--class values (ids, or ImageNet names matched case-insensitively) -> list of int."""
    keys = [' '.join(str(s).lower().split()) for s in specs]
    if all(k.lstrip('-').isdigit() for k in keys):
        return [int(k) for k in keys]
    import open_clip  # IMAGENET_CLASSNAMES: 1000 names, index = class id (~2 s to import, so only here)
    names = [c.lower() for c in open_clip.IMAGENET_CLASSNAMES]
    for s, k in zip(specs, keys):
        if not k.lstrip('-').isdigit() and k not in names:
            close = ' or '.join(map(repr, difflib.get_close_matches(k, names, n=3))) or 'none'
            raise UserError(f"unknown ImageNet class name {s!r} (close matches: {close}); or pass a class id")
    return [int(k) if k.lstrip('-').isdigit() else names.index(k) for k in keys]  # repeated names: first id


def to_uint8(x):
    """Decoder output in [-1, 1] -> uint8 of the same shape, rounded as LlamaGen's torchvision
    save_image(normalize=True, value_range=(-1, 1)) does: clamp, to [0, 1], * 255 + 0.5, truncate."""
    return ((x.float().clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def image_grid(images, ncol, pad=2):
    """(N, H, W, 3) uint8 -> (rows*(H+pad)+pad, ncol*(W+pad)+pad, 3) with black gaps, as make_grid."""
    N, H, W, _ = images.shape
    rows = -(-N // ncol)
    x = np.pad(images, ((0, rows * ncol - N), (pad, 0), (pad, 0), (0, 0)))  # (rows*ncol, H+pad, W+pad, 3)
    x = x.reshape(rows, ncol, H + pad, W + pad, 3).transpose(0, 2, 1, 3, 4).reshape(rows * (H + pad), -1, 3)
    return np.pad(x, ((0, pad), (0, pad), (0, 0)))


# -----------------------------------------------------------------------------
# sampling: a grid of a few conditions, or sharded FID sampling


def init_distributed(device):
    """torchrun -> (rank, world, this rank's device); plain python -> (0, 1, device)."""
    if int(os.environ.get('WORLD_SIZE', '1')) == 1:
        return 0, 1, device
    rank, world, local = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    if device.startswith('cuda'):
        device = f'cuda:{local}'
        torch.cuda.set_device(device)
    # a long timeout: rank 0 merges 50,000 images while the others wait at the last barrier
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo', timeout=datetime.timedelta(hours=2))
    return rank, world, device


def load_models(cfg, ids, device):
    """(GPT, VQ) with the checks that need the loaded models (files without a config)."""
    kind = 't2i' if cfg.prompts else 'c2i'
    gpt = load_gpt(cfg.ckpt, preset=cfg.model, image_size=cfg.image_size, device=device,
                   dtype=getattr(torch, cfg.dtype), downsample=vq_downsample(cfg.vq_ckpt) or 16, model_type=kind)
    if gpt.config.model_type != kind:
        raise UserError(f"{cfg.ckpt} is a {gpt.config.model_type} model; pass "
                        f"{'--prompt' if gpt.config.model_type == 't2i' else '--class'} instead")
    vq = load_vq(cfg.vq_ckpt, device=device)  # float32, as LlamaGen decodes
    if vq.config.codebook_size != gpt.config.vocab_size:
        raise UserError(f"the VQ {cfg.vq_ckpt} has {vq.config.codebook_size} codes but the GPT predicts "
                        f"{gpt.config.vocab_size}; pass a matching --vq_ckpt")
    if cfg.image_size and (cfg.image_size // vq.config.downsample) ** 2 != gpt.config.block_size:
        raise UserError(f"--image_size {cfg.image_size} contradicts {cfg.ckpt}, which holds "
                        f"{gpt.config.block_size} image tokens; drop --image_size")
    if ids is not None and any(not 0 <= i < gpt.config.num_classes for i in ids):
        raise UserError(f"class ids must be in 0..{gpt.config.num_classes - 1} for {cfg.ckpt}, got {ids}")
    return gpt, vq


def decode_uint8(vq, tokens, size=0):
    """tokens (B, T) -> images (B, S, S, 3) uint8. With a `size` other than the native one, the decoder
    output is first resized bicubically, as LlamaGen's sample_c2i_ddp.py does for FID (384 -> 256)."""
    side = math.isqrt(tokens.shape[1])  # the token grid is square
    with torch.no_grad():
        x = vq.decode(tokens.view(-1, side, side))  # (B, 3, H, W), about [-1, 1]
    if size and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode='bicubic')
    return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def write_outputs(outputs):
    """{path: write(file object)}: all to temp files first, then all renamed, so a failure leaves nothing."""
    tmps = []
    try:
        for path, write in outputs.items():
            with open(path + '.tmp', 'wb') as f:
                tmps.append(path + '.tmp')
                write(f)
    except BaseException:
        for t in tmps:
            os.remove(t)
        raise
    for path in outputs:
        os.replace(path + '.tmp', path)


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
    from PIL import Image
    outputs = {}
    if cfg.out:
        outputs[cfg.out] = lambda f: Image.fromarray(image_grid(images, cfg.n)).save(f, format='PNG')
    if cfg.npz:
        labels = {} if ids is None else dict(arr_1=np.repeat(ids, cfg.n))
        outputs[cfg.npz] = lambda f: np.savez(f, arr_0=images, **labels)
    write_outputs(outputs)  # only now that everything has succeeded
    print(f"wrote {images.shape} uint8 images to {' and '.join(outputs) or 'no file'}")
    return images

# -----------------------------------------------------------------------------
# FID sampling: images in class-major order, image g seeded by (seed, g), batches as shards on disk


FID_SETTINGS = ('ckpt', 'vq_ckpt', 'model', 'image_size', 'dtype', 'seed', 'cfg', 'cfg_interval', 'top_k', 'top_p',
                'temperature', 'per_class', 'batch', 'eval_size')  # what the images depend on


def fid_settings(cfg, ids):
    return json.loads(json.dumps({**{k: getattr(cfg, k) for k in FID_SETTINGS}, 'classes': ids}))


def shard_dir(cfg):
    return cfg.npz + '.shards'


def shard_path(cfg, s):
    return os.path.join(shard_dir(cfg), f'{s:06d}.npz')


def check_shards(cfg, ids):
    """Before loading: the shards of an interrupted run are reused only if made with the same settings.
    (They live beside --npz, whose folder validate() has found writable.)"""
    path = os.path.join(shard_dir(cfg), 'settings.json')
    if cfg.resume and os.path.isfile(path):
        old, new = json.load(open(path)), fid_settings(cfg, ids)
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
    with open(path + '.tmp', 'wb') as f:  # a file object: np.savez would append .npz to a path
        np.savez(f, images=images, labels=labels, index=index)
    os.replace(path + '.tmp', path)  # a killed run leaves whole shards only


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
        with zipfile.ZipFile(cfg.npz + '.tmp', 'w', allowZip64=True) as z:  # stored, not compressed, as np.savez
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
        os.remove(cfg.npz + '.tmp')  # all or nothing
        raise
    os.replace(cfg.npz + '.tmp', cfg.npz)
    shutil.rmtree(shard_dir(cfg))
    print(f"wrote {shape} uint8 images and their labels to {cfg.npz}")


def prepare_shards(cfg, ids):
    """Rank 0, before sampling: the shard folder, with the settings a resumed run is checked against."""
    if not cfg.resume:
        shutil.rmtree(shard_dir(cfg), ignore_errors=True)
    os.makedirs(shard_dir(cfg), exist_ok=True)
    write_outputs({os.path.join(shard_dir(cfg), 'settings.json'):
                   lambda f: f.write(json.dumps(fid_settings(cfg, ids)).encode())})


def sample_fid(cfg, gpt, vq, ids, rank, world, device):
    """--per_class images of every class, sharded over ranks; rank 0 merges them into cfg.npz."""
    labels = np.repeat(np.asarray(ids if ids is not None else range(gpt.config.num_classes), np.int64),
                       cfg.per_class)  # (N,) class-major
    if rank == 0:
        prepare_shards(cfg, ids)
    if world > 1:
        dist.barrier()
    sample_shards(cfg, gpt, vq, labels, rank, world, device)
    if world > 1:
        dist.barrier()
    if rank == 0:
        merge_shards(cfg, labels)
    return labels


def main(argv=None):
    """Sample, then write the PNG grid (and .npz), or with --per_class the FID npz. Returns the images
    (grid) or the labels of the npz (--per_class)."""
    cfg = parse_config(SampleConfig, argv, presets=SAMPLE_PRESETS)  # runs cfg.validate() before any load
    ids = class_ids(cfg.classes) if cfg.classes else None
    rank, world, device = init_distributed(cfg.device)
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
