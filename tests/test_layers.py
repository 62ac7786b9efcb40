"""The layers point one way (ARCHITECTURE.md): cli → tasks → pipeline → storage (cli and tasks are the top
layer; cli may use tasks' config resolution, tasks never imports cli). Checked on the source, imports inside
functions included."""
import ast

from tests.conftest import REPO


def project_imports() -> dict[str, set[str]]:
    """{module: project modules and third-party top-level packages it imports anywhere in its file}."""
    files = [*(REPO / "pipeline").glob("*.py"), *(REPO / "storage").glob("*.py"), *(REPO / "tasks").glob("*.py"),
             *(REPO / "cli").glob("*.py")]
    names = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for p in files}
    out = {}
    for path in files:
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in names else node.module
                          for alias in node.names}
        out[name] = {m if m in names else m.split(".")[0] for m in found}
    return out


def test_layers_point_one_way_and_only_storage_opens_hdf5():
    imports = project_imports()
    layer = lambda m: 0 if m.startswith("storage") else 1 if m.startswith("pipeline") else 2
    for module, deps in imports.items():
        for dep in deps & set(imports):
            assert layer(dep) <= layer(module), f"{module} imports {dep}: an upward import"
            assert not (module.startswith("tasks") and dep.startswith("cli")), f"{module} imports {dep}"
        if module.startswith(("pipeline", "storage")):
            assert "luigi" not in deps, f"{module} imports luigi: the library runs without it"
        if not module.startswith("storage"):
            assert "h5py" not in deps, f"{module} imports h5py: file formats belong in storage/"


def test_no_import_cycles():
    imports = project_imports()
    graph = {m: deps & set(imports) - {m} for m, deps in imports.items()}
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", "import cycle: " + " → ".join(path + [module, dep])
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
