"""SimSiam self-supervised pretraining with a kNN monitor (Chen & He, CVPR 2021; CIFAR recipe of App. D).

    python main.py --batch_size 512 --epochs 800
"""
import copy
import json
import math
import os
import sys
import time

import pandas as pd
import thop
import torch
from tqdm import tqdm

import distributed
import plot
import utils
from model import ARCHS, SimSiam, simsiam_loss

UserError = utils.UserError


def parse_args(argv=None):
    p = utils.Parser(description='SimSiam pretraining on CIFAR-10/100 or an image folder, '
                                 'with a kNN monitor after every epoch.')
    p.add_argument('--arch', default='resnet50', choices=ARCHS, help='backbone (CIFAR variant)')
    p.add_argument('--feature_dim', type=utils.positive_int, default=2048,
                   help='output dim of the projector and the predictor')
    p.add_argument('--pred_dim', type=utils.positive_int, default=512, help='predictor bottleneck width')
    p.add_argument('--proj_hidden_dim', type=utils.positive_int, default=2048, help='projector hidden width')
    p.add_argument('--k', type=utils.positive_int, default=200,
                   help='neighbours that vote in the kNN monitor (clamped to the bank size)')
    p.add_argument('--knn_t', type=utils.positive_float, default=0.1, help='kNN vote temperature')
    p.add_argument('--knn_feature', default='backbone', choices=('backbone', 'projector'),
                   help='which output the kNN monitor compares')
    p.add_argument('--knn_every', type=utils.positive_int, default=1,
                   help='run the kNN monitor every N epochs (and always after the last)')
    p.add_argument('--batch_size', type=utils.positive_int, default=512, help='images per step')
    p.add_argument('--epochs', type=utils.positive_int, default=800, help='passes over the training set')
    p.add_argument('--lr', type=utils.positive_float, default=0.03,
                   help='base learning rate; the optimiser uses lr x batch_size / 256')
    p.add_argument('--momentum', type=utils.non_negative_float, default=0.9, help='SGD momentum')
    p.add_argument('--wd', type=utils.non_negative_float, default=5e-4, help='SGD weight decay')
    p.add_argument('--fix_pred_lr', action='store_true',
                   help='keep the predictor at the initial lr instead of the cosine schedule')
    p.add_argument('--dataset', default='cifar10', choices=utils.DATASETS, help='training data')
    p.add_argument('--data_root', default='data', help='where the data lives (downloaded for CIFAR)')
    p.add_argument('--results_dir', default='results', help='where the CSV and checkpoints go')
    p.add_argument('--name', default=None,
                   help='run name used in output file names (default: built from the settings)')
    utils.add_run_flags(p, "this run's state")
    return p.parse_args(argv)


def run_name(args):
    """Output file prefix: differs whenever a setting that changes the run's result differs."""
    if args.name:
        return args.name
    return f'{args.arch}_{args.dataset}_{args.feature_dim}_{args.k}_{args.batch_size}_{args.epochs}'


def count_model(model, device):
    """Params (M) and thop FLOPs (G, multiply-adds) of backbone and of backbone + 10-class linear head."""
    backbone = copy.deepcopy(model.backbone).eval()  # thop leaves buffers behind: count a copy
    head = torch.nn.Sequential(backbone, torch.nn.Linear(model.backbone_dim, 10)).to(device)
    x = torch.zeros(1, 3, utils.IMAGE_SIZE, utils.IMAGE_SIZE, device=device)
    flops, params = thop.profile(head, inputs=(x,), verbose=False)
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    n_total = sum(p.numel() for p in model.parameters())
    return {'backbone_params_M': n_backbone / 1e6, 'linear_params_M': params / 1e6,
            'flops_G': flops / 1e9, 'simsiam_params_M': n_total / 1e6}


def build_optimizer(model, init_lr, momentum, wd, fix_pred_lr):
    """SGD with momentum and weight decay on every parameter (paper Sec. 4, App. D)."""
    groups = [
        {'params': list(model.backbone.parameters()) + list(model.projector.parameters()), 'fix_lr': False},
        {'params': list(model.predictor.parameters()), 'fix_lr': fix_pred_lr},
    ]
    return torch.optim.SGD(groups, lr=init_lr, momentum=momentum, weight_decay=wd)


def set_lr(optimizer, lr, init_lr):
    for group in optimizer.param_groups:
        group['lr'] = init_lr if group['fix_lr'] else lr


