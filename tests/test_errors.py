"""Errors carry fields, and each boundary words or maps them by type, never by their text.

ConfigError's key and problem are worded for the config file, a command argument
or a runtime setting; the serving errors are not CacheErrors, and a real API
server answers each by its type (404 / 503 / 500); event kinds are one typed set
that mypy checks at every ``emit``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from numpy.typing import NDArray
from test_api_server import call, connect, json_infer_body, models, ppocr_tensor, start  # noqa: F401 (fixture)

from edge_runtime.commands.parse import Command
from edge_runtime.config.model import Config
from edge_runtime.config.typed_toml import build
from edge_runtime.errors import (
    CacheError,
    CommandError,
    ConfigError,
    EdgeRuntimeError,
    ModelNotLoadedError,
    ModelNotServedError,
    ServingError,
)
from edge_runtime.runtime.loaded_model import LoadedModel
from edge_runtime.runtime.service import InferenceService
from edge_runtime.telemetry.events import EVENT_KINDS, EventBus
from edge_runtime.telemetry.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
PPOCR = "ppocr-cls"


# --------------------------------------------------------------------------- ConfigError: fields, worded per noun


def test_config_error_keeps_key_and_problem_and_words_them_for_each_noun() -> None:
    with pytest.raises(ConfigError) as caught:
        build(Config, {"api": {"max_concurrency": "four"}})
    e = caught.value
    assert (e.key, e.problem) == ("api.max_concurrency", "must be an integer")
    assert str(e) == "config key 'api.max_concurrency' must be an integer"
    assert e.worded("argument") == "argument 'api.max_concurrency' must be an integer"
    with pytest.raises(ConfigError) as caught:
        build(Config, {"api": {"listen_to": "x"}})
    assert caught.value.key == "api.listen_to"
    assert caught.value.worded("setting") == "unknown setting 'api.listen_to'"
    with pytest.raises(ConfigError) as caught:
        build(Config, {"api": {"max_concurrency": 0}})
    assert caught.value.form == "check" and caught.value.problem.startswith("must be between")
    assert caught.value.worded("argument").startswith("argument 'api.max_concurrency': must be between")


def test_checks_across_keys_name_their_key_as_a_field() -> None:
    with pytest.raises(ConfigError) as caught:
        build(Config, {"mqtt": {"signed_commands": True}})
    assert caught.value.key == "mqtt.operator_keys_dir"
    assert str(caught.value) == "config key 'mqtt.operator_keys_dir' is required when mqtt.signed_commands is true"
    with pytest.raises(ConfigError) as caught:
        build(Config, {"pipelines": [{"model": "m", "source": {"type": "folder"}}]})
    assert caught.value.key == "pipelines[0].source.path"
    assert str(caught.value) == "config key 'pipelines[0].source.path' is required for type 'folder'"


def test_a_config_error_without_a_key_is_its_problem_whatever_the_noun() -> None:
    e = ConfigError("config.toml: not UTF-8")
    assert e.key is None and str(e) == e.worded("argument") == "config.toml: not UTF-8"
    assert ConfigError("a\n  b", key="k").worded("setting") == "setting 'k' a b"  # one line, like one_line()


def test_a_config_key_named_config_key_is_not_rewritten() -> None:
    """The old text patch replaced every "config key" in the message, the key's own name included."""
    e = ConfigError("must be a string", key="labels.config key")
    assert e.worded("argument") == "argument 'labels.config key' must be a string"


def test_command_arguments_and_settings_are_worded_by_their_boundary(tmp_path: Path) -> None:
    from edge_runtime.commands.handlers import _args, _PinArgs
    from edge_runtime.commands.runtime_settings import _check_setting

    command = Command(id="c1", verb="pin", args={"model": "m", "version": "two"}, ts=0.0)
    with pytest.raises(CommandError, match=r"^argument 'args\.version' must be an integer$") as caught:
        _args(_PinArgs, command)
    assert isinstance(caught.value.__cause__, ConfigError) and caught.value.__cause__.key == "args.version"
    with pytest.raises(CommandError, match=r"^setting 'mqtt\.results' must be true or false$"):
        _check_setting("mqtt.results", 1)


# --------------------------------------------------------------------------- serving errors are their own types


