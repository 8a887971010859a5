"""`workbench report`: run the notebooks headless into a report folder."""

from __future__ import annotations

import argparse
import sys

from workbench.cli.common import MODEL_HELP, add_model_options, int_in_range, model_spec


def run(args: argparse.Namespace) -> None:
    from workbench.report.config import ReportConfig, select_notebooks
    from workbench.report.runner import run_report

    model_spec(args.model or None, args)  # --config / --allow-pickle only with a checkpoint file, said as options
    config = ReportConfig(
        run=args.run,
        model=args.model,
        model_config=args.config or "",
        allow_pickle=args.allow_pickle,
        smoke=args.smoke,
        notebooks=select_notebooks(args.notebooks),
        out_root=args.out_root,
        threads=args.threads,
    )
    result = run_report(config)
    if not result.ok:
        failed = ", ".join(r.notebook for r in result.runs if not r.ok)
        print(
            f"workbench report: error: {failed} stopped on an error; see {config.out_dir / 'index.html'}",
            file=sys.stderr,
        )
        sys.exit(1)


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="execute the notebooks with papermill into reports/RUN/ (HTML, figures, tables)")
    p.add_argument("--run", default="demo", help="run name: the folder under --out-root (default demo)")
    p.add_argument("--model", default="", help=f"as MODEL of the other commands: {MODEL_HELP}")
    add_model_options(p)
    p.add_argument("--smoke", action="store_true", help="shrink every notebook (few prompts and steps), as CI does")
    p.add_argument("--notebooks", default="", help="comma-separated notebook names or numbers (default: all)")
    p.add_argument("--out-root", default="reports", help="parent folder of the run folder (default reports)")
    p.add_argument("--threads", type=int_in_range(1), default=2, help="torch CPU threads in the notebooks (default 2)")
    p.set_defaults(func=run)
