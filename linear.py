"""Linear evaluation: a frozen SimSiam backbone (eval mode throughout) and a trained linear classifier.

    python linear.py --model_path results/<name>_model.pth
"""
import json
import math
import os
import sys
import time

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
import plot
import utils
from model import cifar_resnet

UserError = utils.UserError


def parse_args(argv=None):
    p = utils.Parser(description='Linear evaluation of a SimSiam checkpoint written by main.py.')
    p.add_argument('--model_path', default='results/resnet50_cifar10_2048_200_512_800_model.pth',
                   help='a <name>_model.pth written by main.py')
    p.add_argument('--batch_size', type=utils.positive_int, default=256, help='images per step')
    p.add_argument('--epochs', type=utils.positive_int, default=90, help='passes over the training set')
    p.add_argument('--lr', type=utils.positive_float, default=30.0,
                   help='base learning rate; the optimiser uses lr x batch_size / 256')
    p.add_argument('--momentum', type=utils.non_negative_float, default=0.9, help='SGD momentum')
    p.add_argument('--dataset', default=None, choices=utils.DATASETS,
                   help='evaluation data (default: the dataset the model was pretrained on)')
    p.add_argument('--data_root', default=None, help='where the data lives (default: as in pretraining)')
    p.add_argument('--results_dir', default='results', help='where the CSV and the model go')
    p.add_argument('--name', default=None,
                   help='output file prefix (default: <name> of the <name>_model.pth given)')
    utils.add_run_flags(p, "this evaluation's state")
    return p.parse_args(argv)


def output_name(model_path):
    """<name> of `<name>_model.pth`, so evaluations of different models never overwrite each other."""
    base = os.path.basename(model_path)
    for suffix in ('_model.pth', '.pth', '.pt'):
        if base.endswith(suffix):
            return base[:-len(suffix)]
    return base


def load_backbone(ckpt, path):
    """Rebuild the backbone a main.py checkpoint describes and load its weights strictly."""
    try:
        arch = ckpt['model_args']['arch']
        state = ckpt['state_dict']
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
    ranked = logits.argsort(dim=1, descending=True)
    return utils.topk_correct(ranked, labels)


def run_epoch(features, head, batches, optimizer, epoch, world=distributed.SINGLE, bar=None):
    """Train (optimizer given) or test the head on batches of ([x], y), features(x) being the frozen
    backbone's output; returns the loss and acc@1, acc@5 in %. Under torchrun the loss checked at each
    step is the mean over processes and the returned numbers are those of all processes' batches."""
    training = optimizer is not None
    head.train(training)
    totals = torch.zeros(4, dtype=torch.float64)  # loss x images, top-1 hits, top-5 hits, images
    for step, ((x,), y) in enumerate(batches, 1):
        with torch.no_grad():
            feature = features(x).float()
        with torch.set_grad_enabled(training):
            logits = head(feature)
            loss = F.cross_entropy(logits, y)
        if training:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        value = (distributed.all_sum(loss.detach(), world) / world.world_size).item()
        if not math.isfinite(value):
            raise utils.NonFiniteLoss(epoch, step, value)
        top1, top5 = accuracy_counts(logits.detach(), y)
        totals += torch.tensor([loss.item() * len(y), top1, top5, len(y)], dtype=torch.float64)
        if bar is not None:
            bar.set_postfix(loss=f'{totals[0] / totals[3]:.4f}', acc1=f'{100 * totals[1] / totals[3]:.2f}')
    loss_sum, top1, top5, total = distributed.all_sum(totals.to(head_device(head)), world).tolist()
    return loss_sum / total, 100.0 * top1 / total, 100.0 * top5 / total


def head_device(head):
    return next(head.parameters()).device


