"""sim_cifar.py: the SIM / rho-SIM objective by hand, its plumbing, and the script's behaviour as a user
sees it (learning on real CIFAR-10, exact resume, torchrun, NaN stop, bad flags)."""
import json, math, os, shutil, signal, statistics, textwrap, time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import sim_cifar as S
from conftest import ROOT, FakeClock, assert_clean_error, need, run_in_process, run_script, side_by_side

CPU = common.Dist(0, 0, 1, torch.device("cpu"), True)
# a tiny real-data configuration: 256 training images, batch 64 -> 4 steps per epoch
TINY = ["--smoke", "--train-subset", "256", "--test-subset", "200", "--epochs", "2", "--bench-steps", "0"]


@pytest.fixture(scope="module")
def cifar(data_dir):
    need(data_dir, "cifar10", "cifar-10-batches-py", "test_batch")
    return data_dir


@pytest.fixture(scope="module")
def stopped(cifar, tmp_path_factory):
    """A TINY run (baseline + rho) interrupted at step 3 of its first run; tests resume copies of it."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    p = run_script(["sim_cifar.py"] + TINY + ["--data-dir", cifar, "--out", out, "--stop-at-step", "3"])
    assert p.returncode == 0 and "stopped at step 3" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert not (out / "results.json").exists()
    assert torch.load(out / "off_seed0" / "ckpt.pt", weights_only=False)["step"] == 3
    return out


def wrapped(block, mode="rho", rho=0.2, latent=16, shape=(2, 8, 16, 16)):
    """block inside a Sequential, wrapped by add_sim exactly as the script does it."""
    torch.manual_seed(0)
    net = S.add_sim(nn.Sequential(block), type(block), torch.zeros(shape), mode, rho, latent)
    assert isinstance(net[0], S.SIM)
    return net


def hand_distance(a, b, eps=1e-6):
    """normalized Euclidean distance with explicit loops: per sample and channel, standardise over tokens
    (unbiased std), then per token the L2 norm of the difference, averaged."""
    B, K, D = a.shape
    total = 0.0
    for i in range(B):
        za, zb = a[i].double().clone(), b[i].double().clone()
        for c in range(D):
            for z in (za, zb):
                col = z[:, c]
                m = sum(col.tolist()) / K
                sd = math.sqrt(sum((v - m) ** 2 for v in col.tolist()) / (K - 1))
                z[:, c] = (col - m) / (sd + eps)
        for t in range(K):
            total += math.sqrt(sum((za[t, c].item() - zb[t, c].item()) ** 2 for c in range(D)))
    return total / (B * K)


def test_normalized_distance_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 5, 3, generator=g) * 3 + 1, torch.randn(2, 5, 3, generator=g)
    assert S.normalized_distance(a, b).item() == pytest.approx(hand_distance(a, b), rel=1e-5)
    # a common scale and shift do not matter: both sides are standardised per channel
    assert S.normalized_distance(a * 7 - 2, b).item() == pytest.approx(hand_distance(a, b), rel=1e-4)
    assert S.normalized_distance(a, a).item() == pytest.approx(0.0, abs=1e-6)


def test_normalized_distance_gradient_finite_on_constant_channel():
    """A channel equal on every kept token (seen under bf16 autocast with k = 3 at the last stage) has
    variance 0; the loss and its gradient must stay finite (the value is that channel's 0 contribution)."""
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    pred[:, :, 1] = 0.5  # constant over the 3 tokens
    pred.requires_grad_(True)
    loss = S.normalized_distance(pred, target)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(pred.grad).all()
    assert loss.item() == pytest.approx(hand_distance(pred.detach(), target), rel=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_rho_loss_matches_hand_computation(stride):
    """The whole rho-SIM loss of a (strided) block, rebuilt from its parts: tokens int(rho*N), one shared
    draw, input average-pooled onto the output grid, zx = P(x), zy = Q(P(pre(y)))."""
    net = wrapped(S.BasicBlock(8, 16 if stride == 2 else 8, stride))
    sim = net[0]
    x = torch.randn(2, 8, 16, 16)
    torch.manual_seed(5)
    y = net(x)
    loss = sim.loss
    n = (16 // stride) ** 2
    k = int(0.2 * n)
    torch.manual_seed(5)
    idx = torch.randperm(n)[:k]
    xp = F.avg_pool2d(x, stride) if stride > 1 else x
    xt = xp.permute(0, 2, 3, 1).reshape(2, n, 8)[:, idx]
    yt = y.detach().permute(0, 2, 3, 1).reshape(2, n, -1)[:, idx]
    if stride == 2:
        assert isinstance(sim.pre, nn.Linear) and sim.pre.bias is None and sim.pre.weight.shape == (8, 16)
    zx, zy = sim.proj(xt), sim.pred(sim.proj(sim.pre(yt)))
    assert loss.item() == pytest.approx(hand_distance(zy.detach(), zx.detach()), rel=1e-5)


def test_only_the_prediction_side_trains_the_projection():
    """zx = P(x) is a target: P learns from zy = Q(P(pre(y))) alone. Its gradient equals the hand loss's with
    zx a constant, and differs from the one a P(x) with gradient would add."""
    net = wrapped(S.BasicBlock(8, 8, 1))
    sim = net[0]
    x = torch.randn(2, 8, 16, 16)
    torch.manual_seed(5)
    y = net(x)
    P = list(sim.proj.parameters())
    ours = torch.autograd.grad(sim.loss, P, retain_graph=True)
    n, k = 256, int(0.2 * 256)
    torch.manual_seed(5)
    idx = torch.randperm(n)[:k]
    xt = x.permute(0, 2, 3, 1).reshape(2, n, 8)[:, idx]
    yt = y.detach().permute(0, 2, 3, 1).reshape(2, n, 8)[:, idx]
    zy = sim.pred(sim.proj(sim.pre(yt)))
    const = torch.autograd.grad(S.normalized_distance(zy, sim.proj(xt).detach()), P, retain_graph=True)
    both = torch.autograd.grad(S.normalized_distance(zy, sim.proj(xt)), P)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ours, const))
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(ours, both))


