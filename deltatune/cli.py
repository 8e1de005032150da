"""The `deltatune` command: a thin layer that parses arguments, calls the library and prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from deltatune.config_file import config_path, read_config, write_config
from deltatune.errors import ConfigError, DeltaTuneError
from deltatune.formats.combine import CombineConfig
from deltatune.formats.native import delta_folder
from deltatune.methods.registry import METHODS, options_from_strings
from deltatune.models import MODEL_HELP
from deltatune.results.compare import PROMPTING_METHODS, CompareConfig
from deltatune.serving.config import ServeConfig
from deltatune.tasks.catalog import FILE_FORMATS
from deltatune.tasks.generation import GenerationFileOptions
from deltatune.training.loop import QUANTIZE_CHOICES, TrainConfig


# ---- options generated from config dataclasses (HfArgumentParser-style: one declaration per option) ----
def add_options(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = (),
                defaults: dict | None = None) -> None:
    """One `--field-name` option per field of `config_class`, typed from its annotation, its help (and
    choices) from the field's metadata. Booleans: `--x` when the default is False, `--x/--no-x` when True.
    A field without a default is a required option; `cli: False` in the metadata leaves a field out;
    `cli_default` (or `defaults`) gives the command a default of its own."""
    hints = typing.get_type_hints(config_class)
    for f in fields(config_class):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        kind = _without_none(hints[f.name])
        options: dict = {"dest": f.name, "help": f.metadata.get("help")}
        if f.default is MISSING and f.default_factory is MISSING:
            options["required"] = True
        else:
            default = f.default if f.default is not MISSING else f.default_factory()
            options["default"] = (defaults or {}).get(f.name, f.metadata.get("cli_default", default))
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction if options.get("default") else "store_true"
        elif typing.get_origin(kind) is list:
            options.update(type=_comma_list(typing.get_args(kind)[0]), metavar="A,B,...")
        else:
            options["type"] = kind
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), **options)


def config_from_args(config_class: type, args: argparse.Namespace, **values):
    """`config_class` from the options `add_options` declared, and `values` for the other fields."""
    given = {f.name: getattr(args, f.name) for f in fields(config_class)
             if f.metadata.get("cli", True) and hasattr(args, f.name)}
    return config_class(**{**given, **values})


def _without_none(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if len(options) == 1:
            return options[0]
    return hint


def _comma_list(item_type: type):
    def parse(text: str) -> list:
        return [item_type(part) for part in text.split(",")]
    return parse


def cmd_params(args: argparse.Namespace) -> int:
    from deltatune.results.params import format_table, parameter_table

    rows, config = parameter_table(args.arch)
    print(format_table(rows, args.arch, config))
    return 0


def key_values(pairs: list[str] | None) -> dict[str, str]:
    """`-o r=8 -o use-rslora=no` -> {"r": "8", "use_rslora": "no"}: strings, typed by `method_settings`."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"method option {pair!r} must look like KEY=VALUE (e.g. -o r=8)")
        options[key.replace("-", "_")] = value
    return options


def method_settings(method: str, pairs: list[str] | None, source: str = "-o") -> dict:
    """The -o options of `method`, typed and checked against its config now: a typo fails before any model
    loads. The prompting baselines (zero-shot, few-shot) have no config: their numbers are read as JSON."""
    options = key_values(pairs)
    if method in PROMPTING_METHODS:
        return {key: _json_or_text(value) for key, value in options.items()}
    return options_from_strings(method, options, source=source)


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def task_options(args: argparse.Namespace, prompt_format: dict | None = None, scored_whole: bool = False,
                 label_names: list[str] | None = None) -> dict:
    """csv/jsonl: the file and its columns; generation files (--format, or the `prompt_format` a delta
    was trained with) their format options (`GenerationFileOptions`).

    `scored_whole` (eval): the file scored, --dev-file else --data-file, is the "dev" split whole, not the seeded
    10% that training holds out of --data-file (a dataset folder keeps its own validation split). `label_names`: a
    classification delta's classes in its id order, so that a file holding only some of them is scored against the
    ids the delta learnt."""
    if args.task not in FILE_FORMATS:
        return {}
    if not args.data_file:
        raise DeltaTuneError(f"task {args.task!r} needs --data-file PATH (and --text-columns, --label-column, "
                             f"or --format for generation)")
    dev_file = args.dev_file or (args.data_file if scored_whole and Path(args.data_file).is_file() else None)
    files = {"path": args.data_file, **({"dev_path": dev_file} if dev_file else {})}
    if prompt_format and not args.format:  # evaluating a generation delta: the prompts it was trained with
        return {**files, "columns": key_values(args.columns),
                **{k: prompt_format[k] for k in ("format", "template", "chat_template", "assistant_turns")}}
    if args.format:
        return {**files, **config_from_args(GenerationFileOptions, args).task_options()}
    return {**files, "text_columns": args.text_columns.split(","), "label_column": args.label_column,
            **({"label_names": label_names} if label_names else {})}


