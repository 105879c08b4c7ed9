"""Check a device against the behaviour vectors over a serial port: ``python -m firmware_tools.conformance --port DEV``.

A firmware team gets a pass/fail report for its board without a station or a
registry: every case of ``vectors/behaviour.json`` (see
:mod:`firmware_tools.behaviour`) is replayed request by request, each reply is
compared with what PROTOCOL.md requires, and the device's state is checked
after the case. Each case first returns the board to a known state (ERASE,
then writes), so **the board's identity is erased**: run it on a development
board, never on a provisioned one.

Cases a device cannot run (it lacks a capability the case needs, or has one
that makes the case meaningless) are reported as skipped, with the reason.
Exit status: 0 when every case that ran passed, 1 when one failed, 2 when the
device could not be reached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from firmware_tools import behaviour
from iotauth.errors import FrameError, ProtocolError
from iotauth.provisioning.codec import SEQ_UNSOLICITED, Deframer, Frame, encode
from iotauth.provisioning.messages import (
    Capability,
    Commit,
    Csr,
    DeviceState,
    Erase,
    Error,
    ErrorCode,
    GenerateKey,
    Hello,
    Info,
    KeyType,
    KeyTypes,
    Message,
    MsgType,
    Prove,
    PutCert,
    PutConfig,
    PutKey,
    ReadBack,
    Signature,
    parse_message,
)
from iotauth.provisioning.objects import decode_cert_bundle, spki_der, verify_proof

VECTORS = Path(__file__).resolve().parent / "vectors" / "behaviour.json"
REPLY_TIMEOUT = 5.0
KEYGEN_TIMEOUT = 30.0
ZERO = bytes(32)
_PUTS: dict[str, type[PutKey | PutCert | PutConfig]] = {"PUT_KEY": PutKey, "PUT_CERT": PutCert,
                                                         "PUT_CONFIG": PutConfig}


class Unreachable(Exception):
    """The device does not answer at all: no report is possible."""


class CaseFailed(Exception):
    """A reply or the resulting state is not what the rule requires."""


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class Port:
    """Request/reply over the serial port; the runner's own seq counter."""

    def __init__(self, port: str, baud: int) -> None:
        import serial

        try:
            self._serial = serial.serial_for_url(port, baudrate=baud, timeout=0.05)
        except (serial.SerialException, OSError) as exc:
            raise Unreachable(f"cannot open {port}: {exc}") from None
        self._deframer = Deframer()
        self._seq = 0x100
        self._serial.write(b"\x00")

    def next_seq(self) -> int:
        self._seq = self._seq % 0xFFFF + 1
        return self._seq

    def exchange(self, wire: bytes, seq: int, timeout: float) -> Frame:
        """Send ``wire``; the frame answering ``seq`` (stale replies to earlier requests are skipped)."""
        self._serial.write(wire)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self._serial.read(1)  # returns at the first byte (or after the short read timeout)
            data += self._serial.read(self._serial.in_waiting) if data and self._serial.in_waiting else b""
            for event in self._deframer.feed(data):
                if isinstance(event, FrameError):
                    raise CaseFailed(f"the device sent a frame that does not decode ({event.code})")
                if event.seq == seq:
                    return event
                if event.seq == SEQ_UNSOLICITED:
                    raise CaseFailed(f"the device could not read a request: unsolicited {_describe(event)}")
        raise CaseFailed(f"no reply to seq {seq} within {timeout:.0f} s")

    def close(self) -> None:
        self._serial.close()


def _describe(frame: Frame) -> str:
    try:
        reply = parse_message(frame)
    except ProtocolError as exc:
        return f"an undecodable reply ({exc})"
    if isinstance(reply, Error):
        return f"ERROR {_code_name(reply.code)} ({reply.text!r})"
    return reply.TYPE.name


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"0x{code:02x}"


@dataclass
class Device:
    """What the runner knows about the board under test."""

    info: Info
    csr: bytearray = field(default_factory=bytearray)
    csr_total: int = 0
    csr_type: KeyType = KeyType.P256
    last_reply: bytes = b""
    last_wire: tuple[bytes, int] | None = None

    def has(self, need: str) -> bool:
        caps, types = self.info.capabilities, self.info.key_types
        return {
            "keygen": bool(caps & Capability.KEYGEN), "put_key": bool(caps & Capability.PUT_KEY),
            "no_put_key": not caps & Capability.PUT_KEY, "p384": bool(types & KeyTypes.P384),
            "no_p384": not types & KeyTypes.P384, "no_ed25519": not types & KeyTypes.ED25519,
        }[need]