def test_sim_loss_is_the_mean_over_blocks_and_clears_them():
    torch.manual_seed(0)
    net = S.add_sim(nn.Sequential(S.BasicBlock(8, 8, 1), S.BasicBlock(8, 16, 2), S.BasicBlock(16, 16, 1)),
                    S.BasicBlock, torch.zeros(2, 8, 16, 16), "rho", 0.2, 16)
    net(torch.randn(2, 8, 16, 16))
    each = [m.loss.item() for m in net.modules() if isinstance(m, S.SIM)]
    assert len(each) == 3 and len(set(each)) == 3
    assert S.sim_loss(net).item() == pytest.approx(sum(each) / 3, rel=1e-6)
    assert all(m.loss is None for m in net.modules() if isinstance(m, S.SIM))
    assert S.sim_loss(net).item() == 0.0  # nothing left from the step before


def test_token_take_is_indexing_with_a_copying_backward():
    """_TakeTokens (rho-SIM's gather of the kept tokens): the forward is t[:, idx]; the backward, a copy per
    kept token instead of autograd's accumulating scatter, gives the same gradient for distinct ids (the
    draw is a permutation's prefix), and through a channels_last map's token view too; gradcheck in float64."""
    torch.manual_seed(0)
    t = torch.randn(3, 10, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.randperm(10)[:4]
    g = torch.randn(3, 4, 4, dtype=torch.float64)
    out = S._TakeTokens.apply(t, idx)
    assert torch.equal(out, t[:, idx])
    ours, = torch.autograd.grad(out, t, g)
    ref, = torch.autograd.grad(t[:, idx], t, g)
    assert torch.equal(ours, ref) and ours[:, [i for i in range(10) if i not in idx.tolist()]].abs().sum() == 0
    assert torch.autograd.gradcheck(lambda u: S._TakeTokens.apply(u, idx), (t,))
    y = torch.randn(2, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    keep = torch.randperm(25)[:6]
    gy = torch.randn(2, 6, 4, dtype=torch.float64)
    ours, = torch.autograd.grad(S._TakeTokens.apply(S._tokens(y), keep), y, gy)
    ref, = torch.autograd.grad(S._tokens(y)[:, keep], y, gy)
    assert torch.equal(ours, ref)


def test_sampled_token_count_is_int_rho_n():
    shapes = []
    for rho, stride, c_out in ((0.2, 1, 8), (0.37, 1, 8), (0.2, 2, 16), (1.0, 2, 16)):
        net = wrapped(S.BasicBlock(8, c_out, stride), rho=rho, shape=(2, 8, 32, 32))
        h = net[0].proj.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
        net(torch.randn(3, 8, 32, 32))
        h.remove()
        n = (32 // stride) ** 2
        assert shapes[-2:] == [(3, int(rho * n), 8)] * 2  # target side and prediction side, same tokens
    assert [s[1] for s in shapes[::2]] == [204, 378, 51, 256]
    assert len(S.SIM(nn.Identity(), 4, 4, rho=0.01).sample(16, "cpu")) == 2  # floor: a std needs 2 tokens


class Ignores(nn.Module):
    """A block whose output does not depend on its input: any gradient reaching x must come from SIM."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, c, 8, 8))

    def forward(self, x):
        return self.w.expand(len(x), -1, -1, -1)


@pytest.mark.parametrize("mode", ["rho", "full"])
def test_stop_gradient_on_the_target_side(mode):
    net = wrapped(Ignores(8), mode, shape=(2, 8, 8, 8))
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    net(x)
    loss = S.sim_loss(net)
    assert loss.item() > 0
    loss.backward()
    assert x.grad is None  # the target x entered only through x.detach()
    heads = [p for n, p in net[0].named_parameters() if not n.startswith("block.")]
    assert heads and all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    assert net[0].block.w.grad.abs().sum() > 0  # the prediction side trains the block
    # with a real block: x's gradient is exactly the one through the block path
    blk = wrapped(S.BasicBlock(8, 8, 1), mode, shape=(2, 8, 8, 8))[0]
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    torch.manual_seed(3)
    g1, = torch.autograd.grad(blk.full_loss(x, blk.block(x)) if mode == "full" else blk.rho_loss(x, blk.block(x)), x)
    torch.manual_seed(3)
    c = x.detach().clone()
    g2, = torch.autograd.grad(blk.full_loss(c, blk.block(x)) if mode == "full" else blk.rho_loss(c, blk.block(x)), x)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("mode", ["rho", "full"])
def test_stride2_block_both_modes(mode):
    net = wrapped(S.BasicBlock(8, 16, 2), mode)
    x = torch.randn(4, 8, 16, 16)
    y = net(x)
    assert y.shape == (4, 16, 8, 8)
    if mode == "full":
        assert net[0].decoder(y).shape == x.shape  # decoded back onto the input grid, no resizing needed
        # full SIM's loss is the mean squared error of the decoded output against the block's input
        assert net[0].loss.item() == pytest.approx(((net[0].decoder(y) - x) ** 2).mean().item(), rel=1e-6)
    loss = S.sim_loss(net)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert S.sim_loss(net).item() == 0.0  # collected losses are cleared


def test_token_sequence_blocks():
    """The plug-in also wraps blocks on token sequences (B, N, C), e.g. a transformer MLP."""
    class MLP(nn.Sequential):
        pass
    for mode in ("rho", "full"):
        blk = MLP(nn.LayerNorm(12), nn.Linear(12, 24))
        net = wrapped(blk, mode, shape=(2, 10, 12))
        assert (isinstance(net[0].pre, nn.Linear) and net[0].pre.weight.shape == (12, 24)) if mode == "rho" \
            else net[0].decoder.weight.shape == (12, 24)
        net(torch.randn(3, 10, 12))
        loss = S.sim_loss(net)
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        assert blk[1].weight.grad.abs().sum() > 0


def backbone(state):
    """The ResNet's own tensors, keyed as in the plain model (SIM heads dropped, '.block.' removed)."""
    heads = ("pre", "proj", "pred", "decoder")
    return {k.replace(".block.", ".", 1): v for k, v in state.items()
            if not (k.startswith("blocks.") and k.split(".")[2] in heads)}


def test_recipe_loss_optimizer_and_schedule_by_hand():
    """total = CE with the configured label smoothing + lam * SIM; SGD with Nesterov momentum and weight
    decay; lr: linear warm-up to the peak over `warmup` steps (step s gets (s + 1) / warmup), then a cosine
    from the peak at step `warmup` to 0 at `total`."""
    cfg = dict(S.parse_args(["--smoke"]).__dict__, label_smoothing=0.2, lam=0.5, lr=0.4, momentum=0.9, wd=5e-4)
    torch.manual_seed(0)
    net = S.build_model(cfg)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    total, ce, sim = S.training_loss(net, x, y, cfg)
    torch.manual_seed(1)
    logits = net(x)
    S.sim_loss(net)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.2).item(), rel=1e-6)
    assert ce.item() != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3)
    assert sim.item() > 0 and total.item() == pytest.approx(ce.item() + 0.5 * sim.item(), rel=1e-6)
    g = S.make_optimizer(net, cfg, torch.device("cpu")).defaults
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.4, 0.9, True, 5e-4)
    assert not S.make_optimizer(net, dict(cfg, momentum=0.0), torch.device("cpu")).defaults["nesterov"]
    lrs = [S.lr_at(s, 10, 4, 0.4) for s in range(10)]
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lrs[4:] == pytest.approx([0.4 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])


