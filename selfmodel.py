"""Self-modeling as self-regularisation: "Unexpected Benefits of Self-Modeling in Neural Systems"
(Premakumar et al., arXiv 2407.10188).

A classifier whose output layer is widened so that it also predicts its own hidden activations
(loss = CE + AW * MSE, the targets captured by forward hooks and detached) becomes simpler: the
paper reports that the width of the final layer's weight distribution and the RLCT (local learning
coefficient, estimated by SGLD) fall as the auxiliary weight AW grows, at unchanged accuracy. (Its own
MNIST figure qualifies that: at hidden 64, AW >= 20 kills the hidden layer, the self-model's target becomes
0 and the network falls to chance; wider networks stay accurate. This script reproduces both; README.)
This script trains the AW x seeds sweep for one task and prints a table of test accuracy, weight
width and RLCT: mean and 95% Student-t interval over seeds, and the trend in AW (Spearman rank
correlation over the per-seed values, with a permutation p-value).

  python selfmodel.py --task mnist --aw 0,1,2,5,10,20,50,100 --seeds 10      # the paper's MNIST protocol
  python selfmodel.py --task cifar10 --preset quick --aw 0,0.5,1,2 --seeds 3   # 15 epochs, batch 256
  python selfmodel.py --task cifar10 --aw 0,0.5,1,2 --seeds 10                 # paper: Adam 1e-4, 250 epochs
  python selfmodel.py --task imdb --preset quick --aw 0,1,100,500 --seeds 5    # 50 epochs + momentum (paper: 500)
  python selfmodel.py --task imdb --aw 0,1,100,500 --seeds 10                  # the paper's: 500 epochs, plain SGD
  python selfmodel.py --task imdb --preset quick --aw 0,100,500 --target embedding  # self-model the embedding
  python selfmodel.py --task mnist --aw 0,0.1,1,10 --aux act-l2 --seeds 10    # control: AW * mean(h^2) instead
  python selfmodel.py --task mnist --aw 0,50 --seeds 2 --llc-grid-eps 1e-5,1e-4,1e-3 --llc-grid-gamma 1,10,100
  python selfmodel.py --smoke                                                  # CPU, seconds
  torchrun --nproc_per_node 8 selfmodel.py --task cifar10 --preset quick       # DDP over the batch
  python results/selfmodel_figures.py NAME OUT [OUT ...]                      # table + figures of finished runs

Models (the paper's): MNIST MLP 784 -> hidden (ReLU) -> head, target = the hidden activation;
CIFAR-10 ResNet-18 (3x3 stem, no max-pool) -> avgpool -> Linear(512, 2000) + ReLU -> head, targets =
the last block's output (512x4x4) and the 2000-d hidden; IMDB EmbeddingBag(vocab, 64) -> Linear(64, 128)
+ ReLU -> head, target = the 128-d hidden. AW = 0 builds the plain network (no extra outputs). `--target`
picks other layers: the authors' code also self-models IMDB's 64-d mean embedding (`--target embedding`);
on CIFAR-10 either target alone (`block`, `hidden`). `--aux act-l2` is a control the paper does not run: no
self-model rows, the loss adds AW * mean(target^2) with the target NOT detached (the self-model's MSE had it
predicted 0): a plain activation penalty on the same layers, to ask whether any pull on the activations
simplifies the network as much as predicting them does.
Data as the authors: images Normalize(0.5, 0.5) (`--normalize dataset` for the data set's statistics; the
choice sets the scale of the weight width); IMDB tokenised by torchtext's basic_english rules (written out
in common.tokenize) with the vocabulary of every training word. Left open by the paper: the data order; the
authors' loader replays one seeded permutation every epoch, here each epoch is shuffled by (seed, epoch).

RLCT: `estimate_llc` below, localised SGLD on the classification-only network (the self-model rows
dropped), nbeta = B / ln B with B = --sgld-batch (the paper's training batch), the second half of the
draws averaged (devinterp 0.2's burn-in was broken; the authors averaged the second half). Two protocols:
  --llc-protocol ours (default)  eval mode, clean training batches, L(w*) taken on the same batch as each
                                 draw: the batch-to-batch spread cancels in the difference (lower variance).
  --llc-protocol authors         as the paper ran devinterp 0.2: train mode (BatchNorm on batch statistics),
                                 the augmented training loader, L(w*) = mean of the first `chains` batches,
                                 the second half of each chain's running mean. Use it to compare with the
                                 paper's CIFAR-10 numbers; for the MLP and IMDB models (no BatchNorm, no
                                 augmentation) the two differ only in the reduction.
Every estimate keeps its sampled-loss trace (thinned) and the checks devinterp's calibration guide asks
for: the share of draws below L(w*) and whether the trace has flattened. Absolute values are localised:
with gamma 100 and nbeta = B / ln B a regular d-parameter model reads about 0.31 d, not d / 2, so only the
ordering across AW compares with the paper. `--llc-grid-eps/--llc-grid-gamma` add estimates of every cell
over an (eps, gamma) grid, to see whether that ordering depends on the sampler's settings; `--llc-rescale`
adds estimates of every cell after a function-preserving rescaling (hidden layer x c, class rows / c): the
width and this estimate both move under it, so they compare networks only as far as their scale split does.
Every cell also counts the ReLU units feeding the class rows that are dead on the test set (positive on no example)
and the mean share positive per example (`evaluate`): a unit silent on all data leaves its weights without effect
on the loss, which the RLCT sees as fewer parameters, so the count hints at how much of a fall in RLCT is units
switched off.
Output: OUT/results.json (table + per-seed values + loss curves + RLCT traces), OUT/log.txt, and
OUT/ckpt.pt (the sweep's state: the last cell's weights and the finished cells' results).
"""
import argparse, copy, math, os, sys, time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

import common

SCRIPT = "selfmodel"

# ----------------------------------------------------------------------------------------------------
# config: the paper's settings per task, shorter presets, and a CPU-sized smoke run

TASKS = {  # target: the layers the self-model predicts (TARGETS below), the paper's choice per task
    "mnist": dict(dataset="mnist", hidden=64, target="hidden", optimizer="sgd", lr=0.005, momentum=0.9, epochs=50,
                  batch_size=512, aw="0,1,10,50", sgld_eps=1e-4, sgld_gamma=100.0, sgld_chains=4, sgld_draws=1000,
                  sgld_batch=512),
    "cifar10": dict(dataset="cifar10", hidden=2000, target="block,hidden", optimizer="adam", lr=1e-4, momentum=0.0,
                    epochs=250, batch_size=64, aw="0,0.5,1,2", sgld_eps=1e-4, sgld_gamma=100.0, sgld_chains=4,
                    sgld_draws=400, sgld_batch=64),
    "imdb": dict(dataset="imdb", hidden=128, target="hidden", optimizer="sgd", lr=0.1, momentum=0.0, epochs=500,
                 batch_size=64, aw="0,1,100,500", sgld_eps=1e-3, sgld_gamma=10.0, sgld_chains=4, sgld_draws=1000,
                 sgld_batch=64),
}
# --target's choices per task, in forward order: block = the last ResNet block's output (8w x 4 x 4), hidden =
# the ReLU layer before the head, embedding = IMDB's 64-d mean embedding (the authors' code also runs this one:
# "embedding_AW=100" / "embedding_AW=500" beside their hidden-layer variants)
TARGETS = {"mnist": ("hidden",), "cifar10": ("block", "hidden"), "imdb": ("embedding", "hidden")}
EMBED = 64  # IMDB's embedding width (the paper's)
AUX = ("self-model", "act-l2")  # what AW weighs: the paper's self-model, or the activation-penalty control
PRESETS = {  # "paper" = TASKS as they are; "quick" finishes a 4 AW x 3 seed sweep in minutes on one GPU
    "paper": {},
    # IMDB: the paper's plain SGD 0.1 moves the N(0, 1)-initialised, mean-pooled embedding rows very slowly
    # (its 500 epochs); Nesterov 0.9 speeds those directions ~10x while the stiff AW * MSE ones stay stable
    # (lr 1.0 instead diverges at AW 500). CPU, AW 0, 20 epochs: 74% test accuracy plain, 84% with momentum.
    "quick": {"cifar10": dict(epochs=15, batch_size=256, lr=4e-4), "imdb": dict(epochs=50, momentum=0.9)},
}
SMOKE = {  # CPU-sized: a small real subset, a narrow model, a short chain
    "mnist": dict(hidden=32, epochs=3, batch_size=128, train_subset=4096, test_subset=1000, aw="0,1", seeds=1,
                  sgld_chains=2, sgld_draws=40, sgld_batch=128, log_every=16),
    "cifar10": dict(hidden=32, width=8, epochs=1, batch_size=32, train_subset=256, test_subset=128, aw="0,1",
                    seeds=1, sgld_chains=2, sgld_draws=6, sgld_batch=32, log_every=4),
    "imdb": dict(epochs=2, train_subset=2000, test_subset=1000, vocab_size=5000, aw="0,1", seeds=1,
                 sgld_chains=2, sgld_draws=40, log_every=8),
}
BASE = dict(seeds=3, width=64, vocab_size=0, train_subset=0, test_subset=0, log_every=100)
# flags that do not change what the sweep computes (may differ between a run and its --resume)
SAFE_ON_RESUME = common.SAFE_ON_RESUME | {"log_every", "ckpt_interval", "eval_batch", "model_aw", "model_seed",
                                         "num_tokens"}


