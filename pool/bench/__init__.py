"""``runnable-k8s bench``: ``command`` (the CLI and the runs), ``workloads``, ``measure`` (timing
helpers and the bare pyzmq floor), ``floor`` (that floor's broker and worker programs), ``report``
(tables, JSON, plots)."""