def test_wrapper_is_transparent_and_free_at_eval():
    cfg = dict(sim="rho", rho=0.2, latent_dim=32, width=8, dataset="cifar10")
    for mode in ("rho", "full"):
        torch.manual_seed(0)
        plain = S.build_model(dict(cfg, sim="off"))
        torch.manual_seed(0)
        net = S.build_model(dict(cfg, sim=mode))
        # the backbone's initial weights do not depend on the mode (it is built before the heads)
        a, b = backbone(plain.state_dict()), backbone(net.state_dict())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        x = torch.randn(4, 3, 32, 32)
        plain.train(), net.train()
        assert torch.equal(plain(x), net(x))  # training forward: the block's output unchanged
        assert torch.isfinite(S.sim_loss(net))
        plain.eval(), net.eval()
        with torch.no_grad():
            assert torch.equal(plain(x), net(x))
        assert common.count_flops(lambda: net(x)) == common.count_flops(lambda: plain(x))
        assert all(m.loss is None for m in net.modules() if isinstance(m, S.SIM))
        net.train()
        with torch.no_grad():
            net(x)
        assert all(m.loss is None for m in net.modules() if isinstance(m, S.SIM))


def test_flops_order_off_rho_full():
    """At the real width (64): off < rho < full, per training step (forward + backward)."""
    flops = {}
    for mode in S.MODES:
        cfg = dict(sim=mode, rho=0.2, latent_dim=128, width=64, lam=5e-3, label_smoothing=0.1, dataset="cifar10")
        torch.manual_seed(0)
        net = S.build_model(cfg)
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
        flops[mode] = common.count_flops(lambda: S.training_loss(net, x, y, cfg)[0].backward())
    assert flops["off"] < flops["rho"] < flops["full"], flops
    assert flops["rho"] / flops["off"] < 1.2  # sampling 20% of tokens keeps the extra cost small


@pytest.mark.parametrize("mode", ["rho", "full"])
def test_sim_blocks_all_or_stride1(mode):
    """--sim-blocks stride1 wraps only the 5 BasicBlocks that keep the map size (the authors' code cannot
    pair tokens across a stride-2 block); all wraps the 8. Both train, and stride1 costs less."""
    flops, x, y = {}, torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for blocks, want in (("all", list(range(8))), ("stride1", [0, 1, 3, 5, 7])):
        cfg = dict(sim=mode, rho=0.2, latent_dim=16, width=8, lam=5e-3, label_smoothing=0.1, dataset="cifar10",
                   sim_blocks=blocks)
        torch.manual_seed(0)
        net = S.build_model(cfg)
        assert [i for i, b in enumerate(net.blocks) if isinstance(b, S.SIM)] == want
        assert all(b.block.conv1.stride == (1, 1) for b in net.blocks if isinstance(b, S.SIM)) == (blocks == "stride1")
        flops[blocks] = common.count_flops(lambda: S.training_loss(net, x, y, cfg)[0].backward())
        assert sum(m.loss is None for m in net.modules() if isinstance(m, S.SIM)) == len(want)  # all collected
    assert flops["stride1"] < flops["all"]
    # what counts is the map size, not the width: a stride-1 block that widens 8 -> 16 channels is wrapped
    torch.manual_seed(0)
    seq = nn.Sequential(S.BasicBlock(8, 16, 1), S.BasicBlock(16, 16, 2))
    S.add_sim(seq, S.BasicBlock, torch.zeros(2, 8, 8, 8), mode, 0.2, 16, blocks="stride1")
    assert [isinstance(b, S.SIM) for b in seq] == [True, False]
    # the same backbone either way; checkpoints from before the flag build as "all"
    legacy = dict(cfg)
    del legacy["sim_blocks"]
    assert sum(isinstance(b, S.SIM) for b in S.build_model(legacy).blocks) == 8
    assert S.parse_args(["--smoke"]).sim_blocks == "all"
    a = S.parse_args(["--smoke", "--sim-blocks", "stride1"])
    assert a.sim_blocks == "stride1" and "stride1" in a.out and "sim_blocks" not in S.SAFE_ON_RESUME


def test_flops_cut_compared_with_the_paper_only_at_width_64():
    cost = {"flops_per_step": {"off": 100, "full": 150, "rho": 110}}
    real, smoke = S.parse_args([]), S.parse_args(["--smoke"])
    assert real.width == 64 and "26.7% fewer FLOPs (paper: 16.5%" in S.flops_cut_line(real, cost)
    assert smoke.width == 8 and "(paper: 16.5%" not in S.flops_cut_line(smoke, cost)
    assert "not comparable" in S.flops_cut_line(smoke, cost)


def test_old_run_json_keys_are_translated():
    """run.json from before single-view became the headline had test_acc = flip TTA."""
    old = {"variant": "off", "test_acc": 91.0, "test_acc_no_tta": 90.0}
    assert S.current_run_json(old) == {"variant": "off", "test_acc": 90.0, "test_acc_tta": 91.0}
    new = {"variant": "off", "test_acc": 90.0, "test_acc_tta": 91.0}
    assert S.current_run_json(new) == new


