"""The code paths chosen only on CUDA: bf16 autocast, channels_last, batched augmentation on the GPU, pinned
memory, torch.compile, NCCL with torch's SyncBatchNorm, resume, and benchmark.py.

    python -m pytest -m cuda

Every test here is marked `cuda` and skipped on a machine without a GPU; the CPU suite covers the rest.
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script under torchrun
import pandas as pd  # noqa: E402
import pytest
import torch

import augment
import monitor
import optim
import utils
from conftest import ROOT, make_shapes, run_script
from model import ModelConfig, SimSiam, simsiam_loss

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

# Small, but on the GPU: ResNet-18 with the default heads, 8 steps per epoch.
GPU = ['--arch', 'resnet18', '--batch_size', '32', '--k', '20', '--device', 'cuda', '--dataset', 'folder']


def pretrain(folder_data, out, *extra, epochs=2, name='gpu'):
    r = run_script('main.py', *GPU, '--data_root', folder_data, '--results_dir', out, '--epochs', epochs,
                   '--name', name, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope='module')
def gpu_data(tmp_path_factory):
    from conftest import write_folder
    return write_folder(tmp_path_factory.mktemp('gpu_data'), 64, 16)  # 256 train and 64 test images


@pytest.fixture(scope='module')
def gpu_run(gpu_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_run')
    r = pretrain(gpu_data, out)
    return out, r


def test_both_scripts_with_the_cuda_defaults(gpu_run):
    out, r = gpu_run
    assert 'speed: aug batched, amp bf16, channels_last on, compile off' in r.stdout
    stats = pd.read_csv(out / 'gpu_statistics.csv')
    assert stats['train_loss'].notna().all() and stats['test_acc@1'].between(0, 100).all()
    assert stats['train_loss'].dtype == 'float64'
    lin = run_script('linear.py', '--model_path', out / 'gpu_model.pth', '--results_dir', out, '--epochs', '2',
                     '--batch_size', '32', '--device', 'cuda')
    assert lin.returncode == 0, lin.stderr[-3000:]
    assert 'speed: aug batched, amp bf16, channels_last on' in lin.stdout
    assert pd.read_csv(out / 'gpu_linear_statistics.csv')['test_acc@1'].between(0, 100).all()


def test_compile_on_cuda(gpu_data, tmp_path):
    r = pretrain(gpu_data, tmp_path, '--compile', epochs=1)
    assert 'compile on' in r.stdout
    lin = run_script('linear.py', '--model_path', tmp_path / 'gpu_model.pth', '--results_dir', tmp_path,
                     '--epochs', '1', '--batch_size', '32', '--device', 'cuda', '--compile')
    assert lin.returncode == 0, lin.stderr[-3000:]


def test_batched_path_on_the_gpu_against_the_pil_path(gpu_data, gpu_run, tmp_path):
    # The same run on the PIL path (pinned memory, DataLoader workers): both train, to similar losses.
    r = pretrain(gpu_data, tmp_path, '--aug', 'pil', '--num_workers', '4')
    assert 'speed: aug pil' in r.stdout
    pil = pd.read_csv(tmp_path / 'gpu_statistics.csv')
    batched = pd.read_csv(gpu_run[0] / 'gpu_statistics.csv')
    assert pil['train_loss'].tolist() == pytest.approx(batched['train_loss'].tolist(), abs=0.05)
    # and the augmentation itself: the GPU pipeline's output statistics match the per-image pipeline's
    images, _ = make_shapes(64, seed=0)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator(device='cuda').manual_seed(0)
    ours = torch.cat([augment.pretrain_augment(images.cuda(), g) for _ in range(8)]).cpu()
    data = utils.ImageSet(images, torch.zeros(len(images), dtype=torch.int64), ['x'])
    views = utils.AugmentedViews(data, utils.pretrain_transform(), seed=0, views=1)
    theirs = torch.stack([views[(e, i)][0] for e in range(8) for i in range(len(images))])
    torch.testing.assert_close(ours.mean(dim=(0, 2, 3)), theirs.mean(dim=(0, 2, 3)), atol=0.05, rtol=0)
    torch.testing.assert_close(ours.std(dim=(0, 2, 3)), theirs.std(dim=(0, 2, 3)), atol=0.05, rtol=0)


def test_knn_monitor_on_cuda_equals_the_cpu_one_on_the_same_features():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(3000, 128), dim=1)
    labels = torch.randint(0, 10, (3000,))
    queries = torch.nn.functional.normalize(torch.randn(500, 128), dim=1)
    cpu = monitor.knn_predict(queries, bank, labels, 10, k=200, t=0.1)
    gpu = monitor.knn_predict(queries.cuda(), bank.cuda(), labels.cuda(), 10, k=200, t=0.1).cpu()
    # float32 matrix products may round differently; the top class must agree for (nearly) every query
    assert (cpu[:, 0] == gpu[:, 0]).float().mean() > 0.99
    assert monitor.topk_correct(cpu, labels[:500]) == pytest.approx(monitor.topk_correct(gpu, labels[:500]), abs=5)


def test_torchrun_with_nccl(gpu_data, tmp_path):
    n = min(2, torch.cuda.device_count())
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}',
                        'main.py', *GPU, '--device', 'cuda', '--data_root', gpu_data, '--results_dir', tmp_path,
                        '--epochs', '1', '--name', 'nccl'], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / 'nccl_statistics.csv')) == 1
    # NCCL and torch's SyncBatchNorm in a process group, even of one GPU: the scripts join a group only
    # for two or more processes, so drive the pieces directly
    check = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                            os.path.join(ROOT, 'tests', 'test_cuda.py')], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env)
    assert check.returncode == 0 and 'nccl ok' in check.stdout, check.stderr[-3000:]


def nccl_check():
    """Under torchrun: one SimSiam step with torch's SyncBatchNorm in DDP over NCCL, and our collectives."""
    import distributed
    torch.distributed.init_process_group('nccl')
    device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
    torch.cuda.set_device(device)
    world = distributed.World(torch.distributed.get_rank(), torch.distributed.get_world_size())
    model = distributed.sync_batchnorm(SimSiam(ModelConfig('resnet18', 64, 16, 64)).to(device), device)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    optimizer = optim.sgd(model.param_groups(), 0.1, 0.9, 5e-4)
    x1, x2 = torch.randn(2, 8, 3, 32, 32, device=device)
    loss = simsiam_loss(*net(x1, x2))
    loss.backward()
    optimizer.step()
    total = distributed.all_sum(torch.ones(1, device=device), distributed.World(world.rank, 2))  # forced collective
    assert torch.isfinite(loss) and total.item() == world.world_size
    assert all(p.grad is not None for p in model.predictor.parameters())
    torch.distributed.destroy_process_group()
    print('nccl ok', flush=True)


