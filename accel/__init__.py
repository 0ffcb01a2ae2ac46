"""meshaccel node agent: sources, state model, reconcilers, CLI, lab."""