def cmd_train(args: argparse.Namespace) -> int:
    from deltatune.training.loop import train

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DeltaTuneError(f"--out {args.out} is a file; the run folder must be a folder (new or existing)")
    saved = getattr(args, "config_values", {})  # --config FILE: its method_options / task_options, under the options
    method_options = {**options_from_strings(args.method, saved.get("method_options", {}), "--config method_options"),
                      **method_settings(args.method, args.option)}  # -o KEY=VALUE over the file's KEY
    files = saved["task_options"] if "task_options" in saved and not args.data_file else task_options(args)
    config = config_from_args(TrainConfig, args, method_options=method_options, task_options=files)
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
    args.task = args.task or meta["task"]
    task = get_task(args.task, **task_options(args, meta.get("prompt_format"), scored_whole=args.command == "eval",
                                              label_names=meta.get("label_names")))
    kind = {"classification": "classification", "regression": "regression", "generation": "causal-lm"}[task.kind]
    base = load_model(args.model, kind, num_labels=task.num_labels if task.kind == "classification" else None,
                      quantize=args.quantize)
    model = DeltaModel(base)
    model.add_delta(args.delta, trust_pickle=args.trust_pickle)
    return model, load_tokenizer(args.model), task


def cmd_eval(args: argparse.Namespace) -> int:
    """The task's metrics on each split (a --data-file/--dev-file scored whole), with the rows each one scored."""
    from deltatune.evaluate import score_predictions, task_predictions

    if args.method in PROMPTING_METHODS:
        if not args.task:
            raise DeltaTuneError(f"--method {args.method} needs --task (a task name, or csv/jsonl with --data-file)")
        return cmd_eval_prompting(args)
    if not args.delta:
        raise DeltaTuneError("eval needs --delta DIR (or --method zero-shot|few-shot --task T)")

    args.delta = str(delta_folder(args.delta))  # a run folder: its delta (and predictions.jsonl beside it)
    model, tokenizer, task = _load_for_inference(args)
    results, rows, predictions = {}, {}, []
    for split in args.split or [s for s in task.splits if s != "train"]:
        examples = task.load(split, args.data_dir, limit=args.limit)
        rows[split] = len(examples)
        outputs = task_predictions(model, tokenizer, task, examples, args.max_length)
        results[split] = score_predictions(task, examples, outputs)
        if task.kind == "generation":  # the texts it scored, for reading
            predictions += [{"split": split, **{k: v for k, v in e.items() if k != "references"},
                             "prediction": output, "references": e["references"]}
                            for e, output in zip(examples, outputs, strict=True)]
    if predictions:
        out = Path(args.out or Path(args.delta).parent)
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
        results["predictions"] = str(out / "predictions.jsonl")
    print(json.dumps({"task": task.name, "delta": str(args.delta), "rows": rows, **results}, indent=2))
    return 0


