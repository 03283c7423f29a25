"""`python -m tests.bench.echo_server PORT`: a bare grpc.aio server that answers every unary call
with its request bytes, and every message on a stream-stream call (a method whose name ends in
`Stream`) with that message. The floor of what one Python gRPC hop costs, for the gateway bench."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc

from shared.workers import free_port


async def echo(request: bytes, context) -> bytes:
    return request


async def echo_stream(requests, context):
    async for request in requests:
        yield request


class EchoHandler(grpc.GenericRpcHandler):
    def service(self, handler_call_details):
        if handler_call_details.method.endswith("Stream"):
            return grpc.stream_stream_rpc_method_handler(echo_stream)
        return grpc.unary_unary_rpc_method_handler(echo)


async def serve(port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([EchoHandler()])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def start_echo() -> tuple[subprocess.Popen, str]:
    """This server in a process of its own, serving; the process and its target."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.bench.echo_server", str(port)])
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    return process, target


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
