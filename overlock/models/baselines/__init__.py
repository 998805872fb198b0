"""Dynamic-convolution baselines: ResNet-50, MobileNetV2 (1.0x) and ConvNeXt-Tiny, plain or with ODConv / KW.

One class per family (``DCResNet``, ``DCMobileNetV2``, ``DCConvNeXt``) takes ``conv_type`` ("plain", "odconv",
"kw"); which convolutions become dynamic, and how KW warehouses are shared, follow the official releases:

* ODConv (OSVAI/ODConv): every convolution of the ResNet bottlenecks (not the stem, not the shortcut) and
  every convolution of MobileNetV2 after the stem; reduction 1/16 (min 16 channels), ``kernel_num`` 1 or 4.
* KW (OSVAI/KernelWarehouse): ResNet shares one warehouse per stage (``sharing_range=("layer", "conv")``), the
  first block of a stage and its strided shortcut draw from the previous stage's warehouse, the first
  block of stage 1 keeps a plain 1x1 conv; MobileNetV2 puts everything including the stem in warehouses
  (1x shares point-wise convs of a stage, 4x shares per conv role); ConvNeXt shares per stage and role.

Classifiers (registered in timm as ``dc_<arch>``, e.g. ``timm.create_model("dc_odconv4x_resnet50")``) return
plain logits. ``forward_pyramid`` gives the four dense levels (strides 4-32) that the MMDetection backbones in
``overlock.detection.baseline_backbones`` return (registered by ``overlock.detection.registration``; this
package never imports mmdet). Module names follow the official code (torchvision-style ResNet/MobileNetV2,
Meta's ConvNeXt), so official checkpoints load through ``checkpoint_filter_fn``. Each variant's settings come
from its entry in ``overlock.catalog``.

Temperature annealing (the hook the training loops call, duck-typed):
    ``model.update_temperature(epoch, total_epochs)`` or ``anneal_temperature(model, epoch, total_epochs)``
at the start of each epoch (a fractional ``epoch`` anneals per iteration). ODConv divides its attention logits
by a temperature annealed 30 -> 1 over the first 10 epochs (official ``get_temperature``); KW blends its
attention with a one-hot initial assignment, weight 1 -> 0 over the first 20 epochs (15 for MobileNetV2). A
run shorter than the official recipe keeps the schedule's share of training (see ``TemperatureSchedule``).
Newly built models sit at the final temperature, which is what evaluation and fine-tuning use.
"""

from .base import CONV_TYPES
from .convnext import DCConvNeXt
from .factory import BASELINE_ARCHS, baseline_class, baseline_kwargs, checkpoint_filter_fn, create_baseline
from .mobilenetv2 import DCMobileNetV2
from .resnet import DCResNet
from .temperature import (KW_MOBILENET_SCHEDULE, KW_SCHEDULE, ODCONV_MOBILENET_SCHEDULE, ODCONV_SCHEDULE,
                          TemperatureSchedule, anneal_temperature, set_temperature, temperature_schedule)

__all__ = [
    "BASELINE_ARCHS",
    "CONV_TYPES",
    "DCResNet",
    "DCMobileNetV2",
    "DCConvNeXt",
    "TemperatureSchedule",
    "ODCONV_SCHEDULE",
    "ODCONV_MOBILENET_SCHEDULE",
    "KW_SCHEDULE",
    "KW_MOBILENET_SCHEDULE",
    "anneal_temperature",
    "set_temperature",
    "temperature_schedule",
    "create_baseline",
    "checkpoint_filter_fn",
    "baseline_class",
    "baseline_kwargs",
]
