"""Write the pip constraints for installing qframe beside the torch that is already installed.

    python requirements/constraints.py LOCK OUT    # LOCK: requirements/lock.txt, or - for none

OUT pins torch to the installed version; with a LOCK, also the packages torch requires to the
versions installed, and every other package of LOCK to its locked version. A CUDA build of torch pins its own triton and setuptools (torch 2.11:
triton 3.6.0, setuptools < 82); the lock's versions of those would make the install impossible or
break the torch the user keeps. Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys


def _name(requirement: str) -> str:
    """The normalised project name at the start of a requirement or lock line."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def torch_requirements() -> set[str]:
    """Names of the packages the installed torch requires (extras left out)."""
    return {_name(r) for r in metadata.requires("torch") or [] if not re.search(r"\bextra\s*==", r)}


def constraints(lock_lines: list[str]) -> tuple[list[str], list[str]]:
    """(constraint lines, one note per lock pin that yields to the installed torch)."""
    torch_version = _installed("torch")
    if torch_version is None:
        raise SystemExit("constraints.py: torch is not installed in this environment; install it first")
    # without a lock (make test-latest) pip may move them, within what torch itself requires
    kept = {name: version for name in sorted(torch_requirements()) if (version := _installed(name))} if lock_lines else {}
    lines, notes = [f"torch=={torch_version}"] + [f"{name}=={version}" for name, version in kept.items()], []
    for line in lock_lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = _name(line)
        if name == "torch":
            continue
        if name not in kept:
            lines.append(line)
        elif line.split("==", 1)[-1].strip() != kept[name]:
            notes.append(f"keeping {name} {kept[name]}, which torch {torch_version} was installed with "
                         f"(the lock has {line})")
    return lines, notes


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python requirements/constraints.py LOCK|- OUT", file=sys.stderr)
        return 2
    lock, out = argv
    lock_lines = [] if lock == "-" else open(lock, encoding="utf-8").read().splitlines()
    lines, notes = constraints(lock_lines)
    for note in notes:
        print(note)
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
