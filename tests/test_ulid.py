from __future__ import annotations

import re

from cio_celery.ulid import new_ulid

ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")


def test_ulids_are_well_formed_unique_and_time_ordered() -> None:
    ids = [new_ulid(1_700_000_000 + i) for i in range(1000)]
    assert all(ULID.match(i) for i in ids)
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)


def test_ulid_encodes_the_millisecond_timestamp() -> None:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    u = new_ulid(1_700_000_000.123)
    ms = 0
    for ch in u[:10]:
        ms = ms * 32 + alphabet.index(ch)
    assert ms == 1_700_000_000_123
