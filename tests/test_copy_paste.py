"""The blocks the README offers for copy-pasting into another project: each script's marked section, pasted
alone into a fresh namespace under the imports a user would write, names nothing else (checked on the
source, so a dependency on the rest of its script or on common.py is caught even on a path no run takes)
and works on models that are not ours: torchvision's ResNet-18 gets rho-SIM, the pasted MAE and U-ViT
start as the scaled identities of the paper and learn, SelfModelNet widens a foreign body, and the pasted
RLCT estimator is the script's own."""
import ast, builtins, copy, math, os, re, symtable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT

# what a user puts above the pasted section
HEADER = ("import copy, math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
          "from torch.func import functional_call, grad, vmap\n")
# (script, first, last): every line from the first top-level definition to the end of the last one
UNITS = [("sim_cifar", "normalized_distance", "sim_loss"),
         ("mae_decay", "decay_schedule", "MAE"),
         ("diffusion_decay", "decay_schedule", "UViT"),
         ("selfmodel", "MLPBody", "SelfModelNet"),
         ("selfmodel", "estimate_llc", "estimate_llc")]


def section(script, first, last):
    src = open(os.path.join(ROOT, script + ".py")).read()
    body = ast.parse(src).body
    names = [getattr(n, "name", None) for n in body]
    a, b = body[names.index(first)], body[names.index(last)]
    start = min([a.lineno] + [d.lineno for d in a.decorator_list])
    return "\n".join(src.splitlines()[start - 1:b.end_lineno]) + "\n"


def free_names(code):
    """Names `code` reads that it neither defines nor imports, builtins left out."""
    top = symtable.symtable(code, "<pasted>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    free = set()

    def walk(t):  # a function's or class's read of a module-level name is a "global" symbol of its scope
        for s in t.get_symbols():
            if s.is_referenced() and (t.get_type() == "module" or s.is_global()):
                free.add(s.get_name())
        for c in t.get_children():
            walk(c)
    walk(top)
    return {n for n in free - bound if not hasattr(builtins, n)}


def paste(script, first, last):
    ns = {"__name__": f"pasted_{script}"}
    exec(compile(HEADER + section(script, first, last), f"<{script}.py, pasted>", "exec"), ns)
    return ns


def test_the_readme_names_these_sections():
    text = open(os.path.join(ROOT, "README.md")).read()
    part = text.split("## Copying a block into your project")[1].split("\n## ")[0]
    named = [(s, a, b or a) for s, a, b in re.findall(r"`(\w+)\.py`: `(\w+)`(?: \.\.\. `(\w+)`)?", part)]
    assert named == UNITS


def test_the_dependency_check_sees_what_a_paste_would_miss():
    code = "def f(x):\n    return common.unwrap(x)\n\nclass A(nn.Module):\n    def g(self):\n        return F.relu(h(1))\n"
    assert free_names(HEADER + code) == {"common", "h"}
    assert free_names(HEADER + "def h(y):\n    return len(y)\n\ndef f(x):\n    return h(x) + math.pi\n") == set()


@pytest.mark.parametrize("script,first,last", UNITS, ids=[f"{u[0]}:{u[1]}-{u[2]}" for u in UNITS])
def test_each_section_needs_only_the_usual_imports(script, first, last):
    code = section(script, first, last)
    assert free_names(HEADER + code) == set(), f"{script}.py {first}..{last} reads names it does not define"
    paste(script, first, last)  # and it runs as a module of its own


def smooth_images(n, size, seed=0):
    """Images a model can learn something of: random 4x4 colour fields, upsampled, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bilinear", align_corners=False)


def fit(model, loss_fn, steps=40, lr=2e-3):
    """Adam on one fixed batch: (first loss, last loss)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize("mode", ["rho", "full"])
def test_sim_pasted_wraps_torchvision_resnet18(mode):
    from torchvision.models import resnet18
    from torchvision.models.resnet import BasicBlock
    ns = paste("sim_cifar", "normalized_distance", "sim_loss")
    torch.manual_seed(0)
    net = resnet18(num_classes=10)
    ref = copy.deepcopy(net).eval()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])  # layer4 maps 2x2: rho keeps 2 of 4 tokens
    ns["add_sim"](net, BasicBlock, x[:2], mode=mode, rho=0.25, latent_dim=16)
    sims = [m for m in net.modules() if isinstance(m, ns["SIM"])]
    assert len(sims) == 8  # the 3 stride-2 blocks too
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), ref(x)) and all(m.loss is None for m in sims)  # free and exact at eval
    net.train()
    ce = F.cross_entropy(net(x), y)
    s = ns["sim_loss"](net)
    assert torch.isfinite(s) and s > 0 and all(m.loss is None for m in sims)  # collected and cleared
    (ce + 5e-3 * s).backward()
    for m in sims:
        own = [p for n, p in m.named_parameters() if not n.startswith("block.")]
        assert own and all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    assert net.conv1.weight.grad.abs().sum() > 0


def test_sim_pasted_refuses_a_single_token_block():
    """At 32 px torchvision's ResNet-18 (stride-2 stem and max-pool) ends at 1x1: no spread to standardise."""
    from torchvision.models import resnet18
    from torchvision.models.resnet import BasicBlock
    ns = paste("sim_cifar", "normalized_distance", "sim_loss")
    with pytest.raises(ValueError, match=r"layer4\.0 outputs \(512, 1, 1\), a single token"):
        ns["add_sim"](resnet18(num_classes=10), BasicBlock, torch.randn(2, 3, 32, 32), mode="rho")
    ns["add_sim"](resnet18(num_classes=10), BasicBlock, torch.randn(2, 3, 32, 32), mode="full")  # MSE: fine


