"""The run's training stream: one Ray Dataset over every epoch of the plan, split by Ray Train.

The training stream (``build_train_dataset``) is one Ray Dataset for the run: block g = one rank's
next ``StreamLayout.steps_per_block`` steps (fetch the rows, preprocess in the run's one actor
pool). All blocks hold the same number of rows, so ``streaming_split(world, equal=True)`` with
``preserve_order`` deals them round-robin: rank r gets exactly its own plan sequence, every epoch
(``train.epochs`` = passes over the same plan). Resuming after ``s`` steps starts at block
``StreamLayout.start_block(s)``; earlier blocks are neither read nor preprocessed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pixellm.config import DataConfig, ModelConfig, Recipe, TrainConfig
from pixellm.data.formats import DataError
from pixellm.data.stream import (
    CHUNK_ROWS,
    Plan,
    PreprocessBatch,
    fetch_rows,
    make_plan,
    rows_to_columns,
)

__all__ = [
    "PlanBlockPreprocess",
    "StreamLayout",
    "build_train_dataset",
    "create_start_board",
    "preprocess_pool_size",
    "set_stream_start",
    "train_plan",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamLayout:
    """How the run's plan maps onto Ray Data blocks, ranks and optimizer steps.

    One block = ``steps_per_block`` steps of one rank (``rows_per_block`` rows). Global block ``g``
    (over all epochs) belongs to rank ``g % world``; ``streaming_split(world, equal=True)`` deals
    equal-sized blocks round-robin in order (it always serves the rank with the fewest rows, lowest
    index first, and ``preserve_order`` keeps the block order), so rank r receives exactly blocks
    r, r + world, … — and a run that has done ``s`` steps resumes at block ``start_block(s)``.

    Attributes:
        world: workers.
        micro: ``train.micro_batch_size``.
        grad_accum: ``train.grad_accum``.
        steps_per_epoch: ``train.steps_per_epoch``.
        epochs: ``train.epochs`` (passes over the same plan).
        steps_per_block: a divisor of gcd(``checkpoint_every``, ``steps_per_epoch``) so that
            checkpoints fall on block boundaries.
    """

    world: int
    micro: int
    grad_accum: int
    steps_per_epoch: int
    epochs: int
    steps_per_block: int

    @classmethod
    def for_train(cls, train: TrainConfig, world: int) -> StreamLayout:
        """The layout of a recipe's ``train`` section (``CHUNK_ROWS`` caps the block size)."""
        step_rows = train.micro_batch_size * train.grad_accum
        g = math.gcd(train.checkpoint_every, train.steps_per_epoch)
        k = max([d for d in range(1, g + 1) if g % d == 0 and d * step_rows <= CHUNK_ROWS] or [1])
        return cls(
            world,
            train.micro_batch_size,
            train.grad_accum,
            train.steps_per_epoch,
            train.epochs,
            k,
        )

    @property
    def rows_per_step(self) -> int:
        """Rows one rank consumes per optimizer step."""
        return self.micro * self.grad_accum

    @property
    def rows_per_block(self) -> int:
        return self.rows_per_step * self.steps_per_block

    @property
    def rank_rows_per_epoch(self) -> int:
        """Plan rows per rank and epoch."""
        return self.steps_per_epoch * self.rows_per_step

    @property
    def num_blocks(self) -> int:
        """Blocks of the whole run (all epochs, all ranks)."""
        return self.epochs * self.steps_per_epoch // self.steps_per_block * self.world

    def start_block(self, steps_done: int) -> int:
        """First block to produce when every rank has done ``steps_done`` optimizer steps."""
        return steps_done // self.steps_per_block * self.world

    def block(self, g: int) -> tuple[int, int, int]:
        """Block ``g`` → ``(rank, first row in that rank's epoch plan, first global step, 1-based)``."""
        rank, b = g % self.world, g // self.world  # b: the rank's b-th block of the run
        blocks_per_epoch = self.steps_per_epoch // self.steps_per_block
        epoch, in_epoch = divmod(b, blocks_per_epoch)
        first_step = epoch * self.steps_per_epoch + in_epoch * self.steps_per_block + 1
        return rank, in_epoch * self.rows_per_block, first_step


def train_plan(recipe: Recipe, world: int) -> Plan:
    """The run's epoch plan: ``world`` rank sequences of ``steps_per_epoch`` steps of rows each."""
    t = recipe.train
    rows = t.steps_per_epoch * t.micro_batch_size * t.grad_accum
    return make_plan(recipe.data, recipe.data.train_split, rows, t.seed, ranks=world)


class _StartBoard:
    """Ray actor holding the block a new execution of the training stream starts at."""

    def __init__(self) -> None:
        self.block = 0

    def set(self, block: int) -> None:
        self.block = int(block)

    def get(self) -> int:
        return self.block


