"""Markdown tables and matplotlib plots (Agg) from a results dict (run.py's results.json)."""

from __future__ import annotations

from pathlib import Path

LABELS = {"serial": "serial DDIM", "srds": "SRDS", "srds-pipelined": "SRDS pipelined", "paradigms": "ParaDiGMS", "eps-picard": "eps-Picard"}
ERROR_FLOOR = 1e-8  # errors below (exact runs: 0 or float rounding) are drawn here
STYLE = {"srds": ("tab:blue", "o"), "srds-pipelined": ("tab:green", "s"), "paradigms": ("tab:red", "^"),
         "eps-picard": ("tab:purple", "D")}


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [f"# SRDS benchmark ({machine['device']}, {machine['date']})", "",
             f"{machine['cpu']}, {machine['cpu_count']} cores, torch {machine['torch']} ({machine['torch_threads']} threads), "
             f"diffusers {machine['diffusers']}, {machine['platform']}. Total wall time {results['total_wall_s']:.0f} s.", ""]
    for name, case in results["cases"].items():
        lines.append(f"- **{name}**: {case['description']}; warm-up call {case['warmup_s']:.2f} s")
    for name, why in results.get("skipped", {}).items():
        lines.append(f"- **{name}: skipped** — {why}")
    lines += ["", "## Matched accuracy", "",
              "Cheapest run (in sequential evaluations) whose measured max-abs error vs the serial sample is <= the target: "
              "the samplers' tolerances mean different things, so they are matched by the error they achieve, chosen "
              "knowing the serial result (ParaDiGMS over its tolerance grid, SRDS over its tolerances and fixed "
              "iteration counts).",
              "", "Projected H200 speedups (latency.py): the run's calls priced with the latency-per-call curves measured "
              "on an H200 with CUDA graphs (DESIGN.md), one image with CFG (2 rows per trajectory point): "
              "'digits' = the 1.1 M-parameter 16x16 UNet, 'SD2' = the SD2-base UNet at 64x64 latents.", "",
              "| case | N | target | sampler | stop | seq. evals | seq. speedup | evals/image | wall speedup (this machine) "
              "| proj. H200 digits | proj. H200 SD2 | error |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in results["matched"]:
        if not m["reached"]:
            lines.append(f"| {m['case']} | {m['steps']} | {m['target']:g} | {LABELS[m['sampler']]} | not reached | | | | | | | |")
            continue
        knob = f"tol {m['tol']:g}" if m["stop"] == "rule" else f"{m['iterations']} iterations (fixed)"
        lines.append(f"| {m['case']} | {m['steps']} | {m['target']:g} | {LABELS[m['sampler']]} | {knob} | "
                     f"{m['sequential_calls']} | {m['seq_speedup']:.2f} | {m['evals_per_image']:.0f} | "
                     f"{m['wall_speedup']:.2f} | {m['projected_speedup']['h200_digits']:.2f} | "
                     f"{m['projected_speedup']['h200_sd2']:.2f} | {m['err_max']:.1e} |")
    lines += ["", "## All runs", "",
              "evals/image: model rows per image (serial = N); seq. evals: batched calls on the critical path; "
              "error: max-abs (RMS) vs the serial sample; tol 'fixed': SRDS run for exactly `iters` iterations "
              "(the oracle sweep that finds the fewest iterations reaching each target).", "",
              "| case | N | sampler | tol | width | iters | evals/image | seq. evals | seq. speedup | wall s | wall speedup | error max (rms) | acc. |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        knob = _num(r["tol"], "g") if r.get("stop", "rule") == "rule" else "fixed"
        lines.append(f"| {r['case']} | {r['steps']} | {LABELS[r['sampler']]} | {knob} | {_num(r['width'], 'd')} | "
                     f"{r['iterations']} | {r['evals_per_image']:.0f} | {r['sequential_calls']} | {r['seq_speedup']:.2f} | "
                     f"{r['wall_s']:.2f} | {r['wall_speedup']:.2f} | {r['err_max']:.1e} ({r['err_rms']:.1e}) | "
                     f"{_num(r['accuracy'], '.2f')} |")
    lines += ["", "width: SRDS blocks B or ParaDiGMS window w."]
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = results["runs"]
    cases = list(results["cases"])
    if not cases:
        return []
    written = []

    # 1. Residual vs iteration: the tightest tolerance of each sampler, one line per N.
    fig, axes = plt.subplots(len(cases), 3, figsize=(15, 3.6 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        for col, sampler in enumerate(("srds", "paradigms", "eps-picard")):
            ax = axes[row][col]
            mine = [r for r in runs if r["case"] == case and r["sampler"] == sampler and r.get("stop", "rule") == "rule"]
            for steps in sorted({r["steps"] for r in mine}):
                at_n = [r for r in mine if r["steps"] == steps]
                tight = min(at_n, key=lambda r: r["tol"])
                if tight["residuals"]:
                    ax.semilogy(range(1, len(tight["residuals"]) + 1), [max(v, 1e-16) for v in tight["residuals"]],
                                marker=".", label=f"N={steps} (tol {tight['tol']:g})")
            ax.set_title(f"{case}: {LABELS[sampler]}")
            ax.set_xlabel("iteration (SRDS: Parareal iteration; ParaDiGMS, eps-Picard: sweep)")
            ax.set_ylabel("residual (max-abs change)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    written.append(_save(fig, out / "residual_vs_iteration.png"))

    # 2. Sequential-evaluation speedup vs N at each matched target.
    targets = sorted({m["target"] for m in results["matched"]}, reverse=True)
    fig, axes = plt.subplots(1, len(cases), figsize=(5.2 * len(cases), 3.8), squeeze=False)
    for col, case in enumerate(cases):
        ax = axes[0][col]
        for sampler, (color, marker) in STYLE.items():
            for target, line in zip(targets, ("-", "--", ":")):
                pts = sorted((m["steps"], m["seq_speedup"]) for m in results["matched"]
                             if m["case"] == case and m["sampler"] == sampler and m["target"] == target and m["reached"])
                if pts:
                    ax.plot(*zip(*pts), line, color=color, marker=marker, label=f"{LABELS[sampler]}, err<={target:g}")
        steps = sorted({r["steps"] for r in runs if r["case"] == case})
        ax.plot(steps, [s / (2 * s ** 0.5 - 1) for s in steps], ":", color="grey",
                label="pipelined SRDS after 1 iteration: N/(2 sqrt(N)-1)")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("N (DDIM steps)")
        ax.set_ylabel("speedup in sequential evals (N / seq. evals)")
        ax.set_title(case)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "speedup_vs_n.png"))

    # 3. Error vs speedup: every run.
    fig, axes = plt.subplots(1, len(cases), figsize=(5.2 * len(cases), 3.8), squeeze=False)
    for col, case in enumerate(cases):
        ax = axes[0][col]
        for sampler, (color, marker) in STYLE.items():
            pts = [(r["seq_speedup"], max(r["err_max"], ERROR_FLOOR), r["steps"]) for r in runs
                   if r["case"] == case and r["sampler"] == sampler]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, label=LABELS[sampler])
                for sx, err, steps in pts:
                    ax.annotate(str(steps), (sx, err), fontsize=6, xytext=(3, 2), textcoords="offset points")
        for target in targets:
            ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("speedup in sequential evals (labels: N)")
        ax.set_ylabel(f"max-abs error vs serial (floored at {ERROR_FLOOR:g})")
        ax.set_title(case)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "error_vs_speedup.png"))

    # 4. The measured H200 latency-per-call curves the projections use (DESIGN.md): why batching is (not) free.
    from .latency import CURVES

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curve in CURVES.items():
        rows = sorted(curve)
        label = {"h200_digits": "digits-size UNet (1.1 M, fp32)", "h200_sd2": "SD2-base UNet (866 M, fp16)"}[name]
        axes[0].plot(rows, [curve[r] / curve[rows[0]] for r in rows], marker="o", label=label)
        axes[1].plot(rows, [curve[r] / r for r in rows], marker="o", label=label)
    axes[0].set_ylabel("call latency / 1-row call latency")
    axes[1].set_ylabel("ms per row")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows in one call (H200, CUDA graphs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "h200_latency_per_row.png"))
    return written


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name
