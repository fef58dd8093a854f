"""Where a run's training batches come from, in two forms with one interface: each worker's own planned
reader (pipeline/reader/input.py), or a tf.data service's workers. The loop asks a feed for an epoch's steps and
its batches, and what to say of the data at an epoch's end, and does not know which form it has."""

import contextlib
import os
import random
import threading

import numpy as np
import tensorflow as tf

from pipeline.reader import input as data_input
from pipeline.reader import service
from training import checkpoints, checks, devices
from training.position import PASSES

JOB_ID = ".service_job"  # In model_dir: the run's own name for its tf.data service job.


def make_feed(config, strategy, data):
    if config.data_service:
        return Service(config, strategy, data, job=f"alexnet-{service_job_id(config.model_dir, strategy):012x}")
    return Planned(config, strategy, data)


def service_job_id(model_dir, strategy):
    """The run's tf.data service job id: drawn by the chief when the run begins and kept in model_dir, so a resumed
    run rejoins its job, while two runs never share one (not even two runs given the same path on two machines);
    the other workers learn it from the chief through an all-reduce."""
    chief, path = devices.is_chief(strategy), os.path.join(model_dir, JOB_ID)
    job = 0
    if chief:
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path, "rb") as f:
                text = f.read()
            try:
                job = int(text.strip() or b"0", 16)
            except ValueError:
                raise checks.ConfigError(
                    f"{path} is not a tf.data service job id ({text[:40]!r}): delete it, and the run reads a new "
                    "job of its own (from its first pass again: the next epoch's end says what was missed)"
                ) from None
        if not job:
            job = random.SystemRandom().getrandbits(48)
            tf.io.gfile.makedirs(model_dir)
            checkpoints.write_file(path, f"{job:012x}\n")
    workers = strategy.num_replicas_in_sync // devices.local_replicas(strategy)
    if workers > 1:  # The sum over every replica of the chief's id (the others give 0), over its replicas.
        job = int(checks.sum_over_replicas(strategy, [job])[0]) // (strategy.num_replicas_in_sync // workers)
    return job


class Planned:
    """Each worker reads its own shards: the epoch's order and length are planned from (seed, epoch), and a
    resumed epoch skips the steps it took. Every image it reads is of the epoch's pass."""

    def __init__(self, config, strategy, data):
        self.config, self.strategy, self.files, self.sizes = config, strategy, data.files["train"], data.sizes["train"]
        self.local_replicas = devices.local_replicas(strategy)
        self.pipelines = strategy.num_replicas_in_sync // self.local_replicas  # One input pipeline per worker.

    def steps(self, epoch):
        """The epoch's planned steps (a tf.data service's epoch may end before them)."""
        step_size = self.config.batch_size // self.pipelines
        plan = dict(seed=self.config.seed, epoch=epoch, step_size=step_size, pipelines=self.pipelines)
        return data_input.epoch_plan(self.sizes, **plan)[1]

    def shards_at(self, epoch, epoch_step):
        """The shards this worker reads at that step of the epoch: its group of them, and the next (read ahead)."""
        step_size = self.config.batch_size // self.pipelines
        plan = dict(seed=self.config.seed, epoch=epoch, step_size=step_size, pipelines=self.pipelines)
        groups = data_input.epoch_plan(self.sizes, **plan, pipeline=self._pipeline())[0]
        ends = np.cumsum([self.sizes[group].sum() for group in groups])
        at = int(np.searchsorted(ends, epoch_step * step_size, side="right"))
        return [self.files[i] for group in groups[at : at + 2] for i in group]

    def _pipeline(self):
        return devices.worker_index(self.strategy)

    def batches(self, epoch, skip_steps):
        """An iterator over the epoch's batches, the first skip_steps steps left out."""
        return iter(self._dataset(epoch, skip_steps))

    def _dataset(self, epoch, skip_steps):
        config = self.config
        return self.strategy.distribute_datasets_from_function(
            lambda ctx: data_input.train_dataset(
                self.files,
                self.sizes,
                seed=config.seed,
                epoch=epoch,
                batch_size=ctx.get_per_replica_batch_size(config.batch_size),
                replicas=self.local_replicas,
                image_size=config.image_size,
                pipeline=ctx.input_pipeline_id,
                pipelines=ctx.num_input_pipelines,
                skip_steps=skip_steps,
                deterministic=config.deterministic,
            )
        )

    def waiting(self):
        """Around a step: what watches it while it waits for its batches."""
        return contextlib.nullcontext()

    def describe(self):
        return None

    def epoch_report(self, position):
        """Scalars about the epoch's input (position: at the epoch's last step), and a line for the console (or
        None)."""
        return {}, None


