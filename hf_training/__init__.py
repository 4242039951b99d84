"""EPAS with the Hugging Face Trainer (and DeepSpeed ZeRO): continual pretraining and supervised fine-tuning.

The entry point is ``finetune_epas.py``; the progressive schedule is epas.scheduler's, applied by a
Trainer callback, so both training paths grow the sharing region at the same steps.
"""
