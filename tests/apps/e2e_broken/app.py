import osless

import no_such_module_for_osless_tests  # noqa: F401  (the build must fail here)

app = osless.App("versioned")
