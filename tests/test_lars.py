"""LARS: its steps against the update rule written out by hand, the guard for zero norms, biases left to plain
SGD with momentum, the state_dict round trip, and the lr schedule through set_lr."""
import io

import torch
from torch.testing import assert_close

import optim

LR, MOMENTUM, WD, TRUST = 0.5, 0.9, 1e-4, 0.001


def lars_by_hand(w, g, mu, lr=LR, momentum=MOMENTUM, wd=WD, trust=TRUST):
    """The new weight and momentum buffer for a weight: the rule spelled out, with no guard for zero norms."""
    d = g + wd * w
    q = trust * w.norm() / d.norm()
    mu = momentum * mu + q * d
    return w - lr * mu, mu


def test_two_steps_match_the_hand_computation():
    # ||w|| = 50, so trust x ||w|| / ||g + wd x w|| is about 2: a ratio capped at 1 gives other values
    w0 = torch.tensor([[30.0, 40.0], [0.0, 0.0]])
    b0 = torch.tensor([1.0, -2.0])
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = optim.LARS([w, b], lr=LR, weight_decay=WD, momentum=MOMENTUM, trust_coefficient=TRUST)

    gw1, gb1 = torch.tensor([[0.01, 0.0], [0.0, -0.02]]), torch.tensor([0.5, 0.25])
    w.grad, b.grad = gw1.clone(), gb1.clone()
    opt.step()
    d1 = gw1 + WD * w0
    q1 = TRUST * torch.sqrt((w0 ** 2).sum()) / torch.sqrt((d1 ** 2).sum())
    assert q1 > 1.5
    mu_w1 = q1 * d1
    w1 = w0 - LR * mu_w1
    mu_b1 = gb1
    b1 = b0 - LR * mu_b1
    assert_close(w.detach(), w1)
    assert_close(b.detach(), b1)
    assert_close(opt.state[w]['mu'], mu_w1)
    assert_close(opt.state[b]['mu'], mu_b1)
    # without weight decay the step points elsewhere
    assert not torch.allclose(w.detach(), w0 - LR * TRUST * w0.norm() / gw1.norm() * gw1, rtol=0, atol=1e-4)

    gw2, gb2 = torch.tensor([[-0.03, 0.02], [0.01, 0.0]]), torch.tensor([-0.1, 0.3])
    w.grad, b.grad = gw2.clone(), gb2.clone()
    opt.step()
    d2 = gw2 + WD * w1
    q2 = TRUST * torch.sqrt((w1 ** 2).sum()) / torch.sqrt((d2 ** 2).sum())
    mu_w2 = MOMENTUM * mu_w1 + q2 * d2
    w2 = w1 - LR * mu_w2
    mu_b2 = MOMENTUM * mu_b1 + gb2
    b2 = b1 - LR * mu_b2
    assert_close(w.detach(), w2)
    assert_close(b.detach(), b2)
    # the buffer matters: a step from the second gradient alone lands elsewhere
    assert not torch.allclose(w.detach(), w1 - LR * q2 * d2, rtol=0, atol=1e-3)
    assert not torch.allclose(b.detach(), b1 - LR * gb2, rtol=0, atol=1e-3)
    # the same two steps by the helper above
    hw1, hmu = lars_by_hand(w0, gw1, torch.zeros_like(w0))
    hw2, _ = lars_by_hand(hw1, gw2, hmu)
    assert_close(w.detach(), hw2)


