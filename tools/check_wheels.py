"""Check that qvlsearch's default dependencies, and theirs, have wheels for every supported platform and Python.

`pip install --platform` evaluates the markers of the machine it runs on, not those of the target (pip issue
11664), so this resolves one level at a time itself: pip picks each requirement's wheel for the target with
`--no-deps` (reading only the wheel's metadata, not the wheel), and the markers of its Requires-Dist are evaluated
here for the target with `packaging.markers`. Each platform's result, and each requirement's wheel, is cached
under $XDG_CACHE_HOME/qvlsearch-wheels (or ~/.cache/qvlsearch-wheels) for a day, so that a changed dependency
asks pip about what changed only. Exit status 1 names what lacks a wheel.

    python tools/check_wheels.py [--pyproject PATH] [--max-age-hours 24]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
_LINUX = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
# name: (pip --platform tags, the marker variables of that platform); glibc 2.28+ and macOS 14+ are claimed
PLATFORMS: dict[str, tuple[list[str], dict[str, str]]] = {
    "macOS arm64": (["macosx_14_0_arm64"],
                    {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix",
                     "platform_machine": "arm64"}),
    "Linux aarch64": ([f"manylinux_2_{minor}_aarch64" for minor in range(28, 16, -1)] + ["manylinux2014_aarch64"],
                      {**_LINUX, "platform_machine": "aarch64"}),
    "Linux x86_64": ([f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)]
                     + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"],
                     {**_LINUX, "platform_machine": "x86_64"}),
    "Windows amd64": (["win_amd64"],
                      {"sys_platform": "win32", "platform_system": "Windows", "os_name": "nt",
                       "platform_machine": "AMD64"}),
}
CACHE_VERSION = 2


def environment(platform: str, python: str) -> dict[str, str]:
    """The marker variables of CPython `python` on `platform`."""
    return {**PLATFORMS[platform][1], "python_version": python, "python_full_version": f"{python}.0",
            "implementation_name": "cpython", "implementation_version": f"{python}.0",
            "platform_python_implementation": "CPython", "platform_release": "", "platform_version": "", "extra": ""}


def applies(requirement: Requirement, env: dict[str, str], extras: set[str]) -> bool:
    """Whether a Requires-Dist line is wanted on `env` by a package installed with `extras`."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**env, "extra": extra}) for extra in {"", *extras})


def default_dependencies(pyproject: Path) -> list[str]:
    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def pick_wheels(requirements: list[str], platform: str, python: str) -> dict[str, dict]:
    """{name: the report's metadata and wheel URL} of the wheels pip picks for `requirements` on the target,
    without their dependencies; a requirement without a wheel is absent."""
    if not requirements:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder, "report.json")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--dry-run",
                   "--ignore-installed", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
                   "--python-version", python, "--target", str(Path(folder, "target")), "--report", str(report)]
        for tag in PLATFORMS[platform][0]:
            command += ["--platform", tag]
        done = subprocess.run(command + requirements, capture_output=True, text=True)
        if done.returncode != 0:  # one of them has no wheel: ask for each alone to know which
            if len(requirements) == 1:
                return {}
            return {name: found for requirement in requirements
                    for name, found in pick_wheels([requirement], platform, python).items()}
        picked = json.loads(report.read_text())["install"]
    return {canonicalize_name(item["metadata"]["name"]): {"version": item["metadata"]["version"],
                                                          "wheel": item["download_info"]["url"].rsplit("/", 1)[-1],
                                                          "requires": item["metadata"].get("requires_dist", [])}
            for item in picked}


def cached_picks(requirements: list[str], platform: str, python: str, max_age_s: float) -> dict[str, dict]:
    """`pick_wheels`, each requirement's answer from the cache when it was asked less than `max_age_s` ago."""
    picked: dict[str, dict] = {}
    paths = {line: cache_path("pick", line, platform, python) for line in requirements}
    fresh = {line for line, path in paths.items() if path.exists() and time.time() - path.stat().st_mtime < max_age_s}
    for line in fresh:
        picked.update(json.loads(paths[line].read_text()))
    asked = [line for line in requirements if line not in fresh]
    found = pick_wheels(asked, platform, python)
    for line in asked:
        name = canonicalize_name(Requirement(line).name)
        answer = {name: found[name]} if name in found else {}
        write_cache(paths[line], answer)
        picked.update(answer)
    return picked


def resolve(dependencies: list[str], platform: str, python: str, max_age_s: float) -> dict:
    """The wheels of `dependencies` and of everything they need on the target, level by level: {"wheels": {name:
    wheel file}, "missing": [requirements with no wheel]}. Specifiers of one name are combined across parents."""
    env = environment(platform, python)
    specs: dict[str, SpecifierSet] = {}
    extras: dict[str, set[str]] = {}
    found: dict[str, dict] = {}
    missing: set[str] = set()

    def want(line: str, parent_extras: set[str]) -> None:
        requirement = Requirement(line)
        if not applies(requirement, env, parent_extras):
            return
        name = canonicalize_name(requirement.name)
        specs[name] = specs.get(name, SpecifierSet()) & requirement.specifier
        extras.setdefault(name, set()).update(requirement.extras)

    for line in dependencies:
        want(line, set())
    resolved_extras: dict[str, set[str]] = {}
    pending = set(specs)
    while pending:
        asked = {name: f"{name}[{','.join(sorted(extras[name]))}]{specs[name]}" for name in sorted(pending)}
        picked = cached_picks(list(asked.values()), platform, python, max_age_s)
        missing.update(name for name in asked if name not in picked)
        for name, item in picked.items():
            found[name], resolved_extras[name] = item, set(extras[name])
            for line in item["requires"]:
                want(line, extras[name])
        pending = {name for name in specs if name not in missing and (
            name not in found or Version(found[name]["version"]) not in specs[name]
            or not extras[name] <= resolved_extras[name])}
    missing_lines = [f"{name}{specs[name]}" for name in sorted(missing)]
    return {"wheels": {name: item["wheel"] for name, item in sorted(found.items())}, "missing": missing_lines}


def cache_path(*key: object) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, *key]).encode()).hexdigest()[:32]
    return Path(base, "qvlsearch-wheels", f"{digest}.json")


def write_cache(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))


def cached_resolve(dependencies: list[str], platform: str, python: str, max_age_s: float) -> dict:
    """`resolve`, from the cache when the same check ran less than `max_age_s` ago."""
    path = cache_path("platform", dependencies, platform, python)
    if path.exists() and time.time() - path.stat().st_mtime < max_age_s:
        return json.loads(path.read_text())
    result = resolve(dependencies, platform, python, max_age_s)
    write_cache(path, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    parser.add_argument("--max-age-hours", type=float, default=24.0, help="how long a cached result holds")
    args = parser.parse_args(argv)
    dependencies = default_dependencies(args.pyproject)
    targets = [(platform, python) for platform in PLATFORMS for python in PYTHONS]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: cached_resolve(dependencies, *t, args.max_age_hours * 3600), targets))
    failed = 0
    for (platform, python), result in zip(targets, results, strict=True):
        if result["missing"]:
            failed += 1
            print(f"{platform}, Python {python}: no wheel for {', '.join(result['missing'])}")
        else:
            print(f"{platform}, Python {python}: {len(result['wheels'])} wheels")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
