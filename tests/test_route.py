"""Router on the tiny base: profiles of two synthetic domains; held-out queries go to their domain."""

from __future__ import annotations

import numpy as np
import pytest

from delta_router.errors import DataError, IncompatibleBaseError
from delta_router.models.base import resolve_base
from delta_router.routing.router import QueryEncoder, Router, query_text
from delta_router.testing import SYNTHETIC_WORDS, synthetic_domain


@pytest.fixture(scope="module")
def encoder(tiny_base):
    base = resolve_base(tiny_base)
    return QueryEncoder.for_model(base.load_model(), base.load_tokenizer())


@pytest.fixture(scope="module")
def router(tiny_base, encoder):
    examples = {
        f"{name}-{part}": [query_text(r) for r in synthetic_domain(name).train[part]]
        for name in SYNTHETIC_WORDS
        for part in range(2)
    }
    return Router.fit(encoder, resolve_base(tiny_base).fingerprint, examples)


@pytest.mark.parametrize("domain", sorted(SYNTHETIC_WORDS))
def test_held_out_queries_go_to_their_domain(router, encoder, domain):
    queries = [query_text(r) for r in synthetic_domain(domain, seed=7).test]
    decisions = router.route(encoder, queries)
    assert all(d.adapters[0].startswith(domain) for d in decisions)
    assert all(d.weights == [1.0] and -1.0 <= d.score <= 1.0 for d in decisions)


def test_top_k_weights_and_threshold_fallback(router, encoder):
    query = [query_text(synthetic_domain("fruit", seed=3).test[0])]
    top2 = router.restricted(lambda _: True)
    top2.top_k = 2
    decision = top2.route(encoder, query)[0]
    assert len(decision.adapters) == 2 and np.isclose(sum(decision.weights), 1.0)
    assert decision.weights[0] >= decision.weights[1]
    top2.threshold = 1.01  # no cosine reaches it: the base answers
    fallback = top2.route(encoder, query)[0]
    assert fallback.adapters == [] and fallback.target == "__base__"


def test_save_load_round_trip_and_checks(router, encoder, tiny_base, other_base, tmp_path):
    loaded = Router.load(router.save(tmp_path / "router"))
    queries = [query_text(r) for r in synthetic_domain("digits", seed=5).test[:5]]
    assert loaded.model_ids == router.model_ids
    np.testing.assert_allclose(loaded.similarities(encoder(queries)), router.similarities(encoder(queries)))
    loaded.check_base(resolve_base(tiny_base).fingerprint)
    with pytest.raises(IncompatibleBaseError, match="fitted on base"):
        loaded.check_base(resolve_base(other_base).fingerprint)
    with pytest.raises(DataError, match="query encoder"):
        loaded.route(QueryEncoder(encoder.body, encoder.tokenizer, pooling="last"), queries)
    with pytest.raises(DataError, match="not a saved router"):
        Router.load(tmp_path)
    with pytest.raises(DataError, match="profile examples"):
        Router.fit(encoder, resolve_base(tiny_base).fingerprint, {"a": ["x"], "b": []})
