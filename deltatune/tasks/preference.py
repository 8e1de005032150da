"""Preference files for DPO / SimPO: pairs of a preferred and a dispreferred answer to one prompt.

Two row forms, in JSON lines (the forms TRL's DPOTrainer reads):

- text: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``; the prompt is shown as written (or through
  `template`, a ``{prompt}`` format string), each answer follows it, then EOS;
- messages: ``{"chosen": [...messages], "rejected": [...messages]}``, two conversations that share every turn
  but the last assistant one (or ``{"prompt": [...messages], "chosen": [assistant turn(s)], "rejected": [...]}``),
  rendered with the tokenizer's chat template.

Each answer is encoded exactly as generation training encodes a completion (`generation.PromptFormat.encode`:
loss on the answer's tokens and EOS / the last assistant turn with its end-of-turn token), so the delta's
`prompt_format` serves `generate` and `serve` as a supervised delta's does. Splits: "train", and "dev" =
`dev_path`, else a fixed seeded 10% of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.errors import DataError
from deltatune.tasks.generation import IGNORE_INDEX, PromptFormat, Row, check_conversation, encode_examples
from deltatune.tasks.sources import read_json_lines, split_off_dev
from deltatune.tasks.task import Example, Task

PREFERENCE_METRICS = ["rewards/accuracies", "rewards/margins", "loss"]  # the first picks the best checkpoint


@dataclass
class EncodedPair:
    """Token ids and labels (-100 off the answer) of one prompt with its chosen and its rejected answer."""

    chosen: tuple[list[int], list[int]]
    rejected: tuple[list[int], list[int]]

    @property
    def input_ids(self) -> list[int]:
        """The longer side's ids: what length bucketing groups pairs by (as it groups `Encoded` items)."""
        return max(self.chosen[0], self.rejected[0], key=len)


def preference_row(row: Row) -> Example:
    """``{"prompt", "chosen", "rejected", "where"}`` (text) or ``{"chosen": messages, "rejected": messages,
    "where"}`` (two conversations differing in their last assistant turn), checked."""
    values = row.values
    for name in ("chosen", "rejected"):
        if name not in values:
            raise row.error(f"no {name!r} field; a preference row is {{\"prompt\", \"chosen\", \"rejected\"}} or "
                            f"{{\"chosen\": [messages], \"rejected\": [messages]}}")
    if isinstance(values["chosen"], str):
        for name in ("prompt", "chosen", "rejected"):
            if not isinstance(values.get(name), str) or not values[name].strip():
                raise row.error(f"field {name!r} must be a non-empty string (text rows need prompt, chosen, rejected)")
        return {"prompt": values["prompt"], "chosen": values["chosen"], "rejected": values["rejected"],
                "where": row.where}
    prompt = values.get("prompt", [])
    if not isinstance(prompt, list):
        raise row.error("with chosen/rejected as messages, 'prompt' (optional) must be a list of messages too")
    chosen = check_conversation(Row(row.where + " (chosen)", {"messages": prompt + list(values["chosen"])}))
    rejected = check_conversation(Row(row.where + " (rejected)", {"messages": prompt + list(values["rejected"])}))
    if chosen[:-1] != rejected[:-1]:
        raise row.error("the chosen and rejected conversations must share every turn but the last assistant turn")
    return {"chosen": chosen, "rejected": rejected, "where": row.where}


def encode_pairs(prompt_format: PromptFormat, examples: list[Example], tokenizer, max_length: int) -> list[EncodedPair]:
    """Both answers of every pair, encoded as generation training encodes a completion; a pair whose answer
    is cut to nothing by `max_length` is an error (a pair needs both sides)."""
    def side(example: Example, name: str) -> Example:
        if prompt_format.format == "messages":
            return {"messages": example[name], "where": example["where"]}
        return {"prompt": prompt_format.format_row({"prompt": example["prompt"]}), "target": example[name],
                "where": example["where"]}

    sides = [side(e, name) for e in examples for name in ("chosen", "rejected")]
    encoded = encode_examples(prompt_format, sides, tokenizer, max_length, overlong="cut")
    if len(encoded) != len(sides):
        raise DataError(f"an answer of a preference pair has no token left within --max-length {max_length}; "
                        f"raise --max-length")
    pairs = [EncodedPair(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]
    for pair, example in zip(pairs, examples, strict=True):
        if pair.chosen == pair.rejected:
            raise DataError(f"{example['where']}: chosen and rejected are the same tokens; nothing to prefer")
        if all(label == IGNORE_INDEX for label in pair.chosen[1][1:]):
            raise DataError(f"{example['where']}: the chosen answer has no token to score")
    return pairs


def preference_file_task(file_format: str, path: str | Path, dev_path: str | Path | None = None,
                         template: str | None = None, chat_template: str | None = None,
                         name: str | None = None, **ignored: Any) -> Task:
    """A preference task over the user's JSON-lines file (read now). Its "train" and "dev" examples are
    preference rows (`preference_row`); its `prompt_format` is how the prompts are built, saved with the delta.
    `ignored`: generation-file options that do not apply (columns, assistant_turns: always the last turn)."""
    if file_format != "jsonl":
        raise DataError(f"preference data is read from JSON lines (--task jsonl), not {file_format!r}")

    def read(file: str | Path) -> list[Example]:
        file = Path(file).expanduser()
        if not file.is_file():
            raise DataError(f"{file}: no such preference file (JSON lines with prompt/chosen/rejected)")
        rows = [preference_row(Row(f"{file}, line {line}", value)) for line, value in read_json_lines(file)]
        if not rows:
            raise DataError(f"{file} has no rows")
        return rows

    train = read(path)
    kinds = {isinstance(example["chosen"], str) for example in train}
    if len(kinds) != 1:
        raise DataError(f"{path}: mixes text rows and messages rows; use one form in the whole file")
    form = "prompt-completion" if kinds == {True} else "messages"
    prompt_format = PromptFormat(form, **({"template": template} if template else {}), chat_template=chat_template,
                                 assistant_turns="last")
    train, dev = (train, read(dev_path)) if dev_path is not None else split_off_dev(train, path)
    splits = {"train": train, "dev": dev}
    return Task(name=name or file_format, kind="generation", metric_names=list(PREFERENCE_METRICS),
                splits=("train", "dev"), loader=lambda split, data_dir: list(splits[split]),
                description=f"preference pairs ({form}) from {path}" + (f" (dev: {dev_path})" if dev_path else ""),
                prompt_format=prompt_format)
