"""Engine: training loop, checkpoints, evaluation, demo."""
