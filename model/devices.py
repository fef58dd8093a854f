"""Where a command runs: the strategies of recipe.Config for the commands that evaluate a trained run."""

import tensorflow as tf

from model import checks, recipe, training


def split_cpu(cpu_devices):
    """Splits the CPU into logical devices (a stand-in for several accelerators); before TensorFlow starts."""
    if cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)


def strategy_for(strategy, mirrored_devices=(), tower_devices=()):
    """The strategy training would use with these settings, checked as training checks them."""
    config = recipe.Config(
        strategy=strategy, mirrored_devices=tuple(mirrored_devices), tower_devices=tuple(tower_devices)
    )
    checks.check_config(config)
    made = training.make_strategy(config)
    checks.check_devices(config)
    return made
