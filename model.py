"""The SimSiam model: its config, the ResNet backbone, projection MLP, prediction MLP, the loss, and the
model's sizes and parameter groups.

Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021 (arXiv 2011.10566).
Sec. 3 gives the architecture and the symmetric loss; Appendix D the CIFAR-10 variant used here.
"""
import copy
from dataclasses import asdict, dataclass, fields

import thop
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from augment import IMAGE_SIZE
from errors import UserError

ARCHS = ('resnet18', 'resnet34', 'resnet50')
STEMS = ('cifar', 'imagenet')  # the first layers: 3x3 stride-1 conv1 without max-pool, or torchvision's
PREDICTORS = ('mlp', 'none', 'fixed')  # Sec. 4.2, Table 1
MLP_BN = ('none', 'hidden', 'default', 'all')  # Sec. 4.4, Table 3
SIMILARITIES = ('cosine', 'xent')  # Sec. 4.5, Table 4

# The ablation switches as flags, and their SimSiam values (Sec. 4): a run name says each one that differs.
ABLATIONS = {'stop_grad': 'on', 'predictor': 'mlp', 'mlp_bn': 'default', 'loss': 'cosine', 'symmetric': 'on'}


@dataclass(frozen=True)
class ModelConfig:
    """Everything that builds a SimSiam model, SimSiam's values (CIFAR recipe, App. D) as defaults.

    Stored in every checkpoint as a plain dict (`model_args`), so a consumer rebuilds the model from the
    file alone: SimSiam(ModelConfig.from_dict(ckpt['model_args'])).
    """
    arch: str = 'resnet50'
    feature_dim: int = 2048  # projector output, and predictor input and output
    pred_dim: int = 512  # predictor bottleneck
    proj_hidden_dim: int = 2048
    predictor: str = 'mlp'  # Sec. 4.2: 'mlp', 'none' (identity) or 'fixed' (random, never trained)
    mlp_bn: str = 'default'  # Sec. 4.4, Table 3: where BN sits in the heads (see head_bn)
    stop_grad: bool = True  # Sec. 4.1: False lets the gradient reach the targets z
    stem: str = 'cifar'  # 'cifar' (App. D) or 'imagenet' (torchvision's 7x7 stride-2 conv1 and max-pool)
    proj_layers: int = 2  # the projector's Linear layers: 2 (CIFAR, App. D) or 3 (ImageNet, Sec. 3)
    proj_out_affine: bool = True  # the projector's output BN learns a scale and shift (False on ImageNet)

    @classmethod
    def from_settings(cls, settings):
        """The config of a run's settings (its flags as a dict; a switch they lack is SimSiam's)."""
        s = {**ABLATIONS, **settings}
        return cls(arch=s['arch'], feature_dim=s['feature_dim'], pred_dim=s['pred_dim'],
                   proj_hidden_dim=s['proj_hidden_dim'], predictor=s['predictor'], mlp_bn=s['mlp_bn'],
                   stop_grad=s['stop_grad'] == 'on',
                   stem=resolve_stem(s.get('stem', 'cifar'), s.get('image_size') or IMAGE_SIZE),
                   proj_layers=s.get('proj_layers', 2), proj_out_affine=s.get('proj_out_affine', 'on') == 'on')

    @classmethod
    def from_dict(cls, saved):
        """The config a checkpoint's `model_args` describes; a field it lacks (written by older code) takes
        its default. Raises ValueError for a key that is not a field."""
        unknown = set(saved) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f'unknown model_args {", ".join(sorted(unknown))}')
        return cls(**saved)

    def to_dict(self):
        return asdict(self)


def resolve_stem(stem, image_size):
    """'auto' is the CIFAR stem up to 64 px and torchvision's above: a 7x7 stride-2 conv1 and a max-pool
    shrink a 32 px image to 8x8 before the first block, while at 224 px they are what ImageNet ResNets use."""
    if stem == 'auto':
        return 'cifar' if image_size <= 64 else 'imagenet'
    return stem


