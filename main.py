"""SimSiam self-supervised pretraining with a kNN monitor (Chen & He, CVPR 2021; CIFAR recipe of App. D).

    python main.py --batch_size 512 --epochs 800
"""
import copy
import functools
import math
import os
import sys
import time

import pandas as pd
import thop
import torch
from tqdm import tqdm

import distributed
import launch
import monitor
import plot
import utils
from model import ARCHS, MLP_BN, PREDICTORS, SIMILARITIES, SimSiam, simsiam_loss
from run import Run, cosine_lr, first_non_finite, scaled_lr

UserError = launch.UserError


def parse_args(argv=None):
    p = launch.Parser(description='SimSiam pretraining on CIFAR-10/100 or an image folder, '
                                 'with a kNN monitor after every epoch.')
    p.add_argument('--arch', default='resnet50', choices=ARCHS, help='backbone (CIFAR variant)')
    p.add_argument('--feature_dim', type=launch.positive_int, default=2048,
                   help='output dim of the projector and the predictor')
    p.add_argument('--pred_dim', type=launch.positive_int, default=512, help='predictor bottleneck width')
    p.add_argument('--proj_hidden_dim', type=launch.positive_int, default=2048, help='projector hidden width')
    p.add_argument('--k', type=launch.positive_int, default=200,
                   help='neighbours that vote in the kNN monitor (clamped to the bank size)')
    p.add_argument('--knn_t', type=launch.positive_float, default=0.1, help='kNN vote temperature')
    p.add_argument('--knn_feature', default='backbone', choices=('backbone', 'projector'),
                   help='which output the kNN monitor compares')
    p.add_argument('--knn_every', type=launch.positive_int, default=1,
                   help='run the kNN monitor every N epochs (and always after the last)')
    p.add_argument('--lr', type=launch.positive_float, default=0.03,
                   help='base learning rate; the optimiser uses lr x batch_size / 256')
    p.add_argument('--wd', type=launch.non_negative_float, default=5e-4, help='SGD weight decay')
    p.add_argument('--fix_pred_lr', action='store_true',
                   help='keep the predictor at the initial lr instead of the cosine schedule (Table 1)')
    # The paper's ablations (Sec. 4); each default is SimSiam itself.
    p.add_argument('--stop_grad', default='on', choices=('on', 'off'),
                   help='off: no stop-gradient, z gets gradients too (Sec. 4.1, Fig. 2: it collapses)')
    p.add_argument('--predictor', default='mlp', choices=PREDICTORS,
                   help='mlp: trained; none: the identity; fixed: kept at its random initialisation, not in '
                        'the optimizer (Sec. 4.2, Table 1)')
    p.add_argument('--mlp_bn', default='default', choices=MLP_BN,
                   help='BN in the heads: none; hidden (hidden layers only); default (projector hidden and '
                        'output, predictor hidden); all (also the predictor output) (Sec. 4.4, Table 3)')
    p.add_argument('--loss', default='cosine', choices=SIMILARITIES,
                   help='similarity D: negative cosine, or xent = -softmax(z) . log softmax(p) (Sec. 4.5, Table 4)')
    p.add_argument('--symmetric', default='on', choices=('on', 'off'),
                   help='on: D(p1, z2)/2 + D(p2, z1)/2; off: D(p1, z2) alone (Sec. 4.6, Table 5)')
    launch.add_run_flags(p, "this run's state", utils.DATASETS, batch_size=512, epochs=800, dataset='cifar10',
                         data_root='data', helps={
                             'dataset': 'training data',
                             'data_root': 'where the data lives (downloaded for CIFAR)',
                             'name': 'run name used in output file names (default: built from the settings)'})
    return p.parse_args(argv)


# The ablation switches and their SimSiam values: a run name says each one that differs.
ABLATIONS = {'stop_grad': 'on', 'predictor': 'mlp', 'mlp_bn': 'default', 'loss': 'cosine', 'symmetric': 'on'}


