"""A TCP proxy in front of a redis-server that counts the commands crossing it and can fail one.

It reads the RESP commands each client sends (so a pipeline of five commands counts five),
records their names, and at the k-th counted command can:

- ``drop``: forward the commands before it in the same write, then close both sides: the
  client sees a ConnectionError, as when Redis stops mid-call;
- ``error``: replace it by a script that answers an error: the client sees a ResponseError,
  as with corrupt state or a script bug;
- ``kill``: call ``on_kill`` (the test SIGKILLs the worker process) and drop the connection
  without forwarding the command: the command never ran;
- ``kill_after``: forward the command, then call ``on_kill``: it ran, its answer is never read.

Commands a client sends to set up a connection (CLIENT, HELLO, SELECT, AUTH, PING) and to load
scripts (SCRIPT) are forwarded but not counted, so the k-th command is the same one in every
run whether or not the client had to open a new connection. ``ignore_names`` and
``ignore_scripts`` (SHA1 prefixes) leave out a worker's background work that runs on its own
clock (a drainer's ticks, the ledger's writer), which would make the k-th command differ.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

UNCOUNTED = frozenset({b"CLIENT", b"HELLO", b"SELECT", b"AUTH", b"PING", b"SCRIPT", b"ECHO", b"READONLY"})
ERROR_SCRIPT = [b"EVAL", b"return redis.error_reply('ERR injected fault')", b"0"]


def encode(parts: list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


def parse_commands(buf: bytes) -> tuple[list[tuple[list[bytes], bytes]], bytes]:
    """Complete commands in ``buf`` as (parts, raw bytes), and the incomplete rest."""
    commands: list[tuple[list[bytes], bytes]] = []
    pos = 0
    while pos < len(buf):
        start = pos
        if buf[pos:pos + 1] != b"*":  # an inline command
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            commands.append((buf[pos:end].split(), buf[pos:end + 2]))
            pos = end + 2
            continue
        end = buf.find(b"\r\n", pos)
        if end < 0:
            break
        n = int(buf[pos + 1:end])
        pos = end + 2
        parts: list[bytes] = []
        complete = True
        for _ in range(n):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                complete = False
                break
            size = int(buf[pos + 1:end])
            if end + 2 + size + 2 > len(buf):
                complete = False
                break
            parts.append(buf[end + 2:end + 2 + size])
            pos = end + 2 + size + 2
        if not complete:
            pos = start
            break
        commands.append((parts, buf[start:pos]))
    return commands, buf[pos:]


@dataclass
class Fault:
    at: int  # the counted command to act on, from 1
    mode: str  # drop, error, kill, kill_after
    fired: bool = False


@dataclass
class RespProxy:
    """Listen on a free loopback port, forward to ``target_port``."""

    target_port: int
    on_kill: Callable[[], None] | None = None
    commands: list[str] = field(default_factory=list)
    fault: Fault | None = None
    counting: bool = False
    ignore_names: frozenset[bytes] = frozenset()
    ignore_scripts: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="resp-proxy").start()

    def start_counting(self, fault: Fault | None = None) -> None:
        with self._lock:
            self.commands = []
            self.fault = fault
            self.counting = True

    def stop_counting(self) -> list[str]:
        with self._lock:
            self.counting = False
            self.fault = None
            return list(self.commands)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for c in list(self._conns):
            try:
                c.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _decide(self, parts: list[bytes]) -> str:
        """``forward``, or the fault's mode when this is the faulted command."""
        name = parts[0].upper() if parts else b""
        with self._lock:
            if not self.counting or name in UNCOUNTED or name in self.ignore_names:
                return "forward"
            if name == b"EVALSHA" and len(parts) > 1 and parts[1].startswith(self.ignore_scripts):
                return "forward"
            label = name.decode(errors="replace")
            if name in {b"EVALSHA", b"EVAL"} and len(parts) > 1:
                label += " " + parts[1][:8].decode(errors="replace")
            self.commands.append(label)
            f = self.fault
            if f is not None and not f.fired and len(self.commands) == f.at:
                f.fired = True
                return f.mode
            return "forward"

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        buf = b""
        try:
            while not self._closed.is_set():
                ready, _, _ = select.select([client, server], [], [], 0.5)
                if server in ready:
                    data = server.recv(65536)
                    if not data:
                        return
                    client.sendall(data)
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        return
                    commands, buf = parse_commands(buf + data)
                    out = b""
                    for parts, raw in commands:
                        action = self._decide(parts)
                        if action == "forward":
                            out += raw
                        elif action == "error":
                            out += encode(ERROR_SCRIPT)
                        elif action == "drop":
                            server.sendall(out)
                            return
                        elif action == "kill":
                            if self.on_kill:
                                self.on_kill()
                            return
                        elif action == "kill_after":
                            server.sendall(out + raw)
                            # Let Redis run it before the process that sent it dies.
                            select.select([server], [], [], 1.0)
                            if self.on_kill:
                                self.on_kill()
                            return
                    if out:
                        server.sendall(out)
        except OSError:
            return
        finally:
            for s in (client, server):
                try:
                    s.close()
                except OSError:
                    pass
