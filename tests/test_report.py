"""report.py on a folder of tiny runs: the rows and their numbers against the CSVs, the picture, runs in
progress, linear runs alone, the seed's 4-column logs, and a folder with no run."""
import json
import shutil

import pandas as pd
import pytest
import torch

import linear
import main
import report
from conftest import COLLAPSE, FP32, png_size, run_script
from model import ModelConfig, SimSiam, count_model


@pytest.fixture(scope='module')
def folder(collapse_runs, tmp_path_factory):
    """The three collapse runs (SimSiam and two ablations) and a linear evaluation of SimSiam's."""
    out = tmp_path_factory.mktemp('report')
    for f in collapse_runs[0].iterdir():
        shutil.copy(f, out / f.name)
    linear.main(linear.parse_args(['--model_path', str(out / 'simsiam_model.pth'), '--results_dir', str(out),
                                   '--epochs', '1', '--batch_size', '16', '--device', 'cpu', '--num_workers', '0',
                                   *FP32]))
    return out


def cells(table):
    lines = [line for line in table.splitlines() if line.startswith('| ') and not line.startswith('| ---')]
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    return [dict(zip(header, (c.strip() for c in line.strip('|').split('|')))) for line in lines[1:]]


def test_the_table_has_a_row_per_run_with_the_numbers_of_its_csv(folder):
    r = run_script('report.py', folder)
    assert r.returncode == 0, r.stderr
    rows = {row['Run']: row for row in cells(r.stdout)}
    assert sorted(rows) == ['no_predictor', 'no_stop_grad', 'simsiam', 'simsiam_linear']
    assert (folder / 'report.md').read_text() == r.stdout[:r.stdout.index('4 run(s)')]
    settings = vars(main.parse_args(COLLAPSE))
    simsiam = count_model(SimSiam(ModelConfig.from_settings(settings)), 4, 32, torch.device('cpu'))
    for name in ('simsiam', 'no_stop_grad', 'no_predictor'):
        row, log = rows[name], pd.read_csv(folder / f'{name}_statistics.csv')
        assert row['Evaluation Protocol'] == 'KNN'
        assert (row['Feature Dim'], row['Batch Size'], row['Epoch Num'], row['K']) == ('256', '16', '6', '5')
        assert row['Top1 Acc %'] == f'{log["test_acc@1"].iloc[-1]:.1f}'
        assert row['Top5 Acc %'] == f'{log["test_acc@5"].iloc[-1]:.1f}'
    # without a predictor there are fewer parameters; the others count the whole SimSiam model
    assert rows['simsiam']['Params (M)'] == f'{simsiam["simsiam_params_M"]:.2f}'
    assert rows['simsiam']['FLOPs (G)'] == f'{simsiam["simsiam_flops_G"]:.2f}'
    assert float(rows['no_predictor']['Params (M)']) < float(rows['simsiam']['Params (M)'])
    assert rows['simsiam']['Switches'] == '--mlp_bn hidden'
    assert rows['no_stop_grad']['Switches'] == '--stop_grad off --mlp_bn hidden'
    assert rows['no_predictor']['Switches'] == '--predictor none --mlp_bn hidden'
    lin, log = rows['simsiam_linear'], pd.read_csv(folder / 'simsiam_linear_statistics.csv')
    assert (lin['Evaluation Protocol'], lin['Feature Dim'], lin['K'], lin['Epoch Num']) == ('Linear', '-', '-', '1')
    assert lin['Params (M)'] == f'{simsiam["linear_params_M"]:.2f}' and lin['FLOPs (G)'] == f'{simsiam["flops_G"]:.2f}'
    assert lin['Top1 Acc %'] == f'{log["test_acc@1"].iloc[-1]:.1f}'
    assert lin['Switches'] == '--mlp_bn hidden'  # those of the model it evaluates
    assert png_size(folder / 'report.png') == (1500, 500)


