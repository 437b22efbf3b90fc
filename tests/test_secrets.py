"""The secret key: DATA_DIR/secret.key, --secret-key-file or $OSLESS_SECRET_KEY; secrets across restarts."""

from __future__ import annotations

import hashlib
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from osless.api.secrets import SecretBox
from tests.platform import Platform, running

APPS = Path(__file__).parent / "apps"
SECRET = "correct horse battery staple"
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()


def restarted(before: Platform, *args: str, **env: str) -> Platform:
    """The same data dir and ports, with these `osless up` options and environment."""
    return Platform(
        before.data_dir, api_port=before.api_port, http_port=before.http_port, args=list(args), up_env=env
    )


def check_secret_and_key(platform: Platform, key: bytes) -> None:
    """The app reads the secret set before the restart, and its token is the one `key` makes."""
    # Until its instance is back, the record says "ready" as it did before the restart.
    platform.wait_for(
        lambda: [running(i["status"]["pid"]) for i in platform.instances("configured")] == [True],
        what="the instance to be back",
    )
    assert platform.invoke("configured", "password_digest") == (200, DIGEST)
    assert platform.invoke("configured", "token")[1] == SecretBox(key).app_token("configured")


def test_the_key_from_each_source_and_secrets_after_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key_file = data / "secret.key"
    first = Platform(data).start()
    try:
        first.deploy_warm(APPS / "configured")
        first.cli("config", "set", "configured", "db_password=-", input=SECRET + "\n")
        # made on first start, in the data dir, readable by its owner alone
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_bytes().strip()
        check_secret_and_key(first, key)
    finally:
        first.stop()
    assert SECRET.encode() not in (data / "state.db").read_bytes()

    # DATA_DIR/secret.key again, as kept
    p = restarted(first).start()
    try:
        check_secret_and_key(p, key)
    finally:
        p.stop()
    assert key_file.read_bytes().strip() == key

    # --secret-key-file: the key kept apart from the data; none is made in the data dir then
    elsewhere = tmp_path / "keys" / "osless.key"
    elsewhere.parent.mkdir()
    shutil.move(key_file, elsewhere)
    p = restarted(first, "--secret-key-file", str(elsewhere)).start()
    try:
        check_secret_and_key(p, key)
    finally:
        p.stop()
    assert not key_file.exists()

    # $OSLESS_SECRET_KEY comes before either file
    other = tmp_path / "keys" / "other.key"
    other.write_bytes(Fernet.generate_key())
    p = restarted(first, "--secret-key-file", str(other), OSLESS_SECRET_KEY=key.decode()).start()
    try:
        check_secret_and_key(p, key)
    finally:
        p.stop()
    assert not key_file.exists()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--secret-key-file", "/nonexistent/osless.key"],
            {},
            "the secret key file /nonexistent/osless.key does not exist",
        ),
        ([], {"OSLESS_SECRET_KEY": "not-a-key"}, "the secret key in $OSLESS_SECRET_KEY is not a Fernet key"),
    ],
    ids=["missing-file", "bad-env"],
)
def test_a_key_that_is_not_there_or_not_a_key_stops_up_with_a_clear_message(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    p = Platform(tmp_path / "data", args=args, up_env=env)
    with pytest.raises(RuntimeError, match="osless up exited with 1"):
        p.start()
    assert message in p.output()
