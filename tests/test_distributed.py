"""Two processes under torchrun on the CPU (Gloo): the same numbers as one process, rank 0 writes, and a
failed rank ends the job."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import distributed
import files
import linear
import main
from conftest import FP32, ROOT, TINY, csv_without
from dist_checks import check

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def torchrun(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    return subprocess.run([*TORCHRUN, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_shards_cover_every_row_once_in_chunks_of_one_process():
    for n, chunk, w in ((48, 8, 2), (50, 8, 3), (5, 8, 2), (17, 4, 4)):
        shards = [distributed.shard_chunks(n, chunk, distributed.World(r, w)) for r in range(w)]
        single = distributed.shard_chunks(n, chunk, distributed.SINGLE)
        assert sorted(sum(shards, [])) == single
        assert single == [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


@pytest.fixture(scope='module')
def two_process_checks(folder_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('dist') / 'checks.pth'
    r = torchrun(os.path.join(ROOT, 'tests', 'dist_checks.py'), out, folder_data)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_distributed_knn_monitor_equals_one_process(two_process_checks, folder_data):
    one = check(folder_data, distributed.SINGLE, torch.device('cpu'))
    two = two_process_checks['sync']
    assert (two['top1'], two['top5']) == (one['top1'], one['top5'])
    # each chunk is embedded exactly as one process embeds it, so the gathered features are identical
    assert torch.equal(two['bank'], one['bank']) and torch.equal(two['queries'], one['queries'])


def test_syncbn_step_on_two_halves_equals_one_step_on_the_whole_batch(two_process_checks, folder_data):
    one = check(folder_data, distributed.SINGLE, torch.device('cpu'))
    two, unsynced = two_process_checks['sync'], two_process_checks['unsynced']
    assert two['loss'] == pytest.approx(one['loss'], abs=1e-6)
    assert two['z_std'] == pytest.approx(one['z_std'], rel=1e-6)

    def largest_difference(weights):
        return max((weights[k].double() - one['weights'][k].double()).abs().max().item()
                   for k in one['weights'] if k.endswith(('weight', 'bias', 'running_mean', 'running_var')))

    assert largest_difference(two['weights']) < 1e-5
    # per-process BatchNorm (no sync) moves the same weights visibly differently: the check can fail
    assert largest_difference(unsynced['weights']) > 1e-3


def pretraining(folder_data, out):
    return [*TINY, '--data_root', folder_data, '--results_dir', out, '--epochs', '3', '--name', 'job']


@pytest.fixture(scope='module')
def uninterrupted(folder_data, tmp_path_factory):
    """A finished 3-epoch, 2-process pretraining run."""
    out = tmp_path_factory.mktemp('job')
    r = torchrun('main.py', *pretraining(folder_data, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('done: ') == 1  # rank 0 alone reports
    return out


def test_two_process_pretraining_repeats_itself_and_rank_0_writes(uninterrupted, folder_data, tmp_path):
    a = uninterrupted
    assert sorted(os.listdir(a)) == sorted(f'job_{s}' for s in (
        'statistics.csv', 'model.pth', 'state.pth', 'statistics.png', 'neighbours.png', 'args.json'))
    stats = pd.read_csv(a / 'job_statistics.csv')
    assert stats['epoch'].tolist() == [1, 2, 3] and stats['test_acc@1'].notna().all()
    record = json.loads((a / 'job_args.json').read_text())
    assert record['world_size'] == 2 and record['lr_resolved'] == pytest.approx(0.03 * 8 / 256)
    r = torchrun('main.py', *pretraining(folder_data, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert csv_without(a / 'job_statistics.csv', main.WALL_CLOCK) == \
        csv_without(tmp_path / 'job_statistics.csv', main.WALL_CLOCK)


def linear_evaluation(uninterrupted, out):
    return ['--model_path', uninterrupted / 'job_model.pth', '--results_dir', out, '--epochs', '2', '--batch_size',
            '8', '--device', 'cpu', '--num_workers', '0', *FP32]


@pytest.fixture(scope='module')
def two_process_linear(uninterrupted, tmp_path_factory):
    out = tmp_path_factory.mktemp('linear')
    r = torchrun('linear.py', *linear_evaluation(uninterrupted, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('done: ') == 1
    return out


def test_two_process_linear_evaluation(two_process_linear):
    stats = pd.read_csv(two_process_linear / 'job_linear_statistics.csv')
    assert stats['epoch'].tolist() == [1, 2]
    assert stats[['train_acc@1', 'test_acc@1']].notna().all().all()
    assert (two_process_linear / 'job_linear_model.pth').exists()


def test_batch_that_does_not_split_over_the_processes_is_refused_once(folder_data, tmp_path):
    args = [a if a != '8' else '9' for a in TINY]  # --batch_size 9 (k 5 and dims are not 8)
    r = torchrun('main.py', *args, '--data_root', folder_data, '--results_dir', tmp_path, '--epochs', '1')
    assert r.returncode != 0
    message = 'main.py: error: --batch_size 9 does not split evenly over 2 processes; use a multiple of 2'
    assert r.stderr.count(message) == 1, r.stderr[-3000:]
    assert os.listdir(tmp_path) == []


def worker_pids(launcher):
    """{rank: pid} of the torchrun workers below `launcher`, read from their environments."""
    found = {}
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open(f'/proc/{pid}/stat') as f:
                parent = int(f.read().rsplit(')', 1)[1].split()[1])
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
        except OSError:
            continue
        if parent == launcher and b'RANK' in env:
            found[int(env[b'RANK'])] = int(pid)
    return found


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the worker processes through /proc')
def test_a_killed_rank_ends_the_job_and_the_resumed_run_is_the_same_run(uninterrupted, folder_data, tmp_path):
    args = pretraining(folder_data, tmp_path)
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    job = subprocess.Popen([*TORCHRUN, 'main.py', *map(str, args)], cwd=ROOT, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    csv = tmp_path / 'job_statistics.csv'
    deadline = time.time() + 300
    while not csv.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert csv.exists(), job.communicate()[1][-3000:]
    os.kill(worker_pids(job.pid)[1], signal.SIGKILL)
    start = time.time()
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0 and time.time() - start < 90, err[-3000:]  # ended, no hang
    # rank 0 says in one line why it stopped: torchrun's SIGTERM, or the lost peer if its next collective
    # came first (with saves in the background it is no longer busy writing when rank 1 dies)
    assert ('main.py: interrupted by SIGTERM; epochs 1-' in err or
            'main.py (rank 0 of 2): error: lost contact with another process of the job' in err), err[-3000:]
    state = files.load_checkpoint(str(tmp_path / 'job_state.pth'), ('simsiam_state',), '--resume')
    assert 1 <= state['epoch'] < 3
    assert len(pd.read_csv(csv)) == state['epoch']

    r = torchrun('main.py', *args, '--resume', 'auto')
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'resuming after epoch {state["epoch"]} of 3' in r.stdout
    assert csv_without(csv, main.WALL_CLOCK) == csv_without(uninterrupted / 'job_statistics.csv', main.WALL_CLOCK)
    resumed, whole = (torch.load(d / 'job_model.pth', weights_only=True)['model'] for d in (tmp_path, uninterrupted))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


# ----------------------------------------------------------------------------- two nodes on one machine

def readme_multinode_command(port):
    """The multi-node torchrun command of docs/distributed.md, for one process per node on this machine."""
    with open(os.path.join(ROOT, 'docs', 'distributed.md')) as f:
        line = next(line.split() for line in f if line.strip().startswith('torchrun --nnodes=2'))
    launcher = line[1:line.index('main.py')]
    assert '--nproc_per_node=8' in launcher and '--rdzv_endpoint=HOST:PORT' in launcher, line
    launcher = [{'--nproc_per_node=8': '--nproc_per_node=1', '--rdzv_endpoint=HOST:PORT':
                 f'--rdzv_endpoint=127.0.0.1:{port}'}.get(a, a) for a in launcher]
    return [sys.executable, '-m', 'torch.distributed.run', *launcher]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def two_nodes(script, args):
    """Two torchrun agents, as two nodes would start them, on this machine."""
    command = [*readme_multinode_command(free_port()), script, *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    return [subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for _ in range(2)]


def finish(agents, timeout=300):
    outputs = [agent.communicate(timeout=timeout) for agent in agents]
    return [agent.returncode for agent in agents], outputs


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the worker processes through /proc')
def test_two_nodes_kill_one_agent_resume_and_match_one_node(uninterrupted, folder_data, tmp_path):
    args = pretraining(folder_data, tmp_path)
    agents = two_nodes('main.py', args)
    csv = tmp_path / 'job_statistics.csv'
    deadline = time.time() + 300
    while not csv.exists() and time.time() < deadline and all(a.poll() is None for a in agents):
        time.sleep(0.2)
    assert csv.exists(), finish(agents)[1]
    rank1 = next(a for a in agents if 1 in worker_pids(a.pid))  # the node whose worker is rank 1
    rank1.send_signal(signal.SIGTERM)  # a scheduler stopping that node
    start = time.time()
    codes, outputs = finish(agents, timeout=120)
    assert all(code != 0 for code in codes) and time.time() - start < 90, outputs
    state = files.load_checkpoint(str(tmp_path / 'job_state.pth'), ('simsiam_state',), '--resume')
    assert 1 <= state['epoch'] < 3 and len(pd.read_csv(csv)) == state['epoch']
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]

    codes, outputs = finish(two_nodes('main.py', [*args, '--resume', 'auto']))
    assert codes == [0, 0], outputs
    assert sum(out.count(f'resuming after epoch {state["epoch"]} of 3') for out, _ in outputs) == 1
    # two nodes of one process compute what one node of two processes computes, digit for digit
    assert csv_without(csv, main.WALL_CLOCK) == csv_without(uninterrupted / 'job_statistics.csv', main.WALL_CLOCK)


def test_two_nodes_linear_evaluation_matches_one_node(uninterrupted, two_process_linear, tmp_path):
    codes, outputs = finish(two_nodes('linear.py', linear_evaluation(uninterrupted, tmp_path)))
    assert codes == [0, 0], outputs
    assert csv_without(tmp_path / 'job_linear_statistics.csv', linear.WALL_CLOCK) == \
        csv_without(two_process_linear / 'job_linear_statistics.csv', linear.WALL_CLOCK)
