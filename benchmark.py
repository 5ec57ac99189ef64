"""Speed and memory of the data and training paths, measured side by side in one run.

    python benchmark.py --arch resnet18 --batch_size 64 --device cpu
    python benchmark.py --arch resnet50 --batch_size 512 --device cuda

Prints one table per part and the ratios against the seed-equivalent configuration (per-image PIL
augmentation in DataLoader workers, float32, two forward passes). Repeated measurements are interleaved
and the median is reported, so a machine that slows down for a while slows every configuration alike.
"""
import collections
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time

import pandas as pd
import torch

import augment
import launch
import main as pretrain
import monitor
import plot
import utils
from model import ARCHS, SimSiam


def parse_args(argv=None):
    p = launch.Parser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', default='resnet18', choices=ARCHS)
    p.add_argument('--batch_size', type=launch.positive_int, default=64, help='images per training step')
    p.add_argument('--images', type=launch.positive_int, default=None,
                   help='images in the timed training epoch (default: 8 batches)')
    p.add_argument('--aug_images', type=launch.positive_int, default=1024,
                   help='images per augmentation measurement')
    p.add_argument('--repeats', type=launch.positive_int, default=3, help='interleaved repetitions of each training epoch')
    p.add_argument('--aug_repeats', type=launch.positive_int, default=5, help='interleaved repetitions of each augmentation measurement')
    p.add_argument('--knn_bank', type=launch.positive_int, default=10000, help='kNN bank size N')
    p.add_argument('--knn_queries', type=launch.positive_int, default=2000, help='kNN query count M')
    p.add_argument('--num_workers', type=launch.non_negative_int, default=launch.available_cpus(),
                   help='DataLoader workers of the PIL path')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--configs', default='seed,fast,fast+channels_last,fast+compile',
                   help='training configurations to time (seed, fast, and fast+<change>, where <change> '
                        'is channels_last, no_channels_last, amp, no_amp, compile or pil)')
    p.add_argument('--parts', default='aug,train,knn,fixed,phases',
                   help='what to measure: aug (augmentation), train (training configurations), knn, fixed (the '
                        "epoch's fixed costs: saving and plotting, blocking against background), phases (one "
                        'real epoch of main.py, phase by phase)')
    p.add_argument('--rows', type=launch.positive_int, default=800,
                   help='CSV rows (epochs) of the run whose fixed costs are measured')
    return p.parse_args(argv)


def random_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return utils.ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                          torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved(functions, repeats):
    """Median seconds of each function, run in turn `repeats` times after one warm-up call each."""
    times = {name: [] for name in functions}
    for fn in functions.values():
        fn()
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def table(title, header, rows):
    print(f'\n{title}')
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in [header, ['-' * w for w in widths], *rows]:
        print('  ' + '  '.join(str(x).rjust(w) for x, w in zip(row, widths)))


# ----------------------------------------------------------------------------- augmentation

def bench_augmentation(args, device):
    data = random_images(args.aug_images)
    n = len(data)
    pil = utils.AugmentedViews(data, utils.pretrain_transform(), seed=0, views=2)
    on_cpu, on_device = data.images, data.images.to(device)
    g_cpu, g_dev = torch.Generator().manual_seed(0), torch.Generator(device=device).manual_seed(0)

    def pil_pairs():
        for i in range(n):
            pil[(0, i)]

    def batched(images, g):
        def run():
            for chunk in images.split(256):
                augment.pretrain_augment(chunk.repeat(2, 1, 1, 1), g)
            sync(images.device)
        return run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = interleaved({'pil': pil_pairs, 'batched': batched(on_cpu, g_cpu)}, args.aug_repeats)
    finally:
        torch.set_num_threads(threads)
    rows = [['PIL, per image (the reference path)', 'cpu, 1 thread', f'{n / t["pil"]:.0f}', '1.0'],
            ['batched', 'cpu, 1 thread', f'{n / t["batched"]:.0f}', f'{t["pil"] / t["batched"]:.1f}']]
    if device.type == 'cuda':
        loader_t = interleaved({'loader': lambda: [None for _ in pil_loader(pil, n, args.num_workers)],
                                'batched': batched(on_device, g_dev)}, args.aug_repeats)
        rows.append([f'PIL DataLoader, {args.num_workers} workers', 'cpu workers',
                     f'{n / loader_t["loader"]:.0f}', f'{t["pil"] / loader_t["loader"]:.1f}'])
        rows.append(['batched', str(device), f'{n / loader_t["batched"]:.0f}',
                     f'{t["pil"] / loader_t["batched"]:.1f}'])
    table('augmented pairs per second (two views of one image = one pair)',
          ['path', 'where', 'pairs/s', 'x PIL'], rows)
    return t['pil'] / t['batched']


