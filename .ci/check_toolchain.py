"""Check that the venv's build toolchain is the one pinned in .ci/toolchain.txt (run by .ci/setup.sh).

Usage: python .ci/check_toolchain.py [--quiet] [--pins FILE]; exit 1 with the fix when anything moved.
"""
import importlib.metadata
import pathlib
import sys
import warnings

PINS = pathlib.Path(__file__).with_name("toolchain.txt")


def pinned_versions(path: pathlib.Path = PINS) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def main() -> int:
    quiet = "--quiet" in sys.argv
    pins_path = pathlib.Path(sys.argv[sys.argv.index("--pins") + 1]) if "--pins" in sys.argv else PINS
    pins = pinned_versions(pins_path)
    problems = []
    for name, want in pins.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = "missing"
        if have != want:
            problems.append(f"{name} is {have}, pinned {want}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pkg_resources  # noqa: F401  (mmcv-full 1.7.2's setup.py needs it)
    except ImportError:
        problems.append("setuptools no longer provides pkg_resources")
    if problems:
        if not quiet:
            print("[setup] the build toolchain moved: " + "; ".join(problems) + ".\n"
                  "  Something installed outside .ci/setup.sh (or a pip call without the constraints) changed it.\n"
                  "  Fix: .venv/bin/python -m pip install -c .ci/toolchain.txt -r .ci/toolchain.txt && make setup\n"
                  "  (or start over: rm -rf .venv && make setup)", file=sys.stderr)
        return 1
    if not quiet:
        print("[setup] build toolchain as pinned: " + ", ".join(f"{k}=={v}" for k, v in pins.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
