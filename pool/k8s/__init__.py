"""Everything that talks to the Kubernetes API on the client side: one API client factory and one
error mapper (``api``), ``k8s://`` addresses (``address``), the port-forward to a broker Pod
(``portforward``) and a worker Deployment's replica count (``deployment``).

The kubernetes client is imported only by the modules that need it, so ``import pool`` and the
warm path never pay for it.
"""
