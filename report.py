"""The results table of every run in a folder, in the seed's format, and their curves in one picture.

    python report.py results

Finds every pretraining run (`<name>_statistics.csv`) and linear evaluation (`<name>_linear_statistics.csv`,
or the seed's `linear_statistics.csv`: a log with training accuracy columns is an evaluation) in the folder
and writes, from the CSVs and the `<name>_args.json` records (nothing is retrained), `report.md` (printed
too): one row per run, Evaluation Protocol (KNN for a pretraining run, Linear for an evaluation), Params
(M), FLOPs (G), Feature Dim, Batch Size, Epoch Num, K, Top1 Acc %, Top5 Acc %, then the ablation switches
that differ from SimSiam's; and `report.png`: kNN top-1, train loss and z_std_ratio against epoch, one line
per pretraining run. Runs still in progress, folders with linear runs only and the seed's CSVs are read as
they are; what a file does not say is '-', and the switches of a run without its record are 'unknown'. A run
that a non-finite loss stopped shows its epochs as 'N of M (stopped: why)'.
"""
import glob
import json
import math
import os
import sys

import pandas as pd
import torch

import cli
import files
import plot
from errors import UserError
from model import ABLATIONS, ModelConfig, SimSiam, count_model
from probe import LR_GRID, PROBE_NORM
from utils import IMAGE_SIZE

HEADER = ['Evaluation Protocol', 'Params (M)', 'FLOPs (G)', 'Feature Dim', 'Batch Size', 'Epoch Num', 'K',
          'Top1 Acc %', 'Top5 Acc %']


def parse_args(argv=None):
    p = cli.Parser(description='The results table and curves of every run in a results folder.')
    p.add_argument('results_dir', help='a folder written by main.py and linear.py (their --results_dir)')
    return p.parse_args(argv)


def read_json(path):
    """A run record, or {} when there is none (a seed-style log) or it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def find_logs(folder):
    """{stem: CSV} of every `<stem>_statistics.csv` in `folder`: a pretraining run's (stem `<name>`) or a linear
    evaluation's (`<name>_linear`; the seed's is plain `linear`), told apart later by their columns."""
    return {os.path.basename(path)[:-len('_statistics.csv')]: path
            for path in sorted(glob.glob(os.path.join(glob.escape(folder), '*_statistics.csv')))}


def read_log(path):
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {path!r} as a CSV log ({e})') from None
    if 'epoch' not in df or 'test_acc@1' not in df:
        raise UserError(f'{path!r} has no epoch and test_acc@1 columns: not a log of these scripts')
    return df


_COUNTS = {}


def counts(settings, classes):
    """The model sizes of a run: from its record if it has them, else counted from its settings."""
    key = json.dumps([settings, classes], sort_keys=True)
    if key not in _COUNTS:
        torch.manual_seed(0)
        _COUNTS[key] = count_model(SimSiam(ModelConfig.from_settings(settings)), classes,
                                   settings.get('image_size') or IMAGE_SIZE, torch.device('cpu'))
    return _COUNTS[key]


UNKNOWN = ['unknown (no <name>_args.json)']  # the switches of a run without its record


def switches(settings):
    """The ablation switches of a run's settings that are not SimSiam's, as flags."""
    if not settings:
        return UNKNOWN
    changed = [f'--{flag} {settings[flag]}' for flag, default in ABLATIONS.items()
               if settings.get(flag, default) != default]
    return changed + (['--fix_pred_lr'] if settings.get('fix_pred_lr') else [])


def number(value, digits=2):
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'


def epochs_done(df, record):
    """The epochs in the log, of the planned ones if it is short of them, and why the run stopped if it did."""
    done = int(df['epoch'].iloc[-1]) if len(df) else 0
    planned = record.get('args', {}).get('epochs')
    text = str(done) if planned in (None, done) else f'{done} of {planned}'
    return f'{text} (stopped: {record["stopped"]})' if record.get('stopped') else text


def last_measured(df):
    measured = df[df['test_acc@1'].notna()]
    return (None, None) if measured.empty else (float(measured['test_acc@1'].iloc[-1]),
                                                float(measured['test_acc@5'].iloc[-1]))


def pretrain_row(name, df, record):
    settings = record.get('args', {})
    sizes = record.get('counts') or (counts(settings, len(record.get('classes', [])) or 10) if settings else {})
    top1, top5 = last_measured(df)
    return {'run': name, 'Evaluation Protocol': 'KNN', 'Params (M)': number(sizes.get('simsiam_params_M')),
            'FLOPs (G)': number(sizes.get('simsiam_flops_G')), 'Feature Dim': settings.get('feature_dim', '-'),
            'Batch Size': settings.get('batch_size', '-'), 'Epoch Num': epochs_done(df, record),
            'K': settings.get('k', '-'), 'Top1 Acc %': number(top1, 1), 'Top5 Acc %': number(top5, 1),
            'switches': switches(settings)}


def probe_settings(settings):
    """linear.py's own settings that are not its defaults: the probe and the learning rates."""
    defaults = {'probe_norm': PROBE_NORM, 'lr': LR_GRID}
    return [f'--{flag} {",".join(f"{v:g}" for v in value) if isinstance(value, list) else value}'
            for flag in ('probe_norm', 'lr') for value in [settings.get(flag, defaults[flag])]
            if value != defaults[flag]]


