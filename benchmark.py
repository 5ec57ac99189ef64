"""Speed and memory of the data and training paths, measured side by side in one run.

    python benchmark.py --arch resnet18 --batch_size 64 --device cpu
    python benchmark.py --arch resnet50 --batch_size 512 --device cuda
    python benchmark.py --parts aug --aug pil,stream --data_root FOLDER --image_size 224

Prints one table per part and the ratios against the seed-equivalent configuration (per-image PIL
augmentation in DataLoader workers, float32, two forward passes). Repeated measurements are interleaved
and the median is reported, so a machine that slows down for a while slows every configuration alike.
"""
import collections
import contextlib
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image

import augment
import cli
import distributed
import monitor
import optim
import plot
import recipes
import stream
import utils
from distributed import SINGLE
from errors import UserError
from model import ARCHS, ModelConfig, SimSiam, simsiam_loss
from pretrain import train_epoch
from run import Run
from speed import AUGMENTATIONS, Speed, bf16_pays, cpu_capability, resolve_speed


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', default='resnet18', choices=ARCHS)
    p.add_argument('--batch_size', type=cli.positive_int, default=64, help='images per training step')
    p.add_argument('--images', type=cli.positive_int, default=None,
                   help='images in the timed training epoch (default: 8 batches)')
    p.add_argument('--aug_images', type=cli.positive_int, default=1024,
                   help='images per augmentation measurement')
    p.add_argument('--repeats', type=cli.positive_int, default=3, help='interleaved repetitions of each training epoch')
    p.add_argument('--aug_repeats', type=cli.positive_int, default=5,
                   help='interleaved repetitions of each augmentation measurement')
    p.add_argument('--knn_bank', type=cli.positive_int, default=10000, help='kNN bank size N')
    p.add_argument('--knn_queries', type=cli.positive_int, default=2000, help='kNN query count M')
    p.add_argument('--num_workers', type=cli.non_negative_int, default=distributed.available_cpus(),
                   help='DataLoader workers of the PIL path')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--configs', default='seed,fp32,fast,fast+channels_last,fast+compile',
                   help='training configurations to time (seed, fp32, fast, and fast+<change>, where <change> '
                        'is channels_last, no_channels_last, amp, no_amp, compile or pil)')
    p.add_argument('--parts', default='aug,train,knn,fixed,phases',
                   help='what to measure: aug (augmentation), train (training configurations), knn, fixed (the '
                        "epoch's fixed costs: saving and plotting, blocking against background), phases (one "
                        'real epoch of main.py, phase by phase)')
    p.add_argument('--rows', type=cli.positive_int, default=800,
                   help='CSV rows (epochs) of the run whose fixed costs are measured')
    p.add_argument('--data_root', default=None,
                   help="an image folder (<root>/train/<class>/*): --parts aug then measures the data paths of "
                        "--aug on its files, each in a process of its own, against one training step's demand")
    p.add_argument('--aug', default='pil,stream',
                   help='with --data_root: the data paths to measure, comma-separated (pil, stream, batched)')
    p.add_argument('--image_size', type=cli.positive_int, default=224, help='with --data_root: the crops\' side')
    p.add_argument('--recipe', default='imagenet', choices=recipes.RECIPES,
                   help="with --data_root: whose augmentation (the imagenet recipe's has the blur)")
    p.add_argument('--write_folder', type=cli.positive_int, default=None,
                   help='first write this many generated JPEGs (of --write_size, in 10 classes) into --data_root, '
                        'unless it holds a train/ folder already')
    p.add_argument('--write_size', default='320x256', help='the generated JPEGs\' WIDTHxHEIGHT')
    return p.parse_args(argv)


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


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


# ----------------------------------------------------------------------------- the data paths on a folder

