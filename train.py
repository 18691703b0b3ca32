"""
train.py -- online GRPO fine-tuning of a LlamaGen generator (AR-GRPO, arXiv 2508.06924).

Each step: sample G images per condition with the KV cache and CFG -> decode with the VQ ->
score with the reward models -> group-relative advantages -> num_iterations passes of the
clipped loss + beta * KL to the frozen starting model -> AdamW step with gradient clipping.

    python train.py --preset demo                         # CPU, offline: GRPO in world.py's miniature world
    python train.py --preset demo_color                   # smallest smoke run: random GPT, colourfulness
    torchrun --nproc_per_node=8 train.py --preset c2i_xl  # the paper's class-to-image run (32 images a step)
    torchrun --nproc_per_node=8 train.py --preset t2i_xl --prompts prompts.txt
    python train.py --preset demo --resume                # continue out_dir exactly where it stopped
    python train.py --preset demo --eval --ckpt out/demo/latest/model.safetensors   # rewards on fixed seeds
    torchrun --nproc_per_node=8 train.py --preset c2i_xl --fsdp --no-compile # big models: see scale.py
    python train.py --preset c2i_xl --lora_rank 16 --micro_batch_size 4       # XL on one 24 GB card

How this departs from the paper's code (see grpo.py for the loss): a group may span ranks (its
rewards are gathered); rewards are scored batched on the device; optional num_iterations > 1 (PPO-style
reuse, the ratio and clipping then act) and logprob_mode='guided' (log-probs under the CFG mixture that
drew the tokens). Dropout is off throughout (the policy stays in eval mode) so that sampling
and scoring see the same network, which is what makes the ratio exactly 1 at the first pass.
Memory options (--grad_ckpt, --fsdp, --lora_rank) live in scale.py; a save is one step directory with a
`latest` pointer switched last (checkpoint.py), loadable at any world size.
"""
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import grpo
import scale
from checkpoint import load_checkpoint, save_checkpoint
from model import GPT, CheckpointError, config_for, generate, load_gpt, peek_gpt_config, RELEASES
from tokenizer import VQConfig, VQModel, load_vq, vq_downsample
from rewards import build_reward, parse_spec, WeightsUnavailable
from cli import UserError, atomic_write, check_device, check_range, check_writable_dir, parse_config, run
from sample import load_t5, encode_prompts, to_uint8


