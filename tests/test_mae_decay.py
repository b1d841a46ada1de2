"""mae_decay.py: the shortcut schedule and blocks against hand computations, masking and skips, the GPU
crop, a short real CIFAR-10 run that must learn, the probe.py protocol, and issue 8's reliability checks
(resume bitwise, torchrun 2 processes vs 1, NaN guard, bad flags)."""
import contextlib, json, math, os, signal, time, types
from collections import namedtuple

import numpy as np
import pytest
import torch

import common
import mae_decay as M
from conftest import (FakeClock, assert_clean_error, need, randomize, run_script, side_by_side, tiny_cifar10,
                      tiny_cifar100)

TINY = dict(img_size=32, patch=8, dim=32, depth=4, heads=2, mlp_ratio=4.0, dec_dim=16, dec_depth=2, dec_heads=2,
            pos_embed="sincos", alpha_min=0.6, decay="linear", decay_where="both", skip=True, mask_ratio=0.75,
            norm_pix_loss=True)
FakeDist = namedtuple("FakeDist", "rank world_size device")


def tiny(**kw):
    torch.manual_seed(0)
    return M.build_model(dict(TINY, **kw))


@contextlib.contextmanager
def signals_kept():
    """main() installs SIGTERM/SIGINT handlers (StopSignal); give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@contextlib.contextmanager
def one_thread():
    """Tiny matrices: threads only add contention on a shared CI machine (and change float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_inproc(argv):
    with one_thread(), signals_kept():
        M.main(["--device", "cpu"] + [str(a) for a in argv])


def cifar(data_dir):
    need(data_dir, "cifar10", "cifar-10-batches-py", "test_batch")
    return data_dir

# ---------------------------------------------------------------------------------------------------- formulas


def test_decay_schedule_matches_formula():
    assert torch.allclose(M.decay_schedule(2, 0.7), torch.tensor([[1.0, 0.9], [0.8, 0.7]], dtype=torch.float64),
                          atol=1e-15)
    for depth, amin in ((12, 0.6), (5, 0.3), (1, 0.5)):
        s = M.decay_schedule(depth, amin)
        assert s.shape == (depth, 2)
        flat = s.flatten()  # sub-layer order: block 0 attention, block 0 MLP, block 1 attention, ...
        assert flat[0] == 1.0 and abs(flat[-1] - amin) < 1e-15
        n = 2 * depth
        assert torch.allclose(flat, torch.tensor([1 - k * (1 - amin) / (n - 1) for k in range(n)],
                                                 dtype=torch.float64), atol=1e-14, rtol=0)
    assert torch.equal(M.decay_schedule(6, 1.0), torch.ones(6, 2, dtype=torch.float64))


def test_table3b_variants():
    r = math.sqrt(0.5)
    a, b = M.shortcut_coeffs(3, "none", 0.6)
    assert torch.equal(a, torch.ones(3, 2, dtype=torch.float64)) and torch.equal(b, a)
    a, b = M.shortcut_coeffs(3, "scale-branch", 0.6)
    assert (a == 1).all() and torch.allclose(b, torch.full((3, 2), r, dtype=torch.float64))
    a, b = M.shortcut_coeffs(3, "scale-both", 0.6)
    assert torch.allclose(a, torch.full((3, 2), r, dtype=torch.float64)) and torch.equal(a, b)
    s = M.decay_schedule(3, 0.6)
    a, _ = M.shortcut_coeffs(3, "linear", 0.6, "attn")
    assert torch.equal(a[:, 0], s[:, 0]) and (a[:, 1] == 1).all()
    a, _ = M.shortcut_coeffs(3, "linear", 0.6, "mlp")
    assert torch.equal(a[:, 1], s[:, 1]) and (a[:, 0] == 1).all()
    m = tiny(decay="scale-both")
    assert all((blk.a_att, blk.a_mlp, blk.b_att, blk.b_mlp) == (r, r, r, r) for blk in m.blocks)


def test_attention_is_softmax_attention():
    attn = randomize(M.Attention(16, 2), 0.3)
    x = torch.randn(3, 7, 16)
    q, k, v = attn.qkv(x).view(3, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(3, 7, 16))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_pearson_needs_three_evaluations():
    """Fig. 5's correlation over the evaluations: None below 3 points (two points always give +-1) or for a
    constant series, else numpy's r."""
    assert M.pearson([1.0, 2.0], [3.0, 5.0]) is None and M.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 4.0]) is None
    assert M.pearson([1.0, 2.0, 4.0], [2.0, 1.0, 7.0]) == pytest.approx(np.corrcoef([1, 2, 4], [2, 1, 7])[0, 1])


