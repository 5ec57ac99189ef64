"""Linear evaluation: a frozen SimSiam backbone (eval mode throughout) and a trained linear classifier.

    python linear.py --model_path results/<name>_model.pth
"""
import math
import os
import sys
import time

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
import files
import launch
import plot
import utils
from augment import normalize
from model import PROBE_NORMS, Probe, cifar_resnet
from run import Run, cosine_lr, first_non_finite, scaled_lr

UserError = launch.UserError


# The default grid of base lrs, half a decade apart: the seed's 30 for a plain head on raw features, and
# the 0.01-0.1 where a BN probe on 512-d features trained best here (README.md, "Linear evaluation").
LR_GRID = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
PROBE_NORM = 'bn'  # the default probe (README.md, "Linear evaluation": why)


def parse_args(argv=None):
    p = launch.Parser(description='Linear evaluation of a SimSiam checkpoint written by main.py.')
    p.add_argument('--model_path', default='results/resnet50_cifar10_2048_200_512_800_model.pth',
                   help='a <name>_model.pth written by main.py, or its <name>_state.pth to evaluate a run '
                        'at its latest epoch')
    p.add_argument('--lr', type=launch.number_list(launch.positive_float), default=LR_GRID,
                   help='base learning rate, or a comma-separated grid: one head per value, all on the same pass '
                        'of the backbone, the best chosen on --val_split; each optimiser uses lr x batch_size / '
                        '256. The seed trains one plain head at 30')
    p.add_argument('--probe_norm', default=PROBE_NORM, choices=PROBE_NORMS,
                   help='bn: a BatchNorm without affine parameters in front of the linear head, so the lr does '
                        'not depend on the scale of the features; none: the plain linear head of the seed')
    p.add_argument('--val_split', type=launch.or_auto(launch.fraction), default='auto',
                   help='fraction of the training set held out (drawn from --seed) to choose the best head of '
                        'a grid; auto = 0.1 with a grid, 0 with one lr. The test set never chooses')
    launch.add_run_flags(p, "this evaluation's state", utils.DATASETS, batch_size=256, epochs=90, dataset=None,
                         data_root=None, helps={
                             'dataset': 'evaluation data (default: the dataset the model was pretrained on)',
                             'data_root': 'where the data lives (default: as in pretraining)',
                             'name': 'output file prefix (default: <name> of the <name>_model.pth given)'})
    return p.parse_args(argv)


PRETRAINED = ('simsiam_model', 'simsiam_state')  # a finished model, or the state of a run at its latest epoch


def output_name(model_path):
    """<name> of `<name>_model.pth` (or of `<name>_state.pth`), so evaluations of different models never
    overwrite each other."""
    base = os.path.basename(model_path)
    for suffix in ('_model.pth', '_state.pth', '.pth', '.pt'):
        if base.endswith(suffix):
            return base[:-len(suffix)]
    return base


def load_backbone(ckpt, path):
    """Rebuild the backbone a main.py checkpoint (model or state) describes and load its weights strictly."""
    try:
        arch = ckpt['model_args']['arch']
        state = ckpt['state_dict'] if ckpt['kind'] == 'simsiam_model' else ckpt['model']
        backbone, dim = cifar_resnet(arch)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f'--model_path {path!r} does not describe a SimSiam model ({e})') from None
    weights = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    result = backbone.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f'--model_path {path!r} does not fit a {arch} backbone: '
                        f'missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}')
    return backbone, dim


def accuracy_counts(logits, labels):
    """Top-1 and top-5 hits of a batch, on the device: (2,) int64."""
    top5 = logits.topk(min(5, logits.size(1)), dim=1).indices == labels.view(-1, 1)
    return torch.stack([top5[:, 0].sum(), top5.any(dim=1).sum()])