def _predict_generation(args: argparse.Namespace, prompt_format: dict) -> int:
    """`predict` with a delta trained on a generation file: each text's greedy completion, one JSON line each."""
    from deltatune.delta import DeltaModel
    from deltatune.evaluate import generate_completions
    from deltatune.models import load_model, load_tokenizer
    from deltatune.tasks.generation import typed_prompt_ids

    tokenizer = load_tokenizer(args.model)
    model = DeltaModel(load_model(args.model, "causal-lm", quantize=args.quantize))
    model.add_delta(args.delta, trust_pickle=args.trust_pickle)
    # an Alpaca delta: "INSTRUCTION ||| INPUT" (--pair-separator) is a row with an input, as chat's system + user
    split = prompt_format.get("format") == "alpaca"
    fields = [text.split(args.pair_separator, 1) if split and args.pair_separator in text else [text, ""]
              for text in args.texts]
    prompts = [typed_prompt_ids(tokenizer, instruction, prompt_format, True, context)[-args.max_length:]
               for instruction, context in fields]
    outputs = generate_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)
    for text, output in zip(args.texts, outputs, strict=True):
        print(json.dumps({"input": text, "output": output}, ensure_ascii=False))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream a delta's completion of one prompt, built the way the delta was trained."""
    import torch
    from transformers import TextStreamer

    from deltatune.delta import DeltaModel
    from deltatune.evaluate import stop_token_ids
    from deltatune.models import load_model, load_tokenizer
    from deltatune.tasks.generation import typed_prompt_ids

    tokenizer = load_tokenizer(args.model)
    model = DeltaModel(load_model(args.model, "causal-lm", quantize=args.quantize))
    if args.delta:
        model.add_delta(args.delta, trust_pickle=args.trust_pickle)
    saved = model.task_info[model.active_task].get("prompt_format") if args.delta else None
    ids = typed_prompt_ids(tokenizer, args.prompt, saved, delta=bool(args.delta))
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 \
        else {"do_sample": False}
    input_ids = torch.tensor([ids])
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       max_new_tokens=args.max_new_tokens,
                       streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(model, tokenizer), **sampling)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from deltatune.delta import read_saved_delta
    from deltatune.evaluate import generate_texts, predict_labels

    prompt_format = read_saved_delta(args.delta, trust_pickle=args.trust_pickle)[1].get("prompt_format")
    if prompt_format and not args.task:  # a generation-file delta: its prompts, no data file needed
        return _predict_generation(args, prompt_format)

    model, tokenizer, task = _load_for_inference(args)
    if task.kind == "generation":
        for text, output in zip(args.texts, generate_texts(model, tokenizer, args.texts)):
            print(json.dumps({"input": text, "output": output}))
        return 0
    inputs = [tuple(t.split(args.pair_separator, 1)) if args.pair_separator in t else t for t in args.texts]
    labels = model.task_info[model.active_task]["label_names"] or task.label_names
    for text, prediction in zip(args.texts, predict_labels(model, tokenizer, inputs, labels=labels,
                                                           max_length=args.max_length, digits=4)):
        print(json.dumps({**prediction, "input": text}))  # as typed, separator and all
    return 0


def _compare_config(args: argparse.Namespace):
    from deltatune.results.compare import base_method

    data_dir = args.data_dir or os.environ.get("DELTATUNE_DATA")
    if data_dir is None and Path("../shared/data").is_dir():
        data_dir = "../shared/data"  # the offline data folder beside the repo
    if data_dir is not None:  # one spelling per folder in the cells' configs, so finished cells are reused
        data_dir = str(Path(data_dir).expanduser().resolve())
    lr = {label: _number(f"--lr {label}={value}", value, float, "a learning rate (e.g. --lr lora=5e-4)")
          for label, value in _method_values(args, "lr").items()}
    method_seeds = {label: _number(f"--method-seeds {label}={value}", value, int, "a whole number >= 1 of seeds")
                    for label, value in _method_values(args, "method_seeds").items()}
    if getattr(args, "tasks", None) and args.task:
        raise ConfigError("give --task NAME or --tasks A,B,... (several tasks, one column each), not both")
    saved = getattr(args, "config_values", {})  # --config FILE: the settings without an option of their own
    files = saved["task_options"] if "task_options" in saved and not args.data_file else \
        task_options(args) if args.task else {}
    options = compare_method_options(args.methods, args.option)
    for label, settings in saved.get("method_options", {}).items():  # -o METHOD:KEY=VALUE over the file's KEY
        if base_method(label) in METHODS:
            settings = options_from_strings(base_method(label), settings, f"--config method_options.{label}")
        options[label] = {**settings, **options.get(label, {})}
    return config_from_args(
        CompareConfig, args, data_dir=data_dir, task_options=files, lr={**saved.get("lr", {}), **lr},
        method_seeds={**saved.get("method_seeds", {}), **method_seeds}, method_options=options)


