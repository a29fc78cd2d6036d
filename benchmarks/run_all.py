"""torchrepro against what users already have, measured side by side in one run.

Prints one markdown table (after a line with the date, machine and versions). Columns:
plain torch ``DataLoader``; torch + Lightning's ``pl_worker_init_function`` (what
``seed_everything(workers=True)`` adds); torchdata's ``StatefulDataLoader``;
``torchrepro.DataLoader``. A peer that is not installed is reported as "not installed".

1. Loader throughput (samples/s, ratio to plain torch): 64x64 uint8 RGB images through
   torchvision v2 RandomResizedCrop + flip + ColorJitter, and a dataset of scalar tensors;
   num_workers 0 and 2 (persistent, fork), batch 64, shuffled.
2. Mid-epoch resume at 10/50/90% of a 1,000,000-sample epoch (batch 256, 0 workers, a
   dataset returning its index, so the time is the loader's own): a fresh loader, its
   ``load_state_dict`` and the first batch (torchrepro, StatefulDataLoader), against
   skipping k batches by iterating (torch; the transformers/accelerate way). The
   StatefulDataLoader states come from a loader that iterated there; torchrepro's are
   written from its documented keys (``batches_received``, ``samples_consumed``) and
   checked, at 10%, against one that iterated. Lightning has no loader state of its own
   (its loops use the loader's). Skipping is capped by a time budget and
   extrapolated beyond it (marked "est."). One more row estimates skipping 90% on the
   image pipeline, from section 1's throughput with 2 workers.
3. Correctness, measured: a dataset drawing from torch, NumPy and ``random`` in
   ``__getitem__``; two shuffled epochs; the loop draws ``torch.rand`` after each batch (a
   stand-in for dropout); every run seeds random, NumPy and torch with 0 first. "rerun":
   two runs with 2 workers are equal; "0 vs 2 workers": the two epochs are equal; "resume":
   a run stopped mid-epoch 0 (skipping's best case) and continued by a fresh loader (``load_state_dict``, or for
   torch and Lightning: skip by iterating) with the global RNG states restored, gives the
   batches the uninterrupted run gave. Bitwise (``torch.equal``).
4. RNG state capture + restore: ``torchrepro.get_rng_state``/``set_rng_state`` against
   Lightning's private ``_collect_rng_states``/``_set_rng_states`` and
   ``torch.random.fork_rng`` (torch's generators only).
5. ``torchrepro.Trace`` overhead per training step (every step traced vs disabled), from
   ``trace_overhead.py``: the example-sized CNN (batch 64) and the ~5M-parameter MLP.

Repeats are interleaved (ABBA order) and medians reported; the machine may be shared.
Everything runs with one torch thread unless ``--threads`` says otherwise (loader workers
use one anyway; on a small shared machine more threads thrash and swamp the ratios).

    python benchmarks/run_all.py            # about 3 minutes on 2 cores
    python benchmarks/run_all.py --quick    # under a minute, noisier
    python benchmarks/run_all.py --smoke    # seconds, tiny sizes (the tests run it)
"""

from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import _common
import numpy as np
import torch
from loader_overhead import Images, Indices, Scalars
from torch.utils.data import Dataset
from trace_overhead import cnn, make_step, measure, mlp

import torchrepro
from torchrepro.data import DataLoader as ReproLoader
from torchrepro.data import _streams

TORCH, LIGHTNING, TORCHDATA, REPRO = "torch", "torch + Lightning", "torchdata", "torchrepro"
COLUMNS = (TORCH, LIGHTNING, TORCHDATA, REPRO)
SECTIONS = (1, 2, 3, 4, 5)
RESUME_BATCH = 256
FRACTIONS = (0.1, 0.5, 0.9)
NOT_INSTALLED = "not installed"


@dataclass(frozen=True)
class Sizes:
    images: tuple[int, int]  # samples per epoch with 0 and 2 workers
    scalars: tuple[int, int]
    repeats: int
    resume_samples: int
    resume_repeats: int
    skip_budget_s: float  # per skip-by-iterating measurement
    rng_calls: int
    rng_repeats: int
    trace: tuple[tuple[int, int], tuple[int, int]]  # (blocks, steps per block): CNN, MLP


