"""The few pieces every experiment script shares: data, feature metrics, distributed set-up,
checkpoints, results and command-line plumbing. Importing this module has no side effects.

Conventions: accuracies are percentages (0-100); images are uint8 tensors (N, C, H, W); labels int64.
Data live under one root (`--data-dir`, default $DATA_DIR or ./data), one folder per data set.
"""
import argparse, atexit, copy, gzip, hashlib, json, math, os, pickle, re, shutil, signal, subprocess, sys, tarfile, time
import traceback
from collections import Counter, namedtuple
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file); printed as one line, no traceback."""


def _rank():
    return int(os.environ.get("RANK", 0))


def run_main(main):
    """Run `main()`, turning UserError into a one-line message and exit code 2. Under torchrun every rank
    hits the same mistake; only rank 0 says it (one write, so lines never interleave), all exit 2. The other
    ranks first wait for rank 0 to end the job (`_job_ended_within`) and speak only if it does not.

    A process that joined a gloo (CPU) process group then leaves through `leave_process`, after an uncaught
    exception too (its traceback printed, exit code 1, as Python's own exit would give). With the normal
    exit, a gloo worker thread may still be dropping the last reference to a finished collective (a barrier
    holding the tensors of earlier all_gathers) while the interpreter finalizes; freeing those Python-owned
    tensors needs the GIL, and a thread that asks for it then is ended by a forced unwind inside a noexcept
    destructor: std::terminate, "terminate called without an active exception", exit -6 for a rank whose
    files are all written (2 of some 450 two-process CPU runs here, torch 2.14; seen in a core dump:
    ~AsyncBarrierWork -> decref -> take_gil -> pthread_exit, the main thread in Py_FinalizeEx)."""
    code = 0
    try:
        main()
    except UserError as e:
        if _rank() == 0:
            sys.stderr.write(f"error: {e}\n")
            sys.stderr.flush()
        elif not _job_ended_within(RANK_GRACE_S):  # rank 0 did not end the job: its message may never come
            sys.stderr.write(f"error (rank {_rank()}): {e}\n")
            sys.stderr.flush()
        code = 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints and exits cleanly)
        if _rank() == 0:
            sys.stderr.write("interrupted\n")
        code = 130
    except Exception:
        if not _gloo_joined:
            raise
        traceback.print_exc()  # what the interpreter would print, then its exit code 1, by the same exit
        code = 1
    if _gloo_joined:
        leave_process(code)
    sys.exit(code)


_gloo_joined = False  # set by setup_distributed: this process joined a gloo process group

# How long a rank other than 0 waits, after a UserError, for rank 0 to say it. Exiting at once let torchrun stop
# rank 0 (SIGTERM) before its line was out, when rank 0 was a little behind: the user saw no message at all.
RANK_GRACE_S = 10.0


def _job_ended_within(seconds):
    """Under torchrun, wait up to `seconds` for the SIGTERM torchrun sends the other ranks once one has exited
    (normally rank 0, after printing the same mistake). True if it came; then this rank exits quietly, with
    its atexit handlers, instead of dying mid-wait."""
    if int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return False

    class Ended(Exception):
        pass

    def ended(*_):
        raise Ended

    old = signal.signal(signal.SIGTERM, ended)
    try:
        time.sleep(seconds)
        return False
    except Ended:
        return True
    finally:
        signal.signal(signal.SIGTERM, old)


def leave_process(code):
    """Exit with `code` as a normal exit would (every atexit handler runs: output-folder locks, logging,
    compile workers; stdout and stderr are flushed) but without the interpreter's finalization, the part
    that a gloo thread can abort (see run_main). Nothing of a run is written there: checkpoints and results
    are closed files by now."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(code)


def check(cond, msg):
    if not cond:
        raise UserError(msg)


def parse_list(text, typ=float, flag="list"):
    """'0,1,10' -> [0.0, 1.0, 10.0]; a one-line UserError naming the flag on bad input."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    check(items, f"{flag} is empty: give a comma-separated list, e.g. {flag} 0,1,10")
    try:
        return [typ(s) for s in items]
    except ValueError:
        raise UserError(f"{flag} {text!r}: every item must be a {typ.__name__}") from None


def one_line_errors(p):
    """Make argparse report a bad flag in one line (no usage dump), exit code 2 like UserError."""
    def error(msg):
        print(f"error: {msg} (see --help)", file=sys.stderr)
        sys.exit(2)
    p.error = error
    return p


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help names every option's default: argparse's "(default: X)" is added unless the help text
    already says what the default is (e.g. "default: the preset's")."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)  # argparse prints no help line at all for help=None
            action.help = "(default: off)" if action.nargs == 0 else "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: off)".strip()
        return super()._get_help_string(action)


def add_common_args(p, script):
    """The flags every script shares (see README, 'Conventions'); bad flags fail in one line and --help
    shows every default."""
    one_line_errors(p)
    p.formatter_class = HelpFormatter
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"), help="data root ($DATA_DIR, else ./data)")
    p.add_argument("--out", default=None, help=f"output dir (default out/{script}/<run-name>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized run (tests)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's ckpt.pt")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-download", action="store_true", help="never try to download data")
    p.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: act as if SIGTERM came here
    return p


# flags that never change what a run computes, only where or how fast it runs, or how often it reports
# or saves; each script extends this with its own. Any other flag is refused on --resume when it differs
# from the checkpoint's (so a new flag is refused until someone decides it is safe).
SAFE_ON_RESUME = frozenset({"resume", "out", "device", "compile", "stop_at_step", "data_dir", "no_download"})


def check_resume_config(saved, current, safe, path):
    """Refuse to continue the run in `path` when any setting outside `safe` differs between the checkpoint's
    config `saved` and this invocation's `current` (dicts of resolved flags); the message names each flag."""
    diff = sorted(k for k in set(saved) | set(current) if k not in safe and saved.get(k) != current.get(k))
    if diff:
        shown = ", ".join(f"--{k.replace('_', '-')} {current.get(k)!r} (run: {saved.get(k)!r})" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise UserError(f"--resume: {path} was made with other settings: {shown}{more}; pass the run's flags "
                        "or a new --out")


def prepare_out_dir(path):
    """Create the output dir and prove it is writable before any training starts."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {path} is not writable ({e.strerror}): pick another directory") from None
    return path


LOCK_NAME = ".lock"
_held_locks = {}  # lock path -> open descriptor holding the flock


def _lock_owner(lock):
    """(pid, host) written in a lock file, or None when it cannot be read."""
    try:
        with open(lock) as fh:
            pid, host = fh.read().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def lock_out_dir(path):
    """Lock OUT/.lock (an flock, so the kernel drops it when the process dies, SIGKILL included: a lock
    file left behind is stale by construction and simply taken over) and write "pid host" into it; a
    second run into the same folder is refused, naming the holder. Re-entrant within one process.
    release_out_dir removes the file."""
    import fcntl
    lock = os.path.join(path, LOCK_NAME)
    if lock in _held_locks:
        return lock
    for _ in range(10):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, host = _lock_owner(lock) or ("?", "?")
            raise UserError(f"--out {path} is in use by another run (pid {pid} on {host}): wait for it to end "
                            "or pick another --out") from None
        try:  # the file locked must still be the one at that path (a run that just ended unlinks it)
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise UserError(f"could not lock --out {path}: too many runs starting there at once")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
    _held_locks[lock] = fd
    return lock


def release_out_dir(path):
    """Remove OUT/.lock and drop the lock, if this process holds it."""
    lock = os.path.join(path, LOCK_NAME)
    fd = _held_locks.pop(lock, None)
    if fd is not None:
        try:
            os.remove(lock)  # while still locked: no other run can be holding this file
        except OSError:
            pass
        os.close(fd)


@atexit.register
def release_out_dirs():
    """Release every output-folder lock this process holds (scripts call it when main() ends; also at exit)."""
    for lock in list(_held_locks):
        release_out_dir(os.path.dirname(lock))


_TEMP_RE = re.compile(r"\.tmp\d*$|^\.write_test\d*$")


def clean_stale_temps(path):
    """Delete the temporary files that a killed writer leaves in `path` and its subfolders (save_checkpoint's
    `*.tmpPID`, write_json's `*.tmp`, prepare_out_dir's probe). Call only while holding the folder's lock:
    then no live run of this folder can be writing them. Returns the paths removed."""
    removed = []
    for root, _, files in os.walk(path):
        for f in files:
            if _TEMP_RE.search(f):
                try:
                    os.remove(os.path.join(root, f))
                    removed.append(os.path.join(root, f))
                except OSError:
                    pass
    return removed


def claim_out_dir(path, resume, existing=("ckpt.pt", "results.json")):
    """Everything a script does to its output folder before any work (rank 0 only): create it and check
    it is writable, lock it against a second run, delete temporary files a killed run left behind, and,
    without --resume, refuse a folder that already holds a run (`existing`: names relative to `path`)
    rather than overwrite it. Returns `path`."""
    prepare_out_dir(path)
    lock_out_dir(path)
    for f in clean_stale_temps(path):
        print(f"note: removed {f}, left by an interrupted write", file=sys.stderr)
    if not resume:
        found = [n for n in existing if os.path.exists(os.path.join(path, n))]
        if found:
            release_out_dir(path)
            raise UserError(f"{os.path.join(path, found[0])} exists: add --resume to continue that run, "
                            "or pass a new --out")
    return path


def rank0_first(fn, *args):
    """Run fn(*args) on rank 0 only (e.g. claim_out_dir) and hand its UserError, if any, to every rank, so
    under torchrun all ranks stop together with rank 0's message instead of hanging or dying in a collective."""
    err = None
    if _rank() == 0:
        try:
            fn(*args)
        except UserError as e:
            err = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [err]
        dist.broadcast_object_list(box, 0)
        err = box[0]
    if err is not None:
        raise UserError(err)


def file_logger(out_dir, is_main, name="log.txt"):
    """log(msg): on rank 0 print the line (above any progress bar) and append it to OUT/log.txt."""
    if not is_main:
        return lambda *a, **k: None
    path = os.path.join(out_dir, name)

    def log(msg=""):
        from tqdm import tqdm
        tqdm.write(msg)
        with open(path, "a") as fh:
            fh.write(msg + "\n")
    return log

# ----------------------------------------------------------------------------------------------------
# data

DATASET_STATS = {  # channel mean / std of the training split, in [0, 1] units
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),  # the self-modeling paper's Normalize(0.5, 0.5)
    "imagenet100": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "imagenet100": 100, "imdb": 2}
_SOURCES = {  # folder, archive url, official md5
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85"),
    "imdb": ("aclImdb", "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
             "7c2ac02c03563afcf9b574c7e56c153a"),
}
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST_FILES = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}


