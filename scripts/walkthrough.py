#!/usr/bin/env python3
"""Follow a quickstart (README.md, docs/django.md, docs/flask.md) in a new folder, as a reader would.

    python scripts/walkthrough.py docs/django.md [--keep DIR] [--json]

It writes every file the doc gives (a ```python block whose first line is ``# path/to/file.py``;
``# path: add at the end`` appends to a file an earlier command made), and runs every line of
its ```sh blocks in order, in one shell environment (``export`` and ``cd`` carry over):

- the servers (``redis-server``, ``python -m cio_celery.testing``, ``celery ... worker``,
  ``celery ... flower``, ``manage.py runserver``, ``flask ... run``) start in the background
  and are waited for; every other command must exit 0 (``curl -f`` fails on a 503);
- ``pip install`` and ``apt-get`` lines are not run: the caller installed the package (a
  fresh virtualenv in scripts/install_test.sh, the dev install in tests/test_docs*.py);
- a block after ``<!-- walkthrough: skip -->`` is not run (alternatives, production variants).

The doc's well-known ports (6379 Redis, 8765 the fake, 8000 Django, 5000 Flask, 5555 Flower)
are replaced by free ones, and ``redis-server`` is this script's own private Redis. Nothing
else of the doc is changed. It succeeds when the fake Customer.io has applied an ``identify``
sent by the doc's own code, and prints the seconds that took. Standard library and the
installed cio_celery only: it runs in a virtualenv without test dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PORTS = {"6379": "redis", "8765": "fake", "8000": "django", "5000": "flask", "5555": "flower"}
SKIP_MARK = "<!-- walkthrough: skip -->"
# Variables of the caller's environment a new shell would not have (the test-suite's, the dev's).
_DROP_ENV = re.compile(r"^(CIO_|CELERY_|DJANGO_|FLASK_|FLOWER_|PYTEST|PYTHONPATH$|VIRTUAL_ENV$)")


@dataclass
class Block:
    lang: str
    text: str
    skip: bool


@dataclass
class Server:
    line: str
    proc: subprocess.Popen[bytes]
    log: Path
    group: bool = True  # started in a session of its own: stopped with its children


@dataclass
class Walk:
    doc: Path
    root: Path
    ports: dict[str, int]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = Path()
    servers: list[Server] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


def blocks(markdown: str) -> list[Block]:
    """The fenced code blocks of a markdown text, each with its language and skip mark."""
    out: list[Block] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        out.append(Block(m.group(1), "\n".join(body) + "\n", previous == SKIP_MARK))
        i += 1
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def substitute(text: str, ports: dict[str, int]) -> str:
    for doc_port, name in PORTS.items():
        text = re.sub(rf"(?<![\d.]){doc_port}(?!\d)", str(ports[name]), text)
    return text


def wait_port(port: int, timeout: float, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"`{server.line}` exited with {server.proc.returncode}:\n{tail(server.log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"`{server.line}` did not listen on {port} within {timeout}s:\n{tail(server.log)}")


def wait_text(text: str, timeout: float, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"`{server.line}` exited with {server.proc.returncode}:\n{tail(server.log)}")
        if text in server.log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"`{server.line}` did not print {text!r} within {timeout}s:\n{tail(server.log)}")


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start_redis(walk: Walk) -> None:
    """The doc's ``redis-server``: a private one (the package's own helper) on the doc's substituted port."""
    from cio_celery.testing.redis_server import RedisServer

    (walk.root / "redis").mkdir(exist_ok=True)
    server = RedisServer(port=walk.ports["redis"], appendonly=True, data_dir=str(walk.root / "redis")).start()
    walk.steps.append({"line": "redis-server", "what": "private redis-server", "port": server.port})
    proc = server.process
    assert proc is not None
    walk.servers.append(Server("redis-server", proc, walk.root / "redis.log", group=False))


def start_server(walk: Walk, line: str) -> None:
    index = len(walk.servers)
    log = walk.root / f"server-{index}.log"
    handle = open(log, "wb")
    proc = subprocess.Popen(
        ["bash", "-c", line], cwd=walk.cwd, env=walk.env, stdin=subprocess.DEVNULL,
        stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
    )
    server = Server(line, proc, log)
    walk.servers.append(server)
    t0 = time.monotonic()
    if " worker" in line:
        wait_text("ready.", 60, server)
    elif "cio_celery.testing" in line:
        wait_port(walk.ports["fake"], 30, server)
    elif "flower" in line:
        wait_port(walk.ports["flower"], 30, server)
        # The doc says its API answers without credentials with the development switch: check it.
        url = f"http://127.0.0.1:{walk.ports['flower']}/api/workers"
        with urllib.request.urlopen(url, timeout=10) as answer:
            walk.steps.append({"line": f"GET {url}", "what": "flower api", "status": answer.status})
    elif "runserver" in line:
        wait_port(walk.ports["django"], 30, server)
    else:
        wait_port(walk.ports["flask"], 30, server)
    walk.steps.append({"line": line, "what": "server", "ready_after": round(time.monotonic() - t0, 2)})


SERVER = re.compile(r"(^|\s)(celery\s.*\s(worker|flower)\b|python3? -m cio_celery\.testing|"
                    r"python3? manage\.py runserver|flask\s.*\srun\b)")


