"""Continuous batching gives each request what it would get alone; text streams cut at stop strings."""

from __future__ import annotations

import threading

import pytest
from transformers import AutoTokenizer

import moestream
from moestream.batch import Batch, Engine, QueueFull, Request, batchable
from moestream.demo import bundled_model
from moestream.generate import Sampling
from moestream.text import TextStream

PROMPTS = ["def read_config(path):\n    ", "import os\n", "class Parser:\n    def __init__(self",
           "    return self._" * 20, "for i in range(10):\n        if "]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    store = moestream.convert.convert(str(bundled_model()), tmp_path_factory.mktemp("tiny") / "store",
                                      progress=False)
    # An expert cache of a few records: every batched step evicts, so reads are shared under pressure.
    with moestream.load(store, cache="2MB", progress=False) as m:
        yield m


class Collector:
    def __init__(self):
        self.pieces: list[str] = []
        self.finish: str | None = None
        self.done = threading.Event()

    def __call__(self, piece: str, finish: str | None) -> None:
        self.pieces.append(piece)
        if finish is not None:
            self.finish = finish
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def request(m, prompt: str, n: int, out: Collector, stop=(), **sampling) -> Request:
    return Request(m.encode(prompt, chat=False), n, Sampling(**sampling), TextStream(m.tokenizer, stop), out,
                   eos=m.eos_ids())


def test_batched_greedy_equals_alone(tiny):
    alone = [tiny.generate(p, 32, chat=False) for p in PROMPTS]
    engine = Engine(tiny, max_batch=4, max_queue=8)
    try:
        base = tiny.cache.total()
        outs = [Collector() for _ in PROMPTS]
        reqs = []
        for i, (p, out) in enumerate(zip(PROMPTS, outs)):
            reqs.append(request(tiny, p, 32, out))
            engine.submit(reqs[-1])
            if i == 1:  # the rest join a batch that is already decoding
                outs[0].pieces or outs[0].done.wait(0.5)
        for out in outs:
            assert out.done.wait(60)
        assert [o.text for o in outs] == alone
        assert all(o.finish == "length" for o in outs)
        s = engine.stats
        assert s.decode_rows > s.decode_steps  # steps really held several rows
        assert s.generated_tokens == 32 * len(PROMPTS)
        assert tiny.cache.total().misses > base.misses
    finally:
        engine.close()


def test_sampled_rows_follow_their_own_seed(tiny):
    ref = tiny.generate(PROMPTS[0], 16, chat=False, temperature=0.8, top_p=0.9, seed=7)
    engine = Engine(tiny, max_batch=3)
    try:
        outs = [Collector() for _ in range(3)]
        for i, out in enumerate(outs):  # same prompt and seed: same text, however the rows are batched
            engine.submit(request(tiny, PROMPTS[0], 16, out, temperature=0.8, top_p=0.9, seed=7))
        for out in outs:
            assert out.done.wait(60)
        assert [o.text for o in outs] == [ref] * 3
    finally:
        engine.close()


def test_cancel_frees_the_slot_and_others_continue(tiny):
    engine = Engine(tiny, max_batch=2, max_queue=0)
    try:
        a, b = Collector(), Collector()
        ra = request(tiny, PROMPTS[0], 10_000, a)
        ra.eos = set()
        engine.submit(ra)
        engine.submit(request(tiny, PROMPTS[1], 24, b))
        with pytest.raises(QueueFull):  # two slots taken, no queue
            engine.submit(request(tiny, PROMPTS[2], 4, Collector()))
        assert b.done.wait(60)
        engine.cancel(ra)
        assert a.done.wait(10) and a.finish == "cancelled"
        assert b.text == tiny.generate(PROMPTS[1], 24, chat=False)
        c = Collector()
        engine.submit(request(tiny, PROMPTS[2], 4, c))
        assert c.done.wait(30) and c.finish in ("length", "stop")
        assert engine.active == 0 and engine.stats.requests["cancelled"] == 1
    finally:
        engine.close()


def test_batch_trims_padding_when_the_long_row_leaves(tiny):
    from transformers import DynamicCache

    model = tiny.model
    caches = []
    for ids in ([1, 2, 3, 4, 5, 6], [7, 8]):
        c = DynamicCache(config=model.config)
        import torch

        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]), cache=c, use_cache=True)
        caches.append(c)
    batch = Batch()
    r1 = Request([1, 2, 3, 4, 5, 6], 4, Sampling(), TextStream(tiny.tokenizer), Collector())
    r2 = Request([7, 8], 4, Sampling(), TextStream(tiny.tokenizer), Collector())
    batch.add(r1, caches[0])
    batch.add(r2, caches[1])
    assert batch.mask.tolist() == [[True] * 6, [False] * 4 + [True] * 2]
    assert batch.cache.layers[0].keys.shape[0] == 2 and batch.cache.layers[0].keys.shape[2] == 6
    batch.keep([1])
    assert batch.mask.tolist() == [[True, True]] and batch.cache.layers[0].keys.shape[2] == 2


def test_models_with_sliding_or_linear_layers_are_served_one_at_a_time():
    from transformers import GptOssConfig, Qwen3MoeConfig, Qwen3NextConfig

    assert batchable(Qwen3MoeConfig(num_hidden_layers=2))
    assert not batchable(GptOssConfig(num_hidden_layers=2))
    assert not batchable(Qwen3NextConfig(num_hidden_layers=4))


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(bundled_model())


def _feed(stream: TextStream, ids: list[int]) -> str:
    return "".join(stream.add(t) for t in ids) + stream.finish()


def test_text_stream_equals_full_decode(tok):
    text = "def f(x):\n    return x  # naïve, 温度 ✓\n"
    ids = tok(text)["input_ids"]
    assert _feed(TextStream(tok), ids) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stop,expect", [(["return"], "def f(x):\n    "), (["\n"], "def f(x):"),
                                         (["zzz"], "def f(x):\n    return x\n"), (["x):\n", "f("], "def ")])
def test_text_stream_stops_before_the_stop_string(tok, stop, expect):
    ids = tok("def f(x):\n    return x\n")["input_ids"]
    s = TextStream(tok, stop)
    pieces = []
    for t in ids:
        pieces.append(s.add(t))
        if s.stopped:
            break
    pieces.append(s.finish())
    assert "".join(pieces) == expect
    assert (s.stopped is not None) == (expect != "def f(x):\n    return x\n")
