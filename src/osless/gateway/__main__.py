"""`python -m osless.gateway`: one gateway process, as `osless up` starts them (see `gateway.process`)."""

from __future__ import annotations

from osless.gateway.process import main

main()
