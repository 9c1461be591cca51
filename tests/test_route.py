"""Router on the tiny base: profiles of two synthetic domains; held-out queries go to their domain."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from delta_router.embedding.vectors import unit_rows
from delta_router.errors import DataError, IncompatibleBaseError, SpaceMismatchError
from delta_router.models.base import resolve_base
from delta_router.routing.router import Background, QueryEncoder, Router, query_text
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
    assert fallback.adapters == [] and fallback.target == "__base__" and fallback.fallback == "threshold"
    assert decision.fallback is None


def test_a_router_of_some_models_from_their_means_is_the_one_fitted_on_their_examples(tiny_base, encoder):
    """``Router.from_means`` of a subset of models is centred on that subset alone: the router that
    ``fit`` on their examples gives (what a benchmark needs to withhold a domain honestly)."""
    from delta_router.routing.router import mean_queries

    fingerprint = resolve_base(tiny_base).fingerprint
    examples = {
        f"{name}-{part}": [query_text(r) for r in synthetic_domain(name).train[part][:6]]
        for name in SYNTHETIC_WORDS
        for part in range(2)
    }
    means = mean_queries(encoder, examples)
    some = list(examples)[1:]
    subset = Router.from_means(some, means[1:], encoder, fingerprint)
    fitted = Router.fit(encoder, fingerprint, {name: examples[name] for name in some})
    assert subset.model_ids == fitted.model_ids and subset.threshold == fitted.threshold
    np.testing.assert_allclose(subset.profiles, fitted.profiles, atol=1e-5)
    np.testing.assert_allclose(subset.center, fitted.center, atol=1e-5)
    whole = Router.fit(encoder, fingerprint, examples)
    assert not np.allclose(whole.center, subset.center)  # the withheld model moved the centre


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
    meta_file = tmp_path / "router" / "router.json"
    meta = json.loads(meta_file.read_text())
    for broken in ({k: v for k, v in meta.items() if k != "base"}, meta | {"base": {"hidden": 1}}, [meta]):
        meta_file.write_text(json.dumps(broken))
        with pytest.raises(DataError, match="router.json: missing or malformed|not a saved router"):
            Router.load(tmp_path / "router")


def test_each_profile_keeps_how_it_was_made(router, tmp_path):
    """``sources`` follow add / remove / restricted and a save; a router saved before them loads as
    profiled from examples."""
    import json

    routed = Router.load(router.save(tmp_path / "router"))
    assert routed.sources == ["examples"] * len(routed.model_ids)
    routed.add("guessed", routed.profiles[0], "data-free")
    routed.remove(routed.model_ids[0])
    assert routed.sources[-1] == "data-free" and len(routed.sources) == len(routed.model_ids)
    assert routed.restricted(lambda m: m == "guessed").sources == ["data-free"]
    assert Router.load(routed.save(tmp_path / "again")).sources == routed.sources
    with pytest.raises(DataError, match="profile source"):
        routed.add("other", routed.profiles[0], "hearsay")
    meta = json.loads((tmp_path / "router" / "router.json").read_text())
    del meta["sources"]
    (tmp_path / "router" / "router.json").write_text(json.dumps(meta))
    assert Router.load(tmp_path / "router").sources == ["examples"] * len(router.model_ids)


def test_a_background_task_no_model_covers_sends_its_queries_to_the_base(router, encoder, tmp_path):
    """A router without the digits models, with every profile as background: digits queries go to the
    base, fruit queries still to fruit; a digits task is covered again once two digits models (the
    default support) reach it, and one alone does not; a router saved before support was kept loads
    with support 1, as it was fitted."""
    assert router.covers is router.profiles  # a data-based router's covers are its profiles: one array
    fruit_only = router.restricted(lambda m: m.startswith("fruit"))
    # margin < 0: this background is the models' own profiles, which the routed model matches exactly
    fruit_only.threshold, fruit_only.background = None, Background(router.profiles, margin=-0.05)
    digits = [query_text(r) for r in synthetic_domain("digits", seed=7).test]
    fruit = [query_text(r) for r in synthetic_domain("fruit", seed=7).test]
    assert all(
        d.target == "__base__" and d.fallback == "background" for d in fruit_only.route(encoder, digits)
    )
    assert all(d.adapters[0].startswith("fruit") for d in fruit_only.route(encoder, fruit))
    without = fruit_only.restricted(lambda _: True)
    without.background = None
    assert all(d.adapters for d in without.route(encoder, digits))  # no background: some fruit model

    loaded = Router.load(fruit_only.save(tmp_path / "with-background"))
    np.testing.assert_allclose(loaded.background.profiles, fruit_only.background.profiles)
    np.testing.assert_allclose(loaded.covers, fruit_only.covers)
    assert all(d.target == "__base__" for d in loaded.route(encoder, digits))
    assert loaded.background.support == 2
    for model_id in ("digits-0", "digits-1"):
        loaded.add(model_id, router.profiles[router.model_ids.index(model_id)])
        assert loaded.covers is loaded.profiles
        covered = [
            bool(d.adapters) and d.adapters[0].startswith("digits") for d in loaded.route(encoder, digits)
        ]
        assert all(covered) if model_id == "digits-1" else not any(covered)  # one model is not support
    loaded.remove("digits-0")
    assert all(d.target == "__base__" for d in loaded.route(encoder, digits))

    before_support = fruit_only.save(tmp_path / "before-support")
    meta = json.loads((before_support / "router.json").read_text())
    del meta["background"]["support"]
    (before_support / "router.json").write_text(json.dumps(meta))
    one = Router.load(before_support)
    assert one.background.support == 1
    one.add("digits-0", router.profiles[router.model_ids.index("digits-0")])
    assert all(d.adapters[0] == "digits-0" for d in one.route(encoder, digits))

    old = router.save(tmp_path / "before-backgrounds")  # a router saved before backgrounds were kept
    meta = json.loads((old / "router.json").read_text())
    del meta["background"]
    (old / "router.json").write_text(json.dumps(meta))
    assert not (old / "covers.npy").exists()  # a data-based router's covers are its profiles
    legacy = Router.load(old)
    assert legacy.background is None and np.allclose(legacy.covers, legacy.profiles)


def test_an_uncovered_task_claims_a_query_only_against_its_rival():
    """Two background tasks, the first covered (two models reach it), the second not. A query of the
    first that the routed profiles match badly (a poor data-free guess) stays with the pool when the
    uncovered task must beat the covered one ("covered"), and goes to the base when it must beat the
    routed model ("routed"); a query of the second goes to the base either way; with no task covered,
    every query does."""
    tasks = np.eye(3, dtype=np.float32)[:2]  # task 0 and task 1, orthogonal
    covers = unit_rows(np.array([[1.0, 0.1, 0.0], [1.0, -0.1, 0.0]], dtype=np.float32))  # near task 0
    queries = unit_rows(np.array([[1.0, 0.5, 0.0], [0.1, 1.0, 0.0]], dtype=np.float32))  # of task 0, 1
    best = np.array([0.2, 0.2])  # the routed profiles' best cosines: poor guesses
    for rival, expected in (("covered", [False, True]), ("routed", [True, True])):
        background = Background(tasks, rival=rival, margin=0.0)
        uncovered = background.uncovered(covers)
        assert uncovered.tolist() == [False, True]
        assert background.claims(queries, best, uncovered).tolist() == expected
    lonely = Background(tasks)  # one model reaches task 0: below the default support of 2
    assert lonely.claims(queries, best, lonely.uncovered(covers[:1])).all()
    with pytest.raises(ValueError, match="rival"):
        Background(tasks, rival="nearest")


def test_a_router_saved_before_rivals_were_kept_loads_as_it_was_fitted(router, tmp_path):
    """router.json with a background but no ``rival``: it was fitted against the routed models."""
    saved = router.restricted(lambda _: True)
    saved.background = Background(router.profiles)
    assert Router.load(saved.save(tmp_path / "now")).background.rival == "covered"
    meta = json.loads((tmp_path / "now" / "router.json").read_text())
    del meta["background"]["rival"]
    (tmp_path / "now" / "router.json").write_text(json.dumps(meta))
    assert Router.load(tmp_path / "now").background.rival == "routed"


def test_profile_map_interpolates_its_reference_and_refuses_too_little():
    from delta_router.routing.data_free import ProfileMap, leave_one_group_out

    rng = np.random.default_rng(0)
    deltas, profiles = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    profiles /= np.linalg.norm(profiles, axis=1, keepdims=True)
    mapping = ProfileMap(alpha=1e-3).fit(deltas, profiles)
    nearest = (mapping.predict(deltas) @ profiles.T).argmax(1)
    assert list(nearest) == list(range(6))  # each reference delta maps closest to its own profile
    held_out = leave_one_group_out(deltas, profiles, ["a", "a", "b", "b", "c", "c"])
    assert held_out.shape == profiles.shape and np.allclose(np.linalg.norm(held_out, axis=1), 1.0)
    with pytest.raises(DataError, match=">= 2"):
        ProfileMap().fit(deltas[:1], profiles[:1])


def test_a_profile_map_of_two_blocks_averages_one_map_per_block():
    """Two kinds of delta side by side ("formats+plain"): each block mapped by its own ridge, the
    prediction the unit mean of the two; one block is the plain map."""
    from delta_router.routing.data_free import ProfileMap, delta_blocks

    rng = np.random.default_rng(1)
    first, second, profiles = rng.normal(size=(8, 16)), rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    population = rng.normal(size=(11, 32))
    both = ProfileMap(0.01, blocks=2).fit(np.hstack([first, second]), profiles, population)
    one = ProfileMap(0.01).fit(first, profiles, population[:, :16]).predict(first[:3])
    two = ProfileMap(0.01).fit(second, profiles, population[:, 16:]).predict(second[:3])
    assert np.allclose(both.predict(np.hstack([first, second])[:3]), unit_rows(one + two), atol=1e-6)
    assert not np.allclose(one, two, atol=1e-2)
    assert delta_blocks("formats+plain") == 2 and delta_blocks("formats") == delta_blocks("index") == 1
    with pytest.raises(DataError, match="3 equal blocks"):
        ProfileMap(blocks=3).fit(np.hstack([first, second]), profiles)


def test_whitening_keeps_a_widely_varying_nuisance_from_deciding_the_profile():
    """Deltas of three domains, each shifted along one shared direction by how hard the finetune was
    trained (a spread 10x the domains' own shifts). A new finetune of domain 0, trained as hard as
    one of domain 1: whitened, the map takes it for domain 0; unwhitened, for domain 1."""
    from delta_router.routing.data_free import ProfileMap

    rng = np.random.default_rng(0)
    dim, labels = 32, np.repeat(np.arange(3), 4)
    strength = rng.uniform(-10, 10, size=len(labels))
    nuisance = np.eye(dim)[3]
    deltas = np.eye(dim)[labels] + strength[:, None] * nuisance + 0.05 * rng.normal(size=(len(labels), dim))
    profiles, tasks = np.eye(dim)[10 + labels], np.eye(dim)[10:13]
    new = np.eye(dim)[[0]] + strength[labels == 1][0] * nuisance
    population = np.vstack([deltas, new])
    whitened = ProfileMap(0.1, shrinkage=0.1).fit(deltas, profiles, population).predict(new)
    plain = ProfileMap(0.1, shrinkage=None).fit(deltas, profiles, population).predict(new)
    assert (whitened @ tasks.T).argmax() == 0
    assert (plain @ tasks.T).argmax() == 1


def test_centred_profiles_drop_the_direction_every_blend_shares():
    from delta_router.routing.data_free import centred_profiles

    domains, shared = np.eye(8)[:3], np.eye(8)[7]
    blends = domains + 2 * shared  # predicted profiles: each a domain plus what every blend shares
    blends /= np.linalg.norm(blends, axis=1, keepdims=True)
    centred = centred_profiles(blends)
    assert np.allclose(np.linalg.norm(centred, axis=1), 1.0)
    assert list((domains @ centred.T).argmax(1)) == [0, 1, 2]  # each domain's query to its model
    assert (domains @ centred.T).max(1).min() > (domains @ blends.T).max(1).max()  # and more confidently
    assert (shared @ blends.T).min() > 0.8 > 0.1 > np.abs(shared @ centred.T).max()  # not to every model
    assert np.array_equal(centred_profiles(blends[:1]), blends[:1].astype(np.float32))


def tiny_zoo(name: str, base, root, seed: int = 0):
    """An unbuilt zoo of 3 LoRAs per synthetic domain on ``base``, under ``root / name``."""
    from delta_router.training.trainer import TrainConfig
    from delta_router.zoo.zoo import Zoo, ZooSpec

    spec = ZooSpec(name, tuple(SYNTHETIC_WORDS), parts=3, train_size=24, seed=seed,
                   train=TrainConfig(max_steps=5, batch_size=8, learning_rate=1e-2))  # fmt: skip
    splits = {domain: synthetic_domain(domain) for domain in SYNTHETIC_WORDS}
    return Zoo(spec, base, root=root / name, progress=False, splits=splits)


def assert_held_out_queries_reach_their_domain(router: Router, encoder: QueryEncoder) -> None:
    """>= 90% of each synthetic domain's held-out queries go to one of its finetunes."""
    for domain in SYNTHETIC_WORDS:
        queries = [query_text(r) for r in synthetic_domain(domain, seed=7).test]
        picks = [d.adapters[0] for d in router.route(encoder, queries)]
        assert np.mean([p.startswith(domain) for p in picks]) >= 0.9


def test_data_free_router_sends_queries_to_their_domain(
    tiny_base, other_base, encoder, tmp_path, monkeypatch, capsys
):
    """Profiles from the finetunes alone, mapped by a reference zoo (here the same zoo); API and CLI,
    which says what the map takes each finetune for (its nearest reference finetune)."""
    from delta_router.routing.data_free import fit_data_free, reference_pairs

    zoo = tiny_zoo("tiny", tiny_base, tmp_path)
    index = zoo.build()
    deltas, reference = reference_pairs(zoo, encoder)
    router = fit_data_free(index, deltas, reference, threshold=None)  # the mapping, not the fallback
    assert router.model_ids == index.model_ids() and set(router.sources) == {"data-free"}
    assert np.allclose(router.background.profiles, reference.profiles, atol=1e-6)  # all covered: below
    foreign = Router(reference.model_ids, reference.profiles, reference.center,
                     resolve_base(other_base).fingerprint)  # fmt: skip
    with pytest.raises(IncompatibleBaseError, match="the index's base"):
        fit_data_free(index, deltas, foreign)
    with pytest.raises(DataError, match="reference deltas"):
        fit_data_free(index, deltas[:-1], reference)
    elsewhere = dataclasses.replace(index.space, probes="other probes")  # an index of other probes
    with pytest.raises(SpaceMismatchError, match="the index there(.|\n)*the reference zoo tiny"):
        reference_pairs(zoo, encoder, space=(elsewhere, "the index there"))
    assert_held_out_queries_reach_their_domain(router, encoder)

    from delta_router.cli import main
    from delta_router.zoo import zoo as zoo_module

    monkeypatch.setattr(zoo_module, "Zoo", lambda *args, **kwargs: zoo)  # --reference-zoo: this one
    out = tmp_path / "router"
    argv = ["route", "fit", "--index", str(zoo.index_dir), "--data-free", "--out", str(out), "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    nearest = json.loads(capsys.readouterr().out)["nearest_reference"]
    assert list(nearest) == router.model_ids
    for model_id, row in nearest.items():  # in its own reference, a finetune is mapped onto its domain
        assert row["domain"] == model_id.split("-")[0] and row["reference"].startswith(row["domain"])
        assert -1 <= row["cosine"] <= 1
    fitted = Router.load(out)
    assert fitted.model_ids == router.model_ids and fitted.threshold is not None  # the calibrated default
    assert fitted.background is not None
    assert fitted.reference.deltas_kind == "formats+plain"  # the default: both kinds side by side
    assert fitted.reference.deltas.shape[1] == 2 * reference_pairs(zoo, encoder, "formats")[0].shape[1]
    assert np.allclose(np.abs(fitted.profiles @ router.profiles.T).diagonal(), 1.0, atol=1e-4)

    # --profile-deltas index: the map reads the indexed vectors, no forward pass
    from delta_router.routing import data_free

    def no_forward(*args, **kwargs):
        raise AssertionError("--profile-deltas index ran the profile embedder")

    monkeypatch.setattr(data_free, "profile_embedder", no_forward)
    out = tmp_path / "router-index"
    argv[argv.index("--out") + 1] = str(out)
    # ... with the map's own settings: the old unwhitened map at another ridge
    options = ["--no-background", "--map-alpha", "0.03", "--shrinkage", "none"]
    assert main([*argv, "--profile-deltas", "index", *options]) == 0
    by_index = Router.load(out)
    assert by_index.background is None
    assert (by_index.reference.alpha, by_index.reference.shrinkage) == (0.03, None)
    index_deltas = reference_pairs(zoo, encoder, "index")[0]
    expected = fit_data_free(index, index_deltas, reference, 0.03, "index", shrinkage=None)
    assert by_index.model_ids == router.model_ids
    assert np.allclose(by_index.profiles, expected.profiles, atol=1e-5)
    default = fit_data_free(index, index_deltas, reference, deltas="index")
    assert not np.allclose(by_index.profiles, default.profiles)  # the options reached the map


def test_a_whitened_data_free_router_covers_what_the_unwhitened_map_predicts(tiny_base, encoder, tmp_path):
    """Whitening ranks a pool's models (their profiles); what each covers of the background is the
    unwhitened map's profile (``mapped_profiles``), saved with the router. Unwhitened, covers are
    the profiles."""
    from delta_router.routing.data_free import COVER_ALPHA, fit_data_free, reference_pairs

    zoo = tiny_zoo("tiny", tiny_base, tmp_path)
    index = zoo.build()
    deltas, reference = reference_pairs(zoo, encoder)
    whitened = fit_data_free(index, deltas, reference)
    plain = fit_data_free(index, deltas, reference, alpha=COVER_ALPHA, shrinkage=None)
    assert plain.covers is plain.profiles
    np.testing.assert_allclose(whitened.covers, plain.profiles, atol=1e-5)
    assert not np.allclose(whitened.profiles, plain.profiles, atol=1e-3)
    loaded = Router.load(whitened.save(tmp_path / "router"))
    np.testing.assert_allclose(loaded.covers, whitened.covers)


@pytest.mark.parametrize("kind, whitened", [("formats+plain", True), ("formats", False)])  # default; older
def test_a_registration_into_a_data_free_router_maps_like_a_refit(
    tiny_base, encoder, tmp_path, kind, whitened
):
    """A data-free router keeps its reference pairs (saved with it); the live registry profiles a new
    finetune by that map, of the router's kind of deltas, exactly as ``fit_data_free`` would profile
    it in an index that held it. (A map fitted on the router's own data-free profiles can only blend
    the tasks it already has.) A router saved before maps were whitened (no ``shrinkage`` saved) is
    mapped unwhitened, as it was fitted."""
    from delta_router.routing.data_free import DEFAULT_SHRINKAGE, fit_data_free, reference_pairs
    from delta_router.serving.backends import PeftBackend
    from delta_router.serving.registry import AdapterRegistry
    from delta_router.serving.scheduler import BatchScheduler

    zoo = tiny_zoo("tiny", tiny_base, tmp_path)
    index = zoo.build()
    deltas, reference = reference_pairs(zoo, encoder, kind)
    new = index.model_ids()[-1]
    shrinkage = DEFAULT_SHRINKAGE if whitened else None
    kept = index.filtered(lambda e: e.model_id != new)
    saved = fit_data_free(kept, deltas, reference, deltas=kind, shrinkage=shrinkage).save(tmp_path / "router")
    if not whitened:
        meta = json.loads((saved / "router.json").read_text())
        del meta["reference"]["shrinkage"]
        (saved / "router.json").write_text(json.dumps(meta))
    router = Router.load(saved)
    assert router.reference.deltas_kind == kind and router.reference.shrinkage == shrinkage
    np.testing.assert_allclose(router.reference.deltas, deltas)
    np.testing.assert_allclose(router.reference.profiles, reference.profiles)
    registry = AdapterRegistry(
        index.filtered(lambda e: e.model_id != new),
        BatchScheduler(PeftBackend(resolve_base(tiny_base), {}), router),
    )
    registry.register(index.get(new).embedding.path, new)
    refit = fit_data_free(index, deltas, reference, deltas=kind, shrinkage=shrinkage)
    row = refit.model_ids.index(new)
    np.testing.assert_allclose(router.profiles[-1], refit.profiles[row], atol=1e-5)
    np.testing.assert_allclose(router.covers[-1], refit.covers[row], atol=1e-5)


def test_a_reference_router_is_refitted_when_its_zoo_trains_on_other_prompts(tiny_base, encoder, tmp_path):
    from delta_router.routing.data_free import reference_pairs
    from delta_router.zoo.zoo import Zoo

    zoo = tiny_zoo("tiny", tiny_base, tmp_path)
    zoo.build()
    first = reference_pairs(zoo, encoder)[1]
    redrawn = {domain: synthetic_domain(domain, seed=3) for domain in SYNTHETIC_WORDS}
    rebuilt = Zoo(zoo.spec, tiny_base, root=zoo.root, progress=False, splits=redrawn)
    refitted = reference_pairs(rebuilt, encoder)[1]
    assert refitted.model_ids == first.model_ids and not np.allclose(refitted.profiles, first.profiles)
    assert np.allclose(reference_pairs(zoo, encoder)[1].profiles, first.profiles)  # each from its cache


def test_a_reference_of_two_zoos_maps_with_both(tiny_base, encoder, tmp_path):
    """Several reference zoos: one router over all their finetunes (ids prefixed by the zoo's name),
    their deltas stacked in its order, cached like one zoo's; the data-free router still routes."""
    from delta_router.routing.data_free import fit_data_free, reference_pairs

    first, second = tiny_zoo("tiny", tiny_base, tmp_path), tiny_zoo("other", tiny_base, tmp_path, seed=1)
    index = first.build()
    second.build()
    deltas, reference = reference_pairs([first, second], encoder)
    alone = [reference_pairs(zoo, encoder) for zoo in (first, second)]
    ids = [f"other_{m}" for m in alone[1][1].model_ids] + [f"tiny_{m}" for m in alone[0][1].model_ids]
    assert reference.model_ids == ids  # in the zoos' name order, whatever order they came in
    assert np.allclose(deltas, np.vstack([alone[1][0], alone[0][0]]))
    sizes = [len(r.model_ids) for _, r in alone]  # one query space: centred on every model's mean query
    assert np.allclose(
        reference.center, sum(n * r.center for n, (_, r) in zip(sizes, alone, strict=True)) / sum(sizes)
    )
    again = reference_pairs([second, first], encoder)[1]  # from the cache
    assert again.model_ids == reference.model_ids and np.allclose(again.profiles, reference.profiles)

    router = fit_data_free(index, deltas, reference, threshold=None)
    assert router.model_ids == index.model_ids()
    assert_held_out_queries_reach_their_domain(router, encoder)
    with pytest.raises(DataError, match="at least one"):
        reference_pairs([], encoder)

    from delta_router.home import cache_dir  # a cached router of other finetunes (a zoo changed): refused

    cached = next(d for d in cache_dir("references").iterdir() if len(Router.load(d).model_ids) == len(ids))
    stale = Router(ids[:-1], reference.profiles[:-1], reference.center, reference.base_fingerprint)
    stale.save(cached, force=True)
    with pytest.raises(DataError, match="does not match its zoos"):
        reference_pairs([first, second], encoder)
