"""Tests of common.py: real data files, generated stand-ins for the data sets we cannot ship,
the feature metrics against hand-computed cases, the GPU-resident iterator, checkpoints, distributed set-up."""
import json, math, os, pickle, signal, subprocess, sys, tarfile, time

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
from conftest import ROOT, need, run_script, side_by_side


# ---------------------------------------------------------------------------------------------- real data

def test_cifar10_real_files(data_dir):
    need(data_dir, "cifar10", "cifar-10-batches-py", "data_batch_1")
    x, y = common.load_cifar10(data_dir, train=True)
    assert x.shape == (50000, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(y.bincount(), torch.full((10,), 5000))
    mean = (x.float() / 255).mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=5e-4)
    xt, yt = common.load_cifar10(data_dir, train=False)
    assert xt.shape == (10000, 3, 32, 32) and torch.equal(yt.bincount(), torch.full((10,), 1000))


def test_mnist_real_files(data_dir):
    need(data_dir, "mnist", "MNIST", "raw")
    x, y = common.load_mnist(data_dir, train=True)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8 and y.shape == (60000,)
    assert y.min() == 0 and y.max() == 9 and y.bincount()[1] == 6742  # the official count of ones
    xt, yt = common.load_mnist(data_dir, train=False)
    assert xt.shape == (10000, 1, 28, 28) and yt[:5].tolist() == [7, 2, 1, 0, 4]
    assert 0.12 < (x.float() / 255).mean() < 0.14  # MNIST's well-known mean 0.1307


def test_imdb_real_archive(data_dir, tmp_path, monkeypatch):
    need(data_dir, "imdb")
    before = sorted(os.listdir(os.path.join(data_dir, "imdb")))
    d = common.load_imdb(data_dir, vocab_size=5000)
    assert sorted(os.listdir(os.path.join(data_dir, "imdb"))) == before  # extracted into the cache, never here
    assert len(d.train_x) == len(d.train_y) == 25000 and len(d.test_x) == len(d.test_y) == 25000
    assert d.train_y.sum() == 12500 and d.test_y.sum() == 12500
    assert len(d.vocab) == 5000 and d.vocab[:2] == ["<pad>", "<unk>"] and "movie" in d.vocab[:50]
    assert max(int(t.max()) for t in d.train_x[:500]) < 5000
    assert all(t.dtype == torch.int64 and len(t) > 0 for t in d.test_x[:500])


def test_tokenize_follows_basic_english():
    """torchtext's basic_english, worked by hand: apostrophes split off, double quotes dropped, ; : and <br />
    become spaces, . , ( ) ! ? stand alone (also inside numbers), everything lower-case."""
    assert common.tokenize("Great film!<br /><br />I'd watch it AGAIN.") == \
        ["great", "film", "!", "i", "'", "d", "watch", "it", "again", "."]
    assert common.tokenize('He said "no"; then: (twice) 3.5 stars, wow?!') == \
        ["he", "said", "no", "then", "(", "twice", ")", "3", ".", "5", "stars", ",", "wow", "?", "!"]
    assert common.tokenize("  tabs\tand\nnew-lines  ") == ["tabs", "and", "new-lines"]  # hyphens are kept
    assert common.tokenize("") == [] and common.tokenize('"";:') == []

# ----------------------------------------------------------------------------------- generated stand-ins

def _write_cifar100(root, n=20):
    d = root / "cifar100" / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / split, "wb") as fh:
            pickle.dump({b"data": data, b"fine_labels": list(range(n)), b"coarse_labels": [0] * n}, fh)
    return data


def test_cifar100_generated(tmp_path):
    data = _write_cifar100(tmp_path)
    x, y = common.load_cifar100(str(tmp_path), train=False)
    assert x.shape == (20, 3, 32, 32) and y.tolist() == list(range(20))
    assert torch.equal(x[3].reshape(-1), torch.from_numpy(data[3]))  # channel-major layout kept


@pytest.mark.parametrize("name,files", [("cifar10", "data_batch_1"), ("cifar100", "train"),
                                        ("mnist", "train-images-idx3-ubyte.gz")])
def test_missing_files_one_line_error(tmp_path, name, files):
    with pytest.raises(common.UserError) as e:
        common.load_dataset(name, str(tmp_path), train=True, download=False)
    msg = str(e.value)
    assert "\n" not in msg and files in msg and str(tmp_path) in msg and "--data-dir" in msg


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils as u
    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(u, "download_and_extract_archive", offline)
    with pytest.raises(common.UserError, match="could not download"):
        common.load_cifar10(str(tmp_path), download=True)


def _review_tree(root, n=3):
    for split in ("train", "test"):
        for lab, word in (("pos", "wonderful"), ("neg", "awful")):
            d = root / "aclImdb" / split / lab
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}_7.txt").write_text(f"A {word} movie.<br />Truly {word} {i}!")


