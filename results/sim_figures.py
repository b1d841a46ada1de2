"""Publish sim_cifar.py runs (one output folder per seed, or several seeds each) as one table and figure.

Merges the folders, writes results/sim_NAME.json (per-seed values; means with 95% Student-t intervals; the gain
paired by seed; minutes per run; step-time and FLOPs ratios; time to --target-acc; img/s and MFU; device, torch,
commits and the commands) and results/sim_NAME.png (single-view test accuracy against epoch per variant, each
seed thin and their mean bold; the final accuracies with their intervals), and prints the README table.

  python results/sim_figures.py h100 out/sim_cifar/h100_s0 out/sim_cifar/h100_s1 out/sim_cifar/h100_s2
  python results/sim_figures.py --redraw results/sim_h100.json      # the figure again, from the JSON alone
  python results/sim_figures.py flops out/sim_cifar/cost_*_w64         # --cost-only folders: a FLOPs table

Folders of `sim_cifar.py --cost-only` runs make a cost table instead (results/sim_NAME.json, no figure): one row
per setting of the SIM loss (--sim-blocks, --rho, --latent-dim) with the FLOPs of one training step of off, full
SIM and rho-SIM, their ratios and rho-SIM's cut against full SIM beside the paper's 16.5% (at width 64); the
folders must agree in width and batch, and cost-only folders never mix with training ones.

The folders must agree in every setting but the seeds (and the run-only ones of publish.RUN_ONLY: where they
wrote, how often they logged or saved, --resume); --compile, --device, the device model and the process count
must agree too, as they set the minutes and step times. A variant and seed found twice is refused. The table:
variant | seeds | single-view | flip TTA (mean ± 95% interval over the seeds) | minutes/run (the training loop,
every --resume included) | step time vs off (the runs' own steady state, compiled with --compile; where a
variant was not trained, the eager cost measurement of cost.json, marked so). matplotlib is needed only for the
figure: the JSON and the table are written without it.
"""
import argparse, json, os, re, shlex, statistics, sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402
import sim_cifar as S  # noqa: E402
from publish import RUN_ONLY, device_of, flag_text, load_runs, pm, rounded, same_config  # noqa: E402

VARY = {"seed", "seeds"}  # besides RUN_ONLY: one process per seed (or per few) is the point of merging
PER_SEED = {"test_acc": "test_acc", "test_acc_tta": "test_acc_tta", "minutes": "minutes",
            "train_step_ms": "train_step_ms", "img_per_s": "train_img_per_s", "mfu_pct": "train_mfu_pct",
            "time_to_target_s": "time_to_target"}  # published name: run.json key


def command_of(cfg):
    """The sim_cifar.py command of a config: its mode's flags, the seeds, every flag that differs from the
    preset's default, and --out (run-only flags and the machine's data dir left out)."""
    base = vars(S.parse_args(["--smoke"] if cfg.get("smoke") else []))
    sim = cfg["sim"]
    argv = (["--smoke"] if cfg.get("smoke") else []) + (["--sim", sim] if sim != "rho" else [])
    argv += ["--rho", f"{cfg['rho']:g}"] if sim == "rho" else []
    argv += ["--lam", f"{cfg['lam']:g}"] if sim != "off" else []
    argv += [] if cfg.get("cost_only") else ["--seed", str(cfg["seed"]), "--seeds", str(cfg["seeds"])]  # no draws
    # flags the mode refuses (parse_args) are never written; bench_steps whenever given (on a CPU that matters)
    skip = RUN_ONLY | {"sim", "rho", "lam", "seed", "seeds", "smoke", "help"} | (
        {"latent_dim"} if sim != "rho" else set()) | ({"sim_blocks", "baseline"} if sim == "off" else set())
    for a in S.build_parser()._actions:
        k = a.dest
        given = k == "bench_steps" and cfg.get("bench_steps_given")
        if k in skip or k not in cfg or (cfg[k] == base.get(k) and not given):
            continue
        argv += flag_text(a, cfg[k])
    return "python sim_cifar.py " + shlex.join(argv + ["--out", str(cfg["out"])])


