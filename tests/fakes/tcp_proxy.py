"""A stoppable asyncio TCP proxy on 127.0.0.1 for simulating outages of a real server."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forwards connections to ``target``; can stop listening, cut connections or stall.

    * ``stop()`` refuses new connections and cuts the open ones (the server is gone);
    * ``cut()`` closes the open connections only (a network blip);
    * ``stall()`` keeps accepting connections and keeps the open ones open, but forwards
      nothing in either direction (a black hole, a partitioned network) until ``resume()``;
      what was sent meanwhile then goes on, in order, as TCP's retransmissions deliver it
      once a short partition heals (the kernel gives a connection up only after minutes),
      and an end that closed meanwhile is closed then (the other end learns of it no
      sooner); ``held`` counts the chunks and closes that waited;
    * ``delay`` (seconds, 0 by default) holds every chunk that long before forwarding it (a
      slow network or a slow server), in each direction.
    The listening port stays the same across ``stop()`` and ``start()``.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.delay = 0.0
        self.held = 0
        self.connections = 0  # open through the proxy: a pump of theirs still runs

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self.cut()
        if server is not None:
            await server.wait_closed()

    async def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        self.connections += 1
        pumps: set[asyncio.Task[None]] = set()

        def ended(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            pumps.discard(task)
            if not pumps:
                self.connections -= 1

        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            pumps.add(task)
            task.add_done_callback(ended)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await source.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                await self._cross()
                sink.write(chunk)
                await sink.drain()
        await self._cross()  # a close (or a reset) crosses a black hole no sooner than data
        sink.transport.abort()
        self._writers.discard(sink)

    async def _cross(self) -> None:
        """Wait until nothing stalls the way (a chunk or a close that waits is ``held``)."""
        if not self._flowing.is_set():
            self.held += 1
            await self._flowing.wait()
