"""Training: the loop, EMA, checkpoints, devices and precision, and the held-out reference loss."""
