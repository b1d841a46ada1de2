"""What a user can get wrong, and how the scripts stop it before work is lost or a number is wrong (issue 15):
--resume with flags that change the experiment, re-running into a finished run, two runs in one folder,
temporary files of killed writes, data folders that must stay untouched, corrupt data files, errors
under torchrun, flags that contradict each other, defaults in --help, one meaning of timing, probe.py's
paths checked before the work."""
import gzip, hashlib, json, os, pickle, signal, subprocess, sys, tarfile, time

import numpy as np
import pytest
import torch

import common
import diffusion_decay as D
import mae_decay as M
import probe as P
import selfmodel as SM
import sim_cifar as S
from conftest import ROOT, assert_clean_error, need, run_script, side_by_side

CPU = common.Dist(0, 0, 1, torch.device("cpu"), True)

# ------------------------------------------------------------------------------------------------
# --resume: every flag that changes the experiment is refused, one by one; only the allow-list passes

# (flag dest) -> (argv of the run, argv of the resume): each pair differs in that one flag
SIM_CHANGES = {
    "sim": ([], ["--sim", "full"]), "rho": ([], ["--rho", "0.5"]), "lam": ([], ["--lam", "0.01"]),
    "latent_dim": ([], ["--latent-dim", "16"]), "baseline": ([], ["--no-baseline"]), "seeds": ([], ["--seeds", "2"]),
    "epochs": ([], ["--epochs", "3"]), "batch_size": ([], ["--batch-size", "32"]), "lr": ([], ["--lr", "0.5"]),
    "warmup_epochs": ([], ["--warmup-epochs", "1"]), "momentum": ([], ["--momentum", "0.5"]),
    "wd": ([], ["--wd", "0.1"]), "label_smoothing": ([], ["--label-smoothing", "0"]), "width": ([], ["--width", "16"]),
    "train_subset": ([], ["--train-subset", "512"]), "test_subset": ([], ["--test-subset", "500"]),
    "eval_every": ([], ["--eval-every", "2"]), "seed": ([], ["--seed", "1"]), "smoke": ([], []),
    "sim_blocks": ([], ["--sim-blocks", "stride1"]),
}
MAE_CHANGES = {
    "preset": ([], ["--preset", "cifar"]), "alpha_min": ([], ["--alpha-min", "0.7"]), "decay": ([], ["--decay", "none"]),
    "decay_where": ([], ["--decay-where", "mlp"]), "skip": ([], ["--no-skip"]), "mask_ratio": ([], ["--mask-ratio", "0.5"]),
    "norm_pix_loss": ([], ["--no-norm-pix-loss"]), "model": ([], ["--model", "vit_tiny"]), "dim": ([], ["--dim", "128"]),
    "depth": ([], ["--depth", "2"]), "heads": ([], ["--heads", "4"]), "mlp_ratio": ([], ["--mlp-ratio", "2"]),
    "dec_dim": ([], ["--dec-dim", "64"]), "dec_depth": ([], ["--dec-depth", "3"]), "dec_heads": ([], ["--dec-heads", "4"]),
    "patch": ([], ["--patch", "4"]), "img_size": ([], ["--img-size", "64"]), "pos_embed": ([], ["--pos-embed", "learned"]),
    "dataset": ([], ["--dataset", "cifar100"]), "n_train": ([], ["--n-train", "128"]),
    "batch_size": ([], ["--batch-size", "16"]), "blr": ([], ["--blr", "1e-3"]), "weight_decay": ([], ["--weight-decay", "0.1"]),
    "epochs": ([], ["--epochs", "3"]), "warmup_epochs": ([], ["--warmup-epochs", "0.5"]),
    "eval_every": ([], ["--eval-every", "2"]), "eval_n_train": ([], ["--eval-n-train", "128"]),
    "eval_n_test": ([], ["--eval-n-test", "64"]), "probe_epochs": ([], ["--probe-epochs", "2"]),
    "seed": ([], ["--seed", "1"]), "smoke": ([], []), "wd_tokens": ([], ["--no-wd-tokens"]),
}
DIFF_CHANGES = {
    "preset": (None, ["--preset", "uvit_s2"]), "dataset": ([], ["--dataset", "cifar100"]),
    "alpha_min": ([], ["--alpha-min", "0.7"]), "cond": ([], ["--cond"]),
    "p_uncond": (["--cond"], ["--cond", "--p-uncond", "0.2"]), "patch": ([], ["--patch", "2"]),
    "dim": ([], ["--dim", "64"]), "depth": ([], ["--depth", "5"]), "heads": ([], ["--heads", "4"]),
    "mlp_ratio": ([], ["--mlp-ratio", "4"]), "batch_size": ([], ["--batch-size", "64"]), "lr": ([], ["--lr", "1e-4"]),
    "wd": ([], ["--wd", "0.1"]), "betas": ([], ["--betas", "0.99,0.999"]), "warmup": ([], ["--warmup", "3"]),
    "ema": ([], ["--ema", "0.99"]), "n_train": ([], ["--n-train", "256"]), "seed": ([], ["--seed", "1"]),
    "smoke": ([], []),
}

