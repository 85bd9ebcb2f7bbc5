"""`fleet rollout --target` on devices that take updates from a TUF repository: real daemons, a real
mosquitto, a repository built with tuf.api.metadata on a loopback HTTP server."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from cli_helpers import cli
from daemon_helpers import Serve, pack_onnx, wait_for, write_config
from http_fault_server import FaultServer
from mqtt_broker import Broker, Collector
from tuf_helpers import TufRepo

from edge_runtime.bundle.manifest import Gates

Zoo = Callable[[str], Path]
DEVICES = ("tuf-a", "tuf-b")


def test_rollout_by_target_installs_what_the_repository_resolves(tmp_path: Path, keys: dict[str, Path],
                                                                 zoo: Zoo) -> None:
    with Broker(tmp_path / "broker") as broker, FaultServer({}) as server:
        repo = TufRepo(server)
        repo.publish()  # nothing yet: the devices' first poll finds nothing to install
        trust = tmp_path / "device-trust"
        shutil.copytree(keys["trust_dir"], trust)
        (trust / "root.json").write_bytes(repo.bootstrap_root())
        devices = []
        watcher = Collector(broker, "edge/+/status", client_id="status-watch")
        try:
            for name in DEVICES:
                extra = (f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\ngroups = ["lab"]\n'
                         "reconnect_min_seconds = 0.05\n"
                         f'[ota]\nrepository_url = "{repo.url}"\nallow_http = true\nretries = 0\n'
                         "poll_seconds = 86400.0\n"  # only the fleet command updates, not the poller
                         '[activation]\nprobation_inferences = 0\nprobation_seconds = 0.0\n')
                config, state, port = write_config(tmp_path / name, trust, extra=extra, top=f'device_id = "{name}"\n')
                cli("models", "install", pack_onnx(tmp_path / "v1.bundle", zoo("ppocr_cls"), 1, keys["a"], tmp_path,
                                                   gates=Gates()), "--config", config)
                devices.append(Serve(config, state, port).start())

            def online() -> bool:
                states = {m.topic.split("/")[1]: json.loads(m.payload)["state"] for m in watcher.on("edge/")}
                return all(states.get(d) == "online" for d in DEVICES)

            wait_for(online, 60, "both devices online")
            repo.add_bundle(pack_onnx(tmp_path / "v2.bundle", zoo("ppocr_cls"), 2, keys["a"], tmp_path,
                                      gates=Gates()))
            repo.publish()
            operator = tmp_path / "operator.toml"
            operator.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n')
            proc = cli("fleet", "rollout", "--target", "models/ppocr-cls.bundle", "--group", "lab", "--waves",
                       "1,100%", "--timeout", "60", "--config", operator, check=False, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            out = proc.stdout.splitlines()
            assert out[0].startswith("wave 1 tuf-a: ok: ppocr-cls v2 active"), out
            assert out[1].startswith("wave 2 tuf-b: ok: ppocr-cls v2 active"), out
            assert all(d.served_version() == 2 for d in devices)
            again = cli("fleet", "rollout", "--target", "models/ppocr-cls.bundle", "--group", "lab", "--timeout",
                        "60", "--config", operator, check=False, timeout=120)
            assert again.returncode == 0, again.stdout + again.stderr  # already there: ok, nothing downloaded
            mixed = cli("fleet", "rollout", "--target", "models/ppocr-cls.bundle", "--sha256", "0" * 64, "--group",
                        "lab", "--config", operator, check=False)
            assert mixed.returncode != 0 and "hashes" in mixed.stderr
        finally:
            watcher.close()
            for serve in devices:
                assert serve.terminate() == 0
