"""The signed channel document: parse/verify, refusals, the publisher tool, and the
whole pull path (channel + bundle) over a real loopback server."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from bundle_helpers import encode, head, manifest_doc, payload_members, write_tar
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_fault_server import FaultServer, Route

from edge_runtime.bundle.reader import inspect_bundle
from edge_runtime.bundle.signing import load_private_key, load_trusted_keys, sign_document
from edge_runtime.config.model import Limits
from edge_runtime.errors import IncompatibleError, ManifestError, SignatureError
from edge_runtime.update.channel import Channel, ChannelEntry, build_channel, parse_channel
from edge_runtime.update.transport import HttpFetcher

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
BASE = "https://updates.example.com/fleet/stable/channel.json"
SHA = "ab" * 32


def doc(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "schema": 1,
        "sequence": 7,
        "expires": "2026-03-02T00:00:00Z",
        "models": {
            "face": {"version": 3, "url": "bundles/face-3.bundle", "sha256": SHA, "size": 1234},
            "ocr": {"version": 12, "url": "https://cdn.example.net/ocr-12.bundle", "sha256": "cd" * 32, "size": 99},
        },
    }
    out.update(overrides)
    return out


@pytest.fixture()
def trusted(keys: dict[str, Path]) -> dict[str, Ed25519PublicKey]:
    return load_trusted_keys(keys["trust_dir"])


def signed(keys: dict[str, Path], document: dict[str, Any] | bytes, *signers: str) -> tuple[bytes, bytes]:
    data = document if isinstance(document, bytes) else encode(document)
    return data, sign_document(data, [load_private_key(keys[s]) for s in signers or ("a",)])


def parse(
    data: bytes, sig: bytes, trusted: dict[str, Ed25519PublicKey], *, threshold: int = 1, min_sequence: int = 0,
    now: datetime = NOW,
) -> Channel:
    return parse_channel(data, sig, trusted=trusted, threshold=threshold, now=now, min_sequence=min_sequence,
                         base_url=BASE)


def test_good_channel_resolves_relative_urls(keys: dict[str, Path], trusted: dict[str, Ed25519PublicKey]) -> None:
    channel = parse(*signed(keys, doc()), trusted)
    assert channel.sequence == 7
    assert channel.expires == datetime(2026, 3, 2, tzinfo=timezone.utc)
    assert channel.entries["face"] == ChannelEntry(
        3, "https://updates.example.com/fleet/stable/bundles/face-3.bundle", SHA, 1234
    )
    assert channel.entries["ocr"].url == "https://cdn.example.net/ocr-12.bundle"
    with pytest.raises(TypeError):
        channel.entries["x"] = channel.entries["face"]  # type: ignore[index]


def test_expired_channel_is_refused(keys: dict[str, Path], trusted: dict[str, Ed25519PublicKey]) -> None:
    data, sig = signed(keys, doc(expires="2026-03-01T12:00:00Z"))  # == now: already expired
    with pytest.raises(IncompatibleError, match=r"expired at 2026-03-01T12:00:00Z.*\(replayed\?\)"):
        parse(data, sig, trusted)
    assert parse(data, sig, trusted, now=NOW - timedelta(seconds=1)).sequence == 7


def test_replayed_lower_sequence_is_refused(keys: dict[str, Path], trusted: dict[str, Ed25519PublicKey]) -> None:
    data, sig = signed(keys, doc(sequence=7))
    with pytest.raises(IncompatibleError, match="sequence 7 is below 8"):
        parse(data, sig, trusted, min_sequence=8)
    assert parse(data, sig, trusted, min_sequence=7).sequence == 7  # polling the same document again is fine


@pytest.mark.parametrize(
    ("signers", "threshold", "tamper", "message"),
    [
        (("evil",), 1, False, "0 valid trusted signature.*untrusted key"),
        (("a",), 2, False, "1 valid trusted signature.*2 required"),
        (("a",), 1, True, "does not match the signed content"),
    ],
    ids=["untrusted", "below-threshold", "tampered"],
)
def test_bad_signatures_are_refused(
    keys: dict[str, Path], trusted: dict[str, Ed25519PublicKey], signers: tuple[str, ...], threshold: int,
    tamper: bool, message: str,
) -> None:
    data, sig = signed(keys, doc(), *signers)
    if tamper:
        data = data.replace(b'"sequence":7', b'"sequence":9')
    with pytest.raises(SignatureError, match=message):
        parse(data, sig, trusted, threshold=threshold)


def test_threshold_met_by_two_keys(keys: dict[str, Path], trusted: dict[str, Ed25519PublicKey]) -> None:
    assert parse(*signed(keys, doc(), "a", "b"), trusted, threshold=2).sequence == 7


def _models(**face: Any) -> dict[str, Any]:
    models = copy.deepcopy(doc()["models"])
    models["face"].update(face)
    return {"models": models}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"extra": 1}, "channel.extra is not a known key"),
        (_models(mirror="x"), r"channel.models\['face'\].mirror is not a known key"),
        ({"schema": 2}, "channel.schema 2 is not supported"),
        ({"sequence": -1}, "channel.sequence must be an integer"),
        ({"sequence": True}, "channel.sequence must be an integer"),
        ({"sequence": 2**60}, "channel.sequence must be an integer"),
        ({"expires": "tomorrow"}, "channel.expires 'tomorrow' is not an ISO-8601"),
        ({"expires": "2026-03-02T00:00:00"}, "has no UTC offset"),
        ({"models": []}, "channel.models must be an object"),
        ({"models": {"../etc": doc()["models"]["face"]}}, "channel.models name '../etc' must match"),
        (_models(sha256=SHA.upper()), r"\.sha256 must be 64 lowercase hex"),
        (_models(size=0), r"\.size must be an integer in \[1,"),
        (_models(version=0), r"\.version must be an integer in \[1,"),
        (_models(version="3"), r"\.version must be an integer"),
        (_models(url="file:///etc/shadow"), r"\.url must be http\(s\) or relative, not file:"),
        (_models(url="a b.bundle"), r"\.url must be 1 to 2048 printable"),
        (_models(url=""), r"\.url must be 1 to 2048"),
        ({"models": {"face": {"version": 1}}}, r"channel.models\['face'\].url is required"),
    ],
)
def test_malformed_channels_are_refused(
    keys: dict[str, Path], trusted: dict[str, Ed25519PublicKey], overrides: dict[str, Any], message: str
) -> None:
    document = doc()
    document.update(overrides)
    with pytest.raises(ManifestError, match=message):
        parse(*signed(keys, document), trusted)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"schema": 1, "schema": 1, "sequence": 1, "expires": "2030-01-01T00:00:00Z", "models": {}}',
         "repeats the key 'schema'"),
        (b"\xff\xfe not json", "not valid UTF-8"),
        (b"[1, 2]", "channel must be an object"),
    ],
)
def test_undecodable_channels_are_refused(
    keys: dict[str, Path], trusted: dict[str, Ed25519PublicKey], data: bytes, message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        parse(*signed(keys, data), trusted)


def test_build_channel_round_trips(keys: dict[str, Path], trusted: dict[str, Ed25519PublicKey]) -> None:
    entries = {"face": ChannelEntry(3, "face-3.bundle", SHA, 1234)}
    data = build_channel(entries, 8, NOW + timedelta(hours=1))
    assert data == build_channel(dict(entries), 8, NOW + timedelta(hours=1))  # canonical: same input, same bytes
    channel = parse(*signed(keys, data), trusted, min_sequence=8)
    assert channel.entries["face"].url == "https://updates.example.com/fleet/stable/face-3.bundle"
    with pytest.raises(ManifestError, match="must be absolute"):
        build_channel(entries, 8, NOW, base_url_relative_ok=False)
    with pytest.raises(ManifestError, match="sha256"):
        build_channel({"face": ChannelEntry(3, "f.bundle", "nope", 1)}, 8, NOW)


def _bundle(path: Path, keys: dict[str, Path], name: str, version: int) -> Path:
    payload = {"model.onnx": f"model {name} {version}".encode() * 100, "labels.txt": b"a\nb\n"}
    manifest = encode(manifest_doc(payload, name=name, version=version))
    return write_tar(path, head(manifest, [load_private_key(keys["a"])]) + payload_members(payload))


def _make_channel(*args: str | Path | int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_channel.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_publisher_tool_and_the_pull_path(
    keys: dict[str, Path], trusted: dict[str, Ed25519PublicKey], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    face = _bundle(src / "face-3.bundle", keys, "face", 3)
    ocr = _bundle(src / "ocr-12.bundle", keys, "ocr", 12)
    out = tmp_path / "pub"
    done = _make_channel("--key", keys["a"], "--key", keys["b"], "--sequence", 5, "--expires-in-hours", 2,
                         "--out", out, face, ocr)
    assert done.returncode == 0, done.stderr
    assert "sequence 5" in done.stdout and "2 signature(s)" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["channel.json", "channel.json.sig", "face-3.bundle",
                                                     "ocr-12.bundle"]
    data = (out / "channel.json").read_bytes()
    assert json.loads(data)["models"]["face"]["url"] == "face-3.bundle"  # relative: DIR can live anywhere

    # A device: fetch the channel over HTTP, verify it, then fetch and check the bundle it names.
    routes = {f"/stable/{p.name}": Route(body=p.read_bytes()) for p in out.iterdir()}
    with FaultServer(routes) as srv:
        fetcher = HttpFetcher(connect_timeout=2, read_timeout=2, deadline=10, retries=0, backoff_max=0,
                              ca_file=None, allow_http=True)
        channel_url = srv.url("/stable/channel.json")
        channel = parse_channel(fetcher.fetch_bytes(channel_url, 65536),
                                fetcher.fetch_bytes(channel_url + ".sig", 65536),
                                trusted=trusted, threshold=2, now=datetime.now(timezone.utc), min_sequence=5,
                                base_url=channel_url)
        entry = channel.entries["face"]
        assert entry.url == srv.url("/stable/face-3.bundle") and entry.version == 3
        got = fetcher.fetch_to_file(entry.url, tmp_path / "dl.bundle", max_bytes=1 << 20,
                                    expected_size=entry.size, expected_sha256=entry.sha256)
    assert hashlib.sha256(got.read_bytes()).hexdigest() == hashlib.sha256(face.read_bytes()).hexdigest()
    assert inspect_bundle(got, Limits()).manifest().version == 3
    assert timedelta(hours=1.9) < channel.expires - datetime.now(timezone.utc) < timedelta(hours=2)

    # Publishing again needs a higher sequence; a different file under a published name is refused.
    again = _make_channel("--key", keys["a"], "--sequence", 5, "--expires-in-hours", 2, "--out", out, face)
    assert again.returncode == 1 and "must be above the published sequence 5" in again.stderr
    other = _bundle(tmp_path / "face-3.bundle", keys, "face", 4)
    clash = _make_channel("--key", keys["a"], "--sequence", 6, "--expires-in-hours", 2, "--out", out, other)
    assert clash.returncode == 1 and "refusing to overwrite" in clash.stderr
    assert json.loads((out / "channel.json").read_bytes())["sequence"] == 5  # nothing published


def test_publisher_tool_refuses_two_bundles_for_one_model(keys: dict[str, Path], tmp_path: Path) -> None:
    one = _bundle(tmp_path / "face-3.bundle", keys, "face", 3)
    two = _bundle(tmp_path / "face-4.bundle", keys, "face", 4)
    done = _make_channel("--key", keys["a"], "--sequence", 1, "--expires-in-hours", 1, "--out", tmp_path / "o",
                         one, two)
    assert done.returncode == 1 and "a second bundle for model 'face'" in done.stderr
    assert not (tmp_path / "o").exists()
