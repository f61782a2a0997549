"""The code's shape: no import cycle, modules of a readable size, and what a tagging run loads."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import clip_decoder

PACKAGE = Path(clip_decoder.__file__).parent
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in it (module level, functions, TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from . import hf` names a module; `from .x import y` the module x
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return {module for module in found if module in modules and module != name}


def test_no_module_of_the_package_imports_itself_back_through_others():
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: imports(path, set(paths)) for name, path in paths.items()}
    state: dict[str, str] = {}  # name -> "open" while on the current path, "done" after

    def visit(name: str, trail: list[str]) -> None:  # trail: the modules that led here
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(target):], name, target]))
            if target not in state:
                visit(target, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert graph["clip_decoder.cli"] and graph["clip_decoder.training.methods"]  # the walk sees imports at all


def test_no_library_module_is_longer_than_a_reader_can_hold():
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text(encoding="utf-8").splitlines())
               for path in PACKAGE.rglob("*.py")}
    assert max(lengths.values()) > 100
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


TAGGING_RUN = """
import json, sys
from clip_decoder.cli import main
code = main(["predict", "--labels", "cat,dog,car", sys.argv[1]])
from clip_decoder.encoders.offline import MiniLMTextTower
print(json.dumps({"code": code, "modules": sorted(m for m in sys.modules if m.startswith(("clip_decoder", "transformers")))}))
"""


def test_predict_loads_no_training_code_and_no_text_tower_for_a_vocabulary_it_has_embedded(cat_photo, tmp_path):
    env = {**os.environ, "CLIP_DECODER_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", TAGGING_RUN, str(cat_photo)], capture_output=True, text=True,
                                env=env, timeout=300)
        lines = result.stdout.splitlines()
        runs.append({"scores": json.loads(lines[0])["scores"], **json.loads(lines[-1])})
    first, second = runs
    assert first["code"] == second["code"] == 0 and first["scores"] == second["scores"]  # identical scores
    assert not [m for m in first["modules"] + second["modules"] if m.startswith("clip_decoder.training")]
    assert "transformers" in first["modules"]  # the labels were new: the text tower ran
    assert "transformers" not in second["modules"]  # found on disk: neither transformers nor the text tower loaded
    assert len(list(tmp_path.glob("labels/*/*.safetensors"))) == 3
