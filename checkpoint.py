"""
checkpoint.py -- every file a model comes from or goes to: the released-checkpoint table, Hub downloads (through
hub.py; offline: one sentence, at once), readers for every LlamaGen checkpoint layout, self-describing
safetensors for the GPT and the VQ, and train.py's step-directory saves.

    python checkpoint.py     # smoke demo: save a tiny policy twice, resume it, compare

model.py and tokenizer.py hold the networks and do no file I/O; everything that touches a file or the Hub for
them lives here, so a reader looking for "how is a checkpoint read / written / resumed" finds it in one place.
The readers accept LlamaGen's .pt layouts (weights under `model`, `module`, `state_dict`, or bare), .safetensors,
the `module.` / `_orig_mod.` prefixes and AR-GRPO's `gpt_model.` / `vq_model.` wrapper halves; everything goes
through torch.load(weights_only=True) with only argparse.Namespace allow-listed.

train.py's saves: one save is one step directory, switched into place atomically.

    out_dir/step_NNNNNN/   model.safetensors, state.pt, dcp/ (and the LoRA adapter): one whole save
    out_dir/latest         a symlink to the newest whole save, switched last

A kill at any moment (tested with kill -9 at random moments and inside a save) leaves at least one whole save,
and `--resume` continues from the newest one bitwise. The sharded state goes through torch.distributed.checkpoint
(DCP), so a run saved on N ranks resumes on any number of ranks, sharded (FSDP2) or not; model.safetensors is
the usual single file that sample.py --ckpt and LlamaGen-format loaders read.
"""
import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist

import distributed
import hub
import lora
from cli import (TORCH_WRITE_FAILED, UserError, as_umask_allows, check_not_locked, disk_full_is_one_sentence,
                 exclusive, is_disk_full)
from hub import cache_only_if_offline, hub_cache_dir
from model import GPT, GPT_PRESETS, GPTConfig, config_for, precompute_freqs_cis_2d
from tokenizer import VQ_PRESETS, VQConfig, VQModel

# -----------------------------------------------------------------------------
# released checkpoints and the Hub

