"""`NenCacheServer`: the asyncio server; `serve` runs one until SIGTERM; `BackgroundServer` runs one in a thread.

Start-up allocates the memory pool once. Shutdown (SIGTERM, SIGINT or `stop`): stop accepting,
let every connection finish the frame it is reading and the replies in flight, write the disk
queue down and flush the disk tier, then return.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from nencache.errors import ConfigError
from nencache.net.protocol import Code
from nencache.server.budget import FairBudget
from nencache.server.channel import SocketChannel, accept_tls, listen, refuse, tune
from nencache.server.connection import Connection
from nencache.server.metrics import ServerCounters
from nencache.server.settings import ServerSettings
from nencache.server.store import ChunkStore

if TYPE_CHECKING:
    from nencache.server.admin import AdminEndpoint

log = logging.getLogger("nencache.server")
GRACE_SECONDS = 10.0


class NenCacheServer:
    """A chunk server on `settings.host:settings.port`, with its admin HTTP endpoint when configured."""

    def __init__(self, settings: ServerSettings, store: ChunkStore | None = None) -> None:
        self.settings = settings
        self.token = settings.auth_token.encode() if settings.auth_token else None
        self.counters = ServerCounters()
        self.store = store if store is not None else ChunkStore(settings)  # given: serve another owner's chunks
        workers = max(2, settings.io_threads)
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="nencache-server-io")
        self.stopping = False
        self.port = settings.port
        self.admin_port: int | None = None
        self._tls = settings.tls_context()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._admin: AdminEndpoint | None = None
        self._connections: dict[Connection, asyncio.Task[None]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._per_client: dict[str, int] = {}  # open connections by client address
        self._stopped = asyncio.Event()
        budgets = settings.page_budgets(self.store.pool.num_pages)
        # One client address may hold at most half of each budget; one connection one GET's worth of
        # replies and one body page at a time.
        self.replies = FairBudget(budgets.replies, budgets.replies // 2, settings.limits.max_get_keys)
        self.bodies = FairBudget(budgets.bodies, budgets.bodies // 2, 1)
        # Disk lookups of requests in flight; beyond one per core (more threads only fight over the GIL and
        # the disk) a request is answered from memory alone.
        self.disk_reads = 0
        self.max_disk_reads = max(1, min(workers, os.cpu_count() or 1))

    async def start(self) -> None:
        """Listen on the data port (and the admin port); returns once both accept connections."""
        self._listener = listen(self.settings.host, self.settings.port, instead="--port (server_port)")
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept_loop())
        if self.settings.admin_port is not None:
            from nencache.server.admin import start_admin

            try:
                self._admin = await start_admin(self, self.settings.host, self.settings.admin_port)
            except OSError as exc:
                self._listener.close()
                raise ConfigError(f"cannot listen on admin port {self.settings.admin_port} ({_reason(exc)}); "
                                  "choose another --admin-port (server_admin_port), or -1 for none") from None
            self.admin_port = self._admin.port

    def stats(self) -> dict[str, Any]:
        server = self.counters.as_dict() | {"host": self.settings.host, "port": self.port,
                                            "tls": self._tls is not None, "auth": self.token is not None}
        return {"server": server, **self.store.stats()}

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Graceful shutdown (see the module docstring). Safe to call twice."""
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()
        for connection, task in list(self._connections.items()):
            if connection.idle:
                task.cancel()
        pending = set(self._handlers)
        if pending:
            _, late = await asyncio.wait(pending, timeout=GRACE_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._admin is not None:
            await self._admin.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._close_store)
        self.executor.shutdown(wait=True)
        self._stopped.set()

    def _close_store(self) -> None:
        try:
            self.store.flush()
        finally:
            self.store.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                sock, address = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # e.g. out of file descriptors: keep serving the open connections
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            client = str(address[0])
            if len(self._handlers) >= self.settings.max_connections:
                self._refuse(sock, "too many connections (server_max_connections); retry later")
                continue
            if self._per_client.get(client, 0) >= self.settings.max_client_connections:
                self._refuse(sock, "too many connections from this address (server_max_client_connections); "
                                   "close idle ones or retry later")
                continue
            self._per_client[client] = self._per_client.get(client, 0) + 1
            task = asyncio.create_task(self._serve(sock, f"{address[0]}:{address[1]}", client))
            self._handlers.add(task)
            task.add_done_callback(lambda done, client=client: self._handler_done(done, client))

    def _handler_done(self, task: asyncio.Task[None], client: str) -> None:
        self._handlers.discard(task)
        left = self._per_client.pop(client) - 1
        if left:
            self._per_client[client] = left

    def _refuse(self, sock: socket.socket, message: str) -> None:
        self.counters.refused += 1
        self.counters.error(Code.BUSY)
        refuse(sock, message)

    async def _serve(self, sock: socket.socket, peer: str, client: str) -> None:
        try:
            tune(sock)
            channel: Any = (SocketChannel(sock) if self._tls is None
                            else await accept_tls(sock, self._tls, self.settings.io_timeout))
        except (OSError, TimeoutError) as exc:
            log.debug("connection %s failed to start: %r", peer, exc)
            sock.close()
            return
        connection = Connection(self, channel, peer, client)
        task = asyncio.current_task()
        assert task is not None
        self._connections[connection] = task  # type: ignore[assignment]
        self.counters.accepted += 1
        self.counters.connections += 1
        try:
            await connection.run()
        finally:
            self.counters.connections -= 1
            del self._connections[connection]


def serve(settings: ServerSettings, announce: Callable[[str], None] = print) -> int:
    """Run a server until SIGTERM/SIGINT, then shut it down gracefully; the exit status (0)."""

    async def main() -> None:
        server = NenCacheServer(settings)
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
        admin = f", admin http://{_url_host(settings.host)}:{server.admin_port}" if server.admin_port else ""
        tls = "nencaches" if settings.tls_cert else "nencache"
        announce(f"nencache server listening on {tls}://{_url_host(settings.host)}:{server.port}{admin} "
                 f"(pool {server.store.pool.capacity_bytes / 2**30:.3g} GiB in {server.store.pool.num_pages} pages "
                 f"of {server.store.pool.page_bytes} bytes, disk {settings.disk_path or 'off'}, "
                 f"auth {'on' if server.token else 'off'})")
        await server.wait_stopped()
        announce("nencache server stopped; disk tier flushed" if settings.disk_path else "nencache server stopped")

    asyncio.run(main())
    return 0


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class BackgroundServer:
    """A server on its own event loop thread (for tests and for embedding in another program)."""

    def __init__(self, settings: ServerSettings, store: ChunkStore | None = None) -> None:
        self.settings = settings
        self._store = store
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.server: NenCacheServer | None = None
        self._thread = threading.Thread(target=self._run, name="nencache-server", daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the NenCache server did not start in time")
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def url(self) -> str:
        scheme = "nencaches" if self.settings.tls_cert else "nencache"
        return f"{scheme}://{_url_host(self.settings.host)}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self.server is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout)
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            try:
                self.server = NenCacheServer(self.settings, self._store)
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self.server.wait_stopped()

        asyncio.run(main())

