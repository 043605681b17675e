"""benchmarks/vs_reference.py's argument handling: it skips cleanly without the authors' checkout and names
the problem (and the fix) for a bad one, before any model is built. The interop itself is tested in
test_loop.py (LOOPUS_REFERENCE_REPO)."""

from __future__ import annotations

import importlib.util
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from loopus_jax.errors import LoopusError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "vs_reference.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling _common
    try:
        spec = importlib.util.spec_from_file_location("vs_reference", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_without_reference_repo_the_script_exits_0_with_the_skip_message(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped: --reference-repo not given" in r.stdout and "REFERENCE_REPO=" in r.stdout
    assert not out.exists()  # nothing measured, nothing written


def test_nonexistent_reference_repo_is_one_clear_error(bench, tmp_path, capsys):
    missing = tmp_path / "no_such_checkout"
    assert bench.main(["--reference-repo", str(missing), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --reference-repo {missing}: no such directory") and "git clone" in err
    assert "\n" not in err and not (tmp_path / "r.json").exists()


def test_a_directory_without_their_models_package_is_rejected(bench, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    assert bench.main(["--reference-repo", str(tmp_path)]) == 2
    assert "models/modeling_lds.py not found" in capsys.readouterr().err


def test_bad_phase_names_are_rejected(bench, capsys):
    assert bench.main(["--phases", "forward,speed"]) == 2
    assert "unknown phase(s) ['speed']" in capsys.readouterr().err


def test_reference_python_must_exist_and_import_torch(bench, tmp_path):
    with pytest.raises(LoopusError, match="not an executable"):
        bench.check_python(str(tmp_path / "nope" / "python"))
    fake = tmp_path / "python"  # an executable that fails the import probe like a python without torch would
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(LoopusError, match="cannot import torch.*No module named torch.*pip install torch"):
        bench.check_python(str(fake))
