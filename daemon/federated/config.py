"""The ``federated:`` section: how this device joins the fleet's Flower federation.

:class:`FederatedConfig` is what the file says: validated once by pydantic like every
lorad section, off by default. When ``enabled``, the SuperLink's address is required and
exactly one of ``root_certificates`` (TLS, the CA bundle that verifies the SuperLink) and
``insecure`` (plain HTTP, for tests and labs) must be given; files named must exist. The
daemon then runs a ``flower-supernode`` child connected to ``superlink``; each round is a
local DP run of ``adapter`` that spends at most ``round_epsilon`` of the adapter's own
budget (``trainer`` target_epsilon). An example::

    federated:
      enabled: true
      superlink: superlink.example.net:9092          # the SuperLink's Fleet API, HOST:PORT
      root_certificates: /etc/lorad/flower/ca.crt    # verifies the SuperLink's certificate
      auth_key: /etc/lorad/flower/supernode.key      # optional: SuperNode authentication
      adapter: fleet
      round_epsilon: 0.5
      min_examples: 50

The rules that involve other sections (the trainer must be on; a round cannot spend more
than the adapter's whole budget) are checked where the sections meet, in
:class:`lorad.daemon.config.Config`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import BeforeValidator, Field, WithJsonSchema, model_validator

from lorad.adapters.config_types import Allowed, ConfigModel, ConfigPath, FieldProblem, Name, got
from lorad.adapters.names import NAME_ALLOWED

__all__ = ["FederatedConfig", "SUPERLINK_ALLOWED", "parse_superlink"]

#: What ``federated.superlink`` may be, in words.
SUPERLINK_ALLOWED = ('"HOST:PORT" of the SuperLink\'s Fleet API without a URL prefix: a host name, an IPv4 address '
                     'or an IPv6 address in brackets, and a port from 1 to 65535 (e.g. "superlink.example.net:9092", '
                     '"10.0.0.5:9092", "[2001:db8::5]:9092")')

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_PORT = re.compile(r"^[0-9]{1,5}$")
# For the JSON Schema: the shape only (the label and port rules are checked in code).
_SUPERLINK_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$"


def parse_superlink(value: str) -> tuple[str, int]:
    """``"host:port"`` / ``"[v6]:port"`` → (host, port); ValueError ("got ...; expected ...") otherwise."""
    bad = ValueError(f"got {got(value)}; expected {SUPERLINK_ALLOWED}")
    host, sep, port = value.rpartition(":")
    if not sep or not _PORT.match(port) or not 1 <= int(port) <= 65535:
        raise bad
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise bad from None
        return host[1:-1], int(port)
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise bad  # also an IPv6 address without brackets, a scheme, a path, a space
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise bad from None
    return host, int(port)


def _superlink(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"got {got(value)}; expected {SUPERLINK_ALLOWED}")
    parse_superlink(value)
    return value


#: ``federated.superlink``: a validated "HOST:PORT".
SuperLinkAddress = Annotated[str, BeforeValidator(_superlink), Allowed(SUPERLINK_ALLOWED),
                             WithJsonSchema({"type": "string", "pattern": _SUPERLINK_PATTERN})]


class FederatedConfig(ConfigModel):
    """The whole ``federated:`` section: this device as a Flower SuperNode."""

    config_key = "federated"

    enabled: bool = Field(False, description="Join the fleet's federation: run a Flower SuperNode (needs "
                                             "trainer.enabled and lorad[federated]).")
    superlink: SuperLinkAddress | None = Field(
        None, description="HOST:PORT of the SuperLink's Fleet API (an IPv6 address in brackets); required when "
                          "enabled.")
    root_certificates: ConfigPath | None = Field(
        None, description="CA certificate(s) the SuperLink's TLS certificate must chain to (PEM); exactly one of "
                          "root_certificates and insecure when enabled.")
    insecure: bool = Field(False, description="Connect to the SuperLink over plain HTTP, unencrypted: for tests and "
                                              "labs only; exactly one of root_certificates and insecure when enabled.")
    auth_key: ConfigPath | None = Field(None, description="The SuperNode's authentication private key (PEM), for a "
                                                          "SuperLink that admits known SuperNodes only; null: none.")
    adapter: Name = Field(
        "fleet", description=f"The adapter this device trains in the federation's rounds ({NAME_ALLOWED}).")
    round_epsilon: float = Field(1.0, gt=0, description="Most of the adapter's own ε budget (its trainer "
                                                        "target_epsilon) one round may spend.")
    min_examples: int = Field(20, ge=1, description="Fewest local examples a round trains on, by the private "
                              "estimate of the count a run is planned from; a round refused on it is charged that "
                              "count query only, as a local run is.")
    supernode_port: int = Field(0, ge=0, le=65535, description="Loopback port of the SuperNode's local Runtime API; "
                                                               "0: a free port chosen at start.")
    max_round_s: float = Field(3600.0, gt=0, description="Longest one round's local training may take, seconds.")

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> FederatedConfig:
        if not self.enabled:
            return self
        if self.superlink is None:
            raise FieldProblem("superlink", f"got nothing; required when federated.enabled is true: {SUPERLINK_ALLOWED}")
        tls_or_not = ("give exactly one of federated.root_certificates (TLS: a CA bundle that verifies the "
                      "SuperLink) and federated.insecure: true (plain HTTP, tests and labs only)")
        if self.root_certificates is None and not self.insecure:
            raise FieldProblem("root_certificates", f"got nothing and federated.insecure is false; {tls_or_not}")
        if self.root_certificates is not None and self.insecure:
            raise FieldProblem("insecure", f"got true together with federated.root_certificates "
                                           f"{str(self.root_certificates)!r}; {tls_or_not}")
        for key, path in (("root_certificates", self.root_certificates), ("auth_key", self.auth_key)):
            if path is not None and not path.is_file():
                raise FieldProblem(key, f"got {str(path)!r}; expected an existing, readable file")
        return self
