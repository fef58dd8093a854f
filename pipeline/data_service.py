r"""A tf.data service dispatcher or worker: the hosts that read and decode for `train.py --data_service`.

    python -m pipeline.data_service --role=dispatcher --port=5050 [--work_dir=gs://BUCKET/dispatcher]
    python -m pipeline.data_service --role=worker --dispatcher=HOST:5050 --port=5051

Start one dispatcher and as many workers as the accelerators need (README: decoding images/s per core), then
train with --data_service=grpc://HOST:5050. Workers need TensorFlow only: the training process sends them the
input pipeline's graph. Runs until stopped.
"""

from absl import app, flags

from pipeline.reader import service

_ROLE = flags.DEFINE_enum("role", None, ["dispatcher", "worker"], "Which server to run.", required=True)
_PORT = flags.DEFINE_integer("port", 0, "Port to serve on (0: any free one, printed).")
_DISPATCHER = flags.DEFINE_string("dispatcher", None, "HOST:PORT of the dispatcher (for --role=worker).")
_WORKER_ADDRESS = flags.DEFINE_string(
    "worker_address",
    None,
    "HOST:%port% the trainers reach this worker at (default: this host's address on the route to the dispatcher).",
)
_WORK_DIR = flags.DEFINE_string(
    "work_dir", None, "Where the dispatcher journals its state, so a restarted dispatcher resumes its jobs."
)


def main(argv):
    del argv
    if _ROLE.value == "worker" and not _DISPATCHER.value:
        raise app.UsageError("--role=worker needs --dispatcher=HOST:PORT")
    server = service.start(_ROLE.value, _PORT.value, _DISPATCHER.value, _WORKER_ADDRESS.value, _WORK_DIR.value)
    if _ROLE.value == "dispatcher":
        print(f"tf.data service dispatcher serving at {server.target}", flush=True)
    else:
        port = server._address.rsplit(":", 1)[1]  # TensorFlow's WorkerServer names only its port.
        address = server.advertised.replace("%port%", port)
        print(f"tf.data service worker serving at {address} (registered with {_DISPATCHER.value})", flush=True)
    server.join()  # Until the process is stopped (SIGTERM, Ctrl-C).


if __name__ == "__main__":
    app.run(main)
