"""Servers the fault suite owns: redis-server processes, and a TCP proxy in front of one.

Nothing here touches a Redis the suite did not start.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults.waiting import poll


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """A redis-server of the test's own on a free loopback port, data in ``workdir``.

    Without ``aof`` nothing is persisted, so `restart` comes back empty; with it every write
    is appended and fsynced first (``appendfsync always``), so a `kill` loses nothing, as a
    broker set up for durability would.
    """

    def __init__(self, workdir: Path, *, aof: bool = False) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aof = aof
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start the server (on `port`) and wait until it answers PING."""
        aof = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.aof
            else ["--appendonly", "no"]
        )
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--save", "", *aof, "--dir", str(self.dir)]
        cmd += ["--logfile", "redis.log", "--daemonize", "no"]
        self.proc = subprocess.Popen(cmd, cwd=self.dir, start_new_session=True)
        if not poll(self._answers, 10, every=0.02):
            self.stop()
            log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with self.client(timeout=0.2) as probe:
                return bool(probe.ping())
        except redis.RedisError:
            return False

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0, timeout: float = 2.0) -> redis.Redis:
        """A client of this server that never retries (the caller closes it)."""
        return redis.Redis(
            port=self.port,
            db=db,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: connections drop, and without ``aof`` the data is gone."""
        if self.proc is not None:
            self._signal(signal.SIGCONT)  # a paused server would not die of it otherwise
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Start again on the same port (empty, unless ``aof``); kills it first if running."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop for good (SIGTERM, then SIGKILL after a deadline)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()


class Proxy:
    """A TCP proxy on a free loopback port in front of ``upstream_port``, one thread per
    direction of each connection. Modes: pass (the default, and `passthrough`),
    `delay_replies`, `blackhole`; `cut` closes every open connection once."""

    CHUNK = 65536

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._mode, self._delay = "pass", 0.0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._spawn(self._accept)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def passthrough(self) -> None:
        self._set("pass")

    def delay_replies(self, seconds: float) -> None:
        """Hold every server-to-client chunk for ``seconds`` before forwarding it."""
        self._set("delay", seconds)

    def blackhole(self) -> None:
        """Keep accepting, forward nothing in either direction."""
        self._set("blackhole")

    def cut(self) -> None:
        """Close every connection open now; later ones are served as the mode says."""
        with self._lock:
            doomed, self._open = self._open, set()
        for sock in doomed:
            _close(sock)

    def stop(self) -> None:
        self._stopping.set()
        self.cut()
        _close(self._listener)
        for thread in self._threads:
            thread.join(timeout=2)

    def _set(self, mode: str, delay: float = 0.0) -> None:
        with self._lock:
            self._mode, self._delay = mode, delay

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=1)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open |= {client, server}
            self._spawn(self._pump, client, server, False)
            self._spawn(self._pump, server, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        source.settimeout(0.1)
        while not self._stopping.is_set():
            try:
                data = source.recv(self.CHUNK)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self._lock:
                mode, delay = self._mode, self._delay
            if mode == "blackhole":
                continue
            if mode == "delay" and replies and self._stopping.wait(delay):
                break
            try:
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            _close(sock)
        with self._lock:
            self._open -= {source, sink}


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
