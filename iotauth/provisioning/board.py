"""The station's conversation with one board: each method is one exchange of the wire protocol.

It knows the messages and their rules (chunked uploads that resume where the
board stands, CSRs read in chunks, what each reply must echo) and nothing of
the registry or the CA: :mod:`iotauth.provisioning.run` decides what to say.
"""

from __future__ import annotations

from iotauth.errors import DeviceRefused, ProvisioningError
from iotauth.provisioning.messages import (
    CertAck,
    Commit,
    Committed,
    ConfigAck,
    Csr,
    Erase,
    Erased,
    ErrorCode,
    GenerateKey,
    Hashes,
    Hello,
    Info,
    KeyAck,
    KeyType,
    Prove,
    PutCert,
    PutConfig,
    PutKey,
    ReadBack,
    Signature,
)
from iotauth.provisioning.session import Session

PROTOCOL_VERSION = 1


class Board:
    """One board behind a :class:`~iotauth.provisioning.session.Session`.

    Args:
        session: the request/reply conversation on the board's link.
        keygen_timeout: extra seconds a board may take to answer GENERATE_KEY.
        restarts: how often an upload may restart where the board says it stands.
    """

    def __init__(self, session: Session, *, keygen_timeout: float, restarts: int) -> None:
        self.session = session
        self._keygen_timeout = keygen_timeout
        self._restarts = restarts
        self._max_payload = 0

    async def start(self) -> None:
        await self.session.start()

    async def identify(self) -> Info:
        """HELLO -> INFO; a board that speaks another protocol version is refused."""
        info = await self.session.request(Hello(), Info)
        if info.protocol_version != PROTOCOL_VERSION:
            raise ProvisioningError(f"device speaks protocol version {info.protocol_version}, not {PROTOCOL_VERSION}")
        self._max_payload = info.max_payload
        return info

    async def read_csr(self, key_type: KeyType, replace_key: bool) -> bytes:
        """GENERATE_KEY (make a key, or keep the current one) and read the CSR over it, chunk by chunk."""
        extra = self._keygen_timeout
        first = await self.session.request(GenerateKey(key_type, replace_key, 0), Csr, extra_timeout=extra)
        if first.offset != 0:
            raise ProvisioningError("device returned a CSR chunk at the wrong offset")
        data = bytearray(first.data)
        while len(data) < first.total:
            chunk = await self.session.request(GenerateKey(key_type, False, len(data)), Csr, extra_timeout=extra)
            if chunk.total != first.total or chunk.offset != len(data) or not chunk.data:
                raise ProvisioningError("device returned an inconsistent CSR chunk")
            data += chunk.data
        return bytes(data)

    async def put_key(self, secret: bytes) -> bytes:
        """PUT_KEY; returns the SHA-256 the board reports for what it stored."""
        return await self._put_object(PutKey, secret, KeyAck)

    async def put_config(self, config: bytes) -> bytes:
        """PUT_CONFIG; returns the SHA-256 the board reports for what it stored."""
        return await self._put_object(PutConfig, config, ConfigAck)

    async def put_cert(self, bundle: bytes) -> bytes:
        """PUT_CERT; returns the SHA-256 the board reports for what it stored."""
        return await self._put_object(PutCert, bundle, CertAck)

    async def _put_object(self, kind: type[PutKey | PutCert | PutConfig], obj: bytes,
                          ack: type[KeyAck | CertAck | ConfigAck]) -> bytes:
        """Upload ``obj`` in chunks; resume or restart where the device says it stands."""
        if not self._max_payload:
            raise ProvisioningError("device not identified")
        chunk = min(self._max_payload, 1024) - 4
        offset, restarts = 0, 0
        while True:
            try:
                reply = await self.session.request(kind(len(obj), offset, obj[offset : offset + chunk]), ack)
            except DeviceRefused as exc:
                if exc.code != ErrorCode.BAD_OFFSET or restarts >= self._restarts:
                    raise
                restarts += 1
                offset = exc.arg if exc.arg < offset else 0
                continue
            if reply.complete:
                return reply.sha256
            if not offset < reply.received <= len(obj):
                raise ProvisioningError(f"device acknowledged {reply.received} bytes at offset {offset}")
            offset = reply.received

    async def read_back(self) -> Hashes:
        """READ_BACK: the hashes of what the board stores."""
        return await self.session.request(ReadBack(), Hashes)

    async def prove(self, nonce: bytes) -> Signature:
        """PROVE: the board signs ``nonce`` with its stored key."""
        return await self.session.request(Prove(nonce), Signature)

    async def commit(self, fingerprint: bytes) -> bytes:
        """COMMIT the certificate with this SHA-256; returns the fingerprint the board committed."""
        reply = await self.session.request(Commit(fingerprint), Committed)
        return reply.fingerprint

    async def erase(self, hardware_id: str) -> None:
        """ERASE a committed board (its hardware id confirms the intent)."""
        await self.session.request(Erase(hardware_id), Erased)