def test_resume_on_cuda(gpu_data, gpu_run, tmp_path):
    from conftest import start, wait_for_line
    import signal
    args = [*GPU, '--data_root', gpu_data, '--results_dir', tmp_path, '--epochs', '2', '--name', 'gpu']
    proc = start('main.py', args)
    wait_for_line(proc, 'epoch 1/2')
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    state = torch.load(tmp_path / 'gpu_state.pth', weights_only=True)
    assert state['epoch'] == 1 and state['rng']['cuda'], 'the CUDA generator states are saved'
    r = run_script('main.py', *args, '--resume', 'auto')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resuming after epoch 1 of 2' in r.stdout
    resumed, whole = (pd.read_csv(d / 'gpu_statistics.csv') for d in (tmp_path, gpu_run[0]))
    assert resumed['epoch'].tolist() == [1, 2]
    # on a GPU, cuDNN's kernels make any two runs differ in the last digits: compare to a tolerance
    assert resumed['train_loss'].tolist() == pytest.approx(whole['train_loss'].tolist(), abs=0.02)


def test_benchmark_on_cuda():
    r = run_script('benchmark.py', '--arch', 'resnet18', '--batch_size', '64', '--images', '512', '--repeats', '1',
                   '--aug_repeats', '1', '--knn_bank', '2000', '--knn_queries', '500', '--device', 'cuda',
                   '--configs', 'seed,fast')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'fast / seed-equivalent training throughput' in r.stdout


