"""Speed benchmarks that need no megatron-core: decoding of the transformers EPAS model (``generate``)."""
