"""
memory.py -- what a GRPO run needs per rank, said up front: bytes of weights, grads, AdamW state, the KL
reference, activations and the KV cache, and the memory options that would make a run fit a card.

    python memory.py     # smoke demo: the plan of GPT-B ... GPT-3B at 384 px

train.py prints the plan at start-up (`print_plan`) and, on a GPU, warns when it exceeds 90% of the memory it
can use, listing the options that would fit; bench.py --only memory prints the README's table and compares the
activation estimate with a measured peak.
"""
import functools
import math
import os
from dataclasses import asdict

import torch

from lora import LORA_TARGETS, add_lora
from model import GPT, GPTConfig, find_multiple


def count_params(gpt_config, lora_rank=0, lora_targets=LORA_TARGETS):
    """(all parameters, adapter parameters) of a GPT built on the meta device (no memory; remembered, since
    fitting_options asks for the same model dozens of times)."""
    return _count_params(tuple(asdict(gpt_config).items()), lora_rank, tuple(lora_targets))


@functools.lru_cache(maxsize=64)
def _count_params(config_items, lora_rank, lora_targets):
    with torch.device('meta'):
        m = GPT(GPTConfig(**dict(config_items)))
        n_lora = add_lora(m, lora_rank, 1.0, lora_targets) if lora_rank else 0
    return sum(p.numel() for p in m.parameters()) - n_lora, n_lora


def linear_params(gpt_config):
    """(parameters of one block's linear layers, of the output head): the weights autocast casts to bf16."""
    c = gpt_config
    h = find_multiple(int(2 * 4 * c.dim / 3), c.multiple_of)
    qkv = c.dim * (c.n_head + 2 * (c.n_kv_head or c.n_head)) * c.head_dim
    return qkv + c.dim * c.dim + 3 * c.dim * h, c.dim * c.vocab_size


def activation_bytes(gpt_config, images, grad_ckpt, bf16, guided=False, lora=False):
    """Estimated peak bytes above the weights and grads of one teacher-forced forward/backward of `images`
    sequences (the peak is at the start of the backward, through the output head).

    Counted tensor by tensor from the block's code (saved for backward, per token and layer):
      bf16 autocast (GPU): 44 d + 8 h bytes  (fp32 residual and norms, bf16 q/k/v, SwiGLU's four h-wide tensors)
      float32 (CPU):       52 d + 16 h bytes
    plus 16 V bytes per token at the head: the float32 logits (saved by the logsumexp, and held by the caller)
    and, in the backward, the two (T, V) gradients of the gather and the logsumexp and their sum. Under bf16
    autocast every linear layer also keeps the bf16 copy of its weight for the backward, 2 bytes per linear
    parameter (autocast caches the copies of trained weights until the update's autocast region ends). With
    grad_ckpt each block keeps only its float32 input (4 d) and one block is rebuilt at a time in backward,
    after the head's backward is over (the larger of the two counts; under LoRA only that block's weights are
    cast). Attention is assumed flash / memory-efficient (no T x T matrix). test_memory.py measures all this on
    a CPU (float32 and bf16 autocast, GPT-B width, 256 tokens, V = 16384): within 10%.
    """
    c = gpt_config
    h = find_multiple(int(2 * 4 * c.dim / 3), c.multiple_of)
    T = (c.cls_token_num + c.block_size) * images * (2 if guided else 1)  # tokens in the micro-batch
    per_layer = (44 * c.dim + 8 * h) if bf16 else (52 * c.dim + 16 * h)
    head = T * 16 * c.vocab_size
    block_w, head_w = linear_params(c)
    cast = 2 * (head_w + block_w * (1 if grad_ckpt and lora else c.n_layer)) if bf16 else 0
    if grad_ckpt:  # the head's backward is over before the first block is rebuilt: the larger of the two
        return T * c.n_layer * 4 * c.dim + max(head, T * per_layer) + cast
    return T * c.n_layer * per_layer + head + cast


