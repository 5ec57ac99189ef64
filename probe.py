"""Linear probing of frozen features: the probe head, one epoch of a set of heads trained on one pass of
the backbone (train, test, divergence checked on the device), and `ProbeGrid`, a grid of base lrs with their
optimizers, cosine schedules, divergence and the choice on the validation split. One lr is a grid of one."""
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import distributed
import optim
from distributed import SINGLE
from errors import NonFiniteLoss, first_non_finite

PROBE_NORMS = ('bn', 'none')
PROBE_NORM = 'bn'  # the default probe (docs/linear.md: why)
# The default grid of base lrs, half a decade apart: the seed's 30 for a plain head on raw features, and
# the 0.01-0.1 where a BN probe on 512-d features trained best here (docs/linear.md).
LR_GRID = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]


class Probe(nn.Linear):
    """The linear classifier of linear evaluation, on frozen features.

    norm 'bn' puts a BatchNorm without affine parameters in front of it (as MAE's linear probing does):
    the features are centred and scaled by their running statistics, so the same lr works whatever their
    scale, and at test time it is still one linear map. The features are frozen, so their statistics do not
    drift: the running statistics are the plain average over every batch seen (momentum None), not an
    exponential one that lags behind for its first few dozen steps. norm 'none' is the plain Linear of the
    seed. Initialised as the official code does: weights N(0, 0.01), biases 0.
    """

    def __init__(self, dim, classes, norm='bn'):
        super().__init__(dim, classes)
        self.weight.data.normal_(mean=0.0, std=0.01)
        self.bias.data.zero_()
        self.norm = nn.BatchNorm1d(dim, affine=False, momentum=None) if norm == 'bn' else nn.Identity()

    def forward(self, x):
        return super().forward(self.norm(x))  # NxD -> NxC


def accuracy_counts(logits, labels):
    """Top-1 and top-5 hits of a batch, on the device: (2,) int64."""
    top5 = logits.topk(min(5, logits.size(1)), dim=1).indices == labels.view(-1, 1)
    return torch.stack([top5[:, 0].sum(), top5.any(dim=1).sum()])


