"""Serial provisioning: the wire protocol, the link, and the station.

Layers, bottom up: :mod:`~iotauth.provisioning.codec` (sans-I/O framing),
:mod:`~iotauth.provisioning.messages` and :mod:`~iotauth.provisioning.objects`
(what the frames carry), :mod:`~iotauth.provisioning.transport` (pyserial on
the event loop), :mod:`~iotauth.provisioning.session` (seq, retries) and
:mod:`~iotauth.provisioning.station` (the ten steps, the journal).

The codec layers are imported eagerly; the station (which pulls in the
registry and the CA) is imported on first use, so the device emulator, which
shares the codec, starts without loading the host side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from iotauth.provisioning.codec import Deframer, Frame, FrameError, ProtocolError, decode, encode

if TYPE_CHECKING:
    from iotauth.provisioning.ids import IdTemplate, MappedIds, PooledIds, TemplateIds, load_id_source
    from iotauth.provisioning.line import LineOutcome, LineRequest, run_line
    from iotauth.provisioning.report import append_report
    from iotauth.provisioning.session import DeviceRefused, RetryPolicy, set_testing
    from iotauth.provisioning.station import (
        Progress,
        ProvisionResult,
        Station,
        StationConfig,
        Step,
        expand_ports,
    )

__all__ = [
    "Deframer",
    "DeviceRefused",
    "Frame",
    "FrameError",
    "IdTemplate",
    "LineOutcome",
    "LineRequest",
    "MappedIds",
    "PooledIds",
    "Progress",
    "ProtocolError",
    "ProvisionResult",
    "RetryPolicy",
    "Station",
    "StationConfig",
    "Step",
    "TemplateIds",
    "append_report",
    "decode",
    "encode",
    "expand_ports",
    "load_id_source",
    "run_line",
    "set_testing",
]

_LAZY = {
    "IdTemplate": "ids",
    "MappedIds": "ids",
    "PooledIds": "ids",
    "TemplateIds": "ids",
    "load_id_source": "ids",
    "LineOutcome": "line",
    "LineRequest": "line",
    "run_line": "line",
    "append_report": "report",
    "DeviceRefused": "session",
    "RetryPolicy": "session",
    "set_testing": "session",
    "Progress": "station",
    "ProvisionResult": "station",
    "Station": "station",
    "StationConfig": "station",
    "Step": "station",
    "expand_ports": "station",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'iotauth.provisioning' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"iotauth.provisioning.{module}"), name)
