"""Publish diffusion_decay.py runs (issue 19): the JSON, the sample grids, the figure and the table under results/.

Issue 19 compares alpha_min 1.0 with 0.7 at the same seed. Writes results/diffusion_NAME.json, each run's sample
grid as results/diffusion_NAME_samples_a{alpha_min}_s{seed}.png and the figure results/diffusion_NAME.png, and
prints the markdown table.

  python diffusion_decay.py --preset cifar_quick --alpha-min 1.0 --compile  # out/diffusion_decay/cifar10_cifar_quick_a1_seed0
  python diffusion_decay.py --preset cifar_quick --alpha-min 0.7 --compile  #                 ..._a0.7_seed0
  python results/diffusion_figures.py cifar_quick out/diffusion_decay/cifar10_cifar_quick_a{1,0.7}_seed0
  python results/diffusion_figures.py --redraw results/diffusion_cifar_quick.json   # figure, table from the JSON alone

A second FID size (say FID-50k beside the run's FID-10k) is a re-evaluation of the finished run in a copy of
its folder, passed after the run itself; the two are merged (same alpha_min and seed, same loss history):

  R=out/diffusion_decay/cifar10_cifar_quick_a0.7_seed0; mkdir ${R}_fid50k && cp $R/ckpt.pt ${R}_fid50k/
  python diffusion_decay.py --preset cifar_quick --alpha-min 0.7 --compile --resume --fid-n 50000 --out ${R}_fid50k
  python results/diffusion_figures.py cifar_quick out/diffusion_decay/cifar10_cifar_quick_a{1,0.7}_seed0 ${R}_fid50k

The runs must agree in every setting but alpha_min, the seed and the FID / sample-grid flags (--fid-n,
--fid-weights, --fid-cache, --sample-batch, --grid), --compile and --device too (one table is one setting).
Anything else is refused, naming the file and the key; so is FID from two Inception networks.
The probe grid is the run's --probe-layer x --probe-t, taken from the first folder of each (alpha_min, seed).
The preset's 'auto' is only the 3 blocks around the middle: for a curve over the blocks train with
--probe-layer all (or re-probe the finished run with --resume --probe-layer all, which redoes its FID too).

The JSON keeps, per (alpha_min, seed), rounded to 5 digits: FID per sample count (None, with the reason, when
the run had no FID: no Inception weights, or --fid-n 0) with the FID of as many real test images (`real`, the
table's note: a perfect generator's score at that N), sampling images/s and NFE, the linear-probe / kNN /
erank grid over layers x t, the best probe and kNN and where, training img/s and MFU, the loss history, wall
and training minutes, device, torch, commit and the commands (the flags that differ from the preset). Figure:
probe and kNN accuracy against the block, one line per (alpha_min, t), and the training-loss curves.
matplotlib is an optional extra, imported only for the figure (the JSON is written without it).
"""
import os, sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mae_figures as MF  # noqa: E402  (the shared table, command and CLI helpers; also sets sys.path)
import common  # noqa: E402
from publish import device_of, rounded, same_config  # noqa: E402

SCRIPT = "diffusion_decay"
# flags that act only on the FID and the sample grid, after training: a re-evaluation may change them
FID_EVAL = {"fid_n", "fid_n_explicit", "fid_weights", "fid_weights_found", "fid_skipped", "fid_cache", "sample_batch",
            "grid"}
VARY = {"alpha_min", "seed"} | FID_EVAL
PAPER = ("U-ViT on CIFAR-100, alpha_min 1.0 -> 0.7: FID 14.34 -> 8.99, linear probe 62.47 -> 66.86 (our cifar_quick "
         "preset is CIFAR-10 and far shorter)")
GRID = ("linear_probe", "knn", "erank", "feat_norm")


def kilo(n):
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def command(cfg):
    import diffusion_decay as D  # only here: --redraw never needs the training script
    base = vars(D.get_args(["--smoke"] if cfg["preset"] == "smoke" else ["--preset", cfg["preset"]], world_size=1))
    # --fid-n only when typed: the preset's FID is dropped on a machine without the Inception weights
    shown = cfg if cfg.get("fid_n_explicit") else dict(cfg, fid_n=base["fid_n"])
    return MF.command_of(SCRIPT, D.build_parser(), shown, base)


