"""GPU checks. On a new GPU machine run these first, before any long run:

    python -m pytest -q tests/test_gpu.py        # a few minutes on an H100
    python -m pytest -q -n 5 tests/test_gpu.py   # independent tests: pytest-xdist runs them side by side

Without CUDA every test here is skipped (the CPU suite covers the rest). They read the real CIFAR-10 where it
is found (DATA_DIR or ../shared/data), else a generated folder of the same format, so a new machine runs them
before its data has arrived. For each script (sim_cifar, mae_decay, diffusion_decay, selfmodel), at its real
default model size on a small CIFAR-10 subset:
  - its own command line runs a few steps on the GPU (bf16 autocast, TF32, channels_last for the
    convolutional models, fused optimizer), stops with a checkpoint (--stop-at-step, as on SIGTERM),
    resumes on the GPU under torch.compile (the reproductions' setting) and finishes with its evaluation
    and results.json;
  - the checkpoint written on the GPU loads on the CPU (map_location), holds the fused optimizer's state,
    and a CPU model rebuilt from it takes a finite training step;
  - the bf16 forward of those weights on the GPU is close to the fp32 forward (GPU without TF32, CPU).
Also: common.GPUBatches on CUDA yields exactly the CPU batches, and DDP on one process (a 1-rank process
group on a free local port) gives the plain model's gradients.
"""
import copy, json, math, os, shutil, signal, socket

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import diffusion_decay as DD
import mae_decay as MAE
import selfmodel as SM
import sim_cifar as SIM
from conftest import _find_data_dir, save_fid_standin, tiny_cifar10

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: tests/test_gpu.py runs only on a GPU machine")
CPU = torch.device("cpu")
N_TRAIN = 4096


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The real CIFAR-10 where it is found, else a generated one of the same format: these tests check code paths
    (precision, layout, checkpoints), not accuracy, so a GPU machine runs them before its data has arrived."""
    real = _find_data_dir()
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if real and all(os.path.isfile(os.path.join(real, "cifar10", "cifar-10-batches-py", f)) for f in files):
        return real
    return tiny_cifar10(tmp_path_factory.mktemp("gpu_data"), n_train=N_TRAIN + 4, n_test=1000)


@pytest.fixture(scope="module")
def cifar(data_dir):
    """The first N_TRAIN training images and 1000 test images of CIFAR-10 (uint8 on the CPU)."""
    tx, ty = common.load_cifar10(data_dir, train=True)
    vx, vy = common.load_cifar10(data_dir, train=False)
    assert len(tx) >= N_TRAIN and len(vx) >= 1000
    return tx[:N_TRAIN], ty[:N_TRAIN], vx[:1000], vy[:1000]


@pytest.fixture(autouse=True)
def clean_state():
    """Each test leaves no process group, signal handler, thread count or cuDNN / TF32 flag behind."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(8, os.cpu_count() or 1))  # the CPU halves below run at a useful speed
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    for s, h in handlers.items():
        signal.signal(s, h)
    torch.set_num_threads(threads)
    if dist.is_initialized():
        dist.destroy_process_group()
    torch.cuda.empty_cache()


def gpu():
    return torch.device("cuda", torch.cuda.current_device())


def rel_err(a, b):
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def cifar_batch(cifar, n, device, channels_last=False, pm1=False):
    """n normalised training images (dataset statistics, or [-1, 1] with pm1) and labels, as the scripts feed them."""
    mean, std = ((0.5,) * 3, (0.5,) * 3) if pm1 else common.DATASET_STATS["cifar10"]
    b = common.GPUBatches(cifar[0][:n], cifar[1][:n], n, train=False, device=device, mean=mean, std=std,
                          channels_last=channels_last)
    return next(iter(b))


def fp32_on_gpu():
    """A context without TF32, so the GPU's fp32 forward is a true fp32 reference."""
    class Ctx:
        def __enter__(self):
            self.old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        def __exit__(self, *exc):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old
    return Ctx()


