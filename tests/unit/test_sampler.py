"""Tests for SamplingParams validation and the batched Sampler."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from brigade.engine.sampler import (
    Sampler,
    SampleRow,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
)
from brigade.engine.sampling import MAX_STOP_STRINGS, InvalidParams, SamplingParams

EOS = 2


def mk(
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    generator: torch.Generator | None = None,
    **kw: Any,
) -> SampleRow:
    return SampleRow(SamplingParams(**kw), list(prompt), list(output), generator)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens(sampler: Sampler, logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
    return [s.token_id for s in sampler(logits, rows)]


def reference_probs(logits: Sequence[float], p: SamplingParams) -> list[float]:
    """Plain float64 version of the sampling distribution of one row (for well-separated logits)."""
    z = [v / p.temperature for v in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = set(range(len(z)))
    if 0 < p.top_k < len(z):
        keep = {i for i in keep if z[i] >= z[order[p.top_k - 1]]}
    if p.top_p < 1:
        top = max(z[i] for i in keep)
        total = sum(math.exp(z[i] - top) for i in keep)
        mass, nucleus = 0.0, set()
        for i in (i for i in order if i in keep):
            if mass >= p.top_p:
                break
            nucleus.add(i)
            mass += math.exp(z[i] - top) / total
        keep = nucleus
    if p.min_p > 0:
        top = max(z[i] for i in keep)
        keep = {i for i in keep if math.exp(z[i] - top) >= p.min_p}
    top = max(z[i] for i in keep)
    weights = [math.exp(z[i] - top) if i in keep else 0.0 for i in range(len(z))]
    return [w / sum(weights) for w in weights]


# ---------------------------------------------------------------- greedy / distribution


def test_greedy_is_argmax_alone_and_mixed() -> None:
    logits = torch.randn(12, 500, generator=seeded(0))
    sampler = Sampler([EOS], seed=0)
    assert tokens(sampler, logits, [mk(temperature=0) for _ in range(12)]) == logits.argmax(-1).tolist()

    # Greedy rows must stay argmax when sampled rows (with filters) share the batch.
    rows = [mk(temperature=0) if i % 2 else mk(temperature=1.3, top_p=0.5) for i in range(12)]
    got = tokens(sampler, logits, rows)
    assert [got[i] for i in range(1, 12, 2)] == logits[1::2].argmax(-1).tolist()


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.5),
        dict(temperature=1.0),
        dict(temperature=1.7),
        dict(temperature=1.0, top_k=3),
        dict(temperature=1.0, top_k=3, top_p=0.8),
        dict(temperature=0.8, top_p=0.9),
        dict(temperature=1.2, min_p=0.2),
    ],
)
def test_sampling_frequencies_match_distribution(kw: dict) -> None:
    params = SamplingParams(**kw)
    logits_row = [2.0, 1.0, 0.5, 0.0, -1.0, -1.5]
    expected = reference_probs(logits_row, params)
    sampler = Sampler([EOS], seed=1234)
    batch, calls = 4000, 5
    logits = torch.tensor([logits_row] * batch)
    counts: Counter[int] = Counter()
    for _ in range(calls):
        counts.update(tokens(sampler, logits, [SampleRow(params, [], [], None)] * batch))
    n = batch * calls
    for tok, p in enumerate(expected):
        if p == 0:
            assert counts[tok] == 0, f"token {tok} is filtered out but was sampled {counts[tok]} times"
        else:
            # Binomial std <= 0.0036 at n = 20000; 0.015 is > 4 sigma.
            assert abs(counts[tok] / n - p) < 0.015, (tok, counts[tok] / n, p)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=1, top_p=0.3)])
def test_degenerate_filters_equal_greedy(kw: dict) -> None:
    logits = torch.randn(32, 1000, generator=seeded(1)) * 3
    rows = [mk(temperature=1.5, **kw) for _ in range(32)]
    assert tokens(Sampler([EOS], seed=3), logits, rows) == logits.argmax(-1).tolist()


def test_filter_masks_exact() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -1.5]] * 4)
    kept = apply_top_k_top_p(logits, [0, 3, 3, 0], [1.0, 1.0, 0.8, 0.6])
    assert torch.isfinite(kept).tolist() == [
        [True] * 6,  # no filter
        [True, True, True, False, False, False],  # top-k 3
        [True, True, False, False, False, False],  # top-k 3 renormalized: 0.628, 0.859 -> needs 2
        [True, True, False, False, False, False],  # softmax mass 0.563 < 0.6 -> needs 2
    ]
    assert torch.equal(kept[0], logits[0])
    # min_p 0.3: exp(z - max) >= 0.3  <=>  z >= 2 + ln 0.3 = 0.796
    assert torch.isfinite(apply_min_p(logits[:1], [0.3])).tolist() == [[True, True] + [False] * 4]


def _surely_excluded(z: list[float], p: SamplingParams) -> set[int]:
    """Tokens the filters must drop whatever float32 rounding or tie-breaking the sampler does."""
    vocab = len(z)

    def eps(v: float) -> float:
        return 1e-4 * (1 + abs(v))

    top = max(z)
    out: set[int] = set()
    maybe_k, sure_k = set(range(vocab)), set(range(vocab))
    if 0 < p.top_k < vocab:
        kth = sorted(z, reverse=True)[p.top_k - 1]
        maybe_k = {i for i in range(vocab) if z[i] >= kth - eps(kth)}
        sure_k = {i for i in range(vocab) if z[i] > kth + eps(kth)}
        out |= set(range(vocab)) - maybe_k
    if p.top_p < 1:
        denom = sum(math.exp(z[j] - top) for j in maybe_k)
        for i in maybe_k:
            before = sum(math.exp(z[j] - top) for j in sure_k if z[j] > z[i] + eps(z[i])) / denom
            if before >= p.top_p + 1e-4:
                out.add(i)
    if p.min_p > 0:
        out |= {i for i in range(vocab) if z[i] - top < math.log(p.min_p) - eps(top)}
    return out


_logit = st.one_of(st.integers(-3, 3).map(float), st.floats(-10, 10, width=32))  # integers make ties
_row_case = st.integers(2, 30).flatmap(
    lambda v: st.tuples(
        st.lists(_logit, min_size=v, max_size=v),
        st.builds(
            SamplingParams,
            temperature=st.sampled_from([0.25, 0.7, 1.0, 1.8]),
            top_k=st.integers(-1, v + 2),
            top_p=st.floats(0.01, 1.0),
            min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
        ),
    )
)


@settings(max_examples=60, deadline=None)
@given(cases=st.lists(_row_case, min_size=1, max_size=3), seed=st.integers(0, 2**32))
def test_filters_never_sample_excluded_tokens(cases: list, seed: int) -> None:
    vocab = max(len(lg) for lg, _ in cases)
    copies = 64
    rows, logit_rows, excluded = [], [], []
    for lg, params in cases:
        padded = lg + [-math.inf] * (vocab - len(lg))  # pad vocab with never-allowed tokens
        z = [v / params.temperature for v in torch.tensor(padded).tolist()]
        finite = [v for v in z if v != -math.inf]
        bad = _surely_excluded(finite, params) | set(range(len(lg), vocab))
        for _ in range(copies):
            rows.append(SampleRow(params, [], [], None))
            logit_rows.append(padded)
            excluded.append(bad)
    got = tokens(Sampler([EOS], seed=seed), torch.tensor(logit_rows), rows)
    for tok, bad, row in zip(got, excluded, rows, strict=True):
        assert tok not in bad, (tok, sorted(bad), row.params)


# ---------------------------------------------------------------- penalties / min_tokens


def test_penalties_match_direct_computation() -> None:
    vocab = 40
    logits = torch.randn(5, vocab, generator=seeded(2)) * 4  # both signs
    before = logits.clone()
    prompt = [1, 3, 3, 7, 39, 12]
    output = [3, 5, 5, 5, 12, 20]
    rows = [
        mk(prompt, output, repetition_penalty=1.3),
        mk(prompt, output, presence_penalty=0.7),
        mk(prompt, output, frequency_penalty=-0.4),
        mk(prompt, output, repetition_penalty=0.8, presence_penalty=-1.5, frequency_penalty=1.1),
        mk(prompt, output),  # no penalties
    ]
    got = apply_penalties(logits, rows)
    assert torch.equal(logits, before), "input logits must not be modified"

    expected = logits.clone().double()
    for b, r in enumerate(rows):
        p = r.params
        for tok in set(prompt) | set(output):
            v = expected[b, tok]
            expected[b, tok] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for tok, count in Counter(output).items():
            expected[b, tok] -= p.presence_penalty + p.frequency_penalty * count
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[4], logits[4])
    # Presence/frequency see output tokens only: a prompt-only token keeps its logit.
    assert got[1, 7] == logits[1, 7] and got[2, 39] == logits[2, 39]


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    assert tokens(Sampler([]), logits, [mk([1], [], temperature=0)]) == [1]
    assert tokens(Sampler([]), logits, [mk([1], [], temperature=0, repetition_penalty=2.0)]) == [2]
    assert tokens(Sampler([]), logits, [mk([], [1, 1], temperature=0, frequency_penalty=0.6)]) == [2]
    # Presence ignores the prompt.
    assert tokens(Sampler([]), logits, [mk([1], [], temperature=0, presence_penalty=2.0)]) == [1]


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    vocab = 10
    logits = torch.zeros(1, vocab)
    logits[0, EOS], logits[0, 3], logits[0, 7], logits[0, 5] = 10.0, 9.5, 9.0, 8.0
    sampler = Sampler([EOS, 3])  # two EOS ids
    kw = dict(temperature=0, min_tokens=3, stop_token_ids=(7,))
    assert tokens(sampler, logits, [mk(output=[4, 4], **kw)]) == [5]
    assert tokens(sampler, logits, [mk(output=[4, 4, 4], **kw)]) == [EOS]
    # min_tokens masks even with ignore_eos; ignore_eos alone masks nothing.
    assert tokens(sampler, logits, [mk(output=[], ignore_eos=True, **kw)]) == [5]
    assert tokens(sampler, logits, [mk(temperature=0, ignore_eos=True)]) == [EOS]

    # Sampled rows too: EOS/stop dominate the distribution but must never appear.
    rows = [mk(output=[], temperature=1.0, min_tokens=1, stop_token_ids=(7,)) for _ in range(2000)]
    got = set(tokens(sampler, logits.expand(2000, vocab), rows))
    assert not got & {EOS, 3, 7} and 5 in got


# ---------------------------------------------------------------- seeds


def _run_seeded(
    params: SamplingParams, step_logits: list[torch.Tensor], position: int, fillers: int, other_seed: int
) -> list[int]:
    """Decode len(step_logits) steps for one seeded request placed among unrelated rows."""
    gen = torch.Generator().manual_seed(params.seed or 0)
    other_gen = torch.Generator().manual_seed(other_seed)
    noise = torch.Generator().manual_seed(other_seed + 1)
    sampler = Sampler([EOS], seed=other_seed)
    output: list[int] = []
    for logits_row in step_logits:
        vocab = logits_row.shape[0]
        rows = [
            mk([1, 2], [], other_gen, temperature=0.9, seed=other_seed),
            mk(temperature=0),
            mk(temperature=1.0, top_k=5),
        ][:fillers]
        rows += [mk(temperature=1.1) for _ in range(fillers - len(rows))]
        batch = torch.randn(len(rows) + 1, vocab, generator=noise)
        rows.insert(position, SampleRow(params, [1, 2, 3], list(output), gen))
        batch[position] = logits_row
        output.append(sampler(batch, rows)[position].token_id)
    return output


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.3, top_k=50, min_p=0.01),
        dict(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.5),
    ],
)
def test_same_seed_same_tokens_regardless_of_batch(kw: dict) -> None:
    steps = [torch.randn(1000, generator=seeded(10 + i)) * 0.5 for i in range(12)]
    a = _run_seeded(SamplingParams(seed=42, **kw), steps, position=0, fillers=3, other_seed=1)
    b = _run_seeded(SamplingParams(seed=42, **kw), steps, position=3, fillers=5, other_seed=2)
    c = _run_seeded(SamplingParams(seed=42, **kw), steps, position=0, fillers=0, other_seed=3)
    assert a == b == c
    assert len(set(a)) > 1  # the distribution is flat enough that sampling really happens
    d = _run_seeded(SamplingParams(seed=43, **kw), steps, position=0, fillers=3, other_seed=1)
    assert d != a


def test_sampler_seed_reproducible_for_unseeded_rows() -> None:
    logits = torch.randn(64, 300, generator=seeded(5))
    rows = [mk(temperature=1.0) for _ in range(64)]
    assert tokens(Sampler([EOS], seed=9), logits, rows) == tokens(Sampler([EOS], seed=9), logits, rows)
    assert tokens(Sampler([EOS], seed=9), logits, rows) != tokens(Sampler([EOS], seed=10), logits, rows)


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_and_sorted() -> None:
    logits = torch.randn(5, 200, generator=seeded(6)) * 3
    rows = [
        mk([1, 2], [3], logprobs=5, temperature=0.5, repetition_penalty=1.5, presence_penalty=1.0),
        mk(logprobs=0, temperature=0),
        mk(logprobs=None, temperature=1.0),
        mk(output=[], logprobs=20, temperature=1.0, top_k=3, min_tokens=2),
        mk(logprobs=3, temperature=0, frequency_penalty=2.0, output=[int(logits[4].argmax())] * 5),
    ]
    got = Sampler([EOS], seed=0)(logits, rows)
    raw = torch.log_softmax(logits.double(), dim=-1)
    for b, (s, r) in enumerate(zip(got, rows, strict=True)):
        n = r.params.logprobs
        if n is None:
            assert s.logprob is None and s.top_logprobs is None
            continue
        assert s.logprob == pytest.approx(raw[b, s.token_id].item(), abs=1e-5)
        assert s.top_logprobs is not None and len(s.top_logprobs) == n
        values = [v for _, v in s.top_logprobs]
        assert values == sorted(values, reverse=True)
        ref = torch.topk(raw[b], n)
        assert [t for t, _ in s.top_logprobs] == ref.indices.tolist()
        assert values == pytest.approx(ref.values.tolist(), abs=1e-5)
    # The penalized greedy row did not pick the raw argmax, yet its logprob is the raw one.
    assert got[4].token_id != int(logits[4].argmax())


def test_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError):
        Sampler([EOS])(torch.zeros(3, 10), [mk()])


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "kw, param",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2.0), "max_tokens"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature="1"), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(presence_penalty=-2.1), "presence_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=3), "frequency_penalty"),
        (dict(frequency_penalty=-2.01), "frequency_penalty"),
        (dict(seed=2**64), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=21), "logprobs"),
        (dict(logprobs=2.0), "logprobs"),
        (dict(stop=""), "stop"),
        (dict(stop=("ok", "")), "stop"),
        (dict(stop=[1]), "stop"),
        (dict(stop=tuple(str(i) for i in range(MAX_STOP_STRINGS + 1))), "stop"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
        (dict(stop_token_ids=["a"]), "stop_token_ids"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=17), "min_tokens"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens"),
        (dict(ignore_eos="yes"), "ignore_eos"),
    ],
)
def test_validate_rejects(kw: dict, param: str) -> None:
    with pytest.raises(InvalidParams) as err:
        SamplingParams(**kw).validate()
    assert err.value.param == param
    assert isinstance(err.value, ValueError) and param in str(err.value)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(temperature=0),
        dict(temperature=5.0),  # no upper cap, by design
        dict(top_k=-1),
        dict(top_k=1),
        dict(top_p=1.0, min_p=1.0),
        dict(min_p=0.0),
        dict(presence_penalty=-2, frequency_penalty=2),
        dict(seed=-1),
        dict(seed=2**64 - 1),
        dict(logprobs=0),
        dict(logprobs=20),
        dict(stop=tuple(str(i) for i in range(MAX_STOP_STRINGS))),
        dict(max_tokens=5, min_tokens=5),
    ],
)
def test_validate_accepts(kw: dict) -> None:
    SamplingParams(**kw).validate()


def test_from_dict_and_properties() -> None:
    p = SamplingParams.from_dict({"stop": "\n", "temperature": None, "stop_token_ids": [5, 6], "top_p": 0.5})
    assert p.stop == ("\n",) and p.stop_token_ids == (5, 6) and p.temperature == 1.0 and p.top_p == 0.5
    assert SamplingParams.from_dict({"stop": ["a", "b"]}).stop == ("a", "b")
    assert hash(p) == hash(SamplingParams(stop=("\n",), stop_token_ids=(5, 6), top_p=0.5))
    with pytest.raises(InvalidParams) as err:
        SamplingParams.from_dict({"temprature": 0.5})
    assert err.value.param == "temprature"
    assert SamplingParams.from_dict({"model": "x", "max_tokens": 3}, strict=False).max_tokens == 3
    with pytest.raises(InvalidParams) as err:
        SamplingParams.from_dict({"top_p": 2})
    assert err.value.param == "top_p"
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.1).greedy
    assert SamplingParams(frequency_penalty=0.1).has_penalties and not SamplingParams().has_penalties