# Known releases: name -> (Hub repo, file, how to build it). c2i models sample with vq_ds16_c2i.
LLAMAGEN, LLAMAGEN_T2I = 'FoundationVision/LlamaGen', 'peizesun/llamagen_t2i'
RELEASES = {
    'c2i_B_256': dict(repo=LLAMAGEN, file='c2i_B_256.pt', preset='GPT-B', image_size=256),
    'c2i_B_384': dict(repo=LLAMAGEN, file='c2i_B_384.pt', preset='GPT-B', image_size=384),
    'c2i_L_256': dict(repo=LLAMAGEN, file='c2i_L_256.pt', preset='GPT-L', image_size=256),
    'c2i_L_384': dict(repo=LLAMAGEN, file='c2i_L_384.pt', preset='GPT-L', image_size=384),
    'c2i_XL_384': dict(repo=LLAMAGEN, file='c2i_XL_384.pt', preset='GPT-XL', image_size=384),
    'c2i_XXL_384': dict(repo=LLAMAGEN, file='c2i_XXL_384.pt', preset='GPT-XXL', image_size=384),
    'c2i_3B_384': dict(repo=LLAMAGEN, file='c2i_3B_384.pt', preset='GPT-3B', image_size=384),
    't2i_XL_stage1_256': dict(repo=LLAMAGEN_T2I, file='t2i_XL_stage1_256.pt', preset='GPT-XL',
                              image_size=256, model_type='t2i', cls_token_num=120),
    't2i_XL_stage2_512': dict(repo=LLAMAGEN_T2I, file='t2i_XL_stage2_512.pt', preset='GPT-XL',
                              image_size=512, model_type='t2i', cls_token_num=120),
    # AR-GRPO's RL-tuned models, saved by a HF Trainer around a wrapper holding `gpt_model` and
    # `vq_model`: the reader below accepts those prefixes as well as bare keys.
    'AR-GRPO_C2I_B_256': dict(repo='CSshihao/AR-GRPO_C2I_B_256', file='model.safetensors',
                              preset='GPT-B', image_size=256),
    'AR-GRPO_C2I_B_384': dict(repo='CSshihao/AR-GRPO_C2I_B_384', file='model.safetensors',
                              preset='GPT-B', image_size=384),
    'AR-GRPO_C2I_L_384': dict(repo='CSshihao/AR-GRPO_C2I_L_384', file='model.safetensors',
                              preset='GPT-L', image_size=384),
    'AR-GRPO_C2I_XL_384': dict(repo='CSshihao/AR-GRPO_C2I_XL_384', file='model.safetensors',
                               preset='GPT-XL', image_size=384),
    'AR-GRPO_T2I_XL_256': dict(repo='CSshihao/AR-GRPO_T2I_XL_256', file='model.safetensors',
                               preset='GPT-XL', image_size=256, model_type='t2i', cls_token_num=120),
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or loaded; the message is one sentence for the user."""


def hub_file(repo, filename, flag='--ckpt'):
    """Local path of `filename` from Hub `repo`: the huggingface_hub cache, else a download."""
    from huggingface_hub import hf_hub_download
    cache = hub_cache_dir()
    try:
        with cache_only_if_offline():
            return hf_hub_download(repo, filename, cache_dir=cache)
    except Exception as e:
        raise CheckpointError(f"could not get {filename} from the Hugging Face Hub repo {repo}: it is not in the "
                              f"cache {cache} and the Hub is unreachable or refused ({type(e).__name__}); download "
                              f"it where there is network (or point HF_HOME at a cache that has it), or pass a "
                              f"local file with {flag} PATH") from None


def hub_spec(spec):
    """`hf://OWNER/REPO/FILE` -> (OWNER/REPO, FILE)."""
    parts = spec[5:].split('/')
    if len(parts) < 3:
        raise CheckpointError(f"{spec} is not of the form hf://OWNER/REPO/FILE")
    return '/'.join(parts[:2]), '/'.join(parts[2:])


def header_metadata(spec, releases=RELEASES, flag='--ckpt'):
    """The safetensors header metadata of a checkpoint spec, read without its weights: {} for a release (their files
    hold no config) or a .pt; a local file's header; an `hf://` file's header from the cache, else over the network
    by two small range requests (huggingface_hub.parse_safetensors_file_metadata), so a run is planned -- and
    refused if it cannot fit -- before gigabytes are downloaded."""
    if spec in releases:
        return {}
    if not spec.startswith('hf://'):  # a local file (a missing one: one sentence now)
        return file_metadata(resolve_checkpoint(spec, releases, flag))
    if not spec.endswith('.safetensors'):
        return {}
    repo, filename = hub_spec(spec)
    cached = hub.cached_file(repo, filename)
    if cached:
        return file_metadata(cached)
    try:
        return hub.remote_header(repo, filename)
    except Exception as e:
        raise CheckpointError(f"could not read the header of {filename} in the Hugging Face Hub repo {repo}: it is "
                              f"not in the cache {hub_cache_dir()} and the Hub is unreachable or refused "
                              f"({type(e).__name__}); download it where there is network (or point HF_HOME at a "
                              f"cache that has it), or pass a local file with {flag} PATH") from None


def resolve_checkpoint(spec, releases=RELEASES, flag='--ckpt'):
    """A release name, `hf://OWNER/REPO/FILE` or a local path -> a local file path."""
    if spec in releases:
        return hub_file(releases[spec]['repo'], releases[spec]['file'], flag)
    if spec.startswith('hf://'):
        return hub_file(*hub_spec(spec), flag)
    if not os.path.isfile(spec):
        raise CheckpointError(f"checkpoint {spec} is not a known release ({', '.join(releases)}) nor an "
                              f"existing file; pass a local file with {flag} PATH")
    return spec


KNOWN_PREFIXES = ('module.', '_orig_mod.')  # DDP / DeepSpeed and torch.compile wrappers


def read_state_dict(path, submodel='gpt_model'):
    """Read a checkpoint file into a plain state_dict, whatever its layout.

    .safetensors or .pt; a .pt may hold the weights under 'model' (DDP), 'module' (DeepSpeed),
    'state_dict', or be the dict itself (FSDP). `submodel` picks one half of a wrapper checkpoint
    (AR-GRPO's `gpt_model.` / `vq_model.` keys); bare keys are taken as they are. Returns
    (state_dict, metadata) where metadata is the safetensors header metadata or {}.
    """
    try:
        if path.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(path, 'pt') as f:
                sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        else:
            # training checkpoints carry an argparse.Namespace; allow that one class and nothing else
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location='cpu', weights_only=True)
            meta = {}
            sd = next((obj[k] for k in ('model', 'module', 'state_dict') if isinstance(obj, dict) and k in obj), obj)
    except Exception as e:
        raise _unreadable(path, e) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path} holds no state_dict of tensors")
    for p in KNOWN_PREFIXES:
        sd = {k[len(p):] if k.startswith(p) else k: v for k, v in sd.items()}
    if any(k.startswith(submodel + '.') for k in sd):
        sd = {k[len(submodel) + 1:]: v for k, v in sd.items() if k.startswith(submodel + '.')}
    sd.pop('freqs_cis', None)  # LlamaGen quirk: some files carry the RoPE table; it is recomputed
    return sd, meta


def _unreadable(path, e):
    return CheckpointError(f"could not read checkpoint {path}: it is truncated, corrupt or not a PyTorch / "
                           f"safetensors file ({type(e).__name__})")


def file_metadata(path):
    """A checkpoint file's safetensors header metadata (where save_gpt / save_vq put the config), read without
    its weights (safe_open parses the header only); {} for a .pt. Raises CheckpointError when unreadable."""
    if not path.endswith('.safetensors'):
        return {}
    try:
        from safetensors import safe_open
        with safe_open(path, 'pt') as f:
            return f.metadata() or {}
    except Exception as e:
        raise _unreadable(path, e) from None


def load_into(model, sd, path):
    """load_state_dict(strict=True), with a one-sentence error instead of a wall of key names."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        eg = (missing + unexpected + bad)[0]
        raise CheckpointError(f"checkpoint {path} does not fit this model ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected, {len(bad)} wrong-shape keys, e.g. {eg}); check the model preset, "
                              f"image size and --ckpt")
    model.load_state_dict(sd, strict=True)
    return model


def save_gpt(model, path, state_dict=None, **metadata):
    """Write the weights as safetensors, keyed like LlamaGen, with the GPTConfig in the header so
    load_gpt / sample.py --ckpt can rebuild the model. Written to a temp file, then renamed.
    `state_dict` replaces model.state_dict() (train.py passes gathered or LoRA-merged weights)."""
    meta = {'gpt_config': json.dumps(asdict(model.config)), **{k: str(v) for k, v in metadata.items()}}
    sd = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    save_safetensors(sd, path, meta)


def save_safetensors(sd, path, metadata=None):
    """safetensors' save_file, whole or not at all: a temp file renamed into place (removed if the write fails,
    e.g. on a full disk), with the mode open() would give (save_file makes 0600 files)."""
    from safetensors.torch import save_file
    try:
        with disk_full_is_one_sentence(path):
            save_file(sd, path + '.tmp', metadata=metadata)
            as_umask_allows(path + '.tmp')
            os.replace(path + '.tmp', path)
    finally:
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')


def header_config(path, key):
    """A JSON config stored under `key` in a .safetensors header (save_gpt / save_vq write one), read without
    the weights; None for anything else. Never raises: an unreadable file is reported by its loader later."""
    if not (isinstance(path, str) and path.endswith('.safetensors') and os.path.isfile(path)):
        return None
    try:
        return json.loads(file_metadata(path)[key])
    except Exception:
        return None


def peek_gpt_config(ckpt):
    """What can be known of a checkpoint's GPT without reading its weights: a dict with model_type, preset and
    image_size (release table) or the GPTConfig fields (a self-describing .safetensors header), else {}.
    Lets a script reject contradictory flags before loading anything."""
    if ckpt in RELEASES:
        rel = RELEASES[ckpt]
        return dict(model_type=rel.get('model_type', 'c2i'), preset=rel['preset'], image_size=rel['image_size'])
    return header_config(ckpt, 'gpt_config') or {}


def gpt_config(ckpt, preset=None, image_size=None, downsample=16, **overrides):
    """The GPTConfig load_gpt builds for `ckpt` (a release name, hf://REPO/FILE or a local file), found without
    reading a weight (train.py plans a run's memory with it before loading). A file we wrote knows its own config
    (save_gpt puts it in the header); otherwise the release table and preset / image_size / overrides give it. A
    release is not downloaded for this (the released files, LlamaGen's .pt and AR-GRPO's safetensors, hold no
    config), and of an hf:// file only the header is read (header_metadata)."""
    rel = RELEASES.get(ckpt, {})
    meta = header_metadata(ckpt)
    if 'gpt_config' in meta:
        cfg = GPTConfig(**json.loads(meta['gpt_config']))
        shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, dim=cfg.dim)
        if preset is not None and GPT_PRESETS.get(preset) != shape:
            raise CheckpointError(f"checkpoint {ckpt} holds a {shape} model, not {preset}; drop the preset or "
                                  f"check --ckpt")
        return cfg
    kw = {k: v for k, v in rel.items() if k in ('model_type', 'cls_token_num')}
    kw.update(overrides)
    return config_for(preset or rel.get('preset') or 'GPT-B', image_size or rel.get('image_size', 256), downsample,
                      **kw)


def load_gpt(ckpt, preset=None, image_size=None, device='cpu', dtype=torch.float32, downsample=16, **overrides):
    """Build and load a GPT from a release name, hf://REPO/FILE or a local file, with gpt_config's config."""
    cfg = gpt_config(ckpt, preset, image_size, downsample, **overrides)
    path = resolve_checkpoint(ckpt)
    sd, _ = read_state_dict(path, 'gpt_model')
    with torch.device('meta'):
        model = GPT(cfg)
    model = model.to_empty(device='cpu')
    model.freqs_cis = precompute_freqs_cis_2d(math.isqrt(cfg.block_size), cfg.head_dim, cfg.rope_base,
                                              cfg.cls_token_num)
    load_into(model, sd, path)
    return model.to(device=device, dtype=dtype).eval()



def check_generator(known, name, prompts=False, classes=(), image_size=None, downsample=None,
                    flags=('--prompts FILE', '--classes')):
    """Does the generator `name` fit the command's flags? `known`: what is known of it, before loading
    (peek_gpt_config: the release table or a self-describing file's header) or after (its GPTConfig as a dict):
    class- or text-to-image, the number of classes, the token grid. flags: (prompt flag, class flag) as this
    command spells them. Raises UserError in one sentence; checks only what `known` says."""
    prompt_flag, class_flag = flags
    kind = known.get('model_type')
    if kind == 'c2i' and prompts:
        raise UserError(f"{prompt_flag.split()[0]} was given but {name} is a class-to-image model; use {class_flag} "
                        f"or pass a text-to-image --ckpt")
    if kind == 't2i' and not prompts:
        raise UserError(f"{name} is a text-to-image model; pass {prompt_flag}")
    n = known.get('num_classes', 1000)
    if kind == 'c2i' and any(not 0 <= c < n for c in classes):
        raise UserError(f"{class_flag} must be in 0..{n - 1} for {name}, got {list(classes)}")
    if 'block_size' in known and downsample and image_size:  # both token grids known
        side = math.isqrt(known['block_size']) * downsample
        if side != image_size:
            raise UserError(f"--image_size {image_size} contradicts {name}, a {side}-px model ({known['block_size']} "
                            f"tokens); pass --image_size {side} or drop it")


def check_pair(gpt, vq, gpt_name, vq_name, image_size=None):
    """A loaded GPT and VQ fit each other (vocabulary = codebook) and the image size (tokens = grid squared)."""
    if vq.config.codebook_size != gpt.config.vocab_size:
        raise UserError(f"the VQ {vq_name or '(random)'} has {vq.config.codebook_size} codes but the GPT "
                        f"{gpt_name or '(random)'} predicts {gpt.config.vocab_size}; pass a matching --vq_ckpt")
    check_generator(asdict(gpt.config), gpt_name or 'the generator', prompts=gpt.config.model_type == 't2i',
                    image_size=image_size, downsample=vq.config.downsample)


# -----------------------------------------------------------------------------
# the VQ tokenizer: the same readers, its own release table

VQ_RELEASES = {'vq_ds16_c2i': dict(repo=LLAMAGEN, file='vq_ds16_c2i.pt', preset='VQ-16'),
               'vq_ds8_c2i': dict(repo=LLAMAGEN, file='vq_ds8_c2i.pt', preset='VQ-8'),
               'vq_ds16_t2i': dict(repo=LLAMAGEN_T2I, file='vq_ds16_t2i.pt', preset='VQ-16')}


def vq_downsample(spec):
    """A VQ's downsampling factor (16 for VQ-16) from the release table or a save_vq file's header, without
    loading it; None when neither says."""
    vq = header_config(spec, 'vq_config') or (VQ_PRESETS[VQ_RELEASES[spec]['preset']] if spec in VQ_RELEASES else None)
    return 2 ** (len(vq['encoder_ch_mult']) - 1) if vq else None

def save_vq(vq, path):
    """safetensors with the VQConfig in the header, so load_vq(path) rebuilds it."""
    sd = {k: v.detach().contiguous().cpu() for k, v in vq.state_dict().items()}
    save_safetensors(sd, path, {'vq_config': json.dumps(asdict(vq.config))})


def vq_config(ckpt='vq_ds16_c2i', preset=None, **overrides):
    """The VQConfig load_vq builds for `ckpt`, without reading a weight: a save_vq file's header, else the preset
    (the release's, or VQ-16) plus overrides. A release is not downloaded for it (the released .pt carry no config)."""
    rel = VQ_RELEASES.get(ckpt)
    preset = preset or (rel or {}).get('preset', 'VQ-16')
    if preset not in VQ_PRESETS:
        raise ValueError(f"unknown VQ preset {preset!r}; known: {', '.join(VQ_PRESETS)}")
    meta = header_metadata(ckpt, VQ_RELEASES, '--vq_ckpt')
    # files we wrote carry their VQConfig; otherwise the preset plus overrides
    return VQConfig(**(json.loads(meta['vq_config']) if 'vq_config' in meta else {**VQ_PRESETS[preset], **overrides}))


def load_vq(ckpt='vq_ds16_c2i', preset=None, device='cpu', dtype=torch.float32, **overrides):
    """Build and load a VQModel from a release name, hf://REPO/FILE or a local file, with vq_config's config."""
    cfg = vq_config(ckpt, preset, **overrides)
    path = resolve_checkpoint(ckpt, VQ_RELEASES, '--vq_ckpt')
    sd, _ = read_state_dict(path, 'vq_model')
    with torch.device('meta'):
        vq = VQModel(cfg)
    vq = load_into(vq.to_empty(device='cpu'), sd, path)
    return vq.to(device=device, dtype=dtype).eval()

# -----------------------------------------------------------------------------
# train.py's models: from checkpoints (or a seeded random init), with the LoRA / FSDP options applied

TINY_VQ = dict(codebook_size=64, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1], z_channels=32, ch=128)  # demos


