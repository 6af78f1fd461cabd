"""CPU per upstream exchange of `Forwarder.start` on pooled connections, in one process.

    .venv/bin/python bench/client_cpu.py [--requests 50000] [--concurrency 50]

The gateway is a minimal asyncio server in a child process; only this process's CPU time
is counted (time.process_time), so a busy machine slows the run but moves the figure far
less than a wall-clock req/s does. Compare two trees with PYTHONPATH pointing at the other
tree's package (an exported `git archive main proxy schemas`).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time

import uvloop
from multidict import CIMultiDict

from proxy.config.model import Gateway, Source
from proxy.forward import Forwarder, Reply
from proxy.upstream.client import UpstreamClient

ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 39\r\n\r\n"
    b'{"id":"pay_123","status":"succeeded"}\r\n'
)


class _Gateway(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # One small request per read on a kept-alive connection, as this bench sends.
        self.transport.write(ANSWER * data.count(b"HTTP/1.1\r\n"))  # type: ignore[attr-defined]


def _serve(port: multiprocessing.Value) -> None:  # type: ignore[valid-type]
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Gateway, "127.0.0.1", 0)
        port.value = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        await asyncio.Event().wait()

    asyncio.run(main())


async def _run(port: int, requests: int, concurrency: int) -> float:
    gw = Gateway(
        name="g1",
        url=f"http://127.0.0.1:{port}",
        scheme="http",
        host="127.0.0.1",
        port=port,
        base_path="",
        region="eu",
        provider="g1",
        source=Source(file="bench", line=1),
    )
    forwarder = Forwarder(UpstreamClient())
    body = b'{"amount": 1000, "currency": "EUR", "customer": "cus_42", "reference": "r-1"}'
    headers = CIMultiDict({"Content-Type": "application/json", "Idempotency-Key": "k-1"})

    async def worker(n: int) -> None:
        for _ in range(n):
            reply = await forwarder.start(
                gw, "POST", "/v1/deposits", headers, body, connect_timeout=1, within=5
            )
            assert isinstance(reply, Reply) and reply.status == 200, reply

    await asyncio.gather(*(worker(10) for _ in range(concurrency)))  # warm the pool
    started = time.process_time()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return (time.process_time() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    port = multiprocessing.Value("i", 0)
    child = multiprocessing.Process(target=_serve, args=(port,), daemon=True)
    child.start()
    try:
        while not port.value:
            time.sleep(0.01)
        runs = [
            uvloop.run(_run(port.value, args.requests, args.concurrency)) for _ in range(args.runs)
        ]
    finally:
        child.terminate()
    print(
        f"CPU per exchange: median {statistics.median(runs):.1f} µs ({', '.join(f'{r:.1f}' for r in runs)})"
    )


if __name__ == "__main__":
    main()
