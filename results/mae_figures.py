"""Publish mae_decay.py runs (issue 18): the JSON, the reconstructions, the figure and the table under results/.

Issue 18 compares alpha_min 1.0 with 0.6 at the same seed. Writes results/mae_NAME.json, each run's
reconstructions as results/mae_NAME_recon_a{alpha_min}_s{seed}.png and the figure results/mae_NAME.png, and
prints the markdown table and, for each alpha_min below 1, its differences from alpha_min 1 paired by seed
(probe, kNN and effective rank; mean ± 95% interval once two seeds ran at both).

  python mae_decay.py --alpha-min 1.0 --compile   # cifar_quick, the default: out/mae_decay/cifar10_vit_small_p4_a1_seed0
  python mae_decay.py --alpha-min 0.6 --compile   #                                      ..._a0.6_seed0
  python results/mae_figures.py cifar_quick out/mae_decay/cifar10_vit_small_p4_a{1,0.6}_seed0
  python results/mae_figures.py --redraw results/mae_cifar_quick.json   # figure and table from the JSON alone

More seeds (--seed 1, ...) go in the same call; then the table adds, per alpha_min, the mean ± 95% Student-t
interval over the seeds. The runs must agree in every setting but alpha_min and the seed, --compile and --device
too (one table is one setting); anything else is refused, naming the file and the key.

The JSON keeps, per run, what mae_decay.py's results.json holds (rounded to 5 digits): the trajectory of
every evaluation for both feature kinds (cls = the cls token after the final LayerNorm, the official MAE
probe; mean = the mean of the raw last-block tokens, the decayed-shortcut authors' eval), linear probe, kNN,
effective rank (H of Eq. 6 and exp H) and feature norm, the raw last-block token norm, the per-epoch training
loss, the final values, the Pearson r of erank against probe and kNN accuracy over the evaluations (the
paper's Fig. 5; computed by mae_decay.py), img/s, MFU, wall and training minutes, device, torch, commit, the
command (the flags that differ from the run's preset) and the name of the run's output folder (committed runs
live under results/runs/mae_decay/, where a test rebuilds the published JSON from them). Figure: probe, kNN
and erank against the epoch (one colour per alpha_min, a line per seed; solid cls, dashed mean), the raw norm,
the training loss, and erank against probe with each seed's r.
matplotlib is an optional extra, imported only for the figure (the JSON is written without it).

diffusion_figures.py reuses this file's table, command and CLI helpers (command_of, markdown, summarise, cli).
"""
import argparse, json, os, re, shutil, sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402
from publish import device_of, flag_text, load_runs, pm, pm_stats, rounded, same_config  # noqa: E402

SCRIPT = "mae_decay"
VARY = {"alpha_min", "seed", "workers"}  # workers: ImageNet-100 loader processes; they change no number
PAPER = ("ImageNet-100 ViT-B/16, alpha_min 1.0 -> 0.6: linear probe 76.5 -> 83.6; lower alpha_min gives lower "
         "effective rank and higher probe / kNN accuracy, and erank falls as probe accuracy rises (Fig. 5)")
METRICS = ("linear_probe", "knn", "erank", "erank_exp", "feat_norm")
KINDS = {"cls": "cls after final norm", "mean": "mean of raw last-block tokens"}

# ---------------------------------------------------------------------------------------------------- shared
# (with diffusion_figures.py)

# where a run read its data and wrote its output: no part of the command that says what it computes
NOT_IN_COMMAND = {"out", "data_dir", "no_download", "stop_at_step", "smoke", "preset"}


def command_of(script, parser, cfg, base, lead=("alpha_min", "seed")):
    """`python SCRIPT.py` with --smoke or --preset, the `lead` flags, then every flag whose value in the run's
    config `cfg` differs from `base` (that preset's resolved defaults): parsed again it gives the run's config."""
    argv = [f"python {script}.py"] + (["--smoke"] if cfg.get("smoke") else ["--preset", cfg["preset"]])
    acts = {a.dest: a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS}
    for d in lead:
        argv += flag_text(acts[d], cfg[d])
    for d, a in acts.items():
        if d in cfg and d not in lead and d not in NOT_IN_COMMAND and cfg[d] != base.get(d):
            argv += flag_text(a, cfg[d])
    return " ".join(argv)


def fmt(v, digits, sign=""):
    return "-" if v is None else f"{v:{sign}.{digits}f}"


