"""A closed-loop gRPC load generator: C callers, each sending its next call when the last returns.

One Python client process tops out near 2k to 3k calls/s, so the callers are spread over several
client processes (spawned, so no gRPC state is forked). Each process opens its own connections
(local subchannel pools), so a server with several workers on one port gets calls on all of them.
Calls are raw bytes on a method path: the generator pays no protobuf cost of its own.

Several targets are measured in turn, in slices. Between two slices no call starts for a gap
(MAAS_BENCH_GAP_S), so the calls still in flight at a slice's end finish before the next slice
begins: a slice never starts with its callers held up by the previous target's slow calls. Every
caller starts a slice at once, so each one's first call in it, which queues behind the others', only
settles it and is not measured. Each caller's rate is its calls over its own busy span in the slice
(from the end of that first call to its last answer), so the call in flight when a slice ends is
neither counted nor charged.

With one target, a result also says how much CPU the client processes spent while it was measured
(every call in its slices, first ones included), so a bench can set what the clients cost per call
beside what the servers cost.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import time
from dataclasses import dataclass, field

import numpy as np

# Client processes per measurement (MAAS_BENCH_CLIENTS); the same for every cell of a table.
DEFAULT_CLIENTS = int(os.environ.get("MAAS_BENCH_CLIENTS", "2"))
CALLERS_PER_CHANNEL = 8
GAP_S = float(os.environ.get("MAAS_BENCH_GAP_S", "0.25"))


@dataclass(frozen=True)
class CallSpec:
    """What every caller sends: `requests` (serialized) in turn, to `method` on `target`."""

    target: str
    method: str
    requests: tuple[bytes, ...]
    metadata: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 30.0
    # Each caller keeps one bidirectional stream open on `method` and sends its calls on it, one at a
    # time (as perf_analyzer --streaming does); a response whose first field is an error_message
    # (Triton's ModelStreamInferResponse) counts as an error.
    streaming: bool = False


@dataclass
class LoadResult:
    calls: int
    errors: int
    seconds: float  # the callers' busy time over the concurrency: calls / seconds is the closed loop's rate
    latencies_s: list[float] = field(repr=False)
    error_examples: list[str] = field(default_factory=list, repr=False)
    # With one target only: the client processes' CPU seconds (user + system) over its slices, and
    # every call they made in them (the unmeasured first ones too).
    client_cpu_s: float = 0.0
    client_calls: int = 0

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")


def run_load(
    spec: CallSpec, concurrency: int, duration_s: float, clients: int | None = None, warmup_s: float = 0.5
) -> LoadResult:
    """Runs `concurrency` callers over `clients` processes for `duration_s` after a warm-up."""
    return run_interleaved([spec], concurrency, duration_s, clients, warmup_s, slices=1)[0]


def run_interleaved(
    specs: list[CallSpec],
    concurrency: int,
    duration_s: float,
    clients: int | None = None,
    warmup_s: float = 0.5,
    slices: int = 8,
) -> list[LoadResult]:
    """Measures several targets in turn, `slices` times each, `duration_s` in all per target.

    Every client switches target at the same instants (after a gap with no call started), so a
    shared machine's drift (another tenant's load, CPU frequency) falls on all the targets alike:
    compare them, not their absolute figures.
    """
    clients = max(1, min(clients or DEFAULT_CLIENTS, concurrency))
    shares = [concurrency // clients + (1 if i < concurrency % clients else 0) for i in range(clients)]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ready = context.Barrier(clients + 1)
    slice_s = duration_s / slices
    schedule = (warmup_s, slice_s, slices)
    processes = [
        context.Process(target=_client, args=(specs, share, schedule, ready, results), daemon=True) for share in shares
    ]
    for process in processes:
        process.start()
    ready.wait(120)  # every client has imported grpc and opened its channels
    parts = [results.get(timeout=120 + warmup_s + (duration_s + GAP_S * slices) * len(specs)) for _ in processes]
    for process in processes:
        process.join(30)
    alone = len(specs) == 1
    return [
        LoadResult(
            calls=sum(len(p[0][i][0]) for p in parts),
            errors=sum(p[0][i][1] for p in parts),
            seconds=max(sum(p[0][i][3] for p in parts) / concurrency, 1e-9),
            latencies_s=[latency for p in parts for latency in p[0][i][0]],
            error_examples=[example for p in parts for example in p[0][i][2]][:3],
            client_cpu_s=sum(p[1] for p in parts) if alone else 0.0,
            client_calls=sum(p[2] for p in parts) if alone else 0,
        )
        for i in range(len(specs))
    ]


class StreamMessageError(Exception):
    """A message on a stream that came back as an error."""


def _client(specs, callers: int, schedule, ready, results) -> None:
    results.put(asyncio.run(_closed_loop(specs, callers, schedule, ready)))


async def _closed_loop(specs: list[CallSpec], callers: int, schedule, ready):
    import grpc

    warmup_s, slice_s, slices = schedule
    count = max(1, -(-callers // CALLERS_PER_CHANNEL))
    channels = [
        [grpc.aio.insecure_channel(spec.target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)]
        for spec in specs
    ]
    for channel in itertools.chain.from_iterable(channels):
        await channel.channel_ready()
    methods = [
        [(c.stream_stream if spec.streaming else c.unary_unary)(spec.method, request_serializer=None,
                                                                 response_deserializer=None) for c in spec_channels]
        for spec, spec_channels in zip(specs, channels, strict=True)
    ]  # fmt: skip
    streams: dict[tuple[int, int], grpc.aio.StreamStreamCall] = {}

    async def streamed(which: int, index: int, method, request: bytes, spec: CallSpec) -> None:
        stream = streams.get((which, index))
        if stream is None:
            stream = streams[which, index] = method(metadata=spec.metadata or None)
        await stream.write(request)
        response = await stream.read()
        if response is grpc.aio.EOF:
            del streams[which, index]
            await stream  # raises the stream's status
        elif response[:1] == b"\n":
            raise StreamMessageError(response)

    requests = [itertools.cycle(spec.requests) for spec in specs]
    measured: list[tuple[list[float], list[str]]] = [([], []) for _ in specs]
    await asyncio.get_running_loop().run_in_executor(None, ready.wait, 120)
    warm_until = time.monotonic() + warmup_s
    begin = warm_until + GAP_S
    rounds = len(specs) * slices
    busy = [0.0] * len(specs)  # each target's summed caller busy spans, in seconds
    sent = 0  # calls made in the slices, the unmeasured first ones too

    async def cpu_at_begin() -> float:
        await asyncio.sleep(max(0.0, begin - time.monotonic()))
        return time.process_time()

    async def call(which: int, index: int) -> str | None:
        """One call to target `which`; the error it ended with, if any."""
        spec, method = specs[which], methods[which][index % len(methods[which])]
        try:
            if spec.streaming:
                await streamed(which, index, method, next(requests[which]), spec)
            else:
                await method(next(requests[which]), timeout=spec.timeout_s, metadata=spec.metadata or None)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        except StreamMessageError as exc:
            return f"stream message: {exc.args[0][:200]!r}"
        return None

    async def caller(index: int) -> None:
        nonlocal sent
        while time.monotonic() < warm_until:  # the warm-up: the first target, unmeasured
            await call(0, index)
        for turn in range(rounds):
            which = turn % len(specs)
            opens = begin + turn * (slice_s + GAP_S)
            closes = opens + slice_s
            if (wait := opens - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            # Each caller's first call in a slice only settles it: every caller starts at once, so those
            # calls queue behind each other. Its span starts when that call ends.
            first = last = None
            while (start := time.monotonic()) < closes:
                error = await call(which, index)
                done = time.monotonic()
                sent += 1
                if error is not None:
                    measured[which][1].append(error)
                if first is None:
                    first = done
                # Counted when the call ended within the slice; the one still running at its end is not.
                elif error is None and done <= closes:
                    measured[which][0].append(done - start)
                    last = done
            if first is None or first >= closes:  # still settling when the slice ended: busy all of it, for nothing
                busy[which] += slice_s
            else:  # with no answer after the first, busy from then to the end
                busy[which] += (last if last is not None else closes) - first

    cpu_started = asyncio.get_running_loop().create_task(cpu_at_begin())
    await asyncio.gather(*(caller(i) for i in range(callers)))
    cpu_spent = time.process_time() - await cpu_started
    for stream in streams.values():
        await stream.done_writing()
        stream.cancel()
    for channel in itertools.chain.from_iterable(channels):
        await channel.close()
    per_target = [(latencies, len(errors), errors[:3], busy[i]) for i, (latencies, errors) in enumerate(measured)]
    return per_target, cpu_spent, sent
