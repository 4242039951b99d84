"""The framework-free core of the EPAS recipe: configuration, sharing rules, scheduler, FLOP model, errors.

Nothing here imports megatron-core or transformers (``tests/test_layout.py`` checks it), so every layer
above can use it: ``megatron_patches`` (the EPAS changes to megatron-core), ``megatron_training``
(pretraining), ``hf_training`` (the Hugging Face Trainer), ``evaluation`` and ``benchmarks``.
"""
