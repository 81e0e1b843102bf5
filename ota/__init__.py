"""lorad.ota: signed adapter updates over MQTT, verified with TUF, installed atomically.

Fleet side: :class:`lorad.ota.repository.FleetRepository` (root of trust, signing, key rotation,
publishing), ``loractl fleet ...`` (:mod:`lorad.ota.cli`; what its commands share in
:mod:`lorad.ota.cli_support`), broker set-up (:mod:`lorad.ota.broker_setup`) and staged rollouts (the
pure state machine :mod:`lorad.ota.rollout`, driven by :mod:`lorad.ota.rollout_cli`). Device side:
:class:`lorad.ota.client.OtaClient` over an :class:`lorad.ota.transport.Transport` (MQTT:
:class:`lorad.ota.transport.MqttTransport`), installing through the adapter service
(:class:`lorad.ota.installer.AdapterSink`), reporting with :mod:`lorad.ota.status` and obeying
:mod:`lorad.ota.commands`, within its install window (:mod:`lorad.ota.window`) and privacy policy
(:mod:`lorad.ota.privacy`). Verification (:mod:`lorad.ota.target`, TUF's trust core,
:func:`lorad.ota.commands.verify_command`) takes bytes and does no I/O; every message from
outside is decoded through :mod:`lorad.ota.wire` (size and depth bounded, types checked); errors have two roots,
:class:`lorad.ota.errors.RejectedError` (bad data, with a reason code) and
:class:`lorad.ota.errors.TransportError` (the channel failed).
"""

if __name__ != "lorad.ota":
    # The repository folder is not a top-level package: on the import path it would shadow
    # an unrelated distribution of the same name (python-daemon, AdapterHub's adapters).
    raise ImportError(f"lorad's ota package is imported as lorad.ota, not as {__name__!r}")

