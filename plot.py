"""Pictures of a run: the training curves of a CSV log, and nearest-neighbour panels.

    python plot.py results/<name>_statistics.csv [more.csv ...]

writes <name>_statistics.png beside each CSV. A pretraining log (also one of the seed repository, with
only epoch, train_loss, test_acc@1, test_acc@5) and a linear-evaluation log are told apart by their columns.
"""
import math
import os
import sys
import threading
import time

import matplotlib

matplotlib.use('Agg')  # files only, no display
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402  (not pyplot: figures drawn on a painter thread)

import files  # noqa: E402
import cli  # noqa: E402
from errors import UserError  # noqa: E402
from monitor import COLLAPSE_THRESHOLD  # noqa: E402

FIGSIZE = (12, 7.5)  # inches
DPI = 100  # so a curve figure is 1200 x 750 pixels
NEIGHBOURS = 8  # query images and neighbours per query in the neighbour panel


REDRAW_EVERY_S = 30  # the statistics picture of a run is redrawn at most this often (and after the last epoch)


def _save(fig, path):
    with files.atomic_open(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=DPI)


class Painter:
    """Redraws a picture off the training thread, at most every `every` seconds.

    post(draw) hands over the newest drawing (a function of no arguments); it is drawn on a thread of its
    own when the previous one is done and `every` seconds have passed since it began, else kept until
    then, newer ones replacing it. flush() draws the newest one not yet drawn and waits for it. A drawing
    that fails (a full disk) gives one warning and the run goes on: pictures can always be redrawn from
    the CSV with plot.py.
    """

    def __init__(self, every=REDRAW_EVERY_S, warn=lambda message: print(message, file=sys.stderr, flush=True)):
        self.every, self.warn = every, warn
        self._pending, self._thread, self._started, self._warned = None, None, -float('inf'), False

    def post(self, draw):
        self._pending = draw
        if (self._thread is None or not self._thread.is_alive()) and time.monotonic() - self._started >= self.every:
            self._start()

    def flush(self):
        """Draw the newest drawing not yet drawn, and wait for it."""
        self.stop()
        if self._pending is not None:
            self._start()
            self.stop()

    def stop(self):
        """Wait for the drawing in progress (a thread left drawing while the interpreter exits can abort it)."""
        if self._thread is not None:
            self._thread.join()

    def now(self, draw):
        """Draw `draw` on this thread, after the drawing in progress, a failure warned of as any other."""
        self.stop()
        self._draw(draw)

    def _start(self):
        draw, self._pending, self._started = self._pending, None, time.monotonic()
        self._thread = threading.Thread(target=self._draw, args=(draw,), name='painter', daemon=True)
        self._thread.start()

    def _draw(self, draw):
        try:
            draw()
        except Exception as e:  # noqa: B902 (a picture, however it fails, must not stop the run)
            if not self._warned:
                self._warned = True
                self.warn(f'warning: could not draw a picture ({type(e).__name__}: {e}); the run goes on, and '
                          f'plot.py redraws the statistics from the CSV')


def _panel(ax, df, columns, title, ylabel=None):
    drawn = False
    for column, label in columns:
        if column in df and df[column].notna().any():
            rows = df[df[column].notna()]
            ax.plot(rows['epoch'], rows[column], marker='.' if len(rows) < 50 else None, label=label)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel('epoch')
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc='best', fontsize='small')
    else:
        ax.text(0.5, 0.5, 'not in this log', ha='center', va='center', transform=ax.transAxes, color='grey')


