"""probe.py: measure the representation of any checkpoint this repo writes, the way the papers do.

    python probe.py out/mae_decay/RUN/ckpt.pt                       # last layer, the run's own data set
    python probe.py CKPT --layers all --knn-k 20                      # every block
    python probe.py out/diffusion_decay/RUN/ckpt.pt --layers 4,7 --t 0.1,0.3   # diffusion: noise levels too
    python probe.py CKPT_A --compare CKPT_B CKPT_C                    # side by side (e.g. alpha_min 1.0 vs 0.6)
    python probe.py out/mae_decay/RUN/ckpt.pt --feature mean --layers all   # MAE: mean of raw block tokens

The checkpoint names the script and config that made it; probe.py imports that script's model code
(`build_model`, `probe_layers`, `probe_features`), extracts frozen features of the train and test split
once per noise level (bf16 on a GPU, kept in memory) and reports per layer: linear-probe top-1 (MAE protocol:
BatchNorm without affine + linear head, trained on the device), weighted kNN top-1, effective rank
(entropy H and exp(H), see common.effective_rank) and mean feature norm. The numbers are computed by
common.evaluate_features, the same call the training scripts make, so probe.py reproduces their final eval.
Scripts whose module lists FEATURES (mae_decay: cls | mean) serve several feature kinds: `--feature` picks
one (default: the first, cls) and each row also gets raw_norm, the mean token norm of block l's raw output
(column raw|x|), so feature-norm growth shows per block under --layers all. See mae_decay's docstring.
Output: a printed table and a JSON file (`--out`, default probe.json beside the first checkpoint). Every
checkpoint path and the output path are checked before any probing starts, so a typo costs nothing.
"""
import argparse, importlib, os, time

import torch

import common

SCRIPTS = ("mae_decay", "diffusion_decay", "sim_cifar", "selfmodel")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, common.HelpFormatter):
    """The module docstring as written, and every option's default."""