def test_batches(data, batch_size, device, world=distributed.SINGLE):
    """This process's chunks of the test set (all of it in one process), under the test transform."""
    for start, stop in distributed.shard_chunks(len(data), batch_size, world):
        images = data.images[start:stop].to(device, non_blocking=True)
        yield [utils.normalize(images)], data.labels[start:stop].to(device, non_blocking=True)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_entries(module, before):
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


COLUMNS = ['epoch', 'train_loss', 'train_acc@1', 'train_acc@5', 'test_loss', 'test_acc@1', 'test_acc@5', 'lr',
           'epoch_time']
WALL_CLOCK = ('epoch_time',)


def save_epoch(paths, rows, backbone, head, optimizer, epoch, args, ckpt, classes):
    """The CSV, the linear model and the training state of a completed epoch (the caller holds signals
    back, so that they are written as one set)."""
    utils.write_csv(rows, COLUMNS, paths['csv'])
    common = {'epoch': epoch, 'model_args': ckpt['model_args'], 'classes': classes, 'args': vars(args),
              'pretrain_args': ckpt['args']}
    weights = head.state_dict()
    utils.save_checkpoint({'kind': 'simsiam_linear', 'backbone': backbone.state_dict(), 'head': weights,
                           **common}, paths['model'])
    utils.save_checkpoint({'kind': 'simsiam_linear_state', 'head': weights, 'optimizer': optimizer.state_dict(),
                           'rows': rows, 'rng': utils.rng_state(), **common}, paths['state'])


def main(args):
    with utils.processes(args.device, os.environ) as (world, device):
        evaluate(args, world, device)


def load_run(args, paths):
    """The pretrained checkpoint, the results folder checked and the saved state to continue from (or
    None): decided by rank 0."""
    ckpt = utils.load_checkpoint(args.model_path, ('simsiam_model',), '--model_path')
    load_backbone(ckpt, args.model_path)  # refuse a checkpoint that does not fit before anything else
    utils.check_writable(args.results_dir)
    return ckpt, utils.find_state(args, paths['state'], 'simsiam_linear_state', 'linear.py')



