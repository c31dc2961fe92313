"""The engine: many sessions' steps in one forward, each session's results exactly its solo ones.

For every tested family (sliding-window ones included, window 16): sessions of different
prompt lengths arrive and leave at different times, prefills are chunked, some steps
verify k positions and are cut back at the next step; every session's logits equal the
unsplit transformers model's on its final sequence (1e-4, fp32) and its token ids and
logits equal the same session served alone through the unbatched Body path. The metrics
show the steps really shared forwards.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from lambdasplit.engine import Engine, EngineError
from lambdasplit.llm import load_body, load_head, load_tail
from tiny_models import FAMILIES

X, Y = 1, 5  # head [0, 1), body [1, 5), tail [5, 6) of the 6-layer tiny models


def client(head, tail, prompt, new_tokens, speculate=False):
    """A device session as a generator: yields (start, hidden) steps, is sent the body's output.

    With `speculate`, every third step also sends two guessed tokens after the real one
    (a verify step of 3 positions) and then rejects them, so the next step cuts the caches
    back. Returns (token ids, {position: logits}).
    """
    head, tail = head.fork(), tail.fork()
    ids, logits = list(prompt), {}
    start, new, produced = 0, list(prompt), 0
    while produced < new_tokens:
        guesses = [7, 11] if speculate and produced % 3 == 1 else []
        hidden = head.forward(torch.tensor([new + guesses]), start)
        out = yield start, hidden
        step_logits = tail.forward(out, start, last_only=False)[0]
        for j in range(len(new)):  # the guessed positions are rejected: their logits are not kept
            logits[start + j] = step_logits[j]
        token = int(step_logits[len(new) - 1].argmax())
        ids.append(token)
        produced += 1
        start, new = start + len(new), [token]
    return ids, logits


def solo(body, gen):
    """Run a client generator against an unbatched Body (the path without the engine)."""
    try:
        start, hidden = next(gen)
        while True:
            start, hidden = gen.send(body.forward(hidden, start))
    except StopIteration as done:
        return done.value


def run_through_engine(engine, plans):
    """Clients arriving at given ticks; each tick every live client submits its next step,
    then the engine runs everything pending. Returns each client's (ids, logits)."""
    results, live, tick = {}, {}, 0
    while len(results) < len(plans):
        for name, plan in plans.items():
            if plan["arrive"] == tick:
                session = engine.open_session(client=name, max_positions=128)
                gen = plan["gen"]()
                live[name] = (session, gen, session.submit(*next(gen)))
        engine.run_pending()
        for name, (session, gen, future) in list(live.items()):
            try:
                live[name] = (session, gen, session.submit(*gen.send(future.result(timeout=0))))
            except StopIteration as done:
                results[name] = done.value
                session.close()  # leaves; the others go on
                del live[name]
        tick += 1
    return results


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    loaded = {}

    def get(family):
        if family not in loaded:
            folder = str(tiny_model_dir(family))
            head = load_head(folder, X)
            loaded[family] = dict(
                folder=folder, head=head, tail=load_tail(folder, Y, head=head),
                body=load_body(folder, X, Y), engine_body=load_body(folder, X, Y),
                model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            )
        return loaded[family]

    return get


PROMPTS = {"a": (3, 0, 12, False), "b": (21, 0, 8, True), "c": (1, 2, 15, False), "d": (37, 3, 6, True),
           "e": (9, 5, 10, False)}  # name: (prompt length, arrival tick, new tokens, speculate)


