"""Everything that talks to the Kubernetes API on the client side, one module per job:

* ``api``: one API client factory and one error mapper (a refusal names the RBAC rule to grant);
* ``address``: ``k8s://NAMESPACE/RELEASE`` addresses;
* ``portforward``: the port-forward to a broker Pod;
* ``deployment``: a worker Deployment's replica count;
* ``runner_pods``: ephemeral mode's runner Pods (create, watch until running, read a failure,
  delete, list for ``runnable-k8s gc``) and ``attach``: their stdin/stdout through the attach API;
* ``core``, ``secrets``, ``cleanup``, ``cluster``: the command line's verbs (``keys --k8s-secret``,
  ``gc``) and what the bench records about a cluster.

What to do with those objects (a Pod's manifest, when to delete it, which leftovers gc takes) is
decided outside this package (``pool.ephemeral``, ``pool.scaling``, ``pool.cli``).

The kubernetes client is imported only by the modules that need it, so ``import pool`` and the
warm path never pay for it.
"""
