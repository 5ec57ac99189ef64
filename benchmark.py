"""Speed and memory of the data and training paths, measured side by side in one run.

    python benchmark.py --arch resnet18 --batch_size 64 --device cpu
    python benchmark.py --arch resnet50 --batch_size 512 --device cuda

Prints one table per part and the ratios against the seed-equivalent configuration (per-image PIL
augmentation in DataLoader workers, float32, two forward passes). Repeated measurements are interleaved
and the median is reported, so a machine that slows down for a while slows every configuration alike.
"""
import resource
import statistics
import sys
import time

import torch

import augment
import launch
import main as pretrain
import monitor
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


def main(args):
    device = launch.resolve_device(args.device)
    print(f'torch {torch.__version__}, device {device}'
          + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else '')
          + f', {launch.available_cpus()} CPUs, {torch.get_num_threads()} torch threads', flush=True)
    aug_ratio = bench_augmentation(args, device)
    times = bench_training(args, device)
    bench_knn(args, device)
    print('\nratios')
    print(f'  batched / PIL augmentation, CPU, one thread: {aug_ratio:.1f}x')
    if 'seed' in times and 'fast' in times:
        print(f'  fast / seed-equivalent training throughput: {times["seed"] / times["fast"]:.2f}x')
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f'  peak resident memory of this process: {rss:.2f} GiB')


if __name__ == '__main__':
    sys.exit(launch.cli(main, parse_args))
