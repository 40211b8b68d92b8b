"""Which floating-point precision a run trains and evaluates in, and how it is applied to a backbone.

``amp`` (config key, ``--amp``) is one of ``auto | bf16 | fp16 | none``; :func:`resolve_precision` turns it into
the precision actually used (``bf16``, ``fp16`` or ``fp32``), which is recorded in stage.json and result.json and
is part of every stage key.

* CUDA: ``auto`` and ``bf16`` use bf16 where the GPU supports it, ``fp16`` uses fp16 (with loss scaling).
* CPU: ``bf16`` is used when oneDNN reports bf16 support; ``fp16`` is not offered on the CPU (no loss scaler in
  the CPU path) and falls back to fp32. ``auto`` uses bf16 only where it is *measured* faster: a CPU that has the
  bf16 instructions is not necessarily faster with them: issue 18 reports, for an AMD EPYC with AVX-512 BF16, a
  ResNet-18 64 px training step of fp32 181 images/s vs bf16 + channels_last 472; measured here on an Intel Xeon
  with AVX-512 BF16 but no AMX (2026-12-02): 2048² matmul fp32 249 GFLOP/s vs bf16 145, ResNet-18 step fp32 146
  vs bf16 121 images/s.
  The measurement (:func:`calibrate_cpu`, a few seconds of conv training steps) runs once per CPU model, torch
  version and thread count and is remembered in the cache folder, so the choice (and thus the stage keys) stays
  stable on one machine. Any fallback is one logged line, never an error.

What runs in reduced precision: only the backbone's forward (and so its backward), under ``torch.autocast``; its
outputs are cast back to fp32 (:func:`apply_precision`). Everything after it stays fp32 on purpose: necks, heads,
losses, MoCo's similarity logits and queue, SwAV's prototype scores and Sinkhorn-Knopp, ODC's memory bank and its
nearest-centroid labels, k-means. Those are a negligible share of the FLOPs, and bf16 (8 significant bits) would
blur contrastive logits divided by small temperatures and flip nearest-centroid assignments. Optimiser state and
weights are fp32 (autocast keeps master weights). Downstream protocols use the same precision for the backbone
forward (feature extraction, kNN, linear probe features, fine-tuning); the linear probe's L-BFGS on extracted
features and the kNN similarities run in fp32.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
import types
from dataclasses import asdict, dataclass

import torch
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn


AMP_CHOICES = ('auto', 'bf16', 'fp16', 'none')
#: auto picks bf16 on a CPU only when a bf16 training step is at least this much faster than fp32
CPU_BF16_MIN_SPEEDUP = 1.15
CALIBRATION_VERSION = 2  # 2: bf16 measured twice as well (best of both)
_logged: set[str] = set()


@dataclass(frozen=True)
class Precision:
    """The precision a run uses. ``used`` is one of bf16, fp16, fp32; ``channels_last`` applies to the model."""

    requested: str
    used: str
    device: str
    channels_last: bool
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32."""
        return AUTOCAST_DTYPES.get(self.used)

    def as_dict(self) -> dict:
        return asdict(self)


def log_once(message: str, level: int = logging.WARNING) -> None:
    """One logged line per distinct message and process (fallbacks are announced, never repeated per stage)."""
    if message in _logged:
        return
    _logged.add(message)
    from mmengine.logging import print_log

    print_log(message, logger='current', level=level)


