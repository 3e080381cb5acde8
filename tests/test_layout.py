"""The package layout is the pipeline: every import points downstream along
data -> autoencoder -> evaluation -> diffusion, the shared foundations import no stage, and
only the commands that train (the CLI, the demo and `diffusability`) import a trainer
(README, "Architecture")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ldm_vae"
# rank of each top-level part; a module may import parts of its own rank or lower
RANKS = {"errors": 0, "config": 0, "files": 0, "hub": 0, "run": 1, "data": 2, "autoencoder": 3, "evaluation": 4,
         "diffusion": 5, "cli": 6, "demo": 6, "diffusability": 6, "__init__": 6, "__main__": 6}
TRAINERS = {"ldm_vae.autoencoder.train", "ldm_vae.diffusion.train"}


def _module_name(path: Path) -> str:
    return ".".join(("ldm_vae", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Absolute names of the ldm_vae modules (or packages) that `path` imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ldm_vae"):
                # `from . import x` / `from .pkg import mod`: the imported names may be modules
                out |= {f"{target}.{a.name}" if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(
                    ".py").is_file() else target for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ldm_vae")}
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_point_downstream_and_only_the_training_commands_import_trainers():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20
    wrong = []
    for path in modules:
        name = _module_name(path)
        own = RANKS[_part(name)]
        for target in _imports(path):
            if target != "ldm_vae" and RANKS[_part(target)] > own:  # the root: only __version__
                wrong.append(f"{name} imports {target} (upstream of it)")
            if target in TRAINERS and _part(name) not in ("cli", "demo", "diffusability") and name not in TRAINERS:
                wrong.append(f"{name} imports the trainer {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_reads_files_next_to_the_source_tree():
    """Package data is read with importlib.resources; `Path(__file__)` climbing out of the
    package breaks wheel installs."""
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "__file__).resolve().parent.parent" in p.read_text() or "parents[1]" in p.read_text()]
    assert not offenders, offenders
