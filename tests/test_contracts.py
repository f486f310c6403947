"""Both runtimes implement the loop's contracts in full (services/runtime/contracts.py): every
method of each Protocol exists on each implementation with the same parameters, so the loop
never needs to know which mode it runs."""

import inspect
import re

import pytest

from services.runtime import contracts
from services.runtime.local import LocalEvaluation, LocalFleet, LocalLearner, LocalSync
from services.runtime.ray_fleet import RayFleet
from services.runtime.ray_learner import RayEvaluation, RayLearner
from services.weights.ray_sync import CollectiveSync, ObjectStoreSync

IMPLEMENTATIONS = [
    (contracts.Fleet, LocalFleet), (contracts.Fleet, RayFleet), (contracts.Elastic, RayFleet),
    (contracts.LearnerGroup, LocalLearner), (contracts.LearnerGroup, RayLearner),
    (contracts.WeightSync, LocalSync), (contracts.WeightSync, ObjectStoreSync), (contracts.WeightSync, CollectiveSync),
    (contracts.Evaluation, LocalEvaluation), (contracts.Evaluation, RayEvaluation),
]


def members(protocol) -> dict[str, object]:
    return {name: value for name, value in vars(protocol).items()
            if not name.startswith("_") and (callable(value) or isinstance(value, property))}


def params(fn) -> list[str]:
    fn = fn.fget if isinstance(fn, property) else fn
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("protocol,impl", IMPLEMENTATIONS, ids=lambda x: x.__name__)
def test_each_runtime_implements_the_contract_in_full(protocol, impl):
    for name, spec in members(protocol).items():
        got = inspect.getattr_static(impl, name, None)
        assert got is not None, f"{impl.__name__} lacks {protocol.__name__}.{name}"
        assert params(got) == params(spec), f"{impl.__name__}.{name}{params(got)} != {protocol.__name__}.{name}{params(spec)}"
    source = inspect.getsource(impl)
    for attr in getattr(protocol, "__annotations__", {}):  # data members (mode, kind, records...)
        assert attr in vars(impl) or re.search(rf"self\.{attr}\b[^=\n]*=", source), \
            f"{impl.__name__} lacks {protocol.__name__}.{attr}"


def test_only_the_ray_fleet_is_elastic():
    assert issubclass(RayFleet, contracts.Elastic)
    assert not issubclass(LocalFleet, contracts.Elastic)
