"""A Django site (no database, no setting about the prefix), served over ASGI under /django-site/."""

import os

import osless

app = osless.App("django-site")


@app.web()
def web():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djsite.settings")
    from django.core.asgi import get_asgi_application

    return get_asgi_application()
