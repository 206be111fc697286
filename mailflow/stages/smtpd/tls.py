"""smtpd's TLS: the server certificate and key as an `ssl.SSLContext`, built at start and rebuilt on reload.

What it owns
- `ServerTls(cert_file, key_file)`: reads the certificate chain and key (Postfix smtpd_tls_cert_file /
  smtpd_tls_key_file; an empty key file means the key is in the certificate file) into `.context`. A reload
  reads the files again into new ServerTls objects (server.Smtpd.reconfigure): new sessions get them, sessions
  already in TLS keep theirs.

Failure behaviour: a missing, unreadable or mismatched file, or one that is not a regular file (a FIFO would hold
OpenSSL at open(): mailflow.files), raises `TlsError` naming the file, at start (so `mailflow serve` refuses to
start) and at a reload (the reload is refused; the contexts in use stay). Client certificates are not requested.
"""
from __future__ import annotations

import ssl

from mailflow.errors import ConfigError
from mailflow.files import TEXT_LIMIT, check_regular_file


class TlsError(ConfigError):
    """A certificate or key that cannot be used; the reason names the file (a ConfigError, so `mailflow serve`
    reports it as one and exits 2)."""

    def __init__(self, reason: str):
        super().__init__("", "smtpd.tls_cert_file", reason)


def build_context(cert_file: str, key_file: str = "") -> ssl.SSLContext:
    """A server context with the chain and key, TLS 1.2 or newer, no client certificate requested."""
    for path in filter(None, (cert_file, key_file)):
        try:  # OpenSSL opens it by name: a FIFO would hold the start (or a reload) at open() for ever
            check_regular_file(path, TEXT_LIMIT)
        except FileNotFoundError:
            raise TlsError(f"{path}: no such certificate or key file") from None
        except OSError as e:  # RefusedFile ("is a FIFO, not a regular file"), a directory on the way not searchable
            raise TlsError(f"{path}: cannot read ({e.strerror})") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.load_cert_chain(cert_file, key_file or None)
    except PermissionError as e:
        raise TlsError(f"{e.filename or cert_file}: cannot read ({e.strerror})") from None
    except (ssl.SSLError, OSError) as e:
        names = f"{cert_file} / {key_file}" if key_file else cert_file
        raise TlsError(f"{names}: not a usable certificate and key ({e})") from None
    return ctx


class ServerTls:
    """The context of one certificate and key, read when made."""

    def __init__(self, cert_file: str, key_file: str = ""):
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = build_context(cert_file, key_file)

