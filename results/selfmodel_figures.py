"""Publish a self-modeling sweep: merge the runs' results.json files, write results/selfmodel_NAME.json (the
table with 95% intervals, the trend test, per-seed values, thinned RLCT traces) and the figures; prints the
README rows, the trend lines and each AW's gain over AW 0 paired by seed.

  python results/selfmodel_figures.py mnist_h64 out/selfmodel/mnist_h64_s0-4 out/selfmodel/mnist_h64_s5-9
  python results/selfmodel_figures.py --redraw results/selfmodel_mnist_h64.json   # figures from the JSON alone
  python results/selfmodel_figures.py imdb_quick results/selfmodel_imdb_quick.json out/selfmodel/imdb_quick_s5  # more seeds
  python results/selfmodel_figures.py --widths mnist_widths results/selfmodel_mnist_h{64,128,256,512}.json
  python results/selfmodel_figures.py imdb_quick_embedding out/... --beside results/selfmodel_imdb_quick.json
  python results/selfmodel_figures.py mnist_h64_intel out/... --against results/selfmodel_mnist_h64.json
  python results/selfmodel_figures.py --steps imdb_paper_emb_steps results/selfmodel_imdb_paper_embedding_{aws,lr05,lr025}.json
  python results/selfmodel_figures.py --rescaled mnist_h64_rlct_width results/selfmodel_mnist_h64_rescale.json ...
  python results/selfmodel_figures.py --rescaled NAME results/...json ... --read results/selfmodel_imdb_paper_embedding_aws.json

Figures: NAME.png, three panels against AW (test accuracy, width of the final layer's class rows, RLCT), and a
fourth where the runs counted the hidden units feeding the class rows (the share dead, the share on per example),
each point the mean over seeds with its 95% Student-t interval, and the paper's own numbers beside them where the
sweep is the paper's protocol and the paper gives them (IMDB, 500 epochs), and with `--beside` another published
sweep of the task (another --target or --aux, say) in grey, and then NAME_tradeoff.png, width and RLCT against
test accuracy, a point per AW, to compare the two at matched accuracy (and the units' two shares where both
counted them); for a run with --llc-rescale,
NAME_rescale.png, width and RLCT against the rescaling c (with --beside's curves); for a run with --llc-grid-*,
NAME_calibration.png, the chain-mean RLCT trace nbeta * (L(w) - L(w*)) of every (eps, gamma), AW 0 against the
largest AW.
`--rescaled NAME JSON...` takes published sweeps run with --llc-rescale (one task and hidden width) and draws
NAME.png, every network's RLCT against its class-row width over its rescalings, a line per (loss, AW).
It also prints, per seed, each network's RLCT as a ratio of the plain network's (AW 0) where the two have class rows
as wide (mean widths within 2%, or --match-tol): a comparison at one head width; and, where both have rescaled
estimates, the same at each seed's own two head widths, each network's estimates joined in log-log. With
`--read PUBLISHED.json` (a sweep of the same task and width, no rescaling needed) it reads every trained network
of that sweep against each rescaled one at its own head width, seed by seed, and draws them beside the lines.
`--widths NAME JSON...` takes published sweeps that differ only in the hidden width and draws the same three
quantities against the width, one line per AW (the paper's Fig. 2 B-D), as NAME.png with its markdown table
(and the dead units, as a share of the width, where every sweep counted them).
`--steps NAME JSON...` takes SGD sweeps that differ only in the learning rate and draws NAME.png, each
network's width and RLCT as ratios of the plain network trained at its own learning rate, and the RLCT itself
beside its plain networks', against lr x AW (the step SGD takes on the self-model's term per unit of its
gradient), with one README line.
`--against PUBLISHED.json` compares the cells (AW, seed) this sweep shares with a sweep of the same settings made
elsewhere (another CPU maker, say, or with extra estimates: --llc-rescale, --llc-grid-*): per AW, how many repeat
it and the largest differences; one README line.

The runs must share every setting but the AW list and the seeds (a sweep split over processes), and the device; a
run of AW 0 alone may have another --target or --aux (AW 0 trains the same plain network whatever they say). A
published JSON counts as one more run: seeds measured later join it without its first output folders. The trace
check ("flat") is recomputed here from the stored traces with the current selfmodel.llc_diagnostics, so runs
made by older code are judged by the same rule. matplotlib is an optional extra: the training scripts never
import it; this script needs it only for the figures (the JSON is written without it).
"""
import argparse, json, math, os, sys, textwrap

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402
import selfmodel as S  # noqa: E402
from publish import cpu_of, pm_stats, rounded  # noqa: E402

# --smoke only sets other flags' defaults, which the config holds: it is not a setting of its own
VARY = {"aw", "seeds", "seed", "smoke", "out", "resume", "model_aw", "model_seed", "stop_at_step", "data_dir",
        "log_every", "ckpt_interval", "no_download", "device", "compile", "eval_batch", "num_tokens"}


# the settings that change nothing at AW 0, where no layer is self-modeled or penalised
AT_AW0 = {"target", "aux"}


def command_of(cfg):
    """The selfmodel.py command a config came from: the flags that differ from its task's and preset's defaults."""
    base = vars(S.get_args(["--task", cfg["task"], "--preset", cfg["preset"]]))
    argv = ["python selfmodel.py", "--task", cfg["task"]] + (["--preset", cfg["preset"]] if cfg["preset"] != "paper" else [])
    argv += ["--aw", cfg["aw"], "--seed", str(cfg["seed"]), "--seeds", str(cfg["seeds"])]
    for k in ("hidden", "target", "aux", "width", "epochs", "batch_size", "lr", "momentum", "normalize",
              "train_subset", "test_subset", "sgld_eps", "sgld_gamma", "sgld_chains", "sgld_draws", "sgld_batch",
              "llc_protocol", "llc_grid_eps", "llc_grid_gamma", "llc_rescale", "vocab_size"):
        if k in cfg and cfg[k] != base.get(k):
            argv += [f"--{k.replace('_', '-')}", f"{cfg[k]:g}" if isinstance(cfg[k], float) else str(cfg[k])]
    return " ".join(argv)


def recheck(trace, nbeta):
    """The current trace check on the stored block means (the line fit on block means of equal size is the
    fit on the draws, up to the dropped tail)."""
    L = torch.tensor(trace["loss_trace"], dtype=torch.float64).T  # (blocks, chains)
    L0 = torch.tensor(trace["init_trace"], dtype=torch.float64)
    d = S.llc_diagnostics(L, L0, nbeta, trace_points=len(L0))
    return {k: d[k] for k in ("drift", "noise", "flat")}


def from_published(pub):
    """A published results/selfmodel_NAME.json read back as one more input of `merge`, so that a sweep grows by
    seeds run later without its first output folders: its cells, shared config, commands and provenance."""
    return {"script": "selfmodel", "config": pub["config"],
            "metrics": {"runs": pub["runs"], "finished": pub["finished"]}, "device": pub["device"],
            "torch": pub["torch"], "git_commits": pub["git_commits"], "wall_seconds": pub["wall_minutes"] * 60,
            "commands": pub["commands"], "cpu_model": pub.get("cpu_model"), "cpu_kernels": pub.get("cpu_kernels", [])}


