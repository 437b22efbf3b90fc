import no_such_module_for_osless_tests  # noqa: F401  (the build must fail here)

import osless

app = osless.App("versioned")
