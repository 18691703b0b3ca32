"""
bench.py -- measured speed of sampling, rewards and a GRPO step, each against a baseline in the same run.

    python bench.py                  # CPU: GPT-B shape at 128 px (64 tokens; the recompute baseline is O(N^2))
    python bench.py --device cuda    # GPU: GPT-B at 256 px (256 tokens), LlamaGen's sampling settings, bf16
    python bench.py --quick          # tiny shapes, seconds: shows that everything runs
    python bench.py --only memory    # bytes per rank of one GRPO update: GPT-B / GPT-XL x {DDP, grad_ckpt,
                                     # LoRA r=16, FSDP 2 ranks} (memory.memory_plan), next to a measured peak
    torchrun --nproc_per_node 2 bench.py --only gather   # FSDP rollout: per-block all-gathers vs gathered once
    python bench.py --only loo_fid   # the leave-one-out FID reward at d = 2048, B = 32 vs B + 1 FDs from scratch
    python bench.py --device cuda --only step_paper   # the paper's c2i step (GPT-XL, 576 tokens, 32 images), eager
                                     # and compiled: parts, HBM floor, TFLOP/s, peak vs plan, log-prob gap

Prints one JSON line per measurement (name, value, unit, and for comparisons baseline and ratio), then a
table. Timings are medians of --reps runs after one warm-up. All weights are random: speed does not
depend on them. Never used for assertions: tests only run --quick to show it works. The memory section
measures the peak of one forward/backward (torch.cuda.max_memory_allocated on a GPU; on a CPU the profiler's
allocation events of a tiny model) and prints it next to memory.py's estimate of the same thing.
"""
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import List

import torch

from cli import UserError, check_device, check_range, check_writable_file, parse_config, run
from model import GPT, GPT_PRESETS, config_for, generate, sample_logits
from tokenizer import VQConfig, VQModel, VQ_PRESETS


@dataclass
class BenchConfig:
    device: str = 'cpu'  # 'cpu' or 'cuda'
    quick: bool = False  # tiny shapes: a smoke run in seconds
    model: str = 'GPT-B'  # GPT preset for the sampling benchmarks
    image_size: int = 0  # 0 = 256 on cuda, 128 on cpu (64 tokens: the recompute baseline is quadratic)
    batch: int = 8  # conditions per sampling batch (CFG doubles the forward batch)
    cfg_scale: float = 4.0  # LlamaGen's c2i default
    top_k: int = 2000  # LlamaGen's c2i default
    reps: int = 3  # timed repetitions; the median is reported
    reward_batch: int = 32  # images per reward batch
    clip_model: str = ''  # open_clip architecture for the reward benchmark; '' = ViT-L-14 on cuda, ViT-B-32 on cpu
    compile: bool = False  # GRPO-step section: torch.compile the rollout's decode step (train.py --compile)
    judge_batch: int = 16  # images per judge batch
    judge_tokens: int = 20  # the paper-style baseline generates this many answer tokens per image
    loo_dim: int = 2048  # loo_fid section: feature size d (2048 = Inception pool features)
    loo_batch: int = 32  # loo_fid section: global batch B (the paper's c2i step)
    paper_model: str = 'GPT-XL'  # step_paper section: GPT preset (the paper's c2i run: GPT-XL)
    paper_image_size: int = 384  # step_paper section: pixels through the VQ-16 (384 = 576 tokens, the paper's)
    only: List[str] = field(default_factory=list)  # run only these sections (SECTIONS); [] = DEFAULT_SECTIONS
    out: str = ''  # also append the JSON lines to this file

    def validate(self):
        """Checked before anything is built or timed (cli.parse_config calls it)."""
        check_device(self.device)
        check_range(self, 'batch reps reward_batch judge_batch judge_tokens loo_dim', lo=1)
        check_range(self, 'loo_batch', lo=2)
        check_range(self, 'image_size top_k cfg_scale', lo=0)
        if self.image_size % 16:
            raise UserError(f"--image_size must be a multiple of 16 (the VQ-16 grid), got {self.image_size}")
        for flag in ('model', 'paper_model'):
            if getattr(self, flag) not in GPT_PRESETS:
                raise UserError(f"--{flag} must be one of {', '.join(GPT_PRESETS)}, got {getattr(self, flag)!r}")
        if self.paper_image_size < 16 or self.paper_image_size % 16:
            raise UserError(f"--paper_image_size must be a positive multiple of 16, got {self.paper_image_size}")
        unknown = set(self.only) - set(SECTIONS)
        if unknown:
            raise UserError(f"--only takes sections among {' '.join(SECTIONS)}, got {' '.join(sorted(unknown))}")
        if self.out:
            check_writable_file(self.out, '--out')


