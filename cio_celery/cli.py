"""``celery -A proj cio ...``: the operator's commands, reading the app's own configuration.

The ``cio`` group is a Celery sub-command (entry point group ``celery.commands``, added by
``click_plugins``), so ``-A`` loads the app and its ``cio_*`` settings exactly as a worker does.

Exit codes: 0 done / healthy; 1 not ok (unhealthy, nothing matched, rows left in the spool,
the breaker not closed, a confirmation refused or impossible); 2 usage or configuration
error; 3 the store (Redis), the broker or the local spool could not be used. Messages name
the error type only, never a URL, a password or a payload. ``--json`` prints one JSON
document on stdout (errors too: ``{"error": ..., "message": ...}``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import itertools
import json
import logging
import re
import secrets
import socket
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import click
import redis
from celery.bin.base import CeleryCommand, CeleryOption
from kombu.exceptions import KombuError

from .breaker import breaker_for
from .checks import where_set
from .deadletters import DeadLetter, DeadLetters
from .exceptions import CioError, ConfigurationError, EnqueueError, ValidationError
from .fallback import Fallback
from .health import DEFAULT_INSPECT_TIMEOUT, DEFAULT_MAX_SPOOL_AGE, PROBLEM_NAMES, health_report
from .operations import OPERATIONS
from .quarantine import Quarantine, Quarantined
from .settings import Settings, configure, settings_for_app
from .spool import (
    LEFTOVER_CHECK_SECONDS,
    FlushResult,
    SpoolRowInfo,
    SpoolStats,
    drop_row,
    flush_spool,
    list_rows,
    requeue_row,
    show_row,
    spool_stats,
)
from .store import redis_for

__all__ = ["EXIT_NOT_OK", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE", "cio", "parse_duration"]

EXIT_OK = 0
EXIT_NOT_OK = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

F = TypeVar("F", bound=Callable[..., Any])

# Errors that mean "the store or the broker cannot be used" (exit 3).
_UNAVAILABLE = (redis.RedisError, KombuError, EnqueueError, OSError, sqlite3.Error)
_CONNECTION = (redis.ConnectionError, redis.TimeoutError, KombuError, EnqueueError, OSError)

# The fallback releaser's lease, held by the command while it releases (renewed per chunk).
_LEASE_SECONDS = 30.0
_RELEASE_CHUNK = 1000

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``45s``, ``30m``, ``2h``, ``7d`` or ``1w`` as seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration such as 90, 30m, 2h or 7d")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    return None if value is None else parse_duration(value)


def _positive_duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    seconds = _duration(ctx, param, value)
    if seconds is not None and seconds <= 0:
        raise click.BadParameter("must be more than 0 seconds")
    return seconds


def _remember_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta["cio_json"] = True
    return value


# -- output ----------------------------------------------------------------------------------


def _dump(payload: Any) -> str:
    return json.dumps(payload, indent=2, sort_keys=True, default=str)


def _emit(ctx: click.Context, payload: Any, text: str) -> None:
    click.echo(_dump(payload) if ctx.meta.get("cio_json") else text, color=False)


def _fail(ctx: click.Context, code: int, error: str, message: str, **extra: Any) -> NoReturn:
    """One line on stderr; with --json also ``{"error", "message", ...}`` on stdout."""
    if ctx.meta.get("cio_json"):
        click.echo(_dump({"error": error, "message": message, **extra}), color=False)
    click.echo(f"cio: {message}", err=True, color=False)
    ctx.exit(code)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(headers), *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _by_operation(entries: Sequence[DeadLetter] | Sequence[SpoolRowInfo]) -> str:
    counts = Counter(e.operation for e in entries)
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items()))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


# -- context -----------------------------------------------------------------------------------


def _app(ctx: click.Context, strict: bool = True) -> Any:
    """The app ``-A`` loaded (Celery's ``CLIContext.app``), prepared once for the commands.

    ``strict=False`` (``status``) leaves invalid settings to the report, which names them.
    """
    app = getattr(ctx.find_root().obj, "app", None)
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    if not ctx.meta.get("cio_prepared"):
        ctx.meta["cio_prepared"] = True
        # The breaker and the spool log what they do for the workers' logs; here the command says it.
        log = logging.getLogger("cio_celery")
        if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
            log.addHandler(logging.NullHandler())
        # A command that cannot publish must fail, not spool the operation on the operator's machine.
        try:
            settings = settings_for_app(app)
        except ConfigurationError:
            if strict:
                raise
            return app
        if settings.on_broker_error != "raise":
            configure(app, settings.with_changes(on_broker_error="raise"))
    return app


def _settings(ctx: click.Context) -> Settings:
    return settings_for_app(_app(ctx))


def _stdin_is_tty() -> bool:
    try:
        return bool(sys.stdin and sys.stdin.isatty())
    except (AttributeError, ValueError):
        return False


def _confirm(ctx: click.Context, yes: bool, question: str) -> None:
    """Ask on a terminal (``click.confirm`` with abort); refuse without one unless --yes."""
    if yes:
        return
    if not _stdin_is_tty():
        _fail(ctx, EXIT_NOT_OK, "not_confirmed",
              f"{question} Not confirmed: stdin is not a terminal; pass --yes to confirm. Nothing was changed.")
    try:
        click.confirm(question, default=False, abort=True, err=True)
    except click.Abort:
        _fail(ctx, EXIT_NOT_OK, "not_confirmed", "aborted; nothing was changed.")


@contextlib.contextmanager
def _publishing(ctx: click.Context) -> Iterator[None]:
    """Mark a block that publishes: a Redis error in it may be the broker's, not the store's."""
    ctx.meta["cio_publishing"] = True
    try:
        yield
    finally:
        ctx.meta["cio_publishing"] = False


def _store_answers(ctx: click.Context) -> bool:
    try:
        redis_for(_settings(ctx)).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no"
        return False


def _is_local(exc: BaseException) -> bool:
    """A file error: the spool is the only file the commands touch."""
    network = (ConnectionError, TimeoutError, socket.gaierror, socket.herror)
    return isinstance(exc, sqlite3.Error) or (isinstance(exc, OSError) and not isinstance(exc, network))


def _target(ctx: click.Context, exc: BaseException) -> str:
    if _is_local(exc):
        return "local spool"
    if isinstance(exc, (KombuError, EnqueueError)):
        return "broker"
    if ctx.meta.get("cio_publishing") and _store_answers(ctx):
        return "broker"
    return "store"


class CioGroup(click.Group):
    """The ``cio`` group: store, broker and configuration errors become exit codes 3 and 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise
        except ConfigurationError as exc:
            # The message names the setting where it is set (CIO_REDIS_URL, cio_timeout) and the problem,
            # never its value.
            app = getattr(ctx.find_root().obj, "app", None)
            _fail(ctx, EXIT_USAGE, "configuration",
                  f"configuration error: {where_set(exc.setting, app)} {exc.problem}")
        except _UNAVAILABLE as exc:
            target = _target(ctx, exc)
            verb = "is unreachable" if isinstance(exc, _CONNECTION) and target != "local spool" else "failed"
            progress = ctx.meta.get("cio_progress")
            message = f"the {target} {verb} ({type(exc).__name__})" + (f"; {progress}" if progress else "")
            _fail(ctx, EXIT_UNAVAILABLE, f"{target.replace(' ', '_')}_unavailable", message)


def _json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, cls=CeleryOption, help_group="Output Options", expose_value=True,
        callback=_remember_json, help="Print one JSON document on stdout (no table, no color).",
    )(f)


