"""The declared dependencies cover what the code imports, transitively, without the dev extras.

The suite runs on the dev install, which pulled ``packaging`` in and hid that a plain install gave
a worker that died at start (kombu's Redis transport imports it; only ``kombu[redis]`` brings it).
This reads pyproject.toml and the installed distributions' metadata: every third-party module
that cio_celery's own modules import (and that kombu's Redis transport imports) must come from
the runtime requirements' closure, and each extra must bring what its integration imports.
The real thing, bare virtualenvs delivering an event, is scripts/install_test.sh, run by CI.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cio_celery"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Modules that belong to an extra (or to the user's test run), with the extra that brings them.
EXTRA_OF = {
    "contrib/django": "django",
    "contrib/flask.py": "flask",
    "contrib/prometheus.py": "prometheus",
    "testing/pytest_plugin.py": None,  # a pytest plugin: loaded by pytest, which the user runs
}


def closure(requirements: Iterable[str]) -> set[str]:
    """Every distribution the requirements pull in, extras and markers applied (this interpreter)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        for raw in metadata.requires(req.name) or []:
            sub = Requirement(raw)
            env = default_environment()
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in (req.extras or {""})):
                todo.append(sub)
    return names


def module_level(tree: ast.Module) -> Iterable[ast.stmt]:
    """Statements run at import (the module's body, and the bodies of its top-level try/if), not
    the lazy imports inside functions (``from django.db import transaction`` in delay_on_commit)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.Try):
            todo += node.body
        elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            todo += node.body + node.orelse


def third_party_imports(files: Iterable[Path]) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found: set[str] = set()
    for path in files:
        for node in module_level(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            found |= {t for t in tops if t not in stdlib and t not in ("cio_celery", "__future__")}
    return found


def distributions_of(modules: Iterable[str]) -> dict[str, set[str]]:
    providers = metadata.packages_distributions()
    return {m: {canonicalize_name(d) for d in providers.get(m, [])} for m in modules}


def part_of(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE).as_posix()
    for prefix in EXTRA_OF:
        if rel.startswith(prefix):
            return prefix
    return ""


def test_celery_is_required_with_its_redis_extra() -> None:
    [celery] = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "celery"]
    assert "redis" in celery.extras
    runtime = closure(PROJECT["dependencies"])
    assert {"packaging", "redis", "kombu"} <= runtime  # what kombu's Redis transport imports


def test_every_import_of_the_package_comes_from_the_runtime_requirements() -> None:
    runtime = closure(PROJECT["dependencies"])
    core = [p for p in PACKAGE.rglob("*.py") if part_of(p) == ""]
    # kombu's Redis transport is what every worker and every .delay() loads.
    import kombu.transport.redis as redis_transport

    modules = third_party_imports([*core, Path(redis_transport.__file__)])
    missing = {m: d for m, d in distributions_of(modules).items() if not d & runtime}
    assert missing == {}, f"imported but not brought by a plain `pip install cio-celery`: {missing}"


@pytest.mark.parametrize(("part", "extra"), [(k, v) for k, v in EXTRA_OF.items() if v])
def test_each_extra_brings_what_its_integration_imports(part: str, extra: str) -> None:
    available = closure([*PROJECT["dependencies"], *PROJECT["optional-dependencies"][extra]])
    files = [p for p in PACKAGE.rglob("*.py") if part_of(p) == part]
    assert files
    missing = {m: d for m, d in distributions_of(third_party_imports(files)).items() if not d & available}
    assert missing == {}, f"cio-celery[{extra}] lacks {missing}"
