"""``ray_lt.stages.run_graph``: stages start when what they read is done and what they hold
fits beside the running ones; one at a time in order without a budget; a failure stops new
starts and is raised after the running stages end. No Ray: the stages here are functions."""

import threading
import time

import pytest
from conftest import ROOT

from ray_lt.config import load_config
from ray_lt.pipeline import RUN_STAGES, STAGES
from ray_lt.stages import Stage, run_graph


class Recorder:
    """Runs each stage's body, noting the order of starts and ends and how many ran at once."""

    def __init__(self, bodies=None):
        self.bodies = bodies or {}
        self.events, self.beside = [], {}
        self.running, self.most = 0, 0
        self.lock = threading.Lock()

    def __call__(self, stage, beside):
        with self.lock:
            self.events.append(("start", stage.name))
            self.beside[stage.name] = [b.name for b in beside]
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.bodies.get(stage.name, lambda: time.sleep(0.05))()
        finally:
            with self.lock:
                self.running -= 1
                self.events.append(("end", stage.name))

    def order(self, kind):
        return [name for k, name in self.events if k == kind]


def stage(name, cpus=0.0, after=()):
    return Stage(name, name, run=lambda s: None, holds=lambda cfg: {"CPU": cpus}, after=after)


def test_independent_stages_that_fit_run_side_by_side_and_readers_wait():
    both = threading.Barrier(2, timeout=10)  # a and b each wait until the other has started
    record = Recorder({"a": both.wait, "b": both.wait})
    stages = [stage("a", 0.5), stage("b", 0.5), stage("c", 0.5, after=("a",))]
    run_graph(stages, record, None, {"CPU": 1.0})
    assert record.most == 2
    assert record.events.index(("start", "c")) > record.events.index(("end", "a"))
    assert record.beside["a"] == [] and record.beside["b"] == ["a"]
    assert record.beside["c"] in ([], ["b"])


def test_stages_that_do_not_fit_together_never_overlap():
    record = Recorder()
    stages = [stage("a", 1.0), stage("b", 0.5), stage("c", 0.5)]
    run_graph(stages, record, None, {"CPU": 1.0})
    # b and c fit together once a (alone: it holds the whole budget) is done
    assert record.order("start")[0] == "a"
    assert record.events.index(("start", "b")) > record.events.index(("end", "a"))
    assert record.beside["a"] == [] and record.beside["b"] == []


def test_a_stage_larger_than_the_budget_still_runs_alone():
    record = Recorder()
    run_graph([stage("big", 4.0), stage("small", 0.5)], record, None, {"CPU": 1.0})
    assert record.order("end") == ["big", "small"] and record.most == 1


def test_without_a_budget_stages_run_one_at_a_time_in_the_given_order():
    record = Recorder()
    stages = [stage("a"), stage("b"), stage("c", after=("a",)), stage("d")]
    run_graph(stages, record, None, None)
    assert record.order("start") == ["a", "b", "c", "d"] and record.most == 1
    assert record.events == [(k, n) for n in "abcd" for k in ("start", "end")]


def test_a_failure_stops_new_starts_lets_running_stages_end_and_is_raised():
    def fail():
        raise ValueError("b broke")

    slow_started = threading.Event()
    record = Recorder({"slow": lambda: (slow_started.set(), time.sleep(0.3)),
                       "b": lambda: (slow_started.wait(5), fail())})
    stages = [stage("slow", 0.5), stage("b", 0.5), stage("after_b", after=("b",)),
              stage("later", 0.5, after=("slow",))]
    with pytest.raises(ValueError, match="b broke"):
        run_graph(stages, record, None, {"CPU": 1.0})
    assert ("end", "slow") in record.events  # the running stage was waited for
    assert "after_b" not in record.order("start") and "later" not in record.order("start")


def test_reads_of_stages_outside_the_list_are_taken_as_done_and_a_cycle_is_refused():
    record = Recorder()
    run_graph([stage("c", after=("elsewhere",))], record, None, {"CPU": 1.0})
    assert record.order("end") == ["c"]
    with pytest.raises(RuntimeError, match="never run"):
        run_graph([stage("x", after=("y",)), stage("y", after=("x",))], Recorder(), None,
                  {"CPU": 1.0})


def test_the_default_run_trains_the_generator_beside_the_baseline_on_two_cpus():
    cfg = load_config(ROOT / "configs" / "digits_lt.yaml")
    generator, classifier = STAGES["generator"], STAGES["classifier"]
    assert generator.reads(cfg) == ()  # the pixel generator reads nothing of the run
    feature = load_config(ROOT / "configs" / "digits_lt.yaml", [
        "generator={kind: feature}", "final.init=baseline", "synthesis.filter.enabled=false"])
    assert generator.reads(feature) == ("statistics",)  # LDMLR learns the baseline's features
    held = classifier.holds(cfg)["CPU"] + generator.holds(cfg)["CPU"]
    assert held <= 2.0 - 1.0  # beside one Ray Data task on the 2-CPU machine

    # The registry's order, scheduled with the default's holdings on a 2-CPU cluster.
    record = Recorder({s.name: lambda: time.sleep(0.02) for s in RUN_STAGES})
    with_bodies = [s for s in RUN_STAGES if s.enabled(cfg)]
    run_graph(with_bodies, record, cfg, {"CPU": 1.0, "GPU": 0.0})
    assert record.beside["generator"] == ["classifier"]
    assert record.order("end")[-1] == "report"
    for s in with_bodies:  # every stage started after the ones it reads had ended
        for name in set(s.reads(cfg)) & {w.name for w in with_bodies}:
            assert record.events.index(("start", s.name)) > record.events.index(("end", name))