def merge(name, paths):
    files = load_runs(paths, "sim_cifar")
    kinds = {bool(r["config"].get("cost_only")) for _, r in files}
    common.check(len(kinds) == 1, "some folders are --cost-only runs and some trained: publish them as two tables")
    if kinds.pop():
        return merge_cost(name, files)
    base = same_config(files, vary=VARY)
    (f0, r0) = files[0]
    for f, r in files[1:]:
        common.check(r["device"] == r0["device"], f"{f} ran on {r['device']}, {f0} on {r0['device']}: one table is "
                     "one device model (--device)")
    runs, where = {}, {}
    for f, r in files:
        for run in r["metrics"]["runs"]:
            run = S.current_run_json(run)
            key = (run["variant"], run["seed"])
            common.check(key not in runs, f"{key[0]} --seed {key[1]} is in both {where.get(key)} and {f}: pass each "
                         "seed once")
            runs[key], where[key] = run, f
    procs = {r.get("world_size") for r in runs.values()}
    common.check(len(procs) == 1, f"the runs used different numbers of processes ({sorted(map(str, procs))}; "
                 "torchrun --nproc_per_node): one table is one setting")
    variants = [v for v in S.MODES if any(k[0] == v for k in runs)]
    ordered = [runs[k] for k in sorted(runs)]
    m = S.summarise(ordered, variants, base["sim"])  # the script's own means, intervals and paired gain
    table = {}
    for v in variants:
        rs = [r for r in ordered if r["variant"] == v]
        row = {"seeds": [r["seed"] for r in rs]}
        for key, src in PER_SEED.items():
            vals = [r.get(src) for r in rs]
            st = common.mean_ci([x for x in vals if x is not None])
            row.update({key: vals, f"{key}_mean": st["mean"], f"{key}_ci95": st["ci95"]})
            if key.startswith("test_acc"):
                row[f"{key}_std"] = st["std"]
        row["time_to_target_epoch"] = [r.get("time_to_target_epoch") for r in rs]
        row["time_to_target_cold"] = [r.get("time_to_target_cold") for r in rs]
        row["resumed"] = [r.get("resumed") for r in rs]
        row["history"] = [r["history"]["eval"] for r in rs]  # per seed: [epoch, flip TTA, single-view]
        table[v] = row
    costs = [r["metrics"]["cost"] for _, r in files]
    fl = costs[0]["flops_per_step"]
    cost = {"flops_per_step": fl, "flops_ratio": {k: fl[k] / fl["off"] for k in S.MODES},
            "flops_cut_rho_vs_full_pct": 100 * (1 - fl["rho"] / fl["full"])}
    timed = [c for c in costs if c.get("step_ratio")]
    if timed:  # eager, one batch, per process: the only step times of a variant that was not trained
        cost["bench_step_ratio"] = {k: [c["step_ratio"][k] for c in timed] for k in ("full", "rho")}
        cost["bench_step_ratio_mean"] = {k: statistics.mean(v) for k, v in cost["bench_step_ratio"].items()}
        cost["bench_steps"], cost["bench_batch"] = timed[0]["bench_steps"], timed[0]["batch"]
    torches = sorted({r["torch"] for _, r in files})
    off_ms = table["off"]["train_step_ms_mean"] if "off" in table else None
    return {
        "name": name, "script": "sim_cifar", "headline": m["headline"],
        "paper": dict(S.PAPER, flops_cut_rho_vs_full_pct=16.5),
        # the paper's numbers are for the real model (width 64) on all of CIFAR-10; smaller runs are no match
        "paper_comparable": base["width"] == S.DEFAULTS["width"] and not (base["train_subset"] or base["test_subset"]),
        "device": device_of(r0), "processes": procs.pop(), "compile": bool(base.get("compile")),
        "torch": ", ".join(torches), "git_commits": sorted({str(r.get("git_commit")) for _, r in files}),
        "commands": [command_of(r["config"]) for _, r in files],
        "target_acc": base.get("target_acc"),
        # the runs' training loops, every --resume included (the cost of the table) ...
        "train_minutes_total": sum(r["minutes"] for r in ordered),
        # ... and the wall time of each folder's last process (set-up and evaluation included)
        "wall_minutes": [r["wall_seconds"] / 60 for _, r in files],
        "config": {k: base[k] for k in sorted(base) if k != "bench_steps_given"},
        "variants": table, **{k: dict(m[k], variant=base["sim"]) if k in m else None
                              for k in ("paired_gain", "paired_gain_tta")},
        "train_step_ratio": {v: table[v]["train_step_ms_mean"] / off_ms for v in variants
                             if off_ms and table[v]["train_step_ms_mean"]},
        "cost": cost}


