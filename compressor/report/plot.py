"""report.png: quality and latency against the pruning ratio, with the budget lines."""

from __future__ import annotations

from pathlib import Path

from .schema import Report


def plot(report: Report | dict, path: Path) -> None:
    """Quality (perplexity, cloze accuracy) and latency (TPOT, TTFT) against the pruning ratio,
    with the budget lines; predicted curves dashed, measured points solid markers."""
    import matplotlib

    r = report.as_dict() if isinstance(report, Report) else report
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = r["params"]["achieved_ratio_decoder"]
    fig, (ax_q, ax_l) = plt.subplots(1, 2, figsize=(12, 4.8))
    ppl = r["perplexity"]
    ax_q.plot([0, ratio], [ppl["dense"], ppl["pruned"]], "o-", color="C0",
              label=f"held-out perplexity (measured, {ppl['device']})")
    floor = ppl["dense"] * (1 + r.get("accuracy", {}).get("max_ppl_increase", 0.5))
    ax_q.axhline(floor, color="C0", ls=":", label="perplexity limit (profile's floor)")
    ax_q.set_xlabel("fraction of decoder weights removed")
    ax_q.set_ylabel("perplexity (lower is better)")
    le = (r.get("accuracy") or {}).get("lm_eval") or {}
    if le.get("pruned"):
        ax_a = ax_q.twinx()
        ax_a.plot([0, ratio], [le["dense"]["cloze_acc"], le["pruned"]["cloze_acc"]], "s-", color="C1",
                  label="cloze accuracy (lm-eval, measured)")
        ax_a.axhline(le["dense"]["cloze_acc"] * r["accuracy"]["min_task_accuracy"], color="C1", ls=":",
                     label="accuracy floor")
        ax_a.set_ylabel("cloze accuracy (higher is better)")
        ax_a.set_ylim(0, 1)
        h1, l1 = ax_q.get_legend_handles_labels()
        h2, l2 = ax_a.get_legend_handles_labels()
        ax_q.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    else:
        ax_q.legend(fontsize=7, loc="upper left")
    ax_q.set_title("quality against ratio")
    ax_q.set_xlim(-0.02, max(0.72, ratio + 0.02))

    lat = r.get("latency") or {}
    meas = lat.get("measured") or {}
    pts = [(0.0, meas.get("dense")), (ratio, meas.get("pruned"))]
    pts = [(x, f) for x, f in pts if f]
    if pts:
        host = pts[0][1]["device"]
        ax_l.plot([x for x, _ in pts], [f["tpot_s"] * 1e3 for _, f in pts], "o", color="C2",
                  label=f"TPOT measured ({host})")
        ax_l.plot([x for x, _ in pts], [f["ttft_s"] * 1e3 for _, f in pts], "o", color="C3",
                  label="TTFT measured (same host)")
    budget = (r.get("budget") or {}).get("limits", {})
    if budget.get("tpot_ms"):
        ax_l.axhline(budget["tpot_ms"], color="C2", ls=":", label="TPOT budget")
    if budget.get("ttft_ms"):
        ax_l.axhline(budget["ttft_ms"], color="C3", ls=":", label="TTFT budget")
    ax_l.set_yscale("log")
    ax_l.set_xlim(-0.02, max(0.72, ratio + 0.02))
    ax_l.set_xlabel("fraction of decoder weights removed")
    ax_l.set_ylabel("milliseconds (log)")
    ax_l.set_title("latency against ratio")
    ax_l.legend(fontsize=7, loc="best")
    fig.suptitle(f"{Path(str(r['model'])).name} on {r['profile']}: dashed = predicted, markers = measured",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