def cpu_supports_bf16() -> bool:
    """oneDNN's own answer: does this CPU have bf16 kernels (AVX-512 BF16 or AMX)?"""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as handle:
            for line in handle:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _calibration_path() -> str:
    root = os.environ.get('CURRICULUM_SSL_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'curriculum_ssl'))
    ident = f'v{CALIBRATION_VERSION}:{cpu_model()}:{torch.__version__}:{torch.get_num_threads()}'
    return os.path.join(root, 'precision', hashlib.sha256(ident.encode()).hexdigest()[:16] + '.json')


def _conv_step_rate(used: str, steps: int = 3) -> float:
    """Images/s of a small ResNet-like conv stack's training step (forward + backward + SGD), channels_last,
    batch 32 at 32 px: cheap (about a second) and dominated by the same conv kernels as the real backbones."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    channels = 3
    for width in (64, 128, 256):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                   nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                   nn.MaxPool2d(2)]
        channels = width
    model = nn.Sequential(*layers).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)

    def step():
        with autocast('cpu', used):
            loss = model(x).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: kernel selection, allocations
    best = float('inf')
    for _ in range(steps):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return 32 / best


def calibrate_cpu(refresh: bool = False) -> dict:
    """Measured bf16 and fp32 training-step rates of this CPU (remembered per CPU model, torch version and thread
    count; ``refresh`` measures again)."""
    path = _calibration_path()
    if not refresh and os.path.exists(path):
        try:
            with open(path) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            pass  # unreadable: measure again and rewrite
    # Each precision measured twice, interleaved, best of both: a single reading taken while another process
    # starts on the same cores can be off by far more than the difference measured (seen on a 2-core AVX-512 BF16
    # EPYC: bf16 0.17x fp32 with two threads while a second run was starting, 1.88x alone with one thread).
    fp32 = _conv_step_rate('fp32')
    bf16 = _conv_step_rate('bf16')
    fp32 = max(fp32, _conv_step_rate('fp32'))
    bf16 = max(bf16, _conv_step_rate('bf16'))
    record = {'cpu_model': cpu_model(), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
              'fp32_images_per_s': fp32, 'bf16_images_per_s': bf16, 'bf16_speedup': bf16 / fp32,
              'measured': time.strftime('%Y-%m-%dT%H:%M:%S'), 'version': CALIBRATION_VERSION}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f'{path}.{os.getpid()}.tmp'
        with open(tmp, 'w') as handle:
            json.dump(record, handle, indent=2)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
    return record


def resolve_precision(amp: str | None, device: str, channels_last: bool | str = 'auto') -> Precision:
    """The precision a run on ``device`` ('cpu' or 'cuda') uses for the requested ``amp``; ``channels_last``
    True/False overrides the rule for the model's memory format."""
    chosen = _resolve(amp, device)
    if channels_last in (True, False):
        from dataclasses import replace

        chosen = replace(chosen, channels_last=bool(channels_last))
    return chosen


def _resolve(amp: str | None, device: str) -> Precision:
    requested = 'none' if amp in (None, False, 'fp32') else str(amp)
    if requested not in AMP_CHOICES:
        raise ValueError(f'amp must be one of {", ".join(AMP_CHOICES)}, got {amp!r}')
    if requested == 'none':
        return Precision(requested, 'fp32', device, device == 'cuda', 'requested')
    if device == 'cuda':
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if requested == 'fp16':
            return Precision(requested, 'fp16', device, True, 'requested')
        if bf16_ok:
            return Precision(requested, 'bf16', device, True, 'GPU supports bf16')
        if requested == 'auto':
            return Precision(requested, 'fp16', device, True, 'GPU without bf16: fp16 with loss scaling')
        log_once('amp bf16: this GPU has no bf16 support; training in fp32')
        return Precision(requested, 'fp32', device, True, 'GPU without bf16')
    # CPU. channels_last only with bf16: measured on the Intel Xeon above, the ResNet-18 64 px step in fp32 was
    # the same either way (146 vs 147 images/s), in bf16 channels_last was 4-14 % faster (121-126 vs 111-121).
    if requested == 'fp16':
        log_once('amp fp16: not offered on the CPU (no loss scaling there); training in fp32')
        return Precision(requested, 'fp32', device, False, 'fp16 is not offered on the CPU')
    if not cpu_supports_bf16():
        log_once('amp: this CPU has no bf16 support (oneDNN); training in fp32')
        return Precision(requested, 'fp32', device, False, 'CPU without bf16 support')
    if requested == 'bf16':
        return Precision(requested, 'bf16', device, True, 'requested; CPU supports bf16')
    calibration = calibrate_cpu()
    speedup = float(calibration['bf16_speedup'])
    if speedup >= CPU_BF16_MIN_SPEEDUP:
        return Precision(requested, 'bf16', device, True, f'bf16 measured {speedup:.2f}x fp32 on this CPU')
    log_once(f'amp auto: bf16 measured {speedup:.2f}x the speed of fp32 on this CPU ({calibration["cpu_model"]}); '
             f'training in fp32', level=logging.INFO)
    return Precision(requested, 'fp32', device, False, f'bf16 measured only {speedup:.2f}x fp32 on this CPU')


#: autocast dtypes of the reduced precisions
AUTOCAST_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def autocast(device: str | torch.device, used: str):
    """``torch.autocast`` in precision ``used`` ('bf16' / 'fp16') on ``device``'s type; a disabled one for fp32."""
    dtype = AUTOCAST_DTYPES.get(used)
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _to_float(out):
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float(o) for o in out)
    return out


