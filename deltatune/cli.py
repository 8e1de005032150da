"""The `deltatune` command: a thin layer that parses arguments, calls the library and prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deltatune.errors import DeltaTuneError


def cmd_params(args: argparse.Namespace) -> int:
    from deltatune.params import format_table, parameter_table

    rows, config = parameter_table(args.arch)
    print(format_table(rows, args.arch, config))
    return 0


def parse_options(pairs: list[str] | None) -> dict:
    """`-o r=8 -o targets=query,value` -> {"r": 8, "targets": ["query", "value"]} (JSON where it parses)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise DeltaTuneError(f"method option {pair!r} must look like KEY=VALUE (e.g. -o r=8)")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value.split(",") if "," in value else value
    return options


def task_options(args: argparse.Namespace) -> dict:
    if args.task not in {"csv", "jsonl"}:
        return {}
    if not args.data_file:
        raise DeltaTuneError(f"task {args.task!r} needs --data-file PATH (and --text-columns, --label-column)")
    return {"path": args.data_file, "text_columns": args.text_columns.split(","), "label_column": args.label_column}


def method_options(args: argparse.Namespace) -> dict:
    """The -o options, checked against the method's settings now: a typo fails before any model loads."""
    from deltatune.registry import METHODS, config_from_dict

    if args.method not in METHODS:
        raise DeltaTuneError(f"unknown method {args.method!r}; the methods are {sorted(METHODS)}")
    options = parse_options(args.option)
    try:
        config_from_dict(args.method, options)
    except (TypeError, ValueError) as error:
        raise DeltaTuneError(f"bad -o option for {args.method}: {error}") from None
    return options


def cmd_train(args: argparse.Namespace) -> int:
    from deltatune.train import TrainConfig, train

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DeltaTuneError(f"--out {args.out} is a file; the run folder must be a folder (new or existing)")
    config = TrainConfig(
        model=args.model, task=args.task, method=args.method, out=args.out,
        method_options=method_options(args), task_options=task_options(args), data_dir=args.data_dir,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_length=args.max_length,
        seed=args.seed, eval_every=args.eval_every, train_limit=args.train_limit, eval_limit=args.eval_limit,
        checkpoint_every=args.checkpoint_every, resume=args.resume, precision=args.precision,
        progress=not args.no_progress, on_nonfinite=args.on_nonfinite, grad_checkpointing=args.grad_checkpointing,
        fsdp=args.fsdp,
    )
    summary = train(config)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun/accelerate launch: one summary, not one per rank
        print(json.dumps(summary, indent=2))
    return 0


def _load_for_inference(args: argparse.Namespace):
    """Base model (with the head the delta's task needs) + the delta, and the task."""
    from deltatune.delta import DeltaModel, read_saved_delta
    from deltatune.models import load_model, load_tokenizer
    from deltatune.tasks import get_task

    _, meta = read_saved_delta(args.delta, trust_pickle=args.trust_pickle)
    task = get_task(args.task or meta["task"], **task_options(args))
    kind = {"classification": "classification", "regression": "regression", "generation": "causal-lm"}[task.kind]
    base = load_model(args.model, kind, num_labels=task.num_labels if task.kind == "classification" else None)
    model = DeltaModel(base)
    model.add_delta(args.delta, trust_pickle=args.trust_pickle)
    return model, load_tokenizer(args.model), task


