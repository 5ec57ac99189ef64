"""One epoch of SimSiam pretraining (paper Sec. 3, Algorithm 1): for every batch of two views, the forward
pass of both, the symmetric loss on the stop-gradient targets, the SGD step; the losses and the collapse
statistics kept on the device, summed over processes, and checked for non-finite values."""
import torch
from tqdm import tqdm

import distributed
import monitor
from distributed import SINGLE
from errors import first_non_finite
from model import simsiam_loss


def train_epoch(model, batches, steps, optimizer, epoch, epochs, speed, world=SINGLE, check_every=10,
                progress=True, loss_fn=simsiam_loss):
    """One pass of stop-gradient training over `steps` batches of ([x1, x2], labels).

    Returns the mean loss and the mean z_std (of both views) over the epoch's steps. The forward runs under
    the autocast `speed` asks for; the loss is float32 whatever it is. Under torchrun each process holds
    its slice of every global batch: the loss of a step is the mean over processes and z_std is that of
    the global batch (from summed monitor.z_moments). Losses and moments stay on the device and are summed
    over processes and checked for non-finite values every `check_every` steps (a host sync per step would
    stall a GPU); the first bad step is named exactly, on every process alike. loss_fn(p1, p2, z1, z2) is
    simsiam_loss with the paper's settings unless given.
    """
    model.train()
    losses, stds, pending = [], [], []
    with tqdm(batches, total=steps, desc=f'Train Epoch [{epoch}/{epochs}]', dynamic_ncols=True,
              disable=not progress) as bar:
        for step, ((x1, x2), _) in enumerate(bar, 1):
            with speed.autocast():
                p1, p2, z1, z2 = model(speed.layout(x1), speed.layout(x2))
            loss = loss_fn(p1, p2, z1, z2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            pending.append(torch.cat([loss.detach().double().view(1),
                                      monitor.z_moments(z1).flatten(), monitor.z_moments(z2).flatten()]))
            if step % check_every == 0 or step == steps:
                block = distributed.all_sum(torch.stack(pending), world)  # S x (1 + 2 views x 2 x D)
                recent = (block[:, 0] / world.world_size).cpu()
                first_non_finite(recent, epoch, step)
                moments = block[:, 1:].view(len(pending), 2, 2, -1)
                stds.append(monitor.z_std_from_moments(moments, len(x1) * world.world_size).mean(dim=1))
                losses.append(recent)
                pending = []
                bar.set_postfix(loss=f'{torch.cat(losses).mean().item():.4f}')
    return torch.cat(losses).mean().item(), torch.cat(stds).mean().item()
