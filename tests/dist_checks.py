"""Checks run inside a job (`torchrun --nproc_per_node=2 tests/dist_checks.py OUT DATA`) and, for
comparison, in one process (`check(...)` from test_distributed.py): the kNN monitor of a fixed model, and
one training step on a fixed global batch, with or without SyncBatchNorm."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distributed  # noqa: E402
import monitor  # noqa: E402
import optim  # noqa: E402
import utils  # noqa: E402
from model import ModelConfig, SimSiam  # noqa: E402
from pretrain import train_epoch  # noqa: E402
from speed import Speed  # noqa: E402

GLOBAL_BATCH = 16


def fixed_model():
    torch.manual_seed(0)
    return SimSiam(ModelConfig('resnet18', feature_dim=64, pred_dim=16, proj_hidden_dim=64))


def check(data_root, world, device, sync=True):
    """The monitor's numbers and features, then the loss, z_std and weights after one step."""
    train, test = utils.load_splits('folder', data_root)
    model = fixed_model().to(device).eval()
    top1, top5, bank, queries = monitor.knn_monitor(model.backbone, train, test, 5, 0.1, 8, device, world)

    gen = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, GLOBAL_BATCH, 3, 32, 32, generator=gen)
    local = GLOBAL_BATCH // world.world_size
    mine = slice(world.rank * local, (world.rank + 1) * local)
    if sync and world.distributed:
        model = distributed.sync_batchnorm(model, device)
    optimizer = optim.sgd(model.param_groups(), 0.5, 0.9, 5e-4)
    net = distributed.data_parallel(model, world, device)
    speed = Speed(device, 'batched', amp=False, channels_last=False, compile=False)
    loss, z_std = train_epoch(net, [([x1[mine], x2[mine]], None)], 1, optimizer, 1, 1, speed, world,
                              progress=False)
    return {'top1': top1, 'top5': top5, 'bank': bank, 'queries': queries, 'loss': loss, 'z_std': z_std,
            'weights': {k: v.clone() for k, v in model.state_dict().items()}}


if __name__ == '__main__':
    out, data_root = sys.argv[1], sys.argv[2]
    with distributed.processes('cpu', os.environ) as (world, device):
        results = {'sync': check(data_root, world, device, sync=True),
                   'unsynced': check(data_root, world, device, sync=False)}
        if world.main:
            torch.save(results, out)
