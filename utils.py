"""Data, transforms, kNN monitor, checkpoints, CSV logs, and the small helpers both scripts share."""
import argparse
import contextlib
import math
import os
import shlex
import signal
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

import augment
import distributed
from augment import IMAGE_SIZE, MEAN, STD, normalize
from distributed import SINGLE

DATASETS = ('cifar10', 'cifar100', 'folder')
AUGMENTATIONS = ('batched', 'pil')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp', '.gif')


class UserError(Exception):
    """A problem the user can fix (a flag, a file, the data): reported as one line, no traceback."""


class JobError(UserError):
    """A UserError that every process of a torchrun job meets alike: rank 0 reports it for the job, the
    others exit quietly."""


def on_main(fn, world):
    """fn() computed by rank 0 alone and handed to every process (a UserError it raises, too).

    For what must be decided once for the whole job: reading a checkpoint or the data, the results folder.
    """
    if not world.distributed:
        return fn()
    outcome = None
    if world.main:
        try:
            outcome = ('ok', fn())
        except UserError as e:
            outcome = ('error', str(e))
    status, value = distributed.broadcast(outcome, world)
    if status == 'error':
        raise JobError(value)
    return value


def printer(world):
    """print on rank 0; nothing on the other processes of a torchrun job."""
    return print if world.main else (lambda *args, **kwargs: None)


class NonFiniteLoss(Exception):
    def __init__(self, epoch, step, value):
        super().__init__(f'the loss became {value} at epoch {epoch}, step {step}')


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; `saved` says what is on disk to continue from."""

    def __init__(self, signum, saved):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.saved = saved


# ----------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag on a single line instead of the whole usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def _number(convert, accept, requirement, noun):
    """An argparse type: convert the text, then check it (finite floats only)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {noun}') from None
        if not (accept(value) and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f'must be {requirement}, got {text}')
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, 'a positive integer', 'an integer')
non_negative_int = _number(int, lambda v: v >= 0, 'zero or more', 'an integer')
positive_float = _number(float, lambda v: v > 0, 'a positive number', 'a number')
non_negative_float = _number(float, lambda v: v >= 0, 'zero or a positive number', 'a number')


def available_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(num_workers, world):
    """--num_workers, or by default the CPUs this process may use shared among this node's processes."""
    if num_workers is not None:
        return num_workers
    return max(1, available_cpus() // world.local_world_size)


def resume_command(argv, world=SINGLE):
    """The command line that continues an interrupted run: the same one with --resume auto."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == '--resume' and i + 1 < len(argv):
            argv[i + 1] = 'auto'
            break
        if arg.startswith('--resume='):
            argv[i] = '--resume=auto'
            break
    else:
        argv += ['--resume', 'auto']
    if not world.distributed:
        return shlex.join(['python'] + argv)
    if world.world_size == world.local_world_size:
        return shlex.join(['torchrun', f'--nproc_per_node={world.world_size}'] + argv)
    return 'torchrun <the same launcher flags> ' + shlex.join(argv)


def cli(main, parse_args):
    """Run a script as a command: a UserError becomes one line on stderr and exit status 2; SIGINT or
    SIGTERM ends the run with one line saying how to resume and status 128 + signal number. Under torchrun
    the lines name the rank, and what every rank meets alike is said by rank 0 alone."""
    args = parse_args()
    prog = os.path.basename(sys.argv[0])
    try:
        world = distributed.world_from_env(os.environ)
    except ValueError:
        world = SINGLE  # main() reports it
    where = f' (rank {world.rank} of {world.world_size})' if world.distributed else ''
    try:
        with signals_raise():
            main(args)
    except JobError as e:
        if world.main:
            print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    except UserError as e:
        print(f'{prog}{where}: error: {e}', file=sys.stderr)
        return 2
    except Interrupted as e:
        if world.main:
            print(f'{prog}: interrupted by {e}; {e.saved}; continue with: {resume_command(sys.argv, world)}',
                  file=sys.stderr)
        return 128 + e.signum
    except _Signal as e:
        if world.main:
            print(f'{prog}: interrupted by {signal.Signals(e.signum).name} before training started',
                  file=sys.stderr)
        return 128 + e.signum
    except RuntimeError as e:  # torch.distributed.DistError and Gloo's connection errors derive from it
        if not (world.distributed and _lost_peer(e)):
            raise
        print(f'{prog}{where}: error: lost contact with another process of the job, which has probably '
              f'failed (its own message says why): {str(e).splitlines()[0][:200]}', file=sys.stderr)
        return 1
    return 0


def _lost_peer(error):
    text = str(error).lower()
    return isinstance(error, torch.distributed.DistError) or any(
        word in text for word in ('connection closed', 'connection reset', 'broken pipe', 'timed out', 'gloo',
                                  'nccl'))


class _Signal(BaseException):
    """Raised by the signal handler; a BaseException so that no `except Exception` swallows it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _handling(handler):
    """`handler` for SIGINT and SIGTERM while the block runs; yields the handlers it replaced."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield previous
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _raise_signal(signum, frame):
    raise _Signal(signum)


def signals_raise():
    """Turn SIGINT and SIGTERM into a _Signal exception in the main thread while the block runs."""
    return _handling(_raise_signal)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM back while the block runs (so a set of files is written as a whole), then
    act on the first one that came as the handler before the block would have.

    The handlers, not the signal mask, do the holding: a process-wide signal may be delivered to any
    thread (Gloo's, the DataLoader's), and Python runs its handler in the main thread all the same, even
    inside a file write that torch.save makes.
    """
    held = []
    with _handling(lambda signum, frame: held.append(signum)) as previous:
        yield
    if held:
        handler = previous[held[0]]
        if callable(handler):
            handler(held[0], None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), held[0])


