"""A Flask (WSGI) app that reports what it is given: the request as it sees it, and each path it saw."""

import os

import osless

app = osless.App("inspector")


@app.function()
def log(event, ctx):
    ctx.log.info("ctx.log says %s (request %s)", event, ctx.request_id)
    ctx.log.debug("below the level osless shows")
    return ctx.request_id


@app.web()
def web():
    from flask import Flask, jsonify, request, url_for

    flask_app = Flask(__name__)
    seen = []

    @flask_app.before_request
    def remember():
        seen.append(request.environ.get("RAW_URI") or request.full_path)

    @flask_app.get("/where")
    def where():
        env = request.environ
        return jsonify(
            url_for=url_for("where"),
            external=url_for("where", _external=True),
            script_name=env["SCRIPT_NAME"],
            path_info=env["PATH_INFO"],
            remote_addr=request.remote_addr,
            scheme=env["wsgi.url_scheme"],
            headers={k.lower(): v for k, v in request.headers.items() if "forwarded" in k.lower()},
            environ={k: v for k, v in env.items() if "FORWARDED" in k},
        )

    @flask_app.get("/seen")
    def paths():
        return jsonify(pid=os.getpid(), paths=seen)

    @flask_app.post("/echo")
    def echo():
        return request.get_data()

    return flask_app
