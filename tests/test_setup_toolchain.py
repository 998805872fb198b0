"""The build-toolchain check that `make setup` runs after installing (.ci/check_toolchain.py)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / ".ci" / "check_toolchain.py"


def run_check(pins: Path | None = None):
    args = [sys.executable, str(CHECK)] + (["--pins", str(pins)] if pins else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_this_venv_has_the_pinned_toolchain():
    proc = run_check()
    assert proc.returncode == 0, proc.stderr
    assert "setuptools==" in proc.stdout


def test_a_moved_toolchain_stops_setup_with_the_fix(tmp_path):
    import setuptools
    pins = tmp_path / "toolchain.txt"
    pins.write_text(f"setuptools=={setuptools.__version__}.post9\nwheel==0.45.1\n")
    proc = run_check(pins)
    assert proc.returncode == 1
    assert f"setuptools is {setuptools.__version__}, pinned {setuptools.__version__}.post9" in proc.stderr
    assert "make setup" in proc.stderr and ".ci/toolchain.txt" in proc.stderr


def test_setup_pins_the_toolchain_through_every_pip_call():
    """Every pip call of setup.sh runs with the toolchain as a constraint (torch would upgrade setuptools)."""
    setup = (REPO / ".ci" / "setup.sh").read_text()
    assert 'export PIP_CONSTRAINT="$PWD/.ci/toolchain.txt"' in setup
    before_first_pip = setup.split("pip install", 1)[0]
    assert "PIP_CONSTRAINT" in before_first_pip
    pins = dict(line.split("==") for line in (REPO / ".ci/toolchain.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    major = int(pins["setuptools"].split(".")[0])
    assert 77 <= major < 82, "torch 2.14.1 needs setuptools>=77.0.3; mmcv-full 1.7.2 needs pkg_resources (<82)"
