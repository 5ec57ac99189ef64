"""The kNN monitor, the collapse monitor, plots, neighbour pictures and run records."""
import json
import math

import pandas as pd
import pytest
import torch

import linear
import main
import monitor
import plot
import utils
from conftest import TINY, png_size, run_script


# ----------------------------------------------------------------------------- kNN

BANK = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
BANK_LABELS = torch.tensor([0, 1, 1, 2, 0])


def test_knn_votes_by_hand():
    query = torch.tensor([[1.0, 0.0]])
    # k=3 neighbours: sims 1.0 (class 0), 0.8 and 0.6 (class 1).
    # t=1: class 0 scores e^1 = 2.72, class 1 scores e^0.8 + e^0.6 = 4.05 -> class 1 wins.
    assert monitor.knn_predict(query, BANK, BANK_LABELS, 3, k=3, t=1.0).tolist() == [[1, 0, 2]]
    # t=0.1: class 0 scores e^10 = 22026, class 1 e^8 + e^6 = 3384 -> class 0 wins.
    assert monitor.knn_predict(query, BANK, BANK_LABELS, 3, k=3, t=0.1).tolist() == [[0, 1, 2]]
    # k=1: only the nearest item votes.
    assert monitor.knn_predict(torch.tensor([[0.0, 1.0]]), BANK, BANK_LABELS, 3, k=1, t=0.1)[0, 0] == 2


def test_knn_chunking_does_not_change_the_answer():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
    labels = torch.randint(0, 7, (300,))
    queries = torch.nn.functional.normalize(torch.randn(50, 16), dim=1)
    whole = monitor.knn_predict(queries, bank, labels, 7, k=20, t=0.1, chunk_size=1000)
    chunked = monitor.knn_predict(queries, bank, labels, 7, k=20, t=0.1, chunk_size=7)
    assert whole.shape == (50, 7)
    assert torch.equal(whole, chunked)
    # each row is a permutation of the classes
    assert torch.equal(whole.sort(dim=1).values, torch.arange(7).expand(50, 7))


def test_topk_correct():
    ranked = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [1, 0, 2, 3, 4, 5]])
    labels = torch.tensor([0, 0, 0])
    assert monitor.topk_correct(ranked, labels) == [1, 2]
    assert monitor.topk_correct(ranked[:, :2], labels) == [1, 2]  # k=5 is clipped to two classes


def test_knn_monitor_on_separable_features():
    bank = utils.ImageSet(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ['a', 'b'])
    bank.images[2:] = 255
    test = utils.ImageSet(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), ['a', 'b'])
    test.images[1] = 250
    # a feature that separates dark from bright images
    fn = lambda x: torch.stack([x.mean(dim=(1, 2, 3)), torch.ones(len(x))], dim=1)
    top1, top5, _, _ = monitor.knn_monitor(fn, bank, test, k=2, t=0.1, batch_size=3, device=torch.device("cpu"))
    assert (top1, top5) == (100.0, 100.0)
    test.labels = torch.tensor([1, 0])
    top1, _, _, _ = monitor.knn_monitor(fn, bank, test, k=2, t=0.1, batch_size=3, device=torch.device("cpu"))
    assert top1 == 0.0


# ----------------------------------------------------------------------------- collapse, plots, records

def test_z_std_of_collapsed_and_spread_outputs():
    collapsed = torch.randn(1, 512).expand(256, 512)
    assert monitor.z_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    for d in (128, 2048):  # Gaussian rows are spread evenly over the sphere: std 1/sqrt(d) per channel
        assert monitor.z_std(torch.randn(4096, d)).item() * math.sqrt(d) == pytest.approx(1.0, abs=0.02)
    # a representation in 4% of the dimensions sits at the warning threshold
    z = torch.zeros(4096, 2048)
    z[:, :82] = torch.randn(4096, 82)
    assert monitor.z_std(z).item() * math.sqrt(2048) == pytest.approx(monitor.COLLAPSE_THRESHOLD, abs=0.01)


@pytest.fixture
def run(finished):
    return finished


def test_csv_has_the_monitor_columns(run):
    stats = pd.read_csv(run / 'run_statistics.csv')
    assert list(stats.columns) == main.COLUMNS
    assert (stats['z_std_ratio'] == stats['z_std'] * math.sqrt(64)).all()
    assert stats['z_std_ratio'].between(0.5, 1.5).all()  # a healthy start
    init_lr = 0.03 * 8 / 256
    assert stats['lr'].tolist() == [init_lr, init_lr * 0.5 * (1 + math.cos(math.pi / 2))]
    assert (stats['epoch_time'] >= stats['train_time']).all() and (stats['images_per_s'] > 0).all()
    assert stats['images_per_s'].iloc[0] == pytest.approx(32 / stats['train_time'].iloc[0])


