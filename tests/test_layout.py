"""The layout shows the design: commands and the shared modules at the root, the library in `glm_tune/`
(training, conversion, deployment), an acyclic import graph that never climbs from the library to a command,
and siblings that import only framework-free modules of the main suite."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"finetune_generation", "predict_generation", "export_generation_model", "infer_generation",
            "serve_generation"}
SHARED = {"data", "utils", "argument"}
FRAMEWORKS = {"paddle", "paddlenlp", "torch", "mindspore", "mindformers", "transformers", "peft"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def suite_modules() -> dict:
    """name -> path of the shared modules and every module of the package."""
    paths = [ROOT / f"{name}.py" for name in SHARED] + sorted((ROOT / "glm_tune").rglob("*.py"))
    return {module_name(p).removesuffix(".__init__"): p for p in paths}


def imports(path: Path, top_level_only=False) -> set:
    """Absolute module names imported by the file (function-level imports too, unless top_level_only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_the_root_holds_the_commands_and_the_shared_modules_only():
    assert {p.stem for p in ROOT.glob("*.py")} == COMMANDS | SHARED
    assert {p.name for p in (ROOT / "glm_tune").iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "training", "conversion", "deployment", "serving"}


def test_the_import_graph_is_acyclic_and_never_reaches_a_command():
    modules = suite_modules()
    graph = {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}
    for name, path in modules.items():
        climbing = {m.split(".")[0] for m in imports(path)} & (COMMANDS | {"tools", "tests"})
        assert not climbing, f"{name} imports {climbing}"
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(trail + [node])}"
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_the_siblings_import_only_framework_free_modules_of_the_suite():
    modules = suite_modules()

    def framework_free(name, seen=()):
        top = imports(modules[name], top_level_only=True)
        assert not {m.split(".")[0] for m in top} & FRAMEWORKS, f"{name} imports a framework at module level"
        for dep in sorted(m for m in top if m in modules and m not in seen):
            framework_free(dep, (*seen, name))

    used = set()
    for sibling in ("qlora", "ascend"):
        for path in (ROOT / sibling).rglob("*.py"):
            if ".venv" not in path.parts:
                used |= {m for m in imports(path, top_level_only=True) if m in modules}
    assert {"data", "utils", "glm_tune.safe_output"} <= used
    for name in sorted(used):
        framework_free(name)


def test_the_next_token_is_chosen_in_one_place():
    """One `Sampling` and one `choose_next` (glm_tune/sampling.py) for predict, infer and serve (issue 28: there
    were a dict, a dataclass and conversions between them)."""
    defined = {}
    for path in [ROOT / f"{name}.py" for name in COMMANDS | SHARED] + sorted((ROOT / "glm_tune").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in ("Sampling", "choose_next",
                                                                                   "penalize"):
                defined.setdefault(node.name, []).append(module_name(path))
    assert defined == {"Sampling": ["glm_tune.sampling"], "choose_next": ["glm_tune.sampling"],
                       "penalize": ["glm_tune.sampling"]}
