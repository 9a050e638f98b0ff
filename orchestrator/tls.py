"""TLS for the gRPC port: the server's certificate files, re-read when they change, without a restart.

grpc's dynamic server credentials ask ``CertificateFiles.fetch`` for a new configuration at every new
handshake; it answers None (keep the current one) unless a file's identity (inode, size, mtime) changed, so
a rotation costs one ``stat`` per file per handshake. Established connections, and the streams on them,
keep the certificate they were opened with. A Kubernetes Secret volume swaps all its files at once; to
rotate by hand, write new files beside the old and rename them over.
"""

from __future__ import annotations

import logging
import os
import threading

import grpc

log = logging.getLogger("streamgen.tls")


class CertificateFiles:
    def __init__(self, cert: str, key: str, client_ca: str = ""):
        """Reads and checks the files now: ValueError naming the config field of one that is unusable."""
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._stamp = self._identity()
        self.initial = self._configuration()
        self.reloads = 0

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch,
                                                   require_client_authentication=bool(self.client_ca))

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc (on its own threads) before each new handshake: a new configuration when the files
        changed, else None. A file that cannot be read or parsed keeps the old certificate in service."""
        with self._lock:
            try:
                stamp = self._identity()
                if stamp == self._stamp:
                    return None
                config = self._configuration()
            except ValueError:
                log.warning("TLS files changed but cannot be used yet; keeping the current certificate",
                            exc_info=True)
                return None
            self._stamp = stamp
            self.reloads += 1
            log.info("TLS certificate reloaded (%d)", self.reloads)
            return config

    def _files(self) -> list[tuple[str, str]]:
        return [(field, path) for field, path in (("tls_cert", self.cert), ("tls_key", self.key),
                                                  ("tls_client_ca", self.client_ca)) if path]

    def _identity(self) -> tuple:
        stamps = []
        for field, path in self._files():
            try:
                st = os.stat(path)
            except OSError as err:
                raise ValueError(f"server.{field}: cannot read {path}: {err.strerror}") from None
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def _read(self, field: str, path: str, marker: bytes) -> bytes:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise ValueError(f"server.{field}: cannot read {path}: {err.strerror}") from None
        if b"-----BEGIN " not in data or marker not in data:
            raise ValueError(f"server.{field}: {path} holds no PEM {marker.decode().strip()}")
        return data

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert = self._read("tls_cert", self.cert, b"CERTIFICATE")
        key = self._read("tls_key", self.key, b"PRIVATE KEY")
        ca = self._read("tls_client_ca", self.client_ca, b"CERTIFICATE") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
