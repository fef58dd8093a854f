"""Where a run computes: the tf.distribute strategy of recipe.Config's settings, for training and for the commands
that evaluate a trained run."""

import tensorflow as tf


def split_cpu(cpu_devices):
    """Splits the CPU into logical devices (a stand-in for several accelerators); before TensorFlow starts."""
    if cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)


PACK_BYTES = 64 << 20  # Gradients all-reduced in packs of this size: a few collectives a step, not one per weight.


def make_strategy(config):
    """MirroredStrategy over the given devices (default: every GPU, else every CPU device); for towers on two
    devices the default strategy (the model places its towers itself: OneDeviceStrategy would create every
    variable on its one device); MultiWorkerMirroredStrategy over the cluster TF_CONFIG describes. Each with the
    all-reduce config.all_reduce names."""
    if config.strategy == "multi_worker":  # Physical devices: listing logical ones would start the runtime too soon.
        gpus = bool(tf.config.list_physical_devices("GPU"))
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication(config.all_reduce, gpus))
    if config.strategy == "towers":
        return tf.distribute.get_strategy()
    devices = list(config.mirrored_devices) or [d.name for d in tf.config.list_logical_devices("GPU")]
    devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops(config.all_reduce, devices))


def cross_device_ops(all_reduce, devices):
    """One machine's all-reduce. auto: NCCL over GPUs, all the gradients in one pack (what NCCL does best with
    61M of them); over CPU devices the sum on one device, TensorFlow's choice there. hierarchical_copy: sums
    through the GPUs in groups (hosts whose GPUs are linked in two groups, as DGX-1's)."""
    gpus = all(tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices)
    choice = ("nccl" if gpus else "one_device") if all_reduce == "auto" else all_reduce
    if choice == "nccl":
        return tf.distribute.NcclAllReduce(num_packs=1)
    if choice == "hierarchical_copy":
        return tf.distribute.HierarchicalCopyAllReduce(num_packs=1)
    return tf.distribute.ReductionToOneDevice()


def communication(all_reduce, gpus):
    """Several workers' all-reduce: NCCL over GPUs (auto), a ring over CPUs; packed in PACK_BYTES."""
    implementation = ("nccl" if gpus else "ring") if all_reduce == "auto" else all_reduce
    kind = tf.distribute.experimental.CommunicationImplementation
    return tf.distribute.experimental.CommunicationOptions(
        bytes_per_pack=PACK_BYTES, implementation=kind.NCCL if implementation == "nccl" else kind.RING
    )


def describe(strategy, config):
    """The devices a run trains on, by kind and count: '2 x GPU', '2 x CPU (logical devices of one CPU)'."""
    if config.strategy == "towers":
        return f"the two towers on {' and '.join(config.tower_devices)}"
    names = [tf.DeviceSpec.from_string(d) for d in strategy.extended.worker_devices]
    kinds = sorted({d.device_type for d in names})
    text = ", ".join(f"{sum(d.device_type == k for d in names)} x {k}" for k in kinds)
    if kinds == ["CPU"] and len(names) > 1:
        text += " (logical devices of one CPU)"
    return text + (" per worker" if config.strategy == "multi_worker" else "")


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
