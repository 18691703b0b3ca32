"""
scale.py -- training the big LlamaGen models within memory: LoRA, FSDP2 sharding, and the memory plan.

    python scale.py      # smoke demo: LoRA at zero equals the base, merge round trip, the plan for every size

train.py uses three switches from here (activation checkpointing itself is a flag on model.GPT):
  --lora_rank R  low-rank adapters on the linear layers, base frozen; the KL reference is the same model with
                 the adapters off, so no second copy of the weights is held (Hu et al. 2021, arXiv 2106.09685).
  --fsdp         PyTorch's FSDP2 (`fully_shard`): each rank holds 1/world of the weights, gradients and AdamW
                 state; a block's weights are all-gathered just before it runs and freed after.
  memory_plan    bytes per rank of weights / grads / AdamW / reference / activations / KV cache, printed at
                 start-up and compared with the GPU's memory, with the options that would make it fit.

How this departs from the usual tools: the LoRA is hand-written (~60 lines) rather than PEFT, because PEFT
installs accelerate, psutil and pyyaml with it; the adapter is still saved in PEFT's on-disk format
(adapter_model.safetensors with PEFT's key names + adapter_config.json), so PEFT and other tools read it.
The rollout on a sharded policy gathers every block once and keeps it gathered for the whole decode
(`gathered`), instead of one all-gather per block per token: a decode of N tokens runs the network N + 1
times, so per-block gathering would move the whole model N + 1 times per rollout (5x slower on 2 CPU ranks
for 16 tokens: `torchrun --nproc_per_node 2 bench.py --only gather`; the price of gathering once is the
unsharded bf16 weights, 2 bytes/param, held for the rollout).
"""
import json
import math
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_TARGETS = ['wqkv', 'wo', 'w1', 'w2', 'w3']  # every linear layer of a block (attention and SwiGLU)

# -----------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """y = x W^T + (alpha / r) x A^T B^T with W frozen, A (r, in) and B (out, r) trained; B starts at zero, so
    the adapted model starts exactly at the base. W keeps the base's `weight` key, so LlamaGen checkpoints
    still load into an adapted model; A and B use PEFT's names (lora_A, lora_B) and PEFT's init."""

    def __init__(self, base: nn.Linear, rank, alpha):
        super().__init__()
        self.weight = base.weight  # the same Parameter, frozen
        self.weight.requires_grad_(False)
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.enabled = True  # False: the base layer alone (the KL reference)

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.enabled:
            y = y + self.lora_B(self.lora_A(x)) * self.scaling  # (..., out); exactly y while B == 0
        return y


def add_lora(model, rank, alpha, targets=LORA_TARGETS):
    """Freeze `model` and replace every nn.Linear named in `targets` inside its blocks with a LoRALinear.
    Returns the number of trainable (adapter) parameters."""
    model.requires_grad_(False)
    for block in model.layers:
        for name, module in list(block.named_modules()):
            leaf = name.rsplit('.', 1)[-1]
            if leaf in targets and isinstance(module, nn.Linear):
                parent = block.get_submodule(name.rsplit('.', 1)[0]) if '.' in name else block
                setattr(parent, leaf, LoRALinear(module, rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def adapters_off(model):
    """Inside, every LoRALinear of `model` computes its base layer only."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


class AdaptersOff:
    """The base model inside a LoRA policy: calling it runs the policy with the adapters off. This is the
    KL reference under LoRA (no second copy of the weights). `.module` is the policy, as with DDP."""

    def __init__(self, model):
        self.module = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.module):
            return self.module(*args, **kwargs)


def merge_lora(sd, scaling):
    """A state dict with lora_A/lora_B keys -> plain LlamaGen keys with W + scaling * B @ A (float32 sum)."""
    out = {k: v for k, v in sd.items() if '.lora_' not in k}
    for k in sd:
        if k.endswith('.lora_A.weight'):
            prefix = k[:-len('.lora_A.weight')]
            a, b, w = sd[k].float(), sd[prefix + '.lora_B.weight'].float(), out[prefix + '.weight']
            out[prefix + '.weight'] = (w.float() + scaling * (b @ a)).to(w.dtype)
    return out


