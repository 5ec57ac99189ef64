"""SimSiam self-supervised pretraining with a kNN monitor (Chen & He, CVPR 2021; CIFAR recipe of App. D).

    python main.py --batch_size 512 --epochs 800

Build the data, the model and SGD; restore a saved state if asked; then, for each epoch: train with the
stop-gradient loss, run the kNN monitor, make the CSV row and hand the epoch to the run, which writes it.
"""
import functools
import math
import os
import sys
import time

import torch

import cli
import distributed
import monitor
import optim
import plot
import recipes
import stream
import utils
from errors import UserError
from model import (ABLATIONS, ARCHS, MLP_BN, PREDICTORS, SIMILARITIES, STEMS, ModelConfig, SimSiam, count_model,
                   resolve_stem, simsiam_loss)
from pretrain import train_epoch
from run import OUTPUTS, Run
from speed import resolve_speed


def parse_args(argv=None):
    p = cli.Parser(description='SimSiam pretraining on CIFAR-10/100 or an image folder, '
                               'with a kNN monitor after every epoch.')
    p.add_argument('--recipe', default='cifar', choices=recipes.RECIPES,
                   help="the defaults of every flag below marked 'recipe': cifar (App. D) or imagenet (Sec. 4 and "
                        "App. A: ResNet-50, ImageNet stem, 224 px, 3-layer projector, lr 0.05, wd 1e-4, batch 512, "
                        "100 epochs, fixed predictor lr, blur); a flag given explicitly overrides it")
    p.add_argument('--arch', default=None, choices=ARCHS, help='backbone (recipe: resnet50)')
    p.add_argument('--stem', default=None, choices=('auto',) + STEMS,
                   help="the backbone's first layers: cifar (3x3 stride-1 conv1, no max-pool, App. D) or imagenet "
                        "(torchvision's 7x7 stride-2 conv1 and max-pool); auto = cifar up to 64 px, imagenet above "
                        "(recipe: auto; imagenet)")
    p.add_argument('--image_size', type=cli.positive_int, default=None,
                   help='the side of the crops the model sees (recipe: the dataset\'s, 32 for CIFAR and folders, '
                        '96 for STL-10; 224)')
    p.add_argument('--feature_dim', type=cli.positive_int, default=None,
                   help='output dim of the projector and the predictor (recipe: 2048)')
    p.add_argument('--pred_dim', type=cli.positive_int, default=None, help='predictor bottleneck width (recipe: 512)')
    p.add_argument('--proj_hidden_dim', type=cli.positive_int, default=None,
                   help='projector hidden width (recipe: 2048)')
    p.add_argument('--proj_layers', type=int, default=None, choices=(2, 3),
                   help="the projector's Linear layers (recipe: 2; 3, 2048-2048-2048 with BN on each)")
    p.add_argument('--proj_out_affine', default=None, choices=('on', 'off'),
                   help="whether the projector's output BN learns a scale and shift (recipe: on; off)")
    p.add_argument('--k', type=cli.positive_int, default=200,
                   help='neighbours that vote in the kNN monitor (clamped to the bank size)')
    p.add_argument('--knn_t', type=cli.positive_float, default=0.1, help='kNN vote temperature')
    p.add_argument('--knn_feature', default='backbone', choices=('backbone', 'projector'),
                   help='which output the kNN monitor compares')
    p.add_argument('--knn_bank', type=cli.non_negative_int, default=None,
                   help='cap the kNN bank at a fixed labelled subset of the training set this large, drawn from '
                        '--seed; 0: all (recipe: 0; 100000)')
    p.add_argument('--knn_queries', type=cli.non_negative_int, default=None,
                   help='cap the kNN queries at a fixed subset of the test set this large; 0: all (recipe: 0; '
                        '10000)')
    p.add_argument('--knn_every', type=cli.positive_int, default=1,
                   help='run the kNN monitor every N epochs (and always after the last)')
    p.add_argument('--lr', type=cli.positive_float, default=None,
                   help='base learning rate; the optimiser uses lr x batch_size / 256 (recipe: 0.03; 0.05)')
    p.add_argument('--wd', type=cli.non_negative_float, default=None, help='SGD weight decay (recipe: 5e-4; 1e-4)')
    p.add_argument('--fix_pred_lr', action='store_true', default=None,
                   help='keep the predictor at the initial lr instead of the cosine schedule (Table 1) (recipe: '
                        'off; on)')
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
    cli.add_run_flags(p, "this run's state", utils.DATASETS, batch_size=None, epochs=None, dataset='cifar10',
                      data_root='data', helps={
                          'dataset': 'training data',
                          'data_root': 'where the data lives (downloaded for CIFAR and STL-10)',
                          'name': 'run name used in output file names (default: built from the settings)',
                          'batch_size': 'images per step; under torchrun the global batch, shared out (recipe: 512)',
                          'epochs': 'passes over the training set (recipe: 800; 100)'})
    args = p.parse_args(argv)
    args.aug_auto = None  # why --aug auto chose its path, once main() has looked at the data
    args.from_recipe = recipes.apply(args, recipes.PRETRAIN[args.recipe])
    if 'fix_pred_lr' in args.from_recipe and args.predictor != 'mlp':
        args.fix_pred_lr = False  # the recipe's, and there is no trained predictor to keep at its lr
    if args.image_size is None:
        args.image_size = recipes.IMAGE_SIZES[args.dataset]
    return args