def training_configs(cfg):
    """(GPTConfig, VQConfig) of train.py's models, from the flags, the release tables and the files' headers,
    without reading a weight: train.py plans the run's memory with them (and refuses it) before loading anything,
    and load_training_models builds from the same."""
    vq = vq_config(cfg.vq_ckpt) if cfg.vq_ckpt else VQConfig(**TINY_VQ)  # no --vq_ckpt: a random tiny VQ
    if cfg.ckpt:
        return gpt_config(cfg.ckpt, preset=cfg.model, image_size=cfg.image_size, downsample=vq.downsample), vq
    return config_for(cfg.model, cfg.image_size, vq.downsample, vocab_size=vq.codebook_size), vq


def load_training_models(cfg, device):
    """train.py's models: (policy, reference or None, vq). The reference is a frozen copy of the starting policy;
    under LoRA it is the policy itself with its adapters off (lora.AdaptersOff), so no second copy is held. With
    --fsdp the policy (and a full-fine-tuning reference) are sharded over the ranks."""
    gpt_cfg, vq_cfg = training_configs(cfg)
    if cfg.vq_ckpt:
        vq = load_vq(cfg.vq_ckpt, device=device)
    else:  # a seeded random tiny VQ: the demo and tests need no weights
        torch.manual_seed(cfg.seed)
        vq = VQModel(vq_cfg).to(device).eval()
    vq.requires_grad_(False)
    load_to = torch.device('cpu') if cfg.fsdp else device  # FSDP moves each rank's shard to the device
    if cfg.ckpt:
        policy = load_gpt(cfg.ckpt, preset=cfg.model, image_size=cfg.image_size, device=load_to,
                          downsample=vq_cfg.downsample)
    else:
        torch.manual_seed(cfg.seed)
        policy = GPT(gpt_cfg).to(load_to)
    check_pair(policy, vq, cfg.ckpt, cfg.vq_ckpt, cfg.image_size)
    check_generator(asdict(policy.config), cfg.ckpt or 'this model', bool(cfg.prompts), cfg.classes)  # a .pt says less
    policy.eval()  # dropout off: see the module docstring
    policy.grad_ckpt = cfg.grad_ckpt
    if cfg.lora_rank:
        torch.manual_seed(cfg.seed)  # the adapters' init (A random, B zero) is the same on every rank
        lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        ref = lora.AdaptersOff(policy) if cfg.beta > 0 else None
    else:
        ref = copy.deepcopy(policy).requires_grad_(False) if cfg.beta > 0 else None
    if cfg.fsdp:
        distributed.shard(policy, device)
        if ref is not None and not cfg.lora_rank:
            distributed.shard(ref, device)  # sharded too: gathered block by block for its one no-grad forward
    return policy, ref, vq


