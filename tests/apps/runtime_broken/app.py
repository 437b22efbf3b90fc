"""Test app for tests/test_runtime.py: fails while importing."""

from __future__ import annotations

import osless_no_such_module  # noqa: F401

import osless

app = osless.App("runtime-broken")
