"""mae_decay.py: a masked autoencoder (MAE) whose encoder uses decayed identity shortcuts.

Reproduces the MAE half of "Residual Connections Harm Generative Representation Learning"
(arXiv 2404.10947). Every encoder block scales its identity path by a factor alpha < 1,

    x = a_att * x + attn(norm1(x));   x = a_mlp * x + mlp(norm2(x)),

with one linear ramp over the 2L sub-layers from 1 down to alpha_min (`decay_schedule`; with
--decay-where attn|mlp the other column is reset to 1). The decoder keeps plain residuals and its input is
positional embeddings only; it reads the encoder through long skips: decoder block j gets the tokens of
encoder block L-1-2j (deepest first, the last one after the final LayerNorm), padded with a learnable
per-skip mask token, unshuffled, concatenated channel-wise with the decoder stream and added through
Linear-SiLU-Linear(zero-init). Every residual branch's last linear and the prediction head start at zero.
The paper's claim: lower alpha_min gives features of lower effective rank and higher linear-probe / kNN
accuracy (ImageNet-100 ViT-B/16 LP 76.5 -> 83.6 at 0.6); the product of all alphas (logged) should land
around 1e-3..1e-2 (12 blocks: 3.6e-3 at alpha_min 0.6, 1.8e-2 at 0.7).

    python mae_decay.py --alpha-min 0.6                 # CIFAR-10 quick preset (the default), decayed
    python mae_decay.py --alpha-min 1.0                 # same run with plain residuals
    python mae_decay.py --decay scale-both              # Table 3b: sqrt(.5)(x + f)   (also: none, scale-branch)
    python mae_decay.py --decay-where mlp               # Table 3b: decay the MLP shortcut only (also: attn)
    python mae_decay.py --no-skip                       # standard MAE decoder input, no encoder->decoder skips
    torchrun --nproc_per_node 8 mae_decay.py --preset in100 --data-dir DATA --compile   # ImageNet-100 ViT-B/16
    python mae_decay.py --smoke                         # CPU-sized check (seconds)
    python mae_decay.py --profile --compile             # what bounds a training step: OUT/profile.json, no training

On a GPU add --compile (and try --compile-mode reduce-overhead when the step is launch-bound: short
sequences, small widths). In a time-limited session run it under `timeout -s TERM <seconds>`: SIGTERM
writes a checkpoint at the next step and `--resume` (same flags) continues from it.

Presets (`--preset`; any explicit flag wins over the preset, `--smoke` over both):
  cifar_quick  CIFAR-10 32 px, ViT-S/4 encoder (27M params with the decoder), 6 x 256-d decoder,
               batch 1024, 150 epochs, 4.66 GFLOP per image per training step. Measured on an H200
               (compiled): 29k img/s, MFU 13.7%, 1.7 s an epoch; 5 minutes a run with its 6 evaluations
               (~6 s each) and the compile (README, "MAE with decayed shortcuts on CIFAR-10").
  cifar        the same model, 400 epochs (~13 minutes a run at that speed).
  in100        ImageNet-100 224 px, ViT-B/16, the MAE recipe (blr 1.5e-4, 40 warm-up epochs), 400 epochs
               (the epoch count is our choice; the reference does not state the paper's).

Evaluation (every --eval-every epochs and at the end) on frozen features of the unmasked encoder, two kinds,
each scored with the same kNN (weighted, k=20), MAE linear probe (BatchNorm without affine + linear, SGD) and
effective rank (the entropy H of Eq. 6, and exp(H)) via common.evaluate_features:
  cls   the cls token after the encoder's final LayerNorm: the official MAE linear-probe protocol. This is
        the headline (the top-level figures of every trajectory entry), as before.
  mean  the mean over ALL 1+N tokens (cls included) of the raw last-block output, no final LayerNorm: what
        the decayed-shortcut authors' released evaluation (util/misc.py eval_model) probes. Their head is a
        plain Linear trained with AdamW; ours keeps the BatchNorm + Linear head for both kinds, so the two
        figures differ only in the features (BatchNorm also makes the probe indifferent to the raw scale).
        Kept under "mean" in every trajectory entry.
The paper does not say which of the two its tables use. `probe.py OUT/ckpt.pt [--feature mean]` reproduces
either. The results JSON keeps the trajectory of both kinds and the Pearson correlation between effective
rank and probe (and kNN) accuracy over the evaluations (Fig. 5) for each kind (`pearson_erank_probe`,
`pearson_erank_probe_mean`, ...).
Feature norm: the cls feature sits after the final LayerNorm, so its norm is pinned near sqrt(D) whatever
happens inside the encoder; the paper's instability signal for small alpha_min (feature-norm growth) is
read instead as `raw_norm`, the mean L2 norm of the tokens of the raw last-block output (logged at every
evaluation; probe.py reports it per block under --layers all).

Weight decay (`--wd-tokens`, default on): like the official MAE code (timm's add_weight_decay: only 1-d
parameters and biases are exempt), the cls token, the mask tokens (the skips' per-skip mask tokens too)
and a learned positional embedding are decayed; --no-wd-tokens exempts them as this script used to. The
fixed sin-cos embedding is a buffer and never decayed. We have no measurement that either choice matters.

Determinism: on the CPU a fixed --seed gives bitwise repeatable runs, also across --stop-at-step/--resume.
Batches, crops and masks are drawn from generators seeded by (seed, epoch, batch) or (seed, step), so a
resumed or a multi-process run sees the same images and masks as a single uninterrupted one. On a GPU the
data and masks are still the same but float results are not bitwise stable (atomics in attention
backward, cuBLAS/compile kernel choice, bf16); the ImageNet-100 loader's torchvision crops are random
per worker and not reproducible.
"""
import argparse, copy, math, os, sys, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common

SCRIPT = "mae_decay"

# ----------------------------------------------------------------------------------------------------
# config

MODELS = {"vit_tiny": dict(dim=192, depth=12, heads=3), "vit_small": dict(dim=384, depth=12, heads=6),
          "vit_base": dict(dim=768, depth=12, heads=12)}