def train_epoch(features, heads, batches, optimizers, epoch, live=None, world=distributed.SINGLE, check_every=10,
                bar=None):
    """One pass of the heads over batches of ([x], y): features(x), the frozen backbone's output, computed
    once per batch and fed to every head still `live` (all by default), each stepping its own optimizer.

    Returns ([(loss, acc@1, acc@5) in %, or None, per head], {head: NonFiniteLoss}) over every process's
    images. Losses stay on the device: every `check_every` steps they are summed over processes (a step's
    loss is the mean over processes) and checked; a head whose loss is not finite stops there, its first
    bad step named exactly, and the others go on.
    """
    live = list(range(len(heads))) if live is None else list(live)
    device = next(heads[0].parameters()).device
    totals = torch.zeros(len(heads), 3, dtype=torch.float64, device=device)  # loss x images, top-1, top-5
    pending, diverged, images = [], {}, 0
    for h in heads:
        h.train()
    for step, ((x,), y) in enumerate(batches, 1):
        with torch.no_grad():
            feature = features(x).float()
        losses = torch.zeros(len(heads), device=device)
        for i in live:
            logits = heads[i](feature)
            loss = F.cross_entropy(logits, y)
            optimizers[i].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[i].step()
            losses[i] = loss.detach()
            totals[i] += torch.cat([(loss.detach().double() * len(y)).view(1), accuracy_counts(logits.detach(), y)])
        images += len(y)
        pending.append(losses)
        if step % check_every == 0:
            live = check_losses(pending, live, epoch, step, world, diverged)
            pending = []
            if bar is not None and live:
                t = totals[live[0]]
                bar.set_postfix(loss=f'{t[0] / images:.4f}', acc1=f'{100 * t[1] / images:.2f}')
    live = check_losses(pending, live, epoch, step, world, diverged)
    return [summarise(totals[i], images, world) if i in live else None for i in range(len(heads))], diverged


@torch.no_grad()
def test_epoch(features, heads, batches, live=None, world=distributed.SINGLE):
    """Each live head's loss and acc@1, acc@5 in % on batches of ([x], y) (None for the others), over every
    process's images; the backbone runs once per batch."""
    live = list(range(len(heads))) if live is None else list(live)
    device = next(heads[0].parameters()).device
    totals = torch.zeros(len(heads), 3, dtype=torch.float64, device=device)  # loss x images, top-1, top-5
    images = 0
    for h in heads:
        h.eval()
    for (x,), y in batches:
        feature = features(x).float()
        for i in live:
            logits = heads[i](feature)
            totals[i] += torch.cat([(F.cross_entropy(logits, y).double() * len(y)).view(1), accuracy_counts(logits, y)])
        images += len(y)
    return [summarise(totals[i], images, world) if i in live else None for i in range(len(heads))]


def check_losses(pending, live, epoch, step, world, diverged):
    """The steps' losses (S, heads), the last being `step`, averaged over processes and checked on the host at
    once; returns the heads still live, a NonFiniteLoss in `diverged` for each one that is not."""
    if not pending:
        return live
    losses = (distributed.all_sum(torch.stack(pending), world) / world.world_size).cpu()
    still = []
    for i in live:
        try:
            first_non_finite(losses[:, i], epoch, step)
            still.append(i)
        except launch.NonFiniteLoss as e:
            diverged[i] = e
    return still


def summarise(totals, images, world):
    """(loss, acc@1 %, acc@5 %) from a head's (loss x images, top-1, top-5) sums and this process's image count,
    over every process."""
    loss_sum, top1, top5, total = distributed.all_sum(torch.cat([totals, totals.new_tensor([images])]), world).tolist()
    return loss_sum / total, 100.0 * top1 / total, 100.0 * top5 / total


def select_head(val_acc, live):
    """The head to report: the highest validation acc@1 among the live ones (the first on a tie)."""
    return max(live, key=lambda i: (val_acc[i], -i))


def blowing_up(loss, classes):
    """A training loss far above ln(classes), the loss of a uniform guess: the logits are blowing up."""
    return loss > 3 * math.log(classes)


def test_batches(data, batch_size, device, world=distributed.SINGLE):
    """This process's chunks of the test set (all of it in one process), under the test transform."""
    for start, stop in distributed.shard_chunks(len(data), batch_size, world):
        images = data.images[start:stop].to(device, non_blocking=True)
        yield [normalize(images)], data.labels[start:stop].to(device, non_blocking=True)


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
OUTPUTS = {'csv': 'statistics.csv', 'model': 'model.pth', 'state': 'state.pth', 'plot': 'statistics.png',
           'record': 'args.json'}  # after <name>_linear


def val_fraction(val_split, lrs):
    return (0.1 if len(lrs) > 1 else 0.0) if val_split == 'auto' else val_split


def head_name(lr):
    return f'lr={lr:g}'


def columns(lrs, val):
    """The CSV's columns for a grid of base lrs, with a validation split or not."""
    grid = len(lrs) > 1
    return (COLUMNS + (VAL_COLUMNS if val else []) + (['head_lr'] if grid else []) +
            [f'{head_name(lr)}:{c}' for lr in (lrs if grid else []) for c in HEAD_COLUMNS if val or c[:3] != 'val'])


def main(args):
    with launch.processes(args.device, os.environ) as (world, device), \
            Run('linear.py', vars(args), args.results_dir, f'{args.name or output_name(args.model_path)}_linear',
                OUTPUTS, 'simsiam_linear_state', columns(args.lr, val_fraction(args.val_split, args.lr) > 0),
                args.batch_size, world) as run:
        evaluate(args, run, world, device)


