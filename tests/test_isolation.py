"""App identities: each app runs as a host uid of its own, allocated by the API, never shared."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

from tests.platform import Platform

APPS = Path(__file__).parent / "apps"


def _old_hashed_uid(name: str) -> int:
    """How uids were made before they were allocated: a hash of the name, modulo 900,000."""
    return 100_000 + int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) % 900_000


def _colliding_names() -> tuple[str, str]:
    seen: dict[int, str] = {}
    for n in itertools.count():
        name = f"twin-{n}"
        uid = _old_hashed_uid(name)
        if uid in seen:
            return seen[uid], name
        seen[uid] = name
    raise AssertionError("unreachable")


def _owner(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def test_apps_whose_names_collided_get_uids_of_their_own(platform: Platform) -> None:
    """Finding 3: two names that hashed to one uid shared a host user, and so each other's sockets."""
    first, second = _colliding_names()
    uids = {}
    for name in (first, second):
        platform.deploy(APPS / "runtime_functions", "--name", name)
        uids[name] = platform.http("GET", f"/v1/apps/{name}").json()["uid"]
        assert platform.invoke(name, "ping") == (200, "pong")
    assert uids[first] != uids[second]
    for name in (first, second):
        [instance] = platform.wait_for(
            lambda n=name: [i for i in platform.instances(n) if i["status"]["phase"] == "ready"] or None,
            what=f"a ready instance of {name}",
        )
        assert instance["uid"] == uids[name] == instance["status"]["uid"]
        assert _owner(instance["status"]["pid"]) == uids[name]  # the process itself, on the host
        # The sockets are the node's: bound by root in a folder only root may enter.
        for path in (instance["status"]["socket"], instance["status"]["control"]):
            folder = os.stat(Path(path).parent)
            assert (os.stat(path).st_uid, folder.st_uid, folder.st_mode & 0o777) == (0, 0, 0o700)


def test_a_recreated_app_gets_a_new_uid(platform: Platform) -> None:
    platform.deploy(APPS / "runtime_functions", "--name", "reborn")
    before = platform.http("GET", "/v1/apps/reborn").json()["uid"]
    assert platform.http("DELETE", "/v1/apps/reborn").status_code == 204
    created = platform.http("POST", "/v1/apps", json={"name": "reborn"})
    assert created.status_code == 201
    assert created.json()["uid"] not in (None, before)


def test_the_api_sets_an_instances_uid_whatever_the_caller_says(platform: Platform) -> None:
    platform.deploy(APPS / "runtime_functions", "--name", "uid-claim")
    app = platform.http("GET", "/v1/apps/uid-claim").json()
    body = {
        "id": "uid-claim-forged",
        "app": "uid-claim",
        "release": app["current_release"],
        "image": app["current_image"],
        "node": "nowhere",
        "uid": 0,
    }
    r = platform.http("POST", "/v1/instances", json=body)
    assert r.status_code == 201 and r.json()["uid"] == app["uid"] != 0
    platform.http("DELETE", "/v1/instances/uid-claim-forged")  # the scheduler may have removed it already


def test_an_instance_runs_only_an_image_its_own_app_released(platform: Platform) -> None:
    """A controller token must not run one app's code as another app (its uid, secrets, volumes)."""
    platform.deploy(APPS / "runtime_functions", "--name", "img-owner")
    platform.deploy(APPS / "runtime_functions", "--name", "img-victim")
    owner = platform.http("GET", "/v1/apps/img-owner").json()
    victim = platform.http("GET", "/v1/apps/img-victim").json()
    for image, release in (
        (owner["current_image"], victim["current_release"]),
        (victim["current_image"], 99),
    ):
        if image == victim["current_image"] and release == victim["current_release"]:
            continue
        body = {
            "id": "img-victim-forged",
            "app": "img-victim",
            "release": release,
            "image": image,
            "node": "x",
        }
        r = platform.http("POST", "/v1/instances", json=body)
        assert r.status_code == 409 and r.json()["error"]["code"] == "image_not_released", r.text