def bad_data_file(path, exc, download=False):
    """The one-line error for a data file that exists but cannot be read (truncated, corrupt, not the format)."""
    why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}" if str(exc) else type(exc).__name__
    fix = ("delete it and run again to re-download it" if download else
           "replace it with a good copy (or delete it and run without --no-download to re-download it)")
    return UserError(f"{path} is corrupt or truncated ({why}): {fix}")


def _ensure(root, names, download, fetch):
    """Return `root` if every file in `names` is there, else download (if allowed) or fail in one line."""
    missing = [n for n in names if not os.path.exists(os.path.join(root, n))]
    if missing and download:
        try:
            fetch()
        except Exception as e:  # offline, bad md5, read-only disk: all fixable by the user
            raise UserError(f"could not download into {root} ({type(e).__name__}: {str(e)[:80]}); "
                            f"put {', '.join(missing)} there or pass --data-dir") from None
        missing = [n for n in names if not os.path.exists(os.path.join(root, n))]
    check(not missing, f"missing {', '.join(missing)} in {root}: put the files there or pass --data-dir "
                       "(drop --no-download to fetch them)")
    return root


def _cifar(name, data_dir, train, download, label_key):
    from torchvision.datasets.utils import download_and_extract_archive
    folder, url, md5 = _SOURCES[name]
    base, root = os.path.join(data_dir, name), os.path.join(data_dir, name, folder)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:
        files = ["train" if train else "test"]
    _ensure(root, files, download, lambda: download_and_extract_archive(url, base, md5=md5))
    xs, ys = [], []
    for f in files:
        path = os.path.join(root, f)
        try:
            with open(path, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")  # py2 pickles; we read only data + labels
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
            if not len(xs[-1]) == len(ys[-1]) > 0:
                raise ValueError(f"{len(xs[-1])} images but {len(ys[-1])} labels")
        except Exception as e:
            raise bad_data_file(path, e, download) from None
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar10(data_dir, train=True, download=False):
    return _cifar("cifar10", data_dir, train, download, b"labels")


def load_cifar100(data_dir, train=True, download=False):
    return _cifar("cifar100", data_dir, train, download, b"fine_labels")


def load_mnist(data_dir, train=True, download=False):
    from torchvision.datasets.utils import download_url
    root = os.path.join(data_dir, "mnist", "MNIST", "raw")
    prefix = "train" if train else "t10k"
    names = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    _ensure(root, names, download, lambda: [download_url(_MNIST_URL + n, root, md5=_MNIST_FILES[n]) for n in names])

    def idx(path):  # idx format: zero bytes, dtype code, ndim, then big-endian int32 dims, then raw bytes
        try:
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
            ndim = raw[3]
            dims = np.frombuffer(raw, ">i4", ndim, 4)
            return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)
        except Exception as e:
            raise bad_data_file(path, e, download) from None
    x = idx(os.path.join(root, names[0]))
    y = idx(os.path.join(root, names[1]))
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def load_dataset(name, data_dir, train=True, download=False):
    loaders = {"cifar10": load_cifar10, "cifar100": load_cifar100, "mnist": load_mnist}
    check(name in loaders, f"--dataset {name!r} is not one of {', '.join(loaders)}")
    return loaders[name](data_dir, train, download)


def cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "decay-sim-selfmodel")


# torchtext's "basic_english" rules (the self-modeling authors' IMDB tokenizer), applied in this order after
# lower-casing; written out here so torchtext is not a dependency and the vocabulary matches theirs.
_BASIC_ENGLISH = [(re.compile(p), r) for p, r in [
    (r"'", " '  "), (r'"', ""), (r"\.", " . "), (r"<br \/>", " "), (r",", " , "), (r"\(", " ( "), (r"\)", " ) "),
    (r"!", " ! "), (r"\?", " ? "), (r";", " "), (r":", " "), (r"\s+", " ")]]


def tokenize(text):
    """basic_english: lower-case; split off ' . , ( ) ! ?; drop double quotes, ; : and <br /> tags."""
    text = text.lower()
    for pattern, repl in _BASIC_ENGLISH:
        text = pattern.sub(repl, text)
    return text.split()


Imdb = namedtuple("Imdb", "train_x train_y test_x test_y vocab")


def load_imdb(data_dir, vocab_size=20000, download=False):
    """Raw aclImdb reviews -> token-id sequences (lists of int64 tensors) and 0/1 labels (1 = positive).

    Reads `imdb/aclImdb/` or extracts an archive beside it (`aclImdb_v1.tar.gz` as downloaded, or
    `aclImdb.tar.xz`) into the user cache (cache_dir()/imdb/<key>/); data folders are read-only to this
    code, writable or not (only a download, when allowed and needed, adds the archive there).
    Vocabulary: id 0 = padding, 1 = unknown, then the most frequent training words. The tokenised reviews
    are cached too (`_imdb_tokens`): a run after the first skips the ~10 s of reading and tokenising.
    """
    base = os.path.join(data_dir, "imdb")
    key = hashlib.sha1(os.path.realpath(base).encode()).hexdigest()[:10]  # one cache per data folder
    folders = [os.path.join(base, "aclImdb"), os.path.join(cache_dir(), "imdb", key, "aclImdb")]
    src = next((f for f in folders if os.path.isdir(os.path.join(f, "test", "neg"))), None)
    if src is None:
        archives = [os.path.join(base, a) for a in ("aclImdb_v1.tar.gz", "aclImdb.tar.xz", "aclImdb.tar.gz")]
        if not any(map(os.path.exists, archives)) and download:
            from torchvision.datasets.utils import download_url
            _, url, md5 = _SOURCES["imdb"]
            _ensure(base, ["aclImdb_v1.tar.gz"], True, lambda: download_url(url, base, md5=md5))
        archive = next((a for a in archives if os.path.exists(a)), None)
        check(archive, f"no IMDB data in {base}: expected aclImdb/ or aclImdb_v1.tar.gz there; "
                       "pass --data-dir or drop --no-download")
        dest = os.path.dirname(folders[1])  # always the cache: a data folder is never written (it may be shared)
        tmp = os.path.join(dest, f".partial{os.getpid()}")  # renamed when complete: no half-extracted cache
        os.makedirs(tmp, exist_ok=True)
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if re.match(r"aclImdb/(train|test)/(pos|neg)/[^/]+\.txt$", m.name)]
            tf.extractall(tmp, members=members, filter="data")
        src = os.path.join(dest, "aclImdb")
        try:
            os.replace(os.path.join(tmp, "aclImdb"), src)
        except OSError:  # a run started beside this one renamed its copy first: the same files, use them
            if not os.path.isdir(os.path.join(src, "test", "neg")):
                raise
        shutil.rmtree(tmp, ignore_errors=True)

    full = _imdb_tokens(src)
    vocab = full["vocab"][:max(vocab_size, 2)]  # most_common(n) is the first n of most_common(): ties too
    ids = full["ids"].masked_fill(full["ids"] >= len(vocab), 1).split(full["lengths"].tolist())
    n = len(full["train_y"])
    return Imdb(list(ids[:n]), full["train_y"], list(ids[n:]), full["test_y"], vocab)


