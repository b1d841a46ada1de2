"""probe.py on real smoke checkpoints of every script, a planted representation, and its error messages."""
import importlib, json, math, os, sys, types

import pytest
import torch
import torch.nn as nn

import common
import probe
from conftest import assert_clean_error, need, run_script, side_by_side

SMOKE = {  # script -> its smoke flags; each writes OUT/ckpt.pt (None: the README's `--smoke` run, shared)
    "mae_decay": ["--seed", "1"],  # seeds other than 0: probe.py must evaluate with the run's own seed
    "diffusion_decay": ["--seed", "2", "--knn-k", "7"],  # and a k of its own: probe.py must use it too
    "sim_cifar": None,
    "selfmodel": None,  # MNIST, its default task
}


@pytest.fixture(scope="module")
def ckpts(data_dir, tmp_path_factory, readme_smoke):
    need(data_dir, "cifar10", "cifar-10-batches-py")
    need(data_dir, "mnist", "MNIST", "raw")
    root = tmp_path_factory.mktemp("probe_ckpts")

    def smoke(script):
        if SMOKE[script] is None:
            return readme_smoke(script)
        d = root / script
        return run_script([f"{script}.py", "--smoke", "--out", d, "--data-dir", data_dir] + SMOKE[script],
                          timeout=300), d
    out = {}
    order = sorted(SMOKE, key=lambda s: s != "sim_cifar")  # the longest beside the three others, one by one
    for script, (p, d) in zip(order, side_by_side(*[lambda s=s: smoke(s) for s in order])):
        assert p.returncode == 0, f"{script} --smoke failed:\n{p.stderr[-3000:]}"
        ck = next(d.rglob("ckpt.pt"))
        out[script] = (ck, ck.parent / "results.json")
    return out


def _probe(*argv):
    return probe.main([str(a) for a in argv])


@pytest.mark.parametrize("script", list(SMOKE))
def test_every_script_end_to_end(ckpts, data_dir, tmp_path, script):
    ck, _ = ckpts[script]
    rows = _probe(ck, "--layers", "all", "--data-dir", data_dir, "--out", tmp_path / "p.json")
    n_layers = importlib.import_module(script).probe_layers(common.load_checkpoint(str(ck))["config"])
    assert [r["layer"] for r in rows] == list(range(1, n_layers + 1))
    for r in rows:
        assert 0 <= r["linear_probe"] <= 100 and 0 <= r["knn"] <= 100
        assert math.isfinite(r["feat_norm"]) and r["feat_norm"] > 0
        assert r["erank"] >= 0 and r["erank_exp"] == pytest.approx(math.exp(r["erank"]))
    saved = json.load(open(tmp_path / "p.json"))
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["device"].startswith("cpu")


def test_sim_cifar_probe_reads_what_its_classifier_reads(ckpts, data_dir, tmp_path, monkeypatch):
    """probe.py on a sim_cifar checkpoint: its last-layer test features, put through the network's own
    classifier, score the run's single-view test accuracy. Same images, same normalisation, the block fc reads
    (raw pixels or another block would score something else: kNN on CIFAR pixels alone clears chance)."""
    ck, _ = ckpts["sim_cifar"]
    seen = {}
    real = common.evaluate_features

    def spy(tr_f, tr_y, te_f, te_y, **kw):
        seen.update(te_f=te_f, te_y=te_y)
        return real(tr_f, tr_y, te_f, te_y, **kw)
    monkeypatch.setattr(common, "evaluate_features", spy)
    (row,) = _probe(ck, "--probe-epochs", "1", "--data-dir", data_dir, "--out", tmp_path / "p.json")
    run = json.load(open(ck.parent / "run.json"))
    _, cfg, net = probe.load_run(str(ck))
    assert row["layer"] == 8 and len(seen["te_y"]) == run["test_n"] and run["variant"] == cfg["sim"]
    with torch.no_grad():
        hits = (net.fc(seen["te_f"].float()).argmax(1) == seen["te_y"]).sum().item()
    assert 100 * abs(hits - run["test_acc"] * run["test_n"] / 100) / run["test_n"] <= 0.1 + 1e-9, (hits, run["test_acc"])


