"""Ephemeral mode (docs/design.md#what-runs-where): a fresh worker per call, spoken to over its
stdin/stdout. ``session`` runs one call over any channel; ``local_launcher`` starts a subprocess,
``k8s_launcher`` a runner Pod (its manifest: ``podspec``)."""
