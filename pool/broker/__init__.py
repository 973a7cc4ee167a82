"""The broker (DESIGN §4): one ROUTER socket between clients and workers. ``server`` is the socket
loop, ``scheduling`` the policy that picks a worker, ``metrics`` the Prometheus view of its state."""
