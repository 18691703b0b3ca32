"""
train.py -- online GRPO fine-tuning of a LlamaGen generator (AR-GRPO, arXiv 2508.06924).

Each step: sample G images per condition with the KV cache and CFG -> decode with the VQ ->
score with the reward models -> group-relative advantages -> num_iterations passes of the
clipped loss + beta * KL to the frozen starting model -> AdamW step with gradient clipping.

    python train.py --preset demo                         # CPU, offline: GRPO in world.py's miniature world
    python train.py --preset demo_color                   # smallest smoke run: random GPT, colourfulness
    torchrun --nproc_per_node=8 train.py --preset c2i_xl  # the paper's class-to-image run
    torchrun --nproc_per_node=8 train.py --preset t2i_xl --prompts prompts.txt
    python train.py --preset demo --resume                # continue out_dir exactly where it stopped
    python train.py --preset demo --eval --ckpt out/demo/model.safetensors   # rewards on fixed seeds

How this departs from the paper's code (see grpo.py for the loss): a group never spans ranks;
rewards are scored batched on the device; optional num_iterations > 1 (PPO-style reuse, the
ratio and clipping then act) and logprob_mode='guided' (log-probs under the CFG mixture that
drew the tokens). Dropout is off throughout (the policy stays in eval mode) so that sampling
and scoring see the same network, which is what makes the ratio exactly 1 at the first pass.
"""
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, asdict
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import grpo
from model import GPT, CheckpointError, config_for, generate, load_gpt, save_gpt
from tokenizer import VQConfig, VQModel, load_vq
from rewards import build_reward, WeightsUnavailable
from sample import parse_config, load_t5, encode_prompts, to_uint8, UserError


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
    prompts: str = ''  # t2i: prompt file (.txt one per line, .json list, .jsonl with "prompt")
    t5: str = 'google/flan-t5-xl'  # t2i: text encoder (name or local directory)
    # rollouts
    group_size: int = 8  # G images per condition; advantages are relative to the group
    conds_per_rank: int = 2  # conditions per rank per step: conds_per_rank * G images per rank
    cfg_scale: float = 2.0  # classifier-free guidance while sampling (paper: 2.0 c2i, 4.0 t2i)
    cfg_interval: int = -1  # CFG only for the first cfg_interval + 2 tokens; -1 = every token
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # 0 = no top-k filtering (paper)
    top_p: float = 1.0  # 1 = no nucleus filtering (paper)
    # rewards
    rewards: str = 'clip=1,quality=1,hps=1'  # name=weight list, see rewards.py
    clip_model: str = 'ViT-L-14'  # open_clip architecture for clip and quality
    clip_pretrained: str = 'openai'  # open_clip tag or local file
    hps_ckpt: Optional[str] = None  # local HPS_v2.1_compressed.pt; None = fetch from the Hub
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
    eval: bool = False  # sample eval_conds with fixed seeds, print each reward's mean and std, exit
    eval_conds: int = 8  # conditions to evaluate (first classes / prompts)
    eval_images: int = 4  # images per condition in evaluation
    # the miniature world (world.py) and honest-reporting controls
    world: str = ''  # world.py preset ('demo') or dir: GRPO in it + the report; ckpt/vq_ckpt '' = the world's
    shuffle_rewards: bool = False  # control run: permute the rewards within each group before advantages
    kl_images: int = 8  # images of each rollout scored under the frozen start for the logged kl_start; 0 = off

    def validate(self):
        """Checks of the flags added for the miniature world, before anything is loaded."""
        import world
        if self.world and self.world not in world.WORLD_PRESETS and not os.path.isdir(self.world):
            raise UserError(f"--world {self.world!r} is neither a world preset ({', '.join(world.WORLD_PRESETS)}) "
                            f"nor a directory built by world.py; pass --world demo")
        if 'world_' in self.rewards and not self.world:
            raise UserError("the world_class / world_real rewards need a world; pass --world demo (or --preset demo)")
        if self.kl_images < 0:
            raise UserError(f"--kl_images must be 0 (off) or a positive number of images, got {self.kl_images}")


