"""
lora.py -- low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on the GPT's linear layers, written by hand.

    python lora.py       # smoke demo: LoRA at zero equals the base, merge round trip, adapters off = the base

train.py --lora_rank R trains rank-R adapters on the blocks' linear layers with the base frozen; the KL reference
is the same model with the adapters off (`AdaptersOff`), so no second copy of the weights is held.

How this departs from the usual tool: hand-written (~60 lines) rather than PEFT, because PEFT installs accelerate,
psutil and pyyaml with it; the adapter is still saved in PEFT's on-disk format (adapter_model.safetensors with
PEFT's key names + adapter_config.json), so PEFT and other tools read it, and checkpoint.py writes
model.safetensors merged (a plain LlamaGen checkpoint).
"""
import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


LORA_TARGETS = ['wqkv', 'wo', 'w1', 'w2', 'w3']  # every linear layer of a block (attention and SwiGLU)



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


def check_flags(rank, alpha, targets):
    """train.py's --lora_rank / --lora_alpha / --lora_targets, before anything is built. Raises UserError."""
    from cli import UserError
    if rank < 0:
        raise UserError(f"--lora_rank must be >= 0, got {rank}")
    if rank and not (alpha > 0 and math.isfinite(alpha)):
        raise UserError(f"--lora_alpha must be a positive number, got {alpha}")
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise UserError(f"--lora_targets must name some of {' '.join(LORA_TARGETS)}, got {bad or 'none'}")


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
    from cli import as_umask_allows
    lora = {f'base_model.model.{k}': v.contiguous().cpu() for k, v in sd.items() if '.lora_' in k}
    save_file(lora, os.path.join(out_dir, 'adapter_model.safetensors'), metadata={'format': 'pt'})
    as_umask_allows(os.path.join(out_dir, 'adapter_model.safetensors'))  # save_file makes 0600 files
    config = dict(peft_type='LORA', task_type=None, r=rank, lora_alpha=alpha, lora_dropout=0.0, bias='none',
                  target_modules=list(targets), fan_in_fan_out=False, init_lora_weights=True, use_rslora=False,
                  use_dora=False, inference_mode=True, base_model_name_or_path=base, modules_to_save=None)
    with open(os.path.join(out_dir, 'adapter_config.json'), 'w') as f:
        json.dump(config, f, indent=2)



if __name__ == '__main__':
    from model import GPT, GPTConfig
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