def pil_loader(dataset, n, workers):
    sampler = utils.EpochBatchSampler(n, 256, 0, 0)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)


# ----------------------------------------------------------------------------- training

def config_speed(name, device):
    """The Speed of a named configuration: 'seed' (PIL, fp32, contiguous), 'fast' (the defaults for this
    device), or 'fast+<change>'."""
    if name == 'seed':
        return launch.Speed(device, 'pil', amp=False, channels_last=False, compile=False)
    if name.split('+')[0] != 'fast':
        raise launch.UserError(f'--configs: {name!r} is neither seed nor fast+...')
    defaults = launch.resolve_speed(device)
    for change in name.split('+')[1:]:
        if change == 'pil':
            defaults.aug = 'pil'
        elif change in ('channels_last', 'amp', 'compile'):
            setattr(defaults, change, True)
        elif change in ('no_channels_last', 'no_amp'):
            setattr(defaults, change[3:], False)
        else:
            raise launch.UserError(f'--configs: unknown change {change!r}')
    return defaults


def bench_training(args, device):
    n = args.images or 8 * args.batch_size
    data = random_images(n)
    runs = {}
    for name in args.configs.split(','):
        speed = config_speed(name, device)
        torch.manual_seed(0)
        model = SimSiam(args.arch).to(device)
        optimizer = pretrain.build_optimizer(model, 0.03 * args.batch_size / 256, 0.9, 5e-4, False)
        net = speed.prepare(model)
        source = utils.ViewSource(data, 'pretrain', speed.aug, 0, device, args.num_workers)
        runs[name] = (net, optimizer, source, speed)

    def epoch(name):
        net, optimizer, source, speed = runs[name]

        def run():
            batches, steps = source.epoch(1, args.batch_size)
            pretrain.train_epoch(net, batches, steps, optimizer, 1, 1, speed, progress=False)
            sync(device)
        return run

    peaks = {}
    times = {name: [] for name in runs}
    for name in runs:  # warm-up (compilation, cuDNN autotuning), and each configuration's peak memory
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        epoch(name)()
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None
    for _ in range(args.repeats):
        for name in runs:
            start = time.perf_counter()
            epoch(name)()
            times[name].append(time.perf_counter() - start)
    steps = n // args.batch_size
    base = statistics.median(times['seed']) if 'seed' in times else None
    rows = []
    for name, t in times.items():
        t = statistics.median(t)
        speed = runs[name][3]
        rows.append([name, str(speed), f'{steps / t:.2f}', f'{steps * args.batch_size / t:.1f}',
                     f'{t:.2f}', '-' if peaks[name] is None else f'{peaks[name]:.2f}',
                     '-' if base is None else f'{base / t:.2f}'])
    table(f'training epochs of {n} images, {args.arch}, batch {args.batch_size}, {device} '
          f'({torch.get_num_threads()} threads)',
          ['config', 'settings', 'steps/s', 'images/s', 'epoch s', 'peak GiB', 'x seed'], rows)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- kNN monitor

def bench_knn(args, device):
    torch.manual_seed(0)
    model = SimSiam(args.arch).to(device).eval()
    speed = config_speed('fast', device)
    fn = speed.wrap(speed.prepare(model).backbone)
    bank, test = random_images(args.knn_bank, 1), random_images(args.knn_queries, 2)
    bank_features, test_features = {}, {}

    def embed():
        bank_features['x'] = monitor.embed(fn, bank.images, 512, device)
        test_features['x'] = monitor.embed(fn, test.images, 512, device)
        sync(device)

    def search():
        monitor.knn_predict(test_features['x'], bank_features['x'], bank.labels.to(device), 10,
                          min(200, args.knn_bank), 0.1)
        sync(device)

    with torch.no_grad():
        embed()
        t = interleaved({'embed': embed, 'search': search}, args.repeats)
    table(f'kNN monitor, bank N={args.knn_bank}, queries M={args.knn_queries}, k={min(200, args.knn_bank)}, {device}',
          ['part', 'seconds'], [['embed bank + queries', f'{t["embed"]:.2f}'],
                                ['similarities + top-k + votes', f'{t["search"]:.3f}']])


