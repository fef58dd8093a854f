"""The conversion's progress: a line per worker every PROGRESS_SECONDS, and the metrics from which the
launcher prints the conversion's rate and CPU time per image when the job ends."""

import contextlib
import os
import sys
import threading
import time

import apache_beam as beam

PROGRESS_SECONDS = 10
SPAN_START, SPAN_END = "conversion_start_ms", "conversion_end_ms"  # Per split (the metric's name).
CPU = "conversion_cpu"


class Progress:
    """Counts one worker's converted and rejected images of a split, and logs them every `seconds`."""

    def __init__(self, split, seconds=PROGRESS_SECONDS):
        self.split, self.seconds, self.done, self.rejected = split, seconds, 0, 0
        self.start = self.last_log = time.time()
        self.counters = {r: beam.metrics.Metrics.counter(split, "rejected" if r else "written") for r in (0, 1)}

    def count(self, rejected):
        self.done += 1
        self.rejected += rejected
        self.counters[rejected].inc()
        now = time.time()
        if now - self.last_log >= self.seconds:
            self.last_log = now
            # Printed, not logged: a DirectRunner worker process's log records reach the console only through the
            # runner's relay (one long line each), and Dataflow keeps its workers' stderr in their logs.
            print(
                f"{self.split}: {self.done} images on worker {os.getpid()}/{threading.current_thread().name} "
                f"({self.rejected} rejected), {self.done / (now - self.start):.1f} images/s",
                file=sys.stderr,
                flush=True,
            )

    @contextlib.contextmanager
    def timed(self):
        """Records a unit of work's span (from the first started to the last ended, per split) and its CPU time
        on this thread: the conversion's cost whatever else shares the cores."""
        started, cpu_started = time.time(), time.thread_time()
        yield
        beam.metrics.Metrics.distribution(SPAN_START, self.split).update(int(started * 1000))
        beam.metrics.Metrics.distribution(SPAN_END, self.split).update(int(time.time() * 1000))
        beam.metrics.Metrics.counter(CPU, "ms").inc(int((time.thread_time() - cpu_started) * 1000))


def conversion_span(metrics):
    """Seconds spent converting, from a finished job's metrics: per split, from its first unit's start to its last
    unit's end, over every step that converts (tars are converted where they are read); splits converted one
    after the other (DirectRunner) add up, overlapping ones count once. None when nothing was converted."""
    starts, ends = _edges(metrics, SPAN_START, min), _edges(metrics, SPAN_END, max)
    intervals = sorted((starts[split], ends[split]) for split in starts.keys() & ends.keys())
    if not intervals:
        return None
    total, (start, end) = 0, intervals[0]
    for next_start, next_end in intervals[1:]:
        if next_start > end:
            total, start = total + end - start, next_start
        end = max(end, next_end)
    return (total + end - start) / 1000


def _edges(metrics, namespace, pick):
    """{split: the earliest start (pick=min) or latest end (pick=max)} over every step that records the split."""
    edges = {}
    for result in metrics.query(beam.metrics.MetricsFilter().with_namespace(namespace))["distributions"]:
        value = getattr(result.committed or result.attempted, pick.__name__)
        edges[result.key.metric.name] = pick(edges.get(result.key.metric.name, value), value)
    return edges


def conversion_cpu_seconds(metrics):
    """CPU seconds the converting workers spent, summed, from a finished job's metrics (None if none)."""
    results = metrics.query(beam.metrics.MetricsFilter().with_namespace(CPU))["counters"]
    return sum((r.committed or r.attempted) for r in results) / 1000 if results else None
