"""The client side of a call: ``RunnableK8s`` (``runnable``), where its calls run (``modes``), what
crosses the wire for a call (``calls``), the one shared connection to a broker (``connection``) and
the warm backend on top of it (``warm_backend``)."""