def plot_pretrain(df, path, title=''):
    """Train loss, kNN accuracy, z_std_ratio and lr against epoch."""
    fig = Figure(figsize=FIGSIZE)
    axes = fig.subplots(2, 2)
    _panel(axes[0, 0], df, [('train_loss', 'train loss')], 'SimSiam loss (minimum -1)')
    _panel(axes[0, 1], df, [('test_acc@1', 'top-1'), ('test_acc@5', 'top-5')], 'kNN monitor accuracy', '%')
    _panel(axes[1, 0], df, [('z_std_ratio', 'std(z/|z|) x sqrt(d)')], 'collapse monitor (1 healthy, 0 collapsed)')
    if 'z_std_ratio' in df:
        axes[1, 0].axhline(COLLAPSE_THRESHOLD, color='red', lw=0.8, ls='--', label='warning threshold')
        axes[1, 0].set_ylim(bottom=0)
        axes[1, 0].legend(loc='best', fontsize='small')
    _panel(axes[1, 1], df, [('lr', 'encoder lr')], 'learning rate')
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_linear(df, path, title=''):
    """Train and test loss and accuracy of a linear evaluation against epoch."""
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] / 1.5))
    axes = fig.subplots(1, 2)
    _panel(axes[0], df, [('train_loss', 'train'), ('test_loss', 'test')], 'cross-entropy loss')
    _panel(axes[1], df, [('train_acc@1', 'train top-1'), ('test_acc@1', 'test top-1'),
                         ('test_acc@5', 'test top-5')], 'linear classifier accuracy', '%')
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_runs(logs, path):
    """Several pretraining runs in one figure ({name: log}): kNN top-1, train loss and z_std_ratio against
    epoch, one line per run (the paper's Fig. 2, for whatever runs there are)."""
    fig = Figure(figsize=(FIGSIZE[0] * 1.25, FIGSIZE[1] / 1.5))
    axes = fig.subplots(1, 3)
    for ax, (column, title) in zip(axes, (('test_acc@1', 'kNN top-1 accuracy (%)'), ('train_loss', 'train loss'),
                                          ('z_std_ratio', 'z_std_ratio (1 healthy, 0 collapsed)'))):
        for name, df in logs.items():
            if column in df and df[column].notna().any():
                rows = df[df[column].notna()]
                ax.plot(rows['epoch'], rows[column], marker='.' if len(rows) < 50 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    axes[2].axhline(COLLAPSE_THRESHOLD, color='red', lw=0.8, ls='--', label='warning threshold')
    axes[2].set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        more, names = ax.get_legend_handles_labels()
        handles += [h for h, n in zip(more, names) if n not in labels]
        labels += [n for n in names if n not in labels]
    fig.legend(handles, labels, loc='lower center', ncol=min(4, len(labels)), fontsize='small')
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 4), 1, 1))
    _save(fig, path)


def is_evaluation(df):
    """Whether a log is a linear evaluation's (it has training accuracy columns; also the seed's) rather than a
    pretraining run's."""
    return 'train_acc@1' in df


def plot_statistics(df, path, title=''):
    """The statistics picture of a log, a pretraining run's or a linear evaluation's, told by its columns."""
    (plot_linear if is_evaluation(df) else plot_pretrain)(df, path, title)


def plot_csv(csv_path, png_path=None):
    """Redraw the plot of a pretraining or linear-evaluation CSV; returns the PNG path."""
    try:
        df = pd.read_csv(csv_path)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {csv_path!r} as a CSV log ({e})') from None
    if 'epoch' not in df or 'train_loss' not in df:
        raise UserError(f'{csv_path!r} has no epoch and train_loss columns: not a log of these scripts')
    png_path = png_path or os.path.splitext(csv_path)[0] + '.png'
    title = os.path.basename(os.path.splitext(csv_path)[0])
    plot_statistics(df, png_path, title)
    return png_path


def plot_neighbours(queries, neighbours, query_labels, neighbour_labels, similarity, classes, path):
    """A grid: each row a test image and its nearest training images, with class names and similarity.

    queries (Q, 3, H, W) and neighbours (Q, K, 3, H, W) uint8, labels (Q,) and (Q, K), similarity (Q, K).
    Drawn as one mosaic image (one axes, not Q x (K + 1)), which keeps it quick.
    """
    q, k, _, h, w = neighbours.shape
    pad, band, gap = 4, 12, 10  # mosaic pixels: between tiles, above each tile for its label, after the query
    tile_w, tile_h = w + pad, h + band
    mosaic = np.full((q * tile_h, (k + 1) * tile_w + gap, 3), 255, dtype=np.uint8)
    fig = Figure(figsize=(11.7, 11.6))
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.94))
    for i in range(q):
        for j in range(k + 1):
            x0, y0 = j * tile_w + (gap if j else 0), i * tile_h + band
            image = queries[i] if j == 0 else neighbours[i, j - 1]
            mosaic[y0:y0 + h, x0:x0 + w] = image.permute(1, 2, 0).numpy()
            if j == 0:
                label, colour = f'test: {classes[query_labels[i]]}', 'black'
            else:
                label = f'{classes[neighbour_labels[i, j - 1]]} {similarity[i, j - 1]:.2f}'
                colour = 'green' if neighbour_labels[i, j - 1] == query_labels[i] else 'red'
            ax.text(x0 + w / 2, y0 - 1.5, label, ha='center', va='bottom', fontsize=7, color=colour)
    ax.imshow(mosaic, interpolation='nearest')
    ax.set_axis_off()
    fig.suptitle('test images (left) and their nearest training images under the kNN monitor\'s features '
                 '(cosine similarity; green: same class)', fontsize=9)
    _save(fig, path)


def parse_args(argv=None):
    p = cli.Parser(description='Redraw the picture of pretraining or linear-evaluation CSV logs (<name>.png '
                               'beside each <name>.csv).')
    p.add_argument('csv', nargs='+', help='a <name>_statistics.csv or <name>_linear_statistics.csv')
    return p.parse_args(argv)


def main(args):
    for path in args.csv:
        if not os.path.isfile(path):
            raise UserError(f'{path!r} does not exist')
        print(f'{path} -> {plot_csv(path)}')


if __name__ == '__main__':
    sys.exit(cli.cli(main, parse_args))
