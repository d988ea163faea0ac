"""The TensorRT context driver against a fake TensorRT that records every call and enforces the order TensorRT
documents (profile before shapes, shapes and addresses before execute, warm-up before capture, one live context
per profile). Runs on a CPU: the driver handles only integer stream and memory handles."""
from __future__ import annotations

import pytest

from srds_trt.runtime.engines.base import EngineError
from srds_trt.runtime.engines.tensorrt_engine import ContextDriver, Tensor

INPUTS = ("sample", "timestep", "class_labels")
STREAM = 7


class OrderError(AssertionError):
    """The driver called TensorRT out of the documented order."""


class FakeContext:
    def __init__(self, engine: "FakeEngine", strategy):
        self.engine, self.strategy = engine, strategy
        self.profile = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.memory = None

    def _log(self, *call):
        self.engine.calls.append((id(self), *call))

    def set_optimization_profile_async(self, index, stream):
        self._log("profile", index)
        if self.engine.refuse_profile or index >= self.engine.num_profiles:
            return False
        if index in self.engine.profiles_in_use:
            raise OrderError(f"profile {index} already used by another live context")
        self.engine.profiles_in_use.add(index)
        self.profile = index
        return True

    def set_device_memory(self, address, size):
        self._log("memory", address)
        if size < self.engine.device_memory_size_v2:
            raise OrderError("device memory smaller than device_memory_size_v2")
        self.memory = address

    def set_input_shape(self, name, shape):
        self._log("shape", name, tuple(shape))
        if self.profile is None:
            raise OrderError("set_input_shape before set_optimization_profile_async")
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self._log("address", name)
        if name in INPUTS and name not in self.shapes:
            raise OrderError(f"set_tensor_address({name!r}) before its set_input_shape")
        self.addresses[name] = address
        return True

    def is_stream_capturable(self, stream):
        self._log("capturable?")
        return self.engine.capturable

    def execute_async_v3(self, stream):
        self._log("execute", self.shapes.get("sample"))
        if self.profile is None or set(self.shapes) != set(INPUTS) or len(self.addresses) != len(INPUTS) + 1:
            raise OrderError("execute_async_v3 before profile, every input shape and every address")
        if self.strategy == "USER_MANAGED" and self.memory is None:
            raise OrderError("USER_MANAGED context executed without set_device_memory")
        return True


class FakeStrategy:
    USER_MANAGED = "USER_MANAGED"


class FakeTRT:
    ExecutionContextAllocationStrategy = FakeStrategy


class FakeEngine:
    device_memory_size_v2 = 4096

    def __init__(self, num_profiles=1, *, capturable=True, refuse_profile=False, fail_context_at=None):
        self.num_profiles, self.capturable, self.refuse_profile = num_profiles, capturable, refuse_profile
        self.fail_context_at = fail_context_at
        self.calls: list[tuple] = []
        self.profiles_in_use: set[int] = set()
        self.created = 0

    def create_execution_context(self, strategy="STATIC"):
        self.calls.append(("create", strategy))
        self.created += 1
        return None if self.created == self.fail_context_at else FakeContext(self, strategy)

    def kinds(self):
        return [c[1] if isinstance(c[0], int) else c[0] for c in self.calls]


def tensors(rows: int, base: int = 0) -> tuple[Tensor, ...]:
    shapes = {"sample": (rows, 1, 16, 16), "timestep": (rows,), "class_labels": (rows,)}
    return tuple(Tensor(n, s, base + i) for i, (n, s) in enumerate(shapes.items())) + (Tensor("out", None, base + 9),)


def driver(engine, *, lanes=1, buckets=(1, 2, 4), memory=True):
    blocks = []

    def lane_memory(lane, size):
        blocks.append((lane, size))
        return 1000 * (lane + 1)

    d = ContextDriver(engine, FakeTRT, lanes=lanes, buckets=buckets, num_profiles=engine.num_profiles,
                      stream=STREAM, lane_memory=lane_memory if memory else None)
    for lane in range(lanes):
        for b in buckets:
            d.bind(lane, b, tensors(b, 100 * b), STREAM)
    return d, blocks