def test_flops_per_image_is_forward_plus_backward_per_image():
    """MFU's numerator against a count from the layer shapes: every linear 2*rows*in*out forward and twice
    that backward (the patch embedding has no input gradient), attention 4*T^2*D forward + 8*T^2*D backward
    (the math kernel, whose matmuls the counter sees as it sees CUDA's fused kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    args = M.parse_args(["--smoke"])
    model = M.build_model(vars(args))
    rows = {}  # name -> input rows per image
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, inp, out, n=n: rows.__setitem__(n, inp[0].shape[:-1].numel() // 2))
    with sdpa_kernel(SDPBackend.MATH):
        got = M.flops_per_image(model, args, torch.device("cpu"))
    linear = sum(2 * rows[n] * m.in_features * m.out_features * (2 if n == "patch_embed" else 3)
                 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    t_enc, t_dec = 1 + int(16 * (1 - args.mask_ratio)), 1 + 16  # cls + visible / cls + all patches
    attn = 12 * (t_enc ** 2 * args.dim * args.depth + t_dec ** 2 * args.dec_dim * args.dec_depth)
    assert rows["patch_embed"] == 16 and rows["blocks.0.attn.qkv"] == t_enc and rows["head"] == t_dec
    assert got == linear + attn
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind


@pytest.mark.parametrize("decay,amin", [("none", 0.6), ("linear", 1.0)])
def test_plain_residual_is_a_standard_prenorm_block(decay, amin):
    model = randomize(tiny(decay=decay, alpha_min=amin))
    x = torch.randn(3, 5, 32)
    for blk in model.blocks:
        h = x + blk.attn(blk.norm1(x))
        ref = h + blk.mlp(blk.norm2(h))
        assert torch.equal(blk(x), ref)
        assert not torch.allclose(ref, x, atol=1e-3)  # the branches do contribute


@pytest.mark.parametrize("decay", ["linear", "scale-branch", "scale-both"])
def test_decayed_block_scales_the_shortcut_not_the_branch(decay):
    """x <- a_att x + b_att attn(LN(x)); x <- a_mlp x + b_mlp mlp(LN(x)) with trained (non-zero) branches; the
    linear decay leaves the branches unscaled (b = 1), which scaling the block's sum would not."""
    model = randomize(tiny(decay=decay, alpha_min=0.4))
    x = torch.randn(3, 5, 32)
    for blk in model.blocks:
        h = blk.a_att * x + blk.b_att * blk.attn(blk.norm1(x))
        assert torch.allclose(blk(x), blk.a_mlp * h + blk.b_mlp * blk.mlp(blk.norm2(h)), rtol=1e-5, atol=1e-6)
    last = model.blocks[-1]
    assert (last.a_att, last.a_mlp, last.b_att, last.b_mlp) != (1.0,) * 4 and not torch.allclose(last(x), x, atol=1e-3)


def test_patches_round_trip_and_the_loss_counts_removed_patches_only():
    """patchify / unpatchify invert each other (row-major patches, (row, col, channel) inside); the target is
    each patch standardised (unbiased variance + 1e-6 under the root, official MAE's); the loss is the mean
    squared error over the removed patches alone."""
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    p = M.patchify(imgs, 8)
    assert p.shape == (2, 16, 192) and torch.equal(M.unpatchify(p, 8), imgs)
    assert torch.equal(p[1, 5], imgs[1, :, 8:16, 8:16].permute(1, 2, 0).reshape(-1))  # patch (1, 1)
    flat = torch.zeros(1, 3, 32, 32)
    flat[0, 0, 0, 0] = 2.0 ** -10  # a nearly flat patch (variance 5e-9): the 1e-6 inside the root matters
    t = tiny().target(flat)[0, 0]
    v = flat[0, :, :8, :8].permute(1, 2, 0).reshape(-1).double()
    assert torch.allclose(t.double(), (v - v.mean()) / (v.var() + 1e-6).sqrt(), rtol=1e-4, atol=1e-5)
    # on ordinary patches the eps is negligible: the unbiased variance leaves each target's variance 1 (a biased
    # one would leave 192/191)
    t = tiny().target(imgs)
    v = p[0, 3].double()
    assert torch.allclose(t[0, 3].double(), (v - v.mean()) / (v.var() + 1e-6).sqrt(), rtol=1e-5, atol=1e-6)
    assert (t.double().var(-1) - 1).abs().max() < 1e-4
    model = randomize(tiny(), 0.2)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    loss, pred, mask = model(imgs, noise)
    err = ((pred - model.target(imgs)) ** 2).mean(-1)
    assert mask.sum() == 2 * 12 and loss.item() == pytest.approx((err[mask == 1]).mean().item(), rel=1e-6)
    assert abs(err[mask == 1].mean() - err.mean()) > 1e-5 * err.mean()  # with the visible ones it would differ


def test_sincos_pos_embed_by_hand():
    """MAE's fixed table: frequencies w_k = 1 / 10000^(k / (D/4)), k < D/4; the patch in row y, column x (row-major
    order) gets [sin(y w), cos(y w), sin(x w), cos(x w)]."""
    e = M.sincos_pos_embed(8, 3)
    w = torch.tensor([1.0, 0.01], dtype=torch.float64)  # D = 8: 10000^0 and 10000^(-1/2)
    y, x = 2, 1
    expect = torch.cat([torch.sin(y * w), torch.cos(y * w), torch.sin(x * w), torch.cos(x * w)]).float()
    assert e.shape == (9, 8) and torch.allclose(e[3 * y + x], expect)


@pytest.mark.parametrize("skip", [True, False])
def test_decoder_tells_removed_patches_apart_by_position(skip):
    """Every removed patch enters the decoder as the same mask token, so only the decoder's positional embedding
    can make their predictions differ: without it the decoder could not say where a patch goes."""
    model = randomize(tiny(skip=skip)).eval()
    with torch.no_grad():
        _, pred, mask = model(torch.randn(1, 3, 32, 32), torch.rand(1, 16))
    removed = pred[0][mask[0].bool()]
    assert len(removed) == 12
    assert (torch.cdist(removed, removed) + torch.eye(12) * 1e9).min() > 1e-3


def test_cls_token_gets_position_zero():
    """The cls token enters with the pos-embed's row 0: zero in the sincos table, a learned row otherwise."""
    for pos in ("sincos", "learned"):
        model = tiny(pos_embed=pos)
        imgs = torch.randn(2, 3, 32, 32)
        before = model.encode(imgs)[1][0][:, 0]
        with torch.no_grad():
            model.pos_embed[:, 0] += 1.0
        assert not torch.allclose(model.encode(imgs)[1][0][:, 0], before)


def test_lr_scales_with_the_batch_warms_up_and_decays():
    """MAE's rule lr = blr * batch / 256, per-iteration linear warm-up over warmup_epochs, then a half cosine."""
    a = M.parse_args(["--smoke", "--blr", "1.5e-4", "--batch-size", "512", "--warmup-epochs", "1", "--epochs", "3"])
    peak = 1.5e-4 * 2
    assert [M.lr_at(s, a, 4) for s in range(4)] == pytest.approx([peak * k / 4 for k in (1, 2, 3, 4)])
    assert [M.lr_at(s, a, 4) for s in range(4, 12)] == pytest.approx(
        [peak * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])


