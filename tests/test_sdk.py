"""The SDK catches misuse at import time, with a message that says how to fix it."""

from __future__ import annotations

import pytest

import osless
from osless import App, UsageError, Volume
from osless.sdk.app import DEFAULT_VOLUME_MB, read_volumes


def test_decorators_without_parentheses_say_so() -> None:
    app = App("demo")
    with pytest.raises(UsageError, match=r"@app.function\(\) instead of @app.function"):
        app.function(lambda event, ctx: None)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"@app.web\(\) instead of @app.web"):
        app.web(lambda: None)  # type: ignore[arg-type]


def test_two_functions_with_one_name() -> None:
    app = App("demo")

    @app.function()
    def greet(event: object, ctx: object) -> None: ...

    with pytest.raises(UsageError, match="already has a function named 'greet'"):

        @app.function(name="greet")
        def other(event: object, ctx: object) -> None: ...


def test_handler_signature_is_checked() -> None:
    app = App("demo")
    with pytest.raises(UsageError, match=r"must accept \(event, ctx\)"):

        @app.function()
        def lonely(event: object) -> None: ...


def test_one_web_app_per_app() -> None:
    app = App("demo")

    @app.web()
    def first() -> object: ...

    with pytest.raises(UsageError, match="at most one"):

        @app.web()
        def second() -> object: ...


@pytest.mark.parametrize("name", ["", "Upper", "has_underscore", "-lead", "x" * 41, "trailing-", "newline\n"])
def test_bad_app_names(name: str) -> None:
    with pytest.raises(UsageError, match="invalid app name"):
        App(name)


def test_bad_resources() -> None:
    app = App("demo")
    with pytest.raises(UsageError, match="memory_mb"):
        app.function(memory_mb=1)
    with pytest.raises(UsageError, match="timeout_s"):
        app.function(timeout_s=0)
    with pytest.raises(UsageError, match="max_duration_s"):
        app.web(max_duration_s=0)


def test_manifest_lists_functions_and_web() -> None:
    app = App("shop")

    @app.function(memory_mb=128, timeout_s=5)
    async def quote(event: object, ctx: object) -> None: ...

    @app.web(timeout_s=20)
    def api() -> object: ...

    assert app.manifest() == {
        "name": "shop",
        "functions": {"quote": {"memory_mb": 128, "timeout_s": 5, "async": True}},
        "web": {"name": "api", "memory_mb": 256, "timeout_s": 20, "max_duration_s": 3600.0},
        "volumes": {},
        "egress": [],
        "config": {},
    }


def test_volumes_and_egress_are_checked() -> None:
    app = App("db", volumes={"/data": "db-data"}, egress=["api.example.com", "*.example.org"])
    assert app.manifest()["volumes"] == {"/data": {"name": "db-data", "size_mb": 1024}}
    assert app.manifest()["egress"] == ["*.example.org", "api.example.com"]
    with pytest.raises(UsageError, match="absolute path"):
        App("db", volumes={"data": "x"})
    with pytest.raises(UsageError, match="reserved"):
        App("db", volumes={"/usr/local/x": "x"})
    with pytest.raises(UsageError, match="lowercase"):
        App("db", volumes={"/data": "Bad Name"})
    with pytest.raises(UsageError, match="no scheme"):
        App("db", egress=["https://api.example.com"])


def test_volumes_have_a_declared_size() -> None:
    app = App("db", volumes={"/data": Volume("db-data", size_mb=512), "/cache": "db-cache"})
    assert app.manifest()["volumes"] == {
        "/cache": {"name": "db-cache", "size_mb": DEFAULT_VOLUME_MB},
        "/data": {"name": "db-data", "size_mb": 512},
    }
    with pytest.raises(UsageError, match=r"size_mb=8\): give a whole number of MB between 16 and 1048576"):
        Volume("db-data", size_mb=8)
    for size in (2**21, 512.0, True, "512"):
        with pytest.raises(UsageError, match="for example size_mb=512"):
            Volume("db-data", size_mb=size)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"lowercase letters.*osless.Volume\(\"orders-data\"\)"):
        Volume("Orders Data")
    with pytest.raises(UsageError, match="lowercase"):
        Volume("../etc")
    with pytest.raises(TypeError):
        Volume("db-data", 512)  # type: ignore[call-arg]
    with pytest.raises(UsageError, match=r"give osless.Volume\(\"name\", size_mb=...\) or a volume name"):
        App("db", volumes={"/data": 512})  # type: ignore[dict-item]
    with pytest.raises(UsageError, match="declared with two sizes"):
        App("db", volumes={"/a": Volume("v", size_mb=16), "/b": Volume("v", size_mb=32)})
    with pytest.raises(UsageError, match="takes a dict"):
        App("db", volumes=["/data"])  # type: ignore[arg-type]


