"""The model zoo: Flax linen classifiers used in sharpness-aware training.

Every model is called as ``model.apply(variables, x, train=...)``; models with
BatchNorm keep their statistics in the ``batch_stats`` collection, models with
dropout need a ``"dropout"`` rng when ``train=True``. The step builder in
:mod:`sharpjax.training` does this plumbing.

=============  =======================  ==============================
model          input                    parameters (10 classes)
=============  =======================  ==============================
MLP            [B, ...] (flattened)     15,210 for (100, 100) on 40 inputs
CNN1D          [B, 40] or [B, 40, 1]    5,210
ResNet18       [B, 32, 32, 3]           11,173,962
WideResNet     [B, 32, 32, 3]           36,479,194 (WRN-28-10)
ResNet50       [B, 224, 224, 3]         25,557,032 (1,000 classes)
ViT            [B, 32, 32, 3]           1,806,538 (patch 4, d 192, 6 blocks)
=============  =======================  ==============================
"""

from sharpjax.models._cnn1d import CNN1D
from sharpjax.models._common import param_count
from sharpjax.models._mlp import MLP
from sharpjax.models._resnet import BasicBlock
from sharpjax.models._resnet import Bottleneck
from sharpjax.models._resnet import ImageNetResNet
from sharpjax.models._resnet import ResNet
from sharpjax.models._resnet import ResNet18
from sharpjax.models._resnet import ResNet50
from sharpjax.models._vit import ViT
from sharpjax.models._wideresnet import WideBlock
from sharpjax.models._wideresnet import WideResNet

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CNN1D",
    "ImageNetResNet",
    "MLP",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "ViT",
    "WideBlock",
    "WideResNet",
    "param_count",
]
