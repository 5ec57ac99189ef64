"""Linear evaluation: a frozen SimSiam backbone (eval mode throughout) and trained linear classifiers.

    python linear.py --model_path results/<name>_model.pth

Rebuild the backbone from the checkpoint alone and freeze it; build the grid of linear heads (one per base
lr; one lr is a grid of one); restore a saved state if asked; then, for each epoch: train every head on one
pass of the backbone, test and validate them, choose the head to report, make the CSV row and hand the
epoch to the run, which writes it.
"""
import os
import sys
import time

import torch
from tqdm import tqdm

import cli
import distributed
import files
import recipes
import stream
import utils
from augment import normalize
from errors import JobError, UserError
from model import pretrained_backbone
from probe import LR_GRID, PROBE_NORM, PROBE_NORMS, ProbeGrid, head_name, saved_probe
from run import Run
from speed import resolve_speed


def parse_args(argv=None):
    p = cli.Parser(description='Linear evaluation of a SimSiam checkpoint written by main.py.')
    p.add_argument('--model_path', default='results/resnet50_cifar10_2048_200_512_800_model.pth',
                   help='a <name>_model.pth written by main.py, or its <name>_state.pth to evaluate a run '
                        'at its latest epoch')
    p.add_argument('--recipe', default='auto', choices=('auto',) + recipes.RECIPES,
                   help="the defaults of the flags marked 'recipe': cifar (this project's probe: BN, a grid of lrs, "
                        "SGD) or imagenet (the official protocol: a plain head, LARS, lr 0.1, batch 4096, 90 epochs, "
                        "Resize + CenterCrop for testing); auto = the pretraining's --recipe")
    p.add_argument('--lr', type=cli.number_list(cli.positive_float), default=None,
                   help='base learning rate, or a comma-separated grid: one head per value, all on the same pass '
                        'of the backbone, the best chosen on --val_split; each optimiser uses lr x batch_size / '
                        f'256. The seed trains one plain head at 30 (recipe: {",".join(f"{v:g}" for v in LR_GRID)}; '
                        '0.1)')
    p.add_argument('--probe_norm', default=None, choices=PROBE_NORMS,
                   help='bn: a BatchNorm without affine parameters in front of the linear head, so the lr does '
                        'not depend on the scale of the features; none: the plain linear head of the seed '
                        f'(recipe: {PROBE_NORM}; none)')
    p.add_argument('--optimizer', default=None, choices=OPTIMIZERS,
                   help='of the heads: sgd, or lars (trust coefficient 0.001, no clipping, as the official '
                        'ImageNet protocol) (recipe: sgd; lars)')
    p.add_argument('--val_split', type=cli.or_auto(cli.fraction), default='auto',
                   help='fraction of the training set held out (drawn from --seed) to choose the best head of '
                        'a grid; auto = 0.1 with a grid, 0 with one lr. The test set never chooses')
    cli.add_run_flags(p, "this evaluation's state", utils.DATASETS, batch_size=None, epochs=None, dataset=None,
                      data_root=None, helps={
                          'dataset': 'evaluation data (default: the dataset the model was pretrained on)',
                          'data_root': 'where the data lives (default: as in pretraining)',
                          'name': 'output file prefix (default: <name> of the <name>_model.pth given)',
                          'batch_size': 'images per step; under torchrun the global batch, shared out (recipe: '
                                        '256; 4096)',
                          'epochs': 'passes over the training set (recipe: 90)'})
    args = p.parse_args(argv)
    args.aug_auto = None  # why --aug auto chose its path, once main() has looked at the data
    args.from_recipe = None  # the flags the recipe sets, once main() has read the checkpoint's
    return args


OPTIMIZERS = ('sgd', 'lars')


def resolve_recipe(args, ckpt):
    """The evaluation's recipe (the pretraining's unless --recipe names one), its flags filled in; returns
    (recipe, the flags it set)."""
    recipe = ckpt['args'].get('recipe', 'cifar') if args.recipe == 'auto' else args.recipe
    taken = recipes.apply(args, recipes.LINEAR[recipe])
    return recipe, taken


