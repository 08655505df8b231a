"""Real `celery worker` subprocesses for tests where processes, crashes or acks matter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """One `celery worker` (prefork) with its own log file."""

    def __init__(self, env: dict[str, str], concurrency: int = 4, name: str = "w1",
                 queues: str = "cio,cio.send,cio.fallback", log_dir: Path | None = None) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.concurrency = concurrency
        self.name = name
        self.queues = queues
        self.log_path = (log_dir or Path("/tmp")) / f"cio-worker-{name}-{os.getpid()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, broker_url: str, timeout: float = 30.0) -> WorkerProcess:
        self.log = open(self.log_path, "ab")
        self._log_start = self.log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.worker_app", "worker", "-P", "prefork",
             "-c", str(self.concurrency), "-Q", self.queues, "-n", f"{self.name}@%h", "--loglevel", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=self.env, cwd=str(ROOT), stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() takes the pool children too
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.tail()}")
            if b"ready." in self.log_path.read_bytes()[self._log_start:]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        """The last ``n`` lines this start wrote (the file is shared by a process's tests)."""
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[self._log_start:]
        except (OSError, AttributeError):
            return ""

    def child_pids(self) -> list[int]:
        if self.proc is None:
            return []
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False)
        return [int(p) for p in out.stdout.split()]

    def kill_child(self) -> int | None:
        """SIGKILL one pool process (the OOM killer's usual victim); the worker replaces it. Its pid."""
        for pid in self.child_pids():
            try:
                os.kill(pid, signal.SIGKILL)
                return pid
            except ProcessLookupError:
                continue
        return None

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once, as the OOM killer or a node loss would."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc = None
        self.log.close()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.log.close()


def worker_env(fake: Any, broker_url: str, store_url: str, **extra: str) -> dict[str, str]:
    env = {
        "CELERY_BROKER_URL": broker_url,
        "CIO_REDIS_URL": store_url,
        "CIO_SITE_ID": fake.site_id,
        "CIO_TRACK_API_KEY": fake.track_api_key,
        "CIO_APP_API_KEY": fake.app_api_key,
        "CIO_TRACK_URL": fake.url,
        "CIO_APP_URL": fake.url,
        "CIO_TIMEOUT": "2",
    }
    env.update(extra)
    return env


def flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