def test_probe_protocol():
    cfg = dict(sim="rho", rho=0.2, latent_dim=32, width=8, dataset="cifar10")
    net = S.build_model(cfg).eval()
    assert S.probe_layers(cfg) == 8
    x = torch.randn(3, 3, 32, 32)
    f = S.probe_features(net, x, cfg, [1, 3, 8])
    assert {k: tuple(v.shape) for k, v in f.items()} == {1: (3, 8), 3: (3, 16), 8: (3, 64)}
    with torch.no_grad():  # block l's output, averaged over the map: layer 8 is what the classifier reads
        outs = [net.stem(x)]
        for blk in net.blocks:
            outs.append(blk(outs[-1]))
        outs = outs[1:]
        assert torch.allclose(f[3], outs[2].mean((2, 3)), atol=1e-6)
        assert torch.allclose(net.fc(f[8]), net(x), atol=1e-5)


def test_evaluate_counts_flip_tta_and_plain():
    """evaluate() against a per-image loop: TTA sums the logits of the image and its mirror, the short last
    batch counts. A linear model, so predictions vary and mirroring changes them; half the labels are its
    own plain predictions, so neither accuracy is near 0 or 100 by construction."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (50,), generator=g)
    with torch.no_grad():
        y[::2] = net(next(iter(common.GPUBatches(x, y, 50, train=False)))[0]).argmax(1)[::2]
    batches = common.GPUBatches(x, y, 20, train=False)
    tta = plain = 0
    with torch.no_grad():
        for xb, yb in batches:
            for i in range(len(yb)):
                a, b = net(xb[i:i + 1]), net(xb[i:i + 1].flip(3))
                tta += int((a + b).argmax() == yb[i])
                plain += int(a.argmax() == yb[i])
    assert 25 <= plain < 50 and tta != plain
    assert S.evaluate(net, batches, torch.device("cpu")) == (pytest.approx(2 * tta), pytest.approx(2 * plain), 50)
    assert net.training  # handed back in training mode


def _train_in_process(args, cfg, data, out, ck=None, stop_at=None, **kw):
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        os.makedirs(out, exist_ok=True)
        return S.train_run(args, cfg, CPU, data, out, common.StopSignal(stop_at), ck, 1, **kw)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


T_975_DF2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom (tables)


def test_summary_intervals_and_paired_gain():
    """Per variant: the seeds' values, mean, sample std and the 95% Student-t half width; the gain is paired by
    seed (not by position), over the seeds that have both runs."""
    off = {2: (92.5, 93.0), 0: (90.0, 90.5), 1: (91.0, 92.0)}  # seed: (single-view, TTA), out of order
    rho = {1: (91.0, 92.5), 3: (99.0, 99.0), 0: (90.5, 91.0), 2: (93.5, 93.5)}  # seed 3 has no baseline
    results = [{"variant": v, "seed": s, "test_acc": a, "test_acc_tta": t, "train_step_ms": 10.0 if v == "off" else 11.0}
               for v, runs in (("rho", rho), ("off", off)) for s, (a, t) in runs.items()]
    m = S.summarise(results, ["off", "rho"], "rho")
    assert m["seeds"] == {"off": [0, 1, 2], "rho": [0, 1, 2, 3]}
    assert m["test_acc"]["off"] == [90.0, 91.0, 92.5] and m["test_acc_tta"]["rho"] == [91.0, 92.5, 93.5, 99.0]
    v = [90.0, 91.0, 92.5]
    assert m["test_acc_mean"]["off"] == pytest.approx(sum(v) / 3)
    assert m["test_acc_std"]["off"] == pytest.approx(statistics.stdev(v))
    assert m["test_acc_ci95"]["off"] == pytest.approx(T_975_DF2 * statistics.stdev(v) / math.sqrt(3), rel=1e-6)
    g = m["paired_gain"]
    assert g["seeds"] == [0, 1, 2] and g["per_seed"] == pytest.approx([0.5, 0.0, 1.0]) and g["n"] == 3
    assert g["mean"] == pytest.approx(0.5) and g["ci95"] == pytest.approx(T_975_DF2 * 0.5 / math.sqrt(3), rel=1e-6)
    assert m["paired_gain_tta"]["per_seed"] == pytest.approx([0.5, 0.5, 0.5]) and m["paired_gain_tta"]["ci95"] == 0
    assert m["train_step_ratio"] == pytest.approx(1.1) and m["paper"] == {"off": 94.65, "rho": 94.94, "gain": 0.29}
    one = S.summarise([r for r in results if r["seed"] == 0], ["off", "rho"], "rho")
    assert one["test_acc_ci95"] == {"off": None, "rho": None} and one["paired_gain"]["ci95"] is None
    assert S.pm(one["paired_gain"], "+") == "+0.50 (1 seed)" and S.pm(g, "+") == "+0.50 +- 1.24"
    alone = S.summarise([r for r in results if r["variant"] == "rho"], ["rho"], "rho")
    assert "paired_gain" not in alone and alone["test_acc_mean"]["rho"] == pytest.approx(93.5)


def test_cost_of_a_step_scales_exactly_and_ratios_are_against_off(cifar):
    """measure_cost counts the FLOPs of 2 images and scales them to the batch: exactly the count of a whole
    batch's step; step times are timed per mode and put against off's (rho / off, not off / rho)."""
    args = S.parse_args(TINY + ["--data-dir", cifar, "--batch-size", "8", "--bench-steps", "1"])
    data = S.load_data(args, CPU)
    cost = S.measure_cost(args, CPU, data, log=lambda *a: None)
    x, y = next(S.make_batches(data, dict(vars(args), sim="off", dataset="cifar10"), CPU)[0].epoch(0))
    for mode in S.MODES:
        cfg = dict(vars(args), sim=mode, dataset="cifar10")
        net = S.new_model(cfg, CPU)
        whole = common.count_flops(lambda: S.training_loss(net, x, y, cfg)[0].backward())
        assert len(x) == 8 and cost["flops_per_step"][mode] == whole, mode
    assert cost["flops_ratio"]["rho"] == cost["flops_per_step"]["rho"] / cost["flops_per_step"]["off"] > 1
    ms = cost["step_ms"]
    assert set(ms) == set(S.MODES) and all(v > 0 for v in ms.values())
    assert cost["step_ratio"] == {m: ms[m] / ms["off"] for m in S.MODES}


def test_training_loop_step_by_step(cifar, tmp_path, monkeypatch):
    """What train_run does each step: step s (0, 1, ...) trains at lr_at(s); a logged loss is the mean of the
    steps since the last line (the short last interval too); the step timing leaves out this process's first
    epoch (compile and warm-up); a stop charges the time trained so far to the checkpoint."""
    argv = TINY + ["--data-dir", cifar, "--train-subset", "448", "--log-every", "3"]  # 7 steps per epoch, 2 epochs
    args = S.parse_args(argv)
    data = S.load_data(args, CPU)
    cfg = dict(vars(args), dataset="cifar10")
    lr_steps, losses = [], []
    lr_at, loss_of = S.lr_at, S.training_loss
    monkeypatch.setattr(S, "lr_at", lambda step, *a: lr_steps.append(step) or lr_at(step, *a))

    def recorded_loss(*a):
        out = loss_of(*a)
        losses.append(out[0].item())
        return out
    monkeypatch.setattr(S, "training_loss", recorded_loss)
    out = str(tmp_path / "run")
    _train_in_process(args, cfg, data, out)
    ck = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert lr_steps == list(range(14)) and len(losses) == 14
    assert [h[0] for h in ck["history"]["loss"]] == [3, 6, 9, 12, 14]
    for (step, mean, *_), first in zip(ck["history"]["loss"], [0, 3, 6, 9, 12]):
        assert mean == pytest.approx(sum(losses[first:step]) / (step - first), rel=1e-5), step
    # timed intervals: those ending after step 7 (the first epoch) and after a previous line: steps 9, 12, 14
    assert [n for _, n in ck["timing"]] == [3, 3, 2]

    stopped = str(tmp_path / "stopped")
    assert _train_in_process(args, cfg, data, stopped, stop_at=2) is None
    assert common.load_checkpoint(os.path.join(stopped, "ckpt.pt"))["seconds"] > 0


def test_target_acc_time_null_and_resume(cifar, tmp_path, monkeypatch):
    """--target-acc: the seconds from the clock to the first evaluation at or above it (0: the first one), null if
    never reached (101); kept across a --resume when measured before the interruption, null (epoch kept) when
    the target is reached only after one. Throughput: the steady-state mean step time over both processes."""
    argv = TINY + ["--data-dir", cifar, "--train-subset", "128", "--log-every", "1"]  # 2 steps per epoch, 2 epochs
    args = S.parse_args(argv + ["--target-acc", "0"])
    data = S.load_data(args, CPU)
    cfg = dict(vars(args), dataset="cifar10")
    hit = _train_in_process(args, cfg, data, str(tmp_path / "hit"), clock=time.perf_counter() - 100.0, cold=True)
    assert hit["target_acc"] == 0 and hit["time_to_target_epoch"] == 1 and hit["time_to_target_cold"] is True
    assert 100.0 < hit["time_to_target"] < 100.0 + hit["train_seconds"] + 30 and hit["resumed"] is False
    assert hit["train_img_per_s"] == pytest.approx(64 * 1000 / hit["train_step_ms_mean"]) and hit["train_mfu_pct"] is None
    assert hit["device"].startswith("cpu") and hit["torch"] == torch.__version__ and hit["world_size"] == 1
    never = _train_in_process(args, dict(cfg, target_acc=101.0), data, str(tmp_path / "never"), cold=True)
    assert never["time_to_target"] is None and never["time_to_target_epoch"] is None
    # the target is on single-view accuracy, not flip TTA: with evaluations reading (TTA, single view) (60, 40)
    # after epoch 1 and (70, 55) after epoch 2, a 50% target is reached at epoch 2 (the tiny run sits at chance,
    # where the two agree, so the evaluation is stood in for)
    real = S.evaluate
    scripted = iter([(60.0, 40.0), (70.0, 55.0)] * 3)
    monkeypatch.setattr(S, "evaluate", lambda model, b, dev: (*next(scripted), real(model, b, dev)[2]))
    mid = _train_in_process(args, dict(cfg, target_acc=50.0), data, str(tmp_path / "mid"), cold=True)
    assert mid["time_to_target_epoch"] == 2 and mid["history"]["eval"] == [[1, 60.0, 40.0], [2, 70.0, 55.0]]
    monkeypatch.setattr(S, "evaluate", real)

    # stopped at step 3 (after the epoch-1 evaluation): reached before the stop, so the time is end-to-end
    out = str(tmp_path / "cut")
    assert _train_in_process(args, cfg, data, out, stop_at=3, cold=True) is None
    ck = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["to_target"]["epoch"] == 1 and ck["to_target"]["seconds"] > 0 and ck["to_target"]["cold"]
    res = _train_in_process(args, cfg, data, out, ck=ck)
    assert res["time_to_target"] == ck["to_target"]["seconds"] and res["time_to_target_cold"] and res["resumed"]
    # the resumed process times no step (its first epoch is warm-up): the interrupted one's timing carries over
    assert ck["timing"] and res["train_step_ms_mean"] == pytest.approx(
        sum(t * n for t, n in ck["timing"]) / sum(n for _, n in ck["timing"]))

    # the same cut run, but the target is only asked for on --resume: the epoch is known, no end-to-end time
    out = str(tmp_path / "late")
    assert _train_in_process(args, dict(cfg, target_acc=101.0), data, out, stop_at=3, cold=True) is None
    ck = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["to_target"] is None
    res = _train_in_process(args, cfg, data, out, ck=ck)
    assert res["time_to_target"] is None and res["time_to_target_epoch"] == 1 and res["time_to_target_cold"] is False
    # ... found in the saved history by the same rule: the first epoch whose single view reaches it
    ck["history"]["eval"] = [[1, 60.0, 40.0]] + ck["history"]["eval"][1:]
    res = _train_in_process(args, dict(cfg, target_acc=50.0), data, out, ck=ck)
    assert res["time_to_target_epoch"] is None  # epoch 2, trained after the resume, is at chance
    ck["history"]["eval"] = [[1, 40.0, 60.0]]
    res = _train_in_process(args, dict(cfg, target_acc=50.0), data, out, ck=ck)
    assert res["time_to_target_epoch"] == 1 and res["time_to_target"] is None


def test_lam0_gives_the_baseline_trajectory(cifar, tmp_path):
    args = S.parse_args(TINY + ["--data-dir", cifar, "--lam", "0", "--log-every", "1", "--train-subset", "128",
                                "--batch-size", "32", "--test-subset", "100", "--epochs", "1"])
    data = S.load_data(args, CPU)
    cfg = dict(vars(args), dataset="cifar10")
    res = {m: _train_in_process(args, dict(cfg, sim=m), data, str(tmp_path / m)) for m in ("off", "rho")}
    res["lam"] = _train_in_process(args, dict(cfg, lam=0.5), data, str(tmp_path / "lam"))
    ce = {k: [h[2] for h in r["history"]["loss"]] for k, r in res.items()}
    assert len(ce["off"]) == 4
    assert ce["rho"] == ce["off"]  # bitwise, every step
    assert [h[3] for h in res["rho"]["history"]["loss"]][0] > 0  # the SIM loss was computed, just weighted 0
    assert ce["lam"][0] == ce["off"][0] and ce["lam"][1:] != ce["off"][1:]  # lam > 0 does change training
    assert [h[1] for h in res["rho"]["history"]["loss"]] == [h[1] for h in res["off"]["history"]["loss"]]
    off = backbone(torch.load(tmp_path / "off" / "ckpt.pt", weights_only=False)["model"])
    rho = backbone(torch.load(tmp_path / "rho" / "ckpt.pt", weights_only=False)["model"])
    assert off.keys() == rho.keys() and all(torch.equal(off[k], rho[k]) for k in off)


def test_smoke_run_learns(cifar, readme_smoke):
    """The README's `python sim_cifar.py --smoke` (baseline + rho-SIM, 1024 images, 32 steps each) learns."""
    p, out = readme_smoke("sim_cifar")
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.load(open(out / "results.json"))["metrics"]
    # chance is 10%; on 1000 test images 20% lies ten standard errors above it
    assert m["test_acc"]["rho"][0] > 20.0 and m["test_acc"]["off"][0] > 20.0, m["test_acc"]
    assert [r["variant"] for r in m["runs"]] == ["off", "rho"]
    for r in m["runs"]:
        hist = r["history"]["loss"]
        assert hist[-1][2] < hist[0][2] - 0.2, r["variant"]  # cross-entropy fell
    assert set(m["flops_per_step"]) == set(m["step_ms"]) == set(S.MODES)
    assert m["flops_per_step"]["off"] < m["flops_per_step"]["rho"]
    ck = common.load_checkpoint(str(out / "rho_seed0" / "ckpt.pt"))
    assert ck["script"] == "sim_cifar" and ck["config"]["dataset"] == "cifar10" and ck["config"]["sim"] == "rho"
    S.build_model(ck["config"]).load_state_dict(ck["model"])  # probe.py's path


