"""Beyond 32x32: folders of JPEGs of any size and aspect ratio, the ImageNet stem, the ImageNet recipe for
pretraining and linear evaluation, STL-10's splits, and the memory check."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torchvision.transforms.v2.functional as TF
from PIL import Image

import augment
import linear
import main
import monitor
import utils
from conftest import FP32
from model import ModelConfig, SimSiam
from test_bad_input import run_cli
from test_stl10 import offline, stl10_files_ok, write_stl10  # noqa: F401 (fixtures)

SMALL = ['--arch', 'resnet18', '--feature_dim', '64', '--pred_dim', '16', '--proj_hidden_dim', '64', '--k', '5',
         '--device', 'cpu', '--num_workers', '0', '--dataset', 'folder', *FP32]
def test_a_folder_of_any_sizes_keeps_each_images_geometry(jpegs):
    train, _ = utils.load_splits('folder', jpegs, image_size=64)
    assert train.images.shape[1:] == (3, 64, 64)  # the test transform's images, at the run's size
    assert train.views is not None and train.views.dtype == torch.uint8
    files = [Image.open(p) for p in train.paths]
    for (h, w), img in zip(train.sizes.tolist(), files):
        assert (h, w) == utils.stored_size(img.size[1], img.size[0], 64)
        assert abs(w / h - img.size[0] / img.size[1]) < 0.05  # the aspect ratio is kept
    assert min(min(s) for s in train.sizes.tolist()) == 48  # never enlarged
    assert max(min(s) for s in train.sizes.tolist()) == round(64 * 256 / 224)  # shorter side capped
    # the PIL path needs no copy: it crops the files themselves
    assert utils.load_splits('folder', jpegs, image_size=64, views=False)[0].views is None


def test_an_imagenet_layout_folder_reads_val_as_its_test_split(jpegs, tmp_path):
    import shutil
    shutil.copytree(os.path.join(jpegs, 'train'), tmp_path / 'train')
    shutil.copytree(os.path.join(jpegs, 'test'), tmp_path / 'val')
    train, test = utils.load_splits('folder', str(tmp_path), image_size=64)
    assert len(train) == 32 and len(test) == 12 and all('/val/' in p for p in test.paths)


def test_the_batched_crop_is_torchvisions_on_a_non_square_image():
    g = torch.Generator().manual_seed(0)
    canvas = torch.zeros(2, 3, 90, 120)
    canvas[0, :, :70, :110] = torch.rand(3, 70, 110, generator=g)
    canvas[1, :, :90, :50] = torch.rand(3, 90, 50, generator=g)
    sizes = torch.tensor([[70, 110], [90, 50]])
    top, left, h, w = torch.tensor([5, 20]), torch.tensor([30, 3]), torch.tensor([60, 41]), torch.tensor([77, 30])
    out = augment.resized_crop(canvas, top, left, h, w, 40)
    for i in range(2):
        image = canvas[i, :, :sizes[i, 0], :sizes[i, 1]]
        reference = TF.resized_crop(image, int(top[i]), int(left[i]), int(h[i]), int(w[i]), [40, 40],
                                    antialias=False)
        torch.testing.assert_close(out[i], reference, atol=1e-5, rtol=0)
    # boxes are drawn inside each image's own geometry
    many = torch.tensor([[70, 110], [90, 50], [20, 200]]).repeat(200, 1)
    t, l, hh, ww = augment.sample_crops(len(many), many[:, 0], many[:, 1], (0.2, 1.0), (3 / 4, 4 / 3),
                                        torch.Generator().manual_seed(1), 'cpu')
    assert (t >= 0).all() and (l >= 0).all() and (t + hh <= many[:, 0]).all() and (l + ww <= many[:, 1]).all()
    fits = many[:, 0] > 20
    assert (hh * ww >= 0.2 * many.prod(1) * 0.9)[fits].all()
    # a 20x200 strip fits no box of the ratios: torchvision's fallback, the central crop of ratio 4/3
    assert (hh[~fits] == 20).all() and (ww[~fits] == 27).all() and (t[~fits] == 0).all() and (l[~fits] == 86).all()
    # the same draws as with one geometry for all
    one = augment.sample_crops(5, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(2), 'cpu')
    per = augment.sample_crops(5, torch.full((5,), 32), torch.full((5,), 32), (0.2, 1.0), (3 / 4, 4 / 3),
                               torch.Generator().manual_seed(2), 'cpu')
    assert all(torch.equal(a, b) for a, b in zip(one, per))


@pytest.mark.parametrize('aug', ['batched', 'pil'])
def test_mixed_jpegs_train_at_64_px_with_the_imagenet_stem_and_linear_rebuilds_it(jpegs, tmp_path, aug):
    main.main(main.parse_args([*SMALL, '--data_root', jpegs, '--results_dir', str(tmp_path), '--epochs', '1',
                               '--batch_size', '8', '--image_size', '64', '--stem', 'imagenet', '--aug', aug,
                               '--name', 'mixed']))
    ckpt = torch.load(tmp_path / 'mixed_model.pth', weights_only=True)
    assert ckpt['model']['backbone.conv1.weight'].shape == (64, 3, 7, 7)
    assert ckpt['model_args']['stem'] == 'imagenet' and ckpt['args']['image_size'] == 64
    linear.main(linear.parse_args(['--model_path', str(tmp_path / 'mixed_model.pth'), '--results_dir',
                                   str(tmp_path), '--epochs', '1', '--batch_size', '8', '--device', 'cpu',
                                   '--num_workers', '0', '--lr', '1', '--aug', aug, *FP32]))
    assert (tmp_path / 'mixed_linear_statistics.csv').read_text().count('\n') == 2


def test_the_imagenet_recipe_sets_every_default_and_linear_follows_it_with_lars(jpegs, tmp_path):
    args = main.parse_args([*SMALL, '--recipe', 'imagenet', '--image_size', '64', '--batch_size', '16',
                            '--epochs', '1', '--data_root', jpegs, '--results_dir', str(tmp_path), '--name', 'r'])
    main.main(args)
    record = json.loads((tmp_path / 'r_args.json').read_text())
    settings = record['args']
    assert (settings['lr'], settings['wd'], settings['fix_pred_lr'], settings['proj_layers']) == (0.05, 1e-4, True, 3)
    assert settings['stem'] == 'imagenet' and settings['proj_out_affine'] == 'off'
    # what the command line gave is not the preset's
    assert 'arch' not in settings['from_recipe'] and 'image_size' not in settings['from_recipe']
    assert {'lr', 'wd', 'fix_pred_lr', 'proj_layers', 'stem', 'momentum'} <= set(settings['from_recipe'])
    assert record['augmentation']['blur_p'] == 0.5 and record['augmentation']['blur_sigma'] == [0.1, 2.0]
    assert record['augmentation']['mean'] == list(augment.IMAGENET_MEAN)
    ckpt = torch.load(tmp_path / 'r_model.pth', weights_only=True)
    projector = SimSiam(ModelConfig.from_dict(ckpt['model_args'])).projector
    assert [type(m) for m in projector][-1] is nn.BatchNorm1d and not projector[-1].affine
    assert ckpt['model']['projector.6.weight'].shape == (64, 64)  # three Linear layers
    # the evaluation reads the pretraining's recipe: LARS, a plain head, Resize + CenterCrop
    linear.main(linear.parse_args(['--model_path', str(tmp_path / 'r_model.pth'), '--results_dir', str(tmp_path),
                                   '--batch_size', '32', '--epochs', '1', '--device', 'cpu', '--num_workers', '0',
                                   *FP32]))
    evaluation = json.loads((tmp_path / 'r_linear_args.json').read_text())['args']
    assert (evaluation['recipe'], evaluation['optimizer'], evaluation['probe_norm'], evaluation['lr']) == \
        ('imagenet', 'lars', 'none', [0.1])
    state = torch.load(tmp_path / 'r_linear_state.pth', weights_only=True)
    assert state['probe']['optimizers'][0]['param_groups'][0]['trust_coefficient'] == 0.001


def test_the_projector_of_the_imagenet_recipe():
    model = SimSiam(ModelConfig('resnet50', proj_layers=3, proj_out_affine=False, stem='imagenet'))
    shapes = [tuple(m.weight.shape) for m in model.projector if isinstance(m, nn.Linear)]
    assert shapes == [(2048, 2048)] * 3 and all(m.bias is None for m in model.projector if isinstance(m, nn.Linear))
    norms = [m for m in model.projector if isinstance(m, nn.BatchNorm1d)]
    assert [n.affine for n in norms] == [True, True, False]  # BN on every layer, the output one affine-free
    predictor = [tuple(m.weight.shape) for m in model.predictor if isinstance(m, nn.Linear)]
    assert predictor == [(512, 2048), (2048, 512)]
    assert len([m for m in SimSiam(ModelConfig('resnet18')).projector if isinstance(m, nn.Linear)]) == 2


def test_the_pil_path_blurs_with_the_imagenet_recipe():
    transform = utils.pretrain_transform(size=64, recipe=augment.IMAGENET_PRETRAIN)
    blurs = [t for t in transform.transforms if type(t).__name__ == 'RandomApply'
             and type(t.transforms[0]).__name__ == 'GaussianBlur']
    assert len(blurs) == 1 and blurs[0].p == 0.5 and tuple(blurs[0].transforms[0].sigma) == (0.1, 2.0)
    assert not [t for t in utils.pretrain_transform().transforms if 'GaussianBlur' in repr(t)]  # not on CIFAR


def test_stl10_pretrains_on_every_image_and_the_monitor_sees_only_labelled_ones(tmp_path, monkeypatch,
                                                                                    stl10_files_ok,  # noqa: F811
                                                                                    offline):  # noqa: F811
    write_stl10(tmp_path / 'data')  # 6 train, 4 test, 5 unlabeled
    seen = {}
    real = monitor.knn_monitor

    def watching(fn, bank, test, *a, **kw):
        seen['bank'], seen['test'] = bank.labels.tolist(), test.labels.tolist()
        return real(fn, bank, test, *a, **kw)
    monkeypatch.setattr(monitor, 'knn_monitor', watching)
    args = main.parse_args([*SMALL, '--dataset', 'stl10', '--data_root', str(tmp_path / 'data'), '--results_dir',
                            str(tmp_path / 'r'), '--epochs', '1', '--batch_size', '11', '--name', 'stl'])
    assert args.image_size == 96
    main.main(args)
    record = json.loads((tmp_path / 'r' / 'stl_args.json').read_text())
    assert record['train_images'] == 11 and record['test_images'] == 4  # train + unlabeled, one step of 11
    assert len(seen['bank']) == 6 and min(seen['bank']) >= 0 and min(seen['test']) >= 0


@pytest.mark.parametrize('extra,message', [
    (['--image_size', '0'], 'argument --image_size: must be a positive integer, got 0'),
    (['--image_size', '16', '--stem', 'imagenet'], '--image_size 16 is too small for the imagenet stem: the smallest '
                                                   'is 32'),
    (['--image_size', '4'], '--image_size 4 is too small for the cifar stem: the smallest is 8'),
    (['--stem', 'tiny'], "argument --stem: invalid choice: 'tiny'"),
    (['--recipe', 'mnist'], "argument --recipe: invalid choice: 'mnist'"),
])
def test_bad_size_flags_are_one_line(extra, message, jpegs, tmp_path, monkeypatch, capsys):
    status, err = run_cli(main, [*SMALL, '--data_root', jpegs, '--results_dir', tmp_path, *extra], monkeypatch,
                          capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('damage', ['truncated', 'not_an_image'])
def test_an_unreadable_jpeg_is_named_in_one_line(damage, jpegs, tmp_path, monkeypatch, capsys):
    import shutil
    root = tmp_path / 'data'
    shutil.copytree(jpegs, root)
    if damage == 'truncated':
        bad = sorted((root / 'train' / 'c1').iterdir())[0]
        bad.write_bytes(bad.read_bytes()[:200])  # cut short
    else:
        bad = root / 'train' / 'c2' / 'notes.jpg'
        bad.write_text('not an image')
    status, err = run_cli(main, [*SMALL, '--data_root', root, '--results_dir', tmp_path / 'r', '--image_size', '64',
                                 '--epochs', '1', '--batch_size', '8'], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and f'cannot read image {str(bad)!r}' in lines[0], lines


def test_a_dataset_too_large_for_memory_ends_before_training_in_one_line(jpegs, tmp_path, monkeypatch, capsys):
    # (--aug auto would take the stream path: tests/test_stream.py)
    monkeypatch.setattr(utils, 'host_memory_available', lambda: 2 ** 20)  # 1 MiB
    status, err = run_cli(main, [*SMALL, '--data_root', jpegs, '--results_dir', tmp_path / 'r', '--image_size', '64',
                                 '--epochs', '1', '--batch_size', '8', '--aug', 'batched'], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert 'the dataset needs ' in lines[0] and 'GiB of host memory and 0.00 GiB are available' in lines[0]
    assert 'train with --aug stream, which reads the files batch by batch' in lines[0]
    assert not (tmp_path / 'r' / 'resnet18_folder_64_5_8_1_64px_statistics.csv').exists()


def test_the_knn_caps_use_fixed_subsets_and_the_csv_says_their_sizes(folder_data, tmp_path, monkeypatch):
    import pandas as pd
    seen = []
    real = monitor.knn_monitor

    def watching(fn, bank, test, *a, **kw):
        seen.append((bank.images.clone(), test.images.clone()))
        return real(fn, bank, test, *a, **kw)
    monkeypatch.setattr(monitor, 'knn_monitor', watching)
    main.main(main.parse_args([*SMALL, '--data_root', folder_data, '--results_dir', str(tmp_path), '--epochs', '2',
                               '--batch_size', '8', '--knn_bank', '10', '--knn_queries', '6', '--name', 'cap']))
    stats = pd.read_csv(tmp_path / 'cap_statistics.csv')
    assert stats['knn_bank'].tolist() == [10, 10] and stats['knn_queries'].tolist() == [6, 6]
    (bank1, test1), (bank2, test2) = seen
    assert len(bank1) == 10 and len(test1) == 6 and torch.equal(bank1, bank2) and torch.equal(test1, test2)
    train, _ = utils.load_splits('folder', folder_data)
    assert len(train) == 32 and not torch.equal(bank1, train.images[:10])  # drawn, not the first ten
    assert 'knn_bank' not in pd.read_csv(tmp_path / 'cap_statistics.csv').columns[:12]


def test_the_recipes_fixed_predictor_lr_goes_with_an_untrained_predictor_and_resuming_ignores_from_recipe():
    import run
    args = main.parse_args(['--recipe', 'imagenet', '--predictor', 'none'])
    assert args.fix_pred_lr is False
    main.check_args(args)  # not refused: the user never asked for --fix_pred_lr
    with pytest.raises(Exception, match='--fix_pred_lr keeps'):
        main.check_args(main.parse_args(['--recipe', 'imagenet', '--predictor', 'none', '--fix_pred_lr']))
    # the same run resumed with a value of the recipe now typed out is the same run
    saved, now = vars(main.parse_args(['--recipe', 'imagenet'])), vars(main.parse_args(['--recipe', 'imagenet',
                                                                                        '--lr', '0.05']))
    assert saved['from_recipe'] != now['from_recipe'] and run.run_differences(saved, now) == []
    assert run.run_differences(saved, vars(main.parse_args(['--recipe', 'imagenet', '--lr', '0.1']))) != []
    assert main.parse_args(['--recipe', 'imagenet', '--knn_bank', '0']).knn_bank == 0  # 0: all of it