@dataclass
class TrainConfig:
    preset: Optional[str] = None  # a TRAIN_PRESETS name; its values are defaults the flags override
    # generator and tokenizer
    ckpt: str = 'c2i_B_256'  # GPT release name, hf://OWNER/REPO/FILE or file; '' = random init (demo)
    model: Optional[str] = None  # GPT preset for a file without config (or for random init)
    image_size: int = 256  # pixels; block_size = (image_size / VQ downsample) ** 2
    vq_ckpt: str = 'vq_ds16_c2i'  # VQ release name or file; '' = a tiny random VQ (demo)
    # conditions
    classes: List[int] = field(default_factory=list)  # c2i: class ids to draw from; [] = all classes
    prompts: str = ''  # t2i: prompt file: .txt, .json (list, AR-GRPO conversations, COCO captions), .jsonl
    t5: str = 'google/flan-t5-xl'  # t2i: text encoder (name or local directory)
    # rollouts
    group_size: int = 8  # G images per condition; advantages are relative to the group
    conds_per_rank: int = 2  # without images_per_step: conditions per rank per step, conds_per_rank * G images
    images_per_step: int = 0  # global batch over all ranks, a multiple of G; 0 = conds_per_rank * G * world
    cfg_scale: float = 2.0  # classifier-free guidance while sampling (paper: 2.0 c2i, 4.0 t2i)
    cfg_interval: int = -1  # CFG only for the first cfg_interval + 2 tokens; -1 = every token
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # 0 = no top-k filtering (paper)
    top_p: float = 1.0  # 1 = no nucleus filtering (paper)
    # rewards
    rewards: str = 'clip=1,quality=1,hps=1'  # name=weight list, or 'paper' (the paper's recipe), see rewards.py
    clip_model: str = 'ViT-L-14'  # open_clip architecture for clip and quality
    clip_pretrained: str = 'openai'  # open_clip tag or local file
    hps_ckpt: Optional[str] = None  # local HPS_v2.1_compressed.pt; None = fetch from the Hub
    judge: str = 'Qwen/Qwen2.5-VL-3B-Instruct'  # realism/no_artifacts/vlm_quality judge: Hub name or directory
    judge_url: str = ''  # ask a served judge instead: OpenAI-compatible http://HOST:PORT/v1; '' = in-process
    judge_model: str = ''  # the model name the judge server knows; '' = --judge
    # GRPO
    beta: float = 0.1  # KL weight (paper: 0.1 c2i, 1.0 t2i); 0 = no reference model at all
    eps_low: float = 0.2  # clip range below 1
    eps_high: float = 0.2  # clip range above 1
    num_iterations: int = 1  # updates per rollout batch (paper: 1, so the ratio is always 1)
    minibatch_size: int = 0  # images per optimizer step within an iteration; 0 = the whole batch
    micro_batch_size: int = 0  # images per forward/backward (gradient accumulation); 0 = minibatch
    logprob_mode: str = 'cond'  # 'cond' (paper: conditional branch) or 'guided' (CFG mixture)
    scale_std: bool = True  # divide advantages by the group std
    # optimisation
    lr: float = 1e-5  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    max_steps: int = 400  # rollout steps (paper: 400 c2i, 600 t2i)
    # system
    seed: int = 0  # everything random derives from (seed, rank, step)
    device: str = 'auto'  # 'auto' = cuda if available, else cpu
    dtype: str = 'bfloat16'  # autocast dtype on GPU (weights and AdamW stay float32); CPU runs float32
    compile: bool = False  # torch.compile the decode step
    out_dir: str = 'out/run'  # checkpoints, metrics.jsonl, image grids, reward curve
    save_every: int = 50  # checkpoint every N steps (and at the end)
    grid_every: int = 25  # write a grid of groups with their rewards every N steps; 0 = never
    resume: bool = False  # continue from out_dir's checkpoint
    max_bad_steps: int = 3  # consecutive non-finite steps before saving and stopping
    # evaluation
    eval: bool = False  # sample eval_conds with fixed seeds, report each reward's mean +- s.e. (metrics.py), exit
    eval_conds: int = 8  # conditions to evaluate (first classes / prompts); 0 = all of them
    eval_images: int = 4  # images per condition in evaluation
    eval_ckpt: Optional[str] = None  # --eval: a tuned checkpoint compared with --ckpt on the same seeds (paired)
    # the miniature world (world.py) and honest-reporting controls
    world: str = ''  # world.py preset ('demo') or dir: GRPO in it + the report; ckpt/vq_ckpt '' = the world's
    shuffle_rewards: bool = False  # control run: permute the rewards within each group before advantages
    kl_images: int = 8  # images of each rollout scored under the frozen start for the logged kl_start; 0 = off

    # memory (scale.py; the README's "what fits where" table says which to use)
    grad_ckpt: bool = False  # activation checkpointing: recompute each block in backward (teacher-forced pass)
    fsdp: bool = False  # shard weights, grads and AdamW state over the torchrun ranks (FSDP2)
    lora_rank: int = 0  # > 0: train rank-R LoRA adapters only, base frozen; the KL reference is the base
    lora_alpha: float = 32.0  # LoRA scale alpha / rank
    lora_targets: List[str] = field(default_factory=lambda: list(scale.LORA_TARGETS))  # linear layers to adapt


    def validate(self):
        """Every check that needs no model, run by parse_config before anything is loaded or sampled:
        ranges, choices, contradictions, input files, the output directory. Raises UserError."""
        check_range(self, 'group_size', lo=2)  # advantages are relative to the group
        check_range(self, 'conds_per_rank num_iterations max_steps save_every max_bad_steps eval_images image_size',
                    lo=1)
        check_range(self, 'top_k minibatch_size micro_batch_size grid_every beta weight_decay grad_clip cfg_scale '
                          'eval_conds', lo=0)
        check_range(self, 'cfg_interval', lo=-1)
        check_range(self, 'temperature lr', lo=0, lo_open=True)  # log-probs divide by the temperature
        check_range(self, 'top_p', lo=0, hi=1, lo_open=True)
        check_range(self, 'eps_low', lo=0, hi=1, hi_open=True)
        check_range(self, 'eps_high', lo=0)
        for name, allowed in (('logprob_mode', ('cond', 'guided')), ('dtype', ('bfloat16', 'float16', 'float32'))):
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        check_device(self.device)
        if any(c < 0 for c in self.classes):
            raise UserError(f"--classes must be class ids >= 0, got {self.classes}")
        check_range(self, 'images_per_step', lo=0)
        world = int(os.environ.get('WORLD_SIZE', '1'))
        if self.images_per_step % self.group_size or self.images_per_step % world:
            raise UserError(f"--images_per_step {self.images_per_step} must be a multiple of --group_size "
                            f"{self.group_size} and of the {world} rank(s) it is split over")
        _, batch = step_layout(self, world)  # images per rank
        mb = self.minibatch_size or batch
        if batch % mb or mb % (self.micro_batch_size or mb):
            raise UserError(f"--minibatch_size {mb} must divide the {batch} images each rank samples per step, and "
                            f"--micro_batch_size must divide the minibatch")
        parse_spec(self.rewards)  # unknown reward names fail now, not after the models load
        if self.judge_url and not self.judge_url.startswith(('http://', 'https://')):
            raise UserError(f"--judge_url {self.judge_url!r} is not an http(s) URL; pass e.g. http://HOST:8000/v1")
        if not self.judge:
            raise UserError("--judge is empty; pass a Hub name or a save_pretrained directory of the judge")
        if self.eval_ckpt is not None and not self.eval:
            raise UserError("--eval_ckpt is compared with --ckpt by --eval only; add --eval or drop --eval_ckpt")
        if self.eval_ckpt is not None and not (self.eval_ckpt in RELEASES or self.eval_ckpt.startswith('hf://')
                                                or os.path.isfile(self.eval_ckpt)):
            raise UserError(f"--eval_ckpt {self.eval_ckpt} is not a release, hf://OWNER/REPO/FILE or an existing file")
        check_range(self, 'lora_rank', lo=0)
        if self.lora_rank and self.lora_alpha <= 0:
            raise UserError(f"--lora_alpha must be positive, got {self.lora_alpha}")
        bad = [t for t in self.lora_targets if t not in scale.LORA_TARGETS]
        if bad or not self.lora_targets:
            raise UserError(f"--lora_targets must name some of {' '.join(scale.LORA_TARGETS)}, got {bad or 'none'}")
        if self.fsdp and 'RANK' not in os.environ:
            raise UserError("--fsdp shards over the ranks torchrun starts; launch with torchrun --nproc_per_node N")
        if self.fsdp and self.compile:  # FSDP's per-module hooks do not fit a CUDA-graphed full-graph decode step
            raise UserError("--fsdp does not support --compile of the decode step (the c2i/t2i presets turn it "
                            "on); add --no-compile")
        check_range(self, 'kl_images', lo=0)
        self.validate_world()
        self.validate_model_and_conditions()
        check_writable_dir(self.out_dir, '--out_dir')

    def validate_world(self):
        """The miniature world (world.py): a preset or a directory it built, and the rewards that need one."""
        import world
        if self.world and self.world not in world.WORLD_PRESETS and not os.path.isdir(self.world):
            raise UserError(f"--world {self.world!r} is neither a world preset ({', '.join(world.WORLD_PRESETS)}) "
                            f"nor a directory built by world.py; pass --world demo")
        if 'world_' in self.rewards and not self.world:
            raise UserError("the world_class / world_real rewards need a world; pass --world demo (or --preset demo)")

    def validate_model_and_conditions(self):
        """Contradictions visible before loading: a prompt file for a class model (or none for a text model),
        class ids out of range, an image size that a self-describing checkpoint contradicts."""
        known = peek_gpt_config(self.ckpt) if self.ckpt else dict(model_type='c2i')
        kind = known.get('model_type')
        if kind == 'c2i' and self.prompts:
            raise UserError(f"--prompts was given but {self.ckpt or 'the random-init model'} is a class-to-image "
                            f"model; drop --prompts (use --classes) or pass a text-to-image --ckpt")
        if kind == 't2i' and not self.prompts:
            raise UserError(f"{self.ckpt} is a text-to-image model; pass --prompts FILE")
        if self.prompts:
            read_prompts(self.prompts)  # exists, decodes, holds prompts
        if kind == 'c2i' and known.get('num_classes', 1000) <= max(self.classes, default=-1):
            raise UserError(f"--classes must be in 0..{known.get('num_classes', 1000) - 1} for "
                            f"{self.ckpt or 'this model'}, got {self.classes}")
        ds = vq_downsample(self.vq_ckpt)
        if 'block_size' in known and ds:  # both grids known before loading
            side = math.isqrt(known['block_size']) * ds
            if side != self.image_size:
                raise UserError(f"--image_size {self.image_size} contradicts {self.ckpt}, a {side}-px model "
                                f"({known['block_size']} tokens); pass --image_size {side}")


