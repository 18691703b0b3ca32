"""
sample.py -- draw images from a LlamaGen generator (class ids/names or text prompts) into a PNG grid.

Follows LlamaGen's autoregressive/sample/sample_c2i.py and sample_t2i.py: their sampling defaults
(c2i cfg 4.0, top_k 2000; t2i cfg 7.5, top_k 1000), FLAN-T5-XL captions of 120 tokens left-padded as
sample_t2i.py does, save_image's rounding. The grid has a row of --n images per condition.

    python sample.py                          # LlamaGen's 8 demo classes with c2i_B_256 + vq_ds16_c2i
    python sample.py --class 207 "golden retriever" --n 4 --seed 0
    python sample.py --prompt "a blue Porsche 356 parked in front of a yellow brick wall"
    python sample.py --class 207 --ckpt out/run/latest/model.safetensors --npz samples.npz
"""
import argparse, difflib, inspect, json, os, re, sys, typing
from dataclasses import dataclass, field, fields, asdict
from typing import List, Optional

import numpy as np
import torch

from model import CheckpointError, GPT_PRESETS, RELEASES, cache_only_if_offline, generate, hub_cache_dir, load_gpt
from tokenizer import load_vq


class UserError(ValueError):  # bad input from the command line; the message is one sentence for the user
    pass


@dataclass
class SampleConfig:
    classes: List[str] = field(default_factory=list, metadata=dict(flag='--class'))  # c2i: ids or ImageNet names
    prompts: List[str] = field(default_factory=list, metadata=dict(flag='--prompt'))  # t2i: one or more prompts
    n: int = 4  # images per class / prompt (one grid row each)
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
    out: str = 'samples.png'  # PNG grid; '' = none
    npz: Optional[str] = None  # also write the images as uint8 NHWC `arr_0`, the ADM FID evaluator's format

    def __post_init__(self):  # checks, and defaults that depend on the condition, so the printed config is final
        if self.classes and self.prompts:
            raise UserError("give either --class (class-to-image) or --prompt (text-to-image), not both")
        if not self.prompts:  # no condition at all: LlamaGen sample_c2i.py's eight demo labels
            self.classes = self.classes or ['207', '360', '387', '974', '88', '979', '417', '279']
        if self.n < 1:
            raise UserError(f"--n must be at least 1, got {self.n}")
        t2i = bool(self.prompts)
        self.cfg = (7.5 if t2i else 4.0) if self.cfg is None else self.cfg
        self.top_k = (1000 if t2i else 2000) if self.top_k is None else self.top_k
        self.ckpt = self.ckpt or ('t2i_XL_stage1_256' if t2i else 'c2i_B_256')
        self.vq_ckpt = self.vq_ckpt or ('vq_ds16_t2i' if t2i else 'vq_ds16_c2i')
        self.device = self.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        if self.device.startswith('cuda') and not torch.cuda.is_available():
            raise UserError(f"--device {self.device} was asked for but torch sees no GPU here; use --device cpu")
        self.dtype = self.dtype or ('bfloat16' if self.device.startswith('cuda') else 'float32')


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of printing usage and exiting, so callers decide
        raise UserError(f"{message}; see python {self.prog} --help")


def parse_config(cls, argv=None, presets=None):
    """A `cls` dataclass from argv (None: sys.argv), `--field VALUE` per field: Optional[X] takes an X,
    bool is --field / --no-field, List[X] one or more values; field metadata may give another `flag`
    and `choices`. With `presets`, the `preset` field names a dict of defaults that flags override.
    Bad flags raise UserError. Prints the config once."""
    p = _Parser(description=inspect.getmodule(cls).__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                argument_default=argparse.SUPPRESS, allow_abbrev=False)
    notes = dict(re.findall(r'^\s+(\w+):[^#\n]*#\s*(.+)$', inspect.getsource(cls), re.M))  # --help text
    for f in fields(cls):
        t = typing.get_type_hints(cls)[f.name]  # the real type even under `from __future__ import annotations`
        if typing.get_origin(t) is typing.Union:  # Optional[X] -> X
            t = next(a for a in typing.get_args(t) if a is not type(None))
        kw = dict(dest=f.name, help=notes.get(f.name, '').replace('%', '%%'), choices=f.metadata.get('choices'))
        if t is bool:
            kw['action'] = argparse.BooleanOptionalAction
        elif typing.get_origin(t) is list:
            kw.update(nargs='+', type=typing.get_args(t)[0])
        else:
            kw['type'] = t
        p.add_argument(f.metadata.get('flag', '--' + f.name), **kw)
    given = vars(p.parse_args(argv))  # only the flags actually passed
    if presets is not None:
        name = given.get('preset', getattr(cls, 'preset', None))
        if name is not None and name not in presets:
            raise UserError(f"unknown preset {name!r}; known: {', '.join(presets)}")
        given = {**presets.get(name, {}), **given}
    cfg = cls(**given)
    if int(os.environ.get('RANK', '0')) == 0:  # once, not once per rank
        print(f"{cls.__name__}: {json.dumps(asdict(cfg))}")
    return cfg


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


