"""Speculative steps (prompt lookup) and the prefix cache change how much work a step does, never a greedy
answer: the same tokens as plain decoding, for all three generations, batched and one by one, on both engines and
through the server's scheduler with rows joining mid-decode (issue 29)."""
import threading

import numpy as np
import pytest

import infer_generation
from data import Example, read_examples
from glm_tune.deployment.continuous_batching import Request, Scheduler
from glm_tune.deployment.kv_cache import KVCache
from glm_tune.deployment.prefix_cache import PrefixCache, block_keys
from glm_tune.deployment.prompt_lookup import PromptLookup, accept_drafts, propose_drafts
from glm_tune.sampling import Sampling
from glm_tune.glm_family import GENERATIONS

from .test_predict_export import varied_prompts


def engine_predictor(folder, backend="onnxruntime", batch_size=4, speculative=0, prefix_cache_mb=0, *more):
    return infer_generation.build_predictor(*infer_generation.parse_arguments(
        ["--model_path", str(folder), "--model_prefix", "chatglm", "--batch_size", str(batch_size), "--backend",
         backend, "--precision", "fp32", "--speculative", str(speculative), "--prefix_cache_mb",
         str(prefix_cache_mb), *more]))


# ------------------------------------------------------------------------------------------ the pieces


def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_tail():
    assert propose_drafts([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]      # tail (2, 3) seen at 1
    assert propose_drafts([7, 2, 3, 8, 2, 3, 6, 2, 3], 2) == [6, 2]      # the latest occurrence wins
    assert propose_drafts([1, 2, 3, 4, 9, 9, 3, 4], 5) == [9, 9, 3, 4]   # up to the end
    assert propose_drafts([1, 2, 3], 3) == [] and propose_drafts([5], 3) == [] and propose_drafts([1, 1], 0) == []
    assert propose_drafts([4, 7, 1, 7], 2) == []  # a lone repeated token is not enough (MIN_NGRAM 2)
    lookup = PromptLookup([1, 2, 3, 1, 2])
    assert lookup.propose(2) == [3, 1]
    lookup.verified(2, 0)            # all rejected: the next step does not draft, the one after does
    assert lookup.propose(2) == [] and lookup.propose(2) == [3, 1]
    lookup.extend([3, 9])            # the answer grows: the index follows it
    assert lookup.propose(2) == [] and PromptLookup([1, 2, 3, 1, 2, 3, 9, 1, 2]).propose(2) == [3, 9]


def test_greedy_acceptance_keeps_the_agreeing_drafts_and_the_models_next_token():
    logits = np.zeros((4, 10))
    logits[[0, 1, 2, 3], [4, 5, 1, 2]] = 1.0  # the model would say 4, 5, 1, 2
    greedy = Sampling()
    assert accept_drafts(logits, [4, 5, 9], None, greedy) == (2, 1)
    assert accept_drafts(logits, [3, 5, 1], None, greedy) == (0, 4)
    assert accept_drafts(logits[:1], [], None, greedy) == (0, 4)
    # with a presence penalty the second position's 5 (already in the answer) loses to the next best
    logits[1, 7] = 0.5
    assert accept_drafts(logits, [4, 5], None, Sampling(presence_penalty=1.0), answer=[5]) == (1, 7)


def test_prefix_blocks_are_keyed_by_everything_before_them():
    a = block_keys(list(range(40)), 16)
    assert len(a) == 2 and a == block_keys(list(range(47)), 16)
    assert block_keys([99] + list(range(1, 40)), 16)[1] != a[1]  # same second block, other first: other key
    cache = KVCache([np.arange(2 * 3 * 64 * 4, dtype="float32").reshape(2, 3, 64, 4) for _ in range(4)], 40, 2)
    prefix = PrefixCache(budget_bytes=10 ** 6)
    prefix.store(list(range(40)), cache, row=1, columns=np.arange(5, 45))
    assert prefix.summary()["blocks"] == 2
    found, hit = prefix.lookup(list(range(40)) + [7], limit=40)
    assert found == 32 and hit.length == 32
    np.testing.assert_array_equal(hit.buffers[0][0, :, :32], cache.buffers[0][1, :, 5:37])
    assert prefix.lookup(list(range(40)), limit=31)[0] == 16  # never the whole limit past a block edge
    small = PrefixCache(budget_bytes=4 * 3 * 16 * 4 * 4 + 1)  # room for one block (4 buffers): the root is kept
    small.store(list(range(40)), cache, row=0, columns=np.arange(40))
    assert small.summary()["blocks"] == 1 and small.lookup(list(range(20)), limit=20)[0] == 16


class MarkovEngine:
    """Stands in for the step graph where only the sampling matters: the logits at a position depend on that
    position's token alone (a Markov chain over a few tokens), the keys and values are zeros."""

    def __init__(self, table: dict, vocab: int):
        self.table, self.vocab = table, vocab

    def __call__(self, feeds):
        ids = feeds["input_ids"]
        count = int(feeds["num_logits"][0])
        logits = np.full((ids.shape[0], count, self.vocab), -1e4, dtype="float32")
        for row in range(ids.shape[0]):
            for k, token in enumerate(ids[row, -count:]):
                for nxt, logit in self.table.get(int(token), {}).items():
                    logits[row, k, nxt] = logit
        new = np.zeros((ids.shape[0], 1, ids.shape[1], 2), dtype="float32")
        return (logits, new, new)


def sampled_pairs(tiny_tokenizer, speculative: int, rounds: int = 1500):
    """First two sampled tokens of `rounds` requests, and the scheduler's stats."""
    from types import SimpleNamespace

    from glm_tune.deployment.step_feeds import StepFeeds

    a, b, c = 30, 31, 32
    table = {a: {a: 1.0, b: 0.5, c: 0.0}, b: {a: 0.2, b: 1.2, c: 0.3}, c: {a: 0.7, b: 0.1, c: 0.9}}
    config = SimpleNamespace(num_hidden_layers=1, multi_query_group_num=1, kv_channels=2)
    feeds = StepFeeds(tiny_tokenizer, "chatglm2", config)
    scheduler = Scheduler(MarkovEngine(table, tiny_tokenizer.vocab_size), feeds, stop_ids=[], max_batch=4,
                          max_waiting=rounds, speculative=speculative)
    requests = [Request([a, b, a, b, c, a, a, b, b, a], 2 + 4, on_token=lambda t: None, on_finish=lambda r: None,
                        on_error=lambda m: None, sampling=Sampling(greedy=False, seed=seed, top_p=0.95))
                for seed in range(rounds)]
    for request in requests:
        scheduler.submit(request)
    scheduler.run_until_idle()
    pairs = {}
    for request in requests:
        pairs[tuple(request.tokens[1:3])] = pairs.get(tuple(request.tokens[1:3]), 0) + 1
    return pairs, scheduler.summary(), table


def test_speculative_sampling_keeps_the_distribution(tiny_tokenizer):
    """Sampled rows speculate too: tokens 2 and 3 of each answer (after drafts were kept and rejected) follow the
    model's distribution as one-step sampling does (a Markov chain whose exact probabilities are known)."""
    from glm_tune.sampling import token_probabilities

    tokenizer = tiny_tokenizer("chatglm2")
    plain, _, table = sampled_pairs(tokenizer, speculative=0)
    drafted, stats, _ = sampled_pairs(tokenizer, speculative=3)
    assert 0 < stats["accepted"] < stats["drafted"], stats  # drafts both kept and rejected
    sampling, vocab = Sampling(greedy=False, top_p=0.95), tokenizer.vocab_size

    def step(token):
        row = np.full(vocab, -1e4)
        for nxt, logit in table[token].items():
            row[nxt] = logit
        ids, probs = token_probabilities(row, sampling)
        return dict(zip(ids.tolist(), probs.tolist()))

    # P(t2, t3) = sum over t1 of P(t1 | prompt end) P(t2 | t1) P(t3 | t2); compared through t2, t3 only
    first = step(30)
    exact = {}
    for t1, p1 in first.items():
        for t2, p2 in step(t1).items():
            for t3, p3 in step(t2).items():
                exact[(t2, t3)] = exact.get((t2, t3), 0.0) + p1 * p2 * p3
    for counts in (plain, drafted):
        total = sum(counts.values())
        distance = 0.5 * sum(abs(counts.get(k, 0) / total - v) for k, v in exact.items())
        assert distance < 0.05, (counts, exact)


# ------------------------------------------------------------------------------------ answers unchanged


@pytest.mark.slow
@pytest.mark.parametrize("model_type", GENERATIONS)
def test_speculative_answers_are_plain_greedy_answers(model_type, exported, demo_data, monkeypatch):
    """The 24-prompt parity set on both engines, batched and one by one: token for token what plain greedy
    decoding gives. The trained ChatGLM2/3 repeat themselves, so prompt lookup's drafts are kept; the tiny
    ChatGLM-6B does not, so an oracle drafter (the plain answer with every third draft wrong) makes every
    generation keep drafts, reject one and go on from the model's own token."""
    examples = varied_prompts(demo_data, 24)
    folder = exported(model_type)
    reference = engine_predictor(folder)
    plain = reference.predict_ids(examples)
    assert sum(len(ids) for ids in plain) > 100
    for backend in ("onnxruntime", "paddle"):
        for batch_size in (4, 1):
            predictor = engine_predictor(folder, backend, batch_size, speculative=4)
            assert predictor.predict_ids(examples) == plain, (backend, batch_size)
            stats = predictor.scheduler.summary()
            if model_type != "chatglm":
                assert stats["accepted"] > 0 and stats["decode_calls"] < stats["decode_tokens"], stats

    prompts = reference._preprocess(examples)

    def oracle(sequence, count, **_):
        for prompt, answer in zip(prompts, plain):
            if list(sequence[:len(prompt)]) == prompt:
                rest = list(answer[len(sequence) - len(prompt):][:count])
                if len(rest) >= 3:
                    rest[2] += 1  # wrong: the step keeps two drafts and the model's own token
                return rest
        return []

    monkeypatch.setattr(PromptLookup, "propose", lambda lookup, count, **_: oracle(lookup.sequence, count))
    for batch_size in (4, 1):
        predictor = engine_predictor(folder, batch_size=batch_size, speculative=4)
        assert predictor.predict_ids(examples) == plain, batch_size
        stats = predictor.scheduler.summary()
        assert stats["accepted"] > 50 and stats["accepted"] < stats["drafted"], stats


def conversation_turns(demo_data, turns=6):
    """Questions of a conversation: each turn sends the whole history (with the model's own answers) again."""
    return [e.src for e in read_examples(demo_data / "dev.json")[:turns]]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", GENERATIONS)
def test_prefix_cached_turns_answer_as_uncached_ones(model_type, exported, demo_data):
    """A 6-turn conversation replayed with and without the prefix cache: the same answer at every turn; ChatGLM2/3
    reuse the history's columns from the second turn on, ChatGLM-6B (a prefix LM) never does."""
    folder = exported(model_type)
    answers = {}
    for cache_mb in (0, 64):
        # prompts long enough for the whole history (a cut history starts differently and misses the cache)
        predictor = engine_predictor(folder, "onnxruntime", 1, 4, cache_mb, "--src_length", "480")
        history, ids_per_turn = [], []
        for question in conversation_turns(demo_data):
            ids = predictor.predict_ids([Example(question, history=list(history))])[0]
            history.append((question, predictor._postprocess([ids])[0]))
            ids_per_turn.append(ids)
        answers[cache_mb] = ids_per_turn
        stats = predictor.scheduler.summary()
    assert answers[64] == answers[0]
    if model_type == "chatglm":
        assert "prefix_cache" not in stats
    else:
        assert stats["prefix_cache"]["hits"] >= 4 and stats["prefix_cache"]["tokens_reused"] >= 4 * 16, stats


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["chatglm2", "chatglm3"])
def test_rows_joining_mid_decode_with_cache_and_drafts_answer_as_alone(model_type, exported, demo_data):
    """The server's scheduler on its thread: requests arrive while others decode, some repeat an earlier prompt
    (prefix-cache hits), all speculate; each answer equals its one-by-one plain answer."""
    examples = varied_prompts(demo_data, 12)
    folder = exported(model_type)
    reference = engine_predictor(folder, batch_size=1)
    prompts = reference._preprocess(examples)
    alone = reference.predict_ids(examples)
    model = reference.scheduler
    scheduler = Scheduler(model.engine, model.feeds, reference.stops, max_batch=4, speculative=4,
                          prefix_cache=PrefixCache(64 * 2 ** 20)).start()
    try:
        done, results = [], {}
        for round_ in range(2):  # the second round's prompts hit the cache the first left
            for index, prompt in enumerate(prompts):
                finished = threading.Event()
                request = Request(list(prompt), 24, on_token=lambda t: None,
                                  on_finish=lambda reason, e=finished: e.set(), on_error=lambda m, e=finished: e.set())
                results[(round_, index)] = request
                done.append(finished)
                scheduler.submit(request)
                if index % 3 == 0:
                    finished.wait(60)  # let the batch run a while before the next ones join
        assert all(event.wait(120) for event in done)
    finally:
        scheduler.stop()
    for (round_, index), request in results.items():
        assert request.tokens == [t for t in alone[index]], (round_, index)
    stats = scheduler.summary()
    assert stats["prefix_cache"]["hits"] >= len(prompts) // 2 and stats["accepted"] > 0, stats


def test_both_are_on_by_default_only_where_answers_stay_exact():
    from types import SimpleNamespace

    from glm_tune.deployment.exported_model import step_settings

    unset = SimpleNamespace(speculative=None, prefix_cache_mb=None)
    assert step_settings(unset, "fp32") == (4, 256)
    assert step_settings(unset, "int8") == (0, 0) and step_settings(unset, "int4") == (0, 0)
    assert step_settings(SimpleNamespace(speculative=2, prefix_cache_mb=0), "int8") == (2, 0)  # asked for: on
