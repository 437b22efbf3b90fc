"""A Flask (WSGI) app, unchanged, on osless: `osless deploy examples/flask`."""

import osless

app = osless.App("flask-demo")


@app.web()
def web():
    from flask import Flask, jsonify, request

    flask_app = Flask(__name__)

    @flask_app.get("/")
    def index():
        return "Hello from Flask on osless!\n"

    @flask_app.post("/echo")
    def echo():
        return jsonify(received=request.get_json(silent=True), path=request.path)

    return flask_app