TRAIN_PRESETS = {
    # the headline offline demo: world.py builds (once) a pretrained VQ, GPT, reward models and judges;
    # GRPO from that GPT, then base vs tuned vs shuffled-reward control on held-out judges (CPU, minutes)
    'demo': dict(world='demo', ckpt='', vq_ckpt='', image_size=16, classes=list(range(10)),
                 rewards='world_class=1,world_real=0.5',
                 conds_per_rank=8, group_size=8, cfg_scale=1.5, lr=3e-4, beta=0.05, max_steps=100,
                 save_every=100, grid_every=0, out_dir='out/demo'),
    # the smallest smoke run: tiny random generator + tiny random VQ + a weight-free reward
    'demo_color': dict(ckpt='', model='GPT-tiny', vq_ckpt='', image_size=16, classes=list(range(8)),
                 rewards='colorfulness=1', conds_per_rank=4, group_size=8, cfg_scale=1.0, lr=3e-3,
                 beta=0.01, max_steps=400, save_every=100, grid_every=100, out_dir='out/demo_color'),
    # the paper's settings (AR-GRPO scripts): LlamaGen c2i XL at 384 px and t2i XL at 256 px
    # (compile: CUDA graphs make the rollout ~12-20x faster on an H100 once compiled, in ~30-60 s)
    # (a global batch of images_per_step = 4 groups of 8 for c2i, 8 for t2i, split over the ranks)
    'c2i_xl': dict(ckpt='c2i_XL_384', image_size=384, vq_ckpt='vq_ds16_c2i', cfg_scale=2.0, beta=0.1,
                   max_steps=400, images_per_step=32, rewards='paper', compile=True, out_dir='out/c2i_xl'),
    'c2i_b': dict(ckpt='c2i_B_256', image_size=256, vq_ckpt='vq_ds16_c2i', cfg_scale=2.0, beta=0.1,
                  max_steps=400, images_per_step=32, rewards='paper', compile=True, out_dir='out/c2i_b'),
    't2i_xl': dict(ckpt='t2i_XL_stage1_256', image_size=256, vq_ckpt='vq_ds16_t2i', cfg_scale=4.0, beta=1.0,
                   max_steps=600, images_per_step=64, rewards='paper', compile=True, out_dir='out/t2i_xl'),
}
TINY_VQ = dict(codebook_size=64, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1], z_channels=32, ch=128)

