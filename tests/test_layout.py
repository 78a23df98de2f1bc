"""How the code is laid out, checked: imports run one way, and one list says which settings shape the weights."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from sharnn.checkpoint import Checkpoint, save_checkpoint
from sharnn.config import SHARNNConfig
from sharnn.errors import SharnnError
from sharnn.model import SHARNN
from sharnn.resume import resumed_model_config

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sharnn"


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports, anywhere in it (functions included)."""
    graph = {}
    for f in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        graph[f.stem] = deps
    return graph


def test_imports_run_one_way() -> None:
    graph = imports()
    order: list[str] = []  # a topological order exists exactly when there is no circle

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name not in order:
            for dep in sorted(graph.get(name, ())):
                visit(dep, (*path, name))
            order.append(name)

    for name in sorted(graph):
        visit(name, ())
    assert graph["model"] == {"config", "state"}  # the network imports nothing above its configuration and state
    assert graph["state"] == set()  # the state types and the memory need torch alone
    assert graph["config"] <= {"errors"}
    for inference in ("evaluate", "generate", "score", "precision", "export", "compress", "dynamic"):
        assert "train" not in graph[inference], inference  # using a model never needs the training loop


def test_resume_refuses_every_setting_that_shapes_the_weights(tmp_path: Path) -> None:
    cfg = SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_span=24, tied=False)
    save_checkpoint(tmp_path / "ckpt", SHARNN(cfg))
    changed = {"model": "GRU", "qrnn_window": 1, "emsize": 32, "nhid": 64, "nlayers": 3, "attn_layers": (1, 0),
               "tied": True, "adaptive_cutoffs": (100,), "collapsed_gate": True}
    assert set(changed) == SHARNNConfig.weight_settings() - {"vocab_size"}
    for name, value in changed.items():
        with pytest.raises(SharnnError, match=f"--{name.replace('_', '-')} .* conflicts with the checkpoint"):
            resumed_model_config(Checkpoint.open(tmp_path / "ckpt"), {name: value})
    # The run settings may change on resume: dropouts, the span, the window.
    run = {"dropout": 0.3, "dropouth": 0.2, "dropouti": 0.0, "dropoute": 0.1, "wdrop": 0.1, "attn_span": 12,
           "attn_window": "reference"}
    assert resumed_model_config(Checkpoint.open(tmp_path / "ckpt"), run) == replace(cfg, **run)


def test_functions_and_classes_stay_readable() -> None:
    # Each piece readable alone: no function (its nested functions included) over 70 lines, no class over 200.
    long = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            limit = 200 if isinstance(node, ast.ClassDef) else 70
            if (lines := node.end_lineno - node.lineno + 1) > limit:  # type: ignore[operator]
                long.append(f"{f.relative_to(PACKAGE)}:{node.lineno} {node.name}: {lines} lines (at most {limit})")
    assert not long, long
