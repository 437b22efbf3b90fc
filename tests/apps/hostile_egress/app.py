"""An app that lists this node's own addresses as its egress, in every spelling, and tries each."""

import http.client
import socket

import osless

# What glibc reads as 127.0.0.1 (or another address of this node), as an app could list them.
LOOPBACK = [
    "127.0.0.1",
    "127.0.0.2",
    "127.255.255.254",
    "127.1",
    "127.0.1",
    "2130706433",
    "0x7f000001",
    "0x7f.1",
    "0177.0.0.1",
    "017700000001",
    "localhost",
    "LOCALHOST",
    "0.0.0.0",
    "0",
    "169.254.169.254",
]

app = osless.App("hostile-egress", egress=LOOPBACK)


def ask(head):
    """One request through the sandbox's proxy: (status, the first bytes of what came back)."""
    sock = socket.create_connection(("127.0.0.1", 3128), timeout=15)
    try:
        sock.sendall(head.encode())
        response = http.client.HTTPResponse(sock, method="CONNECT" if head.startswith("CONNECT") else "GET")
        response.begin()
        return response.status, response.read(300).decode("latin-1") if response.status != 200 else ""
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        sock.close()


@app.function(timeout_s=120)
def probe(event, ctx):
    out = {}
    for host in event["hosts"]:
        for port in event["ports"]:
            authority = f"{host}:{port}"
            out[f"GET {authority}"] = ask(
                f"GET http://{authority}/v1/status HTTP/1.1\r\nHost: {authority}\r\n\r\n"
            )
            out[f"CONNECT {authority}"] = ask(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n")
    return out