def test_resume_is_bitwise(cifar, stopped, tmp_path):
    """Baseline + rho, one seed: stopped inside the first run and resumed = run straight through. --target-acc
    (asked for only on --resume here, which it may be) never changes the training."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(stopped, b)
    p, q = side_by_side(  # the straight run beside the resumed one
        lambda: run_script(["sim_cifar.py"] + TINY + ["--data-dir", cifar, "--out", a, "--target-acc", "0"]),
        lambda: run_script(["sim_cifar.py"] + TINY + ["--data-dir", cifar, "--out", b, "--resume", "--target-acc", "0"]))
    assert p.returncode == 0, p.stderr[-3000:]
    # time to target: the first run of a process is a cold start from launch; the second is charged the same
    # set-up plus its own time; the stopped run, resumed, reaches it with no end-to-end clock
    ra = {v: json.load(open(a / f"{v}_seed0" / "run.json")) for v in ("off", "rho")}
    assert ra["off"]["time_to_target_cold"] is True and ra["rho"]["time_to_target_cold"] is False
    for r in ra.values():
        assert r["time_to_target_epoch"] == 1 and 0 < r["time_to_target"] < 120 and r["resumed"] is False
    assert ra["off"]["time_to_target"] > ra["off"]["train_seconds"] / 2  # from launch: set-up included
    assert "cold start" in p.stdout and "after another run of this process" in p.stdout
    assert q.returncode == 0 and "resumed at step 3" in q.stdout, q.stderr[-3000:]
    rb = {v: json.load(open(b / f"{v}_seed0" / "run.json")) for v in ("off", "rho")}
    assert rb["off"]["resumed"] and rb["off"]["time_to_target"] is None and rb["off"]["time_to_target_epoch"] == 1
    assert rb["off"]["time_to_target_cold"] is False and "after --resume: no end-to-end time" in q.stdout
    assert rb["rho"]["resumed"] is False and rb["rho"]["time_to_target"] > 0  # started fresh in this process
    for run in ("off_seed0", "rho_seed0"):
        ca, cb = (torch.load(d / run / "ckpt.pt", weights_only=False) for d in (a, b))
        assert ca["step"] == cb["step"] == 8 and ca["history"] == cb["history"]
        for k in ca["model"]:
            assert torch.equal(ca["model"][k], cb["model"][k]), (run, k)
        for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    ma, mb = (json.load(open(d / "results.json"))["metrics"] for d in (a, b))
    assert ma["test_acc"] == mb["test_acc"] and ma["flops_per_step"] == mb["flops_per_step"]
    assert ma["test_acc_ci95"] == {"off": None, "rho": None} and ma["paired_gain"]["n"] == 1  # one seed: no interval
    # the headline is single-view: results.json, the paired gain and the summary table say so
    for v in ("off", "rho"):
        run = json.load(open(a / f"{v}_seed0" / "run.json"))
        ep, tta, single = run["history"]["eval"][-1]
        assert ma["test_acc"][v] == [run["test_acc"]] == [single] and ma["test_acc_tta"][v] == [tta]
    assert ma["paired_gain"]["per_seed"] == [ma["test_acc"]["rho"][0] - ma["test_acc"]["off"][0]]
    assert ma["paired_gain_tta"]["per_seed"] == [ma["test_acc_tta"]["rho"][0] - ma["test_acc_tta"]["off"][0]]
    assert ma["headline"].startswith("single-view")
    assert "test acc % (single view)" in p.stdout and "flip TTA" in p.stdout
    assert "points single-view (headline" in p.stdout
    # width 8: the FLOPs cut is printed without the paper's 16.5% as a yardstick
    assert "not comparable with the paper's 16.5%" in p.stdout and "(paper: 16.5%" not in p.stdout
    assert set(ma["train_step_ms"]) == {"off", "rho"} and ma["train_step_ratio"] > 0  # the runs' own timing


def test_nan_stops_with_step_and_checkpoint(cifar, stopped, tmp_path):
    out = tmp_path / "nan"
    shutil.copytree(stopped, out)
    ckpt = str(out / "off_seed0" / "ckpt.pt")
    ck = torch.load(ckpt, weights_only=False)
    ck["config"]["lr"] = 1e30  # a run whose own lr blows up (--resume refuses a changed --lr)
    torch.save(ck, ckpt)
    p = run_script(["sim_cifar.py"] + TINY + ["--data-dir", cifar, "--out", out, "--resume", "--lr", "1e30",
                                              "--ckpt-every", "2"])  # no epoch-end checkpoint before the NaN
    assert_clean_error(p, "at step 5", ckpt)  # step 4's update overflows, so step 5's loss is not finite
    assert common.load_checkpoint(ckpt)["step"] == 3  # the last good checkpoint is intact


def test_torchrun_two_processes(cifar, tmp_path):
    out = tmp_path / "ddp"
    p = run_script(["sim_cifar.py"] + TINY + ["--no-baseline", "--epochs", "1", "--data-dir", cifar, "--out", out],
                   torchrun=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("final test acc") == 1 and p.stdout.count("cost of one training step") == 1  # rank 0 logs
    assert sorted(os.listdir(out)) == ["cost.json", "log.txt", "results.json", "rho_seed0"]
    assert sorted(os.listdir(out / "rho_seed0")) == ["ckpt.pt", "run.json"]
    run = json.load(open(out / "results.json"))["metrics"]["runs"][0]
    assert run["test_n"] == 200  # each rank evaluated half; the counts were gathered


DDP_HELPER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import common, sim_cifar as S
from torch.nn.parallel import DistributedDataParallel as DDP


def main():
    d = common.setup_distributed("cpu")
    args = S.parse_args({argv!r})
    cfg = dict(vars(args), dataset="cifar10")
    net = S.new_model(cfg, d)
    model = DDP(net)
    x, y = next(S.make_batches(S.load_data(args, d), cfg, d)[0].epoch(0))
    loss = S.training_loss(model, x, y, cfg)[0]
    loss.backward()
    l = loss.detach().clone()
    dist.all_reduce(l)
    if d.is_main:
        grads = {{n: p.grad for n, p in net.named_parameters()}}
        torch.save({{"loss": l / d.world_size, "rows": len(x), "grads": grads}}, {out!r})
    common.cleanup_distributed()


common.run_main(main)  # as the scripts end: a gloo rank leaves without the interpreter's teardown
"""


