"""--compile must trace every model a script trains as ONE graph. A graph break (a .item(), a Python branch on a
tensor, an op dynamo cannot trace) splits the compiled step into pieces with eager glue between them: the numbers
stay the same, so no other test would notice, but the GPU step slows down. torch._dynamo.explain traces on the
CPU without compiling (seconds), at the sizes the reproductions train; a deliberate break shows it can tell."""
import pytest
import torch

import diffusion_decay as D
import mae_decay as M
import selfmodel as SM
import sim_cifar as S


def mae():
    return M.build_model(vars(M.parse_args(["--device", "cpu"]))), (torch.randn(2, 3, 32, 32), torch.rand(2, 64))


def sim(mode):
    cfg = dict(vars(S.parse_args(["--device", "cpu"])), dataset="cifar10", sim=mode)
    return S.build_model(cfg), (torch.randn(4, 3, 32, 32),)


def uvit(cond):
    cfg = vars(D.get_args(["--device", "cpu", "--preset", "cifar_quick"] + (["--cond"] if cond else [])))
    args = (torch.randn(2, 3, 32, 32), torch.rand(2))
    return D.build_model(cfg), args + ((torch.tensor([3, 7]),) if cond else ())


def selfmodel(task):
    cfg = dict(SM.TASKS[task], task=task, width=64, model_aw=1.0, num_tokens=1000)
    x = {"mnist": torch.randn(4, 1, 28, 28), "cifar10": torch.randn(4, 3, 32, 32),
         "imdb": (torch.randint(0, 1000, (40,)), torch.arange(0, 40, 10))}[task]  # 4 reviews: tokens, offsets
    return SM.build_model(cfg), (x,)


CASES = {"mae_decay cifar_quick": mae, "sim_cifar off": lambda: sim("off"), "sim_cifar full": lambda: sim("full"),
         "sim_cifar rho": lambda: sim("rho"), "diffusion_decay cifar_quick": lambda: uvit(False),
         "diffusion_decay class-conditional": lambda: uvit(True), "selfmodel mnist": lambda: selfmodel("mnist"),
         "selfmodel cifar10": lambda: selfmodel("cifar10"), "selfmodel imdb": lambda: selfmodel("imdb")}


def explain(model, args):
    torch._dynamo.reset()
    model.train()
    return torch._dynamo.explain(model)(*args)


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_model_is_one_graph(name):
    torch.manual_seed(0)
    ex = explain(*CASES[name]())
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [b.reason for b in ex.break_reasons]
    assert ex.op_count >= 5  # the smallest, the MNIST MLP with its self-model head: 6


def test_a_graph_break_is_seen():
    class Breaks(torch.nn.Module):
        def forward(self, x):
            x = x * 2
            if x.sum().item() > 0:  # a Python branch on a tensor's value
                x = x + 1
            return x * 3

    ex = explain(Breaks(), (torch.ones(3),))
    assert ex.graph_break_count >= 1 and ex.graph_count >= 2
