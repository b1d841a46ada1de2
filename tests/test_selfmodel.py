"""selfmodel.py: the LLC estimator where the answer is known, the self-model head and width by hand, learning
on real MNIST, IMDB and CIFAR-10 data, and the script as a user sees it (exact resume, torchrun, NaN stop,
bad flags)."""
import json, math, os, statistics
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import selfmodel as S
from conftest import assert_clean_error, need, run_in_process, run_script, side_by_side

CPU = common.Dist(0, 0, 1, torch.device("cpu"), True)


class NoStop:
    """Stands in for common.StopSignal in-process (which would take over pytest's signal handlers)."""
    stop_at = None

    def requested(self, step):
        return False


@pytest.fixture(scope="module")
def mnist(data_dir):
    need(data_dir, "mnist", "MNIST", "raw", "t10k-images-idx3-ubyte.gz")
    return data_dir


def sweep(argv, out):
    """The script's Sweep in this process, on the CPU, for the flags `argv`."""
    args = S.get_args(argv + ["--out", str(out), "--device", "cpu"])
    common.prepare_out_dir(args.out)
    return S.Sweep(args, CPU, S.Data(args, CPU), None)

# ----------------------------------------------------------------------------------------------------
# the LLC estimator on a model whose learning coefficient is known


def linear_regression(d, n=2000, seed=0):
    """y = X w + N(0, 1) and the model at its least-squares optimum w*."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = X @ torch.randn(d, 1, generator=g) + torch.randn(n, 1, generator=g)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y).solution.T)
    return model, X, y


def half_mse(out, y):  # the Gaussian negative log-likelihood with unit noise, up to a constant
    return 0.5 * ((out - y) ** 2).mean()


@pytest.mark.parametrize("d", [4, 16])
def test_llc_of_a_regular_model_is_half_its_dimension(d):
    """Linear regression is regular, so its learning coefficient is d/2.

    Tolerance 10% of d/2, and why: near w* nbeta * (L(w) - L(w*)) = nbeta/2 (w - w*)' H (w - w*) with
    H = X'X/n ~ I, so the localised posterior is Gaussian and the exact expectation is
    1/2 sum_i nbeta h_i / (nbeta h_i + gamma) = d/2 - 0.4% here (gamma = 1, nbeta = 263); the Euler step adds
    about eps * (nbeta + gamma) / 4 = +2%. Monte-Carlo: each draw's value is ~ chi2_d / 2 (variance d/2),
    correlated over ~2 / (eps * nbeta) = 25 steps, so 8 chains x 1500 kept draws give ~480 independent
    ones: a standard error of ~3% of d/2 for d = 4 (less for 16). 10% is three of those plus the biases;
    an estimator off by a factor (d, or nbeta forgotten) or not scaling with d fails.
    """
    model, X, y = linear_regression(d)
    llc = S.estimate_llc(model, half_mse, [(X, y)], eps=3e-4, gamma=1.0, nbeta=2000 / math.log(2000),
                         num_chains=8, num_draws=3000, seed=0)
    assert abs(llc - d / 2) < 0.1 * d / 2, llc


class Power(nn.Module):
    """y = w^p x with a single weight: at w = 0 the loss grows as w^(2p), a singular model for p >= 2."""

    def __init__(self, p):
        super().__init__()
        self.p, self.w = p, nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.w ** self.p * x


@pytest.mark.parametrize("p,tol", [(1, 0.03), (2, 0.045), (3, 0.04)])
def test_llc_of_a_singular_model_is_its_rlct(p, tol):
    """y = w^p x on data whose least-squares weight is exactly 0: nbeta (L(w) - L(0)) = A w^(2p) with
    A = nbeta mean(x^2) / 2, so the tempered posterior is exp(-A w^(2p)) (gamma 0.01 barely localises) and
    E[A w^(2p)] = 1 / (2p): the RLCT, below d/2 = 1/2 for p >= 2, the case neural networks are in.
    p = 1 is a linear AR(1) chain whose stationary value is exact with the Euler step included:
    w <- (1 - eps k) w + N(0, eps), k = A + gamma / 2, gives A eps / (1 - (1 - eps k)^2) = 0.535, 7% over 1/2.
    Over seeds the estimate (16 chains x 4000 kept draws) spreads by ~0.009 (p = 1) and ~0.016 (p = 2, 3):
    the tolerances are about three of those. An estimator that reads d/2 whatever the geometry, or a sampler
    with another noise scale or step, fails."""
    n = 2000
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g)
    y = y - x * (x * y).sum() / (x * x).sum()  # mean(x y) = 0: w* = 0 exactly
    nbeta, eps, gamma = n / math.log(n), 1e-3, 0.01
    llc = S.estimate_llc(Power(p), half_mse, [(x, y)], eps=eps, gamma=gamma, nbeta=nbeta, num_chains=16,
                         num_draws=8000, seed=0)
    A = nbeta * (x ** 2).mean().item() / 2
    k = A + gamma / 2
    expect = A * eps / (1 - (1 - eps * k) ** 2) if p == 1 else 1 / (2 * p)
    assert abs(llc - expect) < tol, (llc, expect)


def test_llc_at_the_papers_localisation_is_a_fraction_of_half_the_dimension():
    """With gamma 100 and nbeta = 512 / ln 512 = 82 (the paper's MNIST sampler) the localisation dominates: the
    Gaussian posterior gives E[LLC] = 1/2 sum_i nbeta h_i / (nbeta h_i + gamma) over the Hessian's eigenvalues
    h_i, which for mean-squared error on unit-variance inputs (h ~ 2) is 0.31 d, not d / 2."""
    model, X, y = linear_regression(8)
    mse = lambda out, t: ((out - t) ** 2).mean()
    nbeta = 512 / math.log(512)
    h = 2 * torch.linalg.eigvalsh(X.T @ X / len(X)).double()
    expect = float(0.5 * (nbeta * h / (nbeta * h + 100)).sum())
    assert abs(expect / 8 - 0.31) < 0.02
    llc = S.estimate_llc(model, mse, [(X, y)], eps=1e-4, gamma=100.0, nbeta=nbeta, num_chains=8, num_draws=2000)
    assert abs(llc - expect) < 0.08 * expect, (llc, expect)


def test_authors_protocol_also_reads_half_the_dimension():
    """devinterp 0.2's reduction (L(w*) from the first batches, the second half of each chain's running mean)
    on the same regular model: with a full-batch loader L(w*) is exact and the running means carry the
    first ~25 rising draws into the average, a bias of ~1% at 3000 draws, so the same 10% holds."""
    model, X, y = linear_regression(4)
    kw = dict(eps=3e-4, gamma=1.0, nbeta=2000 / math.log(2000), num_chains=8, num_draws=3000, seed=0)
    ours = S.estimate_llc(model, half_mse, [(X, y)], **kw)
    r = S.estimate_llc(model, half_mse, [(X, y)], **kw, protocol="authors", details=True)
    authors = r["llc"]
    assert abs(authors - 2) < 0.2 and authors != ours and abs(authors - ours) < 0.1, (authors, ours)
    # exactly: L(w*) fixed before sampling, each chain's running mean from its first draw, averaged over the
    # second half of the draws (a burn-in kept or a running mean started late would move it)
    L, L0, T = r["losses"], r["init_losses"], kw["num_draws"]
    assert torch.equal(L0, L0[:1].expand(T))
    running = torch.stack([L[:t + 1].mean(0) for t in range(T // 2, T)])
    assert authors == pytest.approx(kw["nbeta"] * (running - L0[0]).mean().item(), rel=1e-10)


def test_llc_details_trace_and_checks():
    """The trace has `trace_points` block means per chain; a sampler whose step is too small to equilibrate
    (relaxation ~2 / (eps nbeta) = 2500 draws > 1000) is flagged as still rising, the paper's step is not."""
    model, X, y = linear_regression(64)  # d/2 = 32: a large signal against the chi2 spread of single draws
    nbeta = 2000 / math.log(2000)
    kw = dict(gamma=1.0, nbeta=nbeta, num_chains=8, num_draws=1000, seed=0, details=True)
    r = S.estimate_llc(model, half_mse, [(X, y)], eps=3e-4, **kw)
    L, L0 = r["losses"], r["init_losses"]
    assert L.shape == (1000, 8) and L0.shape == (1000,) and L.dtype == L0.dtype == torch.float64
    assert r["llc"] == pytest.approx(nbeta * (L[500:] - L0[500:, None]).mean().item(), rel=1e-12)
    assert r["llc"] == S.estimate_llc(model, half_mse, [(X, y)], eps=3e-4, **{**kw, "details": False})
    fast = r["llc"]
    d = S.llc_diagnostics(L, L0, nbeta, trace_points=40)
    assert len(d["loss_trace"]) == 8 and all(len(c) == 40 for c in d["loss_trace"]) and d["draws_per_point"] == 25
    assert len(d["init_trace"]) == 40 and d["flat"] and 0 <= d["frac_below_init"] < 0.05
    r = S.estimate_llc(model, half_mse, [(X, y)], eps=3e-6, **kw)
    slow = S.llc_diagnostics(r["losses"], r["init_losses"], nbeta)
    assert not slow["flat"] and slow["drift"] > 2 * slow["noise"] and r["llc"] < 0.75 * fast, slow