def merge(name, dirs):
    files = [os.path.join(d, "results.json") if os.path.isdir(d) else d for d in dirs]
    for f in files:
        common.check(os.path.exists(f), f"{f} does not exist: pass a selfmodel output folder, its results.json or "
                                        "a published results/selfmodel_*.json")
    res = [json.load(open(f)) for f in files]
    res = [from_published(r) if "table" in r and "runs" in r and "script" not in r else r for r in res]
    for r in res:
        r["config"] = S.spelled_out(r["config"])
    for f, r in zip(files, res):
        common.check(r.get("script") == "selfmodel", f"{f} was not written by selfmodel.py")
        common.check(r["device"] == res[0]["device"], f"{f} ran on {r['device']}, {files[0]} on {res[0]['device']}: "
                                                      "one table is one device")
    # AW 0 is the plain network whatever --target and --aux say (same init, loss CE alone): a run of AW 0 alone
    # joins a sweep of another target or of the control; the sweep's settings are those of its AW > 0 runs
    plain = [all(c["aw"] == 0 for c in r["metrics"]["runs"].values()) for r in res]
    first = plain.index(False) if False in plain else 0
    base = {k: v for k, v in res[first]["config"].items() if k not in VARY}
    for f, r, p in zip(files, res, plain):
        free = VARY | AT_AW0 if p else VARY
        diff = sorted(k for k in set(base) | set(r["config"]) if k not in free and r["config"].get(k) != base.get(k))
        common.check(not diff, f"{f} differs from {files[first]} in {', '.join(diff)}: only --aw and the seeds may "
                               f"differ (and --{' / --'.join(sorted(AT_AW0))} for a run of AW 0 alone)")
    runs = {}
    for r in res:
        for key, cell in r["metrics"]["runs"].items():
            common.check(key not in runs, f"cell {key} appears in two runs: drop one of them")
            runs[key] = cell
    aws = sorted({c["aw"] for c in runs.values()})
    cfg = {**base, "aw": ",".join(S.fmt_aw(a) for a in aws)}
    nbeta = base["sgld_nbeta"]
    cells = {}
    for key, c in sorted(runs.items(), key=lambda kv: (kv[1]["aw"], kv[1]["seed"])):
        cell = {k: c[k] for k in ("aw", "seed", "test_acc", "width", "width_out", "width_all", "llc", "train_seconds",
                                  "llc_seconds", "steps", "final_loss")}
        cell.update({k: c[k] for k in S.UNITS if k in c})  # runs since the measure, or results/selfmodel_units.py
        cell["llc_check"] = {"frac_below_init": c["llc_check"]["frac_below_init"], **recheck(c["llc_trace"], nbeta)}
        cell["llc_trace"] = c["llc_trace"]
        for extra in ("llc_grid", "llc_rescale"):  # the calibration estimates, each with its trace
            for g, est in c.get(extra, {}).items():
                cell.setdefault(extra, {})[g] = {
                    **({"width": est["width"]} if "width" in est else {}), "llc": est["llc"],
                    "frac_below_init": est["frac_below_init"], **recheck(est, nbeta), "loss_trace": est["loss_trace"],
                    "init_trace": est["init_trace"], "draws_per_point": est["draws_per_point"]}
        cells[key] = cell
    return {
        "name": name, "task": base["task"], "paper": PAPER.get(base["task"]),
        "paper_levels": PAPER_LEVELS.get(base["task"]) if papers_protocol(base) else None,  # per metric, per AW
        "commands": [c for r in res for c in (r["commands"] if "commands" in r else [command_of(r["config"])])],
        "device": res[0]["device"],
        # every CPU the cells ran on: a published sweep's own list, a run's record, else this machine's
        "cpu_model": ", ".join(sorted({m for r in res for m in (r.get("cpu_model") or cpu_of(r) or "?").split(", ")}))
        if res[0]["device"].startswith("cpu") else None,
        # the CPU's vector kernels and threads of the runs that recorded them (README, Determinism)
        "cpu_kernels": sorted({f"{r['cpu']['kernels']}, {r['cpu']['threads']} thread(s)" for r in res if r.get("cpu")}
                              | {k for r in res for k in r.get("cpu_kernels", [])}),
        # a sweep grown later may span versions: each named once, in order
        "torch": ", ".join(sorted({v for r in res for v in str(r["torch"]).split(", ")})),
        "git_commits": sorted({str(c) for r in res for c in r.get("git_commits", [r.get("git_commit")])}),
        # wall time of the last process of each run (a resumed run's earlier processes are not in it) ...
        "wall_minutes": round(sum(r.get("wall_seconds", r.get("seconds", 0)) for r in res) / 60, 1),
        # ... and the cells' own training + RLCT time, every process included: the cost of the table
        "cell_minutes": round(sum(c["train_seconds"] + c["llc_seconds"] for c in cells.values()) / 60, 1),
        "finished": all(r["metrics"]["finished"] for r in res),
        "config": {k: base[k] for k in sorted(base)},
        "table": S.summarise(cells, cfg), "runs": rounded(cells)}


PAPER = {
    "mnist": "weight width and RLCT fall as AW grows; test accuracy flat",
    "imdb": "weight width and RLCT fall as AW grows; test accuracy flat or slightly higher",
    "cifar10": "weight width and RLCT fall as AW grows; test accuracy flat",
}

# The paper's own levels, drawn beside ours, only where our run is the paper's protocol and the paper states the
# number: IMDB with 500 epochs of plain SGD, test accuracy (%) and RLCT per AW, from its IMDB figure. Runs that
# train otherwise (a preset, fewer epochs, another --target or --aux) are not comparable in level (only in ordering).
PAPER_LEVELS = {
    "imdb": {"test_acc": {0: 82.0, 100: 82.0, 500: 83.6}, "llc": {0: 13.7, 100: 11.2, 500: 5.2}},
}


def papers_protocol(cfg):
    """Whether a config trains and measures as the paper did: its task's settings (TASKS), on all the data."""
    cfg = S.spelled_out(cfg)
    return (cfg.get("preset") == "paper" and not cfg.get("train_subset") and not cfg.get("test_subset")
            and cfg["aux"] == S.AUX[0]
            and all(cfg.get(k) == v for k, v in S.TASKS[cfg["task"]].items() if k != "aw"))


def paper_levels(summary):
    """{metric: [(aw, value), ...]} of the paper's numbers at the AWs this sweep measured; {} where none apply."""
    levels = PAPER_LEVELS.get(summary["task"], {}) if papers_protocol(summary["config"]) else {}
    aws = {float(r["aw"]) for r in summary["table"]["rows"]}
    out = {k: sorted((float(a), v) for a, v in by_aw.items() if float(a) in aws) for k, by_aw in levels.items()}
    return {k: v for k, v in out.items() if v}


def settings_diff(summary, other):
    """(the other sweep's spelled-out config, the settings it differs in from this one's beside AW, seeds and the
    like)."""
    mine, theirs = S.spelled_out(summary["config"]), S.spelled_out(other["config"])
    return theirs, sorted(k for k in set(mine) | set(theirs) if k not in VARY and mine.get(k) != theirs.get(k))


def beside_of(other, summary):
    """Another published sweep of the same task, to draw beside this one (e.g. another --target): its label names
    the settings that differ, and per metric its [AW, mean, 95% half width] rows; kept in the JSON for --redraw."""
    common.check(other.get("task") == summary["task"] and "table" in other,
                 f"--beside: {other.get('name')!r} is not a published {summary['task']} sweep")
    theirs, diff = settings_diff(summary, other)
    common.check(diff, f"--beside: {other['name']} has this sweep's settings: merge its runs instead")
    label = f"{other['name']} ({', '.join(f'{k} {theirs.get(k)}' for k in diff)})"
    rows = {k: [[r["aw"], r[k + "_mean"], r[k + "_ci95"]] for r in other["table"]["rows"]]
            for k in ("test_acc", "width", "llc")}
    rows["collapsed"] = [[r["aw"], r.get("collapsed", 0), r["n"]] for r in other["table"]["rows"]]
    if has_units(other["table"]["rows"]):  # the units panel's two shares, the dead ones as a share of its width
        h = theirs["hidden"]
        rows["dead_units"] = [[r["aw"], r["dead_units_mean"] / h, (r["dead_units_ci95"] or 0.0) / h]
                              for r in other["table"]["rows"]]
        rows["active_frac"] = [[r["aw"], r["active_frac_mean"], r["active_frac_ci95"]] for r in other["table"]["rows"]]
    rows["rescale"] = rescale_curves(other)  # empty unless the other sweep ran --llc-rescale
    return {"name": other["name"], "label": label, "differ": diff, "rows": rows}


# Settings that only add RLCT estimates of the trained cell after its own (calibration grid, rescalings): a
# sweep run with them still repeats the cells of one run without, so --against may compare the two.
EXTRA_ESTIMATES = {"llc_grid", "llc_grid_eps", "llc_grid_gamma", "llc_rescale"}


def against_of(other, summary):
    """The cells this sweep shares (same AW and seed) with another published sweep of the same settings, a re-run
    on another CPU say: per AW how many, how many repeat it to the stored digit in accuracy, width and RLCT, and
    the largest differences. Kept in the JSON, printed as one README line."""
    _, diff = settings_diff(summary, other)
    diff = [k for k in diff if k not in EXTRA_ESTIMATES]  # they add estimates after the cell's own
    common.check(other.get("task") == summary["task"] and not diff,
                 f"--against: {other.get('name')!r} is not a sweep of this one's settings"
                 + (f" (it differs in {', '.join(diff)})" if diff else ""))
    keys = ("test_acc", "width", "llc")
    rows = []
    for aw in sorted({float(c["aw"]) for c in summary["runs"].values()}):
        pairs = [(c, other["runs"][k]) for k, c in summary["runs"].items() if float(c["aw"]) == aw and k in other["runs"]]
        if pairs:
            rows.append({"aw": aw, "n": len(pairs), "same": sum(all(a[k] == b[k] for k in keys) for a, b in pairs),
                         **{f"{k}_max_diff": max(abs(a[k] - b[k]) for a, b in pairs) for k in keys}})
    common.check(rows, f"--against: {other.get('name')!r} has none of this sweep's cells (AW and seed)")
    return {"name": other["name"], "cpu_model": other.get("cpu_model"), "rows": rows}


