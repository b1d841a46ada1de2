"""results/mae_figures.py on real smoke-sized mae_decay.py runs at alpha_min 1.0 and 0.6, trained on a generated
tiny CIFAR-10 folder (no data set needed): the JSON holds each run's own numbers (and its own Pearson r, which a
hand computation on the stored trajectories reproduces), the command parses back to the run's config, the
reconstructions are copied, seeds get mean ± 95% rows, runs that differ in anything else are refused naming the
key, and --redraw needs only the JSON."""
import json, os, shlex, shutil, sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import common
import mae_decay as M
from conftest import PNG, ROOT, assert_clean_error, run_script, tiny_cifar10

sys.path.insert(0, os.path.join(ROOT, "results"))
import mae_figures as F  # noqa: E402
import publish as P  # noqa: E402

ALPHAS = ("1.0", "0.6")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two smoke runs, 3 epochs each (3 evaluations: the fewest a Pearson r is reported for)."""
    tmp = tmp_path_factory.mktemp("mae_runs")
    data_dir = tiny_cifar10(tmp / "data")
    argv = lambda a: ["mae_decay.py", "--smoke", "--device", "cpu", "--data-dir", data_dir, "--alpha-min", a,
                      "--epochs", 3, "--out", tmp / f"a{a}"]
    with ThreadPoolExecutor(2) as ex:  # the pair side by side: one run's wall time on two cores
        procs = list(ex.map(lambda a: run_script(argv(a)), ALPHAS))
    for p in procs:
        assert p.returncode == 0, p.stderr[-2000:]
    return [str(tmp / f"a{a}") for a in ALPHAS]


@pytest.fixture(scope="module")
def published(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("mae_pub")
    return out, F.main(["smoke", *runs, "--out-dir", str(out)])


def variant(src, dst, config=None, final=None, png=True):
    """A copy of run folder `src` with config / metrics.final entries replaced (a stand-in for another run)."""
    os.makedirs(dst)
    r = json.load(open(os.path.join(src, "results.json")))
    r["config"].update(config or {})
    r["metrics"]["final"].update(final or {})
    common.write_json(os.path.join(dst, "results.json"), r)
    if png:
        shutil.copy(os.path.join(src, "reconstructions.png"), dst)
    return str(dst)


def hand_r(x, y):
    return None if np.std(x) == 0 or np.std(y) == 0 else float(np.corrcoef(x, y)[0, 1])


def test_json_holds_each_runs_own_results(runs, published):
    out, s = published
    assert json.load(open(out / "mae_smoke.json")) == s
    assert [(r["alpha_min"], r["seed"]) for r in s["runs"]] == [(1.0, 0), (0.6, 0)]  # baseline first
    assert [r["folder"] for r in s["runs"]] == [os.path.basename(d) for d in runs]
    assert s["config"]["epochs"] == 3 and "alpha_min" not in s["config"] and "out" not in s["config"]
    for rec, d in zip(s["runs"], runs):
        res = json.load(open(os.path.join(d, "results.json")))
        cfg, m, traj = res["config"], res["metrics"], res["metrics"]["trajectory"]
        assert rec["epoch"] == [1, 2, 3]
        for k in F.METRICS:  # every evaluation, both feature kinds
            assert rec["cls"][k] == P.rounded([t[k] for t in traj])
            assert rec["mean"][k] == P.rounded([t["mean"][k] for t in traj])
        assert rec["raw_norm"] == P.rounded([t["raw_norm"] for t in traj])
        assert rec["train_loss"] == P.rounded(m["train_loss"]) and len(rec["train_loss"]) == 3
        assert rec["final"]["cls"] == P.rounded({k: m["final"][k] for k in F.METRICS})
        assert rec["final"]["mean"] == P.rounded(m["final"]["mean"])
        assert rec["final"]["raw_norm"] == P.rounded(m["final"]["raw_norm"])
        # Fig. 5's r over the evaluations: the run's own, and numpy's on the stored (rounded) trajectories
        for kind, sfx in (("cls", ""), ("mean", "_mean")):
            for target, key in (("linear_probe", "probe"), ("knn", "knn")):
                r, hand = rec["pearson"][kind][key], hand_r(rec[kind]["erank"], rec[kind][target])
                assert r == P.rounded(m[f"pearson_erank_{key}{sfx}"])
                assert (r is None and hand is None) or r == pytest.approx(hand, abs=1e-3)
        assert rec["img_per_s"] == P.rounded(m["img_per_s"]) and rec["img_per_s"] > 0
        assert rec["mfu"] is None  # a CPU has no peak FLOP/s in common.peak_flops
        assert rec["wall_minutes"] == P.rounded(res["wall_seconds"] / 60)
        assert (rec["torch"], rec["git_commit"]) == (res["torch"], res["git_commit"])
        assert rec["device"].startswith(res["device"])
        # the command: only what differs from the preset, and parsed again it is the run's config
        argv = shlex.split(rec["command"])
        assert argv[:5] == ["python", "mae_decay.py", "--smoke", "--alpha-min", f"{cfg['alpha_min']:g}"]
        assert "--epochs 3" in rec["command"] and "--log-every" not in rec["command"]
        again = vars(M.parse_args(argv[2:] + ["--data-dir", cfg["data_dir"], "--out", cfg["out"]]))
        assert {k: again[k] for k in cfg} == cfg
        # the reconstructions, byte for byte
        png = out / f"mae_smoke_recon_a{cfg['alpha_min']:g}_s0.png"
        assert rec["recon"] == png.name
        assert png.read_bytes() == open(os.path.join(d, "reconstructions.png"), "rb").read()


def test_table_one_row_per_run(published):
    _, s = published
    text = F.text(s)
    rows = [l for l in text.splitlines() if l.startswith("| ")]
    assert len(rows) == 3 and rows[0].startswith("| alpha_min | seed | probe cls (%) | probe mean (%) | kNN cls")
    r = s["runs"][1]
    assert rows[2].startswith(f"| 0.6 | 0 | {r['final']['cls']['linear_probe']:.2f} | "
                              f"{r['final']['mean']['linear_probe']:.2f} | {r['final']['cls']['knn']:.2f} | ")
    assert rows[2].endswith(f" | {r['train_minutes']:.1f} | {r['img_per_s']:.0f} | - |") and "MFU -:" in text
    assert r["command"] in text and s["summary"]["0.6"]["seeds"] == [0]
    # the paper's comparison seed by seed: one seed gives the difference and says there is no interval
    base = s["runs"][0]
    gap = r["final"]["cls"]["linear_probe"] - base["final"]["cls"]["linear_probe"]
    assert s["paired"]["0.6"]["seeds"] == [0] and s["paired"]["0.6"]["probe_cls"]["ci95"] is None
    assert s["paired"]["0.6"]["probe_cls"]["mean"] == pytest.approx(gap, abs=2e-3)  # both rounded to 5 digits
    assert f"alpha_min 0.6 - 1, paired by seed (1 seed: no interval): probe cls (%) {gap:+.2f}, " in text


def test_seeds_get_mean_and_student_t_interval(runs, tmp_path):
    """A second seed per alpha_min (stand-ins: probe + 2 points): mean ± t(0.975, 1) * sd / sqrt(2)."""
    extra = []
    for d in runs:
        p = json.load(open(os.path.join(d, "results.json")))["metrics"]["final"]["linear_probe"]
        extra.append(variant(d, tmp_path / ("s1_" + os.path.basename(d)), {"seed": 1}, {"linear_probe": p + 2}))
    s = F.build("seeds", P.load_runs(runs + extra, "mae_decay"), str(tmp_path))
    assert [(r["alpha_min"], r["seed"]) for r in s["runs"]] == [(1.0, 0), (1.0, 1), (0.6, 0), (0.6, 1)]
    p0 = s["runs"][2]["final"]["cls"]["linear_probe"]
    cell = s["summary"]["0.6"]["probe_cls"]
    # two values 2 apart: sd = sqrt(2), half width = 12.706 * sqrt(2) / sqrt(2)
    assert cell["mean"] == pytest.approx(p0 + 1, abs=1e-3) and cell["ci95"] == pytest.approx(12.706, abs=1e-3)
    assert s["summary"]["0.6"]["seeds"] == [0, 1] and s["summary"]["0.6"]["knn_cls"]["ci95"] == 0
    # paired by seed: both seeds' probes moved by +2, so the difference is the same twice (interval 0), and
    # a 0.6 seed with no alpha_min 1 run of its seed is left out of the pairs
    gap = p0 - s["runs"][0]["final"]["cls"]["linear_probe"]
    pair = s["paired"]["0.6"]
    assert pair["seeds"] == [0, 1] and pair["probe_cls"]["mean"] == pytest.approx(gap, abs=1e-3)
    assert pair["probe_cls"]["ci95"] == pytest.approx(0, abs=1e-3) and pair["probe_cls"]["n"] == 2
    lone = variant(runs[1], tmp_path / "s7", {"seed": 7})
    s7 = F.build("lone", P.load_runs(runs + [lone], "mae_decay"), str(tmp_path))
    assert s7["paired"]["0.6"]["seeds"] == [0]
    text = F.text(s)
    assert f"| 0.6 | mean of 2 | {p0 + 1:.2f} ± 12.71 | " in text and text.count("mean of 2") == 2
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("mae_seeds") and f.endswith(".png")) == [
        "mae_seeds_recon_a0.6_s0.png", "mae_seeds_recon_a0.6_s1.png", "mae_seeds_recon_a1_s0.png",
        "mae_seeds_recon_a1_s1.png"]


def test_runs_that_differ_are_refused_naming_the_key(runs, tmp_path):
    a, b = runs
    load = lambda *d: P.load_runs(list(d), "mae_decay")
    out = tmp_path / "o"
    out.mkdir()
    blr = variant(b, tmp_path / "blr", {"blr": 0.01})
    with pytest.raises(common.UserError, match=r"blr/results.json differs from .* in blr: only alpha_min, seed, "
                                               r"workers may differ"):
        F.build("x", load(a, blr), str(out))
    with pytest.raises(common.UserError, match="in compile"):  # compiled and eager timings never share a table
        F.build("x", load(a, variant(b, tmp_path / "compiled", {"compile": True})), str(out))
    with pytest.raises(common.UserError, match="are both alpha_min 1 seed 0: pass one of them"):
        F.build("x", load(a, b, a), str(out))
    bare = variant(b, tmp_path / "bare", {"seed": 2}, png=False)
    with pytest.raises(common.UserError, match="bare/reconstructions.png does not exist"):
        F.build("x", load(a, b, bare), str(out))
    assert os.listdir(out) == []  # refused before anything was copied
    (tmp_path / "dd").mkdir()
    common.write_json(str(tmp_path / "dd" / "results.json"), {"script": "diffusion_decay", "config": {}})
    with pytest.raises(common.UserError, match="not written by mae_decay.py"):
        load(a, str(tmp_path / "dd"))
    # from the command line: one line naming the file and the key, exit 2, nothing written
    p = run_script([os.path.join("results", "mae_figures.py"), "x", a, blr, "--out-dir", out])
    assert p.returncode == 2
    assert_clean_error(p, os.path.join(blr, "results.json"), "in blr")
    assert os.listdir(out) == []


def test_figure_and_redraw_from_the_json_alone(published, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional figure extra (requirements-figures.txt)")
    out, s = published
    assert (out / "mae_smoke.png").read_bytes()[:8] == PNG and os.path.getsize(out / "mae_smoke.png") > 20_000
    shutil.copy(out / "mae_smoke.json", tmp_path)
    again = F.main(["--redraw", str(tmp_path / "mae_smoke.json"), "--out-dir", str(tmp_path)])
    assert again == s and (tmp_path / "mae_smoke.png").read_bytes()[:8] == PNG
    assert sorted(os.listdir(tmp_path)) == ["mae_smoke.json", "mae_smoke.png"]  # no run folder needed
    with pytest.raises(common.UserError, match="not written by results/mae_figures.py"):
        F.main(["--redraw", os.path.join(ROOT, "results", "selfmodel_mnist_h64.json"), "--out-dir", str(tmp_path)])


def test_json_and_images_without_matplotlib(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    F.main(["nofig", *runs, "--out-dir", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["mae_nofig.json", "mae_nofig_recon_a0.6_s0.png",
                                            "mae_nofig_recon_a1_s0.png"]
    assert "matplotlib is not installed: figure skipped" in capsys.readouterr().out


def test_committed_tables_are_their_run_folders(tmp_path):
    """Every published MAE table (results/mae_*.json) is what the publisher makes today of the run folders
    committed under results/runs/mae_decay/ (each run names its folder), its reconstructions are those runs'
    own, and the README shows its table rows and names its JSON and figure: a hand-edited number, a publisher
    change that moves a value, or a lost run folder fails here."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    res = os.path.join(ROOT, "results")
    files = sorted(f for f in os.listdir(res) if f.startswith("mae_") and f.endswith(".json"))
    assert files  # the H200 pair at least
    for f in files:
        s = json.load(open(os.path.join(res, f)))
        folders = [os.path.join(res, "runs", "mae_decay", r["folder"]) for r in s["runs"]]
        again = json.loads(json.dumps(F.build(s["name"], P.load_runs(folders, "mae_decay"), str(tmp_path))))
        assert again == s
        for r, d in zip(s["runs"], folders):
            assert open(os.path.join(res, r["recon"]), "rb").read() == open(os.path.join(d, "reconstructions.png"),
                                                                            "rb").read()
        assert f"results/mae_{s['name']}.json" in readme and f"results/mae_{s['name']}.png" in readme
        rows = [r for r in F.markdown(s["runs"], F.COLUMNS).splitlines() if r.startswith("| ")]
        assert rows and [r for r in rows if r not in readme] == []
        pairs = [l for l in F.text(s).splitlines() if ", paired by seed (" in l]  # the paper's comparison
        assert len(pairs) == len(s["paired"]) and [l for l in pairs if l not in readme] == []


def test_readme_operation_count_is_the_committed_profile(tmp_path):
    """The operations per MAE training step the README cites are those of the committed --profile folder
    (cifar_quick, CPU, batch 16), and today's code still dispatches them: one eager step counted again at a
    batch of 2 on generated images (the count does not depend on the batch or the pixels)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    prof = json.load(open(os.path.join(ROOT, "results", "runs", "mae_decay", "profile_cpu_b16", "profile.json")))
    assert prof["config"]["preset"] == "cifar_quick" and prof["config"]["batch_size"] == 16
    assert f"{prof['metrics']['profile']['ops']:,} operations" in readme
    data = tiny_cifar10(tmp_path / "data")
    out = tmp_path / "p"
    p = run_script(["mae_decay.py", "--profile", "--device", "cpu", "--batch-size", 2, "--data-dir", data,
                    "--out", out])
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.load(open(out / "profile.json"))["metrics"]["profile"]["ops"] == prof["metrics"]["profile"]["ops"]