def main(argv=None):
    """Sample, then write the PNG grid (and .npz). Returns the images (N, H, W, 3) uint8."""
    cfg = parse_config(SampleConfig, argv)
    ids = class_ids(cfg.classes) if cfg.classes else None  # bad names fail before any loading
    kind = 't2i' if cfg.prompts else 'c2i'
    got = RELEASES[cfg.ckpt].get('model_type', 'c2i') if cfg.ckpt in RELEASES else kind  # before a download
    if got == kind:
        gpt = load_gpt(cfg.ckpt, preset=cfg.model, image_size=cfg.image_size, device=cfg.device,
                       dtype=getattr(torch, cfg.dtype), model_type=kind)
        got = gpt.config.model_type
    if got != kind:
        raise UserError(f"{cfg.ckpt} is a {got} model; pass {'--prompt' if got == 't2i' else '--class'} instead")
    vq = load_vq(cfg.vq_ckpt, device=cfg.device)  # float32, as LlamaGen decodes
    if vq.config.codebook_size != gpt.config.vocab_size:
        raise UserError(f"the VQ {cfg.vq_ckpt} has {vq.config.codebook_size} codes but the GPT predicts "
                        f"{gpt.config.vocab_size}; pass a matching --vq_ckpt")
    if ids is not None:  # cond: (N,) class ids, or (N, L, D) caption embeddings and (N, L) mask; N = conds * n
        if any(not 0 <= i < gpt.config.num_classes for i in ids):
            raise UserError(f"class ids must be in 0..{gpt.config.num_classes - 1} for {cfg.ckpt}, got {ids}")
        cond, mask = torch.tensor(ids, device=cfg.device).repeat_interleave(cfg.n), None
    else:
        t5 = load_t5(cfg.t5, cfg.device, torch.float32 if cfg.dtype == 'float32' else torch.bfloat16)  # fp16 overflows
        emb, mask = encode_prompts(cfg.prompts, *t5, max_length=gpt.config.cls_token_num)
        cond, mask = emb.repeat_interleave(cfg.n, 0), mask.repeat_interleave(cfg.n, 0)
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed)  # the only source of randomness
    tokens, _ = generate(gpt, cond, mask, cfg_scale=cfg.cfg, cfg_interval=cfg.cfg_interval, top_k=cfg.top_k,
                         top_p=cfg.top_p, temperature=cfg.temperature, generator=gen, compile=cfg.compile)  # (N, T)
    side = int(gpt.config.block_size ** 0.5)  # the token grid is square
    with torch.no_grad():
        x = vq.decode(tokens.view(-1, side, side))  # (N, 3, H, W), about [-1, 1]
    images = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
    for path in filter(None, (cfg.out, cfg.npz)):  # written only now that everything has succeeded
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if cfg.out:
        from PIL import Image
        Image.fromarray(image_grid(images, cfg.n)).save(cfg.out)
    if cfg.npz:
        np.savez(cfg.npz, arr_0=images)  # numpy appends .npz to a path without it
    print(f"wrote {images.shape} uint8 images to {' and '.join(p for p in (cfg.out, cfg.npz) if p) or 'no file'}")
    return images


if __name__ == '__main__':
    try:
        main()
    except (ValueError, CheckpointError) as e:  # errors a user can cause: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
