"""Three `ggufchat serve` replicas behind Debian's nginx running the repo's deploy/nginx/ggufchat.conf
(only the upstream addresses and the listen port substituted), under streaming clients: what a user of
the balancer sees when a replica is stopped, killed, or holds a conversation's cache."""

from __future__ import annotations

import signal
import statistics
import time

import pytest

from tests.conftest import wait_for
from tests.deploy.cluster import Load, nginx, nginx_binary, replicas, stream_chat

pytestmark = pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (.ci/run installs it)")

# Small and quick: 2 slots each, one thread each (three replicas share two cores).
REPLICA_ARGS = ("-np", "2", "-t", "1", "-c", "2048", "--drain-timeout", "30")
CLIENTS = 6  # two streams per replica


def _last_upstream(log: dict, test_id: str) -> str:
    return log[test_id][-1]["upstreams"][-1]


def test_sigterm_mid_load_finishes_its_streams_and_no_client_sees_an_error(tmp_path):
    with replicas(tmp_path, 3, *REPLICA_ARGS) as reps, nginx([r.port for r in reps], tmp_path / "nginx") as lb:
        victim = reps[0]
        with Load(lb.url, CLIENTS, max_tokens=40) as load:
            # Mid-load: a first round of streams has finished, and the victim is decoding some now.
            assert wait_for(lambda: len(load.outcomes) >= CLIENTS
                            and victim.metric("ggufchat_active_sequences") >= 1, 60)
            t_term = time.monotonic()
            victim.proc.send_signal(signal.SIGTERM)
            victim.proc.wait(30)  # it drains, then exits by itself
            t_exit = time.monotonic()
            wait_for(lambda: len([o for o in load.outcomes if o.started > t_exit]) >= CLIENTS, 30)
        for o in load.outcomes:  # every line is in
            lb.served_by(o.test_id)
        log = lb.access_log()
        address = f"127.0.0.1:{victim.port}"

    assert [o for o in load.outcomes if not o.ok] == []  # no client saw an error, before, during or after
    # The streams it held when the signal came all ran to their end, on it.
    held = [o for o in load.outcomes if o.started < t_term < o.ended and _last_upstream(log, o.test_id) == address]
    assert held, "the victim was serving no stream when it got SIGTERM"
    assert all(o.finish_reason == "length" and o.content for o in held)
    # New requests went to the others (a request that reached it while draining got 503 and nginx
    # retried it elsewhere: nothing of that reaches the client).
    after = [o for o in load.outcomes if o.started > t_term + 0.5]
    assert after and all(_last_upstream(log, o.test_id) != address for o in after)
    assert victim.proc.returncode in (0, -signal.SIGTERM)
    text = victim.log()
    assert "draining: " in text and "Traceback" not in text
    retried = sum(1 for entries in log.values() for e in entries if "503" in e["upstream_status"])
    print(f"\nSIGTERM: {len(load.outcomes)} streams, {len(held)} held by the victim finished; drain took "
          f"{t_exit - t_term:.1f} s; {retried} request(s) got its 503 and were retried; 0 client errors")


def test_sigkill_fails_only_the_requests_it_held_and_new_ones_succeed_at_once(tmp_path):
    with replicas(tmp_path, 3, *REPLICA_ARGS) as reps, nginx([r.port for r in reps], tmp_path / "nginx") as lb:
        victim = reps[1]
        with Load(lb.url, CLIENTS, max_tokens=40) as load:
            # Mid-load: a first round of streams has finished, and the victim is decoding some now.
            assert wait_for(lambda: len(load.outcomes) >= CLIENTS
                            and victim.metric("ggufchat_active_sequences") >= 1, 60)
            t_kill = time.monotonic()
            victim.proc.kill()
            victim.proc.wait(10)
            assert wait_for(lambda: len([o for o in load.outcomes if o.started > t_kill]) >= CLIENTS, 60)
        for o in load.outcomes:  # every line is in
            lb.served_by(o.test_id)
        log = lb.access_log()
        address = f"127.0.0.1:{victim.port}"

    failed = [o for o in load.outcomes if not o.ok]
    assert failed, "the killed replica held streams: they cannot have finished"
    for o in failed:  # ...and only those
        assert o.started < t_kill and _last_upstream(log, o.test_id) == address, o
    after = sorted((o for o in load.outcomes if o.started > t_kill), key=lambda o: o.started)
    assert after and all(o.ok for o in after)
    # At once: the first requests after the kill take no longer than the requests before it (no health
    # check period, no timeout: the refused connection moves them on within the same request).
    before = [o.ended - o.started for o in load.outcomes if o.ok and o.ended < t_kill]
    first = [o.ended - o.started for o in after[:CLIENTS]]
    assert max(first) < 2 * max(before) + 2, (first, before)
    moved = [o for o in after if address in log[o.test_id][-1]["upstreams"]]
    print(f"\nSIGKILL: {len(failed)} stream(s) it held failed, {len(after)} after the kill all succeeded "
          f"({len(moved)} tried the dead replica first); first {CLIENTS} after it took "
          f"{statistics.median(first):.2f} s median, {max(first):.2f} s max (before: "
          f"{statistics.median(before):.2f} / {max(before):.2f} s)")


def test_a_conversation_keyed_by_session_stays_on_one_replica_and_reuses_its_cache(tmp_path):
    with replicas(tmp_path, 3, *REPLICA_ARGS) as reps, nginx([r.port for r in reps], tmp_path / "nginx") as lb:
        by_port = {f"127.0.0.1:{r.port}": r for r in reps}
        # One conversation keyed by the OpenAI `user` field, one by the X-Session-ID header.
        for key, how in (("alice", "user"), ("bob-session-7", "header")):
            messages = [{"role": "user", "content": "Hello! Tell me about the sea."}]
            cached = []
            homes = []
            for turn in range(3):
                test_id = f"{key}-{turn}"
                outcome = stream_chat(lb.url, test_id, max_tokens=16, messages=messages,
                                      user=key if how == "user" else None,
                                      headers={"X-Session-ID": key} if how == "header" else None)
                assert outcome.ok, outcome.error
                homes.append(lb.served_by(test_id))
                cached.append([r.metric("ggufchat_prompt_tokens_cached_total") for r in reps])
                messages += [{"role": "assistant", "content": outcome.content},
                             {"role": "user", "content": f"And what about turn {turn + 2}?"}]
            assert len(set(homes)) == 1, homes  # every turn on one replica
            home = reps.index(by_port[homes[0]])
            # Its cached-token count grows turn by turn; the others' do not move.
            assert cached[0][home] < cached[1][home] < cached[2][home], cached
            for i in range(len(reps)):
                if i != home:
                    assert cached[0][i] == cached[1][i] == cached[2][i], cached
            print(f"\nsession {key!r} ({how}): all turns on replica {home}; its cached prompt tokens "
                  f"{[c[home] for c in cached]}")
