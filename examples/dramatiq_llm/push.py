"""Push a burst of work for three tenants and print the results as they complete.

python -m examples.dramatiq_llm.push 30
"""

from __future__ import annotations

import sys
import time
from urllib.parse import urlsplit

from dramatiq import Message
from dramatiq.results import ResultTimeout

from examples.dramatiq_llm.app import NAMESPACE, REDIS, summarize

#: Each wait for a result blocks Redis this long at most, well inside the client's socket
#: timeout (redis-py's default is 5 s): a longer block would end in a TimeoutError.
BLOCK_MS = 2_000


def wait_for_result(message: Message[dict[str, object]], timeout: float) -> dict[str, object]:
    """The message's result, waited for in blocks of ``BLOCK_MS`` up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return message.get_result(block=True, timeout=BLOCK_MS)
        except ResultTimeout:
            if time.monotonic() > deadline:
                raise


def main(count: int) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 200
    redis = urlsplit(REDIS)  # no password in the output
    where = f"{redis.hostname}:{redis.port or 6379}{redis.path or '/0'}"
    print(f"on Redis {where}, in keys named *{NAMESPACE}* (TT_REDIS, TT_NS)")
    start = time.monotonic()
    tenants = ("acme", "globex", "initech")
    messages = [summarize.send(tenants[i % 3], prompt) for i in range(count)]
    for message in messages:
        done = wait_for_result(message, timeout=600)
        print(f"{time.monotonic() - start:6.1f}s  {done['tenant']:8} {done['tokens']} tokens")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
