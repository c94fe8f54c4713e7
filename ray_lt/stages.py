"""What a stage is (``Stage``: the pipeline's registry, ``ray_lt.pipeline.STAGES``, is made of
them) and what a run directory records of its stages: which config keys made each stage's
output, so that a rerun can skip a finished stage and refuse one whose config changed (instead
of quietly mixing two configs), and how long each took.

``DIR/stages.json`` maps a stage name to the dotted config keys and values it was made with,
and to its timings.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_lt.atomic import write_text_atomic
from ray_lt.config import Config, section_model
from ray_lt.errors import ConfigError, StageError

STAGES_FILE = "stages.json"

Keys = tuple[tuple[str, ...], tuple[str, ...]]
"""(included prefixes, excluded prefixes) of the dotted config keys that change what a stage
writes."""


def _always(_: Any) -> bool:
    return True


def _no_note(_: Any) -> str:
    return ""


def _holds_nothing(_: Any) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class Stage:
    """One step of a run, as ``ray_lt.pipeline.STAGES`` lists them: ``run(session, **kw)``
    does the work into the session's run directory and returns the stage's result.

    ``keys`` are the config keys recorded for it in ``stages.json`` (None: nothing recorded),
    and a rerun with other values is refused while ``output(cfg, out_dir)`` exists (unless
    ``redo_on_change``: the stage is then redone). ``complete(session)`` says that the output
    is whole, so ``run`` is skipped and ``load(session)`` gives the result. ``needs`` names
    what it runs on the cluster (``train``, ``synthesis``) and ``holds(cfg)`` the resources
    (``{"CPU": .., "GPU": ..}``) it keeps while it runs; ``after`` names the stages whose
    outputs it reads (or gives them per config), ``enabled(cfg)`` whether the config asks for
    it, and ``disabled(session)`` tidies up where it does not; ``note(cfg)`` goes into its
    banner and ``done`` into the line that says its work was skipped."""

    name: str
    title: str
    run: Callable[..., Any]
    keys: Keys | None = None
    output: Callable[[Any, Path], Path] | None = None
    complete: Callable[[Any], bool] | None = None
    load: Callable[[Any], Any] | None = None
    needs: tuple[str, ...] = ()
    holds: Callable[[Any], dict[str, float]] = _holds_nothing
    after: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    enabled: Callable[[Any], bool] = _always
    disabled: Callable[[Any], None] | None = None
    recorded: Callable[[Any], bool] = _always
    redo_on_change: bool = False
    note: Callable[[Any], str] = _no_note
    done: str = "already done"

    def reads(self, cfg: Any) -> tuple[str, ...]:
        """The stages whose outputs it reads with this config."""
        return self.after(cfg) if callable(self.after) else self.after


def run_graph(stages: Sequence[Stage], start: Callable[[Stage, list[Stage]], Any], cfg: Any,
              budget: dict[str, float] | None) -> None:
    """Run each of ``stages`` (``start(stage, beside)``, ``beside`` the stages running then)
    as soon as the stages it reads are done and what it holds fits, beside what runs already,
    within ``budget`` (resources, e.g. the cluster's CPUs less what Ray Data's tasks need); a
    stage starts whenever nothing else runs. Stages that are ready together start in the order
    given. ``budget`` None runs them one at a time in that order. After a failure no stage
    starts; the running ones end, then the first error is raised."""
    names = {stage.name for stage in stages}
    pending, running, done = list(stages), {}, set()
    finished: queue.Queue[tuple[Stage, BaseException | None]] = queue.Queue()
    failure: BaseException | None = None

    def work(stage: Stage, beside: list[Stage]) -> None:
        try:
            start(stage, beside)
            finished.put((stage, None))
        except BaseException as err:  # handed to the scheduling thread, which raises it
            finished.put((stage, err))

    def fits(stage: Stage) -> bool:
        if not running:
            return True
        if budget is None:
            return False
        held: dict[str, float] = {}
        for other in [*running.values(), stage]:
            for key, value in other.holds(cfg).items():
                held[key] = held.get(key, 0.0) + value
        return all(held.get(key, 0.0) <= limit + 1e-9 for key, limit in budget.items())

    while pending or running:
        for stage in list(pending) if failure is None else []:
            ready = set(stage.reads(cfg)) & names <= done
            if ready and fits(stage):
                pending.remove(stage)
                beside = list(running.values())
                running[stage.name] = stage
                threading.Thread(target=work, args=(stage, beside), daemon=True,
                                 name=f"stage-{stage.name}").start()
            elif budget is None:
                break  # one at a time, in order
        if not running:
            if failure is None and pending:
                raise RuntimeError(f"stages {[s.name for s in pending]} read stages that never "
                                   f"run before them")
            break
        stage, err = finished.get()
        del running[stage.name]
        if err is None:
            done.add(stage.name)
        elif failure is None:
            failure = err
    if failure is not None:
        raise failure


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": value}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}." if isinstance(value, dict) else
                           f"{prefix}{key}"))
    return out


def stage_keys(cfg: Config, stage: Stage) -> dict[str, Any]:
    """The config keys and values that determine ``stage``'s output."""
    included, excluded = stage.keys or ((), ())
    return {k: v for k, v in flatten(cfg.model_dump(mode="json")).items()
            if k.startswith(included) and not k.startswith(excluded)}


