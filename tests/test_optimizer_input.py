"""The optimizer refuses bad input clearly and before changing anything: parameter dtypes and
devices, hyper-parameter values (at construction, in groups, and edited between steps),
the spec argument, chunk_elems, the loss, reshaped parameters and broken state dicts."""

import copy
import math

import pytest
import torch

from lopt_gen import LearnedOptimizer, load_spec

# a spec that reads the loss (none of the shipped ones does): p <- p - lr * g * loss
LOSS_SPEC = {"name": "loss_scaled_sgd", "update": "g * loss"}


def _params(*shapes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _snapshot(opt, params):
    """Everything a refused call must leave as it was: parameter values, state, groups."""
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [p.detach().clone() for p in params], state, groups, [len(g["params"]) for g in opt.param_groups]


def _assert_unchanged(opt, params, snap):
    values, state, groups, sizes = _snapshot(opt, params)
    for i, (a, b) in enumerate(zip(values, snap[0])):
        assert torch.equal(a, b), f"parameter {i} changed"
    assert state.keys() == snap[1].keys(), "state was created or removed"
    for i in state:
        assert state[i].keys() == snap[1][i].keys()
        for k in state[i]:
            assert torch.equal(state[i][k], snap[1][i][k]), f"state {k!r} of parameter {i} changed"
    assert groups == snap[2], "parameter groups changed"
    assert sizes == snap[3], "parameter groups changed"


# ------------------------------------------------------------------ 1. dtypes

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64, torch.bool])
def test_non_floating_parameters_are_refused_at_construction(dtype):
    good = torch.zeros(3, requires_grad=True)
    bad = torch.zeros(2, dtype=dtype)
    with pytest.raises(TypeError, match=rf"parameter 1 of group 0 has dtype {dtype}; .*floating-point parameters "
                                        r"only \(torch.float32, torch.bfloat16, torch.float16, torch.float64\)"):
        LearnedOptimizer([good, bad], "adam")