def test_llc_diagnostics_by_hand():
    T = 200
    L0 = torch.full((T,), 1.0, dtype=torch.float64)
    level = torch.full((T, 2), 1.5, dtype=torch.float64)
    level[:100:5, 0] = 0.5  # every fifth draw of chain 0's first half below L(w*): 20 of 400
    d = S.llc_diagnostics(level, L0, nbeta=10.0, trace_points=20)
    assert d["frac_below_init"] == 20 / 400 and d["drift"] == 0 and d["noise"] == 0 and d["flat"]
    assert d["draws_per_point"] == 10 and d["init_trace"] == [1.0] * 20
    assert d["loss_trace"][1] == [1.5] * 20 and d["loss_trace"][0] == pytest.approx([1.3] * 10 + [1.5] * 10)
    ramp = 1.0 + torch.linspace(0, 1, T, dtype=torch.float64)[:, None].repeat(1, 2)
    d = S.llc_diagnostics(ramp, L0, nbeta=10.0)  # nbeta x the rise across draws 100..199 of a 1/199 slope
    assert d["drift"] == pytest.approx(10 * 99 / 199) and d["noise"] == 0 and not d["flat"]
    assert S.llc_diagnostics(ramp[:, :1], L0, nbeta=10.0)["flat"] is None  # one chain: no spread to test against
    # four chains rising by 1, 1, 2 and 6 across the second half: mean 2.5, standard error 1.19, t = 2.10;
    # below Student t's 3.18 for 3 degrees of freedom (flat), above the normal 1.96 (it would read "moving")
    xs = torch.arange(4, dtype=torch.float64) - 1.5
    four = torch.cat([torch.full((4, 4), 2.0, dtype=torch.float64),
                      5.0 + xs[:, None] * torch.tensor([1.0, 1.0, 2.0, 6.0], dtype=torch.float64) / 3])
    four[:3, 0] = torch.tensor([0.0, 0.0, -0.1], dtype=torch.float64)  # two draws at L(w*), one below
    d = S.llc_diagnostics(four, torch.zeros(8, dtype=torch.float64), nbeta=1.0)
    assert d["drift"] == pytest.approx(2.5) and d["noise"] == pytest.approx(math.sqrt(17 / 3) / 2)
    assert d["flat"] and d["frac_below_init"] == 1 / 32  # strictly below counts; equal does not


def test_paper_settings_normalisation_nbeta_and_augmentation_ranges():
    """Normalize(0.5, 0.5) unless --normalize dataset; nbeta = B / ln B of the SGLD batch; CIFAR-10's
    RandomAffine: angles within +-15 degrees, shifts within 10% of the image (affine_grid's units span 2)."""
    assert S.input_stats({"normalize": "paper"}, "mnist") == ((0.5,), (0.5,))
    assert S.input_stats({}, "cifar10") == ((0.5,) * 3, (0.5,) * 3)
    assert S.input_stats({"normalize": "dataset"}, "cifar10") == common.DATASET_STATS["cifar10"]
    for argv, b in ((["--task", "mnist"], 512), (["--task", "imdb", "--sgld-batch", "100"], 100)):
        assert S.get_args(argv).sgld_nbeta == pytest.approx(b / math.log(b))
    imgs = torch.zeros(2048, 3, 32, 32, dtype=torch.uint8)
    aug = S.AffineBatches(common.GPUBatches(imgs, torch.zeros(2048, dtype=torch.long), 2048, train=True, pad=0),
                          (0.5,) * 3, (0.5,) * 3)
    theta = aug._theta(0, 0)
    angle, shift = torch.atan2(theta[:, 1, 0], theta[:, 0, 0]).abs(), theta[:, :, 2].abs()
    assert math.radians(14) < angle.max() <= math.radians(15) + 1e-6
    assert 0.19 < shift.max() <= 0.2 + 1e-6
    assert not torch.equal(theta, aug._theta(1, 0))  # new draws every epoch
    rot = theta[:, :, :2]  # a rotation (no shear, no mirror): orthogonal with determinant 1
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(2).expand(2048, 2, 2), atol=1e-6)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(2048), atol=1e-6)


def test_summary_has_student_t_intervals_and_a_rank_trend():
    cfg = {"aw": "0,10", "task": "mnist", "preset": "paper", "hidden": 64, "epochs": 50}
    done = {}
    for aw, llcs in ((0.0, [30.0, 32.0, 34.0]), (10.0, [20.0, 21.0, 25.0])):
        for seed, v in enumerate(llcs):
            done[S.cell_key(aw, seed)] = {"aw": aw, "seed": seed, "test_acc": 96.0 + seed, "width": v / 100,
                                          "width_all": 0.05, "llc": v, "llc_check": {"flat": seed != 2}}
    table = S.summarise(done, cfg)
    r0, r1 = table["rows"]
    # AW 0: mean 32, sd 2, t(0.975, 2) = 4.3027 -> half width 4.3027 * 2 / sqrt(3)
    assert r0["llc_mean"] == 32 and r0["llc_std"] == pytest.approx(2) and r0["llc_ci95"] == pytest.approx(
        4.302653 * 2 / math.sqrt(3), rel=1e-5)
    assert r0["llc_flat"] == 2 and r1["n"] == 3 and r0["width_all_ci95"] == pytest.approx(0, abs=1e-12)
    assert table["trend"]["llc"]["spearman"] < -0.8 and table["trend"]["test_acc"]["spearman"] == 0
    assert table["trend"]["width_all"]["spearman"] is None  # constant: no trend to rank
    text = S.format_table(table, {**cfg})
    assert "32.00 +- 4.97" in text and "Spearman" in text and "2/3" in text and "self-model of" not in text
    assert "50 epochs, self-model of embedding):" in S.format_table(table, {**cfg, "task": "imdb", "epochs": 50,
                                                                           "target": "embedding"})
    # a run at chance (a dead hidden layer) is counted as collapsed and left out of the "learned" trend
    done[S.cell_key(10.0, 3)] = {"aw": 10.0, "seed": 3, "test_acc": 11.35, "width": 0.1, "width_all": 0.05,
                                 "llc": -5.0, "llc_check": {"flat": True}}
    table = S.summarise(done, {**cfg, "dataset": "mnist"})
    assert [r["collapsed"] for r in table["rows"]] == [0, 1]
    assert table["trend"]["llc"]["n"] == 7 and table["trend_learned"]["llc"]["n"] == 6
    assert S.collapsed({"test_acc": 19.9}, {"dataset": "mnist"}) and not S.collapsed({"test_acc": 61}, {"dataset": "imdb"})
    # AW labels: short where that is exact, the full repr where %g would merge two AWs into one cell key
    assert [S.fmt_aw(a) for a in (0.0, 0.5, 10.0, 1e-7, 0.1 + 0.2)] == ["0", "0.5", "10", "1e-07", "0.30000000000000004"]
    assert S.cell_key(0.1 + 0.2, 1) != S.cell_key(0.3, 1)


