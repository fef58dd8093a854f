"""Where a run computes: the tf.distribute strategy of recipe.Config's settings, for training and for the commands
that evaluate a trained run."""

import tensorflow as tf

from training import checks, recipe


def split_cpu(cpu_devices):
    """Splits the CPU into logical devices (a stand-in for several accelerators); before TensorFlow starts."""
    if cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)


def make_strategy(config):
    """MirroredStrategy over the given devices (default: every GPU, else every CPU device); for towers on two
    devices the default strategy (the model places its towers itself: OneDeviceStrategy would create every
    variable on its one device); MultiWorkerMirroredStrategy over the cluster TF_CONFIG describes."""
    if config.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if config.strategy == "towers":
        return tf.distribute.get_strategy()
    devices = list(config.mirrored_devices) or [d.name for d in tf.config.list_logical_devices("GPU")]
    return tf.distribute.MirroredStrategy(devices or [d.name for d in tf.config.list_logical_devices("CPU")])


def is_chief(strategy):
    """Whether this process writes the run's outputs: always, but under MultiWorkerMirroredStrategy the chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_id == 0)


def worker_index(strategy):
    """This process's place among the workers (the chief first): 0 outside MultiWorkerMirroredStrategy."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 0
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return 0 if resolver.task_type == "chief" else resolver.task_id + has_chief


def local_replicas(strategy):
    """Replicas of this worker: each takes its own batch from this worker's input pipeline."""
    if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        return 1  # The default strategy (towers on two devices): one replica.
    return len(strategy.extended.worker_devices)


def strategy_for(strategy, mirrored_devices=(), tower_devices=()):
    """The strategy training would use with these settings, checked as training checks them."""
    config = recipe.Config(
        strategy=strategy, mirrored_devices=tuple(mirrored_devices), tower_devices=tuple(tower_devices)
    )
    checks.check_config(config)
    made = make_strategy(config)
    checks.check_devices(config)
    return made