def test_non_floating_parameters_are_refused_by_add_param_group():
    a = torch.zeros(3, requires_grad=True)
    opt = LearnedOptimizer([a], "adam")
    with pytest.raises(TypeError, match=r"parameter 0 of group 1 has dtype torch.int64"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int64)]})
    assert len(opt.param_groups) == 1, "the refused group was added"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_floating_dtypes_still_step(dtype):
    (p,) = _params((4, 3), dtype=dtype)
    before = p.detach().clone()
    opt = LearnedOptimizer([p], "adam", lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    assert p.dtype == dtype
    assert (p.detach().float() < before.float()).all(), "the parameter did not move against its gradient"


# ------------------------------------------------------------------ 2. hyper-parameter values

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("spec, kwargs, error, match", [
    ("adam", dict(lr=NAN), ValueError, r"^lr must be a finite number, got nan"),
    ("adam", dict(lr=INF), ValueError, r"^lr must be a finite number, got inf"),
    ("adam", dict(lr=-1e-3), ValueError, r"^lr must be >= 0, got -0.001"),
    ("adam", dict(lr="abc"), TypeError, r"^lr must be a real number, got str 'abc'"),
    ("adam", dict(lr=True), TypeError, r"^lr must be a real number, got bool True"),
    ("adam", dict(lr=torch.ones(2)), TypeError, r"^lr must be a real number, got a torch.float32 tensor of shape"),
    ("adam", dict(weight_decay=-1), ValueError, r"^weight_decay must be >= 0, got -1"),
    ("adam", dict(weight_decay=NAN), ValueError, r"^weight_decay must be a finite number"),
    ("adam", dict(beta1=2.0), ValueError, r"^beta1 must be in \[0, 1\) \(it is the decay of accumulator 'm'\), "
                                          r"got 2.0"),
    ("adam", dict(beta2=1.0), ValueError, r"^beta2 must be in \[0, 1\) \(it is the decay of accumulator 'v'\)"),
    ("adam", dict(beta1=NAN), ValueError, r"^beta1 must be a finite number, got nan"),
    ("adam", dict(beta1="abc"), TypeError, r"^beta1 must be a real number, got str 'abc'"),
    ("adam", dict(eps=INF), ValueError, r"^eps must be a finite number, got inf"),
    ("sgd_momentum", dict(momentum=1.5), ValueError, r"^momentum must be in \[0, 1\) .*accumulator 'buf'"),
    ("rmsprop", dict(alpha=-0.1), ValueError, r"^alpha must be in \[0, 1\)"),
], ids=lambda v: None if isinstance(v, (str, type)) else str(v))
def test_bad_constructor_values_are_refused(spec, kwargs, error, match):
    with pytest.raises(error, match=match):
        LearnedOptimizer(_params(3), spec, **kwargs)


@pytest.mark.parametrize("key, value, error, match", [
    ("lr", -0.1, ValueError, r"lr must be >= 0, got -0.1"),
    ("lr", None, TypeError, r"lr must be a real number, got NoneType None"),
    ("lr", "abc", TypeError, r"lr must be a real number, got str 'abc'"),
    ("lr", NAN, ValueError, r"lr must be a finite number, got nan"),
    ("weight_decay", -1.0, ValueError, r"weight_decay must be >= 0, got -1.0"),
    ("beta1", 2.0, ValueError, r"beta1 must be in \[0, 1\)"),
    ("beta1", NAN, ValueError, r"beta1 must be a finite number"),
    ("eps", "1e-8", TypeError, r"eps must be a real number, got str '1e-8'"),
])
def test_bad_group_values_are_refused_at_construction_and_by_add_param_group(key, value, error, match):
    a, b, c = _params(3, 2, 4)
    with pytest.raises(error, match=r"^parameter group 1: " + match):
        LearnedOptimizer([{"params": [a]}, {"params": [b], key: value}], "adam")
    opt = LearnedOptimizer([{"params": [a]}, {"params": [b]}], "adam")
    with pytest.raises(error, match=r"^parameter group 2: " + match):
        opt.add_param_group({"params": [c], key: value})
    assert len(opt.param_groups) == 2, "the refused group was added"


@pytest.mark.parametrize("key, value, error, match", [
    ("lr", -1.0, ValueError, r"lr must be >= 0, got -1.0"),
    ("lr", "abc", TypeError, r"lr must be a real number, got str 'abc'"),
    ("beta2", INF, ValueError, r"beta2 must be a finite number, got inf"),
    ("beta1", 1.0, ValueError, r"beta1 must be in \[0, 1\)"),
    ("weight_decay", -0.5, ValueError, r"weight_decay must be >= 0"),
])
def test_group_values_edited_between_steps_are_checked_before_anything_steps(key, value, error, match):
    a, b = _params((4, 3), 5)
    opt = LearnedOptimizer([{"params": [a]}, {"params": [b]}], "adam", lr=0.1)
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[1][key] = value
    snap = _snapshot(opt, [a, b])
    with pytest.raises(error, match=r"^parameter group 1: " + match):
        opt.step()
    _assert_unchanged(opt, [a, b], snap)  # group 0 comes first, and it did not step either


def test_a_deleted_group_value_is_named_at_the_step():
    (p,) = _params(3)
    opt = LearnedOptimizer([p], "adam")
    del opt.param_groups[0]["beta1"]
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"parameter group 0: no 'beta1'; .* needs lr, weight_decay, beta1, beta2, "
                                         r"eps"):
        opt.step()
    assert p not in opt.state


@pytest.mark.parametrize("key", ["learning_rate", "betta1", "momentum", "lr_scale"])
def test_unknown_group_keys_warn(key):
    a, b = _params(3, 2)
    with pytest.warns(UserWarning, match=rf"^parameter group 0: key\(s\) '{key}' are not used by the adam spec, "
                                         r"which takes lr, weight_decay, beta1, beta2, eps"):
        opt = LearnedOptimizer([{"params": [a], key: 0.1}], "adam")
    with pytest.warns(UserWarning, match=rf"^parameter group 1: key\(s\) '{key}'"):
        opt.add_param_group({"params": [b], key: 0.1})
    assert len(opt.param_groups) == 2 and opt.param_groups[1][key] == 0.1


def test_maximize_is_refused():
    a, b = _params(3, 2)
    with pytest.raises(ValueError, match=r"^parameter group 0: maximize=True is not supported"):
        LearnedOptimizer([{"params": [a], "maximize": True}], "adam")
    opt = LearnedOptimizer([{"params": [a], "maximize": False}], "adam")
    with pytest.raises(ValueError, match=r"^parameter group 1: maximize=True"):
        opt.add_param_group({"params": [b], "maximize": True})
    assert len(opt.param_groups) == 1