DEFAULT_SECTIONS = ('kv', 'cfg', 'compile', 'reward', 'judge', 'step')  # what a plain run measures
SECTIONS = DEFAULT_SECTIONS + ('memory', 'gather', 'loo_fid', 'step_paper')  # what --only can pick (gather: torchrun)

RESULTS = []


def report(name, value, unit, baseline=None, **extra):
    row = dict(name=name, value=float(f'{value:.6g}'), unit=unit, **extra)  # 6 significant digits
    if baseline is not None:
        ratio = value / baseline if 'per_s' in unit else baseline / value
        row.update(baseline=float(f'{baseline:.6g}'), ratio=round(ratio, 2))
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def seconds(fn, device):
    """Seconds of one run of fn()."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timed(fn, reps, device):
    """Median seconds of fn() over reps runs, after one warm-up run."""
    fn()
    return statistics.median(seconds(fn, device) for _ in range(reps))

# -----------------------------------------------------------------------------
# baselines: what generate() would cost without its two main tricks


@torch.no_grad()
def generate_recompute(model, cond, cfg_scale, top_k, generator):
    """No KV cache: every step runs the whole prefix again (O(N^2) tokens through the network)."""
    B, N = cond.shape[0], model.config.block_size
    cond_all = torch.cat([cond, model.null_cond(cond)])
    tokens = torch.empty(B, 0, dtype=torch.long, device=cond.device)
    for _ in range(N):
        logits = model(torch.cat([tokens, tokens]), cond_all)[:, -1]
        c, u = logits.chunk(2)
        tok, _ = sample_logits(u + (c - u) * cfg_scale, top_k=top_k, generator=generator)
        tokens = torch.cat([tokens, tok[:, None]], 1)
    return tokens


@torch.no_grad()
def generate_two_forwards(model, cond, cfg_scale, top_k, generator):
    """KV cache, but the conditional and unconditional halves as two separate forwards per step."""
    B, N = cond.shape[0], model.config.block_size
    caches = [model.new_kv_cache(B), model.new_kv_cache(B)]
    empty = torch.empty(B, 0, dtype=torch.long, device=cond.device)
    c, u = (model(empty, x, kv_cache=k)[:, -1] for x, k in zip((cond, model.null_cond(cond)), caches))
    tokens = []
    for j in range(N):
        tok, _ = sample_logits(u + (c - u) * cfg_scale, top_k=top_k, generator=generator)
        tokens.append(tok)
        if j + 1 < N:
            c, u = (model(tok[:, None], kv_cache=k)[:, -1] for k in caches)
    return torch.stack(tokens, 1)

# -----------------------------------------------------------------------------
# sections


def build_gpt(cfg, device, dtype, downsample=16, vocab_size=16384):
    size = cfg.image_size or (256 if device.type == 'cuda' else 128)
    size = 2 * downsample if cfg.quick else size
    model = GPT(config_for('GPT-tiny' if cfg.quick else cfg.model, size, downsample, vocab_size=vocab_size))
    torch.nn.init.normal_(model.output.weight, std=0.02)  # LlamaGen zero-inits it: give the sampler real logits
    return model.to(device=device, dtype=dtype).eval()


def bench_sampling(cfg, device, dtype, sections):
    model = build_gpt(cfg, device, dtype)
    N, B = model.config.block_size, cfg.batch
    cond = torch.randint(0, 1000, (B,), device=device)
    g = lambda: torch.Generator(device).manual_seed(0)
    shape = f"{cfg.model if not cfg.quick else 'GPT-tiny'} B={B} N={N} cfg={cfg.cfg_scale} {str(dtype)[6:]}"
    fast = timed(lambda: generate(model, cond, cfg_scale=cfg.cfg_scale, top_k=cfg.top_k, generator=g()), cfg.reps,
                 device)
    report('sample_kv_cache', B * N / fast, 'tokens_per_s', shape=shape, images_per_s=round(B / fast, 3))
    if 'kv' in sections:
        slow = timed(lambda: generate_recompute(model, cond, cfg.cfg_scale, cfg.top_k, g()), max(1, cfg.reps // 2),
                     device)
        report('kv_cache_vs_recompute', B * N / fast, 'tokens_per_s', baseline=B * N / slow, shape=shape)
    if 'cfg' in sections:
        two = timed(lambda: generate_two_forwards(model, cond, cfg.cfg_scale, cfg.top_k, g()), cfg.reps, device)
        report('cfg_one_batch_vs_two_forwards', B * N / fast, 'tokens_per_s', baseline=B * N / two, shape=shape)



def bench_compile(cfg, device, dtype):
    """torch.compile of the decode step (CUDA graphs on GPU) vs eager, same shapes as above."""
    if device.type != 'cuda':
        report('compile_vs_eager', 0.0, 'skipped', note='CPU: compile targets GPU launch overhead; skipped')
        return
    model = build_gpt(cfg, device, dtype)
    B, N = cfg.batch, model.config.block_size
    cond = torch.randint(0, 1000, (B,), device=device)
    run = lambda c: generate(model, cond, cfg_scale=cfg.cfg_scale, top_k=cfg.top_k,
                             generator=torch.Generator(device).manual_seed(0), compile=c)
    eager = timed(lambda: run(False), cfg.reps, device)
    t = time.perf_counter()
    try:
        run(True)
    except Exception as e:  # report, do not lose the other measurements
        report('compile_vs_eager', 0.0, 'failed', error=f"{type(e).__name__}: {str(e)[:200]}")
        return
    compile_s = time.perf_counter() - t
    comp = timed(lambda: run(True), cfg.reps, device)
    report('compile_vs_eager', B * N / comp, 'tokens_per_s', baseline=B * N / eager, compile_s=round(compile_s, 1),
           images_per_s=round(B / comp, 3), eager_images_per_s=round(B / eager, 3))

def bench_rewards(cfg, device):
    """Batched CLIPScore (torch preprocessing on the device, one forward) vs the paper's loop:
    one image at a time through PIL and open_clip's own transform, on the same model and batch."""
    import open_clip
    from PIL import Image
    from rewards import ClipScore, load_clip
    from tokenizer import to_uint8
    arch = 'ViT-B-32' if cfg.quick else (cfg.clip_model or ('ViT-L-14' if device.type == 'cuda' else 'ViT-B-32'))
    model, tok = load_clip(arch, None, device)  # random weights: speed does not depend on them
    scorer = ClipScore(model, tok)
    B = 8 if cfg.quick else cfg.reward_batch
    images = torch.rand(B, 3, 256, 256, device=device) * 2 - 1
    conds = list(torch.randint(0, 1000, (B,)).tolist())
    transform = open_clip.image_transform(scorer.size, is_train=False, mean=scorer.mean, std=scorer.std)

    @torch.no_grad()
    def loop():
        pils = [Image.fromarray(im) for im in to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()]
        out = []
        for pil, c in zip(pils, conds):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'):
                x = model.encode_image(transform(pil)[None].to(device))
                t = model.encode_text(tok([f"a photo of a {open_clip.IMAGENET_CLASSNAMES[c]}."]).to(device))
            out.append(torch.cosine_similarity(x.float(), t.float()))
        return torch.cat(out)
    batched = timed(lambda: scorer(images, conds), cfg.reps, device)
    looped = timed(loop, cfg.reps, device)
    report('reward_batched_vs_pil_loop', B / batched, 'images_per_s', baseline=B / looped, model=arch, batch=B)


