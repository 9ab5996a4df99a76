"""herd's training package: mesh, data, optimizer, step, loop and checkpoints."""