def test_init_every_encoder_block_is_its_scaled_identity():
    model = tiny(alpha_min=0.6)
    s = M.decay_schedule(4, 0.6)
    x = torch.randn(2, 5, 32)
    for i, blk in enumerate(model.blocks):
        a_att, a_mlp = s[i].tolist()
        assert (blk.a_att, blk.a_mlp, blk.b_att, blk.b_mlp) == (a_att, a_mlp, 1.0, 1.0)
        assert torch.equal(blk(x), x * a_att * a_mlp)
    xd = torch.randn(2, 17, 16)
    assert all(torch.equal(blk(xd), xd) for blk in model.dec_blocks)
    # through the whole encoder: block l's output is the embedded input times the product of alphas so far
    imgs = torch.randn(2, 3, 32, 32)
    _, outs, _, _ = model.encode(imgs)
    x0 = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1),
                    model.patch_embed(M.patchify(imgs, 8)) + model.pos_embed[:, 1:]], 1)
    cum = torch.cumprod(s.flatten(), 0)[1::2]
    for i, o in enumerate(outs):
        assert torch.allclose(o, x0 * float(cum[i]), rtol=1e-6, atol=1e-7)
    assert torch.equal(model(imgs, torch.rand(2, 16))[1], torch.zeros(2, 16, 192))  # zero-init head


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_weight_decay_groups_follow_official_mae(pos_embed):
    """Official MAE (timm's add_weight_decay): only 1-d parameters and biases go undecayed, so the cls
    token, the mask tokens and a learned pos-embed are decayed; --no-wd-tokens exempts them."""
    for skip in (True, False):
        model = tiny(skip=skip, pos_embed=pos_embed)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = M.param_groups(model, 0.05)
        decayed = {names[id(p)] for p in groups[0]["params"]}
        free = {names[id(p)] for p in groups[1]["params"]}
        assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
        assert decayed | free == set(names.values()) and not decayed & free
        tokens = {"cls_token", "skip_mask_tokens" if skip else "mask_token"}
        tokens |= {"pos_embed", "dec_pos_embed"} if pos_embed == "learned" else set()
        assert tokens <= decayed, tokens - decayed
        assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
        assert free == {n for n, p in model.named_parameters() if p.ndim < 2}
        assert "blocks.0.attn.qkv.weight" in decayed and "blocks.0.attn.qkv.bias" in free
        old = M.param_groups(model, 0.05, wd_tokens=False)
        assert {names[id(p)] for p in old[1]["params"]} == free | tokens
    assert M.parse_args([]).wd_tokens and not M.parse_args(["--no-wd-tokens"]).wd_tokens


def test_feature_kinds_cls_after_norm_and_mean_of_raw_tokens():
    model = randomize(tiny()).eval()
    cfg = dict(TINY)
    x = torch.randn(3, 3, 32, 32)
    latent, outs, _, _ = model.encode(x)
    f = M.probe_features(model, x, cfg, [2, 4], feature=M.FEATURES, norms=True)
    assert sorted(f, key=str) == sorted([("cls", 2), ("cls", 4), ("mean", 2), ("mean", 4), ("raw_norm", 2),
                                         ("raw_norm", 4)], key=str)
    assert torch.equal(f[("cls", 4)], latent[:, 0]) and torch.equal(f[("cls", 2)], outs[1][:, 0])
    for l in (2, 4):
        assert torch.allclose(f[("mean", l)], outs[l - 1].mean(1))  # all 1+N tokens, raw (no final norm)
        assert torch.allclose(f[("raw_norm", l)][:, 0], outs[l - 1].norm(dim=-1).mean(1))
    assert not torch.allclose(f[("mean", 4)], model.norm(outs[-1]).mean(1))
    one = M.probe_features(model, x, cfg, [4], feature="mean")
    assert list(one) == [4] and torch.equal(one[4], f[("mean", 4)])
    with pytest.raises(common.UserError, match="feature"):
        M.probe_features(model, x, cfg, [4], feature="avg")


def test_eval_raw_norm_is_the_test_images():
    """evaluate()'s raw_norm: the mean over the TEST images of each image's mean token norm after the last block."""
    model = randomize(tiny(), 0.1)
    cfg = dict(TINY, seed=0, probe_epochs=1)
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8) // 8  # dark: other norms
    test = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = lambda n: torch.arange(n) % 2
    batches = lambda x: common.GPUBatches(x, labels(len(x)), 8, train=False)
    m = M.evaluate(model, cfg, batches(train), batches(test), True)
    xt = next(iter(batches(test)))[0]
    want = M.probe_features(model, xt, cfg, [4], norms=True)[("raw_norm", 4)].mean().item()
    other = M.probe_features(model, next(iter(batches(train)))[0], cfg, [4], norms=True)[("raw_norm", 4)]
    assert m["raw_norm"] == pytest.approx(want, rel=1e-6) and abs(other.mean().item() - want) > 1e-3 * want
    assert (m["n_train"], m["n_test"]) == (16, 8)