def bench_judge(cfg, device):
    """The judge as rewards.py asks it (one batched forward, answers read from the next-token logits) vs
    as the paper's code does (one image at a time, generating a short answer at temperature 0.6), on the
    same random tiny Qwen2.5-VL (judge.tiny_judge) and the same images."""
    from judge import tiny_judge
    from rewards import JudgeScore, JUDGE_QUESTIONS
    judge = tiny_judge()
    judge.model.to(device)
    B, T = (4, 4) if cfg.quick else (cfg.judge_batch, cfg.judge_tokens)
    images = torch.rand(B, 3, 64, 64, device=device) * 2 - 1  # -> 32 px (max_pixels): 64 patches, 16 tokens
    conds = torch.randint(0, 1000, (B,)).tolist()
    scorer = JudgeScore(judge, 'vlm_quality')

    @torch.no_grad()
    def generate_one_by_one():
        chat = judge.chat(JUDGE_QUESTIONS['realism'][0])
        for im in (images + 1) * 127.5:
            inputs = judge.processor(text=[chat], images=[im], return_tensors='pt').to(device)
            judge.model.generate(**inputs, max_new_tokens=T, min_new_tokens=T, do_sample=True, temperature=0.6,
                                 top_k=0, pad_token_id=0)
    batched = timed(lambda: scorer(images, conds), cfg.reps, device)
    looped = timed(generate_one_by_one, cfg.reps, device)
    report('judge_batched_vs_generate_loop', B / batched, 'images_per_s', baseline=B / looped,
           model='tiny random Qwen2.5-VL', batch=B, generated_tokens=T)


