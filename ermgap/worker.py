"""A Ray Train worker's place in its group: rank and world size, the object collectives the recipe uses
outside the math (broadcast of rank 0's choice, gather of every rank's rows), the services it must reach,
and the checkpoint every rank resumes from.

None of this is the objective's all-reduce (ermgap.objectives.cells.all_reduce_sum): these move Python objects
(run ids, predictions, cache statistics), never tensors with gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import torch

from ermgap import checkpointing
from ermgap.checkpointing import TrainerState
from ermgap.storage import Location
from ermgap.tracking import check_server


@dataclass(frozen=True)
class WorkerGroup:
    rank: int
    world: int

    @classmethod
    def current(cls) -> WorkerGroup:
        """This Ray Train worker's rank and world size."""
        ctx = ray.train.get_context()
        return cls(ctx.get_world_rank(), ctx.get_world_size())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def placement(self) -> list[tuple[str, str]]:
        """(node id, node IP) of every rank, in rank order."""
        return self.gather((ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()))

    def check_services(self, run_dir: Location, tracking_uri: str) -> None:
        """Fail the run at once, naming the node and the reason, when this worker cannot reach the run's
        store or (rank 0) the tracking server: otherwise the first checkpoint or MLflow call would retry
        for minutes."""
        where = f"worker {self.rank} on node {ray.util.get_node_ip_address()}"
        run_dir.check_reachable(where)
        if self.rank == 0:
            check_server(tracking_uri, where)

    def checkpoint_to_resume(self) -> ray.train.Checkpoint | None:
        """Ray's latest registered checkpoint, or a newer complete one on local storage (see
        checkpointing.newest_on_disk); rank 0 decides so every rank loads the same one."""
        registered = ray.train.get_checkpoint()
        choice = None
        if self.rank == 0:
            choice = registered.path if registered is not None else None
            storage = ray.train.get_context().get_storage()
            exp_dir = Path(storage.experiment_fs_path)
            # Only a local (or NFS) store can hold a newer checkpoint Ray did not register.
            if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem) and exp_dir.is_dir():
                newest = checkpointing.newest_on_disk(exp_dir, self.world)
                reg_step = -1
                if registered is not None and (Path(registered.path) / "trainer_state.json").is_file():
                    reg_step = TrainerState.from_json(
                        (Path(registered.path) / "trainer_state.json").read_text()).global_step
                if newest is not None and newest[1] > reg_step:
                    choice = str(newest[0])
        choice = self.broadcast(choice)
        if choice is None:
            return None
        if registered is not None and choice == registered.path:
            return registered
        return ray.train.Checkpoint.from_directory(choice)


__all__ = ["WorkerGroup"]
