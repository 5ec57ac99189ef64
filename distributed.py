"""Where a process runs and with whom: its device, its place in a torchrun job and joining the process
group, what rank 0 decides for all, the collectives, the shard of the data each process takes, and
SyncBatchNorm (also on CPU tensors, which torch's own does not take).

Without torchrun every function here is the identity of a one-process world, so the scripts call them
unconditionally.
"""
import contextlib
import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from errors import JobError, UserError


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


def local_batch(batch_size, world):
    """Each process's share of the global --batch_size: batch_size / W, refused when W does not divide it."""
    if batch_size % world.world_size:
        raise JobError(f'--batch_size {batch_size} does not split evenly over {world.world_size} processes; '
                       f'use a multiple of {world.world_size}')
    return batch_size // world.world_size


def available_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(num_workers, world):
    """--num_workers, or by default the CPUs this process may use shared among this node's processes."""
    return num_workers if num_workers is not None else max(1, available_cpus() // world.local_world_size)


# ----------------------------------------------------------------------------- the device

def resolve_device(name):
    """'auto' -> cuda when available, else cpu. Asking for CUDA where there is none is a UserError."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'--device {name!r} is not a device; use auto, cpu, cuda or cuda:N') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f'--device {name}: CUDA is not available on this machine (use --device cpu)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f'--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    elif device.type != 'cpu':
        raise UserError(f'--device {name!r} is not supported; use auto, cpu, cuda or cuda:N')
    return device


@contextlib.contextmanager
def processes(device_flag, environ):
    """(world, device) of this process for the duration of the block.

    Without torchrun: (SINGLE, the --device). Under torchrun (WORLD_SIZE etc. in `environ`): joins the
    process group (NCCL on CUDA, Gloo on CPU) and, on CUDA, uses the GPU of this process's LOCAL_RANK.
    """
    try:
        world = world_from_env(environ)
    except ValueError as e:
        raise UserError(str(e)) from None
    device = resolve_device(device_flag)
    if world.distributed and device.type == 'cuda':
        if device.index is not None:
            raise UserError(f'--device {device_flag}: under torchrun each process uses the GPU of its '
                            f'LOCAL_RANK; use --device cuda or auto')
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f'LOCAL_RANK {world.local_rank}, but this machine has {torch.cuda.device_count()} '
                            f'CUDA device(s): start at most that many processes per node')
        device = torch.device('cuda', world.local_rank)
    if device.type == 'cuda' and device.index is not None:
        torch.cuda.set_device(device)  # the current device: where the writer's event waits on the copies
    init(world, device)
    try:
        yield world, device
    finally:
        close(world)


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


def on_main(fn, world):
    """fn() computed by rank 0 alone and handed to every process (a UserError it raises, too).

    For what must be decided once for the whole job: reading a checkpoint or the data, the results folder.
    """
    if not world.distributed:
        return fn()
    outcome = None
    if world.main:
        try:
            outcome = ('ok', fn())
        except UserError as e:
            outcome = ('error', str(e))
    status, value = broadcast(outcome, world)
    if status == 'error':
        raise JobError(value)
    return value


def printer(world):
    """print on rank 0; nothing on the other processes of a torchrun job."""
    return print if world.main else (lambda *a, **kw: None)



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
