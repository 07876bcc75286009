"""The Kubernetes runtime: pods are instances, the Service selector is the switch.

* :mod:`~castiron.drivers.kubernetes.manifests`: pure builders (values in, dicts out);
* :mod:`~castiron.drivers.kubernetes.client`: the only module that imports the client
  library, its errors wrapped at the boundary;
* :mod:`~castiron.drivers.kubernetes.driver`: the runtime driver (create, destroy, observe,
  inspect; never patch);
* :mod:`~castiron.drivers.kubernetes.traffic`: the traffic controller.

Importing this package imports nothing of the client library.
"""
