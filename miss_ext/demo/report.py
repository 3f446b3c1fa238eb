"""The demo's output: the results table and the loss-curve plot."""

from __future__ import annotations


def format_table(results) -> str:
    header = ["variant", "trainable params", "acc before", "acc after", "ms/step kernels",
              "ms/step reference", "reference/kernels"]
    rows = []
    for r in results:
        ratio = (f"{r.step_reference_ms / r.step_kernels_ms:.2f}x"
                 if r.step_reference_ms and r.step_kernels_ms else "-")
        rows.append([
            r.variant,
            f"{r.trainable:,d} ({100 * r.trainable / r.total:.2f}%)",
            f"{100 * r.acc_before:.1f}%",
            f"{100 * r.acc_after:.1f}%",
            f"{r.step_kernels_ms:.0f}" if r.step_kernels_ms is not None else "-",
            f"{r.step_reference_ms:.0f}" if r.step_reference_ms is not None else "- (peft)",
            ratio,
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows]
    return "\n".join(out)


def plot_losses(results, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for r in results:
        if not r.losses:
            continue
        smooth, value = [], r.losses[0]
        for loss in r.losses:
            value = 0.8 * value + 0.2 * loss
            smooth.append(value)
        steps = range(1, len(r.losses) + 1)
        (line,) = ax.plot(steps, smooth, label=f"{r.variant} ({r.trainable:,d} params)", linewidth=2)
        ax.plot(steps, r.losses, color=line.get_color(), alpha=0.25, linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (faint: each step; bold: smoothed)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
