"""The network: the Keras AlexNet as Figure 2 (alexnet.py), §3.3's normalization (lrn.py), the towers' devices
(placement.py, §3.2), the on-device augmentation (augment.py, §4.1) and uint8 images -> logits (classifier.py)."""

from model.alexnet import AlexNet, build_alexnet
from model.lrn import LocalResponseNorm

__all__ = ["AlexNet", "LocalResponseNorm", "build_alexnet"]
