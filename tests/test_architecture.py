"""The shape of the code: no import cycles among the product packages, nothing imports a CLI
module or the pipeline from below, `compress --help` imports no torch, one registry, and the
planner's widths are exactly the allocation's."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from compressor.budget.planner import arch_at_ratio
from compressor.errors import UserError
from compressor.model.adapters import LayerShape
from compressor.prune import COMPENSATION, IMPORTANCE
from compressor.prune.allocation import LayerScores, allocate
from compressor.registry import Registry
from profiles.costmodel import Arch
from tests.conftest import ROOT, run_python

PACKAGES = ("compressor", "exporters", "runtimes", "profiles")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Product modules `path` imports (at module level only, or anywhere)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, top_level_only) if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _strip_parent_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A module importing its own package's __init__ (for a registry) is not a cycle of code."""
    return {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}


def test_no_import_cycle_among_the_product_packages():
    cycle = _cycle(_strip_parent_packages(_graph(top_level_only=True)))
    assert cycle is None, " -> ".join(cycle)


def test_no_cycle_even_counting_imports_inside_functions():
    cycle = _cycle(_strip_parent_packages(_graph(top_level_only=False)))
    assert cycle is None, " -> ".join(cycle)


def test_nothing_below_imports_the_cli_or_the_pipeline():
    graph = _graph(top_level_only=False)
    bad = [(n, m) for n, deps in graph.items() for m in deps
           if (m.startswith("compressor.cli") and not n.startswith(("compressor.cli", "compressor.__main__")))
           or (m == "compressor.pipeline" and not n.startswith("compressor.cli") and n != "compressor.pipeline")]
    assert bad == [], bad


# The stages from the top down (../shared/DESIGN.md): an import may only point further down this list.
STAGES = ("compressor.__main__", "compressor.cli", "compressor.pipeline",
          "compressor.report", "compressor.evaluate", "compressor.budget", "compressor.config", "compressor.recover",
          "compressor.prune",
          "runtimes", "exporters", "compressor.model", "profiles", "compressor.data", "compressor.output",
          "compressor.tempdirs", "compressor.memory", "compressor.registry", "compressor.errors")


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "compressor":
        return parts[0]
    return None if len(parts) == 1 else ".".join(parts[:2])  # the bare package is no stage


def test_stages_import_downwards_only():
    """Package-level edges, not only module cycles: every import between two stages points down
    STAGES, so the stages form a DAG."""
    graph = _graph(top_level_only=False)
    stages = {_stage(n) for n in graph} - {None}
    assert stages <= set(STAGES), f"a new stage needs its place in STAGES: {sorted(stages - set(STAGES))}"
    rank = {s: i for i, s in enumerate(STAGES)}
    up = sorted((n, m) for n, deps in graph.items() for m in deps
                if None not in (_stage(n), _stage(m)) and rank[_stage(n)] > rank[_stage(m)])
    assert up == [], up


def test_stage_rules():
    """runtimes know nothing of pruning; the budget does not reach into evaluation."""
    graph = _graph(top_level_only=False)
    bad = [(n, m) for n, deps in graph.items() for m in deps
           if (n.startswith("runtimes") and m.startswith(("compressor.prune", "compressor.budget")))
           or (n.startswith("compressor.budget") and m.startswith("compressor.evaluate"))
           or (n.startswith("exporters") and m.startswith("compressor.prune"))]
    assert bad == [], bad


