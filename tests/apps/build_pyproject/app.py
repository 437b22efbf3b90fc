"""Dependencies from pyproject.toml; the `osless` requirement is the platform's to provide."""

import six

import osless

app = osless.App("pyproj")


@app.web()
def web():
    async def asgi(scope, receive, send):
        raise NotImplementedError(six.__version__)

    return asgi