def _imdb_tokens(src):
    """Every review of src (an aclImdb folder) as ids into the full training vocabulary, by frequency:
    {vocab, ids (one flat int64 tensor, train then test), lengths, train_y, test_y}. Reading and tokenising
    the 50,000 files takes ~10 s a run; the result is kept in the user cache, under a name that hashes the
    tokenizer's rules and every file's name, size and modification time, so an edited review or tokenizer
    builds it again. Written atomically; an unwritable or unreadable cache only costs the time."""
    files = [(split, label, os.path.join(src, split, sub, f)) for split in ("train", "test")
             for label, sub in ((0, "neg"), (1, "pos")) for f in sorted(os.listdir(os.path.join(src, split, sub)))]
    stamp = hashlib.sha1(repr([(p.pattern, r) for p, r in _BASIC_ENGLISH]).encode() + tokenize.__code__.co_code)
    for *_, f in files:
        st = os.stat(f)
        stamp.update(f"{os.path.relpath(f, src)} {st.st_size} {st.st_mtime_ns}\n".encode())
    prefix = "tokens-" + hashlib.sha1(os.path.realpath(src).encode()).hexdigest()[:10]  # one file per folder
    folder = os.path.join(cache_dir(), "imdb", "tokens")
    path = os.path.join(folder, f"{prefix}-{stamp.hexdigest()[:16]}.pt")
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # not there yet, or unreadable: build it (again)
        pass
    texts = []
    for *_, f in files:
        with open(f, encoding="utf-8") as fh:
            texts.append(tokenize(fh.read()))
    n_train = sum(split == "train" for split, *_ in files)
    counts = Counter(w for t in texts[:n_train] for w in t)
    vocab = ["<pad>", "<unk>"] + [w for w, _ in counts.most_common()]
    index = {w: i for i, w in enumerate(vocab)}
    labels = torch.tensor([label for _, label, _ in files], dtype=torch.int64)
    ids = np.fromiter((index.get(w, 1) for t in texts for w in t), np.int64, sum(map(len, texts)))
    full = {"vocab": vocab, "ids": torch.from_numpy(ids),
            "lengths": torch.tensor([len(t) for t in texts], dtype=torch.int64),
            "train_y": labels[:n_train], "test_y": labels[n_train:]}
    try:
        os.makedirs(folder, exist_ok=True)
        save_checkpoint(path, full)
        for f in os.listdir(folder):  # this folder's older tokens (reviews or tokenizer changed since)
            if f.startswith(prefix) and f.endswith(".pt") and f != os.path.basename(path):
                os.remove(os.path.join(folder, f))
    except OSError:
        pass
    return full