SM_CHANGES = {
    "task": ([], ["--task", "imdb"]), "preset": (["--task", "imdb"], ["--task", "imdb", "--preset", "quick"]),
    "aw": ([], ["--aw", "0,5"]), "seeds": ([], ["--seeds", "2"]), "hidden": ([], ["--hidden", "16"]),
    "target": (["--task", "imdb"], ["--task", "imdb", "--target", "embedding"]), "aux": ([], ["--aux", "act-l2"]),
    "llc_rescale": ([], ["--llc-rescale", "2"]), "width": (["--task", "cifar10"], ["--task", "cifar10", "--width", "16"]),
    "vocab_size": (["--task", "imdb"], ["--task", "imdb", "--vocab-size", "100"]),
    "epochs": ([], ["--epochs", "2"]), "batch_size": ([], ["--batch-size", "64"]), "lr": ([], ["--lr", "0.1"]),
    "momentum": ([], ["--momentum", "0.5"]), "normalize": ([], ["--normalize", "dataset"]),
    "train_subset": ([], ["--train-subset", "100"]), "test_subset": ([], ["--test-subset", "100"]),
    "sgld_eps": ([], ["--sgld-eps", "1e-3"]), "sgld_gamma": ([], ["--sgld-gamma", "1"]),
    "sgld_chains": ([], ["--sgld-chains", "3"]), "sgld_draws": ([], ["--sgld-draws", "10"]),
    "sgld_batch": ([], ["--sgld-batch", "64"]), "llc_protocol": ([], ["--llc-protocol", "authors"]),
    "llc_grid_eps": ([], ["--llc-grid-eps", "1e-4", "--llc-grid-gamma", "1"]),
    "llc_grid_gamma": (["--llc-grid-eps", "1e-4", "--llc-grid-gamma", "1"],
                       ["--llc-grid-eps", "1e-4", "--llc-grid-gamma", "10"]),
    "seed": ([], ["--seed", "1"]), "smoke": ([], []),
}


def _sm_cfg(argv):
    return vars(SM.get_args(argv))


def _sim_cfg(argv):
    a = S.parse_args(argv)
    return dict(vars(a), sim=a.sim, seed=a.seed, dataset="cifar10")  # as run() stores it per run


def _mae_cfg(argv):
    return {k: v for k, v in vars(M.parse_args(argv)).items()
            if k not in ("resume", "stop_at_step", "inject_nan_at_step", "dump_grads")}


def _diff_cfg(argv):
    return vars(D.get_args(argv, world_size=1))