def ignore_signals_in_worker(worker_id):
    """DataLoader worker_init_fn: the main process alone handles SIGINT and SIGTERM and stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def interruptible(saved):
    """Within the block a signal becomes Interrupted(signum, saved()), `saved` describing what is on disk."""
    try:
        yield
    except _Signal as e:
        raise Interrupted(e.signum, saved()) from None


def add_run_flags(p, state):
    """The flags both scripts share: workers, device, seed, the speed settings and --resume."""
    p.add_argument('--num_workers', type=non_negative_int, default=None,
                   help='DataLoader worker processes of the pil path (default: the CPUs this process may '
                        'use, shared among the processes torchrun starts on this node)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--seed', type=non_negative_int, default=0, help='random seed')
    add_speed_flags(p)
    p.add_argument('--resume', default=None,
                   help=f"continue from a training state: its path, or 'auto' for {state} in --results_dir "
                        f"if there is one")


def restore(state, modules, optimizer, what, epochs, log):
    """Load a saved training state into `modules` ({key in the state: module}) and the optimizer and
    restore the random-number states; returns (the CSV rows so far, the epochs done)."""
    try:
        for key, module in modules.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state['optimizer'])
    except (KeyError, RuntimeError, ValueError) as e:
        raise JobError(f'--resume: the saved state does not fit this {what} ({str(e).splitlines()[0]})') from None
    set_rng_state(state['rng'])
    rows, done = list(state['rows']), state['epoch']
    log(f'resuming after epoch {done} of {epochs}' if done < epochs else
        f'the run is already complete ({done} epochs)', flush=True)
    return rows, done


# ----------------------------------------------------------------------------- speed settings

def add_speed_flags(p):
    p.add_argument('--aug', default='auto', choices=('auto',) + AUGMENTATIONS,
                   help="'batched': augment whole batches on the device; 'pil': per-image PIL transforms in "
                        "DataLoader workers (the reference path); auto = batched (the faster on both CPU and GPU)")
    p.add_argument('--amp', default='auto', choices=('auto', 'on', 'off'),
                   help='bf16 autocast for the forward pass; auto = on for CUDA, off on a CPU')
    p.add_argument('--channels_last', default='auto', choices=('auto', 'on', 'off'),
                   help='NHWC memory layout for the convolutions; auto = on for CUDA (the layout of '
                        "cuDNN's bf16 kernels), off on a CPU (-3%% to +11%% over four runs here: no steady gain)")
    p.add_argument('--compile', action='store_true', help='wrap the model in torch.compile')


@dataclass
class Speed:
    """How the training step runs; decided once from the flags and the device, then used everywhere."""
    device: torch.device
    aug: str
    amp: bool
    channels_last: bool
    compile: bool

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def layout(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def prepare(self, model, parallel=lambda m: m):
        """The module to train: the same parameters, in the chosen layout, wrapped by `parallel` (for
        DistributedDataParallel), compiled if asked."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        model = parallel(model)
        return torch.compile(model) if self.compile else model

    def wrap(self, fn):
        """fn under the same autocast and layout (for the kNN monitor's embedding pass)."""
        def run(x):
            with self.autocast():
                return fn(self.layout(x))
        return run

    def __str__(self):
        return (f'aug {self.aug}, amp {"bf16" if self.amp else "off"}, channels_last '
                f'{"on" if self.channels_last else "off"}, compile {"on" if self.compile else "off"}')


