"""
distributed.py -- torchrun plumbing for every command: one process-group init, one print0, the collectives
train.py needs (gather the rewards of a group that spans ranks, average the metrics, check the replicas), and
FSDP2 sharding for the big models.

    python distributed.py     # smoke demo: one process, the helpers' single-rank behaviour

--fsdp shards with PyTorch's FSDP2 (`fully_shard`): each rank holds 1/world of the weights, gradients and AdamW
state; a block's weights are all-gathered just before it runs and freed after. How the rollout departs from
FSDP's default: it gathers every block once and keeps it gathered for the whole decode (`gathered`), instead of
one all-gather per block per token: a decode of N tokens runs the network N + 1 times, so per-block gathering
would move the whole model N + 1 times per rollout (5x slower on 2 CPU ranks for 16 tokens: `torchrun
--nproc_per_node 2 bench.py --only gather`; the price of gathering once is the unsharded bf16 weights, 2
bytes/param, held for the rollout).
"""
import datetime
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# the process group, printing, collectives


def init(device='auto', timeout_min=30):
    """torchrun -> (rank, world, this rank's device), with the process group initialised (nccl on GPU, gloo on
    CPU); plain python -> (0, 1, device). 'auto' = cuda if available. The timeout bounds how long a rank waits
    at a collective for the others (sample.py's ranks wait while rank 0 merges 50,000 images: it passes hours)."""
    device = device if device not in (None, 'auto') else ('cuda' if torch.cuda.is_available() else 'cpu')
    if 'RANK' not in os.environ:
        return 0, 1, torch.device(device)
    rank, world, local = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    if device.startswith('cuda'):
        device = f'cuda:{local}'
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo',
                            timeout=datetime.timedelta(minutes=timeout_min))
    return rank, world, torch.device(device)


def print0(*args, **kwargs):
    """print on rank 0 only (RANK from torchrun's environment; plain python is rank 0)."""
    if int(os.environ.get('RANK', '0')) == 0:
        print(*args, **kwargs, flush=True)


def rank0_decides(fn, rank, world):
    """fn() on rank 0 only (taking a lock, moving an earlier run aside); the UserError it may raise is raised on
    every rank, so that all of them stop together with one sentence (rank 0's) instead of waiting at the next
    collective for a rank that has gone."""
    from cli import UserError
    error = None
    if rank == 0:
        try:
            fn()
        except UserError as e:
            error = e
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


def all_gather_cat(local, world):
    """(B, ...) of this rank -> (B * world, ...) of every rank in rank order, on every rank."""
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def average_metrics(metrics, world, device, keep=('images_per_s',)):
    """Mean of every metric over ranks (the keys are the same on every rank, in the same order); the keys in
    `keep` are taken from this rank as they are (images_per_s already counts every rank)."""
    if world == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    out = {k: v / world for k, v in zip(keys, t.tolist())}
    return out | {k: metrics[k] for k in keep if k in metrics}


def check_in_sync(model, world, device):
    """DDP keeps replicas identical; verify it before saving (a cheap checksum, min vs max over ranks).
    FSDP holds shards, not replicas: nothing to compare."""
    if world == 1 or is_sharded(model):
        return
    s = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("the ranks' weights have diverged; this is a bug, please report it")
    print0(f"ranks in sync: {world} replicas hold identical weights")

# -----------------------------------------------------------------------------
# FSDP2


def check_flags(fsdp, compile):
    """train.py's --fsdp, before anything is built: it needs torchrun, and no CUDA-graphed decode step."""
    from cli import UserError
    if fsdp and 'RANK' not in os.environ:
        raise UserError("--fsdp shards over the ranks torchrun starts; launch with torchrun --nproc_per_node N")
    if fsdp and compile:  # FSDP's per-module hooks do not fit a CUDA-graphed full-graph decode step
        raise UserError("--fsdp does not support --compile of the decode step (the c2i/t2i presets turn it "
                        "on); add --no-compile")


def shard(model, device):
    """Shard `model` over the default process group with FSDP2: each block its own unit (gathered just before
    it runs, freed after), then the root (embeddings, final norm, output). On GPU the gathered weights are bf16
    and gradients are reduced in float32; the sharded master weights and AdamW state stay float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
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


if __name__ == '__main__':
    rank, world, device = init('cpu')
    gathered = all_gather_cat(torch.arange(4.), world)
    print0(f"rank {rank} of {world} on {device}; gathered rewards of one rank: {gathered}")
    averaged = average_metrics({'reward': 0.5, 'images_per_s': 8.0}, world, device)
    print0(f"metrics averaged over {world} rank(s): {averaged}")