class Runner:
    """Replays the behaviour vectors against one device."""

    def __init__(self, port: Port, vectors: dict[str, Any]) -> None:
        self.port = port
        self.objects = {name: bytes.fromhex(data) for name, data in vectors["objects"].items()}
        self.cases: list[dict[str, Any]] = vectors["cases"]
        self.device = Device(Info(1, 64, Capability(0), KeyTypes(0), DeviceState(0), "", "", ""))
        self.device.info = self._hello()

    # -- talking ---------------------------------------------------------------------------

    def request(self, msg_type: int, payload: bytes, *, seq: int | None = None, version: int = 1,
                slow: bool = False) -> tuple[Message | Error, Frame]:
        seq = self.port.next_seq() if seq is None else seq
        wire = encode(msg_type, seq, payload, version=version)
        return self._send(wire, seq, slow)

    def retransmit(self) -> tuple[Message | Error, Frame]:
        if self.device.last_wire is None:
            raise CaseFailed("nothing to retransmit")
        wire, seq = self.device.last_wire
        return self._send(wire, seq, True)

    def _send(self, wire: bytes, seq: int, slow: bool) -> tuple[Message | Error, Frame]:
        frame = self.port.exchange(wire, seq, KEYGEN_TIMEOUT if slow else REPLY_TIMEOUT)
        self.device.last_wire = (wire, seq)
        self.device.last_reply = encode(frame.type, frame.seq, frame.payload, version=frame.version)
        try:
            return parse_message(frame), frame
        except ProtocolError as exc:
            raise CaseFailed(f"the reply does not parse: {exc}") from None

    def call(self, msg: Message, slow: bool = False) -> Message | Error:
        return self.request(msg.TYPE, msg.payload(), slow=slow)[0]

    def expect(self, msg: Message, wanted: type[Message], what: str, slow: bool = False) -> Any:
        reply = self.call(msg, slow)
        if not isinstance(reply, wanted):
            raise CaseFailed(f"setup: {what} answered {_reply_name(reply)}")
        return reply

    def _hello(self) -> Info:
        try:
            reply = self.call(Hello())
        except CaseFailed as exc:
            raise Unreachable(f"HELLO: {exc}") from None
        if not isinstance(reply, Info):
            raise Unreachable(f"HELLO answered {_reply_name(reply)}")
        return reply

    def refresh(self) -> Info:
        self.device.info = self.expect(Hello(), Info, "HELLO")
        return self.device.info

    # -- objects -----------------------------------------------------------------------------

    def stored_key(self) -> Any:
        der = self.refresh().public_key
        if not der:
            raise CaseFailed("the device reports no key")
        return serialization.load_der_public_key(der)

    def cert(self) -> bytes:
        return behaviour.cert_bundle(self.stored_key())

    def obj(self, name: str) -> bytes:
        return self.cert() if name == "cert" else self.objects[name]

    def data(self, spec: Any) -> bytes:
        if isinstance(spec, str):
            return bytes.fromhex(spec)
        blob = self.obj(spec["object"])
        return blob[spec.get("from", 0): spec.get("to", len(blob))]

    def upload(self, kind: str, total: int, offset: int, data: bytes) -> Message | Error:
        """One PUT_* step; split into chunks the device accepts (the last reply is the step's)."""
        size = self.device.info.max_payload - 4
        reply: Message | Error = Error(0)
        for start in range(0, max(len(data), 1), size):
            reply = self.call(_PUTS[kind](total, offset + start, data[start: start + size]))
            if isinstance(reply, Error):
                return reply
        return reply

    def full_csr(self) -> bytes:
        while len(self.device.csr) < self.device.csr_total:
            reply = self.call(GenerateKey(self.device.csr_type, False, len(self.device.csr)), True)
            if not isinstance(reply, Csr) or reply.offset != len(self.device.csr):
                raise CaseFailed(f"reading the rest of the CSR: {_reply_name(reply)}")
            self.device.csr += reply.data
        return bytes(self.device.csr)

    # -- setup -------------------------------------------------------------------------------

    def reach(self, start: str) -> None:
        info = self.refresh()
        self.expect(Erase(info.hardware_id), Message, "ERASE")
        self.device.csr, self.device.csr_total = bytearray(), 0
        if start == "blank":
            return
        if self.device.has("put_key"):
            key = self.objects["key_p256"]
            reply = self.upload("PUT_KEY", len(key), 0, key)
            if getattr(reply, "complete", False) is not True:
                raise CaseFailed(f"setup: PUT_KEY answered {_reply_name(reply)}")
        else:
            self.expect(GenerateKey(KeyType.P256, False, 0), Csr, "GENERATE_KEY", slow=True)
        if start == "keyed":
            return
        for kind, blob in (("PUT_CONFIG", self.objects["config"]), ("PUT_CERT", self.cert())):
            reply = self.upload(kind, len(blob), 0, blob)
            if getattr(reply, "complete", False) is not True:
                raise CaseFailed(f"setup: {kind} answered {_reply_name(reply)}")
        if start == "committed":
            self.expect(Commit(_sha(decode_cert_bundle(self.cert())[0])), Message, "COMMIT")

    # -- a step ------------------------------------------------------------------------------

    def step(self, step: dict[str, Any]) -> None:
        if step.get("retransmit"):
            before = self.device.last_reply
            self.retransmit()
            if step["expect"].get("identical") and self.device.last_reply != before:
                raise CaseFailed("a retransmit (same seq and bytes) was executed again: the reply differs "
                                 "from the cached one (PROTOCOL.md section 2)")
            return
        send = step["send"]
        kind = send["type"]
        seq = send.get("seq")
        if "payload" in send:
            msg_type = send.get("raw_type", MsgType[kind])
            reply, frame = self.request(msg_type, bytes.fromhex(send["payload"]), seq=seq,
                                        version=send.get("version", 1))
        elif kind in _PUTS:
            data = self.data(send["data"])
            total = len(self.cert()) if send["total"] == "cert" else send["total"]
            reply = self.upload(kind, total, send["offset"], data)
            frame = None
        else:
            msg = self._message(kind, send)
            if isinstance(msg, GenerateKey):
                self.device.csr_type = msg.key_type
            reply, frame = self.request(msg.TYPE, msg.payload(), seq=seq, slow=kind == "GENERATE_KEY")
        self.check(reply, step["expect"], send, frame)

    def _message(self, kind: str, send: dict[str, Any]) -> Message:
        if kind == "GENERATE_KEY":
            return GenerateKey(KeyType(send["key_type"]), send["replace"], send["offset"])
        if kind == "PROVE":
            return Prove(bytes.fromhex(send["nonce"]))
        if kind == "COMMIT":
            value = send["fingerprint"]
            return Commit(_sha(decode_cert_bundle(self.cert())[0]) if value == "cert" else bytes.fromhex(value))
        if kind == "ERASE":
            name = send["hardware_id"]
            return Erase(self.device.info.hardware_id if name == "self" else name)
        return {"HELLO": Hello, "READ_BACK": ReadBack}[kind]()

    def check(self, reply: Message | Error, expect: dict[str, Any], send: dict[str, Any], frame: Frame | None) -> None:
        if "seq" in expect and frame is not None and frame.seq != expect["seq"]:
            raise CaseFailed(f"the reply has seq {frame.seq}, expected {expect['seq']}")
        if "error" in expect:
            if not isinstance(reply, Error):
                raise CaseFailed(f"expected ERROR {expect['error']}, got {_reply_name(reply)}")
            if _code_name(reply.code) != expect["error"]:
                raise CaseFailed(f"expected ERROR {expect['error']}, got ERROR {_code_name(reply.code)} "
                                 f"({reply.text!r})")
            if "arg" in expect:
                arg = self.device.csr_total if expect["arg"] == "csr_total" else expect["arg"]
                if reply.arg != arg:
                    raise CaseFailed(f"ERROR {expect['error']} carries arg {reply.arg}, expected {arg}")
            return
        if isinstance(reply, Error) or reply.TYPE.name != expect["type"]:
            raise CaseFailed(f"expected {expect['type']}, got {_reply_name(reply)}")
        for name, want in expect.items():
            if name not in ("type", "seq"):
                self._field(reply, name, want, send)

    def _field(self, reply: Message, name: str, want: Any, send: dict[str, Any]) -> None:
        if isinstance(reply, Csr):
            if name == "identical_data":
                if bytes(reply.data) != bytes(self.device.csr[: len(reply.data)]):
                    raise CaseFailed("GENERATE_KEY without REPLACE returned a different CSR (a new key?)")
                return
            if reply.offset == 0:
                self.device.csr, self.device.csr_total = bytearray(reply.data), reply.total
        if name == "verifies":
            assert isinstance(reply, Signature)
            if not verify_proof(self.stored_key(), reply.algorithm, reply.signature, bytes.fromhex(send["nonce"])):
                raise CaseFailed("the PROVE signature does not verify with the stored key")
            return
        got = getattr(reply, name)
        expected = self._resolve(name, want)
        if name == "state":
            got = sorted(str(f.name) for f in DeviceState if f in got)
            expected = sorted(want)
        if got != expected:
            shown = got.hex() if isinstance(got, bytes) else got
            raise CaseFailed(f"{reply.TYPE.name}.{name} is {shown!s:.80}, expected {want}")

    def _resolve(self, name: str, want: Any) -> Any:
        if want == "zero":
            return ZERO
        if isinstance(want, str) and want.startswith("object:"):
            return _sha(self.obj(want[len("object:"):]))
        if want == "stored":
            return _sha(spki_der(self.stored_key()))
        if want == "csr":
            return spki_der(x509.load_der_x509_csr(self.full_csr()).public_key())
        if want == "cert":
            return _sha(decode_cert_bundle(self.cert())[0])
        if want == "" and name in ("public_key", "cert_fingerprint"):
            return b""
        if name == "complete":
            return bool(want)
        return want

    # -- a case ------------------------------------------------------------------------------

    def run(self, case: dict[str, Any]) -> dict[str, Any]:
        result = {"name": case["name"], "rule": case["rule"], "status": "pass", "message": ""}
        missing = [need for need in case["requires"] if not self.device.has(need)]
        if missing:
            return {**result, "status": "skip", "message": f"device: {', '.join(missing)} does not hold"}
        try:
            self.reach(case["start"])
            for number, step in enumerate(case["steps"], start=1):
                try:
                    self.step(step)
                except CaseFailed as exc:
                    raise CaseFailed(f"step {number}: {exc}") from None
            state = sorted(str(f.name) for f in DeviceState if f in self.refresh().state)
            if state != sorted(case["state"]):
                raise CaseFailed(f"after the case the state is {state}, expected {sorted(case['state'])}")
        except CaseFailed as exc:
            return {**result, "status": "fail", "message": str(exc)}
        return result