def save_adapter(sd, out_dir, rank, alpha, targets, base):
    """The adapter alone in PEFT's format: adapter_model.safetensors (keys base_model.model.<path>.lora_A.weight)
    and adapter_config.json. `sd` is the full state dict of the adapted model."""
    from safetensors.torch import save_file
    lora = {f'base_model.model.{k}': v.contiguous().cpu() for k, v in sd.items() if '.lora_' in k}
    save_file(lora, os.path.join(out_dir, 'adapter_model.safetensors'), metadata={'format': 'pt'})
    config = dict(peft_type='LORA', task_type=None, r=rank, lora_alpha=alpha, lora_dropout=0.0, bias='none',
                  target_modules=list(targets), fan_in_fan_out=False, init_lora_weights=True, use_rslora=False,
                  use_dora=False, inference_mode=True, base_model_name_or_path=base, modules_to_save=None)
    with open(os.path.join(out_dir, 'adapter_config.json'), 'w') as f:
        json.dump(config, f, indent=2)

# -----------------------------------------------------------------------------
# FSDP2


def shard(model, device):
    """Shard `model` over the default process group with FSDP2: each block its own unit (gathered just before
    it runs, freed after), then the root (embeddings, final norm, output). On GPU the gathered weights are bf16
    and gradients are reduced in float32; the sharded master weights and AdamW state stay float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    import torch.distributed as dist
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == 'cuda' \
        else MixedPrecisionPolicy()  # CPU (tests): float32 throughout, so FSDP equals DDP
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextmanager
def gathered(model):
    """Inside, an FSDP2 model keeps every block gathered after its first forward (one all-gather per block for
    the whole decode instead of one per block per token); resharded on exit. A no-op for other models."""
    if not is_sharded(model):
        yield
        return
    model.set_reshard_after_forward(False)  # recurses into the blocks
    try:
        yield
    finally:
        for m in model.modules():
            if is_sharded(m):
                m.reshard()
        model.set_reshard_after_forward(True)  # FSDP's defaults again: blocks reshard after forward,
        model.set_reshard_after_forward(False, recurse=False)  # the root stays gathered for the backward


def no_sync(model):
    """Skip the gradient all-reduce / reduce-scatter of this backward (gradient accumulation): DDP's no_sync,
    FSDP2's set_requires_gradient_sync(False)."""
    if hasattr(model, 'no_sync'):
        return model.no_sync()
    if is_sharded(model):
        @contextmanager
        def off():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return off()
    return nullcontext()