def test_per_shape_contexts_follow_the_documented_order_and_share_lane_memory():
    engine = FakeEngine(num_profiles=6)
    d, blocks = driver(engine, lanes=2, buckets=(1, 2, 4))
    assert d.per_shape and d.capture_failures == {}
    assert blocks == [(0, 4096), (1, 4096)]  # one block per lane, shared by its 3 contexts
    assert engine.created == 6 and engine.profiles_in_use == set(range(6))
    assert engine.kinds()[:3] == ["create", "profile", "memory"]
    for lane in range(2):
        for b in (1, 2, 4):
            d.execute(lane, b, STREAM)                    # warm-up
            engine.calls.clear()
            d.execute(lane, b, STREAM, capturing=True)    # inside a capture: execute only, nothing re-bound
            assert engine.kinds() == ["execute"] and engine.calls[0][2] == (b, 1, 16, 16)
    assert {c.memory for c in d._contexts.values()} == {1000, 2000}


def test_too_few_profiles_runs_one_context_per_lane_uncaptured_and_says_why():
    engine = FakeEngine(num_profiles=1)
    d, _ = driver(engine, buckets=(1, 2, 4))
    assert not d.per_shape and engine.created == 1
    assert set(d.capture_failures) == {(0, 1), (0, 2), (0, 4)}
    assert "--profiles 3" in d.capture_failures[(0, 2)]
    d.execute(0, 4, STREAM)
    d.execute(0, 1, STREAM)  # the shared context is re-shaped before each call
    shapes = [c[3] for c in engine.calls if len(c) > 3 and c[1] == "shape" and c[2] == "sample"]
    assert shapes[-2:] == [(4, 1, 16, 16), (1, 1, 16, 16)]
    with pytest.raises(EngineError, match="--profiles 3"):
        d.execute(0, 2, STREAM, capturing=True)  # the runner's capture helper turns this into a plain enqueue


def test_capture_refused_where_tensorrt_says_the_context_is_not_capturable():
    engine = FakeEngine(num_profiles=3, capturable=False)
    d, _ = driver(engine)
    assert all("is_stream_capturable" in r for r in d.capture_failures.values()) and len(d.capture_failures) == 3
    d.execute(0, 2, STREAM)  # plain enqueue still works
    with pytest.raises(EngineError, match="not stream capturable"):
        d.execute(0, 2, STREAM, capturing=True)


def test_capture_before_warm_up_refused():
    d, _ = driver(FakeEngine(num_profiles=3))
    with pytest.raises(EngineError, match="before its warm-up"):
        d.execute(0, 4, STREAM, capturing=True)


def test_none_context_refused():
    with pytest.raises(EngineError, match="could not create an execution context"):
        driver(FakeEngine(num_profiles=3, fail_context_at=2))


def test_profile_failure_refused():
    with pytest.raises(EngineError, match="refused optimization profile 0"):
        driver(FakeEngine(num_profiles=3, refuse_profile=True))


def test_lanes_beyond_profiles_refused_with_the_flag():
    with pytest.raises(EngineError, match="--profiles 2"):
        driver(FakeEngine(num_profiles=1), lanes=2)


def test_static_allocation_without_lane_memory():
    engine = FakeEngine(num_profiles=3)
    d, blocks = driver(engine, memory=False)
    assert blocks == [] and "memory" not in engine.kinds()
    assert ("create", "STATIC") in engine.calls
    d.execute(0, 1, STREAM)


def test_the_fake_catches_wrong_order():
    """The fake must bite: execute before shapes, shapes before profile, two contexts on one profile."""
    engine = FakeEngine(num_profiles=2)
    context = engine.create_execution_context()
    with pytest.raises(OrderError):
        context.set_input_shape("sample", (1, 1, 16, 16))
    assert context.set_optimization_profile_async(0, STREAM)
    with pytest.raises(OrderError):
        context.execute_async_v3(STREAM)
    with pytest.raises(OrderError):
        context.set_tensor_address("timestep", 5)
    with pytest.raises(OrderError, match="already used"):
        engine.create_execution_context().set_optimization_profile_async(0, STREAM)