def _autocast_forward(self, *args, **kwargs):
    with autocast(self._precision_device, self._precision_used):
        out = type(self).forward(self, *args, **kwargs)
    return _to_float(out)


def _strided_conv_with_fp32_fallback(self, x):
    # a strided convolution on a map of side 1 runs in fp32 (see apply_precision)
    if x.shape[-1] == 1 or x.shape[-2] == 1:
        with torch.autocast(x.device.type, enabled=False):
            return type(self).forward(self, x.float())
    return type(self).forward(self, x)


def _guard_degenerate_strided_convs(backbone: nn.Module) -> None:
    """Bind :func:`_strided_conv_with_fp32_fallback` on every strided convolution with a kernel wider than 1.

    Why: on the CPU (torch 2.14.1, oneDNN), the bf16 backward of a stride-2 convolution whose input map is 1x1 (the
    output is then made of padding but for one tap) intermittently returns NaN / inf weight gradients, while the
    loss and every activation gradient are finite. Measured here (AMD EPYC, AVX-512 BF16), 150 backward passes
    each, batch 256: 3x3 stride 2 on 256 channels at 1x1, 10 non-finite (4 without channels_last); 7x7 stride 2,
    19; 3x3 stride 2 at 2x2 or 3x3, stride 1 at 1x1, 1x1 stride 2 and fp32: 0. A ResNet meets it whenever a crop
    is at most 16 px (layer4's first convolution then sees 1x1): SwAV's local crops at 32 px (12 px) turned the
    backbone's weights into NaN after 6 to 835 iterations. Maps of side 1 cost next to nothing in fp32."""
    for conv in backbone.modules():
        if isinstance(conv, nn.Conv2d) and max(conv.stride) > 1 and max(conv.kernel_size) > 1:
            conv.forward = types.MethodType(_strided_conv_with_fp32_fallback, conv)


def apply_precision(module: nn.Module, backbone: nn.Module, precision: Precision) -> nn.Module:
    """Run every module inside ``module`` of the backbone's class (the backbone itself and copies of it, such as
    MoCo's momentum encoder) under autocast with fp32 outputs, and set channels_last where ``precision`` says.
    With bf16 on the CPU, strided convolutions on maps of side 1 run in fp32 (:func:`_guard_degenerate_strided_convs`).

    The forward is bound on the instance (state dict keys unchanged; ``copy.deepcopy`` rebinds it to the copy).
    Returns ``module``."""
    if precision.channels_last:
        module.to(memory_format=torch.channels_last)
    if precision.dtype is None:
        return module
    backbone_type = type(backbone)
    for sub in module.modules():
        if type(sub) is backbone_type:
            sub._precision_device = precision.device
            sub._precision_used = precision.used
            sub.forward = types.MethodType(_autocast_forward, sub)
            if precision.used == 'bf16' and torch.device(precision.device).type == 'cpu':
                _guard_degenerate_strided_convs(sub)
    return module


@OPTIM_WRAPPERS.register_module(force=True)
class LossScaledOptimWrapper(AmpOptimWrapper):
    """mmengine's AmpOptimWrapper (dynamic loss scaling, for fp16 on CUDA) without its autocast over the whole
    step: where autocast applies is decided by :func:`apply_precision` (the backbone only)."""

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module):
        with OptimWrapper.optim_context(self, model):
            yield


def optim_wrapper_type(precision: Precision) -> str:
    """fp16 needs loss scaling; bf16 and fp32 train with the plain wrapper."""
    return 'LossScaledOptimWrapper' if precision.used == 'fp16' else 'OptimWrapper'
