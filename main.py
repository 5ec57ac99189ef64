"""SimSiam self-supervised pretraining with a kNN monitor (Chen & He, CVPR 2021; CIFAR recipe of App. D).

    python main.py --batch_size 512 --epochs 800
"""
import copy
import json
import os
import sys
import time

import thop
import torch
from tqdm import tqdm

import utils
from model import ARCHS, SimSiam, simsiam_loss


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
    p.add_argument('--num_workers', type=utils.non_negative_int, default=utils.available_cpus(),
                   help='DataLoader worker processes (default: the CPUs this process may use)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--seed', type=utils.non_negative_int, default=0, help='random seed')
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


def train_epoch(model, loader, optimizer, device, epoch, epochs):
    """One pass of stop-gradient training; returns the mean loss over the epoch's steps."""
    model.train()
    total, steps = 0.0, 0
    bar = tqdm(loader, desc=f'Train Epoch [{epoch}/{epochs}]', dynamic_ncols=True)
    for x1, x2, _ in bar:
        x1 = x1.to(device, non_blocking=True)
        x2 = x2.to(device, non_blocking=True)
        p1, p2, z1, z2 = model(x1, x2)
        loss = simsiam_loss(p1, p2, z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        steps += 1
        bar.set_postfix(loss=f'{total / steps:.4f}')
    return total / steps


def main(args):
    print('arguments:', json.dumps(vars(args), sort_keys=True), flush=True)
    device = utils.resolve_device(args.device)
    utils.check_writable(args.results_dir)
    name = run_name(args)
    train = utils.load_dataset(args.dataset, args.data_root, train=True)
    test = utils.load_dataset(args.dataset, args.data_root, train=False, classes=train.classes)
    if args.batch_size > len(train):
        raise UserError(f'--batch_size {args.batch_size} is larger than the training set '
                        f'({len(train)} images): no step would run')
    k = min(args.k, len(train))
    if k < args.k:
        print(f'warning: --k {args.k} is larger than the kNN bank ({len(train)} images); using k={k}',
              file=sys.stderr)
    print(f'data: {args.dataset}, {len(train)} train / {len(test)} test images, '
          f'{len(train.classes)} classes; device: {device}', flush=True)

    torch.manual_seed(args.seed)
    model = SimSiam(args.arch, args.feature_dim, args.pred_dim, args.proj_hidden_dim).to(device)
    counts = count_model(model, device)
    print(f'params: backbone {counts["backbone_params_M"]:.2f} M, backbone + linear head '
          f'{counts["linear_params_M"]:.2f} M, SimSiam {counts["simsiam_params_M"]:.2f} M; '
          f'FLOPs {counts["flops_G"]:.2f} G per image (thop)', flush=True)

    init_lr = args.lr * args.batch_size / 256
    optimizer = build_optimizer(model, init_lr, args.momentum, args.wd, args.fix_pred_lr)
    dataset = utils.AugmentedViews(train, utils.pretrain_transform(), args.seed, views=2)
    feature_fn = model.backbone if args.knn_feature == 'backbone' else model.encode
    columns = ['epoch', 'train_loss', 'test_acc@1', 'test_acc@5']
    csv_path = os.path.join(args.results_dir, f'{name}_statistics.csv')
    model_path = os.path.join(args.results_dir, f'{name}_model.pth')
    rows = []
    for epoch in range(1, args.epochs + 1):
        set_lr(optimizer, utils.cosine_lr(init_lr, epoch - 1, args.epochs), init_lr)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=utils.EpochBatchSampler(len(train), args.batch_size, args.seed, epoch),
            num_workers=args.num_workers, pin_memory=device.type == 'cuda')
        start = time.time()
        train_loss = train_epoch(model, loader, optimizer, device, epoch, args.epochs)
        row = {'epoch': epoch, 'train_loss': train_loss, 'test_acc@1': None, 'test_acc@5': None}
        if epoch % args.knn_every == 0 or epoch == args.epochs:
            model.eval()
            row['test_acc@1'], row['test_acc@5'] = utils.knn_accuracy(
                feature_fn, train, test, k, args.knn_t, args.batch_size, device)
        rows.append(row)
        utils.write_csv(rows, columns, csv_path)
        utils.save_checkpoint({
            'kind': 'simsiam_model', 'epoch': epoch, 'state_dict': model.state_dict(),
            'model_args': {'arch': args.arch, 'feature_dim': args.feature_dim, 'pred_dim': args.pred_dim,
                           'proj_hidden_dim': args.proj_hidden_dim},
            'dataset': args.dataset, 'classes': train.classes, 'args': vars(args),
        }, model_path)
        acc = '' if row['test_acc@1'] is None else \
            f' kNN acc@1 {row["test_acc@1"]:.2f}% acc@5 {row["test_acc@5"]:.2f}%'
        print(f'epoch {epoch}/{args.epochs}: loss {train_loss:.4f}{acc} ({time.time() - start:.1f} s)',
              flush=True)
    print(f'done: statistics in {csv_path}, model in {model_path}', flush=True)


UserError = utils.UserError

if __name__ == '__main__':
    sys.exit(utils.cli(main, parse_args))
