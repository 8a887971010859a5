"""TODO(layout): demo."""
