"""The optimisation recipe: SGD over parameter groups, LARS for the linear classifier of the ImageNet linear
evaluation, the paper's lr rule lr x batch_size / 256, and the cosine schedule (paper Sec. 4 and App. D)."""
import math

import torch

from errors import JobError


def scaled_lr(base_lr, batch_size):
    """The lr of SGD: base_lr x batch_size / 256 (the paper's rule, Sec. 4), batch_size the global batch; one
    that float32 weights cannot be stepped with is refused."""
    lr = base_lr * batch_size / 256
    if lr > torch.finfo(torch.float32).max:
        raise JobError(f'--lr {base_lr:g} gives SGD an lr of {lr:.3g} (x batch_size {batch_size} / 256), beyond '
                       f'float32 ({torch.finfo(torch.float32).max:.3g}); use a smaller --lr')
    return lr


def cosine_lr(init_lr, epoch, epochs):
    """lr for 0-based `epoch`: init_lr * (1 + cos(pi * epoch / epochs)) / 2 (paper Sec. 4, SGDR)."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def sgd(groups, init_lr, momentum, weight_decay):
    """SGD with momentum and weight decay on every group (paper Sec. 4, App. D); a group may carry 'fix_lr'."""
    return torch.optim.SGD(groups, lr=init_lr, momentum=momentum, weight_decay=weight_decay)


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step on a weight (a parameter of more than one dimension) is rescaled layer by
    layer, as in MoCo v3's linear evaluation on ImageNet (the official SimSiam code wraps SGD in apex's LARC,
    which rescales a bias too once it is non-zero). For a weight p with gradient g,
    g + weight_decay x p is multiplied by the trust ratio q = trust_coefficient x ||p|| / ||g + weight_decay x p||,
    or by 1 when either norm is 0 (q is not capped at 1); a bias or batch-norm parameter (one dimension or none)
    keeps its plain gradient, with no weight decay. Then mu = momentum x mu + that step, mu starting at zeros and
    kept in the state as 'mu', and p = p - lr x mu."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns closure's loss when given a closure."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group['weight_decay'])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = group['trust_coefficient'] * p_norm / u_norm
                    update = update * torch.where((p_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                state['mu'].mul_(group['momentum']).add_(update)
                p.sub_(state['mu'], alpha=group['lr'])
        return loss


def lars(params_or_groups, init_lr, momentum, weight_decay, trust_coefficient=0.001):
    """LARS with momentum, weight decay and trust coefficient on every group; a group may carry 'fix_lr'."""
    return LARS(params_or_groups, lr=init_lr, weight_decay=weight_decay, momentum=momentum,
                trust_coefficient=trust_coefficient)


def set_lr(optimizer, lr, init_lr):
    """The epoch's lr in every group, except a group with 'fix_lr', which stays at init_lr."""
    for group in optimizer.param_groups:
        group['lr'] = init_lr if group.get('fix_lr') else lr