def test_good_values_and_torch_keys_are_accepted():
    a, b, c = _params(3, 2, 4)
    before = a.detach().clone()
    opt = LearnedOptimizer([{"params": [a], "lr": 0, "initial_lr": 0.0, "name": "frozen"},
                            {"params": [b], "beta1": 0.0, "weight_decay": 0, "foreach": None}], "adam", lr=1e-3)
    opt.add_param_group({"params": [c], "lr": torch.tensor(1e-2), "beta2": 0.5})
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(a.detach(), before), "lr=0 must leave the parameter as it is"
    assert len(opt.param_groups) == 3


def test_named_parameters_are_accepted():
    model = torch.nn.Linear(3, 2)
    opt = LearnedOptimizer(model.named_parameters(), "adam", lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    model(torch.ones(1, 3)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.weight.detach(), before)


def test_a_valid_group_edit_takes_effect():
    (p,) = _params(4)
    opt = LearnedOptimizer([p], "sgd_momentum", lr=0.1, momentum=0.0)  # p <- p - lr * g
    g = torch.full((4,), 2.0)
    for lr in (0.1, 0.5):
        opt.param_groups[0]["lr"] = lr
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), before - lr * g)


def test_one_cycle_scheduler_still_drives_the_groups():
    """OneCycleLR adds its own keys to the groups and cycles ``momentum`` (a hyper-parameter of
    sgd_momentum): the checks at each step accept all of it."""
    (p,) = _params(5)
    opt = LearnedOptimizer([p], "sgd_momentum", lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6)
    for _ in range(5):
        p.grad = torch.ones(5)
        opt.step()
        sched.step()
    assert {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"} <= set(opt.param_groups[0])
    assert torch.isfinite(p).all()


# ------------------------------------------------------------------ 3. devices

def test_meta_parameters_are_refused():
    with pytest.raises(ValueError, match=r"parameter 0 of group 0 is on the meta device"):
        LearnedOptimizer([torch.zeros(3, device="meta", requires_grad=True)], "adam")


def test_parameters_on_two_devices_are_refused():
    a = torch.zeros(3, requires_grad=True)
    m = torch.zeros(2, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match=r"must be on one device; found cpu \(parameter 0 of group 0\), "
                                         r"meta \(parameter 1 of group 0\)"):
        LearnedOptimizer([a, m], "adam")
    opt = LearnedOptimizer([a], "adam")
    with pytest.raises(ValueError, match=r"found cpu \(parameter 0 of group 0\), meta \(parameter 0 of group 1\)"):
        opt.add_param_group({"params": [m]})
    assert len(opt.param_groups) == 1


def test_a_parameter_on_another_device_after_construction_is_refused_at_the_step():
    a, b = _params(3, 4)
    opt = LearnedOptimizer([a, b], "adam")
    m = torch.zeros(4, device="meta", requires_grad=True)
    opt.param_groups[0]["params"][1] = m  # (on a GPU machine: b.data = b.data.cuda())
    a.grad, m.grad = torch.ones(3), torch.ones(4, device="meta")
    snap_a = a.detach().clone()
    with pytest.raises(ValueError, match=r"found cpu \(parameter 0 of group 0\), meta \(parameter 1 of group 0\)"):
        opt.step()
    assert torch.equal(a.detach(), snap_a) and a not in opt.state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parameters_on_cpu_and_cuda_are_refused():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, device="cuda", requires_grad=True)
    with pytest.raises(ValueError, match=r"found cpu \(parameter 0 of group 0\), cuda:0 \(parameter 0 of group 1\)"):
        LearnedOptimizer([{"params": [a]}, {"params": [b]}], "adam")


# ------------------------------------------------------------------ 4. the spec argument

@pytest.mark.parametrize("spec", [42, None, 1.5, ["adam"]])
def test_a_spec_of_the_wrong_type_is_refused(spec):
    with pytest.raises(TypeError, match=r"^spec must be a shipped spec name, a path to a YAML file, a dict or a "
                                        rf"Spec; got {type(spec).__name__}$"):
        LearnedOptimizer(_params(3), spec)