def cmd_eval(args: argparse.Namespace) -> int:
    from deltatune.evaluate import evaluate

    if args.method in {"zero-shot", "few-shot"}:
        if not args.task:
            raise DeltaTuneError(f"--method {args.method} needs --task")
        return cmd_eval_prompting(args)
    if not args.delta:
        raise DeltaTuneError("eval needs --delta DIR (or --method zero-shot|few-shot --task T)")

    model, tokenizer, task = _load_for_inference(args)
    results = {}
    for split in args.split or [s for s in task.splits if s != "train"]:
        examples = task.load(split, args.data_dir, limit=args.limit)
        results[split] = evaluate(model, tokenizer, task, examples, max_length=args.max_length)
    print(json.dumps({"task": task.name, "delta": str(args.delta), **results}, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from deltatune.data import Encoded
    from deltatune.evaluate import generate_texts, predict_scores

    model, tokenizer, task = _load_for_inference(args)
    if task.kind == "generation":
        for text, output in zip(args.texts, generate_texts(model, tokenizer, args.texts)):
            print(json.dumps({"input": text, "output": output}))
        return 0
    pairs = [t.split(args.pair_separator, 1) if args.pair_separator in t else [t] for t in args.texts]
    encoded = tokenizer([p[0] for p in pairs], [p[1] for p in pairs] if all(len(p) == 2 for p in pairs) else None,
                        truncation=True, max_length=args.max_length)
    items = [Encoded(ids, encoded["token_type_ids"][i] if "token_type_ids" in encoded else None, None)
             for i, ids in enumerate(encoded["input_ids"])]
    scores = predict_scores(model, items, tokenizer.pad_token_id)
    labels = model.task_info[model.active_task]["label_names"] or task.label_names
    for text, row in zip(args.texts, scores):
        if task.kind == "regression":
            print(json.dumps({"input": text, "score": round(row.item(), 4)}))
            continue
        probabilities = row.softmax(-1).tolist()
        best = int(row.argmax())
        print(json.dumps({"input": text, "label": labels[best] if labels else best,
                          "probabilities": {(labels[i] if labels else str(i)): round(p, 4)
                                            for i, p in enumerate(probabilities)}}))
    return 0


def _compare_config(args: argparse.Namespace):
    from deltatune.compare import CompareConfig

    data_dir = args.data_dir or os.environ.get("DELTATUNE_DATA")
    if data_dir is None and Path("../shared/data").is_dir():
        data_dir = "../shared/data"  # the offline data folder beside the repo
    if data_dir is not None:  # one spelling per folder in the cells' configs, so finished cells are reused
        data_dir = str(Path(data_dir).expanduser().resolve())
    return CompareConfig(
        model=args.model, task=args.task, task_options=task_options(args) if args.task else {},
        methods=args.methods.split(","), seeds=args.seeds, budget=args.budget, out=args.out,
        batch_size=args.batch_size, max_length=args.max_length, data_dir=data_dir,
        train_limit=args.train_limit, eval_limit=args.eval_limit, latency=not args.no_latency, precision=args.precision,
        lr={k: float(v) for k, v in parse_options(args.lr).items()},
        method_options={m: parse_options([o.split(":", 1)[1] for o in args.option or [] if o.startswith(m + ":")])
                        for m in args.methods.split(",")},
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from deltatune.compare import compare

    payload = compare(_compare_config(args), command=args.command_line)
    print((Path(args.out) / "report.md").read_text())
    return 0 if payload["rows"] else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from deltatune.compare import sweep

    name, _, values = args.param.partition("=")
    if not values:
        raise DeltaTuneError(f"--param {args.param!r} must look like NAME=V1,V2,... (e.g. length=1,5,10,20,50)")
    parsed = [json.loads(v) if v.strip().lstrip("-").replace(".", "", 1).isdigit() else v for v in values.split(",")]
    args.methods = args.method
    sweep(_compare_config(args), args.method, name.replace("-", "_"), parsed,
          command=args.command_line)
    print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from deltatune.serve import ServeConfig, serve

    deltas: dict[str | None, str] = {}
    for spec in args.delta or []:
        name, sep, path = spec.partition("=")
        deltas[name if sep else None] = path if sep else spec  # DIR alone: the task name saved in the delta
    config = ServeConfig(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                         max_inputs=args.max_inputs, max_length=args.max_length, trust_pickle=args.trust_pickle)
    serve(args.model, deltas, host=args.host, port=args.port, config=config)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from deltatune.peft_format import export_peft

    print(f"wrote {export_peft(args.delta, args.out)} (Hugging Face peft adapter: PeftModel.from_pretrained)")
    return 0


def cmd_prompt(args: argparse.Namespace) -> int:
    """Zero-/few-shot prompting of a causal LM: the document's starting point."""
    from deltatune.models import load_model, load_tokenizer
    from deltatune.prompting import fewshot
    from deltatune.prompting.demonstrations import choose_demonstrations, select_demonstrations

    model, tokenizer = load_model(args.model, "causal-lm"), load_tokenizer(args.model)
    prefix = ""
    if args.examples:  # a file of solved examples, one per line, used as written
        prefix = Path(args.examples).read_text().rstrip("\n") + "\n"
    elif args.task and args.shots:
        from deltatune.tasks import get_task

        task = get_task(args.task)
        template = fewshot.template_for(task)
        words = fewshot.label_words_for(task, template) if task.kind == "classification" else []
        pool = task.load("train", args.data_dir)
        if args.select_from > 1:
            # ranked by raw accuracy: no batch calibration inputs to score
            demonstrations, selection = choose_demonstrations(
                model, tokenizer, template, words, pool, args.shots, seed=args.seed, candidates=args.select_from,
                calibration_inputs=0)
            print(f"chose draw {selection['chosen_draw']} of {selection['candidates']} (accuracy on "
                  f"{selection['validation_examples']} held-out train examples: "
                  f"{selection['validation_accuracies']})", file=sys.stderr)
        else:
            demonstrations = select_demonstrations(pool, args.shots, seed=args.seed)
        prefix = template.build_prefix(demonstrations, words)
    prompt = prefix + args.text
    completion = fewshot.complete(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens)
    if args.show_prompt:
        print(prompt, end="")
        print(f"\033[1m{completion}\033[0m" if sys.stdout.isatty() else completion)
    else:
        print(completion.strip())
    return 0


def cmd_eval_prompting(args: argparse.Namespace) -> int:
    from deltatune.models import load_model, load_tokenizer
    from deltatune.prompting.fewshot import evaluate_fewshot

    shots = 0 if args.method == "zero-shot" else args.shots
    model = load_model(args.model, "causal-lm")
    results = {}
    for split in args.split or ["dev"]:
        results[split] = evaluate_fewshot(model, load_tokenizer(args.model), args.task, shots=shots, split=split,
                                          data_dir=args.data_dir, limit=args.limit, seed=args.seed,
                                          select_from=args.select_from,
                                          calibration_inputs=args.calibration_inputs)
    print(json.dumps({"task": args.task, "method": args.method, **results}, indent=2, default=str))
    return 0


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="folder laid out like shared/data (default: $DELTATUNE_DATA, then the hub)")
    parser.add_argument("--data-file", help="csv/jsonl tasks: the file")
    parser.add_argument("--text-columns", default="text", help="csv/jsonl: text column(s), comma-separated")
    parser.add_argument("--label-column", default="label", help="csv/jsonl: label column")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per input (longer ones are cut)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Parameter-efficient fine-tuning (LoRA, adapters, prompt tuning, BitFit) as per-task deltas.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    params = commands.add_parser(
        "params", help="trainable parameters of every method for an architecture (built without weights)"
    )
    params.add_argument(
        "--arch",
        default="roberta-large",
        help="roberta-large | roberta-base | bert-large | bert-base | gpt2-medium | gpt2 | minilm | PATH",
    )
    params.set_defaults(handler=cmd_params)

    train = commands.add_parser("train", help="train one method on one task; saves the best delta in OUT/delta")
    train.add_argument("--model", required=True, help="minilm | smollm2 | a local folder | a hub name")
    train.add_argument("--task", required=True, help="sst2 rte mrpc stsb cola e2e bbc-news csv jsonl")
    train.add_argument("--method", required=True, help="lora | bitfit | adapter | prompt | full")
    train.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                       help="method option, repeatable: -o r=8 -o alpha=16 -o targets=query,value")
    train.add_argument("--out", required=True, help="run folder (delta, checkpoints, metrics.jsonl, summary.json)")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--lr", type=float, help="learning rate (default: per method, see README)")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--warmup-ratio", type=float, default=0.06)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-every", type=int, help="evaluate every N steps (default: each epoch)")
    train.add_argument("--train-limit", type=int, help="use only the first N training examples")
    train.add_argument("--eval-limit", type=int, help="evaluate on the first N examples only")
    train.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (for --resume)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    train.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                       help="auto (default): bf16 autocast where the CPU/GPU has native bf16 math, else fp32")
    train.add_argument("--on-nonfinite", choices=["stop", "skip"], default="stop")
    train.add_argument("--grad-checkpointing", action="store_true")
    train.add_argument("--fsdp", action="store_true",
                       help="under torchrun / accelerate launch: shard the model over the processes (FSDP2)")
    train.add_argument("--no-progress", action="store_true")
    _add_data_arguments(train)
    train.set_defaults(handler=cmd_train)

    for name, handler, help_text in [("compare", cmd_compare, "train every method on one task and compare them"),
                                     ("sweep", cmd_sweep, "one method, one parameter over several values")]:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--model", default="minilm")
        sub.add_argument("--task", help="default: sst2 if the data folder has it, else bbc-news")
        if name == "compare":
            sub.add_argument("--methods", default="full,lora,adapter,bitfit,prompt",
                             help="comma-separated; also zero-shot, few-shot (a causal LM: --model smollm2; "
                                  "-o few-shot:shots=4)")
        else:
            sub.add_argument("--method", required=True)
            sub.add_argument("--param", required=True, help="NAME=V1,V2,... e.g. length=1,5,10,20,50")
        sub.add_argument("--seeds", type=int, default=1 if name == "compare" else 3)
        sub.add_argument("--budget", default="steps=300", help="per cell: steps=N | epochs=E | seconds=S")
        sub.add_argument("--out", default=f"runs/{name}")
        sub.add_argument("--batch-size", type=int, default=32)
        sub.add_argument("--train-limit", type=int)
        sub.add_argument("--eval-limit", type=int)
        sub.add_argument("--lr", action="append", metavar="METHOD=LR", help="per-method learning rate")
        sub.add_argument("-o", "--option", action="append", metavar="METHOD:KEY=VALUE",
                         help="method option, e.g. -o lora:r=16 -o prompt:length=10")
        sub.add_argument("--no-latency", action="store_true", help="skip the inference latency measurements")
        sub.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                         help="training precision of every cell (auto: bf16 autocast where the hardware has it)")
        _add_data_arguments(sub)
        sub.set_defaults(handler=handler)
    prompt = commands.add_parser("prompt", help="zero-/few-shot completion with a causal LM")
    prompt.add_argument("--model", default="smollm2")
    prompt.add_argument("text", help="the prompt (after any demonstrations)")
    prompt.add_argument("--task", help="draw --shots demonstrations from this task's train split")
    prompt.add_argument("--shots", type=int, default=0)
    prompt.add_argument("--examples", help="a file of solved examples put before the text")
    prompt.add_argument("--seed", type=int, default=0)
    prompt.add_argument("--select-from", type=int, default=1, metavar="N",
                        help="classification: the best of N demonstration draws on held-out train examples")
    prompt.add_argument("--max-new-tokens", type=int, default=20)
    prompt.add_argument("--show-prompt", action="store_true", help="print the full prompt, then the completion")
    prompt.add_argument("--data-dir")
    prompt.set_defaults(handler=cmd_prompt)
    commands.choices["compare"].set_defaults(max_length=64)
    commands.choices["sweep"].set_defaults(max_length=64)

    for name, handler, help_text in [("eval", cmd_eval, "evaluate a saved delta on its task"),
                                     ("predict", cmd_predict, "run a saved delta on given texts")]:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--model", required=True)
        sub.add_argument("--delta", required=name == "predict", help="delta folder (delta.safetensors + delta.json)")
        sub.add_argument("--task", help="default: the task the delta was trained on")
        sub.add_argument("--trust-pickle", action="store_true",
                         help="also read a delta whose weights are a pickle (.bin/.pt): torch.load(weights_only=True)")
        _add_data_arguments(sub)
        if name == "eval":
            sub.add_argument("--split", action="append", help="split(s) to score (default: all but train)")
            sub.add_argument("--method", choices=["zero-shot", "few-shot"],
                             help="prompting baselines of a causal LM (no delta): label-word scoring / generation")
            sub.add_argument("--shots", type=int, default=4, help="few-shot: demonstrations from the train split")
            sub.add_argument("--select-from", type=int, default=1, metavar="N",
                             help="few-shot classification: the best of N demonstration draws, scored on 256 "
                                  "held-out train examples (8 is a good choice)")
            sub.add_argument("--seed", type=int, default=0, help="few-shot: which demonstrations are drawn")
            sub.add_argument("--calibration-inputs", type=int, default=256, metavar="N",
                             help="classification: batch calibration over N unlabeled train inputs (0: off)")
            sub.add_argument("--limit", type=int)
        else:
            sub.add_argument("texts", nargs="+", help="inputs; sentence pairs as 'first ||| second'")
            sub.add_argument("--pair-separator", default=" ||| ")
        sub.set_defaults(handler=handler)

    export = commands.add_parser("export", help="write a delta in another library's format (peft: LoRA, prompt)")
    export.add_argument("--delta", required=True, help="delta folder (delta.safetensors + delta.json)")
    export.add_argument("--format", required=True, choices=["peft"], help="peft: adapter_config.json + safetensors")
    export.add_argument("out", help="folder to write")
    export.set_defaults(handler=cmd_export)

    serve = commands.add_parser("serve", help="an HTTP service for many task deltas on one base model, "
                                              "batching requests across tasks")
    serve.add_argument("--model", required=True, help="the base model: minilm | a local folder | a hub name")
    serve.add_argument("--delta", action="append", metavar="NAME=DIR",
                       help="a delta to serve as task NAME, repeatable (DIR alone: its saved task name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (printed at start)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="inputs in one forward pass at most")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others")
    serve.add_argument("--queue-size", type=int, default=256, help="waiting requests at most; more get 503")
    serve.add_argument("--max-inputs", type=int, default=64, help="inputs in one request at most")
    serve.add_argument("--max-length", type=int, default=128, help="tokens per input (longer ones are cut)")
    serve.add_argument("--trust-pickle", action="store_true", help="also load deltas stored as pickles")
    serve.set_defaults(handler=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = "deltatune " + " ".join(argv)
    try:
        return args.handler(args)
    except DeltaTuneError as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # one line
        print(f"deltatune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGINT/SIGTERM during training (a checkpoint is saved)
        print(f"deltatune: {stop or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