@pytest.mark.parametrize("family", FAMILIES)
def test_sessions_batched_equal_solo_and_unsplit(family, parts):
    p = parts(family)
    g = torch.Generator().manual_seed(1)
    prompts = {name: torch.randint(3, 400, (length,), generator=g).tolist()
               for name, (length, *_rest) in PROMPTS.items()}

    def make(name):
        _, arrive, new_tokens, speculate = PROMPTS[name]
        return dict(arrive=arrive, gen=lambda: client(p["head"], p["tail"], prompts[name], new_tokens, speculate))

    engine = Engine(p["engine_body"].stack, max_batch=4, prefill_chunk=8)
    batched = run_through_engine(engine, {name: make(name) for name in PROMPTS})

    for name in PROMPTS:
        ids, logits = batched[name]
        alone_ids, alone_logits = solo(p["body"].fork(), make(name)["gen"]())
        assert ids == alone_ids, f"{family} session {name}: ids differ from its solo run"
        positions = sorted(logits)
        got = torch.stack([logits[i] for i in positions])
        torch.testing.assert_close(got, torch.stack([alone_logits[i] for i in positions]), atol=1e-4, rtol=0)
        with torch.no_grad():  # the unsplit model, teacher-forced on the final sequence
            whole = p["model"](torch.tensor([ids[:-1]])).logits[0]
        torch.testing.assert_close(got, whole[positions], atol=1e-4, rtol=0)
    assert len({tuple(batched[n][0][-4:]) for n in PROMPTS}) > 1, "tiny model collapsed; the test would prove little"

    m = engine.metrics
    rows, batches = m.value("lambdasplit_engine_rows_total"), m.value("lambdasplit_engine_batches_total")
    assert m.value("lambdasplit_engine_shared_rows_total") > 0.7 * rows  # most rows shared their forward (the last sessions run alone)
    assert rows / batches > 2.0
    assert m.value("lambdasplit_engine_batch_rows_bucket", le="4.0") == batches  # max_batch held
    assert m.value("lambdasplit_engine_batch_positions_bucket", le="12.0") == batches  # chunk 8 + 4 rows


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_concurrent_client_threads_on_the_running_loop(family, parts):
    """Real threads against the engine's own loop: each session still gets its solo output."""
    p = parts(family)
    prompts = [[5 + i] * (2 + 7 * i) for i in range(6)]
    with Engine(p["engine_body"].stack, max_batch=8, prefill_chunk=16) as engine:
        results = [None] * len(prompts)
        sessions = [engine.open_session(client=f"c{i}", max_positions=64) for i in range(len(prompts))]
        gens = [client(p["head"], p["tail"], prompt, 10) for prompt in prompts]
        firsts = [next(gen) for gen in gens]

        def run(i):
            try:
                step = firsts[i]
                while True:
                    step = gens[i].send(sessions[i].step(*step, timeout=60))
            except StopIteration as done:
                results[i] = done.value
                sessions[i].close()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for i, prompt in enumerate(prompts):
        ids, logits = results[i]
        alone_ids, alone_logits = solo(p["body"].fork(), client(p["head"], p["tail"], prompt, 10))
        assert ids == alone_ids
        for pos in logits:
            torch.testing.assert_close(logits[pos], alone_logits[pos], atol=1e-4, rtol=0)
    assert engine.metrics.value("lambdasplit_engine_sessions") == 0
    assert engine.metrics.value("lambdasplit_engine_kv_reserved_bytes") == 0


def test_steps_submitted_together_share_one_forward(parts):
    p = parts("mistral")
    engine = Engine(p["engine_body"].stack, max_batch=16, prefill_chunk=64)
    sessions = [engine.open_session(max_positions=32) for _ in range(5)]
    hidden = torch.randn(1, 1, engine.packed.hidden_size)
    futures = [s.submit(0, hidden) for s in sessions]
    assert engine.run_pending() == 1
    for future in futures:
        torch.testing.assert_close(future.result(), futures[0].result(), atol=1e-5, rtol=0)
    assert engine.metrics.value("lambdasplit_engine_shared_rows_total") == 5
    assert engine.metrics.value("lambdasplit_engine_batch_rows_sum") == 5


def test_long_prefill_is_chunked_and_piggybacked(parts):
    p = parts("qwen2")
    engine = Engine(p["engine_body"].stack, max_batch=8, prefill_chunk=8)
    d = engine.packed.hidden_size
    decoders = [engine.open_session(max_positions=64) for _ in range(2)]
    for s in decoders:
        s.submit(0, torch.randn(1, 4, d))
    engine.run_pending()
    long = engine.open_session(max_positions=64)
    prompt = torch.randn(1, 40, d)
    future = long.submit(0, prompt)
    decodes = [s.submit(4, torch.randn(1, 1, d)) for s in decoders]
    before = engine.metrics.value("lambdasplit_engine_batches_total")
    assert engine.run_pending() == 5  # 40 positions in chunks of 8; the two decodes ride in the first
    assert all(f.done() for f in decodes) and future.result().shape == (1, 40, d)
    assert engine.metrics.value("lambdasplit_engine_positions_total") == 8 + 40 + 2
    assert engine.metrics.value("lambdasplit_engine_batches_total") == before + 5
    reference = p["body"].fork().forward(prompt, 0)
    torch.testing.assert_close(future.result(), reference, atol=1e-4, rtol=0)