def _yes_option(f: F) -> F:
    return click.option("--yes", "-y", is_flag=True, cls=CeleryOption, help_group="Output Options",
                        help="Do not ask for confirmation (needed when stdin is not a terminal).")(f)


@click.group(name="cio", cls=CioGroup)
def cio() -> None:
    """cio_celery: health, circuit breaker, dead letters, quarantine, fallback and spool of this app.

    Exit codes: 0 ok, 1 not ok, 2 usage or configuration error, 3 store or broker unreachable.
    """


# -- status ------------------------------------------------------------------------------------


def _breaker_line(b: dict[str, Any] | None) -> str:
    if b is None:
        return "disabled (breaker_enabled is off)"
    state = str(b["state"])
    if b.get("opened_by_hand"):
        detail = "opened by hand, until closed"
    elif state == "open":
        detail = f"{b['time_left']:.1f}s left" if b.get("time_left") else "due for half-open"
    elif state == "half-open":
        detail = f"{b['probes_in_flight']} probes in flight"
    else:
        detail = ""
    line = f"{state} ({detail + ', ' if detail else ''}trips {b['trips']})"
    resets = b.get("corrupt_resets") or 0
    if resets:
        # Not a problem by itself (the breaker works again), but someone or something damaged it.
        line += (f"; reset {_plural(resets, 'time')} because its shared state could not be read "
                 "(see the workers' error logs: corrupt -> closed)")
    return line


def _ledger_line(ledger: dict[str, Any] | None, store_read: bool) -> str:
    if not store_read:
        return "?"
    if ledger is None:
        return "off (a broker other than Redis, or CIO_LEDGER=0)"
    text = f"{ledger['depth']} in flight, {ledger['overdue']} overdue"
    if ledger["overdue"]:
        text += f" (the oldest by {_age(ledger['oldest_overdue_seconds'])})"
    return text


def _spool_line(data: dict[str, Any]) -> str:
    if data.get("spool_depth") is None:
        return "?"
    text = f"{data['spool_depth']} waiting, {data.get('spool_quarantined') or 0} quarantined"
    cap = data.get("spool_max_bytes")
    if cap:
        used = data.get("spool_bytes") or 0
        text += f", {_size(used)} of {_size(cap)} ({100 * used / cap:.0f}%)"
    return text


def _queues_line(queues: dict[str, Any] | None) -> str:
    if not queues:
        return "?"
    parts = []
    for name, q in queues.items():
        consumers = "?" if q.get("consumers") is None else q["consumers"]
        parts.append(f"{name}: {q.get('depth')} waiting, {consumers} consuming")
    return "; ".join(parts)


def _batching_line(b: dict[str, Any] | None) -> str:
    if not b:
        return "?"
    share = "-" if b["batched_share"] is None else f"{100 * b['batched_share']:.0f} %"
    per = "-" if b["per_request"] is None else f"{b['per_request']:g}"
    return (f"{b['batched']} delivered in {b['batch_requests']} batch requests ({per} per request), "
            f"{b['single']} alone; {share} batched; {b['buffer']} waiting in the buffer; "
            f"{b.get('appended_at_enqueue', 0)} appended at enqueue")


