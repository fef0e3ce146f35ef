"""What every lab experiment shares: the printed table and the JSON and PNG it leaves behind."""

import io
import json
from pathlib import Path

from minillama.checkpoint.atomic import write_atomic


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as an aligned text table; floats with 4 significant digits."""
    columns = columns or list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def save(out: Path, name: str, results: dict, figure=None) -> None:
    """out/NAME.json with the numbers and, given a matplotlib Figure, out/NAME.png."""
    write_atomic(Path(out) / f"{name}.json", json.dumps(results, indent=1, default=str) + "\n")
    if figure is not None:
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=110, bbox_inches="tight")
        write_atomic(Path(out) / f"{name}.png", png.getvalue())


def figure(n_plots: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib Figure with n side-by-side axes (no pyplot: no global state, no GUI)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_plots, height))
    axes = [fig.add_subplot(1, n_plots, i + 1) for i in range(n_plots)]
    return fig, axes