SCRIPTS = {"sim_cifar": (S, SIM_CHANGES, _sim_cfg, lambda: S.build_parser()),
           "mae_decay": (M, MAE_CHANGES, _mae_cfg, lambda: M.build_parser()),
           "diffusion_decay": (D, DIFF_CHANGES, _diff_cfg, lambda: D.build_parser()),
           "selfmodel": (SM, SM_CHANGES, _sm_cfg, lambda: SM.build_parser())}
CASES = [(name, dest) for name, (_, table, _, _) in SCRIPTS.items() for dest in table]


@pytest.mark.parametrize("script,dest", CASES)
def test_resume_refuses_every_experiment_flag(script, dest):
    mod, table, cfg_of, _ = SCRIPTS[script]
    run, resume = table[dest]
    if dest == "smoke":  # a full-size run resumed as a smoke run
        old, new = cfg_of([]), cfg_of(["--smoke"])
    elif run is None:  # flags --smoke would override: compare full-size configs
        old, new = cfg_of([]), cfg_of(resume)
    else:
        old, new = cfg_of(["--smoke"] + run), cfg_of(["--smoke"] + resume)
    diff = sorted(k for k in set(old) | set(new) if k not in mod.SAFE_ON_RESUME and old.get(k) != new.get(k))
    assert dest in diff
    with pytest.raises(common.UserError) as e:
        common.check_resume_config(old, new, mod.SAFE_ON_RESUME, "OUT/ckpt.pt")
    msg = str(e.value)
    assert "\n" not in msg and "--resume" in msg and "OUT/ckpt.pt" in msg
    assert all(f"--{k.replace('_', '-')} " in msg for k in diff[:4]), msg  # the differing flags are named


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_is_either_safe_or_tested(script):
    """A new flag is refused on --resume by default; this makes its author add it to one of the lists."""
    mod, table, _, parser = SCRIPTS[script]
    dests = {a.dest for a in parser()._actions} - {"help"}
    assert dests - set(mod.SAFE_ON_RESUME) - set(table) == set()
    assert not set(table) & set(mod.SAFE_ON_RESUME)


SAFE_ARGV = ["--out", "elsewhere", "--device", "cpu", "--compile", "--data-dir", "/x", "--no-download",
             "--stop-at-step", "3", "--log-every", "7", "--ckpt-every", "3"]


@pytest.mark.parametrize("script,extra", [("sim_cifar", ["--bench-steps", "2", "--log-grad-norms"]),
                                          ("mae_decay", ["--eval-batch-size", "64"]),
                                          ("diffusion_decay", ["--iters", "20", "--fid-n", "0", "--steps", "3",
                                                               "--probe-t", "0.2", "--n-test", "100", "--grid", "0",
                                                               "--t-end", "0.001", "--no-denoise"]),
                                          ("selfmodel", ["--ckpt-interval", "5", "--eval-batch", "64"])])  # in seconds
def test_resume_allows_the_documented_safe_flags(script, extra):
    mod, _, cfg_of, _ = SCRIPTS[script]
    argv = ["--smoke"] + (SAFE_ARGV[:-2] if script == "selfmodel" else SAFE_ARGV) + extra  # no --ckpt-every there
    if script == "mae_decay":
        argv.remove("--compile")  # --compile-mode needs it; compile itself is tested by the others
    common.check_resume_config(cfg_of(["--smoke"]), cfg_of(argv), mod.SAFE_ON_RESUME, "OUT/ckpt.pt")


def _fake_ckpt(path, script, cfg):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"script": script, "config": cfg, "model": {}}, path)


@pytest.mark.parametrize("flag,value", [("--lr", "0.5"), ("--lam", "0.01"), ("--wd", "0.1"),
                                        ("--label-smoothing", "0"), ("--momentum", "0.5"), ("--warmup-epochs", "1")])
