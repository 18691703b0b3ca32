"""
test_memory.py -- memory.py: the plan against hand-counted bytes, and the memory flags' bad inputs.
"""
import os
import shutil
import subprocess
import sys

import pytest

import model
from cli import UserError
from conftest import HERE, run_train
from model import config_for
import torch

import memory
from memory import count_params, memory_plan


def test_memory_flags_bad_inputs(tmp_path, monkeypatch):
    with monkeypatch.context() as m:  # as under torchrun: then --compile is the complaint
        m.setenv('RANK', '0')
        with pytest.raises(UserError, match='--fsdp does not support --compile'):
            run_train(tmp_path / 'x', '--fsdp', '--compile')
    (tmp_path / 'file').write_text('x')
    rows = [(['--lora_rank', '-1'], '--lora_rank must be'), (['--lora_rank', '4', '--lora_alpha', '0'], '--lora_alpha'),
            (['--lora_targets', 'wq'], '--lora_targets must name'), (['--fsdp'], 'launch with torchrun'),
            (['--out_dir', str(tmp_path / 'file')], 'is a file'),
            (['--out_dir', str(tmp_path / 'file' / 'sub')], 'cannot be created')]
    for args, msg in rows:
        with pytest.raises(UserError, match=msg):
            run_train(tmp_path / 'x', '--max_steps', '1', *args)
    run_train(tmp_path / 'r', '--max_steps', '1', '--save_every', '1')
    last = tmp_path / 'r' / 'step_000001'
    damaged = [('model.safetensors', None, 'model.safetensors is missing'),
               ('state.pt', b'PK\x03\x04 truncated', 'state.pt is truncated or corrupt'),
               ('dcp/__0_0.distcp', b'x', 'sharded state .* is truncated, corrupt')]
    for name, content, msg in damaged:
        shutil.copytree(last, tmp_path / 'keep')
        if content is None:
            os.remove(last / name)
        else:
            (last / name).write_bytes(content)
        with pytest.raises(UserError, match=msg):
            run_train(tmp_path / 'r', '--max_steps', '2', '--resume')
        shutil.rmtree(last)
        shutil.move(tmp_path / 'keep', last)
    # through the command line: one sentence on stderr, exit code 2, no traceback, before any model loads
    (last / 'state.pt').write_bytes(b'PK\x03\x04 truncated')
    p = subprocess.run([sys.executable, 'train.py', '--preset', 'demo_color', '--image_size', '8', '--resume', '--out_dir',
                        str(tmp_path / 'r')], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 2 and 'Traceback' not in p.stderr and 'truncated or corrupt' in p.stderr


def test_memory_plan():
    xl = config_for('GPT-XL', 384)
    P, _ = count_params(xl)
    assert abs(P - 775e6) / 775e6 < 0.01  # LlamaGen's figure for GPT-XL (c2i, vocab 16384)
    _, L = count_params(xl, lora_rank=16)  # r * (in + out) per adapted linear layer
    h = model.find_multiple(int(2 * 4 * 1280 / 3), 256)
    assert L == 36 * 16 * ((1280 + 3 * 1280) + (1280 + 1280) + 2 * (1280 + h) + (h + 1280))
    ddp = memory_plan(xl, beta=0.1)
    assert (ddp['weights'], ddp['grads'], ddp['optimizer'], ddp['reference']) == (4 * P, 4 * P, 8 * P, 4 * P)
    fsdp = memory_plan(xl, world=4, fsdp=True)
    assert fsdp['optimizer'] == 8 * P / 4 and fsdp['gathered'] == 2 * P
    lora = memory_plan(xl, lora_rank=16)
    assert lora['reference'] == 0 and lora['optimizer'] == 8 * L
    assert memory_plan(xl, grad_ckpt=True)['activations'] < ddp['activations'] / 4


def test_refusal_names_the_option_that_makes_the_same_recipe_fit(tmp_path):
    # the paper's c2i step (32 images) on one 48 GiB card without --micro_batch_size is refused, and the sentence
    # names the largest micro-batch whose plan fits (found here by trying them one by one)
    xl, have = config_for('GPT-XL', 384), 48 * 2**30
    opts = dict(micro_batch=32, rollout_batch=32)
    assert memory_plan(xl, **opts)['peak'] > have
    first = next(m for m in (32, 16, 8, 4, 2, 1)
                 if memory_plan(xl, micro_batch=m, rollout_batch=32)['peak'] < 0.9 * have)
    fits = memory.fitting_options(xl, have, 1, **opts)
    assert fits[0] == f'--micro_batch_size {first}' and fits[1].startswith('--grad_ckpt')
    assert f'the same recipe fits with --micro_batch_size {first}' in memory.refusal(memory_plan(xl, **opts), have,
                                                                                     fits, 'one GRPO step')
    # a train.py run on this CPU whose batch outgrows the machine's memory: refused at start-up, in one sentence
    batch, first = too_big_for_this_cpu()
    with pytest.raises(UserError, match=f'the same recipe fits with --micro_batch_size {first}'):
        run_train(tmp_path / 'big', '--images_per_step', str(batch))


TINY = config_for('GPT-tiny', 8, 2, vocab_size=64)  # run_train's model: 8 px through the tiny VQ (4x4 tokens)


def too_big_for_this_cpu():
    """(images per step that run_train's model cannot fit in this machine's RAM, the largest micro-batch with which
    it fits), found by trying memory_plan batch by batch (the machine's memory is the limit on a CPU)."""
    plan = lambda b, m: memory_plan(TINY, micro_batch=m, rollout_batch=b, cfg=False, beta=0.01, bf16=False)['peak']
    ram, batch = memory.device_memory(torch.device('cpu')), 8
    while plan(batch, batch) <= ram:
        batch *= 2
    return batch, next(batch // 2**k for k in range(30) if plan(batch, batch // 2**k) < 0.9 * ram)


def test_a_run_that_cannot_fit_is_refused_before_a_weight_is_read(tmp_path, monkeypatch, capsys):
    # self-describing --ckpt and --vq_ckpt files; every way a weight is read or a model is built (off the meta
    # device, where memory.py counts parameters) fails the test: the plan comes from the files' headers and flags
    import checkpoint
    import cli
    import tokenizer
    import train
    torch.manual_seed(0)
    gpt, vq = str(tmp_path / 'g.safetensors'), str(tmp_path / 'v.safetensors')
    checkpoint.save_gpt(model.GPT(TINY), gpt)
    checkpoint.save_vq(tokenizer.VQModel(tokenizer.VQConfig(**checkpoint.TINY_VQ)), vq)
    batch, first = too_big_for_this_cpu()
    args = ['--ckpt', gpt, '--vq_ckpt', vq, '--images_per_step', str(batch)]

    def loaded(*a, **k):
        raise AssertionError('a weight was read or a model built before the memory plan refused the run')
    gpt_init = model.GPT.__init__

    def gpt_on_meta_only(self, *a, **k):
        gpt_init(self, *a, **k)
        if not next(self.parameters()).is_meta:
            loaded()
    monkeypatch.setattr(checkpoint, 'read_state_dict', loaded)
    monkeypatch.setattr(train, 'load_training_models', loaded)
    monkeypatch.setattr(tokenizer.VQModel, '__init__', loaded)
    monkeypatch.setattr(model.GPT, '__init__', gpt_on_meta_only)
    cfg = cli.parse_config(train.TrainConfig, ['--preset', 'demo_color', '--image_size', '8', '--out_dir',
                                               str(tmp_path / 'run'), *args], presets=train.TRAIN_PRESETS)
    with pytest.raises(AssertionError):  # the spies catch the loader: loading first would fail this test
        checkpoint.load_training_models(cfg, torch.device('cpu'))
    before = sorted(tmp_path.rglob('*'))
    code = cli.run(lambda argv: run_train(tmp_path / 'run', *argv), args, errors=(ValueError,))
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1 and err.startswith('error: one GRPO step'), err
    assert f'the same recipe fits with --micro_batch_size {first}' in err, err
    assert sorted(tmp_path.rglob('*')) == before  # no out_dir, no .lock


def test_activation_estimate_within_20_percent_of_the_measured_peak():
    # the peak above weights and grads of one teacher-forced forward/backward, measured from the CPU allocator's
    # events (bench.peak_bytes), at GPT-B width with LlamaGen's vocabulary; autocast to bf16 works on a CPU too.
    # The tensors autograd saves (summed by a saved-tensors hook, weights excluded) are a part of it.
    import bench
    import lora
    import train
    from model import GPT
    gc = config_for('GPT-B', 256, 16, vocab_size=16384, n_layer=2)
    tc = train.TrainConfig(cfg_scale=1.0)
    x, y = torch.randint(16384, (1, gc.block_size)), torch.tensor([3])
    for opt, bf16 in (('ddp', False), ('grad_ckpt', False), ('lora', False), ('ddp', True)):
        torch.manual_seed(0)
        m = GPT(gc).eval()
        m.grad_ckpt = opt == 'grad_ckpt'
        if opt == 'lora':
            lora.add_lora(m, 16, 32)
        amp = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16)
        fwd = lambda: train.sequence_logprobs(tc, m, x, y, None)[0].mean()

        def step():
            with amp():
                fwd().backward()
        step()  # the gradients exist, as from the second micro-batch on
        est = memory.activation_bytes(gc, 1, opt == 'grad_ckpt', bf16, lora=opt == 'lora')
        measured = bench.peak_bytes(step, torch.device('cpu'))
        assert abs(measured / est - 1) < 0.2, (opt, bf16, measured, est)
        weights, saved = {p.untyped_storage().data_ptr() for p in m.parameters()}, {}
        keep = lambda t: saved.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()}) or t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), amp():
            fwd()
        assert sum(n for p, n in saved.items() if p not in weights) < est