TRAIN_PRESETS = {
    # the headline offline demo: world.py builds (once) a pretrained VQ, GPT, reward models and judges;
    # GRPO from that GPT, then base vs tuned vs shuffled-reward control on held-out judges (CPU, minutes)
    'demo': dict(world='demo', ckpt='', vq_ckpt='', image_size=16, classes=list(range(10)), rewards='world_class=1,world_real=0.5',
                 conds_per_rank=8, group_size=8, cfg_scale=1.5, lr=3e-4, beta=0.05, max_steps=100,
                 save_every=100, grid_every=0, out_dir='out/demo'),
    # the smallest smoke run: tiny random generator + tiny random VQ + a weight-free reward
    'demo_color': dict(ckpt='', model='GPT-tiny', vq_ckpt='', image_size=16, classes=list(range(8)),
                 rewards='colorfulness=1', conds_per_rank=4, group_size=8, cfg_scale=1.0, lr=3e-3,
                 beta=0.01, max_steps=400, save_every=100, grid_every=100, out_dir='out/demo_color'),
    # the paper's settings (AR-GRPO scripts): LlamaGen c2i XL at 384 px and t2i XL at 256 px
    # (compile: CUDA graphs make the rollout ~12-20x faster on an H100 once compiled, in ~30-60 s)
    'c2i_xl': dict(ckpt='c2i_XL_384', image_size=384, vq_ckpt='vq_ds16_c2i', cfg_scale=2.0, beta=0.1,
                   max_steps=400, compile=True, out_dir='out/c2i_xl'),
    'c2i_b': dict(ckpt='c2i_B_256', image_size=256, vq_ckpt='vq_ds16_c2i', cfg_scale=2.0, beta=0.1,
                  max_steps=400, compile=True, out_dir='out/c2i_b'),
    't2i_xl': dict(ckpt='t2i_XL_stage1_256', image_size=256, vq_ckpt='vq_ds16_t2i', cfg_scale=4.0, beta=1.0,
                   max_steps=600, compile=True, out_dir='out/t2i_xl'),
}
TINY_VQ = dict(codebook_size=64, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1], z_channels=32, ch=128)
RESUME_FREE = {'kl_images', 'max_steps', 'resume', 'save_every', 'grid_every', 'eval', 'device', 'compile'}

# -----------------------------------------------------------------------------
# set-up


