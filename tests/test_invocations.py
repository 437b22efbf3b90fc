"""Async invocations (api/invocations.py): accepted durably into JetStream, run at least once by the
servers' dispatcher, retried, dead-lettered, deduplicated by an idempotency key."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import nats
import pytest
from botocore.config import Config

from tests.platform import Platform, running

JOBS = Path(__file__).parent / "apps" / "jobs"
FINAL = ("succeeded", "dead")


@pytest.fixture(scope="module")
def jobs(platform: Platform) -> dict[str, Any]:
    return platform.deploy_warm(JOBS)


def post_async(p: Platform, fn: str, event: Any, key: str | None = None, **kw: Any) -> Any:
    headers = {"x-osless-invocation-type": "Event", **({"idempotency-key": key} if key else {})}
    return p.http("POST", f"/v1/apps/jobs/functions/{fn}:invoke", json=event, headers=headers, **kw)


def final(p: Platform, invocation_id: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        r = p.http("GET", f"/v1/invocations/{invocation_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body if body["state"] in FINAL else None

    found: dict[str, Any] = p.wait_for(done, timeout=timeout, what=f"{invocation_id} to end")
    return found


def test_an_async_invoke_is_accepted_with_an_id_and_succeeds_with_its_result(
    platform: Platform, jobs: dict[str, Any]
) -> None:
    r = post_async(platform, "echo", {"n": 1})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["state"] == "queued" and accepted["app"] == "jobs" and accepted["function"] == "echo"
    done = final(platform, accepted["id"])
    assert done["state"] == "succeeded" and done["result"] == {"echo": {"n": 1}} and done["attempts"] == 1

    out = platform.cli_json("invoke", "jobs.echo", '{"n": 2}', "--async")
    assert out["state"] == "queued"
    assert final(platform, out["id"])["result"] == {"echo": {"n": 2}}
    listed = platform.cli_json("invocations", "jobs", "--state", "succeeded")
    assert {accepted["id"], out["id"]} <= {i["id"] for i in listed}
    # A state none is in (this test runs first in the file) lists nothing, at once.
    started = time.monotonic()
    assert platform.cli_json("invocations", "jobs", "--state", "dead") == []
    assert time.monotonic() - started < 5
    assert platform.cli_json("invocation", out["id"])["state"] == "succeeded"


def test_a_failing_invocation_is_retried_until_it_succeeds(platform: Platform, jobs: dict[str, Any]) -> None:
    r = post_async(platform, "flaky", {"key": uuid.uuid4().hex})
    assert r.status_code == 202, r.text
    done = final(platform, r.json()["id"])
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 3 and done["result"] == {"runs": 3}


def test_one_that_always_fails_is_dead_after_its_tries_and_in_the_dead_letter_queue(
    platform: Platform, jobs: dict[str, Any]
) -> None:
    r = post_async(platform, "broken", {"poison": True})
    invocation_id = r.json()["id"]
    done = final(platform, invocation_id)
    assert done["state"] == "dead" and done["attempts"] == 2  # 1 + retries=1
    assert done["error"]["type"] == "ValueError" and "always broken" in done["error"]["message"]
    assert "raise ValueError" in done["error"]["traceback"]

    async def dead_letter() -> dict[str, Any]:
        nc = await nats.connect(nats_url(platform))
        try:
            msg = await nc.jetstream().get_last_msg("DLQ", "osless.dlq.jobs.broken")
            letter: dict[str, Any] = json.loads(msg.data or b"null")
            return letter
        finally:
            await nc.close()

    letter = asyncio.run(dead_letter())
    assert letter["id"] == invocation_id and json.loads(letter["event"]) == {"poison": True}
    assert letter["attempts"] == 2 and "always broken" in letter["error"]["message"]


def nats_url(p: Platform) -> str:
    """The platform's own engine, as only the API's process reaches it: with the token in its data dir."""
    token = (p.data_dir / "nats" / "token").read_text().strip()
    conf = (p.data_dir / "nats" / "nats.conf").read_text()
    port = conf.split('listen: "127.0.0.1:', 1)[1].split('"', 1)[0]
    return f"nats://{token}@127.0.0.1:{port}"


def test_a_listing_holds_the_newest_ones_without_their_results(
    platform: Platform, jobs: dict[str, Any]
) -> None:
    """The API keeps only the newest `limit` as it reads a day of states, and no result (up to
    256 KiB each): what a listing holds is bounded by its limit."""
    ids = [post_async(platform, "echo", {"n": n, "pad": "x" * 10_000}).json()["id"] for n in range(5)]
    for invocation_id in ids:
        assert final(platform, invocation_id)["result"]["echo"]["n"] >= 0
    r = platform.http("GET", "/v1/apps/jobs/invocations", params={"limit": 3, "state": "succeeded"})
    listed = r.json()["items"]
    assert [i["id"] for i in listed] == ids[::-1][:3]
    assert all("result" not in i and i["state"] == "succeeded" for i in listed), listed


def test_an_idempotency_key_accepts_the_invocation_once(platform: Platform, jobs: dict[str, Any]) -> None:
    key = uuid.uuid4().hex
    first = post_async(platform, "count", {"key": key}, key=key)
    second = post_async(platform, "count", {"key": key}, key=key)
    assert first.status_code == 202 and second.status_code == 200, (first.text, second.text)
    assert first.json()["id"] == second.json()["id"]
    assert final(platform, first.json()["id"])["result"] == {"runs": 1}
    # Through the CLI too: the same id, and still one run.
    out = platform.cli_json(
        "invoke", "jobs.count", json.dumps({"key": key}), "--async", "--idempotency-key", key
    )
    assert out["id"] == first.json()["id"]
    other = final(platform, post_async(platform, "count", {"key": key}).json()["id"])
    assert other["result"] == {"runs": 2}  # without the key: a new invocation, the function's second run


def test_async_invokes_are_checked_as_sync_ones(platform: Platform, jobs: dict[str, Any]) -> None:
    assert post_async(platform, "nope", {}).json()["error"]["code"] == "unknown_function"
    token = platform.cli_json("tokens", "create", "--role", "read", "--name", "async-reader")["token"]
    r = platform.http(
        "POST",
        "/v1/apps/jobs/functions/echo:invoke",
        json={},
        headers={"x-osless-invocation-type": "Event", "authorization": f"Bearer {token}"},
    )
    assert r.status_code == 403, r.text
    accepted = post_async(platform, "echo", {}).json()
    r = platform.http(
        "GET", f"/v1/invocations/{accepted['id']}", headers={"authorization": f"Bearer {token}"}
    )
    assert r.status_code == 403, r.text
    for bad in ("jobs.*-" + "0" * 24, "jobs.>-" + "0" * 24, "Jobs-" + "0" * 24):  # never a key
        r = platform.http("GET", f"/v1/invocations/{bad}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_invocation", r.text
    big = post_async(platform, "echo", {"x": "a" * 300_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "event_too_large"


def test_lambda_event_invocations_are_accepted_with_202(platform: Platform, jobs: dict[str, Any]) -> None:
    client = boto3.client(
        "lambda",
        endpoint_url=platform.api,
        region_name="us-east-1",
        aws_access_key_id="osless",
        aws_secret_access_key="osless",
        aws_session_token=platform.token,
        config=Config(retries={"max_attempts": 1}),
    )
    answer = client.invoke(FunctionName="jobs.echo", InvocationType="Event", Payload=b'{"via": "boto3"}')
    assert answer["StatusCode"] == 202
    invocation_id = answer["ResponseMetadata"]["HTTPHeaders"]["x-osless-invocation-id"]
    assert final(platform, invocation_id)["result"] == {"echo": {"via": "boto3"}}


def test_no_accepted_invocation_is_lost_when_the_platform_is_killed(tmp_path: Path) -> None:
    """kill -9 of `osless up` (its nats-server, API and node with it) amid a stream of async
    invocations: after a restart every accepted one reaches exactly one final state."""
    first = Platform(tmp_path / "data").start()
    accepted: list[str] = []
    try:
        first.deploy_warm(JOBS)
        for i in range(30):  # 2 s each, at most 16 at once: the last still wait after the 30 posts
            r = post_async(first, "count", {"key": f"k{i}", "sleep": 2})
            assert r.status_code == 202, r.text
            accepted.append(r.json()["id"])
        states = [first.http("GET", f"/v1/invocations/{i}").json()["state"] for i in accepted]
        assert any(s not in FINAL for s in states), states  # the kill comes amid the stream
    finally:
        first.stop(signal.SIGKILL)
    second = Platform(tmp_path / "data", api_port=first.api_port, http_port=first.http_port).start()
    try:
        states = [final(second, i, timeout=90) for i in accepted]
        assert all(s["state"] == "succeeded" for s in states), [
            s for s in states if s["state"] != "succeeded"
        ]
        listed = second.http("GET", "/v1/apps/jobs/invocations", params={"limit": 1000}).json()["items"]
        assert sorted(i["id"] for i in listed if i["function"] == "count") == sorted(accepted)
    finally:
        second.stop()


def test_an_instance_killed_amid_a_stream_leaves_every_invocation_one_final_state(
    platform: Platform, jobs: dict[str, Any]
) -> None:
    """kill -9 of the instance running a stream of async invocations: those in it fail an attempt
    (502, its instance died) and run again on its replacement; every accepted one ends once."""
    tag = uuid.uuid4().hex[:8]
    accepted = []
    for i in range(12):
        r = post_async(platform, "count", {"key": f"{tag}-{i}", "sleep": 3})
        assert r.status_code == 202, r.text
        accepted.append(r.json()["id"])

    def running() -> list[str]:
        states = [platform.http("GET", f"/v1/invocations/{i}").json()["state"] for i in accepted]
        return [i for i, s in zip(accepted, states, strict=True) if s == "running"]

    hit = platform.wait_for(running, timeout=30, what="invocations running")
    victims = [i for i in platform.instances("jobs") if i["status"]["phase"] == "ready"]
    for instance in victims:
        os.kill(instance["status"]["pid"], signal.SIGKILL)
    ended = {i: final(platform, i, timeout=120) for i in accepted}
    assert all(e["state"] == "succeeded" for e in ended.values()), [
        e for e in ended.values() if e["state"] != "succeeded"
    ]
    assert any(ended[i]["attempts"] >= 2 for i in hit), [ended[i] for i in hit]  # the kill hit them
    time.sleep(1)  # nothing ends twice: the final states stay as they were
    again = [platform.http("GET", f"/v1/invocations/{i}").json() for i in accepted]
    assert [(a["state"], a["attempts"]) for a in again] == [
        (e["state"], e["attempts"]) for e in ended.values()
    ]
    listed = platform.http("GET", "/v1/apps/jobs/invocations", params={"limit": 1000}).json()["items"]
    assert sorted(i["id"] for i in listed if i["id"] in set(accepted)) == sorted(accepted)


def engine_pid(p: Platform) -> int | None:
    assert p.proc is not None
    for child in Path(f"/proc/{p.proc.pid}/task").glob("*/children"):
        for pid in child.read_text().split():
            with contextlib.suppress(FileNotFoundError):
                if b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes() and running(int(pid)):
                    return int(pid)
    return None


def test_the_message_engine_killed_is_started_again_and_keeps_what_it_stored(
    platform: Platform, jobs: dict[str, Any]
) -> None:
    stored = post_async(platform, "echo", {"before": True}).json()["id"]
    final(platform, stored)
    old = engine_pid(platform)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    platform.wait_for(lambda: engine_pid(platform) not in (None, old), timeout=10, what="a new nats-server")
    accepted = platform.wait_for(
        lambda: (r := post_async(platform, "echo", {"after": True})).status_code == 202 and r.json(),
        timeout=20,
        what="an async invoke accepted again",
    )
    assert final(platform, accepted["id"])["result"] == {"echo": {"after": True}}
    assert platform.http("GET", f"/v1/invocations/{stored}").json()["state"] == "succeeded"


def test_a_result_the_api_cannot_read_is_the_functions_failure_not_a_run_again(
    platform: Platform, jobs: dict[str, Any]
) -> None:
    """A function answering JSON the API refuses (an int past Python's digits limit, lifted in the
    app's own interpreter) fails its attempt: dead after its tries, not run again every ack wait."""
    key = uuid.uuid4().hex
    r = post_async(platform, "huge_int", {"key": key})
    assert r.status_code == 202, r.text
    done = final(platform, r.json()["id"], timeout=25)
    assert done["state"] == "dead" and done["attempts"] == 1, done
    assert done["error"]["code"] == "bad_result" and "result" not in done, done


def test_an_event_not_in_utf8_is_refused_with_400(platform: Platform, jobs: dict[str, Any]) -> None:
    """JSON in UTF-16 (which Python's json reads) is not what an event is: a clear 400, not a 500."""
    r = platform.http(
        "POST",
        "/v1/apps/jobs/functions/echo:invoke",
        content='{"n": 1}'.encode("utf-16"),
        headers={"x-osless-invocation-type": "Event", "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json", r.text


def test_what_json_escapes_sixfold_fits_in_the_engine(platform: Platform, jobs: dict[str, Any]) -> None:
    """DEL is 1 byte in JSON, 6 once escaped (json.dumps' backslash-u007f): an event of them within the limit
    is accepted (not a 503 as if the engine were down), and a result of them (an app writing its JSON
    unescaped) ends its invocation once, not over and over as its state could not be stored."""
    r = platform.http(
        "POST",
        "/v1/apps/jobs/functions/echo:invoke",
        content=b'"' + b"\x7f" * 200_000 + b'"',
        headers={"x-osless-invocation-type": "Event", "content-type": "application/json"},
    )
    assert r.status_code == 202, r.text
    assert final(platform, r.json()["id"])["state"] == "succeeded"
    r = post_async(platform, "wide", {"key": uuid.uuid4().hex})
    assert r.status_code == 202, r.text
    done = final(platform, r.json()["id"], timeout=25)
    assert done["state"] == "succeeded" and done["attempts"] == 1, done


def test_a_key_reused_past_the_duplicate_window_runs_again(platform: Platform, jobs: dict[str, Any]) -> None:
    """Past the stream's duplicate window a key is new again (docs/api.md), yet the first one's state
    may outlive the window (its 24 h TTL counts from its last write): the new invocation, accepted
    with 202, must run, not be taken for the first one ended. The window is shortened on the engine
    for the test, as 24 h would pass."""

    async def window(seconds: float) -> None:
        nc = await nats.connect(nats_url(platform))
        try:
            js = nc.jetstream()
            config = (await js.stream_info("INVOCATIONS")).config
            config.duplicate_window = seconds
            await js.update_stream(config)
        finally:
            await nc.close()

    key = uuid.uuid4().hex
    asyncio.run(window(1.0))
    try:
        first = post_async(platform, "count", {"key": key}, key=key)
        assert first.status_code == 202, first.text
        assert final(platform, first.json()["id"])["result"] == {"runs": 1}
        platform.wait_for(
            lambda: post_async(platform, "count", {"key": key}, key=key).status_code == 202,
            timeout=10,
            what="the key new again past the window",
        )
    finally:
        asyncio.run(window(24 * 3600.0))
    done = platform.wait_for(
        lambda: (s := final(platform, first.json()["id"]))["result"] != {"runs": 1} and s,
        timeout=20,
        what="the second invocation with the key to run",
    )
    assert done["state"] == "succeeded" and done["result"] == {"runs": 2}, done


def test_one_app_holding_the_dispatcher_does_not_starve_another_apps_invocations(
    platform: Platform, jobs: dict[str, Any], hello: dict[str, Any]
) -> None:
    """A hostile app's invocations that never end (here: 25 s each, more of them than a server runs
    at once) take at most its share of the dispatcher: another app's invocation still runs at once.
    Last in this file: it keeps jobs at its share for 25 s after it."""
    hostile = [post_async(platform, "count", {"key": uuid.uuid4().hex, "sleep": 25}) for _ in range(36)]
    assert all(r.status_code == 202 for r in hostile), [r.text for r in hostile]
    platform.wait_for(
        lambda: (
            len(
                platform.http("GET", "/v1/apps/jobs/invocations", params={"state": "running"}).json()["items"]
            )
            >= 8
        ),
        timeout=20,
        what="the hostile app's invocations running",
    )
    r = platform.http(
        "POST",
        "/v1/apps/hello/functions/greet:invoke",
        json={"name": "neighbour"},
        headers={"x-osless-invocation-type": "Event"},
    )
    assert r.status_code == 202, r.text
    done = final(platform, r.json()["id"], timeout=10)
    assert done["state"] == "succeeded" and done["result"]["message"] == "Hello, neighbour!", done


def test_a_new_app_of_a_deleted_ones_name_may_use_its_idempotency_keys(
    platform: Platform, jobs: dict[str, Any]
) -> None:
    # The engine's duplicate window (24 h) outlives the deleted app: its key, reused by the new app of
    # the name, must start a run there, not be taken for the old app's and never run.
    key = uuid.uuid4().hex
    headers = {"x-osless-invocation-type": "Event", "idempotency-key": key}
    for _ in range(2):
        platform.deploy(JOBS, "--name", "jobsagain")
        r = platform.http(
            "POST", "/v1/apps/jobsagain/functions/count:invoke", json={"key": key}, headers=headers
        )
        assert r.status_code == 202, r.text
        assert final(platform, r.json()["id"], timeout=30)["state"] == "succeeded"
        platform.cli("apps", "delete", "jobsagain", "--yes")


def test_an_invocation_running_as_its_app_is_deleted_leaves_nothing_to_a_new_app_of_the_name(
    platform: Platform, jobs: dict[str, Any]
) -> None:
    """The delete purges the app's invocations from the engine, but one running then ends after it:
    its state (24 h) and dead letter (14 days) would be the new app of the name's to list."""
    platform.deploy(JOBS, "--name", "jobsgone")
    headers = {"x-osless-invocation-type": "Event"}
    r = platform.http(
        "POST", "/v1/apps/jobsgone/functions/count:invoke", json={"key": "gone", "sleep": 3}, headers=headers
    )
    assert r.status_code == 202, r.text
    invocation_id = r.json()["id"]

    def state() -> str | None:
        got = platform.http("GET", f"/v1/invocations/{invocation_id}")
        return str(got.json()["state"]) if got.status_code == 200 else None

    platform.wait_for(lambda: state() == "running", timeout=30, what="the invocation to run")
    platform.cli("apps", "delete", "jobsgone", "--yes")
    time.sleep(6)  # past its 3 s of sleep, and an attempt's end however it ends
    platform.deploy(JOBS, "--name", "jobsgone")
    assert state() is None
    listed = platform.http("GET", "/v1/apps/jobsgone/invocations").json()["items"]
    assert [i["id"] for i in listed] == []

    async def dead_letters() -> int:
        nc = await nats.connect(nats_url(platform))
        try:
            info = await nc.jetstream().stream_info("DLQ", subjects_filter="osless.dlq.jobsgone.>")
            return len(info.state.subjects or {})
        finally:
            await nc.close()

    assert asyncio.run(dead_letters()) == 0
    platform.cli("apps", "delete", "jobsgone", "--yes")