PRETRAINED = ('simsiam_model', 'simsiam_state')  # a finished model, or the state of a run at its latest epoch


def output_name(model_path):
    """<name> of `<name>_model.pth` (or of `<name>_state.pth`), so evaluations of different models never
    overwrite each other."""
    base = os.path.basename(model_path)
    for suffix in ('_model.pth', '_state.pth', '.pth', '.pt'):
        if base.endswith(suffix):
            return base[:-len(suffix)]
    return base


def load_pretrained(path):
    """(the main.py checkpoint at `path`, (its backbone, feature dim)), refused unless it rebuilds it."""
    ckpt = files.load_checkpoint(path, PRETRAINED, '--model_path')
    return ckpt, pretrained_backbone(ckpt, f'--model_path {path!r}')


def test_batches(data, batch_size, device, world=distributed.SINGLE, num_workers=0):
    """This process's chunks of the test set (all of it in one process), under the test transform; a set of
    files (the stream path) read with `num_workers` DataLoader workers."""
    ranges = distributed.shard_chunks(len(data), batch_size, world)
    for images, labels in stream.test_images(data, ranges, device, num_workers):
        yield [normalize(images, data.mean, data.std)], labels


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_entries(module, before):
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


# The seed's columns (of the head reported: the one lr, or the grid's best on the validation split), then
# the schedule and the clock; with a validation split its numbers; with a grid the base lr of the head
# reported and the numbers of every head, 'lr=<value>:<column>'.
COLUMNS = ['epoch', 'train_loss', 'train_acc@1', 'train_acc@5', 'test_loss', 'test_acc@1', 'test_acc@5', 'lr',
           'epoch_time', 'save_time']
VAL_COLUMNS = ['val_loss', 'val_acc@1', 'val_acc@5']
HEAD_COLUMNS = ['train_loss', 'train_acc@1', 'val_acc@1', 'test_acc@1', 'test_acc@5']
WALL_CLOCK = ('epoch_time', 'save_time')


def val_fraction(val_split, lrs):
    return (0.1 if len(lrs) > 1 else 0.0) if val_split == 'auto' else val_split


def columns(lrs, val):
    """The CSV's columns for a grid of base lrs, with a validation split or not; the per-head columns only
    when there is more than one head to tell apart."""
    grid = lrs if len(lrs) > 1 else []
    return (COLUMNS + (VAL_COLUMNS if val else []) + (['head_lr'] if grid else []) +
            [f'{head_name(lr)}:{c}' for lr in grid for c in HEAD_COLUMNS if val or c[:3] != 'val'])


def make_row(epoch, lrs, best, live, lr_now, trains, tests, vals):
    """The epoch's CSV row: the numbers of head `best`, then (with a grid) those of every live head."""
    row = {'epoch': epoch, 'lr': lr_now[best]}
    row.update(zip(('train_loss', 'train_acc@1', 'train_acc@5'), trains[best]))
    row.update(zip(('test_loss', 'test_acc@1', 'test_acc@5'), tests[best]))
    if vals:
        row.update(zip(VAL_COLUMNS, vals[best]))
    if len(lrs) > 1:
        row['head_lr'] = lrs[best]
        for i in live:
            numbers = (*trains[i][:2], vals[i][1], *tests[i][1:])
            row.update({f'{head_name(lrs[i])}:{c}': v for c, v in zip(HEAD_COLUMNS, numbers)})
    return row


def describe(row, epochs, grid, val):
    """The epoch's line."""
    chosen = f' [head {head_name(row["head_lr"])}]' if grid else ''
    return (f'epoch {row["epoch"]}/{epochs}{chosen}: train loss {row["train_loss"]:.4f} acc@1 '
            f'{row["train_acc@1"]:.2f}% | ' + (f'val acc@1 {row["val_acc@1"]:.2f}% | ' if val else '') +
            f'test loss {row["test_loss"]:.4f} acc@1 {row["test_acc@1"]:.2f}% '
            f'acc@5 {row["test_acc@5"]:.2f}% ({row["epoch_time"]:.1f} s)')