def test_kv_budget_queue_and_limits(parts):
    p = parts("llama")
    probe = Engine(p["engine_body"].stack)
    per_session_mb = 100 * probe.per_position_bytes / 2**20  # a session of 100 positions
    engine = Engine(p["engine_body"].stack, kv_budget_mb=2.5 * per_session_mb, per_client_kv_mb=1.5 * per_session_mb,
                    queue_timeout=0.3, max_queue=1)
    first = engine.open_session(client="x", max_positions=100)
    with pytest.raises(EngineError, match="client_kv_limit"):  # the client's own limit: refused at once
        engine.open_session(client="x", max_positions=100)
    second = engine.open_session(client="y", max_positions=100)
    with pytest.raises(EngineError, match="queue_timeout"):  # the budget is full: waits, then a clear error
        engine.open_session(client="z", max_positions=100)
    with pytest.raises(EngineError, match="over_budget"):
        engine.open_session(client="z", max_positions=1000)

    admitted = []
    waiter = threading.Thread(target=lambda: admitted.append(engine.open_session(client="z", max_positions=100)))
    waiter.start()
    while engine.metrics.value("lambdasplit_engine_admission_queue") < 1:
        threading.Event().wait(0.01)
    with pytest.raises(EngineError, match="queue_full"):  # max_queue=1 and one is waiting
        engine.open_session(client="w", max_positions=10)
    first.close()  # frees budget: the waiting session is admitted
    waiter.join(5)
    assert admitted and engine.metrics.value("lambdasplit_engine_kv_reserved_bytes") == 200 * engine.per_position_bytes
    assert engine.metrics.value("lambdasplit_engine_refusals_total", reason="queue_timeout") == 1

    d = engine.packed.hidden_size
    bad = {
        "reservation_exceeded": lambda: second.submit(0, torch.randn(1, 101, d)),
        "gap": lambda: second.submit(5, torch.randn(1, 1, d)),
        "bad_shape": lambda: second.submit(0, torch.randn(1, 3, d + 1)),
    }
    for code, submit in bad.items():
        with pytest.raises(EngineError, match=code):
            submit().result(timeout=0)
    queued = [second.submit(0, torch.randn(1, 1, d)) for _ in range(engine.max_pending_steps)]
    with pytest.raises(EngineError, match="too_many_pending"):
        second.submit(0, torch.randn(1, 1, d)).result(timeout=0)
    ok = admitted[0].submit(0, torch.randn(1, 3, d))  # everyone else keeps being served
    engine.run_pending()
    assert ok.result(timeout=0).shape == (1, 3, d) and all(f.result(timeout=0).shape == (1, 1, d) for f in queued)
    admitted[0].close()
    closed = second.submit(0, torch.randn(1, 1, d))
    second.close()
    with pytest.raises(EngineError, match="closed"):
        closed.result(timeout=0)
    assert engine.metrics.value("lambdasplit_engine_kv_reserved_bytes") == 0


@pytest.mark.parametrize("family", ["phi3", "gpt2"])
def test_whole_stack_for_cloud_mode(family, parts, tiny_model_dir):
    """The engine is agnostic of body vs whole stack: layers [0, N) with the embedding and the
    LM head outside (cloud mode) give the unsplit model's logits for concurrent sessions."""
    folder = str(tiny_model_dir(family))
    n = AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers
    embed, whole = load_head(folder, 0), load_head(folder, n)  # embed: embedding (+ positions), no layers
    tail = load_tail(folder, n, head=embed)  # final norm + LM head only
    engine = Engine(whole.stack, max_batch=8, prefill_chunk=8)
    model = parts(family)["model"]
    g = torch.Generator().manual_seed(3)
    sequences = [torch.randint(3, 400, (1, length), generator=g) for length in (5, 19, 33)]
    sessions = [engine.open_session(max_positions=64) for _ in sequences]
    futures = [s.submit(0, embed.forward(ids, 0)) for s, ids in zip(sessions, sequences)]
    engine.run_pending()
    for ids, future in zip(sequences, futures):
        logits = tail.forward(future.result(), 0, last_only=False)
        with torch.no_grad():
            torch.testing.assert_close(logits, model(ids).logits, atol=1e-4, rtol=0)