def bench_grpo_step(cfg, device, dtype):
    """One GRPO step of train.py, split into its parts (fractions of the step)."""
    import checkpoint
    import train
    from rewards import build_reward
    tc = train.TrainConfig(ckpt='', vq_ckpt='', rewards='clip=1,quality=1', clip_pretrained=None,
                           clip_model=('ViT-B-32' if cfg.quick or device.type == 'cpu' else
                                       (cfg.clip_model or 'ViT-L-14')),
                           conds_per_rank=1 if device.type == 'cpu' else 4, group_size=8, cfg_scale=2.0, beta=0.1,
                           dtype='bfloat16', device=device.type, compile=cfg.compile)
    vq = VQModel(VQConfig(**(checkpoint.TINY_VQ if cfg.quick else VQ_PRESETS['VQ-16']))).to(device).eval()
    # float32 master weights (autocast on GPU), as train.py
    policy = build_gpt(cfg, device, torch.float32, vq.config.downsample, vq.config.codebook_size)
    tc.image_size = int(policy.config.block_size ** 0.5) * vq.config.downsample
    ref = copy.deepcopy(policy).requires_grad_(False)
    reward = build_reward(tc.rewards, device=device, clip_model=tc.clip_model, clip_pretrained=None)
    opt = torch.optim.AdamW(policy.parameters(), lr=tc.lr)
    run = train.Run(policy, ref, ref, vq, policy, opt, reward, None, None, device=device)  # start = ref (kl_start)
    train.grpo_step(tc, run, 0)  # warm-up
    rows = [train.grpo_step(tc, run, s + 1)[0] for s in range(cfg.reps)]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith('time_') or k == 'step_time'}
    shape = f"{'GPT-tiny' if cfg.quick else cfg.model} {tc.conds_per_rank}x{tc.group_size} images, " \
            f"N={policy.config.block_size}, {tc.image_size}px, rewards {tc.rewards} on {tc.clip_model}, " \
            f"compile={tc.compile}"
    report('grpo_step', 1 / med['step_time'], 'steps_per_s', shape=shape,
           images_per_s=round(tc.conds_per_rank * tc.group_size / med['step_time'], 3))
    for part in ('rollout', 'decode', 'reward', 'update'):
        report(f'grpo_step_{part}', med[f'time_{part}'] / med['step_time'], 'fraction',
               seconds=round(med[f'time_{part}'], 4))
    report('grpo_overhead_beyond_rollout', 1 - med['time_rollout'] / med['step_time'], 'fraction', target='<= 0.5')


