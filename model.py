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


def projection_mlp(in_dim, hidden_dim, out_dim):
    """The CIFAR projection MLP: 2 layers, BN on every layer including the output (App. D)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim),
    )


def prediction_mlp(dim, pred_dim):
    """The prediction MLP h: a bottleneck with BN on its hidden layer and none on its output (Sec. 4.4)."""
    return nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False),
        nn.BatchNorm1d(pred_dim),
        nn.ReLU(inplace=True),
        nn.Linear(pred_dim, dim),
    )


class SimSiam(nn.Module):
    """f = projector(backbone(x)), h = predictor; forward returns p1, p2 and the detached z1, z2."""

    def __init__(self, arch='resnet50', feature_dim=2048, pred_dim=512, proj_hidden_dim=2048):
        super().__init__()
        self.backbone, self.backbone_dim = cifar_resnet(arch)
        self.projector = projection_mlp(self.backbone_dim, proj_hidden_dim, feature_dim)
        self.predictor = prediction_mlp(feature_dim, pred_dim)

    def encode(self, x):
        return self.projector(self.backbone(x))

    def forward(self, x1, x2):
        # Two separate passes so that every BN layer normalises each view with its own statistics.
        z1 = self.encode(x1)  # NxC
        z2 = self.encode(x2)  # NxC
        p1 = self.predictor(z1)  # NxC
        p2 = self.predictor(z2)  # NxC
        return p1, p2, z1.detach(), z2.detach()


def negative_cosine(p, z):
    """D(p, z) = -cos(p, stopgrad(z)), averaged over the batch (Sec. 3, Eq. 1 with the stop-gradient)."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def simsiam_loss(p1, p2, z1, z2):
    """The symmetric loss L = D(p1, z2)/2 + D(p2, z1)/2 (Sec. 3, Eq. 4); z never receives a gradient.

    Computed in float32 whatever the dtype of its inputs. Its minimum is -1.
    """
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)
