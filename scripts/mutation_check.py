"""Plant named bugs, one per claim the README makes, and check that the tests watching each claim fail.

    python scripts/mutation_check.py            # every bug, 2 workers
    python scripts/mutation_check.py --only lora-scaling unmerge -j 1
    python scripts/mutation_check.py --tests-from <rev>   # the bugs against an older suite's tests

Each bug is (name, file, the exact original snippet, its replacement, the tests that watch the claim).
It is planted in a copy of the tracked files (never in this checkout); only its tests run (`pytest -x -q`).
A bug is caught when they fail. Exits non-zero when a snippet is not found exactly once (so the list
cannot rot silently when the code moves) or when any bug is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]


BUGS: list[Bug] = [
    Bug("unmerge-keeps-merged-weight", "deltatune/methods/lora.py",
        'self.base_layer.weight.copy_(self.__dict__.pop("unmerged_weight"))',
        'self.__dict__.pop("unmerged_weight")',
        ("tests/test_mixed.py::test_a_merged_task_is_unmerged_for_a_mixed_batch",)),
    Bug("adapter-grouped-rows-added-back-unsorted", "deltatune/methods/adapter.py",
        "index_add(0, groups.order, update.to(output.dtype))",
        "index_add(0, groups.order.sort().values, update.to(output.dtype))",
        ("tests/test_mixed.py::test_mixed_batch_equals_each_example_alone",)),
    Bug("norm-gain-per-row-from-the-first-task", "deltatune/methods/adapter.py",
        'self.base_layer.weight + stacks["weight"][rows]', 'self.base_layer.weight + stacks["weight"][rows * 0]',
        ("tests/test_mixed.py::test_mixed_batch_equals_each_example_alone",)),
    Bug("peft-export-fused-v-block-from-q", "deltatune/formats/peft_methods.py",
        "block[rows, g * config.r : (g + 1) * config.r] = B_g",
        "block[rows, g * config.r : (g + 1) * config.r] = B.split(widths)[0]",
        ("tests/test_peft_format.py::test_gpt2_fused_slices_export_as_an_exact_block_lora",)),
    Bug("resume-ignores-checkpoint", "deltatune/training/loop.py",
        'if run.config.resume and checkpoint.is_dir():',
        'if False and run.config.resume and checkpoint.is_dir():',
        ("tests/test_train.py::test_resume_reads_the_checkpoint_and_gives_the_same_delta_bit_for_bit",)),
    Bug("resume-drops-optimizer-state", "deltatune/training/loop.py",
        "set_optimizer_state_dict(model, getattr(optimizer",
        "(lambda *args, **kwargs: None)(model, getattr(optimizer",
        ("tests/test_train.py::test_resume_reads_the_checkpoint_and_gives_the_same_delta_bit_for_bit",)),
    Bug("failed-evaluation-loses-the-delta", "deltatune/training/loop.py",
        "        run.model.save_delta(kept)\n", "        pass\n",
        ("tests/test_train.py::test_an_evaluation_error_never_loses_the_trained_delta",)),
    Bug("holdout-leaves-an-empty-dev-split", "deltatune/tasks/sources.py",
        "    if not 0 < held < len(rows):\n", "    if held >= len(rows):\n",
        ("tests/test_tasks.py::test_a_file_too_small_for_a_dev_split_is_refused_when_read",)),
    Bug("bf16-optimizer-never-steps", "deltatune/training/loop.py",
        "    run.optimizer.step()\n",
        '    if run.precision != "bf16":\n        run.optimizer.step()\n',
        ("tests/test_train.py::test_bf16_training_moves_the_delta_as_fp32_does",)),
    Bug("eval-scores-land-on-other-rows", "deltatune/evaluate.py",
        "for row, index in enumerate(chunk):",
        "for row, index in enumerate(sorted(chunk)):",
        ("tests/test_train.py::test_cli_train_eval_predict",)),
    Bug("adapter-bert-before-dropout", "deltatune/core/architectures.py",
        'r"(^|\\.)attention\\.output\\.dropout$"', 'r"(^|\\.)attention\\.output\\.dense$"',
        ("tests/test_adapter.py::test_the_adapter_sees_the_sublayer_output_before_the_residual_add",)),
    Bug("adapter-roberta-after-layernorm", "deltatune/core/architectures.py",
        '**dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], _BERT),',
        '**dict.fromkeys(["bert", "xlm-roberta", "electra", "camembert"], _BERT), '
        '"roberta": (r"(^|\\.)attention\\.output\\.LayerNorm$", r"(^|\\.)layer\\.\\d+\\.output\\.LayerNorm$"),',
        ("tests/test_adapter.py::test_the_adapter_sees_the_sublayer_output_before_the_residual_add",)),
    Bug("adapter-gpt2-before-resid-dropout", "deltatune/core/architectures.py",
        'r"(^|\\.)attn\\.resid_dropout$"', 'r"(^|\\.)attn\\.c_proj$"',
        ("tests/test_adapter.py::test_the_adapter_sees_the_sublayer_output_before_the_residual_add",)),
    Bug("adapter-llama-on-input-norm", "deltatune/core/architectures.py",
        'r"(^|\\.)self_attn\\.o_proj$"', 'r"(^|\\.)input_layernorm$"',
        ("tests/test_adapter.py::test_the_adapter_sees_the_sublayer_output_before_the_residual_add",)),
    Bug("adapter-t5-on-pre-attention-norm", "deltatune/core/architectures.py",
        'r"(^|\\.)block\\.\\d+\\.layer\\.0\\.dropout$"', 'r"(^|\\.)block\\.\\d+\\.layer\\.0\\.layer_norm$"',
        ("tests/test_adapter.py::test_the_adapter_sees_the_sublayer_output_before_the_residual_add",)),
    Bug("prefix-cache-stale-across-prefixes", "deltatune/prompting/prefix_cache.py",
        "    _, cache = _call_model(model, 1, None, input_ids=torch.tensor([list(prefix_ids)], device=model.device))\n"
        "    return cache\n",
        "    kept = encode_prefix.__dict__  # one cache per model, whatever the prefix\n"
        "    if id(model) not in kept:\n"
        "        kept[id(model)] = _call_model(model, 1, None, input_ids=torch.tensor([list(prefix_ids)]))[1]\n"
        "    return kept[id(model)]\n",
        ("tests/test_fewshot.py::test_the_prefix_cache_follows_the_prefix",)),
    Bug("calibration-contextual-on-the-examples", "deltatune/prompting/calibration.py",
        '"calibrated": calibrate(example_scores, scores[n : n + c]).argmax(dim=-1)}',
        '"calibrated": calibrate(example_scores, scores[:n]).argmax(dim=-1)}',
        ("tests/test_fewshot.py::test_evaluate_fewshot_batch_calibration_matches_scoring_by_hand",)),
    Bug("calibration-first-reference-only", "deltatune/prompting/calibration.py",
        "reference = reference_log_scores.softmax(dim=-1).mean(dim=0)",
        "reference = reference_log_scores.softmax(dim=-1)[0]",
        ("tests/test_fewshot.py::test_calibration_removes_a_constant_bias",
         "tests/test_fewshot.py::test_batch_calibration_divides_by_the_mean_over_unlabeled_inputs")),
    Bug("fewshot-generation-unstripped", "deltatune/prompting/fewshot.py",
        "predictions[i] = text.strip()", "predictions[i] = text + ' .'",
        ("tests/test_fewshot.py::test_evaluate_fewshot_generation_end_to_end",)),
    Bug("serve-base-rows-through-a-delta", "deltatune/serving/classify.py",
        "tasks = [job.task for job, _ in chunk]",
        'tasks = [job.task if job.task != "base" else next(iter(self._tasks)) for job, _ in chunk]',
        ("tests/test_serve.py::test_every_response_base_rows_batch_splits_and_each_tasks_label_names",)),
    Bug("serve-base-rows-answered-empty", "deltatune/serving/classify.py",
        "job.future.set_result([self._prediction(job.task, text, row) for text, row in",
        'job.future.set_result([] if job.task == "base" else [self._prediction(job.task, text, row) for text, row in',
        ("tests/test_serve.py::test_every_response_base_rows_batch_splits_and_each_tasks_label_names",)),
    Bug("serve-split-batch-drops-an-input", "deltatune/serving/classify.py",
        "for start in range(0, len(examples), size):",
        "for start in range(0, len(examples) - (len(examples) > size), size):",
        ("tests/test_serve.py::test_every_response_base_rows_batch_splits_and_each_tasks_label_names",)),
    Bug("serve-first-tasks-label-names", "deltatune/serving/classify.py",
        'self._tasks[task]["labels"] if task in self._tasks else None)',
        'next(iter(self._tasks.values()))["labels"] if task in self._tasks else None)',
        ("tests/test_serve.py::test_every_response_base_rows_batch_splits_and_each_tasks_label_names",)),
    Bug("serve-refusal-hard-coded-methods", "deltatune/serving/worker.py",
        "if getattr(method_entry(method), self.mixes):",
        'if method not in ("full", "top_layers"):',
        ("tests/test_registry_dummy.py::test_serve_refuses_it_in_a_decode_batch_by_the_registry",)),
    Bug("peft-export-per-method-table", "deltatune/formats/peft.py",
        "translation = METHODS[method].peft if method in METHODS else None",
        "translation = {n: METHODS[n].peft for n in ['full', 'lora', 'adapter', 'bitfit', 'prompt', 'top_layers', "
        "'prefix', 'dora', 'ia3']}[method]",
        ("tests/test_registry_dummy.py::test_peft_export_refuses_it_by_name",)),
    Bug("atomic-save-no-file-fsync", "deltatune/formats/native.py",
        "                os.fsync(handle.fileno())\n", "                pass\n",
        ("tests/test_faults.py::test_a_save_makes_its_files_durable_before_renaming_them_into_place",)),
    Bug("atomic-save-folder-fsynced-after-rename", "deltatune/formats/native.py",
        "        _fsync_folder(tmp)\n        if path.exists():",
        "        if path.exists():",
        ("tests/test_faults.py::test_a_save_makes_its_files_durable_before_renaming_them_into_place",)),
    Bug("load-accepts-same-size-other-shape", "deltatune/delta.py",
        "            if source.shape != target.shape:\n",
        "            source = source.reshape(target.shape) if source.numel() == target.numel() else source\n"
        "            if source.shape != target.shape:\n",
        ("tests/test_faults.py::test_a_tensor_of_the_same_size_but_another_shape_is_refused",)),
    Bug("ddp-loss-not-scaled-by-world", "deltatune/training/loop.py",
        "weight = run.world * _loss_units(run.task, [run.train_items[i] for i in indices])",
        "weight = _loss_units(run.task, [run.train_items[i] for i in indices])",
        ("tests/test_distributed.py::test_two_processes_compute_the_one_process_gradients[grad-classification]",)),
    Bug("ddp-generation-weighted-by-examples", "deltatune/training/loop.py",
        'if task.kind != "generation" or (items and isinstance(items[0], EncodedPair)):',
        'if True:',
        ("tests/test_distributed.py::test_two_processes_compute_the_one_process_gradients[grad-generation]",)),
    Bug("ddp-eval-gathered-out-of-order", "deltatune/training/distributed.py",
        "    for source_rank, part in enumerate(gather_object([predictions])):\n"
        "        ordered[source_rank::world] = part\n",
        "    ordered = [p for part in gather_object([predictions]) for p in part]  # rank after rank\n",
        ("tests/test_distributed.py::test_two_processes_compute_the_one_process_gradients[grad-regression]",)),
    Bug("grad-checkpointing-doubles-the-gradient", "deltatune/training/loop.py",
        "loss = _batch_loss(run, items) * weight / config.grad_accum",
        "loss = _batch_loss(run, items) * weight / config.grad_accum * (1 + config.grad_checkpointing)",
        ("tests/test_distributed.py::test_gradient_checkpointing_gives_the_same_step",)),
    Bug("lora-forward-drops-scaling", "deltatune/methods/lora.py",
        "update = F.linear(after_A * self.scaling[task], B)", "update = F.linear(after_A, B)",
        ("tests/test_methods_matrix.py::test_merge_matches_unmerged_and_unloads",)),
    Bug("lora-merge-drops-scaling", "deltatune/methods/lora.py",
        "return delta * self.scaling[task]", "return delta",
        ("tests/test_core.py::test_lora_merge_is_w_plus_scaled_ba",)),
    Bug("gpt2-fused-lora-on-k-not-v", "deltatune/core/architectures.py",
        '"gpt2": ["c_attn[0/3]", "c_attn[2/3]"],', '"gpt2": ["c_attn[0/3]", "c_attn[1/3]"],',
        ("tests/test_core.py::test_gpt2_lora_adapts_only_q_and_v_slices",)),
    Bug("neox-per-head-lora-on-k-not-q", "deltatune/core/architectures.py",
        "rows = tuple([((3 * h + i) * d, (3 * h + i + 1) * d) for h in range(heads)] for i in range(3))",
        "rows = tuple([((3 * h + i) * d, (3 * h + i + 1) * d) for h in range(heads)] for i in (1, 0, 2))",
        ("tests/test_discovery.py::test_fused_lora_leaves_the_keys_and_changes_the_values",)),
    Bug("phi3-fused-lora-on-k-not-v", "deltatune/core/architectures.py",
        "[((heads + kv_heads) * d, (heads + 2 * kv_heads) * d)])",
        "[(heads * d, (heads + kv_heads) * d)])",
        ("tests/test_discovery.py::test_lora_changes_exactly_the_q_and_v_rows_of_a_fused_projection",)),
    Bug("switch-keeps-the-first-task", "deltatune/delta.py",
        "        self.task_state.active = task\n",
        "        self.task_state.active = task if self.task_state.active is None else self.task_state.active\n",
        ("tests/test_methods_matrix.py::test_task_switching_is_exact_across_methods",)),
    Bug("load-keeps-the-initial-values", "deltatune/delta.py",
        "                target.copy_(converted[key])\n", "                pass\n",
        ("tests/test_methods_matrix.py::test_save_load_roundtrip_onto_fresh_base",)),
    Bug("bitfit-shift-ignored", "deltatune/methods/bitfit.py",
        "        return output + self.bias_delta[task]\n", "        return output\n",
        ("tests/test_methods_matrix.py::test_one_step_changes_only_the_delta",
         "tests/test_methods_matrix.py::test_merge_matches_unmerged_and_unloads")),
    Bug("bitfit-mixed-batch-uses-one-row", "deltatune/methods/bitfit.py",
        "return output + self.per_example(stack[rows], output)",
        "return output + self.per_example(stack[rows * 0], output)",
        ("tests/test_mixed.py",)),
    Bug("prompt-after-the-text", "deltatune/methods/prompt.py",
        "embeds = torch.cat([embeds[:, :at], prompt, embeds[:, at:keep]], dim=1)",
        "embeds = torch.cat([embeds[:, :keep], prompt], dim=1)",
        ("tests/test_prompt.py",)),
    Bug("report-std-always-zero", "deltatune/results/report.py",
        "(statistics.stdev(values) if len(values) > 1 else None)", "(0.0 if len(values) > 1 else None)",
        ("tests/test_compare.py::test_report_means_only_the_seeds_that_finished_and_lists_the_failed_ones",
         "tests/test_compare.py::test_sweep_rows_say_how_many_seeds_finished")),
    Bug("e2e-nist-unclipped-counts", "deltatune/tasks/e2e_metrics.py",
        "information(ngram) * min(count, max_reference_counts[ngram])", "information(ngram) * count",
        ("tests/test_metrics.py::test_nist_by_hand",
         "tests/test_metrics.py::test_e2e_scores_match_the_official_script")),
    Bug("e2e-bleu-without-13a-tokenisation", "deltatune/tasks/e2e_metrics.py",
        'sacrebleu.BLEU(tokenize="13a", lowercase=False, force=True)',
        'sacrebleu.BLEU(tokenize="none", lowercase=False, force=True)',
        ("tests/test_metrics.py::test_bleu_of_references_is_one",
         "tests/test_metrics.py::test_e2e_scores_match_the_official_script")),
    Bug("e2e-ser-negation-not-blanked", "deltatune/tasks/e2e_slots.py",
        'blanked = blanked[: match.start()] + " " * (match.end() - match.start()) + blanked[match.end() :]', "pass",
        ("tests/test_e2e_slots.py",)),
    Bug("config-file-drops-method-options", "deltatune/cli.py",
        '**options_from_strings(args.method, saved.get("method_options", {}), "--config method_options"),',
        "**{},",
        ("tests/test_config_file.py::test_saved_config_trains_the_same_delta_bit_for_bit",)),
    Bug("saved-config-loses-the-seed", "deltatune/training/loop.py",
        '"precision": run.precision, "data_dir"',
        '"precision": run.precision, "seed": 0, "data_dir"',
        ("tests/test_config_file.py::test_saved_config_trains_the_same_delta_bit_for_bit",)),
    Bug("tracker-records-one-step-late", "deltatune/training/trackers.py",
        'accelerator.log(values, step=record["step"])',
        'accelerator.log(values, step=record["step"] + 1)',
        ("tests/test_trackers.py::test_tensorboard_and_mlflow_hold_the_curves_of_metrics_jsonl",)),
    Bug("datasetdict-validation-split-ignored", "deltatune/tasks/hf_datasets.py",
        'DEV_SPLITS = ("validation", "dev")',
        "DEV_SPLITS = ()",
        ("tests/test_hf_datasets.py::test_a_dataset_dicts_validation_split_and_class_label_names",)),
    Bug("trainer-resume-keeps-fresh-delta", "deltatune/integrations/trainer.py",
        "        load_training_delta(self.delta_model, resume_from_checkpoint)",
        "        pass",
        ("tests/test_trainer_integration.py::test_checkpoints_hold_the_delta_and_resume_to_the_same_delta",)),
    Bug("trainer-best-checkpoint-not-reloaded", "deltatune/integrations/trainer.py",
        "        load_training_delta(self.delta_model, self.state.best_model_checkpoint)",
        "        pass",
        ("tests/test_trainer_integration.py::test_best_checkpoint_reloaded_and_save_model_is_a_delta_folder",)),
    Bug("trainer-sees-args-kwargs-forward", "deltatune/delta.py",
        "    @_SignedLikeBase\n    def forward(",
        "    def forward(",
        ("tests/test_trainer_integration.py::test_forward_signature_is_the_wrapped_models",
         "tests/test_trainer_integration.py::test_checkpoints_hold_the_delta_and_resume_to_the_same_delta")),
    Bug("dpo-reference-keeps-the-delta", "deltatune/delta.py",
        "        self.use(None)\n        try:\n            yield",
        "        try:\n            yield",
        ("tests/test_trl_integration.py::test_dpo_reference_is_the_base_with_the_delta_off",)),
    Bug("expert-lora-drops-scaling", "deltatune/methods/lora_experts.py",
        "delta = torch.bmm(B, A) * self.scaling[task]",
        "delta = torch.bmm(B, A)",
        ("tests/test_lora_experts.py::test_one_expert_computes_with_its_own_low_rank_update",)),
    Bug("expert-lora-peft-b-columns-per-rank", "deltatune/methods/lora_experts.py",
        "B.permute(1, 2, 0).reshape(B.shape[1], rank * experts)",
        "B.permute(1, 0, 2).reshape(B.shape[1], rank * experts)",
        ("tests/test_lora_experts.py::test_export_runs_in_peft_and_a_peft_adapter_runs_here",)),
    Bug("data2vec-positions-from-zero", "deltatune/core/architectures.py",
        '"camembert", "data2vec-text", ',
        '"camembert", ',
        ("tests/test_prefix.py::test_mixed_prefix_batches_number_positions_as_roberta_does",)),
    Bug("ia3-fused-q-rows-for-k", "deltatune/core/architectures.py",
        "sorted(sum(fused_qkv_rows(name, layer, config)[1:], []))",
        "sorted(sum(fused_qkv_rows(name, layer, config)[::2], []))",
        ("tests/test_ia3_discovery.py::test_ia3_rescales_exactly_the_k_and_v_rows_of_a_fused_projection",)),
    Bug("one-pass-reference-under-the-delta", "deltatune/training/preference.py",
        "tasks=[self.policy] * rows + [reference] * rows", "tasks=[self.policy] * rows + [self.policy] * rows",
        ("tests/test_preference.py::test_reference_log_probs_are_the_base_models_own_bit_for_bit",)),
    Bug("second-pass-reference-under-the-delta", "deltatune/training/preference.py",
        "delta_model.use(reference)  # full", "delta_model.use(self.policy)  # full",
        ("tests/test_preference.py::test_reference_log_probs_are_the_base_models_own_bit_for_bit",)),
    Bug("dpo-margin-sign", "deltatune/training/preference.py",
        "logits = self.beta * (ratios[:n] - ratios[n:])", "logits = self.beta * (ratios[n:] - ratios[:n])",
        ("tests/test_preference.py::test_dpo_loss_equals_eq7_computed_by_hand",)),
    Bug("eval-scores-the-holdout-of-its-file", "deltatune/cli.py",
        "dev_file = args.dev_file or (args.data_file if scored_whole and Path(args.data_file).is_file() else None)",
        "dev_file = args.dev_file",
        ("tests/test_train.py::test_cli_train_eval_predict",)),
    Bug("eval-renumbers-a-files-classes", "deltatune/cli.py",
        '**({"label_names": label_names} if label_names else {})}',
        "}",
        ("tests/test_train.py::test_cli_train_eval_predict",)),
    Bug("train-seconds-count-in-loop-evaluations", "deltatune/training/loop.py",
        "    train_seconds = seconds - state.eval_seconds\n",
        "    train_seconds = state.train_seconds\n",
        ("tests/test_train.py::test_train_seconds_leave_out_every_evaluation",)),
    Bug("cell-table-counts-the-head", "deltatune/results/report.py",
        'f"{row[\'method_parameters\']:,}"',
        'f"{row[\'trainable_parameters\']:,}"',
        ("tests/test_tables.py::test_task_table_bold_avg_majority_and_published_orderings",)),
    Bug("docs-take-basic-auth-everywhere", "deltatune/serving/app.py",
        'docs = path in DOCS_PATHS and scope["method"] in ("GET", "HEAD")',
        "docs = True",
        ("tests/test_serve.py::test_api_key_body_limit_and_loading_switch_guard_the_classification_routes",)),
]


def check_snippets(bugs: list[Bug]) -> list[str]:
    problems = []
    for bug in bugs:
        path = ROOT / bug.file
        count = path.read_text().count(bug.original) if path.is_file() else -1
        if count != 1:
            where = "file not found" if count < 0 else f"found {count} times"
            problems.append(f"{bug.name}: snippet in {bug.file} {where}: {bug.original!r}")
    return problems


def copy_tree(destination: Path, tests_from: str | None) -> None:
    """The tracked files (plus untracked, not ignored ones) of this checkout; tests/ from a revision if asked."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    if tests_from:
        shutil.rmtree(destination / "tests")
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive.stdout, check=True)


