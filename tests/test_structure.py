"""The shape of the code: no import cycles (function-level imports count), library files never import the
commands, and no function longer than a screenful."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "eval", "qat", "tests")
COMMANDS = {"generate", "quantize", "train_qat", "prune"}  # the top-level commands; scripts/ are commands too
MAX_FUNCTION_LINES = 80


def sources() -> dict:
    """{module name: path} of every Python file of the project (not the venv)."""
    files = [*ROOT.glob("*.py"), *(f for p in (*PACKAGES, "scripts") for f in (ROOT / p).rglob("*.py"))]
    return {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in files}


def imports(path: Path, modules: dict) -> set:
    """The project modules a file imports, anywhere in it (a function-level import is still an edge)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def find_cycles(modules: dict) -> list:
    graph = {m: imports(f, modules) - {m} for m, f in modules.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def long_functions(modules: dict) -> list:
    long = []
    for f in modules.values():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{f.name}:{node.lineno} {node.name} ({lines} lines)")
    return long


def test_no_import_cycles():
    assert not find_cycles(sources())


def test_library_files_never_import_commands():
    modules = sources()
    libraries = {m: f for m, f in modules.items()
                 if m not in COMMANDS and not m.startswith(("scripts", "tests")) and m != "conftest"}
    upward = {m: sorted(n for n in imports(f, modules) if n in COMMANDS or n.startswith("scripts"))
              for m, f in libraries.items()}
    assert not {m: v for m, v in upward.items() if v}


def test_no_function_longer_than_a_screen():
    assert not long_functions(sources())


def test_the_checks_see_a_cycle_and_a_long_function(tmp_path):
    """The checks above can fail: a cycle through a function-level import and a long function are found."""
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text("import b\n")
    b.write_text("def f():\n    from a import x\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    c.write_text("import a\n")
    modules = {"a": a, "b": b, "c": c}
    assert find_cycles(modules) == ["a -> b -> a"]
    assert long_functions(modules) == [f"b.py:1 f ({MAX_FUNCTION_LINES + 2} lines)"]
    assert not find_cycles({"a": a, "c": c}) and not long_functions({"a": a, "c": c})