def resolve_speed(args, device):
    cuda = device.type == 'cuda'
    pick = lambda value, auto: auto if value == 'auto' else value == 'on'
    aug = 'batched' if args.aug == 'auto' else args.aug
    # bf16 autocast is slower by an order of magnitude on CPUs without native bf16 (AVX-512 BF16 or AMX)
    return Speed(device, aug, pick(args.amp, cuda), pick(args.channels_last, cuda), args.compile)


# ----------------------------------------------------------------------------- device and seeds

def resolve_device(name):
    """'auto' -> cuda when available, else cpu. Asking for CUDA where there is none is a UserError."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'--device {name!r} is not a device; use auto, cpu, cuda or cuda:N') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f'--device {name}: CUDA is not available on this machine (use --device cpu)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f'--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    elif device.type != 'cpu':
        raise UserError(f'--device {name!r} is not supported; use auto, cpu, cuda or cuda:N')
    return device


@contextlib.contextmanager
def processes(device_flag, environ):
    """(world, device) of this process for the duration of the block.

    Without torchrun: (SINGLE, the --device). Under torchrun (WORLD_SIZE etc. in `environ`): joins the
    process group (NCCL on CUDA, Gloo on CPU) and, on CUDA, uses the GPU of this process's LOCAL_RANK.
    """
    try:
        world = distributed.world_from_env(environ)
    except ValueError as e:
        raise UserError(str(e)) from None
    device = resolve_device(device_flag)
    if world.distributed and device.type == 'cuda':
        if device.index is not None:
            raise UserError(f'--device {device_flag}: under torchrun each process uses the GPU of its '
                            f'LOCAL_RANK; use --device cuda or auto')
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f'LOCAL_RANK {world.local_rank}, but this machine has {torch.cuda.device_count()} '
                            f'CUDA device(s): start at most that many processes per node')
        device = torch.device('cuda', world.local_rank)
    distributed.init(world, device)
    try:
        yield world, device
    finally:
        distributed.close(world)


def check_divisible(batch_size, world):
    """--batch_size is the global batch: each of the W processes takes batch_size / W per step."""
    if batch_size % world.world_size:
        raise JobError(f'--batch_size {batch_size} does not split evenly over {world.world_size} processes; '
                       f'use a multiple of {world.world_size}')


def derive_seed(*parts):
    """A 63-bit seed that is a fixed function of integers (seed, epoch, index, ...), SplitMix64 mixing."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h >> 1


def generator(*parts, device='cpu'):
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


# ----------------------------------------------------------------------------- datasets