def test_imdb_from_generated_archive_readonly(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _review_tree(src)
    data = tmp_path / "data" / "imdb"
    data.mkdir(parents=True)
    with tarfile.open(data / "aclImdb_v1.tar.gz", "w:gz") as tf:
        tf.add(src / "aclImdb", arcname="aclImdb")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data.chmod(0o555)  # a read-only data folder, like ../shared/data (root could still write: must not)
    try:
        d = common.load_imdb(str(tmp_path / "data"), vocab_size=100)
    finally:
        data.chmod(0o755)
    assert len(d.train_x) == 6 and d.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(list((tmp_path / "cache").rglob("aclImdb/test/pos/0_7.txt"))) == 1
    assert not (data / "aclImdb").exists()
    neg0 = [d.vocab[i] for i in d.train_x[0]]
    assert neg0 == ["a", "awful", "movie", ".", "truly", "awful", "0", "!"]
    # a small vocabulary: id 0 pads, id 1 is every word left out, then the most frequent words
    small = common.load_imdb(str(tmp_path / "data"), vocab_size=5)
    assert small.vocab[:2] == ["<pad>", "<unk>"] and len(small.vocab) == 5
    words = [small.vocab[i] for i in small.train_x[0]]
    assert words == [w if w in small.vocab else "<unk>" for w in neg0] and "<unk>" in words
    assert all(0 < i < 5 for t in small.train_x + small.test_x for i in t.tolist())


def test_imdb_two_runs_unpacking_at_once(tmp_path, monkeypatch):
    """Two runs started together both find no cache and both unpack; the one that renames second must use the
    first one's copy (it once died with 'Directory not empty') and leave no partial folder behind."""
    src = tmp_path / "src"
    _review_tree(src)
    (tmp_path / "data" / "imdb").mkdir(parents=True)
    with tarfile.open(tmp_path / "data" / "imdb" / "aclImdb.tar.xz", "w:xz") as tf:
        tf.add(src / "aclImdb", arcname="aclImdb")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    extract, raced = tarfile.TarFile.extractall, []

    def extract_then_other_run_finishes(self, path, *a, **kw):
        extract(self, path, *a, **kw)
        if not raced:  # the other run: unpacks and renames into place while ours is still unpacking
            raced.append(1)
            other = os.path.join(os.path.dirname(path), ".partial-other")
            extract(self, other, *a, **kw)
            os.rename(os.path.join(other, "aclImdb"), os.path.join(os.path.dirname(path), "aclImdb"))
            os.rmdir(other)

    monkeypatch.setattr(tarfile.TarFile, "extractall", extract_then_other_run_finishes)
    d = common.load_imdb(str(tmp_path / "data"), vocab_size=100)
    assert raced and len(d.train_x) == 6 and d.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    cache = [p for p in (tmp_path / "cache" / "decay-sim-selfmodel" / "imdb").iterdir() if p.name != "tokens"]
    assert len(cache) == 1 and sorted(p.name for p in cache[0].iterdir()) == ["aclImdb"]  # ours dropped, theirs kept


def test_imdb_token_cache_is_reused_and_rebuilt_when_a_review_changes(tmp_path, monkeypatch):
    """The second load reads the cached tokens (it must not open a review), gives the same tensors, and any vocabulary
    size cuts the cached full vocabulary as a fresh count would: by frequency, ties in order of first use
    (worked by hand for _review_tree). An edited review builds the cache again, in place of the old file."""
    _review_tree(tmp_path / "data" / "imdb")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = common.load_imdb(str(tmp_path / "data"), vocab_size=100)
    assert first.vocab == ["<pad>", "<unk>", "a", "awful", "movie", ".", "truly", "!", "wonderful", "0", "1", "2"]
    monkeypatch.setattr(common, "open", lambda *a, **k: pytest.fail("a review read again despite the cache"),
                        raising=False)  # shadows the builtin inside common only
    again = common.load_imdb(str(tmp_path / "data"), vocab_size=100)
    assert again.vocab == first.vocab and torch.equal(again.train_y, first.train_y)
    assert all(torch.equal(a, b) for a, b in zip(first.train_x + first.test_x, again.train_x + again.test_x))
    small = common.load_imdb(str(tmp_path / "data"), vocab_size=6)
    assert small.vocab == first.vocab[:6] and small.train_x[0].tolist() == [2, 3, 4, 5, 1, 3, 1, 1]
    monkeypatch.delattr(common, "open")
    (tmp_path / "data" / "imdb" / "aclImdb" / "test" / "pos" / "1_7.txt").write_text("A brand new review")
    edited = common.load_imdb(str(tmp_path / "data"), vocab_size=100)
    assert [edited.vocab[i] for i in edited.test_x[4]] == ["a", "<unk>", "<unk>", "<unk>"]
    assert edited.vocab == first.vocab  # the vocabulary comes from the training reviews only
    assert len(list((tmp_path / "cache").rglob("tokens-*.pt"))) == 1


def test_imdb_missing_one_line(tmp_path):
    with pytest.raises(common.UserError, match="aclImdb_v1.tar.gz"):
        common.load_imdb(str(tmp_path), download=False)


def test_imagenet100_folder(tmp_path):
    from PIL import Image
    classes = ["n01", "n02", "n03"]
    (tmp_path / "imagenet100.txt").write_text("n02\nn01\n")  # n03 exists on disk but is not listed
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.JPEG")
    tr, va = common.imagenet100_datasets(str(tmp_path), img_size=32)
    assert tr.classes == ["n01", "n02"] and len(tr) == 4 and len(va) == 4
    x, y = va[3]
    assert x.shape == (3, 32, 32) and y == 1
    # evaluation as MAE: the shorter side resized to 256/224 of the crop, then the centre crop
    resize, crop = va.transform.transforms[:2]
    assert resize.size == int(32 * 256 / 224) == 36 and crop.size == (32, 32)
    (tmp_path / "imagenet100.txt").write_text("n09\n")
    with pytest.raises(common.UserError, match="n09"):
        common.imagenet100_datasets(str(tmp_path), img_size=32)

# ----------------------------------------------------------------------------------------- GPU batches

def _batches(n=40, bs=8, **kw):
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 6, 6).contiguous()
    return common.GPUBatches(x, torch.arange(n), bs, mean=[0.0], std=[1 / 255], **kw)


