"""
train.py -- online GRPO fine-tuning of a LlamaGen generator (AR-GRPO, arXiv 2508.06924).

Each step: draw the conditions -> sample G images per condition with the KV cache and CFG -> decode with the
VQ and score with the reward models -> group-relative advantages -> num_iterations passes of the clipped loss
+ beta * KL to the frozen starting model -> AdamW step with gradient clipping. Read it top to bottom: the
config, then the step in call order, then the loop; the plumbing (models, checks) comes last.

    python train.py --preset demo                         # CPU, offline: GRPO in world.py's miniature world
    torchrun --nproc_per_node=8 train.py --preset c2i_xl  # the paper's class-to-image run (32 images a step)
    torchrun --nproc_per_node=8 train.py --preset t2i_xl --prompts prompts.txt
    python train.py --preset c2i_xl --resume              # continue out_dir exactly where it stopped

How this departs from the paper's code (grpo.py says how the loss departs from textbook GRPO):
  1. A group may span ranks: the step's conditions are drawn once, identically on every rank, each rank samples
     its share and the rewards are gathered, so every group's advantages see all of its images.
  2. Rewards are scored batched on the device (rewards.py), not one PIL image at a time.
  3. Dropout is off throughout (the policy stays in eval mode), so sampling and scoring see the same network;
     that is what makes the ratio exactly 1 at the first pass.
  4. Two options it lacks, off by default: num_iterations > 1 (PPO-style reuse: the ratio and the clip then act)
     and logprob_mode='guided' (log-probs under the CFG mixture that drew the tokens, instead of the
     conditional branch alone).
  5. A shuffled-reward control (--shuffle_rewards: same rollouts and updates, rewards permuted within each
     group) and the KL to the starting model, logged even at beta = 0, for honest reporting.
  6. Beyond the paper, off by default: a distribution-level reward, loo_fid (fid.py: how much each image pulls
     the moving statistics of the generated features toward the real ones), and an entropy bonus whose
     coefficient adapts toward a target entropy (grpo.py); both keep diversity that per-image rewards erode.
     At --cfg_scale 1 rollouts are guidance-free: one forward per token, sampled exactly from the policy.
Memory options: --grad_ckpt (model.py), --fsdp (distributed.py), --lora_rank (lora.py); the plan is printed at
start-up (memory.py). A save is one step directory with a `latest` pointer switched last (checkpoint.py).
"""
import copy
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import distributed
import grpo
import lora
import memory
import metrics
import scenes
import tracking
import world
import world_t2i
from checkpoint import (RELEASES, CheckpointError, check_generator, check_out_dir,
                        load_checkpoint, load_training_models, open_run, peek_gpt_config, resumed_rows,
                        save_checkpoint, training_configs, vq_downsample)
from hub import WeightsUnavailable
from cli import (UserError, atomic_write, check_device, check_range, check_seed, check_writable_dir,
                 disk_full_is_one_sentence, parse_config, run)
