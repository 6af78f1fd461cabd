"""A reload whose runtime state cannot be bound is refused: the old rules keep serving.

A router published without its gateways' states skips every gateway and answers 503 to
everything; binding happens before the swap, and a failure there is a refused reload.
"""

from __future__ import annotations

from pathlib import Path

from proxy.upstream.state import GatewayState
from tests.support import gateways, running_proxy


def rules(urls: dict[str, str]) -> str:
    gws = "\n".join(f"  {n}: {{url: '{u}', region: eu}}" for n, u in urls.items())
    return f"""
gateways:
{gws}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [{", ".join(urls)}]
"""


async def test_reload_that_cannot_bind_states_is_refused_and_old_rules_serve(
    tmp_path: Path,
) -> None:
    async with gateways("g1", "g2") as g:
        async with running_proxy(rules({"g1": g["g1"].url}), tmp_path) as p:
            status, headers, _ = await p.post()
            assert (status, headers["X-Payswitch-Gateway"]) == (200, "g1")

            def refuse(st: GatewayState) -> None:
                raise RuntimeError(f"cannot start state for {st.name}")

            p.rt.states._on_create = refuse  # creating g2's state fails
            (p.rules_dir / "rules.yaml").write_text(rules({"g1": g["g1"].url, "g2": g["g2"].url}))
            result = await p.rt.reload("admin")

            assert result.outcome == "failure"
            assert "cannot bind runtime state" in result.issues[0].message
            assert p.rt.store.current.generation == 1
            assert p.rt.store.last_error is not None
            assert p.events.kinds("config.rejected") == ["config.rejected"]
            failures = p.rt.registry.get_sample_value(
                "payswitch_config_reloads_total", {"result": "failure"}
            )
            assert failures == 1.0
            for _ in range(5):
                status, headers, _ = await p.post()
                assert (status, headers["X-Payswitch-Gateway"]) == (200, "g1")

            # Once the state can be made, the same files publish and g2 serves too.
            p.rt.states._on_create = None
            result = await p.rt.reload("admin")
            assert result.outcome == "success"
            seen = set()
            for _ in range(6):
                status, headers, _ = await p.post()
                assert status == 200
                seen.add(headers["X-Payswitch-Gateway"])
            assert seen == {"g1", "g2"}


async def test_the_request_path_serves_the_rules_of_the_last_reload(tmp_path: Path) -> None:
    """What the request path reads per request (the body cap, the transaction header, the
    route's limits) comes from the rules published last, from the next request on."""
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}), tmp_path) as p:
            big = b'{"pad": "' + b"x" * 2000 + b'"}'
            status, headers, _ = await p.post(data=big)
            assert status == 200
            assert "X-Payswitch-Transaction-Id" in headers

            text = rules({"g1": g["g1"].url}) + "    max_body: 1KiB\n"
            text += "transaction_headers: {transaction_id: X-Txn}\n"
            (p.rules_dir / "rules.yaml").write_text(text)
            assert (await p.rt.reload("admin")).outcome == "success"

            status, _, _ = await p.post(data=big)
            assert status == 413
            status, headers, _ = await p.post()
            assert status == 200
            assert "X-Txn" in headers and "X-Payswitch-Transaction-Id" not in headers
