"""ota: signed adapter updates over MQTT, verified with TUF, installed atomically.

Fleet side: :class:`ota.repository.FleetRepository` (root of trust, signing, key rotation,
publishing) and ``loractl fleet ...`` (:mod:`ota.cli`). Device side:
:class:`ota.client.OtaClient` over an :class:`ota.transport.Transport` (MQTT:
:class:`ota.transport.MqttTransport`), installing through the adapter service
(:class:`ota.installer.AdapterSink`), reporting with :mod:`ota.status` and obeying
:mod:`ota.commands`. Verification (:mod:`ota.target`, TUF's trust core,
:func:`ota.commands.verify_command`) takes bytes and does no I/O; errors have two roots,
:class:`ota.errors.RejectedError` (bad data, with a reason code) and
:class:`ota.errors.TransportError` (the channel failed).
"""
