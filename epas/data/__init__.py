"""Data preparation and checks: tokenizers, text to indexed datasets, the demo corpus."""