PRESETS = {
    "cifar_quick": dict(dataset="cifar10", model="vit_small", patch=4, img_size=32, dec_dim=256, dec_depth=6,
                        dec_heads=8, batch_size=1024, blr=3e-4, epochs=150, warmup_epochs=15, eval_every=25),
    "cifar": dict(dataset="cifar10", model="vit_small", patch=4, img_size=32, dec_dim=256, dec_depth=6,
                  dec_heads=8, batch_size=1024, blr=3e-4, epochs=400, warmup_epochs=20, eval_every=50),
    "in100": dict(dataset="imagenet100", model="vit_base", patch=16, img_size=224, dec_dim=512, dec_depth=8,
                  dec_heads=16, batch_size=1024, blr=1.5e-4, epochs=400, warmup_epochs=40, eval_every=50,
                  eval_batch_size=512),
}
SMOKE = dict(dataset="cifar10", patch=8, img_size=32, dim=64, depth=4, heads=2, dec_dim=32, dec_depth=2,
             dec_heads=2, batch_size=32, blr=5e-3, epochs=2, warmup_epochs=1, eval_every=1, n_train=256,
             eval_n_train=256, eval_n_test=128, eval_batch_size=128, probe_epochs=5, log_every=4, ckpt_every=1)
# the flags that may differ between a run and its --resume: none changes a number the run computes.
# Every other flag (a new one too) must match the checkpoint's, or --resume is refused naming it.
SAFE_ON_RESUME = common.SAFE_ON_RESUME | {"compile_mode", "workers", "eval_batch_size", "log_every", "ckpt_every",
                                          "inject_nan_at_step", "dump_grads", "profile"}
ALPHA_MIN = 0.6  # --alpha-min's default (used by --decay linear only)


