"""Imports run one way: no module of `distill_jax/` imports a module of a higher layer.

The layers are the numbered list in docs/architecture.md ("Layers"), read from there so the
documented picture is the checked one. Every import counts, lazy ones inside functions
included; the modules are parsed with `ast`, never imported (no JAX, fast).
"""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "distill_jax")
DOC = os.path.join(ROOT, "docs", "architecture.md")

# Known imports against the order: (importer, imported module) -> why, and what would fix it.
# It may only shrink: an entry that no longer breaks the order fails the test below.
ALLOWED = {
    # config.validate checks config.log.writers against the metric writers' registry
    # (train/metrics.py, which the optional trackers extend). Fix: the writers' registry and
    # its check move below config, or validate asks for them through a hook (issue 28).
    ("distill_jax.config", "distill_jax.train.metrics"),
}


def read_layers(doc: str = DOC) -> dict[str, int]:
  """{part: layer number} from the doc's `N. NAME  part, part, ...` lines under "## Layers";
  a part is a top-level module or package of distill_jax (`distill_jax` is the root)."""
  text = open(doc).read()
  section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
  layers = {}
  for number, parts in re.findall(r"^ {4}(\d+)\. +\S+ +(.+)$", section, flags=re.M):
    for part in parts.split(","):
      layers[part.strip()] = int(number)
  assert layers, f"{doc}: no numbered layer lines under '## Layers'"
  return layers


def module_names() -> dict[str, str]:
  """{dotted module name: file path} for every .py file of the package."""
  names = {}
  for directory, _, files in os.walk(PACKAGE):
    for file in files:
      if file.endswith(".py"):
        path = os.path.join(directory, file)
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return names


def imports(name: str, path: str, known: set[str]) -> set[str]:
  """The distill_jax modules that `name` (at `path`) imports, at any depth of its code.
  `from A import B` is module A.B when that is a module, else A."""
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative: resolved against this module's package.
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([node.module] if node.module else []))
      found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                   for a in node.names)
  return {m for m in found if m == "distill_jax" or m.startswith("distill_jax.")}


def part(module: str) -> str:
  """The layer list's name for a module: its top-level module or package under distill_jax."""
  return module.split(".")[1] if "." in module else module


def edges() -> dict[tuple[str, str], tuple[int, int]]:
  """{(importer, imported): (importer's layer, imported's layer)} over the whole package."""
  layers, names = read_layers(), module_names()
  unplaced = sorted({part(n) for n in names} - set(layers))
  assert not unplaced, (f"{unplaced} belong to no layer: give each one in docs/architecture.md's "
                        f"'## Layers' list (known parts: {sorted(layers)})")
  return {(name, target): (layers[part(name)], layers[part(target)])
          for name, path in names.items() for target in imports(name, path, set(names))}


def test_no_module_imports_a_higher_layer():
  upward = sorted(f"{a} (layer {la}) imports {b} (layer {lb})"
                  for (a, b), (la, lb) in edges().items() if lb > la and (a, b) not in ALLOWED)
  assert not upward, ("imports against docs/architecture.md's layers (move the function to "
                      "the layer that may import both, or move the import down):\n  "
                      + "\n  ".join(upward))


def test_the_allowlist_only_shrinks():
  found = edges()
  stale = sorted(f"{a} -> {b}" for a, b in ALLOWED
                 if (a, b) not in found or found[a, b][1] <= found[a, b][0])
  assert not stale, f"no longer against the layers, remove from ALLOWED: {stale}"


def test_losses_see_outputs_not_models():
  found = [f"{a} imports {b}" for a, b in edges()
           if part(a) == "losses" and part(b) == "models"]
  assert not found, f"loss terms see Outputs, never a model module: {found}"


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
  """The reader itself: an import inside a function and a relative one are found."""
  source = tmp_path / "m.py"
  source.write_text("import os\n"
                    "def f():\n"
                    "  from distill_jax.train import loop\n"
                    "  from ..data import text\n"
                    "  from . import console\n")
  known = {"distill_jax.train.loop", "distill_jax.data.text", "distill_jax.train.console"}
  assert imports("distill_jax.train.x", str(source), known) == known
  assert part("distill_jax.train.loop") == "train" and part("distill_jax") == "distill_jax"


def test_the_step_imports_no_task():
  """The pure step takes its task from every caller: it imports the task interface alone, so
  no data pipeline (tfds, grain) comes with it."""
  names = module_names()
  found = imports("distill_jax.train.step", names["distill_jax.train.step"], set(names))
  assert {m for m in found if m.startswith("distill_jax.tasks")} == {"distill_jax.tasks.base"}