from conditions import encode_prompts, load_t5, read_prompts
from model import generate
from fid import LooFID
from plots import plot_curve, write_grid
from rewards import build_reward, check_reward_flags, parse_spec


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
    fid_ref: str = ''  # loo_fid: real images' statistics: an ADM reference batch .npz (mu/sigma) or images
    fid_decay: float = 0.9  # loo_fid: per-step decay of the moving moments of the generated features
    inception: Optional[str] = None  # loo_fid: TF-Inception weights (.pth); None = torch hub cache / download
    # GRPO
    beta: float = 0.1  # KL weight (paper: 0.1 c2i, 1.0 t2i); 0 = no reference model at all
    eps_low: float = 0.2  # clip range below 1
    eps_high: float = 0.2  # clip range above 1
    num_iterations: int = 1  # updates per rollout batch (paper: 1, so the ratio is always 1)
    minibatch_size: int = 0  # images per optimizer step within an iteration; 0 = the whole batch
    micro_batch_size: int = 0  # images per forward/backward (gradient accumulation); 0 = minibatch
    logprob_mode: str = 'cond'  # 'cond' (paper: conditional branch) or 'guided' (CFG mixture)
    scale_std: bool = True  # divide advantages by the group std
    entropy_coef: float = 0.0  # entropy bonus c: L - c * (mean per-token entropy of the policy); 0 = off
    entropy_target: float = 0.0  # with --entropy_lr > 0: c adapts toward this per-token entropy (nats)
    entropy_lr: float = 0.0  # step of c's adaptation, c <- max(0, c + lr (target - H)); 0 = c stays fixed
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
    overwrite: bool = False  # start over in an out_dir that holds a run (moved to out_dir/.replaced until we save)
    max_bad_steps: int = 3  # consecutive non-finite steps before saving and stopping
    # evaluation
    eval: bool = False  # sample eval_conds with fixed seeds, report each reward's mean +- s.e. (metrics.py), exit
    eval_conds: int = 8  # conditions to evaluate (first classes / prompts); 0 = all of them
    eval_images: int = 4  # images per condition in evaluation
    eval_ckpt: Optional[str] = None  # --eval: a tuned checkpoint compared with --ckpt on the same seeds (paired)
    # the miniature world (world.py) and honest-reporting controls
    world: str = ''  # world.py preset ('demo') or dir: GRPO in it + the report; ckpt/vq_ckpt '' = the world's
    world_seed: int = 0  # with a world preset: build (once) and use the world of this seed (another world)
    shuffle_rewards: bool = False  # control run: permute the rewards within each group before advantages
    kl_images: int = 8  # images of each rollout scored under the frozen start for the logged kl_start; 0 = off
    report_to: str = 'none'  # also log to 'tensorboard' (out_dir/tb) or 'wandb' (tracking.py); run.json always
    # memory (memory.py; the README's "what fits where" table says which to use)
    grad_ckpt: bool = False  # activation checkpointing: recompute each block in backward (teacher-forced pass)
    fsdp: bool = False  # shard weights, grads and AdamW state over the torchrun ranks (FSDP2)
    lora_rank: int = 0  # > 0: train rank-R LoRA adapters only, base frozen; the KL reference is the base
    lora_alpha: float = 32.0  # LoRA scale alpha / rank
    lora_targets: List[str] = field(default_factory=lambda: list(lora.LORA_TARGETS))  # linear layers to adapt

    def validate(self):  # every check that needs no model, before anything is loaded (see the bottom of the file)
        check_train_config(self)


