"""Queues and consumers (api/queues.py, api/consumers.py, sdk/queues.py): sent durably, handed to the
consumer in batches through the gateway, retried, dead-lettered, redriven; who may send; a deleted
app's queued work gone."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.platform import Platform, copy_app
from tests.test_invocations import nats_url

MQ = Path(__file__).parent / "apps" / "mq"


@pytest.fixture(scope="module")
def mq(platform: Platform) -> dict[str, Any]:
    return platform.deploy_warm(MQ)


def send(p: Platform, bodies: list[Any], app: str = "mq", queue: str = "orders") -> list[str]:
    r = p.http("POST", f"/v1/queues/{app}/{queue}/messages", json={"messages": [{"body": b} for b in bodies]})
    assert r.status_code == 202, r.text
    ids: list[str] = r.json()["ids"]
    return ids


def seen(p: Platform, key: str, app: str = "mq") -> list[dict[str, Any]]:
    status, body = p.invoke(app, "seen", {"key": key})
    assert status == 200, body
    return list(body)


def wait_seen(p: Platform, key: str, n: int, app: str = "mq", timeout: float = 30) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        found = seen(p, key, app)
        return found if len(found) >= n else None

    got: list[dict[str, Any]] = p.wait_for(enough, timeout=timeout, what=f"{n} deliveries of {key}")
    return got


def test_sent_messages_reach_the_handler_in_batches_and_stats_show_the_queue(
    platform: Platform, mq: dict[str, Any]
) -> None:
    key = uuid.uuid4().hex
    ids = send(platform, [{"key": key, "n": i} for i in range(24)])
    ids.append(platform.cli_json("queue", "send", "mq.orders", json.dumps({"key": key, "n": 24}))["id"])
    assert len(ids) == 25 and len(set(ids)) == 25
    got = wait_seen(platform, key, 25)
    assert sorted(d["n"] for d in got) == list(range(25))  # each once
    assert {d["id"] for d in got} == set(ids)
    assert max(d["batch"] for d in got) > 1  # batches, not one call per message
    stats = platform.cli_json("queue", "stats", "mq.orders")
    assert stats["queue"] == "orders" and stats["batch_size"] == 10
    platform.wait_for(lambda: platform.cli_json("queue", "stats", "mq.orders")["depth"] == 0, what="drained")
    assert any(q["app"] == "mq" and q["queue"] == "orders" for q in platform.cli_json("queue", "ls"))


def test_a_message_failed_alone_is_redone_alone(platform: Platform, mq: dict[str, Any]) -> None:
    key = uuid.uuid4().hex
    send(platform, [{"key": key, "n": 0}, {"key": key, "n": 1, "fail": True}, {"key": key, "n": 2}])
    got = wait_seen(platform, key, 4)
    runs = [d["n"] for d in got]
    assert sorted(runs) == [0, 1, 1, 2], got  # the failed one again, the others once
    assert [d["attempt"] for d in got if d["n"] == 1] == [1, 2]


def test_a_batch_whose_instance_dies_is_delivered_again(platform: Platform, mq: dict[str, Any]) -> None:
    key = uuid.uuid4().hex
    (message_id,) = send(platform, [{"key": key, "crash": True}])
    got = wait_seen(platform, key, 2)
    assert [(d["id"], d["attempt"]) for d in got] == [(message_id, 1), (message_id, 2)]


def dead_letters(p: Platform, app: str = "mq", queue: str = "orders") -> list[dict[str, Any]]:
    letters: list[dict[str, Any]] = p.cli_json("dlq", "show", f"{app}.{queue}")
    return letters


def test_a_poison_message_lands_in_the_dlq_and_a_fixing_deploy_then_redrive_runs_it_once(
    platform: Platform, mq: dict[str, Any], tmp_path: Path
) -> None:
    key = uuid.uuid4().hex
    (message_id,) = send(platform, [{"key": key, "poison": True}])
    letter = platform.wait_for(
        lambda: next((d for d in dead_letters(platform) if d["id"] == message_id), None),
        what="the dead letter",
    )
    assert letter["attempts"] == 2 and letter["body"] == {"key": key, "poison": True}  # 1 + retries=1
    assert letter["error"]["type"] == "ValueError" and "poison message" in letter["error"]["message"]
    assert "raise ValueError" in letter["error"]["traceback"]
    assert len(seen(platform, key)) == 2
    assert platform.cli_json("queue", "stats", "mq.orders")["dlq_depth"] >= 1
    assert any(d["kind"] == "queue" and d["name"] == "orders" for d in platform.cli_json("dlq", "ls", "mq"))
    # A function's async invocation, dead too: the same commands, with --function.
    r = platform.http(
        "POST",
        "/v1/apps/mq/functions/broken:invoke",
        json={"key": key},
        headers={"x-osless-invocation-type": "Event"},
    )
    assert r.status_code == 202, r.text
    platform.wait_for(
        lambda: [
            d
            for d in platform.cli_json("dlq", "show", "mq.broken", "--function")
            if d["id"] == r.json()["id"]
        ],
        what="the invocation's dead letter",
    )

    fixed = copy_app(MQ, tmp_path / "mq")
    source = (fixed / "app.py").read_text()
    (fixed / "app.py").write_text(source.replace("FIXED = False", "FIXED = True"))
    platform.deploy(fixed)
    out = platform.cli_json("dlq", "redrive", "mq.orders")
    assert out["redriven"] >= 1
    got = wait_seen(platform, key, 3)
    assert len(got) == 3 and got[2]["attempt"] == 1  # a new message, run once by the fixed release
    assert platform.cli_json("dlq", "redrive", "mq.broken", "--function")["redriven"] >= 1
    assert {"fixed": True} in wait_seen(platform, key, 4)
    assert not platform.cli_json("dlq", "show", "mq.broken", "--function")
    assert not [d for d in dead_letters(platform) if d.get("body", {}).get("key") == key]
    platform.deploy(MQ)  # as the module's other tests expect it


def test_an_app_sends_to_its_own_queue_and_to_another_only_when_granted(
    platform: Platform, mq: dict[str, Any]
) -> None:
    key = uuid.uuid4().hex
    status, out = platform.invoke("mq", "send", {"queue": "orders", "bodies": [{"key": key, "n": 7}]})
    assert status == 200 and len(out["ids"]) == 1, out
    assert wait_seen(platform, key, 1)[0]["n"] == 7

    platform.deploy_warm(MQ, "--name", "mqsend")
    status, out = platform.invoke("mqsend", "send", {"queue": "mq.orders", "bodies": [{"key": key, "n": 8}]})
    assert status == 200 and out["status"] == 403 and out["code"] == "not_allowed", out
    assert "osless queue allow mq.orders --app mqsend" in out["message"]
    platform.cli("queue", "allow", "mq.orders", "--app", "mqsend")
    status, out = platform.invoke("mqsend", "send", {"queue": "mq.orders", "bodies": [{"key": key, "n": 9}]})
    assert status == 200 and len(out["ids"]) == 1, out
    assert [d["n"] for d in wait_seen(platform, key, 2)] == [7, 9]
    platform.cli("apps", "delete", "mqsend", "--yes")


def woken_by(p: Platform, app: str) -> str:
    """Why the app at zero wants an instance again: the first reason its status gives."""
    status: dict[str, Any] = p.wait_for(
        lambda: (s := p.http("GET", f"/v1/apps/{app}").json()["status"])["desired"] and s,
        what=f"{app} woken",
    )
    return str(status["scale_reason"])


def test_a_consumer_at_zero_is_woken_by_a_message(platform: Platform, mq: dict[str, Any]) -> None:
    platform.deploy(MQ, "--name", "mqzero")
    platform.cli("scale", "mqzero", "--min", "0", "--idle", "1")
    platform.wait_for(lambda: not platform.instances("mqzero"), what="scale to zero")
    key = uuid.uuid4().hex
    send(platform, [{"key": key, "n": 1}], app="mqzero")
    # Woken as the message is accepted (api/wakes.py), not once its delivery found no instance
    # (the gateway's activator: "a request arrived while at zero"): the instance starts sooner.
    assert woken_by(platform, "mqzero") == "a message arrived while at zero"
    assert wait_seen(platform, key, 1, app="mqzero")[0]["n"] == 1
    platform.cli("apps", "delete", "mqzero", "--yes")


def engine_counts(p: Platform, app: str) -> dict[str, int]:
    async def count() -> dict[str, int]:
        nc = await nats.connect(nats_url(p))
        try:
            js = nc.jetstream()
            out = {}
            for stream, subject in (
                ("QUEUES", f"osless.queue.{app}.>"),
                ("DLQ", f"osless.*.{app}.*"),
                ("INVOCATIONS", f"osless.invoke.{app}.>"),
            ):
                info = await js.stream_info(stream, subjects_filter=subject)
                out[stream] = sum((info.state.subjects or {}).values())
            out["consumers"] = len(
                [c for c in await js.consumers_info("QUEUES") if c.name.startswith(f"q_{app}_")]
            )
            return out
        finally:
            await nc.close()

    return asyncio.run(count())


def test_a_deleted_apps_queued_messages_dead_letters_and_invocations_are_gone(
    platform: Platform, mq: dict[str, Any]
) -> None:
    platform.deploy(MQ, "--name", "mqgone")
    key = uuid.uuid4().hex
    send(platform, [{"key": key, "poison": True}], app="mqgone")  # dead after its 2 tries
    platform.wait_for(lambda: dead_letters(platform, "mqgone"), what="a dead letter")
    # Held in flight (a message is in the engine until it is acked): the app is deleted meanwhile.
    send(platform, [{"key": key, "n": i, "hold": 8} for i in range(5)], app="mqgone")
    r = platform.http(
        "POST",
        "/v1/apps/mqgone/functions/hold:invoke",
        json={"s": 8},
        headers={"x-osless-invocation-type": "Event"},
    )
    assert r.status_code == 202, r.text
    stats = platform.cli_json("queue", "stats", "mqgone.orders")
    assert stats["depth"] == 5 and stats["dlq_depth"] == 1 and stats["oldest_age_s"] > 0, stats
    # The same depth in the API's /metrics, parsed with prometheus-client's own parser.
    scraped = {
        (sample.name, sample.labels.get("app"), sample.labels.get("queue")): sample.value
        for family in text_string_to_metric_families(platform.http("GET", "/metrics").text)
        for sample in family.samples
    }
    assert scraped[("osless_queue_messages", "mqgone", "orders")] == 5, scraped
    assert scraped[("osless_queue_dead_letters", "mqgone", "orders")] == 1, scraped
    peeked = platform.cli_json("queue", "peek", "mqgone.orders")
    assert sorted(m["body"]["n"] for m in peeked) == list(range(5))
    before = engine_counts(platform, "mqgone")
    assert (
        before["QUEUES"] >= 5
        and before["DLQ"] >= 1
        and before["INVOCATIONS"] >= 1
        and before["consumers"] == 1
    )
    platform.cli("apps", "delete", "mqgone", "--yes")
    assert engine_counts(platform, "mqgone") == {"QUEUES": 0, "DLQ": 0, "INVOCATIONS": 0, "consumers": 0}
    assert json.loads(platform.cli("queue", "ls", "--json").stdout) is not None


def test_a_backlog_scales_its_consumer_out_within_its_max(platform: Platform, mq: dict[str, Any]) -> None:
    platform.deploy(MQ, "--name", "mqscale")
    platform.cli("scale", "mqscale", "--min", "0", "--max", "3", "--target", "1")
    key = uuid.uuid4().hex
    # 10 a batch, 1 batch an instance: 60 messages want 6 instances, the app's max is 3.
    send(platform, [{"key": key, "n": i, "hold": 0.5} for i in range(60)], app="mqscale")

    def scaled() -> dict[str, Any] | None:
        status: dict[str, Any] = platform.http("GET", "/v1/apps/mqscale").json()["status"]
        return (
            status
            if status.get("desired") == 3 and "messages queued" in status.get("scale_reason", "")
            else None
        )

    platform.wait_for(scaled, what="3 instances for the backlog")
    assert len(wait_seen(platform, key, 60, app="mqscale", timeout=60)) == 60
    platform.cli("apps", "delete", "mqscale", "--yes")


def test_a_deploy_that_changes_a_consumer_leaves_its_batch_in_flight_to_the_old_release(
    platform: Platform, mq: dict[str, Any], tmp_path: Path
) -> None:
    # The consumer's settings change (here its visibility timeout) while a batch is in a handler:
    # the batch must not go at once to the new release, a second handler while the first still runs.
    changed = copy_app(MQ, tmp_path / "mq")
    source = (changed / "app.py").read_text()
    (changed / "app.py").write_text(source.replace("visibility_timeout_s=10", "visibility_timeout_s=9"))
    platform.deploy(MQ, "--name", "mqdeploy")
    key = uuid.uuid4().hex
    send(platform, [{"key": key, "hold": 3}], app="mqdeploy")
    (first,) = wait_seen(platform, key, 1, app="mqdeploy")
    platform.deploy(changed, "--name", "mqdeploy")
    platform.wait_for(
        lambda: platform.cli_json("queue", "stats", "mqdeploy.orders")["depth"] == 0, what="drained"
    )
    later = seen(platform, key, app="mqdeploy")[1:]
    assert all(d["at"] >= first["at"] + 3 for d in later), [d["at"] - first["at"] for d in later]
    platform.cli("apps", "delete", "mqdeploy", "--yes")


def test_one_apps_consumers_held_up_do_not_starve_another_apps_calls(
    platform: Platform, mq: dict[str, Any], tmp_path: Path
) -> None:
    hog = copy_app(MQ, tmp_path / "mq")
    source = (hog / "app.py").read_text()
    (hog / "app.py").write_text(
        source.replace(
            "batch_size=10, retries=1, visibility_timeout_s=10",
            "batch_size=1, max_concurrency=100, retries=1, visibility_timeout_s=60",
        )
    )
    platform.deploy(hog, "--name", "mqhog")
    try:
        key = uuid.uuid4().hex
        for _ in range(2):
            send(platform, [{"key": key, "hold": 60}] * 60, app="mqhog")
        platform.wait_for(
            lambda: platform.cli_json("queue", "stats", "mqhog.orders")["in_flight"] >= 100, what="held"
        )
        time.sleep(2)  # the batches reach the gateway
        started = time.monotonic()
        status, body = platform.invoke("mq", "whoami", {})
        assert status == 200 and body == "mq", body
        assert time.monotonic() - started < 5
    finally:
        platform.cli("apps", "delete", "mqhog", "--yes")
