"""Serial provisioning: the wire protocol, the link, and the station.

Layers, bottom up: :mod:`~iotauth.provisioning.codec` (sans-I/O framing),
:mod:`~iotauth.provisioning.messages` and :mod:`~iotauth.provisioning.objects`
(what the frames carry), :mod:`~iotauth.provisioning.transport` (pyserial on
the event loop), :mod:`~iotauth.provisioning.session` (seq, retries),
:mod:`~iotauth.provisioning.board` (the conversation with one board),
:mod:`~iotauth.provisioning.planner` (what to do with a board, pure),
:mod:`~iotauth.provisioning.run` (one board's ten steps) and
:mod:`~iotauth.provisioning.station` (many ports, the journal).

The codec layers are imported eagerly; the station (which pulls in the
registry and the CA) is imported on first use, so the device emulator, which
shares the codec, starts without loading the host side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from iotauth.errors import DeviceRefused, FrameError, ProtocolError
from iotauth.provisioning.codec import Deframer, Frame, decode, encode

if TYPE_CHECKING:
    from iotauth.provisioning.ids import IdTemplate, MappedIds, PooledIds, TemplateIds, load_id_source
    from iotauth.provisioning.line import LineOutcome, LineRequest, run_line
    from iotauth.provisioning.report import append_report
    from iotauth.provisioning.results import Progress, ProvisionResult, Step
    from iotauth.provisioning.session import RetryPolicy, set_testing
    from iotauth.provisioning.station import Station, StationConfig, expand_ports

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
    "RetryPolicy": "session",
    "set_testing": "session",
    "Progress": "results",
    "ProvisionResult": "results",
    "Station": "station",
    "StationConfig": "station",
    "Step": "results",
    "expand_ports": "station",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'iotauth.provisioning' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"iotauth.provisioning.{module}"), name)
