"""Measure the hidden units of finished self-modeling runs that predate selfmodel.py's own measure: how many of the
ReLU units feeding the class rows are dead on the test set (positive on no test example) and the mean share
positive per example (selfmodel.evaluate, the call every cell now makes), from each run folder's checkpoint.

  python results/selfmodel_units.py out/selfmodel/imdb_paper_emb_aw0_s0 out/selfmodel/imdb_paper_emb_aw500_s0
  python results/selfmodel_figures.py NAME out/selfmodel/...   # then publish: the table gets a units line

A sweep's ckpt.pt holds the weights of its last cell only, so a folder of one cell (one AW, one seed) is measured
whole and a folder of many gets its last cell measured. The checkpoint must be the run's own: its cell's test
accuracy, measured again here, must match the one the run recorded (within 0.05 points: another CPU's kernels may
flip a tied example), else nothing is written. The two numbers go into that cell of the folder's results.json
(atomically, with the commit and device that measured them under `units_measured`), where the publisher finds
them as it finds the ones a newer run records itself.
"""
import argparse, json, os, sys, types
from contextlib import nullcontext

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402
import selfmodel as S  # noqa: E402

TOLERANCE = 0.05  # points of test accuracy between the run's record and the measure here


def measure(folder, data_dir, device, cache):
    """{cell key: {dead_units, active_frac, test_acc, recorded}} of the folder's checkpointed cell."""
    ck = common.load_checkpoint(os.path.join(folder, "ckpt.pt"),
                                f"{folder} has no ckpt.pt: only a run's checkpoint holds the weights to measure")
    common.check(ck.get("script") == S.SCRIPT, f"{folder}/ckpt.pt was written by {ck.get('script')!r}, not selfmodel.py")
    common.check(ck.get("cell") is None, f"{folder}/ckpt.pt is of a cell still training: finish it with --resume first")
    cfg = S.spelled_out(ck["config"])
    args = types.SimpleNamespace(**{**vars(S.get_args(["--task", cfg["task"], "--preset", cfg["preset"]])), **cfg,
                                    "data_dir": data_dir, "no_download": True})
    key = tuple(str(args.__dict__.get(k)) for k in ("task", "dataset", "vocab_size", "train_subset", "test_subset",
                                                    "normalize", "batch_size", "sgld_batch"))
    if key not in cache:  # IMDB's vocabulary and tensors take a minute: once per setting
        cache[key] = S.Data(args, types.SimpleNamespace(device=device, rank=0, world_size=1, is_main=True))
    data = cache[key]
    cfg["num_tokens"] = getattr(args, "num_tokens", cfg.get("num_tokens"))
    model = S.build_model(cfg).to(device)
    model.load_state_dict(ck["model"])
    amp = common.autocast(device) if cfg["task"] == "cifar10" else nullcontext()  # as the run evaluated
    got = S.evaluate(model, data.test(), device, amp)
    cell = S.cell_key(cfg["model_aw"], cfg["model_seed"])
    recorded = ck["done"][cell]["test_acc"]
    common.check(abs(got["test_acc"] - recorded) <= TOLERANCE,
                 f"{folder}: the checkpoint's test accuracy {got['test_acc']:.3f}% is not the run's {recorded:.3f}%: "
                 "not this run's weights or data (check --data-dir)")
    return cell, {**got, "recorded": recorded}


def record(folder, cell, units, device):
    """Write the two measures into the cell of folder/results.json, naming what measured them."""
    path = os.path.join(folder, "results.json")  # main() checked that it exists
    res = json.load(open(path))
    common.check(cell in res["metrics"]["runs"], f"{path} has no cell {cell}: the checkpoint is of another run")
    res["metrics"]["runs"][cell].update({k: units[k] for k in S.UNITS})
    res.setdefault("units_measured", {})[cell] = {"by": "results/selfmodel_units.py", "git_commit": common.git_commit(),
                                                  "device": common.device_name(device)}
    common.write_json(path, res)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.one_line_errors(p)
    p.add_argument("runs", nargs="+", help="selfmodel output folders, each with its ckpt.pt and results.json")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"), help="where the run's data set lies")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for f in args.runs:  # every folder checked before the first (slow) data load
        for name in ("ckpt.pt", "results.json"):
            common.check(os.path.isfile(os.path.join(f, name)), f"{f} has no {name}: pass selfmodel output folders")
    device, cache = torch.device(args.device), {}
    print("| run | AW | seed | test acc (%) | dead units | active per example |")
    print("|---|---|---|---|---|---|")
    for f in args.runs:
        cell, units = measure(f, args.data_dir, device, cache)
        record(f, cell, units, device)
        aw, seed = cell.split(",")
        print(f"| {os.path.basename(os.path.normpath(f))} | {aw[3:]} | {seed[5:]} | {units['test_acc']:.2f} "
              f"(run: {units['recorded']:.2f}) | {units['dead_units']} | {units['active_frac']:.3f} |", flush=True)


if __name__ == "__main__":
    common.run_main(main)
