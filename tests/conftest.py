"""Shared test fixtures: the real data root (skip when absent) and running a script as a user would."""
import os, subprocess, sys, threading
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _find_data_dir():
    for d in (os.environ.get("DATA_DIR"), os.path.join(ROOT, "..", "shared", "data")):
        if d and os.path.isdir(d):
            return os.path.abspath(d)
    return None


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' tiny models gain nothing from a second thread, and OpenMP spin-waits badly on a busy
    2-core machine (seen: 2 s -> 35 s). Subprocesses get OMP_NUM_THREADS=1 from run_script."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def data_dir():
    d = _find_data_dir()
    if d is None:
        pytest.skip("real data not found: set DATA_DIR or put ../shared/data beside the repo")
    return d


def randomize(model, std=0.2, seed=1):
    """Non-zero weights everywhere, so structure tests are not trivially satisfied by zero-init branches."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def need(data_dir, *parts):
    """Skip (with the path as reason) unless data_dir/parts exists."""
    p = os.path.join(data_dir, *parts)
    if not os.path.exists(p):
        pytest.skip(f"{p} not present")
    return p


def run_script(args, *, env=None, timeout=300, torchrun=0):
    """Run `python SCRIPT ARGS` (or `torchrun --nproc_per_node N ...`) from the repo root on the CPU.
    env adds to (or, where a value is None, removes from) the environment."""
    e = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    e = {k: v for k, v in e.items() if v is not None}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
               "--master_port", str(29500 + os.getpid() % 1000)] + [str(a) for a in args]
    else:
        cmd = [sys.executable] + [str(a) for a in args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun passes it on to its workers (each in a session of its own, out of reach of
        # a kill of torchrun alone); then SIGKILL for whatever is left of this process
        p.terminate()
        try:
            p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run_in_process(main, argv, capsys):
    """A script's main(argv) as its command line runs it (common.run_main), in this process: (exit code, stderr
    text). Skips a torch import per case where a test only needs the error a flag gets."""
    import common
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: main(argv))
    return e.value.code, capsys.readouterr().err


def side_by_side(*calls):
    """Call each zero-argument function (a run_script each) in a thread, two at a time, and return their
    results in order: independent runs of one test (a straight run and the one to be resumed) take the wall
    time of one on CI's two cores, each script process having one thread."""
    with ThreadPoolExecutor(2) as ex:
        return [f.result() for f in [ex.submit(c) for c in calls]]


@pytest.fixture(scope="session")
def readme_smoke(data_dir, tmp_path_factory):
    """`python SCRIPT.py --smoke` exactly as the README writes it (the data root from $DATA_DIR, as a user's),
    run once a session per script for the tests that only read what it wrote: run(script) -> (the finished
    process, its output folder). Safe to call from side_by_side's threads."""
    root = tmp_path_factory.mktemp("readme_smoke")
    done, locks, guard = {}, {}, threading.Lock()

    def run(script):
        with guard:
            lock = locks.setdefault(script, threading.Lock())
        with lock:
            if script not in done:
                out = root / script
                done[script] = (run_script([f"{script}.py", "--smoke", "--out", out], env={"DATA_DIR": data_dir}), out)
        return done[script]
    return run


PNG = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file


def _tiny_cifar(folder, classes, files, labels, seed):
    """Pickles in CIFAR's format of generated images, a colour per class plus noise: `files` [(name, n)],
    `labels(y)` the label entries of a file."""
    import pickle
    import numpy as np
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    colours = rng.integers(0, 256, (classes, 3, 1, 1))
    for name, n in files:
        y = rng.integers(0, classes, n)
        x = np.clip(colours[y] + rng.normal(0, 60, (n, 3, 32, 32)), 0, 255).astype(np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": x.reshape(n, -1), **labels(y)}, fh)


def tiny_cifar100(root, n_train=400, n_test=200):
    """A CIFAR-100 folder (train / test pickles with fine and coarse labels) of generated images: the data set
    is not on this machine, its code path is tested on this."""
    _tiny_cifar(root / "cifar100" / "cifar-100-python", 100, [("train", n_train), ("test", n_test)],
                lambda y: {b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist()}, seed=1)
    return str(root)


def tiny_cifar10(root, n_train=320, n_test=128):
    """A CIFAR-10 folder in the original pickle format, of n_train + n_test generated images: what the smoke
    runs read, without the real data set and its seconds of loading."""
    _tiny_cifar(root / "cifar10" / "cifar-10-batches-py", 10,
                [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)],
                lambda y: {b"labels": y.tolist()}, seed=0)
    return str(root)


def save_fid_standin(path, channels=16, kernel=13, seed=5):
    """A TorchScript file with the FID network's interface, (N, 3, 299, 299) uint8-range floats -> (N, channels),
    at a fraction of Inception's cost: one strided conv, ReLU, mean. Traced, not scripted: scripting compiles
    nn.Conv2d's Python source, which newer torch releases have refused mid-suite; tracing records only the ops.
    TorchScript is deprecated, but it is the format the FID weights ship in. The global RNG is left alone."""
    import warnings
    import torch
    import torch.nn as nn

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, channels, kernel, stride=kernel)

        def forward(self, x):
            return torch.relu(self.conv(x)).mean((2, 3))

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        torch.jit.trace(StandIn().eval(), torch.zeros(2, 3, 299, 299)).save(path)
    return path


def assert_clean_error(proc, *words):
    """Exit non-zero, one-line message on stderr, no traceback; the message names each of `words`."""
    err = proc.stderr.strip()
    assert proc.returncode != 0, f"expected failure, got rc 0\n{proc.stdout[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    last = err.splitlines()[-1] if err else ""
    for w in words:
        assert w in last, f"{w!r} not in error line {last!r}"


class FakeClock:
    """A clock that moves only when a test moves it (`t += seconds`), to be monkeypatched in as a script's `time`
    module: throughput and step times then have values worked out by hand."""
    def __init__(self):
        self.t = 1000.0

    def ns(self):
        import time, types
        return types.SimpleNamespace(time=lambda: self.t, perf_counter=lambda: self.t, sleep=time.sleep,
                                     monotonic=lambda: self.t)
