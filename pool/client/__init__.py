"""The client side of a call: ``RunnableK8s`` (``runnable``), the checks of what it is told
(``settings``), where its calls run and the protocol every backend follows (``modes``), what
crosses the wire for a call (``calls``), the one shared connection to a broker (``connection``, a
shell around the socket-free rules of ``core``; callers wait for its replies in ``sinks``), the
warm backend on top of it (``warm_backend``) and the replay of a worker's callbacks
(``callback_relay``). The ephemeral backend lives in ``pool.ephemeral``."""