def check_checkpoint(path, build, forward, make_opt, loss_fn, inputs, *, channels_last=False, bf16_tol=0.05):
    """The GPU-written checkpoint at `path`: loads on the CPU with every tensor there and the fused optimizer's
    state; a CPU model rebuilt from it takes one finite step that moves its weights; and the GPU's bf16
    forward of the same weights is close to fp32 (on the GPU without TF32, and on the CPU)."""
    ck = common.load_checkpoint(path)  # map_location="cpu"
    assert all(t.device.type == "cpu" for t in ck["model"].values())
    groups = ck["optimizer"]["param_groups"]
    assert all(g.get("fused") for g in groups), "the GPU run should use the fused optimizer"

    net = build(ck["config"])
    net.load_state_dict(ck["model"])
    x_cpu = [t.to(CPU) if torch.is_tensor(t) else t for t in inputs]
    x_gpu = [t.to(gpu()) if torch.is_tensor(t) else t for t in inputs]
    if channels_last:
        x_gpu[0] = x_gpu[0].contiguous(memory_format=torch.channels_last)

    # the same weights on the GPU: bf16 autocast vs fp32
    net_gpu = copy.deepcopy(net).to(gpu()).eval()
    if channels_last:
        net_gpu = net_gpu.to(memory_format=torch.channels_last)
    net.eval()
    with torch.no_grad():
        ref = forward(net, *x_cpu)
        with fp32_on_gpu():
            out32 = forward(net_gpu, *x_gpu)
        with common.autocast(gpu()):
            out16 = forward(net_gpu, *x_gpu)
    assert torch.isfinite(out16.float()).all() and torch.isfinite(ref).all()
    assert rel_err(out32, ref) < 1e-3, "fp32 on the GPU differs from the CPU"
    e16 = rel_err(out16, ref)
    assert e16 < bf16_tol, f"bf16 forward is {e16:.3g} (relative) away from fp32"
    assert e16 > 0, "autocast did not change the precision: is bf16 autocast active on this GPU?"

    # resume on the CPU: optimizer state from the GPU run, one step
    net.train()
    opt = make_opt(net, ck["config"])
    opt.load_state_dict(ck["optimizer"])
    for g in opt.param_groups:
        g["lr"] = max(g["lr"], 1e-4)
    before = [p.detach().clone() for p in net.parameters()]
    loss = loss_fn(net, ck["config"], *x_cpu)
    assert math.isfinite(loss.item())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters())), "the CPU step changed nothing"
    return ck


def run_gpu_then_resume(main, argv, ckpt, stop_at):
    """`main(argv)` on the GPU, eager, until --stop-at-step (checkpoint written, as on SIGTERM); keep a copy of
    that checkpoint; then the same command plus --resume --compile (the reproductions' setting) to the end.
    Returns the copy's path."""
    argv = [str(a) for a in argv]
    main(argv + ["--stop-at-step", str(stop_at)])
    assert os.path.isfile(ckpt), f"no checkpoint at {ckpt} after --stop-at-step {stop_at}"
    kept = f"{ckpt}.mid"
    shutil.copyfile(ckpt, kept)
    main(argv + ["--resume", "--compile"])
    return kept


def results(out):
    with open(os.path.join(out, "results.json")) as fh:
        r = json.load(fh)
    assert torch.cuda.get_device_name() in r["device"]
    return r


def finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)

# ----------------------------------------------------------------------------------------------------
# data on the GPU


def test_gpu_batches_equal_cpu_batches(cifar):
    """Same images (indices), crops and flips on CUDA as on the CPU, for train and eval, one rank or a shard."""
    x, y = cifar[0][:1000], cifar[1][:1000]
    mean, std = common.DATASET_STATS["cifar10"]
    for train in (True, False):
        for rank, world in ((0, 1), (1, 2)):
            kw = dict(train=train, mean=mean, std=std, pad=4, flip=True, seed=3, rank=rank, world_size=world)
            cpu_b = common.GPUBatches(x, y, 128, device="cpu", **kw)
            gpu_b = common.GPUBatches(x, y, 128, device=gpu(), channels_last=True, **kw)
            assert len(cpu_b) == len(gpu_b)
            for epoch, start in ((0, 0), (1, 0), (2, 3)):
                n = 0
                for (xc, yc), (xg, yg) in zip(cpu_b.epoch(epoch, start), gpu_b.epoch(epoch, start)):
                    assert xg.device.type == "cuda" and xg.is_contiguous(memory_format=torch.channels_last)
                    assert torch.equal(yg.cpu(), yc)
                    # one pixel step is ~0.016 here: equal to 1e-5 means the same image, crop and flip
                    torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-5)
                    n += 1
                assert n == len(cpu_b) - start

