"""Export a pretrained backbone for torchvision, timm or detectron2.

    python export.py results/<name>_model.pth --format torchvision
    python export.py results/<name>_linear_model.pth --format timm --out resnet18_simsiam.pth
    python export.py results/<name>_model.pth --format detectron2 --with_heads

Reads a main.py model file or state (`<name>_model.pth`, `<name>_state.pth`) or a linear.py model file
(`<name>_linear_model.pth`, then the linear head too) and writes, beside it unless --out says otherwise:

- torchvision, timm: `<name>_<format>.pth`, a dict whose 'state_dict' loads with strict=True into
  torchvision.models.resnet18/34/50 (timm's resnet18/34/50 use the same names): its fc is the linear head
  when one was trained (the BN probe folded into it: at test time it is one linear map), absent otherwise
  (set the model's fc to nn.Identity()). A CIFAR-stem backbone needs conv1 and maxpool set as README shows.
- detectron2: `<name>_detectron2.pkl`, the pickle detectron2's checkpointer reads for torchvision-style
  ResNets ({'model': numpy arrays under detectron2's names, '__author__', 'matching_heuristics': True});
  with RESNETS.STRIDE_IN_1X1 False and the pixel mean and std of torchvision in 0-255 RGB.

--with_heads adds the projector and predictor, under 'simsiam_projector' and 'simsiam_predictor'. Every file
says where it came from under 'simsiam': the run, the epoch, the arch, the stem and the accuracy if known.
"""
import os
import pickle
import sys

import pandas as pd
import torch

import cli
import files
from errors import UserError
from model import ModelConfig, checkpoint_weights

FORMATS = ('torchvision', 'timm', 'detectron2')
SOURCES = ('simsiam_model', 'simsiam_state', 'simsiam_linear')
SUFFIXES = {'simsiam_model': '_model.pth', 'simsiam_state': '_state.pth', 'simsiam_linear': '_linear_model.pth'}
BN_EPS = 1e-5  # the probe's BatchNorm1d


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument('checkpoint', help='a <name>_model.pth or <name>_state.pth of main.py, or a '
                                      '<name>_linear_model.pth of linear.py')
    p.add_argument('--format', required=True, choices=FORMATS, help='whose names and layout to write')
    p.add_argument('--out', default=None,
                   help='the file to write (default: <name>_<format>.pth, or .pkl for detectron2, beside the input)')
    p.add_argument('--with_heads', action='store_true', help='write the projector and predictor too')
    p.add_argument('--force', action='store_true', help='replace --out if it exists')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- what the checkpoint holds

def read_source(path):
    """The checkpoint at `path`, refused in one line unless it is one of this project's with a backbone."""
    ckpt = files.load_checkpoint(path, SOURCES, 'checkpoint')
    try:
        config = ModelConfig.from_dict(ckpt['model_args'])
        weights = ckpt['backbone'] if ckpt['kind'] == 'simsiam_linear' else checkpoint_weights(ckpt)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f'checkpoint {path!r} does not describe a SimSiam model ({e})') from None
    return ckpt, config, weights


def split_weights(ckpt, weights):
    """(backbone, {part: weights}) of a checkpoint: a linear.py model file holds the backbone alone (its keys
    unprefixed), a main.py file the whole SimSiam model ('backbone.', 'projector.', 'predictor.')."""
    if ckpt['kind'] == 'simsiam_linear':
        return dict(weights), {}
    parts = {'backbone': {}, 'projector': {}, 'predictor': {}}
    for key, value in weights.items():
        part, _, rest = key.partition('.')
        parts.setdefault(part, {})[rest] = value
    return parts.pop('backbone'), parts


def folded_head(head):
    """The linear head as one nn.Linear's (weight, bias): the BN probe's normalisation by its running
    statistics (no affine part) folded into the weights, as it acts at test time."""
    weight, bias = head['weight'].double(), head['bias'].double()
    if 'norm.running_mean' in head:
        scale = (head['norm.running_var'].double() + BN_EPS).rsqrt()
        bias = bias - weight @ (head['norm.running_mean'].double() * scale)
        weight = weight * scale
    return weight.to(head['weight'].dtype), bias.to(head['bias'].dtype)


def run_prefix(path, ckpt):
    """`path` without the suffix its kind of file has (results/<name> of results/<name>_model.pth), or None."""
    suffix = SUFFIXES[ckpt['kind']]
    return path[:-len(suffix)] if path.endswith(suffix) else None


def accuracy(path, ckpt):
    """{'knn_acc@1'|'linear_acc@1': value} of the checkpoint's epoch where its run's log says it, else {}."""
    key = 'linear_acc@1' if ckpt['kind'] == 'simsiam_linear' else 'knn_acc@1'
    rows = ckpt.get('rows')
    if rows is None:
        prefix = run_prefix(path, ckpt)
        log = prefix and prefix + ('_linear_statistics.csv' if ckpt['kind'] == 'simsiam_linear' else '_statistics.csv')
        try:
            rows = pd.read_csv(log).to_dict('records') if log and os.path.isfile(log) else []
        except (OSError, ValueError, pd.errors.ParserError):
            rows = []
    for row in rows:
        value = row.get('test_acc@1')
        if row.get('epoch') == ckpt.get('epoch') and value is not None and value == value:  # not NaN
            return {key: float(value)}
    return {}