def create_start_board(name: str) -> Any:
    """Create (or find) the named start-position actor of a run (lives with the driver's job)."""
    import ray

    return (
        ray.remote(_StartBoard)
        .options(name=name, num_cpus=0, get_if_exists=True, max_restarts=-1)
        .remote()
    )


def set_stream_start(name: str, block: int) -> None:
    """Tell the next execution of the stream to start at ``block`` (call before iterating)."""
    import ray

    ray.get(ray.get_actor(name).set.remote(block))


class PlanBlockPreprocess:
    """``map_batches`` UDF over block ids: fetch a block's shard rows, then ``PreprocessBatch``.

    Blocks before the start position (``start_board``, set by rank 0 after restoring a checkpoint)
    produce nothing: they are neither read nor preprocessed. Every other block yields exactly
    ``layout.rows_per_block`` rows; a row that preprocessing drops is replaced by repeating the
    block's usable rows (logged), so the ranks' step counts stay equal.

    Args:
        model: the recipe's model section.
        data: the recipe's data section.
        plan: ``train_plan`` output.
        layout: the run's ``StreamLayout``.
        start_board: name of the ``create_start_board`` actor (None = start at block 0).
    """

    def __init__(
        self,
        model: ModelConfig,
        data: DataConfig,
        plan: Plan,
        layout: StreamLayout,
        start_board: str | None,
    ):
        import ray

        self.preprocess = PreprocessBatch(model, data)
        self.plan, self.layout = plan, layout
        self.start = ray.get(ray.get_actor(start_board).get.remote()) if start_board else 0

    def _block(self, g: int) -> dict[str, np.ndarray]:
        lay = self.layout
        rank, first, step = lay.block(g)
        base = rank * lay.rank_rows_per_epoch + first
        part = self.plan[base : base + lay.rows_per_block]
        rows = self.preprocess.process_rows(fetch_rows(part).to_pylist())
        if not rows:
            raise DataError(
                f"every sample of plan block {g} (rank {rank}, step {step}) was dropped by "
                f"preprocessing: {dict(self.preprocess.dropped)}"
            )
        if len(rows) < lay.rows_per_block:
            logger.warning(
                "plan block %d: %d of %d rows dropped; repeating usable rows to keep steps equal",
                g,
                lay.rows_per_block - len(rows),
                lay.rows_per_block,
            )
            rows = [rows[i % len(rows)] for i in range(lay.rows_per_block)]
        cols = rows_to_columns(rows, self.preprocess.model.image_size)
        cols["step"] = step + np.arange(lay.rows_per_block, dtype=np.int64) // lay.rows_per_step
        return cols

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blocks = [self._block(int(g)) for g in batch["id"] if int(g) >= self.start]
        if not blocks:
            empty = rows_to_columns([], self.preprocess.model.image_size)
            return {**empty, "step": np.zeros(0, np.int64)}
        return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def preprocess_pool_size(recipe: Recipe) -> int:
    """Actors of the run's one preprocessing pool (``data.preprocess_actors`` or the free CPUs)."""
    import ray

    if recipe.data.preprocess_actors is not None:
        return recipe.data.preprocess_actors
    t = recipe.train
    free = ray.cluster_resources().get("CPU", 1) - t.num_workers * t.cpus_per_worker
    return max(1, int(free / recipe.data.preprocess_cpus))


def build_train_dataset(recipe: Recipe, world: int, start_board: str | None = None) -> Any:
    """The run's one training Dataset: every block of every epoch, split by Ray Train.

    Args:
        recipe: the recipe (``data``, ``model`` for preprocessing, ``train`` for the layout).
        world: workers the stream is split across (``streaming_split(world, equal=True)``).
        start_board: ``create_start_board`` actor name (resume offset), None = from block 0.

    Returns:
        ``ray.data.Dataset`` of ``PreprocessBatch`` columns plus ``step`` (the global optimizer
        step a row belongs to), ``StreamLayout.num_blocks`` blocks of ``rows_per_block`` rows,
        in plan order when executed with ``preserve_order`` (``pixellm.train.driver`` sets it
        through ``DataConfig(execution_options=…)``, where Ray Train applies it).

    Raises:
        DataError: a corpus with ratio > 0 has no shards for the train split.
    """
    import ray

    layout = StreamLayout.for_train(recipe.train, world)
    plan = train_plan(recipe, world)
    # Block ids as in-memory items: no read task (a read task wants a whole CPU, which a laptop
    # cluster full of train workers may not have), one id per input block.
    ids = [{"id": g} for g in range(layout.num_blocks)]
    ds = ray.data.from_items(ids, override_num_blocks=layout.num_blocks)
    # One block id per call: fetch + preprocess in the same actor, one output block per call.
    return ds.map_batches(
        PlanBlockPreprocess,
        fn_constructor_kwargs={
            "model": recipe.model,
            "data": recipe.data,
            "plan": plan,
            "layout": layout,
            "start_board": start_board,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=preprocess_pool_size(recipe)),
        num_cpus=recipe.data.preprocess_cpus,
    )
