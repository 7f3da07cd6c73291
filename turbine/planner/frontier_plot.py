"""The plan's picture: every configuration scored, the Pareto fronts, and the recommendation."""
from __future__ import annotations

from turbine.bench.report import _pyplot
from turbine.planner.plan import PlanResult

_COLORS = {"agg": "C0", "disagg": "C1"}


def plot_frontier(res: PlanResult, path: str, *, title: str = "") -> None:
    """tokens/s/GPU against tokens/s/user: SLA-missing points faint, fronts as lines, the
    recommended deployment (and each one simulated) marked."""
    plt = _pyplot()
    sla = res.inputs.sla
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for mode in res.inputs.modes:
        pts = [p for p in res.points if p.mode == mode]
        miss = [p for p in pts if not sla.met(p.ttft_ms, p.itl_ms)]
        ok = [p for p in pts if sla.met(p.ttft_ms, p.itl_ms)]
        c = _COLORS[mode]
        ax.scatter([p.tokens_per_s_user for p in miss], [p.tokens_per_s_gpu for p in miss], s=6, color=c, alpha=0.12)
        ax.scatter([p.tokens_per_s_user for p in ok], [p.tokens_per_s_gpu for p in ok], s=8, color=c, alpha=0.35)
        front = res.front.get(mode) or []
        if front:
            ax.plot([p.tokens_per_s_user for p in front], [p.tokens_per_s_gpu for p in front], color=c, lw=2,
                    marker="o", ms=3, label=f"{mode}: Pareto front within the SLA")
    for cand in res.checked:
        p = cand.deployment.point
        mark = "*" if cand is res.recommended else "x"
        ax.scatter([p.tokens_per_s_user], [p.tokens_per_s_gpu], marker=mark, s=160 if mark == "*" else 60,
                   color="C3" if mark == "*" else "k", zorder=5,
                   label=("recommended: " if mark == "*" else "simulated: ") + cand.deployment.label)
    ax.axvline(1e3 / sla.itl_ms, color="grey", ls="--", lw=1)
    ax.text(1e3 / sla.itl_ms, ax.get_ylim()[1] * 0.97, f" ITL {sla.itl_ms:g} ms", color="grey", va="top", fontsize=8)
    ax.set_xlabel("tokens/s per user (1 / ITL)")
    ax.set_ylabel("output tokens/s per GPU")
    inp = res.inputs
    ax.set_title(title or f"{inp.model.shape.name} on {inp.gpu_budget}x {inp.model.gpu.name}: "
                 f"ISL {inp.workload.isl:g}, OSL {inp.workload.osl:g}, TTFT <= {sla.ttft_ms:g} ms")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["plot_frontier"]
