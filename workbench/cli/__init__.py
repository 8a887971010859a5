"""The `workbench` command: one module per command (`add_parser`, `run`), `main` in `workbench.cli.main.main`."""
