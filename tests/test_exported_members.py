"""The public surface is small and deliberate: a change to it shows here first."""

from __future__ import annotations

import osless


def test_osless_exports() -> None:
    assert osless.__all__ == [
        "JSON",
        "App",
        "BatchFailed",
        "ConfigError",
        "Context",
        "Field",
        "FunctionCallError",
        "Message",
        "OslessError",
        "Queue",
        "QueueSendError",
        "RemoteFunction",
        "Secret",
        "Service",
        "Settings",
        "UsageError",
        "Volume",
        "function",
        "queue",
        "service",
    ]
    for name in osless.__all__:
        assert getattr(osless, name).__module__.startswith("osless.sdk")


def test_all_lists_are_sorted() -> None:
    import importlib

    for module in (
        "osless",
        "osless.sdk",
        "osless.store",
        "osless.builder",
        "osless.images",
        "osless.client",
        "osless.node",
        "osless.gateway",
        "osless.controllers",
        "osless.runtime",
    ):
        names = importlib.import_module(module).__all__
        # ruff's order (RUF022): CONSTANTS, then Classes, then functions, each alphabetical
        assert names == sorted(names, key=lambda n: (not n.isupper(), not n[0].isupper(), n)), module