def test_batches_shard_every_index_once():
    seen = []
    for rank in (0, 1):
        b = _batches(train=True, pad=0, flip=False, rank=rank, world_size=2, seed=3)
        assert len(b) == 5
        for x, y in b.epoch(2):
            assert x.shape == (4, 1, 6, 6) and torch.equal(x[:, 0, 0, 0], y.float())  # rows stay paired
            seen += y.tolist()
    assert sorted(seen) == list(range(40))
    single = torch.cat([y for _, y in _batches(train=True, pad=0, flip=False, seed=3).epoch(2)])
    assert sorted(single.tolist()) == list(range(40)) and not torch.equal(single, torch.arange(40))


def test_batches_union_of_ranks_equals_single_process():
    one = list(_batches(train=True, seed=1).epoch(0))
    r0, r1 = (list(_batches(train=True, seed=1, rank=r, world_size=2).epoch(0)) for r in (0, 1))
    assert len(one) == len(r0) == len(r1) > 0  # zip below would stop at the shortest
    for (x, y), (x0, y0), (x1, y1) in zip(one, r0, r1):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1) and torch.equal(y[1::2], y1)


def test_batches_resume_and_reshuffle():
    b = _batches(train=True, seed=5)
    full = [y for _, y in b.epoch(1)]
    tail = [y for _, y in b.epoch(1, start=3)]
    assert all(torch.equal(a, c) for a, c in zip(full[3:], tail)) and len(tail) == 2
    assert not torch.equal(torch.cat(full), torch.cat([y for _, y in b.epoch(2)]))
    b2 = _batches(train=True, seed=6)
    assert not torch.equal(torch.cat(full), torch.cat([y for _, y in b2.epoch(1)]))
    # every (seed, epoch) its own order: no seed's epoch replays another seed's
    orders = {tuple(torch.cat([y for _, y in _batches(train=True, seed=s).epoch(e)]).tolist())
              for s in range(4) for e in range(4)}
    assert len(orders) == 16


def test_batches_normalise_raw_pixels():
    """mean and std are given on the [0, 1] scale of torchvision's Normalize and applied to raw 0-255 pixels:
    (v / 255 - mean) / std, by hand."""
    img = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1)
    (x, y), = list(common.GPUBatches(img, torch.arange(3), 3, train=False, mean=[0.2], std=[0.4]))
    assert torch.allclose(x.flatten(), torch.tensor([-0.5, 0.0, 2.0]), atol=1e-6) and y.tolist() == [0, 1, 2]


def test_batches_crop_and_flip_are_real_augmentations():
    n = 64
    img = torch.randint(1, 256, (n, 3, 8, 8), dtype=torch.uint8)
    b = common.GPUBatches(img, torch.arange(n), 64, train=True, mean=[0, 0, 0], std=[1 / 255] * 3, pad=2, seed=0)
    x, y = next(iter(b))
    padded = torch.nn.functional.pad(img.float(), (2, 2, 2, 2))
    shifted = flipped = apart = 0
    for xi, i in zip(x, y):
        hits = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                if torch.equal(xi, (lambda w: w.flip(2) if f else w)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert hits, "output is not a crop of the zero-padded image"
        shifted += hits[0][:2] != (2, 2)
        flipped += hits[0][2]
        apart += hits[0][0] != hits[0][1]
    assert shifted > n // 2 and 10 < flipped < n - 10
    assert apart > n // 2  # row and column offsets drawn apart (equal about 1 time in 5), each used for its axis
    # offsets 0..2p inclusive: the crop reaches a full `pad` pixels of border on every side
    dy, dx, flip = b._draw(4096, torch.Generator().manual_seed(0))
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(5))
    assert 0.47 < flip.float().mean() < 0.53  # each image mirrored with probability 1/2


def test_peak_flops_table(monkeypatch):
    """Dense bf16 peaks (MFU's denominator): the H200 has the H100 SXM's tensor cores; unknown devices get None."""
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165e12), ("cpu (2 cores)", None)):
        monkeypatch.setattr(common, "device_name", lambda device, name=name: name)
        assert common.peak_flops(torch.device("cpu")) == peak, name
    # MFU: 0.2 of two H100s' peak is 395.6 TFLOP/s; unknown on a CPU or before a rate was measured
    assert common.mfu(395.6e12, 989e12, gpus=2) == pytest.approx(0.2)
    assert common.mfu(98.9e12, 989e12) == pytest.approx(0.1)
    assert common.mfu(1e12, None) is None and common.mfu(0, 989e12) is None


def test_batches_eval_keeps_order_and_last_batch():
    b = _batches(n=10, bs=4, train=False, pad=4, flip=True)
    ys = [y for _, y in b]
    assert [len(y) for y in ys] == [4, 4, 2] and torch.equal(torch.cat(ys), torch.arange(10))
    x, _ = next(iter(b))
    assert torch.equal(x[:, 0, 0, 0], torch.arange(4.0))  # no augmentation, normalisation exact


def test_batches_rejects_indivisible_batch():
    with pytest.raises(common.UserError, match="--batch-size"):
        _batches(bs=9, train=True, world_size=2)

# ------------------------------------------------------------------------------------ feature metrics