def train_epoch(model, batches, steps, optimizer, epoch, epochs, speed, world=distributed.SINGLE,
                check_every=10, progress=True):
    """One pass of stop-gradient training over `steps` batches of ([x1, x2], labels).

    Returns the mean loss and the mean z_std (of both views) over the epoch's steps. The forward runs under
    the autocast `speed` asks for; the loss is float32 whatever it is. Under torchrun each process holds
    its slice of every global batch: the loss of a step is the mean over processes and z_std is that of
    the global batch (from summed utils.z_moments). Losses and moments stay on the device and are summed
    over processes and checked for non-finite values every `check_every` steps (a host sync per step would
    stall a GPU); the first bad step is named exactly, on every process alike.
    """
    model.train()
    losses, stds, pending = [], [], []
    with tqdm(batches, total=steps, desc=f'Train Epoch [{epoch}/{epochs}]', dynamic_ncols=True,
              disable=not progress) as bar:
        for step, ((x1, x2), _) in enumerate(bar, 1):
            with speed.autocast():
                p1, p2, z1, z2 = model(speed.layout(x1), speed.layout(x2))
            loss = simsiam_loss(p1, p2, z1, z2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            pending.append(torch.cat([loss.detach().double().view(1),
                                      utils.z_moments(z1).flatten(), utils.z_moments(z2).flatten()]))
            if step % check_every == 0 or step == steps:
                block = distributed.all_sum(torch.stack(pending), world)  # S x (1 + 2 views x 2 x D)
                recent = (block[:, 0] / world.world_size).cpu()
                bad = (~recent.isfinite()).nonzero()
                if len(bad):
                    first = int(bad[0])
                    raise utils.NonFiniteLoss(epoch, step - len(pending) + first + 1, recent[first].item())
                moments = block[:, 1:].view(len(pending), 2, 2, -1)
                stds.append(utils.z_std_from_moments(moments, len(x1) * world.world_size).mean(dim=1))
                losses.append(recent)
                pending = []
                bar.set_postfix(loss=f'{torch.cat(losses).mean().item():.4f}')
    return torch.cat(losses).mean().item(), torch.cat(stds).mean().item()


# The seed's columns, then the collapse monitor, the schedule and the clock (train and kNN separately).
COLUMNS = ['epoch', 'train_loss', 'test_acc@1', 'test_acc@5', 'z_std', 'z_std_ratio', 'lr',
           'train_time', 'knn_time', 'epoch_time', 'images_per_s']
WALL_CLOCK = ('train_time', 'knn_time', 'epoch_time', 'images_per_s')  # the only columns that vary run to run


def output_paths(results_dir, name):
    return {key: os.path.join(results_dir, f'{name}_{suffix}') for key, suffix in
            (('csv', 'statistics.csv'), ('model', 'model.pth'), ('state', 'state.pth'),
             ('plot', 'statistics.png'), ('neighbours', 'neighbours.png'), ('record', 'args.json'))}


def draw_neighbours(bank, test, bank_features, test_features, path):
    """Fixed test images (evenly spaced through the test set) and their nearest training images."""
    queries = torch.linspace(0, len(test) - 1, min(plot.NEIGHBOURS, len(test))).long()
    index, sim = utils.nearest(test_features[queries.to(test_features.device)], bank_features, plot.NEIGHBOURS)
    index, sim = index.cpu(), sim.cpu()
    plot.plot_neighbours(test.images[queries], bank.images[index], test.labels[queries].tolist(),
                         bank.labels[index].numpy(), sim.numpy(), bank.classes, path)


def model_args(args):
    return {'arch': args.arch, 'feature_dim': args.feature_dim, 'pred_dim': args.pred_dim,
            'proj_hidden_dim': args.proj_hidden_dim}


def save_epoch(paths, rows, model, optimizer, epoch, args, classes):
    """The CSV, the model and the full training state of a completed epoch (the caller holds signals
    back, so that they are written as one set)."""
    utils.write_csv(rows, COLUMNS, paths['csv'])
    common = {'epoch': epoch, 'model_args': model_args(args), 'dataset': args.dataset, 'classes': classes,
              'args': vars(args)}
    weights = model.state_dict()
    utils.save_checkpoint({'kind': 'simsiam_model', 'state_dict': weights, **common}, paths['model'])
    utils.save_checkpoint({'kind': 'simsiam_state', 'model': weights, 'optimizer': optimizer.state_dict(),
                           'rows': rows, 'rng': utils.rng_state(), **common}, paths['state'])


def main(args):
    with utils.processes(args.device, os.environ) as (world, device):
        pretrain(args, world, device)


def load_run(args, paths):
    """The results folder checked, and the saved state to continue from (or None): decided by rank 0."""
    utils.check_writable(args.results_dir)
    return utils.find_state(args, paths['state'], 'simsiam_state', 'main.py')



def pretrain(args, world, device):
    log = utils.printer(world)
    log('arguments:', json.dumps(vars(args), sort_keys=True), flush=True)
    utils.check_divisible(args.batch_size, world)
    name = run_name(args)
    paths = output_paths(args.results_dir, name)
    state = utils.on_main(lambda: load_run(args, paths), world)
    train, test = utils.on_main(lambda: utils.load_splits(args.dataset, args.data_root), world)
    if args.batch_size > len(train):
        raise utils.JobError(f'--batch_size {args.batch_size} is larger than the training set '
                             f'({len(train)} images): no step would run')
    k = min(args.k, len(train))
    if k < args.k:
        log(f'warning: --k {args.k} is larger than the kNN bank ({len(train)} images); using k={k}',
            file=sys.stderr)
    log(f'data: {args.dataset}, {len(train)} train / {len(test)} test images, '
        f'{len(train.classes)} classes; device: {device}' +
        (f' ({world.world_size} processes, {args.batch_size // world.world_size} images each per step)'
         if world.distributed else ''), flush=True)

    torch.manual_seed(args.seed)
    model = SimSiam(args.arch, args.feature_dim, args.pred_dim, args.proj_hidden_dim).to(device)
    if world.main:
        counts = count_model(model, device)
        log(f'params: backbone {counts["backbone_params_M"]:.2f} M, backbone + linear head '
            f'{counts["linear_params_M"]:.2f} M, SimSiam {counts["simsiam_params_M"]:.2f} M; '
            f'FLOPs {counts["flops_G"]:.2f} G per image (thop)', flush=True)
    if world.distributed:
        model = distributed.sync_batchnorm(model, device)  # BN statistics of the global batch, per view
    init_lr = args.lr * args.batch_size / 256  # batch_size is the global batch
    optimizer = build_optimizer(model, init_lr, args.momentum, args.wd, args.fix_pred_lr)
    rows, done = [], 0
    if state is not None:
        rows, done = utils.restore(state, {'model': model}, optimizer, 'model', args.epochs, log)

    speed = utils.resolve_speed(args, device)
    log(f'speed: {speed}', flush=True)
    if world.main:
        utils.write_json(utils.run_record(args, device, {
            'name': name, 'lr_resolved': init_lr, 'speed': str(speed), 'resumed_after_epoch': done,
            'world_size': world.world_size, 'train_images': len(train), 'test_images': len(test),
            'classes': train.classes}), paths['record'])
    source = utils.ViewSource(train, 'pretrain', speed.aug, args.seed, device,
                              utils.worker_count(args.num_workers, world), world)
    net = speed.prepare(model, lambda m: distributed.data_parallel(m, world, device))
    knn_fn = speed.wrap(model.backbone if args.knn_feature == 'backbone' else model.encode)
    features = None
    saved = lambda: (f'epochs 1-{done} are saved in {paths["state"]}' if done else 'no epoch had completed')
    with utils.interruptible(saved):
        for epoch in range(done + 1, args.epochs + 1):
            lr = utils.cosine_lr(init_lr, epoch - 1, args.epochs)
            set_lr(optimizer, lr, init_lr)
            batches, steps = source.epoch(epoch, args.batch_size)
            start = time.perf_counter()
            try:
                train_loss, z_std = train_epoch(net, batches, steps, optimizer, epoch, args.epochs, speed, world,
                                                progress=world.main)
            except utils.NonFiniteLoss as e:
                kept = f'the state of epoch {done} is kept in {paths["state"]}' if done else 'nothing was saved'
                raise utils.JobError(f'{e}; training stopped and {kept} (try a lower --lr)') from None
            train_time = time.perf_counter() - start
            row = {'epoch': epoch, 'train_loss': train_loss, 'test_acc@1': None, 'test_acc@5': None,
                   'z_std': z_std, 'z_std_ratio': z_std * math.sqrt(args.feature_dim), 'lr': lr}
            if epoch % args.knn_every == 0 or epoch == args.epochs:
                model.eval()
                row['test_acc@1'], row['test_acc@5'], *features = utils.knn_monitor(
                    knn_fn, train, test, k, args.knn_t, args.batch_size, device, world)
            epoch_time = time.perf_counter() - start
            row.update(train_time=train_time, knn_time=epoch_time - train_time, epoch_time=epoch_time,
                       images_per_s=steps * args.batch_size / train_time)
            if row['z_std_ratio'] < utils.COLLAPSE_THRESHOLD and \
                    all(r['z_std_ratio'] >= utils.COLLAPSE_THRESHOLD for r in rows if 'z_std_ratio' in r):
                log(f'warning: epoch {epoch}: z_std_ratio {row["z_std_ratio"]:.3f} is under '
                    f'{utils.COLLAPSE_THRESHOLD}: the representation may be collapsing (see README)',
                    file=sys.stderr, flush=True)
            rows.append(row)
            with utils.signals_deferred():  # a signal now is taken once the epoch is saved and counted
                if world.main:
                    save_epoch(paths, rows, model, optimizer, epoch, args, train.classes)
                done = epoch
            if world.main:
                plot.plot_pretrain(pd.DataFrame(rows, columns=COLUMNS), paths['plot'], name)
            acc = '' if row['test_acc@1'] is None else \
                f' kNN acc@1 {row["test_acc@1"]:.2f}% acc@5 {row["test_acc@5"]:.2f}%'
            log(f'epoch {epoch}/{args.epochs}: loss {train_loss:.4f}{acc} z_std_ratio '
                f'{row["z_std_ratio"]:.3f} ({train_time:.1f} s train, {epoch_time - train_time:.1f} s kNN)',
                flush=True)
    if not world.main:
        return
    if features:
        draw_neighbours(train, test, *features, paths['neighbours'])
    last = rows[-1]
    files = ', '.join(f'{key} {path}' for key, path in paths.items() if os.path.exists(path))
    log(f'done: {files}; epoch {last["epoch"]} kNN acc@1 {last["test_acc@1"]:.2f}% '
        f'acc@5 {last["test_acc@5"]:.2f}%', flush=True)


if __name__ == '__main__':
    sys.exit(utils.cli(main, parse_args))