def clip_grad_norm(params, max_norm):
    """clip_grad_norm_ that also handles sharded (DTensor) gradients: the norm is reduced over the ranks."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=None)
    if hasattr(norm, 'full_tensor'):  # a DTensor partial sum over the shards
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=None)
    return norm

# -----------------------------------------------------------------------------
# the memory plan


def count_params(gpt_config, lora_rank=0, lora_targets=LORA_TARGETS):
    """(all parameters, adapter parameters) of a GPT built on the meta device (no memory, no time)."""
    from model import GPT
    with torch.device('meta'):
        m = GPT(gpt_config)
        n_lora = add_lora(m, lora_rank, 1.0, lora_targets) if lora_rank else 0
    return sum(p.numel() for p in m.parameters()) - n_lora, n_lora


def activation_bytes(gpt_config, images, grad_ckpt, bf16, guided=False):
    """Estimated bytes autograd keeps for one teacher-forced forward of `images` sequences, peak at the logits.

    Counted tensor by tensor from the block's code (saved for backward, per token and layer):
      bf16 autocast (GPU): 44 d + 8 h bytes  (fp32 residual and norms, bf16 q/k/v, SwiGLU's four h-wide tensors)
      float32 (CPU):       52 d + 16 h bytes
    plus 12 V bytes per token at the logits (float32 logits, log-softmax). With grad_ckpt each block keeps only
    its float32 input (4 d) and one block is rebuilt at a time in backward. Attention is assumed flash /
    memory-efficient (no T x T matrix). bench.py --only memory compares this with a CPU measurement.
    """
    c = gpt_config
    from model import find_multiple
    h = find_multiple(int(2 * 4 * c.dim / 3), c.multiple_of)
    T = (c.cls_token_num + c.block_size) * images * (2 if guided else 1)  # tokens in the micro-batch
    per_layer = (44 * c.dim + 8 * h) if bf16 else (52 * c.dim + 16 * h)
    blocks = T * (c.n_layer * 4 * c.dim + per_layer) if grad_ckpt else T * c.n_layer * per_layer
    return blocks + T * 12 * c.vocab_size


def memory_plan(gpt_config, world=1, fsdp=False, grad_ckpt=False, lora_rank=0, lora_targets=LORA_TARGETS,
                beta=0.1, micro_batch=16, rollout_batch=16, cfg=True, guided=False, bf16=True):
    """Bytes per rank, by kind, for one GRPO step. Full fine-tuning keeps float32 master weights (4 B/param),
    float32 grads (4), AdamW moments (8) and, with beta > 0, a frozen float32 reference (4); LoRA trains only
    the adapters and its reference is the base itself; FSDP divides all of it by the world size and adds the
    bf16 weights gathered for the rollout. The peak is the larger of the rollout (weights, reference, gathered
    copy, KV cache), the forward/backward (weights, grads, AdamW, reference, activations) and the AdamW step
    (foreach AdamW allocates a temporary the size of its state's sqrt(v): 4 B per trained param). Not counted:
    the reward models, the VQ decode's transients, the CUDA context and fragmentation (keep ~10% spare)."""
    P, L = count_params(gpt_config, lora_rank, lora_targets)
    trained = L if lora_rank else P
    div = world if fsdp else 1
    c = gpt_config
    plan = dict(params=P, trained_params=trained,
                weights=4 * (P + L) / div, grads=4 * trained / div, optimizer=8 * trained / div,
                reference=(4 * P / div) if beta > 0 and not lora_rank else 0,
                gathered=2 * P if fsdp else 0,  # bf16 copy of every block while sampling (see `gathered`)
                activations=activation_bytes(c, micro_batch, grad_ckpt, bf16, guided),
                kv_cache=2 * c.n_layer * rollout_batch * (2 if cfg else 1) * (c.cls_token_num + c.block_size)
                * c.dim * (2 if bf16 else 4))
    rollout = plan['weights'] + plan['reference'] + plan['gathered'] + plan['kv_cache']
    held = plan['weights'] + plan['grads'] + plan['optimizer'] + plan['reference']
    plan['peak'] = max(rollout, held + plan['activations'], held + 4 * trained / div)
    return plan


def format_plan(plan, options):
    gb = lambda b: f"{b / 2**30:.2f} GiB"
    parts = [f"{k} {gb(plan[k])}" for k in ('weights', 'grads', 'optimizer', 'reference', 'gathered',
                                              'activations', 'kv_cache') if plan[k]]
    return (f"memory plan per rank ({options}): {plan['params'] / 1e6:.4g}M params, "
            f"{plan['trained_params'] / 1e6:.4g}M trained; " + ', '.join(parts) + f"; peak ~{gb(plan['peak'])}")


def fitting_options(gpt_config, limit, world, **base):
    """Which memory options (alone or combined, then with smaller micro-batches) bring the peak under 90% of
    `limit` bytes (the 10% the plan does not count): flag strings, least intrusive first ('' = as it is);
    the FSDP options only when world > 1."""
    tries = [('', {}), ('--grad_ckpt', dict(grad_ckpt=True)), ('--lora_rank 16', dict(lora_rank=16)),
             ('--grad_ckpt --lora_rank 16', dict(grad_ckpt=True, lora_rank=16))]
    if world > 1:
        tries += [('--fsdp', dict(fsdp=True)), ('--fsdp --grad_ckpt', dict(fsdp=True, grad_ckpt=True))]
    out = []
    for flags, kw in tries:
        for mb in sorted({base['micro_batch'], 4, 1}, reverse=True):
            opts = {**base, **kw, 'micro_batch': mb}
            if mb <= base['micro_batch'] and memory_plan(gpt_config, world, **opts)['peak'] < 0.9 * limit:
                out.append((flags + ('' if mb == base['micro_batch'] else f' --micro_batch_size {mb}')).strip())
                break
    return out


if __name__ == '__main__':
    from model import GPT, GPTConfig, GPT_PRESETS, config_for
    torch.manual_seed(0)
    cfg = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=16)
    base = GPT(cfg).eval()
    nn.init.normal_(base.output.weight, std=0.02)
    model = GPT(cfg).eval()
    model.load_state_dict(base.state_dict())
    n = add_lora(model, rank=4, alpha=8)
    x, y = torch.randint(64, (2, 15)), torch.tensor([1, 2])
    print(f"LoRA r=4: {n} trained params; at zero equals the base bitwise: {torch.equal(model(x, y), base(x, y))}")
    for m in model.modules():  # move the adapters away from zero, then merge
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.05)
    merged = GPT(cfg).eval()
    merged.load_state_dict(merge_lora(model.state_dict(), 8 / 4))
    print(f"merged vs adapted: max |diff| {(merged(x, y) - model(x, y)).abs().max():.1e}")
    with adapters_off(model):
        print(f"adapters off equals the base: {torch.equal(model(x, y), base(x, y))}")
    for name in ('GPT-B', 'GPT-XL', 'GPT-XXL', 'GPT-3B'):
        c = config_for(name, 384)
        print(name, format_plan(memory_plan(c, micro_batch=8), 'DDP, micro-batch 8, 384 px'))
