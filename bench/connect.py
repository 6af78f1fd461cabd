"""Cost of opening an upstream connection on uvloop: the client's own connect
(proxy/upstream/client.py `_sock_connect`) against the loop's `sock_connect`.

    .venv/bin/python bench/connect.py [--connections 4000] [--concurrency 1 32] [--rounds 3]

uvloop's `sock_connect` resolves the address again before connecting, on libuv's resolver
threads even for a literal IP; the client connects the socket itself and waits for it to be
writable. The listener is in this process and accepts on the same loop, so the figures are
what one new connection costs the proxy's core: pooled connections do not pay it; a failover
to a gateway with nothing pooled, the first exchanges after an idle sweep and gateways that
close after each answer do. Each round measures both ways, in turn; each line is the round
with the median connections per second.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from proxy.upstream.client import _sock_connect

Connect = Callable[[asyncio.AbstractEventLoop, socket.socket, Any], Awaitable[None]]


async def _loop_connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, address: Any) -> None:
    await loop.sock_connect(sock, address)


WAYS: dict[str, Connect] = {"loop.sock_connect": _loop_connect, "client": _sock_connect}


async def measure(connect: Connect, connections: int, concurrency: int) -> dict[str, float]:
    """Connections per second, and the p50 and p99 of one connect in microseconds."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        listener.setblocking(False)
        address = listener.getsockname()

        def accept() -> None:
            while True:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    return
                sock.close()

        loop.add_reader(listener.fileno(), accept)
        took: list[float] = []

        async def one() -> None:
            with socket.socket() as sock:
                sock.setblocking(False)
                started = time.perf_counter()
                await connect(loop, sock, address)
                took.append(time.perf_counter() - started)

        began = time.perf_counter()
        try:
            for _ in range(max(1, connections // concurrency)):
                await asyncio.gather(*(one() for _ in range(concurrency)))
        finally:
            loop.remove_reader(listener.fileno())
        elapsed = time.perf_counter() - began
    took.sort()
    return {
        "per_second": len(took) / elapsed,
        "p50_us": took[len(took) // 2] * 1e6,
        "p99_us": took[min(len(took) - 1, int(len(took) * 0.99))] * 1e6,
    }


async def run(connections: int, concurrencies: list[int], rounds: int) -> list[str]:
    lines = []
    for concurrency in concurrencies:
        results: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for _ in range(rounds):
            for way, connect in WAYS.items():
                results[way].append(await measure(connect, connections, concurrency))
        for way, rows in results.items():
            middle = sorted(rows, key=lambda row: row["per_second"])[len(rows) // 2]
            lines.append(
                f"concurrency {concurrency:>3}  {way:<17} {middle['per_second']:>8,.0f} conn/s"
                f"  p50 {middle['p50_us']:>6,.0f} us  p99 {middle['p99_us']:>6,.0f} us"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for line in uvloop.run(run(args.connections, args.concurrency, args.rounds)):
        print(line)


if __name__ == "__main__":
    main()
