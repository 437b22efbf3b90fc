"""An app whose function name proves `six` was importable from the dependency layer."""

import six

import osless

app = osless.App("sixer")


@app.function(name="six_" + six.__version__.replace(".", "_"))
def version(event, ctx):
    return six.__version__