def resnet(arch, stem='cifar'):
    """A torchvision ResNet without its fc, so the output is the pooled, flattened feature.

    stem 'cifar' adapts it to 32x32 inputs (paper App. D, following the SimCLR CIFAR variant): conv1
    becomes 3x3 stride 1 and the max-pool goes. 'imagenet' keeps torchvision's stem. `zero_init_residual`
    starts each residual block as an identity. Returns (module, feature dimension).
    """
    if arch not in ARCHS:
        raise ValueError(f'unknown arch {arch!r}; choose from {", ".join(ARCHS)}')
    if stem not in STEMS:
        raise ValueError(f'unknown stem {stem!r}; choose from {", ".join(STEMS)}')
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True)
    dim = net.fc.in_features
    if stem == 'cifar':
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, dim



def _mlp(dims, bn, out_affine=True):
    """Linear layers through `dims`, ReLU between them; layer i is followed by a BatchNorm when bn[i] (the
    last one without a learnt scale and shift unless out_affine). A Linear followed by BN has no bias (BN's
    shift, or the normalisation, takes its place); one without BN keeps its bias."""
    layers = []
    last = len(dims) - 2
    for i, (n_in, n_out) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(n_in, n_out, bias=not bn[i]))
        if bn[i]:
            layers.append(nn.BatchNorm1d(n_out, affine=out_affine or i < last))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def head_bn(mlp_bn):
    """Where Table 3 puts BN: (projector hidden, projector output), (predictor hidden, predictor output)."""
    return {'none': ((False, False), (False, False)),
            'hidden': ((True, False), (True, False)),
            'default': ((True, True), (True, False)),
            'all': ((True, True), (True, True))}[mlp_bn]


def projection_mlp(in_dim, hidden_dim, out_dim, bn=(True, True), layers=2, out_affine=True):
    """The projection MLP: 2 layers (CIFAR, App. D) or 3 (ImageNet, Sec. 3: 2048-2048-2048), by default BN
    on every layer including the output (bn: hidden layers, output); on ImageNet the output BN has no
    affine parameters, as in the official code."""
    hidden, out = bn
    return _mlp((in_dim, *[hidden_dim] * (layers - 1), out_dim), (hidden,) * (layers - 1) + (out,), out_affine)


def prediction_mlp(dim, pred_dim, bn=(True, False)):
    """The prediction MLP h: a bottleneck, by default BN on its hidden layer and none on its output (Sec. 4.4)."""
    return _mlp((dim, pred_dim, dim), bn)


class SimSiam(nn.Module):
    """f = projector(backbone(x)), h = predictor; forward returns p1, p2 and the targets z1, z2 under the
    stop-gradient (Sec. 3, Algorithm 1): the one place where it is applied.

    The switches of the paper's ablations (Sec. 4) are the config's: predictor 'mlp' (trained), 'none'
    (the identity) or 'fixed' (kept at its random initialisation, no gradient); mlp_bn, where BN sits in
    the projector and predictor (Table 3, see head_bn); stop_grad False returns z with its graph, so that
    the loss sends gradients into the encoder through z as well.
    """

    def __init__(self, config=ModelConfig()):
        super().__init__()
        if config.predictor not in PREDICTORS:
            raise ValueError(f'unknown predictor {config.predictor!r}; choose from {", ".join(PREDICTORS)}')
        proj_bn, pred_bn = head_bn(config.mlp_bn)
        self.config = config
        self.backbone, self.backbone_dim = resnet(config.arch, config.stem)
        self.projector = projection_mlp(self.backbone_dim, config.proj_hidden_dim, config.feature_dim, proj_bn,
                                        config.proj_layers, config.proj_out_affine)
        self.predictor = nn.Identity() if config.predictor == 'none' else \
            prediction_mlp(config.feature_dim, config.pred_dim, pred_bn)
        if config.predictor == 'fixed':
            self.predictor.requires_grad_(False)

    def encode(self, x):
        return self.projector(self.backbone(x))

    def forward(self, x1, x2):
        # Two separate passes so that every BN layer normalises each view with its own statistics.
        z1 = self.encode(x1)  # NxC
        z2 = self.encode(x2)  # NxC
        p1 = self.predictor(z1)  # NxC
        p2 = self.predictor(z2)  # NxC
        if not self.config.stop_grad:
            return p1, p2, z1, z2
        return p1, p2, z1.detach(), z2.detach()

    def param_groups(self, fix_pred_lr=False):
        """The optimizer's parameter groups: the encoder, and the predictor's trained parameters (none when it
        is the identity or kept fixed, so it is neither trained nor decayed), whose 'fix_lr' keeps it at the
        initial lr when asked (Table 1c, as the official code's --fix-pred-lr)."""
        groups = [{'params': list(self.backbone.parameters()) + list(self.projector.parameters()), 'fix_lr': False},
                  {'params': [p for p in self.predictor.parameters() if p.requires_grad], 'fix_lr': fix_pred_lr}]
        return [g for g in groups if g['params']]