def test_every_kind_of_spec_argument_still_works():
    spec = load_spec("adam")
    for arg in ("adam", spec, spec.model_dump(), __import__("lopt_gen").spec.SPEC_DIR / "adam.yaml"):
        assert LearnedOptimizer(_params(3), arg).spec.spec_hash() == spec.spec_hash()


# ------------------------------------------------------------------ 6. chunk_elems

@pytest.mark.parametrize("chunk", [0, -4, 1.5, "8", True])
def test_bad_chunk_elems_is_refused(chunk):
    with pytest.raises(ValueError, match=r"^chunk_elems must be a positive integer or None, got"):
        LearnedOptimizer(_params(3), "adam", chunk_elems=chunk)


def test_small_chunk_elems_still_works():
    (p,) = _params((5, 3))
    opt = LearnedOptimizer([p], "adam", chunk_elems=1)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.chunk_elems == 1


# ------------------------------------------------------------------ 7. the loss

@pytest.mark.parametrize("loss, error, match", [
    (torch.ones(2), ValueError, r"must be a single number .* got a tensor of shape \(2,\)"),
    (torch.ones(0), ValueError, r"must be a single number .* got a tensor of shape \(0,\)"),
    ("abc", TypeError, r"must be a single number .* got str 'abc'"),
    ([1.0], TypeError, r"must be a single number .* got list \[1.0\]"),
    (torch.ones((), dtype=torch.complex64), TypeError, r"must be a real number, got a torch.complex64 tensor"),
], ids=["two-elements", "empty", "str", "list", "complex"])
def test_a_loss_that_is_not_one_number_is_refused(loss, error, match):
    (p,) = _params(3)
    opt = LearnedOptimizer([p], LOSS_SPEC, lr=0.1)
    p.grad = torch.ones(3)
    before = p.detach().clone()
    with pytest.raises(error, match=r"^step: the loss " + match):
        opt.step(loss=loss)
    with pytest.raises(error, match=r"^step: the loss " + match):
        opt.step(lambda: loss)
    assert torch.equal(p.detach(), before) and p not in opt.state


@pytest.mark.parametrize("loss", [2.0, 2, torch.tensor(2.0), torch.tensor([2.0]), torch.tensor([[2]])])
def test_a_loss_that_is_one_number_is_read(loss):
    (p,) = _params(3)
    opt = LearnedOptimizer([p], LOSS_SPEC, lr=0.1)
    p.grad = torch.ones(3)
    before = p.detach().clone()
    assert opt.step(loss=loss) is loss
    torch.testing.assert_close(p.detach(), before - 0.1 * 2.0)


def test_a_spec_that_does_not_read_the_loss_ignores_what_the_closure_returns():
    (p,) = _params(3)
    opt = LearnedOptimizer([p], "adam")
    p.grad = torch.ones(3)
    out = opt.step(lambda: (torch.ones(2), "extra"))
    assert out[1] == "extra"


# ------------------------------------------------------------------ 8. reshaped parameters

def test_a_parameter_reshaped_away_from_its_gradient_is_refused():
    a, b = _params(3, 4)
    opt = LearnedOptimizer([{"params": [a]}, {"params": [b]}], "adam")
    a.grad, b.grad = torch.ones(3), torch.ones(4)
    b.data = torch.zeros(2, 3)
    snap = _snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=r"parameter 0 of group 1 has shape \(2, 3\) but its gradient has shape "
                                         r"\(4,\); nothing was stepped"):
        opt.step()
    _assert_unchanged(opt, [a, b], snap)


@pytest.mark.parametrize("spec", ["adam", "small_fc_lopt"])
def test_a_parameter_reshaped_away_from_its_state_is_refused(spec):
    a, b = _params(3, 4)
    opt = LearnedOptimizer([a, b], spec)
    a.grad, b.grad = torch.ones(3), torch.ones(4)
    opt.step()
    b.data, b.grad = torch.zeros(2, 3), torch.ones(2, 3)
    snap = _snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=r"parameter 1 of group 0 has shape \(2, 3\), but its state was made for a "
                                         r"parameter of another shape \(state 'm' has shape \(\d, 4\)"):
        opt.step()
    _assert_unchanged(opt, [a, b], snap)
    del opt.state[b]  # starts b afresh, as the message says
    opt.step()
    assert opt.state[b]["m"].shape[1:] == (2, 3)


# ------------------------------------------------------------------ 5. load_state_dict