def test_importing_the_cli_loads_no_torch():
    p = run_python("import sys, compressor.cli\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["False", "False"], p.stdout


def test_registry_is_lazy_and_names_the_known_entries():
    r = Registry("widget", {"a": "json:dumps"}, aliases={"auto": "a"})
    assert r.names() == ["a"] and "auto" in r and "b" not in r
    import json

    assert r.get("auto") is json.dumps
    with pytest.raises(UserError, match=r"Unknown widget 'b' \(known: auto, a\)"):
        r.get("b")
    assert "flap" in IMPORTANCE.names() and "lsq+bias" in COMPENSATION.names()
    assert IMPORTANCE.get("auto").name == "flap" and COMPENSATION.get("auto").name == "lsq+bias"


@pytest.mark.parametrize("attn_unit", ["auto", "kv", "query"])
@pytest.mark.parametrize("shape", [(9, 3, 64, 1536), (32, 8, 128, 14336), (12, 12, 64, 3072), (8, 1, 64, 1024)],
                         ids=["smollm2", "llama8b", "mha", "mqa"])
def test_the_planner_predicts_exactly_the_widths_allocation_produces(shape, attn_unit):
    q, kv, hd, inter = shape
    hidden = q * hd
    arch = Arch(hidden=hidden, vocab=1000, head_dim=hd, q_heads=(q,) * 3, kv_heads=(kv,) * 3,
                intermediate=(inter,) * 3, tied_embeddings=False)
    gen = torch.Generator().manual_seed(0)
    for ratio in (0.05, 0.1, 0.2, 0.35, 0.5, 0.7):
        scores = [LayerScores(LayerShape(q, kv, hd, inter), hidden,
                              torch.rand(q * hd, generator=gen, dtype=torch.float64),
                              torch.rand(inter, generator=gen, dtype=torch.float64)) for _ in range(3)]
        keeps = allocate(scores, ratio, "uniform", attn_unit, 64)
        want = arch_at_ratio(arch, ratio, attn_unit, 64)
        assert [len(k.q_heads) for k in keeps] == list(want.q_heads), ratio
        assert [len(k.kv_heads) for k in keeps] == list(want.kv_heads), ratio
        assert [len(k.channels) for k in keeps] == list(want.intermediate), ratio


def test_report_never_writes_bare_nan(tmp_path):
    from compressor.report import Report

    r = Report(model="m", profile="p", perplexity={"dense": float("nan"), "pruned": float("inf")})
    text = r.to_json()
    assert "NaN" not in text and "Infinity" not in text
    assert Report.parse(__import__("json").loads(text)).perplexity.dense is None


def test_report_reads_schema_2_and_refuses_other_files():
    from compressor.report import Report

    old = Report.parse({"schema": "fitprune.report/2", "plan": {"calibration": {"runtime": "vllm"}}})
    assert old.plan.cost_fit == {"runtime": "vllm"}
    with pytest.raises(UserError, match="not a fitprune report"):
        Report.parse({"schema": "something/1"})


def test_every_report_section_is_typed():
    """No section of the report is a bare dict: each is a model with its known fields (a later
    version's extra fields are kept), and a report from before still reads."""
    import typing

    from pydantic import BaseModel

    from compressor.report import Report

    for name, field in Report.model_fields.items():
        if name in ("seconds",):  # stage -> seconds
            continue
        kinds = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
        assert all(not (isinstance(k, type) and issubclass(k, dict)) for k in kinds), name
    r = Report.parse({"schema": "fitprune.report/4", "host": {"machine": "x86_64", "torch_threads": 2},
                      "latency": {"runtime": "vllm", "measured": {"skipped": "no GPU"}},
                      "recovery": {"tokens": 10, "before": {"heldout_perplexity": 3.0}, "later_field": 1}})
    assert isinstance(r.host, BaseModel) and r.latency.measured == {"skipped": "no GPU"}
    assert r.recovery.before.heldout_perplexity == 3.0 and r.as_dict()["recovery"]["later_field"] == 1


def test_pipeline_run_reads_as_the_data_flow():
    """`pipeline.run` stays a short list of stage calls (the issue's bound: about 50 lines)."""
    tree = ast.parse((ROOT / "compressor" / "pipeline" / "__init__.py").read_text())
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    assert run.end_lineno - run.lineno + 1 <= 50


def test_the_serving_wheel_carries_what_the_plugin_imports(tmp_path):
    """The plugin wheel holds `exporters` and the family adapters it asks; they import no torch."""
    import zipfile

    from exporters.container import plugin_wheel

    names = set(zipfile.ZipFile(plugin_wheel(tmp_path)).namelist())
    assert {"exporters/vllm_plugin/__init__.py", "compressor/model/adapters.py", "compressor/registry.py"} <= names
    p = run_python("import sys\nfrom exporters.vllm_plugin import expected_keys\n"
                   "k = expected_keys({'model_type': 'qwen2', 'num_hidden_layers': 1})\n"
                   "print('model.layers.0.self_attn.q_proj.bias' in k, 'torch' in sys.modules)")
    assert p.stdout.split() == ["True", "False"], p.stderr[-2000:]


def test_one_orchestrator_for_every_model_size():
    """`pipeline.run` is the one flow: the model in memory (`Resident`) and the model left in its
    files (`Streamed`) offer the same stages with the same parameters, and nothing else runs them."""
    import inspect

    from compressor.pipeline import Resident, Streamed

    stages = ("open", "auto_structure", "session", "evaluate", "teacher", "prune", "recover", "params_after", "write")
    for name in stages:
        a, b = (inspect.signature(getattr(cls, name)) for cls in (Resident, Streamed))
        assert list(a.parameters) == list(b.parameters), name
    callers = set()
    for path in (ROOT / "compressor").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "session" and isinstance(node.value, ast.Name):
                callers.add(str(path.relative_to(ROOT)))
    assert callers == {"compressor/pipeline/__init__.py"}, callers
