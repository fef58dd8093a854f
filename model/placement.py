"""§3.2's model parallelism: a layer whose forward and backward ops all run on one device.

A device scope around a layer's call places its forward ops only: tf.GradientTape places no gradient op, so they
land on the default device (seen in TensorFlow's placement log: all of tower b's backward pass on the first
device). A placed layer therefore takes its own gradients, under its device scope, in a custom gradient.
"""

import functools

import tensorflow as tf


def place(layer, device):
    """Makes `layer` create its variables and run its forward and backward ops on `device`; returns it."""
    build, call = layer.build, layer.call

    @functools.wraps(build)  # Keras reads the signature to name the shape argument.
    def placed_build(*args, **kwargs):
        # Variables are created in the eager context (Keras may build while tracing, whose device scopes the
        # eager context does not see): the device scope goes inside it.
        with tf.init_scope(), tf.device(device):
            build(*args, **kwargs)

    layer.build = placed_build
    layer.call = functools.partial(_placed_call, call, device)
    return layer


def _placed_call(call, device, inputs, *args, **kwargs):
    @tf.custom_gradient
    def placed(x):
        with tf.device(device), tf.GradientTape() as tape:
            tape.watch(x)
            y = call(x, *args, **kwargs)

        def grad(dy, variables=None):
            variables = list(variables or ())
            with tf.device(device):
                grads = tape.gradient(y, [x, *variables], output_gradients=dy)
            # An input gradient nobody asks for (the images') is pruned from the compiled step.
            return grads[0], grads[1:]

        return y, grad

    with tf.device(device):  # The custom gradient's own identity ops too.
        return placed(inputs)
