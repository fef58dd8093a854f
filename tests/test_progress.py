import time

import apache_beam as beam

from pipeline.beam import progress


class _Work(beam.DoFn):
    """A step that converts: each element takes `seconds` inside Progress.timed."""

    def __init__(self, split, seconds):
        self.split, self.seconds = split, seconds

    def process(self, element):
        with progress.Progress(self.split).timed():
            time.sleep(self.seconds)
        yield element


def test_the_conversion_span_runs_from_the_first_step_that_converts_to_the_last():
    """Tars are converted in one step and written in another: the span covers both, once per split."""
    p = beam.Pipeline()
    first = p | beam.Create([1]) | "Convert" >> beam.ParDo(_Work("train", 0.3))
    _ = first | "Write" >> beam.ParDo(_Work("train", 0.3))
    _ = p | "Validation" >> beam.Create([1]) | "Other" >> beam.ParDo(_Work("validation", 0.2))
    began = time.time()
    result = p.run()
    result.wait_until_finish()
    span = progress.conversion_span(result.metrics())
    assert 0.8 <= span <= time.time() - began + 0.01  # Both train steps (0.6 s) and validation (0.2 s).
    assert progress.conversion_span(beam.Pipeline().run().metrics()) is None  # Nothing converted.