def run_name(args):
    """Output file prefix: the seed's fields and each ablation switch that is not SimSiam's. Runs that differ in
    another flag (--lr, --seed, ...) need a --name each; a new run never overwrites an existing state."""
    if args.name:
        return args.name
    changed = ''.join(f'_{flag}-{getattr(args, flag)}' for flag, default in ABLATIONS.items()
                      if getattr(args, flag) != default)
    return (f'{args.arch}_{args.dataset}_{args.feature_dim}_{args.k}_{args.batch_size}_{args.epochs}{changed}'
            + ('_fix_pred_lr' if args.fix_pred_lr else ''))


def count_model(model, classes, device):
    """Params (M) and thop FLOPs (G, multiply-adds) for one 32x32 image: of the backbone, of the backbone with
    a linear head over `classes` classes (what linear evaluation runs), and of the whole SimSiam model (the
    backbone, projector and predictor of one view: what the seed's results table counts)."""
    x = torch.zeros(1, 3, utils.IMAGE_SIZE, utils.IMAGE_SIZE, device=device)
    copy_ = copy.deepcopy(model).eval()  # thop leaves buffers behind: count a copy
    head = torch.nn.Sequential(copy_.backbone, torch.nn.Linear(model.backbone_dim, classes)).to(device)
    flops, params = thop.profile(head, inputs=(x,), verbose=False)
    copy_ = copy.deepcopy(model).eval()
    simsiam_flops, _ = thop.profile(torch.nn.Sequential(copy_.backbone, copy_.projector, copy_.predictor),
                                    inputs=(x,), verbose=False)
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    n_total = sum(p.numel() for p in model.parameters())
    return {'backbone_params_M': n_backbone / 1e6, 'linear_params_M': params / 1e6,
            'flops_G': flops / 1e9, 'simsiam_params_M': n_total / 1e6, 'simsiam_flops_G': simsiam_flops / 1e9}


def build_optimizer(model, init_lr, momentum, wd, fix_pred_lr):
    """SGD with momentum and weight decay on every trained parameter (paper Sec. 4, App. D); a predictor
    that is the identity or kept fixed has none in it, so it is neither trained nor decayed."""
    groups = [
        {'params': list(model.backbone.parameters()) + list(model.projector.parameters()), 'fix_lr': False},
        {'params': [p for p in model.predictor.parameters() if p.requires_grad], 'fix_lr': fix_pred_lr},
    ]
    return torch.optim.SGD([g for g in groups if g['params']], lr=init_lr, momentum=momentum, weight_decay=wd)


def set_lr(optimizer, lr, init_lr):
    for group in optimizer.param_groups:
        group['lr'] = init_lr if group['fix_lr'] else lr


