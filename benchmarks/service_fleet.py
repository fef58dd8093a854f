r"""A tf.data service fleet that loses workers for good and gains one, read by the two kinds of never-ending job
TensorFlow offers: first come, first served (what a run reads: pipeline/reader/input.py) and coordinated reads.

    python benchmarks/service_fleet.py [--splits=6] [--items=40] [--consumers=1,2] [--item_ms=20]

A dispatcher and two workers on loopback (python -m pipeline.data_service), and an endless stream of (pass, item)
tags: --splits splits a pass of --items items, each taking --item_ms on a worker, in batches of 8. The consumers
(one, or two reading in step as two trainers do) read five passes' worth of steps; in pass 2 the first worker is
killed (-9) and never started again, in pass 4 a third is added and the second killed, leaving only the added one.
Prints, per kind of job and number of consumers: the items each pass missed, duplicates, and every wait for a
batch over 2 s.
"""

import collections
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import tensorflow as tf
from absl import app, flags
from tensorflow.python.data.experimental.ops import testing

from pipeline.reader import service as servers_api

_SPLITS = flags.DEFINE_integer("splits", 6, "Splits a pass.")
_ITEMS = flags.DEFINE_integer("items", 40, "Items a split.")
_ITEM_MS = flags.DEFINE_float("item_ms", 20, "A worker's time per item.")
_CONSUMERS = flags.DEFINE_list("consumers", ["1", "2"], "Numbers of consumers reading in step.")
BATCH = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _server(*args):
    command = [sys.executable, "-m", "pipeline.data_service", *args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_workers(dispatcher, count):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if len(servers_api.worker_addresses(dispatcher, timeout=2)) >= count:
                return
        except grpc.RpcError:  # Not serving yet.
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{count} workers did not register with {dispatcher}")


def _stream(splits, items):
    def split(index):
        this_pass, number = index // splits, index % splits
        return tf.data.Dataset.range(items).map(lambda i: tf.stack([this_pass, number * items + i]))

    stream = tf.data.Dataset.range(2**62).flat_map(split)
    return stream.apply(testing.sleep(int(_ITEM_MS.value * 1000))).batch(BATCH, drop_remainder=True)


def run(coordinated, consumers):
    """{pass: items delivered}, duplicates, [(step, what happened or the wait)] for one fleet and its consumers."""
    splits, items = _SPLITS.value, _ITEMS.value
    dispatcher_port = _free_port()
    dispatcher = f"localhost:{dispatcher_port}"
    worker = ["--role=worker", f"--dispatcher={dispatcher}"]
    servers = [_server("--role=dispatcher", f"--port={dispatcher_port}"), _server(*worker), _server(*worker)]
    try:
        _wait_for_workers(dispatcher, 2)
        stream = _stream(splits, items)
        iterators = []
        for index in range(consumers):
            options = dict(consumer_index=index, num_consumers=consumers) if coordinated else {}
            distribute = tf.data.experimental.service.distribute(
                processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
                service=f"grpc://{dispatcher}",
                job_name="fleet",
                max_outstanding_requests=4,
                **options,
            )
            iterators.append(iter(stream.apply(distribute)))
        pool = concurrent.futures.ThreadPoolExecutor(consumers)
        seen, events = collections.Counter(), []
        steps_a_pass = splits * items // BATCH // consumers
        for step in range(1, 5 * steps_a_pass + 1):
            began = time.monotonic()
            batches = list(pool.map(lambda iterator: next(iterator).numpy(), iterators))  # Consumers in step.
            if time.monotonic() - began > 2:
                events.append((step, f"waited {time.monotonic() - began:.1f} s"))
            seen.update((int(p), int(i)) for batch in batches for p, i in batch)
            if step == steps_a_pass + steps_a_pass // 6:
                servers[1].send_signal(signal.SIGKILL)
                events.append((step, "worker 1 killed, never started again"))
            if step == 3 * steps_a_pass + steps_a_pass // 6:
                servers.append(_server(*worker))
                _wait_for_workers(dispatcher, 3)
                events.append((step, "worker 3 added"))
            if step == 3 * steps_a_pass + steps_a_pass // 2:
                servers[2].send_signal(signal.SIGKILL)
                events.append((step, "worker 2 killed: only the added worker left"))
    finally:
        for server in servers:
            server.kill()
            server.wait()
    delivered = collections.Counter(p for p, _ in seen)
    return delivered, sum(n - 1 for n in seen.values()), events


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main(argv):
    del argv
    per_pass = _SPLITS.value * _ITEMS.value
    print(f"{_SPLITS.value} splits of {_ITEMS.value} items a pass, batches of {BATCH}, {_ITEM_MS.value:g} ms an item")
    for consumers in (int(c) for c in _CONSUMERS.value):
        for coordinated in (False, True):
            delivered, duplicates, events = run(coordinated, consumers)
            kind = "coordinated reads" if coordinated else "first come, first served"
            missed = {p + 1: per_pass - delivered[p] for p in sorted(delivered)[:-1]}  # The last pass is partial.
            print(f"  {kind}, {consumers} consumer(s): missed by pass {missed}; duplicates {duplicates}")
            for step, event in events:
                print(f"    step {step}: {event}")


if __name__ == "__main__":
    app.run(main)