@dataclass
class ImageSet:
    """A split of a dataset: uint8 images (N, 3, H, W), int64 labels (N,), and the class names."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list

    def __len__(self):
        return len(self.labels)


_CIFAR_FILES = {'cifar10': 'cifar-10-python.tar.gz', 'cifar100': 'cifar-100-python.tar.gz'}


def load_cifar(name, root, train):
    from torchvision.datasets import CIFAR10, CIFAR100
    cls = CIFAR10 if name == 'cifar10' else CIFAR100
    try:
        ds = cls(root, train=train, download=False)
    except RuntimeError:
        try:
            # torchvision skips the download when a verified archive is already in root.
            ds = cls(root, train=train, download=True)
        except (OSError, RuntimeError) as e:
            reason = str(getattr(e, 'reason', e)).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f'{name} is not in {root!r} and could not be downloaded ({reason}); on a machine with '
                f'internet fetch {cls.url} and put {_CIFAR_FILES[name]} in {os.path.abspath(root)}/') from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return ImageSet(images, labels, list(ds.classes))


def load_folder(root, train, classes=None):
    """An image folder `root/{train,test}/<class>/*`; images become RGB and are resized to 32x32."""
    split = os.path.join(root, 'train' if train else 'test')
    if not os.path.isdir(split):
        raise UserError(f'--dataset folder: {split!r} is not a directory (expected {root}/train/<class>/*'
                        f' and {root}/test/<class>/*)')
    found = sorted(d for d in os.listdir(split) if os.path.isdir(os.path.join(split, d)))
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f'{split!r} has classes that the training split lacks: {", ".join(unknown)}')
    images, labels = [], []
    for label, cls in enumerate(classes):
        folder = os.path.join(split, cls)
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            if not file.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(folder, file)
            try:
                with Image.open(path) as img:
                    img = img.convert('RGB').resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise UserError(f'cannot read image {path!r}: {e}') from None
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(label)
    if not images:
        raise UserError(f'--dataset folder: no images found under {split!r}')
    array = np.stack(images).transpose(0, 3, 1, 2)
    return ImageSet(torch.from_numpy(np.ascontiguousarray(array)), torch.tensor(labels), list(classes))


def load_dataset(name, root, train, classes=None):
    """Either split of cifar10, cifar100 or an image folder, as an ImageSet."""
    if name in ('cifar10', 'cifar100'):
        return load_cifar(name, root, train)
    if name == 'folder':
        if not os.path.isdir(root):
            raise UserError(f'--data_root {root!r} does not exist')
        return load_folder(root, train, classes)
    raise UserError(f'unknown dataset {name!r}; choose from {", ".join(DATASETS)}')


def load_splits(name, root):
    """(train, test) ImageSets of a dataset; the test split uses the training split's classes."""
    train = load_dataset(name, root, train=True)
    return train, load_dataset(name, root, train=False, classes=train.classes)


# ----------------------------------------------------------------------------- augmentation (PIL path)

