"""Training engine: trainer loop, optimizer and schedule, checkpoints, evaluation."""
