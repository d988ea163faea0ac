"""Prometheus metrics of one server (own registry, so two servers in one process never share counters)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self):
        r = self.registry
        self.latency = Histogram("srds_request_latency_seconds", "infer request latency (queue + sampling)",
                                 ["model", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("srds_queue_depth", "requests waiting for a sampling job", ["model"], registry=r)
        self.batch_requests = Histogram("srds_batch_requests", "requests per sampling job", ["model"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_images = Histogram("srds_batch_images", "images per sampling job", ["model"],
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.iterations = Histogram("srds_sampler_iterations", "SRDS iterations per sampling job", ["model"],
                                    buckets=(0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32), registry=r)
        self.requests = Counter("srds_requests", "infer requests by HTTP status", ["model", "code"], registry=r)
        self.protocol_requests = Counter("srds_protocol_requests", "infer requests by protocol and status",
                                         ["model", "protocol", "code"], registry=r)
        self.abandoned = Counter("srds_abandoned_requests", "requests nobody waits for any more",
                                 ["model", "reason"], registry=r)
        self.cancelled_jobs = Counter("srds_cancelled_jobs", "sampling jobs stopped early: all their requests gone",
                                      ["model"], registry=r)
        self.cache_bytes = Gauge("srds_cache_bytes", "bytes held by the pipeline's caches (runners, curves)",
                                 ["model"], registry=r)
        self.cache_budget = Gauge("srds_cache_budget_bytes", "--cache-mb", ["model"], registry=r)
        self.cache_evictions = Counter("srds_cache_evictions", "cache entries evicted to stay under --cache-mb",
                                       ["model"], registry=r)
        self.rss = Gauge("srds_process_resident_bytes", "resident set size after the last job", ["model"], registry=r)
        self.sampler_choice = Counter("srds_sampler_jobs", "sampling jobs by the sampler that ran",
                                      ["model", "sampler"], registry=r)
