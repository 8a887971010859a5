"""TODO(layout): palettes."""
