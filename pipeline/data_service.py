r"""A tf.data service dispatcher or worker: the hosts that read and decode for `train.py --data_service`.

    python -m pipeline.data_service --role=dispatcher --port=5050 [--work_dir=gs://BUCKET/dispatcher]
    python -m pipeline.data_service --role=worker --dispatcher=HOST:5050 --port=5051

Start one dispatcher and as many workers as the accelerators need (README: decoding images/s per core), then
train with --data_service=grpc://HOST:5050. Workers need TensorFlow only: the training process sends them the
input pipeline's graph. Runs until stopped.
"""

import tensorflow as tf
from absl import app, flags

_ROLE = flags.DEFINE_enum("role", None, ["dispatcher", "worker"], "Which server to run.", required=True)
_PORT = flags.DEFINE_integer("port", 0, "Port to serve on (0: any free one, printed).")
_DISPATCHER = flags.DEFINE_string("dispatcher", None, "HOST:PORT of the dispatcher (for --role=worker).")
_WORKER_ADDRESS = flags.DEFINE_string(
    "worker_address", None, "HOST:%port% the trainers reach this worker at (default: this host's name)."
)
_WORK_DIR = flags.DEFINE_string(
    "work_dir", None, "Where the dispatcher journals its state, so a restarted dispatcher resumes its jobs."
)


def start(role, port=0, dispatcher=None, worker_address=None, work_dir=None):
    """The running server (call .join() to serve until stopped)."""
    service = tf.data.experimental.service
    if role == "dispatcher":
        config = service.DispatcherConfig(port=port, work_dir=work_dir, fault_tolerant_mode=bool(work_dir))
        return service.DispatchServer(config)
    if not dispatcher:
        raise app.UsageError("--role=worker needs --dispatcher=HOST:PORT")
    config = service.WorkerConfig(dispatcher_address=dispatcher, worker_address=worker_address, port=port)
    return service.WorkerServer(config)


def main(argv):
    del argv
    server = start(_ROLE.value, _PORT.value, _DISPATCHER.value, _WORKER_ADDRESS.value, _WORK_DIR.value)
    address = server.target if _ROLE.value == "dispatcher" else f"{server._address}"
    print(f"tf.data service {_ROLE.value} serving at {address}", flush=True)
    server.join()  # Until the process is stopped (SIGTERM, Ctrl-C).


if __name__ == "__main__":
    app.run(main)
