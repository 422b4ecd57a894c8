"""`make test`'s two test processes (pytest-xdist, `-n 2 --dist loadgroup`): the heavy tests, those that start
Ray, DeepSpeed, a training run or a server, run one after the other on one process in their usual order (tests on
the session's Ray cluster last: conftest); every other test runs on the other process meanwhile, also in its usual
order. Heavy tests side by side starved each other (a sweep timed out); the others need one core at most, which
the heavy ones leave idle while Ray starts.

xdist's own loadgroup reads `xdist_group` markers from node ids that pytest 9 no longer lets it rename, so the
groups are handed over here: each test process writes the ids of its heavy tests to a file the controller named
(`configure_node`); the controller's scheduler (`make_scheduler`) keeps each group one work unit.
"""

from __future__ import annotations

from pathlib import Path

# A test is heavy when it has one of these markers or uses one of these fixtures (conftest: both imply `ray`).
HEAVY_MARKERS = ("ray", "deepspeed", "slow", "chromium", "server")
HEAVY_FIXTURES = ("ray_cluster", "reference_run")
_KEY = "ermgap_heavy_ids"


def is_heavy(item) -> bool:
    return (any(item.get_closest_marker(m) for m in HEAVY_MARKERS)
            or any(f in getattr(item, "fixturenames", ()) for f in HEAVY_FIXTURES))


def _ours(config) -> bool:
    return config.getoption("dist", "no") == "loadgroup"


def configure_node(node) -> None:
    """Controller, per test process: where that process writes its heavy tests' ids (the session's basetemp)."""
    if _ours(node.config):
        node.workerinput[_KEY] = str(node.config._tmp_path_factory.getbasetemp() / f"heavy-{node.gateway.id}.txt")


def write_heavy_ids(config, items) -> None:
    """Test process, after collection (before xdist reports it): the ids of the heavy tests, in order."""
    path = getattr(config, "workerinput", {}).get(_KEY)
    if path is not None:
        tmp = Path(path + ".tmp")
        tmp.write_text("".join(f"{item.nodeid}\n" for item in items if is_heavy(item)))
        tmp.replace(path)


def make_scheduler(config, log):
    """Controller: the scheduler for `--dist loadgroup` (None otherwise: xdist's own)."""
    if not _ours(config):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class HeavyAndLight(LoadScopeScheduling):
        """Two work units, 'heavy' and 'light', each sent whole to one process (LoadScopeScheduling keeps a
        unit's tests in collection order and gives a process its next unit only when it is nearly done)."""

        heavy: set[str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.heavy is None:  # every process has reported its collection (identical, checked by xdist)
                path = Path(next(iter(self.registered_collections)).workerinput[_KEY])
                self.heavy = set(path.read_text().splitlines())
            return "heavy" if nodeid in self.heavy else "light"

    return HeavyAndLight(config, log)
