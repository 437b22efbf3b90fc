"""An app whose local dependency's setup.py never returns: its build must still be stoppable."""

import osless

app = osless.App("hang")