def setup_distributed(cfg):
    """torchrun -> (rank, world, device); plain python -> (0, 1, device)."""
    device = cfg.device if cfg.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but torch sees no GPU here; use --device cpu")
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
    """(policy, reference or None, vq). The reference is a frozen copy of the starting policy."""
    if cfg.vq_ckpt:
        vq = load_vq(cfg.vq_ckpt, device=device)
    else:  # a seeded random tiny VQ: the demo and tests need no weights
        torch.manual_seed(cfg.seed)
        vq = VQModel(VQConfig(**TINY_VQ)).to(device).eval()
    vq.requires_grad_(False)
    ds, vocab = vq.config.downsample, vq.config.codebook_size
    if cfg.ckpt:
        policy = load_gpt(cfg.ckpt, preset=cfg.model, image_size=cfg.image_size, device=device, downsample=ds)
    else:
        torch.manual_seed(cfg.seed)
        policy = GPT(config_for(cfg.model, cfg.image_size, ds, vocab_size=vocab)).to(device)
    if policy.config.vocab_size != vocab or policy.config.block_size != (cfg.image_size // ds) ** 2:
        raise UserError(f"the generator (vocab {policy.config.vocab_size}, {policy.config.block_size} tokens) does "
                        f"not fit the VQ (codebook {vocab}) at image_size {cfg.image_size}; check --ckpt/--vq_ckpt")
    policy.eval()  # dropout off: see the module docstring
    ref = copy.deepcopy(policy).requires_grad_(False) if cfg.beta > 0 else None
    return policy, ref, vq


def read_prompts(path):
    if not path or not os.path.isfile(path):
        raise UserError(f"prompt file {path!r} does not exist; pass --prompts FILE (.txt, .json or .jsonl)")
    text = open(path, encoding='utf-8').read()
    try:
        if path.endswith('.jsonl'):
            prompts = [json.loads(line)['prompt'] for line in text.splitlines() if line.strip()]
        elif path.endswith('.json'):
            prompts = list(json.loads(text))
        else:
            prompts = [line.strip() for line in text.splitlines()]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"prompt file {path} is not a .json list of strings or .jsonl of {{\"prompt\": ...}} "
                        f"objects ({type(e).__name__}: {e})") from None
    prompts = [p for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts")
    return prompts


def check_config(cfg, policy):
    if cfg.group_size < 2:
        raise UserError(f"group_size must be at least 2 (advantages are relative to the group), got {cfg.group_size}")
    if cfg.logprob_mode not in ('cond', 'guided'):
        raise UserError(f"logprob_mode must be 'cond' or 'guided', not {cfg.logprob_mode!r}")
    n = policy.config.num_classes
    if policy.config.model_type == 'c2i' and any(not 0 <= c < n for c in cfg.classes):
        raise UserError(f"class ids must be in 0..{n - 1}, got {cfg.classes}")
    batch = cfg.conds_per_rank * cfg.group_size
    mb = cfg.minibatch_size or batch
    if batch % mb or mb % (cfg.micro_batch_size or mb):
        raise UserError(f"minibatch_size {mb} must divide the batch {batch} and micro_batch_size must divide it")

# -----------------------------------------------------------------------------
# one GRPO step


def draw_conditions(cfg, policy, prompts, step, rank, world, n):
    """n conditions for this rank at this step, from a generator seeded by (seed, step, rank)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
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
def rollout(cfg, policy, vq, cond, cond_mask, gen, device):
    """G samples per condition (group-major rows) -> (tokens (B, N), images (B, 3, H, W), timings)."""
    G, t0 = cfg.group_size, _now(device)
    cond = cond.repeat_interleave(G, 0)
    mask = None if cond_mask is None else cond_mask.repeat_interleave(G, 0)
    with autocast(cfg, device):
        tokens, _ = generate(policy, cond, mask, cfg.cfg_scale, cfg.cfg_interval, cfg.temperature, cfg.top_k,
                             cfg.top_p, generator=gen, compile=cfg.compile)
        t1 = _now(device)
        images = vq.decode(tokens).float()
    return tokens, images, cond, mask, dict(time_rollout=t1 - t0, time_decode=_now(device) - t1)


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
        scale = torch.full((1, tokens.shape[1], 1), cfg.cfg_scale, device=tokens.device)
        if cfg.cfg_interval != -1:
            scale[:, cfg.cfg_interval + 2:] = 1.0
    else:
        cond_logits, uncond_logits, scale = model(tokens[:, :-1], cond, cond_mask=mask), None, cfg.cfg_scale
    return grpo.policy_logprobs(cond_logits, uncond_logits, tokens, cfg.logprob_mode, scale, cfg.temperature), cond_logits


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
                sync = ddp_model.no_sync() if hasattr(ddp_model, 'no_sync') and not last else nullcontext()
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
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float('inf'))
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
    conds = draw_conditions(cfg, policy, prompts, step, rank, world, cfg.conds_per_rank)
    cond, cond_mask = encode_conditions(conds, policy, t5, device)
    gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step * world + rank + 7)
    t0 = _now(device)
    tokens, images, cond, mask, times = rollout(cfg, policy, vq, cond, cond_mask, gen, device)
    t1 = _now(device)
    reward_conds = [c for c in conds for _ in range(cfg.group_size)]  # ids or prompts, one per image
    total, raw = reward_fn(images, reward_conds)
    total = total.float()
    times['time_reward'] = _now(device) - t1
    metrics = {'reward': total.mean().item(), **times, **token_diversity(tokens, cfg.group_size)}
    if cfg.kl_images and start is not None:  # logged even at beta = 0: how far the policy moved from its start
        n = cfg.kl_images
        metrics['kl_start'] = kl_to_start(policy, start, tokens[:n], cond[:n], None if mask is None else mask[:n])
    if cfg.shuffle_rewards:  # the control: same rollouts, rewards permuted within each group
        total = shuffle_within_groups(total, cfg.group_size, cfg.seed * 1_000_003 + step)
    for k, v in raw.items():
        metrics[f'{k}_mean'], metrics[f'{k}_std'] = v.float().mean().item(), v.float().std().item()
    ok = torch.tensor(float(torch.isfinite(total).all()), device=device)
    if world > 1:  # every rank must skip together, or DDP's all-reduce would hang
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    t2 = _now(device)
    stats = None
    if ok.item() > 0:
        adv = grpo.group_advantages(total, cfg.group_size, cfg.scale_std)
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
    return metrics, (images, total)


def token_diversity(tokens, G):
    """Collapse diagnostics of a rollout (B, N) in groups of G rows: the share of all tokens that are the
    most common token, and the mean Hamming distance (fraction of positions that differ) within a group."""
    counts = torch.bincount(tokens.flatten())
    t = tokens.view(-1, G, tokens.shape[1])  # (groups, G, N)
    ham = (t[:, :, None] != t[:, None]).float().mean(-1).sum((1, 2)) / (G * (G - 1))  # (groups,)
    return dict(top_token_share=(counts.max() / tokens.numel()).item(), hamming=ham.mean().item())


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
    """DDP keeps replicas identical; verify it before saving (a cheap checksum, min vs max over ranks)."""
    if world == 1:
        return
    s = torch.stack([p.detach().double().sum() for p in policy.parameters()]).to(device)
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("the ranks' weights have diverged; this is a bug, please report it")
    print0(f"ranks in sync: {world} replicas hold identical weights", rank=dist.get_rank())


def save_checkpoint(cfg, policy, opt, step, bad_steps):
    """model.safetensors (LlamaGen keys + GPTConfig, readable by sample.py --ckpt) and state.pt
    (optimizer, step, RNG, config). Each is written to a temp file and renamed into place."""
    save_gpt(policy, os.path.join(cfg.out_dir, 'model.safetensors'), step=step)
    state = dict(optimizer=opt.state_dict(), step=step, bad_steps=bad_steps, config=asdict(cfg),
                 rng_cpu=torch.get_rng_state(),
                 rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    path = os.path.join(cfg.out_dir, 'state.pt')
    torch.save(state, path + '.tmp')
    os.replace(path + '.tmp', path)


def load_checkpoint(cfg, policy, opt):
    """Restore policy weights, optimizer, RNG and step from out_dir. Returns (step, bad_steps)."""
    from model import read_state_dict, load_into
    path = os.path.join(cfg.out_dir, 'state.pt')
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint in {cfg.out_dir} (state.pt is missing); drop --resume to start")
    state = torch.load(path, map_location='cpu', weights_only=True)
    diff = [k for k, v in state['config'].items() if k not in RESUME_FREE and getattr(cfg, k, None) != v]
    if diff:
        raise UserError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)} "
                        f"(e.g. {diff[0]}={state['config'][diff[0]]!r} there); use the same settings")
    sd, meta = read_state_dict(os.path.join(cfg.out_dir, 'model.safetensors'))
    if int(meta.get('step', -1)) != state['step']:
        raise UserError(f"--resume: model.safetensors and state.pt in {cfg.out_dir} are from different steps")
    load_into(policy, {k: v.to(policy.output.weight.device) for k, v in sd.items()}, cfg.out_dir)
    opt.load_state_dict(state['optimizer'])
    torch.set_rng_state(state['rng_cpu'])
    if state['rng_cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['rng_cuda'])
    return state['step'], state['bad_steps']

# -----------------------------------------------------------------------------
# logging: metrics.jsonl, image grids with rewards, the reward curve


def write_grid(path, images, total, group_size, groups=2):
    """The first `groups` groups as rows, each image with its reward written under it."""
    imgs = to_uint8(images[:groups * group_size]).permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
    H, W = imgs.shape[1:3]
    scale = max(1, 96 // W)  # tiny demo images are blown up so the text fits
    cw, ch = W * scale, H * scale + 14
    grid = Image.new('RGB', (cw * group_size, ch * (len(imgs) // group_size)), 'white')
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(imgs):
        x, y = (i % group_size) * cw, (i // group_size) * ch
        grid.paste(Image.fromarray(im).resize((cw, H * scale), Image.NEAREST), (x, y))
        draw.text((x + 2, y + H * scale + 1), f"{total[i].item():.3f}", fill='black')
    grid.save(path)


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
    img.save(path)


def read_metrics(path, upto=None):
    if not os.path.isfile(path):
        return []
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if upto is None or r['step'] <= upto]

# -----------------------------------------------------------------------------
# evaluation: the same conditions and seeds for any checkpoint, so runs compare side by side


@torch.no_grad()
def evaluate(cfg, policy, vq, reward_fn, prompts, t5, device):
    pool = prompts if policy.config.model_type == 't2i' else (cfg.classes or list(range(policy.config.num_classes)))
    conds = pool[:cfg.eval_conds]
    raws, totals = {}, []
    for i, c in enumerate(conds):  # one group per condition, seeded by its index only
        cond, mask = encode_conditions([c], policy, t5, device)
        gen = torch.Generator(device).manual_seed(cfg.seed + i)
        _, images, _, _, _ = rollout(cfg, policy, vq, cond, mask, gen, device)
        total, raw = reward_fn(images, [c] * len(images))
        totals.append(total.float().cpu())
        for k, v in raw.items():
            raws.setdefault(k, []).append(v.float().cpu())
    result = {'reward': torch.cat(totals)} | {k: torch.cat(v) for k, v in raws.items()}
    print(f"eval of {cfg.ckpt or 'random init'}: {len(conds)} conditions x {cfg.eval_images} images, seed {cfg.seed}")
    for k, v in result.items():
        print(f"  {k:>14}: {v.mean():.4f} +- {v.std():.4f}")
    return {k: (v.mean().item(), v.std().item()) for k, v in result.items()}

# -----------------------------------------------------------------------------
# main


def train(cfg, hook=None):
    """The GRPO run. hook(step, policy) -> dict, if given, adds metrics to a step's log line (world.py
    logs held-out judge accuracy this way)."""
    rank, world, device = setup_distributed(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    policy, ref, vq = build_models(cfg, device)
    check_config(cfg, policy)
    reward_fn = build_reward(cfg.rewards, device=device, clip_model=cfg.clip_model,
                             clip_pretrained=cfg.clip_pretrained, hps_ckpt=cfg.hps_ckpt, world=cfg.world)
    prompts = read_prompts(cfg.prompts) if policy.config.model_type == 't2i' else None
    t5 = load_t5(cfg.t5, device=device) if prompts else None
    if cfg.eval:
        cfg.group_size = cfg.eval_images
        return evaluate(cfg, policy, vq, reward_fn, prompts, t5, device)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    step, bad = load_checkpoint(cfg, policy, opt) if cfg.resume else (0, 0)
    ddp_model = policy
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)
    log_path = os.path.join(cfg.out_dir, 'metrics.jsonl')
    rows = read_metrics(log_path, upto=step)
    if rank == 0:  # drop lines past the checkpoint: the resumed run writes them again
        with open(log_path, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
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
            if rank == 0:
                save_checkpoint(cfg, policy, opt, step + 1, bad)
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


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, presets=TRAIN_PRESETS)
    cfg.validate()
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
    try:
        main()
    except (UserError, ValueError, CheckpointError, WeightsUnavailable) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    else:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    # the gloo backend sometimes aborts in its destructors at interpreter exit; skip them
    os._exit(code)