def evaluate(args, run, world, device):
    name, log, lrs = args.name or output_name(args.model_path), run.log, args.lr
    val_split = val_fraction(args.val_split, lrs)
    if len(lrs) > 1 and val_split == 0:
        raise launch.JobError('--lr with several values needs --val_split above 0: the best head is chosen on '
                              'a part of the training set, never on the test set')

    def load_run():
        ckpt = files.load_checkpoint(args.model_path, PRETRAINED, '--model_path')
        load_backbone(ckpt, args.model_path)  # refuse a checkpoint that does not fit before anything else
        state = run.find_state()
        if state is not None and state.get('pretrained_epoch', ckpt['epoch']) != ckpt['epoch']:
            raise UserError(f'--resume: the saved evaluation is of pretraining epoch {state["pretrained_epoch"]}, '
                            f'but {args.model_path!r} now holds epoch {ckpt["epoch"]}; evaluate it afresh under '
                            f'another --name or --results_dir')
        return ckpt, state
    ckpt, state = launch.on_main(load_run, world)
    backbone, dim = load_backbone(ckpt, args.model_path)
    dataset = args.dataset or ckpt['args']['dataset']
    train, test = run.load_data(dataset, args.data_root or ckpt['args']['data_root'], args.batch_size)
    train, val = utils.split_off(train, val_split, args.seed)
    if len(lrs) > 1 and not len(val):
        raise launch.JobError(f'--val_split {val_split} holds out no image of the {len(train)} training images: '
                              f'the heads of the grid could not be compared; raise it')
    if args.batch_size > len(train):
        raise launch.JobError(f'--batch_size {args.batch_size} is larger than the training set less --val_split '
                              f'({len(train)} images): no step would run')
    classes = len(train.classes)
    log(f'model: {ckpt["model_args"]["arch"]} from {args.model_path} (epoch {ckpt["epoch"]}); data: '
        f'{dataset}, {len(train)} train' + (f' / {len(val)} validation' if len(val) else '') +
        f' / {len(test)} test images; device: {device}' +
        (f' ({world.world_size} processes)' if world.distributed else ''), flush=True)

    torch.manual_seed(args.seed)
    backbone = backbone.to(device).eval()
    backbone.requires_grad_(False)
    heads = torch.nn.ModuleList()
    for _ in lrs:  # every head starts where a run with its lr alone would
        torch.manual_seed(args.seed)
        heads.append(Probe(dim, classes, args.probe_norm))
    heads = heads.to(device)
    if world.distributed:
        heads = distributed.sync_batchnorm(heads, device)  # the probe's BN sees the global batch
    init_lrs = [scaled_lr(lr, args.batch_size) for lr in lrs]
    optimizers = [torch.optim.SGD(h.parameters(), lr=init, momentum=args.momentum, weight_decay=0.0)
                  for h, init in zip(heads, init_lrs)]
    dead, warned = {}, []  # {head: why it stopped}, heads warned of a loss blowing up
    if len(lrs) == 1:
        run.restore(state, {'head': heads[0]}, optimizers[0], 'head', args.epochs)
    else:
        run.restore(state, {'heads': heads}, optimizers, 'grid of heads', args.epochs)
    if state is not None:
        dead, warned = dict(state.get('dead', {})), list(state.get('warned', []))
    frozen = snapshot(backbone)
    speed = launch.resolve_speed(device, args.aug, args.amp, args.channels_last, args.compile)
    log(f'speed: {speed}', flush=True)
    run.write_record(device, {
        'lr_resolved': init_lrs if len(lrs) > 1 else init_lrs[0], 'speed': str(speed),
        'pretrained': {'path': args.model_path, 'epoch': ckpt['epoch'], 'args': ckpt['args']},
        'train_images': len(train), 'val_images': len(val), 'test_images': len(test), 'classes': train.classes})
    source = utils.ViewSource(train, 'linear', speed.aug, args.seed, device,
                              launch.worker_count(args.num_workers, world), world)
    features = speed.wrap(speed.prepare(backbone).eval())  # eval mode: BN statistics never change
    trained = [distributed.data_parallel(h, world, device) for h in heads]  # gradients averaged over processes
    first_epoch = run.done + 1
    chosen = [0]

    def stop_diverged(diverged, live):
        """The live heads less those in `diverged` ({head: NonFiniteLoss}), each of which stops with a line while
        others go on; when none is left, the run stops as a single head's does."""
        for i, e in diverged.items():
            dead[i] = str(e)
            if len(diverged) < len(live):
                log(f'linear.py: head {head_name(lrs[i])} diverged: {e}; it stops, the other heads go on',
                    file=sys.stderr, flush=True)
        still = [i for i in live if i not in diverged]
        if not still:
            raise diverged[max(diverged)]
        return still

    def one_epoch(epoch):
        lr_now = [cosine_lr(init, epoch - 1, args.epochs) for init in init_lrs]
        for optimizer, lr in zip(optimizers, lr_now):
            for group in optimizer.param_groups:
                group['lr'] = lr
        live = [i for i in range(len(heads)) if i not in dead]
        batches, steps = source.epoch(epoch, args.batch_size)
        start = time.perf_counter()
        with tqdm(batches, total=steps, desc=f'Linear Epoch [{epoch}/{args.epochs}]',
                  dynamic_ncols=True, disable=not world.main) as bar:
            trains, diverged = train_epoch(features, trained, bar, optimizers, epoch, live, world, bar=bar)
        live = stop_diverged(diverged, live)
        tests = test_epoch(features, heads, test_batches(test, args.batch_size, device, world), live, world)
        vals = test_epoch(features, heads, test_batches(val, args.batch_size, device, world), live, world) \
            if len(val) else None
        # a last step can leave a head whose logits overflow: it must not be the one chosen
        live = stop_diverged({i: launch.NonFiniteLoss(epoch, None, numbers[i][0], what) for i in live
                              for what, numbers in (('test', tests), ('validation', vals))
                              if numbers and not math.isfinite(numbers[i][0])}, live)
        if epoch == first_epoch:
            changed = changed_entries(backbone, frozen)
            if changed:
                raise RuntimeError(f'the frozen backbone changed during linear evaluation: {changed[:4]}')
        for i in live:
            if i not in warned and blowing_up(trains[i][0], classes):
                warned.append(i)
                log(f'warning: linear head {head_name(lrs[i])}: training loss {trains[i][0]:.1f} after epoch {epoch} '
                    f'is far above ln({classes}) = {math.log(classes):.2f}, the loss of a uniform guess: its logits '
                    f'are blowing up (try a lower --lr, or --probe_norm bn)', file=sys.stderr, flush=True)
        best = chosen[0] = select_head({i: vals[i][1] for i in live}, live) if vals else live[0]
        row = {'epoch': epoch, 'lr': lr_now[best], 'epoch_time': time.perf_counter() - start}
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

    def checkpoint():
        common = {'model_args': ckpt['model_args'], 'classes': train.classes, 'pretrain_args': ckpt['args'],
                  'pretrained_epoch': ckpt['epoch'], 'head_lr': lrs[chosen[0]]}
        model = {'kind': 'simsiam_linear', 'backbone': backbone.state_dict(), 'head': heads[chosen[0]].state_dict(),
                 **common}
        progress = {'dead': dict(dead), 'warned': list(warned)}
        if len(lrs) == 1:
            return model, {'head': heads[0].state_dict(), 'optimizer': optimizers[0].state_dict(), **progress,
                           **common}
        return model, {'heads': heads.state_dict(), 'optimizer': [o.state_dict() for o in optimizers], **progress,
                       **common}

    def describe(row):
        chosen_head = f' [head {head_name(row["head_lr"])}]' if len(lrs) > 1 else ''
        return (f'epoch {row["epoch"]}/{args.epochs}{chosen_head}: train loss {row["train_loss"]:.4f} acc@1 '
                f'{row["train_acc@1"]:.2f}% | ' + (f'val acc@1 {row["val_acc@1"]:.2f}% | ' if len(val) else '') +
                f'test loss {row["test_loss"]:.4f} acc@1 {row["test_acc@1"]:.2f}% '
                f'acc@5 {row["test_acc@5"]:.2f}% ({row["epoch_time"]:.1f} s)')

    run.loop(args.epochs, args.save_every, one_epoch, checkpoint, lambda rows: plot.plot_linear(
        pd.DataFrame(rows, columns=run.columns), run.paths['plot'], f'{name} linear evaluation'), describe)
    if world.main:
        last = run.rows[-1]
        if len(lrs) > 1:
            run.finish(f'head {head_name(last["head_lr"])} chosen on the validation split (val acc@1 '
                       f'{last["val_acc@1"]:.2f}%): test acc@1 last {last["test_acc@1"]:.2f}% (epoch {last["epoch"]}), '
                       f'acc@5 {last["test_acc@5"]:.2f}%')
        else:
            best = max(run.rows, key=lambda r: r['test_acc@1'])
            run.finish(f'test acc@1 last {last["test_acc@1"]:.2f}% (epoch {last["epoch"]}), '
                       f'best {best["test_acc@1"]:.2f}% (epoch {best["epoch"]})')


if __name__ == '__main__':
    sys.exit(launch.cli(main, parse_args))
