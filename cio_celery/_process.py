"""Objects cached per process: pooled connections must never be shared across a fork."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class PerProcess(Generic[V]):
    """A cache whose entries belong to the process that built them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[int, Hashable], V] = {}

    def get(self, key: Hashable, factory: Callable[[], V]) -> V:
        k = (os.getpid(), key)
        found = self._items.get(k)
        if found is None:
            with self._lock:
                found = self._items.get(k)
                if found is None:
                    found = factory()
                    self._items[k] = found
        return found

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._items[(os.getpid(), key)] = value

    def values(self) -> list[V]:
        pid = os.getpid()
        return [v for (p, _), v in list(self._items.items()) if p == pid]
