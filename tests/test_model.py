import math

import pytest
import torch
import torch.nn as nn

import main
import optim
from model import ModelConfig, SimSiam, count_model, resnet, simsiam_loss


def test_backbone_is_the_cifar_variant():
    net, dim = resnet('resnet50')
    assert dim == 2048
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.padding == (1, 1)
    assert net.conv1.bias is None
    assert isinstance(net.maxpool, nn.Identity) and isinstance(net.fc, nn.Identity)
    # zero_init_residual: the last BN of every bottleneck starts at zero
    assert all(not block.bn3.weight.detach().any() for layer in (net.layer1, net.layer4) for block in layer)
    out = net.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 2048)


@pytest.mark.parametrize('arch,dim', [('resnet18', 512), ('resnet34', 512)])
def test_small_backbones(arch, dim):
    net, d = resnet(arch)
    assert d == dim
    assert net.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, dim)
    assert all(not block.bn2.weight.detach().any() for block in net.layer1)


def test_the_imagenet_stem_is_torchvisions_and_auto_picks_it_above_64_px():
    import torchvision
    from model import resolve_stem
    net, dim = resnet('resnet18', 'imagenet')
    reference = torchvision.models.resnet18()
    assert (net.conv1.kernel_size, net.conv1.stride, net.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(net.maxpool, nn.MaxPool2d) and isinstance(net.fc, nn.Identity)
    reference.fc = nn.Identity()
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert net.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, dim)
    assert [resolve_stem('auto', size) for size in (32, 64, 96, 224)] == ['cifar', 'cifar', 'imagenet', 'imagenet']
    assert resolve_stem('imagenet', 32) == 'imagenet' and resolve_stem('cifar', 224) == 'cifar'
    model = SimSiam(ModelConfig('resnet18', stem='imagenet'))
    assert model.backbone.conv1.kernel_size == (7, 7)
    # a config of a file written before the stem was a choice is the CIFAR one
    assert ModelConfig.from_dict({'arch': 'resnet18'}).stem == 'cifar'
    with pytest.raises(ValueError, match='unknown stem'):
        resnet('resnet18', 'tiny')


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match='unknown arch'):
        resnet('vgg16')


def test_projector_and_predictor_layout():
    model = SimSiam(ModelConfig('resnet18', feature_dim=256, pred_dim=64, proj_hidden_dim=128))
    types = [type(m) for m in model.projector]
    assert types == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert model.projector[0].in_features == 512 and model.projector[0].out_features == 128
    assert model.projector[3].out_features == 256
    assert model.projector[0].bias is None and model.projector[3].bias is None
    types = [type(m) for m in model.predictor]
    assert types == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # no BN on the output
    assert (model.predictor[0].in_features, model.predictor[0].out_features) == (256, 64)
    assert model.predictor[0].bias is None
    assert (model.predictor[3].in_features, model.predictor[3].out_features) == (64, 256)


def test_default_dims_are_the_papers():
    model = SimSiam(ModelConfig('resnet18'))
    assert model.projector[0].out_features == 2048 and model.projector[3].out_features == 2048
    assert model.predictor[0].out_features == 512 and model.predictor[3].out_features == 2048


def test_forward_shapes_and_detached_targets():
    torch.manual_seed(0)
    model = SimSiam(ModelConfig('resnet18', feature_dim=128, pred_dim=32, proj_hidden_dim=64))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    p1, p2, z1, z2 = model(x1, x2)
    assert p1.shape == p2.shape == z1.shape == z2.shape == (4, 128)
    assert p1.requires_grad and p2.requires_grad
    assert not z1.requires_grad and not z2.requires_grad


def test_views_get_their_own_batchnorm_statistics():
    # In train mode BN normalises with batch statistics: with two separate passes, view 1's outputs
    # cannot depend on view 2; one concatenated pass would mix them.
    torch.manual_seed(0)
    model = SimSiam(ModelConfig('resnet18', feature_dim=64, pred_dim=16, proj_hidden_dim=32)).train()
    x1 = torch.randn(4, 3, 32, 32)
    p1a, _, z1a, _ = model(x1, torch.randn(4, 3, 32, 32))
    p1b, _, z1b, _ = model(x1, torch.randn(4, 3, 32, 32) * 3 + 1)
    torch.testing.assert_close(p1a, p1b)
    torch.testing.assert_close(z1a, z1b)


def test_loss_matches_hand_computation():
    p1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cosines 1 and 1/sqrt(2)
    p2 = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    z1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # cosines 0 and -1
    expected = 0.5 * -(1 + 1 / math.sqrt(2)) / 2 + 0.5 * -(0 - 1) / 2
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(expected, abs=1e-6)