# ----------------------------------------------------------------------------- the epoch's fixed costs

def fake_rows(n):
    return [{**dict.fromkeys(pretrain.COLUMNS, 0.5), 'epoch': e, 'train_loss': -e / n} for e in range(1, n + 1)]


@contextlib.contextmanager
def saving(model, optimizer, arch, folder, background):
    """A run.Run of main.py in `folder` and the checkpoint() main.py hands it, for `model`."""
    from distributed import SINGLE
    from run import Run
    settings = {'arch': arch, 'feature_dim': 2048, 'pred_dim': 512, 'proj_hidden_dim': 2048, 'dataset': 'cifar10'}
    common = {'model_args': pretrain.model_args(settings), 'dataset': 'cifar10', 'classes': list('0123456789')}
    checkpoint = lambda: ({'kind': 'simsiam_model', 'state_dict': model.state_dict(), **common},
                          {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), **common})
    with contextlib.redirect_stdout(None):  # Run prints the arguments, as a script's run does
        r = Run('main.py', settings, folder, f'bench_{background}', pretrain.OUTPUTS, 'simsiam_state',
                pretrain.COLUMNS, 1, SINGLE, background)
    with r:
        r.painter = plot.Painter(every=0)  # every repetition draws
        yield r, checkpoint


def trained_model(arch, device):
    torch.manual_seed(0)
    model = SimSiam(arch).to(device)
    optimizer = pretrain.build_optimizer(model, 0.06, 0.9, 5e-4, False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the momentum buffers exist, as in a real state
    return model, optimizer


def draw(r, seconds=None):
    """The statistics picture of r's rows; the seconds it took appended to `seconds`."""
    def run():
        start = time.perf_counter()
        plot.plot_pretrain(pd.DataFrame(r.rows), r.paths['plot'])
        if seconds is not None:
            seconds.append(time.perf_counter() - start)
    return run


def bench_fixed_costs(args, device):
    """What the loop waits for at the end of an epoch of `args.arch` with args.rows CSV rows: the saved set
    written on the training thread with the model every epoch and the plot redrawn there (as before),
    against the set handed to the background writer (the model every --save_every epochs) and the plot
    drawn by the painter thread (now). Both through the scripts' own code (run.Run.save, plot), in turn."""
    model, optimizer = trained_model(args.arch, device)
    times = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(dir='.') as folder, \
            saving(model, optimizer, args.arch, folder, False) as (before, checkpoint), \
            saving(model, optimizer, args.arch, folder, True) as (now, _):
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            for r in (before, now):
                r.rows = fake_rows(args.rows)
                start = time.perf_counter()
                r.save(args.rows, r is before, *checkpoint())  # the model file: every epoch before, now 1 in N
                saved = time.perf_counter()
                key = 'before' if r is before else 'now'
                drawing = draw(r, times[f'{key} plot'] if repeat else None)
                if r is before:
                    drawing()
                else:
                    r.painter.post(drawing)
                posted = time.perf_counter()
                r.settle()
                written = time.perf_counter()
                r.painter.stop()
                if repeat:
                    times[f'{key} save'].append(saved - start)
                    times[f'{key} wait'].append(posted - start)
                    times[f'{key} write'].append(written - posted)
        size = {r: sum(os.path.getsize(r.paths[k]) for k in ('csv', 'state')) for r in (before, now)}
        size[before] += os.path.getsize(before.paths['model'])
    t = {k: statistics.median(v) for k, v in times.items()}
    table(f"the epoch's fixed costs: {args.arch}, {args.rows} CSV rows, {device} (medians of {args.repeats})",
          ['seconds, bytes', 'blocking (as before)', 'background (now)'],
          [['the loop waits per epoch, s', f'{t["before wait"]:.3f}', f'{t["now wait"]:.3f} (host copy of the set)'],
           ['saved set written, s', f'{t["before save"]:.3f} (model + state, on the loop)',
            f'{t["now write"]:.3f} (state, writer thread)'],
           ['statistics plot drawn, s', f'{t["before plot"]:.3f} (on the loop)', f'{t["now plot"]:.3f} (painter thread)'],
           ['written per epoch, MB', f'{size[before] / 1e6:.0f}',
            f'{size[now] / 1e6:.0f} (+ the model 1 epoch in --save_every)']])
    return t['before wait'], t['now wait']


def bench_phases(args, device):
    """One real epoch of main.py's step, phase by phase (the device synchronised between phases), the kNN
    monitor, and what the loop waits for at the epoch's end, with the share of each."""
    n = args.images or 8 * args.batch_size
    data, bank, test = random_images(n), random_images(args.knn_bank, 1), random_images(args.knn_queries, 2)
    speed = config_speed('fast', device)
    model, optimizer = trained_model(args.arch, device)
    net = speed.prepare(model)
    source = utils.ViewSource(data, 'pretrain', speed.aug, 0, device, args.num_workers)
    phases = {}

    def timed(phase, fn):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start
        return out
    with tempfile.TemporaryDirectory(dir='.') as folder, saving(model, optimizer, args.arch, folder, True) as (r, checkpoint):
        for epoch in (1, 2):  # the first warms up (cuDNN autotuning, allocations, compilation)
            phases.clear()
            net.train()
            batches, steps = source.epoch(epoch, args.batch_size)
            batches = iter(batches)
            for _ in range(steps):
                (x1, x2), _ = timed('augmentation', lambda: next(batches))
                with speed.autocast():
                    p1, p2, z1, z2 = timed('forward', lambda: net(speed.layout(x1), speed.layout(x2)))
                loss = timed('forward', lambda: pretrain.simsiam_loss(p1, p2, z1, z2))
                optimizer.zero_grad(set_to_none=True)
                timed('backward', loss.backward)
                timed('optimizer', optimizer.step)
            model.eval()
            fn = speed.wrap(model.backbone)
            feats = timed('kNN embedding', lambda: (monitor.embed(fn, bank.images, args.batch_size, device),
                                                    monitor.embed(fn, test.images, args.batch_size, device)))
            timed('kNN search', lambda: monitor.knn_predict(feats[1], feats[0], bank.labels.to(device), 10,
                                                            min(200, len(bank)), 0.1))
            r.rows = fake_rows(args.rows)
            timed('save (the loop waits)', lambda: r.save(args.rows, False, *checkpoint()))
            timed('plot (the loop waits)', lambda: r.painter.post(draw(r)))
            r.settle()
            r.painter.stop()
    total = sum(phases.values())
    table(f'one epoch, phase by phase: {args.arch}, {n} images, batch {args.batch_size}, kNN bank {len(bank)}, '
          f'{len(test)} queries, {device}', ['phase', 'seconds', 'share'],
          [[k, f'{v:.3f}', f'{100 * v / total:.1f}%'] for k, v in phases.items()] + [['total', f'{total:.3f}', '']])
    return phases


def main(args):
    device = launch.resolve_device(args.device)
    print(f'torch {torch.__version__}, device {device}'
          + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else '')
          + f', {launch.available_cpus()} CPUs, {torch.get_num_threads()} torch threads', flush=True)
    parts = set(args.parts.split(','))
    unknown = parts - {'aug', 'train', 'knn', 'fixed', 'phases'}
    if unknown:
        raise launch.UserError(f'--parts: unknown {", ".join(sorted(unknown))}')
    aug_ratio = bench_augmentation(args, device) if 'aug' in parts else None
    times = bench_training(args, device) if 'train' in parts else {}
    if 'knn' in parts:
        bench_knn(args, device)
    fixed = bench_fixed_costs(args, device) if 'fixed' in parts else None
    if 'phases' in parts:
        bench_phases(args, device)
    print('\nratios')
    if aug_ratio is not None:
        print(f'  batched / PIL augmentation, CPU, one thread: {aug_ratio:.1f}x')
    if 'seed' in times and 'fast' in times:
        print(f'  fast / seed-equivalent training throughput: {times["seed"] / times["fast"]:.2f}x')
    if fixed is not None:
        print(f'  blocking per epoch, blocking / background saving and plotting: {fixed[0]:.2f} s / '
              f'{fixed[1]:.3f} s = {fixed[0] / fixed[1]:.0f}x')
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f'  peak resident memory of this process: {rss:.2f} GiB')


if __name__ == '__main__':
    sys.exit(launch.cli(main, parse_args))
