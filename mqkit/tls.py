"""TLS URL options, spelt once for every adapter: ``tls_ca``, ``tls_cert``, ``tls_key``,
``tls_key_password``, ``tls_verify``.

An adapter adds :data:`TLS_OPTIONS` to its own option table, passes :data:`RENAMED` to
:meth:`mqkit.url.BrokerURL.options` (so an old spelling gets a message naming the new one),
and builds its client's TLS settings from :class:`TlsSettings`.

Added in 0.3.0.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mqkit.errors import ConfigError
from mqkit.url import Option

__all__ = ["RENAMED", "TLS_OPTIONS", "TlsSettings"]

TLS_OPTIONS: dict[str, Option[Any]] = {
    "tls_ca": Option(str, "", "TLS: CA bundle (PEM) that signs the broker's certificate"),
    "tls_cert": Option(str, "", "TLS: client certificate (PEM), for mutual TLS; needs `tls_key`"),
    "tls_key": Option(str, "", "TLS: client private key (PEM); needs `tls_cert`"),
    "tls_key_password": Option(
        str, "", "TLS: password of the client key (never printed)", secret=True
    ),
    "tls_verify": Option(bool, True, "TLS: verify the broker's certificate and host name"),
}
"""The TLS options every adapter with TLS accepts, under these names."""

RENAMED: dict[str, str] = {
    "ca_file": "tls_ca",
    "cert_file": "tls_cert",
    "key_file": "tls_key",
    "key_password": "tls_key_password",
    "tls_ca_file": "tls_ca",
    "tls_cert_file": "tls_cert",
    "tls_key_file": "tls_key",
}
"""Earlier spellings (RabbitMQ's and Redis' before 0.3.0) and the name each has now."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Validated TLS settings of one URL.

    Attributes:
        ca: CA bundle path, or "" for the system's.
        cert: client certificate path, or "".
        key: client key path, or "".
        key_password: password of the key, or "" (never printed).
        verify: verify the broker's certificate and host name.
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    key_password: str = ""
    verify: bool = True

    @classmethod
    def from_options(
        cls, opts: Mapping[str, Any], query: Mapping[str, str], *, enabled: bool, how: str
    ) -> TlsSettings | None:
        """The settings when TLS is ``enabled``, else None.

        Args:
            opts: the parsed options (with :data:`TLS_OPTIONS` among them).
            query: the URL's raw query (to tell a given option from a default).
            enabled: the URL asks for TLS (its scheme or its ``tls`` option).
            how: how to turn TLS on, for the error (e.g. "use amqps://").

        Raises:
            ConfigError: TLS options without TLS, or a certificate without its key.
        """
        given = [name for name in TLS_OPTIONS if name in query]
        if not enabled:
            if given:
                raise ConfigError(f"URL option(s) {', '.join(given)} need TLS: {how}")
            return None
        settings = cls(
            ca=opts["tls_ca"],
            cert=opts["tls_cert"],
            key=opts["tls_key"],
            key_password=opts["tls_key_password"],
            verify=opts["tls_verify"],
        )
        if bool(settings.cert) != bool(settings.key):
            raise ConfigError(
                "URL options tls_cert and tls_key go together (client certificate and key)"
            )
        return settings

    def __repr__(self) -> str:
        shown = "***" if self.key_password else ""
        return (
            f"TlsSettings(ca={self.ca!r}, cert={self.cert!r}, key={self.key!r}, "
            f"key_password={shown!r}, verify={self.verify})"
        )

    def check_files(self) -> None:
        """Raise :class:`ConfigError` naming the option whose file does not exist."""
        for name, path in (("tls_ca", self.ca), ("tls_cert", self.cert), ("tls_key", self.key)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"URL option {name}: no such file {path!r}")

    def context(self) -> ssl.SSLContext:
        """An :class:`ssl.SSLContext` for a client with these settings.

        Raises:
            ConfigError: a file is missing or cannot be loaded.
        """
        self.check_files()
        try:
            ctx = ssl.create_default_context(cafile=self.ca or None)
            if self.cert:
                ctx.load_cert_chain(self.cert, self.key or None, self.key_password or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"the TLS files could not be loaded: {exc}") from None
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx
