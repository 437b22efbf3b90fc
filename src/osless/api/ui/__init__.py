"""The dashboard (`/ui`), served by the API's own process: see docs/dashboard.md.

`gate.UiGate` is the API's outermost middleware (pages, and a session's calls of `/v1`),
`routes` the pages, `session` the cookie, CSRF and one-time codes, `series` the charts' last hour,
`links` the one `/v1` route that makes a sign-in link.
"""

from __future__ import annotations
