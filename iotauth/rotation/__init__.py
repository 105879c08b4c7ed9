"""Certificate rotation over MQTT: the protocol's messages, the renewal service and operators' orders.

* :mod:`.messages` -- the wire format (PROTOCOL.md part 2), shared with the device side;
* :mod:`.renewer` -- what the renewal service decides for one message;
* :mod:`.service` -- ``iotauth renewer``: the MQTT client around it, operators' orders, its own identity;
* :mod:`.orders` -- ``iotauth rotate`` and ``iotauth devices expiring``: choosing devices, ordering, progress.
"""