def train_epoch(features, heads, batches, optimizers, epoch, live=None, world=SINGLE, check_every=10,
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
def test_epoch(features, heads, batches, live=None, world=SINGLE):
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
        except NonFiniteLoss as e:
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


def head_name(lr):
    return f'lr={lr:g}'


class ProbeGrid:
    """One Probe per base lr in `lrs`, all fed by the same pass of the frozen backbone, each with its own SGD
    or LARS (`optimizer`; lr x batch_size / 256, momentum, no weight decay) and cosine schedule, so that each
    computes exactly what a run with its lr alone would; every head starts from the same seed.

    A head whose training, validation or test loss is not finite stops alone, with one line, while the
    others go on; when none is left, the run stops as a single head's does (its NonFiniteLoss is raised).
    A head whose training loss blows up gets one warning. `dead` ({head: why it stopped}) and `warned` are
    part of its state_dict, with the heads and optimizers.
    """

    def __init__(self, dim, classes, lrs, norm, batch_size, momentum, seed, device, world=SINGLE,
                 log=lambda *a, **kw: None, optimizer='sgd'):
        self.lrs, self.classes, self.world, self.log = list(lrs), classes, world, log
        self.heads = nn.ModuleList()
        for _ in self.lrs:  # every head starts where a run with its lr alone would
            torch.manual_seed(seed)
            self.heads.append(Probe(dim, classes, norm))
        self.heads = self.heads.to(device)
        if world.distributed:
            self.heads = distributed.sync_batchnorm(self.heads, device)  # the probe's BN sees the global batch
        self.init_lrs = [optim.scaled_lr(lr, batch_size) for lr in self.lrs]
        make = optim.lars if optimizer == 'lars' else optim.sgd
        self.optimizers = [make(h.parameters(), init, momentum, 0.0) for h, init in zip(self.heads, self.init_lrs)]
        self.trained = [distributed.data_parallel(h, world, device) for h in self.heads]  # gradients averaged
        self.dead, self.warned = {}, []

    @property
    def live(self):
        return [i for i in range(len(self.heads)) if i not in self.dead]

    def set_epoch(self, epoch, epochs):
        """Every head's lr for `epoch` of `epochs` (cosine decay); returns them."""
        lrs = [optim.cosine_lr(init, epoch - 1, epochs) for init in self.init_lrs]
        for optimizer, lr in zip(self.optimizers, lrs):
            optim.set_lr(optimizer, lr, lr)
        return lrs

    def train_epoch(self, features, batches, epoch, bar=None):
        """One pass of every live head over batches of ([x], y): [(loss, acc@1, acc@5) or None, per head]."""
        live = self.live
        results, diverged = train_epoch(features, self.trained, batches, self.optimizers, epoch, live, self.world,
                                        bar=bar)
        self._stop(diverged, live)
        return results

    def evaluate(self, features, batches):
        """[(loss, acc@1, acc@5) or None, per head] of the live heads on batches of ([x], y)."""
        return test_epoch(features, self.heads, batches, self.live, self.world)

    def check(self, epoch, evaluations):
        """Stop the heads whose loss in any of `evaluations` ({'test': results, ...}) is not finite: a last step
        can leave a head whose logits overflow, and it must not be the one chosen."""
        live = self.live
        self._stop({i: NonFiniteLoss(epoch, None, results[i][0], what) for i in live
                    for what, results in evaluations.items() if results and not math.isfinite(results[i][0])}, live)

    def warn_blowing_up(self, trains, epoch):
        """One warning for each head whose training loss is far above that of a uniform guess."""
        for i in self.live:
            if i not in self.warned and blowing_up(trains[i][0], self.classes):
                self.warned.append(i)
                self.log(f'warning: linear head {head_name(self.lrs[i])}: training loss {trains[i][0]:.1f} after '
                         f'epoch {epoch} is far above ln({self.classes}) = {math.log(self.classes):.2f}, the loss '
                         f'of a uniform guess: its logits are blowing up (try a lower --lr, or --probe_norm bn)',
                         file=sys.stderr, flush=True)

    def choose(self, vals):
        """The head to report: the best on validation acc@1 among the live ones, or the first live one
        without a validation split."""
        live = self.live
        return select_head({i: vals[i][1] for i in live}, live) if vals else live[0]

    def _stop(self, diverged, live):
        for i, e in diverged.items():
            self.dead[i] = str(e)
            if len(diverged) < len(live):
                self.log(f'linear.py: head {head_name(self.lrs[i])} diverged: {e}; it stops, the other heads go on',
                         file=sys.stderr, flush=True)
        if diverged and len(diverged) == len(live):
            raise diverged[max(diverged)]

    def state_dict(self):
        return {'heads': self.heads.state_dict(), 'optimizers': [o.state_dict() for o in self.optimizers],
                'dead': dict(self.dead), 'warned': list(self.warned)}

    def load_state_dict(self, saved):
        if len(saved['optimizers']) != len(self.optimizers):
            raise ValueError(f'{len(saved["optimizers"])} heads saved, {len(self.optimizers)} here')
        self.heads.load_state_dict(saved['heads'])
        for optimizer, one in zip(self.optimizers, saved['optimizers']):
            optimizer.load_state_dict(one)
        self.dead, self.warned = dict(saved['dead']), list(saved['warned'])


def saved_probe(state):
    """The ProbeGrid state_dict in a linear.py state; states written before the grid was one object kept a
    single lr's head and optimizer, or a grid's, at the top level."""
    if 'probe' in state or 'optimizer' not in state:
        return state.get('probe')
    single = 'head' in state
    return {'heads': {f'0.{k}': v for k, v in state['head'].items()} if single else state['heads'],
            'optimizers': [state['optimizer']] if single else state['optimizer'],
            'dead': state.get('dead', {}), 'warned': state.get('warned', [])}
