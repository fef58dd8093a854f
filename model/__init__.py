"""The Keras AlexNet (§3) and its on-device augmentation (§4.1)."""

from model.alexnet import AlexNet, build_alexnet
from model.lrn import LocalResponseNorm

__all__ = ["AlexNet", "LocalResponseNorm", "build_alexnet"]
