"""The broker (docs/design.md#the-warm-path): one ROUTER socket between clients and workers.

``core`` holds every rule without sockets or clocks (``events`` in: the broker's inputs; messages
out, over ``state``), split by family into ``admission``, ``client_rules``, ``budgets``,
``worker_rules``, ``reply_rules``, ``liveness``, ``departures``, ``slots`` and ``reports``;
``server`` is the socket loop around it; ``scheduling`` the policy that picks a worker;
``metrics`` the Prometheus view."""