def test_effective_rank_known_spectra():
    assert common.effective_rank(torch.eye(4), covariance=False) == pytest.approx(math.log(4))
    assert common.effective_rank(torch.eye(4), use_exp=True, covariance=False) == pytest.approx(4)
    assert common.effective_rank(torch.diag(torch.tensor([5.0, 0, 0])), covariance=False) == pytest.approx(0, abs=1e-12)
    h = common.effective_rank(torch.diag(torch.tensor([3.0, 1.0])), covariance=False)
    assert h == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    # covariance of these rows is diag(2a^2, 2b^2, 0) / 3: eigenvalues in ratio a^2 : b^2
    a, b = 2.0, 1.0
    x = torch.tensor([[a, 0, 0], [-a, 0, 0], [0, b, 0], [0, -b, 0]])
    assert common.effective_rank(x) == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)))
    assert common.effective_rank(x + 7.0) == pytest.approx(common.effective_rank(x))  # centred
    iso = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))
    assert common.effective_rank(iso, use_exp=True) == pytest.approx(8, rel=0.01)


def _clusters(n, d=32, c=10, noise=0.3, seed=0, random_labels=False):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(0, c, (n,), generator=g)
    f = centres[y] + noise * torch.randn(n, d, generator=g)
    if random_labels:
        y = torch.randint(0, c, (n,), generator=g)
    return f, y


def test_knn_and_probe_separable_vs_random():
    tr_f, tr_y = _clusters(2000)
    te_f, te_y = _clusters(500, seed=1)
    assert common.knn_accuracy(tr_f, tr_y, te_f, te_y) > 99
    assert common.linear_probe(tr_f, tr_y, te_f, te_y, epochs=10) > 99
    # the test set goes through the head with the training set's BatchNorm statistics: shifted test features
    # fall off (with the test batch's own statistics the shift would vanish), and one test row is allowed
    assert common.linear_probe(tr_f, tr_y, te_f + 20, te_y, epochs=10) < 50
    assert common.linear_probe(tr_f, tr_y, te_f[:1], te_y[:1], epochs=1) in (0.0, 100.0)
    tr_f, tr_y = _clusters(2000, random_labels=True)
    te_f, te_y = _clusters(500, seed=1, random_labels=True)
    assert common.knn_accuracy(tr_f, tr_y, te_f, te_y) < 20  # chance is 10 %
    assert common.linear_probe(tr_f, tr_y, te_f, te_y, epochs=10) < 20


def test_knn_hand_case():
    # one test point; neighbours: two of class 1 at sim 0.6, one of class 0 at sim 1.0.
    # weights exp(sim/T): class 0 gets e^{1/T}, class 1 gets 2 e^{0.6/T}; T = 1 -> class 1 wins, T = 0.1 -> class 0
    tr = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    ty = torch.tensor([0, 1, 1])
    te, tey = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert common.knn_accuracy(tr, ty, te, tey, k=3, T=1.0) == 100.0
    assert common.knn_accuracy(tr, ty, te, tey, k=3, T=0.1) == 0.0
    # only the k nearest vote: at T = 1, k = 1 hears class 0 alone and k = 2 weighs e^1 against e^0.6
    assert common.knn_accuracy(tr, ty, te, tey, k=1, T=1.0) == 0.0
    assert common.knn_accuracy(tr, ty, te, tey, k=2, T=1.0) == 0.0
    # cosine similarity: a neighbour's length does not count (a dot product would make the class-0 row,
    # shrunk to length 0.1, the farthest of the three, and class 1 would win at T = 0.1)
    short = tr * torch.tensor([[0.1], [1.0], [1.0]])
    assert common.knn_accuracy(short, ty, te * 5, tey, k=3, T=0.1) == 0.0


def test_linear_probe_follows_the_mae_protocol(monkeypatch):
    """What the probe trains and how: only a Linear layer's weight and bias (BatchNorm without affine
    parameters in front), SGD momentum 0.9 at the given lr and weight decay, the lr falling along a half cosine
    to 0 over every step of every epoch."""
    seen = {"lrs": []}

    class Recording(torch.optim.SGD):
        def __init__(self, params, **kw):
            params = list(params)
            seen["shapes"], seen["kw"] = sorted(tuple(p.shape) for p in params), kw
            super().__init__(params, **kw)

        def step(self, closure=None):
            seen["lrs"].append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(common.torch.optim, "SGD", Recording)
    tr_f, tr_y = _clusters(300)
    te_f, te_y = _clusters(100, seed=1)
    acc = common.linear_probe(tr_f, tr_y, te_f, te_y, epochs=4, lr=0.2, batch_size=64, wd=1e-4)
    assert acc > 90
    d, c = tr_f.shape[1], int(tr_y.max()) + 1
    assert seen["shapes"] == sorted([(c, d), (c,)])  # no BatchNorm weight or bias
    assert seen["kw"] == {"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-4}
    steps = 4 * math.ceil(300 / 64)  # the last batch of 300 / 64 has 44 rows: every batch steps
    assert len(seen["lrs"]) == steps
    assert seen["lrs"] == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)])


def test_extract_features_noise_comes_from_the_seed():
    """feature_fn's generator is seeded by `seed`: the same seed gives the same noisy features, another seed other
    ones (diffusion probes noise their inputs with it)."""
    b = common.GPUBatches(torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8), torch.arange(6), 4, train=False)
    fn = lambda x, g: {"f": x.flatten(1) + torch.randn(x.flatten(1).shape, generator=g)}
    (a, y), (a2, _), (c, _) = (common.extract_features(fn, b, seed=s) for s in (3, 3, 4))
    assert torch.equal(a["f"], a2["f"]) and not torch.equal(a["f"], c["f"]) and torch.equal(y, torch.arange(6))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(a["f"][:4], next(iter(b))[0].flatten(1) + torch.randn(4, 48, generator=g))
    # one stream for the whole pass: the second batch's noise goes on from the first's, it does not repeat it
    noise = common.extract_features(lambda x, g: {"n": torch.randn(len(x), 48, generator=g)}, b, seed=3)[0]["n"]
    assert not torch.equal(noise[4:6], noise[:2])


