"""Throughput of OpenAIJudge against the loopback chat server (tests/chat_server.py).

    python scripts/bench_oracle.py [--n 256] [--latency-ms 100] [--concurrency 32]

Prints wall time (s), requests/s and the most requests the server saw in flight at once. With the
defaults the run should take well under 3 s (256 / 32 = 8 waves of 100 ms plus client overhead).
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from oracles.base import Query  # noqa: E402
from oracles.llm_judge import OpenAIJudge  # noqa: E402
from tests.chat_server import Behaviour, ChatServer  # noqa: E402

KEY_ENV = "BENCH_ORACLE_KEY"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="pairs to judge")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="server latency per request (ms)")
    parser.add_argument("--concurrency", type=int, default=32, help="judge max_concurrency")
    args = parser.parse_args()

    # A dummy key for the loopback server; the real one is never needed here.
    os.environ.setdefault(KEY_ENV, "sk-bench-loopback")
    queries = [Query(prompt=f"prompt {i}", response_a="a" * (1 + i % 7), response_b="b" * (1 + i % 5), reference="ref")
               for i in range(args.n)]
    with ChatServer(Behaviour(latency_s=args.latency_ms / 1000.0)) as server:
        judge = OpenAIJudge(base_url=server.base_url, api_key_env=KEY_ENV, max_concurrency=args.concurrency)
        start = time.perf_counter()
        results = judge.judge_many(queries)
        wall = time.perf_counter() - start
        stats = server.stats
    failures = sum(j.winner is None for j in results)
    ideal = -(-args.n // args.concurrency) * args.latency_ms / 1000.0
    print(f"pairs={args.n} latency_ms={args.latency_ms:g} concurrency={args.concurrency}")
    print(f"wall_s={wall:.3f} (ideal {ideal:.3f}) requests={stats.count} requests_per_s={stats.count / wall:.1f} "
          f"max_in_flight={stats.max_in_flight} failures={failures}")


if __name__ == "__main__":
    main()