def task_defaults(key):
    """' (default: mnist 64, cifar10 2000, imdb 128)' for a per-task setting, for --help."""
    vals = {t: {**BASE, **TASKS[t]}.get(key) for t in TASKS}
    quick = {t: PRESETS["quick"][t][key] for t in PRESETS["quick"] if key in PRESETS["quick"][t]}
    text = ", ".join(f"{t} {v:g}" if isinstance(v, float) else f"{t} {v}" for t, v in vals.items())
    return f" (default: {text}" + "".join(f"; {t} quick {v:g}" for t, v in quick.items()) + ")"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = task_defaults
    p.add_argument("--task", default="mnist", help="mnist | cifar10 | imdb")
    p.add_argument("--preset", default="paper", help="paper | quick (shorter CIFAR-10 / IMDB training)")
    p.add_argument("--aw", default=None, help="comma-separated auxiliary (self-model) weights; 0 = plain network"
                   + d("aw"))
    p.add_argument("--seeds", type=int, default=None, help="seeds per AW: --seed, --seed+1, ..." + d("seeds"))
    p.add_argument("--hidden", type=int, default=None, help="hidden width" + d("hidden"))
    p.add_argument("--target", default=None,
                   help="comma-separated layers the self-model predicts: mnist hidden; cifar10 block (the last "
                        "block's 8w x 4 x 4 output), hidden; imdb embedding (the 64-d mean embedding), hidden"
                        + d("target"))
    p.add_argument("--aux", default="self-model",
                   help="what AW weighs: self-model = the paper's (extra output rows predict the detached target "
                        "activations); act-l2 = a control: no extra rows, AW * mean(target^2), not detached")
    p.add_argument("--width", type=int, default=None, help="ResNet-18 base width, CIFAR-10 only (default 64)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="IMDB only: vocabulary size (default 0 = every training word, as the paper)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs" + d("epochs"))
    p.add_argument("--batch-size", type=int, default=None, help="global batch size" + d("batch_size"))
    p.add_argument("--lr", type=float, default=None, help="learning rate" + d("lr"))
    p.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum, Nesterov when > 0" + d("momentum"))
    p.add_argument("--normalize", default="paper",
                   help="image inputs: paper = Normalize(0.5, 0.5) as the authors; dataset = the data set's "
                        "channel mean / std")
    p.add_argument("--train-subset", type=int, default=None, help="train on a fixed random N-subset (default 0 = all)")
    p.add_argument("--test-subset", type=int, default=None, help="test on a fixed random N-subset (default 0 = all)")
    p.add_argument("--sgld-eps", type=float, default=None, help="SGLD step size epsilon" + d("sgld_eps"))
    p.add_argument("--sgld-gamma", type=float, default=None, help="SGLD localisation strength gamma" + d("sgld_gamma"))
    p.add_argument("--sgld-chains", type=int, default=None, help="SGLD chains" + d("sgld_chains"))
    p.add_argument("--sgld-draws", type=int, default=None,
                   help="SGLD steps per chain, first half burn-in" + d("sgld_draws"))
    p.add_argument("--sgld-batch", type=int, default=None, help="SGLD batch B; nbeta = B / ln B" + d("sgld_batch"))
    p.add_argument("--llc-protocol", default="ours",
                   help="ours = eval mode, clean batches, L(w*) per batch (lower variance); authors = as the "
                        "paper ran devinterp 0.2: train-mode BatchNorm, the augmented training loader, "
                        "L(w*) from the first batches, running means (see estimate_llc)")
    p.add_argument("--llc-grid-eps", default="", help="calibration: extra RLCT estimates of every cell for each "
                   "eps in this list x each gamma in --llc-grid-gamma (e.g. 1e-5,1e-4,1e-3)")
    p.add_argument("--llc-grid-gamma", default="", help="calibration: gammas for --llc-grid-eps (e.g. 1,10,100)")
    p.add_argument("--llc-rescale", default="", help="calibration: extra RLCT estimates of every cell with its hidden "
                   "layer scaled by each c in this list and the class rows by 1/c, the same function (e.g. "
                   "0.25,0.5,2,4; see rescaled)")
    p.add_argument("--eval-batch", type=int, default=1000, help="test batch size")
    p.add_argument("--log-every", type=int, default=None, help="steps between log lines" + d("log_every"))
    p.add_argument("--ckpt-interval", type=float, default=300,
                   help="checkpoint at the end of an epoch once this many seconds passed (0 = every epoch)")
    common.add_common_args(p, SCRIPT)
    return p


def get_args(argv=None):
    args = build_parser().parse_args(argv)
    check = common.check
    check(args.task in TASKS, f"--task {args.task!r} is not one of {', '.join(TASKS)}")
    check(args.preset in PRESETS, f"--preset {args.preset!r} is not one of {', '.join(PRESETS)}")
    # contradictions: a flag that would be ignored is refused, not silently dropped
    check(args.preset == "paper" or args.task in PRESETS[args.preset],
          f"--preset {args.preset} has no settings for --task {args.task} (it runs at the paper's): drop it")
    check(args.width is None or args.task == "cifar10", f"--width only applies to --task cifar10: drop it")
    check(args.vocab_size is None or args.task == "imdb", f"--vocab-size only applies to --task imdb: drop it")
    check(args.aux in AUX, f"--aux {args.aux!r} is not one of {', '.join(AUX)}")
    check(args.normalize in ("paper", "dataset"), f"--normalize {args.normalize!r} is not one of paper, dataset")
    check(args.normalize == "paper" or args.task != "imdb", "--normalize applies to image tasks: drop it for imdb")
    check(args.llc_protocol in ("ours", "authors"), f"--llc-protocol {args.llc_protocol!r} is not one of ours, authors")
    check(bool(args.llc_grid_eps) == bool(args.llc_grid_gamma),
          "--llc-grid-eps and --llc-grid-gamma go together: give both lists (or neither)")
    args.llc_grid = [(e, g) for e in common.parse_list(args.llc_grid_eps, float, "--llc-grid-eps")
                     for g in common.parse_list(args.llc_grid_gamma, float, "--llc-grid-gamma")] \
        if args.llc_grid_eps else []
    check(all(e > 0 and g >= 0 for e, g in args.llc_grid), "--llc-grid-eps must be > 0 and --llc-grid-gamma >= 0")
    scales = common.parse_list(args.llc_rescale, float, "--llc-rescale") if args.llc_rescale else []
    check(all(math.isfinite(c) and c > 0 for c in scales) and len(set(scales)) == len(scales),
          f"--llc-rescale {args.llc_rescale}: give each scale c > 0 once (1 is the network as trained)")
    args.llc_rescale = ",".join(f"{c:g}" for c in scales)
    # precedence: explicit flags > --smoke > --preset > the paper's settings > BASE
    fill = {**BASE, **TASKS[args.task], **PRESETS[args.preset].get(args.task, {}),
            **(SMOKE[args.task] if args.smoke else {})}
    for k, v in fill.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    names = [n.strip() for n in args.target.split(",") if n.strip()]
    check(names and all(n in TARGETS[args.task] for n in names) and len(set(names)) == len(names),
          f"--target {args.target}: give one or more of {', '.join(TARGETS[args.task])} (task {args.task}), each once")
    args.target = ",".join(n for n in TARGETS[args.task] if n in names)  # forward order, as the hooks see them
    aws = common.parse_list(args.aw, float, "--aw")
    check(all(math.isfinite(a) and a >= 0 for a in aws), f"--aw {args.aw}: every AW must be >= 0 (0 = plain network)")
    check(len(set(aws)) == len(aws), f"--aw {args.aw} lists a value twice: give each AW once")
    args.aw = ",".join(fmt_aw(a) for a in aws)
    for flag in ("seeds", "hidden", "width", "epochs", "batch_size", "sgld_chains", "eval_batch", "log_every"):
        check(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    for flag in ("vocab_size", "train_subset", "test_subset"):
        check(getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 0 (0 = all)")
    check(args.sgld_draws >= 2, f"--sgld-draws {args.sgld_draws} must be >= 2 (the first half is burn-in)")
    check(args.sgld_batch >= 2, f"--sgld-batch {args.sgld_batch} must be >= 2 (nbeta = B / ln B)")
    for flag in ("lr", "sgld_eps"):
        v = getattr(args, flag)
        check(math.isfinite(v) and v > 0, f"--{flag.replace('_', '-')} {v} must be a positive number")
    check(0 <= args.momentum < 1, f"--momentum {args.momentum} must be in [0, 1)")
    check(args.optimizer == "sgd" or args.momentum == 0, f"--momentum: {args.task} trains with Adam; drop the flag")
    check(math.isfinite(args.sgld_gamma) and args.sgld_gamma >= 0, f"--sgld-gamma {args.sgld_gamma} must be >= 0")
    check(args.ckpt_interval >= 0, f"--ckpt-interval {args.ckpt_interval} must be >= 0 seconds")
    args.sgld_nbeta = args.sgld_batch / math.log(args.sgld_batch)
    if args.out is None:
        name = f"{args.task}_{args.preset}_h{args.hidden}_aw{args.aw.replace(',', '-')}_seeds{args.seeds}"
        name += "" if args.target == TASKS[args.task]["target"] else "_target-" + args.target.replace(",", "-")
        name += "" if args.aux == AUX[0] else "_aux-" + args.aux
        args.out = os.path.join("out", SCRIPT, name + ("_smoke" if args.smoke else ""))
    return args


def parse_aws(cfg):
    return [float(a) for a in str(cfg["aw"]).split(",")]

# ----------------------------------------------------------------------------------------------------
# models: body -> hidden h -> head (class logits) [+ self_head (predicted target activations)]. From here to
# the end of class SelfModelNet needs only torch, torch.nn as nn and torch.nn.functional as F: SelfModelNet
# widens any body that lists the modules to self-model in `body.targets` (tests/test_copy_paste.py)


class MLPBody(nn.Module):
    def __init__(self, hidden, targets=("hidden",)):
        super().__init__()
        self.fc, self.act = nn.Linear(28 * 28, hidden), nn.ReLU()
        self.targets = [{"hidden": self.act}[n] for n in targets]

    def features(self, x):
        return [self.act(self.fc(x.flatten(1)))]

    def forward(self, x):
        return self.features(x)[-1]


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNetBody(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool) -> global avgpool -> Linear(8w, hidden) + ReLU."""

    def __init__(self, hidden, width=64, targets=("block", "hidden")):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        chans, layers, cin = [w, 2 * w, 4 * w, 8 * w], [], w
        for i, c in enumerate(chans):
            layers.append(nn.Sequential(BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc, self.act = nn.Linear(8 * w, hidden), nn.ReLU()
        # the paper's targets: both, the last block's output (8w x 4 x 4) and the hidden
        self.targets = [{"block": self.layer4, "hidden": self.act}[n] for n in targets]

    def features(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        pooled = x.mean((2, 3))
        return [pooled, self.act(self.fc(pooled))]

    def forward(self, x):
        return self.features(x)[-1]


class TextBody(nn.Module):
    """EmbeddingBag(vocab, 64, mean) -> Linear(64, hidden) + ReLU; x = (tokens, offsets)."""

    def __init__(self, num_tokens, hidden, embed=64, targets=("hidden",)):
        super().__init__()
        self.emb = nn.EmbeddingBag(num_tokens, embed, mode="mean")
        self.fc, self.act = nn.Linear(embed, hidden), nn.ReLU()
        self.targets = [{"embedding": self.emb, "hidden": self.act}[n] for n in targets]

    def features(self, x):
        e = self.emb(*x)
        return [e, self.act(self.fc(e))]

    def forward(self, x):
        return self.features(x)[-1]


class SelfModelNet(nn.Module):
    """Classifier whose output layer is widened by the size of the target activations.

    forward(x) -> (output, target): output = [class logits | predicted activations] and the target
    activations, captured by forward hooks on `body.targets` and detached (the self-model chases its
    own activations; it must not pull them towards its prediction). Plain network: (logits, None).
    The class rows (`head`) and the extra rows (`self_head`) are two Linear layers side by side, which
    is one widened layer; `self_head` is created last so the rest draws exactly the plain network's init.
    penalty=True (a control, not the paper's; self_model must be False): the plain network, whose forward
    returns (logits, target activations NOT detached); loss_parts then weighs MSE(0, target), an L2 penalty.
    """

    def __init__(self, body, hidden, num_classes, target_dim, self_model, penalty=False):
        super().__init__()
        self.body, self.num_classes, self.penalty = body, num_classes, penalty
        self.head = nn.Linear(hidden, num_classes)
        self.self_head = nn.Linear(hidden, target_dim) if self_model else None
        self._acts = None  # a list only inside forward(), so classify() and SGLD do not capture
        if self_model and penalty:
            raise ValueError("SelfModelNet: penalty is the control without self-model rows: pass self_model=False")
        if (self_model or penalty) and not getattr(body, "targets", None):
            raise ValueError("SelfModelNet: body.targets must list the modules whose outputs the network predicts")
        if self_model or penalty:
            for m in body.targets:
                m.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        if self._acts is not None:  # the penalty must reach the activations; the self-model must not move them
            self._acts.append(output.flatten(1) if self.penalty else output.detach().flatten(1))

    def forward(self, x):
        if self.self_head is None and not self.penalty:
            return self.head(self.body(x)), None
        self._acts = []
        try:
            h = self.body(x)
            target = torch.cat(self._acts, 1)
        finally:
            self._acts = None
        if self.penalty:
            return self.head(h), target
        return torch.cat([self.head(h), self.self_head(h)], 1), target

    def classify(self, x):
        return self.head(self.body(x))

    def classifier(self):
        """The classification-only network (sharing parameters), as the RLCT is measured on."""
        return nn.Sequential(self.body, self.head)


def target_names(cfg):
    """The config's --target as a tuple; configs written before the flag existed self-modeled the default."""
    return tuple(cfg.get("target", TASKS[cfg["task"]]["target"]).split(","))


def target_dim(cfg):
    sizes = {"hidden": cfg["hidden"], "block": 8 * cfg.get("width", 64) * 4 * 4, "embedding": EMBED}
    return sum(sizes[n] for n in target_names(cfg))


def aux_of(cfg):
    """The config's --aux; configs written before the flag existed ran the self-model."""
    return cfg.get("aux", AUX[0])


def spelled_out(cfg):
    """The config with the flags added since runs were first published spelled out as those runs ran them
    (--target: the task's default layers, --aux: the self-model, --llc-rescale: none), so an old checkpoint
    resumes and an old sweep merges only with runs of the same settings."""
    return {**cfg, "target": ",".join(target_names(cfg)), "aux": aux_of(cfg), "llc_rescale": cfg.get("llc_rescale", "")}


def build_model(cfg, self_model=None):
    """The network a config describes; widened iff its AW (`model_aw`) > 0 unless `self_model` says. Under
    `--aux act-l2` the AW term is a penalty instead: the plain network, returning its undetached targets."""
    if self_model is None:
        self_model = float(cfg.get("model_aw", 0.0)) > 0
    penalty = self_model and aux_of(cfg) == "act-l2"
    task = cfg["task"]
    if task == "mnist":
        body = MLPBody(cfg["hidden"], target_names(cfg))
    elif task == "cifar10":
        body = ResNetBody(cfg["hidden"], cfg.get("width", 64), target_names(cfg))
    else:
        body = TextBody(cfg["num_tokens"], cfg["hidden"], EMBED, target_names(cfg))
    return SelfModelNet(body, cfg["hidden"], common.NUM_CLASSES[cfg["dataset"]], target_dim(cfg),
                        self_model and not penalty, penalty)


def probe_layers(cfg):
    return 1 if cfg["task"] == "mnist" else 2


def probe_features(model, x, cfg, layers, t=None, generator=None):
    """Hidden-layer features: MNIST 1 = hidden; CIFAR-10 1 = pooled last block, 2 = 2000-d hidden;
    IMDB 1 = mean embedding, 2 = hidden. Deterministic (t and generator unused); call model.eval() first."""
    feats = common.unwrap(model).body.features(x)
    return {l: feats[l - 1].float() for l in layers}


def loss_parts(model, x, y, aw):
    """(total, ce, mse): CE on the class logits + AW * MSE between predicted and actual activations (under
    --aux act-l2 the prediction is 0 and the target not detached: AW * mean(target^2))."""
    out, target = model(x)
    c = common.unwrap(model).num_classes
    ce = F.cross_entropy(out[:, :c].float(), y)
    if target is None:
        return ce, ce, torch.zeros((), device=ce.device)
    pred = out[:, c:].float() if out.shape[1] > c else torch.zeros_like(target, dtype=torch.float32)
    mse = F.mse_loss(pred, target.float())
    return ce + aw * mse, ce, mse


def weight_widths(model):
    """Sample std of the final layer's class rows (the paper's width), of the whole widened output layer,
    and of every weight matrix / kernel of the classification network (biases and norm scales left out)."""
    net = common.unwrap(model)
    with torch.no_grad():
        cls = net.head.weight.float()
        out = cls if net.self_head is None else torch.cat([cls, net.self_head.weight.float()])
        allw = torch.cat([p.float().flatten() for p in net.classifier().parameters() if p.dim() >= 2])
        return {"width": cls.std().item(), "width_out": out.std().item(), "width_all": allw.std().item()}

# ----------------------------------------------------------------------------------------------------
# RLCT / local learning coefficient by localised SGLD. estimate_llc needs only copy, math, torch, torch.nn
# as nn and torch.func's functional_call, grad and vmap: it can be copied as it is (tests/test_copy_paste.py);
# llc_diagnostics, its calibration checks, also uses common.t_quantile


def estimate_llc(model, loss_fn, loader, *, eps, gamma, nbeta, num_chains, num_draws, seed=0, protocol="ours",
                 details=False):
    """Local learning coefficient of `model` at its current weights w* by localised SGLD.

    Each chain starts at w* and steps  w <- w - eps/2 * (nbeta * grad L_b(w) + gamma * (w - w*)) + N(0, eps)
    on successive batches b of `loader` (re-iterated when exhausted; `loss_fn(model(x), y)` is the batch
    mean loss). LLC = nbeta * (mean sampled loss - L(w*)), averaged over chains and the second half of the
    draws (the first half is burn-in). Two ways to take the rest, `protocol`:
      "ours"     model in eval mode; L(w*) on the same batch as each draw, which removes the batch-to-batch
                 spread from the difference (lower variance); mean of the second half of the draws.
      "authors"  as devinterp 0.2 was run for the paper: model in train mode (BatchNorm on batch statistics,
                 running statistics left alone), L(w*) = mean loss of the first `num_chains` batches, and
                 the mean over the second half of each chain's running mean of the sampled loss.
    All chains run at once: torch.func's vmap over one (chains, weights) tensor, a few whole-tensor ops per
    draw and no host sync until the end. The model is left exactly as found (weights, buffers, train/eval
    flags); randomness comes only from a generator seeded by `seed`.

    Returns the LLC, or with `details` a dict: llc, losses (draws x chains, the sampled losses) and
    init_losses (draws, L(w*) as subtracted), float64 on the CPU: llc_diagnostics turns them into the
    trace and the calibration checks.
    """
    if protocol not in ("ours", "authors"):
        raise ValueError(f"estimate_llc: protocol {protocol!r} is not one of ours, authors")
    modes = {m: m.training for m in model.modules()}
    sparse = [m for m in model.modules() if getattr(m, "sparse", False)]  # vmap's grad wants dense gradients
    for m in sparse:
        m.sparse = False
    if protocol == "authors":  # batch statistics in every BatchNorm, on a copy: the model's buffers stay
        model = copy.deepcopy(model)
        torch.func.replace_all_batch_norm_modules_(model)
        model.train()
    else:
        model.eval()
    try:
        names = [n for n, _ in model.named_parameters()]
        w_star = [p.detach().float() for _, p in model.named_parameters()]
        dev = w_star[0].device
        # every parameter with a leading chain dimension: all chains step together
        params = {n: w.repeat(num_chains, *[1] * w.dim()) for n, w in zip(names, w_star)}
        w, tmp = list(params.values()), [torch.empty_like(p) for p in params.values()]
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        gen = torch.Generator(device=dev).manual_seed(seed)

        def batch_loss(params, x, y):
            loss = loss_fn(functional_call(model, (params, buffers), (x,)), y)
            return loss, loss.detach()

        def batches():  # the loader, started again whenever it is exhausted
            while True:
                empty = True
                for batch in loader:
                    empty = False
                    yield batch
                if empty:
                    raise ValueError("estimate_llc: the loader yields no batches")

        # one vmapped gradient over the chains; embedding_bag has no batching rule, and vmap's fallback
        # (a loop that stacks the chains' gradients) costs more than the loop written out
        looped = any(isinstance(m, nn.EmbeddingBag) for m in model.modules())
        grad_fn = grad(batch_loss, has_aux=True)
        vgrad = vmap(grad_fn, in_dims=(0, None, None))

        def gradients(x, y):
            """[(chains' slices of the parameters, their gradients)] and the chains' losses."""
            if not looped:
                g, loss = vgrad(params, x, y)
                return [(w, [g[n] for n in names])], loss
            out, losses = [], []
            for c in range(num_chains):
                g, loss = grad_fn({n: p[c] for n, p in params.items()}, x, y)
                out.append(([p[c] for p in w], [g[n] for n in names]))
                losses.append(loss)
            return out, torch.stack(losses)

        losses, inits = [], []
        with torch.no_grad():
            if protocol == "authors":  # devinterp 0.2's init loss: the first num_chains batches of a fresh pass
                it = batches()
                fixed = torch.stack([loss_fn(model(x), y).float() for x, y in (next(it) for _ in range(num_chains))])
                fixed = fixed.mean()
        it = batches()
        for t in range(num_draws):
            x, y = next(it)
            # the default layout: a channels_last batch makes cuDNN's BatchNorm clone to channels_last, which
            # vmap refuses (seen on an H200, torch 2.11); the chains' weights are already contiguous copies.
            # A text batch, (tokens, offsets), passes as it is
            x = x.contiguous() if torch.is_tensor(x) else x
            parts, loss = gradients(x, y)
            with torch.no_grad():
                losses.append(loss.float())
                inits.append(fixed if protocol == "authors" else loss_fn(model(x), y).float())
                # the step, in place (no temporaries the size of chains x weights; IMDB has 6.4M weights a chain):
                # w <- w - eps/2 * (nbeta * g + gamma * (w - w*)) + sqrt(eps) * N(0, 1)
                for c, (ws, gs) in enumerate(parts):
                    ts = tmp if len(parts) == 1 else [t_[c] for t_ in tmp]
                    for t_, p_, s_ in zip(ts, ws, w_star):
                        torch.sub(p_, s_, out=t_)
                    torch._foreach_mul_(ts, gamma)
                    torch._foreach_add_(ts, gs, alpha=nbeta)
                    torch._foreach_add_(ws, ts, alpha=-0.5 * eps)
                    for t_ in ts:
                        t_.normal_(generator=gen)
                    torch._foreach_add_(ws, ts, alpha=math.sqrt(eps))
        L = torch.stack(losses).double().cpu()  # (draws, chains): the one host sync
        L0 = torch.stack(inits).double().cpu()  # (draws,)
        half = num_draws // 2
        if protocol == "authors":
            running = L.cumsum(0) / torch.arange(1, num_draws + 1, dtype=L.dtype)[:, None]
            llc = float(nbeta * (running[half:] - L0[0]).mean())
        else:
            llc = float(nbeta * (L[half:] - L0[half:, None]).mean())
        return {"llc": llc, "losses": L, "init_losses": L0} if details else llc
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m in sparse:
            m.sparse = True


def llc_diagnostics(L, L0, nbeta, trace_points=50):
    """Trace and calibration checks of an SGLD run (devinterp's guide), from estimate_llc's details: L (draws,
    chains) sampled losses, L0 (draws,) L(w*). loss_trace: per chain, `trace_points` block means of the
    sampled loss; init_trace: the same for L(w*); frac_below_init: share of draws whose loss fell below
    L(w*); drift / noise / flat: the change of nbeta * (L(w) - L(w*)) across the second half along a fitted
    line, mean over chains; its standard error from the spread between chains; flat unless the drift is
    significant at 5% (the trace stopped rising)."""
    T = L.shape[0]
    k = max(1, T // trace_points)

    def blocks(v):  # means of consecutive blocks of k draws (the tail that does not fill a block dropped)
        n = (len(v) // k) * k
        return v[:n].reshape(-1, k, *v.shape[1:]).mean(1)

    # did the trace stop rising? Each chain's own LLC signal nbeta * (L(w) - L(w*)) over the second half gets a
    # least-squares line; its change across that window is the chain's drift. Chains are independent, so the
    # spread of their drifts is an honest noise level however autocorrelated the draws: flat unless the mean
    # drift is significant at 5% (Student t over chains).
    sig = nbeta * (L - L0[:, None])[T // 2:]
    drift, noise, flat = None, None, None
    if len(sig) >= 3 and L.shape[1] >= 2:
        xs = torch.arange(len(sig), dtype=sig.dtype)
        xs = xs - xs.mean()
        per_chain = (xs[:, None] * (sig - sig.mean(0))).sum(0) / (xs ** 2).sum() * (len(sig) - 1)
        drift, noise = float(per_chain.mean()), float(per_chain.std() / math.sqrt(len(per_chain)))
        flat = bool(abs(drift) <= common.t_quantile(0.975, len(per_chain) - 1) * noise)
    return {"loss_trace": blocks(L).T.tolist(), "init_trace": blocks(L0).tolist(), "draws_per_point": k,
            "frac_below_init": float((L < L0[:, None]).double().mean()),
            "drift": drift, "noise": noise, "flat": flat}

# ----------------------------------------------------------------------------------------------------
# data: everything resident on the device, batches reproducible from (seed, epoch, index)


def _generator(*keys):
    g, s = torch.Generator(), 0
    for k in keys:
        s = (s * 1_000_003 + k + 1) % 2**63
    return g.manual_seed(s)


class TextBatches:
    """IMDB token sequences as EmbeddingBag input: x = (tokens, offsets). Same contract as GPUBatches:
    train batches shuffled by (seed, epoch), rank r of world takes rows r::world; eval keeps order.
    An epoch's tokens are gathered on the host and copied to the device once, so a step does neither."""

    def __init__(self, seqs, labels, batch_size, *, train, device, seed=0, rank=0, world_size=1):
        common.check(batch_size % world_size == 0,
                     f"--batch-size {batch_size} must divide by the {world_size} processes")
        self.lengths = torch.tensor([len(s) for s in seqs])
        self.tokens, self.starts = torch.cat(seqs), self.lengths.cumsum(0) - self.lengths  # reviews back to back
        self.y, self.bs, self.train, self.device, self.seed = labels, batch_size, train, torch.device(device), seed
        self.rank, self.world = rank, world_size

    def __len__(self):
        n = len(self.lengths)
        return n // self.bs if self.train else math.ceil(n / self.bs)

    def __iter__(self):
        return self.epoch(0)

    def epoch(self, epoch, start=0):
        n = len(self.lengths)
        order = torch.randperm(n, generator=_generator(self.seed, epoch)) if self.train else torch.arange(n)
        rows = [order[i * self.bs:(i + 1) * self.bs][self.rank::self.world] for i in range(start, len(self))]
        if not rows:
            return
        idx = torch.cat(rows)  # this rank's reviews for the rest of the epoch, in order
        lens = self.lengths[idx]
        ends = lens.cumsum(0)
        offsets = ends - lens  # where each review begins in this epoch's token stream
        # stream position k inside review j reads self.tokens[self.starts[j] + k - offsets[j]]
        pos = torch.repeat_interleave(self.starts[idx] - offsets, lens) + torch.arange(int(ends[-1]))
        tokens, offsets, y = self.tokens[pos].to(self.device), offsets.to(self.device), self.y[idx].to(self.device)
        bounds, r = [0] + ends.tolist(), 0
        for b in rows:
            t0, t1 = bounds[r], bounds[r + len(b)]
            yield (tokens[t0:t1], offsets[r:r + len(b)] - t0), y[r:r + len(b)]
            r += len(b)


class AffineBatches:
    """GPUBatches plus the paper's CIFAR augmentation RandomAffine(15 deg, translate 0.1) on the device,
    drawn per (seed, epoch, batch) for the global batch, so resumes and ranks see what one process would."""

    def __init__(self, batches, mean, std, degrees=15.0, translate=0.1):
        self.b, self.degrees, self.translate = batches, degrees, translate
        self.fill = (-torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1).to(batches.device)  # raw black

    def __len__(self):
        return len(self.b)

    def __iter__(self):
        return self.epoch(0)

    def _theta(self, epoch, i):
        g = _generator(self.b.seed, epoch, i, 7)
        ang = (torch.rand(self.b.bs, generator=g) * 2 - 1) * math.radians(self.degrees)
        shift = (torch.rand(self.b.bs, 2, generator=g) * 2 - 1) * 2 * self.translate  # grid units span 2
        ang, shift = ang[self.b.rank::self.b.world], shift[self.b.rank::self.b.world]
        cos, sin = ang.cos(), ang.sin()
        return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)

    def epoch(self, epoch, start=0):
        if start >= len(self):
            return
        # the epoch's affine matrices drawn up front and copied once: no host-to-device copy per step
        thetas = torch.stack([self._theta(epoch, i) for i in range(start, len(self))]).to(self.b.device)
        for theta, (x, y) in zip(thetas, self.b.epoch(epoch, start)):
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x - self.fill, grid, mode="nearest", padding_mode="zeros", align_corners=False)
            x = x + self.fill
            yield (x.contiguous(memory_format=torch.channels_last) if self.b.channels_last else x), y


def input_stats(cfg, dataset):
    """The (mean, std) a run normalised its images with: Normalize(0.5, 0.5) as the authors, or the data
    set's statistics under --normalize dataset (probe.py reads it, so probes see what training saw)."""
    mean, std = common.DATASET_STATS[dataset]
    if cfg.get("normalize", "paper") == "paper":
        return (0.5,) * len(mean), (0.5,) * len(std)
    return mean, std


class Data:
    """Train / test / SGLD batches for one task, the tensors loaded once onto the device."""

    def __init__(self, args, d):
        self.args, self.d, dl = args, d, not args.no_download

        def cut(x, y, n, flag):  # a fixed random subset (IMDB's files are sorted by label), in the data set's order
            if not n:
                return x, y
            common.check(n <= len(y), f"{flag} {n} is larger than the split's {len(y)} examples: lower it or "
                                      "drop it (0 = all)")
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n].sort().values
            return [x[i] for i in idx.tolist()] if isinstance(x, list) else x[idx], y[idx]
        if args.task == "imdb":
            imdb = common.load_imdb(args.data_dir, vocab_size=args.vocab_size or 10**9, download=dl)
            args.num_tokens = len(imdb.vocab)
            self.train_xy = cut(imdb.train_x, imdb.train_y, args.train_subset, "--train-subset")
            self.test_xy = cut(imdb.test_x, imdb.test_y, args.test_subset, "--test-subset")
        else:
            self.mean, self.std = input_stats(vars(args), args.dataset)  # the choice sets the weight-width scale
            x, y = common.load_dataset(args.dataset, args.data_dir, train=True, download=dl)
            self.train_xy = tuple(t.to(d.device) for t in cut(x, y, args.train_subset, "--train-subset"))
            x, y = common.load_dataset(args.dataset, args.data_dir, train=False, download=dl)
            self.test_xy = tuple(t.to(d.device) for t in cut(x, y, args.test_subset, "--test-subset"))
        n = len(self.train_xy[1])
        for flag in ("batch_size", "sgld_batch"):
            common.check(getattr(args, flag) <= n, f"--{flag.replace('_', '-')} {getattr(args, flag)} is larger than "
                                                   f"the {n} training examples: lower it")

    def _batches(self, xy, bs, train, seed, rank, world, augment=False):
        if self.args.task == "imdb":
            return TextBatches(*xy, bs, train=train, device=self.d.device, seed=seed, rank=rank, world_size=world)
        b = common.GPUBatches(*xy, bs, train=train, device=self.d.device, mean=self.mean, std=self.std, pad=0,
                              flip=augment, seed=seed, rank=rank, world_size=world,
                              channels_last=self.args.task == "cifar10" and self.d.device.type == "cuda")
        return AffineBatches(b, self.mean, self.std) if augment else b

    def train(self, seed):
        return self._batches(self.train_xy, self.args.batch_size, True, seed, self.d.rank, self.d.world_size,
                             augment=self.args.task == "cifar10")

    def test(self):
        return self._batches(self.test_xy, self.args.eval_batch, False, 0, self.d.rank, self.d.world_size)

    def sgld(self, seed):
        """Shuffled training batches of --sgld-batch, whole on every rank: un-augmented, or augmented as in
        training under --llc-protocol authors (their SGLD read the training loader)."""
        aug = self.args.llc_protocol == "authors" and self.args.task == "cifar10"
        return self._batches(self.train_xy, self.args.sgld_batch, True, seed + 10**6, 0, 1, augment=aug)

# ----------------------------------------------------------------------------------------------------
# training one (AW, seed) cell of the sweep


class RowSparseSGD(torch.optim.Optimizer):
    """torch.optim.SGD's update (momentum, Nesterov; no dampening or weight decay) that also takes row-sparse
    gradients, as an EmbeddingBag(sparse=True) gives, without making them dense:
        buf <- momentum * buf + g;   w <- w - lr * (g + momentum * buf)  (Nesterov)  or  w - lr * buf.
    A step of IMDB's model touches ~15k of ~100k embedding rows; the dense gradient's zero-fill and the
    fused update over all rows were most of a CPU step (12 -> 8 ms). Same arithmetic as SGD (tested)."""

    def __init__(self, params, lr, momentum=0.0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.coalesce() if p.grad.is_sparse else p.grad
                if g.is_sparse:  # add g to a dense tensor: only its rows are touched
                    add = lambda t, alpha, g=g: t.index_add_(0, g.indices()[0], g.values(), alpha=alpha)
                else:
                    add = lambda t, alpha, g=g: t.add_(g, alpha=alpha)
                if mu == 0:
                    add(p, -lr)
                    continue
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"]
                add(buf.mul_(mu), 1.0)
                if group["nesterov"]:
                    add(p.add_(buf, alpha=-lr * mu), -lr)
                else:
                    p.add_(buf, alpha=-lr)


def make_optimizer(cfg, model, device):
    if any(getattr(m, "sparse", False) for m in model.modules()):
        return RowSparseSGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["momentum"] > 0)
    # fused kernels: one pass over the weights per step (on the CPU too, where this torch has them)
    fused = {"fused": True} if device.type == "cuda" or fused_on_cpu() else {}
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg["lr"], **fused)
    return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                           nesterov=cfg["momentum"] > 0, **fused)


def fused_on_cpu():
    try:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


@torch.no_grad()
def evaluate(model, batches, device, amp):
    """{test_acc: % of the class logits right, dead_units, active_frac}, gathered over all ranks. The last two say
    how much of the ReLU layer feeding the class rows (MNIST's and IMDB's hidden, CIFAR-10's 2000-d) the test set
    uses: units positive on no test example (a unit silent on all data leaves its weights, in and out, without
    effect on the loss, which the RLCT counts as missing parameters) and the mean share positive per example."""
    net = common.unwrap(model)
    was = net.training
    net.eval()
    sums = torch.zeros(3, device=device)  # right, examples, (example, unit) pairs positive
    fired = torch.zeros(net.head.in_features, device=device)  # per unit: the test examples it is positive on
    for x, y in batches:
        with amp:
            h = net.body(x)
            pred = net.head(h).argmax(1)
        on = h > 0
        fired += on.sum(0)
        sums[0] += (pred == y).sum()
        sums[1] += len(y)  # a python number: no host-to-device copy per batch
        sums[2] += on.sum()
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(fired)
    net.train(was)
    return {"test_acc": (100.0 * sums[0] / sums[1]).item(), "dead_units": int((fired == 0).sum()),
            "active_frac": (sums[2] / (sums[1] * len(fired))).item()}


def llc_of(model, data, cfg, seed, eps=None, gamma=None):
    """The RLCT estimate of a trained cell with its trace and checks: {llc, **llc_diagnostics}."""
    ce = lambda out, y: F.cross_entropy(out.float(), y)
    d = estimate_llc(common.unwrap(model).classifier(), ce, data.sgld(seed),
                     eps=cfg["sgld_eps"] if eps is None else eps, gamma=cfg["sgld_gamma"] if gamma is None else gamma,
                     nbeta=cfg["sgld_nbeta"], num_chains=cfg["sgld_chains"], num_draws=cfg["sgld_draws"],
                     seed=seed, protocol=cfg.get("llc_protocol", "ours"), details=True)
    return {"llc": d["llc"], **llc_diagnostics(d["losses"], d["init_losses"], cfg["sgld_nbeta"])}


def grid_key(eps, gamma):
    return f"eps={eps:g},gamma={gamma:g}"


def rescales(cfg):
    """--llc-rescale as floats; configs from before the flag: none."""
    s = cfg.get("llc_rescale", "")
    return [float(c) for c in s.split(",")] if s else []


def rescaled(model, c):
    """A copy of the classification network whose hidden layer (the Linear before the ReLU) is scaled by c > 0 and
    whose class rows are scaled by 1/c. ReLU is positively homogeneous, so it computes the same function to
    rounding; only the parametrisation moves, and with it the width (x 1/c) and what SGLD at a fixed eps and
    gamma sees. The paper's two measures are not invariant under this symmetry; --llc-rescale measures how much."""
    net = copy.deepcopy(common.unwrap(model))
    with torch.no_grad():
        net.body.fc.weight.mul_(c)
        net.body.fc.bias.mul_(c)
        net.head.weight.div_(c)
    return net


class Sweep:
    """The AW x seeds sweep: finished cells, the checkpoint, the log."""

    def __init__(self, args, d, data, ck):
        self.args, self.cfg, self.d, self.data = args, vars(args), d, data
        self.path = os.path.join(args.out, "ckpt.pt")
        self.done = dict(ck["done"]) if ck else {}
        self.ck = ck
        self.cells = [(aw, args.seed + s) for aw in parse_aws(self.cfg) for s in range(args.seeds)]
        self.flops = {}
        self.cell_seconds = []  # wall time of each cell finished in this process: the sweep's ETA
        self.log = common.file_logger(args.out, d.is_main)  # terminal (above the tqdm bar) and OUT/log.txt
        self.prior_seconds = ck.get("train_seconds", 0.0) if ck else 0.0  # cells' time in earlier processes
        self.t_work, self.t_main = None, time.time()  # main() sets t_main to its own start
        self.cell_prior, self.t_cell = 0.0, time.time()  # the running cell's training time: earlier processes, start

    def train_seconds(self):
        """Time spent in the cells (training, evaluation, RLCT), summed over this and earlier processes."""
        return self.prior_seconds + (time.time() - self.t_work if self.t_work else 0.0)

    def eta(self, ci, cell_left_s, cell_train_s):
        """Seconds left in the sweep: this cell's remaining training plus the cells after it, each taking the
        mean wall time of the cells finished so far (before that, this cell's projected training time, which
        leaves out the RLCT: a lower bound)."""
        todo = sum(cell_key(aw, seed) not in self.done for aw, seed in self.cells[ci + 1:])
        per_cell = sum(self.cell_seconds) / len(self.cell_seconds) if self.cell_seconds else None
        return cell_left_s + todo * (per_cell or cell_train_s), per_cell is not None

    def save(self, model, opt, aw, seed, running, epoch=0, batch=0, step=0, history=()):
        if not self.d.is_main:
            return
        net = common.unwrap(model)
        common.save_checkpoint(self.path, {
            "script": SCRIPT, "config": {**self.cfg, "model_aw": aw, "model_seed": seed},
            "model": net.state_dict(), "optimizer": opt.state_dict() if running else None,
            "cell": [aw, seed] if running else None, "epoch": epoch, "batch": batch, "step": step,
            "history": list(history), "done": self.done, "rng": torch.get_rng_state(),
            "train_seconds": self.train_seconds(),
            "cell_seconds": self.cell_prior + time.time() - self.t_cell if running else 0.0})

    def write_results(self, final=False):
        if self.d.is_main:
            metrics = {"table": summarise(self.done, self.cfg), "runs": self.done, "finished": final}
            common.write_results(self.args.out, SCRIPT, self.cfg, metrics, time.time() - self.t_main, self.d.device,
                                 train_seconds=self.train_seconds())

    def run_cell(self, ci, aw, seed, stop, self_model=None):
        """Train one cell; returns its metrics, or None when a stop was requested (checkpoint written).
        `self_model` forces the widened network (tests: AW = 0 with the extra rows must equal plain)."""
        args, cfg, d = self.args, self.cfg, self.d
        dev = d.device
        peak = common.peak_flops(dev)  # for the log lines' MFU
        arch = aw > 0 if self_model is None else self_model
        torch.manual_seed(seed)
        model = build_model(cfg, self_model=arch).to(dev)
        if args.task == "cifar10" and dev.type == "cuda":  # channels_last helps cuDNN, slows the CPU down
            model = model.to(memory_format=torch.channels_last)
        if args.task == "imdb" and dev.type == "cpu" and d.world_size == 1:
            model.body.emb.sparse = True  # row-sparse gradients and RowSparseSGD: 1.6x faster CPU steps
        opt = make_optimizer(cfg, model, dev)
        batches = self.data.train(seed)
        per_epoch = len(batches)
        total = args.epochs * per_epoch
        epoch, start, step, history, self.cell_prior = 0, 0, 0, [], 0.0
        if self.ck is not None and self.ck.get("cell") == [aw, seed]:  # continue the interrupted cell exactly
            common.unwrap(model).load_state_dict(self.ck["model"])
            opt.load_state_dict(self.ck["optimizer"])
            epoch, start, step, history = self.ck["epoch"], self.ck["batch"], self.ck["step"], self.ck["history"]
            self.cell_prior = self.ck.get("cell_seconds", 0.0)  # this cell's training time in earlier processes
            torch.set_rng_state(self.ck["rng"])
            self.log(f"resumed aw {aw:g} seed {seed} at step {step}/{total}")
        self.ck = None
        if arch not in self.flops:
            self.flops[arch] = self.count_flops(model, batches, aw)
        train_model = torch.compile(model) if args.compile else model
        if d.world_size > 1:
            ids = [dev.index] if dev.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=ids)
        model.train()
        t_cell, t_log, n_log, last_save, step0 = time.time(), time.time(), 0, time.time(), step
        self.t_cell = t_cell
        loss = None
        for ep in range(epoch, args.epochs):
            for i, (x, y) in enumerate(batches.epoch(ep, start), start):
                gstep = ci * total + step
                if stop.requested(gstep):
                    self.guard(model, loss, gstep)
                    self.stopped_at = gstep
                    self.save(model, opt, aw, seed, True, ep, i, step, history)
                    return None
                with self.amp():
                    loss, ce, mse = loss_parts(train_model, x, y, aw)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step, n_log = step + 1, n_log + 1
                if dev.type == "cpu" and d.world_size == 1:
                    common.nan_guard(loss.item(), gstep, self.path)  # free on the CPU; GPUs check at log steps
                if step % args.log_every == 0 or step == total:
                    vals = torch.stack([loss.detach(), ce.detach(), mse.detach()]).float()
                    if d.world_size > 1:
                        dist.all_reduce(vals)
                        vals /= d.world_size
                    l, c, m = vals.tolist()
                    common.nan_guard(l, gstep, self.path)
                    common.sync(dev)
                    dt = time.time() - t_log
                    ips = n_log * args.batch_size / dt
                    mfu = common.mfu(self.flops[arch] * n_log / dt, peak)
                    mfu = f"{100 * mfu:.1f}%" if mfu else "-"
                    history.append([step, l])
                    per_step = (time.time() - t_cell) / (step - step0)
                    cell_left = per_step * (total - step)
                    sweep_left, measured = self.eta(ci, cell_left, per_step * total)
                    # mse in significant digits: a strong self-model drives it below 1e-5 (IMDB hidden, AW 500)
                    self.log(f"aw {aw:g} seed {seed} | ep {ep} | step {step}/{total} | loss {l:.4f} "
                             f"(ce {c:.4f} mse {m:.3g}) | {ips:,.0f} ex/s | mfu {mfu} | cell eta "
                             f"{common.hms(cell_left)} | sweep eta {'' if measured else '>'}{common.hms(sweep_left)}")
                    t_log, n_log = time.time(), 0
            start = 0
            if time.time() - last_save >= args.ckpt_interval and ep + 1 < args.epochs:
                self.guard(model, loss, ci * total + step)
                self.save(model, opt, aw, seed, True, ep + 1, 0, step, history)
                last_save = time.time()
        self.guard(model, loss, ci * total + step)
        common.sync(dev)
        train_s = self.cell_prior + time.time() - t_cell  # the cell's whole training, resumed or not
        units = evaluate(model, self.data.test(), dev, self.amp())
        acc = units.pop("test_acc")
        t = time.time()
        est = llc_of(model, self.data, cfg, seed)
        grid = {grid_key(e, g): llc_of(model, self.data, cfg, seed, e, g) for e, g in cfg["llc_grid"]}
        scaled = {}
        for c in rescales(cfg):  # one rescaled copy at a time
            m = rescaled(model, c)
            scaled[f"c={c:g}"] = {"width": weight_widths(m)["width"], **llc_of(m, self.data, cfg, seed)}
        common.sync(dev)
        llc = est.pop("llc")
        trace = {k: est.pop(k) for k in ("loss_trace", "init_trace", "draws_per_point")}
        res = {"aw": aw, "seed": seed, "test_acc": acc, **weight_widths(model), **units, "llc": llc, "llc_check": est,
               "final_loss": history[-1][1] if history else None, "steps": step,
               "train_seconds": round(train_s, 2), "llc_seconds": round(time.time() - t, 2), "loss_curve": history,
               "llc_trace": trace, **({"llc_grid": grid} if grid else {}),
               **({"llc_rescale": scaled} if scaled else {})}
        self.done[cell_key(aw, seed)] = res
        self.save(model, opt, aw, seed, False, args.epochs, 0, step, history)
        self.log(f"aw {aw:g} seed {seed}: test acc {acc:.2f}% | width {res['width']:.4f} | "
                 f"width(all) {res['width_all']:.4f} | dead units {units['dead_units']}/{cfg['hidden']}, "
                 f"{100 * units['active_frac']:.1f}% active | RLCT {llc:.2f} ({FLAT[est['flat']]}, "
                 f"{100 * est['frac_below_init']:.0f}% of draws below L(w*)) | train {train_s:.1f}s | "
                 f"RLCT {time.time() - t:.1f}s")
        return res

    def amp(self):
        # bf16 only for the ResNet: the MLP and the bag-of-words model are launch-bound, bf16 buys nothing there
        return common.autocast(self.d.device) if self.args.task == "cifar10" else nullcontext()

    def guard(self, model, loss, gstep):
        """Before a checkpoint: the last loss and every weight finite on all ranks, or stop with nan_guard's
        message (a finite loss can still end in an overflowing step), so a good checkpoint is never replaced."""
        if loss is None:
            return
        finite = [loss.detach().float().isfinite()] + [p.isfinite().all() for p in model.parameters()]
        ok = torch.stack(finite).all().float()
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            common.nan_guard(loss.item() if not math.isfinite(loss.item()) else float("nan"), gstep, self.path)

    def count_flops(self, model, batches, aw):
        x, y = next(iter(batches))
        m = copy.deepcopy(common.unwrap(model))  # a copy: BatchNorm statistics and grads stay untouched
        with self.amp():
            return common.count_flops(lambda: loss_parts(m, x, y, aw)[0].backward())  # per rank and step


def fmt_aw(a):
    return f"{a:g}" if float(f"{a:g}") == a else repr(a)


def cell_key(aw, seed):
    return f"aw={fmt_aw(aw)},seed={seed}"


METRICS = ("test_acc", "width", "width_all", "llc")
UNITS = ("dead_units", "active_frac")  # of the layer feeding the class rows (evaluate); runs before them have none
FLAT = {True: "trace flat", False: "trace still moving", None: "trace check needs 2 chains"}


def collapsed(run, cfg):
    """A run that ends at chance: test accuracy within 10 points of 100 / classes (a dead hidden layer: a large
    AW can drive every ReLU to zero, where the self-model's target is 0 and predicting it is free)."""
    return run["test_acc"] < 100 / common.NUM_CLASSES.get(cfg.get("dataset"), 10) + 10


def trends(runs):
    out = {}
    if len({r["aw"] for r in runs}) > 1:
        for k in METRICS:
            rho, p = common.spearman([r["aw"] for r in runs], [r[k] for r in runs])
            out[k] = {"spearman": rho, "p": p, "n": len(runs)}
    return out


def summarise(done, cfg):
    """One row per AW: mean, std and 95% Student-t interval over the finished seeds, the share of RLCT traces
    that flattened and the runs that collapsed to chance; then the trend of every metric in AW (Spearman over
    the per-seed values with a permutation p-value), over all runs and over the runs that learned; and, for a
    calibration grid, the RLCT per AW and (eps, gamma)."""
    rows = []
    for aw in parse_aws(cfg):
        runs = [r for r in done.values() if r["aw"] == aw]
        if not runs:
            continue
        row = {"aw": aw, "n": len(runs)}
        for k in METRICS:
            st = common.mean_ci([r[k] for r in runs])
            row.update({f"{k}_mean": st["mean"], f"{k}_std": st["std"], f"{k}_ci95": st["ci95"]})
        for k in UNITS:
            if all(k in r for r in runs):
                st = common.mean_ci([r[k] for r in runs])
                row.update({f"{k}_mean": st["mean"], f"{k}_ci95": st["ci95"]})
        row["llc_flat"] = sum(bool(r.get("llc_check", {}).get("flat")) for r in runs)
        row["collapsed"] = sum(collapsed(r, cfg) for r in runs)
        for extra in ("llc_grid", "llc_rescale"):  # the calibration estimates (a rescaled one also has a width)
            for key, first in runs[0].get(extra, {}).items():
                est = [r[extra][key] for r in runs]
                row.setdefault(extra, {})[key] = {**common.mean_ci([e["llc"] for e in est]),
                                                  "flat": sum(e["flat"] for e in est),
                                                  **({"width": sum(e["width"] for e in est) / len(est)}
                                                     if "width" in first else {})}
        rows.append(row)
    runs = list(done.values())
    return {"rows": rows, "trend": trends(runs), "trend_learned": trends([r for r in runs if not collapsed(r, cfg)])}


def pm(row, k, p):
    """A table row's mean +- 95% half width of metric k, p decimals (the mean alone for one seed)."""
    ci = row[k + "_ci95"]
    return f"{row[k + '_mean']:.{p}f} +- {ci:.{p}f}" if ci is not None else f"{row[k + '_mean']:.{p}f}"


def format_table(table, cfg):
    cols = (f"{'AW':>6} | {'n':>2} | {'test acc %':>15} | {'width (class rows)':>19} | {'width (all)':>19} | "
            f"{'RLCT':>15} | flat | collapsed")
    target = ",".join(target_names(cfg))
    target = "" if target == TASKS[cfg["task"]]["target"] else f", self-model of {target}"
    target += "" if aux_of(cfg) == AUX[0] else f", control {aux_of(cfg)}: AW * mean(target^2), no self-model"
    lines = [f"{cfg['task']} ({cfg['preset']}, hidden {cfg['hidden']}, {cfg['epochs']} epochs{target}): mean +- "
             "half width of the 95% interval over seeds (Student t)", cols, "-" * len(cols)]
    for r in table["rows"]:
        lines.append(f"{fmt_aw(r['aw']):>6} | {r['n']:>2} | {pm(r, 'test_acc', 2):>15} | {pm(r, 'width', 4):>19} | "
                     f"{pm(r, 'width_all', 4):>19} | {pm(r, 'llc', 2):>15} | {r['llc_flat']}/{r['n']}  | "
                     f"{r.get('collapsed', 0)}/{r['n']}")
    for name, key in (("", "trend"), (" (runs that learned)", "trend_learned")):
        for k, t in table.get(key, {}).items():
            if t["spearman"] is not None:
                lines.append(f"trend in AW of {k}{name}: Spearman {t['spearman']:+.2f} (permutation p = "
                             f"{t['p']:.4f}, {t['n']} runs)")
    for r in table["rows"]:
        if "dead_units_mean" in r:
            lines.append(f"units AW {fmt_aw(r['aw'])}: {pm(r, 'dead_units', 1)} of the {cfg['hidden']} feeding the "
                         f"class rows dead on the test set, {pm(r, 'active_frac', 3)} active per example")
        for key, g in r.get("llc_grid", {}).items():
            ci = f" +- {g['ci95']:.2f}" if g["ci95"] is not None else ""
            lines.append(f"calibration AW {fmt_aw(r['aw'])} {key}: RLCT {g['mean']:.2f}{ci} (flat {g['flat']}/{g['n']})")
        for key, g in r.get("llc_rescale", {}).items():
            ci = f" +- {g['ci95']:.2f}" if g["ci95"] is not None else ""
            lines.append(f"rescaled AW {fmt_aw(r['aw'])} hidden x {key[2:]}, class rows / {key[2:]}: width "
                         f"{g['width']:.4f}, RLCT {g['mean']:.2f}{ci} (flat {g['flat']}/{g['n']})")
    return "\n".join(lines)


def load_resume(path, args):
    ck = common.load_checkpoint(path)
    common.check(ck.get("script") == SCRIPT, f"{path} was written by {ck.get('script')!r}, not {SCRIPT}: "
                                             "point --out at a selfmodel run")
    common.check_resume_config(spelled_out(ck["config"]), vars(args), SAFE_ON_RESUME, path)
    return ck


def main(argv=None):
    t_main = time.time()
    common.git_commit()  # the code this run loaded, recorded before a long sweep
    args = get_args(argv)
    d = common.setup_distributed(args.device)
    try:
        sweep_main(args, d, t_main)
    finally:
        common.release_out_dirs()


def sweep_main(args, d, t_main):
    if args.task == "cifar10":  # before the output folder is claimed: a refused run leaves nothing behind
        common.check_cpu_compile_width(d, args.compile, args.width)
    common.rank0_first(common.claim_out_dir, args.out, args.resume)  # lock; refuse to overwrite a finished run
    common.warn_if_cpu(d, args.smoke)
    ck = load_resume(os.path.join(args.out, "ckpt.pt"), args) if args.resume else None
    data = Data(args, d)
    sweep = Sweep(args, d, data, ck)
    sweep.t_main = t_main
    stop = common.StopSignal(args.stop_at_step)
    sweep.log(f"selfmodel {args.task} on {common.device_name(d.device)} x{d.world_size}: AW {args.aw}, "
              f"{args.seeds} seed(s), out {args.out}")
    bar = tqdm(total=len(sweep.cells), initial=len(sweep.done), desc="AW x seed", dynamic_ncols=True,
               disable=not (d.is_main and sys.stderr.isatty()))
    for ci, (aw, seed) in enumerate(sweep.cells):
        if cell_key(aw, seed) in sweep.done:
            continue
        t_cell = time.time()
        sweep.t_work = sweep.t_work or t_cell
        if sweep.run_cell(ci, aw, seed, stop) is None:
            sweep.log(f"stopped at step {sweep.stopped_at} of the sweep (aw {aw:g} seed {seed}); "
                      f"checkpoint {sweep.path}; rerun with --resume to continue")
            bar.close()
            common.cleanup_distributed()
            return
        sweep.cell_seconds.append(time.time() - t_cell)
        sweep.write_results()
        bar.update(1)
    bar.close()
    sweep.write_results(final=True)
    sweep.log(format_table(summarise(sweep.done, sweep.cfg), sweep.cfg))
    sweep.log(f"done in {(time.time() - t_main) / 60:.1f} min; results {os.path.join(args.out, 'results.json')}")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