# ----------------------------------------------------------------------------------------------------
# DDP on one process


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_one_process_matches_plain_model(cifar):
    backend = "nccl" if dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    args = SIM.parse_args(["--device", "cuda", "--no-baseline"])
    cfg = dict(vars(args), sim="rho", seed=0, dataset="cifar10")
    d = common.Dist(0, 0, 1, gpu(), True)
    net = SIM.new_model(cfg, d)  # channels_last on the GPU, as in training
    plain = copy.deepcopy(net)
    model = DDP(net, device_ids=[d.device.index])
    x, y = cifar_batch(cifar, 256, gpu(), channels_last=True)
    losses = []
    with fp32_on_gpu():
        for m in (model, plain):
            torch.manual_seed(0)  # rho-SIM's token draw
            loss = SIM.training_loss(m, x, y, cfg)[0]
            loss.backward()
            losses.append(loss.item())
    assert finite(*losses) and abs(losses[0] - losses[1]) < 1e-2 * abs(losses[1])
    for (name, p), q in zip(net.named_parameters(), plain.parameters()):
        assert p.grad is not None and rel_err(p.grad, q.grad) < 2e-2, name
    dist.barrier()
    dist.destroy_process_group()

# ----------------------------------------------------------------------------------------------------
# the four scripts at their default model size


def test_sim_cifar_gpu(cifar, data_dir, tmp_path):
    out = tmp_path / "sim"
    argv = ["--device", "cuda", "--data-dir", data_dir, "--out", out, "--sim", "rho", "--no-baseline",
            "--train-subset", 2048, "--test-subset", 1000, "--epochs", 2, "--bench-steps", 2, "--log-every", 1]
    kept = run_gpu_then_resume(SIM.main, argv, out / "rho_seed0" / "ckpt.pt", 3)
    r = results(out)
    assert finite(*r["metrics"]["test_acc"]["rho"]) and r["metrics"]["runs"][0]["history"]["loss"]

    x, y = cifar_batch(cifar, 64, CPU)
    check_checkpoint(kept, SIM.build_model, lambda m, x, y: m(x), lambda m, cfg: SIM.make_optimizer(m, cfg, CPU),
                     lambda m, cfg, x, y: SIM.training_loss(m, x, y, cfg)[0], [x, y], channels_last=True)


def test_sim_cifar_profile_gpu(cifar, data_dir, tmp_path):
    """--cost-only --profile --compile on the GPU (compiled steps, as the reproductions train): the device's
    busy time is measured and is no more than the wall time, kernels were launched, and rho-SIM dispatches
    more operations than the plain network."""
    out = tmp_path / "cost"
    SIM.main([str(a) for a in ["--device", "cuda", "--data-dir", data_dir, "--out", out, "--cost-only", "--profile",
                               "--compile", "--bench-steps", 2, "--train-subset", 2048, "--test-subset", 1000]])
    prof = json.load(open(out / "cost.json"))["profile"]
    assert sorted(prof) == sorted(SIM.MODES)
    for m, p in prof.items():
        assert p["compiled"], (m, p)
        # kernels cannot outlast the profiled steps; against the unprofiled time CUPTI's own cost leaves slack
        assert 0 < p["device_busy_ms"] <= 1.05 * p["wall_profiled_ms"] and 0 < p["busy_fraction"] <= 1.25, (m, p)
        assert p["kernels"] >= 1 and p["top"] and p["top"][0][1] > 0, (m, p)
    assert prof["off"]["ops"] < prof["rho"]["ops"]