# -----------------------------------------------------------------------------
# set-up


def setup_distributed(cfg):
    """torchrun -> (rank, world, device); plain python -> (0, 1, device)."""
    device = cfg.device if cfg.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    if 'RANK' not in os.environ:
        return 0, 1, torch.device(device)
    rank, world, local = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    if device == 'cuda':
        torch.cuda.set_device(local)
        device = f'cuda:{local}'
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    return rank, world, torch.device(device)


def print0(*args, rank=0):
    if rank == 0:
        print(*args, flush=True)


def build_models(cfg, device):
    """(policy, reference or None, vq). The reference is a frozen copy of the starting policy; under LoRA
    it is the policy itself with its adapters off (scale.AdaptersOff), so no second copy is held. With
    --fsdp the policy (and a full-fine-tuning reference) are sharded over the ranks."""
    if cfg.vq_ckpt:
        vq = load_vq(cfg.vq_ckpt, device=device)
    else:  # a seeded random tiny VQ: the demo and tests need no weights
        torch.manual_seed(cfg.seed)
        vq = VQModel(VQConfig(**TINY_VQ)).to(device).eval()
    vq.requires_grad_(False)
    ds, vocab = vq.config.downsample, vq.config.codebook_size
    load_to = torch.device('cpu') if cfg.fsdp else device  # FSDP moves each rank's shard to the device
    if cfg.ckpt:
        policy = load_gpt(cfg.ckpt, preset=cfg.model, image_size=cfg.image_size, device=load_to, downsample=ds)
    else:
        torch.manual_seed(cfg.seed)
        policy = GPT(config_for(cfg.model, cfg.image_size, ds, vocab_size=vocab)).to(load_to)
    if policy.config.vocab_size != vocab or policy.config.block_size != (cfg.image_size // ds) ** 2:
        raise UserError(f"the generator (vocab {policy.config.vocab_size}, {policy.config.block_size} tokens) does "
                        f"not fit the VQ (codebook {vocab}) at image_size {cfg.image_size}; check --ckpt/--vq_ckpt")
    policy.eval()  # dropout off: see the module docstring
    policy.grad_ckpt = cfg.grad_ckpt
    if cfg.lora_rank:
        torch.manual_seed(cfg.seed)  # the adapters' init (A random, B zero) is the same on every rank
        scale.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        ref = scale.AdaptersOff(policy) if cfg.beta > 0 else None
    else:
        ref = copy.deepcopy(policy).requires_grad_(False) if cfg.beta > 0 else None
    if cfg.fsdp:
        scale.shard(policy, device)
        if ref is not None and not cfg.lora_rank:
            scale.shard(ref, device)  # sharded too: gathered block by block for its one no-grad forward
    return policy, ref, vq


def read_prompts(path):
    """Prompts from .txt (one per line), .jsonl (GenEval metadata: "prompt" per line) or .json: a list of
    strings, AR-GRPO's t2i file (a list of {"conversations": [{"value": caption}, ...]}, the first value
    taken) or COCO captions ({"annotations": [{"caption": ...}, ...]})."""
    if not path or not os.path.isfile(path):
        raise UserError(f"prompt file {path!r} does not exist; pass --prompts FILE (.txt, .json or .jsonl)")
    try:
        text = open(path, encoding='utf-8').read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"prompt file {path} could not be read as UTF-8 text ({type(e).__name__}); pass a .txt, "
                        f".json or .jsonl file") from None
    try:
        if path.endswith('.jsonl'):
            prompts = [json.loads(line)['prompt'] for line in text.splitlines() if line.strip()]
        elif path.endswith('.json'):
            data = json.loads(text)
            if isinstance(data, dict):  # COCO captions
                prompts = [a['caption'] for a in data['annotations']]
            else:  # strings, or AR-GRPO's conversations (the first turn is the caption)
                prompts = [p['conversations'][0]['value'] if isinstance(p, dict) else p for p in data]
        else:
            prompts = [line.strip() for line in text.splitlines()]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"prompt file {path} is not a .json list of strings, of {{\"conversations\": ...}} or COCO "
                        f"captions, nor a .jsonl of {{\"prompt\": ...}} objects ({type(e).__name__}: {e})") from None
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts")
    return prompts


def check_config(cfg, policy, world=1):
    """The checks that need the loaded generator (a .pt file does not say what it holds)."""
    c = policy.config
    if c.model_type == 'c2i' and cfg.prompts:
        raise UserError(f"--prompts was given but {cfg.ckpt} is a class-to-image model; drop --prompts")
    if c.model_type == 't2i' and not cfg.prompts:
        raise UserError(f"{cfg.ckpt} is a text-to-image model; pass --prompts FILE")
    if c.model_type == 'c2i' and any(not 0 <= k < c.num_classes for k in cfg.classes):
        raise UserError(f"--classes must be in 0..{c.num_classes - 1} for {cfg.ckpt or 'this model'}, "
                        f"got {cfg.classes}")

# -----------------------------------------------------------------------------
# one GRPO step