def summary(rows, grid):
    """The final line's numbers."""
    last = rows[-1]
    if grid:
        return (f'head {head_name(last["head_lr"])} chosen on the validation split (val acc@1 '
                f'{last["val_acc@1"]:.2f}%): test acc@1 last {last["test_acc@1"]:.2f}% (epoch {last["epoch"]}), '
                f'acc@5 {last["test_acc@5"]:.2f}%')
    best = max(rows, key=lambda r: r['test_acc@1'])
    return (f'test acc@1 last {last["test_acc@1"]:.2f}% (epoch {last["epoch"]}), '
            f'best {best["test_acc@1"]:.2f}% (epoch {best["epoch"]})')


def main(args):
    name = args.name or output_name(args.model_path)
    ckpt, pretrained = load_pretrained(args.model_path)  # refused before anything else
    args.recipe, args.from_recipe = resolve_recipe(args, ckpt)
    with distributed.processes(args.device, os.environ) as (world, device):
        dataset, data_root, image_size, test_resize = data_settings(args, ckpt)
        args.aug, args.aug_auto = distributed.on_main(lambda: utils.choose_aug(
            args.aug, dataset, data_root, image_size, test_resize, device), world)
        with Run('linear.py', f'{name}_linear', vars(args), world=world, state_kind='simsiam_linear_state',
                 columns=columns(args.lr, val_fraction(args.val_split, args.lr) > 0), title=f'{name} linear evaluation') as run:
            evaluate(args, run, world, device, ckpt, pretrained)


def data_settings(args, ckpt):
    """(dataset, data_root, image size, test transform's resize / image size) of the evaluation: the flags',
    else the pretraining's. The test transform is the pretraining's recipe's, which the frozen backbone was
    trained on."""
    return (args.dataset or ckpt['args']['dataset'], args.data_root or ckpt['args']['data_root'],
            ckpt['args'].get('image_size', utils.IMAGE_SIZE),
            recipes.AUGMENTATION[ckpt['args'].get('recipe', 'cifar')][2])


