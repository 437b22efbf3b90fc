"""osless.sdk.config: the schema an app declares, the values it reads, and what a push changes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

import osless
from osless import App, ConfigError, Field, Secret, UsageError
from osless.sdk import config


@pytest.fixture(autouse=True)
def empty_store() -> Iterator[None]:
    """The store is process-wide: each test starts, and leaves, with no values."""
    config.apply({}, 0)
    yield
    config.apply({}, 0)


def _shop() -> tuple[App, osless.Settings]:
    app = App("shop")
    settings = app.config(
        greeting=str,
        max_items=Field(int, default=10),
        db_password=Secret,
        workers=Field(int, default=4, restart=True, doc="worker processes"),
        ratio=Field(float, default=1),
        debug=Field(bool, default=False),
        extra=Field(osless.JSON, default={"tags": ["a"]}),
    )
    return app, settings


def test_schema_is_in_the_manifest() -> None:
    app, _ = _shop()
    assert app.manifest()["config"] == {
        "db_password": {"type": "secret", "required": True, "restart": False},
        "debug": {"type": "bool", "default": False, "required": False, "restart": False},
        "extra": {"type": "json", "default": {"tags": ["a"]}, "required": False, "restart": False},
        "greeting": {"type": "str", "required": True, "restart": False},
        "max_items": {"type": "int", "default": 10, "required": False, "restart": False},
        "ratio": {"type": "float", "default": 1.0, "required": False, "restart": False},
        "workers": {
            "type": "int",
            "default": 4,
            "required": False,
            "restart": True,
            "doc": "worker processes",
        },
    }
    assert isinstance(app.manifest()["config"]["ratio"]["default"], float)
    assert App("plain").manifest()["config"] == {}


def test_defaults_then_pushed_values() -> None:
    _, settings = _shop()
    assert (settings.max_items, settings.workers, settings.debug) == (10, 4, False)
    assert settings.ratio == 1.0 and isinstance(settings.ratio, float)
    assert settings.extra == {"tags": ["a"]}
    assert config.current_version() == 0

    config.apply({"greeting": "hello", "db_password": "pw", "max_items": 3}, 7)
    assert (settings.greeting, settings.max_items, settings.db_password) == ("hello", 3, "pw")
    assert type(settings.db_password) is str  # the app gets the plain secret; only reprs mask it
    assert config.current_version() == 7
    assert settings.as_dict() == {
        "db_password": "pw",
        "debug": False,
        "extra": {"tags": ["a"]},
        "greeting": "hello",
        "max_items": 3,
        "ratio": 1.0,
        "workers": 4,
    }


def test_required_key_not_set() -> None:
    _, settings = _shop()
    with pytest.raises(
        ConfigError, match=re.escape("greeting is not set: run osless config set shop greeting=...")
    ):
        _ = settings.greeting
    assert issubclass(ConfigError, osless.OslessError)
    assert "greeting" not in settings.as_dict()  # as_dict has only the keys that have a value
    # A stored value that no longer fits the schema is an error too, not a wrong type handed to the app.
    config.apply({"max_items": "many"}, 1)
    with pytest.raises(ConfigError, match="max_items must be an int, got str: run osless config set shop"):
        _ = settings.max_items


def test_unknown_key_and_read_only() -> None:
    _, settings = _shop()
    with pytest.raises(AttributeError, match=r"declares no config key 'greting' \(keys: db_password, debug,"):
        _ = settings.greting
    with pytest.raises(AttributeError, match="read-only in the app: run osless config set shop greeting="):
        settings.greeting = "x"
    assert "max_items" in dir(settings)


def test_repr_masks_secrets() -> None:
    _, settings = _shop()
    assert repr(settings).startswith("Settings(db_password=<not set>, debug=False,")
    config.apply({"greeting": "hello", "db_password": "hunter2"}, 1)
    shown = repr(settings)
    assert "hunter2" not in shown and "db_password='***'" in shown and "greeting='hello'" in shown


def test_apply_reports_changed_keys() -> None:
    _, settings = _shop()
    assert config.apply({"greeting": "a", "db_password": "p", "unknown": 1}, 1) == {
        "greeting": "a",
        "db_password": "p",
    }  # keys no schema knows are not reported
    assert config.apply({"greeting": "a", "db_password": "p", "unknown": 2}, 2) == {}
    # Setting a key to its default is no change; unsetting a key reports its default, or None.
    assert config.apply({"greeting": "a", "db_password": "p", "max_items": 10}, 3) == {}
    assert config.apply({"greeting": "a", "max_items": 11}, 4) == {"db_password": None, "max_items": 11}
    assert config.apply({"greeting": "a"}, 5) == {"max_items": 10}
    # int -> float for float fields, and bool is not an int.
    assert config.apply({"greeting": "a", "ratio": 2}, 6) == {"ratio": 2.0}
    assert settings.ratio == 2.0 and isinstance(settings.ratio, float)
    assert config.apply({"greeting": "a", "ratio": 2.0}, 7) == {}
    assert config.apply({"greeting": "a", "ratio": 2.0, "max_items": 1}, 8) == {"max_items": 1}
    assert config.apply({"greeting": "a", "ratio": 2.0, "max_items": True}, 9) == {"max_items": True}


def test_values_applied_before_the_schema_is_declared() -> None:
    # The zygote applies the initial config before it imports the app.
    config.apply({"greeting": "early"}, 4)
    _, settings = _shop()
    assert settings.greeting == "early" and config.current_version() == 4


def test_config_misuse() -> None:
    app = App("demo")
    app.config(a=str)
    with pytest.raises(UsageError, match=r"already declared its config; declare all keys in one app.config"):
        app.config(b=int)
    with pytest.raises(UsageError, match="must be an int, got str"):
        Field(int, default="ten")
    with pytest.raises(UsageError, match="must be a float, got bool"):
        Field(float, default=True)
    with pytest.raises(UsageError, match="finite"):
        Field(float, default=float("inf"))
    with pytest.raises(UsageError, match="must be a JSON value"):
        Field(osless.JSON, default={1, 2})
    with pytest.raises(
        UsageError, match=r"a secret cannot have a default .* `osless config set APP KEY=...`"
    ):
        Field(Secret, default="hunter2")
    with pytest.raises(UsageError, match=r"unsupported type; use str, int, float, bool, osless.JSON"):
        Field(bytes)
    bad: list[dict[str, Any]] = [
        {"x": list},
        {"x": bytes},
        {"x": "str"},
        {"Upper": str},
        {"_private": str},
        {"class": str},
        {"as_dict": str},
    ]
    for fields in bad:
        with pytest.raises(UsageError):
            App("demo").config(**fields)
    with pytest.raises(UsageError, match=r"for dicts and lists use osless\.JSON"):
        App("demo").config(x=dict)
    with pytest.raises(UsageError, match="at least one key"):
        App("demo").config()
    with pytest.raises(TypeError, match=r"a type for app\.config"):
        Secret()


def test_defaults_are_copied() -> None:
    tags = ["a"]
    field = Field(osless.JSON, default={"tags": tags})
    tags.append("b")
    assert field.default == {"tags": ["a"]}


def test_on_config_change_registers_hooks() -> None:
    app = App("demo")

    @app.on_config_change
    def one(changed: dict[str, Any]) -> None: ...

    @app.on_config_change()
    async def two(changed: dict[str, Any]) -> None: ...

    assert app.config_hooks == [one, two]
    with pytest.raises(UsageError, match="decorates a function"):
        app.on_config_change(42)  # type: ignore[call-overload]


def test_service() -> None:
    orders = osless.service("orders")
    assert orders.url == "http://orders.osless" and orders.name == "orders"
    assert osless.service("orders") == orders
    with pytest.raises(UsageError, match="give an app name"):
        osless.service("Orders!")