def imagenet100_datasets(root, class_file=None, img_size=224, crop_scale=(0.2, 1.0)):
    """ImageFolder readers of root/train and root/val restricted to the classes listed in `class_file`
    (one wnid per line; default root/imagenet100.txt), with the usual train / eval transforms."""
    from torchvision import datasets, transforms as T
    class_file = class_file or os.path.join(root, "imagenet100.txt")
    check(os.path.isfile(class_file), f"class list {class_file} not found: pass it or put imagenet100.txt in {root}")
    wanted = [l.strip() for l in open(class_file) if l.strip()]

    class Subset(datasets.ImageFolder):
        def find_classes(self, directory):
            missing = [c for c in wanted if not os.path.isdir(os.path.join(directory, c))]
            check(not missing, f"{directory} lacks {len(missing)} listed classes: {' '.join(missing[:3])}")
            return sorted(wanted), {c: i for i, c in enumerate(sorted(wanted))}

    mean, std = DATASET_STATS["imagenet100"]
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose([T.RandomResizedCrop(img_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip()] + norm)
    val_tf = T.Compose([T.Resize(int(img_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                        T.CenterCrop(img_size)] + norm)
    for split in ("train", "val"):
        check(os.path.isdir(os.path.join(root, split)), f"{os.path.join(root, split)} not found: expected "
                                                        "ImageNet-100 as root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG")
    return Subset(os.path.join(root, "train"), train_tf), Subset(os.path.join(root, "val"), val_tf)


class GPUBatches:
    """A whole small image set resident on one device, batched, augmented and normalised there.

    `batch_size` is the global batch; each of `world_size` ranks gets batch_size // world_size rows.
    Shuffling and augmentation draw from a generator seeded by (seed, epoch, batch index), so a run
    resumed mid-epoch sees exactly the batches it would have seen, and the rows of all ranks together
    equal the single-process batch. Train: shuffle, random crop after zero padding `pad`, horizontal flip.
    Eval: fixed order, no augmentation, the last short batch kept, rank r takes rows r::world_size.
    """

    def __init__(self, images, labels, batch_size, *, train, device="cpu", mean=None, std=None, pad=4,
                 flip=True, seed=0, rank=0, world_size=1, drop_last=True, channels_last=False):
        check(batch_size % world_size == 0, f"--batch-size {batch_size} must divide by the {world_size} processes")
        self.x, self.y = images.to(device), labels.to(device)
        self.bs, self.train, self.device, self.seed = batch_size, train, torch.device(device), seed
        self.pad, self.flip = (pad, flip) if train else (0, False)
        self.rank, self.world, self.drop_last = rank, world_size, drop_last and train
        self.channels_last = channels_last
        c = images.shape[1]
        self.mean = torch.tensor(mean or [0.5] * c, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std or [0.5] * c, device=device).view(1, -1, 1, 1) * 255

    def __len__(self):
        n = len(self.x)
        return n // self.bs if self.drop_last else math.ceil(n / self.bs)

    def __iter__(self):
        return self.epoch(0)

    def _gen(self, *keys):
        g = torch.Generator()  # CPU generator: identical streams on every device type
        s = self.seed
        for k in keys:
            s = s * 1_000_003 + k + 1
        g.manual_seed(s % 2**63)
        return g

    def epoch(self, epoch, start=0):
        """Yield (x float32 normalised, y) for batches start, start+1, ... of `epoch`."""
        n = len(self.x)
        order = torch.randperm(n, generator=self._gen(epoch)) if self.train else torch.arange(n)
        order = order.to(self.device)  # one copy per epoch: no host-device sync per batch
        sizes = [min(self.bs, n - i * self.bs) for i in range(start, len(self))]
        if self.pad or self.flip:  # every batch's crop offsets and flips drawn up front, copied once
            params = torch.cat([self._draw(b, self._gen(epoch, i)) for i, b in zip(range(start, len(self)), sizes)], 1)
            params = params.to(self.device).split(sizes, 1)
        for j, i in enumerate(range(start, len(self))):
            idx = order[i * self.bs:(i + 1) * self.bs]
            x = self.x[idx].float()
            if self.pad or self.flip:
                x = self._augment(x, *params[j])
            x = ((x - self.mean) / self.std)[self.rank::self.world]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.y[idx][self.rank::self.world]

    def _draw(self, b, g):
        p = self.pad
        return torch.stack([torch.randint(0, 2 * p + 1, (b,), generator=g), torch.randint(0, 2 * p + 1, (b,), generator=g),
                            (torch.rand(b, generator=g) < 0.5).long()])

    def _augment(self, x, dy, dx, flip):
        b, c, h, w = x.shape
        if self.pad:
            # black border (raw 0) as torchvision's RandomCrop(padding=4); one gather crops every row
            p, ar = self.pad, lambda k: torch.arange(k, device=self.device)
            xp = F.pad(x, (p, p, p, p))
            rows = (dy[:, None] + ar(h))[:, None, :, None]
            cols = (dx[:, None] + ar(w))[:, None, None, :]
            x = xp[ar(b)[:, None, None, None], ar(c)[None, :, None, None], rows, cols]
        if self.flip:
            x = torch.where(flip.bool().view(-1, 1, 1, 1), x.flip(3), x)
        return x

# ----------------------------------------------------------------------------------------------------
# feature metrics (the papers' evaluation protocol)


def effective_rank(features, use_exp=False, covariance=True):
    """Roy & Vetterli effective rank. With s_i = sigma_i / sum_j sigma_j the singular values normalised,
    H = -sum_i s_i log s_i (natural log) is what arXiv 2404.10947 Eq. 6 calls the effective rank;
    exp(H) (`use_exp=True`) is Roy & Vetterli's original, in [1, rank]. With `covariance=True` the
    singular values are those of the feature covariance across samples (rows), as in the paper."""
    a = features.double()
    if covariance:
        a = a - a.mean(0, keepdim=True)
        a = a.T @ a / max(len(a) - 1, 1)
    s = torch.linalg.svdvals(a)
    p = s / s.sum()
    h = -(p * torch.log(p.clamp_min(1e-300))).sum().item()
    return math.exp(h) if use_exp else h


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, k=20, T=0.07, chunk=1024):
    """Weighted kNN (Wu et al. 2018): cosine similarity, votes weighted by exp(sim / T). Top-1 in %."""
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    c = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), c, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / T).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return 100.0 * correct / len(test_f)


