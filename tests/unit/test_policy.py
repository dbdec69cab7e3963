"""Restart policy: examples, and a Hypothesis state machine against a simple model."""

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llama_orchestrator.config.instance import HealthcheckSection, RestartPolicySection
from llama_orchestrator.engine.health import DOWN, ERROR, HEALTHY, LOADING, ProbeResult
from llama_orchestrator.engine.logs import LoadProgress
from llama_orchestrator.engine.policy import (
    Ending,
    RestartBook,
    after_exit,
    after_probe,
    after_start,
    backoff_delay,
    fatal_reason,
    wants_restart,
)
from llama_orchestrator.engine.step import Watch, step
from llama_orchestrator.states import Desired, is_allowed
from llama_orchestrator.states import InstanceState as S

R, STOP = Desired.RUNNING, Desired.STOPPED


@pytest.mark.parametrize(
    ("mode", "ending", "desired", "expected"),
    [
        ("no", Ending(code=1), R, False),
        ("on-failure", Ending(code=1), R, True),
        ("on-failure", Ending(code=0), R, False),
        ("on-failure", Ending(signal=9), R, True),
        ("on-failure", Ending(unhealthy=True), R, True),
        ("always", Ending(code=0), R, True),
        ("unless-stopped", Ending(code=0), R, True),
        ("always", Ending(code=1), STOP, False),
    ],
)
def test_wants_restart_like_docker(mode, ending, desired, expected):
    assert wants_restart(mode, ending, desired) is expected


LOAD_ERROR = [
    "E llama_model_load: error loading model: tensor 'blk.0.ffn_up.weight' data is not within the file bounds, model is corrupted or incomplete",
    "E srv    load_model: failed to load model, '/m/x.gguf'",
    "E srv  llama_server: exiting due to model loading error",
]


def test_a_model_that_cannot_load_fails_at_once_with_llama_servers_reason():
    ending = Ending.of({"code": 1, "signal": None, "stderr_tail": LOAD_ERROR})
    assert ending.fatal == (
        "llama-server could not load its model (tensor 'blk.0.ffn_up.weight' data is not "
        "within the file bounds, model is corrupted or incomplete): fix the model (or its "
        "path), then `up` it again"
    )
    d = after_exit(RestartPolicySection(), after_start(RestartBook(), 0), ending, R, 1, 0)
    assert d.state == S.FAILED and d.restart_at is None and d.book.restarts == 0
    assert "not restarted" in d.reason and "`up` it again" in d.reason
    # a user's down still wins, and the same words after a signal or exit 0 are not read
    assert after_exit(RestartPolicySection(), RestartBook(), ending, STOP, 1, 0).state == S.STOPPED
    assert Ending.of({"code": None, "signal": 9, "stderr_tail": LOAD_ERROR}).fatal is None
    assert Ending.of({"code": 0, "signal": None, "stderr_tail": LOAD_ERROR}).fatal is None
    assert fatal_reason(["E srv  llama_server: exiting due to model loading error"]) == (
        "llama-server could not load its model: fix the model (or its path), then `up` it again"
    )
    assert fatal_reason(["segfault"]) is None and fatal_reason([]) is None
    # a flag llama-server does not know: every restart would be refused too (issue 40)
    reason = fatal_reason(["error: invalid argument: --jinja --flash-attn on"])
    assert reason is not None and reason.startswith(
        "llama-server refused its arguments (invalid argument: --jinja --flash-attn on)"
    )


#: what ggml and llama-server print when the model's buffers do not fit
CUDA_OOM = [
    "0.00.512.301 E ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4437.80 MiB on "
    "device 0: cudaMalloc failed: out of memory",
    "0.00.512.330 E alloc_tensor_range: failed to allocate CUDA0 buffer of size 4653375488",
    "0.00.512.401 E llama_model_load: error loading model: unable to allocate CUDA0 buffer",
    "0.00.512.420 E srv    load_model: failed to load model, '/m/x.gguf'",
    "0.00.512.500 E main: exiting due to model loading error",
]


VULKAN_OOM = [
    "ggml_vulkan: Device memory allocation of size 4653375488 failed.",
    "ggml_vulkan: vk::Device::allocateMemory: ErrorOutOfDeviceMemory",
]
ROCM_OOM = [
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 512.00 MiB on device 0: "
    "hipMalloc failed: out of memory"
]
KV_OOM = [
    "llama_kv_cache_unified: failed to allocate buffer for kv cache",
    "llama_init_from_model: failed to initialize the context",
]