def evaluate(args, world, device):
    log = utils.printer(world)
    log('arguments:', json.dumps(vars(args), sort_keys=True), flush=True)
    utils.check_divisible(args.batch_size, world)
    name = args.name or output_name(args.model_path)
    paths = {key: os.path.join(args.results_dir, f'{name}_linear_{suffix}') for key, suffix in
             (('csv', 'statistics.csv'), ('model', 'model.pth'), ('state', 'state.pth'),
              ('plot', 'statistics.png'), ('record', 'args.json'))}
    ckpt, state = utils.on_main(lambda: load_run(args, paths), world)
    backbone, dim = load_backbone(ckpt, args.model_path)
    dataset = args.dataset or ckpt['args']['dataset']
    data_root = args.data_root or ckpt['args']['data_root']
    train, test = utils.on_main(lambda: utils.load_splits(dataset, data_root), world)
    if args.batch_size > len(train):
        raise utils.JobError(f'--batch_size {args.batch_size} is larger than the training set '
                             f'({len(train)} images): no step would run')
    log(f'model: {ckpt["model_args"]["arch"]} from {args.model_path} (epoch {ckpt["epoch"]}); data: '
        f'{dataset}, {len(train)} train / {len(test)} test images; device: {device}' +
        (f' ({world.world_size} processes)' if world.distributed else ''), flush=True)

    torch.manual_seed(args.seed)
    backbone = backbone.to(device).eval()
    backbone.requires_grad_(False)
    head = torch.nn.Linear(dim, len(train.classes)).to(device)
    head.weight.data.normal_(mean=0.0, std=0.01)
    head.bias.data.zero_()
    init_lr = args.lr * args.batch_size / 256  # batch_size is the global batch
    optimizer = torch.optim.SGD(head.parameters(), lr=init_lr, momentum=args.momentum, weight_decay=0.0)
    rows, done = [], 0
    if state is not None:
        rows, done = utils.restore(state, {'head': head}, optimizer, 'head', args.epochs, log)
    frozen = snapshot(backbone)
    speed = utils.resolve_speed(args, device)
    log(f'speed: {speed}', flush=True)
    if world.main:
        utils.write_json(utils.run_record(args, device, {
            'name': name, 'lr_resolved': init_lr, 'speed': str(speed), 'resumed_after_epoch': done,
            'world_size': world.world_size,
            'pretrained': {'path': args.model_path, 'epoch': ckpt['epoch'], 'args': ckpt['args']},
            'train_images': len(train), 'test_images': len(test), 'classes': train.classes}), paths['record'])
    source = utils.ViewSource(train, 'linear', speed.aug, args.seed, device,
                              utils.worker_count(args.num_workers, world), world)
    features = speed.wrap(speed.prepare(backbone).eval())  # eval mode: BN statistics never change
    trained = distributed.data_parallel(head, world, device)  # gradients averaged over processes
    first_epoch = done + 1
    saved = lambda: (f'epochs 1-{done} are saved in {paths["state"]}' if done else 'no epoch had completed')
    with utils.interruptible(saved):
        for epoch in range(first_epoch, args.epochs + 1):
            lr = utils.cosine_lr(init_lr, epoch - 1, args.epochs)
            for group in optimizer.param_groups:
                group['lr'] = lr
            batches, steps = source.epoch(epoch, args.batch_size)
            start = time.perf_counter()
            try:
                with tqdm(batches, total=steps, desc=f'Linear Epoch [{epoch}/{args.epochs}]',
                          dynamic_ncols=True, disable=not world.main) as bar:
                    train_loss, train_top1, train_top5 = run_epoch(features, trained, bar, optimizer, epoch,
                                                                   world, bar)
                test_loss, test_top1, test_top5 = run_epoch(
                    features, head, test_batches(test, args.batch_size, device, world), None, epoch, world)
            except utils.NonFiniteLoss as e:
                kept = f'the state of epoch {done} is kept in {paths["state"]}' if done else 'nothing was saved'
                raise utils.JobError(f'{e}; training stopped and {kept} (try a lower --lr)') from None
            if epoch == first_epoch:
                changed = changed_entries(backbone, frozen)
                if changed:
                    raise RuntimeError(f'the frozen backbone changed during linear evaluation: {changed[:4]}')
            rows.append({'epoch': epoch, 'train_loss': train_loss, 'train_acc@1': train_top1,
                         'train_acc@5': train_top5, 'test_loss': test_loss, 'test_acc@1': test_top1,
                         'test_acc@5': test_top5, 'lr': lr, 'epoch_time': time.perf_counter() - start})
            with utils.signals_deferred():  # a signal now is taken once the epoch is saved and counted
                if world.main:
                    save_epoch(paths, rows, backbone, head, optimizer, epoch, args, ckpt, train.classes)
                done = epoch
            if world.main:
                plot.plot_linear(pd.DataFrame(rows, columns=COLUMNS), paths['plot'], f'{name} linear evaluation')
            log(f'epoch {epoch}/{args.epochs}: train loss {train_loss:.4f} acc@1 {train_top1:.2f}% | '
                f'test loss {test_loss:.4f} acc@1 {test_top1:.2f}% acc@5 {test_top5:.2f}% '
                f'({rows[-1]["epoch_time"]:.1f} s)', flush=True)
    if not world.main:
        return
    best = max(rows, key=lambda r: r['test_acc@1'])
    files = ', '.join(f'{key} {path}' for key, path in paths.items() if os.path.exists(path))
    log(f'done: {files}; test acc@1 last {rows[-1]["test_acc@1"]:.2f}% (epoch {rows[-1]["epoch"]}), '
        f'best {best["test_acc@1"]:.2f}% (epoch {best["epoch"]})', flush=True)


if __name__ == '__main__':
    sys.exit(utils.cli(main, parse_args))
