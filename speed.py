"""How a training step runs on its device, decided once from the flags and then used everywhere: the
augmentation path, bf16 autocast, the memory layout and torch.compile."""
from dataclasses import dataclass

import torch

AUGMENTATIONS = ('batched', 'pil', 'stream')


@dataclass
class Speed:
    """How the training step runs; decided once from the flags and the device, then used everywhere."""
    device: torch.device
    aug: str
    amp: bool
    channels_last: bool
    compile: bool
    why: str = ''  # why the settings left to 'auto' were chosen ('' when none was)

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
                f'{"on" if self.channels_last else "off"}, compile {"on" if self.compile else "off"}'
                + (f' (auto: {self.why})' if self.why else ''))


def _cpu_reports(check):
    """Whether torch.cpu's `check` says yes and torch's kernels use AVX-512 here (not limited to AVX2)."""
    found = getattr(torch.cpu, check, None)
    return bool(found and found()) and torch.backends.cpu.get_cpu_capability().startswith('AVX512')


def cpu_has_amx():
    """Whether this CPU multiplies bf16 matrices in AMX tiles, as torch reports it, and torch's kernels use
    AVX-512 here (a function of its own so that the tests can patch it both ways)."""
    return _cpu_reports('_is_amx_tile_supported')


def cpu_has_avx512_bf16():
    """Whether this CPU has AVX-512 BF16 dot products and torch's kernels use AVX-512 here (patched by the
    tests like cpu_has_amx)."""
    return _cpu_reports('_is_avx512_bf16_supported')


def cpu_capability():
    """The CPU's vector capability as torch names it (AVX2, AVX512, ...), with its bf16 instructions."""
    capability = torch.backends.cpu.get_cpu_capability()
    return (f'{capability} + AMX' if cpu_has_amx() else
            f'{capability} + AVX512-BF16' if cpu_has_avx512_bf16() else capability)


def bf16_pays(device):
    """(whether bf16 autocast and channels_last are the faster default on `device`, why). They are on CUDA,
    and on a CPU with bf16 matrix instructions: AMX (a ResNet-18 SimSiam step 2.5x faster than float32) or
    AVX-512 BF16 (1.9-2.0x on an AMD EPYC, docs/speed.md). On other CPUs oneDNN emulates bf16, 22x slower than
    float32 on AVX2, so float32 and the contiguous layout stay."""
    if device.type == 'cuda':
        return True, 'CUDA'
    if device.type != 'cpu':
        return False, device.type
    if cpu_has_amx():
        return True, 'CPU with AMX'
    if cpu_has_avx512_bf16():
        return True, 'CPU with AVX512-BF16'
    return False, f'{torch.backends.cpu.get_cpu_capability()} CPU without bf16 instructions'


def resolve_speed(device, aug='auto', amp='auto', channels_last='auto', compile=False):
    """The Speed the flags ask for on `device`. 'auto' picks bf16 autocast and channels_last where they pay
    (bf16_pays), and the batched augmentation (the scripts resolve --aug auto by the dataset's size first,
    utils.choose_aug); the reason goes into the Speed."""
    fast, why = bf16_pays(device)

    def pick(value):
        return fast if value == 'auto' else value == 'on'
    chosen = Speed(device, 'batched' if aug == 'auto' else aug, pick(amp), pick(channels_last), compile)
    chosen.why = why if 'auto' in (amp, channels_last) else ''
    return chosen
