"""Federated learning on Flower: this device as a SuperNode of the fleet's federation.

With a ``federated:`` section (:mod:`lorad.daemon.federated.config`) the daemon runs a
``flower-supernode`` child (:mod:`lorad.daemon.federated.supernode`) that connects to the
fleet's SuperLink. A round reaches the daemon's own HTTP API from the ClientApp
(:mod:`lorad.daemon.federated.client_app`, run by the SuperNode) and runs as a local DP
run (:mod:`lorad.daemon.federated.round_api`); only the LoRA update leaves the device.
Flower (``lorad[federated]``) is imported by the modules that need it, never here: the
config section loads without it.
"""
