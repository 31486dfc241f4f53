"""The run's report: PNG plots and the summary table."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bayesnoise import io as bio
from bayesnoise import nn as bnn
from bayesnoise._tree import path_str


def _figure(**kwargs):
    """A figure and its axes drawn without pyplot, so no global backend is chosen or changed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize"))
    return fig, fig.subplots(**kwargs)


def _save(fig, path: str) -> None:
    """Writes a figure as PNG, atomically (see :func:`bayesnoise.io.write_bytes`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    bio.write_bytes(path, buffer.getvalue())


_STYLES = {
    "spr": ("SPR |μ|+σ", "C0"),
    "snr": ("SNR |μ|/σ", "C3"),
    "magnitude": ("magnitude |μ|", "C2"),
    "log_alpha": ("learned −log α", "C4"),
}


def seed_plots(out: Path, results: dict) -> list[str]:
    """The pruning curves over seeds: per rule the mean test curve and a band of ±1 sd, the
    iterative schedule's mean, and the validation-chosen breakpoints' mean."""
    metric = results["metric"]
    scale = 100.0 if metric == "error" else 1.0
    fig, ax = _figure(figsize=(6, 4))
    for stage, style in (("curves", "-"), ("iterative", "s--")):
        for rule, pts in (results.get(stage) or {}).items():
            pts = np.asarray(pts, np.float64)
            sd = np.asarray(results[f"{stage}_sd"][rule], np.float64)[:, 1]
            name, color = _STYLES[rule]
            if stage == "curves":
                bp, bp_sd = results["breakpoints"][rule], results["breakpoints_sd"][rule]
                label = f"{name} (flat to {100 * bp:.0f} ± {100 * bp_sd:.0f}%)"
            else:
                label = f"{name}, iterative"
            x, y = 100 * pts[:, 0], scale * pts[:, 1]
            ax.plot(x, y, style, ms=3, color=color, label=label)
            ax.fill_between(x, y - scale * sd, y + scale * sd, color=color, alpha=0.2, lw=0)
    unpruned = results["unpruned"]
    ax.axhline(scale * unpruned, color="gray", lw=0.8, ls=":")
    top = unpruned * 3 if metric == "error" else unpruned * 1.3
    ax.set_ylim(0, scale * max(top, unpruned + (0.05 if metric == "error" else 0)))
    ax.set_xlabel("weights removed (%)")
    ax.set_ylabel("test error (%)" if metric == "error" else "test RMSE")
    ax.set_title(f"{results['dataset']}: {len(results['seeds'])} seeds, mean ± sd")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = str(out / "pruning_curves.png")
    _save(fig, path)
    return [path]


def plots(out: Path, task: Any, results: dict, post, ref, *, learned: Any = None) -> list[str]:
    """Writes the run's PNG plots into ``out`` and returns their paths.

    ``learned``: the variables of a learned-noise network, for the histogram of its first
    layer's log α and, for 28 x 28 inputs, the map of first-layer weights kept per pixel.
    """

    files = []
    metric = results["metric"]
    label = "test error (%)" if metric == "error" else "test RMSE"
    scale = 100.0 if metric == "error" else 1.0
    fig, ax = _figure(figsize=(6, 4))
    styles = _STYLES
    for rule, pts in results["curves"].items():
        pts = np.asarray(pts)
        name, color = styles[rule]
        bp = results["breakpoints"][rule]
        ax.plot(
            100 * pts[:, 0],
            scale * pts[:, 1],
            label=f"{name} (flat to {100 * bp:.0f}% on validation)",
            color=color,
        )
        per_chain = results.get("per_chain", {}).get("curves", {}).get(rule)
        if per_chain:  # the range of the curves of the chains' own moments
            v = scale * np.asarray(per_chain, np.float64)
            ax.fill_between(100 * pts[:, 0], v.min(0), v.max(0), color=color, alpha=0.15, lw=0)
    if results.get("per_chain", {}).get("curves"):
        ax.fill_between([], [], [], color="gray", alpha=0.3, lw=0, label="range over chains")
    for rule, pts in results.get("finetuned", {}).items():
        pts = np.asarray(pts, np.float64)
        name, color = styles[rule]
        ax.plot(100 * pts[:, 0], scale * pts[:, 1], "o:", color=color, label=f"{name}, fine-tuned")
    for rule, pts in results.get("iterative", {}).items():
        pts = np.asarray(pts, np.float64)
        name, color = styles[rule]
        ax.plot(
            100 * pts[:, 0], scale * pts[:, 1], "s--", ms=3, color=color, label=f"{name}, iterative"
        )
    if results.get("soft_target"):
        st = np.asarray([p[:2] for p in results["soft_target"]], np.float64)
        ax.plot(100 * st[:, 0], scale * st[:, 1], "ks--", label="soft targets (retrained)")
    threshold = (results.get("learned_noise") or {}).get("threshold")
    if threshold:
        f, v = threshold["fraction_removed"], threshold["metric"]
        name = f"log α < {threshold.get('log_alpha', 3):g}"
        ax.plot(
            100 * f, scale * v, "*", ms=11, color="C4", label=f"{name} ({100 * f:.0f}% removed)"
        )
    ax.axhline(scale * results["unpruned"], color="gray", lw=0.8, ls=":")
    ax.set_xlabel("weights removed (%)")
    ax.set_ylabel(label)
    top = scale * max(
        results["unpruned"] * 3,
        results["unpruned"] + 0.05 * (1 if metric == "error" else results["unpruned"]),
    )
    ax.set_ylim(0, top)
    ax.set_title(f"{results['dataset']}: pruning from SGLD posterior moments")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(str(out / "pruning_curves.png"))
    _save(fig, files[-1])

    fig, axes = _figure(nrows=1, ncols=2, figsize=(9, 4), sharex=True, sharey=True)
    rng = np.random.default_rng(0)
    for ax, (title, p) in zip(
        axes, (("trained under noise", post), ("trained without noise", ref))
    ):
        mu = np.concatenate([np.abs(np.ravel(a)) for a in _kernels(p["mean"])])
        sd = np.concatenate([np.ravel(a) for a in _kernels(p["std"])])
        pick = rng.choice(mu.size, min(mu.size, 5000), replace=False)
        ax.scatter(mu[pick], sd[pick], s=2, alpha=0.4)
        ax.set_title(title)
        ax.set_xlabel("|posterior mean|")
    axes[0].set_ylabel("posterior std")
    fig.suptitle(f"{results['dataset']}: SGLD posterior moments of the weights")
    fig.tight_layout()
    files.append(str(out / "mean_vs_std.png"))
    _save(fig, files[-1])

    if results.get("em"):
        fig, ax = _figure(figsize=(5, 3.5))
        its = [r["iteration"] for r in results["em"]]
        scales = np.asarray([r["scales_mean"] for r in results["em"]])
        for j in range(scales.shape[1]):
            ax.plot(its, scales[:, j], marker="o", label=f"layer {j}")
        ax.set_xlabel("EM iteration")
        ax.set_ylabel("mean scale λ")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(str(out / "em_scales.png"))
        _save(fig, files[-1])
        files.append(_first_layer_scales(out, results, post["scales"]))
    if learned is not None:
        files += _learned_plots(out, results, learned)
    return files


def _learned_plots(out: Path, results: dict, variables) -> list[str]:
    """The first layer's log α: a histogram (over its weights, or its rows for a row noise),
    and, when its input is a 28 x 28 image, the number of its weights kept per pixel under the
    threshold rule."""
    first = bnn.learned_layers(variables, require=True)[0]
    info = results.get("learned_noise") or {}
    threshold = info.get("threshold", {}).get("log_alpha", 3.0)
    unit = "weights" if first.per == "weight" else "rows (input units)"
    files = []
    fig, ax = _figure(figsize=(5, 3.5))
    values = np.ravel(np.asarray(first.log_alpha, np.float64))
    span = (min(values.min(), threshold) - 1, max(values.max(), threshold) + 1)  # the line too
    ax.hist(values, bins=60, range=span, color="C4")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"log α = {threshold:g}")
    ax.set_xlabel("log α")
    ax.set_ylabel(f"first-layer {unit}")
    ax.set_title(f"{results['dataset']}: learned noise of {first.path}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(str(out / "log_alpha_hist.png"))
    _save(fig, files[-1])
    kernel_rows = np.shape(first.kernel)[-2]
    if np.ndim(first.kernel) == 2 and kernel_rows == 28 * 28:
        kept = np.sum(np.asarray(first.weight_log_alpha) < threshold, axis=-1).reshape(28, 28)
        fig, ax = _figure(figsize=(4.5, 4))
        image = ax.imshow(kept, cmap="viridis")
        fig.colorbar(image, ax=ax, label="kept weights")
        ax.set_axis_off()
        ax.set_title(f"first-layer weights kept per pixel (log α < {threshold:g})", fontsize=9)
        fig.tight_layout()
        files.append(str(out / "kept_per_pixel.png"))
        _save(fig, files[-1])
    return files


def _first_layer_scales(out: Path, results: dict, scales) -> str:
    """The learned scale of every input (the first kernel's rows): a 28 x 28 image of log10 λ
    for MNIST-shaped inputs, else a bar per input; rows at the floor are the pruned inputs."""
    first = np.asarray(_kernels(scales)[0], np.float64)
    floor = (results.get("em_settings") or {}).get("min_scale")
    if first.size == 28 * 28:
        fig, ax = _figure(figsize=(4.5, 4))
        image = ax.imshow(np.log10(first).reshape(28, 28), cmap="magma")
        fig.colorbar(image, ax=ax, label="log10 λ")
        ax.set_axis_off()
    else:
        fig, ax = _figure(figsize=(max(4.0, 0.12 * first.size + 1), 3.5))
        ax.bar(np.arange(first.size), first, color="C0")
        ax.set_yscale("log")
        ax.set_xlabel("input")
        ax.set_ylabel("learned scale λ")
        if floor:
            ax.axhline(floor, color="k", ls="--", lw=1, label=f"floor {floor:g} (pruned)")
            ax.legend(fontsize=8)
    ax.set_title(f"{results['dataset']}: input scales learned by EM", fontsize=8)
    fig.tight_layout()
    path = str(out / "em_first_layer_scales.png")
    _save(fig, path)
    return path


def _kernels(tree):
    return [leaf for path, leaf in _flat(tree) if path.endswith("kernel")]


def _flat(tree):
    return [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def seed_table(results: dict) -> str:
    """The summary of a run over seeds: every figure as mean ± sd over the seeds."""
    m = results["metric"]
    pct = m == "error"
    fmt = lambda v, sd: f"{100 * v:.2f} ± {100 * sd:.2f}%" if pct else f"{v:.3f} ± {sd:.3f}"
    frac = lambda v, sd: f"{100 * v:.1f} ± {100 * sd:.1f}%"
    lines = [
        f"{results['dataset']}, seeds {results['seeds']}: unpruned {m} "
        f"{fmt(results['unpruned'], results['unpruned_sd'])}",
        "breakpoint: the largest fraction within tolerance on the validation split; test: the "
        "test metric there",
    ]
    for rule, bp in results["breakpoints"].items():
        lines.append(
            f"{rule:<10} one-shot {frac(bp, results['breakpoints_sd'][rule])} at "
            f"{fmt(results['breakpoint_metrics'][rule], results['breakpoint_metrics_sd'][rule])}"
        )
    for what, key in (
        ("fine-tuned", "finetuned_breakpoints"),
        ("iterative", "iterative_breakpoints"),
    ):
        for rule, c in (results.get(key) or {}).items():
            lines.append(
                f"{rule:<10} {what} {frac(c['fraction'], c['fraction_sd'])} at "
                f"{fmt(c['metric'], c['metric_sd'])}"
            )
    for name, values in (results.get("predictive") or {}).items():
        lines.append(f"{name:<15} {m} {fmt(values['mean'], values['sd'])}")
    return "\n".join(lines)


def table(results: dict) -> str:
    """The run's summary as text: breakpoints, metrics at a few fractions, diagnostics."""
    m = results["metric"]
    fmt = (lambda v: f"{100 * v:.2f}%") if m == "error" else (lambda v: f"{v:.3f}")
    lines = [
        f"{results['dataset']}: unpruned {m} {fmt(results['unpruned'])} "
        f"(trained net {fmt(results['trained_metric'])})",
        "breakpoint: the largest fraction within tolerance on the validation split; test: "
        "the test metric there",
        f"{'rule':<10} {'breakpoint':>10} {'test':>7} "
        + " ".join(f"{int(100 * f):>6}%" for f in (0.5, 0.75, 0.9, 0.95)),
    ]
    for rule, pts in results["curves"].items():
        pts = np.asarray(pts)
        at = [fmt(float(np.interp(f, pts[:, 0], pts[:, 1]))) for f in (0.5, 0.75, 0.9, 0.95)]
        chains = results.get("per_chain", {}).get("breakpoints", {}).get(rule)
        spread = f"   chains {100 * min(chains):.0f}-{100 * max(chains):.0f}%" if chains else ""
        lines.append(
            f"{rule:<10} {100 * results['breakpoints'][rule]:>9.0f}% "
            f"{fmt(results['breakpoint_metrics'][rule]):>7} "
            + " ".join(f"{a:>7}" for a in at)
            + spread
        )
    for what, key in (
        ("fine-tuned", "finetuned_breakpoints"),
        ("iterative", "iterative_breakpoints"),
    ):
        chosen = results.get(key) or {}
        if chosen:
            lines.append(
                f"{what} (largest fraction within tolerance on validation, test {m} there): "
                + ", ".join(
                    f"{rule} {100 * c['fraction']:.1f}% at {fmt(c['metric'])}"
                    for rule, c in chosen.items()
                )
            )
    sg = results.get("sgld", {})
    if sg:
        line = (
            f"sgld: {'converged' if sg.get('converged') else 'NOT converged'} (max R-hat "
            f"{sg.get('rhat_max', float('nan')):.3g}, min ESS {sg.get('ess_min', float('nan')):.3g})"
        )
        if sg.get("predictive_rhat_max") is not None:
            line += (
                f"; predictions on held-out inputs: max R-hat {sg['predictive_rhat_max']:.3g}, "
                f"min ESS {sg.get('predictive_ess_min', float('nan')):.3g}"
            )
        rec = sg.get("prior_recovery")
        if rec:
            line += (
                f"; {rec['inputs']} dead inputs: variance {rec['variance_over_prior']:.2f} x prior, "
                f"|mean| {rec['mean_abs_over_prior_sd']:.2f} prior sd"
            )
        lines.append(line)
    em_records = results.get("em") or []
    if em_records and em_records[0].get("log_evidence") is not None:
        first, last = em_records[0], em_records[-1]
        lines.append(
            f"em: {m} at the mode {fmt(first['metric_at_mean'])} (λ = 1) -> "
            f"{fmt(last['metric_at_mean'])} (learned); log evidence {first['log_evidence']:.1f} -> "
            f"{last['log_evidence']:.1f}; {last['pruned_rows']} rows at the floor"
        )
    ln = results.get("learned_noise")
    predictive = dict(results.get("predictive", {}))
    if ln:
        th = ln["threshold"]
        lines.append(
            f"learned noise (per {ln['per']}): mean net {fmt(ln['mean_metric'])}; "
            f"log α < {th.get('log_alpha', 3):g} removes {100 * th['fraction_removed']:.1f}% "
            f"of the weights, {m} {fmt(th['metric'])}"
        )
        predictive["learned_mc"] = ln["mc"]
    for name, values in predictive.items():
        parts = ", ".join(
            f"{k} {fmt(v) if k == 'error' else f'{v:.3f}'}" for k, v in values.items()
        )
        lines.append(f"{name:<15} {parts}")
    return "\n".join(lines)