def checkpoint_weights(ckpt):
    """The SimSiam weights in a main.py checkpoint, model file or state: under 'model' (model files written
    before the two were one layout hold them under 'state_dict')."""
    return ckpt['model'] if 'model' in ckpt else ckpt['state_dict']


def pretrained_backbone(ckpt, source):
    """(backbone, feature dim) rebuilt from a main.py checkpoint (model file or state) alone, its weights
    loaded strictly; a file that does not describe one, or does not fit it, is a UserError naming `source`
    (the flag and path it came from)."""
    try:
        config = ModelConfig.from_dict(ckpt['model_args'])
        weights = checkpoint_weights(ckpt)
        backbone, dim = resnet(config.arch, config.stem)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f'{source} does not describe a SimSiam model ({e})') from None
    fits = f'{source} does not fit a {config.arch} backbone ({config.stem} stem)'
    try:
        result = backbone.load_state_dict({k[len('backbone.'):]: v for k, v in weights.items()
                                           if k.startswith('backbone.')}, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise UserError(f'{fits}: {str(e).splitlines()[-1].strip()}') from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f'{fits}: missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}')
    return backbone, dim


def count_model(model, classes, image_size, device):
    """Params (M) and thop FLOPs (G, multiply-adds) for one image of image_size x image_size: of the backbone,
    of the backbone with a linear head over `classes` classes (what linear evaluation runs), and of the whole
    SimSiam model (the backbone, projector and predictor of one view: what the seed's results table counts)."""
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    copy_ = copy.deepcopy(model).eval()  # thop leaves buffers behind: count a copy
    head = torch.nn.Sequential(copy_.backbone, torch.nn.Linear(model.backbone_dim, classes)).to(device)
    flops, params = thop.profile(head, inputs=(x,), verbose=False)
    copy_ = copy.deepcopy(model).eval()
    simsiam_flops, _ = thop.profile(torch.nn.Sequential(copy_.backbone, copy_.projector, copy_.predictor),
                                    inputs=(x,), verbose=False)
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    n_total = sum(p.numel() for p in model.parameters())
    return {'backbone_params_M': n_backbone / 1e6, 'linear_params_M': params / 1e6,
            'flops_G': flops / 1e9, 'simsiam_params_M': n_total / 1e6, 'simsiam_flops_G': simsiam_flops / 1e9}


def negative_cosine(p, z):
    """D(p, z) = -cos(p, z), averaged over the batch (Sec. 3, Eq. 1)."""
    return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


def cross_entropy_similarity(p, z):
    """D(p, z) = -softmax(z) . log softmax(p), averaged over the batch (Sec. 4.5, Table 4); softmax over
    the channels."""
    return -(F.softmax(z.float(), dim=-1) * F.log_softmax(p.float(), dim=-1)).sum(dim=-1).mean()


def simsiam_loss(p1, p2, z1, z2, similarity='cosine', symmetric=True):
    """The symmetric loss L = D(p1, z2)/2 + D(p2, z1)/2 (Sec. 3, Eq. 4); z comes from SimSiam.forward, under
    the stop-gradient there.

    Computed in float32 whatever the dtype of its inputs; with the cosine its minimum is -1. The ablations:
    similarity 'xent' (Sec. 4.5), symmetric False for D(p1, z2) alone (Sec. 4.6).
    """
    d = negative_cosine if similarity == 'cosine' else cross_entropy_similarity
    if not symmetric:
        return d(p1, z2)
    return 0.5 * d(p1, z2) + 0.5 * d(p2, z1)