def train_epoch(model, batches, steps, optimizer, epoch, epochs, speed, world=distributed.SINGLE,
                check_every=10, progress=True, loss_fn=None):
    """One pass of stop-gradient training over `steps` batches of ([x1, x2], labels).

    Returns the mean loss and the mean z_std (of both views) over the epoch's steps. The forward runs under
    the autocast `speed` asks for; the loss is float32 whatever it is. Under torchrun each process holds
    its slice of every global batch: the loss of a step is the mean over processes and z_std is that of
    the global batch (from summed monitor.z_moments). Losses and moments stay on the device and are summed
    over processes and checked for non-finite values every `check_every` steps (a host sync per step would
    stall a GPU); the first bad step is named exactly, on every process alike. loss_fn(p1, p2, z1, z2) is
    simsiam_loss with the paper's settings unless given.
    """
    loss_fn = loss_fn or simsiam_loss
    model.train()
    losses, stds, pending = [], [], []
    with tqdm(batches, total=steps, desc=f'Train Epoch [{epoch}/{epochs}]', dynamic_ncols=True,
              disable=not progress) as bar:
        for step, ((x1, x2), _) in enumerate(bar, 1):
            with speed.autocast():
                p1, p2, z1, z2 = model(speed.layout(x1), speed.layout(x2))
            loss = loss_fn(p1, p2, z1, z2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            pending.append(torch.cat([loss.detach().double().view(1),
                                      monitor.z_moments(z1).flatten(), monitor.z_moments(z2).flatten()]))
            if step % check_every == 0 or step == steps:
                block = distributed.all_sum(torch.stack(pending), world)  # S x (1 + 2 views x 2 x D)
                recent = (block[:, 0] / world.world_size).cpu()
                first_non_finite(recent, epoch, step)
                moments = block[:, 1:].view(len(pending), 2, 2, -1)
                stds.append(monitor.z_std_from_moments(moments, len(x1) * world.world_size).mean(dim=1))
                losses.append(recent)
                pending = []
                bar.set_postfix(loss=f'{torch.cat(losses).mean().item():.4f}')
    return torch.cat(losses).mean().item(), torch.cat(stds).mean().item()


# The seed's columns, then the collapse monitor, the schedule and the clock (train and kNN separately, and
# the seconds the loop waited for saving at the epoch's end).
COLUMNS = ['epoch', 'train_loss', 'test_acc@1', 'test_acc@5', 'z_std', 'z_std_ratio', 'lr',
           'train_time', 'knn_time', 'epoch_time', 'images_per_s', 'save_time']
# the only columns that vary run to run
WALL_CLOCK = ('train_time', 'knn_time', 'epoch_time', 'images_per_s', 'save_time')


OUTPUTS = {'csv': 'statistics.csv', 'model': 'model.pth', 'state': 'state.pth', 'plot': 'statistics.png',
           'neighbours': 'neighbours.png', 'record': 'args.json'}


def model_args(settings):
    """The SimSiam constructor's arguments from a run's settings (its arguments as a dict; a switch they lack
    is SimSiam's): what a checkpoint needs to rebuild the model."""
    s = {**ABLATIONS, **settings}
    return {'arch': s['arch'], 'feature_dim': s['feature_dim'], 'pred_dim': s['pred_dim'],
            'proj_hidden_dim': s['proj_hidden_dim'], 'predictor': s['predictor'], 'mlp_bn': s['mlp_bn'],
            'stop_grad': s['stop_grad'] == 'on'}


def main(args):
    with launch.processes(args.device, os.environ) as (world, device), \
            Run('main.py', vars(args), args.results_dir, run_name(args), OUTPUTS, 'simsiam_state', COLUMNS,
                args.batch_size, world) as run:
        pretrain(args, run, world, device)


def pretrain(args, run, world, device):
    name, log = run.name, run.log
    state = launch.on_main(run.find_state, world)
    train, test = run.load_data(args.dataset, args.data_root, args.batch_size)
    k = min(args.k, len(train))
    if k < args.k:
        log(f'warning: --k {args.k} is larger than the kNN bank ({len(train)} images); using k={k}',
            file=sys.stderr)
    log(f'data: {args.dataset}, {len(train)} train / {len(test)} test images, '
        f'{len(train.classes)} classes; device: {device}' +
        (f' ({world.world_size} processes, {args.batch_size // world.world_size} images each per step)'
         if world.distributed else ''), flush=True)

    torch.manual_seed(args.seed)
    architecture = model_args(vars(args))
    model = SimSiam(**architecture).to(device)
    counts = None
    if world.main:
        counts = count_model(model, len(train.classes), device)
        log(f'params: backbone {counts["backbone_params_M"]:.2f} M, backbone + linear head '
            f'{counts["linear_params_M"]:.2f} M, SimSiam {counts["simsiam_params_M"]:.2f} M; '
            f'FLOPs {counts["flops_G"]:.2f} G per image (thop)', flush=True)
    if world.distributed:
        model = distributed.sync_batchnorm(model, device)  # BN statistics of the global batch, per view
    init_lr = scaled_lr(args.lr, args.batch_size)
    optimizer = build_optimizer(model, init_lr, args.momentum, args.wd, args.fix_pred_lr)
    run.restore(state, {'model': model}, optimizer, 'model', args.epochs)

    speed = launch.resolve_speed(device, args.aug, args.amp, args.channels_last, args.compile)
    log(f'speed: {speed}', flush=True)
    run.write_record(device, {'lr_resolved': init_lr, 'speed': str(speed), 'train_images': len(train),
                              'test_images': len(test), 'classes': train.classes, 'counts': counts})
    source = utils.ViewSource(train, 'pretrain', speed.aug, args.seed, device,
                              launch.worker_count(args.num_workers, world), world)
    net = speed.prepare(model, lambda m: distributed.data_parallel(m, world, device))
    knn_fn = speed.wrap(model.backbone if args.knn_feature == 'backbone' else model.encode)
    loss_fn = functools.partial(simsiam_loss, similarity=args.loss, symmetric=args.symmetric == 'on',
                                stop_grad=args.stop_grad == 'on')
    features = []

    def one_epoch(epoch):
        lr = cosine_lr(init_lr, epoch - 1, args.epochs)
        set_lr(optimizer, lr, init_lr)
        batches, steps = source.epoch(epoch, args.batch_size)
        start = time.perf_counter()
        train_loss, z_std = train_epoch(net, batches, steps, optimizer, epoch, args.epochs, speed, world,
                                        progress=world.main, loss_fn=loss_fn)
        train_time = time.perf_counter() - start
        row = {'epoch': epoch, 'train_loss': train_loss, 'test_acc@1': None, 'test_acc@5': None,
               'z_std': z_std, 'z_std_ratio': z_std * math.sqrt(args.feature_dim), 'lr': lr}
        if epoch % args.knn_every == 0 or epoch == args.epochs:
            model.eval()
            row['test_acc@1'], row['test_acc@5'], *features[:] = monitor.knn_monitor(
                knn_fn, train, test, k, args.knn_t, args.batch_size, device, world)
        epoch_time = time.perf_counter() - start
        row.update(train_time=train_time, knn_time=epoch_time - train_time, epoch_time=epoch_time,
                   images_per_s=steps * args.batch_size / train_time)
        if monitor.first_collapse(row['z_std_ratio'], [r['z_std_ratio'] for r in run.rows if 'z_std_ratio' in r]):
            log(f'warning: epoch {epoch}: z_std_ratio {row["z_std_ratio"]:.3f} is under '
                f'{monitor.COLLAPSE_THRESHOLD}: the representation may be collapsing (see README)',
                file=sys.stderr, flush=True)
        return row

    def checkpoint():
        common = {'model_args': architecture, 'dataset': args.dataset, 'classes': train.classes}
        weights = model.state_dict()
        return ({'kind': 'simsiam_model', 'state_dict': weights, **common},
                {'model': weights, 'optimizer': optimizer.state_dict(), **common})

    def describe(row):
        acc = '' if row['test_acc@1'] is None else \
            f' kNN acc@1 {row["test_acc@1"]:.2f}% acc@5 {row["test_acc@5"]:.2f}%'
        return (f'epoch {row["epoch"]}/{args.epochs}: loss {row["train_loss"]:.4f}{acc} z_std_ratio '
                f'{row["z_std_ratio"]:.3f} ({row["train_time"]:.1f} s train, {row["knn_time"]:.1f} s kNN)')

    run.loop(args.epochs, args.save_every, one_epoch, checkpoint,
             lambda rows: plot.plot_pretrain(pd.DataFrame(rows, columns=COLUMNS), run.paths['plot'], name), describe)
    if not world.main:
        return
    neighbours = [lambda: plot.plot_neighbours(*monitor.neighbour_panel(train, test, *features, plot.NEIGHBOURS),
                                               train.classes, run.paths['neighbours'])] if features else []
    last = run.rows[-1]
    run.finish(f'epoch {last["epoch"]} kNN acc@1 {last["test_acc@1"]:.2f}% acc@5 {last["test_acc@5"]:.2f}%',
               neighbours)


if __name__ == '__main__':
    sys.exit(launch.cli(main, parse_args))
