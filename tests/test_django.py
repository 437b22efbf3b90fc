"""A Django project deployed unchanged (issue 12's own test): its schema migrated by a release step,
its superuser made through `osless run`, its static files collected by a build step, and its admin
used under /{app}/ over ASGI and over WSGI, its database on a volume."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.platform import Platform

APPS = Path(__file__).parent / "apps"
PREFIX = "/notes"


def _csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


def _add_a_note_through_the_admin(gateway: str, text: str) -> None:
    """What a person does in a browser: sign in to the admin, add a note, see it listed."""
    with httpx.Client(base_url=gateway, timeout=30) as browser:
        login = f"{PREFIX}/admin/login/?next={PREFIX}/admin/"
        page = browser.get(login)
        assert page.status_code == 200, page.text[:500]
        r = browser.post(
            login,
            data={
                "csrfmiddlewaretoken": _csrf(page),
                "username": "admin",
                "password": "s3cret-pw",
                "next": f"{PREFIX}/admin/",
            },
        )
        assert r.status_code == 302 and r.headers["location"] == f"{PREFIX}/admin/", r.text[:500]
        add = f"{PREFIX}/admin/notes/note/add/"
        page = browser.get(add)
        assert page.status_code == 200, page.text[:500]
        r = browser.post(add, data={"csrfmiddlewaretoken": _csrf(page), "text": text, "_save": "Save"})
        assert r.status_code == 302 and r.headers["location"] == f"{PREFIX}/admin/notes/note/", r.text[:500]
        listed = browser.get(r.headers["location"])
        assert listed.status_code == 200 and text in listed.text


def test_a_django_project_runs_unchanged(platform: Platform) -> None:
    deployed = platform.deploy(APPS / "django_notes")
    try:
        log = platform.http("GET", f"/v1/deploys/{deployed['id']}/log").text
        assert "==> Release step: python manage.py migrate --noinput" in log
        assert "Applying notes.0001_initial... OK" in log  # on the volume, before any traffic
        made = platform.cli(
            "run",
            "notes",
            "--",
            "sh",
            "-c",
            "DJANGO_SUPERUSER_PASSWORD=s3cret-pw python manage.py createsuperuser --noinput "
            "--username admin --email admin@example.com",
            input="",
        )
        assert "Superuser created successfully." in made.stdout
        # Collected into the image by the build step, served by WhiteNoise under the prefix.
        css = httpx.get(f"{platform.gateway}{PREFIX}/static/admin/css/base.css", timeout=30)
        assert css.status_code == 200 and "body" in css.text

        _add_a_note_through_the_admin(platform.gateway, "first, over ASGI")
        platform.cli("config", "set", "notes", "interface=wsgi")
        platform.wait_for(
            lambda: (
                httpx.get(f"{platform.gateway}{PREFIX}/over/", timeout=30).json()["over"] == "WSGIRequest"
            ),
            timeout=60,
            what="the WSGI app",
        )
        _add_a_note_through_the_admin(platform.gateway, "second, over WSGI")
        # Both notes are in the database on the volume, read by a one-off command as by the site.
        shown = platform.cli(
            "run",
            "notes",
            "--",
            "python",
            "manage.py",
            "shell",
            "-c",
            "from notes.models import Note; print(sorted(n.text for n in Note.objects.all()))",
            input="",
        )
        assert shown.stdout.strip().splitlines()[-1] == "['first, over ASGI', 'second, over WSGI']"
    finally:
        platform.http("DELETE", "/v1/apps/notes")