TRAIN_PRESETS = {
    # the headline offline demo: world.py builds (once) a pretrained VQ, GPT, reward models and judges;
    # GRPO from that GPT, then base vs tuned vs shuffled-reward control on held-out judges (CPU, minutes)
    'demo': dict(world='demo', ckpt='', vq_ckpt='', image_size=16, classes=list(range(10)),
                 rewards='world_class=1,world_quality=0.5,world_real=0.5,loo_fid=0.5',
                 conds_per_rank=16, group_size=8, cfg_scale=1.0, lr=3e-4, beta=0.1, max_steps=150,
                 save_every=50, grid_every=0, out_dir='out/demo'),
    # the text-to-image miniature (issue 25): world_t2i.py builds (once) a VQ, a small T5, a t2i GPT, a detector,
    # a contrastive image-text model, quality and realism nets and a held-out GenEval judge; GRPO on the train
    # captions, then base vs tuned vs shuffled-reward control on the held-out judge, seen and unseen prompts
    'demo_t2i': dict(world='demo_t2i', ckpt='', vq_ckpt='', t5='', image_size=24,
                     rewards='geneval=1,world_clip=0.5,world_quality=0.25,world_real=0.25,loo_fid=1',
                     conds_per_rank=16, group_size=8, cfg_scale=1.0, lr=5e-4, beta=0.02, max_steps=100,
                     save_every=50, grid_every=0, out_dir='out/demo_t2i'),
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
@dataclass
class Run:
    """Everything a step needs besides the config: built once by train(), passed to every step."""
    policy: torch.nn.Module  # the GPT being trained (FSDP2-sharded in place with --fsdp)
    ref: Any  # the frozen reference of the KL term, or None (beta = 0); under LoRA the policy, adapters off
    start: Any  # the starting model kl_start is measured against (the reference, or a frozen copy), or None
    vq: torch.nn.Module  # the frozen VQ decoder
    ddp_model: torch.nn.Module  # the policy as the update calls it: DDP-wrapped on several ranks
    opt: Optional[torch.optim.Optimizer]  # AdamW over the trained parameters (None until training starts)
    reward_fn: Any  # rewards.CombinedReward: (images, conditions) -> (total (B,), {name: raw (B,)})
    prompts: Optional[List[str]]  # t2i prompts, None for class-to-image
    t5: Any  # (tokenizer, encoder) for t2i, else None
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device('cpu')
    entropy_coef: float = 0.0  # the entropy bonus's coefficient now (adapted each step with --entropy_lr)
    save_meta: dict = field(default_factory=dict)  # more of model.safetensors' header (world.checkpoint_metadata)
    sampler: Any = None  # the rollout's 16-bit copy of the policy (GPU; rollout_policy), made at the first rollout

# -----------------------------------------------------------------------------
# one GRPO step, in call order: conditions -> rollout -> decode and score -> advantages -> update


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


def condition_tensors(run, conds, group):
    """This rank's images' conditions: (cond (B,) or (B, L, D), cond_mask or None, B Python conditions).
    Each condition is encoded once (T5 is costly), then repeated for the images of its group."""
    first = group[0].item()
    mine = conds[first:group[-1].item() + 1]
    if run.policy.config.model_type == 'c2i':
        cond, mask = torch.tensor(mine, device=run.device), None
    else:
        emb, mask = encode_prompts(mine, *run.t5, max_length=run.policy.config.cls_token_num)
        cond, mask = emb.to(run.device), mask.to(run.device)
    cond, mask = cond[group - first], None if mask is None else mask[group - first]  # one row per image
    return cond, mask, [conds[g] for g in group.tolist()]


@torch.no_grad()
def rollout(cfg, policy, vq, cond, mask, gen, device):
    """One sample per row of cond (B,) or (B, L, D) -> (tokens (B, N), images (B, 3, H, W), timings).
    `policy` is what rollout_policy returns: a 16-bit copy runs as it is, float32 weights under autocast."""
    t0 = _now(device)
    low = next(policy.parameters()).dtype != torch.float32  # the sampler copy: no autocast casts per token
    with nullcontext() if low else autocast(cfg, device):
        with distributed.gathered(policy):  # FSDP: every block gathered once for the whole decode, then resharded
            tokens, _ = generate(policy, cond, mask, cfg.cfg_scale, cfg.cfg_interval, cfg.temperature, cfg.top_k,
                                 cfg.top_p, generator=gen, compile=cfg.compile)
    t1 = _now(device)
    with autocast(cfg, device):
        images = vq.decode(tokens).float()
    return tokens, images, dict(time_rollout=t1 - t0, time_decode=_now(device) - t1)


def rollout_policy(cfg, run):
    """The network the rollout samples from. On a GPU with a 16-bit --dtype, a copy of the policy in that dtype,
    made once and refreshed from the float32 weights before every rollout, i.e. after every optimizer step (what
    RL trainers do with their inference engine: verl, OpenRLHF, TRL + vLLM): each decoded token reads 2 bytes per
    weight instead of autocast casting 4-byte weights. Elsewhere (CPU, --dtype float32, --fsdp) the policy itself.

    The loss never sees the sampler's log-probs: the update recomputes every log-prob with the float32 policy
    (GRPO's "old" log-probs are that recomputation, detached, at num_iterations 1, and fixed_logprobs of the
    same policy before the first update otherwise), so the ratio starts at exactly 1 and the gradient is the
    policy's own. The only effect of the 16-bit sampler is that the tokens come from a slightly different
    distribution: bench.py --only step_paper prints the gap |log p_sampler - log p_policy| per token."""
    if run.device.type != 'cuda' or cfg.dtype == 'float32' or cfg.fsdp:
        return run.policy
    run.sampler = inference_copy(run.policy, getattr(torch, cfg.dtype), run.sampler)
    return run.sampler


@torch.no_grad()
def inference_copy(policy, dtype, old=None):
    """A frozen eval-mode copy of `policy` with its weights in `dtype`, or `old` with the policy's current weights
    cast into it (no new memory). RoPE's table is a plain attribute and stays float32, as under autocast."""
    if old is None:
        new = copy.deepcopy(policy).requires_grad_(False).eval()
        for p in new.parameters():
            p.grad = None  # a deep copy also copies the gradients left by the last update
        return new.to(dtype)
    old.load_state_dict(policy.state_dict())  # copy_ casts float32 -> dtype in place
    return old


def score(cfg, run, images, image_conds):
    """Rewards of this rank's images and of the whole batch: (local (B,), total (B * world,) group-major on
    every rank, metrics: the mean reward, each raw score's mean and std, each weighted term, the time)."""
    t0 = _now(run.device)
    local, raw = run.reward_fn(images, image_conds)
    local = local.float()
    metrics = {'time_reward': _now(run.device) - t0}
    total = distributed.all_gather_cat(local, run.world)  # (B * world,) the whole batch, on every rank
    finite = torch.isfinite(local)  # a non-finite reward drops out of its group (grpo.group_advantages)
    metrics |= {'reward': local[finite].mean().item(), 'nonfinite': (~finite).sum().item()}
    weights = getattr(run.reward_fn, 'weights', {})
    for k, v in raw.items():  # raw scores, and each term of the sum as it enters the reward
        v = v.float()[torch.isfinite(v)]
        metrics[f'{k}_mean'], metrics[f'{k}_std'] = v.mean().item(), v.std().item()
        if k in weights:
            metrics[f'term_{k}'] = weights[k] * metrics[f'{k}_mean']
    for k, s in stateful_rewards(run).items():  # a distribution-level reward: the batch FD after its update
        metrics[f'{k}_fd'] = s.last['fd']
    return local, total, metrics


def advantages(cfg, total, step, rank, B):
    """This rank's slice (B,) of the group-relative advantages of the whole batch, or None when no reward of
    any rank is finite (then every rank skips the update). The control shuffles within groups first."""
    if cfg.shuffle_rewards:  # the control: same rollouts, rewards permuted within each group
        total = shuffle_within_groups(total, cfg.group_size, cfg.seed * 1_000_003 + step)
    if not torch.isfinite(total).any():  # the same answer on every rank
        return None
    return grpo.group_advantages(total, cfg.group_size, cfg.scale_std)[rank * B:(rank + 1) * B]


def sequence_logprobs(cfg, model, tokens, cond, mask):
    """Per-token log-probs (B, N) of `tokens` under the policy the config trains, and that policy's logits
    (B, N, V): the conditional branch's, or in 'guided' mode the CFG mixture's (for the entropy). One
    teacher-forced forward."""
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
    logp = grpo.policy_logprobs(cond_logits, uncond_logits, tokens, cfg.logprob_mode, mix_scale, cfg.temperature)
    return logp, cond_logits if uncond_logits is None else grpo.cfg_mix(cond_logits, uncond_logits, mix_scale)


@torch.no_grad()
def fixed_logprobs(cfg, model, tokens, cond, mask, mb):
    """Log-probs of a whole rollout under a model that does not change during the update."""
    out = []
    for i in range(0, len(tokens), mb):
        s = slice(i, i + mb)
        out.append(sequence_logprobs(cfg, model, tokens[s], cond[s], None if mask is None else mask[s])[0])
    return torch.cat(out)


def policy_update(cfg, ddp_model, opt, batch, device, entropy_coef=0.0):
    """num_iterations passes over the rollout in minibatches; one AdamW step per minibatch; with entropy_coef c,
    the loss is L - c H (grpo.mean_token_entropy). Returns the averaged loss diagnostics, or None if the loss or
    the gradient was not finite."""
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
                sync = distributed.no_sync(ddp_model) if not last else nullcontext()  # reduce once per minibatch
                with sync, autocast(cfg, device):
                    logp, logits = sequence_logprobs(cfg, ddp_model, tokens[s], cond[s],
                                                     None if mask is None else mask[s])
                    old = logp.detach() if logp_old is None else logp_old[s]  # the paper: rho == 1
                    loss, stats = grpo.grpo_loss(logp, old, adv[s], None if ref_logp is None else ref_logp[s],
                                                 cfg.beta, cfg.eps_low, cfg.eps_high)
                    if entropy_coef:  # a bonus on the entropy of the next-token distributions along the samples
                        stats['entropy_bonus'] = grpo.mean_token_entropy(logits, cfg.temperature)
                        loss = loss - entropy_coef * stats['entropy_bonus']
                    (loss * (micro / mb)).backward()  # accumulate the minibatch mean
                if it == 0:  # entropy of the policy that drew the samples
                    stats['entropy'] = grpo.token_entropy(logits.detach()).mean()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                sums['loss'] = sums.get('loss', 0.0) + loss.detach().float()
                n += 1
                del logits, logp, loss, stats  # else the float32 (b, N, V) logits live on through the next forward
            params = [p for p in ddp_model.parameters() if p.grad is not None]
            norm = distributed.clip_grad_norm(params, cfg.grad_clip if cfg.grad_clip > 0 else float('inf'))
            if not torch.isfinite(norm):  # skip the step rather than poison the weights
                opt.zero_grad(set_to_none=True)
                return None
            opt.step()
            sums['grad_norm'] = sums.get('grad_norm', 0.0) + norm.float()
    n_ent = n // cfg.num_iterations
    out = {k: (v / (n_ent if k == 'entropy' else n)).item() for k, v in sums.items() if k != 'grad_norm'}
    out['grad_norm'] = (sums['grad_norm'] / (cfg.num_iterations * (B // mb))).item()
    return out


def grpo_step(cfg, run, step):
    """One full step on this rank. Returns (this rank's metrics, before averaging; (images, rewards))."""
    n_groups, B = step_layout(cfg, run.world)
    conds = draw_conditions(cfg, run.policy, run.prompts, step, n_groups)  # the global batch's conditions
    group = torch.arange(run.rank * B, (run.rank + 1) * B) // cfg.group_size  # (B,) the group of each image here
    cond, mask, image_conds = condition_tensors(run, conds, group)
    gen = torch.Generator(run.device).manual_seed(cfg.seed * 1_000_003 + step * run.world + run.rank + 7)
    t0 = _now(run.device)
    tokens, images, times = rollout(cfg, rollout_policy(cfg, run), run.vq, cond, mask, gen, run.device)
    local, total, metrics = score(cfg, run, images, image_conds)
    metrics |= times | token_diversity(tokens, group)
    if cfg.kl_images and run.start is not None:  # logged even at beta = 0: how far the policy moved from its start
        n = cfg.kl_images
        metrics['kl_start'] = kl_to_start(run.policy, run.start, tokens[:n], cond[:n],
                                          None if mask is None else mask[:n])
    t2 = _now(run.device)
    adv, stats = advantages(cfg, total, step, run.rank, B), None
    if adv is not None:
        mb = cfg.micro_batch_size or cfg.minibatch_size or len(tokens)
        with autocast(cfg, run.device):
            ref_logp = fixed_logprobs(cfg, run.ref, tokens, cond, mask, mb) if run.ref is not None else None
            logp_old = fixed_logprobs(cfg, run.policy, tokens, cond, mask, mb) if cfg.num_iterations > 1 else None
        stats = policy_update(cfg, run.ddp_model, run.opt, (tokens, cond, mask, adv, logp_old, ref_logp), run.device,
                              run.entropy_coef)
    metrics['time_update'] = _now(run.device) - t2
    metrics['entropy_coef'] = run.entropy_coef
    if stats and cfg.entropy_lr:  # every rank adapts c from the same (rank-averaged) entropy
        h = distributed.average_metrics({'entropy': stats['entropy']}, run.world, run.device)['entropy']
        run.entropy_coef = grpo.adapt_entropy_coef(run.entropy_coef, h, cfg.entropy_target, cfg.entropy_lr)
    metrics['skipped'] = float(stats is None)
    metrics |= stats or {}
    metrics['step_time'] = _now(run.device) - t0
    metrics['images_per_s'] = len(tokens) * run.world / metrics['step_time']
    return metrics, (images, local)

# -----------------------------------------------------------------------------
# diagnostics of a rollout: collapse, the shuffled control, how far the policy moved


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

# -----------------------------------------------------------------------------
# the loop


def train(cfg, hook=None):
    """The GRPO run. hook(step, policy) -> dict, if given, adds metrics to a step's log line (world.py
    logs held-out judge accuracy this way)."""
    run = setup(cfg)
    if cfg.eval:  # rewards on fixed seeds, one or two checkpoints: metrics.py
        return metrics.reward_eval(cfg, run.policy, run.vq, run.reward_fn, run.prompts, run.t5, run.device,
                                   run.rank, run.world)
    with open_run(cfg, run.rank, run.world):  # one writer of out_dir; an earlier run is never silently lost
        step, bad = start_training(cfg, run)
        return loop(cfg, run, step, bad, hook)


def loop(cfg, run, step, bad, hook):
    """Steps from `step` to max_steps: a GRPO step, the averaged metrics logged (metrics.jsonl, one line, the
    bar), a grid now and then, a save every save_every steps; stop after max_bad_steps skipped steps in a row."""
    log_path = os.path.join(cfg.out_dir, 'metrics.jsonl')
    rows, repaired = resumed_rows(cfg.out_dir, step) if run.rank == 0 else ([], False)  # lost rows: from the save
    if run.rank == 0 and (step < cfg.max_steps or repaired):  # lines past the save go: the run writes them again
        text = ''.join(json.dumps(r) + '\n' for r in rows)
        atomic_write({log_path: lambda tmp: Path(tmp).write_text(text)})
    if step >= cfg.max_steps:  # a finished run: nothing to do (raise --max_steps to go on)
        distributed.print0(f"--resume: {cfg.out_dir} is at step {step} of --max_steps {cfg.max_steps}; nothing to do")
        return rows
    bar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, disable=run.rank != 0,
               dynamic_ncols=True)
    tracker = tracking.open_tracker(cfg, run.rank, step)  # run.json, and --report_to's TensorBoard or wandb
    for step in bar:
        metrics, (images, rewards) = grpo_step(cfg, run, step)
        metrics = {'step': step + 1, **distributed.average_metrics(metrics, run.world, run.device)}
        metrics |= hook(step + 1, run.policy) if hook else {}
        bad = bad + 1 if metrics['skipped'] else 0
        if run.rank == 0:
            rows.append(metrics)
            with disk_full_is_one_sentence(log_path), open(log_path, 'a') as f:  # a torn line is dropped on resume
                f.write(json.dumps(metrics) + '\n')
            tracker.log(metrics)
            bar.set_postfix(reward=f"{metrics['reward']:.4f}", kl_start=f"{metrics.get('kl_start', 0):.4f}")
            bar.write(log_line(metrics, cfg.max_steps))
            if cfg.grid_every and (step + 1) % cfg.grid_every == 0:
                grid = os.path.join(cfg.out_dir, f'grid_{step + 1:05d}.png')
                write_grid(grid, images, rewards, cfg.group_size)
                tracker.image('reward_grid', grid, step + 1)
        stop = bad >= cfg.max_bad_steps
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop:
            distributed.check_in_sync(run.policy, run.world, run.device)
            save_checkpoint(cfg, run.policy, run.opt, step + 1, bad, run.rank, run.world, training_state(run), rows,
                            run.save_meta)
        if stop:
            distributed.print0(f"stopping: {bad} steps in a row had a non-finite reward or gradient; the last good "
                               f"weights are saved in {cfg.out_dir} (lower lr or check the reward models)")
            break
    tracker.close()
    if run.rank == 0 and rows:
        plot_curve(os.path.join(cfg.out_dir, 'reward_curve.png'), [r['step'] for r in rows],
                   [r['reward'] for r in rows])
        first, last = rows[:10], rows[-10:]
        print(f"reward: first {len(first)} steps {np.mean([r['reward'] for r in first]):.4f}, "
              f"last {len(last)} steps {np.mean([r['reward'] for r in last]):.4f}; logs in {cfg.out_dir}")
    return rows


def log_line(m, max_steps):
    """One plain line per step, as nanoGPT prints: step, mean reward, KL to the start (exact, on kl_images
    images; else the loss's k3 estimate), time."""
    kl = m.get('kl_start', m.get('kl', 0.0))
    return (f"step {m['step']}/{max_steps} | reward {m['reward']:.4f} | kl {kl:.4f} | "
            f"{m['step_time']:.2f} s" + (" | skipped" if m['skipped'] else ""))


# -----------------------------------------------------------------------------
# set-up: processes, models, rewards (plumbing; the algorithm is above)


def setup(cfg):
    """torchrun or not, the models, the reward and the conditions -> a Run (no optimizer yet)."""
    rank, world_size, device = distributed.init(cfg.device)
    # the plan from the configs alone (flags, release table, file headers): a run that cannot fit is refused,
    # naming the option that makes it fit, before a weight is read or allocated
    memory.print_plan(cfg, training_configs(cfg)[0], world_size, device, step_layout(cfg, world_size)[1])
    policy, ref, vq = load_training_models(cfg, device)
    reward_fn = build_reward(cfg.rewards, device=device, clip_model=cfg.clip_model,
                             clip_pretrained=cfg.clip_pretrained, hps_ckpt=cfg.hps_ckpt, judge=cfg.judge,
                             judge_url=cfg.judge_url, judge_model=cfg.judge_model, extra=extra_rewards(cfg, device))
    prompts = read_prompts(cfg.prompts) if policy.config.model_type == 't2i' else None
    if prompts and world_t2i.is_t2i(cfg.world):
        prompts = scenes.canonical_prompts(prompts)  # as the world's captions are written
    t5 = load_t5(cfg.t5, device=device) if prompts else None
    return Run(policy, ref, None, vq, policy, None, reward_fn, prompts, t5, rank, world_size, device,
               save_meta=world.checkpoint_metadata(cfg.world) if cfg.world else {})


def extra_rewards(cfg, device):
    """The scorers build_reward cannot make alone: the miniature world's learned rewards (world.py), and the
    leave-one-out FID reward on TF-Inception features against --fid_ref (metrics.py) for a real run."""
    room = world_t2i if world_t2i.is_t2i(cfg.world) else world  # the text-to-image world, or world.py's
    extra = room.reward_scorers(cfg.world, cfg.rewards, cfg.fid_decay) if cfg.world else {}
    if 'loo_fid' in parse_spec(cfg.rewards, EXTRA_REWARDS) and 'loo_fid' not in extra:
        extra['loo_fid'] = metrics.loo_fid_reward(cfg.fid_ref, cfg.fid_decay, device, cfg.inception)
    return extra


def stateful_rewards(run):
    """{name: scorer} of the rewards with state of their own (the moving statistics of loo_fid)."""
    return {k: s for k, s in getattr(run.reward_fn, 'scorers', {}).items() if isinstance(s, LooFID)}


def training_state(run):
    """What a save holds beyond weights and optimizer: the rewards' own state, the entropy coefficient."""
    return dict(rewards={k: s.state_dict() for k, s in stateful_rewards(run).items()}, entropy_coef=run.entropy_coef)


def start_training(cfg, run):
    """The optimizer, the resumed state (step, bad steps, rewards' state, entropy coefficient), the DDP wrapper and
    kl_start's reference."""
    trained = [p for p in run.policy.parameters() if p.requires_grad]  # all, or the LoRA adapters
    run.opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    run.entropy_coef = cfg.entropy_coef
    step, bad, extra = load_checkpoint(cfg, run.policy, run.opt) if cfg.resume else (0, 0, {})
    for k, s in stateful_rewards(run).items():
        if k in extra.get('rewards', {}):
            s.load_state_dict(extra['rewards'][k])
    run.entropy_coef = extra.get('entropy_coef', run.entropy_coef)
    if step < cfg.max_steps and run.world > 1 and not cfg.fsdp:  # FSDP2 shards the policy in place: no wrapper
        run.ddp_model = torch.nn.parallel.DistributedDataParallel(
            run.policy, device_ids=[run.device.index] if run.device.type == 'cuda' else None, broadcast_buffers=False)
    run.start = run.ref if run.ref is not None or not cfg.kl_images else \
        copy.deepcopy(run.policy).requires_grad_(False)
    return step, bad


def autocast(cfg, device):
    if device.type != 'cuda':
        return nullcontext()
    return torch.autocast('cuda', dtype=getattr(torch, cfg.dtype))


def _now(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter()

EXTRA_REWARDS = tuple(dict.fromkeys(world.REWARDS + world_t2i.REWARDS))  # extra_rewards()' scorers: both worlds

# -----------------------------------------------------------------------------
# checks (skip on a first reading): validate() runs them before anything is loaded; each room checks its own
# flags (world, rewards, lora, distributed, checkpoint.check_generator)


def check_train_config(cfg):
    """Every check that needs no model, run by parse_config before anything is loaded or sampled:
    ranges, choices, contradictions, input files, the output directory. Raises UserError."""
    check_seed(cfg, 'seed world_seed')  # before anything derives a generator from them
    check_range(cfg, 'group_size', lo=2)  # advantages are relative to the group
    check_range(cfg, 'conds_per_rank num_iterations max_steps save_every max_bad_steps eval_images image_size', lo=1)
    check_range(cfg, 'top_k minibatch_size micro_batch_size grid_every beta weight_decay grad_clip cfg_scale '
                     'eval_conds images_per_step kl_images', lo=0)
    check_range(cfg, 'cfg_interval', lo=-1)
    check_range(cfg, 'temperature lr', lo=0, lo_open=True)  # log-probs divide by the temperature
    check_range(cfg, 'top_p', lo=0, hi=1, lo_open=True)
    check_range(cfg, 'eps_low', lo=0, hi=1, hi_open=True)
    check_range(cfg, 'eps_high', lo=0)
    for name, allowed in (('logprob_mode', ('cond', 'guided')), ('dtype', ('bfloat16', 'float16', 'float32'))):
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    check_device(cfg.device)
    if any(c < 0 for c in cfg.classes):
        raise UserError(f"--classes must be class ids >= 0, got {cfg.classes}")
    check_batch(cfg)
    (world_t2i if world_t2i.is_t2i(cfg.world) else world).check_flags(cfg.world, cfg.rewards, cfg.world_seed)
    if cfg.world in world.WORLD_PRESETS and not os.path.isfile(os.path.join(world.resolve(cfg.world, cfg.world_seed),
                                                                             'world.json')):  # to be built there
        check_writable_dir(world.cache_root(), f'the world cache (${world.CACHE_ENV}, default out/world)')
    check_reward_flags(cfg.rewards, EXTRA_REWARDS, cfg.judge_url, cfg.judge)
    check_loo_fid(cfg)
    lora.check_flags(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    distributed.check_flags(cfg.fsdp, cfg.compile)
    tracking.check_flag(cfg.report_to)
    if cfg.eval_ckpt is not None and not cfg.eval:
        raise UserError("--eval_ckpt is compared with --ckpt by --eval only; add --eval or drop --eval_ckpt")
    if cfg.eval_ckpt is not None and not (cfg.eval_ckpt in RELEASES or cfg.eval_ckpt.startswith('hf://')
                                          or os.path.isfile(cfg.eval_ckpt)):
        raise UserError(f"--eval_ckpt {cfg.eval_ckpt} is not a release, hf://OWNER/REPO/FILE or an existing file")
    if cfg.prompts:
        prompts = read_prompts(cfg.prompts)  # exists, decodes, holds prompts
        if world_t2i.is_t2i(cfg.world):  # the miniature knows only its world's words
            scenes.canonical_prompts(prompts)
    check_generator(peek_gpt_config(cfg.ckpt) if cfg.ckpt else dict(model_type='c2i'), cfg.ckpt or 'the random-init '
                    'model', bool(cfg.prompts), cfg.classes, cfg.image_size, vq_downsample(cfg.vq_ckpt))
    check_writable_dir(cfg.out_dir, '--out_dir')
    if not cfg.eval:  # an evaluation only adds eval.json; a run is never replaced unasked
        check_out_dir(cfg)


def check_loo_fid(cfg):
    """The distribution-level reward needs a reference (the world's train split, or --fid_ref) and a training run."""
    check_range(cfg, 'fid_decay', lo=0, hi=1, hi_open=True)
    check_range(cfg, 'entropy_coef entropy_target entropy_lr', lo=0)
    if cfg.entropy_lr and not cfg.entropy_target:
        raise UserError("--entropy_lr adapts the entropy coefficient toward --entropy_target; set a target in nats "
                        "(e.g. a fraction of the base model's `entropy` in metrics.jsonl)")
    if 'loo_fid' not in parse_spec(cfg.rewards, EXTRA_REWARDS):
        return
    if cfg.eval:
        raise UserError("loo_fid is a training reward (it scores an image against the run's moving statistics); "
                        "drop it from --rewards for --eval")
    if not cfg.world:
        if not cfg.fid_ref:
            raise UserError("the loo_fid reward needs reference statistics of real images; pass --fid_ref FILE (an "
                            "ADM reference batch such as VIRTUAL_imagenet256_labeled.npz, or images)")
        metrics.check_image_set(cfg.fid_ref, '--fid_ref', stats_ok=True)


def check_batch(cfg):
    """The global batch splits into whole groups and ranks; minibatches and micro-batches divide it."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if cfg.images_per_step % cfg.group_size or cfg.images_per_step % world_size:
        raise UserError(f"--images_per_step {cfg.images_per_step} must be a multiple of --group_size "
                        f"{cfg.group_size} and of the {world_size} rank(s) it is split over")
    _, batch = step_layout(cfg, world_size)  # images per rank
    mb = cfg.minibatch_size or batch
    if batch % mb or mb % (cfg.micro_batch_size or mb):
        raise UserError(f"--minibatch_size {mb} must divide the {batch} images each rank samples per step, and "
                        f"--micro_batch_size must divide the minibatch")


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, presets=TRAIN_PRESETS)  # runs cfg.validate()
    try:
        if cfg.world:  # the miniature world: build or load it, then GRPO + the report (or --eval in it)
            room = world_t2i if world_t2i.is_t2i(cfg.world) else world  # text-to-image or class-to-image
            if not cfg.eval:
                return room.run_demo(cfg, train)
            room.prepare(cfg)
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
