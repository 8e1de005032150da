"""deltatune inside the trainers people already use: `transformers.Trainer` (`trainer.py`) and TRL's
`SFTTrainer` / `DPOTrainer` (`trl.py`). Imported on demand: TRL is not needed for the rest of deltatune.

    from deltatune.integrations.trainer import DeltaTrainer
    from deltatune.integrations.trl import DeltaSFTTrainer, DeltaDPOTrainer
"""
