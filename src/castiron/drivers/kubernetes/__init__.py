"""The Kubernetes runtime: one Deployment per release whose pods are its instances; a Service
selector (or a Gateway API HTTPRoute's weights) is the switch.

* :mod:`~castiron.drivers.kubernetes.manifests`: pure builders (values in, dicts out);
* :mod:`~castiron.drivers.kubernetes.api`: the small protocol the driver needs of an API server;
* :mod:`~castiron.drivers.kubernetes.client`: the only module that imports the client
  library, its errors wrapped at the boundary;
* :mod:`~castiron.drivers.kubernetes.fake`: an in-memory API server with a Deployment
  controller, for tests without a cluster;
* :mod:`~castiron.drivers.kubernetes.driver`: the runtime driver (create, destroy, observe,
  inspect; never patch);
* :mod:`~castiron.drivers.kubernetes.traffic`: the traffic controller.

Importing this package imports nothing of the client library.
"""
