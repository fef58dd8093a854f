"""Everything that can be wrong before the first training step, each a clear error naming the flag or file and
what to do: settings, devices, the converted data and a model_dir holding another run."""

import concurrent.futures
import json
import os
import random

import numpy as np
import tensorflow as tf

from pipeline import example_spec
from pipeline.reader import data as folder
from pipeline.reader import input as data_input
from training import claim, devices, recipe


class ConfigError(ValueError):
    """A setting, file or folder a run cannot start with; the message says which and what to do."""


class DataError(RuntimeError):
    """The data broke during training (a corrupt shard); the message names the file."""


def check_run(config, strategy):
    """Every check of a run's settings against this machine, its data and its folder, in the order a user would
    fix them; returns the data, loaded (check_config first: the strategy is made from checked settings)."""
    check_devices(config)
    if config.strategy != "towers":
        check_accelerators(config, strategy.extended.worker_devices)
    check_batch(config, strategy.num_replicas_in_sync)
    data = load_data(config)
    check_resume(config, config.model_dir, data.labels)
    workers = strategy.num_replicas_in_sync // devices.local_replicas(strategy)
    check_shared_model_dir(config.model_dir, strategy, devices.worker_index(strategy), workers)
    return data


def check_config(config):
    positive = ("epochs", "batch_size", "learning_rate", "log_every_steps", "keep_checkpoints", "image_size")
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"--{name}={getattr(config, name)}: must be positive")
    for name in ("momentum", "weight_decay", "lighting_std", "warmup_steps", "lr_drops", "checkpoint_every_steps"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name}={getattr(config, name)}: must not be negative")
    if not 0 <= config.dropout < 1:
        raise ConfigError(f"--dropout={config.dropout}: must be in [0, 1)")
    if config.lr_patience < 1:
        raise ConfigError(f"--lr_patience={config.lr_patience}: must be at least 1 (epochs)")
    try:
        data_input.check_image_size(config.image_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.crop_size > config.image_size:
        raise ConfigError(f"--crop_size={config.crop_size} is larger than --image_size={config.image_size}")
    if config.crop_size < 64:
        raise ConfigError(f"--crop_size={config.crop_size}: the network needs at least 64 (pool5 would be empty)")
    if config.strategy not in recipe.STRATEGIES or config.precision not in recipe.PRECISIONS:
        raise ConfigError(f"--strategy must be one of {recipe.STRATEGIES}, --precision one of {recipe.PRECISIONS}")
    if config.all_reduce not in recipe.ALL_REDUCES or config.lr_scaling not in recipe.LR_SCALINGS:
        raise ConfigError(f"--all_reduce must be one of {recipe.ALL_REDUCES}, --lr_scaling one of {recipe.LR_SCALINGS}")
    across_workers = {"auto", "nccl", "ring"} if config.strategy == "multi_worker" else {"auto"}
    within = {"auto", "nccl", "hierarchical_copy", "one_device"} if config.strategy == "mirrored" else {"auto"}
    if config.all_reduce not in across_workers | within:
        raise ConfigError(
            f"--all_reduce={config.all_reduce} is not for --strategy={config.strategy}: mirrored takes nccl, "
            "hierarchical_copy or one_device; multi_worker nccl or ring; towers none (it has no replicas)"
        )
    if config.eval_crops not in (1, 10):
        raise ConfigError(f"--eval_crops={config.eval_crops}: 1 (centre) or 10 (§4.1's patches)")
    if config.jit_compile and config.strategy == "towers":
        raise ConfigError("--jit_compile compiles one device's work: not for --strategy=towers (two devices a step)")
    if config.tower_devices and config.strategy != "towers":
        raise ConfigError("--tower_devices places the two towers: it needs --strategy=towers")
    if config.mirrored_devices and config.strategy != "mirrored":
        raise ConfigError(f"--mirrored_devices are MirroredStrategy's replicas: not for --strategy={config.strategy}")
    if config.profile_steps and (
        len(config.profile_steps) != 2 or not 0 < config.profile_steps[0] <= config.profile_steps[1]
    ):
        raise ConfigError(f"--profile_steps={','.join(map(str, config.profile_steps))}: two steps, first <= last")


def check_cluster(config, tf_config=None):
    """TF_CONFIG (the environment's, unless given) as Vertex AI and Kubeflow's TFJob write it: `chief` and `worker`
    tasks train together under --strategy=multi_worker. Parameter servers and an `evaluator` task are refused
    before anything is built or written, saying what to use instead."""
    raw = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    if not raw.strip():
        return
    try:
        spec = json.loads(raw)
        cluster, task = spec.get("cluster", {}), spec.get("task", {})
    except (ValueError, AttributeError):
        raise ConfigError(f"TF_CONFIG is not a JSON object with a cluster and a task: {raw[:200]}") from None
    if task.get("type") == "evaluator":
        raise ConfigError(
            "this process is TF_CONFIG's evaluator task, and this project has none to run: the chief evaluates on "
            "the validation set after every epoch and at the end, and `python -m tools.evaluate --model_dir=RUN` "
            "evaluates any checkpoint. Give the job no evaluator (Vertex AI: no worker pool 3; TFJob: no Evaluator "
            "replicas)"
        )
    if cluster.get("ps"):
        raise ConfigError(
            f"TF_CONFIG lists {len(cluster['ps'])} parameter server(s) (ps): they are ParameterServerStrategy's, "
            "which this loop does not run. Give only chief and worker tasks with --strategy=multi_worker (Vertex AI: "
            "worker pools 0 and 1; TFJob: Chief and Worker replicas)"
        )
    tasks = sum(len(cluster.get(kind, [])) for kind in ("chief", "master", "worker"))
    if tasks > 1 and config.strategy != "multi_worker":
        raise ConfigError(
            f"TF_CONFIG lists {tasks} training tasks, and --strategy={config.strategy} trains on this machine alone: "
            "give --strategy=multi_worker"
        )


def check_devices(config):
    """The devices the flags name exist on this machine (TensorFlow would silently use others)."""
    known = {d.name for d in tf.config.list_logical_devices()}
    named = config.tower_devices or config.mirrored_devices
    if config.strategy == "towers" and len(config.tower_devices) != 2:
        raise ConfigError(f"--tower_devices={','.join(config.tower_devices)}: give two devices, e.g. /gpu:0,/gpu:1")
    for device in named:
        spec = tf.DeviceSpec.from_string(device)
        name = f"/device:{(spec.device_type or '').upper()}:{spec.device_index or 0}"
        if not any(k.endswith(name) for k in known):
            raise ConfigError(f"device {device} does not exist here (there are {', '.join(sorted(known))})")


def check_accelerators(config, devices):
    """Replicas on GPUs unless asked otherwise: with none in sight, --strategy=mirrored or multi_worker would
    quietly build its replicas on the CPU and a 90-epoch run would start there, ~1,000x slower."""
    kinds = {tf.DeviceSpec.from_string(d).device_type for d in devices}
    if config.strategy == "towers" or config.mirrored_devices or config.train_on_cpu or "GPU" in kinds:
        if config.all_reduce in ("nccl", "hierarchical_copy") and "GPU" not in kinds:
            raise ConfigError(f"--all_reduce={config.all_reduce} needs GPUs: the replicas here are {sorted(kinds)}")
        return
    raise ConfigError(
        f"--strategy={config.strategy} trains on GPUs, and TensorFlow sees none here (built with CUDA: "
        f"{tf.test.is_built_with_cuda()}). On a GPU host install the GPU build, `pip install -e '.[gpu]'` "
        "(TensorFlow with CUDA's libraries), and check that `nvidia-smi` lists the GPUs; "
        "`python -m tools.check` shows what TensorFlow sees. To train on the CPU, give --train_on_cpu"
    )


def check_batch(config, replicas):
    if config.batch_size % replicas:
        raise ConfigError(
            f"--batch_size={config.batch_size} does not split over {replicas} replicas: use a multiple of {replicas}"
        )


def load_data(config):
    """The converted data (pipeline/reader/data.py), checked as a run of config's settings reads it."""
    try:
        data = folder.load(config.data_dir, config.image_size)
    except folder.FolderError as e:
        raise ConfigError(str(e)) from None
    steps = data_input.epoch_plan(data.sizes["train"], seed=config.seed, epoch=0, step_size=config.batch_size)[1]
    if steps == 0:
        raise ConfigError(
            f"--batch_size={config.batch_size} is more than the {data.sizes['train'].sum()} training images"
        )
    return data


def check_resume(config, model_dir, labels=None):
    """A model_dir holding a run with other settings, or trained on other classes than `labels` ([(wnid, name)],
    the data's), is refused: resuming it would mix two recipes, or two datasets. Its files are read back
    checked: a broken one is named, with what to do."""
    if tf.io.gfile.exists(model_dir) and not tf.io.gfile.isdir(model_dir):
        raise ConfigError(f"--model_dir={model_dir} is a file, not a folder: give a run's folder, or a new one")
    path = os.path.join(model_dir, "config.json")
    if not tf.io.gfile.exists(path):
        return
    saved = read_run_json(path, "the run's settings")
    current = json.loads(json.dumps(config.to_json()))  # Tuples as lists, as saved.
    fixed = [k for k in current if k not in recipe.Config.RESUMABLE_CHANGES]
    default = json.loads(json.dumps(recipe.Config().to_json()))
    new = sorted(k for k in fixed if k not in saved and current[k] != default[k])
    if new:  # Written by a version without these settings: it ran as their defaults do.
        details = ", ".join(f"--{k}={_flag_value(default[k])}" for k in new)
        raise ConfigError(
            f"--model_dir={model_dir} holds a run begun before {', '.join(new)} existed, which trained as their "
            f"defaults do: continue it with {details}, or start a new run in another --model_dir"
        )
    changed = sorted(k for k in fixed if k in saved and saved[k] != current[k])
    if changed:
        details = ", ".join(f"--{k}={saved[k]} there, {current[k]} now" for k in changed)
        raise ConfigError(
            f"--model_dir={model_dir} holds a run with other settings ({details}): continue it with its own flags "
            f"(--flagfile={os.path.join(model_dir, 'flags.txt')}) or start a new run in another --model_dir"
        )
    if labels is not None:
        _check_same_classes(model_dir, saved, labels, config.data_dir)


def _check_same_classes(model_dir, saved, labels, data_dir):
    path = os.path.join(model_dir, "labels.txt")
    if not tf.io.gfile.exists(path):
        raise ConfigError(
            f"{path} is missing, so the classes the run was trained on are unknown: if it trained on "
            f"--data_dir={saved.get('data_dir')}, copy that folder's labels.txt there; else start a new run"
        )
    trained = read_run_labels(model_dir, "start a new run in another --model_dir")
    if [w for w, _ in trained] == [w for w, _ in labels]:
        return
    pairs = enumerate(zip(trained, labels, strict=False))  # Up to the shorter list; beyond, the longer differs.
    first = next((i for i, (a, b) in pairs if a[0] != b[0]), min(len(trained), len(labels)))
    there = trained[first][0] if first < len(trained) else "none"
    now = labels[first][0] if first < len(labels) else "none"
    raise ConfigError(
        f"--data_dir={data_dir} holds other classes than the run in --model_dir={model_dir} was trained on "
        f"({len(trained)} classes there, {len(labels)} now; label {first} is {there} there, {now} now): continue "
        f"it on its own data (--data_dir={saved.get('data_dir')}) or start a new run in another --model_dir"
    )


def read_run_labels(model_dir, what_to_do):
    """The classes a run was trained on, its labels.txt, or a ConfigError naming the file and `what_to_do`."""
    try:
        return data_input.load_labels(model_dir)
    except (ValueError, UnicodeDecodeError) as e:
        path = os.path.join(model_dir, "labels.txt")
        raise ConfigError(f"{path} cannot be read ({e}): {what_to_do}") from None


def read_run_json(path, what):
    """A JSON object the run wrote, or a ConfigError naming the file."""
    try:
        with tf.io.gfile.GFile(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        value = e
    if not isinstance(value, dict):
        raise ConfigError(
            f"{path} is not {what} as train.py writes them ({value if isinstance(value, Exception) else type(value)}):"
            " restore it from a copy, or start a new run in another --model_dir"
        )
    return value


def _flag_value(value):
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def claim_model_dir(model_dir, chief):
    """The chief's claim on model_dir (training/claim.py); a folder a live run holds is refused. Other workers
    share the chief's claim and take none."""
    taken = claim.Claim(model_dir) if chief else claim.NoClaim()
    try:
        taken.take()
    except claim.Claimed as e:
        raise ConfigError(str(e)) from None
    return taken


def check_shared_model_dir(model_dir, strategy, worker, workers):
    """Under several workers, each sees the files the chief writes in model_dir: one folder they share (a bucket,
    a disk every machine mounts). Each on a disk of its own, a restarted job's workers would resume from different
    checkpoints (the chief's, and none) and their weights drift apart without a word. The chief leaves a file
    whose name the others learn through an all-reduce, every worker looks for it, and the answers are summed."""
    if workers <= 1:
        return
    token = random.SystemRandom().getrandbits(40)
    path = os.path.join(model_dir, f".shared-folder-{token}")
    if worker == 0:
        tf.io.gfile.makedirs(model_dir)
        with tf.io.gfile.GFile(path, "w") as f:
            f.write("every worker of a run must see this file\n")
    replicas = strategy.num_replicas_in_sync // workers
    token = int(sum_over_replicas(strategy, [token if worker == 0 else 0])[0]) // replicas  # The chief's.
    path = os.path.join(model_dir, f".shared-folder-{token}")
    blind = np.zeros(workers, np.int64)
    blind[worker] = not tf.io.gfile.exists(path)
    blind = np.flatnonzero(sum_over_replicas(strategy, blind))  # Every worker has looked.
    if worker == 0:
        tf.io.gfile.remove(path)
    if len(blind):
        raise ConfigError(
            f"--model_dir={model_dir}: worker(s) {', '.join(map(str, blind))} cannot see the files the chief "
            "(worker 0) writes there. Give every worker one shared folder (a gs:// bucket, or a disk every machine "
            "mounts): on each machine's own disk the workers would resume from different checkpoints"
        )


def sum_over_replicas(strategy, values):
    """values (int64) summed over every replica of every worker: an all-reduce, and so a barrier."""
    values = tf.constant(values, tf.int64)
    reduce = tf.function(lambda: strategy.reduce("SUM", strategy.run(lambda: tf.identity(values)), axis=None))
    return reduce().numpy()


def bad_records(paths, decode_size=None, threads=16):
    """(path, record index, reason) for each shard among `paths` that cannot be read to the end, or, given the size
    the run decodes to, holds a record whose image does not decode. The shards are read in parallel."""

    def scan(path):
        records = tf.data.TFRecordDataset(path)
        if decode_size:
            decode = lambda r: data_input.decode(r, decode_size)[0]  # noqa: E731 (the image: else pruned)
            records = records.map(decode, num_parallel_calls=4, deterministic=True)
        count = 0
        try:
            for _ in records:
                count += 1
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            return path, count, e.message.strip().splitlines()[0].split(" [[")[0][:200]
        return None

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return [found for found in pool.map(scan, paths) if found]


def data_error(files, split, error, where, likely=(), image_size=example_spec.IMAGE_SIZE):
    """The DataError for a split's input that failed (a corrupt record, an image that does not decode) or ran out
    (fewer images than summary.json lists): the bad records by shard and index, looked for first among the `likely`
    shards (those being read when it failed), then among the others; else what was seen."""
    decode = isinstance(error, tf.errors.InvalidArgumentError)  # libjpeg's errors depend on the DCT scale.
    first = [f for f in files if f in set(likely)]
    rest = [f for f in files if f not in set(first)]
    if error is not None:
        print(
            f"a {split} shard failed {where}: looking for the bad record in {len(first) or len(rest)} shard(s)",
            flush=True,
        )
    size = image_size if decode else None
    bad = bad_records(first, size) or bad_records(rest, size)
    if bad or isinstance(error, tf.errors.DataLossError | tf.errors.InvalidArgumentError):
        what = "an image that does not decode" if decode else "a corrupt record"
        named = "; ".join(f"{path}, record {index} ({reason})" for path, index, reason in bad) or error.message
        return DataError(f"a {split} shard holds {what}: {named}. Convert the data again")
    return DataError(
        f"the {split} shards ran out {where}, before the images summary.json lists: they hold fewer records than "
        "it lists. Convert the data again"
    )


def finite(values, what):
    if not np.all(np.isfinite(values)):
        raise FloatingPointError(what)


def strategy_for(strategy, mirrored_devices=(), tower_devices=()):
    """The strategy training would use with these settings, checked as training checks them."""
    config = recipe.Config(
        strategy=strategy, mirrored_devices=tuple(mirrored_devices), tower_devices=tuple(tower_devices)
    )
    check_config(config)
    made = devices.make_strategy(config)
    check_devices(config)
    return made