def step_layout(cfg, world):
    """(groups in the global batch, images per rank). The global batch is images_per_step images, or
    conds_per_rank groups per rank; a group may span ranks (the paper's 32 images in groups of 8 on 8 GPUs:
    4 images a rank), since advantages are computed on the gathered rewards of the whole batch."""
    total = cfg.images_per_step or cfg.conds_per_rank * cfg.group_size * world
    return total // cfg.group_size, total // world


def draw_conditions(cfg, policy, prompts, step, n):
    """The n conditions (groups) of the global batch at this step: the same on every rank."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    if policy.config.model_type == 'c2i':
        pool = cfg.classes or list(range(policy.config.num_classes))
        return [pool[i] for i in torch.randint(len(pool), (n,), generator=g).tolist()]
    return [prompts[i] for i in torch.randint(len(prompts), (n,), generator=g).tolist()]


def encode_conditions(conds, policy, t5, device):
    """Python conditions -> (cond tensor, cond_mask or None) for the GPT."""
    if policy.config.model_type == 'c2i':
        return torch.tensor(conds, device=device), None
    emb, mask = encode_prompts(conds, *t5, max_length=policy.config.cls_token_num)
    return emb.to(device), mask.to(device)


def autocast(cfg, device):
    if device.type != 'cuda':
        return nullcontext()
    return torch.autocast('cuda', dtype=getattr(torch, cfg.dtype))


@torch.no_grad()
def rollout(cfg, policy, vq, cond, mask, gen, device):
    """One sample per row of cond (B,) or (B, L, D) -> (tokens (B, N), images (B, 3, H, W), timings)."""
    t0 = _now(device)
    with autocast(cfg, device):
        with scale.gathered(policy):  # FSDP: every block gathered once for the whole decode, then resharded
            tokens, _ = generate(policy, cond, mask, cfg.cfg_scale, cfg.cfg_interval, cfg.temperature, cfg.top_k,
                                 cfg.top_p, generator=gen, compile=cfg.compile)
        t1 = _now(device)
        images = vq.decode(tokens).float()
    return tokens, images, dict(time_rollout=t1 - t0, time_decode=_now(device) - t1)


def _now(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter()


def sequence_logprobs(cfg, model, tokens, cond, mask):
    """Per-token log-probs (B, N) of `tokens` under the policy the config trains, and the
    conditional logits (for the entropy diagnostic). One teacher-forced forward."""
    raw = model.module if hasattr(model, 'module') else model
    if cfg.logprob_mode == 'guided' and cfg.cfg_scale > 1:
        both_mask = None if mask is None else torch.cat([mask, mask])
        logits = model(torch.cat([tokens, tokens])[:, :-1], torch.cat([cond, raw.null_cond(cond)]),
                       cond_mask=both_mask)
        cond_logits, uncond_logits = logits.chunk(2)
        # the same per-token scale generate() used: CFG for tokens j <= cfg_interval + 1, then none
        mix_scale = torch.full((1, tokens.shape[1], 1), cfg.cfg_scale, device=tokens.device)
        if cfg.cfg_interval != -1:
            mix_scale[:, cfg.cfg_interval + 2:] = 1.0
    else:
        cond_logits, uncond_logits, mix_scale = model(tokens[:, :-1], cond, cond_mask=mask), None, cfg.cfg_scale
    return grpo.policy_logprobs(cond_logits, uncond_logits, tokens, cfg.logprob_mode, mix_scale, cfg.temperature), cond_logits


@torch.no_grad()
def fixed_logprobs(cfg, model, tokens, cond, mask, mb):
    """Log-probs of a whole rollout under a model that does not change during the update."""
    out = []
    for i in range(0, len(tokens), mb):
        s = slice(i, i + mb)
        out.append(sequence_logprobs(cfg, model, tokens[s], cond[s], None if mask is None else mask[s])[0])
    return torch.cat(out)


def policy_update(cfg, ddp_model, opt, batch, device):
    """num_iterations passes over the rollout in minibatches; one AdamW step per minibatch.
    Returns the averaged loss diagnostics, or None if the loss or the gradient was not finite."""
    tokens, cond, mask, adv, logp_old, ref_logp = batch
    B = len(tokens)
    mb = cfg.minibatch_size or B
    micro = cfg.micro_batch_size or mb
    sums, n = {}, 0
    for it in range(cfg.num_iterations):
        for start in range(0, B, mb):
            opt.zero_grad(set_to_none=True)
            for m in range(start, start + mb, micro):
                s = slice(m, m + micro)
                last = m + micro >= start + mb
                sync = scale.no_sync(ddp_model) if not last else nullcontext()  # reduce once per minibatch
                with sync, autocast(cfg, device):
                    logp, logits = sequence_logprobs(cfg, ddp_model, tokens[s], cond[s],
                                                     None if mask is None else mask[s])
                    old = logp.detach() if logp_old is None else logp_old[s]
                    loss, stats = grpo.grpo_loss(logp, old, adv[s], None if ref_logp is None else ref_logp[s],
                                                 cfg.beta, cfg.eps_low, cfg.eps_high)
                    (loss * (micro / mb)).backward()
                if it == 0:  # entropy of the policy that drew the samples
                    stats['entropy'] = grpo.token_entropy(logits.detach()).mean()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                sums['loss'] = sums.get('loss', 0.0) + loss.detach().float()
                n += 1
            params = [p for p in ddp_model.parameters() if p.grad is not None]
            norm = scale.clip_grad_norm(params, cfg.grad_clip if cfg.grad_clip > 0 else float('inf'))
            if not torch.isfinite(norm):
                opt.zero_grad(set_to_none=True)
                return None
            opt.step()
            sums['grad_norm'] = sums.get('grad_norm', 0.0) + norm.float()
    n_ent = n // cfg.num_iterations
    out = {k: (v / (n_ent if k == 'entropy' else n)).item() for k, v in sums.items() if k != 'grad_norm'}
    out['grad_norm'] = (sums['grad_norm'] / (cfg.num_iterations * (B // mb))).item()
    return out


def grpo_step(cfg, ctx, step):
    """One full step on this rank. Returns the metrics (this rank's, before averaging)."""
    policy, ref, vq, ddp_model, opt, reward_fn, prompts, t5, rank, world, device, start = ctx
    G = cfg.group_size
    n_groups, B = step_layout(cfg, world)
    conds = draw_conditions(cfg, policy, prompts, step, n_groups)  # the global batch's conditions
    group = torch.arange(rank * B, (rank + 1) * B) // G  # (B,) the group of each image this rank samples
    first = group[0].item()
    cond, mask = encode_conditions(conds[first:group[-1].item() + 1], policy, t5, device)  # each condition once
    cond, mask = cond[group - first], None if mask is None else mask[group - first]  # one row per image
    image_conds = [conds[g] for g in group.tolist()]  # ids or prompts, one per image
    gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step * world + rank + 7)
    t0 = _now(device)
    tokens, images, times = rollout(cfg, policy, vq, cond, mask, gen, device)
    t1 = _now(device)
    local, raw = reward_fn(images, image_conds)
    local = local.float()
    times['time_reward'] = _now(device) - t1
    total = gather_rewards(local, world)  # (B * world,) the whole batch, group-major, on every rank
    finite = torch.isfinite(local)  # a non-finite reward drops out of its group (grpo.group_advantages)
    metrics = {'reward': local[finite].mean().item(), 'nonfinite': (~finite).sum().item(), **times,
               **token_diversity(tokens, group)}
    if cfg.kl_images and start is not None:  # logged even at beta = 0: how far the policy moved from its start
        n = cfg.kl_images
        metrics['kl_start'] = kl_to_start(policy, start, tokens[:n], cond[:n], None if mask is None else mask[:n])
    if cfg.shuffle_rewards:  # the control: same rollouts, rewards permuted within each group
        total = shuffle_within_groups(total, G, cfg.seed * 1_000_003 + step)
    weights = getattr(reward_fn, 'weights', {})
    for k, v in raw.items():  # raw scores, and each term of the sum as it enters the reward
        v = v.float()[torch.isfinite(v)]
        metrics[f'{k}_mean'], metrics[f'{k}_std'] = v.mean().item(), v.std().item()
        if k in weights:
            metrics[f'term_{k}'] = weights[k] * metrics[f'{k}_mean']
    t2 = _now(device)
    stats = None
    if torch.isfinite(total).any():  # skip only when nothing is finite: the same answer on every rank
        adv = grpo.group_advantages(total, G, cfg.scale_std)[rank * B:(rank + 1) * B]  # this rank's images
        mb = cfg.micro_batch_size or cfg.minibatch_size or len(tokens)
        with autocast(cfg, device):
            ref_logp = fixed_logprobs(cfg, ref, tokens, cond, mask, mb) if ref is not None else None
            logp_old = fixed_logprobs(cfg, policy, tokens, cond, mask, mb) if cfg.num_iterations > 1 else None
        stats = policy_update(cfg, ddp_model, opt, (tokens, cond, mask, adv, logp_old, ref_logp), device)
    metrics['time_update'] = _now(device) - t2
    metrics['skipped'] = float(stats is None)
    metrics.update(stats or {})
    metrics['step_time'] = _now(device) - t0
    metrics['images_per_s'] = len(tokens) * world / metrics['step_time']
    return metrics, (images, local)


