"""SimSiam model: CIFAR ResNet backbone, projection MLP, prediction MLP, and the loss.

Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021 (arXiv 2011.10566).
Sec. 3 gives the architecture and the symmetric loss; Appendix D the CIFAR-10 variant used here.
"""
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ARCHS = ('resnet18', 'resnet34', 'resnet50')


def cifar_resnet(arch):
    """A torchvision ResNet adapted to 32x32 inputs (paper App. D, following the SimCLR CIFAR variant).

    conv1 becomes 3x3 stride 1, the max-pool goes, and fc is removed, so the output is the pooled,
    flattened feature. `zero_init_residual` starts each residual block as an identity.
    Returns (module, feature dimension).
    """
    if arch not in ARCHS:
        raise ValueError(f'unknown arch {arch!r}; choose from {", ".join(ARCHS)}')
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True)
    dim = net.fc.in_features
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, dim


PREDICTORS = ('mlp', 'none', 'fixed')  # Sec. 4.2, Table 1
MLP_BN = ('none', 'hidden', 'default', 'all')  # Sec. 4.4, Table 3
SIMILARITIES = ('cosine', 'xent')  # Sec. 4.5, Table 4


def _mlp(dims, bn):
    """Linear layers through `dims`, ReLU between them; layer i is followed by a BatchNorm when bn[i]. A
    Linear followed by BN has no bias (BN's shift takes its place); one without BN keeps its bias."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(n_in, n_out, bias=not bn[i]))
        if bn[i]:
            layers.append(nn.BatchNorm1d(n_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def head_bn(mlp_bn):
    """Where Table 3 puts BN: (projector hidden, projector output), (predictor hidden, predictor output)."""
    return {'none': ((False, False), (False, False)),
            'hidden': ((True, False), (True, False)),
            'default': ((True, True), (True, False)),
            'all': ((True, True), (True, True))}[mlp_bn]


def projection_mlp(in_dim, hidden_dim, out_dim, bn=(True, True)):
    """The CIFAR projection MLP: 2 layers, by default BN on every layer including the output (App. D)."""
    return _mlp((in_dim, hidden_dim, out_dim), bn)


def prediction_mlp(dim, pred_dim, bn=(True, False)):
    """The prediction MLP h: a bottleneck, by default BN on its hidden layer and none on its output (Sec. 4.4)."""
    return _mlp((dim, pred_dim, dim), bn)


class SimSiam(nn.Module):
    """f = projector(backbone(x)), h = predictor; forward returns p1, p2 and the detached z1, z2.

    The switches of the paper's ablations (Sec. 4), each defaulting to SimSiam itself:
    predictor 'mlp' (trained), 'none' (the identity) or 'fixed' (kept at its random initialisation, no
    gradient); mlp_bn, where BN sits in the projector and predictor (Table 3, see head_bn); stop_grad False
    returns z with its graph, so that a loss on it sends gradients into the encoder through z as well.
    """

    def __init__(self, arch='resnet50', feature_dim=2048, pred_dim=512, proj_hidden_dim=2048, predictor='mlp',
                 mlp_bn='default', stop_grad=True):
        super().__init__()
        if predictor not in PREDICTORS:
            raise ValueError(f'unknown predictor {predictor!r}; choose from {", ".join(PREDICTORS)}')
        proj_bn, pred_bn = head_bn(mlp_bn)
        self.stop_grad = stop_grad
        self.backbone, self.backbone_dim = cifar_resnet(arch)
        self.projector = projection_mlp(self.backbone_dim, proj_hidden_dim, feature_dim, proj_bn)
        self.predictor = nn.Identity() if predictor == 'none' else prediction_mlp(feature_dim, pred_dim, pred_bn)
        if predictor == 'fixed':
            self.predictor.requires_grad_(False)

    def encode(self, x):
        return self.projector(self.backbone(x))

    def forward(self, x1, x2):
        # Two separate passes so that every BN layer normalises each view with its own statistics.
        z1 = self.encode(x1)  # NxC
        z2 = self.encode(x2)  # NxC
        p1 = self.predictor(z1)  # NxC
        p2 = self.predictor(z2)  # NxC
        if not self.stop_grad:
            return p1, p2, z1, z2
        return p1, p2, z1.detach(), z2.detach()


def negative_cosine(p, z):
    """D(p, z) = -cos(p, z), averaged over the batch (Sec. 3, Eq. 1)."""
    return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


def cross_entropy_similarity(p, z):
    """D(p, z) = -softmax(z) . log softmax(p), averaged over the batch (Sec. 4.5, Table 4); softmax over
    the channels."""
    return -(F.softmax(z.float(), dim=-1) * F.log_softmax(p.float(), dim=-1)).sum(dim=-1).mean()


def simsiam_loss(p1, p2, z1, z2, similarity='cosine', symmetric=True, stop_grad=True):
    """The symmetric loss L = D(p1, z2)/2 + D(p2, z1)/2 (Sec. 3, Eq. 4), z under the stop-gradient.

    Computed in float32 whatever the dtype of its inputs; with the cosine its minimum is -1. The ablations:
    similarity 'xent' (Sec. 4.5), symmetric False for D(p1, z2) alone (Sec. 4.6), stop_grad False lets the
    gradient reach z (Sec. 4.1).
    """
    d = negative_cosine if similarity == 'cosine' else cross_entropy_similarity
    if stop_grad:
        z1, z2 = z1.detach(), z2.detach()
    if not symmetric:
        return d(p1, z2)
    return 0.5 * d(p1, z2) + 0.5 * d(p2, z1)


PROBE_NORMS = ('bn', 'none')


class Probe(nn.Linear):
    """The linear classifier of linear evaluation, on frozen features.

    norm 'bn' puts a BatchNorm without affine parameters in front of it (as MAE's linear probing does):
    the features are centred and scaled by their running statistics, so the same lr works whatever their
    scale, and at test time it is still one linear map. The features are frozen, so their statistics do not
    drift: the running statistics are the plain average over every batch seen (momentum None), not an
    exponential one that lags behind for its first few dozen steps. norm 'none' is the plain Linear of the
    seed. Initialised as the official code does: weights N(0, 0.01), biases 0.
    """

    def __init__(self, dim, classes, norm='bn'):
        super().__init__(dim, classes)
        self.weight.data.normal_(mean=0.0, std=0.01)
        self.bias.data.zero_()
        self.norm = nn.BatchNorm1d(dim, affine=False, momentum=None) if norm == 'bn' else nn.Identity()

    def forward(self, x):
        return super().forward(self.norm(x))  # NxD -> NxC
