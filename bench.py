"""
bench.py -- measured speed of sampling, rewards and a GRPO step, each against a baseline in the same run.

    python bench.py                  # CPU: GPT-B shape at 128 px (64 tokens; the recompute baseline is O(N^2))
    python bench.py --device cuda    # GPU: GPT-B at 256 px (256 tokens), LlamaGen's sampling settings, bf16
    python bench.py --quick          # tiny shapes, seconds: shows that everything runs

Prints one JSON line per measurement (name, value, unit, and for comparisons baseline and ratio), then a
table. Timings are medians of --reps runs after one warm-up. All weights are random: speed does not
depend on them. Never used for assertions: tests only run --quick to show it works.
"""
import copy
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import List

import torch

from model import GPT, config_for, generate, sample_logits
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
    only: List[str] = field(default_factory=list)  # run only these sections: kv cfg compile reward step
    out: str = ''  # also append the JSON lines to this file


RESULTS = []


def report(name, value, unit, baseline=None, **extra):
    row = dict(name=name, value=round(value, 4), unit=unit, **extra)
    if baseline is not None:
        row.update(baseline=round(baseline, 4), ratio=round(value / baseline if 'per_s' in unit else baseline / value, 2))
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def timed(fn, reps, device):
    """Median seconds of fn() over reps runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)

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
    fast = timed(lambda: generate(model, cond, cfg_scale=cfg.cfg_scale, top_k=cfg.top_k, generator=g()), cfg.reps, device)
    report('sample_kv_cache', B * N / fast, 'tokens_per_s', shape=shape, images_per_s=round(B / fast, 3))
    if 'kv' in sections:
        slow = timed(lambda: generate_recompute(model, cond, cfg.cfg_scale, cfg.top_k, g()), max(1, cfg.reps // 2), device)
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
    from sample import to_uint8
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


def bench_grpo_step(cfg, device, dtype):
    """One GRPO step of train.py, split into its parts (fractions of the step)."""
    import train
    from rewards import build_reward
    tc = train.TrainConfig(ckpt='', vq_ckpt='', rewards='clip=1,quality=1', clip_pretrained=None,
                           clip_model='ViT-B-32' if cfg.quick or device.type == 'cpu' else (cfg.clip_model or 'ViT-L-14'),
                           conds_per_rank=1 if device.type == 'cpu' else 4, group_size=8, cfg_scale=2.0, beta=0.1,
                           dtype='bfloat16', device=device.type, compile=cfg.compile)
    vq = VQModel(VQConfig(**(train.TINY_VQ if cfg.quick else VQ_PRESETS['VQ-16']))).to(device).eval()
    # float32 master weights (autocast on GPU), as train.py
    policy = build_gpt(cfg, device, torch.float32, vq.config.downsample, vq.config.codebook_size)
    tc.image_size = int(policy.config.block_size ** 0.5) * vq.config.downsample
    ref = copy.deepcopy(policy).requires_grad_(False)
    reward = build_reward(tc.rewards, device=device, clip_model=tc.clip_model, clip_pretrained=None)
    opt = torch.optim.AdamW(policy.parameters(), lr=tc.lr)
    ctx = (policy, ref, vq, policy, opt, reward, None, None, 0, 1, device, ref)  # the last: kl_start's reference
    train.grpo_step(tc, ctx, 0)  # warm-up
    rows = [train.grpo_step(tc, ctx, s + 1)[0] for s in range(cfg.reps)]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith('time_') or k == 'step_time'}
    shape = f"{'GPT-tiny' if cfg.quick else cfg.model} {tc.conds_per_rank}x{tc.group_size} images, " \
            f"N={policy.config.block_size}, {tc.image_size}px, rewards {tc.rewards} on {tc.clip_model}, " \
            f"compile={tc.compile}"
    report('grpo_step', 1 / med['step_time'], 'steps_per_s', shape=shape,
           images_per_s=round(tc.conds_per_rank * tc.group_size / med['step_time'], 3))
    for part in ('rollout', 'decode', 'reward', 'update'):
        report(f'grpo_step_{part}', med[f'time_{part}'] / med['step_time'], 'fraction', seconds=round(med[f'time_{part}'], 4))
    report('grpo_overhead_beyond_rollout', 1 - med['time_rollout'] / med['step_time'], 'fraction', target='<= 0.5')


def main(argv=None):
    from sample import parse_config
    cfg = parse_config(BenchConfig, argv)
    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    if device.type == 'cpu':
        torch.manual_seed(0)
    if cfg.quick:
        cfg.reps, cfg.batch, cfg.top_k = 1, 2, 16
    sections = cfg.only or ['kv', 'cfg', 'compile', 'reward', 'step']
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
    if 'step' in sections:
        bench_grpo_step(cfg, device, dtype)
    if 'compile' in sections:
        bench_compile(cfg, device, dtype)
    print(f"\n{'measurement':34s} {'value':>12s} {'unit':14s} {'baseline':>10s} {'ratio':>7s}")
    for r in RESULTS:
        print(f"{r['name']:34s} {r['value']:12.4g} {r['unit']:14s} {r.get('baseline', ''):>10} {r.get('ratio', ''):>7}")
    if cfg.out:
        with open(cfg.out, 'a') as f:
            f.writelines(json.dumps(r) + '\n' for r in RESULTS)
    return RESULTS


if __name__ == '__main__':
    main()