# ----------------------------------------------------------------------------- the stream path on the GPU

@pytest.fixture(scope='module')
def mixed_files(tmp_path_factory):
    """A folder of JPEGs of ImageNet-like sizes, RGB and grey (decoded on the GPU), with a CMYK JPEG and a PNG
    in each class (decoded on the CPU): 4 classes, 16 train and 4 test images each."""
    from PIL import Image
    root = tmp_path_factory.mktemp('mixed')
    sizes = [(500, 375), (375, 500), (333, 500), (500, 332), (640, 480)]
    for split, n, seed in (('train', 16, 0), ('test', 4, 1)):
        images, labels = make_shapes(n, seed)
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = root / split / f'c{label}'
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(img).resize(sizes[i % len(sizes)], Image.BICUBIC)
            if i % 8 == 0:
                picture.save(folder / f'{i:03d}.png')
            elif i % 8 == 1:
                picture.convert('CMYK').save(folder / f'{i:03d}.jpg', quality=90)
            else:
                picture.convert('L' if i % 8 == 2 else 'RGB').save(folder / f'{i:03d}.jpg', quality=90)
    return str(root)


def test_gpu_decode_matches_the_cpu_decode(mixed_files):
    """nvJPEG and libjpeg-turbo may round the inverse DCT and the upsampling of the chroma differently: the
    tolerance is a mean absolute difference under 1 of 255 and no pixel more than 16 apart."""
    import stream
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(mixed_files) for f in files)
    on_gpu = [stream.read_image(p, on_gpu=True) for p in paths]
    jpegs = [i for i, (payload, _) in enumerate(on_gpu) if payload.dim() == 1]
    assert 0 < len(jpegs) < len(paths)  # the CMYK JPEGs and the PNGs are decoded on the CPU
    decode, name = stream.gpu_decoder()
    decoded = decode([on_gpu[i][0] for i in jpegs], torch.device('cuda'))
    for i, image in zip(jpegs, decoded):
        cpu, size = stream.read_image(paths[i], on_gpu=False)
        assert image.shape == cpu.shape and tuple(image.shape[1:]) == size
        difference = (image.cpu().int() - cpu.int()).abs()
        assert difference.float().mean() < 1.0 and difference.max() <= 16, (name, paths[i])


def test_stream_path_on_the_gpu_both_scripts(mixed_files, tmp_path):
    r = run_script('main.py', *GPU[:2], '--k', '5', '--device', 'cuda', '--dataset', 'folder',
                   '--data_root', mixed_files, '--results_dir', tmp_path, '--epochs', '2', '--name', 'gpu',
                   '--aug', 'stream', '--image_size', '96', '--recipe', 'imagenet', '--knn_bank', '0',
                   '--knn_queries', '0', '--batch_size', '16')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'speed: aug stream, amp bf16' in r.stdout
    stats = pd.read_csv(tmp_path / 'gpu_statistics.csv')
    assert stats['train_loss'].notna().all() and stats['test_acc@1'].between(0, 100).all()
    lin = run_script('linear.py', '--model_path', tmp_path / 'gpu_model.pth', '--results_dir', tmp_path,
                     '--epochs', '1', '--batch_size', '16', '--device', 'cuda', '--aug', 'stream')
    assert lin.returncode == 0, lin.stderr[-3000:]


def test_the_data_paths_benchmark_on_cuda(tmp_path):
    """The README's GPU command for the stream path, on a small folder."""
    r = run_script('benchmark.py', '--parts', 'aug', '--aug', 'pil,stream', '--data_root', tmp_path / 'folder',
                   '--write_folder', '600', '--write_size', '500x375', '--image_size', '224', '--arch', 'resnet50',
                   '--batch_size', '128', '--aug_images', '512', '--device', 'cuda')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'stream / pil pairs per second on the folder' in r.stdout


if __name__ == '__main__':
    nccl_check()