def linear_probe(train_f, train_y, test_f, test_y, epochs=50, lr=0.1, batch_size=1024, wd=0.0, seed=0):
    """MAE protocol on frozen features: BatchNorm1d(affine=False, eps=1e-6) + Linear, SGD momentum 0.9
    with a cosine schedule, trained where the features live. Returns test top-1 in %."""
    g = torch.Generator().manual_seed(seed)
    dev = train_f.device
    c = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Sequential(nn.BatchNorm1d(train_f.shape[1], affine=False, eps=1e-6), nn.Linear(train_f.shape[1], c))
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(head[1].weight.shape, generator=g) * 0.01)
        head[1].bias.zero_()
    head.to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    n = len(train_f)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    train_f, test_f = train_f.float(), test_f.float()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(dev)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        return 100.0 * (head(test_f).argmax(1) == test_y).float().mean().item()


def evaluate_features(train_f, train_y, test_f, test_y, k=20, seed=0, probe_epochs=50):
    """The one evaluation every script and probe.py report, so their numbers agree exactly."""
    return {"linear_probe": linear_probe(train_f, train_y, test_f, test_y, epochs=probe_epochs, seed=seed),
            "knn": knn_accuracy(train_f, train_y, test_f, test_y, k=k),
            "erank": effective_rank(test_f), "erank_exp": effective_rank(test_f, use_exp=True),
            "feat_norm": test_f.float().norm(dim=1).mean().item()}

# ----------------------------------------------------------------------------------------------------
# devices, distributed runs, speed

Dist = namedtuple("Dist", "rank local_rank world_size device is_main")


def setup_distributed(device="auto"):
    """Read torchrun's env vars (RANK, LOCAL_RANK, WORLD_SIZE); nccl on GPUs, gloo on the CPU.
    Without torchrun: one process, rank 0."""
    check(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"), f"--device {device!r}: use auto, cpu or cuda")
    cuda = torch.cuda.is_available() and device != "cpu"
    check(cuda or not device.startswith("cuda"), "--device cuda asked for but no GPU is visible: use --device cpu")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        global _gloo_joined
        dist.init_process_group("nccl" if cuda else "gloo")
        _gloo_joined = not cuda  # run_main then leaves by leave_process (see there)
    return Dist(rank, local, world, dev, rank == 0)


def warn_if_cpu(d, smoke):
    """A full-size run on the CPU is slow and may not fit in memory: say so once, then go on."""
    if d.device.type == "cpu" and not smoke and d.is_main:
        print("note: no GPU in use; the default presets are sized for one (use --smoke for a quick CPU check)",
              file=sys.stderr)


def check_cpu_compile_width(d, compiled, width):
    """Refuse a compiled ResNet on the CPU narrower than 8 channels, before it hangs.

    torch.compile lays convolutions out channels_last on the CPU, and there oneDNN's 1x1 stride-2
    weight-gradient kernel hangs or crashes (segfault, abort) when the input has fewer than 8 channels:
    seen with torch 2.11 and 2.14 on an AVX2 CPU, in eager mode too once the tensors are channels_last.
    The scripts keep CPU tensors contiguous otherwise, and CUDA is unaffected."""
    check(not (d.device.type == "cpu" and compiled and width < 8),
          f"--width {width} with --compile on the CPU hangs in oneDNN (1x1 stride-2 convolution backward, "
          f"< 8 channels): use --width 8 or more, or drop --compile")


def cleanup_distributed():
    """The end of a distributed run, called from the scripts' `finally`. After a normal end: a barrier (no rank
    takes the group down while rank 0 still writes files), then destroy_process_group. While an exception is
    on its way out, no barrier: the other ranks may be inside a training collective this rank will never
    join, so a barrier would hold every rank until the backend's timeout (30 minutes for gloo); this rank
    exits instead, and torchrun stops the others at once. A UserError (bad input, which every rank meets
    alike) still takes its group down, a local step, so that no backend warns of a group left standing."""
    if not dist.is_initialized():
        return
    failing = sys.exc_info()[1]
    if failing is None:
        dist.barrier()
    if failing is None or isinstance(failing, UserError):
        dist.destroy_process_group()


def all_gather_cat(t):
    """Concatenate a tensor's rows from every rank (rows may differ in number); identity when single."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    n = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros((m,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:len(t)] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:int(s.item())] for o, s in zip(out, sizes)])


def autocast(device):
    """bf16 autocast on GPUs that support it; plain fp32 elsewhere (CPU bf16 is slow and lossy)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def peak_flops(device):
    """Dense bf16 peak of the GPU (for MFU), or None when unknown."""
    name = device_name(device)
    for key, peak in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12), ("4090", 165e12)):
        if key in name:
            return peak
    return None


