"""cairl trainer: configs, meshes, losses, steps, checkpoints, the constitutional pipeline and the CLI."""