def test_sim_cifar_resume_with_changed_flag_is_refused(tmp_path, flag, value):
    """The issue's report: `sim_cifar.py --resume --lr 0.5` ran and recorded 0.5 for the whole run."""
    out = tmp_path / "run"
    base = ["--smoke", "--no-baseline", "--out", str(out), "--data-dir", str(tmp_path / "none"), "--no-download"]
    _fake_ckpt(str(out / "rho_seed0" / "ckpt.pt"), "sim_cifar", _sim_cfg(base))
    with pytest.raises(common.UserError, match=f"--resume: .*{flag} "):
        S.main(base + ["--resume", flag, value])


def test_diffusion_resume_with_changed_flag_is_refused(tmp_path):
    out = tmp_path / "run"
    base = ["--smoke", "--out", str(out), "--data-dir", str(tmp_path / "none"), "--no-download"]
    _fake_ckpt(str(out / "ckpt.pt"), "diffusion_decay", _diff_cfg(base))
    with pytest.raises(common.UserError, match="--resume: .*--ema "):
        D.main(base + ["--resume", "--ema", "0.5"])
    with pytest.raises(common.UserError, match="missing"):  # only safe flags changed: on to the (absent) data
        D.main(base + ["--resume", "--iters", "20", "--log-every", "3"])


def test_mae_resume_with_changed_flag_is_refused(data_dir, tmp_path):
    need(data_dir, "cifar10", "cifar-10-batches-py", "test_batch")
    out = tmp_path / "run"
    base = ["--smoke", "--out", str(out), "--data-dir", data_dir]
    _fake_ckpt(str(out / "ckpt.pt"), "mae_decay", _mae_cfg(base))
    with pytest.raises(common.UserError, match="--resume: .*--probe-epochs "):
        M.main(base + ["--resume", "--probe-epochs", "2"])

# ------------------------------------------------------------------------------------------------
# the output folder: no overwrite without --resume, one run at a time, stale temporary files removed