def _status_text(data: dict[str, Any]) -> str:
    suppressed = data["suppressed_duplicates"]
    sup = str(sum(suppressed.values()))
    if suppressed:
        sup += " (" + ", ".join(f"{op} {n}" for op, n in sorted(suppressed.items())) + ")"

    def show(v: Any) -> str:
        return "?" if v is None else str(v)

    broker = data.get("broker") or {}
    if not broker:
        broker_text = "?"
    elif broker.get("publish_ok"):
        broker_text = f"{broker.get('transport')} (publishing works)"
    elif broker.get("reachable") is False:
        broker_text = f"{broker.get('transport')} (unreachable)"
    else:
        broker_text = f"{broker.get('transport')} (publishing fails)"
    store_read = data["fallback_depth"] is not None
    lines = [
        f"cio_celery: {'healthy' if data['healthy'] else 'UNHEALTHY'}",
        f"breaker                {_breaker_line(data['breaker']) if store_read else '?'}",
        f"broker                 {broker_text}",
        f"queues                 {_queues_line(data.get('queues'))}",
        f"parked (fallback)      {show(data['fallback_depth'])}",
        f"dead letters           {show(data['dead_letters'])}",
        f"quarantine (store)     {show(data.get('quarantine'))}",
        f"ledger                 {_ledger_line(data.get('ledger'), store_read)}",
        f"batching               {_batching_line(data.get('batching'))}",
        f"spool (this host)      {_spool_line(data)}",
        f"suppressed duplicates  {sup if store_read else '?'}",
    ]
    for p in data["problems"]:
        lines += [f"problem: {p['name']}: {p['message']}", f"  fix: {p['fix']}"]
    lines += [f"ignored: {p['name']}: {p['message']}" for p in data.get("ignored") or ()]
    return "\n".join(lines)


@cio.command(cls=CeleryCommand)
@click.option("--max-dead-letters", type=click.IntRange(min=0), cls=CeleryOption, help_group="Thresholds",
              help="Unhealthy when there are more dead letters than this.")
@click.option("--max-fallback-depth", type=click.IntRange(min=0), cls=CeleryOption, help_group="Thresholds",
              help="Unhealthy when more operations than this are parked.")
@click.option("--max-spool-age", callback=_positive_duration, metavar="DURATION", cls=CeleryOption,
              help_group="Thresholds", help="Unhealthy when this host's spool holds an operation older than this "
              "(default 60s).")
@click.option("--max-ledger-overdue", callback=_positive_duration, metavar="DURATION", cls=CeleryOption,
              help_group="Thresholds", help="Unhealthy when a delivery-ledger entry stays overdue longer than this "
              "(default: the ledger's grace, min(visibility timeout, 5m)).")
@click.option("--ignore", "ignore", multiple=True, type=click.Choice(PROBLEM_NAMES), metavar="PROBLEM",
              cls=CeleryOption, help_group="Thresholds",
              help="Report this problem without judging it (repeatable), e.g. app_credentials_missing.")
@click.option("--inspect-timeout", type=click.FloatRange(min=0.1, max=30), default=DEFAULT_INSPECT_TIMEOUT,
              show_default=True, cls=CeleryOption, help_group="Thresholds",
              help="Seconds to wait for the workers' answers (which queues they consume, their credentials).")
@_json_option
@click.pass_context
def status(ctx: click.Context, max_dead_letters: int | None, max_fallback_depth: int | None,
           max_spool_age: float | None, max_ledger_overdue: float | None, ignore: tuple[str, ...],
           inspect_timeout: float, as_json: bool) -> None:
    """Health: breaker, broker, queues and their workers, credentials, parked operations, dead letters, the
    store's quarantine, the delivery ledger, this host's spool.

    Exit 0 healthy, 1 unhealthy (each problem is named, with its fix), 3 the store is unreachable.
    """
    app = _app(ctx, strict=False)
    report = health_report(app, max_dead_letters=max_dead_letters, max_fallback_depth=max_fallback_depth,
                           max_spool_age=DEFAULT_MAX_SPOOL_AGE if max_spool_age is None else max_spool_age,
                           ignore=ignore, inspect_timeout=inspect_timeout, workers_cache=0,
                           max_ledger_overdue=max_ledger_overdue)
    data = report.as_dict()
    _emit(ctx, data, _status_text(data))
    if "store_unavailable" in report.problem_names and not report.store_up:
        ctx.exit(EXIT_UNAVAILABLE)  # health_report caught a store error (named in problems)
    ctx.exit(EXIT_OK if report.healthy else EXIT_NOT_OK)


# -- breaker -----------------------------------------------------------------------------------


@cio.group()
def breaker() -> None:
    """Open, close or reset the cluster's circuit breaker by hand (state in Redis)."""


_QUESTIONS = {
    "open": "Open it for every worker{dur}? Operations will be parked, not sent.",
    "close": "Close it for every worker? Operations will be sent to Customer.io again.",
    "reset": "Reset it (close it and forget its trip count) for every worker?",
}


def _breaker_change(ctx: click.Context, action: str, yes: bool, duration: float | None = None) -> None:
    settings = _settings(ctx)
    b = breaker_for(settings)
    before = b.status()
    _confirm(ctx, yes, f"The breaker is {before.state}. "
             + _QUESTIONS[action].format(dur=f" for {duration:g}s" if duration else ""))
    if action == "open":
        b.open(duration)
    elif action == "close":
        b.close()
    else:
        b.reset()
    after = b.status()
    by_hand = after.state == "open" and after.time_left < 0
    time_left = round(after.time_left, 3) if after.state == "open" and not by_hand else None
    if after.state == "open":
        suffix = " until closed by hand" if by_hand else f" for {after.time_left:.0f}s"
    else:
        suffix = ""
    if not settings.breaker_enabled:
        click.echo("cio: note: breaker_enabled is off in this app's settings; workers with the same "
                   "settings ignore the breaker.", err=True)
    _emit(ctx, {"action": action, "breaker": b.name, "before": before.state, "after": after.state,
                "time_left": time_left, "opened_by_hand": by_hand, "trips": after.trips,
                "breaker_enabled": settings.breaker_enabled},
          f"breaker {b.name}: {before.state} -> {after.state}{suffix}")