def test_mae_probe_equals_training_eval(ckpts, data_dir, tmp_path):
    ck, res = ckpts["mae_decay"]
    final = json.load(open(res))["metrics"]["final"]
    (row,) = _probe(ck, "--data-dir", data_dir, "--out", tmp_path / "p.json")
    for k in ("linear_probe", "knn", "erank", "erank_exp", "feat_norm", "raw_norm"):
        assert row[k] == final[k], k
    assert row["feature"] == "cls"
    (mean,) = _probe(ck, "--feature", "mean", "--data-dir", data_dir, "--out", tmp_path / "m.json")
    for k in ("linear_probe", "knn", "erank", "erank_exp", "feat_norm"):
        assert mean[k] == final["mean"][k], k
    assert mean["feature"] == "mean" and mean["raw_norm"] == row["raw_norm"]
    assert mean["erank"] != row["erank"]  # the two kinds really are different features
    # every block's raw token norm, so feature-norm growth through depth is visible
    rows = _probe(ck, "--layers", "all", "--data-dir", data_dir, "--out", tmp_path / "a.json")
    norms = [r["raw_norm"] for r in rows]
    assert len(norms) == len(set(norms)) and all(n > 0 for n in norms) and rows[-1]["raw_norm"] == row["raw_norm"]


def test_diffusion_probe_equals_training_eval(ckpts, data_dir, tmp_path):
    ck, res = ckpts["diffusion_decay"]
    grid = json.load(open(res))["metrics"]["probe"]
    cfg = common.load_checkpoint(str(ck))["config"]
    layers = sorted({g["layer"] for g in grid.values()})
    ts = sorted({g["t"] for g in grid.values()})
    rows = _probe(ck, "--layers", ",".join(map(str, layers)), "--t", ",".join(map(str, ts)),
                  "--data-dir", data_dir, "--out", tmp_path / "p.json")
    assert len(rows) == len(grid) and cfg["dataset"] == "cifar10"
    for r in rows:
        g = next(v for v in grid.values() if v["layer"] == r["layer"] and v["t"] == r["t"])
        for k in ("linear_probe", "knn", "erank", "feat_norm"):
            assert r[k] == g[k], (r["layer"], r["t"], k)


def test_compare_puts_checkpoints_side_by_side(ckpts, data_dir, tmp_path, capsys):
    a, b = ckpts["mae_decay"][0], ckpts["sim_cifar"][0]
    rows = _probe(a, "--compare", b, "--data-dir", data_dir, "--out", tmp_path / "p.json")
    assert [r["script"] for r in rows] == ["mae_decay", "sim_cifar"]
    table = capsys.readouterr().out
    assert str(os.path.basename(os.path.dirname(a))) in table and "sim_cifar" in table


# ---------------------------------------------------------------------------- planted representation

def _planted_module(kind):
    """A stand-in experiment script: features either encode the label (planted) or ignore the input."""
    mod = types.ModuleType(f"planted_{kind}")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

    mod.build_model = lambda cfg: Net()
    mod.probe_layers = lambda cfg: 1

    def feats(model, x, cfg, layers, t=None, generator=None):
        if kind == "planted":  # the label is written in the image's mean brightness (see _fake_data)
            level = x.mean((1, 2, 3))
            f = torch.stack([torch.cos(level * k) for k in range(1, 9)] + [level], 1)
        else:
            f = torch.randn(len(x), 9, generator=generator, device=x.device)
        return {1: f}
    mod.probe_features = feats
    return mod


def _fake_data(name, data_dir, train=True, download=False):
    n = 1000 if train else 400
    g = torch.Generator().manual_seed(int(train))
    y = torch.randint(0, 10, (n,), generator=g)
    x = (y.view(-1, 1, 1, 1) * 25 + torch.randint(0, 4, (n, 3, 32, 32), generator=g)).to(torch.uint8)
    return x, y


def _planted_ckpt(tmp_path, monkeypatch, kind="planted", **config):
    """A checkpoint of the stand-in script, probed on fake data (1000 train, 400 test images)."""
    mod = _planted_module(kind)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(probe, "SCRIPTS", probe.SCRIPTS + (mod.__name__,))
    monkeypatch.setattr(common, "load_dataset", _fake_data)  # 1000 train, 400 test images
    ck = tmp_path / "ckpt.pt"
    common.save_checkpoint(str(ck), {"script": mod.__name__, "model": {"w": torch.zeros(1)},
                                     "config": {"dataset": "cifar10", "seed": 0, "probe_epochs": 2, **config}})
    return ck


@pytest.mark.parametrize("kind,lo,hi", [("planted", 98, 100), ("random", 0, 20)])
def test_planted_vs_random_representation(tmp_path, monkeypatch, kind, lo, hi):
    ck = _planted_ckpt(tmp_path, monkeypatch, kind, probe_epochs=20)
    (row,) = _probe(ck, "--out", tmp_path / "p.json")
    assert lo <= row["linear_probe"] <= hi and lo <= row["knn"] <= hi, row