def test_serving_errors_are_not_cache_errors_and_carry_the_model() -> None:
    served = ModelNotServedError("nope", ("face", "ppocr-cls"))
    loaded = ModelNotLoadedError("face")
    for e in (served, loaded):
        assert isinstance(e, ServingError) and isinstance(e, EdgeRuntimeError) and not isinstance(e, CacheError)
    assert served.model == "nope" and served.serving == ("face", "ppocr-cls")
    assert str(served) == "model 'nope' is not served here (serving: face, ppocr-cls)"
    assert loaded.model == "face" and str(loaded) == "model 'face' is not loaded"


def test_the_service_raises_each_serving_error_where_it_arises() -> None:
    service = InferenceService(Metrics())
    service.add_slot("empty")
    with pytest.raises(ModelNotServedError) as not_served:
        service.predict_bytes("nope", b"")
    assert not_served.value.serving == ("empty",)
    with pytest.raises(ModelNotLoadedError) as not_loaded:
        service.predict_bytes("empty", b"")
    assert not_loaded.value.model == "empty"


class _FaultyService(InferenceService):
    """Raises ``fault`` from the inference, after the handler found the model serving (a fault injected)."""

    def __init__(self, fault: EdgeRuntimeError) -> None:
        super().__init__(Metrics())
        self.fault = fault

    def infer(self, name: str, feeds: Mapping[str, NDArray[Any]]) -> tuple[int, dict[str, NDArray[Any]]]:
        raise self.fault


@pytest.mark.parametrize(("fault", "status", "retry"), [
    # the slot was emptied between the handler's look and the inference (the daemon is stopping)
    (ModelNotLoadedError(PPOCR), 503, True),
    # a corrupt cache is the device's fault, not "no such model" (was a 404 while CacheError meant both)
    (CacheError("state.json: state file is corrupt (not JSON)"), 500, False),
    (ModelNotServedError(PPOCR, ()), 404, False),
])
def test_a_real_api_server_maps_errors_by_type(models: dict[str, LoadedModel], fault: EdgeRuntimeError,  # noqa: F811
                                               status: int, retry: bool) -> None:
    service = _FaultyService(fault)
    service.add_slot(PPOCR).swap(models[PPOCR])
    with start(service) as server:
        reply = call(connect(server), "POST", f"/v2/models/{PPOCR}/infer", json_infer_body(ppocr_tensor()),
                     {"Content-Type": "application/json"})
    assert reply.status == status and reply.error() == fault.one_line()
    assert ("Retry-After" in reply.headers) is retry


def test_a_real_api_server_answers_unknown_404_and_not_loaded_503() -> None:
    service = InferenceService(Metrics())
    service.add_slot("empty")
    with start(service) as server:
        conn = connect(server)
        unknown = call(conn, "POST", "/v2/models/nope/infer", b"{}", {"Content-Type": "application/json"})
        assert unknown.status == 404 and unknown.error() == "model 'nope' is not served here (serving: empty)"
        empty = call(conn, "GET", "/v2/models/empty")
        assert empty.status == 503 and empty.headers["Retry-After"] == "1"
        assert empty.error() == "model 'empty' is not loaded yet"


# --------------------------------------------------------------------------- event kinds: one typed set


def test_every_kind_the_package_emits_is_an_event_kind(tmp_path: Path) -> None:
    bus = EventBus(tmp_path / "events.jsonl")
    for kind in sorted(EVENT_KINDS):
        assert bus.emit(kind)["kind"] == kind  # type: ignore[arg-type]  # str from the frozenset
    assert {"gate_failed", "update_failed", "rolled_back", "worker_stalled", "operator_rollback"} <= EVENT_KINDS


def test_mypy_rejects_a_misspelt_event_kind(tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text("from edge_runtime.telemetry.events import EventBus\n\n"
                       'EventBus().emit("update_failed", model="m")\n'
                       'EventBus().emit("updte_failed", model="m")\n')
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
         "--cache-dir", str(tmp_path / "mypy-cache"), str(snippet)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "MYPYPATH": str(REPO)})
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, done.stdout
    assert errors[0].startswith("snippet.py:4:") and "updte_failed" in errors[0] and "[arg-type]" in errors[0]

