"""The paper's training recipe (§5) in Keras terms: the update rule and the error metrics it reports (§6)."""

import keras

LEARNING_RATE = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0005


class PaperSGD(keras.optimizers.SGD):
    """§5: v <- 0.9 v - 0.0005 lr w - lr dL/dw; w <- w + v, the decay on weights (kernels), not biases.

    The decay enters the gradient before the momentum, as in the paper. Keras' SGD(weight_decay=...) is applied
    outside the momentum (decoupled), and an L2 kernel regularizer costs ~30% of a CPU step here; this costs nothing.
    """

    def __init__(self, learning_rate=LEARNING_RATE, momentum=MOMENTUM, coupled_decay=WEIGHT_DECAY, **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, **kwargs)
        self.coupled_decay = coupled_decay

    def build(self, variables):
        super().build(variables)
        self._decayed = [v.path.endswith("kernel") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        # Looked up by index: under MirroredStrategy `variable` is a replica's tf.Variable, without Keras' path.
        if self.coupled_decay and self._decayed[self._get_variable_index(variable)]:
            gradient = gradient + keras.ops.cast(self.coupled_decay, variable.dtype) * variable
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "coupled_decay": self.coupled_decay}


class TopKError(keras.metrics.SparseTopKCategoricalAccuracy):
    """Top-k error (§6 reports errors, not accuracies): the fraction of images whose label is not in the top k."""

    def result(self):
        return 1.0 - super().result()


def metrics():
    return [TopKError(k=1, name="top1_error"), TopKError(k=5, name="top5_error")]