def run_bug(bug: Bug, tree: Path, whole_files: bool = False) -> tuple[str, int, float, str]:
    """Plant the bug in `tree`, run its tests (with `whole_files`, the whole files that hold them), take the
    bug out again."""
    tests = sorted({test.split("::")[0] for test in bug.tests}) if whole_files else bug.tests
    path = tree / bug.file
    original = path.read_text()
    path.write_text(original.replace(bug.original, bug.replacement, 1))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.perf_counter()
    basetemp = tree.parent / f"{tree.name}-pytest"  # its own: pytest prunes old folders of a shared one
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 f"--basetemp={basetemp}", *tests],
                                cwd=tree, env=env, capture_output=True, text=True)
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - started
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else result.stderr[-300:]
    if " error" in summary:  # an error, not a failure: show what it was (it may not be the bug's doing)
        summary += " | " + " | ".join([line for line in lines if line.startswith("E ")][:3])
    return bug.name, result.returncode, seconds, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="plant only these bugs")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="bugs checked at once (one tree copy each)")
    parser.add_argument("--tests-from", metavar="REV", help="run the bugs against tests/ of this git revision "
                        "(whole test files: the tests named may not exist there)")
    parser.add_argument("--list", action="store_true", help="print the bugs and their tests, run nothing")
    args = parser.parse_args()
    bugs = [bug for bug in BUGS if not args.only or bug.name in args.only]
    unknown = set(args.only or ()) - {bug.name for bug in BUGS}
    if unknown:
        print(f"unknown bug(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    problems = check_snippets(bugs)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print("a planted bug's snippet no longer matches the code: update BUGS in scripts/mutation_check.py",
              file=sys.stderr)
        return 2
    if args.list:
        for bug in bugs:
            print(f"{bug.name}: {bug.file}\n    -> {' '.join(bug.tests)}")
        return 0

    started = time.perf_counter()
    jobs = max(1, min(args.jobs, len(bugs)))
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as scratch:
        trees = []
        for worker in range(jobs):
            tree = Path(scratch) / f"tree{worker}"
            copy_tree(tree, args.tests_from)
            trees.append(tree)
        free = list(trees)

        def check(bug: Bug):
            tree = free.pop()
            try:
                return run_bug(bug, tree, whole_files=bool(args.tests_from))
            finally:
                free.append(tree)

        missed = 0
        with ThreadPoolExecutor(jobs) as pool:
            for name, code, seconds, last in pool.map(check, bugs):
                caught = code in (1, 2)  # tests failed (1) or errored while collecting the bugged code (2)
                missed += not caught
                verdict = "caught" if caught else ("MISSED" if code == 0 else f"ERROR (pytest exit {code})")
                print(f"{verdict:7} {name:45} {seconds:6.1f} s  {last}", flush=True)
    wall = time.perf_counter() - started
    print(f"{len(bugs) - missed} of {len(bugs)} planted bugs caught ({wall:.0f} s wall, {jobs} worker(s))")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
