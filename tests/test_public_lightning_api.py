"""The package uses Lightning through its public API only: no private attribute of a Lightning object is read,
written, called or overridden anywhere in ldm/ (a `_name` of Lightning's can change in any release).

The scan is static (ast) and has three rules:
  1. `x._name` where `_name` is not a private name the package defines itself: someone else's private attribute
     (Lightning's `trainer._x`, `logger._experiment`, `self._trainer` on a LightningModule, torch's `_C`, ...);
     on receivers that are Lightning objects by name (trainer, logger, fit_loop, ...), any private attribute;
  2. `super()._name`: calling a parent's private method, which only a subclass of someone else's class needs;
  3. a class of the package that subclasses a Lightning class defines a private name that a Lightning class in its
     MRO also defines (overriding ModelCheckpoint._save_topk_checkpoint, clobbering LightningModule._trainer, ...);
plus `from lightning... import _name` and private Lightning modules.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap
from functools import cache
from pathlib import Path

import ldm

PACKAGE = Path(ldm.__file__).resolve().parent
# Receivers that are Lightning objects whatever the attribute: any private attribute on them is Lightning's.
LIGHTNING_RECEIVERS = {"trainer", "self.trainer", "pl_module.trainer", "logger", "fit_loop", "epoch_loop", "strategy",
                       "trainer.strategy", "trainer.fit_loop", "callback", "checkpoint_callback",
                       "trainer.checkpoint_callback", "optimizer", "opt", "lightning_optimizer"}


def _private(name: str) -> bool:
    # note: `_target_`-style names are Hydra config keys, not private attributes
    return name.startswith("_") and not name.startswith("__") and not name.endswith("_")


def defined_private_names(tree: ast.AST) -> set[str]:
    """Private names a source file defines: functions, classes, module or class variables, `self._x = ...`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        names.add(leaf.id)
                    elif isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) \
                            and leaf.value.id in ("self", "cls"):
                        names.add(leaf.attr)
    return {n for n in names if _private(n)}


def private_uses(source: str, own: set[str]) -> list[str]:
    """Rule 1, rule 2 and private imports in one source file; `own` are the package's own private names."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            receiver = ast.unparse(node.value)
            if receiver == "super()":
                found.append(f"line {node.lineno}: super().{node.attr}")
            elif node.attr not in own or receiver in LIGHTNING_RECEIVERS:
                found.append(f"line {node.lineno}: {receiver}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("lightning", "pytorch_lightning")):
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            found += [f"line {node.lineno}: import {a.name} from {node.module}" for a in node.names if _private(a.name)]
    return found


def package_sources() -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def own_private_names(sources: dict[Path, str]) -> set[str]:
    return set().union(*(defined_private_names(ast.parse(text)) for text in sources.values()))


@cache
def lightning_file_names(path: str) -> frozenset[str]:
    return frozenset(defined_private_names(ast.parse(Path(path).read_text())))


def lightning_clobbers(cls: type) -> list[str]:
    """Rule 3 for one class: its own private names that a Lightning class in its MRO defines as well."""
    try:
        mine = defined_private_names(ast.parse(textwrap.dedent(inspect.getsource(cls))))
    except (OSError, TypeError):
        return []
    theirs: set[str] = set()
    for base in cls.__mro__[1:]:
        if base.__module__.startswith(("lightning", "pytorch_lightning")):
            theirs |= lightning_file_names(inspect.getsourcefile(base))
            theirs |= {n for n in vars(base) if _private(n)}
    return sorted(mine & theirs)


def test_no_private_lightning_attribute_in_the_package():
    sources = package_sources()
    own = own_private_names(sources)
    problems = [f"{path.relative_to(PACKAGE.parent)} {use}" for path, text in sources.items()
                for use in private_uses(text, own)]
    assert not problems, "private attributes of other libraries used:\n" + "\n".join(problems)


def test_no_package_class_overrides_a_private_lightning_member():
    problems = []
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="ldm."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue  # an optional dependency (e.g. ldm.convert's) is missing; rule 1 still read its source
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and any(
                    b.__module__.startswith("lightning") for b in cls.__mro__[1:]):
                problems += [f"{cls.__module__}.{cls.__qualname__}.{name}" for name in lightning_clobbers(cls)]
    assert not problems, "private Lightning members overridden:\n" + "\n".join(problems)


def test_the_scan_finds_each_kind_of_private_use():
    """The checks above cannot pass by finding nothing: each of the patterns this package used to have is caught."""
    snippet = """
from lightning.fabric.utilities.types import _PATH
class C(ModelCheckpoint):
    def _save_topk_checkpoint(self, trainer, candidates):
        super()._save_topk_checkpoint(trainer, candidates)
def f(trainer, logger, optimizer, module):
    optimizer._on_before_step = lambda: None
    n = trainer.fit_loop.epoch_loop.batch_progress
    return logger._experiment, module._trainer, trainer._own_name
"""
    found = private_uses(snippet, own={"_save_topk_checkpoint", "_own_name"})
    text = "\n".join(found)
    for expected in ("import _PATH", "super()._save_topk_checkpoint", "optimizer._on_before_step",
                     "logger._experiment", "module._trainer", "trainer._own_name"):
        assert expected in text, (expected, found)
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Overrides(ModelCheckpoint):
        def _save_last_checkpoint(self, trainer, candidates):
            pass

    assert lightning_clobbers(Overrides) == ["_save_last_checkpoint"]

