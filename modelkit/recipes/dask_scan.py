"""Scan a manifest of model URLs on a Dask cluster: ``modelkit.scan`` on every worker, the JSON
results gathered in manifest order, the same as a local ``modelkit scan --json`` of the same list.

Why Dask (``pip install 'modelkit[dask]'``): it is pure Python and installs the same way on
Linux, macOS and Windows; ``LocalCluster`` runs a real scheduler and worker processes on one
machine (how the tests run it); and it shares fsspec with modelkit's ``s3://``/``gs://`` paths.
Ray would do as well on a cluster that already runs it; its wheels are far heavier.

Each task scans a batch of URLs on a few threads (remote scans wait on the network, not the
CPU). A worker that dies takes its batch with it; the scheduler retries the batch elsewhere.

Run it against a scheduler::

    python -m modelkit.recipes.dask_scan --scheduler tcp://10.0.0.5:8786 --manifest urls.txt > results.jsonl

or from Python::

    from dask.distributed import Client
    from modelkit.recipes.dask_scan import scan_on_cluster
    results = scan_on_cluster(Client("tcp://10.0.0.5:8786"), urls)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def scan_batch(urls: Sequence[str], allow: Sequence[str] = (), threads: int = 8) -> list[dict[str, Any]]:
    """Scan ``urls`` (remote or local paths) here, on ``threads`` threads; results in input order."""
    from modelkit.scan.engine import check_allow, scan_many

    allowed = check_allow(allow)
    return [r.to_dict() for r in scan_many(list(urls), allowed, max(1, min(threads, len(urls))))]


def scan_on_cluster(client: Any, urls: Sequence[str], *, allow: Sequence[str] = (), batch: int = 16,
                    threads: int = 8, retries: int = 2) -> list[dict[str, Any]]:
    """Scan every URL on the cluster behind ``client`` (a ``dask.distributed.Client``).

    Args:
        client: the cluster's client.
        urls: model paths or URLs, as ``modelkit scan`` takes them (expand ``hf://ORG/REPO``
            first with ``modelkit.remote.expand`` if the manifest names whole repositories).
        allow: audited ``module.name`` exceptions, as ``--allow``.
        batch: URLs per task.
        threads: threads per task.
        retries: how often a batch whose worker died is run again.

    Returns:
        One ``FileReport.to_dict()`` per URL, in the order given.
    """
    chunks = [list(urls[i : i + batch]) for i in range(0, len(urls), batch)]
    futures = client.map(scan_batch, chunks, allow=list(allow), threads=threads, retries=retries, pure=False)
    out: list[dict[str, Any]] = []
    for part in client.gather(futures):
        out.extend(part)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modelkit.recipes.dask_scan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheduler", required=True, help="the Dask scheduler's address (tcp://HOST:8786)")
    ap.add_argument("--manifest", required=True, help="one path or URL per line ('-': standard input)")
    ap.add_argument("--allow", action="append", default=[], metavar="MODULE.NAME")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args(argv)
    from dask.distributed import Client

    from modelkit.cli.scan_cmd import read_manifest

    urls = read_manifest(args.manifest)
    with Client(args.scheduler) as client:  # type: ignore[no-untyped-call]
        results = scan_on_cluster(client, urls, allow=args.allow, batch=args.batch, threads=args.threads)
    for r in results:
        sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
    worst = {r["verdict"] for r in results}
    return 1 if "unsafe" in worst else 2 if "error" in worst else 0


if __name__ == "__main__":
    sys.exit(main())