def test_plots_are_pngs_of_the_expected_size(run):
    assert png_size(run / 'run_statistics.png') == (1200, 750)
    assert png_size(run / 'run_linear_statistics.png') == (1200, 500)
    assert png_size(run / 'run_neighbours.png') == (1170, 1160)  # 9 columns x 8 rows of 130 x 145 px


def test_neighbours_are_the_nearest_training_images():
    bank = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    queries = bank[[3, 17]] + 0.01
    index, sim = monitor.nearest(torch.nn.functional.normalize(queries, dim=1), bank, 8)
    assert index[:, 0].tolist() == [3, 17]
    assert (sim[:, :-1] >= sim[:, 1:]).all()


def test_args_file_holds_every_flag(run):
    record = json.loads((run / 'run_args.json').read_text())
    assert set(record['args']) == set(vars(main.parse_args([])))
    assert record['args']['epochs'] == 2 and record['lr_resolved'] == pytest.approx(0.03 * 8 / 256)
    assert record['versions']['torch'] == torch.__version__
    assert record['device'] == 'cpu' and record['device_name']
    assert 'git_commit' in record
    lin = json.loads((run / 'run_linear_args.json').read_text())
    assert set(lin['args']) == set(vars(linear.parse_args([])))
    assert lin['pretrained']['epoch'] == 2


def test_redraw_from_csv_including_a_seed_style_log(run, tmp_path):
    seed_log = tmp_path / 'seed_statistics.csv'
    seed_log.write_text('epoch,train_loss,test_acc@1,test_acc@5\n1,-0.51,40.1,88.0\n2,-0.72,55.3,93.2\n')
    r = run_script('plot.py', seed_log, run / 'run_linear_statistics.csv')
    assert r.returncode == 0, r.stderr
    assert png_size(tmp_path / 'seed_statistics.png') == (1200, 750)
    assert png_size(run / 'run_linear_statistics.png') == (1200, 500)
    (tmp_path / 'other.csv').write_text('a,b\n1,2\n')
    r = run_script('plot.py', tmp_path / 'other.csv')
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"plot.py: error: '{tmp_path / 'other.csv'}' has no epoch and train_loss columns: not a log of these scripts"]


def test_collapse_warning_is_given_once(folder_data, tmp_path, monkeypatch, capsys):
    # as if every output were (nearly) the same vector
    monkeypatch.setattr(monitor, 'z_std_from_moments', lambda m, n: torch.full(m.shape[:-2], 0.001, dtype=torch.float64))
    main.main(main.parse_args([*TINY, '--data_root', folder_data, '--results_dir', str(tmp_path), '--epochs', '2',
                               '--name', 'flat']))
    err = capsys.readouterr().err
    assert err.count('warning: epoch 1: z_std_ratio 0.008 is under 0.2: the representation may be collapsing') == 1
    assert 'warning: epoch 2' not in err


def test_final_line_says_where_everything_went(folder_data, tmp_path, capsys):
    main.main(main.parse_args([*TINY, '--data_root', folder_data, '--results_dir', str(tmp_path), '--epochs', '1',
                               '--name', 'one']))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    acc = pd.read_csv(tmp_path / 'one_statistics.csv')['test_acc@1'].iloc[-1]
    for suffix in ('statistics.csv', 'model.pth', 'state.pth', 'statistics.png', 'neighbours.png', 'args.json'):
        assert str(tmp_path / f'one_{suffix}') in last
    assert last.endswith(f'epoch 1 kNN acc@1 {acc:.2f}% acc@5 100.00%')


def test_plot_panels_draw_from_rows(tmp_path):
    rows = [{'epoch': 1, 'train_loss': -0.2, 'test_acc@1': None, 'test_acc@5': None, 'z_std_ratio': 0.9, 'lr': 0.06},
            {'epoch': 2, 'train_loss': -0.4, 'test_acc@1': 30.0, 'test_acc@5': 80.0, 'z_std_ratio': 0.8, 'lr': 0.03}]
    plot.plot_pretrain(pd.DataFrame(rows), tmp_path / 'p.png')
    assert png_size(tmp_path / 'p.png') == (1200, 750)
