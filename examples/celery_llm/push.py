"""Push a burst of work for three tenants and print the results as they complete.

python -m examples.celery_llm.push 30
"""

from __future__ import annotations

import sys
import time
from urllib.parse import urlsplit

from examples.celery_llm.app import NAMESPACE, REDIS, summarize
from taskthrottle.celery import delay_for


def main(count: int) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 200
    redis = urlsplit(REDIS)  # no password in the output
    where = f"{redis.hostname}:{redis.port or 6379}{redis.path or '/0'}"
    print(f"on Redis {where}, in keys named *{NAMESPACE}* (TT_REDIS, TT_NS)")
    print(f"a call now would wait {delay_for(summarize, 'acme', prompt):.2f}s")
    start = time.monotonic()
    results = [summarize.delay(("acme", "globex", "initech")[i % 3], prompt) for i in range(count)]
    for result in results:
        done = result.get(timeout=600)
        print(f"{time.monotonic() - start:6.1f}s  {done['tenant']:8} {done['tokens']} tokens")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