def test_runs_in_progress_seed_logs_and_linear_runs_alone(folder, tmp_path):
    log = pd.read_csv(folder / 'simsiam_statistics.csv')
    log.iloc[:3].to_csv(tmp_path / 'partial_statistics.csv', index=False)  # a run at epoch 3 of 6
    shutil.copy(folder / 'simsiam_args.json', tmp_path / 'partial_args.json')
    (tmp_path / 'seed_statistics.csv').write_text('epoch,train_loss,test_acc@1,test_acc@5\n1,-0.5,40.1,88.0\n'
                                                  '2,-0.7,55.3,93.2\n')
    table, rows, logs = report.report(str(tmp_path))
    by_name = {row['run']: row for row in rows}
    assert by_name['partial']['Epoch Num'] == '3 of 6'
    assert by_name['partial']['Top1 Acc %'] == '-'  # --knn_every 6: no kNN numbers yet
    seed = by_name['seed']
    assert (seed['Top1 Acc %'], seed['Top5 Acc %'], seed['Epoch Num']) == ('55.3', '93.2', '2')
    assert seed['Params (M)'] == seed['Feature Dim'] == seed['K'] == '-'  # no record says them
    assert set(logs) == {'partial', 'seed'}
    report.main(report.parse_args([str(tmp_path)]))
    assert png_size(tmp_path / 'report.png') == (1500, 500)

    only = tmp_path / 'only_linear'
    only.mkdir()
    for f in ('simsiam_linear_statistics.csv', 'simsiam_linear_args.json'):
        shutil.copy(folder / f, only / f)
    _, rows, logs = report.report(str(only))
    assert [row['Evaluation Protocol'] for row in rows] == ['Linear'] and not logs
    report.main(report.parse_args([str(only)]))
    assert (only / 'report.md').exists() and not (only / 'report.png').exists()
    record = json.loads((only / 'simsiam_linear_args.json').read_text())
    assert record['pretrained']['args']['mlp_bn'] == 'hidden'


def test_the_seeds_linear_log_runs_without_records_and_a_run_in_progress_evaluated(folder, tmp_path):
    # the seed's linear.py writes linear_statistics.csv: an evaluation, told by its columns, not its name
    (tmp_path / 'linear_statistics.csv').write_text(
        'epoch,train_loss,train_acc@1,train_acc@5,test_loss,test_acc@1,test_acc@5\n1,1.2,60.0,95.0,1.1,61.5,96.0\n')
    shutil.copy(folder / 'no_predictor_statistics.csv', tmp_path / 'norecord_statistics.csv')  # no args.json
    shutil.copy(folder / 'simsiam_linear_statistics.csv', tmp_path / 'early_linear_statistics.csv')
    record = json.loads((folder / 'simsiam_linear_args.json').read_text())
    record['pretrained']['epoch'] = 2  # an evaluation of the state of epoch 2 of the 6 planned
    (tmp_path / 'early_linear_args.json').write_text(json.dumps(record))
    _, rows, logs = report.report(str(tmp_path))
    by_name = {row['run']: row for row in rows}
    assert sorted(by_name) == ['early_linear (of pretraining epoch 2 of 6)', 'linear', 'norecord']
    seed = by_name['linear']
    assert (seed['Evaluation Protocol'], seed['Top1 Acc %'], seed['Top5 Acc %']) == ('Linear', '61.5', '96.0')
    assert seed['switches'] == by_name['norecord']['switches'] == report.UNKNOWN  # not SimSiam's, unknown
    assert by_name['norecord']['Evaluation Protocol'] == 'KNN' and set(logs) == {'norecord'}
    assert by_name['early_linear (of pretraining epoch 2 of 6)']['switches'] == ['--mlp_bn hidden']


def test_a_folder_without_runs_is_one_line(tmp_path):
    (tmp_path / 'notes.txt').write_text('nothing here')
    r = run_script('report.py', tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"report.py: error: '{tmp_path}' holds no run: no <name>_statistics.csv or <name>_linear_statistics.csv in it"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt']