def provenance(path, ckpt, config, fmt):
    """Where the exported weights came from."""
    prefix = run_prefix(path, ckpt)
    record = {'source': os.path.abspath(path), 'kind': ckpt['kind'],
              'run': os.path.basename(prefix or path), 'epoch': ckpt.get('epoch'),
              'arch': config.arch, 'stem': config.stem, 'model_args': config.to_dict(), 'format': fmt,
              **accuracy(path, ckpt)}
    if ckpt['kind'] == 'simsiam_linear':
        record.update(classes=ckpt.get('classes'), pretrained_epoch=ckpt.get('pretrained_epoch'),
                      head_lr=ckpt.get('head_lr'))
    return record


# ----------------------------------------------------------------------------- the formats

def detectron2_name(key):
    """detectron2's name for a torchvision ResNet key: conv1/bn1 are the stem, layerN is res(N+1), bnK is
    convK's norm, and the downsample pair is the shortcut and its norm."""
    head, _, rest = key.partition('.')
    if head in ('conv1', 'bn1'):
        return 'stem.' + {'conv1': 'conv1', 'bn1': 'conv1.norm'}[head] + '.' + rest
    if not head.startswith('layer'):
        raise ValueError(f'no detectron2 name for {key!r}')
    block, _, rest = rest.partition('.')
    module, _, tensor = rest.partition('.')
    if module == 'downsample':
        index, _, tensor = tensor.partition('.')
        module = {'0': 'shortcut', '1': 'shortcut.norm'}[index]
    elif module.startswith('bn'):
        module = f'conv{module[2:]}.norm'
    return f'res{int(head[5:]) + 1}.{block}.{module}.{tensor}'


def numpy_arrays(weights):
    return {k: v.detach().cpu().numpy() for k, v in weights.items()}


def exported(fmt, backbone, heads, fc, record):
    """The object to write in `fmt`."""
    if fmt == 'detectron2':
        model = {detectron2_name(k): v.detach().cpu().numpy() for k, v in backbone.items()
                 if not k.endswith('num_batches_tracked')}  # detectron2's norms keep no count
        out = {'model': model, '__author__': 'SimSiam', 'matching_heuristics': True, 'simsiam': record}
        out.update({f'simsiam_{part}': numpy_arrays(w) for part, w in heads.items()})
        return out
    state_dict = dict(backbone)
    if fc is not None:
        state_dict['fc.weight'], state_dict['fc.bias'] = fc
    out = {'state_dict': state_dict, 'simsiam': record}
    out.update({f'simsiam_{part}': dict(w) for part, w in heads.items()})
    return out


def check_format(fmt, config):
    if fmt == 'detectron2' and config.stem != 'imagenet':
        raise UserError(f"--format detectron2: this backbone has the {config.stem} stem (3x3 stride-1 conv1, no "
                        f"max-pool); detectron2's ResNet stem is a 7x7 stride-2 conv1 with a max-pool, so its "
                        f"conv1 would not load: pretrain with --stem imagenet, or export --format torchvision")


def default_out(path, ckpt, fmt):
    stem = run_prefix(path, ckpt) or os.path.splitext(path)[0]
    if ckpt['kind'] == 'simsiam_linear':
        stem += '_linear'
    return f'{stem}_{fmt}' + ('.pkl' if fmt == 'detectron2' else '.pth')


def check_out(out, force):
    """Refuse, before anything is written, an --out that exists (unless --force) or cannot be written."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise UserError(f'--out {out!r} is a folder; name the file to write')
    if os.path.exists(out) and not force:
        raise UserError(f'--out {out!r} exists; pass --force to replace it')
    if not os.path.isdir(folder):
        what = 'is not a folder' if os.path.exists(folder) else 'does not exist'
        raise UserError(f'--out {out!r}: {folder!r} {what}')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f'--out {out!r}: the folder {folder!r} is not writable')


def write(obj, out, fmt):
    try:
        with files.atomic_open(out, 'wb') as f:
            if fmt == 'detectron2':
                pickle.dump(obj, f)
            else:
                torch.save(obj, f)
    except OSError as e:
        raise UserError(f'cannot write {out!r} ({e.strerror or e}); nothing was written') from None


def main(args):
    path = args.checkpoint
    ckpt, config, weights = read_source(path)
    check_format(args.format, config)
    if args.with_heads and ckpt['kind'] == 'simsiam_linear':
        raise UserError(f"--with_heads: {path!r} is a linear.py model file, which holds the backbone and the linear "
                        f"head only; export the pretraining's <name>_model.pth for the projector and predictor")
    out = args.out or default_out(path, ckpt, args.format)
    check_out(out, args.force)
    backbone, heads = split_weights(ckpt, weights)
    fc = folded_head(ckpt['head']) if ckpt['kind'] == 'simsiam_linear' and args.format != 'detectron2' else None
    record = provenance(path, ckpt, config, args.format)
    write(exported(args.format, backbone, heads if args.with_heads else {}, fc, record), out, args.format)
    what = 'backbone' + (' and linear head' if fc is not None else '') + \
        (', projector and predictor' if args.with_heads else '')
    known = ', '.join(f'{k} {record[k]:.2f}%' for k in ('knn_acc@1', 'linear_acc@1') if k in record)
    print(f'wrote {out}: the {config.arch} {what} ({config.stem} stem) of {record["run"]}, epoch '
          f'{record["epoch"]}' + (f', {known}' if known else '') + f', for {args.format}')


if __name__ == '__main__':
    sys.exit(cli.cli(main, parse_args))
