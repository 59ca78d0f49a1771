"""The apps' figures (PNG, matplotlib's Agg backend): one function per app, records in, files out."""

from __future__ import annotations

import os

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

# ----------------------------------------------------------------------------- gradient_flow


def _by_net(runs):
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(r["name"], []).append(r)
    return groups


def _positive(values) -> np.ndarray:
    """float64 array with non-finite and non-positive entries as NaN (gaps on a log axis)."""
    arr = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(arr) & (arr > 0), arr, np.nan)


def _plot(path: str, runs, panels, title: str) -> None:
    """`panels`: (key, theory key or None, first x index, y label) per subplot."""
    groups = _by_net(runs)
    # tab20's dark shades first (10 distinct hues), then the light ones.
    tab20 = plt.get_cmap("tab20").colors
    palette = tab20[0::2] + tab20[1::2]
    colors = lambda i: palette[i % len(palette)]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels) + 3, 5), squeeze=False)
    for ax, (key, theory_key, x0, ylabel) in zip(axes[0], panels):
        drawn = False
        for i, (name, group) in enumerate(groups.items()):
            if key not in group[0]["blocks"]:
                continue
            with np.errstate(all="ignore"):
                y = _positive(np.mean([r["blocks"][key] for r in group], axis=0))
            x = np.arange(x0, x0 + len(y))
            ax.plot(x, y, color=colors(i), lw=1.5, label=name)
            drawn |= bool(np.isfinite(y).any())
            predicted = group[0]["theory"]
            if theory_key and predicted is not None:
                with np.errstate(all="ignore"):
                    t = _positive(np.mean([r["theory"][theory_key] for r in group], axis=0))
                ax.plot(x, t, color=colors(i), lw=1.5, ls="--")
                drawn |= bool(np.isfinite(t).any())
        ax.set_xscale("symlog", linthresh=10)
        if drawn:
            ax.set_yscale("log")
        ax.set_xlabel("layer index l (symlog)" if x0 == 0 else "block l (symlog)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][-1].plot([], [], color="gray", ls="--", label="mean-field theory")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(title + " (mean over seeds; non-finite and 0 values are gaps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gradient_flow(workdir: str, runs, files: tuple[str, str, str]) -> list[str]:
    """`gradient_flow`'s three figures (act_grad_sq, fwd_sq, block Jacobians) in `workdir`,
    one line per net (mean over seeds), theory dashed; returns their paths."""
    paths = [os.path.join(workdir, name) for name in files]
    _plot(paths[0], runs, [("act_grad_sq", "act_grad_sq", 0, "act_grad_sq[l] = E||dS/dx_l||^2")],
          "Backward: squared gradient at x_l")
    _plot(paths[1], runs, [("fwd_sq", "fwd_sq", 0, "fwd_sq[l] = mean x_l^2")],
          "Forward: second moment of x_l")
    _plot(paths[2], runs, [("jac_spectral", None, 1, "jac_spectral[l] = mean_i sigma_max(J_l)"),
                           ("jac_fro_sq", "jac_fro_sq", 1, "jac_fro_sq[l] = mean ||J_l||_F^2 / n")],
          "Block Jacobians J_l = dx_l/dx_{l-1}")
    return paths


def gradient_flow_spectrum(path: str, runs) -> str | None:
    """`gradient_flow`'s end-to-end singular-value density (`singular_value_density`), one
    curve per net, SLQ nodes pooled over its seeds; theory (`sqrt` of the predicted mean squared
    singular value, `theory.e2e_jac_fro_sq`: dim(x_0) = dim(x_L) where the theory applies) where
    it exists. None (nothing written) when no run has a spectrum (`e2e_spectrum=False`)."""
    nets = [(name, [r for r in group if r["e2e"].get("e2e_slq_nodes") is not None])
            for name, group in _by_net(runs).items()]
    nets = [(name, group) for name, group in nets if group]
    if not nets:
        return None
    nodes = [np.concatenate([np.asarray(r["e2e"]["e2e_slq_nodes"], np.float64) for r in g])
             for _, g in nets]
    weights = [np.concatenate([np.asarray(r["e2e"]["e2e_slq_weights"], np.float64) for r in g])
               for _, g in nets]
    theory_mean_sq = [
        float(np.mean([r["theory"]["e2e_jac_fro_sq"] for r in g]))
        if all(r["theory"] and r["theory"].get("e2e_jac_fro_sq") is not None for r in g) else None
        for _, g in nets
    ]
    singular_value_density(path, nodes, weights,
                           [name for name, _ in nets], theory_mean_sq=theory_mean_sq)
    return path


# ----------------------------------------------------------------------------- degradation


_COLORMAPS = {"plain": "Reds", "v1": "Blues", "v2": "Greens"}


def _mean_curve(curves: list[list]) -> np.ndarray:
    n = min(len(c) for c in curves)
    return np.mean([np.asarray(c[:n], np.float64) for c in curves], axis=0)


def degradation(runs: list[dict], table: list[dict], path: str) -> None:
    """Writes `degradation.png`: (a) training loss vs step per net, (b) final training loss vs
    weight layers per block kind (mean +- std over seeds), (c) per-block gradient norms at step 0."""
    nets = list(dict.fromkeys(r["net"] for r in runs))
    blocks = list(dict.fromkeys(r["model"]["block"] for r in runs))
    colors = {}
    for block in blocks:
        mine = [n for n in nets if next(r for r in runs if r["net"] == n)["model"]["block"]
                == block]
        cmap = plt.get_cmap(_COLORMAPS.get(block, "Greys"))
        for i, net in enumerate(mine):
            colors[net] = cmap(0.45 + 0.55 * (i + 1) / len(mine))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))

    ax = axes[0]
    for net in nets:
        group = [r for r in runs if r["net"] == net and r["history"]["step"]]
        if not group:
            continue
        steps = group[0]["history"]["step"][: min(len(r["history"]["step"]) for r in group)]
        loss = _mean_curve([[np.nan if v is None else v for v in r["history"]["train_loss"]]
                            for r in group])
        ax.plot(steps, loss, color=colors[net], label=net, lw=1.5)
    ax.set(yscale="log", xlabel="step", ylabel="training loss (train mode)",
           title="(a) training loss, mean over seeds")
    ax.legend(fontsize=8, ncol=2)

    ax = axes[1]
    for block in blocks:
        rows = [t for t in table if t["block"] == block and t["final_train_loss_mean"] is not None]
        if rows:
            ax.errorbar([t["weight_layers"] for t in rows],
                        [t["final_train_loss_mean"] for t in rows],
                        yerr=[t["final_train_loss_std"] for t in rows], marker="o", capsize=4,
                        color=plt.get_cmap(_COLORMAPS.get(block, "Greys"))(0.85), label=block)
    depths = sorted({t["weight_layers"] for t in table})
    ax.set(xscale="log", yscale="log", xlabel="weight layers", ylabel="final training loss",
           title="(b) final training loss, mean ± std over seeds")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend()

    ax = axes[2]
    for net in nets:
        group = [r["history"]["param_grad_norm"][0] for r in runs if r["net"] == net
                 and r["history"]["grad_step"] and r["history"]["grad_step"][0] == 0]
        if group:
            norms = _mean_curve(group)
            ax.plot(np.arange(1, len(norms) + 1), norms, color=colors[net], label=net, lw=1.5)
    ax.set(yscale="log", xlabel="block l (input → output)",
           ylabel="||dL/dθ_l|| at initialization", title="(c) per-block gradient norm, step 0")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- spectra


