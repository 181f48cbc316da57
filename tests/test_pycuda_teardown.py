"""The pycuda primary context's teardown order (sdk.runtime.gpu.PycudaPrimaryContext.close), without
a GPU: pycuda is replaced by a small stand-in that models the one rule behind the H200 abort, taken
from pycuda's source (src/cpp/mempool.hpp, src/wrapper/mempool.cpp): a block returned to a
DeviceMemoryPool that still *holds* blocks makes the pool "start holding", which captures the
*current* context and throws when there is none; a pool that stopped holding frees the block at once
through its allocator, which activates its own context. The real process-exit check is
tests/test_kernels_gpu.py::test_pycuda_process_exits_cleanly (needs a GPU and pycuda)."""
from __future__ import annotations

import sys
import types
from typing import List

import pytest


class _Ctx:
    def __init__(self, log: List[str], stack: List["_Ctx"]) -> None:
        self.log, self.stack = log, stack

    def push(self) -> None:
        self.stack.append(self)
        self.log.append("push")


def _fake_pycuda(log: List[str]):
    stack: List[_Ctx] = []
    ctx = _Ctx(log, stack)

    class Context:
        @staticmethod
        def get_current():
            return stack[-1] if stack else None

        @staticmethod
        def pop():
            stack.pop()
            log.append("pop")

        @staticmethod
        def synchronize():
            assert stack, "synchronize without a current context"
            log.append("synchronize")

    class Device:
        def __init__(self, i: int) -> None:
            self.i = i

        def retain_primary_context(self):
            return ctx

    class DeviceMemoryPool:
        def __init__(self) -> None:
            self.held, self.holding = 0, True

        def free_held(self) -> None:
            self.held = 0
            log.append("free_held")

        def stop_holding(self) -> None:
            self.holding = False
            self.free_held()
            log.append("stop_holding")

        def return_block(self) -> None:
            """What a pooled allocation's destructor does (memory_pool::free)."""
            if self.holding:
                if self.held == 0 and not stack:   # start_holding_blocks -> acquire_context()
                    raise RuntimeError("explicit_context_dependent failed: invalid device context - no currently active context?")
                self.held += 1
            else:
                log.append("freed at once")        # device_allocator::free, scoped activation

    driver = types.ModuleType("pycuda.driver")
    driver.init, driver.Device, driver.Context = (lambda: None), Device, Context
    tools = types.ModuleType("pycuda.tools")
    tools.DeviceMemoryPool = DeviceMemoryPool
    tools.clear_context_caches = lambda: log.append("clear_context_caches")
    pkg = types.ModuleType("pycuda")
    pkg.driver, pkg.tools = driver, tools
    return {"pycuda": pkg, "pycuda.driver": driver, "pycuda.tools": tools}, stack


@pytest.fixture
def fake(monkeypatch):
    log: List[str] = []
    mods, stack = _fake_pycuda(log)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return log, stack


def test_close_stops_holding_then_pops(fake) -> None:
    from sdk.runtime.gpu import PycudaPrimaryContext

    log, stack = fake
    pc = PycudaPrimaryContext(0)
    assert log == ["push"] and len(stack) == 1
    pc.pool.return_block()                      # a block freed while the process runs: held
    pc.close()
    assert log[1:] == ["synchronize", "free_held", "stop_holding", "clear_context_caches", "pop"]
    assert stack == [] and pc.closed
    pc.pool.return_block()                      # an array garbage-collected at interpreter teardown
    assert log[-1] == "freed at once"
    pc.close()                                  # idempotent
    assert log[-1] == "freed at once"

