"""A Django project as its author wrote it: a model and the admin, its database on a volume, the
schema migrated by a release step, static files collected by a build step and served by WhiteNoise.
ASGI, or WSGI once `osless config set notes interface=wsgi` (a restart key)."""

import os

import osless

app = osless.App(
    "notes",
    volumes={"/data": osless.Volume("notes-db", size_mb=64)},
    build=["python manage.py collectstatic --noinput"],
    release=["python manage.py migrate --noinput"],
)
settings = app.config(interface=osless.Field(str, default="asgi", restart=True))


@app.web()
def web():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notesite.settings")
    if settings.interface == "wsgi":
        from django.core.wsgi import get_wsgi_application

        return get_wsgi_application()
    from django.core.asgi import get_asgi_application

    return get_asgi_application()
