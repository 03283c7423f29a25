"""Reading a running gateway's Prometheus metrics, for tests and benchmarks."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def hop_batch_totals(metrics_port: str | int, family: str = "dense") -> tuple[float, float]:
    """(requests, calls) the gateway's hop batcher has sent to `family`'s service so far, all workers."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    totals = {"sum": 0.0, "count": 0.0}
    for metric in text_string_to_metric_families(text):
        for sample in metric.samples:
            for part in totals:
                if sample.name == f"maas_gateway_hop_batch_requests_{part}" and sample.labels.get("family") == family:
                    totals[part] += sample.value
    return totals["sum"], totals["count"]
