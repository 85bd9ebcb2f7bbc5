"""Strict parsers (issue 9 §4): every number, path and JSON document from outside is read one way only.

The three reported holes go through the real entry points: the CLI on crafted, validly
signed bundles; the fetcher and a real ``serve`` against a loopback HTTP server sending
``Content-Length: ²``. The other places with the same pattern are one table.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from bundle_helpers import Member, encode, head, manifest_doc, payload_members, write_tar
from cli_helpers import Device, make_device
from daemon_helpers import Channel, Serve, pack_onnx, wait_for, write_config
from http_fault_server import FaultServer, Route

from edge_runtime.bundle.signing import load_private_key
from edge_runtime.errors import (
    CacheError,
    CommandError,
    ConfigError,
    EdgeRuntimeError,
    FetchError,
    InputError,
    ManifestError,
    SignatureError,
    UnsafeBundleError,
)
from edge_runtime.update.transport import HttpFetcher

Zoo = Callable[[str], Path]
LABELS = b"0\n180\n"


# --------------------------------------------------------------------------- bundles through the CLI


def _payload(zoo: Zoo, labels_name: str = "labels.txt") -> dict[str, bytes]:
    return {"model.onnx": zoo("ppocr_cls").read_bytes(), labels_name: LABELS}


def _pax_size_superscript(dev: Device, zoo: Zoo) -> Path:
    payload = _payload(zoo)
    members = head(encode(manifest_doc(payload, version=2)), [load_private_key(dev.keys["a"])])
    members[0] = Member("manifest.json", members[0].data, pax={"size": "²"})  # before the signature is read
    return write_tar(dev.root / "pax.bundle", members + payload_members(payload))


def _newline_member(dev: Device, zoo: Zoo) -> Path:
    payload = _payload(zoo, "labels.txt\n")
    doc = manifest_doc(payload, version=2, postprocess={"type": "classification", "labels": "labels.txt\n"})
    members = head(encode(doc), [load_private_key(dev.keys["a"])])
    return write_tar(dev.root / "newline.bundle", members + payload_members(payload))


def _duplicate_version(dev: Device, zoo: Zoo) -> Path:
    payload = _payload(zoo)
    signed = encode(manifest_doc(payload, version=2)).replace(b'"version":2', b'"version":2,"version":9')
    assert signed.count(b'"version"') == 2
    members = head(signed, [load_private_key(dev.keys["a"])])  # validly signed: the parser must refuse it
    return write_tar(dev.root / "dup.bundle", members + payload_members(payload))


BUNDLES: dict[str, tuple[Callable[[Device, Zoo], Path], str]] = {
    "pax size=²": (_pax_size_superscript, "bundle member 'manifest.json': pax size '²' is not a decimal number"),
    "member labels.txt\\n": (_newline_member, "file path 'labels.txt\\n' is not a safe relative path"),
    "duplicate key, signed": (_duplicate_version, "manifest repeats the key 'version'"),
}


@pytest.fixture()
def serving(tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> Device:
    """A device with a crafted ppocr-cls v1 installed and active, through the CLI."""
    dev = make_device(tmp_path, keys)
    payload = _payload(zoo)
    good = write_tar(dev.root / "v1.bundle", head(encode(manifest_doc(payload, version=1)),
                                                   [load_private_key(keys["a"])]) + payload_members(payload))
    dev.cli("models", "install", good)
    return dev


def _one_error_line(out: Any) -> str:
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("INFO: ")]  # LiteRT's own
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


@pytest.mark.parametrize("case", list(BUNDLES))
def test_hostile_signed_bundle_is_one_line_and_nothing_changes(serving: Device, zoo: Zoo, case: str) -> None:
    build, message = BUNDLES[case]
    bundle = build(serving, zoo)
    before = serving.tree()
    for verb in ("verify", "inspect") if case == "duplicate key, signed" else ("verify",):
        assert message in _one_error_line(serving.cli("bundle", verb, bundle, check=False))
    assert message in _one_error_line(serving.cli("models", "install", bundle, check=False))
    assert serving.tree() == before
    assert list((serving.state / "staging").iterdir()) == []
    assert [(m["name"], m["active"]) for m in serving.models()] == [("ppocr-cls", 1)]


# --------------------------------------------------------------------------- Content-Length: ² over real HTTP


@pytest.fixture()
def http_server() -> Iterator[FaultServer]:
    with FaultServer({}) as server:
        yield server


def test_fetcher_refuses_a_superscript_content_length(http_server: FaultServer, tmp_path: Path) -> None:
    http_server.routes["/b"] = Route(body=b"x" * 2, headers={"Content-Length": "²"})  # byte 0xB2 on the wire
    fetcher = HttpFetcher(connect_timeout=2, read_timeout=2, deadline=10, retries=2, backoff_max=0.1,
                          ca_file=None, allow_http=True, sleep=lambda s: None)
    dest = tmp_path / "b.bin"
    with pytest.raises(FetchError, match=r"Content-Length '²' is not a decimal number$") as info:
        fetcher.fetch_to_file(http_server.url("/b"), dest, max_bytes=100)
    assert "\n" not in str(info.value)
    assert len(http_server.seen("/b")) == 1  # refused, not retried
    with pytest.raises(FetchError, match="Content-Length '²'"):
        fetcher.fetch_bytes(http_server.url("/b"), 100)


OTA = """
[ota]
channel_url = "{url}"
allow_http = true
poll_seconds = 0.3
retries = 1
backoff_max_seconds = 0.1
"""


def test_ota_superscript_content_length_is_update_failed_and_polling_goes_on(
        http_server: FaultServer, tmp_path: Path, keys: dict[str, Path], zoo: Zoo) -> None:
    channel = Channel(http_server, keys["a"])
    bundle = pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path)
    channel.publish({"ppocr-cls": bundle}, Route(headers={"Content-Length": "²"}))
    config, state, port = write_config(tmp_path / "device", keys["trust_dir"], extra=OTA.format(url=channel.url))
    serve = Serve(config, state, port).start()
    try:
        failed = wait_for(lambda: serve.events("update_failed"), 60, "update_failed")[0]
        assert "Content-Length '²' is not a decimal number" in failed["reason"], failed
        assert "\n" not in failed["reason"]
        # The poller survived: the same bundle served properly is installed on a later poll.
        channel.publish({"ppocr-cls": bundle})
        wait_for(lambda: serve.served_version() == 1, 60, "v1 via OTA once the server behaves")
        assert "Traceback" not in serve.stderr(), serve.stderr()[-3000:]
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.kill9()


# --------------------------------------------------------------------------- every other place, one table


def _range_in_another_script(tmp: Path) -> None:
    """A 206 whose Content-Range has Arabic-Indic digits (which http.client's latin-1 cannot carry,
    but another transport could): a fault injected under the real Fetcher policy."""
    from edge_runtime.update.fetcher import Fetcher

    class Reply:
        status, reason = 206, "Partial Content"

        def header(self, name: str) -> str | None:
            return {"Content-Range": "bytes \u0663-\u0669/\u0661\u0660", "Content-Length": "7"}.get(name)

        def read1(self, size: int, timeout: float) -> bytes:
            return b""

        def close(self) -> None:
            pass

    class Transport(Fetcher):
        def _open(self, url: str, headers: Mapping[str, str], **kwargs: Any) -> Any:
            return Reply()

    dest = tmp / "part.bin"
    dest.write_bytes(b"abc")  # resumed from byte 3, which the reply writes in Arabic-Indic digits
    Transport(connect_timeout=1, read_timeout=1, deadline=5, retries=0, backoff_max=0, allow_http=True
              ).fetch_to_file("http://127.0.0.1:9/x", dest, max_bytes=100)


def _tar_reader(tmp: Path, pax: dict[str, str]) -> None:
    from edge_runtime.bundle.tar_stream import TarReader

    path = write_tar(tmp / "t.tar", [Member("labels.txt", LABELS, pax=pax)])
    with path.open("rb") as fh:
        TarReader(fh, path.stat().st_size).next()


def _pax_keyword_twice(tmp: Path) -> None:
    """tarfile writes a keyword once: overwrite the 19-byte comment record with a second 19-byte path record."""
    from edge_runtime.bundle.tar_stream import TarReader

    path = write_tar(tmp / "t.tar", [Member("x", LABELS, pax={"path": "labels.txt", "comment": "aaaaaaa"})])
    raw = path.read_bytes()
    assert raw.count(b"19 comment=aaaaaaa\n") == 1
    path.write_bytes(raw.replace(b"19 comment=aaaaaaa\n", b"19 path=evil.files\n"))  # pax data: no checksum
    with path.open("rb") as fh:
        TarReader(fh, path.stat().st_size).next()


def _signature_doc() -> None:
    from edge_runtime.bundle.signing import verify_threshold

    verify_threshold(b"m", b'{"signatures": [], "signatures": [{"keyid": "k", "sig": ""}]}', {}, 1)


def _inspect_signature(tmp: Path) -> None:
    from edge_runtime.bundle.reader import inspect_bundle
    from edge_runtime.config.model import Limits

    sig = b'{"signatures": [{"keyid": "a", "keyid": "b", "sig": ""}]}'
    inspect_bundle(write_tar(tmp / "b.tar", [Member("manifest.json", b"{}"), Member("manifest.sig", sig)]), Limits())


def _manifest(data: bytes) -> None:
    from edge_runtime.bundle.manifest_parse import parse_manifest

    parse_manifest(data)


def _nan_manifest() -> bytes:
    doc = manifest_doc({"model.onnx": b"m"}, preprocess={"scale": 1.0})
    return encode(doc).replace(b'"scale":1.0', b'"scale":NaN')


def _state(tmp: Path) -> object:
    from edge_runtime.cache.state import decode_state

    return decode_state(b'{"schema": 1, "boot_count": 0, "models": {}, "models": {"m": {}}}')


def _reply() -> None:
    from edge_runtime.commands.parse import Reply

    Reply.from_json(b'{"id": "c1", "ok": false, "ok": true, "message": "", "data": {}}')


def _api_body() -> None:
    from edge_runtime.api.codec import decode_infer_request

    decode_infer_request(b'{"inputs": [], "inputs": [{"name": "x"}]}', None, {}, ())


def _api_utf16() -> None:
    from edge_runtime.api.codec import decode_infer_request

    decode_infer_request('{"inputs": []}'.encode("utf-16"), None, {}, ())


def _config(tmp: Path, text: str) -> None:
    from edge_runtime.config.model import load_config

    path = tmp / "c.toml"
    path.write_text(text, encoding="utf-8")
    load_config(path)


def _read_link(tmp: Path) -> None:
    from edge_runtime.cache.layout import read_link

    (tmp / "3\n").mkdir()
    os.symlink("3\n", tmp / "current")
    read_link(tmp / "current")


def _requirement() -> None:
    from edge_runtime.bundle.requirements import parse_runtime_requirement

    parse_runtime_requirement(">=\u0663.0")


def _watchdog() -> None:
    from edge_runtime.telemetry.sdnotify import _watchdog_seconds

    assert _watchdog_seconds({"WATCHDOG_USEC": "²"}) is None  # no watchdog, rather than a crash at start
    assert _watchdog_seconds({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "¹"}) == 2.0


def _broker() -> None:
    from edge_runtime.cli.fleet_cmd import _broker as broker

    broker("broker:¹⁸⁸³")


def _bench_shape() -> None:
    from edge_runtime.cli.tools_cmd import _shape

    _shape("1,\u0663,48,192")


def _fleet_watch() -> None:
    from edge_runtime.fleet.client import classify
    from edge_runtime.mqtt.parts import Message

    shown = classify("edge", Message("edge/dev-1/status", b'{"state": "online", "state": "offline"}', 1, True))
    assert shown is not None and isinstance(shown.payload, str)  # the text it is, not one reading of two


# (id, action, exception and message pattern; None: it must not raise, and checks its own safe result)
PLACES: list[tuple[str, Callable[[Path], object], type[Exception] | None, str]] = [
    ("tar: pax size with a superscript", lambda t: _tar_reader(t, {"size": "²"}), UnsafeBundleError,
     r"^bundle member 'labels\.txt': pax size '²' is not a decimal number$"),
    ("tar: pax size with Arabic-Indic digits", lambda t: _tar_reader(t, {"size": "\u0666"}), UnsafeBundleError,
     r"pax size '\u0666' is not a decimal number"),
    ("tar: pax size with a sign", lambda t: _tar_reader(t, {"size": "+6"}), UnsafeBundleError,
     r"pax size '\+6' is not a decimal number"),
    ("tar: pax keyword twice", _pax_keyword_twice, UnsafeBundleError, r"pax keyword 'path' appears twice"),
    ("manifest: member path with a final newline", lambda t: _manifest(encode(manifest_doc({"m\n": b"x"}))),
     ManifestError, r"file path 'm\\n' is not a safe relative path"),
    ("manifest: NaN", lambda t: _manifest(_nan_manifest()), ManifestError, r"^manifest: NaN is not a JSON number$"),
    ("manifest: UTF-16", lambda t: _manifest(json.dumps(manifest_doc({"m": b"x"})).encode("utf-16")),
     ManifestError, r"^manifest is not valid UTF-8 \(byte 0\)$"),
    ("signature document: key twice", lambda t: _signature_doc(), SignatureError,
     r"^signature document repeats the key 'signatures'$"),
    ("bundle inspect: manifest.sig key twice", _inspect_signature, SignatureError,
     r"^manifest\.sig repeats the key 'keyid'$"),
    ("state.json: key twice", _state, CacheError,
     r"state file is corrupt \(state file repeats the key 'models'\)"),
    ("fleet reply: key twice", lambda t: _reply(), CommandError, r"^reply repeats the key 'ok'$"),
    ("fleet watch: key twice shown as text", lambda t: _fleet_watch(), None, ""),
    ("API body: key twice", lambda t: _api_body(), InputError, r"^request body repeats the key 'inputs'$"),
    ("API body: UTF-16", lambda t: _api_utf16(), InputError, r"^request body is not valid UTF-8"),
    ("HTTP: Content-Range in another script", _range_in_another_script, FetchError, r"invalid Content-Range"),
    ("config: api.listen port '²'", lambda t: _config(t, '[api]\nlisten = "127.0.0.1:²"\n'), ConfigError,
     r"api\.listen.*must be HOST:PORT"),
    ("config: device_id with a final newline", lambda t: _config(t, 'device_id = "dev\\n"\n'), ConfigError,
     r"device_id.*must match"),
    ("cache: current -> '3\\n'", _read_link, CacheError, r"target '3\\n' is not a bare version number"),
    ("manifest requires.runtime in another script", lambda t: _requirement(), ManifestError,
     r"requires\.runtime '>=\u0663\.0' must be"),
    ("systemd WATCHDOG_USEC='²'", lambda t: _watchdog(), None, ""),
    ("fleet --broker port '¹⁸⁸³'", lambda t: _broker(), argparse.ArgumentTypeError, "must be HOST:PORT"),
    ("bench --shape in another script", lambda t: _bench_shape(), argparse.ArgumentTypeError,
     "expected comma-separated integers"),
]


@pytest.mark.parametrize(("action", "exc", "pattern"), [p[1:] for p in PLACES], ids=[p[0] for p in PLACES])
def test_each_place_reads_strictly(tmp_path: Path, action: Callable[[Path], object], exc: type[Exception] | None,
                                   pattern: str) -> None:
    if exc is None:
        action(tmp_path)
        return
    with pytest.raises(exc, match=pattern) as info:
        action(tmp_path)
    assert type(info.value) is exc
    assert "\n" not in str(info.value)
    if isinstance(info.value, EdgeRuntimeError):
        assert info.value.one_line() == str(info.value)


# --------------------------------------------------------------------------- the shared helpers


@pytest.mark.parametrize("text", ["²", "\u0663", "+1", "-1", " 1", "1 ", "1_0", "", "0x1", "1e3", b"\xb2", "1\n"])
def test_parse_decimal_takes_ascii_digits_only(text: str | bytes) -> None:
    from edge_runtime._util.strict_text import parse_decimal

    with pytest.raises(InputError, match=r"^size .* is not a decimal number$"):
        parse_decimal(text, "size", max_digits=5, error=InputError)


def test_parse_decimal_values_and_digit_cap() -> None:
    from edge_runtime._util.strict_text import parse_decimal

    assert parse_decimal("007", "n", max_digits=3, error=InputError) == 7
    assert parse_decimal(b"65535", "n", max_digits=5, error=InputError) == 65535
    with pytest.raises(InputError, match=r"^n '123456' has more than 5 digits$"):
        parse_decimal("123456", "n", max_digits=5, error=InputError)


@pytest.mark.parametrize(("data", "kwargs", "pattern"), [
    (b'{"a": 1, "a": 2}', {}, r"^doc repeats the key 'a'$"),
    (b'{"a": {"b": 1, "b": 1}}', {}, r"^doc repeats the key 'b'$"),
    (b'[NaN]', {}, r"^doc: NaN is not a JSON number$"),
    (b'[-Infinity]', {}, r"^doc: -Infinity is not a JSON number$"),
    (b'[1e999]', {}, r"^doc: number '1e999' is out of range$"),
    (b'[123456789012345678901]', {}, r"^doc: integer with 21 digits is too large \(max 20\)$"),
    ('{"a": 1}'.encode("utf-16"), {}, r"^doc is not valid UTF-8 \(byte 0\)$"),
    (b"[" * 50 + b"]" * 50, {"max_depth": 32}, r"^doc is nested deeper than 32 levels$"),
    (b"[" * 100_000, {}, r"^doc is nested too deeply$"),
    (b'{"a": 1', {}, r"^doc is not valid JSON: Expecting ',' delimiter at line 1 column 8$"),
    (b"[1]", {"max_bytes": 2}, r"^doc is 3 bytes, over the 2-byte cap$"),
])
def test_load_json_refuses(data: bytes, kwargs: dict[str, Any], pattern: str) -> None:
    from edge_runtime._util.strict_text import load_json

    with pytest.raises(InputError, match=pattern):
        load_json(data, "doc", error=InputError, **kwargs)


def test_load_json_reads_plain_json_and_can_leave_numbers_to_the_caller() -> None:
    from edge_runtime._util.strict_text import load_json

    assert load_json(b'{"a": [1, 2.5, "x", null, true], "b": {"a": 1}}', "doc", error=InputError) == {
        "a": [1, 2.5, "x", None, True], "b": {"a": 1}}
    assert load_json('"[{"', "doc", error=InputError, max_depth=1) == "[{"  # brackets in strings never count
    assert load_json(b"[1e999]", "doc", error=InputError, finite_floats=False) == [float("inf")]
    with pytest.raises(InputError, match="NaN is not a JSON number"):  # NaN is never JSON
        load_json(b"[NaN]", "doc", error=InputError, finite_floats=False)


def test_commands_word_a_repeated_key_like_every_other_parser() -> None:
    """command_parse had its own copy of the loader (and said "command payload: command payload ...")."""
    from edge_runtime.commands.parse import parse_command

    with pytest.raises(CommandError, match=r"^command payload repeats the key 'ts'$"):
        parse_command(b'{"id": "c", "ts": 1, "ts": 2}', "ping", max_bytes=1000, max_depth=8)