def _mains(tmp_path):
    nodata = ["--data-dir", str(tmp_path / "none"), "--no-download", "--smoke"]
    return {"sim_cifar": (S.main, nodata + ["--no-baseline"], os.path.join("rho_seed0", "ckpt.pt")),
            "mae_decay": (M.main, nodata, "ckpt.pt"),
            "diffusion_decay": (D.main, nodata, "ckpt.pt"),
            "selfmodel": (SM.main, nodata, "ckpt.pt")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_existing_run_is_not_overwritten_without_resume(tmp_path, script):
    main, argv, ckpt = _mains(tmp_path)[script]
    out = tmp_path / "run"
    (out / ckpt).parent.mkdir(parents=True)
    (out / ckpt).write_bytes(b"a finished run")
    with pytest.raises(common.UserError, match="exists: add --resume"):
        main(argv + ["--out", str(out)])
    assert (out / ckpt).read_bytes() == b"a finished run" and not (out / ".lock").exists()


def _holder(out):
    """Another run: a live process holding OUT's lock until killed."""
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import common; "
            f"common.claim_out_dir({str(out)!r}, False); print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("script", SCRIPTS)
def test_second_run_into_a_locked_folder_is_refused(tmp_path, script):
    main, argv, _ = _mains(tmp_path)[script]
    out = tmp_path / "run"
    other = _holder(out)
    try:
        with pytest.raises(common.UserError, match=f"in use by another run \\(pid {other.pid}"):
            main(argv + ["--out", str(out)])
        assert (out / ".lock").read_text().split()[0] == str(other.pid)  # theirs, untouched
    finally:
        other.kill()  # SIGKILL: no clean-up, the lock file stays behind ...
        other.wait()
    assert (out / ".lock").exists()
    with pytest.raises(common.UserError, match="missing"):  # ... and is stale: the next run goes on
        main(argv + ["--out", str(out)])
    assert not (out / ".lock").exists()  # released when main() ended


def test_two_processes_race_for_one_folder(tmp_path):
    """Real processes: the second of two runs into one --out exits 2 with one line while the first runs."""
    out = tmp_path / "run"
    first = _holder(out)
    try:
        code = (f"import sys; sys.path.insert(0, {ROOT!r}); import common; "
                f"common.run_main(lambda: common.claim_out_dir({str(out)!r}, False))")
        second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"in use by another run (pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    common.claim_out_dir(str(out), False)  # the stale lock is taken over
    assert (out / ".lock").read_text().split()[0] == str(os.getpid())
    common.claim_out_dir(str(out), False)  # re-entrant in one process
    common.release_out_dir(str(out))
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_stale_temporary_files_are_removed_at_start(tmp_path, script):
    main, argv, ckpt = _mains(tmp_path)[script]
    out = tmp_path / "run"
    junk = [out / (ckpt + ".tmp4242"), out / "results.json.tmp", out / "ckpt.pt.tmp77"]
    for j in junk:
        j.parent.mkdir(parents=True, exist_ok=True)
        j.write_bytes(b"x" * 1000)
    keep = out / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(common.UserError, match="missing"):
        main(argv + ["--out", str(out)])
    assert not any(j.exists() for j in junk) and keep.read_text() == "mine"

# ------------------------------------------------------------------------------------------------
# data: folders are read-only to this code; a corrupt file is one line naming it and the fix


def _tree_digest(root):
    h = {}
    for d, dirs, files in os.walk(root):
        h[os.path.relpath(d, root)] = ("dir", os.stat(d).st_mode, os.stat(d).st_mtime_ns)
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            h[os.path.relpath(p, root)] = (hashlib.sha1(open(p, "rb").read()).hexdigest(), st.st_mode, st.st_mtime_ns)
    return h


def test_imdb_leaves_a_writable_data_folder_unchanged(tmp_path, monkeypatch):
    src = tmp_path / "src" / "aclImdb"
    for split in ("train", "test"):
        for lab, word in (("pos", "great"), ("neg", "bad")):
            (src / split / lab).mkdir(parents=True)
            for i in range(2):
                (src / split / lab / f"{i}_1.txt").write_text(f"A {word} film {i}.")
    data = tmp_path / "data"
    (data / "imdb").mkdir(parents=True)  # writable, as a user's own data folder (or CI's) may be
    with tarfile.open(data / "imdb" / "aclImdb_v1.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="aclImdb")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = _tree_digest(data)
    d = common.load_imdb(str(data), vocab_size=50)
    assert len(d.train_x) == 4 and d.train_y.tolist() == [0, 0, 1, 1]
    assert _tree_digest(data) == before  # byte for byte, modes and times too
    assert len(list((tmp_path / "cache").rglob("aclImdb/train/pos/0_1.txt"))) == 1
    assert len(common.load_imdb(str(data), vocab_size=50).train_x) == 4 and _tree_digest(data) == before  # reuses cache


def _cifar10_folder(root):
    d = root / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as fh:
            pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, fh)
    return d


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_content"])
def test_corrupt_cifar_pickle_is_one_line(tmp_path, damage):
    d = _cifar10_folder(tmp_path)
    f = d / "data_batch_3"
    if damage == "garbage":
        f.write_bytes(b"\x00not a pickle" * 10)
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:100])
    else:
        with open(f, "wb") as fh:
            pickle.dump({b"something": 1}, fh)
    assert common.load_cifar10(str(tmp_path), train=False)[0].shape == (4, 3, 32, 32)  # the good file reads
    with pytest.raises(common.UserError) as e:
        common.load_cifar10(str(tmp_path), train=True)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and "corrupt" in msg and ("delete" in msg or "replace" in msg)