COST_KEYS = ("sim_blocks", "rho", "latent_dim")  # what sets the SIM loss's FLOPs; one row each


def merge_cost(name, files):
    """The cost table of --cost-only folders: FLOPs (and, where timed, eager step times) per SIM setting."""
    (f0, r0), rows, where = files[0], {}, {}
    for f, r in files:
        c = r["config"]
        for k in ("width", "batch_size"):
            common.check(c[k] == r0["config"][k], f"{f} has --{k.replace('_', '-')} {c[k]}, {f0} "
                         f"{r0['config'][k]}: one cost table is one model and batch")
        common.check(r["device"] == r0["device"], f"{f} ran on {r['device']}, {f0} on {r0['device']}: one table "
                     "is one device model")
        key = tuple(c[k] for k in COST_KEYS)
        common.check(key not in rows, f"{f} and {where.get(key)} measured the same setting: pass it once")
        fl, cost = r["metrics"]["cost"]["flops_per_step"], r["metrics"]["cost"]
        rows[key], where[key] = {
            **dict(zip(COST_KEYS, key)), "gflop_per_image": {m: fl[m] / c["batch_size"] / 1e9 for m in S.MODES},
            "flops_ratio": {m: fl[m] / fl["off"] for m in S.MODES},
            "flops_cut_rho_vs_full_pct": 100 * (1 - fl["rho"] / fl["full"]),
            "step_ratio": cost.get("step_ratio"), "bench_steps": cost.get("bench_steps")}, f
    width = r0["config"]["width"]
    return {"name": name, "script": "sim_cifar", "kind": "cost",
            "paper": {"flops_cut_rho_vs_full_pct": 16.5}, "paper_comparable": width == S.DEFAULTS["width"],
            "width": width, "batch_size": r0["config"]["batch_size"], "device": device_of(r0),
            "torch": ", ".join(sorted({r["torch"] for _, r in files})),
            "git_commits": sorted({str(r.get("git_commit")) for _, r in files}),
            "commands": [command_of(r["config"]) for _, r in files],
            "rows": [rows[k] for k in sorted(rows, key=lambda k: (S.SIM_BLOCKS.index(k[0]), k[1], k[2]))]}


def markdown_cost(s):
    timed = any(r["step_ratio"] for r in s["rows"])  # GPU runs time eager steps too: one more column
    lines = ["| SIM blocks | rho | latent | GFLOP/image, off | full SIM / off | rho-SIM / off | rho-SIM vs full SIM |"
             + (" eager step time, full / rho vs off |" if timed else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if timed else "")]
    for r in s["rows"]:
        st = r["step_ratio"]
        step = (f" x{st['full']:.3f} / x{st['rho']:.3f} |" if st else " - |") if timed else ""
        lines.append(f"| {r['sim_blocks']} | {r['rho']:g} | {r['latent_dim']} | {r['gflop_per_image']['off']:.3f} | "
                     f"x{r['flops_ratio']['full']:.3f} | x{r['flops_ratio']['rho']:.3f} | "
                     f"{r['flops_cut_rho_vs_full_pct']:.1f}% fewer |" + step)
    paper = s["paper"]["flops_cut_rho_vs_full_pct"]
    lines += ["", f"FLOPs of one training step (forward and backward, torch.utils.flop_counter), batch "
                  f"{s['batch_size']}, ResNet-18 width {s['width']}; "
              + (f"the paper's cut: {paper}%." if s["paper_comparable"]
                 else f"width {s['width']}: not comparable with the paper's {paper}%."),
              f"Device: {s['device']}, torch {s['torch']}; commits {', '.join(s['git_commits'])}.",
              "", "```"] + s["commands"] + ["```"]
    return "\n".join(lines)

# ----------------------------------------------------------------------------------------------------
# the README table and lines


def step_vs_off(s, v):
    """'x1.108': the runs' own steady-state step time against off's; else cost.json's eager bench, marked."""
    if v in s["train_step_ratio"]:
        return f"x{s['train_step_ratio'][v]:.3f}"
    bench = s["cost"].get("bench_step_ratio_mean", {})
    return f"x{bench[v]:.3f} (eager)" if v in bench else ("x1.000" if v == "off" and bench else "-")