def test_llc_on_minibatches_leaves_model_and_rng_alone():
    """Minibatches (the loader cycled), paired L_b(w*) baselines; the model, its mode and the global RNG
    are as before; the seed alone decides the value. Minibatch gradient noise biases the estimate by a
    few % (about -5% measured here), hence 20%."""
    model, X, y = linear_regression(8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    loader = [(X[i:i + 250], y[i:i + 250]) for i in range(0, 2000, 250)]
    kw = dict(eps=3e-4, gamma=1.0, nbeta=250 / math.log(250), num_chains=4, num_draws=1500)
    a = S.estimate_llc(model, half_mse, loader, **kw, seed=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert S.estimate_llc(model, half_mse, loader, **kw, seed=1) == a
    assert S.estimate_llc(model, half_mse, loader, **kw, seed=2) != a
    assert abs(a - 4) < 0.2 * 4, a

# ----------------------------------------------------------------------------------------------------
# the self-model head and the width measure


def test_targets_are_the_hidden_activations_and_detached():
    torch.manual_seed(0)
    net = S.build_model({"task": "mnist", "dataset": "mnist", "hidden": 16}, self_model=True)
    x, y = torch.randn(5, 1, 28, 28), torch.zeros(5, dtype=torch.long)
    out, target = net(x)
    hidden = F.relu(net.body.fc(x.flatten(1)))
    assert out.shape == (5, 10 + 16) and torch.equal(target, hidden.detach()) and not target.requires_grad
    # with the self-model rows zeroed the prediction cannot move the body, so the only route for the MSE
    # to reach the hooked layer would be the target side: its gradient there must be exactly zero
    with torch.no_grad():
        net.self_head.weight.zero_()
        net.self_head.bias.zero_()
    _, _, mse = S.loss_parts(net, x, y, 1.0)
    mse.backward()
    assert mse > 0 and torch.count_nonzero(net.body.fc.weight.grad) == 0
    # control: the same MSE with the target left attached does reach the layer
    net.zero_grad()
    F.mse_loss(torch.zeros_like(hidden), hidden).backward()
    assert torch.count_nonzero(net.body.fc.weight.grad) > 0
    # the classification-only network has no extra rows and captures nothing
    assert net.classifier()(x).shape == (5, 10) and net._acts is None


def test_target_picks_the_self_modeled_layers_in_forward_order():
    """--target: the paper's layers by default, any subset of a task's layers on request, concatenated in the
    order the forward pass reaches them (the hooks' order), so the flag's spelling cannot reorder the rows."""
    assert [S.get_args(["--task", t]).target for t in ("mnist", "cifar10", "imdb")] == ["hidden", "block,hidden",
                                                                                         "hidden"]
    args = S.get_args(["--task", "imdb", "--target", " hidden, embedding"])
    assert args.target == "embedding,hidden" and args.out.endswith("_target-embedding-hidden")
    assert "target" not in S.get_args(["--task", "imdb"]).out
    torch.manual_seed(0)
    tok, off = torch.randint(0, 50, (40,)), torch.tensor([0, 7, 19, 30])
    base = {"task": "imdb", "dataset": "imdb", "hidden": 16, "num_tokens": 50}
    for target, dim in (("embedding", 64), ("hidden", 16), ("embedding,hidden", 80)):
        net = S.build_model({**base, "target": target}, self_model=True)
        out, t = net((tok, off))
        emb = F.embedding_bag(tok, net.body.emb.weight, off, mode="mean")
        want = {"embedding": emb, "hidden": F.relu(net.body.fc(emb))}
        assert S.target_dim({**base, "target": target}) == dim and out.shape == (4, 2 + dim)
        assert torch.allclose(t, torch.cat([want[n] for n in target.split(",")], 1)) and not t.requires_grad
    assert S.target_names(base) == ("hidden",)  # configs from before the flag: the task's default
    # at AW 0 the target and --aux change nothing: one init, one output, the loss CE alone (the publisher
    # merges a run of AW 0 alone into a sweep of another target or of the control on this)
    plain = []
    for target, aux in (("hidden", "self-model"), ("embedding", "self-model"), ("embedding,hidden", "act-l2")):
        torch.manual_seed(1)
        net = S.build_model({**base, "target": target, "aux": aux, "model_aw": 0.0})
        total, ce, mse = S.loss_parts(net, (tok, off), torch.tensor([0, 1, 1, 0]), 7.0)
        plain.append((net.state_dict(), total, ce, mse))
    for sd, total, ce, mse in plain[1:]:
        assert sd.keys() == plain[0][0].keys() and all(torch.equal(v, plain[0][0][k]) for k, v in sd.items())
        assert torch.equal(total, plain[0][1]) and torch.equal(total, ce) and mse.item() == 0
    x = torch.randn(2, 3, 32, 32)
    for target, dim in (("hidden", 32), ("block", 8 * 8 * 16)):
        cfg = {"task": "cifar10", "dataset": "cifar10", "hidden": 32, "width": 8, "target": target}
        net = S.build_model(cfg, self_model=True).eval()
        out, t = net(x)
        feats = {"hidden": net.body.features(x)[1], "block": net.body.layer4(
            net.body.layer3(net.body.layer2(net.body.layer1(net.body.stem(x))))).flatten(1)}
        assert S.target_dim(cfg) == dim and out.shape == (2, 10 + dim) and torch.allclose(t, feats[target])


def test_act_l2_control_is_the_plain_network_with_an_activation_penalty():
    """--aux act-l2: no self-model rows (the plain network's init, the same parameters), the targets returned
    attached, and the AW term equal to mean(h^2) with its gradient on the hidden layer worked out by hand."""
    assert S.get_args(["--aux", "act-l2"]).out.endswith("_aux-act-l2") and "aux" not in S.get_args([]).out
    cfg = {"task": "mnist", "dataset": "mnist", "hidden": 16, "aux": "act-l2", "model_aw": 2.0}
    torch.manual_seed(0)
    net = S.build_model(cfg)
    torch.manual_seed(0)
    plain = S.build_model({**cfg, "model_aw": 0.0})
    assert net.self_head is None and net.penalty and not plain.penalty
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in net.state_dict().items())
    assert net.state_dict().keys() == plain.state_dict().keys()  # probe.py and --resume load it as plain
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6) % 10
    out, target = net(x)
    z = net.body.fc(x.flatten(1))
    assert out.shape == (6, 10) and target.requires_grad and torch.allclose(target, F.relu(z))
    total, ce, mse = S.loss_parts(net, x, y, 2.0)
    assert mse.item() == pytest.approx(F.relu(z).pow(2).mean().item(), rel=1e-6)
    assert total.item() == pytest.approx(ce.item() + 2.0 * mse.item(), rel=1e-6)
    mse.backward()
    h = F.relu(z).detach()
    g_z = 2 * h / h.numel() * (z > 0)  # d mean(relu(z)^2) / dz
    assert torch.allclose(net.body.fc.weight.grad, g_z.T @ x.flatten(1), atol=1e-7)
    assert torch.allclose(net.body.fc.bias.grad, g_z.sum(0), atol=1e-7)
    assert net.head.weight.grad is None  # the penalty reaches the body only
    assert plain(x)[1] is None and net.classifier()(x).shape == (6, 10) and net._acts is None
    # IMDB's embedding: the penalty's gradient reaches the embedding rows of the review's words only
    tcfg = {"task": "imdb", "dataset": "imdb", "hidden": 8, "num_tokens": 30, "target": "embedding",
            "aux": "act-l2", "model_aw": 1.0}
    tnet = S.build_model(tcfg)
    tok, off = torch.tensor([3, 4, 5, 3]), torch.tensor([0, 2])
    out, t = tnet((tok, off))
    assert out.shape == (2, 2) and t.shape == (2, S.EMBED)
    t.pow(2).mean().backward()
    rows = tnet.body.emb.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert rows == [3, 4, 5]
    with pytest.raises(ValueError, match="self_model=False"):
        S.SelfModelNet(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 4, 3, 4, self_model=True, penalty=True)