def test_random_masking_keeps_the_right_tokens_and_unshuffle_restores_order():
    b, n, d = 3, 16, 4
    x = torch.arange(b * n * d, dtype=torch.float32).view(b, n, d)
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(1))
    vis, mask, ids_restore = M.random_masking(x, noise, 0.75)
    assert vis.shape == (b, 4, d) and mask.shape == (b, n)
    assert (mask.sum(1) == 12).all()
    for i in range(b):
        kept = (vis[i, :, 0] / d).long() % n  # token index of each kept row
        assert torch.equal(kept, noise[i].argsort()[:4])  # the 4 smallest noises, in shuffled order
        assert torch.equal(mask[i] == 0, torch.isin(torch.arange(n), kept))
    cls = torch.full((b, 1, d), -5.0)
    full = M.unshuffle(torch.cat([cls, vis], 1), torch.full((d,), -1.0), ids_restore)
    assert full.shape == (b, n + 1, d) and torch.equal(full[:, :1], cls)
    keep = mask == 0
    assert torch.equal(full[:, 1:][keep], x[keep]) and (full[:, 1:][~keep] == -1).all()
    # kept = int(N * (1 - ratio)), truncated as official MAE's len_keep: 196 -> 49, 14 -> 3 (3.5), 50 -> 12 (12.5)
    assert [M.n_visible(n, 0.75) for n in (196, 64, 14, 50)] == [49, 16, 3, 12]
    # ratio 0.5 of 64 patches keeps 32
    vis, mask, _ = M.random_masking(torch.randn(2, 64, 8), torch.rand(2, 64), 0.5)
    assert vis.shape == (2, 32, 8) and (mask.sum(1) == 32).all()


def test_mask_noise_ranks_split_the_global_batch():
    args = M.parse_args(["--smoke"])
    one = M.mask_noise(args, 5, 16, FakeDist(0, 1, torch.device("cpu")))
    parts = [M.mask_noise(args, 5, 16, FakeDist(r, 2, torch.device("cpu"))) for r in (0, 1)]
    assert one.shape == (32, 16) and torch.equal(one[0::2], parts[0]) and torch.equal(one[1::2], parts[1])
    assert not torch.equal(one, M.mask_noise(args, 6, 16, FakeDist(0, 1, torch.device("cpu"))))


def test_skip_path_shapes_and_no_skip():
    model = tiny(depth=4, dec_depth=3)
    assert model.skip_src == [3, 1] and model.skip_mask_tokens.shape == (2, 32)  # deepest first
    seen = []
    for f in model.skip_fuse:
        f.register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape), tuple(o.shape))))
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    _, pred, mask = model(imgs, noise)
    assert seen == [((2, 17, 16 + 32), (2, 17, 16))] * 2 and pred.shape == (2, 16, 8 * 8 * 3)
    # decoder input = positions only: with the skips' last linears at zero the prediction ignores the image
    randomize(model)
    with torch.no_grad():
        for f in model.skip_fuse:
            f[2].weight.zero_(), f[2].bias.zero_()
    imgs2 = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(imgs, noise)[1], model(imgs2, noise)[1])
    randomize(model)
    assert not torch.allclose(model(imgs, noise)[1], model(imgs2, noise)[1])

    plain = randomize(tiny(skip=False))
    assert not any("skip" in n for n, _ in plain.named_parameters()) and hasattr(plain, "dec_embed")
    p1, p2 = plain(imgs, noise)[1], plain(imgs2, noise)[1]
    assert p1.shape == (2, 16, 192) and not torch.allclose(p1, p2)
    assert M.parse_args(["--smoke", "--no-skip"]).skip is False


def test_gpu_random_resized_crop():
    x = torch.rand(4, 3, 32, 32)
    ident = torch.tensor([[1.0, 1, 0, 0, 0]]).repeat(4, 1)
    assert torch.allclose(M.gpu_rrc(x, ident, 32), x, atol=1e-5)
    flip = ident.clone()
    flip[:, 4] = 1
    assert torch.allclose(M.gpu_rrc(x, flip, 32), x.flip(3), atol=1e-5)
    quarter = torch.tensor([[0.5, 0.5, 0.5, 0, 0]]).repeat(4, 1)  # top-right quarter, sampled at its own pixels
    assert torch.allclose(M.gpu_rrc(x, quarter, 16), x[..., :16, 16:], atol=1e-5)
    p = M.rrc_params(4000, torch.Generator().manual_seed(0))
    w, h, left, top, fl = p.unbind(1)
    area, ratio = w * h, w / h
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 1 + 1e-6
    assert ratio.min() >= 0.75 - 1e-6 and ratio.max() <= 4 / 3 + 1e-6
    assert (left >= 0).all() and (left + w <= 1 + 1e-6).all() and (top + h <= 1 + 1e-6).all()
    assert 0.45 < fl.mean() < 0.55


def test_multi_rank_eval_order_and_shard_sampler():
    x, y = torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.arange(10)
    ranks = [torch.cat([yy for _, yy in common.GPUBatches(x, y, 4, train=False, rank=r, world_size=2)]) for r in (0, 1)]
    gathered = torch.cat(ranks)  # what all_gather_cat returns
    assert not torch.equal(gathered, y)
    assert torch.equal(torch.empty_like(gathered).index_copy_(0, M.gathered_order(10, 4, 2), gathered), y)
    # the folder sampler: ranks together read each global batch; start skips whole batches
    s = [M.ShardSampler(20, 4, 0, r, 2) for r in (0, 1)]
    single = M.ShardSampler(20, 4, 0, 0, 1)
    single.epoch = s[0].epoch = s[1].epoch = 3
    full = list(single)
    a, b = list(s[0]), list(s[1])
    assert len(full) == 20 and sorted(full) == list(range(20))
    assert [sorted(a[2 * i:2 * i + 2] + b[2 * i:2 * i + 2]) for i in range(5)] == [sorted(full[4 * i:4 * i + 4])
                                                                                   for i in range(5)]
    s[0].start = 3
    assert list(s[0]) == a[6:] and len(s[0]) == 4

# ---------------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def learned_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mae_learn")
    run_inproc(["--smoke", "--data-dir", cifar(data_dir), "--out", out, "--n-train", 1024, "--epochs", 4,
                "--log-every", 100])
    return out


