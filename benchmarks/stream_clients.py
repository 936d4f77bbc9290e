"""Concurrent streaming chat completions through the ``openai`` client, spread over several client
processes, so that the client's own Python (the openai client parses and validates every chunk,
some 0.1 ms each) does not cap what a fast server is measured at: 64 streams of a server making
7,000 tokens/s are more than one interpreter can read.

    from stream_clients import run_streams
    run = run_streams(base_url, api_key, model, prompts, max_tokens, temperature, streams=64)
    run.counts, run.errors, run.seconds, run.arrivals

Each client process (``python stream_clients.py``, which imports the ``openai`` client and
nothing of GenMLX or MLX) reads its job as one JSON line on stdin, builds one client per stream,
says ``ready``, waits for ``go``, streams its share in threads, and writes the completion tokens
each stream's server reported, when each of its chunks with content arrived (the system's clock,
which the processes share) and the failures (after the client's own two retries of a refused
connection or an error status) as one JSON line. The clock runs from the moment
every process has been told to go until the last one has answered; building the clients (some
30 ms of CPU each) happens before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import openai

READY, GO = "ready", "go"
EXITED = '{"counts": [], "errors": ["a client process exited before it answered"]}'


@dataclass(frozen=True)
class StreamsRun:
    """Concurrent streams' outcome: each stream's completion tokens, the failures, the seconds from
    start to the last stream's end, and each stream's chunks with content, as seconds from start."""

    counts: list[int]
    errors: list[str]
    seconds: float
    arrivals: list[list[float]]


def client_processes(streams: int) -> int:
    """How many client processes read ``streams`` streams: one per 8 streams, at most one per two
    of this machine's cores (the server needs the rest), at least one."""
    return max(1, min(-(-streams // 8), (os.cpu_count() or 2) // 2))


def run_streams(
    base_url: str,
    api_key: str,
    model: str,
    prompts: Sequence[str],
    max_tokens: int,
    temperature: float,
    streams: int,
    processes: int | None = None,
) -> StreamsRun:
    """``streams`` concurrent streams (stream i sends ``prompts[i % len(prompts)]``), started
    together from ``processes`` client processes (default ``client_processes``)."""
    count = processes or client_processes(streams)
    shares = [streams // count + (i < streams % count) for i in range(count)]
    firsts = [sum(shares[:i]) for i in range(count)]
    here = str(Path(__file__).resolve())
    workers = [
        subprocess.Popen(
            [sys.executable, here], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        for _ in range(count)
    ]
    finished = False
    try:
        for worker, first, share in zip(workers, firsts, shares, strict=True):
            job = {
                "base_url": base_url,
                "api_key": api_key,
                "model": model,
                "prompts": [prompts[(first + i) % len(prompts)] for i in range(share)],
                "max_tokens": max_tokens,
                "temperature": temperature,
            }
            worker.stdin.write(json.dumps(job) + "\n")
        for worker in workers:
            said = worker.stdout.readline().strip()
            if said != READY:
                raise RuntimeError(f"a client process did not start: {said or 'it exited'}")
        for worker in workers:
            worker.stdin.write(GO + "\n")
        began, began_at = time.perf_counter(), time.time()
        outcomes = [json.loads(worker.stdout.readline() or EXITED) for worker in workers]
        seconds = time.perf_counter() - began
        finished = True
    finally:
        for worker in workers:
            if not finished:
                worker.kill()
            worker.stdin.close()
            worker.wait()
    return StreamsRun(
        counts=[n for outcome in outcomes for n in outcome["counts"]],
        errors=[e for outcome in outcomes for e in outcome["errors"]],
        seconds=seconds,
        arrivals=[[t - began_at for t in times] for o in outcomes for times in o.get("arrivals", ())],
    )


def stream_tokens(
    client: openai.OpenAI, model: str, prompt: str, max_tokens: int, temperature: float
) -> tuple[int, list[float]]:
    """Stream one chat completion to its end: the completion tokens the server reports, and when
    each chunk with content arrived (``time.time()``)."""
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens, arrivals = 0, []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.time())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if tokens == 0:
        raise RuntimeError(f"{client.base_url} reported no usage")
    return tokens, arrivals


def serve_job() -> None:
    """One client process: the job from stdin, ``ready``, wait for ``go``, the outcome to stdout."""
    job = json.loads(sys.stdin.readline())
    prompts = job["prompts"]
    counts = [0] * len(prompts)
    arrivals: list[list[float] | None] = [None] * len(prompts)
    errors: list[str] = []
    built = threading.Barrier(len(prompts) + 1)
    go = threading.Event()

    def one_stream(index: int) -> None:
        # The client's own retries (2) of a refused connection: mlx_lm.server's listening queue
        # (Python's http.server, 5 connections) refused 56 of 128 streams opened at once at 64.
        client = openai.OpenAI(base_url=job["base_url"] + "/v1", api_key=job["api_key"], timeout=600)
        built.wait()
        go.wait()
        try:
            prompt = prompts[index]
            counts[index], arrivals[index] = stream_tokens(
                client, job["model"], prompt, job["max_tokens"], job["temperature"]
            )
        except (openai.OpenAIError, RuntimeError) as e:  # counted and named in the report
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one_stream, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    built.wait()
    print(READY, flush=True)
    if sys.stdin.readline().strip() != GO:
        return
    go.set()
    for thread in threads:
        thread.join()
    streamed = [times for times in arrivals if times is not None]
    print(json.dumps({"counts": counts, "errors": errors, "arrivals": streamed}), flush=True)


if __name__ == "__main__":
    serve_job()
