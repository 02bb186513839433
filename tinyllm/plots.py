"""Small plotting helpers the lessons share: a readable log-scale loss axis and a running mean."""
import numpy as np


def log_loss_axis(ax):
    """A log-scale loss axis labelled in plain numbers: 0.2, 0.5, 1, 2, 5 (every tick when the range is narrow)."""
    from matplotlib.ticker import FuncFormatter   # here, not at the top: importing tinyllm needs no matplotlib
    ax.set_yscale("log")

    def label(v, _):
        lo, hi = ax.get_ylim()
        mantissa = round(v / 10 ** np.floor(np.log10(v)), 6)
        return f"{v:g}" if hi / lo < 10 or mantissa in (1, 2, 5) else ""
    ax.yaxis.set_major_formatter(FuncFormatter(label))
    ax.yaxis.set_minor_formatter(FuncFormatter(label))


def smooth(values, window):
    """Mean of the last `window` values at each point (fewer at the start)."""
    c = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0.0))
    n = np.minimum(np.arange(1, len(values) + 1), window)
    return (c[1:] - c[np.arange(1, len(values) + 1) - n]) / n
