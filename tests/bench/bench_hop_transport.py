"""What one request costs on the gateway → model service hop: a unary call, or a message on a few
long-lived bidirectional streams that many callers share.

Run with `make bench`. One client process (standing for the gateway's side of the hop) keeps 64
callers busy against the bare grpc.aio echo server (standing for the model service), in turns:

- unary: every request is its own unary call on one channel, as the hop sends them today;
- streams: the same callers share 4 stream-stream calls on that channel. Each stream has one writer
  task (grpc.aio allows one write at a time) and one reader task that hands each response to the
  caller whose request it answers (the echo server answers in order), as a multiplexed hop would.

Both sides' CPU time (user + system) per request is read from the two processes, so the figures
are what each end of the hop would pay per request. Read the ratios: the machine is shared.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import deque

import grpc
import psutil

from tests.bench.bench_gateway import distinct_requests
from tests.bench.echo_server import start_echo

REQUESTS = int(os.environ.get("MAAS_BENCH_HOP_REQUESTS", "20000"))
CALLERS = 64
STREAMS = 4
ROUNDS = 3


def _identity(value: bytes) -> bytes:
    return value


async def _unary(channel: grpc.aio.Channel, requests: tuple[bytes, ...], total: int) -> None:
    method = channel.unary_unary("/bench.Echo/Predict", request_serializer=_identity,
                                 response_deserializer=_identity)  # fmt: skip
    left = total

    async def caller(index: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await method(requests[index % len(requests)], timeout=30)

    await asyncio.gather(*(caller(i) for i in range(CALLERS)))


async def _streams(channel: grpc.aio.Channel, requests: tuple[bytes, ...], total: int) -> None:
    method = channel.stream_stream("/bench.Echo/PredictStream", request_serializer=_identity,
                                   response_deserializer=_identity)  # fmt: skip
    left = total
    loop = asyncio.get_running_loop()

    async def stream(callers: int) -> None:
        call = method(timeout=300)
        outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        waiting: deque[asyncio.Future] = deque()

        async def writer() -> None:
            while (request := await outbox.get()) is not None:
                await call.write(request)
            await call.done_writing()

        async def reader() -> None:
            while (response := await call.read()) is not grpc.aio.EOF:
                waiting.popleft().set_result(response)

        async def caller(index: int) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                answer = loop.create_future()
                waiting.append(answer)
                outbox.put_nowait(requests[index % len(requests)])
                await answer

        tasks = [loop.create_task(writer()), loop.create_task(reader())]
        await asyncio.gather(*(caller(i) for i in range(callers)))
        outbox.put_nowait(None)
        await asyncio.gather(*tasks)

    await asyncio.gather(*(stream(CALLERS // STREAMS) for _ in range(STREAMS)))


async def _measure(target: str, kind, requests: tuple[bytes, ...],
                   server: psutil.Process) -> tuple[float, float, float]:  # fmt: skip
    """(client CPU s per request, server CPU s per request, requests/s) for one turn."""
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        await kind(channel, requests, 1000)  # warm-up
        server_before, client_before = sum(server.cpu_times()[:2]), time.process_time()
        started = time.perf_counter()
        await kind(channel, requests, REQUESTS)
        elapsed = time.perf_counter() - started
        client, served = time.process_time() - client_before, sum(server.cpu_times()[:2]) - server_before
    return client / REQUESTS, served / REQUESTS, REQUESTS / elapsed


def main() -> None:
    requests = distinct_requests(64)
    echo, target = start_echo()
    try:
        server = psutil.Process(echo.pid)
        kinds = {"unary": _unary, "streams": _streams}
        figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in kinds}
        for _ in range(ROUNDS):
            for name, kind in kinds.items():
                figures[name].append(asyncio.run(_measure(target, kind, requests, server)))
    finally:
        echo.terminate()
        echo.wait(10)
    median = {name: [statistics.median(run[i] for run in runs) for i in range(3)] for name, runs in figures.items()}
    print(f"\nhop transport: {CALLERS} callers in one client process against the echo server, {REQUESTS} requests "
          f"per turn, median of {ROUNDS} turns; CPU per request (user + system)")  # fmt: skip
    print(f"{'':28} | {'client us':>9} | {'server us':>9} | {'req/s':>7}")
    for name, (client, served, rate) in median.items():
        label = "unary calls" if name == "unary" else f"{STREAMS} shared streams"
        print(f"{label:28} | {client * 1e6:>9.0f} | {served * 1e6:>9.0f} | {rate:>7.0f}")
    unary, streams = median["unary"], median["streams"]
    print(f"streams / unary: client CPU {streams[0] / unary[0]:.2f}, server CPU {streams[1] / unary[1]:.2f}, "
          f"requests/s {streams[2] / unary[2]:.2f}")


if __name__ == "__main__":
    main()
