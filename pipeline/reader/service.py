"""The tf.data service's servers (python -m pipeline.data_service starts them) and what a trainer can learn of
them: the workers a dispatcher knows, and whether this host reaches them."""

import socket

import grpc
import tensorflow as tf

# How long the dispatcher waits to hear from a worker before it counts it missing. Read in TensorFlow's sources, it
# then only logs it: the lost worker's task stays assigned to its address (a worker started again there takes it
# up), and a finite job ends only when every task has. So a run reads one job that never ends
# (pipeline/reader/input.py: service_dataset), which a worker lost for good does not hold up. An hour by default.
WORKER_TIMEOUT_SECONDS = 30
# How long the dispatcher keeps a job no trainer reads (TensorFlow's default: 5 minutes): a stopped run started
# again within it rejoins its stream where it was; after it, the run's job begins again at the first pass.
JOB_KEPT_SECONDS = 3600
# How long a step may wait for its batch before the trainer looks for why (and says, when it finds something).
STALL_SECONDS = 45


def start(role, port=0, dispatcher=None, worker_address=None, work_dir=None):
    """The running server (call .join() to serve until stopped)."""
    service = tf.data.experimental.service
    if role == "dispatcher":
        config = service.DispatcherConfig(
            port=port,
            work_dir=work_dir,
            fault_tolerant_mode=bool(work_dir),
            worker_timeout_ms=WORKER_TIMEOUT_SECONDS * 1000,
            job_gc_timeout_ms=JOB_KEPT_SECONDS * 1000,
        )
        return service.DispatchServer(config)
    if not dispatcher:
        raise ValueError("--role=worker needs --dispatcher=HOST:PORT")
    worker_address = worker_address or f"{address_toward(dispatcher)}:%port%"
    config = service.WorkerConfig(dispatcher_address=dispatcher, worker_address=worker_address, port=port)
    server = service.WorkerServer(config)
    server.advertised = worker_address  # What the dispatcher tells trainers.
    return server


def address_toward(host_port):
    """This host's address on the route to HOST:PORT: the one that host's network reaches it at. (TensorFlow's
    default, `localhost`, is right only when every process runs on one machine.) No packet is sent."""
    host, port = host_port.rsplit(":", 1)
    family, kind, proto, _, where = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.connect(where)
        return s.getsockname()[0]


def worker_addresses(dispatcher, timeout=10):
    """HOST:PORT of every worker the dispatcher (grpc://HOST:PORT or HOST:PORT) has registered, from its
    GetWorkers call (TensorFlow has no Python API for it; the reply is a list of WorkerInfo, address first)."""
    target = dispatcher.split("://", 1)[-1]
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/tensorflow.data.DispatcherService/GetWorkers",
            request_serializer=lambda request: request,
            response_deserializer=lambda reply: reply,
        )
        reply = call(b"", timeout=timeout)
    return [_string_field(info, 1) for field, info in _fields(reply) if field == 1]


def reachable(address, timeout=5):
    """Whether a TCP connection to HOST:PORT opens from this host."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


def diagnose(dispatcher):
    """Why a trainer may be waiting for batches from the service, or None when nothing is visibly wrong."""
    try:
        workers = worker_addresses(dispatcher)
    except grpc.RpcError as e:
        return f"cannot reach the tf.data service dispatcher at {dispatcher} ({e.code().name}): is it running?"
    if not workers:
        return (
            f"the tf.data service dispatcher at {dispatcher} has no workers: start some with "
            "`python -m pipeline.data_service --role=worker --dispatcher=HOST:PORT`"
        )
    lost = [address for address in workers if not reachable(address)]
    if not lost:
        return None
    if len(lost) < len(workers):
        return None  # The others serve: the stream goes on without the lost ones.
    return (
        f"cannot reach any tf.data service worker ({', '.join(lost)}: the addresses the dispatcher gave) from this "
        "host: if they stopped, start them again or start others; if they run, start each with "
        "--worker_address=ADDRESS:%port% at an address trainers can reach, and open its port"
    )


def _fields(message):
    """(field number, bytes) of a serialized protobuf message's length-delimited fields (others skipped)."""
    i = 0
    while i < len(message):
        key, i = _varint(message, i)
        kind = key & 7
        if kind == 2:
            size, i = _varint(message, i)
            yield key >> 3, message[i : i + size]
            i += size
        elif kind == 0:
            _, i = _varint(message, i)
        else:
            i += {1: 8, 5: 4}[kind]


def _string_field(message, number):
    return next((value.decode() for field, value in _fields(message) if field == number), "")


def _varint(data, i):
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i
