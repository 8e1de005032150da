"""The coverage matrix: every registered method, with its defaults, on a tiny random model of every popular
`transformers` model type (`testing.TINY_ZOO`: encoders, decoders, encoder-decoders).

Each cell attaches the method to the type's `...ForSequenceClassification` model and checks: the output is
unchanged at init (prompt and prefix tuning excepted: their inserted vectors change it; `use("base")` must
not), a randomised delta changes it, save -> load onto a fresh base gives the same logits bit for bit, and a
mixed batch of two tasks equals each example run alone with its task. A cell may instead be refused with a
`DeltaTuneError` (at attach, or at the mixed batch: "(mixed batch) ...") — only where `REFUSALS` expects it,
with the reason it names.

Each cell's outcome ("ok", or the refusal's or failure's message) is written to the JSON file named by
$DELTATUNE_COVERAGE_JSON when set: scripts/coverage_table.py renders the README's coverage table from it.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.errors import DeltaTuneError
from deltatune.methods.ia3 import IA3Scales
from deltatune.methods.lora import LoRALinear
from deltatune.methods.registry import METHODS
from deltatune.testing import TINY_ZOO, tiny_model_of_type


def method_configs() -> dict[str, object]:
    """Every registered method's default config, plus BitFit told to add the biases a model lacks."""
    configs = {name: entry.config() for name, entry in METHODS.items()}
    if "bitfit" in METHODS and "add_missing" in {f.name for f in fields(METHODS["bitfit"].config)}:
        configs["bitfit+add_missing"] = METHODS["bitfit"].config(add_missing=True)
    return configs


CONFIGS = method_configs()
MATRIX = [(kind, method) for kind in TINY_ZOO for method in CONFIGS]



def refused(method: str, kinds: str, reason: str) -> dict[tuple[str, str], str]:
    return {(kind, method): reason for kind in kinds.split()}


# (model type, method) -> what the refusal must say. Every other cell must pass every check.
REFUSALS: dict[tuple[str, str], str] = {
    **refused("adapter", "albert", "no stack of transformer blocks"),  # ALBERT: one layer shared across depth
    **refused("bitfit", "modernbert llama mistral phi3 mixtral qwen3 gemma gemma2 gemma3_text t5 olmo2 olmo3 smollm3 "
                        "exaone4 helium hunyuan_v1_dense ministral3 qwen3_moe deepseek_v3 minimax",
              "no bias terms, so BitFit has nothing to train; use BitFit(add_missing=True)"),
    **refused("top_layers", "albert", "no stack of transformer blocks found"),
    # prefix tuning hands its prefixes over as the key/value cache: these models' forwards take none (DeepSeek's
    # latent attention caches keys and values of other sizes than its heads)
    **refused("prefix", "distilbert deberta-v2 mpnet modernbert bart deberta funnel xlnet eurobert deepseek_v3 minimax",
              "prefix tuning does not support"),
    **refused("prefix", "albert", "no stack of transformer blocks"),
    # XLNet's attention weights are parameters (q, k, v, o: d_model x heads x head size), not linear layers; its
    # blocks keep hidden states length-first, masks batch-third: no sub-layer output for adapters, no grouping
    # of examples inside a top block
    **refused("lora", "xlnet", "no query/value projections found"),
    **refused("dora", "xlnet", "no query/value projections found"),
    **refused("ia3", "xlnet", "no key/value projections found"),
    **refused("adapter", "xlnet", "no adapter placement known"),
    **refused("top_layers", "xlnet", "cannot share a mixed batch"),
}


def entry_of(method: str):
    return METHODS[method.split("+")[0]]


_BASES: dict[str, torch.nn.Module] = {}


def fresh(kind: str) -> torch.nn.Module:
    """The same tiny random model of `kind` every time (built once, then copied)."""
    if kind not in _BASES:
        torch.manual_seed(0)
        _BASES[kind] = tiny_model_of_type(kind)
    return copy.deepcopy(_BASES[kind])


def make_inputs(batch: int = 3, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 500, (batch, length), generator=generator)
    input_ids[:, -1] = 1  # end every input with </s> (what T5's and BART's classification heads read)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def randomise(model: deltatune.DeltaModel, task: str, seed: int) -> None:
    """Give a task's parameters non-trivial values (as if trained) so that comparisons mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)


LORA_TARGETS: dict[str, str] = {}  # model type -> the layers LoRA's default targets found (for the table)


def lora_targets(model) -> str:
    """"q_proj, v_proj" or "query_key_value (rows 0:8, 16:24, ...)": each adapted layer's name, and its output
    rows where LoRA adapts only part of a fused projection."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            rows = "" if module.slices == [(0, module.out_features)] else \
                f" (rows {', '.join(f'{a}:{b}' for a, b in module.slices)} of {module.out_features})"
            found.setdefault(name.split(".")[-1], name.split(".")[-1] + rows)
    return ", ".join(found.values())


IA3_SITES: dict[str, str] = {}  # model type -> the layers (IA)³'s defaults rescale (for the table)


