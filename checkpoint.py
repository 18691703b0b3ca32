"""
checkpoint.py -- train.py's checkpoints: one save is one step directory, switched into place atomically.

    out_dir/step_NNNNNN/   model.safetensors, state.pt, dcp/ (and the LoRA adapter): one whole save
    out_dir/latest         a symlink to the newest whole save, switched last

A kill at any moment (tested with kill -9 at random moments and inside a save) leaves at least one whole save,
and `--resume` continues from the newest one bitwise. The sharded state goes through torch.distributed.checkpoint
(DCP), so a run saved on N ranks resumes on any number of ranks, sharded (FSDP2) or not; model.safetensors is
the usual single file that sample.py --ckpt and LlamaGen-format loaders read.

    python checkpoint.py     # smoke demo: save a tiny policy twice, resume it, compare
"""
import os
import re
import shutil
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist

import scale
from cli import UserError
from model import save_gpt

# flags that may differ on --resume: they change neither the data nor the maths (out_dir: the run may move)
RESUME_FREE = {'max_steps', 'resume', 'save_every', 'grid_every', 'eval', 'device', 'compile', 'out_dir',
               'fsdp', 'grad_ckpt', 'kl_images'}

# One save = one directory, out_dir/step_NNNNNN/:
#   model.safetensors   full weights (LoRA merged), LlamaGen keys + GPTConfig: sample.py --ckpt reads it
#   adapter_model.safetensors, adapter_config.json   the LoRA adapter alone, in PEFT's format (LoRA only)
#   dcp/                trained weights + AdamW state via torch.distributed.checkpoint: any world size loads it
#   state.pt            step, bad-step count, RNG, config
# It is written as .tmp_step_NNNNNN and renamed when whole, then the `latest` symlink is switched to it, then
# older saves are deleted: a kill at any moment leaves at least one whole step_* directory.
STEP_DIR = re.compile(r'step_(\d+)$')


def _barrier(world):
    if world > 1:
        dist.barrier()


