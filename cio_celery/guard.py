"""The guards of a delivery: idempotency claims, a breaker permit and a rate-limit slot.

A :class:`Guard` (one operation) or :class:`BatchGuard` (the items of a v2 batch) takes them
together in one round trip to the store and gives them back together in one, whatever happens
in between: used as a context manager, it settles on exit if nothing settled it before.

Settling tells the breaker what the call did (nothing, when no call was made), marks a
delivered operation's claim done or releases it, and pauses the rate limiter after a 429. A
delivered operation is settled the moment Customer.io answers, before anything else runs. The
claim of an operation that goes to dead letters is *held*, and marked dead-lettered in the same
script that writes the dead letter (:meth:`Guard.dead_mark_calls`): a copy redelivered after
that stops, instead of calling again. If the dead letter cannot be written, the claim ends with
its lease and its attempt marker stays, so the next attempt knows an earlier one never finished.

Settling never raises: the outcome already decided stands, and a store that cannot take the
update loses one breaker sample. A done mark it could not write is not lost: the process keeps
it (:class:`PendingMarks`) and writes it as soon as the store answers again, so that a copy of
the delivered operation (a requeued batch, a redelivered or republished message) finds it done
instead of sending again once the claim's lease has run out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._process import PerProcess
from .breaker import Breaker, Permit, breaker_for
from .coalesce import CLAIM_LATER, admit_call
from .exceptions import DeliveryError, StoreStateError
from .idempotency import _DONE, Claim, Claims
from .ledger import Ledger
from .limiter import Limiter, Slot, bucket_of
from .policy import CallOutcome, breaker_outcome
from .settings import Settings
from .store import ScriptCall, is_cluster, key, run_pipelined, run_script, run_scripts

__all__ = ["BatchGuard", "Guard"]

logger = logging.getLogger("cio_celery")

T = TypeVar("T")

# Operations delivered alone (Prometheus compares them with batched ones).
_COUNT_SINGLE = "return redis.call('HINCRBY', KEYS[1], 'delivered:single', 1)"

# Errors of reading a script's answer: the store holds something this version cannot read.
_READ_ERRORS = (ValueError, TypeError, IndexError, KeyError, AttributeError, UnicodeDecodeError)


class _Base:
    def __init__(self, settings: Settings, bucket: str, ledger: Ledger | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.claims = Claims(settings) if settings.idempotency_enabled else None
        self.breaker: Breaker | None = breaker_for(settings) if settings.breaker_enabled else None
        self.limiter = Limiter(settings)
        self.bucket = bucket
        self.permit: Permit | None = None
        self.slot: Slot | None = None
        self.unguarded = False  # breaker_on_store_error=allow and the store is down
        self._call: CallOutcome = "ignore"
        self._duration: float | None = None
        self._pause: float | None = None
        self._in_doubt = False
        self._settled = False

    @property
    def in_doubt(self) -> bool:
        """A call started and its result is unknown: it may have been applied."""
        return self._in_doubt

    def _acquire_calls(self, held_slot: int) -> tuple[list[ScriptCall], str]:
        calls: list[ScriptCall] = []
        token = ""
        if self.breaker is not None:
            acquire, token = self.breaker.acquire_call()
            calls.append(acquire)
        limit = self.limiter.acquire_call(self.bucket, held_slot)
        if limit is not None:
            calls.append(limit)
        return calls, token

    def _read_acquire(self, results: Sequence[Any], token: str) -> None:
        i = 0
        if self.breaker is not None:
            self.permit = self.breaker.acquire_result(results[i], token)
            i += 1
        if i < len(results):
            self.slot = Limiter.acquire_result(results[i])

    def reacquire(self) -> Permit | None:
        """Ask the breaker again, after sleeping for a slot: it may have tripped meanwhile."""
        if self.breaker is not None and self.permit is not None:
            self.permit = self.breaker.acquire()
        return self.permit

    def _tail_calls(self) -> tuple[list[ScriptCall], bool, CallOutcome]:
        """The breaker record and the limiter pause, to follow the claim updates; whether the
        first of them is a breaker record, and the outcome it records."""
        calls: list[ScriptCall] = []
        record = False
        outcome: CallOutcome = self._call
        if self.breaker is not None and self.permit is not None and self.permit.decision != "reject":
            outcome = self.breaker._effective(self._call, self._duration)
            # A closed breaker ignores an "ignore": nothing to send.
            if not (self.permit.decision == "allow" and outcome == "ignore"):
                calls.append(self.breaker.record_call(self.permit, outcome))
                record = True
        if self._pause is not None and self.limiter.rate_of(self.bucket) > 0:
            calls.append(self.limiter.pause_call(self.bucket, self._pause))
        return calls, record, outcome

    def _send(self, calls: list[ScriptCall], n_claim_calls: int, record: bool, outcome: CallOutcome,
              delivered: bool, pipelined: bool) -> None:
        if not calls:
            return
        try:
            results = run_pipelined(self.settings, calls) if pipelined else run_scripts(self.settings, calls)
        except Exception as exc:  # noqa: BLE001 - the decided outcome stands (see the module docstring)
            _warn("store_update_failed", exc, delivered=delivered)
            if delivered:
                pending_marks().add(self.settings, [c for c in calls[:n_claim_calls] if c.text == _DONE])
            return
        if record and self.breaker is not None:
            try:
                self.breaker.record_result(results[n_claim_calls], outcome)
            except Exception as exc:  # noqa: BLE001 - a breaker sample lost, no more
                _warn("breaker_record_unreadable", exc)


class PendingMarks:
    """Done marks of delivered operations that the store could not take, written again by a
    thread of this process every ``interval`` seconds until it answers.

    A done mark is always right to write (the operation was delivered) and writing it twice
    changes nothing, so they are retried as they are. Bounded: at most ``limit`` marks, each
    kept at most ``max_age`` seconds (logged when one is given up); at a worker process's
    shutdown one last try (:meth:`give_up_now`); lost if the process is killed.
    """

    interval = 0.25  # the first retry; doubled while the store stays away, up to max_wait
    max_wait = 5.0
    chunk = 500
    limit = 100_000
    max_age = 3600.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[Settings, ScriptCall, float]] = []
        self._thread: threading.Thread | None = None
        self._flushing = 0
        self._wait = self.interval
        self.written = 0
        self.given_up = 0

    def add(self, settings: Settings, calls: list[ScriptCall]) -> None:
        if not calls:
            return
        now = time.monotonic()
        with self._lock:
            room = self.limit - len(self._items)
            if room < len(calls):
                self.given_up += len(calls) - max(0, room)
                logger.error("cio_celery %d done marks not kept (%d already wait for the store)",
                             len(calls) - max(0, room), len(self._items),
                             extra={"cio_event": "done_marks_given_up"})
            self._items += [(settings, c, now) for c in calls[:max(0, room)]]
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cio-pending-marks", daemon=True)
                self._thread.start()

    def pending(self, settings: Settings | None = None) -> int:
        """Marks not written yet (those being written now included); of ``settings`` only if given."""
        with self._lock:
            if settings is None:
                return len(self._items) + self._flushing
            return sum(1 for st, _c, _t in self._items if st is settings) + self._flushing

    def flush(self) -> int:
        """Try to write the pending marks once, oldest first, in pipelines of ``chunk``; stop at
        the first pipeline the store refuses (it is still away). Returns how many were written."""
        with self._lock:
            items, self._items = self._items, []
            self._flushing = len(items)
        written, failed_at = 0, len(items)
        for start in range(0, len(items), self.chunk):
            part = items[start:start + self.chunk]
            try:
                for settings in {id(i[0]): i[0] for i in part}.values():
                    run_pipelined(settings, [c for st, c, _t in part if st is settings])
            except Exception:  # noqa: BLE001 - the store is still away: keep this one and the rest
                failed_at = start
                break
            written += len(part)
        now = time.monotonic()
        rest = items[failed_at:]
        keep = [i for i in rest if now - i[2] < self.max_age]
        if len(keep) < len(rest):
            self.given_up += len(rest) - len(keep)
            logger.error("cio_celery %d done marks given up after %.0f s without a store",
                         len(rest) - len(keep), self.max_age, extra={"cio_event": "done_marks_given_up"})
        with self._lock:
            self._items = keep + self._items
            self._flushing = 0
        self._wait = self.interval if not keep else min(self.max_wait, self._wait * 2)
        if written:
            self.written += written
            logger.warning("cio_celery %d done marks written after the store came back", written,
                           extra={"cio_event": "done_marks_written", "cio_count": written})
        return written

    def give_up_now(self) -> None:
        """The process ends: one last try, then log what is lost (a copy may be sent again)."""
        if not self.pending():
            return
        self.flush()
        left = self.pending()
        if left:
            self.given_up += left
            logger.error("cio_celery %d done marks lost as the process ends (the store did not answer)",
                         left, extra={"cio_event": "done_marks_given_up", "cio_count": left})

    def _run(self) -> None:
        while True:
            time.sleep(self._wait)
            self.flush()
            with self._lock:
                if not self._items:
                    self._thread = None
                    return


_pending: PerProcess[PendingMarks] = PerProcess()


def pending_marks() -> PendingMarks:
    """This process's pending done marks (a forked pool process starts with none)."""
    return _pending.get(None, PendingMarks)