def against_line(summary):
    """The markdown line of `against_of`; '' without it."""
    a = summary.get("against")
    if not a:
        return ""
    return (f"Against {a['name']} ({a['cpu_model'] or 'its device'}), the same cells: " + "; ".join(
        f"AW {S.fmt_aw(r['aw'])}: {r['same']} of {r['n']} repeat it, largest difference {r['test_acc_max_diff']:.2f} "
        f"points, {r['width_max_diff']:.4f} width, {r['llc_max_diff']:.1f} RLCT" for r in a["rows"]) + ".")


def own_label(summary):
    """Beside another sweep, this one is named by the settings it differs in: 'NAME (aux act-l2)'."""
    cfg = S.spelled_out(summary["config"])
    return f"{summary['name']} ({', '.join(f'{d} {cfg.get(d)}' for d in summary['beside']['differ'])})"


def tradeoff_points(summary):
    """[(label, [(aw, {metric: (mean, ci95)}), ...]), ...] for this sweep and its --beside: one point per AW where
    no run collapsed (a collapsed run's width and RLCT mean nothing), for accuracy against width and RLCT, and
    against the dead units (a share of the layer) and the share on per example where a sweep counted them."""
    def keep(pts, dead):
        return [(aw, m) for aw, m in sorted(pts.items()) if not dead.get(aw)]
    rows = summary["table"]["rows"]
    scale = {"test_acc": 1.0, "width": 1.0, "llc": 1.0}
    if has_units(rows):  # the dead units as a share of the layer, as beside_of stores the other sweep's
        scale.update(dead_units=1.0 / summary["config"]["hidden"], active_frac=1.0)
    ours = {r["aw"]: {k: (s * r[k + "_mean"], s * (r[k + "_ci95"] or 0.0)) for k, s in scale.items()} for r in rows}
    dead = {r["aw"]: r.get("collapsed", 0) for r in rows}
    out = [(own_label(summary) if summary.get("beside") else summary["name"], keep(ours, dead))]
    b = summary.get("beside")
    if b:
        theirs = {}
        for k in ("test_acc", "width", "llc") + S.UNITS:
            for aw, mean, ci in b["rows"].get(k, []):
                theirs.setdefault(aw, {})[k] = (mean, ci or 0.0)
        out.append((b["label"], keep(theirs, {aw: c for aw, c, _ in b["rows"].get("collapsed", [])})))
    return out


def plot_tradeoff(summary, out_png):
    """With --beside: `tradeoff_figure` saved as out_png; None without."""
    if not summary.get("beside"):
        return None
    fig, axes = tradeoff_figure(summary)
    return save_with_key(fig, axes, f"{summary['name']} against {summary['beside']['name']}: a point per AW "
                         "(written beside it), mean and 95% interval; AWs with a collapsed run left out", out_png, 2)


def tradeoff_figure(summary):
    """Width and RLCT against test accuracy, a point per AW of this sweep and its --beside (mean, 95% interval both
    ways), so two settings compare at matched accuracy rather than at matched AW (whose scale differs between
    them); where both sweeps counted their hidden units, two more panels: the share of the layer dead and on per
    example. Returns (figure, axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sweeps = tradeoff_points(summary)
    panels = [("width", "width: std of the class rows"), ("llc", "RLCT (SGLD)")]
    if all(k in m for _, pts in sweeps for _, m in pts for k in S.UNITS):
        panels += [("dead_units", "hidden units dead (share of the layer)"),
                   ("active_frac", "hidden units on per example (share)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (k, label) in zip(axes, panels):
        for i, (name, pts) in enumerate(sweeps):
            style = dict(fmt="o-", color="C0", capsize=3) if i == 0 else dict(fmt="s--", color="0.45", mfc="none",
                                                                               capsize=2, lw=0.9)
            ax.errorbar([m["test_acc"][0] for _, m in pts], [m[k][0] for _, m in pts],
                        xerr=[m["test_acc"][1] for _, m in pts], yerr=[m[k][1] for _, m in pts], label=name, **style)
            for aw, m in pts:
                ax.annotate(f"{S.fmt_aw(aw)}", (m["test_acc"][0], m[k][0]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=style["color"])
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    return fig, axes


def save_with_key(fig, axes, title, out_png, ncol):
    """A figure's title and one key under its panels (clear of the data), saved and closed."""
    import matplotlib.pyplot as plt
    fig.suptitle("\n".join(textwrap.wrap(title, int(fig.get_figwidth() * 12))), fontsize=9)  # long names: wrapped
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def aw_axis(ax, aws):
    """AW on a symlog x axis spanning `aws` (every AW drawn on the panel), 0 included."""
    lin = min([1.0] + [a for a in aws if a > 0])  # AWs below 1 (a control's 0.01) get their own decade
    ax.set_xscale("symlog", linthresh=lin)
    ax.set_xlim(-0.5 * lin, max(aws) * 1.8)
    ax.set_xlabel("auxiliary weight AW")


def _x(aws):
    """AW on a symlog axis, so 0 and 100 both show."""
    return [float(a) for a in aws]


def seed_counts(rows):
    """'10' when every table row has 10 seeds, else '5-10': the seed count a figure's title names."""
    ns = sorted({r["n"] for r in rows})
    return f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def device_text(summary):
    return summary["device"] + (", " + summary["cpu_model"] if summary.get("cpu_model") else "")


def plot(summary, out_png):
    import matplotlib.pyplot as plt
    fig = figure(summary)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def figure(summary):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summary["table"]["rows"]
    paper = paper_levels(summary)
    aws = _x([r["aw"] for r in rows])
    units = has_units(rows)
    fig, axes = plt.subplots(1, 4 if units else 3, figsize=(17 if units else 13, 3.8))
    panels = (("test_acc", "test accuracy (%)"), ("width", "width: std of the class rows"), ("llc", "RLCT (SGLD)"))
    if units:
        units_panel(axes[3], summary)
    for ax, (k, label) in zip(axes, panels):
        mean = [r[k + "_mean"] for r in rows]
        ci = [r[k + "_ci95"] or 0.0 for r in rows]
        ours = own_label(summary) if summary.get("beside") else "ours: mean, 95% interval"
        ax.errorbar(aws, mean, yerr=ci, fmt="o-", capsize=4, color="C0", label=ours)
        for r in summary["runs"].values():  # the seeds themselves, faint; those that collapsed to chance in red
            dead = S.collapsed(r, summary["config"])
            ax.plot(float(r["aw"]), r[k], "x" if dead else ".", color="C3" if dead else "0.6", ms=4, zorder=0)
        vals = [r[k] for r in summary["runs"].values()]  # the axis spans the seeds; wider intervals run off it
        if summary.get("beside"):
            b = summary["beside"]["rows"][k]
            ax.errorbar(_x([r[0] for r in b]), [r[1] for r in b], yerr=[r[2] or 0.0 for r in b], fmt="s--",
                        capsize=3, color="0.45", mfc="none", ms=5, lw=0.9, label=summary["beside"]["label"])
            vals += [r[1] for r in b]
        if k in paper:
            x, y = zip(*paper[k])
            ax.plot(x, y, "D--", color="k", mfc="none", ms=6, lw=0.8, label="paper (its figure)")
            ax.legend(loc="best", fontsize=7.5, frameon=False)
            vals += list(y)
        pad = 0.15 * (max(vals) - min(vals) or abs(max(vals)) or 1.0)
        ax.set_ylim(min(vals) - pad, max(vals) + pad)
        every = aws + [r[0] for r in summary.get("beside", {}).get("rows", {}).get(k, [])]
        aw_axis(ax, every)
        ax.set_title(label, fontsize=10)
        t, tl = summary["table"]["trend"].get(k), summary["table"].get("trend_learned", {}).get(k)
        text = [f"Spearman {t['spearman']:+.2f} ({fmt_p(t['p'])}), all runs"] if t and t["spearman"] is not None else []
        if tl and tl["spearman"] is not None and tl["n"] < t["n"]:
            text.append(f"Spearman {tl['spearman']:+.2f} ({fmt_p(tl['p'])}), runs that learned")
        ax.text(0.02, 0.03, "\n".join(text), transform=ax.transAxes, fontsize=7.5)
        ax.grid(alpha=0.3)
    fig.suptitle(f"self-modeling, {summary['name']}: mean and 95% interval over {seed_counts(rows)} seeds "
                 f"({device_text(summary)})", fontsize=10)
    if summary.get("beside"):  # one key under the panels, clear of the data and the trend notes
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07 if summary.get("beside") else 0, 1, 1))
    return fig


