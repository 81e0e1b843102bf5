"""Federated learning on Flower: a real SuperLink (:mod:`tests.federated.flower`) and real daemons."""