def _document(out_dir: Path) -> dict[str, Any]:
    """``stages.json``: ``{"config": {stage: keys}, "timings": {stage: [measurement, ...]}}``
    (a file of the first format, stage -> keys at the top level, reads as its config part)."""
    path = Path(out_dir) / STAGES_FILE
    try:
        doc = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: not a valid stages record ({err}); it says which config "
                         f"made each stage of the run. Restore it, or use a new --out") from None
    if not isinstance(doc, dict):
        raise StageError(f"{path}: not a valid stages record (a JSON object); restore it, or "
                         f"use a new --out")
    if doc and set(doc) - {"config", "timings"}:
        doc = {"config": doc}
    return {"config": doc.get("config", {}), "timings": doc.get("timings", {})}


def _write(out_dir: Path, doc: dict[str, Any]) -> None:
    write_text_atomic(Path(out_dir) / STAGES_FILE, json.dumps(doc, indent=1, sort_keys=True))


def _records(out_dir: Path) -> dict[str, dict[str, Any]]:
    return _document(out_dir)["config"]


_ABSENT = object()


def default_value(key: str) -> Any:
    """The config default of a dotted key as ``stage_keys`` writes it (plain JSON values),
    ``_ABSENT`` where it has none (dataset keys, required keys)."""
    section: Any = Config
    parts = key.split(".")
    if parts[0] == "dataset":
        return _ABSENT
    for part in parts[:-1]:
        field = section.model_fields.get(part)
        section = section_model(field.annotation) if field is not None else None
        if section is None:
            return _ABSENT
    field = section.model_fields.get(parts[-1])
    if field is None or field.is_required():
        return _ABSENT
    value = field.get_default(call_default_factory=True)
    return json.loads(json.dumps(value, default=str))


def _unchanged(recorded: dict[str, Any], now: dict[str, Any], key: str) -> bool:
    if key in recorded:
        return recorded[key] == now.get(key)
    # A key the config gained after the record was written changes nothing at its default.
    return key in now and default_value(key) == now[key]


def check_stage(cfg: Config, out_dir: Path, stage: Stage, output: Path,
                name: str | None = None) -> None:
    """Raise when ``stage`` was recorded in ``out_dir`` (as ``name``, default its own) with
    other config values (a key added to the config since, at its default value, is not a
    change)."""
    name = name or stage.name
    recorded = _records(out_dir).get(name)
    if recorded is None:
        return
    now = stage_keys(cfg, stage)
    changed = [k for k in sorted(set(recorded) | set(now), key=lambda k: (k[-5:] != ".kind", k))
               if not _unchanged(recorded, now, k)]  # another kind first: it explains the rest
    if changed:
        shown = "; ".join(f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise ConfigError(f"{out_dir}: its {name} stage was made with another config: "
                          f"{shown}{more}. Use a new --out, or delete {output} to redo that "
                          f"stage and the ones after it")


def check_stages(cfg: Config, out_dir: Path, stages: list[Stage]) -> None:
    """``check_stage`` for every stage whose output exists: run before any work starts (a
    stages record that cannot be read is refused even where no output exists yet)."""
    _records(out_dir)
    for stage in stages:
        if stage.keys is None or stage.output is None or stage.redo_on_change \
                or not stage.enabled(cfg):
            continue
        output = stage.output(cfg, Path(out_dir))
        if output.exists():
            check_stage(cfg, out_dir, stage, output)


def stage_matches(cfg: Config, out_dir: Path, stage: Stage, name: str | None = None) -> bool:
    """Whether ``stage`` was recorded in ``out_dir`` (as ``name``) with this config
    (``check_stage``'s sense)."""
    recorded = _records(out_dir).get(name or stage.name)
    if recorded is None:
        return False
    now = stage_keys(cfg, stage)
    return all(_unchanged(recorded, now, k) for k in set(recorded) | set(now))


_WRITING = threading.Lock()  # stages running side by side record into one stages.json


def record_stage(cfg: Config, out_dir: Path, stage: Stage, name: str | None = None) -> None:
    """Note that ``stage`` finished in ``out_dir`` (as ``name``) with this config."""
    with _WRITING:
        doc = _document(out_dir)
        doc["config"][name or stage.name] = stage_keys(cfg, stage)
        _write(out_dir, doc)


def forget_stage(out_dir: Path, stage: Stage) -> None:
    with _WRITING:
        doc = _document(out_dir)
        if doc["config"].pop(stage.name, None) is not None:
            _write(out_dir, doc)


def record_timing(out_dir: Path, stage: str, seconds: float, driver_peak_rss_mb: float,
                  started: float | None = None) -> None:
    """Append one measurement of ``stage`` (wall time, the driver's peak resident memory and,
    in a run, when it started: seconds after the run began) to its history in
    ``stages.json``: a rerun that skips finished work adds a short entry."""
    entry = {"seconds": round(seconds, 3), "driver_peak_rss_mb": round(driver_peak_rss_mb, 1),
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if started is not None:
        entry["started_after"] = round(started, 3)
    with _WRITING:
        doc = _document(out_dir)
        doc["timings"].setdefault(stage, []).append(entry)
        _write(out_dir, doc)


def timings(out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every recorded measurement per stage, oldest first."""
    return _document(out_dir)["timings"]


class StageMeter:
    """Wall time and peak resident memory of this process over a ``with`` block, the memory
    sampled by a background thread every ``every`` seconds."""

    def __init__(self, every: float = 0.1):
        self.every = every
        self.seconds = 0.0
        self.peak_rss_mb = 0.0
        self.started = 0.0

    def __enter__(self) -> StageMeter:
        import psutil

        self._process = psutil.Process()
        self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.started
        self.peak_rss_mb = max(self._peak, self._process.memory_info().rss) / 2**20