def test_two_processes_match_one(cifar, tmp_path):
    """2 processes x B/2 = 1 process x B. BatchNorm normalises per process (SyncBatchNorm has no CPU
    kernel), so the exact single-process reference is the mean of the two half-batch losses and
    gradients (rows 0::2 and 1::2, as GPUBatches shards them), each half drawing the same SIM tokens."""
    argv = TINY + ["--data-dir", cifar, "--lam", "1.0", "--batch-size", "32"]
    helper, out = tmp_path / "helper.py", tmp_path / "ddp.pt"
    helper.write_text(textwrap.dedent(DDP_HELPER.format(root=ROOT, argv=argv, out=str(out))))
    p = run_script([helper], torchrun=2)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    assert got["rows"] == 16

    args = S.parse_args(argv)
    cfg = dict(vars(args), dataset="cifar10")
    net = S.new_model(cfg, CPU)
    rng = torch.get_rng_state()
    x, y = next(S.make_batches(S.load_data(args, CPU), cfg, CPU)[0].epoch(0))
    losses = []
    for r in (0, 1):
        torch.set_rng_state(rng)
        losses.append(S.training_loss(net, x[r::2], y[r::2], cfg)[0] / 2)
        losses[-1].backward()
    assert got["loss"].item() == pytest.approx(sum(losses).item(), rel=1e-5)
    for n, p_ in net.named_parameters():
        torch.testing.assert_close(got["grads"][n], p_.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("argv, words", [
    (["--rho", "0"], ["--rho"]), (["--rho", "1.5"], ["--rho"]), (["--lam", "-1"], ["--lam"]),
    (["--lam", "nan"], ["--lam"]), (["--sim", "full", "--rho", "0.5"], ["--rho", "--sim rho"]),
    (["--sim", "off", "--lam", "0.1"], ["--lam"]), (["--sim", "full", "--latent-dim", "64"], ["--latent-dim"]),
    (["--seeds", "0"], ["--seeds"]), (["--epochs", "0"], ["--epochs"]), (["--width", "-1"], ["--width"]),
    (["--lr", "0"], ["--lr"]), (["--momentum", "1"], ["--momentum"]),
    (["--label-smoothing", "1"], ["--label-smoothing"]),
    (["--warmup-epochs", "50"], ["--warmup-epochs"]), (["--test-subset", "-5"], ["--test-subset"]),
    (["--batch-size", "4096"], ["--train-subset", "--batch-size"]),
    (["--sim", "off", "--sim-blocks", "stride1"], ["--sim-blocks"]),
    (["--target-acc", "-1"], ["--target-acc"]), (["--target-acc", "nan"], ["--target-acc"]),
])
def test_flag_validation(argv, words):
    with pytest.raises(common.UserError) as e:
        S.parse_args(["--smoke"] + argv)
    for w in words:
        assert w in str(e.value)


def test_bad_invocations(cifar, tmp_path, capsys):
    """Each mistake ends in one line naming it, no traceback. The two argparse refusals run as a user types
    them (a process each, side by side); the rest through main() as the command line runs it (common.run_main),
    in this process: the same code path without a torch import per case."""
    bad_ck = tmp_path / "corrupt" / "off_seed0"
    bad_ck.mkdir(parents=True)
    (bad_ck / "ckpt.pt").write_bytes(b"\x80\x02 truncated")
    base = ["--smoke", "--data-dir", cifar, "--out", str(tmp_path / "o")]
    typed = [(["--sim", "half"], ["--sim"]), (["--epochs", "zero"], ["--epochs"])]
    for (argv, words), p in zip(typed, side_by_side(*[lambda a=a: run_script(["sim_cifar.py"] + base + a)
                                                       for a, _ in typed])):
        assert p.returncode == 2
        assert_clean_error(p, *words)
    for argv, words in [
        (["--rho", "2"], ["--rho"]),
        (["--width", "4", "--compile", "--device", "cpu"], ["--width 4", "--compile"]),
        (["--out", "/proc/no/such/dir"], ["--out"]),
        (["--data-dir", str(tmp_path / "nowhere"), "--no-download"], ["--data-dir"]),
        (["--resume", "--out", str(tmp_path / "empty")], ["no checkpoint", "--resume"]),
        (["--sim", "off", "--resume", "--out", str(tmp_path / "corrupt")], ["not a readable checkpoint"]),
    ]:
        code, err = run_in_process(S.main, base + argv, capsys)
        err = err.strip()
        assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)
        assert all(w in err for w in words), (argv, err)


