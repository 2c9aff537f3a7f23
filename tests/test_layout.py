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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """reslens modules imported at module level (not inside functions or TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("reslens"):
                found.add(sub.module)
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.startswith("reslens"))
    return found


def test_no_import_cycle():
    graph = {_module_name(p): _top_level_imports(p) for p in MODULES}
    names = set(graph)

    def resolve(target: str) -> str | None:
        while target and target not in names:
            target = target.rpartition(".")[0]
        return target or None

    edges = {
        m: {r for t in deps if (r := resolve(t)) and r != m and not m.startswith(r + ".")}
        for m, deps in graph.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


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
        if path.name == "cli.py":
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