def test_loss_is_minus_one_when_predictions_match_targets():
    z = torch.randn(8, 16)
    assert simsiam_loss(z * 2, z * 3, z, z).item() == pytest.approx(-1.0, abs=1e-6)


def test_the_targets_are_constants_to_the_loss():
    # The stop-gradient (applied once, in SimSiam.forward): the loss on the model's outputs gives every
    # parameter the gradient it has with z replaced by fixed copies, and z itself gets none.
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    grads = []
    for constant in (False, True):
        model = tiny()
        p1, p2, z1, z2 = model(x1, x2)
        if constant:
            z1, z2 = z1.detach().clone(), z2.detach().clone()
        else:
            assert not z1.requires_grad and not z2.requires_grad
        simsiam_loss(p1, p2, z1, z2).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        assert p1.requires_grad and sum(float(g.abs().sum()) for g in grads[-1]) > 0
    assert len(grads[0]) == len(grads[1]) and all(torch.equal(a, b) for a, b in zip(*grads))


def test_loss_is_float32_under_bf16_inputs():
    p = torch.randn(4, 8).bfloat16()
    assert simsiam_loss(p, p, p, p).dtype == torch.float32


def test_encoder_gradient_comes_only_through_the_predictor():
    # With the stop-gradient, zeroing the predictor's last layer zeroes every gradient in the encoder:
    # the only path from the loss to the encoder is through p.
    torch.manual_seed(0)
    model = SimSiam(ModelConfig('resnet18', feature_dim=32, pred_dim=8, proj_hidden_dim=16))
    with torch.no_grad():
        model.predictor[3].weight.zero_()
        model.predictor[3].bias.normal_()
    p1, p2, z1, z2 = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    simsiam_loss(p1, p2, z1, z2).backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.projector.parameters())
    assert float(model.predictor[3].weight.grad.abs().sum()) > 0


def test_param_and_flop_counts_match_the_seed_table():
    counts = count_model(SimSiam(ModelConfig('resnet50')), 10, 32, torch.device('cpu'))
    assert round(counts['backbone_params_M'], 2) == 23.50
    assert round(counts['linear_params_M'], 2) == 23.52
    assert round(counts['flops_G'], 2) == 1.31
    # the head has one output per class: 2048 x 100 + 100 parameters for CIFAR-100
    hundred = count_model(SimSiam(ModelConfig('resnet50')), 100, 32, torch.device('cpu'))
    assert hundred['linear_params_M'] * 1e6 - counts['linear_params_M'] * 1e6 == pytest.approx(2049 * 90)


def test_counting_leaves_the_model_untouched():
    model = SimSiam(ModelConfig('resnet18', feature_dim=64, pred_dim=16, proj_hidden_dim=32))
    keys = set(model.state_dict())
    count_model(model, 4, 32, torch.device('cpu'))
    assert set(model.state_dict()) == keys


# ----------------------------------------------------------------------------- the paper's ablation switches

def tiny(**switches):
    torch.manual_seed(0)
    return SimSiam(ModelConfig('resnet18', feature_dim=32, pred_dim=8, proj_hidden_dim=16, **switches))


def test_without_stop_gradient_z_gets_a_gradient():
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    _, _, z1, _ = tiny()(x1, x2)
    assert not z1.requires_grad  # SimSiam: z is a constant target
    model = tiny(stop_grad=False)
    p1, p2, z1, z2 = model(x1, x2)
    z1.retain_grad()
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is not None and float(z1.grad.abs().sum()) > 0
    # the encoder's gradient no longer comes only through the predictor (compare the test above)
    model = tiny(stop_grad=False)
    with torch.no_grad():
        model.predictor[3].weight.zero_()
    p1, p2, z1, z2 = model(x1, x2)
    simsiam_loss(p1, p2, z1, z2).backward()
    assert float(model.projector[0].weight.grad.abs().sum()) > 0


def test_predictor_none_is_the_identity():
    model = tiny(predictor='none')
    assert isinstance(model.predictor, nn.Identity) and not list(model.predictor.parameters())
    p1, p2, z1, z2 = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert torch.equal(p1, z1) and torch.equal(p2, z2)
    groups = optim.sgd(model.param_groups(), 0.1, 0.9, 5e-4).param_groups
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))