def _method_values(args: argparse.Namespace, name: str) -> dict[str, str]:
    """--lr / --method-seeds METHOD=VALUE pairs, each naming a method or variant the command runs (a typo would
    otherwise leave that row on its default without a word). Variant names keep their dashes (`adapter@lin-small`)."""
    from deltatune.results.compare import base_method

    flag = "--" + name.replace("_", "-")
    labels = getattr(args, "methods", None) or [args.method]
    known = {*labels, *(base_method(label) for label in labels)}
    values = {}
    for pair in getattr(args, name, None) or []:
        label, sep, value = pair.partition("=")
        if not sep or not value:
            raise ConfigError(f"{flag} {pair!r} must look like METHOD=VALUE (e.g. {flag} lora=...)")
        if label not in known:
            raise ConfigError(f"{flag} {pair}: {label!r} is not one of the methods run here ({', '.join(labels)}); "
                              f"name one of them")
        values[label] = value
    return values


def _number(what: str, value: str, kind: type, expected: str):
    """`value` read as `kind` (and >= 1 for a count), or a ConfigError that says what was expected."""
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or (kind is int and number < 1):
        raise ConfigError(f"{what}: expected {expected}")
    return number


def compare_method_options(labels: list[str], pairs: list[str] | None) -> dict[str, dict]:
    """`-o METHOD:KEY=VALUE` per method and `-o METHOD@NAME:KEY=VALUE` per variant, typed by the method's config
    (a variant's options go over its method's). Unknown methods get none: they fail as their own cells."""
    from deltatune.results.compare import base_method

    options = {}
    for label in dict.fromkeys([*labels, *(base_method(label) for label in labels)]):
        method = base_method(label)
        if method in METHODS or method in PROMPTING_METHODS:
            mine = [o.split(":", 1)[1] for o in pairs or [] if o.startswith(label + ":")]
            options[label] = method_settings(method, mine, source="-o")
    known = {label + ":" for label in options}
    stray = [o for o in pairs or [] if "@" in o.split(":", 1)[0] and not any(o.startswith(k) for k in known)]
    if stray:
        raise ConfigError(f"-o {stray[0]!r} names no variant of --methods {','.join(labels)}; add it to "
                          f"--methods (e.g. --methods adapter@small -o adapter@small:bottleneck=8)")
    return options