def gather_rewards(local, world):
    """(B,) rewards of this rank -> (B * world,) of the whole batch in rank order (every rank gets it)."""
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def token_diversity(tokens, group):
    """Collapse diagnostics of a rollout (B, N) whose rows belong to the groups `group` (B,): the share of
    all tokens that are the most common token, and the mean Hamming distance (fraction of positions that
    differ) between two images of the same group (NaN if no group has two images on this rank)."""
    counts = torch.bincount(tokens.flatten())
    pairs = (group[:, None] == group[None]) & ~torch.eye(len(group), dtype=torch.bool)  # (B, B) same group
    diff = (tokens[:, None] != tokens[None]).float().mean(-1)  # (B, B) fraction of positions that differ
    ham = (diff * pairs.to(diff.device)).sum() / pairs.sum()
    return dict(top_token_share=(counts.max() / tokens.numel()).item(), hamming=ham.item())


def shuffle_within_groups(total, G, seed):
    """Rewards (B,) permuted inside each group of G by a seeded generator (the shuffled-reward control)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(G, generator=g) for _ in range(len(total) // G)])  # (groups, G)
    return total.view(-1, G).gather(1, perm.to(total.device)).flatten()


@torch.no_grad()
def kl_to_start(policy, start, tokens, cond, mask=None):
    """Mean per-token KL(pi || pi_start) of the conditional next-token distributions along sampled prefixes
    (exact over the vocabulary, so it needs no reference log-probs from the loss)."""
    lp, lq = (m(tokens[:, :-1], cond, cond_mask=mask).log_softmax(-1) for m in (policy, start))  # (b, N, V)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def average_metrics(metrics, world, device):
    """Mean of every metric over ranks (the keys are the same on every rank, in the same order)."""
    if world == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    out = {k: v / world for k, v in zip(keys, t.tolist())}
    out['images_per_s'] = metrics['images_per_s']  # already counts every rank
    return out

# -----------------------------------------------------------------------------
# checkpoints


def check_in_sync(policy, world, device):
    """DDP keeps replicas identical; verify it before saving (a cheap checksum, min vs max over ranks).
    FSDP holds shards, not replicas: nothing to compare."""
    if world == 1 or scale.is_sharded(policy):
        return
    s = torch.stack([p.detach().double().sum() for p in policy.parameters()]).to(device)
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("the ranks' weights have diverged; this is a bug, please report it")
    print0(f"ranks in sync: {world} replicas hold identical weights", rank=dist.get_rank())


# -----------------------------------------------------------------------------
# logging: metrics.jsonl, image grids with rewards, the reward curve


def write_grid(path, images, total, group_size, groups=2):
    """The first `groups` groups as rows (or the part of a group this rank sampled), each image with its
    reward written under it."""
    imgs = to_uint8(images[:groups * group_size]).permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
    H, W = imgs.shape[1:3]
    zoom = max(1, 96 // W)  # tiny demo images are blown up so the text fits
    cw, ch = W * zoom, H * zoom + 14
    group_size = min(group_size, len(imgs))
    grid = Image.new('RGB', (cw * group_size, ch * (-(-len(imgs) // group_size))), 'white')
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(imgs):
        x, y = (i % group_size) * cw, (i // group_size) * ch
        grid.paste(Image.fromarray(im).resize((cw, H * zoom), Image.NEAREST), (x, y))
        draw.text((x + 2, y + H * zoom + 1), f"{total[i].item():.3f}", fill='black')
    atomic_write({path: lambda tmp: grid.save(tmp, format='PNG')})


def plot_curve(path, steps, rewards, size=(640, 360), pad=40):
    """A reward-vs-step line chart drawn with PIL (no plotting dependency): raw and smoothed."""
    keep = [i for i, r in enumerate(rewards) if math.isfinite(r)]  # skipped steps may have logged NaN
    steps, rewards = [steps[i] for i in keep] or [0], [rewards[i] for i in keep] or [0.0]
    img = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(img)
    lo, hi = min(rewards), max(rewards)
    hi = hi if hi > lo else lo + 1
    sx = lambda s: pad + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (size[0] - 2 * pad)
    sy = lambda r: size[1] - pad - (r - lo) / (hi - lo) * (size[1] - 2 * pad)
    smooth = np.convolve(rewards, np.ones(10) / 10, mode='valid') if len(rewards) >= 10 else rewards
    d.rectangle([pad, pad, size[0] - pad, size[1] - pad], outline='black')
    d.line([(sx(s), sy(r)) for s, r in zip(steps, rewards)], fill=(170, 190, 230), width=1)
    d.line([(sx(s), sy(r)) for s, r in zip(steps[len(steps) - len(smooth):], smooth)], fill=(20, 60, 200), width=2)
    d.text((pad, 10), f"mean reward per step (blue: 10-step average)   {lo:.3f} .. {hi:.3f}", fill='black')
    d.text((pad, size[1] - pad + 8), f"step {steps[0]}", fill='black')
    d.text((size[0] - pad - 60, size[1] - pad + 8), f"step {steps[-1]}", fill='black')
    atomic_write({path: lambda tmp: img.save(tmp, format='PNG')})


def read_metrics(path, upto=None):
    if not os.path.isfile(path):
        return []
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if upto is None or r['step'] <= upto]

# -----------------------------------------------------------------------------
# main


def train(cfg, hook=None):
    """The GRPO run. hook(step, policy) -> dict, if given, adds metrics to a step's log line (world.py
    logs held-out judge accuracy this way)."""
    rank, world, device = setup_distributed(cfg)
    policy, ref, vq = build_models(cfg, device)
    check_config(cfg, policy, world)
    print_memory_plan(cfg, policy.config, world, device, rank)
    reward_fn = build_reward(cfg.rewards, device=device, clip_model=cfg.clip_model,
                             clip_pretrained=cfg.clip_pretrained, hps_ckpt=cfg.hps_ckpt, judge=cfg.judge,
                             judge_url=cfg.judge_url, judge_model=cfg.judge_model, world=cfg.world)
    prompts = read_prompts(cfg.prompts) if policy.config.model_type == 't2i' else None
    t5 = load_t5(cfg.t5, device=device) if prompts else None
    if cfg.eval:  # rewards on fixed seeds, one or two checkpoints: metrics.py
        import metrics
        return metrics.reward_eval(cfg, policy, vq, reward_fn, prompts, t5, device, rank, world)
    trained = [p for p in policy.parameters() if p.requires_grad]  # all, or the LoRA adapters
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    step, bad = load_checkpoint(cfg, policy, opt) if cfg.resume else (0, 0)
    if step >= cfg.max_steps:  # a finished run: nothing to do (raise --max_steps to go on)
        print0(f"--resume: {cfg.out_dir} is at step {step} of --max_steps {cfg.max_steps}; nothing to do", rank=rank)
        return read_metrics(os.path.join(cfg.out_dir, 'metrics.jsonl'), upto=step)
    ddp_model = policy  # FSDP2 shards the policy in place: no wrapper
    if world > 1 and not cfg.fsdp:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)
    log_path = os.path.join(cfg.out_dir, 'metrics.jsonl')
    rows = read_metrics(log_path, upto=step)
    if rank == 0:  # drop lines past the checkpoint: the resumed run writes them again
        text = ''.join(json.dumps(r) + '\n' for r in rows)
        atomic_write({log_path: lambda tmp: Path(tmp).write_text(text)})
    start = ref if ref is not None or not cfg.kl_images else copy.deepcopy(policy).requires_grad_(False)
    ctx = (policy, ref, vq, ddp_model, opt, reward_fn, prompts, t5, rank, world, device, start)
    from tqdm import tqdm
    bar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, disable=rank != 0, dynamic_ncols=True)
    for step in bar:
        metrics, (images, total) = grpo_step(cfg, ctx, step)
        metrics = {'step': step + 1, **average_metrics(metrics, world, device)}
        metrics |= hook(step + 1, policy) if hook else {}
        bad = bad + 1 if metrics['skipped'] else 0
        if rank == 0:
            rows.append(metrics)
            with open(log_path, 'a') as f:
                f.write(json.dumps(metrics) + '\n')
            bar.set_postfix(reward=f"{metrics['reward']:.4f}", kl_start=f"{metrics.get('kl_start', 0):.4f}")
            if cfg.grid_every and (step + 1) % cfg.grid_every == 0:
                write_grid(os.path.join(cfg.out_dir, f'grid_{step + 1:05d}.png'), images, total, cfg.group_size)
        stop = bad >= cfg.max_bad_steps
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop:
            check_in_sync(policy, world, device)
            save_checkpoint(cfg, policy, opt, step + 1, bad, rank, world)
        if stop:
            print0(f"stopping: {bad} steps in a row had a non-finite reward or gradient; the last good weights "
                   f"are saved in {cfg.out_dir} (lower lr or check the reward models)", rank=rank)
            break
    if rank == 0 and rows:
        plot_curve(os.path.join(cfg.out_dir, 'reward_curve.png'), [r['step'] for r in rows], [r['reward'] for r in rows])
        first, last = rows[:10], rows[-10:]
        print(f"reward: first {len(first)} steps {np.mean([r['reward'] for r in first]):.4f}, "
              f"last {len(last)} steps {np.mean([r['reward'] for r in last]):.4f}; logs in {cfg.out_dir}")
    return rows


def print_memory_plan(cfg, gpt_config, world, device, rank):
    """Say up front what this run needs per rank; on a GPU, warn when it exceeds the memory and list the
    options that would fit."""
    batch = step_layout(cfg, world)[1]
    opts = dict(fsdp=cfg.fsdp, grad_ckpt=cfg.grad_ckpt, lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets,
                beta=cfg.beta, micro_batch=cfg.micro_batch_size or cfg.minibatch_size or batch, rollout_batch=batch,
                cfg=cfg.cfg_scale > 1, guided=cfg.logprob_mode == 'guided', bf16=device.type == 'cuda')
    plan = scale.memory_plan(gpt_config, world, **opts)
    names = [n for n, on in (('fsdp', cfg.fsdp), ('grad_ckpt', cfg.grad_ckpt), (f'lora r={cfg.lora_rank}',
                                                                                 cfg.lora_rank)) if on]
    print0(scale.format_plan(plan, ', '.join(names or ['full fine-tuning']) + f', micro-batch {opts["micro_batch"]}'),
           rank=rank)
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        limit = free + torch.cuda.memory_allocated(device)  # what this process may use, counting what it holds
        if plan['peak'] > 0.9 * limit:  # 10% for what the plan does not count (rewards, VQ decode, context)
            fits = [f for f in scale.fitting_options(gpt_config, limit, world, **opts) if f]
            print0(f"warning: the plan ({plan['peak'] / 2**30:.1f} GiB) exceeds this GPU's {limit / 2**30:.1f} GiB; "
                   f"options that fit: {'; '.join(fits) or 'none on this many GPUs, add GPUs and use --fsdp'}",
                   rank=rank)


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, presets=TRAIN_PRESETS)  # runs cfg.validate()
    try:
        if cfg.world:  # the miniature world: build or load it, then GRPO + the report (or --eval in it)
            import world
            if not cfg.eval:
                return world.run_demo(cfg, train)
            world.prepare(cfg)
        return train(cfg)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == '__main__':
    code = run(main, errors=(ValueError, CheckpointError, WeightsUnavailable))
    sys.stdout.flush()
    sys.stderr.flush()
    # the gloo backend sometimes aborts in its destructors at interpreter exit; skip them
    os._exit(code)