def run_name(args):
    """Output file prefix: the seed's fields, a stem that is not the image size's default, and each ablation
    switch that is not SimSiam's. Runs that differ in
    another flag (--lr, --seed, ...) need a --name each; a new run never overwrites an existing state."""
    if args.name:
        return args.name
    changed = ''.join(f'_{flag}-{getattr(args, flag)}' for flag, default in ABLATIONS.items()
                      if getattr(args, flag) != default)
    if resolve_stem(args.stem, args.image_size) != resolve_stem('auto', args.image_size):
        changed = f'_stem-{args.stem}' + changed
    if args.image_size != recipes.IMAGE_SIZES[args.dataset]:
        changed = f'_{args.image_size}px' + changed
    if args.recipe != 'cifar':
        changed = f'_{args.recipe}' + changed
    return (f'{args.arch}_{args.dataset}_{args.feature_dim}_{args.k}_{args.batch_size}_{args.epochs}{changed}'
            + ('_fix_pred_lr' if args.fix_pred_lr else ''))


# The smallest image each stem takes: the CIFAR one shrinks an image 8 times (three stride-2 stages), the
# ImageNet one 32 times (its stride-2 conv1 and max-pool too), to a 1x1 map before the pooling.
MIN_IMAGE_SIZE = {'cifar': 8, 'imagenet': 32}


def check_args(args):
    """Refuse flags that would do nothing, or that no model could take, before anything is read or written."""
    stem = resolve_stem(args.stem, args.image_size)
    if args.image_size < MIN_IMAGE_SIZE[stem]:
        raise UserError(f'--image_size {args.image_size} is too small for the {stem} stem: the smallest is '
                        f'{MIN_IMAGE_SIZE[stem]} (it shrinks an image {MIN_IMAGE_SIZE[stem]} times before the pooling)')
    if args.fix_pred_lr and args.predictor != 'mlp':
        raise UserError(f"--fix_pred_lr keeps a trained predictor's lr fixed, but --predictor {args.predictor} "
                        f"has none to train; leave --fix_pred_lr out")


# The seed's columns, then the collapse monitor, the schedule and the clock (train and kNN separately, and
# the seconds the loop waited for saving at the epoch's end).
COLUMNS = ['epoch', 'train_loss', 'test_acc@1', 'test_acc@5', 'z_std', 'z_std_ratio', 'lr',
           'train_time', 'knn_time', 'epoch_time', 'images_per_s', 'save_time']
# the only columns that vary run to run
WALL_CLOCK = ('train_time', 'knn_time', 'epoch_time', 'images_per_s', 'save_time')


def knn_columns(args):
    """The CSV's columns of the kNN monitor's sizes: only when --knn_bank or --knn_queries caps them."""
    return ['knn_bank', 'knn_queries'] if args.knn_bank or args.knn_queries else []


def describe(row, epochs):
    """The epoch's line."""
    acc = '' if row['test_acc@1'] is None else \
        f' kNN acc@1 {row["test_acc@1"]:.2f}% acc@5 {row["test_acc@5"]:.2f}%'
    return (f'epoch {row["epoch"]}/{epochs}: loss {row["train_loss"]:.4f}{acc} z_std_ratio '
            f'{row["z_std_ratio"]:.3f} ({row["train_time"]:.1f} s train, {row["knn_time"]:.1f} s kNN)')


def main(args):
    check_args(args)
    name = run_name(args)
    with distributed.processes(args.device, os.environ) as (world, device):
        test_resize = recipes.AUGMENTATION[args.recipe][2]
        args.aug, args.aug_auto = distributed.on_main(lambda: utils.choose_aug(
            args.aug, args.dataset, args.data_root, args.image_size, test_resize, device), world)
        with Run('main.py', name, vars(args), columns=COLUMNS + knn_columns(args),
                 world=world, state_kind='simsiam_state', outputs={**OUTPUTS, 'neighbours': 'neighbours.png'},
                 title=name) as run:
            pretrain(args, run, world, device)