def cmd_compare(args: argparse.Namespace) -> int:
    from deltatune.results.compare import compare

    config = _compare_config(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_config(asdict(config), Path(args.out) / "config.yaml")  # `compare --config OUT/config.yaml` reruns it
    payload = compare(config, command=args.command_line)
    print((Path(args.out) / "report.md").read_text())
    return 0 if payload["rows"] else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from deltatune.results.compare import sweep

    name, _, values = args.param.partition("=")
    if not values:
        raise DeltaTuneError(f"--param {args.param!r} must look like NAME=V1,V2,... (e.g. length=1,5,10,20,50)")
    name = name.replace("-", "_")
    if args.method in METHODS:  # each value typed as the method's setting (`-o NAME=VALUE` would be)
        parsed = [method_settings(args.method, [f"{name}={v}"], source="--param")[name] for v in values.split(",")]
    else:
        parsed = [json.loads(v) if v.strip().lstrip("-").replace(".", "", 1).isdigit() else v
                  for v in values.split(",")]
    args.methods = [args.method]
    sweep(_compare_config(args), args.method, name, parsed, command=args.command_line)
    print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from deltatune.serving.app import serve

    deltas: dict[str | None, str] = {}
    saved = getattr(args, "config_values", {}).get("delta", {})  # --config FILE: `delta: {NAME: DIR}`
    for spec in args.delta or [f"{name}={path}" for name, path in saved.items()]:
        name, sep, path = spec.partition("=")
        deltas[name if sep else None] = path if sep else spec  # DIR alone: the task name saved in the delta
    serve(args.model, deltas, host=args.host, port=args.port, config=config_from_args(ServeConfig, args))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from deltatune.formats.peft import export_peft

    print(f"wrote {export_peft(args.delta, args.out)} (Hugging Face peft adapter: PeftModel.from_pretrained)")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    from deltatune.formats.combine import combine_deltas

    deltas = []
    for spec in args.delta:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise ConfigError(f"--delta {spec!r} must look like NAME=DIR (e.g. --delta sst2=runs/sst2-lora/delta)")
        deltas.append((name, path))
    config = config_from_args(CombineConfig, args)
    out = combine_deltas(deltas, args.out, config)
    meta = json.loads((out / "delta.json").read_text())
    print(json.dumps({"out": str(out), "task": meta["task"], **meta["combined"]}, indent=2))
    return 0


def cmd_prompt(args: argparse.Namespace) -> int:
    """Zero-/few-shot prompting of a causal LM (Brown et al. 2020): the baseline that trains nothing."""
    from deltatune.models import load_model, load_tokenizer
    from deltatune.prompting import fewshot
    from deltatune.prompting.demonstrations import choose_demonstrations, select_demonstrations

    model, tokenizer = load_model(args.model, "causal-lm", quantize=args.quantize), load_tokenizer(args.model)
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
    """The zero-/few-shot floor of a task or of the user's file (scored whole; few-shot demonstrations from
    --data-file, never a row's own answer: `demonstrations.plan_demonstrations`)."""
    from deltatune.models import load_model, load_tokenizer
    from deltatune.prompting.fewshot import evaluate_fewshot
    from deltatune.tasks import get_task

    shots = 0 if args.method == "zero-shot" else args.shots
    task = get_task(args.task, **task_options(args, scored_whole=True))
    model, tokenizer = load_model(args.model, "causal-lm", quantize=args.quantize), load_tokenizer(args.model)
    results = {}
    for split in args.split or ["dev"]:
        results[split] = evaluate_fewshot(model, tokenizer, task, shots=shots, split=split, data_dir=args.data_dir,
                                          limit=args.limit, seed=args.seed, select_from=args.select_from,
                                          calibration_inputs=args.calibration_inputs)
    rows = {split: result["examples"] for split, result in results.items()}
    print(json.dumps({"task": args.task, "method": args.method, "rows": rows, **results}, indent=2, default=str))
    return 0


def _add_task_file_arguments(parser: argparse.ArgumentParser) -> None:
    """The csv/jsonl task's file and columns, or a generation file's format (`task_options`)."""
    parser.add_argument("--data-file", help="csv/jsonl tasks: the file")
    parser.add_argument("--dev-file", help="csv/jsonl: a separate dev file (default: a seeded 10%% of --data-file)")
    parser.add_argument("--text-columns", default="text", help="csv/jsonl: text column(s), comma-separated")
    parser.add_argument("--label-column", default="label", help="csv/jsonl: label column")
    add_options(parser.add_argument_group("generation files (csv/jsonl with --format)"), GenerationFileOptions)


def _add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """--quantize of the commands that run a delta (train's own, in TrainConfig, says how the delta trains)."""
    parser.add_argument("--quantize", choices=list(QUANTIZE_CHOICES),
                        help="load the base's block linear weights quantized (deltatune.core.quantize): less memory, "
                             "outputs close to but not equal to the full-precision base's; the delta stays as saved")


def _add_model_argument(parser: argparse.ArgumentParser, what: str = "the base model", **options) -> None:
    parser.add_argument("--model", help=f"{what}: {MODEL_HELP}", **options)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="folder laid out like shared/data (default: $DELTATUNE_DATA, then the hub)")
    _add_task_file_arguments(parser)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per input (longer ones are cut)")


# ---- --config FILE (deltatune/config_file.py): the file's settings are the defaults the options override ----
CONFIG_CLASSES = {"train": TrainConfig, "compare": CompareConfig, "serve": ServeConfig}
SERVE_KEYS = {"model": str, "delta": dict[str, str], "host": str, "port": int}  # serve's options beside ServeConfig


def _add_config_argument(parser: argparse.ArgumentParser, keys: str) -> None:
    parser.add_argument("--config", metavar="FILE.yaml",
                        help=f"settings from a YAML file ({keys}); options given here override it")


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """With `--config FILE`, the file's settings become the defaults of the command's options (so an option given
    on the command line wins) and `args.config_values` (for the settings without an option of their own: the
    method's and task's options, per-method learning rates, serve's deltas)."""
    path = config_path(argv)
    if path is None or not argv or argv[0] not in CONFIG_CLASSES:
        return
    values = read_config(path, CONFIG_CLASSES[argv[0]], SERVE_KEYS if argv[0] == "serve" else None)
    command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    defaults = {"config_values": values}
    for action in command._actions:
        if action.dest in values and not isinstance(action, argparse._AppendAction):  # -o, --lr, --delta: merged
            defaults[action.dest] = values[action.dest]
            action.required = False
    command.set_defaults(**defaults)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Parameter-efficient fine-tuning (LoRA, adapters, prompt tuning, BitFit) as per-task deltas.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    _add_training_commands(commands)
    _add_inference_commands(commands)
    return parser


