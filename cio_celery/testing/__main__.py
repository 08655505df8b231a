"""Run a FakeCustomerIO in the foreground: ``python -m cio_celery.testing [--port 8765]``.

Prints exactly one line, the base URL, once the server accepts connections (so another
process can read it), then serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from cio_celery.testing.fake import FakeCustomerIO


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m cio_celery.testing", description="Serve a fake Customer.io Track + App API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--site-id", default="test-site")
    parser.add_argument("--track-api-key", default="test-track-key")
    parser.add_argument("--app-api-key", default="test-app-key")
    parser.add_argument("--seed", type=int, default=None, help="seed for the random failure rate")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    fake = FakeCustomerIO(
        site_id=args.site_id,
        track_api_key=args.track_api_key,
        app_api_key=args.app_api_key,
        host=args.host,
        port=args.port,
        seed=args.seed,
    )
    try:
        fake.start()
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        print(fake.url, flush=True)
        # A timed wait keeps the main thread responsive to signals on every platform.
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