def summarise(runs, columns):
    """{alpha_min: {"seeds": [...], key: mean_ci over the seeds}} for every column."""
    out = {}
    for a in sorted({r["alpha_min"] for r in runs}, reverse=True):
        group = [r for r in runs if r["alpha_min"] == a]
        out[f"{a:g}"] = {"seeds": [r["seed"] for r in group],
                         **{c[0]: common.mean_ci([v for v in map(c[2], group) if v is not None]) for c in columns}}
    return out


def markdown(runs, columns):
    """A row per run (alpha_min, seed) and, for an alpha_min with two or more seeds, the mean ± 95% row.
    columns: (key, header, value of a run record or None, digits[, sign[, note of a run record]])."""
    lines = ["| alpha_min | seed | " + " | ".join(c[1] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for a in sorted({r["alpha_min"] for r in runs}, reverse=True):
        group = [r for r in runs if r["alpha_min"] == a]
        for r in group:
            cells = []
            for c in columns:
                v, sign = c[2](r), c[4] if len(c) > 4 else ""
                note = c[5](r) if len(c) > 5 and v is not None else ""
                cells.append(fmt(v, c[3], sign) + (f" ({note})" if note else ""))
            lines.append(f"| {a:g} | {r['seed']} | " + " | ".join(cells) + " |")
        if len(group) > 1:
            lines.append(f"| {a:g} | mean of {len(group)} | " + " | ".join(
                pm([c[2](r) for r in group], c[3], c[4] if len(c) > 4 else "") for c in columns) + " |")
    return "\n".join(lines)


def check_unique(runs):
    seen = {}
    for r in runs:
        key = (r["alpha_min"], r["seed"])
        common.check(key not in seen, f"{r['file']} and {seen.get(key)} are both alpha_min {key[0]:g} seed "
                                      f"{key[1]}: pass one of them")
        seen[key] = r["file"]


def copy_pngs(pairs, what):
    """The runs' pictures into results/, [(src, dst)]: all are checked before any is copied, so a refused
    call writes nothing. Returns the copies' file names."""
    for src, _ in pairs:
        common.check(os.path.isfile(src), f"{src} does not exist: the run's {what} (pass its whole output folder)")
    for src, dst in pairs:
        shutil.copyfile(src, dst)
    return [os.path.basename(dst) for _, dst in pairs]


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def cli(argv, doc, prefix, script, build, text, plot):
    """NAME RUN... -> build the summary, write results/PREFIX_NAME.json, print the table, draw the figure;
    --redraw JSON -> the table and figure again from a published JSON alone."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    common.one_line_errors(p)
    p.add_argument("name", nargs="?", help=f"result name: writes results/{prefix}_NAME.json, .png")
    p.add_argument("runs", nargs="*", help=f"{script}.py output folders (or their results.json)")
    p.add_argument("--redraw", default=None, help=f"a results/{prefix}_*.json: print its table, draw its figure")
    p.add_argument("--out-dir", default=HERE, help="where the JSON, the copied images and the figure go")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.redraw:
        common.check(not args.name and not args.runs,
                     "--redraw takes the published JSON only: drop NAME and the run folders")
        common.check(os.path.isfile(args.redraw), f"--redraw {args.redraw} does not exist")
        try:
            s = json.load(open(args.redraw))
        except ValueError as e:
            raise common.UserError(f"--redraw {args.redraw} is not valid JSON ({e})")
        common.check(isinstance(s, dict) and s.get("script") == script and "runs" in s,
                     f"--redraw {args.redraw} was not written by results/{prefix}_figures.py")
    else:
        common.check(args.name and args.runs, f"give a NAME and at least one {script}.py output folder (see --help)")
        common.check(re.fullmatch(r"[A-Za-z0-9_.-]+", args.name), f"NAME {args.name!r}: use letters, digits, _ . -")
        s = build(args.name, load_runs(args.runs, script), args.out_dir)
        print("json:", common.write_json(os.path.join(args.out_dir, f"{prefix}_{s['name']}.json"), s, indent=None))
    print(text(s))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: figure skipped (pip install -r requirements-figures.txt)")
        return s
    print("figure:", plot(s, os.path.join(args.out_dir, f"{prefix}_{s['name']}.png")))
    return s

# ---------------------------------------------------------------------------------------------------- MAE


def record(f, r):
    """One run's entry of the published JSON, from its results.json (nothing recomputed)."""
    import mae_decay as M  # only here: --redraw never needs the training script
    c, m = r["config"], r["metrics"]
    traj = m["trajectory"]
    common.check(traj, f"{f} has no evaluation in metrics.trajectory: the run did not finish")
    base = vars(M.parse_args(["--preset", c["preset"]] + (["--smoke"] if c.get("smoke") else [])))
    kinds = {"cls": traj, "mean": [t["mean"] for t in traj]}
    return {
        "file": f, "folder": os.path.basename(os.path.dirname(os.path.abspath(f))),
        "alpha_min": c["alpha_min"], "seed": c["seed"], "command": command_of(SCRIPT, M.build_parser(), c, base),
        "device": device_of(r), "torch": r.get("torch"), "git_commit": r.get("git_commit"), "time": r.get("time"),
        "wall_minutes": r["wall_seconds"] / 60, "train_minutes": (r.get("train_seconds") or 0) / 60,
        "img_per_s": m.get("img_per_s"), "mfu": m.get("mfu"), "flops_per_img": m.get("flops_per_img"),
        "params": m.get("params"), "cum_alpha": m.get("cum_alpha"), "world_size": m.get("world_size"),
        "epochs": m.get("epochs"), "steps": m.get("steps"),
        "epoch": [t["epoch"] for t in traj],
        **{k: {n: [t[n] for t in ts] for n in METRICS} for k, ts in kinds.items()},
        "raw_norm": [t["raw_norm"] for t in traj], "train_loss": m["train_loss"],
        "final": {"cls": {n: m["final"][n] for n in METRICS}, "mean": dict(m["final"]["mean"]),
                  "raw_norm": m["final"]["raw_norm"], "epoch": m["final"]["epoch"]},
        "pearson": {"cls": {"probe": m.get("pearson_erank_probe"), "knn": m.get("pearson_erank_knn")},
                    "mean": {"probe": m.get("pearson_erank_probe_mean"), "knn": m.get("pearson_erank_knn_mean")}},
        "eval_n_train": traj[-1].get("n_train"), "eval_n_test": traj[-1].get("n_test")}


COLUMNS = [  # (key, header, value of a run record, digits[, sign])
    ("probe_cls", "probe cls (%)", lambda r: r["final"]["cls"]["linear_probe"], 2),
    ("probe_mean", "probe mean (%)", lambda r: r["final"]["mean"]["linear_probe"], 2),
    ("knn_cls", "kNN cls (%)", lambda r: r["final"]["cls"]["knn"], 2),
    ("knn_mean", "kNN mean (%)", lambda r: r["final"]["mean"]["knn"], 2),
    ("erank_cls", "erank cls", lambda r: r["final"]["cls"]["erank"], 3),
    ("erank_mean", "erank mean", lambda r: r["final"]["mean"]["erank"], 3),
    ("r_cls", "r(erank, probe) cls", lambda r: r["pearson"]["cls"]["probe"], 2, "+"),
    ("r_mean", "r(erank, probe) mean", lambda r: r["pearson"]["mean"]["probe"], 2, "+"),
    ("train_minutes", "train min", lambda r: r["train_minutes"], 1),
    ("img_per_s", "img/s", lambda r: r["img_per_s"], 0),
    ("mfu", "MFU (%)", lambda r: None if r["mfu"] is None else 100 * r["mfu"], 1),
]


PAIRED = COLUMNS[:6]  # accuracies and effective ranks: the paper's claims


def paired(recs, columns=PAIRED):
    """{alpha_min: {"seeds": [...], key: mean_ci of (that alpha_min's value - alpha_min 1's) over the seeds
    run at both}} for every alpha_min below 1: the comparison the paper makes, seed by seed."""
    base = {r["seed"]: r for r in recs if r["alpha_min"] == 1}
    out = {}
    for a in sorted({r["alpha_min"] for r in recs if r["alpha_min"] != 1}, reverse=True):
        pairs = [(r, base[r["seed"]]) for r in recs if r["alpha_min"] == a and r["seed"] in base]
        if pairs:
            out[f"{a:g}"] = {"seeds": [r["seed"] for r, _ in pairs],
                             **{c[0]: common.mean_ci([c[2](r) - c[2](b) for r, b in pairs]) for c in columns}}
    return out


def build(name, runs, out_dir):
    """The published summary of the runs; copies each run's reconstructions.png into out_dir."""
    config = same_config(runs, vary=VARY)
    recs = sorted((record(f, r) for f, r in runs), key=lambda r: (-r["alpha_min"], r["seed"]))
    check_unique(recs)
    pngs = copy_pngs([(os.path.join(os.path.dirname(r.pop("file")), "reconstructions.png"),
                       os.path.join(out_dir, f"mae_{name}_recon_a{r['alpha_min']:g}_s{r['seed']}.png")) for r in recs],
                     "reconstructions")
    for r, png in zip(recs, pngs):
        r["recon"] = png
    devices = sorted({r["device"] for r in recs})
    return rounded({"name": name, "script": SCRIPT, "paper": PAPER, "device": "; ".join(devices),
                    "config": {k: config[k] for k in sorted(config)}, "runs": recs,
                    "summary": summarise(recs, COLUMNS), "paired": paired(recs)})


def text(s):
    c = s["config"]
    head = (f"MAE {s['name']}: {c['dataset']} {c['model']} (dim {c['dim']}, depth {c['depth']}, patch {c['patch']}), "
            f"{c['epochs']} epochs, compile {c['compile']}, on {s['device']}")
    cmds = "\n".join(r["command"] for r in s["runs"])
    why = "" if all(r["mfu"] is not None for r in s["runs"]) else \
        "\nMFU -: the device's peak FLOP/s is unknown to common.peak_flops (a CPU, or a GPU not in its list)."
    diff = "".join(
        f"\nalpha_min {a} - 1, paired by seed ({len(p['seeds'])} seed{'s' * (len(p['seeds']) > 1)}"
        f"{'' if len(p['seeds']) > 1 else ': no interval'}): "
        + ", ".join(f"{c[1]} {pm_stats(p[c[0]], c[3], '+')}" for c in PAIRED) for a, p in s.get("paired", {}).items())
    return f"{head}\n\n```\n{cmds}\n```\n\n{markdown(s['runs'], COLUMNS)}{why}{diff}\nPaper: {s['paper']}."


def plot(s, png):
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    top = (("linear_probe", "linear probe accuracy (%)"), ("knn", "kNN accuracy (k = 20, %)"),
           ("erank", "effective rank H (Eq. 6)"))
    styles = {"cls": ("-", "o"), "mean": ("--", "^")}
    handles = []
    alphas = sorted({r["alpha_min"] for r in s["runs"]}, reverse=True)
    for i, a in enumerate(alphas):  # one colour per alpha_min; its seeds are lines of that colour
        col, group = f"C{i}", [r for r in s["runs"] if r["alpha_min"] == a]
        seeds = ", ".join(str(r["seed"]) for r in group)
        handles.append(Line2D([], [], color=col, label=f"alpha_min {a:g} (seed{'s' * (len(group) > 1)} {seeds})"))
        for kind, (ls, mk) in styles.items():
            for r in group:
                for ax, (k, _) in zip(axes[0], top):
                    ax.plot(r["epoch"], r[kind][k], ls=ls, marker=mk, ms=4, color=col)
            rs = ", ".join(fmt(r["pearson"][kind]["probe"], 2, "+") for r in group)
            axes[1][2].scatter([v for r in group for v in r[kind]["erank"]],
                               [v for r in group for v in r[kind]["linear_probe"]], marker=mk, color=col,
                               label=f"alpha_min {a:g}, {kind}: r = {rs}")
        for r in group:
            axes[1][0].plot(r["epoch"], r["raw_norm"], "o-", ms=4, color=col)
            axes[1][1].plot(range(1, len(r["train_loss"]) + 1), r["train_loss"], color=col)
    handles += [Line2D([], [], color="0.3", ls=ls, marker=mk, label=KINDS[k]) for k, (ls, mk) in styles.items()]
    titles = [t for _, t in top] + ["raw last-block token norm (test images)", "training loss (epoch mean)",
                                    "effective rank against linear probe"]
    for ax, t in zip(axes.flat, titles):
        ax.set_title(t, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes[0]) + [axes[1][0], axes[1][1]]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1][0].set_yscale("log")  # a decayed stream can be orders of magnitude smaller (or, unstable, larger)
    axes[1][2].set_xlabel("effective rank H")
    axes[1][2].set_ylabel("linear probe (%)")
    axes[1][2].legend(fontsize=7)
    axes[0][0].legend(handles=handles, fontsize=8, handlelength=4)
    c = s["config"]
    fig.suptitle(f"MAE with decayed shortcuts, {s['name']}: {c['dataset']} {c['model']} (dim {c['dim']}, depth "
                 f"{c['depth']}), {c['epochs']} epochs ({s['device']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main(argv=None):
    return cli(argv, __doc__, "mae", SCRIPT, build, text, plot)


if __name__ == "__main__":
    common.run_main(main)