def test_truncated_mnist_gz_is_one_line(tmp_path):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = bytes([0, 0, 8, 3]) + np.array([3, 28, 28], ">i4").tobytes() + bytes(3 * 784)
    labels = bytes([0, 0, 8, 1]) + np.array([3], ">i4").tobytes() + bytes([1, 2, 3])
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(imgs))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    assert common.load_mnist(str(tmp_path), train=False)[0].shape == (3, 1, 28, 28)
    full = (raw / "t10k-images-idx3-ubyte.gz").read_bytes()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(full[:len(full) // 2])
    with pytest.raises(common.UserError) as e:
        common.load_mnist(str(tmp_path), train=False)
    msg = str(e.value)
    assert "\n" not in msg and "t10k-images-idx3-ubyte.gz" in msg and "corrupt or truncated" in msg
    assert "re-download" in msg


def test_corrupt_data_file_from_the_command_line(tmp_path):
    d = _cifar10_folder(tmp_path)
    (d / "test_batch").write_bytes(b"junk")
    p = run_script(["sim_cifar.py", "--smoke", "--no-baseline", "--data-dir", tmp_path, "--no-download",
                    "--out", tmp_path / "o"])
    assert_clean_error(p, str(d / "test_batch"), "corrupt")
    assert p.returncode == 2

# ------------------------------------------------------------------------------------------------
# errors under torchrun: rank 0 alone says it, every rank exits 2


def test_run_main_prints_on_rank0_only(monkeypatch, capsys):
    """Rank 0 says the mistake; another rank stays quiet when torchrun ends the job (its SIGTERM, sent once
    rank 0 has exited) within the grace, and says it itself, marked with its rank, when that does not come."""
    import threading

    def bad():
        raise common.UserError("missing x in /data: put it there")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(common, "RANK_GRACE_S", 5.0)
    before = signal.getsignal(signal.SIGTERM)
    for rank, sigterm_after, printed in (("1", 0.2, ""), ("1", None, "error (rank 1): missing x in /data: put it there\n"),
                                         ("0", None, "error: missing x in /data: put it there\n")):
        monkeypatch.setenv("RANK", rank)
        if sigterm_after is None:
            monkeypatch.setattr(common, "RANK_GRACE_S", 0.2)
        else:
            threading.Timer(sigterm_after, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t0 = time.time()
        with pytest.raises(SystemExit) as e:
            common.run_main(bad)
        assert e.value.code == 2 and capsys.readouterr().err == printed and time.time() - t0 < 3
        assert signal.getsignal(signal.SIGTERM) is before  # the wait's handler is gone again


def test_torchrun_missing_data_is_one_line(tmp_path):
    p = run_script(["sim_cifar.py", "--smoke", "--no-baseline", "--data-dir", tmp_path / "nowhere", "--no-download",
                    "--out", tmp_path / "o"], torchrun=2, timeout=240)
    assert p.returncode != 0 and "Traceback" not in p.stdout
    errors = [l for l in p.stderr.splitlines() if "error: missing" in l]
    assert len(errors) == 1 and errors[0].startswith("error: missing") and errors[0].count("error:") == 1, p.stderr
    assert "exitcode  : 2" in p.stderr or "exit code 2" in p.stderr or "exitcode: 2" in p.stderr.replace(" ", "")

RACE_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, os.getcwd())
import common
common.RANK_GRACE_S = float(sys.argv[2])


def main():
    if os.environ["RANK"] == "0":
        time.sleep(float(sys.argv[1]))  # rank 0 behind the others (imports, a loaded machine)
        if sys.argv[1] != "60":
            raise common.UserError("the same mistake on every rank")
    else:
        raise common.UserError("the same mistake on every rank")


common.run_main(main)
"""


@pytest.mark.parametrize("rank0_delay, grace, says", [("3", "20", "error: "), ("60", "2", "error (rank 1): ")])
def test_a_late_rank_0_still_says_the_mistake(tmp_path, rank0_delay, grace, says):
    """Rank 1 fails at once, rank 0 seconds later: rank 1 waits for rank 0 to end the job, so torchrun does not
    stop rank 0 before its line is out (it did: the user saw only torchrun's summary). A rank 0 that does not end
    the job within the grace (here: never fails) leaves the message to rank 1."""
    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT)
    p = run_script([script, rank0_delay, grace], torchrun=2, timeout=120)
    lines = [l for l in p.stderr.splitlines() if "the same mistake" in l]
    assert p.returncode != 0 and lines == [says + "the same mistake on every rank"], p.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# contradictory flags, and every default in --help


@pytest.mark.parametrize("parse,argv,words", [
    (M.parse_args, ["--smoke", "--decay", "none", "--alpha-min", "0.6"], ["--alpha-min", "--decay linear"]),
    (M.parse_args, ["--smoke", "--decay", "scale-both", "--alpha-min", "0.7"], ["--alpha-min"]),
    (M.parse_args, ["--smoke", "--workers", "4"], ["--workers", "imagenet100"]),
    (lambda a: D.get_args(a, world_size=1), ["--smoke", "--p-uncond", "0.2"], ["--p-uncond", "--cond"]),
    (S.parse_args, ["--smoke", "--sim", "off", "--no-baseline"], ["--sim off"]),
    (S.parse_args, ["--smoke", "--sim", "off", "--baseline"], ["--sim off"]),
])
def test_contradictory_flags_are_refused(parse, argv, words):
    with pytest.raises(common.UserError) as e:
        parse(argv)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_flags_that_do_apply_still_work():
    assert M.parse_args(["--smoke", "--decay", "none"]).alpha_min == M.ALPHA_MIN
    assert M.parse_args(["--smoke"]).alpha_min == 0.6 and M.parse_args(["--smoke"]).workers == 8
    assert D.get_args(["--smoke", "--cond", "--p-uncond", "0.2"], world_size=1).p_uncond == 0.2
    assert D.get_args(["--smoke"], world_size=1).p_uncond == 0.1
    assert S.parse_args(["--smoke", "--sim", "off"]).baseline and not S.parse_args(["--smoke", "--no-baseline"]).baseline


@pytest.mark.parametrize("name,parser", [("sim_cifar", lambda: S.build_parser()), ("mae_decay", lambda: M.build_parser()),
                                         ("diffusion_decay", lambda: D.build_parser("cifar_quick")),
                                         ("probe", lambda: P.build_parser()), ("selfmodel", SM.build_parser)])
def test_help_shows_every_default(name, parser):
    p = parser()
    fmt = p._get_formatter()
    shown = 0
    for a in p._actions:
        if not a.option_strings or a.help == "==SUPPRESS==" or a.dest == "help":
            continue
        text = fmt._format_action(a)
        assert "default" in text, f"{name}: {text!r}"
        shown += 1
    assert shown >= 12


def test_help_shows_the_preset_defaults():
    mae, sim = side_by_side(lambda: run_script(["mae_decay.py", "--help"]), lambda: run_script(["sim_cifar.py", "--help"]))
    assert mae.returncode == sim.returncode == 0
    flat = " ".join(mae.stdout.split())
    assert "--dec-dim DEC_DIM (default: 256)" in flat  # cifar_quick's, not the parser's 512
    assert "(1 = plain residual; default 0.6; --decay linear only)" in flat
    flat = " ".join(sim.stdout.split())
    assert "--seeds SEEDS number of seeds: seed, seed+1, ... (default: 1)" in flat
    assert "Nesterov momentum (default: 0.9)" in flat and "weight decay (default: 0.0005)" in flat

# ------------------------------------------------------------------------------------------------
# timing and logs: one meaning everywhere; sim_cifar writes OUT/log.txt; CPU cost = FLOPs only


def test_results_timing_keys(tmp_path):
    p = common.write_results(str(tmp_path), "demo", {}, {}, 12.3456, torch.device("cpu"), train_seconds=10.0)
    r = json.load(open(p))
    assert r["wall_seconds"] == 12.346 and r["train_seconds"] == 10.0 and "seconds" not in r


def test_sim_cifar_log_file_and_timing(data_dir, tmp_path):
    need(data_dir, "cifar10", "cifar-10-batches-py", "test_batch")
    out = tmp_path / "run"
    p = run_script(["sim_cifar.py", "--smoke", "--no-baseline", "--train-subset", "256", "--test-subset", "200",
                    "--epochs", "1", "--bench-steps", "0", "--data-dir", data_dir, "--out", out])
    assert p.returncode == 0, p.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "cost of one training step" in log and "final test acc" in log and "results:" in log
    assert sorted(os.listdir(out)) == ["cost.json", "log.txt", "results.json", "rho_seed0"]  # no lock left
    r = json.load(open(out / "results.json"))
    assert 0 < r["train_seconds"] <= r["wall_seconds"]
    assert r["metrics"]["runs"][0]["train_seconds"] == pytest.approx(r["train_seconds"], abs=1e-3)


def test_sim_cifar_cost_on_cpu_counts_flops_only():
    args = S.parse_args(["--train-subset", "512", "--test-subset", "100", "--width", "8", "--latent-dim", "16"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (512,), generator=g)
    lines = []
    t0 = time.time()
    res = S.measure_cost(args, CPU, (x, y, x[:100], y[:100]), lines.append)
    assert time.time() - t0 < 60
    assert res["step_ms"] == {} and res["bench_steps"] == 0 and set(res["flops_per_step"]) == set(S.MODES)
    assert "only FLOPs" in lines[0] and "--bench-steps" in lines[0]
    assert sum("counting FLOPs" in l for l in lines) == 3  # progress: one line per mode
    explicit = S.parse_args(["--smoke", "--bench-steps", "1", "--width", "8"])
    assert S.measure_cost(explicit, CPU, (x[:64], y[:64], x, y), lines.append)["step_ms"].keys() == set(S.MODES)

# ------------------------------------------------------------------------------------------------
# probe.py: paths checked before the work; its own message for a missing checkpoint


def test_probe_checks_out_before_probing(tmp_path):
    ck = tmp_path / "ckpt.pt"
    ck.write_bytes(b"not a checkpoint")  # probing it would fail; the --out check must come first
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for out in (str(locked / "sub" / "p.json"), str(tmp_path)):
            if os.geteuid() == 0 and out.startswith(str(locked)):
                out = "/proc/no/p.json"  # root writes anywhere; /proc refuses even root
            with pytest.raises(common.UserError, match="--out"):
                P.main([str(ck), "--out", out])
    finally:
        locked.chmod(0o755)


def test_probe_checks_compare_paths_first(tmp_path):
    ck = tmp_path / "ckpt.pt"
    ck.write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError) as e:
        P.main([str(ck), "--compare", str(tmp_path / "typo.pt"), "--out", str(tmp_path / "p.json")])
    assert "typo.pt" in str(e.value) and "--resume" not in str(e.value)
    with pytest.raises(common.UserError) as e:
        P.main([str(tmp_path / "missing.pt")])
    assert "no checkpoint" in str(e.value) and "--resume" not in str(e.value)


def test_sim_cifar_slow_steps_still_show_progress(tmp_path, monkeypatch):
    """A CPU step of the full-size run takes seconds: a line at least every 30 s, not every 50 steps."""
    class Clock:  # every reading 40 s later than the last
        t = 0.0

        def perf_counter(self):
            Clock.t += 40.0
            return Clock.t
    args = S.parse_args(["--smoke", "--no-baseline", "--train-subset", "128", "--batch-size", "32", "--test-subset", "100",
                         "--epochs", "1", "--log-every", "100", "--width", "4", "--latent-dim", "8"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    monkeypatch.setattr(S, "time", Clock())
    lines = []
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        S.train_run(args, dict(vars(args), dataset="cifar10"), CPU, (x, y, x[:100], y[:100]), str(tmp_path),
                    common.StopSignal(None), None, 1, lines.append)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert [l for l in lines if "a full line every 100 steps" in l] == [
        f"[rho s0] step {i}/4 (a full line every 100 steps)" for i in (1, 2, 3)]