def _warn(event: str, exc: BaseException, **extra: Any) -> None:
    fields = {"cio_event": event, "cio_error": type(exc).__name__, **{f"cio_{k}": v for k, v in extra.items()}}
    text = " ".join(f"{k[4:]}={v}" for k, v in fields.items())
    logger.warning("cio_celery %s", text, extra=fields)


class Guard(_Base):
    """The guards of one operation's delivery attempt."""

    def __init__(self, settings: Settings, operation: str, idempotency_key: str, task_id: str,
                 ledger: Ledger | None = None) -> None:
        super().__init__(settings, bucket_of(operation), ledger)
        self.operation = operation
        self.key = idempotency_key
        self.task_id = task_id
        self.claim: Claim | None = None
        self._claim_keys: tuple[str, str] | None = None
        self._token: str | None = None  # a claim of ours (or maybe ours) to settle
        self._delivered = False
        self._held = False
        self.coalesced = False  # the admission put the operation in the batching buffer

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.settle(hold=self._in_doubt and exc[0] is not None)

    def take(self, held_slot: int = 0, coalesce_entry: str | None = None, behind: bool = False) -> None:
        """Claim the key, ask the breaker and the limiter: one round trip. Raises store errors.

        With ``coalesce_entry`` (a batchable operation, adaptive batching on) the admission
        script decides instead whether it goes alone or joins the batching buffer
        (:attr:`coalesced`; see coalesce.py). If it raises, whatever the script did take is
        given back on settle (the claim by a compare-and-delete on our token, harmless when the
        claim is not ours).
        """
        if coalesce_entry is not None and self.claims is not None:
            self._admit(coalesce_entry, behind)
            return
        calls: list[ScriptCall] = []
        if self.claims is not None:
            call, self._claim_keys, self._token = self.claims.claim_call(self.operation, self.key, self.task_id)
            calls.append(call)
        more, permit_token = self._acquire_calls(held_slot)
        calls += more
        if not calls:
            return
        results = run_scripts(self.settings, calls)
        try:
            if self.claims is not None and self._claim_keys is not None and self._token is not None:
                self.claim = Claims.claim_result(results[0], self._claim_keys, self._token)
                if not self.claim.owned:
                    self._token = None
                results = results[1:]
            self._read_acquire(results, permit_token)
        except _READ_ERRORS as exc:
            raise StoreStateError(f"unreadable guard answer ({type(exc).__name__})") from None

    def _admit(self, entry: str, behind: bool) -> None:
        assert self.claims is not None
        claim_call, self._claim_keys, self._token = self.claims.claim_call(self.operation, self.key, self.task_id)
        acquire, permit_token = self.breaker.acquire_call() if self.breaker is not None else (None, "")
        slot_call = self.limiter.acquire_call(self.bucket, 0, late=0)
        assert slot_call is not None, "adaptive batching needs the rate limiter"
        ledger = [self.ledger._entries, self.ledger._due] if self.ledger is not None else None
        # On a cluster the claim is in its shard's slot, the rest in the store's common slot: the
        # admission runs there without it, and an operation that goes alone claims in a second
        # round trip (its permit and slot already taken, as the single path's on a cluster).
        later = is_cluster(self.settings)
        call = admit_call(self.settings, ScriptCall(CLAIM_LATER, [], []) if later else claim_call, acquire,
                          slot_call, entry, self.task_id, self.limiter.rate_of(self.bucket), ledger, behind)
        claim_res, permit_res, slot_res, flag = run_script(self.settings, call.text, call.keys, call.args)
        if later and claim_res in (b"later", "later"):
            claim_res = run_scripts(self.settings, [claim_call])[0]
        try:
            if self.breaker is not None:
                self.permit = self.breaker.acquire_result(permit_res, permit_token)
            if slot_res is not None:
                self.slot = Limiter.acquire_result(slot_res)
            if claim_res is None:  # not claimed: coalesced, or the breaker refused
                self._token = None
                self.coalesced = flag is not None
                return
            self.claim = Claims.claim_result(claim_res, self._claim_keys, self._token)
            if not self.claim.owned:
                self._token = None
        except _READ_ERRORS as exc:
            raise StoreStateError(f"unreadable admission answer ({type(exc).__name__})") from None

    def unguard(self) -> None:
        """Call without claim or permit (``breaker_on_store_error = allow``, the store is down)."""
        self.unguarded = True
        self._token = None

    def call(self, fn: Callable[[], T]) -> tuple[T | None, DeliveryError | None]:
        """Make the call; a success is settled at once (done mark and breaker record)."""
        self._in_doubt = True
        started = time.monotonic()
        try:
            result = fn()
        except DeliveryError as err:
            self._in_doubt = err.maybe_applied
            self._call = breaker_outcome(err)
            if err.status == 429:
                self._pause = err.retry_after or 1.0
            return None, err
        self._in_doubt = False
        self._duration = time.monotonic() - started
        self._call = "success"
        self._delivered = True
        self.settle()
        return result, None

    def ledger_clear_calls(self) -> list[ScriptCall]:
        """The ledger's entry goes when the operation ends (run with the script that ends it)."""
        return [self.ledger.clear_call([self.task_id])] if self.ledger is not None else []

    def settle(self, *, hold: bool = False, ended: bool = False) -> None:
        """Give everything back in one round trip (once); ``hold`` keeps an owned claim until
        :meth:`release_held`; ``ended`` (a suppressed duplicate) clears the ledger's entry, as a
        delivery does."""
        if self._settled:
            return
        self._settled = True
        calls: list[ScriptCall] = []
        if self.claims is not None and self._token is not None and self._claim_keys is not None:
            claim = self.claim or Claim("claimed", self._claim_keys, self._token)
            if self._delivered:
                calls.append(self.claims.done_call(claim, self.task_id))
            elif hold:
                self._held = True
            else:
                calls.append(self.claims.release_call(claim))
        n_claim = len(calls)
        tail, record, outcome = self._tail_calls()
        end = self.ledger_clear_calls() if self._delivered or ended else []
        if self._delivered:
            end.append(ScriptCall(_COUNT_SINGLE, [key(self.settings, "stats")], []))
        self._send(calls + tail + end, n_claim, record, outcome, self._delivered, pipelined=False)

    def dead_mark_calls(self) -> list[ScriptCall]:
        """The claim's dead-letter mark, to run in one script with the dead letter itself: a
        redelivered copy then stops instead of calling again. Empty when no claim is ours."""
        if not self._held or self.claims is None or self._token is None or self._claim_keys is None:
            return []
        claim = self.claim or Claim("claimed", self._claim_keys, self._token)
        return [self.claims.dead_call(claim, self.task_id)]

    def dead_marked(self) -> None:
        """The dead letter and its mark were written: the held claim is settled."""
        self._held = False

    def release_held(self, acted: bool) -> None:
        """Release a claim held while its outcome was acted on, once it was (not when the action
        failed: the claim then ends with its lease, and its attempt marker tells the next attempt)."""
        if not self._held:
            return
        self._held = False
        if not acted or self.claims is None or self._token is None or self._claim_keys is None:
            return
        claim = self.claim or Claim("claimed", self._claim_keys, self._token)
        self._send([self.claims.release_call(claim)], 1, False, "ignore", False, pipelined=False)