def pretrain_transform(mean=MEAN, std=STD, size=IMAGE_SIZE):
    """The SimSiam CIFAR augmentation (paper Sec. 4 and App. D; no blur at 32x32)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def linear_transform(mean=MEAN, std=STD, size=IMAGE_SIZE):
    """Linear-evaluation training augmentation: random resized crop and flip."""
    return T.Compose([
        T.RandomResizedCrop(size),
        T.RandomHorizontalFlip(p=0.5),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class AugmentedViews(torch.utils.data.Dataset):
    """`views` independently augmented views of each image, plus its label (CIFAR10Pair for views=2).

    Items are addressed by (epoch, index): the randomness of an item is a fixed function of
    (seed, epoch, index), so it does not depend on the worker that draws it, on the number of workers,
    or on what ran before; an interrupted run resumed at an epoch boundary sees the same views.
    """

    def __init__(self, data, transform, seed, views=2):
        self.hwc = np.ascontiguousarray(data.images.permute(0, 2, 3, 1).numpy())
        self.labels = data.labels
        self.transform = transform
        self.seed = seed
        self.views = views

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        epoch, index = key
        img = Image.fromarray(self.hwc[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index))
            views = [self.transform(img) for _ in range(self.views)]
        return (*views, self.labels[index])


def epoch_batches(n, batch_size, seed, epoch, rank=0, world_size=1):
    """This process's index batches for one epoch: a shuffle that depends only on (seed, epoch).

    Incomplete final batches are dropped (a BN layer needs more than one sample). With world_size W,
    each global batch of `batch_size` is split into W consecutive slices and this rank takes its own.
    """
    order = torch.randperm(n, generator=generator(seed, epoch))
    local = batch_size // world_size
    steps = n // batch_size
    return [order[s * batch_size + rank * local: s * batch_size + (rank + 1) * local] for s in range(steps)]


class EpochBatchSampler:
    """A DataLoader batch_sampler over epoch_batches that yields (epoch, index) keys."""

    def __init__(self, n, batch_size, seed, epoch, rank=0, world_size=1):
        self.batches = epoch_batches(n, batch_size, seed, epoch, rank, world_size)
        self.epoch = epoch

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield [(self.epoch, int(i)) for i in batch]


class ViewSource:
    """Each epoch's batches of augmented views, already on the device, from one of two paths.

    'pil': the reference path, per-image PIL transforms (pretrain_transform or linear_transform) in
    DataLoader worker processes. 'batched': the whole uint8 dataset lives on the device and whole
    batches are augmented there (augment.pretrain_augment or augment.linear_augment) with a generator
    seeded by (seed, epoch, rank). Both iterate over epoch_batches, so they see the same images in the
    same order; only the augmentation randomness differs. Yields ([view, ...], labels).
    """

    def __init__(self, data, stage, aug, seed, device, num_workers=0, world=SINGLE):
        assert stage in ('pretrain', 'linear') and aug in AUGMENTATIONS
        self.views = 2 if stage == 'pretrain' else 1
        self.aug, self.seed, self.device = aug, seed, device
        self.num_workers, self.world = num_workers, world
        self.n = len(data)
        if aug == 'pil':
            transform = pretrain_transform() if stage == 'pretrain' else linear_transform()
            self.dataset = AugmentedViews(data, transform, seed, self.views)
        else:
            self.images = data.images.to(device)
            self.labels = data.labels.to(device)
            self.augment = augment.pretrain_augment if stage == 'pretrain' else augment.linear_augment

    def epoch(self, epoch, batch_size):
        """(iterable of ([views], labels), number of steps) for one epoch."""
        if self.aug == 'pil':
            sampler = EpochBatchSampler(self.n, batch_size, self.seed, epoch, self.world.rank,
                                        self.world.world_size)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                pin_memory=self.device.type == 'cuda', worker_init_fn=ignore_signals_in_worker)
            return self._from_loader(loader), len(loader)
        batches = epoch_batches(self.n, batch_size, self.seed, epoch, self.world.rank, self.world.world_size)
        if not batches:
            return iter(()), 0
        batches = torch.stack(batches).to(self.device)  # one copy per epoch, not one per step
        return self._batched(batches, generator(self.seed, epoch, self.world.rank, device=self.device)), len(batches)

    def _from_loader(self, loader):
        for *views, labels in loader:
            yield [v.to(self.device, non_blocking=True) for v in views], labels.to(self.device, non_blocking=True)

    def _batched(self, batches, gen):
        for index in batches:
            images = self.images[index]
            # all views of a batch in one call: per-image randomness makes them independent
            views = self.augment(images.repeat(self.views, 1, 1, 1), gen).chunk(self.views)
            yield list(views), self.labels[index]


# ----------------------------------------------------------------------------- kNN monitor

def knn_predict(feature, feature_bank, feature_labels, classes, k, t, chunk_size=1024):
    """Weighted kNN classification (Wu et al. 2018, InstDisc; used for monitoring in the SimSiam line).

    feature (B, D) and feature_bank (N, D) are L2-normalised; feature_labels (N,) int64.
    Each query takes its k most cosine-similar bank items, weights each vote by exp(sim / t), sums per
    class and returns the classes sorted by score, best first: (B, classes). Queries are processed in
    chunks so only a (chunk_size, N) similarity matrix is ever held.
    """
    bank = feature_bank.float()
    out = []
    for query in feature.float().split(chunk_size):
        sim = query @ bank.T  # BxN
        sim_weight, sim_index = sim.topk(k, dim=-1)  # Bxk
        sim_labels = feature_labels[sim_index]  # Bxk
        weight = (sim_weight / t).exp()  # Bxk
        scores = torch.zeros(query.size(0), classes, device=query.device, dtype=weight.dtype)
        scores.scatter_add_(1, sim_labels, weight)  # BxC
        out.append(scores.sort(dim=-1, descending=True, stable=True).indices)
    return torch.cat(out)


@torch.no_grad()
def embed(fn, images, batch_size, device, ranges=None, mean=MEAN, std=STD):
    """L2-normalised float32 features (N, D) of uint8 images under the test transform: of every image in
    batches of batch_size, or of the rows [start, stop) of each of `ranges`, in order."""
    if ranges is None:
        ranges = distributed.shard_chunks(len(images), batch_size, SINGLE)
    out = []
    for start, stop in ranges:
        x = normalize(images[start:stop].to(device, non_blocking=True), mean, std)
        out.append(F.normalize(fn(x).float(), dim=1))
    return torch.cat(out) if out else torch.empty(0, device=device)


def topk_correct(ranked, labels, ks=(1, 5)):
    """Number of rows whose label is among the first k ranked classes, for each k (k clipped to C)."""
    hits = ranked == labels.view(-1, 1)
    return [hits[:, :min(k, ranked.size(1))].any(dim=1).sum().item() for k in ks]


def knn_monitor(fn, bank, test, k, t, batch_size, device, world=SINGLE):
    """kNN top-1 and top-5 accuracy (%) of the test set against a bank of training images, and the
    features (bank (N, D), test (M, D)) it compared.

    fn maps a normalised batch to features; the caller puts the model in eval mode. The bank uses the
    test transform (one view), as do the queries. Under torchrun each process embeds its chunks of the
    bank and of the queries (distributed.shard_chunks), the bank is gathered, each process classifies its
    queries, and the hit counts are summed: the same numbers as one process computes.
    """
    bank_local = embed(fn, bank.images, batch_size, device, distributed.shard_chunks(len(bank), batch_size, world))
    bank_features = distributed.gather_chunks(bank_local, len(bank), batch_size, world)
    ranges = distributed.shard_chunks(len(test), batch_size, world)
    test_local = embed(fn, test.images, batch_size, device, ranges)
    hits = [0, 0]
    if ranges:
        labels = torch.cat([test.labels[start:stop] for start, stop in ranges]).to(device)
        ranked = knn_predict(test_local, bank_features, bank.labels.to(device), len(bank.classes), k, t)
        hits = topk_correct(ranked, labels)
    top1, top5 = distributed.all_sum(torch.tensor(hits, device=device), world).tolist()
    test_features = distributed.gather_chunks(test_local, len(test), batch_size, world)
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test), bank_features, test_features


def nearest(queries, bank, n):
    """Indices (Q, n) and cosine similarities (Q, n) of the n bank rows nearest each normalised query."""
    sim, index = (queries.float() @ bank.float().T).topk(min(n, len(bank)), dim=1)
    return index, sim


# ----------------------------------------------------------------------------- collapse monitor

# z_std_ratio under this is reported: a ratio r means the normalised outputs spread like those of a
# uniform distribution over r^2 of the d dimensions (0.2 -> 4%, some 80 of 2048); a collapsed run is at 0.
COLLAPSE_THRESHOLD = 0.2


def z_moments(z):
    """(2, D) float64: the sum and the sum of squares over the batch of z / ||z||_2, from which z_std of
    one batch, or of a batch split over processes (sum the moments first), follows."""
    zn = F.normalize(z.detach().float(), dim=1).double()
    return torch.stack([zn.sum(dim=0), (zn * zn).sum(dim=0)])


def z_std_from_moments(moments, n):
    """z_std of n rows from their z_moments (..., 2, D): the unbiased per-channel std, averaged over channels."""
    s1, s2 = moments[..., 0, :], moments[..., 1, :]
    return ((s2 - s1 * s1 / n) / (n - 1)).clamp(min=0).sqrt().mean(dim=-1)


def z_std(z):
    """Per-channel std over the batch of z / ||z||_2, averaged over channels (paper Sec. 4.1, Fig. 2):
    about 1/sqrt(d) for outputs spread over the unit sphere, 0 when every output is the same vector."""
    return z_std_from_moments(z_moments(z), len(z)).float()


# ----------------------------------------------------------------------------- schedule

def cosine_lr(init_lr, epoch, epochs):
    """lr for 0-based `epoch`: init_lr * (1 + cos(pi * epoch / epochs)) / 2 (paper Sec. 4, SGDR)."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