def record(group):
    """One (alpha_min, seed): the training run first, then any re-evaluations of it (their FIDs merged)."""
    (f, r), c, m = group[0], group[0][1]["config"], group[0][1]["metrics"]
    a, s = c["alpha_min"], c["seed"]
    fids = {}
    for f2, r2 in group:
        common.check(r2["metrics"]["loss_history"] == m["loss_history"],
                     f"{f2} and {f} are both alpha_min {a:g} seed {s} but trained differently (loss histories "
                     "differ): pass one; a re-evaluation (--resume with another --fid-n) keeps the history")
        m2 = r2["metrics"]
        if m2.get("fid") is not None:
            n = str(m2["fid_n"])
            common.check(n not in fids, f"{f2}: a second FID-{n} of alpha_min {a:g} seed {s}: pass one of them")
            fids[n] = {"fid": m2["fid"], "samples_per_s": m2.get("sample_img_per_s"), "nfe": m2.get("sample_nfe"),
                       "minutes": (m2.get("fid_seconds") or 0) / 60, "weights": r2["config"].get("fid_weights_found"),
                       "real": m2.get("fid_real"), "real_n": m2.get("fid_real_n")}  # None before fid_real existed
    fids = dict(sorted(fids.items(), key=lambda kv: int(kv[0])))
    why = None if fids else (m.get("fid_skipped") or c.get("fid_skipped") or "--fid-n 0: no FID asked for")
    layers, ts, probe = c["probe_layer"], c["probe_t"], m["probe"]
    grid = {k: [[probe[f"layer{l}_t{t:g}"][k] for l in layers] for t in ts] for k in GRID}
    shots = [(f2, r2) for f2, r2 in group if r2["config"].get("grid")]
    return {
        "alpha_min": a, "seed": s, "commands": [command(r2["config"]) for _, r2 in group],
        "device": device_of(r), "torch": r.get("torch"), "git_commit": r.get("git_commit"), "time": r.get("time"),
        "wall_minutes": r["wall_seconds"] / 60, "train_minutes": m.get("train_minutes"),
        "img_per_s": m.get("img_per_s"), "mfu": m.get("mfu"), "flops_per_img": m.get("flops_per_img"),
        "params_M": m.get("params_M"), "cum_alpha": m.get("cum_alpha"), "iters": m.get("iters"),
        "fid": fids, "fid_missing": why,
        # the largest FID's sampling rate: the longest, steadiest measurement
        "samples_per_s": fids[max(fids, key=int)]["samples_per_s"] if fids else None,
        "sample_nfe": fids[max(fids, key=int)]["nfe"] if fids else None,
        "probe": {"layers": layers, "t": ts, **grid},
        "best_probe": {"acc": m["best_linear_probe"], "layer": m["best_probe_layer"], "t": m["best_probe_t"]},
        "best_knn": {"acc": m["best_knn"], "layer": m["best_knn_layer"], "t": m["best_knn_t"]},
        "probe_n_train": m.get("probe_n_train"), "probe_n_test": m.get("probe_n_test"),
        "train_loss": m.get("train_loss"),
        "loss": {"step": [h[0] for h in m["loss_history"]], "loss": [h[1] for h in m["loss_history"]]},
        "_samples": os.path.join(os.path.dirname(shots[0][0]), "samples.png") if shots else None}


def columns(runs):
    ns = sorted({int(n) for r in runs for n in r["fid"]})
    fid = [(f"fid_{n}", f"FID-{kilo(n)}", lambda r, n=str(n): r["fid"].get(n, {}).get("fid"), 2) for n in ns] or \
        [("fid", "FID", lambda r: None, 2)]
    where = lambda k: lambda r: f"block {r[k]['layer']}, t {r[k]['t']:g}"
    return fid + [
        ("probe", "best probe (%)", lambda r: r["best_probe"]["acc"], 2, "", where("best_probe")),
        ("knn", "best kNN (%)", lambda r: r["best_knn"]["acc"], 2, "", where("best_knn")),
        ("loss", "final loss", lambda r: r["train_loss"], 4),
        ("img_per_s", "train img/s", lambda r: r["img_per_s"], 0),
        ("mfu", "MFU (%)", lambda r: None if r["mfu"] is None else 100 * r["mfu"], 1),
        ("samples_per_s", "samples/s", lambda r: r["samples_per_s"], 0)]


def build(name, runs, out_dir):
    """The published summary of the runs; copies each run's samples.png into out_dir."""
    config = same_config(runs, vary=VARY)
    groups = {}
    for f, r in runs:  # in the given order: a (alpha_min, seed)'s first folder is its training run
        groups.setdefault((r["config"]["alpha_min"], r["config"]["seed"]), []).append((f, r))
    recs = [record(g) for _, g in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]
    nets = {}
    for rec in recs:
        for n, e in rec["fid"].items():
            nets.setdefault(e.pop("weights"), f"alpha_min {rec['alpha_min']:g} seed {rec['seed']} FID-{n}")
    common.check(len(nets) <= 1, "FIDs from two Inception networks do not compare (fid_weights_found: "
                                 + "; ".join(f"{w} in {where}" for w, where in nets.items()) + "): rerun one")
    pairs = [(r["_samples"], os.path.join(out_dir, f"diffusion_{name}_samples_a{r['alpha_min']:g}_s{r['seed']}.png"))
             for r in recs if r["_samples"]]
    copies = dict(zip([src for src, _ in pairs], MF.copy_pngs(pairs, "sample grid")))
    for r in recs:
        r["samples"] = copies.get(r.pop("_samples"))  # None: the run had --grid 0
    config = {k: config[k] for k in sorted(config) if k not in ("eval_n_train", "eval_n_test")}  # = n_train, n_test
    return rounded({"name": name, "script": SCRIPT, "paper": PAPER,
                    "device": "; ".join(sorted({r["device"] for r in recs})), "fid_weights": next(iter(nets), None),
                    "config": config, "runs": recs,
                    "summary": MF.summarise(recs, columns(recs))})