SIZES = {
    "default": Sizes(
        images=(512, 1024),
        scalars=(50_000, 20_000),
        repeats=5,
        resume_samples=1_000_000,
        resume_repeats=5,
        skip_budget_s=20.0,
        rng_calls=200,
        rng_repeats=9,
        trace=((20, 20), (10, 4)),
    ),
    "quick": Sizes(
        images=(192, 384),
        scalars=(10_000, 5_000),
        repeats=2,
        resume_samples=1_000_000,
        resume_repeats=2,
        skip_budget_s=3.0,
        rng_calls=100,
        rng_repeats=3,
        trace=((4, 10), (4, 2)),
    ),
    "smoke": Sizes(
        images=(64, 128),
        scalars=(2_000, 2_000),
        repeats=1,
        resume_samples=100_000,
        resume_repeats=1,
        skip_budget_s=1.0,
        rng_calls=20,
        rng_repeats=1,
        trace=((2, 2), (2, 1)),
    ),
}


_START = time.perf_counter()


def _elapsed() -> str:
    return f"{time.perf_counter() - _START:.0f} s"


def log(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the header line and the table."""
    print(message, file=sys.stderr, flush=True)


# --- the peers ------------------------------------------------------------------------


@dataclass
class Peers:
    lightning: str | None  # version
    torchdata: str | None
    worker_init: Callable[[int], None] | None = None
    collect_rng: Callable[[], dict[str, Any]] | None = None
    set_rng: Callable[[dict[str, Any]], None] | None = None
    stateful_loader: Any = None

    def has(self, column: str) -> bool:
        if column == LIGHTNING:
            return self.worker_init is not None
        if column == TORCHDATA:
            return self.stateful_loader is not None
        return True


def load_peers() -> Peers:
    """Import the peers; what cannot be imported stays None and is reported."""
    peers = Peers(lightning=None, torchdata=None)
    for module in ("lightning.fabric.utilities.seed", "lightning_fabric.utilities.seed"):
        try:
            seed = __import__(module, fromlist=["pl_worker_init_function"])
        except ImportError:
            continue
        peers.lightning = _common.version(module.split(".")[0].replace("_", "-"))
        peers.worker_init = seed.pl_worker_init_function
        # Private API: absent in some versions, so each is optional.
        peers.collect_rng = getattr(seed, "_collect_rng_states", None)
        peers.set_rng = getattr(seed, "_set_rng_states", None)
        break
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        pass
    else:
        peers.stateful_loader = StatefulDataLoader
        peers.torchdata = _common.version("torchdata")
    return peers


def _fork() -> dict[str, Any]:
    methods = multiprocessing.get_all_start_methods()
    return {"multiprocessing_context": "fork"} if "fork" in methods else {}


def make_loader(
    peers: Peers,
    column: str,
    dataset: Dataset[Any],
    *,
    batch_size: int,
    num_workers: int,
    persistent: bool = False,
) -> Any:
    """The column's loader over ``dataset``, shuffled; seeded the way its users seed it."""
    kwargs: dict[str, Any] = {"batch_size": batch_size, "shuffle": True, "num_workers": num_workers}
    if num_workers:
        kwargs.update(persistent_workers=persistent, **_fork())
    if column == TORCH:
        return torch.utils.data.DataLoader(dataset, **kwargs)
    if column == LIGHTNING:
        return torch.utils.data.DataLoader(dataset, worker_init_fn=peers.worker_init, **kwargs)
    if column == TORCHDATA:
        return peers.stateful_loader(dataset, **kwargs)
    return ReproLoader(dataset, seed=0, **kwargs)


def seconds(duration: float) -> str:
    if duration >= 120:
        return f"{duration / 60:.1f} min"
    if duration >= 1:
        return f"{duration:.2f} s"
    if duration >= 1e-3:
        return f"{duration * 1e3:.1f} ms"
    return f"{duration * 1e6:.1f} us"


class Row:
    """One table row: a section, what is measured, and a cell per column."""

    def __init__(self, section: int, what: str, peers: Peers, default: str = "n/a") -> None:
        self.section, self.what = section, what
        self.cells = {c: (default if peers.has(c) else NOT_INSTALLED) for c in COLUMNS}
        if section == 2 and peers.has(LIGHTNING):
            self.cells[LIGHTNING] = "n/a (torch's loader)"

    def set(self, column: str, text: str) -> None:
        if self.cells[column] != NOT_INSTALLED:
            self.cells[column] = text

    def as_list(self) -> list[str]:
        return [str(self.section), self.what, *(self.cells[c] for c in COLUMNS)]


# --- 1. throughput ----------------------------------------------------------------------


def _epoch(loader: Any) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for _ in loader:
            pass
        return time.perf_counter() - start

    return run


def throughput(peers: Peers, sizes: Sizes) -> tuple[list[Row], dict[str, float]]:
    """Rows of section 1, and the image samples/s with 2 workers per column."""
    rows, image_rates = [], {}
    cases: list[tuple[str, Callable[[int], Dataset[Any]], tuple[int, int]]] = [
        ("images, torchvision v2 augmentation", Images, sizes.images),
        ("scalar tensors (trivial)", Scalars, sizes.scalars),
    ]
    for label, factory, per_workers in cases:
        for workers, n in zip((0, 2), per_workers, strict=True):
            log(f"1. throughput: {label}, {workers} workers, {n} samples ({_elapsed()})")
            dataset = factory(n)
            loaders = {
                c: make_loader(
                    peers, c, dataset, batch_size=64, num_workers=workers, persistent=True
                )
                for c in COLUMNS
                if peers.has(c)
            }
            medians = _common.interleaved(
                {c: _epoch(loader) for c, loader in loaders.items()}, sizes.repeats, warmup=1
            )
            del loaders
            gc.collect()  # shuts the persistent workers down
            rates = {c: n / t for c, t in medians.items()}
            row = Row(1, f"throughput, {label}, {workers} workers (samples/s)", peers)
            for c, rate in rates.items():
                row.set(
                    c, f"{rate:,.0f}" + ("" if c == TORCH else f" ({rate / rates[TORCH]:.2f}x)")
                )
            rows.append(row)
            if factory is Images and workers == 2:
                image_rates = rates
    return rows, image_rates


# --- 2. resume ---------------------------------------------------------------------------


def _resume_from_state(make: Callable[[], Any], state: dict[str, Any]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        loader = make()
        loader.load_state_dict(state)
        next(iter(loader))
        return time.perf_counter() - start

    return run


def _skip(
    make: Callable[[], Any], k: int, budget: float, extrapolated: list[bool]
) -> Callable[[], float]:
    """Seconds to skip ``k`` batches by iterating and get the next; extrapolated past budget."""

    def run() -> float:
        start = time.perf_counter()
        it = iter(make())
        for i in range(k):
            next(it)
            if i % 64 == 63 and time.perf_counter() - start > budget:
                extrapolated.append(True)
                return (time.perf_counter() - start) * (k + 1) / (i + 1)
        next(it)
        return time.perf_counter() - start

    return run


def resume(peers: Peers, sizes: Sizes, image_rates: dict[str, float]) -> list[Row]:
    n = sizes.resume_samples
    dataset = Indices(n)
    ks = [int(f * n) // RESUME_BATCH for f in FRACTIONS]

    def make(column: str) -> Callable[[], Any]:
        return lambda: make_loader(peers, column, dataset, batch_size=RESUME_BATCH, num_workers=0)

    template = make(REPRO)().state_dict()
    repro_states = {
        k: {**template, "batches_received": k, "samples_consumed": k * RESUME_BATCH} for k in ks
    }
    log(f"2. resume: checking torchrepro's written state against one iterated to batch {ks[0]}")
    loader = make(REPRO)()
    loader.load_state_dict(template)  # the template's stream (a second loader has its own)
    it = iter(loader)
    for _ in range(ks[0]):
        next(it)
    # taken while the pass runs: a pass given up (its iterator dropped) is over
    if loader.state_dict() != repro_states[ks[0]]:
        raise RuntimeError("torchrepro's state written from its keys differs from the real one")
    stateful_states: dict[int, dict[str, Any]] = {}
    if peers.has(TORCHDATA):
        log(f"2. resume: iterating a StatefulDataLoader to batch {ks[-1]} for its states")
        loader = make(TORCHDATA)()
        it = iter(loader)
        for i in range(1, ks[-1] + 1):
            next(it)
            if i in ks:
                stateful_states[i] = copy.deepcopy(loader.state_dict())
        del it

    rows = []
    for fraction, k in zip(FRACTIONS, ks, strict=True):
        log(f"2. resume at {fraction:.0%}: {k} batches of {RESUME_BATCH} ({_elapsed()})")
        extrapolated: list[bool] = []
        measures: dict[str, Callable[[], float]] = {
            TORCH: _skip(make(TORCH), k, sizes.skip_budget_s, extrapolated),
            REPRO: _resume_from_state(make(REPRO), repro_states[k]),
        }
        if peers.has(TORCHDATA):
            measures[TORCHDATA] = _resume_from_state(make(TORCHDATA), stateful_states[k])
        medians = _common.interleaved(measures, sizes.resume_repeats)
        row = Row(2, f"resume at {fraction:.0%} of {n:,} samples: time to first batch", peers)
        row.set(TORCH, f"{seconds(medians[TORCH])} skip" + (" (est.)" if extrapolated else ""))
        for c in (TORCHDATA, REPRO):
            if c in medians:
                row.set(c, f"{seconds(medians[c])} ({medians[c] / medians[TORCH]:.3f}x)")
        rows.append(row)
    if image_rates:
        skipped = ks[-1] * RESUME_BATCH
        row = Row(2, f"skip {skipped:,} samples on the image pipeline, 2 workers (est.)", peers)
        for c in (TORCH, LIGHTNING):
            if c in image_rates:
                row.set(c, f"{seconds(skipped / image_rates[c])} skip (est.)")
        rows.append(row)
    return rows


# --- 3. correctness -----------------------------------------------------------------------


class Noisy(Dataset[torch.Tensor]):
    """The index and one draw each from torch, NumPy and ``random``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        draws = [float(torch.rand(())), float(np.random.rand()), random.random()]
        return torch.tensor([float(i), *draws], dtype=torch.float64)


CORRECT_N, CORRECT_BATCH, CORRECT_EPOCHS = 64, 8, 2
CORRECT_STOP = 5  # mid-epoch 0 (8 batches per epoch): skipping needs no epoch boundary

Globals = tuple[Any, Any, torch.Tensor]


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _globals() -> Globals:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_globals(state: Globals) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


@dataclass
class Checkpoint:
    batches: int
    loader: dict[str, Any] | None
    rng: Globals


def _run(
    peers: Peers, column: str, workers: int, resume_from: Checkpoint | None = None
) -> tuple[list[torch.Tensor], Checkpoint | None]:
    """Two epochs (or what is left of them after ``resume_from``); a checkpoint at the stop."""
    _seed_globals(0)  # as a fresh process would
    _streams.reset_created()  # likewise: torchrepro keys loaders by their creation order
    loader = make_loader(
        peers, column, Noisy(CORRECT_N), batch_size=CORRECT_BATCH, num_workers=workers
    )
    stateful = column in (TORCHDATA, REPRO)
    first: Iterator[Any] | None = None
    count = 0
    if resume_from is not None:
        if stateful:
            loader.load_state_dict(resume_from.loader)
        first = iter(loader)  # before the RNG restore: iter() may draw from the global RNG
        if not stateful:  # skip by iterating
            for _ in range(resume_from.batches):
                next(first)
        _set_globals(resume_from.rng)
        count = resume_from.batches
    batches, checkpoint = [], None
    per_epoch = CORRECT_N // CORRECT_BATCH
    while count < CORRECT_EPOCHS * per_epoch:
        for batch in first if first is not None else loader:
            batches.append(batch)
            torch.rand(())  # the training step's randomness
            count += 1
            if count == CORRECT_STOP:
                state = copy.deepcopy(loader.state_dict()) if stateful else None
                checkpoint = Checkpoint(count, state, _globals())
        first = None
    return batches, checkpoint


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def correctness(peers: Peers) -> list[Row]:
    rows = {
        "rerun": Row(3, "rerun equal, 2 workers", peers),
        "workers": Row(3, "two epochs equal, 0 vs 2 workers", peers),
        "resume0": Row(3, "resumed mid-epoch equals uninterrupted, 0 workers", peers),
        "resume2": Row(3, "resumed mid-epoch equals uninterrupted, 2 workers", peers),
    }
    for column in COLUMNS:
        if not peers.has(column):
            continue
        log(f"3. correctness: {column} ({_elapsed()})")
        full: dict[int, list[torch.Tensor]] = {}
        for workers in (0, 2):
            batches, checkpoint = _run(peers, column, workers)
            assert checkpoint is not None
            resumed, _ = _run(peers, column, workers, resume_from=checkpoint)
            rows[f"resume{workers}"].set(column, _yes(_equal(resumed, batches[CORRECT_STOP:])))
            full[workers] = batches
        rows["workers"].set(column, _yes(_equal(full[0], full[2])))
        rows["rerun"].set(column, _yes(_equal(_run(peers, column, 2)[0], full[2])))
    return list(rows.values())


def _yes(value: bool) -> str:
    return "yes" if value else "no"


# --- 4. RNG state -------------------------------------------------------------------------


def rng_state(peers: Peers, sizes: Sizes) -> list[Row]:
    log(f"4. RNG state capture + restore ({_elapsed()})")
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []

    def fork() -> None:
        with torch.random.fork_rng(devices=devices):
            pass

    def repro() -> None:
        torchrepro.set_rng_state(torchrepro.get_rng_state())

    measures = {
        TORCH: _common.per_call(fork, sizes.rng_calls),
        REPRO: _common.per_call(repro, sizes.rng_calls),
    }
    lightning_missing = "unavailable (private API missing)"
    if peers.collect_rng is not None and peers.set_rng is not None:
        collect, restore = peers.collect_rng, peers.set_rng

        def lightning() -> None:
            restore(collect())

        try:
            lightning()
        except Exception as e:  # private API: any failure means "unavailable"
            lightning_missing = f"unavailable ({type(e).__name__})"
        else:
            measures[LIGHTNING] = _common.per_call(lightning, sizes.rng_calls)
    medians = _common.interleaved(measures, sizes.rng_repeats, warmup=1)
    row = Row(4, "RNG state capture + restore, per call (Python, NumPy, torch)", peers)
    row.set(TORCH, f"{seconds(medians[TORCH])} fork_rng (torch only)")
    if LIGHTNING in medians:
        row.set(
            LIGHTNING, f"{seconds(medians[LIGHTNING])} ({medians[LIGHTNING] / medians[TORCH]:.2f}x)"
        )
    elif peers.lightning is not None:
        row.set(LIGHTNING, lightning_missing)
    row.set(REPRO, f"{seconds(medians[REPRO])} ({medians[REPRO] / medians[TORCH]:.2f}x)")
    return [row]


# --- 5. Trace overhead --------------------------------------------------------------------


def trace(peers: Peers, sizes: Sizes) -> list[Row]:
    os.environ.pop("TORCHREPRO_TRACE", None)  # the disabled variant must be disabled
    torch.manual_seed(0)
    cases = [
        ("CNN (example-sized), batch 64", cnn(), (64, 1, 8, 8), 64),
        ("MLP ~5M params, batch 256", mlp(), (256, 784), 256),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, ((name, model, shape, batch), (blocks, per_block)) in enumerate(
            zip(cases, sizes.trace, strict=True)
        ):
            log(f"5. Trace overhead: {name} ({_elapsed()})")
            x, y = torch.randn(shape), torch.randint(0, 10, (batch,))
            model.train()
            traced, disabled, _ = measure(
                make_step(model, x, y), os.path.join(tmp, f"trace{i}.jsonl"), blocks, per_block
            )
            row = Row(5, f"Trace every step, {name}: time per step", peers)
            row.set(TORCH, f"{seconds(disabled)} (not traced)")
            row.set(REPRO, f"{seconds(traced)} ({traced / disabled:.3f}x)")
            rows.append(row)
    return rows


# --- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer samples and repeats (< 1 min)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads for the run (default 1, as in loader workers: on a small "
        "shared machine more threads thrash)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(map(str, SECTIONS)),
        help="comma-separated sections to run (default: all)",
    )
    args = parser.parse_args(argv)
    sections = {int(s) for s in args.sections.split(",")}
    if not sections <= set(SECTIONS):
        parser.error(f"--sections must be among {SECTIONS}, got {args.sections}")
    name = "smoke" if args.smoke else "quick" if args.quick else "default"
    sizes = SIZES[name]
    warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata on newer torch
    start = time.perf_counter()
    peers = load_peers()
    log(f"peers imported in {time.perf_counter() - start:.0f} s")
    versions = {
        "torchvision": _common.version("torchvision"),
        "numpy": np.__version__,
        "lightning": peers.lightning,
        "torchdata": peers.torchdata,
        "torchrepro": torchrepro.__version__,
    }
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    image_rates: dict[str, float] = {}
    if 1 in sections:
        section_rows, image_rates = throughput(peers, sizes)
        rows += section_rows
    if 2 in sections:
        rows += resume(peers, sizes, image_rates)
    if 3 in sections:
        rows += correctness(peers)
    if 4 in sections:
        rows += rng_state(peers, sizes)
    if 5 in sections:
        rows += trace(peers, sizes)
    header = ["§", "measure", "torch", "torch + Lightning", "torchdata", "torchrepro"]
    print(
        f"torchrepro benchmarks ({name}): {_common.machine_line(versions)}; "
        f"{torch.get_num_threads()} torch thread(s)"
    )
    print()
    print(_common.markdown_table(header, [r.as_list() for r in rows]))
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