@pytest.mark.parametrize(
    ("tail", "said"),
    [
        (CUDA_OOM, CUDA_OOM[0].split(" E ", 1)[1]),  # without llama.cpp's time and level
        (VULKAN_OOM, VULKAN_OOM[1]),
        (ROCM_OOM, ROCM_OOM[0]),
        (KV_OOM, KV_OOM[0]),
    ],
    ids=["cuda", "vulkan", "rocm", "kv-cache"],
)
def test_an_out_of_memory_exit_says_so_with_the_fix_and_fails_at_once(tail, said):
    ending = Ending.of({"code": 1, "signal": None, "stderr_tail": tail})
    assert ending.fatal is not None and ending.fatal.startswith("llama-server ran out of memory")
    assert f"({said})" in ending.fatal  # the first line that says so
    for fix in ("gpu.layers (-ngl)", "model.context_size", "gpu.vram_mib"):
        assert fix in ending.fatal
    d = after_exit(RestartPolicySection(), after_start(RestartBook(), 0), ending, R, 1, 0)
    assert d.state == S.FAILED and d.book.restarts == 0 and "not restarted" in d.reason


def test_backoff_doubles_up_to_the_maximum_with_bounded_jitter():
    p = RestartPolicySection(backoff_initial=1, backoff_max=60)
    assert [backoff_delay(p, n, 0) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(p, 2, 1) == pytest.approx(4.4) and backoff_delay(
        p, 2, -1
    ) == pytest.approx(3.6)
    assert backoff_delay(p, 10_000, 0) == 60  # no overflow on long crash loops


def test_a_crash_loop_fails_after_max_retries_and_up_gives_the_budget_back():
    p = RestartPolicySection(max_retries=2, backoff_initial=0.1, reset_after=60)
    book, now, states = after_start(RestartBook(), 0.0), 0.0, []
    for _ in range(3):
        d = after_exit(p, book, Ending(code=1), R, now, 0)
        states.append(d.state)
        book, now = after_start(d.book, d.restart_at or now), (d.restart_at or now) + 1
    assert states == [S.BACKOFF, S.BACKOFF, S.FAILED] and book.restarts == 2
    fresh = after_start(RestartBook.fresh(book.restarts), now)
    assert after_exit(p, fresh, Ending(code=1), R, now + 1, 0).state == S.BACKOFF


def test_staying_up_reset_after_seconds_resets_the_streak():
    p = RestartPolicySection(max_retries=1, backoff_initial=1, reset_after=30)
    d = after_exit(p, after_start(RestartBook(), 0), Ending(code=1), R, 5, 0)
    d2 = after_exit(p, after_start(d.book, d.restart_at), Ending(code=1), R, d.restart_at + 31, 0)
    assert d2.state == S.BACKOFF and d2.book.streak == 1 and d2.book.restarts == 2


HC = HealthcheckSection(retries=3, start_period=30)


@pytest.mark.parametrize(
    ("state", "failures", "status", "age", "expected"),
    [
        (S.STARTING, 0, HEALTHY, 1, (S.HEALTHY, 0, False)),
        (S.STARTING, 0, LOADING, 29, (S.STARTING, 0, False)),  # loading: not a failure
        (S.STARTING, 0, DOWN, 29, (S.STARTING, 0, False)),  # not listening yet
        (S.STARTING, 0, ERROR, 29, (S.STARTING, 0, False)),  # Docker: nothing counts yet
        (S.STARTING, 0, LOADING, 31, (S.STARTING, 1, False)),  # start_period over
        (S.STARTING, 2, LOADING, 31, (S.UNHEALTHY, 3, True)),
        (S.HEALTHY, 0, ERROR, 1, (S.HEALTHY, 1, False)),  # once healthy, failures count
        (S.HEALTHY, 1, DOWN, 100, (S.HEALTHY, 2, False)),
        (S.HEALTHY, 2, ERROR, 100, (S.UNHEALTHY, 3, True)),
        (S.UNHEALTHY, 3, ERROR, 100, (S.UNHEALTHY, 4, False)),  # restart asked once
        (S.UNHEALTHY, 5, HEALTHY, 100, (S.HEALTHY, 0, False)),  # recovers
    ],
)
def test_after_probe_follows_docker_health_semantics(state, failures, status, age, expected):
    v = after_probe(HC, "on-failure", R, state, failures, status, age, "boom")
    assert (v.state, v.failures, v.restart) == expected


@pytest.mark.parametrize("status", [DOWN, LOADING, ERROR])
def test_an_early_look_at_a_starting_instance_counts_only_when_it_is_healthy(status):
    hc = HealthcheckSection(retries=2, start_period=0)
    early = after_probe(hc, "always", R, S.STARTING, 1, status, 5, "x", early=True)
    assert (early.state, early.failures, early.restart) == (S.STARTING, 1, False)
    on_time = after_probe(hc, "always", R, S.STARTING, 1, status, 5, "x")
    assert (on_time.state, on_time.restart) == (S.UNHEALTHY, True)
    assert after_probe(hc, "always", R, S.STARTING, 1, HEALTHY, 5, early=True).state == S.HEALTHY
    # once healthy, every probe is on time: `early` only matters while starting
    assert after_probe(hc, "always", R, S.HEALTHY, 1, status, 5, early=True).restart


@pytest.mark.parametrize(
    ("status", "stalled", "expected"),
    [
        (LOADING, 0.0, (S.STARTING, 0)),  # its log grew just now: loading, however long
        (LOADING, 599.0, (S.STARTING, 0)),
        (LOADING, 600.0, (S.STARTING, 1)),  # silent for load_timeout: a failure
        (LOADING, math.inf, (S.STARTING, 1)),  # nobody looked: as before
        (DOWN, 0.0, (S.STARTING, 1)),  # not listening past start_period is no load
        (ERROR, 0.0, (S.STARTING, 1)),
    ],
)
def test_past_start_period_only_a_load_without_progress_fails(status, stalled, expected):
    hc = HealthcheckSection(retries=3, start_period=30)  # load_timeout 600 by default
    v = after_probe(hc, "on-failure", R, S.STARTING, 0, status, 500, "x", False, stalled)
    assert (v.state, v.failures) == expected
    assert (
        "progressing" in after_probe(hc, "no", R, S.STARTING, 2, LOADING, 99, "", False, 1).reason
    )


def test_the_step_measures_a_stall_from_the_last_growth_of_the_logs():
    hc = HealthcheckSection(interval=1, retries=1, start_period=0, load_timeout=10)
    probe = ProbeResult(LOADING, 503, 1.0, "loading")
    w = Watch(since=0.0)
    for t in range(1, 30):  # grows for 29 s: starting throughout
        s = step(S.STARTING, R, 0.0, w, probe, hc, "on-failure", float(t), LoadProgress(t * 10))
        assert s.state == S.STARTING
        w = s.watch
    assert w.progress_at == 29 and w.marks == LoadProgress(290)
    s = step(S.STARTING, R, 0.0, w, probe, hc, "on-failure", 38.0, LoadProgress(290))
    assert s.state == S.STARTING  # 9 s silent
    s = step(S.STARTING, R, 0.0, s.watch, probe, hc, "on-failure", 40.0, LoadProgress(290))
    assert s.state == S.UNHEALTHY and s.restart  # 11 s silent
    # memory that drifts by pages is no progress; a megabyte more is
    moved = LoadProgress(290, 4096)
    assert not moved.beyond(LoadProgress(290)) and LoadProgress(290, 1 << 20).beyond(
        LoadProgress(290)
    )
    # the first look is only the baseline: a load silent since its start stalls too
    first = step(
        S.STARTING, R, 0.0, Watch(since=0.0), probe, hc, "on-failure", 11.0, LoadProgress(5)
    )
    assert first.state == S.UNHEALTHY


def test_an_unhealthy_instance_is_restarted_only_when_its_policy_says_so():
    args = (S.HEALTHY, 2, ERROR, 100)
    assert after_probe(HC, "no", R, *args).restart is False
    assert after_probe(HC, "always", STOP, *args).restart is False
    assert after_probe(HC, "on-failure", R, *args).state == S.UNHEALTHY
    assert (
        "3 health checks failed in a row (last: boom)"
        in after_probe(HC, "always", R, *args, "boom").reason
    )


def test_an_unknown_ending_counts_as_a_failure():
    assert Ending.of(None).failed and Ending.of({"code": None, "signal": None}).failed
    assert Ending.of({"code": 0}).failed is False and Ending.of({"signal": 9}).signal == 9


class PolicyMachine(RuleBasedStateMachine):
    """Drives health verdicts and the restart policy as the supervisor does,
    with a clock it controls, against a simple model of DESIGN §4."""

    @initialize(
        mode=st.sampled_from(["no", "on-failure", "always", "unless-stopped"]),
        max_retries=st.integers(0, 5),
        initial=st.floats(0, 10),
        maximum=st.floats(0, 300),
        reset_after=st.floats(0.5, 120),
        retries=st.integers(1, 4),
        start_period=st.floats(0, 60),
    )
    def setup(self, mode, max_retries, initial, maximum, reset_after, retries, start_period):
        self.policy = RestartPolicySection(
            mode=mode,
            max_retries=max_retries,
            backoff_initial=initial,
            backoff_max=maximum,
            reset_after=reset_after,
        )
        self.hc = HealthcheckSection(retries=retries, start_period=start_period)
        self.failures = 0
        self.now = 0.0
        self.book = RestartBook()
        self.state = S.CREATED
        self.desired = R
        self.restart_at = None
        # the model
        self.quick_failures = 0  # restarts in a row, as the spec counts them
        self.restarts = 0
        self._start()

    def _go(self, new):
        assert is_allowed(self.state, new), f"{self.state} -> {new}"
        self.state = new

    def _start(self):
        self._go(S.STARTING)
        self.started_at = self.now
        self.failures = 0
        self.book = after_start(self.book, self.now)

    @rule(dt=st.floats(0, 200))
    def time_passes(self, dt):
        self.now += dt

    @precondition(lambda self: self.state in (S.STARTING, S.HEALTHY, S.UNHEALTHY))
    @rule(status=st.sampled_from([HEALTHY, LOADING, DOWN, ERROR]), jitter=st.floats(-1, 1))
    def probe(self, status, jitter):
        before = self.state
        v = after_probe(
            self.hc,
            self.policy.effective_mode,
            self.desired,
            self.state,
            self.failures,
            status,
            self.now - self.started_at,
        )
        self._go(v.state)
        # the model
        if status == HEALTHY:
            assert (v.state, v.failures, v.restart) == (S.HEALTHY, 0, False)
        elif before == S.STARTING and self.now - self.started_at < self.hc.start_period:
            assert (v.state, v.failures, v.restart) == (S.STARTING, 0, False)
        else:
            assert v.failures == self.failures + 1
            if v.failures < self.hc.retries:
                assert v.state == before and not v.restart
            else:
                assert v.state == S.UNHEALTHY
                assert v.restart == (
                    before != S.UNHEALTHY
                    and wants_restart(self.policy.effective_mode, Ending(unhealthy=True), R)
                )
        self.failures = v.failures
        if v.restart:  # the supervisor stops it; the policy decides what follows
            self._end(Ending(unhealthy=True), jitter, user_stop=False)

    @precondition(lambda self: self.state in (S.STARTING, S.HEALTHY, S.UNHEALTHY))
    @rule(
        code=st.one_of(st.none(), st.integers(0, 255)),
        signal=st.one_of(st.none(), st.sampled_from([9, 11, 15])),
        jitter=st.floats(-1, 1),
        user_stop=st.booleans(),
    )
    def run_ends(self, code, signal, jitter, user_stop):
        self._end(Ending(code=code, signal=signal), jitter, user_stop)

    def _end(self, ending, jitter, user_stop):
        if user_stop:
            self.desired = STOP
            self._go(S.STOPPING)
        stayed_up = self.now - self.started_at >= self.policy.reset_after
        streak = 0 if stayed_up else self.quick_failures
        d = after_exit(self.policy, self.book, ending, self.desired, self.now, jitter)
        self._go(d.state)
        if self.desired == STOP:
            assert d.state == S.STOPPED
        elif not wants_restart(self.policy.effective_mode, ending, self.desired):
            assert d.state == S.EXITED
        elif streak >= self.policy.max_retries:
            assert d.state == S.FAILED  # failed exactly when the budget is spent
        else:
            assert d.state == S.BACKOFF
            base = min(self.policy.backoff_max, self.policy.backoff_initial * 2**streak)
            delay = d.restart_at - self.now
            assert base * 0.9 - 1e-9 <= delay <= base * 1.1 + 1e-9
            streak += 1
            self.restarts += 1
            self.restart_at = d.restart_at
        self.quick_failures = streak
        self.book = d.book

    @precondition(lambda self: self.state == S.BACKOFF)
    @rule()
    def backoff_elapses(self):
        self.now = self.restart_at
        self._start()

    @precondition(lambda self: self.state in (S.FAILED, S.EXITED, S.STOPPED))
    @rule()
    def user_up(self):
        self.desired = R
        self.book = RestartBook.fresh(self.book.restarts)
        self.quick_failures = 0
        self._start()

    @invariant()
    def counters_match_the_model(self):
        if hasattr(self, "book"):
            assert self.book.restarts == self.restarts
            assert self.book.streak == self.quick_failures
            assert self.book.streak <= self.policy.max_retries


PolicyMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_policy_state_machine = PolicyMachine.TestCase
