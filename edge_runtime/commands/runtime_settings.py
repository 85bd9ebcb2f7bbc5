"""The settings a fleet ``config`` command may change while the daemon runs.

:class:`RuntimeSettings` holds them, thread-safe; readers (the telemetry loop,
the results publisher, the OTA poller) call :meth:`RuntimeSettings.get` each
time, so a change applies from the next read. Each setting is checked by the
same rules as the config-file key of the same name.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any, Literal, overload

from edge_runtime.config.model import Config, MqttConfig, OtaConfig
from edge_runtime.config.typed_toml import build
from edge_runtime.errors import CommandError, ConfigError

__all__ = ["LOG_LEVELS", "RuntimeSettings"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FloatSetting = Literal["mqtt.telemetry_seconds", "mqtt.results_max_per_second", "ota.poll_seconds"]
# Setting -> the config dataclass and field whose type and range checks it reuses.
_CONFIG_SETTINGS: dict[str, tuple[type[Any], str]] = {
    "mqtt.telemetry_seconds": (MqttConfig, "telemetry_seconds"),
    "mqtt.results": (MqttConfig, "results"),
    "mqtt.results_max_per_second": (MqttConfig, "results_max_per_second"),
    "ota.poll_seconds": (OtaConfig, "poll_seconds"),
}


class RuntimeSettings:
    """The settings the ``config`` command may change at run time; thread-safe.

    ``mqtt.telemetry_seconds``, ``mqtt.results``, ``mqtt.results_max_per_second``
    and ``ota.poll_seconds`` are checked exactly like the config file's keys
    of the same name; ``log_level`` is one of :data:`LOG_LEVELS`. Readers call
    :meth:`get` each time they need a value, so a change applies from then on.
    """

    def __init__(self, values: Mapping[str, object] | None = None) -> None:
        """Start from the config defaults (and INFO), overridden by ``values``.

        Raises CommandError: an unknown setting or a bad value (named).
        """
        self._values: dict[str, bool | float | str] = {**_config_values(Config()), "log_level": "INFO"}
        self._lock = threading.Lock()
        if values:
            self.update(values)

    @classmethod
    def from_config(cls, config: Config) -> RuntimeSettings:
        """The settings as ``config`` has them; ``log_level`` from the root logger's level."""
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        return cls({**_config_values(config), "log_level": level if level in LOG_LEVELS else "INFO"})

    @overload
    def get(self, key: FloatSetting) -> float: ...
    @overload
    def get(self, key: Literal["mqtt.results"]) -> bool: ...
    @overload
    def get(self, key: Literal["log_level"]) -> str: ...
    def get(self, key: str) -> bool | float | str:
        """The current value of ``key`` (KeyError for an unknown key: a programming error)."""
        with self._lock:
            return self._values[key]

    def snapshot(self) -> dict[str, bool | float | str]:
        """Every setting and its current value."""
        with self._lock:
            return dict(self._values)

    def update(self, changes: Mapping[str, object]) -> dict[str, bool | float | str]:
        """Check every change, then apply them all together; return the values applied.

        Raises:
            CommandError: an unknown setting or a bad value (named); nothing is applied.
        """
        checked = {key: _check_setting(key, value) for key, value in changes.items()}
        with self._lock:
            self._values.update(checked)
        return checked


def _config_values(config: Config) -> dict[str, bool | float | str]:
    return {key: getattr(getattr(config, key.split(".")[0]), attr) for key, (_, attr) in _CONFIG_SETTINGS.items()}


def _check_setting(key: str, value: object) -> bool | float | str:
    if key == "log_level":
        if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
            raise CommandError(f"setting 'log_level' must be one of {', '.join(LOG_LEVELS)}")
        return value.upper()
    if key not in _CONFIG_SETTINGS:
        known = ", ".join(sorted([*_CONFIG_SETTINGS, "log_level"]))
        raise CommandError(f"unknown setting {key[:64]!r} (settable: {known})")
    cls, attr = _CONFIG_SETTINGS[key]
    try:
        checked: bool | float | str = getattr(build(cls, {attr: value}, where=key.split(".")[0]), attr)
    except ConfigError as e:
        raise CommandError(e.worded("setting")) from e  # the config file's checks, about a setting
    return checked