def run_line(walk: Walk, raw: str) -> None:
    words = shlex.split(raw, comments=True)
    if not words:
        return
    line = shlex.join(words)
    if words[0] in ("pip", "sudo", "apt-get") or words[:3] == ["python", "-m", "pip"]:
        walk.steps.append({"line": line, "what": "not run (the caller installs)"})
        return
    if words[0] == "export":
        for assignment in words[1:]:
            name, _, value = assignment.partition("=")
            walk.env[name] = value
        walk.steps.append({"line": line, "what": "export"})
        return
    if words[0] == "cd":
        walk.cwd = (walk.cwd / words[1]).resolve()
        walk.steps.append({"line": line, "what": "cd"})
        return
    if words[0] == "redis-server":
        start_redis(walk)
        return
    if SERVER.search(line):
        if "flower" in line and not _has_module(walk, "flower"):
            walk.steps.append({"line": line, "what": "not run (flower is not installed here)"})
            return
        start_server(walk, line)
        return
    t0 = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", line], cwd=walk.cwd, env=walk.env, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=120, check=False,
    )
    walk.steps.append({"line": line, "what": "command", "exit": done.returncode,
                       "seconds": round(time.monotonic() - t0, 2), "stdout": done.stdout[-2000:]})
    if done.returncode != 0:
        raise RuntimeError(f"`{line}` exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _has_module(walk: Walk, name: str) -> bool:
    done = subprocess.run([sys.executable, "-c", f"import {name}"], env=walk.env, capture_output=True, check=False)
    return done.returncode == 0


def write_file(walk: Walk, block: Block) -> None:
    first, _, rest = block.text.partition("\n")
    m = re.match(r"^#\s*([\w./-]+\.\w+)(:\s*add at the end)?\s*$", first.strip())
    if not m:
        return  # an example, not a file of the project
    path = walk.cwd / m.group(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = substitute(rest, walk.ports)
    if m.group(2):
        if not path.exists():
            raise RuntimeError(f"{m.group(1)}: the doc adds to a file no earlier step made")
        with path.open("a") as f:
            f.write("\n" + text)
    else:
        path.write_text(text)
    walk.steps.append({"file": m.group(1), "what": "appended" if m.group(2) else "written"})


# The v2 actions the fake names a batch item by ("batch:<action>"), as the operation a caller
# enqueued. An operation goes alone, or, when its message waited in its queue past the
# batching linger (a loaded machine), as an item of a v2 batch: delivered either way.
_BATCH_ACTIONS = {"event": "track", "page": "pageview"}


def operation_of(op: dict[str, Any]) -> str:
    name = str(op["operation"])
    if name.startswith("batch:"):
        action = name.removeprefix("batch:")
        return _BATCH_ACTIONS.get(action, action)
    return name


def applied(fake_port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{fake_port}/_fake/applied", timeout=5) as answer:
        return list(json.load(answer))


def follow(doc: Path, root: Path) -> dict[str, Any]:
    walk = Walk(doc=doc, root=root, ports={name: free_port() for name in PORTS.values()})
    walk.env = {k: v for k, v in os.environ.items() if not _DROP_ENV.match(k)}
    # The interpreter running this is the reader's: its python, celery, django-admin and flask come first.
    walk.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), walk.env.get("PATH", "")])
    # A private spool: the doc's processes must not flush another project's operations.
    walk.env["XDG_STATE_HOME"] = str(root / "state")
    walk.cwd = root / "work"
    walk.cwd.mkdir(parents=True)
    try:
        for block in blocks(doc.read_text()):
            if block.skip:
                continue
            if block.lang == "python":
                write_file(walk, block)
            elif block.lang == "sh":
                for raw in substitute(block.text, walk.ports).splitlines():
                    run_line(walk, raw)
        deadline = time.monotonic() + 60
        while True:
            ops = applied(walk.ports["fake"])
            if "identify" in {operation_of(op) for op in ops}:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no identify reached the fake Customer.io within 60 s:\n"
                                   + "\n".join(f"--- {s.line}\n{tail(s.log)}" for s in walk.servers))
            time.sleep(0.1)
        return {
            "doc": str(doc),
            "ok": True,
            "seconds_to_first_delivery": round(time.monotonic() - walk.started, 2),
            "applied": sorted({operation_of(op) for op in ops}),
            "batched": sorted({operation_of(op) for op in ops if op["operation"].startswith("batch:")}),
            "project": str(walk.cwd),
            "env": {k: v for k, v in walk.env.items() if k.startswith(("CIO_", "FLOWER_"))},
            "ports": walk.ports,
            "steps": walk.steps,
        }
    finally:
        stop(walk)


def stop(walk: Walk) -> None:
    for server in reversed(walk.servers):
        _signal(server, signal.SIGTERM)
    for server in walk.servers:
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            _signal(server, signal.SIGKILL)
            server.proc.wait(5)


def _signal(server: Server, sig: int) -> None:
    if server.proc.poll() is not None:
        return
    try:
        if server.group:
            os.killpg(server.proc.pid, sig)
        else:
            server.proc.send_signal(sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("doc", type=Path)
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    doc = args.doc.resolve()
    root = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="cio-walkthrough-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = follow(doc, root)
    except Exception as exc:  # noqa: BLE001 - reported as the walk's outcome
        result = {"doc": str(doc), "ok": False, "error": f"{type(exc).__name__}: {exc}", "folder": str(root)}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    elif result["ok"]:
        print(f"{doc.name}: an identify was delivered {result['seconds_to_first_delivery']} s after the walk began")
    else:
        print(f"{doc.name}: FAILED: {result['error']}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
