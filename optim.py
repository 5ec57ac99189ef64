"""The optimisation recipe: SGD over parameter groups, the paper's lr rule lr x batch_size / 256, and the
cosine schedule (paper Sec. 4 and App. D)."""
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


def set_lr(optimizer, lr, init_lr):
    """The epoch's lr in every group, except a group with 'fix_lr', which stays at init_lr."""
    for group in optimizer.param_groups:
        group['lr'] = init_lr if group.get('fix_lr') else lr