def label(v):
    return {"off": "off (baseline)", "full": "full SIM", "rho": "rho-SIM"}[v]


def markdown(s):
    lines = ["| variant | seeds | single-view top-1 (%) | flip TTA (%) | minutes/run | step time vs off |",
             "|---|---|---|---|---|---|"]
    for v, r in s["variants"].items():
        lines.append(f"| {label(v)} | {len(r['seeds'])} | {pm(r['test_acc'])} | {pm(r['test_acc_tta'])} | "
                     f"{pm(r['minutes'])} | {step_vs_off(s, v)} |")
    lines.append("")
    p, g, gt = s["paper"], s["paired_gain"], s["paired_gain_tta"]
    if g:
        lines.append(f"Paired gain {g['variant']} - off (same seed, n = {g['n']}): {pm(g['per_seed'], sign='+')} "
                     f"points single-view (paper, rho-SIM: {p['off']} -> {p['rho']}, +{p['gain']}); "
                     f"{pm(gt['per_seed'], sign='+')} with flip TTA.")
    tt = []
    for v, r in s["variants"].items():
        done = [x for x in r["time_to_target_s"] if x is not None]
        cold = sum(bool(c) and x is not None for c, x in zip(r["time_to_target_cold"], r["time_to_target_s"]))
        tt.append(f"{v} {pm([x / 60 for x in done])} min ({len(done)}/{len(r['seeds'])} seeds reached, {cold} cold)"
                  if done else f"{v} not reached or not timed")
    if s["target_acc"] is not None:  # runs made before --target-acc existed have no times
        lines.append(f"Time to {s['target_acc']:g}% single-view from launch (data load, cost measurement, compile "
                     "included; cold: the first run of its process, else that set-up plus its own run): "
                     + "; ".join(tt) + ".")
    sp = [f"{v} {pm(r['img_per_s'], 0)} img/s" + (f", MFU {pm(r['mfu_pct'], 1)}%" if r["mfu_pct_mean"] else "")
          for v, r in s["variants"].items() if r["img_per_s_mean"]]
    if sp:
        lines.append("Training throughput (steady state, synchronised): " + "; ".join(sp) + ".")
    c = s["cost"]
    line = (f"FLOPs per training step vs off: full x{c['flops_ratio']['full']:.3f}, "
            f"rho x{c['flops_ratio']['rho']:.3f}; rho-SIM {c['flops_cut_rho_vs_full_pct']:.1f}% fewer than full SIM")
    line += (f" (paper: {p['flops_cut_rho_vs_full_pct']}%)" if s["config"]["width"] == S.DEFAULTS["width"] else
             f" (width {s['config']['width']}: not comparable with the paper's {p['flops_cut_rho_vs_full_pct']}%)")
    if "bench_step_ratio" in c:
        line += (f"; eager step time vs off ({len(c['bench_step_ratio']['rho'])} processes, batch {c['bench_batch']}): "
                 f"full x{pm(c['bench_step_ratio']['full'], 3)}, rho x{pm(c['bench_step_ratio']['rho'], 3)}")
    lines.append(line + ".")
    procs = {None: "", 1: " (1 process)"}.get(s["processes"], f" ({s['processes']} processes)")
    lines.append(f"Device: {s['device']}{procs}, torch "
                 f"{s['torch']}, {'compiled' if s['compile'] else 'eager'}; commits {', '.join(s['git_commits'])}; "
                 f"{s['train_minutes_total']:.1f} training minutes in all.")
    lines += ["", "```"] + s["commands"] + ["```"]
    return "\n".join(lines)

# ----------------------------------------------------------------------------------------------------
# the figure


