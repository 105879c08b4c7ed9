"""``iotauth demo``: the whole lifecycle on emulated devices, checked step by step.

Real parts only: a fresh CA and SQLite registry, device emulators on
pseudo-terminals driven by the provisioning station over serial, the iotauth
broker on loopback with mTLS, paho-mqtt clients using the credentials each
device received, a device renewing its certificate over MQTT through
``iotauth renewer`` with the reference agent, and an operator revoking a
device from a separate process.
Every step checks what it claims, so a run that exits 0 is also a smoke test.

* :mod:`iotauth.demo.home` -- the demo's home: its broker port and the operator's identity;
* :mod:`iotauth.demo.lifecycle` -- the checked steps and :func:`run_demo`;
* :mod:`iotauth.demo.rotation` -- the parts of the rotation step (the renewer, ``iotauth rotate``, the agent).

The emulators and MQTT clients are the ones the test suite uses
(:mod:`iotauth.testing`).
"""

from iotauth.demo.lifecycle import TRUST_DOMAIN, DemoRun, StepResult, run_demo

__all__ = ["TRUST_DOMAIN", "DemoRun", "StepResult", "run_demo"]