def write_folder(root, n, size, seed=0):
    """n JPEGs of size (width, height) under root/train/<class>/, 10 classes, of smooth random colours with a
    little noise (about as compressible as photographs), and a few under root/test/."""
    rng = np.random.default_rng(seed)
    width, height = size
    for split, count in (('train', n), ('test', max(10, n // 50))):
        for i in range(count):
            folder = os.path.join(root, split, f'class{i % 10}')
            os.makedirs(folder, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                               Image.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f'{i:06d}.jpg'),
                                                                        quality=90)


class PeakMemory:
    """The peak, sampled every 50 ms, of the proportional set size (PSS: shared pages split among the
    processes that share them) of this process and all its descendants (the DataLoader workers)."""

    def __init__(self):
        import threading
        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _tree(pid):
        pids, i = [pid], 0
        while i < len(pids):
            with contextlib.suppress(OSError):
                for task in os.listdir(f'/proc/{pids[i]}/task'):
                    with open(f'/proc/{pids[i]}/task/{task}/children') as f:
                        pids += [int(p) for p in f.read().split()]
            i += 1
        return pids

    @staticmethod
    def _pss(pid):
        with contextlib.suppress(OSError):
            with open(f'/proc/{pid}/smaps_rollup') as f:
                for line in f:
                    if line.startswith('Pss:'):
                        return int(line.split()[1]) * 1024
        return 0

    def _watch(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, sum(self._pss(p) for p in self._tree(os.getpid())))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def measure_in_child(out, *args):
    """measure_path in a process of its own; what ended it, if it failed, in one line instead."""
    try:
        out.put(('ok', measure_path(*args)))
    except BaseException as e:  # noqa: B902 (reported by the parent)
        out.put(('error', (f'{type(e).__name__}: {e}'.splitlines() or [''])[0]))


def measure_path(path, root, image_size, recipe, batch_size, pairs, workers, device_name):
    """The pairs/s that the data path `path` supplies from the folder at `root` (the first batch, with the
    workers' start, not timed), the peak host PSS and device memory, and the files read."""
    device = torch.device(device_name)
    augmentation, _, test_resize = recipes.AUGMENTATION[recipe]
    with PeakMemory() as memory:
        train = utils.load_dataset('folder', root, True, None, image_size, test_resize, path == 'batched',
                                   decode=path != 'stream')
        steps = max(2, pairs // batch_size + 1)
        train = train.subset(torch.arange(min(len(train), steps * batch_size)))
        source = stream.StreamSource(train, 'pretrain', 0, device, workers, SINGLE, image_size, augmentation) \
            if path == 'stream' else utils.ViewSource(train, 'pretrain', path, 0, device, workers, SINGLE, image_size,
                                                      augmentation)
        batches, steps = source.epoch(1, batch_size)
        batches = iter(batches)
        next(batches)
        sync(device)
        start = time.perf_counter()
        timed = sum(1 for _ in batches)
        sync(device)
        seconds = time.perf_counter() - start
    peak_device = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None
    return timed * batch_size / seconds, memory.peak / 2 ** 30, peak_device, len(train)


def training_demand(arch, batch_size, image_size, device, steps=3):
    """The pairs/s one SimSiam step of `arch` consumes at batch_size x image_size on `device`, with the
    device's default speed settings (bf16 and channels_last where they pay), after a warm-up step."""
    speed = resolve_speed(device)
    torch.manual_seed(0)
    config = ModelConfig(arch, stem='imagenet' if image_size > 64 else 'cifar')
    model = SimSiam(config).to(device)
    net = speed.prepare(model)
    optimizer = optim.sgd(model.param_groups(), 0.05 * batch_size / 256, 0.9, 1e-4)
    views = [torch.randn(batch_size, 3, image_size, image_size, device=device) for _ in range(2)]
    seconds = []
    for step in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        with speed.autocast():
            p1, p2, z1, z2 = net(speed.layout(views[0]), speed.layout(views[1]))
        loss = simsiam_loss(p1, p2, z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if step:
            seconds.append(time.perf_counter() - start)
    return batch_size / statistics.median(seconds), speed


def bench_folder(args, device):
    """The data paths of --aug on the folder's files, each in a fresh process, side by side with what one
    training step consumes; returns {path: pairs/s}."""
    import multiprocessing
    if args.write_folder and not os.path.isdir(os.path.join(args.data_root, 'train')):
        width, height = (int(v) for v in args.write_size.lower().split('x'))
        print(f'writing {args.write_folder} JPEGs of {width}x{height} into {args.data_root} ...', flush=True)
        write_folder(args.data_root, args.write_folder, (width, height))
    paths = args.aug.split(',')
    unknown = set(paths) - set(AUGMENTATIONS)
    if unknown:
        raise UserError(f'--aug: unknown {", ".join(sorted(unknown))}; choose from {", ".join(AUGMENTATIONS)}')
    context = multiprocessing.get_context('spawn')
    runs = {path: [] for path in paths}
    for _ in range(args.aug_repeats):  # interleaved: a machine that slows down for a while slows every path alike
        for path in paths:
            out = context.Queue()
            child = context.Process(target=measure_in_child, args=(out, path, args.data_root, args.image_size,
                                                                    args.recipe, args.batch_size, args.aug_images,
                                                                    args.num_workers, str(device)))
            child.start()
            status, result = out.get()
            child.join()
            if status == 'error':
                raise UserError(f'--aug {path} on {args.data_root!r}: {result}')
            runs[path].append(result)
    # the median rate, the largest peaks
    supplied = {path: (statistics.median(r[0] for r in rs), max(r[1] for r in rs),
                       None if rs[0][2] is None else max(r[2] for r in rs), rs[0][3]) for path, rs in runs.items()}
    demand, speed = training_demand(args.arch, args.batch_size, args.image_size, device)
    rows = [[path, f'{rate:.0f}', f'{demand:.0f}', f'{rate / demand:.2f}', f'{host:.2f}',
             '-' if on_device is None else f'{on_device:.2f}'] for path, (rate, host, on_device, _) in supplied.items()]
    files = next(iter(supplied.values()))[3]
    table(f'augmented {args.image_size} px pairs per second from {args.data_root} ({files} files read of '
          f'{len(utils.list_folder(args.data_root, True)[1])}, median of {args.aug_repeats} interleaved runs, each '
          f'in a process of its own), batch {args.batch_size}, {args.num_workers} workers, {device}; demand: one '
          f'{args.arch} step ({speed})',
          ['path', 'pairs/s', 'demand pairs/s', 'supply / demand', 'peak host GiB (PSS)', 'peak device GiB'], rows)
    return {path: rate for path, (rate, *_) in supplied.items()}


def pil_loader(dataset, n, workers):
    sampler = utils.EpochBatchSampler(n, 256, 0, 0)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)


# ----------------------------------------------------------------------------- training

def config_speed(name, device):
    """The Speed of a named configuration: 'seed' (PIL, fp32, contiguous), 'fp32' (batched, fp32,
    contiguous: the CPU defaults before bf16 was chosen on CPUs with AMX), 'fast' (the defaults for this
    device), or 'fast+<change>'."""
    if name == 'seed':
        return Speed(device, 'pil', amp=False, channels_last=False, compile=False)
    if name == 'fp32':
        return Speed(device, 'batched', amp=False, channels_last=False, compile=False)
    if name.split('+')[0] != 'fast':
        raise UserError(f'--configs: {name!r} is neither seed nor fast+...')
    defaults = resolve_speed(device)
    for change in name.split('+')[1:]:
        if change == 'pil':
            defaults.aug = 'pil'
        elif change in ('channels_last', 'amp', 'compile'):
            setattr(defaults, change, True)
        elif change in ('no_channels_last', 'no_amp'):
            setattr(defaults, change[3:], False)
        else:
            raise UserError(f'--configs: unknown change {change!r}')
        defaults.why = ''  # no longer what auto chose
    return defaults


def bench_training(args, device):
    n = args.images or 8 * args.batch_size
    data = random_images(n)
    runs = {}
    for name in args.configs.split(','):
        speed = config_speed(name, device)
        torch.manual_seed(0)
        model = SimSiam(ModelConfig(args.arch)).to(device)
        optimizer = optim.sgd(model.param_groups(), 0.03 * args.batch_size / 256, 0.9, 5e-4)
        net = speed.prepare(model)
        source = utils.ViewSource(data, 'pretrain', speed.aug, 0, device, args.num_workers)
        runs[name] = (net, optimizer, source, speed)

    def epoch(name):
        net, optimizer, source, speed = runs[name]

        def run():
            batches, steps = source.epoch(1, args.batch_size)
            train_epoch(net, batches, steps, optimizer, 1, 1, speed, progress=False)
            sync(device)
        return run

    peaks, first = {}, {}
    times = {name: [] for name in runs}
    for name in runs:  # warm-up (compilation, cuDNN autotuning), and each configuration's peak memory
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        epoch(name)()
        first[name] = time.perf_counter() - start
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
                     f'{t:.2f}', f'{first[name]:.1f}', '-' if peaks[name] is None else f'{peaks[name]:.2f}',
                     '-' if base is None else f'{base / t:.2f}'])
    table(f'training epochs of {n} images, {args.arch}, batch {args.batch_size}, {device} '
          f'({torch.get_num_threads()} threads); first epoch: with compilation and warm-up',
          ['config', 'settings', 'steps/s', 'images/s', 'epoch s', 'first s', 'peak GiB', 'x seed'], rows)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- kNN monitor

def bench_knn(args, device):
    torch.manual_seed(0)
    model = SimSiam(ModelConfig(args.arch)).to(device).eval()
    speed = config_speed('fast', device)
    fn = speed.wrap(speed.prepare(model).backbone)
    bank, test = random_images(args.knn_bank, 1), random_images(args.knn_queries, 2)
    bank_features, test_features = {}, {}

    def embed():
        bank_features['x'] = monitor.embed(fn, bank, 512, device)
        test_features['x'] = monitor.embed(fn, test, 512, device)
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

# A pretraining log's columns (main.py's): what the fixed-cost runs write and draw.
LOG_COLUMNS = ['epoch', 'train_loss', 'test_acc@1', 'test_acc@5', 'z_std', 'z_std_ratio', 'lr', 'train_time',
               'knn_time', 'epoch_time', 'images_per_s', 'save_time']


def fake_rows(n):
    return [{**dict.fromkeys(LOG_COLUMNS, 0.5), 'epoch': e, 'train_loss': -e / n} for e in range(1, n + 1)]


def saving(arch, folder, name, save_every):
    """A Run of main.py's kind in `folder` that writes the model file every `save_every` epochs."""
    settings = {'arch': arch, 'resume': None, 'results_dir': folder, 'epochs': 10 ** 9, 'save_every': save_every}
    with contextlib.redirect_stdout(None):  # Run prints the arguments, as a script's run does
        r = Run('main.py', name, settings, columns=LOG_COLUMNS, world=SINGLE, state_kind='simsiam_state')
    r.painter = plot.Painter(every=0)  # every repetition draws
    return r


def trained_model(arch, device):
    torch.manual_seed(0)
    model = SimSiam(ModelConfig(arch)).to(device)
    optimizer = optim.sgd(model.param_groups(), 0.06, 0.9, 5e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the momentum buffers exist, as in a real state
    return model, optimizer


def checkpoint(model, optimizer, arch):
    """The model file's dict and the state's entries, as main.py hands them to its run."""
    weights = model.state_dict()
    common = {'model_args': ModelConfig(arch).to_dict(), 'dataset': 'cifar10', 'classes': list('0123456789')}
    state = {'model': weights, 'optimizer': optimizer.state_dict(), **common}
    return {'kind': 'simsiam_model', 'model': weights, **common}, state


def hand_over(r, rows, parts):
    """One epoch's hand-over to run r after `rows` epochs of log: the seconds the loop waits (end_epoch),
    then the seconds until the set is on disk and its picture drawn."""
    r.rows = fake_rows(rows)[:-1]
    start = time.perf_counter()
    r.end_epoch(fake_rows(rows)[-1], *parts)
    handed = time.perf_counter()
    r.settle()
    r.painter.flush()
    return handed - start, time.perf_counter() - handed


def bench_fixed_costs(args, device):
    """What the loop waits for at the end of an epoch of `args.arch` with args.rows CSV rows, through the
    scripts' own run.Run, in turn: blocking (the model file every epoch, the loop waiting until the set is on
    disk and the picture drawn, as before) against what a run does now (the set and the picture in the
    background, the model file every --save_every epochs)."""
    model, optimizer = trained_model(args.arch, device)
    parts = checkpoint(model, optimizer, args.arch)
    times = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(dir='.') as folder:
        before, now = saving(args.arch, folder, 'before', 1), saving(args.arch, folder, 'now', 10 ** 9)
        with before, now:
            for repeat in range(args.repeats + 1):  # the first is a warm-up
                waited, rest = hand_over(before, args.rows, parts)
                handed, written = hand_over(now, args.rows, parts)
                start = time.perf_counter()
                plot.plot_statistics(pd.DataFrame(now.rows, columns=LOG_COLUMNS), now.paths['plot'])
                drawn = time.perf_counter() - start
                if repeat:
                    times['before wait'].append(waited + rest)
                    times['now wait'].append(handed)
                    times['now write'].append(written)
                    times['plot'].append(drawn)
            size = {r: sum(os.path.getsize(r.paths[k]) for k in ('csv', 'state')) for r in (before, now)}
            size[before] += os.path.getsize(before.paths['model'])
    t = {k: statistics.median(v) for k, v in times.items()}
    table(f"the epoch's fixed costs: {args.arch}, {args.rows} CSV rows, {device} (medians of {args.repeats})",
          ['seconds, bytes', 'blocking (as before)', 'background (now)'],
          [['the loop waits per epoch, s', f'{t["before wait"]:.3f} (model + state + picture)',
            f'{t["now wait"]:.3f} (host copy of the set)'],
           ['saved set written and picture drawn, s', '(in the wait)', f'{t["now write"]:.3f} (writer, painter)'],
           ['statistics picture alone, s', f'{t["plot"]:.3f}', f'{t["plot"]:.3f}'],
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
    with tempfile.TemporaryDirectory(dir='.') as folder, saving(args.arch, folder, 'phases', 10 ** 9) as r:
        for epoch in (1, 2):  # the first warms up (cuDNN autotuning, allocations, compilation)
            phases.clear()
            net.train()
            batches, steps = source.epoch(epoch, args.batch_size)
            batches = iter(batches)
            for _ in range(steps):
                (x1, x2), _ = timed('augmentation', lambda: next(batches))
                with speed.autocast():
                    p1, p2, z1, z2 = timed('forward', lambda: net(speed.layout(x1), speed.layout(x2)))
                loss = timed('forward', lambda: simsiam_loss(p1, p2, z1, z2))
                optimizer.zero_grad(set_to_none=True)
                timed('backward', loss.backward)
                timed('optimizer', optimizer.step)
            model.eval()
            fn = speed.wrap(model.backbone)
            feats = timed('kNN embedding', lambda: (monitor.embed(fn, bank, args.batch_size, device),
                                                    monitor.embed(fn, test, args.batch_size, device)))
            timed('kNN search', lambda: monitor.knn_predict(feats[1], feats[0], bank.labels.to(device), 10,
                                                            min(200, len(bank)), 0.1))
            r.rows = fake_rows(args.rows)[:-1]
            timed('hand-over (the loop waits)', lambda: r.end_epoch(fake_rows(args.rows)[-1],
                                                                    *checkpoint(model, optimizer, args.arch)))
            r.settle()
            r.painter.flush()
    total = sum(phases.values())
    table(f'one epoch, phase by phase: {args.arch}, {n} images, batch {args.batch_size}, kNN bank {len(bank)}, '
          f'{len(test)} queries, {device}', ['phase', 'seconds', 'share'],
          [[k, f'{v:.3f}', f'{100 * v / total:.1f}%'] for k, v in phases.items()] + [['total', f'{total:.3f}', '']])
    return phases


def main(args):
    device = distributed.resolve_device(args.device)
    print(f'torch {torch.__version__}, device {device}'
          + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else '')
          + f', {distributed.available_cpus()} CPUs, {torch.get_num_threads()} torch threads', flush=True)
    fast, why = bf16_pays(torch.device('cpu'))
    print(f'CPU: {cpu_name()}, capability {cpu_capability()}; the CPU default is '
          f'{"bf16" if fast else "float32"} ({why})', flush=True)
    parts = set(args.parts.split(','))
    unknown = parts - {'aug', 'train', 'knn', 'fixed', 'phases'}
    if unknown:
        raise UserError(f'--parts: unknown {", ".join(sorted(unknown))}')
    folder = bench_folder(args, device) if 'aug' in parts and args.data_root else None
    aug_ratio = bench_augmentation(args, device) if 'aug' in parts and not args.data_root else None
    times = bench_training(args, device) if 'train' in parts else {}
    if 'knn' in parts:
        bench_knn(args, device)
    fixed = bench_fixed_costs(args, device) if 'fixed' in parts else None
    if 'phases' in parts:
        bench_phases(args, device)
    print('\nratios')
    if aug_ratio is not None:
        print(f'  batched / PIL augmentation, CPU, one thread: {aug_ratio:.1f}x')
    if folder and 'pil' in folder:
        for path, rate in folder.items():
            if path != 'pil':
                print(f'  {path} / pil pairs per second on the folder: {rate / folder["pil"]:.2f}x')
    if 'seed' in times and 'fast' in times:
        print(f'  fast / seed-equivalent training throughput: {times["seed"] / times["fast"]:.2f}x')
    if 'fp32' in times and 'fast' in times:
        print(f'  fast / fp32 contiguous training throughput: {times["fp32"] / times["fast"]:.2f}x '
              f'(fast: {resolve_speed(device)})')
    if fixed is not None:
        print(f'  blocking per epoch, blocking / background saving and plotting: {fixed[0]:.2f} s / '
              f'{fixed[1]:.3f} s = {fixed[0] / fixed[1]:.0f}x')
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f'  peak resident memory of this process: {rss:.2f} GiB')


if __name__ == '__main__':
    sys.exit(cli.cli(main, parse_args))