def has_units(rows):
    """Whether every table row has the units count (runs made since selfmodel.py measures it, or measured later)."""
    return bool(rows) and all(k + "_mean" in r for r in rows for k in S.UNITS)


def units_panel(ax, summary):
    """The fourth panel: of the hidden units feeding the class rows, the share dead on the whole test set and the
    share on per test example, against AW (mean and 95% interval; the seeds faint)."""
    h = summary["config"]["hidden"]
    rows = summary["table"]["rows"]
    aws = _x([r["aw"] for r in rows])
    every = list(aws)  # the x range: this sweep's AWs and the other's
    for k, scale, fmt, color, label in (("dead_units", 1.0 / h, "v-", "C3", f"dead (of {h})"),
                                        ("active_frac", 1.0, "o-", "C2", "on per example")):
        ax.errorbar(aws, [scale * r[k + "_mean"] for r in rows], yerr=[scale * (r[k + "_ci95"] or 0.0) for r in rows],
                    fmt=fmt, capsize=3, color=color, label=label)
        ax.plot([float(c["aw"]) for c in summary["runs"].values()],
                [scale * c[k] for c in summary["runs"].values()], ".", color="0.6", ms=4, zorder=0)
        b = summary.get("beside", {}).get("rows", {}).get(k)
        if b:  # the other sweep's, grey and hollow as in the other panels
            ax.errorbar(_x([r[0] for r in b]), [r[1] for r in b], yerr=[r[2] or 0.0 for r in b], fmt=fmt[0] + "--",
                        capsize=3, color="0.45", mfc="none", ms=5, lw=0.9)
            every += _x([r[0] for r in b])
    aw_axis(ax, every)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("hidden units (share of the layer)", fontsize=10)
    ax.legend(loc="best", fontsize=7.5, frameon=False)
    ax.grid(alpha=0.3)