IMAGE_SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "mnist": (1, 28, 28)}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    common.one_line_errors(p)
    p.add_argument("ckpt", help="checkpoint written by one of the experiment scripts")
    p.add_argument("--compare", nargs="+", default=[], metavar="CKPT", help="more checkpoints for the same table")
    p.add_argument("--dataset", default=None, help="cifar10 | cifar100 | mnist (default: the checkpoint's)")
    p.add_argument("--layers", default="last", help="last | all | comma list of 1-based block indices")
    p.add_argument("--t", default=None, help="noise levels in (0, 1) for diffusion checkpoints, e.g. 0.1,0.3 (default: the run's --probe-t)")
    p.add_argument("--feature", default=None,
                   help="feature kind, for scripts that offer several (mae_decay: cls | mean; default cls)")
    p.add_argument("--knn-k", type=int, default=None, help="kNN neighbours (default: the run's, else 20)")
    p.add_argument("--probe-epochs", type=int, default=None, help="linear-probe epochs (default: the run's)")
    p.add_argument("--n-train", type=int, default=None, help="use the first N training images (default: the run's)")
    p.add_argument("--n-test", type=int, default=None, help="use the first N test images (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="feature-extraction batch (default: the run's)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"), help="data root ($DATA_DIR, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never try to download data")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default=None, help="JSON path (default: probe.json beside the first checkpoint)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ("knn_k", "probe_epochs", "n_train", "n_test", "batch_size"):
        v = getattr(args, flag)
        common.check(v is None or v >= 1, f"--{flag.replace('_', '-')} {v} must be >= 1")
    return args


def load_run(path):
    """Checkpoint -> (script module, config, model with the weights the run would evaluate)."""
    ck = common.load_checkpoint(path, missing=_missing(path))
    script = ck.get("script")
    common.check(script in SCRIPTS, f"{path} was written by {script!r}, not one of {', '.join(SCRIPTS)}")
    mod = importlib.import_module(script)
    cfg = ck["config"]
    model = mod.build_model(cfg)
    # EMA weights are what diffusion runs sample and evaluate with
    state = common.clean_state_dict(ck["ema"]) if isinstance(ck.get("ema"), dict) else ck["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise common.UserError(f"{path}: weights do not fit the model its config describes "
                               f"({str(e).splitlines()[0][:120]})") from None
    return mod, cfg, model.eval()


def _missing(path):
    return f"no checkpoint at {path}: give the path of a ckpt.pt that a training script wrote (e.g. out/mae_decay/RUN/ckpt.pt)"


def check_paths(paths, out):
    """Fail in one line before any work: every checkpoint is a readable file, the JSON path is writable."""
    for p in paths:
        common.check(os.path.isfile(p), _missing(p))
        common.check(os.access(p, os.R_OK), f"{p} is not readable: check its permissions")
    common.check(not os.path.isdir(out), f"--out {out} is a directory: give a file name, e.g. {os.path.join(out, 'probe.json')}")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
        test = os.path.join(folder, f".write_test{os.getpid()}")
        open(test, "w").close()
        os.remove(test)
        common.check(not os.path.exists(out) or os.access(out, os.W_OK), f"--out {out} exists and is read-only")
    except OSError as e:
        raise common.UserError(f"--out {out}: cannot write there ({e.strerror}): pick another path") from None


def pick_layers(spec, n):
    if spec == "last":
        return [n]
    if spec == "all":
        return list(range(1, n + 1))
    layers = common.parse_list(spec, int, "--layers")
    bad = [l for l in layers if not 1 <= l <= n]
    if bad:
        raise common.UserError(f"--layers {bad[0]} is out of range: this checkpoint's model has layers 1..{n}")
    return layers


def probe_one(path, args, dev):
    mod, cfg, model = load_run(path)
    model.to(dev)
    name = cfg.get("dataset")
    common.check(name != "imdb", f"{path} is a text (IMDB) model: probe.py probes image checkpoints only")
    dataset = args.dataset or name
    common.check(dataset in IMAGE_SHAPES, f"--dataset {dataset!r}: use one of {', '.join(IMAGE_SHAPES)}")
    common.check(IMAGE_SHAPES[dataset] == IMAGE_SHAPES.get(name), f"--dataset {dataset} ({IMAGE_SHAPES[dataset]}) "
                 f"cannot feed a model trained on {name} ({IMAGE_SHAPES.get(name)}): pick a data set of that shape")
    layers = pick_layers(args.layers, mod.probe_layers(cfg))
    cell = None
    if "model_aw" in cfg:  # a selfmodel sweep keeps the weights of one cell only: say which
        cell = {"aw": cfg["model_aw"], "seed": cfg["model_seed"]}
        print(f"{path}: a selfmodel sweep checkpoint holds only its last trained cell; probing AW {cell['aw']:g}, "
              f"seed {cell['seed']}")
    if mod.__name__ == "diffusion_decay":
        spec = args.t or cfg.get("probe_t") or "0.1"
        ts = common.parse_list(",".join(map(str, spec)) if isinstance(spec, (list, tuple)) else spec, float, "--t")
        common.check(all(0 < t < 1 for t in ts), f"--t {args.t}: noise levels must lie in (0, 1)")
    else:
        common.check(args.t is None, f"--t applies to diffusion_decay checkpoints only, not {mod.__name__}")
        ts = [None]
    kinds = getattr(mod, "FEATURES", None)
    common.check(args.feature is None or kinds is not None,
                 f"--feature applies to checkpoints with several feature kinds (mae_decay), not {mod.__name__}")
    common.check(args.feature is None or args.feature in kinds,
                 f"--feature {args.feature!r}: {mod.__name__} offers {', '.join(kinds or ())}")
    extra = {"feature": args.feature or kinds[0], "norms": True} if kinds else {}

    # the run's own evaluation settings, unless overridden, so the numbers match its final eval
    n_train = args.n_train or cfg.get("eval_n_train") or cfg.get("train_subset") or None  # 0 / None: all
    n_test = args.n_test or cfg.get("eval_n_test") or cfg.get("test_subset") or None
    bs = args.batch_size or cfg.get("eval_batch_size") or 500
    epochs = args.probe_epochs or cfg.get("probe_epochs") or 50
    knn_k = args.knn_k or cfg.get("knn_k") or 20
    seed = cfg.get("seed", 0)
    # the normalisation the run trained with (selfmodel follows its paper's Normalize(0.5, 0.5) by default)
    mean, std = mod.input_stats(cfg, dataset) if hasattr(mod, "input_stats") else common.DATASET_STATS[dataset]
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = common.load_dataset(dataset, args.data_dir, train=split == "train", download=not args.no_download)
        splits[split] = common.GPUBatches(x[:n], y[:n], bs, train=False, device=dev, mean=mean, std=std)

    rows = []
    for t in ts:
        feats = {}
        with torch.no_grad(), common.autocast(dev):
            for split, batches in splits.items():
                feats[split] = common.extract_features(
                    lambda x, g: mod.probe_features(model, x, cfg, layers, t, g, **extra), batches, seed=seed)
        (tr_f, tr_y), (te_f, te_y) = feats["train"], feats["test"]
        for layer in layers:
            m = common.evaluate_features(tr_f[layer], tr_y, te_f[layer], te_y, k=knn_k, seed=seed,
                                         probe_epochs=epochs)
            row = {"ckpt": path, "script": mod.__name__, "dataset": dataset, "layer": layer, "t": t, **m,
                   **({"cell": cell} if cell else {})}
            if extra:
                row.update(feature=extra["feature"], raw_norm=te_f[("raw_norm", layer)].mean().item())
            rows.append(row)
    return rows, cfg


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    paths = [args.ckpt] + args.compare
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "probe.json")
    check_paths(paths, out)
    d = common.setup_distributed(args.device)
    rows, configs = [], {}
    for path in paths:
        r, cfg = probe_one(path, args, d.device)
        rows += r
        configs[path] = cfg
    common.sync(d.device)
    seconds = time.time() - t0

    width = max(len(str(p)) for p in paths)
    print(f"{'checkpoint':<{width}}  layer      t  feature   probe%    kNN%   erank  exp(erank)    |f|   raw|x|")
    for r in rows:
        t = "-" if r["t"] is None else f"{r['t']:.2f}"
        raw = f"{r['raw_norm']:8.2f}" if "raw_norm" in r else f"{'-':>8}"
        print(f"{str(r['ckpt']):<{width}}  {r['layer']:>5}  {t:>5}  {r.get('feature', '-'):>7}  {r['linear_probe']:7.2f} "
              f"{r['knn']:7.2f} {r['erank']:7.3f} {r['erank_exp']:11.2f} {r['feat_norm']:6.2f} {raw}")
    common.write_json(out, {"rows": rows, "configs": configs, "args": vars(args), "device": common.device_name(d.device),
                            "wall_seconds": round(seconds, 3), "git_commit": common.git_commit()})
    print(f"wrote {out} ({seconds:.1f} s on {common.device_name(d.device)})")
    return rows


if __name__ == "__main__":
    common.run_main(main)
