"""Linear evaluation: a frozen SimSiam backbone (eval mode throughout) and a trained linear classifier.

    python linear.py --model_path results/<name>_model.pth
"""
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
from model import cifar_resnet
from run import Run, cosine_lr, first_non_finite

UserError = launch.UserError


def parse_args(argv=None):
    p = launch.Parser(description='Linear evaluation of a SimSiam checkpoint written by main.py.')
    p.add_argument('--model_path', default='results/resnet50_cifar10_2048_200_512_800_model.pth',
                   help='a <name>_model.pth written by main.py, or its <name>_state.pth to evaluate a run '
                        'at its latest epoch')
    p.add_argument('--lr', type=launch.positive_float, default=30.0,
                   help='base learning rate; the optimiser uses lr x batch_size / 256')
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


def train_epoch(features, head, batches, optimizer, epoch, world=distributed.SINGLE, check_every=10, bar=None):
    """One pass of the head over batches of ([x], y), features(x) being the frozen backbone's output;
    returns the mean loss and acc@1, acc@5 in % over every process's images.

    Losses stay on the device: every `check_every` steps they are summed over processes (the loss of a step
    is the mean over processes) and checked for non-finite values, the first bad step named exactly.
    """
    head.train()
    totals = torch.zeros(4, dtype=torch.float64, device=head_device(head))  # loss x images, top-1, top-5, images
    pending = []
    for step, ((x,), y) in enumerate(batches, 1):
        with torch.no_grad():
            feature = features(x).float()
        logits = head(feature)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pending.append(loss.detach())
        totals += torch.cat([(loss.detach().double() * len(y)).view(1), accuracy_counts(logits.detach(), y),
                             torch.tensor([len(y)], device=totals.device)])
        if step % check_every == 0:
            check_losses(pending, epoch, step, world)
            pending = []
            if bar is not None:
                bar.set_postfix(loss=f'{totals[0] / totals[3]:.4f}', acc1=f'{100 * totals[1] / totals[3]:.2f}')
    check_losses(pending, epoch, step, world)
    return summarise(totals, world)


@torch.no_grad()
def test_epoch(features, head, batches, world=distributed.SINGLE):
    """The head's loss and acc@1, acc@5 in % on batches of ([x], y), over every process's images."""
    head.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=head_device(head))
    for (x,), y in batches:
        logits = head(features(x).float())
        loss = F.cross_entropy(logits, y)
        totals += torch.cat([(loss.double() * len(y)).view(1), accuracy_counts(logits, y),
                             torch.tensor([len(y)], device=totals.device)])
    return summarise(totals, world)


def check_losses(pending, epoch, step, world):
    """The steps' losses (the last being `step`), averaged over processes, checked on the host at once."""
    if pending:
        first_non_finite((distributed.all_sum(torch.stack(pending), world) / world.world_size).cpu(), epoch, step)


def summarise(totals, world):
    loss_sum, top1, top5, total = distributed.all_sum(totals, world).tolist()
    return loss_sum / total, 100.0 * top1 / total, 100.0 * top5 / total


def head_device(head):
    return next(head.parameters()).device


def test_batches(data, batch_size, device, world=distributed.SINGLE):
    """This process's chunks of the test set (all of it in one process), under the test transform."""
    for start, stop in distributed.shard_chunks(len(data), batch_size, world):
        images = data.images[start:stop].to(device, non_blocking=True)
        yield [normalize(images)], data.labels[start:stop].to(device, non_blocking=True)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_entries(module, before):
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


COLUMNS = ['epoch', 'train_loss', 'train_acc@1', 'train_acc@5', 'test_loss', 'test_acc@1', 'test_acc@5', 'lr',
           'epoch_time', 'save_time']
WALL_CLOCK = ('epoch_time', 'save_time')
OUTPUTS = {'csv': 'statistics.csv', 'model': 'model.pth', 'state': 'state.pth', 'plot': 'statistics.png',
           'record': 'args.json'}  # after <name>_linear


def main(args):
    with launch.processes(args.device, os.environ) as (world, device), \
            Run('linear.py', vars(args), args.results_dir, f'{args.name or output_name(args.model_path)}_linear',
                OUTPUTS, 'simsiam_linear_state', COLUMNS, args.batch_size, world) as run:
        evaluate(args, run, world, device)