def mfu(flops_per_s, peak, gpus=1):
    """Model FLOPs utilisation: achieved FLOP/s over the peak of the `gpus` GPUs doing them (None when the
    peak or the rate is unknown, e.g. on a CPU)."""
    return flops_per_s / (peak * gpus) if peak and flops_per_s else None


def count_flops(fn):
    """FLOPs of running `fn()` once (forward and backward if it does both), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def timed(step, n, device):
    """Milliseconds per call of `step()` over n calls, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return 1000 * (time.perf_counter() - t0) / n


def profile_step(step, device, steps=3, eager_step=None, warmup=2):
    """What one training step is made of. `step()` runs one whole step as the script trains it (compiled or
    not); `eager_step()` the same step uncompiled (default: `step`), whose dispatched tensor operations are
    counted (a count, the same on any device: each costs launch and dispatch time whatever its size).
    After `warmup` calls of `step` (compiling ones, when it is compiled), torch.profiler watches `steps`
    calls: the wall time (timed again without the profiler, whose cost per operation adds up), the time the
    device is busy (its kernels; on a GPU a busy fraction of the unprofiled wall time well under 1 means
    the step waits on the host: launches, Python, data, not arithmetic), kernels per step and the costliest
    operations by self time on the device (the CPU's time on a CPU), in ms per step."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    eager = eager_step or step
    timed(eager, 1, device)  # the allocator's and cuDNN's first-call costs stay out of the count's step
    with Count() as count:
        eager()
    if warmup:
        timed(step, warmup, device)
    gpu = device.type == "cuda"
    wall = timed(step, steps, device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        wall_profiled = timed(step, steps, device)
    rows = prof.key_averages()
    if gpu:  # kernels are the rows that ran on the device; an op's own device time is its kernels'
        self_time = lambda e: getattr(e, "self_device_time_total", 0) or 0
        kernels = [e for e in rows if str(e.device_type).endswith("CUDA")]
        busy = sum(self_time(e) for e in kernels) / 1000 / steps
    else:
        self_time = lambda e: e.self_cpu_time_total
        kernels, busy = [], None
    top = sorted(kernels if gpu else [e for e in rows if e.key.startswith("aten::")], key=self_time, reverse=True)[:8]
    return {"steps": steps, "ops": count.n, "wall_ms": wall, "wall_profiled_ms": wall_profiled,
            "device_busy_ms": busy, "busy_fraction": busy / wall if busy is not None else None,
            "kernels": sum(e.count for e in kernels) / steps if gpu else None,
            "top": [[e.key[:80], self_time(e) / 1000 / steps] for e in top]}


def profile_text(p):
    """One log line's worth of a profile_step result."""
    busy = (f"device busy {p['device_busy_ms']:.2f} of {p['wall_ms']:.2f} ms ({100 * p['busy_fraction']:.0f}%), "
            f"{p['kernels']:.0f} kernels" if p["device_busy_ms"] is not None else f"{p['wall_ms']:.2f} ms")
    return (f"{p['ops']} operations dispatched (eager), {busy}; costliest: "
            + ", ".join(f"{n} {ms:.2f} ms" for n, ms in p["top"][:5]))


class StopSignal:
    """SIGTERM / SIGINT set a flag instead of killing the process, so the loop can checkpoint and exit.
    `requested(step)` also fires at `--stop-at-step` (a testing aid, the same on every rank). Under DDP
    the ranks agree on a signal through an all-reduce every `every` steps, not every step (it syncs)."""

    def __init__(self, stop_at_step=None, every=10):
        self.flag, self.stop_at, self.every = False, stop_at_step, every
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, *_):
        self.flag = True

    def restore(self):
        """Give SIGTERM / SIGINT back their old handlers (after training: a signal then ends the run)."""
        for s, h in self.old.items():
            signal.signal(s, h)

    def requested(self, step):
        if self.stop_at is not None and step >= self.stop_at:
            return True
        if dist.is_initialized() and dist.get_world_size() > 1:
            if step % self.every:
                return False
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([float(self.flag)], device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item())
        return self.flag

# ----------------------------------------------------------------------------------------------------
# checkpoints and results


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def clean_state_dict(sd):
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k).replace("._orig_mod.", "."): v for k, v in sd.items()}


def save_checkpoint(path, obj):
    """torch.save to a temp file, fsync, then rename over `path`: the old file survives any crash."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, missing=None):
    """Read a checkpoint of this repo (weights cleaned of DDP / compile prefixes); a missing or bad file is a
    one-line UserError. `missing`: the message when there is no file (default: the --resume advice)."""
    check(os.path.isfile(path), missing or f"no checkpoint at {path}: drop --resume or point --out at the run to continue")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it or restore a copy") from None
    check(isinstance(ck, dict) and "model" in ck and "config" in ck,
          f"{path} is not a checkpoint written by this repo (no model/config keys)")
    ck["model"] = clean_state_dict(ck["model"])
    return ck


def nan_guard(loss, step, ckpt_path):
    """Stop with a message when the loss is not finite; the last checkpoint on disk is left intact."""
    if not math.isfinite(float(loss)):
        where = ckpt_path if ckpt_path and os.path.exists(ckpt_path) else "none written yet"
        raise UserError(f"loss is {float(loss)} at step {step}; stopped. Last good checkpoint: {where} "
                        "(lower the learning rate or check the data, then --resume)")


_COMMIT = []


def git_commit():
    """The commit this process started from ('abc1234', '+dirty' when tracked files differed then): read
    once, so a long run's results name the code it loaded, not whatever HEAD is when it finishes."""
    if not _COMMIT:
        try:
            here = os.path.dirname(os.path.abspath(__file__))
            out = subprocess.run(["git", "describe", "--always", "--dirty=+dirty", "--abbrev=7"], cwd=here,
                                 capture_output=True, text=True, timeout=5).stdout.strip()
            _COMMIT.append(out or None)
        except Exception:
            _COMMIT.append(None)
    return _COMMIT[0]


