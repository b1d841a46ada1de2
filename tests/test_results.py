"""results/: the self-modeling publisher merges split sweeps, recomputes the trace check, writes the JSON
and (with matplotlib) the figures, and refuses runs that do not belong together."""
import functools, importlib.util, json, math, os, platform, re, shlex, sys

import pytest
import torch

import common
from conftest import need, run_script, side_by_side

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "results"))
import selfmodel_figures as F  # noqa: E402
from publish import rounded  # noqa: E402

S_UNITS = F.S.UNITS


@pytest.fixture(scope="module")
def split_sweep(data_dir, tmp_path_factory):
    """A smoke sweep run as two processes: AW 0 (seeds 0, 1) and AW 5 (seeds 0, 1), plus a calibration grid."""
    need(data_dir, "mnist", "MNIST", "raw", "t10k-images-idx3-ubyte.gz")
    tmp = tmp_path_factory.mktemp("sweeps")
    base = ["selfmodel.py", "--smoke", "--device", "cpu", "--data-dir", data_dir, "--seeds", "2",
            "--train-subset", "1024", "--sgld-draws", "20"]
    sweeps = (("0", []), ("5", ["--llc-grid-eps", "1e-4,1e-3", "--llc-grid-gamma", "100"]))
    outs = [str(tmp / f"aw{aw}") for aw, _ in sweeps]
    procs = side_by_side(*[lambda aw=aw, extra=extra, out=out: run_script(base + ["--aw", aw, "--out", out] + extra)
                           for (aw, extra), out in zip(sweeps, outs)])
    for p in procs:
        assert p.returncode == 0, p.stderr[-2000:]
    return tmp, outs


def without_grid(out):
    """The AW 5 run's results.json as if it had run without the calibration grid (which sets it apart)."""
    res = json.load(open(os.path.join(out, "results.json")))
    res["config"].update(llc_grid=[], llc_grid_eps="", llc_grid_gamma="")
    for cell in res["metrics"]["runs"].values():
        cell.pop("llc_grid")
    return res


def test_merge_writes_the_table_commands_and_rechecked_traces(split_sweep):
    tmp, outs = split_sweep
    # the grid run differs in its flags: merging it with a plain run is refused, naming the flags
    with pytest.raises(common.UserError, match="llc_grid"):
        F.merge("x", outs)
    plain = tmp / "aw5_plain"
    grid = without_grid(outs[1])
    plain.mkdir()
    common.write_json(str(plain / "results.json"), grid)
    s = F.merge("smoke", [outs[0], str(plain)])
    rows = s["table"]["rows"]
    assert [r["aw"] for r in rows] == [0.0, 5.0] and all(r["n"] == 2 for r in rows)
    assert rows[0]["test_acc_ci95"] > 0 and s["table"]["trend"]["llc"]["n"] == 4
    assert s["cell_minutes"] == round(sum(c["train_seconds"] + c["llc_seconds"] for c in s["runs"].values()) / 60, 1)
    assert s["commands"][0].startswith("python selfmodel.py --task mnist --aw 0 --seed 0 --seeds 2")
    assert "--train-subset 1024" in s["commands"][0] and "--sgld-draws 20" in s["commands"][0]
    # the trace check is recomputed from the stored traces; 20 draws under 50 trace points leave one draw a
    # point, so the traces are the draws themselves and the recheck must give the runs' own verdicts
    own = {k: c["llc_check"] for o in outs
           for k, c in json.load(open(os.path.join(o, "results.json")))["metrics"]["runs"].items()}
    for key, cell in s["runs"].items():
        assert cell["llc_trace"]["draws_per_point"] == 1 and len(cell["llc_trace"]["loss_trace"]) == 2
        assert cell["llc_check"]["flat"] == own[key]["flat"] and isinstance(own[key]["flat"], bool)
        for k in ("drift", "noise", "frac_below_init"):
            # the published JSON keeps 5 significant digits
            assert cell["llc_check"][k] == pytest.approx(own[key][k], rel=1e-4, abs=1e-12), (key, k)
    text = F.markdown(s)
    assert text.count("\n| ") == 2 and "| 5 | 2 |" in text and "Spearman" in text
    with pytest.raises(common.UserError, match="two runs"):
        F.merge("twice", [outs[0], outs[0]])


def test_a_published_json_grows_by_later_seeds(split_sweep, tmp_path):
    """Seeds run later join a published sweep through its JSON alone (the first output folders long gone): the
    table is the one of merging the folders, up to the published rounding; provenance of both is kept."""
    _, outs = split_sweep
    pub = tmp_path / "selfmodel_first.json"
    common.write_json(str(pub), F.merge("first", [outs[0]]))
    later = without_grid(outs[1])
    later.update(torch="9.9.9", git_commit="abc1234", cpu={"kernels": "AVX2", "threads": 1, "model": "Acme 9000"})
    (tmp_path / "later").mkdir()
    common.write_json(str(tmp_path / "later" / "results.json"), later)
    grown = F.merge("grown", [str(pub), str(tmp_path / "later")])
    direct = F.merge("direct", [outs[0], str(tmp_path / "later")])
    assert [(r["aw"], r["n"]) for r in grown["table"]["rows"]] == [(0.0, 2), (5.0, 2)]
    for a, b in zip(grown["table"]["rows"], direct["table"]["rows"]):
        for k in ("test_acc_mean", "width_mean", "llc_mean"):
            assert a[k] == pytest.approx(b[k], rel=1e-4)
    assert grown["commands"] == direct["commands"] and "abc1234" in grown["git_commits"]
    assert grown["torch"].endswith(", 9.9.9") and grown["torch"].count(",") == 1
    first = json.load(open(os.path.join(outs[0], "results.json")))["cpu"]  # this machine's, recorded by the run
    assert grown["cpu_kernels"] == sorted({f"{first['kernels']}, {first['threads']} thread(s)", "AVX2, 1 thread(s)"})
    assert grown["cpu_model"] == ", ".join(sorted({first["model"] or "?", "Acme 9000"}))  # each CPU, once
    with pytest.raises(common.UserError, match="two runs"):  # the published cells are not counted twice
        F.merge("twice", [str(pub), outs[0]])
    later["device"] = "cuda (NVIDIA H200)"
    common.write_json(str(tmp_path / "later" / "results.json"), later)
    with pytest.raises(common.UserError, match="one table is one device"):
        F.merge("mixed", [str(pub), str(tmp_path / "later")])


def test_runs_from_before_target_merge_as_the_default_and_other_targets_are_refused(split_sweep, tmp_path):
    """A sweep published before --target and --aux existed self-modeled the task's default layers: it merges with
    new runs of that default, not with runs that self-model other layers or run the act-l2 control; the command
    records a non-default --target and --aux."""
    _, outs = split_sweep
    new = json.load(open(os.path.join(outs[0], "results.json")))
    assert new["config"]["target"] == "hidden"
    pub = F.merge("first", [outs[0]])
    del pub["config"]["target"], pub["config"]["aux"], pub["config"]["llc_rescale"]  # published before the flags
    common.write_json(str(tmp_path / "selfmodel_old.json"), pub)
    later = without_grid(outs[1])
    (tmp_path / "later").mkdir()
    common.write_json(str(tmp_path / "later" / "results.json"), later)
    grown = F.merge("grown", [str(tmp_path / "selfmodel_old.json"), str(tmp_path / "later")])
    assert grown["config"]["target"] == "hidden" and [r["aw"] for r in grown["table"]["rows"]] == [0.0, 5.0]
    assert grown["config"]["aux"] == "self-model"
    old5 = F.merge("old5", [str(tmp_path / "later")])  # an old sweep with an AW > 0: its settings are binding
    del old5["config"]["target"], old5["config"]["aux"], old5["config"]["llc_rescale"]
    common.write_json(str(tmp_path / "selfmodel_old5.json"), old5)
    for key, value in (("aux", "act-l2"), ("target", "embedding")):
        other = {**later, "config": {**later["config"], key: value}}
        common.write_json(str(tmp_path / "later" / "results.json"), other)
        with pytest.raises(common.UserError, match=f"differs from .* in {key}"):
            F.merge("mixed", [str(tmp_path / "selfmodel_old5.json"), str(tmp_path / "later")])
    imdb = {**vars(F.S.get_args(["--task", "imdb", "--preset", "quick", "--target", "embedding"])), "seed": 3}
    assert F.command_of(imdb).startswith("python selfmodel.py --task imdb --preset quick --aw 0,1,100,500 "
                                         "--seed 3 --seeds 3 --target embedding")
    assert "--target" not in F.command_of({**imdb, "target": "hidden"})
    assert F.command_of({**imdb, "target": "hidden", "aux": "act-l2"}).endswith("--seeds 3 --aux act-l2")