class BatchGuard(_Base):
    """The guards of a v2 batch: a claim per item, one permit, one rate-limit slot."""

    def __init__(self, settings: Settings, ledger: Ledger | None = None) -> None:
        super().__init__(settings, "track", ledger)
        self.claims_of: list[Claim | None] = []
        self._keys: list[tuple[str, str]] = []
        self._tokens: list[str | None] = []
        self._task_ids: list[str] = []
        self._done: set[int] = set()  # positions delivered
        self._hold: set[int] = set()  # positions whose claims are kept for their dead letters
        self._held: set[int] = set()
        self._untried: set[int] = set()  # positions sent on alone: released, their attempt markers kept

    def __enter__(self) -> BatchGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and self._in_doubt:
            # Interrupted mid-call (the pool's hard time limit terminates the process, a
            # shutdown): the items may have been applied. Their claims are kept until their
            # lease ends, and their attempt markers count this attempt, so that a batch that
            # dies every time ends in dead letters (worker_lost_repeatedly) instead of looping.
            self._hold |= set(range(len(self._tokens)))
        self.settle()

    def take(self, items: Sequence[tuple[str, str, str]], held_slot: int = 0) -> list[Claim | None]:
        """Claim each ``(operation, key, task id)``, ask the breaker and the limiter: one round
        trip (pipelined). Returns the claims (None when idempotency is off)."""
        calls: list[ScriptCall] = []
        for operation, idem_key, task_id in items:
            self._task_ids.append(task_id)
            if self.claims is not None:
                call, keys, token = self.claims.claim_call(operation, idem_key, task_id)
                calls.append(call)
                self._keys.append(keys)
                self._tokens.append(token)
        n = len(calls)
        more, permit_token = self._acquire_calls(held_slot)
        calls += more
        results = run_pipelined(self.settings, calls) if calls else []
        try:
            for i in range(n):
                claim = Claims.claim_result(results[i], self._keys[i], self._tokens[i] or "")
                self.claims_of.append(claim)
                if not claim.owned:
                    self._tokens[i] = None
            if self.claims is None:
                self.claims_of = [None] * len(items)
            self._read_acquire(results[n:], permit_token)
        except _READ_ERRORS as exc:
            raise StoreStateError(f"unreadable guard answer ({type(exc).__name__})") from None
        return self.claims_of

    def call(self, fn: Callable[[], T], failed_of: Callable[[T], set[int]],
             sent: Sequence[int]) -> tuple[T | None, set[int], DeliveryError | None]:
        """Send the items ``sent`` (indexes); on an answer, mark the accepted ones done at once.

        ``failed_of`` reads the indexes (positions in ``sent``) that Customer.io refused (207).
        """
        self._in_doubt = True
        started = time.monotonic()
        try:
            response = fn()
        except DeliveryError as err:
            self._in_doubt = err.maybe_applied
            self._call = breaker_outcome(err)
            if err.status == 429:
                self._pause = err.retry_after or 1.0
            return None, set(), err
        self._in_doubt = False
        self._duration = time.monotonic() - started
        self._call = "success"
        try:
            failed = failed_of(response)
        except Exception:  # noqa: BLE001 - an unreadable 207 body: none of them is known to have failed
            failed = set()
        refused = {sent[n] for n in failed if 0 <= n < len(sent)}
        self._done = {pos for pos in sent if pos not in refused}
        self._hold |= refused  # they go to dead letters
        self.settle()
        return response, refused, None

    def hold(self, positions: Sequence[int]) -> None:
        """Keep these claims at settle: they go to dead letters (see :meth:`dead_mark_calls`)."""
        self._hold |= set(positions)

    def untried(self, positions: Sequence[int]) -> None:
        """Release these claims at settle without calling: their items go on alone, and their
        attempt markers keep the count of earlier attempts that died."""
        self._untried |= set(positions)

    def dead_mark_calls(self, position: int) -> list[ScriptCall]:
        """The dead-letter mark of a held claim, to run in one script with its dead letter."""
        token = self._tokens[position] if position < len(self._tokens) else None
        if position not in self._held or self.claims is None or token is None:
            return []
        return [self.claims.dead_call(Claim("claimed", self._keys[position], token), self._task_ids[position])]

    def dead_marked(self, positions: Sequence[int]) -> None:
        """These dead letters and their marks were written: their held claims are settled."""
        self._held -= set(positions)

    def settle(self) -> None:
        """Give everything back in one pipelined round trip (once)."""
        if self._settled:
            return
        self._settled = True
        calls: list[ScriptCall] = []
        if self.claims is not None:
            for i, token in enumerate(self._tokens):
                if token is None:
                    continue
                claim = Claim("claimed", self._keys[i], token)
                if i in self._done:
                    calls.append(self.claims.done_call(claim, self._task_ids[i]))
                elif i in self._hold:
                    self._held.add(i)
                else:
                    calls.append(self.claims.release_call(claim, untried=i in self._untried))
        n_claim = len(calls)
        tail, record, outcome = self._tail_calls()
        if self.ledger is not None and self._done:
            tail.append(self.ledger.clear_call([self._task_ids[i] for i in sorted(self._done)]))
        self._send(calls + tail, n_claim, record, outcome, bool(self._done), pipelined=True)

    def release_held(self, acted: bool) -> None:
        held, self._held = self._held, set()
        if not acted or self.claims is None:
            return
        calls = [self.claims.release_call(Claim("claimed", self._keys[i], t))
                 for i in sorted(held) if (t := self._tokens[i]) is not None]
        self._send(calls, len(calls), False, "ignore", False, pipelined=True)