def test_a_zero_norm_gets_a_ratio_of_one():
    g = torch.tensor([[0.3, -0.4, 0.0], [1.0, 0.0, 2.0]])
    w = torch.zeros(2, 3, requires_grad=True)  # ||w|| = 0: the step is lr x g, not 0 and not nan
    opt = optim.LARS([w], lr=LR, weight_decay=0.1, momentum=MOMENTUM, trust_coefficient=TRUST)
    w.grad = g.clone()
    opt.step()
    assert torch.isfinite(w).all()
    assert_close(w.detach(), -LR * g)

    v0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    v = v0.clone().requires_grad_()  # no weight decay and a zero gradient: ||g|| = 0, the weight stays
    opt = optim.LARS([v], lr=LR, weight_decay=0.0, momentum=MOMENTUM, trust_coefficient=TRUST)
    v.grad = torch.zeros_like(v0)
    opt.step()
    assert torch.isfinite(v).all()
    assert_close(v.detach(), v0)
    assert_close(opt.state[v]['mu'], torch.zeros_like(v0))

    z = torch.zeros(3, 2, requires_grad=True)  # both norms 0
    opt = optim.LARS([z], lr=LR, weight_decay=0.1, momentum=MOMENTUM, trust_coefficient=TRUST)
    z.grad = torch.zeros(3, 2)
    opt.step()
    assert torch.isfinite(z).all() and not z.any()


def test_biases_and_norm_parameters_step_as_plain_sgd_with_momentum():
    start = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.8, 1.2]), torch.tensor(3.0)]
    mine = [t.clone().requires_grad_() for t in start]
    theirs = [t.clone().requires_grad_() for t in start]
    # a large weight decay and a trust coefficient far from 1 would both show
    opt = optim.LARS(mine, lr=LR, weight_decay=0.5, momentum=MOMENTUM, trust_coefficient=TRUST)
    ref = torch.optim.SGD(theirs, lr=LR, momentum=MOMENTUM, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=gen) for t in start]
        for p, q, g in zip(mine, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(mine, theirs):
            assert_close(p.detach(), q.detach())
    assert not torch.allclose(mine[0].detach(), start[0], rtol=0, atol=1e-2)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    groups = [{'params': [w]}, {'params': [b], 'fix_lr': True}]
    a = optim.lars(groups, LR, MOMENTUM, 1e-2)
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    a.step()

    buf = io.BytesIO()  # through bytes, as in a checkpoint, so that no buffer is shared
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    w3, b3 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    restored = optim.lars([{'params': [w2]}, {'params': [b2]}], 0.1, 0.0, 0.0, trust_coefficient=0.5)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    fresh = optim.lars([{'params': [w3]}, {'params': [b3]}], LR, MOMENTUM, 1e-2)
    for key in ('lr', 'momentum', 'weight_decay', 'trust_coefficient', 'fix_lr'):
        assert [g.get(key) for g in restored.param_groups] == [g.get(key) for g in a.param_groups]
    assert_close(restored.state[w2]['mu'], a.state[w]['mu'])

    gw, gb = torch.randn(4, 3), torch.randn(4)
    for opt, (p, q) in ((a, (w, b)), (restored, (w2, b2)), (fresh, (w3, b3))):
        p.grad, q.grad = gw.clone(), gb.clone()
        opt.step()
    assert torch.equal(w2, w) and torch.equal(b2, b)
    assert not torch.allclose(w3, w) and not torch.allclose(b3, b)  # without the buffers the step differs


def test_set_lr_and_fix_lr():
    w0, b0 = torch.tensor([[3.0, 4.0], [1.0, 2.0]]), torch.tensor([1.0, -1.0])
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = optim.lars([{'params': [w]}, {'params': [b], 'fix_lr': True}], LR, MOMENTUM, WD)
    assert isinstance(opt, optim.LARS)
    assert [g['lr'] for g in opt.param_groups] == [LR, LR]
    assert [g.get('fix_lr') for g in opt.param_groups] == [None, True]
    assert all(g['momentum'] == MOMENTUM and g['weight_decay'] == WD and g['trust_coefficient'] == TRUST
               for g in opt.param_groups)

    optim.set_lr(opt, 0.1, LR)
    assert [g['lr'] for g in opt.param_groups] == [0.1, LR]
    assert opt.param_groups[1]['fix_lr'] is True

    gw, gb = torch.tensor([[0.2, -0.1], [0.0, 0.3]]), torch.tensor([0.4, 0.2])
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    assert_close(w.detach(), lars_by_hand(w0, gw, torch.zeros_like(w0), lr=0.1)[0])
    assert_close(b.detach(), b0 - LR * gb)

    optim.set_lr(opt, 0.0, LR)
    assert [g['lr'] for g in opt.param_groups] == [0.0, LR]
