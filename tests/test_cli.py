"""The `uxnet` console script: `uxnet info` reports versions, backends and the op -> backend mapping."""

import json
import subprocess
import sys

import pytest

from ops.samples import OP_TEST_MODULES
from uxnet import cli


def test_info_json_reports_backends(capsys):
    assert cli.main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"]
    assert set(report["backends_cpu"]["would_use"]) == set(OP_TEST_MODULES)  # every op family, each tested
    assert report["backends_cpu"]["backends"]["reference"]["available"] is True


def test_info_text_runs_as_console_module():
    result = subprocess.run([sys.executable, "-m", "uxnet.cli", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "dwconv3d" in result.stdout and "backends for cpu" in result.stdout
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("UXNet's UNETR 3x3x3 convolutions on cpu"))
    compiled = "compiled extension: loaded" in result.stdout
    assert ("Winograd" in line) == compiled and ("conv3d_3x3x3" in line)


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
