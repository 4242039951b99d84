"""Looking at trained models and runs: accuracy across sharing lengths, plots of training logs."""