def test_basicblock_relu_comes_after_the_sum():
    blk = S.BasicBlock(4, 4, 1).eval()
    with torch.no_grad():
        blk.conv2.weight.zero_()          # residual branch -> bn2(0) = 0 (beta 0): block = relu(x + 0)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    y = blk(x)
    assert (y >= 0).all() and torch.allclose(y, x.clamp_min(0))


def test_training_batches_mirror_half_the_images():
    cpu = common.Dist(0, 0, 1, torch.device("cpu"), True)
    ramp = (torch.arange(32) * 8).to(torch.uint8).view(1, 1, 1, 32).expand(256, 3, 32, 32).contiguous()
    data = (ramp, torch.zeros(256, dtype=torch.long), ramp[:8], torch.zeros(8, dtype=torch.long))
    train, _ = S.make_batches(data, dict(batch_size=64, seed=0), cpu)
    x = torch.cat([b for b, _ in train.epoch(0)])
    mirrored = (x[..., :16].mean((1, 2, 3)) > x[..., 16:].mean((1, 2, 3))).float().mean().item()
    assert 0.35 < mirrored < 0.65  # the standard CIFAR recipe: RandomHorizontalFlip(0.5) (+ 4-px pad and crop)


def test_warmup_is_rounded_steps_not_whole_epochs(cifar, tmp_path, monkeypatch):
    """--warmup-epochs 0.5 at 7 steps an epoch (448 images, batch 64) is round(3.5) = 4 warm-up steps, so
    steps 0..3 train at lr * 1/4, 2/4, 3/4, 4/4 (linear from 0, per step). Truncating the warm-up to whole
    epochs (int(0.5) = 0) would start at the full peak instead."""
    argv = TINY + ["--data-dir", cifar, "--train-subset", "448", "--warmup-epochs", "0.5", "--log-every", "100"]
    args = S.parse_args(argv)
    data = S.load_data(args, CPU)
    cfg = dict(vars(args), dataset="cifar10")
    seen = []
    lr_at = S.lr_at
    monkeypatch.setattr(S, "lr_at", lambda *a: seen.append(lr_at(*a)) or seen[-1])
    assert _train_in_process(args, cfg, data, str(tmp_path / "run"), stop_at=4) is None
    peak = cfg["lr"]
    assert seen == pytest.approx([peak * k / 4 for k in (1, 2, 3, 4)])