def ia3_sites(model) -> str:
    """"k_proj, v_proj; in: down_proj" or "query_key_value (rows 8:16, ...)": the layers whose outputs (IA)³
    rescales (with their rows on a fused projection), then those whose inputs it rescales."""
    outputs: dict[str, str] = {}
    inputs: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, IA3Scales):
            layer = name.rsplit(".", 1)[0].split(".")[-1]
            for slices in module.out_slices.values():
                rows = "" if slices == [(0, module.out_features)] else \
                    f" (rows {', '.join(f'{a}:{b}' for a, b in slices)} of {module.out_features})"
                outputs.setdefault(layer, layer + rows)
            if module.ia3_ff:
                inputs.setdefault(layer, layer)
    return ", ".join(outputs.values()) + ("; in: " + ", ".join(inputs.values()) if inputs else "")


def check_cell(kind: str, method: str, tmp_path) -> str | None:
    """Run every check of one cell; None when they pass, the refusal's message when the method is refused."""
    config, entry = CONFIGS[method], entry_of(method)
    base, inputs = fresh(kind), make_inputs()
    expected = logits(base, inputs)
    try:
        model = deltatune.attach(base, config, task="a")
    except DeltaTuneError as error:
        return str(error)
    if method == "lora":
        LORA_TARGETS[kind] = lora_targets(model)
    if method == "ia3":
        IA3_SITES[kind] = ia3_sites(model)
    if entry.identity_at_init:
        assert torch.equal(logits(model, inputs), expected), "a fresh delta changed the output"
    else:  # prompt/prefix vectors are attended to from the start; the base model stays exact
        assert not torch.equal(logits(model, inputs), expected), "the inserted vectors change nothing"
        model.use("base")
        assert torch.equal(logits(model, inputs), expected), "use('base') is not the base model"
        model.use("a")
    randomise(model, "a", seed=5)
    trained = logits(model, inputs)
    assert not torch.equal(trained, expected), "a randomised delta changes nothing"

    model.save_delta(tmp_path / "a")
    reloaded = deltatune.load_delta(fresh(kind), tmp_path / "a")
    assert torch.equal(logits(reloaded, inputs), trained), "save -> load onto a fresh base changed the logits"

    if entry.mixable:
        deltatune.attach(model, config, task="b")
        randomise(model, "b", seed=6)
        tasks = ["a", "b", "a"]
        try:
            mixed = logits(model, inputs, tasks=tasks)
        except DeltaTuneError as error:  # each task runs alone; a mixed batch of them is refused
            return f"(mixed batch) {error}"
        for i, task in enumerate(tasks):
            model.use(task)
            alone = logits(model, {k: v[i : i + 1] for k, v in inputs.items()})[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0, msg=f"mixed row {i} ({task})")
    return None


@pytest.fixture(scope="module")
def outcomes():
    """{model type: {method: "ok" | reason}}, written to $DELTATUNE_COVERAGE_JSON after the module."""
    found: dict[str, dict[str, str]] = {}
    yield found
    path = os.environ.get("DELTATUNE_COVERAGE_JSON")
    if path:
        for kind, targets in LORA_TARGETS.items():
            found.setdefault(kind, {})["lora targets"] = targets
        for kind, sites in IA3_SITES.items():
            found.setdefault(kind, {})["ia3 sites"] = sites
        with open(path, "w") as handle:
            json.dump({"methods": list(CONFIGS), "types": list(TINY_ZOO), "outcomes": found}, handle, indent=1)


@pytest.mark.parametrize("kind,method", MATRIX)
def test_method_on_architecture(kind, method, tmp_path, outcomes):
    try:
        refusal = check_cell(kind, method, tmp_path)
    except Exception as error:  # a failed check or a crash: recorded as broken, then reported
        outcomes.setdefault(kind, {})[method] = f"broken: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        raise
    outcomes.setdefault(kind, {})[method] = "ok" if refusal is None else f"refused: {refusal}"
    if refusal is None:
        assert (kind, method) not in REFUSALS, f"expected a refusal ({REFUSALS.get((kind, method))!r}); it applies"
    else:
        assert (kind, method) in REFUSALS, f"refused unexpectedly: {refusal}"
        assert REFUSALS[kind, method] in refusal, refusal


def test_the_readme_table_is_the_matrix():
    """README.md's coverage table (written by scripts/coverage_table.py from this matrix's results) shows ✓
    exactly where the matrix expects every check to pass, for every model type and every registered method."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- coverage-table:start -->")[1].split("<!-- coverage-table:end -->")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    header, body = rows[0], {row[0]: row for row in rows[1:]}
    stale = "README.md's coverage table is stale: run python scripts/coverage_table.py --readme"
    assert header[1 : 1 + len(CONFIGS)] == list(CONFIGS) and list(body) == list(TINY_ZOO), stale
    for kind, row in body.items():
        for method, cell in zip(CONFIGS, row[1:]):
            assert (cell == "✓") == ((kind, method) not in REFUSALS), f"{kind} x {method}: {cell!r}; {stale}"
