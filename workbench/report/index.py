"""The report's front page (`index.html`, linking every notebook, figure and table) and the README's two figures."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from workbench.io import environment, write_text_atomic
from workbench.report.config import ReportConfig, ReportResult, notebook_artifacts
from workbench.report.notebook import model_label

INDEX_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table.meta td, table.meta th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #eee; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.95em; } .failed { color: #b00; font-weight: bold; } .ok { color: #070; }
ul.files li { margin: 0.2em 0; }
"""


def _inline_code(text: str) -> str:
    """Markdown `code` spans in a caption as HTML <code>."""
    import re

    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def write_index(out_dir: Path, config: ReportConfig, result: ReportResult) -> Path:
    """`index.html`: run settings and versions, then per notebook its links, figures (inline) and files."""
    esc = html.escape
    env = environment()
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Report {esc(config.run)}</title>",
        f"<style>{INDEX_CSS}</style></head><body>",
        f"<h1>Palettization report: {esc(config.run)}</h1>",
        "<table class='meta'>",
        f"<tr><th>model</th><td>{esc(model_label(config.model))}</td></tr>",
        f"<tr><th>smoke</th><td>{config.smoke}</td></tr>",
        f"<tr><th>wall time</th><td>{result.seconds:.0f} s</td></tr>",
        f"<tr><th>python</th><td>{esc(env['python'])} on {esc(env['platform'])}</td></tr>",
        f"<tr><th>packages</th><td>{esc(packages)}</td></tr>",
        "<tr><th>settings</th><td><a href='parameters.json'>parameters.json</a></td></tr></table>",
        "<p>Core ML images in notebook 05 are <b>emulated</b> on Linux (the package's decompressed weights run in "
        "torch); they come from the Core ML runtime only when the report runs on macOS.</p>",
        "<h2>Contents</h2><ul>",
    ]
    for run in result.runs:
        mark = "<span class='ok'>ok</span>" if run.ok else "<span class='failed'>FAILED</span>"
        parts.append(f"<li><a href='#{run.notebook}'>{esc(run.notebook)}</a> ({run.seconds:.0f} s, {mark})</li>")
    parts.append("</ul>")
    for run in result.runs:
        nb = esc(run.notebook)
        parts.append(f"<h2 id='{nb}'>{nb}</h2>")
        parts.append(
            f"<p><a href='html/{nb}.html'>executed notebook (HTML)</a> · <a href='notebooks/{nb}.ipynb'>.ipynb</a>"
            f" · {run.seconds:.0f} s · parameters <code>{esc(json.dumps(run.parameters))}</code></p>"
        )
        if not run.ok:
            parts.append(f"<p class='failed'>Stopped on an error: {esc(run.error)}</p>")
        files = []
        for art in notebook_artifacts(out_dir, run.notebook):
            path, caption = esc(art["path"]), _inline_code(esc(art["caption"]))
            if art["kind"] == "figure":
                parts.append(f"<figure><img src='{path}' alt='{caption}'><figcaption>{caption}</figcaption></figure>")
            else:
                files.append(f"<li><a href='{path}'>{path}</a>: {caption}</li>")
        if files:
            parts.append("<p>Files:</p><ul class='files'>" + "".join(files) + "</ul>")
    parts.append("</body></html>")
    return write_text_atomic(out_dir / "index.html", "\n".join(parts))


README_FIGURES = {"03_psnr_vs_size.png": "psnr_vs_size.png", "04_seed_matched_grid.png": "seed_matched_grid.png"}


def readme_figures(run_dir: str | os.PathLike, docs_dir: str | os.PathLike, max_width: int = 1600) -> list[Path]:
    """Copy the README's figures out of a finished report, shrunk to `max_width` pixels and palette-quantised
    (small enough to commit): `figures/03_psnr_vs_size.png` and `figures/04_seed_matched_grid.png`.

    Returns:
        the written paths under `docs_dir`.
    """
    from PIL import Image

    written = []
    for source, target in README_FIGURES.items():
        path = Path(run_dir) / "figures" / source
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `workbench report` (notebooks 03 and 04) first")
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.width > max_width:
                image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
            out = Path(docs_dir) / target
            out.parent.mkdir(parents=True, exist_ok=True)
            image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
        written.append(out)
    return written
