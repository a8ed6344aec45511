"""The declared and CI-tested versions (uxnet_kernels/versions.py) agree with pyproject.toml, the README table,
scripts/setup.sh and `uxnet info`, and info classifies versions correctly."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from uxnet import cli
from uxnet_kernels import versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_pyproject_declares_the_minimum_versions():
    pyproject = _read("pyproject.toml")
    assert f'requires-python = ">={versions.MINIMUM["python"]}"' in pyproject
    assert f'"torch>={versions.MINIMUM["torch"]}"' in pyproject
    assert f'"triton>={versions.MINIMUM["triton"]}"' in pyproject


def test_oldest_tested_stack_is_the_declared_minimum():
    for field in ("torch", "triton"):  # Python: torch's own floor, older than CI's Pythons, marked untested
        oldest = min(versions.parse(getattr(s, field)) for s in versions.CI_STACKS)
        assert oldest == versions.parse(versions.MINIMUM[field]), field


def test_readme_table_is_generated_from_versions():
    assert versions.table() in _read("README.md"), "regenerate with: python uxnet_kernels/versions.py table"


def test_matrix_command_lists_every_stack():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "uxnet_kernels", "versions.py"), "matrix"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert [line.split()[0] for line in out] == [s.name for s in versions.CI_STACKS]
    assert all(len(line.split()) == 5 for line in out)


def test_matrix_tests_exist():
    for path in versions.MATRIX_TESTS:
        full = os.path.join(ROOT, path)
        is_test_folder = os.path.isdir(full) and any(n.startswith("test_") for n in os.listdir(full))
        assert os.path.isfile(full) or is_test_folder, path


def test_setup_script_installs_the_current_stack():
    setup = _read("scripts", "setup.sh")
    assert "uxnet_kernels/versions.py get current torch" in setup
    assert "uxnet_kernels/versions.py get current triton" in setup


@pytest.mark.parametrize("field,version,want", [
    ("torch", "2.11.0+cu130", "tested in CI"),
    ("torch", "2.13.0", "tested in CI"),
    ("torch", "2.12.1", "inside the tested range"),
    ("torch", "2.14.1", "UNTESTED: newer"),
    ("torch", "2.6.0", "UNSUPPORTED: below the declared minimum 2.11"),
    ("triton", "3.6.0", "tested in CI"),
    ("triton", "3.8.0", "inside the tested range"),
    ("triton", "3.2.0", "UNSUPPORTED"),
    ("triton", None, "not installed"),
    ("python", "3.10.13", "UNTESTED: older than the tested range"),
    ("python", "3.9.18", "UNSUPPORTED"),
    ("python", "3.13.0", "UNTESTED: newer"),
])
def test_status_classifies_versions(field, version, want):
    assert versions.status(field, version).startswith(want)


def test_cuda_status():
    assert versions.cuda_status(None) == "CPU build of torch"
    assert versions.cuda_status("13.0").startswith("tested in CI on CPU; csrc/cuda compile-tested")
    assert versions.cuda_status("12.8") == "UNTESTED in CI"


def test_info_reports_version_support(capsys):
    assert cli.main(["info", "--json"]) == 0
    support = json.loads(capsys.readouterr().out)["version_support"]
    assert support["torch"] == versions.status("torch", torch.__version__)
    assert set(support) == {"python", "torch", "triton", "cuda"}
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"^  torch {re.escape(torch.__version__)}: ", text, re.M)
    assert re.search(r"^  triton \S+: ", text, re.M) and re.search(r"^  cuda \S+: ", text, re.M)