def _reply_name(reply: Message | Error) -> str:
    if isinstance(reply, Error):
        return f"ERROR {_code_name(reply.code)} ({reply.text!r})"
    return reply.TYPE.name


def run(port: str, *, baud: int = 115200, vectors: Path = VECTORS, only: str | None = None) -> dict[str, Any]:
    data = json.loads(vectors.read_text(encoding="utf-8"))
    link = Port(port, baud)
    try:
        runner = Runner(link, data)
        info = runner.device.info
        results = [runner.run(case) for case in runner.cases if only is None or only in case["name"]]
    finally:
        link.close()
    counts = {status: sum(r["status"] == status for r in results) for status in ("pass", "fail", "skip")}
    return {
        "port": port,
        "device": {"hardware_id": info.hardware_id, "model": info.model, "firmware": info.firmware,
                   "max_payload": info.max_payload},
        "passed": counts["pass"], "failed": counts["fail"], "skipped": counts["skip"],
        "results": results,
    }


def render(report: dict[str, Any]) -> str:
    device = report["device"]
    lines = [f"device {device['hardware_id']} ({device['model']} {device['firmware']}) on {report['port']}"]
    for result in report["results"]:
        tag = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP"}[result["status"]]
        line = f"{tag}  {result['name']}  [PROTOCOL.md {result['rule']}]"
        if result["message"]:
            line += f"\n      {result['message']}"
        lines.append(line)
    lines.append(f"conformance: {report['passed']} passed, {report['failed']} failed, {report['skipped']} skipped")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firmware_tools.conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", required=True, metavar="DEV", help="the device's serial port (or a pyserial URL)")
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--case", metavar="TEXT", help="run only the cases whose name contains TEXT")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = run(args.port, baud=args.baud, only=args.case)
    except Unreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