# -----------------------------------------------------------------------------
# train.py's step-directory saves

# flags that may differ on --resume: they change neither the data nor the maths (out_dir: the run may move)
RESUME_FREE = {'max_steps', 'resume', 'save_every', 'grid_every', 'eval', 'device', 'compile', 'out_dir',
               'fsdp', 'grad_ckpt', 'kl_images', 'overwrite', 'report_to'}

# One save = one directory, out_dir/step_NNNNNN/:
#   model.safetensors   full weights (LoRA merged), LlamaGen keys + GPTConfig: sample.py --ckpt reads it
#   adapter_model.safetensors, adapter_config.json   the LoRA adapter alone, in PEFT's format (LoRA only)
#   dcp/                trained weights + AdamW state via torch.distributed.checkpoint: any world size loads it
#   state.pt            step, bad-step count, RNG, config, model.safetensors' SHA-256 (checked on --resume)
#   metrics.jsonl       a copy of the log's rows up to this step: --resume restores rows the log lost from it
# It is written as .tmp_step_NNNNNN and renamed when whole, then the `latest` symlink is switched to it, then
# saves older than the last KEEP_SAVES are deleted: a kill at any moment leaves at least one whole step_*
# directory, and a newest save damaged later (a bad disk, a hand edit) still has an older one to resume from.
STEP_DIR = re.compile(r'step_(\d+)$')
KEEP_SAVES = 2  # the newest save and the one before it (twice the disk of one save: the price of a fallback)


