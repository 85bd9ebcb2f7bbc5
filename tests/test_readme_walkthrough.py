"""The README's commands, run as written through the real CLI: a README that does not work fails here.

The publisher walkthrough (pack spec -> golden -> pack -> verify --key-file) is taken from the README's
code blocks and run by bash in a directory laid out like a clone; then a device installs what it made.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cli_helpers import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BIN = Path(sys.executable).parent  # the venv's bin/: what `source .venv/bin/activate` puts on the PATH


def _block_after(heading: str, lang: str) -> str:
    section = README[README.index(heading):]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no {lang} block after {heading!r}"
    return match.group(1)


def _run_as_written(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ) | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_publisher_walkthrough_runs_as_written_and_a_device_installs_the_bundle(
        tmp_path: Path, zoo: Callable[[str], Path]) -> None:
    assert (BIN / "edge-runtime").exists(), "the suite runs from the venv that has the edge-runtime script"
    clone = tmp_path / "clone"
    models = clone / ".cache" / "models"
    models.mkdir(parents=True)
    for key in ("face_detection", "grace_hopper"):  # what ./tools/test.sh / demo.sh fetched there
        path = zoo(key)
        (models / path.name).symlink_to(path)
    work = clone / "face-bundle"
    work.mkdir()
    (work / "face.toml").write_text(_block_after("### Pack spec", "toml"))  # "the pack spec above saved as"

    script = _block_after("### From a model file to a verified bundle", "sh")
    assert "bundle golden" in script and "--key-file publisher.key.pub" in script
    proc = _run_as_written(script, clone)
    assert proc.returncode == 0, f"README walkthrough failed:\n{script}\n--- stderr:\n{proc.stderr}"
    assert re.search(r"wrote expected\.npz: .*classificators", proc.stdout), proc.stdout
    assert "OK face v3: signatures by" in proc.stdout, proc.stdout
    assert (work / "publisher.key").stat().st_mode & 0o077 == 0

    # A device that trusts the key installs it here, whatever this machine is: the golden case
    # made above passes the device's gate, no hardware tag or expiry is in the way.
    trust = tmp_path / "device" / "trusted-keys"
    trust.mkdir(parents=True)
    (trust / "publisher.key.pub").write_bytes((work / "publisher.key.pub").read_bytes())
    state = tmp_path / "device" / "state"
    out = cli("models", "install", work / "face-3.bundle", "--state-dir", state, "--trust-dir", trust)
    assert "installed face v3 (active; golden 1/1" in out.stdout, out.stdout

    # Without --key-file and without a trust dir (a publisher's machine), the error says what to give.
    bare = cli("bundle", "verify", work / "face-3.bundle", "--trust-dir", tmp_path / "none", check=False)
    assert bare.returncode == 1 and "--key-file KEY.pub" in bare.stderr, bare.stderr
    # A key that did not sign it is refused, not ignored.
    cli("bundle", "keygen", tmp_path / "other.key")
    wrong = cli("bundle", "verify", work / "face-3.bundle", "--key-file", tmp_path / "other.key.pub", check=False)
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: "), wrong.stderr


def test_golden_refuses_a_model_it_cannot_reproduce_from_one_input(tmp_path: Path,
                                                                   zoo: Callable[[str], Path]) -> None:
    # An image without declared preprocessing: the device could not turn it into the same tensor.
    out = cli("bundle", "golden", "--model", zoo("face_detection"), zoo("grace_hopper"), "-o", tmp_path / "g.npz",
              check=False)
    assert out.returncode == 1 and "preprocessing" in out.stderr, out.stderr
    assert not (tmp_path / "g.npz").exists()


def test_the_demo_keeps_its_files_where_the_readme_says(tmp_path: Path) -> None:
    paragraph = README[README.index("The demo keeps its files in"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    assert "`$XDG_DATA_HOME/edge-runtime/demo/`" in paragraph
    names = [n.rstrip("/") for n in re.findall(r"`([\w.-]+/?)`", paragraph)]
    assert {"publisher.key", "inbox", "state", "face.bundle"} <= set(names), names
    data = tmp_path / "xdg"
    out = cli("demo", "--listen", "127.0.0.1:0", "--exit-after", "1", env={"XDG_DATA_HOME": str(data)},
              timeout=300)
    demo = data / "edge-runtime" / "demo"
    assert str(demo) in out.stdout
    missing = [n for n in names if not (demo / n).exists() and not (demo / "state" / n).exists()]
    assert not missing, f"README says the demo keeps {missing}, not found under {demo}"


def _state_conflict_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'state_dir = "{tmp_path / "from-config"}"\ntrust_dir = "{tmp_path / "trust"}"\n')
    return config


def test_serve_refuses_a_state_dir_flag_that_contradicts_the_config(tmp_path: Path) -> None:
    config = _state_conflict_config(tmp_path)
    flag = tmp_path / "from-flag"
    for verb in (("serve", "--config", config), ("config", "check", config), ("models", "list", "--config", config)):
        out = cli(*verb, "--state-dir", flag, check=False, timeout=60)
        assert out.returncode == 1, (verb, out.stdout, out.stderr)
        line = out.stderr.strip().splitlines()[-1]
        assert line.startswith("error: --state-dir ") and str(flag) in line and str(tmp_path / "from-config") in line
    assert not flag.exists() and not (tmp_path / "from-config").exists(), "refused before touching either"
    # The same directory twice, or a config without state_dir, is no conflict.
    assert "no models installed" in cli("models", "list", "--config", config,
                                        "--state-dir", tmp_path / "from-config").stdout
    config.write_text(f'trust_dir = "{tmp_path / "trust"}"\n')
    assert cli("config", "check", config, "--state-dir", flag, "--json").stdout.count(str(flag)) == 1
