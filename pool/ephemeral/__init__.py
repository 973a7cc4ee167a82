"""Ephemeral mode (DESIGN §1): a fresh worker per call, spoken to over its stdin/stdout. ``session``
runs one call over any channel; ``local_launcher`` starts a subprocess, ``k8s_launcher`` a runner
Pod (its manifest: ``podspec``)."""
