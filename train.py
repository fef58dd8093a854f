r"""Trains the paper's AlexNet on TFRecord shards made by pipeline.build_tfrecords, then evaluates it (§4.1, §5).

    python train.py --flagfile=configs/paper.flags --data_dir=OUT --model_dir=RUN

Writes to --model_dir: TensorBoard logs, checkpoints/ (the latest few, to resume from), best/ (the weights of the
best validation epoch), flags.txt (the effective flags: --flagfile=RUN/flags.txt repeats the run), config.json
and eval.json (the final top-1 / top-5 error). The same command continues an interrupted run where it stopped.
SIGTERM (a preemption notice) saves a checkpoint a step later and exits with status 143, which job managers
restart; so does Ctrl-C, with status 130 (a second Ctrl-C stops at once). A worker whose step failed because
another worker of the run stopped exits with status 129, also restarted. A refusal exits with status 1.
"""

import os
import sys

import tensorflow as tf
from absl import app, flags, logging

from training import checkpoints, checks, devices, loop, stopping
from training import flags as run_flags

run_flags.define()  # One flag per recipe.Config field, defaulting to the paper's value.
FLAGS = flags.FLAGS


def end(status, message=None):
    """Ends the process with `status`, `message` printed first (to stderr for a refusal). Not Python's own exit,
    which tears TensorFlow's runtime down under threads still inside it: MultiWorkerMirroredStrategy's peer health
    check (a C++ call of up to 10 s every 30 s) aborted a finished run's process with status -6, and the input
    pipeline's threads held a stopped one for up to 29 s. Everything the run writes is written and closed by now."""
    if message:
        print(message, file=sys.stderr if status == 1 else sys.stdout)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # Progress is printed; TensorFlow's INFO lines are noise here.
        logging.set_verbosity(logging.WARNING)
    devices.split_cpu(FLAGS.cpu_devices)  # Before TensorFlow starts its runtime.
    if FLAGS.op_determinism:
        tf.config.experimental.enable_op_determinism()
    try:
        result = loop.train(run_flags.config(), flags_text=run_flags.serialized())
    except (checks.ConfigError, checks.DataError, checkpoints.CheckpointError, checkpoints.StorageError) as e:
        end(1, f"train.py: {e}")  # Status 1: what a job manager does not retry (it needs a person).
    except FloatingPointError as e:  # The loss stopped being a number.
        end(1, f"train.py: {e}")
    except (stopping.Preempted, stopping.PeerLost) as e:  # Statuses the job managers retry.
        end(e.exit_code, f"train.py: {e}")
    end(
        0,
        f"Validation ({result['images']} images, {result['crops']} crops): "
        f"top-1 error {result['top1_error']:.1%}, top-5 error {result['top5_error']:.1%} "
        f"(weights sha256 {result['weights_sha256'][:16]})",
    )


if __name__ == "__main__":
    app.run(main)
