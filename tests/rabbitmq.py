"""A throw-away RabbitMQ node on loopback for the tests: its own name, ports, epmd and folders.

Debian's ``rabbitmq-server`` package (``apt-get install rabbitmq-server``) is enough. The node
is the test's own: ``RABBITMQ_NODENAME``, ``RABBITMQ_NODE_PORT`` (AMQP),
``RABBITMQ_DIST_PORT`` (Erlang distribution), ``ERL_EPMD_PORT`` (a private ``epmd`` this
module starts and stops), and every file (config, enabled plugins: none, env file, database,
logs, Erlang cookie) in one temporary folder. A system node on 5672 is left alone.

Started as root, the node runs as the ``rabbitmq`` user, as the package's own wrapper would:
its folder is handed to that user, and every parent of it must be searchable by it.

A test that needs a node calls :func:`skip_without_rabbitmq` first (or uses a fixture that
does): without ``rabbitmq-server`` it is skipped with the reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from cio_celery.testing.redis_server import free_port

__all__ = ["RabbitMQNode", "rabbitmq_server", "skip_without_rabbitmq"]

# Debian puts a wrapper on PATH (/usr/sbin/rabbitmq-server) that switches user with su and
# redirects the output to /var/log/rabbitmq; the script it runs is this one.
_DEBIAN_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def rabbitmq_server() -> str | None:
    """The ``rabbitmq-server`` start script, or None when RabbitMQ is not installed.

    ``CIO_TEST_RABBITMQ_SERVER`` names another one.
    """
    explicit = os.environ.get("CIO_TEST_RABBITMQ_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    if os.access(_DEBIAN_SCRIPT, os.X_OK):
        return _DEBIAN_SCRIPT
    found = shutil.which("rabbitmq-server") or next(
        (p for p in ("/usr/sbin/rabbitmq-server", "/usr/local/sbin/rabbitmq-server") if os.access(p, os.X_OK)), None)
    if found and os.path.basename(os.path.realpath(found)) != "rabbitmq-script-wrapper":
        return found
    return None


def skip_without_rabbitmq() -> None:
    """Skip the calling test (or fixture) when ``rabbitmq-server`` or ``epmd`` is missing."""
    import pytest

    if rabbitmq_server() is None:
        pytest.skip("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)")
    if shutil.which("epmd") is None:
        pytest.skip("epmd (Erlang) is not installed; it comes with rabbitmq-server")


def _run_as() -> pwd.struct_passwd | None:
    """The ``rabbitmq`` user when running as root (RabbitMQ refuses nothing as root, but its
    package runs it as that user, and so do we); None: run as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("rabbitmq")
    except KeyError:
        return None


def _searchable_by(path: Path, user: pwd.struct_passwd) -> bool:
    mode = path.stat()
    if mode.st_uid == user.pw_uid:
        return bool(mode.st_mode & stat.S_IXUSR)
    if mode.st_gid == user.pw_gid:
        return bool(mode.st_mode & stat.S_IXGRP)
    return bool(mode.st_mode & stat.S_IXOTH)


