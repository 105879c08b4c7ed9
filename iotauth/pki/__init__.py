"""PKI, pure crypto: the CA hierarchy, device issuance, CRLs, OCSP and client-certificate verification.

Everything here takes certificates and key objects as values and returns
values; reading and writing the home's files is :mod:`iotauth.castore`'s job.
"""

from iotauth.pki.ca import CertificateAuthority, KeyPolicy, revoked_entry
from iotauth.pki.hierarchy import Hierarchy, create_hierarchy, issue_server_certificate
from iotauth.pki.verify import CertificateIdentity, ClientCertificateVerifier

__all__ = [
    "CertificateAuthority",
    "CertificateIdentity",
    "ClientCertificateVerifier",
    "Hierarchy",
    "KeyPolicy",
    "create_hierarchy",
    "issue_server_certificate",
    "revoked_entry",
]
