"""TODO(layout): compare."""
