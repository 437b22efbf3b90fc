"""The dashboard's session cookie (`api.ui.session.COOKIE`) never crosses the gateway, either way.

A browser sends a host's cookies to every port of it, and takes cookies from every port of it for
all of them: an app served on the API's host would otherwise read the session (and act as its
signer), or set one of its own choosing in the visitor's browser (the visitor then works in the
app's author's account: what they type there, a secret, is the author's to read). So requests lose
the cookie on the way in (`without_session`), and answers lose any `Set-Cookie` of it on the way
out (`SessionFilter`, on each answer's head before a byte of it is relayed).
"""

from __future__ import annotations

__all__ = ["MAX_HEAD", "SESSION_COOKIE", "SessionFilter", "without_session"]

SESSION_COOKIE = b"osless_session"
# An answer's head is held until whole while it might set the cookie; no longer than this.
MAX_HEAD = 64 * 1024
_SESSION = SESSION_COOKIE.decode()


def without_session(cookies: bytes) -> bytes:
    """A Cookie header's pairs but the dashboard's session."""
    pairs = (p for p in cookies.split(b";") if p.strip())
    return b"; ".join(p.strip() for p in pairs if p.partition(b"=")[0].strip() != SESSION_COOKIE)


class HeadTooLarge(Exception):
    """An answer's head past MAX_HEAD, while it had to be held."""


class SessionFilter:
    """The heads of one connection's answers (1xx first, if any), with any `Set-Cookie` of the
    session taken out. `feed` returns what may be relayed now: the common answer, whose head came
    whole and never names the cookie, goes through untouched, at the cost of two searches."""

    __slots__ = ("done", "held")

    def __init__(self) -> None:
        self.done = False  # the final head went by: the rest is body (or a tunnel)
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        """What of `data` may go to the client now (b"" while a head is incomplete)."""
        if not self.held:  # the common answer: its whole head in its first read, no cookie named
            end = data.find(b"\r\n\r\n")
            if end >= 0 and _final(data) and data.find(SESSION_COOKIE, 0, end) < 0:
                self.done = True
                return data
        else:
            data = self.held + data
            self.held = b""
        out = []
        start = 0
        while True:
            end = data.find(b"\r\n\r\n", start)
            if end < 0:
                rest = data[start:]
                if len(rest) > MAX_HEAD:
                    raise HeadTooLarge(f"an answer's head is over {MAX_HEAD} bytes")
                self.held = rest
                break
            head = data[start : end + 4]
            out.append(_filtered(head) if SESSION_COOKIE in head else head)
            start = end + 4
            if _final(head):
                self.done = True
                out.append(data[start:])
                break
        return out[0] if len(out) == 1 else b"".join(out)


def _final(head: bytes) -> bool:
    """The head (`HTTP/1.1 SSS ...`) is not a 1xx that another head follows (101's tunnel does not)."""
    return head[9:10] != b"1" or head[9:12] == b"101"


def _filtered(head: bytes) -> bytes:
    """`head` without its Set-Cookie lines of the session. The parser has checked it already: lines
    end in CRLF, and none is folded (httptools refuses both)."""
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.lower() != b"set-cookie" or not _sets_session(value):
            kept.append(line)
    return b"\r\n".join(kept) + b"\r\n\r\n"


def _sets_session(value: bytes) -> bool:
    """Whether a browser would send this `Set-Cookie` back as a cookie the API reads as its session.
    The API's parser (Starlette's) decodes latin-1 and strips with `str.strip`, so a name padded
    with a NBSP or NEL is its name too; and a nameless cookie (`=osless_session=x`: RFC 6265bis
    5.6, an empty name) is sent back as its value alone, `osless_session=x`."""
    pair = value.partition(b";")[0].decode("latin-1")
    name, eq, rest = pair.partition("=")
    name = name.strip()
    if not name and eq:
        name = rest.partition("=")[0].strip()
    return name == _SESSION