def evaluate(args, run, world, device, ckpt, pretrained):
    """The evaluation of checkpoint `ckpt`, whose (backbone, feature dim) is `pretrained`."""
    log, lrs, grid = run.log, args.lr, len(args.lr) > 1
    val_split = val_fraction(args.val_split, lrs)
    if grid and val_split == 0:
        raise JobError('--lr with several values needs --val_split above 0: the best head is chosen on '
                       'a part of the training set, never on the test set')
    distributed.local_batch(args.batch_size, world)
    state = run.start()
    if state is not None and state.get('pretrained_epoch', ckpt['epoch']) != ckpt['epoch']:
        raise UserError(f'--resume: the saved evaluation is of pretraining epoch {state["pretrained_epoch"]}, '
                        f'but {args.model_path!r} now holds epoch {ckpt["epoch"]}; evaluate it afresh under '
                        f'another --name or --results_dir')

    # the data, with the validation split held out of the training set; the probe's crop from the
    # evaluation's recipe, the input statistics the pretraining's, which the frozen backbone was trained on
    dataset, data_root, image_size, test_resize = data_settings(args, ckpt)
    trained_on = recipes.AUGMENTATION[ckpt['args'].get('recipe', 'cifar')][0]
    augmentation = {**recipes.AUGMENTATION[args.recipe][1], 'mean': trained_on['mean'], 'std': trained_on['std']}
    speed = resolve_speed(device, args.aug, args.amp, args.channels_last, args.compile)
    if args.aug_auto:
        log(f'data path: {args.aug} (--aug auto: {args.aug_auto})', flush=True)
    train, test = distributed.on_main(lambda: utils.load_splits(
        dataset, data_root, image_size, test_resize, augmentation['mean'], augmentation['std'],
        speed.aug == 'batched', speed.aug != 'stream'), world)
    utils.require_a_step(args.batch_size, len(train))
    train, val = utils.split_off(train, val_split, args.seed)
    if grid and not len(val):
        raise JobError(f'--val_split {val_split} holds out no image of the {len(train)} training images: '
                       f'the heads of the grid could not be compared; raise it')
    utils.require_a_step(args.batch_size, len(train), 'the training set less --val_split')
    classes = len(train.classes)
    log(f'model: {ckpt["model_args"]["arch"]} from {args.model_path} (epoch {ckpt["epoch"]}); data: '
        f'{dataset}, {len(train)} train' + (f' / {len(val)} validation' if len(val) else '') +
        f' / {len(test)} test images; device: {device}' +
        (f' ({world.world_size} processes)' if world.distributed else ''), flush=True)

    # the frozen backbone and the heads
    torch.manual_seed(args.seed)
    backbone, dim = pretrained
    backbone = backbone.to(device).eval()
    backbone.requires_grad_(False)
    heads = ProbeGrid(dim, classes, lrs, args.probe_norm, args.batch_size, args.momentum, args.seed, device, world,
                      log, args.optimizer)
    if state is not None:
        state = {**state, 'probe': saved_probe(state)}
    run.restore(state, {'probe': heads}, 'grid of heads' if grid else 'head')
    frozen = snapshot(backbone)
    log(f'speed: {speed}', flush=True)
    run.write_record(device, {
        'lr_resolved': heads.init_lrs if grid else heads.init_lrs[0], 'speed': str(speed),
        'pretrained': {'path': args.model_path, 'epoch': ckpt['epoch'], 'args': ckpt['args']},
        'train_images': len(train), 'val_images': len(val), 'test_images': len(test), 'classes': train.classes,
        'aug': speed.aug})
    workers = distributed.worker_count(args.num_workers, world)
    source = stream.StreamSource(train, 'linear', args.seed, device, workers, world, image_size, augmentation) \
        if speed.aug == 'stream' else \
        utils.ViewSource(train, 'linear', speed.aug, args.seed, device, workers, world, image_size, augmentation)
    features = speed.wrap(speed.prepare(backbone).eval())  # eval mode: BN statistics never change
    common = {'model_args': ckpt['model_args'], 'classes': train.classes, 'pretrain_args': ckpt['args'],
              'pretrained_epoch': ckpt['epoch']}
    weights = backbone.state_dict()  # frozen: the model file takes them as they are
    first_epoch = run.done + 1

    for epoch in range(first_epoch, args.epochs + 1):
        lr_now = heads.set_epoch(epoch, args.epochs)
        batches, steps = source.epoch(epoch, args.batch_size)
        start = time.perf_counter()
        with tqdm(batches, total=steps, desc=f'Linear Epoch [{epoch}/{args.epochs}]',
                  dynamic_ncols=True, disable=not world.main) as bar:
            trains = heads.train_epoch(features, bar, epoch, bar=bar)
        tests = heads.evaluate(features, test_batches(test, args.batch_size, device, world, workers))
        vals = heads.evaluate(features, test_batches(val, args.batch_size, device, world, workers)) \
            if len(val) else None
        heads.check(epoch, {'test': tests, 'validation': vals})
        if epoch == first_epoch:
            changed = changed_entries(backbone, frozen)
            if changed:
                raise RuntimeError(f'the frozen backbone changed during linear evaluation: {changed[:4]}')
        heads.warn_blowing_up(trains, epoch)
        best = heads.choose(vals)
        row = {**make_row(epoch, lrs, best, heads.live, lr_now, trains, tests, vals),
               'epoch_time': time.perf_counter() - start}
        chosen = {**common, 'head_lr': lrs[best]}
        run.end_epoch(row, {'kind': 'simsiam_linear', 'backbone': weights, 'head': heads.heads[best].state_dict(),
                            **chosen}, {'probe': heads.state_dict(), **chosen})
        log(describe(row, args.epochs, grid, len(val)), flush=True)

    if world.main:
        run.finish(summary(run.rows, grid))


if __name__ == '__main__':
    sys.exit(cli.cli(main, parse_args))
