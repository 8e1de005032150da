"""Zero- and few-shot prompting: a frozen LM with no parameter changed, the floor every method is compared to.

- `fewshot.py`: templates and verbalizers per task, `evaluate_fewshot` (label-word scoring, greedy generation)
- `demonstrations.py`: which solved examples a k-shot prompt shows (seeded draws, choosing among draws)
- `calibration.py`: label-word predictions, raw and calibrated (contextual, batch)
- `prefix_cache.py`: scoring and decoding after a shared prompt prefix encoded once
"""
