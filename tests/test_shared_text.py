"""Blocks that several method files share on purpose are identical text, and every file validates one way.

A method file is self-contained (a reader copies one file), so a few blocks are written in several files: the
class means, the cosine head, the InfLoRA-lineage schedules, the Gaussian replay of the classifier alignment.
Every top-level function or class defined under the same name in more than one file of methods/ must have the
same source in each, its docstring aside (a docstring cites its own file's official code); comments count.
The names that are each file's own by design are listed in OWN.
"""
import ast
import glob
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "methods", "*.py")) if not f.endswith("__init__.py"))
OWN = {"Config", "validate", "Adapter", "QKVAdapter", "OutAdapter", "Method"}  # one per file, different by design
SHARED = {"class_means", "CosineHead", "inflora_cosine", "epoch_cosine", "class_statistics", "gaussian_replay"}


def definitions(path: str) -> dict[str, str]:
    """{name: source without its docstring} of every top-level function and class of the file."""
    src = open(path).read()
    lines = src.splitlines()
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            keep = list(range(start, node.end_lineno + 1))
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                keep = [i for i in keep if not first.lineno <= i <= first.end_lineno]
            out[node.name] = "\n".join(lines[i - 1] for i in keep)
    return out


DEFS = {os.path.basename(f)[:-3]: definitions(f) for f in FILES}
BY_NAME = defaultdict(dict)
for _file, _defs in DEFS.items():
    for _name, _text in _defs.items():
        BY_NAME[_name][_file] = _text
COMMON = sorted(n for n, where in BY_NAME.items() if len(where) > 1 and n not in OWN)


def test_the_shared_blocks_are_shared():
    """The blocks named as shared on purpose are each in at least two files (a rename would escape the check)."""
    assert set(COMMON) >= SHARED, f"not in two files any more: {sorted(SHARED - set(COMMON))}"


@pytest.mark.parametrize("name", COMMON)
def test_a_block_in_several_files_is_the_same_text(name):
    where = BY_NAME[name]
    first, text = next(iter(where.items()))
    for f, other in where.items():
        assert other == text, f"{name} differs between methods/{first}.py and methods/{f}.py"


@pytest.mark.parametrize("file", sorted(DEFS))
def test_validation_is_one_rule_table(file):
    """Every method checks its options in `validate` through backbone.check_options, and nowhere else raises
    ValueError about an option."""
    src = DEFS[file].get("validate", "")
    assert "check_options(cfg, CHOICES," in src, f"methods/{file}.py: validate does not use check_options"
    assert "raise ValueError" not in src, f"methods/{file}.py: validate raises by itself"
