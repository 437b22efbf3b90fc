"""The argument checks every backend makes before it touches its storage, so all refuse the same input.

Keys start with `/`: the etcd backend keeps them under a root prefix (`/osless` + key), and a key
or a prefix without the slash would reach past that root into another platform's keys.
"""

from __future__ import annotations

from osless.bounds import quoted
from osless.store.base import MAX_VALUE_BYTES, ValueTooLarge

__all__ = ["Checks", "Puts", "check_if_revision", "check_key", "check_prefix", "check_txn", "check_value"]

Puts = list[tuple[str, bytes, int | None]]
Deletes = list[tuple[str, int | None]]
Checks = list[tuple[str, int]]  # (key, mod_revision it must still have; 0: it must be absent)


def check_key(key: str) -> None:
    if not key.startswith("/"):
        raise ValueError(f"a key must start with '/', not {quoted(key)}")


def check_prefix(prefix: str) -> None:
    """'' (every key) or a string starting with '/'."""
    if prefix and not prefix.startswith("/"):
        raise ValueError(f"a prefix must be '' (every key) or start with '/', not {quoted(prefix)}")


def check_value(key: str, value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise ValueTooLarge(key, len(value))


def check_if_revision(if_revision: int | None) -> None:
    if if_revision is not None and if_revision < 0:
        raise ValueError(f"if_revision must be None, 0 or a revision, not {if_revision}")


def check_txn(
    puts: Puts | None,
    deletes: Deletes | None,
    delete_prefixes: list[str] | None,
    checks: Checks | None = None,
) -> tuple[Puts, Deletes, list[str], Checks]:
    """A transaction's parts as lists, values as bytes, once every part is checked.

    A key appears at most once in `puts`, `deletes` and `checks` (a key written is checked by its
    own `if_revision`), and no put falls under a deleted prefix (etcd refuses both: "duplicate key
    given in txn request").
    """
    items = [(key, bytes(value), if_rev) for key, value, if_rev in puts or []]
    gone = list(deletes or [])
    prefixes = list(delete_prefixes or [])
    unchanged = list(checks or [])
    keys = [key for key, _, _ in items] + [key for key, _ in gone] + [key for key, _ in unchanged]
    if len(set(keys)) != len(keys):
        raise ValueError("a transaction may put, delete or check each key only once")
    for key, if_rev in [(key, if_rev) for key, _, if_rev in items] + gone:
        check_key(key)
        check_if_revision(if_rev)
    for key, rev in unchanged:
        check_key(key)
        if rev is None or rev < 0:
            raise ValueError(f"a check's revision must be 0 (absent) or a revision, not {rev}")
    for prefix in prefixes:
        if not prefix:
            raise ValueError("a prefix to delete must not be empty (that would be every key)")
        check_prefix(prefix)
        for key, _, _ in items:
            if key.startswith(prefix):
                raise ValueError(
                    f"a transaction may not put {quoted(key)} under the prefix it deletes, "
                    f"{quoted(prefix)}: delete in one transaction and put in the next"
                )
    for key, value, _ in items:
        check_value(key, value)
    return items, gone, prefixes, unchanged