def test_mae_decay_gpu(cifar, data_dir, tmp_path):
    out = tmp_path / "mae"
    argv = ["--device", "cuda", "--data-dir", data_dir, "--out", out, "--n-train", 2048, "--epochs", 2,
            "--warmup-epochs", 1, "--eval-n-train", 1000, "--eval-n-test", 500, "--probe-epochs", 2,
            "--log-every", 1, "--ckpt-every", 1]
    kept = run_gpu_then_resume(MAE.main, argv, out / "ckpt.pt", 2)  # batch 1024: 2 steps per epoch
    r = results(out)
    final = r["metrics"]["final"]
    assert r["config"]["dim"] == 384 and finite(final["linear_probe"], final["knn"], final["erank"])

    x, _ = cifar_batch(cifar, 32, CPU)
    n_tok = (32 // 4) ** 2
    noise = torch.rand(32, n_tok, generator=torch.Generator().manual_seed(0))

    def make_opt(m, cfg):
        return torch.optim.AdamW(MAE.param_groups(m, cfg["weight_decay"], cfg.get("wd_tokens", True)), lr=0.0,
                                 betas=(0.9, 0.95))
    check_checkpoint(kept, MAE.build_model, lambda m, x, noise: m.encode(x)[0], make_opt,
                     lambda m, cfg, x, noise: m(x, noise)[0], [x, noise])


def test_mae_decay_profile_gpu(cifar, data_dir, tmp_path):
    """--profile --compile on the GPU at the cifar_quick size (batch 256: the step's make-up, not its scale):
    the device's busy time is measured and fits in the wall time, kernels ran, img/s and MFU are reported,
    and nothing was trained."""
    out = tmp_path / "prof"
    MAE.main([str(a) for a in ["--device", "cuda", "--data-dir", data_dir, "--out", out, "--profile", "--compile",
                               "--batch-size", 256, "--n-train", 2048, "--eval-n-train", 1000, "--eval-n-test", 500]])
    assert sorted(os.listdir(out)) == ["log.txt", "profile.json"]
    r = json.load(open(out / "profile.json"))
    p = r["metrics"]["profile"]
    assert r["config"]["dim"] == 384 and p["compiled"] and p["batch"] == 256
    assert 0 < p["device_busy_ms"] <= 1.05 * p["wall_profiled_ms"] and 0 < p["busy_fraction"] <= 1.25, p
    assert p["kernels"] >= 1 and p["top"] and p["top"][0][1] > 0 and p["img_per_s"] > 0 and 0 < p["mfu"] < 1, p


def test_diffusion_decay_gpu(cifar, data_dir, tmp_path):
    """The U-ViT as the module docstring says, and its FID path on the device too (statistics of real images,
    sampling, the real-image reference) with a cheap stand-in for the Inception network: a GPU session learns
    before its long run that FID works there."""
    out = tmp_path / "diff"
    argv = ["--device", "cuda", "--data-dir", data_dir, "--out", out, "--iters", 4, "--warmup", 2,
            "--n-train", 2048, "--n-test", 500, "--fid-n", 64, "--sample-batch", 32, "--grid", 16, "--probe-t", "0.05",
            "--fid-weights", save_fid_standin(str(tmp_path / "standin.pt")), "--fid-cache", tmp_path / "fid_cache",
            "--probe-epochs", 2, "--log-every", 1, "--ckpt-every", 0]
    kept = run_gpu_then_resume(DD.main, argv, out / "ckpt.pt", 2)
    r = results(out)
    m = r["metrics"]
    assert r["config"]["dim"] == 512 and finite(m["best_linear_probe"], m["train_loss"])
    assert os.path.isfile(out / "samples.png")
    assert finite(m["fid"], m["fid_real"], m["sample_img_per_s"]) and m["fid"] > 0 and m["fid_real"] > 0, m
    assert m["fid_n"] == m["fid_real_n"] == 64 and len(os.listdir(tmp_path / "fid_cache")) == 2

    x0, _ = cifar_batch(cifar, 16, CPU, pm1=True)
    t, noise, _ = DD.step_draws(0, 0, 16, "cpu")
    a, s = DD.vp_alpha_sigma(t)
    xt = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise

    def make_opt(m, cfg):
        return torch.optim.AdamW(m.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["wd"])
    check_checkpoint(kept, DD.build_model, lambda m, xt, t, x0, noise: m(xt, t), make_opt,
                     lambda m, cfg, xt, t, x0, noise: DD.diffusion_loss(m, x0, t, noise), [xt, t, x0, noise])


def test_selfmodel_gpu(cifar, data_dir, tmp_path):
    out = tmp_path / "selfmodel"
    argv = ["--task", "cifar10", "--preset", "quick", "--device", "cuda", "--data-dir", data_dir, "--out", out,
            "--aw", "0,1", "--seeds", 1, "--epochs", 1, "--train-subset", 1024, "--test-subset", 500,
            "--sgld-chains", 2, "--sgld-draws", 4, "--log-every", 1]
    # batch 256: 4 steps per cell; step 5 of the sweep lies inside the AW 1 cell (the widened network)
    kept = run_gpu_then_resume(SM.main, argv, out / "ckpt.pt", 5)
    r = results(out)
    runs = r["metrics"]["runs"]
    assert len(runs) == 2 and all(finite(v["test_acc"], v["llc"]) for v in runs.values())
    # the units count on the bf16 ResNet: the 2000-d hidden layer's dead units and share on per image
    assert all(0 <= v["dead_units"] <= 2000 and 0 < v["active_frac"] <= 1 for v in runs.values())

    x, y = cifar_batch(cifar, 32, CPU)
    ck = check_checkpoint(kept, SM.build_model, lambda m, x, y: m.classify(x),
                          lambda m, cfg: SM.make_optimizer(cfg, m, CPU),
                          lambda m, cfg, x, y: SM.loss_parts(m, x, y, cfg["model_aw"])[0], [x, y], channels_last=True)
    assert ck["config"]["model_aw"] == 1 and ck["config"]["hidden"] == 2000
