"""The package's structure holds: data flows one way (no import circle, imports inside functions counted),
and the CLI stays light (importing it and `atlas --help` load no torch)."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "atlas"


def module_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its file (functions included).

    `from . import x` where x is a module is an edge to x alone (its package is imported anyway, being its
    parent); `from . import NAME` of anything else is an edge to the package itself."""
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    graph: dict[str, set[str]] = {}
    for mod, f in mods.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                plain = False
                for alias in node.names:
                    if f"{name}.{alias.name}" in mods:
                        deps.add(f"{name}.{alias.name}")
                    else:
                        plain = True
                if plain and name in mods:
                    deps.add(name)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
        graph[mod] = deps - {mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_inside_the_package():
    graph = module_graph()
    assert len(graph) > 30 and "atlas.facade" in graph["atlas"]  # the walk sees lazy imports too
    assert cycles(graph) == []


def test_the_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_cli_and_its_help_load_no_heavy_library():
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from atlas.cli import main\n"
            "res = CliRunner().invoke(main, ['--help'])\n"
            "assert res.exit_code == 0, res.output\n"
            "for name in ('build', 'sql', 'show', 'export', 'train'):\n"
            "    assert CliRunner().invoke(main, [name, '--help']).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'numpy', 'duckdb', 'pyarrow', 'faiss', 'PIL') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# The packages, lowest first: each may import only those before it (and itself). A reader finds a concept in
# one folder and the flow of the data in this order; an import that reaches up fails here.
LAYERS = [
    ("errors", "choices", "manual"),    # words every layer uses
    ("util",),                          # files, lock, progress, output, device, distributed, heap, bounds, schema
    ("data", "models"),                 # datasets and decoding; architectures and their weights
    ("net",),                           # the trace and the one layer map
    ("deconv", "mining"),               # the projection engine and its switches; streaming top-k and moments
    ("store",),                         # an atlas on disk, read: manifest, SQL, model, images
    ("pictures",),                      # projections, their cache, drawing, charts, feature visualization
    ("search",),                        # FAISS indexes and similarity queries
    ("build",),                         # the build job and its tables
    ("train",),                         # the paper's recipe
    ("notebook", "facade"),             # what shows itself; atlas.open's Atlas
    ("compare",),                       # two atlases, unit by unit
    ("export",),                        # the static site
    ("analyses", "demo"),               # the paper's experiments; the demo
    ("cli", "__main__"),                # the command line
    ("atlas",),                         # the package's front door
]


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "atlas"


def test_packages_import_only_the_layers_below_them():
    rank = {p: i for i, layer in enumerate(LAYERS) for p in layer}
    graph = module_graph()
    assert {package_of(m) for m in graph} <= set(rank), {package_of(m) for m in graph} - set(rank)
    up = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                if rank[package_of(d)] > rank[package_of(m)])
    assert up == [], "imports that reach up a layer:\n" + "\n".join(up)


def test_the_layer_check_sees_an_import_that_reaches_up():
    rank = {p: i for i, layer in enumerate(LAYERS) for p in layer}
    assert rank[package_of("atlas.store")] > rank[package_of("atlas.net.graph")]
    assert rank[package_of("atlas.cli.base")] > rank[package_of("atlas.build")]
