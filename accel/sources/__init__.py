"""Cluster state sources behind one interface (base.py): the Kubernetes API (kube.py) and a folder
of manifests (manifests.py). Both turn objects into model records and hand them to a Sink."""