def _barrier(world):
    if world > 1:
        dist.barrier()


def _dcp_state(cfg, policy, opt):
    """{'model', 'optim'} keyed by parameter name, sharded or not (frozen LoRA base left out: it is --ckpt)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(policy, opt, options=StateDictOptions(ignore_frozen_params=bool(cfg.lora_rank)))
    return {'model': msd, 'optim': osd}


def full_weights(policy):
    """Every rank calls it (FSDP gathers); rank 0 gets the full state dict on the CPU, others may get {}."""
    if distributed.is_sharded(policy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in policy.state_dict().items()}


def save_checkpoint(cfg, policy, opt, step, bad_steps, rank=0, world=1, extra=None, rows=None, meta=None):
    """Write step_NNNNNN as one unit (see above). Called on every rank. `extra`: more training state for state.pt
    (the moving statistics of a distribution-level reward, the entropy coefficient), identical on every rank.
    `rows`: rank 0's metrics.jsonl rows up to this step, kept in the save as a copy of the log.
    `meta`: more of model.safetensors' header beside sampling_metadata(cfg) (a world's class names, say).
    If any part fails (a full disk, say), the temp directory is removed, every rank raises the same error, and
    the previous save stays whole."""
    import torch.distributed.checkpoint as dcp
    name = f'step_{step:06d}'
    tmp, final = os.path.join(cfg.out_dir, '.tmp_' + name), os.path.join(cfg.out_dir, name)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed half-way
        os.makedirs(tmp)
    _barrier(world)
    error = None
    try:
        with warnings.catch_warnings():  # single process: DCP warns that it assumes one, which is the intent
            warnings.filterwarnings('ignore', message='torch.distributed is disabled')
            dcp.save(_dcp_state(cfg, policy, opt), checkpoint_id=os.path.join(tmp, 'dcp'), no_dist=world == 1)
        sd = full_weights(policy)
        if rank == 0:
            _write_save(cfg, policy, sd, tmp, step, bad_steps, extra or {}, rows, meta or {})
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        error = _save_failed(e, tmp, cfg.out_dir)
    if world > 1:  # every rank learns whether rank 0's part failed
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = error or box[0]
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error
    if rank == 0:
        _switch_to(cfg.out_dir, name, tmp, final)
    _barrier(world)


def _write_save(cfg, policy, sd, tmp, step, bad_steps, extra, rows=None, meta=None):
    """Rank 0's files of a save: the LoRA adapter, model.safetensors (its header: the GPTConfig and how to sample
    it, sampling_metadata), the log's copy, state.pt (last)."""
    if cfg.lora_rank:
        lora.save_adapter(sd, tmp, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.ckpt)
        sd = lora.merge_lora(sd, cfg.lora_alpha / cfg.lora_rank)
    save_gpt(policy, os.path.join(tmp, 'model.safetensors'), state_dict=sd, step=step,
             sampling=json.dumps(sampling_metadata(cfg, meta)))
    if rows is not None:
        with open(os.path.join(tmp, 'metrics.jsonl'), 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows if r['step'] <= step)
        as_umask_allows(os.path.join(tmp, 'metrics.jsonl'))
    torch.save(dict(step=step, bad_steps=bad_steps, config=asdict(cfg), rng_cpu=torch.get_rng_state(),
                    rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], extra=extra,
                    model_sha256=file_sha256(os.path.join(tmp, 'model.safetensors'))),
               os.path.join(tmp, 'state.pt'))