def plot(s, out_png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.7, 1]})
    finals = []
    for i, (v, r) in enumerate(s["variants"].items()):
        c = f"C{i}"
        for h in r["history"]:
            ax.plot([e for e, _, _ in h], [a for _, _, a in h], color=c, lw=0.8, alpha=0.35)
        eps = sorted(set.intersection(*({e for e, _, _ in h} for h in r["history"])))  # evaluated by every seed
        mean = [statistics.mean(a for h in r["history"] for e, _, a in h if e == ep) for ep in eps]
        ax.plot(eps, mean, color=c, lw=2.2, marker="o", ms=3, label=f"{label(v)}, {len(r['seeds'])} seeds")
        for j, (key, mk) in enumerate((("test_acc", "o"), ("test_acc_tta", "s"))):
            x = i + (j - 0.5) * 0.3
            bx.errorbar([x], [r[key + "_mean"]], yerr=[r[key + "_ci95"] or 0.0], fmt=mk, color=c, capsize=5, ms=6,
                        label=("single-view" if j == 0 else "flip TTA") if i == 0 else None)
            bx.plot([x + 0.06] * len(r[key]), r[key], ".", color="0.45", ms=4, zorder=3)  # the seeds, beside
            finals += r[key]
            if len(r[key]) >= 3 and r[key + "_ci95"]:  # 2 seeds' t interval (x12.7 the spread) would flatten the rest
                finals += [r[key + "_mean"] - r[key + "_ci95"], r[key + "_mean"] + r[key + "_ci95"]]
        if v in s["paper"] and s["paper_comparable"]:
            bx.plot([i - 0.23], [s["paper"][v]], "*", color="k", ms=10,
                    label="paper (single-view)" if v == "off" else None)
            finals.append(s["paper"][v])
    if s["target_acc"] is not None and s["target_acc"] <= 100:
        ax.axhline(s["target_acc"], ls=":", color="0.4", lw=1)
        ax.text(0.01, s["target_acc"], f" target {s['target_acc']:g}%", va="bottom", fontsize=8, color="0.3",
                transform=ax.get_yaxis_transform())
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("single-view test accuracy (%)")
    ax.set_title("test accuracy during training (thin: seeds; bold: their mean)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    pad = 0.15 * (max(finals) - min(finals) or 1.0)  # the seeds, the paper and the intervals of 3+ seeds
    bx.set_ylim(min(finals) - pad, max(finals) + pad)
    bx.set_xticks(range(len(s["variants"])), [label(v) for v in s["variants"]])
    bx.set_xlim(-0.6, len(s["variants"]) - 0.4)
    bx.set_ylabel("final test accuracy (%)")
    g = s["paired_gain"]
    bx.set_title("final: mean and 95% interval" + (f"; paired gain {pm(g['per_seed'], sign='+')}" if g else ""),
                 fontsize=10)
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3, axis="y")
    fig.suptitle(f"SIM on CIFAR-10 ResNet-18, {s['name']} ({s['device']}, "
                 f"{'compiled' if s['compile'] else 'eager'}, torch {s['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.one_line_errors(p)
    p.add_argument("name", nargs="?", help="result name: writes results/sim_NAME.json and .png")
    p.add_argument("runs", nargs="*", help="sim_cifar output folders (or their results.json)")
    p.add_argument("--redraw", default=None, help="a results/sim_*.json: print its table and draw its figure again")
    p.add_argument("--out-dir", default=HERE, help="where the JSON and the figure go")
    args = p.parse_args(argv)
    if args.redraw:
        common.check(os.path.exists(args.redraw), f"--redraw {args.redraw} does not exist")
        summary = json.load(open(args.redraw))
        common.check(summary.get("script") == "sim_cifar" and ("variants" in summary or "rows" in summary),
                     f"--redraw {args.redraw} is not a table written by results/sim_figures.py")
        os.makedirs(args.out_dir, exist_ok=True)
    else:
        common.check(args.name and args.runs, "give a NAME and at least one sim_cifar output folder (see --help)")
        common.check(re.fullmatch(r"[\w.-]+", args.name), f"NAME {args.name!r}: letters, digits, '.', '-' and '_' "
                     "only (it names results/sim_NAME.json)")
        summary = rounded(merge(args.name, args.runs))
        os.makedirs(args.out_dir, exist_ok=True)
        print("table:", common.write_json(os.path.join(args.out_dir, f"sim_{args.name}.json"), summary, indent=1))
    if summary.get("kind") == "cost":  # a table says it all: no figure
        print(markdown_cost(summary))
        return
    print(markdown(summary))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: figure skipped (pip install -r requirements-figures.txt)")
        return
    print("figure:", plot(summary, os.path.join(args.out_dir, f"sim_{summary['name']}.png")))


if __name__ == "__main__":
    common.run_main(main)