def _add_training_commands(commands) -> None:
    """params, train, compare, sweep."""
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
    _add_config_argument(train, "OUT/config.yaml of a run: the same run again")
    add_options(train, TrainConfig)
    train.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                       help="method option, repeatable: -o r=8 -o alpha=16 -o targets=query,value -o use_rslora=yes")
    _add_task_file_arguments(train)
    train.set_defaults(handler=cmd_train)

    for name, handler, help_text in [("compare", cmd_compare, "train every method on one task and compare them"),
                                     ("sweep", cmd_sweep, "one method, one parameter over several values")]:
        sub = commands.add_parser(name, help=help_text)
        if name == "compare":
            _add_config_argument(sub, "CompareConfig fields and method_options: {METHOD: {KEY: VALUE}}")
            add_options(sub, CompareConfig)
        else:
            add_options(sub, CompareConfig, skip=("methods",), defaults={"seeds": 3, "out": "runs/sweep"})
            sub.add_argument("--method", required=True, help=f"the method swept: {' | '.join(METHODS)}")
            sub.add_argument("--param", required=True, help="NAME=V1,V2,... e.g. length=1,5,10,20,50")
        sub.add_argument("--lr", action="append", metavar="METHOD=LR", help="per-method learning rate")
        if name == "compare":
            sub.add_argument("--method-seeds", action="append", metavar="METHOD=N",
                             help="seeds for one method or variant, over --seeds (e.g. --method-seeds lora=3: "
                                  "LoRA's row over 3 seeds, the others over --seeds)")
        sub.add_argument("-o", "--option", action="append", metavar="METHOD:KEY=VALUE",
                         help="method option, e.g. -o lora:r=16 -o prompt:length=10; for a variant of --methods "
                              "adapter@small: -o adapter@small:bottleneck=8")
        _add_task_file_arguments(sub)
        sub.set_defaults(handler=handler)


def _add_inference_commands(commands) -> None:
    """prompt, eval, predict, generate, export, combine, serve."""
    _add_prompt_command(commands)
    for name, handler, help_text in [("eval", cmd_eval, "score a saved delta (or a zero-/few-shot baseline) on a "
                                                        "task or your file"),
                                     ("predict", cmd_predict, "run a saved delta on given texts")]:
        sub = commands.add_parser(name, help=help_text)
        _add_model_argument(sub, required=True)
        sub.add_argument("--delta", required=name == "predict",
                         help="delta folder (delta.safetensors + delta.json), or a run folder (its delta/)")
        sub.add_argument("--task", help="default: the task the delta was trained on")
        sub.add_argument("--trust-pickle", action="store_true",
                         help="also read a delta whose weights are a pickle (.bin/.pt): torch.load(weights_only=True)")
        _add_quantize_argument(sub)
        _add_data_arguments(sub)
        if name == "eval":
            _add_eval_arguments(sub)
        else:
            sub.add_argument("texts", nargs="+", help="inputs; sentence pairs as 'first ||| second' (an Alpaca "
                                                                 "delta: 'instruction ||| input')")
            sub.add_argument("--pair-separator", default=" ||| ", help="what splits a text into a sentence pair")
            sub.add_argument("--max-new-tokens", type=int, default=128, help="generation deltas: tokens at most")
        sub.set_defaults(handler=handler)
    _add_generate_command(commands)
    _add_delta_file_commands(commands)
    _add_serve_command(commands)


