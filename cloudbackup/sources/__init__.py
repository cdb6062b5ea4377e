"""What can be backed up: one module per kind of source, a registry of them by name."""