def test_act_l2_shrinks_the_activations_and_the_head_grows_to_keep_the_logits(mnist, tmp_path):
    """One MNIST batch fitted for 60 steps from the same init, AW 0 against act-l2 at AW 1: the penalised
    hidden layer ends far smaller and the class rows wider (the head makes up the scale), both still fit it."""
    sw = sweep(["--smoke", "--data-dir", mnist], tmp_path)
    x, y = next(iter(sw.data.train(0)))
    ends = {}
    for aw in (0.0, 1.0):
        torch.manual_seed(0)
        net = S.build_model({**sw.cfg, "aux": "act-l2", "model_aw": aw})
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for _ in range(60):
            loss, ce, mse = S.loss_parts(net, x, y, aw)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            ends[aw] = (net.body(x).pow(2).mean().item(), S.weight_widths(net)["width"], ce.item())
    assert ends[1.0][0] < 0.5 * ends[0.0][0], ends
    assert ends[1.0][1] > ends[0.0][1], ends
    assert ends[0.0][2] < 0.3 and ends[1.0][2] < 0.6, ends


def test_rescaled_network_is_the_same_function_with_the_widths_scaled():
    """rescaled(model, c): hidden layer x c, class rows / c. The logits stay (ReLU is positively homogeneous), the
    width of the class rows becomes width / c, the model itself is untouched, and a self-model's extra rows are
    not part of the classifier that is rescaled."""
    torch.manual_seed(0)
    for cfg, x in (({"task": "mnist", "dataset": "mnist", "hidden": 16}, torch.randn(5, 1, 28, 28)),
                   ({"task": "imdb", "dataset": "imdb", "hidden": 8, "num_tokens": 30},
                    (torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 3])))):
        net = S.build_model(cfg, self_model=True)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        for c in (0.25, 4.0):
            m = S.rescaled(net, c)
            assert torch.allclose(m.classify(x), net.classify(x), rtol=1e-5, atol=1e-6)
            assert S.weight_widths(m)["width"] == pytest.approx(S.weight_widths(net)["width"] / c, rel=1e-6)
            assert torch.allclose(m.body.fc.weight, c * net.body.fc.weight)
            assert torch.equal(m.head.bias, net.head.bias) and torch.equal(m.self_head.weight, net.self_head.weight)
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_llc_rescale_measures_the_same_network_rescaled(mnist, tmp_path):
    """--llc-rescale 1 repeats the cell's own estimate exactly (the same draws); other scales give the width / c
    and an estimate of their own, with its trace and checks; the flag's values are normalised and checked."""
    assert S.get_args(["--llc-rescale", "2, 0.5,1"]).llc_rescale == "2,0.5,1" and S.rescales({}) == []
    sw = sweep(["--smoke", "--data-dir", mnist, "--epochs", "1", "--llc-rescale", "1,4"], tmp_path)
    res = sw.run_cell(0, 0.0, 0, NoStop())
    one, four = res["llc_rescale"]["c=1"], res["llc_rescale"]["c=4"]
    assert one["llc"] == res["llc"] and one["width"] == res["width"]
    assert four["width"] == pytest.approx(res["width"] / 4, rel=1e-6) and math.isfinite(four["llc"])
    assert four["llc"] != res["llc"] and {"flat", "frac_below_init", "loss_trace"} <= set(four)
    table = S.summarise({"a": res}, sw.cfg)
    assert table["rows"][0]["llc_rescale"]["c=4"]["mean"] == four["llc"]
    assert "rescaled AW 0 hidden x 4, class rows / 4" in S.format_table(table, sw.cfg)


def test_width_is_the_std_of_the_class_rows_by_hand():
    net = S.build_model({"task": "mnist", "dataset": "mnist", "hidden": 3}, self_model=True)
    cls = [float(i % 7) - 2.5 + 0.1 * i for i in range(30)]  # 10 class rows x 3
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor(cls).view(10, 3))
        net.self_head.weight.fill_(100.0)  # the self-model rows: far off, must stay out of the width
        net.body.fc.weight.fill_(1.0)
    w = S.weight_widths(net)
    assert w["width"] == pytest.approx(statistics.stdev(cls), rel=1e-6)
    assert w["width_out"] == pytest.approx(statistics.stdev(cls + [100.0] * 9), rel=1e-6)
    assert w["width_all"] == pytest.approx(statistics.stdev(cls + [1.0] * 3 * 784), rel=1e-5)

def test_evaluate_counts_dead_and_active_units_by_hand():
    """evaluate() over two batches: accuracy of the class rows and, of the units feeding them, those positive on
    no example (dead) and the mean share positive per example, all hand-computed."""
    net = S.build_model({"task": "mnist", "dataset": "mnist", "hidden": 3}, self_model=False)
    with torch.no_grad():
        net.body.fc.weight.zero_()
        net.body.fc.bias.copy_(torch.tensor([1.0, -1.0, 0.0]))  # unit 0 always on, unit 1 never
        net.body.fc.weight[2, 0] = 1.0  # unit 2 on where the first pixel is > 0
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.bias[0] = 0.5
        net.head.weight[1, 2] = 1.0  # class 1 wins where unit 2 > 0.5
    x = torch.zeros(4, 1, 28, 28)
    x[:, 0, 0, 0] = torch.tensor([1.0, -1.0, 2.0, -3.0])  # unit 2 on for examples 0 and 2
    y = torch.tensor([1, 0, 0, 0])  # predictions 1, 0, 1, 0: three right
    net.train()
    got = S.evaluate(net, [(x[:3], y[:3]), (x[3:], y[3:])], torch.device("cpu"), nullcontext())
    assert got == {"test_acc": 75.0, "dead_units": 1, "active_frac": pytest.approx((4 + 0 + 2) / 12)}
    assert net.training  # the mode it came in with


