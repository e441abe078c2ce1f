"""Push a burst of work for three tenants and print the results as they complete.

python -m examples.dramatiq_llm.push 60
"""

from __future__ import annotations

import sys
import time

from examples.dramatiq_llm.app import summarize


def main(count: int) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 200
    start = time.monotonic()
    tenants = ("acme", "globex", "initech")
    messages = [summarize.send(tenants[i % 3], prompt) for i in range(count)]
    for message in messages:
        done = message.get_result(block=True, timeout=600_000)
        print(f"{time.monotonic() - start:6.1f}s  {done['tenant']:8} {done['tokens']} tokens")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
