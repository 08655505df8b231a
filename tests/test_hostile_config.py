"""The store URL (and every cio_* URL or id) is masked wherever Celery prints configuration:
``celery report``, ``celery inspect conf`` against a real worker, and Flower's worker config.

The Celery app of these tests lives in a module written to a temporary directory that does
not import cio_celery: the masking must come from the package being installed (the
``celery`` command loads the ``cio`` sub-command's entry point), not from the app's imports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cio_celery.settings import CELERY_HIDDEN_KEYS, mask_in_celery_reports
from cio_celery.testing.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "store-pw-S3CRET-9f2"
SITE = "site-S3CRET-77"
VISIBLE = "plain-visible-value-42"


def write_app(directory: Path, broker_url: str, include_tasks: bool) -> str:
    """A Celery app module with the package's settings in its conf; returns its module name."""
    name = f"hostile_conf_app_{os.getpid()}_{int(include_tasks)}"
    include = '["cio_celery.tasks"]' if include_tasks else "[]"
    (directory / f"{name}.py").write_text(textwrap.dedent(f'''
        from celery import Celery

        app = Celery("hostile_conf", broker={broker_url!r}, include={include})
        app.conf.update(
            cio_redis_url="redis://:{PASSWORD}@127.0.0.1:1/3",
            cio_track_url="http://127.0.0.1:1",
            cio_site_id={SITE!r},
            cio_track_api_key="trk-{PASSWORD}",
            cio_timeout=3.0,
            my_plain_setting={VISIBLE!r},
            broker_connection_retry_on_startup=True,
        )
    '''))
    return name


def env_for(directory: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIO_")}
    env["PYTHONPATH"] = os.pathsep.join([str(directory), str(ROOT)])
    return env


def assert_masked(text: str) -> None:
    assert VISIBLE in text, "the printout shows the configuration at all"
    assert PASSWORD not in text, "the store password is printed"
    assert SITE not in text, "the site id is printed"
    for key in ("cio_redis_url", "cio_site_id", "cio_track_api_key"):
        assert re.search(rf"{key}\W+\*{{8}}", text), f"{key} is not shown masked"


def test_the_pattern_is_extended_once_and_matches_only_our_keys() -> None:
    from celery.app import utils as celery_utils

    assert mask_in_celery_reports() and mask_in_celery_reports()
    assert celery_utils.HIDDEN_SETTINGS.pattern.count(CELERY_HIDDEN_KEYS) == 1
    table = celery_utils.filter_hidden_settings({
        "cio_redis_url": "redis://:pw@h/0", "CIO_REDIS_URL": "redis://:pw@h/0", "cio_track_url": "x",
        "cio_app_url": "x", "cio_site_id": "x", "cio_spool_dir": "x", "cio_timeout": 3, "cio_queue": "cio",
        "broker_url": "redis://:pw@h:6379/0", "task_serializer": "json",
    })
    assert {k for k, v in table.items() if v == "********"} == {
        "cio_redis_url", "CIO_REDIS_URL", "cio_track_url", "cio_app_url", "cio_site_id", "cio_spool_dir",
    }
    assert table["cio_timeout"] == 3 and table["cio_queue"] == "cio" and table["task_serializer"] == "json"
    assert "pw" not in table["broker_url"]


def test_celery_report_masks_the_store_url(tmp_path: Path, broker_url: str) -> None:
    module = write_app(tmp_path, broker_url, include_tasks=False)
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", f"{module}:app", "report"],
        env=env_for(tmp_path), cwd=str(tmp_path), capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cio_timeout: 3.0" in out.stdout
    assert_masked(out.stdout)
    assert PASSWORD not in out.stderr


@pytest.fixture()
def conf_worker(tmp_path: Path, broker_url: str) -> Iterator[tuple[str, Path, str]]:
    """A real `celery worker` of the temporary app, on its own queue and node name."""
    module = write_app(tmp_path, broker_url, include_tasks=True)
    node = f"hostileconf{os.getpid()}@localhost"
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", f"{module}:app", "worker", "-P", "solo", "-n", node,
             "-Q", f"hostile-conf-{os.getpid()}", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
            env=env_for(tmp_path), cwd=str(tmp_path), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        yield module, tmp_path, node
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert PASSWORD not in log.read_text(), "the worker logged the store password"


@pytest.mark.slow
def test_inspect_conf_and_flower_mask_the_store_url(conf_worker: tuple[str, Path, str]) -> None:
    module, directory, node = conf_worker
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", f"{module}:app", "inspect", "conf", "-d", node, "--json",
         "--timeout", "10"],
        env=env_for(directory), cwd=str(directory), capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    replies = json.loads(out.stdout)
    conf = replies[node]
    assert conf["my_plain_setting"] == VISIBLE
    assert conf["cio_redis_url"] == "********" and conf["cio_site_id"] == "********"
    assert_masked(out.stdout.replace('": "', ": "))

    # Flower asks the workers the same way; its API shows each worker's conf.
    port = free_port()
    env = {**env_for(directory), "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", f"{module}:app", "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env, cwd=str(directory), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        body = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{port}/api/workers?refresh=1&workername={node}"
                with urllib.request.urlopen(url, timeout=15) as response:
                    body = response.read().decode()
                if VISIBLE in body:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        data: Any = json.loads(body)
        assert data[node]["conf"]["my_plain_setting"] == VISIBLE
        assert data[node]["conf"]["cio_redis_url"] == "********"
        assert PASSWORD not in body and SITE not in body
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        try:
            flower.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(flower.pid, signal.SIGKILL)
            flower.wait(10)