def hms(seconds):
    """A duration for log lines: 42s, 3m05s, 2h07m."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(done, total, elapsed_seconds):
    """Time left, as hms() writes it, when `done` of `total` units took `elapsed_seconds` at a steady rate:
    eta(25, 100, 60) == '3m00s'. '?' before the first unit is done; '0s' once done >= total. Every
    script's periodic log line carries it, so a log file alone (nohup, tee, a cluster log) says how long
    is left without the tqdm bar, which is shown only on a terminal."""
    if done <= 0:
        return "?"
    return hms(max(total - done, 0) * elapsed_seconds / done)


def write_results(out_dir, script, config, metrics, wall_seconds, device, train_seconds=None, name="results.json"):
    """out_dir/results.json (or `name`): config, metrics, device, timing, git commit; written atomically.
    Timing means the same in every script (README, Conventions): `wall_seconds`, the wall-clock time of
    the process that writes the file, from the start of main() to now (set-up, data loading and final
    evaluation included; an earlier, interrupted process of a resumed run is not counted); `train_seconds`,
    the time inside the training loop (periodic evaluations and checkpoints included), summed over every
    process of the run, --resume included."""
    res = {"script": script, "config": config, "metrics": metrics, "device": device_name(device),
           "wall_seconds": round(wall_seconds, 3),
           "train_seconds": None if train_seconds is None else round(train_seconds, 3),
           "git_commit": git_commit(), "torch": torch.__version__,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cpu":  # all three change the rounding, so a bitwise rerun needs them (README, Determinism)
        res["cpu"] = {"kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                      "model": cpuinfo()}
    return write_json(os.path.join(out_dir, name), res)


def cpuinfo(field="model name"):
    """A field of the first CPU in /proc/cpuinfo: its "model name", its maker ("vendor_id"); None off Linux."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith(field)), None)
    except OSError:
        return None


def write_json(path, obj, indent=2):
    """JSON to a temp file, then rename: a reader never sees half a file."""
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh, indent=indent, default=float)
    os.replace(path + ".tmp", path)
    return path


@torch.no_grad()
def extract_features(feature_fn, batches, seed=0):
    """Run `feature_fn(x, generator) -> {key: (B, D)}` over eval `batches` (a GPUBatches with train=False).
    The generator (seeded once) serves any noise the features need, so two calls agree exactly.
    Returns ({key: (N, D) float32}, labels), gathered from every rank."""
    g = torch.Generator(device=batches.device).manual_seed(seed)
    feats, ys = {}, []
    for x, y in batches:
        for k, f in feature_fn(x, g).items():
            feats.setdefault(k, []).append(f.float())
        ys.append(y)
    return {k: all_gather_cat(torch.cat(v)) for k, v in feats.items()}, all_gather_cat(torch.cat(ys))

# ----------------------------------------------------------------------------------------------------
# statistics over seeds: Student-t intervals and a rank-trend test (numpy only, no scipy)


def t_quantile(p, df):
    """Quantile of Student's t with `df` degrees of freedom (t_quantile(0.975, 9) = 2.2622): bisection on the
    CDF, whose density is integrated by Simpson's rule; accurate to ~1e-6 for df >= 1."""
    check(df >= 1 and 0.5 <= p < 1, f"t_quantile: need df >= 1 and 0.5 <= p < 1 (got {df}, {p})")
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t):  # P(T <= t) for t >= 0
        u = np.linspace(0.0, t, 4001)
        f = np.exp(logc - (df + 1) / 2 * np.log1p(u * u / df))
        return 0.5 + (u[1] - u[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values, level=0.95):
    """{'mean', 'std' (sample), 'ci95' (half width of the Student-t interval over the values), 'n'};
    std and ci95 are None for fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 2:
        return {"mean": float(v.mean()) if n else None, "std": None, "ci95": None, "n": n}
    std = float(v.std(ddof=1))
    return {"mean": float(v.mean()), "std": std, "ci95": t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n),
            "n": n}


def _ranks(x):
    """Ranks 1..n, tied values sharing their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(x, y, permutations=10000, seed=0):
    """Spearman rank correlation of y with x and its two-sided permutation p-value ((hits + 1) / (P + 1),
    y's ranks shuffled P times by a seeded generator). Returns (rho, p); rho is None if either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    if den == 0:
        return None, None
    rho = float(rx @ ry / den)
    perm = np.random.default_rng(seed).permuted(np.tile(ry, (permutations, 1)), axis=1)
    hits = int((np.abs(perm @ rx / den) >= abs(rho) - 1e-12).sum())
    return rho, (hits + 1) / (permutations + 1)
