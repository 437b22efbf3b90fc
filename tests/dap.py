"""A small Debug Adapter Protocol client for the tests: JSON messages after a Content-Length header,
over TCP, as VS Code's and PyCharm's "attach" speak to debugpy."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

Message = dict[str, Any]


class Dap:
    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.seq = 0
        self.held: list[Message] = []  # read while waiting for another message

    def close(self) -> None:
        self.sock.close()

    def send(self, command: str, **arguments: Any) -> int:
        self.seq += 1
        body = json.dumps({"seq": self.seq, "type": "request", "command": command, "arguments": arguments})
        self.sock.sendall(f"Content-Length: {len(body)}\r\n\r\n".encode() + body.encode())
        return self.seq

    def request(self, command: str, **arguments: Any) -> Message:
        """Send a request and wait for its (successful) response."""
        seq = self.send(command, **arguments)
        reply = self.response(seq)
        assert reply["success"], reply
        return reply

    def response(self, seq: int, timeout: float = 30.0) -> Message:
        return self.wait(lambda m: m.get("type") == "response" and m.get("request_seq") == seq, timeout)

    def event(self, name: str, timeout: float = 30.0) -> Message:
        return self.wait(lambda m: m.get("type") == "event" and m.get("event") == name, timeout)

    def wait(self, wanted: Callable[[Message], bool], timeout: float) -> Message:
        for m in self.held:
            if wanted(m):
                self.held.remove(m)
                return m
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self._read()
            if wanted(m):
                return m
            self.held.append(m)
        raise TimeoutError(f"no such message within {timeout}s; seen: {self.held[-5:]}")

    def _read(self) -> Message:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n") if b":" in line)
        length = int(fields[b"Content-Length"])
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        message: Message = json.loads(body)
        return message

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the debugger's end closed the connection")
        self.buf += chunk