def test_short_cifar10_run_learns_and_evaluates(learned_run):
    res = json.load(open(learned_run / "results.json"))
    m = res["metrics"]
    loss = m["train_loss"]
    assert len(loss) == 4 and loss[-1] < loss[0] - 0.04, loss  # ~0.99 (predicting 0) -> ~0.91
    traj = m["trajectory"]
    assert [t["epoch"] for t in traj] == [1, 2, 3, 4] and m["final"] == traj[-1]
    keys = ("linear_probe", "knn", "erank", "erank_exp", "feat_norm")
    for t in traj:
        for f in (t, t["mean"]):  # both feature kinds, each with every metric
            assert all(math.isfinite(f[k]) for k in keys)
            assert 0 <= f["linear_probe"] <= 100 and 0 <= f["knn"] <= 100 and f["erank"] >= 0 and f["erank_exp"] >= 1
        assert t["n_train"] == 256 and t["n_test"] == 128
        # the cls feature is LayerNorm'ed (affine weights barely moved): its norm stays near sqrt(D);
        # the raw last-block tokens are free to grow, so the diagnostic reads them
        assert abs(t["feat_norm"] - 8.0) < 1.0 and t["raw_norm"] > 0 and t["raw_norm"] != t["feat_norm"]
    # on a trained model the two kinds are different features, with different scores
    last = traj[-1]
    assert last["erank"] != last["mean"]["erank"] and last["feat_norm"] != last["mean"]["feat_norm"]
    assert (last["linear_probe"], last["knn"]) != (last["mean"]["linear_probe"], last["mean"]["knn"])
    for key in ("pearson_erank_probe", "pearson_erank_knn", "pearson_erank_probe_mean", "pearson_erank_knn_mean"):
        r = m[key]
        assert r is not None and -1 <= r <= 1, key
    assert "mean probe" in open(learned_run / "log.txt").read() and "raw last-block |x|" in open(
        learned_run / "log.txt").read()
    assert m["cum_alpha"] == pytest.approx(float(M.decay_schedule(4, 0.6).prod()))
    from PIL import Image
    assert Image.open(learned_run / "reconstructions.png").size == (8 * 34 + 2, 3 * 34 + 2)  # 3 rows of 8
    assert res["config"]["dataset"] == "cifar10" and "step 128/128" in open(learned_run / "log.txt").read()


def test_probe_protocol_reproduces_the_final_eval(learned_run, data_dir):
    ck = common.load_checkpoint(str(learned_run / "ckpt.pt"))
    cfg = ck["config"]
    model = M.build_model(cfg)
    model.load_state_dict(ck["model"])
    model.eval()
    L = M.probe_layers(cfg)
    assert L == cfg["depth"] == 4
    mean, std = common.DATASET_STATS[cfg["dataset"]]
    feats = []
    with one_thread():  # as the run did, so float sums agree bit for bit
        for train, n in ((True, cfg["eval_n_train"]), (False, cfg["eval_n_test"])):
            x, y = common.load_dataset(cfg["dataset"], data_dir, train=train)
            b = common.GPUBatches(x[:n], y[:n], cfg["eval_batch_size"], train=False, mean=mean, std=std)
            feats.append(common.extract_features(lambda x, g: M.probe_features(model, x, cfg, [1, 2, 3, L], None, g),
                                                 b, seed=cfg["seed"]))
            feats.append(common.extract_features(
                lambda x, g: M.probe_features(model, x, cfg, [L], None, g, feature="mean"), b, seed=cfg["seed"]))
        (trf, try_), (trm, _), (tef, tey), (tem, _) = feats
        kw = dict(k=20, seed=cfg["seed"], probe_epochs=cfg["probe_epochs"])
        got = common.evaluate_features(trf[L], try_, tef[L], tey, **kw)
        got_mean = common.evaluate_features(trm[L], try_, tem[L], tey, **kw)
    assert sorted(tef) == [1, 2, 3, 4] and all(f.shape == (128, cfg["dim"]) for f in tef.values())
    assert not torch.allclose(tef[3], tef[4])  # layer L is the final-normed token, not block L's raw output
    final = json.load(open(learned_run / "results.json"))["metrics"]["final"]
    assert {k: got[k] for k in got} == {k: final[k] for k in got}
    assert got_mean == final["mean"]


def test_imagenet100_folder_path(data_dir, tmp_path):
    """The ImageNet-100 code path (JPEG folders, worker-side crops, sharded sampler, folder eval) on a tiny
    folder of real CIFAR-10 images with a two-class list."""
    from PIL import Image
    x, y = common.load_cifar10(cifar(data_dir), train=False)
    root = tmp_path / "imagenet100"
    wnids = ["n01", "n02"]
    for split, per in (("train", 16), ("val", 4)):
        for c, w in enumerate(wnids):
            os.makedirs(root / split / w)
            for j, i in enumerate((y == c).nonzero()[:per, 0].tolist()):
                Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(root / split / w / f"{j}.png")
    (root / "imagenet100.txt").write_text("\n".join(wnids) + "\n")
    out = tmp_path / "out"
    run_inproc(["--smoke", "--dataset", "imagenet100", "--data-dir", tmp_path, "--out", out, "--batch-size", 8,
                "--workers", 0, "--epochs", 1, "--n-train", 32])
    m = json.load(open(out / "results.json"))["metrics"]
    assert m["steps"] == 4 and m["final"]["n_train"] == 32 and m["final"]["n_test"] == 8
    assert math.isfinite(m["final"]["knn"]) and os.path.exists(out / "reconstructions.png")


