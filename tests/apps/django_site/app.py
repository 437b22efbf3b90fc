"""A Django site (no database, no setting about the prefix), served over ASGI, or over WSGI once
`osless config set django-site interface=wsgi` (a restart key: the factory runs again). Its static
files are collected by its build step and served by WhiteNoise."""

import os

import osless

app = osless.App("django-site", build=["python -m django collectstatic --noinput --settings djsite.settings"])
settings = app.config(interface=osless.Field(str, default="asgi", restart=True))


@app.web()
def web():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djsite.settings")
    if settings.interface == "wsgi":
        from django.core.wsgi import get_wsgi_application

        return get_wsgi_application()
    from django.core.asgi import get_asgi_application

    return get_asgi_application()