def evaluate(args, run, world, device):
    name, log = args.name or output_name(args.model_path), run.log

    def load_run():
        ckpt = files.load_checkpoint(args.model_path, PRETRAINED, '--model_path')
        load_backbone(ckpt, args.model_path)  # refuse a checkpoint that does not fit before anything else
        return ckpt, run.find_state()
    ckpt, state = launch.on_main(load_run, world)
    backbone, dim = load_backbone(ckpt, args.model_path)
    dataset = args.dataset or ckpt['args']['dataset']
    train, test = run.load_data(dataset, args.data_root or ckpt['args']['data_root'], args.batch_size)
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
    run.restore(state, {'head': head}, optimizer, 'head', args.epochs)
    frozen = snapshot(backbone)
    speed = launch.resolve_speed(device, args.aug, args.amp, args.channels_last, args.compile)
    log(f'speed: {speed}', flush=True)
    run.write_record(device, {
        'lr_resolved': init_lr, 'speed': str(speed),
        'pretrained': {'path': args.model_path, 'epoch': ckpt['epoch'], 'args': ckpt['args']},
        'train_images': len(train), 'test_images': len(test), 'classes': train.classes})
    source = utils.ViewSource(train, 'linear', speed.aug, args.seed, device,
                              launch.worker_count(args.num_workers, world), world)
    features = speed.wrap(speed.prepare(backbone).eval())  # eval mode: BN statistics never change
    trained = distributed.data_parallel(head, world, device)  # gradients averaged over processes
    first_epoch = run.done + 1

    def one_epoch(epoch):
        lr = cosine_lr(init_lr, epoch - 1, args.epochs)
        for group in optimizer.param_groups:
            group['lr'] = lr
        batches, steps = source.epoch(epoch, args.batch_size)
        start = time.perf_counter()
        with tqdm(batches, total=steps, desc=f'Linear Epoch [{epoch}/{args.epochs}]',
                  dynamic_ncols=True, disable=not world.main) as bar:
            train_loss, train_top1, train_top5 = train_epoch(features, trained, bar, optimizer, epoch, world,
                                                             bar=bar)
        test_loss, test_top1, test_top5 = test_epoch(features, head, test_batches(test, args.batch_size, device,
                                                                                  world), world)
        if epoch == first_epoch:
            changed = changed_entries(backbone, frozen)
            if changed:
                raise RuntimeError(f'the frozen backbone changed during linear evaluation: {changed[:4]}')
        return {'epoch': epoch, 'train_loss': train_loss, 'train_acc@1': train_top1, 'train_acc@5': train_top5,
                'test_loss': test_loss, 'test_acc@1': test_top1, 'test_acc@5': test_top5, 'lr': lr,
                'epoch_time': time.perf_counter() - start}

    def checkpoint():
        common = {'model_args': ckpt['model_args'], 'classes': train.classes, 'pretrain_args': ckpt['args']}
        weights = head.state_dict()
        return ({'kind': 'simsiam_linear', 'backbone': backbone.state_dict(), 'head': weights, **common},
                {'head': weights, 'optimizer': optimizer.state_dict(), **common})

    def describe(row):
        return (f'epoch {row["epoch"]}/{args.epochs}: train loss {row["train_loss"]:.4f} acc@1 '
                f'{row["train_acc@1"]:.2f}% | test loss {row["test_loss"]:.4f} acc@1 {row["test_acc@1"]:.2f}% '
                f'acc@5 {row["test_acc@5"]:.2f}% ({row["epoch_time"]:.1f} s)')

    run.loop(args.epochs, args.save_every, one_epoch, checkpoint, lambda rows: plot.plot_linear(
        pd.DataFrame(rows, columns=COLUMNS), run.paths['plot'], f'{name} linear evaluation'), describe)
    if world.main:
        best = max(run.rows, key=lambda r: r['test_acc@1'])
        last = run.rows[-1]
        run.finish(f'test acc@1 last {last["test_acc@1"]:.2f}% (epoch {last["epoch"]}), '
                   f'best {best["test_acc@1"]:.2f}% (epoch {best["epoch"]})')


if __name__ == '__main__':
    sys.exit(launch.cli(main, parse_args))
