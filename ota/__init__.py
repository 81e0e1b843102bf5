"""ota: signed adapter updates over MQTT, verified with TUF, installed atomically.

Fleet side: :class:`ota.repository.FleetRepository` (root of trust, signing, key rotation,
publishing), ``loractl fleet ...`` (:mod:`ota.cli`; what its commands share in
:mod:`ota.cli_support`), broker set-up (:mod:`ota.broker_setup`) and staged rollouts (the
pure state machine :mod:`ota.rollout`, driven by :mod:`ota.rollout_cli`). Device side:
:class:`ota.client.OtaClient` over an :class:`ota.transport.Transport` (MQTT:
:class:`ota.transport.MqttTransport`), installing through the adapter service
(:class:`ota.installer.AdapterSink`), reporting with :mod:`ota.status` and obeying
:mod:`ota.commands`, within its install window (:mod:`ota.window`) and privacy policy
(:mod:`ota.privacy`). Verification (:mod:`ota.target`, TUF's trust core,
:func:`ota.commands.verify_command`) takes bytes and does no I/O; errors have two roots,
:class:`ota.errors.RejectedError` (bad data, with a reason code) and
:class:`ota.errors.TransportError` (the channel failed).
"""
