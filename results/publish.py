"""What every results/ publisher needs: read the results.json files a training script wrote, check that they
belong together, name the device, round numbers for the committed JSON, and write "mean ± 95% interval".

Not a training dependency: only the scripts under results/ import this (and matplotlib, lazily, for figures).
"""
import argparse, json, os, sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402

# keys that never change what a run computes (where it wrote, how often it logged or saved). Not here: device and
# compile, which change the speed figures and the numerics (bf16 on a GPU, fp32 on a CPU); one table is one setting.
RUN_ONLY = {"out", "resume", "stop_at_step", "data_dir", "log_every", "ckpt_interval", "ckpt_every", "no_download",
            "eval_batch", "profile"}


def rounded(x, digits=5):
    """Floats to `digits` significant digits, recursively: the committed JSON stays small and diffable."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    return x


def load_runs(paths, script):
    """[(path, results)] for output folders (or their results.json) written by `script`; one clear line if not."""
    out = []
    for p in paths:
        f = os.path.join(p, "results.json") if os.path.isdir(p) else p
        common.check(os.path.exists(f), f"{f} does not exist: pass a {script}.py output folder or its results.json")
        try:
            r = json.load(open(f))
        except ValueError as e:
            raise common.UserError(f"{f} is not valid JSON ({e}): rerun the script or pass another folder")
        common.check(r.get("script") == script, f"{f} was not written by {script}.py")
        out.append((f, r))
    return out


def same_config(runs, vary=()):
    """The config the runs share (the keys in `vary` and RUN_ONLY left out): they may differ only in those;
    refuses any other difference, naming the keys."""
    skip = RUN_ONLY | set(vary)
    (f0, _), base = runs[0], {k: v for k, v in runs[0][1]["config"].items() if k not in skip}
    for f, r in runs[1:]:
        diff = sorted(k for k in set(base) | set(r["config"]) if k not in skip and r["config"].get(k) != base.get(k))
        common.check(not diff, f"{f} differs from {f0} in {', '.join(diff)}: only {', '.join(sorted(vary)) or 'nothing'}"
                     " may differ")
    return base


def cpu_of(results):
    """The CPU model a run recorded in its results.json; runs from before that record are taken to be this
    machine's."""
    return (results.get("cpu") or {}).get("model") or common.cpuinfo()


def device_of(results):
    """'NVIDIA H100 80GB HBM3' or 'cpu (2 cores), AMD EPYC ...': the device line of a figure or table."""
    dev = results.get("device", "?")
    cpu = cpu_of(results) if str(dev).startswith("cpu") else None
    return f"{dev}, {cpu}" if cpu else str(dev)


def pm(values, digits=2, sign=""):
    """'mean ± ci95' over the values (Student t), or just the mean for one value; '-' for none."""
    return pm_stats(common.mean_ci([v for v in values if v is not None]), digits, sign)


def pm_stats(s, digits=2, sign=""):
    """`pm` of a common.mean_ci result."""
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:{sign}.{digits}f}" + (f" ± {s['ci95']:.{digits}f}" if s["ci95"] is not None else "")


def flag_text(action, value):
    """The argv words that set the argparse `action` to `value`: how a publisher writes a run's config back as
    the command that made it."""
    opt = next(o for o in action.option_strings if o.startswith("--"))
    if isinstance(action, argparse.BooleanOptionalAction):
        return [opt if value else "--no-" + opt[2:]]
    if isinstance(action, argparse._StoreTrueAction):
        return [opt] if value else []
    if isinstance(action, argparse._StoreFalseAction):
        return [] if value else [opt]
    if value is None:
        return []
    num = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    return [opt, ",".join(num(v) for v in value) if isinstance(value, (list, tuple)) else num(value)]
