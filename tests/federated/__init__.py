"""Federated learning on Flower: a real SuperLink (:mod:`benchmarks.flower`) and real daemons."""