def test_evaluate_reads_a_batchnorm_network_in_eval_mode():
    """CIFAR-10's ResNet body has BatchNorm: evaluate() counts with the running statistics (each example on its
    own, whatever its batch) and leaves them alone; the network returns in the mode it came in."""
    torch.manual_seed(0)
    net = S.build_model({"task": "cifar10", "dataset": "cifar10", "hidden": 16, "width": 8}, self_model=False)
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6)
    net.train()
    with torch.no_grad():
        net.body(x * 2 + 1)  # running statistics away from their initial values
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = S.evaluate(net, [(x[:4], y[:4]), (x[4:], y[4:])], torch.device("cpu"), nullcontext())
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with torch.no_grad():
        net.eval()
        h = net.body(x)
        want_acc = 100 * (net.head(h).argmax(1) == y).float().mean().item()
        net.train()
    assert got["test_acc"] == pytest.approx(want_acc) and got["dead_units"] == int(((h > 0).sum(0) == 0).sum())
    assert got["active_frac"] == pytest.approx((h > 0).float().mean().item())


# ----------------------------------------------------------------------------------------------------
# real data


def test_aw0_with_the_widened_layer_trains_exactly_like_the_plain_network(mnist, tmp_path):
    sw = sweep(["--smoke", "--data-dir", mnist, "--epochs", "1", "--log-every", "1"], tmp_path)
    ckpt = tmp_path / "ckpt.pt"
    plain = sw.run_cell(0, 0.0, 0, NoStop())
    plain_w = torch.load(ckpt, weights_only=False)["model"]
    widened = sw.run_cell(0, 0.0, 0, NoStop(), self_model=True)
    widened_w = torch.load(ckpt, weights_only=False)["model"]
    assert "self_head.weight" in widened_w and "self_head.weight" not in plain_w
    assert all(torch.equal(v, widened_w[k]) for k, v in plain_w.items())
    for k in ("loss_curve", "test_acc", "width", "width_all", "llc"):
        assert plain[k] == widened[k], k
    assert len(plain["loss_curve"]) == plain["steps"] == 32
    assert sw.run_cell(0, 1.0, 0, NoStop())["width"] != plain["width"]  # while AW > 0 does change the network


def test_short_mnist_run_learns_at_the_papers_settings(mnist, tmp_path):
    """Full MNIST, the paper's SGD (lr 0.005, Nesterov 0.9, batch 512), 5 of its 50 epochs."""
    sw = sweep(["--data-dir", mnist, "--aw", "0,10", "--epochs", "5", "--sgld-chains", "2", "--sgld-draws", "40"],
               tmp_path)
    for aw in (0.0, 10.0):
        res = sw.run_cell(0, aw, 0, NoStop())
        assert res["test_acc"] > 90, res["test_acc"]
        assert 0 < res["width"] < 1 and math.isfinite(res["llc"]) and res["llc"] > 0


@pytest.fixture(scope="module")
def imdb_sweep(data_dir, tmp_path_factory):
    need(data_dir, "imdb")
    return sweep(["--task", "imdb", "--smoke", "--data-dir", data_dir], tmp_path_factory.mktemp("imdb"))