# ----------------------------------------------------------------------------- files

def check_writable(folder):
    """Create `folder` if needed and prove a file can be written in it, before any work starts."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix='.write-test-')
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f'--results_dir {folder!r} is not writable ({e.strerror or e})') from None


def _file_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_UMASK_MODE = _file_mode()  # the mode open() would give a new file


@contextlib.contextmanager
def atomic_open(path, mode='wb'):
    """Write to a temporary file beside `path`, flush and fsync it, then os.replace it into place.

    A crash at any instant leaves either the old file or the complete new one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        os.fchmod(fd, _UMASK_MODE)  # mkstemp makes files private (0600); results are for sharing
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_checkpoint(obj, path):
    with atomic_open(path, 'wb') as f:
        torch.save(obj, f)


def load_checkpoint(path, kinds, flag):
    """Load a checkpoint written by these scripts and check that its 'kind' is one of `kinds`.

    Anything else (missing, empty, truncated, not a torch file, another program's file) is a UserError.
    """
    if not os.path.isfile(path):
        raise UserError(f'{flag} {path!r} does not exist')
    if os.path.getsize(path) == 0:
        raise UserError(f'{flag} {path!r} is empty')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # torch raises many types for a damaged file
        raise UserError(f'{flag} {path!r} is not a checkpoint written by torch.save '
                        f'(it is truncated, damaged or another kind of file)') from None
    kind = ckpt.get('kind') if isinstance(ckpt, dict) else None
    if kind not in kinds:
        what = f'a {kind!r} file' if isinstance(kind, str) else 'not a file written by main.py or linear.py'
        keys = ', '.join(list(ckpt)[:5]) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f'{flag} {path!r} is {what} (top-level keys: {keys}); expected {" or ".join(kinds)}')
    return ckpt