def test_resumed_process_leaves_its_own_first_epoch_out_of_the_timing(cifar, tmp_path):
    """Steady-state timing skips each process's first epoch (compile, warm-up). A 2-epoch run of 7 steps an
    epoch, stopped at step 7 and resumed, has its resumed process train only steps 8..14 -- that process's
    first epoch -- and the stopped one logged only at steps 3 and 6, inside its own first epoch. So no
    interval anywhere is steady-state: the timing stays empty. Counting from step 0 instead of the process's
    start step would wrongly time the intervals ending at 12 and 14 after the resume."""
    argv = TINY + ["--data-dir", cifar, "--train-subset", "448", "--log-every", "3"]
    args = S.parse_args(argv)
    data = S.load_data(args, CPU)
    cfg = dict(vars(args), dataset="cifar10")
    out = str(tmp_path / "run")
    assert _train_in_process(args, cfg, data, out, stop_at=7) is None
    ck = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 7 and ck["timing"] == []
    _train_in_process(args, cfg, data, out, ck=ck)
    end = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert end["step"] == 14 and [h[0] for h in end["history"]["loss"]] == [3, 6, 9, 12, 14]
    assert end["timing"] == []


def test_step_time_leaves_the_evaluation_pause_out(cifar, tmp_path, monkeypatch):
    """With a clock that moves 1 s per training step and 100 s per evaluation, every steady-state interval
    (those ending at steps 9, 12, 14 of a 2 x 7-step run logged every 3 steps) must read exactly 1000 ms a step:
    the epoch-1 evaluation at step 7 sits inside the 6..9 interval, and its 100 s is not training time.
    Counting the pause would give (3 + 100) / 3 s a step there."""
    clock = FakeClock()
    loss_of, evaluate = S.training_loss, S.evaluate

    def timed_loss(*a):
        clock.t += 1.0
        return loss_of(*a)

    def slow_eval(*a):
        clock.t += 100.0
        return evaluate(*a)
    monkeypatch.setattr(S, "training_loss", timed_loss)
    monkeypatch.setattr(S, "evaluate", slow_eval)
    monkeypatch.setattr(S, "time", clock.ns())
    argv = TINY + ["--data-dir", cifar, "--train-subset", "448", "--log-every", "3"]
    args = S.parse_args(argv)
    data = S.load_data(args, CPU)
    cfg = dict(vars(args), dataset="cifar10")
    out = str(tmp_path / "run")
    _train_in_process(args, cfg, data, out, clock=clock.t)
    ck = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert [e[0] for e in ck["history"]["eval"]][:1] == [1]  # the step-7 evaluation ran inside an interval
    assert ck["timing"] == [[pytest.approx(1000.0), 3], [pytest.approx(1000.0), 3], [pytest.approx(1000.0), 2]]
