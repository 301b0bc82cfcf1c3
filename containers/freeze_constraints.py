"""Print ``constraints.txt``: exact versions of everything ``bids_fmristore[test]`` installs.

Run it in a working environment (the suite passes there), from the repository root::

    python containers/freeze_constraints.py > constraints.txt

It walks the installed distributions from the requirements in ``pyproject.toml`` (with the
``test`` and ``fast`` extras), evaluating environment markers for this interpreter: the pins
are ``pip freeze`` restricted to what the package needs. The images and ``.ci/run`` install
with ``pip install -c constraints.txt ...``.
"""

from __future__ import annotations

import platform
import sys
import tomllib
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("test", "fast")
#: The build backend of pyproject.toml, as pip's build isolation installed it when the lock was
#: made (it is not installed in the environment, so it cannot be read from there). Pins reach the
#: isolated build only through the PIP_CONSTRAINT variable, which the images set.
BUILD = {"setuptools": "84.2.1", "wheel": "0.48.0"}


def requirements(pyproject: Path = ROOT / "pyproject.toml",
                 extras: Iterable[str] = EXTRAS) -> list[Requirement]:
    """The package's dependencies and those of ``extras``, as declared in ``pyproject``."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    todo, done = list(extras), set()
    while todo:  # an extra may name others of this project: bids_fmristore[zarr]
        extra = todo.pop()
        if extra in done:
            continue
        done.add(extra)
        for line in project["optional-dependencies"][extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                todo += sorted(req.extras)
            else:
                lines.append(line)
    return [Requirement(line) for line in lines]


def closure(roots: Iterable[Requirement]) -> dict[str, str]:
    """``{project name: installed version}`` of ``roots`` and everything they require here.

    Raises
    ------
    PackageNotFoundError
        A required distribution is not installed (the environment does not work).
    """
    found: dict[str, tuple[str, str]] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(r.name, frozenset(r.extras)) for r in roots if r.marker is None or r.marker.evaluate()]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        dist = distribution(name)
        found[canonicalize_name(name)] = (dist.metadata["Name"], dist.version)
        for line in dist.requires or []:
            req = Requirement(line)
            markers = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(m) for m in markers):
                todo.append((req.name, frozenset(req.extras)))
    return dict(sorted(found.values(), key=lambda item: item[0].lower()))


def main() -> int:
    try:
        pins = closure(requirements())
    except PackageNotFoundError as exc:
        print(f"freeze_constraints: {exc} is required but not installed", file=sys.stderr)
        return 1
    print(f"# Exact versions of bids_fmristore[{','.join(EXTRAS)}]'s dependencies, from a working")
    print(f"# install (CPython {platform.python_version()}, {platform.system()} "
          f"{platform.machine()}).")
    print("# Regenerate: python containers/freeze_constraints.py > constraints.txt")
    print("# Installed by .ci/run, Dockerfile and Singularity.def with")
    print('#   pip install -c constraints.txt ".[test]"')
    print("# build backend (pip's isolated build sees it through PIP_CONSTRAINT only)")
    for name, version in BUILD.items():
        print(f"{name}=={version}")
    print("# runtime and test dependencies")
    for name, version in pins.items():
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