@breaker.command("open", cls=CeleryCommand)
@click.option("--for", "duration", callback=_positive_duration, metavar="SECONDS", cls=CeleryOption,
              help_group="Breaker Options",
              help="Open for this long (90, 30m, 2h); default: until closed by hand.")
@_yes_option
@_json_option
@click.pass_context
def breaker_open(ctx: click.Context, duration: float | None, yes: bool, as_json: bool) -> None:
    """Open it: every worker parks operations until it is closed (or --for ends, then it probes)."""
    _breaker_change(ctx, "open", yes, duration)


@breaker.command("close", cls=CeleryCommand)
@_yes_option
@_json_option
@click.pass_context
def breaker_close(ctx: click.Context, yes: bool, as_json: bool) -> None:
    """Close it, forgetting the failure window and any half-open probes (trips are kept)."""
    _breaker_change(ctx, "close", yes)


@breaker.command("reset", cls=CeleryCommand)
@_yes_option
@_json_option
@click.pass_context
def breaker_reset(ctx: click.Context, yes: bool, as_json: bool) -> None:
    """Close it and forget everything, the trip count too (next open period starts short again)."""
    _breaker_change(ctx, "reset", yes)


# -- dead letters ------------------------------------------------------------------------------


@cio.group("dead-letters")
def dead_letters() -> None:
    """List, show, replay or purge the operations that ended in dead letters."""


def _filter_options(f: F) -> F:
    f = click.option("--reason", metavar="PREFIX", cls=CeleryOption, help_group="Selection Options",
                     help="Only entries whose reason starts with this (not_configured, http_4, retries_exhausted).")(f)
    f = click.option("--older-than", callback=_duration, metavar="DURATION", cls=CeleryOption,
                     help_group="Selection Options",
                     help="Only entries that failed longer ago than this (90, 30m, 2h, 7d).")(f)
    f = click.option("--operation", type=click.Choice(OPERATIONS), metavar="OPERATION", cls=CeleryOption,
                     help_group="Selection Options",
                     help="Only this operation (identify, track, send_email ...).")(f)
    return f


def _summary(entry: DeadLetter, now: float) -> dict[str, Any]:
    d = entry.summary()
    d["age_seconds"] = round(max(0.0, now - entry.failed_at), 3)
    return d


@dead_letters.command("list", cls=CeleryCommand)
@_filter_options
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, cls=CeleryOption,
              help_group="Selection Options", help="Show at most this many (oldest first).")
@_json_option
@click.pass_context
def dl_list(ctx: click.Context, operation: str | None, older_than: float | None, reason: str | None, limit: int,
            as_json: bool) -> None:
    """Entries oldest first: id, operation, reason, status, attempts, age (never their arguments)."""
    store = DeadLetters(_settings(ctx), _app(ctx))
    entries = list(itertools.islice(_matching(store, operation, older_than, reason), limit))
    total = store.count()
    now = time.time()
    rows = [[e.id, e.operation, e.reason, e.status, e.attempts, _age(now - e.failed_at)] for e in entries]
    if rows:
        text = _table(["id", "operation", "reason", "status", "attempts", "age"], rows)
        text += f"\n{len(entries)} shown of {_plural(total, 'dead letter')}"
    else:
        text = f"no dead letter matches ({total} in the store)" if total else "no dead letters"
    _emit(ctx, {"total": total, "shown": len(entries), "entries": [_summary(e, now) for e in entries]}, text)


def _meta_view(entry: DeadLetter, show_data: bool) -> dict[str, Any]:
    """The operation's metadata; a caller-chosen idempotency key may hold customer data."""
    meta = dict(entry.kwargs.get("_cio") or {})
    if not show_data and meta.get("key") not in (None, entry.task_id):
        meta["key"] = "<hidden>"
    return meta


@dead_letters.command("show", cls=CeleryCommand)
@click.argument("entry_id", metavar="ID")
@click.option("--show-data", is_flag=True, cls=CeleryOption, help_group="Output Options",
              help="Also print the arguments (customer data: emails, attributes, message bodies).")
@_json_option
@click.pass_context
def dl_show(ctx: click.Context, entry_id: str, show_data: bool, as_json: bool) -> None:
    """One entry in full; its arguments are customer data, hidden unless --show-data. Exit 1 if absent."""
    entry = DeadLetters(_settings(ctx), _app(ctx)).get(entry_id)
    if entry is None:
        _fail(ctx, EXIT_NOT_OK, "not_found", f"no dead letter with id {entry_id!r}")
    now = time.time()
    data = _summary(entry, now)
    data["failed_at_iso"] = _iso(entry.failed_at)
    data["meta"] = _meta_view(entry, show_data)
    kwargs = {k: v for k, v in entry.kwargs.items() if k != "_cio"}
    if show_data:
        data["args"], data["kwargs"], data["data_hidden"] = entry.args, kwargs, False
    else:
        data["args"] = f"<{_plural(len(entry.args), 'arg')} hidden; --show-data shows them>"
        data["kwargs"] = f"<{_plural(len(kwargs), 'kwarg')} hidden>"
        data["data_hidden"] = True
    fields = ["id", "operation", "task_id", "reason", "status", "attempts"]
    lines = [f"{k:<10} {'-' if data[k] is None else data[k]}" for k in fields]
    lines += [
        f"{'failed_at':<10} {data['failed_at_iso']} ({_age(now - entry.failed_at)} ago)",
        f"{'meta':<10} {json.dumps(data['meta'], sort_keys=True)}",
        f"{'args':<10} {json.dumps(entry.args) if show_data else data['args']}",
        f"{'kwargs':<10} {json.dumps(kwargs, sort_keys=True) if show_data else data['kwargs']}",
    ]
    _emit(ctx, data, "\n".join(lines))