class RabbitMQNode:
    """Start, stop (gracefully or with SIGKILL) and restart a private RabbitMQ node on 127.0.0.1.

    Its database survives :meth:`stop` and :meth:`restart` (durable queues and persistent
    messages are there again); :meth:`close` removes it. ``consumer_timeout_ms`` sets the
    node's ``consumer_timeout``; ``channel_tick_ms`` how often channels check it (RabbitMQ's
    default is once a minute).
    """

    def __init__(
        self,
        *,
        consumer_timeout_ms: int | None = None,
        channel_tick_ms: int | None = None,
        executable: str | None = None,
    ) -> None:
        exe = executable or rabbitmq_server()
        if exe is None:
            raise RuntimeError("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)")
        epmd = shutil.which("epmd")
        if epmd is None:
            raise RuntimeError("epmd is not installed (it comes with rabbitmq-server)")
        self.executable = exe
        self.epmd = epmd
        self.user = _run_as()
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.nodename = f"cio-test-{self.port}@localhost"
        self.consumer_timeout_ms = consumer_timeout_ms
        self.channel_tick_ms = channel_tick_ms
        self.dir = Path(tempfile.mkdtemp(prefix="cio-rabbitmq-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.starts = 0
        self.start_seconds: list[float] = []
        self._prepare()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def stdout_path(self) -> Path:
        return self.dir / "stdout.log"

    # -- files -----------------------------------------------------------------------------

    def _prepare(self) -> None:
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        conf = ["log.console = true", "log.console.level = warning", "log.file.level = info"]
        if self.consumer_timeout_ms is not None:
            conf.append(f"consumer_timeout = {int(self.consumer_timeout_ms)}")
        (self.dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        advanced = []
        if self.channel_tick_ms is not None:
            advanced.append(f"{{channel_tick_interval, {int(self.channel_tick_ms)}}}")
        (self.dir / "advanced.config").write_text(f"[{{rabbit, [{', '.join(advanced)}]}}].\n")
        (self.dir / "enabled_plugins").write_text("[].\n")  # no management: a start in seconds
        (self.dir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        if self.user is not None:
            for parent in self.dir.parents:
                if not _searchable_by(parent, self.user):
                    raise RuntimeError(
                        f"the rabbitmq user cannot reach {self.dir}: {parent} is not searchable by it "
                        "(set TMPDIR to a folder it can reach, such as /tmp)")
            self._chown()

    def _chown(self) -> None:
        assert self.user is not None
        uid, gid = self.user.pw_uid, self.user.pw_gid
        os.chown(self.dir, uid, gid)
        for root, dirs, files in os.walk(self.dir):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, gid)

    def _env(self) -> dict[str, str]:
        d = str(self.dir)
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": d,  # the Erlang cookie is written here
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": f"{d}/mnesia",
            "RABBITMQ_LOG_BASE": f"{d}/log",
            "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq.conf",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{d}/advanced.config",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins",
            "RABBITMQ_CONF_ENV_FILE": f"{d}/rabbitmq-env.conf",
            "RABBITMQ_PID_FILE": f"{d}/rabbitmq.pid",
            # The script then execs the Erlang VM: our process is the node, and SIGTERM stops it
            # gracefully (otherwise a shell in between would run rabbitmqctl to stop it).
            "RUNNING_UNDER_SYSTEMD": "true",
        }

    def _popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        return subprocess.Popen(
            args, env=self._env(), cwd=str(self.dir), stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)

    # -- life cycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> RabbitMQNode:
        started = time.monotonic()
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = self._popen([self.epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._log = open(self.stdout_path, "ab")
        self.process = self._popen([self.executable], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"rabbitmq-server exited with {code}:\n{self.tail()}")
            if self.answers():
                self.starts += 1
                self.start_seconds.append(round(time.monotonic() - started, 2))
                return self
            time.sleep(0.1)
        self.stop(kill=True)
        raise RuntimeError(f"rabbitmq-server did not answer on port {self.port} within {timeout}s:\n{self.tail()}")

    def answers(self) -> bool:
        """Whether the node completes an AMQP handshake (the listener opens last in its boot)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
            self.connection(timeout=2).close()
            return True
        except Exception:
            return False

    def stop(self, kill: bool = False, timeout: float = 30.0) -> None:
        """Stop the node: SIGTERM (a clean shutdown), or SIGKILL (a crash) with ``kill``."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            if kill:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc is not None:
            try:  # the VM's helper processes (erl_child_setup, inet_gethost) share its group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, down_for: float = 0.0, kill: bool = False) -> None:
        self.stop(kill=kill)
        if down_for:
            time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.stop()
        epmd, self._epmd = self._epmd, None
        if epmd is not None and epmd.poll() is None:
            epmd.terminate()
            try:
                epmd.wait(5)
            except subprocess.TimeoutExpired:
                epmd.kill()
                epmd.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def tail(self, n: int = 40) -> str:
        lines: list[str] = []
        for path in (self.stdout_path, *sorted((self.dir / "log").glob("*.log"))):
            try:
                lines += path.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                continue
        return "\n".join(lines[-n:])

    # -- helpers for the tests -------------------------------------------------------------

    def connection(self, timeout: float = 5.0) -> Any:
        """A connected py-amqp connection to the node (as guest, who may connect over loopback)."""
        import amqp

        conn = amqp.Connection(f"127.0.0.1:{self.port}", userid="guest", password="guest", connect_timeout=timeout)
        conn.connect()
        return conn

    def delete_queues(self, *names: str, exchanges: bool = False) -> None:
        """Delete queues (a scenario's leftovers), and with ``exchanges`` the exchanges of the same
        names (Celery's per-queue exchanges: another test may declare them of another type)."""
        conn = self.connection()
        try:
            for name in names:
                channel = conn.channel()
                try:
                    channel.queue_delete(name)
                    if exchanges:
                        channel.exchange_delete(name)
                finally:
                    if channel.is_open:
                        channel.close()
        finally:
            conn.close()

    def queue_depth(self, name: str) -> int:
        """Ready messages in a queue (0 when it does not exist); unacknowledged ones are not counted."""
        import amqp

        conn = self.connection()
        try:
            channel = conn.channel()
            try:
                _, count, _ = channel.queue_declare(name, passive=True)
                return int(count)
            except amqp.exceptions.NotFound:
                return 0
        finally:
            conn.close()

    def __enter__(self) -> RabbitMQNode:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
