"""CPU per operation of the adapters below the ports, each next to what it replaced.

Everything runs in this process (PostgreSQL is an embedded server in its own process, not
counted); each figure is this process's CPU time (user + system, every thread) per operation,
the best of ``--rounds`` rounds::

    .venv/bin/python benchmarks/bench_adapters.py --ops 2000 --rounds 5

* index lookups: a hit answered from memory, and a lookup PostgreSQL answers;
* commits: one at a time, 32 at once (coalesced into shared statements), and a read whose
  refresh can wait (no round trip);
* bounding a statement: a task and ``asyncio.wait`` per call (before) against a timer;
* metrics: an OpenTelemetry counter with an attribute dict per call (before) against the plain
  counters read on collection, and one histogram record;
* token counts of a 16 KB prompt: ``encode_batch`` with ``ids`` (before) against
  ``encode_batch_fast`` with ``len``, and that through the ASCII twin (counts checked equal).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from bench_proxy import prose

from extproc.adapters.index_memo import IndexMemo, MemoPolicy
from extproc.adapters.pg_index import PgPrefixIndex
from extproc.adapters.pg_migrate import migrate
from extproc.adapters.postgres import Pool, open_pool
from extproc.adapters.telemetry import METER_NAME, Metrics, meter_provider
from extproc.adapters.tokenizer_files import cached_tokenizer_json
from extproc.adapters.tokenizers import count_tokens, load_tokenizer_file
from extproc.core.model import CacheEntry, PendingWrite, PrefixHash, PrincipalId, Scope, Tier
from extproc.devtools import devstack

SCOPE = Scope(PrincipalId("tenant"), "bench", "v1")


def h(n: int) -> PrefixHash:
    return PrefixHash(hashlib.sha256(str(n).encode()).digest())


def best_us(rounds: int, ops: int, run: Callable[[], None]) -> float:
    """Microseconds of CPU per operation, best of ``rounds`` runs of ``run`` (``ops`` each)."""
    runs = []
    for _ in range(rounds):
        started = time.process_time()
        run()
        runs.append((time.process_time() - started) * 1e6 / ops)
    return min(runs)


async def abest_us(rounds: int, ops: int, run: Callable[[], Awaitable[None]]) -> float:
    runs = []
    for _ in range(rounds):
        started = time.process_time()
        await run()
        runs.append((time.process_time() - started) * 1e6 / ops)
    return min(runs)


def report(name: str, micros: float) -> None:
    print(f"  {name:58} {micros:9.1f} us", flush=True)


async def repeat(ops: int, concurrency: int, op: Callable[[int], Awaitable[object]]) -> None:
    numbers = iter(range(ops))

    async def worker() -> None:
        for n in numbers:
            await op(n)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def bench_index(pool: Pool, args: argparse.Namespace) -> None:
    print("prefix index (20 candidates a lookup)", flush=True)
    memo = PgPrefixIndex(pool, memo=IndexMemo(MemoPolicy(ttl=3600)))
    direct = PgPrefixIndex(pool, memo=IndexMemo(MemoPolicy(ttl=0)))
    await memo.commit(PendingWrite(SCOPE, (CacheEntry(h(0), 2450, Tier.M5),), None))
    hashes = [h(i) for i in range(20)]
    r, n = args.rounds, args.ops

    async def lookups(index: PgPrefixIndex, concurrency: int) -> None:
        await repeat(n, concurrency, lambda _: index.lookup(SCOPE, hashes))

    report("lookup, hit served from memory", await abest_us(r, n, lambda: lookups(memo, 1)))
    for c in (1, 32):
        us = await abest_us(r, n, partial(lookups, direct, c))
        report(f"lookup answered by PostgreSQL, {c} at once", us)
    await bench_commits(direct, args)


async def bench_commits(index: PgPrefixIndex, args: argparse.Namespace) -> None:
    r, n, offset = args.rounds, args.ops, [1000]

    async def commits(concurrency: int) -> None:
        base = offset[0]
        offset[0] += n

        def one(i: int) -> Awaitable[None]:
            entry = CacheEntry(h(base + i), 2450, Tier.M5)
            return index.commit(PendingWrite(SCOPE, (entry,), None))

        await repeat(n, concurrency, one)

    for c in (1, 32):
        before = index.commit_batches
        us = await abest_us(r, n, partial(commits, c))
        statements = index.commit_batches[0] - before[0]
        report(f"commit of one new entry, {c} at once ({statements / (r * n):.2f} stmt each)", us)
    [hit] = await index.lookup(SCOPE, [h(0)])
    waiting = PendingWrite(SCOPE, (), hit)
    report(
        "commit of a read whose refresh can wait",
        await abest_us(r, n, lambda: repeat(n, 1, lambda _: index.commit(waiting))),
    )
    await index.aclose()


async def bench_bounding(args: argparse.Namespace) -> None:
    print("bounding one awaited call by a deadline", flush=True)
    loop = asyncio.get_running_loop()

    async def work() -> int:
        return 1

    async def task_and_wait() -> None:
        task = asyncio.ensure_future(work())
        await asyncio.wait({task}, timeout=1.0)
        task.result()

    async def timer() -> None:
        handle = loop.call_at(loop.time() + 1.0, lambda: None)
        try:
            await work()
        finally:
            handle.cancel()

    async def calls(op: Callable[[], Awaitable[None]]) -> None:
        await repeat(args.ops, 1, lambda _: op())

    for name, op in (("a task and asyncio.wait (before)", task_and_wait), ("a timer", timer)):
        report(name, await abest_us(args.rounds, args.ops, partial(calls, op)))


def bench_metrics(args: argparse.Namespace) -> None:
    print("metrics, one count", flush=True)
    meter = meter_provider(()).get_meter(METER_NAME)
    counter = meter.create_counter("bench.sdk")
    metrics = Metrics(meter)
    histogram = meter.create_histogram("bench.histogram")
    r, n = args.rounds, args.ops * 10

    def loop(op: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                op()

        return run

    report("SDK counter, attribute dict per call (before)",
           best_us(r, n, loop(lambda: counter.add(1, {"result": "ok"}))))  # fmt: skip
    report(
        "plain counter read on collection", best_us(r, n, loop(lambda: metrics.commit_result("ok")))
    )
    report("histogram record, no attributes", best_us(r, n, loop(lambda: histogram.record(0.001))))


def bench_tokenizer(args: argparse.Namespace) -> None:
    print("token counts of a 16 KB prompt and a question (qwen2.5 export)", flush=True)
    loaded = load_tokenizer_file(cached_tokenizer_json("qwen2.5"))
    encoder = loaded.encoder
    text = prose(16 * 1024, seed=16 * 1024)
    ops = max(20, args.ops // 20)

    def segments(i: int) -> list[str]:
        return [f"{i:08d} {text}", "Summarise the policy above in one sentence."]

    def before(i: int) -> object:
        return tuple(
            len(e.ids) for e in encoder.encode_batch(segments(i), add_special_tokens=False)
        )

    ways: list[tuple[str, Callable[[int], object]]] = [
        ("encode_batch, len(ids) (before)", before),
        ("encode_batch_fast, len(encoding)", lambda i: count_tokens(encoder, segments(i))),
        ("the same through the ASCII twin (no NFC pass)", lambda i: loaded.count(segments(i))),
    ]
    expected = before(0)
    best = {name: float("inf") for name, _ in ways}
    for _ in range(args.rounds):  # interleaved, so that a busy moment hits every way alike
        for name, way in ways:
            assert way(0) == expected, f"{name}: counts differ"
            best[name] = min(best[name], best_us(1, ops, partial(_each, ops, way)))
    for name, micros in best.items():
        report(f"{name}, {expected[0]} tokens", micros)


def _each(ops: int, way: Callable[[int], object]) -> None:
    for i in range(ops):
        way(i)


async def bench_database(url: str, args: argparse.Namespace) -> None:
    pool = await open_pool(url, min_size=4, max_size=10)
    try:
        await bench_index(pool, args)
    finally:
        await pool.close()
    await bench_bounding(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=2000, help="operations a round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp:
        supervisor = devstack.Supervisor(Path(tmp) / "logs")
        try:
            url = devstack.start_postgres(supervisor, Path(tmp) / "postgres", 90)
            migrate(url)
            asyncio.run(bench_database(url, args))
        finally:
            supervisor.stop_all()
    bench_metrics(args)
    bench_tokenizer(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