def _dcp_state(cfg, policy, opt):
    """{'model', 'optim'} keyed by parameter name, sharded or not (frozen LoRA base left out: it is --ckpt)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(policy, opt, options=StateDictOptions(ignore_frozen_params=bool(cfg.lora_rank)))
    return {'model': msd, 'optim': osd}


def full_weights(policy):
    """Every rank calls it (FSDP gathers); rank 0 gets the full state dict on the CPU, others may get {}."""
    if scale.is_sharded(policy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in policy.state_dict().items()}


def save_checkpoint(cfg, policy, opt, step, bad_steps, rank=0, world=1):
    """Write step_NNNNNN as one unit (see above). Called on every rank."""
    import torch.distributed.checkpoint as dcp
    name = f'step_{step:06d}'
    tmp, final = os.path.join(cfg.out_dir, '.tmp_' + name), os.path.join(cfg.out_dir, name)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed half-way
        os.makedirs(tmp)
    _barrier(world)
    with warnings.catch_warnings():  # single process: DCP warns that it assumes one, which is the intent
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        dcp.save(_dcp_state(cfg, policy, opt), checkpoint_id=os.path.join(tmp, 'dcp'), no_dist=world == 1)
    sd = full_weights(policy)
    if rank == 0:
        if cfg.lora_rank:
            scale.save_adapter(sd, tmp, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.ckpt)
            sd = scale.merge_lora(sd, cfg.lora_alpha / cfg.lora_rank)
        save_gpt(policy, os.path.join(tmp, 'model.safetensors'), state_dict=sd, step=step)
        torch.save(dict(step=step, bad_steps=bad_steps, config=asdict(cfg), rng_cpu=torch.get_rng_state(),
                        rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
                   os.path.join(tmp, 'state.pt'))
        shutil.rmtree(final, ignore_errors=True)  # only if this very step was saved before
        os.replace(tmp, final)  # the save exists from here on
        link = os.path.join(cfg.out_dir, '.latest_tmp')
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(name, link)
        os.replace(link, os.path.join(cfg.out_dir, 'latest'))  # atomic switch of the pointer
        for d in os.listdir(cfg.out_dir):  # older saves, and temp dirs of saves that were killed
            if (STEP_DIR.match(d) and d != name) or d.startswith('.tmp_step_'):
                shutil.rmtree(os.path.join(cfg.out_dir, d), ignore_errors=True)
    _barrier(world)


def newest_checkpoint(out_dir):
    """The newest whole save in out_dir (a save is named step_* only once it is whole)."""
    steps = [d for d in os.listdir(out_dir) if STEP_DIR.match(d)] if os.path.isdir(out_dir) else []
    if not steps:
        raise UserError(f"--resume: no checkpoint in {out_dir} (no step_* directory); drop --resume to start")
    d = os.path.join(out_dir, max(steps, key=lambda n: int(STEP_DIR.match(n).group(1))))
    for f in ('state.pt', 'model.safetensors', os.path.join('dcp', '.metadata')):
        if not os.path.isfile(os.path.join(d, f)):
            raise UserError(f"--resume: {os.path.join(d, f)} is missing; restore it or delete {d} to resume "
                            f"from an older save")
    return d


def load_checkpoint(cfg, policy, opt):
    """Restore weights, optimizer, RNG and step from the newest save in out_dir (every rank, any world size).
    Returns (step, bad_steps)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    d = newest_checkpoint(cfg.out_dir)
    try:
        state = torch.load(os.path.join(d, 'state.pt'), map_location='cpu', weights_only=True)
        saved = state['config']
    except Exception as e:
        raise UserError(f"--resume: {os.path.join(d, 'state.pt')} is truncated or corrupt ({type(e).__name__}); "
                        f"delete {d} to resume from an older save, or drop --resume") from None
    diff = [k for k, v in saved.items() if k not in RESUME_FREE and getattr(cfg, k, None) != v]
    if diff:
        raise UserError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)} "
                        f"(e.g. {diff[0]}={saved[diff[0]]!r} there); use the same settings")
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    target = _dcp_state(cfg, policy, opt)  # the layout to load into: this run's sharding and world size
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='torch.distributed is disabled')
            dcp.load(target, checkpoint_id=os.path.join(d, 'dcp'), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:
        raise UserError(f"--resume: the sharded state in {os.path.join(d, 'dcp')} is truncated, corrupt or "
                        f"from another model ({type(e).__name__}); delete {d} to resume from an older save") from None
    # LoRA: the dict holds the adapters only (dcp.load above already failed if any was absent); the frozen base
    # keys are not in it by design, hence strict=False there
    lora = bool(cfg.lora_rank)
    set_state_dict(policy, opt, model_state_dict=target['model'], optim_state_dict=target['optim'],
                   options=StateDictOptions(ignore_frozen_params=lora, strict=not lora))
    torch.set_rng_state(state['rng_cpu'])
    if state['rng_cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['rng_cuda'])
    return state['step'], state['bad_steps']


if __name__ == '__main__':
    import tempfile
    from dataclasses import dataclass
    from model import GPT, GPTConfig

    @dataclass
    class Run:  # the TrainConfig fields a save reads
        out_dir: str
        lora_rank: int = 0
        ckpt: str = ''

    torch.manual_seed(0)
    policy = GPT(GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=4, block_size=4))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as d:
        for step in (1, 2):
            save_checkpoint(Run(d), policy, opt, step, bad_steps=0)
        print(sorted(os.listdir(d)), '-> latest =', os.readlink(os.path.join(d, 'latest')))
        copy = GPT(policy.config)
        step, bad = load_checkpoint(Run(d), copy, torch.optim.AdamW(copy.parameters(), lr=1e-3))
        same = all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), copy.state_dict().values()))
        print(f"resumed at step {step}; weights equal: {same}")