def write_csv(rows, columns, path):
    """Write all rows (dicts) to `path` atomically, columns in the given order."""
    import pandas as pd
    with atomic_open(path, 'w') as f:
        pd.DataFrame(rows, columns=columns).to_csv(f, index=False)


# ----------------------------------------------------------------------------- resuming

def rng_state():
    """Every global random-number state: torch CPU and, where initialised, each CUDA device."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {'cpu': torch.get_rng_state(), 'cuda': cuda}


def set_rng_state(state):
    torch.set_rng_state(state['cpu'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'][:torch.cuda.device_count()])


# Arguments that may change when a run is resumed: they do not change what the run computes.
HARMLESS = frozenset({'num_workers', 'device', 'resume', 'data_root', 'results_dir', 'compile'})


def run_differences(saved, current, harmless=HARMLESS):
    """Arguments whose values differ between a saved run and this one, ignoring the harmless ones."""
    return [f'--{k} {saved[k]} (now {current[k]})' for k in sorted(saved)
            if k in current and k not in harmless and saved[k] != current[k]]


def find_state(args, state_path, kind, script):
    """The training state to continue, as `args.resume` asks, or None to start afresh.

    resume None: start afresh, but never over an existing run's state (that would lose it).
    'auto': continue from state_path if it exists. Anything else: the path of a state to continue from.
    A state whose run differs from `args` in more than the HARMLESS arguments is refused.
    """
    resume = args.resume
    if resume is None:
        if os.path.exists(state_path):
            name = os.path.basename(state_path)[:-len('_state.pth')]
            raise UserError(f'{state_path!r} already holds the state of a run named {name!r}; continue it '
                            f'with --resume auto, or pick another --name or --results_dir')
        return None
    if resume == 'auto':
        if not os.path.exists(state_path):
            print(f'--resume auto: no {state_path}, starting afresh', flush=True)
            return None
        resume = state_path
    state = load_checkpoint(resume, (kind,), '--resume')
    missing = [k for k in ('args', 'epoch', 'rows', 'rng') if k not in state]
    if missing:
        raise UserError(f'--resume {resume!r} lacks {", ".join(missing)}: not a state written by {script}')
    changed = run_differences(state['args'], vars(args))
    if changed:
        raise UserError(f'--resume: these arguments differ from the saved run: {"; ".join(changed)}')
    return state


# ----------------------------------------------------------------------------- run records

def run_record(args, device, extra):
    """What a run was: every argument, the library versions, the device and the code's git commit."""
    import platform
    import subprocess
    import torchvision
    versions = {'python': platform.python_version(), 'torch': torch.__version__,
                'torchvision': torchvision.__version__}
    for module in ('numpy', 'pandas', 'thop', 'tqdm', 'matplotlib', 'PIL'):
        try:
            versions[module] = getattr(__import__(module), '__version__', 'unknown')
        except ImportError:
            versions[module] = None
    if device.type == 'cuda':
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open('/proc/cpuinfo') as f:
                names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
            device_name = f'{names[0]} ({available_cpus()} CPUs available)' if names else device_name
    here = os.path.dirname(os.path.abspath(__file__))
    commit = dirty = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = lambda *a: subprocess.run(['git', '-C', here, *a], capture_output=True, text=True, timeout=10)
        head = git('rev-parse', 'HEAD')
        if head.returncode == 0:
            commit = head.stdout.strip()
            dirty = bool(git('status', '--porcelain', '--untracked-files=no').stdout.strip())
    return {'args': vars(args), **extra, 'device': str(device), 'device_name': device_name,
            'versions': versions, 'git_commit': commit, 'git_dirty': dirty,
            'command': ' '.join(sys.argv)}


def write_json(obj, path):
    import json
    with atomic_open(path, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write('\n')
