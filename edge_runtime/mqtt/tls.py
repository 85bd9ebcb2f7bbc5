"""Security set-up for the MQTT link: TLS context, broker password, connect-error text.

Kept apart from :mod:`edge_runtime.mqtt.link` so the link's state machine reads
on its own. Everything here is called before a connection is attempted, or
turns a foreign exception (``ssl``, ``socket``, paho) into one line for
``LinkError`` / ``MqttLink.last_error``.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

from edge_runtime._util.fsutil import CappedReadError, read_capped
from edge_runtime.config.model import MqttConfig
from edge_runtime.errors import ConfigError, LinkError

__all__ = [
    "MAX_PASSWORD_BYTES", "Secret", "build_ssl_context", "check_tls_config", "describe_connect_error", "read_password",
]

MAX_PASSWORD_BYTES = 4096


class Secret:
    """A string that never shows itself in ``repr``/``str`` (so not in logs or tracebacks)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself; hand it only to the wire."""
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__


def check_tls_config(config: MqttConfig) -> None:
    """Refuse TLS material without ``tls = true``: silently connecting in plaintext would leak the password.

    Raises:
        ConfigError: ``ca_file``/``cert_file``/``key_file`` set while ``tls`` is false.
    """
    if not config.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(config, key) is not None:
                raise ConfigError("is set but mqtt.tls is false (refusing plaintext)", key=f"mqtt.{key}")


def build_ssl_context(config: MqttConfig) -> ssl.SSLContext:
    """A client context: TLS >= 1.2, peer verified against ``ca_file`` (else the system store), hostname checked,
    and the client certificate + key loaded when configured (mTLS).

    Raises:
        LinkError: a CA, certificate or key file cannot be read or parsed.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname + CERT_REQUIRED by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    try:
        if config.ca_file is not None:
            what = f"mqtt.ca_file {config.ca_file}"
            context.load_verify_locations(cafile=str(config.ca_file))
        else:
            what = "the system CA store"
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if config.cert_file is not None and config.key_file is not None:
            what = f"mqtt.cert_file {config.cert_file} / mqtt.key_file {config.key_file}"
            context.load_cert_chain(str(config.cert_file), str(config.key_file))
    except (OSError, ssl.SSLError) as e:
        raise LinkError(f"TLS: cannot load {what}: {_reason(e)}") from e
    return context


def read_password(config: MqttConfig, credentials_dir: str | None) -> Secret | None:
    """The broker password: ``config.password_file``, else the systemd credential
    ``<credentials_dir>/<config.password_credential>`` when it exists and is not
    empty (the unit always loads it; an empty file means "no password"), else None.

    Read once, capped at :data:`MAX_PASSWORD_BYTES`, one trailing newline stripped.
    No message raised here ever contains the password.

    Raises:
        LinkError: the file cannot be read, too large, not UTF-8, or an empty password_file.
        ConfigError: the credential name is not a plain file name.
    """
    if config.password_file is not None:
        path = Path(config.password_file)
    else:
        name = config.password_credential
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"must be a plain file name, got {name!r}", key="mqtt.password_credential")
        directory = credentials_dir if credentials_dir is not None else os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return None
        path = Path(directory) / name
        if not path.exists():
            return None
    try:
        data = read_capped(path, MAX_PASSWORD_BYTES, follow_symlinks=True)
    except CappedReadError as e:
        raise LinkError(f"MQTT password {path}: larger than {e.limit} bytes") from e
    except OSError as e:
        raise LinkError(f"MQTT password {path}: cannot read: {e.strerror or type(e).__name__}") from e
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        if config.password_file is None:
            return None
        raise LinkError(f"MQTT password {path}: empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # `from None`: the UnicodeDecodeError holds the raw bytes, i.e. the password.
        raise LinkError(f"MQTT password {path}: not UTF-8") from None
    return Secret(text)


def describe_connect_error(error: BaseException, host: str, port: int, *, tls: bool) -> str:
    """One line for a failed TCP connect / TLS handshake, e.g.
    ``TLS to broker:8883: certificate verify failed: unable to get local issuer certificate``."""
    where = f"{host}:{port}"
    if tls and isinstance(error, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        # TCP was accepted, then the peer hung up on our ClientHello: a plaintext listener, usually.
        return f"TLS to {where}: handshake failed: {error.strerror or _reason(error)} (is the port plaintext?)"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS to {where}: certificate verify failed: {error.verify_message or _reason(error)}"
    if isinstance(error, ssl.CertificateError):  # hostname mismatch raised outside the handshake
        return f"TLS to {where}: certificate verify failed: {error}"
    if isinstance(error, ssl.SSLError):
        return f"TLS to {where}: {_reason(error)}"
    if isinstance(error, socket.gaierror):
        return f"connect to {where}: cannot resolve host: {error.strerror or error}"
    if isinstance(error, TimeoutError):
        return f"connect to {where}: timed out"
    if isinstance(error, ConnectionRefusedError):
        return f"connect to {where}: connection refused"
    if isinstance(error, OSError):
        return f"connect to {where}: {error.strerror or _reason(error)}"
    return f"connect to {where}: {type(error).__name__}: {_reason(error)}"


def _reason(error: BaseException) -> str:
    """The error's text on one line, without OpenSSL's ``(_ssl.c:1006)`` suffix."""
    text = " ".join(str(error).split())
    if isinstance(error, ssl.SSLError) and "(_ssl.c:" in text:
        text = text[: text.rfind("(_ssl.c:")].rstrip()
    return text or type(error).__name__