class Service(Planned):
    """A tf.data service's workers read and decode an endless stream of passes over the training set, taking
    groups of shards as they become free (pipeline/reader/input.py): every image at most once a pass, whatever the
    number of workers, and a worker lost or added changes nothing but who decodes. An epoch is the planned steps
    of one iterator over the stream, kept for the run (a new one each epoch would drop the batches the last one
    had buffered); its steps keep the passes and the epochs in line. A resumed run rejoins the stream where it
    is."""

    def __init__(self, config, strategy, data, job):
        super().__init__(config, strategy, data)
        self.job = job  # The job this run's trainers share.
        self._iterator = None

    def steps(self, epoch):
        """So many that the steps up to the end of epoch e read (e + 1) passes' images: an epoch's share of one
        step's batch is not carried into the next forever."""
        images, batch = int(self.sizes.sum()), self.config.batch_size
        return (epoch + 1) * images // batch - epoch * images // batch

    def batches(self, epoch, skip_steps):
        if self._iterator is None:
            self._iterator = iter(self.strategy.distribute_datasets_from_function(self._stream))
        return self._iterator

    def _stream(self, ctx):
        config = self.config
        return data_input.service_dataset(
            self.files,
            self.sizes,
            seed=config.seed,
            batch_size=ctx.get_per_replica_batch_size(config.batch_size),
            replicas=self.local_replicas,
            image_size=config.image_size,
            data_service=config.data_service,
            job=self.job,
        )

    def shards_at(self, epoch, epoch_step):
        return []  # The service's workers took the groups as they came: any shard may be the one.

    def waiting(self):
        return ServiceWatch(self.config.data_service)

    def describe(self):
        return f"Training images from the tf.data service at {self.config.data_service}: job {self.job}"

    def epoch_report(self, position):
        """Pass e - 1's images, counted over the epochs that trained them, at the end of epoch e: the service
        delivers each at most once, and what it did not by then is missed by its pass. Most of that a lost worker
        or a stopped trainer held; a slow worker's comes later, as images of an earlier pass (with few groups a
        pass, as in the demo set, one worker may hold a whole pass while another reads the next)."""
        counts = dict(zip(PASSES, position.passes, strict=True))
        if not position.epoch:
            return {}, None
        images, delivered = int(self.sizes.sum()), int(counts["previous"])
        line = (
            f"the tf.data service delivered {delivered:,} of pass {position.epoch}'s {images:,} training images; "
            f"{images - delivered:,} missed (held by lost or slow service workers, or a stopped trainer)"
        )
        if counts["older"]:
            line += (
                f"; {int(counts['older']):,} of the epoch's images were of earlier passes: late from a slow worker, "
                "or, if many, the service began this run's job again (a dispatcher started again without "
                f"--work_dir, or the job unused for {service.JOB_KEPT_SECONDS // 60} minutes)"
            )
        return {"epoch/images_missed": images - delivered}, line


class ServiceWatch:
    """Around a step fed by a tf.data service: when it waits for batches longer than service.STALL_SECONDS, the
    trainer looks for why (no workers, or workers this host cannot reach) and says so, naming the addresses."""

    def __init__(self, dispatcher):
        self.timer = threading.Timer(service.STALL_SECONDS, self._report, (dispatcher,))
        self.timer.daemon = True

    @staticmethod
    def _report(dispatcher):
        problem = service.diagnose(dispatcher)
        if problem:
            print(f"Waiting for batches for {service.STALL_SECONDS} s: {problem}", flush=True)

    def __enter__(self):
        self.timer.start()

    def __exit__(self, *exc):
        self.timer.cancel()
