"""The layout shows the design: commands and the shared modules at the root, the library in `glm_tune/`
(training, conversion, deployment), an acyclic import graph that never climbs from the library to a command,
and siblings that import only framework-free modules of the main suite."""
import ast
import sys
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
        "data", "training", "conversion", "deployment", "serving"}


def import_graph(modules: dict, node=lambda name: name) -> dict:
    """node(importer) -> {node(imported)} over the given modules; `node` groups modules (e.g. by package)."""
    graph = {node(name): set() for name in modules}
    for name, path in modules.items():
        graph[node(name)] |= {node(m) for m in imports(path) if m in modules and node(m) != node(name)}
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of nodes (first == last), or None."""
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return None
        if state.get(node) == "open":
            return trail[trail.index(node):] + [node]
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, trail + [node])
            if cycle:
                return cycle
        state[node] = "done"
        return None

    for name in sorted(graph):
        cycle = visit(name, [])
        if cycle:
            return cycle
    return None


def package_of(name: str) -> str:
    """A module's package below glm_tune (glm_tune.serving.app -> glm_tune.serving); glm_tune's own modules and
    the root modules stand for themselves."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "glm_tune" and len(parts) > 2 else name


def test_the_import_graph_is_acyclic_and_never_reaches_a_command():
    modules = suite_modules()
    for name, path in modules.items():
        climbing = {m.split(".")[0] for m in imports(path)} & (COMMANDS | {"tools", "tests"})
        assert not climbing, f"{name} imports {climbing}"
    assert find_cycle(import_graph(modules)) is None, find_cycle(import_graph(modules))


def test_packages_import_one_another_without_a_loop():
    """Module by module a tree can be acyclic while its packages import each other both ways (data.py imported
    glm_tune.errors while glm_tune imported data.py): the graph of packages is checked too."""
    cycle = find_cycle(import_graph(suite_modules(), package_of))
    assert cycle is None, f"package import loop: {' -> '.join(cycle)}"


def test_the_library_never_imports_a_root_module():
    """data.py, utils.py and argument.py are the commands' and users' face of glm_tune/, importing down only."""
    for name, path in suite_modules().items():
        if name.startswith("glm_tune"):
            up = {m.split(".")[0] for m in imports(path)} & (SHARED | COMMANDS)
            assert not up, f"{name} imports the root module(s) {sorted(up)}"


def test_the_package_check_catches_a_loop_the_module_check_misses(tmp_path):
    (tmp_path / "glm_tune" / "reading").mkdir(parents=True)
    (tmp_path / "glm_tune" / "writing").mkdir()
    files = {"glm_tune/reading/records.py": "from glm_tune.writing.files import atomic\n",
             "glm_tune/writing/files.py": "atomic = 1\n",
             "glm_tune/writing/report.py": "from glm_tune.reading.checks import check\n",
             "glm_tune/reading/checks.py": "check = 1\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    modules = {name.removesuffix(".py").replace("/", "."): tmp_path / name for name in files}
    assert find_cycle(import_graph(modules)) is None
    assert find_cycle(import_graph(modules, package_of)) == ["glm_tune.reading", "glm_tune.writing",
                                                             "glm_tune.reading"]


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


def python_files_of_the_project():
    """Every .py file the project ships (commands, library, tools, benches, siblings, tests), not the venvs'."""
    skip = {".venv", "build", "__pycache__", ".git"}
    return [p for p in sorted(ROOT.rglob("*.py")) if not skip & set(p.relative_to(ROOT).parts)]


def test_nothing_but_the_test_configuration_edits_sys_path():
    """The project is installed (pyproject.toml, `pip install -e .` in `make venv`), so no command, library module,
    tool, bench or sibling puts a folder on sys.path; only the suites' conftest files may (issue 28)."""
    editing = []
    for path in python_files_of_the_project():
        if path.name == "conftest.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                editing.append(str(path.relative_to(ROOT)))
    assert not editing, f"sys.path used outside conftest.py: {sorted(set(editing))}"


def test_each_entry_script_quiets_the_console_itself_before_paddle_loads():
    """`console.quiet_startup()` is a call each script makes before its imports that load paddle; importing the
    console module changes nothing (an import sorter reordering imports cannot silence or unsilence anything)."""
    console_tree = ast.parse((ROOT / "glm_tune" / "console.py").read_text(encoding="utf-8"))
    assert not [n for n in console_tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)]
    scripts = [ROOT / f"{name}.py" for name in sorted(COMMANDS)] + [
        ROOT / "tools" / f"{name}.py" for name in ("make_tiny_model", "merge_tp_shards", "convert_checkpoint")]
    for path in scripts:
        body = ast.parse(path.read_text(encoding="utf-8")).body
        call = next(i for i, node in enumerate(body) if isinstance(node, ast.Expr)
                    and "quiet_startup" in ast.unparse(node))
        before = {alias.name.split(".")[0] if isinstance(node, ast.Import) else node.module.split(".")[0]
                  for node in body[:call] if isinstance(node, (ast.Import, ast.ImportFrom))
                  for alias in node.names}
        assert "glm_tune" in before and before - {"glm_tune"} <= sys.stdlib_module_names, path.name


def test_the_server_and_the_engines_load_no_paddle_and_no_graph_code():
    """Serving and infer on ONNX Runtime need the step graph's host-side feeds (numpy), the export format and the
    engines; the graph code (step_model.py) and paddle itself stay out of their process (issue 28)."""
    import subprocess

    probe = ("import sys, glm_tune.serving.app, glm_tune.deployment.exported_model, glm_tune.deployment.predictor; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'paddle', 'paddlenlp'}), "
             "'glm_tune.deployment.step_model' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["[]", "False"], out.stdout


def test_checkpoints_are_loaded_through_one_sequence():
    """predict, export and finetune load through `locate_checkpoint` + `load_checkpoint`; the steps inside them
    (load_model, apply_lora, apply_prefix, resolve_checkpoint) are called nowhere else, and no command changes its
    parsed arguments to pass a resolved folder on (issue 28)."""
    inner = {"load_model", "apply_lora", "apply_prefix", "resolve_checkpoint", "resolve_model_folder"}
    for path in [ROOT / f"{name}.py" for name in COMMANDS] + sorted((ROOT / "glm_tune").rglob("*.py")):
        if path.name == "model_loading.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        called = {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                  for node in ast.walk(tree) if isinstance(node, ast.Call)}
        assert not called & inner, f"{path.name} calls {sorted(called & inner)}"
        changed = [ast.unparse(t) for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                   if ast.unparse(t).startswith("model_args.")]
        assert not changed, f"{path.name} assigns {changed}"
    for loader in ("predict_generation.py", "finetune_generation.py", "glm_tune/deployment/step_export.py"):
        assert "glm_tune.model_loading.load_checkpoint" in imports(ROOT / loader), loader
