"""The network: the Keras AlexNet as Figure 2 (alexnet.py), §3.3's normalization (lrn.py), the towers' devices
(placement.py, §3.2), the on-device augmentation (augment.py, §4.1), random draws alike with and without XLA
(draws.py) and uint8 images -> logits and probabilities (classifier.py)."""

PACKAGE = "alexnet_reference"  # Keras' name space for this package's layers in a saved .keras file.

from model.alexnet import AlexNet, build_alexnet  # noqa: E402 (the layers below register under PACKAGE)
from model.classifier import Classifier, build_classifier  # noqa: E402
from model.lrn import LocalResponseNorm  # noqa: E402

__all__ = ["AlexNet", "Classifier", "LocalResponseNorm", "build_alexnet", "build_classifier"]
