"""The layers point one way (ARCHITECTURE.md): cli → tasks → pipeline → storage (cli and tasks are the top
layer; cli may use tasks' config resolution, tasks never imports cli). Checked on the source, imports inside
functions included."""
import ast

from tests.conftest import REPO


def source_files() -> list:
    return [*(REPO / "pipeline").rglob("*.py"), *(REPO / "storage").glob("*.py"), *(REPO / "tasks").glob("*.py"),
            *(REPO / "cli").glob("*.py")]


def project_imports() -> dict[str, set[str]]:
    """{module: project modules and third-party top-level packages it imports anywhere in its file}."""
    files = source_files()
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


def test_modules_stay_short():
    for path in source_files():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= 400, f"{path.relative_to(REPO)}: {lines} lines (ARCHITECTURE.md: at most ~400)"


def test_the_demo_is_one_plug_in():
    """Outside pipeline/digits/, at most 3 modules of pipeline/, storage/ and tasks/ mention digits (the demo's
    wiring, tasks/demo.py, is one), and none but that wiring imports the plug-in, even inside a function."""
    general = [p for p in source_files() if p.parts[len(REPO.parts)] in ("pipeline", "storage", "tasks")
               and "digits" not in p.relative_to(REPO).parts[:-1]]
    mentioning = [str(p.relative_to(REPO)) for p in general if "digit" in p.read_text(encoding="utf-8").lower()]
    assert len(mentioning) <= 3, mentioning
    for module, deps in project_imports().items():
        if not module.startswith(("pipeline.digits", "tasks.demo", "cli")):
            assert not any(d.startswith("pipeline.digits") for d in deps), f"{module} imports the demo plug-in"


def test_a_coco_config_imports_nothing_of_the_demo_plug_in(tmp_path):
    """The stages, the library and the config check under a COCO config (no plug-in) leave pipeline.digits
    unimported."""
    import os
    import subprocess
    import sys

    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "captions.json").write_text('{"images": [], "annotations": []}')
    (tmp_path / "coco.cfg").write_text(f"[dataset]\nsource = coco\nannotations = {tmp_path / 'captions.json'}\n"
                                       f"images = {images}\n[encoder]\nweights = random:0\n")
    code = ("import sys, tasks, tasks.context as c, tasks.config as config\n"
            "from pipeline import decode, evaluate, export, features, train\n"
            "config.check_every_section(); config.load_plugins(); tasks.TrainDecoder().requires()\n"
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.digits')))")
    env = {**os.environ, "LUIGI_CONFIG_PATH": str(tmp_path / "coco.cfg"), "CAPTIONER_WORKDIR": str(tmp_path / "w")}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