def _log_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian kernel estimate, in log10(sigma), of the weighted nodes (positive ones only);
    Silverman's bandwidth of the weighted sample, at least 0.01 decades."""
    t = np.log10(nodes)
    w = weights / np.sum(weights)
    mean = np.sum(w * t)
    std = np.sqrt(np.sum(w * (t - mean) ** 2))
    n_eff = 1.0 / np.sum(w**2)  # Kish's effective sample size.
    h = max(1.06 * std * n_eff ** -0.2, 0.01)
    z = (grid[:, None] - t[None, :]) / h
    return np.exp(-0.5 * z**2) @ w / (h * np.sqrt(2 * np.pi))


def singular_value_density(path: str, nodes, weights, labels, theory_mean_sq=None,
                           theory_values=None,
                           title: str = "End-to-end Jacobian singular values (SLQ)") -> None:
    """Writes a PNG: the density of each net's end-to-end singular values `sigma` (per decade,
    log-x), a kernel estimate of its SLQ nodes weighted by `tau^2` and pooled over examples
    (Pennington et al. 2017, Fig. 1's dynamical-isometry picture). Theory, where given, in the
    net's colour: a dotted line at `sqrt(E sigma^2)` from a predicted mean squared singular value
    (`theory.e2e_jacobian_mean_sq_singular_value`), a dashed one at a value every singular value
    takes (`gain^depth` for a linear orthogonal net); a marker at the measured `sqrt(E sigma^2)`.

    Args:
      nodes, weights: one `[B, m]` array each per net (`e2e_slq_nodes`, `e2e_slq_weights`).
      labels: one name per net.
      theory_mean_sq, theory_values: one float or None per net (None: nothing drawn).
    """
    n = len(labels)
    theory_mean_sq = [None] * n if theory_mean_sq is None else list(theory_mean_sq)
    theory_values = [None] * n if theory_values is None else list(theory_values)
    nets = [(np.asarray(s, np.float64).ravel(), np.asarray(w, np.float64).ravel())
            for s, w in zip(nodes, weights)]
    positive = [s[(s > 0) & np.isfinite(s)] for s, _ in nets]
    allpos = np.concatenate(positive + [np.array([1.0])])
    lo, hi = np.log10(allpos.min()) - 0.5, np.log10(allpos.max()) + 0.5
    grid = np.linspace(lo, hi, 600)
    palette = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, ((s, w), label) in enumerate(zip(nets, labels)):
        color = palette[i % len(palette)]
        keep = (s > 0) & np.isfinite(s) & (w > 0)
        total = np.sum(w)
        at_zero = 1.0 - np.sum(w[keep]) / total if total > 0 else 0.0
        name = label + (f" ({100 * at_zero:.0f}% of the weight at 0)" if at_zero > 0.005 else "")
        if keep.any():
            ax.plot(10**grid, _log_density(s[keep], w[keep], grid), color=color, lw=1.8,
                    label=name)
            rms = np.sqrt(np.sum(w * s**2) / total)
            ax.plot([rms], [0], marker="^", color=color, ms=9, clip_on=False)
        if theory_mean_sq[i] is not None and theory_mean_sq[i] > 0:
            ax.axvline(np.sqrt(theory_mean_sq[i]), color=color, ls=":", lw=1.5)
        if theory_values[i] is not None and theory_values[i] > 0:
            ax.axvline(theory_values[i], color=color, ls="--", lw=1.5)
    ax.plot([], [], color="gray", ls=":", label="theory: sqrt(E sigma^2)")
    ax.plot([], [], color="gray", ls="--", label="theory: every sigma")
    ax.plot([], [], color="gray", ls="", marker="^", label="measured sqrt(E sigma^2)")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("singular value sigma of dx_L/dx_0 (log)")
    ax.set_ylabel("density per decade (tau^2-weighted, pooled over examples)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- trainability


def _method_styles(table: list[dict]) -> dict[str, dict]:
    """A colour per method (tab10); residual methods (block v1/v2) dashed, plain ones solid."""
    palette = plt.get_cmap("tab10").colors
    methods = list(dict.fromkeys(t["method"] for t in table))
    styles = {}
    for i, method in enumerate(methods):
        block = next(t["block"] for t in table if t["method"] == method)
        styles[method] = dict(color=palette[i % len(palette)],
                              ls="-" if block == "plain" else "--")
    return styles


def _depth_axis(ax, depths, ylabel: str, title: str) -> None:
    ax.set(xscale="log", yscale="log", xlabel="weight layers", ylabel=ylabel, title=title)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(True, which="major", alpha=0.3)


def trainability(runs: list[dict], table: list[dict], path: str) -> None:
    """Writes `trainability.png`: (a) final training loss vs weight layers per method (mean +-
    std over seeds; plain methods solid, residual dashed), and at initialization (b)
    act_grad_sq[l] of the deepest nets vs l, (c) act_grad_sq[0] / act_grad_sq[L] vs weight
    layers, (d) the spread p90 / p10 of dx_L/dx_0's singular values vs weight layers."""
    styles = _method_styles(table)
    depths = sorted({t["weight_layers"] for t in table})
    fig, axes = plt.subplots(1, 4, figsize=(23, 5))
    panels = (
        (axes[0], "final_train_loss_mean", "final training loss",
         "(a) final training loss, mean ± std over seeds"),
        (axes[2], "act_grad_sq_ratio_mean", "act_grad_sq[0] / act_grad_sq[L]",
         "(c) gradient growth output → input, init"),
        (axes[3], "sv_spread_mean", "p90 / p10 of singular values of dx_L/dx_0",
         "(d) end-to-end Jacobian spread, init"),
    )
    for ax, key, ylabel, title in panels:
        for method, style in styles.items():
            rows = [t for t in table if t["method"] == method and t[key] is not None
                    and np.isfinite(t[key]) and t[key] > 0]
            if not rows:
                continue
            x = [t["weight_layers"] for t in rows]
            y = [t[key] for t in rows]
            err = ([t["final_train_loss_std"] for t in rows]
                   if key == "final_train_loss_mean" else None)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=4, label=method, **style)
        _depth_axis(ax, depths, ylabel, title)
    axes[0].legend(fontsize=8)

    ax = axes[1]
    deepest = max(depths)
    for method, style in styles.items():
        group = [r["init_diagnostics"]["act_grad_sq"] for r in runs
                 if r["method"] == method and r["weight_layers"] == deepest]
        if group:
            with np.errstate(all="ignore"):
                y = _positive(_mean_curve(group))
            ax.plot(np.arange(len(y)), y, lw=1.5, label=method, **style)
    ax.set(yscale="log", xlabel="signal x_l, l = 0 (input side) .. L",
           ylabel="act_grad_sq[l] = E||dS/dx_l||^2",
           title=f"(b) squared gradient at init, {deepest} layers")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