def memory_plan(gpt_config, world=1, fsdp=False, grad_ckpt=False, lora_rank=0, lora_targets=LORA_TARGETS,
                beta=0.1, micro_batch=16, rollout_batch=16, cfg=True, guided=False, bf16=True):
    """Bytes per rank, by kind, for one GRPO step. Full fine-tuning keeps float32 master weights (4 B/param),
    float32 grads (4), AdamW moments (8) and, with beta > 0, a frozen float32 reference (4); LoRA trains only
    the adapters and its reference is the base itself; FSDP divides all of it by the world size and adds the
    bf16 weights gathered for the rollout; without FSDP a GPU run keeps the rollout's bf16 copy of the policy
    (train.rollout_policy, 2 B/param). The peak is the larger of the rollout (weights, reference, gathered or
    sampler copy, KV cache), the forward/backward (weights, grads, AdamW, reference, sampler, activations) and
    the AdamW step (foreach AdamW allocates a temporary the size of its state's sqrt(v): 4 B per trained param).
    Not counted: the reward models, the VQ decode's transients, the CUDA context and fragmentation (~10%)."""
    P, L = count_params(gpt_config, lora_rank, lora_targets)
    trained = L if lora_rank else P
    div = world if fsdp else 1
    c = gpt_config
    plan = dict(params=P, trained_params=trained,
                weights=4 * (P + L) / div, grads=4 * trained / div, optimizer=8 * trained / div,
                reference=(4 * P / div) if beta > 0 and not lora_rank else 0,
                gathered=2 * P if fsdp else 0,  # bf16 copy of every block while sampling (see `gathered`)
                sampler=2 * (P + L) if bf16 and not fsdp else 0,  # train.rollout_policy's 16-bit copy, kept
                activations=activation_bytes(c, micro_batch, grad_ckpt, bf16, guided, bool(lora_rank)),
                kv_cache=2 * c.n_layer * rollout_batch * (2 if cfg else 1) * (c.cls_token_num + c.block_size)
                * c.dim * (2 if bf16 else 4))
    rollout = plan['weights'] + plan['reference'] + plan['gathered'] + plan['sampler'] + plan['kv_cache']
    held = plan['weights'] + plan['grads'] + plan['optimizer'] + plan['reference'] + plan['sampler']
    plan['peak'] = max(rollout, held + plan['activations'], held + 4 * trained / div)
    return plan


def format_plan(plan, options):
    gb = lambda b: f"{b / 2**30:.2f} GiB"
    parts = [f"{k} {gb(plan[k])}" for k in ('weights', 'grads', 'optimizer', 'reference', 'gathered', 'sampler',
                                              'activations', 'kv_cache') if plan[k]]
    return (f"memory plan per rank ({options}): {plan['params'] / 1e6:.4g}M params, "
            f"{plan['trained_params'] / 1e6:.4g}M trained; " + ', '.join(parts) + f"; peak ~{gb(plan['peak'])}")


def fitting_options(gpt_config, limit, world, **base):
    """Which memory options bring the peak under 90% of `limit` bytes (the 10% the plan does not count): flag
    strings, least intrusive first ('' = as it is). Each of: as it is, --grad_ckpt, LoRA, both (and the FSDP
    options when world > 1), with the first micro-batch that fits among the divisors of the configured one
    (train.py wants micro-batches that divide the minibatch); smaller micro-batches and --grad_ckpt keep the recipe
    exactly, LoRA and FSDP change what is trained or how."""
    tries = [('', {}), ('--grad_ckpt', dict(grad_ckpt=True)), ('--lora_rank 16', dict(lora_rank=16)),
             ('--grad_ckpt --lora_rank 16', dict(grad_ckpt=True, lora_rank=16))]
    if world > 1:
        tries += [('--fsdp', dict(fsdp=True)), ('--fsdp --grad_ckpt', dict(fsdp=True, grad_ckpt=True))]
    top = base['micro_batch']
    out = []
    for flags, kw in tries:
        for mb in divisors(top):
            if memory_plan(gpt_config, world, **{**base, **kw, 'micro_batch': mb})['peak'] < 0.9 * limit:
                out.append((flags + ('' if mb == top else f' --micro_batch_size {mb}')).strip())
                break
    return out