# ------------------------------------------------------------------------------------------- errors

def test_errors_are_one_line(ckpts, data_dir, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"script": "train_gpt", "model": {}, "config": {}}, other)
    mae, mnist_model = ckpts["mae_decay"][0], ckpts["selfmodel"][0]
    cases = [([junk], "not a readable checkpoint"),
             ([other], "'train_gpt'"),
             ([mae, "--layers", "99"], "--layers 99"),
             ([mae, "--layers", "0"], "--layers 0"),  # layers count from 1
             ([mae, "--layers", "0,x"], "--layers"),
             ([mnist_model, "--dataset", "cifar10"], "--dataset cifar10"),
             ([mae, "--t", "0.1"], "--t"),
             ([mae, "--knn-k", "0"], "--knn-k"),
             ([mae, "--feature", "avg"], "--feature 'avg'"),
             ([mnist_model, "--feature", "mean"], "--feature applies"),
             ([tmp_path / "missing.pt"], "no checkpoint")]
    for argv, words in cases:
        with pytest.raises(common.UserError) as e:
            _probe(*argv, "--data-dir", data_dir, "--out", tmp_path / "p.json")
        assert words in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))
    p = run_script(["probe.py", junk])  # and through the real command line: no traceback
    assert_clean_error(p, "not a readable checkpoint")


def test_selfmodel_checkpoint_names_its_cell_and_normalisation(ckpts, data_dir, tmp_path, capsys, monkeypatch):
    ck, _ = ckpts["selfmodel"]
    cfg = common.load_checkpoint(str(ck))["config"]
    S = importlib.import_module("selfmodel")
    # the images are normalised as the script says its run was (input_stats), here a recognisable stand-in
    monkeypatch.setattr(S, "input_stats", lambda c, dataset: ((0.25,), (0.75,)) if c == cfg else None)
    batches, norms = common.GPUBatches, []
    monkeypatch.setattr(common, "GPUBatches", lambda *a, **k: norms.append((k["mean"], k["std"])) or batches(*a, **k))
    (row,) = _probe(ck, "--data-dir", data_dir, "--out", tmp_path / "p.json")
    assert norms == [((0.25,), (0.75,))] * 2
    monkeypatch.undo()
    assert row["cell"] == {"aw": cfg["model_aw"], "seed": cfg["model_seed"]}
    assert f"probing AW {cfg['model_aw']:g}, seed {cfg['model_seed']}" in capsys.readouterr().out
    # probes normalise as the run trained: by default the authors' 0.5 / 0.5
    assert S.input_stats({"normalize": "paper"}, "cifar10") == ((0.5,) * 3, (0.5,) * 3)
    assert S.input_stats({"normalize": "dataset"}, "cifar10") == common.DATASET_STATS["cifar10"]


def test_pick_layers_by_hand():
    """Layers count 1..n: 'last' = [n], 'all' = 1..n, a list is kept as given when every entry lies in 1..n (n itself
    included), else a one-line error."""
    assert probe.pick_layers("last", 3) == [3]
    assert probe.pick_layers("all", 3) == [1, 2, 3]
    assert probe.pick_layers("3", 3) == [3] and probe.pick_layers("1,3", 3) == [1, 3]
    for bad in ("0", "4", "2,4"):
        with pytest.raises(common.UserError, match="out of range"):
            probe.pick_layers(bad, 3)


def test_probe_takes_n_train_n_test_and_k_each_from_its_own_flag_else_the_run(tmp_path, monkeypatch):
    """--n-train sets the training images only (the test split stays the run's own, here all 400); k is --knn-k, else
    the run's knn_k (7 here), never silently 20."""
    ck = _planted_ckpt(tmp_path, monkeypatch, knn_k=7)
    sizes, ks = [], []
    batches, evaluate = common.GPUBatches, common.evaluate_features
    monkeypatch.setattr(common, "GPUBatches", lambda x, *a, **k: sizes.append(len(x)) or batches(x, *a, **k))
    monkeypatch.setattr(common, "evaluate_features", lambda *a, **kw: ks.append(kw["k"]) or evaluate(*a, **kw))
    probe.main([str(ck), "--n-train", "300", "--out", str(tmp_path / "p.json")])
    assert sizes == [300, 400] and ks == [7]
    sizes.clear(), ks.clear()
    probe.main([str(ck), "--n-test", "100", "--knn-k", "3", "--out", str(tmp_path / "q.json")])
    assert sizes == [1000, 100] and ks == [3]
