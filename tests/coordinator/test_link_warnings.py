"""A coordinator link fed bytes it cannot decode: it logs them, throttled, and goes on reading."""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from coordinator.links import WorkerLink
from wire import messages


def test_undecodable_replies_are_logged_throttled_and_the_link_reads_on(caplog):
    async def main():
        zctx = zmq.asyncio.Context()
        worker = zctx.socket(zmq.ROUTER)
        port = worker.bind_to_random_port("tcp://127.0.0.1")
        link = WorkerLink(zctx, "d0", "decode", f"tcp://127.0.0.1:{port}")
        link.start()
        try:
            pong = asyncio.ensure_future(link.ping(5.0))
            identity, _ = await worker.recv_multipart()
            for i in range(50):
                await worker.send_multipart([identity, b"\x93garbage%d" % i])
            await worker.send_multipart([identity, messages.encode(messages.Pong("decode", "d0", "x", b"\0" * 8, "m"))])
            return await asyncio.wait_for(pong, 5.0)
        finally:
            await link.close()
            zctx.destroy(linger=0)

    with caplog.at_level(logging.WARNING, "coordinator"):
        got = asyncio.run(main())
    assert got.name == "d0"
    lines = [r for r in caplog.records if "cannot read" in r.getMessage()]
    assert len(lines) == 1 and "decode worker d0" in lines[0].getMessage()
