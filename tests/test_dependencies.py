"""requirements*.txt and pyproject.toml agree: tested pins on Python 3.11, the same ranges on >= 3.12, no known-broken pair."""

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PY311, PY312 = {"python_version": "3.11"}, {"python_version": "3.12"}
# (package versions) seen failing together: jax 0.11.2 + flax 0.12.8 fails at `from flax import nnx`.
KNOWN_BROKEN = [{"jax": "0.11.2", "flax": "0.12.8"}]
KNOWN_WORKING_312 = [{"jax": "0.11.2", "flax": "0.12.10"}, {"jax": "0.12.0.1", "flax": "0.12.12"}]


def _active(lines: list[str], env: dict) -> dict[str, Requirement]:
    """The requirements that apply under `env`, by normalized name (at most one line per package)."""
    active = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            name = canonicalize_name(req.name)
            assert name not in active, f"{name} listed twice for {env}"
            active[name] = req
    return active


def _requirements(file: str, env: dict) -> dict[str, Requirement]:
    return _active((ROOT / file).read_text().splitlines(), env)


def _pyproject(env: dict, extra: str | None = None) -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return _active(project["optional-dependencies"][extra] if extra else project["dependencies"], env)


def _assert_pinned_inside(pins: dict[str, Requirement], ranges: dict[str, Requirement]) -> None:
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{name} is not pinned: {pin}"
        assert ranges[name].specifier.contains(spec.version), f"{name}=={spec.version} outside {ranges[name]}"


def test_python_311_pins_are_exact_and_inside_pyproject_ranges():
    pins, ranges = _requirements("requirements.txt", PY311), _pyproject(PY311)
    assert pins.keys() == ranges.keys()
    _assert_pinned_inside(pins, ranges)


@pytest.mark.parametrize("env", [PY311, PY312], ids=["py311", "py312"])
@pytest.mark.parametrize("extra", ["serve", "eval", "dev"])
def test_extras_files_pin_inside_pyproject_extras(extra, env):
    """The optional requirements files pin on every Python; dev's file adds tools pyproject's extra leaves out."""
    pins, ranges = _requirements(f"requirements-{extra}.txt", env), _pyproject(env, extra)
    if extra == "dev":
        pins = {name: pin for name, pin in pins.items() if name in ranges}
    else:
        assert pins.keys() == ranges.keys()
    _assert_pinned_inside(pins, ranges)


def test_python_312_lines_repeat_pyproject_ranges():
    lines, ranges = _requirements("requirements.txt", PY312), _pyproject(PY312)
    assert {n: r.specifier for n, r in lines.items()} == {n: r.specifier for n, r in ranges.items()}


@pytest.mark.parametrize("env", [PY311, PY312], ids=["py311", "py312"])
def test_ranges_exclude_known_broken_pairs_and_admit_tested_ones(env):
    for source in (_requirements("requirements.txt", env), _pyproject(env)):
        def admits(pair):
            return all(source[name].specifier.contains(version) for name, version in pair.items())
        assert not any(admits(pair) for pair in KNOWN_BROKEN)
        if env is PY312:
            assert all(admits(pair) for pair in KNOWN_WORKING_312)


@pytest.mark.parametrize("env", [PY311, PY312], ids=["py311", "py312"])
def test_tpu_plan_extra_follows_the_jax_requirement(env):
    (tpu,) = _requirements("requirements-tpu-plan.txt", env).values()
    assert tpu.extras == {"tpu"}
    assert tpu.specifier == _requirements("requirements.txt", env)["jax"].specifier