def _matching(
    store: DeadLetters, operation: str | None, older_than: float | None, reason: str | None
) -> Iterator[DeadLetter]:
    """Entries oldest first, by operation, age and reason prefix (``not_configured``, ``http_4``)."""
    for entry in store.iter(operation, older_than):
        if reason is None or entry.reason.startswith(reason):
            yield entry


def _select(
    ctx: click.Context, ids: tuple[str, ...], operation: str | None, older_than: float | None,
    reason: str | None, all_: bool,
) -> tuple[DeadLetters, list[DeadLetter], list[str]]:
    """The entries a replay or purge acts on: ids, or filters, or --all (exactly one kind)."""
    if reason is not None and not reason.strip():
        raise click.BadParameter("must not be blank", ctx, param_hint="'--reason'")
    filtered = operation is not None or older_than is not None or reason is not None
    if sum([bool(ids), filtered, all_]) != 1:
        raise click.UsageError("select entries with IDs, or with --operation/--older-than/--reason, or with --all "
                               "(one of the three)", ctx)
    store = DeadLetters(_settings(ctx), _app(ctx))
    if ids:
        found = {i: store.get(i) for i in dict.fromkeys(ids)}
        entries = [e for e in found.values() if e is not None]
        missing = [i for i, e in found.items() if e is None]
    else:
        entries, missing = list(_matching(store, operation, older_than, reason)), []
    return store, entries, missing


def _selection_command(f: F) -> F:
    f = click.option("--all", "all_", is_flag=True, cls=CeleryOption, help_group="Selection Options",
                     help="Every dead letter.")(f)
    f = _filter_options(f)
    return click.argument("ids", nargs=-1, metavar="[ID]...")(f)


@dead_letters.command("replay", cls=CeleryCommand)
@_selection_command
@_yes_option
@_json_option
@click.pass_context
def dl_replay(ctx: click.Context, ids: tuple[str, ...], operation: str | None, older_than: float | None,
              reason: str | None, all_: bool, yes: bool, as_json: bool) -> None:
    """Enqueue entries again with their idempotency key and event id; each is removed once published.

    Exit 1 when nothing matched, an id was not found or an entry could not be replayed.
    """
    store, entries, missing = _select(ctx, ids, operation, older_than, reason, all_)
    if not entries:
        _fail(ctx, EXIT_NOT_OK, "nothing_matched", "no dead letter matches; nothing was replayed.", missing=missing)
    _confirm(ctx, yes, f"Replay {_plural(len(entries), 'dead letter')} ({_by_operation(entries)})?")
    app = _app(ctx)
    replayed: list[str] = []
    skipped: list[dict[str, str]] = []
    with _publishing(ctx):
        for entry in entries:
            if f"cio_celery.{entry.operation}" not in app.tasks:
                skipped.append({"id": entry.id, "why": "unknown operation"})
                continue
            try:
                n = store.replay(ids=[entry.id])
            except ValidationError as exc:
                # Invalid arguments stay invalid: the entry stays for a purge or a fix.
                skipped.append({"id": entry.id, "why": f"invalid {exc.field}"})
                continue
            if n:
                replayed.append(entry.id)
            else:
                missing.append(entry.id)  # gone meanwhile (replayed or purged elsewhere)
            ctx.meta["cio_progress"] = f"{len(replayed)} of {len(entries)} replayed before it failed"
    lines = [f"replayed {_plural(len(replayed), 'dead letter')}"]
    lines += [f"skipped {s['id']}: {s['why']}" for s in skipped]
    lines += [f"not found: {i}" for i in missing]
    _emit(ctx, {"replayed": len(replayed), "ids": replayed, "skipped": skipped, "missing": missing},
          "\n".join(lines))
    ctx.exit(EXIT_NOT_OK if skipped or missing else EXIT_OK)


@dead_letters.command("purge", cls=CeleryCommand)
@_selection_command
@_yes_option
@_json_option
@click.pass_context
def dl_purge(ctx: click.Context, ids: tuple[str, ...], operation: str | None, older_than: float | None,
             reason: str | None, all_: bool, yes: bool, as_json: bool) -> None:
    """Delete entries for good (they will not be delivered). Exit 1 when nothing matched or an id was not found."""
    store, entries, missing = _select(ctx, ids, operation, older_than, reason, all_)
    if not entries:
        _fail(ctx, EXIT_NOT_OK, "nothing_matched", "no dead letter matches; nothing was deleted.", missing=missing)
    _confirm(ctx, yes, f"Delete {_plural(len(entries), 'dead letter')} ({_by_operation(entries)}) for good?")
    purged = [e.id for e in entries if store.delete(e.id)]
    lines = [f"purged {_plural(len(purged), 'dead letter')}", *(f"not found: {i}" for i in missing)]
    _emit(ctx, {"purged": len(purged), "ids": purged, "missing": missing}, "\n".join(lines))
    ctx.exit(EXIT_NOT_OK if missing else EXIT_OK)


# -- the store's quarantine ----------------------------------------------------------------------


@cio.group()
def quarantine() -> None:
    """Store entries that could not be read (parked operations, dead letters, batch items), kept for a human."""


def _entries(n: int) -> str:
    return f"{n} quarantined {'entry' if n == 1 else 'entries'}"


def _quarantined(entry: Quarantined, now: float) -> dict[str, Any]:
    d = entry.summary()
    d["age_seconds"] = round(max(0.0, now - entry.moved_at), 3)
    return d


