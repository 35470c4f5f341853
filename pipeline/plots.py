"""PNG plots for run and sweep reports (matplotlib, Agg backend; imported only when plotting)."""

from __future__ import annotations

from pathlib import Path

from ltp_compress.pipeline.run_dir import RunDir

STYLE = {"ltp_hard": ("LTP (ours)", "o-"), "ltp_soft": ("LTP soft", "o:"), "manual_prune": ("manual thresholds", "s--"),
         "topk_prune": ("top-k (SpAtten-style)", "^--"), "top_prune": ("ToP (L0 gates)", "v--"), "distill": ("LTP + KD", "D-"),
         "quantize": ("LTP + KD + INT8", "*-")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path) -> list[Path]:
    """Kept-sequence-length trajectories per layer (paper Fig. A.8) for each pruned stage, and
    accuracy vs relative FLOPs across the run's stages. Written to <run_dir>/plots/."""
    run = RunDir(Path(run_dir))
    metas = [r.meta for r in run.finished()]
    out = []
    plt = _plt()
    pruned = [m for m in metas if m.cost and m.cost.get("relative_flops", 1.0) < 0.999 and m.cost.get("sample_tokens_per_layer")]
    if pruned:
        fig, axes = plt.subplots(1, len(pruned), figsize=(4.5 * len(pruned), 3.6), squeeze=False)
        for ax, m in zip(axes[0], pruned):
            for traj in m.cost["sample_tokens_per_layer"]:
                ax.plot(range(len(traj)), traj, color="tab:blue", alpha=0.35, lw=1)
            ax.plot(range(len(m.cost["mean_tokens_per_layer"])), m.cost["mean_tokens_per_layer"], color="black", lw=2.5, label="dev mean")
            ax.set_title(f"{m.id} ({m.stage}): rel. FLOPs {m.cost['relative_flops']:.2f}", fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylabel("tokens entering layer")
            ax.legend(fontsize=8)
        fig.tight_layout()
        out.append(_save(fig, run.plots_dir / "kept_tokens_per_layer.png"))
        plt.close(fig)
    points = [(m.stage, m.id, m.cost["by_convention"]["paper"]["relative_flops"], _dev_main(m.metrics))
              for m in metas if (m.cost or {}).get("by_convention") and m.metrics]
    if len(points) >= 2:
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for stage, sid, x, y in points:
            ax.scatter([x], [y], label=f"{sid} ({stage})")
        ax.set_xlabel("relative FLOPs on dev (paper convention; vs same model unpruned)")
        ax.set_ylabel("dev main metric")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(_save(fig, run.plots_dir / "accuracy_vs_flops.png"))
        plt.close(fig)
    return out


def _dev_main(metrics: dict) -> float:
    """The main metric on the first dev set (the test set; validation is what was chosen on)."""
    return next(v for k, v in metrics.items() if k != "validation")["main"]


def plot_sweep(rows: list[dict], reference: float | None, path: Path) -> Path:
    """Dev accuracy (mean ± sd over seeds) vs relative FLOPs (paper convention), one line per
    method (stage type). `rows`: pipeline.sweep.aggregate_over_seeds output."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    by_stage: dict[str, list] = {}
    for r in rows:
        by_stage.setdefault(r["stage"], []).append((r["relative_flops_paper"]["mean"], r["dev_main"]["mean"], r["dev_main"]["sd"]))
    for stage, pts in by_stage.items():
        pts.sort()
        label, fmt = STYLE.get(stage, (stage, "x-"))
        ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts], fmt=fmt, label=label, capsize=2)
    if reference is not None:
        ax.axhline(100 * reference, color="gray", lw=1, ls=":", label="unpruned teacher")
        ax.axhline(100 * reference - 1.0, color="red", lw=0.8, ls=":", label="teacher - 1 point")
    ax.set_xlabel("relative FLOPs on dev (paper convention)")
    ax.set_ylabel("dev main metric (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path
