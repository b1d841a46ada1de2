"""results/publish.py: the helpers every results publisher shares."""
import os, sys

import pytest

import common

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results"))
import publish as P  # noqa: E402


def write(path, **kw):
    os.makedirs(path, exist_ok=True)
    common.write_json(os.path.join(path, "results.json"), {"script": "sim_cifar", "device": "cpu", **kw})
    return str(path)


def test_load_runs_and_same_config(tmp_path):
    a = write(tmp_path / "a", config={"seed": 0, "rho": 0.2, "out": "x", "log_every": 10})
    b = write(tmp_path / "b", config={"seed": 1, "rho": 0.2, "out": "y", "log_every": 50})
    runs = P.load_runs([a, os.path.join(b, "results.json")], "sim_cifar")  # a folder or its file
    assert [r["config"]["seed"] for _, r in runs] == [0, 1]
    assert P.same_config(runs, vary={"seed"}) == {"rho": 0.2}  # what they share; out / log_every never matter
    with pytest.raises(common.UserError, match="differs .* in seed: only nothing may differ"):
        P.same_config(runs)
    c = write(tmp_path / "c", config={"seed": 2, "rho": 0.5})
    with pytest.raises(common.UserError, match="in rho"):
        P.same_config(P.load_runs([a, c], "sim_cifar"), vary={"seed"})
    with pytest.raises(common.UserError, match="not written by mae_decay.py"):
        P.load_runs([a], "mae_decay")
    with pytest.raises(common.UserError, match="does not exist"):
        P.load_runs([str(tmp_path / "missing")], "sim_cifar")
    # a compiled run and an eager one (or a GPU run and a CPU one) time and round differently: never one table
    d = write(tmp_path / "d", config={"seed": 1, "rho": 0.2, "compile": True})
    e = write(tmp_path / "e", config={"seed": 2, "rho": 0.2, "compile": False, "device": "cuda"})
    with pytest.raises(common.UserError, match="in compile"):
        P.same_config(P.load_runs([a, d], "sim_cifar"), vary={"seed"})
    with pytest.raises(common.UserError, match="in compile, device"):
        P.same_config(P.load_runs([d, e], "sim_cifar"), vary={"seed"})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{")
    with pytest.raises(common.UserError, match="not valid JSON"):
        P.load_runs([str(tmp_path / "bad")], "sim_cifar")


def test_pm_rounded_and_device():
    # 3 values 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303 -> half width 4.303 / sqrt(3) = 2.484
    assert P.pm([1.0, 2.0, 3.0]) == "2.00 ± 2.48"
    assert P.pm([0.5], 1, "+") == "+0.5" and P.pm([]) == "-" and P.pm([None, 4.0]) == "4.00"
    assert P.rounded({"a": [1.23456789, 2], "b": 0.000123456789}) == {"a": [1.2346, 2], "b": 0.00012346}
    assert P.device_of({"device": "NVIDIA H100 80GB HBM3"}) == "NVIDIA H100 80GB HBM3"
    assert P.device_of({"device": "cpu (2 cores)"}).startswith("cpu (2 cores)")
    # the CPU a run recorded, not the publishing machine's
    assert P.device_of({"device": "cpu (2 cores)", "cpu": {"model": "Acme 9000"}}) == "cpu (2 cores), Acme 9000"


def test_flag_text_writes_what_parses_back():
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument("--lr", type=float)
    p.add_argument("--aw", type=str)
    acts = {a.dest: a for a in p._actions if a.option_strings and a.dest != "help"}
    cfg = {"compile": False, "smoke": True, "download": False, "lr": 4e-4, "aw": "0,10"}
    argv = [w for k, v in cfg.items() for w in P.flag_text(acts[k], v)]
    assert argv == ["--no-compile", "--smoke", "--no-download", "--lr", "0.0004", "--aw", "0,10"]
    assert vars(p.parse_args(argv)) == cfg
    assert P.flag_text(acts["lr"], None) == [] and P.flag_text(acts["smoke"], False) == []
