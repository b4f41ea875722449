"""Prefect flows over the ``pipeline`` library and the ``workers`` processes.

Importing this package sets Prefect defaults that this kind of machine needs, unless the
environment already sets them: a longer start-up timeout for the ephemeral API server
(it takes 15-60 s to start here, the default timeout is 20 s) and no telemetry.
"""

import os

import pipeline  # noqa: F401  (first: it sets the OpenMP wait policy before pyFAI and torch load)

for _name, _value in {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_name, _value)