def build_parser(add_help=True):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    common.add_common_args(p, SCRIPT)
    p.add_argument("--preset", default="cifar_quick", choices=sorted(PRESETS), help="defaults for a whole run")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs, for launch-bound steps)")
    # the paper's knobs
    p.add_argument("--alpha-min", type=float, default=None,
                   help=f"last sub-layer's shortcut weight (1 = plain residual; default {ALPHA_MIN}; --decay linear only)")
    p.add_argument("--decay", default="linear", choices=["linear", "none", "scale-both", "scale-branch"],
                   help="linear: alpha ramp; none: x+f; scale-branch: x+sqrt(.5)f; scale-both: sqrt(.5)(x+f)")
    p.add_argument("--decay-where", default="both", choices=["both", "attn", "mlp"],
                   help="which shortcuts the linear ramp decays (the other stays 1)")
    p.add_argument("--no-skip", dest="skip", action="store_false",
                   help="no encoder->decoder skips (the standard MAE decoder input)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="regress per-patch normalised pixels")
    # model
    p.add_argument("--model", choices=sorted(MODELS), default="vit_small")
    p.add_argument("--dim", type=int, default=None, help="encoder width (default: --model's)")
    p.add_argument("--depth", type=int, default=None, help="encoder blocks (default: --model's)")
    p.add_argument("--heads", type=int, default=None, help="encoder heads (default: --model's)")
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--dec-dim", type=int, default=512)
    p.add_argument("--dec-depth", type=int, default=8)
    p.add_argument("--dec-heads", type=int, default=16)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--pos-embed", choices=["sincos", "learned"], default="sincos")
    # data and optimisation
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "imagenet100"], default="cifar10")
    p.add_argument("--n-train", type=int, default=None, help="train on the first N training images (default all)")
    p.add_argument("--workers", type=int, default=None, help="data-loader processes (default 8; ImageNet-100 only)")
    p.add_argument("--batch-size", type=int, default=1024, help="global batch over all processes")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base learning rate: lr = blr * batch / 256")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--wd-tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="weight-decay the cls/mask tokens and a learned pos-embed, as official MAE (default on)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--warmup-epochs", type=float, default=15)
    # evaluation and bookkeeping
    p.add_argument("--eval-every", type=int, default=25, help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--eval-n-train", type=int, default=None, help="eval on the first N train images (default all)")
    p.add_argument("--eval-n-test", type=int, default=None, help="eval on the first N test images (default all)")
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--probe-epochs", type=int, default=50, help="linear-probe epochs")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=10, help="epochs between checkpoints")
    p.add_argument("--profile", action="store_true",
                   help="train nothing: profile a few training steps (the batch's GPU crop, masking, forward, "
                        "backward, AdamW; compiled with --compile) into OUT/profile.json and the log: operations, "
                        "device busy time against wall time, costliest kernels, img/s and MFU")
    # testing aids, hidden: poison the loss at a step; dump rank 0's (all-reduced) grads of the first N steps
    p.add_argument("--inject-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dump-grads", type=int, default=0, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    """Flags -> validated args with the preset, --smoke and --model sizes resolved. The preset's values are
    the parser's defaults before --help is read, so --help shows the defaults of the chosen preset."""
    first, _ = build_parser(add_help=False).parse_known_args(argv)
    p = build_parser()
    p.set_defaults(**PRESETS[first.preset])
    if first.smoke:
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    for k, v in MODELS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    validate(args)
    return args


def validate(a):
    c = common.check
    # flags that only act under a mode that is off are mistakes, not silently ignored settings
    c(a.alpha_min is None or a.decay == "linear",
      f"--alpha-min only applies to --decay linear (got --decay {a.decay}): drop --alpha-min")
    c(a.workers is None or a.dataset == "imagenet100",
      f"--workers only applies to --dataset imagenet100 ({a.dataset} is held in memory): drop --workers")
    a.alpha_min = ALPHA_MIN if a.alpha_min is None else a.alpha_min
    a.workers = 8 if a.workers is None else a.workers
    c(0 < a.alpha_min <= 1, f"--alpha-min {a.alpha_min} must be in (0, 1]: 1 is a plain residual, "
                            "the paper's best is 0.6-0.7")
    c(a.decay == "linear" or a.decay_where == "both", f"--decay-where {a.decay_where} only applies to --decay linear")
    c(0 < a.mask_ratio < 1, f"--mask-ratio {a.mask_ratio} must be in (0, 1), e.g. 0.75")
    c(a.patch >= 1 and a.img_size >= a.patch and a.img_size % a.patch == 0,
      f"--img-size {a.img_size} is not divisible by --patch {a.patch}: pick sizes with img_size % patch == 0")
    n = (a.img_size // a.patch) ** 2
    keep = n_visible(n, a.mask_ratio)
    c(1 <= keep < n, f"--mask-ratio {a.mask_ratio} keeps {keep} of {n} patches: at least one must stay and one go")
    for name, width, heads in (("", a.dim, a.heads), ("dec-", a.dec_dim, a.dec_heads)):
        c(width >= 1 and heads >= 1 and width % heads == 0,
          f"--{name}dim {width} must be a multiple of --{name}heads {heads}")
        c(a.pos_embed != "sincos" or width % 4 == 0,
          f"--{name}dim {width}: the 2-D sin-cos embedding needs a multiple of 4 (or --pos-embed learned)")
    c(a.depth >= 1 and a.dec_depth >= 1, "--depth and --dec-depth must be >= 1")
    if a.skip:
        c(a.depth >= 2, "--depth 1 has no encoder block to skip from: use --depth >= 2 or --no-skip")
        c(a.dec_depth >= a.depth // 2, f"--dec-depth {a.dec_depth} < {a.depth // 2} skips (one per second encoder "
                                       "block): raise --dec-depth or pass --no-skip")
    c(a.mlp_ratio > 0, f"--mlp-ratio {a.mlp_ratio} must be > 0")
    c(a.blr > 0, f"--blr {a.blr} must be > 0")
    c(a.weight_decay >= 0, f"--weight-decay {a.weight_decay} must be >= 0")
    c(a.epochs >= 1, f"--epochs {a.epochs} must be >= 1")
    c(0 <= a.warmup_epochs <= a.epochs, f"--warmup-epochs {a.warmup_epochs} must be in [0, --epochs {a.epochs}]")
    for flag in ("batch_size", "eval_batch_size", "probe_epochs", "log_every", "ckpt_every"):
        c(getattr(a, flag) >= 1, f"--{flag.replace('_', '-')} {getattr(a, flag)} must be >= 1")
    for flag in ("n_train", "eval_n_train", "eval_n_test"):
        v = getattr(a, flag)
        c(v is None or v >= 1, f"--{flag.replace('_', '-')} {v} must be >= 1 (leave it out to use every image)")
    c(a.eval_every >= 0, f"--eval-every {a.eval_every} must be >= 0 (0: evaluate at the end only)")
    c(a.workers >= 0, f"--workers {a.workers} must be >= 0")
    c(a.dump_grads >= 0, "--dump-grads must be >= 0")
    c(a.compile or a.compile_mode == "default", f"--compile-mode {a.compile_mode} needs --compile")
    c(not (a.profile and a.resume), "--profile trains nothing and leaves nothing to resume: drop --resume "
                                    "(and give the profile its own --out)")


def run_name(a):
    decay = {"linear": f"a{a.alpha_min:g}", "none": "plain"}.get(a.decay, a.decay)
    where = "" if a.decay_where == "both" else f"_{a.decay_where}"
    return f"{a.dataset}_{a.model if a.dim == MODELS[a.model]['dim'] else f'd{a.dim}'}_p{a.patch}_{decay}{where}" \
           f"{'' if a.skip else '_noskip'}_seed{a.seed}"

# ----------------------------------------------------------------------------------------------------
# model: everything from here to the end of class MAE needs only math, torch, torch.nn as nn and
# torch.nn.functional as F, so the decayed-shortcut Block (or the whole MAE) can be copied into another
# project as it is (tests/test_copy_paste.py pastes it alone and trains it)


def decay_schedule(depth, alpha_min):
    """Identity-path weights of the 2*depth sub-layers, one linear ramp from 1 to alpha_min:
    row l = (a_att, a_mlp) of block l. The last sub-layer gets alpha_min exactly."""
    return torch.linspace(1.0, alpha_min, 2 * depth, dtype=torch.float64).view(depth, 2)


def shortcut_coeffs(depth, decay="linear", alpha_min=1.0, where="both"):
    """(alpha, beta), each (depth, 2): sub-layer output = alpha * x + beta * f(norm(x)). Table 3b's variants."""
    one = torch.ones(depth, 2, dtype=torch.float64)
    if decay == "none":
        return one, one.clone()
    if decay == "scale-branch":
        return one, one * math.sqrt(0.5)
    if decay == "scale-both":
        return one * math.sqrt(0.5), one * math.sqrt(0.5)
    alpha = decay_schedule(depth, alpha_min)
    if where != "both":  # keep the ramp's values on the decayed column, 1 on the other
        alpha[:, 1 if where == "attn" else 0] = 1.0
    return alpha, one


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sine-cosine embedding (grid*grid, dim): half the channels code the row, half the column."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out = [f(pos.reshape(-1, 1) * omega) for pos in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, 1).float()


def patchify(imgs, p):
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels (row, col, channel) inside."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, p, c=3):
    b, n, _ = x.shape
    g = int(round(math.sqrt(n)))
    return x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)


def n_visible(n, mask_ratio):
    """How many of n patches the encoder sees."""
    return int(n * (1 - mask_ratio))


def random_masking(x, noise, mask_ratio):
    """Keep the n_visible tokens with the smallest noise. Returns the kept tokens (in shuffled order),
    the mask (B, N; 1 = removed, in the original order) and ids_restore, which undoes the shuffle."""
    b, n, d = x.shape
    keep = n_visible(n, mask_ratio)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    x_vis = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    return x_vis, mask.gather(1, ids_restore), ids_restore


def unshuffle(tokens, mask_token, ids_restore):
    """(B, 1+K, D) cls + kept tokens -> (B, 1+N, D) in the original patch order, gaps filled with mask_token."""
    b, k1, d = tokens.shape
    n = ids_restore.shape[1]
    x = torch.cat([tokens[:, 1:], mask_token.reshape(1, 1, d).to(tokens.dtype).expand(b, n + 1 - k1, d)], 1)
    x = x.gather(1, ids_restore[..., None].expand(-1, -1, d))
    return torch.cat([tokens[:, :1], x], 1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _scale(t, c):
    return t if c == 1.0 else t * c  # skip the multiply for plain residuals: exactly x + f


class Block(nn.Module):
    """Pre-norm transformer block whose identity paths are weighted: alpha = (a_att, a_mlp) scale the
    shortcut, beta = (b_att, b_mlp) the branch (1 except in the Table 3b scale-* ablations)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, alpha=(1.0, 1.0), beta=(1.0, 1.0)):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        (self.a_att, self.a_mlp), (self.b_att, self.b_mlp) = map(float, alpha), map(float, beta)

    def forward(self, x):
        x = _scale(x, self.a_att) + _scale(self.attn(self.norm1(x)), self.b_att)
        return _scale(x, self.a_mlp) + _scale(self.mlp(self.norm2(x)), self.b_mlp)


class MAE(nn.Module):
    def __init__(self, img_size=32, patch=4, dim=384, depth=12, heads=6, mlp_ratio=4.0, dec_dim=256, dec_depth=6,
                 dec_heads=8, pos_embed="sincos", alpha_min=1.0, decay="linear", decay_where="both", skip=True,
                 mask_ratio=0.75, norm_pix_loss=True, in_chans=3):
        super().__init__()
        grid = img_size // patch
        n = grid * grid
        if img_size % patch or not 1 <= n_visible(n, mask_ratio) < n:  # the loss averages over removed patches
            raise ValueError(f"MAE: img_size {img_size} must be a multiple of patch {patch}, and mask_ratio "
                             f"{mask_ratio} must keep at least one of the {n} patches and remove one")
        self.patch, self.mask_ratio, self.norm_pix_loss, self.skip = patch, mask_ratio, norm_pix_loss, skip
        self.patch_embed = nn.Linear(patch * patch * in_chans, dim)  # a stride-p conv, written as a matmul
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        for name, d in (("pos_embed", dim), ("dec_pos_embed", dec_dim)):
            if pos_embed == "sincos":  # cls position = 0
                self.register_buffer(name, torch.cat([torch.zeros(1, d), sincos_pos_embed(d, grid)])[None])
            else:
                setattr(self, name, nn.Parameter(torch.zeros(1, n + 1, d)))
        alpha, beta = shortcut_coeffs(depth, decay, alpha_min, decay_where)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, alpha[i].tolist(), beta[i].tolist())
                                    for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if skip:
            # deepest first: decoder block j reads encoder block depth-1-2j (the last one after the final norm)
            self.skip_src = list(range(depth - 1, -1, -2))[:depth // 2]
            self.skip_mask_tokens = nn.Parameter(torch.zeros(len(self.skip_src), dim))
            self.skip_fuse = nn.ModuleList(nn.Sequential(nn.Linear(dec_dim + dim, dec_dim), nn.SiLU(),
                                                         nn.Linear(dec_dim, dec_dim)) for _ in self.skip_src)
        else:
            self.dec_embed = nn.Linear(dim, dec_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.dec_blocks = nn.ModuleList(Block(dec_dim, dec_heads, mlp_ratio) for _ in range(dec_depth))
        self.dec_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.head = nn.Linear(dec_dim, patch * patch * in_chans)
        self._init_weights(pos_embed)

    def _init_weights(self, pos_embed):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for p in [self.cls_token] + [p for n, p in self.named_parameters() if "mask_token" in n]:
            nn.init.normal_(p, std=0.02)
        if pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.dec_pos_embed, std=0.02)
        # zero-init every residual branch's last linear, the skip fusions' and the prediction head:
        # at step 0 each block is exactly its (scaled) shortcut
        last = [m for blk in list(self.blocks) + list(self.dec_blocks) for m in (blk.attn.proj, blk.mlp.fc2)]
        last += [self.head] + ([f[2] for f in self.skip_fuse] if self.skip else [])
        for m in last:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def encode(self, imgs, noise=None):
        """Encoder on all patches (noise=None) or on the ones random masking keeps. Returns the final-normed
        tokens, every block's output, the mask and ids_restore (None when unmasked)."""
        x = self.patch_embed(patchify(imgs, self.patch)) + self.pos_embed[:, 1:]
        mask = ids_restore = None
        if noise is not None:
            x, mask, ids_restore = random_masking(x, noise, self.mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1)
        x = torch.cat([cls, x], 1)
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        return self.norm(x), outs, mask, ids_restore

    def decode(self, latent, outs, ids_restore):
        if self.skip:  # input = positions only; the encoder enters through the skips
            skips = [latent] + [outs[i] for i in self.skip_src[1:]]
            x = self.dec_pos_embed.expand(len(latent), -1, -1)
            for j, blk in enumerate(self.dec_blocks):
                if j < len(skips):
                    s = unshuffle(skips[j], self.skip_mask_tokens[j], ids_restore)
                    x = x + self.skip_fuse[j](torch.cat([x, s], -1))
                x = blk(x)
        else:
            x = unshuffle(self.dec_embed(latent), self.mask_token, ids_restore) + self.dec_pos_embed
            for blk in self.dec_blocks:
                x = blk(x)
        return self.head(self.dec_norm(x))[:, 1:]

    def target(self, imgs):
        t = patchify(imgs, self.patch).float()
        if self.norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        return t

    def forward(self, imgs, noise):
        """Loss (mean squared error on the removed patches), prediction (B, N, p*p*C) and mask."""
        latent, outs, mask, ids_restore = self.encode(imgs, noise)
        pred = self.decode(latent, outs, ids_restore)
        loss = ((pred.float() - self.target(imgs)) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


MODEL_KEYS = ("img_size", "patch", "dim", "depth", "heads", "mlp_ratio", "dec_dim", "dec_depth", "dec_heads",
              "pos_embed", "alpha_min", "decay", "decay_where", "skip", "mask_ratio", "norm_pix_loss")


def build_model(cfg):
    """The MAE a checkpoint's config describes (probe.py protocol)."""
    return MAE(**{k: cfg[k] for k in MODEL_KEYS})


def probe_layers(cfg):
    return cfg["depth"]


FEATURES = ("cls", "mean")  # the feature kinds probe_features serves (probe.py --feature)


@torch.no_grad()
def probe_features(model, x, cfg, layers, t=None, generator=None, feature="cls", norms=False):
    """Frozen features of the unmasked encoder (probe.py protocol), one (B, D) tensor per layer l = 1..depth.
    feature="cls": layer L = depth is the cls token after the final LayerNorm (the official MAE linear-probe
    input); layer l < L is block l's raw output cls token. feature="mean": for every l (L included) the mean
    over all 1+N tokens of block l's raw output, no final LayerNorm (the decayed-shortcut authors' eval_model).
    Keys are the layers; when `feature` is a tuple of kinds, (kind, layer). norms=True adds ("raw_norm", l):
    (B, 1), each image's mean L2 norm over the tokens of block l's raw output (the feature-norm diagnostic).
    x: normalised images as GPUBatches(train=False) yields them; resized when the run used another size.
    t and generator are unused (no randomness here)."""
    m = common.unwrap(model)
    kinds = (feature,) if isinstance(feature, str) else tuple(feature)
    bad = [k for k in kinds if k not in FEATURES]
    if bad:
        raise common.UserError(f"feature {bad[0]!r}: use one of {', '.join(FEATURES)}")
    if x.shape[-1] != cfg["img_size"]:
        x = F.interpolate(x, size=(cfg["img_size"],) * 2, mode="bicubic", align_corners=False)
    with common.autocast(x.device):
        latent, outs, _, _ = m.encode(x)
    out = {}
    for l in layers:
        raw = outs[l - 1].float()
        for kind in kinds:
            if kind == "cls":
                f = (latent if l == cfg["depth"] else outs[l - 1])[:, 0].float()
            else:
                f = raw.mean(1)
            out[l if isinstance(feature, str) else (kind, l)] = f
        if norms:
            out[("raw_norm", l)] = raw.norm(dim=-1).mean(1, keepdim=True)
    return out

# ----------------------------------------------------------------------------------------------------
# data


def _gen(seed, *keys):
    g = torch.Generator()  # CPU generator: the same stream on every device
    s = seed
    for k in keys:
        s = s * 1_000_003 + k + 1
    return g.manual_seed(s % 2**63)


def rrc_params(n, g, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """RandomResizedCrop + flip parameters for n square images, as fractions of the side:
    (w, h, left, top, flip). Like torchvision: 10 tries of (area, log-ratio), the first that fits wins,
    else the whole image."""
    area = torch.empty(n, tries).uniform_(*scale, generator=g)
    r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    w, h = (area * r).sqrt(), (area / r).sqrt()
    ok = (w <= 1) & (h <= 1)
    first = ok.int().argmax(1, keepdim=True)
    w = torch.where(ok.any(1), w.gather(1, first)[:, 0], torch.ones(n))
    h = torch.where(ok.any(1), h.gather(1, first)[:, 0], torch.ones(n))
    left, top = torch.rand(n, generator=g) * (1 - w), torch.rand(n, generator=g) * (1 - h)
    flip = (torch.rand(n, generator=g) < 0.5).float()
    return torch.stack([w, h, left, top, flip], 1)


def gpu_rrc(x, params, size):
    """Crop, resize (bilinear) and flip a batch on its device in one grid_sample; params from rrc_params."""
    w, h, left, top, flip = params.to(x.device, x.dtype).unbind(1)
    theta = torch.zeros(len(x), 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = w * (1 - 2 * flip)  # output [-1, 1] -> input [2 left - 1, 2 (left + w) - 1], mirrored on flip
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    grid = F.affine_grid(theta, [len(x), x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class CifarTrain:
    """CIFAR on the device: GPUBatches shuffles and normalises, then a GPU RandomResizedCrop(0.2-1) + flip
    drawn for the global batch from (seed, epoch, batch), of which each rank takes its rows."""

    def __init__(self, x, y, a, d):
        mean, std = common.DATASET_STATS[a.dataset]
        self.b = common.GPUBatches(x, y, a.batch_size, train=True, device=d.device, mean=mean, std=std, pad=0,
                                   flip=False, seed=a.seed, rank=d.rank, world_size=d.world_size)
        self.a, self.d = a, d

    def __len__(self):
        return len(self.b)

    def epoch(self, epoch, start=0):
        a, d = self.a, self.d
        # every batch's crops drawn up front and copied to the device once: no host->device copy per step
        params = torch.stack([rrc_params(a.batch_size, _gen(a.seed, epoch, i, 7))[d.rank::d.world_size]
                              for i in range(start, len(self))]).to(d.device)
        for p, (x, _) in zip(params, self.b.epoch(epoch, start)):
            yield gpu_rrc(x, p, a.img_size)


class ShardSampler(torch.utils.data.Sampler):
    """Per-epoch permutation from (seed, epoch); rank r takes positions r::world of each global batch,
    starting at batch `start` (mid-epoch resume without reading the skipped images)."""

    def __init__(self, n, batch, seed, rank, world):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.epoch, self.start = 0, 0

    def __len__(self):
        return (self.n // self.batch - self.start) * (self.batch // self.world)

    def __iter__(self):
        order = torch.randperm(self.n, generator=_gen(self.seed, self.epoch))
        for i in range(self.start, self.n // self.batch):
            yield from order[i * self.batch:(i + 1) * self.batch][self.rank::self.world].tolist()


class LoaderTrain:
    """ImageNet-100 from JPEG folders: torchvision RandomResizedCrop(0.2-1) + flip in worker processes."""

    def __init__(self, ds, a, d):
        self.sampler = ShardSampler(len(ds), a.batch_size, a.seed, d.rank, d.world_size)
        self.loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size // d.world_size, sampler=self.sampler,
                                                  num_workers=a.workers, pin_memory=d.device.type == "cuda",
                                                  drop_last=True, persistent_workers=a.workers > 0)
        self.n, self.device = len(ds) // a.batch_size, d.device

    def __len__(self):
        return self.n

    def epoch(self, epoch, start=0):
        self.sampler.epoch, self.sampler.start = epoch, start
        for x, _ in self.loader:
            yield x.to(self.device, non_blocking=True)


class LoaderEval:
    """Eval batches from a folder data set with the .device that common.extract_features wants;
    rank r reads images r::world."""

    def __init__(self, ds, a, d):
        idx = list(range(d.rank, len(ds), d.world_size))
        self.loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=a.eval_batch_size,
                                                  num_workers=a.workers, pin_memory=d.device.type == "cuda")
        self.device, self.bs, self.world = d.device, len(ds), d.world_size  # one shard of the whole set per rank

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def load_data(a, d):
    """-> (train iterator with epoch(e, start), eval train batches, eval test batches, a few test images)."""
    download = not a.no_download
    if a.dataset == "imagenet100":
        train_ds, val_ds = common.imagenet100_datasets(os.path.join(a.data_dir, "imagenet100"), img_size=a.img_size)
        train_eval_ds = copy.copy(train_ds)  # the training images with the eval transform
        train_eval_ds.transform = val_ds.transform

        def sub(ds, n):  # evenly spaced images: the folders are sorted by class
            idx = np.linspace(0, len(ds) - 1, min(n or len(ds), len(ds))).astype(int).tolist()
            return ds if n is None else torch.utils.data.Subset(ds, idx)
        train_ds, train_eval_ds = sub(train_ds, a.n_train), sub(train_eval_ds, a.eval_n_train)
        val_ds = sub(val_ds, a.eval_n_test)
        common.check(len(train_ds) >= a.batch_size,
                     f"--batch-size {a.batch_size} exceeds the {len(train_ds)} training images: lower it")
        show = torch.stack([val_ds[i][0] for i in np.linspace(0, len(val_ds) - 1, 8).astype(int).tolist()])
        return LoaderTrain(train_ds, a, d), LoaderEval(train_eval_ds, a, d), LoaderEval(val_ds, a, d), show.to(d.device)
    xtr, ytr = common.load_dataset(a.dataset, a.data_dir, train=True, download=download)
    xte, yte = common.load_dataset(a.dataset, a.data_dir, train=False, download=download)
    ntr = len(xtr) if a.n_train is None else min(a.n_train, len(xtr))
    common.check(ntr >= a.batch_size, f"--batch-size {a.batch_size} exceeds the {ntr} training images: lower it")
    mean, std = common.DATASET_STATS[a.dataset]
    ev = lambda x, y, n: common.GPUBatches(x[:n], y[:n], a.eval_batch_size, train=False, device=d.device, mean=mean,
                                           std=std, rank=d.rank, world_size=d.world_size)
    show = (xte[:8].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return (CifarTrain(xtr[:ntr], ytr[:ntr], a, d), ev(xtr, ytr, a.eval_n_train), ev(xte, yte, a.eval_n_test),
            show.to(d.device))

# ----------------------------------------------------------------------------------------------------
# training helpers


TOKEN_PARAMS = ("pos_embed", "cls_token", "mask_token")  # matches mask_token and skip_mask_tokens


def param_groups(model, wd, wd_tokens=True):
    """AdamW groups. As official MAE (timm's add_weight_decay): no decay on 1-d parameters (norms) and
    biases, decay on everything else, the cls / mask tokens and a learned pos-embed included. With
    wd_tokens=False those tokens and embeddings are exempt too (this script's earlier rule)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        skip = p.ndim < 2 or n.endswith(".bias") or (not wd_tokens and any(k in n for k in TOKEN_PARAMS))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, a, steps_per_epoch):
    """Per-iteration linear warm-up, then a half-cycle cosine to 0."""
    peak = a.blr * a.batch_size / 256
    warm, total = a.warmup_epochs * steps_per_epoch, a.epochs * steps_per_epoch
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


def mask_noise(a, step, n, d):
    """Masking noise of the global batch at `step` (seeded by (seed, step)); this rank's rows."""
    g = torch.Generator(device=d.device).manual_seed((a.seed * 1_000_003 + step + 1) % 2**63)
    return torch.rand(a.batch_size, n, generator=g, device=d.device)[d.rank::d.world_size]


def profile_training_step(a, d, model, fwd, opt, train, n_tok, graphs):
    """--profile: common.profile_step of the step the training loop runs, from the start of the schedule:
    the next batch (its GPU crop and flip), the masking noise, forward under autocast, backward, AdamW at
    that step's lr. `fwd` (compiled with --compile, DDP-wrapped under torchrun) is profiled; `model`'s eager
    step gives the count of operations. The optimizer's steps change the weights: nothing is saved after."""
    def batches():
        e = 0
        while True:
            yield from train.epoch(e)
            e += 1
    it, n = batches(), [0]

    def step(f):
        for g in opt.param_groups:
            g["lr"] = lr_at(n[0], a, len(train))
        if graphs and f is fwd:
            torch.compiler.cudagraph_mark_step_begin()
        with common.autocast(d.device):
            loss = f(next(it), mask_noise(a, n[0], n_tok, d))[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n[0] += 1
    return common.profile_step(lambda: step(fwd), d.device, eager_step=lambda: step(model),
                               warmup=2 if a.compile else 0)


def flops_per_image(model, a, device):
    """Model FLOPs of one training step (forward + backward) per image, counted once on a batch of 2.
    torch's counter sees the matmuls and, on CUDA, the fused attention kernels; on the CPU it misses
    attention (~2% at the CIFAR size), which only changes the logged GFLOP there."""
    n = (a.img_size // a.patch) ** 2
    g = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    x, noise = torch.randn(2, 3, a.img_size, a.img_size, generator=g), torch.rand(2, n, generator=g)
    x, noise = x.to(device), noise.to(device)

    def step():
        with common.autocast(device):
            loss = model(x, noise)[0]
        loss.backward()
    f = common.count_flops(step)
    model.zero_grad(set_to_none=True)
    return f / 2


def gathered_order(n, batch, world):
    """Data-set index of each row common.extract_features returns when rank r fed rows r::world of every
    `batch` consecutive images: all of rank 0's rows, then rank 1's, ..."""
    return torch.cat([torch.arange(s + r, min(s + batch, n), world) for r in range(world) for s in range(0, n, batch)])


def evaluate(model, cfg, train_eval, test_eval, is_main):
    """The probe.py protocol on the last layer for both feature kinds; metrics on rank 0 (None elsewhere):
    the cls figures at the top level, the mean-token figures under "mean", and raw_norm (test images).
    Features come from all ranks and are put back into data-set order, so a multi-process eval equals a
    single-process one."""
    L = cfg["depth"]
    fn = lambda x, g: probe_features(model, x, cfg, [L], None, g, feature=FEATURES, norms=True)
    model.eval()
    feats = []
    for b in (train_eval, test_eval):
        f, y = common.extract_features(fn, b, cfg["seed"])
        world = getattr(b, "world", 1)
        if world > 1:
            order = gathered_order(len(y), b.bs, world).to(y.device)
            f = {k: torch.empty_like(v).index_copy_(0, order, v) for k, v in f.items()}
            y = torch.empty_like(y).index_copy_(0, order, y)
        feats += [f, y]
    model.train()
    if not is_main:
        return None
    trf, try_, tef, tey = feats
    kw = dict(k=20, seed=cfg["seed"], probe_epochs=cfg["probe_epochs"])
    m = common.evaluate_features(trf[("cls", L)], try_, tef[("cls", L)], tey, **kw)
    mean = common.evaluate_features(trf[("mean", L)], try_, tef[("mean", L)], tey, **kw)
    return dict(m, mean=mean, raw_norm=tef[("raw_norm", L)].mean().item(), n_train=len(try_), n_test=len(tey))


def pearson(xs, ys):
    """Pearson r over the evaluations; None with fewer than 3 points or a constant series."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


@torch.no_grad()
def save_reconstructions(model, imgs, cfg, path):
    """PNG: originals / masked inputs / reconstructions (predicted patches pasted into the visible ones)."""
    m = common.unwrap(model)
    n = (cfg["img_size"] // cfg["patch"]) ** 2
    noise = torch.rand(len(imgs), n, generator=torch.Generator().manual_seed(cfg["seed"])).to(imgs.device)
    _, pred, mask = m(imgs, noise)
    p, target = cfg["patch"], patchify(imgs, cfg["patch"])
    pred = pred.float()
    if cfg["norm_pix_loss"]:  # undo the per-patch normalisation with the true patch statistics
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    mk = mask[..., None]
    masked, recon = unpatchify(target * (1 - mk), p), unpatchify(target * (1 - mk) + pred * mk, p)
    mean, std = (torch.tensor(v, device=imgs.device).view(1, 3, 1, 1) for v in common.DATASET_STATS[cfg["dataset"]])
    grid = torch.cat([imgs, masked, recon]) * std + mean
    from torchvision.utils import save_image
    save_image(grid.clamp(0, 1).cpu(), path, nrow=len(imgs))

# ----------------------------------------------------------------------------------------------------
# main


def main(argv=None):
    try:
        _main(argv)
    finally:
        common.release_out_dirs()


def _main(argv=None):
    t_wall = time.time()
    args = parse_args(argv)
    d = common.setup_distributed(args.device)
    common.warn_if_cpu(d, args.smoke)
    for flag in ("batch_size", "eval_batch_size"):
        common.check(getattr(args, flag) % d.world_size == 0,
                     f"--{flag.replace('_', '-')} {getattr(args, flag)} must divide by the {d.world_size} processes")
    args.out = args.out or os.path.join("out", SCRIPT, run_name(args) + ("_profile" if args.profile else ""))
    # lock, clean, never overwrite a run (or a profile)
    common.rank0_first(common.claim_out_dir, args.out, args.resume, ("ckpt.pt", "results.json", "profile.json"))
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    cfg = {k: v for k, v in vars(args).items() if k not in ("resume", "stop_at_step", "inject_nan_at_step",
                                                             "dump_grads")}
    log_file = open(os.path.join(args.out, "log.txt"), "a") if d.is_main else None

    def log(msg):
        if d.is_main:
            tqdm.write(msg)
            log_file.write(msg + "\n")
            log_file.flush()

    train, train_eval, test_eval, show = load_data(args, d)
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(d.device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, args.wd_tokens), lr=0.0, betas=(0.9, 0.95),
                            fused=d.device.type == "cuda")
    spe, total = len(train), args.epochs * len(train)
    step, hist = 0, {"trajectory": [], "train_loss": [], "seconds": 0.0}
    loss_sum = torch.zeros((), device=d.device)  # this epoch's summed loss, on the device (no sync per step)
    if args.resume:
        ck = common.load_checkpoint(ckpt_path)
        common.check(ck.get("script") == SCRIPT, f"{ckpt_path} was written by {ck.get('script')!r}, not {SCRIPT}")
        common.check_resume_config(ck["config"], cfg, SAFE_ON_RESUME, ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, hist = ck["step"], ck["history"]
        loss_sum.fill_(ck["loss_sum"])
        torch.set_rng_state(ck["rng"])
        log(f"resumed from {ckpt_path} at step {step} (epoch {step // spe})")
    stop = common.StopSignal(args.stop_at_step)

    alpha, _ = shortcut_coeffs(args.depth, args.decay, args.alpha_min, args.decay_where)
    cum_alpha = float(alpha.prod())
    flops = flops_per_image(model, args, d.device)
    peak = common.peak_flops(d.device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{SCRIPT}: {n_params / 1e6:.2f}M params, {args.depth} encoder blocks, decay {args.decay} "
        f"alpha_min {args.alpha_min} ({args.decay_where}), prod(alpha) {cum_alpha:.3g}, "
        f"{flops / 1e9:.2f} GFLOP/img/step, "
        f"{spe} steps/epoch x {args.epochs} epochs, {d.world_size} proc on {common.device_name(d.device)}")

    fwd = model
    if d.world_size > 1:
        fwd = DDP(fwd, device_ids=[d.local_rank] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)
    if args.compile:  # compiled around DDP, so the graph is split at its buckets and all-reduce overlaps backward
        fwd = torch.compile(fwd, mode=args.compile_mode)
    graphs = args.compile and args.compile_mode in ("reduce-overhead", "max-autotune")
    n_tok = (args.img_size // args.patch) ** 2
    if args.profile:  # what one step is made of, then stop: nothing is trained
        p = profile_training_step(args, d, model, fwd, opt, train, n_tok, graphs)
        ips = args.batch_size * 1000 / p["wall_ms"]
        p.update(batch=args.batch_size, compiled=args.compile, img_per_s=ips,
                 mfu=common.mfu(flops * ips, peak, d.world_size))
        log(f"profile of one {'compiled' if args.compile else 'eager'} step of batch {args.batch_size}: "
            f"{common.profile_text(p)}; {ips:.0f} img/s, mfu " + (f"{p['mfu']:.1%}" if p["mfu"] else "n/a"))
        if d.is_main:
            path = common.write_results(args.out, SCRIPT, cfg, {"profile": p, "flops_per_img": flops,
                                                                "world_size": d.world_size},
                                        time.time() - t_wall, d.device, name="profile.json")
            log(f"profile -> {path}")
            log_file.close()
        common.cleanup_distributed()
        return
    dumps = {"loss": [], "grads": []}
    speeds, t_log, s_log, t_start = [], time.time(), step, time.time() - hist["seconds"]
    t_proc, s_proc = time.time(), step  # this process's start, for the ETA (a resumed run counts from here)

    def global_mean(t):
        """Mean over ranks of a per-rank scalar (a plain .item() when single)."""
        if d.world_size > 1:
            t = t.clone()
            torch.distributed.all_reduce(t)
        return t.item() / d.world_size

    def checkpoint():
        # the epoch's partial loss, as the mean over ranks: every rank restarts from it after --resume
        partial = global_mean(loss_sum)
        common.nan_guard(partial, step, ckpt_path)  # never overwrite a good checkpoint with NaN weights
        if d.is_main:
            common.save_checkpoint(ckpt_path, {
                "script": SCRIPT, "config": cfg, "model": common.unwrap(model).state_dict(),
                "optimizer": opt.state_dict(), "step": step, "epoch": step // spe, "loss_sum": partial,
                "history": dict(hist, seconds=time.time() - t_start), "rng": torch.get_rng_state()})

    model.train()
    for epoch in range(step // spe, args.epochs):
        bar = tqdm(total=spe, initial=step % spe, desc=f"epoch {epoch}", leave=False,
                   disable=not (d.is_main and sys.stderr.isatty()))
        for x in train.epoch(epoch, step % spe):
            if stop.requested(step):
                checkpoint()
                log(f"stopped at step {step}; checkpoint {ckpt_path} (continue with --resume)")
                common.cleanup_distributed()
                return
            lr = lr_at(step, args, spe)
            for g in opt.param_groups:
                g["lr"] = lr
            if graphs:  # CUDA graphs: this step's outputs may overwrite the last step's
                torch.compiler.cudagraph_mark_step_begin()
            with common.autocast(d.device):
                loss = fwd(x, mask_noise(args, step, n_tok, d))[0]
            if args.inject_nan_at_step == step:
                loss = loss * float("nan")
            loss.backward()
            if step < args.dump_grads:
                l = loss.detach().clone()
                if d.world_size > 1:
                    torch.distributed.all_reduce(l)
                dumps["loss"].append(l.item() / d.world_size)
                dumps["grads"].append({n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()
                                       if p.grad is not None})
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            step += 1
            bar.update()
            if step == args.dump_grads and d.is_main:
                torch.save(dumps, os.path.join(args.out, "grads.pt"))
            if d.device.type == "cpu":  # free on the CPU; on a GPU only at log steps (no sync per step)
                common.nan_guard(loss.item(), step - 1, ckpt_path)
            if step % args.log_every == 0 or step == total:
                lv = global_mean(loss.detach())
                common.nan_guard(lv, step - 1, ckpt_path)
                dt = time.time() - t_log
                ips = (step - s_log) * args.batch_size / dt
                speeds.append(ips)
                mfu = common.mfu(flops * ips, peak, d.world_size)
                mfu = f"{mfu:.1%}" if mfu else "n/a"
                left = common.eta(step - s_proc, total - s_proc, time.time() - t_proc)
                log(f"step {step}/{total} ep {epoch} loss {lv:.4f} lr {lr:.2e} {ips:.0f} img/s mfu {mfu} ETA {left}")
                t_log, s_log = time.time(), step
        bar.close()
        hist["train_loss"].append(global_mean(loss_sum) / spe)
        common.nan_guard(hist["train_loss"][-1], step - 1, ckpt_path)  # a NaN between GPU log steps ends here
        loss_sum.zero_()
        done = epoch + 1 == args.epochs
        t0 = time.time()
        if args.eval_every and (epoch + 1) % args.eval_every == 0 or done:
            m = evaluate(model, cfg, train_eval, test_eval, d.is_main)
            if d.is_main:
                hist["trajectory"].append(dict(m, epoch=epoch + 1, step=step, train_loss=hist["train_loss"][-1]))
                mm = m["mean"]
                log(f"eval ep {epoch + 1}: cls probe {m['linear_probe']:.2f}% knn {m['knn']:.2f}% erank {m['erank']:.3f} "
                    f"(exp {m['erank_exp']:.1f}) |f| {m['feat_norm']:.2f} | mean probe {mm['linear_probe']:.2f}% "
                    f"knn {mm['knn']:.2f}% erank {mm['erank']:.3f} | raw last-block |x| {m['raw_norm']:.2f} "
                    f"[{time.time() - t0:.1f} s]")
        if (epoch + 1) % args.ckpt_every == 0 or done:
            checkpoint()
        t_log += time.time() - t0  # keep eval and checkpoint time out of img/s

    seconds = time.time() - t_start
    if d.is_main:
        traj = hist["trajectory"]
        png = os.path.join(args.out, "reconstructions.png")
        save_reconstructions(model, show, cfg, png)
        steady = speeds[1:] or speeds
        ips = float(np.median(steady)) if steady else None
        metrics = {"final": traj[-1] if traj else None, "trajectory": traj,
                   "pearson_erank_probe": pearson([t["erank"] for t in traj], [t["linear_probe"] for t in traj]),
                   "pearson_erank_knn": pearson([t["erank"] for t in traj], [t["knn"] for t in traj]),
                   "pearson_erank_probe_mean": pearson([t["mean"]["erank"] for t in traj],
                                                       [t["mean"]["linear_probe"] for t in traj]),
                   "pearson_erank_knn_mean": pearson([t["mean"]["erank"] for t in traj],
                                                     [t["mean"]["knn"] for t in traj]),
                   "train_loss": hist["train_loss"], "alphas": alpha.tolist(), "cum_alpha": cum_alpha,
                   "params": n_params, "flops_per_img": flops, "img_per_s": ips,
                   "mfu": common.mfu(flops * (ips or 0), peak, d.world_size), "steps": step,
                   "epochs": args.epochs, "world_size": d.world_size, "minutes": seconds / 60}
        path = common.write_results(args.out, SCRIPT, cfg, metrics, time.time() - t_wall, d.device,
                                    train_seconds=seconds)
        log(f"results -> {path}; reconstructions -> {png}")
        log_file.close()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
