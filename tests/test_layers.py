"""The code's layers (docs/design.md): who may import whom, no import circles, and the extension points
(registries with lazy entries, the Prior protocol) that keep the extensions out of the base."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("util", "motionblur", "guided_diffusion", "bkse", "latent_diffusion", "consistency_models", "runner")
EXTENSIONS = ("bkse", "latent_diffusion", "consistency_models")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """Our modules that `name` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs or [base]  # `from pkg import submodule` imports the submodule
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {n: imports_of(n, p, modules()) for n, p in modules().items()}


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_base_layer_imports_nothing_of_ours_but_itself():
    for name, deps in GRAPH.items():
        if top(name) == "util":
            assert {top(d) for d in deps} <= {"util"}, (name, deps)
        if top(name) == "motionblur":
            assert {top(d) for d in deps} <= {"motionblur"}, (name, deps)


def test_the_extensions_are_never_imported_by_the_core():
    for name, deps in GRAPH.items():
        if top(name) in ("util", "motionblur", "guided_diffusion"):
            assert not {d for d in deps if top(d) in EXTENSIONS + ("runner",)}, (name, deps)
        if top(name) in EXTENSIONS:  # and not by each other
            assert {top(d) for d in deps} <= {"util", "motionblur", "guided_diffusion", top(name)}, (name, deps)
        if top(name) == "runner":  # the driver layer: anything but the commands
            assert "dcdp" not in deps, (name, deps)


def test_no_import_circles():
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in GRAPH[n]:
            if state.get(m) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n, [n])


def test_lazy_registry_entries_are_imported_only_when_used():
    code = ("import sys; import guided_diffusion.measurements as m, guided_diffusion.priors as p; "
            "assert 'nonlinear_blur' in m.__OPERATORS__ and 'consistency' in p.PRIORS; "
            "assert not [k for k in sys.modules if k.split('.')[0] in ('bkse', 'latent_diffusion', 'consistency_models')]; "
            "cls = m.__OPERATORS__['nonlinear_blur']; assert cls.__module__ == 'bkse.operator' and 'bkse.operator' in sys.modules; "
            "assert p.PRIORS['latent'].__module__ == 'latent_diffusion.prior'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_registry_refuses_a_second_class_under_a_taken_name_and_lists_valid_names():
    from util.registry import Registry

    reg = Registry("widget", lazy={"later": "tests.test_layers:Later"})
    reg.register("first")(type("First", (), {}))
    with pytest.raises(NameError, match="widget 'first' is already registered"):
        reg.register("first")(type("Other", (), {}))
    with pytest.raises(NameError, match="widget 'later' is already registered"):
        reg.register("later")(type("NotLater", (), {}))
    assert reg["later"] is Later and Later.name == "later"
    with pytest.raises(ValueError, match="unknown widget 'nope'; valid names: first, later"):
        reg.build("nope", {})
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) size for widget 'later'; valid parameters: colour"):
        reg.build("later", {"size": 3})
    assert reg.build("later", {"colour": "red"}).colour == "red"


class Later:
    def __init__(self, colour="blue"):
        self.colour = colour


@pytest.mark.parametrize("kind", ["pixel", "latent", "consistency"])
def test_every_prior_implements_the_protocol(kind):
    from guided_diffusion.priors import PRIORS, Prior
    from util.schema import Key

    cls = PRIORS[kind]
    for member in ("from_config", "init", "levels", "purify", "nfe", "describe", "to_image"):  # space: per instance
        assert hasattr(cls, member), (kind, member)
    assert isinstance(cls.OPTIONS, dict) and all(isinstance(v, Key) for v in cls.OPTIONS.values())
    assert set(Prior.__annotations__) >= {"OPTIONS", "space", "to_image"}


def test_every_prior_option_is_a_purification_key():
    from guided_diffusion.config import CORE_PURIFICATION_SCHEMA, purification_schema
    from guided_diffusion.priors import PRIORS

    schema = purification_schema()
    for kind in PRIORS:
        for key, spec in PRIORS[kind].OPTIONS.items():
            assert key not in CORE_PURIFICATION_SCHEMA and schema[key] is spec
