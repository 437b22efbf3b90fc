"""Schedules (`@app.schedule`, api/schedules.py, controllers/clock.py): each tick runs once, within a
second of it, as an async invocation; paused and resumed; their history; they follow the release.
(With two servers on one etcd: tests/test_fleet.py, on its cluster.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import osless
from osless import schedules
from tests.platform import Platform, copy_app

TICKER = Path(__file__).parent / "apps" / "ticker"
BEAT = "@app.schedule(every=timedelta(seconds=1))\n"
JAN_2025, JAN_2026 = 1_735_689_600, 1_767_225_600  # 00:00 UTC


@pytest.fixture(scope="module")
def ticker(platform: Platform) -> Iterator[dict[str, Any]]:
    deployed = platform.deploy_warm(TICKER)
    try:
        yield deployed
    finally:  # its schedules would fire for the rest of the session
        platform.cli("apps", "delete", "ticker", "--yes", check=False)


def runs(p: Platform, name: str, app: str = "ticker") -> list[dict[str, Any]]:
    r = p.http("GET", f"/v1/apps/{app}/schedules/{name}/runs")
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def ended(p: Platform, name: str, count: int, state: str = "succeeded") -> list[dict[str, Any]]:
    return p.wait_for(  # type: ignore[no-any-return]
        lambda: len(done := [r for r in runs(p, name) if r["state"] == state]) >= count and done,
        timeout=30,
        what=f"{count} runs of {name} {state}",
    )


def test_a_schedule_runs_each_tick_once_within_a_second_of_it(
    platform: Platform, ticker: dict[str, Any]
) -> None:
    done = ended(platform, "beat", 4)
    every = runs(platform, "beat")
    assert len({r["tick"] for r in every}) == len(every)  # one run per tick
    # None skipped: each tick between the newest three that ended has its run, ended or not (a run
    # may end after the next tick's: each is an invocation of its own).
    newest = sorted(r["tick"] for r in done)[-3:]
    missing = set(range(newest[0], newest[-1] + 1)) - {r["tick"] for r in every}
    assert not missing, (newest, sorted(r["tick"] for r in every))
    for run in done:
        late = run["started_at"] - run["tick"]
        assert 0 <= late < 1.0, run
        # the handler's own clock, as it ran
        got = platform.http("GET", f"/v1/invocations/{run['id']}").json()
        assert got["state"] == "succeeded" and 0 <= got["result"]["at"] - run["tick"] < 1.0, got
        assert run["duration_s"] is not None and run["attempts"] == 1

    listed = {s["name"]: s for s in platform.cli_json("schedule", "ls", "ticker")}
    assert set(listed) == {"beat", "broken", "yearly_caught_up", "yearly_skipped"}
    assert listed["beat"]["every_s"] == 1 and listed["beat"]["cron"] is None
    assert listed["broken"]["cron"] == "* * * * * *" and listed["broken"]["tz"] == "Europe/Paris"
    assert not listed["beat"]["paused"] and listed["beat"]["next_tick"] > listed["beat"]["last_tick"]


def test_a_failing_schedule_shows_its_outcome_in_its_history(
    platform: Platform, ticker: dict[str, Any]
) -> None:
    dead = ended(platform, "broken", 1, state="dead")[0]
    assert dead["attempts"] == 1 and dead["error"], dead  # retries=0: one try
    error = platform.http("GET", f"/v1/invocations/{dead['id']}").json()["error"]
    assert error["type"] == "RuntimeError" and "a scheduled failure" in error["message"], error
    shown = platform.cli_json("schedule", "history", "ticker.broken")
    assert dead["id"] in {r["id"] for r in shown}
    text = platform.cli("schedule", "history", "ticker.broken").stdout
    assert "dead" in text and dead["id"] in text


def test_a_paused_schedule_does_not_run_until_resumed(platform: Platform, ticker: dict[str, Any]) -> None:
    ended(platform, "beat", 1)
    platform.cli("schedule", "pause", "ticker.beat")
    paused_at = time.time()
    assert platform.cli_json("schedule", "ls", "ticker.beat")[0]["paused"] is True
    # Three ticks go by. A tick whose fire got past the API's check before the pause was stored may
    # land meanwhile (late under load), but never one after it: read once, against the pause.
    time.sleep(3.5)
    before = {r["tick"] for r in runs(platform, "beat")}
    assert max(before) < paused_at, (sorted(before), paused_at)

    resuming_at = time.time()  # the resume is stored after this, and only ticks after it may run
    platform.cli("schedule", "resume", "ticker.beat")
    after = platform.wait_for(
        lambda: {r["tick"] for r in runs(platform, "beat")} - before,
        timeout=10,
        what="a tick after the resume",
    )
    assert all(t > resuming_at for t in after), (after, resuming_at)  # none missed while paused ran


def test_pausing_needs_deploy_and_names_a_real_schedule(platform: Platform, ticker: dict[str, Any]) -> None:
    reader = platform.cli_json("tokens", "create", "--role", "read", "--name", "sched-reader")["token"]
    r = platform.http(
        "POST", "/v1/apps/ticker/schedules/beat:pause", headers={"authorization": f"Bearer {reader}"}
    )
    assert r.status_code == 403, r.text
    r = platform.http("POST", "/v1/apps/ticker/schedules/nope:pause")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_schedule"
    assert "beat, broken, yearly_caught_up" in r.json()["error"]["message"]
    out = platform.cli("schedule", "pause", "ticker", check=False)
    assert out.returncode != 0 and "APP.NAME" in out.stdout + out.stderr
    # a tick is the leader's to fire, and only a real one
    r = platform.http("POST", "/v1/apps/ticker/schedules/beat/ticks", json={"tick": int(time.time()) + 3600})
    assert r.status_code == 409 and r.json()["error"]["code"] == "tick_ahead"


def test_schedules_follow_the_current_release(
    platform: Platform, ticker: dict[str, Any], tmp_path: Path
) -> None:
    """A deploy that drops a schedule stops it, a rollback brings it back; a yearly tick missed
    meanwhile (its last run set back a year) runs once with catch_up, and is skipped without."""
    ended(platform, "beat", 1)
    for name in ("yearly_caught_up", "yearly_skipped"):  # as if they last ran on 2025-01-01
        r = platform.http("POST", f"/v1/apps/ticker/schedules/{name}/ticks", json={"tick": JAN_2025})
        assert r.status_code == 200, r.text
    changed = copy_app(TICKER, tmp_path / "ticker")
    source = (changed / "app.py").read_text()
    (changed / "app.py").write_text(source.split("# Yearly")[0].replace(BEAT, ""))
    platform.deploy(changed)
    dropped_at = time.time()
    assert {s["name"] for s in platform.cli_json("schedule", "ls", "ticker")} == {"broken"}
    time.sleep(2.5)
    assert max(r["tick"] for r in runs(platform, "beat")) <= dropped_at + 1  # stopped with its release

    platform.cli("rollback", "ticker")
    back_at = time.time()
    assert {s["name"] for s in platform.cli_json("schedule", "ls", "ticker")} == {
        "beat",
        "broken",
        "yearly_caught_up",
        "yearly_skipped",
    }
    platform.wait_for(
        lambda: any(r["tick"] >= back_at and r["state"] == "succeeded" for r in runs(platform, "beat")),
        timeout=20,
        what="beat to run again after the rollback",
    )
    caught = platform.wait_for(
        lambda: [r for r in runs(platform, "yearly_caught_up") if r["state"] == "succeeded"],
        timeout=10,
        what="the missed yearly tick to run",
    )
    assert [r["tick"] for r in caught] == [JAN_2026, JAN_2025]  # the latest missed one, once
    assert [r["tick"] for r in runs(platform, "yearly_skipped")] == [JAN_2025]


def test_a_bad_cron_expression_is_a_deploy_error(platform: Platform, tmp_path: Path) -> None:
    app = tmp_path / "badcron"
    app.mkdir()
    (app / "app.py").write_text(
        "import osless\napp = osless.App('badcron')\n\n"
        "@app.schedule('61 * * * *')\ndef report(ctx):\n    return 1\n"
    )
    out = platform.cli("deploy", str(app), check=False)
    assert out.returncode != 0
    said = out.stdout + out.stderr
    assert "'61 * * * *' is not a cron expression" in said and said.count("not a cron expression") == 1, said


def test_schedules_are_checked_and_ticked_in_their_time_zone() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        schedules.check("report", {"cron": "0 9 * * *", "tz": "Mars/Olympus"})
    with pytest.raises(ValueError, match="not a cron expression"):
        schedules.check("report", {"cron": "* * *", "tz": "UTC"})
    schedules.check("report", {"cron": "0 9 * * *", "tz": "Europe/Paris"})
    # 09:00 in Paris is 08:00 UTC in winter, 07:00 in summer
    jan, jul = 1_767_225_600, 1_782_864_000  # 2026-01-01 and 2026-07-01, 00:00 UTC
    spec = {"cron": "0 9 * * *", "tz": "Europe/Paris"}
    assert schedules.next_tick(spec, jan) == jan + 8 * 3600
    assert schedules.next_tick(spec, jul) == jul + 7 * 3600
    assert schedules.last_tick(spec, jan + 8 * 3600) == jan + 8 * 3600
    every = {"every_s": 300}
    assert schedules.last_tick(every, jan + 299) == jan and schedules.next_tick(every, jan) == jan + 300


def test_the_sdk_catches_a_misused_schedule() -> None:
    app = osless.App("sdk")
    with pytest.raises(osless.UsageError, match="needs its schedule"):

        @app.schedule  # type: ignore[arg-type]
        def a(ctx: Any) -> None: ...

    with pytest.raises(osless.UsageError, match="exactly one"):
        app.schedule("* * * * *", every=timedelta(minutes=1))
    with pytest.raises(osless.UsageError, match="whole seconds"):
        app.schedule(every=timedelta(milliseconds=500))
    with pytest.raises(osless.UsageError, match="time zone"):
        app.schedule("* * * * *", tz="../../etc/passwd")

    @app.schedule(every=timedelta(minutes=5), catch_up=True)
    def report(ctx: Any) -> str:
        return "ran"

    manifest = app.manifest()
    assert manifest["schedules"] == {"report": {"every_s": 300, "tz": "UTC", "catch_up": True}}
    assert "report" in manifest["functions"]
    assert app.functions["report"].handler({"tick": 1}, None) == "ran"
    assert "schedules" not in osless.App("plain").manifest()  # older manifests keep their digest