def linear_row(stem, df, record):
    settings = record.get('args', {})
    pretrained = record.get('pretrained', {}).get('args', {})
    classes = len(record.get('classes', [])) or 10
    sizes = counts(pretrained, classes) if pretrained else {}
    top1, top5 = last_measured(df)
    epoch, planned = record.get('pretrained', {}).get('epoch'), pretrained.get('epochs')
    if epoch is not None and planned is not None and epoch < planned:  # a run in progress, evaluated from its state
        stem = f'{stem} (of pretraining epoch {epoch} of {planned})'
    return {'run': stem, 'Evaluation Protocol': 'Linear',
            'Params (M)': number(sizes.get('linear_params_M')), 'FLOPs (G)': number(sizes.get('flops_G')),
            'Feature Dim': '-', 'Batch Size': settings.get('batch_size', '-'), 'Epoch Num': epochs_done(df, record),
            'K': '-', 'Top1 Acc %': number(top1, 1), 'Top5 Acc %': number(top5, 1),
            'switches': switches(pretrained) + (probe_settings(settings) if settings else [])}


def markdown(rows):
    """The seed's table, a column for the run's name first, its ablation switches last."""
    header = ['Run'] + HEADER + ['Switches']
    lines = ['| ' + ' | '.join(header) + ' |', '| ' + ' | '.join('---' for _ in header) + ' |']
    for row in rows:
        cells = [row['run']] + [str(row[h]) for h in HEADER] + [' '.join(row['switches']) or '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def report(folder):
    """(the Markdown table, the rows, {name: pretraining log}) of the runs in `folder`."""
    if not os.path.isdir(folder):
        raise UserError(f'{folder!r} is not a folder')
    found = find_logs(folder)
    if not found:
        raise UserError(f'{folder!r} holds no run: no <name>_statistics.csv or '
                        f'<name>_linear_statistics.csv in it')
    rows, evaluations, logs = [], [], {}
    for stem, path in found.items():
        df, record = read_log(path), read_json(os.path.join(folder, f'{stem}_args.json'))
        if plot.is_evaluation(df):
            evaluations.append(linear_row(stem, df, record))
        else:
            logs[stem] = df
            rows.append(pretrain_row(stem, df, record))
    rows += evaluations
    return markdown(rows), rows, logs


def main(args):
    table, rows, logs = report(args.results_dir)
    try:
        with files.atomic_open(os.path.join(args.results_dir, 'report.md'), 'w') as f:
            f.write(table)
        if logs:
            plot.plot_runs(logs, os.path.join(args.results_dir, 'report.png'))
    except OSError as e:
        raise UserError(f'cannot write the report in {args.results_dir!r} ({e.strerror or e})') from None
    print(table, end='')
    written = 'report.md' + (' and report.png' if logs else '')
    print(f'{len(rows)} run(s); {written} in {args.results_dir}')


if __name__ == '__main__':
    sys.exit(cli.cli(main, parse_args))
