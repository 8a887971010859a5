"""TODO(layout): recipes."""