def file_sha256(path):
    """The SHA-256 of a file, read 16 MiB at a time (about 2 s for a 3 GB model.safetensors)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def sampling_metadata(cfg, more=None):
    """How a train.py save was sampled while it trained, for sample.py --ckpt to sample it the same way: the VQ
    (an absolute path when it is a file, so the save works from any directory), CFG, top-k, top-p, temperature,
    plus `more` (world.checkpoint_metadata: the world's directory, hash and class names)."""
    vq = os.path.abspath(cfg.vq_ckpt) if cfg.vq_ckpt and os.path.isfile(cfg.vq_ckpt) else cfg.vq_ckpt
    return dict(vq_ckpt=vq, cfg=cfg.cfg_scale, cfg_interval=cfg.cfg_interval, top_k=cfg.top_k, top_p=cfg.top_p,
                temperature=cfg.temperature, **(more or {}))


def _save_failed(e, tmp, out_dir):
    """The exception to raise for a failed save: a full disk becomes one sentence; anything else as it was."""
    text = f"{e} {getattr(e, 'failures', '')}".lower()  # DCP wraps each rank's exception in its failures
    if is_disk_full(e) or 'no space left' in text or TORCH_WRITE_FAILED.search(text):  # torch.save: a short write
        saves = sorted(d for d in os.listdir(out_dir) if STEP_DIR.match(d))
        return UserError(f"no space left on the device while writing the save {tmp} (removed); "
                         f"{'the previous save ' + saves[-1] + ' is intact' if saves else 'there was no earlier save'}"
                         f"; free some space and run the same command with --resume (a full disk, or a write the "
                         f"file system refused)")
    return e


def _switch_to(out_dir, name, tmp, final):
    """Rank 0: rename the whole save into place, switch `latest` to it, delete saves older than the last
    KEEP_SAVES, killed saves' temp directories and the runs --overwrite moved aside (the new run has a save now)."""
    shutil.rmtree(final, ignore_errors=True)  # only if this very step was saved before
    os.replace(tmp, final)  # the save exists from here on
    link = os.path.join(out_dir, '.latest_tmp')
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(name, link)
    os.replace(link, os.path.join(out_dir, 'latest'))  # atomic switch of the pointer
    keep = sorted((d for d in os.listdir(out_dir) if STEP_DIR.match(d)), key=_step_of)[-KEEP_SAVES:]
    for d in os.listdir(out_dir):
        if (STEP_DIR.match(d) and d not in keep + [name]) or d.startswith('.tmp_step_') or REPLACED_DIR.match(d):
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)


def _step_of(name):
    return int(STEP_DIR.match(name).group(1))

# -----------------------------------------------------------------------------
# the run directory: one writer, never overwritten unasked, a torn log line recovered

REPLACED = '.replaced'  # where --overwrite moves an earlier run until the new run's first save is in place
REPLACED_DIR = re.compile(r'\.replaced(_\d+)?$')  # a second --overwrite before a save: .replaced_2, never a deletion
RUN_FILES = re.compile(r'(step_\d+|latest|metrics\.jsonl|grid_\d+\.png|reward_curve\.png|\.tmp_step_\d+|'
                       r'\.latest_tmp|report\.(md|json)|before_after\.png|curves\.png|samples_\w+\.npz|'
                       r'tuned|control|run\.json|tb)$')


def holds_run(out_dir):
    """What of a run out_dir holds (saves, a non-empty metrics.jsonl; or a demo's runs one level down), as a
    short description, or '' for nothing."""
    if not os.path.isdir(out_dir):
        return ''
    steps = sorted(d for d in os.listdir(out_dir) if STEP_DIR.match(d))
    log = os.path.join(out_dir, 'metrics.jsonl')
    rows = sum(1 for line in open(log, errors='replace') if line.strip()) if os.path.isfile(log) else 0
    found = ([steps[-1]] if steps else []) + ([f"{rows} rows of metrics.jsonl"] if rows else [])
    for sub in ('tuned', 'control'):  # the demo's two runs
        if holds_run(os.path.join(out_dir, sub)):
            found.append(f"a {sub} run")
    found += [f"the run --overwrite moved to {d}" for d in sorted(os.listdir(out_dir)) if REPLACED_DIR.match(d)]
    return ', '.join(found)


