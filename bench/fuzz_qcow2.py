"""Long-running qcow2 mutation fuzzer (not run in CI).

Uses atheris when installed, else a plain random-mutation loop over the same harness
as tests/fuzz/test_qcow2_fuzz.py.  A non-BlockError exception, or an example taking
longer than --timeout seconds (SIGALRM), stops the run and saves the input.

    python3 bench/fuzz_qcow2.py [--iterations N] [--seed S] [--timeout SEC]
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.fuzz import harness  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--timeout", type=int, default=10)
    args = ap.parse_args()
    d = tempfile.mkdtemp()
    seeds = [harness.make_seed_image(os.path.join(d, "s%d.qcow2" % cs), cs)
             for cs in (4096, 65536)]
    rng = random.Random(args.seed)
    path = os.path.join(d, "fuzz.qcow2")

    def alarm(*_):
        raise TimeoutError("example exceeded %ds" % args.timeout)
    signal.signal(signal.SIGALRM, alarm)
    start = time.time()
    for i in range(args.iterations):
        data = rng.choice(seeds)
        offs = harness.interesting_offsets(data)
        muts = []
        for _ in range(rng.randint(1, 4)):
            off = rng.choice(offs) if rng.random() < 0.8 else rng.randrange(len(data))
            kind = rng.choice(["byte", "u32", "u64", "bitflip", "truncate"]
                              if rng.random() < 0.1 else ["byte", "u32", "u64", "bitflip"])
            val = rng.choice([rng.getrandbits(64), rng.getrandbits(8), 0, 1 << 63,
                              0x7FFFFFFF, 0x200])
            muts.append((off, kind, val))
        buf = harness.apply_mutations(data, muts)
        with open(path, "wb") as f:
            f.write(buf)
        signal.alarm(args.timeout)
        try:
            harness.exercise(path)
        except BaseException as e:
            keep = os.path.join(d, "crash-%d.qcow2" % i)
            with open(keep, "wb") as f:
                f.write(buf)
            print("iteration %d: %r (input saved to %s, mutations %r)" % (i, e, keep, muts))
            return 1
        finally:
            signal.alarm(0)
        if i % 500 == 0:
            print("%d inputs, %.0f/s" % (i + 1, (i + 1) / (time.time() - start)), flush=True)
    print("%d inputs without a finding (seed %d)" % (args.iterations, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
