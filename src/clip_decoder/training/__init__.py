"""Training: options, methods, losses, the trainer's step, the loop and ``clip-decoder train``."""
