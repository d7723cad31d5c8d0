"""Shared plotting for the benchmarks (not a benchmark itself: run_all skips it)."""

from __future__ import annotations

from pathlib import Path


def line_plot(path: Path, xs, series: dict[str, list[float]], xlabel: str, ylabel: str, title: str,
              logx: bool = True) -> bool:
    """One line per series (x log2 by default, y from 0) saved to `path`; False if it could not."""
    try:  # the plot is a convenience; never fail the benchmark on it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name, ys in series.items():
            ax.plot(xs, ys, marker="o", label=name)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.legend()
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True
    except Exception as e:  # pragma: no cover
        print(f"(no plot {path.name}: {e})")
        return False