def text(s):
    c, runs = s["config"], s["runs"]
    head = (f"U-ViT diffusion {s['name']}: {c['dataset']}, dim {c['dim']} depth {c['depth']} patch {c['patch']}, "
            f"{c['iters']} iterations at batch {c['batch_size']}, {c['steps']}-step {c['solver']} sampling, compile "
            f"{c['compile']}, on {s['device']}")
    cmds = "\n".join(cmd for r in runs for cmd in r["commands"])
    notes = [f"FID - for alpha_min {r['alpha_min']:g} seed {r['seed']}: {r['fid_missing']}."
             for r in runs if r["fid_missing"]]
    real = {n: e for r in runs for n, e in r["fid"].items() if e.get("real") is not None}  # one value per N
    notes += [f"FID-{kilo(int(n))} of real images: {e['real_n']} test images against the same training statistics "
              f"score {e['real']:.2f}, what a perfect generator would at that N." for n, e in sorted(real.items())]
    if any(r["samples_per_s"] is None for r in runs):
        notes.append("samples/s -: diffusion_decay.py times its sampling only while it computes FID.")
    if any(r["mfu"] is None for r in runs):
        notes.append("MFU -: the device's peak FLOP/s is unknown to common.peak_flops (a CPU, or a GPU not in its "
                     "list).")
    probe = (f"Probe grid: blocks {','.join(map(str, c['probe_layer']))} x t {','.join(f'{t:g}' for t in c['probe_t'])}"
             f", {c['probe_epochs']} probe epochs, EMA weights.")
    return "\n".join([head, "", "```", cmds, "```", "", MF.markdown(runs, columns(runs)), *notes, probe,
                      f"Paper: {s['paper']}."])


def plot(s, png):
    plt = MF.pyplot()
    runs, c = s["runs"], s["config"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = ["-", "--", ":", "-."]
    for i, a in enumerate(sorted({r["alpha_min"] for r in runs}, reverse=True)):
        group = [r for r in runs if r["alpha_min"] == a]
        for j, t in enumerate(c["probe_t"]):
            for ax, k in zip(axes, ("linear_probe", "knn")):
                vals = np.array([r["probe"][k][j] for r in group])  # seeds x layers
                ci = [common.mean_ci(col)["ci95"] or 0.0 for col in vals.T] if len(group) > 1 else None
                ax.plot(c["probe_layer"], vals.mean(0), color=f"C{i}", ls=styles[j % 4], marker="o", ms=4,
                        label=f"alpha_min {a:g}, t {t:g}" + (f" (mean of {len(group)} seeds)" if ci else ""))
                if ci:  # apart from the line, so the legend keeps the line style of each t
                    ax.errorbar(c["probe_layer"], vals.mean(0), yerr=ci, fmt="none", color=f"C{i}", capsize=3)
        for r in group:
            axes[2].plot(r["loss"]["step"], r["loss"]["loss"], color=f"C{i}", lw=1,
                         label=f"alpha_min {a:g} (seed {r['seed']})")
    mid = c["depth"] // 2 + 1
    for ax, title in zip(axes, ("linear probe accuracy (%)", f"kNN accuracy (k = {c['knn_k']}, %)")):
        ax.axvline(mid, color="0.6", ls=":", lw=1)
        ax.text(mid, 0.02, " mid block", transform=ax.get_xaxis_transform(), fontsize=8, color="0.4")
        ax.set_xticks(c["probe_layer"])
        ax.set_xlabel("block (1-based, forward order)")
        ax.set_title(title + " of noised test images", fontsize=10)
        ax.legend(fontsize=7, handlelength=4)  # long enough to tell the t line styles apart
    axes[2].set_yscale("log")
    axes[2].set_xlabel("iteration")
    axes[2].set_title("training loss (mean over each log interval)", fontsize=10)
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fid = "; ".join(f"alpha_min {r['alpha_min']:g}: FID-{kilo(int(n))} {e['fid']:.2f}" for r in runs
                    for n, e in r["fid"].items())
    fig.suptitle(f"U-ViT with decayed shortcuts, {s['name']}: {c['dataset']}, {c['iters']} iterations "
                 f"({s['device']})" + (f"\n{fid}" if fid else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main(argv=None):
    return MF.cli(argv, __doc__, "diffusion", SCRIPT, build, text, plot)


if __name__ == "__main__":
    common.run_main(main)
