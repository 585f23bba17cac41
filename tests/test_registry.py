"""The registry: a re-run notebook cell (the same function defined again) replaces its entry;
another function under a taken name is refused, naming the one that holds it."""

import pytest

from distill_jax.common.registry import Registry

CELL = '''
@registry.register("scaled")
def scaled(x, *, scale={scale}):
  return scale * x
'''


def run_cell(registry, scale, module="__main__"):
  """Executes CELL as a notebook does: a fresh function object in module `module`."""
  namespace = {"__name__": module, "registry": registry}
  exec(CELL.format(scale=scale), namespace)  # noqa: S102  (the test's own source)
  return namespace["scaled"]


def test_rerunning_a_cell_replaces_the_registered_function():
  registry = Registry("loss")
  first = run_cell(registry, 2.0)
  assert registry.get("scaled")(3.0) == 6.0
  edited = run_cell(registry, 5.0)  # The user edits the cell and runs it again.
  assert edited is not first
  assert registry.get("scaled") is edited
  assert registry.get("scaled")(3.0) == 15.0
  assert registry.names() == ["scaled"]


def test_rerunning_a_class_definition_replaces_it():
  registry = Registry("launcher")
  classes = []
  for _ in range(2):
    namespace = {"__name__": "__main__", "registry": registry}
    exec("@registry.register('mine')\nclass Mine:\n  pass\n", namespace)  # noqa: S102
    classes.append(namespace["Mine"])
  assert classes[0] is not classes[1] and registry.get("mine") is classes[1]


def test_another_function_under_a_taken_name_is_refused():
  registry = Registry("loss")
  run_cell(registry, 2.0)

  def other(x):
    return x

  message = (r"loss 'scaled' is already registered \(by __main__\.scaled\); "
             r"pick another name\.")
  with pytest.raises(ValueError, match=message):
    registry.register("scaled")(other)
  # The same name in another module is another function, too.
  with pytest.raises(ValueError, match=message):
    run_cell(registry, 2.0, module="my_losses")
  assert registry.get("scaled")(1.0) == 2.0  # The first one stays.


def test_instances_are_never_taken_for_redefinitions():
  """Objects without a qualified name (a task instance) cannot be told apart: refused."""

  class Task:
    def __call__(self):
      return 0

  registry = Registry("task")
  registry.register("t")(Task())
  with pytest.raises(ValueError, match="already registered"):
    registry.register("t")(Task())
