"""The routing flags `turbine serve`/`frontend` and `turbine simulate` share: one definition, so a
simulated fleet is configured exactly as a live one."""
from __future__ import annotations

import argparse

from turbine.router.policies import POLICIES


def add_routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default="predicted", choices=POLICIES,
                   help="routing policy: kv = the worker holding most of the prompt's KV blocks, weighed against "
                   "load (Dynamo's cost); predicted = the lowest predicted TTFT on each worker's own timing model "
                   "(prefix hits, queued prefill, decode batch)")
    p.add_argument("--router-approx", action="store_true",
                   help="kv routing without worker events: remember where prefixes were sent (TTL)")
    p.add_argument("--router-temperature", type=float, default=0.0,
                   help="0 = always the cheapest worker; >0 samples workers by softmax of their cost")
    p.add_argument("--router-max-itl-ms", type=float, default=0.0,
                   help="predicted routing: keep a prefill off workers whose running requests' steps it would "
                   "stretch beyond this, when another worker can take it (0 = no guard)")
    p.add_argument("--router-max-queued", type=int, default=0,
                   help="requests a worker may have waiting for their first token; beyond it requests wait in the "
                   "frontend's queue, in arrival order (0 = no limit)")
    p.add_argument("--router-own-load-only", action="store_true",
                   help="ignore the load workers report beyond this frontend's own requests (other frontends'): "
                   "the blind baseline that several frontends are measured against")