def copy_bandwidth(device, nbytes):
    """Measured device memory bandwidth, bytes/s: a copy of `nbytes` reads and writes each byte once."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    return 2 * nbytes / timed(lambda: y.copy_(x), 5, device)


def rollout_floor_bytes(gpt_config, images, cfg, weight_bytes):
    """Bytes a cached CFG rollout must read at least: every weight but the embedding table once per decoded
    token (the prefill and N - 1 decode steps, N forwards in all), plus the filled part of the 16-bit KV cache
    at each of them (keys and values, every layer, both CFG halves; forward j reads C + j positions)."""
    c = gpt_config
    with torch.device('meta'):
        m = GPT(c)
    read = sum(p.numel() for n, p in m.named_parameters() if 'tok_embeddings' not in n and 'cls_embedding' not in n)
    rows = images * (2 if cfg else 1)
    C, N = c.cls_token_num, c.block_size
    kv_per_position = 2 * c.n_layer * rows * (c.n_kv_head or c.n_head) * c.head_dim * 2  # bf16 k and v
    return N * read * weight_bytes + kv_per_position * sum(C + j for j in range(N))


def step_paper_run(cfg, device):
    """The paper's c2i step (GPT-XL, 576 tokens from a VQ-16-shaped tokenizer with 16,384 codes, 32 images in
    groups of 8, CFG 2, beta 0.1, micro-batches of 8) built with random weights and a weight-free reward
    (colorfulness); --paper_model / --paper_image_size change the generator; --quick: GPT-tiny, 16 tokens from
    the tiny VQ, 8 images in groups of 4. -> (TrainConfig, Run)."""
    import checkpoint
    import train
    from rewards import build_reward
    vq_kw = checkpoint.TINY_VQ if cfg.quick else VQ_PRESETS['VQ-16']  # the real decoder's architecture, random
    vq = VQModel(VQConfig(**vq_kw)).to(device).eval()
    size = 8 if cfg.quick else cfg.paper_image_size
    gc = config_for('GPT-tiny' if cfg.quick else cfg.paper_model, size, vq.config.downsample,
                    vocab_size=vq.config.codebook_size)
    tc = train.TrainConfig(ckpt='', vq_ckpt='', rewards='colorfulness=1', image_size=size, cfg_scale=2.0, beta=0.1,
                           images_per_step=8 if cfg.quick else 32, group_size=4 if cfg.quick else 8,
                           micro_batch_size=4 if cfg.quick else 8, device=device.type, compile=cfg.compile)
    torch.manual_seed(0)
    policy = GPT(gc).to(device)
    torch.nn.init.normal_(policy.output.weight, std=0.02)  # LlamaGen zero-inits it: give the sampler real logits
    policy.eval()  # train.py keeps dropout off throughout
    ref = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=tc.lr)
    reward = build_reward(tc.rewards, device=device)
    return tc, train.Run(policy, ref, ref, vq, policy, opt, reward, None, None, device=device)


def step_paper_time(tc, run, reps):
    """Median seconds of each part of train.grpo_step after one warm-up step, and the peak bytes allocated (GPU)."""
    import train
    train.grpo_step(tc, run, 0)  # warm-up (and, with --compile, the compilation)
    if run.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    rows = [train.grpo_step(tc, run, s + 1)[0] for s in range(reps)]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith('time_') or k == 'step_time'}
    med['peak'] = torch.cuda.max_memory_allocated() if run.device.type == 'cuda' else None
    return med


def bench_step_paper(cfg, device):
    """The paper's c2i GRPO step, eager and compiled: the time of each part, the rollout against its HBM floor,
    the update's TFLOP/s, the peak memory beside memory.py's plan, the rollout against the code before this
    section's changes, and the log-prob gap between the 16-bit sampler and the float32 policy."""
    import memory
    tc, run = step_paper_run(cfg, device)
    gc, B, N = run.policy.config, tc.images_per_step, run.policy.config.block_size
    bw = copy_bandwidth(device, 2**26 if cfg.quick else 2**31)
    report('copy_bandwidth', bw / 1e9, 'GB_per_s', bytes=2**26 if cfg.quick else 2**31)
    wbytes = 4 if device.type == 'cpu' else 2  # the rollout's weights: the float32 policy on a CPU, else bf16
    floor = rollout_floor_bytes(gc, B, True, wbytes)
    report('step_paper_floor', floor / 1e9, 'GB', floor_bytes=floor, floor_s=floor / bw, weight_bytes=wbytes,
           note='16-bit KV cache; weights in the rollout dtype, once per token')
    plan = memory.memory_plan(gc, micro_batch=tc.micro_batch_size, rollout_batch=B, bf16=device.type == 'cuda')
    shape = f"{'GPT-tiny' if cfg.quick else cfg.paper_model} {B} images (groups of {tc.group_size}), N={N}, " \
            f"V={gc.vocab_size}, cfg 2, micro-batch {tc.micro_batch_size}"
    for compiled in ((False,) if device.type == 'cpu' else (False, True)):
        step_paper_mode(cfg, tc, run, compiled, shape, floor / bw, plan)
        if not compiled:  # before the compiled mode, which may fail or run out of time
            step_paper_compare(cfg, tc, run, device)


