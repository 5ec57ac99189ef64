"""Several processes under torchrun: who this process is, the collectives the scripts use, the shard of
the data each process embeds, and SyncBatchNorm (also on CPU tensors, which torch's own does not take).

Without torchrun every function here is the identity of a one-process world, so the scripts call them
unconditionally.
"""
import datetime
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank of world_size, local_rank on its node."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def main(self):
        """The process that prints and writes files."""
        return self.rank == 0


SINGLE = World()


def world_from_env(environ):
    """The World torchrun describes in `environ` (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), or
    SINGLE without torchrun. Raises ValueError naming a variable that is malformed."""
    if 'WORLD_SIZE' not in environ:
        return SINGLE
    values = {}
    for key, default in (('WORLD_SIZE', None), ('RANK', None), ('LOCAL_RANK', None),
                         ('LOCAL_WORLD_SIZE', environ.get('WORLD_SIZE'))):
        text = environ.get(key, default)
        try:
            values[key] = int(text)
        except (TypeError, ValueError):
            raise ValueError(f'the launcher set WORLD_SIZE but {key}={text!r} is not an integer') from None
    world = World(values['RANK'], values['WORLD_SIZE'], values['LOCAL_RANK'], values['LOCAL_WORLD_SIZE'])
    if not (world.world_size >= 1 and 0 <= world.rank < world.world_size and world.local_rank >= 0):
        raise ValueError(f'inconsistent launcher environment: RANK={world.rank} WORLD_SIZE={world.world_size} '
                         f'LOCAL_RANK={world.local_rank}')
    return world


def init(world, device, timeout_s=1800):
    """Join the process group: NCCL for CUDA devices, Gloo on CPU. Needs MASTER_ADDR/MASTER_PORT (torchrun
    sets them). A collective that waits longer than timeout_s fails instead of hanging."""
    if not world.distributed:
        return
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', rank=world.rank,
                            world_size=world.world_size, timeout=datetime.timedelta(seconds=timeout_s))


def close(world):
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- collectives

def all_sum(tensor, world):
    """The elementwise sum of `tensor` over all processes (bitwise the same on every process)."""
    if not world.distributed:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def all_max(value, world, device):
    """The largest of an integer over all processes."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast(obj, world):
    """Rank 0's picklable `obj` on every process (other ranks' argument is ignored)."""
    if not world.distributed:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _AllSum(torch.autograd.Function):
    """all_sum that autograd can pass through: the gradient of a sum over processes is the sum over
    processes of the gradients."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


# ----------------------------------------------------------------------------- sharding

def shard_chunks(n, chunk, world):
    """The (start, stop) row ranges of [0, n) this process takes: chunks of `chunk` rows, chunk c going to
    rank c % world_size. With one process it is every chunk, so each chunk is computed exactly as a single
    process computes it (same batch composition, same floating-point result)."""
    return [(s, min(s + chunk, n)) for s in range(world.rank * chunk, n, world.world_size * chunk)]


def gather_chunks(local, n, chunk, world):
    """Every process's shard_chunks rows, concatenated in order: the full (n, ...) tensor on every process.

    `local` holds this process's chunks in order (it may be empty, shape (0,), on a process without any).
    """
    if not world.distributed:
        return local
    w = world.world_size
    held = [sum(min(chunk, n - s) for s in range(r * chunk, n, w * chunk)) for r in range(w)]
    width = all_max(local.shape[1] if local.dim() == 2 else 0, world, local.device)
    local = local.reshape(-1, width)
    padded = torch.zeros(max(held), width, dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    rows = []
    for c in range(math.ceil(n / chunk)):
        rank, position = c % w, (c // w) * chunk  # every chunk before the last one is full
        rows.append(parts[rank][position:position + min(chunk, n - c * chunk)])
    return torch.cat(rows)


# ----------------------------------------------------------------------------- models

class CPUSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU tensors under Gloo (torch.nn.SyncBatchNorm takes accelerator tensors only,
    and DistributedDataParallel refuses it on CPU modules).

    In training, the mean and the biased variance come from sums over every process's batch, both through
    autograd, so outputs and gradients are those of one BatchNorm over the global batch; the running
    statistics are updated with the unbiased global variance, as BatchNorm does. In eval mode, or in a
    single process, it is plain BatchNorm.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        sums = _AllSum.apply(torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.size(1)])]))
        count = sums[-1].detach()
        mean = sums[:-1] / count  # C
        centered = x - mean.view(shape)
        var = _AllSum.apply((centered * centered).sum(dims)) / count  # C, biased: what BN normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1), factor)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def _cpu_sync_batchnorm(module):
    """`module` with each BatchNorm layer replaced by a CPUSyncBatchNorm holding the same parameters and
    buffers."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        synced = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        for name in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
            if getattr(module, name, None) is not None:
                setattr(synced, name, getattr(module, name))
        return synced.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, _cpu_sync_batchnorm(child))
    return module


def sync_batchnorm(model, device):
    """`model` with every BatchNorm layer computing the statistics of the global batch (SyncBatchNorm)."""
    if device.type == 'cpu':
        return _cpu_sync_batchnorm(model)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def data_parallel(model, world, device):
    """DistributedDataParallel around `model` (gradients averaged over processes), or `model` itself."""
    if not world.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None)