def test_mae_pasted_starts_as_scaled_identities_and_learns():
    ns = paste("mae_decay", "decay_schedule", "MAE")
    torch.manual_seed(0)
    m = ns["MAE"](img_size=16, patch=4, dim=32, depth=4, heads=2, dec_dim=16, dec_depth=2, dec_heads=2, alpha_min=0.6)
    # a stack of one's own, as the README writes it, with the zero start it asks for: at step 0 the blocks
    # multiply their input by the product of the alphas; the pasted MAE's encoder does the same
    Block, schedule = ns["Block"], ns["decay_schedule"]
    stack = nn.Sequential(*(Block(32, 2, 4.0, alpha=schedule(4, 0.6)[l].tolist()) for l in range(4)))
    for blk in stack:
        for lin in (blk.attn.proj, blk.mlp.fc2):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
    tokens = torch.randn(3, 5, 32)
    prod = math.prod(torch.linspace(1.0, 0.6, 8).tolist())
    torch.testing.assert_close(stack(tokens), prod * tokens)
    torch.testing.assert_close(nn.Sequential(*m.blocks)(tokens), prod * tokens)
    for bad in (dict(img_size=18), dict(mask_ratio=0.0), dict(mask_ratio=0.99)):  # a loss over no patch: NaN
        with pytest.raises(ValueError, match="must be a multiple of patch 4, and mask_ratio"):
            ns["MAE"](**{**dict(img_size=16, patch=4, dim=32, depth=2, heads=2, dec_dim=16, dec_depth=1), **bad})
    imgs, noise = smooth_images(8, 16), torch.rand(8, 16, generator=torch.Generator().manual_seed(1))
    first, last = fit(m, lambda: m(imgs, noise)[0], steps=150)  # one fixed batch and mask: it can memorise
    assert last < 0.5 * first, (first, last)


def test_uvit_pasted_starts_at_zero_and_learns():
    ns = paste("diffusion_decay", "decay_schedule", "UViT")
    torch.manual_seed(0)
    m = ns["UViT"](img_size=8, patch=2, dim=32, depth=3, heads=2, alpha_min=0.7)
    alphas = [a for blk in m.blocks() for a in (blk.a_att, blk.a_mlp)]
    assert alphas == pytest.approx(torch.linspace(1.0, 0.7, 6).tolist())
    g = torch.Generator().manual_seed(1)
    x0, t = smooth_images(8, 8), torch.rand(8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    xt = (1 - t).sqrt().view(-1, 1, 1, 1) * x0 + t.sqrt().view(-1, 1, 1, 1) * eps  # any noising will do here
    assert torch.count_nonzero(m(xt, t)) == 0  # zero-initialised head: eps = 0 at step 0
    feats = m(xt, t, feature_layers=[1, 3])
    assert sorted(feats) == [1, 3] and all(f.shape == (8, 32) for f in feats.values())
    first, last = fit(m, lambda: F.mse_loss(m(xt, t), eps))
    assert last < 0.7 * first, (first, last)


def test_selfmodelnet_pasted_widens_a_foreign_body():
    ns = paste("selfmodel", "MLPBody", "SelfModelNet")

    class Body(nn.Module):  # two hidden layers, both self-modelled
        def __init__(self):
            super().__init__()
            self.l1, self.a1, self.l2, self.a2 = nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh()
            self.targets = [self.a1, self.a2]

        def forward(self, x):
            return self.a2(self.l2(self.a1(self.l1(x))))

    torch.manual_seed(0)
    body = Body()
    net = ns["SelfModelNet"](body, 4, 3, 5 + 4, self_model=True)
    x = torch.randn(7, 6)
    out, target = net(x)
    h1 = body.a1(body.l1(x))
    h2 = body.a2(body.l2(h1))
    assert out.shape == (7, 3 + 9) and not target.requires_grad  # the self-model chases, never pulls
    torch.testing.assert_close(target, torch.cat([h1, h2], 1))
    torch.testing.assert_close(out, torch.cat([net.head(h2), net.self_head(h2)], 1))
    torch.testing.assert_close(net.classify(x), out[:, :3])
    logits, none = ns["SelfModelNet"](Body(), 4, 3, 9, self_model=False)(x)
    assert logits.shape == (7, 3) and none is None
    with pytest.raises(ValueError, match="body.targets must list the modules"):
        ns["SelfModelNet"](nn.Sequential(nn.Linear(6, 4), nn.ReLU()), 4, 3, 4, self_model=True)


def test_estimate_llc_pasted_is_the_scripts_estimator():
    import selfmodel as S
    ns = paste("selfmodel", "estimate_llc", "estimate_llc")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 8, generator=g)
    y = X @ torch.randn(8, 1, generator=g) + torch.randn(2000, 1, generator=g)
    model = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y).solution.T)
    half_mse = lambda out, y: 0.5 * ((out - y) ** 2).mean()
    kw = dict(eps=3e-4, gamma=1.0, nbeta=2000 / math.log(2000), num_chains=4, num_draws=600, seed=0)
    llc = ns["estimate_llc"](model, half_mse, [(X, y)], **kw)
    assert llc == S.estimate_llc(model, half_mse, [(X, y)], **kw)
    assert abs(llc - 8 / 2) < 1.0, llc  # a regular model: half its dimension
    with pytest.raises(ValueError, match="protocol 'devinterp'"):
        ns["estimate_llc"](model, half_mse, [(X, y)], **kw, protocol="devinterp")
