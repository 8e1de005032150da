"""The user's own generation data: prompt-completion, Alpaca and chat (`messages`) files -> a decoder task.

Three formats, read from JSON lines (all three) or CSV (the first two):

- ``prompt-completion``: ``{"prompt": ..., "completion": ...}``; the prompt is shown as written (or
  through `template`, a ``{prompt}`` format string), the completion follows it, then EOS;
- ``alpaca``: ``{"instruction", "input" (may be empty or absent), "output"}`` in the Stanford Alpaca
  prompt (Taori et al. 2023), the output follows ``### Response:\\n``, then EOS;
- ``messages``: the OpenAI chat format ``{"messages": [{"role": "system"|"user"|"assistant",
  "content": ...}, ...]}``, rendered with the tokenizer's own chat template (or one given as a file).

The loss is on what the model must produce only: the completion + EOS, or the assistant turns of a
conversation (all of them, or the last one: `assistant_turns`) including the template's end-of-turn
token, never on prompts, user turns or the template's role headers. How a prompt is built is recorded
in the delta (`PromptFormat.to_dict` -> delta.json ``prompt_format``), so that `generate`, `eval` and
`serve` build exactly the prompts the delta was trained on.

Splits: "train", and "dev" = `dev_path` if given, else a fixed seeded 10% of the rows. Evaluation
examples are ``{"prompt": ..., "references": [completion]}`` or ``{"messages": [...all but the last
assistant turn], "references": [its content]}``.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from deltatune.errors import ChatTemplateError, DataError, LengthWarning
from deltatune.tasks.hf_datasets import file_task_source, is_dataset_path, open_dataset
from deltatune.tasks.sources import read_json_lines, read_table, split_off_dev
from deltatune.tasks.task import Example, Task

FORMATS = ("prompt-completion", "alpaca", "messages")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # labels the loss skips (as deltatune.tasks.encoding)
GENERATION_METRICS = ["chrf", "sacrebleu", "rougeL", "exact_match"]  # the first picks the best checkpoint
# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
DEFAULT_COLUMNS = {
    "prompt-completion": {"prompt": "prompt", "completion": "completion"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "messages": {"messages": "messages"},
}


@dataclass
class GenerationFileOptions:
    """The command-line options of generation files (``--task csv|jsonl --format ...``), declared once."""

    format: str | None = field(default=None, metadata={
        "choices": list(FORMATS), "help": "a generation file: prompt/completion, Alpaca instruction/input/output, "
                                          "or OpenAI chat messages (rendered with the model's chat template)"})
    columns: list[str] | None = field(default=None, metadata={
        "help": "the file's names for the fields, FIELD=COLUMN,...: prompt=question,completion=answer"})
    chat_template: str | None = field(default=None, metadata={
        "help": "messages: a Jinja chat template FILE (default: the tokenizer's)"})
    template: str | None = field(default=None, metadata={
        "help": "prompt-completion: a format string with {prompt} (default: the prompt as written)"})
    assistant_turns: str = field(default="all", metadata={
        "choices": ["all", "last"], "help": "messages: the loss on all assistant turns or the last one only"})
    overlong: str = field(default="cut", metadata={
        "choices": ["cut", "drop"], "help": "training rows longer than --max-length: cut or dropped (counted)"})

    def task_options(self) -> dict[str, Any]:
        """`generation_file_task` keyword arguments (besides the files), the template read from its file."""
        options: dict[str, Any] = {"format": self.format, "assistant_turns": self.assistant_turns,
                                   "overlong": self.overlong, "columns": {}}
        for pair in self.columns or []:
            name, sep, column = pair.partition("=")
            if not sep:
                raise DataError(f"--columns {pair!r} must look like FIELD=COLUMN (e.g. prompt=question)")
            options["columns"][name.strip()] = column.strip()
        if self.template:
            options["template"] = self.template
        if self.chat_template:
            template_file = Path(self.chat_template).expanduser()
            if not template_file.is_file():
                raise ChatTemplateError(f"--chat-template {self.chat_template}: no such file (a Jinja chat template)")
            options["chat_template"] = template_file.read_text()
        return options


@dataclass
class PromptFormat:
    """How one example becomes the prompt the model sees and the target it learns; saved with the delta.

    Attributes:
        format: ``prompt-completion``, ``alpaca`` or ``messages``.
        template: prompt-completion: a format string with ``{prompt}``; alpaca: the prompt with an input.
        template_no_input: alpaca: the prompt for rows without an input.
        chat_template: messages: the Jinja chat template (the tokenizer's, filled in by `resolve`).
        assistant_turns: messages: ``all`` assistant turns carry loss, or the ``last`` one only.
        add_eos: append the tokenizer's EOS to completions (the model learns to stop).
        overlong: training rows longer than --max-length are ``cut`` to it or ``drop``ped (both reported).
    """

    format: str
    template: str = "{prompt}"
    template_no_input: str | None = None
    chat_template: str | None = None
    assistant_turns: str = "all"
    add_eos: bool = True
    overlong: str = "cut"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"unknown generation format {self.format!r}; choose one of {list(FORMATS)}")
        if self.assistant_turns not in ("all", "last"):
            raise DataError(f"assistant_turns must be 'all' or 'last', got {self.assistant_turns!r}")
        if self.overlong not in ("cut", "drop"):
            raise DataError(f"overlong must be 'cut' or 'drop', got {self.overlong!r}")
        if self.format == "alpaca" and self.template == "{prompt}":
            self.template, self.template_no_input = ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PromptFormat:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise DataError(f"prompt_format has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    def resolve(self, tokenizer) -> PromptFormat:
        """Fill in the tokenizer's chat template (messages); an error naming --chat-template if it has none."""
        if self.format == "messages" and self.chat_template is None:
            template = getattr(tokenizer, "chat_template", None)
            if isinstance(template, dict):  # several named templates: the default one
                template = template.get("default")
            if not template:
                raise ChatTemplateError(
                    f"the tokenizer of this model ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template, "
                    f"so a 'messages' file cannot be rendered; pass --chat-template FILE (a Jinja template, e.g. "
                    f"the model card's chat_template.jinja), or use --format prompt-completion"
                )
            self.chat_template = template
        return self

    # ---- prompts ------------------------------------------------------------------------------------
    def prompt_text(self, example: Example, tokenizer=None) -> str:
        """The text before the completion: what `generate` feeds the model for this example."""
        if self.format == "messages":
            return self.render(tokenizer, example["messages"], add_generation_prompt=True)
        return example["prompt"]

    def prompt_ids(self, example: Example, tokenizer) -> list[int]:
        """The token ids of `prompt_text`, as the model saw them in training before the completion."""
        if self.format == "messages":  # the template writes any BOS itself
            return tokenizer(self.prompt_text(example, tokenizer), add_special_tokens=False)["input_ids"]
        return prompt_token_ids(tokenizer, example["prompt"])

    def format_row(self, row: dict[str, str]) -> str:
        """prompt-completion / alpaca: the prompt text of one row's fields."""
        if self.format == "alpaca":
            if row.get("input"):
                return self.template.format(instruction=row["instruction"], input=row["input"])
            return (self.template_no_input or self.template).format(instruction=row["instruction"], input="")
        return self.template.format(prompt=row["prompt"])

    def prompt_for_text(self, text: str, tokenizer=None, context: str = "") -> str:
        """The prompt for a text typed by a user (`deltatune generate "..."`): the prompt, the instruction or
        the user turn of a new conversation. Alpaca: `context` is the row's input (its "### Input:" section)."""
        if self.format == "messages":
            return self.render(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
        return self.format_row({"prompt": text, "instruction": text, "input": context})

    def render(self, tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
        self.resolve(tokenizer)
        return tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    # ---- token ids and loss masks -------------------------------------------------------------------
    def encode(self, example: Example, tokenizer) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a training example: labels are the ids where the loss is, else -100.
        Labels are aligned with the ids (the model predicts labels[t] at position t - 1)."""
        if self.format == "messages":
            return self._encode_conversation(example["messages"], tokenizer)
        prompt_ids = prompt_token_ids(tokenizer, example["prompt"])
        target_ids = tokenizer(example["target"], add_special_tokens=False)["input_ids"]
        if self.add_eos:
            target_ids = [*target_ids, tokenizer.eos_token_id]
        return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids

    def assistant_spans(self, tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of the assistant turns that carry loss.

        A turn's span starts where the template's prompt for it ends (the conversation before it, rendered
        with ``add_generation_prompt=True``, is a prefix of the text) and ends at the end of the
        conversation rendered up to that turn, minus trailing whitespace: the content and the template's
        end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), which the model must learn to emit."""
        text = self.render(tokenizer, messages)
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if self.assistant_turns == "last":
            turns = turns[-1:]
        spans = []
        for i in turns:
            before = self.render(tokenizer, messages[:i], add_generation_prompt=True)
            through = self.render(tokenizer, messages[: i + 1]).rstrip()
            if not (through.startswith(before) and text.startswith(through)):
                raise ChatTemplateError(
                    "the chat template does not render a conversation as the concatenation of its turns (the "
                    "prompt for a turn is not a prefix of the conversation), so the assistant tokens cannot be "
                    "located; pass a --chat-template FILE that renders turns one after another"
                )
            spans.append((len(before), len(through)))
        return text, spans

    def _encode_conversation(self, messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
        text, spans = self.assistant_spans(tokenizer, messages)
        if not getattr(tokenizer, "is_fast", False):
            raise ChatTemplateError("chat files need a fast tokenizer (character offsets locate the assistant "
                                    "turns); load the model's tokenizer.json")
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        # a token belongs to the span its first character is in
        labels = [
            token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
            for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        return ids, labels


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """A plain prompt's ids, with BOS in front where the tokenizer adds one (as `data.encode` does)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def encode_examples(
    prompt_format: PromptFormat, examples: list[Example], tokenizer, max_length: int,
    for_training: bool = True, overlong: str | None = None,
) -> list[tuple[list[int], list[int] | None]]:
    """(token ids, labels) of every example (labels None for evaluation prompts). Training rows longer
    than `max_length` are cut to it (`overlong="cut"`) or dropped (``"drop"``); a cut row left without
    any target token is dropped.
    Both are counted and reported in one `LengthWarning`, never lost silently. Evaluation prompts keep
    their last `max_length` tokens (the ones next to the answer)."""
    prompt_format.resolve(tokenizer)
    if not for_training:
        return [(prompt_format.prompt_ids(e, tokenizer)[-max_length:], None) for e in examples]
    overlong = overlong or prompt_format.overlong
    items, cut, dropped, longest = [], [], [], 0
    for index, example in enumerate(examples):
        ids, labels = prompt_format.encode(example, tokenizer)
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            if overlong == "drop":
                dropped.append(example.get("where", f"row {index + 1}"))
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels[1:]):  # nothing left to learn
                dropped.append(example.get("where", f"row {index + 1}"))
                continue
            cut.append(example.get("where", f"row {index + 1}"))
        items.append((ids, labels))
    if cut or dropped:
        warnings.warn(
            f"{len(cut) + len(dropped)} of {len(examples)} training rows are longer than --max-length {max_length} "
            f"tokens (longest: {longest}): {len(cut)} cut to {max_length}"
            + (f" ({', '.join(cut[:3])}{', ...' if len(cut) > 3 else ''})" if cut else "")
            + f", {len(dropped)} dropped"
            + (f" ({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''})" if dropped else "")
            + "; raise --max-length to keep them whole", LengthWarning, stacklevel=2)
    if not items:
        raise DataError(f"no training row fits in --max-length {max_length} tokens; raise --max-length")
    return items


# ---- reading files ------------------------------------------------------------------------------------
@dataclass
class Row:
    """One row of a generation file: where it is and its fields."""

    where: str  # "path, line N"
    values: dict[str, Any] = field(default_factory=dict)

    def error(self, problem: str) -> DataError:
        return DataError(f"{self.where}: {problem}")


def read_rows(path: Path, columns: dict[str, str], delimiter: str | None) -> list[Row]:
    """The file's rows with the format's fields under their standard names (columns may be renamed)."""
    if not path.is_file():
        raise DataError(f"data file {path} not found (resolved to {path.resolve()})")
    rows = []
    if path.suffix.lower() in (".csv", ".tsv"):
        if "messages" in columns:
            raise DataError(f"{path}: the messages format needs a JSON-lines file (one conversation per line)")
        table = read_table(path, delimiter=delimiter or ("\t" if path.suffix.lower() == ".tsv" else ","),
                           quoting=csv.QUOTE_MINIMAL)
        optional = {"input"}
        indices = {name: table.column(column) for name, column in columns.items()
                   if name not in optional or column in table.columns}
        for line, values in table.rows:
            rows.append(Row(f"{path}, line {line}", {name: values[i] for name, i in indices.items()}))
        return rows
    rows = mapping_rows(path, read_json_lines(path), columns)
    if not rows:
        raise DataError(f"{path} is empty: expected one JSON object per line")
    return rows


def mapping_rows(source: Path | str, values: Iterable[tuple[int, dict]], columns: dict[str, str],
                 unit: str = "line") -> list[Row]:
    """Numbered mappings (a JSON-lines file's objects, a dataset's rows) as rows of the format's fields."""
    rows = []
    for line, value in values:
        where = f"{source}, {unit} {line}"
        missing = [column for name, column in columns.items() if column not in value and name != "input"]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}; the fields are {list(value)} "
                            f"(name the columns with --columns FIELD=COLUMN)")
        rows.append(Row(where, {name: value[column] for name, column in columns.items() if column in value}))
    return rows


def check_conversation(row: Row) -> list[dict[str, str]]:
    """A `messages` value checked: roles known, system only first, user and assistant taking turns from a
    user turn on, ending with a non-empty assistant turn."""
    messages = row.values["messages"]
    if not isinstance(messages, list) or not messages:
        raise row.error("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    checked = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise row.error(f"message {number} must be an object with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise row.error(f"message {number} has unknown role {role!r}; the roles are {list(ROLES)}")
        if not isinstance(content, str):
            raise row.error(f"message {number} ({role}): content must be a string")
        checked.append({"role": role, "content": content})
    offset = 1 if checked[0]["role"] == "system" else 0
    turns = checked[offset:]
    for k, message in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise row.error(f"turns out of order: message {offset + k + 1} is {message['role']!r} where {expected!r} "
                            f"belongs (an optional system message first, then user and assistant taking turns)")
    if not turns or turns[-1]["role"] != "assistant":
        raise row.error("the conversation must end with an assistant turn (the answer to learn)")
    empty = [n for n, m in enumerate(checked, start=1) if m["role"] == "assistant" and not m["content"].strip()]
    if empty:
        raise row.error(f"assistant message {empty[0]} is empty: nothing to learn")
    return checked


def row_example(row: Row, prompt_format: PromptFormat) -> Example:
    """A training example: ``{"prompt", "target", "where"}`` or ``{"messages", "where"}``."""
    if prompt_format.format == "messages":
        return {"messages": check_conversation(row), "where": row.where}
    names = ["prompt", "completion"] if prompt_format.format == "prompt-completion" else ["instruction", "output"]
    for name in [*names, "input"]:
        value = row.values.get(name)
        if value is not None and not isinstance(value, str):
            raise row.error(f"field {name!r} must be a string, got {type(value).__name__}")
    target = row.values[names[1]]
    if not target.strip():
        raise row.error(f"empty {names[1]}: nothing to learn")
    if not row.values[names[0]].strip():
        raise row.error(f"empty {names[0]}")
    return {"prompt": prompt_format.format_row(row.values), "target": target, "where": row.where}


def evaluation_example(example: Example) -> Example:
    """A dev example: the prompt (or the conversation before the last assistant turn) and its reference."""
    if "messages" in example:
        return {"messages": example["messages"][:-1], "references": [example["messages"][-1]["content"]]}
    return {"prompt": example["prompt"], "references": [example["target"]]}


def generation_file_task(
    file_format: str,
    path: str | Path | None = None,
    format: str = "prompt-completion",
    dev_path: str | Path | None = None,
    columns: dict[str, str] | None = None,
    chat_template: str | None = None,
    template: str | None = None,
    assistant_turns: str = "all",
    overlong: str = "cut",
    delimiter: str | None = None,
    name: str | None = None,
    data: Any = None,
) -> Task:
    """A generation task over the user's ``jsonl`` (or ``csv``/``.tsv``, parquet, arrow) file(s) or `save_to_disk`
    folder, or a `datasets.Dataset` / `DatasetDict` in memory (`data`); read now.

    Args:
        file_format: ``"jsonl"`` or ``"csv"`` (what `--task` said; the file's suffix decides how it is read).
        path: the training data (also "dev", holding out a seeded 10%, unless `dev_path` is given).
        format: ``prompt-completion``, ``alpaca`` or ``messages``.
        columns: field names to use instead of the standard ones, e.g. ``{"prompt": "question"}``.
        chat_template: a Jinja chat template (its text) instead of the tokenizer's.
        template: prompt-completion: a format string with ``{prompt}``; alpaca: the prompt with an input.
        assistant_turns: messages: loss on ``all`` assistant turns or the ``last`` one.
        overlong: training rows longer than the maximum length are ``cut`` or ``drop``ped.
        data: a `datasets.Dataset` or `DatasetDict` instead of `path` (`hf_datasets`: its splits).
    """
    prompt_format = PromptFormat(format, **({"template": template} if template else {}),
                                 chat_template=chat_template, assistant_turns=assistant_turns, overlong=overlong)
    names = {**DEFAULT_COLUMNS[format], **(columns or {})}
    unknown = set(names) - set(DEFAULT_COLUMNS[format])
    if unknown:
        raise DataError(f"format {format!r} has no field(s) {sorted(unknown)}; its fields are "
                        f"{list(DEFAULT_COLUMNS[format])}")

    def read(file: str | Path, role: str = "train") -> list[Example]:
        if is_dataset_path(file):  # as the dev file: a DatasetDict's validation split, if it has one
            dataset = open_dataset(file)
            split = "dev" if role == "dev" and dataset.dev is not None else "train"
            return dataset_examples(dataset, split, names, prompt_format)
        return [row_example(row, prompt_format) for row in read_rows(Path(file).expanduser(), names, delimiter)]

    source, dataset = file_task_source(file_format, path, data)
    train = dataset_examples(dataset, "train", names, prompt_format) if dataset else read(source)
    if dev_path is not None:
        dev = read(dev_path, "dev")
    elif dataset and dataset.dev is not None:
        dev = dataset_examples(dataset, "dev", names, prompt_format)
    else:
        train, dev = split_off_dev(train, dataset.source if dataset else path)
    splits = {"train": train, "dev": [evaluation_example(e) for e in dev]}
    return Task(
        name=name or file_format,
        kind="generation",
        metric_names=list(GENERATION_METRICS),
        splits=("train", "dev"),
        loader=lambda split, data_dir: list(splits[split]),
        description=f"{format} data from {dataset.source if dataset else path}"
        + (f" (dev: {dev_path})" if dev_path else ""),
        prompt_format=prompt_format,
    )


def dataset_examples(splits, split: str, names: dict[str, str], prompt_format: PromptFormat) -> list[Example]:
    """A dataset split's rows (`hf_datasets.DatasetSplits`) as training examples, numbered from 1."""
    rows = mapping_rows(splits.where(split), splits.rows(split), names, unit="row")
    if not rows:
        raise DataError(f"{splits.where(split)} has no rows")
    return [row_example(row, prompt_format) for row in rows]


# ---- prompts typed by a user (`deltatune generate`, `deltatune serve`) -----------------------------------------
def generation_prompt(source: str) -> str:
    """How a data-to-text source (an E2E meaning representation) is shown to a decoder."""
    return f"{source}\nSentence:"


def typed_prompt_ids(tokenizer, text: str, prompt_format: dict | None, delta: bool, context: str = "") -> list[int]:
    """The ids of the prompt a user's text becomes under a delta, built the way the delta was trained: its saved
    prompt format (a file task: template, alpaca or the user turn of a chat); a delta of the built-in
    data-to-text task (no format saved): the E2E prompt; no delta: the text itself. Alpaca: `text` is the
    instruction and `context` the input (empty: the no-input prompt, as Taori et al. 2023's train.py)."""
    if prompt_format:
        fmt = PromptFormat.from_dict(prompt_format)
        prompt = fmt.prompt_for_text(text, tokenizer, context)
        if fmt.format == "messages":  # the chat template writes any BOS itself
            return tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return prompt_token_ids(tokenizer, prompt)
    return tokenizer(generation_prompt(text) if delta else text, add_special_tokens=False)["input_ids"]


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], prompt_format: dict | None, delta: bool) -> list[int]:
    """The ids of a conversation's prompt for the assistant's next turn: a chat delta's own template (or, without a
    delta, the tokenizer's); a delta trained on single prompts takes one user message (its `typed_prompt_ids`)."""
    chat = prompt_format.get("format") == "messages" if prompt_format else not delta
    if chat:
        if prompt_format:
            prompt = PromptFormat.from_dict(prompt_format).render(tokenizer, messages, add_generation_prompt=True)
        elif getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            raise ChatTemplateError("the base model's tokenizer has no chat template; send the text to /v1/completions "
                                    "instead, or serve a delta trained on chat messages")
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    roles = [m["role"] for m in messages]
    if prompt_format and prompt_format.get("format") == "alpaca" and roles == ["system", "user"]:
        # Alpaca's two fields: the system message is the instruction (the task), the user's the input
        return typed_prompt_ids(tokenizer, messages[0]["content"], prompt_format, delta, messages[1]["content"])
    if roles != ["user"]:
        trained = prompt_format.get("format") if prompt_format else "data-to-text (E2E)"
        alpaca = ("; or a system message (the instruction) then a user message (the input)"
                  if trained == "alpaca" else "")
        raise DataError(f"this delta was trained on single prompts ({trained} format), not conversations: send "
                        f"exactly one user message{alpaca} (got roles {roles})")
    return typed_prompt_ids(tokenizer, messages[0]["content"], prompt_format, delta)
