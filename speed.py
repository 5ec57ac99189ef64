"""How a training step runs on its device, decided once from the flags and then used everywhere: the
augmentation path, bf16 autocast, the memory layout and torch.compile."""
from dataclasses import dataclass

import torch

AUGMENTATIONS = ('batched', 'pil')


@dataclass
class Speed:
    """How the training step runs; decided once from the flags and the device, then used everywhere."""
    device: torch.device
    aug: str
    amp: bool
    channels_last: bool
    compile: bool

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def layout(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def prepare(self, model, parallel=lambda m: m):
        """The module to train: the same parameters, in the chosen layout, wrapped by `parallel` (for
        DistributedDataParallel), compiled if asked."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        model = parallel(model)
        return torch.compile(model) if self.compile else model

    def wrap(self, fn):
        """fn under the same autocast and layout (for the kNN monitor's embedding pass)."""
        def run(x):
            with self.autocast():
                return fn(self.layout(x))
        return run

    def __str__(self):
        return (f'aug {self.aug}, amp {"bf16" if self.amp else "off"}, channels_last '
                f'{"on" if self.channels_last else "off"}, compile {"on" if self.compile else "off"}')


def resolve_speed(device, aug='auto', amp='auto', channels_last='auto', compile=False):
    """The Speed the flags ask for on `device`: 'auto' picks batched augmentation, and bf16 autocast and
    channels_last on CUDA only (bf16 is slower by an order of magnitude on CPUs without AVX-512 BF16 or AMX)."""
    cuda = device.type == 'cuda'
    pick = lambda value, auto: auto if value == 'auto' else value == 'on'
    return Speed(device, 'batched' if aug == 'auto' else aug, pick(amp, cuda), pick(channels_last, cuda), compile)