def test_training_loop_step_by_step(tmp_path, monkeypatch):
    """Step s trains at lr_at(s) and masks with noise keyed by (seed, s): a fresh mask each step and each seed; an
    epoch's train_loss is the mean of its steps' losses (the per-step values of the log)."""
    mask_steps, lr_steps = [], []
    mask_noise, lr_at = M.mask_noise, M.lr_at
    monkeypatch.setattr(M, "mask_noise", lambda a, step, *r: mask_steps.append(step) or mask_noise(a, step, *r))
    monkeypatch.setattr(M, "lr_at", lambda step, *r: lr_steps.append(step) or lr_at(step, *r))
    out = tmp_path / "out"
    run_inproc(["--smoke", "--data-dir", tiny_cifar10(tmp_path / "data"), "--out", out, "--epochs", 2,
                "--log-every", 1, "--no-download"])
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    hist, total = ck["history"], ck["step"]
    assert total >= 4 and mask_steps == lr_steps == list(range(total))
    logged = [float(l.split(" loss ")[1].split()[0]) for l in open(out / "log.txt") if l.startswith("step ")]
    spe = total // 2
    assert len(logged) == total and hist["train_loss"] == pytest.approx(
        [sum(logged[:spe]) / spe, sum(logged[spe:]) / spe], abs=1e-4)

    # img/s is read after the first log interval (compile, warm-up): here a first interval made 2 s slower
    slow = tmp_path / "slow"
    monkeypatch.setattr(M, "mask_noise", lambda a, step, *r: (step == 0 and time.sleep(2)) or mask_noise(a, step, *r))
    run_inproc(["--smoke", "--data-dir", tmp_path / "data", "--out", slow, "--epochs", 2, "--log-every", spe,
                "--eval-every", 3, "--no-download"])
    ips = [float(l.split(" img/s")[0].split()[-1]) for l in open(slow / "log.txt") if l.startswith("step ")]
    m = json.load(open(slow / "results.json"))["metrics"]
    assert len(ips) == 2 and ips[0] < ips[1] / 2 and m["img_per_s"] == pytest.approx(ips[1], abs=0.51)
    # --eval-every 3 never falls due in 2 epochs: the last epoch is evaluated anyway
    assert [t["epoch"] for t in m["trajectory"]] == [2] and m["final"]["epoch"] == 2

    one = FakeDist(0, 1, torch.device("cpu"))
    noise = lambda seed, step: M.mask_noise(types.SimpleNamespace(seed=seed, batch_size=4), step, 16, one)
    assert not torch.equal(noise(0, 3), noise(0, 4)) and not torch.equal(noise(0, 3), noise(1, 3))
    assert torch.equal(noise(0, 3), noise(0, 3))


def test_cifar100_path(tmp_path):
    """--dataset cifar100 (generated: not on this machine) trains and evaluates on its 100 classes."""
    out = tmp_path / "out"
    run_inproc(["--smoke", "--dataset", "cifar100", "--data-dir", tiny_cifar100(tmp_path), "--out", out,
                "--epochs", 1, "--no-download"])
    r = json.load(open(out / "results.json"))
    m = r["metrics"]["final"]
    assert r["config"]["dataset"] == "cifar100" and m["n_test"] == 128 and m["n_train"] == 256  # the smoke subsets
    assert all(math.isfinite(m[k]) and math.isfinite(m["mean"][k]) for k in ("linear_probe", "knn", "erank"))

# ---------------------------------------------------------------------------------------------------- issue 8


def test_resume_continues_bitwise(data_dir, tmp_path):
    base = ["mae_decay.py", "--smoke", "--data-dir", cifar(data_dir)]
    # the straight run beside one stopped mid epoch 2, after an eval
    full, part = side_by_side(lambda: run_script(base + ["--out", tmp_path / "full"]),
                              lambda: run_script(base + ["--out", tmp_path / "part", "--stop-at-step", 11]))
    assert full.returncode == 0, full.stderr[-2000:]
    assert part.returncode == 0 and "stopped at step 11" in part.stdout, part.stderr[-2000:]
    assert not (tmp_path / "part" / "results.json").exists()
    assert torch.load(tmp_path / "part" / "ckpt.pt", weights_only=False)["step"] == 11
    res = run_script(base + ["--out", tmp_path / "part", "--resume"])
    assert res.returncode == 0 and "resumed" in res.stdout, res.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("full", "part"))
    assert a["step"] == b["step"] == 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    ma, mb = (json.load(open(tmp_path / d / "results.json"))["metrics"] for d in ("full", "part"))
    for k in ("trajectory", "train_loss", "final", "pearson_erank_probe", "steps"):
        assert ma[k] == mb[k], k


def test_nan_loss_stops_with_step_and_checkpoint(data_dir, tmp_path):
    out = tmp_path / "nan"
    p = run_script(["mae_decay.py", "--smoke", "--data-dir", cifar(data_dir), "--out", out, "--inject-nan-at-step", 10])
    assert_clean_error(p, "at step 10", str(out / "ckpt.pt"))
    ck = common.load_checkpoint(str(out / "ckpt.pt"))  # the end-of-epoch-1 checkpoint, intact
    assert ck["step"] == 8 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_torchrun_two_processes_match_one(data_dir, tmp_path):
    base = ["mae_decay.py", "--smoke", "--data-dir", cifar(data_dir), "--dump-grads", 3]
    one, two = side_by_side(lambda: run_script(base + ["--out", tmp_path / "one", "--stop-at-step", 3]),
                            lambda: run_script(base + ["--out", tmp_path / "two"], torchrun=2))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / "grads.pt", weights_only=False) for d in ("one", "two"))
    # 2 x 16 images with their rows of the global batch's crops and masks == 1 x 32 images
    assert torch.allclose(torch.tensor(a["loss"]), torch.tensor(b["loss"]), rtol=1e-5, atol=0)
    for step in range(3):
        ga, gb = a["grads"][step], b["grads"][step]
        assert ga.keys() == gb.keys()
        for k in ga:
            assert (ga[k] - gb[k]).abs().max() <= 1e-4 * ga[k].abs().max() + 1e-10, (step, k)
    # zero-init leaves only the head with a gradient at step 0; by step 2 the encoder has one too
    assert any(k.startswith("blocks.0.") and v.abs().max() > 0 for k, v in a["grads"][2].items())
    # rank 0 alone logs and writes; the eval gathered features from both ranks
    log = (tmp_path / "two" / "log.txt").read_text()
    assert two.stdout.count("results ->") == 1 and log.count("step 8/16") == 1 and two.stdout.count("step 8/16") == 1
    assert sorted(os.listdir(tmp_path / "two")) == ["ckpt.pt", "grads.pt", "log.txt", "reconstructions.png",
                                                    "results.json"]
    m = json.load(open(tmp_path / "two" / "results.json"))["metrics"]
    assert m["world_size"] == 2 and m["final"]["n_train"] == 256 and m["final"]["n_test"] == 128


