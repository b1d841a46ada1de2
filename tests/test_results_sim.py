"""results/sim_figures.py publishes real (tiny) sim_cifar runs: one folder with one seed and one with two, each
baseline + rho-SIM. Means, intervals and the paired gain are checked against the runs' own run.json by hand;
runs that do not belong together are refused in one line; the figure comes back from the JSON alone."""
import json, math, os, pickle, shlex, shutil, signal, statistics, sys

import pytest
import torch

import common
import sim_cifar as S
from conftest import ROOT, assert_clean_error, need, run_script

sys.path.insert(0, os.path.join(ROOT, "results"))
import publish as P  # noqa: E402
import sim_figures as F  # noqa: E402

# 128 training images, batch 64: 2 steps per epoch, 2 epochs (steps 3 and 4 timed, with a log line every step);
# every run reaches the (trivial) target at its first evaluation
TINY = ["--smoke", "--train-subset", "128", "--test-subset", "200", "--epochs", "2", "--bench-steps", "0",
        "--log-every", "1", "--target-acc", "0"]
T_975 = {1: 12.706204736174696, 2: 4.302652729911275}  # Student t, 0.975 quantile, by degrees of freedom (tables)
PNG = b"\x89PNG\r\n\x1a\n"


def small_cifar(data_dir, dst, n_train=160, n_test=200):
    """The first real CIFAR-10 images in the data set's own format (data_batch_1 split over the five train
    files, the start of test_batch): what the runs read is the start of the real data, loaded in milliseconds."""
    src, root = os.path.join(data_dir, "cifar10", "cifar-10-batches-py"), os.path.join(dst, "cifar10",
                                                                                      "cifar-10-batches-py")
    os.makedirs(root)
    for name, n, parts in (("data_batch_1", n_train, [f"data_batch_{i}" for i in range(1, 6)]),
                           ("test_batch", n_test, ["test_batch"])):
        with open(os.path.join(src, name), "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        k = n // len(parts)
        for i, part in enumerate(parts):
            with open(os.path.join(root, part), "wb") as fh:
                pickle.dump({b"data": d[b"data"][i * k:(i + 1) * k], b"labels": d[b"labels"][i * k:(i + 1) * k]}, fh)
    return str(dst)


@pytest.fixture(scope="module")
def folders(data_dir, tmp_path_factory):
    """Seed 0 alone (the GPU plan: one seed per process) and seeds 1, 2 in one folder."""
    need(data_dir, "cifar10", "cifar-10-batches-py", "test_batch")
    tmp = tmp_path_factory.mktemp("sim")
    data_dir = small_cifar(data_dir, tmp / "data")
    outs = [str(tmp / "s0"), str(tmp / "s1-2")]
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:  # in this process (torch imported once): the command line itself is tested in test_sim_cifar.py
        for out, seeds in zip(outs, (["--seed", "0", "--seeds", "1"], ["--seed", "1", "--seeds", "2"])):
            S.main(TINY + seeds + ["--data-dir", data_dir, "--out", out])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return tmp, outs


def run_json(outs, variant, seed):
    folder = outs[0] if seed == 0 else outs[1]
    return json.load(open(os.path.join(folder, f"{variant}_seed{seed}", "run.json")))


def edited(src, dst, fn):
    """A copy of the output folder src whose results.json went through fn(results)."""
    shutil.copytree(src, dst)
    r = json.load(open(os.path.join(dst, "results.json")))
    fn(r)
    common.write_json(os.path.join(dst, "results.json"), r)
    return str(dst)


def test_merge_means_intervals_and_paired_gain(folders, tmp_path):
    tmp, outs = folders
    s = F.merge("tiny", outs[::-1])  # the order of the folders does not matter
    assert list(s["variants"]) == ["off", "rho"]
    for v, row in s["variants"].items():
        assert row["seeds"] == [0, 1, 2]
        for key, src in F.PER_SEED.items():
            vals = [run_json(outs, v, seed).get(src) for seed in (0, 1, 2)]
            assert row[key] == vals, (v, key)  # per seed, from the run itself
            if None in vals:
                assert key == "mfu_pct" and row[key + "_mean"] is None  # no peak FLOPs known for a CPU
                continue
            assert row[key + "_mean"] == pytest.approx(statistics.mean(vals))
            assert row[key + "_ci95"] == pytest.approx(T_975[2] * statistics.stdev(vals) / math.sqrt(3), rel=1e-6)
        assert row["time_to_target_epoch"] == [1, 1, 1] and all(t > 0 for t in row["time_to_target_s"])
        assert [len(h) for h in row["history"]] == [2, 2, 2] and row["history"][1][-1][2] == row["test_acc"][1]
    # cold start: only the first run each process trained (off, seed 0 and seed 1)
    assert s["variants"]["off"]["time_to_target_cold"] == [True, True, False]
    assert s["variants"]["rho"]["time_to_target_cold"] == [False, False, False]
    for key in ("test_acc", "test_acc_tta"):
        diff = [run_json(outs, "rho", k)[key] - run_json(outs, "off", k)[key] for k in (0, 1, 2)]
        g = s["paired_gain" if key == "test_acc" else "paired_gain_tta"]
        assert g["seeds"] == [0, 1, 2] and g["per_seed"] == pytest.approx(diff) and g["variant"] == "rho"
        assert g["mean"] == pytest.approx(statistics.mean(diff))
        assert g["ci95"] == pytest.approx(T_975[2] * statistics.stdev(diff) / math.sqrt(3), rel=1e-6, abs=1e-12)
    ms = {v: statistics.mean(run_json(outs, v, k)["train_step_ms"] for k in (0, 1, 2)) for v in ("off", "rho")}
    assert s["train_step_ratio"] == pytest.approx({"off": 1.0, "rho": ms["rho"] / ms["off"]})
    flops = json.load(open(os.path.join(outs[0], "cost.json")))["flops_per_step"]
    assert s["cost"]["flops_ratio"]["rho"] == pytest.approx(flops["rho"] / flops["off"])
    assert "bench_step_ratio" not in s["cost"]  # --bench-steps 0: no eager timing to report
    assert s["train_minutes_total"] == pytest.approx(sum(run_json(outs, v, k)["minutes"] for v in ("off", "rho")
                                                         for k in (0, 1, 2)))
    assert s["device"].startswith("cpu") and s["processes"] == 1 and s["compile"] is False
    assert s["torch"] == run_json(outs, "off", 0)["torch"] and s["paper_comparable"] is False
    # comparable with the paper: the real width on all of CIFAR-10, nothing less
    for i, (change, want) in enumerate(((dict(width=64, train_subset=0, test_subset=0), True),
                                        (dict(width=64, train_subset=0, test_subset=100), False),
                                        (dict(width=64, train_subset=100, test_subset=0), False))):
        copies = [edited(o, tmp_path / f"w{i}_{j}", lambda r: r["config"].update(change)) for j, o in enumerate(outs)]
        assert F.merge("x", copies)["paper_comparable"] is want, change
    # the commands: parsed again, they give back every setting that is not run-only
    assert s["commands"][1].startswith("python sim_cifar.py --smoke --rho 0.2 --lam 0.005 --seed 0 --seeds 1 ")
    for cmd, out in zip(s["commands"], outs[::-1]):
        cfg = json.load(open(os.path.join(out, "results.json")))["config"]
        again = dict(vars(S.parse_args(shlex.split(cmd)[2:])), dataset="cifar10")
        assert {k: v for k, v in again.items() if k not in P.RUN_ONLY} == \
            {k: v for k, v in cfg.items() if k not in P.RUN_ONLY}, cmd
        assert again["out"] == out


def test_paired_by_seed_not_by_position(folders, tmp_path):
    """A folder whose runs are listed in another order, with made-up accuracies: each gain is rho - off of
    one seed. Seed 0 has only a baseline here (rho-SIM of seed 0 left out): it is in no pair."""
    _, outs = folders
    acc = {("off", 1): 50.0, ("rho", 1): 53.0, ("off", 2): 60.0, ("rho", 2): 60.5}

    def shuffle(r):
        for run in r["metrics"]["runs"]:
            run["test_acc"] = acc[(run["variant"], run["seed"])]
        r["metrics"]["runs"].reverse()
    b = edited(outs[1], tmp_path / "b", shuffle)
    a = edited(outs[0], tmp_path / "a",
               lambda r: r["metrics"].update(runs=[x for x in r["metrics"]["runs"] if x["variant"] == "off"]))
    s = F.merge("pairs", [b, a])
    assert s["variants"]["off"]["seeds"] == [0, 1, 2] and s["variants"]["rho"]["seeds"] == [1, 2]
    g = s["paired_gain"]
    assert g["seeds"] == [1, 2] and g["per_seed"] == pytest.approx([3.0, 0.5]) and g["mean"] == pytest.approx(1.75)
    assert g["ci95"] == pytest.approx(T_975[1] * statistics.stdev([3.0, 0.5]) / math.sqrt(2), rel=1e-6)
    assert "Paired gain rho - off (same seed, n = 2): +1.75 ± 15.88 points" in F.markdown(s)


def test_refusals_name_the_flag(folders, tmp_path):
    _, outs = folders
    cases = [
        (lambda r: r["config"].update(lr=0.5), "in lr"),
        (lambda r: r["config"].update(compile=True), "in compile"),
        (lambda r: r["config"].update(device="cuda"), "in device"),
        (lambda r: r["config"].update(target_acc=95.0), "in target_acc"),
        (lambda r: r.update(device="NVIDIA H100 80GB HBM3"), "--device"),
    ]
    for i, (fn, words) in enumerate(cases):
        with pytest.raises(common.UserError, match=words):
            F.merge("x", [outs[0], edited(outs[1], tmp_path / f"c{i}", fn)])
    # seed and where it wrote may differ: a second copy of seed 0 under another name is a duplicate run
    dup = edited(outs[0], tmp_path / "dup", lambda r: r["config"].update(out="elsewhere", log_every=7))
    with pytest.raises(common.UserError, match=r"off --seed 0 is in both .* pass each seed once"):
        F.merge("x", [outs[0], dup])

    def two_procs(r):
        r["metrics"]["runs"][0]["world_size"] = 2
    with pytest.raises(common.UserError, match="nproc_per_node"):
        F.merge("x", [edited(outs[1], tmp_path / "ws", two_procs)])
    # from the command line: one line, exit 2, the flag named
    p = run_script([os.path.join("results", "sim_figures.py"), "x", outs[0], dup, "--out-dir", tmp_path / "o"])
    assert_clean_error(p, "--seed 0", "pass each seed once")
    assert not (tmp_path / "o").exists()  # nothing written
    for argv, words in ((["x", str(tmp_path / "missing")], ["does not exist"]), (["x"], ["NAME", "folder"]),
                        (["a/b", outs[0]], ["NAME"]), (["--redraw", os.path.join(outs[0], "results.json")],
                                                       ["not a table written by results/sim_figures.py"])):
        with pytest.raises(common.UserError) as e:
            F.main(argv + ["--out-dir", str(tmp_path / "o")])
        assert all(w in str(e.value) for w in words), (argv, str(e.value))


def test_json_and_table_without_matplotlib(folders, tmp_path, monkeypatch, capsys):
    _, outs = folders
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    F.main(["tiny", *outs, "--out-dir", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["sim_tiny.json"]
    text = capsys.readouterr().out
    assert "matplotlib is not installed: figure skipped" in text
    s = json.load(open(tmp_path / "sim_tiny.json"))
    assert s == json.loads(json.dumps(P.rounded(F.merge("tiny", outs))))  # rounded, and nothing else lost
    lines = text.splitlines()
    head = lines.index("| variant | seeds | single-view top-1 (%) | flip TTA (%) | minutes/run | step time vs off |")
    off, rho = s["variants"]["off"], s["variants"]["rho"]
    assert lines[head + 2] == (f"| off (baseline) | 3 | {P.pm(off['test_acc'])} | {P.pm(off['test_acc_tta'])} | "
                               f"{P.pm(off['minutes'])} | x1.000 |")
    assert lines[head + 3].startswith(f"| rho-SIM | 3 | {P.pm(rho['test_acc'])} | ")
    assert lines[head + 3].endswith(f" | x{s['train_step_ratio']['rho']:.3f} |")
    assert "(paper, rho-SIM: 94.65 -> 94.94, +0.29)" in text and "Time to 0% single-view from launch" in text
    assert "off " in text.split("Time to")[1] and "(3/3 seeds reached, 2 cold)" in text and "img/s" in text
    assert "not comparable with the paper's 16.5%" in text and s["commands"][0] in text


def test_figure_and_redraw_from_the_json_alone(folders, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional figure extra (requirements-figures.txt)")
    _, outs = folders
    F.main(["tiny", *outs, "--out-dir", str(tmp_path)])
    png = tmp_path / "sim_tiny.png"
    assert open(png, "rb").read(8) == PNG and os.path.getsize(png) > 10_000
    table = capsys.readouterr().out.split("| variant")[1].split("figure:")[0]
    elsewhere = tmp_path / "redraw"
    elsewhere.mkdir()
    shutil.copy(tmp_path / "sim_tiny.json", elsewhere / "sim_tiny.json")
    monkeypatch.setattr(F, "load_runs", lambda *a: pytest.fail("--redraw read the runs"))
    F.main(["--redraw", str(elsewhere / "sim_tiny.json"), "--out-dir", str(elsewhere / "new")])  # made here
    again = elsewhere / "new" / "sim_tiny.png"
    assert open(again, "rb").read(8) == PNG and os.path.getsize(again) > 10_000
    assert capsys.readouterr().out.split("| variant")[1].split("figure:")[0] == table  # the same table again

# ------------------------------------------------------------------------------------------------
# --cost-only runs: the cost table (FLOPs of off, full SIM and rho-SIM per SIM setting), no training


@pytest.fixture(scope="module")
def cost_folders(data_dir, tmp_path_factory):
    need(data_dir, "cifar10", "cifar-10-batches-py", "test_batch")
    tmp = tmp_path_factory.mktemp("cost")
    data_dir = small_cifar(data_dir, tmp / "data")
    outs = {b: str(tmp / b) for b in ("stride1", "all")}  # given out of order: the table sorts them
    for blocks, out in outs.items():
        S.main(["--smoke", "--cost-only", "--sim-blocks", blocks, "--bench-steps", "0", "--train-subset", "128",
                "--test-subset", "200", "--data-dir", data_dir, "--out", out] + (["--profile"] if blocks == "stride1" else []))
    return tmp, outs


def test_profile_counts_what_a_step_dispatches(cost_folders):
    """--profile: per mode the operations one eager step dispatches (rho-SIM's token draw, gathers, MLPs and
    standardisation are many small ones: more than full SIM's one conv per block), its wall time and the
    costliest operations, largest first; on the CPU no device time. It changes no count: a folder with a
    profile and one without make one cost table (test_cost_table_from_the_counts)."""
    _, outs = cost_folders
    prof = json.load(open(os.path.join(outs["stride1"], "cost.json")))["profile"]
    assert "profile" not in json.load(open(os.path.join(outs["all"], "cost.json")))
    assert sorted(prof) == sorted(S.MODES)
    assert prof["off"]["ops"] < prof["full"]["ops"] < prof["rho"]["ops"]
    assert prof["rho"]["ops"] > 2 * prof["off"]["ops"]  # 5 wrapped blocks, dozens of operations each
    for p in prof.values():
        assert p["wall_ms"] > 0 and p["wall_profiled_ms"] > 0 and p["device_busy_ms"] is None and p["kernels"] is None
        tops = [ms for _, ms in p["top"]]
        assert p["top"] and all(n.startswith("aten::") for n, _ in p["top"]) and tops == sorted(tops, reverse=True)
        assert 0 <= sum(tops) <= p["wall_profiled_ms"] * 1.05
    assert "operations dispatched" in open(os.path.join(outs["stride1"], "log.txt")).read()
    assert S.parse_args(["--cost-only", "--profile", "--compile"]).compile  # compiled steps: profiled, not refused


def test_cost_only_measures_and_trains_nothing(cost_folders):
    _, outs = cost_folders
    for out in outs.values():
        assert sorted(os.listdir(out)) == ["cost.json", "log.txt", "results.json"]  # no run folder, no checkpoint
        r, cost = (json.load(open(os.path.join(out, f))) for f in ("results.json", "cost.json"))
        assert r["config"]["cost_only"] and r["metrics"] == {"cost": cost} and r["train_seconds"] is None
        fl = cost["flops_per_step"]
        assert fl["off"] < fl["rho"] < fl["full"] and cost["step_ms"] == {}
    log = open(os.path.join(outs["all"], "log.txt")).read()
    assert "rho-SIM vs full SIM:" in log and "epoch" not in log  # the cost is logged; nothing was trained


def test_cost_table_from_the_counts(cost_folders, tmp_path, capsys):
    tmp, outs = cost_folders
    F.main(["cost", outs["stride1"], outs["all"], "--out-dir", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["sim_cost.json"]  # a table, no figure (with matplotlib or without)
    s = json.load(open(tmp_path / "sim_cost.json"))
    assert s["kind"] == "cost" and [r["sim_blocks"] for r in s["rows"]] == ["all", "stride1"]
    assert not s["paper_comparable"] and s["width"] == 8 and s["batch_size"] == 64
    text = capsys.readouterr().out
    for r in s["rows"]:
        fl = json.load(open(os.path.join(outs[r["sim_blocks"]], "cost.json")))["flops_per_step"]
        assert r["flops_cut_rho_vs_full_pct"] == pytest.approx(100 * (1 - fl["rho"] / fl["full"]), rel=1e-4)
        assert r["flops_ratio"]["full"] == pytest.approx(fl["full"] / fl["off"], rel=1e-4)
        assert r["gflop_per_image"]["off"] == pytest.approx(fl["off"] / 64 / 1e9, rel=1e-4)
        assert (f"| {r['sim_blocks']} | 0.2 | 32 | {r['gflop_per_image']['off']:.3f} | x{r['flops_ratio']['full']:.3f} "
                f"| x{r['flops_ratio']['rho']:.3f} | {r['flops_cut_rho_vs_full_pct']:.1f}% fewer |") in text
    # stride-1 wraps 5 of the 8 blocks: less extra cost in both modes, the plain network's the same
    a, b = s["rows"]
    assert b["flops_ratio"]["full"] < a["flops_ratio"]["full"] and b["flops_ratio"]["rho"] < a["flops_ratio"]["rho"]
    assert a["gflop_per_image"]["off"] == b["gflop_per_image"]["off"]
    assert "width 8: not comparable with the paper's 16.5%" in text
    assert all("--cost-only" in c and "--seed" not in c for c in s["commands"]) and s["commands"][0] in text
    # the commands (in the order the folders were given) parse to the folders' own settings
    for cmd, blocks in zip(s["commands"], ("stride1", "all")):
        assert {k: v for k, v in vars(S.parse_args(shlex.split(cmd)[2:])).items() if k not in P.RUN_ONLY} == {
            k: v for k, v in json.load(open(os.path.join(outs[blocks], "results.json")))["config"].items()
            if k not in P.RUN_ONLY | {"dataset"}}
    F.main(["--redraw", str(tmp_path / "sim_cost.json"), "--out-dir", str(tmp_path / "again")])
    assert capsys.readouterr().out == text.split("\n", 1)[1]  # the same table, without the "table:" line


def test_cost_tables_refuse_what_does_not_belong(cost_folders, folders, tmp_path):
    _, outs = cost_folders
    _, train = folders
    with pytest.raises(common.UserError, match="--cost-only runs and some trained: publish them as two tables"):
        F.merge("x", [outs["all"], train[0]])
    again = edited(outs["all"], tmp_path / "again", lambda r: r["config"].update(out="elsewhere"))
    with pytest.raises(common.UserError, match="measured the same setting: pass it once"):
        F.merge("x", [outs["all"], again])
    wide = edited(outs["stride1"], tmp_path / "wide", lambda r: r["config"].update(width=16))
    with pytest.raises(common.UserError, match="--width 16, .* 8: one cost table is one model"):
        F.merge("x", [outs["all"], wide])
    for argv, words in ((["--cost-only", "--compile"], "--compile has no effect with --cost-only"),
                        (["--cost-only", "--resume"], "drop --resume")):
        with pytest.raises(common.UserError, match=words):
            S.parse_args(["--smoke"] + argv)


def test_committed_cost_tables_are_what_the_code_counts_today():
    """Every published cost table (results/sim_*.json of kind cost) holds the FLOPs this sim_cifar.py counts now,
    and the README shows its rows: a model change that moves the FLOPs, or a hand-edited README, fails here."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    files = [f for f in sorted(os.listdir(os.path.join(ROOT, "results"))) if f.startswith("sim_") and f.endswith(".json")]
    tables = [json.load(open(os.path.join(ROOT, "results", f))) for f in files]
    for s in [t for t in tables if t.get("kind") == "cost"]:
        assert f"results/sim_{s['name']}.json" in readme
        assert [r for r in F.markdown_cost(s).splitlines() if r.startswith("| ") and r not in readme] == []
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
        for row in s["rows"]:
            argv = ["--cost-only", "--sim-blocks", row["sim_blocks"], "--rho", str(row["rho"]),
                    "--latent-dim", str(row["latent_dim"]), "--width", str(s["width"])]
            cfg = dict(vars(S.parse_args(argv)), dataset="cifar10")
            per_image = {}
            for mode in S.MODES:
                net = S.build_model(dict(cfg, sim=mode))
                per_image[mode] = common.count_flops(
                    lambda: S.training_loss(net, x, y, dict(cfg, sim=mode))[0].backward()) / 2 / 1e9
            assert per_image == pytest.approx(row["gflop_per_image"], rel=1e-4), row


def test_committed_training_tables_are_their_run_folders():
    """Every published training table (results/sim_*.json that is not a cost table) is what the publisher
    makes today of the run folders committed under results/runs/sim_cifar/ (the folder names its commands
    end in), and the README shows its table rows and names its JSON and figure: a hand-edited number, a
    publisher change that moves a value, or a lost run folder fails here."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    files = [f for f in sorted(os.listdir(os.path.join(ROOT, "results"))) if f.startswith("sim_") and f.endswith(".json")]
    tables = [json.load(open(os.path.join(ROOT, "results", f))) for f in files]
    trained = [t for t in tables if t.get("kind") != "cost"]
    assert trained  # the H200 table at least
    for s in trained:
        folders = [os.path.join(ROOT, "results", "runs", "sim_cifar", os.path.basename(shlex.split(c)[-1]))
                   for c in s["commands"]]
        again = json.loads(json.dumps(P.rounded(F.merge(s["name"], folders))))
        assert again == s
        assert f"results/sim_{s['name']}.json" in readme and f"results/sim_{s['name']}.png" in readme
        rows = [r for r in F.markdown(s).splitlines() if r.startswith("| ")]
        assert rows and [r for r in rows if r not in readme] == []


def test_readme_operation_counts_are_the_committed_profile():
    """The operations per step the README cites for rho-SIM, full SIM and the plain network are those of the
    committed --profile folder, and this code still dispatches them (one eager step of each mode, counted
    the same way, at a batch of 2: the count does not depend on it)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    folder = os.path.join(ROOT, "results", "runs", "sim_cifar", "profile_cpu_b16")
    prof = json.load(open(os.path.join(folder, "cost.json")))["profile"]
    assert all(f"{prof[m]['ops']:,}" in readme for m in S.MODES)
    cfg = dict(vars(S.parse_args(["--cost-only"])), dataset="cifar10")
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for m in S.MODES:
        net = S.build_model(dict(cfg, sim=m))
        got = S.profile_step(net, dict(cfg, sim=m), x, y, torch.device("cpu"), steps=1)
        assert got["ops"] == prof[m]["ops"], m


def test_the_published_flop_counts_are_what_the_code_counts():
    """results/sim_flops.json (the README's FLOPs row and the paper's 16.5% comparison) against the count of
    the code on main: per image, forward + backward, width 64, both --sim-blocks, to the JSON's 5 digits. A
    FLOP count depends on no seed, device or batch size (batch 2 here, 512 there)."""
    pub = json.load(open(os.path.join(ROOT, "results", "sim_flops.json")))
    assert {r["sim_blocks"] for r in pub["rows"]} == set(S.SIM_BLOCKS)
    x, y = torch.zeros(2, 3, 32, 32), torch.tensor([0, 1])
    for row in pub["rows"]:
        for mode in S.MODES:
            cfg = dict(sim=mode, rho=row["rho"], latent_dim=row["latent_dim"], width=pub["width"], lam=5e-3,
                       label_smoothing=0.1, dataset="cifar10", sim_blocks=row["sim_blocks"])
            with torch.random.fork_rng(devices=[]):  # the initialisation and the token draws leave no trace
                net = S.build_model(cfg)
                flops = common.count_flops(lambda: S.training_loss(net, x, y, cfg)[0].backward())
            assert P.rounded(flops / 2 / 1e9) == row["gflop_per_image"][mode], (row["sim_blocks"], mode)


def test_cold_counts_only_seeds_that_reached_the_target():
    """The committed sim_gpu table with off's seeds 0 and 2 made to reach the target (600 s, 900 s) and seed 1
    not: seeds 0 and 1 ran cold, but only seed 0 both reached and ran cold -> '2/3 seeds reached, 1 cold'."""
    s = json.load(open(os.path.join(ROOT, "results", "sim_gpu.json")))
    off = s["variants"]["off"]
    off["time_to_target_s"], off["time_to_target_cold"] = [600.0, None, 900.0], [True, True, False]
    assert "off 12.50 ± " in F.markdown(s)  # mean of 10 and 15 minutes
    assert "(2/3 seeds reached, 1 cold)" in F.markdown(s)
