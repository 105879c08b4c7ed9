"""PKI: the CA hierarchy, device issuance, CRLs and client-certificate verification."""

from iotauth.pki.ca import CertificateAuthority, fingerprint, revoked_entry
from iotauth.pki.hierarchy import initialise_ca, issue_server_certificate
from iotauth.pki.verify import CertificateIdentity, ClientCertificateVerifier, Rejection

__all__ = [
    "CertificateAuthority",
    "CertificateIdentity",
    "ClientCertificateVerifier",
    "Rejection",
    "fingerprint",
    "initialise_ca",
    "issue_server_certificate",
    "revoked_entry",
]