def test_imdb_runs_end_to_end_with_its_rlct(data_dir, tmp_path):
    """`python selfmodel.py --task imdb --smoke` to its results: training, and the RLCT on text batches,
    (tokens, offsets) pairs, which the SGLD loop once tried to make contiguous like an image batch (every IMDB
    cell then failed at its RLCT, after training: seen on a 500-epoch cell)."""
    need(data_dir, "imdb")
    out = tmp_path / "imdb"
    p = run_script(["selfmodel.py", "--task", "imdb", "--smoke", "--data-dir", data_dir, "--out", out], timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    runs = json.load(open(out / "results.json"))["metrics"]["runs"]
    assert len(runs) == 2 and all(math.isfinite(r["llc"]) and r["llc_trace"]["loss_trace"] for r in runs.values())
    # counted per review, not per (tokens, offsets) pair: a whole number of the smoke's 1,000 test reviews
    assert all(0 < r["test_acc"] <= 100 and abs(r["test_acc"] * 10 - round(r["test_acc"] * 10)) < 1e-3
               for r in runs.values())


def fit_one_batch(net, x, y, aw, steps):
    """`steps` Adam steps (lr 0.01) on one batch; its (total, ce, mse) loss after them."""
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        S.loss_parts(net, x, y, aw)[0].backward()
        opt.step()
    return S.loss_parts(net, x, y, aw)


def test_imdb_tokens_batches_and_model_on_real_reviews(imdb_sweep):
    sw = imdb_sweep
    seqs, labels = sw.data.train_xy
    assert sw.args.num_tokens == 5000 and len(seqs) == 2000
    assert 0.4 < labels.float().mean() < 0.6  # the fixed subset mixes the label-sorted files
    ids = torch.cat(seqs)
    assert ids.min() >= 0 and ids.max() < 5000 and (ids > 1).float().mean() > 0.9  # mostly known words
    # two ranks' rows together are the one-process batch
    one = next(iter(S.TextBatches(seqs, labels, 64, train=True, device="cpu", seed=3)))
    halves = [next(iter(S.TextBatches(seqs, labels, 64, train=True, device="cpu", seed=3, rank=r, world_size=2)))
              for r in (0, 1)]
    (tok, off), y = one
    rows = [tok[o:e] for o, e in zip(off.tolist(), off.tolist()[1:] + [len(tok)])]
    idx = torch.randperm(len(seqs), generator=S._generator(3, 0))[:64]  # epoch 0's first 64 reviews
    assert all(torch.equal(r, seqs[j]) for r, j in zip(rows, idx.tolist())) and torch.equal(y, labels[idx])
    # a resumed epoch (start = 5) yields what the full epoch yields from batch 5 on
    tb = S.TextBatches(seqs, labels, 64, train=True, device="cpu", seed=3)
    (t5, o5), y5 = list(tb.epoch(2))[5]
    (t5r, o5r), y5r = next(tb.epoch(2, start=5))
    assert torch.equal(t5, t5r) and torch.equal(o5, o5r) and torch.equal(y5, y5r)
    for r, ((t, o), yr) in enumerate(halves):
        assert torch.equal(yr, y[r::2])
        assert torch.equal(t, torch.cat(rows[r::2]))
    # forward / backward of the self-modeling text model; embedding rows of absent words get no gradient
    torch.manual_seed(0)
    net = S.build_model({**sw.cfg, "model_aw": 1.0})
    loss, ce, mse = S.loss_parts(net, (tok, off), y, 1.0)
    out, target = net((tok, off))
    assert out.shape == (64, 2 + 128) and torch.equal(target, net.body.features((tok, off))[1])
    loss.backward()
    g = net.body.emb.weight.grad
    present = torch.zeros(5000, dtype=torch.bool)
    present[tok] = True
    assert torch.isfinite(g).all() and g[present].abs().sum() > 0 and torch.count_nonzero(g[~present]) == 0
    # and it can fit real reviews: 40 steps on one batch drive the loss down
    assert fit_one_batch(net, (tok, off), y, 1.0, steps=40)[1] < 0.5 * ce.item()


def test_self_modeling_the_embedding_on_real_reviews(imdb_sweep):
    """--target embedding (the authors' other IMDB variant): the self-model predicts the 64-d mean embedding from
    the hidden layer; the MSE reaches the embedding rows only through that prediction (the target is detached)
    and training on real reviews drives it down."""
    sw = imdb_sweep
    (tok, off), y = next(iter(S.TextBatches(*sw.data.train_xy, 64, train=True, device="cpu", seed=1)))
    torch.manual_seed(0)
    net = S.build_model({**sw.cfg, "target": "embedding", "model_aw": 1.0})
    out, target = net((tok, off))
    assert out.shape == (64, 2 + 64) and torch.equal(target, net.body.features((tok, off))[0])
    with torch.no_grad():  # no prediction, no route: the detached target alone moves nothing
        net.self_head.weight.zero_()
        net.self_head.bias.zero_()
    S.loss_parts(net, (tok, off), y, 1.0)[2].backward()
    assert net.body.emb.weight.grad is None or torch.count_nonzero(net.body.emb.weight.grad) == 0
    torch.manual_seed(0)
    net = S.build_model({**sw.cfg, "target": "embedding", "model_aw": 1.0})
    _, ce0, mse0 = S.loss_parts(net, (tok, off), y, 100.0)
    S.loss_parts(net, (tok, off), y, 100.0)[0].backward()
    assert torch.count_nonzero(net.body.emb.weight.grad) > 0  # through the prediction it does
    _, ce, mse = fit_one_batch(net, (tok, off), y, 100.0, steps=30)
    assert mse < 0.2 * mse0.item() and ce < 0.5 * ce0.item()  # both tasks learn (measured: 0.08x and 0.14x)


def test_cifar_augmentation_model_and_llc_with_batchnorm(data_dir, tmp_path):
    need(data_dir, "cifar10", "cifar-10-batches-py", "data_batch_1")
    sw = sweep(["--task", "cifar10", "--smoke", "--data-dir", data_dir, "--train-subset", "64"], tmp_path)
    x_raw, y_raw = sw.data.train_xy
    m, s = sw.data.mean, sw.data.std
    flips = lambda r, w: common.GPUBatches(x_raw, y_raw, 32, train=True, mean=m, std=s, pad=0, flip=True, seed=5,
                                           rank=r, world_size=w)
    aug = lambda r, w: S.AffineBatches(flips(r, w), m, s)
    (x, y), (x2, _), (plain, _) = next(iter(aug(0, 1))), next(iter(aug(0, 1))), next(iter(flips(0, 1)))
    assert torch.equal(x, x2) and not torch.equal(x, plain)  # reproducible, and it does move pixels
    black = lambda t: ((t + torch.tensor(m).view(1, 3, 1, 1) / torch.tensor(s).view(1, 3, 1, 1)).abs() < 1e-5).all(1)
    assert black(x).sum() > black(plain).sum() + 100  # pixels rotated / shifted in from outside are raw black
    for r in (0, 1):  # ranks see the rows one process would
        xr, yr = next(iter(aug(r, 2)))
        assert torch.equal(xr, x[r::2]) and torch.equal(yr, y[r::2])
    # ResNet-18 self-model: targets = last block (8w x 4 x 4) + hidden
    torch.manual_seed(0)
    net = S.build_model({**sw.cfg, "model_aw": 1.0})
    out, target = net(x[:8])
    dim = 8 * sw.cfg["width"] * 4 * 4 + sw.cfg["hidden"]
    assert S.target_dim(sw.cfg) == dim and out.shape == (8, 10 + dim) and target.shape == (8, dim)
    # SGLD through BatchNorm, both protocols: "ours" in eval mode on clean batches, "authors" in train mode
    # (batch statistics) on the augmented loader; either leaves weights, running stats and modes as they were
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []
    net.body.stem[1].register_forward_pre_hook(lambda mod, inp: seen.append((mod.training, mod.running_mean is None)))
    est = {}
    for protocol in ("ours", "authors"):
        seen.clear()
        cfg = {**sw.cfg, "sgld_draws": 4, "llc_protocol": protocol}
        sw.data.args.llc_protocol = protocol
        loader = sw.data.sgld(0)
        assert isinstance(loader, S.AffineBatches) == (protocol == "authors")
        est[protocol] = S.llc_of(net, sw.data, cfg, seed=0)
        assert seen and set(seen) == ({(False, False)} if protocol == "ours" else {(True, True)}), seen
        assert math.isfinite(est[protocol]["llc"]) and net.training and net.body.stem[1].training
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert est["ours"]["llc"] != est["authors"]["llc"]
    assert len(est["ours"]["loss_trace"]) == sw.cfg["sgld_chains"]

# ----------------------------------------------------------------------------------------------------
# the script as a user runs it

SMOKE = ["selfmodel.py", "--smoke", "--device", "cpu"]


def files_under(path):
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


def test_resume_is_bitwise_and_keeps_finished_cells(mnist, tmp_path):
    """Smoke sweep = 2 cells (AW 0, 1) x 96 steps. Stopped at sweep step 150 (mid-epoch of the second
    cell), then resumed: the same final weights and the same per-seed numbers as one straight run."""
    full, part = tmp_path / "full", tmp_path / "part"
    p_full, p = side_by_side(lambda: run_script(SMOKE + ["--data-dir", mnist, "--out", full]),
                             lambda: run_script(SMOKE + ["--data-dir", mnist, "--out", part, "--stop-at-step", "150"]))
    assert p_full.returncode == 0, p_full.stderr[-3000:]
    assert p.returncode == 0 and "stopped at step 150" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    ck = torch.load(part / "ckpt.pt", weights_only=False)
    assert ck["cell"] == [1.0, 0] and ck["step"] == 54 and list(ck["done"]) == ["aw=0,seed=0"]
    assert ck["cell_seconds"] > 0  # the interrupted cell's training time so far, carried over
    p = run_script(SMOKE + ["--data-dir", mnist, "--out", part, "--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed aw 1 seed 0 at step 54" in p.stdout and "aw 0 seed 0 |" not in p.stdout  # cell 0 kept
    a, b = torch.load(full / "ckpt.pt", weights_only=False), torch.load(part / "ckpt.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    ra, rb = (json.load(open(o / "results.json"))["metrics"] for o in (full, part))
    for key in ra["runs"]:
        for k in ("test_acc", "width", "width_all", "width_out", "llc", "loss_curve", "steps"):
            assert ra["runs"][key][k] == rb["runs"][key][k], (key, k)
    assert ra["table"] == rb["table"] and [r["aw"] for r in ra["table"]["rows"]] == [0.0, 1.0]
    assert rb["runs"]["aw=1,seed=0"]["train_seconds"] >= round(ck["cell_seconds"], 2)  # both processes counted
    # the checkpoint rebuilds through the probe.py protocol
    net = S.build_model(b["config"])
    net.load_state_dict(b["model"])
    x = torch.randn(3, 1, 28, 28)
    assert S.probe_layers(b["config"]) == 1 and b["config"]["dataset"] == "mnist"
    assert torch.equal(S.probe_features(net, x, b["config"], [1])[1], net.body(x))


def test_torchrun_two_processes_match_one(mnist, tmp_path):
    """2 processes x B/2 = 1 process x B (no BatchNorm in the MLP, so the match is exact up to float
    summation order): the same first-step loss and weights after each step, the same evaluation gathered
    from both ranks; only rank 0 writes files and logs."""
    flags = ["--data-dir", mnist, "--aw", "1", "--epochs", "1", "--log-every", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    p1, p2 = side_by_side(lambda: run_script(SMOKE + flags + ["--out", one]),
                          lambda: run_script(SMOKE + flags + ["--out", two], torchrun=2))
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-3000:]
    assert files_under(two) == ["ckpt.pt", "log.txt", "results.json"]
    assert p2.stdout.count("aw 1 seed 0 | ep 0 | step 1/32 ") == 1  # one log, from rank 0
    r1, r2 = (json.load(open(o / "results.json"))["metrics"]["runs"]["aw=1,seed=0"] for o in (one, two))
    c1, c2 = torch.tensor(r1["loss_curve"]), torch.tensor(r2["loss_curve"])
    assert c1[0, 1].item() == pytest.approx(c2[0, 1].item(), rel=1e-6)  # first step: mean of the half-batch losses
    assert torch.allclose(c1, c2, rtol=1e-5)  # every later step follows from equal gradients
    w1, w2 = (torch.load(d / "ckpt.pt", weights_only=False)["model"] for d in (one, two))
    assert all(torch.allclose(v, w2[k], atol=1e-6) for k, v in w1.items())
    assert r1["test_acc"] == r2["test_acc"] and r1["llc"] == pytest.approx(r2["llc"], rel=1e-3, abs=1e-3)


def test_nan_loss_stops_with_step_and_last_good_checkpoint(mnist, tmp_path):
    """AW = 1e300 overflows the loss at the first step of the second cell; the first cell's checkpoint stays."""
    p = run_script(SMOKE + ["--data-dir", mnist, "--out", tmp_path, "--aw", "0,1e300"])
    assert_clean_error(p, "step 96", str(tmp_path / "ckpt.pt"))
    ck = common.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert list(ck["done"]) == ["aw=0,seed=0"] and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_text_batches_drop_the_short_train_batch_and_reshuffle_each_epoch():
    """IMDB batches: training drops the short last batch and draws a new order every epoch; evaluation keeps
    every review in order; each batch's (tokens, offsets) rebuilds exactly its reviews."""
    seqs = [torch.arange(i % 3 + 1) + 10 * i for i in range(10)]  # reviews of 1 to 3 tokens, review i = label i
    labels = torch.arange(10)
    train = S.TextBatches(seqs, labels, 4, train=True, device="cpu", seed=0)
    e0, e1 = ([y for _, y in train.epoch(e)] for e in (0, 1))
    assert len(train) == 2 and [len(y) for y in e0] == [4, 4] and not torch.equal(torch.cat(e0), torch.cat(e1))
    ev = S.TextBatches(seqs, labels, 4, train=False, device="cpu")
    assert len(ev) == 3 and torch.equal(torch.cat([y for _, y in ev]), labels)
    for (tokens, offsets), y in [*train.epoch(1), *ev]:
        ends = offsets[1:].tolist() + [len(tokens)]
        assert [tokens[a:b].tolist() for a, b in zip(offsets.tolist(), ends)] == [seqs[i].tolist() for i in y]


def test_checkpoints_between_epochs_resume_at_the_next_epoch(mnist, tmp_path, monkeypatch):
    """--ckpt-interval 0: a checkpoint after every epoch but the last, each pointing at the next epoch's first
    batch (epoch * batches per epoch + batch = the steps done), so a resume neither repeats nor skips steps."""
    saves, save = [], S.Sweep.save
    monkeypatch.setattr(S.Sweep, "save", lambda self, model, opt, aw, seed, running, epoch=0, batch=0, step=0,
                        history=(): saves.append((running, epoch, batch, step)) or
                        save(self, model, opt, aw, seed, running, epoch, batch, step, history))
    S.main(SMOKE[1:] + ["--data-dir", mnist, "--out", str(tmp_path / "run"), "--aw", "0", "--epochs", "3",
                        "--ckpt-interval", "0"])
    between = [s for s in saves if s[0]]
    assert [e for _, e, _, _ in between] == [1, 2] and all(b == 0 for _, _, b, _ in between)
    per_epoch = between[0][3]
    assert per_epoch > 0 and [st for *_, st in between] == [per_epoch, 2 * per_epoch]


def test_each_seed_has_its_own_init_batches_and_rlct_draws(mnist, tmp_path, monkeypatch):
    """Cell (AW, seed) starts from torch.manual_seed(seed)'s weights, trains on seed's batch order and samples its
    RLCT with seed: two seeds differ in all three; the AW 0 and AW 1 cells of one seed share the initial weights
    of the plain rows."""
    inits, batch_seeds, llc_seeds = [], [], []
    build, train, llc_of = S.build_model, S.Data.train, S.llc_of

    def recorded_build(cfg, self_model=None):
        model = build(cfg, self_model)
        inits.append(model.body.fc.weight.detach().clone())
        return model
    monkeypatch.setattr(S, "build_model", recorded_build)
    monkeypatch.setattr(S.Data, "train", lambda self, seed: batch_seeds.append(seed) or train(self, seed))
    monkeypatch.setattr(S, "llc_of", lambda model, data, cfg, seed, *a: llc_seeds.append(seed) or
                        llc_of(model, data, cfg, seed, *a))
    S.main(SMOKE[1:] + ["--data-dir", mnist, "--out", str(tmp_path / "run"), "--aw", "0,1", "--seed", "4",
                        "--seeds", "2"])
    cells = list(json.load(open(tmp_path / "run" / "results.json"))["metrics"]["runs"])
    assert len(inits) == len(batch_seeds) == len(llc_seeds) == len(cells) == 4
    by_cell = dict(zip(cells, zip(inits, batch_seeds, llc_seeds)))
    assert [by_cell[f"aw={a},seed={s}"][1:] for a in (0, 1) for s in (4, 5)] == [(4, 4), (5, 5)] * 2
    assert not torch.equal(by_cell["aw=0,seed=4"][0], by_cell["aw=0,seed=5"][0])
    assert torch.equal(by_cell["aw=0,seed=4"][0], by_cell["aw=1,seed=4"][0])


@pytest.mark.parametrize("argv, words", [
    (["--task", "svhn"], ["--task", "mnist"]),
    (["--aw", ""], ["--aw", "empty"]),
    (["--aw", "-1"], ["--aw", ">= 0"]),
    (["--aw", "0,1,x"], ["--aw", "float"]),
    (["--aw", "1,1"], ["--aw", "twice"]),
    (["--seeds", "0"], ["--seeds"]),
    (["--seeds", "two"], ["--seeds"]),
    (["--preset", "fast"], ["--preset", "quick"]),
    (["--lr", "-0.1"], ["--lr"]),
    (["--momentum", "1"], ["--momentum", "[0, 1)"]),
    (["--task", "cifar10", "--momentum", "0.9"], ["--momentum", "Adam"]),
    (["--sgld-eps", "0"], ["--sgld-eps"]),
    (["--sgld-draws", "1"], ["--sgld-draws"]),
    (["--sgld-batch", "100000"], ["--sgld-batch", "training examples"]),
    (["--preset", "quick"], ["--preset quick", "mnist", "drop it"]),  # contradictions: refused, not ignored
    (["--width", "8"], ["--width", "cifar10"]),
    (["--task", "cifar10", "--width", "4", "--compile", "--device", "cpu"], ["--width 4", "--compile", "--width 8"]),
    (["--vocab-size", "100"], ["--vocab-size", "imdb"]),
    (["--target", "block"], ["--target block", "hidden", "task mnist"]),
    (["--task", "imdb", "--target", "hidden,hidden"], ["--target", "embedding, hidden", "each once"]),
    (["--task", "cifar10", "--target", ","], ["--target", "block, hidden"]),
    (["--aux", "l2"], ["--aux 'l2'", "self-model, act-l2"]),
    (["--llc-rescale", "0,2"], ["--llc-rescale", "c > 0"]),
    (["--llc-rescale", "2,2"], ["--llc-rescale", "once"]),
    (["--test-subset", "20000"], ["--test-subset", "10000"]),
    (["--train-subset", "70000"], ["--train-subset", "60000"]),
    (["--normalize", "imagenet"], ["--normalize", "paper"]),
    (["--llc-protocol", "devinterp"], ["--llc-protocol", "authors"]),
    (["--llc-grid-eps", "1e-4"], ["--llc-grid-gamma", "together"]),
    (["--llc-grid-eps", "0", "--llc-grid-gamma", "1"], ["--llc-grid-eps", "> 0"]),
    pytest.param(["--device", "cuda"], ["--device"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    (["--out", "/proc/selfmodel"], ["--out", "not writable"]),
    (["--data-dir", "/nonexistent"], ["missing", "--data-dir"]),
    (["--resume"], ["no checkpoint", "--resume"]),
])
def test_bad_invocations_give_one_line_errors(argv, words, mnist, tmp_path, capsys):
    base = ["--smoke", "--data-dir", mnist, "--no-download", "--out", str(tmp_path / "run")]
    code, err = run_in_process(S.main, base + argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and lines, err
    assert all(w in lines[-1] for w in words), lines[-1]
    if argv != ["--seeds", "two"]:  # argparse's own errors come after its usage line
        assert len(lines) == 1, err


def test_bad_checkpoints_and_the_real_cli(mnist, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    code, err = run_in_process(S.main, ["--smoke", "--data-dir", mnist, "--out", str(out), "--resume"], capsys)
    assert code == 2 and "not a readable checkpoint" in err and len(err.strip().splitlines()) == 1
    common.save_checkpoint(str(out / "ckpt.pt"), {"script": "selfmodel", "model": {},
                                                  "config": {**vars(S.get_args(["--smoke"])), "lr": 1.0}})
    code, err = run_in_process(S.main, ["--smoke", "--data-dir", mnist, "--out", str(out), "--resume"], capsys)
    assert code == 2 and "other settings: --lr 0.005 (run: 1.0)" in err
    # a checkpoint from before --target and --aux self-modeled the task's default: it resumes as that, only as that
    old = {k: v for k, v in vars(S.get_args(["--task", "imdb", "--smoke"])).items() if k not in ("target", "aux")}
    common.save_checkpoint(str(out / "ckpt.pt"), {"script": "selfmodel", "model": {}, "config": old})
    assert S.load_resume(str(out / "ckpt.pt"), S.get_args(["--task", "imdb", "--smoke"]))["config"] == old
    with pytest.raises(common.UserError, match="--target 'embedding' \\(run: 'hidden'\\)"):
        S.load_resume(str(out / "ckpt.pt"), S.get_args(["--task", "imdb", "--smoke", "--target", "embedding"]))
    with pytest.raises(common.UserError, match="--aux 'act-l2' \\(run: 'self-model'\\)"):
        S.load_resume(str(out / "ckpt.pt"), S.get_args(["--task", "imdb", "--smoke", "--aux", "act-l2"]))
    # and through a real process: one line, no traceback
    assert_clean_error(run_script(SMOKE + ["--aw", "-1"]), "--aw", ">= 0")


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, True), (0.9, False)])
def test_row_sparse_sgd_is_torch_sgd(momentum, nesterov):
    """Row-sparse gradients (EmbeddingBag(sparse=True)) through RowSparseSGD take the steps torch.optim.SGD
    takes with dense gradients, momentum buffers included; the optimizer state survives a state_dict round trip."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 300, (200,), generator=g), torch.arange(0, 200, 20), torch.randint(0, 2, (10,), generator=g))
               for _ in range(6)]
    nets = []
    for sparse in (False, True):
        torch.manual_seed(0)
        net = S.build_model({"task": "imdb", "dataset": "imdb", "hidden": 16, "num_tokens": 300, "model_aw": 1.0})
        net.body.emb.sparse = sparse
        opt = (S.RowSparseSGD if sparse else torch.optim.SGD)(net.parameters(), lr=5.0, momentum=momentum,
                                                              nesterov=nesterov)
        for i, (tok, off, y) in enumerate(batches):
            if i == 3 and sparse:  # a resume in the middle: a fresh optimizer loaded from the state dict
                state = opt.state_dict()
                opt = S.RowSparseSGD(net.parameters(), lr=5.0, momentum=momentum, nesterov=nesterov)
                opt.load_state_dict(state)
            loss = S.loss_parts(net, (tok, off), y, 1.0)[0]
            opt.zero_grad()
            loss.backward()
            assert net.body.emb.weight.grad.is_sparse == sparse
            opt.step()
        nets.append(net)
    dense, sparse = (n.state_dict() for n in nets)
    assert all(torch.allclose(v, sparse[k], atol=1e-5) for k, v in dense.items())
    torch.manual_seed(0)
    init = S.build_model({"task": "imdb", "dataset": "imdb", "hidden": 16, "num_tokens": 300, "model_aw": 1.0})
    moved = (init.body.emb.weight - nets[1].body.emb.weight).abs().max()
    assert moved > 1e-3, moved  # the rows did move, by far more than the tolerance


def test_llc_runs_in_the_default_layout():
    """The SGLD chains see every batch in the default (contiguous) layout even when the loader and the model
    are channels_last, as the CIFAR-10 task's are on a GPU: under vmap, cuDNN's BatchNorm would clone to
    channels_last, which vmap refuses (seen on an H200). The layout changes nothing but the layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10))
    X, y = torch.randn(64, 3, 6, 6), torch.randint(0, 10, (64,))
    seen = []
    model[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].is_contiguous()))
    ce = lambda out, t: F.cross_entropy(out, t)
    kw = dict(eps=1e-4, gamma=100.0, nbeta=10.0, num_chains=2, num_draws=6, seed=3)
    plain = S.estimate_llc(model, ce, [(X[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], **kw)
    assert seen and all(seen)
    seen.clear()
    cl = X.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    model = model.to(memory_format=torch.channels_last)
    got = S.estimate_llc(model, ce, [(cl[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], **kw)
    assert len(seen) == 12 and all(seen), seen  # 6 draws: one vmapped gradient and one L_b(w*) each
    assert math.isclose(got, plain, rel_tol=1e-4, abs_tol=1e-6), (got, plain)


def test_resnet_basicblock_relu_comes_after_the_sum():
    blk = S.BasicBlock(4, 4, 1).eval()
    with torch.no_grad():
        blk.conv2.weight.zero_()          # branch -> bn2(0) = 0: the block is relu(x)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(blk(x), x.clamp_min(0))


def test_affine_shifts_are_drawn_per_axis():
    imgs = torch.zeros(2048, 3, 32, 32, dtype=torch.uint8)
    aug = S.AffineBatches(common.GPUBatches(imgs, torch.zeros(2048, dtype=torch.long), 2048, train=True, pad=0),
                          (0.5,) * 3, (0.5,) * 3)
    sx, sy = aug._theta(0, 0)[:, :, 2].unbind(1)
    # RandomAffine(translate=(0.1, 0.1)) draws the horizontal and vertical shifts independently: uncorrelated,
    # each reaching +-0.2 grid units (a diagonal-only shift would give correlation 1)
    assert abs(torch.corrcoef(torch.stack([sx, sy]))[0, 1].item()) < 0.1
    assert sx.abs().max() > 0.19 and sy.abs().max() > 0.19


def test_cifar10_task_defaults_are_the_papers():
    """The self-modeling paper's CIFAR-10 settings: hidden 2000, targets block + hidden, AW 0.5/1/2 (and the AW 0
    baseline), Adam 1e-4, batch 64, 250 epochs; SGLD eps 1e-4, gamma 100, 4 chains x 400 draws. No committed
    CIFAR-10 table pins these (the MNIST and IMDB ones do through their commands)."""
    a = S.get_args(["--task", "cifar10"])
    assert (a.hidden, a.target, a.aw) == (2000, "block,hidden", "0,0.5,1,2")
    assert (a.optimizer, a.lr, a.batch_size, a.epochs) == ("adam", 1e-4, 64, 250)
    assert (a.sgld_eps, a.sgld_gamma, a.sgld_chains, a.sgld_draws) == (1e-4, 100.0, 4, 400)