def test_aw0_trains_the_same_network_under_either_aux_and_joins_the_controls_sweep(split_sweep, data_dir, tmp_path):
    """At AW 0 nothing is self-modeled or penalised: a smoke run with --aux act-l2 gives the self-model run's AW 0
    cells bit for bit, so the publisher lets a run of AW 0 alone join a sweep of another --aux or --target (the
    sweep takes the settings of its AW > 0 runs); two runs with AW > 0 that differ in them are still refused."""
    _, outs = split_sweep
    out = tmp_path / "aw0_l2"
    p = run_script(["selfmodel.py", "--smoke", "--device", "cpu", "--data-dir", data_dir, "--seeds", "2",
                    "--train-subset", "1024", "--sgld-draws", "20", "--aw", "0", "--aux", "act-l2", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    ours = json.load(open(out / "results.json"))["metrics"]["runs"]
    theirs = json.load(open(os.path.join(outs[0], "results.json")))["metrics"]["runs"]
    assert ours.keys() == theirs.keys() and len(ours) == 2
    for k in ours:
        for m in ("test_acc", "width", "width_all", "llc", "final_loss", "steps"):
            assert ours[k][m] == theirs[k][m], (k, m)
    # the control's sweep: its AW 5 run (made act-l2 here) and the self-model's AW 0 run, in either order
    sm = without_grid(outs[1])
    for name, aux in (("l2_aw5", "act-l2"), ("sm_aw5", "self-model")):
        (tmp_path / name).mkdir()
        common.write_json(str(tmp_path / name / "results.json"), {**sm, "config": {**sm["config"], "aux": aux}})
    for dirs in ([outs[0], str(tmp_path / "l2_aw5")], [str(tmp_path / "l2_aw5"), outs[0]]):
        m = F.merge("control", dirs)
        assert m["config"]["aux"] == "act-l2" and [r["aw"] for r in m["table"]["rows"]] == [0.0, 5.0]
        assert any("--aux act-l2" in c for c in m["commands"]) and any("--aux" not in c for c in m["commands"])
        assert "control act-l2" in F.S.format_table(m["table"], {**m["config"], "aw": "0,5"})
    with pytest.raises(common.UserError, match="in aux: only"):  # the self-model's AW 5 beside the control's
        F.merge("mixed", [str(tmp_path / "l2_aw5"), str(tmp_path / "sm_aw5")])


def test_rescaled_estimates_merge_into_their_own_table(split_sweep, tmp_path):
    """Runs with --llc-rescale: each cell's estimates per scale survive the merge (their trace check redone), the
    table gives their mean per AW, the markdown a width / RLCT column per scale beside c = 1; a run without the
    flag does not merge with them."""
    _, outs = split_sweep
    res = json.load(open(os.path.join(outs[0], "results.json")))
    res["config"]["llc_rescale"] = "2"
    for i, cell in enumerate(res["metrics"]["runs"].values()):
        cell["llc_rescale"] = {"c=2": {"width": cell["width"] / 2, "llc": 10.0 + i, "frac_below_init": 0.0,
                                       **cell["llc_trace"], "flat": None}}
    (tmp_path / "rs").mkdir()
    common.write_json(str(tmp_path / "rs" / "results.json"), res)
    s = F.merge("rs", [str(tmp_path / "rs")])
    row = s["table"]["rows"][0]
    assert row["llc_rescale"]["c=2"]["mean"] == pytest.approx(10.5) and row["llc_rescale"]["c=2"]["n"] == 2
    assert row["llc_rescale"]["c=2"]["width"] == pytest.approx(row["width_mean"] / 2, rel=1e-4)
    cell = s["runs"]["aw=0,seed=0"]["llc_rescale"]["c=2"]
    trace = res["metrics"]["runs"]["aw=0,seed=0"]["llc_trace"]["loss_trace"]
    # the c = 2 estimate here carries the c = 1 trace, so its recomputed verdict is the c = 1 cell's
    assert cell["flat"] == s["runs"]["aw=0,seed=0"]["llc_check"]["flat"] and isinstance(cell["flat"], bool)
    assert cell["loss_trace"][0] == pytest.approx(trace[0], rel=1e-4)
    lines = F.rescale_markdown(s).splitlines()
    assert lines[0] == "| AW | c = 1: width / RLCT | c = 2: width / RLCT |" and len(lines) == 3
    assert lines[2].startswith(f"| 0 | {row['width_mean']:.4f} / {row['llc_mean']:.1f}")
    assert " / 10.5 ± " in lines[2] and F.rescale_markdown(F.merge("plain", [outs[0]])) == ""
    with_one = {**s, "table": {**s["table"], "rows": [{**row, "llc_rescale": {**row["llc_rescale"], "c=1": {
        "width": row["width_mean"], "mean": row["llc_mean"], "ci95": row["llc_ci95"], "flat": 2, "n": 2}}}]}}
    assert F.rescale_markdown(with_one) == F.rescale_markdown(s)  # --llc-rescale 1: the trained network, once
    assert F.rescale_curves(with_one) == F.rescale_curves(s)
    assert F.command_of(res["config"]).endswith("--llc-rescale 2")
    with pytest.raises(common.UserError, match="in llc_rescale"):
        F.merge("mixed", [str(tmp_path / "rs"), outs[0]])
    curves = F.rescale_curves(s)  # per AW, over c with the trained network at c = 1: width, RLCT, its interval
    assert list(curves) == ["0"] and [p[0] for p in curves["0"]] == [1.0, 2.0]
    assert curves["0"][0][1:4] == [row["width_mean"], row["llc_mean"], row["llc_ci95"]]
    assert curves["0"][1][2] == pytest.approx(10.5) and F.rescale_curves(F.merge("plain", [outs[0]])) == {}
    common.write_json(str(tmp_path / "selfmodel_rs.json"), s)
    s["config"]["aux"] = "act-l2"  # as a control's sweep, drawn with this one's curves beside it
    s["beside"] = F.beside_of(json.load(open(tmp_path / "selfmodel_rs.json")), s)
    assert s["beside"]["rows"]["rescale"] == curves
    if importlib.util.find_spec("matplotlib"):
        png = F.plot_rescale(s, str(tmp_path / "rescale.png"))
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
        assert F.plot_rescale(F.merge("plain", [outs[0]]), str(tmp_path / "none.png")) is None


def test_rescaled_draws_rlct_against_the_class_row_width_across_sweeps(split_sweep, tmp_path):
    """--rescaled: published --llc-rescale sweeps -> a line per (loss, AW) of RLCT against the class-row width over
    c, sorted by width; a (loss, AW) in two sweeps joins them (c = 1 once), AW 0 whatever its --aux (one network:
    the plain one), and a point two sweeps read differently is refused; so are other seeds, another hidden width
    and a sweep without rescalings."""
    _, outs = split_sweep

    def rescaled(cs, llc_of, aux="self-model"):
        res = json.load(open(os.path.join(outs[0], "results.json")))  # AW 0, seeds 0 and 1
        res["config"].update(llc_rescale=",".join(f"{c:g}" for c in cs), aux=aux)
        for i, cell in enumerate(res["metrics"]["runs"].values()):
            cell["llc_rescale"] = {f"c={c:g}": {"width": cell["width"] / c, "llc": llc_of(c) + i, "frac_below_init": 0.0,
                                                **cell["llc_trace"], "flat": None} for c in cs}
        d = tmp_path / f"{aux}_{cs[0]:g}"
        d.mkdir()
        common.write_json(str(d / "results.json"), res)
        return F.merge(d.name, [str(d)])

    wide, fine, penalty = rescaled([0.5, 2], lambda c: 10.0 * c), rescaled([0.9], lambda c: 7.0), \
        rescaled([3], lambda c: 30.0, aux="act-l2")
    row = wide["table"]["rows"][0]
    curves = F.rescaled_curves([wide, fine, penalty])
    assert list(curves) == ["plain network (AW 0)"]  # the act-l2 sweep's AW 0 is the same network: one curve
    sm = curves["plain network (AW 0)"]
    assert [p[3] for p in sm] == [3.0, 2.0, 1.0, 0.9, 0.5]  # c = 1 (the network as trained) once, widths ascending
    assert [p[0] for p in sm] == sorted(p[0] for p in sm)
    assert sm[2][:3] == [row["width_mean"], row["llc_mean"], row["llc_ci95"]] and sm[1][1] == pytest.approx(20.5)
    assert sm[3][0] == pytest.approx(row["width_mean"] / 0.9, rel=1e-4) and sm[3][1] == pytest.approx(7.5)
    assert sm[0][1] == pytest.approx(30.5)
    with pytest.raises(common.UserError, match="plain network \\(AW 0\\) at c = 2 in act-l2_2 differs"):
        F.rescaled_curves([wide, rescaled([2], lambda c: 3.0, aux="act-l2")])  # c = 2 read twice, not alike
    files = []
    for s in (wide, fine):
        files.append(str(tmp_path / f"selfmodel_{s['name']}.json"))
        common.write_json(files[-1], s)
    if importlib.util.find_spec("matplotlib"):
        F.main(["--rescaled", "rw", *files, "--out-dir", str(tmp_path)])
        assert open(tmp_path / "selfmodel_rw.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(common.UserError, match="is not a published selfmodel sweep"):
        F.main(["--rescaled", "rw", outs[0], "--out-dir", str(tmp_path)])
    with pytest.raises(common.UserError, match="--match-tol 2: give a relative gap"):
        F.main(["--rescaled", "rw", *files, "--match-tol", "2", "--out-dir", str(tmp_path)])
    other = json.loads(json.dumps(fine))
    other["runs"] = {k.replace("seed=1", "seed=7"): c for k, c in other["runs"].items()}
    with pytest.raises(common.UserError, match="other seeds"):
        F.rescaled_curves([wide, other])
    other = json.loads(json.dumps(fine))
    other["config"]["hidden"] = 2 * wide["config"]["hidden"]
    with pytest.raises(common.UserError, match="not a mnist sweep at hidden"):
        F.rescaled_curves([wide, other])
    with pytest.raises(common.UserError, match="without --llc-rescale"):
        F.rescaled_curves([wide, F.merge("plain", [outs[0]])])


def test_figures_and_redraw(split_sweep, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional figure extra (requirements-figures.txt)")
    _, outs = split_sweep
    F.main(["calib", outs[1], "--out-dir", str(tmp_path)])
    made = sorted(os.listdir(tmp_path))
    assert made == ["selfmodel_calib.json", "selfmodel_calib.png", "selfmodel_calib_calibration.png"]
    s = json.load(open(tmp_path / "selfmodel_calib.json"))
    grid = s["table"]["rows"][0]["llc_grid"]
    assert sorted(grid) == ["eps=0.0001,gamma=100", "eps=0.001,gamma=100"] and all(g["n"] == 2 for g in grid.values())
    cal = F.calibration_markdown(s).splitlines()
    assert len(cal) == 4 and cal[2].startswith("| 0.0001 | 100 | ") and cal[2].endswith("| yes |")  # itself
    redrawn = tmp_path / "redrawn" / "here"  # the figures again from the JSON alone, into a folder not yet made
    F.main(["--redraw", str(tmp_path / "selfmodel_calib.json"), "--out-dir", str(redrawn)])
    for f in made[1:]:
        assert open(redrawn / f, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(redrawn / f) > 10_000


def test_beside_draws_another_setting_of_the_task_and_survives_redraw(split_sweep, tmp_path):
    """--beside: a published sweep that differs in a setting (here --target) drawn in grey beside this one, its
    label naming the difference; stored in the JSON, so --redraw draws it again; the same setting or another task
    is refused."""
    pytest.importorskip("matplotlib")
    _, outs = split_sweep
    other = F.merge("other", [outs[0]])
    other["config"]["target"] = "embedding"  # as if its runs had self-modeled another layer
    common.write_json(str(tmp_path / "selfmodel_other.json"), other)
    F.main(["mine", outs[0], "--beside", str(tmp_path / "selfmodel_other.json"), "--out-dir", str(tmp_path)])
    mine = json.load(open(tmp_path / "selfmodel_mine.json"))
    assert mine["beside"]["label"] == "other (target embedding)"
    assert mine["beside"]["rows"]["llc"] == [[r["aw"], r["llc_mean"], r["llc_ci95"]] for r in other["table"]["rows"]]
    fig = F.figure(mine)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["mine (target hidden)", "other (target embedding)"]
    # the trade-off figure: a point per AW of each sweep, accuracy against width and RLCT; an AW where a run
    # collapsed is left out of that sweep's line (its width and RLCT mean nothing)
    (label, ours), (blabel, theirs) = F.tradeoff_points(mine)
    assert (label, blabel) == ("mine (target hidden)", "other (target embedding)")
    row, h = mine["table"]["rows"][0], mine["config"]["hidden"]
    point = {k: (row[k + "_mean"], row[k + "_ci95"] or 0.0) for k in ("test_acc", "width", "llc", "active_frac")}
    point["dead_units"] = (row["dead_units_mean"] / h, (row["dead_units_ci95"] or 0.0) / h)  # a share of the layer
    assert ours == [(0.0, point)] == theirs  # both sweeps here are the same runs
    assert mine["beside"]["rows"]["collapsed"] == [[0.0, 0, 2]]
    more = {**row, "aw": 5.0, "test_acc_mean": 50.0, "collapsed": 1}  # as if AW 5 had run too, one seed dead
    two = {**mine, "table": {"rows": [row, more]}, "beside": {**mine["beside"], "rows": {
        k: v + [[5.0, 0, 2] if k == "collapsed" else [5.0, 1.0, None]]
        for k, v in mine["beside"]["rows"].items() if k != "rescale"}}}
    (_, ours), (_, theirs) = F.tradeoff_points(two)
    assert [a for a, _ in ours] == [0.0] and [a for a, _ in theirs] == [0.0, 5.0]
    assert theirs[1][1] == {k: (1.0, 0.0) for k in ("test_acc", "width", "llc", "dead_units", "active_frac")}
    # both counted their units: two more panels at matched accuracy, the dead share and the share on per example
    import matplotlib.pyplot as plt
    fig, axes = F.tradeoff_figure(mine)
    assert [ax.get_title() for ax in axes] == ["width: std of the class rows", "RLCT (SGLD)",
                                               "hidden units dead (share of the layer)",
                                               "hidden units on per example (share)"]
    assert list(axes[2].containers[0].lines[0].get_ydata()) == pytest.approx([point["dead_units"][0]])
    assert list(axes[3].containers[1].lines[0].get_xdata()) == pytest.approx([row["test_acc_mean"]])
    plt.close(fig)
    for k in F.S.UNITS:  # the other sweep did not count them: width and RLCT only
        del mine["beside"]["rows"][k]
    fig, axes = F.tradeoff_figure(mine)
    assert len(axes) == 2
    plt.close(fig)
    for f in ("selfmodel_mine.png", "selfmodel_mine_tradeoff.png"):
        assert (tmp_path / f).stat().st_size > 10_000
        (tmp_path / f).unlink()
    F.main(["--redraw", str(tmp_path / "selfmodel_mine.json"), "--out-dir", str(tmp_path)])
    assert (tmp_path / "selfmodel_mine.png").stat().st_size > 10_000
    assert (tmp_path / "selfmodel_mine_tradeoff.png").stat().st_size > 10_000
    common.write_json(str(tmp_path / "selfmodel_same.json"), F.merge("same", [outs[0]]))
    with pytest.raises(common.UserError, match="merge its runs instead"):
        F.main(["x", outs[0], "--beside", str(tmp_path / "selfmodel_same.json"), "--out-dir", str(tmp_path)])
    other["task"] = "imdb"
    common.write_json(str(tmp_path / "selfmodel_other.json"), other)
    with pytest.raises(common.UserError, match="not a published mnist sweep"):
        F.main(["x", outs[0], "--beside", str(tmp_path / "selfmodel_other.json"), "--out-dir", str(tmp_path)])


def test_figure_has_a_units_panel_when_every_aw_counted_them(split_sweep):
    """The runs counted their units: a fourth panel draws, per AW, the dead units as a share of the width and the
    share on per example (mean and interval over the seeds); an AW without the count leaves the panel out."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    _, outs = split_sweep
    s = F.merge("u", [outs[0]])
    h, row = s["config"]["hidden"], s["table"]["rows"][0]
    fig = F.figure(s)
    try:
        assert len(fig.axes) == 4 and fig.axes[3].get_title() == "hidden units (share of the layer)"
        lines = {c.get_label(): c.lines[0] for c in fig.axes[3].containers}  # errorbar: (data line, caps, bars)
        assert sorted(lines) == [f"dead (of {h})", "on per example"]
        assert list(lines[f"dead (of {h})"].get_ydata()) == pytest.approx([row["dead_units_mean"] / h])
        assert list(lines["on per example"].get_ydata()) == pytest.approx([row["active_frac_mean"]])
    finally:
        plt.close(fig)
    del row["active_frac_mean"]
    fig = F.figure(s)
    assert len(fig.axes) == 3
    plt.close(fig)


def test_rescaled_figure_labels_its_log_axes_with_plain_round_numbers():
    """A narrow span (class rows 0.154 to 0.19, RLCT 25 to 38) gets evenly spaced round ticks, a wide one (0.055 to
    2.3, 14 to 170) 1-2-5 steps; every label a plain number (no 1.6e-01), the minor ticks unlabelled."""
    plt = pytest.importorskip("matplotlib.pyplot")
    for xs, ys, wide in (([0.154, 0.19], [25.0, 38.0], False), ([0.055, 2.3], [14.0, 170.0], True)):
        fig, ax = plt.subplots()
        try:
            ax.plot(xs, ys)
            ax.set_xscale("log")
            ax.set_yscale("log")
            F.plain_log_ticks(ax)
            fig.canvas.draw()
            for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
                ticks = [t for t in axis.get_majorticklocs() if lo <= t <= hi]
                steps = sorted({round(b - a, 12) for a, b in zip(ticks, ticks[1:])})
                assert len(ticks) >= 3 and (len(steps) > 1) == wide, (ticks, steps)  # even steps when narrow
                mantissa = [t / 10 ** math.floor(math.log10(t) + 1e-9) for t in ticks]  # round: 1, 2 or 5 when
                assert all(round(m) in (1, 2, 5) and m == pytest.approx(round(m)) if wide  # wide, two digits when not
                           else m * 10 == pytest.approx(round(m * 10)) for m in mantissa), ticks
                labels = [t.get_text() for t in axis.get_ticklabels() if lo <= t.get_position()[axis is ax.yaxis] <= hi]
                assert len(labels) == len(ticks) and all(re.fullmatch(r"\d+(\.\d+)?", t) for t in labels), labels
                assert {t.get_text() for t in axis.get_ticklabels(minor=True)} <= {""}
        finally:
            plt.close(fig)


def rescaled_sweep(aux, cells):
    """A published --llc-rescale sweep, only the fields --rescaled reads. cells: (aw, seed, {c: (width, RLCT)}),
    c = 1 the network as trained."""
    return {"config": {"aux": aux}, "runs": {
        f"aw={aw:g},seed={seed}": {"aw": aw, "seed": seed, "width": est[1.0][0], "llc": est[1.0][1],
                                   "llc_rescale": {f"c={c:g}": {"width": w, "llc": m}
                                                   for c, (w, m) in est.items() if c != 1.0}}
        for aw, seed, est in cells}}


def test_matched_pairs_compare_each_network_with_the_plain_one_at_its_head_width():
    """--rescaled's matched lines, by hand: a network's estimate at c against AW 0's at the c of the same mean
    class-row width (within 2%), as per-seed RLCT ratios over the seeds both hold; AW 0 is one network whatever
    --aux says, and the same (c, seed) read otherwise in two files is refused."""
    plain = rescaled_sweep("self-model", [(0.0, 0, {1.0: (0.2, 10.0), 0.5: (0.4, 20.0)}),
                                          (0.0, 1, {1.0: (0.2, 12.0), 0.5: (0.4, 24.0)})])
    penalty = rescaled_sweep("act-l2", [(3.0, 0, {1.0: (0.4, 15.0), 2.0: (0.2, 5.0), 0.9: (0.4082, 1.0)}),
                                        (3.0, 1, {1.0: (0.4, 18.0), 2.0: (0.2, 12.0), 0.9: (0.4082, 1.0)}),
                                        (3.0, 2, {1.0: (0.4, 99.0), 2.0: (0.2, 99.0), 0.9: (0.4082, 1.0)})])  # no AW 0 s2
    again = rescaled_sweep("act-l2", [(0.0, 1, {1.0: (0.2, 12.0)})])  # AW 0 published with the penalty: one network
    got = F.matched_pairs([plain, penalty, again])
    assert [(m["network"], m["c"], m["c_plain"], m["seeds"], m["below"]) for m in got] == [
        ("aux act-l2, AW 3", 1.0, 0.5, [0, 1], 2), ("aux act-l2, AW 3", 2.0, 1.0, [0, 1], 1)]  # 0.4082: 2.05% off
    # seed 2 has no AW 0 (its 99 would show); ratios 15/20, 18/24 = 0.75 twice; 5/10, 12/12 = 0.5, 1: sd 0.3536
    assert got[0]["llc_ratio"]["mean"] == pytest.approx(0.75) and got[0]["llc_ratio"]["ci95"] == pytest.approx(0)
    assert got[1]["llc_ratio"]["mean"] == pytest.approx(0.75)
    assert got[1]["llc_ratio"]["ci95"] == pytest.approx(12.706205 * 0.3535534 / 2 ** 0.5, rel=1e-5)
    assert F.matched_line(got[0]) == ("At class-row width 0.4000: aux act-l2, AW 3 (c = 1) reads x0.750 ± 0.000 of "
                                      "the plain network's RLCT (AW 0 at c = 0.5, 0.4000) per seed, 2 of 2 seeds below 1.")
    wider = F.matched_pairs([plain, penalty, again], tol=0.03)  # --match-tol 0.03 takes in the c = 0.9 estimate
    assert [(m["c"], m["c_plain"]) for m in wider] == [(0.9, 0.5), (1.0, 0.5), (2.0, 1.0)]
    assert wider[0]["llc_ratio"]["mean"] == pytest.approx((1 / 20 + 1 / 24) / 2) and wider[0]["below"] == 2
    assert F.matched_pairs([penalty]) == []  # no plain network to match
    with pytest.raises(common.UserError, match="AW 0 at c = 1, seed 1 differs between files"):
        F.matched_pairs([plain, rescaled_sweep("act-l2", [(0.0, 1, {1.0: (0.2, 12.5)})])])


def test_rescaled_readings_keep_two_targets_of_one_loss_and_aw_apart():
    """IMDB's self-model of the hidden layer and of the embedding, both at AW 100: two networks, named by their
    target where it is not the task's default, each read against the one plain network (AW 0 never differs)."""
    def on(target, sweep):
        sweep["config"].update(task="imdb", target=target)
        return sweep

    plain = on("hidden", rescaled_sweep("self-model", [(0.0, 0, {1.0: (2.0, 14.0), 2.75: (0.73, 7.5)})]))
    hidden = on("hidden", rescaled_sweep("self-model", [(100.0, 0, {1.0: (1.6, 11.0), 0.8: (2.0, 13.0)})]))
    emb = on("embedding", rescaled_sweep("self-model", [(100.0, 0, {1.0: (0.8, 5.0), 0.4: (2.0, 10.0)})]))
    got = {m["network"]: m for m in F.seedwise_pairs([plain, hidden, emb])}
    assert sorted(got) == ["aux self-model of embedding, AW 100", "aux self-model, AW 100"]
    assert got["aux self-model, AW 100"]["at_plain"]["mean"] == pytest.approx(13.0 / 14.0)  # its c = 0.8 is at w 2
    assert got["aux self-model of embedding, AW 100"]["at_plain"]["mean"] == pytest.approx(10.0 / 14.0)
    # the figure's lines are named the same way (rescaled_curves): the penalty too, and a config of old without --target
    assert F.network_label({"task": "imdb", "target": "embedding", "aux": "act-l2"}, "10") == "aux act-l2 of embedding, AW 10"
    assert F.network_label({"task": "mnist", "target": "hidden"}, 0.1) == "aux self-model, AW 0.1"
    assert F.network_label({"aux": "act-l2"}, 3.0) == "aux act-l2, AW 3"


def test_seedwise_pairs_read_each_network_at_the_other_one_s_head_by_hand():
    """--rescaled's seed-by-seed lines: each seed's estimates of one network joined straight in log-log (a power
    law between two, piecewise between more, the end pair's line beyond), read at the other network's trained
    head width; by hand for power laws whose ratios are known."""
    assert F.loglog_at([(1.0, 10.0), (4.0, 20.0)], 2.0) == (pytest.approx(10 * 2 ** 0.5), 1.0)  # slope 1/2
    assert F.loglog_at([(4.0, 20.0), (1.0, 10.0)], 16.0) == (pytest.approx(40.0), 4.0)  # beyond: the same line
    assert F.loglog_at([(1.0, 10.0), (2.0, 20.0), (4.0, 20.0)], 1.5)[0] == pytest.approx(15.0)  # the bracket's
    assert F.loglog_at([(1.0, 10.0), (2.0, 20.0), (4.0, 20.0)], 3.0)[0] == pytest.approx(20.0)
    assert F.loglog_at([(1.0, 10.0), (2.0, 20.0)], 0.5) == (pytest.approx(5.0), 2.0)

    # plain: RLCT = 10 w^0.5 (seed 0) and 12 w^0.5 (seed 1); AW 5: RLCT = 4 w (both seeds), heads 0.25 and 1
    plain = rescaled_sweep("self-model", [(0.0, 0, {1.0: (1.0, 10.0), 4.0: (0.25, 5.0)}),
                                          (0.0, 1, {1.0: (1.0, 12.0), 4.0: (0.25, 6.0)}),
                                          (0.0, 2, {1.0: (1.0, 12.0)})])  # seed 2: no rescaled estimate, left out
    net = rescaled_sweep("self-model", [(5.0, 0, {1.0: (0.25, 1.0), 0.25: (1.0, 4.0)}),
                                        (5.0, 1, {1.0: (1.0, 4.0), 4.0: (0.25, 1.0)}),
                                        (5.0, 2, {1.0: (0.25, 1.0), 0.25: (1.0, 4.0)})])
    (m,) = F.seedwise_pairs([plain, net])
    assert m["network"] == "aux self-model, AW 5" and m["seeds"] == [0, 1]
    # at the plain head (w 1): 4 / 10 and 4 / 12; at the network's own (0.25 and 1): 1 / 5 and 4 / 12
    assert m["at_plain"]["mean"] == pytest.approx((0.4 + 1 / 3) / 2)
    assert m["at_own"]["mean"] == pytest.approx((0.2 + 1 / 3) / 2)
    assert (m["below_plain"], m["below_own"], m["beyond"]) == (2, 2, 1.0)
    assert F.seedwise_line(m).startswith("Seed by seed (each network's estimates joined in log-log): aux self-model, "
                                         "AW 5 reads x0.367 ± ")
    lone = rescaled_sweep("self-model", [(0.0, 0, {1.0: (1.0, 10.0)})])
    assert F.seedwise_pairs([net]) == [] and F.seedwise_pairs([lone, net]) == []  # nothing to read the other at


def test_read_pairs_read_other_networks_against_each_rescaled_one_at_their_own_head_by_hand(tmp_path):
    """--rescaled --read: the trained cells of a sweep without rescalings, each read against each rescaled
    network's estimates of its seed joined in log-log at the cell's own head width; a cell of the reference's own
    network, or of a seed the reference holds fewer than two estimates of, is left out; other task or hidden
    width refused; the cells drawn beside the lines (not those already a line)."""
    def imdb(sweep, name="s"):
        sweep.update(name=name, task="imdb")
        sweep["config"].update(task="imdb", hidden=128)
        return sweep

    # plain: RLCT = 10 w^0.5 (seed 0), 12 w^0.5 (seed 1); AW 100: RLCT = 4 w (seed 0), 5 w (seed 1)
    plain = imdb(rescaled_sweep("self-model", [(0.0, 0, {1.0: (1.0, 10.0), 4.0: (0.25, 5.0)}),
                                               (0.0, 1, {1.0: (1.0, 12.0), 4.0: (0.25, 6.0)})]))
    ref = imdb(rescaled_sweep("self-model", [(100.0, 0, {1.0: (0.5, 2.0), 0.25: (2.0, 8.0)}),
                                             (100.0, 1, {1.0: (0.5, 2.5)})]))  # seed 1: one estimate only
    read = imdb(rescaled_sweep("self-model", [(50.0, 0, {1.0: (0.25, 1.5)}), (50.0, 1, {1.0: (1.0, 6.0)}),
                                              (100.0, 0, {1.0: (0.5, 99.0)}), (0.0, 0, {1.0: (1.0, 11.0)})]), "aws")
    got = {m["reference"]: m for m in F.read_pairs([plain, ref], read)}
    assert sorted(got) == ["aux self-model, AW 100", "plain network (AW 0)"]
    vs_plain = {r["aw"]: r for r in got["plain network (AW 0)"]["rows"]}
    assert sorted(vs_plain) == [50.0, 100.0]  # AW 0 is the plain network itself
    # AW 50 seed 0 at w 0.25: 1.5 / 5; seed 1 at w 1: 6 / 12; AW 100 seed 0 at w 0.5: 99 / (10 * 0.5 ** 0.5)
    assert vs_plain[50.0]["ratios"] == pytest.approx([0.3, 0.5]) and vs_plain[50.0]["below"] == 2
    assert vs_plain[50.0]["ratio"]["mean"] == pytest.approx(0.4)
    assert vs_plain[100.0]["ratios"] == pytest.approx([99 / (10 * 0.5 ** 0.5)]) and vs_plain[100.0]["below"] == 0
    vs_ref = {r["aw"]: r for r in got["aux self-model, AW 100"]["rows"]}
    assert sorted(vs_ref) == [0.0, 50.0]  # AW 100 is the reference itself; only seed 0 has two estimates
    # at w 0.25 the line 4 w reads 1 (half the narrowest estimate's width: x2 beyond); at w 1 it reads 4
    assert (vs_ref[50.0]["seeds"], vs_ref[50.0]["ratios"], vs_ref[50.0]["beyond"]) == ([0], [1.5], 2.0)
    assert vs_ref[0.0]["ratios"] == pytest.approx([11.0 / 4.0])
    line = F.read_line(got["plain network (AW 0)"])
    assert line == ("Read at its own head width against plain network (AW 0) (its estimates of each seed joined in "
                    "log-log), aws's RLCT is: AW 50 x0.40 ± 1.27 (x0.30-0.50, 2 of 2 below 1); AW 100 x14.00 "
                    "(x14.00-14.00, 0 of 1 below 1); widths read up to x1.00 beyond the estimates.")
    curves = {"plain network (AW 0)": [], "aux self-model, AW 100": []}  # rescaled_curves' lines, by their names
    assert F.read_cells(read, curves) == {"aux self-model, AW 50": [(0.25, 1.5), (1.0, 6.0)]}
    other = rescaled_sweep("self-model", [(50.0, 0, {1.0: (0.25, 1.5)})])
    other.update(name="mnist")
    other["config"].update(task="mnist", hidden=64)
    with pytest.raises(common.UserError, match="--read: mnist is not a imdb sweep at hidden 128"):
        F.read_pairs([plain, ref], other)
    with pytest.raises(common.UserError, match="--read goes with --rescaled"):
        F.main(["x", "y", "--read", "z.json", "--out-dir", str(tmp_path)])


def test_against_compares_the_cells_two_sweeps_of_one_setting_share(split_sweep, tmp_path):
    """--against: per AW, the cells (AW, seed) both sweeps measured, how many repeat the other to the stored digit
    in accuracy, width and RLCT, and the largest differences; kept in the JSON; other settings or no shared cell
    are refused."""
    _, outs = split_sweep
    other = F.merge("there", [outs[0]])  # AW 0, seeds 0 and 1: as if published from another CPU
    other["cpu_model"] = "Some CPU"
    other["runs"]["aw=0,seed=1"]["test_acc"] += 0.3  # seed 1 came out otherwise there
    other["runs"]["aw=0,seed=1"]["llc"] -= 2.0
    common.write_json(str(tmp_path / "there.json"), other)
    F.main(["here", outs[0], "--against", str(tmp_path / "there.json"), "--out-dir", str(tmp_path)])
    here = json.load(open(tmp_path / "selfmodel_here.json"))
    (row,) = here["against"]["rows"]
    assert (row["aw"], row["n"], row["same"], row["width_max_diff"]) == (0.0, 2, 1, 0.0)
    assert row["test_acc_max_diff"] == pytest.approx(0.3) and row["llc_max_diff"] == pytest.approx(2.0)
    line = ("Against there (Some CPU), the same cells: AW 0: 1 of 2 repeat it, largest difference 0.30 points, "
            "0.0000 width, 2.0 RLCT.")
    assert F.against_line(here) == line and line in F.markdown(here).splitlines()
    assert F.against_line(F.merge("alone", [outs[0]])) == ""
    # a sweep with extra estimates (here the AW 5 run's calibration grid) still holds the cells of one without
    plain = tmp_path / "aw5_plain"
    plain.mkdir()
    common.write_json(str(plain / "results.json"), without_grid(outs[1]))
    common.write_json(str(tmp_path / "plain.json"), F.merge("plain", [str(plain)]))
    F.main(["grid", outs[1], "--against", str(tmp_path / "plain.json"), "--out-dir", str(tmp_path)])
    (row,) = json.load(open(tmp_path / "selfmodel_grid.json"))["against"]["rows"]
    assert (row["aw"], row["n"], row["same"], row["llc_max_diff"]) == (5.0, 2, 2, 0.0)
    other["config"]["lr"] = 1.0
    common.write_json(str(tmp_path / "there.json"), other)
    with pytest.raises(common.UserError, match="differs in lr"):
        F.main(["x", outs[0], "--against", str(tmp_path / "there.json"), "--out-dir", str(tmp_path)])
    other["config"]["lr"] = here["config"]["lr"]
    other["runs"] = {k.replace("seed=", "seed=1"): c for k, c in other["runs"].items()}  # seeds 10 and 11
    common.write_json(str(tmp_path / "there.json"), other)
    with pytest.raises(common.UserError, match="none of this sweep's cells"):
        F.main(["x", outs[0], "--against", str(tmp_path / "there.json"), "--out-dir", str(tmp_path)])


def test_paper_levels_only_for_the_papers_protocol_and_measured_aws():
    """The paper's numbers are drawn only where our run is its protocol, and only at the AWs we measured."""
    def summary(task, preset, aws, *flags):
        return {"task": task, "config": vars(F.S.get_args(["--task", task, "--preset", preset, *flags])),
                "table": {"rows": [{"aw": a} for a in aws]}}
    assert F.paper_levels(summary("imdb", "paper", [0, 1, 500])) == {
        "test_acc": [(0.0, 82.0), (500.0, 83.6)], "llc": [(0.0, 13.7), (500.0, 5.2)]}  # AW 1: no number
    assert F.paper_levels(summary("imdb", "paper", [0.5, 2])) == {}
    assert F.paper_levels(summary("imdb", "quick", [0, 100, 500])) == {}  # 50 epochs: other levels
    assert F.paper_levels(summary("mnist", "paper", [0, 100, 500])) == {}
    for flags in (["--epochs", "50"], ["--target", "embedding"], ["--aux", "act-l2"], ["--train-subset", "1000"],
                  ["--lr", "0.05"]):
        assert F.paper_levels(summary("imdb", "paper", [0, 500], *flags)) == {}, flags  # trained otherwise
    imdb_paper = json.load(open(os.path.join(ROOT, "results", "selfmodel_imdb_paper.json")))
    assert F.papers_protocol(imdb_paper["config"]) and imdb_paper["paper_levels"]  # the published one still is


def test_figure_draws_the_papers_levels_beside_ours():
    pytest.importorskip("matplotlib", reason="matplotlib is the optional figure extra (requirements-figures.txt)")
    import matplotlib.pyplot as plt
    with open(os.path.join(ROOT, "results", "selfmodel_imdb_paper.json")) as fh:
        s = json.load(fh)
    paper = F.paper_levels(s)
    for preset, panels in (("paper", {0: "test_acc", 2: "llc"}), ("quick", {})):
        s["config"]["preset"] = preset
        fig = F.figure(s)
        try:
            for i, ax in enumerate(fig.axes[:3]):
                drawn = [ln for ln in ax.get_lines() if ln.get_label() == "paper (its figure)"]
                if i in panels:
                    assert len(drawn) == 1 and list(zip(*drawn[0].get_data())) == paper[panels[i]]
                    lo, hi = ax.get_ylim()
                    assert all(lo < v < hi for _, v in paper[panels[i]])  # on the axis, not clipped
                else:
                    assert drawn == []
        finally:
            plt.close(fig)


def test_bad_inputs_give_one_line(split_sweep, tmp_path):
    p = run_script([os.path.join("results", "selfmodel_figures.py"), "x", str(tmp_path / "missing")])
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    out = split_sweep[1][0]
    for flag in ("--beside", "--against", "--redraw"):  # an output folder where a published JSON is asked for
        with pytest.raises(common.UserError, match=f"{flag} {out} is not a published selfmodel sweep"):
            F.main(["x", out, flag, out, "--out-dir", str(tmp_path)])


def test_widths_figure_and_table(split_sweep, tmp_path):
    """--widths lines up published sweeps by hidden width, one row per (AW, width) for AWs seen at two or more
    widths, and refuses files that differ in anything else."""
    _, outs = split_sweep
    s = F.merge("h", [outs[0]])  # AW 0, 2 seeds
    files = []
    for h, shift in ((32, 0.0), (64, 1.0)):
        t = json.loads(json.dumps(s))
        t["config"]["hidden"] = h
        t["table"]["rows"][0]["test_acc_mean"] += shift
        files.append(str(tmp_path / f"h{h}.json"))
        common.write_json(files[-1], t)
    sweeps = F.by_width(files[::-1])
    assert list(sweeps) == [32, 64]
    table = F.widths_markdown(sweeps).splitlines()
    acc = s["table"]["rows"][0]["test_acc_mean"]
    assert len(table) == 4 and table[2].startswith(f"| 32 | 0 | 2 | {acc:.2f} ± ")
    assert table[3].startswith(f"| 64 | 0 | 2 | {acc + 1:.2f} ± ")
    # the runs counted their units: two more columns, dead units and the share on per example, mean ± interval
    cells = list(s["runs"].values())
    dead, on = common.mean_ci([c["dead_units"] for c in cells]), common.mean_ci([c["active_frac"] for c in cells])
    assert table[0].endswith("| collapsed | dead units | on per example |") and table[1].count("|") == 10
    assert table[2].endswith(f"| 0/2 | {dead['mean']:.1f} ± {dead['ci95']:.1f} | {on['mean']:.3f} ± {on['ci95']:.3f} |")
    t = json.load(open(files[0]))
    for k in ("dead_units_mean", "dead_units_ci95"):
        del t["table"]["rows"][0][k]  # one width without the count: no units columns at all
    common.write_json(files[0], t)
    plain = F.widths_markdown(F.by_width(files)).splitlines()
    assert plain[0].endswith("| collapsed |") and plain[2] == table[2].rsplit(" | 0/2 |", 1)[0] + " | 0/2 |"
    common.write_json(files[0], s | {"config": {**s["config"], "hidden": 32}})
    with pytest.raises(common.UserError, match="same hidden width"):
        F.by_width([files[0], files[0]])
    t = json.load(open(files[1]))
    t["config"]["lr"] = 1.0
    common.write_json(files[1], t)
    with pytest.raises(common.UserError, match="differs .* in lr"):
        F.by_width(files)
    if importlib.util.find_spec("matplotlib"):  # the figure itself needs the optional extra
        t["config"]["lr"] = s["config"]["lr"]
        common.write_json(files[1], t)
        F.main(["--widths", "w", *files, "--out-dir", str(tmp_path)])
        png = tmp_path / "selfmodel_w.png"
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000


def test_steps_reads_each_network_against_the_plain_one_at_its_learning_rate_by_hand(split_sweep, tmp_path):
    """--steps: per learning rate, each AW's width and RLCT as ratios of the same sweep's AW 0 on the same seed,
    placed at lr x AW; a seed without its AW 0 is left out; sweeps differing in more than lr, or trained with
    Adam, are refused in one line."""
    _, outs = split_sweep
    s = F.merge("h", [outs[0]])
    def sweep(lr, cells, **cfg):
        t = json.loads(json.dumps(s))
        t["config"].update(lr=lr, **cfg)
        t["runs"] = {f"aw={aw:g},seed={seed}": {"aw": aw, "seed": seed, "width": w, "llc": m} for aw, seed, w, m in cells}
        f = str(tmp_path / f"lr{lr:g}{''.join(cfg)}.json")
        common.write_json(f, t)
        return f
    fast = sweep(0.1, [(0.0, 0, 2.0, 10.0), (0.0, 1, 2.0, 12.0), (100.0, 0, 1.0, 5.0), (100.0, 1, 1.0, 6.0),
                       (200.0, 0, 1.5, 7.0)])
    slow = sweep(0.05, [(0.0, 0, 1.0, 10.0), (200.0, 0, 0.5, 3.5), (200.0, 3, 9.0, 99.0)])  # seed 3: no AW 0
    sweeps = F.by_lr([fast, slow])
    assert list(sweeps) == [0.05, 0.1]
    pts = {(p["lr"], p["aw"]): p for p in F.step_points(sweeps)}
    assert sorted(pts) == [(0.05, 200.0), (0.1, 100.0), (0.1, 200.0)]
    assert pts[0.05, 200.0]["step"] == pytest.approx(10.0) and pts[0.05, 200.0]["seeds"] == [0]
    assert pts[0.05, 200.0]["width"] == [0.5] and pts[0.05, 200.0]["llc"] == [0.35]
    assert pts[0.05, 200.0]["llc_abs"] == [3.5] and pts[0.1, 100.0]["llc_abs"] == [5.0, 6.0]  # the RLCT itself
    assert pts[0.1, 100.0]["width"] == [0.5, 0.5] and pts[0.1, 100.0]["llc"] == [0.5, 0.5]
    assert pts[0.1, 200.0]["step"] == pytest.approx(20.0) and pts[0.1, 200.0]["llc"] == [0.7]
    line = F.steps_line(F.step_points(sweeps))
    # ordered by lr x AW: the two points at 10 (lr 0.05 first), then 20; n = 2 with no spread: ± 0.00
    assert line.endswith(": lr 0.05 AW 200: 10, RLCT x0.35, width x0.50 (1 seed); lr 0.1 AW 100: 10, RLCT x0.50 "
                         "± 0.00, width x0.50 ± 0.00 (2 seeds); lr 0.1 AW 200: 20, RLCT x0.70, width x0.75 (1 seed).")
    with pytest.raises(common.UserError, match="differs .* in momentum"):
        F.by_lr([fast, sweep(0.05, [(0.0, 0, 1.0, 10.0)], momentum=0.5)])
    with pytest.raises(common.UserError, match="two files have the same learning rate"):
        F.by_lr([fast, fast])
    adam = [sweep(lr, [(0.0, 0, 1.0, 10.0)], optimizer="adam", q="") for lr in (1e-3, 1e-4)]
    with pytest.raises(common.UserError, match="--steps: these sweeps trained with adam"):
        F.by_lr(adam)
    p = run_script([os.path.join("results", "selfmodel_figures.py"), "--steps", "x", fast, "--out-dir", str(tmp_path)])
    assert p.returncode == 2 and "two or more" in p.stderr and "Traceback" not in p.stderr
    if importlib.util.find_spec("matplotlib"):
        quarter = sweep(0.025, [(0.0, 0, 1.0, 10.0), (400.0, 0, 0.4, 3.0)])  # three lrs: one labelled above
        F.main(["--steps", "st", fast, slow, quarter, "--out-dir", str(tmp_path)])
        png = tmp_path / "selfmodel_st.png"
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000


def published_sweeps():
    return sorted(f for f in os.listdir(os.path.join(ROOT, "results"))
                  if f.startswith("selfmodel_") and f.endswith(".json"))


@pytest.mark.parametrize("name", published_sweeps())
def test_readme_tables_are_the_committed_json(name):
    """Every README table row of a published sweep is what the publisher prints from the committed JSON today:
    a number edited by hand in the README, or a JSON republished without updating the README, fails here."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    with open(os.path.join(ROOT, "results", name)) as fh:
        s = json.load(fh)
    assert f"results/{name.removesuffix('.json')}" in readme or name in readme, f"{name} is not cited in README"
    table = F.calibration_markdown(s) if s["config"].get("llc_grid_eps") else \
        F.rescale_markdown(s) if s["config"].get("llc_rescale") else F.markdown(s)  # each sweep's own table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows and [r for r in rows if r not in readme] == []


@pytest.mark.parametrize("name", published_sweeps())
def test_a_published_sweep_merges_back_to_itself(name):
    """A published JSON fed back to the publisher (how a sweep grows by later seeds) gives back its provenance and
    its cost: the cells' training + RLCT minutes, the processes' wall minutes, commands, commits, torch, device."""
    with open(os.path.join(ROOT, "results", name)) as fh:
        pub = json.load(fh)
    again = F.merge(pub["name"], [os.path.join(ROOT, "results", name)])
    for k in ("wall_minutes", "commands", "git_commits", "torch", "device", "cpu_kernels"):
        assert again[k] == pub.get(k, []), k  # cpu_kernels: [] for the sweeps published before it was recorded
    if "cell_minutes" in pub:  # since the sweeps recorded it
        assert again["cell_minutes"] == pub["cell_minutes"]
        assert again["cell_minutes"] > round(sum(c["train_seconds"] for c in pub["runs"].values()) / 60, 1)


def test_readme_cites_only_files_that_exist():
    import re
    with open(os.path.join(ROOT, "README.md")) as fh:
        cited = set(re.findall(r"\bresults/[a-z0-9_.-]+\.(?:png|json)\b", fh.read()))  # NAME: a placeholder
    assert cited and sorted(f for f in cited if not os.path.exists(os.path.join(ROOT, f))) == []


def test_paired_by_seed_against_aw0_by_hand():
    """Gains and ratios pair each seed with its own AW 0 run; a seed without one is left out."""
    def cell(aw, seed, acc, width, llc):
        return {"aw": aw, "seed": seed, "test_acc": acc, "width": width, "llc": llc}
    runs = [cell(0.0, 0, 80.0, 2.0, 10.0), cell(0.0, 1, 81.0, 2.0, 10.0), cell(0.0, 2, 82.0, 4.0, 10.0),
            cell(5.0, 0, 81.0, 1.0, 5.0), cell(5.0, 1, 81.0, 1.0, 10.0), cell(5.0, 2, 84.0, 2.0, 15.0),
            cell(5.0, 3, 99.0, 9.0, 99.0),  # no AW 0 run at seed 3: not paired
            cell(7.0, 1, 80.0, 1.0, 20.0)]
    s = {"runs": {f"aw={c['aw']},seed={c['seed']}": c for c in runs}}
    p = F.paired(s)
    assert sorted(p) == [5.0, 7.0] and p[5.0]["seeds"] == [0, 1, 2]
    # gains 1, 0, 2: mean 1, sample sd 1, t(0.975, 2) = 4.3027 -> half width 4.3027 / sqrt(3) = 2.4842
    g = p[5.0]["test_acc_gain"]
    assert g["mean"] == pytest.approx(1.0) and g["ci95"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    assert p[5.0]["above_zero"] == 2  # a tie is not a gain
    assert p[5.0]["width_ratio"]["mean"] == pytest.approx(0.5) and p[5.0]["width_ratio"]["ci95"] == 0
    assert p[5.0]["llc_ratio"]["mean"] == pytest.approx(1.0)  # ratios 0.5, 1, 1.5
    line = F.paired_line(s)
    assert ("AW 5: test_acc +1.00 ± 2.48 points (2 of 3 seeds above 0), width x0.500 ± 0.000, "
            "llc x1.000 ± 1.242; AW 7: test_acc -1.00 points (0 of 1 seeds above 0), width x0.500, llc x2.000.") in line
    assert line in F.markdown({**s, "table": {"rows": []}}).splitlines()
    no_base = {"runs": {k: c for k, c in s["runs"].items() if c["aw"] != 0.0}}
    assert F.paired(no_base) == {} and F.paired_line(no_base) == ""
    assert not any(ln.startswith("Paired") for ln in F.markdown({**no_base, "table": {"rows": []}}).splitlines())


def test_readme_paired_lines_are_the_committed_json():
    """A README line of gains paired by seed is what the publisher prints from a committed JSON (the IMDB
    paper-protocol section carries one)."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        lines = [ln for ln in fh.read().splitlines() if ln.startswith("Paired by seed")]
    printed = {}
    for name in published_sweeps():
        with open(os.path.join(ROOT, "results", name)) as fh:
            printed[name] = F.paired_line(json.load(fh))
    assert printed["selfmodel_imdb_paper.json"] in lines
    assert [ln for ln in lines if ln not in printed.values()] == []


def test_units_of_older_runs_are_measured_from_their_checkpoints(split_sweep, data_dir, tmp_path):
    """results/selfmodel_units.py gives a run made before selfmodel.py measured its units the numbers the run would
    have recorded (the checkpointed last cell only), and the publisher's units line takes an AW only when every run
    of it has them; a checkpoint whose accuracy is not the run's, or a folder without one, is refused."""
    import shutil
    import selfmodel_units as U
    _, outs = split_sweep
    own = json.load(open(os.path.join(outs[0], "results.json")))["metrics"]["runs"]  # AW 0, seeds 0 and 1
    old = tmp_path / "old"
    shutil.copytree(outs[0], old)
    res = json.load(open(old / "results.json"))
    for cell in res["metrics"]["runs"].values():
        for k in S_UNITS:
            del cell[k]
    common.write_json(str(old / "results.json"), res)
    U.main([str(old), "--data-dir", data_dir, "--device", "cpu"])
    res = json.load(open(old / "results.json"))
    runs = res["metrics"]["runs"]
    assert {k: runs["aw=0,seed=1"][k] for k in S_UNITS} == {k: own["aw=0,seed=1"][k] for k in S_UNITS}
    assert not any(k in runs["aw=0,seed=0"] for k in S_UNITS) and list(res["units_measured"]) == ["aw=0,seed=1"]
    assert F.units_line(F.merge("old", [str(old)])) == ""  # seed 0 unmeasured: no mean over half the runs
    line = F.units_line(F.merge("own", [outs[0]]))
    dead = [own[f"aw=0,seed={s}"]["dead_units"] for s in (0, 1)]
    assert line.startswith("Units feeding the class rows (32, ReLU)") and f"AW 0: {sum(dead) / 2:.1f} ± " in line
    assert line in F.markdown(F.merge("own", [outs[0]])).splitlines()
    ck = torch.load(old / "ckpt.pt", weights_only=False)
    ck["done"]["aw=0,seed=1"]["test_acc"] += 1.0
    torch.save(ck, old / "ckpt.pt")
    with pytest.raises(common.UserError, match="not the run's"):
        U.main([str(old), "--data-dir", data_dir, "--device", "cpu"])
    (old / "ckpt.pt").unlink()
    with pytest.raises(common.UserError, match="no ckpt.pt"):
        U.main([str(old), "--data-dir", data_dir, "--device", "cpu"])


@pytest.mark.parametrize("start, line_of", [("Units feeding the class rows", "units_line"), ("Against ", "against_line")])
def test_readme_units_and_against_lines_are_the_committed_json(start, line_of):
    """A README line of the units feeding the class rows, or of the cells shared with a sweep made elsewhere, is
    what the publisher prints from a committed JSON."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        lines = [ln for ln in fh.read().splitlines() if ln.startswith(start)]
    printed = set()
    for name in published_sweeps():
        with open(os.path.join(ROOT, "results", name)) as fh:
            printed.add(getattr(F, line_of)(json.load(fh)))
    assert [ln for ln in lines if ln not in printed] == []


def test_readme_trend_lines_are_the_committed_json():
    """Each README "Trend in AW" line opens with a trend line the publisher prints from a committed JSON (a few go
    on with a sentence of their own after it)."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        lines = [ln for ln in fh.read().splitlines() if ln.startswith("Trend in AW")]
    printed = {ln for name in published_sweeps() for ln in F.markdown(_pub(name)).splitlines()
               if ln.startswith("Trend in AW")}
    assert lines and [ln for ln in lines if not any(ln.startswith(p) for p in printed)] == []


def test_markdown_trend_lines_by_hand():
    """The two trend lines read their own entries: all runs from `trend`, the runs that learned from
    `trend_learned`; a constant side (Spearman None) is left out, and p at the permutation floor reads p ≤ 1e-4."""
    row = {"aw": 0.0, "n": 1, "llc_flat": 1, **{f"{k}_{v}": 1.0 for k in ("test_acc", "width", "llc")
                                                 for v in ("mean", "ci95")}}
    table = {"rows": [row], "trend": {"llc": {"spearman": -0.9, "p": 1e-4, "n": 7},
                                      "width": {"spearman": None, "p": None, "n": 7}},
             "trend_learned": {"llc": {"spearman": -0.5, "p": 0.2, "n": 6}}}
    lines = [ln for ln in F.markdown({"table": table, "runs": {}}).splitlines() if ln.startswith("Trend")]
    assert lines == ["Trend in AW, all runs (Spearman over the seeds, permutation p): llc -0.90 (p ≤ 1e-4, n = 7).",
                     "Trend in AW, runs that learned (Spearman over the seeds, permutation p): llc -0.50 (p = 0.2, "
                     "n = 6)."]


def test_readme_matched_lines_are_the_committed_json():
    """Each README `--rescaled` command's matched and seed-by-seed lines (every network against the plain one at
    one head width), and its --read lines, are in the README as it prints them from the committed JSON files, and
    the README has no other."""
    import re
    import shlex
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    printed = []
    for cmd in re.findall(r"^python results/selfmodel_figures.py --rescaled .*$", readme, flags=re.M):
        args = shlex.split(cmd)[4:]
        read = args[args.index("--read") + 1] if "--read" in args else None
        files = [a for a in args if a.endswith(".json") and a != read]
        tol = float(args[args.index("--match-tol") + 1]) if "--match-tol" in args else 0.02
        published = [F.load_published(os.path.join(ROOT, f)) for f in files]
        printed += [F.matched_line(m) for m in F.matched_pairs(published, tol)]
        printed += [F.seedwise_line(m) for m in F.seedwise_pairs(published)]
        if read:
            printed += [F.read_line(m) for m in F.read_pairs(published, F.load_published(os.path.join(ROOT, read)))]
    lines = [ln for ln in readme.splitlines() if ln.startswith(("At class-row width", "Seed by seed", "Read at its own"))]
    assert printed and [ln for ln in printed if ln not in lines] == [] and [ln for ln in lines if ln not in printed] == []


def test_readme_steps_lines_are_the_committed_json():
    """Each README `--steps` command's line is in the README as it prints it from the committed JSON files (files
    that differ in the learning rate alone), and the README has no other."""
    import shlex
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    printed = [F.steps_line(F.step_points(F.by_lr([os.path.join(ROOT, a) for a in shlex.split(cmd)[4:]
                                                   if a.endswith(".json")])))
               for cmd in re.findall(r"^python results/selfmodel_figures.py --steps .*$", readme, flags=re.M)]
    lines = [ln for ln in readme.splitlines() if ln.startswith("By lr x AW")]
    assert printed and sorted(printed) == sorted(lines)

@pytest.mark.parametrize("figure, suffix", [("mnist_widths", ""), ("mnist_intel_widths", "_intel")])
def test_readme_widths_table_is_the_committed_json(figure, suffix):
    """A hidden-width table of the README is what `--widths` prints from the committed per-width JSON files."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    files = [os.path.join(ROOT, "results", f"selfmodel_mnist_h{h}{suffix}.json") for h in (64, 128, 256, 512)]
    if f"results/selfmodel_{figure}.png" not in readme:
        pytest.skip(f"no section of README draws results/selfmodel_{figure}.png")
    rows = [r for r in F.widths_markdown(F.by_width(files)).splitlines() if r.startswith("| ")]
    aws = []
    for f in files:
        with open(f) as fh:
            aws.append({r["aw"] for r in json.load(fh)["table"]["rows"]})
    shared = [a for ws in aws for a in ws if sum(a in other for other in aws) >= 2]  # one row per width that has it
    assert len(shared) >= 3 * len(files) and len(rows) == 1 + len(shared) and [r for r in rows if r not in readme] == []


# ATen's, MKL's and oneDNN's AVX2 kernels (MKL_CBWR: the same results on any AVX2 processor, Intel or AMD);
# run_script adds the one thread
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


# One published cell per CPU maker, each rerun on that maker's CPUs only: MKL picks its kernels by maker, and
# no setting made an Intel Xeon repeat the AMD EPYC cells (README, Determinism). (json, cell, torch it ran on)
BITWISE_CELLS = {
    "AuthenticAMD": ("selfmodel_mnist_h64.json", 64, 15.0, 0, "2.14.1"),  # made on AMD EPYC (README, Determinism)
    "GenuineIntel": ("selfmodel_mnist_h64.json", 64, 25.0, 7, "2.14.1"),  # AW 25-40 joined from an Intel Xeon
}


def test_a_published_cell_reproduces_bit_for_bit(data_dir, tmp_path):
    """The code on main still computes what was published: one cell of a committed MNIST sweep (hidden 64: AW 15,
    seed 0 on AMD, 92.00%; AW 25, seed 7 on Intel, 30.66%, a run that half-learned), run alone
    from its own command (each cell draws from its own (AW, seed)), with the torch release, one thread and the
    AVX2 kernels it ran on (README, Determinism), equals the committed values to the JSON's 5 digits, its RLCT
    trace included. About 35-55 s."""
    need(data_dir, "mnist", "MNIST", "raw", "t10k-images-idx3-ubyte.gz")
    vendor = common.cpuinfo("vendor_id")
    if platform.machine().lower() not in ("x86_64", "amd64") or vendor not in BITWISE_CELLS:
        pytest.skip(f"the published cells ran on x86-64 AVX2 kernels of AMD and Intel CPUs; this is {vendor}")
    name, hidden, aw, seed, made_with = BITWISE_CELLS[vendor]
    pub = json.load(open(os.path.join(ROOT, "results", name)))
    assert made_with in pub["torch"] and ("AMD" if vendor == "AuthenticAMD" else "Intel") in pub["cpu_model"]
    if torch.__version__.split("+")[0] != made_with:
        pytest.skip(f"published with torch {made_with}; this is {torch.__version__}: other rounding")
    key = f"aw={F.S.fmt_aw(aw)},seed={seed}"

    def ran_the_cell(command):
        a = shlex.split(command)
        first, n = int(a[a.index("--seed") + 1]), int(a[a.index("--seeds") + 1])
        return F.S.fmt_aw(aw) in a[a.index("--aw") + 1].split(",") and first <= seed < first + n

    argv = shlex.split(next(c for c in pub["commands"] if ran_the_cell(c)))[1:]
    for flag, value in (("--aw", F.S.fmt_aw(aw)), ("--seed", str(seed)), ("--seeds", "1")):
        argv[argv.index(flag) + 1] = value
    out = tmp_path / "cell"
    p = run_script(argv + ["--data-dir", data_dir, "--out", out], env=AVX2, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    now = json.load(open(out / "results.json"))
    assert now["config"]["hidden"] == hidden and now["cpu"]["kernels"] == "AVX2" and now["cpu"]["threads"] == 1
    for k in ("test_acc", "width", "width_out", "width_all", "llc", "final_loss", "steps", "llc_trace"):
        assert rounded(now["metrics"]["runs"][key][k]) == pub["runs"][key][k], k


def published_commands():
    """(json file, command) for every command a committed results/*.json says produced its numbers."""
    out = []
    for f in sorted(os.listdir(os.path.join(ROOT, "results"))):
        if f.endswith(".json") and f != "sim_flops.json":
            pub = json.load(open(os.path.join(ROOT, "results", f)))
            runs = [r for r in pub.get("runs", []) if isinstance(r, dict) and "command" in r]
            cmds = pub.get("commands") or [r["command"] for r in runs]
            out += [(f, c) for c in cmds]
    return out


@pytest.mark.parametrize("name, command", published_commands(), ids=lambda v: v[:60])
def test_published_commands_still_mean_the_published_settings(name, command):
    """Each published command, parsed by today's script, resolves to the settings its table records: a
    changed default or preset would make the README's command run something else than the table shows."""
    argv = shlex.split(command)
    script = argv[1][:-3]
    mod = importlib.import_module(script)
    args = vars(mod.get_args(argv[2:]) if script == "selfmodel" else mod.parse_args(argv[2:]))
    config = json.load(open(os.path.join(ROOT, "results", name)))["config"]
    ignore = {"llc_grid", "num_tokens", "vocab_size"}  # results (the calibration grid) or set from the data (IMDB)
    if script == "sim_cifar":
        ignore.add("dataset")  # CIFAR-10 always: recorded, not a flag
    if script == "selfmodel" and all(float(a) == 0 for a in args["aw"].split(",")):
        ignore |= F.AT_AW0  # a run of AW 0 alone joins a sweep of another --target / --aux (the plain network)
    differ = {k: (config[k], args.get(k)) for k in config
              if k not in ignore and rounded(args.get(k)) != rounded(config[k])}
    assert not differ, f"{name}: {command}\n(published, parsed today): {differ}"


def test_rescaled_figure_writes_close_labels_apart():
    """Two networks rescaled to nearly one width (the penalty's AW 10 at c = 1 and 1.047, 8 points apart): their
    labels cover neither each other nor the other point, where the default spot (up, right) would; a point alone
    keeps the default; and where every spot is taken the label still gets one, the least covered."""
    fs = 6.5
    assert F.label_box((10.0, 20.0), (4, 4), "1.0", fs) == pytest.approx((14.0, 24.0, 14.0 + 3 * 3.9, 30.5))
    assert F.label_box((10.0, 20.0), (-4, -10), "1.0", fs) == pytest.approx((6.0 - 3 * 3.9, 10.0, 6.0, 16.5))

    def box(anchor, spot, text):
        return F.label_box(anchor, spot[0], text, fs)

    def apart(a, b):
        return min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])

    pts, texts = [(100.0, 100.0), (106.0, 103.0), (300.0, 50.0)], ["1.047", "1", "0.88"]
    default = [box(p, ((4, 4), "left"), t) for p, t in zip(pts, texts)]
    assert not apart(default[0], default[1])  # the case: at the default spots the two labels collide
    spots = F.label_offsets(pts, texts, fs)
    boxes = [box(p, s, t) for p, s, t in zip(pts, spots, texts)]
    marker = [(x - 5.5, y - 5.5, x + 5.5, y + 5.5) for x, y in pts]
    assert apart(boxes[0], boxes[1]) and apart(boxes[0], marker[1]) and apart(boxes[1], marker[0])
    assert spots[2] == ((4, 4), "left")
    # a right-hand spot ends the label at the offset: the alignment follows the sign of x
    assert all((ha == "right") == (dx < 0) for (dx, _), ha in spots)
    # labels of one spot with no markers to keep clear of: each free spot taken once, then still one per label
    n = len(F.LABEL_SPOTS)
    crowd = F.label_offsets([(0.0, 0.0)] * (n + 2), ["10"] * (n + 2), fs, keep_clear=0.0)
    assert len(crowd) == n + 2 and {s for s, _ in crowd[:n]} == set(F.LABEL_SPOTS)


@functools.lru_cache(maxsize=None)
def _pub(name):
    """A committed results/ JSON, read once per session (the tests only read it)."""
    with open(os.path.join(ROOT, "results", name)) as fh:
        return json.load(fh)


EMB_AWS = "selfmodel_imdb_paper_embedding_aws.json"


def _results_row(start):
    """The README Results-table row that begins with `start`."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        return next(ln for ln in fh.read().splitlines() if ln.startswith(start))


def _seeds_said(row, lr):
    """{aw: seeds} as a Results row says them after "(lr LR; ", e.g. "2 seeds at AW 0 and 200, 1 at AW 100 and 300"."""
    said = {}
    for part in re.split(r", (?=\d+ (?:seeds? )?at AW)", re.search(rf"\(lr {re.escape(lr)}; ([^)]*)\)", row).group(1)):
        n, group = re.fullmatch(r"(\d+) (?:seeds? )?at AW (.*)", part).groups()
        said.update({float(a): int(n) for a in re.findall(r"\d+", group)})
    return said


def test_readme_results_row_of_the_lr_test_is_the_committed_json():
    """The Results-table row of the lr 0.05 test is written by hand: its RLCT ratios (at lr 0.05 and at lr 0.1)
    and its seed counts are what the two committed sweeps pair by seed today."""
    row = _results_row("| same at half the learning rate (lr 0.05")
    m = re.search(r"AW (\d+) / (\d+) / (\d+): RLCT as a ratio .*? \| x([0-9.]+) / x([0-9.]+) / x([0-9.]+) "
                  r"\(lr 0\.1: x([0-9.]+) / x([0-9.]+) / x([0-9.]+)\)", row)
    assert m, row
    aws = [float(a) for a in m.groups()[:3]]
    for name, ratios in (("selfmodel_imdb_paper_embedding_lr05.json", m.groups()[3:6]),
                         (EMB_AWS, m.groups()[6:])):
        p = F.paired(_pub(name))
        assert [f"{p[a]['llc_ratio']['mean']:.2f}" for a in aws] == list(ratios), name
    runs = _pub("selfmodel_imdb_paper_embedding_lr05.json")["runs"].values()
    counts = {a: sum(float(c["aw"]) == a for c in runs) for a in [0.0] + aws}
    assert _seeds_said(row, "0.05") == counts


def test_readme_results_row_of_the_quarter_lr_is_the_committed_json():
    """The Results-table row of lr 0.025 is written by hand: its RLCT ratios at lr x AW 5 / 10 / 15, those of lr 0.05
    and lr 0.1 at the same lr x AW beside them, and its seed counts are what the committed sweeps pair by seed."""
    row = _results_row("| same at a quarter of the learning rate (lr 0.025")
    num = r"x([0-9.]+) / x([0-9.]+) / x([0-9.]+)"
    m = re.search(rf"AW (\d+) / (\d+) / (\d+): RLCT as a ratio .*? \| {num} \(lr 0\.05 at AW (\d+) / (\d+) / (\d+): {num}; "
                  rf"lr 0\.1 at AW (\d+) / (\d+) / (\d+): {num}\)", row)
    assert m, row
    g = m.groups()
    for lr, (name, aws, ratios) in {0.025: ("selfmodel_imdb_paper_embedding_lr025.json", g[0:3], g[3:6]),
                                    0.05: ("selfmodel_imdb_paper_embedding_lr05.json", g[6:9], g[9:12]),
                                    0.1: (EMB_AWS, g[12:15], g[15:18])}.items():
        assert [lr * float(a) for a in aws] == pytest.approx([5.0, 10.0, 15.0]), (lr, aws)  # one lr x AW a column
        p = F.paired(_pub(name))
        assert [f"{p[float(a)]['llc_ratio']['mean']:.2f}" for a in aws] == list(ratios), name
    runs = _pub("selfmodel_imdb_paper_embedding_lr025.json")["runs"].values()
    counts = {a: sum(float(c["aw"]) == a for c in runs) for a in {float(c["aw"]) for c in runs}}
    assert _seeds_said(row, "0.025") == counts


def _table_row(name, aw):
    return next(r for r in _pub(name)["table"]["rows"] if r["aw"] == aw)


def _ratios(name, aw):
    p = F.paired(_pub(name))[aw]
    return [f"x{p['width_ratio']['mean']:.2f}", f"x{p['llc_ratio']['mean']:.2f}"]


def _row(name, aw, key, digits):
    r = _table_row(name, aw)
    return f"{r[key + '_mean']:.{digits}f} ± {r[key + '_ci95']:.{digits}f}"


def _gain(name, aw):
    g = F.paired(_pub(name))[aw]["test_acc_gain"]
    return f"{g['mean']:+.2f} ± {g['ci95']:.2f}"


HAND_ROWS = [  # (the row's start, a pattern of the numbers it quotes, what the committed JSON gives for them)
    ("| same: width of the class rows |", r"\(Spearman (-[0-9.]+) over the runs that learned",
     lambda: [f"{_pub('selfmodel_mnist_h64.json')['table']['trend_learned']['width']['spearman']:.2f}"]),
    ("| same: RLCT |", r"\(Spearman (-[0-9.]+) over the runs that learned",
     lambda: [f"{_pub('selfmodel_mnist_h64.json')['table']['trend_learned']['llc']['spearman']:.2f}"]),
    ("| control, not in the paper: an activation penalty AW * mean(h^2) instead of the self-model (MNIST hidden 64",
     r"/ (x[0-9.]+) and (x[0-9.]+) / (x[0-9.]+) and (x[0-9.]+) \(paired, every seed\): the opposite of the self-model "
     r"\(AW 0\.1: (x[0-9.]+), (x[0-9.]+); AW 3: (x[0-9.]+), (x[0-9.]+)\)",
     lambda: [r for k in (0, 1) for r in (_ratios("selfmodel_mnist_h64_actl2.json", 0.1)[k],
                                          _ratios("selfmodel_mnist_h64_actl2.json", 3.0)[k])]
     + _ratios("selfmodel_mnist_h64.json", 0.1) + _ratios("selfmodel_mnist_h64.json", 3.0)),
    ("| self-modeling IMDB, the paper's protocol (500 epochs of plain SGD, 10 seeds), AW 0 -> 100 -> 500",
     r"\| ([0-9.]+ ± [0-9.]+) -> ([0-9.]+ ± [0-9.]+) -> ([0-9.]+ ± [0-9.]+) \(paired over AW 0: ([+-][0-9.]+ ± [0-9.]+) "
     r"and ([+-][0-9.]+ ± [0-9.]+), .*? / ([0-9.]+ ± [0-9.]+) -> ([0-9.]+ ± [0-9.]+) -> ([0-9.]+ ± [0-9.]+) \(Spearman",
     lambda: [_row("selfmodel_imdb_paper.json", a, "test_acc", 2) for a in (0.0, 100.0, 500.0)]
     + [_gain("selfmodel_imdb_paper.json", a) for a in (100.0, 500.0)]
     + [_row("selfmodel_imdb_paper.json", a, "llc", 1) for a in (0.0, 100.0, 500.0)]),
    ("| IMDB's embedding self-model with the authors' 500 epochs of plain SGD (6 seeds)",
     r"\| ([0-9.]+) -> ([0-9.]+) -> ([0-9.]+) \(paired ([+-][0-9.]+ ± [0-9.]+) and ([+-][0-9.]+ ± [0-9.]+), "
     r"6 of 6 seeds each\) / (x[0-9.]+) and (x[0-9.]+) / ([0-9.]+) -> ([0-9.]+) -> ([0-9.]+) \((x[0-9.]+) and (x[0-9.]+),",
     lambda: [f"{_table_row(EMB_AWS, a)['test_acc_mean']:.2f}" for a in (0.0, 100.0, 500.0)]
     + [_gain(EMB_AWS, a) for a in (100.0, 500.0)]
     + [f"x{F.paired(_pub(EMB_AWS))[a]['width_ratio']['mean']:.3f}" for a in (100.0, 500.0)]
     + [f"{_table_row(EMB_AWS, a)['llc_mean']:.1f}" for a in (0.0, 100.0, 500.0)]
     + [f"x{F.paired(_pub(EMB_AWS))[a]['llc_ratio']['mean']:.{d}f}"
        for a, d in ((100.0, 3), (500.0, 2))]),
    ("| same, AW 50 / 150 / 200 / 300 (", r"\((\d+) seeds each\): RLCT \| — \| ([0-9.]+) / ([0-9.]+) / ([0-9.]+) / ([0-9.]+) "
     r"\(AW 100: ([0-9.]+), AW 500: ([0-9.]+)\)",
     lambda: ["/".join(sorted({str(_table_row(EMB_AWS, a)["n"]) for a in (50.0, 150.0, 200.0, 300.0)}))]  # one count
     + [f"{_table_row(EMB_AWS, a)['llc_mean']:.1f}" for a in (50.0, 150.0, 200.0, 300.0, 100.0, 500.0)]),
    ("| control at hidden 512, not in the paper:", r"/ (x[0-9.]+) and (x[0-9.]+) / (x[0-9.]+) and (x[0-9.]+) \(paired",
     lambda: [r for k in (0, 1) for r in (_ratios("selfmodel_mnist_h512_actl2_intel.json", 0.1)[k],
                                          _ratios("selfmodel_mnist_h512_actl2_intel.json", 10.0)[k])]),
]


@pytest.mark.parametrize("start, pattern, expected", HAND_ROWS, ids=[r[0][2:40] for r in HAND_ROWS])
def test_readme_hand_written_results_rows_quote_the_committed_json(start, pattern, expected):
    """Results rows written by hand (trends and paired ratios quoted from the sections below the table) say
    what the committed JSON gives today, rounded to the digits shown: a sweep that grows without its row
    being rewritten fails here."""
    row = _results_row(start)
    m = re.search(pattern, row)
    assert m, row[:200]
    assert list(m.groups()) == expected()
