"""The broker (DESIGN §4): one ROUTER socket between clients and workers. ``core`` holds every rule
without sockets or clocks (``events`` in, messages out, over ``state``); ``server`` is the socket
loop around it; ``scheduling`` the policy that picks a worker; ``metrics`` the Prometheus view."""