def test_evaluate_features_is_deterministic():
    tr_f, tr_y = _clusters(500)
    te_f, te_y = _clusters(200, seed=1)
    a = common.evaluate_features(tr_f, tr_y, te_f, te_y, seed=3, probe_epochs=3)
    b = common.evaluate_features(tr_f, tr_y, te_f, te_y, seed=3, probe_epochs=3)
    assert a == b and set(a) == {"linear_probe", "knn", "erank", "erank_exp", "feat_norm"}
    assert a["erank_exp"] == pytest.approx(math.exp(a["erank"]))
    # the rank and the norm describe the test features (the ones every table reports), not the training ones
    c = common.evaluate_features(tr_f * 3, tr_y, te_f, te_y, seed=3, probe_epochs=3)
    assert c["feat_norm"] == pytest.approx(te_f.norm(dim=1).mean().item()) and c["erank"] == a["erank"]

# ---------------------------------------------------------------------------------- checkpoints, misc

def test_checkpoint_round_trip_compiled_and_ddp_names(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    compiled = torch.compile(net)  # wrapping only; state_dict keys gain "_orig_mod."
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    wrapper = nn.Module()
    wrapper.module = compiled  # what DDP(torch.compile(model)) looks like to state_dict
    assert common.unwrap(wrapper) is net
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"model": wrapper.state_dict(), "config": {"lr": 0.1}, "step": 7})
    ck = common.load_checkpoint(path)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fresh.load_state_dict(ck["model"])  # strict: every key matched after stripping
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    assert ck["step"] == 7 and ck["config"] == {"lr": 0.1} and os.listdir(tmp_path) == ["ckpt.pt"]
    # a compiled submodule inside a DDP-wrapped model (torch.compile on one block) loses its prefix too
    sd = common.clean_state_dict({"module._orig_mod.blocks.0._orig_mod.fc.weight": 1, "head.bias": 2})
    assert sd == {"blocks.0.fc.weight": 1, "head.bias": 2}


