import pytest
import torch

from transferbench.training.schedules import SCHEDULES


def trajectory(name, steps=100, lr=1.0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = SCHEDULES.get(name)(opt, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_constant():
    assert set(trajectory("constant")) == {1.0}


def test_step_drops_tenfold_at_half_and_three_quarters():
    lrs = trajectory("step")
    assert lrs[49] == 1.0 and lrs[50] == pytest.approx(0.1) and lrs[75] == pytest.approx(0.01)


def test_cosine_decays_to_zero():
    lrs = trajectory("cosine")
    assert lrs[0] == 1.0 and lrs[50] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_warmup_then_cosine():
    lrs = trajectory("warmup_cosine")
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0, abs=0.01)
    assert lrs.index(max(lrs)) == 10 and lrs[-1] < 0.01


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_registered_schedule_is_finite_bounded_and_spans_the_budget(name):
    lrs = trajectory(name, steps=40, lr=0.1)
    assert len(lrs) == 40 and all(0 <= lr <= 0.1 + 1e-12 for lr in lrs)
    assert max(lrs) == pytest.approx(0.1, rel=0.05)  # reaches the base LR (after any warm-up)