def _refuse(cfg, held):
    raise UserError(f"--out_dir {cfg.out_dir} holds a run ({held}); continue it with --resume, choose another "
                    f"--out_dir, or start over with --overwrite (the old run is kept in "
                    f"{os.path.join(cfg.out_dir, REPLACED)} until the new one has saved)")


def check_out_dir(cfg):
    """Validation of --out_dir against what it holds: a fresh run never silently replaces an earlier one, and
    --resume needs a save. Reads only."""
    check_not_locked(os.path.join(cfg.out_dir, '.lock'), '--out_dir', cfg.out_dir)  # a live writer: say so first
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --out_dir and --overwrite replaces it; pass one of them")
    if cfg.resume and not cfg.world:  # (a demo resumes its runs one level down, out_dir/tuned and /control)
        newest_checkpoint(cfg.out_dir)  # nothing to resume: said now, before any folder or lock is made
    held = holds_run(cfg.out_dir)
    if held and not cfg.resume and not cfg.overwrite:
        _refuse(cfg, held)


@contextlib.contextmanager
def open_run(cfg, rank=0, world=1):
    """Inside: this job (its rank 0) is the one writer of cfg.out_dir, and the directory is ready: created, and
    with --overwrite the earlier run moved into out_dir/.replaced (deleted by the first save)."""
    with contextlib.ExitStack() as stack:
        def take():  # rank 0 only: the lock is taken once per job, not per rank
            if cfg.resume:
                newest_checkpoint(cfg.out_dir)  # nothing to resume: no folder, no lock left behind
            os.makedirs(cfg.out_dir, exist_ok=True)
            stack.enter_context(exclusive(os.path.join(cfg.out_dir, '.lock'), '--out_dir', cfg.out_dir))
            if not cfg.resume:
                _move_aside(cfg)
        distributed.rank0_decides(take, rank, world)
        yield


def _move_aside(cfg):
    """A fresh run: an earlier run in out_dir is refused, or with --overwrite moved aside (not deleted). A run
    moved aside by an earlier --overwrite whose replacement never saved stays where it is (it may be the only
    copy of a real run); this one goes beside it, into .replaced_2, _3, ..."""
    held = holds_run(cfg.out_dir)
    if not held:
        return
    if not cfg.overwrite:  # validation said so already; a run started from code (the demo) is checked here
        _refuse(cfg, held)
    names = [d for d in os.listdir(cfg.out_dir) if RUN_FILES.match(d)]
    if not names:  # only runs moved aside before: they wait for this run's first save
        return
    aside = next(p for p in (os.path.join(cfg.out_dir, REPLACED + (f'_{i}' if i > 1 else '')) for i in
                             itertools.count(1)) if not os.path.lexists(p))
    os.makedirs(aside)
    for d in names:
        os.replace(os.path.join(cfg.out_dir, d), os.path.join(aside, d))
    print(f"--overwrite: the earlier run ({', '.join(sorted(names))}) moved to {aside}; it is deleted once this run "
          f"has saved")