def _set(path, value):
    def mutate(sd):
        *head, last = path
        d = sd
        for k in head:
            d = d[k]
        d[last] = value
        return sd
    return mutate


def _delete(path):
    def mutate(sd):
        *head, last = path
        d = sd
        for k in head:
            d = d[k]
        del d[last]
        return sd
    return mutate


BAD_STATE_DICTS = [
    ("none", lambda sd: None, TypeError, r"^state_dict must be a dict made by LearnedOptimizer.state_dict\(\), "
                                         r"got NoneType None"),
    ("int", lambda sd: 5, TypeError, r"got int 5"),
    ("list", lambda sd: [sd], TypeError, r"got list"),
    ("lopt_gen-not-a-dict", _set(["lopt_gen"], "adam"), ValueError, r"the 'lopt_gen' entry is str 'adam', expected "
                                                                    r"a dict"),
    ("no-param-groups", _delete(["param_groups"]), ValueError, r"no 'param_groups' entry"),
    ("param-groups-not-a-list", _set(["param_groups"], {}), ValueError, r"'param_groups' is dict \{\}"),
    ("no-state", _delete(["state"]), ValueError, r"no 'state' entry"),
    ("state-not-a-dict", _set(["state"], [1]), ValueError, r"'state' is list \[1\]"),
    ("group-not-a-dict", _set(["param_groups", 0], 3), ValueError, r"saved parameter group 0 is int 3"),
    ("group-ids-not-ints", _set(["param_groups", 0, "params"], ["a", "b"]), ValueError,
     r"the 'params' of saved parameter group 0 must be parameter ids"),
    ("group-missing-beta1", _delete(["param_groups", 0, "beta1"]), ValueError,
     r"saved parameter group 0: no 'beta1'"),
    ("group-lr-str", _set(["param_groups", 0, "lr"], "abc"), TypeError,
     r"saved parameter group 0: lr must be a real number, got str 'abc'"),
    ("group-lr-negative", _set(["param_groups", 0, "lr"], -1.0), ValueError,
     r"saved parameter group 0: lr must be >= 0"),
    ("group-beta1-2", _set(["param_groups", 0, "beta1"], 2.0), ValueError,
     r"saved parameter group 0: beta1 must be in \[0, 1\)"),
    ("entry-not-a-dict", _set(["state", 0], 5), ValueError,
     r"the state of parameter 0 of group 0 \(shape \(4, 3\)\) is int 5, expected a dict of tensors"),
    ("tensor-replaced-by-str", _set(["state", 0, "m"], "abc"), ValueError,
     r"state 'm' of parameter 0 of group 0 \(shape \(4, 3\)\) is str 'abc', not a tensor"),
    ("step-negative", _set(["state", 1, "step"], torch.tensor(-1.0)), ValueError,
     r"the step counter of parameter 1 of group 0 \(shape \(5,\)\) is -1.0, expected a whole number >= 0"),
    ("step-nan", _set(["state", 1, "step"], torch.tensor(NAN)), ValueError, r"the step counter .* is nan"),
    ("step-inf", _set(["state", 1, "step"], torch.tensor(INF)), ValueError, r"the step counter .* is inf"),
    ("step-fraction", _set(["state", 1, "step"], torch.tensor(1.5)), ValueError, r"the step counter .* is 1.5"),
]


@pytest.mark.parametrize("mutate, error, match", [c[1:] for c in BAD_STATE_DICTS], ids=[c[0] for c in BAD_STATE_DICTS])
def test_a_broken_state_dict_is_refused_and_nothing_is_loaded(mutate, error, match):
    a, b = _params((4, 3), 5)
    opt = LearnedOptimizer([a, b], "adam", lr=0.1)
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for p in (a, b):
        p.grad = torch.full_like(p, -2.0)
    opt.step()  # the optimizer's own state now differs from the checkpoint's
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match) as err:
        opt.load_state_dict(mutate(copy.deepcopy(saved)))
    assert "nothing was loaded" in str(err.value)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for k, st in before["state"].items():
        assert after["state"][k].keys() == st.keys()
        for name, v in st.items():
            assert torch.equal(after["state"][k][name], v), (k, name)
    opt.load_state_dict(saved)  # the intact checkpoint still loads
    assert math.isclose(float(opt.state[a]["step"]), 1.0)