BAD_FLAGS = [  # (arguments, word the one-line message must name)
    (["--alpha-min", "0"], "--alpha-min"),
    (["--alpha-min", "1.5"], "--alpha-min"),
    (["--mask-ratio", "1.0"], "--mask-ratio"),
    (["--mask-ratio", "0"], "--mask-ratio"),
    (["--img-size", "30", "--patch", "4"], "--img-size"),
    (["--mask-ratio", "0.99", "--patch", "8"], "--mask-ratio"),  # keeps no patch of 16
    (["--decay", "none", "--decay-where", "attn"], "--decay-where"),
    (["--dim", "30", "--heads", "4"], "--dim"),
    (["--smoke", "--dec-depth", "1"], "--dec-depth"),
    (["--epochs", "0"], "--epochs"),
    (["--warmup-epochs", "500"], "--warmup-epochs"),
    (["--eval-n-test", "0"], "--eval-n-test"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--compile-mode", "reduce-overhead"], "--compile-mode"),  # silently ignored without --compile
]


def test_bad_flags_fail_in_one_line(data_dir, tmp_path):
    for argv, word in BAD_FLAGS:
        with pytest.raises(common.UserError, match=word):
            M.parse_args(argv)
    # errors found after parsing, still before any training
    d = cifar(data_dir)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes(b"not a checkpoint")
    runtime = [
        (["--smoke", "--data-dir", d, "--out", blocker / "sub"], "--out"),
        (["--smoke", "--data-dir", empty, "--no-download", "--out", tmp_path / "o1"], "missing"),
        (["--smoke", "--data-dir", d, "--batch-size", 512, "--out", tmp_path / "o2"], "--batch-size"),
        (["--smoke", "--data-dir", d, "--resume", "--out", tmp_path / "o3"], "no checkpoint"),
        (["--smoke", "--data-dir", d, "--resume", "--out", tmp_path / "corrupt"], "not a readable checkpoint"),
    ]
    for argv, word in runtime:
        with pytest.raises(common.UserError, match=word):
            run_inproc(argv)


def test_resume_with_other_flags_is_refused(learned_run, data_dir):
    with pytest.raises(common.UserError, match="--alpha-min"):
        run_inproc(["--smoke", "--data-dir", data_dir, "--out", learned_run, "--n-train", 1024, "--epochs", 4,
                    "--alpha-min", 0.7, "--resume"])
    with pytest.raises(common.UserError, match="--wd-tokens"):  # other optimizer groups: refused too
        run_inproc(["--smoke", "--data-dir", data_dir, "--out", learned_run, "--n-train", 1024, "--epochs", 4,
                    "--no-wd-tokens", "--resume"])


def test_bad_flags_on_the_command_line(tmp_path):
    """As a user sees them: exit code 2, one line, no traceback (argparse's own errors included)."""
    cases = ((["--alpha-min", "0"], "--alpha-min"), (["--decay", "foo"], "--decay"),
             (["--img-size", "30", "--patch", "4"], "--img-size"))
    procs = side_by_side(*[lambda a=a: run_script(["mae_decay.py", "--out", tmp_path / "o"] + a) for a, _ in cases])
    for (_, word), p in zip(cases, procs):
        assert p.returncode == 2
        assert_clean_error(p, word)
    assert not (tmp_path / "o").exists()


def test_profile_trains_nothing_and_counts_a_step(tmp_path, monkeypatch):
    """--profile writes profile.json and its log line and trains nothing (no checkpoint, no results); every
    encoder block is the same code, so each one adds the same number of operations to the eager step; its
    img/s is the batch over the unprofiled step time; a folder that holds a profile, and --resume, are refused;
    without --out it goes next to the run's default folder, never into it."""
    data = tiny_cifar10(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    ops = {}
    for depth in (2, 3, 4):
        argv = ["--smoke", "--data-dir", data, "--no-skip", "--depth", depth, "--profile"]
        out = tmp_path / "out" / "mae_decay" / (M.run_name(M.parse_args([str(a) for a in argv])) + "_profile")
        if depth > 2:
            out = tmp_path / f"d{depth}"
            argv += ["--out", out]
        run_inproc(argv)
        assert sorted(os.listdir(out)) == ["log.txt", "profile.json"]
        r = json.load(open(out / "profile.json"))
        p = r["metrics"]["profile"]
        ops[depth] = p["ops"]
        assert r["config"]["depth"] == depth and r["script"] == "mae_decay" and r["git_commit"] and r["torch"]
        assert p["batch"] == 32 and p["compiled"] is False and p["steps"] == 3 and p["mfu"] is None
        assert p["img_per_s"] == pytest.approx(32 * 1000 / p["wall_ms"], rel=1e-6)
        assert p["top"] and all(name.startswith("aten::") and ms > 0 for name, ms in p["top"])
        assert f"profile of one eager step of batch 32: {p['ops']} operations" in open(out / "log.txt").read()
    assert ops[4] - ops[3] == ops[3] - ops[2] > 20  # a block: two norms, attention, MLP, two scaled shortcuts
    with pytest.raises(common.UserError, match="profile.json exists"):
        run_inproc(["--smoke", "--data-dir", data, "--no-skip", "--depth", 4, "--profile", "--out", tmp_path / "d4"])
    with pytest.raises(common.UserError, match="--profile trains nothing"):
        M.parse_args(["--smoke", "--profile", "--resume"])


def test_gpu_random_resized_crop_of_a_non_square_box():
    rows = torch.arange(32.0).view(1, 1, 32, 1).expand(2, 3, 32, 32).contiguous()  # value = row index
    out = M.gpu_rrc(rows, torch.tensor([[1.0, 0.5, 0.0, 0.0, 0.0]]).repeat(2, 1), 32)  # full width, top half
    # output row i samples input row i/2 - 1/4 (pixel centres, align_corners=False), border-clamped at 0
    want = (torch.arange(32.0) / 2 - 0.25).clamp_min(0).view(1, 1, 32, 1).expand_as(out)
    assert torch.allclose(out, want, atol=1e-4)
    cols = rows.transpose(2, 3).contiguous()  # value = column index; left half, full height
    out = M.gpu_rrc(cols, torch.tensor([[0.5, 1.0, 0.0, 0.0, 0.0]]).repeat(2, 1), 32)
    assert torch.allclose(out, want.transpose(2, 3), atol=1e-4)


def test_random_resized_crop_aspect_ratio_is_log_uniform():
    w, h = M.rrc_params(20000, torch.Generator().manual_seed(0)).unbind(1)[:2]
    # torchvision draws log(ratio) uniformly on [log 3/4, log 4/3]: symmetric in w <-> h, so wide and tall crops
    # are equally likely and log(w/h) has mean 0 (uniform on the ratio itself: 57% wide, mean log-ratio > 0)
    assert abs((w > h).float().mean().item() - 0.5) < 0.02
    assert abs((w / h).log().mean().item()) < 0.01


def test_reconstruction_undoes_the_patch_normalisation(tmp_path, monkeypatch):
    """The saved reconstruction puts a norm-pix prediction back on the patch's own scale: a fresh model's
    zero-init head predicts 0, so each removed patch must come back as its own mean, each kept one as itself
    (12 of 16 patches removed at mask ratio 0.75)."""
    import torchvision.utils as tvu
    cfg = dict(img_size=32, patch=8, dim=32, depth=4, heads=2, mlp_ratio=4.0, dec_dim=16, dec_depth=2, dec_heads=2,
               pos_embed="sincos", alpha_min=0.6, decay="linear", decay_where="both", skip=True, mask_ratio=0.75,
               norm_pix_loss=True, seed=0, dataset="cifar10")
    torch.manual_seed(0)
    model = M.build_model(cfg)
    seen = {}
    monkeypatch.setattr(tvu, "save_image", lambda grid, path, nrow: seen.setdefault("grid", grid))
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    M.save_reconstructions(model, imgs, cfg, str(tmp_path / "r.png"))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in common.DATASET_STATS["cifar10"])
    recon = M.patchify((seen["grid"][4:] - mean) / std, 8)  # rows: originals, masked, reconstructions
    t = M.patchify(imgs, 8)
    shown = M.patchify(((imgs * std + mean) >= 0) & ((imgs * std + mean) <= 1), 8)  # pixels clamp(0, 1) spares
    for i in range(2):
        kind = []
        for j in range(16):
            k = shown[i, j]
            as_is = torch.allclose(recon[i, j][k], t[i, j][k], atol=1e-4)
            as_mean = torch.allclose(recon[i, j][k], t[i, j].mean().expand(192)[k], atol=1e-4)
            assert as_is != as_mean, (i, j)
            kind.append(as_mean)
        assert sum(kind) == 12


def test_in100_preset_is_maes_vit_b_recipe():
    """MAE's recipe (He et al.) for ViT-B/16 on ImageNet: blr 1.5e-4, 40 warm-up epochs, weight decay 0.05, mask ratio
    0.75, norm-pix loss; ViT-B/16 = dim 768, depth 12, 12 heads, patch 16 at 224 px; decoder 512-d, 8 blocks, 16
    heads. No committed run uses this preset yet: only this test holds it."""
    a = M.parse_args(["--preset", "in100"])
    assert (a.dataset, a.img_size, a.patch, a.dim, a.depth, a.heads) == ("imagenet100", 224, 16, 768, 12, 12)
    assert (a.dec_dim, a.dec_depth, a.dec_heads) == (512, 8, 16)
    assert (a.blr, a.warmup_epochs, a.weight_decay, a.mask_ratio, a.norm_pix_loss) == (1.5e-4, 40, 0.05, 0.75, True)


def test_img_per_s_counts_the_steps_since_the_last_line(tmp_path, monkeypatch):
    """With a clock that advances exactly 1 s per training step, each log interval of k steps of batch B takes
    k seconds: B img/s in every line, the first and the later ones alike, and B as the run's img_per_s.
    Counting all steps since the start (not since the last line) would double the second interval's rate."""
    clock = FakeClock()
    mask_noise = M.mask_noise

    def timed_noise(a, step, *r):
        clock.t += 1.0
        return mask_noise(a, step, *r)
    monkeypatch.setattr(M, "mask_noise", timed_noise)
    monkeypatch.setattr(M, "time", clock.ns())
    out = tmp_path / "out"
    run_inproc(["--smoke", "--data-dir", tiny_cifar10(tmp_path / "data"), "--out", out, "--epochs", 2,
                "--log-every", 4, "--eval-every", 3, "--no-download"])
    res = json.load(open(out / "results.json"))
    b = res["config"]["batch_size"]
    ips = [float(l.split(" img/s")[0].split()[-1]) for l in open(out / "log.txt") if l.startswith("step ")]
    assert len(ips) >= 2 and ips == [float(b)] * len(ips)
    assert res["metrics"]["img_per_s"] == pytest.approx(b)
