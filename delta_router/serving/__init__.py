"""Serving a zoo over HTTP: ``build_app(index, router)`` -> an OpenAI-compatible FastAPI app.

``backends`` generate (PEFT in-process, or vLLM), ``scheduler`` batches concurrent requests and
routes them, ``app`` is the HTTP layer. ``delta-router serve`` runs it with uvicorn.
"""

from __future__ import annotations

import logging

from delta_router.errors import DataError, DeltaRouterError
from delta_router.models.base import resolve_base
from delta_router.models.finetunes import Finetune, peft_only_options
from delta_router.routing.router import Router
from delta_router.search.index import ModelIndex

logger = logging.getLogger(__name__)


def build_app(
    index: ModelIndex,
    router: Router | None = None,
    backend: str = "peft",
    max_loaded: int = 8,
    max_batch: int = 8,
    max_tokens: int = 512,
    device: str = "cpu",
    index_dir=None,
):
    """The app serving every plain LoRA adapter of ``index``; full finetunes, and adapters whose
    config needs PEFT's own layers (DoRA, ...: not servable per row), are skipped with a warning
    (and taken out of the router).

    Its adapter registry (``POST``/``DELETE /v1/adapters``) commits changes to ``index_dir`` when
    given (``serve --index DIR`` passes it), else keeps them in memory."""
    from delta_router.serving.app import create_app
    from delta_router.serving.backends import BACKENDS
    from delta_router.serving.scheduler import BatchScheduler

    if index.space is None or not len(index):
        raise DataError("the index is empty: nothing to serve")
    base = resolve_base(index.space.base_name)
    adapters = {e.model_id: e.embedding.path for e in index.list() if e.embedding.kind == "lora"}
    skipped = [e.model_id for e in index.list() if e.embedding.kind != "lora"]
    if skipped:
        logger.warning("full finetunes are not served (one base, many adapters): %s", ", ".join(skipped))
    if router is not None:
        router.check_base(base.fingerprint, "the index's base")
        missing = [m for m in router.model_ids if m not in adapters]
        if missing:
            raise DataError(f"the router routes to models the index does not serve: {', '.join(missing)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    options = {"device": device} if backend == "peft" else {}
    from delta_router.serving.registry import AdapterRegistry

    refused = _not_servable_per_row(adapters)
    if refused:
        logger.warning("not served: %s", "; ".join(f"{name} ({why})" for name, why in refused.items()))
        if router is not None:
            for name in refused:
                if name in router.model_ids:
                    router.remove(name)
        adapters = {name: path for name, path in adapters.items() if name not in refused}
    engine = BACKENDS[backend](base, adapters, max_loaded=max_loaded, **options)
    scheduler = BatchScheduler(engine, router, max_batch=max_batch)
    registry = AdapterRegistry(index, scheduler, index_dir)
    return create_app(scheduler, max_tokens_limit=max_tokens, registry=registry)


def _not_servable_per_row(adapters: dict[str, str]) -> dict[str, str]:
    """``{name: why}`` for adapters whose config asks for DoRA, modules_to_save, ... (config only:
    cheap at start-up; a registration also checks the weights)."""
    refused = {}
    for name, path in adapters.items():
        try:
            options = peft_only_options(Finetune.open(path, name).adapter_config)
        except DeltaRouterError as exc:
            refused[name] = str(exc)
            continue
        if options:
            refused[name] = (
                f"{', '.join(options)}: needs PEFT's own layers, not servable per row; "
                "fold it into a full model to serve it"
            )
    return refused