def test_fixed_predictor_stays_at_its_initialisation_and_out_of_the_optimizer():
    model = tiny(predictor='fixed')
    trained = tiny()
    for a, b in zip(model.predictor.parameters(), trained.predictor.parameters()):
        assert torch.equal(a, b)  # the same random initialisation as a trained one
    before = {k: v.clone() for k, v in model.predictor.named_parameters()}
    optimizer = optim.sgd(model.param_groups(fix_pred_lr=False), 0.5, 0.9, 5e-4)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g['params']}
    assert not any(id(p) in in_optimizer for p in model.predictor.parameters())
    backbone_before = model.backbone.conv1.weight.clone()
    for _ in range(3):
        p1, p2, z1, z2 = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
        optimizer.zero_grad()
        simsiam_loss(p1, p2, z1, z2).backward()
        optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in model.predictor.named_parameters())
    assert not torch.equal(model.backbone.conv1.weight, backbone_before)  # the rest did train


def layer_kinds(mlp):
    """'L' for a Linear with a bias, 'l' without, 'B' for BatchNorm, 'R' for ReLU."""
    return ''.join('B' if isinstance(m, nn.BatchNorm1d) else 'R' if isinstance(m, nn.ReLU) else
                   'L' if m.bias is not None else 'l' for m in mlp)


@pytest.mark.parametrize('mlp_bn,projector,predictor', [
    ('none', 'LRL', 'LRL'),          # Table 3 (a): no BN in either head
    ('hidden', 'lBRL', 'lBRL'),      # (b): on the hidden layers only
    ('default', 'lBRlB', 'lBRL'),    # (c): also on the projector output: SimSiam
    ('all', 'lBRlB', 'lBRlB'),       # (d): also on the predictor output
])
def test_bn_settings_put_bn_where_table_3_says(mlp_bn, projector, predictor):
    model = tiny(mlp_bn=mlp_bn)
    assert layer_kinds(model.projector) == projector
    assert layer_kinds(model.predictor) == predictor


def test_cross_entropy_similarity_by_hand():
    p1, z2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])  # softmax(z2) = (1/4, 3/4)
    p2, z1 = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    # -sum softmax(z) log softmax(p): log softmax(p1) = (1 - log(1 + e), -log(1 + e))
    d12 = -(0.25 * (1 - math.log(1 + math.e)) + 0.75 * -math.log(1 + math.e))
    d21 = math.log(2.0)  # uniform against uniform: the entropy of two classes
    got = simsiam_loss(p1, p2, z1, z2, similarity='xent')
    assert got.item() == pytest.approx(0.5 * d12 + 0.5 * d21, abs=1e-6)
    # z is stopped as with the cosine: with the predictor's last layer zeroed, the projector gets no gradient
    model = tiny()
    with torch.no_grad():
        model.predictor[3].weight.zero_()
    simsiam_loss(*model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)), similarity='xent').backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.projector.parameters())


def test_asymmetric_loss_is_its_one_term():
    torch.manual_seed(1)
    p1, p2, z1, z2 = torch.randn(4, 5, 8).unbind(0)
    one = -torch.nn.functional.cosine_similarity(p1, z2, dim=-1).mean()
    assert simsiam_loss(p1, p2, z1, z2, symmetric=False).item() == pytest.approx(one.item(), abs=1e-6)
    assert simsiam_loss(p1, p2, z1, z2).item() != pytest.approx(one.item(), abs=1e-3)


def test_a_switch_that_is_not_simsiams_is_in_the_run_name():
    base = ['--arch', 'resnet18', '--dataset', 'folder']
    assert main.run_name(main.parse_args(base)) == 'resnet18_folder_2048_200_512_800'
    assert main.run_name(main.parse_args(base + ['--stop_grad', 'off', '--loss', 'xent'])) == \
        'resnet18_folder_2048_200_512_800_stop_grad-off_loss-xent'
    assert main.run_name(main.parse_args(base + ['--mlp_bn', 'none', '--fix_pred_lr'])) == \
        'resnet18_folder_2048_200_512_800_mlp_bn-none_fix_pred_lr'
    names = {main.run_name(main.parse_args(base + extra)) for extra in (
        [], ['--stop_grad', 'off'], ['--predictor', 'none'], ['--predictor', 'fixed'], ['--mlp_bn', 'none'],
        ['--mlp_bn', 'hidden'], ['--mlp_bn', 'all'], ['--loss', 'xent'], ['--symmetric', 'off'], ['--fix_pred_lr'])}
    assert len(names) == 10  # no ablation overwrites another's files, nor the baseline's
    # a stem other than the image size's default is named too; the default, given or chosen, is not
    assert main.run_name(main.parse_args(base + ['--stem', 'imagenet'])) == \
        'resnet18_folder_2048_200_512_800_stem-imagenet'
    assert main.run_name(main.parse_args(base + ['--stem', 'cifar'])) == 'resnet18_folder_2048_200_512_800'
