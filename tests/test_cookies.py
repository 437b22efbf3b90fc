"""gateway.cookies: an answer's head loses any Set-Cookie of the dashboard's session, however the
instance cuts it, and everything else goes through byte for byte."""

from __future__ import annotations

import pytest

from osless.gateway.cookies import MAX_HEAD, HeadTooLarge, SessionFilter, without_session

PLAIN = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello"
PLANTED = (
    b"HTTP/1.1 200 OK\r\nset-cookie: osless_session=planted; Path=/\r\nSet-Cookie: theirs=1\r\n"
    b"SET-COOKIE:  osless_session =two\r\ncontent-length: 2\r\n\r\nok"
)
CLEAN = b"HTTP/1.1 200 OK\r\nSet-Cookie: theirs=1\r\ncontent-length: 2\r\n\r\nok"


def relayed(chunks: list[bytes]) -> bytes:
    """What the client gets, as `UpstreamConn` relays it: past the final head, bytes go as they come."""
    heads = SessionFilter()
    return b"".join(chunk if heads.done else heads.feed(chunk) for chunk in chunks)


def test_a_plain_answer_goes_through_as_it_is() -> None:
    heads = SessionFilter()
    assert heads.feed(PLAIN) is PLAIN and heads.done


def test_the_session_cookie_is_taken_out_of_an_answer_and_nothing_else() -> None:
    assert relayed([PLANTED]) == CLEAN


def test_a_head_cut_anywhere_is_held_until_whole() -> None:
    for cut in range(1, len(PLANTED)):
        assert relayed([PLANTED[:cut], PLANTED[cut:]]) == CLEAN, cut
    assert relayed([bytes([b]) for b in PLANTED]) == CLEAN


def test_a_body_or_another_cookie_naming_it_is_not_touched() -> None:
    body = b"HTTP/1.1 200 OK\r\ncontent-length: 18\r\n\r\nosless_session=abc"
    assert relayed([body]) == body
    other = b"HTTP/1.1 200 OK\r\nset-cookie: x=osless_session\r\ncontent-length: 0\r\n\r\n"
    assert relayed([other]) == other


def test_interim_answers_are_filtered_and_the_final_one_too() -> None:
    interim = b"HTTP/1.1 103 Early Hints\r\nset-cookie: osless_session=a\r\nlink: </a.css>\r\n\r\n"
    out = relayed([interim + PLANTED])
    assert out == b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n" + CLEAN


def test_a_tunnel_after_101_is_not_read_as_a_head() -> None:
    switch = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"
    heads = SessionFilter()
    assert (
        heads.feed(switch + b"\x81\x05osless_session\r\n\r\n") == switch + b"\x81\x05osless_session\r\n\r\n"
    )
    assert heads.done


def test_a_head_held_past_the_cap_is_refused() -> None:
    heads = SessionFilter()
    heads.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(HeadTooLarge):
        heads.feed(b"x-pad: " + b"a" * MAX_HEAD)


def test_a_request_loses_the_session_and_keeps_the_rest() -> None:
    assert without_session(b"a=1; osless_session=s; b=2") == b"a=1; b=2"
    assert without_session(b" osless_session=s ") == b""


def test_a_nameless_cookie_that_a_browser_sends_back_as_the_session_is_taken_out() -> None:
    # `=osless_session=x` has an empty name and the value `osless_session=x` (RFC 6265bis 5.6); a
    # browser sends a nameless cookie back as its value alone: `Cookie: osless_session=x`.
    for value in (b"=osless_session=planted", b" = osless_session =planted; Path=/", b"=\tosless_session=p"):
        head = (
            b"HTTP/1.1 200 OK\r\nSet-Cookie: "
            + value
            + b"\r\nSet-Cookie: theirs=1\r\ncontent-length: 2\r\n\r\nok"
        )
        assert relayed([head]) == CLEAN, value


def test_a_name_the_apis_parser_reads_as_the_session_is_taken_out() -> None:
    # Starlette decodes a Cookie header as latin-1 and strips each name with `str.strip`, which
    # takes a NBSP (0xa0) or NEL (0x85) too: `osless_session\xa0` is the session to the API.
    for name in (b"osless_session\xa0", b"\x85osless_session"):
        head = (
            b"HTTP/1.1 200 OK\r\nset-cookie: "
            + name
            + b"=planted\r\nSet-Cookie: theirs=1\r\ncontent-length: 2\r\n\r\nok"
        )
        assert relayed([head]) == CLEAN, name
    kept = (
        b"HTTP/1.1 200 OK\r\nset-cookie: ==osless_session=x\r\nset-cookie: osless_sessions=x\r\n"
        b"content-length: 0\r\n\r\n"
    )
    assert relayed([kept]) == kept