def read_metrics(path, upto=None):
    """The rows of metrics.jsonl up to step `upto`. A torn last line (a kill or a full disk during the append) is
    dropped with a warning: a row past the save is written again, one up to it comes back from the save's copy
    (resumed_rows); any other bad line is one sentence naming the file."""
    if not os.path.isfile(path):
        return []
    lines = [line for line in open(path, errors='replace').read().split('\n') if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise UserError(f"{path} line {i + 1} is not JSON; repair or delete that line, then run "
                                f"again") from None
            print(f"warning: dropped the torn last line of {path} (a run killed or out of space while logging)")
    return [r for r in rows if upto is None or r['step'] <= upto]


def newest_checkpoint(out_dir):
    """The newest whole save in out_dir (a save is named step_* only once it is whole)."""
    steps = [d for d in os.listdir(out_dir) if STEP_DIR.match(d)] if os.path.isdir(out_dir) else []
    if not steps:
        aside = [os.path.join(out_dir, d) for d in sorted(os.listdir(out_dir)) if REPLACED_DIR.match(d)] \
            if os.path.isdir(out_dir) else []
        aside = f" (the runs --overwrite replaced are in {', '.join(aside)})" if aside else ''
        raise UserError(f"--resume: no checkpoint in {out_dir} (no step_* directory){aside}; drop --resume to start")
    d = os.path.join(out_dir, max(steps, key=_step_of))
    for f in ('state.pt', 'model.safetensors', os.path.join('dcp', '.metadata')):
        if not os.path.isfile(os.path.join(d, f)):
            raise UserError(f"--resume: {os.path.join(d, f)} is missing; {_what_to_do(d)}")
    return d


def _what_to_do(d):
    """The advice for a damaged newest save d: resume from the older save if there is one; never delete the only
    copy of a run."""
    out_dir, name = os.path.split(d)
    older = sorted((n for n in os.listdir(out_dir) if STEP_DIR.match(n) and _step_of(n) < _step_of(name)),
                   key=_step_of)
    if older:
        return f"restore it, or move {d} out of {out_dir} to resume from the older save {older[-1]}"
    return (f"restore it from a copy ({d} is the run's only save: keep it), or start over with --overwrite (the run "
            f"is then kept in {os.path.join(out_dir, REPLACED)} until the new run has saved)")


def check_model_file(d, state):
    """model.safetensors of the save d (what sample.py --ckpt reads) is whole: its SHA-256 is the one state.pt
    recorded (older saves: its header and size are consistent). Raises UserError with what to do."""
    path = os.path.join(d, 'model.safetensors')
    if 'model_sha256' in state:
        ok = file_sha256(path) == state['model_sha256']
    else:
        try:
            from safetensors import safe_open
            with safe_open(path, 'pt') as f:  # checks the header against the file's length
                ok = bool(list(f.keys()))
        except Exception:
            ok = False
    if not ok:
        raise UserError(f"--resume: {path} is truncated or corrupt (it is not the file this save wrote); "
                        f"{_what_to_do(d)}")


def resumed_rows(out_dir, step):
    """metrics.jsonl's rows of steps 1..step for a run resumed at `step`: the log's, and each row the log lost
    (a torn last line, a cut or deleted file) from the copy in the save. A row neither holds is named in one warning
    line. -> (rows in step order, whether any row was restored or is missing)."""
    log = os.path.join(out_dir, 'metrics.jsonl')
    rows = {r['step']: r for r in read_metrics(log, upto=step)}
    lost = [s for s in range(1, step + 1) if s not in rows]
    if not lost:
        return [rows[s] for s in sorted(rows)], False
    saved = os.path.join(newest_checkpoint(out_dir), 'metrics.jsonl')
    copy_ = {r['step']: r for r in read_metrics(saved, upto=step)}
    back = [s for s in lost if s in copy_]
    rows |= {s: copy_[s] for s in back}
    gone = [s for s in lost if s not in copy_]
    if back:
        print(f"--resume: restored {'the row' if len(back) == 1 else 'the rows'} of {_steps(back)} of {log} from "
              f"the save")
    if gone:
        print(f"warning: {log} has no row for {_steps(gone)}, and the save holds no copy of them; the log keeps "
              f"that hole")
    return [rows[s] for s in sorted(rows)], True


def _steps(steps):
    """[1, 2, 3, 7] -> 'steps 1-3, 7'."""
    runs = [[s] for s in steps[:1]]
    for s in steps[1:]:
        runs[-1].append(s) if s == runs[-1][-1] + 1 else runs.append([s])
    return ('step ' if len(steps) == 1 else 'steps ') + ', '.join(
        f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def load_checkpoint(cfg, policy, opt):
    """Restore weights, optimizer, RNG and step from the newest save in out_dir (every rank, any world size).
    Returns (step, bad_steps, extra): `extra` as save_checkpoint was given it ({} for older saves)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    d = newest_checkpoint(cfg.out_dir)
    try:
        state = torch.load(os.path.join(d, 'state.pt'), map_location='cpu', weights_only=True)
        saved = state['config']
    except Exception as e:
        raise UserError(f"--resume: {os.path.join(d, 'state.pt')} is truncated or corrupt ({type(e).__name__}); "
                        f"{_what_to_do(d)}") from None
    check_model_file(d, state)  # also when there is nothing left to do: sample.py --ckpt reads this file
    diff = [k for k, v in saved.items() if k not in RESUME_FREE and getattr(cfg, k, None) != v]
    if diff:
        raise UserError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)} "
                        f"(e.g. {diff[0]}={saved[diff[0]]!r} there); use the same settings")
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    target = _dcp_state(cfg, policy, opt)  # the layout to load into: this run's sharding and world size
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='torch.distributed is disabled')
            dcp.load(target, checkpoint_id=os.path.join(d, 'dcp'), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:
        raise UserError(f"--resume: the sharded state in {os.path.join(d, 'dcp')} is truncated, corrupt or "
                        f"from another model ({type(e).__name__}); {_what_to_do(d)}") from None
    # LoRA: the dict holds the adapters only (dcp.load above already failed if any was absent); the frozen base
    # keys are not in it by design, hence strict=False there
    lora = bool(cfg.lora_rank)
    set_state_dict(policy, opt, model_state_dict=target['model'], optim_state_dict=target['optim'],
                   options=StateDictOptions(ignore_frozen_params=lora, strict=not lora))
    torch.set_rng_state(state['rng_cpu'])
    if state['rng_cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['rng_cuda'])
    return state['step'], state['bad_steps'], state.get('extra', {})


if __name__ == '__main__':
    import tempfile
    from dataclasses import dataclass

    @dataclass
    class Run:  # the TrainConfig fields a save reads (the last six: how sample.py --ckpt samples it)
        out_dir: str
        lora_rank: int = 0
        ckpt: str = ''
        vq_ckpt: str = ''
        cfg_scale: float = 1.0
        cfg_interval: int = -1
        top_k: int = 0
        top_p: float = 1.0
        temperature: float = 1.0

    torch.manual_seed(0)
    policy = GPT(GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=4, block_size=4))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as d:
        for step in (1, 2):
            save_checkpoint(Run(d), policy, opt, step, bad_steps=0)
        print(sorted(os.listdir(d)), '-> latest =', os.readlink(os.path.join(d, 'latest')))
        clone = GPT(policy.config)
        step, bad, _ = load_checkpoint(Run(d), clone, torch.optim.AdamW(clone.parameters(), lr=1e-3))
        same = all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), clone.state_dict().values()))
        print(f"resumed at step {step}; weights equal: {same}")
