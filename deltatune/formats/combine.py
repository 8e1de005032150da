"""Combining LoRA deltas of one base model into one delta: linear, SVD, TIES and DARE.

Each delta i changes an adapted weight by ΔW_i = s_i B_i A_i (s_i = alpha/r or alpha/sqrt(r), Hu et al. 2021
eq. 3), per output slice of a fused layer. Given weights w_i, `how` says what the combined delta holds:

- "linear": exactly Σ w_i ΔW_i, as one LoRA of rank Σ r_i with the factors concatenated along the rank:
      A = [A_1; A_2; ...]      B = [c_1 B_1, c_2 B_2, ...]      c_i = w_i s_i / s
  (s: the combined delta's scaling, the first delta's). The weight sits on B alone: A stays as trained and
  a negative weight subtracts a task (Ilharco et al. 2023, "Editing Models with Task Arithmetic" §3). A
  single delta at weight 1 comes back bit for bit (c = 1 leaves B untouched). (peft 0.21's
  `add_weighted_adapter` puts w_i s_i on A in its "cat" mode, and sqrt(|w_i s_i|) on each factor, the sign on A,
  in its TIES/DARE modes.)
- "svd": Σ w_i ΔW_i, then its best rank-k approximation (Eckart–Young), as k-rank factors. Taken from the
  linear factors (QR of each, SVD of the small Σr x Σr core), never from a d_out x d_in matrix; at
  k = Σ r_i (the default) it is the linear result, refactored.
- "ties": Yadav et al. 2023, "TIES-Merging" §3, on each layer's w_i ΔW_i: trim each to its largest
  `density` share of entries by magnitude, elect each entry's sign as that of the trimmed values' sum,
  and average the entries that agree with it (disjoint mean); then a rank-k SVD of the result.
- "dare": Yu et al. 2023, "Language Models are Super Mario" §3: drop each entry of each ΔW_i with
  probability p = 1 - density and scale the survivors by 1/(1 - p) (seeded), then Σ w_i of them; then a
  rank-k SVD.

The weights scale each task's ΔW before the merge, as in peft: TIES as in the paper (λ = 1) is weights 1,1;
the average of two deltas in "linear" is 0.5,0.5. Trimming and dropping act per adapted matrix (peft does
the same), not over the whole model's parameter vector as in the papers.

Task heads are not combined: a head maps the shared body's features to one task's labels, and averaging
the heads of different tasks means nothing. The combined delta carries the head (and label names, and by
default the task name) of one delta, `head=` (default: the first). For several tasks, write one combined
delta per task (`head="sst2"`, `head="rte"`): their LoRA factors are the same.

Only plain LoRA deltas of one base model combine: same base (names, shapes and weights), the same adapted
layers with the same output slices; a delta of another method, or one that holds tensors besides LoRA's A,
B and its head (DoRA's magnitudes, ...), is refused by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from deltatune._version import __version__
from deltatune.errors import ConfigError, DeltaError
from deltatune.formats.native import FORMAT, FORMAT_VERSION, write_delta
from deltatune.formats.peft import PEFT_FORMAT, read_saved_delta
from deltatune.formats.peft_methods import _slices as lora_slices
from deltatune.methods.lora import LoRA, alpha_for_scaling
from deltatune.methods.registry import build_config

HOWS = ["linear", "svd", "ties", "dare"]
DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.1}  # Yadav et al. 2023 keep the top 20%; Yu et al. 2023 drop 90%


@dataclass
class CombineConfig:
    """`deltatune combine`: each field's `help` is its option (cli.add_options)."""

    how: str = field(default="linear", metadata={
        "help": "linear: exact Σ w_i ΔW_i at rank Σ r_i | svd: that at --rank | ties (Yadav et al. 2023) | "
                "dare (Yu et al. 2023)", "choices": HOWS})
    weights: list[float] | None = field(default=None, metadata={
        "help": "one weight per --delta, in order (default: 1/n each, the average)"})
    rank: int | None = field(default=None, metadata={
        "help": "svd/ties/dare: rank of the combined delta (default: the sum of the deltas' ranks)"})
    density: float | None = field(default=None, metadata={
        "help": "ties: share of each ΔW's entries kept by magnitude (default 0.2); dare: share kept at random, "
                "p = 1 - density dropped (default 0.1)"})
    seed: int = field(default=0, metadata={"help": "dare: seed of the random drops"})
    head: str | None = field(default=None, metadata={
        "help": "the --delta NAME whose task head, label names and task name the result carries (default: the "
                "first)"})
    task: str | None = field(default=None, metadata={"help": "task name saved in the result (default: the head's)"})

    def __post_init__(self) -> None:
        if self.how not in HOWS:
            raise ConfigError(f"combine: unknown --how {self.how!r}; choose one of {HOWS}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"combine: --rank must be >= 1, got {self.rank}")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ConfigError(f"combine: --density must be in (0, 1], got {self.density}")
        if self.how in ("linear", "svd") and self.density is not None:
            raise ConfigError(f"combine: --density applies to ties and dare, not {self.how}")
        if self.how == "linear" and self.rank is not None:
            raise ConfigError("combine: linear keeps every rank (Σ r_i); give --rank with --how svd, ties or dare")


@dataclass
class Source:
    """One delta to combine: its name on the command line, tensors and delta.json, and where it came from."""

    name: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    origin: str  # a path, or "task NAME" of a DeltaModel

    @property
    def config(self) -> LoRA:
        return build_config("lora", self.meta["config"], source=f"{self.origin}: delta.json")

    @property
    def modules(self) -> list[str]:
        """The adapted layers: keys `<module>.lora_A`."""
        return sorted(key[: -len(".lora_A")] for key in self.tensors if key.endswith(".lora_A"))


def combine(sources: list[Source], config: CombineConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, delta.json) of the combined delta; see the module doc for what each `how` computes."""
    if not sources:
        raise ConfigError("combine: give at least one delta (--delta NAME=DIR)")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"combine: delta names must differ, got {names}")
    weights = config.weights if config.weights is not None else [1.0 / len(sources)] * len(sources)
    if len(weights) != len(sources):
        raise ConfigError(f"combine: {len(weights)} weight(s) {weights} for {len(sources)} deltas {names}; give "
                          f"one per --delta, in order")
    if config.head is not None and config.head not in names:
        raise ConfigError(f"combine: --head {config.head!r} is none of the deltas {names}")
    check_combinable(sources)
    head = next(s for s in sources if s.name == (config.head or names[0]))
    configs = [s.config for s in sources]
    total_rank = sum(c.r for c in configs)
    rank = total_rank if config.how == "linear" else config.rank or total_rank
    # the combined delta's settings: the first delta's, at the new rank with the first's scaling
    out_config = configs[0] if rank == configs[0].r else replace(
        configs[0], r=rank, alpha=alpha_for_scaling(configs[0].scaling, rank, configs[0].use_rslora))
    tensors: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(config.seed)
    for module in sources[0].modules:
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = _combine_layer(
            module, sources, configs, weights, out_config, config, generator)
    head_keys = list(head.meta["head_keys"])
    tensors.update({key: head.tensors[key] for key in head_keys})
    density = config.density if config.density is not None else DEFAULT_DENSITY.get(config.how)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "deltatune_version": __version__,
        "task": config.task or head.meta["task"], "method": "lora", "config": asdict(out_config),
        "label_names": head.meta["label_names"], "head_keys": head_keys,
        "num_parameters": sum(t.numel() for t in tensors.values()), "base": sources[0].meta["base"],
        "combined": {"how": config.how, "weights": weights, "rank": rank, "density": density,
                     "seed": config.seed if config.how == "dare" else None, "head": head.name,
                     "deltas": [{"name": s.name, "task": s.meta["task"], "from": s.origin, "r": c.r,
                                 "scaling": c.scaling} for s, c in zip(sources, configs, strict=True)]},
    }
    if sources[0].meta.get("output_rows"):  # the fused layers' adapted row groups (checked equal for all)
        meta["output_rows"] = sources[0].meta["output_rows"]
    if head.meta.get("prompt_format"):
        meta["prompt_format"] = head.meta["prompt_format"]
    return tensors, meta


def check_combinable(sources: list[Source]) -> None:
    """Refuse, by name, deltas that are not plain LoRA or do not share one base model and one layout."""
    for source in sources:
        meta = source.meta
        if meta.get("format") == PEFT_FORMAT:
            raise DeltaError(f"{source.origin} is a peft adapter folder, which does not record its base model; load "
                             f"it (deltatune.load_delta) and save_delta it, then combine that")
        if meta["method"] != "lora":
            raise DeltaError(f"{source.origin} is a {meta['method']} delta; combine takes plain LoRA deltas "
                             f"(method lora)")
        lora_keys = {f"{m}.lora_{x}" for m in source.modules for x in "AB"}
        other = sorted(set(source.tensors) - lora_keys - set(meta["head_keys"]))
        if other:
            raise DeltaError(f"{source.origin} holds tensors that are neither LoRA A/B nor its head ({other[:3]}); "
                             f"combine takes plain LoRA deltas, whose update is s B A alone")
    first = sources[0]
    for source in sources[1:]:
        mine, theirs = first.meta["base"], source.meta["base"]
        same = mine.get("shape_fingerprint") == theirs.get("shape_fingerprint") and (
            mine.get("weights_fingerprint") == theirs.get("weights_fingerprint"))
        if not same:
            raise DeltaError(f"{source.origin} was made for base model {theirs.get('name_or_path')!r} (weights "
                             f"{theirs.get('weights_fingerprint')}) and {first.origin} for "
                             f"{mine.get('name_or_path')!r} (weights {mine.get('weights_fingerprint')}); only "
                             f"deltas of one base model combine")
        if source.modules != first.modules:
            only = sorted(set(source.modules) ^ set(first.modules))
            raise DeltaError(f"{source.origin} and {first.origin} adapt different layers ({only[:3]} in one only); "
                             f"combine takes deltas with the same LoRA targets")
    for source in sources[1:]:
        if source.meta.get("output_rows") != first.meta.get("output_rows"):
            raise DeltaError(f"{source.origin} and {first.origin} adapt different output rows of fused layers; "
                             f"combine takes deltas with the same LoRA targets")
    for module, layout in (first.meta.get("output_rows") or {}).items():
        widths = {sum(end - start for start, end in group) for group in layout["rows"]}
        if len(widths) != 1:
            raise DeltaError(f"{module}: row groups of different widths ({sorted(widths)}); combine does not "
                             f"split those yet")
    model_type = first.meta["base"].get("model_type")
    for module in first.modules:
        layouts = set()
        for source in sources:
            config, A, B = source.config, source.tensors[f"{module}.lora_A"], source.tensors[f"{module}.lora_B"]
            slices = lora_slices(module, config.targets, model_type, A.shape[0] // config.r, B.shape[0])
            layouts.add((A.shape[0] // config.r, A.shape[1], B.shape[0], str(slices)))
        if len(layouts) != 1:
            raise DeltaError(f"{module}: the deltas adapt it differently (slices, shapes: {sorted(layouts)}); "
                             f"combine takes deltas with the same LoRA targets")


def _combine_layer(module, sources, configs, weights, out_config, config, generator):
    """The combined (A, B) of one adapted layer: (S*k, d_in), (S*w, k) for S output slices of width w."""
    A_first = sources[0].tensors[f"{module}.lora_A"]
    n_slices = A_first.shape[0] // configs[0].r
    width = sources[0].tensors[f"{module}.lora_B"].shape[0] // n_slices
    # linear: per slice [A_1; A_2; ...] and [c_1 B_1, c_2 B_2, ...], c_i = w_i s_i / s (1.0: B_i untouched)
    A_parts, B_parts = [], []
    for source, lora, weight in zip(sources, configs, weights, strict=True):
        A, B = source.tensors[f"{module}.lora_A"], source.tensors[f"{module}.lora_B"]
        factor = weight * lora.scaling / out_config.scaling
        A_parts.append(A.reshape(n_slices, lora.r, -1))  # (S, r_i, d_in)
        B_parts.append((B if factor == 1.0 else B * factor).reshape(n_slices, width, lora.r))  # (S, w, r_i)
    A_linear, B_linear = torch.cat(A_parts, dim=1), torch.cat(B_parts, dim=2)  # (S, R, d_in), (S, w, R)
    if config.how == "linear":
        return A_linear.flatten(0, 1), B_linear.flatten(0, 1)
    A_out, B_out = [], []
    for s in range(n_slices):
        if config.how == "svd":
            A_s, B_s = _low_rank_of_product(B_linear[s], A_linear[s], out_config.r)
        else:
            deltas = [w * c.scaling * (src.tensors[f"{module}.lora_B"].reshape(n_slices, width, c.r)[s].double()
                                       @ src.tensors[f"{module}.lora_A"].reshape(n_slices, c.r, -1)[s].double())
                      for src, c, w in zip(sources, configs, weights, strict=True)]  # (w, d_in) each
            density = config.density if config.density is not None else DEFAULT_DENSITY[config.how]
            merged = ties(deltas, density) if config.how == "ties" else dare(deltas, density, generator)
            A_s, B_s = _low_rank(merged / out_config.scaling, out_config.r)
        A_out.append(A_s.to(A_first.dtype))
        B_out.append(B_s.to(A_first.dtype))
    return torch.cat(A_out), torch.cat(B_out)


def ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023 §3) of weighted task matrices: trim each to its top `density` share by
    magnitude, elect each entry's sign from the trimmed sum, average the entries that agree (disjoint mean)."""
    trimmed = torch.stack([keep_largest(delta, density) for delta in deltas])  # (n, ...)
    sign = torch.sign(trimmed.sum(dim=0))  # the sign of the larger total mass
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its int(density * numel) largest-magnitude entries set to 0."""
    keep = int(density * tensor.numel())
    if keep >= tensor.numel():
        return tensor.clone()
    mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    mask[tensor.abs().flatten().topk(keep).indices] = True
    return tensor * mask.view(tensor.shape)


def dare(deltas: list[torch.Tensor], density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2023 §3): each entry dropped with probability 1 - density, survivors / density; summed."""
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        kept = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
        total += delta * kept / density
    return total


def _low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), A (rank, d_in) and B (w, rank), with B A the best rank-`rank` approximation of `matrix`: the top
    singular values split evenly, sqrt(S) on each side (zero rows beyond the matrix's own rank)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = S[:rank].sqrt()
    A = matrix.new_zeros(rank, matrix.shape[1])
    B = matrix.new_zeros(matrix.shape[0], rank)
    A[: len(root)] = root[:, None] * Vh[:rank]
    B[:, : len(root)] = U[:, :rank] * root
    return A, B


def _low_rank_of_product(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_low_rank(B @ A, rank)` without forming B @ A: B = Q_B R_B, A^T = Q_A R_A (QR), the SVD of the small
    core R_B R_A^T = U S V^T, and then B A = (Q_B U) S (Q_A V)^T. In float64."""
    Q_B, R_B = torch.linalg.qr(B.double())  # (w, m), (m, R)
    Q_A, R_A = torch.linalg.qr(A.double().T)  # (d_in, n), (n, R)
    A_core, B_core = _low_rank(R_B @ R_A.T, rank)  # (rank, n), (m, rank)
    return A_core @ Q_A.T, Q_B @ B_core


# ---- reading the deltas, writing the result ------------------------------------------------------------
def read_sources(deltas: dict[str, str | Path] | list[tuple[str, str | Path]]) -> list[Source]:
    """{name: delta folder} (or (name, folder) pairs) -> Sources, in order."""
    sources = []
    for name, path in deltas.items() if isinstance(deltas, dict) else deltas:
        tensors, meta = read_saved_delta(path)
        sources.append(Source(name, tensors, meta, str(path)))
    return sources


def combine_deltas(deltas: dict[str, str | Path] | list[tuple[str, str | Path]], out: str | Path,
                   config: CombineConfig) -> Path:
    """Combine the delta folders {name: path} and write the result to folder `out` (atomically)."""
    tensors, meta = combine(read_sources(deltas), config)
    return write_delta(out, tensors, meta)