def divisors(n):
    """The divisors of n, largest first (O(sqrt n))."""
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]), reverse=True)


def refusal(plan, have, fits, what):
    """The one sentence that refuses a run whose plan exceeds the device, naming the option that makes the same
    recipe fit (the first of fitting_options), or else the smaller batches that change it."""
    head = f"{what} needs about {plan['peak'] / 2**30:.3g} GiB but this device has {have / 2**30:.3g} GiB in all; "
    if fits:
        also = f" (or {fits[1]})" if len(fits) > 1 else ''
        return head + f"the same recipe fits with {fits[0]}{also}"
    return head + "no memory option fits on this many devices: lower --group_size, --conds_per_rank or " \
                  "--images_per_step, or add GPUs and use --fsdp"


def sampling_bytes(gpt_config, batch, cfg=True, dtype_bytes=4):
    """Bytes of one generate() call of `batch` images: the KV cache of both CFG halves and a few float32
    (2B, V) logits tensors (CFG mix, softmax, sampling)."""
    c, rows = gpt_config, batch * (2 if cfg else 1)
    kv = 2 * c.n_layer * rows * (c.cls_token_num + c.block_size) * (c.n_kv_head or c.n_head) * c.head_dim
    return kv * dtype_bytes + 4 * rows * c.vocab_size * 4


def device_memory(device):
    """Bytes this process could ever use on `device`: the GPU's total memory, or the machine's RAM on a CPU."""
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def check_fits(needed, device, what, fix):
    """Refuse, before allocating, a size that cannot fit: `needed` bytes against all of the device's memory."""
    from cli import UserError
    device = torch.device(device)
    have = device_memory(device)
    if needed > have:
        raise UserError(f"{what} needs about {needed / 2**30:.3g} GiB but this {device.type} has "
                        f"{have / 2**30:.3g} GiB in all; {fix}")


def print_plan(cfg, gpt_config, world, device, batch):
    """Say up front what a train.py run (TrainConfig cfg, `batch` images per rank per step) needs per rank; on a
    GPU, warn when it exceeds the memory and list the options that would fit."""
    from distributed import print0
    opts = dict(fsdp=cfg.fsdp, grad_ckpt=cfg.grad_ckpt, lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets,
                beta=cfg.beta, micro_batch=cfg.micro_batch_size or cfg.minibatch_size or batch, rollout_batch=batch,
                cfg=cfg.cfg_scale > 1, guided=cfg.logprob_mode == 'guided', bf16=device.type == 'cuda')
    plan = memory_plan(gpt_config, world, **opts)
    have = device_memory(device)
    if plan['peak'] > have:  # refused before anything is allocated, naming what would fit
        from cli import UserError
        raise UserError(refusal(plan, have, fitting_options(gpt_config, have, world, **opts),
                                f"one GRPO step ({batch} images per rank)"))
    names = [n for n, on in (('fsdp', cfg.fsdp), ('grad_ckpt', cfg.grad_ckpt), (f'lora r={cfg.lora_rank}',
                                                                                 cfg.lora_rank)) if on]
    print0(format_plan(plan, ', '.join(names or ['full fine-tuning']) + f', micro-batch {opts["micro_batch"]}'))
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        limit = free + torch.cuda.memory_allocated(device)  # what this process may use, counting what it holds
        if plan['peak'] > 0.9 * limit:  # 10% for what the plan does not count (rewards, VQ decode, context)
            fits = [f for f in fitting_options(gpt_config, limit, world, **opts) if f]
            print0(f"warning: the plan ({plan['peak'] / 2**30:.1f} GiB) exceeds this GPU's {limit / 2**30:.1f} GiB; "
                   f"options that fit: {'; '.join(fits) or 'none on this many GPUs, add GPUs and use --fsdp'}")


if __name__ == '__main__':
    from model import config_for
    for name in ('GPT-B', 'GPT-XL', 'GPT-XXL', 'GPT-3B'):
        c = config_for(name, 384)
        print(name, format_plan(memory_plan(c, micro_batch=8), 'DDP, micro-batch 8, 384 px'))