def plot_calibration(summary, out_png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = [c for c in summary["runs"].values() if "llc_grid" in c]
    if not cells:
        return None
    nbeta = summary["config"]["sgld_nbeta"]
    keys = list(cells[0]["llc_grid"])
    eps = sorted({float(k.split(",")[0].split("=")[1]) for k in keys})
    gam = sorted({float(k.split(",")[1].split("=")[1]) for k in keys})
    aws = sorted({c["aw"] for c in cells})
    fig, axes = plt.subplots(len(gam), len(eps), figsize=(4 * len(eps), 2.8 * len(gam)), squeeze=False)
    for i, g in enumerate(gam):
        for j, e in enumerate(eps):
            ax, key = axes[i][j], f"eps={e:g},gamma={g:g}"
            for ci, aw in enumerate(aws):
                for c in (c for c in cells if c["aw"] == aw):
                    est = c["llc_grid"][key]
                    L = torch.tensor(est["loss_trace"]).mean(0)
                    sig = nbeta * (L - torch.tensor(est["init_trace"]))
                    x = [(b + 0.5) * est["draws_per_point"] for b in range(len(sig))]
                    ax.plot(x, sig.tolist(), color=f"C{ci}", alpha=0.8,
                            label=f"AW {S.fmt_aw(aw)}" if c["seed"] == min(d["seed"] for d in cells) else None)
            ax.set_title(f"eps {e:g}, gamma {g:g}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(gam) - 1:
                ax.set_xlabel("draw")
            if j == 0:
                ax.set_ylabel("nbeta (L(w) - L(w*))")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"RLCT traces, {summary['name']} (chain means; one line per seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def load_published(f, flag=""):
    """A results/selfmodel_NAME.json file, refused in one line (naming `flag`, if given) if it is missing or not a
    published sweep (an output folder, say, where a published JSON is asked for)."""
    what = f"{flag} {f}".strip()
    common.check(os.path.exists(f), f"{what} does not exist: pass results/selfmodel_NAME.json files")
    s = json.load(open(f)) if f.endswith(".json") and os.path.isfile(f) else {}
    common.check("table" in s and "config" in s, f"{what} is not a published selfmodel sweep (results/selfmodel_NAME.json)")
    return s


def by_setting(files, key, what):
    """Published sweeps of one task that differ in config[key] alone (and their AWs and seeds) -> {value:
    summary}, sorted by value; `what` names the setting in the one-line refusals."""
    out = []
    for f in files:
        s = load_published(f)
        s["config"] = S.spelled_out(s["config"])
        out.append((f, s))
    first, ref = out[0]
    for f, s in out:
        diff = sorted(k for k in set(ref["config"]) | set(s["config"])
                      if k != key and s["config"].get(k) != ref["config"].get(k))
        common.check(not diff, f"{f} differs from {first} in {', '.join(diff)}: only the {what} may differ")
    values = [s["config"][key] for _, s in out]
    common.check(len(set(values)) == len(values), f"two files have the same {what}: {sorted(values)}")
    return {s["config"][key]: s for _, s in sorted(out, key=lambda fs: fs[1]["config"][key])}


def by_width(files):
    """Published sweeps of one task at several hidden widths -> {width: summary}."""
    return by_setting(files, "hidden", "hidden width")


def width_rows(sweeps):
    """(hidden, row) for every AW measured at two or more widths, sorted by AW then width."""
    count = {}
    for s in sweeps.values():
        for r in s["table"]["rows"]:
            count[r["aw"]] = count.get(r["aw"], 0) + 1
    return [(h, r) for aw in sorted(a for a, n in count.items() if n >= 2)
            for h, s in sweeps.items() for r in s["table"]["rows"] if r["aw"] == aw]


def plot_widths(name, sweeps, out_png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = width_rows(sweeps)
    units = has_units([r for _, r in rows])
    fig, axes = plt.subplots(1, 4 if units else 3, figsize=(17 if units else 13, 3.8))
    panels = (("test_acc", "test accuracy (%)"), ("width", "width: std of the class rows"), ("llc", "RLCT (SGLD)"))
    if units:  # dead units as a share of the width, so that the widths compare
        panels += (("dead_units", "dead hidden units (share of the width)"),)
    aws = sorted({r["aw"] for _, r in rows})
    for ax, (k, label) in zip(axes, panels):
        for i, aw in enumerate(aws):
            pts = [(h, r) for h, r in rows if r["aw"] == aw]
            scale = [1.0 / h if k == "dead_units" else 1.0 for h, _ in pts]
            ax.errorbar([h for h, _ in pts], [f * r[k + "_mean"] for f, (_, r) in zip(scale, pts)],
                        yerr=[f * (r[k + "_ci95"] or 0.0) for f, (_, r) in zip(scale, pts)], fmt="o-", capsize=3,
                        color=f"C{i}", label=f"AW {S.fmt_aw(aw)}" + (" (baseline)" if aw == 0 else ""))
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(sweeps), [str(h) for h in sweeps])
        ax.set_xlabel("hidden width")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"self-modeling, {name}: mean and 95% interval over {seed_counts([r for _, r in rows])} seeds "
                 f"per point ({device_text(next(iter(sweeps.values())))})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def widths_markdown(sweeps):
    """The README table of `--widths`: a row per (AW, width), with the units columns when every row has them."""
    rows = width_rows(sweeps)
    units = has_units([r for _, r in rows])
    lines = ["| hidden | AW | seeds | test acc (%) | width (class rows) | RLCT | collapsed |"
             + (" dead units | on per example |" if units else ""), "|---|---|---|---|---|---|---|" + "---|---|" * units]
    for h, r in rows:
        lines.append(f"| {h} | {S.fmt_aw(r['aw'])} | {r['n']} | {row_pm(r, 'test_acc', 2)} | {row_pm(r, 'width', 4)} | "
                     f"{row_pm(r, 'llc', 1)} | {r.get('collapsed', 0)}/{r['n']} |"
                     + (f" {row_pm(r, 'dead_units', 1)} | {row_pm(r, 'active_frac', 3)} |" if units else ""))
    return "\n".join(lines)


def by_lr(files):
    """Published sweeps that differ in the learning rate alone -> {lr: summary}; SGD only (its momentum shared),
    whose step on the AW-weighted term is lr x AW times its gradient (over 1 - momentum, the same for all)."""
    sweeps = by_setting(files, "lr", "learning rate")
    opt = next(iter(sweeps.values()))["config"].get("optimizer")
    common.check(opt == "sgd", f"--steps: these sweeps trained with {opt}, whose step is not lr x AW times the "
                               "gradient; pass SGD sweeps (IMDB or MNIST)")
    return sweeps


def step_points(sweeps):
    """[{lr, aw, step = lr x AW, seeds, width, llc, llc_abs}] for every AW > 0 of each sweep: its width and RLCT
    per seed as ratios of the same sweep's AW 0 on that seed (the plain network at that learning rate), and the
    RLCT itself (llc_abs) of the same seeds."""
    return [{"lr": lr, "aw": aw, "step": lr * aw, "seeds": [c["seed"] for _, c in pairs],
             **{k: [c[k] / b[k] for b, c in pairs] for k in ("width", "llc")}, "llc_abs": [c["llc"] for _, c in pairs]}
            for lr, s in sweeps.items() for aw, pairs in seed_pairs(list(s["runs"].values())).items() if pairs]


def steps_line(points):
    """The README line of --steps: per point, lr x AW and the ratios' mean ± 95% interval over the seeds."""
    parts = [f"lr {p['lr']:g} AW {S.fmt_aw(p['aw'])}: {p['step']:g}, RLCT x{pm_stats(common.mean_ci(p['llc']), 2)}, "
             f"width x{pm_stats(common.mean_ci(p['width']), 2)} ({len(p['seeds'])} seed{'s' * (len(p['seeds']) > 1)})"
             for p in sorted(points, key=lambda p: (p["step"], p["lr"]))]
    return ("By lr x AW (each network's RLCT and class-row width as ratios of the plain network's at its "
            "own learning rate, paired by seed; mean ± 95% interval): " + "; ".join(parts) + ".")


def plot_steps(name, sweeps, out_png):
    """Width and RLCT ratios (to each sweep's AW 0), and the RLCT itself, against lr x AW, a colour per learning
    rate: a dot per seed, the mean and its 95% interval joined per learning rate; on the RLCT itself a dashed line
    per learning rate marks its plain network (the mean of its AW 0 runs), the base of the ratios."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = step_points(sweeps)
    ticks = sorted({p["step"] for p in points})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (k, label) in zip(axes, (("width", "class-row width / plain network's"), ("llc", "RLCT / plain network's"),
                                     ("llc_abs", "RLCT itself (dashed: the plain network at each lr)"))):
        for i, lr in enumerate(sweeps):
            pts = [p for p in points if p["lr"] == lr]
            stats = [common.mean_ci(p[k]) for p in pts]
            nudge = 1 + 0.04 * (i - (len(sweeps) - 1) / 2)  # learning rates side by side where lr x AW coincide
            xs = [p["step"] * nudge for p in pts]
            ax.errorbar(xs, [m["mean"] for m in stats], yerr=[m["ci95"] or 0.0 for m in stats], fmt="o-", capsize=3,
                        color=f"C{i}", label=f"lr {lr:g}: AW " + ", ".join(S.fmt_aw(p["aw"]) for p in pts))
            # AW labels: the lowest lr's to the left, the highest's to the right, any between above its point
            side = "right" if i == 0 else "left" if i == len(sweeps) - 1 else "center"
            offset = {"right": (-5, -3), "left": (5, -3), "center": (0, 6)}[side]
            for x, p, m in zip(xs, pts, stats):
                ax.plot([x] * len(p[k]), p[k], ".", color=f"C{i}", alpha=0.45, ms=5)
                ax.annotate(S.fmt_aw(p["aw"]), (x, m["mean"]), xytext=offset, textcoords="offset points",
                            ha=side, fontsize=7, color=f"C{i}")
            if k == "llc_abs":
                plain = [c["llc"] for c in sweeps[lr]["runs"].values() if float(c["aw"]) == 0.0]
                ax.axhline(common.mean_ci(plain)["mean"], color=f"C{i}", lw=0.8, ls="--")
        if k != "llc_abs":
            ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.minorticks_off()
        ax.set_xlabel("lr x AW (the SGD step on the self-model's term, per unit of its gradient)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(f"self-modeling, {name}: each network against the plain one trained at its "
                                          f"learning rate, and its RLCT itself, labelled by its AW (dots: seeds; mean and 95% interval; "
                                          f"{device_text(next(iter(sweeps.values())))})", 120)), fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def fmt_p(p):
    """A permutation p-value at its resolution: 10,000 permutations cannot tell below 1e-4."""
    return "p ≤ 1e-4" if p <= 1.5e-4 else f"p = {p:.2g}"


def seed_pairs(cells, base_aw=0.0):
    """{aw: [(base cell, cell) of each seed run at both aw and base_aw]} for every other AW of the cells."""
    base = {c["seed"]: c for c in cells if float(c["aw"]) == base_aw}
    return {aw: [(base[c["seed"]], c) for c in cells if float(c["aw"]) == aw and c["seed"] in base]
            for aw in sorted({float(c["aw"]) for c in cells} - {base_aw})}


def paired(summary, base_aw=0.0):
    """Each AW against base_aw on the same seed (the seeds share data order and initialisation): per AW the
    seeds run at both, the accuracy gain in points (mean and 95% interval of the per-seed differences, and on
    how many seeds it is above zero) and the width and RLCT as ratios to the base (mean and interval of the
    per-seed ratios). Collapsed runs are kept: this pairs what was measured. {} without base_aw runs."""
    cells = list(summary["runs"].values())
    out = {}
    for aw, pairs in seed_pairs(cells, base_aw).items():
        if not pairs:
            continue
        gain = [c["test_acc"] - b["test_acc"] for b, c in pairs]
        out[aw] = {"seeds": sorted(c["seed"] for _, c in pairs), "test_acc_gain": common.mean_ci(gain),
                   "above_zero": sum(g > 0 for g in gain),
                   **{f"{k}_ratio": common.mean_ci([c[k] / b[k] for b, c in pairs]) for k in ("width", "llc")}}
    return out


def paired_line(summary, base_aw=0.0):
    """The markdown line of `paired`; '' when there is nothing to pair."""
    parts = [f"AW {S.fmt_aw(aw)}: test_acc {pm_stats(p['test_acc_gain'], 2, '+')} points ({p['above_zero']} of "
             f"{len(p['seeds'])} seeds above 0), width x{pm_stats(p['width_ratio'], 3)}, llc x{pm_stats(p['llc_ratio'], 3)}"
             for aw, p in paired(summary, base_aw).items()]
    return (f"Paired by seed against AW {S.fmt_aw(base_aw)} (mean ± 95% interval of the per-seed differences "
            f"and ratios): " + "; ".join(parts) + ".") if parts else ""


def markdown(summary):
    """The README rows: AW | n | test acc | width | RLCT | flat traces."""
    lines = ["| AW | seeds | test acc (%) | width (class rows) | RLCT | traces flat | collapsed |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["table"]["rows"]:
        lines.append(f"| {S.fmt_aw(r['aw'])} | {r['n']} | {row_pm(r, 'test_acc', 2)} | {row_pm(r, 'width', 4)} | "
                     f"{row_pm(r, 'llc', 1)} | {r['llc_flat']}/{r['n']} | {r.get('collapsed', 0)}/{r['n']} |")
    lines.append("")
    for name, key in (("all runs", "trend"), ("runs that learned", "trend_learned")):
        tr = summary["table"].get(key, {})
        if tr:
            lines.append(f"Trend in AW, {name} (Spearman over the seeds, permutation p): " + "; ".join(
                f"{k} {t['spearman']:+.2f} ({fmt_p(t['p'])}, n = {t['n']})" for k, t in tr.items()
                if t["spearman"] is not None) + ".")
    line = paired_line(summary)
    if line:
        lines.append(line)
    for line in (units_line(summary), against_line(summary)):
        if line:
            lines.append(line)
    return "\n".join(lines)


def units_line(summary):
    """The markdown line of the units feeding the class rows, per AW whose runs all measured them; '' if none."""
    rows = [r for r in summary["table"]["rows"] if has_units([r])]
    if not rows:
        return ""
    return (f"Units feeding the class rows ({summary['config']['hidden']}, ReLU), on the test set (mean ± 95% "
            "interval over seeds): " + "; ".join(f"AW {S.fmt_aw(r['aw'])}: {row_pm(r, 'dead_units', 1)} dead, "
                                                 f"{row_pm(r, 'active_frac', 3)} active per example" for r in rows) + ".")


def row_pm(row, k, digits):
    """A table row's metric k as 'mean ± half width' (the mean alone for one seed), as the README prints it."""
    return pm_stats({"mean": row[k + "_mean"], "ci95": row[k + "_ci95"]}, digits)


def calibration_markdown(summary):
    """RLCT per (eps, gamma) and AW (mean over seeds, traces flat, draws below L(w*)), and whether the AWs
    keep the order they have at the paper's setting."""
    rows = [r for r in summary["table"]["rows"] if r.get("llc_grid")]
    if not rows:
        return ""
    cells = [c for c in summary["runs"].values() if "llc_grid" in c]
    below = lambda aw, key: sum(c["llc_grid"][key]["frac_below_init"] for c in cells if c["aw"] == aw) / \
        max(1, sum(c["aw"] == aw for c in cells))
    head = "| eps | gamma | " + " | ".join(f"AW {S.fmt_aw(r['aw'])}" for r in rows) + " | order as at eps 1e-4, gamma 100 |"
    lines = [head, "|---|---|" + "---|" * len(rows) + "---|"]
    ref = "eps=0.0001,gamma=100"
    order = lambda key: sorted(range(len(rows)), key=lambda i: -rows[i]["llc_grid"][key]["mean"])
    for key in rows[0]["llc_grid"]:
        e, g = (float(v.split("=")[1]) for v in key.split(","))
        vals = [f"{r['llc_grid'][key]['mean']:.1f} (flat {r['llc_grid'][key]['flat']}/{r['llc_grid'][key]['n']}, "
                f"{100 * below(r['aw'], key):.0f}% below)" for r in rows]
        same = "yes" if ref in rows[0]["llc_grid"] and order(key) == order(ref) else "no"
        lines.append(f"| {e:g} | {g:g} | " + " | ".join(vals) + f" | {same} |")
    return "\n".join(lines)


def rescale_curves(summary):
    """{aw: [[c, width, RLCT mean, RLCT 95% half width, traces flat, n], ...]} over c, the trained network (c = 1)
    included, for every AW measured with --llc-rescale."""
    out = {}
    for r in summary["table"]["rows"]:
        if r.get("llc_rescale"):
            pts = [[1.0, r["width_mean"], r["llc_mean"], r["llc_ci95"], r["llc_flat"], r["n"]]]
            pts += [[float(k[2:]), g["width"], g["mean"], g["ci95"], g["flat"], g["n"]]
                    for k, g in r["llc_rescale"].items() if k != "c=1"]  # --llc-rescale 1 repeats the cell's
            out[S.fmt_aw(r["aw"])] = sorted(pts)
    return out


def plot_rescale(summary, out_png):
    """Width and RLCT of each AW's networks against the scale c of a function-preserving rescaling (hidden x c,
    class rows / c), with --beside's curves where it has them; None without --llc-rescale."""
    mine = rescale_curves(summary)
    if not mine:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    b = summary.get("beside") or {}
    sets = [(mine, own_label(summary) if b else summary["name"], "o-")]
    sets += [(b["rows"]["rescale"], b["label"], "s--")] if b.get("rows", {}).get("rescale") else []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (i, label) in zip(axes, ((1, "width: std of the class rows"), (2, "RLCT (SGLD)"))):
        for j, (curves, name, style) in enumerate(sets):
            for k, (aw, pts) in enumerate(curves.items()):
                ci = [(p[3] or 0.0) if i == 2 else 0.0 for p in pts]  # the width's spread is not kept per c
                ax.errorbar([p[0] for p in pts], [p[i] for p in pts], yerr=ci, fmt=style, capsize=3,
                            color=f"C{k + 3 * j}", mfc="none" if j else None, label=f"{name}, AW {aw}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axvline(1.0, color="0.6", lw=0.8, zorder=0)
        ax.set_xlabel("c (hidden layer x c, class rows / c: one function; 1 = as trained)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    return save_with_key(fig, axes, f"{summary['name']}: the same trained networks rescaled; mean and 95% interval "
                         f"over {seed_counts(summary['table']['rows'])} seeds", out_png, 3)


PLAIN = "AW 0"  # one network whatever --aux says (AW 0 trains without it)
PLAIN_LABEL = "plain network (AW 0)"


def network_label(cfg, aw):
    """A trained network (AW > 0) as the rescaling readings name it: its loss and AW, and the layer its auxiliary
    loss acts on where that is not the task's default (IMDB's embedding), so two targets never join as one."""
    target = cfg.get("target")  # published sweeps spell it out (S.spelled_out)
    of = "" if not target or target == S.TASKS[cfg["task"]]["target"] else f" of {target}"
    return f"aux {S.aux_of(cfg)}{of}, AW {S.fmt_aw(float(aw))}"


def network_of(cfg, aw, plain=PLAIN):
    """The network a cell of a sweep with config `cfg` trained: `plain` for AW 0 (one network whatever --aux and
    --target say), else `network_label`. The readings key on PLAIN; lines and figure keys write PLAIN_LABEL."""
    return plain if float(aw) == 0 else network_label(cfg, aw)


def rescaled_curves(summaries):
    """Published --llc-rescale sweeps of one task and hidden width -> {'aux AUX, AW a': [[width, RLCT, 95% half
    width, c], ...] sorted by width}: every network's RLCT against its class-row width over the rescalings, so that
    networks of different losses compare at one head width. A (loss, AW) in two sweeps joins them (its c = 1 once);
    they must hold the same seeds of it. AW 0 is one curve, the plain network, whatever --aux says (as in
    `estimates`): a point two sweeps both hold must then agree."""
    common.check(bool(summaries), "--rescaled needs published results/selfmodel_*.json sweeps run with --llc-rescale")
    first = summaries[0]
    out, seeds = {}, {}
    for s in summaries:
        common.check(s["task"] == first["task"] and s["config"]["hidden"] == first["config"]["hidden"],
                     f"--rescaled: {s['name']} is not a {first['task']} sweep at hidden {first['config']['hidden']}")
        curves = rescale_curves(s)
        common.check(bool(curves), f"--rescaled: {s['name']} ran without --llc-rescale (nothing to draw)")
        for aw, pts in curves.items():
            label = network_of(s["config"], aw, PLAIN_LABEL)
            mine = sorted(k for k, c in s["runs"].items() if S.fmt_aw(float(c["aw"])) == aw)
            common.check(seeds.setdefault(label, mine) == mine,
                         f"--rescaled: {label} holds other seeds in {s['name']} than in an earlier file")
            for c, width, llc, ci, _, _ in pts:
                seen = out.setdefault(label, {}).setdefault(c, [width, llc, ci, c])
                common.check(seen == [width, llc, ci, c],
                             f"--rescaled: {label} at c = {c:g} in {s['name']} differs from an earlier file's")
    return {label: sorted(by_c.values()) for label, by_c in out.items()}


def estimates(summaries):
    """network -> c -> seed -> (class-row width, RLCT), over every sweep's cells and their rescalings (c = 1: the
    network as trained). AW 0 is one network whatever --aux says; the same (c, seed) read otherwise in two files
    is refused."""
    est = {}
    for s in summaries:
        for cell in s["runs"].values():
            aw = float(cell["aw"])
            label = network_of(s["config"], aw)
            points = [(1.0, cell)] + [(float(k[2:]), g) for k, g in cell.get("llc_rescale", {}).items()]
            for c, g in points:
                seen = est.setdefault(label, {}).setdefault(c, {}).setdefault(cell["seed"], (g["width"], g["llc"]))
                common.check(seen == (g["width"], g["llc"]),
                             f"--rescaled: {label} at c = {c:g}, seed {cell['seed']} differs between files")
    return est


def matched_pairs(summaries, tol=0.02):
    """Every network against the plain one (AW 0) at one head width: for each (loss, AW, c) whose mean class-row
    width lies within tol (relative) of one of AW 0's (any c), the per-seed ratio of their RLCTs (mean, 95%
    interval, seeds below 1) over the seeds both hold. Rescaling either side to the other's width removes the
    part of a difference in RLCT that only reads the head's width (README, the rescaling sections)."""
    est = estimates(summaries)
    plain = est.pop(PLAIN, None)
    if plain is None:
        return []
    out = []
    for label, by_c in est.items():
        for c, cells in sorted(by_c.items()):
            for c0, ref in sorted(plain.items()):
                seeds = sorted(set(cells) & set(ref))
                w, w0 = (sum(w for w, _ in v.values()) / len(v) for v in (cells, ref))  # mean class-row widths
                if seeds and abs(w / w0 - 1) <= tol:
                    ratios = [cells[k][1] / ref[k][1] for k in seeds]
                    out.append({"network": label, "c": c, "width": w, "c_plain": c0, "width_plain": w0,
                                "seeds": seeds, "below": sum(r < 1 for r in ratios), "llc_ratio": common.mean_ci(ratios)})
    return out


def matched_line(m):
    """One README line of `matched_pairs`."""
    return (f"At class-row width {m['width']:.4f}: {m['network']} (c = {m['c']:g}) reads x{pm_stats(m['llc_ratio'], 3)} "
            f"of the plain network's RLCT (AW 0 at c = {m['c_plain']:g}, {m['width_plain']:.4f}) per seed, "
            f"{m['below']} of {len(m['seeds'])} seeds below 1.")


def loglog_at(points, w):
    """RLCT at class-row width w from one seed's estimates [(width, RLCT), ...] of one network: straight in log-log
    between the two that bracket w (beyond them, the line through the nearest two). Returns (RLCT, how far w lies
    outside the estimates' widths as a factor >= 1)."""
    pts = sorted(points)
    i = min(max(sum(pw < w for pw, _ in pts), 1), len(pts) - 1)  # pts[i - 1], pts[i]: the bracket or nearest pair
    (w1, m1), (w2, m2) = pts[i - 1], pts[i]
    slope = math.log(m2 / m1) / math.log(w2 / w1)
    return m1 * (w / w1) ** slope, max(pts[0][0] / w, w / pts[-1][0], 1.0)


def seedwise_pairs(summaries):
    """Every network against the plain one at a seed's own head widths: the mean-width match of `matched_pairs`
    pairs a seed's widths only on average, and a seed whose head is much narrower than the mean is then compared
    at another width. Here each seed's estimates of one network (c = 1 and its rescalings) are joined in log-log
    (`loglog_at`), and per seed the network's RLCT at the plain network's trained width (c = 1) is divided by the
    plain network's, and its own trained RLCT by the plain network's at its trained width."""
    est = estimates(summaries)
    plain, out = est.pop(PLAIN, {}), []

    def seed_points(by_c, seed):
        return [v[seed] for v in by_c.values() if seed in v]

    for label, by_c in est.items():
        seeds = sorted(k for k in by_c.get(1.0, {}) if k in plain.get(1.0, {})
                       and len(seed_points(by_c, k)) >= 2 and len(seed_points(plain, k)) >= 2)
        if not seeds:
            continue
        at_plain, at_own, beyond = [], [], 1.0
        for k in seeds:
            (w0, m0), (w, m) = plain[1.0][k], by_c[1.0][k]
            theirs, far = loglog_at(seed_points(by_c, k), w0)  # this network read at the plain head
            ours, far2 = loglog_at(seed_points(plain, k), w)  # the plain network read at this network's head
            at_plain.append(theirs / m0)
            at_own.append(m / ours)
            beyond = max(beyond, far, far2)
        out.append({"network": label, "seeds": seeds, "at_plain": common.mean_ci(at_plain),
                    "below_plain": sum(r < 1 for r in at_plain), "at_own": common.mean_ci(at_own),
                    "below_own": sum(r < 1 for r in at_own), "beyond": beyond})
    return out


def seedwise_line(m):
    """One README line of `seedwise_pairs`."""
    return (f"Seed by seed (each network's estimates joined in log-log): {m['network']} reads "
            f"x{pm_stats(m['at_plain'], 3)} of the plain network's RLCT at the plain network's trained head width "
            f"({m['below_plain']} of {len(m['seeds'])} seeds below 1) and x{pm_stats(m['at_own'], 3)} at its own "
            f"({m['below_own']} of {len(m['seeds'])}); widths read up to x{m['beyond']:.2f} beyond the estimates.")


def read_pairs(summaries, read):
    """The trained cells of another published sweep `read` (one task and hidden width with the --rescaled sweeps;
    no rescaling needed) against each network the --rescaled sweeps rescaled, at the cell's own head width: per
    seed, the cell's RLCT over the network's, that seed's estimates joined in log-log (`loglog_at`) and read at the
    cell's class-row width. Does a network of another AW differ from the reference by more than the width of its
    head? -> per reference network (seeds with two or more estimates), a row per AW of `read` (not the reference's
    own network): ratios per seed, their mean and 95% interval, how many below 1, how far beyond the estimates."""
    task, hidden = (summaries[0]["config"].get(k) for k in ("task", "hidden"))
    common.check((read["config"].get("task"), read["config"].get("hidden")) == (task, hidden),
                 f"--read: {read['name']} is not a {task} sweep at hidden {hidden}, as the --rescaled files are")
    out = []
    for ref, by_c in estimates(summaries).items():
        per_seed = {k: [v[k] for v in by_c.values() if k in v] for k in by_c.get(1.0, {})}
        per_seed = {k: pts for k, pts in per_seed.items() if len(pts) >= 2}
        rows = []
        for aw in sorted({float(c["aw"]) for c in read["runs"].values()}):
            label = network_of(read["config"], aw)
            cells = sorted((c for c in read["runs"].values() if float(c["aw"]) == aw and c["seed"] in per_seed
                            and c.get("llc") is not None), key=lambda c: c["seed"])
            if label == ref or not cells:
                continue
            readings = [loglog_at(per_seed[c["seed"]], c["width"]) for c in cells]
            ratios = [c["llc"] / at for c, (at, _) in zip(cells, readings)]
            rows.append({"aw": aw, "seeds": [c["seed"] for c in cells], "ratios": ratios,
                         "ratio": common.mean_ci(ratios), "below": sum(r < 1 for r in ratios),
                         "beyond": max(far for _, far in readings)})
        if rows:
            out.append({"reference": PLAIN_LABEL if ref == PLAIN else ref, "read": read["name"], "rows": rows})
    return out


def read_line(m):
    """One README line of `read_pairs`: a reference network against every AW of the read sweep."""
    rows = "; ".join(f"AW {S.fmt_aw(r['aw'])} x{pm_stats(r['ratio'])} (x{min(r['ratios']):.2f}-{max(r['ratios']):.2f}, "
                     f"{r['below']} of {len(r['seeds'])} below 1)" for r in m["rows"])
    return (f"Read at its own head width against {m['reference']} (its estimates of each seed joined in log-log), "
            f"{m['read']}'s RLCT is: {rows}; widths read up to x{max(r['beyond'] for r in m['rows']):.2f} beyond "
            f"the estimates.")


def plain_log_ticks(ax):
    """Round numbers, written plainly, as the labels of both log axes (call once the data are drawn): inside one
    decade matplotlib labels the minor ticks 1.6e-1 style, and they collide. A span under x5 gets evenly spaced
    ticks, a wider one 1-2-5 steps; minor ticks stay unlabelled."""
    import matplotlib.ticker as T
    for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        axis.set_major_locator(T.MaxNLocator(6, steps=[1, 2, 5, 10]) if hi / lo < 5 else
                               T.LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(T.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(T.NullFormatter())


LABEL_SPOTS = ((4, 4), (4, -10), (-4, 4), (-4, -10), (4, -3), (-4, -3))  # points: right/left, above/below/level


def label_box(anchor, offset, text, fontsize):
    """The box (x0, y0, x1, y1), in typographic points, that `text` covers written at `offset` from `anchor` (a
    negative x offset: right-aligned, ending there); a character taken as 0.6 of the font size wide."""
    (x, y), (dx, dy) = anchor, offset
    w = 0.6 * fontsize * len(text)
    x0 = x + dx - (w if dx < 0 else 0.0)
    return x0, y + dy, x0 + w, y + dy + fontsize


def label_offsets(anchors, texts, fontsize, keep_clear=5.5):
    """Where to write short labels beside their points so that they cover neither each other nor a point.
    anchors: the points' positions in typographic points (x right, y up); returns per label an xytext offset (in
    points) from LABEL_SPOTS and a horizontal alignment (right for a negative x). Greedy in the order given: each
    label takes the first spot whose box (`label_box`) overlaps no label placed so far nor another point's marker
    (a square of half side keep_clear), else the spot where it overlaps least."""
    markers = [(x - keep_clear, y - keep_clear, x + keep_clear, y + keep_clear) for x, y in anchors]
    placed, out = [], []

    def overlap(a, b):
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    for i, (anchor, text) in enumerate(zip(anchors, texts)):
        best = None
        others = placed + markers[:i] + markers[i + 1:]  # a label sits beside its own point by design
        for spot in LABEL_SPOTS:
            box = label_box(anchor, spot, text, fontsize)
            cost = sum(overlap(box, b) for b in others)
            if best is None or cost < best[0]:
                best = (cost, box, spot)
            if cost == 0:
                break
        placed.append(best[1])
        out.append((best[2], "left" if best[2][0] >= 0 else "right"))
    return out


def read_cells(read, curves):
    """The trained cells of a --read sweep to draw beside the rescaled lines: {network: [(width, RLCT) per seed]}
    for every AW whose network is not already a line."""
    out = {}
    for c in sorted(read["runs"].values(), key=lambda c: (float(c["aw"]), c["seed"])):
        label = network_of(read["config"], c["aw"], PLAIN_LABEL)
        if label not in curves and c.get("llc") is not None:
            out.setdefault(label, []).append((c["width"], c["llc"]))
    return out


def plot_rescaled(name, curves, out_png, cells=None):
    """RLCT against the class-row width (both log), a line per network over its rescalings, c = 1 ringed; with
    `cells` (`read_cells`), other networks as trained, a small diamond per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.6))
    labels = []  # (width, RLCT, c as text, colour): written once the axes are final, so that they can keep clear
    for k, (label, pts) in enumerate(curves.items()):
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts], fmt="o-", ms=4,
                    capsize=3, color=f"C{k}", label=label)
        trained = [p for p in pts if p[3] == 1.0]
        ax.plot([p[0] for p in trained], [p[1] for p in trained], "o", ms=11, mfc="none", color=f"C{k}")
        labels += [(w, m, f"{c:g}", f"C{k}") for w, m, _, c in pts]
    for k, (label, pts) in enumerate((cells or {}).items(), start=len(curves)):
        ax.plot([w for w, _ in pts], [m for _, m in pts], "D", ms=4.5, color=f"C{k}",
                label=f"{label}, as trained (a seed each)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel("width: std of the class rows (log)")
    ax.set_ylabel("RLCT (SGLD, log)")
    ax.set_title("\n".join(textwrap.wrap(f"{name}: each network rescaled by c (written beside it; ringed: as "
                                          "trained), mean and 95% interval over seeds", 80)), fontsize=8.5)
    ax.grid(alpha=0.3, which="both")
    handles, names = ax.get_legend_handles_labels()
    first = [names.index(label) for label in curves] + [i for i, n in enumerate(names) if n not in curves]
    ax.legend([handles[i] for i in first], [names[i] for i in first], fontsize=7.5, frameon=False, loc="upper left")
    fig.tight_layout()
    # networks rescaled to nearly one width stand close: their c labels must not write over each other
    to_pt = 72.0 / fig.dpi
    anchors = [tuple(v * to_pt for v in ax.transData.transform((w, m))) for w, m, _, _ in labels]
    spots = label_offsets(anchors, [text for _, _, text, _ in labels], fontsize=6.5)
    for (w, m, text, colour), (xy, ha) in zip(labels, spots):
        ax.annotate(text, (w, m), textcoords="offset points", xytext=xy, fontsize=6.5, color=colour, ha=ha)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def rescale_markdown(summary):
    """Per AW: width and RLCT of the network as trained (c = 1) and after each function-preserving rescaling
    (hidden layer x c, class rows / c); mean over seeds, traces flat."""
    if not any(r.get("llc_rescale") for r in summary["table"]["rows"]):
        return ""
    curves = rescale_curves(summary)
    cs = [p[0] for p in next(iter(curves.values()))]
    lines = ["| AW | " + " | ".join(f"c = {c:g}: width / RLCT" for c in cs) + " |", "|---|" + "---|" * len(cs)]
    for aw, pts in curves.items():
        cells = [f"{w:.4f} / {m:.1f}" + (f" ± {ci:.1f}" if ci is not None else "") +
                 ("" if flat == n else f" ({flat}/{n} flat)") for _, w, m, ci, flat, n in pts]
        lines.append(f"| {aw} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_one(plot_fn, *args):
    """plot_fn(*args) and its path printed, where the optional figure extra (matplotlib) is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: figure skipped (pip install -r requirements-figures.txt)")
        return
    print("figure:", plot_fn(*args))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.one_line_errors(p)
    p.add_argument("name", nargs="?", help="result name: writes results/selfmodel_NAME.json and .png")
    p.add_argument("runs", nargs="*", help="selfmodel output folders (or their results.json); a published "
                                           "results/selfmodel_*.json joins them as one more run")
    p.add_argument("--redraw", default=None, help="a results/selfmodel_*.json: draw its figures again")
    p.add_argument("--widths", action="store_true",
                   help="NAME then published results/selfmodel_*.json sweeps at several hidden widths: one figure "
                        "against the width")
    p.add_argument("--steps", action="store_true",
                   help="NAME then published results/selfmodel_*.json sweeps that differ in --lr alone (SGD): "
                        "width and RLCT as ratios of each sweep's AW 0, against lr x AW")
    p.add_argument("--rescaled", action="store_true",
                   help="NAME then published results/selfmodel_*.json sweeps run with --llc-rescale: one figure of "
                        "RLCT against the class-row width, a line per network over its rescalings")
    p.add_argument("--match-tol", type=float, default=0.02,
                   help="with --rescaled: how far apart (relative) two networks' mean class-row widths may be to be "
                        "compared as one head width (a sweep over some of the seeds whose c came from all of them "
                        "may miss 2%%; the printed line names both widths)")
    p.add_argument("--read", default=None,
                   help="with --rescaled: a published results/selfmodel_*.json (no rescaling needed) whose trained "
                        "networks are read against each rescaled network at their own head width, and drawn")
    p.add_argument("--beside", default=None, help="a published results/selfmodel_*.json of the same task with another "
                   "setting (e.g. --target) to draw beside this sweep; kept in its JSON")
    p.add_argument("--against", default=None, help="a published results/selfmodel_*.json of the same settings (made "
                   "on another CPU, say, or without --llc-rescale / --llc-grid-*): compare the cells both measured; "
                   "kept in its JSON")
    p.add_argument("--out-dir", default=HERE, help="where the JSON and figures go")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    common.check(args.rescaled or not args.read, "--read goes with --rescaled (see --help)")
    if args.widths:
        common.check(args.name and len(args.runs) >= 2, "--widths needs a NAME and two or more results JSON files")
        sweeps = by_width(args.runs)
        print(widths_markdown(sweeps))
        return draw_one(plot_widths, args.name, sweeps, os.path.join(args.out_dir, f"selfmodel_{args.name}.png"))
    if args.steps:
        common.check(args.name and len(args.runs) >= 2, "--steps needs a NAME and two or more results JSON files")
        sweeps = by_lr(args.runs)
        print(steps_line(step_points(sweeps)))
        return draw_one(plot_steps, args.name, sweeps, os.path.join(args.out_dir, f"selfmodel_{args.name}.png"))
    if args.rescaled:
        common.check(args.name and args.runs, "--rescaled needs a NAME and one or more results JSON files")
        common.check(0 < args.match_tol < 1, f"--match-tol {args.match_tol:g}: give a relative gap in (0, 1), e.g. 0.03")
        published = [load_published(f) for f in args.runs]
        curves = rescaled_curves(published)
        for label, pts in curves.items():
            print(f"{label}: " + ", ".join(f"c = {c:g}: {w:.4f} / {m:.1f}" for w, m, _, c in pts))
        for m in matched_pairs(published, args.match_tol):
            print(matched_line(m))
        for m in seedwise_pairs(published):
            print(seedwise_line(m))
        read = load_published(args.read, "--read") if args.read else None
        for m in read_pairs(published, read) if read else []:
            print(read_line(m))
        return draw_one(plot_rescaled, args.name, curves, os.path.join(args.out_dir, f"selfmodel_{args.name}.png"),
                        read_cells(read, curves) if read else None)
    if args.redraw:
        summary = load_published(args.redraw, "--redraw")
    else:
        common.check(args.name and args.runs, "give a NAME and at least one selfmodel output folder (see --help)")
        summary = merge(args.name, args.runs)
        if args.beside:
            summary["beside"] = beside_of(load_published(args.beside, "--beside"), summary)
        if args.against:
            summary["against"] = against_of(load_published(args.against, "--against"), summary)
        common.write_json(os.path.join(args.out_dir, f"selfmodel_{args.name}.json"), summary, indent=None)
    base = os.path.join(args.out_dir, f"selfmodel_{summary['name']}")
    print(S.format_table(summary["table"], {**summary["config"], "task": summary["task"]}))
    print(markdown(summary))
    print(calibration_markdown(summary))
    print(rescale_markdown(summary))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: JSON written, figures skipped (pip install -r requirements-figures.txt)")
        return
    made = [plot(summary, base + ".png"), plot_calibration(summary, base + "_calibration.png"),
            plot_tradeoff(summary, base + "_tradeoff.png"), plot_rescale(summary, base + "_rescale.png")]
    print("figures:", ", ".join(f for f in made if f))


if __name__ == "__main__":
    common.run_main(main)
