"""The benches' load generator against a real echo server: what it counts, and the client CPU it reports.

`make bench` is not part of `make test`, so these keep its counting honest where the suite sees it.
(Nothing here imports the gateway bench: its Open Inference protos are not loaded in the suite beside
tritonclient's copy.)"""

from __future__ import annotations

import pytest

from tests.bench.echo_server import start_echo
from tests.bench.load import CallSpec, run_interleaved, run_load

PREDICT = "/maas.dense.v1.DenseService/Predict"  # any unary method: the echo server answers every one


def distinct_requests(count: int) -> tuple[bytes, ...]:
    return tuple(f"request {i}".encode() * 8 for i in range(count))


@pytest.fixture(scope="module")
def echo_target():
    process, target = start_echo()
    yield target
    process.terminate()
    process.wait(10)


def test_one_target_reports_its_clients_cpu_and_every_call_sent(echo_target):
    spec = CallSpec(echo_target, PREDICT, distinct_requests(16))
    result = run_load(spec, 4, 1.0, clients=2, warmup_s=0.0)
    assert result.errors == 0
    assert result.calls > 0
    # Every caller's first call of the slice is sent but not measured.
    assert result.client_calls >= result.calls + 4
    assert result.client_cpu_s > 0
    assert result.seconds > 0 and result.throughput > 0


def test_interleaved_targets_leave_client_cpu_unattributed(echo_target):
    spec = CallSpec(echo_target, PREDICT, distinct_requests(16))
    results = run_interleaved([spec, spec], 2, 1.0, clients=1, warmup_s=0.0, slices=2)
    assert [r.errors for r in results] == [0, 0]
    assert all(r.calls > 0 for r in results)
    # The clients' CPU is spent on both targets at once: no one of them is charged it.
    assert [(r.client_cpu_s, r.client_calls) for r in results] == [(0.0, 0), (0.0, 0)]
