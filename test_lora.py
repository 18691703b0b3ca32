"""
test_lora.py -- lora.py: adapters at zero equal the base, KL exactly 0 at step 0, the merged checkpoint.
"""
import json

from safetensors.torch import load_file
import torch

import checkpoint
import train
from checkpoint import load_gpt, save_gpt
from cli import parse_config
from conftest import latest_weights, run_train
from lora import LoRALinear, add_lora
from model import GPT, config_for


def test_lora_zero_kl_and_merged_checkpoint(tmp_path):
    torch.manual_seed(0)
    base = GPT(config_for('GPT-tiny', 32, 4, vocab_size=64)).eval()
    torch.nn.init.normal_(base.output.weight, std=0.02)
    adapted = GPT(base.config).eval()
    adapted.load_state_dict(base.state_dict())
    n = add_lora(adapted, 4, 8)
    x, y = torch.randint(64, (2, 63)), torch.tensor([1, 2])
    assert torch.equal(adapted(x, y), base(x, y))  # B = 0: the policy is the base, bitwise
    assert n == sum(p.numel() for p in adapted.parameters() if p.requires_grad) == 2 * 4 * sum(
        m.weight.shape[0] + m.weight.shape[1] for m in adapted.modules() if isinstance(m, LoRALinear)) // 2
    # training from a base with a non-zero output head (LlamaGen zero-inits it, and then no gradient reaches
    # the blocks): the KL to the base (adapters off) is exactly 0 at the first step, then moves
    torch.manual_seed(1)
    start = GPT(config_for('GPT-tiny', 8, 2, vocab_size=64))
    torch.nn.init.normal_(start.output.weight, std=0.02)
    save_gpt(start, str(tmp_path / 'base.safetensors'))
    lora = ['--ckpt', str(tmp_path / 'base.safetensors'), '--lora_rank', '4', '--lora_alpha', '8']
    rows = run_train(tmp_path, '--max_steps', '3', '--save_every', '3', '--beta', '0.1', '--lr', '3e-2', *lora)
    assert rows[0]['kl'] == 0.0 and rows[-1]['kl'] > 0
    # the adapted model, rebuilt from the base and the PEFT-format adapter file...
    cfg = parse_config(train.TrainConfig, ['--preset', 'demo_color', '--image_size', '8', *lora], presets=train.TRAIN_PRESETS)
    policy, ref, _ = checkpoint.load_training_models(cfg, torch.device('cpu'))
    peft = load_file(str(tmp_path / 'latest' / 'adapter_model.safetensors'))
    assert all(k.startswith('base_model.model.layers.') and '.lora_' in k for k in peft)
    missing, unexpected = policy.load_state_dict({k[len('base_model.model.'):]: v for k, v in peft.items()}, strict=False)
    assert not unexpected and not any('lora' in k for k in missing)
    conf = json.load(open(tmp_path / 'latest' / 'adapter_config.json'))
    assert conf['peft_type'] == 'LORA' and conf['r'] == 4 and conf['lora_alpha'] == 8
    # ... equals the merged checkpoint as sample.py --ckpt loads it
    merged = load_gpt(str(tmp_path / 'latest' / 'model.safetensors'))
    x, y = torch.randint(64, (2, 16)), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.allclose(merged(x, y), policy(x, y), atol=1e-5, rtol=0)
        assert not torch.allclose(ref(x, y), policy(x, y), atol=1e-5)  # the reference is the base
    # resume restores the adapters and their AdamW state exactly (the frozen base comes from --ckpt again)
    run_train(tmp_path / 'half', '--max_steps', '2', '--save_every', '1', '--beta', '0.1', '--lr', '3e-2', *lora)
    run_train(tmp_path / 'half', '--max_steps', '3', '--save_every', '3', '--beta', '0.1', '--lr', '3e-2', '--resume',
              *lora)
    a, b = latest_weights(tmp_path), latest_weights(tmp_path / 'half')
    assert all(torch.equal(a[k], b[k]) for k in a)