def test_stored_manifests_are_read_in_both_forms_and_checked_again() -> None:
    assert read_volumes({"/data": "old-style"}) == {"/data": Volume("old-style", size_mb=DEFAULT_VOLUME_MB)}
    assert read_volumes({"/data": {"name": "new", "size_mb": 64}}) == {"/data": Volume("new", size_mb=64)}
    assert read_volumes(None) == {}
    # What an app's own process printed is not trusted: paths out of a folder, sizes past the bounds.
    for forged in (
        {"/data": {"name": "../../etc", "size_mb": 64}},
        {"/data": {"name": "x", "size_mb": 10**12}},
        {"/data": {"name": "x", "size_mb": 64, "host": "/"}},
        {"/proc": "x"},
        ["x"],
    ):
        with pytest.raises(UsageError):
            read_volumes(forged)


def test_context_remaining_ms() -> None:
    import time

    ctx = osless.Context(request_id="r", app="a", function="f", deadline=time.time() + 2)
    assert 1500 < ctx.remaining_ms() <= 2000
    assert ctx.log.name == "osless.app.a.f"


def test_context_answers_as_lambdas_does() -> None:
    import time

    ctx = osless.Context(
        "r1", "shop", "quote", time.time() + 2, release=3, memory_mb=512, instance="shop-v3-a"
    )
    assert (ctx.aws_request_id, ctx.function_name, ctx.function_version) == ("r1", "shop.quote", "3")
    assert ctx.invoked_function_arn == "arn:aws:lambda:osless:000000000000:function:shop.quote"
    assert (ctx.memory_limit_in_mb, ctx.log_group_name, ctx.log_stream_name) == (
        512,
        "/osless/shop",
        "shop-v3-a",
    )
    assert 1500 < ctx.get_remaining_time_in_millis() <= 2000
    assert ctx.identity is None and ctx.client_context is None
    assert osless.Context("r", "a", "f", 0.0).function_version == "$LATEST"  # outside an instance


def test_http_functions_in_the_manifest() -> None:
    from osless.sdk.app import read_app_manifest

    app = App("demo")

    @app.function(http=True)
    def page(event: object, ctx: object) -> None: ...

    @app.function()
    def plain(event: object, ctx: object) -> None: ...

    manifest = app.manifest()
    assert manifest["functions"]["page"]["http"] is True
    assert "http" not in manifest["functions"]["plain"]  # older manifests' bytes stay as they were
    assert read_app_manifest(manifest)["functions"] == manifest["functions"]
    with pytest.raises(UsageError, match="http is true or absent"):
        read_app_manifest({**manifest, "functions": {"plain": {**manifest["functions"]["plain"], "http": 1}}})
    with pytest.raises(UsageError, match="give True or False"):
        app.function(http="yes")  # type: ignore[arg-type]


def test_release_steps_are_checked() -> None:
    app = App("shop", release=["python manage.py migrate --noinput", "echo a && echo b"])
    assert app.manifest()["release"] == ["python manage.py migrate --noinput", "echo a && echo b"]
    for bad, said in [
        ("python manage.py migrate", "takes a list of shell commands"),
        ([""], "non-empty string"),
        (["  "], "non-empty string"),
        ([3], "non-empty string"),
        (["a\0b"], "without NUL"),
        (["x" * 5000], "at most 4096 characters"),
        (["true"] * 11, "at most 10"),
    ]:
        with pytest.raises(UsageError, match=said):
            App("shop", release=bad)  # type: ignore[arg-type]


def test_build_steps_are_checked() -> None:
    app = App("site", build=["python manage.py collectstatic --noinput"])
    assert app.manifest()["build"] == ["python manage.py collectstatic --noinput"]
    assert "build" not in App("plain").manifest()  # the manifests of apps without steps stay as they were
    with pytest.raises(UsageError, match=r"takes a list of shell commands"):
        App("site", build="python manage.py collectstatic")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"non-empty string"):
        App("site", build=["make", "  "])
    with pytest.raises(UsageError, match=r"at most 20"):
        App("site", build=["true"] * 21)
    with pytest.raises(UsageError, match=r"at most 4096 characters"):
        App("site", build=["echo " + "x" * 4096])
    # Printed by the app's own process at build time: checked again there.
    from osless.sdk.app import read_app_manifest

    assert read_app_manifest({**App("plain").manifest()})["build"] == []
    with pytest.raises(UsageError, match=r"non-empty string"):
        read_app_manifest({**App("plain").manifest(), "build": [1]})