def step_paper_mode(cfg, tc, run, compiled, shape, floor_s, plan):
    """The rows of one mode (eager or compiled) of the paper step: its parts, the rollout against the HBM floor
    (floor_s seconds), the update's TFLOP/s, the peak against the plan."""
    tc.compile = compiled
    mode = 'compiled' if compiled else 'eager'
    B, N = tc.images_per_step, run.policy.config.block_size
    P = sum(p.numel() for p in run.policy.parameters())
    try:
        med = step_paper_time(tc, run, cfg.reps)
    except Exception as e:  # report, do not lose the other measurements
        report(f'step_paper_{mode}', 0.0, 'failed', error=f"{type(e).__name__}: {str(e)[:300]}")
        return
    report(f'step_paper_{mode}', med['step_time'], 's', shape=shape, **{k[5:]: round(v, 4) for k, v in
                                                                        med.items() if k.startswith('time_')})
    report(f'step_paper_{mode}_rollout', B * N / med['time_rollout'], 'tokens_per_s', seconds=med['time_rollout'],
           floor_s=floor_s, fraction_of_floor=floor_s / med['time_rollout'])
    flops = (6 + 2 * (tc.beta > 0)) * P * B * N  # 6 P T forward + backward, 2 P T the reference; no attention
    report(f'step_paper_{mode}_update', flops / med['time_update'] / 1e12, 'TFLOP_per_s',
           seconds=med['time_update'], flops=flops, note='(6 + 2) * params * tokens: policy fwd+bwd, ref fwd')
    report(f'step_paper_{mode}_peak', (med['peak'] or 0) / 2**30, 'GiB' if med['peak'] else 'unmeasured',
           plan_GiB=round(plan['peak'] / 2**30, 3), measured_on=run.device.type,
           note='plan excludes the VQ, the reward and the CUDA context' if med['peak'] else 'CPU: see test_memory')


def step_paper_compare(cfg, tc, run, device):
    """The rollout as this code runs it against the code before (float32 weights under autocast, the whole cache
    read at every step), same seed; the same tokens? And the 16-bit sampler's log-probs of its own tokens against
    the float32 policy's (bf16 on a CPU too)."""
    import train
    B = tc.images_per_step
    cond = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(0)).to(device)
    gen = lambda: torch.Generator(device).manual_seed(0)
    tc.compile = False

    def now():  # train.rollout's decode: the 16-bit sampler on a GPU, the float32 policy on a CPU
        p = train.rollout_policy(tc, run)
        with train.autocast(tc, device) if p is run.policy else contextlib.nullcontext():
            return generate(p, cond, cfg_scale=tc.cfg_scale, generator=gen())[0]

    def before():
        with train.autocast(tc, device):
            return generate(run.policy, cond, cfg_scale=tc.cfg_scale, generator=gen(), static_cache=True)[0]
    tokens_now, out = now(), {}  # the warm-up
    t_before = seconds(lambda: out.setdefault('tokens', before()), device)  # once: ~45 s at the paper's shape
    t_now, same = timed(now, cfg.reps, device), bool(torch.equal(tokens_now, out['tokens']))
    N = run.policy.config.block_size
    report('step_paper_rollout_vs_before', B * N / t_now, 'tokens_per_s', baseline=B * N / t_before, same_tokens=same,
           note='before: fp32 weights under autocast, whole-cache attention (not emulated: multinomial\'s sync)')
    sampler = train.inference_copy(run.policy, torch.bfloat16)
    tokens, logp_s = generate(sampler, cond, cfg_scale=tc.cfg_scale, generator=gen())
    guided = copy.copy(tc)
    guided.logprob_mode = 'guided'  # the CFG mixture the tokens were drawn from, under the float32 policy
    with torch.no_grad():
        logp_p = train.sequence_logprobs(guided, run.policy, tokens, cond, None)[0]
    gap = (logp_s - logp_p).abs()
    report('step_paper_logp_gap', gap.mean().item(), 'nats', max=gap.max().item(),
           note='|log p bf16 sampler - log p float32 policy| per token; the loss uses only the latter')