def test_checkpoint_atomic_and_corrupt(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "config": {}})
    good = open(path, "rb").read()

    def crash(obj, fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError):
        common.save_checkpoint(path, {"model": {}, "config": {}})
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["ckpt.pt"]
    monkeypatch.undo()
    open(path, "wb").write(good[: len(good) // 2])
    with pytest.raises(common.UserError, match="not a readable checkpoint"):
        common.load_checkpoint(path)
    with pytest.raises(common.UserError, match="no checkpoint"):
        common.load_checkpoint(str(tmp_path / "nope.pt"))
    torch.save({"weights": 1}, path)
    with pytest.raises(common.UserError, match="not a checkpoint written by this repo"):
        common.load_checkpoint(path)


def test_nan_guard_and_parse_list(tmp_path):
    common.nan_guard(torch.tensor(1.5), 3, None)
    with pytest.raises(common.UserError, match="step 12.*none written yet"):
        common.nan_guard(float("nan"), 12, str(tmp_path / "ckpt.pt"))
    for bad in (float("inf"), float("-inf"), torch.tensor(float("inf"))):  # overflow stops the run as NaN does
        with pytest.raises(common.UserError, match="at step 4"):
            common.nan_guard(bad, 4, None)
    # --resume refuses any differing flag outside the safe set, also one only the run or only this call has
    common.check_resume_config({"lr": 0.1, "out": "a"}, {"lr": 0.1, "out": "b"}, {"out"}, "RUN")
    for saved, now in (({"lr": 0.1}, {"lr": 0.2}), ({"lr": 0.1}, {"lr": 0.1, "rho": 0.2}), ({"lr": 0.1, "rho": 0.2}, {"lr": 0.1})):
        with pytest.raises(common.UserError, match="--resume: RUN was made with other settings"):
            common.check_resume_config(saved, now, {"out"}, "RUN")
    assert common.parse_list("0, 1,10", float, "--aw") == [0.0, 1.0, 10.0]
    with pytest.raises(common.UserError, match="--aw is empty"):
        common.parse_list(" , ", float, "--aw")
    with pytest.raises(common.UserError, match="--layers"):
        common.parse_list("1,x", int, "--layers")


def test_out_dir_and_results(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(common.UserError, match="--out"):
        common.prepare_out_dir(str(f / "run"))
    out = common.prepare_out_dir(str(tmp_path / "a" / "b"))
    p = common.write_results(out, "demo", {"lr": 0.1}, {"acc": np.float32(91.5)}, 1.23456, torch.device("cpu"))
    r = json.load(open(p))
    assert r["config"] == {"lr": 0.1} and r["metrics"]["acc"] == 91.5 and r["wall_seconds"] == 1.235
    assert r["script"] == "demo" and r["device"].startswith("cpu")
    assert r["cpu"] == {"kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                        "model": common.cpuinfo()}
    if os.path.exists("/proc/cpuinfo"):  # Linux: the "model name" line, as lscpu shows it
        with open("/proc/cpuinfo") as fh:
            names = {ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")}
        assert common.cpuinfo() in names


def test_stop_signal():
    stop = common.StopSignal(stop_at_step=5)
    assert not stop.requested(4) and stop.requested(5)
    stop = common.StopSignal()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested(0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_import_has_no_side_effects(tmp_path):
    p = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import common"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "" and os.listdir(tmp_path) == []


def test_setup_distributed_single():
    d = common.setup_distributed("cpu")
    assert (d.rank, d.world_size, d.is_main, d.device.type) == (0, 1, True, "cpu")
    t = torch.arange(3)
    assert common.all_gather_cat(t) is t
    with pytest.raises(common.UserError, match="--device"):
        common.setup_distributed("tpu")


def test_compiled_resnets_narrower_than_8_channels_are_refused_on_the_cpu_only():
    cpu = common.setup_distributed("cpu")
    cuda = cpu._replace(device=torch.device("cuda"))  # only the device type is read: no GPU needed
    for width in (1, 4, 7):
        with pytest.raises(common.UserError, match=rf"--width {width} .*--width 8 or more, or drop --compile"):
            common.check_cpu_compile_width(cpu, True, width)
    for d, compiled, width in [(cpu, True, 8), (cpu, True, 64), (cpu, False, 4), (cuda, True, 4)]:
        common.check_cpu_compile_width(d, compiled, width)  # passes: wide enough, eager, or CUDA


DIST_SCRIPT = r"""
import json, os, sys, torch
sys.path.insert(0, os.getcwd())
import common


def main():
    d = common.setup_distributed("cpu")
    rows = torch.full((d.rank + 1, 2), float(d.rank))          # rank 0 has 1 row, rank 1 has 2
    g = common.all_gather_cat(rows)
    stop = common.StopSignal(every=4)
    stop.flag = d.rank == 1            # a signal reached rank 1 only
    out = {"rank": d.rank, "world": d.world_size, "main": d.is_main, "gathered": g.tolist(),
           "stop3": stop.requested(3), "stop4": stop.requested(4)}
    with open(os.path.join(sys.argv[1], f"r{d.rank}.json"), "w") as fh:
        json.dump(out, fh)
    common.cleanup_distributed()


common.run_main(main)
"""


def test_setup_distributed_torchrun(tmp_path):
    script = tmp_path / "dist_check.py"
    script.write_text(DIST_SCRIPT)
    p = run_script([script, tmp_path], torchrun=2, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    r = [json.load(open(tmp_path / f"r{i}.json")) for i in (0, 1)]
    assert [x["rank"] for x in r] == [0, 1] and all(x["world"] == 2 for x in r)
    assert [x["main"] for x in r] == [True, False]
    assert r[0]["gathered"] == r[1]["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert all(not x["stop3"] and x["stop4"] for x in r)  # a signal on one rank stops every rank, at a check step


LEAVE_SCRIPT = r"""
import atexit, os, sys
sys.path.insert(0, os.getcwd())
import common
out, fail = sys.argv[1], sys.argv[2]


class Teardown:  # a module global: only the interpreter's own teardown deletes it (builtins gone by then)
    def __del__(self, path=os.path.join(out, "teardown" + os.environ.get("RANK", "0")), _open=open):
        _open(path, "w").close()


keep = Teardown()


def main():
    d = common.setup_distributed("cpu")
    atexit.register(lambda: open(os.path.join(out, f"atexit{d.rank}"), "w").close())
    sys.stdout.write(f"rank {d.rank} done")  # no newline, no flush: leave_process must not lose it
    common.cleanup_distributed()
    if fail == "user":
        raise common.UserError("bad flag: fix it")
    if fail == "crash":
        raise RuntimeError("an uncaught failure")


common.run_main(main)
"""


@pytest.mark.parametrize("fail,code", [("ok", 0), ("user", 2), ("crash", 1)])
def test_gloo_ranks_leave_without_interpreter_teardown(tmp_path, fail, code):
    """A rank that joined gloo exits through leave_process: its atexit handlers run and its buffered output
    arrives, the exit code is what Python's own exit would give (0; 2 for a UserError; 1 after an uncaught
    exception, whose traceback is printed), and the teardown that can abort it is skipped (a global's __del__
    never runs). Without torchrun the same script ends the ordinary way."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_SCRIPT)
    single = tmp_path / "single"
    single.mkdir()
    env = {"PYTHONUNBUFFERED": None}
    p, p1 = side_by_side(lambda: run_script([script, tmp_path, fail], torchrun=2, timeout=180, env=env),
                         lambda: run_script([script, single, fail], env=env))
    assert p.returncode == (1 if code else 0), p.stderr[-3000:]  # torchrun: 1 when a rank failed
    assert (f"exitcode  : {code}" in p.stderr) == bool(code), p.stderr[-3000:]
    assert ("error: bad flag: fix it" in p.stderr) == (fail == "user")
    assert (p.stderr.count("Traceback (most recent call last)") >= 2) == (fail == "crash")  # both ranks'
    assert ("RuntimeError: an uncaught failure" in p.stderr) == (fail == "crash")
    assert "rank 0 done" in p.stdout and "rank 1 done" in p.stdout
    assert sorted(os.listdir(tmp_path)) == ["atexit0", "atexit1", "leave.py", "single"]
    assert p1.returncode == code and "rank 0 done" in p1.stdout
    assert sorted(os.listdir(single)) == ["atexit0", "teardown0"]  # no gloo: the ordinary exit, __del__ runs


CRASH_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, os.getcwd())
import common
from torch.nn.parallel import DistributedDataParallel as DDP


def main():
    d = common.setup_distributed("cpu")
    try:
        model = DDP(torch.nn.Linear(4, 4))
        for step in range(1000):
            if d.rank == 0 and step == 3:
                raise RuntimeError("rank 0 failed at step 3")  # e.g. a full disk: this rank alone
            model(torch.randn(2, 4)).sum().backward()          # rank 1 goes on to its next gradient sync
    finally:
        common.cleanup_distributed()


common.run_main(main)
"""


def test_a_rank_that_fails_alone_ends_the_job_at_once(tmp_path):
    """An exception on one rank must not leave the others waiting: cleanup_distributed skips its barrier while
    an exception is on its way out (with the barrier, rank 0 waited there and rank 1 in its gradient sync,
    until gloo's 30-minute timeout). The job ends in seconds, non-zero, with rank 0's own error."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    try:
        p = run_script([script], torchrun=2, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a rank that failed alone left the job hanging (over 120 s)")
    assert p.returncode != 0 and "rank 0 failed at step 3" in p.stdout + p.stderr


# ----------------------------------------------------------------------------------- statistics over seeds

@pytest.mark.parametrize("df, t", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423), (1000, 1.9623)])
def test_t_quantile_matches_the_table(df, t):
    assert common.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)


def test_t_quantile_other_levels_and_bad_input():
    assert common.t_quantile(0.5, 7) == pytest.approx(0, abs=1e-9)
    assert common.t_quantile(0.95, 9) == pytest.approx(1.8331, abs=1e-4)
    with pytest.raises(common.UserError):
        common.t_quantile(0.975, 0)


def test_mean_ci_by_hand():
    r = common.mean_ci([1, 2, 3, 4])
    assert r["mean"] == 2.5 and r["n"] == 4 and r["std"] == pytest.approx(math.sqrt(5 / 3))
    assert r["ci95"] == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-6)
    assert common.mean_ci([7.0]) == {"mean": 7.0, "std": None, "ci95": None, "n": 1}
    assert common.mean_ci([3.0, 3.0])["ci95"] == 0


def test_spearman_with_ties_and_its_permutation_p():
    rho, p = common.spearman([0, 0, 1, 1], [1, 2, 3, 4])
    assert rho == pytest.approx(4 / math.sqrt(20))  # average ranks (1.5, 1.5, 3.5, 3.5) against 1..4
    rho, _ = common.spearman([0, 0, 1, 2], [1, 2, 3, 4])  # an uneven tie: ranks (1.5, 1.5, 3, 4), not (1, 1, 3, 4)
    assert rho == pytest.approx(math.sqrt(0.9))  # centred: (-1, -1, .5, 1.5) . (-1.5, -.5, .5, 1.5) = 4.5 / sqrt(4.5 * 5)
    # two-sided and counting exact ties as hits: a perfect trend over 4 values is met by 2 of the 4! orders
    assert common.spearman(range(4), range(4))[1] == pytest.approx(2 / 24, abs=0.01)
    y = [0.3, 1.2, 0.1, 2.5, 2.0, 3.1]
    assert common.spearman(range(6), y)[1] == common.spearman(range(6), [-v for v in y])[1]
    rho, p = common.spearman(range(7), [1, 3, 2, 5, 8, 9, 20])
    assert rho == pytest.approx(1 - 6 * 2 / (7 * 48)) and p < 0.01  # one swapped pair; exact p = 2 * 2 / 5040
    rho, p = common.spearman(range(7), [-v for v in range(7)])
    assert rho == -1 and p < 0.01
    g = torch.Generator().manual_seed(0)
    _, p = common.spearman(range(40), torch.randn(40, generator=g).tolist())
    assert p > 0.05  # noise: no trend found
    assert common.spearman([1, 2, 3], [5, 5, 5]) == (None, None)
    # p = (hits + 1) / (P + 1): never 0; for a perfect trend over 10 values (2 of 10! orders reach |rho| = 1)
    # no shuffle hits, so p is the floor 1 / (P + 1)
    rho, p = common.spearman(range(10), range(10), permutations=999)
    assert rho == pytest.approx(1.0) and p == 1 / 1000


def test_hms():
    assert [common.hms(s) for s in (0, 42.4, 185, 7620, -3)] == ["0s", "42s", "3m05s", "2h07m", "0s"]


def test_eta_hand_computed():
    # remaining = (total - done) * elapsed / done, written by hms
    assert common.eta(25, 100, 60) == "3m00s"        # 75 units at 2.4 s each = 180 s
    assert common.eta(1, 3, 10) == "20s"
    assert common.eta(10, 1000, 36) == "59m24s"      # 990 * 3.6 s = 3564 s
    assert common.eta(50, 6000, 150) == "4h57m"      # 5950 * 3 s = 17850 s = 4 h 57 m 30 s
    assert common.eta(7, 7, 99) == "0s" and common.eta(9, 7, 99) == "0s"  # finished (or overshot)
    assert common.eta(0, 100, 5) == "?" and common.eta(0, 100, 0) == "?"  # nothing done yet: no rate


def test_profile_step_counts_and_times_a_known_step():
    """A 'step' of exactly three tensor operations (mul, add, sum) is counted as three; a compiled-like step
    (here another callable) is the one timed and profiled, the eager one only counted; the costliest rows
    are the step's own operations, and the times are positive and per step."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    calls = {"eager": 0, "run": 0}

    def eager():
        calls["eager"] += 1
        return (a * b + a).sum()

    def run():
        calls["run"] += 1
        return a @ b

    p = common.profile_step(run, torch.device("cpu"), steps=3, eager_step=eager, warmup=2)
    assert p["ops"] == 3
    assert calls == {"eager": 2, "run": 2 + 3 + 3}  # eager: warm-up + count; run: warm-up, timed, profiled
    assert p["steps"] == 3 and p["wall_ms"] > 0 and p["wall_profiled_ms"] > 0
    assert p["device_busy_ms"] is None and p["busy_fraction"] is None and p["kernels"] is None  # a CPU
    assert p["top"][0][0] == "aten::mm" and p["top"][0][1] > 0  # the profiled step is `run`, not `eager`
    assert "3 operations dispatched (eager)" in common.profile_text(p) and "aten::mm" in common.profile_text(p)
    # timed: milliseconds per call, not for all n calls together (3 calls of >= 10 ms each)
    assert 10 <= common.timed(lambda: time.sleep(0.01), 3, torch.device("cpu")) < 30


def test_linear_probe_with_a_one_row_last_batch():
    # 1025 training rows in batches of 1024 leave one row: BatchNorm cannot train on it, so it is skipped
    # (MAE's protocol drops no other data); the probe still learns separable clusters
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 3
    y = torch.randint(0, 4, (1025,), generator=g)
    f = centres[y] + 0.1 * torch.randn(1025, 8, generator=g)
    assert common.linear_probe(f, y, f[:200], y[:200], epochs=3) > 95


def test_knn_default_temperature_is_wu_et_als_0_07():
    """One class-0 neighbour at cosine s1 against two class-1 neighbours at s2: class 0 wins iff exp(s1/T) > 2
    exp(s2/T), i.e. iff s1 - s2 > T ln 2. Wu et al. 2018's T = 0.07 gives T ln 2 = 0.0485: a gap of 0.060 goes to
    class 0, a gap of 0.045 to class 1 (so T lies in (0.065, 0.087))."""
    def case(s1, s2):
        r1, r2 = math.sqrt(1 - s1 ** 2), math.sqrt(1 - s2 ** 2)
        tr = torch.tensor([[s1, r1], [s2, r2], [s2, -r2]], dtype=torch.float64).float()
        return common.knn_accuracy(tr, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert case(0.90, 0.84) == 100.0  # 0.060 > 0.0485: the single closer neighbour outvotes the pair
    assert case(0.90, 0.855) == 0.0   # 0.045 < 0.0485: the pair wins (T = 0.1 or 0.05 would flip one of these)


def _imagenet_folder(root):
    from PIL import Image
    ramp = np.tile(np.arange(224, dtype=np.uint8), (224, 1))  # pixel value = its column
    img = np.stack([ramp] * 3, -1)
    (root / "imagenet100.txt").write_text("n01\n")
    for split in ("train", "val"):
        (root / split / "n01").mkdir(parents=True)
        Image.fromarray(img).save(root / split / "n01" / "0.png")
    return Image.fromarray(img)


def test_imagenet100_train_crop_is_maes_scale_and_flips(tmp_path):
    """Train transform on a 224 px image whose value is its column: an output's first and last column read the crop's
    left and right edge. MAE's RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3) keeps a crop width of at least sqrt(0.2
    * 3/4) = 0.387 of the side (torchvision's default 0.08 allows 0.245); RandomHorizontalFlip reverses the ramp in
    about half the draws and never without it."""
    img = _imagenet_folder(tmp_path)
    tr, _ = common.imagenet100_datasets(str(tmp_path), img_size=32)
    mean, std = common.DATASET_STATS["imagenet100"]
    torch.manual_seed(0)
    widths, flips = [], 0
    for _ in range(300):
        x = tr.transform(img)[0] * std[0] + mean[0]  # back to [0, 1] = column / 255
        left, right = x[:, 0].mean().item() * 255, x[:, -1].mean().item() * 255
        widths.append(abs(right - left) * 32 / 31 / 224)  # edge-column centres span 31/32 of the crop
        flips += left > right
    assert min(widths) > 0.36, min(widths)  # >= 0.387 up to resampling; scale 0.08 goes well below
    assert 100 < flips < 200, flips  # Binomial(300, 1/2): a fair flip


def test_cifar10_stats_are_the_training_split_s(data_dir):
    """DATASET_STATS['cifar10'] is the channel mean / std of the training split: recomputed here from the 50,000
    real images through per-channel pixel histograms (the often-copied std 0.2023, 0.1994, 0.2010 is not it)."""
    need(data_dir, "cifar10", "cifar-10-batches-py", "data_batch_1")
    x, _ = common.load_cifar10(data_dir, train=True)
    v = torch.arange(256, dtype=torch.float64) / 255
    mean, std = common.DATASET_STATS["cifar10"]
    for c in range(3):
        h = torch.bincount(x[:, c].flatten().long(), minlength=256).double()
        m = (h * v).sum() / h.sum()
        assert m.item() == pytest.approx(mean[c], abs=1e-4)
        assert ((h * (v - m) ** 2).sum() / h.sum()).sqrt().item() == pytest.approx(std[c], abs=1e-4)


def test_resume_refusal_counts_the_flags_it_leaves_out():
    """The message lists the first 4 differing flags (sorted) and says how many more there are: 4 differences -> no
    'more', 5 -> 'and 1 more' naming only a..d."""
    saved = {k: 0 for k in "abcde"}
    with pytest.raises(common.UserError) as e:
        common.check_resume_config(saved, dict(saved, a=1, b=1, c=1, d=1), set(), "RUN")
    assert "--d 1 (run: 0)" in str(e.value) and "more" not in str(e.value)
    with pytest.raises(common.UserError) as e:
        common.check_resume_config(saved, {k: 1 for k in "abcde"}, set(), "RUN")
    assert "--d 1 (run: 0) and 1 more;" in str(e.value) and "--e" not in str(e.value)
