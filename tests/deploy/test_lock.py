"""constraints.txt: the versions a fresh install gets (scripts/lock.sh writes it). Every dependency the
dev extra pulls in is pinned there, at a version pyproject's range allows, and every install path
(scripts/install.sh, both Dockerfiles) goes through it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
TORCH_STACK = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            out[canonicalize_name(name)] = Version(version)
    return out


def dev_requirements() -> list[Requirement]:
    """pyproject's dependencies plus every extra the dev extra reaches (uembed[...] followed)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs, todo, seen = [Requirement(r) for r in project["dependencies"]], ["dev"], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, extras[extra]):
            if canonicalize_name(r.name) == "uembed":
                todo.extend(r.extras)
            else:
                reqs.append(r)
    return reqs


def test_every_dependency_is_pinned_within_its_range() -> None:
    pinned = pins()
    checked = 0
    for req in dev_requirements():
        name = canonicalize_name(req.name)
        if TORCH_STACK.match(name):
            assert name not in pinned, f"{name} is pinned by install.sh / the Dockerfiles, not the lock"
            continue
        assert name in pinned, f"{req} is not in constraints.txt: run scripts/lock.sh"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject's {req}"
        checked += 1
    assert checked >= 20


def test_lock_leaves_the_torch_stack_to_its_own_pins() -> None:
    assert not [n for n in pins() if TORCH_STACK.match(n)]


def test_every_install_path_uses_the_lock() -> None:
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert "-c constraints.txt" in install
    for flavor in ("cpu", "gpu"):
        text = (ROOT / "docker" / f"Dockerfile.{flavor}").read_text()
        copy = re.search(r"^COPY .*\bconstraints\.txt\b.*$", text, re.M)
        assert copy, f"Dockerfile.{flavor} does not copy constraints.txt"
        installs = [m.group(0) for m in re.finditer(r"pip install [^\n\\]*", text)]
        assert installs and all("-c constraints.txt" in i for i in installs), (flavor, installs)
        assert text.index(copy.group(0)) < text.index(installs[0])
    assert "constraints.txt" not in (ROOT / ".dockerignore").read_text().split()