def peak_bytes(fn, device):
    """Peak bytes allocated while fn() runs, above what was allocated before: the CUDA allocator's counter on
    a GPU, else the CPU allocation events recorded by the profiler (summed in time order)."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == '[memory]')
    live = peak = 0
    for _, n in events:  # +bytes at each allocation, -bytes at each free, in time order
        live += n
        peak = max(peak, live)
    return peak


def bench_memory(cfg, device):
    """The memory plan of one GRPO step (train.py defaults: 2 conditions x G=8 per rank, CFG, one micro-batch
    of 16) for GPT-B at 256 px and GPT-XL at 384 px under each option, and a measured activation peak of one
    teacher-forced forward/backward against memory.activation_bytes for the same shape."""
    import lora
    import memory
    import train
    from model import GPT
    options = {'ddp': {}, 'grad_ckpt': dict(grad_ckpt=True), 'lora16': dict(lora_rank=16),
               'fsdp2': dict(fsdp=True), 'lora16+grad_ckpt': dict(lora_rank=16, grad_ckpt=True),
               'fsdp2+grad_ckpt': dict(fsdp=True, grad_ckpt=True)}
    for name, size in (('GPT-B', 256), ('GPT-XL', 384), ('GPT-XXL', 384), ('GPT-3B', 384)):
        gc = config_for(name, size)
        for opt, kw in options.items():
            plan = memory.memory_plan(gc, world=2 if kw.get('fsdp') else 1, micro_batch=16, rollout_batch=16, **kw)
            report('memory_plan', plan['peak'] / 2**30, 'GiB', model=name, image_size=size, option=opt,
                   **{k: round(plan[k] / 2**30, 2) for k in ('weights', 'grads', 'optimizer', 'reference',
                                                               'activations', 'kv_cache', 'gathered')})
    # what to run on one 24 GB / one 80 GB card (or 8 of them), counting the paper's c2i reward models
    # (CLIP ViT-L/14 + HPS ViT-H/14 in float32: ~5.3 GiB) on top of the plan
    rewards = (427.6e6 + 986.1e6) * 4
    for name, size, kw in (('GPT-B', 256, {}), ('GPT-L', 384, {}), ('GPT-XL', 384, {}), ('GPT-XXL', 384, {}),
                           ('GPT-3B', 384, {}), ('GPT-XL', 256, dict(model_type='t2i'))):
        gc = config_for(name, size, **kw)
        for gpu in (24, 80):
            for world in (1, 8):
                fits = memory.fitting_options(gc, gpu * 1e9 - rewards, world, micro_batch=16, rollout_batch=16)
                if fits or world == 8:
                    report('fits', float(bool(fits)), 'bool', model=f"{name} {gc.model_type} {size}px", gpu=f"{gpu}GB",
                           gpus=world, option=fits[0] if fits else 'does not fit', also=fits[1:3])
                    break
    # measured: one forward/backward of the training log-prob path on a small shape, estimate alongside
    small = dict(cuda=('GPT-B', 256, 16384, 4), cpu=('GPT-tiny', 128, 1024, 4))[device.type]
    name, size, vocab, B = ('GPT-tiny', 32, 64, 2) if cfg.quick else small
    gc = config_for(name, size, 4 if device.type == 'cpu' else 16, vocab_size=vocab)
    tc = train.TrainConfig(cfg_scale=1.0)
    for opt, kw in (('ddp', {}), ('grad_ckpt', dict(grad_ckpt=True)), ('lora16', dict(lora_rank=16))):
        torch.manual_seed(0)
        model = GPT(gc).to(device).eval()
        model.grad_ckpt = kw.get('grad_ckpt', False)
        if kw.get('lora_rank'):
            lora.add_lora(model, 16, 32)
        grads = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
        x = torch.randint(vocab, (B, gc.block_size), device=device)
        y = torch.randint(10, (B,), device=device)

        def step():
            with torch.autocast('cuda', dtype=torch.bfloat16, enabled=device.type == 'cuda'):
                train.sequence_logprobs(tc, model, x, y, None)[0].mean().backward()
        step()  # warm-up, then measure with the gradients already allocated
        measured = peak_bytes(step, device)
        est = memory.activation_bytes(gc, B, kw.get('grad_ckpt', False), device.type == 'cuda',
                                      lora=bool(kw.get('lora_rank')))
        report('activation_peak', measured / 2**20, 'MiB', estimate=round(est / 2**20, 2), option=opt,
               shape=f"{name} B={B} N={gc.block_size} V={vocab}", grads_MiB=round(grads / 2**20, 2),
               measured_on=device.type)


def bench_gather(cfg, device, dtype):
    """Sampling from an FSDP2-sharded policy (needs torchrun): FSDP's default, an all-gather of every block
    at every decode step, against distributed.gathered (every block gathered once for the whole decode)."""
    import contextlib
    import torch.distributed as dist
    import distributed
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    model = build_gpt(cfg, device, torch.float32)
    distributed.shard(model, device)
    cond = torch.randint(0, 1000, (cfg.batch,), generator=torch.Generator().manual_seed(0)).to(device)

    def sample(once):
        with distributed.gathered(model) if once else contextlib.nullcontext():
            return generate(model, cond, cfg_scale=cfg.cfg_scale, top_k=cfg.top_k,
                            generator=torch.Generator(device).manual_seed(0))[0]
    same = torch.equal(sample(True), sample(False))
    per_block = timed(lambda: sample(False), max(1, cfg.reps // 3), device)
    once = timed(lambda: sample(True), max(1, cfg.reps // 3), device)
    N = model.config.block_size
    report('fsdp_rollout_gather_once_vs_per_block', cfg.batch * N / once, 'tokens_per_s',
           baseline=cfg.batch * N / per_block, ranks=dist.get_world_size(), same_tokens=same,
           shape=f"{cfg.model if not cfg.quick else 'GPT-tiny'} B={cfg.batch} N={N}")


def bench_loo_fid(cfg, device):
    """One step of the leave-one-out FID reward (fid.LooFID: an EMA update, R K R, B + 1 symmetric eigvalsh) at
    feature size d and global batch B, against the naive way: each of the B + 1 Frechet distances from scratch,
    the general eigenvalues of S_g S_r (metrics.py's way before fid.py). Random float64 features and a random
    full-rank reference; the EMA state starts full rank (a run past its first d / B steps). The naive baseline is
    timed once (minutes at d = 2048 on a CPU); the rewards of both are compared."""
    import fid
    d, B = (32, 8) if cfg.quick else (cfg.loo_dim, cfg.loo_batch)
    g = torch.Generator().manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)
    f = randn(d, d) / d ** 0.5
    sigma_r, mu_r = f @ f.T + 0.1 * torch.eye(d, dtype=torch.float64, device=device), randn(d)  # the reference
    h = randn(4 * d, d)
    state = (torch.tensor(0.5, dtype=torch.float64, device=device), h.mean(0), h.T @ h / len(h))  # earlier steps
    x, decay = randn(B, d) + 0.3, 0.95
    scorer = fid.LooFID(lambda feats: feats, mu_r, sigma_r, decay=decay).to(device)

    def step():  # one training step from the same prior state
        scorer.load_state_dict(dict(weight=state[0], mean=state[1], second=state[2]))
        return scorer(x, None)

    def naive():
        def fd(rows):  # the moments after an EMA step with these rows, FD from scratch
            (_, m, M), _ = fid.ema_update(state, rows, decay)
            S = M - torch.outer(m, m)
            tr = torch.linalg.eigvals(S @ sigma_r).sqrt().real.sum()
            return ((m - mu_r).square().sum() + S.trace() + sigma_r.trace() - 2 * tr).item()
        full = fd(x)
        return torch.tensor([fd(torch.cat([x[:i], x[i + 1:]])) - full for i in range(B)], dtype=torch.float64)
    fast = timed(step, cfg.reps, device)
    t = time.perf_counter()
    slow_r = naive()
    slow = time.perf_counter() - t
    fast_r = fid.loo_fid(x, state, decay, scorer.mu_r, scorer.root_r)[0]
    report('loo_fid_step', 1 / fast, 'steps_per_s', baseline=1 / slow, d=d, B=B, seconds=round(fast, 3),
           baseline_seconds=round(slow, 3), max_abs_diff=float((fast_r.cpu() - slow_r).abs().max()))


def main(argv=None):
    cfg = parse_config(BenchConfig, argv)
    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    if device.type == 'cpu':
        torch.manual_seed(0)
    if cfg.quick:
        cfg.reps, cfg.batch, cfg.top_k = 1, 2, 16
    sections = cfg.only or list(DEFAULT_SECTIONS)
    if device.type == 'cuda':
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        import platform
        name = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
                    platform.machine()) if os.path.exists('/proc/cpuinfo') else platform.machine()
        print(f"device: CPU {name}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if {'kv', 'cfg'} & set(sections):
        bench_sampling(cfg, device, dtype, sections)
    if 'reward' in sections:
        bench_rewards(cfg, device)
    if 'judge' in sections:
        bench_judge(cfg, device)
    if 'step' in sections:
        bench_grpo_step(cfg, device, dtype)
    if 'compile' in sections:
        bench_compile(cfg, device, dtype)
    if 'memory' in sections:
        bench_memory(cfg, device)
    if 'gather' in sections:
        bench_gather(cfg, device, dtype)
    if 'loo_fid' in sections:
        bench_loo_fid(cfg, device)
    if 'step_paper' in sections:
        bench_step_paper(cfg, device)
    print(f"\n{'measurement':34s} {'value':>12s} {'unit':14s} {'baseline':>10s} {'ratio':>7s}")
    for r in RESULTS:
        label = r['name'] + ''.join(f" {r[k]}" for k in ('model', 'option') if k in r)
        print(f"{label:34s} {r['value']:12.4g} {r['unit']:14s} {r.get('baseline', ''):>10} {r.get('ratio', ''):>7}")
    if cfg.out:
        with open(cfg.out, 'a') as f:
            f.writelines(json.dumps(r) + '\n' for r in RESULTS)
    return RESULTS


if __name__ == '__main__':
    sys.exit(run(main))