def _add_prompt_command(commands) -> None:
    prompt = commands.add_parser("prompt", help="zero-/few-shot completion with a causal LM")
    _add_model_argument(prompt, "a causal LM", default="smollm2")
    prompt.add_argument("text", help="the prompt (after any demonstrations)")
    prompt.add_argument("--task", help="draw --shots demonstrations from this task's train split")
    prompt.add_argument("--shots", type=int, default=0, help="demonstrations put before the text (with --task)")
    prompt.add_argument("--examples", help="a file of solved examples put before the text")
    prompt.add_argument("--seed", type=int, default=0, help="which demonstrations are drawn")
    prompt.add_argument("--select-from", type=int, default=1, metavar="N",
                        help="classification: the best of N demonstration draws on held-out train examples")
    prompt.add_argument("--max-new-tokens", type=int, default=20, help="tokens generated at most")
    prompt.add_argument("--show-prompt", action="store_true", help="print the full prompt, then the completion")
    prompt.add_argument("--data-dir", help="folder laid out like shared/data (default: $DELTATUNE_DATA, then the hub)")
    _add_quantize_argument(prompt)
    prompt.set_defaults(handler=cmd_prompt)


def _add_eval_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--split", action="append",
                     help="split(s) to score (default: all but train; a --data-file or --dev-file: the whole file)")
    sub.add_argument("--out", help="generation files: where predictions.jsonl goes (default: beside --delta)")
    sub.add_argument("--method", choices=list(PROMPTING_METHODS),
                     help="prompting baselines of a causal LM (no delta): label-word scoring / generation")
    sub.add_argument("--shots", type=int, default=4, help="few-shot: demonstrations from the train split")
    sub.add_argument("--select-from", type=int, default=1, metavar="N",
                     help="few-shot classification: the best of N demonstration draws, scored on 256 "
                          "held-out train examples (8 is a good choice)")
    sub.add_argument("--seed", type=int, default=0, help="few-shot: which demonstrations are drawn")
    sub.add_argument("--calibration-inputs", type=int, default=256, metavar="N",
                     help="classification: batch calibration over N unlabeled train inputs (0: off)")
    sub.add_argument("--limit", type=int, metavar="N", help="score only the first N rows of each split")


def _add_generate_command(commands) -> None:
    generate = commands.add_parser("generate", help="stream a causal LM's completion of a prompt under a delta")
    _add_model_argument(generate, "the base causal LM", required=True)
    generate.add_argument("--delta", help="delta folder, or a run folder (its delta/); its prompt format "
                                          "(chat template...) is applied")
    generate.add_argument("prompt", help="the prompt, instruction or user message")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated at most")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    generate.add_argument("--seed", type=int, default=0, help="the sampling seed (with --temperature > 0)")
    generate.add_argument("--trust-pickle", action="store_true",
                          help="also read a delta whose weights are a pickle (.bin/.pt): torch.load(weights_only=True)")
    _add_quantize_argument(generate)
    generate.set_defaults(handler=cmd_generate)


def _add_delta_file_commands(commands) -> None:
    """export, combine."""
    export = commands.add_parser("export", help="write a delta in another library's format (peft: LoRA, prompt)")
    export.add_argument("--delta", required=True, help="delta folder (delta.safetensors + delta.json)")
    export.add_argument("--format", required=True, choices=["peft"], help="peft: adapter_config.json + safetensors")
    export.add_argument("out", help="folder to write")
    export.set_defaults(handler=cmd_export)

    combine = commands.add_parser("combine", help="combine LoRA deltas of one base model into one delta "
                                                  "(linear, svd, ties, dare)")
    combine.add_argument("--delta", action="append", required=True, metavar="NAME=DIR",
                         help="a LoRA delta to combine, repeatable, in the order of --weights")
    combine.add_argument("--out", required=True, help="folder of the combined delta (written atomically)")
    add_options(combine, CombineConfig)
    combine.set_defaults(handler=cmd_combine)


def _add_serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="an HTTP service for many task deltas on one base model, "
                                              "batching requests across tasks")
    _add_config_argument(serve, "ServeConfig fields, model, host, port and delta: {NAME: DIR}")
    _add_model_argument(serve, required=True)
    serve.add_argument("--delta", action="append", metavar="NAME=DIR",
                       help="a delta to serve as task NAME, repeatable (DIR alone: its saved task name)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (printed at start)")
    add_options(serve, ServeConfig)
    serve.set_defaults(handler=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        apply_config_file(parser, argv)
        args = parser.parse_args(argv)
        args.command_line = "deltatune " + " ".join(argv)
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
