"""export.py: the weights load into torchvision's ResNets and compute what the project's backbone and linear
head compute; detectron2's names and shapes against a mapping written out here; bad input is one line."""
import errno
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import cli
import export
import main
from conftest import ROOT, TINY
from model import ModelConfig, SimSiam, pretrained_backbone
from probe import Probe


def run_export(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['export.py', *map(str, argv)])
    try:
        status = cli.cli(export.main, export.parse_args)
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def readme_stem_swap():
    """README's lines that give a torchvision ResNet the CIFAR stem, as a function of the model."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    lines = [line.strip() for line in text.splitlines() if re.match(r'\s+model\.(conv1|maxpool) = ', line)]
    assert len(lines) == 2, lines
    return lambda model: exec('\n'.join(lines), {'torch': torch, 'nn': nn}, {'model': model})


def images(n=6, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 4 - 2


def torchvision_features(path, arch='resnet18', swap=True, classes=None):
    exported = torch.load(path, weights_only=True)
    model = getattr(torchvision.models, arch)(**({'num_classes': classes} if classes else {}))
    if swap:
        readme_stem_swap()(model)
    if classes is None:
        model.fc = nn.Identity()
    model.load_state_dict(exported['state_dict'], strict=True)
    return model.eval(), exported


def project_backbone(path):
    ckpt = torch.load(path, weights_only=True)
    backbone, _ = pretrained_backbone(ckpt, path)
    return backbone.eval(), ckpt


def test_a_pretrained_backbone_loads_strictly_into_torchvision_and_computes_the_same_features(finished, tmp_path,
                                                                                               monkeypatch, capsys):
    out = tmp_path / 'rn18.pth'
    status, printed, err = run_export([finished / 'run_model.pth', '--format', 'torchvision', '--out', out],
                                      monkeypatch, capsys)
    assert status == 0, err
    model, exported = torchvision_features(out)
    ours, ckpt = project_backbone(str(finished / 'run_model.pth'))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), atol=1e-5, rtol=1e-5)
    # where it came from: the run, its epoch, the backbone, and the kNN accuracy of that epoch in its log
    record = exported['simsiam']
    csv = (finished / 'run_statistics.csv').read_text().splitlines()
    last = dict(zip(csv[0].split(','), csv[-1].split(',')))
    assert (record['run'], record['epoch'], record['arch'], record['stem']) == ('run', 2, 'resnet18', 'cifar')
    assert record['knn_acc@1'] == pytest.approx(float(last['test_acc@1']))
    assert 'projector' not in str(list(exported)) and f'wrote {out}' in printed
    # timm's resnet18 has the same names; the file is the same but for the format it records
    timm = tmp_path / 'timm.pth'
    assert run_export([finished / 'run_model.pth', '--format', 'timm', '--out', timm], monkeypatch, capsys)[0] == 0
    again = torch.load(timm, weights_only=True)
    assert again['simsiam']['format'] == 'timm'
    assert all(torch.equal(again['state_dict'][k], v) for k, v in exported['state_dict'].items())


def timm_resnet_names(blocks, bottleneck, head=True):
    """timm's resnet18/34/50 state_dict names, written out: its ResNet keeps torchvision's module names."""
    bn = ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    names = ['conv1.weight'] + [f'bn1.{t}' for t in bn]
    convs = (1, 2, 3) if bottleneck else (1, 2)
    for layer, count in enumerate(blocks, start=1):
        for block in range(count):
            prefix = f'layer{layer}.{block}'
            for c in convs:
                names += [f'{prefix}.conv{c}.weight'] + [f'{prefix}.bn{c}.{t}' for t in bn]
            if block == 0 and (layer > 1 or bottleneck):
                names += [f'{prefix}.downsample.0.weight'] + [f'{prefix}.downsample.1.{t}' for t in bn]
    return names + (['fc.weight', 'fc.bias'] if head else [])


def test_timm_names_are_the_exported_names(finished, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'timm.pth'
    assert run_export([finished / 'run_model.pth', '--format', 'timm', '--out', out], monkeypatch, capsys)[0] == 0
    assert sorted(torch.load(out, weights_only=True)['state_dict']) == sorted(timm_resnet_names([2, 2, 2, 2], False,
                                                                                                 head=False))
    assert len(timm_resnet_names([3, 4, 6, 3], True)) == len(torchvision.models.resnet50().state_dict())


def test_a_linear_model_file_gives_the_logits_of_linear_pys_head(finished, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'classifier.pth'
    status, printed, err = run_export([finished / 'run_linear_model.pth', '--format', 'torchvision', '--out', out],
                                      monkeypatch, capsys)
    assert status == 0, err
    saved = torch.load(finished / 'run_linear_model.pth', weights_only=True)
    model, exported = torchvision_features(out, classes=len(saved['classes']))
    backbone, _ = project_backbone(str(finished / 'run_model.pth'))
    backbone.load_state_dict(saved['backbone'])
    head = Probe(saved['head']['weight'].shape[1], len(saved['classes']), 'bn')
    head.load_state_dict(saved['head'])
    assert head.norm.running_var.sub(1).abs().max() > 0.1  # the BN probe has something to fold
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), head.eval()(backbone(x)), atol=1e-5, rtol=1e-5)
    record = exported['simsiam']
    assert record['kind'] == 'simsiam_linear' and record['classes'] == saved['classes']
    assert 'linear_acc@1' in record and 'and linear head' in printed


def test_the_imagenet_stem_loads_without_the_swap(folder_data, tmp_path, monkeypatch, capsys):
    main.main(main.parse_args([*TINY, '--data_root', folder_data, '--results_dir', str(tmp_path), '--epochs', '1',
                               '--name', 'wide', '--stem', 'imagenet']))
    status, _, err = run_export([tmp_path / 'wide_model.pth', '--format', 'torchvision'], monkeypatch, capsys)
    assert status == 0, err
    model, exported = torchvision_features(tmp_path / 'wide_torchvision.pth', swap=False)
    ours, ckpt = project_backbone(str(tmp_path / 'wide_model.pth'))
    assert ckpt['model_args']['stem'] == 'imagenet' and exported['simsiam']['stem'] == 'imagenet'
    x = images(size=64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), atol=1e-5, rtol=1e-5)


def test_with_heads_writes_the_projector_and_predictor_under_their_names(finished, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'all.pth'
    assert run_export([finished / 'run_state.pth', '--format', 'torchvision', '--with_heads', '--out', out],
                      monkeypatch, capsys)[0] == 0
    exported = torch.load(out, weights_only=True)
    state = torch.load(finished / 'run_state.pth', weights_only=True)
    for part in ('projector', 'predictor'):
        saved = {k[len(part) + 1:]: v for k, v in state['model'].items() if k.startswith(part + '.')}
        assert saved and exported[f'simsiam_{part}'].keys() == saved.keys()
        assert all(torch.equal(exported[f'simsiam_{part}'][k], v) for k, v in saved.items())
    assert exported['simsiam']['kind'] == 'simsiam_state' and exported['simsiam']['epoch'] == 2
    status, _, err = run_export([finished / 'run_linear_model.pth', '--format', 'timm', '--with_heads', '--out',
                                 tmp_path / 'x.pth'], monkeypatch, capsys)
    assert status == 2 and 'holds the backbone and the linear head only' in err


# ----------------------------------------------------------------------------- detectron2

def detectron2_expected(blocks, bottleneck, width=64):
    """{name: shape} of a torchvision-style ResNet in detectron2's names, written out from the architecture:
    the stem, then res2-res5 with their blocks' convs and norms and the first block's shortcut."""
    norm = lambda name, c: {f'{name}.norm.{t}': (c,) for t in ('weight', 'bias', 'running_mean', 'running_var')}
    expected = {'stem.conv1.weight': (64, 3, 7, 7), **norm('stem.conv1', 64)}
    channels = 64
    for stage, count in enumerate(blocks):
        planes = width * 2 ** stage
        out = planes * (4 if bottleneck else 1)
        for block in range(count):
            prefix = f'res{stage + 2}.{block}'
            if bottleneck:
                convs = [(planes, channels, 1, 1), (planes, planes, 3, 3), (out, planes, 1, 1)]
            else:
                convs = [(planes, channels, 3, 3), (planes, planes, 3, 3)]
            for i, shape in enumerate(convs, start=1):
                expected[f'{prefix}.conv{i}.weight'] = shape
                expected.update(norm(f'{prefix}.conv{i}', shape[0]))
            if block == 0 and channels != out:
                expected[f'{prefix}.shortcut.weight'] = (out, channels, 1, 1)
                expected.update(norm(f'{prefix}.shortcut', out))
            channels = out
    return expected


@pytest.mark.parametrize('arch,blocks,bottleneck', [('resnet18', [2, 2, 2, 2], False),
                                                     ('resnet50', [3, 4, 6, 3], True)])
def test_detectron2_names_and_shapes(arch, blocks, bottleneck, tmp_path, monkeypatch, capsys):
    config = ModelConfig(arch, feature_dim=32, pred_dim=8, proj_hidden_dim=32, stem='imagenet')
    model = SimSiam(config)
    path = tmp_path / 'd2_model.pth'
    torch.save({'kind': 'simsiam_model', 'model': model.state_dict(), 'model_args': config.to_dict(), 'epoch': 3,
                'args': {}}, path)
    status, _, err = run_export([path, '--format', 'detectron2', '--with_heads'], monkeypatch, capsys)
    assert status == 0, err
    with open(tmp_path / 'd2_detectron2.pkl', 'rb') as f:
        exported = pickle.load(f)
    assert exported['matching_heuristics'] is True and isinstance(exported['__author__'], str)
    shapes = {k: tuple(v.shape) for k, v in exported['model'].items()}
    assert shapes == detectron2_expected(blocks, bottleneck)
    assert all(type(v) is np.ndarray for v in exported['model'].values())
    weights = model.state_dict()
    assert np.array_equal(exported['model']['res3.0.shortcut.norm.running_var'],
                          weights['backbone.layer2.0.downsample.1.running_var'].numpy())
    assert np.array_equal(exported['model']['stem.conv1.weight'], weights['backbone.conv1.weight'].numpy())
    assert exported['simsiam']['epoch'] == 3 and exported['simsiam']['arch'] == arch
    assert all(type(v) is np.ndarray for v in exported['simsiam_projector'].values())


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('case,message', [
    ('csv', 'is not a checkpoint written by torch.save'),
    ('plain', 'is not a file written by main.py or linear.py'),
    ('linear_state', "is a 'simsiam_linear_state' file"),
    ('missing', 'does not exist'),
    ('detectron2_cifar', "--format detectron2: this backbone has the cifar stem (3x3 stride-1 conv1, no max-pool)"),
    ('exists', 'exists; pass --force to replace it'),
    ('under_a_file', "is not a folder"),
    ('no_folder', 'does not exist'),
    ('format', "argument --format: invalid choice: 'onnx'"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, message, finished, tmp_path, monkeypatch, capsys):
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'taken.pth').write_bytes(b'keep')
    torch.save(torch.load(finished / 'run_model.pth', weights_only=True)['model'], tmp_path / 'plain.pth')
    model = finished / 'run_model.pth'
    argv = {'csv': [finished / 'run_statistics.csv', '--format', 'timm'],
            'plain': [tmp_path / 'plain.pth', '--format', 'timm', '--out', tmp_path / 'o.pth'],
            'linear_state': [finished / 'run_linear_state.pth', '--format', 'timm'],
            'missing': [tmp_path / 'gone_model.pth', '--format', 'timm'],
            'detectron2_cifar': [model, '--format', 'detectron2', '--out', tmp_path / 'o.pkl'],
            'exists': [model, '--format', 'timm', '--out', tmp_path / 'taken.pth'],
            'under_a_file': [model, '--format', 'timm', '--out', tmp_path / 'file' / 'o.pth'],
            'no_folder': [model, '--format', 'timm', '--out', tmp_path / 'nowhere' / 'o.pth'],
            'format': [model, '--format', 'onnx']}[case]
    before = {p: p.read_bytes() for p in [*tmp_path.iterdir(), *finished.iterdir()] if p.is_file()}
    status, _, err = run_export(argv, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert 'Traceback' not in err
    assert {p: p.read_bytes() for p in [*tmp_path.iterdir(), *finished.iterdir()] if p.is_file()} == before


def test_force_replaces_and_a_failed_write_leaves_nothing(finished, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'taken.pth'
    out.write_bytes(b'keep')
    assert run_export([finished / 'run_model.pth', '--format', 'timm', '--out', out, '--force'],
                      monkeypatch, capsys)[0] == 0
    assert 'state_dict' in torch.load(out, weights_only=True)

    def full_disk(obj, f, *a, **kw):  # the write fails part way, inside files.atomic_open
        f.write(b'part of it')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    before = out.read_bytes()
    status, _, err = run_export([finished / 'run_model.pth', '--format', 'torchvision', '--out', out, '--force'],
                                monkeypatch, capsys)
    assert status == 2 and err.strip() == (f"export.py: error: cannot write {str(out)!r} (No space left on device); "
                                           f"nothing was written")
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ['taken.pth']
