"""The package's layout rules, checked on its source: only arch/ names HuggingFace modules, small modules
and functions, plot.py imports no analysis, no import cycle, logging instead of print, no pickle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "reslens"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))

#: HuggingFace GPT-2 module and config names: only arch/ may use them (in code, docs or option values).
#: ``n_layer`` alone is the adapter's own size name, so only the config field is forbidden.
GPT2_NAMES = [
    "transformer.h",
    "c_fc",
    "c_proj",
    "c_attn",
    "ln_1",
    "ln_2",
    "ln_f",
    "wte",
    "wpe",
    "n_positions",
    "n_embd",
    "config.n_layer",
    "num_hidden_layers",
    "model.transformer",
    "model.model",
]
#: The Llama family's (Llama, Mistral, Qwen2) classes, modules, config fields and forward keywords that
#: ``arch/llama.py`` reads. ``hidden_size`` (every HF config's width, in GPT-2 doctests too) and
#: ``model_type`` (how ``models.py`` picks a family) are HuggingFace's generic names, not a family's.
LLAMA_NAMES = [
    "LlamaForCausalLM",
    "LlamaModel",
    "LlamaDecoderLayer",
    "LlamaRMSNorm",
    "MistralForCausalLM",
    "MistralModel",
    "Qwen2ForCausalLM",
    "Qwen2Model",
    "embed_tokens",
    "rotary_emb",
    "apply_rotary_pos_emb",
    "position_embeddings",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "act_fn",
    "input_layernorm",
    "post_attention_layernorm",
    "variance_epsilon",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "sliding_window",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "_attn_implementation",
    "model.layers",
    "model.norm",
]
FORBIDDEN = GPT2_NAMES + LLAMA_NAMES
#: reading a forward's positional arguments (``args[0]`` in a hook) belongs in arch/ too
POSITIONAL = re.compile(r"\bargs\[\d+\]")


#: modules that read another package's files whose keys copy HuggingFace's names (said in their docstring)
FOREIGN_FORMATS = ("lens/_tuned_lens_format.py",)


def _outside_arch() -> list[Path]:
    return [p for p in MODULES
            if "arch" not in p.relative_to(PACKAGE).parts and _rel(p) not in FOREIGN_FORMATS]


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def test_only_arch_names_huggingface_modules():
    hits = []
    for path in _outside_arch():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in FORBIDDEN:
                if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", line):
                    hits.append(f"{_rel(path)}:{number}: {name}: {line.strip()[:90]}")
            if POSITIONAL.search(line):
                hits.append(f"{_rel(path)}:{number}: positional forward argument: {line.strip()[:90]}")
    assert not hits, "HuggingFace module or config names outside reslens/arch/:\n" + "\n".join(hits)


def test_the_forbidden_name_check_can_fail(tmp_path):
    for line in ("h = model.transformer.h[0].mlp.c_proj", "w = block.self_attn.q_proj.weight",
                 "eps = config.rms_norm_eps"):
        assert any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", line) for n in FORBIDDEN)
    assert not any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", "w_q = arch.W_Q(layer)")
                   for n in FORBIDDEN)
    assert POSITIONAL.search("x = args[0]") and not POSITIONAL.search("x = kwargs['hidden_states']")


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_modules_are_small(path):
    n = len(path.read_text().splitlines())
    assert n <= 520, f"{_rel(path)} has {n} lines; split it by idea (<= ~500)"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_functions_are_short(path):
    tree = ast.parse(path.read_text())
    long = [
        f"{f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for f in _functions(tree)
        if f.end_lineno - f.lineno + 1 > 85
    ]
    assert not long, f"{_rel(path)}: functions over ~80 lines: {', '.join(long)}"


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: what an import records: (module as written, names imported from it, whether it runs lazily)
Import = tuple[str, tuple[str, ...], bool]


class _Imports(ast.NodeVisitor):
    """Every import of the package's own modules in one module, at any depth: module level, inside
    functions and methods, in a module ``__getattr__`` (those are *lazy*: they run on first use), and
    ``importlib.import_module("pkg.x")`` calls (an argument that is not a string constant is recorded
    as ``"?"``: a target the check cannot see), and after ``import pkg`` every ``pkg.name`` read (a name
    the package may serve lazily). ``if TYPE_CHECKING:`` blocks never run: left out."""

    def __init__(self, module: str, is_package: bool, top: str) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.top = top
        self.found: list[Import] = []
        self._depth = 0
        self._bound: dict[str, str] = {}  # a name ``import pkg...`` binds -> the module it names

    def _add(self, module: str, names: tuple[str, ...] = ()) -> None:
        if module == "?" or module.split(".")[0] == self.top:
            self.found.append((module, names, self._depth > 0))

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)
            if alias.name.split(".")[0] == self.top:
                self._bound[alias.asname or self.top] = alias.name if alias.asname else self.top

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = ast.unparse(node.value)
        root, _, rest = dotted.partition(".")
        if root in self._bound and all(part.isidentifier() for part in dotted.split(".")):
            self._add(".".join(filter(None, (self._bound[root], rest))), (node.attr,))
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level:  # relative: from the package, one level up per extra dot
            parts = self.package.split(".")
            base = parts[: len(parts) - (node.level - 1)]
            module = ".".join([*base, module] if module else base)
        self._add(module, tuple(alias.name for alias in node.names))

    def visit_Call(self, node: ast.Call) -> None:
        if ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__") and node.args:
            target = node.args[0]
            literal = isinstance(target, ast.Constant) and isinstance(target.value, str)
            self._add(target.value if literal else "?")
        self.generic_visit(node)


def _defines(tree: ast.Module, name: str) -> bool:
    """Whether ``name`` is defined (def, class, assignment) at the top level of a module."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        if any(isinstance(x, ast.Name) and x.id == name for x in targets):
            return True
    return False


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Which of the package's modules each module imports, as the interpreter runs them.

    Every import counts wherever it is written (see :class:`_Imports`). Importing ``a.b.c`` also runs
    the package ``__init__`` files ``a.b`` and ``a`` (the importer's own packages aside: they are
    already running). ``from pkg import name`` is an edge to the module that defines ``name``: the
    submodule ``pkg.name``, ``pkg/__init__`` itself, the module it imports ``name`` from, or (a name its
    ``__getattr__`` serves lazily) the module under ``pkg`` that defines it. One kind of edge is left
    out: a package's ``__init__`` importing its own submodules lazily (its table of contents, e.g.
    ``reslens.lens``'s ``__getattr__``); a child importing names of its parent package is an edge.
    """
    paths = sorted(root.rglob("*.py"))
    modules = {_module_name(p, root): p for p in paths}
    packages = {_module_name(p, root) for p in paths if p.name == "__init__.py"}
    trees = {m: ast.parse(p.read_text()) for m, p in modules.items()}

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def home(module: str, name: str) -> set[str]:
        if f"{module}.{name}" in modules:
            return {f"{module}.{name}"}
        if module not in packages or _defines(trees[module], name):
            return {module}
        for node in trees[module].body:
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    if (alias.asname or alias.name) == name and (source := resolve(node.module)):
                        return home(source, alias.name)
        return {m for m in modules if m.startswith(module + ".") and _defines(trees[m], name)} or {module}

    graph: dict[str, set[str]] = {}
    for module in modules:
        visitor = _Imports(module, module in packages, root.name)
        visitor.visit(trees[module])
        edges = set()
        for target, names, lazy in visitor.found:
            if target == "?":
                assert module in packages, f"{module}: import_module with a target this check cannot read"
                continue  # a package's table of contents, served by its __getattr__
            base = resolve(target)
            if base is None:
                continue
            reached = {base} | ({h for n in names for h in home(base, n)} if base == target else set())
            for found in set(reached):  # the packages each import runs first
                reached |= {p for p in packages if found.startswith(p + ".")}
            for found in reached:
                mine = found == module or module.startswith(found + ".")  # itself or its own package
                contents = module in packages and lazy and found.startswith(module + ".")
                if not (mine or contents):
                    edges.add(found)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None."""
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt, [*stack, nxt])):
                return cycle
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycle():
    """No cycle, counting imports inside functions and module ``__getattr__`` (see :func:`import_graph`)."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


#: small packages, each written as {file: source}, and the cycle the check must find (None: none)
_SHAPES = {
    "a function-level import closes a loop": (
        {"__init__.py": "", "a.py": "def f():\n    from pkg.b import g\n",
         "b.py": "from pkg.a import f\ng = 1\n"},
        ["pkg.a", "pkg.b", "pkg.a"]),
    "a package __getattr__ re-exports a module above it that reads the package": (
        {"__init__.py": "", "low/__init__.py": "from pkg.low.x import y\n\ndef __getattr__(name):\n"
         "    from pkg import high\n    return getattr(high, name)\n",
         "low/x.py": "y = 1\n", "high.py": "from pkg.low.x import y\n"},
        ["pkg.high", "pkg.low", "pkg.high"]),
    "a child imports a name its parent serves lazily from a module that imports the child": (
        {"__init__.py": "import importlib\n\ndef __getattr__(name):\n"
         "    return getattr(importlib.import_module(f'pkg.{name}'), name)\n",
         "a.py": "from pkg import thing\n", "b.py": "from pkg.a import *\nthing = 1\n"},
        ["pkg.a", "pkg.b", "pkg.a"]),
    "a name read from the package after import pkg, served lazily by a module that imports the reader": (
        {"__init__.py": "import importlib\n\ndef __getattr__(name):\n"
         "    return getattr(importlib.import_module('pkg.b'), name)\n",
         "a.py": "import pkg\n\ndef f():\n    return pkg.thing\n", "b.py": "import pkg.a\nthing = 1\n"},
        ["pkg.a", "pkg.b", "pkg.a"]),
    "a package's own lazy table of contents is no cycle": (
        {"__init__.py": "import importlib\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
         "    from pkg.a import f\n\ndef __getattr__(name):\n    import pkg.a\n"
         "    return importlib.import_module('pkg.b')\n",
         "a.py": "import pkg\nf = 1\n", "b.py": "from pkg import f\n"},
        None),
}


@pytest.mark.parametrize("shape", _SHAPES)
def test_the_cycle_check_sees_lazy_imports(tmp_path, shape):
    files, expected = _SHAPES[shape]
    for name, source in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(source)
    cycle = find_cycle(import_graph(tmp_path / "pkg"))
    if expected is None:
        assert cycle is None, cycle
    else:
        assert cycle is not None and set(cycle) == set(expected), cycle


def test_plot_imports_no_analysis_module():
    analyses = ("lens", "pca", "kv_memory", "heads", "attribution", "tracing", "rome", "hooks")
    text = (PACKAGE / "plot.py").read_text()
    imported = re.findall(r"^\s*(?:from|import) (reslens\.[\w.]+)", text, re.M)
    figures = ("reslens.lens._plot",)  # the lens wing's figures: drawing code, no analysis
    bad = [m for m in imported if m not in figures and m.split(".")[1] in analyses]
    assert not bad, f"plot.py imports analysis modules {bad}"


def test_logging_not_print_outside_the_cli_and_no_pickle():
    hits = []
    for path in MODULES:
        if path.name == "cli.py" or path.name.startswith("_cli_"):  # the command and its parts
            continue
        tree = ast.parse(path.read_text())
        shown = {
            id(n) for f in _functions(tree) if f.name == "show" for n in ast.walk(f)
        }  # display methods print
        for node in ast.walk(tree):
            if id(node) in shown and isinstance(node, ast.Call) and getattr(node.func, "id", "") == "print":
                continue
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("print", "eval", "exec")
            ):
                hits.append(f"{_rel(path)}:{node.lineno}: {node.func.id}()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                hits += [
                    f"{_rel(path)}:{node.lineno}: imports {m}"
                    for m in mods
                    if m.split(".")[0] in ("pickle", "dill")
                ]
    assert not hits, "\n".join(hits)


def test_ruff_is_clean():
    """ruff (pyflakes, pycodestyle, Google-style pydocstyle; configured in pyproject.toml) finds nothing."""
    import shutil
    import subprocess
    import sys

    root = PACKAGE.parents[1]
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    done = subprocess.run(
        [ruff, "check", "src", "tests"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