def pretrain(args, run, world, device):
    log = run.log
    distributed.local_batch(args.batch_size, world)
    state = run.start()
    speed = resolve_speed(device, args.aug, args.amp, args.channels_last, args.compile)
    if args.aug_auto:
        log(f'data path: {args.aug} (--aug auto: {args.aug_auto})', flush=True)
    augmentation, _, test_resize = recipes.AUGMENTATION[args.recipe]
    views, decode = speed.aug == 'batched', speed.aug != 'stream'
    train, test = distributed.on_main(lambda: utils.load_splits(
        args.dataset, args.data_root, args.image_size, test_resize, augmentation['mean'], augmentation['std'],
        views, decode), world)
    data = distributed.on_main(lambda: utils.pretraining_set(args.dataset, args.data_root, train, args.image_size,
                                                             test_resize, views, decode), world)
    utils.require_a_step(args.batch_size, len(data))
    bank, queries = utils.capped(train, args.knn_bank, args.seed, 1), utils.capped(test, args.knn_queries, args.seed, 2)
    k = min(args.k, len(bank))
    if k < args.k:
        log(f'warning: --k {args.k} is larger than the kNN bank ({len(bank)} images); using k={k}',
            file=sys.stderr)
    log(f'data: {args.dataset}, {len(data)} train' + (f' (the kNN bank: the {len(train)} labelled)'
                                                       if len(data) != len(train) else '') +
        f' / {len(test)} test images at {args.image_size} px, '
        f'{len(train.classes)} classes; device: {device}' +
        (f' ({world.world_size} processes, {args.batch_size // world.world_size} images each per step)'
         if world.distributed else ''), flush=True)

    # the model, its optimizer, and the saved state to continue from
    torch.manual_seed(args.seed)
    config = ModelConfig.from_settings(vars(args))
    model = SimSiam(config).to(device)
    counts = None
    if world.main:
        counts = count_model(model, len(train.classes), args.image_size, device)
        log(f'params: backbone {counts["backbone_params_M"]:.2f} M, backbone + linear head '
            f'{counts["linear_params_M"]:.2f} M, SimSiam {counts["simsiam_params_M"]:.2f} M; '
            f'FLOPs {counts["flops_G"]:.2f} G per image (thop)', flush=True)
    if world.distributed:
        model = distributed.sync_batchnorm(model, device)  # BN statistics of the global batch, per view
    init_lr = optim.scaled_lr(args.lr, args.batch_size)
    optimizer = optim.sgd(model.param_groups(args.fix_pred_lr), init_lr, args.momentum, args.wd)
    run.restore(state, {'model': model, 'optimizer': optimizer}, 'model')

    log(f'speed: {speed}', flush=True)
    run.write_record(device, {'lr_resolved': init_lr, 'speed': str(speed), 'model_args': config.to_dict(),
                              'train_images': len(data), 'test_images': len(test), 'classes': train.classes,
                              'counts': counts, 'augmentation': augmentation, 'aug': speed.aug})
    workers = distributed.worker_count(args.num_workers, world)
    source = stream.StreamSource(data, 'pretrain', args.seed, device, workers, world, args.image_size, augmentation) \
        if speed.aug == 'stream' else \
        utils.ViewSource(data, 'pretrain', speed.aug, args.seed, device, workers, world, args.image_size, augmentation)
    net = speed.prepare(model, lambda m: distributed.data_parallel(m, world, device))
    knn_fn = speed.wrap(model.backbone if args.knn_feature == 'backbone' else model.encode)
    loss_fn = functools.partial(simsiam_loss, similarity=args.loss, symmetric=args.symmetric == 'on')
    common = {'model_args': config.to_dict(), 'dataset': args.dataset, 'classes': train.classes}
    features = []

    for epoch in range(run.done + 1, args.epochs + 1):
        lr = optim.cosine_lr(init_lr, epoch - 1, args.epochs)
        optim.set_lr(optimizer, lr, init_lr)
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
                knn_fn, bank, queries, k, args.knn_t, args.batch_size, device, world, workers)
            row.update(zip(knn_columns(args), (len(bank), len(queries))))
        epoch_time = time.perf_counter() - start
        row.update(train_time=train_time, knn_time=epoch_time - train_time, epoch_time=epoch_time,
                   images_per_s=steps * args.batch_size / train_time)
        if monitor.first_collapse(row['z_std_ratio'], [r['z_std_ratio'] for r in run.rows if 'z_std_ratio' in r]):
            log(f'warning: epoch {epoch}: z_std_ratio {row["z_std_ratio"]:.3f} is under '
                f'{monitor.COLLAPSE_THRESHOLD}: the representation may be collapsing (see README)',
                file=sys.stderr, flush=True)
        weights = model.state_dict()
        run.end_epoch(row, {'kind': 'simsiam_model', 'model': weights, **common},
                      {'model': weights, 'optimizer': optimizer.state_dict(), **common})
        log(describe(row, args.epochs), flush=True)

    if world.main:
        neighbours = [lambda: plot.plot_neighbours(*monitor.neighbour_panel(bank, queries, *features, plot.NEIGHBOURS),
                                                   train.classes, run.paths['neighbours'])] if features else []
        last = run.rows[-1]
        run.finish(f'epoch {last["epoch"]} kNN acc@1 {last["test_acc@1"]:.2f}% acc@5 {last["test_acc@5"]:.2f}%',
                   neighbours)


if __name__ == '__main__':
    sys.exit(cli.cli(main, parse_args))
