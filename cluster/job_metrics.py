"""The data-plane jobs' Prometheus series: bulk samplers and CLIP embedders report through Ray's metrics agent
(every node's `metrics_export_port`, next to Serve's and Ray's own), tagged with the job's output, so that a
fleet of GPUs running `rdm generate` or `rdm embed` can be watched where the serving app is
(`infra/grafana/rdm-jobs.json`). `progress.json` (`rdm status`) says how far a job is; these say how each of
its actors is doing while it runs."""

from __future__ import annotations

from ray.util import metrics

SECONDS = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]


def _counter(name: str, description: str) -> metrics.Counter:
    return metrics.Counter(name, description=description, tag_keys=("job",))


class _JobSeries:
    def __init__(self, job: str) -> None:
        self.tags = {"job": job}

    def add(self, counter: metrics.Counter, value: int) -> None:
        if value > 0:  # Ray's counters take positive increments only
            counter.inc(value, tags=self.tags)

    def observe(self, histogram: metrics.Histogram, value: float) -> None:
        histogram.observe(value, tags=self.tags)


class SamplerMetrics(_JobSeries):
    """A bulk sampler actor's series."""

    def __init__(self, job: str) -> None:
        super().__init__(job)
        self.images = _counter("rdm_bulk_images_generated", "bulk job images sampled and written")
        self.failed = _counter("rdm_bulk_images_failed", "bulk job images that failed (a bad prompt row's are not "
                                                         "counted: they never reach a sampler)")
        self.out_of_memory = _counter("rdm_bulk_out_of_memory_splits", "bulk sampling batches run again in halves "
                                                                       "after running out of accelerator memory")
        self.sampling = metrics.Histogram("rdm_bulk_sampling_seconds", description="bulk sampling + decode time per "
                                          "sampling call", boundaries=SECONDS, tag_keys=("job",))


class EmbedderMetrics(_JobSeries):
    """A CLIP embedder actor's series."""

    def __init__(self, job: str) -> None:
        super().__init__(job)
        self.embedded = _counter("rdm_embed_images_embedded", "corpus images decoded and embedded by CLIP")
        self.reused = _counter("rdm_embed_images_reused", "corpus images whose embeddings were taken from an "
                                                          "earlier output (the same bytes)")
        self.errors = _counter("rdm_embed_images_failed", "corpus images that did not decode or were too large")
        self.shard = metrics.Histogram("rdm_embed_shard_seconds", description="CLIP time per corpus shard",
                                       boundaries=SECONDS, tag_keys=("job",))