@quarantine.command("list", cls=CeleryCommand)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, cls=CeleryOption,
              help_group="Selection Options", help="Show at most this many (oldest first).")
@_json_option
@click.pass_context
def quarantine_list(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Entries oldest first: id, source, why, size, age (never their bytes, which may hold customer data)."""
    store = Quarantine(_settings(ctx))
    entries = store.entries(limit)
    total = store.count()
    now = time.time()
    rows = [[e.id, e.source, e.why, e.size, _age(now - e.moved_at)] for e in entries]
    if rows:
        text = _table(["id", "source", "why", "bytes", "age"], rows)
        text += f"\n{len(entries)} shown of {_entries(total)}"
    else:
        text = "the quarantine is empty"
    _emit(ctx, {"total": total, "shown": len(entries), "entries": [_quarantined(e, now) for e in entries]}, text)


@quarantine.command("show", cls=CeleryCommand)
@click.argument("entry_id", metavar="ID")
@click.option("--show-data", is_flag=True, cls=CeleryOption, help_group="Output Options",
              help="Also print the entry's bytes (they may hold customer data: ids, emails, attributes).")
@_json_option
@click.pass_context
def quarantine_show(ctx: click.Context, entry_id: str, show_data: bool, as_json: bool) -> None:
    """One entry: where it came from, why it could not be read; its bytes only with --show-data. Exit 1 if absent."""
    entry = Quarantine(_settings(ctx)).get(entry_id)
    if entry is None:
        _fail(ctx, EXIT_NOT_OK, "not_found", f"no quarantined entry with id {entry_id!r}")
    now = time.time()
    data = _quarantined(entry, now)
    data["moved_at_iso"] = _iso(entry.moved_at)
    if show_data:
        try:
            data["raw"], data["raw_encoding"] = entry.raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            data["raw"], data["raw_encoding"] = base64.b64encode(entry.raw).decode("ascii"), "base64"
        data["data_hidden"] = False
        raw_text = data["raw"] if data["raw_encoding"] == "utf-8" else f"(base64) {data['raw']}"
    else:
        data["raw"] = f"<{_plural(entry.size, 'byte')} hidden; --show-data shows them>"
        data["raw_encoding"] = None
        data["data_hidden"] = True
        raw_text = data["raw"]
    lines = [f"{k:<9} {data[k]}" for k in ("id", "source", "why", "size")]
    lines += [f"{'moved_at':<9} {data['moved_at_iso']} ({_age(now - entry.moved_at)} ago)", f"{'raw':<9} {raw_text}"]
    _emit(ctx, data, "\n".join(lines))


@quarantine.command("purge", cls=CeleryCommand)
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "all_", is_flag=True, cls=CeleryOption, help_group="Selection Options",
              help="Every quarantined entry.")
@_yes_option
@_json_option
@click.pass_context
def quarantine_purge(ctx: click.Context, ids: tuple[str, ...], all_: bool, yes: bool, as_json: bool) -> None:
    """Delete entries for good (what they held is not delivered). Exit 1 when nothing matched or an id was not found."""
    if bool(ids) == all_:
        raise click.UsageError("select entries with IDs or with --all (one of the two)", ctx)
    store = Quarantine(_settings(ctx))
    if all_:
        entries, missing = store.entries(None), []
    else:
        found = {i: store.get(i) for i in dict.fromkeys(ids)}
        entries = [e for e in found.values() if e is not None]
        missing = [i for i, e in found.items() if e is None]
    if not entries:
        _fail(ctx, EXIT_NOT_OK, "nothing_matched", "no quarantined entry matches; nothing was deleted.",
              missing=missing)
    sources = ", ".join(f"{src} {n}" for src, n in sorted(Counter(e.source for e in entries).items()))
    _confirm(ctx, yes, f"Delete {_entries(len(entries))} ({sources}) for good? What they hold will not be delivered.")
    purged = [e.id for e in entries if store.purge([e.id])]
    lines = [f"purged {_entries(len(purged))}",
             *(f"not found: {i}" for i in missing)]
    _emit(ctx, {"purged": len(purged), "ids": purged, "missing": missing}, "\n".join(lines))
    ctx.exit(EXIT_NOT_OK if missing else EXIT_OK)


# -- fallback ----------------------------------------------------------------------------------


@cio.group()
def fallback() -> None:
    """The operations parked in Redis while the breaker refused calls."""


@fallback.command("release", cls=CeleryCommand)
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True, cls=CeleryOption,
              help_group="Release Options", help="Release at most this many (oldest first).")
@click.option("--force", is_flag=True, cls=CeleryOption, help_group="Release Options",
              help="Release even though the breaker is not closed (workers park them again while it refuses).")
@_json_option
@click.pass_context
def fallback_release(ctx: click.Context, limit: int, force: bool, as_json: bool) -> None:
    """Publish parked operations to the fallback queue now, oldest first.

    Respects the breaker: refuses (exit 1) unless it is closed, or --force. Takes the
    releaser's Redis lease, so it never runs beside a worker's releaser; exit 1 while a
    worker holds it (that worker is already releasing).
    """
    app = _app(ctx)
    settings = settings_for_app(app)
    state = breaker_for(settings).status().state if settings.breaker_enabled else "disabled"
    closed = state in ("closed", "disabled")
    if not closed and not force:
        _fail(ctx, EXIT_NOT_OK, "breaker_not_closed",
              f"the breaker is {state}: workers would park released operations again. Close it first "
              "(cio breaker close) or pass --force.", breaker=state)
    fb = Fallback(settings, app)
    if fb.depth() == 0:
        _emit(ctx, {"released": 0, "remaining": 0, "batched": False, "breaker": state},
              "nothing is parked; nothing to release")
        return
    token = f"cli-{secrets.token_hex(8)}"
    if not fb.acquire_lease(token, _LEASE_SECONDS):
        _fail(ctx, EXIT_NOT_OK, "releaser_busy",
              "a worker's fallback releaser holds the lease and releases the parked operations itself; "
              "nothing was released (two releasers at once would publish the same entries twice). "
              "Watch `cio status`, or run this with the workers stopped.", remaining=fb.depth())
    # Like the workers' releaser: batches only while the breaker is closed.
    batch = settings.batch_drain and closed
    released = 0
    try:
        with _publishing(ctx):
            while released < limit:
                # Within half the lease, which is renewed between chunks.
                n = fb.release(min(_RELEASE_CHUNK, limit - released), batch=batch,
                               deadline=time.monotonic() + _LEASE_SECONDS / 2)
                released += n
                ctx.meta["cio_progress"] = f"at least {released} released before it failed; the rest stay parked"
                if n == 0 or not fb.acquire_lease(token, _LEASE_SECONDS):
                    break
    finally:
        with contextlib.suppress(Exception):
            fb.drop_lease(token)
    remaining = fb.depth()
    _emit(ctx, {"released": released, "remaining": remaining, "batched": batch, "breaker": state},
          f"released {released} parked operations to {settings.fallback_queue}"
          f"{' (in batches)' if batch and released else ''}; {remaining} remain")


# -- spool -------------------------------------------------------------------------------------


@cio.group()
def spool() -> None:
    """This host's local enqueue spool (operations the broker could not take at enqueue)."""


@spool.command("flush", cls=CeleryCommand)
@_json_option
@click.pass_context
def spool_flush(ctx: click.Context, as_json: bool) -> None:
    """Publish this host's spool to the broker now, oldest first.

    Exit 1 if rows remain (held by a publish still in flight, failing with the broker answering, or
    quarantined: each is said), 3 if the broker is unreachable.
    """
    app = _app(ctx)
    before = spool_stats(app)
    if before.depth == 0:
        if before.quarantined:
            why = _quarantine_note(before.quarantined)
            _emit(ctx, {"published": 0, "quarantined": 0, "remaining": 0, "in_quarantine": before.quarantined,
                        "why": why}, f"nothing to publish; {why}")
            ctx.exit(EXIT_NOT_OK)
        _emit(ctx, {"published": 0, "quarantined": 0, "remaining": 0, "in_quarantine": 0}, "the spool is empty")
        return
    try:
        result = flush_spool(app)
    except (CioError, *_UNAVAILABLE) as exc:
        if isinstance(exc, ConfigurationError) or _is_local(exc):
            raise  # reported by the group: exit 2, or exit 3 naming the local spool
        remaining = spool_stats(app).depth
        _fail(ctx, EXIT_UNAVAILABLE, "broker_unavailable",
              f"the broker is unreachable ({type(exc).__name__}); {remaining} operations stay in the spool",
              remaining=remaining)
    after = spool_stats(app)
    why = _why_rows_remain(app, result, after)
    text = f"published {result.published}"
    if result.quarantined:
        text += f"; {result.quarantined} quarantined"
    text += f"; {result.remaining} remain" + (f": {why}" if why else "")
    _emit(ctx, {"published": result.published, "quarantined": result.quarantined, "remaining": result.remaining,
                "in_quarantine": after.quarantined, **({"why": why} if why else {})}, text)
    ctx.exit(EXIT_OK if result.remaining == 0 and after.quarantined == 0 else EXIT_NOT_OK)


def _quarantine_note(n: int) -> str:
    return (f"the spool's quarantine holds {_plural(n, 'operation')} (failed spool_max_attempts times with the "
            "broker answering): `cio spool list`, then `spool requeue ID` or `spool drop ID`")


def _why_rows_remain(app: Any, result: FlushResult, stats: SpoolStats) -> str:
    """Why a flush left rows: held by a publish still in flight, failing with the broker answering,
    spooled while it ran (or behind a held one), quarantined."""
    parts = []
    if result.remaining:
        if stats.held:
            wait = stats.hold_left or 0.0
            parts.append(f"{_plural(stats.held, 'operation')} held by a publish still in flight in a process of this "
                         f"host (it may yet land; the hold ends within {wait:.0f}s, then run this again)")
        if stats.failing:
            max_attempts = settings_for_app(app).spool_max_attempts
            parts.append(f"{_plural(stats.failing, 'operation')} failed to publish with the broker answering (each "
                         f"failure counts; after {max_attempts} an operation moves to the quarantine and the others "
                         "go on; `cio spool list` shows the error type)")
        others = stats.depth - stats.held - stats.failing
        if others > 0:
            parts.append(f"{others} spooled while this ran, or behind a held one (run this again)")
        if not parts:
            parts.append("the spool changed while this ran (run this again)")
    if stats.quarantined:
        parts.append(_quarantine_note(stats.quarantined))
    return "; ".join(parts)


def _row_ids(f: F) -> F:
    return click.argument("ids", nargs=-1, required=True, type=click.IntRange(min=1), metavar="ID...")(f)


@spool.command("list", cls=CeleryCommand)
@_json_option
@click.pass_context
def spool_list(ctx: click.Context, as_json: bool) -> None:
    """Every row of this host's spool, pending then quarantined, oldest first: id, state, operation, task id,
    attempts, last error type, size, age. Never the arguments."""
    app = _app(ctx)
    rows = list_rows(app)
    stats = spool_stats(app)
    states = Counter(r.state for r in rows)
    summary = {"pending": states["pending"], "held": states["held"], "quarantined": states["quarantined"],
               "bytes": stats.bytes, "cap": stats.cap}
    if rows:
        text = _table(["id", "state", "operation", "task_id", "attempts", "last_error", "size", "age"],
                      [[r.id, r.state, r.operation, r.task_id, r.attempts, r.last_error, _size(r.size), _age(r.age)]
                       for r in rows])
        text += (f"\n{_plural(len(rows), 'row')}: {states['pending']} pending, {states['held']} held, "
                 f"{states['quarantined']} quarantined; {_size(stats.bytes)} of {_size(stats.cap)} used")
    else:
        text = "the spool is empty"
    _emit(ctx, {**summary, "rows": [r.as_dict() for r in rows]}, text)


@spool.command("show", cls=CeleryCommand)
@click.argument("row_id", type=click.IntRange(min=1), metavar="ID")
@click.option("--show-data", is_flag=True, cls=CeleryOption, help_group="Output Options",
              help="Also print the arguments, headers and metadata (customer data: emails, attributes, bodies).")
@_json_option
@click.pass_context
def spool_show(ctx: click.Context, row_id: int, show_data: bool, as_json: bool) -> None:
    """One row with its publish options; its arguments are customer data, hidden unless --show-data.
    Exit 1 if absent."""
    row = show_row(_app(ctx), row_id, show_data=show_data)
    if row is None:
        _fail(ctx, EXIT_NOT_OK, "not_found", f"no spool row with id {row_id}")
    row["data_hidden"] = not show_data
    fields = ["id", "state", "operation", "task_id", "attempts", "last_error", "size"]
    lines = [f"{k:<10} {'-' if row.get(k) is None else row[k]}" for k in fields]
    lines.append(f"{'age':<10} {_age(row['age'])}")
    lines.append(f"{'options':<10} {json.dumps(row.get('options') or {}, sort_keys=True, default=str)}")
    for k in ("args", "kwargs", "meta") if show_data else ("args", "kwargs"):
        value = row.get(k)
        text = json.dumps(value, sort_keys=True, default=str) if show_data else str(value)
        if not show_data and k == "args":
            text = text[:-1] + "; --show-data shows them>"
        lines.append(f"{k:<10} {text}")
    _emit(ctx, row, "\n".join(lines))


def _rows_by_id(app: Any, ids: tuple[int, ...]) -> tuple[list[SpoolRowInfo], list[int]]:
    by_id = {r.id: r for r in list_rows(app)}
    wanted = list(dict.fromkeys(ids))
    return [by_id[i] for i in wanted if i in by_id], [i for i in wanted if i not in by_id]


@spool.command("drop", cls=CeleryCommand)
@_row_ids
@_yes_option
@_json_option
@click.pass_context
def spool_drop(ctx: click.Context, ids: tuple[int, ...], yes: bool, as_json: bool) -> None:
    """Delete rows (pending or quarantined) for good: they will not be delivered. Exit 1 when an id was not found."""
    app = _app(ctx)
    rows, missing = _rows_by_id(app, ids)
    if not rows:
        _fail(ctx, EXIT_NOT_OK, "nothing_matched", "no spool row matches; nothing was deleted.", missing=missing)
    pending = sum(r.state != "quarantined" for r in rows)
    warning = (f" {pending} not quarantined: a process of this host may be publishing it right now." if pending
               else "")
    _confirm(ctx, yes, f"Delete {_plural(len(rows), 'spooled operation')} ({_by_operation(rows)}) for good? "
             f"They will not be delivered.{warning}")
    dropped = [r.id for r in rows if drop_row(app, r.id)]
    missing += [r.id for r in rows if r.id not in dropped]  # flushed or dropped meanwhile
    lines = [f"dropped {_plural(len(dropped), 'spooled operation')}", *(f"not found: {i}" for i in missing)]
    _emit(ctx, {"dropped": len(dropped), "ids": dropped, "missing": missing}, "\n".join(lines))
    ctx.exit(EXIT_NOT_OK if missing else EXIT_OK)


@spool.command("requeue", cls=CeleryCommand)
@_row_ids
@_json_option
@click.pass_context
def spool_requeue(ctx: click.Context, ids: tuple[int, ...], as_json: bool) -> None:
    """Move quarantined rows back to the end of the pending rows (attempts reset, new ids).

    The app's processes on this host flush them like any leftover, or `cio spool flush` now.
    Exit 1 when an id is not a quarantined row.
    """
    app = _app(ctx)
    rows, missing = _rows_by_id(app, ids)
    requeued: list[int] = []
    skipped: list[dict[str, Any]] = []
    for row in rows:
        if row.state != "quarantined":
            skipped.append({"id": row.id, "why": f"not quarantined ({row.state})"})
        elif requeue_row(app, row.id):
            requeued.append(row.id)
        else:
            missing.append(row.id)  # dropped or requeued meanwhile
    lines = [f"requeued {_plural(len(requeued), 'row')}"
             + (" (new ids, at the end of the pending rows); this host's processes of the app flush them within "
                f"{LEFTOVER_CHECK_SECONDS:.0f}s, or run `cio spool flush`" if requeued else "")]
    lines += [f"skipped {s['id']}: {s['why']}" for s in skipped]
    lines += [f"not found: {i}" for i in missing]
    _emit(ctx, {"requeued": len(requeued), "ids": requeued, "skipped": skipped, "missing": missing},
          "\n".join(lines))
    ctx.exit(EXIT_NOT_OK if skipped or missing else EXIT_OK)
